//! The device's own addresses: peers reach this device and nothing behind it, and this device
//! sends only from its own addresses.

use super::*;

/// The pair with both cores told their own addresses.
fn pair_with_own_addresses(seed: u64) -> Net {
    let net = established_pair(seed);
    for n in &net.nodes {
        assert!(n
            .core
            .set_local_prefixes(LocalPrefixes::own([n.ipv4.into(), n.ipv6.into()])));
    }
    net
}

#[test]
fn a_peer_cannot_reach_an_address_behind_this_device() {
    let mut net = pair_with_own_addresses(41);
    // The peer (node 0) routes a LAN address behind node 1 into its tunnel to node 1, as a
    // modified agent would; its inner source is its own and node 1's filter allows everything.
    let mut to_node1 = net.nodes[1].peer_config();
    let lan = Ipv4Addr::new(192, 168, 50, 2);
    to_node1.ipv4 = lan;
    net.set_peers(0, vec![to_node1]);
    let pivot = ipv4_packet(net.nodes[0].ipv4, lan, b"pivot");
    net.send_ip(0, &pivot);
    let own6 = ipv6_packet(net.nodes[0].ipv6, net.nodes[1].ipv6, b"own");
    net.send_ip(0, &own6);
    net.run(Duration::from_millis(50));
    assert_eq!(
        net.nodes[1].delivered,
        vec![own6],
        "only the packet for node 1 itself"
    );
    let c = net.nodes[1].core.counters();
    assert_eq!(c.dropped_wrong_destination, 1);
    assert_eq!(c.dropped_bad_source, 0);
}

#[test]
fn a_peer_cannot_reach_an_ipv6_address_behind_this_device() {
    let mut net = pair_with_own_addresses(42);
    let mut to_node1 = net.nodes[1].peer_config();
    let lan6: Ipv6Addr = "fd00:99::2".parse().unwrap();
    to_node1.ipv6 = lan6;
    net.set_peers(0, vec![to_node1]);
    net.send_ip(0, &ipv6_packet(net.nodes[0].ipv6, lan6, b"pivot"));
    let own4 = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"own");
    net.send_ip(0, &own4);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![own4]);
    assert_eq!(net.nodes[1].core.counters().dropped_wrong_destination, 1);
}

#[test]
fn this_device_sends_only_from_its_own_addresses() {
    let mut net = pair_with_own_addresses(43);
    let spoofed = ipv4_packet(Ipv4Addr::new(100, 64, 0, 99), net.nodes[1].ipv4, b"spoof");
    net.send_ip(0, &spoofed);
    let spoofed6 = ipv6_packet("fd00:1:2::99".parse().unwrap(), net.nodes[1].ipv6, b"spoof");
    net.send_ip(0, &spoofed6);
    let own = ipv4_packet(net.nodes[0].ipv4, net.nodes[1].ipv4, b"own");
    net.send_ip(0, &own);
    net.run(Duration::from_millis(50));
    assert_eq!(net.nodes[1].delivered, vec![own]);
    let c = net.nodes[0].core.counters();
    assert_eq!(c.dropped_wrong_source, 2);
    // Dropped before encryption: the receiver never saw them.
    assert_eq!(net.nodes[1].core.counters().dropped_bad_source, 0);
}

#[test]
fn own_addresses_are_set_once() {
    let net = pair_with_own_addresses(44);
    assert!(!net.nodes[0]
        .core
        .set_local_prefixes(LocalPrefixes::own([IpAddr::V4(Ipv4Addr::UNSPECIFIED)])));
}
