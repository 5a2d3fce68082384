//! Posture collection on Linux: the signals the agent reports about its own device
//! ([`PostureReport`]), read from the system.
//!
//! Three layers:
//! - pure parsers, text or bytes in, value out, each tested against the fixture files in
//!   `fixtures/` ([`parse_os_release`], [`firewall_from_nft`], [`encrypted_from_lsblk`], …);
//! - a thin reading layer that reads the system under a configurable root (`/` in production,
//!   a fake tree in a tempdir in tests) and runs system tools bounded in time and output
//!   (under a root other than `/`, tools are not run: their output comes from
//!   `ROOT/.ward-fixture/<program args…>`; see `run.rs`);
//! - a [`Collector`] that keeps the expensive signals for `full_interval` and rereads the
//!   cheap ones (processes, files) on every call.
//!
//! Every signal that cannot be read is a [`Measured::error`] with the reason; nothing here
//! panics or defaults to a passing value. Decisions worth knowing:
//! - disk encryption: a root filesystem that is not on a block device (overlay in a container,
//!   tmpfs, zfs, nfs) is an error ("root filesystem is overlay (container); cannot tell"), not
//!   `false`: both fail the check, the error says why. LVM or RAID is encrypted only when every
//!   device under it is (`disk.rs`).
//! - screen lock: whether each graphical session's desktop is set to lock itself when idle
//!   (GNOME through `gsettings`, KDE through `kscreenlockerrc`), not whether it is locked right
//!   now; no graphical session is `None`; other desktops are an error (`screen.rs`).
//! - firewall: a default-deny input chain in nftables or iptables (`firewall.rs`).
//! - custom checks run only when this device's configuration names an executable for them;
//!   the coordinator only names checks.

mod disk;
mod files;
mod firewall;
mod os;
mod procs;
mod run;
mod screen;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tracing::{debug, info, warn};
use ward_shared::names::Name;
use ward_shared::posture::{
    FileState, Measured, OsInfo, PostureReport, PostureWants, Reading, MAX_CUSTOM_OUTPUT, MAX_WANTS,
};
use ward_shared::wire::DeviceId;

pub use disk::{encrypted_from_lsblk, parse_root_mount, RootMount};
pub use files::MAX_HASHED_FILE;
pub use firewall::{firewall_from_iptables_save, firewall_from_nft};
pub use os::{parse_kernel_release, parse_os_release};
pub use procs::{passwd_users, status_uids, Process, ProcessTable};
pub use screen::{
    desktop_family, parse_gsettings_bool, parse_gsettings_uint, parse_kscreenlockerrc,
    parse_session, passwd_entry, Desktop, KdeLock, Session,
};

/// Default [`CollectorConfig::custom_timeout`].
pub const DEFAULT_CUSTOM_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`CollectorConfig::full_interval`].
pub const DEFAULT_FULL_INTERVAL: Duration = Duration::from_secs(30);
/// Longest a system tool (`nft`, `iptables-save`, `lsblk`, `gsettings`) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What the collector reads and how often.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// `/` in production; a fake tree in tests.
    pub root: PathBuf,
    /// Custom check name → executable, configured on the device (never by the coordinator).
    pub custom_checks: BTreeMap<String, PathBuf>,
    /// Longest a custom check may run before it is killed and counts as failed.
    pub custom_timeout: Duration,
    /// How often the expensive signals are read again.
    pub full_interval: Duration,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            custom_checks: BTreeMap::new(),
            custom_timeout: DEFAULT_CUSTOM_TIMEOUT,
            full_interval: DEFAULT_FULL_INTERVAL,
        }
    }
}

/// Collects posture reports, caching what is expensive to read.
///
/// Drive it by calling [`Collector::collect`] as often as reports may be needed (the daemon
/// calls it every second on a blocking thread, and sends a report when
/// [`values_differ`] from the last one sent, or when the last one is old). Processes and files
/// are read on every call (file hashes are cached by file version); the OS, kernel, firewall,
/// disk encryption, screen lock and package database are read when older than
/// `full_interval`; each custom check runs when its last result is older than
/// `full_interval` or when it is newly wanted. All custom checks due run in parallel, so one
/// call takes at most about `custom_timeout` plus the system tools' own timeouts.
#[derive(Debug)]
pub struct Collector {
    cfg: CollectorConfig,
    runner: run::Runner,
    expensive: Option<Expensive>,
    custom: BTreeMap<String, Measured<Value>>,
    hashes: files::HashCache,
    /// The package database's local mtime and the clock offset it was converted with.
    package_time: Option<(i64, i64)>,
    warned_wants: bool,
}

/// The signals read every `full_interval`.
#[derive(Debug, Clone)]
struct Expensive {
    at_ms: i64,
    os: Measured<OsInfo>,
    kernel: Measured<String>,
    firewall: Measured<bool>,
    disk_encryption: Measured<bool>,
    screen_lock: Measured<Option<bool>>,
    last_package_update_ms: Measured<i64>,
}

impl Collector {
    pub fn new(cfg: CollectorConfig) -> Self {
        let runner = run::Runner::new(&cfg.root);
        Self {
            cfg,
            runner,
            expensive: None,
            custom: BTreeMap::new(),
            hashes: files::HashCache::default(),
            package_time: None,
            warned_wants: false,
        }
    }

    /// Collects a report. Blocking (run it on a blocking thread). `now_coord_ms` is
    /// coordinator time (the caller corrects the local clock by the measured offset); it stamps
    /// every reading and the report.
    pub fn collect(
        &mut self,
        wants: &PostureWants,
        device_id: DeviceId,
        seq: u64,
        now_coord_ms: i64,
    ) -> PostureReport {
        let now = now_coord_ms;
        let wants = self.bounded(wants);
        let expensive = match &self.expensive {
            Some(e) if !self.stale(e.at_ms, now) => e.clone(),
            _ => {
                let e = self.read_expensive(now);
                self.expensive = Some(e.clone());
                e
            }
        };
        self.run_custom(&wants.custom, now);
        let custom = wants
            .custom
            .iter()
            .filter_map(|n| self.custom.get(n).map(|m| (n.clone(), m.clone())))
            .collect();
        let processes = self.processes(&wants.processes, now);
        let files = self.files(&wants.files, now);
        PostureReport {
            device_id,
            seq,
            collected_at_ms: now,
            os: expensive.os,
            kernel: expensive.kernel,
            ward_version: env!("CARGO_PKG_VERSION").to_string(),
            firewall: expensive.firewall,
            disk_encryption: expensive.disk_encryption,
            screen_lock: expensive.screen_lock,
            last_package_update_ms: expensive.last_package_update_ms,
            processes,
            files,
            custom,
        }
    }

    /// Runs only the wanted custom checks that are due and returns every wanted check's latest
    /// result. The daemon runs this on its own blocking thread and [`Collector::collect`] with
    /// no custom checks wanted on another, so a slow check never delays the cheap signals.
    pub fn custom_only(
        &mut self,
        wanted: &[String],
        now_coord_ms: i64,
    ) -> BTreeMap<String, Measured<Value>> {
        let wanted: Vec<String> = wanted.iter().take(MAX_WANTS).cloned().collect();
        self.run_custom(&wanted, now_coord_ms);
        self.custom.clone()
    }

    /// `wants` cut to [`MAX_WANTS`] of each kind (a warning the first time).
    fn bounded(&mut self, wants: &PostureWants) -> PostureWants {
        let over = wants.processes.len() > MAX_WANTS
            || wants.files.len() > MAX_WANTS
            || wants.custom.len() > MAX_WANTS;
        if over && !self.warned_wants {
            warn!(
                processes = wants.processes.len(),
                files = wants.files.len(),
                custom = wants.custom.len(),
                max = MAX_WANTS,
                "coordinator asks for more posture signals than allowed; ignoring the rest"
            );
            self.warned_wants = true;
        }
        PostureWants {
            processes: wants.processes.iter().take(MAX_WANTS).cloned().collect(),
            files: wants.files.iter().take(MAX_WANTS).cloned().collect(),
            custom: wants.custom.iter().take(MAX_WANTS).cloned().collect(),
        }
    }

    /// Whether a reading taken at `at_ms` is due again at `now` (also when the clock went
    /// back, e.g. after the offset to the coordinator was corrected).
    fn stale(&self, at_ms: i64, now: i64) -> bool {
        let interval = i64::try_from(self.cfg.full_interval.as_millis()).unwrap_or(i64::MAX);
        now < at_ms || now - at_ms >= interval
    }

    fn read_expensive(&mut self, now: i64) -> Expensive {
        let packages =
            last_package_update_ms(&self.cfg.root).map(|t| self.coordinator_time(t, now));
        let root = &self.cfg.root;
        let e = Expensive {
            at_ms: now,
            os: measure(now, os::read_os(root), "os"),
            kernel: measure(now, os::read_kernel(root), "kernel"),
            firewall: measure(now, firewall::read_firewall(&self.runner), "firewall"),
            disk_encryption: measure(
                now,
                disk::read_disk_encryption(root, &self.runner),
                "disk_encryption",
            ),
            screen_lock: measure(
                now,
                screen::read_screen_lock(root, &self.runner),
                "screen_lock",
            ),
            last_package_update_ms: measure(now, packages, "last_package_update"),
        };
        debug!(
            firewall = ?e.firewall.get().ok(),
            disk_encryption = ?e.disk_encryption.get().ok(),
            screen_lock = ?e.screen_lock.get().ok(),
            "posture signals read"
        );
        e
    }

    /// A local file time as coordinator time. The offset is `now` minus the local clock, which
    /// jitters by a few ms from call to call; an unchanged file keeps its converted time while
    /// the offset moves less than a second, so the report's value (and [`values_differ`]) is
    /// stable.
    fn coordinator_time(&mut self, local_ms: i64, now: i64) -> i64 {
        let mut offset = now.saturating_sub(ward_runtime::now_ms());
        if let Some((was_local, was_offset)) = self.package_time {
            if was_local == local_ms && offset.abs_diff(was_offset) < 1_000 {
                offset = was_offset;
            }
        }
        self.package_time = Some((local_ms, offset));
        local_ms.saturating_add(offset)
    }

    /// Runs the wanted custom checks that are due, in parallel; forgets unwanted ones.
    fn run_custom(&mut self, wanted: &[String], now: i64) {
        self.custom.retain(|name, _| wanted.contains(name));
        let mut due = Vec::new();
        for name in wanted {
            if let Some(m) = self.custom.get(name) {
                if !self.stale(m.at_ms, now) {
                    continue;
                }
            }
            match self.cfg.custom_checks.get(name) {
                Some(exe) => due.push((name.clone(), exe.clone())),
                None => {
                    self.custom.insert(
                        name.clone(),
                        Measured::error(
                            now,
                            "no executable configured for this check on this device",
                        ),
                    );
                }
            }
        }
        if due.is_empty() {
            return;
        }
        let limits = run::Limits {
            timeout: self.cfg.custom_timeout,
            max_stdout: MAX_CUSTOM_OUTPUT,
        };
        let runner = &self.runner;
        let results: Vec<(String, Result<Value, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = due
                .iter()
                .map(|(name, exe)| {
                    let h = std::thread::Builder::new()
                        .name("posture-check".into())
                        .spawn_scoped(s, move || run_check(runner, name, exe, limits));
                    (name.clone(), h)
                })
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| {
                    let r = match h {
                        Ok(h) => h
                            .join()
                            .unwrap_or_else(|_| Err("the check's runner failed".to_string())),
                        Err(e) => Err(format!("cannot start a thread to run it: {e}")),
                    };
                    (name, r)
                })
                .collect()
        });
        for (name, r) in results {
            let m = match r {
                Ok(v) => Measured::value(now, v),
                Err(e) => Measured::error(now, e),
            };
            // Logged when the outcome changes, not every interval.
            let changed = self.custom.get(&name).map(|old| &old.reading) != Some(&m.reading);
            match &m.reading {
                Reading::Error(e) if changed && e.starts_with("did not finish") => {
                    warn!(check = %name, error = %e, "custom posture check hangs; killed")
                }
                Reading::Error(e) if changed && e.starts_with("refused: ") => {
                    warn!(check = %name, error = %e, "custom posture check refused; not run")
                }
                Reading::Error(e) if changed => {
                    info!(check = %name, error = %e, "custom posture check failed")
                }
                Reading::Value(_) if changed => debug!(check = %name, "custom posture check ran"),
                _ => {}
            }
            self.custom.insert(name, m);
        }
    }

    fn processes(&self, wanted: &[String], now: i64) -> BTreeMap<String, Measured<bool>> {
        if wanted.is_empty() {
            return BTreeMap::new();
        }
        let names = procs::scan(&self.cfg.root);
        wanted
            .iter()
            .map(|w| {
                let m = match &names {
                    Ok(n) => Measured::value(now, n.is_running(w)),
                    Err(e) => Measured::error(now, e.clone()),
                };
                (w.clone(), m)
            })
            .collect()
    }

    fn files(
        &mut self,
        wanted: &[(String, bool)],
        now: i64,
    ) -> BTreeMap<String, Measured<FileState>> {
        self.hashes.retain(wanted);
        let mut out = BTreeMap::new();
        for (path, hash) in wanted {
            let m = match files::file_state(&self.cfg.root, path, *hash, &mut self.hashes) {
                Ok(s) => Measured::value(now, s),
                Err(e) => Measured::error(now, e),
            };
            // A path listed twice: hashed wins (it answers both).
            if *hash || !out.contains_key(path) {
                out.insert(path.clone(), m);
            }
        }
        out
    }
}

/// Whether two reports differ in any value, ignoring when they were taken (`at_ms`, `seq`,
/// `collected_at_ms`). An error reading counts as a value (its text included).
pub fn values_differ(a: &PostureReport, b: &PostureReport) -> bool {
    // Destructured so that a field added to the report cannot be forgotten here.
    let PostureReport {
        device_id,
        seq: _,
        collected_at_ms: _,
        os,
        kernel,
        ward_version,
        firewall,
        disk_encryption,
        screen_lock,
        last_package_update_ms,
        processes,
        files,
        custom,
    } = a;
    *device_id != b.device_id
        || *ward_version != b.ward_version
        || os.reading != b.os.reading
        || kernel.reading != b.kernel.reading
        || firewall.reading != b.firewall.reading
        || disk_encryption.reading != b.disk_encryption.reading
        || screen_lock.reading != b.screen_lock.reading
        || last_package_update_ms.reading != b.last_package_update_ms.reading
        || maps_differ(processes, &b.processes)
        || maps_differ(files, &b.files)
        || maps_differ(custom, &b.custom)
}

/// Parses a `--posture-check NAME=PATH` argument: a check name (`[a-z0-9._@-]`, as policies
/// name checks) and an absolute path.
pub fn parse_check_arg(s: &str) -> Result<(String, PathBuf), String> {
    let Some((name, path)) = s.split_once('=') else {
        return Err(format!("posture check {s:?}: expected NAME=PATH"));
    };
    let name =
        Name::parse("custom check", name).map_err(|e| format!("posture check {s:?}: {e}"))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(format!(
            "posture check {s:?}: the executable's path must be absolute"
        ));
    }
    Ok((name.as_str().to_string(), path))
}

/// Every executable regular file in `dir` (symlinks followed) as a check named after the file.
/// Hidden files are skipped, and so are files whose names are not check names (with a
/// warning): an editor's `check~` backup must not stop the agent.
pub fn checks_from_dir(dir: &Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = BTreeMap::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            warn!(path = %path.display(), "posture check file name is not UTF-8; skipped");
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        if let Err(e) = Name::parse("custom check", &name) {
            warn!(path = %path.display(), error = %e, "not a posture check name; skipped");
            continue;
        }
        let abs = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .join(path)
        };
        out.insert(name, abs);
    }
    Ok(out)
}

fn maps_differ<T: PartialEq>(
    a: &BTreeMap<String, Measured<T>>,
    b: &BTreeMap<String, Measured<T>>,
) -> bool {
    a.len() != b.len()
        || a.iter()
            .zip(b)
            .any(|((ka, va), (kb, vb))| ka != kb || va.reading != vb.reading)
}

/// Runs one custom check: its stdout must be one JSON object.
fn run_check(
    runner: &run::Runner,
    name: &str,
    exe: &Path,
    limits: run::Limits,
) -> Result<Value, String> {
    let out = match runner.check(name, exe, limits) {
        Ok(out) => out,
        Err(run::RunError::NotFound) => {
            return Err(format!("cannot run {}: no such file", exe.display()))
        }
        Err(run::RunError::Failed(why)) => return Err(why),
    };
    if !out.status.success() {
        return Err(run::failure(&out));
    }
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err("did not print a JSON object".to_string()),
    }
}

/// Package databases, newest layout first: whichever exists says when packages last changed.
const PACKAGE_DBS: &[&str] = &[
    "var/lib/dpkg/status",
    "var/lib/rpm/rpmdb.sqlite",
    "usr/lib/sysimage/rpm/rpmdb.sqlite",
    "var/lib/rpm/Packages",
    "var/lib/pacman/local",
    "lib/apk/db/installed",
];

/// When the package database last changed (local time, ms since the Unix epoch).
fn last_package_update_ms(root: &Path) -> Result<i64, String> {
    for rel in PACKAGE_DBS {
        match std::fs::metadata(root.join(rel)) {
            Ok(m) => {
                let t = m.modified().map_err(|e| format!("/{rel}: {e}"))?;
                return Ok(system_time_ms(t));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("/{rel}: {e}")),
        }
    }
    Err("no package database found (dpkg, rpm, pacman, apk)".to_string())
}

/// A reading as a [`Measured`], logging why it failed.
fn measure<T>(now: i64, r: Result<T, String>, what: &str) -> Measured<T> {
    match r {
        Ok(v) => Measured::value(now, v),
        Err(e) => {
            debug!(signal = what, error = %e, "posture signal not readable");
            Measured::error(now, e)
        }
    }
}

fn system_time_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Reads a small file of at most `max` bytes, refusing bigger ones and anything that is not
/// a regular file (a FIFO would block; a device could be endless). Opened without blocking.
pub(crate) fn read_bounded(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mut out = Vec::new();
    f.take(u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1))
        .read_to_end(&mut out)?;
    if out.len() > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {} bytes", max),
        ));
    }
    Ok(out)
}

/// [`read_bounded`], as UTF-8 text.
pub(crate) fn read_text(path: &Path, max: usize) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests;
