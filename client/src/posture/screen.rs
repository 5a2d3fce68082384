//! Screen lock: does every graphical session lock its screen by itself when left idle?
//!
//! This is about the setting, not the moment: `LockedHint` (whether a session is locked right
//! now) would report `false` whenever the user is working, which is not what a policy's
//! `screen_lock = true` asks ("the screen locks itself").
//!
//! 1. Sessions come from systemd-logind's session files, `/run/systemd/sessions/ID`
//!    (`KEY=VALUE`; also written by elogind). A session is graphical when its `TYPE` is `x11`,
//!    `wayland` or `mir` and its `CLASS` is `user` (not the login screen's `greeter`), and it
//!    is not `closing`. No graphical session → `None` (nothing to lock), unless a display
//!    server socket exists without any logind session to describe it: then it is an error.
//! 2. Per session, by its `DESKTOP`:
//!    - GNOME (and Ubuntu's GNOME): `gsettings get org.gnome.desktop.screensaver
//!      lock-enabled` and `… org.gnome.desktop.session idle-delay`, run as the session's user
//!      (so the user's dconf settings, system defaults and overrides all apply). It locks
//!      itself when lock-enabled is true and idle-delay is not 0 (0 means never idle).
//!    - KDE Plasma: `Autolock` and `Timeout` in the `[Daemon]` group of `kscreenlockerrc`
//!      (`/etc/xdg/kscreenlockerrc`, then the user's `~/.config/kscreenlockerrc`); defaults
//!      true and 5 minutes.
//!    - Anything else: an error ("cannot tell whether desktop … locks the screen by itself").
//! 3. `Some(false)` if any session does not lock itself; otherwise an error if any session
//!    could not be told; otherwise `Some(true)`.

use std::io;
use std::path::Path;

use ward_shared::names::shorten;

use super::read_text;
use super::run::{Limits, RunError, Runner, User};
use super::COMMAND_TIMEOUT;

/// Largest session file, passwd or config file read.
const MAX_SMALL_FILE: usize = 1024 * 1024;
/// Most sessions looked at.
const MAX_SESSIONS: usize = 256;

/// One logind session, from its session file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub uid: Option<u32>,
    pub user: String,
    /// `TYPE`: `x11`, `wayland`, `tty`, `unspecified`.
    pub kind: String,
    /// `CLASS`: `user`, `greeter`, `lock-screen`, `background`.
    pub class: String,
    /// `STATE`: `online`, `active`, `closing`.
    pub state: String,
    /// `DESKTOP` (XDG_SESSION_DESKTOP): `GNOME`, `ubuntu`, `KDE`.
    pub desktop: String,
}

impl Session {
    /// A session with a screen that someone is logged in to.
    pub fn is_graphical(&self) -> bool {
        matches!(self.kind.as_str(), "x11" | "wayland" | "mir")
            && matches!(self.class.as_str(), "user" | "")
            && self.state != "closing"
    }
}

/// Parses a logind session file (`KEY=VALUE` lines).
pub fn parse_session(id: &str, text: &str) -> Session {
    let mut s = Session {
        id: id.to_string(),
        ..Session::default()
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = v.trim().to_string();
        match k.trim() {
            "UID" => s.uid = v.parse().ok(),
            "USER" => s.user = v,
            "TYPE" => s.kind = v,
            "CLASS" => s.class = v,
            "STATE" => s.state = v,
            "DESKTOP" => s.desktop = v,
            _ => {}
        }
    }
    s
}

/// Desktop families whose lock settings are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desktop {
    Gnome,
    Kde,
    Unknown,
}

/// The family of a session's `DESKTOP` (or an `XDG_CURRENT_DESKTOP`-style `ubuntu:GNOME`).
pub fn desktop_family(desktop: &str) -> Desktop {
    let d = desktop.to_ascii_lowercase();
    let parts: Vec<&str> = d.split(':').collect();
    if parts
        .iter()
        .any(|p| p.starts_with("gnome") || p.starts_with("ubuntu"))
    {
        Desktop::Gnome
    } else if parts.iter().any(|p| *p == "kde" || p.starts_with("plasma")) {
        Desktop::Kde
    } else {
        Desktop::Unknown
    }
}

/// A GVariant boolean as `gsettings get` prints it: `true` or `false`.
pub fn parse_gsettings_bool(out: &str) -> Result<bool, String> {
    match out.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("expected true or false, got {:?}", shorten(other))),
    }
}

/// A GVariant unsigned number as `gsettings get` prints it: `uint32 300` (or `300`).
pub fn parse_gsettings_uint(out: &str) -> Result<u32, String> {
    let t = out.trim();
    let n = t.strip_prefix("uint32 ").unwrap_or(t);
    n.trim()
        .parse()
        .map_err(|_| format!("expected a number, got {:?}", shorten(t)))
}

/// KDE's screen locker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdeLock {
    pub autolock: bool,
    /// Minutes idle before locking.
    pub timeout_min: u32,
}

impl Default for KdeLock {
    /// KDE's defaults: lock automatically after 5 minutes.
    fn default() -> Self {
        Self {
            autolock: true,
            timeout_min: 5,
        }
    }
}

impl KdeLock {
    pub fn locks(&self) -> bool {
        self.autolock && self.timeout_min > 0
    }
}

/// Applies a `kscreenlockerrc` (KConfig INI) over `base`: `Autolock` and `Timeout` in the
/// `[Daemon]` group; key and group modifiers like `[$i]` are ignored.
pub fn parse_kscreenlockerrc(text: &str, base: KdeLock) -> Result<KdeLock, String> {
    let mut out = base;
    let mut group = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            group = rest.split(']').next().unwrap_or_default().to_string();
            continue;
        }
        if group != "Daemon" {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = k.split('[').next().unwrap_or_default().trim();
        let v = v.trim();
        let at = |why: String| format!("line {}: {why}", n + 1);
        match key {
            "Autolock" => out.autolock = kde_bool(v).map_err(at)?,
            "Timeout" => {
                out.timeout_min = v
                    .parse()
                    .map_err(|_| at(format!("Timeout {:?} is not a number", shorten(v))))?
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The user with `uid` in a passwd file: (name, gid, home).
pub fn passwd_entry(text: &str, uid: u32) -> Option<(String, u32, String)> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[2].parse::<u32>().ok()? != uid {
            return None;
        }
        Some((f[0].to_string(), f[3].parse().ok()?, f[5].to_string()))
    })
}

/// Reads whether every graphical session locks itself (see the module doc).
pub(crate) fn read_screen_lock(root: &Path, runner: &Runner) -> Result<Option<bool>, String> {
    let sessions = list_sessions(root)?;
    let graphical: Vec<&Session> = sessions.iter().filter(|s| s.is_graphical()).collect();
    if graphical.is_empty() {
        if sessions.is_empty() {
            if let Some(socket) = display_socket(root) {
                return Err(format!(
                    "a display server is running ({socket}) but logind lists no session; \
                     cannot tell"
                ));
            }
        }
        return Ok(None);
    }
    let mut error = None;
    for s in graphical {
        match session_locks(root, runner, s) {
            Ok(true) => {}
            Ok(false) => return Ok(Some(false)),
            Err(e) => {
                error.get_or_insert(format!("session {}: {e}", s.id));
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(Some(true)),
    }
}

fn list_sessions(root: &Path) -> Result<Vec<Session>, String> {
    let dir = root.join("run/systemd/sessions");
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("/run/systemd/sessions: {e}")),
    };
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("/run/systemd/sessions: {e}"))?;
        // `ID.ref` entries are FIFOs; session ids have no dot.
        if let Some(name) = entry.file_name().to_str().filter(|n| !n.contains('.')) {
            names.push(name.to_string());
        }
    }
    names.sort();
    names.truncate(MAX_SESSIONS);
    let mut out = Vec::new();
    for name in names {
        match read_text(&dir.join(&name), MAX_SMALL_FILE) {
            Ok(text) => out.push(parse_session(&name, &text)),
            // Gone between listing and reading: logged out.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("/run/systemd/sessions/{name}: {e}")),
        }
    }
    Ok(out)
}

/// An X11 or Wayland socket, if one exists (`/tmp/.X11-unix/X0`, `/run/user/1000/wayland-0`).
fn display_socket(root: &Path) -> Option<String> {
    let x11 = std::fs::read_dir(root.join("tmp/.X11-unix"))
        .ok()
        .and_then(|rd| {
            rd.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with('X'))
                .map(|e| format!("/tmp/.X11-unix/{}", e.file_name().to_string_lossy()))
        });
    if x11.is_some() {
        return x11;
    }
    let users = std::fs::read_dir(root.join("run/user")).ok()?;
    for u in users.flatten() {
        let Ok(rd) = std::fs::read_dir(u.path()) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("wayland-") && !name.ends_with(".lock") {
                return Some(format!(
                    "/run/user/{}/{name}",
                    u.file_name().to_string_lossy()
                ));
            }
        }
    }
    None
}

fn session_locks(root: &Path, runner: &Runner, s: &Session) -> Result<bool, String> {
    let family = desktop_family(&s.desktop);
    if family == Desktop::Unknown {
        let shown = if s.desktop.is_empty() {
            "(none)".to_string()
        } else {
            format!("{:?}", shorten(&s.desktop))
        };
        return Err(format!(
            "cannot tell whether desktop {shown} locks the screen by itself"
        ));
    }
    let Some(uid) = s.uid else {
        return Err("no UID in the session file".to_string());
    };
    let passwd = read_text(&root.join("etc/passwd"), MAX_SMALL_FILE)
        .map_err(|e| format!("/etc/passwd: {e}"))?;
    let Some((name, gid, home)) = passwd_entry(&passwd, uid) else {
        return Err(format!("user {uid} is not in /etc/passwd"));
    };
    match family {
        Desktop::Gnome => {
            let user = User {
                uid,
                gid,
                name,
                home: home.into(),
            };
            let get = |schema: &str, key: &str| -> Result<String, String> {
                let limits = Limits {
                    timeout: COMMAND_TIMEOUT,
                    max_stdout: 4096,
                };
                match runner.tool("gsettings", &["get", schema, key], Some(&user), limits) {
                    Ok(out) => Ok(String::from_utf8_lossy(&out).into_owned()),
                    Err(RunError::NotFound) => Err("gsettings not found".to_string()),
                    Err(e) => Err(format!("gsettings get {schema} {key}: {e}")),
                }
            };
            let enabled =
                parse_gsettings_bool(&get("org.gnome.desktop.screensaver", "lock-enabled")?)
                    .map_err(|e| format!("lock-enabled: {e}"))?;
            let idle = parse_gsettings_uint(&get("org.gnome.desktop.session", "idle-delay")?)
                .map_err(|e| format!("idle-delay: {e}"))?;
            Ok(enabled && idle > 0)
        }
        Desktop::Kde => {
            let mut lock = KdeLock::default();
            let home_rel = home.trim_start_matches('/');
            for (rel, shown) in [
                (
                    "etc/xdg/kscreenlockerrc".to_string(),
                    "/etc/xdg/kscreenlockerrc".to_string(),
                ),
                (
                    format!("{home_rel}/.config/kscreenlockerrc"),
                    format!("{home}/.config/kscreenlockerrc"),
                ),
            ] {
                match read_text(&root.join(&rel), MAX_SMALL_FILE) {
                    Ok(text) => {
                        lock = parse_kscreenlockerrc(&text, lock)
                            .map_err(|e| format!("{shown}: {e}"))?
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{shown}: {e}")),
                }
            }
            Ok(lock.locks())
        }
        Desktop::Unknown => Err("unknown desktop".to_string()),
    }
}

fn kde_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(format!("{:?} is not a boolean", shorten(v))),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn session_files() {
        let s = parse_session("2", include_str!("fixtures/sessions/gnome-wayland"));
        assert_eq!(s.uid, Some(1000));
        assert_eq!((s.user.as_str(), s.kind.as_str()), ("alice", "wayland"));
        assert_eq!((s.class.as_str(), s.desktop.as_str()), ("user", "ubuntu"));
        assert!(s.is_graphical());

        let s = parse_session("4", include_str!("fixtures/sessions/kde-x11"));
        assert_eq!((s.kind.as_str(), s.desktop.as_str()), ("x11", "KDE"));
        assert!(s.is_graphical());

        assert!(!parse_session("c1", include_str!("fixtures/sessions/greeter")).is_graphical());
        assert!(!parse_session("7", include_str!("fixtures/sessions/ssh")).is_graphical());
        assert!(!parse_session("9", include_str!("fixtures/sessions/closing")).is_graphical());
        assert_eq!(
            parse_session("x", "garbage\n\0\n"),
            Session {
                id: "x".into(),
                ..Session::default()
            }
        );
    }

    #[test]
    fn desktops() {
        for d in [
            "GNOME",
            "gnome",
            "ubuntu",
            "ubuntu:GNOME",
            "gnome-xorg",
            "ubuntu-wayland",
        ] {
            assert_eq!(desktop_family(d), Desktop::Gnome, "{d}");
        }
        for d in ["KDE", "kde", "plasma", "plasmawayland"] {
            assert_eq!(desktop_family(d), Desktop::Kde, "{d}");
        }
        for d in ["", "xfce", "i3", "sway", "cinnamon"] {
            assert_eq!(desktop_family(d), Desktop::Unknown, "{d}");
        }
    }

    #[test]
    fn gsettings_values() {
        assert_eq!(parse_gsettings_bool("true\n"), Ok(true));
        assert_eq!(parse_gsettings_bool("false\n"), Ok(false));
        assert!(parse_gsettings_bool("").is_err());
        assert!(parse_gsettings_bool("No such schema “x”\n").is_err());
        assert_eq!(parse_gsettings_uint("uint32 300\n"), Ok(300));
        assert_eq!(parse_gsettings_uint("0"), Ok(0));
        assert!(parse_gsettings_uint("uint32 -1").is_err());
        assert!(parse_gsettings_uint("").is_err());
    }

    #[test]
    fn kscreenlockerrc_files() {
        let d = KdeLock::default();
        assert!(d.locks());
        let off = parse_kscreenlockerrc(include_str!("fixtures/kde/autolock-off"), d).unwrap();
        assert!(!off.autolock);
        assert!(!off.locks());
        let t = parse_kscreenlockerrc(include_str!("fixtures/kde/timeout-10"), d).unwrap();
        assert_eq!(
            t,
            KdeLock {
                autolock: true,
                timeout_min: 10
            }
        );
        // Other groups' keys do not count; modifiers are ignored.
        let t = parse_kscreenlockerrc(
            "[Greeter]\nAutolock=false\n[Daemon][$i]\nTimeout[$i]=0\n",
            d,
        )
        .unwrap();
        assert_eq!(
            t,
            KdeLock {
                autolock: true,
                timeout_min: 0
            }
        );
        assert!(!t.locks());
        assert_eq!(
            parse_kscreenlockerrc("[Daemon]\nAutolock=maybe\n", d).unwrap_err(),
            "line 2: \"maybe\" is not a boolean"
        );
        assert_eq!(
            parse_kscreenlockerrc("[Daemon]\nTimeout=soon\n", d).unwrap_err(),
            "line 2: Timeout \"soon\" is not a number"
        );
    }

    #[test]
    fn passwd_lookup() {
        let p = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\nbad line\n";
        assert_eq!(
            passwd_entry(p, 1000),
            Some(("alice".into(), 1000, "/home/alice".into()))
        );
        assert_eq!(passwd_entry(p, 0).map(|e| e.2), Some("/root".into()));
        assert_eq!(passwd_entry(p, 1001), None);
    }

    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Self {
            let t = Self(tempfile::tempdir().unwrap());
            t.write(
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n",
            );
            t
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.0.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn read(&self) -> Result<Option<bool>, String> {
            read_screen_lock(self.0.path(), &Runner::new(self.0.path()))
        }
    }

    #[test]
    fn no_sessions_or_no_graphical_session_is_none() {
        let t = Tree::new();
        assert_eq!(t.read(), Ok(None));
        t.write(
            "run/systemd/sessions/7",
            include_str!("fixtures/sessions/ssh"),
        );
        t.write(
            "run/systemd/sessions/c1",
            include_str!("fixtures/sessions/greeter"),
        );
        assert_eq!(t.read(), Ok(None));
    }

    #[test]
    fn display_without_logind_is_an_error() {
        let t = Tree::new();
        t.write("tmp/.X11-unix/X0", "");
        assert_eq!(
            t.read().unwrap_err(),
            "a display server is running (/tmp/.X11-unix/X0) but logind lists no session; cannot tell"
        );
        let t = Tree::new();
        t.write("run/user/1000/wayland-0", "");
        t.write("run/user/1000/wayland-0.lock", "");
        assert!(t.read().unwrap_err().contains("(/run/user/1000/wayland-0)"));
    }

    #[test]
    fn gnome_session() {
        let t = Tree::new();
        t.write(
            "run/systemd/sessions/2",
            include_str!("fixtures/sessions/gnome-wayland"),
        );
        // The FIFO logind keeps beside the file is skipped (a plain file here).
        t.write("run/systemd/sessions/2.ref", "");
        assert_eq!(t.read().unwrap_err(), "session 2: gsettings not found");
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.screensaver lock-enabled",
            "true\n",
        );
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.session idle-delay",
            "uint32 300\n",
        );
        assert_eq!(t.read(), Ok(Some(true)));
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.session idle-delay",
            "uint32 0\n",
        );
        assert_eq!(t.read(), Ok(Some(false)));
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.session idle-delay",
            "uint32 300\n",
        );
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.screensaver lock-enabled",
            "false\n",
        );
        assert_eq!(t.read(), Ok(Some(false)));
        t.write(
            ".ward-fixture/gsettings get org.gnome.desktop.screensaver lock-enabled",
            "huh\n",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "session 2: lock-enabled: expected true or false, got \"huh\""
        );
    }

    #[test]
    fn kde_session() {
        let t = Tree::new();
        t.write(
            "run/systemd/sessions/4",
            include_str!("fixtures/sessions/kde-x11"),
        );
        assert_eq!(t.read(), Ok(Some(true)));
        t.write("etc/xdg/kscreenlockerrc", "[Daemon]\nTimeout=15\n");
        assert_eq!(t.read(), Ok(Some(true)));
        t.write(
            "home/alice/.config/kscreenlockerrc",
            include_str!("fixtures/kde/autolock-off"),
        );
        assert_eq!(t.read(), Ok(Some(false)));
        t.write(
            "home/alice/.config/kscreenlockerrc",
            "[Daemon]\nAutolock=perhaps\n",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "session 4: /home/alice/.config/kscreenlockerrc: line 2: \"perhaps\" is not a boolean"
        );
    }

    #[test]
    fn unknown_desktop_or_user_is_an_error_but_a_known_false_wins() {
        let t = Tree::new();
        t.write(
            "run/systemd/sessions/3",
            "UID=1000\nUSER=alice\nTYPE=x11\nCLASS=user\nSTATE=active\nDESKTOP=xfce\n",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "session 3: cannot tell whether desktop \"xfce\" locks the screen by itself"
        );
        t.write(
            "run/systemd/sessions/4",
            include_str!("fixtures/sessions/kde-x11"),
        );
        t.write(
            "home/alice/.config/kscreenlockerrc",
            include_str!("fixtures/kde/autolock-off"),
        );
        assert_eq!(t.read(), Ok(Some(false)));

        let t = Tree::new();
        t.write(
            "run/systemd/sessions/5",
            "UID=1234\nTYPE=wayland\nCLASS=user\nDESKTOP=KDE\n",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "session 5: user 1234 is not in /etc/passwd"
        );
        t.write(
            "run/systemd/sessions/5",
            "TYPE=wayland\nCLASS=user\nDESKTOP=KDE\n",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "session 5: no UID in the session file"
        );
    }
}
