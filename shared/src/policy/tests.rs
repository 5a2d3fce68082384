//! Policy tests: parsing (with positions), bounds, compilation, tests, explain, diff, and the
//! property that compile + filter agree with explain.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;
use crate::filter::tests::pkt;
use crate::filter::{Filter, Sources, Verdict};
use proptest::prelude::*;
use std::net::IpAddr;
use std::time::Instant;

const NOW: i64 = 1_800_000_000_000; // 2027-01-15T08:00:00Z

pub(crate) const EXAMPLE: &str = r#"# Example policy
[groups]
eng = ["alice"]
ops = ["bob"]

[posture.baseline]
os = ["debian>=12", "macos"]
firewall = true
disk_encryption = true
processes = ["osqueryd"]
files = [{ path = "/etc/ward/marker", sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" }]
min_ward_version = "0.2.0"
max_report_age = "60s"
custom = { edr = { vendor = "crowdstrike", score = 80 } }

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[services.ssh]
devices = ["tag:server", "tag:db"]
ports = ["tcp/22"]

[services.web]
devices = ["device:web1"]
ports = ["tcp/80", "tcp/443", "udp/443", "icmp"]

[services.patch]
devices = ["tag:server"]
ports = ["tcp/8443"]
remediation = true

[[rules]]
name = "eng-to-db"
from = ["group:eng"]
to = ["db"]
posture = ["baseline"]
expires = "2027-01-31T00:00:00Z"

[[rules]]
from = ["group:ops", "tag:ci"]
to = ["ssh", "web"]

[[rules]]
name = "everyone-patches"
from = ["group:eng", "group:ops"]
to = ["patch", "web"]

[[tests]]
from = "alice"
allow = ["db:5432", "web:443", "web"]
deny = ["db:22", "ssh:22"]

[[tests]]
from = "bob"
allow = ["ssh:22", "web:443/udp"]
deny = ["db:5432"]
"#;

fn dev(id: u64, host: &str, user: Option<&str>, tags: &[&str]) -> DirDevice {
    DirDevice {
        id: DeviceId(id),
        hostname: host.into(),
        user: user.map(str::to_string),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
        live: true,
        posture_passed: ["baseline".to_string()].into_iter().collect(),
        posture_failures: Default::default(),
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

fn directory() -> Directory {
    Directory {
        users: vec![
            user("alice", &[]),
            user("bob", &[]),
            user("carol", &["eng"]),
        ],
        devices: vec![
            dev(1, "alice-laptop", Some("alice"), &[]),
            dev(2, "bob-laptop", Some("bob"), &[]),
            dev(3, "db1", None, &["db"]),
            dev(4, "srv1", None, &["server"]),
            dev(5, "web1", None, &[]),
            dev(6, "carol-pc", Some("carol"), &[]),
            dev(7, "alice-phone", Some("alice"), &[]),
        ],
        grants: vec![],
    }
}

fn err(src: &str) -> String {
    parse(src.as_bytes(), "policy.toml")
        .unwrap_err()
        .to_string()
}

#[test]
fn example_parses_with_everything_typed() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    assert_eq!(p.groups["eng"].members[0].value, "alice");
    let b = &p.postures["baseline"];
    assert_eq!(b.os.len(), 2);
    assert_eq!(b.os[0].version, Some((VersionOp::Ge, "12".into())));
    assert_eq!(b.os[1].version, None);
    assert_eq!(b.firewall, Some(true));
    assert_eq!(b.max_report_age_ms, Some(60_000));
    assert_eq!(b.files[0].sha256.unwrap()[0], 0xe3);
    assert_eq!(
        b.custom["edr"],
        serde_json::json!({"vendor": "crowdstrike", "score": 80})
    );
    assert_eq!(p.trust, Trust::default());
    let web = &p.services["web"];
    assert!(web.ports.icmp);
    assert_eq!(
        web.ports.tcp,
        vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }]
    );
    assert!(p.services["patch"].remediation);
    assert_eq!(p.rules.len(), 3);
    assert_eq!(p.rules[0].name, "eng-to-db");
    assert_eq!(p.rules[0].expires_ms, Some(1_801_353_600_000));
    assert_eq!(
        p.rules[1].name,
        format!("rule #2 (line {})", p.rules[1].pos.line)
    );
    assert_eq!(p.rules[1].pos.line, 40, "{:?}", p.rules[1].pos);
    assert_eq!(p.tests.len(), 2);
    assert_eq!(p.tests[0].allow[2].value.proto, Proto::Icmp);
    assert_eq!(p.tests[1].allow[1].value.proto, Proto::Udp);
}

#[test]
fn empty_policy_is_valid_and_allows_nothing() {
    let p = parse(b"", "p.toml").unwrap();
    let c = compile(&p, &directory(), NOW);
    assert_eq!(c.devices.len(), 7);
    assert!(c
        .devices
        .values()
        .all(|a| a.peers.is_empty() && a.inbound.is_empty() && a.reach.is_empty()));
    assert_eq!(c.next_expiry_ms, None);
}

/// Each source, parsed as `file`, fails with an error that starts with its expected text.
fn expect_errors(file: &str, cases: &[(&str, &str)]) {
    for (src, want) in cases {
        let got = parse(src.as_bytes(), file).unwrap_err().to_string();
        assert!(
            got.starts_with(want),
            "for\n{src}\ngot:  {got}\nwant: {want}"
        );
    }
}

#[test]
fn semantic_errors_name_line_and_column() {
    let cases: &[(&str, &str)] = &[
        (
            "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n\n[[rules]]\nfrom = [\"group:eng\"]\nto = [\"db\"]\n",
            "policy.toml:6:9: group \"eng\" is not defined",
        ),
        ("[[rules]]\nfrom = [\"alice\"]\nto = [\"nope\"]\n", "policy.toml:3:7: service \"nope\" is not defined"),
        (
            "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/5432\"]\n[[rules]]\nfrom = [\"alice\"]\nto = [\"db\"]\nposture = [\"x\"]\n",
            "policy.toml:7:12: posture requirement \"x\" is not defined",
        ),
        ("[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/99999\"]\n", "policy.toml:3:10: bad port in \"tcp/99999\": ports are 1 to 65535"),
        ("[services.db]\ndevices = [\"tag:db\"]\nports = [\"sctp/1\"]\n", "policy.toml:3:10: bad port spec"),
        ("[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/10-20\", \"tcp/15\"]\n", "policy.toml:3:23: overlapping port range in service \"db\": tcp/10-20 and tcp/15"),
        ("[services.db]\ndevices = [\"tag:db\"]\nports = [\"udp/53\", \"udp/53\"]\n", "policy.toml:3:20: duplicate port range"),
        ("[services.db]\ndevices = [\"rack:1\"]\nports = [\"tcp/1\"]\n", "policy.toml:2:12: bad selector \"rack:1\""),
        ("[services.db]\ndevices = [\"db\"]\nports = [\"tcp/1\"]\n", "policy.toml:2:12: bad selector \"db\""),
        (
            "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/1\"]\n[[rules]]\nfrom = [\"alice\"]\nto = [\"db\"]\nexpires = \"tomorrow\"\n",
            "policy.toml:7:11: expires \"tomorrow\" is not an RFC 3339 date-time",
        ),
        ("[groups]\neng = [\"alice\"]\ncolour = \"blue\"\n", "policy.toml:3:10: invalid type"),
        ("[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/1\"]\nowner = \"x\"\n", "policy.toml:4:1: unknown field `owner`"),
        ("frobnicate = 1\n", "policy.toml:1:1: unknown field `frobnicate`"),
        ("[groups]\neng = [\"alice\"\n", "policy.toml:2:"),
        ("[groups]\nEng = []\n", "policy.toml:2:1: group \"Eng\" has a character that is not allowed"),
        ("[[tests]]\nfrom = \"group:eng\"\n", "policy.toml:2:8: a test's `from` is a user or device:HOSTNAME"),
        (
            "[services.db]\ndevices = [\"tag:db\"]\nports = [\"tcp/1\"]\n[[tests]]\nfrom = \"alice\"\nallow = [\"db:x\"]\n",
            "policy.toml:6:10: bad port \"x\"",
        ),
    ];
    expect_errors("policy.toml", cases);
}

#[test]
fn bounds_are_checked_before_parsing() {
    let big = vec![b'#'; MAX_POLICY_BYTES + 1];
    assert!(parse(&big, "p.toml")
        .unwrap_err()
        .to_string()
        .contains("too large"));
    let deep = "[".repeat(MAX_POLICY_BYTES / 2);
    let e = err(&format!("x = {deep}"));
    assert!(e.contains("nested deeper than 32 levels"), "{e}");
    let deep_tables = format!("x = {}", "{a = ".repeat(100_000));
    assert!(err(&deep_tables).contains("nested deeper"));
    let dotted = format!("{} = 1", vec!["a"; 1000].join("."));
    assert!(err(&dotted).contains("nested deeper"));
    let header = format!("[{}]", vec!["a"; 1000].join("."));
    assert!(err(&header).contains("nested deeper"));
    // Brackets inside strings and comments do not count.
    let ok = format!(
        "# {}\n[groups]\neng = [\"{}\"] # ]]]\n",
        "[".repeat(100),
        "x"
    );
    assert!(parse(ok.as_bytes(), "p.toml").is_ok());
    let s = format!(
        "[groups]\neng = []\n[[tests]]\nfrom = \"a{}\"\n",
        "[".repeat(40)
    );
    assert!(!err(&s).contains("nested"));
    // Non-UTF-8: line and byte column of the first bad byte.
    let mut bad = b"[groups]\neng = [\"al".to_vec();
    bad.push(0xff);
    bad.extend_from_slice(b"\"]\n");
    let e = parse(&bad, "p.toml").unwrap_err();
    assert_eq!(
        e.pos,
        Some(Pos {
            line: 2,
            column: 11
        })
    );
    assert!(e.to_string().contains("not valid UTF-8"), "{e}");
    // Too many rules.
    let mut many = String::from("[services.s]\ndevices = [\"tag:t\"]\nports = [\"tcp/1\"]\n");
    for _ in 0..10_001 {
        many.push_str("[[rules]]\nfrom=[\"a\"]\nto=[\"s\"]\n");
    }
    let e = err(&many);
    assert!(e.ends_with("too many rules (10001, at most 10000)"), "{e}");
}

#[test]
fn unknown_users_tags_and_devices_are_warnings() {
    let p = parse(
        b"[groups]\neng = [\"alice\", \"zed\"]\n[services.s]\ndevices = [\"tag:nope\", \"device:ghost\"]\nports = [\"tcp/1\"]\n[[rules]]\nfrom = [\"user:yves\", \"group:eng\"]\nto = [\"s\"]\n",
        "p.toml",
    )
    .unwrap();
    let w: Vec<String> = warnings(&p, &directory())
        .iter()
        .map(|w| w.to_string())
        .collect();
    assert_eq!(
        w,
        vec![
            "p.toml:2:17: warning: unknown user \"zed\"",
            "p.toml:4:12: warning: no device carries tag \"nope\"",
            "p.toml:4:24: warning: unknown device \"ghost\"",
            "p.toml:7:9: warning: unknown user \"yves\"",
        ]
    );
}

fn access(c: &Compiled, id: u64) -> &DeviceAccess {
    &c.devices[&DeviceId(id)]
}

#[test]
fn compile_produces_peers_rules_and_reach() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let d = directory();
    let c = compile(&p, &d, NOW);
    // alice's laptop: db (posture met), patch+web.
    let alice = access(&c, 1);
    assert_eq!(alice.peers, [3, 4, 5].map(DeviceId).into_iter().collect());
    assert!(alice
        .reach_flat(DeviceId(1))
        .iter()
        .any(|r| r.service == "db"
            && r.device_id == DeviceId(3)
            && r.not_after_ms == Some(1_801_353_600_000)));
    assert!(alice.inbound.is_empty());
    // db1 accepts 5432 from alice's two devices and carol's (carol is in eng by the directory).
    let db = access(&c, 3);
    let r = db.inbound.iter().find(|r| r.service == "db").unwrap();
    assert_eq!(r.rule, "eng-to-db");
    assert_eq!(r.ports, vec![PortRange { lo: 5432, hi: 5432 }]);
    assert_eq!(r.not_after_ms, Some(1_801_353_600_000));
    let want: Vec<IpAddr> = [1u64, 6, 7]
        .iter()
        .flat_map(|i| {
            let x = &d.devices.iter().find(|x| x.id == DeviceId(*i)).unwrap();
            [IpAddr::V4(x.ipv4), IpAddr::V6(x.ipv6)]
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(*r.sources, want);
    // ssh on db1 from bob only.
    let ssh = db.inbound.iter().find(|r| r.service == "ssh").unwrap();
    assert_eq!(ssh.sources.len(), 2);
    // web1: tcp, udp and icmp rules.
    let web = access(&c, 5);
    let protos: std::collections::BTreeSet<Proto> = web.inbound.iter().map(|r| r.proto).collect();
    assert_eq!(protos.len(), 3);
    assert_eq!(c.next_expiry_ms, Some(1_801_353_600_000));
    // Peers are symmetric.
    for (id, a) in &c.devices {
        for peer in &a.peers.iter().collect::<Vec<_>>() {
            assert!(c.devices[peer].peers.contains(id), "{id} -> {peer}");
        }
    }
}

#[test]
fn expiry_posture_quarantine_and_liveness_narrow_access() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let mut d = directory();
    // After expiry: no db.
    let c = compile(&p, &d, 1_801_353_600_000);
    assert!(!access(&c, 3).inbound.iter().any(|r| r.service == "db"));
    assert_eq!(c.next_expiry_ms, None);
    // Posture failed on the phone: the laptop keeps db, the phone loses it.
    d.devices[6].posture_passed.clear();
    // Quarantined carol-pc: only the remediation service.
    d.devices[5].quarantined = true;
    // bob's laptop not live: gone everywhere.
    d.devices[1].live = false;
    let c = compile(&p, &d, NOW);
    assert!(!c.devices.contains_key(&DeviceId(2)));
    assert!(c.devices.values().all(|a| !a.peers.contains(&DeviceId(2))));
    let db = access(&c, 3);
    let r = db.inbound.iter().find(|r| r.service == "db").unwrap();
    assert_eq!(r.sources.len(), 2, "only alice-laptop: {:?}", r.sources);
    let carol = access(&c, 6);
    assert!(
        carol.reach.iter().all(|r| r.service == "patch"),
        "{:?}",
        carol.reach
    );
    assert!(!carol.reach.is_empty());
}

#[test]
fn devices_never_reach_themselves() {
    let p = parse(
        b"[services.all]\ndevices = [\"tag:x\"]\nports = [\"tcp/*\"]\n[[rules]]\nfrom = [\"tag:x\"]\nto = [\"all\"]\n",
        "p.toml",
    )
    .unwrap();
    let d = Directory {
        devices: vec![dev(1, "a", None, &["x"]), dev(2, "b", None, &["x"])],
        ..Directory::default()
    };
    let c = compile(&p, &d, NOW);
    let a = access(&c, 1);
    assert_eq!(a.peers, [DeviceId(2)].into_iter().collect());
    assert_eq!(a.inbound.len(), 1);
    // The rule's one source list, shared with b's filter, lists a too: a's own addresses
    // never arrive from a peer (the data plane takes an overlay source only from its owner).
    let mut both: Vec<IpAddr> = d.devices[..2]
        .iter()
        .flat_map(|x| [IpAddr::V4(x.ipv4), IpAddr::V6(x.ipv6)])
        .collect();
    both.sort_unstable();
    assert_eq!(*a.inbound[0].sources, both);
    assert!(Sources::ptr_eq(
        &a.inbound[0].sources,
        &access(&c, 2).inbound[0].sources
    ));
    let flat = a.reach_flat(DeviceId(1));
    assert_eq!(flat.len(), 1);
    assert_eq!(flat[0].device_id, DeviceId(2));
    let b = access(&c, 2);
    assert_eq!(b.reach_flat(DeviceId(2)).len(), 1);
    assert_eq!(b.reach_flat(DeviceId(2))[0].device_id, DeviceId(1));
    // By reference: both devices hold the one grant (one destination list naming both), and
    // each leaves itself out when it is expanded.
    assert_eq!(a.reach.len(), 1);
    assert!(Arc::ptr_eq(&a.reach[0], &b.reach[0]));
    assert_eq!(
        a.reach[0]
            .devices
            .iter()
            .map(|x| x.device_id)
            .collect::<Vec<_>>(),
        vec![DeviceId(1), DeviceId(2)]
    );
    // A device alone in its service reaches nothing (no grant that would expand to itself).
    let alone = Directory {
        devices: vec![dev(1, "a", None, &["x"])],
        ..Directory::default()
    };
    let c = compile(&p, &alone, NOW);
    assert!(access(&c, 1).reach.is_empty());
}

#[test]
fn reach_grants_are_shared_by_every_source_and_grow_with_rules_not_pairs() {
    // 40 devices in one group reaching one service on all of them: one grant, one destination
    // list, shared by all 40 sources; expanded, each source reaches the 39 others.
    let p = parse(
        b"[services.all]\ndevices = [\"tag:x\"]\nports = [\"tcp/22\"]\n[[rules]]\nname = \"r\"\nfrom = [\"tag:x\"]\nto = [\"all\"]\n",
        "p.toml",
    )
    .unwrap();
    let d = Directory {
        devices: (1..=40)
            .map(|i| dev(i, &format!("h{i}"), None, &["x"]))
            .collect(),
        ..Directory::default()
    };
    let c = compile(&p, &d, NOW);
    let first = &access(&c, 1).reach[0];
    for (id, a) in &c.devices {
        assert_eq!(a.reach.len(), 1);
        assert!(Arc::ptr_eq(&a.reach[0], first));
        let flat = a.reach_flat(*id);
        assert_eq!(flat.len(), 39);
        assert!(flat.iter().all(|r| r.device_id != *id && r.rule == "r"));
    }
}

#[test]
fn grants_compile_like_expiring_rules() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let mut d = directory();
    d.grants = vec![
        Grant {
            id: "g1".into(),
            from: "bob".into(),
            to: "db".into(),
            not_after_ms: NOW + 3_600_000,
            reason: Some("incident 42".into()),
        },
        Grant {
            id: "old".into(),
            from: "device:carol-pc".into(),
            to: "ssh".into(),
            not_after_ms: NOW - 1,
            reason: None,
        },
        Grant {
            id: "bad".into(),
            from: "bob".into(),
            to: "nosuch".into(),
            not_after_ms: NOW + 1,
            reason: None,
        },
    ];
    let c = compile(&p, &d, NOW);
    let db = access(&c, 3);
    let g = db.inbound.iter().find(|r| r.rule == "grant:g1").unwrap();
    assert_eq!(g.not_after_ms, Some(NOW + 3_600_000));
    assert_eq!(g.sources.len(), 2);
    assert!(!db.inbound.iter().any(|r| r.rule == "grant:old"));
    assert_eq!(c.next_expiry_ms, Some(NOW + 3_600_000));
    let e = explain(&p, &d, "bob-laptop", "db1:5432", NOW).unwrap();
    assert!(e.allowed);
    assert!(e.to_string().contains("\"grant:g1\""), "{e}");
}

#[test]
fn policy_tests_pass_and_fail_with_reasons() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let out = run_tests(&p, &directory(), NOW);
    assert_eq!(out.len(), 8);
    assert!(out.iter().all(|o| o.pass), "{out:#?}");
    assert!(
        out[0].why.contains("allowed by rule \"eng-to-db\""),
        "{}",
        out[0].why
    );
    // After the grant expired, alice's db test fails, saying why.
    let out = run_tests(&p, &directory(), 1_801_353_600_000);
    let o = &out[0];
    assert!(!o.pass);
    assert!(
        o.why
            .contains("no rule allows alice to reach db:5432/tcp (default deny)"),
        "{}",
        o.why
    );
    assert!(
        o.why.contains("expired at 2027-01-31T00:00:00Z"),
        "{}",
        o.why
    );
    assert_eq!(o.pos.line, 51);
}

#[test]
fn explain_says_which_rule_and_why_not() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let mut d = directory();
    d.devices[6].posture_passed.clear();
    // alice has two devices: explained per device.
    let e = explain(&p, &d, "alice", "db:5432", NOW).unwrap();
    assert!(e.allowed);
    assert_eq!(e.devices.len(), 2);
    let s = e.to_string();
    assert!(
        s.contains("alice-laptop → db1: allowed by rule \"eng-to-db\" (line 33)"),
        "{s}"
    );
    assert!(s.contains("alice-phone → db1: denied"), "{s}");
    assert!(
        s.contains("posture \"baseline\" not met by alice-phone"),
        "{s}"
    );
    // No evaluation recorded: the bare fact, no empty parentheses.
    assert!(!s.contains("alice-phone ("), "{s}");
    // Port not in service.
    let e = explain(&p, &d, "alice-laptop", "db:22", NOW).unwrap();
    assert!(!e.allowed);
    let s = e.to_string();
    assert!(
        s.contains("denied: no rule allows alice-laptop to reach db1:22/tcp (default deny)"),
        "{s}"
    );
    assert!(s.contains("22/tcp is not in service db (tcp/5432)"), "{s}");
    // Expired.
    let e = explain(&p, &d, "alice-laptop", "db1:5432", 1_801_353_700_000).unwrap();
    assert!(!e.allowed);
    assert!(
        e.to_string().contains("expired at 2027-01-31T00:00:00Z"),
        "{e}"
    );
    // Quarantined.
    d.devices[5].quarantined = true;
    let e = explain(&p, &d, "carol-pc", "web1:443", NOW).unwrap();
    assert!(!e.allowed);
    assert!(e.to_string().contains("quarantined"), "{e}");
    let e = explain(&p, &d, "carol-pc", "srv1:8443", NOW).unwrap();
    assert!(e.allowed, "{e}");
    // No rule at all.
    let e = explain(&p, &d, "bob-laptop", "db1:5432/udp", NOW).unwrap();
    assert!(
        e.to_string()
            .contains("no rule allows bob-laptop to reach db1:5432/udp (default deny)"),
        "{e}"
    );
    // ICMP and any-port forms; errors for unknown names.
    assert!(
        explain(&p, &d, "bob-laptop", "web1:icmp", NOW)
            .unwrap()
            .allowed
    );
    assert!(explain(&p, &d, "bob-laptop", "web", NOW).unwrap().allowed);
    assert!(explain(&p, &d, "nobody", "web", NOW).is_err());
    assert!(explain(&p, &d, "bob", "nowhere:1", NOW).is_err());
    assert!(explain(&p, &d, "bob", "web:1/sctp", NOW).is_err());
}

/// A device that calls itself `ci-runner` (a self-chosen name) gets nothing from rules and
/// services written for `device:ci-runner`; the device whose name an administrator bound does,
/// and `explain` says why the other is not selected.
#[test]
fn device_selectors_name_only_bound_names() {
    let p = parse(
        br#"
[services.artifacts]
devices = ["tag:store"]
ports = ["tcp/443"]

[services.runner]
devices = ["device:ci-runner"]
ports = ["tcp/22"]

[[rules]]
name = "runner-to-artifacts"
from = ["device:ci-runner"]
to = ["artifacts"]

[[rules]]
name = "alice-to-runner"
from = ["alice"]
to = ["runner"]
"#,
        "p",
    )
    .unwrap();
    let squatter = DirDevice {
        name_bound: false,
        ..dev(1, "ci-runner", Some("mallory"), &[])
    };
    let d = Directory {
        users: vec![user("alice", &[]), user("mallory", &[])],
        devices: vec![
            squatter,
            dev(2, "store1", None, &["store"]),
            dev(3, "alice-laptop", Some("alice"), &[]),
        ],
        grants: vec![Grant {
            id: "g1".into(),
            from: "device:ci-runner".into(),
            to: "artifacts".into(),
            not_after_ms: NOW + 60_000,
            reason: None,
        }],
    };
    let c = compile(&p, &d, NOW);
    assert!(access(&c, 1).peers.is_empty(), "{:?}", access(&c, 1));
    assert!(access(&c, 1).inbound.is_empty());
    assert!(!access(&c, 2).peers.contains(&DeviceId(1)));
    assert!(!access(&c, 3).peers.contains(&DeviceId(1)));
    let e = explain(&p, &d, "ci-runner", "store1:443", NOW).unwrap();
    assert!(!e.allowed);
    let s = e.to_string();
    assert!(
        s.contains("name `ci-runner` is self-chosen; bind it with `device approve` or a token's --hostname"),
        "{s}"
    );
    let e = explain(&p, &d, "alice-laptop", "ci-runner:22", NOW).unwrap();
    assert!(!e.allowed);
    assert!(e.to_string().contains("is self-chosen"), "{e}");
    assert!(warnings(&p, &d)
        .iter()
        .any(|w| w.message.contains("self-chosen")));

    // The same name, bound: the rules apply.
    let mut d2 = d.clone();
    d2.devices[0].name_bound = true;
    let c = compile(&p, &d2, NOW);
    assert!(access(&c, 1).peers.contains(&DeviceId(2)));
    assert!(access(&c, 3).peers.contains(&DeviceId(1)));
    assert!(
        explain(&p, &d2, "ci-runner", "store1:443", NOW)
            .unwrap()
            .allowed
    );
    assert!(
        explain(&p, &d2, "alice-laptop", "ci-runner:22", NOW)
            .unwrap()
            .allowed
    );
}

#[test]
fn diff_lists_gains_and_losses() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let d = directory();
    let old = compile(&p, &d, NOW);
    let p2 = parse(
        EXAMPLE
            .replace("to = [\"ssh\", \"web\"]", "to = [\"ssh\", \"db\"]")
            .as_bytes(),
        "p",
    )
    .unwrap();
    let new = compile(&p2, &d, NOW);
    let changes: Vec<String> = diff(&old, &new, &d).iter().map(|c| c.to_string()).collect();
    assert!(
        changes.contains(&"+ bob-laptop can now reach db1 db tcp/5432".to_string()),
        "{changes:#?}"
    );
    assert!(
        !changes.iter().any(|c| c.contains("web1")),
        "web stays via everyone-patches: {changes:#?}"
    );
    assert!(diff(&old, &old, &d).is_empty());
    let none = compile(&parse(b"", "p").unwrap(), &d, NOW);
    let lost = diff(&old, &none, &d);
    assert!(!lost.is_empty() && lost.iter().all(|c| c.kind == ChangeKind::Lost));
}

/// A random world: devices with users/tags/posture/quarantine/liveness/name binding, and a random policy
/// over them.
fn world() -> impl Strategy<Value = (String, Directory)> {
    let device = (0u8..3, 0u8..3, any::<bool>(), any::<bool>(), 0u8..8, 0u8..4);
    let rule = (
        proptest::collection::vec((0u8..4, 0u8..3), 1..3),
        proptest::collection::vec(0u8..3, 1..3),
        any::<bool>(),
        0u8..3,
    );
    (
        proptest::collection::vec(device, 1..8),
        proptest::collection::vec(rule, 0..5),
        proptest::collection::vec(any::<bool>(), 3),
    )
        .prop_map(|(devs, rules, remediation)| {
            let users = ["u0", "u1", "u2"];
            let mut d = Directory {
                users: users
                    .iter()
                    .map(|u| user(u, if *u == "u1" { &["g1"] } else { &[] }))
                    .collect(),
                ..Directory::default()
            };
            for (i, (u, t, q, post, live, bound)) in devs.iter().enumerate() {
                let mut x = dev(
                    i as u64 + 1,
                    &format!("h{i}"),
                    Some(users[*u as usize]),
                    &[["t0", "t1", "t2"][*t as usize]],
                );
                x.quarantined = *q;
                if !*post {
                    x.posture_passed.clear();
                }
                x.live = *live != 0;
                x.name_bound = *bound != 0;
                d.devices.push(x);
            }
            let mut src =
                String::from("[groups]\ng0 = [\"u0\"]\ng1 = []\n[posture.p]\nfirewall = true\n");
            let ports = [
                "\"tcp/22\", \"udp/53\"",
                "\"tcp/80-90\", \"icmp\"",
                "\"tcp/*\"",
            ];
            for s in 0..3 {
                src.push_str(&format!(
                    "[services.s{s}]\ndevices = [\"tag:t{s}\"]\nports = [{}]\nremediation = {}\n",
                    ports[s], remediation[s]
                ));
            }
            for (from, to, posture, exp) in rules {
                let from: Vec<String> = from
                    .iter()
                    .map(|(k, n)| match k {
                        0 => format!("\"u{n}\""),
                        1 => format!("\"group:g{}\"", n % 2),
                        2 => format!("\"tag:t{n}\""),
                        _ => format!("\"device:h{n}\""),
                    })
                    .collect();
                let to: Vec<String> = to.iter().map(|s| format!("\"s{s}\"")).collect();
                src.push_str(&format!(
                    "[[rules]]\nfrom = [{}]\nto = [{}]\n",
                    from.join(","),
                    to.join(",")
                ));
                if posture {
                    src.push_str("posture = [\"p\"]\n");
                }
                match exp {
                    1 => src.push_str("expires = \"2020-01-01T00:00:00Z\"\n"),
                    2 => src.push_str("expires = \"2030-01-01T00:00:00Z\"\n"),
                    _ => {}
                }
            }
            (src, d)
        })
}

/// The flat reach list of every live device as compile built it before reach was carried by
/// reference: one entry per rule, service, destination (never the source itself) and protocol,
/// straight from the rules (the reference for [`expand_reach`]).
fn reach_reference(p: &Policy, d: &Directory, now: i64) -> BTreeMap<DeviceId, Vec<Reach>> {
    use super::compile::{effective_rules, Index};
    let ix = Index::new(p, d);
    let mut out: BTreeMap<DeviceId, Vec<Reach>> = d
        .devices
        .iter()
        .filter(|x| x.live)
        .map(|x| (x.id, Vec::new()))
        .collect();
    for rule in effective_rules(p, d)
        .into_iter()
        .filter(|r| r.mode.in_view(View::Enforced))
    {
        if rule.expires_ms.is_some_and(|t| t <= now) {
            continue;
        }
        let mut sources: Vec<usize> = rule
            .from
            .iter()
            .flat_map(|sel| ix.resolve(sel))
            .filter(|i| {
                let x = &d.devices[*i];
                x.live && rule.posture.iter().all(|q| x.posture_passed.contains(*q))
            })
            .collect();
        sources.sort_unstable();
        sources.dedup();
        for svc_name in &rule.to {
            let Some(svc) = p.services.get(*svc_name) else {
                continue;
            };
            let mut dsts: Vec<usize> = svc
                .devices
                .iter()
                .flat_map(|sel| ix.resolve(&sel.value))
                .filter(|i| d.devices[*i].live)
                .collect();
            dsts.sort_unstable();
            dsts.dedup();
            for &dst in &dsts {
                let x = &d.devices[dst];
                let Ok(h) =
                    Hostname::parse(&x.hostname).or_else(|_| Hostname::sanitize(&x.hostname))
                else {
                    continue;
                };
                for &src in &sources {
                    let sd = &d.devices[src];
                    if src == dst || (sd.quarantined && !svc.remediation) {
                        continue;
                    }
                    for (proto, ports) in svc.ports.by_proto() {
                        out.entry(sd.id).or_default().push(Reach {
                            service: svc.name.clone(),
                            device_id: x.id,
                            hostname: h.clone(),
                            proto,
                            ports,
                            rule: rule.name.clone(),
                            not_after_ms: rule.expires_ms,
                        });
                    }
                }
            }
        }
    }
    for v in out.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Reach by reference expands to exactly the flat list built per destination, on random
    /// policies (grants, quarantine, posture, expiry, unbound names): no device reaches itself,
    /// every grant reaches beyond its holder, and the grants of one rule and service share one
    /// destination list.
    #[test]
    fn reach_grants_expand_to_the_flat_reach_list((src, d) in world()) {
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let c = compile(&p, &d, NOW);
        let want = reach_reference(&p, &d, NOW);
        prop_assert_eq!(c.devices.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
        let mut lists: BTreeMap<&str, &Arc<[ReachDest]>> = BTreeMap::new();
        for (id, acc) in &c.devices {
            let flat = acc.reach_flat(*id);
            prop_assert_eq!(&flat, &want[id]);
            prop_assert!(flat.iter().all(|r| r.device_id != *id));
            for g in &acc.reach {
                prop_assert!(g.reaches_beyond(*id));
                let l = lists.entry(g.service.as_str()).or_insert(&g.devices);
                prop_assert!(Arc::ptr_eq(l, &g.devices));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// compile + filter agree with explain: explain says allowed for src → dst:port/proto iff a
    /// packet from src's overlay address to dst's passes dst's filter as a new flow.
    #[test]
    fn compile_and_filter_agree_with_explain(
        (src, d) in world(),
        probes in proptest::collection::vec((0usize..8, 0usize..8, 0u8..3, prop_oneof![Just(22u16), Just(53), Just(85), Just(443)], any::<bool>()), 1..12),
    ) {
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let c = compile(&p, &d, NOW);
        for (si, di, proto, port, v6) in probes {
            let (Some(s), Some(t)) = (d.devices.get(si), d.devices.get(di)) else { continue };
            let (proto, spec) = match proto {
                0 => (Proto::Tcp, format!("{}:{port}", t.hostname)),
                1 => (Proto::Udp, format!("{}:{port}/udp", t.hostname)),
                _ => (Proto::Icmp, format!("{}:icmp", t.hostname)),
            };
            let e = explain(&p, &d, &s.hostname, &spec, NOW).unwrap();
            let (sa, ta) = if v6 { (IpAddr::V6(s.ipv6), IpAddr::V6(t.ipv6)) } else { (IpAddr::V4(s.ipv4), IpAddr::V4(t.ipv4)) };
            let packet = match proto {
                Proto::Tcp => pkt::tcp(sa, 40000, ta, port, pkt::SYN),
                Proto::Udp => pkt::udp(sa, 40000, ta, port),
                Proto::Icmp => pkt::echo(sa, ta, true, 1),
            };
            let passes = match c.devices.get(&t.id) {
                Some(acc) => {
                    let mut f = Filter::new(64);
                    f.set_rules(acc.inbound.to_vec());
                    f.check_inbound(&packet, Instant::now(), NOW) == Verdict::Allow
                }
                None => false,
            };
            // The same filter as a protocol-2 netmap carries it (peer sets by id) decides the
            // same, and its sets expand back to the flat sources.
            let passes_sets = match c.devices.get(&t.id) {
                Some(acc) => {
                    let fx = crate::peerset::factor(&acc.inbound, None, None);
                    let sets: Vec<crate::peerset::PeerSet> = fx.sets.iter().map(|(id, p)| crate::peerset::PeerSet { id: *id, prefixes: p.to_vec() }).collect();
                    let flat = crate::peerset::expand(&fx.inbound, &sets, 1 << 16);
                    for (x, y) in flat.iter().zip(acc.inbound.iter()) {
                        let mut want = y.sources.to_vec();
                        want.sort_unstable();
                        want.dedup();
                        prop_assert_eq!(&x.sources, &want);
                    }
                    let mut f = Filter::new(64);
                    f.set_rules_with_sets(fx.inbound.to_vec(), &sets);
                    f.check_inbound(&packet, Instant::now(), NOW) == Verdict::Allow
                }
                None => false,
            };
            prop_assert_eq!(passes, passes_sets);
            // A peer relationship is needed for the packet to arrive at all: the data plane
            // takes an overlay source address only from the peer that owns it, and a device
            // is never its own peer (its filter may list its own addresses, as a rule's
            // sources are shared by all its destinations).
            let peers = c.devices.get(&s.id).is_some_and(|a| a.peers.contains(&t.id));
            let back = c.devices.get(&t.id).is_some_and(|a| a.peers.contains(&s.id));
            prop_assert_eq!(peers, back, "peers are symmetric");
            prop_assert_eq!(e.allowed, passes && back, "{}\n{}", src, e);
            if s.id == t.id {
                prop_assert!(!peers && !e.allowed);
            } else {
                prop_assert_eq!(e.allowed, passes, "{}\n{}", src, e);
            }
        }
    }

    /// Arbitrary bytes never panic the parser.
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&bytes, "p.toml");
    }

    #[test]
    fn parser_never_panics_on_tomlish_text(s in "[\\[\\]{}=\"',.a-z0-9 \\n#:/*-]{0,200}") {
        let _ = parse(s.as_bytes(), "p.toml");
    }
}

/// Compile time for 1 000 and 10 000 devices (run with `--ignored --nocapture`, in release).
#[test]
#[ignore]
fn compile_speed() {
    for n in [1_000usize, 10_000] {
        let (p, d) = bench_world(n);
        let t = Instant::now();
        let c = compile(&p, &d, NOW);
        let took = t.elapsed();
        let rules: usize = c.devices.values().map(|a| a.inbound.len()).sum();
        println!("{n} devices: compile {took:?} ({rules} filter rules)");
    }
}

/// A realistic world: 20 services, 50 rules, `n` devices (70% user devices in 10 groups, 30%
/// servers with 10 tags).
pub(crate) fn bench_world(n: usize) -> (Policy, Directory) {
    let mut src = String::from("[groups]\n");
    for g in 0..10 {
        src.push_str(&format!("g{g} = []\n"));
    }
    for s in 0..20 {
        src.push_str(&format!(
            "[services.s{s}]\ndevices = [\"tag:t{}\"]\nports = [\"tcp/{}\", \"udp/{}\"]\n",
            s % 10,
            1000 + s,
            2000 + s
        ));
    }
    for r in 0..50 {
        src.push_str(&format!(
            "[[rules]]\nfrom = [\"group:g{}\"]\nto = [\"s{}\", \"s{}\"]\n",
            r % 10,
            r % 20,
            (r * 7) % 20
        ));
    }
    let p = parse(src.as_bytes(), "bench.toml").unwrap();
    let users: Vec<DirUser> = (0..n / 3 + 1)
        .map(|u| user(&format!("u{u}"), &[&format!("g{}", u % 10)]))
        .collect();
    let devices = (0..n)
        .map(|i| {
            let id = i as u64 + 1;
            let mut x = dev(id, &format!("h{i}"), None, &[]);
            x.ipv4 = Ipv4Addr::from(0x6440_0000 + id as u32);
            x.ipv6 = Ipv6Addr::from((0xfd00u128 << 112) + u128::from(id));
            if i % 10 < 7 {
                x.user = Some(format!("u{}", i / 3));
            } else {
                x.tags = vec![format!("t{}", i % 10)];
            }
            x
        })
        .collect();
    (
        p,
        Directory {
            users,
            devices,
            grants: vec![],
        },
    )
}

/// The complete example in docs/policy.md parses, its tests pass, and its messages are true.
#[test]
fn documented_example_is_valid() {
    let doc = include_str!("../../../docs/policy.md");
    let start = doc.find("```toml\n").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    let p = parse(&doc.as_bytes()[start..end], "policy.toml").unwrap();
    let mut d = directory();
    d.devices.push(dev(8, "ci-runner-1", None, &["ci"]));
    assert!(
        run_tests(&p, &d, NOW).iter().all(|o| o.pass),
        "{:#?}",
        run_tests(&p, &d, NOW)
    );
    let unnamed = &p.rules[1].name;
    assert!(doc.contains(&format!("called \"{unnamed}\"")), "{unnamed}");
}

#[test]
fn explain_lists_the_failed_posture_checks() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let mut d = directory();
    d.devices[6].posture_passed.clear();
    d.devices[6].posture_failures.insert(
        "baseline".into(),
        vec![
            "disk_encryption: root filesystem is not on dm-crypt".into(),
            "process osqueryd: not running".into(),
        ],
    );
    let e = explain(&p, &d, "alice-phone", "db:5432", NOW).unwrap();
    assert!(!e.allowed);
    assert_eq!(
        e.devices[0].misses[0].reasons,
        ["posture \"baseline\" not met by alice-phone (disk_encryption: root filesystem is not on dm-crypt; process osqueryd: not running)"]
    );
    let s = e.to_string();
    assert!(
        s.contains("rule \"eng-to-db\" (line 33) did not apply: posture \"baseline\" not met by alice-phone (disk_encryption: root filesystem is not on dm-crypt; process osqueryd: not running)"),
        "{s}"
    );
    // Failures recorded for a requirement the rule does not need are not mentioned.
    d.devices[6].posture_passed.insert("baseline".into());
    d.devices[6].posture_failures.clear();
    d.devices[6]
        .posture_failures
        .insert("other".into(), vec!["firewall: off".into()]);
    let s = explain(&p, &d, "alice-phone", "db:5432", NOW)
        .unwrap()
        .to_string();
    assert!(!s.contains("firewall"), "{s}");
}

#[test]
fn posture_checks_parse_with_new_keys() {
    let p = parse(
        br#"
[posture.desk]
screen_lock = true
max_package_age = "30d"
kernel = ">=6.1"
files = [{ path = "/etc/ward/marker" }, { path = "/etc/x", sha256 = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855" }]
processes = ["osqueryd", "osqueryd"]
custom.mdm = true
custom.edr = { vendor = "crowdstrike", score = 80, status = { realtime = true, since = 2024-01-01T00:00:00Z }, tags = ["a", 1.5] }
[posture.k]
kernel = "5.15"
[posture.k2]
kernel = "<7"
"#,
        "p.toml",
    )
    .unwrap();
    let d = &p.postures["desk"];
    assert_eq!(d.screen_lock, Some(true));
    assert_eq!(d.max_package_age_ms, Some(30 * 86_400_000));
    assert_eq!(d.kernel, Some((VersionOp::Ge, "6.1".into())));
    assert_eq!(d.files[0].sha256, None);
    assert_eq!(d.files[1].sha256.unwrap()[31], 0x55);
    assert_eq!(d.processes, ["osqueryd"]);
    assert_eq!(d.custom["mdm"], serde_json::json!(true));
    assert_eq!(
        d.custom["edr"],
        serde_json::json!({"vendor": "crowdstrike", "score": 80, "status": {"realtime": true, "since": "2024-01-01T00:00:00Z"}, "tags": ["a", 1.5]})
    );
    assert_eq!(p.postures["k"].kernel, Some((VersionOp::Ge, "5.15".into())));
    assert_eq!(p.postures["k2"].kernel, Some((VersionOp::Lt, "7".into())));
    assert_eq!(d.os.len(), 0);
    let os = parse(b"[posture.o]\nos = [\"debian>=12\", \"macos\"]\n", "p.toml").unwrap();
    let shown: Vec<String> = os.postures["o"].os.iter().map(|o| o.to_string()).collect();
    assert_eq!(shown, ["debian>=12", "macos"]);
}

#[test]
fn posture_errors_name_line_and_column() {
    let cases: &[(&str, &str)] = &[
        (
            "[posture.p]\nkernel = \"6.1-rc1\"\n",
            "p.toml:2:10: bad kernel requirement \"6.1-rc1\"",
        ),
        (
            "[posture.p]\nkernel = \">=\"\n",
            "p.toml:2:10: bad kernel requirement",
        ),
        (
            "[posture.p]\nkernel = \">=6.x\"\n",
            "p.toml:2:10: bad kernel requirement",
        ),
        (
            "[posture.p]\nmax_package_age = \"a month\"\n",
            "p.toml:2:19: bad duration \"a month\"",
        ),
        (
            "[posture.p]\nscreen_lock = \"yes\"\n",
            "p.toml:2:15: invalid type",
        ),
        (
            "[posture.p]\nfiles = [{ path = \"/x\", sha256 = \"abc\" }]\n",
            "p.toml:2:34: sha256 must be 64 hexadecimal digits",
        ),
        (
            "[posture.p]\nfiles = [{ path = \"x\" }]\n",
            "p.toml:2:19: file path \"x\" must be absolute",
        ),
        (
            "[posture.p]\nfiles = [{ path = \"/x\" }, { path = \"/x\" }]\n",
            "p.toml:2:36: file \"/x\" is listed twice in posture requirement \"p\"",
        ),
        (
            "[posture.p]\nfiles = [{ sha256 = \"00\" }]\n",
            "p.toml:2:10: missing field `path`",
        ),
        (
            "[posture.p]\ncustom = { edr = \"crowdstrike\" }\n",
            "p.toml:2:18: custom.edr must be true (its output's \"pass\" is true) or a table of expected values",
        ),
        (
            "[posture.p]\ncustom.edr = false\n",
            "p.toml:2:14: custom.edr must be true",
        ),
        (
            "[posture.p]\ncustom.edr = 80\n",
            "p.toml:2:14: custom.edr must be true",
        ),
        (
            "[posture.p]\ncustom.edr = { score = nan }\n",
            "p.toml:2:14: NaN has no JSON form",
        ),
        (
            "[posture.p]\ncustom.EDR = true\n",
            "p.toml:2:8: custom check \"EDR\" has a character that is not allowed",
        ),
        (
            "[posture.p]\nscreenlock = true\n",
            "p.toml:2:1: unknown field `screenlock`",
        ),
    ];
    expect_errors("p.toml", cases);
}

#[test]
fn posture_wants_over_the_cap_are_refused() {
    use crate::posture::MAX_WANTS;
    let list = |prefix: &str, n: usize| -> String {
        (0..n)
            .map(|i| format!("\"{prefix}{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // Exactly the cap, spread over two requirements, is fine.
    let ok = format!(
        "[posture.a]\nprocesses = [{}]\n[posture.b]\nprocesses = [{}]\n",
        list("p", MAX_WANTS / 2),
        list("p", MAX_WANTS)
    );
    assert!(parse(ok.as_bytes(), "p.toml").is_ok());
    let too_many = format!(
        "[posture.a]\nprocesses = [{}]\n[posture.b]\nprocesses = [{}]\n",
        list("p", MAX_WANTS),
        list("q", 1)
    );
    let e = err(&too_many);
    assert!(
        e.starts_with(
            "policy.toml:3:10: posture requirements name more than 64 distinct processes in all"
        ),
        "{e}"
    );
    let files: String = (0..=MAX_WANTS)
        .map(|i| format!("{{ path = \"/f{i}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let e = err(&format!("[posture.a]\nfiles = [{files}]\n"));
    assert!(e.contains("more than 64 distinct files"), "{e}");
    let custom: String = (0..=MAX_WANTS)
        .map(|i| format!("custom.c{i} = true\n"))
        .collect();
    let e = err(&format!("[posture.a]\n{custom}"));
    assert!(e.contains("more than 64 distinct custom checks"), "{e}");
}

#[test]
fn trust_section_parses_with_defaults() {
    let p = parse(
        br#"
[trust]
quarantine_after_failing = "10m"
scan_denied_flows = 20
scan_window = "60s"
risky_lease_ttl = "2m"
clean_after = "1h"
"#,
        "p.toml",
    )
    .unwrap();
    assert_eq!(
        p.trust,
        Trust {
            quarantine_after_failing_ms: Some(600_000),
            scan_denied_flows: Some(20),
            scan_window_ms: 60_000,
            risky_lease_ttl_ms: Some(120_000),
            clean_after_ms: 3_600_000,
            risk_threshold: 40,
            quarantine_above_risk: None,
            quarantine_malicious: false,
            behaviour_learning_ms: 7 * 86_400_000,
        }
    );
    // An empty section and no section mean the same: every reaction off, default windows.
    let empty = parse(b"[trust]\n", "p.toml").unwrap();
    assert_eq!(empty.trust, Trust::default());
    assert_eq!(
        Trust::default(),
        Trust {
            quarantine_after_failing_ms: None,
            scan_denied_flows: None,
            scan_window_ms: 60_000,
            risky_lease_ttl_ms: None,
            clean_after_ms: 1_800_000,
            risk_threshold: 40,
            quarantine_above_risk: None,
            quarantine_malicious: false,
            behaviour_learning_ms: 7 * 86_400_000,
        }
    );
    // Behaviour risk: thresholds are 0–100, the learning period a bounded duration.
    let risk = parse(
        b"[posture.calm]\nmax_risk = 40\nrisk_signin_above = 20\n[trust]\nrisk_threshold = 30\nquarantine_above_risk = 90\nquarantine_malicious = true\nbehaviour_learning = \"2d\"\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(risk.postures["calm"].max_risk, Some(40));
    assert_eq!(risk.postures["calm"].risk_signin_above, Some(20));
    assert_eq!(risk.trust.risk_threshold, 30);
    assert_eq!(risk.trust.quarantine_above_risk, Some(90));
    assert!(risk.trust.quarantine_malicious);
    assert_eq!(risk.trust.behaviour_learning_ms, 2 * 86_400_000);
    for bad in [
        "[posture.calm]\nmax_risk = 101\n",
        "[posture.calm]\nmax_risk = -1\n",
        "[posture.calm]\nrisk_signin_above = 101\n",
        "[trust]\nquarantine_above_risk = 1000\n",
        "[trust]\nbehaviour_learning = \"0s\"\n",
    ] {
        let e = parse(bad.as_bytes(), "p.toml").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{bad}: {e}");
    }
    assert_eq!(Policy::default().trust, Trust::default());
    let only = parse(b"[trust]\nscan_denied_flows = 1\n", "p.toml").unwrap();
    assert_eq!(only.trust.scan_denied_flows, Some(1));
    assert_eq!(only.trust.scan_window_ms, 60_000);
    let max = parse(
        b"[trust]\nscan_denied_flows = 100000\nscan_window = \"1h\"\nquarantine_after_failing = \"30d\"\nrisky_lease_ttl = \"10s\"\nclean_after = \"1m\"\n",
        "p.toml",
    )
    .unwrap();
    assert_eq!(max.trust.scan_denied_flows, Some(100_000));
    assert_eq!(max.trust.risky_lease_ttl_ms, Some(10_000));
}

#[test]
fn trust_errors_name_line_and_column() {
    let cases: &[(&str, &str)] = &[
        (
            "[trust]\nscan_denied_flows = 0\n",
            "p.toml:2:21: scan_denied_flows 0 is out of range (1 to 100000)",
        ),
        (
            "[trust]\nscan_denied_flows = 100001\n",
            "p.toml:2:21: scan_denied_flows 100001 is out of range (1 to 100000)",
        ),
        (
            "[trust]\nscan_denied_flows = -5\n",
            "p.toml:2:21: scan_denied_flows -5 is out of range",
        ),
        (
            "[trust]\nscan_denied_flows = \"20\"\n",
            "p.toml:2:21: invalid type",
        ),
        (
            "[trust]\nscan_window = \"0s\"\n",
            "p.toml:2:15: scan_window \"0s\" is out of range (1s to 1h)",
        ),
        (
            "[trust]\nscan_window = \"2h\"\n",
            "p.toml:2:15: scan_window \"2h\" is out of range (1s to 1h)",
        ),
        (
            "[trust]\nquarantine_after_failing = \"31d\"\n",
            "p.toml:2:28: quarantine_after_failing \"31d\" is out of range (1s to 30d)",
        ),
        (
            "[trust]\nquarantine_after_failing = \"500ms\"\n",
            "p.toml:2:28: quarantine_after_failing \"500ms\" is out of range",
        ),
        (
            "[trust]\nrisky_lease_ttl = \"5s\"\n",
            "p.toml:2:19: risky_lease_ttl \"5s\" is out of range (10s to 1d)",
        ),
        (
            "[trust]\nclean_after = \"30s\"\n",
            "p.toml:2:15: clean_after \"30s\" is out of range (1m to 30d)",
        ),
        (
            "[trust]\nclean_after = \"soon\"\n",
            "p.toml:2:15: bad duration \"soon\"",
        ),
        ("[trust]\nclean_after = 30\n", "p.toml:2:15: invalid type"),
        (
            "[trust]\nquarantine = true\n",
            "p.toml:2:1: unknown field `quarantine`",
        ),
        ("trust = 1\n", "p.toml:1:9: invalid type"),
    ];
    expect_errors("p.toml", cases);
}

#[test]
fn example_file_is_valid_with_and_without_its_commented_sections() {
    let text = include_str!("../../../examples/policy.toml");
    let p = parse(text.as_bytes(), "examples/policy.toml").unwrap();
    assert!(p.postures.is_empty());
    // The commented-out posture and trust sections are valid too once uncommented.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.starts_with('[')
                    || (rest.starts_with(|c: char| c.is_ascii_lowercase())
                        && rest.contains(" = ")) =>
            {
                rest
            }
            _ => l,
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let p = parse(uncommented.as_bytes(), "examples/policy.toml").unwrap();
    let b = &p.postures["baseline"];
    assert_eq!(b.screen_lock, Some(true));
    assert_eq!(b.files[0].sha256, None);
    assert_eq!(p.trust.scan_denied_flows, Some(20));
    assert_eq!(p.trust.risky_lease_ttl_ms, Some(120_000));
}

/// `src` with every `[[rules]]` entry named `rI` and given its mode (0: enforced, 1: `shadow`,
/// 2: `shadow_remove`); entries whose mode is in `drop` are left out and no attribute is
/// written when `plain`.
fn with_modes(src: &str, modes: &[u8], drop: u8, plain: bool) -> String {
    let mut parts = src.split("[[rules]]\n");
    let mut out = parts.next().unwrap_or_default().to_string();
    for (i, body) in parts.enumerate() {
        let mode = modes.get(i).copied().unwrap_or(0);
        if mode == drop {
            continue;
        }
        out.push_str(&format!("[[rules]]\nname = \"r{i}\"\n{body}"));
        match (plain, mode) {
            (false, 1) => out.push_str("shadow = true\n"),
            (false, 2) => out.push_str("shadow_remove = true\n"),
            _ => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Shadow rules never change the enforced compilation (peers, inbound filter, reach list
    /// are those of the policy without the `shadow` rules), and the candidate filter is the
    /// inbound filter of the policy without the `shadow_remove` rules and with the `shadow`
    /// ones enforced.
    #[test]
    fn shadow_rules_never_change_the_enforced_compilation(
        (src, d) in world(),
        modes in proptest::collection::vec(0u8..3, 5),
    ) {
        let watched = parse(with_modes(&src, &modes, u8::MAX, false).as_bytes(), "p.toml").unwrap();
        let enforced = parse(with_modes(&src, &modes, 1, true).as_bytes(), "p.toml").unwrap();
        let candidate = parse(with_modes(&src, &modes, 2, true).as_bytes(), "p.toml").unwrap();
        let cw = compile(&watched, &d, NOW);
        let ce = compile(&enforced, &d, NOW);
        let cc = compile(&candidate, &d, NOW);
        prop_assert_eq!(cw.devices.len(), ce.devices.len());
        for (id, acc) in &cw.devices {
            let e = &ce.devices[id];
            prop_assert_eq!(&acc.peers, &e.peers);
            prop_assert_eq!(&acc.inbound, &e.inbound);
            prop_assert_eq!(&acc.reach, &e.reach);
            prop_assert_eq!(e.shadow_inbound.as_ref(), None);
            if watched.has_shadow() {
                prop_assert_eq!(acc.shadow_inbound.as_ref(), Some(&*cc.devices[id].inbound));
            } else {
                prop_assert_eq!(acc.shadow_inbound.as_ref(), None);
            }
        }
    }
}

const SHADOWED: &str = r#"
[services.web]
devices = ["device:web1"]
ports = ["tcp/80", "tcp/443"]

[services.web-tls]
devices = ["device:web1"]
ports = ["tcp/443"]

[[rules]]
name = "web-wide"
from = ["alice"]
to = ["web"]
shadow_remove = true

[[rules]]
name = "web-narrow"
from = ["alice"]
to = ["web-tls"]
shadow = true

[[tests]]
from = "alice"
allow = ["web:80", "web:443"]
"#;

#[test]
fn shadow_attributes_parse_and_both_at_once_is_an_error() {
    let p = parse(SHADOWED.as_bytes(), "policy.toml").unwrap();
    assert_eq!(p.rules[0].mode, RuleMode::ShadowRemove);
    assert_eq!(p.rules[1].mode, RuleMode::Shadow);
    assert!(p.has_shadow());
    assert_eq!(p.shadow_counts(), (1, 1));
    let plain = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    assert!(!plain.has_shadow());
    assert!(plain.rules.iter().all(|r| r.mode == RuleMode::Enforced));
    // `false` is the same as absent.
    let off = SHADOWED.replace("shadow = true", "shadow = false");
    assert_eq!(
        parse(off.as_bytes(), "p.toml").unwrap().rules[1].mode,
        RuleMode::Enforced
    );
    let both = SHADOWED.replace("shadow = true", "shadow = true\nshadow_remove = true");
    let e = err(&both);
    assert!(
        e.contains("rule \"web-narrow\" is both `shadow`") && e.contains("set one"),
        "{e}"
    );
    assert!(e.starts_with("policy.toml:16:1:"), "{e}");
    let e = err(&SHADOWED.replace("shadow = true", "shadow = \"yes\""));
    assert!(e.contains("policy.toml:"), "{e}");
}

#[test]
fn shadow_rules_are_compiled_beside_never_into_the_enforced_filter() {
    let p = parse(SHADOWED.as_bytes(), "policy.toml").unwrap();
    let c = compile(&p, &directory(), NOW);
    let web1 = access(&c, 5);
    let enforced: Vec<&str> = web1.inbound.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(enforced, vec!["web-wide"]);
    let shadow = web1.shadow_inbound.as_ref().unwrap();
    let names: Vec<(&str, Vec<PortRange>)> = shadow
        .iter()
        .map(|r| (r.rule.as_str(), r.ports.clone()))
        .collect();
    assert_eq!(
        names,
        vec![("web-narrow", vec![PortRange { lo: 443, hi: 443 }])]
    );
    // Every live device carries a candidate filter (possibly empty) when the policy has one.
    assert_eq!(access(&c, 1).shadow_inbound, Some(vec![]));
    // A shadow rule alone puts no peer in a netmap and no entry in a reach list.
    let only = SHADOWED.replace("shadow_remove = true\n", "shadow = true\n");
    let p = parse(only.as_bytes(), "policy.toml").unwrap();
    let c = compile(&p, &directory(), NOW);
    assert!(access(&c, 1).peers.is_empty() && access(&c, 1).reach.is_empty());
    assert!(access(&c, 5).inbound.is_empty());
    assert_eq!(access(&c, 5).shadow_inbound.as_ref().map(Vec::len), Some(2));
    // Tests judge the enforced view: alice may not reach web (the shadow rules do not count).
    let outcomes = run_tests(&p, &directory(), NOW);
    assert!(outcomes.iter().all(|o| !o.allowed), "{outcomes:#?}");
}

#[test]
fn explain_adds_the_candidate_verdict_when_there_are_shadow_rules() {
    let p = parse(SHADOWED.as_bytes(), "policy.toml").unwrap();
    let d = directory();
    let e = explain(&p, &d, "alice-laptop", "web1:80", NOW).unwrap();
    assert!(e.allowed);
    let c = e.candidate.clone().unwrap();
    assert!(!c.allowed);
    let text = e.to_string();
    assert!(
        text.contains(
            "shadow: would deny (rule \"web-wide\" (line 10) is removed in the candidate)"
        ),
        "{text}"
    );
    let e = explain(&p, &d, "alice-laptop", "web1:443", NOW).unwrap();
    assert!(e.allowed);
    let text = e.to_string();
    assert!(
        text.contains("shadow: would allow (by rule \"web-narrow\" (line 16))"),
        "{text}"
    );
    let e = explain(&p, &d, "bob-laptop", "web1:443", NOW).unwrap();
    assert!(!e.allowed);
    assert!(e
        .to_string()
        .contains("shadow: would deny (no candidate rule allows it)"));
    // Without shadow rules, no candidate line.
    let plain = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let e = explain(&plain, &d, "alice-laptop", "web1:443", NOW).unwrap();
    assert_eq!(e.candidate, None);
    assert!(!e.to_string().contains("shadow:"));
}

/// The shadow-rules example in docs/policy.md parses, and its explain output is what the
/// document shows.
#[test]
fn documented_shadow_example_is_valid() {
    let doc = include_str!("../../../docs/policy.md");
    let start = doc.find("```toml\n# Narrowing").unwrap() + 8;
    let end = start + doc[start..].find("```").unwrap();
    let src = format!("[groups]\neng = [\"alice\"]\n{}", &doc[start..end]);
    let p = parse(src.as_bytes(), "policy.toml").unwrap();
    assert_eq!(p.shadow_counts(), (1, 1));
    let mut d = directory();
    d.devices[4].tags = vec!["web".into()];
    let e = explain(&p, &d, "alice", "web:80", NOW).unwrap().to_string();
    // Two lines of header in this test shift the document's line numbers by two.
    let shown = "shadow: would deny (rule \"web-wide\" (line 12) is removed in the candidate)";
    assert!(e.contains(shown), "{e}");
    assert!(doc.contains(&shown.replace("line 12", "line 10")));
}

#[test]
fn sign_in_requirements_parse_and_errors_name_line_and_column() {
    let p = parse(
        b"[posture.fresh]\nmax_auth_age = \"12h\"\namr = [\"mfa\", \"hwk\", \"mfa\"]\n[posture.plain]\nfirewall = true\n",
        "p.toml",
    )
    .unwrap();
    let f = &p.postures["fresh"];
    assert_eq!(f.max_auth_age_ms, Some(12 * 3_600_000));
    assert_eq!(f.amr, vec!["mfa".to_string(), "hwk".to_string()]);
    assert!(f.needs_sign_in());
    assert!(!p.postures["plain"].needs_sign_in());
    assert_eq!(p.postures["plain"].max_auth_age_ms, None);
    let cases: &[(&str, &str)] = &[
        (
            "[posture.p]\nmax_auth_age = \"soon\"\n",
            "p.toml:2:16: bad duration \"soon\"",
        ),
        (
            "[posture.p]\nmax_auth_age = \"0s\"\n",
            "p.toml:2:16: max_auth_age must be longer than 0s",
        ),
        ("[posture.p]\namr = []\n", "p.toml:2:7: amr is empty"),
        (
            "[posture.p]\namr = [\"mfa\", \"M F A\"]\n",
            "p.toml:2:15: amr \"M F A\" is not an authentication method name",
        ),
        ("[posture.p]\namr = \"mfa\"\n", "p.toml:2:7: invalid type"),
    ];
    for (src, want) in cases {
        let e = parse(src.as_bytes(), "p.toml").unwrap_err().to_string();
        assert!(e.starts_with(want), "{src:?}: got {e:?}, want {want:?}");
    }
}

#[test]
fn a_suspended_user_loses_user_and_group_rules_only_with_the_reason() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let mut d = directory();
    d.devices.push(dev(8, "alice-ci", Some("alice"), &["ci"]));
    let before = compile(&p, &d, NOW);
    assert!(before.devices[&DeviceId(1)]
        .reach
        .iter()
        .any(|r| r.service == "db" && r.reaches_beyond(DeviceId(1))));
    d.users[0].suspended = Some("deactivated at the identity provider (SCIM)".into());
    let c = compile(&p, &d, NOW);
    // Rules through the user (group:eng) are gone from both of alice's devices...
    assert!(c
        .devices
        .get(&DeviceId(1))
        .is_none_or(|a| a.reach.is_empty()));
    assert!(!c.devices[&DeviceId(8)]
        .reach
        .iter()
        .any(|r| r.service == "db"));
    // ...a rule by tag stays, and so do other users' rules.
    assert!(c.devices[&DeviceId(8)]
        .reach
        .iter()
        .any(|r| r.service == "ssh"));
    assert!(c.devices[&DeviceId(6)]
        .reach
        .iter()
        .any(|r| r.service == "db"));
    let e = explain(&p, &d, "device:alice-laptop", "db:5432", NOW).unwrap();
    assert!(!e.allowed);
    let s = e.to_string();
    assert!(
        s.contains("user alice has no access from the identity provider: deactivated at the identity provider (SCIM)"),
        "{s}"
    );
}

/// The changes as the first version of `diff` built them: every key owned, every change
/// built, sorted at the end (the reference for [`diff_bounded`]).
fn diff_reference(old: &Compiled, new: &Compiled, d: &Directory) -> Vec<AccessChange> {
    type Key = (
        DeviceId,
        String,
        String,
        Proto,
        Vec<crate::filter::PortRange>,
    );
    let keys = |c: &Compiled, id: &DeviceId| -> BTreeSet<Key> {
        c.devices
            .get(id)
            .map(|a| {
                a.reach_flat(*id)
                    .iter()
                    .map(|r| {
                        (
                            r.device_id,
                            r.hostname.as_str().to_string(),
                            r.service.clone(),
                            r.proto,
                            r.ports.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let ids: BTreeSet<DeviceId> = old
        .devices
        .keys()
        .chain(new.devices.keys())
        .copied()
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let (a, b) = (keys(old, &id), keys(new, &id));
        let src_hostname = d
            .devices
            .iter()
            .find(|x| x.id == id)
            .map_or_else(|| id.to_string(), |x| x.hostname.clone());
        for (kind, set) in [
            (ChangeKind::Gained, b.difference(&a)),
            (ChangeKind::Lost, a.difference(&b)),
        ] {
            for (dst, dst_hostname, service, proto, ports) in set {
                out.push(AccessChange {
                    kind,
                    src: id,
                    src_hostname: src_hostname.clone(),
                    dst: *dst,
                    dst_hostname: dst_hostname.clone(),
                    service: service.clone(),
                    proto: *proto,
                    ports: ports.clone(),
                });
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_bounded_diff_lists_the_first_changes_and_counts_them_all() {
    let p = parse(EXAMPLE.as_bytes(), "policy.toml").unwrap();
    let d = directory();
    let old = compile(&p, &d, NOW);
    let none = compile(&parse(b"", "p").unwrap(), &d, NOW);
    for (a, b) in [(&old, &none), (&none, &old), (&old, &old)] {
        let all = diff_reference(a, b, &d);
        assert_eq!(diff(a, b, &d), all);
        for max in [
            0,
            1,
            2,
            all.len().saturating_sub(1),
            all.len(),
            all.len() + 5,
        ] {
            let (listed, total) = diff_bounded(a, b, &d, max);
            assert_eq!(total, all.len(), "every change is counted");
            assert_eq!(listed, all[..max.min(all.len())].to_vec(), "max {max}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A compile made at one moment stands for another exactly when `same_at` says so: the
    /// compiles are equal whenever it holds; and diff agrees with the reference, bounded or not.
    #[test]
    fn same_at_means_the_same_compile_and_diff_matches_its_reference(
        (src, d) in world(),
        (src2, _) in world(),
        a in prop_oneof![Just(1_500_000_000_000i64), Just(1_700_000_000_000), Just(NOW), Just(1_950_000_000_000)],
        b in prop_oneof![Just(1_500_000_000_000i64), Just(1_700_000_000_000), Just(NOW), Just(1_950_000_000_000)],
        max in 0usize..6,
    ) {
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let (ca, cb) = (compile(&p, &d, a), compile(&p, &d, b));
        if same_at(&p, &d, a, b) {
            prop_assert_eq!(&ca, &cb);
        }
        prop_assert!(same_at(&p, &d, a, a));
        let p2 = parse(src2.as_bytes(), "p2.toml").unwrap();
        let c2 = compile(&p2, &d, NOW);
        let all = diff_reference(&ca, &c2, &d);
        prop_assert_eq!(&diff(&ca, &c2, &d), &all);
        let (listed, total) = diff_bounded(&ca, &c2, &d, max);
        prop_assert_eq!(total, all.len());
        prop_assert_eq!(&listed[..], &all[..max.min(all.len())]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A compile after a trust change (devices quarantined or released, passing or failing
    /// posture, leaving or joining the live set) carried over from the compile before it:
    /// its value is the fresh compile's, the devices it names as changed are exactly those
    /// whose access differs, and every unchanged device's source lists and reach grants are
    /// the earlier compile's own allocations (so comparing it costs pointers, not lists).
    #[test]
    fn a_carried_over_compile_names_exactly_the_devices_whose_access_changed(
        (src, d) in world(),
        flips in proptest::collection::vec((0usize..8, 0u8..3), 0..4),
    ) {
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let old = compile(&p, &d, NOW);
        let mut d2 = d.clone();
        for (i, what) in flips {
            let Some(x) = d2.devices.get_mut(i % d.devices.len()) else { continue };
            match what {
                0 => x.quarantined = !x.quarantined,
                1 => {
                    if x.posture_passed.is_empty() {
                        x.posture_passed.insert("p".into());
                    } else {
                        x.posture_passed.clear();
                    }
                }
                _ => x.live = !x.live,
            }
        }
        let fresh = compile(&p, &d2, NOW);
        let mut carried = compile(&p, &d2, NOW);
        let changed = carry_over(&mut carried, &old);
        prop_assert_eq!(&carried, &fresh);
        let ids: BTreeSet<DeviceId> = old.devices.keys().chain(fresh.devices.keys()).copied().collect();
        let want: BTreeSet<DeviceId> = ids
            .into_iter()
            .filter(|id| old.devices.get(id) != fresh.devices.get(id))
            .collect();
        prop_assert_eq!(&changed, &want);
        for (id, acc) in &carried.devices {
            if changed.contains(id) {
                continue;
            }
            let before = &old.devices[id];
            for (a, b) in acc.inbound.iter().zip(before.inbound.iter()) {
                prop_assert!(Sources::ptr_eq(&a.sources, &b.sources), "device {id}: {a:?}");
            }
            for (a, b) in acc.reach.iter().zip(&before.reach) {
                prop_assert!(Arc::ptr_eq(a, b), "device {id}: {a:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One device's reach worked out alone is what the whole compile gives it, on random
    /// policies (grants, quarantine, posture, expiry, unbound names, devices not live).
    #[test]
    fn one_devices_reach_alone_is_the_compiles((src, d) in world()) {
        let p = parse(src.as_bytes(), "p.toml").unwrap();
        let c = compile(&p, &d, NOW);
        for x in &d.devices {
            let want = c.devices.get(&x.id).map(|a| a.reach_flat(x.id)).unwrap_or_default();
            prop_assert_eq!(reach_of(&p, &d, x.id, NOW), want, "device {}", x.id);
        }
        prop_assert!(reach_of(&p, &d, DeviceId(999), NOW).is_empty());
    }
}
