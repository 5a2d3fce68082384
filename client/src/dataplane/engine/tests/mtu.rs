//! Active path-MTU probing of direct paths: a path that silently drops large datagrams (no
//! ICMP, so the kernel keeps saying 1500) is probed down to what it carries; a peer that never
//! answers changes nothing; acknowledgements nobody could have sent change nothing.

use super::super::super::probe::{
    encode_ack, Probe, PROBE_TIMEOUT, SUSPECT_AFTER, UNANSWERED_ROUNDS,
};
use super::*;

/// The pair, each side's kernel saying the path to the other carries 1500 bytes, and the
/// network dropping UDP datagrams longer than `black_hole` (outer IPv4 size).
fn pair_with_black_hole(seed: u64, black_hole: Option<usize>) -> Net {
    let mut net = established_pair(seed);
    net.udp_mtu = black_hole;
    for i in 0..2 {
        let peer_ip = net.nodes[1 - i].addrs[0].ip();
        net.nodes[i].core.path_mtus().handle_learned(peer_ip, 1500);
    }
    net
}

/// Runs until node `i`'s path MTU to its peer is in `want` (or `limit` passes); returns the
/// virtual time it took.
fn run_until_mtu(
    net: &mut Net,
    i: usize,
    want: std::ops::RangeInclusive<u16>,
    limit: Duration,
) -> Duration {
    let start = net.now;
    let peer = net.nodes[1 - i].device_id();
    while net.now < start + limit {
        net.step();
        if net
            .status_of(i, peer)
            .path_mtu
            .is_some_and(|m| want.contains(&m))
        {
            return net.now - start;
        }
    }
    panic!(
        "path MTU {:?} not in {want:?} within {limit:?}",
        net.status_of(i, peer).path_mtu
    );
}

#[test]
fn probing_finds_a_black_hole_both_ways() {
    let mut net = pair_with_black_hole(71, Some(1433));
    // The coarse round (1 s) finds 1420 fits and 1440 does not; the fine round (1 s more)
    // narrows it to the step below 1433.
    let took = run_until_mtu(&mut net, 0, 1430..=1433, Duration::from_secs(5));
    assert!(took <= PROBE_TIMEOUT * 3, "{took:?}");
    run_until_mtu(&mut net, 1, 1430..=1433, Duration::from_secs(5));
    // A packet that fitted the kernel's 1500 but not the probed path is refused with an ICMP
    // too-big into the TUN; probes and acknowledgements never reached a TUN or the filter.
    let mtu = net.status_of(0, 2).path_mtu.unwrap();
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    let big = ipv4_packet(a, b, &vec![7u8; 1440 - 28]);
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&big, net.now, &mut out);
    assert!(out.is_empty(), "too big for the probed path: not sent");
    assert_eq!(out.tun_packets().len(), 0, "no DF: dropped without ICMP");
    let fits = ipv4_packet(a, b, &vec![7u8; usize::from(mtu) - 60 - 28]);
    net.send_ip(0, &fits);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![fits]);
    for n in &net.nodes {
        let c = n.core.counters();
        assert_eq!(c.dropped_filter_other + c.dropped_filter_no_rule, 0);
        assert_eq!(c.dropped_bad_source + c.dropped_wrong_destination, 0);
        let p = n.core.path_mtus().counters();
        assert!(
            p.probes_sent > 0 && p.probes_acked > 0 && p.probes_lost > 0,
            "{p:?}"
        );
        assert_eq!(p.probes_sent, p.probes_acked + p.probes_lost);
    }
}

#[test]
fn a_path_that_carries_1500_keeps_it() {
    let mut net = pair_with_black_hole(72, None);
    net.run(Duration::from_secs(3));
    for i in 0..2 {
        assert_eq!(
            net.status_of(i, net.nodes[1 - i].device_id()).path_mtu,
            Some(1500)
        );
        let p = net.nodes[i].core.path_mtus().counters();
        assert!(p.probes_sent > 0);
        assert_eq!((p.probes_acked, p.probes_lost), (p.probes_sent, 0));
    }
    assert!(net.nodes.iter().all(|n| n.delivered.is_empty()));
}

#[test]
fn a_peer_that_never_answers_leaves_the_kernel_mtu() {
    let mut net = pair_with_black_hole(73, Some(1400));
    // Node 1 answers nothing (as an agent without probing would): its acknowledgements, the
    // only 76-byte datagrams here, are lost.
    let ack_len = encode_ack(
        &Probe {
            round: 0,
            size: 0,
            nonce: 0,
        },
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
    )
    .len()
        + DATA_OVERHEAD;
    let end = net.now + PROBE_TIMEOUT * (u32::from(UNANSWERED_ROUNDS) + 2);
    while net.now < end {
        net.in_flight.retain(|d| {
            !(matches!(d.hop, Hop::Udp { from, .. } if from == net.nodes[1].src)
                && d.data.len() == ack_len)
        });
        net.step();
    }
    assert_eq!(net.status_of(0, 2).path_mtu, Some(1500));
    let p = net.nodes[0].core.path_mtus().counters();
    assert_eq!(p.probes_acked, 0);
    assert!(p.probes_lost >= 12 * u64::from(UNANSWERED_ROUNDS), "{p:?}");
    // And it gave up: no more probes until the next period.
    let sent = p.probes_sent;
    net.run(Duration::from_secs(5));
    assert_eq!(net.nodes[0].core.path_mtus().counters().probes_sent, sent);
}

#[test]
fn forged_acknowledgements_cannot_raise_the_mtu() {
    let mut net = pair_with_black_hole(74, Some(1400));
    net.run(Duration::from_millis(300));
    let from = net.nodes[1].src;
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    let garbage_before = net.nodes[0].core.counters().dropped_garbage;
    for round in 0..4u32 {
        for nonce in 0..50u64 {
            let forged = encode_ack(
                &Probe {
                    round,
                    size: 1500,
                    nonce,
                },
                b,
                a,
            );
            // Off the path: the acknowledgement in the clear is not WireGuard at all.
            let (got, out) = net.inject(0, from, &forged);
            assert!(got.is_none() && out.is_empty());
            // From the peer itself, inside its session, with a guessed nonce.
            let mut buf = vec![0u8; 256];
            let table = read(&net.nodes[1].core.table);
            let peer = table.peers.values().next().unwrap().clone();
            drop(table);
            let n = match lock(&peer.session).link.tunn.encapsulate(&forged, &mut buf) {
                TunnResult::WriteToNetwork(p) => p.len(),
                other => panic!("{other:?}"),
            };
            let (got, _) = net.inject(0, from, &buf[..n]);
            assert!(got.is_none(), "never for the TUN");
        }
    }
    assert_eq!(
        net.nodes[0].core.counters().dropped_garbage,
        garbage_before + 200
    );
    run_until_mtu(&mut net, 0, 1397..=1400, Duration::from_secs(5));
    net.run(Duration::from_secs(3));
    assert!(net.status_of(0, 2).path_mtu.is_some_and(|m| m <= 1400));
}

#[test]
fn a_black_hole_that_appears_later_is_found_when_large_packets_go_unanswered() {
    let mut net = pair_with_black_hole(75, None);
    net.run(Duration::from_secs(3));
    let sent = net.nodes[0].core.path_mtus().counters().probes_sent;
    assert_eq!(net.status_of(0, 2).path_mtu, Some(1500));
    // The link behind some router shrinks; nobody tells the kernel. Small packets still pass.
    net.udp_mtu = Some(1400);
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    net.send_ip(0, &ipv4_packet(a, b, b"small"));
    net.run(Duration::from_millis(100));
    assert_eq!(
        net.nodes[0].core.path_mtus().counters().probes_sent,
        sent,
        "no reason to probe"
    );
    // Large packets go out and nothing comes back: probed within a couple of seconds.
    let big = ipv4_packet(a, b, &vec![1u8; 1400]);
    net.send_ip(0, &big);
    let took = run_until_mtu(&mut net, 0, 1397..=1400, Duration::from_secs(5));
    assert!(
        took <= SUSPECT_AFTER + PROBE_TIMEOUT * 2 + TIMER_INTERVAL,
        "{took:?}"
    );
    assert_eq!(net.nodes[1].delivered, vec![ipv4_packet(a, b, b"small")]);
}
