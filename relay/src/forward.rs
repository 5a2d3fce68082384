//! The relay's I/O-free forwarding core: which QUIC connection belongs to which device, whether
//! its ticket holds, and where each relayed datagram goes. No sockets, no clock, no tasks: the
//! driver passes the time in ([`Clock`]) and does what the core returns.
//!
//! Drive loop (the driver owns quinn and the clock; every call happens under one lock):
//!
//! ```text
//! incoming QUIC connection  → handle_connect(clock)            → Ok(conn) | Err(refusal): refuse it
//! its first stream frame    → handle_hello(conn, cert_identity, msg, clock)
//!                                                             → Ok(device): send Welcome | Err: send Error, close
//! later stream frames       → handle_ticket(conn, ticket, clock)
//! each QUIC datagram        → handle_datagram(conn, &mut bytes, clock)
//!                                                             → Ok(dst conn): send the rewritten bytes to it
//!                                                               (its send buffer holds queue_share() already:
//!                                                                handle_undelivered(QueueFull, len))
//! an undecodable frame      → handle_garbage(conn)
//! coordinator's Welcome     → handle_welcome(ticket_key, revoked, clock)
//! coordinator's Revoked     → handle_revoked(devices, clock)
//! a connection ended        → handle_closed(conn)
//! every ~250 ms             → handle_timer(clock)
//! after any call            → while let Some((conn, why)) = poll_close() { close it }
//! ```
//!
//! A connection is *pending* from the moment its handshake starts until its `Hello` is accepted;
//! pending connections are capped ([`Limits::max_pending`]) and time out after
//! [`Limits::hello_timeout`]. All connections are capped ([`Limits::max_connections`]). A ticket
//! is verified offline against the coordinator's key, the wall clock, the certificate the device
//! presented and the revocations the coordinator pushed (remembered for a ticket's lifetime, so a
//! ticket issued before a revocation cannot outlive it even across a control-session outage).
//! Each device has a token bucket for packets and one for bytes, so one flooding device is
//! dropped at its own limit and cannot starve the others; datagrams to a receiver whose send
//! buffer is full are dropped by the driver and counted here, so nothing waits on a slow peer.
//! A receiver's send buffer is deep enough to ride out a stall of its connection's task (a few
//! tens of milliseconds of a fast link) while few devices are connected, and bounded in total:
//! each receiver may fill only its equal share of [`Limits::queued_bytes`]
//! ([`Forwarder::queue_share`]).

use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use ward_shared::relay::{
    DeviceToRelay, SignedTicket, TicketError, MAX_RELAYED_DATAGRAM, RELAY_HEADER_LEN,
    RELAY_PROTOCOL_UDP, RELAY_PROTOCOL_VERSION, TICKET_TTL_MS,
};
use ward_shared::wire::DeviceId;

/// The two clocks the core needs: monotonic for rates and timeouts, wall (ms since the epoch)
/// for ticket validity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    pub at: Instant,
    pub unix_ms: i64,
}

/// Limits of a [`Forwarder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once, pending or not.
    pub max_connections: usize,
    /// Connections without an accepted `Hello` at once.
    pub max_pending: usize,
    /// How long a connection may take from its first packet to an accepted `Hello`.
    pub hello_timeout: Duration,
    /// Datagrams per second a device may send, sustained.
    pub rate_packets: u64,
    /// Bytes per second a device may send, sustained.
    pub rate_bytes: u64,
    /// How long a device may send at its full rate after being quiet (the bucket depth).
    pub burst: Duration,
    /// Bytes of datagrams waiting in the send buffers of all device connections together, at
    /// most: each connected device's buffer may hold its equal share
    /// ([`Forwarder::queue_share`]).
    pub queued_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        // A 1 Gbit/s stream of 1400-byte datagrams is about 90 000 datagrams/s and 125 MB/s:
        // well under these.
        Limits {
            max_connections: 10_000,
            max_pending: 1_000,
            hello_timeout: Duration::from_secs(5),
            rate_packets: 200_000,
            rate_bytes: 400_000_000,
            burst: Duration::from_millis(250),
            // 64 links with full 4 MiB buffers; beyond 64 devices each gets less.
            queued_bytes: 256 << 20,
        }
    }
}

/// A connection, numbered by the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Why a connection or its `Hello` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// No `Welcome` from the coordinator yet: no ticket key.
    NotReady,
    TooManyConnections,
    TooManyPending,
    /// The first frame was not a `Hello`, or a later one not a `Ticket`, or a wrong version.
    Protocol,
    /// Signature does not verify (forged, altered, another coordinator's) or validity inverted.
    BadSignature,
    Expired,
    NotYetValid,
    /// The ticket names another certificate than the one presented.
    WrongCertificate,
    /// A fresh ticket for another device than the connection's.
    WrongDevice,
    Revoked,
    /// No accepted `Hello` within [`Limits::hello_timeout`].
    HelloTimeout,
    /// The hello's source address sent too many (`crate::gate`).
    RateLimited,
}

impl Refusal {
    pub const ALL: [Refusal; 12] = [
        Refusal::NotReady,
        Refusal::TooManyConnections,
        Refusal::TooManyPending,
        Refusal::Protocol,
        Refusal::BadSignature,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::WrongCertificate,
        Refusal::WrongDevice,
        Refusal::Revoked,
        Refusal::HelloTimeout,
        Refusal::RateLimited,
    ];

    /// The metric label / log field value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotReady => "not_ready",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::TooManyPending => "too_many_pending",
            Refusal::Protocol => "protocol",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongCertificate => "wrong_certificate",
            Refusal::WrongDevice => "wrong_device",
            Refusal::Revoked => "revoked",
            Refusal::HelloTimeout => "hello_timeout",
            Refusal::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl From<TicketError> for Refusal {
    fn from(e: TicketError) -> Self {
        match e {
            TicketError::BadSignature | TicketError::Inverted => Refusal::BadSignature,
            TicketError::Expired { .. } => Refusal::Expired,
            TicketError::NotYetValid { .. } => Refusal::NotYetValid,
            TicketError::WrongCertificate { .. } => Refusal::WrongCertificate,
        }
    }
}

/// Why a datagram was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Drop {
    /// From a connection without an accepted, unexpired ticket.
    NoTicket,
    /// No connected device has the id in the header.
    UnknownDestination,
    /// Shorter than the header plus one byte.
    Malformed,
    /// Longer than the header plus [`MAX_RELAYED_DATAGRAM`].
    Oversized,
    /// The source device is over its packet or byte rate.
    RateLimited,
    /// The destination's send buffer was full: it held its link's buffer size or its share of
    /// [`Limits::queued_bytes`] already (counted by the driver).
    QueueFull,
    /// Larger than the destination's link carries now (its QUIC path MTU is smaller than the
    /// sender's; counted by the driver).
    TooLarge,
    /// The source or the destination has been revoked.
    Revoked,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::NoTicket,
        Drop::UnknownDestination,
        Drop::Malformed,
        Drop::Oversized,
        Drop::RateLimited,
        Drop::QueueFull,
        Drop::TooLarge,
        Drop::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Drop::NoTicket => "no_ticket",
            Drop::UnknownDestination => "unknown_destination",
            Drop::Malformed => "malformed",
            Drop::Oversized => "oversized",
            Drop::RateLimited => "rate_limited",
            Drop::QueueFull => "queue_full",
            Drop::TooLarge => "too_large",
            Drop::Revoked => "revoked",
        }
    }

    fn index(self) -> usize {
        Drop::ALL.iter().position(|d| *d == self).unwrap_or(0)
    }
}

/// Why the core asks the driver to close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// A newer connection of the same device took over.
    Replaced,
    /// The device was revoked.
    Revoked,
    /// Its ticket expired without a fresh one.
    TicketExpired,
    /// A `Hello` or ticket was refused, or none came in time.
    Refused(Refusal),
}

impl Close {
    /// The QUIC application close code: 0 for an orderly close, 1 for a refusal.
    pub fn code(self) -> u32 {
        match self {
            Close::Replaced | Close::TicketExpired => 0,
            Close::Revoked | Close::Refused(_) => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Close::Replaced => "replaced by a newer connection",
            Close::Revoked => "device revoked",
            Close::TicketExpired => "ticket expired",
            Close::Refused(r) => r.as_str(),
        }
    }
}

/// Counters since start, and gauges now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections with an accepted ticket now.
    pub devices: usize,
    /// Connections waiting for their `Hello` now.
    pub pending: usize,
    /// WireGuard bytes forwarded (headers excluded).
    pub bytes_relayed: u64,
    pub datagrams_relayed: u64,
    dropped: [u64; Drop::ALL.len()],
    refused: [u64; Refusal::ALL.len()],
    /// Devices remembered as revoked now.
    pub revoked_remembered: usize,
}

impl Stats {
    pub fn dropped(&self, d: Drop) -> u64 {
        self.dropped[d.index()]
    }
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r.index()]
    }
}

/// The forwarding state of one relay. See the module doc for the drive loop.
#[derive(Debug)]
pub struct Forwarder {
    limits: Limits,
    ticket_key: Option<VerifyingKey>,
    conns: BTreeMap<ConnId, Conn>,
    /// The current connection of each device with an accepted ticket.
    devices: BTreeMap<DeviceId, ConnId>,
    /// Revoked devices, until when (wall ms) to remember them.
    revoked: BTreeMap<DeviceId, i64>,
    next_conn: u64,
    pending: usize,
    closes: VecDeque<(ConnId, Close)>,
    stats: Stats,
}

#[derive(Debug)]
enum Conn {
    /// Handshake or `Hello` not done; since when.
    Pending {
        since: Instant,
    },
    Device(Box<DeviceConn>),
}

#[derive(Debug)]
struct DeviceConn {
    device: DeviceId,
    cert_identity: [u8; 32],
    /// The current ticket's end (wall ms).
    not_after_ms: i64,
    /// Its `Hello` said forwarding version 2: it may ask for a plain-UDP binding.
    udp: bool,
    packets: Bucket,
    bytes: Bucket,
}

/// Token amounts in millionths, so refills are exact per microsecond.
const UNIT: u64 = 1_000_000;

#[derive(Debug)]
struct Bucket {
    tokens: u64,
    /// Depth in millionths.
    cap: u64,
    /// Refill per second, in tokens.
    rate: u64,
    last: Instant,
}

impl Bucket {
    fn full(rate: u64, cap: u64, now: Instant) -> Self {
        Bucket {
            tokens: cap,
            cap,
            rate,
            last: now,
        }
    }

    /// Refills for the time since the last call, then takes `n` if there are that many.
    fn take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.tokens = self
            .tokens
            .saturating_add(micros.saturating_mul(self.rate))
            .min(self.cap);
        if now > self.last {
            self.last = now;
        }
        let want = n.saturating_mul(UNIT);
        if self.tokens >= want {
            self.tokens -= want;
            true
        } else {
            false
        }
    }
}

/// Bucket depth in millionths: `rate × burst`, at least one largest datagram (so a byte bucket
/// can always pass one).
fn capacity(rate: u64, burst: Duration) -> u64 {
    let micros = u64::try_from(burst.as_micros()).unwrap_or(u64::MAX);
    rate.saturating_mul(micros).max(UNIT)
}

fn byte_capacity(rate: u64, burst: Duration) -> u64 {
    capacity(rate, burst).max(UNIT.saturating_mul(MAX_RELAYED_DATAGRAM as u64))
}

impl Forwarder {
    /// A forwarder without a ticket key: it refuses every connection until
    /// [`Forwarder::handle_welcome`].
    pub fn new(limits: Limits) -> Self {
        Forwarder {
            limits,
            ticket_key: None,
            conns: BTreeMap::new(),
            devices: BTreeMap::new(),
            revoked: BTreeMap::new(),
            next_conn: 1,
            pending: 0,
            closes: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// The coordinator's `Welcome`: its ticket key and the devices to refuse.
    pub fn handle_welcome(&mut self, ticket_key: VerifyingKey, revoked: &[DeviceId], now: Clock) {
        self.ticket_key = Some(ticket_key);
        self.handle_revoked(revoked, now);
    }

    /// Whether connections are accepted at all (a `Welcome` has come).
    /// Whether `conn` is a welcomed connection whose `Hello` said forwarding version 2 (it may
    /// ask for a plain-UDP binding; a version-1 connection that asks breaks the protocol).
    pub fn speaks_udp(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(&conn), Some(Conn::Device(d)) if d.udp)
    }

    pub fn is_ready(&self) -> bool {
        self.ticket_key.is_some()
    }

    /// A connection attempt: its number, or why it must be refused. No per-connection state is
    /// kept for a refused attempt.
    pub fn handle_connect(&mut self, now: Clock) -> Result<ConnId, Refusal> {
        let refused = if self.ticket_key.is_none() {
            Some(Refusal::NotReady)
        } else if self.conns.len() >= self.limits.max_connections {
            Some(Refusal::TooManyConnections)
        } else if self.pending >= self.limits.max_pending {
            Some(Refusal::TooManyPending)
        } else {
            None
        };
        if let Some(r) = refused {
            self.count_refusal(r);
            return Err(r);
        }
        let id = ConnId(self.next_conn);
        self.next_conn = self.next_conn.wrapping_add(1);
        self.conns.insert(id, Conn::Pending { since: now.at });
        self.pending += 1;
        Ok(id)
    }

    /// The first frame of a connection whose client certificate (already verified against the
    /// CA by TLS) has public key hash `cert_identity`. On success the connection carries that
    /// device's traffic; an older connection of the same device is closed. On refusal the
    /// connection is queued for closing.
    pub fn handle_hello(
        &mut self,
        conn: ConnId,
        cert_identity: [u8; 32],
        msg: &DeviceToRelay,
        now: Clock,
    ) -> Result<DeviceId, Refusal> {
        match self.conns.get(&conn) {
            Some(Conn::Pending { .. }) => {}
            // Gone (closed meanwhile) or already welcomed: a second Hello breaks the protocol.
            Some(Conn::Device(_)) | None => return Err(self.refuse(conn, Refusal::Protocol)),
        }
        let (ticket, udp) = match msg {
            DeviceToRelay::Hello { protocol, ticket } if *protocol == RELAY_PROTOCOL_VERSION => {
                (ticket, false)
            }
            DeviceToRelay::Hello { protocol, ticket } if *protocol == RELAY_PROTOCOL_UDP => {
                (ticket, true)
            }
            DeviceToRelay::Hello { .. } | DeviceToRelay::Ticket { .. } | DeviceToRelay::UdpBind => {
                return Err(self.refuse(conn, Refusal::Protocol))
            }
        };
        let (device, not_after_ms) = match self.check_ticket(ticket, &cert_identity, now) {
            Ok(t) => t,
            Err(r) => return Err(self.refuse(conn, r)),
        };
        if let Some(old) = self.devices.insert(device, conn) {
            if old != conn && self.conns.remove(&old).is_some() {
                self.closes.push_back((old, Close::Replaced));
                tracing::debug!(%device, %old, new = %conn, "device reconnected: older connection replaced");
            }
        }
        self.pending = self.pending.saturating_sub(1);
        self.conns.insert(
            conn,
            Conn::Device(Box::new(DeviceConn {
                device,
                cert_identity,
                not_after_ms,
                udp,
                packets: Bucket::full(
                    self.limits.rate_packets,
                    capacity(self.limits.rate_packets, self.limits.burst),
                    now.at,
                ),
                bytes: Bucket::full(
                    self.limits.rate_bytes,
                    byte_capacity(self.limits.rate_bytes, self.limits.burst),
                    now.at,
                ),
            })),
        );
        Ok(device)
    }

    /// A fresh ticket on a welcomed connection: it must verify for the same device and
    /// certificate; a refused one closes the connection.
    pub fn handle_ticket(
        &mut self,
        conn: ConnId,
        ticket: &SignedTicket,
        now: Clock,
    ) -> Result<(), Refusal> {
        let Some(Conn::Device(d)) = self.conns.get(&conn) else {
            return Err(self.refuse(conn, Refusal::Protocol));
        };
        let (device, cert_identity) = (d.device, d.cert_identity);
        let not_after_ms = match self.check_ticket(ticket, &cert_identity, now) {
            Ok((id, _)) if id != device => Err(Refusal::WrongDevice),
            Ok((_, n)) => Ok(n),
            Err(r) => Err(r),
        };
        match not_after_ms {
            Ok(n) => {
                if let Some(Conn::Device(d)) = self.conns.get_mut(&conn) {
                    d.not_after_ms = d.not_after_ms.max(n);
                }
                Ok(())
            }
            Err(r) => Err(self.refuse(conn, r)),
        }
    }

    /// A QUIC datagram from `conn`. On success the header now names the source device and the
    /// datagram goes to the returned connection (if its send buffer has room: else the driver
    /// counts [`Drop::QueueFull`]).
    pub fn handle_datagram(
        &mut self,
        conn: ConnId,
        datagram: &mut [u8],
        now: Clock,
    ) -> Result<ConnId, Drop> {
        let r = self.route(conn, datagram, now);
        match r {
            Ok(_) => {
                let body = (datagram.len() - RELAY_HEADER_LEN) as u64;
                self.stats.datagrams_relayed = self.stats.datagrams_relayed.saturating_add(1);
                self.stats.bytes_relayed = self.stats.bytes_relayed.saturating_add(body);
            }
            Err(d) => self.count_drop(d),
        }
        r
    }

    fn count_drop(&mut self, d: Drop) {
        let i = d.index();
        self.stats.dropped[i] = self.stats.dropped[i].saturating_add(1);
    }

    /// A datagram [`Forwarder::handle_datagram`] routed (and counted as relayed) of `body_len`
    /// WireGuard bytes that the driver could not hand to the destination (its send buffer was
    /// full, or its connection just went).
    pub fn handle_undelivered(&mut self, d: Drop, body_len: usize) {
        self.count_drop(d);
        self.stats.datagrams_relayed = self.stats.datagrams_relayed.saturating_sub(1);
        self.stats.bytes_relayed = self.stats.bytes_relayed.saturating_sub(body_len as u64);
    }

    /// A stream frame that does not decode (or a stream that ended early) on `conn`: refused
    /// as a protocol error, the connection queued for closing.
    pub fn handle_garbage(&mut self, conn: ConnId) -> Refusal {
        self.refuse(conn, Refusal::Protocol)
    }

    /// The connection's hello came from a source over its rate (`crate::gate`): refused,
    /// before its ticket is looked at.
    pub fn handle_rate_limited(&mut self, conn: ConnId) -> Refusal {
        self.refuse(conn, Refusal::RateLimited)
    }

    /// Devices the coordinator revoked: their connections close and their tickets are refused
    /// for a ticket's lifetime.
    pub fn handle_revoked(&mut self, devices: &[DeviceId], now: Clock) {
        let until = now.unix_ms.saturating_add(TICKET_TTL_MS);
        for &device in devices {
            self.revoked.insert(device, until);
            if let Some(conn) = self.devices.remove(&device) {
                if self.conns.remove(&conn).is_some() {
                    self.closes.push_back((conn, Close::Revoked));
                    tracing::info!(%device, %conn, "revoked device disconnected");
                }
            }
        }
    }

    /// A connection ended (closed by either side, or its handshake failed).
    pub fn handle_closed(&mut self, conn: ConnId) {
        match self.conns.remove(&conn) {
            Some(Conn::Pending { .. }) => self.pending = self.pending.saturating_sub(1),
            Some(Conn::Device(d)) if self.devices.get(&d.device) == Some(&conn) => {
                self.devices.remove(&d.device);
            }
            Some(Conn::Device(_)) | None => {}
        }
    }

    /// Hello timeouts, expired tickets, forgotten revocations.
    pub fn handle_timer(&mut self, now: Clock) {
        let mut close = Vec::new();
        for (&id, c) in &self.conns {
            match c {
                Conn::Pending { since } => {
                    if now.at.saturating_duration_since(*since) >= self.limits.hello_timeout {
                        close.push((id, Close::Refused(Refusal::HelloTimeout)));
                    }
                }
                Conn::Device(d) => {
                    if now.unix_ms >= d.not_after_ms {
                        close.push((id, Close::TicketExpired));
                    }
                }
            }
        }
        for (id, why) in close {
            if let Close::Refused(r) = why {
                self.count_refusal(r);
            } else {
                tracing::debug!(conn = %id, "ticket expired without a fresh one: closing");
            }
            self.handle_closed(id);
            self.closes.push_back((id, why));
        }
        self.revoked.retain(|_, until| *until > now.unix_ms);
    }

    /// The next connection the driver must close, and why.
    #[must_use]
    pub fn poll_close(&mut self) -> Option<(ConnId, Close)> {
        self.closes.pop_front()
    }

    /// Whether a quarter of the pending slots are taken: the driver then asks new sources to
    /// prove their address before a connection is counted.
    /// How many bytes of datagrams one destination's send buffer may hold now: its link's own
    /// buffer size (`link_buffer`), or less when many devices are connected, so that all
    /// buffers together stay within [`Limits::queued_bytes`].
    pub fn queue_share(&self, link_buffer: usize) -> usize {
        link_buffer.min(self.limits.queued_bytes / self.devices.len().max(1))
    }

    pub fn under_load(&self) -> bool {
        self.pending.saturating_mul(4) >= self.limits.max_pending
    }

    /// Whether `conn` is known and still waiting for its `Hello`.
    pub fn is_pending(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(&conn), Some(Conn::Pending { .. }))
    }

    /// The device a connection carries, once its `Hello` was accepted.
    pub fn device_of(&self, conn: ConnId) -> Option<DeviceId> {
        match self.conns.get(&conn)? {
            Conn::Device(d) => Some(d.device),
            Conn::Pending { .. } => None,
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            devices: self.devices.len(),
            pending: self.pending,
            revoked_remembered: self.revoked.len(),
            ..self.stats
        }
    }

    fn route(&mut self, conn: ConnId, datagram: &mut [u8], now: Clock) -> Result<ConnId, Drop> {
        let Some(Conn::Device(src)) = self.conns.get_mut(&conn) else {
            return Err(Drop::NoTicket);
        };
        if now.unix_ms >= src.not_after_ms {
            return Err(Drop::NoTicket);
        }
        if self.revoked.contains_key(&src.device) {
            return Err(Drop::Revoked);
        }
        if datagram.len() > RELAY_HEADER_LEN + MAX_RELAYED_DATAGRAM {
            return Err(Drop::Oversized);
        }
        let Some((head, body)) = datagram.split_at_mut_checked(RELAY_HEADER_LEN) else {
            return Err(Drop::Malformed);
        };
        if body.is_empty() {
            return Err(Drop::Malformed);
        }
        let pk = src.packets.take(1, now.at);
        let by = pk && src.bytes.take(body.len() as u64, now.at);
        if !(pk && by) {
            return Err(Drop::RateLimited);
        }
        let source = src.device;
        let mut raw = [0u8; RELAY_HEADER_LEN];
        raw.copy_from_slice(head);
        let dst = DeviceId(u64::from_be_bytes(raw));
        if self.revoked.contains_key(&dst) {
            return Err(Drop::Revoked);
        }
        let Some(&to) = self.devices.get(&dst) else {
            return Err(Drop::UnknownDestination);
        };
        head.copy_from_slice(&source.0.to_be_bytes());
        Ok(to)
    }

    /// Device id and ticket end, if the ticket holds for this certificate and is not revoked.
    fn check_ticket(
        &self,
        ticket: &SignedTicket,
        cert_identity: &[u8; 32],
        now: Clock,
    ) -> Result<(DeviceId, i64), Refusal> {
        let Some(key) = &self.ticket_key else {
            return Err(Refusal::NotReady);
        };
        let t = ticket.verify_for(key, now.unix_ms, cert_identity)?;
        if self.revoked.contains_key(&t.device_id) {
            return Err(Refusal::Revoked);
        }
        Ok((t.device_id, t.not_after_ms))
    }

    /// Counts the refusal and queues `conn` for closing.
    fn refuse(&mut self, conn: ConnId, r: Refusal) -> Refusal {
        tracing::debug!(%conn, reason = r.as_str(), "relay connection refused");
        if self.conns.contains_key(&conn) {
            self.count_refusal(r);
            self.handle_closed(conn);
            self.closes.push_back((conn, Close::Refused(r)));
        }
        r
    }

    fn count_refusal(&mut self, r: Refusal) {
        let i = r.index();
        self.stats.refused[i] = self.stats.refused[i].saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use ed25519_dalek::SigningKey;
    use ward_shared::relay::{encode_datagram, split_datagram, Ticket};

    const T0_MS: i64 = 1_700_000_000_000;

    struct H {
        f: Forwarder,
        key: SigningKey,
        t0: Instant,
    }

    fn cert(n: u8) -> [u8; 32] {
        [n; 32]
    }

    impl H {
        fn new(limits: Limits) -> Self {
            let key = SigningKey::from_bytes(&[7; 32]);
            let t0 = Instant::now();
            let mut f = Forwarder::new(limits);
            f.handle_welcome(key.verifying_key(), &[], clock_at(t0, 0));
            H { f, key, t0 }
        }
        fn at(&self, ms: u64) -> Clock {
            clock_at(self.t0, ms)
        }
        fn ticket(&self, device: u64, cert_n: u8, from_ms: i64, to_ms: i64) -> SignedTicket {
            ticket_by(&self.key, device, cert_n, from_ms, to_ms)
        }
        fn hello(&self, t: SignedTicket) -> DeviceToRelay {
            DeviceToRelay::Hello {
                protocol: RELAY_PROTOCOL_VERSION,
                ticket: t,
            }
        }
        /// Connects device `device` with certificate `cert_n` and a 10-minute ticket at `ms`.
        fn join(&mut self, device: u64, cert_n: u8, ms: u64) -> ConnId {
            let now = self.at(ms);
            let c = self.f.handle_connect(now).unwrap();
            let t = self.ticket(device, cert_n, T0_MS, T0_MS + TICKET_TTL_MS);
            let hello = self.hello(t);
            assert_eq!(
                self.f.handle_hello(c, cert(cert_n), &hello, now),
                Ok(DeviceId(device))
            );
            c
        }
        fn send(&mut self, from: ConnId, to: u64, ms: u64) -> Result<(ConnId, Vec<u8>), Drop> {
            let mut d = encode_datagram(DeviceId(to), b"wireguard ciphertext");
            let c = self.f.handle_datagram(from, &mut d, self.at(ms))?;
            Ok((c, d))
        }
        fn closes(&mut self) -> Vec<(ConnId, Close)> {
            std::iter::from_fn(|| self.f.poll_close()).collect()
        }
    }

    fn clock_at(t0: Instant, ms: u64) -> Clock {
        Clock {
            at: t0 + Duration::from_millis(ms),
            unix_ms: T0_MS + ms as i64,
        }
    }

    fn ticket_by(key: &SigningKey, device: u64, cert_n: u8, from: i64, to: i64) -> SignedTicket {
        Ticket {
            device_id: DeviceId(device),
            cert_identity: cert(cert_n),
            not_before_ms: from,
            not_after_ms: to,
            serial: device * 100,
        }
        .sign(key)
    }

    #[test]
    fn forwards_between_ticketed_devices_with_the_source_in_the_header() {
        let mut h = H::new(Limits::default());
        let a = h.join(1, 1, 0);
        let b = h.join(2, 2, 0);
        let (to, d) = h.send(a, 2, 10).unwrap();
        assert_eq!(to, b);
        assert_eq!(
            split_datagram(&d),
            Some((DeviceId(1), &b"wireguard ciphertext"[..]))
        );
        let (to, d) = h.send(b, 1, 10).unwrap();
        assert_eq!(to, a);
        assert_eq!(split_datagram(&d).unwrap().0, DeviceId(2));
        let s = h.f.stats();
        assert_eq!((s.devices, s.pending, s.datagrams_relayed), (2, 0, 2));
        assert_eq!(s.bytes_relayed, 2 * 20);
        assert_eq!(s.dropped_total(), 0);
        assert!(h.closes().is_empty());
    }

    #[test]
    fn refuses_bad_tickets_and_closes_their_connections() {
        let mut h = H::new(Limits::default());
        let now = h.at(0);
        let other = SigningKey::from_bytes(&[8; 32]);
        let good = h.ticket(1, 1, T0_MS, T0_MS + TICKET_TTL_MS);
        let mut forged = good.clone();
        forged.ticket.device_id = DeviceId(2);
        let mut garbage_sig = good.clone();
        garbage_sig.signature.0 = vec![0; 3];
        let cases = [
            (h.hello(forged), Refusal::BadSignature),
            (h.hello(garbage_sig), Refusal::BadSignature),
            (
                h.hello(ticket_by(&other, 1, 1, T0_MS, T0_MS + 1000)),
                Refusal::BadSignature,
            ),
            (
                h.hello(h.ticket(1, 1, T0_MS - 2000, T0_MS - 1)),
                Refusal::Expired,
            ),
            (
                h.hello(h.ticket(1, 1, T0_MS + 60_000, T0_MS + 120_000)),
                Refusal::NotYetValid,
            ),
            // A ticket for another certificate than the one presented.
            (
                h.hello(h.ticket(1, 9, T0_MS, T0_MS + 1000)),
                Refusal::WrongCertificate,
            ),
            (
                DeviceToRelay::Ticket {
                    ticket: good.clone(),
                },
                Refusal::Protocol,
            ),
            (
                DeviceToRelay::Hello {
                    protocol: 99,
                    ticket: good.clone(),
                },
                Refusal::Protocol,
            ),
        ];
        for (msg, want) in cases {
            let c = h.f.handle_connect(now).unwrap();
            assert_eq!(
                h.f.handle_hello(c, cert(1), &msg, now),
                Err(want),
                "{msg:?}"
            );
            assert_eq!(h.closes(), vec![(c, Close::Refused(want))]);
            assert_eq!(h.f.device_of(c), None);
        }
        let s = h.f.stats();
        assert_eq!((s.devices, s.pending), (0, 0), "refusals leave no state");
        assert_eq!(s.refused(Refusal::BadSignature), 3);
        assert_eq!(s.refused(Refusal::Protocol), 2);
        assert_eq!(s.refused(Refusal::WrongCertificate), 1);
        // Not-yet-valid within the skew is fine.
        let c = h.f.handle_connect(now).unwrap();
        let soon = h.hello(h.ticket(1, 1, T0_MS + 4000, T0_MS + 9000));
        assert_eq!(h.f.handle_hello(c, cert(1), &soon, now), Ok(DeviceId(1)));
    }

    #[test]
    fn nothing_is_accepted_before_the_welcome() {
        let mut f = Forwarder::new(Limits::default());
        let now = clock_at(Instant::now(), 0);
        assert!(!f.is_ready());
        assert_eq!(f.handle_connect(now), Err(Refusal::NotReady));
        assert_eq!(f.stats().refused(Refusal::NotReady), 1);
    }

    #[test]
    fn revoked_devices_are_disconnected_and_refused_for_a_ticket_lifetime() {
        let mut h = H::new(Limits::default());
        let a = h.join(1, 1, 0);
        let b = h.join(2, 2, 0);
        h.f.handle_revoked(&[DeviceId(2)], h.at(100));
        assert_eq!(h.closes(), vec![(b, Close::Revoked)]);
        assert_eq!(h.send(a, 2, 110), Err(Drop::Revoked));
        assert_eq!(h.send(b, 1, 110), Err(Drop::NoTicket), "closed connection");
        // Its still-valid ticket is refused on a new connection.
        let now = h.at(200);
        let c = h.f.handle_connect(now).unwrap();
        let hello = h.hello(h.ticket(2, 2, T0_MS, T0_MS + TICKET_TTL_MS));
        assert_eq!(
            h.f.handle_hello(c, cert(2), &hello, now),
            Err(Refusal::Revoked)
        );
        // The Welcome's list counts too.
        let k = h.key.verifying_key();
        h.f.handle_welcome(k, &[DeviceId(1)], h.at(300));
        assert_eq!(h.closes().last(), Some(&(a, Close::Revoked)));
        // Forgotten once no ticket issued before the revocation can still be valid.
        h.f.handle_timer(h.at(TICKET_TTL_MS as u64 + 301));
        assert_eq!(h.f.stats().revoked_remembered, 0);
    }

    #[test]
    fn bad_datagrams_are_dropped_by_reason() {
        let mut h = H::new(Limits::default());
        let a = h.join(1, 1, 0);
        let _b = h.join(2, 2, 0);
        let now = h.at(5);
        let mut cases: Vec<(Vec<u8>, Drop)> = vec![
            (vec![], Drop::Malformed),
            (vec![0; 7], Drop::Malformed),
            (vec![0, 0, 0, 0, 0, 0, 0, 2], Drop::Malformed), // header only
            (
                encode_datagram(DeviceId(2), &[1; MAX_RELAYED_DATAGRAM + 1]),
                Drop::Oversized,
            ),
            (vec![0xff; 65_000], Drop::Oversized),
            (encode_datagram(DeviceId(3), b"x"), Drop::UnknownDestination),
        ];
        let mut x: u32 = 99;
        for n in 0..200 {
            let mut g = vec![0u8; 9 + n];
            for b in g.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            cases.push((g, Drop::UnknownDestination)); // random ids: nobody
        }
        for (mut d, want) in cases {
            assert_eq!(h.f.handle_datagram(a, &mut d, now), Err(want));
        }
        // From a pending connection, or one never seen.
        let p = h.f.handle_connect(now).unwrap();
        let mut d = encode_datagram(DeviceId(2), b"x");
        assert_eq!(h.f.handle_datagram(p, &mut d, now), Err(Drop::NoTicket));
        assert_eq!(
            h.f.handle_datagram(ConnId(999), &mut d, now),
            Err(Drop::NoTicket)
        );
        let s = h.f.stats();
        assert_eq!(s.dropped(Drop::Malformed), 3);
        assert_eq!(s.dropped(Drop::Oversized), 2);
        assert_eq!(s.dropped(Drop::UnknownDestination), 201);
        assert_eq!(s.dropped(Drop::NoTicket), 2);
        assert_eq!(s.datagrams_relayed, 0);
        // The largest allowed passes.
        let mut max = encode_datagram(DeviceId(2), &[1; MAX_RELAYED_DATAGRAM]);
        assert!(h.f.handle_datagram(a, &mut max, now).is_ok());
        h.f.handle_undelivered(Drop::QueueFull, MAX_RELAYED_DATAGRAM);
        assert_eq!(h.f.stats().datagrams_relayed, 0);
        assert_eq!(h.f.stats().bytes_relayed, 0);
        assert_eq!(h.f.handle_garbage(p), Refusal::Protocol);
        assert_eq!(h.closes(), vec![(p, Close::Refused(Refusal::Protocol))]);
        assert_eq!(h.f.stats().dropped(Drop::QueueFull), 1);
    }

    #[test]
    fn a_flooding_device_is_limited_and_does_not_starve_another() {
        let limits = Limits {
            rate_packets: 1000,
            rate_bytes: 1_000_000_000,
            burst: Duration::from_millis(100),
            ..Limits::default()
        };
        let mut h = H::new(limits);
        let a = h.join(1, 1, 0);
        let b = h.join(2, 2, 0);
        let c = h.join(3, 3, 0);
        // Burst of 100 at once, then nothing.
        let sent = (0..1000).filter(|_| h.send(a, 2, 10).is_ok()).count();
        assert_eq!(sent, 100);
        assert_eq!(h.f.stats().dropped(Drop::RateLimited), 900);
        // Another device to the same destination is unaffected.
        assert!((0..50).all(|_| h.send(c, 2, 10).is_ok()));
        // Sustained at the rate: 1 per ms.
        assert!(h.send(a, 2, 11).is_ok());
        assert!(h.send(a, 2, 11).is_err());
        // The byte limit bites too.
        let limits = Limits {
            rate_packets: 1_000_000,
            rate_bytes: 100_000,
            burst: Duration::from_millis(100),
            ..Limits::default()
        };
        let mut h = H::new(limits);
        let a = h.join(1, 1, 0);
        let _ = h.join(2, 2, 0);
        let now = h.at(1);
        let mut sent = 0;
        for _ in 0..100 {
            let mut d = encode_datagram(DeviceId(2), &[0; 1000]);
            if h.f.handle_datagram(a, &mut d, now).is_ok() {
                sent += 1;
            }
        }
        // 10 000 bytes of burst.
        assert_eq!(sent, 10);
        let _ = b;
    }

    #[test]
    fn send_buffers_share_the_total_queue_bound() {
        let limits = Limits {
            queued_bytes: 10_000,
            ..Limits::default()
        };
        let mut h = H::new(limits);
        // Nobody connected, one device: the link's own buffer, up to the whole bound.
        assert_eq!(h.f.queue_share(4_000), 4_000);
        assert_eq!(h.f.queue_share(50_000), 10_000);
        let a = h.join(1, 1, 0);
        assert_eq!(h.f.queue_share(50_000), 10_000);
        let _b = h.join(2, 2, 0);
        let _c = h.join(3, 3, 0);
        let d = h.join(4, 4, 0);
        // Four devices: a quarter each, so four full buffers hold the bound at most.
        assert_eq!(h.f.queue_share(50_000), 2_500);
        assert_eq!(h.f.queue_share(1_000), 1_000);
        // A device leaving gives its share back.
        h.f.handle_closed(d);
        assert_eq!(h.f.queue_share(50_000), 3_333);
        // Pending connections hold no buffer share.
        let _p = h.f.handle_connect(h.at(1)).unwrap();
        assert_eq!(h.f.queue_share(50_000), 3_333);
        let _ = a;
        assert!(Limits::default().queued_bytes >= 64 * (4 << 20));
    }

    #[test]
    fn a_newer_connection_replaces_the_older_one() {
        let mut h = H::new(Limits::default());
        let a1 = h.join(1, 1, 0);
        let b = h.join(2, 2, 0);
        let a2 = h.join(1, 1, 50);
        assert_eq!(h.closes(), vec![(a1, Close::Replaced)]);
        assert_eq!(h.send(b, 1, 60).unwrap().0, a2);
        assert_eq!(h.send(a1, 2, 60), Err(Drop::NoTicket));
        // The old connection's late close does not remove the new one.
        h.f.handle_closed(a1);
        assert_eq!(h.send(b, 1, 70).unwrap().0, a2);
        assert_eq!(h.f.stats().devices, 2);
        h.f.handle_closed(a2);
        assert_eq!(h.send(b, 1, 80), Err(Drop::UnknownDestination));
        assert_eq!(h.f.stats().devices, 1);
    }

    #[test]
    fn expiry_closes_unless_a_fresh_ticket_came() {
        let mut h = H::new(Limits::default());
        let now = h.at(0);
        let c = h.f.handle_connect(now).unwrap();
        let short = h.hello(h.ticket(1, 1, T0_MS, T0_MS + 1000));
        h.f.handle_hello(c, cert(1), &short, now).unwrap();
        let d = h.f.handle_connect(now).unwrap();
        let short2 = h.hello(h.ticket(2, 2, T0_MS, T0_MS + 1000));
        h.f.handle_hello(d, cert(2), &short2, now).unwrap();
        // Device 1 refreshes: a ticket for another device or certificate is refused and closes.
        let wrong_dev = h.ticket(3, 1, T0_MS, T0_MS + 5000);
        assert_eq!(
            h.f.handle_ticket(c, &wrong_dev, h.at(500)),
            Err(Refusal::WrongDevice)
        );
        assert_eq!(h.closes(), vec![(c, Close::Refused(Refusal::WrongDevice))]);
        let c = h.f.handle_connect(h.at(500)).unwrap();
        h.f.handle_hello(c, cert(1), &short, h.at(500)).unwrap();
        let fresh = h.ticket(1, 1, T0_MS, T0_MS + 5000);
        assert_eq!(h.f.handle_ticket(c, &fresh, h.at(600)), Ok(()));
        let wrong_cert = h.ticket(2, 9, T0_MS, T0_MS + 5000);
        assert_eq!(
            h.f.handle_ticket(d, &wrong_cert, h.at(600)),
            Err(Refusal::WrongCertificate)
        );
        assert_eq!(
            h.closes(),
            vec![(d, Close::Refused(Refusal::WrongCertificate))]
        );
        let d = h.f.handle_connect(h.at(600)).unwrap();
        h.f.handle_hello(d, cert(2), &short2, h.at(600)).unwrap();
        h.f.handle_timer(h.at(999));
        assert!(h.closes().is_empty());
        // At 1000 ms device 2's ticket is over: its datagrams drop, the timer closes it.
        assert_eq!(h.send(d, 1, 1000), Err(Drop::NoTicket));
        h.f.handle_timer(h.at(1000));
        assert_eq!(h.closes(), vec![(d, Close::TicketExpired)]);
        assert_eq!(h.f.stats().devices, 1);
        h.f.handle_timer(h.at(5000));
        assert_eq!(h.closes(), vec![(c, Close::TicketExpired)]);
        assert_eq!(h.f.stats().devices, 0);
    }

    #[test]
    fn connection_caps_and_hello_timeout() {
        let limits = Limits {
            max_connections: 5,
            max_pending: 3,
            ..Limits::default()
        };
        let mut h = H::new(limits);
        let a = h.join(1, 1, 0);
        let p: Vec<ConnId> = (0..3)
            .map(|_| h.f.handle_connect(h.at(0)).unwrap())
            .collect();
        assert_eq!(h.f.handle_connect(h.at(0)), Err(Refusal::TooManyPending));
        h.f.handle_timer(h.at(4999));
        assert!(h.closes().is_empty());
        h.f.handle_timer(h.at(5000));
        let want: Vec<_> = p
            .iter()
            .map(|c| (*c, Close::Refused(Refusal::HelloTimeout)))
            .collect();
        assert_eq!(h.closes(), want);
        assert_eq!(h.f.stats().pending, 0);
        assert_eq!(h.f.stats().refused(Refusal::HelloTimeout), 3);
        let _ = (h.join(2, 2, 5000), h.join(3, 3, 5000), h.join(4, 4, 5000));
        let _last = h.f.handle_connect(h.at(5000)).unwrap();
        assert_eq!(
            h.f.handle_connect(h.at(5000)),
            Err(Refusal::TooManyConnections)
        );
        // A late hello on a timed-out connection is refused.
        let hello = h.hello(h.ticket(9, 9, T0_MS, T0_MS + 9000));
        assert_eq!(
            h.f.handle_hello(p[0], cert(9), &hello, h.at(5000)),
            Err(Refusal::Protocol)
        );
        let _ = a;
    }

    #[test]
    fn every_drop_and_refusal_reason_is_counted_and_read_back() {
        let mut s = Stats::default();
        for (i, d) in Drop::ALL.iter().enumerate() {
            s.dropped[d.index()] += i as u64 + 1;
        }
        for (i, r) in Refusal::ALL.iter().enumerate() {
            s.refused[r.index()] += i as u64 + 1;
        }
        for (i, d) in Drop::ALL.iter().enumerate() {
            assert_eq!(s.dropped(*d), i as u64 + 1, "{}", d.as_str());
        }
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(s.refused(*r), i as u64 + 1, "{}", r.as_str());
        }
    }
}
