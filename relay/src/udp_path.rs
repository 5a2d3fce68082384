//! The plain-UDP data path's driver: [`crate::udp_bind`] wired to the relay's UDP socket and
//! to the device streams.
//!
//! - A welcomed version-2 connection's `UdpBind` (on its QUIC stream) draws a token and nonce
//!   (`bind_request`); the answer goes back on the stream.
//! - The socket ([`crate::socket::DemuxSocket`]) hands every received datagram whose first byte
//!   is a plain-UDP mark here (`handle_received`, one lock per receive batch): a confirm
//!   binds its source and wakes the connection's task, which sends `UdpBound` on its stream; a
//!   data datagram passes the binding and forwarding checks and leaves in plain UDP (rewritten
//!   in place) to a bound destination, or as a QUIC datagram to one without a binding.
//! - A QUIC datagram routed to a bound destination leaves in plain UDP (`UdpPath::route`,
//!   `send_plain`).
//!
//! Drops are counted ([`UdpCounters`], the binding core's [`BindStats`]) and logged at most
//! once per [`LOG_EVERY`].

use crate::forward::{ConnId, Drop};
use crate::server::{clock, Forwarding, Shared};
use crate::udp_bind::{
    handle_udp, BindStats, Bindings, Dropped, Nonce, Token, UdpOutcome, CONFIRM_MARK, DATA_MARK,
    DATA_PREFIX_LEN, TOKEN_LEN,
};
use bytes::Bytes;
use quinn::udp::Transmit;
use quinn::AsyncUdpSocket;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Drop log lines at most this often (the counters count every one).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether a received datagram belongs to the plain-UDP path (its first byte is a mark no QUIC
/// packet and no discovery datagram starts with).
pub fn is_plain(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(&CONFIRM_MARK) | Some(&DATA_MARK))
}

/// The plain-UDP path's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Data datagrams received in plain UDP and forwarded (either way).
    pub received: u64,
    /// Datagrams sent in plain UDP to a bound destination.
    pub sent: u64,
    /// Plain-UDP sends the socket refused (full, or an error): dropped.
    pub send_failed: u64,
    /// The binding core's counters (confirms bound, drops by reason).
    pub bind: BindStats,
}

/// The plain-UDP state, beside the forwarding core under its lock.
#[derive(Debug, Default)]
pub struct UdpPath {
    pub(crate) bindings: Bindings,
    /// Wakes a connection's task when a confirm bound its address.
    bound: HashMap<ConnId, Arc<Notify>>,
    received: u64,
    sent: u64,
    send_failed: u64,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl UdpPath {
    pub fn counters(&self) -> UdpCounters {
        UdpCounters {
            received: self.received,
            sent: self.sent,
            send_failed: self.send_failed,
            bind: self.bindings.stats(),
        }
    }

    /// The connection ended: its token is void and nothing waits for its confirm.
    pub(crate) fn handle_closed(&mut self, conn: ConnId) {
        self.bindings.handle_closed(conn);
        self.bound.remove(&conn);
    }

    /// Where datagrams for `to` go in plain UDP, with the token they carry.
    pub(crate) fn route(&self, to: ConnId) -> Option<(SocketAddr, Token)> {
        self.bindings.route(to)
    }

    pub(crate) fn count_sent(&mut self, sent: u64, failed: u64) {
        self.sent = self.sent.saturating_add(sent);
        self.send_failed = self.send_failed.saturating_add(failed);
    }

    /// A plain-UDP datagram was dropped: one log line per [`LOG_EVERY`] at most.
    fn log_drop(&mut self, src: SocketAddr, why: &str, now: Instant) {
        self.unlogged = self.unlogged.saturating_add(1);
        if self
            .last_log
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return;
        }
        tracing::info!(%src, reason = why, dropped = self.unlogged, "plain-UDP datagrams dropped (not forwarded)");
        self.last_log = Some(now);
        self.unlogged = 0;
    }
}

/// A welcomed connection asked for a binding: its token and a fresh nonce, and what wakes
/// its task once a confirm bound an address. `None`: the connection did not say version 2
/// (or is gone), which breaks the protocol.
pub(crate) fn bind_request(
    fwd: &mut Forwarding,
    conn: ConnId,
) -> Option<([u8; TOKEN_LEN], [u8; TOKEN_LEN], Arc<Notify>)> {
    if !fwd.core.speaks_udp(conn) {
        return None;
    }
    let now = Instant::now();
    // A fresh token colliding with another connection's is one chance in 2^128: draw again.
    for _ in 0..4 {
        let token = Token(rand::random());
        let nonce = Nonce(rand::random());
        if let Ok((t, n)) = fwd
            .udp
            .bindings
            .handle_bind_request(conn, token, nonce, now)
        {
            let notify = fwd.udp.bound.entry(conn).or_default().clone();
            return Some((t.0, n.0, notify));
        }
    }
    None
}

/// A plain-UDP datagram to send.
struct Out {
    to: SocketAddr,
    /// Index of the segment in the receive batch.
    seg: usize,
}

/// Handles the plain-UDP datagrams of one receive batch: `segments` are `(source, datagram)`,
/// rewritten in place; the ones to send on in plain UDP go out on `socket` from `src_ip`.
pub(crate) fn handle_received(
    shared: &Shared,
    socket: &dyn AsyncUdpSocket,
    src_ip: Option<IpAddr>,
    segments: &mut [(SocketAddr, &mut [u8])],
) {
    let mut out: Vec<Out> = Vec::new();
    let mut quic: Vec<(ConnId, Bytes)> = Vec::new();
    {
        let now = clock();
        let mut g = shared.lock();
        let Forwarding { core, conns, udp } = &mut *g;
        for (i, (src, buf)) in segments.iter_mut().enumerate() {
            match handle_udp(&mut udp.bindings, core, *src, buf, now) {
                UdpOutcome::Bound(conn) => {
                    tracing::debug!(conn = %conn, %src, "plain-UDP address bound");
                    if let Some(n) = udp.bound.get(&conn) {
                        n.notify_one();
                    }
                }
                UdpOutcome::Udp(to) => {
                    udp.received = udp.received.saturating_add(1);
                    out.push(Out { to, seg: i });
                }
                UdpOutcome::Quic(to) => {
                    udp.received = udp.received.saturating_add(1);
                    match conns.get(&to) {
                        Some(_) => quic.push((to, Bytes::copy_from_slice(&buf[DATA_PREFIX_LEN..]))),
                        None => {
                            let body = buf.len().saturating_sub(DATA_PREFIX_LEN + 8);
                            core.handle_undelivered(Drop::UnknownDestination, body);
                        }
                    }
                }
                UdpOutcome::Dropped(Dropped::Binding(d)) => udp.log_drop(*src, d.as_str(), now.at),
                UdpOutcome::Dropped(Dropped::Forwarding(d)) => {
                    udp.log_drop(*src, d.as_str(), now.at)
                }
            }
        }
    }
    let mut failed = 0u64;
    let sent = out.len() as u64;
    for o in &out {
        let Some((_, d)) = segments.get(o.seg) else {
            continue; // o.seg indexes segments by construction
        };
        let t = Transmit {
            destination: o.to,
            ecn: None,
            contents: d,
            segment_size: None,
            src_ip,
        };
        if socket.try_send(&t).is_err() {
            failed += 1;
        }
    }
    let mut undelivered = 0usize;
    if !quic.is_empty() {
        let conns: Vec<_> = {
            let g = shared.lock();
            quic.iter()
                .map(|(to, _)| g.conns.get(to).cloned())
                .collect()
        };
        for (c, (_, d)) in conns.into_iter().zip(quic) {
            let ok = c.is_some_and(|c| c.send_datagram(d).is_ok());
            if !ok {
                undelivered += 1;
            }
        }
    }
    if sent > 0 || failed > 0 || undelivered > 0 {
        let mut g = shared.lock();
        g.udp.count_sent(sent - failed, failed);
        for _ in 0..undelivered {
            g.core.handle_undelivered(Drop::QueueFull, 0);
        }
    }
}

/// Sends QUIC-received datagrams (`source id || WireGuard`) to bound destinations in plain
/// UDP: `DATA || token || source id || WireGuard`. Returns how many the socket refused.
pub(crate) fn send_plain(
    socket: &dyn AsyncUdpSocket,
    datagrams: &[(SocketAddr, Token, Bytes)],
) -> u64 {
    let mut failed = 0;
    let mut buf = Vec::with_capacity(2048);
    for (to, token, d) in datagrams {
        buf.clear();
        buf.push(DATA_MARK);
        buf.extend_from_slice(&token.0);
        buf.extend_from_slice(d);
        let t = Transmit {
            destination: *to,
            ecn: None,
            contents: &buf,
            segment_size: None,
            src_ip: None,
        };
        if socket.try_send(&t).is_err() {
            failed += 1;
        }
    }
    failed
}
