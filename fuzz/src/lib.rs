//! Fuzz target bodies: one function per parser that reads bytes from the network or a file.
//!
//! Each body feeds arbitrary bytes to a parser and checks what must hold whatever the input:
//! no panic, bounded buffers, and for anything signed, that nothing but the signer's own output
//! verifies. `fuzz_targets/*.rs` hand them to libFuzzer (`cargo +nightly fuzz run NAME`);
//! `tests/tests/fuzz_corpus.rs` includes this file and replays `fuzz/corpus/NAME/*` through the
//! same functions on the stable toolchain, so CI keeps every input the fuzzers found.
//!
//! Only public APIs are used, so this file compiles both as the `ward-fuzz` crate and as a
//! module of the test crate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ward_shared::discovery::{BindingRequest, BindingResponse};
use ward_shared::filter::{Filter, FilterRule, PortRange, Proto};
use ward_shared::lease::SignedLease;
use ward_shared::names::{Hostname, Name};
use ward_shared::policy::{self, DirDevice, DirUser, Directory, Policy};
use ward_shared::posture::PostureReport;
use ward_shared::relay::{
    encode_datagram, split_datagram, CoordinatorToRelay, DeviceToRelay, RelayCredential,
    RelayToCoordinator, RelayToDevice, SignedTicket,
};
use ward_shared::resume;
use ward_shared::token::EnrollToken;
use ward_shared::wire::{self, CoordinatorMsg, DeviceId, DeviceMsg, FrameDecoder};

/// Coordinator time the bodies evaluate at (2026-12-01).
const NOW_MS: i64 = 1_796_083_200_000;
/// Largest frame the control-frame body accepts (small, so the fuzzer reaches the limit).
const FRAME_MAX: usize = 4096;

/// The signing key of the "coordinator" whose leases and tickets the bodies verify.
fn issuer() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// Control-channel frames (device ↔ coordinator), arriving in pieces: the first byte sets
/// the piece size. Every frame body is decoded as a device and as a coordinator message;
/// whatever decodes must encode and decode again.
pub fn control_frames(data: &[u8]) {
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let mut dec = FrameDecoder::new(FRAME_MAX);
    for chunk in rest.chunks(usize::from(piece).max(1)) {
        // A reader asks for at most `wanted()` bytes; the body honours that bound.
        let mut chunk = chunk;
        while !chunk.is_empty() {
            let want = dec.wanted();
            assert!(want >= 1, "the decoder must always want progress");
            let (now, later) = chunk.split_at(want.min(chunk.len()));
            dec.push(now);
            chunk = later;
            loop {
                match dec.next_frame() {
                    Ok(Some(body)) => {
                        assert!(body.len() <= FRAME_MAX, "frame over the limit");
                        control_body(&body);
                    }
                    Ok(None) => break,
                    // An oversized frame ends the stream, as on a real connection.
                    Err(_) => return,
                }
            }
        }
    }
    let _ = dec.finish();
    control_body(rest);
}

fn control_body(body: &[u8]) {
    if let Ok(m) = wire::decode::<DeviceMsg>(body) {
        let again = wire::encode(&m);
        wire::decode::<DeviceMsg>(&again[4..]).expect("a re-encoded device message decodes");
        // The coordinator's side of a resume, on any holding a device sends.
        if let DeviceMsg::Hello(h) = &m {
            if let Some(holding) = &h.holding {
                let mut peers = resume_peers();
                if let Ok(Some(r)) = resume::resume(&mut peers, holding, resume::peer_digest) {
                    assert!(
                        r.sent.len() <= r.buckets as usize,
                        "more buckets sent than held"
                    );
                }
            }
        }
    }
    let derived = wire::decode::<CoordinatorMsg>(body);
    assert_eq!(
        wire::decode_coordinator_msg(body),
        derived,
        "both coordinator-message decoders answer alike"
    );
    if let Ok(m) = derived {
        let again = wire::encode(&m);
        wire::decode::<CoordinatorMsg>(&again[4..])
            .expect("a re-encoded coordinator message decodes");
        // The device's side of a resume, on any resumed netmap a coordinator sends.
        if let CoordinatorMsg::Netmap(nm) = m {
            if let Some(r) = &nm.resumed {
                let held = resume_peers();
                let asked = resume::Holding::of(&held).count().ok();
                if let Ok(all) = resume::merge(&held, nm.peers, r, asked) {
                    assert!(
                        all.windows(2).all(|w| w[0].device_id < w[1].device_id),
                        "a merged peer list is sorted and without duplicates"
                    );
                }
            }
        }
    }
}

/// The peers a fuzzed resume runs against (one bucket each of eight).
fn resume_peers() -> Vec<wire::Peer> {
    (2..10u8).map(|i| peer(i, &format!("d{i}"))).collect()
}

/// An online peer with overlay addresses ending in `i`.
fn peer(i: u8, hostname: &str) -> wire::Peer {
    wire::Peer {
        device_id: DeviceId(i.into()),
        hostname: Hostname::parse(hostname).expect("a valid name"),
        user: None,
        tags: vec![],
        ipv4: Ipv4Addr::new(100, 64, 0, i),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i.into()),
        wg_public_key: None,
        endpoints: vec![],
        online: true,
        leases: vec![],
        relay: None,
        routes: vec![],
    }
}

/// What a relay reads: device frames, coordinator control frames, relayed datagrams, address
/// discovery, and tickets (which only the issuer can sign).
pub fn relay_protocol(data: &[u8]) {
    let _ = wire::decode::<DeviceToRelay>(data);
    let _ = wire::decode::<RelayToDevice>(data);
    let _ = wire::decode::<RelayToCoordinator>(data);
    let _ = wire::decode::<CoordinatorToRelay>(data);
    if let Some((id, body)) = split_datagram(data) {
        assert_eq!(
            encode_datagram(id, body),
            data,
            "datagram header round trip"
        );
    }
    let _ = BindingRequest::decode(data);
    if let Ok(r) = BindingResponse::decode(data) {
        assert_eq!(
            BindingResponse::decode(&r.encode()),
            Ok(r),
            "binding response"
        );
    }
    if let Ok(t) = wire::decode::<SignedTicket>(data) {
        let key = issuer();
        let at = t.ticket.not_before_ms;
        if t.verify(&key.verifying_key(), at).is_ok() {
            // Ed25519 is deterministic: a ticket verifies only if it is the issuer's own.
            assert_eq!(
                t.ticket.clone().sign(&key),
                t,
                "a ticket verified without the key"
            );
        }
        let _ = t.verify_for(&key.verifying_key(), at, &[0u8; 32]);
    }
}

/// Strings people paste or type: enrollment tokens, relay credentials, durations, names.
pub fn tokens_and_names(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(t) = EnrollToken::parse(&s) {
        assert!(EnrollToken::parse(&t.encode()) == Ok(t), "token round trip");
    }
    if let Ok(c) = RelayCredential::parse(&s) {
        assert_eq!(
            RelayCredential::parse(&c.encode()),
            Ok(c),
            "credential round trip"
        );
    }
    let _ = ward_shared::duration::parse(&s);
    if let Ok(h) = Hostname::sanitize(&s) {
        assert!(
            Hostname::parse(h.as_str()).is_ok(),
            "a sanitized hostname parses"
        );
    }
    if let Ok(n) = Name::parse("user", &s) {
        assert_eq!(n.as_str(), s, "names are never rewritten");
    }
}

/// A policy file: parse, and when it parses, compile it and run its tests against a small
/// directory.
pub fn policy(data: &[u8]) {
    let Ok(p) = policy::parse(data, "fuzz.toml") else {
        return;
    };
    let d = directory();
    let _ = policy::compile(&p, &d, NOW_MS);
    let _ = policy::run_tests(&p, &d, NOW_MS);
}

fn directory() -> Directory {
    let dev = |id: u64, host: &str, user: Option<&str>, tags: &[&str]| DirDevice {
        id: DeviceId(id),
        hostname: host.into(),
        user: user.map(Into::into),
        tags: tags.iter().map(|t| (*t).into()).collect(),
        ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
        live: true,
        posture_passed: Default::default(),
        posture_failures: Default::default(),
        quarantined: false,
        name_bound: true,
    };
    Directory {
        users: vec![
            DirUser {
                name: "alice".into(),
                groups: vec!["eng".into()],
                disabled: false,
                suspended: None,
            },
            DirUser {
                name: "bob".into(),
                groups: vec![],
                disabled: true,
                suspended: None,
            },
        ],
        devices: vec![
            dev(1, "laptop", Some("alice"), &[]),
            dev(2, "db", None, &["db", "server"]),
            dev(3, "bob-pc", Some("bob"), &[]),
        ],
        grants: vec![],
    }
}

/// A posture report as the coordinator receives it, evaluated against every check kind.
pub fn posture_report(data: &[u8]) {
    let Ok(report) = wire::decode::<PostureReport>(data) else {
        return;
    };
    let p = posture_policy();
    for req in p.postures.values() {
        let _ = ward_shared::posture::evaluate(req, Some(&report), NOW_MS);
    }
}

fn posture_policy() -> Policy {
    const SRC: &str = r#"
[posture.all]
os = ["debian>=12", "macos", "windows>=10.0.19045"]
firewall = true
disk_encryption = true
processes = ["osqueryd"]
files = [{ path = "/etc/ward/marker" }]
min_ward_version = "0.1.0"
max_report_age = "10m"
screen_lock = true
max_package_age = "7d"
kernel = ">=6.1"
custom.edr = true
custom.av = { version = 3, state = "on" }
"#;
    // The text above is a fixed, valid policy: a parse failure is a bug the replay test shows.
    policy::parse(SRC.as_bytes(), "posture.toml").expect("the posture policy parses")
}

/// Inner IP packets through the stateful filter, both ways. The first byte of each record
/// picks the direction and a time step, the second its length.
pub fn packets(data: &[u8]) {
    let peer4 = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2));
    let peer6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));
    let max_flows = 32;
    let mut f = Filter::with_seed(max_flows, 1);
    f.set_rules(vec![
        FilterRule {
            dests: Default::default(),
            rule: "ssh".into(),
            service: "ssh".into(),
            sources: vec![peer4, peer6].into(),
            source_sets: Vec::new(),
            proto: Proto::Tcp,
            ports: vec![PortRange { lo: 22, hi: 22 }],
            not_after_ms: None,
        },
        FilterRule {
            dests: Default::default(),
            rule: "dns".into(),
            service: "dns".into(),
            sources: vec![peer4].into(),
            source_sets: Vec::new(),
            proto: Proto::Udp,
            ports: vec![PortRange { lo: 53, hi: 53 }],
            not_after_ms: Some(NOW_MS + 1),
        },
        FilterRule {
            dests: Default::default(),
            rule: "ping".into(),
            service: "ping".into(),
            sources: vec![peer6].into(),
            source_sets: Vec::new(),
            proto: Proto::Icmp,
            ports: vec![],
            not_after_ms: None,
        },
    ]);
    let start = Instant::now();
    let mut now = start;
    let mut rest = data;
    while let [ctl, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (pkt, after) = tail.split_at(n);
        rest = after;
        now += Duration::from_millis(u64::from(ctl >> 1) * 500);
        if ctl & 1 == 0 {
            f.handle_outbound(pkt, now);
        } else {
            let _ = f.check_inbound(pkt, now, NOW_MS + (now - start).as_millis() as i64);
        }
        assert!(f.flow_count() <= max_flows, "flow table over its cap");
        f.expire(now);
    }
    let _ = f.take_denied();
    let _ = f.counters();
}

/// The device's state file.
pub fn state_file(data: &[u8]) {
    if let Ok(st) = ward_client::state::State::parse(data) {
        let again = serde_json::to_vec(&st).expect("a parsed state serializes");
        assert!(
            ward_client::state::State::parse(&again).is_ok(),
            "a re-serialized state parses"
        );
    }
}

/// What an enrolling device or a relay sends the coordinator's CA: a certificate request, and
/// certificates whose identity the coordinator reads.
pub fn enrollment_csr(data: &[u8]) {
    let _ = ward_coordinator::pki::Ca::csr_identity(data);
    let _ = ward_coordinator::pki::cert_identity(data);
}

/// Leases as peers receive them: only the issuer's own signature verifies.
pub fn lease(data: &[u8]) {
    let Ok(l) = wire::decode::<SignedLease>(data) else {
        return;
    };
    let key = issuer();
    let at = l.lease.not_before_ms;
    if l.verify(&key.verifying_key(), at).is_ok() {
        assert_eq!(
            l.lease.clone().sign(&key),
            l,
            "a lease verified without the key"
        );
    }
    let _ = l.verify_for(
        &key.verifying_key(),
        at,
        l.lease.device_id,
        l.lease.ipv4,
        l.lease.ipv6,
    );
    let _ = ward_shared::lease::issuer_key(&data[..data.len().min(32)]);
}

/// DNS messages at the device's resolver: as a query from any local client (UDP and TCP) and
/// as an upstream's reply. Whatever arrives, nothing panics, every reply is a bounded message
/// carrying the query's id, and nothing unreadable is forwarded.
pub fn dns_query(data: &[u8]) {
    use ward_client::dns::{Action, Resolver, Transport, Zone, MAX_MESSAGE};
    use ward_shared::wire::{Netmap, Reach, SelfInfo};
    let peer = peer(2, "db1");
    let nm = Netmap {
        on_demand: false,
        resumed: None,
        seq: 1,
        me: SelfInfo {
            device_id: DeviceId(1),
            hostname: Hostname::parse("me").expect("a valid name"),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
            v6_prefix: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0),
            observed_addr: None,
            routes: vec![],
        },
        reach: vec![Reach {
            service: "db".into(),
            device_id: DeviceId(2),
            hostname: peer.hostname.clone(),
            proto: Proto::Tcp,
            ports: vec![],
            rule: "r".into(),
            not_after_ms: None,
        }],
        peers: vec![peer],
        inbound: vec![].into(),
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
    };
    let upstream: std::net::SocketAddr = (Ipv4Addr::new(192, 0, 2, 53), 53).into();
    let mut r: Resolver<u8> = Resolver::new(Zone::from_netmap(&nm), vec![upstream]);
    let now = Instant::now();
    for t in [Transport::Udp, Transport::Tcp] {
        let (action, back) = r.handle_query(data, 0, t, now, 7);
        match action {
            Action::Reply(b) => {
                assert!(
                    b.len() >= 12 && b.len() <= MAX_MESSAGE,
                    "reply size {}",
                    b.len()
                );
                assert_eq!(b[..2], data[..2], "a reply carries the query's id");
                assert_eq!(b[2] & 0x80, 0x80, "a reply is a response");
                assert!(back.is_some());
            }
            Action::Forward { bytes, .. } => {
                assert_eq!(bytes.len(), data.len());
                assert!(back.is_none());
            }
            Action::Drop(_) => assert!(back.is_some()),
            Action::Held => assert!(r.zone().on_demand(), "a query held off demand"),
        }
    }
    let _ = r.handle_upstream(data, upstream);
    for (_, b) in r.handle_timeout(now + Duration::from_secs(60)) {
        assert!(b.len() >= 12);
    }
}
