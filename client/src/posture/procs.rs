//! Running processes, from `/proc/PID/comm` and `/proc/PID/cmdline`.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::Path;

/// The kernel keeps 15 bytes of a process name in `comm` (TASK_COMM_LEN 16, with the NUL).
const COMM_LEN: usize = 15;
/// Only argv[0] is needed from a command line.
const MAX_CMDLINE: usize = 4096;

/// The names running processes go by: their `comm`, and the basename of their argv[0].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessNames {
    pub comms: BTreeSet<Vec<u8>>,
    pub argv0: BTreeSet<Vec<u8>>,
}

impl ProcessNames {
    /// Whether a process called `name` runs: a `comm` equals it (or its first 15 bytes, as the
    /// kernel truncates `comm`), or an argv[0] basename equals it.
    pub fn is_running(&self, name: &str) -> bool {
        let b = name.as_bytes();
        if b.is_empty() {
            return false;
        }
        self.comms.contains(b)
            || (b.len() > COMM_LEN && self.comms.contains(&b[..COMM_LEN]))
            || self.argv0.contains(b)
    }

    /// Adds one process, given the contents of its `comm` and `cmdline` files.
    pub fn add(&mut self, comm: &[u8], cmdline: &[u8]) {
        let comm = comm.strip_suffix(b"\n").unwrap_or(comm);
        if !comm.is_empty() {
            self.comms.insert(comm.to_vec());
        }
        let base = argv0_basename(cmdline);
        if !base.is_empty() {
            self.argv0.insert(base.to_vec());
        }
    }
}

/// The basename of argv[0] in a NUL-separated command line (`/usr/sbin/sshd\0-D\0` → `sshd`).
pub fn argv0_basename(cmdline: &[u8]) -> &[u8] {
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    argv0.rsplit(|b| *b == b'/').next().unwrap_or_default()
}

/// Reads the names of every process under `ROOT/proc`. Processes that exit while being read
/// are skipped.
pub(crate) fn scan(root: &Path) -> Result<ProcessNames, String> {
    let proc_dir = root.join("proc");
    let rd = std::fs::read_dir(&proc_dir).map_err(|e| format!("cannot list /proc: {e}"))?;
    let mut names = ProcessNames::default();
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
        let comm = read_or_gone(&dir.join("comm"), 64)?;
        let cmdline = read_or_gone(&dir.join("cmdline"), MAX_CMDLINE)?;
        if let (Some(comm), Some(cmdline)) = (comm, cmdline) {
            names.add(&comm, &cmdline);
        }
    }
    Ok(names)
}

/// The first `max` bytes of a small proc file (argv[0] comes first; the rest does not
/// matter), or `None` when the process is gone.
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
    // `ROOT/proc/123/comm` → `/proc/123/comm`.
    let s = path.to_string_lossy();
    match s.find("/proc/") {
        Some(i) => s[i..].to_string(),
        None => s.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn argv0() {
        assert_eq!(argv0_basename(b"/usr/sbin/sshd\0-D\0"), b"sshd");
        assert_eq!(argv0_basename(b"sshd: alice@pts/0\0"), b"0");
        assert_eq!(argv0_basename(b"python3\0x.py\0"), b"python3");
        assert_eq!(argv0_basename(b""), b"");
        assert_eq!(argv0_basename(b"/usr/bin/\0"), b"");
    }

    #[test]
    fn matching() {
        let mut n = ProcessNames::default();
        n.add(b"sshd\n", b"/usr/sbin/sshd\0-D\0");
        n.add(
            b"falcon-sensor-b\n",
            b"/opt/CrowdStrike/falcon-sensor-bpf\0",
        );
        n.add(b"kworker/0:1\n", b"");
        n.add(b"python3\n", b"/usr/bin/my-agent\0--flag\0");
        assert!(n.is_running("sshd"));
        assert!(n.is_running("falcon-sensor-bpf"));
        // Only the truncated comm matches (argv[0] differs).
        assert!(n.is_running("falcon-sensor-bxxxx"));
        assert!(n.is_running("kworker/0:1"));
        assert!(n.is_running("my-agent"));
        assert!(n.is_running("python3"));
        assert!(!n.is_running("ssh"));
        assert!(!n.is_running("falcon-sensor"));
        assert!(!n.is_running(""));
    }

    #[test]
    fn fake_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(scan(root).unwrap_err().starts_with("cannot list /proc: "));
        let add = |pid: &str, comm: &str, cmdline: &[u8]| {
            let d = root.join("proc").join(pid);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("comm"), comm).unwrap();
            fs::write(d.join("cmdline"), cmdline).unwrap();
        };
        add("1", "systemd\n", b"/sbin/init\0splash\0");
        add("812", "clamd\n", b"/usr/sbin/clamd\0--foreground=true\0");
        let mut long = b"/usr/bin/osqueryd\0".to_vec();
        long.extend(std::iter::repeat_n(b'x', 10_000));
        add("900", "osqueryd\n", &long);
        // Not processes.
        fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        fs::write(root.join("proc/uptime"), "1 2\n").unwrap();
        // A process that exited between listing and reading.
        fs::create_dir_all(root.join("proc/4242")).unwrap();

        let n = scan(root).unwrap();
        assert!(n.is_running("clamd"));
        assert!(n.is_running("init"));
        assert!(n.is_running("systemd"));
        assert!(n.is_running("osqueryd"));
        assert!(!n.is_running("sshd"));
    }
}
