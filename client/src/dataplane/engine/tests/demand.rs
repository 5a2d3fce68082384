//! Peers on demand: a pair where node 0 is on demand and starts without peers, node 1 knows
//! node 0. Packets to a peer not sent yet are held and wanted, sent once `set_peers` brings
//! the peer, answered with ICMP once the coordinator refuses it; an initiation from an
//! unknown key is held and answered once the key's peer is configured.

use super::*;
use ward_shared::wire::{PeerRef, WgPublicKey};

/// Node 0 on demand without peers; node 1 with node 0 as its peer, but no endpoint for it
/// (it learns node 0's from node 0's handshake), so it does not open on its own.
fn on_demand_pair(seed: u64) -> Net {
    let mut net = Net::new(2, seed);
    net.nodes[0].core.set_on_demand(true);
    let a = PeerConfig {
        endpoints: Vec::new(),
        ..net.nodes[0].peer_config()
    };
    net.set_peers(1, vec![a]);
    net
}

/// Gives node 1 node 0's endpoint: it handshakes with node 0 at once.
fn b_reaches_a(net: &mut Net) {
    let a = net.nodes[0].peer_config();
    net.set_peers(1, vec![a]);
}

/// Node `i` sends `packet` from its TUN; returns what the core wrote (after transmitting it).
fn send_from_tun(net: &mut Net, i: usize, packet: &[u8]) -> Outbox {
    let mut out = Outbox::new();
    net.nodes[i]
        .core
        .handle_tun_packet(packet, net.now, &mut out);
    net.transmit(i, &out);
    out
}

/// Node 0 sends a UDP packet carrying `payload` to node 1; see [`send_from_tun`].
fn send_to_b(net: &mut Net, payload: &[u8]) -> Outbox {
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, payload);
    send_from_tun(net, 0, &p)
}

fn payloads(delivered: &[Vec<u8>]) -> Vec<Vec<u8>> {
    delivered.iter().map(|p| p[28..].to_vec()).collect()
}

/// Whether `p` is an ICMPv4 "communication administratively prohibited".
fn is_prohibited(p: &[u8]) -> bool {
    p.len() >= 28 && p[9] == 1 && p[20] == 3 && p[21] == 13
}

/// Steps until node 1 delivered `n` packets; returns how long it took.
fn run_until_delivered(net: &mut Net, i: usize, n: usize, limit: Duration) -> Duration {
    let start = net.now;
    while net.nodes[i].delivered.len() < n {
        assert!(
            net.now < start + limit,
            "{} of {n} packets delivered within {limit:?}",
            net.nodes[i].delivered.len()
        );
        net.step();
    }
    net.now - start
}

#[test]
fn a_packet_to_a_peer_not_sent_yet_is_held_wanted_and_sent_once_the_peer_comes() {
    let mut net = on_demand_pair(71);
    let b = net.nodes[1].ipv4;
    let out = send_to_b(&mut net, b"held");
    assert!(out.tun_packets().is_empty(), "no ICMP while on demand");
    assert!(out.is_empty(), "nothing to send without the peer");
    assert!(net.nodes[0].core.take_want_signal(), "the driver is told");
    assert!(!net.nodes[0].core.take_want_signal(), "once");
    assert_eq!(
        net.nodes[0].core.take_wants(net.now),
        vec![PeerRef::Addr(IpAddr::V4(b))]
    );
    assert!(
        net.nodes[0].core.take_wants(net.now).is_empty(),
        "each want once"
    );
    let c = net.nodes[0].core.counters();
    assert_eq!((c.held_for_peer, c.peer_wants), (1, 1));
    assert_eq!((c.dropped_no_route, c.icmp_unreachable_sent), (0, 0));

    // The coordinator's delta brings the peer: the handshake starts and, once it completes,
    // the held packet is delivered (it was not merely dropped).
    net.run(TICK * 5);
    let mut out = Outbox::new();
    let cfg = net.nodes[1].peer_config();
    net.nodes[0].core.set_peers(vec![cfg], net.now, &mut out);
    assert!(out.iter().any(|(_, d)| is_handshake_init(d)));
    net.transmit(0, &out);
    let took = run_until_delivered(&mut net, 1, 1, Duration::from_secs(2));
    assert!(took < Duration::from_millis(200), "{took:?}");
    assert_eq!(payloads(&net.nodes[1].delivered), vec![b"held".to_vec()]);
    assert_eq!(net.nodes[0].core.counters().held_replayed, 1);
}

#[test]
fn held_packets_are_bounded_per_destination_and_in_destinations() {
    let mut net = on_demand_pair(72);
    // A fifth packet to one destination drops the oldest.
    for n in 1..=5u8 {
        send_to_b(&mut net, &[n]);
    }
    let c = net.nodes[0].core.counters();
    assert_eq!((c.held_for_peer, c.held_dropped, c.peer_wants), (5, 1, 1));
    // A 65th destination is not held (and not wanted).
    let src = net.nodes[0].ipv4;
    for d in 0..MAX_HELD_DSTS as u8 {
        let dst = Ipv4Addr::new(100, 64, 1, d);
        send_from_tun(&mut net, 0, &ipv4_packet(src, dst, b"x"));
    }
    let wants = net.nodes[0].core.take_wants(net.now);
    assert_eq!(
        wants.len(),
        MAX_HELD_DSTS,
        "the 64 destinations held are wanted"
    );
    assert!(!wants.contains(&PeerRef::Addr(Ipv4Addr::new(100, 64, 1, 63).into())));
    let c = net.nodes[0].core.counters();
    assert_eq!(c.held_for_peer, 5 + 63);
    assert_eq!(c.held_dropped, 1 + 1);
    assert_eq!(c.dropped_no_route, 1);

    // Once the peer comes, the four newest packets to it go.
    let mut out = Outbox::new();
    let cfg = net.nodes[1].peer_config();
    net.nodes[0].core.set_peers(vec![cfg], net.now, &mut out);
    net.transmit(0, &out);
    run_until_delivered(&mut net, 1, 4, Duration::from_secs(2));
    net.run(TICK * 10);
    // (The harness reorders datagrams that arrive together.)
    let mut got = payloads(&net.nodes[1].delivered);
    got.sort();
    assert_eq!(got, vec![vec![2], vec![3], vec![4], vec![5]]);
}

#[test]
fn held_packets_expire_and_one_address_is_wanted_at_most_once_a_second() {
    let mut net = on_demand_pair(73);
    let want = PeerRef::Addr(IpAddr::V4(net.nodes[1].ipv4));
    let mut wants = Vec::new();
    // A packet every 100 ms for 2.5 s: asked for at 0, 1 s and 2 s.
    for _ in 0..25 {
        send_to_b(&mut net, b"again");
        wants.extend(net.nodes[0].core.take_wants(net.now));
        net.run(Duration::from_millis(100));
    }
    assert_eq!(wants, vec![want; 3]);
    // Held packets older than HELD_TTL are gone (the timers drop them): the peer finds none.
    net.run(HELD_TTL + TIMER_INTERVAL);
    let dropped = net.nodes[0].core.counters().held_dropped;
    assert_eq!(
        dropped, 25,
        "every packet dropped: 21 for the bound, 4 expired"
    );
    let mut out = Outbox::new();
    let cfg = net.nodes[1].peer_config();
    net.nodes[0].core.set_peers(vec![cfg], net.now, &mut out);
    net.transmit(0, &out);
    net.run(Duration::from_secs(1));
    assert!(net.nodes[1].delivered.is_empty(), "nothing old is replayed");
    assert_eq!(net.nodes[0].core.counters().held_replayed, 0);
}

#[test]
fn a_refusal_answers_held_packets_with_icmp_and_stops_wanting_for_a_while() {
    let mut net = on_demand_pair(74);
    let b = IpAddr::V4(net.nodes[1].ipv4);
    send_to_b(&mut net, b"one");
    send_to_b(&mut net, b"two");
    assert_eq!(
        net.nodes[0].core.take_wants(net.now),
        vec![PeerRef::Addr(b)]
    );
    let mut out = Outbox::new();
    net.nodes[0]
        .core
        .refuse(PeerRef::Addr(b), net.now, &mut out);
    assert_eq!(out.tun_packets().len(), 2, "each held packet answered");
    assert!(out.tun_packets().iter().all(|p| is_prohibited(p)));
    assert!(out.is_empty());

    // Within REFUSAL_HOLD: the ICMP at once, no want.
    net.run(REFUSAL_HOLD - Duration::from_secs(1));
    let out = send_to_b(&mut net, b"three");
    assert_eq!(out.tun_packets().len(), 1);
    assert!(is_prohibited(&out.tun_packets()[0]));
    assert!(!net.nodes[0].core.wants_pending());
    assert!(net.nodes[0].core.take_wants(net.now).is_empty());
    let c = net.nodes[0].core.counters();
    assert_eq!((c.icmp_unreachable_sent, c.dropped_no_route), (3, 1));
    assert_eq!(c.held_dropped, 2);

    // After it: held and wanted again.
    net.run(Duration::from_secs(1));
    let out = send_to_b(&mut net, b"four");
    assert!(out.tun_packets().is_empty());
    assert_eq!(
        net.nodes[0].core.take_wants(net.now),
        vec![PeerRef::Addr(b)]
    );
}

#[test]
fn off_demand_a_packet_without_a_peer_gets_icmp_and_no_want() {
    let mut net = on_demand_pair(75);
    net.nodes[0].core.set_on_demand(false);
    let out = send_to_b(&mut net, b"x");
    assert_eq!(out.tun_packets().len(), 1);
    assert!(is_prohibited(&out.tun_packets()[0]));
    assert!(!net.nodes[0].core.wants_pending());
    assert!(!net.nodes[0].core.take_want_signal());
    assert!(net.nodes[0].core.take_wants(net.now).is_empty());
    let c = net.nodes[0].core.counters();
    assert_eq!(
        (c.dropped_no_route, c.held_for_peer, c.peer_wants),
        (1, 0, 0)
    );

    // Turning it off drops what was held: a peer arriving later gets nothing old.
    net.nodes[0].core.set_on_demand(true);
    send_to_b(&mut net, b"held");
    net.nodes[0].core.set_on_demand(false);
    assert!(net.nodes[0].core.take_wants(net.now).is_empty());
    assert_eq!(net.nodes[0].core.counters().held_dropped, 1);
}

#[test]
fn an_initiation_from_an_unknown_key_is_held_wanted_and_answered_once_its_peer_comes() {
    let mut net = on_demand_pair(76);
    b_reaches_a(&mut net);
    // Node 1 opens to node 0, which does not know it yet.
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    send_from_tun(&mut net, 1, &ipv4_packet(b, a, b"hello"));
    net.run(TICK * 3);
    let key = PeerRef::Key(WgPublicKey(net.nodes[1].public()));
    assert_eq!(net.nodes[0].core.take_wants(net.now), vec![key]);
    let c = net.nodes[0].core.counters();
    assert_eq!((c.held_for_peer, c.dropped_garbage), (1, 0));

    // The peer arrives without an endpoint node 0 could reach (so only an answer to the held
    // initiation can complete the handshake): the response goes out with the new peer set.
    let cfg = PeerConfig {
        endpoints: Vec::new(),
        ..net.nodes[1].peer_config()
    };
    let mut out = Outbox::new();
    net.nodes[0].core.set_peers(vec![cfg], net.now, &mut out);
    assert!(
        out.iter()
            .any(|(dst, d)| d[0] == 2 && dst == Destination::Udp(net.nodes[1].src)),
        "a handshake response to the held initiation's source"
    );
    net.transmit(0, &out);
    // Well before boringtun's 5 s retransmission of the initiation.
    let took = run_until_delivered(&mut net, 0, 1, Duration::from_secs(1));
    assert!(took < Duration::from_millis(200), "{took:?}");
    assert_eq!(payloads(&net.nodes[0].delivered), vec![b"hello".to_vec()]);
    assert!(net.status_of(1, 1).last_handshake.is_some());
}

#[test]
fn an_initiation_from_a_refused_key_is_dropped_and_off_demand_it_is_garbage() {
    let mut net = on_demand_pair(77);
    let key = PeerRef::Key(WgPublicKey(net.nodes[1].public()));
    let mut out = Outbox::new();
    net.nodes[0].core.refuse(key, net.now, &mut out);
    assert!(out.tun_packets().is_empty());
    b_reaches_a(&mut net);
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    send_from_tun(&mut net, 1, &ipv4_packet(b, a, b"hello"));
    net.run(TICK * 3);
    assert!(net.nodes[0].core.take_wants(net.now).is_empty());
    let c = net.nodes[0].core.counters();
    assert_eq!((c.held_for_peer, c.dropped_garbage), (0, 1));

    net.nodes[0].core.set_on_demand(false);
    net.run(Duration::from_secs(6)); // node 1's initiation is retransmitted
    assert!(net.nodes[0].core.take_wants(net.now).is_empty());
    let c = net.nodes[0].core.counters();
    assert_eq!(c.held_for_peer, 0);
    assert!(c.dropped_garbage >= 2, "{c:?}");
}
