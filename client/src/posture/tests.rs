//! The collector as a whole: over a fake root, with real custom-check scripts, and once over
//! the real machine.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ward_shared::posture::{FileState, Measured, PostureReport, PostureWants, Reading};
use ward_shared::wire::DeviceId;

use super::*;

const T0: i64 = 1_750_000_000_000;

/// A fake root with a Debian-like system: os-release, kernel, mountinfo on a plain disk, an
/// nft ruleset with a drop policy, no sessions, a dpkg database and two processes.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        f.write(
            "etc/os-release",
            include_str!("fixtures/os-release/debian-12"),
        );
        f.write("proc/sys/kernel/osrelease", "6.1.0-18-amd64\n");
        f.write(
            "proc/self/mountinfo",
            "27 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw\n",
        );
        f.write("sys/dev/block/8:2/dev", "8:2\n");
        f.write(
            ".ward-fixture/nft list ruleset",
            include_str!("fixtures/nft/input-drop.txt"),
        );
        f.write("var/lib/dpkg/status", "Package: ward\n");
        f.process(1, "systemd", b"/sbin/init\0");
        f.process(700, "sshd", b"/usr/sbin/sshd\0-D\0");
        f
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    /// A process running as root whose executable is its argv[0] (a root-owned file, made
    /// if missing).
    fn process(&self, pid: u32, comm: &str, cmdline: &[u8]) {
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap();
        let exe = String::from_utf8(argv0.to_vec()).unwrap();
        self.process_running(pid, comm, cmdline, &exe, 0, 0);
    }
    /// A process with the given `comm`, command line, executable (made if missing, owned by
    /// `exe_uid`, mode 0755) and user.
    fn process_running(
        &self,
        pid: u32,
        comm: &str,
        cmdline: &[u8],
        exe: &str,
        exe_uid: u32,
        uid: u32,
    ) {
        let file = self.root().join(exe.trim_start_matches('/'));
        if !file.exists() {
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            fs::write(&file, "#!/bin/true\n").unwrap();
            fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
            std::os::unix::fs::chown(&file, Some(exe_uid), Some(exe_uid)).unwrap();
        }
        let d = self.root().join(format!("proc/{pid}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(d.join("cmdline"), cmdline).unwrap();
        fs::write(
            d.join("status"),
            format!("Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n"),
        )
        .unwrap();
        let link = d.join("exe");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, link).unwrap();
    }
    fn collector(&self, checks: &[(&str, &Path)]) -> Collector {
        Collector::new(CollectorConfig {
            root: self.root().to_path_buf(),
            custom_checks: checks
                .iter()
                .map(|(n, p)| (n.to_string(), p.to_path_buf()))
                .collect(),
            custom_timeout: Duration::from_secs(1),
            full_interval: Duration::from_secs(30),
        })
    }
}

/// Writes an executable `#!/bin/sh` script.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn wants(processes: &[&str], files: &[(&str, bool)], custom: &[&str]) -> PostureWants {
    PostureWants {
        processes: processes.iter().map(|s| s.to_string()).collect(),
        files: files.iter().map(|(p, h)| (p.to_string(), *h)).collect(),
        custom: custom.iter().map(|s| s.to_string()).collect(),
    }
}

fn err<T: std::fmt::Debug>(m: &Measured<T>) -> &str {
    match &m.reading {
        Reading::Error(e) => e,
        Reading::Value(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn collects_every_signal_from_a_fake_root() {
    let f = Fake::new();
    f.write("etc/ward/policy.conf", "abc");
    let mut c = f.collector(&[]);
    let w = wants(
        &["sshd", "clamd"],
        &[("/etc/ward/policy.conf", true), ("/etc/missing", false)],
        &["disk-health"],
    );
    let r = c.collect(&w, DeviceId(7), 42, T0);
    assert_eq!(
        (r.device_id, r.seq, r.collected_at_ms),
        (DeviceId(7), 42, T0)
    );
    let os = r.os.get().unwrap();
    assert_eq!((os.id.as_str(), os.version.as_str()), ("debian", "12"));
    assert_eq!(r.kernel, Measured::value(T0, "6.1.0-18-amd64".to_string()));
    assert_eq!(r.ward_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(r.firewall, Measured::value(T0, true));
    assert_eq!(r.disk_encryption, Measured::value(T0, false));
    assert_eq!(r.screen_lock, Measured::value(T0, None));
    assert!(r.last_package_update_ms.get().is_ok());
    assert_eq!(r.processes["sshd"], Measured::value(T0, true));
    assert_eq!(r.processes["clamd"], Measured::value(T0, false));
    assert_eq!(
        r.files["/etc/ward/policy.conf"],
        Measured::value(
            T0,
            FileState {
                present: true,
                sha256: Some(
                    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into()
                )
            }
        )
    );
    assert_eq!(
        r.files["/etc/missing"],
        Measured::value(
            T0,
            FileState {
                present: false,
                sha256: None
            }
        )
    );
    assert_eq!(
        err(&r.custom["disk-health"]),
        "no executable configured for this check on this device"
    );
    // Nothing unasked for is reported.
    assert_eq!(r.processes.len() + r.files.len() + r.custom.len(), 5);
}

#[test]
fn unreadable_signals_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Collector::new(CollectorConfig {
        root: dir.path().to_path_buf(),
        ..CollectorConfig::default()
    });
    let r = c.collect(&wants(&["sshd"], &[], &[]), DeviceId(1), 1, T0);
    assert_eq!(
        err(&r.os),
        "/etc/os-release and /usr/lib/os-release not found"
    );
    assert!(err(&r.kernel).starts_with("/proc/sys/kernel/osrelease: "));
    assert_eq!(err(&r.firewall), "nft and iptables-save not found");
    assert!(err(&r.disk_encryption).starts_with("/proc/self/mountinfo: "));
    assert_eq!(r.screen_lock, Measured::value(T0, None));
    assert_eq!(
        err(&r.last_package_update_ms),
        "no package database found (dpkg, rpm, pacman, apk)"
    );
    assert!(err(&r.processes["sshd"]).starts_with("cannot list /proc: "));
}

#[test]
fn expensive_signals_are_cached_for_the_interval_cheap_ones_are_not() {
    let f = Fake::new();
    let mut c = f.collector(&[]);
    let w = wants(&["clamd"], &[("/etc/flag", false)], &[]);
    let r1 = c.collect(&w, DeviceId(1), 1, T0);
    assert_eq!(r1.os.get().unwrap().id, "debian");
    assert_eq!(r1.processes["clamd"].get(), Ok(&false));

    f.write(
        "etc/os-release",
        include_str!("fixtures/os-release/ubuntu-24.04"),
    );
    f.process(900, "clamd", b"/usr/sbin/clamd\0");
    f.write("etc/flag", "");
    let r2 = c.collect(&w, DeviceId(1), 2, T0 + 29_000);
    // Cached: same reading, same stamp.
    assert_eq!(r2.os, r1.os);
    assert_eq!(r2.os.at_ms, T0);
    // Read again on every call.
    assert_eq!(r2.processes["clamd"], Measured::value(T0 + 29_000, true));
    assert!(r2.files["/etc/flag"].get().unwrap().present);

    let r3 = c.collect(&w, DeviceId(1), 3, T0 + 30_000);
    assert_eq!(r3.os.get().unwrap().id, "ubuntu");
    assert_eq!(r3.os.at_ms, T0 + 30_000);

    // The clock going back (offset corrected) rereads too.
    f.write(
        "etc/os-release",
        include_str!("fixtures/os-release/fedora-40"),
    );
    let r4 = c.collect(&w, DeviceId(1), 4, T0 + 20_000);
    assert_eq!(r4.os.get().unwrap().id, "fedora");
}

#[test]
fn package_time_is_converted_to_coordinator_time() {
    let f = Fake::new();
    let local_mtime = system_time_ms(
        fs::metadata(f.root().join("var/lib/dpkg/status"))
            .unwrap()
            .modified()
            .unwrap(),
    );
    // The coordinator's clock is one hour ahead of this machine's.
    let offset = 3_600_000;
    let now = ward_runtime::now_ms() + offset;
    let r = f
        .collector(&[])
        .collect(&PostureWants::default(), DeviceId(1), 1, now);
    let got = *r.last_package_update_ms.get().unwrap();
    assert!(
        (got - (local_mtime + offset)).abs() < 5_000,
        "{got} vs {local_mtime}"
    );

    // Later databases are found when dpkg's is absent.
    for rel in [
        "var/lib/rpm/rpmdb.sqlite",
        "var/lib/pacman/local/x",
        "lib/apk/db/installed",
    ] {
        let f = Fake::new();
        fs::remove_dir_all(f.root().join("var/lib/dpkg")).unwrap();
        f.write(rel, "");
        let r = f
            .collector(&[])
            .collect(&PostureWants::default(), DeviceId(1), 1, T0);
        assert!(r.last_package_update_ms.get().is_ok(), "{rel}");
    }
}

#[test]
fn package_time_is_stable_while_the_offset_jitters() {
    let f = Fake::new();
    let mut c = Collector::new(CollectorConfig {
        root: f.root().to_path_buf(),
        // Read everything on every call.
        full_interval: Duration::ZERO,
        ..CollectorConfig::default()
    });
    let offset = -42_123;
    let w = PostureWants::default();
    let a = c.collect(&w, DeviceId(1), 1, ward_runtime::now_ms() + offset);
    std::thread::sleep(Duration::from_millis(30));
    // The daemon's idea of coordinator time, taken a few ms before the collector's own clock
    // reading: the offset seen here moves by a few ms.
    let b = c.collect(&w, DeviceId(1), 2, ward_runtime::now_ms() + offset - 7);
    assert_eq!(
        a.last_package_update_ms.get(),
        b.last_package_update_ms.get()
    );
    assert!(!values_differ(&a, &b));
    // A real change of offset (the clock was corrected) moves it.
    let c2 = c.collect(&w, DeviceId(1), 3, ward_runtime::now_ms() + offset + 60_000);
    assert_ne!(
        a.last_package_update_ms.get(),
        c2.last_package_update_ms.get()
    );
}

#[test]
fn wants_beyond_the_maximum_are_ignored() {
    let f = Fake::new();
    let mut c = f.collector(&[]);
    let many: Vec<String> = (0..MAX_WANTS + 10).map(|i| format!("p{i}")).collect();
    let w = PostureWants {
        processes: many.clone(),
        files: many.iter().map(|p| (format!("/{p}"), false)).collect(),
        custom: many.clone(),
    };
    let r = c.collect(&w, DeviceId(1), 1, T0);
    assert_eq!(r.processes.len(), MAX_WANTS);
    assert_eq!(r.files.len(), MAX_WANTS);
    assert_eq!(r.custom.len(), MAX_WANTS);
    assert!(c.warned_wants);
}

#[test]
fn values_differ_ignores_stamps_only() {
    let f = Fake::new();
    f.write("etc/f", "x");
    let w = wants(&["sshd"], &[("/etc/f", true)], &["c"]);
    let a = f.collector(&[]).collect(&w, DeviceId(1), 1, T0);
    let mut b = a.clone();
    b.seq = 99;
    b.collected_at_ms = T0 + 5_000;
    b.os.at_ms += 5_000;
    b.kernel.at_ms += 5_000;
    b.firewall.at_ms += 5_000;
    b.disk_encryption.at_ms += 5_000;
    b.screen_lock.at_ms += 5_000;
    b.last_package_update_ms.at_ms += 5_000;
    for m in b.processes.values_mut() {
        m.at_ms += 5_000;
    }
    for m in b.files.values_mut() {
        m.at_ms += 5_000;
    }
    for m in b.custom.values_mut() {
        m.at_ms += 5_000;
    }
    assert_ne!(a, b);
    assert!(!values_differ(&a, &b));
    assert!(!values_differ(&a, &a));

    let changes: Vec<fn(&mut PostureReport)> = vec![
        |r| r.device_id = DeviceId(2),
        |r| r.ward_version = "9.9.9".into(),
        |r| r.os = Measured::error(T0, "gone"),
        |r| r.kernel = Measured::value(T0, "6.2".into()),
        |r| r.firewall = Measured::value(T0, false),
        |r| r.disk_encryption = Measured::value(T0, true),
        |r| r.screen_lock = Measured::value(T0, Some(true)),
        |r| r.last_package_update_ms = Measured::value(T0, 1),
        |r| {
            r.processes
                .insert("sshd".into(), Measured::value(T0, false));
        },
        |r| {
            r.processes
                .insert("other".into(), Measured::value(T0, false));
        },
        |r| {
            r.processes.clear();
        },
        |r| {
            r.files.insert(
                "/etc/f".into(),
                Measured::value(
                    T0,
                    FileState {
                        present: true,
                        sha256: None,
                    },
                ),
            );
        },
        |r| {
            r.custom.insert(
                "c".into(),
                Measured::value(T0, serde_json::json!({"pass": true})),
            );
        },
        |r| {
            r.custom
                .insert("c".into(), Measured::error(T0, "another reason"));
        },
    ];
    for (i, change) in changes.iter().enumerate() {
        let mut c = b.clone();
        change(&mut c);
        assert!(values_differ(&a, &c), "change {i}");
        assert!(values_differ(&c, &a), "change {i}");
    }
}

#[test]
fn custom_checks() {
    let f = Fake::new();
    let bin = tempfile::tempdir().unwrap();
    let d = bin.path();
    let checks = [
        ("pass", script(d, "pass", r#"echo '{"pass":true}'"#)),
        (
            "exit1",
            script(d, "exit1", "echo 'disk not found' >&2\nexit 1"),
        ),
        ("garbage", script(d, "garbage", "echo 'all good!'")),
        ("array", script(d, "array", "echo '[1,2]'")),
        ("nothing", script(d, "nothing", "true")),
        ("huge", script(d, "huge", "yes | head -c 10000000")),
        ("killed", script(d, "killed", "kill -9 $$")),
        ("missing", d.join("does-not-exist")),
        (
            "env",
            script(
                d,
                "env",
                r#"printf '{"keys":"%s","path":"%s"}' "$(env | cut -d= -f1 | sort | tr '\n' ' ')" "$PATH""#,
            ),
        ),
    ];
    let cfg: Vec<(&str, &Path)> = checks.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let mut c = f.collector(&cfg);
    let names: Vec<&str> = checks.iter().map(|(n, _)| *n).collect();
    let r = c.collect(&wants(&[], &[], &names), DeviceId(1), 1, T0);

    assert_eq!(
        r.custom["pass"],
        Measured::value(T0, serde_json::json!({"pass": true}))
    );
    assert_eq!(
        err(&r.custom["exit1"]),
        "exited with status 1: disk not found"
    );
    assert_eq!(err(&r.custom["garbage"]), "did not print a JSON object");
    assert_eq!(err(&r.custom["array"]), "did not print a JSON object");
    assert_eq!(err(&r.custom["nothing"]), "did not print a JSON object");
    assert_eq!(err(&r.custom["huge"]), "printed more than 64 KiB");
    assert_eq!(err(&r.custom["killed"]), "killed by signal 9");
    assert_eq!(
        err(&r.custom["missing"]),
        format!(
            "cannot run {}: no such file",
            d.join("does-not-exist").display()
        )
    );
    // A clean, minimal environment: nothing of ours leaks into it.
    let env = r.custom["env"].get().unwrap();
    assert_eq!(env["path"], run::SAFE_PATH);
    let keys = env["keys"].as_str().unwrap();
    for k in keys.split_whitespace() {
        assert!(
            ["LC_ALL", "PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(&k),
            "{keys}"
        );
    }
}

#[test]
fn hanging_checks_are_killed_at_the_timeout_in_parallel() {
    let f = Fake::new();
    let bin = tempfile::tempdir().unwrap();
    let d = bin.path();
    let pids = d.join("pids");
    fs::create_dir(&pids).unwrap();
    let hang = script(d, "hang", "sleep 60");
    let hang2 = script(d, "hang2", "sleep 60");
    let hang3 = script(d, "hang3", "while :; do :; done");
    let stubborn = script(
        d,
        "stubborn",
        &format!(
            "trap '' TERM\nsleep 60 &\necho $! > {}/sleep\nwait",
            pids.display()
        ),
    );
    let pass = script(d, "pass", r#"echo '{"pass":true}'"#);
    let mut c = f.collector(&[
        ("hang", &hang),
        ("hang2", &hang2),
        ("hang3", &hang3),
        ("stubborn", &stubborn),
        ("pass", &pass),
    ]);
    let all = ["hang", "hang2", "hang3", "stubborn", "pass"];
    let started = Instant::now();
    let r = c.collect(&wants(&[], &[], &all), DeviceId(1), 1, T0);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    // In parallel: four 1 s timeouts do not add up (one after the other would take 4 s).
    assert!(took < Duration::from_millis(3500), "{took:?}");
    for name in ["hang", "hang2", "hang3", "stubborn"] {
        assert_eq!(
            err(&r.custom[name]),
            "did not finish within 1 s; killed",
            "{name}"
        );
    }
    assert!(r.custom["pass"].get().is_ok());

    // The stubborn check's child went with it (gone, or a zombie waiting for init).
    let pid: u32 = fs::read_to_string(pids.join("sleep"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleep {pid} still running: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Cached for the interval: a second call does not run (or wait for) them again.
    let started = Instant::now();
    let r2 = c.collect(&wants(&[], &[], &all), DeviceId(1), 2, T0 + 1_000);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(r2.custom, r.custom);
}

#[test]
fn checks_run_again_when_due_or_newly_wanted() {
    let f = Fake::new();
    let bin = tempfile::tempdir().unwrap();
    let d = bin.path();
    let count = d.join("count");
    let counter = script(
        d,
        "counter",
        &format!(
            "echo x >> {c}\nprintf '{{\"runs\":%d}}' $(wc -l < {c})",
            c = count.display()
        ),
    );
    let mut c = f.collector(&[("counter", &counter)]);
    let runs = |r: &PostureReport| r.custom["counter"].get().unwrap()["runs"].as_i64().unwrap();

    let r = c.collect(&wants(&[], &[], &["counter"]), DeviceId(1), 1, T0);
    assert_eq!(runs(&r), 1);
    let r = c.collect(&wants(&[], &[], &["counter"]), DeviceId(1), 2, T0 + 10_000);
    assert_eq!(runs(&r), 1);
    assert_eq!(r.custom["counter"].at_ms, T0);
    // No longer wanted: not reported, and forgotten.
    let r = c.collect(&PostureWants::default(), DeviceId(1), 3, T0 + 11_000);
    assert!(r.custom.is_empty());
    // Wanted again: runs at once.
    let r = c.collect(&wants(&[], &[], &["counter"]), DeviceId(1), 4, T0 + 12_000);
    assert_eq!(runs(&r), 2);
    // Due after the interval.
    let r = c.collect(&wants(&[], &[], &["counter"]), DeviceId(1), 5, T0 + 42_000);
    assert_eq!(runs(&r), 3);
}

#[test]
fn one_run_per_check_at_a_time() {
    let bin = tempfile::tempdir().unwrap();
    let slow = script(bin.path(), "slow", r#"sleep 1; echo '{"pass":true}'"#);
    let runner = run::Runner::new(Path::new("/"));
    let limits = run::Limits {
        timeout: Duration::from_secs(5),
        max_stdout: MAX_CUSTOM_OUTPUT,
    };
    std::thread::scope(|s| {
        let first = s.spawn(|| runner.check("slow", &slow, limits));
        std::thread::sleep(Duration::from_millis(300));
        let second = runner.check("slow", &slow, limits);
        assert_eq!(
            second.unwrap_err(),
            run::RunError::Failed("the previous run has not exited yet".into())
        );
        assert!(first.join().unwrap().unwrap().status.success());
    });
    // Free again once the first one is done.
    assert!(runner.check("slow", &slow, limits).is_ok());
}

#[test]
fn check_arguments() {
    assert_eq!(
        parse_check_arg("disk-health=/usr/local/libexec/ward/disk-health").unwrap(),
        (
            "disk-health".to_string(),
            PathBuf::from("/usr/local/libexec/ward/disk-health")
        )
    );
    assert_eq!(
        parse_check_arg("a=/x=y").unwrap(),
        ("a".to_string(), PathBuf::from("/x=y"))
    );
    for bad in [
        "disk-health",
        "=/bin/true",
        "Disk=/bin/true",
        "a b=/bin/true",
        "x=bin/true",
        "x=",
    ] {
        assert!(parse_check_arg(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_check_arg("x=rel").unwrap_err(),
        "posture check \"x=rel\": the executable's path must be absolute"
    );
}

#[test]
fn checks_from_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    script(d, "disk-health", "true");
    script(d, "av.sh", "true");
    script(d, ".hidden", "true");
    script(d, "Backup~", "true");
    fs::write(d.join("README"), "not executable").unwrap();
    fs::create_dir(d.join("subdir")).unwrap();
    fs::set_permissions(d.join("subdir"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(d.join("disk-health"), d.join("linked")).unwrap();
    let checks = checks_from_dir(d).unwrap();
    let names: Vec<&str> = checks.keys().map(String::as_str).collect();
    assert_eq!(names, ["av.sh", "disk-health", "linked"]);
    assert_eq!(checks["disk-health"], d.join("disk-health"));
    assert!(checks_from_dir(&d.join("nope")).is_err());
}

#[test]
fn real_machine() {
    let mut c = Collector::new(CollectorConfig::default());
    // Known by its executable's file name (this test runs as root from a root-owned build).
    let exe = fs::read_link("/proc/self/exe").unwrap();
    let own = exe.file_name().unwrap().to_str().unwrap();
    let w = wants(
        &[own],
        &[("/etc/os-release", true), ("/no/such/file", false)],
        &[],
    );
    let r = c.collect(&w, DeviceId(1), 1, ward_runtime::now_ms());
    let os = r.os.get().unwrap();
    assert!(!os.id.is_empty());
    let text = fs::read_to_string("/etc/os-release").unwrap();
    if Path::new("/etc/debian_version").exists() && !text.contains("ID_LIKE") {
        assert_eq!(os.id, "debian");
    }
    assert!(!r.kernel.get().unwrap().is_empty());
    assert_eq!(r.processes[own].get(), Ok(&true));
    assert!(r.files["/etc/os-release"].get().unwrap().sha256.is_some());
    assert!(!r.files["/no/such/file"].get().unwrap().present);
    // The rest depends on the machine; each is a value or a reason.
    for e in [r.firewall.get().err(), r.disk_encryption.get().err()]
        .into_iter()
        .flatten()
    {
        assert!(!e.is_empty());
    }
    eprintln!(
        "real machine: os={:?} kernel={:?} firewall={:?} disk={:?} screen={:?} packages={:?}",
        r.os.reading,
        r.kernel.reading,
        r.firewall.reading,
        r.disk_encryption.reading,
        r.screen_lock.reading,
        r.last_package_update_ms.reading
    );
}

#[test]
fn a_process_is_known_by_its_executable_and_user_not_by_the_name_it_gives_itself() {
    let f = Fake::new();
    // `exec -a osqueryd sleep`, as root: comm and argv[0] claim osqueryd.
    f.process_running(
        901,
        "osqueryd",
        b"osqueryd\x00100\x00",
        "/usr/bin/sleep",
        0,
        0,
    );
    // A user's own file named osqueryd.
    f.process_running(
        902,
        "osqueryd",
        b"/home/u/osqueryd\0",
        "/home/u/osqueryd",
        1000,
        0,
    );
    // The real executable, run by a user instead of root.
    f.process_running(
        903,
        "osqueryd",
        b"/usr/bin/osqueryd\0",
        "/usr/bin/osqueryd",
        0,
        1000,
    );
    let mut c = f.collector(&[]);
    let w = wants(&["osqueryd"], &[], &[]);
    let r = c.collect(&w, DeviceId(1), 1, T0);
    assert_eq!(r.processes["osqueryd"].get(), Ok(&false));
    // The real one, run by root.
    f.process_running(
        904,
        "osqueryd",
        b"/usr/bin/osqueryd\0",
        "/usr/bin/osqueryd",
        0,
        0,
    );
    let r = c.collect(&w, DeviceId(1), 2, T0 + 1000);
    assert_eq!(r.processes["osqueryd"].get(), Ok(&true));
}

#[test]
fn checks_anyone_but_root_could_change_are_refused_and_never_run() {
    use std::os::unix::fs::{chown, symlink};
    let f = Fake::new();
    let top = tempfile::tempdir().unwrap();
    let marker = top.path().join("ran");
    let body = format!("echo x >> {}; echo '{{\"pass\":true}}'", marker.display());
    // The check directory: root-owned, 0755.
    let d = top.path().join("checks");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    let good = script(&d, "good", r#"echo '{"pass":true}'"#);
    let user_owned = script(&d, "user-owned", &body);
    chown(&user_owned, Some(1000), Some(1000)).unwrap();
    let group_writable = script(&d, "group-writable", &body);
    fs::set_permissions(&group_writable, fs::Permissions::from_mode(0o775)).unwrap();
    // A root-owned script in a directory a user owns (who could swap it).
    let user_dir = top.path().join("user-dir");
    fs::create_dir(&user_dir).unwrap();
    chown(&user_dir, Some(1000), Some(1000)).unwrap();
    let in_user_dir = script(&user_dir, "check", &body);
    // A root-owned script in a directory anyone may write to (no sticky bit).
    let open_dir = top.path().join("open-dir");
    fs::create_dir(&open_dir).unwrap();
    fs::set_permissions(&open_dir, fs::Permissions::from_mode(0o777)).unwrap();
    let in_open_dir = script(&open_dir, "check", &body);
    // Symlinks from the check directory: one to a file beside it, one out of it.
    let outside = top.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
    let target = script(&outside, "elsewhere", &body);
    symlink(&target, d.join("escape")).unwrap();
    symlink(&good, d.join("alias")).unwrap();

    let checks = [
        ("good", good.clone()),
        ("alias", d.join("alias")),
        ("user-owned", user_owned),
        ("group-writable", group_writable),
        ("in-user-dir", in_user_dir),
        ("in-open-dir", in_open_dir),
        ("escape", d.join("escape")),
    ];
    let cfg: Vec<(&str, &Path)> = checks.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let mut c = f.collector(&cfg);
    let names: Vec<&str> = checks.iter().map(|(n, _)| *n).collect();
    let r = c.collect(&wants(&[], &[], &names), DeviceId(1), 1, T0);
    let pass = serde_json::json!({"pass": true});
    assert_eq!(r.custom["good"], Measured::value(T0, pass.clone()));
    assert_eq!(r.custom["alias"], Measured::value(T0, pass));
    for name in [
        "user-owned",
        "group-writable",
        "in-user-dir",
        "in-open-dir",
        "escape",
    ] {
        let e = err(&r.custom[name]);
        assert!(e.starts_with("refused: "), "{name}: {e}");
    }
    assert!(err(&r.custom["user-owned"]).contains("owned by uid 1000"));
    assert!(err(&r.custom["group-writable"]).contains("writable by group or others"));
    assert!(err(&r.custom["in-user-dir"]).contains("owned by uid 1000"));
    assert!(err(&r.custom["escape"]).contains("symlink out of"));
    assert!(!marker.exists(), "a refused check ran");
}
