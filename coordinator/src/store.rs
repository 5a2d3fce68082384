//! The coordinator's durable state behind a narrow interface ([`Store`]).
//!
//! SQLite (WAL, `synchronous=FULL`, so an acknowledged write survives `kill -9` and power loss)
//! is the default; the interface is shaped so that a PostgreSQL implementation can back several
//! coordinator replicas later: every method is one transaction, and nothing above it caches rows
//! it did not get from a method's return value.
//!
//! Time is passed in (`now_ms`), so the same calls replay identically in tests.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Mutex;

use ward_shared::addr::AddressPools;
use ward_shared::names::{Hostname, Name};
use ward_shared::secret::ct_eq;
use ward_shared::wire::{DeviceId, ErrorCode, WgPublicKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("enrollment refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("database is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub disabled: bool,
    pub created_ms: i64,
}

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Active,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub hostname: Hostname,
    pub user: Option<String>,
    /// Whether the owning user is disabled (a disabled user's devices get no access).
    pub user_disabled: bool,
    pub tags: Vec<String>,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub os: String,
    pub status: DeviceStatus,
    pub created_ms: i64,
    pub last_seen_ms: i64,
    pub cert_not_after_ms: i64,
    pub revoked_ms: Option<i64>,
    pub wg_public_key: Option<WgPublicKey>,
    pub endpoints: Vec<SocketAddr>,
    /// Set while the device is quarantined (only remediation services stay reachable).
    pub quarantine: Option<Quarantine>,
}

/// Why and since when a device is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub since_ms: i64,
    pub reason: String,
    /// Decided by a policy trust rule, not by an admin.
    pub automatic: bool,
}

impl Device {
    /// Whether this device may hold a session and appear in netmaps.
    pub fn is_live(&self) -> bool {
        self.status == DeviceStatus::Active && !self.user_disabled
    }
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

/// A lease as stored (unsigned; the coordinator signs on the way out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRow {
    pub serial: u64,
    pub device_id: DeviceId,
    pub wg_public_key: WgPublicKey,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// One audit event to append (in the same transaction as the change it describes).
pub struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: serde_json::Value,
}

/// The narrow interface the coordinator uses. Every method is one transaction.
pub trait Store: Send + Sync {
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
    #[allow(clippy::too_many_arguments)]
    fn create_token(
        &self,
        id: &str,
        secret_hash: [u8; 32],
        user: Option<&Name>,
        tags: &[Name],
        expires_ms: i64,
        uses: i64,
        actor: &str,
        now_ms: i64,
    ) -> Result<TokenInfo>;
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
    ) -> Result<(Device, Vec<u8>)>;
    fn device_by_identity(&self, identity_hash: &[u8; 32]) -> Result<Option<Device>>;
    fn device_by_name(&self, name: &str) -> Result<Device>;
    fn device(&self, id: DeviceId) -> Result<Device>;
    fn list_devices(&self) -> Result<Vec<Device>>;
    fn revoke_device(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device>;
    /// Records a device's latest contact, WireGuard key and endpoints.
    fn touch_device(
        &self,
        id: DeviceId,
        wg: Option<WgPublicKey>,
        endpoints: &[SocketAddr],
        now_ms: i64,
    ) -> Result<()>;
    fn set_device_cert(&self, id: DeviceId, not_after_ms: i64, now_ms: i64) -> Result<()>;
    fn set_device_tags(
        &self,
        name: &str,
        tags: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<Device>;
    fn set_user_groups(
        &self,
        name: &Name,
        groups: &[Name],
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
    fn append_audit(&self, a: Audit<'_>, now_ms: i64) -> Result<()>;
    fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>>;
    fn verify_audit(&self) -> Result<AuditVerdict>;
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: first schema.
    r#"
    CREATE TABLE users(
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE user_groups(
        user_id INTEGER NOT NULL REFERENCES users(id),
        grp TEXT NOT NULL,
        PRIMARY KEY(user_id, grp)
    );
    CREATE TABLE tokens(
        id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        user_id INTEGER REFERENCES users(id),
        tags TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        uses_total INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        revoked_ms INTEGER
    );
    CREATE TABLE devices(
        id INTEGER PRIMARY KEY,
        hostname TEXT NOT NULL UNIQUE,
        user_id INTEGER REFERENCES users(id),
        tags TEXT NOT NULL,
        addr_index INTEGER NOT NULL UNIQUE,
        ipv4 TEXT NOT NULL UNIQUE,
        ipv6 TEXT NOT NULL UNIQUE,
        identity_hash BLOB NOT NULL UNIQUE,
        os TEXT NOT NULL,
        status TEXT NOT NULL,
        token_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        cert_not_after_ms INTEGER NOT NULL,
        revoked_ms INTEGER,
        wg_key TEXT,
        endpoints TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE audit(
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    "#,
    // 2: policy versions and just-in-time grants.
    r#"
    CREATE TABLE policies(
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE TABLE grants(
        id TEXT PRIMARY KEY,
        principal TEXT NOT NULL,
        service TEXT NOT NULL,
        not_after_ms INTEGER NOT NULL,
        reason TEXT,
        actor TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        removed_ms INTEGER
    );
    "#,
    // 3: leases.
    r#"
    CREATE TABLE leases(
        serial INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id INTEGER NOT NULL REFERENCES devices(id),
        wg_key TEXT NOT NULL,
        not_before_ms INTEGER NOT NULL,
        not_after_ms INTEGER NOT NULL,
        issued_ms INTEGER NOT NULL,
        revoked_ms INTEGER,
        revoke_reason TEXT
    );
    CREATE INDEX leases_device ON leases(device_id, serial);
    "#,
    // 4: quarantine and posture.
    r#"
    ALTER TABLE devices ADD COLUMN quarantine TEXT;
    CREATE TABLE posture(
        device_id INTEGER PRIMARY KEY REFERENCES devices(id),
        report TEXT NOT NULL,
        evaluation TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    #[cfg(test)]
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this coordinator ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with_tx<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        // A poisoned lock means a panic mid-transaction; SQLite rolled it back, so go on.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

fn grant_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRow> {
    Ok(GrantRow {
        id: r.get(0)?,
        principal: r.get(1)?,
        service: r.get(2)?,
        not_after_ms: r.get(3)?,
        reason: r.get(4)?,
        actor: r.get(5)?,
        created_ms: r.get(6)?,
    })
}

impl SqliteStore {
    fn policy_history_limit(&self, limit: i64) -> Result<Vec<PolicyVersion>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT version, text, sha256, actor, created_ms, summary FROM policies ORDER BY version DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok(PolicyVersion {
                    version: r.get(0)?,
                    text: r.get(1)?,
                    sha256: r.get(2)?,
                    actor: r.get(3)?,
                    created_ms: r.get(4)?,
                    summary: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}

fn audit_hash(
    prev: &[u8],
    seq: i64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    for part in [
        seq.to_be_bytes().as_slice(),
        ts_ms.to_be_bytes().as_slice(),
        actor.as_bytes(),
        action.as_bytes(),
        target.as_bytes(),
        detail.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().to_vec()
}

fn append_audit_tx(tx: &rusqlite::Transaction<'_>, a: Audit<'_>, now_ms: i64) -> Result<()> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, vec![0u8; 32]),
    };
    let detail = a.detail.to_string();
    let hash = audit_hash(&prev, seq, now_ms, a.actor, a.action, a.target, &detail);
    tx.execute(
        "INSERT INTO audit(seq, ts_ms, actor, action, target, detail, prev_hash, hash) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
        params![seq, now_ms, a.actor, a.action, a.target, detail, prev, hash],
    )?;
    Ok(())
}

fn json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

fn names_json(n: &[Name]) -> String {
    serde_json::to_string(&n.iter().map(|x| x.as_str()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

const DEVICE_COLS: &str = "d.id, d.hostname, u.name, COALESCE(u.disabled, 0), d.tags, d.ipv4, d.ipv6, d.os, d.status, d.created_ms, d.last_seen_ms, d.cert_not_after_ms, d.revoked_ms, d.wg_key, d.endpoints, d.quarantine";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<std::result::Result<Device, String>> {
    let id: i64 = r.get(0)?;
    let hostname: String = r.get(1)?;
    let user: Option<String> = r.get(2)?;
    let disabled: i64 = r.get(3)?;
    let tags: String = r.get(4)?;
    let ipv4: String = r.get(5)?;
    let ipv6: String = r.get(6)?;
    let os: String = r.get(7)?;
    let status: String = r.get(8)?;
    let wg: Option<String> = r.get(13)?;
    let endpoints: String = r.get(14)?;
    let quarantine: Option<String> = r.get(15)?;
    let parsed = (|| -> std::result::Result<Device, String> {
        Ok(Device {
            id: DeviceId(id as u64),
            hostname: Hostname::parse(&hostname).map_err(|e| e.to_string())?,
            user,
            user_disabled: disabled != 0,
            tags: json_list(&tags),
            ipv4: ipv4.parse().map_err(|_| format!("bad ipv4 {ipv4:?}"))?,
            ipv6: ipv6.parse().map_err(|_| format!("bad ipv6 {ipv6:?}"))?,
            os,
            status: match status.as_str() {
                "active" => DeviceStatus::Active,
                "revoked" => DeviceStatus::Revoked,
                other => return Err(format!("unknown device status {other:?}")),
            },
            created_ms: r.get(9).map_err(|e| e.to_string())?,
            last_seen_ms: r.get(10).map_err(|e| e.to_string())?,
            cert_not_after_ms: r.get(11).map_err(|e| e.to_string())?,
            revoked_ms: r.get(12).map_err(|e| e.to_string())?,
            wg_public_key: match wg {
                Some(k) => Some(WgPublicKey::try_from(k)?),
                None => None,
            },
            endpoints: serde_json::from_str(&endpoints).unwrap_or_default(),
            // An unreadable quarantine stays a quarantine (fail closed).
            quarantine: quarantine.map(|q| {
                serde_json::from_str(&q).unwrap_or_else(|_| Quarantine {
                    since_ms: 0,
                    reason: format!("unreadable quarantine record {q:?}"),
                    automatic: false,
                })
            }),
        })
    })();
    Ok(parsed)
}

fn query_devices(
    tx: &rusqlite::Transaction<'_>,
    cond: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<Device>> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices d LEFT JOIN users u ON u.id = d.user_id {cond} ORDER BY d.id");
    let mut stmt = tx.prepare(&sql)?;
    let rows = stmt.query_map(p, device_row)?;
    let mut out = Vec::new();
    for r in rows {
        out.push(r?.map_err(StoreError::Corrupt)?);
    }
    Ok(out)
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    let tags: String = r.get(2)?;
    let revoked: Option<i64> = r.get(7)?;
    Ok(TokenInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        tags: json_list(&tags),
        created_ms: r.get(3)?,
        expires_ms: r.get(4)?,
        uses_total: r.get(5)?,
        uses_left: r.get(6)?,
        revoked: revoked.is_some(),
    })
}

const TOKEN_COLS: &str =
    "t.id, u.name, t.tags, t.created_ms, t.expires_ms, t.uses_total, t.uses_left, t.revoked_ms";

fn user_id(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<(i64, bool)> {
    tx.query_row(
        "SELECT id, disabled FROM users WHERE name = ?1",
        [name],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? != 0)),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))
}

impl Store for SqliteStore {
    fn add_user(&self, name: &Name, groups: &[Name], actor: &str, now_ms: i64) -> Result<User> {
        self.with_tx(|tx| {
            let exists: bool = tx
                .query_row(
                    "SELECT 1 FROM users WHERE name = ?1",
                    [name.as_str()],
                    |_| Ok(true),
                )
                .optional()?
                .unwrap_or(false);
            if exists {
                return Err(StoreError::Conflict(format!(
                    "user {name:?} already exists"
                )));
            }
            tx.execute(
                "INSERT INTO users(name, disabled, created_ms) VALUES (?1, 0, ?2)",
                params![name.as_str(), now_ms],
            )?;
            let uid = tx.last_insert_rowid();
            for g in groups {
                tx.execute(
                    "INSERT OR IGNORE INTO user_groups(user_id, grp) VALUES (?1, ?2)",
                    params![uid, g.as_str()],
                )?;
            }
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "user.add",
                    target: name.as_str(),
                    detail: serde_json::json!({ "groups": groups }),
                },
                now_ms,
            )?;
            Ok(User {
                name: name.to_string(),
                groups,
                disabled: false,
                created_ms: now_ms,
            })
        })
    }

    fn list_users(&self) -> Result<Vec<User>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT u.name, u.disabled, u.created_ms, COALESCE((SELECT json_group_array(grp) FROM (SELECT grp FROM user_groups g WHERE g.user_id = u.id ORDER BY grp)), '[]') FROM users u ORDER BY u.name",
            )?;
            let rows = stmt.query_map([], |r| {
                let groups: String = r.get(3)?;
                Ok(User {
                    name: r.get(0)?,
                    disabled: r.get::<_, i64>(1)? != 0,
                    created_ms: r.get(2)?,
                    groups: json_list(&groups),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn set_user_disabled(
        &self,
        name: &Name,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<DeviceId>> {
        self.with_tx(|tx| {
            let (uid, _) = user_id(tx, name.as_str())?;
            tx.execute(
                "UPDATE users SET disabled = ?1 WHERE id = ?2",
                params![disabled as i64, uid],
            )?;
            let mut stmt = tx.prepare("SELECT id FROM devices WHERE user_id = ?1 ORDER BY id")?;
            let ids = stmt
                .query_map([uid], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
                .into_iter()
                .map(|i| DeviceId(i as u64))
                .collect::<Vec<_>>();
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: if disabled {
                        "user.disable"
                    } else {
                        "user.enable"
                    },
                    target: name.as_str(),
                    detail: serde_json::json!({ "devices": ids }),
                },
                now_ms,
            )?;
            Ok(ids)
        })
    }

    fn create_token(
        &self,
        id: &str,
        secret_hash: [u8; 32],
        user: Option<&Name>,
        tags: &[Name],
        expires_ms: i64,
        uses: i64,
        actor: &str,
        now_ms: i64,
    ) -> Result<TokenInfo> {
        if !(1..=10_000).contains(&uses) {
            return Err(StoreError::Invalid(format!(
                "--uses must be between 1 and 10000, not {uses}"
            )));
        }
        if user.is_none() && tags.is_empty() {
            return Err(StoreError::Invalid(
                "a token needs --user NAME or at least one --tag".into(),
            ));
        }
        self.with_tx(|tx| {
            let uid = match user {
                Some(u) => {
                    let (uid, disabled) = user_id(tx, u.as_str())?;
                    if disabled {
                        return Err(StoreError::Invalid(format!("user {:?} is disabled", u.as_str())));
                    }
                    Some(uid)
                }
                None => None,
            };
            tx.execute(
                "INSERT INTO tokens(id, secret_hash, user_id, tags, created_ms, expires_ms, uses_total, uses_left) VALUES (?1,?2,?3,?4,?5,?6,?7,?7)",
                params![id, secret_hash.to_vec(), uid, names_json(tags), now_ms, expires_ms, uses],
            )?;
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "token.create",
                    target: id,
                    detail: serde_json::json!({
                        "user": user.map(|u| u.as_str()),
                        "tags": tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                        "expires_ms": expires_ms,
                        "uses": uses,
                    }),
                },
                now_ms,
            )?;
            Ok(TokenInfo {
                id: id.to_string(),
                user: user.map(|u| u.to_string()),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                created_ms: now_ms,
                expires_ms,
                uses_total: uses,
                uses_left: uses,
                revoked: false,
            })
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT {TOKEN_COLS} FROM tokens t LEFT JOIN users u ON u.id = t.user_id ORDER BY t.created_ms, t.id"
            ))?;
            let rows = stmt.query_map([], token_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn revoke_token(&self, id: &str, actor: &str, now_ms: i64) -> Result<TokenInfo> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                params![id, now_ms],
            )?;
            let info = tx
                .query_row(
                    &format!("SELECT {TOKEN_COLS} FROM tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.id = ?1"),
                    [id],
                    token_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no token with id {id:?}")))?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("token {id} is already revoked")));
            }
            append_audit_tx(
                tx,
                Audit { actor, action: "token.revoke", target: id, detail: serde_json::json!({}) },
                now_ms,
            )?;
            Ok(info)
        })
    }

    fn enroll(
        &self,
        spec: EnrollSpec<'_>,
        pools: &AddressPools,
        issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
        now_ms: i64,
    ) -> Result<(Device, Vec<u8>)> {
        let refusal = match self.with_tx(|tx| enroll_tx(tx, &spec, pools, issue, now_ms)) {
            Ok(done) => return Ok(done),
            Err(StoreError::Refused { code, message }) => (code, message),
            Err(e) => return Err(e),
        };
        // The refusal is audited in its own transaction: the redemption rolled back.
        let (code, message) = refusal;
        self.append_audit(
            Audit {
                actor: "device",
                action: "enroll.refused",
                target: spec.token_id,
                detail: serde_json::json!({
                    "code": code,
                    "reason": message,
                    "hostname": spec.hostname.as_str(),
                }),
            },
            now_ms,
        )?;
        Err(StoreError::Refused { code, message })
    }

    fn device_by_identity(&self, identity_hash: &[u8; 32]) -> Result<Option<Device>> {
        self.with_tx(|tx| {
            Ok(
                query_devices(tx, "WHERE d.identity_hash = ?1", [identity_hash.to_vec()])?
                    .into_iter()
                    .next(),
            )
        })
    }

    fn device_by_name(&self, name: &str) -> Result<Device> {
        self.with_tx(|tx| {
            query_devices(tx, "WHERE d.hostname = ?1", [name])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))
        })
    }

    fn device(&self, id: DeviceId) -> Result<Device> {
        self.with_tx(|tx| {
            query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device {id}")))
        })
    }

    fn list_devices(&self) -> Result<Vec<Device>> {
        self.with_tx(|tx| query_devices(tx, "", []))
    }

    fn revoke_device(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE devices SET status = 'revoked', revoked_ms = ?2 WHERE hostname = ?1 AND status = 'active'",
                params![name, now_ms],
            )?;
            let dev = query_devices(tx, "WHERE d.hostname = ?1", [name])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))?;
            if n == 0 {
                return Err(StoreError::Conflict(format!("device {name:?} is already revoked")));
            }
            tx.execute(
                "UPDATE leases SET revoked_ms = ?2, revoke_reason = 'device revoked' WHERE device_id = ?1 AND revoked_ms IS NULL",
                params![dev.id.0 as i64, now_ms],
            )?;
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "device.revoke",
                    target: name,
                    detail: serde_json::json!({ "device_id": dev.id, "ipv4": dev.ipv4 }),
                },
                now_ms,
            )?;
            Ok(dev)
        })
    }

    fn touch_device(
        &self,
        id: DeviceId,
        wg: Option<WgPublicKey>,
        endpoints: &[SocketAddr],
        now_ms: i64,
    ) -> Result<()> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE devices SET last_seen_ms = ?2, wg_key = COALESCE(?3, wg_key), endpoints = ?4 WHERE id = ?1",
                params![
                    id.0 as i64,
                    now_ms,
                    wg.map(|k| k.to_base64()),
                    serde_json::to_string(endpoints).unwrap_or_else(|_| "[]".into())
                ],
            )?;
            Ok(())
        })
    }

    fn set_device_cert(&self, id: DeviceId, not_after_ms: i64, now_ms: i64) -> Result<()> {
        self.with_tx(|tx| {
            tx.execute(
                "UPDATE devices SET cert_not_after_ms = ?2 WHERE id = ?1",
                params![id.0 as i64, not_after_ms],
            )?;
            append_audit_tx(
                tx,
                Audit {
                    actor: "device",
                    action: "device.cert_renewed",
                    target: &id.to_string(),
                    detail: serde_json::json!({ "not_after_ms": not_after_ms }),
                },
                now_ms,
            )
        })
    }

    fn append_audit(&self, a: Audit<'_>, now_ms: i64) -> Result<()> {
        self.with_tx(|tx| append_audit_tx(tx, a, now_ms))
    }

    fn set_quarantine(
        &self,
        id: DeviceId,
        quarantine: Option<&Quarantine>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Device> {
        self.with_tx(|tx| {
            let json = quarantine
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let n = tx.execute(
                "UPDATE devices SET quarantine = ?2 WHERE id = ?1",
                params![id.0 as i64, json],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("no device {id}")));
            }
            let dev = query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device {id}")))?;
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: if quarantine.is_some() {
                        "device.quarantine"
                    } else {
                        "device.release"
                    },
                    target: dev.hostname.as_str(),
                    detail: serde_json::json!({ "quarantine": quarantine }),
                },
                now_ms,
            )?;
            Ok(dev)
        })
    }

    fn save_posture(
        &self,
        id: DeviceId,
        report: &serde_json::Value,
        evaluation: &serde_json::Value,
        now_ms: i64,
    ) -> Result<()> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO posture(device_id, report, evaluation, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device_id) DO UPDATE SET report = ?2, evaluation = ?3, updated_ms = ?4",
                params![id.0 as i64, report.to_string(), evaluation.to_string(), now_ms],
            )?;
            Ok(())
        })
    }

    fn posture(&self, id: DeviceId) -> Result<Option<(serde_json::Value, serde_json::Value, i64)>> {
        self.with_tx(|tx| {
            let row: Option<(String, String, i64)> = tx
                .query_row(
                    "SELECT report, evaluation, updated_ms FROM posture WHERE device_id = ?1",
                    [id.0 as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((r, e, t)) = row else {
                return Ok(None);
            };
            let parse = |s: &str| {
                serde_json::from_str(s)
                    .map_err(|e| StoreError::Corrupt(format!("posture row: {e}")))
            };
            Ok(Some((parse(&r)?, parse(&e)?, t)))
        })
    }

    fn set_device_tags(
        &self,
        name: &str,
        tags: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<Device> {
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE devices SET tags = ?2 WHERE hostname = ?1",
                params![name, names_json(tags)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("no device named {name:?}")));
            }
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "device.tag",
                    target: name,
                    detail: serde_json::json!({ "tags": tags.iter().map(|t| t.as_str()).collect::<Vec<_>>() }),
                },
                now_ms,
            )?;
            query_devices(tx, "WHERE d.hostname = ?1", [name])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))
        })
    }

    fn set_user_groups(
        &self,
        name: &Name,
        groups: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<User> {
        self.with_tx(|tx| {
            let (uid, disabled) = user_id(tx, name.as_str())?;
            tx.execute("DELETE FROM user_groups WHERE user_id = ?1", [uid])?;
            for g in groups {
                tx.execute(
                    "INSERT OR IGNORE INTO user_groups(user_id, grp) VALUES (?1, ?2)",
                    params![uid, g.as_str()],
                )?;
            }
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "user.groups",
                    target: name.as_str(),
                    detail: serde_json::json!({ "groups": groups }),
                },
                now_ms,
            )?;
            let created_ms: i64 =
                tx.query_row("SELECT created_ms FROM users WHERE id = ?1", [uid], |r| {
                    r.get(0)
                })?;
            Ok(User {
                name: name.to_string(),
                groups,
                disabled,
                created_ms,
            })
        })
    }

    fn save_policy(
        &self,
        text: &str,
        sha256: &str,
        summary: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<i64> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO policies(text, sha256, actor, created_ms, summary) VALUES (?1,?2,?3,?4,?5)",
                params![text, sha256, actor, now_ms, summary],
            )?;
            let v = tx.last_insert_rowid();
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: "policy.apply",
                    target: &format!("v{v}"),
                    detail: serde_json::json!({ "sha256": sha256, "changes": summary }),
                },
                now_ms,
            )?;
            Ok(v)
        })
    }

    fn current_policy(&self) -> Result<Option<PolicyVersion>> {
        Ok(self.policy_history_limit(1)?.into_iter().next())
    }

    fn policy_history(&self) -> Result<Vec<PolicyVersion>> {
        self.policy_history_limit(10_000)
    }

    fn add_grant(&self, g: &GrantRow, now_ms: i64) -> Result<()> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO grants(id, principal, service, not_after_ms, reason, actor, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7)",
                params![g.id, g.principal, g.service, g.not_after_ms, g.reason, g.actor, g.created_ms],
            )?;
            append_audit_tx(
                tx,
                Audit {
                    actor: &g.actor,
                    action: "grant.add",
                    target: &g.id,
                    detail: serde_json::json!({ "from": g.principal, "to": g.service, "not_after_ms": g.not_after_ms, "reason": g.reason }),
                },
                now_ms,
            )
        })
    }

    fn active_grants(&self, now_ms: i64) -> Result<Vec<GrantRow>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT id, principal, service, not_after_ms, reason, actor, created_ms FROM grants WHERE removed_ms IS NULL AND not_after_ms > ?1 ORDER BY created_ms, id",
            )?;
            let rows = stmt.query_map([now_ms], grant_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn issue_lease(
        &self,
        device: DeviceId,
        key: WgPublicKey,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<LeaseRow> {
        self.with_tx(|tx| {
            let dev = query_devices(tx, "WHERE d.id = ?1", [device.0 as i64])?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NotFound(format!("no device {device}")))?;
            if !dev.is_live() {
                return Err(StoreError::Refused { code: ErrorCode::DeviceRevoked, message: "the device is not allowed on the network".into() });
            }
            let not_after = now_ms + ttl_ms;
            tx.execute(
                "INSERT INTO leases(device_id, wg_key, not_before_ms, not_after_ms, issued_ms) VALUES (?1,?2,?3,?4,?3)",
                params![device.0 as i64, key.to_base64(), now_ms, not_after],
            )?;
            let serial = tx.last_insert_rowid() as u64;
            append_audit_tx(
                tx,
                Audit {
                    actor: "device",
                    action: "lease.issue",
                    target: dev.hostname.as_str(),
                    detail: serde_json::json!({ "serial": serial, "wg_key": key.to_base64(), "not_after_ms": not_after, "ttl_ms": ttl_ms }),
                },
                now_ms,
            )?;
            Ok(LeaseRow { serial, device_id: device, wg_public_key: key, not_before_ms: now_ms, not_after_ms: not_after })
        })
    }

    fn revoke_leases(
        &self,
        device: DeviceId,
        keep_serial: Option<u64>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<u64>> {
        self.with_tx(|tx| {
            let keep = keep_serial.map(|k| k as i64).unwrap_or(i64::MAX);
            let mut stmt = tx.prepare(
                "SELECT serial FROM leases WHERE device_id = ?1 AND serial < ?2 AND revoked_ms IS NULL AND not_after_ms > ?3 ORDER BY serial",
            )?;
            let serials = stmt
                .query_map(params![device.0 as i64, keep, now_ms], |r| r.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            drop(stmt);
            if serials.is_empty() {
                return Ok(vec![]);
            }
            tx.execute(
                "UPDATE leases SET revoked_ms = ?3, revoke_reason = ?4 WHERE device_id = ?1 AND serial < ?2 AND revoked_ms IS NULL AND not_after_ms > ?3",
                params![device.0 as i64, keep, now_ms, reason],
            )?;
            append_audit_tx(
                tx,
                Audit {
                    actor: "coordinator",
                    action: "lease.revoke",
                    target: &device.to_string(),
                    detail: serde_json::json!({ "serials": serials, "reason": reason }),
                },
                now_ms,
            )?;
            Ok(serials.into_iter().map(|s| s as u64).collect())
        })
    }

    fn active_leases(&self, now_ms: i64) -> Result<Vec<LeaseRow>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT serial, device_id, wg_key, not_before_ms, not_after_ms FROM leases WHERE revoked_ms IS NULL AND not_after_ms > ?1 ORDER BY serial",
            )?;
            let rows = stmt.query_map([now_ms], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (serial, dev, key, nb, na) = row?;
                out.push(LeaseRow {
                    serial: serial as u64,
                    device_id: DeviceId(dev as u64),
                    wg_public_key: WgPublicKey::try_from(key).map_err(StoreError::Corrupt)?,
                    not_before_ms: nb,
                    not_after_ms: na,
                });
            }
            Ok(out)
        })
    }

    fn lease_counts(&self) -> Result<BTreeMap<DeviceId, i64>> {
        self.with_tx(|tx| {
            let mut stmt =
                tx.prepare("SELECT device_id, COUNT(*) FROM leases GROUP BY device_id")?;
            let rows = stmt.query_map([], |r| {
                Ok((DeviceId(r.get::<_, i64>(0)? as u64), r.get::<_, i64>(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
        })
    }

    fn remove_grant(&self, id: &str, actor: &str, now_ms: i64) -> Result<GrantRow> {
        self.with_tx(|tx| {
            let g = tx
                .query_row(
                    "SELECT id, principal, service, not_after_ms, reason, actor, created_ms FROM grants WHERE id = ?1 AND removed_ms IS NULL",
                    [id],
                    grant_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no active grant with id {id:?}")))?;
            tx.execute("UPDATE grants SET removed_ms = ?2 WHERE id = ?1", params![id, now_ms])?;
            append_audit_tx(tx, Audit { actor, action: "grant.remove", target: id, detail: serde_json::json!({}) }, now_ms)?;
            Ok(g)
        })
    }

    fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT seq, ts_ms, actor, action, target, detail, hash FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
            )?;
            let rows = stmt.query_map([limit], |r| {
                let detail: String = r.get(5)?;
                let hash: Vec<u8> = r.get(6)?;
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    ts_ms: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    target: r.get(4)?,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
                    hash: hex::encode(hash),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn verify_audit(&self) -> Result<AuditVerdict> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT seq, ts_ms, actor, action, target, detail, prev_hash, hash FROM audit ORDER BY seq",
            )?;
            let mut rows = stmt.query([])?;
            let mut prev = vec![0u8; 32];
            let mut expect_seq = 1i64;
            let mut n = 0i64;
            while let Some(r) = rows.next()? {
                let seq: i64 = r.get(0)?;
                let ts: i64 = r.get(1)?;
                let actor: String = r.get(2)?;
                let action: String = r.get(3)?;
                let target: String = r.get(4)?;
                let detail: String = r.get(5)?;
                let prev_hash: Vec<u8> = r.get(6)?;
                let hash: Vec<u8> = r.get(7)?;
                n += 1;
                let bad = |why: &str| AuditVerdict {
                    ok: false,
                    rows: n,
                    first_bad_seq: Some(seq),
                    message: format!("audit row {seq}: {why}"),
                };
                if seq != expect_seq {
                    return Ok(bad(&format!("expected row {expect_seq} (a row was removed or inserted)")));
                }
                if !ct_eq(&prev_hash, &prev) {
                    return Ok(bad("does not chain to the previous row"));
                }
                let want = audit_hash(&prev, seq, ts, &actor, &action, &target, &detail);
                if !ct_eq(&want, &hash) {
                    return Ok(bad("contents do not match its hash (edited)"));
                }
                prev = hash;
                expect_seq += 1;
            }
            Ok(AuditVerdict {
                ok: true,
                rows: n,
                first_bad_seq: None,
                message: format!("audit log intact: {n} rows, chain head {}", hex::encode(&prev[..8])),
            })
        })
    }
}

/// secret_hash, user_id, tags, expires_ms, uses_left, revoked_ms
type TokenRow = (Vec<u8>, Option<i64>, String, i64, i64, Option<i64>);

fn enroll_tx(
    tx: &rusqlite::Transaction<'_>,
    spec: &EnrollSpec<'_>,
    pools: &AddressPools,
    issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
    now_ms: i64,
) -> Result<(Device, Vec<u8>)> {
    let refuse = |code, message: &str| StoreError::Refused {
        code,
        message: message.to_string(),
    };
    let row: Option<TokenRow> = tx
        .query_row(
            "SELECT secret_hash, user_id, tags, expires_ms, uses_left, revoked_ms FROM tokens WHERE id = ?1",
            [spec.token_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    let Some((hash, uid, tags, expires_ms, uses_left, revoked)) = row else {
        return Err(refuse(
            ErrorCode::TokenInvalid,
            "token is not valid (unknown token)",
        ));
    };
    let given = ward_shared::token::hash_secret(spec.token_secret);
    if !ct_eq(&hash, &given) {
        return Err(refuse(
            ErrorCode::TokenInvalid,
            "token is not valid (wrong secret)",
        ));
    }
    if revoked.is_some() {
        return Err(refuse(ErrorCode::TokenRevoked, "token has been revoked"));
    }
    if now_ms >= expires_ms {
        return Err(refuse(ErrorCode::TokenExpired, "token has expired"));
    }
    if uses_left <= 0 {
        return Err(refuse(ErrorCode::TokenUsed, "token has already been used"));
    }
    if let Some(uid) = uid {
        let disabled: i64 =
            tx.query_row("SELECT disabled FROM users WHERE id = ?1", [uid], |r| {
                r.get(0)
            })?;
        if disabled != 0 {
            return Err(refuse(
                ErrorCode::UserDisabled,
                "the token's user is disabled",
            ));
        }
    }
    let known: bool = tx
        .query_row(
            "SELECT 1 FROM devices WHERE identity_hash = ?1",
            [spec.identity_hash.to_vec()],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if known {
        return Err(refuse(
            ErrorCode::BadRequest,
            "this identity key is already enrolled",
        ));
    }
    // Redeem: the WHERE clause makes the decrement atomic even under concurrent writers
    // (PostgreSQL included); zero rows changed means another enrollment won the race.
    let n = tx.execute(
        "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
        [spec.token_id],
    )?;
    if n != 1 {
        return Err(refuse(ErrorCode::TokenUsed, "token has already been used"));
    }
    // Unique hostname: first free of name, name-2, name-3, ...
    let mut hostname = spec.hostname.clone();
    let mut k = 2;
    while tx
        .query_row(
            "SELECT 1 FROM devices WHERE hostname = ?1",
            [hostname.as_str()],
            |_| Ok(()),
        )
        .optional()?
        .is_some()
    {
        hostname = spec.hostname.with_suffix(k);
        k += 1;
        if k > 10_000 {
            return Err(refuse(ErrorCode::BadRequest, "no free hostname"));
        }
    }
    let next_index: i64 = tx.query_row(
        "SELECT COALESCE(MAX(addr_index), 0) + 1 FROM devices",
        [],
        |r| r.get(0),
    )?;
    let (ipv4, ipv6) = pools
        .addresses(next_index as u64)
        .ok_or_else(|| refuse(ErrorCode::Internal, "the overlay address pool is full"))?;
    tx.execute(
        "INSERT INTO devices(hostname, user_id, tags, addr_index, ipv4, ipv6, identity_hash, os, status, token_id, created_ms, last_seen_ms, cert_not_after_ms) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,'active',?9,?10,?10,0)",
        params![hostname.as_str(), uid, tags, next_index, ipv4.to_string(), ipv6.to_string(), spec.identity_hash.to_vec(), spec.os, spec.token_id, now_ms],
    )?;
    let id = DeviceId(tx.last_insert_rowid() as u64);
    let (cert, not_after) =
        issue(id).map_err(|e| StoreError::Invalid(format!("issuing certificate: {e:#}")))?;
    tx.execute(
        "UPDATE devices SET cert_not_after_ms = ?2 WHERE id = ?1",
        params![id.0 as i64, not_after],
    )?;
    append_audit_tx(
        tx,
        Audit {
            actor: "device",
            action: "device.enroll",
            target: hostname.as_str(),
            detail: serde_json::json!({
                "device_id": id, "token": spec.token_id, "ipv4": ipv4, "ipv6": ipv6, "os": spec.os,
                "requested_hostname": spec.hostname.as_str(),
            }),
        },
        now_ms,
    )?;
    let dev = query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Corrupt("device vanished inside its own transaction".into()))?;
    Ok((dev, cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::parse("name", s).unwrap()
    }

    fn setup() -> (SqliteStore, AddressPools) {
        let s = SqliteStore::open_in_memory().unwrap();
        s.add_user(&n("alice"), &[n("eng")], "admin", 1000).unwrap();
        (s, AddressPools::from_random([1, 2, 3, 4, 5]))
    }

    fn enroll(
        s: &SqliteStore,
        pools: &AddressPools,
        token: &str,
        secret: &[u8],
        host: &str,
        key: u8,
        now: i64,
    ) -> Result<Device> {
        s.enroll(
            EnrollSpec {
                token_id: token,
                token_secret: secret,
                hostname: Hostname::sanitize(host).unwrap(),
                os: "linux".into(),
                identity_hash: [key; 32],
            },
            pools,
            &mut |_| Ok((vec![1, 2, 3], 99)),
            now,
        )
        .map(|(d, _)| d)
    }

    #[test]
    fn token_lifecycle_and_refusals() {
        let (s, pools) = setup();
        let h = ward_shared::token::hash_secret(b"s1");
        s.create_token("t1", h, Some(&n("alice")), &[], 5000, 1, "admin", 1000)
            .unwrap();
        let d = enroll(&s, &pools, "t1", b"s1", "laptop", 1, 2000).unwrap();
        assert_eq!(d.hostname.as_str(), "laptop");
        assert_eq!(d.user.as_deref(), Some("alice"));
        assert_eq!(d.ipv4, Ipv4Addr::new(100, 64, 0, 1));
        let used = enroll(&s, &pools, "t1", b"s1", "laptop", 2, 2000).unwrap_err();
        assert!(
            matches!(
                used,
                StoreError::Refused {
                    code: ErrorCode::TokenUsed,
                    ..
                }
            ),
            "{used}"
        );
        let wrong = enroll(&s, &pools, "t1", b"nope", "laptop", 2, 2000).unwrap_err();
        assert!(matches!(
            wrong,
            StoreError::Refused {
                code: ErrorCode::TokenInvalid,
                ..
            }
        ));
        let unknown = enroll(&s, &pools, "zz", b"s1", "x", 2, 2000).unwrap_err();
        assert!(matches!(
            unknown,
            StoreError::Refused {
                code: ErrorCode::TokenInvalid,
                ..
            }
        ));

        s.create_token(
            "t2",
            ward_shared::token::hash_secret(b"s2"),
            None,
            &[n("server")],
            5000,
            3,
            "admin",
            1000,
        )
        .unwrap();
        let expired = enroll(&s, &pools, "t2", b"s2", "db", 3, 5000).unwrap_err();
        assert!(matches!(
            expired,
            StoreError::Refused {
                code: ErrorCode::TokenExpired,
                ..
            }
        ));
        let d2 = enroll(&s, &pools, "t2", b"s2", "laptop", 3, 4000).unwrap();
        assert_eq!(d2.hostname.as_str(), "laptop-2");
        assert_eq!(d2.tags, vec!["server".to_string()]);
        s.revoke_token("t2", "admin", 4100).unwrap();
        let revoked = enroll(&s, &pools, "t2", b"s2", "db", 4, 4200).unwrap_err();
        assert!(matches!(
            revoked,
            StoreError::Refused {
                code: ErrorCode::TokenRevoked,
                ..
            }
        ));
        let toks = s.list_tokens().unwrap();
        assert_eq!(toks.len(), 2);
        assert_eq!(toks[0].uses_left, 0);
        // Every refusal is audited, and the chain verifies.
        let log = s.audit_log(100).unwrap();
        assert_eq!(
            log.iter().filter(|e| e.action == "enroll.refused").count(),
            5
        );
        assert!(s.verify_audit().unwrap().ok);
    }

    #[test]
    fn same_identity_cannot_enroll_twice() {
        let (s, pools) = setup();
        s.create_token(
            "t",
            ward_shared::token::hash_secret(b"s"),
            Some(&n("alice")),
            &[],
            5000,
            5,
            "admin",
            1000,
        )
        .unwrap();
        enroll(&s, &pools, "t", b"s", "a", 7, 2000).unwrap();
        let e = enroll(&s, &pools, "t", b"s", "b", 7, 2000).unwrap_err();
        assert!(matches!(
            e,
            StoreError::Refused {
                code: ErrorCode::BadRequest,
                ..
            }
        ));
        // The refused attempt did not spend a use.
        assert_eq!(s.list_tokens().unwrap()[0].uses_left, 4);
    }

    #[test]
    fn revoke_and_disable() {
        let (s, pools) = setup();
        s.create_token(
            "t",
            ward_shared::token::hash_secret(b"s"),
            Some(&n("alice")),
            &[],
            5000,
            2,
            "admin",
            1000,
        )
        .unwrap();
        let d = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
        assert!(d.is_live());
        let ids = s
            .set_user_disabled(&n("alice"), true, "admin", 2100)
            .unwrap();
        assert_eq!(ids, vec![d.id]);
        assert!(!s.device(d.id).unwrap().is_live());
        s.set_user_disabled(&n("alice"), false, "admin", 2200)
            .unwrap();
        let r = s.revoke_device("a", "admin", 2300).unwrap();
        assert_eq!(r.status, DeviceStatus::Revoked);
        assert!(matches!(
            s.revoke_device("a", "admin", 2400),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.revoke_device("nope", "admin", 2400),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn audit_chain_detects_edits() {
        let (s, _) = setup();
        s.append_audit(
            Audit {
                actor: "a",
                action: "x",
                target: "t",
                detail: serde_json::json!({"k": 1}),
            },
            5,
        )
        .unwrap();
        assert!(s.verify_audit().unwrap().ok);
        {
            let c = s.conn.lock().unwrap();
            // Updates are blocked by a trigger...
            assert!(c
                .execute("UPDATE audit SET actor = 'mallory' WHERE seq = 1", [])
                .is_err());
            // ...an attacker with the file drops it, and verification still catches the edit.
            c.execute_batch(
                "DROP TRIGGER audit_no_update; UPDATE audit SET actor = 'mallory' WHERE seq = 1;",
            )
            .unwrap();
        }
        let v = s.verify_audit().unwrap();
        assert!(!v.ok);
        assert_eq!(v.first_bad_seq, Some(1));
    }

    #[test]
    fn policies_and_grants() {
        let (s, _) = setup();
        assert!(s.current_policy().unwrap().is_none());
        assert_eq!(s.save_policy("a", "h1", "+x", "admin", 10).unwrap(), 1);
        assert_eq!(s.save_policy("b", "h2", "-x", "admin", 20).unwrap(), 2);
        assert_eq!(s.current_policy().unwrap().unwrap().text, "b");
        assert_eq!(s.policy_history().unwrap().len(), 2);
        let g = GrantRow {
            id: "g1".into(),
            principal: "alice".into(),
            service: "db".into(),
            not_after_ms: 100,
            reason: None,
            actor: "admin".into(),
            created_ms: 10,
        };
        s.add_grant(&g, 10).unwrap();
        assert_eq!(s.active_grants(50).unwrap(), vec![g.clone()]);
        assert!(s.active_grants(100).unwrap().is_empty());
        s.remove_grant("g1", "admin", 60).unwrap();
        assert!(s.active_grants(50).unwrap().is_empty());
        assert!(matches!(
            s.remove_grant("g1", "admin", 70),
            Err(StoreError::NotFound(_))
        ));
        let u = s
            .set_user_groups(&n("alice"), &[n("ops"), n("eng")], "admin", 80)
            .unwrap();
        assert_eq!(u.groups, vec!["ops".to_string(), "eng".to_string()]);
        assert!(s.verify_audit().unwrap().ok);
    }

    #[test]
    fn leases_issue_rotate_revoke() {
        let (s, pools) = setup();
        s.create_token(
            "t",
            ward_shared::token::hash_secret(b"s"),
            Some(&n("alice")),
            &[],
            5000,
            1,
            "admin",
            1000,
        )
        .unwrap();
        let d = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
        let l1 = s
            .issue_lease(d.id, WgPublicKey([1; 32]), 10_000, 3000)
            .unwrap();
        let l2 = s
            .issue_lease(d.id, WgPublicKey([2; 32]), 10_000, 4000)
            .unwrap();
        assert!(l2.serial > l1.serial);
        assert_eq!(s.active_leases(5000).unwrap().len(), 2);
        assert_eq!(
            s.revoke_leases(d.id, Some(l2.serial), "rotated", 5000)
                .unwrap(),
            vec![l1.serial]
        );
        assert_eq!(s.active_leases(5000).unwrap(), vec![l2.clone()]);
        assert!(s.active_leases(14_000).unwrap().is_empty(), "expired");
        assert_eq!(s.lease_counts().unwrap().get(&d.id), Some(&2));
        s.revoke_device("a", "admin", 6000).unwrap();
        assert!(s.active_leases(6000).unwrap().is_empty());
        assert!(matches!(
            s.issue_lease(d.id, WgPublicKey([3; 32]), 10_000, 7000),
            Err(StoreError::Refused { .. })
        ));
        assert!(s.verify_audit().unwrap().ok);
    }

    #[test]
    fn users_are_unique() {
        let (s, _) = setup();
        assert!(matches!(
            s.add_user(&n("alice"), &[], "admin", 1),
            Err(StoreError::Conflict(_))
        ));
        let users = s.list_users().unwrap();
        assert_eq!(users[0].groups, vec!["eng".to_string()]);
    }
}
