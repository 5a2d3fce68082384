//! Running programs for posture: system tools (`nft`, `iptables-save`, `lsblk`, `gsettings`)
//! and the device's custom checks, each bounded in time and in output.
//!
//! A run never blocks its caller much longer than its timeout: the program runs in its own
//! process group, its stdout and stderr are read on two threads into capped buffers, and when
//! the time is up (or stdout passes its cap) the whole group gets SIGKILL, so a program that
//! ignores SIGTERM or leaves children behind holding the pipes cannot stall the agent. A killed
//! program is reaped; one that cannot be reaped at once (stuck in the kernel) is handed to a
//! reaper thread, and its key stays busy until it is gone, so at most one instance per key
//! (per check) ever runs.
//!
//! When the collector's root is not `/` (tests with a fake tree), system tools are not run:
//! their output is read from `ROOT/.ward-fixture/<program and arguments, space-separated>`,
//! and a missing file is a tool that is not installed. Custom checks always run for real.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// `PATH` for every program the agent runs: system directories only, whatever the daemon's
/// own environment says.
pub(crate) const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where system tools are looked for (in this order).
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];
/// How much of a failing program's stderr is kept for its error message.
const STDERR_KEPT: usize = 1024;
/// How often the wait loop looks at the child.
const POLL: Duration = Duration::from_millis(5);
/// How long to wait for a killed child to be reaped before handing it to a reaper thread.
const REAP_GRACE: Duration = Duration::from_millis(500);
/// Where the fixture outputs of system tools live under a test root.
pub(crate) const FIXTURE_DIR: &str = ".ward-fixture";

/// Limits for one run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub timeout: Duration,
    pub max_stdout: usize,
}

/// Who a system tool runs as (`gsettings` reads the settings of the session's user).
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    pub name: String,
    pub home: PathBuf,
}

/// Why a run gave no usable output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunError {
    /// The program does not exist.
    NotFound,
    /// Could not start, timed out, printed too much, or exited unsuccessfully: why, in words.
    Failed(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::NotFound => f.write_str("not found"),
            RunError::Failed(why) => f.write_str(why),
        }
    }
}

/// Runs programs for a collector: system tools (for real, or from fixtures) and custom checks.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    /// `None`: run system tools for real; `Some(root)`: read their output from fixtures.
    fixtures: Option<PathBuf>,
    /// Keys (a check's name, a tool's name) with a run in progress or a child not yet reaped.
    busy: Arc<Mutex<BTreeSet<String>>>,
}

impl Runner {
    pub fn new(root: &Path) -> Self {
        Self {
            fixtures: (root != Path::new("/")).then(|| root.join(FIXTURE_DIR)),
            busy: Arc::default(),
        }
    }

    /// The stdout of a system tool that exited successfully.
    pub fn tool(
        &self,
        program: &str,
        args: &[&str],
        user: Option<&User>,
        limits: Limits,
    ) -> Result<Vec<u8>, RunError> {
        if let Some(dir) = &self.fixtures {
            let mut name = program.to_string();
            for a in args {
                name.push(' ');
                name.push_str(a);
            }
            return match crate::posture::read_bounded(&dir.join(name), limits.max_stdout) {
                Ok(out) => Ok(out),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(RunError::NotFound),
                Err(e) => Err(RunError::Failed(format!("fixture: {e}"))),
            };
        }
        let Some(path) = TOOL_DIRS
            .iter()
            .map(|d| Path::new(d).join(program))
            .find(|p| p.is_file())
        else {
            return Err(RunError::NotFound);
        };
        let mut cmd = Command::new(&path);
        cmd.args(args)
            .env_clear()
            .env("PATH", SAFE_PATH)
            .env("LC_ALL", "C")
            .current_dir("/");
        if let Some(u) = user {
            cmd.uid(u.uid)
                .gid(u.gid)
                .env("HOME", &u.home)
                .env("USER", &u.name)
                .env("LOGNAME", &u.name)
                .env("XDG_RUNTIME_DIR", format!("/run/user/{}", u.uid));
        }
        let key = format!("tool:{program}");
        let out = self.run(&key, cmd, limits)?;
        if !out.status.success() {
            return Err(RunError::Failed(failure(&out)));
        }
        Ok(out.stdout)
    }

    /// Runs a custom check's executable: no arguments, stdin null, a minimal environment.
    /// Checks run as root, so only one that root alone could have put in place runs (see
    /// [`trusted_check`]); any other is refused (`refused: …`) without running.
    pub fn check(&self, name: &str, exe: &Path, limits: Limits) -> Result<Output, RunError> {
        let exe = trusted_check(exe)?;
        let mut cmd = Command::new(exe);
        cmd.env_clear()
            .env("PATH", SAFE_PATH)
            .env("LC_ALL", "C")
            .current_dir("/");
        self.run(&format!("check:{name}"), cmd, limits)
    }

    /// Runs `cmd` under `key` (at most one run per key at a time).
    fn run(&self, key: &str, cmd: Command, limits: Limits) -> Result<Output, RunError> {
        {
            let mut busy = lock(&self.busy);
            if !busy.insert(key.to_string()) {
                return Err(RunError::Failed(
                    "the previous run has not exited yet".to_string(),
                ));
            }
        }
        let (result, leftover) = run_bounded(cmd, limits);
        match leftover {
            None => {
                lock(&self.busy).remove(key);
            }
            Some(mut child) => {
                // Killed but not reaped yet (stuck in the kernel): reap it in the background
                // and keep the key busy until then.
                let busy = self.busy.clone();
                let owned_key = key.to_string();
                let spawned =
                    thread::Builder::new()
                        .name("posture-reaper".into())
                        .spawn(move || {
                            let _ = child.wait();
                            lock(&busy).remove(&owned_key);
                        });
                if let Err(e) = spawned {
                    warn!(
                        error = %e,
                        "cannot start a reaper thread; a killed posture program stays a zombie"
                    );
                    lock(&self.busy).remove(key);
                }
            }
        }
        result
    }
}

/// The executable to run for a custom check configured at `exe`, if only root could have put
/// it there: the file (symlinks resolved) is a regular file owned by root and not writable by
/// group or others, and so is every directory above it (a root-owned directory with the sticky
/// bit, like `/tmp`, is allowed: no one else may replace root's entries in it). A symlink at
/// `exe` must stay inside `exe`'s own directory (the check directory). The resolved path is
/// what runs, so nothing can be swapped in between this check and the run. A missing file is
/// [`RunError::NotFound`]; anything else refused is `RunError::Failed("refused: …")`.
pub(crate) fn trusted_check(exe: &Path) -> Result<PathBuf, RunError> {
    use std::os::unix::fs::MetadataExt;
    let refused = |why: String| RunError::Failed(format!("refused: {why}"));
    let io_err =
        |p: &Path, e: io::Error| RunError::Failed(format!("cannot check {}: {e}", p.display()));
    let link = match std::fs::symlink_metadata(exe) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RunError::NotFound),
        Err(e) => return Err(io_err(exe, e)),
    };
    let real = match std::fs::canonicalize(exe) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(RunError::NotFound),
        Err(e) => return Err(io_err(exe, e)),
    };
    if link.file_type().is_symlink() {
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let real_dir = std::fs::canonicalize(dir).map_err(|e| io_err(dir, e))?;
        if !real.starts_with(&real_dir) {
            return Err(refused(format!(
                "{} is a symlink out of its check directory (to {})",
                exe.display(),
                real.display()
            )));
        }
    }
    let meta = std::fs::metadata(&real).map_err(|e| io_err(&real, e))?;
    if !meta.is_file() {
        return Err(refused(format!("{} is not a regular file", real.display())));
    }
    trusted_owner(&real, meta.uid(), meta.mode(), false).map_err(refused)?;
    for dir in real.ancestors().skip(1) {
        let m = std::fs::metadata(dir).map_err(|e| io_err(dir, e))?;
        trusted_owner(dir, m.uid(), m.mode(), true).map_err(refused)?;
    }
    Ok(real)
}

/// Owned by root and writable by no one else (a directory: or sticky).
fn trusted_owner(path: &Path, uid: u32, mode: u32, dir: bool) -> Result<(), String> {
    let what = if dir { "directory " } else { "" };
    if uid != 0 {
        return Err(format!(
            "{what}{} is owned by uid {uid}, not root",
            path.display()
        ));
    }
    let sticky = dir && mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(format!(
            "{what}{} is writable by group or others (mode {:o})",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// A finished run.
#[derive(Debug)]
pub(crate) struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    /// The start of stderr (at most [`STDERR_KEPT`] bytes), lossily decoded.
    pub stderr: String,
}

/// `exited with status 1: first line of stderr` (the stderr part only when there is one).
pub(crate) fn failure(out: &Output) -> String {
    let status = describe_status(out.status);
    match out.stderr.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => {
            let line: String = line.chars().take(200).collect();
            format!("{status}: {line}")
        }
        None => status,
    }
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => "exited abnormally".to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Msg {
    /// All of stdout, or `None`: more than the cap.
    Stdout(io::Result<Option<Vec<u8>>>),
    Stderr(String),
}

/// Runs `cmd` to completion within `limits`. Returns the outcome and, if the child was killed
/// but could not be reaped within [`REAP_GRACE`], the child (the caller reaps it later).
fn run_bounded(mut cmd: Command, limits: Limits) -> (Result<Output, RunError>, Option<Child>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a kill reaches whatever it started too.
        .process_group(0);
    let started = Instant::now();
    let deadline = started + limits.timeout;
    let mut child = match spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (Err(RunError::NotFound), None),
        Err(e) => return (Err(RunError::Failed(format!("cannot start: {e}"))), None),
    };
    let (tx, rx) = mpsc::channel();
    let readers = start_readers(&mut child, limits.max_stdout, tx);
    if let Err(e) = readers {
        let leftover = kill_and_reap(child);
        return (
            Err(RunError::Failed(format!("cannot read its output: {e}"))),
            leftover,
        );
    }

    let (mut stdout, mut stderr) = (None, None);
    loop {
        let pipes_done = stdout.is_some() && stderr.is_some();
        if pipes_done {
            match exited(&mut child) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    let leftover = kill_and_reap(child);
                    return (Err(RunError::Failed(format!("cannot wait: {e}"))), leftover);
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            let leftover = kill_and_reap(child);
            debug!(
                program = ?cmd.get_program(),
                ?limits.timeout,
                "posture program timed out; killed"
            );
            return (
                Err(RunError::Failed(format!(
                    "did not finish within {}; killed",
                    show_duration(limits.timeout)
                ))),
                leftover,
            );
        }
        let wait = POLL.min(deadline - now);
        if pipes_done {
            thread::sleep(wait);
            continue;
        }
        match rx.recv_timeout(wait) {
            Ok(Msg::Stdout(Ok(Some(out)))) => stdout = Some(out),
            Ok(Msg::Stdout(Ok(None))) => {
                let leftover = kill_and_reap(child);
                return (
                    Err(RunError::Failed(format!(
                        "printed more than {}",
                        show_size(limits.max_stdout)
                    ))),
                    leftover,
                );
            }
            Ok(Msg::Stdout(Err(e))) => {
                let leftover = kill_and_reap(child);
                return (
                    Err(RunError::Failed(format!("cannot read its output: {e}"))),
                    leftover,
                );
            }
            Ok(Msg::Stderr(s)) => stderr = Some(s),
            Err(RecvTimeoutError::Timeout) => {}
            // Both readers have sent what they had; cannot happen while one is missing.
            Err(RecvTimeoutError::Disconnected) => {
                stdout.get_or_insert_with(Vec::new);
                stderr.get_or_insert_with(String::new);
            }
        }
    }
    // The child has exited and is a zombie (not reaped), so its process group id cannot have
    // been reused: kill whatever it left running in its group, then reap it.
    kill_group(&child);
    match child.wait() {
        Ok(status) => (
            Ok(Output {
                status,
                stdout: stdout.unwrap_or_default(),
                stderr: stderr.unwrap_or_default(),
            }),
            None,
        ),
        Err(e) => (Err(RunError::Failed(format!("cannot wait: {e}"))), None),
    }
}

/// Spawns, retrying briefly on ETXTBSY: an executable just written (or being replaced) can
/// still be open for writing in a process forked by another thread.
fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 5 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn start_readers(child: &mut Child, max_stdout: usize, tx: mpsc::Sender<Msg>) -> io::Result<()> {
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("pipes missing"));
    };
    let tx2 = tx.clone();
    thread::Builder::new()
        .name("posture-stdout".into())
        .spawn(move || {
            let _ = tx.send(Msg::Stdout(read_capped(&mut out, max_stdout)));
        })?;
    thread::Builder::new()
        .name("posture-stderr".into())
        .spawn(move || {
            let _ = tx2.send(Msg::Stderr(read_head(&mut err, STDERR_KEPT)));
        })?;
    Ok(())
}

/// Everything `r` gives until EOF, or `None` as soon as it gives more than `max` bytes. Never
/// allocates more than `max` bytes (plus one read buffer on the stack).
pub(crate) fn read_capped(r: &mut impl Read, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(Some(out)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let len = out.len() + n;
        if len > max {
            return Ok(None);
        }
        if len > out.capacity() {
            // Doubling, but never past `max`.
            let want = (out.capacity() * 2).clamp(len, max);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// The first `keep` bytes of `r` (lossily decoded); the rest is read and dropped, so the
/// writer never blocks on a full pipe.
fn read_head(r: &mut impl Read, keep: usize) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = keep.saturating_sub(head.len());
                head.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Whether the child has exited, without reaping it (it stays a zombie, keeping its pid and
/// process group id reserved until [`Child::wait`]).
fn exited(child: &mut Child) -> io::Result<bool> {
    let pid: libc::id_t = child.id();
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call; waitid only
    // writes into it. WNOWAIT leaves the child waitable.
    let (rc, info) = unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let rc = libc::waitid(
            libc::P_PID,
            pid,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        (rc, info)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid, si_pid is set (0 when no child has changed state).
    Ok(unsafe { info.si_pid() } != 0)
}

/// SIGKILL to the child's process group. Callers only call this while the child is not yet
/// reaped, so the group id (the child's pid) still belongs to it.
fn kill_group(child: &Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) takes no pointers; `-pid` names the child's own process group
    // (`process_group(0)` made the child its leader).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Kills the child's group and reaps the child; gives the child back if it could not be
/// reaped within [`REAP_GRACE`] (the caller reaps it later).
fn kill_and_reap(mut child: Child) -> Option<Child> {
    kill_group(&child);
    let until = Instant::now() + REAP_GRACE;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() >= until => break,
            Ok(None) => thread::sleep(POLL),
        }
    }
    warn!(
        pid = child.id(),
        "killed posture program has not exited; reaping it in the background"
    );
    Some(child)
}

pub(crate) fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{ms} ms")
    }
}

pub(crate) fn show_size(n: usize) -> String {
    if n.is_multiple_of(1024 * 1024) {
        format!("{} MiB", n / (1024 * 1024))
    } else if n.is_multiple_of(1024) {
        format!("{} KiB", n / 1024)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn capped_reads_never_hold_more_than_the_cap() {
        let data = vec![7u8; 100_000];
        let out = read_capped(&mut &data[..], 100_000).unwrap().unwrap();
        assert_eq!(out.len(), 100_000);
        assert!(out.capacity() <= 100_000);
        assert_eq!(read_capped(&mut &data[..], 99_999).unwrap(), None);
        assert_eq!(read_capped(&mut &b""[..], 0).unwrap(), Some(Vec::new()));
        assert_eq!(read_head(&mut &data[..], 10).len(), 10);
    }

    #[test]
    fn failures_read_well() {
        let out = |code: i32, stderr: &str| Output {
            status: ExitStatus::from_raw(code),
            stdout: Vec::new(),
            stderr: stderr.to_string(),
        };
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        assert_eq!(failure(&out(1 << 8, "")), "exited with status 1");
        assert_eq!(
            failure(&out(2 << 8, "\n  Error: permission denied \nmore\n")),
            "exited with status 2: Error: permission denied"
        );
        assert_eq!(failure(&out(9, "")), "killed by signal 9");
        assert_eq!(show_duration(Duration::from_secs(5)), "5 s");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500 ms");
        assert_eq!(show_size(64 * 1024), "64 KiB");
        assert_eq!(show_size(16 * 1024 * 1024), "16 MiB");
        assert_eq!(show_size(1000), "1000 bytes");
    }

    #[test]
    fn tools_from_fixtures_or_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let r = Runner::new(dir.path());
        let limits = Limits {
            timeout: Duration::from_secs(1),
            max_stdout: 16,
        };
        assert_eq!(
            r.tool("nft", &["list", "ruleset"], None, limits),
            Err(RunError::NotFound)
        );
        std::fs::create_dir_all(dir.path().join(FIXTURE_DIR)).unwrap();
        std::fs::write(dir.path().join(FIXTURE_DIR).join("nft list ruleset"), "x").unwrap();
        assert_eq!(
            r.tool("nft", &["list", "ruleset"], None, limits),
            Ok(b"x".to_vec())
        );
        std::fs::write(dir.path().join(FIXTURE_DIR).join("lsblk"), [0u8; 17]).unwrap();
        assert!(matches!(
            r.tool("lsblk", &[], None, limits),
            Err(RunError::Failed(_))
        ));

        let real = Runner::new(Path::new("/"));
        assert_eq!(
            real.tool("ward-no-such-tool", &[], None, limits),
            Err(RunError::NotFound)
        );
    }

    #[test]
    fn real_tool_runs_with_a_clean_environment() {
        let real = Runner::new(Path::new("/"));
        let limits = Limits {
            timeout: Duration::from_secs(5),
            max_stdout: 64 * 1024,
        };
        let Ok(out) = real.tool("env", &[], None, limits) else {
            return; // no `env` in the usual places
        };
        let mut keys: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        assert_eq!(keys, ["LC_ALL", "PATH"]);
        // A failing tool: its status and stderr.
        let e = real
            .tool("ls", &["/ward-no-such-dir"], None, limits)
            .unwrap_err();
        assert!(e.to_string().starts_with("exited with status 2: "), "{e}");
    }
}
