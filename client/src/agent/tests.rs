//! The agent driven by hand: one test per rotation transition, lease verification, revocation,
//! expiry without a coordinator, clock offset and posture cadence through the agent.

use super::*;
use ed25519_dalek::SigningKey;
use ward_shared::lease::Lease;
use ward_shared::names::Hostname;
use ward_shared::wire::{Peer, SelfInfo};

const T0: i64 = 1_800_000_000_000;
const TTL: i64 = 20_000;

struct H {
    agent: Agent,
    coord: SigningKey,
    base: Instant,
    t: i64,
    serial: u64,
    events: Vec<Event>,
    sent: Vec<DeviceMsg>,
    next_key: u8,
}

fn ip4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, n)
}
fn ip6(n: u8) -> Ipv6Addr {
    format!("fd00::{n}").parse().unwrap()
}

impl H {
    fn new() -> H {
        let coord = SigningKey::from_bytes(&[9; 32]);
        let base = Instant::now();
        let cfg = AgentConfig {
            routes: Default::default(),
            device_id: DeviceId(1),
            ipv4: ip4(1),
            ipv6: ip6(1),
            lease_key: Some(coord.verifying_key()),
            private_key: PrivateKey([1; 32]),
            cert_not_after_ms: T0 + crate::CERT_LIFETIME_MS,
            posture_interval: Duration::from_secs(30),
            os: "test".into(),
            version: "0".into(),
            seed: 7,
            protocol: ward_shared::wire::PROTOCOL_VERSION,
        };
        let agent = Agent::new(
            cfg,
            Now {
                instant: base,
                unix_ms: T0,
            },
        );
        let mut h = H {
            agent,
            coord,
            base,
            t: T0,
            serial: 0,
            events: vec![],
            sent: vec![],
            next_key: 100,
        };
        h.drain();
        h
    }

    fn now(&self) -> Now {
        Now {
            instant: self.base + Duration::from_millis((self.t - T0) as u64),
            unix_ms: self.t,
        }
    }

    /// Collects outputs; answers `NeedKey` like a driver would.
    fn drain(&mut self) {
        while let Some(ev) = self.agent.poll_event() {
            if ev == Event::NeedKey {
                self.next_key += 1;
                self.agent.provide_key(PrivateKey([self.next_key; 32]));
            }
            self.events.push(ev);
        }
        while let Some(m) = self.agent.poll_transmit() {
            self.sent.push(m);
        }
    }

    fn take_sent(&mut self) -> Vec<DeviceMsg> {
        std::mem::take(&mut self.sent)
    }
    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn msg(&mut self, m: CoordinatorMsg) {
        let now = self.now();
        self.agent.handle_coordinator_msg(m, now);
        self.drain();
    }

    /// Runs `ms` of time as the daemon does: sleeps until `poll_timeout`, then ticks (no peer
    /// on the old key). Returns the number of wake-ups.
    fn run_as_driver(&mut self, ms: i64) -> usize {
        let end = self.t + ms;
        let mut wakes = 0;
        loop {
            let at = self.agent.poll_timeout();
            let ns = at.saturating_duration_since(self.base).as_nanos();
            let at_ms = T0 + i64::try_from(ns.div_ceil(1_000_000)).unwrap();
            if at_ms > end {
                break;
            }
            self.t = at_ms.max(self.t);
            let now = self.now();
            self.agent
                .handle_dataplane_event(DataPlaneEvent::PeersOnOldKey(0), now);
            self.agent.handle_tick(now);
            self.drain();
            wakes += 1;
            assert!(wakes < 100_000, "the agent asks to be woken without end");
        }
        self.t = end;
        wakes
    }

    /// Advances time in 50 ms steps, reporting `on_old` peers on the old key before each tick.
    fn advance(&mut self, ms: i64, on_old: usize) {
        let end = self.t + ms;
        while self.t < end {
            self.t = (self.t + 50).min(end);
            let now = self.now();
            self.agent
                .handle_dataplane_event(DataPlaneEvent::PeersOnOldKey(on_old), now);
            if self.agent.poll_timeout() <= now.instant {
                self.agent.handle_tick(now);
            }
            self.drain();
        }
    }

    fn lease(&mut self, dev: u64, key: WgPublicKey, ttl: i64) -> SignedLease {
        self.serial += 1;
        Lease {
            device_id: DeviceId(dev),
            wg_public_key: key,
            ipv4: ip4(dev as u8),
            ipv6: ip6(dev as u8),
            not_before_ms: self.t,
            not_after_ms: self.t + ttl,
            serial: self.serial,
        }
        .sign(&self.coord)
    }

    /// Opens a session and answers the first ping: the agent asks for its first lease.
    fn connect(&mut self) {
        let now = self.now();
        self.agent.handle_connected(DeviceUpdate::default(), now);
        self.drain();
        let nonce = self
            .take_sent()
            .into_iter()
            .find_map(|m| match m {
                DeviceMsg::Ping { nonce } => Some(nonce),
                _ => None,
            })
            .expect("a ping on connect");
        self.msg(CoordinatorMsg::Pong {
            nonce,
            coordinator_time_ms: self.t,
        });
    }

    /// Connects and grants the first lease (as the coordinator does).
    fn leased(&mut self) {
        self.connect();
        let sent = self.take_sent();
        let [DeviceMsg::LeaseRequest {
            wg_public_key,
            proof: Some(proof),
        }] = sent.as_slice()
        else {
            panic!("{sent:?}")
        };
        assert_eq!(*wg_public_key, self.agent.public_key());
        // The request proves possession of the key to the coordinator.
        assert_eq!(
            ward_shared::keyproof::verify(&self.coord, DeviceId(1), wg_public_key, proof),
            Ok(())
        );
        let l = self.lease(1, self.agent.public_key(), TTL);
        self.msg(CoordinatorMsg::Lease { lease: l });
        assert_eq!(self.agent.rotation(), &Rotation::Idle);
        self.take_sent();
    }

    fn lease_requests(sent: &[DeviceMsg]) -> Vec<WgPublicKey> {
        sent.iter()
            .filter_map(|m| match m {
                DeviceMsg::LeaseRequest {
                    wg_public_key,
                    proof,
                } => {
                    // Every request, rotations too, proves possession of its key.
                    let proof = proof.as_ref().expect("a lease request without a proof");
                    let coord = SigningKey::from_bytes(&[9; 32]);
                    assert_eq!(
                        ward_shared::keyproof::verify(&coord, DeviceId(1), wg_public_key, proof),
                        Ok(())
                    );
                    Some(*wg_public_key)
                }
                _ => None,
            })
            .collect()
    }
}

fn netmap(seq: u64, leases: Vec<SignedLease>) -> Netmap {
    Netmap {
        resumed: None,
        seq,
        me: SelfInfo {
            routes: Default::default(),
            device_id: DeviceId(1),
            hostname: Hostname::parse("me").unwrap(),
            ipv4: ip4(1),
            ipv6: ip6(1),
            v6_prefix: "fd00::".parse().unwrap(),
            observed_addr: None,
        },
        peers: vec![Peer {
            routes: Default::default(),
            device_id: DeviceId(2),
            hostname: Hostname::parse("peer").unwrap(),
            user: None,
            tags: vec![],
            ipv4: ip4(2),
            ipv6: ip6(2),
            wg_public_key: None,
            endpoints: vec![],
            online: true,
            leases,
            relay: None,
        }],
        inbound: vec![].into(),
        reach: vec![],
        reach_grants: vec![],
        reach_services: vec![],
        relays: vec![],
        punch: false,
        flows: false,
        policy_version: None,
        shadow_filter: None,
        dns_domain: None,
        coordinators: Vec::new(),
        peer_sets: Vec::new().into(),
        on_demand: false,
    }
}

/// Runs a rotation up to `Settling` and returns the new key.
fn to_settling(h: &mut H) -> WgPublicKey {
    h.advance(TTL / 2, 0);
    let reqs = H::lease_requests(&h.take_sent());
    assert_eq!(reqs.len(), 1, "one lease request for the new key");
    let l = h.lease(1, reqs[0], TTL);
    h.msg(CoordinatorMsg::Lease { lease: l });
    assert!(matches!(h.agent.rotation(), Rotation::Settling { .. }));
    reqs[0]
}

#[test]
fn unleased_session_never_rotates_even_when_asked_or_due() {
    let mut h = H::new();
    h.leased();
    // Half the lease passes while disconnected: the next session must not rotate on the old,
    // possibly stale lease before it holds one of its own (the reconnect race).
    let now = h.now();
    h.agent
        .handle_disconnected(Some("network down".into()), now);
    h.drain();
    h.advance(TTL / 2 + 1000, 0);
    assert!(h.take_events().contains(&Event::Connect));
    let now = h.now();
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    let nonce = h
        .take_sent()
        .into_iter()
        .find_map(|m| match m {
            DeviceMsg::Ping { nonce } => Some(nonce),
            _ => None,
        })
        .unwrap();
    h.msg(CoordinatorMsg::RotateNow {
        reason: "posture".into(),
    });
    h.advance(2000, 0);
    let reqs = H::lease_requests(&h.take_sent());
    assert!(
        reqs.is_empty(),
        "no lease request before the pong: {reqs:?}"
    );
    assert_eq!(h.agent.rotation(), &Rotation::Unleased { requested: false });
    // The pong arrives late.
    h.msg(CoordinatorMsg::RotateNow {
        reason: "posture".into(),
    });
    h.msg(CoordinatorMsg::Pong {
        nonce,
        coordinator_time_ms: h.t,
    });
    // Only the lease for the key in use is asked for; the rotation waits for it.
    let reqs = H::lease_requests(&h.take_sent());
    assert_eq!(reqs, vec![h.agent.public_key()]);
    h.advance(1000, 0);
    assert!(H::lease_requests(&h.take_sent()).is_empty());
    let l = h.lease(1, h.agent.public_key(), TTL);
    h.msg(CoordinatorMsg::Lease { lease: l });
    assert_eq!(h.agent.rotation(), &Rotation::Idle);
    // The queued trust change runs at the next tick.
    h.advance(300, 0);
    let reqs = H::lease_requests(&h.take_sent());
    assert_eq!(reqs.len(), 1);
    assert_ne!(reqs[0], h.agent.public_key());
    assert!(matches!(h.agent.rotation(), Rotation::Requested { .. }));
}

#[test]
fn idle_to_requested_at_half_life() {
    let mut h = H::new();
    h.leased();
    h.advance(TTL / 2 - 300, 0);
    assert!(
        H::lease_requests(&h.take_sent()).is_empty(),
        "not before half-life"
    );
    h.advance(300, 0);
    let reqs = H::lease_requests(&h.take_sent());
    assert_eq!(reqs.len(), 1);
    assert_ne!(reqs[0], h.agent.public_key());
    let Rotation::Requested { key } = h.agent.rotation() else {
        panic!("not requested: {:?}", h.agent.rotation())
    };
    assert_eq!(key.public(), reqs[0]);
    // The spare key was used: the agent asked for another.
    assert!(h.take_events().contains(&Event::NeedKey));
}

#[test]
fn requested_to_settling_only_on_the_lease_for_the_new_key() {
    let mut h = H::new();
    h.leased();
    h.advance(TTL / 2, 0);
    let reqs = H::lease_requests(&h.take_sent());
    // A valid lease for a key the device does not hold is ignored.
    let stranger = h.lease(1, WgPublicKey([77; 32]), TTL);
    h.msg(CoordinatorMsg::Lease { lease: stranger });
    assert!(matches!(h.agent.rotation(), Rotation::Requested { .. }));
    let l = h.lease(1, reqs[0], TTL);
    h.msg(CoordinatorMsg::Lease { lease: l });
    let Rotation::Settling { key, .. } = h.agent.rotation() else {
        panic!("not settling")
    };
    assert_eq!(key.public(), reqs[0]);
    assert_ne!(h.agent.public_key(), reqs[0], "not switched yet");
}

#[test]
fn settling_to_confirming_after_the_settle_time() {
    let mut h = H::new();
    h.leased();
    let new = to_settling(&mut h);
    h.take_events();
    h.advance(ROTATION_SETTLE.as_millis() as i64 - 100, 0);
    assert_ne!(h.agent.public_key(), new);
    assert!(!h
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::SwitchKey { .. })));
    h.advance(100, 3);
    assert_eq!(h.agent.public_key(), new);
    let evs = h.take_events();
    let Some(Event::SwitchKey { key, lease }) =
        evs.iter().find(|e| matches!(e, Event::SwitchKey { .. }))
    else {
        panic!("no switch: {evs:?}")
    };
    assert_eq!(key.public(), new);
    assert_eq!(lease.lease.wg_public_key, new);
    assert_eq!(h.agent.rotations(), 1);
    assert!(matches!(h.agent.rotation(), Rotation::Confirming { .. }));
    assert!(
        !h.take_sent()
            .iter()
            .any(|m| matches!(m, DeviceMsg::LeaseActive { .. })),
        "peers still on the old key: no confirmation"
    );
}

#[test]
fn confirming_to_idle_once_peers_moved() {
    let mut h = H::new();
    h.leased();
    to_settling(&mut h);
    h.advance(ROTATION_SETTLE.as_millis() as i64, 2);
    let Rotation::Confirming { serial, .. } = *h.agent.rotation() else {
        panic!("not confirming")
    };
    h.advance(1000, 2);
    assert!(matches!(h.agent.rotation(), Rotation::Confirming { .. }));
    h.take_sent();
    h.advance(300, 0);
    assert_eq!(h.take_sent(), vec![DeviceMsg::LeaseActive { serial }]);
    assert_eq!(h.agent.rotation(), &Rotation::Idle);
}

#[test]
fn confirming_to_idle_after_the_maximum_wait() {
    let mut h = H::new();
    h.leased();
    to_settling(&mut h);
    h.advance(ROTATION_SETTLE.as_millis() as i64, 1);
    let Rotation::Confirming { serial, .. } = *h.agent.rotation() else {
        panic!("not confirming")
    };
    h.take_sent();
    h.advance(ROTATION_CONFIRM_MAX.as_millis() as i64 - 300, 1);
    assert!(h.take_sent().is_empty());
    h.advance(300, 1);
    assert_eq!(h.take_sent(), vec![DeviceMsg::LeaseActive { serial }]);
    assert_eq!(h.agent.rotation(), &Rotation::Idle);
}

#[test]
fn rotate_now_during_a_rotation_runs_right_after_it() {
    let mut h = H::new();
    h.leased();
    to_settling(&mut h);
    h.msg(CoordinatorMsg::RotateNow {
        reason: "quarantined".into(),
    });
    assert!(H::lease_requests(&h.take_sent()).is_empty());
    h.advance(ROTATION_SETTLE.as_millis() as i64 + 300, 0);
    // Confirmed, and at the same tick the queued rotation started with yet another key.
    let sent = h.take_sent();
    assert!(sent
        .iter()
        .any(|m| matches!(m, DeviceMsg::LeaseActive { .. })));
    let reqs = H::lease_requests(&sent);
    assert_eq!(reqs.len(), 1);
    assert_ne!(reqs[0], h.agent.public_key());
    assert!(matches!(h.agent.rotation(), Rotation::Requested { .. }));
}

#[test]
fn rotate_now_when_idle_starts_at_once() {
    let mut h = H::new();
    h.leased();
    h.msg(CoordinatorMsg::RotateNow {
        reason: "posture".into(),
    });
    assert_eq!(H::lease_requests(&h.take_sent()).len(), 1);
    assert!(matches!(h.agent.rotation(), Rotation::Requested { .. }));
}

#[test]
fn a_lease_that_does_not_verify_ends_the_session() {
    let mut h = H::new();
    h.connect();
    h.take_sent();
    h.take_events();
    let forged = Lease {
        device_id: DeviceId(1),
        wg_public_key: h.agent.public_key(),
        ipv4: ip4(1),
        ipv6: ip6(1),
        not_before_ms: h.t,
        not_after_ms: h.t + TTL,
        serial: 1,
    }
    .sign(&SigningKey::from_bytes(&[3; 32]));
    h.msg(CoordinatorMsg::Lease { lease: forged });
    assert!(h.agent.own_lease().is_none());
    let evs = h.take_events();
    assert_eq!(evs[0], Event::CloseSession);
    assert!(matches!(evs[1], Event::Disconnected { revoked: false, .. }));
    assert!(h.agent.last_error().unwrap().contains("does not verify"));
    assert!(!h
        .take_sent()
        .iter()
        .any(|m| matches!(m, DeviceMsg::LeaseActive { .. })));
    // A lease for another device's addresses is refused the same way.
    h.advance(6000, 0);
    assert!(h.take_events().contains(&Event::Connect));
    h.connect();
    let mut other = h.lease(1, h.agent.public_key(), TTL);
    other.lease.ipv4 = ip4(9);
    let other = other.lease.sign(&h.coord);
    h.msg(CoordinatorMsg::Lease { lease: other });
    assert!(h.agent.own_lease().is_none());
    assert_eq!(h.agent.phase(), Phase::Connecting);
}

#[test]
fn an_idle_agent_wakes_once_a_housekeeping_step_and_at_a_lease_end() {
    let mut h = H::new();
    h.leased();
    let short = h.lease(2, WgPublicKey([20; 32]), 4_321);
    let long = h.lease(2, WgPublicKey([21; 32]), TTL);
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![short, long])));
    h.run_as_driver(1_000);
    h.take_events();
    // Leases, relay tickets, flow samples, posture and the refresh share one grid: over eight
    // steps (ending before this device's own lease is half spent and a rotation starts),
    // eight wake-ups, plus one at the short lease's end, which is not on the grid.
    let steps = 8 * HOUSEKEEPING.as_millis() as i64;
    let wakes = h.run_as_driver(steps);
    assert!(
        (8..=10).contains(&wakes),
        "{wakes} wake-ups in {steps} ms of an idle session"
    );
    // The peer's short lease ended on time; its long one stays configured.
    let peers: Vec<[u8; 32]> = h
        .agent
        .configured_peers()
        .iter()
        .map(|p| p.public_key)
        .collect();
    assert_eq!(peers, vec![[21; 32]]);
    assert_eq!(h.agent.rotation(), &Rotation::Idle);
}

#[test]
fn peers_without_valid_leases_are_never_configured_and_expire_offline() {
    let mut h = H::new();
    h.leased();
    let good = h.lease(2, WgPublicKey([20; 32]), 3000);
    let mut bad = h.lease(2, WgPublicKey([21; 32]), TTL);
    bad.lease.serial += 100; // altered after signing
    h.take_events();
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![good, bad])));
    let evs = h.take_events();
    let peers: Vec<[u8; 32]> = evs
        .iter()
        .find_map(|e| match e {
            Event::SetPeers(p) => Some(p.iter().map(|p| p.public_key).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(peers, vec![[20; 32]]);
    assert!(evs.contains(&Event::Connected { peers: 1 }));
    assert_eq!(h.agent.phase(), Phase::Connected);
    // The coordinator goes away; the lease still ends on time: at its end, not at the next
    // housekeeping point.
    let now = h.now();
    h.agent.handle_disconnected(None, now);
    h.drain();
    h.advance(2950, 0);
    assert!(!h.take_events().contains(&Event::SetPeers(vec![])));
    h.advance(50, 0);
    assert!(h.take_events().contains(&Event::SetPeers(vec![])));
    assert!(h.agent.configured_peers().is_empty());
    assert_eq!(
        h.agent.last_error(),
        Some("the coordinator closed the session")
    );
}

#[test]
fn revoked_device_leaves_the_network_and_waits_long() {
    let mut h = H::new();
    h.leased();
    let l = h.lease(2, WgPublicKey([20; 32]), TTL);
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![l])));
    h.take_events();
    h.msg(CoordinatorMsg::Error {
        code: ErrorCode::DeviceRevoked,
        message: "revoked".into(),
    });
    let evs = h.take_events();
    assert!(evs.contains(&Event::CloseSession));
    assert!(evs.contains(&Event::SetPeers(vec![])));
    assert!(evs.contains(&Event::SetFilter {
        rules: vec![].into(),
        sets: vec![].into()
    }));
    assert!(evs.iter().any(|e| matches!(e, Event::Disconnected { revoked: true, retry_in } if *retry_in >= Duration::from_secs(30))));
    assert_eq!(h.agent.phase(), Phase::Revoked);
    assert!(h.agent.netmap().is_none() && h.agent.own_lease().is_none());
    h.advance(29_000, 0);
    assert!(!h.take_events().contains(&Event::Connect));
}

/// An inbound rule letting peer set 3 open TCP `port`.
fn set_rule(port: u16) -> ward_shared::filter::FilterRule {
    use ward_shared::filter::{FilterRule, PortRange, Proto};
    FilterRule {
        rule: "eng".into(),
        service: "db".into(),
        sources: Default::default(),
        source_sets: vec![3],
        proto: Proto::Tcp,
        ports: vec![PortRange { lo: port, hi: port }],
        not_after_ms: None,
        dests: vec![],
    }
}

/// A netmap's rules and peer sets reach the data plane together, and a delta that only
/// changes a set installs the new sets with the same rules; a set change that does not fit what
/// the agent holds ends the session (the next one starts with a full netmap) and installs
/// nothing.
#[test]
fn peer_sets_reach_the_filter_with_their_rules_and_a_bad_set_change_resyncs() {
    use ward_shared::peerset::{PeerSet, PeerSetChange};
    let mut h = H::new();
    h.leased();
    let rule = set_rule(5432);
    let p = |s: &str| s.parse::<ward_shared::routes::Prefix>().unwrap();
    let mut nm = netmap(1, vec![]);
    nm.inbound = vec![rule.clone()].into();
    nm.peer_sets = vec![PeerSet {
        id: 3,
        prefixes: vec![p("100.64.0.2/32")],
    }]
    .into();
    h.msg(CoordinatorMsg::Netmap(nm));
    let evs = h.take_events();
    assert!(evs.contains(&Event::SetFilter {
        rules: vec![rule.clone()].into(),
        sets: vec![PeerSet {
            id: 3,
            prefixes: vec![p("100.64.0.2/32")]
        }]
        .into(),
    }));
    let delta = |base: u64, change: PeerSetChange| ward_shared::wire::NetmapDelta {
        peer_sets: vec![change],
        ..ward_shared::wire::NetmapDelta::after(base)
    };
    h.msg(CoordinatorMsg::NetmapDelta(delta(
        1,
        PeerSetChange {
            id: 3,
            prefixes: None,
            add: vec![p("100.64.0.3/32")],
            remove: vec![],
        },
    )));
    let evs = h.take_events();
    assert!(
        evs.contains(&Event::SetFilter {
            rules: vec![rule.clone()].into(),
            sets: vec![PeerSet {
                id: 3,
                prefixes: vec![p("100.64.0.2/32"), p("100.64.0.3/32")]
            }]
            .into(),
        }),
        "{evs:?}"
    );
    h.msg(CoordinatorMsg::NetmapDelta(delta(
        2,
        PeerSetChange {
            id: 3,
            prefixes: None,
            add: vec![],
            remove: vec![p("100.64.0.9/32")],
        },
    )));
    let evs = h.take_events();
    assert!(evs.contains(&Event::CloseSession), "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, Event::SetFilter { .. })));
}

/// The filter reaches the data plane once per change: a full netmap with the filter held (a
/// resync) installs nothing, one with other sets installs them, a delta's set change installs
/// the changed sets once, and a delta without filter changes installs nothing.
#[test]
fn the_filter_is_installed_once_per_change() {
    use ward_shared::peerset::{PeerSet, PeerSetChange};
    let mut h = H::new();
    h.leased();
    let p = |s: &str| s.parse::<ward_shared::routes::Prefix>().unwrap();
    let rule = set_rule(5432);
    let set = |prefixes: &[&str]| PeerSet {
        id: 3,
        prefixes: prefixes.iter().map(|s| p(s)).collect(),
    };
    let full = |seq: u64, prefixes: &[&str]| {
        let mut nm = netmap(seq, vec![]);
        nm.inbound = vec![rule.clone()].into();
        nm.peer_sets = vec![set(prefixes)].into();
        CoordinatorMsg::Netmap(nm)
    };
    let filters = |evs: &[Event]| -> Vec<Vec<PeerSet>> {
        evs.iter()
            .filter_map(|e| match e {
                Event::SetFilter { sets, .. } => Some(sets.to_vec()),
                _ => None,
            })
            .collect()
    };
    h.msg(full(1, &["100.64.0.2/32"]));
    assert_eq!(
        filters(&h.take_events()),
        vec![vec![set(&["100.64.0.2/32"])]]
    );
    h.msg(full(2, &["100.64.0.2/32"]));
    assert_eq!(filters(&h.take_events()), Vec::<Vec<PeerSet>>::new());
    h.msg(full(3, &["100.64.0.4/32"]));
    assert_eq!(
        filters(&h.take_events()),
        vec![vec![set(&["100.64.0.4/32"])]]
    );
    h.msg(CoordinatorMsg::NetmapDelta(
        ward_shared::wire::NetmapDelta {
            peer_sets: vec![PeerSetChange {
                id: 3,
                prefixes: None,
                add: vec![p("100.64.0.5/32")],
                remove: vec![p("100.64.0.4/32")],
            }],
            ..ward_shared::wire::NetmapDelta::after(3)
        },
    ));
    assert_eq!(
        filters(&h.take_events()),
        vec![vec![set(&["100.64.0.5/32"])]]
    );
    h.msg(CoordinatorMsg::NetmapDelta(
        ward_shared::wire::NetmapDelta::after(4),
    ));
    assert_eq!(filters(&h.take_events()), Vec::<Vec<PeerSet>>::new());
}

/// A delta that edits the inbound rules (one rule out, one in) installs the edited filter
/// with the sets held; an edit that removes a rule the agent does not hold ends the session
/// (the next one starts with a full netmap) and installs nothing.
#[test]
fn an_edited_filter_reaches_the_data_plane_and_an_edit_that_does_not_fit_resyncs() {
    use ward_shared::peerset::PeerSet;
    use ward_shared::wire::ListEdit;
    let mut h = H::new();
    h.leased();
    let rule = set_rule;
    let sets = vec![PeerSet {
        id: 3,
        prefixes: vec!["100.64.0.2/32".parse().unwrap()],
    }];
    let mut nm = netmap(1, vec![]);
    nm.inbound = vec![rule(22), rule(5432)].into();
    nm.peer_sets = sets.clone().into();
    h.msg(CoordinatorMsg::Netmap(nm));
    h.take_events();
    let edit = |base: u64, remove: u16, add: u16| ward_shared::wire::NetmapDelta {
        inbound_edit: Some(ListEdit {
            remove: vec![rule(remove)],
            add: vec![rule(add)],
        }),
        ..ward_shared::wire::NetmapDelta::after(base)
    };
    h.msg(CoordinatorMsg::NetmapDelta(edit(1, 5432, 6432)));
    let evs = h.take_events();
    assert!(
        evs.contains(&Event::SetFilter {
            rules: vec![rule(22), rule(6432)].into(),
            sets: sets.clone().into(),
        }),
        "{evs:?}"
    );
    h.msg(CoordinatorMsg::NetmapDelta(edit(2, 5432, 7432)));
    let evs = h.take_events();
    assert!(evs.contains(&Event::CloseSession), "{evs:?}");
    assert!(!evs.iter().any(|e| matches!(e, Event::SetFilter { .. })));
}

#[test]
fn clock_offset_is_applied_to_lease_checks() {
    let mut h = H::new();
    let now = h.now();
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    let nonce = h
        .take_sent()
        .into_iter()
        .find_map(|m| match m {
            DeviceMsg::Ping { nonce } => Some(nonce),
            _ => None,
        })
        .unwrap();
    // The coordinator is 60 s ahead: a lease that this device's clock thinks has not started
    // yet is judged in coordinator time.
    h.msg(CoordinatorMsg::Pong {
        nonce,
        coordinator_time_ms: h.t + 60_000,
    });
    assert!(h.take_events().contains(&Event::SetClockOffset(60_000)));
    assert_eq!(h.agent.clock_offset_ms(), Some(60_000));
    h.t += 60_000;
    let l = h.lease(1, h.agent.public_key(), TTL);
    h.t -= 60_000;
    h.msg(CoordinatorMsg::Lease { lease: l });
    assert!(h.agent.own_lease().is_some(), "{:?}", h.agent.last_error());
}

/// Waits for the agent's next ping and answers it with coordinator time `offset_ms` ahead.
fn answer_next_ping(h: &mut H, offset_ms: i64) {
    h.take_sent();
    let nonce = loop {
        h.advance(500, 0);
        let ping = h.take_sent().into_iter().find_map(|m| match m {
            DeviceMsg::Ping { nonce } => Some(nonce),
            _ => None,
        });
        if let Some(nonce) = ping {
            break nonce;
        }
    };
    h.msg(CoordinatorMsg::Pong {
        nonce,
        coordinator_time_ms: h.t + offset_ms,
    });
}

#[test]
fn a_new_clock_offset_checks_peers_again_only_when_it_crosses_a_lease_end() {
    let mut h = H::new();
    h.leased();
    let peer = h.lease(2, WgPublicKey([20; 32]), 30_000);
    let ends = peer.lease.not_after_ms;
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![peer])));
    assert_eq!(h.agent.configured_peers().len(), 1);
    let checks = h.agent.peer_rebuilds();
    h.take_events();

    // A few milliseconds more or less, as every ping measures: nothing is checked again.
    for offset in [7, -3] {
        answer_next_ping(&mut h, offset);
        let evs = h.take_events();
        assert!(evs.contains(&Event::SetClockOffset(offset)), "{evs:?}");
        assert!(
            !evs.iter().any(|e| matches!(e, Event::SetPeers(_))),
            "{evs:?}"
        );
        assert_eq!(h.agent.peer_rebuilds(), checks);
        assert_eq!(h.agent.configured_peers().len(), 1);
    }

    // Coordinator time is found to be past the peer's lease end: the peer goes at once.
    let offset = ends - h.t + 1_000;
    answer_next_ping(&mut h, offset);
    let evs = h.take_events();
    assert!(evs.contains(&Event::SetClockOffset(offset)), "{evs:?}");
    assert!(evs.contains(&Event::SetPeers(vec![])), "{evs:?}");
    assert_eq!(h.agent.peer_rebuilds(), checks + 1);
}

#[test]
fn posture_is_collected_once_the_offset_is_known_and_reported_on_change() {
    let mut h = H::new();
    h.leased();
    h.take_events();
    h.advance(1000, 0);
    let evs = h.take_events();
    let seq = evs
        .iter()
        .find_map(|e| match e {
            Event::CollectPosture { seq, .. } => Some(*seq),
            _ => None,
        })
        .expect("a collection");
    assert!(evs.contains(&Event::TakeDeniedFlows));
    let report = PostureReport::unknown(DeviceId(1), seq, h.t);
    let now = h.now();
    h.agent.handle_posture(report.clone(), now);
    h.drain();
    assert!(matches!(h.take_sent()[..], [DeviceMsg::Posture(_)]));
    let mut same = report.clone();
    same.seq += 1;
    h.agent.handle_posture(same, now);
    h.drain();
    assert!(h.take_sent().is_empty(), "unchanged: not sent again");
    let mut changed = report;
    changed.seq += 2;
    changed.firewall = ward_shared::posture::Measured::value(h.t, true);
    h.agent.handle_posture(changed, now);
    h.drain();
    assert_eq!(h.take_sent().len(), 1);
}

#[test]
fn denied_flows_are_chunked_to_the_wire_limit() {
    let mut h = H::new();
    h.leased();
    let flow = DeniedFlow {
        src: "100.64.0.2".parse().unwrap(),
        proto: ward_shared::filter::Proto::Tcp,
        port: 22,
        count: 1,
    };
    let now = h.now();
    h.agent.handle_dataplane_event(
        DataPlaneEvent::DeniedFlows(vec![flow; wire::MAX_DENIED_FLOWS + 1]),
        now,
    );
    h.drain();
    assert_eq!(h.take_sent().len(), 2);
}

fn discovery_sends(events: &[Event]) -> Vec<(SocketAddr, ward_shared::discovery::TxId)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SendDiscovery { dst, datagram } => Some((
                *dst,
                ward_shared::discovery::BindingRequest::decode(datagram)
                    .unwrap()
                    .txid,
            )),
            _ => None,
        })
        .collect()
}

fn updates(sent: &[DeviceMsg]) -> Vec<Vec<SocketAddr>> {
    sent.iter()
        .filter_map(|m| match m {
            DeviceMsg::Update(u) => Some(u.local_endpoints.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn relays_in_the_netmap_give_reflexive_candidates_published_once() {
    let mut h = H::new();
    let local: SocketAddr = "192.168.1.2:51820".parse().unwrap();
    let now = h.now();
    h.agent.handle_connected(
        DeviceUpdate {
            wg_port: 51820,
            local_endpoints: vec![local],
            ..DeviceUpdate::default()
        },
        now,
    );
    h.drain();
    h.take_events();
    let mut nm = netmap(1, vec![]);
    nm.relays = vec![
        ward_shared::wire::RelayInfo {
            name: "r1".into(),
            addr: "198.51.100.1:3478".into(),
        },
        ward_shared::wire::RelayInfo {
            name: "r2".into(),
            addr: "198.51.100.2:3478".into(),
        },
    ];
    h.msg(CoordinatorMsg::Netmap(nm));
    h.advance(50, 0);
    let sends = discovery_sends(&h.take_events());
    assert_eq!(sends.len(), 2, "one binding request per relay");
    assert_ne!(sends[0].1, sends[1].1, "random txids");
    h.take_sent();
    let public: SocketAddr = "203.0.113.7:51820".parse().unwrap();
    for (dst, txid) in &sends {
        let now = h.now();
        h.agent.handle_discovery(
            *dst,
            BindingResponse {
                txid: *txid,
                observed: public,
            },
            now,
        );
        h.drain();
    }
    assert_eq!(
        updates(&h.take_sent()),
        vec![vec![public, local]],
        "reflexive first, sent once"
    );
    assert_eq!(h.agent.netcheck().mapping_varies(), Some(false));

    // The next periodic run finds the same: nothing is sent to the coordinator.
    h.advance(netcheck::RUN_INTERVAL.as_millis() as i64, 0);
    let sends = discovery_sends(&h.take_events());
    assert_eq!(sends.len(), 2);
    for (dst, txid) in &sends {
        let now = h.now();
        h.agent.handle_discovery(
            *dst,
            BindingResponse {
                txid: *txid,
                observed: public,
            },
            now,
        );
        h.drain();
    }
    assert!(updates(&h.take_sent()).is_empty());

    // Interface addresses change: published at once, and discovery runs again at once.
    let moved: SocketAddr = "10.1.1.9:51820".parse().unwrap();
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        local_endpoints: vec![moved],
        ..DeviceUpdate::default()
    });
    h.drain();
    assert_eq!(updates(&h.take_sent()), vec![vec![public, moved]]);
    h.advance(50, 0);
    assert_eq!(discovery_sends(&h.take_events()).len(), 2);
    // No answers this time: the reflexive address is withdrawn after the timeout.
    h.advance(netcheck::PROBE_TIMEOUT.as_millis() as i64, 0);
    assert_eq!(updates(&h.take_sent()), vec![vec![moved]]);
    assert!(!h.agent.netcheck().udp());
}

// ---- relays: tickets, connections, home relay publication, peers' relays ----------------

fn relay_info(name: &str) -> ward_shared::wire::RelayInfo {
    ward_shared::wire::RelayInfo {
        name: name.into(),
        addr: format!("{name}.example:3478"),
    }
}

fn relay_ticket(h: &H, serial: u64) -> ward_shared::relay::SignedTicket {
    ward_shared::relay::Ticket {
        device_id: DeviceId(1),
        cert_identity: [3; 32],
        not_before_ms: h.t,
        not_after_ms: h.t + ward_shared::relay::TICKET_TTL_MS,
        serial,
    }
    .sign(&h.coord)
}

fn ticket_requests(sent: &[DeviceMsg]) -> usize {
    sent.iter()
        .filter(|m| **m == DeviceMsg::RelayTicketRequest)
        .count()
}

fn home_relays(sent: &[DeviceMsg]) -> Vec<Option<String>> {
    sent.iter()
        .filter_map(|m| match m {
            DeviceMsg::Update(u) => Some(u.home_relay.clone()),
            _ => None,
        })
        .collect()
}

fn relay_up(h: &mut H, name: &str, rtt_ms: u64) {
    let now = h.now();
    h.agent.handle_relay_event(
        RelayConnEvent::Up {
            relay: name.into(),
            rtt: Duration::from_millis(rtt_ms),
            max_datagram: 1300,
        },
        now,
    );
    h.drain();
}

/// A session with local endpoints, a netmap listing r1 and r2 and peer 2 homed on `peer_relay`.
fn relayed_session(peer_relay: Option<&str>) -> H {
    let mut h = H::new();
    h.leased();
    let now = h.now();
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        local_endpoints: vec!["192.168.1.2:51820".parse().unwrap()],
        ..DeviceUpdate::default()
    });
    let _ = now;
    h.drain();
    let key = WgPublicKey([2; 32]);
    let l = h.lease(2, key, 10 * TTL);
    let mut nm = netmap(1, vec![l]);
    nm.relays = vec![relay_info("r1"), relay_info("r2")];
    nm.peers[0].relay = peer_relay.map(String::from);
    h.msg(CoordinatorMsg::Netmap(nm));
    h
}

#[test]
fn the_first_netmap_with_relays_asks_for_a_ticket_which_connects_every_relay() {
    let mut h = relayed_session(None);
    assert_eq!(ticket_requests(&h.take_sent()), 1);
    assert!(
        !h.take_events().iter().any(|e| matches!(e, Event::Relay(_))),
        "no connection without a ticket"
    );
    let t = relay_ticket(&h, 1);
    h.msg(CoordinatorMsg::RelayTicket { ticket: t.clone() });
    let connects: Vec<(String, String)> = h
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Relay(RelayOut::Connect {
                relay,
                addr,
                ticket,
            }) => {
                assert_eq!(ticket, t);
                Some((relay, addr))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        connects,
        vec![
            ("r1".to_string(), "r1.example:3478".to_string()),
            ("r2".to_string(), "r2.example:3478".to_string())
        ]
    );
    // Not asked again before half of its life (only the 10 s refresh traffic).
    h.advance(60_000, 0);
    assert_eq!(ticket_requests(&h.take_sent()), 0);
    h.advance(ward_shared::relay::TICKET_TTL_MS / 2 - 60_000 + 100, 0);
    assert_eq!(ticket_requests(&h.take_sent()), 1, "asked at half life");
    // Unanswered: asked again, never more than once per 10 s.
    h.advance(30_000, 0);
    assert_eq!(ticket_requests(&h.take_sent()), 3);
}

#[test]
fn the_home_relay_is_published_in_a_full_update_when_it_changes() {
    let mut h = relayed_session(None);
    let t = relay_ticket(&h, 1);
    h.msg(CoordinatorMsg::RelayTicket { ticket: t });
    h.take_sent();
    h.take_events();
    relay_up(&mut h, "r2", 30);
    let sent = h.take_sent();
    assert_eq!(home_relays(&sent), vec![Some("r2".to_string())]);
    let DeviceMsg::Update(u) = &sent[0] else {
        panic!("{sent:?}")
    };
    // The full update: key/port/endpoints as the driver gave them, plus the home relay.
    assert_eq!(u.wg_port, 51820);
    assert_eq!(
        u.local_endpoints,
        vec!["192.168.1.2:51820".parse::<SocketAddr>().unwrap()]
    );
    assert!(h
        .take_events()
        .contains(&Event::SetRelays(vec![("r2".to_string(), 1300)])));
    // A slightly better relay is not worth a switch; a much better one is.
    relay_up(&mut h, "r1", 27);
    assert!(home_relays(&h.take_sent()).is_empty());
    let now = h.now();
    h.agent.handle_relay_event(
        RelayConnEvent::Rtt {
            relay: "r1".into(),
            rtt: Duration::from_millis(10),
            max_datagram: 1300,
        },
        now,
    );
    h.drain();
    assert_eq!(home_relays(&h.take_sent()), vec![Some("r1".to_string())]);
    // Refreshed local endpoints keep the home relay in the update.
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        local_endpoints: vec!["10.0.0.9:51820".parse().unwrap()],
        ..DeviceUpdate::default()
    });
    h.drain();
    assert_eq!(home_relays(&h.take_sent()), vec![Some("r1".to_string())]);
    // The home relay goes down: the other one is published.
    let now = h.now();
    h.agent.handle_relay_event(
        RelayConnEvent::Down {
            relay: "r1".into(),
            error: "idle timeout".into(),
        },
        now,
    );
    h.drain();
    assert_eq!(home_relays(&h.take_sent()), vec![Some("r2".to_string())]);
    assert!(h
        .take_events()
        .contains(&Event::SetRelays(vec![("r2".to_string(), 1300)])));
    // A new session's hello carries it too, and asks for a fresh ticket.
    let now = h.now();
    h.agent.handle_disconnected(Some("gone".into()), now);
    h.drain();
    h.advance(6_000, 0);
    let now = h.now();
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    let hello = h.take_sent().into_iter().find_map(|m| match m {
        DeviceMsg::Hello(hello) => Some(hello),
        _ => None,
    });
    assert_eq!(hello.unwrap().update.home_relay.as_deref(), Some("r2"));
    let mut nm = netmap(5, vec![]);
    nm.relays = vec![relay_info("r1"), relay_info("r2")];
    h.msg(CoordinatorMsg::Netmap(nm));
    // The last request was less than 10 s ago: this one waits for the gap.
    h.advance(4_000, 0);
    assert_eq!(ticket_requests(&h.take_sent()), 1);
}

#[test]
fn a_peers_relay_is_configured_only_if_the_netmap_lists_it() {
    let h = relayed_session(Some("r2"));
    let peers = h.agent.configured_peers().to_vec();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].relay.as_deref(), Some("r2"));
    let mut h = relayed_session(Some("elsewhere"));
    assert_eq!(h.agent.configured_peers()[0].relay, None);
    h.take_events();
    // A relay removed from the list is disconnected and no longer a peer's relay.
    let l = h.lease(2, WgPublicKey([2; 32]), 10 * TTL);
    let mut nm = netmap(2, vec![l]);
    nm.relays = vec![relay_info("r2")];
    nm.peers[0].relay = Some("r1".into());
    h.msg(CoordinatorMsg::Netmap(nm));
    assert_eq!(h.agent.configured_peers()[0].relay, None);
    assert!(h
        .take_events()
        .contains(&Event::Relay(RelayOut::Disconnect { relay: "r1".into() })));
}

#[test]
fn revocation_closes_every_relay_connection() {
    let mut h = relayed_session(None);
    let t = relay_ticket(&h, 1);
    h.msg(CoordinatorMsg::RelayTicket { ticket: t });
    relay_up(&mut h, "r1", 10);
    h.take_events();
    h.msg(CoordinatorMsg::Error {
        code: ErrorCode::DeviceRevoked,
        message: "revoked".into(),
    });
    let ev = h.take_events();
    assert!(ev.contains(&Event::Relay(RelayOut::Disconnect { relay: "r1".into() })));
    assert!(ev.contains(&Event::Relay(RelayOut::Disconnect { relay: "r2".into() })));
    assert!(ev.contains(&Event::SetRelays(vec![])));
    assert_eq!(h.agent.relays().home(), None);
    assert!(h.agent.relays().ticket().is_none());
}

// ---- coordinated hole punching ----------------------------------------------------------

fn punch_requests(sent: &[DeviceMsg]) -> Vec<DeviceId> {
    sent.iter()
        .filter_map(|m| match m {
            DeviceMsg::PunchRequest { peer } => Some(*peer),
            _ => None,
        })
        .collect()
}

fn punch_events(events: &[Event]) -> Vec<(u64, Vec<SocketAddr>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Punch { peer, endpoints } => Some((*peer, endpoints.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn punch_requests_go_only_to_a_coordinator_that_takes_them_and_only_for_netmap_peers() {
    let mut h = H::new();
    h.leased();
    let peer_key = WgPublicKey([2; 32]);
    let l = h.lease(2, peer_key, TTL);
    // An older coordinator (its netmap says nothing of punches): nothing is sent, however
    // much the data plane wants it (the coordinator would close the session on it).
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![l.clone()])));
    let now = h.now();
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PunchWanted(vec![2]), now);
    h.drain();
    assert!(punch_requests(&h.take_sent()).is_empty());

    // A coordinator that takes them: one request per netmap peer, none for a stranger.
    let mut nm = netmap(2, vec![l]);
    nm.punch = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    let now = h.now();
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PunchWanted(vec![2, 9]), now);
    h.drain();
    assert_eq!(punch_requests(&h.take_sent()), vec![DeviceId(2)]);

    // Out of session: nothing.
    let now = h.now();
    h.agent.handle_disconnected(Some("gone".into()), now);
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PunchWanted(vec![2]), now);
    h.drain();
    assert!(punch_requests(&h.take_sent()).is_empty());
}

#[test]
fn a_forwarded_punch_makes_the_data_plane_probe_a_configured_peer_back() {
    let mut h = H::new();
    h.leased();
    let l = h.lease(2, WgPublicKey([2; 32]), TTL);
    let mut nm = netmap(1, vec![l]);
    nm.punch = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    assert!(h.agent.configured_peers().iter().any(|p| p.device_id == 2));
    h.take_events();
    let eps: Vec<SocketAddr> = vec!["203.0.113.2:51820".parse().unwrap()];
    h.msg(CoordinatorMsg::Punch {
        peer: DeviceId(2),
        endpoints: eps.clone(),
    });
    assert_eq!(punch_events(&h.take_events()), vec![(2, eps.clone())]);
    // A device the data plane does not have (no lease, not in the netmap): ignored, and the
    // session goes on (no protocol error).
    h.msg(CoordinatorMsg::Punch {
        peer: DeviceId(7),
        endpoints: eps,
    });
    let events = h.take_events();
    assert!(punch_events(&events).is_empty());
    assert!(!events.contains(&Event::CloseSession));
    assert_eq!(h.agent.phase(), Phase::Connected);
    // The update this device sends says whether it takes punches (the driver's update does).
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        punch: true,
        ..DeviceUpdate::default()
    });
    h.drain();
    assert!(h
        .take_sent()
        .iter()
        .any(|m| matches!(m, DeviceMsg::Update(u) if u.punch)));
}

#[test]
fn a_local_address_change_makes_the_data_plane_probe_peers_again() {
    let mut h = H::new();
    let now = h.now();
    let a: SocketAddr = "192.168.1.2:51820".parse().unwrap();
    h.agent.handle_connected(
        DeviceUpdate {
            wg_port: 51820,
            local_endpoints: vec![a],
            ..DeviceUpdate::default()
        },
        now,
    );
    h.drain();
    h.take_events();
    // The same addresses: no network change.
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        local_endpoints: vec![a],
        ..DeviceUpdate::default()
    });
    h.drain();
    assert!(!h.take_events().contains(&Event::NetworkChanged));
    h.agent.handle_local_update(DeviceUpdate {
        wg_port: 51820,
        local_endpoints: vec!["10.9.9.9:51820".parse().unwrap()],
        ..DeviceUpdate::default()
    });
    h.drain();
    assert!(h.take_events().contains(&Event::NetworkChanged));
}

fn flow_sample(port: u16) -> ward_shared::filter::FlowSample {
    ward_shared::filter::FlowSample {
        key: ward_shared::filter::SampleKey {
            remote: ip4(2).into(),
            role: ward_shared::flows::Role::Responder,
            proto: ward_shared::filter::Proto::Tcp,
            port,
            verdict: ward_shared::flows::FlowVerdict::Allowed,
            rule: Some("eng".into()),
            reason: None,
            shadow: None,
        },
        counts: ward_shared::filter::FlowCounts {
            packets_in: 3,
            bytes_in: 300,
            packets_out: 2,
            bytes_out: 200,
            connections: 1,
        },
    }
}

fn flow_reports(sent: &[DeviceMsg]) -> Vec<ward_shared::flows::FlowReport> {
    sent.iter()
        .filter_map(|m| match m {
            DeviceMsg::Flows(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// A leased agent with one-second flow windows, holding a netmap (policy version 4) of a
/// coordinator that takes flow reports; the netmap is returned for a later session.
fn flows_on() -> (H, Netmap) {
    let mut h = H::new();
    h.agent.configure_flows(
        flows::FlowLogConfig {
            window_ms: 1000,
            ..Default::default()
        },
        None,
    );
    h.leased();
    let mut nm = netmap(1, vec![]);
    nm.flows = true;
    nm.policy_version = Some(4);
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    h.take_events();
    (h, nm)
}

#[test]
fn flow_reports_go_to_a_coordinator_that_takes_them_until_acked_and_again_after_a_reconnect() {
    let (mut h, nm) = flows_on();
    h.advance(1000, 0);
    assert!(h.take_events().contains(&Event::TakeFlowSamples));
    let now = h.now();
    h.agent.handle_dataplane_event(
        DataPlaneEvent::FlowSamples {
            samples: vec![flow_sample(22)],
            dropped: 0,
        },
        now,
    );
    h.advance(1500, 0);
    let first = flow_reports(&h.take_sent());
    assert_eq!(first.len(), 1, "the closed window is reported");
    let r = &first[0];
    assert_eq!(r.seq, 1);
    let rec = &r.windows[0].records[0];
    assert_eq!(rec.peer, Some(DeviceId(2)));
    assert_eq!(
        (rec.rule.as_deref(), rec.policy_version),
        (Some("eng"), Some(4))
    );
    assert_eq!((rec.packets_in, rec.bytes_out), (3, 200));
    assert_eq!(h.agent.flow_status().spool_reports, 1);
    h.msg(CoordinatorMsg::FlowsAck { seq: 1 });
    h.msg(CoordinatorMsg::FlowsAck { seq: 42 });
    let st = h.agent.flow_status();
    assert_eq!((st.spool_reports, st.last_acked_seq), (0, Some(1)));

    // A second report is lost with the session: it goes again, unchanged, in the next one.
    let now = h.now();
    h.agent.handle_dataplane_event(
        DataPlaneEvent::FlowSamples {
            samples: vec![flow_sample(23)],
            dropped: 0,
        },
        now,
    );
    h.advance(3000, 0);
    let second = flow_reports(&h.take_sent());
    assert_eq!(second.iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
    let now = h.now();
    h.agent.handle_disconnected(Some("broken".into()), now);
    h.advance(5000, 0);
    h.take_sent();
    h.take_events();
    h.connect();
    h.msg(CoordinatorMsg::Netmap(nm));
    h.advance(2500, 0);
    let again = flow_reports(&h.take_sent());
    assert_eq!(again, second, "resent with the same seq and content");
    let now = h.now();
    assert!(
        h.agent.take_flow_state(now.instant).is_some(),
        "the state changed: saved"
    );
}

/// A flow record names the netmap the agent holds when the record is first seen: what was
/// known of the other ends under one netmap is not reused after a delta changes it.
#[test]
fn flow_records_follow_the_netmap_through_deltas() {
    let (mut h, _) = flows_on();
    let mut versions = Vec::new();
    for (port, delta) in [(22, None), (23, Some(5)), (24, None), (25, Some(6))] {
        if let Some(v) = delta {
            let seq = h.agent.netmap().map(|n| n.seq).unwrap_or_default();
            h.msg(CoordinatorMsg::NetmapDelta(
                ward_shared::wire::NetmapDelta {
                    policy_version: Some(v),
                    ..ward_shared::wire::NetmapDelta::after(seq)
                },
            ));
        }
        let now = h.now();
        h.agent.handle_dataplane_event(
            DataPlaneEvent::FlowSamples {
                samples: vec![flow_sample(port)],
                dropped: 0,
            },
            now,
        );
        // The window closes and its report goes (reports are at least 2 s apart).
        h.advance(1500, 0);
        h.advance(1500, 0);
        for r in flow_reports(&h.take_sent()) {
            h.msg(CoordinatorMsg::FlowsAck { seq: r.seq });
            versions.extend(
                r.windows
                    .iter()
                    .flat_map(|w| &w.records)
                    .map(|x| x.policy_version),
            );
        }
    }
    assert_eq!(versions, [Some(4), Some(5), Some(5), Some(6)]);
}

#[test]
fn no_flow_reports_to_a_coordinator_that_does_not_take_them() {
    let mut h = H::new();
    h.agent.configure_flows(
        flows::FlowLogConfig {
            window_ms: 1000,
            ..Default::default()
        },
        None,
    );
    h.leased();
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![])));
    h.take_events();
    let now = h.now();
    h.agent.handle_dataplane_event(
        DataPlaneEvent::FlowSamples {
            samples: vec![flow_sample(22)],
            dropped: 0,
        },
        now,
    );
    h.advance(5000, 0);
    assert!(flow_reports(&h.take_sent()).is_empty());
    // Kept (within the caps) for when the coordinator takes them.
    let st = h.agent.flow_status();
    assert!(!st.enabled);
    assert_eq!((st.spool_reports, st.reports_sent), (1, 0));
}

/// The name the coordinator gives this device reaches the driver: with each full netmap, and
/// when a delta renames the device (moved aside from a name an administrator bound to another
/// device); the agent's netmap carries it too.
#[test]
fn a_renamed_device_learns_its_new_name() {
    let mut h = H::new();
    h.connect();
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![])));
    let names = |evs: Vec<Event>| -> Vec<String> {
        evs.into_iter()
            .filter_map(|e| match e {
                Event::SelfName(n) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(names(h.take_events()), vec!["me".to_string()]);
    let seq = h.agent.netmap().map(|nm| nm.seq).unwrap();
    let delta = |base: u64, me: Option<&str>| {
        let me = me.map(|n| {
            format!(r#","me":{{"device_id":1,"hostname":"{n}","ipv4":"100.64.0.1","ipv6":"fd00::1","v6_prefix":"fd00::","observed_addr":null}}"#)
        });
        let json = format!(
            r#"{{"type":"netmap_delta","base_seq":{base},"seq":{}{}}}"#,
            base + 1,
            me.unwrap_or_default()
        );
        ward_shared::wire::decode::<CoordinatorMsg>(json.as_bytes()).unwrap()
    };
    // A delta that leaves the name: nothing to save.
    h.msg(delta(seq, None));
    assert!(names(h.take_events()).is_empty());
    h.msg(delta(seq + 1, Some("me-2")));
    assert_eq!(names(h.take_events()), vec!["me-2".to_string()]);
    assert_eq!(
        h.agent.netmap().map(|nm| nm.me.hostname.to_string()),
        Some("me-2".into())
    );
}

fn save_events(evs: &[Event]) -> Vec<(Vec<String>, Option<String>)> {
    evs.iter()
        .filter_map(|e| match e {
            Event::SaveCoordinators { addrs, preferred } => {
                Some((addrs.clone(), preferred.clone()))
            }
            _ => None,
        })
        .collect()
}

fn addrs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn fails_over_to_the_next_coordinator_keeping_the_peers_and_learns_new_lists() {
    let mut h = H::new();
    h.agent
        .set_coordinators(addrs(&["a:1", "b:1"]), Some("a:1".into()));
    assert_eq!(h.agent.coordinator(), Some("a:1"));
    h.leased();
    let peer = h.lease(2, WgPublicKey([5; 32]), TTL);
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![peer])));
    let evs = h.take_events();
    // a was already preferred: nothing to save.
    assert!(save_events(&evs).is_empty(), "{evs:?}");
    let peers = h.agent.configured_peers().to_vec();
    assert_eq!(peers.len(), 1);

    // a dies: the next attempt goes to b within the first backoff window, and the data plane
    // keeps its peers (leases still valid) meanwhile.
    let now = h.now();
    h.agent.handle_disconnected(Some("timed out".into()), now);
    h.drain();
    let evs = h.take_events();
    let retry = evs
        .iter()
        .find_map(|e| match e {
            Event::Disconnected {
                revoked: false,
                retry_in,
            } => Some(*retry_in),
            _ => None,
        })
        .expect("disconnected");
    assert!(retry <= backoff::BACKOFF_MIN, "{retry:?}");
    assert!(
        !evs.iter().any(|e| matches!(e, Event::SetPeers(_))),
        "{evs:?}"
    );
    assert_eq!(h.agent.coordinator(), Some("b:1"));
    h.advance(250, 0);
    assert!(h.take_events().contains(&Event::Connect));
    assert_eq!(h.agent.configured_peers(), peers.as_slice());

    // b works: it is saved as the address to dial first.
    h.connect();
    let peer = h.lease(2, WgPublicKey([5; 32]), TTL);
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![peer])));
    assert_eq!(
        save_events(&h.take_events()),
        [(addrs(&["a:1", "b:1"]), Some("b:1".into()))]
    );
    assert_eq!(h.agent.coordinators().preferred(), Some("b:1"));

    // A netmap with a new list replaces the known one and is saved.
    let mut nm = netmap(2, vec![]);
    nm.coordinators = addrs(&["b:1", "c:1"]);
    h.msg(CoordinatorMsg::Netmap(nm));
    assert_eq!(
        save_events(&h.take_events()),
        [(addrs(&["b:1", "c:1"]), Some("b:1".into()))]
    );
    assert_eq!(h.agent.coordinators().addrs(), addrs(&["b:1", "c:1"]));

    // Backoff was reset by b's session; two failures in a row widen the window.
    let now = h.now();
    h.agent.handle_disconnected(None, now);
    assert_eq!(h.agent.coordinator(), Some("c:1"));
    assert_eq!(h.agent.coordinators().failures(), 1);
    h.drain();
    h.advance(250, 0);
    assert!(h.take_events().contains(&Event::Connect));
    let now = h.now();
    h.agent
        .handle_disconnected(Some("connection refused".into()), now);
    assert_eq!(h.agent.coordinator(), Some("b:1"));
    assert_eq!(h.agent.coordinators().failures(), 2);

    // A certificate rejection retries the same address.
    h.drain();
    h.advance(450, 0);
    assert!(h.take_events().contains(&Event::Connect));
    let now = h.now();
    h.agent
        .handle_refused("received fatal alert: BadCertificate".into(), now);
    assert_eq!(h.agent.coordinator(), Some("b:1"));
}

#[test]
fn devices_of_a_failed_coordinator_spread_their_reconnects() {
    // 200 agents (each with its own seed, as each daemon draws one) lose the same coordinator
    // at the same instant: their first retries spread over the whole first window.
    let base = Instant::now();
    let now = Now {
        instant: base,
        unix_ms: T0,
    };
    let mut waits = Vec::new();
    for seed in 0..200u64 {
        let cfg = AgentConfig {
            routes: Default::default(),
            device_id: DeviceId(1),
            ipv4: ip4(1),
            ipv6: ip6(1),
            lease_key: None,
            private_key: PrivateKey([1; 32]),
            cert_not_after_ms: T0 + crate::CERT_LIFETIME_MS,
            posture_interval: Duration::from_secs(30),
            os: "test".into(),
            version: "0".into(),
            seed: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef,
            protocol: ward_shared::wire::PROTOCOL_VERSION,
        };
        let mut a = Agent::new(cfg, now);
        a.set_coordinators(addrs(&["a:1", "b:1"]), None);
        a.handle_disconnected(Some("timed out".into()), now);
        let w = std::iter::from_fn(|| a.poll_event())
            .find_map(|e| match e {
                Event::Disconnected { retry_in, .. } => Some(retry_in),
                _ => None,
            })
            .expect("disconnected");
        waits.push(w.as_millis() as u64);
    }
    assert!(waits.iter().all(|w| *w <= 200), "{waits:?}");
    let mut quarters = [0u32; 4];
    for w in &waits {
        quarters[((*w as usize) / 50).min(3)] += 1;
    }
    // Uniform would be 50 each; a herd (everyone at the same wait) fails this.
    for q in quarters {
        assert!((25..=75).contains(&q), "{quarters:?}");
    }
}

/// A version-3 netmap carries reach as grants over destination lists: the agent holds them as
/// sent, applies a delta that changes a list and one that changes the grants, and its flat
/// view (what `ward status`, DNS names and flow records read) follows, never naming itself.
#[test]
fn reach_grants_and_their_deltas_give_the_flat_reach_view() {
    use ward_shared::filter::{PortRange, Proto};
    use ward_shared::wire::{NetmapDelta, ReachGrant, ReachService};
    let mut h = H::new();
    h.leased();
    let grant = |lo: u16| ReachGrant {
        service: "db".into(),
        proto: Proto::Tcp,
        ports: vec![PortRange { lo, hi: lo }],
        rule: "eng".into(),
        not_after_ms: None,
    };
    let mut nm = netmap(1, vec![]);
    nm.reach_grants = vec![grant(5432)];
    nm.reach_services = vec![ReachService {
        service: "db".into(),
        devices: vec![DeviceId(1), DeviceId(2)],
    }];
    h.msg(CoordinatorMsg::Netmap(nm));
    let view = h.agent.netmap().unwrap().reach_view();
    assert_eq!(view.len(), 1, "{view:?}");
    assert_eq!(
        (
            view[0].device_id,
            view[0].hostname.as_str(),
            view[0].ports[0].lo
        ),
        (DeviceId(2), "peer", 5432)
    );
    // A third device joins db: its peer entry and the whole new list.
    let mut three = netmap(1, vec![]).peers[0].clone();
    three.device_id = DeviceId(3);
    three.hostname = Hostname::parse("db3").unwrap();
    three.ipv4 = ip4(3);
    three.ipv6 = ip6(3);
    h.msg(CoordinatorMsg::NetmapDelta(NetmapDelta {
        upsert: vec![three],
        reach_services: vec![ReachService {
            service: "db".into(),
            devices: vec![DeviceId(1), DeviceId(2), DeviceId(3)],
        }],
        ..NetmapDelta::after(1)
    }));
    let view = h.agent.netmap().unwrap().reach_view();
    assert_eq!(
        view.iter()
            .map(|r| (r.device_id, r.hostname.as_str()))
            .collect::<Vec<_>>(),
        vec![(DeviceId(2), "peer"), (DeviceId(3), "db3")]
    );
    // The policy moves the port: only the grants change.
    h.msg(CoordinatorMsg::NetmapDelta(NetmapDelta {
        reach_grants: Some(vec![grant(6432)]),
        ..NetmapDelta::after(2)
    }));
    let nm = h.agent.netmap().unwrap();
    assert_eq!(nm.seq, 3);
    let view = nm.reach_view();
    assert_eq!(view.len(), 2);
    assert!(view
        .iter()
        .all(|r| r.ports[0].lo == 6432 && r.device_id != DeviceId(1)));
    // The service goes: nothing is reachable.
    h.msg(CoordinatorMsg::NetmapDelta(NetmapDelta {
        reach_grants: Some(vec![]),
        removed_reach_services: vec!["db".into()],
        ..NetmapDelta::after(3)
    }));
    let nm = h.agent.netmap().unwrap();
    assert!(nm.reach_view().is_empty() && nm.reach_services.is_empty());
}

#[test]
fn a_delta_hands_on_only_the_peers_it_changes() {
    let mut h = H::new();
    h.leased();
    let mut nm = netmap(1, vec![]);
    let l2 = h.lease(2, WgPublicKey([20; 32]), TTL);
    nm.peers[0].leases = vec![l2];
    let mut third = nm.peers[0].clone();
    third.device_id = DeviceId(3);
    third.hostname = Hostname::parse("third").unwrap();
    third.ipv4 = ip4(3);
    third.ipv6 = ip6(3);
    third.leases = vec![h.lease(3, WgPublicKey([30; 32]), TTL)];
    nm.peers.push(third.clone());
    h.take_events();
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    let whole = h.agent.configured_peers();
    assert_eq!(whole.len(), 2);
    assert!(h.take_events().contains(&Event::SetPeers(whole.clone())));

    // One peer's new endpoint: that peer alone, and no filter or route event.
    let mut moved = third.clone();
    moved.endpoints = vec!["192.0.2.3:51820".parse().unwrap()];
    let delta = |base: u64, upsert: Vec<Peer>, remove: Vec<DeviceId>| {
        CoordinatorMsg::NetmapDelta(ward_shared::wire::NetmapDelta {
            upsert,
            remove,
            ..ward_shared::wire::NetmapDelta::after(base)
        })
    };
    h.msg(delta(1, vec![moved], vec![]));
    let evs = h.take_events();
    let updates: Vec<_> = evs
        .iter()
        .filter_map(|e| match e {
            Event::UpdatePeers(u) => Some(u.clone()),
            Event::SetPeers(_) | Event::SetFilter { .. } | Event::SetRoutes { .. } => {
                panic!("a full event for a one-peer delta: {e:?}")
            }
            _ => None,
        })
        .collect();
    assert_eq!(updates.len(), 1, "{evs:?}");
    assert_eq!(updates[0].len(), 1);
    assert_eq!(updates[0][0].0, 3);
    assert_eq!(
        updates[0][0].1[0].endpoints,
        vec!["192.0.2.3:51820".parse().unwrap()]
    );
    assert_eq!(
        h.agent.configured_peers()[0],
        whole[0],
        "device 2 untouched"
    );
    assert_eq!(h.agent.configured_peers()[1].endpoints.len(), 1);

    // A peer whose only change is not configured (online) hands nothing on.
    let mut offline = nm.peers[0].clone();
    offline.online = false;
    h.msg(delta(2, vec![offline], vec![]));
    let evs = h.take_events();
    assert!(
        !evs.iter().any(|e| matches!(e, Event::UpdatePeers(_))),
        "{evs:?}"
    );

    // A forged lease in a delta is refused: the peer goes, the other stays.
    let mut forged = third.clone();
    let mut bad = h.lease(3, WgPublicKey([31; 32]), TTL);
    bad.lease.serial += 100;
    forged.leases = vec![bad];
    h.msg(delta(3, vec![forged], vec![]));
    assert!(h
        .take_events()
        .contains(&Event::UpdatePeers(vec![(3, vec![])])));
    assert_eq!(h.agent.configured_peers(), vec![whole[0].clone()]);

    // A removed peer goes.
    h.msg(delta(4, vec![], vec![DeviceId(2)]));
    assert!(h
        .take_events()
        .contains(&Event::UpdatePeers(vec![(2, vec![])])));
    assert!(h.agent.configured_peers().is_empty());

    // A new relay list may change every peer's relay: the whole set is given again.
    h.msg(CoordinatorMsg::NetmapDelta(
        ward_shared::wire::NetmapDelta {
            upsert: vec![third.clone()],
            relays: Some(vec![]),
            ..ward_shared::wire::NetmapDelta::after(5)
        },
    ));
    let evs = h.take_events();
    assert!(
        evs.iter()
            .any(|e| matches!(e, Event::SetPeers(p) if p.len() == 1 && p[0].device_id == 3)),
        "{evs:?}"
    );
}

fn hello_holding(sent: &[DeviceMsg]) -> Option<Holding> {
    sent.iter()
        .find_map(|m| match m {
            DeviceMsg::Hello(h) => Some(h.holding.clone()),
            _ => None,
        })
        .expect("a hello")
}

/// A reconnecting agent says what it holds of its netmap; a first netmap that carries only
/// the buckets that changed leaves it with exactly the coordinator's peers. One that does not
/// fit what it held ends the session, and the next hello holds nothing.
#[test]
fn a_new_session_resumes_the_netmap_held() {
    let mut h = H::new();
    let now = h.now();
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    assert_eq!(hello_holding(&h.take_sent()), None, "nothing held yet");
    let mut held = netmap(1, vec![]);
    let proto = held.peers[0].clone();
    held.peers = (2..=40u8)
        .map(|i| Peer {
            device_id: DeviceId(i.into()),
            ipv4: ip4(i),
            ipv6: ip6(i),
            ..proto.clone()
        })
        .collect();
    h.msg(CoordinatorMsg::Netmap(held.clone()));

    let reconnect = |h: &mut H| -> Option<Holding> {
        let now = h.now();
        h.agent.handle_disconnected(Some("gone".into()), now);
        h.agent.handle_connected(DeviceUpdate::default(), now);
        h.drain();
        hello_holding(&h.take_sent())
    };
    let holding = reconnect(&mut h).expect("the netmap held");
    assert_eq!(holding.count(), Ok(64));
    // Meanwhile peer 5 went offline and peer 7 left.
    let mut current = held.clone();
    current.seq = 9;
    current.peers[3].online = false;
    current.peers.retain(|p| p.device_id != DeviceId(7));
    let mut first = current.clone();
    first.resumed = resume::resume(&mut first.peers, &holding, resume::peer_digest).unwrap();
    assert_eq!(first.peers.len(), 1, "only the changed peer is carried");
    h.msg(CoordinatorMsg::Netmap(first));
    let nm = h.agent.netmap().expect("a netmap");
    assert_eq!(nm.peers, current.peers);
    assert_eq!((nm.seq, nm.resumed.clone()), (9, None));

    // A resumed netmap for another bucket count than the holding's.
    assert!(reconnect(&mut h).is_some());
    h.take_events();
    let mut wrong = current.clone();
    wrong.peers.clear();
    wrong.resumed = Some(resume::Resumed {
        buckets: 2,
        sent: vec![],
    });
    h.msg(CoordinatorMsg::Netmap(wrong));
    assert!(h.take_events().contains(&Event::CloseSession));
    assert_eq!(
        h.agent.netmap().expect("kept").peers,
        current.peers,
        "the netmap held is untouched"
    );
    assert_eq!(
        reconnect(&mut h),
        None,
        "no resume after one that did not fit"
    );
}

// ---- peers on demand ----------------------------------------------------------------------

fn want_peers(sent: &[DeviceMsg]) -> Vec<PeerRef> {
    sent.iter()
        .filter_map(|m| match m {
            DeviceMsg::WantPeer { by } => Some(by.clone()),
            _ => None,
        })
        .collect()
}

fn on_demand_events(events: &[Event]) -> Vec<bool> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SetOnDemand(on) => Some(*on),
            _ => None,
        })
        .collect()
}

fn addr(n: u8) -> PeerRef {
    PeerRef::Addr(ip4(n).into())
}

#[test]
fn on_demand_the_data_plane_wants_become_want_peer_messages() {
    let mut h = H::new();
    h.leased();
    let l = h.lease(2, WgPublicKey([2; 32]), TTL);
    let mut nm = netmap(1, vec![l]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    assert_eq!(on_demand_events(&h.take_events()), vec![true]);
    let now = h.now();
    let wants = vec![
        addr(9),
        PeerRef::Key(WgPublicKey([5; 32])),
        addr(9),
        // Held already (its lease is what keeps it out of the data plane): not asked again.
        addr(2),
        PeerRef::Key(WgPublicKey([2; 32])),
    ];
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(wants), now);
    h.drain();
    assert_eq!(
        want_peers(&h.take_sent()),
        vec![addr(9), PeerRef::Key(WgPublicKey([5; 32]))]
    );
    // Bounded per report.
    let many: Vec<PeerRef> = (0..100u8)
        .map(|i| PeerRef::Addr(Ipv4Addr::new(100, 64, 9, i).into()))
        .collect();
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(many.clone()), now);
    h.drain();
    assert_eq!(want_peers(&h.take_sent()), many[..MAX_WANTS_PER_REPORT]);

    // Out of session: nothing.
    h.agent.handle_disconnected(Some("gone".into()), now);
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(vec![addr(9)]), now);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty());
    // A new session before its first netmap: nothing yet, then asked for once it is in.
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(vec![addr(9)]), now);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty());
    let mut nm = netmap(2, vec![]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    h.drain();
    assert_eq!(want_peers(&h.take_sent()), vec![addr(9)]);
}

#[test]
fn without_on_demand_wants_are_not_sent_and_the_data_plane_leaves_the_mode() {
    let mut h = H::new();
    h.leased();
    let l = h.lease(2, WgPublicKey([2; 32]), TTL);
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![l.clone()])));
    assert!(
        on_demand_events(&h.take_events()).is_empty(),
        "off is the default"
    );
    let now = h.now();
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(vec![addr(9)]), now);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty());

    let mut nm = netmap(2, vec![l.clone()]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    nm.seq = 3;
    h.msg(CoordinatorMsg::Netmap(nm));
    assert_eq!(on_demand_events(&h.take_events()), vec![true], "told once");
    h.msg(CoordinatorMsg::Netmap(netmap(4, vec![l])));
    assert_eq!(on_demand_events(&h.take_events()), vec![false]);
    let now = h.now();
    h.agent
        .handle_dataplane_event(DataPlaneEvent::PeersWanted(vec![addr(9)]), now);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty());
}

#[test]
fn a_refused_peer_is_handed_to_the_data_plane_and_the_session_goes_on() {
    let mut h = H::new();
    h.leased();
    let mut nm = netmap(1, vec![]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    h.take_events();
    h.msg(CoordinatorMsg::PeerRefused {
        by: addr(9),
        reason: "no policy allows traffic either way".into(),
    });
    let events = h.take_events();
    assert_eq!(events, vec![Event::RefusePeer(addr(9))]);
    assert_eq!(h.agent.phase(), Phase::Connected);
}

#[test]
fn a_new_session_names_the_peers_held_on_demand_and_none_otherwise() {
    let hello_held = |sent: &[DeviceMsg]| -> Vec<DeviceId> {
        sent.iter()
            .find_map(|m| match m {
                DeviceMsg::Hello(h) => Some(h.held_peers.clone()),
                _ => None,
            })
            .expect("a hello")
    };
    let reconnect = |h: &mut H| -> Vec<DeviceId> {
        let now = h.now();
        h.agent.handle_disconnected(Some("gone".into()), now);
        h.agent.handle_connected(DeviceUpdate::default(), now);
        h.drain();
        hello_held(&h.take_sent())
    };
    let mut h = H::new();
    let now = h.now();
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    assert!(hello_held(&h.take_sent()).is_empty(), "nothing held yet");
    let mut nm = netmap(1, vec![]);
    let proto = nm.peers[0].clone();
    nm.peers = [4u8, 2, 3]
        .into_iter()
        .map(|i| Peer {
            device_id: DeviceId(i.into()),
            ipv4: ip4(i),
            ipv6: ip6(i),
            ..proto.clone()
        })
        .collect();
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    assert!(
        reconnect(&mut h).is_empty(),
        "a whole netmap: nothing to name"
    );

    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    assert_eq!(
        reconnect(&mut h),
        vec![DeviceId(2), DeviceId(3), DeviceId(4)]
    );

    // At most MAX_HELD_PEERS.
    nm.peers = (0..wire::MAX_HELD_PEERS as u64 + 10)
        .map(|i| Peer {
            device_id: DeviceId(i + 2),
            ..proto.clone()
        })
        .collect();
    h.msg(CoordinatorMsg::Netmap(nm));
    assert_eq!(reconnect(&mut h).len(), wire::MAX_HELD_PEERS);
}

fn name(s: &str) -> Label {
    Label::parse(s).unwrap()
}

#[test]
fn on_demand_the_resolvers_names_become_want_peer_messages() {
    let mut h = H::new();
    h.leased();
    let l = h.lease(2, WgPublicKey([2; 32]), TTL);
    let mut nm = netmap(1, vec![l.clone()]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    h.take_events();
    h.agent.handle_names_wanted(vec![
        name("db"),
        name("db"),
        // The held peer's hostname: the zone answers it already.
        name("peer"),
        name("web-1"),
    ]);
    h.drain();
    assert_eq!(
        want_peers(&h.take_sent()),
        vec![PeerRef::Name(name("db")), PeerRef::Name(name("web-1"))]
    );
    // Names and data-plane wants share the rules: bounded per report.
    let many: Vec<Label> = (0..100).map(|i| name(&format!("n{i}"))).collect();
    h.agent.handle_names_wanted(many.clone());
    h.drain();
    let sent = want_peers(&h.take_sent());
    assert_eq!(sent.len(), MAX_WANTS_PER_REPORT);
    assert_eq!(sent[0], PeerRef::Name(many[0].clone()));

    // Not on demand: nothing (the coordinator would close the session on `want_peer`).
    h.msg(CoordinatorMsg::Netmap(netmap(2, vec![l])));
    h.take_events();
    h.agent.handle_names_wanted(vec![name("db")]);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty());
}

#[test]
fn without_a_session_or_on_demand_names_are_not_asked_for() {
    let mut h = H::new();
    let now = h.now();
    h.agent.handle_names_wanted(vec![name("db")]);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty(), "no session");
    h.agent.handle_connected(DeviceUpdate::default(), now);
    h.drain();
    h.take_sent();
    h.agent.handle_names_wanted(vec![name("db")]);
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty(), "no netmap yet");
    // The first netmap is not on demand: what was kept is dropped, not sent.
    h.msg(CoordinatorMsg::Netmap(netmap(1, vec![])));
    h.drain();
    assert!(want_peers(&h.take_sent()).is_empty(), "not on demand");
}

#[test]
fn a_refused_name_goes_to_the_resolver_not_the_data_plane() {
    let mut h = H::new();
    h.leased();
    let mut nm = netmap(1, vec![]);
    nm.on_demand = true;
    h.msg(CoordinatorMsg::Netmap(nm));
    h.take_events();
    h.msg(CoordinatorMsg::PeerRefused {
        by: PeerRef::Name(name("db")),
        reason: "no device or service of that name this device may reach".into(),
    });
    assert_eq!(h.take_events(), vec![Event::RefuseName(name("db"))]);
    assert_eq!(h.agent.phase(), Phase::Connected);
    // Addresses and keys still go to the data plane.
    h.msg(CoordinatorMsg::PeerRefused {
        by: PeerRef::Key(WgPublicKey([5; 32])),
        reason: "no".into(),
    });
    assert_eq!(
        h.take_events(),
        vec![Event::RefusePeer(PeerRef::Key(WgPublicKey([5; 32])))]
    );
}

/// A delta that brings a peer and the set addresses admitting it hands the data plane the
/// filter first: the peer's first packets never meet the filter from before it.
#[test]
fn a_delta_s_filter_goes_to_the_data_plane_before_its_peers() {
    let mut h = H::new();
    h.leased();
    let mut nm = netmap(1, vec![]);
    nm.peers[0].leases = vec![h.lease(2, WgPublicKey([20; 32]), TTL)];
    let p = |s: &str| s.parse::<ward_shared::routes::Prefix>().unwrap();
    nm.inbound = vec![FilterRule {
        rule: "eng".into(),
        service: "db".into(),
        sources: Default::default(),
        source_sets: vec![3],
        proto: ward_shared::filter::Proto::Tcp,
        ports: vec![ward_shared::filter::PortRange { lo: 5432, hi: 5432 }],
        not_after_ms: None,
        dests: vec![],
    }]
    .into();
    nm.peer_sets = vec![ward_shared::peerset::PeerSet {
        id: 3,
        prefixes: vec![p(&format!("{}/32", ip4(2)))],
    }]
    .into();
    h.msg(CoordinatorMsg::Netmap(nm.clone()));
    let evs = h.take_events();
    let pos = |evs: &[Event], f: fn(&Event) -> bool| evs.iter().position(f);
    let filter = pos(&evs, |e| matches!(e, Event::SetFilter { .. })).expect("a filter");
    let peers = pos(&evs, |e| matches!(e, Event::SetPeers(_))).expect("peers");
    assert!(filter < peers, "{evs:?}");

    let mut third = nm.peers[0].clone();
    third.device_id = DeviceId(3);
    third.hostname = Hostname::parse("third").unwrap();
    third.ipv4 = ip4(3);
    third.ipv6 = ip6(3);
    third.leases = vec![h.lease(3, WgPublicKey([30; 32]), TTL)];
    h.msg(CoordinatorMsg::NetmapDelta(
        ward_shared::wire::NetmapDelta {
            upsert: vec![third],
            peer_sets: vec![ward_shared::peerset::PeerSetChange {
                id: 3,
                prefixes: None,
                add: vec![p(&format!("{}/32", ip4(3)))],
                remove: vec![],
            }],
            ..ward_shared::wire::NetmapDelta::after(1)
        },
    ));
    let evs = h.take_events();
    let filter = pos(&evs, |e| matches!(e, Event::SetFilter { .. })).expect("a filter");
    let peers = pos(&evs, |e| matches!(e, Event::UpdatePeers(_))).expect("peers");
    assert!(filter < peers, "{evs:?}");
}
