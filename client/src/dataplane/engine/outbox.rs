//! [`Outbox`]: where the engine writes what the driver sends, so the engine never touches a
//! socket or the TUN itself.

use std::net::SocketAddr;

/// Datagrams for the network, written by the core into one contiguous buffer (so runs of
/// equal-size datagrams to one destination can go out as a single UDP GSO send).
#[derive(Default)]
pub struct Outbox {
    buf: Vec<u8>,
    used: usize,
    items: Vec<Transmit>,
    /// IP packets for the local TUN (ICMP errors for destinations without a peer).
    pub(super) tun: Vec<Vec<u8>>,
}

/// One datagram in an [`Outbox`]: `bytes()[start..start + len]` goes to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dst: SocketAddr,
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

    /// The datagrams, in order.
    pub fn transmits(&self) -> &[Transmit] {
        &self.items
    }

    /// The buffer the [`Transmit`]s index into.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
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
    pub(super) fn commit(&mut self, dst: SocketAddr, len: usize) {
        self.items.push(Transmit {
            dst,
            start: self.used,
            len,
        });
        self.used += len;
    }

    /// Repeats the last committed datagram to another destination.
    pub(super) fn repeat_last(&mut self, dst: SocketAddr) {
        let Some(last) = self.items.last().copied() else {
            return;
        };
        self.reserve(last.len);
        self.buf
            .copy_within(last.start..last.start + last.len, self.used);
        self.commit(dst, last.len);
    }

    pub(crate) fn push(&mut self, dst: SocketAddr, data: &[u8]) {
        self.reserve(data.len()).copy_from_slice(data);
        self.commit(dst, data.len());
    }
}
