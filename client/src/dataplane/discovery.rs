//! Address-discovery answers that share the WireGuard socket: the receive path sets them aside
//! (by their first byte, before any WireGuard processing) into a bounded inbox the agent drains.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use ward_shared::discovery::{BindingResponse, MAGIC};

/// Answers kept until the agent takes them; more are dropped (a run expects one per relay).
pub const INBOX_CAPACITY: usize = 64;

/// Discovery traffic on the data plane's socket (monotonic since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiscoveryCounters {
    /// Binding requests sent.
    pub requests_sent: u64,
    /// Binding responses queued for the agent.
    pub responses_received: u64,
    /// Datagrams with the discovery magic that were not a valid binding response.
    pub malformed: u64,
    /// Valid responses dropped because the inbox was full.
    pub dropped_full: u64,
}

#[derive(Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<(SocketAddr, BindingResponse)>>,
    /// Wakes the agent's driver when an answer arrives (from the receive thread).
    pub(crate) ready: tokio::sync::Notify,
    requests_sent: AtomicU64,
    responses_received: AtomicU64,
    malformed: AtomicU64,
    dropped_full: AtomicU64,
}

/// Whether a datagram belongs to address discovery: one byte compare (0xFF never starts a
/// WireGuard message), so WireGuard traffic pays nothing more.
#[inline]
pub(crate) fn is_discovery_byte(datagram: &[u8]) -> bool {
    datagram.first() == Some(&MAGIC[0])
}

impl Inbox {
    /// A datagram whose first byte is the discovery magic's: queued if it is a valid response,
    /// counted and dropped otherwise.
    pub(crate) fn handle(&self, from: SocketAddr, datagram: &[u8]) {
        let Ok(resp) = BindingResponse::decode(datagram) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= INBOX_CAPACITY {
                self.dropped_full.fetch_add(1, Ordering::Relaxed);
                return;
            }
            q.push_back((from, resp));
        }
        self.responses_received.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_one();
    }

    pub(crate) fn take(&self) -> Vec<(SocketAddr, BindingResponse)> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.drain(..).collect()
    }

    pub(crate) fn sent(&self) {
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn counters(&self) -> DiscoveryCounters {
        DiscoveryCounters {
            requests_sent: self.requests_sent.load(Ordering::Relaxed),
            responses_received: self.responses_received.load(Ordering::Relaxed),
            malformed: self.malformed.load(Ordering::Relaxed),
            dropped_full: self.dropped_full.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::discovery::BindingRequest;

    #[test]
    fn wireguard_messages_are_not_discovery() {
        for t in 1u8..=4 {
            assert!(!is_discovery_byte(&[t, 0, 0, 0]));
        }
        assert!(!is_discovery_byte(&[]));
        assert!(is_discovery_byte(
            &BindingRequest { txid: [1; 12] }.encode()
        ));
    }

    #[test]
    fn valid_answers_are_queued_malformed_counted_and_bounded() {
        let inbox = Inbox::default();
        let from: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let resp = BindingResponse {
            txid: [7; 12],
            observed: "203.0.113.7:51820".parse().unwrap(),
        };
        inbox.handle(from, &resp.encode());
        inbox.handle(from, &[0xff, b'W', b'R', b'D', 1, 2]);
        // A request arriving here is not an answer.
        inbox.handle(from, &BindingRequest { txid: [1; 12] }.encode());
        assert_eq!(inbox.take(), vec![(from, resp)]);
        assert!(inbox.take().is_empty());
        for _ in 0..INBOX_CAPACITY + 3 {
            inbox.handle(from, &resp.encode());
        }
        assert_eq!(inbox.take().len(), INBOX_CAPACITY);
        let c = inbox.counters();
        assert_eq!(c.malformed, 2);
        assert_eq!(c.dropped_full, 3);
        assert_eq!(c.responses_received, 1 + INBOX_CAPACITY as u64);
    }
}
