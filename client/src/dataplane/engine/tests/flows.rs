//! Flow accounting: a scripted exchange between two cores yields, at each end, samples with
//! the right role, verdict, rule or reason, and packet and byte counts both ways.

use super::*;
use ward_shared::filter::{FlowCounts, FlowSample, SampleKey};
use ward_shared::flows::{DenyCause, FlowVerdict, Role};

/// An IPv4 packet with protocol `proto` and transport bytes `l4`.
fn ip4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = ipv4_packet(src, dst, &vec![0; l4.len() - 8]);
    p[9] = proto;
    p[10..12].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for c in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..].copy_from_slice(l4);
    p
}

fn tcp4(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    ip4(src, dst, 6, &t)
}

fn echo4(src: Ipv4Addr, dst: Ipv4Addr, request: bool) -> Vec<u8> {
    let mut t = vec![0u8; 16];
    t[0] = if request { 8 } else { 0 };
    t[4..6].copy_from_slice(&77u16.to_be_bytes());
    ip4(src, dst, 1, &t)
}

fn samples(net: &Net, i: usize) -> Vec<FlowSample> {
    let (mut s, dropped) = net.nodes[i].core.take_flow_samples();
    assert_eq!(dropped, 0);
    s.sort_by(|a, b| a.key.cmp(&b.key));
    s
}

fn find(s: &[FlowSample], proto: Proto, role: Role) -> &FlowSample {
    s.iter()
        .find(|x| x.key.proto == proto && x.key.role == role)
        .unwrap_or_else(|| panic!("no {proto:?} {role:?} sample in {s:#?}"))
}

fn counts(po: u64, bo: u64, pi: u64, bi: u64, conns: u64) -> FlowCounts {
    FlowCounts {
        packets_out: po,
        bytes_out: bo,
        packets_in: pi,
        bytes_in: bi,
        connections: conns,
    }
}

#[test]
fn both_ends_count_an_exchange_with_roles_rules_and_a_denied_attempt() {
    let mut net = established_pair(61);
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    // Node 1 lets node 0 open UDP 2000 ("web") and ping it ("ping"); nothing else.
    let rule = |name: &str, proto, ports: Vec<PortRange>| FilterRule {
        dests: Default::default(),
        rule: name.into(),
        service: name.into(),
        sources: vec![IpAddr::V4(a)].into(),
        source_sets: Vec::new(),
        proto,
        ports,
        not_after_ms: None,
    };
    net.nodes[1].core.set_filter(vec![
        rule("web", Proto::Udp, vec![PortRange { lo: 2000, hi: 2000 }]),
        rule("ping", Proto::Icmp, vec![]),
    ]);
    // The handshake's own traffic is no flow; start from clean counts.
    let _ = net.nodes[0].core.take_flow_samples();
    let _ = net.nodes[1].core.take_flow_samples();

    let req = udp4(a, 1000, b, 2000, &[1; 100]);
    let reply = udp4(b, 2000, a, 1000, &[2; 300]);
    for _ in 0..3 {
        net.send_ip(0, &req);
        net.run(Duration::from_millis(20));
    }
    for _ in 0..2 {
        net.send_ip(1, &reply);
        net.run(Duration::from_millis(20));
    }
    // A denied attempt: ssh is not allowed.
    let syn = tcp4(a, 40000, b, 22, 0x02);
    net.send_ip(0, &syn);
    net.run(Duration::from_millis(20));
    // A ping and its answer.
    net.send_ip(0, &echo4(a, b, true));
    net.run(Duration::from_millis(20));
    net.send_ip(1, &echo4(b, a, false));
    net.run(Duration::from_millis(20));
    assert_eq!(
        net.nodes[1].delivered.len(),
        4,
        "3 UDP + 1 ping; the SYN is dropped"
    );

    let (rl, pl) = (req.len() as u64, reply.len() as u64);
    let at_a = samples(&net, 0);
    let at_b = samples(&net, 1);
    assert_eq!(at_a.len(), 3, "{at_a:#?}");
    assert_eq!(at_b.len(), 3, "{at_b:#?}");

    // Node 0 opened everything: initiator, allowed as far as it knows, no rule of its own.
    let udp = find(&at_a, Proto::Udp, Role::Initiator);
    assert_eq!(udp.key.port, 2000);
    assert_eq!(udp.key.verdict, FlowVerdict::Allowed);
    assert_eq!(udp.key.rule, None);
    assert_eq!(udp.counts, counts(3, 3 * rl, 2, 2 * pl, 1));
    let ssh = find(&at_a, Proto::Tcp, Role::Initiator);
    assert_eq!(
        (ssh.key.port, ssh.counts.packets_out, ssh.counts.packets_in),
        (22, 1, 0)
    );
    let ping = find(&at_a, Proto::Icmp, Role::Initiator);
    assert_eq!(ping.key.port, 8, "ICMP: the echo request's type");
    assert_eq!(ping.counts.packets_out, 1);
    assert_eq!(ping.counts.packets_in, 1);

    // Node 1 answered: responder, with the rule that let each flow in, and the denial.
    let udp = find(&at_b, Proto::Udp, Role::Responder);
    assert_eq!(udp.key.remote, IpAddr::V4(a));
    assert_eq!(udp.key.rule.as_deref(), Some("web"));
    assert_eq!(udp.counts, counts(2, 2 * pl, 3, 3 * rl, 1));
    let ssh = find(&at_b, Proto::Tcp, Role::Responder);
    assert_eq!(ssh.key.verdict, FlowVerdict::Denied);
    assert_eq!(ssh.key.reason, Some(DenyCause::NoRule));
    assert_eq!(ssh.key.port, 22);
    assert_eq!(ssh.counts, counts(0, 0, 1, syn.len() as u64, 1));
    let ping = find(&at_b, Proto::Icmp, Role::Responder);
    assert_eq!(ping.key.rule.as_deref(), Some("ping"));
    assert_eq!(
        (
            ping.key.port,
            ping.counts.packets_in,
            ping.counts.packets_out
        ),
        (8, 1, 1)
    );

    // Harvested: the next harvest starts from zero.
    assert!(net.nodes[0].core.take_flow_samples().0.is_empty());
    assert!(net.nodes[1].core.take_flow_samples().0.is_empty());
}

#[test]
fn drops_before_the_filter_are_recorded_with_their_cause() {
    let mut net = established_pair(62);
    for n in &net.nodes {
        assert!(n
            .core
            .set_local_prefixes(LocalPrefixes::own([n.ipv4.into(), n.ipv6.into()])));
    }
    let _ = net.nodes[0].core.take_flow_samples();
    let _ = net.nodes[1].core.take_flow_samples();
    let (a, b) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
    // Node 0 sends to an overlay address no peer holds: no lease.
    let stranger = Ipv4Addr::new(100, 64, 0, 99);
    net.send_ip(0, &udp4(a, 1000, stranger, 53, b"q"));
    // Node 0 routes a LAN address behind node 1 into its tunnel: wrong destination there.
    let mut to_node1 = net.nodes[1].peer_config();
    let lan = Ipv4Addr::new(192, 168, 50, 2);
    to_node1.ipv4 = lan;
    net.set_peers(0, vec![to_node1]);
    net.send_ip(0, &udp4(a, 1000, lan, 80, b"pivot"));
    net.run(Duration::from_millis(50));
    let _ = b;

    let at_a = samples(&net, 0);
    let no_lease = at_a
        .iter()
        .find(|s| s.key.reason == Some(DenyCause::NoLease))
        .unwrap_or_else(|| panic!("{at_a:#?}"));
    assert_eq!(no_lease.key.remote, IpAddr::V4(stranger));
    assert_eq!(
        (no_lease.key.role, no_lease.key.port),
        (Role::Initiator, 53)
    );
    assert_eq!(no_lease.counts.packets_out, 1);
    let at_b = samples(&net, 1);
    let wrong: Vec<&SampleKey> = at_b
        .iter()
        .filter(|s| s.key.reason == Some(DenyCause::WrongDestination))
        .map(|s| &s.key)
        .collect();
    assert_eq!(wrong.len(), 1, "{at_b:#?}");
    assert_eq!(wrong[0].remote, IpAddr::V4(a));
    assert_eq!((wrong[0].role, wrong[0].port), (Role::Responder, 80));
}
