//! The PostgreSQL backend of the store: a pool of connections (r2d2 + the synchronous
//! `postgres` client, called from the server's blocking threads), the schema migrations applied
//! once under a session advisory lock, the translation of the store's statements to
//! PostgreSQL's dialect, and the value conversion between rusqlite's value model (which the
//! table modules are written in) and PostgreSQL's column types.
//!
//! Every store transaction first takes one cluster-wide transaction-level advisory lock
//! ([`WRITE_LOCK`]): transactions of all replicas on the same database run one at a time, as
//! SQLite's `BEGIN IMMEDIATE` makes them on one file. That is what keeps a single-use token
//! redeemed exactly once and the audit hash chain unforked when several coordinators write at
//! once (each statement in `READ COMMITTED` sees every transaction committed before the lock
//! was granted).

use postgres::types::{FromSql, IsNull, ToSql, Type};
use postgres::NoTls;
use r2d2_postgres::PostgresConnectionManager;
use rusqlite::types::Value;
use std::cell::RefCell;
use std::str::FromStr;
use std::time::Duration;

use super::db::Tx;
use super::schema::MIGRATIONS;
use super::{Result, StoreError};

pub mod listen;
#[cfg(test)]
pub mod testpg;
#[cfg(test)]
mod tests;

/// The key of the advisory lock every store transaction holds (ASCII "wardstor").
pub const WRITE_LOCK: i64 = 0x7761_7264_7374_6f72;
/// The key of the session advisory lock migrations run under (ASCII "wardmigr").
pub const MIGRATE_LOCK: i64 = 0x7761_7264_6d69_6772;

/// A PostgreSQL error, carried inside [`rusqlite::Error::ToSqlConversionFailure`] so the table
/// modules' `rusqlite::Result` holds both backends' errors; it becomes
/// [`StoreError::Db`], a storage fault.
#[derive(Debug)]
pub struct PgFault(pub String);

impl std::fmt::Display for PgFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "postgresql: {}", self.0)
    }
}

impl std::error::Error for PgFault {}

/// The error with its causes (a driver error's own text is only "db error").
pub fn fault(e: impl std::error::Error) -> rusqlite::Error {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    rusqlite::Error::ToSqlConversionFailure(Box::new(PgFault(msg)))
}

fn fault_msg(msg: String) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(PgFault(msg)))
}

/// Whether `url` names a PostgreSQL database (`postgres://`, `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with its password (if any) replaced by `***`, for logs and status.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, tail) = match rest.find('@') {
        Some(at) if !rest[..at].contains('/') => (&rest[..at], &rest[at..]),
        _ => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{tail}"),
        None => url.to_string(),
    }
}

/// `host[:port]/dbname` of a connection configuration: the password never, the user never
/// (it is not secret, but it is not where the database is either).
pub fn location(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(p) if *p != 5432 => format!("{host}:{p}"),
                _ => host,
            }
        })
        .collect();
    let host = if hosts.is_empty() {
        "localhost".to_string()
    } else {
        hosts.join(",")
    };
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}/{db}")
}

type Pool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// How many connections one coordinator keeps to PostgreSQL, and how long a request waits for
/// a free one before it fails (closed: the request is refused, nothing is widened). A wave of
/// sessions (a replica's devices arriving after a failover) issues many leases at once; each
/// replica may hold `size` connections plus one for `LISTEN`, so `replicas × (size + 1)` must
/// stay under the server's `max_connections` (100 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    size: u32,
    wait: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            size: 16,
            wait: Duration::from_secs(5),
        }
    }
}

impl PoolOptions {
    /// Largest pool a coordinator may ask for.
    pub const MAX_SIZE: u32 = 500;
    /// Longest wait for a connection (a request that waits longer holds its device's session).
    pub const MAX_WAIT: Duration = Duration::from_secs(120);

    /// `size` connections (1..=[`Self::MAX_SIZE`]), a wait of `wait` (100 ms..=[`Self::MAX_WAIT`]).
    pub fn new(size: u32, wait: Duration) -> std::result::Result<Self, String> {
        if !(1..=Self::MAX_SIZE).contains(&size) {
            return Err(format!(
                "database pool size {size} is out of range (1 to {})",
                Self::MAX_SIZE
            ));
        }
        if wait < Duration::from_millis(100) || wait > Self::MAX_WAIT {
            return Err(format!(
                "database pool wait {} ms is out of range (100 ms to {} s)",
                wait.as_millis(),
                Self::MAX_WAIT.as_secs()
            ));
        }
        Ok(Self { size, wait })
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn wait(&self) -> Duration {
        self.wait
    }
}

/// Runs `f`, which uses the PostgreSQL client, where it may block: the client drives each
/// connection with a small runtime of its own, which must not be started (or dropped) on a
/// thread that is driving async tasks. On the multi-threaded runtime's threads this is
/// `block_in_place`; on the blocking pool and plain threads it is a plain call.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The connection pool of one store.
pub struct PgBackend {
    /// Always `Some` until dropped (see `Drop`).
    pool: Option<Pool>,
    /// The URL with the password redacted.
    pub display_url: String,
    /// The connection settings (with the password), for the `LISTEN` connection.
    config: postgres::Config,
}

impl PgBackend {
    /// Connects to `url` (the password from the URL or `PGPASSWORD`) and brings the schema up
    /// to date. A database that cannot be reached is a [`StoreError::Db`].
    pub fn connect(url: &str, pool: PoolOptions) -> Result<Self> {
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("database URL {}: {e}", redact(url))))?;
        if config.get_password().is_none() {
            if let Ok(pw) = std::env::var("PGPASSWORD") {
                config.password(pw);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let manager = PostgresConnectionManager::new(config.clone(), NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(pool.size)
            .min_idle(Some(0))
            .connection_timeout(pool.wait)
            .build_unchecked(manager);
        let b = Self {
            pool: Some(pool),
            display_url: redact(url),
            config,
        };
        blocking(|| b.migrate())?;
        Ok(b)
    }

    fn client(&self) -> Result<r2d2::PooledConnection<PostgresConnectionManager<NoTls>>> {
        let pool = self
            .pool
            .as_ref()
            .ok_or_else(|| StoreError::Db(fault_msg("the connection pool is closed".into())))?;
        pool.get().map_err(|e| {
            StoreError::Db(fault_msg(format!(
                "no connection to {}: {e}",
                self.display_url
            )))
        })
    }

    /// Applies the migrations this database lacks, each in its own transaction, all under
    /// [`MIGRATE_LOCK`]: a second coordinator starting at the same time waits, then finds the
    /// schema current.
    fn migrate(&self) -> Result<()> {
        let mut c = self.client()?;
        c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
            .map_err(fault)?;
        let res = (|| -> Result<()> {
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS ward_schema(id BIGINT PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL)",
            )
            .map_err(fault)?;
            let version: i64 = c
                .query_opt("SELECT version FROM ward_schema WHERE id = 1", &[])
                .map_err(fault)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(fault)?
                .unwrap_or(0);
            if version as usize > MIGRATIONS.len() {
                return Err(StoreError::Schema(format!(
                    "database schema version {version} is newer than this coordinator ({})",
                    MIGRATIONS.len()
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                let mut t = c.transaction().map_err(fault)?;
                t.batch_execute(&ddl(sql)).map_err(fault)?;
                t.execute(
                    "INSERT INTO ward_schema(id, version) VALUES (1, $1)
                     ON CONFLICT(id) DO UPDATE SET version = excluded.version",
                    &[&((i + 1) as i64)],
                )
                .map_err(fault)?;
                t.commit().map_err(fault)?;
                tracing::info!(version = i + 1, "database schema migrated");
            }
            Ok(())
        })();
        // Closing the session releases the lock too, should unlocking fail.
        let _ = c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]);
        res
    }

    /// Runs `f` in one transaction holding [`WRITE_LOCK`].
    pub fn with_tx<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        blocking(|| self.with_tx_here(f))
    }

    fn with_tx_here<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut c = self.client()?;
        let mut t = c.transaction().map_err(fault)?;
        t.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
            .map_err(fault)?;
        let tx = Tx::Pg(RefCell::new(t));
        let out = f(&tx)?;
        if let Tx::Pg(t) = tx {
            t.into_inner().commit().map_err(fault)?;
        }
        Ok(out)
    }

    /// Starts this replica's change feed listener on a connection of its own
    /// ([`listen::FeedListener`]).
    pub fn feed_listener(
        &self,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<listen::FeedListener> {
        listen::FeedListener::spawn(self.config.clone(), self.location(), wake)
    }

    /// Where the database is, for logs and `status`: `host[:port]/dbname` (a unix socket
    /// directory as host), never the user or password.
    pub fn location(&self) -> String {
        location(&self.config)
    }

    /// The schema version, read in one round trip (for `status`).
    pub fn schema_version(&self) -> Result<i64> {
        blocking(|| {
            let mut c = self.client()?;
            let v: Option<i64> = c
                .query_opt("SELECT version FROM ward_schema WHERE id = 1", &[])
                .map_err(fault)?
                .map(|r| r.try_get(0))
                .transpose()
                .map_err(fault)?;
            Ok(v.unwrap_or(0))
        })
    }

    /// A round trip to the database, for the periodic health check.
    pub fn ping(&self) -> Result<()> {
        blocking(|| {
            let mut c = self.client()?;
            c.simple_query("SELECT 1").map_err(fault)?;
            Ok(())
        })
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // The pool's connections each own a runtime, which cannot be dropped inside another:
        // close them on a plain thread.
        if let Some(pool) = self.pool.take() {
            let _ = std::thread::spawn(move || drop(pool)).join();
        }
    }
}

/// One migration in PostgreSQL's dialect: `INTEGER` → `BIGINT`, `BLOB` → `BYTEA`, a rowid
/// primary key → an identity column, SQLite's `RAISE` triggers → a PL/pgSQL trigger function.
pub fn ddl(sql: &str) -> String {
    let mut out = String::new();
    let mut in_trigger = false;
    for line in sql.lines() {
        let t = line.trim();
        if t.starts_with("CREATE TRIGGER") {
            in_trigger = !t.ends_with("END;");
            if t.contains("audit_no_update") {
                out.push_str(
                    "CREATE FUNCTION ward_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
                     BEGIN RAISE EXCEPTION 'audit log is append-only'; END $$;
                     CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
                         FOR EACH ROW EXECUTE FUNCTION ward_audit_append_only();\n",
                );
            } else if t.contains("audit_no_delete") {
                out.push_str(
                    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
                         FOR EACH ROW EXECUTE FUNCTION ward_audit_append_only();\n",
                );
            }
            continue;
        }
        if in_trigger {
            in_trigger = !t.ends_with("END;");
            continue;
        }
        let mut l = line.to_string();
        if l.contains("INTEGER PRIMARY KEY AUTOINCREMENT") {
            l = l.replace(
                "INTEGER PRIMARY KEY AUTOINCREMENT",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
            );
        } else if t.ends_with("INTEGER PRIMARY KEY,") {
            l = l.replace(
                "INTEGER PRIMARY KEY,",
                "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,",
            );
        }
        l = l.replace("INTEGER", "BIGINT").replace("BLOB", "BYTEA");
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// One statement in PostgreSQL's dialect: `?N` → `$N`, `INSERT OR IGNORE` → `ON CONFLICT DO
/// NOTHING`, two-argument `MAX`/`MIN` → `GREATEST`/`LEAST`, `json_group_array` → `json_agg`,
/// `IFNULL` → `COALESCE`.
pub fn translate(sql: &str) -> String {
    let mut s = String::with_capacity(sql.len() + 32);
    let mut chars = sql.chars().peekable();
    let (mut next_anon, mut in_str) = (1, false);
    while let Some(c) = chars.next() {
        if c == '\'' {
            in_str = !in_str;
        }
        if in_str || c != '?' {
            s.push(c);
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.next_if(|d| d.is_ascii_digit()) {
            digits.push(d);
        }
        if digits.is_empty() {
            digits = next_anon.to_string();
            next_anon += 1;
        }
        s.push('$');
        s.push_str(&digits);
    }
    let mut s = s.replace("json_group_array(", "json_agg(");
    s = s
        .replace("IFNULL(", "COALESCE(")
        .replace("ifnull(", "COALESCE(");
    s = two_arg(&s, "MAX(", "GREATEST(");
    s = two_arg(&s, "MIN(", "LEAST(");
    if let Some(rest) = s.trim_start().strip_prefix("INSERT OR IGNORE ") {
        let body = rest.trim_end().trim_end_matches(';');
        s = format!("INSERT {body} ON CONFLICT DO NOTHING");
    }
    s
}

/// Renames `name(a, b)` calls with two top-level arguments to `to(a, b)`.
fn two_arg(s: &str, name: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(p) = rest.find(name) {
        let boundary = p == 0
            || !rest.as_bytes()[p - 1].is_ascii_alphanumeric() && rest.as_bytes()[p - 1] != b'_';
        let after = &rest[p + name.len()..];
        let (mut depth, mut comma) = (0i32, false);
        for ch in after.chars() {
            match ch {
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                ',' if depth == 0 => comma = true,
                _ => {}
            }
        }
        out.push_str(&rest[..p]);
        out.push_str(if boundary && comma { to } else { name });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// A statement parameter, encoded by the column type PostgreSQL inferred for it.
#[derive(Debug)]
pub struct PgParam(Value);

pub fn params(vals: &[Value]) -> Vec<PgParam> {
    vals.iter().cloned().map(PgParam).collect()
}

pub fn param_refs(p: &[PgParam]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter().map(|x| x as &(dyn ToSql + Sync)).collect()
}

type BoxErr = Box<dyn std::error::Error + Sync + Send>;

fn mismatch(v: &Value, ty: &Type) -> BoxErr {
    format!("cannot store a {:?} in a {ty} column", v.data_type()).into()
}

impl ToSql for PgParam {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> std::result::Result<IsNull, BoxErr> {
        match &self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Integer(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::UNKNOWN => {
                    i.to_string().to_sql(&Type::TEXT, out)
                }
                _ => Err(mismatch(&self.0, ty)),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(mismatch(&self.0, ty)),
            },
            Value::Text(t) => match *ty {
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    t.as_str().to_sql(&Type::TEXT, out)
                }
                Type::JSON => {
                    out.extend_from_slice(t.as_bytes());
                    Ok(IsNull::No)
                }
                _ => Err(mismatch(&self.0, ty)),
            },
            Value::Blob(b) => match *ty {
                Type::BYTEA => b.as_slice().to_sql(ty, out),
                _ => Err(mismatch(&self.0, ty)),
            },
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// A result column, decoded by its PostgreSQL type into rusqlite's value model.
pub struct PgCell(pub Value);

impl<'a> FromSql<'a> for PgCell {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> std::result::Result<Self, BoxErr> {
        Ok(PgCell(match *ty {
            Type::INT8 => Value::Integer(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Integer(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Integer(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Integer(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::JSONB => Value::Text(String::from_utf8(raw.get(1..).unwrap_or(&[]).to_vec())?),
            Type::NUMERIC => numeric(raw)?,
            _ => Value::Text(String::from_utf8(raw.to_vec())?),
        }))
    }

    fn from_sql_null(_ty: &Type) -> std::result::Result<Self, BoxErr> {
        Ok(PgCell(Value::Null))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// PostgreSQL's binary `NUMERIC` (what `SUM` of a `BIGINT` column gives): an integer when it
/// has no fractional digits, else a float.
fn numeric(raw: &[u8]) -> std::result::Result<Value, BoxErr> {
    let word = |i: usize| -> std::result::Result<i64, BoxErr> {
        let b = raw.get(i * 2..i * 2 + 2).ok_or("short numeric")?;
        Ok(i16::from_be_bytes([b[0], b[1]]) as i64)
    };
    let (ndigits, weight, sign, dscale) = (word(0)?, word(1)?, word(2)? as u16, word(3)?);
    if sign == 0xC000 {
        return Err("NaN numeric".into());
    }
    let mut v = 0f64;
    let mut iv: i128 = 0;
    let mut exact = true;
    for k in 0..ndigits {
        let d = word(4 + k as usize)?;
        let e = weight - k;
        v += d as f64 * 10000f64.powi(e as i32);
        if e >= 0 {
            iv = iv
                .checked_add(
                    (d as i128)
                        .checked_mul(10000i128.checked_pow(e as u32).ok_or("big")?)
                        .ok_or("big")?,
                )
                .ok_or("numeric too large")?;
        } else if d != 0 {
            exact = false;
        }
    }
    let neg = sign == 0x4000;
    if dscale == 0 && exact {
        let i = i64::try_from(if neg { -iv } else { iv })?;
        Ok(Value::Integer(i))
    } else {
        Ok(Value::Real(if neg { -v } else { v }))
    }
}

pub fn row_values(row: &postgres::Row) -> rusqlite::Result<Vec<Value>> {
    (0..row.len())
        .map(|i| row.try_get::<_, PgCell>(i).map(|c| c.0).map_err(fault))
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn translates_placeholders_and_dialect() {
        assert_eq!(
            translate("INSERT OR IGNORE INTO g(a, b) VALUES (?1, ?2)"),
            "INSERT INTO g(a, b) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        assert_eq!(translate("SELECT '?' , ? , ?"), "SELECT '?' , $1 , $2");
        assert_eq!(
            translate("SET x = MAX(a.b, c) , y = MAX(d)"),
            "SET x = GREATEST(a.b, c) , y = MAX(d)"
        );
        assert_eq!(translate("SELECT 'é' || ?3"), "SELECT 'é' || $3");
    }

    #[test]
    fn ddl_uses_postgres_types() {
        let d = ddl("CREATE TABLE t(\n  id INTEGER PRIMARY KEY,\n  b BLOB NOT NULL,\n  s INTEGER PRIMARY KEY AUTOINCREMENT\n);");
        assert!(
            d.contains("id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"),
            "{d}"
        );
        assert!(d.contains("b BYTEA NOT NULL"), "{d}");
        assert!(!d.contains("INTEGER"), "{d}");
        let all: String = MIGRATIONS.iter().map(|m| ddl(m)).collect();
        assert!(!all.contains("RAISE(ABORT"), "{all}");
        assert_eq!(
            all.matches("EXECUTE FUNCTION ward_audit_append_only")
                .count(),
            2
        );
    }

    #[test]
    fn location_names_host_and_database_never_the_password() {
        let loc = |u: &str| location(&postgres::Config::from_str(u).unwrap());
        assert_eq!(
            loc("postgres://ward:s3cret@db.example:5432/wardprod"),
            "db.example/wardprod"
        );
        assert_eq!(
            loc("postgresql://ward:s3cret@10.0.0.5:6543/w"),
            "10.0.0.5:6543/w"
        );
        assert_eq!(
            loc("postgresql://ward@/t_1?host=/tmp/ward-pg"),
            "/tmp/ward-pg/t_1"
        );
        let l = loc("postgresql://admin:hunter2@h/db?password=other");
        assert!(
            !l.contains("hunter2") && !l.contains("other") && !l.contains("admin"),
            "{l}"
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://ward:s3cret@db.example:5432/ward"),
            "postgres://ward:***@db.example:5432/ward"
        );
        assert_eq!(redact("postgres://ward@db/ward"), "postgres://ward@db/ward");
        assert!(!redact("postgresql://u:p%40ss@h/db").contains("p%40ss"));
    }
}
