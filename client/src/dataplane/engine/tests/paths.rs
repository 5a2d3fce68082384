//! The packet paths on a pair or triple: delivery under loss and reordering, routing,
//! source checks, garbage, peer changes, endpoints, the inbound filter, ICMP replies.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;

#[test]
fn pair_delivers_both_ways_under_loss_and_reordering() {
    for seed in 0..4 {
        let mut net = Net::new(2, seed);
        net.loss = 0.1;
        net.max_delay_ticks = 3;
        net.full_mesh();
        net.run_until_established(Duration::from_secs(60));
        let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
        let mut sent_ab = Vec::new();
        let mut sent_ba = Vec::new();
        for k in 0..200u32 {
            let p = ipv4_packet(a4, b4, &k.to_be_bytes());
            net.send_ip(0, &p);
            sent_ab.push(p);
            let p = ipv4_packet(b4, a4, &(k + 1_000_000).to_be_bytes());
            net.send_ip(1, &p);
            sent_ba.push(p);
            net.step();
        }
        net.run(Duration::from_secs(1));
        for (node, sent) in [(1, &sent_ab), (0, &sent_ba)] {
            let got = &net.nodes[node].delivered;
            assert!(
                got.len() >= 150,
                "seed {seed}: only {} of 200 delivered",
                got.len()
            );
            assert!(
                got.iter().all(|p| sent.contains(p)),
                "seed {seed}: corrupted packet"
            );
            let mut uniq = got.clone();
            uniq.sort();
            uniq.dedup();
            assert_eq!(uniq.len(), got.len(), "seed {seed}: duplicate delivery");
        }
        let c = net.nodes[1].core.counters();
        assert_eq!(c.dropped_bad_source, 0);
        assert!(c.rx_packets >= 150);
    }
}

#[test]
fn ipv6_packets_are_routed_and_delivered() {
    let mut net = established_pair(1);
    let p = ipv6_packet(net.nodes[0].ipv6, net.nodes[1].ipv6, b"hello over v6");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![p]);
}

#[test]
fn first_packet_is_queued_behind_the_handshake_and_delivered() {
    let mut net = Net::new(2, 7);
    net.full_mesh();
    // Before any datagram moved: the packet waits for the session.
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"early");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(200));
    assert_eq!(net.nodes[1].delivered, vec![p]);
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let mut net = established_pair(2);
    let spoofed = ipv4_packet(Ipv4Addr::new(100, 64, 0, 99), net.nodes[1].ipv4, b"spoof");
    net.send_ip(0, &spoofed);
    let spoofed6 = ipv6_packet("fd00:1:2::99".parse().unwrap(), net.nodes[1].ipv6, b"spoof");
    net.send_ip(0, &spoofed6);
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].delivered.is_empty());
    assert_eq!(net.nodes[1].core.counters().dropped_bad_source, 2);
    assert_eq!(net.status_of(1, 1).dropped_bad_source, 2);
}

#[test]
fn removed_peer_is_refused_at_once() {
    let mut net = established_pair(3);
    // Capture a valid data datagram from A to B before B removes A.
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"before");
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    let (dst, datagram) = out.iter().next().map(|(d, b)| (d, b.to_vec())).unwrap();
    assert_eq!(dst, Destination::Udp(net.nodes[1].addrs[0]));

    net.set_peers(1, Vec::new());
    let from = net.nodes[0].src;
    let (got, reply) = net.inject(1, from, &datagram);
    assert!(got.is_none(), "packet under a removed key accepted");
    assert!(reply.is_empty());
    assert!(net.nodes[1].core.status().is_empty());

    // A's new handshake initiations get no answer either.
    let before = net.nodes[1].sent.len();
    net.send_ip(0, &p);
    net.run(Duration::from_secs(30));
    assert!(net.nodes[1].delivered.is_empty());
    assert_eq!(net.nodes[1].sent.len(), before, "B answered a removed peer");
    assert!(net.nodes[1].core.counters().dropped_garbage > 0);
}

#[test]
fn garbage_datagrams_are_ignored_without_output() {
    let mut net = established_pair(4);
    // A real data datagram and a real handshake initiation, to mutate.
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"x");
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    let data = out.iter().next().unwrap().1.to_vec();
    let a = Core::new(
        CoreConfig {
            private_key: net.nodes[0].private,
            persistent_keepalive: None,
            v6_prefix: None,
        },
        9,
    );
    let mut init_out = Outbox::new();
    a.set_peers(vec![net.nodes[1].peer_config()], net.now, &mut init_out);
    let init = init_out.iter().next().unwrap().1.to_vec();
    assert!(is_handshake_init(&init));

    let mut rng = StdRng::seed_from_u64(44);
    let mut samples: Vec<Vec<u8>> = Vec::new();
    for len in [
        0usize, 1, 3, 4, 5, 16, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1500,
    ] {
        for ty in [0u8, 1, 2, 3, 4, 5, 255] {
            let mut d = vec![0u8; len];
            rng.fill_bytes(&mut d);
            if len >= 4 {
                d[..4].copy_from_slice(&[ty, 0, 0, 0]);
            }
            samples.push(d);
        }
    }
    // Truncated and bit-flipped real messages.
    for cut in [1, 4, 16, 32, 100, 147] {
        samples.push(init[..cut].to_vec());
    }
    for cut in [4, 16, 31] {
        samples.push(data[..cut].to_vec());
    }
    // (mac2, bytes 132.., is only checked under load, so flipping it keeps a valid message.)
    for pos in [5, 20, 40, 100, 120, 131] {
        let mut m = init.clone();
        m[pos] ^= 0x55;
        samples.push(m);
    }
    for pos in [8, 16, data.len() - 1] {
        let mut m = data.clone();
        m[pos] ^= 0x01;
        samples.push(m);
    }
    // A replay of an already-delivered data packet.
    let from = net.nodes[0].src;
    let (got, _) = net.inject(1, from, &data);
    assert!(got.is_some());
    samples.push(data.clone());

    let before = net.nodes[1].core.counters();
    let endpoint_before = net.status_of(1, 1).endpoint;
    let attacker: SocketAddr = "192.0.2.66:6666".parse().unwrap();
    for s in &samples {
        let (got, reply) = net.inject(1, attacker, s);
        assert!(
            got.is_none(),
            "garbage delivered: {:?}",
            &s[..s.len().min(8)]
        );
        assert!(
            reply.is_empty(),
            "garbage answered: {:?}",
            &s[..s.len().min(8)]
        );
    }
    let after = net.nodes[1].core.counters();
    assert_eq!(
        after.dropped_garbage - before.dropped_garbage,
        samples.len() as u64
    );
    assert_eq!(after.rx_packets, before.rx_packets);
    assert_eq!(
        net.status_of(1, 1).endpoint,
        endpoint_before,
        "garbage moved the endpoint"
    );
}

#[test]
fn datagram_larger_than_output_buffer_is_dropped_not_panicking() {
    let net = established_pair(5);
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, &[7u8; 1000]);
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    let data = out.iter().next().unwrap().1.to_vec();
    let mut small = [0u8; 100];
    let mut reply = Outbox::new();
    let got = net.nodes[1].core.handle_datagram(
        net.nodes[0].src,
        &data,
        net.now,
        COORD_MS,
        &mut small,
        &mut reply,
    );
    assert!(got.is_none());
    assert!(reply.is_empty());
}

#[test]
fn unchanged_peer_keeps_its_session() {
    let mut net = established_pair(6);
    let before = net.nodes[0].core.counters().handshake_initiations_sent;
    let sent_before = net.nodes[0].sent.len();
    // Same key and addresses; new hostname and an extra candidate.
    let mut b = net.nodes[1].peer_config();
    b.hostname = "renamed".into();
    b.endpoints.push("198.51.100.9:9".parse().unwrap());
    net.set_peers(0, vec![b]);
    assert_eq!(
        net.nodes[0].sent.len(),
        sent_before,
        "set_peers sent something"
    );
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"same session");
    net.send_ip(0, &p);
    // The data datagram is the only thing sent, straight away.
    let new_sent = &net.nodes[0].sent[sent_before..];
    assert_eq!(new_sent.len(), 1);
    assert!(!is_handshake_init(&new_sent[0].1));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![p]);
    assert_eq!(
        net.nodes[0].core.counters().handshake_initiations_sent,
        before
    );
}

#[test]
fn changed_key_gets_a_new_session_and_the_old_key_is_refused() {
    let mut net = established_pair(7);
    // Capture a datagram under A's old key.
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"old key");
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    let old_datagram = out.iter().next().unwrap().1.to_vec();

    // A restarts with a new key; B learns it.
    let mut private = [0u8; 32];
    net.rng.fill_bytes(&mut private);
    net.nodes[0].core = Core::new(
        CoreConfig {
            private_key: private,
            persistent_keepalive: Some(25),
            v6_prefix: None,
        },
        77,
    );
    net.nodes[0].private = private;
    let (a, b) = (net.nodes[0].peer_config(), net.nodes[1].peer_config());
    net.set_peers(1, vec![a]);
    assert!(
        net.status_of(1, 1).last_handshake.is_none(),
        "old session kept"
    );
    let from = net.nodes[0].src;
    let (got, _) = net.inject(1, from, &old_datagram);
    assert!(got.is_none(), "old key accepted");

    net.set_peers(0, vec![b]);
    net.run_until_established(Duration::from_secs(5));
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"new key");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![p]);
}

#[test]
fn triple_routes_by_destination_and_binds_sources_to_keys() {
    let mut net = Net::new(3, 8);
    net.loss = 0.05;
    net.max_delay_ticks = 2;
    net.full_mesh();
    net.run_until_established(Duration::from_secs(60));
    let ips: Vec<Ipv4Addr> = net.nodes.iter().map(|n| n.ipv4).collect();
    for k in 0..50u32 {
        net.send_ip(0, &ipv4_packet(ips[0], ips[1], &k.to_be_bytes()));
        net.send_ip(0, &ipv4_packet(ips[0], ips[2], &(k + 1000).to_be_bytes()));
        net.step();
    }
    net.run(Duration::from_millis(100));
    let to = |n: &Node| -> Vec<Ipv4Addr> {
        n.delivered
            .iter()
            .map(|p| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
            .collect()
    };
    assert!(net.nodes[1].delivered.len() >= 40);
    assert!(net.nodes[2].delivered.len() >= 40);
    assert!(to(&net.nodes[1]).iter().all(|d| *d == ips[1]));
    assert!(to(&net.nodes[2]).iter().all(|d| *d == ips[2]));
    // B claims C's address towards A: refused, even though B is a valid peer of A.
    let before = net.nodes[0].delivered.len();
    net.loss = 0.0;
    net.send_ip(1, &ipv4_packet(ips[2], ips[0], b"i am C"));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[0].delivered.len(), before);
    assert_eq!(net.status_of(0, 2).dropped_bad_source, 1);
    assert_eq!(net.status_of(0, 3).dropped_bad_source, 0);
}

#[test]
fn endpoint_roams_to_the_source_of_authenticated_packets() {
    let mut net = established_pair(9);
    assert_eq!(net.status_of(1, 1).endpoint, Some(net.nodes[0].addrs[0]));
    // A's NAT rebinds: its packets now come from a new address, which also reaches it.
    let new: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    net.nodes[0].addrs.push(new);
    net.nodes[0].src = new;
    let p = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"from new place");
    net.send_ip(0, &p);
    net.run(Duration::from_millis(50));
    assert_eq!(net.status_of(1, 1).endpoint, Some(new));
    let sent_before = net.nodes[1].sent.len();
    let reply = ipv4_packet(net.nodes[1].ipv4, net.nodes[0].ipv4, b"reply");
    net.send_ip(1, &reply);
    assert_eq!(net.nodes[1].sent[sent_before].0, Destination::Udp(new));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[0].delivered, vec![reply]);
}

#[test]
fn candidates_are_probed_until_one_answers() {
    let mut net = Net::new(2, 10);
    let dead1: SocketAddr = "198.51.100.1:1".parse().unwrap();
    let dead2: SocketAddr = "198.51.100.2:2".parse().unwrap();
    let mut a = net.nodes[0].peer_config();
    a.endpoints = vec![dead1, net.nodes[0].addrs[0], dead2, dead1];
    // Only B knows where A might be; A has no endpoint for B (B is behind NAT, say).
    let mut b = net.nodes[1].peer_config();
    b.endpoints.clear();
    net.set_peers(0, vec![b]);
    net.set_peers(1, vec![a]);
    let inits: Vec<Destination> = net.nodes[1]
        .sent
        .iter()
        .filter(|(_, d)| is_handshake_init(d))
        .map(|(dst, _)| *dst)
        .collect();
    let want = [dead1, net.nodes[0].addrs[0], dead2].map(Destination::Udp);
    assert_eq!(inits, want);
    net.run_until_established(Duration::from_secs(5));
    assert_eq!(net.status_of(1, 1).endpoint, Some(net.nodes[0].addrs[0]));
    assert_eq!(net.status_of(0, 2).endpoint, Some(net.nodes[1].addrs[0]));
    let sent_before = net.nodes[1].sent.len();
    net.send_ip(1, &ipv4_packet(net.nodes[1].ipv4, net.nodes[0].ipv4, b"x"));
    let new_sent = &net.nodes[1].sent[sent_before..];
    assert_eq!(new_sent.len(), 1);
    assert_eq!(new_sent[0].0, Destination::Udp(net.nodes[0].addrs[0]));
}

#[test]
fn probing_an_unreachable_peer_is_bounded() {
    let mut net = Net::new(2, 11);
    let mut b = net.nodes[1].peer_config();
    b.endpoints = vec![
        "198.51.100.1:1".parse().unwrap(),
        "198.51.100.2:2".parse().unwrap(),
    ];
    net.set_peers(0, vec![b]);
    net.run(Duration::from_secs(600));
    let inits = net.nodes[0]
        .sent
        .iter()
        .filter(|(_, d)| is_handshake_init(d))
        .count();
    // 2 candidates; every 5 s for 2 minutes, then every 25 s.
    assert!(
        (20..=110).contains(&inits),
        "{inits} initiations in 10 minutes"
    );
    assert!(net.nodes[0].sent.iter().all(|(_, d)| is_handshake_init(d)));
}

#[test]
fn packets_without_a_route_are_counted() {
    let mut net = established_pair(12);
    let sent_before = net.nodes[0].sent.len();
    net.send_ip(
        0,
        &ipv4_packet(net.nodes[0].ipv4, Ipv4Addr::new(100, 64, 9, 9), b"?"),
    );
    net.send_ip(0, &[0x45, 0, 0]);
    net.send_ip(0, &[]);
    assert_eq!(net.nodes[0].sent.len(), sent_before);
    let c = net.nodes[0].core.counters();
    assert_eq!(c.dropped_no_route, 1);
    assert_eq!(c.dropped_bad_tun_packet, 2);
}

#[test]
fn outbox_runs_are_contiguous() {
    let mut out = Outbox::new();
    let d: SocketAddr = "10.0.0.1:1".parse().unwrap();
    out.push(d, &[1; 10]);
    out.push(d, &[2; 10]);
    let t = out.transmits();
    assert_eq!(t[0].start + t[0].len, t[1].start);
    assert_eq!(out.bytes().len(), 20);
    out.clear();
    assert!(out.is_empty());
    assert_eq!(out.used_bytes(), 0);
}

#[test]
fn filter_default_deny_allows_replies_and_counts_denials() {
    let mut net = established_pair(20);
    let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    // B has no rules: A cannot open anything on B...
    net.nodes[1].core.set_filter(Vec::new());
    net.send_ip(0, &udp4(a4, 5000, b4, 53, b"query"));
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].delivered.is_empty());
    assert_eq!(net.nodes[1].core.counters().dropped_filter_no_rule, 1);
    // ...but B's own flows to A get their replies.
    let reply = udp4(a4, 53, b4, 6000, b"answer");
    net.send_ip(1, &udp4(b4, 6000, a4, 53, b"question"));
    net.send_ip(0, &reply);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![reply]);
    assert_eq!(net.nodes[1].core.filter_counters().allowed_tracked, 1);
}

#[test]
fn filter_rules_allow_by_port_and_expire_on_coordinator_time() {
    let mut net = established_pair(21);
    let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    net.nodes[1].core.set_filter(vec![FilterRule {
        dests: Default::default(),
        rule: "grant:1".into(),
        service: "dns".into(),
        sources: vec![IpAddr::V4(a4)].into(),
        source_sets: Vec::new(),
        proto: Proto::Udp,
        ports: vec![PortRange { lo: 53, hi: 53 }],
        not_after_ms: Some(COORD_MS + 1),
    }]);
    let ok = udp4(a4, 5000, b4, 53, b"ok");
    net.send_ip(0, &ok);
    net.send_ip(0, &udp4(a4, 5000, b4, 54, b"wrong port"));
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![ok]);
    // The same flow after the grant's end, on coordinator time: cut.
    let mut out = Outbox::new();
    net.nodes[0]
        .core
        .handle_tun_packet(&udp4(a4, 5000, b4, 53, b"late"), net.now, &mut out);
    let (_, datagram) = out.iter().next().unwrap();
    let mut buf = vec![0u8; 2048];
    let mut replies = Outbox::new();
    let got = net.nodes[1].core.handle_datagram(
        net.nodes[0].src,
        datagram,
        net.now,
        COORD_MS + 1,
        &mut buf,
        &mut replies,
    );
    assert!(got.is_none());
    let c = net.nodes[1].core.counters();
    assert_eq!(c.dropped_filter_expired, 1);
    assert_eq!(c.dropped_filter_no_rule, 1);
}

#[test]
fn no_route_in_overlay_gets_icmp_prohibited_with_valid_checksums() {
    let net = established_pair(22);
    let a4 = net.nodes[0].ipv4;
    let nowhere = Ipv4Addr::new(100, 64, 9, 9);
    let p = udp4(a4, 5000, nowhere, 53, b"anyone?");
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    assert!(out.is_empty());
    let [icmp] = out.tun_packets() else {
        panic!("expected one ICMP error, got {:?}", out.tun_packets().len())
    };
    assert_eq!(icmp[9], 1);
    assert_eq!(&icmp[12..16], &nowhere.octets());
    assert_eq!(&icmp[16..20], &a4.octets());
    assert_eq!((icmp[20], icmp[21]), (3, 13));
    assert_eq!(checksum(&[&icmp[..20]]), 0, "IPv4 header checksum");
    assert_eq!(checksum(&[&icmp[20..]]), 0, "ICMP checksum");
    assert_eq!(&icmp[28..], &p[..]);

    // IPv6 inside the /48.
    let a6 = net.nodes[0].ipv6;
    let nowhere6: Ipv6Addr = "fd00:1:2::99".parse().unwrap();
    let p6 = ipv6_packet(a6, nowhere6, b"anyone?");
    let mut out = Outbox::new();
    net.nodes[0].core.handle_tun_packet(&p6, net.now, &mut out);
    let [icmp6] = out.tun_packets() else {
        panic!("expected one ICMPv6 error")
    };
    assert_eq!(icmp6[6], 58);
    assert_eq!((icmp6[40], icmp6[41]), (1, 1));
    assert_eq!(&icmp6[8..24], &nowhere6.octets());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&icmp6[8..40]);
    pseudo.extend_from_slice(&((icmp6.len() - 40) as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    assert_eq!(checksum(&[&pseudo, &icmp6[40..]]), 0, "ICMPv6 checksum");

    // Outside the overlay, and ICMP errors themselves: silence.
    let mut out = Outbox::new();
    let outside = udp4(a4, 5000, Ipv4Addr::new(192, 0, 2, 1), 53, b"x");
    net.nodes[0]
        .core
        .handle_tun_packet(&outside, net.now, &mut out);
    net.nodes[0].core.handle_tun_packet(icmp, net.now, &mut out);
    let outside6 = ipv6_packet(a6, "fd99::1".parse().unwrap(), b"x");
    net.nodes[0]
        .core
        .handle_tun_packet(&outside6, net.now, &mut out);
    assert!(out.tun_packets().is_empty());
    assert_eq!(net.nodes[0].core.counters().icmp_unreachable_sent, 2);
}

#[test]
fn icmp_prohibited_is_rate_limited() {
    let net = established_pair(23);
    let p = udp4(net.nodes[0].ipv4, 1, Ipv4Addr::new(100, 64, 9, 9), 2, b"");
    let mut out = Outbox::new();
    for _ in 0..500 {
        net.nodes[0].core.handle_tun_packet(&p, net.now, &mut out);
    }
    assert_eq!(out.tun_packets().len(), UNREACHABLE_PER_SEC as usize);
    out.clear();
    net.nodes[0]
        .core
        .handle_tun_packet(&p, net.now + Duration::from_secs(1), &mut out);
    assert_eq!(out.tun_packets().len(), 1);
    assert_eq!(net.nodes[0].core.counters().dropped_no_route, 501);
}
