//! What replicas of one instance share through the database beyond the registry's tables:
//! the change feed's version (the audit log's last sequence number: every write other
//! replicas must see appends an audit row in the same transaction), each replica's heartbeat,
//! and which replica holds each device's session.
//!
//! A separate trait so a backend ports these few methods in one place; [`super::Store`]
//! requires it.

use serde::{Deserialize, Serialize};
use ward_shared::filter::Proto;
use ward_shared::wire::DeviceId;

use super::Result;

/// One row of the change feed: an audit row's sequence number, action and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRow {
    pub seq: i64,
    pub action: String,
    pub target: String,
}

/// A replica's heartbeat row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRow {
    pub id: String,
    /// The address its control listener is bound to.
    pub address: String,
    pub started_ms: i64,
    pub last_seen_ms: i64,
    /// Device sessions it held at its last heartbeat.
    pub sessions: u64,
}

/// The database as this replica sees it, for `status`: where it is (a SQLite file's path, or a
/// PostgreSQL `host[:port]/dbname`, never a password), whether a trivial query answers and how
/// long its round trip took, the schema version, and on PostgreSQL the change feed listener.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseStatus {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub location: String,
    pub reachable: bool,
    /// The schema version the database reports (`None` when it did not answer).
    pub schema_version: Option<i64>,
    /// The round trip of `SELECT 1`, in milliseconds.
    pub round_trip_ms: Option<f64>,
    /// Why the database did not answer.
    pub error: Option<String>,
    /// On PostgreSQL: the `LISTEN` connection that wakes the change feed.
    pub listener: Option<crate::store::postgres::listen::ListenerStatus>,
}

/// Which replica holds a device's control session, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub device: DeviceId,
    pub replica: String,
    pub since_ms: i64,
    /// The relay the device said it receives relayed traffic through, on that session.
    pub home_relay: Option<String>,
}

/// A device's trust as the replica holding its session judged it (the `device_trust` table).
/// The text columns are kept as stored: the reader parses them and treats what does not parse
/// as a failing verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustRow {
    pub device: DeviceId,
    /// The replica that wrote it.
    pub replica: String,
    /// The posture evaluations (JSON array of `ward_shared::posture::Evaluation`).
    pub verdict: String,
    /// Behaviour risk, 0–100.
    pub risk: i64,
    pub risk_reason: String,
    /// Always `[]` since migration 19: scan evidence is shared through `scan_evidence`, which
    /// every replica reads. The column stays (a replica of the previous version on the same
    /// database still writes it during a rolling upgrade); nothing reads it.
    pub counters: String,
    pub updated_ms: i64,
}

/// One denied flow stored as evidence against `source` (the `scan_evidence` table), by the
/// replica that received `reporter`'s report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceRow {
    /// Increases with every row stored (never reused): the evidence feed's position.
    pub id: i64,
    pub source: DeviceId,
    pub reporter: DeviceId,
    pub proto: Proto,
    pub port: u16,
    pub at_ms: i64,
    /// The replica that stored it.
    pub replica: String,
}

/// Evidence rows read at once, and the position after them (past rows left out as unreadable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvidenceBatch {
    pub rows: Vec<EvidenceRow>,
    /// The last id read (the position to read after next).
    pub last_id: i64,
}

/// Evidence rows one reporter may have in the table at once, against all sources together
/// (each source also bounds it: [`crate::trust::MAX_DENIED_PER_REPORTER`] per reporter,
/// [`crate::trust::MAX_DENIED_REMEMBERED`] in all).
pub const MAX_EVIDENCE_PER_REPORTER: usize = 4096;

pub trait ReplicaStore {
    /// The change feed's version: the last audit sequence number (0 for an empty log). Cheap:
    /// replicas poll it.
    fn feed_version(&self) -> Result<i64>;
    /// Up to `limit` feed rows after `after_seq`, oldest first.
    fn feed_since(&self, after_seq: i64, limit: usize) -> Result<Vec<FeedRow>>;
    /// Inserts or refreshes this replica's heartbeat row.
    fn replica_heartbeat(&self, row: &ReplicaRow) -> Result<()>;
    /// Every replica's heartbeat row, by id.
    fn replicas(&self) -> Result<Vec<ReplicaRow>>;
    /// Records that `replica` now holds `device`'s session (the newest claim wins: a device's
    /// newer session on another replica replaces the older one).
    fn claim_session(&self, device: DeviceId, replica: &str, since_ms: i64) -> Result<()>;
    /// Forgets `device`'s session if `replica` still holds it (a newer claim is kept).
    fn release_session(&self, device: DeviceId, replica: &str) -> Result<()>;
    /// Records the home relay of `device`'s session if `replica` still holds it.
    fn set_session_relay(&self, device: DeviceId, replica: &str, relay: Option<&str>)
        -> Result<()>;
    /// Every recorded session.
    fn sessions(&self) -> Result<Vec<SessionRow>>;
    /// The highest posture report sequence number any replica accepted from `device` (0 if
    /// none).
    fn posture_seq(&self, device: DeviceId) -> Result<u64>;
    /// Raises `device`'s accepted posture sequence number to `seq` (never lowers it).
    fn raise_posture_seq(&self, device: DeviceId, seq: u64) -> Result<()>;
    /// Probes the database now (one trivial query, one schema read).
    fn database(&self) -> DatabaseStatus;
    /// Keeps `device`'s trust row (replacing the last one). With `audit` (a change of
    /// verdict or risk level other replicas must apply), a `device.trust` audit row is
    /// appended in the same transaction, which moves the change feed; without it (a counters
    /// checkpoint) the feed does not move.
    fn save_device_trust(&self, row: &TrustRow, audit: Option<serde_json::Value>) -> Result<()>;
    /// Every stored trust row, by device.
    fn device_trust(&self) -> Result<Vec<TrustRow>>;
    /// Stores denied flows `reporter` reported at `at_ms` against their sources (source,
    /// proto, port), in one transaction: rows older than `window_ms` go first, a flow already
    /// stored for that (source, reporter) in the window is not stored again, and what would
    /// pass a bound (per source and reporter, per reporter, per source: the oldest go) is
    /// left out. No audit row (the table is bounded, the audit log is not); on PostgreSQL the
    /// commit wakes the other replicas' feed. Returns how many rows were added.
    fn add_scan_evidence(
        &self,
        replica: &str,
        reporter: DeviceId,
        flows: &[(DeviceId, Proto, u16)],
        at_ms: i64,
        window_ms: i64,
    ) -> Result<usize>;
    /// Up to `limit` evidence rows after `after_id`, oldest first. A row whose protocol does
    /// not parse is left out with an error log line (it can only narrow what is detected).
    fn scan_evidence_since(&self, after_id: i64, limit: usize) -> Result<EvidenceBatch>;
}
