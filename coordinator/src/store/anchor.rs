//! The audit chain's anchor outside the database: a key and a signed checkpoint.
//!
//! Every audit row's hash commits to every row before it, so whoever can rewrite the newest
//! row can rewrite the whole chain, and whoever can delete rows from the tail leaves a chain
//! that still verifies. Two things close that:
//!
//! - the chain head is keyed: the database's own `audit_head` row (row count, head hash) carries
//!   an HMAC-SHA256 under `audit.key`, a file in the data directory that never enters the
//!   database; a rewritten history needs a new head MAC, and the key is not in the file;
//! - a [`Checkpoint`] {row count, head hash, time}, MACed under the same key, is written to
//!   `audit.checkpoint` (temp file + fsync + rename + directory fsync) after every commit that
//!   appended audit rows, before the write is acknowledged. A database that comes back with
//!   fewer rows, or another row at the checkpoint's position, lost acknowledged writes.
//!
//! Nothing here reads the clock: times are passed in.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use ward_shared::secret::ct_eq;

/// The audit anchor key (HMAC-SHA256). Never logged.
#[derive(Clone)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(…)")
    }
}

impl AuditKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// The MAC of the database's head row (`audit_head`).
    pub fn head_mac(&self, rows: i64, head: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.0, &[b"ward-audit-head-v1", &rows.to_be_bytes(), head])
    }

    fn checkpoint_mac(&self, rows: i64, head: &[u8], time_ms: i64) -> [u8; 32] {
        hmac_sha256(
            &self.0,
            &[
                b"ward-audit-checkpoint-v1",
                &rows.to_be_bytes(),
                head,
                &time_ms.to_be_bytes(),
            ],
        )
    }
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(key);
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Where the audit chain ended when it was last anchored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Rows in the chain (its last `seq`; 0 for an empty log).
    pub rows: i64,
    /// Hex hash of row `rows` (32 zero bytes for an empty log).
    pub head: String,
    pub time_ms: i64,
    /// Hex HMAC-SHA256 under the audit key over rows, head and time.
    pub mac: String,
}

/// Why a checkpoint file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("no audit checkpoint at {0}")]
    Missing(String),
    #[error("audit checkpoint {path} is unreadable: {detail}")]
    Unreadable { path: String, detail: String },
    #[error("audit checkpoint {0} does not carry a valid MAC under audit.key (forged or edited)")]
    BadMac(String),
}

impl Checkpoint {
    pub fn new(key: &AuditKey, rows: i64, head: &[u8], time_ms: i64) -> Self {
        Self {
            rows,
            head: hex::encode(head),
            time_ms,
            mac: hex::encode(key.checkpoint_mac(rows, head, time_ms)),
        }
    }

    /// Reads and authenticates the checkpoint at `path` (at most 4 KiB are read).
    pub fn read(path: &Path, key: &AuditKey) -> Result<Self, CheckpointError> {
        let shown = path.display().to_string();
        let raw = match fs::read(path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Missing(shown))
            }
            Err(e) => {
                return Err(CheckpointError::Unreadable {
                    path: shown,
                    detail: e.to_string(),
                })
            }
        };
        if raw.len() > 4096 {
            return Err(CheckpointError::Unreadable {
                path: shown,
                detail: "larger than 4 KiB".into(),
            });
        }
        let cp: Checkpoint =
            serde_json::from_slice(&raw).map_err(|e| CheckpointError::Unreadable {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        let head = hex::decode(&cp.head).unwrap_or_default();
        let mac = hex::decode(&cp.mac).unwrap_or_default();
        if head.len() != 32
            || cp.rows < 0
            || !ct_eq(&mac, &key.checkpoint_mac(cp.rows, &head, cp.time_ms))
        {
            return Err(CheckpointError::BadMac(shown));
        }
        Ok(cp)
    }

    /// The head hash as bytes (validated by [`Checkpoint::read`] or built by [`Checkpoint::new`]).
    pub fn head_bytes(&self) -> Vec<u8> {
        hex::decode(&self.head).unwrap_or_default()
    }

    /// Writes the checkpoint durably and atomically: a temp file beside it, fsync, rename over
    /// the old one, fsync the directory. A crash leaves the old or the new checkpoint, never a
    /// torn one.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        // A temporary file of this writer's own: two writers sharing one would interleave their
        // bodies in it (each truncates, then writes from offset 0) and rename a garbled file.
        static WRITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("checkpoint.{}.{n}.tmp", std::process::id()));
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        let written = f.write_all(&body).and_then(|()| f.sync_all());
        drop(f);
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; with the key zero-padded to 32 bytes HMAC is
        // the same function (keys shorter than the block are zero-padded).
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// Writers racing on one checkpoint never leave a garbled file: every read in between and
    /// after verifies, and no temporary file is left behind.
    #[test]
    fn concurrent_checkpoint_writers_never_garble_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("audit.checkpoint");
        let key = AuditKey::from_bytes([7; 32]);
        Checkpoint::new(&key, 1, &[1; 32], 1)
            .write_atomic(&p)
            .unwrap();
        std::thread::scope(|s| {
            for w in 0..6u64 {
                let (p, key) = (&p, &key);
                s.spawn(move || {
                    for i in 0..60u64 {
                        // Bodies of different lengths: row counts of 1 to 18 digits.
                        let rows = 10i64.pow(((w * 7 + i) % 18) as u32);
                        Checkpoint::new(key, rows, &[w as u8; 32], i as i64)
                            .write_atomic(p)
                            .unwrap();
                    }
                });
            }
            for _ in 0..300 {
                Checkpoint::read(&p, &key).expect("a whole checkpoint at every moment");
            }
        });
        Checkpoint::read(&p, &key).unwrap();
        let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
    }

    #[test]
    fn checkpoint_round_trips_and_refuses_edits() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("audit.checkpoint");
        let key = AuditKey::from_bytes([7; 32]);
        assert!(matches!(
            Checkpoint::read(&p, &key),
            Err(CheckpointError::Missing(_))
        ));
        let cp = Checkpoint::new(&key, 5, &[9; 32], 1000);
        cp.write_atomic(&p).unwrap();
        assert_eq!(Checkpoint::read(&p, &key).unwrap(), cp);
        // Another key, or an edited row count, does not verify.
        assert!(matches!(
            Checkpoint::read(&p, &AuditKey::from_bytes([8; 32])),
            Err(CheckpointError::BadMac(_))
        ));
        let mut edited = cp.clone();
        edited.rows = 4;
        fs::write(&p, serde_json::to_vec(&edited).unwrap()).unwrap();
        assert!(matches!(
            Checkpoint::read(&p, &key),
            Err(CheckpointError::BadMac(_))
        ));
        fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            Checkpoint::read(&p, &key),
            Err(CheckpointError::Unreadable { .. })
        ));
    }
}
