//! Flow records: what a device's data plane saw, aggregated in windows, as the device reports
//! them to the coordinator (`flows` on the control channel) and as the coordinator stores them.
//!
//! A record is keyed by who reported it, the other end, the reporter's role in the flow (from
//! connection state: the side that sent the first packet of the flow is the initiator, never
//! guessed from port numbers), the protocol, the destination port (ICMP: the type; no source
//! port in the key), the verdict and why. Counts are per window: packets and bytes each way
//! (`out` = sent by the reporter, `in` = received by it) and connections started.
//!
//! Delivery is at least once: a report carries a per-device sequence number, the coordinator
//! acknowledges it (`flows_ack`) after it is stored, and stores each (device, seq) once, so a
//! retransmission after a restart of either side never counts a window twice. A gap in the
//! sequence, and records dropped at the device because a cap was hit, are both visible to the
//! coordinator (`dropped_records` is cumulative since the device's state began).

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

use crate::filter::Proto;
use crate::wire::DeviceId;

/// Default aggregation window at the device.
pub const DEFAULT_WINDOW_MS: i64 = 60_000;
/// Most records in one `flows` message: a report fits the device frame limit even when every
/// field is at its bound (a record then encodes to about 1 060 bytes; a usual one to about 300).
pub const MAX_RECORDS_PER_REPORT: usize = 56;
/// Longest rule name, user name, tag or reason carried in a record; longer ones are cut.
pub const MAX_FLOW_TEXT: usize = 64;
/// Most tags carried per record.
pub const MAX_FLOW_TAGS: usize = 8;

/// The reporter's part in the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// This device sent the flow's first packet.
    Initiator,
    /// The other end sent the flow's first packet.
    Responder,
}

/// Whether the flow was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowVerdict {
    Allowed,
    Denied,
}

/// Why a flow was denied. Unknown reasons from a newer device decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyCause {
    /// No rule or grant allows it.
    NoRule,
    /// The rule that allowed it has expired.
    Expired,
    /// A rule would allow it but a posture requirement is not met.
    Posture,
    /// The source (or this device) is quarantined.
    Quarantine,
    /// The peer holds no valid lease.
    NoLease,
    /// The inner source address does not belong to the peer that sent it.
    SpoofedSource,
    /// Addressed to an address that is not this device's.
    WrongDestination,
    /// Malformed headers, a fragment whose ports cannot be checked, an unsupported protocol.
    Malformed,
    #[serde(other)]
    Other,
}

impl DenyCause {
    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyCause::NoRule => "no rule",
            DenyCause::Expired => "expired",
            DenyCause::Posture => "posture",
            DenyCause::Quarantine => "quarantine",
            DenyCause::NoLease => "no lease",
            DenyCause::SpoofedSource => "spoofed source",
            DenyCause::WrongDestination => "wrong destination",
            DenyCause::Malformed => "malformed",
            DenyCause::Other => "other",
        }
    }
}

/// What the policy's candidate view (its shadow rules) would have decided about a flow that
/// the enforced policy decided: evaluated by the device that enforces (the responder) when the
/// flow starts, never enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowVerdict {
    WouldAllow,
    WouldDeny,
}

impl ShadowVerdict {
    /// The name used in tables, JSON output and filters (`would-allow`, `would-deny`).
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowVerdict::WouldAllow => "would-allow",
            ShadowVerdict::WouldDeny => "would-deny",
        }
    }

    /// Parses [`ShadowVerdict::as_str`]'s names (and the wire names).
    pub fn parse(s: &str) -> Option<ShadowVerdict> {
        match s {
            "would-allow" | "would_allow" => Some(ShadowVerdict::WouldAllow),
            "would-deny" | "would_deny" => Some(ShadowVerdict::WouldDeny),
            _ => None,
        }
    }

    /// Two verdicts about traffic counted together (one record): a would-be denial is never
    /// hidden by a would-be allow.
    pub fn merge(a: Option<ShadowVerdict>, b: Option<ShadowVerdict>) -> Option<ShadowVerdict> {
        match (a, b) {
            (Some(ShadowVerdict::WouldDeny), _) | (_, Some(ShadowVerdict::WouldDeny)) => {
                Some(ShadowVerdict::WouldDeny)
            }
            (x, y) => x.or(y),
        }
    }
}

/// One aggregated flow in one window, as seen by the reporter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub role: Role,
    /// The other end's device, when the reporter knows it (`None`: an address no peer holds).
    #[serde(default)]
    pub peer: Option<DeviceId>,
    /// The other end's overlay address.
    pub peer_addr: IpAddr,
    /// The other end's user and tags as the reporter knew them when the flow was seen.
    #[serde(default)]
    pub peer_user: Option<String>,
    #[serde(default)]
    pub peer_tags: Vec<String>,
    pub proto: Proto,
    /// The destination port of the flow (TCP/UDP), or the ICMP type.
    pub port: u16,
    pub verdict: FlowVerdict,
    /// For allowed flows: the rule or grant that allowed it, when the reporter knows it.
    #[serde(default)]
    pub rule: Option<String>,
    /// For allowed flows: the policy version in force at the reporter.
    #[serde(default)]
    pub policy_version: Option<u64>,
    /// For denied flows: why.
    #[serde(default)]
    pub reason: Option<DenyCause>,
    /// Sent by the reporter.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Received by the reporter.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Connections (flows) started in the window.
    pub connections: u64,
    /// The candidate view's verdict, when the reporter's netmap carries one (the policy has
    /// shadow rules) and the reporter decided the flow (responder records). Several verdicts
    /// in one record merge as [`ShadowVerdict::merge`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowVerdict>,
}

/// The records of one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowWindow {
    /// Coordinator time (ms since the epoch, corrected for clock offset) of the window's start.
    pub start_ms: i64,
    pub end_ms: i64,
    pub records: Vec<FlowRecord>,
}

/// One upload (`DeviceMsg::Flows`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowReport {
    /// Per-device sequence number, from 1, one higher for every report the device makes;
    /// retransmissions repeat the same number with the same content.
    pub seq: u64,
    /// Windows (or parts of windows) in this report; at most [`MAX_RECORDS_PER_REPORT`]
    /// records in all.
    pub windows: Vec<FlowWindow>,
    /// Records the device dropped because a cap was hit, cumulative since its state began.
    #[serde(default)]
    pub dropped_records: u64,
}

impl FlowReport {
    /// Checks the bounds a coordinator enforces on a report before storing it.
    pub fn validate(&self) -> Result<(), FlowError> {
        if self.seq == 0 {
            return Err(FlowError::ZeroSeq);
        }
        let n: usize = self.windows.iter().map(|w| w.records.len()).sum();
        if n > MAX_RECORDS_PER_REPORT {
            return Err(FlowError::TooManyRecords(n));
        }
        for w in &self.windows {
            if w.end_ms < w.start_ms {
                return Err(FlowError::BadWindow);
            }
            for r in &w.records {
                let texts = r
                    .peer_user
                    .iter()
                    .chain(r.rule.iter())
                    .chain(r.peer_tags.iter());
                if r.peer_tags.len() > MAX_FLOW_TAGS {
                    return Err(FlowError::TooLong);
                }
                for t in texts {
                    if t.len() > MAX_FLOW_TEXT {
                        return Err(FlowError::TooLong);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Cuts a text field to [`MAX_FLOW_TEXT`] bytes at a character boundary.
pub fn clip(s: &str) -> String {
    let mut end = s.len().min(MAX_FLOW_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    #[error("flow report sequence numbers start at 1")]
    ZeroSeq,
    #[error("flow report holds {0} records (at most {MAX_RECORDS_PER_REPORT})")]
    TooManyRecords(usize),
    #[error("flow window ends before it starts")]
    BadWindow,
    #[error("flow record text field or tag list too long")]
    TooLong,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> FlowRecord {
        FlowRecord {
            role: Role::Initiator,
            peer: Some(DeviceId(7)),
            peer_addr: "100.64.0.7".parse().unwrap(),
            peer_user: Some("alice".into()),
            peer_tags: vec!["tag:db".into()],
            proto: Proto::Tcp,
            port: 5432,
            verdict: FlowVerdict::Allowed,
            rule: Some("eng-db".into()),
            policy_version: Some(3),
            reason: None,
            packets_out: 10,
            bytes_out: 1000,
            packets_in: 9,
            bytes_in: 20_000,
            connections: 1,
            shadow: None,
        }
    }

    #[test]
    fn a_full_report_fits_the_device_frame_limit() {
        let mut r = record();
        r.peer_user = Some("u".repeat(MAX_FLOW_TEXT));
        r.rule = Some("r".repeat(MAX_FLOW_TEXT));
        r.peer_tags = vec!["t".repeat(MAX_FLOW_TEXT); MAX_FLOW_TAGS];
        r.peer_addr = "fd00:1234:5678:9abc:def0:1234:5678:9abc".parse().unwrap();
        r.packets_out = u64::MAX;
        r.bytes_out = u64::MAX;
        r.packets_in = u64::MAX;
        r.bytes_in = u64::MAX;
        r.connections = u64::MAX;
        r.policy_version = Some(u64::MAX);
        r.shadow = Some(ShadowVerdict::WouldAllow);
        let report = FlowReport {
            seq: u64::MAX,
            windows: vec![FlowWindow {
                start_ms: i64::MIN,
                end_ms: i64::MAX,
                records: vec![r; MAX_RECORDS_PER_REPORT],
            }],
            dropped_records: u64::MAX,
        };
        report.validate().unwrap();
        let msg = crate::wire::DeviceMsg::Flows(report);
        let frame = crate::wire::encode(&msg);
        assert!(
            frame.len() <= crate::wire::MAX_DEVICE_FRAME,
            "{} bytes",
            frame.len()
        );
    }

    #[test]
    fn reports_out_of_bounds_are_refused() {
        let mut report = FlowReport {
            seq: 0,
            windows: vec![],
            dropped_records: 0,
        };
        assert_eq!(report.validate(), Err(FlowError::ZeroSeq));
        report.seq = 1;
        report.windows = vec![FlowWindow {
            start_ms: 0,
            end_ms: 1,
            records: vec![record(); MAX_RECORDS_PER_REPORT + 1],
        }];
        assert_eq!(
            report.validate(),
            Err(FlowError::TooManyRecords(MAX_RECORDS_PER_REPORT + 1))
        );
        report.windows[0].records.truncate(1);
        report.windows[0].records[0].rule = Some("x".repeat(MAX_FLOW_TEXT + 1));
        assert_eq!(report.validate(), Err(FlowError::TooLong));
        report.windows[0].records[0].rule = Some(clip(&"é".repeat(MAX_FLOW_TEXT)));
        report.validate().unwrap();
        report.windows[0].end_ms = -1;
        assert_eq!(report.validate(), Err(FlowError::BadWindow));
    }

    /// A record with the candidate verdict as first written, and one from a device that
    /// predates it: both decode; a record without a verdict encodes without the field.
    #[test]
    fn golden_shadow_verdicts() {
        let with = r#"{"role":"responder","peer":4,"peer_addr":"100.64.0.4","peer_user":"alice","peer_tags":[],"proto":"tcp","port":80,"verdict":"allowed","rule":"web-wide","policy_version":5,"packets_out":5,"bytes_out":300,"packets_in":6,"bytes_in":9000,"connections":1,"shadow":"would_deny"}"#;
        let r: FlowRecord = serde_json::from_str(with).unwrap();
        assert_eq!(r.shadow, Some(ShadowVerdict::WouldDeny));
        assert!(serde_json::to_string(&r)
            .unwrap()
            .ends_with(r#""connections":1,"shadow":"would_deny"}"#));
        let old = r#"{"role":"responder","peer_addr":"100.64.0.9","proto":"tcp","port":22,"verdict":"denied","reason":"no_rule","packets_out":0,"bytes_out":0,"packets_in":3,"bytes_in":180,"connections":3}"#;
        let r: FlowRecord = serde_json::from_str(old).unwrap();
        assert_eq!(r.shadow, None);
        assert!(!serde_json::to_string(&r).unwrap().contains("shadow"));
        let allow: ShadowVerdict = serde_json::from_str("\"would_allow\"").unwrap();
        assert_eq!(allow, ShadowVerdict::WouldAllow);
        assert_eq!(allow.as_str(), "would-allow");
        assert_eq!(
            ShadowVerdict::parse("would-deny"),
            Some(ShadowVerdict::WouldDeny)
        );
        assert_eq!(ShadowVerdict::parse("deny"), None);
    }

    #[test]
    fn a_would_deny_is_never_hidden_by_a_merge() {
        use ShadowVerdict::{WouldAllow, WouldDeny};
        assert_eq!(
            ShadowVerdict::merge(Some(WouldAllow), Some(WouldDeny)),
            Some(WouldDeny)
        );
        assert_eq!(ShadowVerdict::merge(Some(WouldDeny), None), Some(WouldDeny));
        assert_eq!(
            ShadowVerdict::merge(None, Some(WouldAllow)),
            Some(WouldAllow)
        );
        assert_eq!(ShadowVerdict::merge(None, None), None);
    }

    #[test]
    fn unknown_deny_causes_decode_as_other() {
        let c: DenyCause = serde_json::from_str("\"cosmic_ray\"").unwrap();
        assert_eq!(c, DenyCause::Other);
        let c: DenyCause = serde_json::from_str("\"spoofed_source\"").unwrap();
        assert_eq!(c, DenyCause::SpoofedSource);
    }
}
