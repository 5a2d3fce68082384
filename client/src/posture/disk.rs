//! Disk encryption: is the root filesystem on dm-crypt (LUKS, plain dm-crypt, BitLocker via
//! cryptsetup — anything device-mapper calls `CRYPT-`)?
//!
//! The device of `/` comes from `/proc/self/mountinfo` (its `major:minor`; for btrfs, whose
//! st_dev is an anonymous device, the mount source is resolved instead). Its sysfs entry
//! `/sys/dev/block/MAJ:MIN` says the rest: a device-mapper device whose `dm/uuid` starts with
//! `CRYPT-` is encrypted; any other device with `slaves/` (LVM, RAID) is encrypted when every
//! one of its slaves is (an LVM volume spanning one encrypted and one plain disk is not); a
//! device without slaves that is not a crypt device (a partition, a plain disk) is not.
//!
//! A root that is not on a block device cannot be judged from here and is an error, not
//! `false`: overlay (a container: the host's disk is not visible) reads "root filesystem is
//! overlay (container); cannot tell", and tmpfs, zfs, nfs and the like say what they are.
//! Either way the check fails (fail closed); the error says why.
//!
//! When sysfs has no entry for the device (sysfs not mounted), `lsblk -J` is the fallback.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use super::run::{Limits, RunError, Runner};
use super::{read_text, COMMAND_TIMEOUT};

/// Largest mountinfo read (hosts with thousands of mounts have a few MiB).
const MAX_MOUNTINFO: usize = 8 * 1024 * 1024;
/// Largest `lsblk -J` output read.
const MAX_LSBLK: usize = 4 * 1024 * 1024;
/// Deepest stack of block devices followed (partition → crypt → LVM → …).
const MAX_DEPTH: usize = 16;

/// The mount at `/`, from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootMount {
    pub major: u32,
    pub minor: u32,
    pub fstype: String,
    pub source: String,
}

/// Finds the mount at `/` in a mountinfo file (proc(5)): the last one listed, since a later
/// mount over `/` hides the earlier. Fields: id, parent, `major:minor`, root, mount point,
/// options, optional fields…, `-`, fstype, source, super options. Octal escapes (`\040`) in
/// the mount point and source are decoded.
pub fn parse_root_mount(mountinfo: &str) -> Result<RootMount, String> {
    let mut found = None;
    for (n, line) in mountinfo.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(' ').collect();
        let bad = || format!("mountinfo line {}: malformed", n + 1);
        if fields.len() < 10 {
            return Err(bad());
        }
        if unescape(fields[4]) != "/" {
            continue;
        }
        let Some(sep) = fields.iter().skip(6).position(|f| *f == "-").map(|i| i + 6) else {
            return Err(bad());
        };
        let (Some(fstype), Some(source)) = (fields.get(sep + 1), fields.get(sep + 2)) else {
            return Err(bad());
        };
        let Some((major, minor)) = parse_dev(fields[2]) else {
            return Err(bad());
        };
        found = Some(RootMount {
            major,
            minor,
            fstype: unescape(fstype),
            source: unescape(source),
        });
    }
    found.ok_or_else(|| "no filesystem is mounted at /".to_string())
}

/// Whether the filesystem mounted at `/` sits on a `crypt` device in `lsblk -J -o
/// NAME,TYPE,MOUNTPOINTS` (or the older `MOUNTPOINT`) output: every place it appears in the
/// device tree must have a `crypt` device above it (a volume spanning several disks appears
/// under each).
pub fn encrypted_from_lsblk(json: &str) -> Result<bool, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("lsblk output is not JSON: {e}"))?;
    let Some(devs) = v.get("blockdevices").and_then(|d| d.as_array()) else {
        return Err("lsblk output has no \"blockdevices\" list".to_string());
    };
    let mut roots = Vec::new();
    for d in devs {
        walk_lsblk(d, false, 0, &mut roots)?;
    }
    if roots.is_empty() {
        return Err("lsblk shows no device mounted at /".to_string());
    }
    Ok(roots.iter().all(|under_crypt| *under_crypt))
}

/// Reads whether the root filesystem is on dm-crypt.
pub(crate) fn read_disk_encryption(root: &Path, runner: &Runner) -> Result<bool, String> {
    let text = read_text(&root.join("proc/self/mountinfo"), MAX_MOUNTINFO)
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let mount = parse_root_mount(&text)?;
    if mount.fstype == "overlay" {
        return Err("root filesystem is overlay (container); cannot tell".to_string());
    }
    let (major, minor) = if mount.major != 0 {
        (mount.major, mount.minor)
    } else if mount.source.starts_with("/dev/") {
        // btrfs reports an anonymous device number; its source names the real device.
        device_of_source(root, &mount.source)?
    } else {
        return Err(format!(
            "root filesystem is {} ({}), not on a block device; cannot tell",
            mount.fstype, mount.source
        ));
    };
    let dev = root.join(format!("sys/dev/block/{major}:{minor}"));
    if !dev.exists() {
        return from_lsblk(runner)
            .map_err(|e| format!("/sys/dev/block/{major}:{minor} not found; lsblk: {e}"));
    }
    let mut seen = BTreeSet::new();
    encrypted(root, &dev, 0, &mut seen)
}

/// `MAJ:MIN` → numbers.
fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Decodes mountinfo's octal escapes (`\040` is a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/dev/mapper/root` → the `major:minor` of the block device it names.
fn device_of_source(root: &Path, source: &str) -> Result<(u32, u32), String> {
    let path = root.join(source.trim_start_matches('/'));
    let real = path
        .canonicalize()
        .map_err(|e| format!("root filesystem source {source}: {e}"))?;
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return Err(format!("root filesystem source {source}: no device name"));
    };
    let rel = format!("sys/class/block/{name}/dev");
    let text = read_text(&root.join(&rel), 64).map_err(|e| format!("/{rel}: {e}"))?;
    parse_dev(&text).ok_or_else(|| format!("/{rel}: not MAJ:MIN"))
}

/// Whether the block device at sysfs directory `dev` is encrypted (see the module doc).
fn encrypted(
    root: &Path,
    dev: &Path,
    depth: usize,
    seen: &mut BTreeSet<std::path::PathBuf>,
) -> Result<bool, String> {
    if depth > MAX_DEPTH {
        return Err("block devices are stacked too deep".to_string());
    }
    // Loops cannot happen in a real sysfs; a fake or corrupted tree must not hang us.
    let key = dev.canonicalize().unwrap_or_else(|_| dev.to_path_buf());
    if !seen.insert(key) {
        return Err("block device stack has a cycle".to_string());
    }
    match read_text(&dev.join("dm/uuid"), 256) {
        Ok(uuid) if uuid.trim().starts_with("CRYPT-") => return Ok(true),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", shown(root, &dev.join("dm/uuid")))),
    }
    let slaves = match std::fs::read_dir(dev.join("slaves")) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(format!("{}: {e}", shown(root, &dev.join("slaves")))),
    };
    let mut names = Vec::new();
    for entry in slaves {
        let entry = entry.map_err(|e| format!("{}: {e}", shown(root, &dev.join("slaves"))))?;
        names.push(entry.file_name());
    }
    if names.is_empty() {
        return Ok(false);
    }
    names.sort();
    for name in names {
        let slave = root.join("sys/class/block").join(&name);
        if !encrypted(root, &slave, depth + 1, seen)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A path under `root` as it is on the device (`/sys/…`), for messages.
fn shown(root: &Path, p: &Path) -> String {
    match p.strip_prefix(root) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => p.display().to_string(),
    }
}

fn from_lsblk(runner: &Runner) -> Result<bool, String> {
    let limits = Limits {
        timeout: COMMAND_TIMEOUT,
        max_stdout: MAX_LSBLK,
    };
    // MOUNTPOINTS (util-linux ≥ 2.37) lists every mount point of a device; MOUNTPOINT only one.
    let out = match runner.tool(
        "lsblk",
        &["-J", "-o", "NAME,TYPE,MOUNTPOINTS"],
        None,
        limits,
    ) {
        Ok(out) => out,
        Err(RunError::NotFound) => return Err("not found".to_string()),
        Err(_) => runner
            .tool("lsblk", &["-J", "-o", "NAME,TYPE,MOUNTPOINT"], None, limits)
            .map_err(|e| e.to_string())?,
    };
    encrypted_from_lsblk(&String::from_utf8_lossy(&out))
}

fn walk_lsblk(
    d: &serde_json::Value,
    under_crypt: bool,
    depth: usize,
    roots: &mut Vec<bool>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("lsblk device tree is too deep".to_string());
    }
    let under_crypt = under_crypt || d.get("type").and_then(|t| t.as_str()) == Some("crypt");
    let single = d.get("mountpoint").and_then(|m| m.as_str()) == Some("/");
    let multi = d
        .get("mountpoints")
        .and_then(|m| m.as_array())
        .is_some_and(|ms| ms.iter().any(|m| m.as_str() == Some("/")));
    if single || multi {
        roots.push(under_crypt);
    }
    if let Some(children) = d.get("children").and_then(|c| c.as_array()) {
        for c in children {
            walk_lsblk(c, under_crypt, depth + 1, roots)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn mountinfo_fixtures() {
        let m = parse_root_mount(include_str!("fixtures/mountinfo/plain")).unwrap();
        assert_eq!((m.major, m.minor), (254, 0));
        assert_eq!((m.fstype.as_str(), m.source.as_str()), ("ext4", "/dev/vda"));

        let m = parse_root_mount(include_str!("fixtures/mountinfo/luks")).unwrap();
        assert_eq!((m.major, m.minor, m.fstype.as_str()), (253, 1, "ext4"));
        assert_eq!(m.source, "/dev/mapper/vg0-root");

        let m = parse_root_mount(include_str!("fixtures/mountinfo/overlay")).unwrap();
        assert_eq!((m.major, m.minor, m.fstype.as_str()), (0, 48, "overlay"));

        let m = parse_root_mount(include_str!("fixtures/mountinfo/btrfs")).unwrap();
        assert_eq!((m.major, m.fstype.as_str()), (0, "btrfs"));
        assert_eq!(m.source, "/dev/mapper/luks-0d1e");

        // The later mount at / hides the earlier one; escapes are decoded.
        let text =
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:5 / / rw shared:1 - tmpfs my\\040root rw\n";
        let m = parse_root_mount(text).unwrap();
        assert_eq!(
            (m.major, m.fstype.as_str(), m.source.as_str()),
            (0, "tmpfs", "my root")
        );
    }

    #[test]
    fn mountinfo_errors() {
        assert_eq!(
            parse_root_mount("22 27 0:21 / /proc rw,relatime - proc proc rw\n").unwrap_err(),
            "no filesystem is mounted at /"
        );
        assert_eq!(
            parse_root_mount("").unwrap_err(),
            "no filesystem is mounted at /"
        );
        assert_eq!(
            parse_root_mount("garbage\n").unwrap_err(),
            "mountinfo line 1: malformed"
        );
        assert_eq!(
            parse_root_mount("1 0 x:y / / rw - ext4 /dev/sda1 rw\n").unwrap_err(),
            "mountinfo line 1: malformed"
        );
        assert_eq!(
            parse_root_mount("1 0 8:1 / / rw a b c d\n").unwrap_err(),
            "mountinfo line 1: malformed"
        );
    }

    #[test]
    fn lsblk_fixtures() {
        let cases = [
            ("plain", Ok(false)),
            ("luks", Ok(true)),
            ("lvm-on-luks", Ok(true)),
            ("luks-old-mountpoint", Ok(true)),
            ("lvm-spanning-plain-and-luks", Ok(false)),
        ];
        let read = |name: &str| -> String {
            fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("src/posture/fixtures/lsblk")
                    .join(format!("{name}.json")),
            )
            .unwrap()
        };
        for (name, want) in cases {
            assert_eq!(encrypted_from_lsblk(&read(name)), want, "{name}");
        }
    }

    #[test]
    fn lsblk_errors() {
        assert!(encrypted_from_lsblk("not json")
            .unwrap_err()
            .starts_with("lsblk output is not JSON"));
        assert_eq!(
            encrypted_from_lsblk("{}").unwrap_err(),
            "lsblk output has no \"blockdevices\" list"
        );
        assert_eq!(
            encrypted_from_lsblk(
                r#"{"blockdevices":[{"name":"sda","type":"disk","mountpoints":[null]}]}"#
            )
            .unwrap_err(),
            "lsblk shows no device mounted at /"
        );
    }

    /// A fake root: mountinfo with `/` on `dev`, and sysfs entries.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new(root_line: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let t = Self { dir };
            t.write(
                "proc/self/mountinfo",
                &format!("22 27 0:21 / /proc rw,relatime - proc proc rw\n{root_line}\n"),
            );
            t
        }
        fn root(&self) -> &Path {
            self.dir.path()
        }
        fn write(&self, rel: &str, text: &str) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        /// A block device `name` with number `dev`, as sysfs has it: the device directory
        /// under /sys/devices, and /sys/dev/block/MAJ:MIN and /sys/class/block/NAME symlinks.
        fn block(&self, name: &str, dev: &str, dm_uuid: Option<&str>, slaves: &[&str]) {
            let real = format!("sys/devices/virtual/block/{name}");
            self.write(&format!("{real}/dev"), &format!("{dev}\n"));
            if let Some(u) = dm_uuid {
                self.write(&format!("{real}/dm/uuid"), &format!("{u}\n"));
            }
            if !slaves.is_empty() {
                fs::create_dir_all(self.root().join(&real).join("slaves")).unwrap();
            }
            for s in slaves {
                std::os::unix::fs::symlink(
                    format!("../../{s}"),
                    self.root().join(&real).join("slaves").join(s),
                )
                .unwrap();
            }
            for dir in ["sys/dev/block", "sys/class/block"] {
                fs::create_dir_all(self.root().join(dir)).unwrap();
            }
            std::os::unix::fs::symlink(
                format!("../../devices/virtual/block/{name}"),
                self.root().join("sys/dev/block").join(dev),
            )
            .unwrap();
            std::os::unix::fs::symlink(
                format!("../../devices/virtual/block/{name}"),
                self.root().join("sys/class/block").join(name),
            )
            .unwrap();
        }
        fn read(&self) -> Result<bool, String> {
            read_disk_encryption(self.root(), &Runner::new(self.root()))
        }
    }

    #[test]
    fn plain_disk_is_not_encrypted() {
        let t = Tree::new("27 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw");
        t.block("sda2", "8:2", None, &[]);
        assert_eq!(t.read(), Ok(false));
    }

    #[test]
    fn luks_is_encrypted() {
        let t = Tree::new("27 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw");
        t.block("sda2", "8:2", None, &[]);
        t.block("dm-0", "253:0", Some("CRYPT-LUKS2-0d1e2f-root"), &["sda2"]);
        assert_eq!(t.read(), Ok(true));
    }

    #[test]
    fn lvm_on_luks_is_encrypted() {
        let t = Tree::new("27 1 253:1 / / rw,relatime - ext4 /dev/mapper/vg0-root rw");
        t.block("nvme0n1p3", "259:3", None, &[]);
        t.block(
            "dm-0",
            "253:0",
            Some("CRYPT-LUKS2-aaaa-luks"),
            &["nvme0n1p3"],
        );
        t.block("dm-1", "253:1", Some("LVM-Zr3cUXq7gBHkTq5X"), &["dm-0"]);
        assert_eq!(t.read(), Ok(true));
    }

    #[test]
    fn lvm_without_luks_is_not_encrypted() {
        let t = Tree::new("27 1 253:1 / / rw,relatime - ext4 /dev/mapper/vg0-root rw");
        t.block("sda2", "8:2", None, &[]);
        t.block("dm-1", "253:1", Some("LVM-Zr3cUXq7gBHkTq5X"), &["sda2"]);
        assert_eq!(t.read(), Ok(false));
    }

    #[test]
    fn lvm_spanning_a_plain_disk_is_not_encrypted() {
        let t = Tree::new("27 1 253:2 / / rw,relatime - ext4 /dev/mapper/vg0-root rw");
        t.block("sda2", "8:2", None, &[]);
        t.block("sdb1", "8:17", None, &[]);
        t.block("dm-0", "253:0", Some("CRYPT-LUKS2-aaaa-luks"), &["sda2"]);
        t.block("dm-2", "253:2", Some("LVM-xyz"), &["dm-0", "sdb1"]);
        assert_eq!(t.read(), Ok(false));
    }

    #[test]
    fn btrfs_on_luks_is_resolved_through_its_source() {
        let t = Tree::new("27 1 0:33 /@ / rw,relatime - btrfs /dev/mapper/luks-0d1e rw");
        t.block("sda2", "8:2", None, &[]);
        t.block(
            "dm-0",
            "253:0",
            Some("CRYPT-LUKS2-0d1e-luks-0d1e"),
            &["sda2"],
        );
        fs::create_dir_all(t.root().join("dev/mapper")).unwrap();
        fs::write(t.root().join("dev/dm-0"), "").unwrap();
        std::os::unix::fs::symlink("../dm-0", t.root().join("dev/mapper/luks-0d1e")).unwrap();
        assert_eq!(t.read(), Ok(true));
    }

    #[test]
    fn overlay_and_other_roots_cannot_be_told() {
        let t = Tree::new(
            "1203 1120 0:48 / / rw,relatime master:290 - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c",
        );
        assert_eq!(
            t.read().unwrap_err(),
            "root filesystem is overlay (container); cannot tell"
        );
        let t = Tree::new("27 1 0:25 / / rw - zfs rpool/ROOT/debian rw,xattr");
        assert_eq!(
            t.read().unwrap_err(),
            "root filesystem is zfs (rpool/ROOT/debian), not on a block device; cannot tell"
        );
    }

    #[test]
    fn missing_pieces_are_errors() {
        let t = Tree::new("27 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw");
        // No sysfs entry and no lsblk.
        assert_eq!(
            t.read().unwrap_err(),
            "/sys/dev/block/8:2 not found; lsblk: not found"
        );
        // lsblk as the fallback.
        t.write(
            ".ward-fixture/lsblk -J -o NAME,TYPE,MOUNTPOINTS",
            include_str!("fixtures/lsblk/luks.json"),
        );
        assert_eq!(t.read(), Ok(true));

        let dir = tempfile::tempdir().unwrap();
        let err = read_disk_encryption(dir.path(), &Runner::new(dir.path())).unwrap_err();
        assert!(err.starts_with("/proc/self/mountinfo: "), "{err}");
    }

    #[test]
    fn cycles_are_errors() {
        let t = Tree::new("27 1 253:0 / / rw,relatime - ext4 /dev/mapper/x rw");
        t.block("dm-0", "253:0", Some("LVM-a"), &["dm-1"]);
        t.block("dm-1", "253:1", Some("LVM-b"), &["dm-0"]);
        assert_eq!(t.read().unwrap_err(), "block device stack has a cycle");
    }
}
