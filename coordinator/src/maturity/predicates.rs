//! Every predicate, per pillar and function, with its threshold and the step that makes it
//! hold. `docs/maturity.md` quotes the CISA ZTMM v2.0 stage each one implements.

use super::{Evidence, Judged, OutOfScope, Pillar, PredicateResult, Stage};

/// A rule is "scoped to ports" when every service it reaches opens at most this many ports
/// per protocol (`tcp/*` and wide ranges open a whole host).
pub const SCOPED_PORTS: u32 = 16;

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Longest enrollment-token lifetime and key lifetime per stage.
pub const TOKEN_TTL_INITIAL_MS: i64 = 30 * DAY;
pub const TOKEN_TTL_ADVANCED_MS: i64 = DAY;
pub const TOKEN_TTL_OPTIMAL_MS: i64 = HOUR;
pub const KEY_TTL_ADVANCED_MS: i64 = DAY;
pub const KEY_TTL_OPTIMAL_MS: i64 = 15 * MINUTE;
/// A disabled identity must lose access by lease expiry at the latest within this.
pub const IDENTITY_LEASE_MS: i64 = HOUR;
/// Latest posture report older than this is stale.
pub const POSTURE_AGE_MS: i64 = 15 * MINUTE;
/// An unused rule older than this should have been removed.
pub const UNUSED_RULE_MS: i64 = 30 * DAY;
/// Signal → enforcement p99 at Optimal.
pub const ENFORCE_P99_MS: f64 = 1000.0;
/// Share thresholds, in percent.
pub const SHARE_MOST: u64 = 80;
pub const SHARE_NEARLY_ALL: u64 = 90;
pub const SHARE_QUARTER: u64 = 25;
pub const SHARE_HALF: u64 = 50;

/// A function: its name and its predicates.
pub type Judge = fn(&Evidence) -> Vec<Judged>;

/// The functions Ward scores in a pillar.
pub fn functions(p: Pillar) -> &'static [(&'static str, Judge)] {
    match p {
        Pillar::Identity => &[
            ("authentication", authentication),
            ("access_management", access_management),
            ("identity_lifecycle", identity_lifecycle),
        ],
        Pillar::Devices => &[
            ("policy_enforcement_compliance", compliance),
            ("resource_access", resource_access),
        ],
        Pillar::Networks => &[
            ("segmentation", segmentation),
            ("traffic_management", traffic_management),
            ("traffic_encryption", traffic_encryption),
            ("network_visibility", network_visibility),
        ],
        Pillar::VisibilityAnalytics => &[("flow_and_audit_analytics", analytics)],
        Pillar::AutomationOrchestration => &[("automated_response", automation)],
        Pillar::Governance => &[("policy_governance", governance)],
    }
}

/// What Ward cannot observe.
pub fn out_of_scope() -> Vec<OutOfScope> {
    let o = |pillar: &str, function: &str, why: &str| OutOfScope {
        pillar: pillar.into(),
        function: function.into(),
        why: why.into(),
    };
    vec![
        o(
            "identity",
            "identity_stores",
            "users live in the identity provider; Ward sees names and groups only",
        ),
        o(
            "identity",
            "risk_assessment",
            "Ward sees no user behaviour beyond flows and posture",
        ),
        o(
            "devices",
            "asset_supply_chain_risk",
            "Ward does not inventory hardware or software supply chains",
        ),
        o(
            "devices",
            "device_threat_protection",
            "Ward reads posture signals; it runs no endpoint protection",
        ),
        o(
            "networks",
            "network_resilience",
            "availability of the underlay is not measured",
        ),
        o(
            "applications_workloads",
            "*",
            "Ward controls who reaches a port, not what the application does",
        ),
        o("data", "*", "Ward never sees plaintext application data"),
    ]
}

/// `part` as a percentage of `whole` (rounded down); `None` when `whole` is 0.
pub fn percent(part: u64, whole: u64) -> Option<u64> {
    (whole > 0).then(|| part.min(whole) * 100 / whole)
}

fn pred(
    stage: Stage,
    name: &str,
    value: String,
    threshold: &str,
    pass: bool,
    fix: String,
) -> Judged {
    Judged {
        result: PredicateResult {
            stage,
            name: name.into(),
            value,
            threshold: threshold.into(),
            pass,
        },
        fix,
    }
}

/// A share predicate: `part` of `whole` must be at least `min` percent; nothing to count fails.
fn share_at_least(
    stage: Stage,
    name: &str,
    part: u64,
    whole: u64,
    min: u64,
    fix: String,
) -> Judged {
    let (value, pass) = match percent(part, whole) {
        Some(p) => (format!("{part} of {whole} ({p}%)"), p >= min),
        None => ("none".into(), false),
    };
    pred(stage, name, value, &format!(">= {min}%"), pass, fix)
}

fn dur(ms: i64) -> String {
    let ms = ms.max(0);
    if ms >= DAY {
        format!("{:.1}d", ms as f64 / DAY as f64)
    } else if ms >= HOUR {
        format!("{:.1}h", ms as f64 / HOUR as f64)
    } else if ms >= MINUTE {
        format!("{:.1}m", ms as f64 / MINUTE as f64)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// `v` at most `max`; unmeasured fails unless `none_passes` (with `none` as its value).
fn at_most(
    stage: Stage,
    name: &str,
    v: Option<i64>,
    max: i64,
    none: Option<&str>,
    fix: String,
) -> Judged {
    let (value, pass) = match (v, none) {
        (Some(v), _) => (dur(v), v <= max),
        (None, Some(why)) => (why.to_string(), true),
        (None, None) => ("not measured".into(), false),
    };
    pred(stage, name, value, &format!("<= {}", dur(max)), pass, fix)
}

fn zero(stage: Stage, name: &str, v: u64, fix: String) -> Judged {
    pred(stage, name, v.to_string(), "0", v == 0, fix)
}

fn yes(stage: Stage, name: &str, v: bool, fix: String) -> Judged {
    pred(
        stage,
        name,
        if v { "yes" } else { "no" }.into(),
        "yes",
        v,
        fix,
    )
}

fn latency(stage: Stage, name: &str, p99: Option<f64>, n: u64, fix: String) -> Judged {
    let (value, pass) = match p99 {
        Some(ms) => (format!("p99 {ms:.0} ms over {n}"), ms <= ENFORCE_P99_MS),
        None => ("not measured (no change yet)".into(), false),
    };
    pred(
        stage,
        name,
        value,
        &format!("measured, p99 <= {ENFORCE_P99_MS:.0} ms"),
        pass,
        fix,
    )
}

fn authentication(e: &Evidence) -> Vec<Judged> {
    let none = Some("no tokens created in 30 days");
    let fix_ttl = |max: i64| {
        format!(
            "create enrollment tokens with `token create --ttl` of {} or less",
            dur(max)
        )
    };
    vec![
        at_most(
            Stage::Initial,
            "token_lifetime_max",
            e.token_lifetime_max_ms,
            TOKEN_TTL_INITIAL_MS,
            none,
            fix_ttl(TOKEN_TTL_INITIAL_MS),
        ),
        zero(
            Stage::Advanced,
            "tokens_reusable",
            e.tokens_reusable,
            format!(
                "{} of {} enrollment tokens allow more than one device: use single-use tokens \
                 (`token create` without --uses)",
                e.tokens_reusable, e.tokens
            ),
        ),
        at_most(
            Stage::Advanced,
            "token_lifetime_max",
            e.token_lifetime_max_ms,
            TOKEN_TTL_ADVANCED_MS,
            none,
            fix_ttl(TOKEN_TTL_ADVANCED_MS),
        ),
        at_most(
            Stage::Optimal,
            "token_lifetime_max",
            e.token_lifetime_max_ms,
            TOKEN_TTL_OPTIMAL_MS,
            none,
            fix_ttl(TOKEN_TTL_OPTIMAL_MS),
        ),
    ]
}

fn access_management(e: &Evidence) -> Vec<Judged> {
    let grants_and_rules = e.rules + e.grants_active;
    let bound = e.rules_time_bound + e.grants_active;
    let fix_bound = format!(
        "{bound} of {grants_and_rules} rules and grants are time-bound: give standing rules an \
         `expires`, or replace them with `grant add --for`"
    );
    let flows = match percent(e.allowed_flows_expiring, e.allowed_flows) {
        Some(p) => pred(
            Stage::Optimal,
            "allowed_flows_time_bound",
            format!("{} of {} ({p}%)", e.allowed_flows_expiring, e.allowed_flows),
            &format!(">= {SHARE_HALF}%"),
            p >= SHARE_HALF,
            "most allowed traffic goes through standing rules: move it to expiring rules or grants"
                .into(),
        ),
        None => pred(
            Stage::Optimal,
            "allowed_flows_time_bound",
            "no allowed flows in the window".into(),
            &format!(">= {SHARE_HALF}%"),
            true,
            String::new(),
        ),
    };
    vec![
        at_most(
            Stage::Initial,
            "lease_ttl_max",
            e.lease_ttl_max_ms,
            KEY_TTL_ADVANCED_MS,
            None,
            "no device holds an active lease yet: enroll a device, or shorten `serve --lease-ttl`"
                .into(),
        ),
        share_at_least(
            Stage::Advanced,
            "rules_and_grants_time_bound",
            bound,
            grants_and_rules,
            SHARE_QUARTER,
            fix_bound.clone(),
        ),
        share_at_least(
            Stage::Optimal,
            "rules_and_grants_time_bound",
            bound,
            grants_and_rules,
            SHARE_HALF,
            fix_bound,
        ),
        flows,
    ]
}

fn identity_lifecycle(e: &Evidence) -> Vec<Judged> {
    vec![
        zero(
            Stage::Initial,
            "disabled_user_live_devices",
            e.disabled_user_live_devices,
            format!(
                "{} live device(s) belong to disabled users: revoke them (`device revoke`)",
                e.disabled_user_live_devices
            ),
        ),
        at_most(
            Stage::Advanced,
            "lease_ttl_max",
            e.lease_ttl_max_ms,
            IDENTITY_LEASE_MS,
            None,
            format!(
                "a disabled user's device keeps access until its lease ends even when the \
                 coordinator is unreachable: keep `serve --lease-ttl` at {} or less",
                dur(IDENTITY_LEASE_MS)
            ),
        ),
        latency(
            Stage::Optimal,
            "identity_change_to_revocation",
            e.identity_revoke_ms_p99,
            e.identity_changes,
            "no user disable has been measured yet: the latency is scored once one happens".into(),
        ),
    ]
}

fn compliance(e: &Evidence) -> Vec<Judged> {
    let fix_gate = format!(
        "{} of {} rules require posture: add `posture = [...]` to the rest",
        e.rules_posture_gated, e.rules
    );
    let compliant = if e.live_devices == 0 {
        pred(
            Stage::Advanced,
            "devices_compliant",
            "no live devices".into(),
            &format!(">= {SHARE_NEARLY_ALL}%"),
            true,
            String::new(),
        )
    } else {
        share_at_least(
            Stage::Advanced,
            "devices_compliant",
            e.devices_compliant,
            e.live_devices,
            SHARE_NEARLY_ALL,
            format!(
                "{} of {} live devices fail a posture requirement: see `device show NAME`",
                e.live_devices - e.devices_compliant.min(e.live_devices),
                e.live_devices
            ),
        )
    };
    vec![
        pred(
            Stage::Initial,
            "posture_requirements",
            e.posture_requirements.to_string(),
            ">= 1",
            e.posture_requirements >= 1,
            "define a `[posture.NAME]` requirement in the policy".into(),
        ),
        share_at_least(
            Stage::Advanced,
            "rules_posture_gated",
            e.rules_posture_gated,
            e.rules,
            SHARE_HALF,
            fix_gate.clone(),
        ),
        compliant,
        share_at_least(
            Stage::Optimal,
            "rules_posture_gated",
            e.rules_posture_gated,
            e.rules,
            100,
            fix_gate,
        ),
        at_most(
            Stage::Optimal,
            "posture_report_age_max",
            e.posture_report_age_max_ms,
            POSTURE_AGE_MS,
            None,
            "some live device's latest posture report is stale or missing: check its agent".into(),
        ),
        zero(
            Stage::Optimal,
            "posture_reports_missing",
            e.posture_reports_missing,
            format!(
                "{} live device(s) never sent a posture report",
                e.posture_reports_missing
            ),
        ),
    ]
}

fn resource_access(e: &Evidence) -> Vec<Judged> {
    let q_total = e.quarantines_automatic + e.quarantines_manual;
    vec![
        pred(
            Stage::Initial,
            "rules_posture_gated",
            e.rules_posture_gated.to_string(),
            ">= 1",
            e.rules_posture_gated >= 1,
            "gate at least one rule on device posture (`posture = [...]`)".into(),
        ),
        yes(
            Stage::Advanced,
            "auto_quarantine_on_failure",
            e.auto_quarantine_on_failure,
            "set `[trust] quarantine_after_failing` so a non-compliant device is isolated without \
             an admin"
                .into(),
        ),
        latency(
            Stage::Optimal,
            "non_compliance_to_enforcement",
            e.enforce_ms_p99,
            e.trust_changes,
            "no posture change has been measured yet, or its p99 is over 1 s: see `status` \
             (posture enforce_ms_p99)"
                .into(),
        ),
        pred(
            Stage::Optimal,
            "quarantines_automatic",
            format!(
                "{} automatic, {} manual",
                e.quarantines_automatic, e.quarantines_manual
            ),
            "automatic >= manual",
            e.quarantines_automatic >= e.quarantines_manual,
            format!(
                "{} of {q_total} quarantines were manual: add `[trust]` rules that catch what \
                 admins catch by hand",
                e.quarantines_manual
            ),
        ),
    ]
}

fn segmentation(e: &Evidence) -> Vec<Judged> {
    let whole = e.rules - e.rules_port_scoped.min(e.rules);
    let fix_scope = format!(
        "{whole} of {} rules allow whole hosts or wide port ranges: scope them to ports; see \
         `policy suggest`",
        e.rules
    );
    let pairs = if e.live_devices < 3 {
        pred(
            Stage::Optimal,
            "pairs_with_standing_reachability",
            format!("n/a ({} live devices)", e.live_devices),
            &format!("<= {SHARE_HALF}%"),
            true,
            String::new(),
        )
    } else {
        let p = percent(e.pairs_reachable, e.device_pairs).unwrap_or(0);
        pred(
            Stage::Optimal,
            "pairs_with_standing_reachability",
            format!("{} of {} ({p}%)", e.pairs_reachable, e.device_pairs),
            &format!("<= {SHARE_HALF}%"),
            p <= SHARE_HALF,
            format!(
                "{} of {} device pairs can reach each other: narrow `from` and services' \
                 `devices` to who needs them",
                e.pairs_reachable, e.device_pairs
            ),
        )
    };
    vec![
        pred(
            Stage::Initial,
            "policy_in_force",
            match e.policy_version {
                Some(v) => format!("version {v}, {} rules, default deny", e.rules),
                None => "none (default deny: nothing is reachable)".into(),
            },
            "a policy with >= 1 rule",
            e.policy_version.is_some() && e.rules >= 1,
            "write a policy and `policy apply` it".into(),
        ),
        share_at_least(
            Stage::Advanced,
            "rules_port_scoped",
            e.rules_port_scoped,
            e.rules,
            SHARE_MOST,
            fix_scope.clone(),
        ),
        share_at_least(
            Stage::Optimal,
            "rules_port_scoped",
            e.rules_port_scoped,
            e.rules,
            100,
            fix_scope,
        ),
        pairs,
    ]
}

fn traffic_management(e: &Evidence) -> Vec<Judged> {
    vec![
        pred(
            Stage::Initial,
            "devices_reporting_flows",
            e.devices_reporting_flows.to_string(),
            ">= 1",
            e.devices_reporting_flows >= 1,
            "no device has reported flows: check the agents' flow logging".into(),
        ),
        at_most(
            Stage::Advanced,
            "oldest_unused_rule_age",
            e.oldest_unused_rule_ms,
            UNUSED_RULE_MS,
            Some("every rule carried traffic"),
            "a rule has carried no traffic for a long time: remove it; see `policy suggest`".into(),
        ),
        zero(
            Stage::Advanced,
            "grants_unused",
            e.grants_unused,
            format!(
                "{} of {} active grants carried no traffic: remove them (`grant rm`)",
                e.grants_unused, e.grants_active
            ),
        ),
        pred(
            Stage::Optimal,
            "policy_changes_from_flow_evidence",
            e.accepted_suggestions.to_string(),
            ">= 1",
            e.accepted_suggestions >= 1,
            "change the policy from observed flows: `policy suggest`, then accept".into(),
        ),
    ]
}

fn traffic_encryption(e: &Evidence) -> Vec<Judged> {
    let fix_ttl = |max: i64| {
        format!(
            "keys live too long: set `serve --lease-ttl` (and --lease-max-ttl) to {} or less",
            dur(max)
        )
    };
    vec![
        yes(
            Stage::Initial,
            "overlay_traffic_encrypted",
            e.overlay_encrypted,
            "carry all traffic inside the overlay".into(),
        ),
        at_most(
            Stage::Advanced,
            "lease_ttl_max",
            e.lease_ttl_max_ms,
            KEY_TTL_ADVANCED_MS,
            None,
            fix_ttl(KEY_TTL_ADVANCED_MS),
        ),
        at_most(
            Stage::Advanced,
            "key_age_max",
            e.key_age_max_ms,
            KEY_TTL_ADVANCED_MS,
            None,
            "some device's key is old: it has stopped renewing its lease".into(),
        ),
        at_most(
            Stage::Optimal,
            "lease_ttl_max",
            e.lease_ttl_max_ms,
            KEY_TTL_OPTIMAL_MS,
            None,
            fix_ttl(KEY_TTL_OPTIMAL_MS),
        ),
        at_most(
            Stage::Optimal,
            "key_age_p95",
            e.key_age_p95_ms,
            KEY_TTL_OPTIMAL_MS,
            None,
            "most keys are older than 15 minutes: shorten `serve --lease-ttl`".into(),
        ),
        yes(
            Stage::Optimal,
            "rotation_on_trust_change",
            e.rotation_on_trust_change,
            "rotate keys when trust changes".into(),
        ),
    ]
}

fn reporting(stage: Stage, e: &Evidence) -> Judged {
    share_at_least(
        stage,
        "devices_reporting_flows",
        e.devices_reporting_flows,
        e.live_devices,
        SHARE_NEARLY_ALL,
        format!(
            "{} of {} live devices report flows: check the others' agents",
            e.devices_reporting_flows, e.live_devices
        ),
    )
}

fn confirmed(stage: Stage, e: &Evidence) -> Judged {
    share_at_least(
        stage,
        "flows_confirmed_by_both_ends",
        e.flows_confirmed,
        e.flows_checkable,
        SHARE_NEARLY_ALL,
        format!(
            "{} of {} flows are confirmed by both ends: see `flows --one-sided`",
            e.flows_confirmed, e.flows_checkable
        ),
    )
}

fn network_visibility(e: &Evidence) -> Vec<Judged> {
    vec![
        pred(
            Stage::Initial,
            "devices_reporting_flows",
            e.devices_reporting_flows.to_string(),
            ">= 1",
            e.devices_reporting_flows >= 1,
            "no device has reported flows: check the agents' flow logging".into(),
        ),
        reporting(Stage::Advanced, e),
        confirmed(Stage::Optimal, e),
    ]
}

fn analytics(e: &Evidence) -> Vec<Judged> {
    vec![
        yes(
            Stage::Initial,
            "audit_chain_verified",
            e.audit_verified,
            "the audit chain does not verify: run `audit verify`".into(),
        ),
        reporting(Stage::Advanced, e),
        yes(
            Stage::Advanced,
            "scan_detection",
            e.scan_detection,
            "set `[trust] scan_denied_flows` so denied flows are analysed for scans".into(),
        ),
        confirmed(Stage::Optimal, e),
    ]
}

fn automation(e: &Evidence) -> Vec<Judged> {
    vec![
        at_most(
            Stage::Initial,
            "access_expires_automatically",
            e.lease_ttl_max_ms,
            KEY_TTL_ADVANCED_MS,
            None,
            "no active lease to measure: enroll a device".into(),
        ),
        yes(
            Stage::Advanced,
            "auto_quarantine_on_failure",
            e.auto_quarantine_on_failure,
            "set `[trust] quarantine_after_failing`".into(),
        ),
        latency(
            Stage::Optimal,
            "trust_change_to_enforcement",
            e.enforce_ms_p99,
            e.trust_changes,
            "no trust change has been measured yet, or its p99 is over 1 s".into(),
        ),
        yes(
            Stage::Optimal,
            "risky_lease_ttl",
            e.risky_lease_ttl,
            "set `[trust] risky_lease_ttl` so a risky device comes back sooner".into(),
        ),
    ]
}

fn governance(e: &Evidence) -> Vec<Judged> {
    vec![
        pred(
            Stage::Initial,
            "policy_versions",
            e.policy_versions.to_string(),
            ">= 1",
            e.policy_versions >= 1,
            "apply a version-controlled policy (`policy apply`)".into(),
        ),
        pred(
            Stage::Advanced,
            "policy_tests_passing",
            format!("{} tests, {} failing", e.tests, e.tests_failing),
            ">= 1 test, 0 failing",
            e.tests >= 1 && e.tests_failing == 0,
            "add `[[tests]]` that pin who may and may not reach what".into(),
        ),
        share_at_least(
            Stage::Optimal,
            "rules_covered_by_a_test",
            e.rules_tested,
            e.rules,
            SHARE_NEARLY_ALL,
            format!(
                "{} of {} rules are covered by a test: add an `allow` test for each",
                e.rules_tested, e.rules
            ),
        ),
    ]
}
