//! The forwarding driver: accepts device connections on the relay's QUIC endpoint and turns
//! their events into calls on [`crate::forward::Forwarder`] (under one lock, with the quinn
//! connections beside it so a batch of datagrams is routed in one step).
//!
//! Per device connection one task: handshake (bounded by the hello timeout), the `Hello` frame,
//! then QUIC datagrams and fresh tickets until the connection ends. Datagrams are taken in
//! batches (everything the connection holds when the task wakes, up to [`FORWARD_BATCH`]),
//! routed under one lock, then handed on outside it. A datagram goes to the destination's
//! connection with `send_datagram` only when its buffer has room (it holds less than the
//! core's [`Forwarder::queue_share`] of its [`crate::tls::DATAGRAM_SEND_BUFFER`]), so a slow
//! receiver costs its own datagrams, never the forwarding of others, and all buffers together
//! stay bounded. A destination's room and path MTU are read once per batch (each read locks
//! its connection's state, which its driver holds while building packets) and spent datagram
//! by datagram (`Budget`). A datagram is forwarded in the buffer quinn received it in when nothing else
//! holds that buffer (its header rewritten in place), else copied once.
//! Devices on networks that drop UDP connect over TLS/TCP instead ([`crate::tcp`]); their
//! connections sit in the same table as [`DeviceConn::Tcp`], and the core cannot tell them
//! apart.

use crate::forward::{Clock, Close, ConnId, Drop, Forwarder, Refusal};
use crate::udp_bind::Token;
use crate::udp_path::UdpPath;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use ward_shared::relay::{
    DeviceToRelay, RelayToDevice, SignedTicket, MAX_RELAYED_DATAGRAM, MAX_RELAY_STREAM_FRAME,
    RELAY_HEADER_LEN,
};
use ward_shared::wire::{self, DeviceId, ErrorCode, FrameDecoder};

/// How often tickets, hello deadlines and revocations are checked.
const TIMER_EVERY: Duration = Duration::from_millis(250);
/// Most datagrams taken from one device connection and routed per wake-up (and per lock).
const FORWARD_BATCH: usize = 64;
/// How long a refused device gets to read the `Error` frame before the connection closes.
const ERROR_GRACE: Duration = Duration::from_millis(500);

/// The state every task of the relay shares.
#[derive(Debug)]
pub struct Shared {
    fwd: Mutex<Forwarding>,
    /// Whether the control session is welcomed now.
    pub control_up: AtomicBool,
    pub(crate) hello_timeout: Duration,
    /// Hellos per source address (checked before any ticket).
    gate: Mutex<crate::gate::HelloGate>,
    /// The devices' TLS config for TCP (the QUIC endpoint holds its own copy); `None` until
    /// the coordinator welcomed the relay.
    device_tls: Mutex<Option<Arc<rustls::ServerConfig>>>,
    /// The UDP socket the plain-UDP path sends on (the QUIC endpoint's); unset: no plain-UDP
    /// sends (bindings are still refused nothing, but nothing is routed to them).
    udp_socket: OnceLock<Arc<dyn quinn::AsyncUdpSocket>>,
}

#[derive(Debug)]
pub struct Forwarding {
    pub core: Forwarder,
    pub(crate) conns: HashMap<ConnId, DeviceConn>,
    /// The plain-UDP bindings ([`crate::udp_path`]).
    pub udp: UdpPath,
}

/// A device connection the forwarding table hands datagrams to.
#[derive(Debug, Clone)]
pub(crate) enum DeviceConn {
    Quic(quinn::Connection),
    Tcp(crate::tcp::TcpConn),
}

impl DeviceConn {
    /// What the connection takes now without waiting: the largest datagram (device-id header
    /// included; a QUIC link's path MTU so far) and the bytes its send buffer may still take
    /// while holding at most `share` bytes. Read once per destination per batch (each read
    /// locks the connection's state, which its driver task holds while it builds packets);
    /// [`Budget::take`] then spends it datagram by datagram.
    pub(crate) fn budget(&self, share: usize) -> Budget {
        match self {
            DeviceConn::Quic(c) => {
                let space = c.datagram_send_buffer_space();
                let queued = crate::tls::DATAGRAM_SEND_BUFFER.saturating_sub(space);
                Budget {
                    max: c.max_datagram_size(),
                    room: Some(space.min(share.saturating_sub(queued))),
                }
            }
            // A TCP link's queue has its own bound, in frames: checked per frame.
            DeviceConn::Tcp(_) => Budget {
                max: None,
                room: None,
            },
        }
    }

    /// Whether a TCP link's queue takes a frame of `len` bytes now.
    fn tcp_has_room(&self, len: usize) -> bool {
        match self {
            DeviceConn::Quic(_) => true,
            DeviceConn::Tcp(t) => t.send_buffer_space() >= len,
        }
    }

    /// Hands a datagram (device-id header included) to the connection.
    pub(crate) fn send_datagram(&self, d: bytes::Bytes) -> Result<(), DeviceSendError> {
        match self {
            DeviceConn::Quic(c) => c.send_datagram(d).map_err(|_| DeviceSendError),
            DeviceConn::Tcp(t) => t.send_datagram(&d),
        }
    }

    pub(crate) fn close(&self, code: u32, reason: &str) {
        match self {
            DeviceConn::Quic(c) => c.close(code.into(), reason.as_bytes()),
            DeviceConn::Tcp(t) => t.close(),
        }
    }
}

/// What one destination takes in one batch ([`DeviceConn::budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// The largest datagram the connection carries, if it has a limit of its own.
    max: Option<usize>,
    /// Bytes its send buffer takes still; `None`: checked per datagram by the link itself.
    room: Option<usize>,
}

impl Budget {
    /// Takes a datagram of `len` bytes from the budget, or says why it cannot go.
    pub(crate) fn take(&mut self, len: usize) -> Result<(), Drop> {
        if self.max.is_some_and(|max| len > max) {
            return Err(Drop::TooLarge);
        }
        if let Some(room) = &mut self.room {
            if len > *room {
                return Err(Drop::QueueFull);
            }
            *room -= len;
        }
        Ok(())
    }
}

/// The connection could not take a datagram (full or closing).
#[derive(Debug)]
pub(crate) struct DeviceSendError;

impl Forwarding {
    /// Closes every connection the core gave up on.
    pub(crate) fn drain_closes(&mut self) {
        while let Some((id, why)) = self.core.poll_close() {
            self.udp.handle_closed(id);
            if let Some(c) = self.conns.remove(&id) {
                c.close(why.code(), why.as_str());
            }
        }
    }
}

/// The two clocks, now.
pub fn clock() -> Clock {
    Clock {
        at: Instant::now(),
        unix_ms: ward_runtime::now_ms(),
    }
}

impl Shared {
    pub fn new(core: Forwarder, hello_timeout: Duration) -> Arc<Self> {
        Arc::new(Shared {
            fwd: Mutex::new(Forwarding {
                core,
                conns: HashMap::new(),
                udp: UdpPath::default(),
            }),
            control_up: AtomicBool::new(false),
            hello_timeout,
            gate: Mutex::new(crate::gate::HelloGate::new(
                crate::gate::GateConfig::default(),
                Instant::now(),
            )),
            device_tls: Mutex::new(None),
            udp_socket: OnceLock::new(),
        })
    }

    /// The socket plain-UDP datagrams leave on (set once, at start).
    pub fn set_udp_socket(&self, socket: Arc<dyn quinn::AsyncUdpSocket>) {
        let _ = self.udp_socket.set(socket);
    }

    pub(crate) fn udp_socket(&self) -> Option<&Arc<dyn quinn::AsyncUdpSocket>> {
        self.udp_socket.get()
    }

    /// The devices' TLS config for TCP, from the coordinator's welcome or a renewal.
    pub fn set_device_tls(&self, cfg: Arc<rustls::ServerConfig>) {
        *self.device_tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(cfg);
    }

    pub(crate) fn device_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.device_tls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The forwarding state, locked (a panicked holder cannot leave it inconsistent in a way
    /// that matters more than stopping to forward).
    pub fn lock(&self) -> MutexGuard<'_, Forwarding> {
        self.fwd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the core, then closes what it asked to close.
    pub fn with_core<T>(&self, f: impl FnOnce(&mut Forwarder) -> T) -> T {
        let mut g = self.lock();
        let r = f(&mut g.core);
        g.drain_closes();
        r
    }

    pub fn is_control_up(&self) -> bool {
        self.control_up.load(Ordering::Relaxed)
    }
}

/// Accepts device connections until the endpoint closes.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        // Under a flood of handshakes, make sources prove their address first (a stateless
        // retry), so spoofed ones cannot hold connection slots.
        if !incoming.remote_address_validated() && shared.lock().core.under_load() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
            continue;
        }
        let admitted = shared.with_core(|c| c.handle_connect(clock()));
        match admitted {
            Ok(id) => {
                tokio::spawn(serve_device(shared.clone(), incoming, id));
            }
            Err(r) => {
                tracing::trace!(remote = %incoming.remote_address(), reason = r.as_str(), "connection refused");
                incoming.refuse();
            }
        }
    }
}

/// Checks tickets and deadlines every [`TIMER_EVERY`] until the task is dropped.
pub async fn timer_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TIMER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = clock();
        let mut g = shared.lock();
        g.core.handle_timer(now);
        g.udp.bindings.handle_timer(now.at);
        g.drain_closes();
    }
}

async fn serve_device(shared: Arc<Shared>, incoming: quinn::Incoming, id: ConnId) {
    let remote = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + shared.hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, async { incoming.accept()?.await }).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%remote, conn = %id, error = %e, "device handshake failed");
            shared.with_core(|c| c.handle_closed(id));
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, conn = %id, "device handshake timed out");
            shared.with_core(|c| c.handle_closed(id));
            return;
        }
    };
    {
        let mut g = shared.lock();
        // The timer may have given up on this connection already.
        if !g.core.is_pending(id) {
            drop(g);
            conn.close(1u32.into(), Refusal::HelloTimeout.as_str().as_bytes());
            return;
        }
        g.conns.insert(id, DeviceConn::Quic(conn.clone()));
    }
    run_device(&shared, &conn, id, deadline).await;
    let mut g = shared.lock();
    g.core.handle_closed(id);
    g.conns.remove(&id);
    g.udp.handle_closed(id);
    g.drain_closes();
}

/// The hello, then datagrams and tickets until the connection ends.
async fn run_device(
    shared: &Shared,
    conn: &quinn::Connection,
    id: ConnId,
    deadline: tokio::time::Instant,
) {
    let remote = conn.remote_address();
    let Some(identity) = crate::tls::peer_cert_identity(conn) else {
        // TLS required and verified a certificate; one we cannot parse is refused.
        shared.with_core(|c| c.handle_garbage(id));
        return;
    };
    let hello = tokio::time::timeout_at(deadline, async {
        let (send, recv) = conn.accept_bi().await.ok()?;
        let mut stream = Stream::new(send, recv);
        let msg = stream.next().await?;
        Some((stream, msg))
    })
    .await;
    let Ok(Some((mut stream, msg))) = hello else {
        // No stream or no decodable frame in time: refused (the timer also counts timeouts).
        shared.with_core(|c| c.handle_garbage(id));
        return;
    };
    let accepted = accept_hello(shared, id, remote.ip(), identity, &msg);
    let device = match accepted {
        Ok(d) => d,
        Err(r) => {
            tracing::debug!(%remote, conn = %id, reason = r.as_str(), "device hello refused");
            refuse(conn, &mut stream, r).await;
            return;
        }
    };
    let max_datagram = conn
        .max_datagram_size()
        .unwrap_or(0)
        .saturating_sub(RELAY_HEADER_LEN)
        .min(MAX_RELAYED_DATAGRAM);
    let welcome = RelayToDevice::Welcome {
        device_id: device,
        max_datagram: u16::try_from(max_datagram).unwrap_or(u16::MAX),
    };
    if stream
        .send
        .write_all(&wire::encode(&welcome))
        .await
        .is_err()
    {
        return;
    }
    tracing::info!(%remote, conn = %id, %device, max_datagram, "device connected");
    let mut batch = Vec::with_capacity(FORWARD_BATCH);
    let mut routed = Vec::with_capacity(FORWARD_BATCH);
    // Woken when a confirm bound this connection's plain-UDP address (after a `UdpBind`).
    let mut bound: Option<Arc<Notify>> = None;
    loop {
        let bound_wait = async {
            match &bound {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            d = conn.read_datagram() => {
                let Ok(d) = d else { break };
                take_ready(conn, d, &mut batch);
                forward(shared, id, &mut batch, &mut routed);
            }
            () = bound_wait => {
                if stream.send.write_all(&wire::encode(&RelayToDevice::UdpBound)).await.is_err() {
                    break;
                }
            }
            msg = stream.next() => {
                if matches!(msg, Some(DeviceToRelay::UdpBind)) {
                    let answer = crate::udp_path::bind_request(&mut shared.lock(), id);
                    let Some((token, nonce, notify)) = answer else {
                        let r = shared.with_core(|c| c.handle_garbage(id));
                        tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "plain-UDP binding asked on a version-1 connection");
                        break;
                    };
                    bound = Some(notify);
                    let m = RelayToDevice::UdpBinding { token, nonce };
                    if stream.send.write_all(&wire::encode(&m)).await.is_err() {
                        break;
                    }
                    tracing::debug!(conn = %id, %device, "plain-UDP binding offered");
                    continue;
                }
                let Some(DeviceToRelay::Ticket { ticket }) = msg else {
                    let r = shared.with_core(|c| c.handle_garbage(id));
                    tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "device stream ended or broke the protocol");
                    break;
                };
                let r = accept_ticket(shared, id, &ticket);
                if let Err(r) = r {
                    tracing::debug!(%remote, conn = %id, %device, reason = r.as_str(), "fresh ticket refused");
                    refuse(conn, &mut stream, r).await;
                    break;
                }
                tracing::trace!(conn = %id, %device, serial = ticket.ticket.serial, "fresh ticket");
            }
        }
    }
    tracing::debug!(conn = %id, %device, reason = ?conn.close_reason(), "device connection ended");
}

/// `first` and whatever else `conn` has received already (never waits), at most
/// [`FORWARD_BATCH`] in all, in arrival order. A failed read ends the batch; the loop's next
/// `read_datagram` sees the error.
fn take_ready(conn: &quinn::Connection, first: Bytes, batch: &mut Vec<Bytes>) {
    batch.clear();
    batch.push(first);
    let mut cx = Context::from_waker(Waker::noop());
    while batch.len() < FORWARD_BATCH {
        let read = conn.read_datagram();
        let mut read = std::pin::pin!(read);
        match read.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(d)) => batch.push(d),
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
}

/// Routes a batch of datagrams from `id` under one lock and one clock reading, then hands
/// each to its destination's connection, outside the lock, if that connection's send buffer
/// has room; what could not be handed on is counted under a second lock.
fn forward(
    shared: &Shared,
    id: ConnId,
    batch: &mut Vec<Bytes>,
    routed: &mut Vec<(ConnId, DeviceConn, Bytes)>,
) {
    routed.clear();
    let mut undelivered: Vec<(Drop, usize)> = Vec::new();
    let mut plain: Vec<(std::net::SocketAddr, Token, Bytes)> = Vec::new();
    let socket = shared.udp_socket();
    let share = {
        let now = clock();
        let mut g = shared.lock();
        let Forwarding { core, conns, udp } = &mut *g;
        let mut last: Option<(ConnId, DeviceConn)> = None;
        for d in batch.drain(..) {
            // quinn's buffer when this datagram is its only holder, else a copy.
            let mut buf = d.try_into_mut().unwrap_or_else(|d| BytesMut::from(&d[..]));
            let Ok(to) = core.handle_datagram(id, &mut buf, now) else {
                continue;
            };
            if socket.is_some() {
                if let Some((addr, token)) = udp.route(to) {
                    plain.push((addr, token, buf.freeze()));
                    continue;
                }
            }
            let conn = match &last {
                Some((c, conn)) if *c == to => Some(conn.clone()),
                _ => conns
                    .get(&to)
                    .cloned()
                    .inspect(|c| last = Some((to, c.clone()))),
            };
            match conn {
                Some(c) => routed.push((to, c, buf.freeze())),
                None => {
                    let body = buf.len().saturating_sub(RELAY_HEADER_LEN);
                    core.handle_undelivered(Drop::UnknownDestination, body);
                }
            }
        }
        core.queue_share(crate::tls::DATAGRAM_SEND_BUFFER)
    };
    let mut plain_failed = 0;
    if let Some(socket) = socket {
        if !plain.is_empty() {
            plain_failed = crate::udp_path::send_plain(socket.as_ref(), &plain);
        }
    }
    // Consecutive datagrams to one destination share one budget (and one read of its state).
    let mut budget: Option<(ConnId, Budget)> = None;
    for (to, c, d) in routed.drain(..) {
        let body = d.len().saturating_sub(RELAY_HEADER_LEN);
        let b = match &mut budget {
            Some((id, b)) if *id == to => b,
            _ => &mut budget.insert((to, c.budget(share))).1,
        };
        if let Err(reason) = b.take(d.len()) {
            undelivered.push((reason, body));
            continue;
        }
        let sent = c.tcp_has_room(d.len()) && c.send_datagram(d).is_ok();
        if !sent {
            undelivered.push((Drop::QueueFull, body));
        }
    }
    if !plain.is_empty() {
        let mut g = shared.lock();
        g.udp
            .count_sent(plain.len() as u64 - plain_failed, plain_failed);
    }
    if !undelivered.is_empty() {
        let mut g = shared.lock();
        for (reason, body) in undelivered {
            g.core.handle_undelivered(reason, body);
        }
    }
}

/// Hands a connection's first frame to the core ([`admit`]), once its source address passed
/// the per-source gate ([`crate::gate`]).
pub(crate) fn accept_hello(
    shared: &Shared,
    id: ConnId,
    source: std::net::IpAddr,
    identity: [u8; 32],
    msg: &DeviceToRelay,
) -> Result<DeviceId, Refusal> {
    let now = clock();
    let admitted = shared
        .gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(source, now.at);
    if !admitted {
        return admit(shared, id, |core| Err(core.handle_rate_limited(id)));
    }
    admit(shared, id, |core| core.handle_hello(id, identity, msg, now))
}

/// Hands a device's fresh ticket to the core ([`admit`]).
pub(crate) fn accept_ticket(
    shared: &Shared,
    id: ConnId,
    ticket: &SignedTicket,
) -> Result<(), Refusal> {
    admit(shared, id, |core| core.handle_ticket(id, ticket, clock()))
}

/// Runs one core decision on a connection's credentials. A refused connection leaves the
/// table at once and is closed by the caller, after the `Error` frame had a chance to go out.
fn admit<T>(
    shared: &Shared,
    id: ConnId,
    decide: impl FnOnce(&mut Forwarder) -> Result<T, Refusal>,
) -> Result<T, Refusal> {
    let mut g = shared.lock();
    let r = decide(&mut g.core);
    if r.is_err() {
        g.conns.remove(&id);
        g.udp.handle_closed(id);
    }
    g.drain_closes();
    r
}

/// [`forward`] for one datagram (a TCP link's frames arrive one at a time).
pub(crate) fn forward_one(shared: &Shared, id: ConnId, d: &[u8]) {
    let mut batch = vec![Bytes::copy_from_slice(d)];
    let mut routed = Vec::with_capacity(1);
    forward(shared, id, &mut batch, &mut routed);
}

/// The error code a refusal is reported with.
pub(crate) fn refusal_code(r: Refusal) -> ErrorCode {
    match r {
        Refusal::Protocol => ErrorCode::Protocol,
        Refusal::Revoked => ErrorCode::DeviceRevoked,
        Refusal::NotReady | Refusal::TooManyConnections | Refusal::TooManyPending => {
            ErrorCode::Internal
        }
        Refusal::RateLimited => ErrorCode::RateLimited,
        Refusal::BadSignature
        | Refusal::Expired
        | Refusal::NotYetValid
        | Refusal::WrongCertificate
        | Refusal::WrongDevice
        | Refusal::HelloTimeout => ErrorCode::Unauthorized,
    }
}

/// Sends the `Error` frame, waits briefly for it to be read, closes.
async fn refuse(conn: &quinn::Connection, stream: &mut Stream, r: Refusal) {
    let msg = RelayToDevice::Error {
        code: refusal_code(r),
        message: format!("relay ticket refused: {}", r.as_str()),
    };
    let _ = tokio::time::timeout(ERROR_GRACE, async {
        stream.send.write_all(&wire::encode(&msg)).await.ok()?;
        stream.send.finish().ok()?;
        stream.send.stopped().await.ok()
    })
    .await;
    conn.close(Close::Refused(r).code().into(), r.as_str().as_bytes());
}

/// A device's stream: frames in (bounded), frames out.
struct Stream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl Stream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Stream {
            send,
            recv,
            dec: FrameDecoder::new(MAX_RELAY_STREAM_FRAME),
        }
    }

    /// The next message; `None` at the end of the stream or on anything malformed.
    async fn next(&mut self) -> Option<DeviceToRelay> {
        ward_runtime::quic::read_msg(&mut self.recv, &mut self.dec)
            .await
            .ok()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A budget lets datagrams through until its room is spent, refuses one over the path MTU
    /// without spending room, and one over the remaining room as a full queue.
    #[test]
    fn budget_spends_room_and_refuses_oversized() {
        let mut b = Budget {
            max: Some(1_400),
            room: Some(3_000),
        };
        assert_eq!(b.take(1_401), Err(Drop::TooLarge));
        assert_eq!(b.take(1_400), Ok(()));
        assert_eq!(b.take(1_400), Ok(()));
        assert_eq!(b.take(201), Err(Drop::QueueFull));
        assert_eq!(b.take(200), Ok(()));
        assert_eq!(b.take(1), Err(Drop::QueueFull));
    }

    /// A link without a limit of its own (TCP: its queue checks each frame) takes any size.
    #[test]
    fn budget_without_limits_takes_everything() {
        let mut b = Budget {
            max: None,
            room: None,
        };
        for _ in 0..1_000 {
            assert_eq!(b.take(65_535), Ok(()));
        }
    }
}
