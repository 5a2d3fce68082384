//! The three programs' `/metrics` endpoints, for real, on loopback: the coordinator, a device
//! daemon (control plane only) and a relay joined to the coordinator are scraped; every scrape
//! parses strictly; every family they export is documented in docs/metrics.md and every
//! documented family is exported; and the counters follow what happens (an enrollment, a
//! session, admin requests, a relay joining, a revocation).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

mod common;

use common::{bin, free_tcp_addr, free_udp_port, scrape, wait_until, Agent, Coordinator, Proc};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use ward_runtime::metrics::{parse_strict, Parsed};

/// A strict parse of a scrape of `addr` (panics if it does not answer or does not parse).
fn parsed(addr: SocketAddr) -> Parsed {
    let text = scrape(addr).unwrap_or_else(|| panic!("no metrics at {addr}"));
    parse_strict(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn value(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    parsed(addr)
        .value(name, labels)
        .unwrap_or_else(|| panic!("{name}{labels:?} not exported at {addr}"))
}

/// The metric names docs/metrics.md lists (first column of its tables), with their types.
fn documented() -> BTreeSet<(String, String)> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .unwrap();
    doc.lines()
        .filter_map(|l| {
            let mut cols = l.strip_prefix("| `ward_")?.split('|');
            let name = format!("ward_{}", cols.next()?.trim().trim_end_matches('`'));
            let kind = cols.next()?.trim().to_string();
            Some((name, kind))
        })
        .collect()
}

fn exported(p: &Parsed) -> BTreeSet<(String, String)> {
    p.families
        .iter()
        .map(|(n, k)| (n.clone(), k.as_str().to_string()))
        .collect()
}

#[test]
fn every_program_serves_documented_metrics_that_parse_strictly_and_move() {
    let tmp = tempfile::tempdir().unwrap();
    let cm = free_tcp_addr();
    let c = Coordinator::init_with(tmp.path(), &["--metrics-listen", &cm.to_string()]);
    wait_until("coordinator metrics", Duration::from_secs(10), || {
        scrape(cm).is_some()
    });
    let before = parsed(cm);
    assert_eq!(before.value("ward_coordinator_sessions", &[]), Some(0.0));
    assert_eq!(
        before.value("ward_coordinator_policy_version", &[]),
        Some(0.0)
    );
    c.admin(&["user", "add", "alice"]);
    c.allow_user_devices("alice");

    // A device with metrics.
    let dm = free_tcp_addr();
    let mut a = Agent {
        state_dir: tmp.path().join("laptop-state"),
        socket: tmp.path().join("laptop.sock"),
        proc: None,
        extra: vec![
            "--tun".into(),
            "off".into(),
            "--metrics-listen".into(),
            dm.to_string(),
        ],
    };
    a.restart();
    assert_eq!(
        value(dm, "ward_device_control_state", &[("state", "needs_login")]),
        1.0
    );
    let out = a.up(&c.token(&["--user", "alice"]), "laptop");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("device connected", Duration::from_secs(10), || {
        value(dm, "ward_device_control_state", &[("state", "connected")]) == 1.0
    });

    // A relay joined to the coordinator.
    let port = free_udp_port();
    let cred = c.admin(&["relay", "add", "r1", "--addr", &format!("127.0.0.1:{port}")]);
    let rm = free_tcp_addr();
    let _relay = Proc::spawn(
        Command::new(bin("ward-relay"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", &rm.to_string()])
            .env("WARD_RELAY_TOKEN", cred.trim())
            .env("WARD_LOG", "info"),
        tmp.path().join("relay.log"),
    );
    wait_until("relay control session up", Duration::from_secs(10), || {
        scrape(rm).is_some_and(|t| t.contains("\nward_relay_control_up 1\n"))
    });

    // The coordinator sees all of it.
    wait_until(
        "coordinator counts the session",
        Duration::from_secs(10),
        || {
            value(cm, "ward_coordinator_sessions", &[]) == 1.0
                && value(cm, "ward_coordinator_relay_sessions", &[]) == 1.0
        },
    );
    let p = parsed(cm);
    let v = |n: &str, l: &[(&str, &str)]| p.value(n, l).unwrap();
    assert_eq!(v("ward_coordinator_devices", &[("state", "active")]), 1.0);
    assert_eq!(v("ward_coordinator_policy_version", &[]), 1.0);
    assert_eq!(v("ward_coordinator_policy_applies_total", &[]), 1.0);
    assert_eq!(
        v(
            "ward_coordinator_audit_rows_total",
            &[("action", "device.enroll")]
        ),
        1.0
    );
    assert!(
        v(
            "ward_coordinator_admin_requests_total",
            &[("command", "user_add")]
        ) >= 1.0
    );
    assert!(
        v(
            "ward_coordinator_admin_requests_total",
            &[("command", "relay_add")]
        ) >= 1.0
    );
    assert!(v("ward_coordinator_netmap_pushes_total", &[]) >= 1.0);
    assert!(v("ward_coordinator_netmap_push_seconds_count", &[]) >= 1.0);

    // Every family exported is documented, and every documented one exported.
    let docs = documented();
    let mut all = exported(&p);
    all.extend(exported(&parsed(dm)));
    all.extend(exported(&parsed(rm)));
    let undocumented: Vec<_> = all.difference(&docs).collect();
    let missing: Vec<_> = docs.difference(&all).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "exported but not in docs/metrics.md (or with another type): {undocumented:?}\n\
         documented but not exported: {missing:?}"
    );

    // A revocation moves its counter and the device's state, and ends the session.
    c.admin(&["device", "revoke", "laptop"]);
    wait_until("revocation counted", Duration::from_secs(10), || {
        value(cm, "ward_coordinator_device_revocations_total", &[]) == 1.0
            && value(cm, "ward_coordinator_devices", &[("state", "revoked")]) == 1.0
            && value(cm, "ward_coordinator_sessions", &[]) == 0.0
    });
    wait_until(
        "device sees the revocation",
        Duration::from_secs(10),
        || value(dm, "ward_device_control_state", &[("state", "revoked")]) == 1.0,
    );
    drop(a);
}
