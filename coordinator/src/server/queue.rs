//! The registry actor's inbox: two queues, one bounded and one that needs no bound.
//!
//! - **Connection events** (device and relay sessions, enrollments): a bounded queue of
//!   [`CONNECTION_EVENTS`]. A connection task that finds it full waits ([`Events::send`]) before
//!   it reads its next frame, so a flooding device slows its own QUIC/TCP stream (flow control
//!   reaches its sender) and never grows the queue; nothing is dropped, so a `LeaseActive`
//!   revocation, a narrowing posture report or a `Closed` always reaches the registry. Tokio's
//!   bounded queue hands out free slots in arrival order, so a waiting connection gets its turn
//!   whatever another one sends.
//! - **Internal events** (the actor's own effects feeding back, such as a stored automatic
//!   quarantine, admin requests and metrics scrapes): an unbounded queue that never waits, read
//!   first. It is bounded by what produces it: each automatic quarantine is one blocking task
//!   the actor started (at most one per device per change), and each admin request or scrape
//!   (their connections are capped) waits for its reply before it sends again.
//!
//! The actor only receives from the bounded queue and never waits to send into it, and the
//! internal queue never waits, so no wait can close a cycle through the actor: no deadlock.

use tokio::sync::mpsc;

use super::actor::Event;
use crate::admin::api::EventQueueView;

/// Connection events waiting for the registry actor at most.
pub(super) const CONNECTION_EVENTS: usize = 4096;

/// The sending side, shared by every task.
#[derive(Clone)]
pub(super) struct Events {
    connections: mpsc::Sender<Event>,
    internal: mpsc::UnboundedSender<Event>,
}

/// The actor's receiving side.
pub(super) struct EventRx {
    connections: mpsc::Receiver<Event>,
    internal: mpsc::UnboundedReceiver<Event>,
    capacity: usize,
    max_depth: usize,
}

pub(super) fn channel(capacity: usize) -> (Events, EventRx) {
    let capacity = capacity.max(1);
    let (ctx, crx) = mpsc::channel(capacity);
    let (itx, irx) = mpsc::unbounded_channel();
    (
        Events {
            connections: ctx,
            internal: itx,
        },
        EventRx {
            connections: crx,
            internal: irx,
            capacity,
            max_depth: 0,
        },
    )
}

impl Events {
    /// From a connection task: waits while the queue is full (the connection reads nothing
    /// meanwhile). Never drops the event while the actor runs.
    pub(super) async fn send(&self, ev: Event) {
        let _ = self.connections.send(ev).await;
    }

    /// From the actor's effects and the admin socket: never waits (see the module header for
    /// why this queue stays small).
    pub(super) fn send_internal(&self, ev: Event) {
        let _ = self.internal.send(ev);
    }
}

impl EventRx {
    /// The next event, internal ones first; `None` once every sender is gone.
    pub(super) async fn recv(&mut self) -> Option<Event> {
        // Sampled as the actor comes to read: the depth it found.
        self.max_depth = self.max_depth.max(self.connections.len());
        tokio::select! {
            biased;
            Some(ev) = self.internal.recv() => Some(ev),
            ev = self.connections.recv() => ev,
        }
    }

    /// An event already waiting (internal ones first), without waiting: how the actor gathers
    /// a batch after the first event woke it.
    pub(super) fn try_recv(&mut self) -> Option<Event> {
        self.max_depth = self.max_depth.max(self.connections.len());
        self.internal
            .try_recv()
            .ok()
            .or_else(|| self.connections.try_recv().ok())
    }

    /// The queues' depth now and the deepest the connection queue has been.
    pub(super) fn view(&self) -> EventQueueView {
        EventQueueView {
            capacity: self.capacity,
            depth: self.connections.len(),
            max_depth: self.max_depth,
            internal_depth: self.internal.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use std::time::Duration;
    use ward_shared::wire::DeviceId;

    fn closed(id: u64, conn: u64) -> Event {
        Event::Closed {
            id: DeviceId(id),
            conn,
        }
    }

    /// Gathering a batch never waits: internal events first, then connection events in order,
    /// then nothing.
    #[tokio::test]
    async fn try_recv_gathers_what_waits_internal_first() {
        let (tx, mut rx) = channel(8);
        assert!(rx.try_recv().is_none());
        tx.send(closed(1, 0)).await;
        tx.send(closed(1, 1)).await;
        tx.send_internal(closed(2, 0));
        let got: Vec<(u64, u64)> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| match e {
                Event::Closed { id, conn } => (id.0, conn),
                _ => panic!("unexpected event"),
            })
            .collect();
        assert_eq!(got, vec![(2, 0), (1, 0), (1, 1)]);
        assert_eq!(rx.view().max_depth, 2);
    }

    /// Many sessions flood while the actor is busy: the queue stops at its bound, the senders
    /// wait instead, the actor's own events still go through at once, and once the actor
    /// reads again every event arrives, in each session's order, none lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_waits_at_the_bound_and_loses_nothing() {
        const SESSIONS: u64 = 50;
        const EACH: u64 = 200;
        const BOUND: usize = 64;
        let (tx, mut rx) = channel(BOUND);
        let mut tasks = Vec::new();
        for s in 0..SESSIONS {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..EACH {
                    tx.send(closed(s, i)).await;
                }
            }));
        }
        // The actor is busy: nothing is read for a while.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = rx.view();
        assert_eq!(
            v.depth, BOUND,
            "the queue fills to its bound and no further"
        );
        assert!(tasks.iter().all(|t| !t.is_finished()), "the senders wait");
        // The actor's own events never wait behind the flood, and come first.
        tx.send_internal(closed(999, 0));
        assert_eq!(rx.view().internal_depth, 1);
        match rx.recv().await {
            Some(Event::Closed { id, .. }) => assert_eq!(id, DeviceId(999)),
            _ => panic!("the internal event comes first"),
        }
        let mut next = vec![0u64; SESSIONS as usize];
        let mut got = 0;
        while got < SESSIONS * EACH {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Event::Closed { id, conn })) => {
                    assert_eq!(conn, next[id.0 as usize], "in order for session {}", id.0);
                    next[id.0 as usize] += 1;
                    got += 1;
                }
                Ok(_) => panic!("unexpected event"),
                Err(_) => panic!("stalled after {got} events"),
            }
            assert!(rx.view().depth <= BOUND);
        }
        for t in tasks {
            t.await.unwrap();
        }
        let v = rx.view();
        assert!(v.max_depth <= BOUND, "{v:?}");
        assert_eq!(v.max_depth, BOUND, "{v:?}");
        assert_eq!((v.depth, v.internal_depth), (0, 0));
    }
}
