//! `export-instance` / `import-instance`: the instance secrets every replica needs (CA
//! certificate and key, lease-signing key, audit key, config) carried in one file, so a
//! second host gets a data directory of its own (admin socket, audit checkpoint, narrowing
//! journal and replica id stay per host) that serves the same instance.
//!
//! The file is JSON `{"format": "ward-instance/1", "files": {NAME: HEX}}` holding only the
//! names in [`FILES`]; it is written 0600 and refused on import when anyone but its owner may
//! read it. Nothing here prints a key.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::datadir::{write_private, DataDir};

const FORMAT: &str = "ward-instance/1";

/// The files an instance consists of, and whether each must be present. The audit
/// checkpoint is carried so the new replica checks the shared log against it at its first
/// start (a checkpoint older than the database is accepted: the log only grew).
pub const FILES: [(&str, bool); 7] = [
    ("config.json", true),
    ("ca.der", true),
    ("ca.key", true),
    ("lease.key", true),
    ("audit.key", true),
    ("audit.checkpoint", true),
    (crate::oidc::SETTINGS_FILE, false),
];

#[derive(Serialize, Deserialize)]
struct InstanceFile {
    format: String,
    files: BTreeMap<String, String>,
}

/// What an export or import did, for the CLI to print (no secrets).
#[derive(Debug)]
pub struct Summary {
    pub files: Vec<String>,
    pub public_addr: String,
    pub ca_sha256: String,
}

/// Writes the instance in `dd` to `out` (a new file, 0600).
pub fn export(dd: &DataDir, out: &Path) -> Result<Summary> {
    let mut files = BTreeMap::new();
    for (name, required) in FILES {
        let p = dd.path.join(name);
        match fs::read(&p) {
            Ok(b) => {
                files.insert(name.to_string(), hex::encode(b));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading {} (is this a coordinator data directory?)",
                        p.display()
                    )
                })
            }
        }
    }
    let bytes = serde_json::to_vec(&InstanceFile {
        format: FORMAT.into(),
        files,
    })?;
    write_private(out, &bytes)
        .with_context(|| format!("writing the instance file {}", out.display()))?;
    summary(dd)
}

/// Creates the data directory `dd` (new or empty) from the instance file `file`. The file
/// must not be readable by group or others. `ward.db` is not created: point it at the shared
/// database (on SQLite a symlink to the one file; on PostgreSQL `--database`).
pub fn import(file: &Path, dd: &DataDir) -> Result<Summary> {
    let meta = fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "refusing {}: it holds the instance's private keys and is readable by others (mode {mode:o}); `chmod 600` it first",
            file.display()
        );
    }
    let raw = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let inst: InstanceFile = serde_json::from_slice(&raw)
        .with_context(|| format!("{} is not an instance file", file.display()))?;
    if inst.format != FORMAT {
        bail!(
            "{} is format {:?}; this coordinator reads {FORMAT:?}",
            file.display(),
            inst.format
        );
    }
    let mut files = Vec::new();
    for name in inst.files.keys() {
        if !FILES.iter().any(|(n, _)| n == name) {
            bail!(
                "{} names an unknown file {name:?}; refusing it",
                file.display()
            );
        }
    }
    for (name, required) in FILES {
        match inst.files.get(name) {
            Some(h) => {
                let b = hex::decode(h)
                    .with_context(|| format!("{name} in {} is corrupt", file.display()))?;
                files.push((name, b));
            }
            None if required => bail!("{} lacks {name}", file.display()),
            None => {}
        }
    }
    if dd.path.exists()
        && fs::read_dir(&dd.path)
            .with_context(|| format!("reading {}", dd.path.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty; refusing to import an instance there",
            dd.path.display()
        );
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dd.path)
        .with_context(|| format!("creating {}", dd.path.display()))?;
    fs::set_permissions(&dd.path, fs::Permissions::from_mode(0o700))?;
    for (name, b) in &files {
        write_private(&dd.path.join(name), b)?;
    }
    crate::store::journal::Journal::open_or_create(&dd.journal_path())?;
    // Everything must load before this directory is called a replica.
    dd.load_lease_key()?;
    dd.load_audit_key()?;
    summary(dd)
}

fn summary(dd: &DataDir) -> Result<Summary> {
    let cfg = dd.load_config()?;
    let ca = dd.load_ca()?;
    Ok(Summary {
        files: FILES
            .iter()
            .filter(|(n, _)| dd.path.join(n).exists())
            .map(|(n, _)| n.to_string())
            .collect(),
        public_addr: cfg.public_addr,
        ca_sha256: hex::encode(ca.fingerprint()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_instance_imports_into_a_new_replica_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DataDir::new(tmp.path().join("a"));
        a.init("10.0.0.1:7443", 1).unwrap();
        let file = tmp.path().join("inst.json");
        let s = export(&a, &file).unwrap();
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The file holds the keys; the summary does not.
        let lease_hex = fs::read_to_string(a.path.join("lease.key")).unwrap();
        assert!(!format!("{s:?}").contains(lease_hex.trim()));

        let b = DataDir::new(tmp.path().join("b"));
        let s2 = import(&file, &b).unwrap();
        assert_eq!(s2.ca_sha256, s.ca_sha256);
        assert_eq!(s2.public_addr, "10.0.0.1:7443");
        for (n, required) in FILES {
            if required {
                assert_eq!(
                    fs::read(a.path.join(n)).unwrap(),
                    fs::read(b.path.join(n)).unwrap(),
                    "{n}"
                );
                assert_eq!(
                    fs::metadata(b.path.join(n)).unwrap().permissions().mode() & 0o777,
                    0o600
                );
            }
        }
        assert!(b.journal_path().exists());
        assert!(!b.db_path().exists(), "the database is shared, not copied");
        assert_eq!(
            fs::metadata(&b.path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A second import into the same directory is refused.
        let err = import(&file, &b).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    #[test]
    fn import_refuses_a_readable_file_and_foreign_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DataDir::new(tmp.path().join("a"));
        a.init("10.0.0.1:7443", 1).unwrap();
        let file = tmp.path().join("inst.json");
        export(&a, &file).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = import(&file, &DataDir::new(tmp.path().join("b")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("readable by others"), "{err}");
        assert!(!tmp.path().join("b").exists());

        let evil = tmp.path().join("evil.json");
        let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
        v["files"]["../../etc/x"] = serde_json::json!("00");
        write_private(&evil, v.to_string().as_bytes()).unwrap();
        let err = import(&evil, &DataDir::new(tmp.path().join("c")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown file"), "{err}");

        let partial = tmp.path().join("partial.json");
        v["files"].as_object_mut().unwrap().remove("../../etc/x");
        v["files"].as_object_mut().unwrap().remove("lease.key");
        write_private(&partial, v.to_string().as_bytes()).unwrap();
        let err = import(&partial, &DataDir::new(tmp.path().join("d")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("lacks lease.key"), "{err}");
        // Export refuses to overwrite.
        assert!(export(&a, &file).is_err());
    }
}
