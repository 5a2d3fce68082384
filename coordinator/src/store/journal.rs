//! The narrowing journal: a small pre-allocated file that keeps revocations, user disables and
//! quarantines when the database cannot be written (a full disk), so they take effect at once
//! and a restart re-applies them before serving.
//!
//! `narrowing.journal` is [`SLOTS`] fixed slots of [`SLOT`] bytes, written in full (zeros) when
//! created, so recording an entry overwrites blocks the filesystem already allocated and needs
//! no free space. A slot is `[len: u16 BE][JSON entry][zero padding][SHA-256(len ‖ JSON)[..8]]`;
//! an all-zero slot is free; a slot whose checksum does not match (a torn write) is ignored.
//! Entries are written with `pwrite` + `fdatasync` before the action is acknowledged.

use crate::model::{Device, DeviceStatus, Quarantine, User};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Bytes per slot.
pub const SLOT: usize = 256;
/// Slots in the file (16 KiB in all).
pub const SLOTS: usize = 64;

/// A change that only takes access away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Narrowing {
    RevokeDevice { device: String },
    DisableUser { user: String },
    QuarantineDevice { device: String, reason: String },
}

/// One journaled change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at_ms: i64,
    pub change: Narrowing,
}

/// The open journal file.
pub struct Journal {
    file: File,
    /// What the file holds (read once at open, kept in step by `append` and `clear`): store
    /// reads overlay it, so a journaled change is in force for every reader at once.
    entries: Vec<Entry>,
}

impl Journal {
    /// Opens `path`, creating it full size (zeros, fsync'd) if it does not exist.
    pub fn open_or_create(path: &Path) -> io::Result<Self> {
        if !path.exists() {
            let tmp = path.with_extension("journal.tmp");
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&vec![0u8; SLOT * SLOTS])?;
            f.sync_all()?;
            drop(f);
            std::fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != (SLOT * SLOTS) as u64 {
            return Err(io::Error::other(format!(
                "{} is not {} bytes: restore it or remove it with the coordinator stopped",
                path.display(),
                SLOT * SLOTS
            )));
        }
        let mut j = Self {
            file,
            entries: Vec::new(),
        };
        j.entries = j.pending()?;
        Ok(j)
    }

    /// The entries recorded and not yet cleared, as last written or read (no file read).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entries recorded and not yet cleared, in slot order.
    pub fn pending(&self) -> io::Result<Vec<Entry>> {
        Ok(self
            .slots()?
            .into_iter()
            .filter_map(|s| s.map(|(_, e)| e))
            .collect())
    }

    /// Records `change` durably in the first free slot.
    pub fn append(&mut self, change: Narrowing, at_ms: i64) -> io::Result<()> {
        let slot = self
            .slots()?
            .iter()
            .position(|s| s.is_none())
            .ok_or_else(|| {
                io::Error::other("the narrowing journal is full; free disk space and restart")
            })?;
        let entry = Entry { at_ms, change };
        let bytes = encode(&entry)?;
        self.file.write_all_at(&bytes, (slot * SLOT) as u64)?;
        self.file.sync_data()?;
        self.entries.push(entry);
        Ok(())
    }

    /// Frees every slot (after the entries reached the database).
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.write_all_at(&vec![0u8; SLOT * SLOTS], 0)?;
        self.file.sync_data()?;
        self.entries.clear();
        Ok(())
    }

    fn slots(&self) -> io::Result<Vec<Option<(usize, Entry)>>> {
        let mut buf = vec![0u8; SLOT * SLOTS];
        self.file.read_exact_at(&mut buf, 0)?;
        Ok(buf
            .chunks_exact(SLOT)
            .enumerate()
            .map(|(i, s)| decode(s).map(|e| (i, e)))
            .collect())
    }
}

/// `d` as the journaled changes leave it: revoked, its user disabled, quarantined. A change
/// only ever takes access away, so a stale database row read while the disk is full never
/// brings a revoked device back.
pub fn narrow_device(entries: &[Entry], d: &mut Device) {
    for e in entries {
        match &e.change {
            Narrowing::RevokeDevice { device }
                if d.hostname.as_str() == device && d.status != DeviceStatus::Revoked =>
            {
                d.status = DeviceStatus::Revoked;
                d.revoked_ms = Some(e.at_ms);
            }
            Narrowing::DisableUser { user } if d.user.as_deref() == Some(user.as_str()) => {
                d.user_disabled = true;
            }
            Narrowing::QuarantineDevice { device, reason }
                if d.hostname.as_str() == device && d.quarantine.is_none() =>
            {
                d.quarantine = Some(Quarantine {
                    since_ms: e.at_ms,
                    reason: reason.clone(),
                    automatic: false,
                });
            }
            _ => {}
        }
    }
}

/// `u` as the journaled changes leave it (disabled).
pub fn narrow_user(entries: &[Entry], u: &mut User) {
    if entries
        .iter()
        .any(|e| matches!(&e.change, Narrowing::DisableUser { user } if *user == u.name))
    {
        u.disabled = true;
    }
}

fn encode(e: &Entry) -> io::Result<[u8; SLOT]> {
    let mut e = e.clone();
    // Keep a long quarantine reason from overflowing the slot.
    if let Narrowing::QuarantineDevice { reason, .. } = &mut e.change {
        *reason = reason.chars().take(80).collect();
    }
    let json = serde_json::to_vec(&e).map_err(io::Error::other)?;
    if json.len() > SLOT - 2 - 8 {
        return Err(io::Error::other("journal entry too long"));
    }
    let mut out = [0u8; SLOT];
    out[..2].copy_from_slice(&(json.len() as u16).to_be_bytes());
    out[2..2 + json.len()].copy_from_slice(&json);
    let sum = Sha256::digest(&out[..2 + json.len()]);
    out[SLOT - 8..].copy_from_slice(&sum[..8]);
    Ok(out)
}

fn decode(s: &[u8]) -> Option<Entry> {
    let len = u16::from_be_bytes([s[0], s[1]]) as usize;
    if len == 0 || len > SLOT - 2 - 8 {
        return None;
    }
    let sum = Sha256::digest(&s[..2 + len]);
    if sum[..8] != s[SLOT - 8..] {
        return None;
    }
    serde_json::from_slice(&s[2..2 + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_torn_slots_are_ignored_and_clear_frees() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("narrowing.journal");
        let mut j = Journal::open_or_create(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), (SLOT * SLOTS) as u64);
        assert!(j.pending().unwrap().is_empty());
        j.append(
            Narrowing::RevokeDevice {
                device: "laptop".into(),
            },
            1,
        )
        .unwrap();
        j.append(
            Narrowing::QuarantineDevice {
                device: "db".into(),
                reason: "x".repeat(1000),
            },
            2,
        )
        .unwrap();
        drop(j);
        // A torn third write: garbage without a matching checksum.
        let mut raw = std::fs::read(&p).unwrap();
        raw[2 * SLOT] = 0;
        raw[2 * SLOT + 1] = 20;
        raw[2 * SLOT + 2..2 * SLOT + 22].copy_from_slice(&[b'{'; 20]);
        std::fs::write(&p, &raw).unwrap();
        let mut j = Journal::open_or_create(&p).unwrap();
        let got = j.pending().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0].change,
            Narrowing::RevokeDevice {
                device: "laptop".into()
            }
        );
        j.clear().unwrap();
        assert!(j.pending().unwrap().is_empty());
        for i in 0..SLOTS {
            j.append(
                Narrowing::DisableUser {
                    user: format!("u{i}"),
                },
                i as i64,
            )
            .unwrap();
        }
        assert!(j
            .append(Narrowing::DisableUser { user: "one".into() }, 0)
            .is_err());
    }
}
