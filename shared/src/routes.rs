//! Routed prefixes: networks behind a device (a subnet router) or the whole internet (an exit
//! node), reached through the overlay.
//!
//! A device advertises prefixes (`ward up --advertise-routes`, `--advertise-exit-node`), the
//! coordinator approves them (by an administrator or by the policy's `[auto_approvers]`), the
//! policy names routed prefixes as service destinations, and each device is told, per router
//! peer, the prefixes it may reach through it. [`Prefix`] is the one type for all of that: an
//! address and a length with the host bits cleared, written `10.20.0.0/16` on the wire and in
//! files.
//!
//! I/O-free; no clock, no sockets.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::addr::{V4_NET, V4_PREFIX_LEN, V6_PREFIX_LEN};

/// Most routes one device may advertise; more is refused.
pub const MAX_ADVERTISED_ROUTES: usize = 64;

/// An IP prefix with its host bits cleared (`10.20.0.0/16`, `fd00:1::/64`). IPv4-mapped IPv6
/// addresses are not prefixes of their own: they are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("{0:?} is not a prefix (ADDRESS/LENGTH, e.g. 10.20.0.0/16)")]
    Syntax(String),
    #[error("{0:?}: prefix length {1} is longer than the address ({2} bits)")]
    Length(String, u8, u8),
    #[error("{0:?} has host bits set (did you mean {1}?)")]
    HostBits(String, Prefix),
    #[error("{0:?}: IPv4-mapped IPv6 prefixes are not accepted; write the IPv4 prefix")]
    Mapped(String),
}

impl Prefix {
    /// The IPv4 default route, `0.0.0.0/0` (what an exit node carries).
    pub const V4_DEFAULT: Prefix = Prefix {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };
    /// The IPv6 default route, `::/0`.
    pub const V6_DEFAULT: Prefix = Prefix {
        addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// A prefix from an address and a length; host bits are cleared, the length is clamped to
    /// the family's width.
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        let len = len.min(width(addr));
        Prefix {
            addr: mask(addr, len),
            len,
        }
    }

    /// A host prefix (/32 or /128).
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix::new(addr, width(addr))
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits (not a collection's size: there is no `is_empty`).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is a default route (`0.0.0.0/0` or `::/0`).
    pub fn is_default(&self) -> bool {
        self.len == 0
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is inside. An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }

    /// Whether all of `other` is inside this prefix.
    pub fn covers(&self, other: &Prefix) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Prefix) -> bool {
        self.covers(other) || other.covers(self)
    }
}

/// Whether `p` shares an address with the overlay pools: 100.64.0.0/10 and the coordinator's
/// ULA /48 `v6_prefix`. Such a prefix is never approved: it would let a router claim other
/// devices' overlay addresses.
pub fn overlaps_overlay(p: &Prefix, v6_prefix: Ipv6Addr) -> bool {
    let v4 = Prefix::new(IpAddr::V4(V4_NET), V4_PREFIX_LEN);
    let v6 = Prefix::new(IpAddr::V6(v6_prefix), V6_PREFIX_LEN);
    p.overlaps(&v4) || p.overlaps(&v6)
}

/// The longest prefix in `prefixes` that contains `ip`.
pub fn longest_match<'a>(
    prefixes: impl IntoIterator<Item = &'a Prefix>,
    ip: IpAddr,
) -> Option<&'a Prefix> {
    prefixes
        .into_iter()
        .filter(|p| p.contains(ip))
        .max_by_key(|p| p.len)
}

impl FromStr for Prefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let bad = || PrefixError::Syntax(s.to_string());
        let (a, l) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        if !l.bytes().all(|b| b.is_ascii_digit()) || l.is_empty() || l.len() > 3 {
            return Err(bad());
        }
        let len: u8 = l.parse().map_err(|_| bad())?;
        if let IpAddr::V6(v6) = addr {
            if v6.to_ipv4_mapped().is_some() {
                return Err(PrefixError::Mapped(s.to_string()));
            }
        }
        let w = width(addr);
        if len > w {
            return Err(PrefixError::Length(s.to_string(), len, w));
        }
        let p = Prefix::new(addr, len);
        if p.addr != addr {
            return Err(PrefixError::HostBits(s.to_string(), p));
        }
        Ok(p)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl TryFrom<String> for Prefix {
    type Error = PrefixError;
    fn try_from(s: String) -> Result<Prefix, PrefixError> {
        s.parse()
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

fn width(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        32
    } else {
        128
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn mask(a: IpAddr, len: u8) -> IpAddr {
    match a {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_prints() {
        assert_eq!(p("10.20.0.0/16").to_string(), "10.20.0.0/16");
        assert_eq!(p("0.0.0.0/0"), Prefix::V4_DEFAULT);
        assert_eq!(p("::/0"), Prefix::V6_DEFAULT);
        assert_eq!(p("fd00:1::/64").to_string(), "fd00:1::/64");
        assert_eq!(
            p("10.20.5.10/32"),
            Prefix::host("10.20.5.10".parse().unwrap())
        );
    }

    #[test]
    fn refuses_bad_prefixes() {
        for s in [
            "10.20.0.0",
            "10.20.0.0/",
            "10.20.0.0/33",
            "x/8",
            "10.0.0.0/+8",
            "::/129",
        ] {
            assert!(s.parse::<Prefix>().is_err(), "{s}");
        }
        let e = "10.20.5.1/16".parse::<Prefix>().unwrap_err();
        assert_eq!(
            e,
            PrefixError::HostBits("10.20.5.1/16".into(), p("10.20.0.0/16"))
        );
        assert!(matches!(
            "::ffff:10.0.0.0/104".parse::<Prefix>(),
            Err(PrefixError::Mapped(_))
        ));
    }

    #[test]
    fn containment_and_overlap() {
        let net = p("10.20.0.0/16");
        assert!(net.contains("10.20.5.10".parse().unwrap()));
        assert!(net.contains("::ffff:10.20.5.10".parse().unwrap()));
        assert!(!net.contains("10.21.0.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        assert!(net.covers(&p("10.20.5.10/32")));
        assert!(!p("10.20.5.10/32").covers(&net));
        assert!(net.overlaps(&p("10.0.0.0/8")));
        assert!(!net.overlaps(&p("10.21.0.0/16")));
        assert!(Prefix::V4_DEFAULT.contains("8.8.8.8".parse().unwrap()));
        assert!(!Prefix::V4_DEFAULT.contains("::1".parse().unwrap()));
        let all = [net, p("10.20.5.0/24"), Prefix::V4_DEFAULT];
        assert_eq!(
            longest_match(&all, "10.20.5.10".parse().unwrap()),
            Some(&p("10.20.5.0/24"))
        );
        assert_eq!(
            longest_match(&all, "1.1.1.1".parse().unwrap()),
            Some(&Prefix::V4_DEFAULT)
        );
    }

    #[test]
    fn overlay_overlap_is_detected() {
        let ula: Ipv6Addr = "fd12:3456:789a::".parse().unwrap();
        assert!(overlaps_overlay(&p("100.64.0.0/16"), ula));
        assert!(overlaps_overlay(&p("100.0.0.0/8"), ula));
        assert!(overlaps_overlay(&p("100.100.1.1/32"), ula));
        assert!(overlaps_overlay(&Prefix::V4_DEFAULT, ula));
        assert!(overlaps_overlay(&p("fd12:3456:789a:1::/64"), ula));
        assert!(overlaps_overlay(&Prefix::V6_DEFAULT, ula));
        assert!(!overlaps_overlay(&p("10.20.0.0/16"), ula));
        assert!(!overlaps_overlay(&p("fd12:3456:789b::/48"), ula));
    }

    #[test]
    fn serde_as_string() {
        let j = serde_json::to_string(&p("10.20.0.0/16")).unwrap();
        assert_eq!(j, "\"10.20.0.0/16\"");
        assert_eq!(
            serde_json::from_str::<Prefix>(&j).unwrap(),
            p("10.20.0.0/16")
        );
        assert!(serde_json::from_str::<Prefix>("\"10.20.0.1/16\"").is_err());
    }
}
