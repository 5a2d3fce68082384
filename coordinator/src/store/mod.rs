//! The coordinator's durable state behind a narrow interface ([`Store`]).
//!
//! SQLite (WAL, `synchronous=FULL`, so an acknowledged write survives `kill -9` and power loss)
//! is the default; the interface is shaped so that a PostgreSQL implementation can back several
//! coordinator replicas later: every method is one transaction, and nothing above it caches rows
//! it did not get from a method's return value.
//!
//! Time is passed in (`now_ms`), so the same calls replay identically in tests.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

use ward_shared::addr::AddressPools;
use ward_shared::flows::{FlowRecord, FlowReport};
use ward_shared::names::{Hostname, Name};
use ward_shared::wire::{DeviceId, ErrorCode, WgPublicKey};

pub use crate::audit::Action;

pub mod anchor;
pub mod db;
pub mod journal;
pub mod postgres;
pub mod replicas;
pub(crate) mod schema;
mod sqlite;

pub use crate::model::{Device, DeviceStatus, Quarantine, User};
pub use sqlite::{Anchor, SqliteStore};
pub use ward_shared::flows::FlowWindow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A conditional write found the row changed since it was read; read it again and retry.
    #[error("{0}")]
    Stale(String),
    #[error("{0}")]
    Invalid(String),
    #[error("enrollment refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored value does not parse; it is never read as empty or default.
    #[error("database is corrupt: {table}.{column} of row {row}: {detail}")]
    Corrupt {
        table: &'static str,
        column: &'static str,
        row: String,
        detail: String,
    },
    #[error("database schema: {0}")]
    Schema(String),
    /// The database file is missing or empty where one must exist.
    #[error("database missing: {0}")]
    Missing(String),
    /// The narrowing journal could not be read or written.
    #[error("narrowing journal: {0}")]
    Journal(String),
}

impl StoreError {
    /// A fault of the storage itself (the database could not be read or written: a full disk,
    /// an I/O error), as opposed to an answer about the data (not found, conflict, refused).
    pub fn is_storage_fault(&self) -> bool {
        matches!(self, StoreError::Db(_))
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub user: Option<String>,
    pub tags: Vec<String>,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub uses_total: i64,
    pub uses_left: i64,
    pub revoked: bool,
    /// The hostname bound to the device that enrolls with this token, if the admin set one.
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A new enrollment token, as stored (the secret only as its hash).
#[derive(Debug, Clone, Copy)]
pub struct TokenSpec<'a> {
    pub id: &'a str,
    pub secret_hash: [u8; 32],
    /// The user the enrolled device belongs to; `None` for a tag-owned device.
    pub user: Option<&'a Name>,
    pub tags: &'a [Name],
    pub expires_ms: i64,
    /// How many enrollments the token allows (1..=10 000).
    pub uses: i64,
    /// The hostname the enrolling device gets, bound (`device:NAME` rules apply to it),
    /// whatever name the device asks for. Only for a single-use token.
    pub hostname: Option<&'a Hostname>,
}

/// What a new device asks for; the store decides the rest atomically with the token redemption.
pub struct EnrollSpec<'a> {
    pub token_id: &'a str,
    pub token_secret: &'a [u8],
    pub hostname: Hostname,
    pub os: String,
    pub identity_hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: serde_json::Value,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    pub ok: bool,
    pub rows: i64,
    /// First row whose hash does not match, if any.
    pub first_bad_seq: Option<i64>,
    pub message: String,
    /// What was found.
    #[serde(default)]
    pub kind: VerdictKind,
    /// Rows the anchor says existed but the database no longer has (first, last), for
    /// `Truncated` and `RolledBack`.
    #[serde(default)]
    pub lost: Option<(i64, i64)>,
}

/// The outcome of `audit verify`, one per kind of fault.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// The chain verifies and matches its anchor (or has none to match, for an unanchored
    /// store).
    #[default]
    Intact,
    /// A row was edited, inserted or removed inside the chain, rows were appended without the
    /// key, or the keyed head or the checkpoint does not carry a valid MAC.
    Tampered,
    /// Rows are missing from the tail of the table while the database's own keyed head still
    /// counts them: they were deleted from the table.
    Truncated,
    /// The whole database is older than the checkpoint (fewer rows, or another row where the
    /// checkpoint's head was): acknowledged writes were lost, e.g. a damaged WAL tail or a
    /// restored old copy.
    RolledBack,
    /// The checkpoint file is missing.
    Unanchored,
}

/// One `PRAGMA quick_check` run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrityCheck {
    pub at_ms: i64,
    pub ok: bool,
    /// `ok`, or what SQLite found (at most 20 findings).
    pub detail: String,
    pub took_ms: u64,
}

/// The store's health, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageHealth {
    /// Transactions that failed with a database error since start.
    pub write_errors: u64,
    /// Checkpoint files that could not be written since start.
    pub checkpoint_errors: u64,
    pub last_error: Option<String>,
    /// The last integrity check, if one ran.
    pub integrity: Option<IntegrityCheck>,
    /// Whether the audit chain is anchored outside the database.
    pub anchored: bool,
    /// Narrowing changes kept in the journal, not yet in the database.
    #[serde(default)]
    pub journal_pending: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVersion {
    pub version: i64,
    pub text: String,
    pub sha256: String,
    pub actor: String,
    pub created_ms: i64,
    /// What the apply changed, as printed to the admin.
    pub summary: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRow {
    pub id: String,
    /// A user name or `device:HOSTNAME`.
    pub principal: String,
    pub service: String,
    pub not_after_ms: i64,
    pub reason: Option<String>,
    pub actor: String,
    pub created_ms: i64,
}

/// A device's contact as [`Store::touch_devices`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Touch {
    pub id: DeviceId,
    /// `None` keeps the stored key.
    pub wg: Option<WgPublicKey>,
    pub endpoints: Vec<SocketAddr>,
    /// When the device was last heard from.
    pub at_ms: i64,
}

/// One routed prefix of a device: advertised by it, approved by an administrator, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRow {
    pub device: DeviceId,
    pub prefix: ward_shared::routes::Prefix,
    pub advertised: bool,
    pub approved: bool,
}

/// A registered relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRow {
    pub name: String,
    /// `HOST:PORT` (IPv6 bracketed), as the admin gave it after validation.
    pub addr: String,
    pub created_ms: i64,
}

/// A lease as stored (unsigned; the coordinator signs on the way out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub serial: u64,
    pub device_id: DeviceId,
    pub wg_public_key: WgPublicKey,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// One stored flow record: one reporter's aggregate of one flow in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    pub reporter: DeviceId,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub record: FlowRecord,
}

/// Which flow records to read: windows ending at or after `since_ms`, reported by or naming
/// one of `involving` (every device if `None`), newest windows first, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowQuery {
    pub since_ms: i64,
    pub involving: Option<Vec<DeviceId>>,
    pub limit: usize,
}

/// What storing a flow report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowsStored {
    /// Stored now: its records, and how many sequence numbers before it never arrived (a
    /// gap opened by this report).
    Stored {
        records: usize,
        refused: usize,
        gap: u64,
    },
    /// This (device, seq) was stored before (a retransmission): nothing changed.
    Duplicate,
}

/// Per device: what its flow reports say about their own delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowSource {
    pub device: DeviceId,
    /// The highest sequence number stored.
    pub last_seq: u64,
    /// Reports stored.
    pub reports: u64,
    /// Sequence numbers below `last_seq` never received (a late one fills its gap).
    pub missing_seqs: u64,
    /// Records the device dropped because a cap was hit (its latest cumulative count).
    pub dropped_records: u64,
    /// Records the coordinator did not store: windows outside the retention period or too
    /// far in the future.
    pub refused_records: u64,
    pub last_report_ms: i64,
    /// Times the device numbered its reports from 1 again (it lost its flow log state).
    #[serde(default)]
    pub renumbered: u64,
}

/// What an administrator decided about a policy suggestion (`policy suggestions accept`,
/// `dismiss`, `snooze`), with the evidence it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuggestionMark {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub state: SuggestionState,
    /// Why it was dismissed.
    pub reason: Option<String>,
    /// Snoozed until (coordinator time, ms).
    pub until_ms: Option<i64>,
    /// The suggestion's flows and days seen when it was marked.
    pub flows: u64,
    pub days: u32,
    pub actor: String,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuggestionState {
    Accepted,
    Dismissed,
    Snoozed,
}

impl SuggestionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SuggestionState::Accepted => "accepted",
            SuggestionState::Dismissed => "dismissed",
            SuggestionState::Snoozed => "snoozed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accepted" => Some(SuggestionState::Accepted),
            "dismissed" => Some(SuggestionState::Dismissed),
            "snoozed" => Some(SuggestionState::Snoozed),
            _ => None,
        }
    }
}

/// One audit event to append (in the same transaction as the change it describes).
/// One recorded maturity assessment (`maturity history`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaturityRow {
    pub seq: i64,
    pub ts_ms: i64,
    /// What recorded it: `daily`, `policy.apply vN`.
    pub trigger: String,
    /// The assessment as JSON (`crate::maturity::Assessment`).
    pub assessment: String,
    pub hash: String,
}

/// The maturity table and whether its hash chain verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaturityChain {
    /// Oldest first.
    pub rows: Vec<MaturityRow>,
    pub verified: bool,
    /// The first row whose hash does not follow from the rows before it.
    pub first_bad_seq: Option<i64>,
}

/// A user signed in through the OpenID provider. The refresh token is a secret: `Debug` never
/// shows it, and it lives only in the 0600 database.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcUser {
    pub user: String,
    pub issuer: String,
    pub sub: String,
    pub refresh_token: Option<String>,
    /// The provider's groups as last seen (the user's groups also hold local ones).
    pub groups: Vec<String>,
    pub amr: Vec<String>,
    pub sid: Option<String>,
    pub auth_time_ms: Option<i64>,
    pub last_auth_ms: Option<i64>,
    pub last_refresh_ms: Option<i64>,
    /// The provider (refresh refused, SCIM, back-channel logout) took access away.
    pub provider_disabled: bool,
    pub reason: Option<String>,
    /// The row's revision when it was read (0: not stored yet). A save from an older revision
    /// is refused as [`StoreError::Stale`]; each save stores the next one.
    #[serde(default)]
    pub revision: i64,
}

impl std::fmt::Debug for OidcUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcUser")
            .field("user", &self.user)
            .field("sub", &self.sub)
            .field("groups", &self.groups)
            .field("provider_disabled", &self.provider_disabled)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Who signed a device in, when, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSignIn {
    pub device: DeviceId,
    pub user: String,
    pub at_ms: i64,
    pub auth_time_ms: i64,
    pub amr: Vec<String>,
}

pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: Action,
    pub target: &'a str,
    pub detail: serde_json::Value,
}

/// The narrow interface the coordinator uses. Every method is one transaction.
pub trait Store: Send + Sync + replicas::ReplicaStore {
    fn add_user(&self, name: &Name, groups: &[Name], actor: &str, now_ms: i64) -> Result<User>;
    fn list_users(&self) -> Result<Vec<User>>;
    /// Disables (or re-enables) a user; returns the user's device ids.
    fn set_user_disabled(
        &self,
        name: &Name,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<DeviceId>>;
    fn create_token(&self, spec: TokenSpec<'_>, actor: &str, now_ms: i64) -> Result<TokenInfo>;
    fn list_tokens(&self) -> Result<Vec<TokenInfo>>;
    fn revoke_token(&self, id: &str, actor: &str, now_ms: i64) -> Result<TokenInfo>;
    /// Redeems the token and creates the device in one transaction; `issue` signs the
    /// certificate for the new device id (cert DER, not_after). On refusal nothing changes
    /// except an audit entry saying why.
    fn enroll(
        &self,
        spec: EnrollSpec<'_>,
        pools: &AddressPools,
        issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
        now_ms: i64,
    ) -> Result<(Device, Vec<u8>)> {
        let (token_id, hostname) = (spec.token_id.to_string(), spec.hostname.clone());
        match self.try_enroll(spec, pools, issue, now_ms) {
            Err(StoreError::Refused { code, message }) => {
                // The refusal is audited in its own transaction: the redemption rolled back.
                self.append_audit(
                    Audit {
                        actor: "device",
                        action: Action::EnrollRefused,
                        target: &token_id,
                        detail: serde_json::json!({
                            "code": code,
                            "reason": message,
                            "hostname": hostname.as_str(),
                        }),
                    },
                    now_ms,
                )?;
                Err(StoreError::Refused { code, message })
            }
            other => other,
        }
    }
    /// [`Store::enroll`] without the audit row on refusal: for a caller that audits refusals
    /// itself (the server aggregates forged-token refusals per source).
    fn try_enroll(
        &self,
        spec: EnrollSpec<'_>,
        pools: &AddressPools,
        issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
        now_ms: i64,
    ) -> Result<(Device, Vec<u8>)>;
    /// The user a provider identity belongs to.
    fn oidc_user_by_sub(&self, issuer: &str, sub: &str) -> Result<Option<OidcUser>>;
    fn oidc_users(&self) -> Result<Vec<OidcUser>>;
    /// Creates or replaces the provider identity of `u.user` (which must exist); audited as
    /// `action` with `detail`. Conditional: `u.revision` must be the stored row's revision
    /// (0 for a user with no row yet), else [`StoreError::Stale`] and nothing is written.
    fn save_oidc_user(
        &self,
        u: &OidcUser,
        audit: Option<(Action, serde_json::Value)>,
        actor: &str,
        now_ms: i64,
    ) -> Result<()>;
    /// Claims the refresh of the provider identity (`issuer`, `sub`) for `holder` until
    /// `until_ms`: `true` when no other holder's claim runs past `now_ms` (one replica at a
    /// time uses a user's refresh token, which the provider may rotate on every use).
    fn claim_oidc_refresh(
        &self,
        issuer: &str,
        sub: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool>;
    fn record_sign_in(&self, s: &DeviceSignIn) -> Result<()>;
    fn sign_ins(&self) -> Result<Vec<DeviceSignIn>>;
    /// One-time repair, run by `serve` at start (a no-op once done): users the identity
    /// provider took access away from under a coordinator that did so by disabling them
    /// (`users.disabled`, audited `user.disable` by the actor `oidc`) are enabled again, each
    /// with a `user.enable` audit row by `actor`; their provider suspension
    /// (`provider_disabled`) stays and takes effect instead. A user an administrator disabled
    /// (the latest `user.disable` row is not the provider's) stays disabled. Returns the
    /// repaired users. A store that never ran the older code has nothing to repair.
    fn repair_provider_disabled(&self, _actor: &str, _now_ms: i64) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Write errors, checkpoint errors and the last integrity check.
    fn storage_health(&self) -> StorageHealth {
        StorageHealth::default()
    }
    /// Keeps a narrowing change the database could not take in the journal (durably), so it
    /// is re-applied before the next start serves. A store without a journal refuses.
    fn journal_narrowing(&self, change: journal::Narrowing, now_ms: i64) -> Result<()> {
        let _ = (change, now_ms);
        Err(StoreError::Journal("this store has no journal".into()))
    }
    /// Narrowing changes in the journal, not yet in the database.
    fn journal_pending(&self) -> usize {
        0
    }
    /// Writes the journal's changes to the database and frees the journal; how many there were.
    fn flush_journal(&self, now_ms: i64) -> Result<usize> {
        let _ = now_ms;
        Ok(0)
    }
    fn device_by_identity(&self, identity_hash: &[u8; 32]) -> Result<Option<Device>>;
    fn device_by_name(&self, name: &str) -> Result<Device>;
    fn device(&self, id: DeviceId) -> Result<Device>;
    fn list_devices(&self) -> Result<Vec<Device>>;
    fn revoke_device(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device>;
    /// Renames a device and binds the new name, audited. A name held by another active device
    /// is a `Conflict`; one held by a revoked device is moved aside (suffixed) first.
    fn rename_device(&self, old: &str, new: &Hostname, actor: &str, now_ms: i64) -> Result<Device>;
    /// Binds a device's current name, audited; an already bound name is a `Conflict`.
    fn approve_device_name(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device>;
    /// The hostname a token binds, if any (no secret check: a hint for the caller only).
    fn token_hostname(&self, token_id: &str) -> Result<Option<Hostname>>;
    /// Records a device's latest contact, WireGuard key and endpoints.
    fn touch_device(
        &self,
        id: DeviceId,
        wg: Option<WgPublicKey>,
        endpoints: &[SocketAddr],
        now_ms: i64,
    ) -> Result<()>;
    /// Records many devices' latest contact at once (each as [`Store::touch_device`]): one
    /// transaction where the backend can, so a wave of session opens costs one commit, not one
    /// each.
    fn touch_devices(&self, touches: &[Touch]) -> Result<()> {
        for t in touches {
            self.touch_device(t.id, t.wg, &t.endpoints, t.at_ms)?;
        }
        Ok(())
    }
    fn set_device_cert(&self, id: DeviceId, not_after_ms: i64, now_ms: i64) -> Result<()>;
    /// Adds and removes device tags in one transaction (read, merge, write), so concurrent
    /// edits of different tags all survive. New tags keep their order after the existing ones.
    fn edit_device_tags(
        &self,
        name: &str,
        add: &[Name],
        remove: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<Device>;
    /// Adds and removes a user's groups in one transaction (set-based), so concurrent edits
    /// of different groups all survive.
    fn edit_user_groups(
        &self,
        name: &Name,
        add: &[Name],
        remove: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<User>;
    /// Stores a new policy version (the caller has checked it) and audits it.
    fn save_policy(
        &self,
        text: &str,
        sha256: &str,
        summary: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<i64>;
    fn current_policy(&self) -> Result<Option<PolicyVersion>>;
    fn policy_history(&self) -> Result<Vec<PolicyVersion>>;
    fn add_grant(&self, g: &GrantRow, now_ms: i64) -> Result<()>;
    /// Grants not removed and not yet expired at `now_ms`.
    fn active_grants(&self, now_ms: i64) -> Result<Vec<GrantRow>>;
    fn remove_grant(&self, id: &str, actor: &str, now_ms: i64) -> Result<GrantRow>;
    /// Registers a relay with the SHA-256 of its credential's secret, audited; a name already
    /// registered is a `Conflict`.
    fn add_relay(
        &self,
        name: &Name,
        addr: &str,
        secret_hash: &[u8; 32],
        actor: &str,
        now_ms: i64,
    ) -> Result<RelayRow>;
    /// The stored SHA-256 of a relay's secret; `None` for an unknown relay or one registered
    /// before relays had credentials.
    fn relay_secret_hash(&self, name: &str) -> Result<Option<[u8; 32]>>;
    /// Every registered relay, by name.
    fn relays(&self) -> Result<Vec<RelayRow>>;
    /// Every device's routed prefixes (advertised or approved), by device then prefix.
    fn device_routes(&self) -> Result<Vec<RouteRow>>;
    /// Replaces what `device` advertises (not audited: the device's own report).
    fn set_advertised_routes(
        &self,
        device: DeviceId,
        prefixes: &[ward_shared::routes::Prefix],
        now_ms: i64,
    ) -> Result<()>;
    /// Approves and revokes prefixes of `device` (named `target` in the audit), audited as
    /// one `device.routes` entry.
    fn approve_routes(
        &self,
        device: DeviceId,
        target: &str,
        approve: &[ward_shared::routes::Prefix],
        revoke: &[ward_shared::routes::Prefix],
        actor: &str,
        now_ms: i64,
    ) -> Result<()>;
    /// Removes a relay, audited; an unknown name is `NotFound`.
    fn remove_relay(&self, name: &Name, actor: &str, now_ms: i64) -> Result<RelayRow>;
    /// Records a new lease for a live device's WireGuard key.
    fn issue_lease(
        &self,
        device: DeviceId,
        key: WgPublicKey,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<LeaseRow>;
    /// Revokes the device's leases older than `keep_serial` (all of them if `None`).
    fn revoke_leases(
        &self,
        device: DeviceId,
        keep_serial: Option<u64>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<u64>>;
    /// Leases neither revoked nor expired at `now_ms`.
    fn active_leases(&self, now_ms: i64) -> Result<Vec<LeaseRow>>;
    /// How many leases each device has been issued (rotation count + 1).
    fn lease_counts(&self) -> Result<BTreeMap<DeviceId, i64>>;
    /// Quarantines (`Some`) or releases (`None`) a device, audited with the reason.
    fn set_quarantine(
        &self,
        id: DeviceId,
        quarantine: Option<&Quarantine>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Device>;
    /// Keeps a device's latest posture report and evaluation (JSON).
    fn save_posture(
        &self,
        id: DeviceId,
        report: &serde_json::Value,
        evaluation: &serde_json::Value,
        now_ms: i64,
    ) -> Result<()>;
    /// A device's latest posture report and evaluation, and when they were stored.
    fn posture(&self, id: DeviceId) -> Result<Option<(serde_json::Value, serde_json::Value, i64)>>;
    /// When each device's latest posture report was stored (devices that never reported are
    /// absent): one read for every device, not one per device.
    fn posture_times(&self) -> Result<BTreeMap<DeviceId, i64>>;
    /// Keeps each device's behaviour baseline (a serialized snapshot).
    fn save_baselines(&self, rows: &[(DeviceId, String)], now_ms: i64) -> Result<()>;
    /// Every stored behaviour baseline.
    fn baselines(&self) -> Result<Vec<(DeviceId, String)>>;
    /// Keeps each group's behaviour baseline (name, serialized snapshot).
    fn save_group_baselines(&self, rows: &[(String, String)], now_ms: i64) -> Result<()>;
    /// Every stored group baseline.
    fn group_baselines(&self) -> Result<Vec<(String, String)>>;
    /// Keeps an anomaly (JSON), replacing the stored one with the same id (a label changed).
    fn save_anomaly(&self, id: u64, device: DeviceId, at_ms: i64, json: &str) -> Result<()>;
    /// Stored anomalies (JSON) raised at or after `since_ms`, oldest first.
    fn anomalies(&self, since_ms: i64) -> Result<Vec<String>>;
    /// Stores a validated flow report from `reporter` once per (reporter, seq) (report 1 with
    /// other content than the stored one means the device numbers from 1 again: its marks are
    /// reset and the report is stored), its records
    /// merged into the rows of their (window, other end, role, proto, port, verdict, rule,
    /// reason), in one transaction with the (reporter, seq) mark. Windows ending before
    /// `keep_after_ms` or starting more than ten minutes after `now_ms` are not stored (counted
    /// as refused). A seq at or below the retention floor counts as stored before.
    fn store_flows(
        &self,
        reporter: DeviceId,
        report: &FlowReport,
        keep_after_ms: i64,
        now_ms: i64,
    ) -> Result<FlowsStored> {
        self.store_flows_relabeled(reporter, report, report, keep_after_ms, now_ms)
    }
    /// As [`Store::store_flows`], with the records of `relabeled` stored in place of those of
    /// `received`: the same report with denial reasons corrected by the coordinator
    /// ([`crate::flows::relabel`]). Whether the report was stored before is decided on
    /// `received`, so a retransmission judged differently is still the same report.
    fn store_flows_relabeled(
        &self,
        reporter: DeviceId,
        received: &FlowReport,
        relabeled: &FlowReport,
        keep_after_ms: i64,
        now_ms: i64,
    ) -> Result<FlowsStored>;
    /// Flow records as `q` asks.
    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>>;
    /// Every device that has reported flows, by id.
    fn flow_sources(&self) -> Result<Vec<FlowSource>>;
    /// Deletes at most `max_rows` flow records whose window ended before `before_ms`, and the
    /// report marks received before it (their sequence numbers stay refused as old); how
    /// many records went.
    fn prune_flows(&self, before_ms: i64, max_rows: usize) -> Result<u64>;
    /// Every suggestion an administrator marked, by id.
    fn suggestion_marks(&self) -> Result<Vec<SuggestionMark>>;
    /// Records (replacing any earlier mark of the same id) and audits a mark, in one
    /// transaction.
    fn mark_suggestion(&self, m: &SuggestionMark) -> Result<()>;
    fn append_audit(&self, a: Audit<'_>, now_ms: i64) -> Result<()>;
    fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>>;
    /// The newest `limit` audit rows whose action is one of `actions`, oldest first: what an
    /// assessment counts, without reading the lease rows that fill most of a large log.
    fn audit_log_of(&self, actions: &[&str], limit: i64) -> Result<Vec<AuditEntry>>;
    fn verify_audit(&self) -> Result<AuditVerdict>;
    /// Audit rows by action name with a sequence number above `after_seq`, and the highest
    /// sequence number among them (`after_seq` if none): metrics read only what is new since
    /// their last scrape.
    fn audit_counts_since(&self, after_seq: i64) -> Result<(BTreeMap<String, u64>, i64)> {
        Ok((BTreeMap::new(), after_seq))
    }
    /// Appends one maturity assessment (JSON) to the hash-chained table; its seq.
    fn append_maturity(&self, trigger: &str, assessment: &str, now_ms: i64) -> Result<i64> {
        let _ = (trigger, assessment, now_ms);
        Err(StoreError::Invalid(
            "this store keeps no maturity history".into(),
        ))
    }
    /// Every recorded assessment, with the chain verified.
    fn maturity_history(&self) -> Result<MaturityChain> {
        Err(StoreError::Invalid(
            "this store keeps no maturity history".into(),
        ))
    }
}
