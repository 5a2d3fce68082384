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
    let sent = out.len() as u64;
    let mut runs = GsoRuns::new(socket, src_ip);
    for o in &out {
        if let Some((_, d)) = segments.get(o.seg) {
            runs.push(o.to, &[d]); // o.seg indexes segments by construction
        }
    }
    let failed = runs.finish();
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
    let mut runs = GsoRuns::new(socket, None);
    for (to, token, d) in datagrams {
        runs.push(*to, &[&[DATA_MARK], &token.0, d]);
    }
    runs.finish()
}

/// Largest UDP payload one GSO message carries (the kernel's limit is 64 KiB less headers).
const MAX_GSO_BYTES: usize = 65_000;

/// Plain-UDP sends gathered into UDP GSO messages: consecutive datagrams to one destination
/// and of one size (a shorter last one ends the run) leave in one `sendmsg`, which the kernel
/// splits, where a datagram each would cost a system call each. Datagrams keep their order.
struct GsoRuns<'a> {
    socket: &'a dyn AsyncUdpSocket,
    src_ip: Option<IpAddr>,
    max_segments: usize,
    buf: Vec<u8>,
    /// The open run: destination, segment size, segments.
    run: Option<(SocketAddr, usize, usize)>,
    failed: u64,
}

impl<'a> GsoRuns<'a> {
    fn new(socket: &'a dyn AsyncUdpSocket, src_ip: Option<IpAddr>) -> Self {
        GsoRuns {
            socket,
            src_ip,
            max_segments: socket.max_transmit_segments().max(1),
            buf: Vec::new(),
            run: None,
            failed: 0,
        }
    }

    /// Adds one datagram, the concatenation of `parts`.
    fn push(&mut self, to: SocketAddr, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let joins = self.run.is_some_and(|(dest, seg, n)| {
            dest == to
                && len <= seg
                && n < self.max_segments
                && self.buf.len() + len <= MAX_GSO_BYTES
        });
        if !joins {
            self.flush();
            self.run = Some((to, len, 0));
        }
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        if let Some((_, seg, n)) = &mut self.run {
            *n += 1;
            if len < *seg {
                self.flush(); // a shorter segment can only be a run's last
            }
        }
    }

    fn flush(&mut self) {
        let Some((destination, seg, n)) = self.run.take() else {
            return;
        };
        let t = Transmit {
            destination,
            ecn: None,
            contents: &self.buf,
            segment_size: (n > 1).then_some(seg),
            src_ip: self.src_ip,
        };
        if self.socket.try_send(&t).is_err() {
            self.failed += n as u64;
        }
        self.buf.clear();
    }

    /// Sends what is gathered; returns how many datagrams the socket refused.
    fn finish(mut self) -> u64 {
        self.flush();
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::Runtime;

    /// Datagrams of one size to one destination share a GSO message; a change of destination
    /// or size, or a shorter datagram, ends the run; every datagram arrives whole and in order.
    #[tokio::test]
    async fn gso_runs_keep_every_datagram_whole_and_in_order() {
        let send = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let socket = quinn::TokioRuntime
            .wrap_udp_socket(send)
            .expect("wrap the socket");
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind b");
        let (to_a, to_b) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        let datagram = |i: u8, len: usize| -> Vec<u8> { (0..len).map(|k| i ^ k as u8).collect() };
        let plan: Vec<(SocketAddr, Vec<u8>)> = vec![
            (to_a, datagram(1, 1200)),
            (to_a, datagram(2, 1200)),
            (to_a, datagram(3, 1200)),
            (to_a, datagram(4, 300)),
            (to_a, datagram(5, 1200)),
            (to_b, datagram(6, 1200)),
            (to_b, datagram(7, 1300)),
            (to_a, datagram(8, 1200)),
        ];
        // Sends try once and never wait: the socket must be known writable first.
        let mut poller = socket.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
            .await
            .expect("writable");
        let mut runs = GsoRuns::new(socket.as_ref(), None);
        for (to, d) in &plan {
            runs.push(*to, &[&d[..1], &d[1..]]);
        }
        assert_eq!(runs.finish(), 0, "no send refused");
        for (sock, addr) in [(&a, to_a), (&b, to_b)] {
            sock.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            for (_, want) in plan.iter().filter(|(to, _)| *to == addr) {
                let n = sock.recv(&mut buf).expect("every datagram arrives");
                assert_eq!(&buf[..n], &want[..], "whole and in order");
            }
        }
    }
}
