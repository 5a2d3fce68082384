//! One relay link exactly as the daemon runs it (the link task, the pump, the plain-UDP path,
//! the relayed-receive thread), without a data plane: what a test sends goes into the link's
//! outbound queue, what arrives is collected. Public for the whole-system tests
//! (`tests/tests/relay.rs` drives it against the real `ward-relay`); the daemon does not use it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use ward_shared::relay::SignedTicket;

use super::{lock, Credentials, RelayClients, RelaySink};
use crate::agent::RelayConnEvent;
use crate::control::Configs;
use crate::dataplane::{RelayQueue, RelayTransmit};

/// A relayed datagram received: source device id and WireGuard datagram.
pub type Received = (u64, Vec<u8>);

struct Collect(mpsc::UnboundedSender<Received>);

impl RelaySink for Collect {
    fn relayed(&self, _relay: &str, from: u64, datagram: &[u8]) {
        let _ = self.0.send((from, datagram.to_vec()));
    }
}

/// The plain-UDP path's counters (see the daemon's `relay_plain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlainCounts {
    pub sent: u64,
    pub received: u64,
    pub dropped_in: u64,
    pub fallbacks: u64,
}

/// A relay link to one relay, with its own QUIC endpoint.
pub struct RelayLinkHarness {
    relay: Arc<str>,
    clients: RelayClients,
    queue: RelayQueue,
    received: mpsc::UnboundedReceiver<Received>,
    events: mpsc::Receiver<RelayConnEvent>,
    _sink: Arc<dyn RelaySink>,
}

impl RelayLinkHarness {
    /// Connects to relay `name` at `addr` with `ticket` and the device's relay `configs`.
    pub fn connect(
        name: &str,
        addr: &str,
        ticket: SignedTicket,
        configs: Configs,
    ) -> anyhow::Result<Self> {
        let endpoint = crate::control::client_endpoint()?;
        let (in_tx, received) = mpsc::unbounded_channel();
        let sink: Arc<dyn RelaySink> = Arc::new(Collect(in_tx));
        let queue = RelayQueue::new(crate::dataplane::RELAY_QUEUE);
        let (ev_tx, events) = mpsc::channel(64);
        let mut clients = RelayClients::with(
            Some(endpoint),
            Some(sink.clone()),
            queue.take_receiver(),
            ev_tx,
        );
        clients.connect(
            name.to_string(),
            addr.to_string(),
            Credentials { ticket, configs },
        );
        Ok(RelayLinkHarness {
            relay: Arc::from(name),
            clients,
            queue,
            received,
            events,
            _sink: sink,
        })
    }

    /// Waits (up to `wait`) for the link to be welcomed.
    pub async fn wait_up(&mut self, wait: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow::anyhow!("relay link not up within {wait:?}"))?;
            match ev {
                Some(RelayConnEvent::Up { .. }) => return Ok(()),
                Some(_) => {}
                None => anyhow::bail!("relay link task ended"),
            }
        }
    }

    /// Queues one WireGuard `datagram` for device `to` through the relay.
    pub fn send(&self, to: u64, datagram: &[u8]) -> bool {
        self.queue
            .try_send(RelayTransmit::one(self.relay.clone(), to, datagram))
    }

    /// The next datagram received (up to `wait`).
    pub async fn recv(&mut self, wait: Duration) -> Option<Received> {
        tokio::time::timeout(wait, self.received.recv())
            .await
            .ok()
            .flatten()
    }

    /// Whether the link's relayed datagrams go in plain UDP now.
    pub fn plain_udp_bound(&self) -> bool {
        lock(&self.clients.transports)
            .relay_udp_bound
            .contains(&*self.relay)
    }

    pub fn plain_counts(&self) -> PlainCounts {
        let p = &self.clients.counters.plain;
        PlainCounts {
            sent: p.sent.load(Ordering::Relaxed),
            received: p.received.load(Ordering::Relaxed),
            dropped_in: p.dropped_in.load(Ordering::Relaxed),
            fallbacks: p.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Datagrams sent as QUIC datagrams (not in plain UDP).
    pub fn quic_sent(&self) -> u64 {
        self.clients.counters.sent.load(Ordering::Relaxed)
    }
}
