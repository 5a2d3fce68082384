//! The relay queue: datagrams the engine routed through a relay ([`Destination::Relay`]) leave
//! the data-plane threads here, for the daemon to send on its QUIC connection to that relay.
//!
//! Bounded, and never blocking a packet thread: datagrams beyond the queue's room (or for a
//! queue nobody takes) are dropped and counted; WireGuard and the inner stack recover from
//! loss. The bound counts datagrams, not messages: one message ([`RelayTransmit`]) carries
//! the consecutive datagrams of one outbox for one relay, framed for the relay (its header
//! naming the destination device) in one allocation, so the daemon hands them to quinn
//! without a copy and looks up the connection once per message.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use ward_shared::relay::RELAY_HEADER_LEN;

use super::engine::{Core, Destination, Outbox, RelayId};

/// Datagrams waiting for the daemon. About 5.7 MB of 1400-byte datagrams, some 30 ms of a
/// 1.5 Gbit/s relay connection: room for a stall of the daemon's pump on a busy host (the
/// packet threads keep queueing meanwhile), as deep as the link's QUIC send buffer behind it.
pub(crate) const RELAY_QUEUE: usize = 4096;

/// Datagrams to send through one relay, in order, each framed for the relay: the relay
/// header (the destination device's id, as [`ward_shared::relay::encode_datagram`] writes it)
/// then the WireGuard datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTransmit {
    /// The relay's name.
    pub relay: Arc<str>,
    pub datagrams: Vec<Bytes>,
}

impl RelayTransmit {
    /// One WireGuard `datagram` for device `to`.
    pub fn one(relay: Arc<str>, to: u64, datagram: &[u8]) -> RelayTransmit {
        let mut buf = BytesMut::with_capacity(RELAY_HEADER_LEN + datagram.len());
        frame(&mut buf, to, datagram);
        RelayTransmit {
            relay,
            datagrams: vec![buf.freeze()],
        }
    }
}

/// The daemon's end of the queue (taken once).
#[derive(Debug)]
pub struct RelayReceiver {
    rx: mpsc::UnboundedReceiver<RelayTransmit>,
    queued: Arc<AtomicUsize>,
}

impl RelayReceiver {
    /// The next message; `None` once the data plane is gone. Cancel safe.
    pub async fn recv(&mut self) -> Option<RelayTransmit> {
        let t = self.rx.recv().await?;
        self.queued.fetch_sub(t.datagrams.len(), Ordering::AcqRel);
        Some(t)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<RelayTransmit> {
        let t = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(t.datagrams.len(), Ordering::AcqRel);
        Some(t)
    }
}

pub(crate) struct RelayQueue {
    /// Unbounded as a channel; bounded by `queued` (every message holds at least one datagram).
    tx: mpsc::UnboundedSender<RelayTransmit>,
    /// Taken once by the daemon.
    rx: Mutex<Option<RelayReceiver>>,
    /// Datagrams sent and not yet received by the daemon.
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub(crate) sent: AtomicU64,
    pub(crate) dropped_full: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dropped_unknown_relay: AtomicU64,
}

impl RelayQueue {
    /// A queue holding at most `capacity` datagrams.
    pub(crate) fn new(capacity: usize) -> RelayQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        RelayQueue {
            tx,
            rx: Mutex::new(Some(RelayReceiver {
                rx,
                queued: queued.clone(),
            })),
            queued,
            capacity,
            sent: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_unknown_relay: AtomicU64::new(0),
        }
    }

    pub(crate) fn take_receiver(&self) -> Option<RelayReceiver> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Queues the relayed datagrams of `out` (the UDP ones are the socket's), one message per
    /// run of datagrams for one relay. Never blocks.
    pub(crate) fn push(&self, core: &Core, out: &Outbox) {
        if out.relayed() == 0 {
            return;
        }
        let bytes = out.bytes();
        let mut run: Option<(RelayId, Arc<str>)> = None;
        // (destination, start, len) of the current run's datagrams.
        let mut pending: Vec<(u64, usize, usize)> = Vec::new();
        let mut dropped = 0;
        for t in out.transmits() {
            let Destination::Relay { relay, to } = t.dst else {
                continue;
            };
            if run.as_ref().is_none_or(|(id, _)| *id != relay) {
                if let Some((_, name)) = run.take() {
                    self.send_run(name, bytes, &pending);
                }
                pending.clear();
                // Every id the engine hands out has a name.
                let Some(name) = core.relay_name(relay) else {
                    dropped += 1;
                    continue;
                };
                run = Some((relay, name));
            }
            pending.push((to, t.start, t.len));
        }
        if let Some((_, name)) = run {
            self.send_run(name, bytes, &pending);
        }
        if dropped > 0 {
            self.dropped_full.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    /// Queues `t` whole if there is room for all its datagrams; drops and counts it otherwise.
    pub(crate) fn try_send(&self, t: RelayTransmit) -> bool {
        let n = t.datagrams.len();
        let got = self.reserve(n);
        if got < n {
            self.queued.fetch_sub(got, Ordering::AcqRel);
            self.dropped_full
                .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            return false;
        }
        self.send_reserved(t, n) == n
    }

    /// Frames the datagrams `run` (slices of `bytes`) for relay `name` and queues as many as
    /// there is room for, the first ones; the rest are dropped and counted.
    fn send_run(&self, name: Arc<str>, bytes: &[u8], run: &[(u64, usize, usize)]) {
        if run.is_empty() {
            return;
        }
        let room = self.reserve(run.len());
        let take = &run[..room];
        if room > 0 {
            let total: usize = take.iter().map(|&(_, _, len)| RELAY_HEADER_LEN + len).sum();
            let mut buf = BytesMut::with_capacity(total);
            let mut datagrams = Vec::with_capacity(room);
            for &(to, start, len) in take {
                let Some(body) = bytes.get(start..start + len) else {
                    continue; // the outbox's own ranges: never out of bounds
                };
                frame(&mut buf, to, body);
                datagrams.push(buf.split().freeze());
            }
            let reserved_unused = room - datagrams.len();
            if reserved_unused > 0 {
                self.queued.fetch_sub(reserved_unused, Ordering::AcqRel);
            }
            self.send_reserved(
                RelayTransmit {
                    relay: name,
                    datagrams,
                },
                room - reserved_unused,
            );
        }
        let dropped = run.len() - room;
        if dropped > 0 {
            tracing::trace!(dropped, "relay queue full: datagrams dropped");
            self.dropped_full.fetch_add(
                u64::try_from(dropped).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
        }
    }

    /// Room for up to `want` more datagrams, taken from the bound: how many were granted.
    fn reserve(&self, want: usize) -> usize {
        let mut cur = self.queued.load(Ordering::Acquire);
        loop {
            let k = want.min(self.capacity.saturating_sub(cur));
            if k == 0 {
                return 0;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur + k,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return k,
                Err(now) => cur = now,
            }
        }
    }

    /// Sends `t`, whose `n` datagrams hold reservations; counts them sent, or dropped (and
    /// gives the room back) when nobody will receive them. Returns how many were queued.
    fn send_reserved(&self, t: RelayTransmit, n: usize) -> usize {
        let count = u64::try_from(n).unwrap_or(u64::MAX);
        if n == 0 {
            return 0;
        }
        match self.tx.send(t) {
            Ok(()) => {
                self.sent.fetch_add(count, Ordering::Relaxed);
                n
            }
            Err(_) => {
                self.queued.fetch_sub(n, Ordering::AcqRel);
                self.dropped_full.fetch_add(count, Ordering::Relaxed);
                0
            }
        }
    }
}

/// Appends the relay header for device `to` and `datagram` to `buf`.
fn frame(buf: &mut BytesMut, to: u64, datagram: &[u8]) {
    buf.reserve(RELAY_HEADER_LEN + datagram.len());
    buf.put_u64(to);
    buf.put_slice(datagram);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataplane::engine::CoreConfig;
    use std::time::Instant;
    use ward_shared::relay::{encode_datagram, split_datagram};
    use ward_shared::wire::DeviceId;

    fn core_with(relays: &[&str]) -> Core {
        let core = Core::new(
            CoreConfig {
                private_key: [7; 32],
                persistent_keepalive: None,
                v6_prefix: None,
            },
            1,
        );
        core.set_relays(
            relays.iter().map(|r| (r.to_string(), 1200)).collect(),
            Instant::now(),
        );
        core
    }

    /// Every datagram of every waiting message, as (relay, destination, body).
    fn drain(rx: &mut RelayReceiver) -> Vec<(String, u64, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(t) = rx.try_recv() {
            for d in &t.datagrams {
                let (to, body) = split_datagram(d).unwrap();
                got.push((t.relay.to_string(), to.0, body.to_vec()));
            }
        }
        got
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let core = core_with(&["r1"]);
        let relay = core.relay_id("r1").unwrap();
        let q = RelayQueue::new(2);
        let mut out = Outbox::new();
        out.push(
            "10.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(),
            &[0; 10],
        );
        for k in 0..5u8 {
            out.push(Destination::Relay { relay, to: 9 }, &[k; 40]);
        }
        // No receiver is polling: push must return at once, not wait for room.
        q.push(&core, &out);
        assert_eq!(q.sent.load(Ordering::Relaxed), 2);
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 3);
        let mut rx = q.take_receiver().unwrap();
        assert!(q.take_receiver().is_none(), "taken once");
        // The UDP datagram is not the queue's.
        assert_eq!(
            drain(&mut rx),
            vec![
                ("r1".to_string(), 9, vec![0; 40]),
                ("r1".to_string(), 9, vec![1; 40])
            ]
        );
    }

    #[test]
    fn datagrams_are_framed_as_the_relay_protocol_says() {
        let t = RelayTransmit::one(Arc::from("r1"), 0x0102_0304_0506_0708, b"wg");
        assert_eq!(
            t.datagrams,
            vec![Bytes::from(encode_datagram(
                DeviceId(0x0102_0304_0506_0708),
                b"wg"
            ))]
        );
    }

    #[test]
    fn an_outbox_becomes_one_message_per_run_of_one_relay_in_order() {
        let core = core_with(&["r1", "r2"]);
        let (r1, r2) = (core.relay_id("r1").unwrap(), core.relay_id("r2").unwrap());
        let q = RelayQueue::new(64);
        let mut rx = q.take_receiver().unwrap();
        let mut out = Outbox::new();
        out.push(Destination::Relay { relay: r1, to: 1 }, b"a");
        out.push(Destination::Relay { relay: r1, to: 2 }, b"bb");
        out.push(
            "10.0.0.1:1".parse::<std::net::SocketAddr>().unwrap(),
            b"udp",
        );
        out.push(Destination::Relay { relay: r1, to: 1 }, b"ccc");
        out.push(Destination::Relay { relay: r2, to: 3 }, b"dddd");
        out.push(Destination::Relay { relay: r1, to: 1 }, b"eeeee");
        q.push(&core, &out);
        let sizes: Vec<(String, usize)> = std::iter::from_fn(|| rx.try_recv())
            .map(|t| (t.relay.to_string(), t.datagrams.len()))
            .collect();
        assert_eq!(
            sizes,
            vec![("r1".into(), 3), ("r2".into(), 1), ("r1".into(), 1)]
        );
        q.push(&core, &out);
        assert_eq!(
            drain(&mut rx),
            vec![
                ("r1".to_string(), 1, b"a".to_vec()),
                ("r1".to_string(), 2, b"bb".to_vec()),
                ("r1".to_string(), 1, b"ccc".to_vec()),
                ("r2".to_string(), 3, b"dddd".to_vec()),
                ("r1".to_string(), 1, b"eeeee".to_vec()),
            ]
        );
        assert_eq!(q.sent.load(Ordering::Relaxed), 10);
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_bound_counts_datagrams_and_receiving_frees_room() {
        let core = core_with(&["r1"]);
        let relay = core.relay_id("r1").unwrap();
        let q = RelayQueue::new(4);
        let mut rx = q.take_receiver().unwrap();
        let mut out = Outbox::new();
        for k in 0..3u8 {
            out.push(Destination::Relay { relay, to: 9 }, &[k; 8]);
        }
        q.push(&core, &out); // 3 queued
        q.push(&core, &out); // room for 1: the first one goes, 2 dropped
        assert_eq!(q.sent.load(Ordering::Relaxed), 4);
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 2);
        let got = drain(&mut rx);
        let bodies: Vec<u8> = got.iter().map(|(_, _, b)| b[0]).collect();
        assert_eq!(bodies, vec![0, 1, 2, 0]);
        // Everything received: the whole bound is free again.
        q.push(&core, &out);
        q.push(&core, &out);
        assert_eq!(q.sent.load(Ordering::Relaxed), 8);
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 4);
        assert_eq!(drain(&mut rx).len(), 4);
        // A whole message that does not fit is dropped whole, counted.
        assert!(q.try_send(RelayTransmit::one(Arc::from("r1"), 1, b"x")));
        let five = RelayTransmit {
            relay: Arc::from("r1"),
            datagrams: vec![Bytes::from_static(b"12345678x"); 4],
        };
        assert!(!q.try_send(five));
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 8);
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn a_queue_nobody_takes_any_more_drops_and_gives_the_room_back() {
        let core = core_with(&["r1"]);
        let relay = core.relay_id("r1").unwrap();
        let q = RelayQueue::new(4);
        drop(q.take_receiver());
        let mut out = Outbox::new();
        out.push(Destination::Relay { relay, to: 9 }, b"x");
        for _ in 0..10 {
            q.push(&core, &out);
        }
        assert_eq!(q.sent.load(Ordering::Relaxed), 0);
        assert_eq!(q.dropped_full.load(Ordering::Relaxed), 10);
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }
}
