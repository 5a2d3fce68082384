//! Relayed datagrams in batches, both ways, for the relay connections' driver (`relays.rs`).
//!
//! In: after one `read_datagram` wakes the task, every datagram the connection already holds
//! is taken too (up to [`RECV_BATCH`]) and handed to the data plane in one call, which
//! decrypts them under one batch and writes their packets to the TUN coalesced per flow.
//! The batch is handed to a thread of its own ([`Inbound`], `ward-relay-rx`) that decrypts
//! it and writes the TUN, so the daemon's tokio thread spends itself on QUIC alone (reading,
//! decrypting and acknowledging the relay connection's packets) while WireGuard decryption and
//! the TUN writes of the previous batch run alongside on the other core: on a relayed bulk
//! stream that one thread was the receiver's bottleneck. The hand-off moves the `Bytes`
//! (no copy); when the thread's queue is full the batch is decrypted in place, as before, so
//! nothing is dropped and nothing waits. Batches of one relay that queued while the thread was
//! busy are decrypted and written together (up to [`INBOUND_MERGE`] datagrams), in order.
//! Out: the data plane's queue carries a batch per outbox; the pump looks the connection up
//! once per batch and hands quinn each datagram, already framed, without a copy.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tracing::trace;
use ward_shared::relay::split_datagram;

use super::lock;
use super::relays::relay_link::RelayLink;
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

/// Batches queued for the `ward-relay-rx` thread at most (64 datagrams each at most): a few
/// milliseconds of a fast stream, enough to ride out a scheduling hiccup of either thread.
pub(super) const INBOUND_QUEUE: usize = 64;

/// The thread that decrypts relayed batches and writes them to the TUN, off the tokio thread.
/// It holds the sink weakly (the data plane stays owned by the session) and ends when every
/// [`Inbound`] handle is gone.
pub(super) struct Inbound {
    tx: SyncSender<(Arc<str>, Vec<Bytes>)>,
    sink: Arc<dyn RelaySink>,
    counters: Arc<PumpCounters>,
}

impl Inbound {
    /// Starts the thread; `None` (and a warning) if it cannot be spawned: batches are then
    /// delivered on the caller's thread.
    pub(super) fn start(sink: Arc<dyn RelaySink>, counters: Arc<PumpCounters>) -> Option<Self> {
        let (tx, rx) = sync_channel(INBOUND_QUEUE);
        let weak = Arc::downgrade(&sink);
        let thread_counters = counters.clone();
        match std::thread::Builder::new()
            .name("ward-relay-rx".into())
            .spawn(move || inbound_loop(rx, weak, thread_counters))
        {
            Ok(_) => Some(Inbound { tx, sink, counters }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the relayed-receive thread: relayed datagrams are decrypted on the session thread");
                None
            }
        }
    }

    /// Hands `batch` (taken, left empty) to the thread, or delivers it here when the thread's
    /// queue is full or gone (counted in `inline_in`).
    pub(super) fn deliver(&self, relay: &Arc<str>, batch: &mut Vec<Bytes>) {
        let owned = std::mem::replace(batch, Vec::with_capacity(RECV_BATCH));
        match self.tx.try_send((relay.clone(), owned)) {
            Ok(()) => {}
            Err(TrySendError::Full((_, owned)) | TrySendError::Disconnected((_, owned))) => {
                self.counters.inline_in.fetch_add(1, Ordering::Relaxed);
                deliver(relay, &owned, Some(&*self.sink), &self.counters);
            }
        }
    }
}

/// Most datagrams the `ward-relay-rx` thread decrypts and writes in one call: batches queued
/// behind the one it wakes for join it up to this many, so a thread that fell behind catches
/// up in larger TUN writes (coalesced per flow) instead of one call per small batch.
pub(super) const INBOUND_MERGE: usize = 4 * RECV_BATCH;

fn inbound_loop(
    rx: Receiver<(Arc<str>, Vec<Bytes>)>,
    sink: Weak<dyn RelaySink>,
    counters: Arc<PumpCounters>,
) {
    // A batch from another relay than the merged ones: the next round starts with it.
    let mut next = None;
    loop {
        let (relay, mut merged) = match next.take() {
            Some(b) => b,
            None => match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            },
        };
        next = merge_queued(&rx, &relay, &mut merged);
        // The session dropped the data plane: what is still queued has nowhere to go.
        let Some(sink) = sink.upgrade() else { continue };
        deliver(&relay, &merged, Some(&*sink), &counters);
    }
}

/// Appends to `merged` the batches from `relay` already queued on `rx` (never waits), while
/// it holds fewer than [`INBOUND_MERGE`] datagrams; returns the first queued batch from
/// another relay, which must be delivered after `merged`.
fn merge_queued(
    rx: &Receiver<(Arc<str>, Vec<Bytes>)>,
    relay: &Arc<str>,
    merged: &mut Vec<Bytes>,
) -> Option<(Arc<str>, Vec<Bytes>)> {
    while merged.len() < INBOUND_MERGE {
        match rx.try_recv() {
            Ok((r, b)) if r == *relay => merged.extend(b),
            Ok(other) => return Some(other),
            Err(_) => break,
        }
    }
    None
}

/// Sends the datagrams of `t` on the named relay's live connection (in plain UDP while that
/// link is bound, `scratch` holding the framed batch; else as QUIC datagrams), or drops them
/// (counted) when there is none.
pub(super) fn send(t: &RelayTransmit, live: &Live, counters: &PumpCounters, scratch: &mut Vec<u8>) {
    let n = u64::try_from(t.datagrams.len()).unwrap_or(u64::MAX);
    let conn = lock(live).get(&t.relay).cloned();
    let Some(conn) = conn else {
        counters.no_connection.fetch_add(n, Ordering::Relaxed);
        trace!(relay = %t.relay, n, "no live connection to the relay: datagrams dropped");
        return;
    };
    if let RelayLink::Quic(_, Some(plain)) = &conn {
        if plain.send(&t.datagrams, scratch) {
            return;
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use ward_shared::relay::encode_datagram;
    use ward_shared::wire::DeviceId;

    /// A datagram delivered: relay, from, body, the thread it was delivered on.
    type Got = (String, u64, Vec<u8>, String);

    /// Records what it is given and on which thread; blocks while `gate` is closed.
    #[derive(Default)]
    struct Record {
        got: Mutex<Vec<Got>>,
        /// The size of each batch handed over in one call.
        calls: Mutex<Vec<usize>>,
        entered: std::sync::atomic::AtomicUsize,
        gate: Mutex<bool>,
        open: Condvar,
    }

    impl RelaySink for Record {
        fn relayed_batch(&self, relay: &str, datagrams: &[(u64, &[u8])]) {
            self.calls.lock().unwrap().push(datagrams.len());
            for &(from, d) in datagrams {
                self.relayed(relay, from, d);
            }
        }

        fn relayed(&self, relay: &str, from: u64, datagram: &[u8]) {
            self.entered.fetch_add(1, Ordering::SeqCst);
            let mut closed = self.gate.lock().unwrap();
            while *closed {
                closed = self.open.wait(closed).unwrap();
            }
            let thread = std::thread::current().name().unwrap_or("").to_string();
            self.got
                .lock()
                .unwrap()
                .push((relay.into(), from, datagram.to_vec(), thread));
        }
    }

    fn batch(n: u64) -> Vec<Bytes> {
        (0..n)
            .map(|i| Bytes::from(encode_datagram(DeviceId(i), &[i as u8; 3])))
            .collect()
    }

    fn wait_for(rec: &Record, n: usize) {
        for _ in 0..500 {
            if rec.got.lock().unwrap().len() >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("only {} datagrams delivered", rec.got.lock().unwrap().len());
    }

    #[test]
    fn batches_are_decrypted_on_the_relayed_receive_thread_in_order() {
        let rec = Arc::new(Record::default());
        let counters = Arc::new(PumpCounters::default());
        let inbound = Inbound::start(rec.clone(), counters.clone()).unwrap();
        let relay: Arc<str> = Arc::from("r1");
        let mut b = batch(3);
        inbound.deliver(&relay, &mut b);
        assert!(b.is_empty(), "the batch is handed over, not copied");
        // A malformed datagram is counted, the rest delivered.
        let mut b = vec![Bytes::from_static(b"x"), batch(4).pop().unwrap()];
        inbound.deliver(&relay, &mut b);
        wait_for(&rec, 4);
        let got = rec.got.lock().unwrap().clone();
        let froms: Vec<u64> = got.iter().map(|g| g.1).collect();
        assert_eq!(froms, vec![0, 1, 2, 3]);
        assert_eq!(got[3].2, vec![3u8; 3]);
        assert!(got.iter().all(|g| g.0 == "r1" && g.3 == "ward-relay-rx"));
        assert_eq!(counters.malformed_in.load(Ordering::Relaxed), 1);
        assert_eq!(counters.inline_in.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_queue_delivers_on_the_callers_thread_and_drops_nothing() {
        let rec = Arc::new(Record::default());
        *rec.gate.lock().unwrap() = true; // the thread stalls on its first datagram
        let counters = Arc::new(PumpCounters::default());
        let inbound = Inbound::start(rec.clone(), counters.clone()).unwrap();
        let relay: Arc<str> = Arc::from("r1");
        // One batch held by the stalled thread, then INBOUND_QUEUE queued behind it.
        inbound.deliver(&relay, &mut batch(1));
        for _ in 0..500 {
            if rec.entered.load(Ordering::SeqCst) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(rec.entered.load(Ordering::SeqCst), 1);
        for _ in 0..INBOUND_QUEUE {
            inbound.deliver(&relay, &mut batch(1));
        }
        assert_eq!(counters.inline_in.load(Ordering::Relaxed), 0);
        // The next one is delivered here (it waits on the gate, which another thread opens).
        let rec2 = rec.clone();
        let opener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            *rec2.gate.lock().unwrap() = false;
            rec2.open.notify_all();
        });
        inbound.deliver(&relay, &mut batch(1));
        opener.join().unwrap();
        assert_eq!(counters.inline_in.load(Ordering::Relaxed), 1);
        wait_for(&rec, INBOUND_QUEUE + 2);
        let got = rec.got.lock().unwrap();
        assert_eq!(got.len(), INBOUND_QUEUE + 2, "nothing dropped");
        let here = std::thread::current().name().unwrap_or("").to_string();
        assert_eq!(got.iter().filter(|g| g.3 == here).count(), 1);
    }

    /// Datagrams from `relay` numbered `from..from + n`.
    fn numbered(relay: &str, from: u64, n: u64) -> (Arc<str>, Vec<Bytes>) {
        let b = (from..from + n)
            .map(|i| Bytes::from(encode_datagram(DeviceId(i), &[1])))
            .collect();
        (Arc::from(relay), b)
    }

    fn ids(b: &[Bytes]) -> Vec<u64> {
        b.iter().map(|d| split_datagram(d).unwrap().0 .0).collect()
    }

    #[test]
    fn queued_batches_of_one_relay_merge_in_order_up_to_one_from_another() {
        let (tx, rx) = sync_channel(INBOUND_QUEUE);
        tx.send(numbered("r1", 1, 2)).unwrap();
        tx.send(numbered("r1", 3, 3)).unwrap();
        tx.send(numbered("r2", 6, 1)).unwrap();
        tx.send(numbered("r1", 7, 1)).unwrap();
        let (relay, mut merged) = numbered("r1", 0, 1);
        let next = merge_queued(&rx, &relay, &mut merged);
        assert_eq!(ids(&merged), vec![0, 1, 2, 3, 4, 5]);
        // The other relay's batch comes back to be delivered next, then the rest in order.
        let (r, b) = next.unwrap();
        assert_eq!((&*r, ids(&b)), ("r2", vec![6]));
        let (r, b) = rx.try_recv().unwrap();
        assert_eq!((&*r, ids(&b)), ("r1", vec![7]));
        // Nothing queued: nothing merged, nothing waits.
        let (relay, mut merged) = numbered("r1", 0, 1);
        assert!(merge_queued(&rx, &relay, &mut merged).is_none());
        assert_eq!(merged.len(), 1);
    }

    #[test]
    fn merging_stops_at_its_bound_and_leaves_the_rest_queued() {
        let (tx, rx) = sync_channel(INBOUND_QUEUE);
        let full = RECV_BATCH as u64;
        for i in 0..8 {
            tx.send(numbered("r1", 1 + i * full, full)).unwrap();
        }
        let (relay, mut merged) = numbered("r1", 0, 1);
        assert!(merge_queued(&rx, &relay, &mut merged).is_none());
        assert!(merged.len() >= INBOUND_MERGE && merged.len() < INBOUND_MERGE + RECV_BATCH);
        assert_eq!(ids(&merged), (0..merged.len() as u64).collect::<Vec<_>>());
        let left: usize = rx.try_iter().map(|(_, b)| b.len()).sum();
        assert_eq!(merged.len() + left, 1 + 8 * RECV_BATCH);
    }

    #[test]
    fn the_thread_merges_what_queued_while_it_was_busy_and_keeps_relays_apart() {
        let rec = Arc::new(Record::default());
        *rec.gate.lock().unwrap() = true; // the thread stalls on its first datagram
        let counters = Arc::new(PumpCounters::default());
        let inbound = Inbound::start(rec.clone(), counters.clone()).unwrap();
        let (r1, r2): (Arc<str>, Arc<str>) = (Arc::from("r1"), Arc::from("r2"));
        inbound.deliver(&r1, &mut numbered("r1", 0, 1).1);
        for _ in 0..500 {
            if rec.entered.load(Ordering::SeqCst) == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(rec.entered.load(Ordering::SeqCst), 1);
        // Queued behind the stalled call: two batches of r1, one of r2, one more of r1.
        inbound.deliver(&r1, &mut numbered("r1", 1, 2).1);
        inbound.deliver(&r1, &mut numbered("r1", 3, 3).1);
        inbound.deliver(&r2, &mut numbered("r2", 6, 1).1);
        inbound.deliver(&r1, &mut numbered("r1", 7, 2).1);
        *rec.gate.lock().unwrap() = false;
        rec.open.notify_all();
        wait_for(&rec, 9);
        let got = rec.got.lock().unwrap().clone();
        let order: Vec<(String, u64)> = got.iter().map(|g| (g.0.clone(), g.1)).collect();
        let want: Vec<(String, u64)> = (0..9)
            .map(|i| (if i == 6 { "r2" } else { "r1" }.to_string(), i))
            .collect();
        assert_eq!(order, want);
        assert_eq!(*rec.calls.lock().unwrap(), vec![1, 5, 1, 2]);
        assert_eq!(counters.inline_in.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_thread_ends_with_its_handles_and_outlives_no_sink() {
        let rec = Arc::new(Record::default());
        let counters = Arc::new(PumpCounters::default());
        let inbound = Inbound::start(rec.clone(), counters).unwrap();
        drop(inbound);
        // The thread held the sink only weakly and the handle is gone: only we hold it now.
        for _ in 0..100 {
            if Arc::strong_count(&rec) == 1 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the sink is still held");
    }
}
