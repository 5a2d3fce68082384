//! System simulation of posture enforcement: real device agents and data-plane cores, the real
//! coordinator registry (which owns the trust book) and lease issuing over a real SQLite store,
//! on a fake clock (see `simnet`). Posture reports travel as the device sends them
//! (`DeviceMsg::Posture`, collected when the agent asks).
//!
//! alice may reach db:5432 only while her host firewall is on (`posture = ["fw"]`); alice and
//! bob may always reach db's udp service. Her firewall goes off: the gated rule vanishes from
//! db's filter (her TCP packets are denied), she rotates her key (`RotateNow`), and the
//! posture-free traffic never stops. Her firewall comes back: access returns. After every step:
//! a packet to db:5432 is never delivered while the registry judges alice failing; every
//! posture-free packet arrives within the step; configured keys hold valid leases.
//!
//! `WARD_SIM_SEED=N` replays a run.
#![allow(clippy::unwrap_used)]

mod simnet;

use std::collections::BTreeMap;

use simnet::{packet, Spec, World, STEP_MS, T0};

const POLICY: &str = r#"
[posture.fw]
firewall = true

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[services.web]
devices = ["tag:db"]
ports = ["udp/8080"]

[[rules]]
name = "db-needs-fw"
from = ["user:alice"]
to = ["db"]
posture = ["fw"]

[[rules]]
name = "web-for-all"
from = ["user:alice", "user:bob"]
to = ["web"]
"#;

const ALICE: usize = 0;
const BOB: usize = 1;
const DB: usize = 2;

/// Phases of the run (simulated ms from the start), off the agents' 1 s posture cadence.
const FAIL_AT_MS: i64 = 20_400;
const RESTORE_AT_MS: i64 = 40_700;
const END_MS: i64 = 60_000;

#[test]
fn failing_posture_removes_gated_access_rotates_and_restores() {
    let seed = simnet::seed(0x9057);
    let mut w = World::new(Spec {
        devices: vec![
            ("alice", Some("alice"), vec![]),
            ("bob", Some("bob"), vec![]),
            ("db", None, vec!["db"]),
        ],
        policy: POLICY,
        lease_ttl_ms: 600_000,
        seed,
        on_demand_above: ward_coordinator::registry::DEFAULT_ON_DEMAND_ABOVE,
    });
    let alice_id = w.devs[ALICE].id;
    let mut seq: u64 = 0;
    let mut outstanding: BTreeMap<(usize, u64), i64> = BTreeMap::new();
    // Per phase: gated packets sent, delivered.
    let mut gated: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut web_delivered: u64 = 0;
    let mut denied_at: Option<i64> = None;
    let mut restored_at: Option<i64> = None;
    let mut rotations_at_fail = 0;

    while w.t < T0 + END_MS {
        let ms = w.t - T0;
        if ms == FAIL_AT_MS {
            w.devs[ALICE].firewall = false;
            rotations_at_fail = w.devs[ALICE].agent.rotations();
        }
        if ms == RESTORE_AT_MS {
            w.devs[ALICE].firewall = true;
        }
        w.step();
        w.check_only_leased_keys();
        for d in &w.devs {
            assert_eq!(
                d.disconnects,
                0,
                "t={} {} lost its session",
                w.t - T0,
                d.name
            );
        }
        let failing = w
            .reg
            .trust_view(alice_id)
            .results
            .iter()
            .any(|r| r.requirement == "fw" && !r.passed);
        let phase = match ms {
            _ if ms < FAIL_AT_MS => "healthy",
            _ if ms < RESTORE_AT_MS => "failing",
            _ => "restored",
        };
        // alice → db:5432 (gated, a new flow each time) and alice, bob → db:8080 (free).
        let (a, b, db) = (w.devs[ALICE].ipv4, w.devs[BOB].ipv4, w.devs[DB].ipv4);
        seq += 1;
        w.send(
            ALICE,
            &packet(a, db, 6, 10000 + (seq % 50000) as u16, 5432, &[]),
        );
        gated.entry(phase).or_default().0 += 1;
        for (i, src) in [(ALICE, a), (BOB, b)] {
            seq += 1;
            w.send(i, &packet(src, db, 17, 40000, 8080, &seq.to_be_bytes()));
            outstanding.insert((i, seq), w.t);
        }
        let mut gated_now = false;
        while let Some((from, to, data)) = w.net.pop_front() {
            let Some(j) = w.index_of(to) else { continue };
            let Some(p) = w.receive(j, from, &data) else {
                continue;
            };
            if j != DB || p.len() < 24 {
                continue;
            }
            let dport = u16::from_be_bytes([p[22], p[23]]);
            match (p[9], dport) {
                (6, 5432) => {
                    assert!(
                        !failing,
                        "t={} alice reached db:5432 while failing posture",
                        w.t - T0
                    );
                    gated_now = true;
                    gated.entry(phase).or_default().1 += 1;
                }
                (17, 8080) => {
                    let n = u64::from_be_bytes(p[28..36].try_into().unwrap());
                    let i = if p[12..16] == a.octets() { ALICE } else { BOB };
                    if outstanding.remove(&(i, n)).is_some() {
                        web_delivered += 1;
                    }
                }
                other => panic!(
                    "t={} unexpected packet delivered to db: {other:?}",
                    w.t - T0
                ),
            }
        }
        if phase == "failing" && !gated_now && denied_at.is_none() {
            denied_at = Some(w.t);
        }
        if phase == "restored" && gated_now && restored_at.is_none() {
            restored_at = Some(w.t);
        }
        // Once access is established in a phase it holds for the rest of it.
        if phase == "healthy" && ms >= 5_000 {
            assert!(gated_now, "t={} alice lost db:5432 while healthy", w.t - T0);
        }
        if phase == "failing" && denied_at.is_some() {
            assert!(!gated_now, "t={} access came back while failing", w.t - T0);
        }
        if phase == "restored" && restored_at.is_some() {
            assert!(gated_now, "t={} restored access went away", w.t - T0);
        }
        let t = w.t;
        outstanding.retain(|(i, n), sent| {
            assert!(
                t - *sent <= STEP_MS,
                "t={} posture-free packet {n} from {i} sent at {} never arrived",
                t - T0,
                *sent - T0
            );
            true
        });
    }
    let fail_ms = T0 + FAIL_AT_MS;
    let restore_ms = T0 + RESTORE_AT_MS;
    let denied_after = denied_at.unwrap() - fail_ms;
    let restored_after = restored_at.unwrap() - restore_ms;
    let rotated = w.devs[ALICE].agent.rotations() - rotations_at_fail;
    eprintln!(
        "posture: gated (sent, delivered) per phase {gated:?}; denied {denied_after} ms after the firewall went off, restored {restored_after} ms after it came back; alice rotated {rotated} time(s); {web_delivered} posture-free packets delivered; reports accepted/refused {:?}",
        w.reports
    );
    assert!(gated["healthy"].1 > 0 && gated["restored"].1 > 0);
    assert!(denied_after <= 2_000, "denial took {denied_after} ms");
    assert!(
        restored_after <= 2_000,
        "restoring took {restored_after} ms"
    );
    assert!(rotated >= 1, "alice did not rotate after failing posture");
    assert!(
        w.reports.0 >= 3 && w.reports.1 == 0,
        "reports {:?}",
        w.reports
    );
}
