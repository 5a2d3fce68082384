#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;
use hickory_proto::op::Edns;
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use std::net::IpAddr;
use std::str::FromStr;
use ward_shared::filter::Proto;
use ward_shared::names::Hostname;
use ward_shared::wire::{DeviceId, Peer, Reach, SelfInfo};

const UPSTREAM: &str = "192.0.2.53:53";

fn ip4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, 0, n)
}
fn ip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n)
}

fn peer(n: u8, name: &str) -> Peer {
    Peer {
        device_id: DeviceId(n.into()),
        hostname: Hostname::parse(name).unwrap(),
        user: None,
        tags: vec![],
        ipv4: ip4(n),
        ipv6: ip6(n.into()),
        wg_public_key: None,
        endpoints: vec![],
        online: true,
        leases: vec![],
        relay: None,
        routes: vec![],
    }
}

fn reach(service: &str, n: u8, name: &str) -> Reach {
    Reach {
        service: service.into(),
        device_id: DeviceId(n.into()),
        hostname: Hostname::parse(name).unwrap(),
        proto: Proto::Tcp,
        ports: vec![],
        rule: "r".into(),
        not_after_ms: None,
    }
}

/// This device `me` (1); it may reach `db1` (2) and `db2` (3) as service `db` and `web` (4)
/// as service `web`; `admin` (5) may reach this device, but this device may not reach it.
fn netmap() -> Netmap {
    Netmap {
        resumed: None,
        seq: 1,
        me: SelfInfo {
            device_id: DeviceId(1),
            hostname: Hostname::parse("me").unwrap(),
            ipv4: ip4(1),
            ipv6: ip6(1),
            v6_prefix: "fd00::".parse().unwrap(),
            observed_addr: None,
            routes: vec![],
        },
        peers: vec![
            peer(2, "db1"),
            peer(3, "db2"),
            peer(4, "web"),
            peer(5, "admin"),
        ],
        inbound: vec![].into(),
        reach: vec![
            reach("db", 2, "db1"),
            reach("db", 3, "db2"),
            reach("web", 4, "web"),
        ],
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

fn resolver() -> Resolver<u32> {
    Resolver::new(
        Zone::from_netmap(&netmap()),
        vec![UPSTREAM.parse().unwrap()],
    )
}

fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

/// The action alone; checks the client comes back exactly when the query was neither
/// forwarded nor held.
fn hq(r: &mut Resolver<u32>, b: &[u8], c: u32, t: Transport, now: Instant, id: u16) -> Action {
    let (a, back) = r.handle_query(b, c, t, now, id);
    assert_eq!(
        back.is_none(),
        matches!(a, Action::Forward { .. } | Action::Held),
        "{a:?}"
    );
    a
}

fn ask(r: &mut Resolver<u32>, name: &str, t: RecordType) -> Message {
    match hq(r, &query(7, name, t), 1, Transport::Udp, Instant::now(), 99) {
        Action::Reply(b) => Message::from_vec(&b).unwrap(),
        other => panic!("{name}: {other:?}"),
    }
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn own_name_resolves_to_own_addresses() {
    let mut r = resolver();
    let m = ask(&mut r, "me.ward.internal.", RecordType::A);
    assert_eq!(m.id(), 7);
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative());
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip4(1))]);
    assert_eq!(m.answers()[0].ttl(), TTL_SECS);
    let m = ask(&mut r, "me.ward.internal.", RecordType::AAAA);
    assert_eq!(addrs(&m), vec![IpAddr::V6(ip6(1))]);
}

#[test]
fn a_reachable_peer_resolves_in_both_families() {
    let mut r = resolver();
    let m = ask(&mut r, "db1.ward.internal.", RecordType::A);
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip4(2))]);
    let m = ask(&mut r, "web.ward.internal.", RecordType::AAAA);
    assert_eq!(addrs(&m), vec![IpAddr::V6(ip6(4))]);
}

#[test]
fn a_service_name_resolves_to_the_devices_this_device_may_reach() {
    let mut r = resolver();
    let m = ask(&mut r, "db.ward.internal.", RecordType::A);
    assert_eq!(
        addrs(&m),
        vec![IpAddr::V4(ip4(2)), IpAddr::V4(ip4(3))],
        "both devices of the service"
    );
    let m = ask(&mut r, "db.ward.internal.", RecordType::AAAA);
    assert_eq!(addrs(&m).len(), 2);
}

#[test]
fn a_peer_this_device_may_not_reach_is_nxdomain() {
    let mut r = resolver();
    // `admin` is in the netmap (it may reach this device) but not in `reach`.
    for name in [
        "admin.ward.internal.",
        "nobody.ward.internal.",
        "a.b.ward.internal.",
    ] {
        let m = ask(&mut r, name, RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
        assert!(m.answers().is_empty(), "{name}");
    }
}

#[test]
fn a_revoked_reach_removes_the_name_at_the_next_netmap() {
    let mut r = resolver();
    let mut nm = netmap();
    nm.reach.retain(|x| x.device_id != DeviceId(4));
    assert!(
        r.set_zone(Zone::from_netmap(&nm)).is_empty(),
        "nothing held"
    );
    for name in ["web.ward.internal.", "WEB.ward.internal."] {
        let m = ask(&mut r, name, RecordType::A);
        assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
    }
}

#[test]
fn names_match_case_insensitively() {
    let mut r = resolver();
    let m = ask(&mut r, "DB1.Ward.INTERNAL.", RecordType::A);
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip4(2))]);
    // The question is echoed as asked.
    assert_eq!(m.queries()[0].name().to_string(), "DB1.Ward.INTERNAL.");
}

#[test]
fn other_types_of_a_known_name_are_nodata_and_the_apex_exists() {
    let mut r = resolver();
    let m = ask(&mut r, "db1.ward.internal.", RecordType::MX);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    let m = ask(&mut r, "ward.internal.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn the_domain_comes_from_the_netmap() {
    let mut nm = netmap();
    nm.dns_domain = Some(DnsDomain::parse("corp.example").unwrap());
    let mut r: Resolver<u32> = Resolver::new(Zone::from_netmap(&nm), vec![]);
    let m = ask(&mut r, "me.corp.example.", RecordType::A);
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip4(1))]);
    // The default domain is just another name now: forwarded, and with no upstream, SERVFAIL.
    let m = ask(&mut r, "me.ward.internal.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
}

#[test]
fn a_service_name_wins_over_a_device_with_the_same_name() {
    let mut nm = netmap();
    nm.peers.push(peer(6, "db"));
    nm.reach.push(reach("ssh", 6, "db"));
    let z = Zone::from_netmap(&nm);
    let Lookup::Found(a) = z.lookup(&Name::from_str("db.ward.internal.").unwrap()) else {
        panic!("db not found")
    };
    assert_eq!(a.v4, vec![ip4(2), ip4(3)]);
}

#[test]
fn other_names_are_forwarded_and_the_answer_goes_back_to_the_client() {
    let mut r = resolver();
    let now = Instant::now();
    let q = query(0x1234, "example.org.", RecordType::A);
    let Action::Forward { upstream, bytes } = hq(&mut r, &q, 42, Transport::Udp, now, 0xbeef)
    else {
        panic!("not forwarded")
    };
    assert_eq!(upstream, UPSTREAM.parse().unwrap());
    assert_eq!(&bytes[..2], &0xbeefu16.to_be_bytes());
    assert_eq!(&bytes[2..], &q[2..], "forwarded unchanged but for the id");
    assert_eq!(r.in_flight(), 1);

    // The upstream answers.
    let mut ans = Message::from_vec(&bytes).unwrap();
    ans.set_message_type(MessageType::Response);
    ans.add_answer(Record::from_rdata(
        Name::from_str("example.org.").unwrap(),
        60,
        RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
    ));
    let ans = ans.to_vec().unwrap();
    // From somewhere else: ignored.
    assert!(r
        .handle_upstream(&ans, "192.0.2.99:53".parse().unwrap())
        .is_none());
    let (client, out) = r.handle_upstream(&ans, upstream).unwrap();
    assert_eq!(client, 42);
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.id(), 0x1234);
    assert_eq!(addrs(&m), vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))]);
    assert_eq!(r.in_flight(), 0);
    // A replay finds nothing.
    assert!(r.handle_upstream(&ans, upstream).is_none());
}

#[test]
fn an_upstream_answer_to_another_question_is_ignored() {
    let mut r = resolver();
    let now = Instant::now();
    let q = query(1, "example.org.", RecordType::A);
    let Action::Forward { upstream, bytes } = hq(&mut r, &q, 1, Transport::Udp, now, 5) else {
        panic!("not forwarded")
    };
    let mut forged = Message::from_vec(&query(5, "evil.example.", RecordType::A)).unwrap();
    forged.set_message_type(MessageType::Response);
    assert!(r
        .handle_upstream(&forged.to_vec().unwrap(), upstream)
        .is_none());
    // A query (QR clear) with the right id is no answer either.
    assert!(r.handle_upstream(&bytes, upstream).is_none());
    assert_eq!(r.in_flight(), 1);
}

#[test]
fn forwarded_queries_time_out_with_servfail() {
    let mut r = resolver();
    let now = Instant::now();
    let _ = hq(
        &mut r,
        &query(9, "example.org.", RecordType::A),
        3,
        Transport::Udp,
        now,
        1,
    );
    assert_eq!(r.poll_timeout(), Some(now + FORWARD_TIMEOUT));
    assert!(r.handle_timeout(now + FORWARD_TIMEOUT / 2).is_empty());
    let out = r.handle_timeout(now + FORWARD_TIMEOUT);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, 3);
    let m = Message::from_vec(&out[0].1).unwrap();
    assert_eq!(m.id(), 9);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert_eq!(r.in_flight(), 0);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn the_forwarding_table_is_bounded() {
    let mut r = resolver();
    let now = Instant::now();
    let q = query(9, "example.org.", RecordType::A);
    for i in 0..MAX_IN_FLIGHT {
        let a = hq(&mut r, &q, 0, Transport::Udp, now, i as u16);
        assert!(matches!(a, Action::Forward { .. }));
    }
    assert_eq!(r.in_flight(), MAX_IN_FLIGHT);
    let Action::Reply(b) = hq(&mut r, &q, 0, Transport::Udp, now, 60000) else {
        panic!("a full table must answer")
    };
    assert_eq!(
        Message::from_vec(&b).unwrap().response_code(),
        ResponseCode::ServFail
    );
    // An id already in flight is refused too, never overwritten.
    let Action::Reply(_) = hq(&mut r, &q, 0, Transport::Udp, now, 0) else {
        panic!("a taken id must not forward")
    };
    assert_eq!(r.in_flight(), MAX_IN_FLIGHT);
}

#[test]
fn malformed_queries_get_formerr_or_nothing() {
    let mut r = resolver();
    let now = Instant::now();
    let good = query(0x0102, "me.ward.internal.", RecordType::A);
    // Too short for a header: nothing.
    assert_eq!(
        hq(&mut r, &good[..5], 0, Transport::Udp, now, 1),
        Action::Drop(DropReason::TooShort)
    );
    // Truncated question: FORMERR with the client's id.
    let Action::Reply(b) = hq(&mut r, &good[..good.len() - 3], 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    assert_eq!(&b[..2], &[1, 2]);
    assert_eq!(b[3] & 0x0f, ResponseCode::FormErr.low());
    // A compression pointer to itself (a loop): an error, answered FORMERR, no hang.
    let mut lp = good[..12].to_vec();
    lp.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
    let Action::Reply(b) = hq(&mut r, &lp, 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    assert_eq!(b[3] & 0x0f, ResponseCode::FormErr.low());
    // Oversized: nothing.
    let big = vec![0u8; MAX_MESSAGE + 1];
    assert_eq!(
        hq(&mut r, &big, 0, Transport::Tcp, now, 1),
        Action::Drop(DropReason::TooLarge)
    );
    // A response is never answered.
    let mut resp = good.clone();
    resp[2] |= 0x80;
    assert_eq!(
        hq(&mut r, &resp, 0, Transport::Udp, now, 1),
        Action::Drop(DropReason::NotAQuery)
    );
    // Two questions: FORMERR.
    let mut two = Message::from_vec(&good).unwrap();
    two.add_query(Query::query(
        Name::from_str("db1.ward.internal.").unwrap(),
        RecordType::A,
    ));
    let Action::Reply(b) = hq(&mut r, &two.to_vec().unwrap(), 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    assert_eq!(b[3] & 0x0f, ResponseCode::FormErr.low());
    // Not a standard query: NOTIMP.
    let mut upd = Message::from_vec(&good).unwrap();
    upd.set_op_code(OpCode::Update);
    let Action::Reply(b) = hq(&mut r, &upd.to_vec().unwrap(), 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    assert_eq!(b[3] & 0x0f, ResponseCode::NotImp.low());
    assert_eq!(r.in_flight(), 0, "nothing malformed is forwarded");
}

#[test]
fn a_large_answer_is_truncated_for_a_plain_udp_client() {
    let mut nm = netmap();
    nm.peers = (10..60).map(|n| peer(n, &format!("s{n}"))).collect();
    nm.reach = (10..60)
        .map(|n| reach("big", n, &format!("s{n}")))
        .collect();
    let mut r: Resolver<u32> = Resolver::new(Zone::from_netmap(&nm), vec![]);
    let now = Instant::now();
    let q = query(3, "big.ward.internal.", RecordType::AAAA);
    let Action::Reply(b) = hq(&mut r, &q, 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    let m = Message::from_vec(&b).unwrap();
    assert!(m.truncated(), "{} bytes", b.len());
    assert!(b.len() <= 512);
    // Over TCP the whole answer (capped at MAX_ADDRESSES).
    let Action::Reply(b) = hq(&mut r, &q, 0, Transport::Tcp, now, 1) else {
        panic!("no reply")
    };
    let m = Message::from_vec(&b).unwrap();
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), MAX_ADDRESSES);
    // With EDNS saying 4096, over UDP too.
    let mut e = Message::from_vec(&q).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    e.set_edns(edns);
    let Action::Reply(b) = hq(&mut r, &e.to_vec().unwrap(), 0, Transport::Udp, now, 1) else {
        panic!("no reply")
    };
    assert!(!Message::from_vec(&b).unwrap().truncated());
}

#[test]
fn log_lines_are_rate_bounded() {
    let mut l = LogLimiter::new(Duration::from_secs(10), 3);
    let t = Instant::now();
    assert_eq!(l.allow(t), Some(0));
    assert_eq!(l.allow(t), Some(0));
    assert_eq!(l.allow(t), Some(0));
    for _ in 0..100 {
        assert_eq!(l.allow(t + Duration::from_secs(1)), None);
    }
    assert_eq!(l.allow(t + Duration::from_secs(10)), Some(100));
    assert_eq!(l.allow(t + Duration::from_secs(10)), Some(0));
}

proptest! {
    /// Whatever arrives on port 53 or from an upstream, nothing panics and every reply is
    /// itself a readable DNS message no larger than the bound.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), id in any::<u16>(), on_demand in any::<bool>()) {
        let mut r = if on_demand { on_demand_resolver(&[]) } else { resolver() };
        let now = Instant::now();
        match hq(&mut r, &bytes, 0, Transport::Udp, now, id) {
            Action::Reply(b) => prop_assert!(b.len() <= MAX_MESSAGE && b.len() >= 12),
            Action::Forward { bytes: b, .. } => prop_assert_eq!(b.len(), bytes.len()),
            Action::Held => prop_assert!(on_demand),
            Action::Drop(_) => {}
        }
        let _ = r.handle_upstream(&bytes, UPSTREAM.parse().unwrap());
        // Whatever was held is answered with a readable message.
        let mut out = r.set_zone(Zone::from_netmap(&on_demand_netmap(&[(2, "db1")])));
        out.extend(r.handle_timeout(now + FORWARD_TIMEOUT));
        for (_, b) in out {
            prop_assert!(Message::from_vec(&b).is_ok());
        }
        prop_assert_eq!(r.held(), 0);
    }

    /// Random names under the domain and outside it: answered or forwarded, never dropped.
    #[test]
    fn random_names_are_answered_or_forwarded(label in "[a-zA-Z0-9]([a-zA-Z0-9-]{0,38}[a-zA-Z0-9])?", under in any::<bool>(), on_demand in any::<bool>()) {
        let mut r = if on_demand { on_demand_resolver(&[]) } else { resolver() };
        let name = if under { format!("{label}.ward.internal.") } else { format!("{label}.example.") };
        let a = hq(&mut r, &query(1, &name, RecordType::A), 0, Transport::Udp, Instant::now(), 2);
        match a {
            Action::Reply(_) => prop_assert!(under),
            Action::Forward { .. } => prop_assert!(!under),
            // Held exactly when on demand and not a name the zone has.
            Action::Held => {
                prop_assert!(under && on_demand && !label.eq_ignore_ascii_case("me"));
                prop_assert_eq!(r.take_wants(), vec![Label::parse(&label).unwrap()]);
            }
            Action::Drop(d) => prop_assert!(false, "dropped: {d}"),
        }
    }
}

/// A version-3 netmap (reach as grants over destination lists) gives the same zone as the
/// same reach listed flat.
#[test]
fn reach_by_reference_gives_the_same_zone_as_the_flat_list() {
    use ward_shared::wire::{ReachGrant, ReachService};
    let flat = netmap();
    let mut v3 = flat.clone();
    v3.reach.clear();
    v3.reach_grants = ["db", "web"]
        .map(|service| ReachGrant {
            service: service.into(),
            proto: Proto::Tcp,
            ports: vec![],
            rule: "r".into(),
            not_after_ms: None,
        })
        .to_vec();
    // This device is one of web's devices: it never reaches itself.
    v3.reach_services = vec![
        ReachService {
            service: "db".into(),
            devices: vec![DeviceId(2), DeviceId(3)],
        },
        ReachService {
            service: "web".into(),
            devices: vec![flat.me.device_id, DeviceId(4)],
        },
    ];
    let services = |nm: &Netmap| {
        nm.reach_view()
            .into_iter()
            .map(|r| (r.service, r.device_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(services(&v3), services(&flat));
    assert_eq!(Zone::from_netmap(&v3), Zone::from_netmap(&flat));
}

// ---- peers on demand ----------------------------------------------------------------------

/// [`netmap`] on demand, reach by reference: this device may reach `db1` (2) and `db2` (3) as
/// service `db` and `web` (4) as service `web`, but holds only the peers in `held`.
fn on_demand_netmap(held: &[(u8, &str)]) -> Netmap {
    use ward_shared::wire::{ReachGrant, ReachService};
    let mut nm = netmap();
    nm.on_demand = true;
    nm.reach.clear();
    nm.reach_grants = ["db", "web"]
        .map(|service| ReachGrant {
            service: service.into(),
            proto: Proto::Tcp,
            ports: vec![],
            rule: "r".into(),
            not_after_ms: None,
        })
        .to_vec();
    nm.reach_services = vec![
        ReachService {
            service: "db".into(),
            devices: vec![DeviceId(2), DeviceId(3)],
        },
        ReachService {
            service: "web".into(),
            devices: vec![DeviceId(4)],
        },
    ];
    nm.peers = held.iter().map(|(n, name)| peer(*n, name)).collect();
    nm
}

fn on_demand_resolver(held: &[(u8, &str)]) -> Resolver<u32> {
    Resolver::new(
        Zone::from_netmap(&on_demand_netmap(held)),
        vec![UPSTREAM.parse().unwrap()],
    )
}

fn label(s: &str) -> Label {
    Label::parse(s).unwrap()
}

fn held_query(r: &mut Resolver<u32>, id: u16, name: &str, t: RecordType, c: u32, now: Instant) {
    let a = hq(r, &query(id, name, t), c, Transport::Udp, now, 1);
    assert_eq!(a, Action::Held, "{name}");
}

fn nxdomain_at_once(r: &mut Resolver<u32>, name: &str, now: Instant) {
    let Action::Reply(b) = hq(r, &query(3, name, RecordType::A), 9, Transport::Udp, now, 1) else {
        panic!("{name}: not answered at once");
    };
    let m = Message::from_vec(&b).unwrap();
    assert_eq!(m.response_code(), ResponseCode::NXDomain, "{name}");
}

/// The replies by client, decoded.
fn replies(out: Vec<(u32, Vec<u8>)>) -> BTreeMap<u32, Message> {
    out.into_iter()
        .map(|(c, b)| (c, Message::from_vec(&b).unwrap()))
        .collect()
}

#[test]
fn on_demand_reach_to_devices_not_held_names_nothing() {
    let z = Zone::from_netmap(&on_demand_netmap(&[]));
    assert!(z.on_demand());
    assert_eq!(z.names().map(|(n, _)| n).collect::<Vec<_>>(), vec!["me"]);
    let z = Zone::from_netmap(&on_demand_netmap(&[(2, "db1")]));
    assert_eq!(
        z.names().map(|(n, _)| n).collect::<Vec<_>>(),
        vec!["db", "db1", "me"]
    );
    assert!(!Zone::from_netmap(&netmap()).on_demand());
}

#[test]
fn on_demand_an_unknown_name_is_held_wanted_once_and_answered_when_its_peer_arrives() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    // Known names answer at once, without a want.
    let m = ask(&mut r, "me.ward.internal.", RecordType::A);
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip4(1))]);
    assert!(r.take_wants().is_empty());

    held_query(&mut r, 7, "DB1.ward.internal.", RecordType::A, 1, now);
    assert_eq!(r.take_wants(), vec![label("db1")], "lowercase");
    held_query(&mut r, 8, "db1.ward.internal.", RecordType::AAAA, 2, now);
    held_query(&mut r, 9, "db.ward.internal.", RecordType::A, 3, now);
    assert_eq!(
        r.take_wants(),
        vec![label("db")],
        "db1 was asked for already"
    );
    assert_eq!(r.held(), 3);
    // The next thing due: asking again for a name still held a want interval on.
    assert_eq!(r.poll_timeout(), Some(now + WANT_INTERVAL));

    // A delta that brings another peer answers nothing.
    assert!(r
        .set_zone(Zone::from_netmap(&on_demand_netmap(&[(4, "web")])))
        .is_empty());
    assert_eq!(r.held(), 3);
    // The one that brings db1: its queries are answered at once, in the family asked for;
    // the service `db` now has db1 (the device of it this device holds).
    let out = replies(r.set_zone(Zone::from_netmap(&on_demand_netmap(&[
        (2, "db1"),
        (4, "web"),
    ]))));
    assert_eq!(out.len(), 3);
    assert_eq!(out[&1].id(), 7);
    assert_eq!(out[&1].response_code(), ResponseCode::NoError);
    assert_eq!(addrs(&out[&1]), vec![IpAddr::V4(ip4(2))]);
    assert_eq!(out[&2].id(), 8);
    assert_eq!(addrs(&out[&2]), vec![IpAddr::V6(ip6(2))]);
    assert_eq!(addrs(&out[&3]), vec![IpAddr::V4(ip4(2))]);
    assert_eq!(r.held(), 0);
    assert_eq!(r.poll_timeout(), None);
    assert!(r.handle_timeout(now + HOLD_TIMEOUT).is_empty());
}

#[test]
fn a_name_is_asked_for_again_only_after_the_want_interval() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    held_query(&mut r, 1, "db2.ward.internal.", RecordType::A, 1, now);
    assert_eq!(r.take_wants(), vec![label("db2")]);
    let almost = now + WANT_INTERVAL - Duration::from_millis(1);
    held_query(&mut r, 2, "db2.ward.internal.", RecordType::A, 2, almost);
    assert!(r.take_wants().is_empty());
    held_query(
        &mut r,
        3,
        "db2.ward.internal.",
        RecordType::A,
        3,
        now + WANT_INTERVAL,
    );
    assert_eq!(r.take_wants(), vec![label("db2")]);
}

#[test]
fn a_held_query_gets_nxdomain_after_the_hold_timeout_and_not_before() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    held_query(&mut r, 7, "db2.ward.internal.", RecordType::A, 1, now);
    let later = now + Duration::from_millis(500);
    held_query(&mut r, 8, "web.ward.internal.", RecordType::AAAA, 2, later);
    // First due: asking for db2 again (still held a want interval on).
    assert_eq!(r.poll_timeout(), Some(now + WANT_INTERVAL));
    assert!(r
        .handle_timeout(now + HOLD_TIMEOUT - Duration::from_millis(1))
        .is_empty());
    let out = replies(r.handle_timeout(now + HOLD_TIMEOUT));
    assert_eq!(out.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(out[&1].id(), 7);
    assert_eq!(out[&1].response_code(), ResponseCode::NXDomain);
    assert_eq!(r.held(), 1);
    assert_eq!(r.poll_timeout(), Some(later + HOLD_TIMEOUT));
    let out = replies(r.handle_timeout(later + HOLD_TIMEOUT));
    assert_eq!(out[&2].response_code(), ResponseCode::NXDomain);
    assert_eq!(r.held(), 0);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn a_refused_name_is_nxdomain_at_once_and_not_wanted_for_a_while() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    held_query(&mut r, 7, "admin.ward.internal.", RecordType::A, 1, now);
    held_query(&mut r, 8, "admin.ward.internal.", RecordType::A, 2, now);
    held_query(&mut r, 9, "web.ward.internal.", RecordType::A, 3, now);
    assert_eq!(r.take_wants(), vec![label("admin"), label("web")]);
    let out = replies(r.handle_refusal(&label("admin"), now));
    assert_eq!(out.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert!(out
        .values()
        .all(|m| m.response_code() == ResponseCode::NXDomain));
    assert_eq!(r.held(), 1, "web still waits");

    let soon = now + REFUSAL_HOLD - Duration::from_millis(1);
    nxdomain_at_once(&mut r, "admin.ward.internal.", now + WANT_INTERVAL);
    nxdomain_at_once(&mut r, "ADMIN.ward.internal.", soon);
    assert!(r.take_wants().is_empty(), "no want while refused");
    held_query(
        &mut r,
        10,
        "admin.ward.internal.",
        RecordType::A,
        4,
        now + REFUSAL_HOLD,
    );
    assert_eq!(r.take_wants(), vec![label("admin")]);

    // A refusal takes back a want not taken yet.
    held_query(
        &mut r,
        11,
        "db2.ward.internal.",
        RecordType::A,
        5,
        now + REFUSAL_HOLD,
    );
    let out = replies(r.handle_refusal(&label("db2"), now + REFUSAL_HOLD));
    assert_eq!(out.keys().copied().collect::<Vec<_>>(), vec![5]);
    assert!(r.take_wants().is_empty());
    // Refusing a name nothing waits for answers nothing and still stands.
    assert!(r.handle_refusal(&label("nobody"), now).is_empty());
    nxdomain_at_once(&mut r, "nobody.ward.internal.", now);
}

#[test]
fn held_queries_are_bounded_per_name_and_in_all() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    for i in 0..MAX_HELD_PER_NAME as u32 {
        held_query(&mut r, 1, "db2.ward.internal.", RecordType::A, i, now);
    }
    nxdomain_at_once(&mut r, "db2.ward.internal.", now);
    assert_eq!(r.held(), MAX_HELD_PER_NAME);
    let names = MAX_HELD / MAX_HELD_PER_NAME;
    for n in 1..names {
        for i in 0..MAX_HELD_PER_NAME {
            let name = format!("n{n}.ward.internal.");
            held_query(&mut r, 1, &name, RecordType::A, (n * 100 + i) as u32, now);
        }
    }
    assert_eq!(r.held(), MAX_HELD);
    nxdomain_at_once(&mut r, "another.ward.internal.", now);
    assert_eq!(r.held(), MAX_HELD);
    // Room again once some are answered.
    assert_eq!(
        r.handle_refusal(&label("db2"), now).len(),
        MAX_HELD_PER_NAME
    );
    held_query(&mut r, 1, "another.ward.internal.", RecordType::A, 1, now);
}

#[test]
fn names_are_asked_for_at_most_so_many_a_second_in_all() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    // Taken as the driver takes them (after each query): the rate, not the list waiting to be
    // taken, is what stops them.
    let mut wants = Vec::new();
    for n in 0..100 {
        held_query(
            &mut r,
            1,
            &format!("n{n}.ward.internal."),
            RecordType::A,
            n,
            now,
        );
        wants.extend(r.take_wants());
    }
    assert_eq!(wants.len(), WANTS_PER_SEC as usize);
    assert_eq!(wants[0], label("n0"));
    // The next second, a name that got no want is asked for at its next query.
    let next = now + Duration::from_secs(1);
    held_query(&mut r, 1, "n99.ward.internal.", RecordType::A, 1, next);
    assert_eq!(r.take_wants(), vec![label("n99")]);
}

#[test]
fn not_on_demand_an_unknown_name_is_nxdomain_at_once_as_before() {
    let mut r = resolver();
    let now = Instant::now();
    nxdomain_at_once(&mut r, "db9.ward.internal.", now);
    assert!(r.take_wants().is_empty());
    assert_eq!(r.held(), 0);
    assert_eq!(r.poll_timeout(), None);
}

#[test]
fn on_demand_only_one_label_under_the_domain_is_held_and_other_names_are_forwarded() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    nxdomain_at_once(&mut r, "a.b.ward.internal.", now);
    nxdomain_at_once(&mut r, "x_y.ward.internal.", now);
    let a = hq(
        &mut r,
        &query(5, "example.org.", RecordType::A),
        4,
        Transport::Udp,
        now,
        77,
    );
    assert!(matches!(a, Action::Forward { .. }), "{a:?}");
    assert_eq!(r.in_flight(), 1);
    // The apex exists: NODATA at once.
    let m = ask(&mut r, "ward.internal.", RecordType::A);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(r.take_wants().is_empty());
    assert_eq!(r.held(), 0);
}

#[test]
fn leaving_on_demand_answers_every_held_query() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    held_query(&mut r, 7, "db2.ward.internal.", RecordType::A, 1, now);
    held_query(&mut r, 8, "web.ward.internal.", RecordType::A, 2, now);
    // A full netmap, not on demand: web is in it, db2 is not (NXDOMAIN now, not in 2 s).
    let mut nm = netmap();
    nm.peers.retain(|p| p.device_id != DeviceId(3));
    nm.reach.retain(|x| x.device_id != DeviceId(3));
    let out = replies(r.set_zone(Zone::from_netmap(&nm)));
    assert_eq!(out[&1].response_code(), ResponseCode::NXDomain);
    assert_eq!(addrs(&out[&2]), vec![IpAddr::V4(ip4(4))]);
    assert_eq!(r.held(), 0);
    assert!(r.take_wants().is_empty());
}

#[test]
fn held_queries_over_tcp_get_answers_of_any_size() {
    // A service on many devices: held over TCP, answered whole when they arrive.
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    let a = hq(
        &mut r,
        &query(4, "db.ward.internal.", RecordType::AAAA),
        1,
        Transport::Tcp,
        now,
        1,
    );
    assert_eq!(a, Action::Held);
    let out = replies(r.set_zone(Zone::from_netmap(&on_demand_netmap(&[
        (2, "db1"),
        (3, "db2"),
    ]))));
    assert_eq!(
        addrs(&out[&1]),
        vec![IpAddr::V6(ip6(2)), IpAddr::V6(ip6(3))]
    );
}

#[test]
fn a_name_still_held_is_asked_for_again_each_want_interval() {
    let mut r = on_demand_resolver(&[]);
    let now = Instant::now();
    held_query(&mut r, 1, "db2.ward.internal.", RecordType::A, 1, now);
    assert_eq!(r.take_wants(), vec![label("db2")]);
    // The first want was lost (sent before the session's first netmap, say): a want interval
    // on, the resolver asks again by itself, without a new query.
    assert_eq!(r.poll_timeout(), Some(now + WANT_INTERVAL));
    assert!(r
        .handle_timeout(now + WANT_INTERVAL - Duration::from_millis(1))
        .is_empty());
    assert!(r.take_wants().is_empty());
    assert!(r.handle_timeout(now + WANT_INTERVAL).is_empty());
    assert_eq!(r.take_wants(), vec![label("db2")]);
    assert_eq!(r.poll_timeout(), Some(now + HOLD_TIMEOUT));
    // Answered: nothing held, nothing more to ask.
    let out = r.set_zone(Zone::from_netmap(&on_demand_netmap(&[(3, "db2")])));
    assert_eq!(out.len(), 1);
    assert_eq!(r.poll_timeout(), None);
}
