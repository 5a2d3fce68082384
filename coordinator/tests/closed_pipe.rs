//! Listings stop quietly when their reader goes away (`ward-coordinator audit | head -1`): no
//! panic, no exit status 101. Runs the built binary against a coordinator on loopback.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ward_coordinator::audit::Action;
use ward_coordinator::store::{Audit, SqliteStore, Store};

const BIN: &str = env!("CARGO_BIN_EXE_ward-coordinator");

/// Kills the coordinator when the test ends, however it ends.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coordinator(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir").arg(dir);
    c
}

/// Runs `args`, reads one line of its output, closes the pipe, and returns the exit status
/// and stderr.
fn first_line_then_close(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = coordinator(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "{args:?} printed nothing");
    drop(out);
    let o = child.wait_with_output().unwrap();
    (o.status, String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn listings_stop_quietly_on_a_closed_pipe() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("coord");
    let init = coordinator(&dir)
        .args(["init", "--public-addr", "127.0.0.1:17443"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    // More output than a pipe buffer holds (64 KiB), so the writer meets the closed pipe.
    {
        // Rows appended through the data dir's audit anchor, as the coordinator would (rows
        // appended without the key would make `serve` refuse the log as tampered).
        let dd = ward_coordinator::datadir::DataDir::new(&dir);
        let anchor = ward_coordinator::store::Anchor {
            key: dd.load_audit_key().unwrap(),
            checkpoint: dd.checkpoint_path(),
        };
        let store = SqliteStore::open_existing(&dd.db_path(), Some(anchor)).unwrap();
        let detail = serde_json::json!({ "pad": "x".repeat(300 * 1024) });
        for i in 0..3 {
            let a = Audit {
                actor: "test",
                action: Action::UserAdd,
                target: "padding",
                detail: detail.clone(),
            };
            store.append_audit(a, i).unwrap();
        }
        // And more table rows than fit (about 90 bytes each).
        for i in 0..1200 {
            let a = Audit {
                actor: "test",
                action: Action::UserAdd,
                target: "row",
                detail: serde_json::json!({ "i": i }),
            };
            store.append_audit(a, 10 + i).unwrap();
        }
    }
    let _serving = Serving(
        coordinator(&dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !coordinator(&dir)
        .arg("status")
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    for args in [&["audit", "--json"][..], &["audit"][..]] {
        let (status, stderr) = first_line_then_close(&dir, args);
        assert_ne!(status.code(), Some(101), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}
