//! Pair and triple tests: cores joined by a simulated network with seeded loss and reordering,
//! on virtual time (boringtun's own timers see real time, which barely moves during a test).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::icmp::{checksum, UNREACHABLE_PER_SEC};
use super::*;
use rand::RngCore;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
        dests: Default::default(),
        rule: "allow-all".into(),
        service: "all".into(),
        sources: sources.clone().into(),
        source_sets: Vec::new(),
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
    sent: Vec<(Destination, Vec<u8>)>,
    /// Behind a simulated NAT (endpoint-independent mapping, port kept, filtering by remote
    /// address): datagrams get in only from addresses the node has sent to (within
    /// `Net::nat_timeout` of the last send, if set), by when it last did.
    nat: Option<std::collections::HashMap<SocketAddr, Instant>>,
}

impl Node {
    fn device_id(&self) -> u64 {
        u64::from(self.ipv4.octets()[3])
    }

    fn public(&self) -> [u8; 32] {
        self.core.public_key()
    }

    fn peer_config(&self) -> PeerConfig {
        PeerConfig {
            routes: Default::default(),
            device_id: u64::from(self.ipv4.octets()[3]),
            hostname: format!("node{}", self.ipv4.octets()[3]),
            public_key: self.public(),
            ipv4: self.ipv4,
            ipv6: self.ipv6,
            endpoints: vec![self.addrs[0]],
            relay: None,
        }
    }
}

struct InFlight {
    at: Instant,
    hop: Hop,
    data: Vec<u8>,
}

/// How a datagram travels: over UDP between addresses, or through a relay (by name) between
/// device ids.
enum Hop {
    Udp { from: SocketAddr, to: SocketAddr },
    Relay { relay: Arc<str>, from: u64, to: u64 },
}

struct Net {
    nodes: Vec<Node>,
    in_flight: Vec<InFlight>,
    rng: StdRng,
    loss: f64,
    /// UDP between nodes is dropped (a firewall between their networks).
    block_direct: bool,
    /// Loss rate through relays.
    relay_loss: f64,
    /// How long a NAT lets a remote address in after the node last sent to it (`None`: for
    /// ever).
    nat_timeout: Option<Duration>,
    max_delay_ticks: u32,
    /// UDP datagrams whose outer IPv4 packet is longer than this are dropped silently (a
    /// path-MTU black hole: a smaller link behind a router that sends no ICMP).
    udp_mtu: Option<usize>,
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
                    nat: None,
                }
            })
            .collect();
        let now = Instant::now();
        Net {
            nodes,
            in_flight: Vec::new(),
            rng,
            loss: 0.0,
            block_direct: false,
            relay_loss: 0.0,
            nat_timeout: None,
            max_delay_ticks: 0,
            udp_mtu: None,
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
            let hop = match dst {
                Destination::Udp(to) => {
                    if let Some(opened) = &mut self.nodes[i].nat {
                        opened.insert(to, self.now);
                    }
                    if self.block_direct || self.rng.gen_bool(self.loss) {
                        continue;
                    }
                    if self.udp_mtu.is_some_and(|m| data.len() + 28 > m) {
                        continue;
                    }
                    Hop::Udp { from, to }
                }
                Destination::Relay { relay, to } => {
                    if self.rng.gen_bool(self.relay_loss) {
                        continue;
                    }
                    let relay = self.nodes[i].core.relay_name(relay).expect("named relay");
                    Hop::Relay {
                        relay,
                        from: self.nodes[i].device_id(),
                        to,
                    }
                }
            };
            let delay = self.rng.gen_range(0..=self.max_delay_ticks);
            self.in_flight.push(InFlight {
                at: self.now + TICK * delay,
                hop,
                data: data.to_vec(),
            });
        }
    }

    /// Delivers one datagram that arrived at its destination (if a node is there, its NAT
    /// lets it in, and, through a relay, the node is connected to that relay).
    fn deliver(&mut self, d: InFlight) {
        let (i, src) = match d.hop {
            Hop::Udp { from, to } => {
                let Some(i) = self.nodes.iter().position(|n| n.addrs.contains(&to)) else {
                    return; // nobody there: a dead candidate
                };
                let (now, timeout) = (self.now, self.nat_timeout);
                let open = |sent: Option<&Instant>| {
                    sent.is_some_and(|t| timeout.is_none_or(|d| now < *t + d))
                };
                if self.nodes[i]
                    .nat
                    .as_ref()
                    .is_some_and(|opened| !open(opened.get(&from)))
                {
                    return; // the NAT has no mapping this datagram matches
                }
                (i, Source::Udp(from))
            }
            Hop::Relay { relay, from, to } => {
                let Some(i) = self.nodes.iter().position(|n| n.device_id() == to) else {
                    return;
                };
                let Some(relay) = self.nodes[i].core.relay_id(&relay) else {
                    return; // the receiver is not connected to that relay
                };
                (i, Source::Relay { relay, from })
            }
        };
        let (got, out) = self.inject(i, src, &d.data);
        if let Some(p) = got {
            self.nodes[i].delivered.push(p);
        }
        self.transmit(i, &out);
    }

    /// Injects a datagram as if it arrived from `from`; returns what the node did with it.
    fn inject(
        &mut self,
        i: usize,
        from: impl Into<Source>,
        data: &[u8],
    ) -> (Option<Vec<u8>>, Outbox) {
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
            self.deliver(d);
        }
        if self.now >= self.next_timers {
            for i in 0..self.nodes.len() {
                let mut out = Outbox::new();
                self.nodes[i].core.handle_timers(self.now, &mut out);
                self.transmit(i, &out);
            }
            // As the driver does: faster while a punch burst is under way.
            let wait = self.nodes.iter().map(|n| n.core.timer_wait()).min();
            self.next_timers = self.now + wait.unwrap_or(TIMER_INTERVAL);
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

mod demand;
mod flows;
mod local;
mod mtu;
mod nat;
mod paths;
mod punch;
mod relayed;
mod rotation;
mod routed;
mod runs;
