//! [`Batch`]: the two packet paths. TUN packet → route → encrypt → [`Outbox`]; datagram →
//! decrypt → source check → inbound filter → TUN.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, RwLockReadGuard};
use std::time::Instant;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ward_shared::filter::{DenyReason, Verdict};

use super::counters::LocalCounters;
use super::filter::{FilterGuard, OutboundLog};
use super::icmp::{icmp_prohibited, in_overlay, WindowLimit};
use super::outbox::{Outbox, Source};
use super::peers::{canonical_source, route, Path, Table};
use super::session::{Link, LinkSelector, Slot};
use super::{
    lock, read, Core, DATA_OVERHEAD, HANDSHAKE_INIT_LEN, MSG_COOKIE_REPLY, MSG_HANDSHAKE_INIT,
    PROBE_INTERVAL_FAST,
};

/// A group of packets processed under one read lock of the peer table, made by
/// [`Core::batch`]. Per batch, not per packet: the inbound filter is locked once (at the first
/// decrypted packet, held to the end), the packets sent are handed to the filter once (when the
/// batch ends, before the driver sends its datagrams), the ICMP limiter is locked once, and the
/// counters are merged into the core's once.
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
            if in_overlay(dst, self.core.v6_prefix) {
                let core = self.core;
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
        let mut s = lock(&peer.session);
        let s = &mut *s;
        if !s.path.admit(&self.core.pmtu, packet, now, &mut out.tun) {
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
        let (reply, tunnel) = match link.tunn.decapsulate(Some(addr), datagram, tun_out) {
            TunnResult::WriteToNetwork(p) => {
                let cookie = p.first() == Some(&MSG_COOKIE_REPLY);
                if !cookie {
                    s.path.authenticated_from(from, now);
                    if is_handshake {
                        tracing::debug!(host = %s.hostname, ?slot, "handshake completed");
                        link.established_at = Some(now);
                    }
                }
                out.push(from.reply_to(), p);
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
                let core = self.core;
                let filter = self.filter.get_or_insert_with(|| core.filter.lock());
                // Packets this same batch sent come first (a batch that sends and receives).
                filter.apply(&mut self.outbound);
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

    fn garbage(&mut self, from: Source, why: &'static str) -> Option<usize> {
        tracing::trace!(%from, why, "datagram dropped");
        self.local.dropped_garbage += 1;
        None
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
