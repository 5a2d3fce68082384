//! Pair and triple tests: cores joined by a simulated network with seeded loss and reordering,
//! on virtual time (boringtun's own timers see real time, which barely moves during a test).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;
use rand::RngCore;
use ward_shared::filter::{PortRange, Proto};

const TICK: Duration = Duration::from_millis(10);
const V6_PREFIX: &str = "fd00:1:2::";
/// Coordinator time the tests run at.
const COORD_MS: i64 = 1_800_000_000_000;

/// Filter rules letting nodes `ids` open anything (tcp, udp, icmp) on a node.
fn allow_all(ids: impl Iterator<Item = u8>) -> Vec<FilterRule> {
    let sources: Vec<IpAddr> = ids
        .flat_map(|i| {
            [
                IpAddr::V4(Ipv4Addr::new(100, 64, 0, i)),
                IpAddr::V6(format!("fd00:1:2::{i}").parse().unwrap()),
            ]
        })
        .collect();
    let rule = |proto, ports| FilterRule {
        rule: "allow-all".into(),
        service: "all".into(),
        sources: sources.clone(),
        proto,
        ports,
        not_after_ms: None,
    };
    let every = vec![PortRange {
        lo: 0,
        hi: u16::MAX,
    }];
    vec![
        rule(Proto::Tcp, every.clone()),
        rule(Proto::Udp, every),
        rule(Proto::Icmp, Vec::new()),
    ]
}

struct Node {
    core: Core,
    /// Underlay addresses that deliver to this node.
    addrs: Vec<SocketAddr>,
    /// Source address its datagrams appear from (changes on a simulated NAT rebinding).
    src: SocketAddr,
    private: [u8; 32],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// IP packets this node's core handed to its TUN.
    delivered: Vec<Vec<u8>>,
    /// Every datagram this node sent: (destination, bytes).
    sent: Vec<(SocketAddr, Vec<u8>)>,
}

impl Node {
    fn public(&self) -> [u8; 32] {
        self.core.public_key()
    }

    fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            device_id: u64::from(self.ipv4.octets()[3]),
            hostname: format!("node{}", self.ipv4.octets()[3]),
            public_key: self.public(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            endpoints: vec![self.addrs[0]],
        }
    }
}

struct InFlight {
    at: Instant,
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

struct Net {
    nodes: Vec<Node>,
    in_flight: Vec<InFlight>,
    rng: StdRng,
    loss: f64,
    max_delay_ticks: u32,
    now: Instant,
    next_timers: Instant,
}

impl Net {
    fn new(n: usize, seed: u64) -> Net {
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = (1..=n as u8)
            .map(|i| {
                let mut private = [0u8; 32];
                rng.fill_bytes(&mut private);
                let addr: SocketAddr = format!("10.203.0.{i}:51820").parse().unwrap();
                let core = Core::new(
                    CoreConfig {
                        private_key: private,
                        persistent_keepalive: Some(25),
                        v6_prefix: Some(V6_PREFIX.parse().unwrap()),
                    },
                    rng.next_u64(),
                );
                core.set_filter(allow_all((1..=n as u8).filter(|j| *j != i)));
                Node {
                    core,
                    addrs: vec![addr],
                    src: addr,
                    private,
                    ipv4: Ipv4Addr::new(100, 64, 0, i),
                    ipv6: format!("fd00:1:2::{i}").parse().unwrap(),
                    delivered: Vec::new(),
                    sent: Vec::new(),
                }
            })
            .collect();
        let now = Instant::now();
        Net {
            nodes,
            in_flight: Vec::new(),
            rng,
            loss: 0.0,
            max_delay_ticks: 0,
            now,
            next_timers: now,
        }
    }

    /// Gives every node every other node as a peer.
    fn full_mesh(&mut self) {
        let configs: Vec<PeerConfig> = self.nodes.iter().map(Node::peer_config).collect();
        for i in 0..self.nodes.len() {
            let peers = configs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| c.clone())
                .collect();
            self.set_peers(i, peers);
        }
    }

    fn set_peers(&mut self, i: usize, peers: Vec<PeerConfig>) {
        let mut out = Outbox::new();
        self.nodes[i].core.set_peers(peers, self.now, &mut out);
        self.transmit(i, &out);
    }

    fn send_ip(&mut self, i: usize, packet: &[u8]) {
        let mut out = Outbox::new();
        self.nodes[i]
            .core
            .handle_tun_packet(packet, self.now, &mut out);
        self.transmit(i, &out);
    }

    fn transmit(&mut self, i: usize, out: &Outbox) {
        let from = self.nodes[i].src;
        for (dst, data) in out.iter() {
            self.nodes[i].sent.push((dst, data.to_vec()));
            if self.rng.gen_bool(self.loss) {
                continue;
            }
            let delay = self.rng.gen_range(0..=self.max_delay_ticks);
            self.in_flight.push(InFlight {
                at: self.now + TICK * delay,
                from,
                to: dst,
                data: data.to_vec(),
            });
        }
    }

    /// Injects a datagram as if it arrived from `from`; returns what the node did with it.
    fn inject(&mut self, i: usize, from: SocketAddr, data: &[u8]) -> (Option<Vec<u8>>, Outbox) {
        let mut buf = vec![0u8; 65536];
        let mut out = Outbox::new();
        let got = self.nodes[i]
            .core
            .handle_datagram(from, data, self.now, COORD_MS, &mut buf, &mut out)
            .map(|n| buf[..n].to_vec());
        (got, out)
    }

    fn step(&mut self) {
        self.now += TICK;
        let mut due = Vec::new();
        let mut k = 0;
        while k < self.in_flight.len() {
            if self.in_flight[k].at <= self.now {
                due.push(self.in_flight.swap_remove(k));
            } else {
                k += 1;
            }
        }
        // swap_remove already scrambles the order; shuffle further for reordering.
        for k in (1..due.len()).rev() {
            let j = self.rng.gen_range(0..=k);
            due.swap(k, j);
        }
        for d in due {
            let Some(i) = self.nodes.iter().position(|n| n.addrs.contains(&d.to)) else {
                continue; // nobody there: a dead candidate
            };
            let (got, out) = self.inject(i, d.from, &d.data);
            if let Some(p) = got {
                self.nodes[i].delivered.push(p);
            }
            self.transmit(i, &out);
        }
        if self.now >= self.next_timers {
            self.next_timers = self.now + TIMER_INTERVAL;
            for i in 0..self.nodes.len() {
                let mut out = Outbox::new();
                self.nodes[i].core.handle_timers(self.now, &mut out);
                self.transmit(i, &out);
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until every node has a session with every peer (or panics after `limit`).
    fn run_until_established(&mut self, limit: Duration) {
        let end = self.now + limit;
        while self.now < end {
            self.step();
            let all = self.nodes.iter().all(|n| {
                n.core
                    .status()
                    .iter()
                    .all(|s| s.last_handshake.is_some() && s.endpoint.is_some())
            });
            if all && self.in_flight.is_empty() {
                return;
            }
        }
        panic!("sessions not established within {limit:?}");
    }

    fn status_of(&self, i: usize, device_id: u64) -> PeerStatus {
        self.nodes[i]
            .core
            .status()
            .into_iter()
            .find(|s| s.device_id == device_id)
            .expect("peer present")
    }
}

fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17; // UDP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for c in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&1000u16.to_be_bytes());
    p[22..24].copy_from_slice(&2000u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// An IPv6 UDP packet (1000 → 2000; the checksum is not filled in).
fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut p = vec![0u8; 40 + len];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 17; // UDP
    p[7] = 64;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&1000u16.to_be_bytes());
    p[42..44].copy_from_slice(&2000u16.to_be_bytes());
    p[44..46].copy_from_slice(&(len as u16).to_be_bytes());
    p[48..].copy_from_slice(payload);
    p
}

/// An IPv4 UDP packet with the given ports.
fn udp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = ipv4_packet(src, dst, payload);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p
}

fn is_handshake_init(d: &[u8]) -> bool {
    d.len() == HANDSHAKE_INIT_LEN && d[0] == MSG_HANDSHAKE_INIT
}

fn established_pair(seed: u64) -> Net {
    let mut net = Net::new(2, seed);
    net.full_mesh();
    net.run_until_established(Duration::from_secs(5));
    net
}

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
    assert_eq!(dst, net.nodes[1].addrs[0]);

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
    assert_eq!(net.nodes[1].sent[sent_before].0, new);
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
    let inits: Vec<SocketAddr> = net.nodes[1]
        .sent
        .iter()
        .filter(|(_, d)| is_handshake_init(d))
        .map(|(dst, _)| *dst)
        .collect();
    assert_eq!(inits, vec![dead1, net.nodes[0].addrs[0], dead2]);
    net.run_until_established(Duration::from_secs(5));
    assert_eq!(net.status_of(1, 1).endpoint, Some(net.nodes[0].addrs[0]));
    assert_eq!(net.status_of(0, 2).endpoint, Some(net.nodes[1].addrs[0]));
    let sent_before = net.nodes[1].sent.len();
    net.send_ip(1, &ipv4_packet(net.nodes[1].ipv4, net.nodes[0].ipv4, b"x"));
    let new_sent = &net.nodes[1].sent[sent_before..];
    assert_eq!(new_sent.len(), 1);
    assert_eq!(new_sent[0].0, net.nodes[0].addrs[0]);
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
        rule: "grant:1".into(),
        service: "dns".into(),
        sources: vec![IpAddr::V4(a4)],
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
