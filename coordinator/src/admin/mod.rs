//! The admin protocol: one JSON request line, one JSON response line, over the Unix socket
//! `DATA_DIR/admin.sock` (mode 0600; the server also checks the peer's uid).
//!
//! - [`api`]: the typed responses (one per request), shared by the server and the CLI.
//! - [`ops`]: the requests' business rules over the store, synchronous and testable.
//! - [`policy`]: policy check, apply and explain.
//! - [`flows`]: `flows` and `flows top` (stored records, paired, filtered by selectors).
//! - [`maturity`]: `maturity` and `maturity history` (evidence gathered, assessed, recorded).
//! - [`suggest`]: `policy suggest`, `policy replay`, `policy suggestions` (flow-based
//!   least-privilege suggestions and their lifecycle).
//! - [`socket`]: the socket itself (bind, peer credentials, line I/O).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub mod api;
pub mod flows;
pub mod maturity;
pub mod ops;
pub mod policy;
pub mod routes;
pub mod socket;
pub mod suggest;

/// Longest request line the server reads (a 1 MiB policy, base64-encoded, fits).
pub const MAX_ADMIN_LINE: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    UserAdd {
        name: String,
        groups: Vec<String>,
    },
    UserLs,
    UserDisable {
        name: String,
    },
    UserEnable {
        name: String,
    },
    TokenCreate {
        user: Option<String>,
        tags: Vec<String>,
        ttl_secs: u64,
        uses: i64,
        /// The name the enrolling device gets, bound (`device:NAME` rules apply to it).
        #[serde(default)]
        hostname: Option<String>,
    },
    TokenLs,
    TokenRevoke {
        id: String,
    },
    DeviceLs,
    DeviceShow {
        name: String,
    },
    DeviceRevoke {
        name: String,
    },
    DeviceRotate {
        name: String,
    },
    /// Only remediation services stay reachable until `device release`.
    DeviceQuarantine {
        name: String,
        reason: Option<String>,
    },
    DeviceRelease {
        name: String,
    },
    /// Renames a device and binds the new name.
    DeviceRename {
        name: String,
        new: String,
    },
    /// Binds a device's current (self-chosen) name.
    DeviceApprove {
        name: String,
    },
    DeviceTag {
        name: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// Lists a device's routes; approves and revokes prefixes (`exit`: the exit-node offer).
    DeviceRoutes {
        name: String,
        #[serde(default)]
        approve: Vec<String>,
        #[serde(default)]
        revoke: Vec<String>,
    },
    UserGroups {
        name: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// Parse, compile against the live directory, run the policy's tests; change nothing.
    PolicyCheck {
        file_name: String,
        content_b64: String,
    },
    /// The same, then store a new version and push it, if every test passes.
    PolicyApply {
        file_name: String,
        content_b64: String,
    },
    PolicyShow,
    PolicyHistory,
    /// One stored policy version's text (for the console's diffs).
    PolicyVersion {
        version: i64,
    },
    PolicyExplain {
        src: String,
        dst: String,
    },
    GrantAdd {
        from: String,
        to: String,
        for_secs: u64,
        reason: Option<String>,
    },
    GrantLs,
    GrantRm {
        id: String,
    },
    RelayAdd {
        name: String,
        /// `HOST:PORT`, IPv6 in brackets.
        addr: String,
    },
    RelayLs,
    RelayRm {
        name: String,
    },
    Audit {
        limit: i64,
    },
    AuditVerify,
    /// Behaviour anomalies raised within `since_secs`, of one device or all.
    Anomalies {
        device: Option<String>,
        since_secs: u64,
    },
    /// An admin's label on an anomaly: `expected` or `malicious`.
    AnomalyAck {
        id: u64,
        label: crate::behaviour::Label,
    },
    /// Both ends' flow records, paired.
    Flows(flows::FlowFilter),
    /// Flows summed per (initiator, responder, proto, port), ranked.
    FlowsTop {
        #[serde(flatten)]
        filter: flows::FlowFilter,
        by: crate::flows::TopBy,
    },
    /// The zero trust maturity assessment, live (not recorded); `explain` adds next steps.
    Maturity {
        #[serde(default)]
        explain: bool,
    },
    /// Recorded assessments, the hash chain verified.
    MaturityHistory,
    /// Least-privilege suggestions from the stored flows (and with `write`, the candidate).
    PolicySuggest(suggest::SuggestAsk),
    /// The stored flows judged by a candidate policy.
    PolicyReplay {
        file_name: String,
        content_b64: String,
        since_secs: u64,
    },
    /// Every current suggestion, hidden ones included, with its state.
    SuggestionsLs(suggest::SuggestAsk),
    /// Accept, dismiss or snooze a current suggestion.
    SuggestionMark(suggest::MarkAsk),
    /// A one-time login URL for the web console (answered by `serve` when `--console-listen`
    /// is set).
    ConsoleLink,
    /// Replace the coordinator addresses (first = dialled first): saved in the data directory,
    /// carried by tokens minted from now on and pushed to every session in a full netmap
    /// (answered by `serve`; without one, `addrs set` saves the file itself).
    AddrsSet {
        addrs: Vec<String>,
    },
}

/// Sends one request to the running coordinator and reads its typed answer.
pub async fn call<R: serde::de::DeserializeOwned>(socket: &Path, req: &AdminRequest) -> Result<R> {
    ward_runtime::rpc::call(
        socket,
        ward_runtime::rpc::Peer {
            name: "the coordinator's admin socket",
            hint: "is `ward-coordinator serve` running with this --data-dir?",
        },
        req,
    )
    .await
}

/// A duration in the one grammar (`90s`, `15m`, `1h`, `7d`; a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration> {
    Ok(ward_shared::duration::parse(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("15m").unwrap().as_secs(), 900);
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 7 * 86400);
        assert_eq!(parse_duration("42").unwrap().as_secs(), 42);
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn requests_round_trip() {
        let r = AdminRequest::TokenCreate {
            user: Some("alice".into()),
            tags: vec![],
            ttl_secs: 3600,
            uses: 1,
            hostname: None,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"cmd\":\"token_create\""));
        assert!(serde_json::from_str::<AdminRequest>(&s).is_ok());
        assert!(serde_json::from_str::<AdminRequest>("{\"cmd\":\"drop_db\"}").is_err());
        let r = AdminRequest::PolicySuggest(suggest::SuggestAsk {
            since_secs: 60,
            min_days: 2,
            write: true,
            shadow: false,
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"cmd\":\"policy_suggest\""), "{s}");
        assert!(matches!(
            serde_json::from_str::<AdminRequest>(&s).unwrap(),
            AdminRequest::PolicySuggest(a) if a.write && a.min_days == 2
        ));
    }
}
