use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowVerdict};
use ward_shared::policy::{self, DirDevice, DirUser, Directory, Grant, Policy, Selector};
use ward_shared::wire::DeviceId;

use super::write::{candidate, Mode};
use super::*;
use crate::flows::{Counts, Pair, PairStatus};

const NOW: i64 = 20 * DAY_MS;

fn dev(id: u64, host: &str, user: Option<&str>, tags: &[&str]) -> DirDevice {
    DirDevice {
        id: DeviceId(id),
        hostname: host.into(),
        user: user.map(Into::into),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: Ipv6Addr::new(0xfd7a, 0, 0, 0, 0, 0, 0, id as u16),
        live: true,
        posture_passed: BTreeSet::new(),
        posture_failures: BTreeMap::new(),
        quarantined: false,
        name_bound: true,
    }
}

fn user(name: &str, groups: &[&str]) -> DirUser {
    DirUser {
        name: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        disabled: false,
        suspended: None,
    }
}

/// alice (laptop a1, d1), bob (b1, d2), carol (c1, d5); servers web1 (d3) and web2 (d4)
/// tagged `web`, db1 (d6) tagged `db`.
fn directory() -> Directory {
    Directory {
        users: vec![user("alice", &[]), user("bob", &[]), user("carol", &[])],
        devices: vec![
            dev(1, "a1", Some("alice"), &[]),
            dev(2, "b1", Some("bob"), &[]),
            dev(3, "web1", None, &["web"]),
            dev(4, "web2", None, &["web"]),
            dev(5, "c1", Some("carol"), &[]),
            dev(6, "db1", None, &["db"]),
        ],
        grants: vec![],
    }
}

const POLICY: &str = r#"# The lab's policy.
[groups]
eng = ["alice", "bob"]

[services.app]   # a port range
devices = ["tag:web"]
ports = ["tcp/8000-8100"]

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[services.ssh]
devices = ["tag:web"]
ports = ["tcp/22"]

[[rules]]
name = "eng-app"
from = ["group:eng"]
to = ["app"]

[[rules]]
name = "carol-ssh"   # never used
from = ["carol"]
to = ["ssh"]
"#;

fn policy() -> Policy {
    policy::parse(POLICY.as_bytes(), "policy.toml").unwrap()
}

struct P {
    i: u64,
    r: u64,
    proto: Proto,
    port: u16,
    day: i64,
    allowed: Option<&'static str>,
    status: PairStatus,
    conns: u64,
}

fn flow(i: u64, r: u64, port: u16, day: i64, allowed: Option<&'static str>) -> P {
    P {
        i,
        r,
        proto: Proto::Tcp,
        port,
        day,
        allowed,
        status: if allowed.is_some() {
            PairStatus::Paired
        } else {
            PairStatus::Denied
        },
        conns: 2,
    }
}

fn pair(p: P) -> Pair {
    let c = Counts {
        packets_out: 10,
        bytes_out: 1000,
        packets_in: 10,
        bytes_in: 1000,
        connections: p.conns,
    };
    let start = NOW - p.day * DAY_MS;
    Pair {
        initiator: Some(DeviceId(p.i)),
        responder: Some(DeviceId(p.r)),
        unknown_addr: None,
        proto: p.proto,
        port: p.port,
        start_ms: start,
        end_ms: start + 60_000,
        verdict: if p.allowed.is_some() {
            FlowVerdict::Allowed
        } else {
            FlowVerdict::Denied
        },
        rule: p.allowed.map(Into::into),
        reason: p.allowed.is_none().then_some(DenyCause::NoRule),
        policy_version: Some(1),
        shadow: None,
        status: p.status,
        initiator_user: None,
        initiator_tags: vec![],
        responder_user: None,
        responder_tags: vec![],
        initiator_counts: (p.status != PairStatus::OneSided || p.allowed.is_none()).then_some(c),
        responder_counts: Some(c),
        disagree: vec![],
    }
}

fn run(p: &Policy, dir: &Directory, pairs: &[Pair], min_days: u32) -> Vec<Suggestion> {
    suggest(&Input {
        policy: p,
        dir,
        pairs,
        now_ms: NOW,
        since_ms: NOW - 14 * DAY_MS,
        min_days,
    })
}

fn find<'a>(s: &'a [Suggestion], kind: Kind, subject: &str) -> Option<&'a Suggestion> {
    s.iter().find(|x| x.kind == kind && x.subject == subject)
}

/// alice uses app on web1 tcp/8080 on three days; bob is denied on db1 tcp/5432 on two days.
fn workload() -> Vec<Pair> {
    let mut v = vec![];
    for day in 1..=3 {
        v.push(pair(flow(1, 3, 8080, day, Some("eng-app"))));
    }
    for day in 1..=2 {
        v.push(pair(flow(2, 6, 5432, day, None)));
    }
    v
}

#[test]
fn repeated_denials_suggest_an_identity_rule_to_the_exact_port() {
    let s = run(&policy(), &directory(), &workload(), 2);
    let a = find(&s, Kind::Add, "b1 -> db1 tcp/5432").expect("add suggested");
    assert_eq!(a.confidence, Confidence::Medium, "{a:?}");
    let Change::AddRule {
        from,
        devices,
        ports,
        ..
    } = &a.change
    else {
        panic!("{a:?}")
    };
    assert_eq!(from, &vec!["user:bob".to_string()]);
    assert_eq!(devices, &vec!["device:db1".to_string()]);
    assert_eq!(
        ports,
        &vec![PortUse {
            proto: Proto::Tcp,
            port: 5432
        }]
    );
    assert_eq!(a.evidence.days_seen, 2);
    assert_eq!(a.evidence.flows, 4);
    assert_eq!(a.evidence.sources, 1);
    // Fewer days than required: listed, but low and not written.
    let s = run(&policy(), &directory(), &workload(), 3);
    let a = find(&s, Kind::Add, "b1 -> db1 tcp/5432").unwrap();
    assert_eq!(a.confidence, Confidence::Low);
    assert!(!a.writable());
}

#[test]
fn denials_only_one_end_reported_never_become_rules() {
    let mut v = vec![];
    for day in 1..=3 {
        let mut p = pair(flow(2, 6, 5432, day, None));
        p.initiator_counts = None;
        v.push(p);
    }
    let s = run(&policy(), &directory(), &v, 1);
    assert!(s.iter().all(|x| x.kind != Kind::Add), "{s:#?}");
}

#[test]
fn a_source_denied_on_many_targets_is_investigated_not_allowed() {
    let mut v = vec![];
    for port in 1..=SCAN_DISTINCT_TARGETS as u16 {
        for day in 1..=3 {
            v.push(pair(flow(5, 6, port, day, None)));
        }
    }
    let s = run(&policy(), &directory(), &v, 1);
    let f = find(&s, Kind::Investigate, "device c1 denied on many targets").expect("finding");
    assert!(!f.writable());
    assert!(s.iter().all(|x| x.kind != Kind::Add), "{s:#?}");
    // One fewer target: no finding, and the denials are ordinary add candidates.
    v.retain(|p| p.port != 1);
    let s = run(&policy(), &directory(), &v, 1);
    assert!(s.iter().all(|x| x.kind != Kind::Investigate));
    assert!(s.iter().any(|x| x.kind == Kind::Add));
}

#[test]
fn a_port_range_narrows_to_the_used_ports() {
    let s = run(&policy(), &directory(), &workload(), 2);
    let n = find(&s, Kind::Narrow, "service app ports").expect("narrow ports");
    assert_eq!(n.confidence, Confidence::High);
    assert_eq!(
        n.change,
        Change::NarrowPorts {
            service: "app".into(),
            ports: vec![PortUse {
                proto: Proto::Tcp,
                port: 8080
            }]
        }
    );
    assert_eq!(n.evidence.days_seen, 3);
}

#[test]
fn one_sided_flows_are_shown_not_used() {
    let mut v = workload();
    let mut p = pair(flow(1, 3, 8090, 1, Some("eng-app")));
    p.status = PairStatus::OneSided;
    p.initiator_counts = None;
    v.push(p);
    let s = run(&policy(), &directory(), &v, 2);
    let n = find(&s, Kind::Narrow, "service app ports").unwrap();
    // 8090 was seen by one end only: not kept open.
    assert_eq!(
        n.change,
        Change::NarrowPorts {
            service: "app".into(),
            ports: vec![PortUse {
                proto: Proto::Tcp,
                port: 8080
            }]
        }
    );
    assert_eq!(n.evidence.one_sided, 1);
}

#[test]
fn a_group_narrows_to_the_members_seen_and_says_what_it_still_admits() {
    let mut dir = directory();
    // alice has a second device that never used the rule.
    dir.devices.push(dev(7, "a2", Some("alice"), &[]));
    let s = run(&policy(), &dir, &workload(), 2);
    let n = find(&s, Kind::Narrow, "rule \"eng-app\" sources").expect("narrow from");
    let Change::NarrowFrom {
        from, rule_index, ..
    } = &n.change
    else {
        panic!()
    };
    assert_eq!(*rule_index, 0);
    // user:alice admits a2 (never seen); device:a1 admits nothing unobserved.
    assert_eq!(from, &vec!["device:a1".to_string()]);
    assert!(
        n.notes[0].contains("2 device(s) never seen"),
        "{:?}",
        n.notes
    );
}

#[test]
fn a_service_on_several_devices_narrows_to_those_reached() {
    let s = run(&policy(), &directory(), &workload(), 2);
    let n = find(&s, Kind::Narrow, "service app devices").expect("narrow devices");
    assert_eq!(
        n.change,
        Change::NarrowDevices {
            service: "app".into(),
            devices: vec!["device:web1".into()]
        }
    );
    // An unbound name cannot be scoped to: listed low.
    let mut dir = directory();
    dir.devices[2].name_bound = false;
    let s = run(&policy(), &dir, &workload(), 2);
    let n = find(&s, Kind::Narrow, "service app devices").unwrap();
    assert_eq!(n.confidence, Confidence::Low);
}

#[test]
fn unused_rules_and_grants_expire() {
    let mut dir = directory();
    dir.grants.push(Grant {
        id: "g1".into(),
        from: "carol".into(),
        to: "db".into(),
        not_after_ms: NOW + DAY_MS,
        reason: None,
    });
    let s = run(&policy(), &dir, &workload(), 2);
    let r = find(&s, Kind::Expire, "rule \"carol-ssh\"").expect("expire rule");
    assert_eq!(r.confidence, Confidence::High);
    assert_eq!(
        r.change,
        Change::ExpireRule {
            rule_index: 1,
            rule: "carol-ssh".into()
        }
    );
    let g = find(&s, Kind::Expire, "grant g1").expect("expire grant");
    assert_eq!(g.change, Change::ExpireGrant { grant: "g1".into() });
    assert!(find(&s, Kind::Expire, "rule \"eng-app\"").is_none());
    // One day of flow records is not enough to call a rule unused at --min-days 2.
    let one_day: Vec<Pair> = workload()
        .into_iter()
        .filter(|p| p.start_ms == NOW - DAY_MS)
        .collect();
    let s = run(&policy(), &dir, &one_day, 2);
    assert_eq!(
        find(&s, Kind::Expire, "rule \"carol-ssh\"")
            .unwrap()
            .confidence,
        Confidence::Low
    );
}

#[test]
fn traffic_only_a_grant_allowed_suggests_a_rule() {
    let mut dir = directory();
    dir.grants.push(Grant {
        id: "g2".into(),
        from: "carol".into(),
        to: "db".into(),
        not_after_ms: NOW + DAY_MS,
        reason: None,
    });
    let v: Vec<Pair> = (1..=2)
        .map(|d| pair(flow(5, 6, 5432, d, Some("grant:g2"))))
        .collect();
    let s = run(&policy(), &dir, &v, 2);
    let a = find(&s, Kind::Add, "grant g2 used as standing access").expect("add");
    let Change::AddRule { from, ports, .. } = &a.change else {
        panic!()
    };
    assert_eq!(from, &vec!["user:carol".to_string()]);
    assert_eq!(ports.len(), 1);
    assert!(find(&s, Kind::Expire, "grant g2").is_none());
}

#[test]
fn ids_are_stable_and_distinct() {
    let a = run(&policy(), &directory(), &workload(), 2);
    let b = run(&policy(), &directory(), &workload(), 2);
    assert_eq!(
        a.iter().map(|s| &s.id).collect::<Vec<_>>(),
        b.iter().map(|s| &s.id).collect::<Vec<_>>()
    );
    let ids: BTreeSet<&String> = a.iter().map(|s| &s.id).collect();
    assert_eq!(ids.len(), a.len());
    assert_eq!(suggestion_id(Kind::Add, "x"), suggestion_id(Kind::Add, "x"));
    assert_ne!(
        suggestion_id(Kind::Add, "x"),
        suggestion_id(Kind::Expire, "x")
    );
}

#[test]
fn the_candidate_applies_writable_changes_and_its_tests_pass() {
    let p = policy();
    let dir = directory();
    let pairs = workload();
    let s = run(&p, &dir, &pairs, 2);
    let w = candidate(POLICY, &p, &dir, &pairs, &s, Mode::Enforce, NOW).unwrap();
    let c = policy::parse(w.text.as_bytes(), "candidate.toml")
        .unwrap_or_else(|e| panic!("{e}\n{}", w.text));
    // Unchanged blocks are kept byte for byte, comments included.
    assert!(w
        .text
        .starts_with("# The lab's policy.\n[groups]\neng = [\"alice\", \"bob\"]\n"));
    assert!(w
        .text
        .contains("[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n"));
    // Narrowed: app opens tcp/8080 on web1 only; eng-app from a1... alice only.
    let app = &c.services["app"];
    assert_eq!(app.ports.tcp.len(), 1);
    assert!(app.ports.allows(Proto::Tcp, 8080) && !app.ports.allows(Proto::Tcp, 8081));
    assert_eq!(app.devices[0].value, Selector::Device("web1".into()));
    // carol-ssh removed, bob's denied db access added as a rule.
    assert!(c.rules.iter().all(|r| r.name != "carol-ssh"));
    assert!(w.text.contains("rule \"carol-ssh\" removed"));
    assert!(c
        .rules
        .iter()
        .any(|r| r.name.starts_with("suggested-b1-db1")));
    // Generated tests: alice's used flow is pinned as allow; all tests pass.
    // bob's denials are allowed by the new rule: pinned as allowed through its service.
    assert_eq!((w.allow_tests, w.deny_tests), (2, 0), "{}", w.text);
    assert!(
        w.text
            .contains("from = \"bob\"\nallow = [\"suggested-b1-db1-tcp-5432:5432/tcp\"]"),
        "{}",
        w.text
    );
    assert!(w.text.contains("allow = [\"app:8080/tcp\"]"), "{}", w.text);
    let outcomes = policy::run_tests(&c, &dir, NOW);
    assert!(!outcomes.is_empty());
    assert!(outcomes.iter().all(|t| t.pass), "{outcomes:?}");
    // Replaying the candidate denies nothing that was used.
    let r = replay::replay(&c, &dir, &pairs, NOW);
    assert!(r.newly_denied.is_empty(), "{r:?}");
    assert_eq!(r.newly_allowed.len(), 1, "{r:?}");
}

#[test]
fn low_confidence_items_are_not_written_and_denials_are_pinned() {
    let p = policy();
    let dir = directory();
    let pairs = workload();
    // --min-days 5: nothing is confident enough to write.
    let s = run(&p, &dir, &pairs, 5);
    assert!(s.iter().all(|x| !x.writable()));
    let w = candidate(POLICY, &p, &dir, &pairs, &s, Mode::Enforce, NOW).unwrap();
    assert!(w.applied.is_empty());
    assert!(w.text.starts_with(POLICY));
    // bob's denial on db is pinned as a deny test; alice's use as an allow test.
    assert!(
        w.text.contains("from = \"bob\"\ndeny = [\"db:5432/tcp\"]"),
        "{}",
        w.text
    );
    assert_eq!((w.allow_tests, w.deny_tests), (1, 1));
    let c = policy::parse(w.text.as_bytes(), "c").unwrap();
    assert!(policy::run_tests(&c, &dir, NOW).iter().all(|t| t.pass));
}

#[test]
fn shadow_mode_writes_shadow_rules_and_keeps_enforcement() {
    let p = policy();
    let dir = directory();
    let pairs = workload();
    let s = run(&p, &dir, &pairs, 2);
    let w = candidate(POLICY, &p, &dir, &pairs, &s, Mode::Shadow, NOW).unwrap();
    // The original service stays; the narrowed one is a new service used by a shadow copy.
    assert!(
        w.text
            .contains("[services.app]\ndevices = [\"tag:web\"]\nports = [\"tcp/8000-8100\"]\n"),
        "{}",
        w.text
    );
    assert!(
        w.text.contains(
            "[services.app-suggested]\ndevices = [\"device:web1\"]\nports = [\"tcp/8080\"]\n"
        ),
        "{}",
        w.text
    );
    assert!(w.text.contains(
        "[[rules]]\nname = \"eng-app\"\nfrom = [\"group:eng\"]\nto = [\"app\"]\nshadow_remove = true\n"
    ), "{}", w.text);
    assert!(w.text.contains(
        "[[rules]]\nname = \"eng-app (suggested)\"\nfrom = [\"user:alice\"]\nto = [\"app-suggested\"]\nshadow = true\n"
    ), "{}", w.text);
    assert!(w.text.contains(
        "[[rules]]\nname = \"carol-ssh\"\nfrom = [\"user:carol\"]\nto = [\"ssh\"]\nshadow_remove = true\n"
    ), "{}", w.text);
    assert!(w.text.contains("shadow = true\n\n"));
    // Stripped of the shadow keys' effects (what this build parses): shadow copies removed
    // and flags dropped, the text is the enforced policy plus new services.
    let enforced: String = w
        .text
        .replace("shadow_remove = true\n", "")
        .split("[[rules]]")
        .filter(|b| !b.contains("shadow = true"))
        .collect::<Vec<_>>()
        .join("[[rules]]");
    policy::parse(enforced.as_bytes(), "enforced").unwrap_or_else(|e| panic!("{e}\n{enforced}"));
}

#[test]
fn replay_lists_used_flows_a_candidate_would_deny() {
    let p = policy();
    let dir = directory();
    let pairs = workload();
    let tighter =
        policy::parse(POLICY.replace("tcp/8000-8100", "tcp/9000").as_bytes(), "c").unwrap();
    let r = replay::replay(&tighter, &dir, &pairs, NOW);
    assert_eq!(r.newly_denied.len(), 1);
    let d = &r.newly_denied[0];
    assert_eq!((d.initiator.as_str(), d.responder.as_str()), ("a1", "web1"));
    assert_eq!(d.flows, 6);
    assert!(d.confirmed);
    assert_eq!(d.rule.as_deref(), Some("eng-app"));
    let same = replay::replay(&p, &dir, &pairs, NOW);
    assert!(same.newly_denied.is_empty() && same.newly_allowed.is_empty());
    assert_eq!(same.unchanged, 5);
}

/// A small deterministic generator (no OS randomness in tests that must replay).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Whatever the flows, a writable suggestion never allows more than was observed: every new or
/// narrowed allow names only concrete ports that confirmed flows used, its sources admit no
/// device that was not seen unless a note says how many, and nothing comes from one-sided or
/// unknown-end flows.
#[test]
fn suggestions_never_allow_more_than_the_evidence() {
    for seed in 0..300u64 {
        let mut g = Lcg(seed);
        let mut dir = directory();
        dir.devices.push(dev(7, "a2", Some("alice"), &[]));
        dir.devices.push(dev(8, "ci1", None, &["ci"]));
        dir.devices.push(dev(9, "ci2", None, &["ci"]));
        for d in dir.devices.iter_mut() {
            d.name_bound = g.next(2) == 0;
        }
        let ids = [1u64, 2, 3, 4, 5, 6, 7, 8, 9];
        let rules = [Some("eng-app"), Some("carol-ssh"), None, None];
        let mut pairs = vec![];
        for _ in 0..g.next(40) {
            let i = ids[g.next(9) as usize];
            let r = ids[g.next(9) as usize];
            let port = [22u16, 5432, 8000, 8080, 8100, 9000][g.next(6) as usize];
            let allowed = rules[g.next(4) as usize];
            let mut p = flow(i, r, port, 1 + g.next(4) as i64, allowed);
            p.status = match g.next(5) {
                0 => PairStatus::OneSided,
                1 => PairStatus::Pending,
                _ => p.status,
            };
            p.proto = if g.next(6) == 0 {
                Proto::Udp
            } else {
                Proto::Tcp
            };
            let mut pr = pair(p);
            if g.next(8) == 0 {
                pr.initiator_counts = None;
            }
            pairs.push(pr);
        }
        let p = policy();
        let s = run(&p, &dir, &pairs, 1);
        let ix = Index::new(&p, &dir);
        let confirmed_flows: Vec<&Pair> = pairs.iter().filter(|p| confirmed(p)).collect();
        for x in s.iter().filter(|x| x.writable()) {
            match &x.change {
                Change::AddRule {
                    from,
                    devices,
                    ports,
                    ..
                } => {
                    let sels: Vec<Selector> = from.iter().map(|f| sel(f)).collect();
                    let dsts: Vec<Selector> = devices.iter().map(|f| sel(f)).collect();
                    let admitted = ix.admitted(&sels);
                    let dst_admitted = ix.admitted(&dsts);
                    let seen: BTreeSet<DeviceId> = confirmed_flows
                        .iter()
                        .filter(|p| {
                            p.responder.is_some_and(|r| dst_admitted.contains(&r))
                                && ports.contains(&port_of(p))
                        })
                        .filter_map(|p| p.initiator)
                        .collect();
                    let unseen = admitted.difference(&seen).count();
                    assert!(
                        unseen == 0
                            || x.notes
                                .iter()
                                .any(|n| n.contains(&format!("{unseen} device(s)"))),
                        "seed {seed}: {x:#?} admits {unseen} unseen"
                    );
                    assert!(!ports.is_empty());
                    for u in ports {
                        assert!(
                            confirmed_flows.iter().any(|p| port_of(p) == *u
                                && p.initiator.is_some_and(|i| admitted.contains(&i))),
                            "seed {seed}: port {u} not observed: {x:#?}"
                        );
                    }
                    assert!(devices.iter().all(|d| d.starts_with("device:")));
                }
                Change::NarrowPorts { service, ports } => {
                    let svc = &p.services[service];
                    for u in ports {
                        assert!(
                            svc.ports.allows(u.proto, u.port),
                            "seed {seed}: widened {x:#?}"
                        );
                        assert!(confirmed_flows.iter().any(|p| port_of(p) == *u));
                    }
                }
                Change::NarrowFrom {
                    rule_index, from, ..
                } => {
                    let before: Vec<Selector> = p.rules[*rule_index]
                        .from
                        .iter()
                        .map(|s| s.value.clone())
                        .collect();
                    let after: Vec<Selector> = from.iter().map(|f| sel(f)).collect();
                    assert!(
                        ix.admitted(&after).is_subset(&ix.admitted(&before)),
                        "seed {seed}: narrowing widened {x:#?}"
                    );
                }
                Change::NarrowDevices { service, devices } => {
                    let svc = &p.services[service];
                    let before: Vec<Selector> =
                        svc.devices.iter().map(|s| s.value.clone()).collect();
                    let after: Vec<Selector> = devices.iter().map(|f| sel(f)).collect();
                    assert!(ix.admitted(&after).is_subset(&ix.admitted(&before)));
                }
                Change::ExpireRule { .. } | Change::ExpireGrant { .. } => {}
                Change::Investigate { .. } => panic!("findings are never writable"),
            }
        }
        // The candidate always parses and its generated tests always hold.
        let w = candidate(POLICY, &p, &dir, &pairs, &s, Mode::Enforce, NOW)
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let c = policy::parse(w.text.as_bytes(), "c").unwrap();
        assert!(
            policy::run_tests(&c, &dir, NOW).iter().all(|t| t.pass),
            "seed {seed}: {}",
            w.text
        );
    }
}

fn sel(s: &str) -> Selector {
    match s.split_once(':') {
        Some(("user", u)) => Selector::User(u.into()),
        Some(("group", g)) => Selector::Group(g.into()),
        Some(("tag", t)) => Selector::Tag(t.into()),
        Some(("device", d)) => Selector::Device(d.into()),
        _ => Selector::User(s.into()),
    }
}

#[test]
fn rewritten_rules_keep_posture_and_expiry_and_inline_layouts_are_refused() {
    let text = POLICY.replace(
        "to = [\"app\"]\n",
        "to = [\"app\"]\nexpires = \"2031-01-02T03:04:05Z\"\n",
    );
    let p = policy::parse(text.as_bytes(), "policy.toml").unwrap();
    let mut dir = directory();
    dir.devices.push(dev(7, "a2", Some("alice"), &[]));
    let s = run(&p, &dir, &workload(), 2);
    let w = candidate(&text, &p, &dir, &workload(), &s, Mode::Enforce, NOW).unwrap();
    let c = policy::parse(w.text.as_bytes(), "c").unwrap();
    let r = c.rules.iter().find(|r| r.name == "eng-app").unwrap();
    assert_eq!(r.expires_ms, p.rules[0].expires_ms);
    assert_eq!(r.from[0].value, Selector::Device("a1".into()));
    // Quoted service headers are recognised.
    let quoted = text.replace("[services.app]", "[services.\"app\"]");
    let pq = policy::parse(quoted.as_bytes(), "policy.toml").unwrap();
    assert!(candidate(&quoted, &pq, &dir, &workload(), &s, Mode::Enforce, NOW).is_ok());
    // Services or rules written inline cannot be rewritten safely: refused, not half-applied.
    let inline = "services.app = { devices = [\"tag:web\"], ports = [\"tcp/8000-8100\"] }\nrules = [{ name = \"eng-app\", from = [\"alice\"], to = [\"app\"] }]\n";
    let pi = policy::parse(inline.as_bytes(), "policy.toml").unwrap();
    let si = run(&pi, &dir, &workload(), 2);
    assert!(matches!(
        candidate(inline, &pi, &dir, &workload(), &si, Mode::Enforce, NOW),
        Err(super::write::WriteError::Layout(_))
    ));
}
