//! Relayed paths and path selection on a pair: the harness carries datagrams directly (UDP,
//! which `block_direct` drops) and through a relay named "r1" (by device id, with the source
//! device's id, as `ward-relay` does).

use super::*;

const RELAY: &str = "r1";
const RELAY_MAX_DATAGRAM: u16 = 1200;

fn connect_relay(net: &mut Net, i: usize) {
    net.nodes[i]
        .core
        .set_relays(vec![(RELAY.into(), RELAY_MAX_DATAGRAM)], net.now);
}

/// Node `i` as a peer homed on the relay.
fn homed_config(net: &Net, i: usize) -> PeerConfig {
    PeerConfig {
        relay: Some(RELAY.into()),
        ..net.nodes[i].peer_config()
    }
}

/// Two nodes, each connected to the relay and given the other as a peer homed on it.
fn relayed_pair(seed: u64, block_direct: bool) -> Net {
    let mut net = Net::new(2, seed);
    net.block_direct = block_direct;
    connect_relay(&mut net, 0);
    connect_relay(&mut net, 1);
    configure_homed(&mut net);
    net
}

/// Gives each node the other as a peer homed on the relay, a few ticks apart (as netmaps
/// arrive: two initiations crossing on the very same tick, every time, would make neither
/// handshake complete).
fn configure_homed(net: &mut Net) {
    let (a, b) = (homed_config(net, 0), homed_config(net, 1));
    net.set_peers(0, vec![b]);
    net.run(TICK * 3);
    net.set_peers(1, vec![a]);
}

/// Runs until both sides have a session.
fn establish(net: &mut Net) {
    let end = net.now + Duration::from_secs(2);
    while net.now < end {
        net.step();
        if (0..2).all(|i| net.nodes[i].core.status()[0].last_handshake.is_some()) {
            return;
        }
    }
    panic!("no session");
}

fn path_of(net: &Net, i: usize) -> PathStatus {
    let other = net.nodes[1 - i].device_id();
    net.status_of(i, other).path
}

fn both_direct(net: &Net) -> bool {
    (0..2).all(|i| {
        path_of(net, i) == PathStatus::Direct(net.nodes[1 - i].src)
            && net.nodes[i].core.status()[0].last_handshake.is_some()
    })
}

fn both_relayed(net: &Net) -> bool {
    (0..2).all(|i| path_of(net, i) == PathStatus::Relay(RELAY.into()))
}

/// Sends one numbered packet each way, then steps one tick.
fn tick_both_ways(net: &mut Net, n: u32) {
    let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    net.send_ip(0, &ipv4_packet(a4, b4, &n.to_be_bytes()));
    net.send_ip(1, &ipv4_packet(b4, a4, &n.to_be_bytes()));
    net.step();
}

/// Streams both ways until `done` holds (checked after each tick) or `limit` passes; returns
/// the time it took and the next packet number.
fn stream_until(
    net: &mut Net,
    mut n: u32,
    limit: Duration,
    done: impl Fn(&Net) -> bool,
) -> (Option<Duration>, u32) {
    let start = net.now;
    while net.now < start + limit {
        tick_both_ways(net, n);
        n += 1;
        if done(net) {
            return (Some(net.now - start), n);
        }
    }
    (None, n)
}

/// The numbers of the packets node `i` delivered.
fn numbers(net: &Net, i: usize) -> std::collections::BTreeSet<u32> {
    net.nodes[i]
        .delivered
        .iter()
        .filter(|p| p.len() == 32)
        .map(|p| u32::from_be_bytes([p[28], p[29], p[30], p[31]]))
        .collect()
}

/// Every packet numbered in `range` was delivered both ways.
fn all_delivered(net: &Net, range: std::ops::Range<u32>) -> bool {
    let (a, b) = (numbers(net, 0), numbers(net, 1));
    let missing: Vec<u32> = range
        .clone()
        .filter(|k| !a.contains(k) || !b.contains(k))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "missing {range:?}: {missing:?} (a has {}, b has {})",
            a.len(),
            b.len()
        );
    }
    missing.is_empty()
}

fn relayed_sends(node: &Node) -> usize {
    node.sent
        .iter()
        .filter(|(d, _)| matches!(d, Destination::Relay { .. }))
        .count()
}

#[test]
fn starts_relayed_and_delivers_when_no_direct_path_works() {
    let mut net = relayed_pair(60, true);
    assert!(both_relayed(&net), "a usable relay is the path at once");
    // The first handshake went to the candidate and through the relay.
    let first: Vec<Destination> = net.nodes[0].sent.iter().map(|(d, _)| *d).collect();
    assert!(first.contains(&Destination::Udp(net.nodes[1].addrs[0])));
    assert!(first.contains(&Destination::Relay {
        relay: net.nodes[0].core.relay_id(RELAY).unwrap(),
        to: 2
    }));
    establish(&mut net);
    let (_, n) = stream_until(&mut net, 0, Duration::from_secs(1), |_| false);
    net.run(Duration::from_millis(100));
    assert!(
        all_delivered(&net, 0..n),
        "everything arrives through the relay"
    );
    assert!(both_relayed(&net));
    let c = net.nodes[0].core.counters();
    assert_eq!(c.path_switches, 0);
    assert!(c.tx_packets >= u64::from(n));
    assert!(
        net.status_of(0, 2).last_handshake.is_some(),
        "the session came up through the relay"
    );
}

#[test]
fn direct_probes_open_nats_and_both_sides_go_direct() {
    let mut net = relayed_pair(61, true);
    for node in &mut net.nodes {
        node.nat = Some(Default::default());
    }
    establish(&mut net);
    let (_, n) = stream_until(&mut net, 0, Duration::from_secs(1), |_| false);
    assert!(both_relayed(&net));
    // The firewall between the networks goes away: the next direct probes (keepalives to the
    // candidates, fast while the candidates are new) punch through both NATs.
    net.block_direct = false;
    let relayed_before = relayed_sends(&net.nodes[0]) + relayed_sends(&net.nodes[1]);
    let (took, n2) = stream_until(&mut net, n, Duration::from_secs(5), both_direct);
    let took = took.expect("both sides direct");
    assert!(
        took <= DIRECT_PROBE_INTERVAL_FAST + TIMER_INTERVAL * 2,
        "direct after {took:?}"
    );
    assert!(net.nodes[0].core.counters().direct_probes_sent > 0);
    // Once direct, data stops going through the relay.
    let relayed_mid = relayed_sends(&net.nodes[0]) + relayed_sends(&net.nodes[1]);
    assert!(relayed_mid > relayed_before);
    let (_, n3) = stream_until(&mut net, n2, Duration::from_secs(1), |_| false);
    net.run(Duration::from_millis(100));
    assert_eq!(
        relayed_sends(&net.nodes[0]) + relayed_sends(&net.nodes[1]),
        relayed_mid,
        "nothing relayed on a direct path"
    );
    assert!(all_delivered(&net, 0..n3), "no loss across the switch");
    assert!(both_direct(&net));
}

#[test]
fn blocked_direct_path_falls_back_to_the_relay_and_recovers_when_unblocked() {
    let mut net = relayed_pair(62, false);
    establish(&mut net);
    let (took, n) = stream_until(&mut net, 0, Duration::from_secs(2), both_direct);
    assert!(took.is_some(), "a working direct path is taken");
    let (_, n) = stream_until(&mut net, n, Duration::from_millis(500), |_| false);
    assert!(all_delivered(&net, 0..n - 2));

    // Direct blocked mid-stream: both sides are back on the relay within the rule's time.
    let switches: Vec<u64> = (0..2)
        .map(|i| net.nodes[i].core.counters().path_switches)
        .collect();
    net.block_direct = true;
    let blocked_at = n;
    let (took, n) = stream_until(&mut net, n, Duration::from_secs(10), both_relayed);
    let took = took.expect("fell back to the relay");
    assert!(
        took <= FALLBACK_SILENCE + TIMER_INTERVAL * 2,
        "fell back after {took:?}"
    );
    // Packets keep flowing: everything sent once both are relayed arrives.
    let resumed = n;
    let (_, n) = stream_until(&mut net, n, Duration::from_secs(2), |_| false);
    net.run(Duration::from_millis(100));
    assert!(all_delivered(&net, resumed..n), "relayed packets lost");
    let lost = (blocked_at..resumed)
        .filter(|k| !numbers(&net, 1).contains(k))
        .count();
    assert!(lost > 0, "the block dropped something (the test can fail)");

    // Unblocked: the next direct probes bring both sides back to direct.
    net.block_direct = false;
    let (took, n) = stream_until(&mut net, n, Duration::from_secs(10), both_direct);
    let took = took.expect("direct again");
    assert!(
        took <= DIRECT_PROBE_INTERVAL + TIMER_INTERVAL * 2,
        "direct again after {took:?}"
    );
    let (_, n2) = stream_until(&mut net, n, Duration::from_secs(1), |_| false);
    net.run(Duration::from_millis(100));
    assert!(
        all_delivered(&net, resumed..n2),
        "loss across the switch back"
    );
    // direct → relayed and relayed → direct, on each side.
    for (i, before) in switches.iter().enumerate() {
        let now = net.nodes[i].core.counters().path_switches;
        assert_eq!(now - before, 2, "node {i}");
    }
}

#[test]
fn nat_rebinding_moves_the_direct_path_to_the_new_address() {
    let mut net = relayed_pair(63, false);
    establish(&mut net);
    let (took, n) = stream_until(&mut net, 0, Duration::from_secs(2), both_direct);
    assert!(took.is_some());
    // A's NAT gives it a new public port.
    let new: SocketAddr = "10.203.0.1:40000".parse().unwrap();
    net.nodes[0].src = new;
    net.nodes[0].addrs.push(new);
    let (took, n) = stream_until(&mut net, n, Duration::from_secs(1), |net| {
        path_of(net, 1) == PathStatus::Direct(new)
    });
    assert!(took.is_some(), "B follows A to its new address");
    let resumed = n;
    let (_, n) = stream_until(&mut net, n, Duration::from_millis(500), |_| false);
    net.run(Duration::from_millis(100));
    assert!(all_delivered(&net, resumed..n));
    assert_eq!(path_of(&net, 1), PathStatus::Direct(new));
    assert_eq!(path_of(&net, 0), PathStatus::Direct(net.nodes[1].src));
}

#[test]
fn relay_not_connected_means_probing_direct_only() {
    // Peers homed on a relay this device is not connected to: today's behaviour.
    let mut net = Net::new(2, 64);
    net.block_direct = true;
    configure_homed(&mut net);
    let (_, n) = stream_until(&mut net, 0, Duration::from_secs(2), |_| false);
    assert_eq!(path_of(&net, 0), PathStatus::None);
    assert!(net.nodes.iter().all(|n| relayed_sends(n) == 0));
    assert!(net.nodes[1].delivered.is_empty());
    // Direct works: it is used, still nothing relayed.
    net.block_direct = false;
    let (took, _) = stream_until(&mut net, n, Duration::from_secs(10), both_direct);
    assert!(
        took.is_some(),
        "{:?} {:?}",
        net.nodes[0].core.status(),
        net.nodes[1].core.status()
    );
    assert!(net.nodes.iter().all(|n| relayed_sends(n) == 0));
    // The relay connects later: a working direct path stays.
    connect_relay(&mut net, 0);
    net.run(Duration::from_secs(1));
    assert_eq!(path_of(&net, 0), PathStatus::Direct(net.nodes[1].src));
}

#[test]
fn relay_disconnect_while_relayed_goes_back_to_direct_probing() {
    let mut net = relayed_pair(65, true);
    establish(&mut net);
    let (_, n) = stream_until(&mut net, 0, Duration::from_millis(500), |_| false);
    assert!(both_relayed(&net));
    net.nodes[0].core.set_relays(Vec::new(), net.now);
    assert_eq!(path_of(&net, 0), PathStatus::None);
    let before = relayed_sends(&net.nodes[0]);
    let _ = stream_until(&mut net, n, Duration::from_millis(500), |_| false);
    assert_eq!(
        relayed_sends(&net.nodes[0]),
        before,
        "sent through a gone relay"
    );
    // Datagrams still arriving through the relay it left are refused.
    assert!(net.nodes[0].core.relay_id(RELAY).is_none());
}

#[test]
fn oversized_inner_packet_on_a_relayed_path_gets_icmp_too_big_and_nothing_is_sent() {
    let mut net = relayed_pair(66, true);
    establish(&mut net);
    let _ = stream_until(&mut net, 0, Duration::from_millis(200), |_| false);
    assert!(both_relayed(&net));
    let inner_mtu = usize::from(RELAY_MAX_DATAGRAM) - 32;
    let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    let with_df = |len: usize| {
        let mut p = ipv4_packet(a4, b4, &vec![7u8; len - 28]);
        p[6] = 0x40;
        p[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p
    };
    let mut out = Outbox::new();
    net.nodes[0]
        .core
        .handle_tun_packet(&with_df(inner_mtu + 1), net.now, &mut out);
    assert!(out.is_empty(), "an oversized packet was sent");
    let icmp = out.tun_packets();
    assert_eq!(icmp.len(), 1);
    let e = &icmp[0];
    assert_eq!((e[9], e[20], e[21]), (1, 3, 4), "ICMP fragmentation needed");
    assert_eq!(usize::from(u16::from_be_bytes([e[26], e[27]])), inner_mtu);
    assert_eq!(net.nodes[0].core.path_mtus().counters().dropped_too_big, 1);
    // The largest packet that fits goes through the relay, within its datagram limit.
    let mut out = Outbox::new();
    net.nodes[0]
        .core
        .handle_tun_packet(&with_df(inner_mtu), net.now, &mut out);
    let sent: Vec<(Destination, usize)> = out.iter().map(|(d, b)| (d, b.len())).collect();
    assert!(
        matches!(sent[..], [(Destination::Relay { to: 2, .. }, len)] if len == usize::from(RELAY_MAX_DATAGRAM))
    );
    assert!(out.tun_packets().is_empty());
}

#[test]
fn relay_sources_bind_cookies_to_the_device_and_are_answered_through_the_relay() {
    let src = Source::Relay {
        relay: RelayId(3),
        from: 0x0102_0304_0506_0708,
    };
    assert_eq!(
        src.cookie_addr(),
        "100::3:102:304:506:708".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        src.reply_to(),
        Destination::Relay {
            relay: RelayId(3),
            to: 0x0102_0304_0506_0708
        }
    );
}

#[test]
fn relayed_path_delivers_under_loss_and_reordering() {
    for seed in 0..3 {
        let mut net = relayed_pair(70 + seed, true);
        net.relay_loss = 0.1;
        net.max_delay_ticks = 3;
        let end = net.now + Duration::from_secs(30);
        while net
            .nodes
            .iter()
            .any(|n| n.core.status()[0].last_handshake.is_none())
        {
            assert!(
                net.now < end,
                "seed {seed}: no session through a lossy relay"
            );
            net.step();
        }
        for n in &mut net.nodes {
            n.delivered.clear();
        }
        let (_, n) = stream_until(&mut net, 0, Duration::from_secs(2), |_| false);
        net.run(Duration::from_millis(200));
        for i in 0..2 {
            let got = numbers(&net, i);
            assert!(
                got.len() * 100 >= n as usize * 80,
                "seed {seed}: node {i} got {} of {n}",
                got.len()
            );
            assert_eq!(got.len(), net.nodes[i].delivered.len(), "duplicates");
        }
        assert!(both_relayed(&net));
    }
}

#[test]
fn lossy_direct_path_does_not_fall_back() {
    let mut net = relayed_pair(75, false);
    establish(&mut net);
    let (took, n) = stream_until(&mut net, 0, Duration::from_secs(2), both_direct);
    assert!(took.is_some());
    let switches: Vec<u64> = (0..2)
        .map(|i| net.nodes[i].core.counters().path_switches)
        .collect();
    net.loss = 0.2;
    net.max_delay_ticks = 3;
    let _ = stream_until(&mut net, n, Duration::from_secs(20), |_| false);
    assert!(both_direct(&net), "a lossy but live direct path is kept");
    for (i, before) in switches.iter().enumerate() {
        assert_eq!(net.nodes[i].core.counters().path_switches, *before);
    }
}

#[test]
fn a_side_that_only_answers_follows_the_peer_to_the_relay_at_its_first_relayed_packet() {
    let mut net = relayed_pair(66, false);
    establish(&mut net);
    let (took, n) = stream_until(&mut net, 0, Duration::from_secs(2), both_direct);
    assert!(took.is_some(), "a working direct path is taken");
    net.run(Duration::from_millis(100));

    // Direct blocked; only node 0 sends (a TCP sender), so only node 0 can see the silence.
    net.block_direct = true;
    let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    let mut k = n;
    let limit = net.now + Duration::from_secs(10);
    while path_of(&net, 0) != PathStatus::Relay(RELAY.into()) {
        assert!(net.now < limit, "node 0 never fell back");
        net.send_ip(0, &ipv4_packet(a4, b4, &k.to_be_bytes()));
        k += 1;
        net.step();
    }
    assert!(
        matches!(path_of(&net, 1), PathStatus::Direct(_)),
        "node 1 sent nothing, so it had no reason to fall back yet"
    );

    // Node 0's next packet arrives through the relay; node 1 answers the moment it has it.
    let probe = k;
    net.send_ip(0, &ipv4_packet(a4, b4, &probe.to_be_bytes()));
    let limit = net.now + Duration::from_secs(1);
    while !numbers(&net, 1).contains(&probe) {
        assert!(net.now < limit, "the relayed packet never arrived");
        net.step();
    }
    assert_eq!(
        path_of(&net, 1),
        PathStatus::Relay(RELAY.into()),
        "node 1 follows its peer to the relay on receipt"
    );
    let answer = probe + 1;
    net.send_ip(1, &ipv4_packet(b4, a4, &answer.to_be_bytes()));
    net.run(Duration::from_millis(100));
    assert!(
        numbers(&net, 0).contains(&answer),
        "the answer went through the relay, not into the dead direct path"
    );
}

#[test]
fn an_answered_direct_probe_brings_both_sides_direct_with_no_traffic() {
    // Direct blocked at first: both sides settle on the relay.
    let mut net = relayed_pair(67, true);
    establish(&mut net);
    assert!(both_relayed(&net));
    let switches: Vec<u64> = (0..2)
        .map(|i| net.nodes[i].core.counters().path_switches)
        .collect();

    // Unblocked, and nothing is sent by either side: only the timers' direct probes run. The
    // first probe to get through is answered straight back, so both sides go direct.
    net.block_direct = false;
    let limit = net.now + DIRECT_PROBE_INTERVAL + TIMER_INTERVAL * 3;
    while !both_direct(&net) {
        assert!(
            net.now < limit,
            "not both direct without traffic: {:?} / {:?}",
            path_of(&net, 0),
            path_of(&net, 1)
        );
        net.step();
    }
    for (i, before) in switches.iter().enumerate() {
        assert_eq!(
            net.nodes[i].core.counters().path_switches - before,
            1,
            "node {i}"
        );
    }
}
