//! `serve --metrics-listen`: the coordinator's metrics in the Prometheus text format (every
//! family is listed in docs/metrics.md).
//!
//! A scrape reads three sources and [`render`] turns them into text:
//! - the registry actor's [`LiveMetrics`] and its snapshot (sessions, the directory's posture
//!   results, trust statistics), which only the actor holds;
//! - the store (devices by state, active leases and key ages, lease counts, the policy version,
//!   storage health, and audit rows by action, read incrementally: [`AuditTally`]);
//! - the driver's own counters ([`Counters`]: admin requests by command, refusals at the gate).
//!
//! Labels come from fixed sets (device states, audit actions, admin commands, refusal kinds),
//! except `requirement`, which names a posture requirement of the applied policy: bounded by the
//! policy, written by the administrator. No label ever carries a device id, hostname or address.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Instant;

use ward_runtime::metrics::{Exposition, HistogramSnapshot, Kind, AGE_BUCKETS, LATENCY_BUCKETS};

use crate::admin::api::TrustStatsView;
use crate::audit::Action;
use crate::model::{Device, DeviceState};
use crate::store::{LeaseRow, StorageHealth, Store};

/// What only the registry actor measures.
#[derive(Debug, Clone)]
pub struct LiveMetrics {
    /// Posture report → every peer's netmap change queued, for reports that changed trust.
    pub enforce: HistogramSnapshot,
    /// Netmap and netmap-delta messages queued on device connections.
    pub netmap_pushes: u64,
    /// Sessions' first netmaps sent without the peers the device held already, and the peers
    /// they left out.
    pub netmaps_resumed: u64,
    pub resume_peers_left_out: u64,
    /// From the event that caused them (or the timer tick) to the netmaps queued.
    pub netmap_push: HistogramSnapshot,
    pub leases_expired: u64,
    /// `want_peer` messages answered, by outcome (peers on demand).
    pub wants: crate::registry::WantCounters,
    /// Sessions on demand, and the peers they hold in all.
    pub held_peers: (usize, usize),
    /// Batches the registry actor handled (events gathered, then one flush each).
    pub registry_batches: u64,
    /// Events the registry actor handled, in all batches.
    pub registry_events: u64,
    /// How long each batch's flush took (the netmap recompute and queueing).
    pub registry_flush: HistogramSnapshot,
    /// When the actor woke for the batch being handled.
    pub batch_started: Option<Instant>,
}

impl Default for LiveMetrics {
    fn default() -> Self {
        Self {
            enforce: HistogramSnapshot::new(LATENCY_BUCKETS),
            netmap_pushes: 0,
            netmaps_resumed: 0,
            resume_peers_left_out: 0,
            netmap_push: HistogramSnapshot::new(LATENCY_BUCKETS),
            leases_expired: 0,
            wants: Default::default(),
            held_peers: (0, 0),
            registry_batches: 0,
            registry_events: 0,
            registry_flush: HistogramSnapshot::new(LATENCY_BUCKETS),
            batch_started: None,
        }
    }
}

impl LiveMetrics {
    /// After a flush that queued `pushes` netmaps: counts them and, once per batch, their
    /// latency.
    pub fn netmaps_pushed(&mut self, pushes: u64) {
        if pushes == 0 {
            return;
        }
        self.netmap_pushes += pushes;
        if let Some(t) = self.batch_started.take() {
            self.netmap_push.observe(t.elapsed().as_secs_f64());
        }
    }
}

impl LiveMetrics {
    /// One batch of `events` handled, its flush taking `flush`.
    pub fn batch(&mut self, events: usize, flush: std::time::Duration) {
        self.registry_batches += 1;
        self.registry_events += events as u64;
        self.registry_flush.observe(flush.as_secs_f64());
    }
}

/// The driver's counters.
#[derive(Debug, Default)]
pub struct Counters {
    admin: Mutex<BTreeMap<String, u64>>,
    audit: Mutex<AuditTally>,
    /// QUIC handshakes in progress (connections accepted, not yet established).
    pub quic_handshakes: AtomicU64,
    /// Connection attempts answered with a QUIC Retry (the source had to prove its address).
    pub quic_retries: AtomicU64,
}

impl Counters {
    /// One admin request, by its command name (`user_add`, `policy_apply`, …).
    pub fn admin_request(&self, command: &str) {
        let mut m = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(command.to_string()).or_default() += 1;
    }

    pub fn admin_requests(&self) -> BTreeMap<String, u64> {
        self.admin.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Audit rows by action, reading only rows written since the last call.
    pub fn audit_counts(&self, store: &dyn Store) -> crate::store::Result<BTreeMap<String, u64>> {
        let mut t = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        let (new, top) = store.audit_counts_since(t.last_seq)?;
        for (k, n) in new {
            *t.counts.entry(k).or_default() += n;
        }
        t.last_seq = top;
        Ok(t.counts.clone())
    }
}

/// Audit rows counted so far and the last sequence number read.
#[derive(Debug, Default)]
struct AuditTally {
    last_seq: i64,
    counts: BTreeMap<String, u64>,
}

/// Everything one scrape reads.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub now_ms: i64,
    /// Whether the store answered (when not, store-backed families show zeros).
    pub store_ok: bool,
    pub devices: Vec<Device>,
    pub leases: Vec<LeaseRow>,
    /// Leases issued per device (rotations + 1).
    pub lease_counts: Vec<i64>,
    pub policy_version: Option<i64>,
    pub storage: StorageHealth,
    pub audit: BTreeMap<String, u64>,
    pub sessions: usize,
    pub relay_sessions: usize,
    pub trust: TrustStatsView,
    pub live: LiveMetrics,
    /// Devices by (requirement, passed).
    pub posture: BTreeMap<(String, bool), u64>,
    pub admin: BTreeMap<String, u64>,
    pub refusals: BTreeMap<Action, u64>,
    pub quic_handshakes: u64,
    pub quic_retries: u64,
    /// Behaviour anomalies raised and their admin labels (precision and recall).
    pub anomalies: crate::behaviour::Labels,
}

impl Inputs {
    /// Reads the store's part (blocking).
    pub fn read_store(&mut self, store: &dyn Store, counters: &Counters) {
        let r = (|| -> crate::store::Result<()> {
            self.devices = store.list_devices()?;
            self.leases = store.active_leases(self.now_ms)?;
            self.lease_counts = store.lease_counts()?.into_values().collect();
            self.policy_version = store.current_policy()?.map(|p| p.version);
            self.anomalies = anomaly_labels(store)?;
            self.audit = counters.audit_counts(store)?;
            Ok(())
        })();
        self.storage = store.storage_health();
        self.store_ok = r.is_ok();
        if let Err(e) = r {
            tracing::warn!(error = %e, "metrics: the store could not be read");
        }
    }
}

/// Stored anomalies counted by label (all of them: anomalies are rare and bounded per device).
pub fn anomaly_labels(store: &dyn Store) -> crate::store::Result<crate::behaviour::Labels> {
    use crate::behaviour::{Anomaly, Label};
    let mut l = crate::behaviour::Labels::default();
    for text in store.anomalies(i64::MIN)? {
        let Ok(a) = serde_json::from_str::<Anomaly>(&text) else {
            continue;
        };
        l.raised += 1;
        match a.label {
            Some(Label::Expected) => l.expected += 1,
            Some(Label::Malicious) => {
                l.malicious += 1;
                if a.over_threshold {
                    l.malicious_enforced += 1;
                }
            }
            None => {}
        }
    }
    Ok(l)
}

/// Admin command names, for the `command` label (every request the admin socket parses).
pub fn admin_command(req: &crate::admin::AdminRequest) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("cmd").and_then(|c| c.as_str()).map(String::from))
        .unwrap_or_else(|| "other".into())
}

/// The coordinator's metrics as Prometheus text.
pub fn render(i: &Inputs) -> String {
    let mut e = Exposition::new();
    let audit = |a: Action| i.audit.get(a.as_str()).copied().unwrap_or(0);

    let mut by_state: BTreeMap<&str, f64> = [
        DeviceState::Active,
        DeviceState::Quarantined,
        DeviceState::UserDisabled,
        DeviceState::Revoked,
    ]
    .iter()
    .map(|s| (s.as_str(), 0.0))
    .collect();
    for d in &i.devices {
        *by_state.entry(d.state().as_str()).or_default() += 1.0;
    }
    let states: Vec<(&str, f64)> = by_state.into_iter().collect();
    e.labelled(
        "ward_coordinator_devices",
        Kind::Gauge,
        "Enrolled devices by state.",
        "state",
        &states,
    );
    e.gauge(
        "ward_coordinator_sessions",
        "Device control sessions online.",
        i.sessions as f64,
    );
    e.gauge(
        "ward_coordinator_relay_sessions",
        "Relay control sessions online.",
        i.relay_sessions as f64,
    );

    // Leases and keys.
    e.gauge(
        "ward_coordinator_leases_active",
        "Leases neither expired nor revoked.",
        i.leases.len() as f64,
    );
    e.counter(
        "ward_coordinator_leases_issued_total",
        "Leases issued (audit rows lease.issue).",
        audit(Action::LeaseIssue),
    );
    e.counter(
        "ward_coordinator_leases_rotated_total",
        "Leases issued to a device that already had one (key rotations).",
        i.lease_counts
            .iter()
            .map(|n| u64::try_from(n.saturating_sub(1)).unwrap_or(0))
            .sum(),
    );
    e.counter(
        "ward_coordinator_leases_revoked_total",
        "Lease revocations (audit rows lease.revoke).",
        audit(Action::LeaseRevoke),
    );
    e.counter(
        "ward_coordinator_leases_expired_total",
        "Leases that reached their expiry while this process held them.",
        i.live.leases_expired,
    );
    e.counter(
        "ward_coordinator_lease_refusals_total",
        "Lease requests refused (audit rows lease.refused).",
        audit(Action::LeaseRefused),
    );
    let ages = key_ages(i);
    e.gauge(
        "ward_coordinator_key_age_max_seconds",
        "Age of the oldest current device key (from its oldest active lease).",
        ages.iter().copied().fold(0.0, f64::max),
    );
    e.histogram_family(
        "ward_coordinator_key_age_seconds",
        "Ages of current device keys (from each key's oldest active lease).",
        &HistogramSnapshot::from_values(AGE_BUCKETS, ages),
    );

    // Behaviour.
    e.counter(
        "ward_coordinator_anomalies_total",
        "Behaviour anomalies raised (stored).",
        i.anomalies.raised,
    );
    e.labelled(
        "ward_coordinator_anomaly_labels",
        Kind::Gauge,
        "Anomalies acknowledged by an administrator, by label.",
        "label",
        &[
            ("expected", i.anomalies.expected as f64),
            ("malicious", i.anomalies.malicious as f64),
        ],
    );
    e.gauge(
        "ward_coordinator_anomaly_precision",
        "Of the acknowledged anomalies, the share labelled malicious (0 before any label).",
        i.anomalies.precision().unwrap_or(0.0),
    );
    e.gauge(
        "ward_coordinator_anomaly_recall",
        "Of the anomalies labelled malicious, the share that took the risk over the threshold when raised (0 before any).",
        i.anomalies.recall().unwrap_or(0.0),
    );

    // Trust.
    e.counter(
        "ward_coordinator_posture_reports_total",
        "Posture reports received.",
        i.trust.reports,
    );
    e.counter(
        "ward_coordinator_posture_reports_refused_total",
        "Posture reports refused as malformed or out of order.",
        i.trust.refused,
    );
    e.counter(
        "ward_coordinator_trust_changes_total",
        "Changes of a device's trust (posture pass/fail, quarantine) acted on.",
        i.trust.changes,
    );
    e.family(
        "ward_coordinator_trust_enforcement_seconds",
        Kind::Histogram,
        "From a posture report's arrival to every peer's netmap change queued, for reports that changed trust.",
    )
    .histogram(
        "ward_coordinator_trust_enforcement_seconds",
        &[],
        &i.live.enforce,
    );
    let mut posture: Vec<(String, &str, f64)> = i
        .posture
        .iter()
        .map(|((r, ok), n)| (r.clone(), if *ok { "pass" } else { "fail" }, *n as f64))
        .collect();
    posture.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    e.family(
        "ward_coordinator_posture_devices",
        Kind::Gauge,
        "Devices passing or failing each posture requirement of the applied policy.",
    );
    for (r, result, n) in &posture {
        e.sample(
            "ward_coordinator_posture_devices",
            &[("requirement", r), ("result", result)],
            *n,
        );
    }
    e.labelled(
        "ward_coordinator_posture_transitions_total",
        Kind::Counter,
        "Devices moving to passing or failing their posture requirements (audit rows posture.pass/posture.fail).",
        "result",
        &[
            ("pass", audit(Action::PosturePass) as f64),
            ("fail", audit(Action::PostureFail) as f64),
        ],
    );
    e.counter(
        "ward_coordinator_quarantines_total",
        "Devices quarantined, by an administrator or a trust rule (audit rows device.quarantine).",
        audit(Action::DeviceQuarantine),
    );
    e.counter(
        "ward_coordinator_device_revocations_total",
        "Devices revoked (audit rows device.revoke).",
        audit(Action::DeviceRevoke),
    );

    // Netmaps and policy.
    e.counter(
        "ward_coordinator_netmap_pushes_total",
        "Netmaps and netmap deltas queued on device connections.",
        i.live.netmap_pushes,
    );
    e.gauge(
        "ward_coordinator_quic_handshakes",
        "QUIC handshakes in progress.",
        i.quic_handshakes as f64,
    );
    e.counter(
        "ward_coordinator_quic_retries_total",
        "Connection attempts answered with a QUIC Retry, while many handshakes were in progress: \
         the source had to prove its address before any connection state was kept.",
        i.quic_retries,
    );
    let w = i.live.wants;
    e.labelled(
        "ward_coordinator_peer_wants_total",
        Kind::Counter,
        "want_peer messages from devices on demand, by outcome: granted (the peer sent), refused \
         (policy allows no traffic with it, or nothing has that address or key), limited (over \
         the session's budget, dropped).",
        "outcome",
        &[
            ("granted", w.granted as f64),
            ("refused", w.refused as f64),
            ("limited", w.limited as f64),
        ],
    );
    e.counter(
        "ward_coordinator_held_peers_evicted_total",
        "Held peers let go to keep a session on demand within its bound (the device asks again when it needs one).",
        w.evicted,
    );
    e.gauge(
        "ward_coordinator_sessions_on_demand",
        "Device sessions sent only the peers they hold (protocol 4, past --peers-on-demand-above).",
        i.live.held_peers.0 as f64,
    );
    e.gauge(
        "ward_coordinator_held_peers",
        "Peers held by the sessions on demand, in all.",
        i.live.held_peers.1 as f64,
    );
    e.counter(
        "ward_coordinator_netmaps_resumed_total",
        "Sessions' first netmaps sent without the peers the device said it held already.",
        i.live.netmaps_resumed,
    );
    e.counter(
        "ward_coordinator_resume_peers_left_out_total",
        "Peers left out of resumed first netmaps (the device kept its own, digest for digest).",
        i.live.resume_peers_left_out,
    );
    e.family(
        "ward_coordinator_netmap_push_seconds",
        Kind::Histogram,
        "From the event that changed netmaps (or the timer tick) to the netmaps queued, once per batch.",
    )
    .histogram("ward_coordinator_netmap_push_seconds", &[], &i.live.netmap_push);
    e.counter(
        "ward_coordinator_registry_batches_total",
        "Batches of events the registry actor handled, each ending in one netmap flush.",
        i.live.registry_batches,
    );
    e.counter(
        "ward_coordinator_registry_events_total",
        "Events the registry actor handled (sessions, reports, admin changes), in all batches.",
        i.live.registry_events,
    );
    e.family(
        "ward_coordinator_registry_flush_seconds",
        Kind::Histogram,
        "How long each batch's flush took: the netmap recompute and queueing the messages.",
    )
    .histogram(
        "ward_coordinator_registry_flush_seconds",
        &[],
        &i.live.registry_flush,
    );
    e.gauge(
        "ward_coordinator_policy_version",
        "Version of the applied policy (0: none applied).",
        i.policy_version.unwrap_or(0) as f64,
    );
    e.counter(
        "ward_coordinator_policy_applies_total",
        "Policies applied (audit rows policy.apply).",
        audit(Action::PolicyApply),
    );

    // Requests and refusals.
    let admin: Vec<(&str, f64)> = i
        .admin
        .iter()
        .map(|(k, v)| (k.as_str(), *v as f64))
        .collect();
    e.labelled(
        "ward_coordinator_admin_requests_total",
        Kind::Counter,
        "Admin socket requests since start, by command.",
        "command",
        &admin,
    );
    let refusals: Vec<(&str, f64)> = [
        ("connect", Action::ConnectRefused),
        ("enroll", Action::EnrollRefused),
    ]
    .iter()
    .map(|(k, a)| (*k, i.refusals.get(a).copied().unwrap_or(0) as f64))
    .collect();
    e.labelled(
        "ward_coordinator_refusals_total",
        Kind::Counter,
        "Unauthenticated enrollments and refused device connections since start, by kind.",
        "kind",
        &refusals,
    );
    let rows: Vec<(&str, f64)> = Action::ALL
        .iter()
        .map(|a| (a.as_str(), audit(*a) as f64))
        .collect();
    e.labelled(
        "ward_coordinator_audit_rows_total",
        Kind::Counter,
        "Rows in the audit log, by action.",
        "action",
        &rows,
    );

    // Storage.
    let s = &i.storage;
    e.gauge(
        "ward_coordinator_storage_readable",
        "1 if the last scrape could read the store.",
        f64::from(u8::from(i.store_ok)),
    );
    e.counter(
        "ward_coordinator_storage_write_errors_total",
        "Transactions that failed with a database error since start.",
        s.write_errors,
    );
    e.counter(
        "ward_coordinator_storage_checkpoint_errors_total",
        "Audit checkpoint files that could not be written since start.",
        s.checkpoint_errors,
    );
    e.gauge(
        "ward_coordinator_storage_journal_pending",
        "Narrowing changes kept in the journal, not yet in the database.",
        s.journal_pending as f64,
    );
    e.gauge(
        "ward_coordinator_storage_anchored",
        "1 if the audit chain is anchored outside the database.",
        f64::from(u8::from(s.anchored)),
    );
    let integrity = match &s.integrity {
        None => "not_run",
        Some(c) if c.ok => "ok",
        Some(_) => "failed",
    };
    let one_hot: Vec<(&str, f64)> = ["ok", "failed", "not_run"]
        .iter()
        .map(|k| (*k, f64::from(u8::from(*k == integrity))))
        .collect();
    e.labelled(
        "ward_coordinator_storage_integrity",
        Kind::Gauge,
        "The last database integrity check's result (1 on the current one).",
        "result",
        &one_hot,
    );
    e.finish()
}

/// Each live device's current key's age in seconds: from the oldest active lease on that key.
fn key_ages(i: &Inputs) -> Vec<f64> {
    i.devices
        .iter()
        .filter(|d| d.is_live())
        .filter_map(|d| {
            let key = d.wg_public_key?;
            i.leases
                .iter()
                .filter(|l| l.device_id == d.id && l.wg_public_key == key)
                .map(|l| l.not_before_ms)
                .min()
        })
        .map(|t| (i.now_ms.saturating_sub(t)).max(0) as f64 / 1000.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{test_device, Quarantine};
    use ward_shared::wire::{DeviceId, WgPublicKey};

    #[test]
    fn renders_every_family_and_parses_strictly() {
        let mut i = Inputs {
            now_ms: 100_000,
            ..Inputs::default()
        };
        let mut d = test_device(1);
        d.wg_public_key = Some(WgPublicKey([1; 32]));
        let mut q = test_device(2);
        q.quarantine = Some(Quarantine {
            since_ms: 0,
            reason: "r".into(),
            automatic: true,
        });
        i.devices = vec![d, q];
        i.leases = vec![
            LeaseRow {
                serial: 1,
                device_id: DeviceId(1),
                wg_public_key: WgPublicKey([1; 32]),
                not_before_ms: 40_000,
                not_after_ms: 200_000,
            },
            LeaseRow {
                serial: 2,
                device_id: DeviceId(1),
                wg_public_key: WgPublicKey([1; 32]),
                not_before_ms: 90_000,
                not_after_ms: 300_000,
            },
        ];
        i.lease_counts = vec![3, 1];
        i.audit.insert("lease.issue".into(), 4);
        i.audit.insert("device.revoke".into(), 1);
        i.posture.insert(("disk \"enc\"".into(), false), 1);
        i.posture.insert(("disk \"enc\"".into(), true), 2);
        i.admin.insert("status".into(), 7);
        i.refusals.insert(Action::EnrollRefused, 2);
        i.live.enforce.observe(0.02);
        let text = render(&i);
        let p = ward_runtime::metrics::parse_strict(&text).unwrap();
        let v = |n: &str, l: &[(&str, &str)]| p.value(n, l).unwrap_or(-1.0);
        assert_eq!(v("ward_coordinator_devices", &[("state", "active")]), 1.0);
        assert_eq!(
            v("ward_coordinator_devices", &[("state", "quarantined")]),
            1.0
        );
        assert_eq!(v("ward_coordinator_devices", &[("state", "revoked")]), 0.0);
        assert_eq!(v("ward_coordinator_leases_issued_total", &[]), 4.0);
        assert_eq!(v("ward_coordinator_leases_rotated_total", &[]), 2.0);
        assert_eq!(v("ward_coordinator_device_revocations_total", &[]), 1.0);
        assert_eq!(v("ward_coordinator_key_age_max_seconds", &[]), 60.0);
        assert_eq!(v("ward_coordinator_key_age_seconds_count", &[]), 1.0);
        assert_eq!(
            v(
                "ward_coordinator_posture_devices",
                &[("requirement", "disk \"enc\""), ("result", "pass")]
            ),
            2.0
        );
        assert_eq!(
            v(
                "ward_coordinator_admin_requests_total",
                &[("command", "status")]
            ),
            7.0
        );
        assert_eq!(
            v("ward_coordinator_refusals_total", &[("kind", "enroll")]),
            2.0
        );
        assert_eq!(
            v("ward_coordinator_trust_enforcement_seconds_count", &[]),
            1.0
        );
        assert_eq!(
            v(
                "ward_coordinator_trust_enforcement_seconds_bucket",
                &[("le", "0.025")]
            ),
            1.0
        );
        assert_eq!(
            v(
                "ward_coordinator_storage_integrity",
                &[("result", "not_run")]
            ),
            1.0
        );
        // No label names a device.
        for s in &p.samples {
            for k in s.labels.keys() {
                assert!(
                    [
                        "state",
                        "requirement",
                        "result",
                        "command",
                        "kind",
                        "action",
                        "label",
                        "outcome",
                        "le"
                    ]
                    .contains(&k.as_str()),
                    "{k}"
                );
            }
        }
    }

    #[test]
    fn netmap_latency_is_observed_once_per_batch() {
        let mut m = LiveMetrics {
            batch_started: Some(Instant::now()),
            ..LiveMetrics::default()
        };
        m.netmaps_pushed(0);
        assert_eq!(m.netmap_push.count, 0);
        m.netmaps_pushed(3);
        m.netmaps_pushed(2);
        assert_eq!(m.netmap_pushes, 5);
        assert_eq!(m.netmap_push.count, 1);
    }
}
