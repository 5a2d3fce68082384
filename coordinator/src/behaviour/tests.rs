//! The detector on a fake clock: a simulated deployment's normal weeks, three attacks, a
//! flood of destinations, and devices lying about each other.

use super::*;
use ward_shared::filter::Proto;
use ward_shared::flows::{FlowRecord, FlowVerdict, Role};

const HOUR: i64 = 3_600_000;
/// A Monday 00:00 UTC.
const MONDAY: i64 = 4 * DAY_MS + 2_976 * WEEK_MS;
const WINDOW: i64 = 5 * 60_000;
const THRESHOLD: u8 = 40;

fn addr(id: u64) -> IpAddr {
    IpAddr::from([100, 64, (id >> 8) as u8, id as u8])
}

fn rec(role: Role, peer: u64, port: u16, bytes_out: u64, conns: u64) -> FlowRecord {
    FlowRecord {
        role,
        peer: Some(DeviceId(peer)),
        peer_addr: addr(peer),
        peer_user: None,
        peer_tags: vec![],
        proto: Proto::Tcp,
        port,
        verdict: FlowVerdict::Allowed,
        rule: None,
        policy_version: None,
        reason: None,
        packets_out: bytes_out / 1000 + 1,
        bytes_out,
        packets_in: 1,
        bytes_in: 100,
        connections: conns,
        shadow: None,
    }
}

fn name(peer: Option<DeviceId>, a: IpAddr) -> String {
    match peer {
        Some(d) => format!("host-{}", d.0),
        None => a.to_string(),
    }
}

/// A seeded xorshift: the same week every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 10_000) as f64 / 10_000.0 < p
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// 40 laptops (1–40) working weekdays 08–18 with three services each and a Sunday 02:00
/// backup; 10 servers (41–50) replicating to each other around the clock.
struct World {
    rng: Rng,
    services: BTreeMap<u64, Vec<(u64, u16)>>,
}

impl World {
    fn new() -> Self {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let ports = [5432u16, 443, 22, 8080, 6379];
        let mut services = BTreeMap::new();
        for d in 1..=40u64 {
            let mut s = Vec::new();
            while s.len() < 3 {
                let server = rng.between(41, 49);
                let port = ports[(server % 5) as usize];
                if !s.contains(&(server, port)) {
                    s.push((server, port));
                }
            }
            services.insert(d, s);
        }
        for d in 41..=50u64 {
            let next = if d == 50 { 41 } else { d + 1 };
            services.insert(d, vec![(next, 5432), (50, 873)]);
        }
        Self { rng, services }
    }

    /// Device `d`'s own records for the window starting at `t`.
    fn records(&mut self, d: u64, t: i64) -> Vec<FlowRecord> {
        let how = hour_of_week(t);
        let (day, hour) = (how / 24, how % 24);
        let mut out = Vec::new();
        let svcs = self.services[&d].clone();
        if d > 40 {
            for (peer, port) in svcs {
                if port == 873 && d == 50 {
                    continue;
                }
                let busy = if (8..18).contains(&hour) { 3 } else { 1 };
                let bytes = self.rng.between(200_000, 400_000) * busy;
                out.push(rec(
                    Role::Initiator,
                    peer,
                    port,
                    bytes,
                    self.rng.between(1, 3),
                ));
            }
            return out;
        }
        if day < 5 && (8..18).contains(&hour) {
            for (peer, port) in svcs {
                if self.rng.chance(0.7) {
                    let bytes = self.rng.between(50_000, 2_000_000);
                    out.push(rec(
                        Role::Initiator,
                        peer,
                        port,
                        bytes,
                        self.rng.between(1, 6),
                    ));
                }
            }
        }
        // The weekly backup: Sunday 02:00–02:30.
        if day == 6 && hour == 2 && (t % HOUR) < 30 * 60_000 {
            let bytes = self.rng.between(150_000_000, 250_000_000);
            out.push(rec(Role::Initiator, 50, 873, bytes, 1));
        }
        out
    }
}

fn run_window(det: &mut Detector, w: &mut World, d: u64, t: i64) -> Option<Anomaly> {
    let recs = w.records(d, t);
    det.handle_window(DeviceId(d), t, t + WINDOW, &recs, &name, t + WINDOW)
}

/// A day of the same minute-long windows, the whole of it learning; returns the next
/// day's 10:00.
fn warm(det: &mut Detector, d: DeviceId, recs: &[FlowRecord]) -> i64 {
    let mut t = MONDAY;
    while t < MONDAY + DAY_MS {
        det.handle_window(d, t, t + 60_000, recs, &name, t);
        t += 60_000;
    }
    MONDAY + DAY_MS + 10 * HOUR
}

fn detector() -> Detector {
    let mut det = Detector::new(Config::default());
    det.set_threshold(THRESHOLD);
    det
}

#[test]
fn a_simulated_deployment_flags_three_attacks_and_little_else() {
    let mut det = detector();
    let mut w = World::new();
    // Week 1: learning. Week 2: watched; every anomaly is a false positive.
    let mut false_positives = Vec::new();
    let mut t = MONDAY;
    while t < MONDAY + 2 * WEEK_MS {
        for d in 1..=50 {
            if let Some(a) = run_window(&mut det, &mut w, d, t) {
                assert!(t >= MONDAY + WEEK_MS, "an anomaly while learning: {a:?}");
                false_positives.push(a);
            }
        }
        t += WINDOW;
    }
    println!(
        "false positives in a normal week (50 devices): {}",
        false_positives.len()
    );
    for a in &false_positives {
        println!("  d{} score {}: {}", a.device.0, a.score, a.reason);
    }
    assert!(false_positives.len() <= 5, "{false_positives:#?}");
    for d in 1..=50 {
        assert!(
            det.risk(DeviceId(d), t).score <= THRESHOLD,
            "d{d} over the threshold"
        );
    }

    let victim = 7u64;
    let mut delays = Vec::new();
    // Each attack starts on a weekday at 10:00 with normal traffic around it; it must take
    // the victim's risk over the threshold within the window it starts in.
    type Attack = Box<dyn Fn(i64, usize) -> Vec<FlowRecord>>;
    let attacks: [(&str, Attack); 3] = [
        (
            "lateral movement (ssh to six new peers)",
            Box::new(|_t, _i| {
                (20..26)
                    .map(|p| rec(Role::Initiator, p, 22, 5_000, 2))
                    .collect()
            }),
        ),
        (
            "slow port scan (a port every 30 s on one server)",
            Box::new(|_t, i| {
                (0..10)
                    .map(|k| rec(Role::Initiator, 45, 1000 + (i * 10 + k) as u16, 60, 1))
                    .collect()
            }),
        ),
        (
            "bulk exfiltration to an unusual peer",
            Box::new(|_t, _i| vec![rec(Role::Initiator, 33, 443, 900_000_000, 1)]),
        ),
    ];
    let mut day = MONDAY + 2 * WEEK_MS;
    for (what, attack) in attacks.iter() {
        // Normal traffic for the victim up to 10:00, then the attack for up to 3 windows.
        let mut t = day;
        while t < day + 10 * HOUR {
            run_window(&mut det, &mut w, victim, t);
            t += WINDOW;
        }
        assert!(
            det.risk(DeviceId(victim), t).score <= THRESHOLD,
            "{what}: risky before"
        );
        let start = t;
        let mut detected = None;
        for i in 0..3 {
            let mut recs = w.records(victim, t);
            recs.extend(attack(t, i));
            det.handle_window(DeviceId(victim), t, t + WINDOW, &recs, &name, t + WINDOW);
            let r = det.risk(DeviceId(victim), t + WINDOW);
            if r.score > THRESHOLD {
                detected = Some((t + WINDOW - start, r));
                break;
            }
            t += WINDOW;
        }
        let (delay, r) = detected.unwrap_or_else(|| panic!("{what}: not detected"));
        println!(
            "attack {what}: risk {} after {} s ({} window): {}",
            r.score,
            delay / 1000,
            delay / WINDOW,
            r.reason
        );
        assert_eq!(delay, WINDOW, "{what}: not within one window");
        delays.push(delay);
        day += DAY_MS;
        // Let the risk decay before the next attack.
        assert!(det.risk(DeviceId(victim), day).score < 5);
    }
    assert_eq!(delays.len(), 3);
}

#[test]
fn the_reason_names_the_destination_and_the_volume() {
    let mut det = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    let d = DeviceId(1);
    let t = warm(&mut det, d, &[rec(Role::Initiator, 2, 443, 1_000_000, 1)]);
    let a = det
        .handle_window(
            d,
            t,
            t + 60_000,
            &[rec(Role::Initiator, 7, 5432, 40_000_000, 1)],
            &name,
            t,
        )
        .unwrap();
    assert!(
        a.reason
            .contains("first contact with host-7 on tcp/5432 in 30 days"),
        "{}",
        a.reason
    );
    assert!(a.reason.contains("40× its usual volume"), "{}", a.reason);
    assert!(a.kinds.contains(&Kind::NewDestination) && a.kinds.contains(&Kind::Volume));
    let r = det.risk(d, t);
    assert!(r.score > 40 && r.reason.contains("host-7"), "{r:?}");
    // It decays: an hour later half, a day later nothing.
    let half = det.risk(d, t + HOUR).score;
    assert!(
        half < r.score && half > r.score / 3,
        "{half} vs {}",
        r.score
    );
    assert_eq!(det.risk(d, t + DAY_MS).score, 0);
}

#[test]
fn expected_teaches_and_drops_the_risk_malicious_keeps_it() {
    let mut det = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    let d = DeviceId(1);
    let mut t = warm(&mut det, d, &[rec(Role::Initiator, 2, 443, 1_000_000, 1)]);
    let big = [rec(Role::Initiator, 2, 443, 80_000_000, 1)];
    let a = det.handle_window(d, t, t + 60_000, &big, &name, t).unwrap();
    assert_eq!(a.kinds, vec![Kind::Volume]);
    assert!(det.risk(d, t).score > 40);
    let acked = det.acknowledge(a.id, Label::Expected).unwrap();
    assert_eq!(acked.label, Some(Label::Expected));
    assert_eq!(det.risk(d, t).score, 0);
    assert!(matches!(
        det.acknowledge(a.id, Label::Malicious),
        Err(AckError::AlreadyLabelled { .. })
    ));
    assert!(matches!(
        det.acknowledge(999, Label::Expected),
        Err(AckError::Unknown(999))
    ));
    // Learned: the same volume at this hour is no longer an anomaly.
    t += 60_000;
    assert!(det
        .handle_window(d, t, t + 60_000, &big, &name, t)
        .is_none());
    // A new destination acknowledged as malicious keeps its risk a day later.
    t += 60_000;
    let scan: Vec<FlowRecord> = (1..6).map(|p| rec(Role::Initiator, 9, p, 60, 1)).collect();
    let m = det
        .handle_window(d, t, t + 60_000, &scan, &name, t)
        .unwrap();
    assert!(m.over_threshold);
    det.acknowledge(m.id, Label::Malicious).unwrap();
    assert!(det.risk(d, t + DAY_MS).score > 40);
    let l = det.labels();
    assert_eq!(
        (l.raised, l.expected, l.malicious, l.malicious_enforced),
        (2, 1, 1, 1)
    );
    assert_eq!(l.precision(), Some(0.5));
    assert_eq!(l.recall(), Some(1.0));
}

#[test]
fn memory_per_device_is_bounded_under_a_hundred_thousand_destinations() {
    let mut det = detector();
    let d = DeviceId(1);
    let mut t = MONDAY;
    let mut at_10k = 0;
    for i in 0..100_000u64 {
        let r = FlowRecord {
            peer: None,
            peer_addr: IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            ..rec(Role::Initiator, 0, (i % 60_000) as u16 + 1, 100, 1)
        };
        det.handle_window(d, t, t + 1_000, &[r], &name, t);
        t += 1_000;
        if i == 10_000 {
            at_10k = det.accounted_bytes(d);
        }
    }
    let bytes = det.accounted_bytes(d);
    println!("detector memory for one device after 100 000 distinct destinations: {bytes} bytes (after 10 000: {at_10k})");
    // At most max_destinations entries plus the fixed statistics and capped anomalies.
    assert!(bytes <= 256 * 1024, "{bytes}");
    assert!(bytes <= at_10k + 64 * 1024, "{bytes} vs {at_10k}");
    assert!(det.anomalies(Some(d), 0).len() <= det.config().max_anomalies);
}

#[test]
fn reports_from_another_device_never_raise_a_devices_risk() {
    let mut det = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    let (victim, liar) = (DeviceId(1), DeviceId(2));
    warm(&mut det, liar, &[rec(Role::Responder, 1, 443, 10_000, 1)]);
    let mut t = warm(&mut det, victim, &[rec(Role::Initiator, 3, 443, 10_000, 1)]);
    // The liar claims the victim opened hundreds of flows to it with huge volumes, and that it
    // itself saw the victim everywhere: responder records naming the victim, and initiator
    // records naming the victim as the peer.
    for i in 0..20u16 {
        let mut lies: Vec<FlowRecord> = (0..200)
            .map(|p| FlowRecord {
                bytes_in: 1_000_000_000,
                ..rec(Role::Responder, 1, i * 200 + p, 0, 50)
            })
            .collect();
        lies.push(rec(Role::Initiator, 1, 22, 1, 1));
        det.handle_window(liar, t, t + 60_000, &lies, &name, t);
        t += 60_000;
    }
    assert_eq!(det.risk(victim, t).score, 0);
    assert!(det.anomalies(Some(victim), 0).is_empty());
    // Whatever the liar reported counts only against itself.
    assert!(det
        .anomalies(Some(liar), 0)
        .iter()
        .all(|a| a.device == liar));
}

#[test]
fn a_restart_keeps_what_was_learned() {
    let mut det = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    let d = DeviceId(1);
    let t = warm(&mut det, d, &[rec(Role::Initiator, 2, 443, 1_000_000, 1)]);
    let snap = det.snapshot(d).unwrap();
    let mut again = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    again.restore(d, &snap).unwrap();
    // Known destination, usual volume: nothing; a new one: an anomaly, no new learning period.
    assert!(again
        .handle_window(
            d,
            t,
            t + 60_000,
            &[rec(Role::Initiator, 2, 443, 1_000_000, 1)],
            &name,
            t
        )
        .is_none());
    assert!(again
        .handle_window(
            d,
            t,
            t + 60_000,
            &[rec(Role::Initiator, 5, 22, 1_000, 1)],
            &name,
            t
        )
        .is_some());
    assert!(again.restore(d, "{\"not\": 1}").is_err());
    assert!(again.restore(d, "garbage").is_err());
}

/// Members 1–4 of `group:eng` (and 5, `tag:other`, alone in its group), each sending about
/// 1 MB a minute to host 100 for a day of minute windows on a fake clock, all learning.
fn group_world() -> (Detector, i64) {
    let mut det = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    det.set_threshold(THRESHOLD);
    for d in 1..=4u64 {
        det.set_groups(DeviceId(d), vec!["group:eng".into(), "tag:laptop".into()]);
    }
    det.set_groups(DeviceId(5), vec!["tag:other".into()]);
    let mut t = MONDAY;
    let mut rng = Rng(7);
    while t < MONDAY + DAY_MS {
        for d in 1..=5u64 {
            let bytes = rng.between(800_000, 1_200_000);
            let r = rec(Role::Initiator, 100, 443, bytes, rng.between(1, 3));
            det.handle_window(DeviceId(d), t, t + 60_000, &[r], &name, t);
        }
        t += 60_000;
    }
    (det, t)
}

#[test]
fn a_new_device_is_judged_against_its_trusted_group_while_it_learns() {
    let (mut det, t) = group_world();
    let g = det.group("group:eng").unwrap();
    assert_eq!(g.members.len(), 4);
    assert!(
        (g.bytes_out.mean - 1_000_000.0).abs() < 100_000.0,
        "{:?}",
        g.bytes_out
    );
    // Device 6 joins eng today: its own baseline is learning, its group is not.
    let new = DeviceId(6);
    det.set_groups(new, vec!["group:eng".into()]);
    let normal = rec(Role::Initiator, 100, 443, 1_100_000, 2);
    assert!(det
        .handle_window(new, t, t + 60_000, std::slice::from_ref(&normal), &name, t)
        .is_none());
    // Then it sends 200 MB in a minute: 200× what a member of eng sends.
    let a = det
        .handle_window(
            new,
            t + 60_000,
            t + 120_000,
            &[rec(Role::Initiator, 100, 443, 200_000_000, 2)],
            &name,
            t + 60_000,
        )
        .expect("a group anomaly during the device's own learning period");
    assert_eq!(a.kinds, vec![Kind::GroupVolume]);
    assert!(
        a.reason.contains("of a member of group:eng"),
        "{}",
        a.reason
    );
    assert!(det.risk(new, t + 60_000).score > THRESHOLD, "{a:?}");
    // The spike did not feed the group.
    let after = det.group("group:eng").unwrap();
    assert!(after.bytes_out.mean < 1_200_000.0, "{:?}", after.bytes_out);
    // Device 5 is alone in tag:other: one member judges nobody.
    let lone = det.handle_window(
        DeviceId(5),
        t,
        t + 60_000,
        &[rec(Role::Initiator, 100, 443, 200_000_000, 2)],
        &name,
        t,
    );
    assert!(
        lone.as_ref()
            .is_none_or(|a| !a.kinds.contains(&Kind::GroupVolume)),
        "{lone:?}"
    );
}

#[test]
fn connection_rate_against_the_group_and_expected_silences_it_for_that_device() {
    let (mut det, t) = group_world();
    let d = DeviceId(7);
    det.set_groups(d, vec!["group:eng".into()]);
    let burst = rec(Role::Initiator, 100, 443, 1_000_000, 600);
    let a = det
        .handle_window(d, t, t + 60_000, std::slice::from_ref(&burst), &name, t)
        .expect("600 connections a minute against a group's 1–3");
    assert_eq!(a.kinds, vec![Kind::GroupConnectionRate]);
    assert!(a.reason.contains("rate of new connections"), "{}", a.reason);
    // An admin says it is expected: its risk goes, and its own baseline now covers the rate,
    // at that hour of the week, so the same rate then is flagged neither against the group
    // nor against its own baseline once the device is past its learning period.
    det.acknowledge(a.id, Label::Expected).unwrap();
    assert_eq!(det.risk(d, t + 60_000).score, 0);
    let later = t + WEEK_MS;
    det.set_learning_ms(0);
    let again = det.handle_window(d, later, later + 60_000, &[burst], &name, later);
    assert!(
        again.as_ref().is_none_or(|a| !a
            .kinds
            .iter()
            .any(|k| matches!(k, Kind::GroupConnectionRate | Kind::ConnectionRate))),
        "{again:?}"
    );
}

#[test]
fn one_member_cannot_teach_its_group_by_repeating_a_spike() {
    let (mut det, mut t) = group_world();
    let d = DeviceId(8);
    det.set_groups(d, vec!["group:eng".into()]);
    let before = det.group("group:eng").unwrap().bytes_out.mean;
    let mut flagged = 0;
    for _ in 0..200 {
        let big = rec(Role::Initiator, 100, 443, 100_000_000, 1);
        if det
            .handle_window(d, t, t + 60_000, &[big], &name, t)
            .is_some()
        {
            flagged += 1;
        }
        t += 60_000;
    }
    assert_eq!(flagged, 200, "every window is flagged, none is learned");
    let after = det.group("group:eng").unwrap().bytes_out.mean;
    assert!((after - before).abs() < 1.0, "{before} -> {after}");
}

#[test]
fn group_baselines_are_bounded_and_survive_a_restart() {
    let (mut det, t) = group_world();
    let snaps = det.group_snapshots();
    assert_eq!(
        snaps.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        vec!["group:eng", "tag:laptop", "tag:other"]
    );
    let mut again = Detector::new(Config {
        learning_ms: DAY_MS,
        ..Config::default()
    });
    for (n, s) in &snaps {
        again.restore_group(n, s).unwrap();
    }
    assert_eq!(again.group("group:eng"), det.group("group:eng"));
    // A restored group judges at once (a new device right after the restart).
    again.set_groups(DeviceId(9), vec!["group:eng".into()]);
    let a = again.handle_window(
        DeviceId(9),
        t,
        t + 60_000,
        &[rec(Role::Initiator, 100, 443, 200_000_000, 1)],
        &name,
        t,
    );
    assert!(a.is_some_and(|a| a.kinds == vec![Kind::GroupVolume]));
    assert!(again.restore_group("group:x", "garbage").is_err());
    assert!(again
        .restore_group(
            "group:x",
            r#"{"since_ms":0,"last_ms":0,"bytes_out":{"mean":-1.0,"var":0.0,"n":1},"connections":{"mean":0.0,"var":0.0,"n":1},"members":[]}"#
        )
        .is_err());
    // Bounded: 10 000 groups fed by one device keep at most max_groups, and each device is
    // judged against at most max_groups_per_device.
    let d = DeviceId(10);
    let mut t2 = t;
    for i in 0..10_000u32 {
        det.set_groups(d, vec![format!("tag:t{i}")]);
        det.handle_window(
            d,
            t2,
            t2 + 1_000,
            &[rec(Role::Initiator, 100, 443, 1_000, 1)],
            &name,
            t2,
        );
        t2 += 1_000;
    }
    assert_eq!(det.groups.len(), det.config().max_groups);
    let bytes = det.accounted_group_bytes();
    println!(
        "group baselines: {} groups, {bytes} bytes",
        det.groups.len()
    );
    assert!(bytes <= 512 * 1024, "{bytes}");
    det.set_groups(d, (0..50).map(|i| format!("tag:many{i:02}")).collect());
    assert_eq!(
        det.devices[&d].groups.len(),
        det.config().max_groups_per_device
    );
    // The oldest groups went first: eng, fed long before, is gone; the newest stays.
    assert!(det.group("tag:t9999").is_some());
}
