//! [`Outbox`]: where the engine writes what the driver sends, so the engine never touches a
//! socket or the TUN itself. Datagrams go to a [`Destination`]: a UDP address (the socket's
//! batched fast path) or a peer's device id through a relay (the driver's relay queue).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// A relay, as the engine knows it: a small id given to each relay name the first time the
/// engine sees it (in [`super::Core::set_relays`] or a peer's home relay). Ids are never
/// reused, so one in flight always names the relay it was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelayId(pub u16);

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "relay#{}", self.0)
    }
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Straight to a UDP address.
    Udp(SocketAddr),
    /// Through a relay, to the device with this id.
    Relay { relay: RelayId, to: u64 },
}

/// Where a datagram came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// From a UDP address.
    Udp(SocketAddr),
    /// Through a relay, from the device with this id (as the relay's header names it).
    Relay { relay: RelayId, from: u64 },
}

impl Source {
    /// The destination that answers this source: the same address, or the same device
    /// through the same relay.
    pub fn reply_to(self) -> Destination {
        match self {
            Source::Udp(a) => Destination::Udp(a),
            Source::Relay { relay, from } => Destination::Relay { relay, to: from },
        }
    }

    /// The address WireGuard's handshake cookies (mac2, under load) are bound to: the UDP
    /// source's IP, or, through a relay (which authenticates the devices it forwards for), an
    /// address made of the relay and device id in the discard-only prefix `100::/64` (RFC
    /// 6666), which no real source has.
    pub fn cookie_addr(self) -> IpAddr {
        match self {
            Source::Udp(a) => a.ip(),
            Source::Relay { relay, from } => {
                let d = from.to_be_bytes();
                let w = |i: usize| u16::from_be_bytes([d[i], d[i + 1]]);
                IpAddr::V6(Ipv6Addr::new(0x100, 0, 0, relay.0, w(0), w(2), w(4), w(6)))
            }
        }
    }

    /// The UDP address, for a direct source.
    pub fn udp(self) -> Option<SocketAddr> {
        match self {
            Source::Udp(a) => Some(a),
            Source::Relay { .. } => None,
        }
    }
}

impl From<SocketAddr> for Destination {
    fn from(a: SocketAddr) -> Destination {
        Destination::Udp(a)
    }
}

impl From<SocketAddr> for Source {
    fn from(a: SocketAddr) -> Source {
        Source::Udp(a)
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Udp(a) => write!(f, "{a}"),
            Source::Relay { relay, from } => write!(f, "device {from} via {relay}"),
        }
    }
}

/// Datagrams for the network, written by the core into one contiguous buffer (so runs of
/// equal-size datagrams to one destination can go out as a single UDP GSO send).
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    used: usize,
    items: Vec<Transmit>,
    /// How many of `items` go through a relay (the driver splits them off only if any).
    relayed: usize,
    /// IP packets for the local TUN (ICMP errors for destinations without a peer).
    pub(super) tun: Vec<Vec<u8>>,
}

/// One datagram in an [`Outbox`]: `bytes()[start..start + len]` goes to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dst: Destination,
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
        self.relayed = 0;
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

    /// How many datagrams go through a relay.
    pub fn relayed(&self) -> usize {
        self.relayed
    }

    /// The datagrams, in order.
    pub fn transmits(&self) -> &[Transmit] {
        &self.items
    }

    /// The buffer the [`Transmit`]s index into.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn iter(&self) -> impl Iterator<Item = (Destination, &[u8])> + '_ {
        self.items
            .iter()
            .map(|t| (t.dst, &self.buf[t.start..t.start + t.len]))
    }

    /// Total payload bytes queued.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// Scratch space of `n` bytes at the end of the buffer, to be committed with [`Self::commit`].
    pub(super) fn reserve(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.used..end]
    }

    /// Commits the first `len` reserved bytes as a datagram to `dst`.
    pub(super) fn commit(&mut self, dst: Destination, len: usize) {
        if matches!(dst, Destination::Relay { .. }) {
            self.relayed += 1;
        }
        self.items.push(Transmit {
            dst,
            start: self.used,
            len,
        });
        self.used += len;
    }

    /// Repeats the last committed datagram to another destination.
    pub(super) fn repeat_last(&mut self, dst: Destination) {
        let Some(last) = self.items.last().copied() else {
            return;
        };
        self.reserve(last.len);
        self.buf
            .copy_within(last.start..last.start + last.len, self.used);
        self.commit(dst, last.len);
    }

    pub(crate) fn push(&mut self, dst: impl Into<Destination>, data: &[u8]) {
        self.reserve(data.len()).copy_from_slice(data);
        self.commit(dst.into(), data.len());
    }
}
