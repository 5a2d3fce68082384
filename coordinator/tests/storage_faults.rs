//! Storage faults against the built coordinator and a real SQLite file in a temp data dir:
//! `serve` never creates a database; a database older than the audit checkpoint (an old copy
//! restored over acknowledged writes, a revocation among them) is refused at start-up with the
//! lost range named until the operator runs `audit accept-rollback --i-understand`; a corrupted
//! page that start-up would not read is found by the integrity check; `status` shows storage
//! health.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ward_shared::token::EnrollToken;
use ward_shared::wire::CoordinatorMsg;

fn sqlite(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .expect("sqlite3 must be installed (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn serve_refuses_a_missing_or_empty_database() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = init(tmp.path());
    let db = dir.join("ward.db");
    std::fs::rename(&db, tmp.path().join("ward.db.aside")).unwrap();
    let log = serve_refused(&dir, "missing.log");
    assert!(log.contains("database is missing"), "{log}");
    assert!(log.contains("only `init` does"), "{log}");
    assert!(!db.exists(), "serve must not create a database");

    std::fs::write(&db, b"").unwrap();
    let log = serve_refused(&dir, "empty.log");
    assert!(log.contains("is empty"), "{log}");
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

    // The real file back: it serves, and `status` shows the storage checks.
    std::fs::rename(tmp.path().join("ward.db.aside"), &db).unwrap();
    let _s = serve(&dir, "ok.log");
    let st = admin_json(&dir, &["status"]);
    assert_eq!(st["storage"]["integrity"]["ok"], true, "{st}");
    assert_eq!(st["storage"]["anchored"], true, "{st}");
    assert_eq!(st["storage"]["write_errors"], 0, "{st}");
}

#[test]
fn a_rolled_back_database_is_refused_until_the_operator_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, addr) = init(tmp.path());
    let s = serve(&dir, "serve1.log");
    admin_ok(&dir, &["user", "add", "vic"]);
    let tok =
        EnrollToken::parse(admin_ok(&dir, &["token", "create", "--user", "vic"]).trim()).unwrap();
    let ca = ward_coordinator::datadir::DataDir::new(&dir)
        .load_ca()
        .unwrap()
        .cert_der;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let ep = endpoint("127.0.0.1");
        enroll_once(
            &ep,
            client_config(&ca),
            addr,
            &enroll_request(&tok, "victim", None),
        )
        .await
    });
    assert!(
        matches!(answer, Some(CoordinatorMsg::Enrolled(_))),
        "{answer:?}"
    );
    s.stop();

    // A copy of the database as it is now.
    let aside = tmp.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    for f in ["ward.db", "ward.db-wal"] {
        if dir.join(f).exists() {
            std::fs::copy(dir.join(f), aside.join(f)).unwrap();
        }
    }
    // Acknowledged writes: the device is revoked.
    let s = serve(&dir, "serve2.log");
    admin_ok(&dir, &["device", "revoke", "victim"]);
    let dev = admin_json(&dir, &["device", "show", "victim"]);
    assert_eq!(dev["status"], "revoked", "{dev}");
    let rows_anchored = audit(&dir, 10_000).len();
    s.stop();

    // The old copy comes back (a restored backup, or a WAL whose tail was lost).
    for f in ["ward.db", "ward.db-wal", "ward.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
        if aside.join(f).exists() {
            std::fs::copy(aside.join(f), dir.join(f)).unwrap();
        }
    }
    let log = serve_refused(&dir, "refused.log");
    assert!(log.contains("ROLLED BACK"), "{log}");
    assert!(
        log.contains(&format!("..={rows_anchored}")),
        "the lost range ends at row {rows_anchored}: {log}"
    );
    assert!(
        log.contains("audit accept-rollback --i-understand"),
        "{log}"
    );

    // The operator decides.
    let out = admin(&dir, &["audit", "accept-rollback"]);
    assert!(!out.status.success(), "the flag is required");
    let out = admin_ok(&dir, &["audit", "accept-rollback", "--i-understand"]);
    assert!(out.contains("accepted"), "{out}");
    let _s = serve(&dir, "serve3.log");
    let log = audit(&dir, 10_000);
    let accepted = log
        .iter()
        .find(|e| e["action"] == "audit.rollback_accepted")
        .expect("the acceptance is audited");
    assert_eq!(accepted["detail"]["found"], "rolled_back", "{accepted}");
    admin_ok(&dir, &["audit", "verify"]);
    // The lost revocation is visibly lost: the operator re-applies it.
    let dev = admin_json(&dir, &["device", "show", "victim"]);
    assert_eq!(dev["status"], "active", "{dev}");
    admin_ok(&dir, &["device", "revoke", "victim"]);
}

#[test]
fn truncated_audit_rows_are_refused_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = init(tmp.path());
    let s = serve(&dir, "serve1.log");
    admin_ok(&dir, &["user", "add", "a"]);
    admin_ok(&dir, &["user", "add", "b"]);
    s.stop();
    let db = dir.join("ward.db");
    sqlite(
        &db,
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit);",
    );
    let log = serve_refused(&dir, "refused.log");
    assert!(log.contains("TRUNCATED"), "{log}");
}

#[test]
fn a_corrupted_page_start_up_does_not_read_is_found() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = init(tmp.path());
    let s = serve(&dir, "serve1.log");
    admin_ok(&dir, &["user", "add", "a"]);
    s.stop();
    let db = dir.join("ward.db");
    sqlite(&db, "PRAGMA wal_checkpoint(TRUNCATE);");
    let page: u64 = sqlite(&db, "PRAGMA page_size;").parse().unwrap();
    // The posture table is read only when a device is shown, never at start-up.
    let root: u64 = sqlite(
        &db,
        "SELECT rootpage FROM sqlite_master WHERE name = 'posture';",
    )
    .parse()
    .unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    let at = ((root - 1) * page) as usize;
    for (i, b) in bytes[at..at + page as usize].iter_mut().enumerate() {
        *b = (i * 7 + 13) as u8;
    }
    std::fs::write(&db, &bytes).unwrap();
    let log = serve_refused(&dir, "refused.log");
    assert!(log.contains("integrity check FAILED"), "{log}");
    assert!(log.contains(".recover"), "{log}");
}

/// Unmounts the test's tmpfs however the test ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn on_a_full_disk_revocation_takes_effect_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    // The data dir itself is the mount point (logs go beside it, outside).
    let mnt = tmp.path().join("coord");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a tmpfs needs root");
    let _m = Mounted(mnt.clone());

    let (dir, addr) = init(tmp.path());
    assert_eq!(dir, mnt);
    let s = serve(&dir, "serve1.log");
    admin_ok(&dir, &["user", "add", "vic"]);
    let tok =
        EnrollToken::parse(admin_ok(&dir, &["token", "create", "--user", "vic"]).trim()).unwrap();
    let ca = ward_coordinator::datadir::DataDir::new(&dir)
        .load_ca()
        .unwrap()
        .cert_der;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (msg, key) = enroll_request_with_key(&tok, "victim", None);
    let ep = rt.block_on(async { endpoint("127.0.0.1") });
    let Some(CoordinatorMsg::Enrolled(enrolled)) =
        rt.block_on(enroll_once(&ep, client_config(&ca), addr, &msg))
    else {
        panic!("enrollment failed");
    };
    let dev_cfg = || device_client_config(&ca, &enrolled.cert_der.0, &key);
    // The device is welcome now.
    let first = rt.block_on(enroll_once(&ep, dev_cfg(), addr, &hello()));
    assert!(
        !matches!(first, Some(CoordinatorMsg::Error { .. })),
        "{first:?}"
    );

    // Fill the disk, then use up what SQLite's files still had free.
    let mut filler = std::fs::File::create(mnt.join("filler")).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut filler, &chunk).is_ok() {}
    let _ = filler.sync_all();
    let mut full = false;
    for i in 0..2000 {
        let out = admin(&dir, &["user", "add", &format!("fill{i}")]);
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(err.contains("disk is full"), "{err}");
            assert!(err.contains("widen access are refused"), "{err}");
            full = true;
            break;
        }
    }
    assert!(full, "the database never filled up");

    // A narrowing change still happens, at once.
    admin_ok(&dir, &["device", "revoke", "victim"]);
    let st = admin_json(&dir, &["status"]);
    assert_eq!(st["storage"]["journal_pending"], 1, "{st}");
    assert!(st["storage"]["write_errors"].as_u64().unwrap() > 0, "{st}");
    let again = rt.block_on(enroll_once(&ep, dev_cfg(), addr, &hello()));
    assert!(
        matches!(&again, Some(CoordinatorMsg::Error { code, .. }) if *code == ward_shared::wire::ErrorCode::DeviceRevoked),
        "the revoked device is refused: {again:?}"
    );
    // A widening one is refused, clearly.
    let out = admin(&dir, &["user", "enable", "vic"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("journal"), "{err}");
    s.stop();

    // Restarting on the full disk refuses rather than serve without the revocation.
    let log = serve_refused(&dir, "full.log");
    assert!(log.contains("narrowing change"), "{log}");
    // With space again, the restart writes the journal to the database before serving.
    drop(filler);
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let _s = serve(&dir, "serve2.log");
    let dev = admin_json(&dir, &["device", "show", "victim"]);
    assert_eq!(dev["status"], "revoked", "{dev}");
    let st = admin_json(&dir, &["status"]);
    assert_eq!(st["storage"]["journal_pending"], 0, "{st}");
    let again = rt.block_on(enroll_once(&ep, dev_cfg(), addr, &hello()));
    assert!(
        matches!(&again, Some(CoordinatorMsg::Error { code, .. }) if *code == ward_shared::wire::ErrorCode::DeviceRevoked),
        "{again:?}"
    );
    admin_ok(&dir, &["audit", "verify"]);
}
