//! System simulation: ten real device agents (`ward_client::agent::Agent`) with their real
//! data-plane cores, the real coordinator registry and lease issuing over a real SQLite store,
//! on a fake clock over a simulated network (see `simnet`). 1 000 key rotations (lease TTL
//! 20 s, rotation at half-life), steady traffic between every pair, and after every step:
//! - every key a device has configured holds a valid, unrevoked, unexpired lease, so no packet
//!   under a revoked or expired lease can be delivered; a datagram sent under a key whose lease
//!   was then revoked is refused by its peer;
//! - a device never switches keys before its peers hold the new one (checked at each switch);
//! - a packet the policy denies (TCP; only UDP and ICMP are allowed) is never delivered;
//! - every packet sent by a healthy device arrives within the step (no connectivity gap), and
//!   no device ever loses its control session.
//!
//! `WARD_SIM_SEED=N` replays a run.
#![allow(clippy::unwrap_used)]

mod simnet;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use rand::Rng;
use simnet::{packet, Spec, World, STEP_MS, T0};
use ward_client::agent::Rotation;

const DEVICES: usize = 10;
const TTL_MS: i64 = 20_000;

const POLICY: &str = r#"
[services.all]
devices = ["user:u"]
ports = ["udp/*", "icmp"]

[[rules]]
name = "mesh"
from = ["user:u"]
to = ["all"]
"#;

#[test]
fn thousand_rotations_keep_every_invariant() {
    let seed = simnet::seed(0x5eed);
    let names: Vec<String> = (1..=DEVICES).map(|i| format!("d{i}")).collect();
    let mut w = World::new(Spec {
        devices: names
            .iter()
            .map(|n| (n.as_str(), Some("u"), vec![]))
            .collect(),
        policy: POLICY,
        lease_ttl_ms: TTL_MS,
        seed,
        on_demand_above: ward_coordinator::registry::DEFAULT_ON_DEMAND_ABOVE,
    });
    let n = w.devs.len();
    let mut outstanding: BTreeMap<(usize, usize, u64), i64> = BTreeMap::new();
    let mut seq: u64 = 0;
    let mut delivered: u64 = 0;
    let mut denied_sent: u64 = 0;
    // Datagrams withheld from the network while their sender rotates: (to, from, bytes, the
    // sender's public key when it was sent).
    let mut held: Vec<(usize, SocketAddr, Vec<u8>, [u8; 32])> = Vec::new();
    let mut held_refused = 0usize;
    // One excused loss per withheld datagram.
    let mut excused: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    let rotations = |w: &World| w.devs.iter().map(|d| d.agent.rotations()).sum::<u64>();

    while rotations(&w) < 1000 {
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
        // Traffic: every device to every other (UDP, allowed), and now and then TCP (denied).
        for i in 0..n {
            for j in 0..n {
                if i == j {
                    continue;
                }
                seq += 1;
                let mut payload = vec![0u8; 16];
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                payload[8] = i as u8;
                payload[9] = j as u8;
                let (src, dst) = (w.devs[i].ipv4, w.devs[j].ipv4);
                w.send(i, &packet(src, dst, 17, 40000, 5000, &payload));
                outstanding.insert((i, j, seq), w.t);
                if seq.is_multiple_of(7) {
                    w.send(
                        i,
                        &packet(src, dst, 6, 40000 + (seq % 20000) as u16, 22, &[]),
                    );
                    denied_sent += 1;
                }
            }
        }
        // Withheld datagrams whose key is no longer configured at the receiver (its lease was
        // revoked) must be refused.
        let mut keep = Vec::new();
        for (j, from, data, key) in held.drain(..) {
            let i = w.index_of(from).unwrap();
            let id = w.devs[i].id.0;
            let still = w.devs[j]
                .agent
                .configured_peers()
                .iter()
                .any(|p| p.device_id == id && p.public_key == key);
            if still {
                keep.push((j, from, data, key));
                continue;
            }
            assert!(
                !w.valid_keys().contains(&(id, key)),
                "a key with a valid lease was dropped"
            );
            assert!(
                w.receive(j, from, &data).is_none(),
                "t={} a datagram under a revoked lease was accepted",
                w.t - T0
            );
            held_refused += 1;
        }
        held = keep;
        // Deliver until quiet.
        let mut rounds = 0;
        while let Some((from, to, data)) = w.net.pop_front() {
            rounds += 1;
            assert!(rounds < 1_000_000, "network never settles");
            let Some(j) = w.index_of(to) else { continue };
            let i = w.index_of(from).unwrap();
            // Withhold one transport datagram now and then from a device that is rotating.
            let rotating = matches!(
                w.devs[i].agent.rotation(),
                Rotation::Requested { .. } | Rotation::Settling { .. }
            );
            if data.first() == Some(&4) && rotating && held.len() < 4 && w.rng.gen_ratio(1, 2000) {
                let key = w.devs[i].agent.public_key().0;
                held.push((j, from, data, key));
                *excused.entry((i, j)).or_default() += 1;
                continue;
            }
            let Some(p) = w.receive(j, from, &data) else {
                continue;
            };
            assert_ne!(
                p.get(9),
                Some(&6),
                "t={} a denied TCP packet was delivered",
                w.t - T0
            );
            if p.len() >= 44 && p[9] == 17 {
                let s = u64::from_be_bytes(p[28..36].try_into().unwrap());
                let (si, di) = (p[36] as usize, p[37] as usize);
                if outstanding.remove(&(si, di, s)).is_some() {
                    delivered += 1;
                }
            }
        }
        // Nothing sent by a healthy device is left behind for more than a step (packets queued
        // behind a handshake go out when it completes, within the same step).
        let t = w.t;
        outstanding.retain(|(i, j, s), sent| {
            if t - *sent > STEP_MS {
                if let Some(n) = excused.get_mut(&(*i, *j)).filter(|n| **n > 0) {
                    *n -= 1;
                    return false;
                }
            }
            assert!(
                t - *sent <= STEP_MS,
                "t={} packet {s} from d{} to d{} sent at {} never arrived",
                t - T0,
                i + 1,
                j + 1,
                *sent - T0
            );
            true
        });
    }
    let total = rotations(&w);
    let refused: u64 = w
        .devs
        .iter()
        .map(|d| d.core.counters().dropped_filter_no_rule)
        .sum();
    eprintln!(
        "simulated {} s: {total} rotations ({} switches checked, {} old leases revoked), {delivered} packets delivered, {} outstanding, {held_refused} stale datagrams refused, {denied_sent} denied packets sent and {refused} refused by the filter",
        (w.t - T0) / 1000,
        w.switches,
        w.revoked,
        outstanding.len()
    );
    assert!(total >= 1000);
    assert!(
        w.revoked >= 900,
        "old leases were not revoked: {}",
        w.revoked
    );
    assert!(held_refused > 0, "the revoked-key check never ran");
    assert!(
        refused >= denied_sent / 2,
        "the filter refused too little: {refused}"
    );
}
