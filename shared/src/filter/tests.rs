//! Filter tests: hand-written cases and a property test against a reference model.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use super::*;
use proptest::prelude::*;

/// Test packet builders (also used by the policy tests).
pub(crate) mod pkt {
    use std::net::IpAddr;

    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;
    pub const FIN: u8 = 0x01;

    /// An IP packet with `proto` and transport bytes `l4`, from `src` to `dst` (same family).
    pub fn ip(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let total = 20 + l4.len();
                let mut p = vec![0u8; 20];
                p[0] = 0x45;
                p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                p[8] = 64;
                p[9] = proto;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0u8; 40];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                p[6] = proto;
                p[7] = 64;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
                p.extend_from_slice(l4);
                p
            }
            _ => panic!("mixed address families"),
        }
    }

    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        ip(src, dst, 6, &t)
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
        let mut u = vec![0u8; 12];
        u[0..2].copy_from_slice(&sport.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&12u16.to_be_bytes());
        ip(src, dst, 17, &u)
    }

    /// ICMP(v6) echo request or reply with identifier `id`.
    pub fn echo(src: IpAddr, dst: IpAddr, request: bool, id: u16) -> Vec<u8> {
        let v6 = src.is_ipv6();
        let ty = match (v6, request) {
            (false, true) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (true, false) => 129,
        };
        let mut m = vec![0u8; 16];
        m[0] = ty;
        m[4..6].copy_from_slice(&id.to_be_bytes());
        ip(src, dst, if v6 { 58 } else { 1 }, &m)
    }

    /// An ICMP error (v4 type 3 / v6 type 1) from `src` to `dst` about `about`.
    pub fn icmp_error(src: IpAddr, dst: IpAddr, about: &[u8]) -> Vec<u8> {
        let v6 = src.is_ipv6();
        let mut m = vec![0u8; 8];
        m[0] = if v6 { 1 } else { 3 };
        m.extend_from_slice(&about[..about.len().min(if v6 { 48 } else { 28 })]);
        ip(src, dst, if v6 { 58 } else { 1 }, &m)
    }
}

use pkt::*;

const NOW_MS: i64 = 1_800_000_000_000;

fn a(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule(
    name: &str,
    sources: &[&str],
    proto: Proto,
    ports: &[(u16, u16)],
    not_after_ms: Option<i64>,
) -> FilterRule {
    FilterRule {
        dests: Default::default(),
        rule: name.into(),
        service: "svc".into(),
        sources: sources.iter().map(|s| a(s)).collect(),
        source_sets: Vec::new(),
        proto,
        ports: ports
            .iter()
            .map(|(lo, hi)| PortRange { lo: *lo, hi: *hi })
            .collect(),
        not_after_ms,
    }
}

const ME: &str = "100.64.0.1";
const PEER: &str = "100.64.0.2";
const OTHER: &str = "100.64.0.3";

#[test]
fn default_deny_without_rules() {
    let mut f = Filter::new(16);
    let now = Instant::now();
    for p in [
        tcp(a(PEER), 4000, a(ME), 22, SYN),
        udp(a(PEER), 4000, a(ME), 53),
        echo(a(PEER), a(ME), true, 7),
    ] {
        assert_eq!(
            f.check_inbound(&p, now, NOW_MS),
            Verdict::Deny(DenyReason::NoRule)
        );
    }
    assert_eq!(f.counters().denied_no_rule, 3);
    assert_eq!(f.flow_count(), 0);
}

#[test]
fn rule_allows_source_proto_and_port_only() {
    let mut f = Filter::new(16);
    f.set_rules(vec![rule(
        "r",
        &[PEER, "fd00::2"],
        Proto::Tcp,
        &[(22, 22), (8000, 8080)],
        None,
    )]);
    let now = Instant::now();
    let ok = [
        tcp(a(PEER), 4000, a(ME), 22, SYN),
        tcp(a(PEER), 4001, a(ME), 8080, SYN),
        tcp(a("fd00::2"), 4000, a("fd00::1"), 8000, SYN),
    ];
    for p in &ok {
        assert_eq!(f.check_inbound(p, now, NOW_MS), Verdict::Allow);
    }
    let denied = [
        tcp(a(OTHER), 4000, a(ME), 22, SYN),
        tcp(a(PEER), 4000, a(ME), 23, SYN),
        tcp(a(PEER), 4000, a(ME), 8081, SYN),
        udp(a(PEER), 4000, a(ME), 22),
        echo(a(PEER), a(ME), true, 1),
    ];
    for p in &denied {
        assert_eq!(
            f.check_inbound(p, now, NOW_MS),
            Verdict::Deny(DenyReason::NoRule)
        );
    }
}

#[test]
fn replies_to_own_flows_pass_and_nothing_else() {
    let mut f = Filter::new(16);
    let now = Instant::now();
    f.handle_outbound(&tcp(a(ME), 5000, a(PEER), 443, SYN), now);
    f.handle_outbound(&udp(a(ME), 5001, a(PEER), 53), now);
    f.handle_outbound(&echo(a(ME), a(PEER), true, 9), now);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5000, SYN | ACK), now, NOW_MS),
        Verdict::Allow
    );
    assert_eq!(
        f.check_inbound(&udp(a(PEER), 53, a(ME), 5001), now, NOW_MS),
        Verdict::Allow
    );
    assert_eq!(
        f.check_inbound(&echo(a(PEER), a(ME), false, 9), now, NOW_MS),
        Verdict::Allow
    );
    // Wrong port, wrong peer, wrong id, a request riding on our echo id.
    for p in [
        tcp(a(PEER), 443, a(ME), 5002, ACK),
        tcp(a(OTHER), 443, a(ME), 5000, ACK),
        udp(a(PEER), 54, a(ME), 5001),
        echo(a(PEER), a(ME), false, 10),
        echo(a(PEER), a(ME), true, 9),
    ] {
        assert_eq!(
            f.check_inbound(&p, now, NOW_MS),
            Verdict::Deny(DenyReason::NoRule)
        );
    }
    // An outbound TCP packet that is not a SYN opens nothing.
    f.handle_outbound(&tcp(a(ME), 5003, a(PEER), 443, ACK), now);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5003, ACK), now, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn flows_time_out() {
    let mut f = Filter::new(16);
    let t0 = Instant::now();
    f.handle_outbound(&udp(a(ME), 5001, a(PEER), 53), t0);
    f.handle_outbound(&tcp(a(ME), 5000, a(PEER), 443, SYN), t0);
    let reply_tcp = tcp(a(PEER), 443, a(ME), 5000, SYN | ACK);
    assert_eq!(
        f.check_inbound(&reply_tcp, t0 + Duration::from_secs(29), NOW_MS),
        Verdict::Allow
    );
    // Established now: survives minutes of idleness but not more than the timeout.
    f.handle_outbound(
        &tcp(a(ME), 5000, a(PEER), 443, ACK),
        t0 + Duration::from_secs(29),
    );
    let t1 = t0 + Duration::from_secs(29) + TCP_ESTABLISHED_TIMEOUT - Duration::from_secs(1);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5000, ACK), t1, NOW_MS),
        Verdict::Allow
    );
    let t2 = t1 + TCP_ESTABLISHED_TIMEOUT + Duration::from_secs(1);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5000, ACK), t2, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(
        f.check_inbound(
            &udp(a(PEER), 53, a(ME), 5001),
            t0 + UDP_TIMEOUT + Duration::from_secs(1),
            NOW_MS
        ),
        Verdict::Deny(DenyReason::NoRule)
    );
    // Half-open flows die sooner.
    f.handle_outbound(&tcp(a(ME), 6000, a(PEER), 443, SYN), t0);
    assert_eq!(
        f.check_inbound(
            &tcp(a(PEER), 443, a(ME), 6000, SYN | ACK),
            t0 + TCP_HALF_OPEN_TIMEOUT + Duration::from_secs(1),
            NOW_MS
        ),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn expired_rules_deny_new_and_established_flows() {
    let mut f = Filter::new(16);
    let t = Instant::now();
    f.set_rules(vec![rule(
        "grant:1",
        &[PEER],
        Proto::Tcp,
        &[(22, 22)],
        Some(NOW_MS + 1000),
    )]);
    let syn = tcp(a(PEER), 4000, a(ME), 22, SYN);
    assert_eq!(f.check_inbound(&syn, t, NOW_MS), Verdict::Allow);
    f.handle_outbound(&tcp(a(ME), 22, a(PEER), 4000, SYN | ACK), t);
    let data = tcp(a(PEER), 4000, a(ME), 22, ACK);
    assert_eq!(f.check_inbound(&data, t, NOW_MS + 999), Verdict::Allow);
    assert_eq!(
        f.check_inbound(&data, t, NOW_MS + 1000),
        Verdict::Deny(DenyReason::Expired)
    );
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 4001, a(ME), 22, SYN), t, NOW_MS + 5000),
        Verdict::Deny(DenyReason::Expired)
    );
    // The server's own packets on the cut flow do not reopen it.
    f.handle_outbound(&tcp(a(ME), 22, a(PEER), 4000, ACK), t);
    assert_eq!(
        f.check_inbound(&data, t, NOW_MS + 1000),
        Verdict::Deny(DenyReason::Expired)
    );
    assert_eq!(f.counters().denied_expired, 3);
}

#[test]
fn set_rules_cuts_revoked_flows_but_keeps_own() {
    let mut f = Filter::new(64);
    let t = Instant::now();
    f.set_rules(vec![
        rule("a", &[PEER], Proto::Udp, &[(53, 53)], None),
        rule("b", &[OTHER], Proto::Udp, &[(53, 53)], None),
    ]);
    let from_peer = udp(a(PEER), 4000, a(ME), 53);
    let from_other = udp(a(OTHER), 4000, a(ME), 53);
    assert_eq!(f.check_inbound(&from_peer, t, NOW_MS), Verdict::Allow);
    assert_eq!(f.check_inbound(&from_other, t, NOW_MS), Verdict::Allow);
    f.handle_outbound(&udp(a(ME), 7000, a(PEER), 9999), t);
    f.set_rules(vec![rule("b", &[OTHER], Proto::Udp, &[(53, 53)], None)]);
    assert_eq!(
        f.check_inbound(&from_peer, t, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(f.check_inbound(&from_other, t, NOW_MS), Verdict::Allow);
    assert_eq!(
        f.check_inbound(&udp(a(PEER), 9999, a(ME), 7000), t, NOW_MS),
        Verdict::Allow
    );
    // The server answering the revoked client does not reopen the flow.
    f.handle_outbound(&udp(a(ME), 53, a(PEER), 4000), t);
    assert_eq!(
        f.check_inbound(&from_peer, t, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    assert_eq!(f.counters().flows_revoked, 1);
    // Granted again: passes again.
    f.set_rules(vec![rule("a2", &[PEER], Proto::Udp, &[(53, 53)], None)]);
    assert_eq!(f.check_inbound(&from_peer, t, NOW_MS), Verdict::Allow);
}

#[test]
fn icmp_echo_and_errors() {
    let mut f = Filter::new(16);
    let t = Instant::now();
    f.set_rules(vec![rule("ping", &[PEER], Proto::Icmp, &[], None)]);
    assert_eq!(
        f.check_inbound(&echo(a(PEER), a(ME), true, 1), t, NOW_MS),
        Verdict::Allow
    );
    assert_eq!(
        f.check_inbound(&echo(a(OTHER), a(ME), true, 1), t, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    // An unreachable error about a flow we opened passes; about anything else it does not.
    let ours = udp(a(ME), 5000, a(OTHER), 53);
    f.handle_outbound(&ours, t);
    assert_eq!(
        f.check_inbound(&icmp_error(a(OTHER), a(ME), &ours), t, NOW_MS),
        Verdict::Allow
    );
    let not_ours = udp(a(ME), 5001, a(OTHER), 53);
    assert_eq!(
        f.check_inbound(&icmp_error(a(OTHER), a(ME), &not_ours), t, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    // v6 too.
    let ours6 = tcp(a("fd00::1"), 5000, a("fd00::3"), 80, SYN);
    f.handle_outbound(&ours6, t);
    assert_eq!(
        f.check_inbound(&icmp_error(a("fd00::3"), a("fd00::1"), &ours6), t, NOW_MS),
        Verdict::Allow
    );
    // Other ICMP types are refused.
    let mut redirect = echo(a(PEER), a(ME), true, 1);
    redirect[20] = 5;
    assert_eq!(
        f.check_inbound(&redirect, t, NOW_MS),
        Verdict::Deny(DenyReason::UnsupportedProtocol)
    );
}

#[test]
fn fragments_unknown_protocols_and_garbage_are_denied() {
    let mut f = Filter::new(16);
    let t = Instant::now();
    f.set_rules(vec![rule(
        "all",
        &[PEER, "fd00::2"],
        Proto::Udp,
        &[(0, u16::MAX)],
        None,
    )]);
    let mut frag = udp(a(PEER), 1, a(ME), 2);
    frag[6..8].copy_from_slice(&100u16.to_be_bytes());
    assert_eq!(
        f.check_inbound(&frag, t, NOW_MS),
        Verdict::Deny(DenyReason::Fragment)
    );
    // First fragment (MF set, offset 0) is judged on its ports.
    let mut first = udp(a(PEER), 1, a(ME), 2);
    first[6] = 0x20;
    assert_eq!(f.check_inbound(&first, t, NOW_MS), Verdict::Allow);
    // IPv6 fragment header with a non-zero offset.
    let mut l4 = vec![17u8, 0, 0, 0x10, 0, 0, 0, 1];
    l4.extend_from_slice(&[0u8; 8]);
    let frag6 = ip(a("fd00::2"), a("fd00::1"), 44, &l4);
    assert_eq!(
        f.check_inbound(&frag6, t, NOW_MS),
        Verdict::Deny(DenyReason::Fragment)
    );
    let gre = ip(a(PEER), a(ME), 47, &[0u8; 8]);
    assert_eq!(
        f.check_inbound(&gre, t, NOW_MS),
        Verdict::Deny(DenyReason::UnsupportedProtocol)
    );
    for bad in [
        vec![],
        vec![0x45],
        vec![0x45; 19],
        vec![0x00; 40],
        udp(a(PEER), 1, a(ME), 2)[..24].to_vec(),
        tcp(a(PEER), 1, a(ME), 2, SYN)[..30].to_vec(),
    ] {
        assert_eq!(
            f.check_inbound(&bad, t, NOW_MS),
            Verdict::Deny(DenyReason::Malformed),
            "{bad:?}"
        );
    }
}

#[test]
fn full_table_evicts_expired_first_then_fails_closed() {
    // No reserve and no per-peer share: the table alone bounds the flows.
    let limits = FlowLimits {
        max_flows: 4,
        reserved_local: 0,
        per_peer: 8,
    };
    let mut f = Filter::with_limits(limits, 0);
    let t = Instant::now();
    f.set_rules(vec![rule("r", &[PEER], Proto::Udp, &[(53, 53)], None)]);
    for port in 0..4 {
        assert_eq!(
            f.check_inbound(&udp(a(PEER), 1000 + port, a(ME), 53), t, NOW_MS),
            Verdict::Allow
        );
        // Answered: established, so not evictable.
        f.handle_outbound(&udp(a(ME), 53, a(PEER), 1000 + port), t);
    }
    assert_eq!(
        f.check_inbound(&udp(a(PEER), 2000, a(ME), 53), t, NOW_MS),
        Verdict::Deny(DenyReason::TableFull)
    );
    assert_eq!(f.counters().denied_table_full, 1);
    // Tracked flows keep passing.
    assert_eq!(
        f.check_inbound(&udp(a(PEER), 1000, a(ME), 53), t, NOW_MS),
        Verdict::Allow
    );
    // Once the others expired there is room again.
    let later = t + UDP_TIMEOUT + Duration::from_secs(1);
    assert_eq!(
        f.check_inbound(&udp(a(PEER), 2000, a(ME), 53), later, NOW_MS),
        Verdict::Allow
    );
    assert!(f.flow_count() <= 4);
}

const ATTACKER: &str = "100.64.0.9";

#[test]
fn one_peer_flooding_syns_cannot_stop_other_peers_or_this_device() {
    let mut f = Filter::with_seed(DEFAULT_MAX_FLOWS, 7);
    let now = Instant::now();
    f.set_rules(vec![rule(
        "web",
        &[ATTACKER, PEER],
        Proto::Tcp,
        &[(80, 81)],
        None,
    )]);
    // 70 000 SYNs to the two ports it may open (more than the table holds), each answered.
    let mut t = now;
    for dport in [80u16, 81] {
        for sport in 0..35_000u16 {
            let p = tcp(a(ATTACKER), sport, a(ME), dport, SYN);
            if f.check_inbound(&p, t, NOW_MS) == Verdict::Allow {
                f.handle_outbound(&tcp(a(ME), dport, a(ATTACKER), sport, SYN | ACK), t);
            }
        }
        t += Duration::from_millis(100);
    }
    let limits = FlowLimits::for_table(DEFAULT_MAX_FLOWS);
    assert!(f.flow_count() <= limits.per_peer, "{}", f.flow_count());
    assert!(f.counters().evicted_half_open > 0);
    // Another peer opens a new flow, and it completes.
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 5000, a(ME), 80, SYN), t, NOW_MS),
        Verdict::Allow
    );
    f.handle_outbound(&tcp(a(ME), 80, a(PEER), 5000, SYN | ACK), t);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 5000, a(ME), 80, ACK), t, NOW_MS),
        Verdict::Allow
    );
    // This device opens a new connection and its reply passes.
    f.handle_outbound(&tcp(a(ME), 40000, a(OTHER), 443, SYN), t);
    assert_eq!(
        f.check_inbound(&tcp(a(OTHER), 443, a(ME), 40000, SYN | ACK), t, NOW_MS),
        Verdict::Allow
    );
    assert_eq!(f.counters().outbound_untracked, 0);
    // The flood goes on: the completed flow of the other peer stays.
    for i in 0..10_000u16 {
        let _ = f.check_inbound(&tcp(a(ATTACKER), i, a(ME), 80, SYN), t, NOW_MS);
    }
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 5000, a(ME), 80, ACK), t, NOW_MS),
        Verdict::Allow
    );
}

#[test]
fn many_flooding_peers_still_leave_room_for_new_peers_and_this_device() {
    let limits = FlowLimits {
        max_flows: 256,
        reserved_local: 64,
        per_peer: 32,
    };
    let mut f = Filter::with_limits(limits, 3);
    let now = Instant::now();
    let attackers: Vec<String> = (10..30).map(|i| format!("100.64.1.{i}")).collect();
    let mut sources: Vec<&str> = attackers.iter().map(String::as_str).collect();
    sources.push(PEER);
    f.set_rules(vec![rule("web", &sources, Proto::Tcp, &[(80, 80)], None)]);
    for port in 0..1000u16 {
        for at in &attackers {
            let _ = f.check_inbound(&tcp(a(at), port, a(ME), 80, SYN), now, NOW_MS);
        }
    }
    assert!(f.flow_count() <= limits.max_flows - limits.reserved_local);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 5000, a(ME), 80, SYN), now, NOW_MS),
        Verdict::Allow
    );
    // This device's own flows fill the reserve and more without a refusal.
    for port in 0..100u16 {
        f.handle_outbound(&tcp(a(ME), 30000 + port, a(OTHER), 443, SYN), now);
    }
    assert_eq!(f.counters().outbound_untracked, 0);
    assert!(f.flow_count() <= limits.max_flows);
}

#[test]
fn a_peer_holding_its_share_in_established_flows_is_refused_more() {
    let limits = FlowLimits {
        max_flows: 64,
        reserved_local: 16,
        per_peer: 4,
    };
    let mut f = Filter::with_limits(limits, 1);
    let now = Instant::now();
    f.set_rules(vec![rule(
        "web",
        &[PEER, OTHER],
        Proto::Tcp,
        &[(80, 80)],
        None,
    )]);
    for port in 0..4u16 {
        assert_eq!(
            f.check_inbound(&tcp(a(PEER), port, a(ME), 80, SYN), now, NOW_MS),
            Verdict::Allow
        );
        f.handle_outbound(&tcp(a(ME), 80, a(PEER), port, SYN | ACK), now);
        assert_eq!(
            f.check_inbound(&tcp(a(PEER), port, a(ME), 80, ACK), now, NOW_MS),
            Verdict::Allow
        );
    }
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 9, a(ME), 80, SYN), now, NOW_MS),
        Verdict::Deny(DenyReason::PeerQuota)
    );
    assert_eq!(f.counters().denied_peer_quota, 1);
    // Its established flows go on; another peer is not affected.
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 0, a(ME), 80, ACK), now, NOW_MS),
        Verdict::Allow
    );
    assert_eq!(
        f.check_inbound(&tcp(a(OTHER), 1, a(ME), 80, SYN), now, NOW_MS),
        Verdict::Allow
    );
}

#[test]
fn a_peers_flow_is_held_long_only_once_its_handshake_completes() {
    let mut f = Filter::new(64);
    let t0 = Instant::now();
    f.set_rules(vec![rule("web", &[PEER], Proto::Tcp, &[(80, 80)], None)]);
    // Answered but never completed: half-open, gone after the short timeout.
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 1000, a(ME), 80, SYN), t0, NOW_MS),
        Verdict::Allow
    );
    f.handle_outbound(&tcp(a(ME), 80, a(PEER), 1000, SYN | ACK), t0);
    // Completed by the peer's ACK: established.
    let _ = f.check_inbound(&tcp(a(PEER), 2000, a(ME), 80, SYN), t0, NOW_MS);
    f.handle_outbound(&tcp(a(ME), 80, a(PEER), 2000, SYN | ACK), t0);
    let _ = f.check_inbound(&tcp(a(PEER), 2000, a(ME), 80, ACK), t0, NOW_MS);
    assert_eq!(f.flow_count(), 2);
    f.expire(t0 + PEER_HALF_OPEN_TIMEOUT + Duration::from_secs(1));
    assert_eq!(f.flow_count(), 1);
    f.expire(t0 + TCP_ESTABLISHED_TIMEOUT - Duration::from_secs(1));
    assert_eq!(f.flow_count(), 1);
    f.expire(t0 + TCP_ESTABLISHED_TIMEOUT + Duration::from_secs(1));
    assert_eq!(f.flow_count(), 0);
    // A peer's unanswered UDP flow is half-open too.
    f.set_rules(vec![rule("dns", &[PEER], Proto::Udp, &[(53, 53)], None)]);
    let _ = f.check_inbound(&udp(a(PEER), 3000, a(ME), 53), t0, NOW_MS);
    f.expire(t0 + PEER_HALF_OPEN_TIMEOUT + Duration::from_secs(1));
    assert_eq!(f.flow_count(), 0);
}

/// A reference model of the filter's decision: rules plus the set of flows.
#[derive(Debug, Clone)]
enum Op {
    Out {
        proto: u8,
        me: u8,
        peer: u8,
        lport: u16,
        rport: u16,
        syn: bool,
    },
    In {
        proto: u8,
        me: u8,
        peer: u8,
        lport: u16,
        rport: u16,
        syn: bool,
    },
}

fn addr(i: u8, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(i) + 1))
    } else {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, i + 1))
    }
}

fn packet(
    proto: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    syn: bool,
    request: bool,
) -> Vec<u8> {
    match proto {
        0 => tcp(src, sport, dst, dport, if syn { SYN } else { ACK }),
        1 => udp(src, sport, dst, dport),
        _ => echo(src, dst, request, sport),
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let port = prop_oneof![Just(22u16), Just(53), Just(80), 1000u16..1004];
    (
        any::<bool>(),
        0u8..3,
        0u8..2,
        1u8..4,
        port.clone(),
        port,
        any::<bool>(),
    )
        .prop_map(|(out, proto, me, peer, lport, rport, syn)| {
            if out {
                Op::Out {
                    proto,
                    me,
                    peer,
                    lport,
                    rport,
                    syn,
                }
            } else {
                Op::In {
                    proto,
                    me,
                    peer,
                    lport,
                    rport,
                    syn,
                }
            }
        })
}

fn rules_strategy() -> impl Strategy<Value = Vec<FilterRule>> {
    let r = (
        proptest::collection::vec(1u8..4, 0..3),
        0u8..3,
        proptest::collection::vec((0u16..100, 0u16..1100), 0..3),
        any::<bool>(),
    )
        .prop_map(|(srcs, proto, ports, v6)| FilterRule {
            dests: Default::default(),
            rule: "r".into(),
            service: "s".into(),
            sources: srcs.iter().map(|i| addr(*i, v6)).collect(),
            source_sets: Vec::new(),
            proto: [Proto::Tcp, Proto::Udp, Proto::Icmp][proto as usize],
            ports: ports
                .iter()
                .map(|(a, b)| PortRange {
                    lo: (*a).min(*b),
                    hi: (*a).max(*b),
                })
                .collect(),
            not_after_ms: None,
        });
    proptest::collection::vec(r, 0..4)
}

proptest! {
    /// Within timeouts and with room in the table, a packet is delivered iff a rule allows it or
    /// it belongs to a flow this device opened or a rule allowed.
    #[test]
    fn filter_matches_reference_model(
        rules in rules_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..60),
        v6 in any::<bool>(),
    ) {
        let mut f = Filter::new(10_000);
        f.set_rules(rules.clone());
        let now = Instant::now();
        // (proto, local, remote, lport, rport, opened locally) of tracked flows.
        let mut flows: std::collections::BTreeSet<(u8, IpAddr, IpAddr, u16, u16, bool)> = Default::default();
        for op in ops {
            match op {
                Op::Out { proto, me, peer, lport, rport, syn } => {
                    let (l, r) = (addr(me, v6), addr(peer + 10, v6));
                    let p = packet(proto, l, lport, r, rport, syn, true);
                    f.handle_outbound(&p, now);
                    let (lp, rp) = if proto == 2 { (lport, 0) } else { (lport, rport) };
                    let opens = proto != 0 || syn;
                    let exists = flows.iter().any(|x| (x.0, x.1, x.2, x.3, x.4) == (proto, l, r, lp, rp));
                    if opens && !exists {
                        flows.insert((proto, l, r, lp, rp, true));
                    }
                }
                Op::In { proto, me, peer, lport, rport, syn } => {
                    // Peers are 11..13 for replies and 1..3 for rule sources: use both.
                    let r = addr(if syn { peer } else { peer + 10 }, v6);
                    let l = addr(me, v6);
                    let request = syn;
                    let p = packet(proto, r, rport, l, lport, syn, request);
                    let v = f.check_inbound(&p, now, NOW_MS);
                    let (lp, rp) = if proto == 2 { (rport, 0) } else { (lport, rport) };
                    let tracked = flows.iter().any(|x| (x.0, x.1, x.2, x.3, x.4) == (proto, l, r, lp, rp) && (proto != 2 || (x.5 && !request) || (!x.5 && request)));
                    let want_proto = [Proto::Tcp, Proto::Udp, Proto::Icmp][proto as usize];
                    let by_rule = (proto != 2 || request) && rules.iter().any(|ru| {
                        ru.proto == want_proto
                            && ru.sources.contains(&r)
                            && (want_proto == Proto::Icmp || ru.ports.iter().any(|x| x.contains(lport)))
                    });
                    let expect = tracked || by_rule;
                    prop_assert_eq!(v == Verdict::Allow, expect, "op {:?} verdict {:?}", (proto, l, r, lport, rport, syn), v);
                    if by_rule && !tracked {
                        flows.insert((proto, l, r, lp, rp, false));
                    }
                }
            }
        }
    }

    /// Whatever peers send without completing handshakes (floods from several peers, some
    /// SYNs answered), a new peer's flow and this device's own new flows still get in, no peer
    /// holds more than its share, and the table stays bounded.
    #[test]
    fn floods_never_lock_out_a_new_peer_or_this_device(
        floods in proptest::collection::vec((0u8..6, 0u16..400, any::<bool>()), 1..400),
        per_peer in 4usize..40,
    ) {
        let limits = FlowLimits { max_flows: 128, reserved_local: 32, per_peer };
        let mut f = Filter::with_limits(limits, 9);
        let now = Instant::now();
        let attackers: Vec<IpAddr> = (0..6u8).map(|i| addr(20 + i, false)).collect();
        let newcomer = addr(40, false);
        let mut sources = attackers.clone();
        sources.push(newcomer);
        f.set_rules(vec![FilterRule {
            dests: Default::default(),
            rule: "r".into(),
            service: "s".into(),
            sources: sources.into(),
            source_sets: Vec::new(),
            proto: Proto::Tcp,
            ports: vec![PortRange { lo: 80, hi: 80 }],
            not_after_ms: None,
        }]);
        let me = addr(0, false);
        for (who, sport, answer) in floods {
            let from = attackers[who as usize];
            if f.check_inbound(&tcp(from, sport, me, 80, SYN), now, NOW_MS) == Verdict::Allow && answer {
                f.handle_outbound(&tcp(me, 80, from, sport, SYN | ACK), now);
            }
            prop_assert!(f.flow_count() <= limits.max_flows);
            prop_assert!(f.peers.values().all(|p| p.count <= per_peer));
        }
        prop_assert_eq!(f.check_inbound(&tcp(newcomer, 7, me, 80, SYN), now, NOW_MS), Verdict::Allow);
        for port in 0..32u16 {
            f.handle_outbound(&tcp(me, 30000 + port, addr(50, false), 443, SYN), now);
        }
        prop_assert_eq!(f.counters().outbound_untracked, 0);
    }

    /// Arbitrary bytes never panic the filter, and never open a flow.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut f = Filter::new(16);
        let now = Instant::now();
        let _ = f.check_inbound(&bytes, now, NOW_MS);
        f.handle_outbound(&bytes, now);
    }
}

#[test]
fn closed_tcp_flows_linger_only_briefly() {
    let mut f = Filter::new(16);
    let t = Instant::now();
    f.handle_outbound(&tcp(a(ME), 5000, a(PEER), 443, SYN), t);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5000, SYN | ACK), t, NOW_MS),
        Verdict::Allow
    );
    f.handle_outbound(&tcp(a(ME), 5000, a(PEER), 443, FIN | ACK), t);
    let late = t + TCP_CLOSING_TIMEOUT + Duration::from_secs(1);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 443, a(ME), 5000, ACK), late, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
}

#[test]
fn refused_new_flows_are_logged_for_scan_detection_and_bounded() {
    let mut f = Filter::new(1024);
    let now = Instant::now();
    let src = Ipv4Addr::new(100, 64, 0, 9);
    let dst = Ipv4Addr::new(100, 64, 0, 1);
    for port in 1..=20u16 {
        for _ in 0..3 {
            let p = tcp(src.into(), 40000, dst.into(), port, SYN);
            assert_eq!(
                f.check_inbound(&p, now, 0),
                Verdict::Deny(DenyReason::NoRule)
            );
        }
    }
    let d = f.take_denied();
    assert_eq!(d.len(), 20);
    assert!(d.iter().all(|x| x.count == 3 && x.proto == Proto::Tcp));
    assert!(f.take_denied().is_empty(), "taking empties the log");
    // A flood of distinct flows stays bounded.
    for i in 0..5000u32 {
        let s = Ipv4Addr::from(0x6440_0000 + i);
        let _ = f.check_inbound(&tcp(s.into(), 40000, dst.into(), 22, SYN), now, 0);
    }
    assert_eq!(f.take_denied().len(), MAX_DENIED_LOG);
}

#[test]
fn local_prefixes_hold_the_devices_own_addresses_and_routed_prefixes() {
    let mut l = LocalPrefixes::own([a(ME), a("fd00:1::7")]);
    assert!(l.contains(a(ME)));
    assert!(l.contains(a("::ffff:100.64.0.1")));
    assert!(l.contains(a("fd00:1::7")));
    assert!(!l.contains(a(PEER)));
    assert!(!l.contains(a("192.168.50.2")));
    assert!(!l.contains(a("fd00:1::8")));
    l.add_prefix(a("192.168.50.0"), 24);
    l.add_prefix(a("fd00:2::"), 200);
    assert!(l.contains(a("192.168.50.2")));
    assert!(!l.contains(a("192.168.51.2")));
    assert!(l.contains(a("fd00:2::")));
    assert!(!l.contains(a("fd00:2::1")));
    assert!(LocalPrefixes::default().contains(a(ME)).eq(&false));
    let p = tcp(a(PEER), 1, a(ME), 2, SYN);
    assert_eq!(LocalPrefixes::packet_addr(&p, true), Some(a(ME)));
    assert_eq!(LocalPrefixes::packet_addr(&p, false), Some(a(PEER)));
    let p6 = udp(a("fd00:1::8"), 1, a("fd00:1::7"), 2);
    assert_eq!(LocalPrefixes::packet_addr(&p6, true), Some(a("fd00:1::7")));
    assert_eq!(LocalPrefixes::packet_addr(&p[..19], true), None);
    assert_eq!(LocalPrefixes::packet_addr(&p6[..39], false), None);
    assert_eq!(LocalPrefixes::packet_addr(&[], false), None);
}

#[test]
fn flow_samples_count_both_ways_in_the_flow_entry_and_keep_the_rule_across_a_rule_change() {
    let mut f = Filter::new(1024);
    f.set_rules(vec![rule("web", &[PEER], Proto::Tcp, &[(443, 443)], None)]);
    let now = Instant::now();
    let syn = tcp(a(PEER), 50000, a(ME), 443, SYN);
    assert_eq!(f.check_inbound(&syn, now, NOW_MS), Verdict::Allow);
    let synack = tcp(a(ME), 443, a(PEER), 50000, SYN | ACK);
    f.handle_outbound_run(&synack, now, 3, 3 * synack.len() as u64);
    let ack = tcp(a(PEER), 50000, a(ME), 443, ACK);
    assert_eq!(f.check_inbound(&ack, now, NOW_MS), Verdict::Allow);
    // The rule is renamed: what was counted so far stays with the old name.
    f.set_rules(vec![rule("web2", &[PEER], Proto::Tcp, &[(443, 443)], None)]);
    assert_eq!(f.check_inbound(&ack, now, NOW_MS), Verdict::Allow);
    let (mut s, dropped) = f.take_samples();
    assert_eq!(dropped, 0);
    s.sort_by(|x, y| x.key.rule.cmp(&y.key.rule));
    assert_eq!(s.len(), 2, "{s:#?}");
    assert_eq!(s[0].key.rule.as_deref(), Some("web"));
    assert_eq!((s[0].key.role, s[0].key.port), (Role::Responder, 443));
    let n = syn.len() as u64;
    assert_eq!(
        s[0].counts,
        FlowCounts {
            packets_in: 2,
            bytes_in: 2 * n,
            packets_out: 3,
            bytes_out: 3 * n,
            connections: 1,
        }
    );
    assert_eq!(s[1].key.rule.as_deref(), Some("web2"));
    assert_eq!((s[1].counts.packets_in, s[1].counts.connections), (1, 0));
    assert!(f.take_samples().0.is_empty(), "taking empties the counts");
}

#[test]
fn icmp_errors_about_a_flow_are_counted_with_that_flow() {
    let mut f = Filter::new(1024);
    f.set_rules(vec![rule("dns", &[PEER], Proto::Udp, &[(53, 53)], None)]);
    let now = Instant::now();
    // A flow this device opened; the peer answers with an unreachable about it.
    let ours = udp(a(ME), 5000, a(PEER), 9999);
    f.handle_outbound(&ours, now);
    let err_in = icmp_error(a(PEER), a(ME), &ours);
    assert_eq!(f.check_inbound(&err_in, now, NOW_MS), Verdict::Allow);
    // A flow the peer opened; this device answers with an unreachable about it.
    let theirs = udp(a(PEER), 6000, a(ME), 53);
    assert_eq!(f.check_inbound(&theirs, now, NOW_MS), Verdict::Allow);
    let err_out = icmp_error(a(ME), a(PEER), &theirs);
    f.handle_outbound(&err_out, now);
    // An error about a flow nobody opened is counted nowhere.
    f.handle_outbound(
        &icmp_error(a(ME), a(PEER), &udp(a(PEER), 6001, a(ME), 53)),
        now,
    );
    let (mut s, _) = f.take_samples();
    s.sort_by_key(|x| x.key.role);
    assert_eq!(s.len(), 2, "{s:#?}");
    let (n, e_in, e_out) = (ours.len() as u64, err_in.len() as u64, err_out.len() as u64);
    assert_eq!((s[0].key.role, s[0].key.port), (Role::Initiator, 9999));
    assert_eq!(
        s[0].counts,
        FlowCounts {
            packets_out: 1,
            bytes_out: n,
            packets_in: 1,
            bytes_in: e_in,
            connections: 1,
        }
    );
    assert_eq!((s[1].key.role, s[1].key.port), (Role::Responder, 53));
    assert_eq!(
        s[1].counts,
        FlowCounts {
            packets_in: 1,
            bytes_in: theirs.len() as u64,
            packets_out: 1,
            bytes_out: e_out,
            connections: 1,
        }
    );
}

#[test]
fn flow_samples_of_a_scan_stay_bounded_and_the_excess_is_counted() {
    let mut f = Filter::new(1024);
    let now = Instant::now();
    let dst = Ipv4Addr::new(100, 64, 0, 1);
    for i in 0..100_000u32 {
        let s = Ipv4Addr::from(0x6440_0000 + (i % 50_000));
        let port = 1 + (i / 50_000) as u16;
        let _ = f.check_inbound(&tcp(s.into(), 40000, dst.into(), port, SYN), now, 0);
    }
    let (s, dropped) = f.take_samples();
    assert_eq!(s.len(), MAX_PENDING_SAMPLES);
    assert_eq!(dropped, 100_000 - MAX_PENDING_SAMPLES as u64);
    assert!(s
        .iter()
        .all(|x| x.key.reason == Some(DenyCause::NoRule) && x.counts.packets_in == 1));
}

proptest! {
    /// Candidate rules never change what passes: the same packets through a filter with and
    /// without candidate rules (set before, or swapped midway) get the same verdicts.
    #[test]
    fn candidate_rules_never_change_a_verdict(
        rules in rules_strategy(),
        shadow in rules_strategy(),
        ops in proptest::collection::vec(op_strategy(), 1..60),
        swap_at in 0usize..60,
        v6 in any::<bool>(),
    ) {
        let mut plain = Filter::new(10_000);
        let mut watched = Filter::new(10_000);
        plain.set_rules(rules.clone());
        watched.set_rules(rules);
        watched.set_shadow_rules(Some(shadow.clone()));
        let now = Instant::now();
        for (i, op) in ops.into_iter().enumerate() {
            if i == swap_at {
                watched.set_shadow_rules(if i % 2 == 0 { None } else { Some(shadow.clone()) });
            }
            match op {
                Op::Out { proto, me, peer, lport, rport, syn } => {
                    let p = packet(proto, addr(me, v6), lport, addr(peer + 10, v6), rport, syn, true);
                    plain.handle_outbound(&p, now);
                    watched.handle_outbound(&p, now);
                }
                Op::In { proto, me, peer, lport, rport, syn } => {
                    let r = addr(if syn { peer } else { peer + 10 }, v6);
                    let p = packet(proto, r, rport, addr(me, v6), lport, syn, syn);
                    prop_assert_eq!(plain.check_inbound(&p, now, NOW_MS), watched.check_inbound(&p, now, NOW_MS));
                }
            }
        }
        prop_assert_eq!(plain.flow_count(), watched.flow_count());
    }
}

#[test]
fn a_peers_flow_carries_the_candidate_verdict_from_its_start_and_denials_too() {
    let mut f = Filter::new(1024);
    let other = "100.64.0.3";
    // Enforced: the peer may open 80 and 443. Candidate: only 443, and 22 from the other peer.
    f.set_rules(vec![rule(
        "web-wide",
        &[PEER],
        Proto::Tcp,
        &[(80, 80), (443, 443)],
        None,
    )]);
    f.set_shadow_rules(Some(vec![
        rule("web-narrow", &[PEER], Proto::Tcp, &[(443, 443)], None),
        rule("ssh", &[other], Proto::Tcp, &[(22, 22)], None),
    ]));
    assert_eq!(f.shadow_rules().map(<[FilterRule]>::len), Some(2));
    let now = Instant::now();
    let s80 = tcp(a(PEER), 50000, a(ME), 80, SYN);
    let s443 = tcp(a(PEER), 50001, a(ME), 443, SYN);
    let s22 = tcp(a(other), 50002, a(ME), 22, SYN);
    assert_eq!(
        f.check_inbound(&s80, now, NOW_MS),
        Verdict::Allow,
        "never enforced"
    );
    assert_eq!(f.check_inbound(&s443, now, NOW_MS), Verdict::Allow);
    assert_eq!(
        f.check_inbound(&s22, now, NOW_MS),
        Verdict::Deny(DenyReason::NoRule),
        "a candidate rule allows nothing"
    );
    // Later packets of a flow keep the verdict it started with.
    let ack80 = tcp(a(PEER), 50000, a(ME), 80, ACK);
    assert_eq!(f.check_inbound(&ack80, now, NOW_MS), Verdict::Allow);
    let (s, _) = f.take_samples();
    let by_port = |port: u16| {
        s.iter()
            .find(|x| x.key.port == port)
            .map(|x| (x.key.verdict, x.key.shadow, x.counts.packets_in))
    };
    assert_eq!(
        by_port(80),
        Some((FlowVerdict::Allowed, Some(ShadowVerdict::WouldDeny), 2))
    );
    assert_eq!(
        by_port(443),
        Some((FlowVerdict::Allowed, Some(ShadowVerdict::WouldAllow), 1))
    );
    assert_eq!(
        by_port(22),
        Some((FlowVerdict::Denied, Some(ShadowVerdict::WouldAllow), 1))
    );
    // The candidate view goes: tracked flows and new denials carry no verdict any more.
    f.set_shadow_rules(None);
    assert_eq!(f.check_inbound(&ack80, now, NOW_MS), Verdict::Allow);
    assert_eq!(
        f.check_inbound(&s22, now, NOW_MS),
        Verdict::Deny(DenyReason::NoRule)
    );
    let (s, _) = f.take_samples();
    assert!(s.iter().all(|x| x.key.shadow.is_none()), "{s:#?}");
    // And comes back: a tracked flow is judged again.
    f.set_shadow_rules(Some(vec![rule(
        "all-web",
        &[PEER],
        Proto::Tcp,
        &[(1, 1000)],
        None,
    )]));
    assert_eq!(f.check_inbound(&ack80, now, NOW_MS), Verdict::Allow);
    let (s, _) = f.take_samples();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].key.shadow, Some(ShadowVerdict::WouldAllow));
}

#[test]
fn flows_this_device_opens_carry_no_candidate_verdict() {
    let mut f = Filter::new(1024);
    f.set_shadow_rules(Some(vec![]));
    let now = Instant::now();
    f.handle_outbound(&tcp(a(ME), 40000, a(PEER), 80, SYN), now);
    assert_eq!(
        f.check_inbound(&tcp(a(PEER), 80, a(ME), 40000, SYN | ACK), now, NOW_MS),
        Verdict::Allow
    );
    let (s, _) = f.take_samples();
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].key.role, s[0].key.shadow), (Role::Initiator, None));
}

/// Source lists compare by content: one shared list equals itself, equal lists in separate
/// allocations are equal (and order equal), and lists that differ are not.
#[test]
fn source_lists_compare_by_content_and_one_list_equals_itself_at_once() {
    let a: IpAddr = "100.64.0.1".parse().unwrap();
    let b: IpAddr = "100.64.0.2".parse().unwrap();
    let one = Sources::from(vec![a, b]);
    let same = one.clone();
    let twin = Sources::from(vec![a, b]);
    let other = Sources::from(vec![a]);
    assert!(Sources::ptr_eq(&one, &same) && one == same);
    assert!(!Sources::ptr_eq(&one, &twin));
    assert_eq!(one, twin);
    assert_eq!(one.cmp(&twin), std::cmp::Ordering::Equal);
    assert_ne!(one, other);
    assert_ne!(one.cmp(&other), std::cmp::Ordering::Equal);
}
