//! ICMP errors the data plane writes back into the TUN ("administratively prohibited" for
//! overlay destinations without a peer, "too big" for packets that do not fit their path), and
//! the window limiter that bounds how many are written per second.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ward_shared::addr::AddressPools;

/// Most ICMP "administratively prohibited" errors written back to the TUN per second.
pub(super) const UNREACHABLE_PER_SEC: u32 = 100;
/// The IPv4 minimum reassembly size (RFC 1812: an ICMP error quotes as much as fits in it) and
/// the IPv6 minimum MTU (RFC 4443).
const ICMP4_ERROR_MAX: usize = 576;
const ICMP6_ERROR_MAX: usize = 1280;

/// Inside 100.64.0.0/10 or the overlay's IPv6 /48 `v6_prefix`.
pub(super) fn in_overlay(dst: IpAddr, v6_prefix: Option<Ipv6Addr>) -> bool {
    match dst {
        IpAddr::V4(a) => AddressPools::contains_v4(a),
        IpAddr::V6(a) => v6_prefix.is_some_and(|p| a.octets()[..6] == p.octets()[..6]),
    }
}

/// At most [`UNREACHABLE_PER_SEC`] events per one-second window.
#[derive(Default)]
pub(super) struct WindowLimit {
    start: Option<Instant>,
    count: u32,
}

impl WindowLimit {
    pub(super) fn allow(&mut self, now: Instant) -> bool {
        match self.start {
            Some(t) if now.saturating_duration_since(t) < Duration::from_secs(1) => {}
            _ => {
                self.start = Some(now);
                self.count = 0;
            }
        }
        if self.count >= UNREACHABLE_PER_SEC {
            return false;
        }
        self.count += 1;
        true
    }
}

/// An ICMP "communication administratively prohibited" (IPv4 type 3 code 13, IPv6 type 1
/// code 1) answering `packet`, from its destination to its source. `None` for packets that must
/// not be answered (see [`icmp_error`]).
pub(super) fn icmp_prohibited(packet: &[u8]) -> Option<Vec<u8>> {
    icmp_error(packet, IcmpError::Prohibited)
}

/// Which ICMP error [`icmp_error`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::dataplane) enum IcmpError {
    /// Communication administratively prohibited: IPv4 type 3 code 13, IPv6 type 1 code 1.
    Prohibited,
    /// The path carries at most `mtu` bytes: IPv4 type 3 code 4 "fragmentation needed" with the
    /// next-hop MTU (RFC 1191), only for packets with DF set; IPv6 type 2 "packet too big".
    TooBig { mtu: u16 },
}

/// The ICMP error `kind` answering `packet`, from its destination to its source, quoting as
/// much of it as the minimum MTU allows (RFC 1812 §4.3.2.3, RFC 4443 §2.4). `None` for packets
/// that must not be answered: ICMP errors themselves (only queries are), non-first fragments,
/// unspecified, multicast or broadcast sources, malformed headers, and for `TooBig` IPv4
/// packets without DF.
pub(in crate::dataplane) fn icmp_error(packet: &[u8], kind: IcmpError) -> Option<Vec<u8>> {
    match packet.first()? >> 4 {
        4 => icmp4_error(packet, kind),
        6 => icmp6_error(packet, kind),
        _ => None,
    }
}

fn icmp4_error(packet: &[u8], kind: IcmpError) -> Option<Vec<u8>> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    if packet.len() < 20 || ihl < 20 || packet.len() < ihl {
        return None;
    }
    let frag = u16::from_be_bytes([packet[6], packet[7]]);
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    if frag & 0x1fff != 0 || src.is_unspecified() || src.is_multicast() || src.is_broadcast() {
        return None;
    }
    // Only ICMP queries (echo, timestamp) are answered; never an ICMP error.
    if packet[9] == 1 && !matches!(packet.get(ihl), Some(0 | 8 | 13 | 14)) {
        return None;
    }
    let (code, rest) = match kind {
        IcmpError::Prohibited => (13, [0u8; 4]),
        IcmpError::TooBig { mtu } => {
            if frag & 0x4000 == 0 {
                return None; // no DF: the sender did not ask to be told
            }
            let m = mtu.to_be_bytes();
            (4, [0, 0, m[0], m[1]])
        }
    };
    let quoted = &packet[..packet.len().min(ICMP4_ERROR_MAX - 28)];
    let total = 28 + quoted.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).ok()?.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&packet[16..20]);
    p[16..20].copy_from_slice(&packet[12..16]);
    let c = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 3;
    p[21] = code;
    p[24..28].copy_from_slice(&rest);
    p[28..].copy_from_slice(quoted);
    let c = checksum(&[&p[20..]]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

fn icmp6_error(packet: &[u8], kind: IcmpError) -> Option<Vec<u8>> {
    if packet.len() < 40 {
        return None;
    }
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
    if src.is_unspecified() || src.is_multicast() {
        return None;
    }
    // Do not answer ICMPv6 errors (types below 128); other extension headers are quoted as
    // they are.
    if packet[6] == 58 && packet.get(40).is_none_or(|t| *t < 128) {
        return None;
    }
    let (typ, code, rest) = match kind {
        IcmpError::Prohibited => (1, 1, [0u8; 4]),
        IcmpError::TooBig { mtu } => (2, 0, u32::from(mtu).to_be_bytes()),
    };
    let quoted = &packet[..packet.len().min(ICMP6_ERROR_MAX - 48)];
    let plen = 8 + quoted.len();
    let mut p = vec![0u8; 40 + plen];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&u16::try_from(plen).ok()?.to_be_bytes());
    p[6] = 58;
    p[7] = 64;
    p[8..24].copy_from_slice(&packet[24..40]);
    p[24..40].copy_from_slice(&packet[8..24]);
    p[40] = typ;
    p[41] = code;
    p[44..48].copy_from_slice(&rest);
    p[48..].copy_from_slice(quoted);
    let mut pseudo = [0u8; 40];
    pseudo[..32].copy_from_slice(&p[8..40]);
    pseudo[32..36].copy_from_slice(&u32::try_from(plen).ok()?.to_be_bytes());
    pseudo[39] = 58;
    let c = checksum(&[&pseudo, &p[40..]]);
    p[42..44].copy_from_slice(&c.to_be_bytes());
    Some(p)
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length
/// except possibly the last).
pub(in crate::dataplane) fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
