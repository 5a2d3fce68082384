//! Fan-out of the registry's messages to device connections, I/O-free: when to flush
//! ([`Pacer`]) and what a connection whose queue is full still has to get ([`Backlog`]).
//!
//! Every peer's online or endpoint change yields one `NetmapDelta` to every session that sees
//! the peer. During an admission wave or a reconnect storm that is N deltas to each of N
//! sessions while the devices are busy themselves. The pacer merges bursts of events into one
//! recompute per [`MIN_FLUSH_GAP`]; the backlog keeps, for a connection that cannot take more
//! now, one merged netmap change (plus the newest of each state-like message) instead of one
//! message per change, so a slow but healthy device is never disconnected for being slow and
//! its memory here stays bounded by about one netmap. A connection that takes nothing for
//! [`STUCK_LIMIT`] is given up (the driver closes it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ward_shared::wire::{CoordinatorMsg, Netmap, NetmapDelta, WireError};

/// The shortest time between two flushes (netmap recomputes) while events keep coming. An idle
/// registry flushes an event at once; under a burst the events of up to this long share one
/// recompute. 50 ms is a choice, not a measured optimum (bench/README.md has the 500-session
/// runs with it): short next to the 1 s a revocation may take and to a lease reply's round
/// trip, long next to the tens of events a second a wave of sessions sends. A lease reply or a
/// policy change waits at most this much longer than the flush itself; revocations do not
/// wait for it.
pub const MIN_FLUSH_GAP: Duration = Duration::from_millis(50);

/// How long a connection with a backlog may take nothing at all before it is closed. The
/// device's QUIC connection stays up (its keep-alives are answered by the transport) even
/// when its session task does not read, so without a limit a wedged device would hold a stale
/// netmap forever. 30 s is well above any pause a live device has (its control idle timeout
/// is 6 s, the coordinator's 20 s) and above most of the actor's delays measured at 500
/// sessions on a loaded machine (a policy apply waited 7–37 s there), so mostly a device that
/// stopped reading is closed; it reconnects and gets a full netmap.
pub const STUCK_LIMIT: Duration = Duration::from_secs(30);

/// At most this many punch requests wait for one connection (the oldest go first: a punch
/// is only worth sending while fresh, and the peer asks again).
pub const PUNCHES_HELD: usize = 16;

/// At most this many other messages (kinds not merged here) wait for one connection; more
/// means the connection is not keeping up at all and is closed.
pub const OTHERS_HELD: usize = 64;

/// When the next flush is due.
#[derive(Debug, Clone)]
pub struct Pacer {
    gap: Duration,
    last: Option<Instant>,
    pending: bool,
    urgent: bool,
}

impl Pacer {
    pub fn new(gap: Duration) -> Self {
        Self {
            gap,
            last: None,
            pending: false,
            urgent: false,
        }
    }

    /// Something changed that a flush must publish; `urgent` (a revocation) flushes at once.
    pub fn note(&mut self, urgent: bool) {
        self.pending = true;
        self.urgent |= urgent;
    }

    /// How long until the next flush is due: `None` when nothing waits for one, zero when
    /// it is due now.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        if !self.pending {
            return None;
        }
        if self.urgent {
            return Some(Duration::ZERO);
        }
        Some(match self.last {
            Some(t) => (t + self.gap).saturating_duration_since(now),
            None => Duration::ZERO,
        })
    }

    pub fn due(&self, now: Instant) -> bool {
        self.wait(now) == Some(Duration::ZERO)
    }

    /// A flush ended at `at`.
    pub fn flushed(&mut self, at: Instant) {
        self.last = Some(at);
        self.pending = false;
        self.urgent = false;
    }
}

/// The registry sent a connection more than its queue took: what it still has to get.
#[derive(Debug, Default)]
pub struct Backlog {
    /// The netmap change not sent yet: a full netmap (with every later delta applied to it)
    /// or the deltas since the last one sent, merged.
    netmap: Option<PendingNetmap>,
    wants: Option<CoordinatorMsg>,
    verdict: Option<CoordinatorMsg>,
    rotate: Option<CoordinatorMsg>,
    punches: VecDeque<CoordinatorMsg>,
    others: VecDeque<CoordinatorMsg>,
    /// Since when the connection has taken nothing (set while anything is held).
    since: Option<Instant>,
}

#[derive(Debug)]
enum PendingNetmap {
    Full(Netmap),
    Delta(NetmapDelta),
}

/// Why a message could not be held.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum HoldError {
    /// A delta that does not follow the netmap change held: the device's state cannot be
    /// built any more (the registry's sequence was broken), so the connection must restart.
    #[error("netmap change lost: {0}")]
    Gap(WireError),
    #[error("more than {OTHERS_HELD} messages waiting")]
    Full,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.netmap.is_none()
            && self.wants.is_none()
            && self.verdict.is_none()
            && self.rotate.is_none()
            && self.punches.is_empty()
            && self.others.is_empty()
    }

    /// Holds `msg` until the connection takes more, merged with what is held already.
    pub fn hold(&mut self, msg: CoordinatorMsg, now: Instant) -> Result<(), HoldError> {
        if self.since.is_none() {
            self.since = Some(now);
        }
        match msg {
            CoordinatorMsg::Netmap(nm) => self.netmap = Some(PendingNetmap::Full(nm)),
            CoordinatorMsg::NetmapDelta(d) => match &mut self.netmap {
                None => self.netmap = Some(PendingNetmap::Delta(d)),
                Some(PendingNetmap::Full(nm)) => nm.apply(&d).map_err(HoldError::Gap)?,
                Some(PendingNetmap::Delta(held)) => held.merge(d).map_err(HoldError::Gap)?,
            },
            m @ CoordinatorMsg::PostureWants(_) => self.wants = Some(m),
            m @ CoordinatorMsg::PostureVerdict(_) => self.verdict = Some(m),
            m @ CoordinatorMsg::RotateNow { .. } => self.rotate = Some(m),
            m @ CoordinatorMsg::Punch { .. } => {
                if self.punches.len() >= PUNCHES_HELD {
                    self.punches.pop_front();
                }
                self.punches.push_back(m);
            }
            m => {
                if self.others.len() >= OTHERS_HELD {
                    return Err(HoldError::Full);
                }
                self.others.push_back(m);
            }
        }
        Ok(())
    }

    /// The next message to send, netmap first (the verdict and wants that follow refer to
    /// it), once the connection has room for one.
    pub fn pop(&mut self) -> Option<CoordinatorMsg> {
        let msg = match self.netmap.take() {
            Some(PendingNetmap::Full(nm)) => Some(CoordinatorMsg::Netmap(nm)),
            Some(PendingNetmap::Delta(d)) => Some(CoordinatorMsg::NetmapDelta(d)),
            None => self
                .wants
                .take()
                .or_else(|| self.verdict.take())
                .or_else(|| self.rotate.take())
                .or_else(|| self.punches.pop_front())
                .or_else(|| self.others.pop_front()),
        };
        if self.is_empty() {
            self.since = None;
        }
        msg
    }

    /// The connection took a message at `now`: the stuck clock starts again.
    pub fn progressed(&mut self, now: Instant) {
        self.since = (!self.is_empty()).then_some(now);
    }

    /// Whether the connection has taken nothing for [`STUCK_LIMIT`] while messages waited.
    pub fn stuck(&self, now: Instant) -> bool {
        self.since
            .is_some_and(|t| now.saturating_duration_since(t) >= STUCK_LIMIT)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test
    use super::*;
    use std::net::Ipv4Addr;
    use ward_shared::names::Hostname;
    use ward_shared::wire::{DeviceId, Peer, SelfInfo, WgPublicKey};

    pub(crate) fn peer(id: u64, online: bool) -> Peer {
        Peer {
            routes: Default::default(),
            device_id: DeviceId(id),
            hostname: Hostname::parse(&format!("h{id}")).unwrap(),
            user: None,
            tags: vec![],
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: "fd00::1".parse().unwrap(),
            wg_public_key: Some(WgPublicKey([id as u8; 32])),
            endpoints: vec![],
            online,
            leases: vec![],
            relay: None,
        }
    }

    pub(crate) fn netmap(seq: u64, peers: Vec<Peer>) -> Netmap {
        Netmap {
            on_demand: false,
            resumed: None,
            seq,
            me: SelfInfo {
                routes: Default::default(),
                device_id: DeviceId(1),
                hostname: Hostname::parse("me").unwrap(),
                ipv4: Ipv4Addr::new(100, 64, 0, 1),
                ipv6: "fd00::1".parse().unwrap(),
                v6_prefix: "fd00::".parse().unwrap(),
                observed_addr: None,
            },
            peers,
            inbound: vec![].into(),
            reach: vec![],
            reach_grants: vec![],
            reach_services: vec![],
            relays: vec![],
            punch: true,
            flows: true,
            policy_version: None,
            shadow_filter: None,
            dns_domain: None,
            coordinators: vec![],
            peer_sets: vec![].into(),
        }
    }

    fn delta(base: u64, upsert: Vec<Peer>, remove: Vec<u64>) -> CoordinatorMsg {
        CoordinatorMsg::NetmapDelta(NetmapDelta {
            upsert,
            remove: remove.into_iter().map(DeviceId).collect(),
            ..NetmapDelta::after(base)
        })
    }

    #[test]
    fn an_idle_registry_flushes_at_once_and_a_busy_one_every_gap() {
        let t0 = Instant::now();
        let gap = Duration::from_millis(50);
        let mut p = Pacer::new(gap);
        assert_eq!(p.wait(t0), None, "nothing to flush");
        p.note(false);
        assert!(
            p.due(t0),
            "the first change after a quiet spell goes out at once"
        );
        p.flushed(t0);
        assert_eq!(p.wait(t0), None);
        p.note(false);
        p.note(false);
        assert_eq!(
            p.wait(t0 + Duration::from_millis(10)),
            Some(Duration::from_millis(40))
        );
        assert!(!p.due(t0 + Duration::from_millis(49)));
        assert!(p.due(t0 + gap), "a burst waits one gap at most");
        p.flushed(t0 + gap);
        p.note(true);
        assert!(p.due(t0 + gap), "a revocation does not wait for the gap");
        p.flushed(t0 + gap);
        p.note(false);
        assert!(
            !p.due(t0 + gap),
            "urgency ends with the flush that carried it"
        );
        assert!(
            p.due(t0 + gap * 3),
            "a change after a long pause goes out at once"
        );
    }

    #[test]
    fn deltas_held_for_a_slow_connection_merge_into_one() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        assert!(b.is_empty());
        let mut device = netmap(5, vec![peer(2, true), peer(3, true)]);
        let mut expected = device.clone();
        let changes = [
            delta(5, vec![peer(4, true)], vec![]),
            delta(6, vec![peer(2, false)], vec![3]),
            delta(7, vec![peer(3, true)], vec![4]),
            delta(8, vec![peer(2, true)], vec![]),
        ];
        for c in changes {
            let CoordinatorMsg::NetmapDelta(d) = &c else {
                unreachable!()
            };
            expected.apply(d).unwrap();
            b.hold(c, t0).unwrap();
        }
        let Some(CoordinatorMsg::NetmapDelta(merged)) = b.pop() else {
            panic!("one merged delta")
        };
        assert!(
            b.is_empty() && b.pop().is_none(),
            "four deltas became one message"
        );
        assert_eq!((merged.base_seq, merged.seq), (5, 9));
        device.apply(&merged).unwrap();
        assert_eq!(device, expected);
    }

    #[test]
    fn a_full_netmap_held_takes_later_deltas_in() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        b.hold(delta(3, vec![peer(9, true)], vec![]), t0).unwrap();
        // A full netmap replaces whatever change was held; deltas after it are applied to it.
        b.hold(CoordinatorMsg::Netmap(netmap(1, vec![peer(2, true)])), t0)
            .unwrap();
        b.hold(delta(1, vec![peer(3, true)], vec![2]), t0).unwrap();
        assert_eq!(
            b.pop(),
            Some(CoordinatorMsg::Netmap(netmap(2, vec![peer(3, true)])))
        );
        assert!(b.is_empty());
    }

    #[test]
    fn a_delta_that_does_not_follow_is_an_error_not_a_guess() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        b.hold(delta(3, vec![], vec![2]), t0).unwrap();
        assert!(matches!(
            b.hold(delta(7, vec![], vec![3]), t0),
            Err(HoldError::Gap(WireError::DeltaGap { have: 4, base: 7 }))
        ));
        let mut b = Backlog::default();
        b.hold(CoordinatorMsg::Netmap(netmap(1, vec![])), t0)
            .unwrap();
        assert!(matches!(
            b.hold(delta(2, vec![], vec![3]), t0),
            Err(HoldError::Gap(_))
        ));
    }

    #[test]
    fn state_messages_keep_the_newest_and_memory_stays_bounded() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        for i in 0..1000u64 {
            b.hold(
                CoordinatorMsg::RotateNow {
                    reason: format!("r{i}"),
                },
                t0,
            )
            .unwrap();
            b.hold(
                CoordinatorMsg::Punch {
                    peer: DeviceId(i),
                    endpoints: vec![],
                },
                t0,
            )
            .unwrap();
            b.hold(delta(i + 1, vec![peer(2 + i % 5, i % 2 == 0)], vec![]), t0)
                .unwrap();
        }
        let mut got = Vec::new();
        while let Some(m) = b.pop() {
            got.push(m);
        }
        assert_eq!(got.len(), 1 + 1 + PUNCHES_HELD, "{got:?}");
        let CoordinatorMsg::NetmapDelta(d) = &got[0] else {
            panic!("netmap first: {got:?}")
        };
        assert_eq!((d.base_seq, d.seq, d.upsert.len()), (1, 1001, 5));
        assert_eq!(
            got[1],
            CoordinatorMsg::RotateNow {
                reason: "r999".into()
            }
        );
        assert!(
            matches!(&got[2], CoordinatorMsg::Punch { peer, .. } if *peer == DeviceId(1000 - PUNCHES_HELD as u64)),
            "the freshest punches are kept: {:?}",
            got[2]
        );
    }

    #[test]
    fn only_a_connection_that_takes_nothing_for_the_limit_is_stuck() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        assert!(!b.stuck(t0 + STUCK_LIMIT * 2), "nothing held: never stuck");
        b.hold(delta(1, vec![], vec![2]), t0).unwrap();
        assert!(!b.stuck(t0 + STUCK_LIMIT - Duration::from_millis(1)));
        // Slow but moving: each message taken starts the clock again.
        b.hold(CoordinatorMsg::RotateNow { reason: "x".into() }, t0)
            .unwrap();
        let later = t0 + STUCK_LIMIT - Duration::from_secs(1);
        assert!(b.pop().is_some());
        b.progressed(later);
        assert!(!b.stuck(t0 + STUCK_LIMIT));
        assert!(b.stuck(later + STUCK_LIMIT));
        assert!(b.pop().is_some());
        b.progressed(later + STUCK_LIMIT);
        assert!(b.is_empty() && !b.stuck(later + STUCK_LIMIT * 5));
    }
}
