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
//! table is behind an `RwLock` (writers: [`Core::set_peers`] and [`Core::rotate_key`]), each
//! peer's session state behind a `Mutex`. A [`Batch`] holds the table's read lock for its
//! lifetime, so once `set_peers` returns, no packet under a removed key is accepted any more.
//! Lock order: table, then the local key ring, then one peer session at a time.
//!
//! # Key rotation without loss
//!
//! A rotating device appears to its peers as two peer entries with the same addresses (old key,
//! new key) until the coordinator revokes the old one. Outbound traffic to an address goes to
//! the entry whose session is usable and was established most recently; an entry without a
//! session is used only when no entry has one (see [`Table::route`]). So a new, not yet used key
//! costs nothing: it is probed in the background and takes over once its handshake completes.
//!
//! On the rotating device, [`Core::rotate_key`] gives every peer a new `Tunn` under the new key
//! (the *current* link, handshaking at once) and keeps the old one as the *previous* link: it
//! still decrypts what the peer sends under the old session, answers the peer's handshakes to
//! the old key, and carries outbound traffic until the current link has a session. Then it stops
//! sending and is dropped [`PREVIOUS_GRACE`] later (or when `set_peers` removes the peer).
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
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ward_shared::addr::AddressPools;
use ward_shared::filter::{DenyReason, Filter, FilterCounters, FilterRule, Verdict};

use super::pmtu::PathMtus;
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
/// How long a previous link (a peer's session under this device's old key) keeps decrypting
/// after the new key's session with that peer is up, for packets still in flight.
pub const PREVIOUS_GRACE: Duration = Duration::from_secs(10);
/// Handshake initiations per second accepted before cookies are demanded (all peers together).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// WireGuard message sizes and overhead.
const HANDSHAKE_INIT_LEN: usize = 148;
const DATA_OVERHEAD: usize = 32;
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;

/// Most connections the inbound filter tracks.
pub const MAX_FLOWS: usize = ward_shared::filter::DEFAULT_MAX_FLOWS;
/// Most ICMP "administratively prohibited" errors written back to the TUN per second.
const UNREACHABLE_PER_SEC: u32 = 100;
/// The IPv4 minimum reassembly size (RFC 1812: an ICMP error quotes as much as fits in it) and
/// the IPv6 minimum MTU (RFC 4443).
const ICMP4_ERROR_MAX: usize = 576;
const ICMP6_ERROR_MAX: usize = 1280;

/// Static configuration of a [`Core`].
#[derive(Clone)]
pub struct CoreConfig {
    pub private_key: [u8; 32],
    /// Persistent keepalive interval in seconds (`None`: off).
    pub persistent_keepalive: Option<u16>,
    /// The overlay's IPv6 /48 (with 100.64.0.0/10, where a packet without a peer gets an ICMP
    /// "administratively prohibited" back instead of silence).
    pub v6_prefix: Option<Ipv6Addr>,
}

/// The data-plane protocol core. See the module documentation for the loop that drives it.
pub struct Core {
    /// This device's static key (and older ones previous links still use); replaced by
    /// [`Core::rotate_key`].
    keys: RwLock<Arc<KeyRing>>,
    persistent_keepalive: Option<u16>,
    table: RwLock<Table>,
    index_rng: Mutex<StdRng>,
    /// The inbound filter. Locked per packet, never across encryption, so the TX and RX paths
    /// still run in parallel.
    filter: Mutex<Filter>,
    /// Coordinator time minus local wall-clock time, ms (kept here for the driver).
    clock_offset_ms: AtomicI64,
    v6_prefix: Option<Ipv6Addr>,
    unreachable_limit: Mutex<WindowLimit>,
    counters: Counters,
    /// Path MTU per destination (see `pmtu`), learned by the driver.
    pmtu: Arc<PathMtus>,
}

impl Core {
    /// A core with no peers. `seed` seeds receiver-index allocation.
    pub fn new(cfg: CoreConfig, seed: u64) -> Core {
        Core {
            keys: RwLock::new(Arc::new(KeyRing {
                current: Arc::new(Keys::new(cfg.private_key)),
                older: Vec::new(),
            })),
            persistent_keepalive: cfg.persistent_keepalive,
            table: RwLock::new(Table::default()),
            index_rng: Mutex::new(StdRng::seed_from_u64(seed)),
            filter: Mutex::new(Filter::with_seed(MAX_FLOWS, seed.rotate_left(17) ^ 0x5eed)),
            clock_offset_ms: AtomicI64::new(0),
            v6_prefix: cfg.v6_prefix,
            unreachable_limit: Mutex::new(WindowLimit::default()),
            counters: Counters::default(),
            pmtu: Arc::default(),
        }
    }

    /// The path MTUs the core checks TUN packets against; the driver keeps them current.
    pub fn path_mtus(&self) -> &Arc<PathMtus> {
        &self.pmtu
    }

    /// Replaces the inbound filter rules. With none, no peer may open anything here (replies
    /// to this device's own flows still pass). Flows that no rule allows any more are cut.
    pub fn set_filter(&self, rules: Vec<FilterRule>) {
        lock(&self.filter).set_rules(rules);
    }

    /// Records coordinator time minus local wall-clock time; see [`Core::clock_offset_ms`].
    pub fn set_clock_offset_ms(&self, offset: i64) {
        self.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    /// What the driver adds to its wall clock (ms since the epoch) to get the coordinator time
    /// it passes to [`Batch::handle_datagram`].
    pub fn clock_offset_ms(&self) -> i64 {
        self.clock_offset_ms.load(Ordering::Relaxed)
    }

    /// New inbound flows the filter refused since the last call, by source (for the
    /// coordinator's scan detection).
    pub fn take_denied_flows(&self) -> Vec<ward_shared::wire::DeniedFlow> {
        lock(&self.filter).take_denied()
    }

    pub fn filter_counters(&self) -> FilterCounters {
        lock(&self.filter).counters()
    }

    /// Drops idle flows from the filter's table; call now and then (a full table also sweeps
    /// itself).
    pub fn expire_flows(&self, now: Instant) {
        lock(&self.filter).expire(now);
    }

    pub fn public_key(&self) -> [u8; 32] {
        read(&self.keys).current.public.to_bytes()
    }

    /// Switches this device to a new static key without interrupting traffic. Peers must
    /// already know the new key (the coordinator pushes it before the device switches).
    ///
    /// Every peer gets a new `Tunn` under the new key and a handshake initiation at once
    /// (written to `out`). Its old `Tunn`, if it has a session, becomes the previous link: it
    /// keeps carrying outbound packets until the new handshake completes, decrypts what the peer
    /// still sends under the old session, and is dropped [`PREVIOUS_GRACE`] after the new
    /// session is up. A rotation while an earlier one is still pending keeps whichever old link
    /// carries traffic.
    pub fn rotate_key(&self, private_key: [u8; 32], now: Instant, out: &mut Outbox) {
        let mut table = write(&self.table);
        let mut ring = write(&self.keys);
        let keys = Arc::new(Keys::new(private_key));
        if keys.public == ring.current.public {
            return;
        }
        let mut used: HashSet<u32> = table.by_index.keys().copied().collect();
        let mut sent = 0;
        for peer in table.peers.values() {
            let index = self.alloc_index(&used);
            used.insert(index);
            let link = Link::new(&keys, peer.public_key, self.persistent_keepalive, index);
            let mut s = lock(&peer.session);
            let old = std::mem::replace(&mut s.link, link);
            // The old link stays as the previous one: it carries traffic if it has a session,
            // and it answers handshakes to the old key from a peer that has not learned the new
            // one. But an earlier previous link that carries traffic (the last rotation's new
            // link never came up) is worth more than an old link without a session.
            let earlier_works = s
                .previous
                .as_ref()
                .is_some_and(|p| p.outbound && p.link.has_session());
            if old.has_session() || !earlier_works {
                s.previous = Some(Previous {
                    link: old,
                    outbound: true,
                    retire_at: None,
                });
            }
            tracing::debug!(
                host = %s.hostname,
                kept_previous = s.previous.is_some(),
                "local key rotated for peer"
            );
            s.fast_probe_until = now + FAST_PROBE_PERIOD;
            sent += self.probe(&mut s, now, out);
        }
        let mut older = vec![ring.current.clone()];
        older.extend(ring.older.iter().cloned());
        older.retain(|k| table.uses_local_key(k));
        *ring = Arc::new(KeyRing {
            current: keys,
            older,
        });
        drop(ring);
        table.reindex();
        drop(table);
        self.counters
            .handshake_initiations_sent
            .fetch_add(sent, Ordering::Relaxed);
    }

    /// Replaces the peer set.
    ///
    /// A peer whose key and addresses are unchanged keeps its `Tunn`s (no re-handshake); only
    /// its metadata and candidate endpoints are updated. A removed peer's sessions (under the
    /// current and any previous local key) are dropped before this returns. A new or changed
    /// peer gets a fresh `Tunn` and a handshake initiation to every candidate endpoint, written
    /// to `out`. Several peers may claim the same addresses (a peer's old and new key during its
    /// rotation); see [`Table::route`] for which one gets the traffic.
    pub fn set_peers(&self, peers: Vec<PeerConfig>, now: Instant, out: &mut Outbox) {
        let mut table = write(&self.table);
        let ring = read(&self.keys).clone();
        let keys = &ring.current;
        let mut next = Table::default();
        let mut used: HashSet<u32> = table.by_index.keys().copied().collect();
        for cfg in peers {
            if cfg.public_key == keys.public.to_bytes() {
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
                    if s.path.candidates != candidates {
                        s.path.candidates = candidates;
                        if !s.link.has_session() {
                            // New places to look: probe them now.
                            s.next_probe = now;
                            s.fast_probe_until = now + FAST_PROBE_PERIOD;
                        }
                    }
                    drop(s);
                    peer
                }
                None => {
                    let index = self.alloc_index(&used);
                    used.insert(index);
                    let link = Link::new(keys, cfg.public_key, self.persistent_keepalive, index);
                    let peer = Arc::new(Peer {
                        public_key: cfg.public_key,
                        ipv4: cfg.ipv4,
                        ipv6: cfg.ipv6,
                        session: Mutex::new(Session {
                            link,
                            previous: None,
                            device_id: cfg.device_id,
                            hostname: cfg.hostname,
                            path: Path {
                                endpoint: None,
                                candidates,
                                last_rx: None,
                            },
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
        tracing::debug!(
            peers = next.peers.len(),
            removed,
            "peer set replaced (removed peers' sessions dropped)"
        );
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
        coordinator_now_ms: i64,
        tun_out: &mut [u8],
        out: &mut Outbox,
    ) -> Option<usize> {
        self.batch()
            .handle_datagram(from, datagram, now, coordinator_now_ms, tun_out, out)
    }

    /// Runs WireGuard timers (keepalives, rekeying, handshake retransmission) and the
    /// candidate probing for every peer, and drops previous links whose grace period is over.
    /// Call every [`TIMER_INTERVAL`].
    pub fn handle_timers(&self, now: Instant, out: &mut Outbox) {
        let table = read(&self.table);
        let ring = read(&self.keys).clone();
        for keys in ring.iter() {
            keys.limiter.reset_count();
        }
        let mut local = LocalCounters::default();
        let mut retired = false;
        for peer in table.peers.values() {
            let mut s = lock(&peer.session);
            if let Some(p) = &s.previous {
                if p.retire_at.is_some_and(|t| now >= t) {
                    tracing::debug!(host = %s.hostname, "previous key's session dropped");
                    s.previous = None;
                    retired = true;
                }
            }
            let Session {
                link,
                previous,
                path,
                ..
            } = &mut *s;
            if let Some(p) = previous {
                // Its timers run (session expiry), but only while it carries the outbound
                // traffic does anything it wants to send (keepalives, a rekey) go out.
                let had_session = p.link.has_session();
                let start = out.reserve(HANDSHAKE_INIT_LEN + DATA_OVERHEAD);
                let res = timer_output(&mut p.link.tunn, start, had_session);
                if let (Some((len, is_init)), true) = (res, p.outbound) {
                    local.handshake_initiations_sent += route(path, out, len, is_init, now);
                }
            }
            let had_session = link.has_session();
            let start = out.reserve(HANDSHAKE_INIT_LEN + DATA_OVERHEAD);
            if let Some((len, is_init)) = timer_output(&mut link.tunn, start, had_session) {
                local.handshake_initiations_sent += route(path, out, len, is_init, now);
            }
            if !s.link.has_session() && now >= s.next_probe {
                local.handshake_initiations_sent += self.probe(&mut s, now, out);
            }
        }
        if retired && !ring.older.is_empty() {
            let older: Vec<Arc<Keys>> = ring
                .older
                .iter()
                .filter(|k| table.uses_local_key(k))
                .cloned()
                .collect();
            if older.len() != ring.older.len() {
                let mut w = write(&self.keys);
                // Only if no rotation replaced the ring meanwhile (it cannot: rotate_key takes
                // the table's write lock, which this holds for reading).
                if Arc::ptr_eq(&w, &ring) {
                    *w = Arc::new(KeyRing {
                        current: ring.current.clone(),
                        older,
                    });
                }
            }
        }
        drop(table);
        local.flush(&self.counters);
    }

    /// Per-peer status, one per device (ordered by device id): the peer entry and link that
    /// carry outbound traffic, with bytes summed over all of the device's entries and links.
    pub fn status(&self) -> Vec<PeerStatus> {
        let table = read(&self.table);
        let mut by_device: BTreeMap<u64, Vec<&Arc<Peer>>> = BTreeMap::new();
        for peer in table.peers.values() {
            let id = lock(&peer.session).device_id;
            by_device.entry(id).or_default().push(peer);
        }
        by_device
            .into_iter()
            .filter_map(|(device_id, entries)| {
                let chosen = entries
                    .iter()
                    .max_by_key(|p| lock(&p.session).outbound_rank())?;
                let s = lock(&chosen.session);
                let (last_handshake, ..) = s.outbound_link().tunn.stats();
                let endpoint = s.path.endpoint;
                drop(s);
                let mut status = PeerStatus {
                    device_id,
                    endpoint,
                    last_handshake,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    dropped_bad_source: 0,
                    path_mtu: endpoint.and_then(|e| self.pmtu.path_mtu(e.ip())),
                };
                for peer in entries {
                    let s = lock(&peer.session);
                    for link in s.links() {
                        let (_, tx, rx, _, _) = link.tunn.stats();
                        status.tx_bytes += tx as u64;
                        status.rx_bytes += rx as u64;
                    }
                    status.dropped_bad_source += peer.dropped_bad_source.load(Ordering::Relaxed);
                }
                Some(status)
            })
            .collect()
    }

    pub fn counters(&self) -> DataPlaneCounters {
        self.counters.snapshot()
    }

    /// How many peers still carry outbound traffic on a session under an older local key (a
    /// rotation whose new handshake has not completed yet). Zero means every peer that had a
    /// session has moved to the current key, so the old key's lease can be given up.
    pub fn peers_on_old_key(&self) -> usize {
        let table = read(&self.table);
        table
            .peers
            .values()
            .filter(|p| {
                let s = lock(&p.session);
                s.previous
                    .as_ref()
                    .is_some_and(|prev| prev.outbound && prev.link.has_session())
            })
            .count()
    }

    /// Sends a fresh handshake initiation on the current link to the endpoint and candidates;
    /// schedules the next. Returns the number of datagrams written.
    fn probe(&self, s: &mut Session, now: Instant, out: &mut Outbox) -> u64 {
        let interval = if now < s.fast_probe_until {
            PROBE_INTERVAL_FAST
        } else {
            PROBE_INTERVAL_SLOW
        };
        s.next_probe = now + interval;
        let buf = out.reserve(HANDSHAKE_INIT_LEN);
        match s.link.tunn.format_handshake_initiation(buf, true) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                route(&s.path, out, len, true, now)
            }
            _ => 0,
        }
    }

    fn alloc_index(&self, used: &HashSet<u32>) -> u32 {
        let mut rng = lock(&self.index_rng);
        loop {
            // boringtun puts the index in the upper 24 bits of the receiver index.
            let index = rng.gen_range(1..(1u32 << 24));
            if !used.contains(&index) {
                return index;
            }
        }
    }
}

/// Runs a `Tunn`'s timers; returns the datagram it wants sent (length, is a handshake
/// initiation), already written at the start of `buf`. Without a session, the core's own
/// probing decides when initiations go out (on `now`, to every candidate), so boringtun's
/// retransmissions are dropped.
fn timer_output(tunn: &mut Tunn, buf: &mut [u8], had_session: bool) -> Option<(usize, bool)> {
    match tunn.update_timers(buf) {
        TunnResult::WriteToNetwork(p) => {
            let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
            (!is_init || had_session).then_some((p.len(), is_init))
        }
        TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => None,
        TunnResult::Err(e) => {
            tracing::trace!(?e, "update_timers");
            None
        }
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => None,
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
    /// initiation to the candidates) to `out`, and record its flow in the filter so replies
    /// pass. Packets with no owner are dropped and counted; if the destination is inside the
    /// overlay, an ICMP "administratively prohibited" goes back to the TUN (rate-limited) so the
    /// application fails fast.
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant, out: &mut Outbox) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.local.dropped_bad_tun_packet += 1;
            return;
        };
        let Some(peer) = self.table.route(dst) else {
            tracing::trace!(%dst, "no peer owns destination");
            self.local.dropped_no_route += 1;
            if self.core.in_overlay(dst) && lock(&self.core.unreachable_limit).allow(now) {
                if let Some(reply) = icmp_prohibited(packet) {
                    out.tun.push(reply);
                    self.local.icmp_unreachable_sent += 1;
                }
            }
            return;
        };
        lock(&self.core.filter).handle_outbound(packet, now);
        let mut s = lock(&peer.session);
        let s = &mut *s;
        let dst = s
            .path
            .endpoint
            .or_else(|| s.path.candidates.first().copied());
        if !self.core.pmtu.admit(packet, dst, now, &mut out.tun) {
            return; // too big for the path: dropped, ICMP too-big queued for the TUN
        }
        let buf = out.reserve(packet.len().max(HANDSHAKE_INIT_LEN) + DATA_OVERHEAD);
        let link = match &mut s.previous {
            Some(p) if p.outbound && p.link.has_session() => &mut p.link,
            _ => &mut s.link,
        };
        match link.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                if p.first() == Some(&MSG_HANDSHAKE_INIT) {
                    // No session: the packet was queued and a handshake started.
                    s.want_peer(now);
                    s.next_probe = now + PROBE_INTERVAL_FAST;
                    self.local.handshake_initiations_sent += route(&s.path, out, len, true, now);
                } else if route(&s.path, out, len, false, now) > 0 {
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
                    self.local.handshake_initiations_sent += self.core.probe(s, now, out);
                }
            }
            TunnResult::Err(e) => tracing::trace!(?e, "encapsulate failed"),
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
        }
    }

    /// One UDP datagram from `from`. Returns `Some(n)` when `tun_out[..n]` holds a decrypted IP
    /// packet whose inner source is the sending peer's own address and that the inbound filter
    /// allows (at `coordinator_now_ms`, for rule expiry), ready for the TUN. Replies
    /// (handshake responses, cookies, flushed queued packets) go to `out`. Anything that is not
    /// valid WireGuard from a configured peer is dropped, counted, and never answered.
    ///
    /// Handshake initiations are accepted for this device's current key and, while a peer's
    /// previous link still carries traffic, for the older key that link uses. Data for a
    /// previous link's receiver index is accepted until that link is dropped.
    ///
    /// `tun_out` must be at least as long as `datagram`, else the datagram is dropped.
    #[must_use]
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        coordinator_now_ms: i64,
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
        let (peer, to) = match &packet {
            Packet::HandshakeInit(init) => {
                let ring = read(&self.core.keys).clone();
                let mut cookie = [0u8; 64];
                let mut matched = None;
                // mac1 is keyed by the receiver's public key: it tells which local key the
                // initiation is for.
                for keys in ring.iter() {
                    match keys
                        .limiter
                        .verify_packet(Some(from.ip()), datagram, &mut cookie)
                    {
                        Ok(_) => {
                            matched = Some(keys);
                            break;
                        }
                        Err(TunnResult::WriteToNetwork(reply)) => {
                            // Under load: answer a mac1-valid initiation with a cookie only.
                            out.push(from, reply);
                            return None;
                        }
                        Err(_) => {}
                    }
                }
                let Some(keys) = matched else {
                    return self.garbage(from, "handshake initiation with bad mac1");
                };
                let Ok(half) = parse_handshake_anon(&keys.private, &keys.public, init) else {
                    return self.garbage(from, "handshake initiation does not decrypt");
                };
                let to = LinkSelector::LocalKey(keys.clone());
                (self.table.peers.get(&half.peer_static_public), to)
            }
            Packet::HandshakeResponse(p) => (
                self.table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
            Packet::PacketCookieReply(p) => (
                self.table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
            Packet::PacketData(p) => (
                self.table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
        };
        let Some(peer) = peer else {
            return self.garbage(from, "unknown peer");
        };
        let is_handshake = matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        );
        let authenticated_if_ok = !matches!(packet, Packet::PacketCookieReply(_));
        let peer = Arc::clone(peer);
        let mut guard = lock(&peer.session);
        let s = &mut *guard;
        let Some(slot) = s.select(&to) else {
            drop(guard);
            return self.garbage(from, "no link for this key or index (retired)");
        };
        let link = match (slot, &mut s.previous) {
            (Slot::Previous, Some(p)) => &mut p.link,
            _ => &mut s.link,
        };
        let (reply, tunnel) = match link.tunn.decapsulate(Some(from.ip()), datagram, tun_out) {
            TunnResult::WriteToNetwork(p) => {
                let cookie = p.first() == Some(&MSG_COOKIE_REPLY);
                if !cookie {
                    s.path.authenticated_from(from, now);
                    if is_handshake {
                        tracing::debug!(host = %s.hostname, ?slot, "handshake completed");
                        link.established_at = Some(now);
                    }
                }
                out.push(from, p);
                (true, None)
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                s.path.authenticated_from(from, now);
                (false, Some((src == peer.ipv4).then_some(p.len())))
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                s.path.authenticated_from(from, now);
                (false, Some((src == peer.ipv6).then_some(p.len())))
            }
            TunnResult::Done => {
                // A keepalive (authenticated) or a cookie reply (not).
                if authenticated_if_ok {
                    s.path.authenticated_from(from, now);
                }
                (false, None)
            }
            TunnResult::Err(e) => {
                tracing::trace!(%from, ?e, "datagram refused");
                self.local.dropped_garbage += 1;
                return None;
            }
        };
        if reply {
            // A handshake completed or was answered: flush packets queued behind it.
            self.flush_queue(link, &s.path, now, out);
        }
        if slot == Slot::Current && authenticated_if_ok {
            s.promote_if_ready(now);
        }
        drop(guard);
        match tunnel {
            None => None,
            Some(Some(n)) => {
                let verdict =
                    lock(&self.core.filter).check_inbound(&tun_out[..n], now, coordinator_now_ms);
                match verdict {
                    Verdict::Allow => {}
                    Verdict::Deny(reason) => {
                        tracing::trace!(%from, ?reason, "inbound packet denied by the filter");
                        match reason {
                            DenyReason::NoRule => self.local.dropped_filter_no_rule += 1,
                            DenyReason::Expired => self.local.dropped_filter_expired += 1,
                            DenyReason::Malformed
                            | DenyReason::Fragment
                            | DenyReason::UnsupportedProtocol
                            | DenyReason::TableFull => self.local.dropped_filter_other += 1,
                        }
                        return None;
                    }
                }
                self.local.rx_packets += 1;
                self.local.rx_bytes += n as u64;
                Some(n)
            }
            Some(None) => {
                tracing::trace!(%from, "inner source is not the peer's address");
                peer.dropped_bad_source.fetch_add(1, Ordering::Relaxed);
                self.local.dropped_bad_source += 1;
                None
            }
        }
    }

    fn flush_queue(&mut self, link: &mut Link, path: &Path, now: Instant, out: &mut Outbox) {
        loop {
            // Queued packets came from the TUN, so they are at most 64 KiB.
            let buf = out.reserve(u16::MAX as usize + DATA_OVERHEAD);
            match link.tunn.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(p) => {
                    let len = p.len();
                    let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
                    if is_init {
                        self.local.handshake_initiations_sent += route(path, out, len, true, now);
                    } else if route(path, out, len, false, now) > 0 {
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
    /// IP packets for the local TUN (ICMP errors for destinations without a peer).
    tun: Vec<Vec<u8>>,
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
        self.tun.clear();
    }

    /// IP packets to write to the local TUN (not counted by [`Outbox::is_empty`]).
    pub fn tun_packets(&self) -> &[Vec<u8>] {
        &self.tun
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
fn route(path: &Path, out: &mut Outbox, len: usize, is_init: bool, now: Instant) -> u64 {
    let fresh = path
        .last_rx
        .is_some_and(|t| now.saturating_duration_since(t) < PATH_STALE_AFTER);
    if !is_init || (fresh && path.endpoint.is_some()) {
        let Some(dst) = path.endpoint.or_else(|| path.candidates.first().copied()) else {
            return 0;
        };
        out.commit(dst, len);
        return 1;
    }
    let mut targets = path.endpoint.into_iter().chain(
        path.candidates
            .iter()
            .copied()
            .filter(|c| Some(*c) != path.endpoint),
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

/// A static key pair of this device and the handshake rate limiter keyed by it (mac1 depends
/// on the public key).
struct Keys {
    private: StaticSecret,
    public: PublicKey,
    /// Verifies mac1 and rate-limits handshake initiations before the (expensive) anonymous
    /// parse that finds the initiating peer.
    limiter: RateLimiter,
}

impl Keys {
    fn new(private_key: [u8; 32]) -> Keys {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Keys {
            limiter: RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT),
            private,
            public,
        }
    }
}

/// This device's current key and the older ones that some peer's previous link still uses.
struct KeyRing {
    current: Arc<Keys>,
    /// Newest first.
    older: Vec<Arc<Keys>>,
}

impl KeyRing {
    /// The current key first.
    fn iter(&self) -> impl Iterator<Item = &Arc<Keys>> + '_ {
        std::iter::once(&self.current).chain(self.older.iter())
    }
}

/// A configured peer. Its key and addresses are fixed; changing them makes a new `Peer`.
struct Peer {
    public_key: [u8; 32],
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    session: Mutex<Session>,
    dropped_bad_source: AtomicU64,
}

/// One `Tunn` with a peer under one of this device's local keys.
struct Link {
    tunn: Tunn,
    /// 24-bit receiver index given to the `Tunn`.
    index: u32,
    /// The local key the `Tunn` uses.
    keys: Arc<Keys>,
    /// When (on the core's clock) this link last completed a handshake.
    established_at: Option<Instant>,
}

impl Link {
    fn new(
        keys: &Arc<Keys>,
        peer_public: [u8; 32],
        persistent_keepalive: Option<u16>,
        index: u32,
    ) -> Link {
        Link {
            tunn: Tunn::new(
                keys.private.clone(),
                PublicKey::from(peer_public),
                None,
                persistent_keepalive,
                index,
                None,
            ),
            index,
            keys: keys.clone(),
            established_at: None,
        }
    }

    /// Has a session packets can be sent on.
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

/// The link under this device's previous key, kept across a rotation.
struct Previous {
    link: Link,
    /// Carries outbound traffic while it has a session and the current link has none yet;
    /// answers the peer's handshakes to the old key. Once false, it only decrypts.
    outbound: bool,
    /// When it is dropped; set once the current link has a session.
    retire_at: Option<Instant>,
}

/// Which link of a peer a datagram is for.
enum LinkSelector {
    /// A handshake initiation to this local key.
    LocalKey(Arc<Keys>),
    /// A message carrying this receiver index.
    Index(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Current,
    Previous,
}

struct Session {
    /// The link under this device's current key.
    link: Link,
    previous: Option<Previous>,
    device_id: u64,
    hostname: String,
    path: Path,
    next_probe: Instant,
    fast_probe_until: Instant,
}

/// Where a peer is on the underlay.
struct Path {
    /// Where the last authenticated packet came from (WireGuard roaming).
    endpoint: Option<SocketAddr>,
    candidates: Vec<SocketAddr>,
    last_rx: Option<Instant>,
}

impl Path {
    fn authenticated_from(&mut self, from: SocketAddr, now: Instant) {
        if self.endpoint != Some(from) {
            tracing::debug!(endpoint = %from, "peer endpoint changed");
            self.endpoint = Some(from);
        }
        self.last_rx = Some(now);
    }
}

impl Session {
    /// The link outbound packets are encrypted on: the previous one while it carries traffic
    /// and has a session, else the current one.
    fn outbound_link(&self) -> &Link {
        match &self.previous {
            Some(p) if p.outbound && p.link.has_session() => &p.link,
            _ => &self.link,
        }
    }

    /// How good this entry is for outbound traffic: a usable session first, then the most
    /// recent handshake.
    fn outbound_rank(&self) -> (bool, Option<Instant>) {
        let link = self.outbound_link();
        (link.has_session(), link.established_at)
    }

    fn links(&self) -> impl Iterator<Item = &Link> + '_ {
        std::iter::once(&self.link).chain(self.previous.as_ref().map(|p| &p.link))
    }

    /// The link a datagram is for, if it still exists. A previous link answers handshakes only
    /// while it carries the outbound traffic, so a peer never moves back to it.
    fn select(&self, to: &LinkSelector) -> Option<Slot> {
        match to {
            LinkSelector::LocalKey(k) => {
                if Arc::ptr_eq(&self.link.keys, k) {
                    Some(Slot::Current)
                } else {
                    self.previous
                        .as_ref()
                        .filter(|p| p.outbound && Arc::ptr_eq(&p.link.keys, k))
                        .map(|_| Slot::Previous)
                }
            }
            LinkSelector::Index(i) => {
                if self.link.index == *i {
                    Some(Slot::Current)
                } else {
                    self.previous
                        .as_ref()
                        .filter(|p| p.link.index == *i)
                        .map(|_| Slot::Previous)
                }
            }
        }
    }

    /// After an authenticated packet on the current link: once it has a session, outbound
    /// moves to it and the previous link's grace period starts.
    fn promote_if_ready(&mut self, now: Instant) {
        let Some(p) = &mut self.previous else { return };
        if p.outbound && self.link.has_session() {
            tracing::debug!(host = %self.hostname, "outbound moved to the new key's session");
            p.outbound = false;
            p.retire_at = Some(now + PREVIOUS_GRACE);
        }
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

/// The peer table. Every index maps to the peer owning it; addresses map to every peer
/// claiming them, in configuration order.
#[derive(Default)]
struct Table {
    peers: BTreeMap<[u8; 32], Arc<Peer>>,
    by_v4: HashMap<Ipv4Addr, Vec<Arc<Peer>>>,
    by_v6: HashMap<Ipv6Addr, Vec<Arc<Peer>>>,
    by_index: HashMap<u32, Arc<Peer>>,
}

impl Table {
    fn insert(&mut self, peer: Arc<Peer>) {
        self.by_v4.entry(peer.ipv4).or_default().push(peer.clone());
        self.by_v6.entry(peer.ipv6).or_default().push(peer.clone());
        for link in lock(&peer.session).links() {
            self.by_index.insert(link.index, peer.clone());
        }
        self.peers.insert(peer.public_key, peer);
    }

    /// Rebuilds the index map from the peers' links (after a rotation).
    fn reindex(&mut self) {
        self.by_index.clear();
        for peer in self.peers.values() {
            for link in lock(&peer.session).links() {
                self.by_index.insert(link.index, peer.clone());
            }
        }
    }

    /// Whether some peer's previous link uses this local key.
    fn uses_local_key(&self, keys: &Arc<Keys>) -> bool {
        self.peers.values().any(|peer| {
            lock(&peer.session)
                .previous
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(&p.link.keys, keys))
        })
    }

    /// The peer that gets packets for `dst`. With several peers claiming it (a peer's old and
    /// new key during its rotation): the one with a usable session whose handshake is the most
    /// recent; if none has a session, the last configured (it gets the handshake). So traffic
    /// never leaves a working session for one that is not up yet.
    fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        let entries = match dst {
            IpAddr::V4(a) => self.by_v4.get(&a),
            IpAddr::V6(a) => self.by_v6.get(&a),
        }?;
        match entries.as_slice() {
            [one] => Some(one),
            many => many
                .iter()
                .enumerate()
                .max_by_key(|(i, p)| (lock(&p.session).outbound_rank(), *i))
                .map(|(_, p)| p),
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
    dropped_filter_no_rule: AtomicU64,
    dropped_filter_expired: AtomicU64,
    dropped_filter_other: AtomicU64,
    icmp_unreachable_sent: AtomicU64,
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
            dropped_filter_no_rule: g(&self.dropped_filter_no_rule),
            dropped_filter_expired: g(&self.dropped_filter_expired),
            dropped_filter_other: g(&self.dropped_filter_other),
            icmp_unreachable_sent: g(&self.icmp_unreachable_sent),
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
    dropped_filter_no_rule: u64,
    dropped_filter_expired: u64,
    dropped_filter_other: u64,
    icmp_unreachable_sent: u64,
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
        add(&c.dropped_filter_no_rule, &mut self.dropped_filter_no_rule);
        add(&c.dropped_filter_expired, &mut self.dropped_filter_expired);
        add(&c.dropped_filter_other, &mut self.dropped_filter_other);
        add(&c.icmp_unreachable_sent, &mut self.icmp_unreachable_sent);
    }
}

impl Core {
    /// Inside 100.64.0.0/10 or this overlay's IPv6 /48.
    fn in_overlay(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(a) => AddressPools::contains_v4(a),
            IpAddr::V6(a) => self
                .v6_prefix
                .is_some_and(|p| a.octets()[..6] == p.octets()[..6]),
        }
    }
}

/// At most [`UNREACHABLE_PER_SEC`] events per one-second window.
#[derive(Default)]
struct WindowLimit {
    start: Option<Instant>,
    count: u32,
}

impl WindowLimit {
    fn allow(&mut self, now: Instant) -> bool {
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
/// code 1) answering `packet`, from its destination to its source, quoting as much of it as
/// the minimum MTU allows. `None` for packets that must not be answered: ICMP errors
/// themselves, non-first fragments, unspecified or multicast sources, malformed headers.
pub(crate) fn icmp_prohibited(packet: &[u8]) -> Option<Vec<u8>> {
    match packet.first()? >> 4 {
        4 => {
            if packet.len() < 20 {
                return None;
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl {
                return None;
            }
            let frag = u16::from_be_bytes([packet[6], packet[7]]);
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            if frag & 0x1fff != 0
                || src.is_unspecified()
                || src.is_multicast()
                || src.is_broadcast()
            {
                return None;
            }
            // Do not answer ICMP errors (only echo requests/replies).
            if packet[9] == 1 && !matches!(packet.get(ihl), Some(0 | 8)) {
                return None;
            }
            let quoted = &packet[..packet.len().min(ICMP4_ERROR_MAX - 28)];
            let total = 28 + quoted.len();
            let mut p = vec![0u8; total];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            p[8] = 64;
            p[9] = 1;
            p[12..16].copy_from_slice(&packet[16..20]);
            p[16..20].copy_from_slice(&packet[12..16]);
            let c = checksum(&[&p[..20]]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p[20] = 3;
            p[21] = 13;
            p[28..].copy_from_slice(quoted);
            let c = checksum(&[&p[20..]]);
            p[22..24].copy_from_slice(&c.to_be_bytes());
            Some(p)
        }
        6 => {
            if packet.len() < 40 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&packet[8..24]).ok()?);
            if src.is_unspecified() || src.is_multicast() {
                return None;
            }
            // Do not answer ICMPv6 errors (types below 128); other extension headers are
            // quoted as they are.
            if packet[6] == 58 && packet.get(40).is_none_or(|t| *t < 128) {
                return None;
            }
            let quoted = &packet[..packet.len().min(ICMP6_ERROR_MAX - 48)];
            let plen = 8 + quoted.len();
            let mut p = vec![0u8; 40 + plen];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&(plen as u16).to_be_bytes());
            p[6] = 58;
            p[7] = 64;
            p[8..24].copy_from_slice(&packet[24..40]);
            p[24..40].copy_from_slice(&packet[8..24]);
            p[40] = 1;
            p[41] = 1;
            p[48..].copy_from_slice(quoted);
            let mut pseudo = [0u8; 40];
            pseudo[..32].copy_from_slice(&p[8..40]);
            pseudo[32..36].copy_from_slice(&(plen as u32).to_be_bytes());
            pseudo[39] = 58;
            let c = checksum(&[&pseudo, &p[40..]]);
            p[42..44].copy_from_slice(&c.to_be_bytes());
            Some(p)
        }
        _ => None,
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length
/// except possibly the last).
pub(crate) fn checksum(parts: &[&[u8]]) -> u16 {
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
