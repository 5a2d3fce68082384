//! The coordinator's data directory: created once by `init`, read by everything else.
//!
//! ```text
//! DIR/ (0700)
//!   config.json      public address, overlay pools            (0600)
//!   ca.der           control-channel CA certificate            (0644 inside a 0700 dir)
//!   ca.key           CA private key, PEM                       (0600)
//!   lease.key        Ed25519 lease-signing key seed, hex       (0600)
//!   audit.key        audit anchor HMAC key, hex                (0600)
//!   audit.checkpoint audit chain checkpoint {rows, head, time, MAC} (0600)
//!   narrowing.journal revocations etc. the database could not take, 16 KiB pre-allocated (0600)
//!   ward.db          SQLite (WAL) database                     (0600)
//!                    (absent for an instance on PostgreSQL: `init --database URL`, then
//!                    `serve` with the URL; config.json records `"database": "postgres"`)
//!   admin.sock       admin socket of the running coordinator   (0600)
//!   replica.id       this replica's id, made at its first `serve` (0600)
//! ```
//!
//! Only `init` creates `ward.db`; `serve` opens it with [`DataDir::open_store`], which refuses a
//! missing or empty database, a failed integrity check, and a database the audit checkpoint
//! says has lost acknowledged writes (see [`crate::store::anchor`]).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ward_shared::addr::AddressPools;

use crate::pki::Ca;
use crate::store::anchor::{AuditKey, Checkpoint};
use crate::store::{Anchor, AuditVerdict, SqliteStore, Store, StoreError, VerdictKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// HOST:PORT devices dial first; carried in every enrollment token.
    pub public_addr: String,
    /// The instance's other coordinator addresses (replicas), in the order devices try them
    /// after `public_addr`; carried in enrollment tokens and netmaps. Absent in instances made
    /// before several addresses existed: one address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternate_addrs: Vec<String>,
    pub pools: AddressPools,
    pub created_ms: i64,
    /// The DNS domain device names are published under; instances made before it use
    /// [`ward_shared::names::DEFAULT_DNS_DOMAIN`].
    #[serde(default)]
    pub dns_domain: ward_shared::names::DnsDomain,
    /// Which database the instance keeps its state in. The PostgreSQL URL itself (with its
    /// password) is never written here: `serve` is given it (`--database`,
    /// `WARD_DATABASE_URL`).
    #[serde(default)]
    pub database: DatabaseKind,
}

/// The store backend of an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseKind {
    /// `ward.db` in the data directory.
    #[default]
    Sqlite,
    /// A PostgreSQL database several coordinators may share.
    Postgres,
}

impl Config {
    /// Every address devices may dial, `public_addr` first.
    pub fn public_addrs(&self) -> Vec<String> {
        std::iter::once(self.public_addr.clone())
            .chain(self.alternate_addrs.iter().cloned())
            .collect()
    }

    /// Replaces the address list (first = `public_addr`), checked: at least one, at most
    /// [`ward_shared::token::MAX_COORDINATORS`], each `HOST:PORT`, no duplicates.
    pub fn set_public_addrs(&mut self, addrs: &[String]) -> Result<()> {
        validate_public_addrs(addrs)?;
        self.public_addr = addrs[0].clone();
        self.alternate_addrs = addrs[1..].to_vec();
        Ok(())
    }
}

#[derive(Clone)]
pub struct DataDir {
    pub path: PathBuf,
    /// The PostgreSQL URL (`--database`), if the instance's database is PostgreSQL.
    pub database_url: Option<String>,
    /// The PostgreSQL connection pool's size and wait (`--database-pool`, `--database-pool-wait`).
    pub database_pool: crate::store::postgres::PoolOptions,
}

/// Runs `f` off the async runtime: the PostgreSQL client blocks on a runtime of its own, which
/// a thread already driving async tasks must not do.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            database_url: None,
            database_pool: Default::default(),
        }
    }

    /// This data directory with a PostgreSQL connection pool of these options.
    pub fn with_database_pool(mut self, pool: crate::store::postgres::PoolOptions) -> Self {
        self.database_pool = pool;
        self
    }

    /// This data directory with its instance's state in the PostgreSQL database at `url`
    /// (`None`: the SQLite file `ward.db`).
    pub fn with_database(mut self, url: Option<String>) -> Result<Self> {
        if let Some(u) = &url {
            if !crate::store::postgres::is_postgres_url(u) {
                bail!(
                    "--database must be a postgres:// or postgresql:// URL, got {}",
                    crate::store::postgres::redact(u)
                );
            }
        }
        self.database_url = url;
        Ok(self)
    }

    /// The database as shown to people (a PostgreSQL password redacted).
    pub fn database_display(&self) -> String {
        match &self.database_url {
            Some(u) => crate::store::postgres::redact(u),
            None => self.db_path().display().to_string(),
        }
    }

    /// Checks that the database given matches the one the instance was created with.
    fn check_kind(&self) -> Result<()> {
        let kind = match self.load_config() {
            Ok(c) => c.database,
            // Reported by whoever needs the config; the SQLite checks name the missing file.
            Err(_) => return Ok(()),
        };
        match (kind, &self.database_url) {
            (DatabaseKind::Postgres, None) => bail!(
                "this coordinator keeps its state in PostgreSQL: give the database URL with \
                 --database or WARD_DATABASE_URL"
            ),
            (DatabaseKind::Sqlite, Some(_)) => bail!(
                "this coordinator keeps its state in {} (SQLite); --database is only for an \
                 instance created with `init --database`",
                self.db_path().display()
            ),
            _ => Ok(()),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }
    pub fn db_path(&self) -> PathBuf {
        self.path.join("ward.db")
    }
    pub fn admin_socket(&self) -> PathBuf {
        self.path.join("admin.sock")
    }
    pub fn audit_key_path(&self) -> PathBuf {
        self.path.join("audit.key")
    }
    pub fn checkpoint_path(&self) -> PathBuf {
        self.path.join("audit.checkpoint")
    }
    pub fn journal_path(&self) -> PathBuf {
        self.path.join("narrowing.journal")
    }
    pub fn replica_id_path(&self) -> PathBuf {
        self.path.join("replica.id")
    }

    /// This data directory's replica id: made at its first `serve` (16 random hex digits)
    /// and kept, so a restarted replica is the same row in `status`.
    pub fn replica_id(&self) -> Result<String> {
        let p = self.replica_id_path();
        if !p.exists() {
            let mut id = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
            write_private(&p, hex::encode(id).as_bytes())?;
        }
        let raw = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let id = raw.trim().to_string();
        if id.is_empty()
            || id.len() > 64
            || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!(
                "{} is corrupt: delete it and a new replica id is made at the next start",
                p.display()
            );
        }
        Ok(id)
    }

    /// Opens the existing database for `serve`, anchored, and checks it before anything is
    /// served: the file exists and is not empty, `PRAGMA quick_check` passes, and the audit
    /// chain matches its checkpoint. Every refusal names the recovery.
    pub fn open_store(&self, now_ms: i64) -> Result<SqliteStore> {
        off_runtime(|| self.open_store_here(now_ms))
    }

    fn open_store_here(&self, now_ms: i64) -> Result<SqliteStore> {
        let (store, adopted) = self.open_anchored()?;
        let check = store.quick_check(now_ms)?;
        if !check.ok {
            bail!(
                "refusing to serve: the database integrity check FAILED ({}). Stop, copy {dir} aside, \
                 and restore ward.db from a backup (or salvage it with `sqlite3 ward.db .recover`), \
                 then start again",
                check.detail,
                dir = self.path.display()
            );
        }
        if adopted {
            let rows = store.adopt_anchor(now_ms)?;
            tracing::warn!(
                rows,
                "the audit log had no anchor yet: anchored it as it stands now"
            );
        }
        let v = store.verify_audit()?;
        if v.kind != VerdictKind::Intact {
            bail!("refusing to serve: {}. {}", v.message, self.recovery(&v));
        }
        tracing::info!(rows = v.rows, message = %v.message, "audit log checked against its checkpoint");
        store
            .attach_journal(&self.journal_path())
            .context("refusing to serve: the narrowing journal cannot be opened")?;
        let pending = store.journal_pending();
        match store.flush_journal(now_ms) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                changes = n,
                "narrowing changes from the journal written to the database"
            ),
            Err(e) => bail!(
                "refusing to serve: {pending} narrowing change(s) (revocations, disables, \
                 quarantines) are in {} and the database cannot take them ({e}). Free space on \
                 the disk holding {} and start again",
                self.journal_path().display(),
                self.path.display()
            ),
        }
        Ok(store)
    }

    /// What the operator can do about a verdict.
    fn recovery(&self, v: &AuditVerdict) -> String {
        let accept = format!(
            "ward-coordinator --data-dir {} audit accept-rollback --i-understand",
            self.path.display()
        );
        match v.kind {
            VerdictKind::Intact => String::new(),
            VerdictKind::RolledBack | VerdictKind::Truncated => format!(
                "Changes recorded in the lost rows (revocations included) may be undone. Restore \
                 ward.db from a copy at least as new as the checkpoint, or accept the loss with \
                 `{accept}` (recorded in the audit log) and re-apply the lost changes"
            ),
            VerdictKind::Unanchored => format!(
                "Restore audit.checkpoint from a backup, or re-anchor the log as it stands with `{accept}`"
            ),
            VerdictKind::Tampered => "Restore ward.db and the audit files from a backup you trust".into(),
        }
    }

    /// `audit accept-rollback`: records the operator's decision in the audit log and anchors the
    /// chain as it stands. Refuses an intact log and rows that were edited in place.
    pub fn accept_rollback(&self, now_ms: i64) -> Result<AuditVerdict> {
        off_runtime(|| self.accept_rollback_here(now_ms))
    }

    fn accept_rollback_here(&self, now_ms: i64) -> Result<AuditVerdict> {
        let (store, _) = self.open_anchored()?;
        let v = store.verify_audit()?;
        match v.kind {
            VerdictKind::Intact => bail!("nothing to accept: {}", v.message),
            VerdictKind::Tampered if !store.verify_chain()?.ok || v.lost.is_none() => {
                bail!("refusing: {}. {}", v.message, self.recovery(&v))
            }
            _ => {}
        }
        let detail = serde_json::json!({
            "found": v.kind,
            "lost_rows": v.lost,
            "message": v.message,
        });
        let rows = store.accept_rollback(detail, "admin", now_ms)?;
        tracing::warn!(rows, found = ?v.kind, "audit rollback accepted by the operator; log re-anchored");
        Ok(v)
    }

    /// Why the shared database could not be opened. One that does not answer (down, or no
    /// connection within the pool's timeout) is named unreachable: nothing can be served or
    /// checked without it (the audit chain, the registry, every write), so the caller stops.
    fn open_error(&self, e: StoreError) -> anyhow::Error {
        if e.is_storage_fault() {
            tracing::error!(database = %self.database_display(), error = %e, "the database is unreachable");
            anyhow::anyhow!(
                "the database {} is unreachable ({e}): start it (or correct --database), then run this again",
                self.database_display()
            )
        } else {
            anyhow::Error::new(e)
                .context(format!("opening the database {}", self.database_display()))
        }
    }

    /// The existing database with its anchor; `true` when neither the key nor the checkpoint
    /// exist yet (a data directory from before anchoring), so the caller adopts the log.
    fn open_anchored(&self) -> Result<(SqliteStore, bool)> {
        self.check_kind()?;
        if let Some(url) = &self.database_url {
            let anchor = Anchor {
                key: self.load_audit_key()?,
                checkpoint: self.checkpoint_path(),
            };
            let store = SqliteStore::open_postgres_with(url, Some(anchor), self.database_pool)
                .map_err(|e| self.open_error(e))?;
            return Ok((store, false));
        }
        let db = self.db_path();
        // The database first: a data dir without one gets no new audit key either.
        let present = fs::metadata(&db).map(|m| m.len() > 0).unwrap_or(false);
        let key_path = self.audit_key_path();
        let adopted = present && !key_path.exists() && !self.checkpoint_path().exists();
        if adopted {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
            write_private(&key_path, hex::encode(key).as_bytes())?;
        }
        let key = if present {
            self.load_audit_key()?
        } else {
            // Not used: opening the missing or empty database below fails first.
            AuditKey::from_bytes([0; 32])
        };
        let anchor = Anchor {
            key,
            checkpoint: self.checkpoint_path(),
        };
        let store = SqliteStore::open_existing(&db, Some(anchor)).map_err(|e| match e {
            StoreError::Missing(why) => anyhow::anyhow!(
                "refusing to serve: the database is missing ({why}). `serve` never creates a \
                 database; only `init` does. Restore ward.db (with ward.db-wal, if you have it) \
                 into {} from a backup, or run `ward-coordinator init` in a new, empty directory \
                 to start a new coordinator",
                self.path.display()
            ),
            e => anyhow::Error::new(e).context(format!("opening {}", db.display())),
        })?;
        Ok((store, adopted))
    }

    pub fn load_audit_key(&self) -> Result<AuditKey> {
        let raw = fs::read_to_string(self.audit_key_path()).context(
            "reading audit.key (the audit checkpoint exists without its key: restore audit.key from a backup)",
        )?;
        let bytes = hex::decode(raw.trim()).context("audit.key is corrupt")?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("audit.key is corrupt (not 32 bytes)"))?;
        Ok(AuditKey::from_bytes(key))
    }

    /// Creates a new instance; refuses to touch an existing one.
    pub fn init(&self, public_addr: &str, now_ms: i64) -> Result<Config> {
        self.init_with(&[public_addr.to_string()], Default::default(), now_ms)
    }

    /// [`DataDir::init`] with every coordinator address (the first is dialled first) and the
    /// DNS domain device names are published under.
    pub fn init_with(
        &self,
        public_addrs: &[String],
        dns_domain: ward_shared::names::DnsDomain,
        now_ms: i64,
    ) -> Result<Config> {
        validate_public_addrs(public_addrs)?;
        if let Some(url) = &self.database_url {
            // Before anything is written: the database must be reachable and hold no instance.
            let (users, audit) = off_runtime(|| -> Result<(usize, usize)> {
                let s = SqliteStore::open_postgres(url, None)
                    .with_context(|| format!("opening the database {}", self.database_display()))?;
                Ok((s.list_users()?.len(), s.audit_log(1)?.len()))
            })?;
            if users > 0 || audit > 0 {
                bail!(
                    "the database {} already holds a Ward instance; refusing to initialise \
                     another one in it",
                    self.database_display()
                );
            }
        }
        if self.config_path().exists() || self.db_path().exists() {
            bail!(
                "{} already holds a Ward coordinator; refusing to overwrite it",
                self.path.display()
            );
        }
        if self.path.exists()
            && fs::read_dir(&self.path)
                .with_context(|| format!("reading {}", self.path.display()))?
                .next()
                .is_some()
        {
            bail!(
                "{} exists and is not empty; refusing to initialise a coordinator there",
                self.path.display()
            );
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .with_context(|| format!("creating {}", self.path.display()))?;
        fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))?;

        let ca = Ca::generate(now_ms)?;
        write_private(&self.path.join("ca.key"), ca.key_pem().as_bytes())?;
        write_private(&self.path.join("ca.der"), &ca.cert_der)?;
        let lease_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        write_private(
            &self.path.join("lease.key"),
            hex::encode(lease_key.to_bytes()).as_bytes(),
        )?;
        let mut gid = [0u8; 5];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut gid);
        let config = Config {
            public_addr: public_addrs[0].clone(),
            alternate_addrs: public_addrs[1..].to_vec(),
            pools: AddressPools::from_random(gid),
            created_ms: now_ms,
            dns_domain,
            database: match self.database_url {
                Some(_) => DatabaseKind::Postgres,
                None => DatabaseKind::Sqlite,
            },
        };
        write_private(
            &self.config_path(),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )?;
        let mut audit_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut audit_key);
        write_private(&self.audit_key_path(), hex::encode(audit_key).as_bytes())?;
        if self.database_url.is_none() {
            drop(SqliteStore::open(&self.db_path())?);
        }
        Checkpoint::new(&AuditKey::from_bytes(audit_key), 0, &[0u8; 32], now_ms)
            .write_atomic(&self.checkpoint_path())?;
        crate::store::journal::Journal::open_or_create(&self.journal_path())?;
        for f in ["ward.db", "ward.db-wal", "ward.db-shm"] {
            let p = self.path.join(f);
            if p.exists() {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
            }
        }
        Ok(config)
    }

    pub fn load_config(&self) -> Result<Config> {
        let p = self.config_path();
        let raw = fs::read(&p).with_context(|| {
            format!(
                "no coordinator at {} (run `ward-coordinator init` first)",
                self.path.display()
            )
        })?;
        serde_json::from_slice(&raw).with_context(|| format!("{} is corrupt", p.display()))
    }

    /// Rewrites config.json with a new address list (`ward-coordinator addrs set`); a running
    /// coordinator puts the new list in the netmaps of sessions that open after its restart,
    /// and tokens minted from then on carry it.
    pub fn save_public_addrs(&self, addrs: &[String]) -> Result<Config> {
        let mut config = self.load_config()?;
        config.set_public_addrs(addrs)?;
        // Atomic replace: a new 0600 file beside it, then rename over the old one.
        let tmp = self.path.join(".config.json.tmp");
        let _ = fs::remove_file(&tmp);
        write_private(&tmp, serde_json::to_string_pretty(&config)?.as_bytes())?;
        fs::rename(&tmp, self.config_path())
            .with_context(|| format!("replacing {}", self.config_path().display()))?;
        Ok(config)
    }

    pub fn load_lease_key(&self) -> Result<ed25519_dalek::SigningKey> {
        let raw = fs::read_to_string(self.path.join("lease.key")).context("reading lease.key")?;
        let bytes = hex::decode(raw.trim()).context("lease.key is corrupt")?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("lease.key is corrupt (not 32 bytes)"))?;
        Ok(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    pub fn load_ca(&self) -> Result<Ca> {
        let der = fs::read(self.path.join("ca.der")).context("reading ca.der")?;
        let key = fs::read_to_string(self.path.join("ca.key")).context("reading ca.key")?;
        Ca::load(der, &key)
    }
}

/// A whole `--public-addr` list: one to [`ward_shared::token::MAX_COORDINATORS`] addresses,
/// each valid, none repeated.
fn validate_public_addrs(addrs: &[String]) -> Result<()> {
    if addrs.is_empty() {
        bail!("give at least one --public-addr");
    }
    if addrs.len() > ward_shared::token::MAX_COORDINATORS {
        bail!(
            "at most {} coordinator addresses, got {}",
            ward_shared::token::MAX_COORDINATORS,
            addrs.len()
        );
    }
    for (i, a) in addrs.iter().enumerate() {
        validate_public_addr(a)?;
        if addrs[..i].contains(a) {
            bail!("--public-addr {a:?} is given twice");
        }
    }
    Ok(())
}

/// `--public-addr` is `HOST:PORT` with a DNS name or IPv4 literal, or `[IPV6]:PORT`; an IPv6
/// literal must be bracketed, since its colons would otherwise run into the port.
fn validate_public_addr(s: &str) -> Result<()> {
    let Some((host, port)) = s.rsplit_once(':') else {
        bail!("--public-addr must be HOST:PORT, got {s:?}");
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("--public-addr port {port:?} is not a number"))?;
    if port == 0 || host.is_empty() || s.len() > ward_shared::token::MAX_ADDR_LEN {
        bail!("--public-addr must be HOST:PORT with a non-zero port, got {s:?}");
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(ip) = inner.strip_suffix(']') else {
            bail!("--public-addr has an unclosed '[' in {s:?}");
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("--public-addr [{ip}] is not an IPv6 address");
        }
    } else if host.contains(':') || host.contains(']') {
        bail!("--public-addr: write an IPv6 address in brackets, as [ADDR]:PORT, got {s:?}");
    }
    Ok(())
}

/// Writes a file only the owner can read, durably.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_does_not_answer_is_refused_by_name_within_seconds() {
        use crate::store::postgres::testpg;
        if !testpg::available() {
            return;
        }
        let cluster = testpg::Cluster::start();
        // A password in the URL, to check it is never shown.
        let url = cluster
            .create_database()
            .replace("postgresql://ward@", "postgresql://ward:sekrit@");
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("c"))
            .with_database(Some(url))
            .unwrap();
        dd.init("10.0.0.1:7443", 1_800_000_000_000).unwrap();
        drop(dd.open_store(1_800_000_000_001).unwrap());
        cluster.pg_stop();
        let started = std::time::Instant::now();
        let Err(err) = dd.open_store(1_800_000_000_002) else {
            panic!("opened a stopped database")
        };
        let err = format!("{err:#}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.starts_with(&format!(
                "the database {} is unreachable",
                dd.database_display()
            )),
            "{err}"
        );
        assert!(err.contains("then run this again"), "{err}");
        assert!(!err.contains("sekrit"), "{err}");
        cluster.pg_start();
        drop(dd.open_store(1_800_000_000_003).unwrap());
    }

    #[test]
    fn init_refuses_existing_instance() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("c"));
        dd.init("10.0.0.1:7443", 1_800_000_000_000).unwrap();
        let mode = fs::metadata(&dd.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key_mode = fs::metadata(dd.path.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        let err = dd.init("10.0.0.1:7443", 1).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert!(dd.load_config().is_ok());
        assert!(dd.load_ca().is_ok());
        assert!(dd.load_lease_key().is_ok());
    }

    #[test]
    fn the_dns_domain_is_kept_and_defaults_for_older_configs() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("c"));
        let domain = ward_shared::names::DnsDomain::parse("corp.example").unwrap();
        dd.init_with(&["10.0.0.1:7443".into()], domain.clone(), 1)
            .unwrap();
        assert_eq!(dd.load_config().unwrap().dns_domain, domain);
        // A config.json written before the domain existed reads as the default domain.
        let mut v: serde_json::Value =
            serde_json::from_slice(&fs::read(dd.config_path()).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("dns_domain");
        fs::write(dd.config_path(), v.to_string()).unwrap();
        assert_eq!(
            dd.load_config().unwrap().dns_domain.as_str(),
            ward_shared::names::DEFAULT_DNS_DOMAIN
        );
    }

    #[test]
    fn a_data_dir_from_before_anchoring_is_anchored_at_its_first_start() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("c"));
        dd.init("10.0.0.1:7443", 1).unwrap();
        fs::remove_file(dd.audit_key_path()).unwrap();
        fs::remove_file(dd.checkpoint_path()).unwrap();
        fs::remove_file(dd.journal_path()).unwrap();
        {
            let s = SqliteStore::open(&dd.db_path()).unwrap();
            let n = ward_shared::names::Name::parse("user", "old").unwrap();
            s.add_user(&n, &[], "admin", 2).unwrap();
        }
        let s = dd.open_store(3).unwrap();
        assert!(dd.audit_key_path().exists() && dd.checkpoint_path().exists());
        assert!(dd.journal_path().exists());
        let log = s.audit_log(10).unwrap();
        assert_eq!(log.last().unwrap().action, "audit.anchored");
        assert!(s.verify_audit().unwrap().ok);
        drop(s);
        // Without its database, no key is made and the error names the recovery.
        let dd2 = DataDir::new(tmp.path().join("d"));
        dd2.init("10.0.0.1:7443", 1).unwrap();
        for p in [dd2.db_path(), dd2.audit_key_path(), dd2.checkpoint_path()] {
            fs::remove_file(p).unwrap();
        }
        let err = format!("{:#}", dd2.open_store(3).err().unwrap());
        assert!(err.contains("only `init` does"), "{err}");
        assert!(!dd2.audit_key_path().exists() && !dd2.db_path().exists());
    }

    #[test]
    fn several_addresses_are_stored_changed_and_old_configs_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dd = DataDir::new(tmp.path().join("c"));
        let addrs: Vec<String> = vec!["10.0.0.1:7443".into(), "10.0.0.2:7443".into()];
        let cfg = dd.init_with(&addrs, Default::default(), 1).unwrap();
        assert_eq!(cfg.public_addrs(), addrs);
        assert_eq!(dd.load_config().unwrap().public_addrs(), addrs);
        // Changed later; a bad list changes nothing.
        let new: Vec<String> = vec!["[fd00::3]:7443".into(), "10.0.0.1:7443".into()];
        assert_eq!(dd.save_public_addrs(&new).unwrap().public_addrs(), new);
        for bad in [
            vec![],
            vec!["a:1".to_string(), "a:1".to_string()],
            vec!["nope".to_string()],
            (0..9).map(|i| format!("h{i}:1")).collect(),
        ] {
            assert!(dd.save_public_addrs(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(dd.load_config().unwrap().public_addrs(), new);
        // A config written before the list existed loads as one address.
        let mut raw: serde_json::Value =
            serde_json::from_slice(&fs::read(dd.config_path()).unwrap()).unwrap();
        raw.as_object_mut().unwrap().remove("alternate_addrs");
        fs::write(dd.config_path(), serde_json::to_vec(&raw).unwrap()).unwrap();
        assert_eq!(dd.load_config().unwrap().public_addrs(), ["[fd00::3]:7443"]);
        // init refuses a repeated address.
        let dd2 = DataDir::new(tmp.path().join("d"));
        assert!(dd2
            .init_with(&[addrs[0].clone(), addrs[0].clone()], Default::default(), 1)
            .is_err());
    }

    #[test]
    fn public_addr_is_validated() {
        assert!(validate_public_addr("coord.example:7443").is_ok());
        assert!(validate_public_addr("[::1]:7443").is_ok());
        assert!(validate_public_addr("nope").is_err());
        assert!(validate_public_addr("host:0").is_err());
        assert!(validate_public_addr("host:99999").is_err());
        assert!(validate_public_addr("10.99.0.1:7443").is_ok());
        assert!(validate_public_addr("[fd00:77::1]:7443").is_ok());
        // An IPv6 literal without brackets, or with broken ones, is refused.
        assert!(validate_public_addr("fd00:77::1:7443").is_err());
        assert!(validate_public_addr("[fd00:77::1:7443").is_err());
        assert!(validate_public_addr("fd00:77::1]:7443").is_err());
        assert!(validate_public_addr("[not-v6]:7443").is_err());
        assert!(validate_public_addr("[10.0.0.1]:7443").is_err());
    }
}
