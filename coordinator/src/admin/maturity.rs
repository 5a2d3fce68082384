//! `maturity` and `maturity history`: gathers the [`Evidence`] the assessment core
//! ([`crate::maturity`]) scores, from the store and the registry's live view, and records
//! assessments in the store's hash-chained maturity table (daily, and on every policy apply).

use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use ward_shared::flows::FlowVerdict;
use ward_shared::policy::{self, Policy, View};
use ward_shared::wire::DeviceId;

use super::api::{MaturityEntryView, MaturityHistoryView, MaturityView};
use super::ops::{Live, Snapshot};
use super::policy::Applied;
use crate::flows::{pair, PairStatus, Tolerance};
use crate::maturity::{self, predicates::SCOPED_PORTS, Assessment, Evidence};
use crate::store::{DeviceStatus, FlowQuery, PolicyVersion, Store, SuggestionState};

const DAY_MS: i64 = 86_400_000;
/// Flows looked at: the last two weeks.
pub const FLOW_WINDOW_MS: i64 = 14 * DAY_MS;
/// Enrollment tokens looked at: those created in the last 30 days.
pub const TOKEN_WINDOW_MS: i64 = 30 * DAY_MS;
/// Audit rows looked at (quarantines, user disables and the revocations that follow them):
/// the newest this many of [`AUDIT_ACTIONS`].
const AUDIT_ROWS: i64 = 20_000;
/// The audit actions an assessment counts.
const AUDIT_ACTIONS: [&str; 3] = ["device.quarantine", "user.disable", "lease.revoke"];
/// Most flow records read for one assessment (newest first).
const MAX_FLOW_ROWS: usize = 200_000;
/// A user disable whose devices' leases are not revoked within this is not paired.
const REVOKE_PAIRING_MS: i64 = 60_000;
/// The daily recording: due when the newest row is at least this old.
pub const RECORD_EVERY_MS: i64 = DAY_MS;

/// Assessed now, not recorded.
pub fn maturity(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    explain: bool,
    now: i64,
) -> Result<MaturityView> {
    let evidence = evidence(store, live, snap, now)?;
    let mut assessment = maturity::assess(&evidence);
    if !explain {
        for p in &mut assessment.pillars {
            for f in &mut p.functions {
                f.next_step = None;
            }
        }
    }
    Ok(MaturityView {
        at_ms: now,
        evidence,
        assessment,
    })
}

/// Assesses and appends the assessment to the chained table; its seq.
pub fn record(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    trigger: &str,
    now: i64,
) -> Result<i64> {
    record_with(store, live, snap, trigger, None, now)
}

/// [`record`] right after a policy apply: the apply's check already judged the directory, ran
/// the tests and compiled; those are used when the policy in force is still the applied one.
pub fn record_with(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    trigger: &str,
    applied: Option<&Applied>,
    now: i64,
) -> Result<i64> {
    let started = std::time::Instant::now();
    let a = maturity::assess(&evidence_with(store, live, snap, applied, now)?);
    let seq = store.append_maturity(trigger, &serde_json::to_string(&a)?, now)?;
    tracing::info!(
        seq,
        trigger,
        elapsed_ms = started.elapsed().as_millis(),
        "maturity assessment recorded"
    );
    Ok(seq)
}

/// Records a `daily` assessment if none was recorded in the last day; its seq if it did.
pub fn record_if_due(store: &dyn Store, live: &dyn Live, now: i64) -> Result<Option<i64>> {
    let chain = store.maturity_history()?;
    if chain
        .rows
        .last()
        .is_some_and(|r| now.saturating_sub(r.ts_ms) < RECORD_EVERY_MS)
    {
        return Ok(None);
    }
    let snap = live.snapshot()?;
    record(store, live, &snap, "daily", now).map(Some)
}

/// `maturity history`: every recorded assessment, oldest first, with the stage per pillar and
/// what moved since the one before. A broken hash chain is an error.
pub fn history(store: &dyn Store) -> Result<MaturityHistoryView> {
    let chain = store.maturity_history()?;
    if !chain.verified {
        bail!(
            "the maturity history's hash chain is broken at row {} (a recorded assessment was \
             edited, inserted or deleted)",
            chain
                .first_bad_seq
                .map(|s| s.to_string())
                .unwrap_or_else(|| "?".into())
        );
    }
    let mut entries = Vec::with_capacity(chain.rows.len());
    let mut prev: Option<Assessment> = None;
    for row in chain.rows {
        let a: Assessment = serde_json::from_str(&row.assessment)
            .map_err(|e| anyhow!("maturity row {} does not decode: {e}", row.seq))?;
        let changes = match &prev {
            Some(p) => maturity::changes(p, &a),
            None => vec!["first assessment".into()],
        };
        entries.push(MaturityEntryView {
            seq: row.seq,
            ts_ms: row.ts_ms,
            trigger: row.trigger,
            stages: a.pillars.iter().map(|p| (p.pillar, p.stage)).collect(),
            changes,
        });
        prev = Some(a);
    }
    Ok(MaturityHistoryView {
        verified: true,
        entries,
    })
}

/// A `device.quarantine` audit row's detail, as far as the assessment reads it.
#[derive(Deserialize)]
struct QuarantineDetail {
    quarantine: QuarantineFlag,
}

#[derive(Deserialize)]
struct QuarantineFlag {
    #[serde(default)]
    automatic: bool,
}

/// A `user.disable` audit row's detail.
#[derive(Deserialize)]
struct DisableDetail {
    #[serde(default)]
    devices: Vec<DeviceId>,
}

/// Gathers the evidence at `now`.
pub fn evidence(store: &dyn Store, live: &dyn Live, snap: &Snapshot, now: i64) -> Result<Evidence> {
    evidence_with(store, live, snap, None, now)
}

/// [`evidence`], taking the directory, test count and compile from `applied` when it is the
/// policy in force (same stored version).
fn evidence_with(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    applied: Option<&Applied>,
    now: i64,
) -> Result<Evidence> {
    let mut e = Evidence {
        overlay_encrypted: true,
        rotation_on_trust_change: true,
        ..Evidence::default()
    };
    let mut took = Phases::start();
    let current = store.current_policy()?;
    let policy: Option<Policy> = match &current {
        Some(v) => Some(
            policy::parse(v.text.as_bytes(), "policy in force")
                .map_err(|err| anyhow!("the stored policy does not parse: {err}"))?,
        ),
        None => None,
    };
    let history = store.policy_history()?;
    e.policy_version = current.as_ref().map(|v| v.version);
    e.accepted_suggestions = store
        .suggestion_marks()?
        .iter()
        .filter(|m| m.state == SuggestionState::Accepted)
        .count() as u64;
    e.policy_versions = history.len() as u64;
    let applied = applied.filter(|a| e.policy_version == Some(a.version) && policy.is_some());
    let fresh;
    let dir: &policy::Directory = match (&policy, applied) {
        (Some(_), Some(a)) => &a.directory,
        (Some(p), None) => {
            fresh = live.directory_for(p)?;
            &fresh
        }
        (None, _) => &snap.directory,
    };
    took.mark("policy_read");
    let live_ids: BTreeSet<DeviceId> = dir
        .devices
        .iter()
        .filter(|d| d.live)
        .map(|d| d.id)
        .collect();
    let n = live_ids.len() as u64;
    e.live_devices = n;
    e.device_pairs = n * n.saturating_sub(1) / 2;

    // Rules, tests and the compiled access.
    let mut expiring_rules = BTreeSet::new();
    if let Some(p) = &policy {
        // Shadow rules are candidates, not access: only the enforced view is assessed.
        let enforced: Vec<_> = p
            .rules
            .iter()
            .filter(|r| r.mode.in_view(View::Enforced))
            .collect();
        e.rules = enforced.len() as u64;
        let tested: BTreeSet<&str> = p
            .tests
            .iter()
            .flat_map(|t| t.allow.iter().map(|a| a.value.service.as_str()))
            .collect();
        for r in &enforced {
            let scoped = r.to.iter().all(|s| {
                p.services.get(&s.value).is_some_and(|svc| {
                    width(&svc.ports.tcp) <= SCOPED_PORTS && width(&svc.ports.udp) <= SCOPED_PORTS
                })
            });
            e.rules_port_scoped += u64::from(scoped);
            e.rules_posture_gated += u64::from(!r.posture.is_empty());
            if r.expires_ms.is_some() {
                e.rules_time_bound += 1;
                expiring_rules.insert(r.name.clone());
            }
            e.rules_tested += u64::from(r.to.iter().any(|s| tested.contains(s.value.as_str())));
        }
        (e.tests, e.tests_failing) = match applied {
            // An applied policy passed every test.
            Some(a) => (a.tests as u64, 0),
            None => {
                let outcomes = policy::run_tests(p, dir, now);
                let failing = outcomes.iter().filter(|t| !t.pass).count();
                (outcomes.len() as u64, failing as u64)
            }
        };
        e.posture_requirements = p.postures.len() as u64;
        e.auto_quarantine_on_failure = p.trust.quarantine_after_failing_ms.is_some();
        e.scan_detection = p.trust.scan_denied_flows.is_some();
        e.risky_lease_ttl = p.trust.risky_lease_ttl_ms.is_some();
        e.behaviour_risk_enforced = p.trust.quarantine_above_risk.is_some()
            || p.postures.values().any(|q| q.max_risk.is_some());
        let fresh_compile;
        let compiled: &policy::Compiled = match applied {
            Some(a) => &a.compiled,
            None => {
                fresh_compile = policy::compile(p, dir, now);
                &fresh_compile
            }
        };
        took.mark("policy_tests");
        e.pairs_reachable = reachable_pairs(compiled, &live_ids);
        took.mark("pairs");
        let needs = policy::requirements_by_device(p, dir);
        e.devices_compliant = dir
            .devices
            .iter()
            .filter(|d| d.live)
            .filter(|d| {
                needs
                    .get(&d.id)
                    .is_none_or(|req| req.iter().all(|r| d.posture_passed.contains(r)))
            })
            .count() as u64;
    } else {
        e.devices_compliant = n;
    }

    took.mark("compliance");

    // Flows: use of rules and grants, coverage, both-end confirmation.
    let grants = store.active_grants(now)?;
    e.grants_active = grants.len() as u64;
    let rows = store.flows(&FlowQuery {
        since_ms: now.saturating_sub(FLOW_WINDOW_MS),
        involving: None,
        limit: MAX_FLOW_ROWS,
    })?;
    let pairs = pair(&rows, &Tolerance::default(), now);
    let mut used: BTreeSet<&str> = BTreeSet::new();
    for p in &pairs {
        match p.status {
            PairStatus::Paired => {
                e.flows_checkable += 1;
                e.flows_confirmed += 1;
            }
            PairStatus::Mismatch | PairStatus::OneSided => e.flows_checkable += 1,
            PairStatus::Pending | PairStatus::Denied => {}
        }
        if p.verdict != FlowVerdict::Allowed {
            continue;
        }
        e.allowed_flows += 1;
        if let Some(r) = p.rule.as_deref() {
            used.insert(r);
            if r.starts_with("grant:") || expiring_rules.contains(r) {
                e.allowed_flows_expiring += 1;
            }
        }
    }
    e.grants_unused = grants
        .iter()
        .filter(|g| !used.contains(format!("grant:{}", g.id).as_str()))
        .count() as u64;
    if let Some(p) = &policy {
        let since = rule_ages(&history);
        e.oldest_unused_rule_ms = p
            .rules
            .iter()
            .filter(|r| r.mode.in_view(View::Enforced))
            .filter(|r| !used.contains(r.name.as_str()))
            .filter_map(|r| since.get(&r.name).map(|t| now.saturating_sub(*t)))
            .max();
    }
    let flow_since = now.saturating_sub(FLOW_WINDOW_MS);
    e.devices_reporting_flows = store
        .flow_sources()?
        .iter()
        .filter(|s| live_ids.contains(&s.device) && s.last_report_ms >= flow_since)
        .count() as u64;

    took.mark("flows");

    // Keys: lease lifetimes, and each live device's newest key's age.
    let leases = store.active_leases(now)?;
    e.lease_ttl_max_ms = leases
        .iter()
        .filter(|l| live_ids.contains(&l.device_id))
        .map(|l| l.not_after_ms.saturating_sub(l.not_before_ms))
        .max();
    let mut newest: BTreeMap<DeviceId, i64> = BTreeMap::new();
    for l in leases.iter().filter(|l| live_ids.contains(&l.device_id)) {
        let t = newest.entry(l.device_id).or_insert(l.not_before_ms);
        *t = (*t).max(l.not_before_ms);
    }
    let mut ages: Vec<i64> = newest.values().map(|t| now.saturating_sub(*t)).collect();
    e.key_age_max_ms = maturity::quantile(&mut ages, 1.0);
    e.key_age_p95_ms = maturity::quantile(&mut ages, 0.95);

    took.mark("leases");

    // Posture reports.
    let reported = store.posture_times()?;
    let mut oldest: Option<i64> = None;
    for id in &live_ids {
        match reported.get(id) {
            Some(at) => {
                let age = now.saturating_sub(*at);
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
            }
            None => e.posture_reports_missing += 1,
        }
    }
    e.posture_report_age_max_ms = oldest;
    e.trust_changes = snap.trust.changes;
    e.enforce_ms_p50 = snap.trust.enforce_ms_p50;
    e.enforce_ms_p99 = snap.trust.enforce_ms_p99;

    took.mark("posture");

    // Identity: tokens, disabled users' devices, disable → revocation.
    let token_since = now.saturating_sub(TOKEN_WINDOW_MS);
    for t in store
        .list_tokens()?
        .iter()
        .filter(|t| t.created_ms >= token_since)
    {
        e.tokens += 1;
        e.tokens_reusable += u64::from(t.uses_total > 1);
        let life = t.expires_ms.saturating_sub(t.created_ms);
        e.token_lifetime_max_ms = Some(e.token_lifetime_max_ms.map_or(life, |m| m.max(life)));
    }
    let leased: BTreeSet<DeviceId> = leases.iter().map(|l| l.device_id).collect();
    e.disabled_user_live_devices = store
        .list_devices()?
        .iter()
        .filter(|d| d.user_disabled && d.status == DeviceStatus::Active)
        .filter(|d| leased.contains(&d.id) || snap.online.contains(&d.id))
        .count() as u64;
    took.mark("identity");
    audit_evidence(store, &mut e)?;
    took.mark("audit_rows");
    e.audit_verified = store.verify_audit()?.ok;
    took.mark("audit_verify");
    let labels = crate::metrics::anomaly_labels(store)?;
    e.anomalies_raised = labels.raised;
    e.anomalies_labelled = labels.expected + labels.malicious;
    e.anomaly_precision = labels.precision();
    e.anomaly_recall = labels.recall();
    took.mark("anomalies");
    tracing::debug!(phases = ?took.done, "maturity evidence gathered");
    Ok(e)
}

/// Milliseconds spent in each phase of gathering evidence, for the debug log.
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, u128)>,
}

impl Phases {
    fn start() -> Self {
        Phases {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.done
            .push((phase, now.duration_since(self.last).as_millis()));
        self.last = now;
    }
}

/// Unordered pairs of live devices that the compile lets exchange packets, each counted once,
/// from its lower end. The compile's peer relation is symmetric (a property test in
/// `ward_shared::policy` holds it to that), so the upper end's list is never looked up: at
/// 10,000 devices with 200 peers each that lookup was most of an assessment's time.
///
/// The live devices are a mask over the compile's index, made once, and each device's peers
/// are counted against it word by word (at 10 000 dense devices, thousands of peers each,
/// counting them one by one took a second).
fn reachable_pairs(compiled: &policy::Compiled, live: &BTreeSet<DeviceId>) -> u64 {
    let live_set: HashSet<DeviceId> = live.iter().copied().collect();
    let mut mask: Option<policy::PeerMask> = None;
    compiled
        .devices
        .iter()
        .filter(|(a, _)| live_set.contains(a))
        .map(|(a, acc)| {
            let m = mask.get_or_insert_with(|| acc.peers.mask(|id| live_set.contains(&id)));
            acc.peers.count_above_in(*a, m).unwrap_or_else(|| {
                acc.peers
                    .iter()
                    .skip_while(|b| b <= a)
                    .filter(|b| live_set.contains(b))
                    .count() as u64
            })
        })
        .sum()
}

/// Quarantines by who decided, and user disable → lease revocation latency, from the audit log.
fn audit_evidence(store: &dyn Store, e: &mut Evidence) -> Result<()> {
    let log = store.audit_log_of(&AUDIT_ACTIONS, AUDIT_ROWS)?;
    let mut revoke_ms: Vec<i64> = Vec::new();
    for (i, row) in log.iter().enumerate() {
        match row.action.as_str() {
            "device.quarantine" => {
                // A row this version cannot read counts as manual (the conservative side).
                let auto = serde_json::from_value::<QuarantineDetail>(row.detail.clone())
                    .is_ok_and(|d| d.quarantine.automatic);
                if auto {
                    e.quarantines_automatic += 1;
                } else {
                    e.quarantines_manual += 1;
                }
            }
            "user.disable" => {
                let Ok(d) = serde_json::from_value::<DisableDetail>(row.detail.clone()) else {
                    continue;
                };
                if d.devices.is_empty() {
                    continue;
                }
                e.identity_changes += 1;
                let want: BTreeSet<String> = d.devices.iter().map(|x| x.to_string()).collect();
                let mut left = want.clone();
                let mut last = None;
                for later in &log[i + 1..] {
                    if later.ts_ms.saturating_sub(row.ts_ms) > REVOKE_PAIRING_MS {
                        break;
                    }
                    if later.action == "lease.revoke" && left.remove(&later.target) {
                        last = Some(later.ts_ms.saturating_sub(row.ts_ms));
                    }
                    if left.is_empty() {
                        break;
                    }
                }
                // Devices without a lease to revoke had none: the disable itself was enough.
                revoke_ms.push(last.unwrap_or(0));
            }
            _ => {}
        }
    }
    e.identity_revoke_ms_p99 = maturity::quantile(&mut revoke_ms, 0.99).map(|v| v as f64);
    Ok(())
}

/// Ports a protocol's ranges open.
fn width(ranges: &[ward_shared::filter::PortRange]) -> u32 {
    ranges
        .iter()
        .map(|r| u32::from(r.hi).saturating_sub(u32::from(r.lo)) + 1)
        .sum()
}

/// For each rule name in the newest version: the creation time of the oldest version in the
/// unbroken run of versions (newest back) that holds a rule of that name.
fn rule_ages(history: &[PolicyVersion]) -> BTreeMap<String, i64> {
    let mut versions: Vec<&PolicyVersion> = history.iter().collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    let mut names: Vec<(i64, BTreeSet<String>)> = Vec::new();
    for v in versions {
        // A version that does not parse (stored by an older release) ends every run.
        let Ok(p) = policy::parse(v.text.as_bytes(), "stored policy") else {
            break;
        };
        names.push((v.created_ms, p.rules.into_iter().map(|r| r.name).collect()));
    }
    let mut since = BTreeMap::new();
    let Some((_, newest)) = names.first() else {
        return since;
    };
    for n in newest {
        let first = names
            .iter()
            .take_while(|(_, set)| set.contains(n))
            .map(|(t, _)| *t)
            .last();
        if let Some(t) = first {
            since.insert(n.clone(), t);
        }
    }
    since
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reachable_pairs_counts_each_live_pair_once() {
        let d = DeviceId;
        let mut c = policy::Compiled::default();
        let mut link = |x: u64, y: u64| {
            c.devices.entry(d(x)).or_default().peers.insert(d(y));
            c.devices.entry(d(y)).or_default().peers.insert(d(x));
        };
        // As the compile makes them: symmetric. 1–2, 1–3, 2–4, 1–5; 5 is not live; 3 lists
        // itself; 6 has no peers.
        link(1, 2);
        link(1, 3);
        link(2, 4);
        link(1, 5);
        link(3, 3);
        c.devices.entry(d(6)).or_default();
        let live: BTreeSet<DeviceId> = [1, 2, 3, 4, 6].into_iter().map(d).collect();
        assert_eq!(reachable_pairs(&c, &live), 3);
        let all: BTreeSet<DeviceId> = (1..=6).map(d).collect();
        assert_eq!(reachable_pairs(&c, &all), 4);
        assert_eq!(reachable_pairs(&c, &BTreeSet::new()), 0);
    }
}
