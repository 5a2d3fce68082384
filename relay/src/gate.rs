//! The per-source gate in front of ticket verification: a token bucket per source address.
//!
//! A device's hello (and the ticket in it) is the first thing an unauthenticated party can
//! make the relay check, over QUIC and TCP alike. Each hello first takes a token from its
//! source address's bucket ([`GateConfig::burst`] deep, refilled at [`GateConfig::per_sec`]);
//! an empty bucket refuses the hello at once (`rate_limited`), before the ticket's signature
//! is checked. A device behind the same NAT as many others shares their source address, so the
//! burst is sized for an office reconnecting at once.
//!
//! The table holds at most [`GateConfig::max_sources`] addresses. When it is full, sources
//! whose bucket has refilled are forgotten (forgetting them changes nothing); if none has,
//! new sources share one bucket ("other sources"), so memory stays bounded whatever the
//! number of addresses, and a flood from many addresses cannot lock out the ones already
//! known.
//!
//! I/O-free: time comes in as an [`Instant`]; the drivers (`server`, `tcp`) call
//! [`HelloGate::admit`] through `server::accept_hello`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// The gate's limits.
#[derive(Debug, Clone, Copy)]
pub struct GateConfig {
    /// Hellos a source may send at once.
    pub burst: f64,
    /// Hellos per second a source gets back.
    pub per_sec: f64,
    /// Sources tracked at most.
    pub max_sources: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            burst: 64.0,
            per_sec: 8.0,
            max_sources: 16_384,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, cfg: &GateConfig, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * cfg.per_sec).min(cfg.burst);
        self.at = self.at.max(now);
    }

    fn take(&mut self, cfg: &GateConfig, now: Instant) -> bool {
        self.refill(cfg, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, cfg: &GateConfig, now: Instant) -> bool {
        let mut b = *self;
        b.refill(cfg, now);
        b.tokens >= cfg.burst
    }
}

/// Token buckets per source address.
#[derive(Debug)]
pub struct HelloGate {
    cfg: GateConfig,
    sources: HashMap<IpAddr, Bucket>,
    /// The bucket new sources share while the table is full of busy ones.
    others: Bucket,
}

impl HelloGate {
    pub fn new(cfg: GateConfig, now: Instant) -> Self {
        Self {
            cfg,
            sources: HashMap::new(),
            others: Bucket {
                tokens: cfg.burst,
                at: now,
            },
        }
    }

    /// Whether a hello from `source` may be checked now (`false`: refuse it, rate limited).
    pub fn admit(&mut self, source: IpAddr, now: Instant) -> bool {
        let source = canonical(source);
        let cfg = self.cfg;
        if !self.sources.contains_key(&source) && self.sources.len() >= cfg.max_sources.max(1) {
            self.sources.retain(|_, b| !b.is_full(&cfg, now));
            if self.sources.len() >= cfg.max_sources.max(1) {
                return self.others.take(&cfg, now);
            }
        }
        self.sources
            .entry(source)
            .or_insert(Bucket {
                tokens: cfg.burst,
                at: now,
            })
            .take(&cfg, now)
    }

    /// Sources tracked now.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// An IPv4 address seen through a dual-stack socket counts as itself.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|_| panic!("{s}"))
    }

    #[test]
    fn a_flooding_source_is_refused_past_its_burst_and_others_are_not() {
        let t0 = Instant::now();
        let mut g = HelloGate::new(GateConfig::default(), t0);
        // 1 000 hellos a second from one source for 3 s.
        let mut admitted = 0;
        for i in 0..3000u64 {
            let now = t0 + Duration::from_millis(i);
            if g.admit(ip("192.0.2.7"), now) {
                admitted += 1;
            }
            // Another device, once a second, from elsewhere: always admitted.
            if i % 1000 == 0 {
                assert!(g.admit(ip("198.51.100.9"), now), "at {i} ms");
            }
        }
        // The burst, then 8 a second.
        assert!((64..=64 + 3 * 8 + 1).contains(&admitted), "{admitted}");
        // The same address seen through a dual-stack socket is the same source.
        let end = t0 + Duration::from_millis(3000);
        while g.admit(ip("192.0.2.7"), end) {}
        assert!(!g.admit(ip("::ffff:192.0.2.7"), end));
    }

    #[test]
    fn the_table_is_bounded_and_known_sources_keep_their_buckets() {
        let cfg = GateConfig {
            burst: 2.0,
            per_sec: 1.0,
            max_sources: 4,
        };
        let t0 = Instant::now();
        let mut g = HelloGate::new(cfg, t0);
        for i in 0..4 {
            assert!(g.admit(ip(&format!("10.0.0.{i}")), t0));
        }
        // Full of sources that have not refilled: 10 000 new addresses share one bucket.
        let admitted = (0..10_000u32)
            .filter(|i| g.admit(IpAddr::V4((0x0b00_0000 + i).into()), t0))
            .count();
        assert_eq!(admitted, 2);
        assert_eq!(g.len(), 4);
        // A known source still has its own token.
        assert!(g.admit(ip("10.0.0.0"), t0));
        // Once the known ones have refilled they are forgotten to make room.
        let later = t0 + Duration::from_secs(10);
        assert!(g.admit(ip("203.0.113.1"), later));
        assert_eq!(g.len(), 1);
    }
}
