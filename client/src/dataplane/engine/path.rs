//! Where a peer is on the underlay, and which path its traffic takes: path selection as a
//! small state machine per peer, driven by the packet paths and [`Path::handle_timers`].
//!
//! ```text
//!               relay usable (set_peers / set_relays)
//!   Probing ───────────────────────────────────────────▶ Relayed(relay)
//!      │   ▲            relay gone: Direct(endpoint) or Probing     │  ▲
//!      │   └────────────────────────────────────────────────────────┘  │
//!      │ authenticated from a direct address                           │ sent in the last
//!      ▼                                                               │ FALLBACK_SENT_WITHIN and
//!   Direct(addr) ◀──── authenticated from a direct address ────────────┘ nothing direct for
//!      (a new source address: Direct(new))                             FALLBACK_SILENCE, relay usable
//! ```
//!
//! - `Probing`: no path answered yet and no relay usable. Data goes to the last endpoint or
//!   the first candidate; handshake initiations to every candidate (today's behaviour for a
//!   peer without a relay, unchanged).
//! - `Relayed(relay)`: data goes through the peer's home relay (while this device has a live
//!   connection to it). Handshake initiations go to every candidate and through the relay.
//!   Every [`DIRECT_PROBE_INTERVAL`] ([`DIRECT_PROBE_INTERVAL_FAST`] for
//!   [`FAST_DIRECT_PERIOD`] after the candidates change), an encrypted keepalive goes to each
//!   direct candidate (the core sends it, this decides when): both sides do it, so NAT
//!   mappings open, and the first that arrives makes the receiver go direct and answer with
//!   a keepalive straight back, which makes the sender go direct even when no data flows.
//! - `Direct(addr)`: every authenticated datagram from a direct address makes the path
//!   `Direct` to that address at once (a NAT rebinding moves it). It falls back to the relay
//!   when this device sent data in the last [`FALLBACK_SENT_WITHIN`] and nothing authenticated
//!   came from the direct address for [`FALLBACK_SILENCE`], or at once when the peer's data
//!   arrives through the relay and nothing came directly for [`FOLLOW_PEER_SILENCE`] (the
//!   peer gave the direct path up; a side that only answers, like a TCP receiver, would
//!   otherwise send its answers into the dead path until the sender's next retransmit).
//!
//! - Coordinated punching: whenever this side starts probing a peer's direct candidates
//!   (the peer starts relayed, its candidates changed, the direct path just failed, every
//!   [`PUNCH_REPROBE_INTERVAL`] while relayed, a local network change) it sends a burst of
//!   [`PUNCH_BURST`] encrypted keepalives [`PUNCH_SPACING`] apart to every candidate and
//!   wants a punch request sent ([`Path::take_punch_request`], at most one per
//!   [`PUNCH_REQUEST_MIN_GAP`]): the coordinator has the peer do the same burst at once
//!   ([`Path::handle_punch`], with the candidates the coordinator knows for us), so both
//!   sides send together and NATs that only let in replies from endpoints they sent to
//!   (endpoint-dependent filtering) open on both sides within a round trip.
//!
//! Path switches never touch the WireGuard session.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::pmtu::PathMtus;
use super::outbox::{Destination, Outbox, RelayId, Source};
use super::DATA_OVERHEAD;

/// If nothing authenticated came from the endpoint for this long, handshake initiations go to
/// the endpoint and every candidate (the path may have died).
const PATH_STALE_AFTER: Duration = Duration::from_secs(15);
/// A direct path is given up for the relay when nothing authenticated came from it for this
/// long while this device was sending…
pub const FALLBACK_SILENCE: Duration = Duration::from_secs(3);
/// …that is, sent data to the peer within this long.
pub const FALLBACK_SENT_WITHIN: Duration = Duration::from_secs(1);
/// A peer that relays to us while nothing came over the direct path for this long has given
/// that path up: this side follows it to the relay at once.
pub const FOLLOW_PEER_SILENCE: Duration = Duration::from_secs(1);
/// Direct probes (keepalives to every candidate) while relayed.
pub const DIRECT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Direct probe interval for a while after the candidates change.
pub const DIRECT_PROBE_INTERVAL_FAST: Duration = Duration::from_secs(1);
/// How long after the candidates change direct probes go at the fast interval.
pub const FAST_DIRECT_PERIOD: Duration = Duration::from_secs(10);
/// Keepalives in one punch burst (several, so one lost datagram does not lose the punch)…
pub const PUNCH_BURST: u8 = 4;
/// …this far apart (the timers run this often while a burst is on: `Core::timer_wait`).
pub const PUNCH_SPACING: Duration = Duration::from_millis(40);
/// A relayed peer's direct candidates are punched (with a request to the peer) this often.
pub const PUNCH_REPROBE_INTERVAL: Duration = Duration::from_secs(30);
/// At most one punch request per peer this often (the coordinator limits too).
pub const PUNCH_REQUEST_MIN_GAP: Duration = Duration::from_secs(2);

/// Which path a peer's traffic takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// No path answered and no relay usable: candidates are probed.
    Probing,
    /// Straight to this address (an authenticated datagram came from it).
    Direct(SocketAddr),
    /// Through this relay (the peer's home relay, connected).
    Relayed(RelayId),
}

/// A relay a peer's traffic can go through now: its home relay, connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RelayRoute {
    pub(super) id: RelayId,
    /// The largest WireGuard datagram it carries.
    pub(super) max_datagram: u16,
}

/// Where a peer is on the underlay and which path its traffic takes.
pub(super) struct Path {
    /// The peer's device id (relays address devices by it).
    pub(super) device_id: u64,
    /// Where the last authenticated direct datagram came from (WireGuard roaming).
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) candidates: Vec<SocketAddr>,
    /// When the last authenticated direct datagram came.
    pub(super) last_rx: Option<Instant>,
    /// The peer's home relay, connected or not (`PeerConfig::relay`).
    pub(super) home_relay: Option<RelayId>,
    /// The home relay while this device has a live connection to it.
    relay: Option<RelayRoute>,
    state: PathState,
    /// When data (not a keepalive) was last routed to the peer. A `Cell` so that [`route`]
    /// records it through the shared reference the packet paths hold.
    last_tx: Cell<Option<Instant>>,
    next_direct_probe: Instant,
    fast_direct_until: Instant,
    /// The next coordinated re-probe while relayed.
    next_reprobe: Instant,
    /// A punch request for the peer is wanted (taken by [`Path::take_punch_request`]).
    punch_wanted: bool,
    last_punch_request: Option<Instant>,
    /// Keepalives left in the current punch burst, and when the next goes.
    burst_left: u8,
    burst_next: Instant,
    /// Candidates the peer's punch named that the netmap does not list (yet); probed during
    /// the burst only.
    punch_extra: Vec<SocketAddr>,
    /// The core's path-switch counter.
    switches: Arc<AtomicU64>,
    /// The core's "some peer wants a punch request" flag (so taking them is free when none
    /// does).
    punch_pending: Arc<AtomicBool>,
}

impl Path {
    pub(super) fn new(
        device_id: u64,
        candidates: Vec<SocketAddr>,
        now: Instant,
        switches: Arc<AtomicU64>,
        punch_pending: Arc<AtomicBool>,
    ) -> Path {
        Path {
            device_id,
            endpoint: None,
            candidates,
            last_rx: None,
            home_relay: None,
            relay: None,
            state: PathState::Probing,
            last_tx: Cell::new(None),
            next_direct_probe: now,
            fast_direct_until: now + FAST_DIRECT_PERIOD,
            next_reprobe: now + PUNCH_REPROBE_INTERVAL,
            punch_wanted: false,
            last_punch_request: None,
            burst_left: 0,
            burst_next: now,
            punch_extra: Vec::new(),
            switches,
            punch_pending,
        }
    }

    pub(super) fn state(&self) -> PathState {
        self.state
    }

    /// An authenticated datagram (handshake, data or keepalive) came from `from`. Returns
    /// whether it moved a relayed path to direct: the caller then answers with a keepalive
    /// straight back, so the peer (whose probe this was) goes direct too even when no data
    /// flows this way.
    pub(super) fn authenticated_from(&mut self, from: impl Into<Source>, now: Instant) -> bool {
        match from.into() {
            Source::Udp(addr) => {
                if self.endpoint != Some(addr) {
                    tracing::debug!(endpoint = %addr, "peer endpoint changed");
                    self.endpoint = Some(addr);
                }
                self.last_rx = Some(now);
                let was_relayed = matches!(self.state, PathState::Relayed(_));
                self.switch(PathState::Direct(addr));
                was_relayed
            }
            Source::Relay { .. } => {
                // Relayed traffic does not move a live direct path: the peer may simply not
                // have switched yet. But when the direct path has been silent for a while,
                // the peer relaying to us says it gave that path up: follow at once instead
                // of waiting to be silent for the full fallback time ourselves (a receiver
                // that only answers would otherwise wait for the sender's next retransmit).
                let (PathState::Direct(addr), Some(r)) = (self.state, self.relay) else {
                    return false;
                };
                let stale = self
                    .last_rx
                    .is_none_or(|t| now.saturating_duration_since(t) >= FOLLOW_PEER_SILENCE);
                if stale {
                    tracing::debug!(peer = self.device_id, %addr, relay = %r.id, "peer relays and the direct path is silent: following it to the relay");
                    self.switch(PathState::Relayed(r.id));
                    self.next_direct_probe = now + DIRECT_PROBE_INTERVAL;
                    self.start_punch(now);
                }
                false
            }
        }
    }

    /// The candidate endpoints changed: direct probes go at the fast rate for a while.
    pub(super) fn set_candidates(&mut self, candidates: Vec<SocketAddr>, now: Instant) {
        if self.candidates != candidates {
            self.candidates = candidates;
            self.next_direct_probe = now;
            self.fast_direct_until = now + FAST_DIRECT_PERIOD;
            if !matches!(self.state, PathState::Direct(_)) {
                self.start_punch(now);
            }
        }
    }

    /// This device's network changed (its interface addresses): whatever path the peer is on
    /// may be dead, so its candidates are probed fast again, with a punch.
    pub(super) fn network_changed(&mut self, now: Instant) {
        self.next_direct_probe = now;
        self.fast_direct_until = now + FAST_DIRECT_PERIOD;
        self.start_punch(now);
    }

    /// The peer asked (through the coordinator) to be punched: a burst to its candidates and
    /// to `endpoints` (its candidates as the coordinator knows them; already sanitized) starts
    /// now. No request goes back: the peer is already probing.
    pub(super) fn handle_punch(&mut self, endpoints: Vec<SocketAddr>, now: Instant) {
        self.punch_extra = endpoints
            .into_iter()
            .filter(|e| !self.candidates.contains(e) && Some(*e) != self.endpoint)
            .collect();
        self.burst_left = PUNCH_BURST;
        self.burst_next = now;
    }

    /// Whether a punch request for this peer should go to the coordinator now (once per
    /// wish, at most once per [`PUNCH_REQUEST_MIN_GAP`]).
    pub(super) fn take_punch_request(&mut self, now: Instant) -> bool {
        if !std::mem::take(&mut self.punch_wanted) {
            return false;
        }
        if self
            .last_punch_request
            .is_some_and(|t| now.saturating_duration_since(t) < PUNCH_REQUEST_MIN_GAP)
        {
            return false;
        }
        self.last_punch_request = Some(now);
        true
    }

    /// Whether a punch burst is under way (the timers must run at [`PUNCH_SPACING`]).
    pub(super) fn bursting(&self) -> bool {
        self.burst_left > 0
    }

    /// Whether the next keepalive of a punch burst is due now (and counts it as sent).
    pub(super) fn burst_due(&mut self, now: Instant) -> bool {
        if self.burst_left == 0 || now < self.burst_next {
            return false;
        }
        self.burst_left -= 1;
        self.burst_next = now + PUNCH_SPACING;
        true
    }

    /// The relay the peer's traffic may go through (its home relay, if this device is
    /// connected to it), after `set_peers` or `set_relays`.
    pub(super) fn set_relay(&mut self, relay: Option<RelayRoute>, now: Instant) {
        self.relay = relay;
        match (self.state, relay) {
            (PathState::Probing, Some(r)) => {
                // Start on the relay at once; punch the direct candidates now.
                self.state = PathState::Relayed(r.id);
                self.next_direct_probe = self.next_direct_probe.min(now);
                self.start_punch(now);
            }
            (PathState::Relayed(old), Some(r)) if old != r.id => {
                self.switch(PathState::Relayed(r.id));
            }
            (PathState::Relayed(_), None) => {
                let next = self.endpoint.map_or(PathState::Probing, PathState::Direct);
                self.switch(next);
            }
            (PathState::Relayed(_) | PathState::Direct(_) | PathState::Probing, _) => {}
        }
    }

    /// Timer-driven transitions; returns whether direct probes (an encrypted keepalive to
    /// every candidate) are due now: periodic ones while relayed, or a punch burst's.
    #[must_use]
    pub(super) fn handle_timers(&mut self, now: Instant) -> bool {
        let periodic = self.periodic_timers(now);
        let burst = self.burst_due(now);
        if self.burst_left == 0 {
            self.punch_extra.clear();
        }
        periodic || burst
    }

    fn periodic_timers(&mut self, now: Instant) -> bool {
        match (self.state, self.relay) {
            (PathState::Direct(addr), Some(r)) => {
                let sending = self
                    .last_tx
                    .get()
                    .is_some_and(|t| now.saturating_duration_since(t) < FALLBACK_SENT_WITHIN);
                let silent = self
                    .last_rx
                    .is_none_or(|t| now.saturating_duration_since(t) >= FALLBACK_SILENCE);
                if sending && silent {
                    tracing::debug!(peer = self.device_id, %addr, relay = %r.id, "direct path silent: falling back to the relay");
                    self.switch(PathState::Relayed(r.id));
                    self.next_direct_probe = now + DIRECT_PROBE_INTERVAL;
                    self.start_punch(now);
                }
                false
            }
            (PathState::Relayed(_), Some(_)) => {
                if self.direct_targets().next().is_none() {
                    return false;
                }
                if now >= self.next_reprobe {
                    tracing::debug!(
                        peer = self.device_id,
                        "relayed: coordinated re-probe of the direct candidates"
                    );
                    self.start_punch(now);
                }
                if now < self.next_direct_probe {
                    return false;
                }
                let interval = if now < self.fast_direct_until {
                    DIRECT_PROBE_INTERVAL_FAST
                } else {
                    DIRECT_PROBE_INTERVAL
                };
                self.next_direct_probe = now + interval;
                true
            }
            (PathState::Probing | PathState::Direct(_) | PathState::Relayed(_), _) => false,
        }
    }

    /// Where data goes now: the direct address, the relay, or (probing) the last endpoint or
    /// first candidate.
    pub(super) fn data_destination(&self) -> Option<Destination> {
        match (self.state, self.relay) {
            (PathState::Direct(addr), _) => Some(Destination::Udp(addr)),
            (PathState::Relayed(_) | PathState::Probing, Some(r)) => Some(Destination::Relay {
                relay: r.id,
                to: self.device_id,
            }),
            (PathState::Relayed(_) | PathState::Probing, None) => self
                .endpoint
                .or_else(|| self.candidates.first().copied())
                .map(Destination::Udp),
        }
    }

    /// Whether `packet` (read from the TUN) fits the path its data takes once encrypted; if
    /// not, it is dropped, counted, and an ICMP too-big may be in `tun` (see `pmtu`).
    pub(super) fn admit(
        &self,
        pmtu: &PathMtus,
        packet: &[u8],
        now: Instant,
        tun: &mut Vec<Vec<u8>>,
    ) -> bool {
        match self.data_destination() {
            Some(Destination::Relay { .. }) => {
                let max = self.relay.map_or(u16::MAX, |r| r.max_datagram);
                pmtu.admit_relayed(packet, max, now, tun)
            }
            Some(Destination::Udp(a)) => pmtu.admit(packet, Some(a), now, tun),
            None => pmtu.admit(packet, None, now, tun),
        }
    }

    /// Where direct probes go: the endpoint, every candidate, and during a punch burst the
    /// candidates the peer's punch named.
    pub(super) fn direct_targets(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoint.into_iter().chain(
            self.candidates
                .iter()
                .chain(&self.punch_extra)
                .copied()
                .filter(|c| Some(*c) != self.endpoint),
        )
    }

    /// Starts a punch: a burst now, a request to the peer (if there is anywhere to punch),
    /// and the next coordinated re-probe a full interval away.
    fn start_punch(&mut self, now: Instant) {
        self.burst_left = PUNCH_BURST;
        self.burst_next = now;
        self.next_reprobe = now + PUNCH_REPROBE_INTERVAL;
        if self.direct_targets().next().is_some() {
            self.punch_wanted = true;
            self.punch_pending.store(true, Ordering::Relaxed);
        }
    }

    fn switch(&mut self, next: PathState) {
        if self.state == next {
            return;
        }
        let prev = std::mem::replace(&mut self.state, next);
        if prev != PathState::Probing {
            self.switches.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(peer = self.device_id, ?prev, ?next, "path switched");
    }
}

/// Commits the datagram of `len` bytes at the reserved position of `out` to where the peer's
/// data goes (see [`Path::data_destination`]). Handshake initiations also go to every
/// candidate when the direct path is unknown or stale, and through the relay unless the
/// direct path is fresh. Returns how many datagrams were written.
pub(super) fn route(path: &Path, out: &mut Outbox, len: usize, is_init: bool, now: Instant) -> u64 {
    let fresh = path
        .last_rx
        .is_some_and(|t| now.saturating_duration_since(t) < PATH_STALE_AFTER);
    let direct_fresh = fresh && matches!(path.state, PathState::Direct(_));
    if !is_init || (direct_fresh && path.endpoint.is_some()) {
        let Some(dst) = path.data_destination() else {
            return 0;
        };
        if !is_init && len > DATA_OVERHEAD {
            path.last_tx.set(Some(now));
        }
        out.commit(dst, len);
        return 1;
    }
    let relay = path.relay.map(|r| Destination::Relay {
        relay: r.id,
        to: path.device_id,
    });
    let mut targets = path.direct_targets().map(Destination::Udp).chain(relay);
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
