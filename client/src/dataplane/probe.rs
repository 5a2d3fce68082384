//! Active path MTU probing of a direct path: finds what the path really carries when a router
//! drops large packets without sending ICMP (a path MTU black hole), so the kernel never
//! learns it.
//!
//! I/O-free, time passed in. One [`Prober`] per peer; the engine drives it from its timer and
//! packet paths:
//!
//! ```text
//! every timer tick, the peer's path direct to addr, kernel MTU to addr known:
//!     for p in prober.handle_timers(now, addr, kernel_mtu) {
//!         encrypt encode_probe(&p, src, dst) in the peer's session; send it to addr
//!     }
//!     pmtu.set_probed(addr.ip(), prober.ceiling())      (when it differs)
//! decrypted packet from the peer:
//!     match parse(packet) {
//!         Some(Msg::Probe { .. }) => encrypt encode_ack(..) back the way it came
//!         Some(Msg::Ack(ack)) => prober.handle_ack(ack, now)
//!         None => an ordinary packet: prober.note_received()
//!     }
//! packet sent to the peer longer than a 1280-byte path carries:   prober.note_big_sent(now)
//! ```
//!
//! A probe is an inner IPv4 packet of a protocol number reserved for experiments (253,
//! RFC 3692) from this device's overlay address to the peer's, carrying a marker, the round,
//! the probed size and a nonce, padded so that the encrypted datagram makes an outer IP packet
//! of exactly the probed size. It travels inside the WireGuard session, so only the peer can
//! read or answer it, and an acknowledgement only counts if it echoes a probe's nonce: no one
//! off the path can raise the MTU, and not even the peer can acknowledge a size it never
//! received. The peer's engine recognises probes and acknowledgements before its inbound
//! filter; they never reach a TUN. An older peer drops probes (its filter does not know the
//! protocol) and never answers: the prober then gives up until the next period and the kernel's
//! MTU stays in force.
//!
//! A round sends probes of a list of common outer sizes (1280 … 1500, and the kernel's MTU)
//! at once, none above the kernel's MTU; when it ends (all answered, or [`PROBE_TIMEOUT`]),
//! the largest answered size `a` and the smallest unanswered larger size `b` bound the path
//! MTU (`a` is in force at once), and a second round probes seven sizes evenly between them.
//! The result is the largest
//! answered size; it caps the kernel's MTU ([`Prober::ceiling`]) only when some size up to the
//! kernel's was not answered. A first round with no answer at all is retried
//! ([`UNANSWERED_ROUNDS`] rounds) before giving up. Rounds run when the path becomes direct
//! (or moves), when the kernel's MTU for it changes, every [`REPROBE_INTERVAL`] (so a ceiling
//! lifts within that time once the path carries more), and when loss of large packets is
//! suspected: large
//! packets went out and nothing came back for [`SUSPECT_AFTER`] (at most once per
//! [`SUSPECT_MIN_GAP`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// The inner IP protocol number of probes and acknowledgements (RFC 3692: for experiments).
pub const PROBE_PROTO: u8 = 253;
/// The smallest outer size probed, and the lowest ceiling probing sets (the IPv6 minimum).
pub const MIN_PROBED_MTU: u16 = 1280;
/// How long a round waits for acknowledgements.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a direct path is probed again.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(600);
/// Rounds in a row without any acknowledgement before giving up until [`REPROBE_INTERVAL`].
pub const UNANSWERED_ROUNDS: u8 = 3;
/// Large packets sent and nothing received for this long: probe now.
pub const SUSPECT_AFTER: Duration = Duration::from_secs(1);
/// Suspected loss starts a round at most this often.
pub const SUSPECT_MIN_GAP: Duration = Duration::from_secs(30);
/// The outer sizes of a first round (common link MTUs: IPv6 minimum, tunnels, PPPoE, clouds,
/// Ethernet), besides the kernel's MTU itself.
const COARSE: [u16; 12] = [
    1280, 1320, 1360, 1380, 1400, 1420, 1440, 1452, 1460, 1472, 1492, 1500,
];
/// Sizes probed between the bounds a first round found.
const FINE_STEPS: u16 = 8;

const MAGIC: [u8; 8] = *b"wardPMTU";
const KIND_PROBE: u8 = 1;
const KIND_ACK: u8 = 2;
/// IPv4 header + magic + kind + 3 reserved + round + size + 2 reserved + nonce.
const MSG_LEN: usize = 20 + 8 + 4 + 4 + 4 + 8;

/// A probe to send: an outer IP packet of `size` bytes to the peer's direct address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub round: u32,
    pub size: u16,
    pub nonce: u64,
}

/// A received probe or acknowledgement (see [`parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// The peer probes: answer with [`encode_ack`].
    Probe(Probe),
    /// The peer received one of this device's probes.
    Ack(Probe),
}

/// Probing state for one peer's direct path. See the module documentation for the loop.
pub struct Prober {
    /// The direct address probed (a new one starts over).
    addr: Option<SocketAddr>,
    round: Option<Round>,
    /// Largest size answered at the last finished probing (with no larger size lost: `None`).
    ceiling: Option<u16>,
    next_round: Option<Instant>,
    /// The kernel's MTU when the last round started (a change means the path changed).
    kernel_at_round: Option<u16>,
    unanswered: u8,
    round_seq: u32,
    /// When a large packet went out with nothing received since.
    big_since: Option<Instant>,
    last_suspect: Option<Instant>,
    rng: u64,
    /// Probes sent, acknowledged and lost since the counters were last taken.
    pub tally: Tally,
}

/// Probe counts, taken by the engine into the path-MTU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub sent: u64,
    pub acked: u64,
    pub lost: u64,
}

struct Round {
    seq: u32,
    deadline: Instant,
    /// Fine round: the answered size the coarse round found.
    fine_over: Option<u16>,
    probes: Vec<(Probe, bool)>,
}

impl Prober {
    /// A prober that has not probed yet; `seed` draws the nonces.
    pub fn new(seed: u64) -> Prober {
        Prober {
            addr: None,
            round: None,
            ceiling: None,
            next_round: None,
            kernel_at_round: None,
            unanswered: 0,
            round_seq: 0,
            big_since: None,
            last_suspect: None,
            rng: seed | 1,
            tally: Tally::default(),
        }
    }

    /// The path MTU probing found, when it is below what the kernel said when probed: the
    /// largest outer size acknowledged, never below [`MIN_PROBED_MTU`]. `None`: no limit found
    /// (every size answered, or the peer does not answer).
    pub fn ceiling(&self) -> Option<u16> {
        self.ceiling
    }

    /// Timer tick while the peer's path is direct to `addr` and the kernel's path MTU to it is
    /// `kernel_mtu`: finishes a round whose time is up and returns the probes to send now.
    pub fn handle_timers(&mut self, now: Instant, addr: SocketAddr, kernel_mtu: u16) -> Vec<Probe> {
        if self.addr != Some(addr) {
            // A new path: what was learned about the old one does not hold.
            self.addr = Some(addr);
            self.round = None;
            self.ceiling = None;
            self.unanswered = 0;
            self.next_round = Some(now);
        }
        if let Some(r) = &self.round {
            let done = r.probes.iter().all(|(_, acked)| *acked);
            if !done && now < r.deadline {
                return Vec::new();
            }
            return self.finish_round(now, kernel_mtu);
        }
        let suspect = self
            .big_since
            .is_some_and(|t| now.saturating_duration_since(t) >= SUSPECT_AFTER)
            && self
                .last_suspect
                .is_none_or(|t| now.saturating_duration_since(t) >= SUSPECT_MIN_GAP);
        if suspect {
            tracing::debug!(%addr, "large packets unanswered: probing the path MTU");
            self.last_suspect = Some(now);
            self.big_since = None;
        } else if self.kernel_at_round.is_some_and(|k| k != kernel_mtu) {
            tracing::debug!(%addr, kernel_mtu, "the kernel's path MTU changed: probing again");
        } else if self.next_round.is_none_or(|t| now < t) {
            return Vec::new();
        }
        self.start_round(now, kernel_mtu, coarse_sizes(kernel_mtu), None)
    }

    /// An acknowledgement arrived from the peer (authenticated by its session).
    pub fn handle_ack(&mut self, ack: Probe, _now: Instant) {
        let Some(r) = &mut self.round else {
            return;
        };
        for (p, acked) in &mut r.probes {
            if !*acked && *p == ack {
                *acked = true;
                self.tally.acked += 1;
                return;
            }
        }
        tracing::trace!(?ack, "acknowledgement for no outstanding probe ignored");
    }

    /// A packet larger than a [`MIN_PROBED_MTU`] path carries went to the peer.
    pub fn note_big_sent(&mut self, now: Instant) {
        if self.big_since.is_none() {
            self.big_since = Some(now);
        }
    }

    /// A packet (not a probe) came from the peer.
    pub fn note_received(&mut self) {
        self.big_since = None;
    }

    fn start_round(
        &mut self,
        now: Instant,
        kernel_mtu: u16,
        sizes: Vec<u16>,
        fine_over: Option<u16>,
    ) -> Vec<Probe> {
        if sizes.is_empty() {
            self.kernel_at_round = Some(kernel_mtu);
            self.next_round = Some(now + REPROBE_INTERVAL);
            return Vec::new();
        }
        self.kernel_at_round = Some(kernel_mtu);
        self.round_seq = self.round_seq.wrapping_add(1);
        let seq = self.round_seq;
        let probes: Vec<Probe> = sizes
            .into_iter()
            .map(|size| Probe {
                round: seq,
                size,
                nonce: self.next_nonce(),
            })
            .collect();
        self.tally.sent += probes.len() as u64;
        self.round = Some(Round {
            seq,
            deadline: now + PROBE_TIMEOUT,
            fine_over,
            probes: probes.iter().map(|p| (*p, false)).collect(),
        });
        probes
    }

    fn finish_round(&mut self, now: Instant, kernel_mtu: u16) -> Vec<Probe> {
        let Some(r) = self.round.take() else {
            return Vec::new();
        };
        self.tally.lost += r.probes.iter().filter(|(_, a)| !*a).count() as u64;
        let acked = r
            .probes
            .iter()
            .filter(|(_, a)| *a)
            .map(|(p, _)| p.size)
            .max();
        let largest_sent = r.probes.iter().map(|(p, _)| p.size).max();
        tracing::trace!(round = r.seq, ?acked, ?largest_sent, "probe round finished");
        match (r.fine_over, acked) {
            (None, None) => {
                self.unanswered = self.unanswered.saturating_add(1);
                if self.unanswered < UNANSWERED_ROUNDS {
                    return self.start_round(now, kernel_mtu, coarse_sizes(kernel_mtu), None);
                }
                // Not answered (an older peer, or the path is down): the kernel's MTU stands.
                self.unanswered = 0;
                self.next_round = Some(now + REPROBE_INTERVAL);
                Vec::new()
            }
            (None, Some(a)) => {
                self.unanswered = 0;
                let lost_above = r
                    .probes
                    .iter()
                    .filter(|(p, acked)| !*acked && p.size > a)
                    .map(|(p, _)| p.size)
                    .min();
                match lost_above {
                    None => self.conclude(now, None),
                    Some(b) => {
                        let fine = fine_sizes(a, b);
                        if fine.is_empty() {
                            self.conclude(now, Some(a))
                        } else {
                            // `a` is known to pass: in force at once (a stalled stream resumes
                            // a round sooner), raised by the fine round if it finds more.
                            self.ceiling = Some(a.max(MIN_PROBED_MTU));
                            self.start_round(now, kernel_mtu, fine, Some(a))
                        }
                    }
                }
            }
            (Some(a), fine) => self.conclude(now, Some(fine.map_or(a, |f| f.max(a)))),
        }
    }

    fn conclude(&mut self, now: Instant, ceiling: Option<u16>) -> Vec<Probe> {
        let ceiling = ceiling.map(|c| c.max(MIN_PROBED_MTU));
        if ceiling != self.ceiling {
            tracing::info!(addr = ?self.addr, ?ceiling, old = ?self.ceiling, "path MTU probed");
        }
        self.ceiling = ceiling;
        self.next_round = Some(now + REPROBE_INTERVAL);
        Vec::new()
    }

    fn next_nonce(&mut self) -> u64 {
        // xorshift64*: unpredictable enough that a peer cannot acknowledge a probe it never
        // received, given a seed from the engine's seeded generator.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The first round's sizes for a path the kernel says carries `kernel_mtu`: the common sizes
/// from [`MIN_PROBED_MTU`] up to it, and it.
fn coarse_sizes(kernel_mtu: u16) -> Vec<u16> {
    if kernel_mtu < MIN_PROBED_MTU {
        return Vec::new();
    }
    let mut sizes: Vec<u16> = COARSE.into_iter().filter(|s| *s < kernel_mtu).collect();
    sizes.push(kernel_mtu);
    sizes
}

/// Sizes evenly between an answered size `a` and a lost size `b` (exclusive).
fn fine_sizes(a: u16, b: u16) -> Vec<u16> {
    let mut sizes: Vec<u16> = (1..FINE_STEPS)
        .map(|k| a + ((u32::from(b - a) * u32::from(k)) / u32::from(FINE_STEPS)) as u16)
        .filter(|s| *s > a && *s < b)
        .collect();
    sizes.dedup();
    sizes
}

/// The inner packet for `probe`, from `src` to `dst` (overlay addresses), padded so that
/// encrypted (WireGuard data overhead 32, no padding) it makes an outer IP packet of
/// `probe.size` bytes to `path`. `None` if the size is too small to hold the message.
pub fn encode_probe(probe: &Probe, src: Ipv4Addr, dst: Ipv4Addr, path: IpAddr) -> Option<Vec<u8>> {
    let inner = usize::from(super::pmtu::inner_mtu(probe.size, path));
    (inner >= MSG_LEN).then(|| encode(KIND_PROBE, probe, src, dst, inner))
}

/// The acknowledgement of `probe` (small: the message alone), from `src` to `dst`.
pub fn encode_ack(probe: &Probe, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    encode(KIND_ACK, probe, src, dst, MSG_LEN)
}

/// A probe or acknowledgement, if `packet` (a decrypted inner packet) is one. Bounded: reads
/// only the fixed message at the start.
pub fn parse(packet: &[u8]) -> Option<Msg> {
    if packet.len() < MSG_LEN || packet[0] != 0x45 || packet[9] != PROBE_PROTO {
        return None;
    }
    let m = &packet[20..MSG_LEN];
    if m[..8] != MAGIC {
        return None;
    }
    let probe = Probe {
        round: u32::from_be_bytes([m[12], m[13], m[14], m[15]]),
        size: u16::from_be_bytes([m[16], m[17]]),
        nonce: u64::from_be_bytes([m[20], m[21], m[22], m[23], m[24], m[25], m[26], m[27]]),
    };
    match m[8] {
        KIND_PROBE => Some(Msg::Probe(probe)),
        KIND_ACK => Some(Msg::Ack(probe)),
        _ => None,
    }
}

/// Whether `packet` is one of ours at all (a probe or acknowledgement, or a later kind):
/// never for the TUN.
pub fn is_probe_packet(packet: &[u8]) -> bool {
    packet.len() >= MSG_LEN
        && packet[0] == 0x45
        && packet[9] == PROBE_PROTO
        && packet[20..28] == MAGIC
}

/// The inner destination address of a probe packet (see [`is_probe_packet`]).
pub fn destination(packet: &[u8]) -> Ipv4Addr {
    match packet.get(16..20) {
        Some(&[a, b, c, d]) => Ipv4Addr::new(a, b, c, d),
        _ => Ipv4Addr::UNSPECIFIED,
    }
}

fn encode(kind: u8, probe: &Probe, src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let len = len.clamp(MSG_LEN, usize::from(u16::MAX));
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 1; // TTL: never forwarded
    p[9] = PROBE_PROTO;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = super::engine::icmp::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    let m = &mut p[20..MSG_LEN];
    m[..8].copy_from_slice(&MAGIC);
    m[8] = kind;
    m[12..16].copy_from_slice(&probe.round.to_be_bytes());
    m[16..18].copy_from_slice(&probe.size.to_be_bytes());
    m[20..28].copy_from_slice(&probe.nonce.to_be_bytes());
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ADDR: &str = "10.99.0.12:51820";

    /// Drives a prober against a path that carries up to `mtu` and a peer that answers
    /// (or not); returns the ceiling and the virtual time it took.
    fn converge(mtu: u16, kernel: u16, answers: bool) -> (Option<u16>, Duration) {
        let start = Instant::now();
        let mut now = start;
        let addr: SocketAddr = ADDR.parse().unwrap();
        let mut p = Prober::new(7);
        let mut rounds = 0;
        while now < start + Duration::from_secs(30) {
            let probes = p.handle_timers(now, addr, kernel);
            if !probes.is_empty() {
                rounds += 1;
            }
            for pr in probes {
                assert!(pr.size <= kernel && pr.size >= MIN_PROBED_MTU);
                if answers && pr.size <= mtu {
                    p.handle_ack(pr, now);
                }
            }
            if p.round.is_none() && p.next_round.is_some_and(|t| t > now + PROBE_TIMEOUT) {
                return (p.ceiling(), now - start);
            }
            now += Duration::from_millis(250);
        }
        panic!("no conclusion after {rounds} rounds");
    }

    #[test]
    fn finds_the_largest_size_the_path_carries() {
        assert_eq!(converge(1500, 1500, true).0, None, "all fit: no ceiling");
        assert_eq!(converge(1400, 1500, true).0, Some(1400));
        let (c, took) = converge(1433, 1500, true);
        let c = c.unwrap();
        assert!((1430..=1433).contains(&c), "{c}");
        assert!(took <= Duration::from_secs(3), "{took:?}");
        // Never above the kernel's MTU, never below 1280.
        assert_eq!(converge(9000, 1450, true).0, None);
        assert_eq!(converge(1280, 1500, true).0, Some(1280));
        assert_eq!(converge(1200, 1500, true).0, None, "nothing answered");
        assert_eq!(converge(1300, 1200, true).0, None, "kernel below 1280");
    }

    #[test]
    fn a_peer_that_never_answers_sets_nothing() {
        let (c, took) = converge(1400, 1500, false);
        assert_eq!(c, None);
        assert!(took >= PROBE_TIMEOUT * u32::from(UNANSWERED_ROUNDS));
    }

    #[test]
    fn acks_must_match_an_outstanding_probe() {
        let now = Instant::now();
        let addr: SocketAddr = ADDR.parse().unwrap();
        let mut p = Prober::new(3);
        let probes = p.handle_timers(now, addr, 1500);
        let small = probes[0];
        p.handle_ack(small, now);
        // A forged acknowledgement of the largest size with a guessed nonce is ignored.
        let big = *probes.last().unwrap();
        p.handle_ack(
            Probe {
                nonce: big.nonce ^ 1,
                ..big
            },
            now,
        );
        p.handle_ack(
            Probe {
                size: 1500,
                ..small
            },
            now,
        );
        let fine = p.handle_timers(now + PROBE_TIMEOUT, addr, 1500);
        assert!(!fine.is_empty());
        assert_eq!(
            p.ceiling(),
            Some(1280),
            "the answered size holds during the fine round"
        );
        assert!(p
            .handle_timers(now + PROBE_TIMEOUT * 2, addr, 1500)
            .is_empty());
        assert_eq!(p.ceiling(), Some(1280));
        assert_eq!(p.tally.acked, 1);
    }

    #[test]
    fn suspected_loss_starts_a_round_and_a_new_path_starts_over() {
        let mut now = Instant::now();
        let addr: SocketAddr = ADDR.parse().unwrap();
        let mut p = Prober::new(5);
        let probes = p.handle_timers(now, addr, 1500);
        for pr in &probes {
            p.handle_ack(*pr, now);
        }
        assert!(p.handle_timers(now, addr, 1500).is_empty());
        assert_eq!(p.ceiling(), None);
        now += Duration::from_secs(5);
        assert!(p.handle_timers(now, addr, 1500).is_empty(), "idle");
        p.note_big_sent(now);
        now += Duration::from_millis(500);
        p.note_received();
        now += SUSPECT_AFTER;
        assert!(p.handle_timers(now, addr, 1500).is_empty(), "answered");
        p.note_big_sent(now);
        now += SUSPECT_AFTER;
        let probes = p.handle_timers(now, addr, 1500);
        assert!(!probes.is_empty(), "suspected");
        for pr in &probes {
            p.handle_ack(*pr, now);
        }
        assert!(p.handle_timers(now, addr, 1500).is_empty(), "concluded");
        // The kernel's MTU changes (a new route, a link changed): probed again at once.
        let again = p.handle_timers(now, addr, 1460);
        assert_eq!(again.last().map(|p| p.size), Some(1460));
        // A new address: probed at once.
        let other: SocketAddr = "10.99.0.13:51820".parse().unwrap();
        assert!(!p.handle_timers(now, other, 1500).is_empty());
    }

    #[test]
    fn messages_round_trip_and_fill_the_probed_size() {
        let probe = Probe {
            round: 9,
            size: 1400,
            nonce: 0xdead_beef_0123_4567,
        };
        let (a, b) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        let p = encode_probe(&probe, a, b, v4).unwrap();
        assert_eq!(p.len() + 60, 1400);
        assert_eq!(encode_probe(&probe, a, b, v6).unwrap().len() + 80, 1400);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]) as usize, p.len());
        assert_eq!(super::super::engine::icmp::checksum(&[&p[..20]]), 0);
        assert_eq!(parse(&p), Some(Msg::Probe(probe)));
        let ack = encode_ack(&probe, b, a);
        assert_eq!(ack.len(), MSG_LEN);
        assert_eq!(parse(&ack), Some(Msg::Ack(probe)));
        assert!(is_probe_packet(&ack));
        // Other packets are not probes; short or odd ones are refused without panicking.
        let mut udp = ack.clone();
        udp[9] = 17;
        assert_eq!(parse(&udp), None);
        assert!(!is_probe_packet(&udp));
        for n in 0..MSG_LEN {
            assert_eq!(parse(&ack[..n]), None);
        }
        let mut unknown = ack.clone();
        unknown[28] = 9;
        assert_eq!(parse(&unknown), None);
        assert!(is_probe_packet(&unknown));
        assert!(encode_probe(&Probe { size: 100, ..probe }, a, b, v6).is_none());
    }
}
