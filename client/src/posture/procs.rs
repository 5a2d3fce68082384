//! Running processes, identified by the executable they run (`/proc/PID/exe`) and the user
//! they run as (`/proc/PID/status`), never by the names they give themselves (`comm`,
//! `argv[0]`), which any user can set (`exec -a osqueryd sleep`).
//!
//! A wanted process `NAME` is running when some process
//! - runs an executable whose path is `NAME` (when `NAME` contains a `/`) or whose file name is
//!   `NAME` (otherwise);
//! - whose executable file (the inode the process runs, so renaming or replacing the path
//!   afterwards changes nothing) is owned by root and not writable by group or others: only
//!   root put it there;
//! - and which runs as root (real and effective uid 0), or as `USER` when the wanted name is
//!   `NAME@USER` (looked up in `/etc/passwd`; an unknown user matches nothing).
//!
//! What that proves: root installed an executable by that name and a process runs it as the
//! expected user. What it does not: that the executable is the genuine program (pair it with a
//! `files` check with a SHA-256 of the executable, or name its full path), nor that the program
//! is healthy or configured as wanted (a custom check can ask it).

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `/proc/PID/status` is a few KiB; the `Uid:` line is near the top.
const MAX_STATUS: usize = 16 * 1024;
/// Most of `/etc/passwd` read to resolve `NAME@USER`.
const MAX_PASSWD: usize = 1024 * 1024;
/// Group- or other-writable permission bits.
const WRITABLE_BY_OTHERS: u32 = 0o022;

/// One running process, as far as process checks look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// The executable's path as the process sees it (`/usr/bin/osqueryd`; a ` (deleted)`
    /// suffix, left by an upgrade that replaced the file, is removed).
    pub exe: PathBuf,
    /// The executable file is owned by root and not writable by group or others.
    pub exe_root_owned: bool,
    /// Real and effective uid.
    pub uid: u32,
    pub euid: u32,
}

/// The processes running when [`scan`] ran, and the users they can be wanted as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessTable {
    pub processes: Vec<Process>,
    /// User names to uids, from `/etc/passwd` (for `NAME@USER`).
    pub users: BTreeMap<String, u32>,
}

impl ProcessTable {
    /// Whether the wanted process runs (see the module doc for what matches).
    pub fn is_running(&self, wanted: &str) -> bool {
        let (name, uid) = match wanted.rsplit_once('@') {
            Some((name, user)) => match self.users.get(user) {
                Some(uid) => (name, *uid),
                None => return false,
            },
            None => (wanted, 0),
        };
        if name.is_empty() {
            return false;
        }
        self.processes
            .iter()
            .any(|p| p.exe_root_owned && p.uid == uid && p.euid == uid && exe_matches(&p.exe, name))
    }

    /// Adds a process from its executable path, the executable's owner and mode, and the
    /// contents of its `status` file; a status without a `Uid:` line adds nothing.
    pub fn add(&mut self, exe: &Path, exe_uid: u32, exe_mode: u32, status: &[u8]) {
        let Some((uid, euid)) = status_uids(status) else {
            return;
        };
        self.processes.push(Process {
            exe: exe.to_path_buf(),
            exe_root_owned: exe_uid == 0 && exe_mode & WRITABLE_BY_OTHERS == 0,
            uid,
            euid,
        });
    }
}

/// `NAME` with a `/`: the whole path; else the file name.
fn exe_matches(exe: &Path, name: &str) -> bool {
    if name.contains('/') {
        exe.as_os_str().as_encoded_bytes() == name.as_bytes()
    } else {
        exe.file_name()
            .is_some_and(|f| f.as_encoded_bytes() == name.as_bytes())
    }
}

/// Real and effective uid from a `/proc/PID/status` (`Uid:\treal\teffective\tsaved\tfs`).
pub fn status_uids(status: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(status).ok()?;
    let line = text.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut f = line.split_whitespace().map(str::parse::<u32>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// User names to uids in a passwd file.
pub fn passwd_users(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0].is_empty() {
                return None;
            }
            Some((f[0].to_string(), f[2].parse().ok()?))
        })
        .collect()
}

/// Reads every process under `ROOT/proc`. Processes that exit while being read, kernel
/// threads (no executable) and processes whose executable cannot be read are skipped: they
/// satisfy no check.
pub(crate) fn scan(root: &Path) -> Result<ProcessTable, String> {
    let proc_dir = root.join("proc");
    let rd = std::fs::read_dir(&proc_dir).map_err(|e| format!("cannot list /proc: {e}"))?;
    let mut table = ProcessTable::default();
    if let Ok(Some(passwd)) = read_or_gone(&root.join("etc/passwd"), MAX_PASSWD) {
        table.users = passwd_users(&String::from_utf8_lossy(&passwd));
    }
    for entry in rd {
        let entry = entry.map_err(|e| format!("cannot list /proc: {e}"))?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = proc_dir.join(pid);
        let exe_link = dir.join("exe");
        // The link names the path; its metadata is the inode the process runs (even when the
        // path was since replaced or deleted).
        let (Ok(target), Ok(meta)) = (std::fs::read_link(&exe_link), std::fs::metadata(&exe_link))
        else {
            continue;
        };
        let Some(status) = read_or_gone(&dir.join("status"), MAX_STATUS)? else {
            continue;
        };
        table.add(&seen_path(root, &target), meta.uid(), meta.mode(), &status);
    }
    Ok(table)
}

/// The executable's path as the process sees it: without a ` (deleted)` suffix, and (under a
/// fixture root) without the root.
fn seen_path(root: &Path, target: &Path) -> PathBuf {
    let bytes = target.as_os_str().as_encoded_bytes();
    let bytes = bytes.strip_suffix(b" (deleted)").unwrap_or(bytes);
    let path = PathBuf::from(String::from_utf8_lossy(bytes).into_owned());
    if root == Path::new("/") {
        return path;
    }
    match path.strip_prefix(root) {
        Ok(rel) => Path::new("/").join(rel),
        Err(_) => path,
    }
}

/// The first `max` bytes of a small file, or `None` when it (its process) is gone.
fn read_or_gone(path: &Path, max: usize) -> Result<Option<Vec<u8>>, String> {
    match read_prefix(path, max) {
        Ok(b) => Ok(Some(b)),
        // A process that exited (ENOENT, or ESRCH from proc).
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => {
            Ok(None)
        }
        Err(e) => Err(format!("cannot read {}: {e}", shown(path))),
    }
}

fn read_prefix(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_to_end(&mut out)?;
    Ok(out)
}

fn shown(path: &Path) -> String {
    // `ROOT/proc/123/status` → `/proc/123/status`.
    let s = path.to_string_lossy();
    match s.find("/proc/") {
        Some(i) => s[i..].to_string(),
        None => s.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const ROOT_STATUS: &[u8] =
        b"Name:\tx\nUmask:\t0022\nState:\tS\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
    const USER_STATUS: &[u8] = b"Name:\tx\nUid:\t1000\t1000\t1000\t1000\n";

    #[test]
    fn uids_from_status() {
        assert_eq!(status_uids(ROOT_STATUS), Some((0, 0)));
        assert_eq!(status_uids(b"Uid:\t1000\t0\t0\t0\n"), Some((1000, 0)));
        assert_eq!(status_uids(b"Name:\tx\n"), None);
        assert_eq!(status_uids(b"Uid:\tx\t0\n"), None);
        assert_eq!(status_uids(&[0xff, 0xfe]), None);
    }

    #[test]
    fn matching_by_executable_owner_and_user() {
        let mut t = ProcessTable {
            users: passwd_users("root:x:0:0::/root:/bin/sh\nclamav:x:110:115::/:/bin/false\n"),
            ..ProcessTable::default()
        };
        t.add(Path::new("/usr/sbin/sshd"), 0, 0o100755, ROOT_STATUS);
        t.add(
            Path::new("/usr/sbin/clamd"),
            0,
            0o100755,
            b"Uid:\t110\t110\t110\t110\n",
        );
        // Root-owned executable, but the file is writable by its group.
        t.add(Path::new("/opt/edr/agent"), 0, 0o100775, ROOT_STATUS);
        // A user's own copy.
        t.add(Path::new("/home/u/osqueryd"), 1000, 0o100755, ROOT_STATUS);
        // A root-owned executable run by a user.
        t.add(Path::new("/usr/bin/auditd"), 0, 0o100755, USER_STATUS);
        assert!(t.is_running("sshd"));
        assert!(t.is_running("/usr/sbin/sshd"));
        assert!(!t.is_running("/sbin/sshd"));
        assert!(!t.is_running("ssh"));
        // clamd runs as clamav: wanted as clamd@clamav, not as clamd.
        assert!(!t.is_running("clamd"));
        assert!(t.is_running("clamd@clamav"));
        assert!(!t.is_running("clamd@nobody"));
        assert!(!t.is_running("sshd@clamav"));
        assert!(!t.is_running("agent"));
        assert!(!t.is_running("osqueryd"));
        assert!(!t.is_running("auditd"));
        assert!(!t.is_running(""));
        assert!(!t.is_running("@root"));
    }

    /// A fixture process: `ROOT/proc/PID/{comm,cmdline,status}` and `exe` → `exe` under ROOT.
    fn add(root: &Path, pid: &str, comm: &str, argv: &[u8], exe: &str, status: &[u8]) {
        let d = root.join("proc").join(pid);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("comm"), comm).unwrap();
        fs::write(d.join("cmdline"), argv).unwrap();
        fs::write(d.join("status"), status).unwrap();
        std::os::unix::fs::symlink(root.join(exe.trim_start_matches('/')), d.join("exe")).unwrap();
    }

    fn executable(root: &Path, path: &str, uid: u32, mode: u32) {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, "#!/bin/true\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
    }

    #[test]
    fn a_process_calling_itself_osqueryd_is_not_osqueryd() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        executable(root, "/usr/bin/sleep", 0, 0o755);
        executable(root, "/home/u/osqueryd", 1000, 0o755);
        // `exec -a osqueryd sleep`: comm and argv[0] say osqueryd, the executable is sleep.
        add(
            root,
            "10",
            "osqueryd\n",
            b"osqueryd\x00100\x00",
            "/usr/bin/sleep",
            ROOT_STATUS,
        );
        // A user's own file named osqueryd, run as root.
        add(
            root,
            "11",
            "osqueryd\n",
            b"/home/u/osqueryd\0",
            "/home/u/osqueryd",
            ROOT_STATUS,
        );
        let t = scan(root).unwrap();
        assert_eq!(t.processes.len(), 2);
        assert!(!t.is_running("osqueryd"));
        assert!(t.is_running("sleep"));

        // The real one: root-owned, run by root.
        executable(root, "/usr/bin/osqueryd", 0, 0o755);
        add(
            root,
            "12",
            "osqueryd\n",
            b"/usr/bin/osqueryd\0",
            "/usr/bin/osqueryd",
            ROOT_STATUS,
        );
        assert!(scan(root).unwrap().is_running("osqueryd"));
        assert!(scan(root).unwrap().is_running("/usr/bin/osqueryd"));
    }

    #[test]
    fn a_root_owned_executable_run_by_a_user_is_not_enough() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        executable(root, "/usr/bin/osqueryd", 0, 0o755);
        add(
            root,
            "20",
            "osqueryd\n",
            b"/usr/bin/osqueryd\0",
            "/usr/bin/osqueryd",
            USER_STATUS,
        );
        assert!(!scan(root).unwrap().is_running("osqueryd"));
        // Unless the check names that user.
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "u:x:1000:1000::/home/u:/bin/sh\n").unwrap();
        assert!(scan(root).unwrap().is_running("osqueryd@u"));
    }

    #[test]
    fn fake_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(scan(root).unwrap_err().starts_with("cannot list /proc: "));
        executable(root, "/sbin/init", 0, 0o755);
        executable(root, "/usr/sbin/clamd", 0, 0o755);
        add(
            root,
            "1",
            "systemd\n",
            b"/sbin/init\0splash\0",
            "/sbin/init",
            ROOT_STATUS,
        );
        add(
            root,
            "812",
            "clamd\n",
            b"/usr/sbin/clamd\0",
            "/usr/sbin/clamd",
            ROOT_STATUS,
        );
        // A kernel thread: no executable.
        fs::create_dir_all(root.join("proc/2")).unwrap();
        fs::write(root.join("proc/2/status"), ROOT_STATUS).unwrap();
        // Not processes.
        fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        fs::write(root.join("proc/uptime"), "1 2\n").unwrap();
        // A process that exited between listing and reading.
        fs::create_dir_all(root.join("proc/4242")).unwrap();

        let t = scan(root).unwrap();
        assert!(t.is_running("clamd"));
        assert!(t.is_running("init"));
        // comm is not looked at.
        assert!(!t.is_running("systemd"));
        assert!(!t.is_running("sshd"));
    }

    #[test]
    fn a_replaced_executable_still_counts_by_its_old_path() {
        assert_eq!(
            seen_path(Path::new("/"), Path::new("/usr/bin/osqueryd (deleted)")),
            PathBuf::from("/usr/bin/osqueryd")
        );
        assert_eq!(
            seen_path(Path::new("/tmp/r"), Path::new("/tmp/r/usr/bin/x")),
            PathBuf::from("/usr/bin/x")
        );
    }
}
