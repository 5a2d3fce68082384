//! The admin protocol's typed responses, shared by the server and the CLI.
//!
//! Each request has one response type; its JSON field names are the CLI's `--json` output and
//! scripts read them, so they never change (README.md, "JSON output"). Listings declare their
//! table columns once ([`Table`]); times are typed `i64` milliseconds, formatted here.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowVerdict, ShadowVerdict};
use ward_shared::names::Hostname;
use ward_shared::posture::PostureReport;
use ward_shared::wire::{PostureVerdict, WgPublicKey};

use crate::flows::{Counts, PairStatus};
use crate::model::{DeviceState, DeviceStatus, Quarantine, User};
use crate::store::{
    AuditEntry, AuditVerdict, GrantRow, PolicyVersion, RelayRow, StorageHealth, TokenInfo,
    VerdictKind,
};

/// `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub public_addr: String,
    pub ca_sha256: String,
    pub ipv6_prefix: String,
    pub devices: usize,
    pub online: usize,
    pub users: usize,
    pub uptime_secs: u64,
    pub version: String,
    pub protocol: u32,
    pub posture: TrustStatsView,
    /// Write errors, checkpoint errors and the last integrity check.
    #[serde(default)]
    pub storage: StorageHealth,
    /// The registry actor's event queues (connection events are bounded).
    #[serde(default)]
    pub event_queue: EventQueueView,
    /// The replica that answered (its `replica.id`).
    #[serde(default)]
    pub replica_id: String,
    /// Every replica of this instance that ever wrote a heartbeat to the database.
    #[serde(default)]
    pub replicas: Vec<ReplicaView>,
    /// The database as the answering replica sees it (never its password).
    #[serde(default)]
    pub database: crate::store::replicas::DatabaseStatus,
}

/// One replica in `status`: its heartbeat row, and whether the heartbeat is fresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    pub id: String,
    pub address: String,
    pub sessions: u64,
    pub started_ms: i64,
    pub last_seen_ms: i64,
    /// Heartbeat at most [`crate::replicas::ALIVE_WITHIN_MS`] old.
    pub alive: bool,
    /// The replica that answered this `status`.
    pub this: bool,
}

/// The registry actor's event queues: the bounded one for connection events (`capacity`,
/// `depth` now, the deepest it has been since start) and the internal one's depth now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventQueueView {
    pub capacity: usize,
    pub depth: usize,
    pub max_depth: usize,
    pub internal_depth: usize,
}

/// Posture report → enforcement latency as the coordinator sees it (fields in name order: the
/// human `status` prints this object as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrustStatsView {
    pub changes: u64,
    pub enforce_ms_last: Option<f64>,
    pub enforce_ms_p50: Option<f64>,
    pub enforce_ms_p99: Option<f64>,
    pub refused: u64,
    pub reports: u64,
}

impl StatusView {
    /// `status` for people: one `key value` line per field, in name order.
    pub fn lines(&self) -> Vec<String> {
        let posture = serde_json::to_string(&self.posture).unwrap_or_else(|_| "-".into());
        let storage = serde_json::to_string(&self.storage).unwrap_or_else(|_| "-".into());
        let queue = serde_json::to_string(&self.event_queue).unwrap_or_else(|_| "-".into());
        let db = &self.database;
        let database = format!(
            "{} {} {} schema={} rtt_ms={}{}{}",
            db.backend,
            db.location,
            if db.reachable {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            db.schema_version
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            db.round_trip_ms
                .map_or_else(|| "-".to_string(), |v| format!("{v:.3}")),
            db.listener.as_ref().map_or_else(String::new, |l| format!(
                " listen={} notifications={} connects={}",
                if l.listening { "up" } else { "DOWN" },
                l.notifications,
                l.connects
            )),
            db.error
                .as_ref()
                .map_or_else(String::new, |e| format!(" error={e:?}")),
        );
        [
            ("ca_sha256", self.ca_sha256.clone()),
            ("database", database),
            ("devices", self.devices.to_string()),
            ("event_queue", queue),
            ("ipv6_prefix", self.ipv6_prefix.clone()),
            ("online", self.online.to_string()),
            ("posture", posture),
            ("protocol", self.protocol.to_string()),
            ("public_addr", self.public_addr.clone()),
            ("replica_id", self.replica_id.clone()),
            ("storage", storage),
            ("uptime_secs", self.uptime_secs.to_string()),
            ("users", self.users.to_string()),
            ("version", self.version.clone()),
        ]
        .into_iter()
        .map(|(k, v)| format!("{k:<12} {v}"))
        .chain(self.replicas.iter().map(|r| {
            format!(
                "{:<12} {} {} sessions={} last_seen_ms={} {}{}",
                "replica",
                r.id,
                r.address,
                r.sessions,
                r.last_seen_ms,
                if r.alive { "alive" } else { "DOWN" },
                if r.this { " (this one)" } else { "" }
            )
        }))
        .collect()
    }
}

/// `user add`, `user ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
    pub created_ms: i64,
    /// `local` (an administrator added it) or `oidc` (signed in through the provider).
    #[serde(default = "local")]
    pub source: String,
    /// Last sign-in through the provider.
    #[serde(default)]
    pub last_auth_ms: Option<i64>,
    /// Last successful re-check with the provider (refresh).
    #[serde(default)]
    pub last_refresh_ms: Option<i64>,
    /// Why the provider took access away, while it does.
    #[serde(default)]
    pub provider_reason: Option<String>,
}

fn local() -> String {
    "local".into()
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        Self {
            name: u.name,
            groups: u.groups.iter().map(|g| g.to_string()).collect(),
            disabled: u.disabled,
            created_ms: u.created_ms,
            source: local(),
            last_auth_ms: None,
            last_refresh_ms: None,
            provider_reason: None,
        }
    }
}

/// `user disable`, `user enable`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserAccess {
    pub user: String,
    pub disabled: bool,
    /// How many devices the user has (they all gained or lost access).
    pub devices: usize,
}

/// `user groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserGroupsView {
    pub user: String,
    pub groups: Vec<String>,
}

/// `token ls`, `token revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_total: i64,
    pub uses_left: i64,
    pub revoked: bool,
    /// The bound hostname the enrolling device gets, if the token carries one.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl From<TokenInfo> for TokenView {
    fn from(t: TokenInfo) -> Self {
        Self {
            id: t.id,
            user: t.user,
            tags: t.tags,
            created_ms: t.created_ms,
            expires_ms: t.expires_ms,
            uses_total: t.uses_total,
            uses_left: t.uses_left,
            revoked: t.revoked,
            hostname: t.hostname,
        }
    }
}

/// `token create`: the token (shown once) and what was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub info: TokenView,
}

/// `device ls`, `device quarantine/release/revoke`: the stored device plus what the
/// coordinator knows about it now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// `d7`.
    pub id: String,
    pub hostname: Hostname,
    /// Whether an administrator bound the name (only a bound name is matched by
    /// `device:NAME` policy selectors); a self-chosen name is a display name.
    #[serde(default)]
    pub name_bound: bool,
    pub user: Option<String>,
    pub user_disabled: bool,
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub os: String,
    /// As stored (`active`, `revoked`); `state` is the one answer to "is it on the network".
    pub status: DeviceStatus,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub cert_not_after_ms: i64,
    pub revoked_ms: Option<i64>,
    pub wg_public_key: Option<WgPublicKey>,
    pub endpoints: Vec<SocketAddr>,
    pub quarantine: Option<Quarantine>,
    pub lease_expires_ms: Option<i64>,
    pub lease_serial: Option<u64>,
    /// The WireGuard key of the newest active lease (base64).
    pub lease_key: Option<String>,
    /// When the newest active lease (so the WireGuard key in use) took effect: the key's age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_issued_ms: Option<i64>,
    /// The relay this connected device said it receives relayed traffic through (`device ls`
    /// only); `None` when it reported none (direct paths only) or is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    pub rotations: i64,
    pub online: bool,
    pub state: DeviceState,
}

impl DeviceView {
    /// `device show` for people: `key value` lines in name order.
    pub fn lines(&self) -> Vec<String> {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "-".into()
            } else {
                v.join(",")
            }
        };
        [
            ("cert_not_after_ms", self.cert_not_after_ms.to_string()),
            ("created_ms", self.created_ms.to_string()),
            (
                "endpoints",
                list(self.endpoints.iter().map(|e| e.to_string()).collect()),
            ),
            ("hostname", self.hostname.to_string()),
            ("id", self.id.clone()),
            ("ipv4", self.ipv4.to_string()),
            ("ipv6", self.ipv6.to_string()),
            ("last_seen_ms", self.last_seen_ms.to_string()),
            (
                "lease_expires_ms",
                opt(self.lease_expires_ms.map(|v| v.to_string())),
            ),
            ("lease_key", opt(self.lease_key.clone())),
            (
                "lease_serial",
                opt(self.lease_serial.map(|v| v.to_string())),
            ),
            (
                "name_bound",
                if self.name_bound {
                    "true".into()
                } else {
                    "false (self-chosen: `device approve` binds it)".into()
                },
            ),
            ("online", self.online.to_string()),
            ("os", self.os.clone()),
            (
                "quarantine",
                opt(self
                    .quarantine
                    .as_ref()
                    // Through a JSON value: keys in name order, as before.
                    .and_then(|q| serde_json::to_value(q).ok())
                    .map(|v| v.to_string())),
            ),
            ("revoked_ms", opt(self.revoked_ms.map(|v| v.to_string()))),
            ("rotations", self.rotations.to_string()),
            ("state", self.state.to_string()),
            (
                "status",
                match self.status {
                    DeviceStatus::Active => "active".into(),
                    DeviceStatus::Revoked => "revoked".into(),
                },
            ),
            ("tags", list(self.tags.clone())),
            ("user", opt(self.user.clone())),
            ("user_disabled", self.user_disabled.to_string()),
            (
                "wg_public_key",
                opt(self.wg_public_key.map(|k| k.to_base64())),
            ),
        ]
        .into_iter()
        .map(|(k, v)| format!("{k:<18} {v}"))
        .collect()
    }
}

/// `device show`: the device, its latest posture verdict and report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub device: DeviceView,
    pub posture: PostureVerdict,
    pub posture_report: Option<PostureReport>,
    /// After a restart, the last stored evaluation until the device reports again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_posture: Option<StoredPosture>,
    /// Its flow reports' delivery (gaps, dropped records), once it has sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<FlowSourceView>,
    /// Who signed the device in through the OpenID provider, when, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignInView>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInView {
    pub user: String,
    pub at_ms: i64,
    pub auth_time_ms: i64,
    pub amr: Vec<String>,
}

impl SignInView {
    pub fn line(&self) -> String {
        format!(
            "signed in by {} at {} (authenticated {}, amr [{}])",
            self.user,
            ms_time(self.at_ms),
            ms_time(self.auth_time_ms),
            self.amr.join(", ")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPosture {
    pub report: serde_json::Value,
    pub evaluation: serde_json::Value,
    pub at_ms: i64,
}

/// `device rotate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotating {
    pub device: String,
    pub rotating: bool,
}

/// `device tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTagsView {
    pub device: String,
    pub tags: Vec<String>,
}

/// `device routes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRoutesView {
    pub device: String,
    pub routes: Vec<RouteView>,
}

/// One routed prefix of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    pub prefix: String,
    /// The device offers it now (`ward up --advertise-routes`, `--advertise-exit-node`).
    pub advertised: bool,
    /// An administrator approved it (`--approve`).
    pub approved: bool,
    /// The policy's `[auto_approvers]` approve it.
    pub auto_approved: bool,
    /// Advertised and approved: peers the policy allows are routed through the device.
    pub active: bool,
}

/// `policy check`, `policy apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyOutcome {
    pub ok: bool,
    pub message: String,
    pub tests: Vec<PolicyTestView>,
    pub warnings: Vec<String>,
    pub changes: Vec<String>,
    /// Devices in the compiled policy (only when it is valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<usize>,
    /// The stored version (only after a successful apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// How many rules are shadow rules (only when the policy is valid and has some).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_rules: Option<ShadowRulesView>,
}

/// A valid policy's shadow rules: evaluated by peers on live traffic, never enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRulesView {
    /// `shadow = true`: candidates, not enforced.
    pub shadow: usize,
    /// `shadow_remove = true`: enforced, absent from the candidate view.
    pub shadow_remove: usize,
}

impl std::fmt::Display for ShadowRulesView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} shadow rule(s): {} candidate (shadow, not enforced), {} watched for removal \
             (shadow_remove, enforced); peers report would-allow / would-deny in flow records",
            self.shadow + self.shadow_remove,
            self.shadow,
            self.shadow_remove
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyTestView {
    pub pass: bool,
    pub text: String,
}

/// `policy show`: all `None` (`version`, `text` as `null`) when no policy was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyShowView {
    pub version: Option<i64>,
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `policy history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersionView {
    pub version: i64,
    pub created_ms: i64,
    pub actor: String,
    pub sha256: String,
    pub summary: String,
}

impl From<PolicyVersion> for PolicyVersionView {
    fn from(v: PolicyVersion) -> Self {
        Self {
            version: v.version,
            created_ms: v.created_ms,
            actor: v.actor,
            sha256: v.sha256,
            summary: v.summary,
        }
    }
}

/// `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainView {
    pub allowed: bool,
    pub src: String,
    pub dst: String,
    pub target: String,
    pub devices: Vec<ExplainDeviceView>,
    pub notes: Vec<String>,
    /// The policy's candidate view (shadow rules), when it has one: `would-allow` or
    /// `would-deny` (the reason is in `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<String>,
    /// The whole explanation for people.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainDeviceView {
    /// Source hostname.
    pub src: String,
    /// Destination hostname.
    pub dst: String,
    pub allowed: bool,
    pub allowed_by: Vec<String>,
    pub misses: Vec<ExplainMissView>,
    pub blocked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainMissView {
    pub rule: String,
    pub reasons: Vec<String>,
}

/// `relay add`, `relay ls`, `relay rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayView {
    pub name: String,
    /// `HOST:PORT`, IPv6 in brackets.
    pub addr: String,
    pub created_ms: i64,
    /// Whether the relay holds a control session with this coordinator now.
    #[serde(default)]
    pub online: bool,
    /// Devices connected to it, as it last reported (0 while offline).
    #[serde(default)]
    pub devices: u32,
    /// WireGuard bytes it forwarded since it started, as it last reported (0 while offline).
    #[serde(default)]
    pub bytes_relayed: u64,
}

impl From<RelayRow> for RelayView {
    fn from(r: RelayRow) -> Self {
        Self {
            name: r.name,
            addr: r.addr,
            created_ms: r.created_ms,
            online: false,
            devices: 0,
            bytes_relayed: 0,
        }
    }
}

/// `relay add`: the credential (shown once; only its secret's hash is stored) and the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAdded {
    pub credential: String,
    pub relay: RelayView,
}

/// `grant add`, `grant ls`, `grant rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub id: String,
    /// A user name or `device:HOSTNAME`.
    pub principal: String,
    pub service: String,
    pub not_after_ms: i64,
    pub reason: Option<String>,
    pub actor: String,
    pub created_ms: i64,
}

impl From<GrantRow> for GrantView {
    fn from(g: GrantRow) -> Self {
        Self {
            id: g.id,
            principal: g.principal,
            service: g.service,
            not_after_ms: g.not_after_ms,
            reason: g.reason,
            actor: g.actor,
            created_ms: g.created_ms,
        }
    }
}

/// `audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    pub seq: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
    pub hash: String,
}

impl From<AuditEntry> for AuditView {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            ts_ms: e.ts_ms,
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: e.detail,
            hash: e.hash,
        }
    }
}

/// `audit verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerifyView {
    pub ok: bool,
    pub rows: i64,
    pub first_bad_seq: Option<i64>,
    pub message: String,
    /// `intact`, `tampered`, `truncated`, `rolled_back` or `unanchored`.
    #[serde(default)]
    pub kind: VerdictKind,
    /// The rows the anchor counts that the database no longer has (first, last).
    #[serde(default)]
    pub lost: Option<(i64, i64)>,
}

impl From<AuditVerdict> for AuditVerifyView {
    fn from(v: AuditVerdict) -> Self {
        Self {
            ok: v.ok,
            rows: v.rows,
            first_bad_seq: v.first_bad_seq,
            message: v.message,
            kind: v.kind,
            lost: v.lost,
        }
    }
}

/// `flows`: the selected flows, the summary of every flow in the period, and each device's
/// report delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsView {
    pub flows: Vec<FlowView>,
    pub summary: FlowSummary,
    pub sources: Vec<FlowSourceView>,
}

/// One flow over one span of windows, with both ends' counts (`None`: that end reported
/// nothing). `out` is what that end sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// Hostname, or the address when no device holds it.
    pub initiator: String,
    pub responder: String,
    /// `d7`; `None` for an address no device holds.
    pub initiator_id: Option<String>,
    pub responder_id: Option<String>,
    pub proto: Proto,
    pub port: u16,
    pub start_ms: i64,
    pub end_ms: i64,
    pub verdict: FlowVerdict,
    /// The rule or grant that allowed it.
    pub rule: Option<String>,
    /// Why it was denied.
    pub reason: Option<DenyCause>,
    pub policy_version: Option<u64>,
    /// `paired`, `mismatch`, `one_sided`, `pending` or `denied`.
    pub status: PairStatus,
    /// As the other end knew them when it saw the flow.
    pub initiator_user: Option<String>,
    pub initiator_tags: Vec<String>,
    pub responder_user: Option<String>,
    pub responder_tags: Vec<String>,
    pub initiator_counts: Option<Counts>,
    pub responder_counts: Option<Counts>,
    /// For `mismatch`: which counts disagree (`packets i→r`, `bytes r→i`, …).
    pub disagree: Vec<String>,
    /// The candidate view's verdict (policies with shadow rules): `would-allow` or
    /// `would-deny`; absent when no end reported one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "shadow_name")]
    pub shadow: Option<ShadowVerdict>,
}

/// [`ShadowVerdict`] as `would-allow` / `would-deny` in admin JSON.
mod shadow_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use ward_shared::flows::ShadowVerdict;

    pub fn serialize<S: Serializer>(v: &Option<ShadowVerdict>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_str(v.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ShadowVerdict>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => ShadowVerdict::parse(&s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("unknown shadow verdict {s:?}"))),
        }
    }
}

/// Flows in the period by pairing status, and the devices' delivery counters summed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSummary {
    pub paired: u64,
    pub mismatch: u64,
    pub one_sided: u64,
    pub pending: u64,
    pub denied: u64,
    /// Report sequence numbers never received (gaps).
    pub missing_seqs: u64,
    /// Records devices dropped because a cap was hit.
    pub dropped_records: u64,
    /// Records the coordinator did not store (windows outside the retention period).
    pub refused_records: u64,
}

/// One device's flow report delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSourceView {
    pub device: String,
    pub id: String,
    pub last_seq: u64,
    pub reports: u64,
    pub missing_seqs: u64,
    pub dropped_records: u64,
    pub refused_records: u64,
    pub last_report_ms: i64,
    /// Times the device numbered its reports from 1 again (it lost its flow log state).
    #[serde(default)]
    pub renumbered: u64,
}

impl FlowSourceView {
    pub fn new(s: crate::store::FlowSource, device: String) -> Self {
        Self {
            device,
            id: s.device.to_string(),
            last_seq: s.last_seq,
            reports: s.reports,
            missing_seqs: s.missing_seqs,
            dropped_records: s.dropped_records,
            refused_records: s.refused_records,
            last_report_ms: s.last_report_ms,
            renumbered: s.renumbered,
        }
    }

    /// For `device show`.
    pub fn line(&self) -> String {
        format!(
            "{:<18} last seq {}, {} report(s), {} missing, {} record(s) dropped by the device, {} refused, last {}",
            "flow_reports",
            self.last_seq,
            self.reports,
            self.missing_seqs,
            self.dropped_records,
            self.refused_records,
            fmt_time(self.last_report_ms)
        )
    }
}

/// `flows top`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsTopView {
    pub initiator: String,
    pub responder: String,
    pub proto: Proto,
    pub port: u16,
    /// Bytes both ways (the larger of the two ends' accounts).
    pub bytes: u64,
    /// Connections started.
    pub flows: u64,
    /// Connections denied.
    pub denied: u64,
    /// Spans of windows summed.
    pub spans: u64,
}

/// One table column: its header and how a row shows in it.
pub struct Column<T> {
    pub header: &'static str,
    pub cell: fn(&T) -> String,
}

const fn col<T>(header: &'static str, cell: fn(&T) -> String) -> Column<T> {
    Column { header, cell }
}

/// A listing printed as a table; each declares its columns once.
pub trait Table: Sized + 'static {
    const COLUMNS: &'static [Column<Self>];
}

/// A millisecond timestamp as RFC 3339 (UTC), or the number if it is out of range.
pub fn fmt_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn time_or_dash(ms: Option<i64>) -> String {
    ms.map(fmt_time).unwrap_or_else(|| "-".into())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn or_dash(v: Option<&str>) -> String {
    v.unwrap_or("-").to_string()
}

/// A JSON value as a table cell: strings bare, `null` and `[]` as `-`, lists joined by `,`.
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) if a.is_empty() => "-".into(),
        serde_json::Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Renders rows under their columns' headers (cells cut at 60 characters).
pub fn render_table<T: Table>(rows: &[T]) -> Vec<String> {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| T::COLUMNS.iter().map(|c| (c.cell)(r)).collect())
        .collect();
    let mut widths: Vec<usize> = T::COLUMNS.iter().map(|c| c.header.len()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count()).min(60);
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{:<w$}",
                    c.chars().take(60).collect::<String>(),
                    w = widths[i]
                )
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(
        T::COLUMNS.iter().map(|c| c.header.to_string()).collect(),
    )];
    out.extend(cells.into_iter().map(line));
    out
}

impl Table for UserView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("NAME", |u| u.name.clone()),
        col("GROUPS", |u| list(&u.groups)),
        col("DISABLED", |u| u.disabled.to_string()),
        col("SOURCE", |u| u.source.clone()),
        col("LAST AUTH", |u| {
            or_dash(u.last_auth_ms.map(ms_time).as_deref())
        }),
        col("LAST REFRESH", |u| {
            or_dash(u.last_refresh_ms.map(ms_time).as_deref())
        }),
        col("PROVIDER SAYS", |u| or_dash(u.provider_reason.as_deref())),
    ];
}

fn ms_time(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

impl Table for TokenView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("ID", |t| t.id.clone()),
        col("USER", |t| or_dash(t.user.as_deref())),
        col("TAGS", |t| list(&t.tags)),
        col("USES LEFT", |t| t.uses_left.to_string()),
        col("EXPIRES", |t| fmt_time(t.expires_ms)),
        col("REVOKED", |t| t.revoked.to_string()),
        col("HOSTNAME", |t| or_dash(t.hostname.as_deref())),
    ];
}

impl Table for DeviceView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("ID", |d| d.id.clone()),
        col("HOSTNAME", |d| d.hostname.to_string()),
        col("USER", |d| or_dash(d.user.as_deref())),
        col("TAGS", |d| list(&d.tags)),
        col("NAME", |d| {
            (if d.name_bound { "bound" } else { "self-chosen" }).into()
        }),
        col("IPV4", |d| d.ipv4.to_string()),
        col("STATE", |d| d.state.to_string()),
        col("ONLINE", |d| d.online.to_string()),
        col("LEASE EXPIRES", |d| time_or_dash(d.lease_expires_ms)),
        col("ROTATIONS", |d| d.rotations.to_string()),
        col("LAST SEEN", |d| fmt_time(d.last_seen_ms)),
    ];
}

impl Table for GrantView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("ID", |g| g.id.clone()),
        col("FROM", |g| g.principal.clone()),
        col("TO", |g| g.service.clone()),
        col("EXPIRES", |g| fmt_time(g.not_after_ms)),
        col("REASON", |g| or_dash(g.reason.as_deref())),
        col("BY", |g| g.actor.clone()),
    ];
}

impl Table for RelayView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("NAME", |r| r.name.clone()),
        col("ADDR", |r| r.addr.clone()),
        col("ADDED", |r| fmt_time(r.created_ms)),
        col("ONLINE", |r| {
            if r.online { "yes" } else { "no" }.to_string()
        }),
        col("DEVICES", |r| r.devices.to_string()),
        col("BYTES", |r| r.bytes_relayed.to_string()),
    ];
}

impl Table for PolicyVersionView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("VERSION", |v| v.version.to_string()),
        col("APPLIED", |v| fmt_time(v.created_ms)),
        col("BY", |v| v.actor.clone()),
        col("SHA256", |v| v.sha256.clone()),
        col("CHANGES", |v| v.summary.clone()),
    ];
}

/// `packets/bytes` of one end and direction, or `-`.
fn counts(c: &Option<Counts>, out: bool) -> String {
    match (c, out) {
        (None, _) => "-".into(),
        (Some(c), true) => format!("{}/{}", c.packets_out, c.bytes_out),
        (Some(c), false) => format!("{}/{}", c.packets_in, c.bytes_in),
    }
}

fn proto_port(proto: Proto, port: u16) -> String {
    let p = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    };
    format!("{p}/{port}")
}

impl Table for FlowView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("START", |f| fmt_time(f.start_ms)),
        col("INITIATOR", |f| f.initiator.clone()),
        col("RESPONDER", |f| f.responder.clone()),
        col("PROTO/PORT", |f| proto_port(f.proto, f.port)),
        col("VERDICT", |f| {
            match f.verdict {
                FlowVerdict::Allowed => "allowed",
                FlowVerdict::Denied => "denied",
            }
            .into()
        }),
        col("RULE/REASON", |f| match (&f.rule, f.reason) {
            (_, Some(r)) => r.as_str().into(),
            (Some(r), None) => r.clone(),
            (None, None) => "-".into(),
        }),
        col("SHADOW", |f| {
            f.shadow.map_or("-", ShadowVerdict::as_str).into()
        }),
        col("STATUS", |f| f.status.as_str().into()),
        col("I SENT", |f| counts(&f.initiator_counts, true)),
        col("R GOT", |f| counts(&f.responder_counts, false)),
        col("R SENT", |f| counts(&f.responder_counts, true)),
        col("I GOT", |f| counts(&f.initiator_counts, false)),
    ];
}

impl Table for FlowSourceView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("DEVICE", |s| s.device.clone()),
        col("LAST SEQ", |s| s.last_seq.to_string()),
        col("REPORTS", |s| s.reports.to_string()),
        col("MISSING", |s| s.missing_seqs.to_string()),
        col("DROPPED", |s| s.dropped_records.to_string()),
        col("REFUSED", |s| s.refused_records.to_string()),
        col("LAST REPORT", |s| fmt_time(s.last_report_ms)),
    ];
}

impl Table for FlowsTopView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("INITIATOR", |t| t.initiator.clone()),
        col("RESPONDER", |t| t.responder.clone()),
        col("PROTO/PORT", |t| proto_port(t.proto, t.port)),
        col("BYTES", |t| t.bytes.to_string()),
        col("FLOWS", |t| t.flows.to_string()),
        col("DENIED", |t| t.denied.to_string()),
    ];
}

impl Table for AuditView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("SEQ", |a| a.seq.to_string()),
        col("TIME", |a| fmt_time(a.ts_ms)),
        col("ACTOR", |a| a.actor.clone()),
        col("ACTION", |a| a.action.clone()),
        col("TARGET", |a| a.target.clone()),
        col("DETAIL", |a| plain(&a.detail)),
    ];
}

/// `anomalies`: one behaviour anomaly, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyView {
    pub id: u64,
    pub device: String,
    pub at_ms: i64,
    pub kinds: Vec<crate::behaviour::Kind>,
    /// 0–100 when raised (its share of the risk halves every hour after).
    pub score: u8,
    pub reason: String,
    /// `expected`, `malicious`, or none yet.
    pub label: Option<crate::behaviour::Label>,
    /// Whether it took the device's risk over the policy's `risk_threshold`.
    pub over_threshold: bool,
}

impl Table for AnomalyView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("ID", |a| a.id.to_string()),
        col("TIME", |a| fmt_time(a.at_ms)),
        col("DEVICE", |a| a.device.clone()),
        col("SCORE", |a| a.score.to_string()),
        col("LABEL", |a| a.label.map_or("-", |l| l.as_str()).to_string()),
        col("REASON", |a| a.reason.clone()),
    ];
}

/// `maturity`: the live assessment and the evidence it was scored from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaturityView {
    pub at_ms: i64,
    pub evidence: crate::maturity::Evidence,
    pub assessment: crate::maturity::Assessment,
}

impl MaturityView {
    /// The human form: one line per pillar, then its functions and their predicates.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.assessment.pillars {
            out.push(format!(
                "{:<26} {:<12} (weakest: {})",
                p.pillar, p.stage, p.weakest
            ));
            for f in &p.functions {
                out.push(format!("  {:<32} {}", f.function, f.stage));
                for x in &f.predicates {
                    out.push(format!(
                        "    [{}] {:<10} {:<36} {} (needs {})",
                        if x.pass { "ok" } else { "--" },
                        x.stage,
                        x.name,
                        x.value,
                        x.threshold
                    ));
                }
                if let Some(step) = &f.next_step {
                    out.push(format!("    next: {step}"));
                }
            }
        }
        out.push("out of scope:".into());
        for o in &self.assessment.out_of_scope {
            out.push(format!("  {} / {}: {}", o.pillar, o.function, o.why));
        }
        out
    }
}

/// `maturity history`: recorded assessments, oldest first; the chain verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaturityHistoryView {
    pub verified: bool,
    pub entries: Vec<MaturityEntryView>,
}

/// One recorded assessment: when, why, the stage per pillar and what moved since the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaturityEntryView {
    pub seq: i64,
    pub ts_ms: i64,
    pub trigger: String,
    pub stages: std::collections::BTreeMap<crate::maturity::Pillar, crate::maturity::Stage>,
    pub changes: Vec<String>,
}

impl Table for MaturityEntryView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("SEQ", |e| e.seq.to_string()),
        col("TIME", |e| fmt_time(e.ts_ms)),
        col("TRIGGER", |e| e.trigger.clone()),
        col("IDENTITY", |e| {
            stage_of(e, crate::maturity::Pillar::Identity)
        }),
        col("DEVICES", |e| stage_of(e, crate::maturity::Pillar::Devices)),
        col("NETWORKS", |e| {
            stage_of(e, crate::maturity::Pillar::Networks)
        }),
        col("VISIBILITY", |e| {
            stage_of(e, crate::maturity::Pillar::VisibilityAnalytics)
        }),
        col("AUTOMATION", |e| {
            stage_of(e, crate::maturity::Pillar::AutomationOrchestration)
        }),
        col("GOVERNANCE", |e| {
            stage_of(e, crate::maturity::Pillar::Governance)
        }),
        col("CHANGES", |e| {
            if e.changes.is_empty() {
                "-".into()
            } else {
                e.changes.join("; ")
            }
        }),
    ];
}

fn stage_of(e: &MaturityEntryView, p: crate::maturity::Pillar) -> String {
    e.stages
        .get(&p)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "-".into())
}

// Flow-based policy suggestions (`policy suggest`, `policy replay`, `policy suggestions`).

/// One suggestion with what an administrator decided about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionView {
    pub suggestion: crate::suggest::Suggestion,
    /// `None`: nobody marked it.
    pub state: Option<crate::store::SuggestionState>,
    /// Dismissed, but seen with more flows or on more days since: shown again.
    pub returned: bool,
    /// Dismissed (without new evidence) or snoozed: left out of `policy suggest` and `--write`.
    pub hidden: bool,
    /// Written by `--write` (not low confidence, not a finding, not hidden).
    pub writable: bool,
    pub reason: Option<String>,
    pub until_ms: Option<i64>,
}

/// `policy suggest` and `policy suggestions ls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestView {
    pub since_ms: i64,
    pub min_days: u32,
    /// Flow spans looked at.
    pub flows: usize,
    pub suggestions: Vec<SuggestionView>,
    /// `--write`: the candidate policy.
    pub written: Option<crate::suggest::write::Written>,
}

/// `policy replay FILE`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayView {
    pub since_ms: i64,
    /// The candidate does not parse: why (nothing was replayed).
    pub error: Option<String>,
    pub replay: crate::suggest::replay::Replayed,
}

/// `policy suggestions accept|dismiss|snooze ID`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionMarkView {
    pub mark: crate::store::SuggestionMark,
}

impl Table for SuggestionView {
    const COLUMNS: &'static [Column<Self>] = &[
        col("ID", |s| s.suggestion.id.clone()),
        col("KIND", |s| s.suggestion.kind.as_str().to_string()),
        col("CONFIDENCE", |s| {
            s.suggestion.confidence.as_str().to_string()
        }),
        col("STATE", |s| match (s.state, s.returned) {
            (_, true) => "returned".to_string(),
            (Some(st), _) => st.as_str().to_string(),
            (None, _) => "new".to_string(),
        }),
        col("DAYS", |s| s.suggestion.evidence.days_seen.to_string()),
        col("FLOWS", |s| s.suggestion.evidence.flows.to_string()),
        col("BYTES", |s| s.suggestion.evidence.bytes.to_string()),
        col("SOURCES", |s| s.suggestion.evidence.sources.to_string()),
        col("FIRST SEEN", |s| {
            time_or_dash(s.suggestion.evidence.first_seen_ms)
        }),
        col("LAST SEEN", |s| {
            time_or_dash(s.suggestion.evidence.last_seen_ms)
        }),
        col("SUBJECT", |s| s.suggestion.subject.clone()),
    ];
}

/// Any admin response, as the server sends it. Untagged: each variant serializes exactly as
/// its view, and the CLI reads the one type its request returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AdminReply {
    Status(StatusView),
    User(UserView),
    Users(Vec<UserView>),
    UserAccess(UserAccess),
    UserGroups(UserGroupsView),
    TokenCreated(TokenCreated),
    Token(TokenView),
    Tokens(Vec<TokenView>),
    Device(DeviceView),
    Devices(Vec<DeviceView>),
    DeviceDetail(Box<DeviceDetail>),
    Rotating(Rotating),
    DeviceTags(DeviceTagsView),
    DeviceRoutes(DeviceRoutesView),
    Policy(PolicyOutcome),
    PolicyShow(PolicyShowView),
    PolicyHistory(Vec<PolicyVersionView>),
    Explain(Box<ExplainView>),
    Grant(GrantView),
    Grants(Vec<GrantView>),
    Relay(RelayView),
    RelayAdded(RelayAdded),
    Relays(Vec<RelayView>),
    Audit(Vec<AuditView>),
    AuditVerify(AuditVerifyView),
    Flows(Box<FlowsView>),
    FlowsTop(Vec<FlowsTopView>),
    Maturity(Box<MaturityView>),
    MaturityHistory(MaturityHistoryView),
    Suggest(Box<SuggestView>),
    Replay(Box<ReplayView>),
    SuggestionMarked(SuggestionMarkView),
    Anomalies(Vec<AnomalyView>),
    AnomalyAcked(AnomalyView),
    ConsoleLink(ConsoleLinkView),
    Addrs(AddrsView),
}

/// `addrs set` against a running coordinator: the list it now serves, and how many device
/// sessions were sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddrsView {
    pub addrs: Vec<String>,
    pub sessions: usize,
}

/// `console-link`: the one-time login URL and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLinkView {
    pub url: String,
    pub expires_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn keys(v: &impl Serialize) -> BTreeSet<String> {
        match serde_json::to_value(v).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn device() -> DeviceView {
        DeviceView {
            id: "d1".into(),
            hostname: Hostname::parse("box").unwrap(),
            name_bound: true,
            user: None,
            user_disabled: false,
            tags: vec!["web".into(), "db".into()],
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: Ipv6Addr::LOCALHOST,
            os: "linux".into(),
            status: DeviceStatus::Active,
            created_ms: 1_700_000_000_000,
            last_seen_ms: 1_700_000_000_000,
            cert_not_after_ms: 0,
            revoked_ms: None,
            wg_public_key: None,
            endpoints: vec![],
            quarantine: None,
            lease_expires_ms: None,
            lease_serial: None,
            lease_key: None,
            lease_issued_ms: None,
            relay: None,
            rotations: 0,
            online: true,
            state: DeviceState::Active,
        }
    }

    /// `flows --json`'s field names (README.md, "JSON output"): a rename fails here.
    /// The candidate verdict is `"shadow": "would-allow" | "would-deny"` in JSON (absent
    /// without one), a SHADOW column in the table, and reads back.
    #[test]
    fn flow_shadow_verdicts_print_as_would_allow_and_would_deny() {
        let f = FlowView {
            initiator: "laptop".into(),
            responder: "web".into(),
            initiator_id: Some("d1".into()),
            responder_id: Some("d2".into()),
            proto: Proto::Tcp,
            port: 80,
            start_ms: 0,
            end_ms: 1,
            verdict: FlowVerdict::Allowed,
            rule: Some("web-wide".into()),
            reason: None,
            policy_version: Some(1),
            status: PairStatus::Paired,
            initiator_user: None,
            initiator_tags: vec![],
            responder_user: None,
            responder_tags: vec![],
            initiator_counts: None,
            responder_counts: None,
            disagree: vec![],
            shadow: Some(ShadowVerdict::WouldDeny),
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["shadow"], serde_json::json!("would-deny"));
        let back: FlowView = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
        let mut allow = f.clone();
        allow.shadow = Some(ShadowVerdict::WouldAllow);
        assert_eq!(
            serde_json::to_value(&allow).unwrap()["shadow"],
            serde_json::json!("would-allow")
        );
        let shown = FlowView::COLUMNS
            .iter()
            .find(|c| c.header == "SHADOW")
            .map(|c| (c.cell)(&f));
        assert_eq!(shown.as_deref(), Some("would-deny"));
    }

    #[test]
    fn flow_json_field_names_are_stable() {
        let counts = Counts {
            packets_out: 1,
            bytes_out: 2,
            packets_in: 3,
            bytes_in: 4,
            connections: 5,
        };
        let f = FlowView {
            initiator: "laptop".into(),
            responder: "db".into(),
            initiator_id: Some("d1".into()),
            responder_id: Some("d2".into()),
            proto: Proto::Tcp,
            port: 5432,
            start_ms: 0,
            end_ms: 1,
            verdict: FlowVerdict::Denied,
            rule: None,
            reason: Some(DenyCause::NoRule),
            policy_version: Some(1),
            status: PairStatus::OneSided,
            initiator_user: None,
            initiator_tags: vec![],
            responder_user: None,
            responder_tags: vec![],
            initiator_counts: Some(counts),
            responder_counts: None,
            disagree: vec![],
            shadow: None,
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(
            (&v["verdict"], &v["reason"], &v["status"], &v["proto"]),
            (
                &serde_json::json!("denied"),
                &serde_json::json!("no_rule"),
                &serde_json::json!("one_sided"),
                &serde_json::json!("tcp")
            )
        );
        assert_eq!(
            keys(&f),
            set(&[
                "initiator",
                "responder",
                "initiator_id",
                "responder_id",
                "proto",
                "port",
                "start_ms",
                "end_ms",
                "verdict",
                "rule",
                "reason",
                "policy_version",
                "status",
                "initiator_user",
                "initiator_tags",
                "responder_user",
                "responder_tags",
                "initiator_counts",
                "responder_counts",
                "disagree",
            ])
        );
        assert_eq!(
            keys(&counts),
            set(&[
                "packets_out",
                "bytes_out",
                "packets_in",
                "bytes_in",
                "connections"
            ])
        );
        let view = FlowsView {
            flows: vec![f],
            summary: FlowSummary::default(),
            sources: vec![],
        };
        assert_eq!(keys(&view), set(&["flows", "summary", "sources"]));
        assert_eq!(
            keys(&FlowSummary::default()),
            set(&[
                "paired",
                "mismatch",
                "one_sided",
                "pending",
                "denied",
                "missing_seqs",
                "dropped_records",
                "refused_records"
            ])
        );
        let table = render_table(&view.flows);
        assert!(
            table[1].contains("no rule") && table[1].contains("one_sided"),
            "{table:?}"
        );
    }

    /// The `--json` field names scripts read (README.md, "JSON output"): a rename fails here.
    #[test]
    fn json_field_names_are_stable() {
        assert_eq!(
            keys(&device()),
            set(&[
                "id",
                "hostname",
                "name_bound",
                "user",
                "user_disabled",
                "tags",
                "ipv4",
                "ipv6",
                "os",
                "status",
                "created_ms",
                "last_seen_ms",
                "cert_not_after_ms",
                "revoked_ms",
                "wg_public_key",
                "endpoints",
                "quarantine",
                "lease_expires_ms",
                "lease_serial",
                "lease_key",
                "rotations",
                "online",
                "state",
            ])
        );
        let detail = DeviceDetail {
            device: device(),
            posture: PostureVerdict::default(),
            posture_report: None,
            stored_posture: None,
            flows: None,
            sign_in: None,
        };
        let mut want = keys(&device());
        want.extend(set(&["posture", "posture_report"]));
        assert_eq!(keys(&detail), want);
        let back: DeviceDetail =
            serde_json::from_str(&serde_json::to_string(&detail).unwrap()).unwrap();
        assert_eq!(back, detail);

        let status = StatusView {
            public_addr: "a:1".into(),
            ca_sha256: "00".into(),
            ipv6_prefix: "fd::/48".into(),
            devices: 1,
            online: 0,
            users: 1,
            uptime_secs: 3,
            version: "0".into(),
            protocol: 1,
            posture: TrustStatsView::default(),
            storage: StorageHealth::default(),
            event_queue: EventQueueView::default(),
            replica_id: "r1".into(),
            replicas: vec![ReplicaView {
                id: "r1".into(),
                address: "10.0.0.1:7443".into(),
                sessions: 2,
                started_ms: 1,
                last_seen_ms: 2,
                alive: true,
                this: true,
            }],
            database: crate::store::replicas::DatabaseStatus {
                backend: "postgres".into(),
                location: "db.example/ward".into(),
                reachable: true,
                schema_version: Some(40),
                round_trip_ms: Some(0.25),
                error: None,
                listener: Some(crate::store::postgres::listen::ListenerStatus {
                    listening: true,
                    notifications: 7,
                    connects: 2,
                }),
            },
        };
        assert!(status
            .lines()
            .iter()
            .any(|l| l.starts_with("replica ") && l.contains("r1 10.0.0.1:7443 sessions=2")));
        assert!(
            status.lines().iter().any(|l| l.starts_with("database ")
                && l.contains(
                    "postgres db.example/ward reachable schema=40 rtt_ms=0.250 listen=up notifications=7 connects=2"
                )),
            "{:?}",
            status.lines()
        );
        assert_eq!(
            keys(&status.database),
            set(&[
                "backend",
                "location",
                "reachable",
                "schema_version",
                "round_trip_ms",
                "error",
                "listener",
            ])
        );
        assert_eq!(
            keys(&status),
            set(&[
                "public_addr",
                "ca_sha256",
                "ipv6_prefix",
                "devices",
                "online",
                "users",
                "uptime_secs",
                "version",
                "protocol",
                "posture",
                "storage",
                "event_queue",
                "replica_id",
                "replicas",
                "database",
            ])
        );
        assert_eq!(
            keys(&status.posture),
            set(&[
                "reports",
                "refused",
                "changes",
                "enforce_ms_p50",
                "enforce_ms_p99",
                "enforce_ms_last",
            ])
        );
        assert_eq!(
            serde_json::to_string(&PolicyShowView {
                version: None,
                text: None,
                created_ms: None,
                sha256: None
            })
            .unwrap(),
            r#"{"version":null,"text":null}"#
        );
        let refused = PolicyOutcome {
            ok: false,
            message: "m".into(),
            tests: vec![],
            warnings: vec![],
            changes: vec![],
            devices: None,
            version: None,
            shadow_rules: None,
        };
        assert_eq!(
            keys(&refused),
            set(&["ok", "message", "tests", "warnings", "changes"])
        );
        assert_eq!(
            keys(&AuditView {
                seq: 1,
                ts_ms: 2,
                actor: "a".into(),
                action: "user.add".into(),
                target: "t".into(),
                detail: serde_json::json!({}),
                hash: "h".into(),
            }),
            set(&["seq", "ts_ms", "actor", "action", "target", "detail", "hash"])
        );
        let relay = RelayView {
            name: "r1".into(),
            addr: "[2001:db8::1]:3478".into(),
            created_ms: 1_700_000_000_000,
            online: true,
            devices: 2,
            bytes_relayed: 1500,
        };
        assert_eq!(
            keys(&relay),
            set(&[
                "name",
                "addr",
                "created_ms",
                "online",
                "devices",
                "bytes_relayed"
            ])
        );
        let lines = render_table(std::slice::from_ref(&relay));
        assert_eq!(
            lines,
            [
                "NAME  ADDR                ADDED                 ONLINE  DEVICES  BYTES",
                "r1    [2001:db8::1]:3478  2023-11-14T22:13:20Z  yes     2        1500"
            ]
        );
        // A listing from before relays reported their load still reads.
        let old: RelayView =
            serde_json::from_str(r#"{"name":"r1","addr":"a:1","created_ms":5}"#).unwrap();
        assert!(!old.online && old.devices == 0 && old.bytes_relayed == 0);
        // The server's untagged reply is exactly the view.
        assert_eq!(
            serde_json::to_value(AdminReply::Device(device())).unwrap(),
            serde_json::to_value(device()).unwrap()
        );
    }

    /// `device show` and `status` for people: every field once, in name order (as before).
    #[test]
    fn show_lines_cover_every_field_in_name_order() {
        let mut d = device();
        d.quarantine = Some(Quarantine {
            since_ms: 1,
            reason: "r".into(),
            automatic: true,
        });
        let lines = d.lines();
        let shown: Vec<String> = lines
            .iter()
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        let mut sorted = shown.clone();
        sorted.sort();
        assert_eq!(shown, sorted);
        assert_eq!(shown.iter().cloned().collect::<BTreeSet<_>>(), keys(&d));
        assert!(lines.contains(
            &"quarantine         {\"automatic\":true,\"reason\":\"r\",\"since_ms\":1}".to_string()
        ));
    }

    #[test]
    fn tables_format_typed_times_and_lists() {
        let lines = render_table(&[device()]);
        assert!(
            lines[0].starts_with("ID  HOSTNAME  USER  TAGS"),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with("LAST SEEN"), "{}", lines[0]);
        assert!(lines[1].contains("web,db"), "{}", lines[1]);
        // `user: None` and no lease print as `-`; `last_seen_ms` as a time.
        assert!(lines[1].contains("  -  "), "{}", lines[1]);
        assert!(lines[1].ends_with("2023-11-14T22:13:20Z"), "{}", lines[1]);
        assert_eq!(render_table::<UserView>(&[]).len(), 1);
    }

    /// The JSON field names README documents for `policy suggest --json` and `policy replay
    /// --json`.
    #[test]
    fn suggestion_views_have_the_documented_fields() {
        use crate::suggest::{Change, Confidence, Evidence, Kind, Suggestion};
        let s = Suggestion {
            id: "s1".into(),
            kind: Kind::Expire,
            subject: "grant g1".into(),
            summary: "x".into(),
            change: Change::ExpireGrant { grant: "g1".into() },
            evidence: Evidence::default(),
            confidence: Confidence::High,
            confidence_reason: "r".into(),
            notes: vec![],
        };
        assert_eq!(
            keys(&s),
            set(&[
                "id",
                "kind",
                "subject",
                "summary",
                "change",
                "evidence",
                "confidence",
                "confidence_reason",
                "notes"
            ])
        );
        assert_eq!(
            serde_json::to_value(&s.change).unwrap(),
            serde_json::json!({"change": "expire_grant", "grant": "g1"})
        );
        assert_eq!(
            keys(&s.evidence),
            set(&[
                "first_seen_ms",
                "last_seen_ms",
                "days_seen",
                "flows",
                "bytes",
                "sources",
                "one_sided"
            ])
        );
        let v = SuggestionView {
            suggestion: s,
            state: None,
            returned: false,
            hidden: false,
            writable: true,
            reason: None,
            until_ms: None,
        };
        assert_eq!(
            keys(&v),
            set(&[
                "suggestion",
                "state",
                "returned",
                "hidden",
                "writable",
                "reason",
                "until_ms"
            ])
        );
        let sv = SuggestView {
            since_ms: 0,
            min_days: 2,
            flows: 0,
            suggestions: vec![v],
            written: None,
        };
        assert_eq!(
            keys(&sv),
            set(&["since_ms", "min_days", "flows", "suggestions", "written"])
        );
        let back: SuggestView = serde_json::from_value(serde_json::to_value(&sv).unwrap()).unwrap();
        assert_eq!(back, sv);
        let r = ReplayView {
            since_ms: 0,
            error: None,
            replay: crate::suggest::replay::Replayed::default(),
        };
        assert_eq!(keys(&r), set(&["since_ms", "error", "replay"]));
        assert_eq!(
            keys(&r.replay),
            set(&["newly_denied", "newly_allowed", "unchanged", "skipped"])
        );
    }
}
