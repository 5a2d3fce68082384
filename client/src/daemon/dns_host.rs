//! Pointing the host's resolver at this device's resolver, and putting it back.
//!
//! Two ways, chosen by `--dns` (env `WARD_DNS`):
//! - `resolved`: systemd-resolved gets this device's resolver as the TUN's per-link DNS server
//!   with the routing domain `~<domain>` and no default route, so only Ward names go to Ward
//!   (`resolvectl dns/domain/default-route`; `resolvectl revert` on stop; the link's settings
//!   vanish with the TUN after a crash).
//! - `resolv.conf`: the file at `--resolv-conf` (env `WARD_RESOLV_CONF`, default
//!   /etc/resolv.conf) is backed up byte for byte into the state dir (0600) with a marker
//!   saying it is managed, then rewritten with this device's resolver as the only nameserver
//!   (the previous nameservers are where other names are forwarded). `ward down`, daemon exit
//!   and, after a crash, the next daemon start restore the backup byte for byte. A file that
//!   is a mount point (`ip netns exec` bind-mounts /etc/netns/NS/resolv.conf over
//!   /etc/resolv.conf) or a symlink is written in place; any other file atomically.
//!
//! `auto` (the default) picks `resolved` when systemd-resolved runs and the resolv.conf path is
//! the default one, else `resolv.conf`; `off` touches nothing.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ward_shared::names::DnsDomain;

/// The resolv.conf the host uses when none is given.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved's stub listens: the previous resolver in `resolved` mode.
const RESOLVED_STUB: &str = "127.0.0.53:53";
/// Largest resolv.conf read (a bigger one is not a resolv.conf; refuse to manage it).
const MAX_RESOLV_CONF: u64 = 64 * 1024;
const BACKUP: &str = "resolv.conf.ward-backup";
const MARKER: &str = "dns-managed.json";

/// What `--dns` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsSetting {
    Auto,
    Resolved,
    #[value(name = "resolv.conf")]
    ResolvConf,
    Off,
}

/// How the host is configured now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    #[serde(rename = "resolved")]
    Resolved,
    #[serde(rename = "resolv.conf")]
    ResolvConf,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Resolved => "resolved",
            Mode::ResolvConf => "resolv.conf",
        })
    }
}

/// The marker: which file is managed (the backup beside it holds its original bytes).
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    path: PathBuf,
}

/// The host side of DNS for one run of the data plane.
pub struct HostDns {
    mode: Mode,
    state_dir: PathBuf,
    resolv_conf: PathBuf,
    tun: String,
    applied: bool,
}

impl HostDns {
    /// Picks the mode; `None` for `off`.
    pub fn choose(
        setting: DnsSetting,
        resolv_conf: &Path,
        state_dir: &Path,
        tun: &str,
    ) -> Option<Self> {
        let mode = match setting {
            DnsSetting::Off => return None,
            DnsSetting::Resolved => Mode::Resolved,
            DnsSetting::ResolvConf => Mode::ResolvConf,
            DnsSetting::Auto => {
                if resolv_conf == Path::new(DEFAULT_RESOLV_CONF) && resolved_runs() {
                    Mode::Resolved
                } else {
                    Mode::ResolvConf
                }
            }
        };
        Some(Self {
            mode,
            state_dir: state_dir.to_path_buf(),
            resolv_conf: resolv_conf.to_path_buf(),
            tun: tun.to_string(),
            applied: false,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Points the host at `own` (this device's resolver addresses) for `domain`; returns the
    /// previous resolvers (where other names go). Idempotent: a second call rewrites the
    /// managed configuration without touching the backup.
    pub fn apply(&mut self, own: &[IpAddr], domain: &DnsDomain) -> Result<Vec<SocketAddr>> {
        match self.mode {
            Mode::Resolved => {
                let mut args = vec!["dns".to_string(), self.tun.clone()];
                args.extend(own.iter().map(|a| a.to_string()));
                resolvectl(&args)?;
                resolvectl(&["domain".into(), self.tun.clone(), format!("~{domain}")])?;
                resolvectl(&["default-route".into(), self.tun.clone(), "false".into()])?;
                self.applied = true;
                Ok(vec![RESOLVED_STUB.parse()?])
            }
            Mode::ResolvConf => {
                let original = if self.applied {
                    read_bounded(&self.backup())?
                } else {
                    // A leftover of a crash is put back first, so the backup holds the host's
                    // own file and never our rewrite.
                    restore_leftover(&self.state_dir)?;
                    let original = read_bounded(&self.resolv_conf)?;
                    write_private(&self.backup(), &original)?;
                    let marker = serde_json::to_vec(&Marker {
                        path: self.resolv_conf.clone(),
                    })?;
                    write_private(&self.state_dir.join(MARKER), &marker)?;
                    self.applied = true;
                    original
                };
                let previous = nameservers(&String::from_utf8_lossy(&original), own);
                let text = managed_text(own, domain, &String::from_utf8_lossy(&original));
                write_file(&self.resolv_conf, text.as_bytes())?;
                Ok(previous)
            }
        }
    }

    /// Puts the host's configuration back (byte for byte for resolv.conf).
    pub fn restore(&mut self) -> Result<()> {
        if !self.applied {
            return Ok(());
        }
        self.applied = false;
        match self.mode {
            Mode::Resolved => resolvectl(&["revert".into(), self.tun.clone()]),
            Mode::ResolvConf => restore_leftover(&self.state_dir).map(|_| ()),
        }
    }

    fn backup(&self) -> PathBuf {
        self.state_dir.join(BACKUP)
    }
}

/// Restores a resolv.conf this daemon managed when it stopped without restoring it (a crash,
/// `kill -9`); returns the path restored, if any. Run at daemon start, whatever `--dns` says.
pub fn restore_leftover(state_dir: &Path) -> Result<Option<PathBuf>> {
    let marker_path = state_dir.join(MARKER);
    let raw = match std::fs::read(&marker_path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", marker_path.display())),
    };
    let marker: Marker = serde_json::from_slice(&raw)
        .with_context(|| format!("{} is corrupt", marker_path.display()))?;
    let backup = state_dir.join(BACKUP);
    let original = read_bounded(&backup)?;
    write_file(&marker.path, &original)
        .with_context(|| format!("restoring {}", marker.path.display()))?;
    std::fs::remove_file(&marker_path)
        .with_context(|| format!("removing {}", marker_path.display()))?;
    let _ = std::fs::remove_file(&backup);
    Ok(Some(marker.path))
}

/// The nameservers of a resolv.conf, port 53, minus this device's own addresses.
pub fn nameservers(text: &str, own: &[IpAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        // A scoped IPv6 literal (fe80::1%eth0) is not a plain address; skipped.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|a| !own.contains(a))
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

/// The managed resolv.conf: this device's resolvers, the Ward domain first in the search list,
/// the original `search`/`domain` entries and `options` after.
fn managed_text(own: &[IpAddr], domain: &DnsDomain, original: &str) -> String {
    let mut out = String::from(
        "# Managed by ward (the Ward device agent); the original comes back on `ward down`.\n",
    );
    for a in own {
        out.push_str(&format!("nameserver {a}\n"));
    }
    let mut search = vec![domain.to_string()];
    let mut options = Vec::new();
    for l in original.lines() {
        let mut w = l.split_whitespace();
        match w.next() {
            Some("search") | Some("domain") => {
                search.extend(w.map(str::to_string).filter(|d| d != domain.as_str()))
            }
            Some("options") => options.push(l.trim().to_string()),
            _ => {}
        }
    }
    search.truncate(6);
    out.push_str(&format!("search {}\n", search.join(" ")));
    for o in options {
        out.push_str(&o);
        out.push('\n');
    }
    out
}

fn read_bounded(p: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if meta.len() > MAX_RESOLV_CONF {
        bail!(
            "{} is {} bytes; refusing to manage a file larger than {MAX_RESOLV_CONF}",
            p.display(),
            meta.len()
        );
    }
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// Writes a 0600 file atomically (state-dir files).
fn write_private(p: &Path, data: &[u8]) -> Result<()> {
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, p).with_context(|| format!("writing {}", p.display()))?;
    Ok(())
}

/// Writes the resolv.conf: in place for a mount point or a symlink (rename over a mount point
/// fails; over a symlink it would replace the link), atomically (same directory, rename)
/// otherwise, keeping the file's mode.
fn write_file(p: &Path, data: &[u8]) -> Result<()> {
    let link = std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    if link || is_mount_point(p) {
        return write_in_place(p, data);
    }
    let mode = std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "resolv.conf".into());
    let tmp = p.with_file_name(format!(".{name}.ward-tmp"));
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, p)?;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            let busy = e
                .downcast_ref::<std::io::Error>()
                .and_then(|e| e.raw_os_error())
                == Some(libc::EBUSY);
            if busy {
                write_in_place(p, data)
            } else {
                Err(e).with_context(|| format!("writing {}", p.display()))
            }
        }
    }
}

fn write_in_place(p: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p)
        .with_context(|| format!("writing {}", p.display()))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", p.display()))
}

/// Whether `p` is a mount point in this process's mount namespace.
fn is_mount_point(p: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(p) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mount(mp)) == canon)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn resolved_runs() -> bool {
    Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

fn resolvectl(args: &[String]) -> Result<()> {
    let out = std::process::Command::new("resolvectl")
        .args(args)
        .output()
        .context("running resolvectl")?;
    if !out.status.success() {
        bail!(
            "resolvectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;

    const ORIGINAL: &[u8] =
        b"# from dhcp\nsearch corp.example\nnameserver 192.0.2.1\nnameserver 2001:db8::1\noptions edns0 trust-ad\n\xff odd bytes kept\n";

    fn own() -> Vec<IpAddr> {
        vec!["100.64.0.7".parse().unwrap(), "fd00::7".parse().unwrap()]
    }

    fn host(dir: &Path, conf: &Path) -> HostDns {
        HostDns::choose(DnsSetting::ResolvConf, conf, dir, "ward0").unwrap()
    }

    #[test]
    fn resolv_conf_is_managed_and_restored_byte_for_byte() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let conf = d.path().join("resolv.conf");
        std::fs::write(&conf, ORIGINAL).unwrap();
        let mut h = host(&state, &conf);
        let prev = h.apply(&own(), &DnsDomain::default()).unwrap();
        assert_eq!(
            prev,
            vec![
                "192.0.2.1:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(
            text.contains("nameserver 100.64.0.7\nnameserver fd00::7\n"),
            "{text}"
        );
        assert!(
            text.contains("search ward.internal corp.example\n"),
            "{text}"
        );
        assert!(text.contains("options edns0 trust-ad\n"), "{text}");
        assert!(!text.contains("192.0.2.1"), "{text}");
        let backup = state.join(BACKUP);
        assert_eq!(std::fs::read(&backup).unwrap(), ORIGINAL);
        assert_eq!(
            std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(state.join(MARKER).exists());
        // Applying again (a new domain) keeps the backup of the host's file.
        h.apply(&own(), &DnsDomain::parse("corp.ward").unwrap())
            .unwrap();
        assert_eq!(std::fs::read(&backup).unwrap(), ORIGINAL);
        h.restore().unwrap();
        assert_eq!(std::fs::read(&conf).unwrap(), ORIGINAL);
        assert!(!state.join(MARKER).exists());
        assert!(!backup.exists());
    }

    #[test]
    fn a_crash_leftover_is_restored_at_the_next_start() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("resolv.conf");
        std::fs::write(&conf, ORIGINAL).unwrap();
        let mut h = host(d.path(), &conf);
        h.apply(&own(), &DnsDomain::default()).unwrap();
        drop(h); // a crash: no restore
        assert_ne!(std::fs::read(&conf).unwrap(), ORIGINAL);
        assert_eq!(restore_leftover(d.path()).unwrap(), Some(conf.clone()));
        assert_eq!(std::fs::read(&conf).unwrap(), ORIGINAL);
        assert_eq!(restore_leftover(d.path()).unwrap(), None);

        // A new run over a leftover backs up the host's file, not the rewrite.
        let mut h = host(d.path(), &conf);
        h.apply(&own(), &DnsDomain::default()).unwrap();
        drop(h);
        let mut h = host(d.path(), &conf);
        h.apply(&own(), &DnsDomain::default()).unwrap();
        h.restore().unwrap();
        assert_eq!(std::fs::read(&conf).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_symlinked_resolv_conf_stays_a_link() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("real.conf");
        std::fs::write(&target, ORIGINAL).unwrap();
        let conf = d.path().join("resolv.conf");
        std::os::unix::fs::symlink(&target, &conf).unwrap();
        let mut h = host(d.path(), &conf);
        h.apply(&own(), &DnsDomain::default()).unwrap();
        assert!(std::fs::symlink_metadata(&conf)
            .unwrap()
            .file_type()
            .is_symlink());
        h.restore().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), ORIGINAL);
    }

    #[test]
    fn a_missing_or_huge_resolv_conf_is_refused_and_nothing_is_left_behind() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("resolv.conf");
        let mut h = host(d.path(), &conf);
        assert!(h.apply(&own(), &DnsDomain::default()).is_err());
        std::fs::write(&conf, vec![b'#'; MAX_RESOLV_CONF as usize + 1]).unwrap();
        let err = h.apply(&own(), &DnsDomain::default()).unwrap_err();
        assert!(format!("{err:#}").contains("refusing"), "{err:#}");
        assert!(!d.path().join(MARKER).exists());
        assert!(!d.path().join(BACKUP).exists());
    }

    #[test]
    fn nameservers_skip_our_own_and_unparsable_entries() {
        let t =
            "nameserver 100.64.0.7\nnameserver fe80::1%eth0\n nameserver 10.0.0.1\nnameserver\n";
        assert_eq!(nameservers(t, &own()), vec!["10.0.0.1:53".parse().unwrap()]);
    }

    #[test]
    fn dns_off_configures_nothing() {
        assert!(HostDns::choose(DnsSetting::Off, Path::new("/x"), Path::new("/y"), "t").is_none());
    }
}
