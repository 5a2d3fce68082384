//! The I/O-free data-plane core: peer table, cryptokey routing, WireGuard sessions.
//!
//! # Drive loop
//!
//! ```text
//! core = Core::new(cfg, seed)
//! core.set_peers(peers, now, &mut outbox)            -> send outbox (proactive handshakes)
//! loop {
//!     TUN packets:   let mut b = core.batch();
//!                    for p in packets { b.handle_tun_packet(p, now, &mut outbox) }
//!                    drop(b); send outbox; outbox.clear()
//!     UDP datagrams: let mut b = core.batch();
//!                    for (from, d) in datagrams {
//!                        if let Some(n) = b.handle_datagram(from, d, now, &mut buf, &mut outbox) {
//!                            write buf[..n] to the TUN
//!                        }
//!                    }
//!                    drop(b); send outbox; outbox.clear()
//!     every TIMER_INTERVAL: core.handle_timers(now, &mut outbox); send outbox
//! }
//! ```
//!
//! `Core` is `Sync`: the TUN path and the UDP path may run on different threads at once. The peer
//! table is behind an `RwLock` (writers: [`Core::set_peers`] only), each peer's `Tunn` behind a
//! `Mutex`. A [`Batch`] holds the table's read lock for its lifetime, so once `set_peers` returns,
//! no packet under a removed key is accepted any more.
//!
//! Time: every method takes `now`; the core never reads the clock for its own decisions
//! (endpoint probing). boringtun's `Tunn` reads the system clock inside `update_timers`,
//! `time_since_last_handshake` and its rate limiter; that is accepted (tests run in real time,
//! which is fast because the core's own probing runs on the passed-in `now`).
//!
//! Randomness: receiver indices come from a seeded RNG; boringtun draws its ephemeral keys and
//! cookie secrets from the OS.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{DataPlaneCounters, PeerConfig, PeerStatus};

/// How often the driver should call [`Core::handle_timers`].
pub const TIMER_INTERVAL: Duration = Duration::from_millis(250);

/// Most candidate endpoints kept per peer (bounds the handshake fan-out).
pub const MAX_CANDIDATES: usize = 8;

/// Handshake probe interval while a peer has no session and we recently wanted it.
const PROBE_INTERVAL_FAST: Duration = Duration::from_secs(5);
/// Handshake probe interval for a peer that has been unreachable for a while.
const PROBE_INTERVAL_SLOW: Duration = Duration::from_secs(25);
/// How long after (re)configuration or outgoing traffic a session-less peer is probed fast.
const FAST_PROBE_PERIOD: Duration = Duration::from_secs(120);
/// If nothing authenticated came from the endpoint for this long, handshake initiations go to
/// the endpoint and every candidate (the path may have died).
const PATH_STALE_AFTER: Duration = Duration::from_secs(15);
/// Handshake initiations per second accepted before cookies are demanded (all peers together).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard message sizes and overhead.
const HANDSHAKE_INIT_LEN: usize = 148;
const DATA_OVERHEAD: usize = 32;
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;

/// Static configuration of a [`Core`].
#[derive(Clone)]
pub struct CoreConfig {
    pub private_key: [u8; 32],
    /// Persistent keepalive interval in seconds (`None`: off).
    pub persistent_keepalive: Option<u16>,
}

/// The data-plane protocol core. See the module documentation for the loop that drives it.
pub struct Core {
    private: StaticSecret,
    public: PublicKey,
    persistent_keepalive: Option<u16>,
    table: RwLock<Table>,
    index_rng: Mutex<StdRng>,
    /// Verifies mac1 and rate-limits handshake initiations before the (expensive) anonymous
    /// parse that finds the initiating peer.
    handshake_limiter: RateLimiter,
    counters: Counters,
}

impl Core {
    /// A core with no peers. `seed` seeds receiver-index allocation.
    pub fn new(cfg: CoreConfig, seed: u64) -> Core {
        let private = StaticSecret::from(cfg.private_key);
        let public = PublicKey::from(&private);
        Core {
            handshake_limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
            private,
            public,
            persistent_keepalive: cfg.persistent_keepalive,
            table: RwLock::new(Table::default()),
            index_rng: Mutex::new(StdRng::seed_from_u64(seed)),
            counters: Counters::default(),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Replaces the peer set.
    ///
    /// A peer whose key and addresses are unchanged keeps its `Tunn` (no re-handshake); only its
    /// metadata and candidate endpoints are updated. A removed peer's sessions are dropped before
    /// this returns. A new or changed peer gets a fresh `Tunn` and a handshake initiation to
    /// every candidate endpoint, written to `out`.
    pub fn set_peers(&self, peers: Vec<PeerConfig>, now: Instant, out: &mut Outbox) {
        let mut table = write(&self.table);
        let mut next = Table::default();
        let mut used_indices: HashSet<u32> = table.by_index.keys().copied().collect();
        for cfg in peers {
            if cfg.public_key == self.public.to_bytes() {
                tracing::debug!(device_id = cfg.device_id, "peer with our own key ignored");
                continue;
            }
            if next.peers.contains_key(&cfg.public_key) {
                tracing::debug!(device_id = cfg.device_id, "duplicate peer key ignored");
                continue;
            }
            let candidates = sanitize_candidates(&cfg.endpoints);
            let reuse = table
                .peers
                .get(&cfg.public_key)
                .filter(|old| old.ipv4 == cfg.ipv4 && old.ipv6 == cfg.ipv6)
                .cloned();
            let peer = match reuse {
                Some(peer) => {
                    let mut s = lock(&peer.session);
                    s.device_id = cfg.device_id;
                    s.hostname = cfg.hostname;
                    if s.candidates != candidates {
                        s.candidates = candidates;
                        if !s.has_session() {
                            // New places to look: probe them now.
                            s.next_probe = now;
                            s.fast_probe_until = now + FAST_PROBE_PERIOD;
                        }
                    }
                    drop(s);
                    peer
                }
                None => {
                    let index = self.alloc_index(&used_indices, &next);
                    used_indices.insert(index);
                    let tunn = Tunn::new(
                        self.private.clone(),
                        PublicKey::from(cfg.public_key),
                        None,
                        self.persistent_keepalive,
                        index,
                        None,
                    );
                    let peer = Arc::new(Peer {
                        public_key: cfg.public_key,
                        ipv4: cfg.ipv4,
                        ipv6: cfg.ipv6,
                        index,
                        session: Mutex::new(Session {
                            tunn,
                            device_id: cfg.device_id,
                            hostname: cfg.hostname,
                            endpoint: None,
                            candidates,
                            last_rx: None,
                            next_probe: now,
                            fast_probe_until: now + FAST_PROBE_PERIOD,
                        }),
                        dropped_bad_source: AtomicU64::new(0),
                    });
                    let mut s = lock(&peer.session);
                    let sent = self.probe(&mut s, now, out);
                    drop(s);
                    self.counters
                        .handshake_initiations_sent
                        .fetch_add(sent, Ordering::Relaxed);
                    peer
                }
            };
            next.insert(peer);
        }
        let removed = table
            .peers
            .keys()
            .filter(|k| !next.peers.contains_key(*k))
            .count();
        if removed > 0 {
            tracing::debug!(removed, "peers removed, their sessions dropped");
        }
        *table = next;
    }

    /// Starts a batch: holds the peer table's read lock until dropped. Keep batches short
    /// (one syscall's worth of packets): `set_peers` waits for them.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            core: self,
            table: read(&self.table),
            local: LocalCounters::default(),
        }
    }

    /// One packet read from the TUN. See [`Batch::handle_tun_packet`].
    pub fn handle_tun_packet(&self, packet: &[u8], now: Instant, out: &mut Outbox) {
        self.batch().handle_tun_packet(packet, now, out)
    }

    /// One datagram received from the network. See [`Batch::handle_datagram`].
    #[must_use]
    pub fn handle_datagram(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        tun_out: &mut [u8],
        out: &mut Outbox,
    ) -> Option<usize> {
        self.batch()
            .handle_datagram(from, datagram, now, tun_out, out)
    }

    /// Runs WireGuard timers (keepalives, rekeying, handshake retransmission) and the
    /// candidate probing for every peer. Call every [`TIMER_INTERVAL`].
    pub fn handle_timers(&self, now: Instant, out: &mut Outbox) {
        self.handshake_limiter.reset_count();
        let table = read(&self.table);
        let mut local = LocalCounters::default();
        for peer in table.peers.values() {
            let mut s = lock(&peer.session);
            let had_session = s.has_session();
            let start = out.reserve(HANDSHAKE_INIT_LEN + DATA_OVERHEAD);
            match s.tunn.update_timers(start) {
                TunnResult::WriteToNetwork(p) => {
                    let len = p.len();
                    let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
                    // Without a session, the core's own probing decides when initiations go
                    // out (on `now`, to every candidate); boringtun's retransmission is dropped.
                    if !is_init || had_session {
                        local.handshake_initiations_sent += route(&mut s, out, len, is_init, now);
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
                TunnResult::Err(e) => tracing::trace!(?e, "update_timers"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
            if !s.has_session() && now >= s.next_probe {
                local.handshake_initiations_sent += self.probe(&mut s, now, out);
            }
        }
        drop(table);
        local.flush(&self.counters);
    }

    /// Per-peer status, ordered by public key.
    pub fn status(&self) -> Vec<PeerStatus> {
        let table = read(&self.table);
        table
            .peers
            .values()
            .map(|peer| {
                let s = lock(&peer.session);
                let (last_handshake, tx, rx, _, _) = s.tunn.stats();
                PeerStatus {
                    device_id: s.device_id,
                    endpoint: s.endpoint,
                    last_handshake,
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                    dropped_bad_source: peer.dropped_bad_source.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn counters(&self) -> DataPlaneCounters {
        self.counters.snapshot()
    }

    /// Sends a fresh handshake initiation to the endpoint and candidates; schedules the next.
    /// Returns the number of datagrams written.
    fn probe(&self, s: &mut Session, now: Instant, out: &mut Outbox) -> u64 {
        let interval = if now < s.fast_probe_until {
            PROBE_INTERVAL_FAST
        } else {
            PROBE_INTERVAL_SLOW
        };
        s.next_probe = now + interval;
        let buf = out.reserve(HANDSHAKE_INIT_LEN);
        match s.tunn.format_handshake_initiation(buf, true) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                route(s, out, len, true, now)
            }
            _ => 0,
        }
    }

    fn alloc_index(&self, used: &HashSet<u32>, next: &Table) -> u32 {
        let mut rng = lock(&self.index_rng);
        loop {
            // boringtun puts the index in the upper 24 bits of the receiver index.
            let index = rng.gen_range(1..(1u32 << 24));
            if !used.contains(&index) && !next.by_index.contains_key(&index) {
                return index;
            }
        }
    }
}

/// A group of packets processed under one read lock of the peer table; counters are merged
/// into the core's when it is dropped.
pub struct Batch<'a> {
    core: &'a Core,
    table: RwLockReadGuard<'a, Table>,
    local: LocalCounters,
}

impl Batch<'_> {
    /// One IP packet read from the TUN: route it by destination to the peer that owns the
    /// address, encrypt it, and write the datagram (or, with no session yet, a handshake
    /// initiation to the candidates) to `out`. Packets with no owner are dropped and counted.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant, out: &mut Outbox) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.local.dropped_bad_tun_packet += 1;
            return;
        };
        let Some(peer) = self.table.route(dst) else {
            tracing::trace!(%dst, "no peer owns destination");
            self.local.dropped_no_route += 1;
            return;
        };
        let mut s = lock(&peer.session);
        let buf = out.reserve(packet.len().max(HANDSHAKE_INIT_LEN) + DATA_OVERHEAD);
        match s.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                if p.first() == Some(&MSG_HANDSHAKE_INIT) {
                    // No session: the packet was queued and a handshake started.
                    s.want_peer(now);
                    s.next_probe = now + PROBE_INTERVAL_FAST;
                    self.local.handshake_initiations_sent += route(&mut s, out, len, true, now);
                } else if route(&mut s, out, len, false, now) > 0 {
                    self.local.tx_packets += 1;
                    self.local.tx_bytes += packet.len() as u64;
                } else {
                    self.local.dropped_no_endpoint += 1;
                }
            }
            TunnResult::Done => {
                // Queued behind a handshake in progress.
                s.want_peer(now);
                if now >= s.next_probe {
                    self.local.handshake_initiations_sent += self.core.probe(&mut s, now, out);
                }
            }
            TunnResult::Err(e) => tracing::trace!(?e, "encapsulate failed"),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// One UDP datagram from `from`. Returns `Some(n)` when `tun_out[..n]` holds a decrypted IP
    /// packet whose inner source is the sending peer's own address, ready for the TUN. Replies
    /// (handshake responses, cookies, flushed queued packets) go to `out`. Anything that is not
    /// valid WireGuard from a configured peer is dropped, counted, and never answered.
    ///
    /// `tun_out` must be at least as long as `datagram`, else the datagram is dropped.
    #[must_use]
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        tun_out: &mut [u8],
        out: &mut Outbox,
    ) -> Option<usize> {
        let from = canonical(from);
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return self.garbage(from, "unparseable");
        };
        if tun_out.len() < datagram.len() {
            return self.garbage(from, "datagram larger than output buffer");
        }
        let peer = match &packet {
            Packet::HandshakeInit(init) => {
                let mut cookie = [0u8; 64];
                match self.core.handshake_limiter.verify_packet(
                    Some(from.ip()),
                    datagram,
                    &mut cookie,
                ) {
                    Ok(_) => {}
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        // Under load: answer a mac1-valid initiation with a cookie only.
                        out.push(from, reply);
                        return None;
                    }
                    Err(_) => return self.garbage(from, "handshake initiation with bad mac1"),
                }
                let Ok(half) = parse_handshake_anon(&self.core.private, &self.core.public, init)
                else {
                    return self.garbage(from, "handshake initiation does not decrypt");
                };
                self.table.peers.get(&half.peer_static_public)
            }
            Packet::HandshakeResponse(p) => self.table.by_index.get(&(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(p) => self.table.by_index.get(&(p.receiver_idx >> 8)),
            Packet::PacketData(p) => self.table.by_index.get(&(p.receiver_idx >> 8)),
        };
        let Some(peer) = peer else {
            return self.garbage(from, "unknown peer");
        };
        let authenticated_if_ok = !matches!(packet, Packet::PacketCookieReply(_));
        let peer = Arc::clone(peer);
        let mut s = lock(&peer.session);
        let (reply_len, tunnel) = match s.tunn.decapsulate(Some(from.ip()), datagram, tun_out) {
            TunnResult::WriteToNetwork(p) => {
                let cookie = p.first() == Some(&MSG_COOKIE_REPLY);
                if !cookie {
                    s.authenticated_from(from, now);
                }
                out.push(from, p);
                (true, None)
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                s.authenticated_from(from, now);
                (false, (src == peer.ipv4).then_some(p.len()))
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                s.authenticated_from(from, now);
                (false, (src == peer.ipv6).then_some(p.len()))
            }
            TunnResult::Done => {
                // A keepalive (authenticated) or a cookie reply (not).
                if authenticated_if_ok {
                    s.authenticated_from(from, now);
                }
                return None;
            }
            TunnResult::Err(e) => {
                tracing::trace!(%from, ?e, "datagram refused");
                self.local.dropped_garbage += 1;
                return None;
            }
        };
        if reply_len {
            // A handshake completed or was answered: flush packets queued behind it.
            self.flush_queue(&mut s, now, out);
            return None;
        }
        match tunnel {
            Some(n) => {
                self.local.rx_packets += 1;
                self.local.rx_bytes += n as u64;
                Some(n)
            }
            None => {
                tracing::trace!(%from, "inner source is not the peer's address");
                peer.dropped_bad_source.fetch_add(1, Ordering::Relaxed);
                self.local.dropped_bad_source += 1;
                None
            }
        }
    }

    fn flush_queue(&mut self, s: &mut Session, now: Instant, out: &mut Outbox) {
        loop {
            // Queued packets came from the TUN, so they are at most 64 KiB.
            let buf = out.reserve(u16::MAX as usize + DATA_OVERHEAD);
            match s.tunn.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(p) => {
                    let len = p.len();
                    let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
                    if is_init {
                        self.local.handshake_initiations_sent += route(s, out, len, true, now);
                    } else if route(s, out, len, false, now) > 0 {
                        self.local.tx_packets += 1;
                        self.local.tx_bytes += len.saturating_sub(DATA_OVERHEAD) as u64;
                    }
                }
                _ => return,
            }
        }
    }

    fn garbage(&mut self, from: SocketAddr, why: &'static str) -> Option<usize> {
        tracing::trace!(%from, why, "datagram dropped");
        self.local.dropped_garbage += 1;
        None
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        self.local.flush(&self.core.counters);
    }
}

/// Datagrams for the network, written by the core into one contiguous buffer (so runs of
/// equal-size datagrams to one destination can go out as a single UDP GSO send).
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    used: usize,
    items: Vec<Transmit>,
}

/// One datagram in an [`Outbox`]: `bytes()[start..start + len]` goes to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
    pub start: usize,
    pub len: usize,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.items.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The datagrams, in order.
    pub fn transmits(&self) -> &[Transmit] {
        &self.items
    }

    /// The buffer the [`Transmit`]s index into.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.items
            .iter()
            .map(|t| (t.dst, &self.buf[t.start..t.start + t.len]))
    }

    /// Total payload bytes queued.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Scratch space of `n` bytes at the end of the buffer, to be committed with [`Self::commit`].
    fn reserve(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.used..end]
    }

    /// Commits the first `len` reserved bytes as a datagram to `dst`.
    fn commit(&mut self, dst: SocketAddr, len: usize) {
        self.items.push(Transmit {
            dst,
            start: self.used,
            len,
        });
        self.used += len;
    }

    /// Repeats the last committed datagram to another destination.
    fn repeat_last(&mut self, dst: SocketAddr) {
        let Some(last) = self.items.last().copied() else {
            return;
        };
        self.reserve(last.len);
        self.buf
            .copy_within(last.start..last.start + last.len, self.used);
        self.commit(dst, last.len);
    }

    pub(crate) fn push(&mut self, dst: SocketAddr, data: &[u8]) {
        self.reserve(data.len()).copy_from_slice(data);
        self.commit(dst, data.len());
    }
}

/// Commits the datagram of `len` bytes at the reserved position of `out` to the peer's
/// endpoint; handshake initiations also go to every candidate when the path is unknown or
/// stale. Returns how many datagrams were written.
fn route(s: &mut Session, out: &mut Outbox, len: usize, is_init: bool, now: Instant) -> u64 {
    let fresh = s
        .last_rx
        .is_some_and(|t| now.saturating_duration_since(t) < PATH_STALE_AFTER);
    if !is_init || (fresh && s.endpoint.is_some()) {
        let Some(dst) = s.endpoint.or_else(|| s.candidates.first().copied()) else {
            return 0;
        };
        out.commit(dst, len);
        return 1;
    }
    let mut targets = s.endpoint.into_iter().chain(
        s.candidates
            .iter()
            .copied()
            .filter(|c| Some(*c) != s.endpoint),
    );
    let Some(first) = targets.next() else {
        return 0;
    };
    out.commit(first, len);
    let mut n = 1;
    for dst in targets {
        out.repeat_last(dst);
        n += 1;
    }
    n
}

/// A configured peer. Its key and addresses are fixed; changing them makes a new `Peer`.
struct Peer {
    public_key: [u8; 32],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    /// 24-bit receiver index given to its `Tunn`.
    index: u32,
    session: Mutex<Session>,
    dropped_bad_source: AtomicU64,
}

struct Session {
    tunn: Tunn,
    device_id: u64,
    hostname: String,
    /// Where the last authenticated packet came from (WireGuard roaming).
    endpoint: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    last_rx: Option<Instant>,
    next_probe: Instant,
    fast_probe_until: Instant,
}

impl Session {
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }

    fn authenticated_from(&mut self, from: SocketAddr, now: Instant) {
        if self.endpoint != Some(from) {
            tracing::debug!(host = %self.hostname, endpoint = %from, "peer endpoint changed");
            self.endpoint = Some(from);
        }
        self.last_rx = Some(now);
    }

    /// Outgoing traffic wants this peer: probe it at the fast rate for a while.
    fn want_peer(&mut self, now: Instant) {
        let until = now + FAST_PROBE_PERIOD;
        if self.fast_probe_until < until {
            self.fast_probe_until = until;
        }
        let fast = now + PROBE_INTERVAL_FAST;
        if self.next_probe > fast {
            self.next_probe = fast;
        }
    }
}

#[derive(Default)]
struct Table {
    peers: BTreeMap<[u8; 32], Arc<Peer>>,
    by_v4: HashMap<Ipv4Addr, Arc<Peer>>,
    by_v6: HashMap<Ipv6Addr, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

impl Table {
    /// Later peers win an address claimed twice (e.g. old and new key during a rotation).
    fn insert(&mut self, peer: Arc<Peer>) {
        self.by_v4.insert(peer.ipv4, peer.clone());
        self.by_v6.insert(peer.ipv6, peer.clone());
        self.by_index.insert(peer.index, peer.clone());
        self.peers.insert(peer.public_key, peer);
    }

    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        match dst {
            IpAddr::V4(a) => self.by_v4.get(&a),
            IpAddr::V6(a) => self.by_v6.get(&a),
        }
    }
}

/// Counters shared by all threads; each thread accumulates into [`LocalCounters`] per batch.
#[derive(Default)]
struct Counters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    dropped_no_route: AtomicU64,
    dropped_no_endpoint: AtomicU64,
    dropped_bad_source: AtomicU64,
    dropped_garbage: AtomicU64,
    dropped_bad_tun_packet: AtomicU64,
    handshake_initiations_sent: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DataPlaneCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DataPlaneCounters {
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            dropped_no_route: g(&self.dropped_no_route),
            dropped_no_endpoint: g(&self.dropped_no_endpoint),
            dropped_bad_source: g(&self.dropped_bad_source),
            dropped_garbage: g(&self.dropped_garbage),
            dropped_bad_tun_packet: g(&self.dropped_bad_tun_packet),
            handshake_initiations_sent: g(&self.handshake_initiations_sent),
        }
    }
}

#[derive(Default)]
struct LocalCounters {
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    dropped_no_route: u64,
    dropped_no_endpoint: u64,
    dropped_bad_source: u64,
    dropped_garbage: u64,
    dropped_bad_tun_packet: u64,
    handshake_initiations_sent: u64,
}

impl LocalCounters {
    fn flush(&mut self, c: &Counters) {
        let add = |a: &AtomicU64, v: &mut u64| {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        add(&c.tx_packets, &mut self.tx_packets);
        add(&c.tx_bytes, &mut self.tx_bytes);
        add(&c.rx_packets, &mut self.rx_packets);
        add(&c.rx_bytes, &mut self.rx_bytes);
        add(&c.dropped_no_route, &mut self.dropped_no_route);
        add(&c.dropped_no_endpoint, &mut self.dropped_no_endpoint);
        add(&c.dropped_bad_source, &mut self.dropped_bad_source);
        add(&c.dropped_garbage, &mut self.dropped_garbage);
        add(&c.dropped_bad_tun_packet, &mut self.dropped_bad_tun_packet);
        add(
            &c.handshake_initiations_sent,
            &mut self.handshake_initiations_sent,
        );
    }
}

/// IPv4-mapped IPv6 source addresses (from a dual-stack socket) become plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn sanitize_candidates(endpoints: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::with_capacity(endpoints.len().min(MAX_CANDIDATES));
    for e in endpoints.iter().map(|e| canonical(*e)) {
        if e.port() == 0 || e.ip().is_unspecified() || out.contains(&e) {
            continue;
        }
        if out.len() == MAX_CANDIDATES {
            break;
        }
        out.push(e);
    }
    out
}

// A poisoned lock only means another thread panicked mid-update; the data it guards (a `Tunn`,
// a peer table) stays structurally valid, so keep going rather than take the data plane down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
