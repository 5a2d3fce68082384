//! The registry's trust decisions, carried out: audit rows, the posture table, and automatic
//! quarantines (stored, then fed back to the registry as `Event::Upserted`).

use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};

use ward_shared::posture::PostureReport;
use ward_shared::wire::DeviceId;

use super::actor::{Event, TrustStats};
use super::now_ms;
use super::queue::Events;
use crate::audit::Action;
use crate::store::{Audit, Quarantine, Store};
use crate::trust::Change;

/// Where the registry's trust decisions go: the audit log, the posture table, and (for an
/// automatic quarantine) the device row, which then comes back as `Event::Upserted`.
pub(super) struct TrustSink<'a> {
    pub(super) store: Arc<dyn Store>,
    pub(super) events: Events,
    pub(super) stats: &'a mut TrustStats,
    /// When the report being handled arrived.
    pub(super) received: Option<Instant>,
    /// Per device: when a refusal was last audited, and refusals since.
    pub(super) refused: HashMap<DeviceId, (Option<Instant>, u64)>,
    /// This replica's id (the writer of the trust rows it stores).
    pub(super) replica: String,
    /// Trust rows to store, in order ([`trust_writer`]).
    pub(super) trust_rows: tokio::sync::mpsc::UnboundedSender<TrustWrite>,
    /// Session bookkeeping for the replica task (home relays, in order with the claims).
    pub(super) presence: tokio::sync::mpsc::UnboundedSender<super::actor::Presence>,
}

/// A trust row and its audit detail.
pub(super) type TrustWrite = (crate::store::replicas::TrustRow, serde_json::Value);

/// Stores trust rows one after another, in the order they were decided (a later verdict is
/// never overwritten by an earlier one still in flight).
pub(super) async fn trust_writer(
    store: Arc<dyn Store>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<TrustWrite>,
) {
    while let Some((row, detail)) = rx.recv().await {
        let store = store.clone();
        let id = row.device;
        match tokio::task::spawn_blocking(move || store.save_device_trust(&row, Some(detail))).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(device = %id, error = %e, "storing the device's trust failed"),
            Err(e) => error!(device = %id, error = %e, "trust store task failed"),
        }
    }
}

impl TrustSink<'_> {
    pub(super) fn audit(&self, id: DeviceId, action: Action, detail: serde_json::Value) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let target = store
                .device(id)
                .map(|d| d.hostname.to_string())
                .unwrap_or_else(|_| id.to_string());
            let a = Audit {
                actor: "coordinator",
                action,
                target: &target,
                detail,
            };
            if let Err(e) = store.append_audit(a, now_ms()) {
                error!(device = %id, %action, error = %e, "audit append failed");
            }
        });
    }

    pub(super) fn posture_changed(
        &mut self,
        id: DeviceId,
        change: Change,
        report: Option<Box<PostureReport>>,
    ) {
        self.stats.changes += 1;
        let failures: BTreeMap<&str, &[String]> = change
            .evaluations
            .iter()
            .filter(|e| !e.passed)
            .map(|e| (e.requirement.as_str(), &e.failures[..]))
            .collect();
        info!(device = %id, failed = ?change.newly_failed, passed = ?change.newly_passed, "posture changed");
        // A device that never reported failing at first contact is not news.
        if report.is_some() || !change.newly_passed.is_empty() {
            for (action, names) in [
                (Action::PostureFail, &change.newly_failed),
                (Action::PosturePass, &change.newly_passed),
            ] {
                if names.is_empty() {
                    continue;
                }
                let reasons: BTreeMap<&str, &[String]> = names
                    .iter()
                    .map(|n| (n.as_str(), failures.get(n.as_str()).copied().unwrap_or(&[])))
                    .collect();
                self.audit(
                    id,
                    action,
                    json!({ "requirements": names, "reasons": reasons, "report_seq": report.as_ref().map(|r| r.seq) }),
                );
            }
        }
        // No report (first judged after a restart): keep the last stored evaluation.
        if report.is_none() {
            return;
        }
        let store = self.store.clone();
        let report = serde_json::to_value(&report).unwrap_or(serde_json::Value::Null);
        let evaluation =
            serde_json::to_value(&change.evaluations).unwrap_or(serde_json::Value::Null);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_posture(id, &report, &evaluation, now_ms()) {
                error!(device = %id, error = %e, "saving posture failed");
            }
        });
    }

    /// This replica (holding the device's session) judged the device's trust differently:
    /// the `device_trust` row and its `device.trust` audit row, in one transaction, so the
    /// other replicas apply it. A failed write is logged; the next change writes again, and
    /// meanwhile the other replicas keep the last stored verdict.
    pub(super) fn trust_decided(&self, id: DeviceId, d: crate::trust::Decision) {
        let failing: Vec<&str> = d
            .evaluations
            .iter()
            .filter(|e| !e.passed)
            .map(|e| e.requirement.as_str())
            .collect();
        info!(device = %id, ?failing, risk = d.risk, took_over = d.took_over, "storing the device's trust for the other replicas");
        let verdict = match serde_json::to_string(&d.evaluations) {
            Ok(v) => v,
            Err(e) => return error!(device = %id, error = %e, "encoding a trust verdict failed"),
        };
        let detail = json!({
            "failing": failing,
            "risk": d.risk,
            "replica": self.replica,
            "took_over": d.took_over,
        });
        let row = crate::store::replicas::TrustRow {
            device: id,
            replica: self.replica.clone(),
            verdict,
            risk: i64::from(d.risk),
            risk_reason: d.risk_reason,
            counters: "[]".into(),
            updated_ms: now_ms(),
        };
        if self.trust_rows.send((row, detail)).is_err() {
            error!(device = %id, "the trust writer has stopped; the verdict is not stored");
        }
    }

    /// Denied flows a reporter here accused their sources of: stored for the other replicas'
    /// trust books. A failed write is logged; it loses only evidence (the other replicas may
    /// detect a scan later or not at all), never widens access.
    pub(super) fn scan_evidence(
        &self,
        reporter: DeviceId,
        flows: Vec<(DeviceId, ward_shared::filter::Proto, u16)>,
        at_ms: i64,
        window_ms: i64,
    ) {
        let store = self.store.clone();
        let replica = self.replica.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.add_scan_evidence(&replica, reporter, &flows, at_ms, window_ms) {
                error!(%reporter, flows = flows.len(), error = %e, "storing scan evidence for the other replicas failed");
            }
        });
    }

    /// Stores what a device advertises (for `ward-coordinator device routes`).
    pub(super) fn routes_advertised(&self, id: DeviceId, routes: Vec<ward_shared::routes::Prefix>) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.set_advertised_routes(id, &routes, now_ms()) {
                error!(device = %id, error = %e, "storing advertised routes failed");
            }
        });
    }

    pub(super) fn quarantine(&self, id: DeviceId, reason: String) {
        warn!(device = %id, %reason, "quarantining device automatically");
        let store = self.store.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let q = Quarantine {
                since_ms: now_ms(),
                reason,
                automatic: true,
            };
            match store.set_quarantine(id, Some(&q), "coordinator", now_ms()) {
                Ok(dev) => {
                    events.send_internal(Event::Upserted(dev));
                }
                Err(e) => error!(device = %id, error = %e, "storing a quarantine failed"),
            }
        });
    }

    /// The detector raised an anomaly: logged, audited and stored.
    pub(super) fn anomaly(&self, a: crate::behaviour::Anomaly) {
        info!(device = %a.device, anomaly = a.id, score = a.score, reason = %a.reason, "behaviour anomaly");
        self.audit(
            a.device,
            Action::AnomalyRaised,
            json!({ "id": a.id, "score": a.score, "kinds": a.kinds, "reason": a.reason }),
        );
        self.anomaly_stored(&a);
    }

    /// The device's risk crossed `risk_threshold`: logged and audited.
    pub(super) fn risk_crossed(
        &self,
        device: DeviceId,
        score: u8,
        threshold: u8,
        above: bool,
        reason: String,
    ) {
        info!(%device, score, threshold, above, %reason, "behaviour risk crossed the threshold");
        let action = if above {
            Action::RiskAbove
        } else {
            Action::RiskBelow
        };
        self.audit(
            device,
            action,
            json!({ "score": score, "threshold": threshold, "reason": reason }),
        );
    }

    /// Keeps the anomaly as it is now (raised, or labelled).
    pub(super) fn anomaly_stored(&self, a: &crate::behaviour::Anomaly) {
        let store = self.store.clone();
        let Ok(text) = serde_json::to_string(a) else {
            return;
        };
        let (id, device, at) = (a.id, a.device, a.at_ms);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_anomaly(id, device, at, &text) {
                error!(device = %device, anomaly = id, error = %e, "storing an anomaly failed");
            }
        });
    }
}
