//! Per-session limits on what an enrolled device may send, free of I/O.
//!
//! ```text
//! session driver, per message from the device (time passed in):
//!   limits.handle(kind, now_ms) -> Pass                  forward it now
//!                               -> Defer { until_ms }    (update, posture) keep only the latest;
//!                                                        forward it at until_ms (poll_release)
//!                               -> Drop                  (denied flows) advisory: discard it;
//!                                                        (flow reports) not acknowledged: the
//!                                                        device sends them again later
//!                               -> Exceeded              close the session (ErrorCode::RateLimited)
//!   at the earliest pending deadline: limits.poll_release(now_ms) -> kinds now due
//! ```
//!
//! Each message kind has two token buckets. The soft one is what an honest agent needs (its
//! reports are event-driven but bounded by its one-second tick); above it, updates and
//! posture reports are coalesced (the latest replaces the one waiting, so a flapping signal
//! costs one registry event and one database write per refill, whatever the flap rate), denied
//! flows are dropped, and the rest are refused. The hard one (ten times the soft rate) is what
//! no honest agent reaches: over it, the session ends with a clear error. So one device's
//! messages cost the coordinator a bounded rate of registry events and database writes.

/// What a device sends, as far as limits go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Update,
    Posture,
    DeniedFlows,
    /// Flow record reports (`flows`).
    Flows,
    LeaseRequest,
    LeaseActive,
    RenewCert,
    RelayTicket,
    Ping,
    Punch,
    /// `want_peer` (protocol 4).
    WantPeer,
}

impl Kind {
    const ALL: [Kind; 11] = [
        Kind::Update,
        Kind::Posture,
        Kind::DeniedFlows,
        Kind::Flows,
        Kind::LeaseRequest,
        Kind::LeaseActive,
        Kind::RenewCert,
        Kind::RelayTicket,
        Kind::Ping,
        Kind::Punch,
        Kind::WantPeer,
    ];

    /// The wire name, for errors and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Posture => "posture",
            Kind::DeniedFlows => "denied_flows",
            Kind::Flows => "flows",
            Kind::LeaseRequest => "lease_request",
            Kind::LeaseActive => "lease_active",
            Kind::RenewCert => "renew_cert",
            Kind::RelayTicket => "relay_ticket_request",
            Kind::Ping => "ping",
            Kind::Punch => "punch_request",
            Kind::WantPeer => "want_peer",
        }
    }

    /// (burst, milliseconds per token) of the soft bucket.
    fn soft(self) -> (u32, u64) {
        match self {
            Kind::Update => (10, 500),
            Kind::Posture => (10, 500),
            Kind::DeniedFlows => (10, 500),
            // One report per window normally; an agent sends at most one every 2 s (its spool,
            // after being offline, a few at once). 20 at once, then one a second, bounds what
            // one device can make the store write (at most 56 records a report).
            Kind::Flows => (20, 1_000),
            Kind::LeaseRequest => (10, 1_000),
            Kind::LeaseActive => (10, 1_000),
            Kind::RenewCert => (5, 60_000),
            Kind::RelayTicket => (20, 1_000),
            Kind::Ping => (20, 200),
            // A network change asks for every peer at once; the registry has its own budget.
            Kind::Punch => (32, 250),
            // A device opening connections to many peers at once (a scan of its own
            // services, a burst of new destinations); the registry has its own budget.
            Kind::WantPeer => (64, 20),
        }
    }

    /// What happens above the soft limit.
    fn over_soft(self) -> Decision {
        match self {
            // The latest state is what matters: keep it and send it later.
            Kind::Update | Kind::Posture => Decision::Defer { until_ms: 0 },
            // Hints: losing some costs only a slower path switch.
            // A want dropped is asked again a second later.
            Kind::DeniedFlows | Kind::Punch | Kind::WantPeer => Decision::Drop,
            // Unacknowledged: the device keeps the report and sends it again later.
            Kind::Flows => Decision::Drop,
            Kind::LeaseRequest
            | Kind::LeaseActive
            | Kind::RenewCert
            | Kind::RelayTicket
            | Kind::Ping => Decision::Exceeded,
        }
    }
}

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Decision {
    Pass,
    /// Keep it (replacing any older one of its kind) and forward it at `until_ms`.
    Defer {
        until_ms: i64,
    },
    Drop,
    /// The session is over its limits: close it.
    Exceeded,
}

/// How many times the soft rate the hard limit allows.
const HARD_FACTOR: u32 = 10;

#[derive(Debug, Clone)]
struct Bucket {
    burst: u32,
    ms_per_token: u64,
    /// Tokens in thousandths, so refills are exact in integer arithmetic.
    milli: u64,
    at_ms: i64,
}

impl Bucket {
    fn new(burst: u32, ms_per_token: u64, now_ms: i64) -> Self {
        Self {
            burst,
            ms_per_token: ms_per_token.max(1),
            milli: u64::from(burst) * 1000,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let dt = u64::try_from(now_ms.saturating_sub(self.at_ms)).unwrap_or(0);
        self.at_ms = self.at_ms.max(now_ms);
        let add = dt.saturating_mul(1000) / self.ms_per_token;
        self.milli = self
            .milli
            .saturating_add(add)
            .min(u64::from(self.burst) * 1000);
    }

    fn take(&mut self, now_ms: i64) -> bool {
        self.refill(now_ms);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    fn is_full(&self, now_ms: i64) -> bool {
        let mut b = self.clone();
        b.refill(now_ms);
        b.milli >= u64::from(b.burst) * 1000
    }

    /// When the next whole token is there.
    fn next_token_ms(&self) -> i64 {
        let missing = 1000u64.saturating_sub(self.milli);
        let wait = missing.saturating_mul(self.ms_per_token).div_ceil(1000);
        self.at_ms
            .saturating_add(i64::try_from(wait).unwrap_or(i64::MAX))
    }
}

#[derive(Debug, Clone)]
struct PerKind {
    soft: Bucket,
    hard: Bucket,
    /// A deferred message of this kind waits for this time.
    pending_until: Option<i64>,
}

/// The limits of one device session.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    kinds: Vec<(Kind, PerKind)>,
}

impl SessionLimits {
    pub fn new(now_ms: i64) -> Self {
        let kinds = Kind::ALL
            .iter()
            .map(|k| {
                let (burst, ms) = k.soft();
                (
                    *k,
                    PerKind {
                        soft: Bucket::new(burst, ms, now_ms),
                        hard: Bucket::new(
                            burst.saturating_mul(HARD_FACTOR),
                            (ms / u64::from(HARD_FACTOR)).max(1),
                            now_ms,
                        ),
                        pending_until: None,
                    },
                )
            })
            .collect();
        Self { kinds }
    }

    /// One message of `kind` arrived at `now_ms`.
    pub fn handle(&mut self, kind: Kind, now_ms: i64) -> Decision {
        let Some(k) = self.get(kind) else {
            return Decision::Exceeded;
        };
        if !k.hard.take(now_ms) {
            return Decision::Exceeded;
        }
        // A deferred message already waits: this one replaces it, after it in time.
        if let Some(until_ms) = k.pending_until {
            return Decision::Defer { until_ms };
        }
        if k.soft.take(now_ms) {
            return Decision::Pass;
        }
        match kind.over_soft() {
            Decision::Defer { .. } => {
                let until_ms = k.soft.next_token_ms();
                k.pending_until = Some(until_ms);
                Decision::Defer { until_ms }
            }
            other => other,
        }
    }

    /// The earliest time a deferred message is due.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.kinds.iter().filter_map(|(_, k)| k.pending_until).min()
    }

    /// Kinds whose deferred message is due at `now_ms`: forward the latest of each. Each
    /// takes its soft token now.
    pub fn poll_release(&mut self, now_ms: i64) -> Vec<Kind> {
        let mut due = Vec::new();
        for (kind, k) in &mut self.kinds {
            if k.pending_until.is_some_and(|t| t <= now_ms) {
                if k.soft.take(now_ms) {
                    k.pending_until = None;
                    due.push(*kind);
                } else {
                    k.pending_until = Some(k.soft.next_token_ms());
                }
            }
        }
        due
    }

    /// The same buckets with nothing deferred: what a new session of the device starts from.
    fn for_new_session(&self) -> Self {
        let mut l = self.clone();
        for (_, k) in &mut l.kinds {
            k.pending_until = None;
        }
        l
    }

    /// Keeps, bucket by bucket, the emptier of the two at `now_ms` (two sessions of one
    /// device spend from the same budget as far as a reconnect can tell).
    fn keep_lower(&mut self, other: &Self, now_ms: i64) {
        for ((_, a), (_, b)) in self.kinds.iter_mut().zip(&other.kinds) {
            for (x, y) in [(&mut a.soft, &b.soft), (&mut a.hard, &b.hard)] {
                let mut y = y.clone();
                x.refill(now_ms);
                y.refill(now_ms);
                x.milli = x.milli.min(y.milli);
            }
        }
    }

    /// Every bucket full at `now_ms`: no different from new limits.
    fn is_full(&self, now_ms: i64) -> bool {
        self.kinds
            .iter()
            .all(|(_, k)| k.soft.is_full(now_ms) && k.hard.is_full(now_ms))
    }

    fn get(&mut self, kind: Kind) -> Option<&mut PerKind> {
        self.kinds
            .iter_mut()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p)
    }
}

/// Sessions a device may open: a burst, then one per this many milliseconds.
pub const RECONNECT_BURST: u32 = 20;
pub const RECONNECT_MS: u64 = 3_000;

/// Devices whose limits are remembered between sessions at most.
pub const MAX_REMEMBERED: usize = 65_536;

/// The device opened sessions faster than [`RECONNECT_BURST`] and [`RECONNECT_MS`] allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions;

impl std::fmt::Display for TooManySessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this device opens sessions too often")
    }
}

struct Remembered {
    limits: SessionLimits,
    sessions: Bucket,
}

/// Each device's limits across its sessions, free of I/O: a session starts from what the
/// device's earlier sessions left (refilled since), so reconnecting refills nothing, and
/// opening sessions is itself limited. At most `cap` devices are remembered; a device whose
/// buckets have all refilled is forgotten first when room is needed (forgetting it changes
/// nothing). With every entry in use, a new device's session is limited as usual but its
/// state is not kept.
///
/// ```text
/// session driver:  open(device, now) -> Ok(limits) | Err(TooManySessions: refuse, rate_limited)
///                  ... limits.handle(kind, now) for each message ...
///                  close(device, &limits, now)   when the session ends
/// ```
pub struct DeviceLimits {
    devices: std::collections::HashMap<ward_shared::wire::DeviceId, Remembered>,
    cap: usize,
}

impl DeviceLimits {
    pub fn new(cap: usize) -> Self {
        Self {
            devices: std::collections::HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// A session of `device` starts at `now_ms`: its limits, or a refusal when the device
    /// opens sessions too often.
    pub fn open(
        &mut self,
        device: ward_shared::wire::DeviceId,
        now_ms: i64,
    ) -> Result<SessionLimits, TooManySessions> {
        if !self.devices.contains_key(&device) && self.devices.len() >= self.cap {
            self.devices
                .retain(|_, r| !(r.limits.is_full(now_ms) && r.sessions.is_full(now_ms)));
            if self.devices.len() >= self.cap {
                return Ok(SessionLimits::new(now_ms));
            }
        }
        let r = self.devices.entry(device).or_insert_with(|| Remembered {
            limits: SessionLimits::new(now_ms),
            sessions: Bucket::new(RECONNECT_BURST, RECONNECT_MS, now_ms),
        });
        if !r.sessions.take(now_ms) {
            return Err(TooManySessions);
        }
        Ok(r.limits.for_new_session())
    }

    /// A session of `device` ended at `now_ms` having spent `limits`.
    pub fn close(
        &mut self,
        device: ward_shared::wire::DeviceId,
        limits: &SessionLimits,
        now_ms: i64,
    ) {
        if let Some(r) = self.devices.get_mut(&device) {
            r.limits.keep_lower(limits, now_ms);
        }
    }

    /// Devices remembered now.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000_000;

    #[test]
    fn an_honest_pace_always_passes() {
        let mut l = SessionLimits::new(T);
        // An agent's one-second tick: one update, one report, one denied-flows message, one
        // ping a second, a lease now and then, for an hour.
        for s in 0..3600i64 {
            let now = T + s * 1000;
            for k in [Kind::Update, Kind::Posture, Kind::DeniedFlows, Kind::Ping] {
                assert_eq!(l.handle(k, now), Decision::Pass, "{k:?} at {s}");
            }
            if s % 30 == 0 {
                assert_eq!(l.handle(Kind::LeaseRequest, now), Decision::Pass);
                assert_eq!(l.handle(Kind::LeaseActive, now), Decision::Pass);
                assert_eq!(l.handle(Kind::RelayTicket, now), Decision::Pass);
            }
        }
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn a_flood_of_updates_is_coalesced_then_cut_off() {
        let mut l = SessionLimits::new(T);
        let mut passed = 0;
        let mut deferred = 0;
        let mut outcome = None;
        // 1000 updates within one millisecond each.
        for i in 0..1000i64 {
            match l.handle(Kind::Update, T + i) {
                Decision::Pass => passed += 1,
                Decision::Defer { until_ms } => {
                    deferred += 1;
                    assert!(until_ms > T + i);
                }
                d => {
                    outcome = Some((i, d));
                    break;
                }
            }
        }
        assert_eq!(passed, 10, "the burst passes");
        assert!(deferred > 0);
        let (at, d) = outcome.expect("the hard limit ends the session");
        assert_eq!(d, Decision::Exceeded);
        assert!(at <= 110, "cut off after {at} messages");
        // The waiting one is released once, at its time.
        let due = l.poll_timeout().unwrap();
        assert!(l.poll_release(due - 1).is_empty());
        assert_eq!(l.poll_release(due), vec![Kind::Update]);
        assert_eq!(l.poll_timeout(), None);
    }

    #[test]
    fn flapping_posture_costs_one_forward_per_refill() {
        let mut l = SessionLimits::new(T);
        let mut forwarded = 0;
        // A report every 150 ms (under the hard limit) for 60 s.
        let mut now = T;
        while now < T + 60_000 {
            match l.handle(Kind::Posture, now) {
                Decision::Pass => forwarded += 1,
                Decision::Defer { .. } => {}
                d => panic!("{d:?}"),
            }
            forwarded += l.poll_release(now).len();
            now += 150;
        }
        // 10 (burst) + one per 500 ms: about 130, not 400.
        assert!((100..=135).contains(&forwarded), "{forwarded}");
    }

    #[test]
    fn a_spool_flush_passes_and_a_report_flood_is_dropped_then_cut_off() {
        let mut l = SessionLimits::new(T);
        // A device back online sends its spool: 20 at once, then one a second, all pass.
        for _ in 0..20 {
            assert_eq!(l.handle(Kind::Flows, T), Decision::Pass);
        }
        for i in 1..=40 {
            assert_eq!(l.handle(Kind::Flows, T + i * 1_000), Decision::Pass);
        }
        // Faster: dropped (unacknowledged), and far faster: the session ends.
        let t = T + 40 * 1_000;
        assert_eq!(l.handle(Kind::Flows, t), Decision::Drop);
        let mut last = Decision::Drop;
        for _ in 0..400 {
            last = l.handle(Kind::Flows, t);
            if last == Decision::Exceeded {
                break;
            }
        }
        assert_eq!(last, Decision::Exceeded);
    }

    #[test]
    fn lease_and_cert_floods_end_the_session() {
        for (kind, burst) in [(Kind::LeaseRequest, 10), (Kind::RenewCert, 5)] {
            let mut l = SessionLimits::new(T);
            for _ in 0..burst {
                assert_eq!(l.handle(kind, T), Decision::Pass);
            }
            assert_eq!(l.handle(kind, T), Decision::Exceeded, "{kind:?}");
        }
        let mut l = SessionLimits::new(T);
        for _ in 0..10 {
            assert_eq!(l.handle(Kind::DeniedFlows, T), Decision::Pass);
        }
        assert_eq!(l.handle(Kind::DeniedFlows, T), Decision::Drop);
    }

    #[test]
    fn reconnecting_does_not_refill_the_buckets() {
        use ward_shared::wire::DeviceId;
        let mut d = DeviceLimits::new(16);
        let dev = DeviceId(7);
        let flood = |l: &mut SessionLimits, now: i64| {
            (0..1000)
                .position(|_| l.handle(Kind::LeaseRequest, now) == Decision::Exceeded)
                .unwrap()
        };
        let mut l = d.open(dev, T).unwrap();
        assert_eq!(flood(&mut l, T), 10, "the burst passes");
        d.close(dev, &l, T);
        // Reconnected at once: still out of tokens.
        let mut l = d.open(dev, T + 1).unwrap();
        assert_eq!(flood(&mut l, T + 1), 0);
        d.close(dev, &l, T + 1);
        // Another device is not affected.
        let mut other = d.open(DeviceId(8), T + 1).unwrap();
        assert_eq!(flood(&mut other, T + 1), 10);
        // Refilled with time, as in one long session.
        let mut l = d.open(dev, T + 5_001).unwrap();
        assert_eq!(flood(&mut l, T + 5_001), 5);
    }

    #[test]
    fn opening_sessions_is_limited_per_device() {
        use ward_shared::wire::DeviceId;
        let mut d = DeviceLimits::new(16);
        for i in 0..RECONNECT_BURST {
            assert!(d.open(DeviceId(1), T).is_ok(), "{i}");
        }
        assert_eq!(d.open(DeviceId(1), T).err(), Some(TooManySessions));
        assert!(d.open(DeviceId(2), T).is_ok());
        let later = T + RECONNECT_MS as i64;
        assert!(d.open(DeviceId(1), later).is_ok());
        assert_eq!(d.open(DeviceId(1), later).err(), Some(TooManySessions));
    }

    #[test]
    fn remembered_devices_are_bounded_and_refilled_ones_go_first() {
        use ward_shared::wire::DeviceId;
        let mut d = DeviceLimits::new(4);
        for i in 0..4 {
            let mut l = d.open(DeviceId(i), T).unwrap();
            let _ = l.handle(Kind::RenewCert, T);
            d.close(DeviceId(i), &l, T);
        }
        // Full, nothing refilled: a new device is limited but not remembered.
        assert!(d.open(DeviceId(100), T).is_ok());
        assert_eq!(d.len(), 4);
        // An hour later every bucket is full again: the old entries make room.
        assert!(d.open(DeviceId(101), T + 3_600_000).is_ok());
        assert_eq!(d.len(), 1);
        // A device that is still being limited stays remembered.
        let mut l = d.open(DeviceId(102), T + 3_600_000).unwrap();
        for _ in 0..5 {
            let _ = l.handle(Kind::RenewCert, T + 3_600_000);
        }
        d.close(DeviceId(102), &l, T + 3_600_000);
        assert_eq!(d.len(), 2);
    }
}
