//! The SQLite implementation of [`Store`], one file per table group. Every trait method is one
//! `BEGIN IMMEDIATE` transaction ([`SqliteStore::with_tx`]).

use rusqlite::{Connection, TransactionBehavior};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ward_shared::addr::AddressPools;
use ward_shared::names::{Hostname, Name};
use ward_shared::wire::{DeviceId, WgPublicKey};

use super::anchor::{AuditKey, Checkpoint};
use super::db::Tx;
use super::journal::{self, Journal, Narrowing};
use super::postgres::{PgBackend, PoolOptions};
use super::schema::MIGRATIONS;
use super::{
    Audit, AuditEntry, AuditVerdict, Device, EnrollSpec, FlowQuery, FlowRow, FlowSource,
    FlowsStored, GrantRow, IntegrityCheck, LeaseRow, MaturityChain, PolicyVersion, Quarantine,
    RelayRow, Result, RouteRow, StorageHealth, Store, StoreError, SuggestionMark, TokenInfo,
    TokenSpec, User,
};

mod audit;
mod behaviour;
use audit::append_audit_tx;
use devices::query_devices;
use users::user_id;
mod devices;
mod flows;
mod leases;
mod maturity;
mod oidc;
mod policy;
mod relays;
mod replicas;
mod routes;
mod suggestions;
#[cfg(test)]
mod tests;
mod tokens;
mod users;

/// The store on either backend: one SQLite file (the default) or a PostgreSQL database that
/// several coordinators share. The table modules are written once against
/// [`crate::store::db::Tx`].
pub struct SqliteStore {
    backend: Backend,
    /// The audit anchor (key and checkpoint file); `None` for a store nothing anchors (an
    /// in-memory test store, or `init` creating the file).
    anchor: Option<Anchor>,
    health: Health,
    /// The narrowing journal, once attached ([`SqliteStore::attach_journal`]).
    journal: Mutex<Option<Journal>>,
    /// On PostgreSQL, the change feed's `LISTEN` thread once started
    /// ([`SqliteStore::start_feed_listener`]).
    listener: Mutex<Option<super::postgres::listen::FeedListener>>,
}

/// A transaction holding (or waiting for) the SQLite connection longer than this is logged.
const SLOW_TX: std::time::Duration = std::time::Duration::from_millis(200);

enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres(PgBackend),
}

/// Where the audit chain is anchored outside the database.
pub struct Anchor {
    pub key: AuditKey,
    pub checkpoint: PathBuf,
}

/// Storage fault counters, for `status`.
#[derive(Default)]
struct Health {
    write_errors: AtomicU64,
    checkpoint_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    integrity: Mutex<Option<IntegrityCheck>>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating it if it does not exist (only `init` and tests
    /// may create one: see [`SqliteStore::open_existing`]).
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn, None)
    }

    /// Opens an existing, non-empty database, never creating one, with the audit chain anchored
    /// by `anchor`. A missing or zero-length file is [`StoreError::Missing`].
    pub fn open_existing(path: &Path, anchor: Option<Anchor>) -> Result<Self> {
        match std::fs::metadata(path) {
            Ok(m) if m.len() > 0 => {}
            Ok(_) => return Err(StoreError::Missing(format!("{} is empty", path.display()))),
            Err(e) => {
                return Err(StoreError::Missing(format!(
                    "{} cannot be read: {e}",
                    path.display()
                )))
            }
        }
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        Self::init(conn, anchor)
    }

    /// Connects to the PostgreSQL database at `url` (migrating its schema if it is behind),
    /// with the audit chain anchored by `anchor`.
    pub fn open_postgres(url: &str, anchor: Option<Anchor>) -> Result<Self> {
        Self::open_postgres_with(url, anchor, PoolOptions::default())
    }

    /// [`Self::open_postgres`] with a connection pool of the given size and wait.
    pub fn open_postgres_with(
        url: &str,
        anchor: Option<Anchor>,
        pool: PoolOptions,
    ) -> Result<Self> {
        Ok(Self {
            backend: Backend::Postgres(PgBackend::connect(url, pool)?),
            anchor,
            health: Health::default(),
            journal: Mutex::new(None),
            listener: Mutex::new(None),
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_kind(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// On PostgreSQL, starts the change feed listener (a connection of its own that `LISTEN`s
    /// and calls `wake` for every notification and after every reconnect) and returns `true`;
    /// on SQLite there is nothing to listen to and it returns `false`. The listener runs
    /// until the store is dropped.
    pub fn start_feed_listener(&self, wake: impl Fn() + Send + 'static) -> Result<bool> {
        let Backend::Postgres(pg) = &self.backend else {
            return Ok(false);
        };
        let l = pg
            .feed_listener(wake)
            .map_err(|e| StoreError::Db(super::postgres::fault(e)))?;
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        Ok(true)
    }

    #[cfg(test)]
    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?, None)
    }

    #[cfg(test)]
    pub fn open_in_memory_anchored(anchor: Anchor) -> Result<Self> {
        Self::init(Connection::open_in_memory()?, Some(anchor))
    }

    /// Anchors a chain that has never been anchored (a database from before anchoring),
    /// recording that in the log.
    pub fn adopt_anchor(&self, now_ms: i64) -> Result<i64> {
        let (rows, _) = audit::reanchor(
            self,
            Some((
                Audit {
                    actor: "coordinator",
                    action: crate::audit::Action::AuditAnchored,
                    target: "audit",
                    detail: serde_json::json!({ "reason": "no audit key or checkpoint yet: anchoring the existing log" }),
                },
                now_ms,
            )),
        )?;
        Ok(rows)
    }

    /// The operator accepts what `audit verify` found (lost or missing rows): the acceptance
    /// is appended to the log with `detail`, and the chain is anchored as it now stands.
    pub fn accept_rollback(
        &self,
        detail: serde_json::Value,
        actor: &str,
        now_ms: i64,
    ) -> Result<i64> {
        let (rows, _) = audit::reanchor(
            self,
            Some((
                Audit {
                    actor,
                    action: crate::audit::Action::AuditRollbackAccepted,
                    target: "audit",
                    detail,
                },
                now_ms,
            )),
        )?;
        Ok(rows)
    }

    /// The row-by-row chain check alone (no anchor): whether the rows themselves are intact.
    pub fn verify_chain(&self) -> Result<AuditVerdict> {
        audit::verify_chain(self)
    }

    /// Opens (creating, full size) the narrowing journal at `path` and keeps it.
    pub fn attach_journal(&self, path: &Path) -> Result<()> {
        let j = Journal::open_or_create(path)
            .map_err(|e| StoreError::Journal(format!("{}: {e}", path.display())))?;
        *self.journal.lock().unwrap_or_else(|p| p.into_inner()) = Some(j);
        Ok(())
    }

    /// Applies the journal's pending changes to `ds` (read from a database that could not
    /// take them): every reader (sessions, the change feed, admin) sees them in force.
    fn narrowed(&self, ds: &mut [Device]) {
        let g = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = g.as_ref().filter(|j| !j.entries().is_empty()) {
            for d in ds {
                journal::narrow_device(j.entries(), d);
            }
        }
    }

    /// The anchor, if this store has one.
    pub fn anchor(&self) -> Option<&Anchor> {
        self.anchor.as_ref()
    }

    fn init(mut conn: Connection, anchor: Option<Anchor>) -> Result<Self> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::Schema(format!(
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
            backend: Backend::Sqlite(Mutex::new(conn)),
            anchor,
            health: Health::default(),
            journal: Mutex::new(None),
            listener: Mutex::new(None),
        })
    }

    /// Runs `f` in one transaction: SQLite's `BEGIN IMMEDIATE`, or PostgreSQL's under the
    /// store-wide advisory lock; either way one writer at a time.
    fn raw_tx<T, F: FnOnce(&Tx<'_>) -> Result<T>>(&self, f: F) -> Result<T> {
        self.raw_tx_named(std::any::type_name::<F>(), f)
    }

    /// [`SqliteStore::raw_tx`], logging a transaction that held the connection (everything
    /// else on SQLite waits for it, revocations too) or waited for it over [`SLOW_TX`], by
    /// `what` (the caller's closure type, which names its function).
    fn raw_tx_named<T>(&self, what: &str, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let asked = std::time::Instant::now();
                // A poisoned lock means a panic mid-transaction; SQLite rolled it back, so go on.
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let got = std::time::Instant::now();
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let out = f(&Tx::Lite(&tx))?;
                tx.commit()?;
                drop(conn);
                let (waited, held) = (got - asked, got.elapsed());
                if waited > SLOW_TX || held > SLOW_TX {
                    tracing::warn!(
                        what,
                        waited_ms = waited.as_millis() as u64,
                        held_ms = held.as_millis() as u64,
                        "slow store transaction"
                    );
                }
                Ok(out)
            }
            Backend::Postgres(pg) => pg.with_tx(f),
        }
    }

    /// Runs raw statements in one transaction (tests editing the database behind the store).
    #[cfg(test)]
    pub fn raw_sql(&self, sql: &str) -> Result<()> {
        self.raw_tx(|tx| Ok(tx.execute_batch(sql)?))
    }

    /// Runs `f` in one transaction ([`SqliteStore::raw_tx`]). With an anchor, a transaction
    /// that appended audit rows also moves the keyed head forward before it commits, and the
    /// checkpoint file is rewritten after the commit, before the caller hears of success.
    fn with_tx<T, F: FnOnce(&Tx<'_>) -> Result<T>>(&self, f: F) -> Result<T> {
        let res = self.raw_tx_named(std::any::type_name::<F>(), |tx| {
            let before = match &self.anchor {
                Some(_) => audit::tail(tx)?,
                None => None,
            };
            let out = f(tx)?;
            let moved = match &self.anchor {
                Some(a) => audit::advance_head(tx, &a.key, before)?,
                None => None,
            };
            Ok((out, moved))
        });
        let (out, moved) = match res {
            Ok(x) => x,
            Err(e) => {
                self.note_error(&e);
                return Err(e);
            }
        };
        if let (Some(a), Some((rows, head, ts_ms))) = (&self.anchor, moved) {
            let cp = Checkpoint::new(&a.key, rows, &head, ts_ms);
            if let Err(e) = cp.write_atomic(&a.checkpoint) {
                // The rows are committed; the checkpoint lags, which start-up accepts (the
                // database is ahead of it, never behind).
                self.health
                    .checkpoint_errors
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %a.checkpoint.display(), error = %e, rows, "writing the audit checkpoint failed");
            }
        }
        Ok(out)
    }

    /// Counts and logs a failed write (not refusals, which are answers, not faults).
    fn note_error(&self, e: &StoreError) {
        if matches!(e, StoreError::Db(_) | StoreError::Corrupt { .. }) {
            self.health.write_errors.fetch_add(1, Ordering::Relaxed);
            *self
                .health
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            tracing::error!(error = %e, "database transaction failed");
        }
    }

    /// Runs SQLite's `PRAGMA quick_check` (every page's b-tree structure, bounded by the file
    /// size; not index-to-table consistency) and records the outcome for `status`.
    /// On PostgreSQL (whose server checks its own pages) it is a round trip to the database.
    pub fn quick_check(&self, now_ms: i64) -> Result<IntegrityCheck> {
        let started = std::time::Instant::now();
        let lines = match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
                stmt.query_map([], |r| r.get::<_, String>(0))
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
            }
            Backend::Postgres(pg) => match pg.ping() {
                Ok(()) => Ok(vec!["ok".to_string()]),
                Err(e) => Ok(vec![e.to_string()]),
            },
        };
        let (ok, detail) = match lines {
            Ok(l) if l.len() == 1 && l[0] == "ok" => (true, "ok".to_string()),
            Ok(l) => (false, l.join("; ")),
            // A page too damaged to read is an integrity failure too.
            Err(e) => (false, e.to_string()),
        };
        let check = IntegrityCheck {
            at_ms: now_ms,
            ok,
            detail,
            took_ms: started.elapsed().as_millis() as u64,
        };
        if !ok {
            tracing::error!(detail = %check.detail, "database integrity check FAILED");
        }
        *self
            .health
            .integrity
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(check.clone());
        Ok(check)
    }
}

/// The error for a stored value that does not parse, logged once where it is found.
fn corrupt(
    table: &'static str,
    column: &'static str,
    row: impl std::fmt::Display,
    detail: impl std::fmt::Display,
) -> StoreError {
    let (row, detail) = (row.to_string(), detail.to_string());
    tracing::error!(table, column, %row, %detail, "corrupt value in the database");
    StoreError::Corrupt {
        table,
        column,
        row,
        detail,
    }
}

/// A JSON list of names column (device `tags`, user `groups`): every member must be a valid
/// name.
fn json_names(
    table: &'static str,
    column: &'static str,
    row: impl std::fmt::Display,
    s: &str,
) -> Result<Vec<Name>> {
    serde_json::from_str(s).map_err(|e| corrupt(table, column, row, e))
}

/// A JSON list of strings column (`tags`, `groups`).
fn json_list(
    table: &'static str,
    column: &'static str,
    row: impl std::fmt::Display,
    s: &str,
) -> Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| corrupt(table, column, row, e))
}

fn names_json(n: &[Name]) -> String {
    serde_json::to_string(&n.iter().map(|x| x.as_str()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".into())
}

impl Store for SqliteStore {
    fn oidc_user_by_sub(&self, issuer: &str, sub: &str) -> Result<Option<crate::store::OidcUser>> {
        oidc::by_sub(self, issuer, sub)
    }

    fn oidc_users(&self) -> Result<Vec<crate::store::OidcUser>> {
        oidc::list(self)
    }

    fn save_oidc_user(
        &self,
        u: &crate::store::OidcUser,
        audit: Option<(crate::audit::Action, serde_json::Value)>,
        actor: &str,
        now_ms: i64,
    ) -> Result<()> {
        oidc::save(self, u, audit, actor, now_ms)
    }

    fn claim_oidc_refresh(
        &self,
        issuer: &str,
        sub: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool> {
        oidc::claim_refresh(self, issuer, sub, holder, now_ms, until_ms)
    }

    fn record_sign_in(&self, s: &crate::store::DeviceSignIn) -> Result<()> {
        oidc::record_sign_in(self, s)
    }

    fn repair_provider_disabled(&self, actor: &str, now_ms: i64) -> Result<Vec<String>> {
        oidc::repair_provider_disabled(self, actor, now_ms)
    }
    fn sign_ins(&self) -> Result<Vec<crate::store::DeviceSignIn>> {
        oidc::sign_ins(self)
    }

    fn add_user(&self, name: &Name, groups: &[Name], actor: &str, now_ms: i64) -> Result<User> {
        users::add_user(self, name, groups, actor, now_ms)
    }

    fn list_users(&self) -> Result<Vec<User>> {
        let mut us = users::list_users(self)?;
        let g = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = g.as_ref().filter(|j| !j.entries().is_empty()) {
            for u in &mut us {
                journal::narrow_user(j.entries(), u);
            }
        }
        Ok(us)
    }

    fn set_user_disabled(
        &self,
        name: &Name,
        disabled: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<DeviceId>> {
        users::set_user_disabled(self, name, disabled, actor, now_ms)
    }

    fn edit_user_groups(
        &self,
        name: &Name,
        add: &[Name],
        remove: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<User> {
        users::edit_user_groups(self, name, add, remove, actor, now_ms)
    }

    fn create_token(&self, spec: TokenSpec<'_>, actor: &str, now_ms: i64) -> Result<TokenInfo> {
        tokens::create_token(self, spec, actor, now_ms)
    }

    fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        tokens::list_tokens(self)
    }

    fn revoke_token(&self, id: &str, actor: &str, now_ms: i64) -> Result<TokenInfo> {
        tokens::revoke_token(self, id, actor, now_ms)
    }

    fn device_by_identity(&self, identity_hash: &[u8; 32]) -> Result<Option<Device>> {
        let mut d = devices::device_by_identity(self, identity_hash)?;
        if let Some(d) = &mut d {
            self.narrowed(std::slice::from_mut(d));
        }
        Ok(d)
    }

    fn device_by_name(&self, name: &str) -> Result<Device> {
        let mut d = devices::device_by_name(self, name)?;
        self.narrowed(std::slice::from_mut(&mut d));
        Ok(d)
    }

    fn device(&self, id: DeviceId) -> Result<Device> {
        let mut d = devices::device(self, id)?;
        self.narrowed(std::slice::from_mut(&mut d));
        Ok(d)
    }

    fn list_devices(&self) -> Result<Vec<Device>> {
        let mut ds = devices::list_devices(self)?;
        self.narrowed(&mut ds);
        Ok(ds)
    }

    fn revoke_device(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device> {
        devices::revoke_device(self, name, actor, now_ms)
    }

    fn rename_device(&self, old: &str, new: &Hostname, actor: &str, now_ms: i64) -> Result<Device> {
        devices::rename_device(self, old, new, actor, now_ms)
    }

    fn approve_device_name(&self, name: &str, actor: &str, now_ms: i64) -> Result<Device> {
        devices::approve_device_name(self, name, actor, now_ms)
    }

    fn token_hostname(&self, token_id: &str) -> Result<Option<Hostname>> {
        tokens::token_hostname(self, token_id)
    }

    fn touch_device(
        &self,
        id: DeviceId,
        wg: Option<WgPublicKey>,
        endpoints: &[SocketAddr],
        now_ms: i64,
    ) -> Result<()> {
        devices::touch_device(self, id, wg, endpoints, now_ms)
    }

    fn touch_devices(&self, touches: &[super::Touch]) -> Result<()> {
        devices::touch_devices(self, touches)
    }

    fn set_device_cert(&self, id: DeviceId, not_after_ms: i64, now_ms: i64) -> Result<()> {
        devices::set_device_cert(self, id, not_after_ms, now_ms)
    }

    fn set_quarantine(
        &self,
        id: DeviceId,
        quarantine: Option<&Quarantine>,
        actor: &str,
        now_ms: i64,
    ) -> Result<Device> {
        devices::set_quarantine(self, id, quarantine, actor, now_ms)
    }

    fn save_posture(
        &self,
        id: DeviceId,
        report: &serde_json::Value,
        evaluation: &serde_json::Value,
        now_ms: i64,
    ) -> Result<()> {
        devices::save_posture(self, id, report, evaluation, now_ms)
    }

    fn posture(&self, id: DeviceId) -> Result<Option<(serde_json::Value, serde_json::Value, i64)>> {
        devices::posture(self, id)
    }

    fn posture_times(&self) -> Result<BTreeMap<DeviceId, i64>> {
        devices::posture_times(self)
    }

    fn save_baselines(&self, rows: &[(DeviceId, String)], now_ms: i64) -> Result<()> {
        behaviour::save_baselines(self, rows, now_ms)
    }

    fn baselines(&self) -> Result<Vec<(DeviceId, String)>> {
        behaviour::baselines(self)
    }
    fn save_group_baselines(&self, rows: &[(String, String)], now_ms: i64) -> Result<()> {
        behaviour::save_group_baselines(self, rows, now_ms)
    }
    fn group_baselines(&self) -> Result<Vec<(String, String)>> {
        behaviour::group_baselines(self)
    }

    fn save_anomaly(&self, id: u64, device: DeviceId, at_ms: i64, json: &str) -> Result<()> {
        behaviour::save_anomaly(self, id, device, at_ms, json)
    }

    fn anomalies(&self, since_ms: i64) -> Result<Vec<String>> {
        behaviour::anomalies(self, since_ms)
    }

    fn edit_device_tags(
        &self,
        name: &str,
        add: &[Name],
        remove: &[Name],
        actor: &str,
        now_ms: i64,
    ) -> Result<Device> {
        devices::edit_device_tags(self, name, add, remove, actor, now_ms)
    }

    fn save_policy(
        &self,
        text: &str,
        sha256: &str,
        summary: &str,
        actor: &str,
        now_ms: i64,
    ) -> Result<i64> {
        policy::save_policy(self, text, sha256, summary, actor, now_ms)
    }

    fn current_policy(&self) -> Result<Option<PolicyVersion>> {
        policy::current_policy(self)
    }

    fn policy_history(&self) -> Result<Vec<PolicyVersion>> {
        policy::policy_history(self)
    }

    fn add_grant(&self, g: &GrantRow, now_ms: i64) -> Result<()> {
        policy::add_grant(self, g, now_ms)
    }

    fn active_grants(&self, now_ms: i64) -> Result<Vec<GrantRow>> {
        policy::active_grants(self, now_ms)
    }

    fn remove_grant(&self, id: &str, actor: &str, now_ms: i64) -> Result<GrantRow> {
        policy::remove_grant(self, id, actor, now_ms)
    }

    fn add_relay(
        &self,
        name: &Name,
        addr: &str,
        secret_hash: &[u8; 32],
        actor: &str,
        now_ms: i64,
    ) -> Result<RelayRow> {
        relays::add_relay(self, name, addr, secret_hash, actor, now_ms)
    }

    fn relay_secret_hash(&self, name: &str) -> Result<Option<[u8; 32]>> {
        relays::relay_secret_hash(self, name)
    }

    fn relays(&self) -> Result<Vec<RelayRow>> {
        relays::relays(self)
    }

    fn remove_relay(&self, name: &Name, actor: &str, now_ms: i64) -> Result<RelayRow> {
        relays::remove_relay(self, name, actor, now_ms)
    }

    fn device_routes(&self) -> Result<Vec<RouteRow>> {
        routes::device_routes(self)
    }

    fn set_advertised_routes(
        &self,
        device: DeviceId,
        prefixes: &[ward_shared::routes::Prefix],
        now_ms: i64,
    ) -> Result<()> {
        routes::set_advertised(self, device, prefixes, now_ms)
    }

    fn approve_routes(
        &self,
        device: DeviceId,
        target: &str,
        approve: &[ward_shared::routes::Prefix],
        revoke: &[ward_shared::routes::Prefix],
        actor: &str,
        now_ms: i64,
    ) -> Result<()> {
        routes::approve(self, device, target, approve, revoke, actor, now_ms)
    }

    fn issue_lease(
        &self,
        device: DeviceId,
        key: WgPublicKey,
        ttl_ms: i64,
        now_ms: i64,
    ) -> Result<LeaseRow> {
        leases::issue_lease(self, device, key, ttl_ms, now_ms)
    }

    fn revoke_leases(
        &self,
        device: DeviceId,
        keep_serial: Option<u64>,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<u64>> {
        leases::revoke_leases(self, device, keep_serial, reason, now_ms)
    }

    fn active_leases(&self, now_ms: i64) -> Result<Vec<LeaseRow>> {
        leases::active_leases(self, now_ms)
    }

    fn lease_counts(&self) -> Result<BTreeMap<DeviceId, i64>> {
        leases::lease_counts(self)
    }

    fn store_flows_relabeled(
        &self,
        reporter: DeviceId,
        received: &ward_shared::flows::FlowReport,
        relabeled: &ward_shared::flows::FlowReport,
        keep_after_ms: i64,
        now_ms: i64,
    ) -> Result<FlowsStored> {
        self.with_tx(|tx| {
            flows::store_flows_tx(tx, reporter, received, relabeled, keep_after_ms, now_ms)
        })
    }

    fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>> {
        flows::flows(self, q)
    }

    fn flow_sources(&self) -> Result<Vec<FlowSource>> {
        flows::flow_sources(self)
    }

    fn prune_flows(&self, before_ms: i64, max_rows: usize) -> Result<u64> {
        self.with_tx(|tx| flows::prune_tx(tx, before_ms, max_rows))
    }

    fn suggestion_marks(&self) -> Result<Vec<SuggestionMark>> {
        suggestions::marks(self)
    }

    fn mark_suggestion(&self, m: &SuggestionMark) -> Result<()> {
        self.with_tx(|tx| suggestions::mark_tx(tx, m))
    }

    fn append_audit(&self, a: Audit<'_>, now_ms: i64) -> Result<()> {
        audit::append_audit(self, a, now_ms)
    }

    fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        audit::audit_log(self, limit)
    }

    fn audit_log_of(&self, actions: &[&str], limit: i64) -> Result<Vec<AuditEntry>> {
        audit::audit_log_of(self, actions, limit)
    }

    fn audit_counts_since(&self, after_seq: i64) -> Result<(BTreeMap<String, u64>, i64)> {
        audit::audit_counts_since(self, after_seq)
    }

    fn verify_audit(&self) -> Result<AuditVerdict> {
        audit::verify_audit(self)
    }

    fn append_maturity(&self, trigger: &str, assessment: &str, now_ms: i64) -> Result<i64> {
        self.with_tx(|tx| maturity::append_tx(tx, trigger, assessment, now_ms))
    }

    fn maturity_history(&self) -> Result<MaturityChain> {
        self.with_tx(maturity::history_tx)
    }

    fn try_enroll(
        &self,
        spec: EnrollSpec<'_>,
        pools: &AddressPools,
        issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
        now_ms: i64,
    ) -> Result<(Device, Vec<u8>)> {
        self.with_tx(|tx| tokens::enroll_tx(tx, &spec, pools, issue, now_ms))
    }

    fn journal_narrowing(&self, change: Narrowing, now_ms: i64) -> Result<()> {
        let mut g = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = g.as_mut() else {
            return Err(StoreError::Journal("this store has no journal".into()));
        };
        j.append(change.clone(), now_ms)
            .map_err(|e| StoreError::Journal(e.to_string()))?;
        tracing::warn!(
            ?change,
            "the database cannot be written: narrowing change kept in the journal"
        );
        Ok(())
    }

    fn journal_pending(&self) -> usize {
        let g = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .and_then(|j| j.pending().ok())
            .map_or(0, |p| p.len())
    }

    fn flush_journal(&self, now_ms: i64) -> Result<usize> {
        let mut g = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let Some(j) = g.as_mut() else { return Ok(0) };
        let pending = j
            .pending()
            .map_err(|e| StoreError::Journal(e.to_string()))?;
        if pending.is_empty() {
            return Ok(0);
        }
        const ACTOR: &str = "admin (journal)";
        for e in &pending {
            let r = match &e.change {
                Narrowing::RevokeDevice { device } => {
                    self.revoke_device(device, ACTOR, now_ms).map(|_| ())
                }
                Narrowing::DisableUser { user } => match Name::parse("user name", user) {
                    Ok(n) => self.set_user_disabled(&n, true, ACTOR, now_ms).map(|_| ()),
                    Err(err) => Err(StoreError::Invalid(err.to_string())),
                },
                Narrowing::QuarantineDevice { device, reason } => {
                    devices::device_by_name(self, device).and_then(|d| {
                        let q = Quarantine {
                            since_ms: e.at_ms,
                            reason: reason.clone(),
                            automatic: false,
                        };
                        self.set_quarantine(d.id, Some(&q), ACTOR, now_ms)
                            .map(|_| ())
                    })
                }
            };
            match r {
                Ok(()) => {
                    tracing::info!(change = ?e.change, "journaled change written to the database")
                }
                // Already so (revoked twice, a device gone): nothing left to do.
                Err(err) if !err.is_storage_fault() => {
                    tracing::warn!(change = ?e.change, error = %err, "journaled change not applied")
                }
                Err(err) => return Err(err),
            }
        }
        j.clear().map_err(|e| StoreError::Journal(e.to_string()))?;
        Ok(pending.len())
    }

    fn storage_health(&self) -> StorageHealth {
        StorageHealth {
            write_errors: self.health.write_errors.load(Ordering::Relaxed),
            checkpoint_errors: self.health.checkpoint_errors.load(Ordering::Relaxed),
            last_error: self
                .health
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            integrity: self
                .health
                .integrity
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            anchored: self.anchor.is_some(),
            journal_pending: self.journal_pending(),
        }
    }
}
