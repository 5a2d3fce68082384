//! Posture reporting cadence: a report is sent at once when a value changed (or the coordinator
//! asked for new signals), else at least every interval; it always fits in one device frame.

use std::time::{Duration, Instant};

use ward_shared::posture::{Measured, PostureReport, PostureWants};
use ward_shared::wire::{self, DeviceMsg, PostureVerdict};

/// What the coordinator wants collected, the latest collection and verdict, and what was sent.
#[derive(Debug)]
pub struct PostureCadence {
    interval: Duration,
    pub wants: PostureWants,
    pub report: Option<PostureReport>,
    pub verdict: Option<PostureVerdict>,
    seq: u64,
    /// The last report sent in this session, and when.
    sent: Option<(Instant, PostureReport)>,
}

impl PostureCadence {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            wants: PostureWants::default(),
            report: None,
            verdict: None,
            seq: 0,
            sent: None,
        }
    }

    /// The sequence number of the next collection: increasing, and at least coordinator time
    /// in ms so that it keeps increasing across restarts.
    pub fn next_seq(&mut self, coordinator_now_ms: i64) -> u64 {
        let seq = (self.seq + 1).max(u64::try_from(coordinator_now_ms.max(0)).unwrap_or(0));
        self.seq = seq;
        seq
    }

    /// New wants: the next collection is reported at once.
    pub fn set_wants(&mut self, wants: PostureWants) {
        self.wants = wants;
        self.sent = None;
    }

    /// A new session: its first report is sent at once.
    pub fn session_started(&mut self) {
        self.sent = None;
    }

    /// A collection finished: the message to send, if a report is due.
    pub fn handle_report(&mut self, report: PostureReport, now: Instant) -> Option<DeviceMsg> {
        let due = match &self.sent {
            None => true,
            Some((at, prev)) => {
                crate::posture::values_differ(prev, &report)
                    || now.saturating_duration_since(*at) >= self.interval
            }
        };
        if !due {
            // Most collections: kept as the latest, nothing copied.
            self.report = Some(report);
            return None;
        }
        let msg = fit_report(report.clone());
        self.sent = Some((now, report.clone()));
        self.report = Some(report);
        Some(msg)
    }
}

/// A posture report as a message that fits in one device frame: custom check outputs are
/// replaced by an error reading, largest first, until it does.
pub fn fit_report(mut report: PostureReport) -> DeviceMsg {
    loop {
        let msg = DeviceMsg::Posture(Box::new(report.clone()));
        if wire::encode(&msg).len() <= wire::MAX_DEVICE_FRAME {
            return msg;
        }
        let biggest = report
            .custom
            .iter()
            .filter(|(_, m)| m.get().is_ok())
            .max_by_key(|(_, m)| serde_json::to_vec(m).map(|v| v.len()).unwrap_or(0))
            .map(|(k, _)| k.clone());
        match biggest {
            Some(k) => {
                if let Some(m) = report.custom.get_mut(&k) {
                    *m = Measured::error(m.at_ms, "output too large to report");
                }
            }
            None => {
                // Nothing left to shrink: report the essentials only.
                report.processes.clear();
                report.files.clear();
                report.custom.clear();
                return DeviceMsg::Posture(Box::new(report));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::wire::DeviceId;

    fn report(seq: u64, firewall: bool) -> PostureReport {
        let mut r = PostureReport::unknown(DeviceId(1), seq, seq as i64);
        r.firewall = Measured::value(seq as i64, firewall);
        r
    }

    #[test]
    fn reports_at_once_on_change_else_every_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut c = PostureCadence::new(Duration::from_secs(30));
        assert!(
            c.handle_report(report(1, true), t0).is_some(),
            "first report"
        );
        assert!(
            c.handle_report(report(2, true), t0 + s).is_none(),
            "unchanged"
        );
        assert_eq!(
            c.report.as_ref().map(|r| r.seq),
            Some(2),
            "kept for the view"
        );
        assert!(
            c.handle_report(report(3, false), t0 + 2 * s).is_some(),
            "changed"
        );
        assert!(c.handle_report(report(4, false), t0 + 31 * s).is_none());
        assert!(
            c.handle_report(report(5, false), t0 + 32 * s).is_some(),
            "interval"
        );
        c.set_wants(PostureWants::default());
        assert!(
            c.handle_report(report(6, false), t0 + 33 * s).is_some(),
            "new wants"
        );
    }

    #[test]
    fn seq_increases_and_follows_coordinator_time() {
        let mut c = PostureCadence::new(Duration::from_secs(30));
        assert_eq!(c.next_seq(1000), 1000);
        assert_eq!(c.next_seq(900), 1001);
        assert_eq!(c.next_seq(-5), 1002);
    }

    #[test]
    fn oversized_custom_output_is_shrunk_to_one_frame() {
        let mut r = report(1, true);
        let big = "x".repeat(wire::MAX_DEVICE_FRAME);
        r.custom.insert(
            "big".into(),
            Measured::value(1, serde_json::Value::String(big)),
        );
        r.custom.insert(
            "small".into(),
            Measured::value(1, serde_json::json!({"ok": true})),
        );
        let msg = fit_report(r);
        assert!(wire::encode(&msg).len() <= wire::MAX_DEVICE_FRAME);
        let DeviceMsg::Posture(r) = msg else {
            panic!("not a posture message")
        };
        assert!(r.custom["big"].get().is_err());
        assert!(r.custom["small"].get().is_ok());
    }
}
