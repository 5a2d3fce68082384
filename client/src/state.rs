//! The device's durable identity: `STATE_DIR/state.json`, mode 0600, written atomically.
//!
//! A missing file means "not enrolled yet". A file that exists but cannot be read is an error
//! that stops the daemon: silently enrolling again would make a second device with the same
//! name and leave the first one's access in place.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ward_shared::wire::{Bytes, DeviceId};

pub const STATE_VERSION: u32 = 1;

#[derive(Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The coordinator address dialled first: the token's first, then the last one that gave
    /// a working session.
    pub coordinator: String,
    /// Every coordinator address of the instance (replicas), in failover order: the token's
    /// list, replaced by the one full netmaps carry. Empty in state files written before the
    /// list existed: `coordinator` alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<String>,
    pub ca_der: Bytes,
    pub device_id: DeviceId,
    pub hostname: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// PKCS#8 PEM of the device identity key (never leaves this file).
    pub identity_key_pem: String,
    pub cert_der: Bytes,
    pub cert_not_after_ms: i64,
    /// WireGuard private key (never leaves this file).
    pub wg_private_key: Bytes,
    /// `ward down` clears this; the daemon then stays off the network across restarts.
    pub enabled: bool,
    /// The coordinator's Ed25519 lease-signing key, pinned at enrollment.
    #[serde(default)]
    pub lease_key: Bytes,
    /// The last `ward up`'s route options (an exit node chosen survives a restart, so a
    /// crashed daemon does not come back with internet traffic outside the tunnel).
    #[serde(default)]
    pub routes: crate::agent::routes::RouteOptions,
}

impl State {
    /// The addresses to fail over among: the list, or `coordinator` alone when there is none.
    pub fn coordinator_list(&self) -> Vec<String> {
        if self.coordinators.is_empty() {
            vec![self.coordinator.clone()]
        } else {
            self.coordinators.clone()
        }
    }

    /// Parses and checks a state file's bytes: a corrupt file, another version or a bad key is
    /// an error that tells the operator what to do (never a fresh enrollment behind their back).
    pub fn parse(raw: &[u8]) -> Result<State> {
        let st: State = serde_json::from_slice(raw).map_err(|e| {
            anyhow::anyhow!(
                "is corrupt ({e}); refusing to start rather than enroll as a new device. \
                 Restore it from backup, or move it away and enroll again with `ward up --token`"
            )
        })?;
        if st.version != STATE_VERSION {
            bail!(
                "has version {}, this ward understands {STATE_VERSION}",
                st.version
            );
        }
        if st.wg_private_key.0.len() != 32 {
            bail!("is corrupt (bad WireGuard key)");
        }
        Ok(st)
    }
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("device_id", &self.device_id)
            .field("hostname", &self.hostname)
            .field("coordinator", &self.coordinator)
            .field("keys", &"<redacted>")
            .finish()
    }
}

pub struct StateFile {
    pub path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("state.json"),
        }
    }

    /// `Ok(None)` if the device has never enrolled.
    pub fn load(&self) -> Result<Option<State>> {
        let raw = match fs::read(&self.path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => bail!("cannot read state file {}: {e}", self.path.display()),
        };
        State::parse(&raw)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("state file {} {e}", self.path.display()))
    }

    /// Atomic replace: write a 0600 temp file, fsync, rename, fsync the directory.
    pub fn save(&self, st: &State) -> Result<()> {
        write_private(&self.path, &serde_json::to_vec_pretty(st)?)
    }
}

/// Replaces `path` atomically with `bytes`, readable by the owner only: a 0600 temp file
/// beside it (its directory created 0700 if missing), fsync, rename, fsync the directory.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("state path has no directory")?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("state path has no file name")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: STATE_VERSION,
            coordinator: "10.0.0.1:7443".into(),
            coordinators: Vec::new(),
            ca_der: Bytes(vec![1]),
            device_id: DeviceId(3),
            hostname: "alice".into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 3),
            ipv6: "fd00::3".parse().unwrap(),
            identity_key_pem: "PEM".into(),
            cert_der: Bytes(vec![2]),
            cert_not_after_ms: 5,
            wg_private_key: Bytes(vec![7; 32]),
            enabled: true,
            lease_key: Bytes(vec![3; 32]),
            routes: Default::default(),
        }
    }

    #[test]
    fn save_load_and_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        let sf = StateFile::new(&tmp.path().join("s"));
        assert!(sf.load().unwrap().is_none());
        sf.save(&sample()).unwrap();
        let mode = fs::metadata(&sf.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(sf.load().unwrap().unwrap().hostname, "alice");
        fs::write(&sf.path, b"{ not json").unwrap();
        let err = sf.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("refusing"), "{err}");
        assert!(!format!("{:?}", sample()).contains("PEM"));
    }
}
