//! Throw-away PostgreSQL clusters for the store tests: `initdb` + `pg_ctl start` under a
//! temporary directory, listening only on a unix socket in that directory (as the `postgres`
//! user when the tests run as root). One cluster is shared by the whole test binary, with a
//! fresh database per test; it is stopped when the test process exits (a watcher process
//! outlives it for that). Without the PostgreSQL binaries the PostgreSQL tests print SKIPPED,
//! unless `WARD_REQUIRE_PG=1`, which makes that a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// One PostgreSQL cluster in a temporary directory.
pub struct Cluster {
    pub dir: PathBuf,
    /// Whether dropping this handle stops the cluster (the shared one is stopped by its
    /// watcher process instead).
    owned: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` from the PostgreSQL binaries, as the `postgres` user when we are root (the server
/// refuses to run as root).
fn pg_command(cmd: &str) -> Command {
    let path = Path::new(BIN).join(cmd);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether PostgreSQL tests can run here; prints SKIPPED once when they cannot, and panics
/// when `WARD_REQUIRE_PG=1` demands them.
pub fn available() -> bool {
    static SAID: OnceLock<bool> = OnceLock::new();
    *SAID.get_or_init(|| {
        if Path::new(BIN).join("initdb").exists() {
            return true;
        }
        if std::env::var("WARD_REQUIRE_PG").as_deref() == Ok("1") {
            panic!("WARD_REQUIRE_PG=1 but PostgreSQL is missing (no {BIN})");
        }
        eprintln!("SKIPPED: PostgreSQL tests (no {BIN})");
        false
    })
}

impl Cluster {
    /// Creates and starts a new cluster.
    pub fn start() -> Cluster {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ward-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut mk = Command::new("install");
        mk.arg("-d").arg("-m").arg("0755");
        if is_root() {
            mk.args(["-o", "postgres"]);
        }
        mk.arg(&dir);
        run(mk, "creating the cluster directory");
        let mut init = pg_command("initdb");
        init.arg("-D").arg(dir.join("data")).args([
            "-A",
            "trust",
            "-U",
            "ward",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run(init, "initdb");
        let c = Cluster { dir, owned: true };
        c.pg_start();
        c
    }

    pub fn pg_start(&self) {
        let mut start = pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-o")
            .arg(format!(
                "-k {} -c listen_addresses='' -c fsync=off -c max_connections=300",
                self.dir.display()
            ))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "start"]);
        run(start, "pg_ctl start");
    }

    pub fn pg_stop(&self) {
        let mut stop = pg_command("pg_ctl");
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run(stop, "pg_ctl stop");
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://ward@/{db}?host={}", self.dir.display())
    }

    /// Creates a new empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to the test cluster: {e}"));
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    /// Stops the cluster when this process exits, however it exits.
    fn watch(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} -D {dir}/data -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            stop = if is_root() {
                format!("runuser -u postgres -- {BIN}/pg_ctl")
            } else {
                format!("{BIN}/pg_ctl")
            },
            dir = self.dir.display(),
        );
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.owned {
            let mut stop = pg_command("pg_ctl");
            stop.arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "stop"]);
            let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The cluster shared by this test binary, started on first use; `None` (after SKIPPED) when
/// PostgreSQL is not installed.
pub fn shared() -> Option<&'static Cluster> {
    static SHARED: OnceLock<Cluster> = OnceLock::new();
    if !available() {
        return None;
    }
    Some(SHARED.get_or_init(|| {
        let mut c = Cluster::start();
        c.owned = false;
        c.watch();
        c
    }))
}

/// A fresh database on the shared cluster, or `None` when PostgreSQL tests are skipped.
pub fn fresh_database() -> Option<String> {
    shared().map(|c| c.create_database())
}
