//! Routed prefixes: a subnet router forwards only its approved routes and filters them with
//! `dests` rules; a client sends a routed prefix to the router carrying it and accepts packets
//! from that prefix from that router only.

use super::*;
use ward_shared::routes::Prefix;

fn pre(s: &str) -> Prefix {
    s.parse().unwrap()
}

const DB: Ipv4Addr = Ipv4Addr::new(10, 20, 5, 10);

/// Node 0 (client) routes `client_routes` through node 1 (router), which is approved for
/// 10.20.0.0/16 and lets node 0 open udp/5432 on 10.20.5.10 only; node 2 (when present) is
/// an ordinary peer of both. Every core checks its own addresses.
fn routed_net(n: usize, seed: u64, client_routes: &[&str]) -> Net {
    let mut net = Net::new(n, seed);
    net.full_mesh();
    net.run_until_established(Duration::from_secs(5));
    for node in &net.nodes {
        assert!(node
            .core
            .set_local_prefixes(LocalPrefixes::own([node.ipv4.into(), node.ipv6.into()])));
    }
    let mut peers: Vec<PeerConfig> = (1..n).map(|i| net.nodes[i].peer_config()).collect();
    peers[0].routes = client_routes.iter().map(|s| pre(s)).collect();
    net.set_peers(0, peers);
    let router = &net.nodes[1].core;
    router.set_routes(vec![pre("10.20.0.0/16")]);
    let mut rules = allow_all(1..=n as u8);
    rules.push(FilterRule {
        rule: "client-db".into(),
        service: "legacy-db".into(),
        sources: vec![IpAddr::V4(net.nodes[0].ipv4)].into(),
        source_sets: Vec::new(),
        proto: Proto::Udp,
        ports: vec![PortRange { lo: 5432, hi: 5432 }],
        not_after_ms: None,
        dests: vec![pre("10.20.5.10/32")],
    });
    router.set_filter(rules);
    net
}

#[test]
fn the_router_accepts_approved_routed_destinations_its_rules_open() {
    let mut net = routed_net(2, 61, &["10.20.0.0/16"]);
    let allowed = udp4(net.nodes[0].ipv4, 40000, DB, 5432, b"query");
    net.send_ip(0, &allowed);
    net.run(Duration::from_millis(50));
    assert_eq!(
        net.nodes[1].delivered,
        vec![allowed],
        "forwarded into the router's TUN"
    );
    assert_eq!(net.nodes[0].core.counters().dropped_no_route, 0);
}

#[test]
fn the_router_denies_a_port_its_rules_do_not_open() {
    let mut net = routed_net(2, 62, &["10.20.0.0/16"]);
    // The allow-all device rules open every port on the router itself, never on a routed
    // address: only the routed rule counts there.
    net.send_ip(0, &udp4(net.nodes[0].ipv4, 40000, DB, 22, b"ssh?"));
    net.send_ip(
        0,
        &udp4(
            net.nodes[0].ipv4,
            40000,
            Ipv4Addr::new(10, 20, 5, 11),
            5432,
            b"x",
        ),
    );
    let own = udp4(net.nodes[0].ipv4, 40000, net.nodes[1].ipv4, 22, b"own");
    net.send_ip(0, &own);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![own]);
    assert_eq!(net.nodes[1].core.counters().dropped_filter_no_rule, 2);
}

#[test]
fn the_router_drops_destinations_outside_its_approved_routes() {
    // The client routes all of 10/8 to the router, which is approved for 10.20/16 only.
    let mut net = routed_net(2, 63, &["10.0.0.0/8"]);
    net.send_ip(
        0,
        &udp4(
            net.nodes[0].ipv4,
            40000,
            Ipv4Addr::new(10, 30, 0, 1),
            5432,
            b"x",
        ),
    );
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].delivered.is_empty());
    assert_eq!(net.nodes[1].core.counters().dropped_wrong_destination, 1);
    // Revoking the router's approval cuts the route at the router at once.
    net.nodes[1].core.set_routes(Vec::new());
    net.send_ip(0, &udp4(net.nodes[0].ipv4, 40000, DB, 5432, b"x"));
    net.run(Duration::from_millis(50));
    assert!(net.nodes[1].delivered.is_empty());
    assert_eq!(net.nodes[1].core.counters().dropped_wrong_destination, 2);
}

#[test]
fn the_client_accepts_replies_from_the_routed_prefix_from_its_router() {
    let mut net = routed_net(2, 64, &["10.20.0.0/16"]);
    let query = udp4(net.nodes[0].ipv4, 40000, DB, 5432, b"query");
    net.send_ip(0, &query);
    net.run(Duration::from_millis(50));
    // The LAN host answers; the router's kernel hands the reply to its TUN.
    let reply = udp4(DB, 5432, net.nodes[0].ipv4, 40000, b"rows");
    net.send_ip(1, &reply);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[0].delivered, vec![reply]);
    assert_eq!(net.nodes[1].core.counters().dropped_wrong_source, 0);
}

#[test]
fn a_non_router_peer_sending_from_a_routed_prefix_is_dropped() {
    let mut net = routed_net(3, 65, &["10.20.0.0/16"]);
    let query = udp4(net.nodes[0].ipv4, 40000, DB, 5432, b"query");
    net.send_ip(0, &query);
    net.run(Duration::from_millis(50));
    // Node 2 claims to be the database: it routes node 0 as usual but spoofs the source.
    // (Its own source check would stop it; a modified agent skips that.)
    let fake = udp4(DB, 5432, net.nodes[0].ipv4, 40000, b"forged");
    net.nodes[2].core.set_routes(vec![pre("10.20.0.0/16")]);
    net.send_ip(2, &fake);
    net.run(Duration::from_millis(50));
    assert!(net.nodes[0].delivered.is_empty(), "forged reply dropped");
    assert_eq!(net.nodes[0].core.counters().dropped_bad_source, 1);
    // The router's copy of the same reply passes.
    net.send_ip(1, &fake);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[0].delivered.len(), 1);
}

#[test]
fn routes_never_capture_overlay_addresses() {
    // A default route through the router (an exit node) leaves overlay addresses to their
    // own devices: an overlay address no peer holds is not sent to the exit node, and the
    // exit node does not send from another device's overlay address (the client's check,
    // `Table::may_send_from`, refuses overlay sources from routes too).
    let mut net = routed_net(3, 66, &["0.0.0.0/0"]);
    net.nodes[1].core.set_routes(vec![Prefix::V4_DEFAULT]);
    net.send_ip(
        0,
        &udp4(
            net.nodes[0].ipv4,
            40000,
            Ipv4Addr::new(100, 64, 9, 9),
            53,
            b"x",
        ),
    );
    let internet = udp4(
        net.nodes[0].ipv4,
        40000,
        Ipv4Addr::new(192, 0, 2, 1),
        5432,
        b"x",
    );
    net.send_ip(0, &internet);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[0].core.counters().dropped_no_route, 1);
    let spoof = udp4(
        net.nodes[2].ipv4,
        53,
        net.nodes[0].ipv4,
        40000,
        b"not yours",
    );
    net.send_ip(1, &spoof);
    net.run(Duration::from_millis(50));
    assert!(net.nodes[0].delivered.is_empty());
    assert_eq!(net.nodes[1].core.counters().dropped_wrong_source, 1);
}
