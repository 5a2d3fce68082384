//! The I/O-free data-plane engine: peer table, cryptokey routing, WireGuard sessions, the
//! inbound filter. [`Core`] is the type to drive; its documentation spells out the loop.
//!
//! | module | concern |
//! |---|---|
//! | this one | [`Core`]: configuration, peer set, timers and probing, status |
//! | `batch` | [`Batch`]: the two packet paths (TUN → peer, peer → TUN) |
//! | `peers` | the peer table, cryptokey routing |
//! | `path` | where each peer is on the underlay, and path selection (direct or relayed) |
//! | `relays` | the relays this device is connected to, by small id |
//! | `session` | a peer's WireGuard links and the loss-free rotation of this device's key |
//! | `filter` | the inbound filter shared by both paths without a per-packet lock |
//! | `icmp` | ICMP "administratively prohibited" replies and their rate limit |
//! | `demand` | peers on demand: packets held for a peer not sent yet, wants, refusals |
//! | `outbox` | [`Outbox`]: datagrams (and TUN packets) for the driver to send |
//! | `counters` | data-plane counters, merged once per batch |
//!
//! # Key rotation without loss
//!
//! A rotating device appears to its peers as two peer entries with the same addresses (old key,
//! new key) until the coordinator revokes the old one. Outbound traffic to an address goes to
//! the entry whose session is usable and was established most recently; an entry without a
//! session is used only when no entry has one (see `Table::route`). So a new, not yet used key
//! costs nothing: it is probed in the background and takes over once its handshake completes.
//!
//! On the rotating device, [`Core::rotate_key`] gives every peer a new `Tunn` under the new key
//! (the *current* link, handshaking at once) and keeps the old one as the *previous* link: it
//! still decrypts what the peer sends under the old session, answers the peer's handshakes to
//! the old key, and carries outbound traffic until the current link has a session. Then it stops
//! sending and is dropped [`PREVIOUS_GRACE`] later (or when `set_peers` removes the peer).
//!
//! # Time and randomness
//!
//! Every method takes `now`; the engine never reads the clock for its own decisions
//! (endpoint probing). boringtun's `Tunn` reads the system clock inside `update_timers`,
//! `time_since_last_handshake` and its rate limiter; that is accepted (tests run in real time,
//! which is fast because the engine's own probing runs on the passed-in `now`).
//!
//! Receiver indices come from a seeded RNG; boringtun draws its ephemeral keys and cookie
//! secrets from the OS.

mod batch;
mod counters;
mod demand;
mod filter;
pub(super) mod icmp;
mod outbox;
mod path;
mod peers;
mod relays;
mod session;

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use boringtun::noise::TunnResult;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ward_shared::filter::{Filter, FilterCounters, FilterRule, LocalPrefixes};
use ward_shared::peerset::PeerSet;
use ward_shared::routes::Prefix;
use ward_shared::wire::PeerRef;

use self::counters::{Counters, LocalCounters};
use self::demand::Demand;
use self::filter::{OutboundLog, SharedFilter};
use self::icmp::{icmp_prohibited, in_overlay, WindowLimit};
use self::peers::{route, sanitize_candidates, Path, Peer, Table};
use self::relays::Relays;
use self::session::{timer_output, KeyRing, Keys, Link, Session};
use super::pmtu::PathMtus;
use super::probe::Prober;
use super::{DataPlaneCounters, PathStatus, PeerConfig, PeerStatus};

pub use self::batch::{Batch, Runs};
pub use self::demand::{
    HELD_PER_DST, HELD_TTL, MAX_HELD_DSTS, MAX_HELD_KEYS, REFUSAL_HOLD, WANTS_PER_SEC,
    WANT_INTERVAL,
};
pub use self::outbox::{Destination, Outbox, RelayId, Source, Transmit};
pub use self::path::{
    PathState, DIRECT_PROBE_INTERVAL, DIRECT_PROBE_INTERVAL_FAST, FALLBACK_SENT_WITHIN,
    FALLBACK_SILENCE, FAST_DIRECT_PERIOD, PUNCH_BURST, PUNCH_REPROBE_INTERVAL,
    PUNCH_REQUEST_MIN_GAP, PUNCH_SPACING,
};

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
/// How long a previous link (a peer's session under this device's old key) keeps decrypting
/// after the new key's session with that peer is up, for packets still in flight.
pub const PREVIOUS_GRACE: Duration = Duration::from_secs(10);

/// WireGuard message sizes and overhead.
const HANDSHAKE_INIT_LEN: usize = 148;
const DATA_OVERHEAD: usize = 32;
const MSG_HANDSHAKE_INIT: u8 = 1;
const MSG_COOKIE_REPLY: u8 = 3;

/// Most connections the inbound filter tracks.
pub const MAX_FLOWS: usize = ward_shared::filter::DEFAULT_MAX_FLOWS;

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

/// The data-plane protocol core: WireGuard sessions with every peer, cryptokey routing, the
/// inner-source check, the inbound filter and loss-free key rotation. No I/O: the driver owns
/// the TUN, the socket, the threads and the clock.
///
/// # Drive loop
///
/// Inputs are `handle_*` calls (a [`Batch`], through its [`Runs`], for packets) with the time
/// passed in; outputs go to
/// the caller's [`Outbox`] (datagrams for the network, ICMP errors for the TUN) and, for a
/// decrypted packet, the caller's buffer.
///
/// ```text
/// core = Core::new(cfg, seed)
/// core.set_peers(peers, now, &mut outbox)            -> send outbox (proactive handshakes)
/// core.set_filter(rules)                             (the netmap's inbound rules)
/// core.set_relays(connected, now)                    (relays with a live connection)
/// loop {
///     TUN packets:   let mut b = core.batch(); let mut r = b.runs();
///                    for p in packets { r.handle_tun_packet(p, now, &mut outbox) }
///                    drop(r); drop(b); send outbox; write outbox.tun_packets() to the TUN;
///                    outbox.clear()
///     UDP datagrams: let mut b = core.batch(); let mut r = b.runs();
///                    for (from, d) in datagrams {
///                        if let Some(n) = r.handle_datagram(from, d, now, coord_ms, &mut buf, &mut outbox) {
///                            collect buf[..n] for the TUN (r.release() before writing mid-batch)
///                        }
///                    }
///                    drop(r); drop(b); write to the TUN; send outbox; outbox.clear()
///     relayed datagram: the same, with from = Source::Relay { relay: core.relay_id(name)?, from }
///     every TIMER_INTERVAL: core.handle_timers(now, &mut outbox); send outbox
///     after a batch:  if core.take_want_signal() { wake whoever calls take_wants }
///     on demand:      core.take_wants(now) -> the coordinator (want_peer);
///                     its refusal: core.refuse(by, now, &mut outbox); write outbox.tun_packets()
///     now and then:  core.expire_flows(now); core.take_denied_flows() -> the coordinator;
///                    core.take_flow_samples() -> the flow log
/// }
/// ```
///
/// "Send outbox" means: [`Destination::Udp`] datagrams to the UDP socket,
/// [`Destination::Relay`] ones to that relay (named by [`Core::relay_name`]) for that device.
/// Which one a peer's traffic takes is the peer's path state (see the `path` module).
///
/// A batch must be dropped before its outbox is sent: dropping it hands the packets it sent to
/// the inbound filter, so their replies pass.
///
/// # Threads and locks
///
/// `Core` is `Sync`: the TUN path and the UDP path run on different threads at once. The peer
/// table is behind an `RwLock` (writers: [`Core::set_peers`] and [`Core::rotate_key`]), each
/// peer's session state behind a `Mutex` (a `Tunn` encrypts and decrypts through `&mut`).
/// Nothing both paths share is locked per packet:
///
/// - per batch: the table's read lock (a [`Batch`] holds it for its lifetime, so once
///   `set_peers` returns, no packet under a removed key is accepted any more); the filter,
///   locked by the receive path at the first datagram from a known peer and held to the end of
///   the batch (the send path never locks it per packet: it hands its packets over once per
///   batch, see the `filter` module); the ICMP limiter, at the first packet without a route;
///   the counters, merged once.
/// - per run: a peer's session. [`Runs`] keeps the last peer's session locked while the
///   following packets are for the same peer (on either path), so a run of consecutive packets
///   for one peer (a bulk stream: the whole batch) locks it once. The run ends at a packet for
///   another peer, at a lock that ranks before sessions (below), at [`Runs::release`] or when
///   the `Runs` is dropped. The other path, when it needs the same peer, waits for the run to
///   end (for a bulk stream, the batch's packet processing), so the driver releases the run
///   before blocking I/O in the middle of a batch. [`Batch`]'s own per-packet methods are runs
///   of one.
/// - only where a packet needs it: the key ring (read, for a handshake initiation) and, when
///   several entries claim a destination (a peer's rotation), each of their sessions in turn to
///   rank them (`Table::route`); the run is released first.
///
/// Lock order: the table, then the relay registry (never taken by batches), then the ICMP
/// limiter or the filter (then its pending outbound records), then the local key ring, then
/// one peer session at a time. A run that needs a lock earlier in this order releases its
/// session first. What is held for peers on demand (`demand`) is a leaf: taken only in the
/// no-route branch and for an unknown key's initiation, with nothing locked while it is held.
///
/// # Peers on demand
///
/// Off by default ([`Core::set_on_demand`]); then nothing below happens and the hot path
/// only pays one atomic load in the branch for a destination without a peer. On, a TUN
/// packet to an overlay address no peer claims, and a handshake initiation from a key no
/// peer has, are held briefly and wanted (see the `demand` module for the bounds): the
/// driver takes the wants ([`Core::take_wants`], woken by [`Core::take_want_signal`]),
/// [`Core::set_peers`] handles what was held for the peers it installs as if it had just
/// arrived, and [`Core::refuse`] answers held packets with ICMP "administratively
/// prohibited".
pub struct Core {
    /// This device's static key (and older ones previous links still use); replaced by
    /// [`Core::rotate_key`].
    keys: RwLock<Arc<KeyRing>>,
    persistent_keepalive: Option<u16>,
    table: RwLock<Table>,
    index_rng: Mutex<StdRng>,
    /// The inbound filter: locked once per receive batch, fed by the send path once per batch.
    filter: SharedFilter,
    /// Coordinator time minus local wall-clock time, ms (kept here for the driver).
    clock_offset_ms: AtomicI64,
    v6_prefix: Option<Ipv6Addr>,
    unreachable_limit: Mutex<WindowLimit>,
    counters: Counters,
    /// Path MTU per destination (see `pmtu`), learned by the driver.
    pmtu: Arc<PathMtus>,
    /// Relay names by id, and the connected ones. Lock order: after the table, before
    /// sessions.
    relays: RwLock<Relays>,
    /// Path switches over all peers (each peer's `Path` holds a reference).
    path_switches: Arc<AtomicU64>,
    /// The addresses this device owns (see [`Core::set_local_prefixes`]): set once, read by
    /// both packet paths without a lock.
    local: OnceLock<LocalPrefixes>,
    /// The routed prefixes this device forwards to (its approved routes, see
    /// [`Core::set_routes`]); `has_routes` spares the packet paths the lock without any.
    routed: RwLock<LocalPrefixes>,
    has_routes: AtomicBool,
    /// This device's overlay IPv4 address, the source of its path-MTU probes (set by the
    /// driver; unset, probes come from 0.0.0.0, which the peer's engine accepts alike).
    own_ipv4: OnceLock<Ipv4Addr>,
    /// Some peer has a punch burst under way: the timers must run at `PUNCH_SPACING`.
    bursting: AtomicBool,
    /// Some peer may want a punch request (set by its `Path`, cleared when they are taken).
    punch_pending: Arc<AtomicBool>,
    /// Peers on demand: hold and want rather than refuse (see [`Core::set_on_demand`]).
    on_demand: AtomicBool,
    /// What is held for peers on demand (a leaf lock).
    demand: Mutex<Demand>,
    /// A want was recorded and not yet taken ([`Core::take_wants`]).
    wants_pending: AtomicBool,
    /// A want was recorded since the driver last looked ([`Core::take_want_signal`]).
    want_signal: AtomicBool,
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
            filter: SharedFilter::new(Filter::with_seed(MAX_FLOWS, seed.rotate_left(17) ^ 0x5eed)),
            clock_offset_ms: AtomicI64::new(0),
            v6_prefix: cfg.v6_prefix,
            unreachable_limit: Mutex::new(WindowLimit::default()),
            counters: Counters::default(),
            pmtu: Arc::default(),
            relays: RwLock::new(Relays::default()),
            path_switches: Arc::default(),
            local: OnceLock::new(),
            routed: RwLock::new(LocalPrefixes::default()),
            has_routes: AtomicBool::new(false),
            own_ipv4: OnceLock::new(),
            bursting: AtomicBool::new(false),
            punch_pending: Arc::default(),
            on_demand: AtomicBool::new(false),
            demand: Mutex::new(Demand::default()),
            wants_pending: AtomicBool::new(false),
            want_signal: AtomicBool::new(false),
        }
    }

    /// Sets the addresses this device owns, once, before packets flow (the driver does it
    /// when it makes the core). From then on a decrypted packet whose destination is not one
    /// of them is dropped (counted as `dropped_wrong_destination`: a peer must not use this
    /// device as a router into the networks behind it), and a TUN packet whose source is not
    /// one of them is dropped before encryption (`dropped_wrong_source`). Until it is called
    /// no address check is made (the engine's own tests drive cores without it). Returns false,
    /// changing nothing, if the addresses were already set.
    pub fn set_local_prefixes(&self, local: LocalPrefixes) -> bool {
        self.local.set(local).is_ok()
    }

    /// Replaces the routed prefixes this device forwards to (a subnet router's or exit node's
    /// approved routes; empty: none). Decrypted packets to them pass the destination check and
    /// meet the inbound filter's routed (`dests`) rules only; TUN packets from them (replies
    /// the kernel forwards back) pass the source check. Default routes never cover the
    /// overlay: overlay addresses stay each device's own.
    pub fn set_routes(&self, routes: Vec<Prefix>) {
        let mut set = LocalPrefixes::default();
        for p in &routes {
            set.add_prefix(p.addr(), p.len());
        }
        *write(&self.routed) = set;
        self.has_routes.store(!routes.is_empty(), Ordering::Relaxed);
        self.filter.set_routed(routes);
    }

    /// Whether `ip` is one of this device's routed destinations (never an overlay address).
    pub(super) fn is_routed(&self, ip: IpAddr) -> bool {
        self.has_routes.load(Ordering::Relaxed)
            && !in_overlay(ip, self.v6_prefix)
            && read(&self.routed).contains(ip)
    }

    /// Sets this device's overlay IPv4 address, once: the source address of its path-MTU
    /// probes (an older peer then counts them as filter drops rather than as bad sources).
    pub fn set_own_ipv4(&self, ip: Ipv4Addr) -> bool {
        self.own_ipv4.set(ip).is_ok()
    }

    fn probe_source(&self) -> Ipv4Addr {
        self.own_ipv4
            .get()
            .copied()
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// How long the driver may wait before the next [`Core::handle_timers`]:
    /// [`TIMER_INTERVAL`], or [`PUNCH_SPACING`] while a punch burst is under way.
    pub fn timer_wait(&self) -> Duration {
        if self.bursting.load(Ordering::Relaxed) {
            PUNCH_SPACING
        } else {
            TIMER_INTERVAL
        }
    }

    /// Whether [`Core::take_punch_requests`] may have peers to return.
    pub fn punch_pending(&self) -> bool {
        self.punch_pending.load(Ordering::Relaxed)
    }

    /// The peers (device ids) for which a punch request should go to the coordinator now:
    /// this side just started probing their direct candidates (see the `path` module). Each
    /// wish is returned once.
    pub fn take_punch_requests(&self, now: Instant) -> Vec<u64> {
        if !self.punch_pending.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        let table = read(&self.table);
        let mut ids = Vec::new();
        for peer in table.peers.values() {
            let mut s = lock(&peer.session);
            if s.path.take_punch_request(now) && !ids.contains(&s.device_id) {
                ids.push(s.device_id);
            }
        }
        ids.sort_unstable();
        ids
    }

    /// Peers on demand (the netmap's `on_demand`): while on, a TUN packet to an overlay
    /// address no peer claims is held and its peer wanted instead of answered with ICMP
    /// "administratively prohibited", and a handshake initiation from an unknown key is held
    /// and wanted instead of dropped (see the `demand` module for the bounds). Turning it off
    /// drops whatever is held.
    pub fn set_on_demand(&self, on: bool) {
        self.on_demand.store(on, Ordering::Relaxed);
        if !on {
            let dropped = lock(&self.demand).clear();
            self.wants_pending.store(false, Ordering::Relaxed);
            self.counters
                .held_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Whether on-demand mode is on.
    pub fn on_demand(&self) -> bool {
        self.on_demand.load(Ordering::Relaxed)
    }

    /// Whether [`Core::take_wants`] may have peers to return.
    pub fn wants_pending(&self) -> bool {
        self.wants_pending.load(Ordering::Relaxed)
    }

    /// Whether a want was recorded since the last call (one atomic load when none was): the
    /// driver calls it after each batch and wakes whoever takes the wants, so a want leaves
    /// within the batch that made it.
    pub fn take_want_signal(&self) -> bool {
        self.want_signal.load(Ordering::Relaxed) && self.want_signal.swap(false, Ordering::Relaxed)
    }

    /// The peers to ask the coordinator for now (`want_peer`), each once: overlay addresses
    /// packets were held for, keys whose initiations were held. Also drops what was held
    /// longer than [`HELD_TTL`].
    pub fn take_wants(&self, now: Instant) -> Vec<PeerRef> {
        if !self.wants_pending.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        let mut d = lock(&self.demand);
        let dropped = d.expire(now);
        let wants = d.take_wants();
        drop(d);
        self.counters
            .held_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        wants
    }

    /// The coordinator refused `by` (`peer_refused`): what is held for it is dropped, each
    /// held TUN packet answered with ICMP "administratively prohibited" into `out`'s TUN
    /// packets (rate-limited), and for [`REFUSAL_HOLD`] packets to that address get the ICMP
    /// at once and no new want.
    pub fn refuse(&self, by: PeerRef, now: Instant, out: &mut Outbox) {
        let (packets, dropped) = lock(&self.demand).refuse(by.clone(), now);
        let mut local = LocalCounters {
            held_dropped: dropped + packets.len() as u64,
            ..LocalCounters::default()
        };
        if !packets.is_empty() {
            let mut log = OutboundLog::default();
            let mut limit = lock(&self.unreachable_limit);
            for p in &packets {
                log.record_dropped(p, now, ward_shared::flows::DenyCause::NoLease);
                if limit.allow(now) {
                    if let Some(reply) = icmp_prohibited(p) {
                        out.tun.push(reply);
                        local.icmp_unreachable_sent += 1;
                    }
                }
            }
            drop(limit);
            self.filter.hand_over(&mut log);
        }
        tracing::debug!(%by, held = packets.len(), "peer refused: held packets answered");
        local.flush(&self.counters);
    }

    /// Handles again what was held for peers the table now has: TUN packets whose destination
    /// routes to a peer (their initiation or data goes to `out`), initiations whose key is a
    /// peer (the response goes to `out`). Called by [`Core::set_peers`].
    fn replay_held(&self, now: Instant, out: &mut Outbox) {
        let (packets, inits, dropped) = {
            let table = read(&self.table);
            let mut d = lock(&self.demand);
            if d.is_idle() {
                return;
            }
            let (packets, dropped) = d.take_routable(now, |dst| !table.claimants(dst).is_empty());
            let inits = d.take_known(|k| table.peers.contains_key(k));
            (packets, inits, dropped)
        };
        self.counters
            .held_dropped
            .fetch_add(dropped, Ordering::Relaxed);
        if packets.is_empty() && inits.is_empty() {
            return;
        }
        tracing::debug!(
            packets = packets.len(),
            initiations = inits.len(),
            "peers arrived: sending what was held for them"
        );
        self.counters
            .held_replayed
            .fetch_add((packets.len() + inits.len()) as u64, Ordering::Relaxed);
        let mut batch = self.batch();
        let mut runs = batch.runs();
        for p in &packets {
            runs.handle_tun_packet(p, now, out);
        }
        let mut buf = Vec::new();
        for (from, datagram) in &inits {
            buf.resize(datagram.len(), 0);
            // An initiation never yields a packet for the TUN (nor meets the filter, so the
            // coordinator time does not matter).
            let _ = runs.handle_datagram(*from, datagram, now, 0, &mut buf, out);
        }
    }

    /// Peer `device_id` is probing this device's direct candidates now (its punch request,
    /// forwarded by the coordinator with `endpoints`, its candidates as the coordinator knows
    /// them): the first keepalive of a burst to its candidates and `endpoints` goes into `out`
    /// at once, the rest from [`Core::handle_timers`]; without a session, a handshake
    /// initiation goes to them instead. Returns whether the peer is known.
    pub fn punch(
        &self,
        device_id: u64,
        endpoints: &[SocketAddr],
        now: Instant,
        out: &mut Outbox,
    ) -> bool {
        let table = read(&self.table);
        let endpoints = sanitize_candidates(endpoints);
        let mut known = false;
        let mut local = LocalCounters::default();
        for peer in table.peers.values() {
            let mut s = lock(&peer.session);
            if s.device_id != device_id {
                continue;
            }
            known = true;
            s.path.handle_punch(endpoints.clone(), now);
            if s.link.has_session() {
                if s.path.burst_due(now) {
                    local.direct_probes_sent += direct_probe(&mut s, out);
                }
            } else {
                local.handshake_initiations_sent += self.probe(&mut s, now, out);
            }
        }
        drop(table);
        local.flush(&self.counters);
        if known {
            self.bursting.store(true, Ordering::Relaxed);
        }
        known
    }

    /// This device's network changed (interface addresses): every peer's direct candidates
    /// are probed again at once, fast, with a punch request.
    pub fn network_changed(&self, now: Instant) {
        let table = read(&self.table);
        for peer in table.peers.values() {
            lock(&peer.session).path.network_changed(now);
        }
        self.bursting.store(true, Ordering::Relaxed);
    }

    /// The path MTUs the core checks TUN packets against; the driver keeps them current.
    pub fn path_mtus(&self) -> &Arc<PathMtus> {
        &self.pmtu
    }

    /// Replaces the inbound filter rules. With none, no peer may open anything here (replies
    /// to this device's own flows still pass). Flows that no rule allows any more are cut.
    pub fn set_filter(&self, rules: Vec<FilterRule>) {
        self.filter.set_rules(rules);
    }

    /// Replaces the inbound filter rules and the peer sets they (and the candidate rules) name,
    /// under one lock: no packet is judged with new sets and old rules. A rule naming a set
    /// not in `sets` lets nobody in through it.
    pub fn set_filter_with_sets(&self, rules: Vec<FilterRule>, sets: &[PeerSet]) {
        self.filter.set_rules_with_sets(rules, sets);
    }

    /// Replaces the candidate rules (the policy's shadow view; `None`: none). They never let a
    /// packet through; each new flow from a peer is judged against them once and the
    /// would-verdict rides in its flow records.
    pub fn set_shadow_filter(&self, rules: Option<Vec<FilterRule>>) {
        self.filter.set_shadow_rules(rules);
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
        self.filter.take_denied()
    }

    /// Traffic counted for flow records since the last call: per kind of flow (other end, role,
    /// protocol, port, verdict and rule or reason), and how many samples found no room (see
    /// [`ward_shared::filter::Filter::take_samples`]).
    pub fn take_flow_samples(&self) -> (Vec<ward_shared::filter::FlowSample>, u64) {
        self.filter.take_samples()
    }

    pub fn filter_counters(&self) -> FilterCounters {
        self.filter.counters()
    }

    /// Drops idle flows from the filter's table; call now and then (a full table also sweeps
    /// itself).
    pub fn expire_flows(&self, now: Instant) {
        self.filter.expire(now);
    }

    pub fn public_key(&self) -> [u8; 32] {
        read(&self.keys).current.public.to_bytes()
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
        let mut relays = write(&self.relays);
        let mut next = Table::default();
        let mut used: HashSet<u32> = table.by_index.keys().copied().collect();
        for cfg in peers {
            if cfg.public_key == keys.public.to_bytes() {
                tracing::debug!(device_id = cfg.device_id, "peer with our own key ignored");
                continue;
            }
            if let Some(holder) = table.other_holder(&cfg.public_key, cfg.device_id) {
                tracing::warn!(
                    device_id = cfg.device_id,
                    holder,
                    "peer key already held by another device; entry ignored"
                );
                self.counters
                    .peer_key_conflicts
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if next.peers.contains_key(&cfg.public_key) {
                tracing::debug!(device_id = cfg.device_id, "duplicate peer key ignored");
                continue;
            }
            let candidates = sanitize_candidates(&cfg.endpoints);
            let home_relay = cfg.relay.as_deref().and_then(|name| relays.id(name));
            let reuse = table
                .peers
                .get(&cfg.public_key)
                .filter(|old| old.ipv4 == cfg.ipv4 && old.ipv6 == cfg.ipv6)
                .cloned();
            let peer = match reuse {
                Some(peer) => {
                    let mut s = lock(&peer.session);
                    s.device_id = cfg.device_id;
                    s.path.device_id = cfg.device_id;
                    s.hostname = cfg.hostname;
                    s.path.home_relay = home_relay;
                    s.path.set_relay(relays.route(home_relay), now);
                    if s.path.candidates != candidates {
                        s.path.set_candidates(candidates, now);
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
                            path: Path::new(
                                cfg.device_id,
                                candidates,
                                now,
                                self.path_switches.clone(),
                                self.punch_pending.clone(),
                            ),
                            next_probe: now,
                            fast_probe_until: now + FAST_PROBE_PERIOD,
                            mtu_probe: Prober::new(lock(&self.index_rng).gen()),
                        }),
                        dropped_bad_source: AtomicU64::new(0),
                    });
                    let mut s = lock(&peer.session);
                    s.path.home_relay = home_relay;
                    s.path.set_relay(relays.route(home_relay), now);
                    let sent = self.probe(&mut s, now, out);
                    drop(s);
                    self.counters
                        .handshake_initiations_sent
                        .fetch_add(sent, Ordering::Relaxed);
                    peer
                }
            };
            if lock(&peer.session).path.bursting() {
                self.bursting.store(true, Ordering::Relaxed);
            }
            next.insert(peer.clone());
            next.insert_routes(&peer, &cfg.routes, self.v6_prefix);
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
        drop(relays);
        drop(table);
        self.replay_held(now, out);
    }

    /// Starts a batch: holds the peer table's read lock until dropped. Keep batches short
    /// (one syscall's worth of packets): `set_peers` waits for them.
    pub fn batch(&self) -> Batch<'_> {
        Batch::new(self)
    }

    /// One packet read from the TUN. See [`Batch::handle_tun_packet`].
    pub fn handle_tun_packet(&self, packet: &[u8], now: Instant, out: &mut Outbox) {
        self.batch().handle_tun_packet(packet, now, out)
    }

    /// One datagram received from the network or through a relay. See
    /// [`Batch::handle_datagram`].
    #[must_use]
    pub fn handle_datagram(
        &self,
        from: impl Into<Source>,
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
        let mut bursting = false;
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
            if s.path.handle_timers(now) {
                local.direct_probes_sent += direct_probe(&mut s, out);
            }
            mtu_probe(&mut s, &self.pmtu, self.probe_source(), peer.ipv4, now, out);
            bursting |= s.path.bursting();
        }
        self.bursting.store(bursting, Ordering::Relaxed);
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
        if self.on_demand.load(Ordering::Relaxed) {
            local.held_dropped += lock(&self.demand).expire(now);
        }
        local.flush(&self.counters);
        // Apply the send path's outbound records, so they do not wait for the next received
        // packet (a device that only sends).
        self.filter.apply_pending();
    }

    /// Per-peer status, one per device (ordered by device id): the peer entry and link that
    /// carry outbound traffic, with bytes summed over all of the device's entries and links.
    pub fn status(&self) -> Vec<PeerStatus> {
        let table = read(&self.table);
        let relays = read(&self.relays);
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
                let path = match s.path.state() {
                    PathState::Probing => PathStatus::None,
                    PathState::Direct(addr) => PathStatus::Direct(addr),
                    PathState::Relayed(id) => relays
                        .name(id)
                        .map_or(PathStatus::None, |n| PathStatus::Relay(n.to_string())),
                };
                drop(s);
                let mut status = PeerStatus {
                    device_id,
                    endpoint,
                    last_handshake,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    dropped_bad_source: 0,
                    path_mtu: endpoint.and_then(|e| self.pmtu.path_mtu(e.ip())),
                    path,
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
        let mut c = self.counters.snapshot();
        c.path_switches = self.path_switches.load(Ordering::Relaxed);
        c
    }

    /// Replaces the relays this device has a live connection to, each with the largest
    /// WireGuard datagram it carries now. Peers whose home relay is among them send through
    /// it while no direct path works; peers whose relay is gone go back to their direct
    /// endpoint (or probing).
    pub fn set_relays(&self, connected: Vec<(String, u16)>, now: Instant) {
        let table = read(&self.table);
        let mut relays = write(&self.relays);
        relays.set_connected(&connected);
        for peer in table.peers.values() {
            let mut s = lock(&peer.session);
            let route = relays.route(s.path.home_relay);
            s.path.set_relay(route, now);
            if s.path.bursting() {
                self.bursting.store(true, Ordering::Relaxed);
            }
        }
    }

    /// The id of a relay name, if it is connected.
    pub fn relay_id(&self, name: &str) -> Option<RelayId> {
        read(&self.relays).connected_id(name)
    }

    /// The name of a relay id (every id the engine gave out has one).
    pub fn relay_name(&self, id: RelayId) -> Option<Arc<str>> {
        read(&self.relays).name(id).cloned()
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

/// Sends an encrypted keepalive (an empty data message under the session outbound traffic
/// uses) to the peer's endpoint and every candidate: a direct probe while relayed. Without a
/// session there is nothing to send (the handshake probes go to the candidates anyway).
/// Returns the number of datagrams written.
fn direct_probe(s: &mut Session, out: &mut Outbox) -> u64 {
    let Session {
        link,
        previous,
        path,
        ..
    } = s;
    let link = match previous {
        Some(p) if p.outbound && p.link.has_session() => &mut p.link,
        _ => link,
    };
    if !link.has_session() {
        return 0;
    }
    let buf = out.reserve(DATA_OVERHEAD);
    let TunnResult::WriteToNetwork(p) = link.tunn.encapsulate(&[], buf) else {
        return 0;
    };
    let len = p.len();
    let mut targets = path.direct_targets();
    let Some(first) = targets.next() else {
        return 0;
    };
    out.commit(Destination::Udp(first), len);
    let mut n = 1;
    for dst in targets {
        out.repeat_last(Destination::Udp(dst));
        n += 1;
    }
    tracing::trace!(peer = path.device_id, n, "direct probes sent");
    n
}

/// Runs the peer's path-MTU prober while its path is direct and the kernel's MTU to it is
/// known: its probes, encrypted under the session outbound traffic uses, go to the direct
/// address; its result becomes the path's probed ceiling in `pmtu`; its tallies the counters.
fn mtu_probe(
    s: &mut Session,
    pmtu: &PathMtus,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    now: Instant,
    out: &mut Outbox,
) {
    let PathState::Direct(addr) = s.path.state() else {
        return;
    };
    let Some(kernel) = pmtu.kernel_mtu(addr.ip()) else {
        return;
    };
    let Session {
        link,
        previous,
        mtu_probe,
        ..
    } = s;
    let link = match previous {
        Some(p) if p.outbound && p.link.has_session() => &mut p.link,
        _ => link,
    };
    if !link.has_session() {
        return;
    }
    for probe in mtu_probe.handle_timers(now, addr, kernel) {
        let Some(inner) = super::probe::encode_probe(&probe, src, dst, addr.ip()) else {
            continue;
        };
        let buf = out.reserve(inner.len() + DATA_OVERHEAD);
        if let TunnResult::WriteToNetwork(p) = link.tunn.encapsulate(&inner, buf) {
            let len = p.len();
            out.commit(Destination::Udp(addr), len);
        }
    }
    let ceiling = mtu_probe.ceiling();
    if pmtu.probed(addr.ip()) != ceiling {
        pmtu.set_probed(addr.ip(), ceiling);
    }
    let t = std::mem::take(&mut mtu_probe.tally);
    if t != Default::default() {
        pmtu.record_probes(t.sent, t.acked, t.lost);
    }
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
