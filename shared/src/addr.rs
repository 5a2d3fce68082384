//! Overlay address pools: IPv4 from 100.64.0.0/10 (CGNAT space, as Tailscale does) and one
//! IPv6 unique local /48 per coordinator, chosen at random at `init`.
//!
//! A device gets the n-th usable address of each pool, n ≥ 1, and keeps it for life.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The overlay IPv4 prefix every device routes into its TUN.
pub const V4_NET: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 0);
pub const V4_PREFIX_LEN: u8 = 10;
pub const V6_PREFIX_LEN: u8 = 48;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPools {
    /// The ULA /48 (first 6 bytes meaningful, `fd` then a 40-bit random global ID).
    pub v6_prefix: Ipv6Addr,
}

impl AddressPools {
    /// Builds the pools from 5 random bytes (the RFC 4193 global ID), passed in by the caller.
    pub fn from_random(global_id: [u8; 5]) -> Self {
        let mut b = [0u8; 16];
        b[0] = 0xfd;
        b[1..6].copy_from_slice(&global_id);
        Self {
            v6_prefix: Ipv6Addr::from(b),
        }
    }

    /// Addresses for allocation index `n` (1-based). IPv4 skips host parts ending in .0 and .255,
    /// which some software treats as network or broadcast addresses. `None` when the pool is full.
    pub fn addresses(&self, n: u64) -> Option<(Ipv4Addr, Ipv6Addr)> {
        if n == 0 {
            return None;
        }
        // 254 usable addresses per 256: index n lands in block (n-1)/254, offset 1 + (n-1)%254.
        let block = (n - 1) / 254;
        let offset = 1 + (n - 1) % 254;
        let host = block.checked_mul(256)?.checked_add(offset)?;
        if host >= 1u64 << (32 - V4_PREFIX_LEN) {
            return None;
        }
        let v4 = Ipv4Addr::from(u32::from(V4_NET) + host as u32);
        let mut b = self.v6_prefix.octets();
        b[8..16].copy_from_slice(&n.to_be_bytes());
        Some((v4, Ipv6Addr::from(b)))
    }

    /// True if `ip` is inside this coordinator's overlay prefixes.
    pub fn contains_v4(ip: Ipv4Addr) -> bool {
        u32::from(ip) >> (32 - V4_PREFIX_LEN) == u32::from(V4_NET) >> (32 - V4_PREFIX_LEN)
    }
    pub fn contains_v6(&self, ip: Ipv6Addr) -> bool {
        ip.octets()[..6] == self.v6_prefix.octets()[..6]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_is_distinct_and_in_range() {
        let p = AddressPools::from_random([1, 2, 3, 4, 5]);
        assert_eq!(p.v6_prefix.to_string(), "fd01:203:405::");
        let (a, a6) = p.addresses(1).unwrap();
        assert_eq!(a, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(a6.to_string(), "fd01:203:405::1");
        assert_eq!(p.addresses(254).unwrap().0, Ipv4Addr::new(100, 64, 0, 254));
        assert_eq!(p.addresses(255).unwrap().0, Ipv4Addr::new(100, 64, 1, 1));
        let mut seen = std::collections::BTreeSet::new();
        for n in 1..3000 {
            let (v4, v6) = p.addresses(n).unwrap();
            assert!(AddressPools::contains_v4(v4));
            assert!(p.contains_v6(v6));
            let last = v4.octets()[3];
            assert!(last != 0 && last != 255);
            assert!(seen.insert(v4));
        }
        assert!(p.addresses(0).is_none());
        assert!(p.addresses(u64::MAX).is_none());
        assert!(!AddressPools::contains_v4(Ipv4Addr::new(100, 128, 0, 1)));
    }
}
