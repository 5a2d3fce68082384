//! The relay's I/O-free core: every datagram the relay's UDP socket receives goes through
//! [`Relay::handle_datagram`], which returns the reply to send, if any. No sockets, no clock, no
//! threads: the driver passes the receive time in.
//!
//! Today the only thing answered is address discovery: a valid [`BindingRequest`] gets a
//! [`BindingResponse`] naming the source address the relay saw. Everything else is refused and
//! counted by [`Refusal`] reason. Each source address has a token bucket ([`Config::rate`] per
//! second, [`Config::burst`] deep) so one flooding source is answered at a bounded rate and
//! cannot starve the others; the table of buckets holds at most [`Config::max_sources`] entries,
//! the least recently seen evicted first, so a flood of distinct (spoofed) sources cannot exhaust
//! memory. Entries idle long enough for their bucket to be full again are dropped, since a fresh
//! entry is the same bucket. Nothing survives a restart, and nothing needs to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use ward_shared::discovery::{BindingRequest, BindingResponse, DiscoveryError};

/// Limits of a [`Relay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Binding requests answered per second and source address, sustained.
    pub rate: u32,
    /// Requests a source may send at once after being quiet.
    pub burst: u32,
    /// Most source addresses tracked at once.
    pub max_sources: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate: 20,
            burst: 40,
            max_sources: 65_536,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Why a datagram got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Not a discovery message, or one that does not decode (length, version, family).
    Malformed,
    /// A well-formed discovery message that is not a request (a response sent to the relay).
    WrongKind,
    /// A valid request from a source over its rate.
    RateLimited,
}

impl Refusal {
    pub const ALL: [Refusal; 3] = [Refusal::Malformed, Refusal::WrongKind, Refusal::RateLimited];

    /// The metric label / log field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::WrongKind => "wrong_kind",
            Refusal::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        match self {
            Refusal::Malformed => 0,
            Refusal::WrongKind => 1,
            Refusal::RateLimited => 2,
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every datagram handled.
    pub datagrams: u64,
    /// Binding requests answered.
    pub answered: u64,
    /// Datagrams refused, by [`Refusal::index`].
    refused: [u64; 3],
    /// Sources in the table now.
    pub sources: usize,
    /// Sources evicted because the table was full.
    pub evicted: u64,
}

impl Stats {
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()]
    }
}

/// Address discovery with per-source rate limits.
///
/// Drive loop (the driver owns the socket and the clock):
///
/// ```text
/// let mut relay = Relay::new(Config::default(), Instant::now());
/// loop {
///     let (len, src) = socket.recv_from(&mut buf).await?;
///     if let Some(t) = relay.handle_datagram(src, &buf[..len], Instant::now()) {
///         socket.send_to(&t.payload, t.dst).await; // a send error drops this reply only
///     }
/// }
/// ```
///
/// `src` is the address exactly as the socket reported it (IPv4-mapped on a dual-stack socket):
/// the reply goes back to it, and the response body shows mapped addresses as IPv4.
#[derive(Debug)]
pub struct Relay {
    config: Config,
    /// Per-source state, keyed by source address.
    sources: BTreeMap<SocketAddr, Source>,
    /// The same sources by last use (a counter, not a time, so ties cannot happen).
    by_use: BTreeMap<u64, SocketAddr>,
    next_use: u64,
    stats: Stats,
    /// Refusals since the last DEBUG summary, and when that was.
    unlogged: [u64; 3],
    last_refusal_log: Instant,
    /// When the last WARN about a full source table was.
    last_full_warn: Option<Instant>,
}

/// How often refusals are summarised at DEBUG, at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(1);
/// How often a full source table is reported at WARN, at most.
const FULL_WARN_EVERY: Duration = Duration::from_secs(60);
/// Idle entries dropped per datagram, at most (keeps each call's work bounded).
const PRUNE_PER_CALL: usize = 4;
/// Token amounts are in millionths of a request, so the refill is exact in microseconds.
const UNIT: u64 = 1_000_000;

impl Relay {
    /// A relay with nothing seen yet; `now` starts the logging clock. Zero limits count as 1.
    pub fn new(config: Config, now: Instant) -> Self {
        let config = Config {
            rate: config.rate.max(1),
            burst: config.burst.max(1),
            max_sources: config.max_sources.max(1),
        };
        Relay {
            config,
            sources: BTreeMap::new(),
            by_use: BTreeMap::new(),
            next_use: 0,
            stats: Stats::default(),
            unlogged: [0; 3],
            last_refusal_log: now,
            last_full_warn: None,
        }
    }

    /// One received datagram from `src` at `now`: the reply to send, if any.
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Option<Transmit> {
        self.stats.datagrams = self.stats.datagrams.saturating_add(1);
        self.prune(now);
        let reply = match BindingRequest::decode(datagram) {
            Ok(req) => self.answer(src, req, now),
            Err(DiscoveryError::Kind(_)) => Err(Refusal::WrongKind),
            Err(
                DiscoveryError::NotDiscovery
                | DiscoveryError::Version(_)
                | DiscoveryError::Length { .. }
                | DiscoveryError::Family(_),
            ) => Err(Refusal::Malformed),
        };
        match reply {
            Ok(t) => {
                self.stats.answered = self.stats.answered.saturating_add(1);
                tracing::trace!(%src, "binding request answered");
                Some(t)
            }
            Err(reason) => {
                self.refuse(reason, now);
                None
            }
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        Stats {
            sources: self.sources.len(),
            ..self.stats
        }
    }

    fn answer(
        &mut self,
        src: SocketAddr,
        req: BindingRequest,
        now: Instant,
    ) -> Result<Transmit, Refusal> {
        if !self.take_token(src, now) {
            return Err(Refusal::RateLimited);
        }
        let resp = BindingResponse {
            txid: req.txid,
            observed: src,
        };
        Ok(Transmit {
            dst: src,
            payload: resp.encode(),
        })
    }

    /// Spends one token of `src`'s bucket, creating the entry (evicting the least recently seen
    /// when full); false when the bucket is empty.
    fn take_token(&mut self, src: SocketAddr, now: Instant) -> bool {
        let cap = u64::from(self.config.burst).saturating_mul(UNIT);
        let rate = u64::from(self.config.rate);
        let use_id = self.next_use;
        self.next_use = self.next_use.wrapping_add(1);
        if !self.sources.contains_key(&src) {
            while self.sources.len() >= self.config.max_sources {
                self.evict_oldest(now);
            }
            self.sources.insert(
                src,
                Source {
                    tokens: cap,
                    last: now,
                    use_id,
                },
            );
        }
        let Some(s) = self.sources.get_mut(&src) else {
            return false; // unreachable: inserted above
        };
        self.by_use.remove(&s.use_id);
        self.by_use.insert(use_id, src);
        s.use_id = use_id;
        let elapsed = now.saturating_duration_since(s.last);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        s.tokens = s
            .tokens
            .saturating_add(micros.saturating_mul(rate))
            .min(cap);
        if now > s.last {
            s.last = now;
        }
        if s.tokens >= UNIT {
            s.tokens -= UNIT;
            true
        } else {
            false
        }
    }

    fn evict_oldest(&mut self, now: Instant) {
        let Some((_, addr)) = self.by_use.pop_first() else {
            // The two maps hold the same sources; an empty index means an empty table.
            self.sources.clear();
            return;
        };
        self.sources.remove(&addr);
        self.stats.evicted = self.stats.evicted.saturating_add(1);
        let due = self
            .last_full_warn
            .is_none_or(|t| now.saturating_duration_since(t) >= FULL_WARN_EVERY);
        if due {
            self.last_full_warn = Some(now);
            tracing::warn!(
                max_sources = self.config.max_sources,
                evicted_total = self.stats.evicted,
                "relay source table full: evicting the least recently seen sources (a flood of \
                 distinct source addresses?)"
            );
        }
    }

    /// Drops a few of the least recently seen entries whose bucket has refilled: they are
    /// indistinguishable from a new entry.
    fn prune(&mut self, now: Instant) {
        let refill = Duration::from_micros(
            u64::from(self.config.burst).saturating_mul(UNIT) / u64::from(self.config.rate),
        );
        for _ in 0..PRUNE_PER_CALL {
            let Some((&use_id, &addr)) = self.by_use.first_key_value() else {
                return;
            };
            let idle = self
                .sources
                .get(&addr)
                .is_none_or(|s| now.saturating_duration_since(s.last) >= refill);
            if !idle {
                return;
            }
            self.by_use.remove(&use_id);
            self.sources.remove(&addr);
        }
    }

    fn refuse(&mut self, reason: Refusal, now: Instant) {
        let i = reason.index();
        self.stats.refused[i] = self.stats.refused[i].saturating_add(1);
        self.unlogged[i] = self.unlogged[i].saturating_add(1);
        if now.saturating_duration_since(self.last_refusal_log) >= REFUSAL_LOG_EVERY {
            self.last_refusal_log = now;
            let [malformed, wrong_kind, rate_limited] = std::mem::take(&mut self.unlogged);
            tracing::debug!(
                malformed,
                wrong_kind,
                rate_limited,
                sources = self.sources.len(),
                "datagrams refused since the last report"
            );
        }
    }
}

#[derive(Debug)]
struct Source {
    /// Tokens in millionths of a request, at most `burst * UNIT`.
    tokens: u64,
    /// When `tokens` was last brought up to date.
    last: Instant,
    /// This source's key in `Relay::by_use`.
    use_id: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ward_shared::discovery::{MAGIC, REQUEST_LEN};

    fn req(txid: u8) -> [u8; REQUEST_LEN] {
        BindingRequest { txid: [txid; 12] }.encode()
    }

    fn answer(relay: &mut Relay, src: &str, now: Instant) -> Option<BindingResponse> {
        let src: SocketAddr = src.parse().unwrap();
        let t = relay.handle_datagram(src, &req(5), now)?;
        assert_eq!(t.dst, src, "the reply goes back to the source as received");
        Some(BindingResponse::decode(&t.payload).unwrap())
    }

    #[test]
    fn answers_with_the_observed_address() {
        let t0 = Instant::now();
        let mut r = Relay::new(Config::default(), t0);
        let cases = [
            ("203.0.113.7:41641", "203.0.113.7:41641"),
            ("[2001:db8::1]:51820", "[2001:db8::1]:51820"),
            // A dual-stack socket's view of an IPv4 peer is reported as IPv4.
            ("[::ffff:198.51.100.2]:1000", "198.51.100.2:1000"),
        ];
        for (src, want) in cases {
            let resp = answer(&mut r, src, t0).unwrap();
            assert_eq!(resp.observed, want.parse::<SocketAddr>().unwrap());
            assert_eq!(resp.txid, [5; 12]);
        }
        let s = r.stats();
        assert_eq!((s.datagrams, s.answered, s.sources), (3, 3, 3));
    }

    #[test]
    fn refuses_every_malformed_input() {
        let t0 = Instant::now();
        let mut r = Relay::new(Config::default(), t0);
        let src: SocketAddr = "192.0.2.1:9".parse().unwrap();
        let good = req(1);
        let mut bad: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        bad.push([&good[..], &[0]].concat()); // one byte too long
        bad.push(vec![0xff; 2000]); // oversized
        bad.push(vec![1, 0, 0, 0]); // a WireGuard handshake initiation's start
        let mut b = good;
        b[0] = 0;
        bad.push(b.to_vec()); // wrong magic
        let mut b = good;
        b[4] = 2;
        bad.push(b.to_vec()); // wrong version
        for d in &bad {
            assert!(r.handle_datagram(src, d, t0).is_none(), "{d:?}");
        }
        // A response (or an unknown kind) sent to the relay is the wrong kind.
        let resp = BindingResponse {
            txid: [0; 12],
            observed: src,
        }
        .encode();
        assert!(r.handle_datagram(src, &resp, t0).is_none());
        let mut b = good;
        b[5] = 9;
        assert!(r.handle_datagram(src, &b, t0).is_none());

        let s = r.stats();
        assert_eq!(s.refused(Refusal::Malformed), bad.len() as u64);
        assert_eq!(s.refused(Refusal::WrongKind), 2);
        assert_eq!(s.answered, 0);
        assert_eq!(s.sources, 0, "refused input creates no state");
        assert!(MAGIC.len() == 4);
    }

    #[test]
    fn rate_limit_and_recovery_over_virtual_time() {
        let t0 = Instant::now();
        let cfg = Config {
            rate: 20,
            burst: 40,
            max_sources: 16,
        };
        let mut r = Relay::new(cfg, t0);
        let flood = "192.0.2.1:1000";
        let answered = (0..100)
            .filter(|_| answer(&mut r, flood, t0).is_some())
            .count();
        assert_eq!(answered, 40, "the burst, then nothing");
        assert_eq!(r.stats().refused(Refusal::RateLimited), 60);
        // Another source is not starved.
        assert!(answer(&mut r, "192.0.2.2:1000", t0).is_some());
        // 49 ms later not even one token has come back; at 50 ms one has.
        assert!(answer(&mut r, flood, t0 + Duration::from_millis(49)).is_none());
        assert!(answer(&mut r, flood, t0 + Duration::from_millis(50)).is_some());
        assert!(answer(&mut r, flood, t0 + Duration::from_millis(50)).is_none());
        // Sustained: over one second at 100 requests/s, about `rate` are answered.
        let start = t0 + Duration::from_millis(50);
        let answered = (1..=100)
            .filter(|i| answer(&mut r, flood, start + Duration::from_millis(10 * i)).is_some())
            .count();
        assert_eq!(answered, 20);
        // After a long quiet, the whole burst again (the entry may have been pruned: same thing).
        let later = start + Duration::from_secs(10);
        let answered = (0..100)
            .filter(|_| answer(&mut r, flood, later).is_some())
            .count();
        assert_eq!(answered, 40);
        // Time going backwards (a caller's mistake) neither panics nor refills.
        assert!(answer(&mut r, flood, t0).is_none());
    }

    #[test]
    fn table_stays_bounded_under_a_flood_of_sources() {
        let t0 = Instant::now();
        let cfg = Config {
            rate: 20,
            burst: 2,
            max_sources: 1000,
        };
        let mut r = Relay::new(cfg, t0);
        // A steady flooder keeps being rate limited while spoofed sources churn the table.
        let flood: SocketAddr = "198.51.100.1:7".parse().unwrap();
        for i in 0..50_000u32 {
            let now = t0 + Duration::from_nanos(u64::from(i));
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            let src = SocketAddr::new(ip.into(), 1);
            assert!(r.handle_datagram(src, &req(0), now).is_some());
            let _ = r.handle_datagram(flood, &req(0), now);
            assert!(r.stats().sources <= 1000);
        }
        let s = r.stats();
        assert_eq!(s.sources, 1000);
        assert!(s.evicted >= 49_000, "{s:?}");
        // The flooder, seen most recently, kept its (empty) bucket: it got its burst only.
        assert_eq!(s.answered, 50_000 + 2);
        // Idle entries are pruned as traffic continues after their buckets refilled.
        let later = t0 + Duration::from_secs(60);
        for i in 0..300 {
            let src = SocketAddr::new(std::net::Ipv4Addr::new(192, 0, 2, 1).into(), i);
            let _ = r.handle_datagram(src, &req(0), later);
        }
        assert!(r.stats().sources < 1000, "{:?}", r.stats());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let t0 = Instant::now();
        let mut r = Relay::new(
            Config {
                rate: 0,
                burst: 0,
                max_sources: 0,
            },
            t0,
        );
        let src: SocketAddr = "[2001:db8::2]:3".parse().unwrap();
        let mut x: u32 = 0x1234_5678;
        for n in 0..5000usize {
            let mut d = req(3).to_vec();
            d.resize(n % 64, 0);
            for b in d.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if x.is_multiple_of(4) {
                    *b = x as u8;
                }
            }
            let _ = r.handle_datagram(src, &d, t0 + Duration::from_millis(n as u64));
        }
        assert!(r.stats().sources <= 1);
    }
}
