//! The zero trust maturity assessment: the deployment's own measurements ([`Evidence`]) mapped
//! to the stages of the CISA Zero Trust Maturity Model v2.0 (Traditional, Initial, Advanced,
//! Optimal), per pillar and function. No I/O: the admin driver (`admin::maturity`) gathers the
//! evidence from the store and the registry and records each [`Assessment`].
//!
//! Rules:
//! - a function earns the highest stage whose every predicate holds, together with every
//!   predicate of the stages below it (stages are cumulative);
//! - a pillar takes the lowest stage of its functions (averaging would hide the weak spot);
//! - what Ward cannot observe is listed as out of scope, never scored.
//!
//! The predicates and their thresholds are in [`predicates`]; `docs/maturity.md` maps each to
//! the CISA wording it implements.

use serde::{Deserialize, Serialize};
use std::fmt;

pub mod predicates;

/// A CISA ZTMM v2.0 stage, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Traditional,
    Initial,
    Advanced,
    Optimal,
}

impl Stage {
    pub const ALL: [Stage; 4] = [
        Stage::Traditional,
        Stage::Initial,
        Stage::Advanced,
        Stage::Optimal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Traditional => "traditional",
            Stage::Initial => "initial",
            Stage::Advanced => "advanced",
            Stage::Optimal => "optimal",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pillars and cross-cutting capabilities Ward scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pillar {
    Identity,
    Devices,
    Networks,
    VisibilityAnalytics,
    AutomationOrchestration,
    Governance,
}

impl Pillar {
    pub const ALL: [Pillar; 6] = [
        Pillar::Identity,
        Pillar::Devices,
        Pillar::Networks,
        Pillar::VisibilityAnalytics,
        Pillar::AutomationOrchestration,
        Pillar::Governance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Pillar::Identity => "identity",
            Pillar::Devices => "devices",
            Pillar::Networks => "networks",
            Pillar::VisibilityAnalytics => "visibility_analytics",
            Pillar::AutomationOrchestration => "automation_orchestration",
            Pillar::Governance => "governance",
        }
    }
}

impl fmt::Display for Pillar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the assessment looks at: plain numbers and facts, gathered by the driver at one
/// instant. `None` means "nothing measured yet" (no lease, no posture change, …).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    // The policy in force and its compiled form.
    /// Version of the policy in force; `None`: no policy (everything is denied).
    pub policy_version: Option<i64>,
    /// Stored policy versions (the change history).
    pub policy_versions: u64,
    pub rules: u64,
    /// Rules whose every service opens at most [`predicates::SCOPED_PORTS`] ports per protocol.
    pub rules_port_scoped: u64,
    /// Rules with at least one posture requirement.
    pub rules_posture_gated: u64,
    /// Rules with an `expires`.
    pub rules_time_bound: u64,
    /// Rules one of whose services a `[[tests]]` entry expects to be allowed.
    pub rules_tested: u64,
    pub tests: u64,
    pub tests_failing: u64,
    /// `[trust] quarantine_after_failing` is set.
    pub auto_quarantine_on_failure: bool,
    /// `[trust] scan_denied_flows` is set.
    pub scan_detection: bool,
    /// `[trust] risky_lease_ttl` is set.
    pub risky_lease_ttl: bool,
    /// Behaviour risk changes access on its own (Automation and Orchestration): a posture
    /// requirement has `max_risk`, or `[trust] quarantine_above_risk` is set.
    #[serde(default)]
    pub behaviour_risk_enforced: bool,
    /// Behaviour anomalies raised, and acknowledged by an administrator (Visibility and
    /// Analytics): precision and recall against those labels (see docs/metrics.md).
    #[serde(default)]
    pub anomalies_raised: u64,
    #[serde(default)]
    pub anomalies_labelled: u64,
    #[serde(default)]
    pub anomaly_precision: Option<f64>,
    #[serde(default)]
    pub anomaly_recall: Option<f64>,
    // Reachability.
    pub live_devices: u64,
    /// Unordered pairs of live devices.
    pub device_pairs: u64,
    /// Pairs that may exchange packets under standing rules and grants now.
    pub pairs_reachable: u64,
    // Grants and their use.
    pub grants_active: u64,
    /// Active grants no allowed flow went through in the flow window.
    pub grants_unused: u64,
    /// Allowed flows in the flow window.
    pub allowed_flows: u64,
    /// … of which allowed by a grant or by a rule with an `expires`.
    pub allowed_flows_expiring: u64,
    /// Age of the oldest rule no allowed flow went through in the flow window (since the first
    /// policy version of the unbroken run that holds it).
    pub oldest_unused_rule_ms: Option<i64>,
    /// Policy changes driven by flow evidence (accepted suggestions).
    pub accepted_suggestions: u64,
    // Keys.
    /// Every overlay packet travels inside WireGuard (relays forward ciphertext): a fact of
    /// Ward's data plane, a field so the predicate is judged like the others.
    pub overlay_encrypted: bool,
    /// Longest lifetime (not-after − not-before) among active leases.
    pub lease_ttl_max_ms: Option<i64>,
    /// Age of each live device's newest key: max and 95th percentile.
    pub key_age_max_ms: Option<i64>,
    pub key_age_p95_ms: Option<i64>,
    /// Keys rotate at once when trust changes (built into Ward; a field so a future option to
    /// turn it off is scored).
    pub rotation_on_trust_change: bool,
    // Visibility.
    pub devices_reporting_flows: u64,
    /// Flows in the window that both ends could have reported (not pending, not denied).
    pub flows_checkable: u64,
    /// … of which both ends reported and agree.
    pub flows_confirmed: u64,
    // Devices.
    /// Posture requirements defined by the policy.
    pub posture_requirements: u64,
    /// Live devices meeting every posture requirement their rules ask for.
    pub devices_compliant: u64,
    /// Oldest latest posture report among live devices; `None`: no reports.
    pub posture_report_age_max_ms: Option<i64>,
    /// Live devices with no stored posture report.
    pub posture_reports_missing: u64,
    /// Posture change → peers' netmaps queued, as the coordinator measured it.
    pub trust_changes: u64,
    pub enforce_ms_p50: Option<f64>,
    pub enforce_ms_p99: Option<f64>,
    /// Quarantines in the audit window, by who decided.
    pub quarantines_automatic: u64,
    pub quarantines_manual: u64,
    // Identity.
    /// Enrollment tokens created in the token window.
    pub tokens: u64,
    pub token_lifetime_max_ms: Option<i64>,
    /// … of which allow more than one enrollment.
    pub tokens_reusable: u64,
    /// Live devices whose user is disabled (must be none).
    pub disabled_user_live_devices: u64,
    /// User disables in the audit window, and the time from each to its devices' lease
    /// revocation (p99).
    pub identity_changes: u64,
    pub identity_revoke_ms_p99: Option<f64>,
    // Governance.
    /// The audit hash chain verifies against its keyed head.
    pub audit_verified: bool,
}

/// One predicate as judged: what was measured, what it had to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PredicateResult {
    /// The stage this predicate is needed for.
    pub stage: Stage,
    pub name: String,
    pub value: String,
    pub threshold: String,
    pub pass: bool,
}

/// One function of a pillar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionAssessment {
    pub function: String,
    pub stage: Stage,
    pub predicates: Vec<PredicateResult>,
    /// What to do to reach the next stage (`None` at Optimal).
    #[serde(default)]
    pub next_step: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PillarAssessment {
    pub pillar: Pillar,
    /// The lowest stage of its functions.
    pub stage: Stage,
    /// The function that sets the stage (the first of the lowest).
    pub weakest: String,
    pub functions: Vec<FunctionAssessment>,
}

/// A function Ward cannot observe, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfScope {
    pub pillar: String,
    pub function: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    pub pillars: Vec<PillarAssessment>,
    pub out_of_scope: Vec<OutOfScope>,
}

impl Assessment {
    /// The stage of `p`, if scored.
    pub fn stage(&self, p: Pillar) -> Option<Stage> {
        self.pillars.iter().find(|x| x.pillar == p).map(|x| x.stage)
    }
}

/// Scores the evidence.
pub fn assess(e: &Evidence) -> Assessment {
    let pillars = Pillar::ALL
        .iter()
        .map(|&p| {
            let functions: Vec<FunctionAssessment> = predicates::functions(p)
                .iter()
                .map(|&(name, judge)| function(name, judge(e)))
                .collect();
            pillar(p, functions)
        })
        .collect();
    Assessment {
        pillars,
        out_of_scope: predicates::out_of_scope(),
    }
}

/// A predicate with the step that would make it hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub result: PredicateResult,
    pub fix: String,
}

/// A function's stage: the highest stage every predicate up to which holds; its next step is
/// the fix of the first failing predicate of the lowest failing stage.
pub fn function(name: &str, judged: Vec<Judged>) -> FunctionAssessment {
    let first_fail = judged
        .iter()
        .filter(|j| !j.result.pass)
        .min_by_key(|j| j.result.stage);
    let stage = match first_fail {
        // Failing a predicate of stage S caps the function just below S.
        Some(j) => Stage::ALL
            .iter()
            .copied()
            .filter(|s| *s < j.result.stage)
            .max()
            .unwrap_or(Stage::Traditional),
        None => Stage::Optimal,
    };
    FunctionAssessment {
        function: name.to_string(),
        stage,
        next_step: first_fail.map(|j| j.fix.clone()),
        predicates: judged.into_iter().map(|j| j.result).collect(),
    }
}

/// A pillar takes the lowest stage of its functions.
pub fn pillar(p: Pillar, functions: Vec<FunctionAssessment>) -> PillarAssessment {
    let weakest = functions.iter().min_by_key(|f| f.stage);
    PillarAssessment {
        pillar: p,
        stage: weakest.map(|f| f.stage).unwrap_or(Stage::Traditional),
        weakest: weakest.map(|f| f.function.clone()).unwrap_or_default(),
        functions,
    }
}

/// What changed between two assessments, one line per pillar or function whose stage moved
/// (`networks: initial -> advanced`).
pub fn changes(before: &Assessment, after: &Assessment) -> Vec<String> {
    let mut out = Vec::new();
    for a in &after.pillars {
        let Some(b) = before.pillars.iter().find(|b| b.pillar == a.pillar) else {
            out.push(format!(
                "{}: scored for the first time ({})",
                a.pillar, a.stage
            ));
            continue;
        };
        if a.stage != b.stage {
            out.push(format!("{}: {} -> {}", a.pillar, b.stage, a.stage));
        }
        for f in &a.functions {
            let Some(g) = b.functions.iter().find(|g| g.function == f.function) else {
                continue;
            };
            if f.stage != g.stage {
                out.push(format!(
                    "{} / {}: {} -> {}",
                    a.pillar, f.function, g.stage, f.stage
                ));
            }
        }
    }
    out
}

/// The p-th quantile (0..=1) of `v` by nearest rank; `None` when empty.
pub fn quantile(v: &mut [i64], q: f64) -> Option<i64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q.clamp(0.0, 1.0)).round() as usize;
    v.get(i.min(v.len() - 1)).copied()
}

#[cfg(test)]
mod tests;
