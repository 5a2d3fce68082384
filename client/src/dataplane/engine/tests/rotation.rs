//! Key rotation on a pair or triple: the previous-link overlap loses nothing.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;

#[test]
fn rotated_key_re_handshakes_and_traffic_continues() {
    let mut net = established_pair(24);
    let mut private = [0u8; 32];
    net.rng.fill_bytes(&mut private);
    // B learns A's next key first (as during a lease rotation: both keys, the new one last).
    let old_a = net.nodes[0].peer_config();
    let mut new_a = old_a.clone();
    new_a.public_key = crate::dataplane::public_key_for(&private);
    net.set_peers(1, vec![old_a, new_a]);
    let mut out = Outbox::new();
    net.nodes[0].core.rotate_key(private, net.now, &mut out);
    net.nodes[0].private = private;
    assert!(out.iter().any(|(_, d)| is_handshake_init(d)));
    net.transmit(0, &out);
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"after rotation");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(200));
    assert_eq!(net.nodes[1].delivered, vec![p]);
    assert_eq!(
        net.nodes[0].public(),
        crate::dataplane::public_key_for(&private)
    );
}

/// A fresh random private key.
fn new_key(net: &mut Net) -> [u8; 32] {
    let mut k = [0u8; 32];
    net.rng.fill_bytes(&mut k);
    k
}

/// Node `i`'s peer entry under another private key (its next key during a rotation).
fn config_under(net: &Net, i: usize, private: &[u8; 32]) -> PeerConfig {
    PeerConfig {
        public_key: crate::dataplane::public_key_for(private),
        ..net.nodes[i].peer_config()
    }
}

fn rotate(net: &mut Net, i: usize, private: [u8; 32]) {
    let mut out = Outbox::new();
    net.nodes[i].core.rotate_key(private, net.now, &mut out);
    net.nodes[i].private = private;
    net.transmit(i, &out);
}

/// The numbers (first 4 payload bytes) of the IPv4 packets a node delivered, sorted.
fn delivered_numbers(node: &Node) -> Vec<u32> {
    let mut got: Vec<u32> = node
        .delivered
        .iter()
        .map(|p| u32::from_be_bytes([p[28], p[29], p[30], p[31]]))
        .collect();
    got.sort_unstable();
    got
}

/// Sends one numbered packet each way per tick for `ticks` ticks (calling `event` before each
/// tick), lets the network drain, and checks both sides got every packet exactly once.
fn stream_both_ways(net: &mut Net, ticks: u32, mut event: impl FnMut(&mut Net, u32)) {
    for n in &mut net.nodes {
        n.delivered.clear();
    }
    for t in 0..ticks {
        event(net, t);
        let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
        net.send_ip(0, &ipv4_packet(a4, b4, &t.to_be_bytes()));
        net.send_ip(1, &ipv4_packet(b4, a4, &t.to_be_bytes()));
        net.step();
    }
    net.run(Duration::from_millis(300));
    for (to, what) in [(1, "A -> B"), (0, "B -> A")] {
        let got = delivered_numbers(&net.nodes[to]);
        let missing: Vec<u32> = (0..ticks)
            .filter(|k| got.binary_search(k).is_err())
            .collect();
        assert!(missing.is_empty(), "{what}: lost {missing:?}");
        assert_eq!(got.len(), ticks as usize, "{what}: duplicates");
    }
}

#[test]
fn rotation_under_traffic_loses_nothing() {
    for seed in 0..4 {
        let mut net = established_pair(30 + seed);
        net.max_delay_ticks = 2; // lossless, but delayed and reordered
        let k2 = new_key(&mut net);
        let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &k2));
        // B learns A's next key; 750 ms later A switches; 1 s later the coordinator revokes
        // A's old key at B.
        stream_both_ways(&mut net, 400, |net, t| match t {
            20 => net.set_peers(1, vec![a1.clone(), a2.clone()]),
            95 => rotate(net, 0, k2),
            195 => net.set_peers(1, vec![a2.clone()]),
            _ => {}
        });
        assert_eq!(net.nodes[0].public(), a2.public_key);
        let c = net.nodes[0].core.counters();
        assert_eq!(c.dropped_bad_source, 0);
        // B reports A once, on the new key's session.
        let st = net.nodes[1].core.status();
        assert_eq!(st.len(), 1);
        assert!(st[0].last_handshake.is_some());
    }
}

#[test]
fn rotation_before_the_peer_learns_the_new_key_loses_nothing() {
    let mut net = established_pair(35);
    let k2 = new_key(&mut net);
    let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &k2));
    // A switches first (its initiation to B is refused: B does not know the key yet) and
    // keeps using the old session; B learns the key 2 s later and hands over.
    stream_both_ways(&mut net, 600, |net, t| match t {
        20 => rotate(net, 0, k2),
        220 => net.set_peers(1, vec![a1.clone(), a2.clone()]),
        420 => net.set_peers(1, vec![a2.clone()]),
        _ => {}
    });
}

#[test]
fn both_sides_rotating_at_overlapping_times_lose_nothing() {
    let cases = [(0u64, 0u32), (1, 1), (2, 3), (3, 30), (4, 74)];
    for ((seed, gap), new_first) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
        eprintln!("seed {seed}, B rotates {gap} ticks after A, new key listed first: {new_first}");
        let mut net = established_pair(40 + seed);
        net.max_delay_ticks = 2;
        let (ka, kb) = (new_key(&mut net), new_key(&mut net));
        let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &ka));
        let (b1, b2) = (net.nodes[1].peer_config(), config_under(&net, 1, &kb));
        let both = |old: &PeerConfig, new: &PeerConfig| {
            if new_first {
                vec![new.clone(), old.clone()]
            } else {
                vec![old.clone(), new.clone()]
            }
        };
        stream_both_ways(&mut net, 500, |net, t| {
            if t == 20 {
                net.set_peers(0, both(&b1, &b2));
                net.set_peers(1, both(&a1, &a2));
            }
            if t == 95 {
                rotate(net, 0, ka);
            }
            if t == 95 + gap {
                rotate(net, 1, kb);
            }
            if t == 300 {
                net.set_peers(0, vec![b2.clone()]);
                net.set_peers(1, vec![a2.clone()]);
            }
        });
        // And after the previous links are gone, traffic still flows on the new keys.
        net.run(PREVIOUS_GRACE + Duration::from_secs(1));
        stream_both_ways(&mut net, 50, |_, _| {});
    }
}

#[test]
fn previous_session_is_dropped_after_the_grace_period() {
    let mut net = established_pair(50);
    // Datagrams B sends under the session with A's old key, captured before anything changes.
    let capture = |net: &Net, text: &[u8]| {
        let p = ipv4_packet(net.nodes[1].ipv4, net.nodes[0].ipv4, text);
        let mut out = Outbox::new();
        net.nodes[1].core.handle_tun_packet(&p, net.now, &mut out);
        let (_, d) = out.iter().next().unwrap();
        (p, d.to_vec())
    };
    let (early, early_d) = capture(&net, b"in flight 1");
    let (_, late_d) = capture(&net, b"in flight 2");
    let k2 = new_key(&mut net);
    let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &k2));
    net.set_peers(1, vec![a1.clone(), a2.clone()]);
    net.run(Duration::from_millis(750));
    rotate(&mut net, 0, k2);
    net.run(Duration::from_millis(500));
    // The new session carries traffic both ways by now...
    let sent_before = net.nodes[0].sent.len();
    net.send_ip(
        0,
        &ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"new"),
    );
    let (_, d) = &net.nodes[0].sent[sent_before];
    assert_eq!(d[0], 4, "data, not a handshake");
    // ...and the previous link still decrypts what was sent under the old one.
    let from = net.nodes[1].src;
    let (got, _) = net.inject(0, from, &early_d);
    assert_eq!(got, Some(early));

    // After the grace period: gone. The old session's packets are refused, and so is a
    // handshake to A's old key (from a B that still has A's old key configured).
    net.run(PREVIOUS_GRACE);
    let garbage_before = net.nodes[0].core.counters().dropped_garbage;
    let (got, reply) = net.inject(0, from, &late_d);
    assert!(got.is_none(), "old session accepted after the grace period");
    assert!(reply.is_empty());
    let b_old = Core::new(
        CoreConfig {
            private_key: net.nodes[1].private,
            persistent_keepalive: None,
            v6_prefix: None,
        },
        5,
    );
    let mut init = Outbox::new();
    b_old.set_peers(vec![a1], net.now, &mut init);
    let (_, init) = init.iter().next().unwrap();
    assert!(is_handshake_init(init));
    let (got, reply) = net.inject(0, from, init);
    assert!(got.is_none());
    assert!(reply.is_empty(), "handshake to a retired key answered");
    assert_eq!(
        net.nodes[0].core.counters().dropped_garbage,
        garbage_before + 2
    );
    // The same handshake to A's new key is answered.
    let mut init = Outbox::new();
    b_old.set_peers(vec![a2], net.now, &mut init);
    let (_, init) = init.iter().next().unwrap();
    let (_, reply) = net.inject(0, from, init);
    assert_eq!(reply.len(), 1);
}

#[test]
fn revoking_a_rotating_peer_drops_both_of_its_sessions_at_once() {
    let mut net = established_pair(51);
    let capture = |net: &Net| {
        let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"x");
        let mut out = Outbox::new();
        net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
        let d = out.iter().next().unwrap().1.to_vec();
        d
    };
    // B rotates; A has B's old and new keys; capture A's datagram on the old session.
    let k2 = new_key(&mut net);
    let (b1, b2) = (net.nodes[1].peer_config(), config_under(&net, 1, &k2));
    net.set_peers(0, vec![b1, b2]);
    let old_d = capture(&net);
    rotate(&mut net, 1, k2);
    net.run(Duration::from_millis(200));
    let new_d = capture(&net);
    // The coordinator revokes A at B: B refuses both A's old and new session at once.
    net.set_peers(1, Vec::new());
    let from = net.nodes[0].src;
    for d in [&old_d, &new_d] {
        let (got, reply) = net.inject(1, from, d);
        assert!(got.is_none(), "revoked peer's packet accepted");
        assert!(reply.is_empty());
    }
    assert!(net.nodes[1].core.status().is_empty());
}

#[test]
fn unused_new_peer_key_does_not_disturb_the_old_one() {
    let mut net = established_pair(52);
    net.max_delay_ticks = 2;
    // B is told about a key A never switches to (A's rotation failed, say).
    let k2 = new_key(&mut net);
    let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &k2));
    net.set_peers(1, vec![a1, a2]);
    let garbage_before = net.nodes[0].core.counters().dropped_garbage;
    stream_both_ways(&mut net, 6000, |_, _| {}); // 60 s
                                                 // B kept probing the unused key (every 5 s), A refused each probe, nothing else suffered.
    let probes = net.nodes[0].core.counters().dropped_garbage - garbage_before;
    assert!((5..=20).contains(&probes), "{probes} probes");
    let st = net.nodes[1].core.status();
    assert_eq!(st.len(), 1);
    assert!(st[0].last_handshake.is_some());
}

/// Seen end to end: B switched to a key A never heard of, then A rotated too, and B's entry for
/// A's old key was revoked. A can still reach B: B answers A's new key's handshake under B's
/// old key (the only one A knows), and both sides use that session.
#[test]
fn peer_that_missed_the_new_key_still_reaches_the_rotated_device() {
    let mut net = established_pair(53);
    let (ka, kb) = (new_key(&mut net), new_key(&mut net));
    let (a1, a2) = (net.nodes[0].peer_config(), config_under(&net, 0, &ka));
    net.set_peers(1, vec![a1, a2.clone()]);
    net.run(Duration::from_millis(100));
    rotate(&mut net, 1, kb); // A never learns B's new key
    net.run(Duration::from_millis(5));
    rotate(&mut net, 0, ka);
    net.set_peers(1, vec![a2]); // A's old key revoked at B
    net.run(Duration::from_millis(200));
    stream_both_ways(&mut net, 100, |_, _| {});
}

/// A peer list that gives one device's key to another device (listed first) never moves the
/// key away from the device that holds it: traffic from the holder keeps arriving, and the
/// refusal is counted.
#[test]
fn a_peer_key_held_by_one_device_is_never_given_to_another() {
    let mut net = Net::new(3, 31);
    net.full_mesh();
    net.run_until_established(Duration::from_secs(5));
    let a = net.nodes[0].peer_config();
    let mut c_with_a_key = net.nodes[2].peer_config();
    c_with_a_key.public_key = a.public_key;
    net.set_peers(1, vec![c_with_a_key, a]);
    assert_eq!(net.nodes[1].core.counters().peer_key_conflicts, 1);
    net.nodes[1].delivered.clear();
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"still A");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(200));
    assert_eq!(net.nodes[1].delivered, vec![p]);
    assert_eq!(net.status_of(1, net.nodes[0].device_id()).device_id, 1);
}
