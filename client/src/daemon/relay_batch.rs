//! Relayed datagrams in batches, both ways, for the relay connections' driver (`relays.rs`).
//!
//! In: after one `read_datagram` wakes the task, every datagram the connection already holds
//! is taken too (up to [`RECV_BATCH`]) and handed to the data plane in one call, which
//! decrypts them under one batch and writes their packets to the TUN coalesced per flow.
//! Out: the data plane's queue carries a batch per outbox; the pump looks the connection up
//! once per batch and hands quinn each datagram, already framed, without a copy.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tracing::trace;
use ward_shared::relay::split_datagram;

use super::lock;
use super::relays::{Live, PumpCounters, RelaySink};
use crate::dataplane::RelayTransmit;

/// Most datagrams taken from a relay connection per wake-up.
pub(super) const RECV_BATCH: usize = 64;

/// `first` and whatever else `conn` has received already (never waits), at most
/// [`RECV_BATCH`] in all, in arrival order. A read that fails stops the batch; the caller's
/// next `read_datagram` reports the error.
pub(super) fn take_ready(conn: &quinn::Connection, first: Bytes, batch: &mut Vec<Bytes>) {
    batch.clear();
    batch.push(first);
    let mut cx = Context::from_waker(Waker::noop());
    while batch.len() < RECV_BATCH {
        let read = conn.read_datagram();
        let mut read = std::pin::pin!(read);
        match read.as_mut().poll(&mut cx) {
            Poll::Ready(Ok(d)) => batch.push(d),
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
}

/// Hands the well-formed datagrams of `batch` (relay header: source device) to `sink` in one
/// call; counts the malformed ones.
pub(super) fn deliver(
    relay: &str,
    batch: &[Bytes],
    sink: Option<&dyn RelaySink>,
    counters: &PumpCounters,
) {
    let mut bodies: Vec<(u64, &[u8])> = Vec::with_capacity(batch.len());
    for d in batch {
        match split_datagram(d) {
            Some((from, body)) => bodies.push((from.0, body)),
            None => {
                counters.malformed_in.fetch_add(1, Ordering::Relaxed);
                trace!(relay, len = d.len(), "malformed relayed datagram");
            }
        }
    }
    if let Some(sink) = sink {
        if !bodies.is_empty() {
            sink.relayed_batch(relay, &bodies);
        }
    }
}

/// Sends the datagrams of `t` on the named relay's live connection, or drops them (counted)
/// when there is none.
pub(super) fn send(t: &RelayTransmit, live: &Live, counters: &PumpCounters) {
    let n = u64::try_from(t.datagrams.len()).unwrap_or(u64::MAX);
    let conn = lock(live).get(&t.relay).cloned();
    let Some(conn) = conn else {
        counters.no_connection.fetch_add(n, Ordering::Relaxed);
        trace!(relay = %t.relay, n, "no live connection to the relay: datagrams dropped");
        return;
    };
    let (mut sent, mut failed) = (0, 0);
    for d in &t.datagrams {
        match conn.send_datagram(d.clone()) {
            Ok(()) => sent += 1,
            Err(e) => {
                failed += 1;
                trace!(relay = %t.relay, error = %e, "relayed datagram not sent");
            }
        }
    }
    if sent > 0 {
        counters.sent.fetch_add(sent, Ordering::Relaxed);
    }
    if failed > 0 {
        counters.send_failed.fetch_add(failed, Ordering::Relaxed);
    }
}
