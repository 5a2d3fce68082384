//! What replicas of one instance share through the database beyond the registry's tables:
//! the change feed's version (the audit log's last sequence number: every write other
//! replicas must see appends an audit row in the same transaction), each replica's heartbeat,
//! and which replica holds each device's session.
//!
//! A separate trait so a backend ports these few methods in one place; [`super::Store`]
//! requires it.

use serde::{Deserialize, Serialize};
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
    /// Scan counters (JSON array of denied flows with this device as the source).
    pub counters: String,
    pub updated_ms: i64,
}

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
}
