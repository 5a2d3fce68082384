//! The local API socket: who can reach it, and what each caller may ask.
//!
//! The socket never exists at its path with looser permissions than its final ones: it is
//! bound inside a fresh 0700 directory next to its path, given its mode (and group) there,
//! then renamed into place. A directory the daemon creates for it is 0700 (0750 and group
//! `ward` when that group exists). The socket is 0600, or 0660 with group `ward`.
//!
//! Every connection's peer credentials (SO_PEERCRED) decide what it may do:
//! - root, and the user the daemon runs as: everything;
//! - members of the group `ward` (primary or listed in `/etc/group`), if the group exists:
//!   the read-only requests `status`, `posture` and `netcheck`;
//! - anyone else: nothing (a clear error, and a log line).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::api::Request;

/// The group whose members may run read-only commands.
pub const WARD_GROUP: &str = "ward";
/// Most of `/etc/group` or `/etc/passwd` read per lookup.
const MAX_DB: u64 = 4 * 1024 * 1024;

/// What a caller of the local API may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Every request.
    Full,
    /// `status`, `posture`, `netcheck`.
    ReadOnly,
    /// Nothing.
    Denied,
}

/// The group `ward`: its gid and listed members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WardGroup {
    pub gid: u32,
    pub members: Vec<String>,
}

/// A caller's access: root or the daemon's own user get everything, members of the `ward`
/// group read-only access, others none.
pub fn access_of(
    peer_uid: u32,
    peer_gid: u32,
    peer_name: Option<&str>,
    daemon_uid: u32,
    group: Option<&WardGroup>,
) -> Access {
    if peer_uid == 0 || peer_uid == daemon_uid {
        return Access::Full;
    }
    let member = group.is_some_and(|g| {
        g.gid == peer_gid || peer_name.is_some_and(|n| g.members.iter().any(|m| m == n))
    });
    if member {
        Access::ReadOnly
    } else {
        Access::Denied
    }
}

/// Whether `access` allows `req`; the refusal says what the caller may do instead.
pub fn authorize(access: Access, peer_uid: u32, req: &Request) -> Result<(), String> {
    let allowed = match access {
        Access::Full => true,
        Access::ReadOnly => !req.changes_state(),
        Access::Denied => false,
    };
    if allowed {
        return Ok(());
    }
    Err(format!(
        "permission denied: uid {peer_uid} may not run `{}` (root may run every command; \
         members of the group `{WARD_GROUP}` may run status, posture and netcheck)",
        req.name()
    ))
}

/// The `ward` group from a group file (`name:passwd:gid:member,member`).
pub fn parse_ward_group(text: &str) -> Option<WardGroup> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 4 || f[0] != WARD_GROUP {
            return None;
        }
        Some(WardGroup {
            gid: f[2].parse().ok()?,
            members: f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect(),
        })
    })
}

/// The user name of `uid` in a passwd file.
pub fn user_name(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok()? == uid).then(|| f[0].to_string())
    })
}

/// The `ward` group on this machine, if it exists (and `/etc/group` can be read).
pub fn ward_group() -> Option<WardGroup> {
    parse_ward_group(&read_db(Path::new("/etc/group"))?)
}

/// The access of a connected caller with these credentials, looked up now.
pub fn access_for(peer_uid: u32, peer_gid: u32) -> Access {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let daemon_uid = unsafe { libc::geteuid() };
    if peer_uid == 0 || peer_uid == daemon_uid {
        return Access::Full;
    }
    let group = ward_group();
    let name = group
        .as_ref()
        .and_then(|_| read_db(Path::new("/etc/passwd")))
        .and_then(|p| user_name(&p, peer_uid));
    access_of(
        peer_uid,
        peer_gid,
        name.as_deref(),
        daemon_uid,
        group.as_ref(),
    )
}

fn read_db(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_DB)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// Binds the API socket at `path` (see the module doc for its permissions). Refuses if
/// another daemon answers there; replaces a stale socket.
pub async fn bind_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    let group = ward_group();
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        bail!("the socket path {} has no directory", path.display());
    };
    let Some(file_name) = path.file_name() else {
        bail!("the socket path {} has no file name", path.display());
    };
    if !dir.exists() {
        let mode = if group.is_some() { 0o750 } else { 0o700 };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // The mode above is filtered by the umask: set it exactly.
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
        if let Some(g) = &group {
            std::os::unix::fs::chown(dir, None, Some(g.gid))
                .with_context(|| format!("giving {} to group {WARD_GROUP}", dir.display()))?;
        }
    }
    if fs::symlink_metadata(path).is_ok() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "another ward daemon is already listening on {}",
                path.display()
            );
        }
        fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    // Bound in a private directory, made strict there, then moved into place.
    let private = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let result = bind_private(&private.join("sock"), path, group.as_ref());
    let _ = fs::remove_dir_all(&private);
    result
}

fn bind_private(
    tmp: &Path,
    path: &Path,
    group: Option<&WardGroup>,
) -> Result<tokio::net::UnixListener> {
    let listener = tokio::net::UnixListener::bind(tmp)
        .with_context(|| format!("binding {}", path.display()))?;
    let mode = match group {
        Some(g) => {
            std::os::unix::fs::chown(tmp, None, Some(g.gid))
                .with_context(|| format!("giving {} to group {WARD_GROUP}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    fs::set_permissions(tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    fs::rename(tmp, path).with_context(|| format!("moving the socket to {}", path.display()))?;
    Ok(listener)
}

/// Logs a refused request (with the caller's uid, never its arguments).
pub fn log_refusal(uid: u32, req: &Request) {
    tracing::warn!(uid, request = req.name(), "local API request refused");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    fn up() -> Request {
        Request::Up {
            token: None,
            hostname: None,
            routes: Default::default(),
        }
    }

    #[test]
    fn root_may_do_everything_the_ward_group_may_read_others_nothing() {
        let g = WardGroup {
            gid: 990,
            members: vec!["alice".into()],
        };
        assert_eq!(access_of(0, 0, None, 0, Some(&g)), Access::Full);
        assert_eq!(
            access_of(1000, 1000, Some("alice"), 0, Some(&g)),
            Access::ReadOnly
        );
        assert_eq!(
            access_of(1001, 990, Some("bob"), 0, Some(&g)),
            Access::ReadOnly
        );
        assert_eq!(
            access_of(1002, 1002, Some("eve"), 0, Some(&g)),
            Access::Denied
        );
        assert_eq!(access_of(1002, 1002, Some("eve"), 0, None), Access::Denied);
        assert_eq!(
            access_of(1000, 1000, Some("alice"), 0, None),
            Access::Denied
        );
        // A daemon run by a user serves that user fully.
        assert_eq!(access_of(1000, 1000, None, 1000, None), Access::Full);

        for req in [Request::Status, Request::Posture, Request::Netcheck] {
            assert!(authorize(Access::ReadOnly, 1000, &req).is_ok());
            assert!(authorize(Access::Denied, 1002, &req).is_err());
        }
        for req in [up(), Request::Down] {
            assert!(authorize(Access::Full, 0, &req).is_ok());
            let e = authorize(Access::ReadOnly, 1000, &req).unwrap_err();
            assert!(
                e.starts_with("permission denied: uid 1000 may not run"),
                "{e}"
            );
        }
    }

    #[test]
    fn group_and_passwd_files() {
        let g = parse_ward_group("root:x:0:\nward:x:990:alice,bob\nwardx:x:5:eve\n").unwrap();
        assert_eq!(
            g,
            WardGroup {
                gid: 990,
                members: vec!["alice".into(), "bob".into()]
            }
        );
        assert_eq!(parse_ward_group("ward:x:991:\n").unwrap().members.len(), 0);
        assert_eq!(parse_ward_group("wardx:x:5:eve\nward:x:bad:\n"), None);
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 7), None);
    }
}
