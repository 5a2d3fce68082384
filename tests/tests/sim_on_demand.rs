//! System simulation of peers on demand: every device's session is on demand
//! (`--peers-on-demand-above 0`), so devices start with no peers and ask the coordinator for
//! each one as they first send to it. Eight real agents with their data-plane cores, the real
//! registry and lease issuing over SQLite, a fake clock, with key rotations (20 s leases)
//! throughout. Each device sends to three others of its own team (one more every few seconds)
//! and now and then to a device of the other team, which the policy forbids. After every step:
//! - the first packet to a new peer is delivered within the step it was sent in (held while
//!   the peer is asked for, then sent), and so is every later one;
//! - a device holds only peers it sent to or that sent to it (never the whole team);
//! - a packet to the other team is never delivered, and its sender gets an ICMP
//!   "administratively prohibited" back from its own data plane;
//! - every key configured anywhere holds a valid lease, and no session is lost.
//!
//! `WARD_SIM_SEED=N` replays a run.
#![allow(clippy::unwrap_used)]

mod simnet;

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use simnet::{packet, Spec, World, T0};

const TTL_MS: i64 = 20_000;

const POLICY: &str = r#"
[groups]
red = ["r"]
blue = ["b"]

[services.red]
devices = ["group:red"]
ports = ["udp/*"]

[services.blue]
devices = ["group:blue"]
ports = ["udp/*"]

[[rules]]
name = "red"
from = ["group:red"]
to = ["red"]

[[rules]]
name = "blue"
from = ["group:blue"]
to = ["blue"]
"#;

#[test]
fn devices_on_demand_reach_the_peers_they_send_to_and_nothing_else() {
    let seed = simnet::seed(0x0d0d);
    // r1..r4 of user r (group red), b1..b4 of user b (group blue).
    let names: Vec<String> = (1..=4)
        .map(|i| format!("r{i}"))
        .chain((1..=4).map(|i| format!("b{i}")))
        .collect();
    let mut w = World::new(Spec {
        devices: names
            .iter()
            .map(|n| {
                let user = if n.starts_with('r') { "r" } else { "b" };
                (n.as_str(), Some(user), vec![])
            })
            .collect(),
        policy: POLICY,
        lease_ttl_ms: TTL_MS,
        seed,
        on_demand_above: 0,
    });
    let n = w.devs.len();
    let team = |i: usize| i / 4;
    // Let every device get its first lease before anyone sends.
    for _ in 0..30 {
        w.step();
    }
    for d in &w.devs {
        assert!(
            d.agent.configured_peers().is_empty(),
            "{} holds peers before sending to any",
            d.name
        );
    }
    // Who each device has sent to (its wanted peers), and who sent to it.
    let mut talks: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut first_sends = 0usize;
    let mut denied = 0usize;
    let rotations = |w: &World| w.devs.iter().map(|d| d.agent.rotations()).sum::<u64>();
    let mut steps = 0;
    while rotations(&w) < 40 || steps < 300 {
        steps += 1;
        assert!(steps < 5_000, "rotations stalled");
        w.step();
        w.check_only_leased_keys();
        let mut expected: BTreeSet<(usize, u64)> = BTreeSet::new();
        for i in 0..n {
            // Three peers of its own team to start with, all of them after a while.
            let mates: Vec<usize> = (0..n).filter(|j| *j != i && team(*j) == team(i)).collect();
            let reach = if steps < 100 { 1 } else { mates.len() };
            for &j in &mates[..reach] {
                seq += 1;
                if talks.entry(i).or_default().insert(j) {
                    first_sends += 1;
                }
                talks.entry(j).or_default().insert(i);
                let payload = seq.to_be_bytes();
                w.send(
                    i,
                    &packet(w.devs[i].ipv4, w.devs[j].ipv4, 17, 40000, 5000, &payload),
                );
                expected.insert((j, seq));
            }
            // Now and then to a stranger: never delivered.
            if w.rng.gen_ratio(1, 20) {
                let j = (i + 4) % n;
                seq += 1;
                denied += 1;
                let payload = seq.to_be_bytes();
                w.send(
                    i,
                    &packet(w.devs[i].ipv4, w.devs[j].ipv4, 17, 40000, 5000, &payload),
                );
            }
        }
        // The coordinator's answers and the handshakes they start.
        w.pump();
        let mut delivered: BTreeSet<(usize, u64)> = BTreeSet::new();
        let mut rounds = 0;
        loop {
            while let Some((from, to, data)) = w.net.pop_front() {
                rounds += 1;
                assert!(rounds < 1_000_000, "network never settles");
                let Some(j) = w.index_of(to) else { continue };
                if let Some(p) = w.receive(j, from, &data) {
                    if p.len() >= 36 {
                        let s = u64::from_be_bytes(p[28..36].try_into().unwrap());
                        let i = w.index_of(from).unwrap();
                        assert_eq!(
                            team(i),
                            team(j),
                            "t={} a packet crossed teams ({} -> {})",
                            w.t - T0,
                            w.devs[i].name,
                            w.devs[j].name
                        );
                        delivered.insert((j, s));
                    }
                }
            }
            w.pump();
            if w.net.is_empty() {
                break;
            }
        }
        let missing: Vec<_> = expected.difference(&delivered).collect();
        assert!(
            missing.is_empty(),
            "t={} packets not delivered within their step: {missing:?}",
            w.t - T0
        );
        for (i, d) in w.devs.iter().enumerate() {
            assert_eq!(d.disconnects, 0, "{} lost its session", d.name);
            let held: BTreeSet<usize> = d
                .agent
                .configured_peers()
                .iter()
                .filter_map(|p| w.devs.iter().position(|x| x.id.0 == p.device_id))
                .collect();
            let talked = talks.get(&i).cloned().unwrap_or_default();
            assert!(
                held.is_subset(&talked),
                "t={} {} holds {held:?}, talked with {talked:?}",
                w.t - T0,
                d.name
            );
        }
    }
    // Each team's six pairs of mates talked.
    assert_eq!(first_sends, 12, "pairs that talked");
    assert!(denied > 0);
    // Every stranger's packet was answered with an ICMP administratively prohibited (type 3,
    // code 13) on its sender's TUN, at most rate-limited away.
    let icmp: usize = w
        .to_tun
        .iter()
        .flatten()
        .filter(|p| p.len() >= 22 && p[9] == 1 && p[20] == 3 && p[21] == 13)
        .count();
    assert!(icmp > 0, "no ICMP prohibited for {denied} refused packets");
    let c = w.reg.want_counters();
    assert!(c.granted >= 12, "{c:?}");
    assert!(c.refused >= 1, "{c:?}");
    eprintln!(
        "{steps} steps, {} rotations, {first_sends} first sends, {denied} refused packets, \
         {icmp} ICMP replies, wants {c:?}",
        rotations(&w)
    );
}
