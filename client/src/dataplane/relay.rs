//! The relay queue: datagrams the engine routed through a relay ([`Destination::Relay`]) leave
//! the data-plane threads here, for the daemon to send on its QUIC connection to that relay.
//!
//! Bounded, and never blocking a packet thread: a full queue (or one nobody takes) drops the
//! datagram and counts it; WireGuard and the inner stack recover from loss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use super::engine::{Core, Destination, Outbox, RelayId};

/// Datagrams waiting for the daemon. About 1.5 MB of 1200-byte datagrams: room for bursts, no
/// more than a few milliseconds of a fast relay connection.
pub(crate) const RELAY_QUEUE: usize = 1024;

/// One WireGuard datagram to send through a relay to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTransmit {
    /// The relay's name.
    pub relay: Arc<str>,
    /// The destination device's id.
    pub to: u64,
    pub datagram: Vec<u8>,
}

pub(crate) struct RelayQueue {
    tx: mpsc::Sender<RelayTransmit>,
    /// Taken once by the daemon.
    rx: Mutex<Option<mpsc::Receiver<RelayTransmit>>>,
    pub(crate) sent: AtomicU64,
    pub(crate) dropped_full: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) dropped_unknown_relay: AtomicU64,
}

impl RelayQueue {
    pub(crate) fn new(capacity: usize) -> RelayQueue {
        let (tx, rx) = mpsc::channel(capacity);
        RelayQueue {
            tx,
            rx: Mutex::new(Some(rx)),
            sent: AtomicU64::new(0),
            dropped_full: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_unknown_relay: AtomicU64::new(0),
        }
    }

    pub(crate) fn take_receiver(&self) -> Option<mpsc::Receiver<RelayTransmit>> {
        self.rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Queues the relayed datagrams of `out` (the UDP ones are the socket's). Never blocks.
    pub(crate) fn push(&self, core: &Core, out: &Outbox) {
        if out.relayed() == 0 {
            return;
        }
        let bytes = out.bytes();
        let mut name: Option<(RelayId, Arc<str>)> = None;
        let (mut sent, mut dropped) = (0, 0);
        for t in out.transmits() {
            let Destination::Relay { relay, to } = t.dst else {
                continue;
            };
            let relay_name = match &name {
                Some((id, n)) if *id == relay => n.clone(),
                _ => {
                    // Every id the engine hands out has a name.
                    let Some(n) = core.relay_name(relay) else {
                        dropped += 1;
                        continue;
                    };
                    name = Some((relay, n.clone()));
                    n
                }
            };
            let datagram = bytes[t.start..t.start + t.len].to_vec();
            match self.tx.try_send(RelayTransmit {
                relay: relay_name,
                to,
                datagram,
            }) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_) | mpsc::error::TrySendError::Closed(_)) => {
                    dropped += 1
                }
            }
        }
        if sent > 0 {
            self.sent.fetch_add(sent, Ordering::Relaxed);
        }
        if dropped > 0 {
            tracing::trace!(dropped, "relay queue full: datagrams dropped");
            self.dropped_full.fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::dataplane::engine::CoreConfig;
    use std::time::Instant;

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let core = Core::new(
            CoreConfig {
                private_key: [7; 32],
                persistent_keepalive: None,
                v6_prefix: None,
            },
            1,
        );
        core.set_relays(vec![("r1".into(), 1200)], Instant::now());
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
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (&*first.relay, first.to, first.datagram),
            ("r1", 9, vec![0; 40])
        );
        assert_eq!(rx.try_recv().unwrap().datagram, vec![1; 40]);
        assert!(
            rx.try_recv().is_err(),
            "the UDP datagram is not the queue's"
        );
    }
}
