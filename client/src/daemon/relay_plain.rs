//! A relay link's plain-UDP data path, the I/O side of [`crate::agent::relay_udp`]: one UDP
//! socket per QUIC relay link (never for a TLS/TCP link), connected to the relay's address
//! (same address family), and the thread that reads it.
//!
//! - The link task ([`super::relays`]) drives [`PlainUdp`](crate::agent::relay_udp::PlainUdp):
//!   `UdpBind` on the stream, the confirm datagrams on this socket ([`PlainLink::send_confirm`]),
//!   and it publishes the bound token here ([`PlainLink::set_bound`]), or clears it when a
//!   refresh goes unanswered (relayed sends then go as QUIC datagrams again).
//! - Send ([`PlainLink::send`], from the pump): while bound, the relayed datagrams of one
//!   batch go as `DATA || token || framed datagram`, written into one reused buffer, runs of
//!   equal size as one UDP GSO message (the kernel splits it), so nothing is allocated per
//!   datagram. Sizes are the QUIC link's: a plain datagram carries 17 bytes of prefix where
//!   QUIC needs more, so whatever fits the link's datagram limit fits here.
//! - Receive (the `ward-relay-udp` thread, [`PlainLink::start_receiver`]): `recvmmsg` with UDP
//!   GRO, every datagram checked (from the relay's address, a data datagram, this link's
//!   token, a well-formed relay header) and the rest handed to the data plane's relayed
//!   receive path: copied into one buffer per receive batch and moved to the `ward-relay-rx`
//!   thread ([`Inbound`]: decrypt, TUN writes coalesced per flow) as QUIC batches are, so
//!   reading and decrypting run on two cores; without that thread, [`RelaySink::relayed_batch`]
//!   here. Anything else is counted and logged at most once per [`LOG_EVERY`]; the token is
//!   never logged.

use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tracing::{debug, info, trace};
use ward_shared::relay::UDP_BIND_LEN;

use super::relay_batch::Inbound;
use super::{PumpCounters, RelaySink};
use crate::agent::relay_udp::{frame_data, parse_data, PlainDrop, DATA_PREFIX_LEN};

/// Drop log lines at most this often (the counters count every one).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Receive buffers per `recvmmsg`.
const RX_BUFS: usize = 8;
/// Bytes per receive buffer: room for a GRO batch of full-size datagrams.
const RX_BUF: usize = 64 * 1024;
/// Largest UDP payload the kernel takes in one GSO message.
const MAX_GSO_BYTES: usize = 65_000;
/// How often the receive thread looks whether its link ended.
const STOP_POLL_MS: libc::c_int = 200;

/// The plain-UDP path's counters, over all links.
#[derive(Debug, Default)]
pub(in crate::daemon) struct PlainCounters {
    /// Relayed datagrams sent in plain UDP.
    pub sent: AtomicU64,
    /// Relayed datagrams the socket refused (full, or an error): dropped.
    pub send_failed: AtomicU64,
    /// Relayed datagrams received in plain UDP and delivered.
    pub received: AtomicU64,
    /// Received datagrams dropped ([`PlainDrop`]).
    pub dropped_in: AtomicU64,
    /// Bind attempts or refreshes left unanswered: the link went (or stayed) on QUIC
    /// datagrams.
    pub fallbacks: AtomicU64,
}

/// One QUIC relay link's plain-UDP socket and binding.
pub(in crate::daemon) struct PlainLink {
    sock: UdpSocket,
    state: UdpSocketState,
    /// The relay's address (canonical: an IPv4 relay as IPv4).
    relay: SocketAddr,
    /// The token relayed sends carry; `None` while not bound (sends go as QUIC datagrams).
    bound: Mutex<Option<[u8; UDP_BIND_LEN]>>,
    /// The connection's token as the relay last offered it: datagrams carrying it are this
    /// link's even while sends went back to QUIC (the relay keeps a binding until the
    /// connection ends).
    known: Mutex<Option<[u8; UDP_BIND_LEN]>>,
    stop: AtomicBool,
    counters: Arc<PumpCounters>,
}

impl PlainLink {
    /// A socket connected to `relay` (an IPv4-mapped address counts as IPv4), carrying the
    /// outbound mark (kept on the underlay while an exit node holds the default route).
    pub(in crate::daemon) fn open(
        relay: SocketAddr,
        counters: Arc<PumpCounters>,
    ) -> io::Result<Arc<PlainLink>> {
        let relay = SocketAddr::new(relay.ip().to_canonical(), relay.port());
        let local: SocketAddr = match relay {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local)?;
        ward_runtime::net::mark_socket(sock.as_raw_fd())?;
        if let Err(e) =
            ward_runtime::net::set_socket_buffers(&sock, ward_runtime::net::QUIC_SOCKET_BUFFER)
        {
            debug!(error = %e, "relay UDP socket buffers left at the kernel's default");
        }
        sock.connect(relay)?;
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        Ok(Arc::new(PlainLink {
            sock,
            state,
            relay,
            bound: Mutex::new(None),
            known: Mutex::new(None),
            stop: AtomicBool::new(false),
            counters,
        }))
    }

    /// The relay offered `token` for this connection.
    pub(in crate::daemon) fn set_known(&self, token: [u8; UDP_BIND_LEN]) {
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }

    /// Relayed sends carry `token` in plain UDP, or (`None`) go as QUIC datagrams.
    pub(in crate::daemon) fn set_bound(&self, token: Option<[u8; UDP_BIND_LEN]>) {
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = token;
    }

    /// Whether relayed sends go in plain UDP now.
    pub(in crate::daemon) fn is_bound(&self) -> bool {
        self.bound_token().is_some()
    }

    fn bound_token(&self) -> Option<[u8; UDP_BIND_LEN]> {
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a confirm datagram (a lost or refused one is sent again by the state machine).
    pub(in crate::daemon) fn send_confirm(&self, confirm: &[u8]) {
        if let Err(e) = self.sock.send(confirm) {
            debug!(relay = %self.relay, error = %e, "plain-UDP confirm not sent");
        }
    }

    /// Sends `datagrams` (relay-framed: destination id, then WireGuard) in plain UDP if the
    /// link is bound, using `buf` as scratch. `false`: not bound, nothing sent (the caller
    /// sends them as QUIC datagrams).
    pub(in crate::daemon) fn send(&self, datagrams: &[Bytes], buf: &mut Vec<u8>) -> bool {
        let Some(token) = self.bound_token() else {
            return false;
        };
        let max_segments = self.state.max_gso_segments().max(1);
        let (mut sent, mut failed) = (0u64, 0u64);
        let mut rest = datagrams;
        while let Some(first) = rest.first() {
            // A run: datagrams of the first one's size, then at most one shorter (GSO's last
            // segment may be short), within the kernel's bounds.
            let seg = DATA_PREFIX_LEN + first.len();
            let mut n = 1;
            while n < rest.len() && n < max_segments && (n + 1) * seg <= MAX_GSO_BYTES {
                let len = DATA_PREFIX_LEN + rest[n].len();
                if len > seg {
                    break;
                }
                n += 1;
                if len < seg {
                    break;
                }
            }
            buf.clear();
            for d in &rest[..n] {
                frame_data(buf, &token, d);
            }
            let t = Transmit {
                destination: self.relay,
                ecn: None,
                contents: buf,
                segment_size: (n > 1).then_some(seg),
                src_ip: None,
            };
            match self.state.try_send((&self.sock).into(), &t) {
                Ok(()) => sent += n as u64,
                Err(e) => {
                    failed += n as u64;
                    trace!(relay = %self.relay, error = %e, n, "plain-UDP datagrams not sent");
                }
            }
            rest = &rest[n..];
        }
        if sent > 0 {
            self.counters.plain.sent.fetch_add(sent, Ordering::Relaxed);
        }
        if failed > 0 {
            self.counters
                .plain
                .send_failed
                .fetch_add(failed, Ordering::Relaxed);
        }
        true
    }

    /// Ends the receive thread (within [`STOP_POLL_MS`]).
    pub(in crate::daemon) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Starts the thread that reads this socket and hands what arrives to `sink` (held
    /// weakly) as relay `relay`'s datagrams. It ends after [`PlainLink::stop`].
    pub(in crate::daemon) fn start_receiver(
        self: &Arc<Self>,
        relay: Arc<str>,
        sink: &Arc<dyn RelaySink>,
        inbound: Option<Arc<Inbound>>,
    ) -> io::Result<()> {
        let link = self.clone();
        // Weak, both: the relayed-receive queue holds the data plane's sink too, and this
        // thread must not keep a stopped data plane (and its WireGuard socket) alive until it
        // next looks at its stop flag.
        let sink = Arc::downgrade(sink);
        let inbound = inbound.as_ref().map(Arc::downgrade);
        std::thread::Builder::new()
            .name("ward-relay-udp".into())
            .spawn(move || link.receive_loop(&relay, &sink, inbound.as_ref()))
            .map(|_| ())
    }

    fn receive_loop(
        &self,
        relay: &Arc<str>,
        sink: &Weak<dyn RelaySink>,
        inbound: Option<&Weak<Inbound>>,
    ) {
        let mut bufs: [Vec<u8>; RX_BUFS] = std::array::from_fn(|_| vec![0u8; RX_BUF]);
        let mut meta = [RecvMeta::default(); RX_BUFS];
        let mut log = DropLog::default();
        while !self.stop.load(Ordering::Relaxed) {
            if !self.wait_readable() {
                continue;
            }
            loop {
                let n = {
                    let mut iovs = bufs.each_mut().map(|b| IoSliceMut::new(b));
                    match self.state.recv((&self.sock).into(), &mut iovs, &mut meta) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // A connected socket reports ICMP errors (the relay's port closed)
                            // here: the link's QUIC side notices a dead relay.
                            trace!(relay = %relay, error = %e, "relay UDP receive failed");
                            break;
                        }
                    }
                };
                let Some(sink) = sink.upgrade() else {
                    return; // the data plane is gone
                };
                let inbound = match inbound.map(Weak::upgrade) {
                    Some(None) => return, // the data plane is gone
                    Some(Some(i)) => Some(i),
                    None => None,
                };
                let token = *self.known.lock().unwrap_or_else(PoisonError::into_inner);
                let mut bodies: Vec<(u64, &[u8])> = Vec::with_capacity(n * 4);
                // With a relayed-receive thread: the datagrams (relay header kept) copied into
                // one buffer per receive batch, handed over to be decrypted there while this
                // thread reads on.
                let mut framed: Option<BytesMut> = inbound
                    .as_ref()
                    .map(|_| BytesMut::with_capacity(meta.iter().take(n).map(|m| m.len).sum()));
                let mut ranges: Vec<(usize, usize)> = Vec::new();
                let mut dropped = Vec::new();
                for (m, b) in meta.iter().zip(&bufs).take(n) {
                    let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                    let data = b.get(..m.len).unwrap_or(&[]);
                    let stride = if m.stride == 0 {
                        m.len.max(1)
                    } else {
                        m.stride
                    };
                    for d in data.chunks(stride) {
                        let parsed = if from == self.relay {
                            parse_data(d, token.as_ref())
                        } else {
                            Err(PlainDrop::WrongSource)
                        };
                        match (parsed, framed.as_mut()) {
                            (Ok(_), Some(buf)) => {
                                let start = buf.len();
                                buf.extend_from_slice(&d[DATA_PREFIX_LEN..]);
                                ranges.push((start, buf.len()));
                            }
                            (Ok(body), None) => bodies.push(body),
                            (Err(why), _) => dropped.push((why, from)),
                        }
                    }
                }
                let delivered = bodies.len() + ranges.len();
                if delivered > 0 {
                    self.counters
                        .plain
                        .received
                        .fetch_add(delivered as u64, Ordering::Relaxed);
                }
                if !bodies.is_empty() {
                    sink.relayed_batch(relay, &bodies);
                }
                if let (Some(inbound), Some(buf)) = (inbound, framed) {
                    if !ranges.is_empty() {
                        let all = buf.freeze();
                        let mut batch: Vec<Bytes> =
                            ranges.iter().map(|&(a, b)| all.slice(a..b)).collect();
                        inbound.deliver(relay, &mut batch);
                    }
                }
                for (why, from) in dropped {
                    self.counters
                        .plain
                        .dropped_in
                        .fetch_add(1, Ordering::Relaxed);
                    log.dropped(relay, from, why, Instant::now());
                }
            }
        }
    }

    /// Waits up to [`STOP_POLL_MS`] for the socket to become readable.
    fn wait_readable(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count, a bounded timeout.
        let rc = unsafe { libc::poll(&mut pfd, 1, STOP_POLL_MS) };
        rc > 0
    }
}

/// Rate-limited log of dropped datagrams.
#[derive(Default)]
struct DropLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl DropLog {
    fn dropped(&mut self, relay: &str, src: SocketAddr, why: PlainDrop, now: Instant) {
        self.unlogged = self.unlogged.saturating_add(1);
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < LOG_EVERY)
        {
            return;
        }
        info!(relay, %src, reason = why.as_str(), dropped = self.unlogged, "plain-UDP datagrams from the relay link's socket dropped");
        self.last = Some(now);
        self.unlogged = 0;
    }
}
