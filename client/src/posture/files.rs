//! Files the coordinator asks about: present or not, and their SHA-256 when asked.
//!
//! Hashes are cached by (device, inode, size, mtime, ctime), so polling every second rereads
//! nothing that did not change; ctime is in the key because it cannot be set back by a user
//! (unlike mtime), so a rewrite that restores size and mtime still misses the cache. Like
//! git's "racily clean" index entries, a file changed less than a second before it was hashed
//! is not cached: timestamps have coarse granularity, and a second write within the same tick
//! would leave the key unchanged.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

use sha2::{Digest, Sha256};
use ward_shared::posture::FileState;

/// Largest file hashed (64 MiB); bigger is an error reading.
pub const MAX_HASHED_FILE: u64 = 64 * 1024 * 1024;

/// What identifies one version of a file's contents (for the hash cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    fn of(m: &Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Hashes of files, by the path asked for.
#[derive(Debug)]
pub(crate) struct HashCache {
    entries: BTreeMap<String, (Version, String)>,
    /// How many files were actually read and hashed (for tests and debugging).
    pub hashed: u64,
    /// Files whose ctime is this recent (ns) are not cached.
    racy_ns: i128,
}

impl Default for HashCache {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            hashed: 0,
            racy_ns: 1_000_000_000,
        }
    }
}

impl HashCache {
    /// Forgets every path not in `keep`.
    pub fn retain(&mut self, keep: &[(String, bool)]) {
        self.entries
            .retain(|p, _| keep.iter().any(|(k, hash)| *hash && k == p));
    }
}

/// The state of `path` (absolute, as the coordinator names it) under `root`.
pub(crate) fn file_state(
    root: &Path,
    path: &str,
    hash: bool,
    cache: &mut HashCache,
) -> Result<FileState, String> {
    let rel = Path::new(path);
    if !rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
        return Err("path must be absolute, without \"..\"".to_string());
    }
    let full = root.join(path.trim_start_matches('/'));
    let meta = match std::fs::metadata(&full) {
        Ok(m) => m,
        Err(e) if gone(&e) => {
            return Ok(FileState {
                present: false,
                sha256: None,
            })
        }
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    if !hash {
        return Ok(FileState {
            present: true,
            sha256: None,
        });
    }
    if !meta.is_file() {
        return Err("not a regular file; cannot hash it".to_string());
    }
    // Opened without blocking (in case it was replaced by a FIFO since) and checked again on
    // the open file, so what is hashed is what was checked.
    let file = match File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&full)
    {
        Ok(f) => f,
        Err(e) if gone(&e) => {
            return Ok(FileState {
                present: false,
                sha256: None,
            })
        }
        Err(e) => return Err(format!("cannot read: {e}")),
    };
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file; cannot hash it".to_string());
    }
    // The coordinator names the files; the agent runs as root. It only reveals a digest of
    // contents any local user could read, never of a secret such as /etc/shadow.
    if meta.mode() & 0o004 == 0 {
        return Err(
            "not readable by every local user; the agent hashes only world-readable files"
                .to_string(),
        );
    }
    if meta.size() > MAX_HASHED_FILE {
        return Err(format!(
            "larger than {} MiB; not hashed",
            MAX_HASHED_FILE / (1024 * 1024)
        ));
    }
    let version = Version::of(&meta);
    if let Some((v, h)) = cache.entries.get(path) {
        if *v == version {
            return Ok(FileState {
                present: true,
                sha256: Some(h.clone()),
            });
        }
    }
    let digest = sha256_capped(file, MAX_HASHED_FILE)?;
    cache.hashed += 1;
    // Cached only if the file did not change while it was read, and not just before.
    let unchanged = std::fs::metadata(&full).map(|m| Version::of(&m)).ok() == Some(version);
    if unchanged && !recent(version.ctime, cache.racy_ns) {
        cache
            .entries
            .insert(path.to_string(), (version, digest.clone()));
    }
    Ok(FileState {
        present: true,
        sha256: Some(digest),
    })
}

/// Lower-case hex SHA-256 of everything `r` gives, refusing more than `max` bytes.
fn sha256_capped(r: impl Read, max: u64) -> Result<String, String> {
    let mut h = Sha256::new();
    let mut r = r.take(max + 1);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("cannot read: {e}")),
        };
        total += n as u64;
        if total > max {
            return Err(format!(
                "larger than {} MiB; not hashed",
                max / (1024 * 1024)
            ));
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Whether a (seconds, nanoseconds) timestamp is less than `window_ns` ago (or in the future).
fn recent((secs, nsecs): (i64, i64), window_ns: i128) -> bool {
    let now = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(_) => return true,
    };
    let t = i128::from(secs) * 1_000_000_000 + i128::from(nsecs);
    now - t < window_ns
}

/// Not there: no such file, or a path component that is not a directory.
fn gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn secrets_are_not_hashed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(root.join("etc/shadow"), "root:$y$secret").unwrap();
        fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o640)).unwrap();
        let mut c = HashCache::default();
        // Presence may be reported; the digest may not.
        assert!(
            file_state(root, "/etc/shadow", false, &mut c)
                .unwrap()
                .present
        );
        let e = file_state(root, "/etc/shadow", true, &mut c).unwrap_err();
        assert!(e.contains("world-readable"), "{e}");
    }

    #[test]
    fn presence_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = HashCache::default();
        fs::create_dir_all(root.join("etc/ward")).unwrap();
        fs::write(root.join("etc/ward/abc"), "abc").unwrap();
        fs::write(root.join("etc/ward/empty"), "").unwrap();

        let s = file_state(root, "/etc/ward/abc", false, &mut c).unwrap();
        assert_eq!(
            s,
            FileState {
                present: true,
                sha256: None
            }
        );
        let s = file_state(root, "/etc/ward/abc", true, &mut c).unwrap();
        assert_eq!(s.sha256.as_deref(), Some(ABC_SHA256));
        let s = file_state(root, "/etc/ward/empty", true, &mut c).unwrap();
        assert_eq!(s.sha256.as_deref(), Some(EMPTY_SHA256));
        for missing in [
            "/etc/ward/nope",
            "/etc/ward/abc/below-a-file",
            "/no/such/dir",
        ] {
            for hash in [false, true] {
                let s = file_state(root, missing, hash, &mut c).unwrap();
                assert_eq!(
                    s,
                    FileState {
                        present: false,
                        sha256: None
                    },
                    "{missing}"
                );
            }
        }
        // A directory is present, but not hashable.
        assert!(
            file_state(root, "/etc/ward", false, &mut c)
                .unwrap()
                .present
        );
        assert_eq!(
            file_state(root, "/etc/ward", true, &mut c).unwrap_err(),
            "not a regular file; cannot hash it"
        );
        for bad in ["etc/ward/abc", "/etc/../etc/ward/abc", ""] {
            assert_eq!(
                file_state(root, bad, true, &mut c).unwrap_err(),
                "path must be absolute, without \"..\"",
                "{bad}"
            );
        }
    }

    #[test]
    fn fifos_are_not_opened_and_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut c = HashCache::default();
        let fifo = root.join("fifo");
        let p = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `p` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o600) }, 0);
        assert!(file_state(root, "/fifo", false, &mut c).unwrap().present);
        assert_eq!(
            file_state(root, "/fifo", true, &mut c).unwrap_err(),
            "not a regular file; cannot hash it"
        );
        fs::write(root.join("target"), "abc").unwrap();
        std::os::unix::fs::symlink("target", root.join("link")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
        let s = file_state(root, "/link", true, &mut c).unwrap();
        assert_eq!(s.sha256.as_deref(), Some(ABC_SHA256));
        assert!(
            !file_state(root, "/dangling", false, &mut c)
                .unwrap()
                .present
        );
    }

    #[test]
    fn unreadable_is_an_error() {
        // Root can read anything; only meaningful when not running as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        fs::write(&f, "x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o000)).unwrap();
        let e = file_state(dir.path(), "/secret", true, &mut HashCache::default()).unwrap_err();
        assert!(e.starts_with("cannot read: "), "{e}");
    }

    #[test]
    fn size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = fs::File::create(dir.path().join("big")).unwrap();
        f.set_len(MAX_HASHED_FILE + 1).unwrap();
        let mut c = HashCache::default();
        assert_eq!(
            file_state(dir.path(), "/big", true, &mut c).unwrap_err(),
            "larger than 64 MiB; not hashed"
        );
        assert!(
            file_state(dir.path(), "/big", false, &mut c)
                .unwrap()
                .present
        );
        assert_eq!(c.hashed, 0);
        // The reader enforces the limit too (a file that grows while being read).
        assert_eq!(
            sha256_capped(&b"abcd"[..], 3).unwrap_err(),
            "larger than 0 MiB; not hashed"
        );
        assert_eq!(sha256_capped(&b"abc"[..], 3).unwrap(), ABC_SHA256);
    }

    #[test]
    fn settled_files_are_cached_with_the_default_window() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "abc").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mut c = HashCache::default();
        for _ in 0..3 {
            file_state(dir.path(), "/f", true, &mut c).unwrap();
        }
        assert_eq!(c.hashed, 1);
    }

    #[test]
    fn cache_hits_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let path = root.join("f");
        fs::write(&path, "abc").unwrap();
        // Just written: not cached yet (racily clean).
        let mut c = HashCache::default();
        for _ in 0..2 {
            file_state(root, "/f", true, &mut c).unwrap();
        }
        assert_eq!(c.hashed, 2);
        // Without the racy window, to test the key without sleeping.
        let mut c = HashCache {
            racy_ns: 0,
            ..HashCache::default()
        };
        for _ in 0..5 {
            let s = file_state(root, "/f", true, &mut c).unwrap();
            assert_eq!(s.sha256.as_deref(), Some(ABC_SHA256));
        }
        assert_eq!(c.hashed, 1);

        // Same size, new contents: ctime (and mtime) move (after a clock tick).
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&path, "xyz").unwrap();
        let s = file_state(root, "/f", true, &mut c).unwrap();
        assert_ne!(s.sha256.as_deref(), Some(ABC_SHA256));
        assert_eq!(c.hashed, 2);

        // Replaced by another file (new inode) with the same contents and mtime.
        let tmp = root.join("f.new");
        fs::write(&tmp, "xyz").unwrap();
        fs::rename(&tmp, &path).unwrap();
        file_state(root, "/f", true, &mut c).unwrap();
        assert_eq!(c.hashed, 3);

        // Paths no longer wanted are forgotten.
        c.retain(&[("/f".to_string(), false)]);
        file_state(root, "/f", true, &mut c).unwrap();
        assert_eq!(c.hashed, 4);
        c.retain(&[("/f".to_string(), true)]);
        file_state(root, "/f", true, &mut c).unwrap();
        assert_eq!(c.hashed, 4);
    }
}
