//! Hole punching: two nodes behind NATs that only let in replies, each given the other's
//! public (reflexive) candidate when address discovery finds it.

use super::*;

/// Two nodes behind NATs; each knows only the other's private (unroutable) address.
fn natted_pair(seed: u64) -> (Net, PeerConfig, PeerConfig) {
    let mut net = Net::new(2, seed);
    for n in &mut net.nodes {
        n.nat = Some(Default::default());
    }
    let private = |i: u8| -> SocketAddr { format!("192.168.{i}.2:51820").parse().unwrap() };
    let mut a = net.nodes[0].peer_config();
    a.endpoints = vec![private(1)];
    let mut b = net.nodes[1].peer_config();
    b.endpoints = vec![private(2)];
    net.set_peers(0, vec![b.clone()]);
    net.set_peers(1, vec![a.clone()]);
    (net, a, b)
}

fn established(net: &Net) -> bool {
    net.nodes
        .iter()
        .all(|n| n.core.status().iter().all(|s| s.last_handshake.is_some()))
}

#[test]
fn both_sides_probing_reflexive_candidates_open_both_nats() {
    let (mut net, mut a, mut b) = natted_pair(40);
    net.run(Duration::from_secs(10));
    assert!(!established(&net), "private candidates alone cannot work");
    // Discovery finds the public addresses; the coordinator hands them out, one side first.
    a.endpoints.insert(0, net.nodes[0].addrs[0]);
    b.endpoints.insert(0, net.nodes[1].addrs[0]);
    net.set_peers(0, vec![b]);
    // The first side's handshake is dropped by the other NAT but opens its own.
    net.run(Duration::from_millis(300));
    assert!(!established(&net));
    let t = net.now;
    net.set_peers(1, vec![a]);
    let limit = t + Duration::from_secs(1);
    while !established(&net) && net.now < limit {
        net.step();
    }
    assert!(
        established(&net),
        "a new candidate is probed at once: the second side's handshake passes the opened NAT"
    );
    assert_eq!(net.status_of(0, 2).endpoint, Some(net.nodes[1].addrs[0]));
    assert_eq!(net.status_of(1, 1).endpoint, Some(net.nodes[0].addrs[0]));
    // Traffic flows both ways through the punched holes.
    net.send_ip(
        0,
        &ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"ping"),
    );
    net.send_ip(
        1,
        &ipv4_packet(net.nodes[1].ipv4, net.nodes[0].ipv4, b"pong"),
    );
    net.run(Duration::from_millis(100));
    assert!(net.nodes[1].delivered.iter().any(|p| p.ends_with(b"ping")));
    assert!(net.nodes[0].delivered.iter().any(|p| p.ends_with(b"pong")));
}

#[test]
fn one_sided_knowledge_does_not_punch() {
    let (mut net, _a, mut b) = natted_pair(41);
    b.endpoints.insert(0, net.nodes[1].addrs[0]);
    net.set_peers(0, vec![b]);
    net.run(Duration::from_secs(30));
    assert!(
        !established(&net),
        "only one NAT opened: the other side never sends through it"
    );
}
