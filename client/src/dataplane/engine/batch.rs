//! [`Batch`]: the two packet paths. TUN packet → route → encrypt → [`Outbox`]; datagram →
//! decrypt → source check → inbound filter → TUN.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard};
use std::time::Instant;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ward_shared::filter::{DenyReason, LocalPrefixes, Verdict};
use ward_shared::flows::DenyCause;

use super::super::probe::{self, Msg, MIN_PROBED_MTU};
use super::counters::LocalCounters;
use super::demand::Hold;
use super::filter::{FilterGuard, OutboundLog};
use super::icmp::{icmp_prohibited, in_overlay, WindowLimit};
use super::outbox::{Outbox, Source};
use super::peers::{canonical_source, route, Path, Peer, Table};
use super::session::{Link, LinkSelector, Session, Slot};
use super::{
    lock, read, Core, DATA_OVERHEAD, HANDSHAKE_INIT_LEN, MSG_COOKIE_REPLY, MSG_HANDSHAKE_INIT,
    PROBE_INTERVAL_FAST,
};

/// Inner packets longer than this do not fit a [`MIN_PROBED_MTU`] path over IPv6: sending
/// them and hearing nothing back suggests a path-MTU black hole (see `probe`).
const BIG_INNER: usize = MIN_PROBED_MTU as usize - 80;

/// A group of packets processed under one read lock of the peer table, made by
/// [`Core::batch`]. Per batch, not per packet: the inbound filter is locked once (at the first
/// datagram from a known peer, held to the end), the packets sent are handed to the filter
/// once (when the batch ends, before the driver sends its datagrams), the ICMP limiter is locked
/// once, and the counters are merged into the core's once. Per run of packets for one peer: its
/// session lock, when the packets go through [`Batch::runs`] (the driver's way); the per-packet
/// methods here lock it once per packet.
///
/// Do not call the [`Core`]'s other methods on a thread while it holds a batch: `set_peers`
/// and `rotate_key` wait for the table lock, the filter calls for the filter lock.
pub struct Batch<'a> {
    core: &'a Core,
    table: RwLockReadGuard<'a, Table>,
    local: LocalCounters,
    /// The inbound filter, locked at the first decrypted packet for the rest of the batch.
    filter: Option<FilterGuard<'a>>,
    /// Packets this batch sent, for the filter's flow table.
    outbound: OutboundLog,
    /// The ICMP "prohibited" limiter, locked at the first packet without a route.
    icmp_limit: Option<MutexGuard<'a, WindowLimit>>,
}

impl<'a> Batch<'a> {
    pub(super) fn new(core: &'a Core) -> Batch<'a> {
        Batch {
            core,
            table: read(&core.table),
            local: LocalCounters::default(),
            filter: None,
            outbound: OutboundLog::default(),
            icmp_limit: None,
        }
    }

    /// A cursor over this batch's packets that keeps the session of the last peer it handled
    /// locked until a packet for another peer comes, a lock it needs that ranks before sessions
    /// (the key ring for a handshake initiation, the filter, the ICMP limiter),
    /// [`Runs::release`], or its drop. So a run of consecutive packets for one peer (a bulk
    /// stream: the whole batch) takes that peer's session lock once, whichever path it is on.
    /// The other path's thread waits for the run to end, so release it before blocking I/O.
    pub fn runs(&mut self) -> Runs<'_, 'a> {
        Runs {
            core: self.core,
            table: &self.table,
            local: &mut self.local,
            filter: &mut self.filter,
            outbound: &mut self.outbound,
            icmp_limit: &mut self.icmp_limit,
            held: None,
        }
    }

    /// One IP packet read from the TUN, as a run of one; see [`Runs::handle_tun_packet`].
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant, out: &mut Outbox) {
        self.runs().handle_tun_packet(packet, now, out)
    }

    /// One datagram (UDP or relayed), as a run of one; see [`Runs::handle_datagram`].
    #[must_use]
    pub fn handle_datagram(
        &mut self,
        from: impl Into<Source>,
        datagram: &[u8],
        now: Instant,
        coordinator_now_ms: i64,
        tun_out: &mut [u8],
        out: &mut Outbox,
    ) -> Option<usize> {
        self.runs()
            .handle_datagram(from, datagram, now, coordinator_now_ms, tun_out, out)
    }
}

/// The packets of a [`Batch`], handled in runs: made by [`Batch::runs`]; while it lives, it
/// holds the session lock of the last peer a packet went to or came from.
pub struct Runs<'b, 'a> {
    core: &'a Core,
    table: &'b Table,
    local: &'b mut LocalCounters,
    filter: &'b mut Option<FilterGuard<'a>>,
    outbound: &'b mut OutboundLog,
    icmp_limit: &'b mut Option<MutexGuard<'a, WindowLimit>>,
    /// The session of the current run's peer, locked.
    held: Option<Held<'b>>,
}

/// A peer's session, locked for a run of its packets.
struct Held<'b> {
    peer: &'b Peer,
    session: MutexGuard<'b, Session>,
}

impl<'b> Runs<'b, '_> {
    /// One IP packet read from the TUN: route it by destination to the peer that owns the
    /// address, encrypt it, and write the datagram (or, with no session yet, a handshake
    /// initiation to the candidates) to `out`, and record its flow in the filter so replies
    /// pass. Packets with no owner are dropped and counted; if the destination is inside the
    /// overlay, an ICMP "administratively prohibited" goes back to the TUN (rate-limited) so the
    /// application fails fast. With peers on demand ([`Core::set_on_demand`]), a packet to an
    /// overlay address without a peer is held and its peer wanted instead (unless the
    /// coordinator refused it a moment ago).
    pub fn handle_tun_packet(&mut self, packet: &[u8], now: Instant, out: &mut Outbox) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.local.dropped_bad_tun_packet += 1;
            return;
        };
        if let Some(local) = self.core.local.get() {
            let src = LocalPrefixes::packet_addr(packet, false);
            if !src.is_some_and(|s| local.contains(s) || self.core.is_routed(s)) {
                tracing::trace!(%dst, "source is not this device's address");
                self.local.dropped_wrong_source += 1;
                return;
            }
        }
        let Some(peer) = self.route(dst) else {
            let overlay = in_overlay(dst, self.core.v6_prefix);
            if overlay && self.core.on_demand.load(Ordering::Relaxed) {
                // The demand lock is a leaf: the held session may stay locked.
                let hold = lock(&self.core.demand).hold_packet(dst, packet, now);
                if self.held_for_peer(hold, dst) {
                    return;
                }
            }
            tracing::trace!(%dst, "no peer owns destination");
            self.local.dropped_no_route += 1;
            if overlay {
                self.outbound
                    .record_dropped(packet, now, DenyCause::NoLease);
                let core = self.core;
                if self.icmp_limit.is_none() {
                    // Lock order: the ICMP limiter before any session.
                    self.release();
                }
                let limit = self
                    .icmp_limit
                    .get_or_insert_with(|| lock(&core.unreachable_limit));
                if limit.allow(now) {
                    if let Some(reply) = icmp_prohibited(packet) {
                        out.tun.push(reply);
                        self.local.icmp_unreachable_sent += 1;
                    }
                }
            }
            return;
        };
        self.outbound.record(packet, now);
        let s = hold(&mut self.held, peer);
        if !s.path.admit(&self.core.pmtu, packet, now, &mut out.tun) {
            return; // too big for the path: dropped, ICMP too-big queued for the TUN
        }
        if packet.len() > BIG_INNER {
            s.mtu_probe.note_big_sent(now);
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
    ///
    /// `from` may also be a device through a relay ([`Source::Relay`]): the same checks apply,
    /// and replies go back through that relay.
    #[must_use]
    pub fn handle_datagram(
        &mut self,
        from: impl Into<Source>,
        datagram: &[u8],
        now: Instant,
        coordinator_now_ms: i64,
        tun_out: &mut [u8],
        out: &mut Outbox,
    ) -> Option<usize> {
        let from = canonical_source(from.into());
        // What WireGuard binds handshake cookies to (see `Source::cookie_addr`).
        let addr = from.cookie_addr();
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            return self.garbage(from, "unparseable");
        };
        if tun_out.len() < datagram.len() {
            return self.garbage(from, "datagram larger than output buffer");
        }
        let table = self.table;
        let (peer, to) = match &packet {
            Packet::HandshakeInit(init) => {
                // Lock order: the key ring before any session.
                self.release();
                let ring = read(&self.core.keys).clone();
                let mut cookie = [0u8; 64];
                let mut matched = None;
                // mac1 is keyed by the receiver's public key: it tells which local key the
                // initiation is for.
                for keys in ring.iter() {
                    match keys
                        .limiter
                        .verify_packet(Some(addr), datagram, &mut cookie)
                    {
                        Ok(_) => {
                            matched = Some(keys);
                            break;
                        }
                        Err(TunnResult::WriteToNetwork(reply)) => {
                            // Under load: answer a mac1-valid initiation with a cookie only.
                            out.push(from.reply_to(), reply);
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
                let peer = table.peers.get(&half.peer_static_public);
                if peer.is_none() && self.core.on_demand.load(Ordering::Relaxed) {
                    let key = half.peer_static_public;
                    let hold = lock(&self.core.demand).hold_init(key, from, datagram, now);
                    return match hold {
                        Hold::Held { dropped, wanted } => {
                            tracing::trace!(%from, wanted, "initiation from an unknown key held");
                            self.local.held_for_peer += 1;
                            self.local.held_dropped += dropped;
                            self.wanted(wanted);
                            None
                        }
                        Hold::Full { dropped } => {
                            self.local.held_dropped += dropped;
                            self.garbage(from, "unknown peer (too many held)")
                        }
                        Hold::Refused => self.garbage(from, "unknown peer (refused)"),
                    };
                }
                (peer, to)
            }
            Packet::HandshakeResponse(p) => (
                table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
            Packet::PacketCookieReply(p) => (
                table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
            Packet::PacketData(p) => (
                table.by_index.get(&(p.receiver_idx >> 8)),
                LinkSelector::Index(p.receiver_idx >> 8),
            ),
        };
        let Some(peer) = peer else {
            return self.garbage(from, "unknown peer");
        };
        let (table, v6) = (self.table, self.core.v6_prefix);
        let is_handshake = matches!(
            packet,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        );
        let authenticated_if_ok = !matches!(packet, Packet::PacketCookieReply(_));
        if self.filter.is_none() {
            // Lock order: the filter before any session. Locked here rather than at the first
            // decrypted packet, so that the run of the peer's packets keeps its session locked.
            self.release();
            let core = self.core;
            *self.filter = Some(core.filter.lock());
        }
        let s = hold(&mut self.held, peer);
        let Some(slot) = s.select(&to) else {
            return self.garbage(from, "no link for this key or index (retired)");
        };
        let link = match (slot, &mut s.previous) {
            (Slot::Previous, Some(p)) => &mut p.link,
            _ => &mut s.link,
        };
        let mut went_direct = false;
        let (reply, tunnel) = match link.tunn.decapsulate(Some(addr), datagram, tun_out) {
            TunnResult::WriteToNetwork(p) => {
                let cookie = p.first() == Some(&MSG_COOKIE_REPLY);
                if !cookie {
                    // The reply itself goes straight back: no extra keepalive needed.
                    let _ = s.path.authenticated_from(from, now);
                    if is_handshake {
                        tracing::debug!(host = %s.hostname, ?slot, "handshake completed");
                        link.established_at = Some(now);
                    }
                }
                out.push(from.reply_to(), p);
                (true, None)
            }
            TunnResult::WriteToTunnelV4(p, src) => {
                went_direct = s.path.authenticated_from(from, now);
                if probe::is_probe_packet(p) {
                    // A path-MTU probe or acknowledgement: for the engine, never the TUN or
                    // the filter.
                    match probe::parse(p) {
                        Some(Msg::Probe(pr)) => {
                            // From the address the probe was sent to (this device's).
                            let ack = probe::encode_ack(&pr, probe::destination(p), peer.ipv4);
                            let buf = out.reserve(ack.len() + DATA_OVERHEAD);
                            if let TunnResult::WriteToNetwork(r) = link.tunn.encapsulate(&ack, buf)
                            {
                                let len = r.len();
                                out.commit(from.reply_to(), len);
                            }
                        }
                        Some(Msg::Ack(ack)) => s.mtu_probe.handle_ack(ack, now),
                        None => tracing::trace!(%from, "unknown probe message ignored"),
                    }
                    (false, None)
                } else {
                    s.mtu_probe.note_received();
                    let n = p.len();
                    let ok = src == peer.ipv4 || table.may_send_from(peer, src.into(), v6);
                    (false, Some(if ok { Ok(n) } else { Err(n) }))
                }
            }
            TunnResult::WriteToTunnelV6(p, src) => {
                went_direct = s.path.authenticated_from(from, now);
                s.mtu_probe.note_received();
                let n = p.len();
                let ok = src == peer.ipv6 || table.may_send_from(peer, src.into(), v6);
                (false, Some(if ok { Ok(n) } else { Err(n) }))
            }
            TunnResult::Done => {
                // A keepalive (authenticated) or a cookie reply (not).
                if authenticated_if_ok {
                    went_direct = s.path.authenticated_from(from, now);
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
            flush_queue(self.local, link, &s.path, now, out);
        }
        if went_direct {
            // The peer's direct probe got through: answer it straight back, so the peer goes
            // direct too even if nothing else flows this way.
            let buf = out.reserve(DATA_OVERHEAD);
            if let TunnResult::WriteToNetwork(p) = link.tunn.encapsulate(&[], buf) {
                let len = p.len();
                out.commit(from.reply_to(), len);
                self.local.direct_probes_sent += 1;
            }
        }
        if slot == Slot::Current && authenticated_if_ok {
            s.promote_if_ready(now);
        }
        match tunnel {
            None => None,
            Some(Ok(n)) => {
                let core = self.core;
                // Already locked (above, before the session).
                let filter = self.filter.get_or_insert_with(|| core.filter.lock());
                if let Some(local) = core.local.get() {
                    let dst = LocalPrefixes::packet_addr(&tun_out[..n], true);
                    if !dst.is_some_and(|d| local.contains(d) || core.is_routed(d)) {
                        tracing::trace!(%from, ?dst, "destination is not this device's address");
                        self.local.dropped_wrong_destination += 1;
                        filter.note_dropped(&tun_out[..n], None, DenyCause::WrongDestination);
                        return None;
                    }
                }
                // Packets this same batch sent come first (a batch that sends and receives).
                filter.apply(self.outbound);
                let verdict = filter.check_inbound(&tun_out[..n], now, coordinator_now_ms);
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
                            | DenyReason::TableFull
                            | DenyReason::PeerQuota => self.local.dropped_filter_other += 1,
                        }
                        return None;
                    }
                }
                self.local.rx_packets += 1;
                self.local.rx_bytes += n as u64;
                Some(n)
            }
            Some(Err(n)) => {
                tracing::trace!(%from, "inner source is not the peer's address");
                peer.dropped_bad_source.fetch_add(1, Ordering::Relaxed);
                self.local.dropped_bad_source += 1;
                let core = self.core;
                let filter = self.filter.get_or_insert_with(|| core.filter.lock());
                let own = if tun_out.first().is_some_and(|b| b >> 4 == 6) {
                    IpAddr::V6(peer.ipv6)
                } else {
                    IpAddr::V4(peer.ipv4)
                };
                filter.note_dropped(&tun_out[..n], Some(own), DenyCause::SpoofedSource);
                None
            }
        }
    }

    /// Unlocks the held session, if any; the next packet starts a new run. Call before
    /// blocking I/O in the middle of a batch, so the other path is not kept waiting.
    pub fn release(&mut self) {
        self.held = None;
    }

    /// The peer that gets packets for `dst` (see `Table::route`). Locks nothing when one peer
    /// claims the address; ranking several claimants (a rotation) locks each of their sessions
    /// in turn, so the held one is released first.
    fn route(&mut self, dst: IpAddr) -> Option<&'b Arc<Peer>> {
        let table = self.table;
        match table.claimants(dst) {
            [] => None,
            [one] => Some(one),
            _ => {
                self.release();
                table.route(dst)
            }
        }
    }

    /// Tallies what holding a packet for `dst`'s peer did. Returns whether that is the end of
    /// it (held, or dropped because too much is held); after a refusal it is not, and the
    /// packet takes the no-route way (ICMP).
    fn held_for_peer(&mut self, hold: Hold, dst: IpAddr) -> bool {
        match hold {
            Hold::Held { dropped, wanted } => {
                tracing::trace!(%dst, wanted, "no peer owns destination: held, peer wanted");
                self.local.held_for_peer += 1;
                self.local.held_dropped += dropped;
                self.wanted(wanted);
                true
            }
            Hold::Full { dropped } => {
                tracing::trace!(%dst, "no peer owns destination: too many held, dropped");
                self.local.held_dropped += dropped + 1;
                self.local.dropped_no_route += 1;
                true
            }
            Hold::Refused => false,
        }
    }

    /// A want was recorded: the driver learns it after this batch.
    fn wanted(&mut self, wanted: bool) {
        if wanted {
            self.local.peer_wants += 1;
            self.core.wants_pending.store(true, Ordering::Relaxed);
            self.core.want_signal.store(true, Ordering::Relaxed);
        }
    }

    fn garbage(&mut self, from: Source, why: &'static str) -> Option<usize> {
        tracing::trace!(%from, why, "datagram dropped");
        self.local.dropped_garbage += 1;
        None
    }
}

/// `peer`'s session, locked: the held one if it is `peer`'s (the run goes on), else the held
/// one is unlocked first (one session at a time) and `peer`'s locked (a new run).
fn hold<'h, 'b>(held: &'h mut Option<Held<'b>>, peer: &'b Peer) -> &'h mut Session {
    if !held.as_ref().is_some_and(|h| std::ptr::eq(h.peer, peer)) {
        *held = None;
    }
    &mut held
        .get_or_insert_with(|| Held {
            peer,
            session: lock(&peer.session),
        })
        .session
}

/// Sends the packets `link` queued behind a handshake that just completed or was answered.
fn flush_queue(
    local: &mut LocalCounters,
    link: &mut Link,
    path: &Path,
    now: Instant,
    out: &mut Outbox,
) {
    loop {
        // Queued packets came from the TUN, so they are at most 64 KiB.
        let buf = out.reserve(u16::MAX as usize + DATA_OVERHEAD);
        match link.tunn.decapsulate(None, &[], buf) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                let is_init = p.first() == Some(&MSG_HANDSHAKE_INIT);
                if is_init {
                    local.handshake_initiations_sent += route(path, out, len, true, now);
                } else if route(path, out, len, false, now) > 0 {
                    local.tx_packets += 1;
                    local.tx_bytes += len.saturating_sub(DATA_OVERHEAD) as u64;
                }
            }
            _ => return,
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        // Unlock the filter first: handing over may lock it.
        self.filter = None;
        self.core.filter.hand_over(&mut self.outbound);
        self.local.flush(&self.core.counters);
    }
}
