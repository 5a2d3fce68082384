//! Coordinated hole punching on a pair behind NATs that let in only datagrams from addresses
//! they sent to (endpoint-dependent filtering): the harness plays the coordinator, carrying
//! each side's punch requests to the other after a control-channel delay, with the
//! requester's public candidates. Also: a NAT mapping change while direct, and a relay
//! failure while relayed.

use super::*;

/// Control-channel delay, device → coordinator → device.
const CONTROL_DELAY: Duration = Duration::from_millis(40);

/// A pair homed on relay "r1", both connected to it, each behind a NAT, knowing only the
/// other's private (unroutable) address: relayed, with a session.
fn natted_relayed_pair(seed: u64) -> Net {
    let mut net = Net::new(2, seed);
    for n in &mut net.nodes {
        n.nat = Some(Default::default());
    }
    for i in 0..2 {
        net.nodes[i]
            .core
            .set_relays(vec![("r1".into(), 1200), ("r2".into(), 1200)], net.now);
    }
    let (a, b) = (private_config(&net, 0), private_config(&net, 1));
    net.set_peers(0, vec![b]);
    net.run(TICK * 3);
    net.set_peers(1, vec![a]);
    let end = net.now + Duration::from_secs(2);
    while !(0..2).all(|i| net.nodes[i].core.status()[0].last_handshake.is_some()) {
        assert!(net.now < end, "no session over the relay");
        net.step();
    }
    net
}

/// Node `i` as a peer homed on `relay`, with only its private address as a candidate.
fn private_config(net: &Net, i: usize) -> PeerConfig {
    PeerConfig {
        relay: Some("r1".into()),
        endpoints: vec![format!("192.168.{}.2:51820", i + 1).parse().unwrap()],
        ..net.nodes[i].peer_config()
    }
}

/// Node `i`'s config as its peer sees it once discovery found its public address.
fn public_config(net: &Net, i: usize, relay: &str) -> PeerConfig {
    let mut c = private_config(net, i);
    c.endpoints.insert(0, net.nodes[i].src);
    c.relay = Some(relay.into());
    c
}

fn path_of(net: &Net, i: usize) -> PathStatus {
    net.status_of(i, net.nodes[1 - i].device_id()).path
}

fn both_direct(net: &Net) -> bool {
    (0..2).all(|i| path_of(net, i) == PathStatus::Direct(net.nodes[1 - i].src))
}

/// The harness's coordinator: punch requests in flight (due, to node, from device, its
/// candidates).
#[derive(Default)]
struct Coordinator {
    on: bool,
    in_flight: Vec<(Instant, usize, u64, Vec<SocketAddr>)>,
    forwarded: usize,
}

impl Coordinator {
    /// One step of the network, then the control channel: requests are taken from every
    /// node (always, as the driver does) and, if coordination is on, delivered to the peer.
    fn step(&mut self, net: &mut Net) {
        net.step();
        for i in 0..net.nodes.len() {
            for peer in net.nodes[i].core.take_punch_requests(net.now) {
                let Some(j) = net.nodes.iter().position(|n| n.device_id() == peer) else {
                    continue;
                };
                if self.on {
                    let from = net.nodes[i].device_id();
                    let eps = net.nodes[i].addrs.clone();
                    self.in_flight.push((net.now + CONTROL_DELAY, j, from, eps));
                }
            }
        }
        let now = net.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(at, ..)| *at <= now);
        self.in_flight = later;
        for (_, j, from, eps) in due {
            // A peer not configured yet ignores it (as its agent does).
            let mut out = Outbox::new();
            if net.nodes[j].core.punch(from, &eps, now, &mut out) {
                self.forwarded += 1;
            }
            net.transmit(j, &out);
        }
    }

    /// Steps (sending a packet each way every tick if `traffic`) until `done` or `limit`;
    /// returns how long it took.
    fn run_until(
        &mut self,
        net: &mut Net,
        limit: Duration,
        traffic: bool,
        done: impl Fn(&Net) -> bool,
    ) -> Option<Duration> {
        let start = net.now;
        while net.now < start + limit {
            if traffic {
                let (a4, b4) = (net.nodes[0].ipv4, net.nodes[1].ipv4);
                net.send_ip(0, &ipv4_packet(a4, b4, b"a->b"));
                net.send_ip(1, &ipv4_packet(b4, a4, b"b->a"));
            }
            self.step(net);
            if done(net) {
                return Some(net.now - start);
            }
        }
        None
    }
}

/// How long these NATs let a remote address in after the last datagram sent to it: shorter
/// than the gap between the two sides' periodic probes, as real NATs' 30 s or more is
/// shorter than probes minutes apart. Uncoordinated probes then only meet by luck.
const SHORT_NAT_TIMEOUT: Duration = Duration::from_secs(2);

/// The race: both sides know each other's public address, but a firewall between them kept
/// the direct path shut, so they sit on the relay probing every `DIRECT_PROBE_INTERVAL`, their
/// timers 2.5 s apart. The firewall goes; once B's NAT has forgotten B's last periodic probe,
/// A's network changes, so A probes B at once (a burst, and a punch request if coordination
/// is on): B's NAT drops A's probes. Returns how long after that both sides were direct
/// (within 12 s).
fn punch_race(seed: u64, coordinated: bool, loss: f64) -> Option<Duration> {
    let mut net = Net::new(2, seed);
    net.nat_timeout = Some(SHORT_NAT_TIMEOUT);
    net.block_direct = true;
    for n in &mut net.nodes {
        n.nat = Some(Default::default());
    }
    for i in 0..2 {
        net.nodes[i]
            .core
            .set_relays(vec![("r1".into(), 1200)], net.now);
    }
    let mut c = Coordinator {
        on: coordinated,
        ..Default::default()
    };
    let (a, b) = (public_config(&net, 0, "r1"), public_config(&net, 1, "r1"));
    net.set_peers(0, vec![b]);
    c.run_until(&mut net, Duration::from_millis(2500), false, |_| false);
    net.set_peers(1, vec![a]);
    c.run_until(
        &mut net,
        FAST_DIRECT_PERIOD + Duration::from_secs(3),
        false,
        |_| false,
    );
    assert!((0..2).all(|i| path_of(&net, i) == PathStatus::Relay("r1".into())));
    assert!((0..2).all(|i| net.nodes[i].core.status()[0].last_handshake.is_some()));
    net.block_direct = false;
    net.loss = loss;
    // Wait for B's next periodic direct probe (a keepalive to A's address).
    let a_addr = net.nodes[0].src;
    let probes_to_a = |net: &Net| {
        net.nodes[1]
            .sent
            .iter()
            .filter(|(d, p)| *d == Destination::Udp(a_addr) && p.len() == DATA_OVERHEAD)
            .count()
    };
    let before = probes_to_a(&net);
    c.run_until(&mut net, DIRECT_PROBE_INTERVAL * 2, false, |net| {
        probes_to_a(net) > before
    })
    .expect("B probes periodically");
    let early = c.run_until(
        &mut net,
        SHORT_NAT_TIMEOUT + Duration::from_millis(200),
        false,
        both_direct,
    );
    assert!(early.is_none(), "the periodic probes met by chance");
    net.nodes[0].core.network_changed(net.now);
    c.run_until(&mut net, Duration::from_secs(12), false, both_direct)
}

#[test]
fn coordinated_punch_goes_direct_within_a_second_of_the_request() {
    for seed in 0..5 {
        let took = punch_race(90 + seed, true, 0.0).expect("direct");
        eprintln!("coordinated, seed {seed}: both direct {took:?} after the request");
        assert!(
            took <= Duration::from_secs(1),
            "seed {seed}: direct after {took:?}"
        );
    }
}

#[test]
fn without_coordination_the_pair_waits_for_the_peers_next_probe() {
    for seed in 0..5 {
        let took = punch_race(90 + seed, false, 0.0).expect("direct in the end");
        eprintln!("uncoordinated, seed {seed}: both direct {took:?} after A's probes");
        // A's probes open its NAT but are dropped by B's; the pair waits for B's next
        // periodic probe, nearly 3 s later.
        assert!(
            took >= Duration::from_secs(2),
            "seed {seed}: direct after {took:?}"
        );
    }
}

#[test]
fn coordinated_punch_survives_loss() {
    // A burst of several keepalives from each side: one getting through each way is enough.
    let mut fast = 0;
    for seed in 0..10 {
        let took = punch_race(100 + seed, true, 0.3).expect("direct");
        eprintln!("coordinated, 30 % loss, seed {seed}: both direct after {took:?}");
        if took <= Duration::from_secs(1) {
            fast += 1;
        }
    }
    assert_eq!(fast, 10, "{fast}/10 direct within 1 s at 30 % loss");
}

#[test]
fn nat_mapping_change_while_direct_falls_back_then_punches_to_the_new_address() {
    let mut net = natted_relayed_pair(110);
    let mut c = Coordinator {
        on: true,
        ..Default::default()
    };
    let (a, b) = (public_config(&net, 0, "r1"), public_config(&net, 1, "r1"));
    net.set_peers(0, vec![b]);
    net.set_peers(1, vec![a]);
    c.run_until(&mut net, Duration::from_secs(2), true, both_direct)
        .expect("direct through both NATs");
    // B's NAT drops its mapping and gives it a new public port: the old address reaches
    // nobody, and the new mapping lets nothing in that B has not sent to since.
    let old = net.nodes[1].src;
    let new: SocketAddr = "10.203.0.2:40000".parse().unwrap();
    net.nodes[1].src = new;
    net.nodes[1].addrs = vec![new];
    net.nodes[1].nat = Some(Default::default());
    // A's NAT drops B's data from the new address; A's data goes to the old one: both
    // fall back to the relay, and punch each other with their current candidates, which
    // the coordinator hands over (B's now the new address).
    let took = c
        .run_until(&mut net, Duration::from_secs(10), true, |net| {
            (0..2).all(|i| path_of(net, i) == PathStatus::Relay("r1".into()))
        })
        .expect("fell back to the relay");
    assert!(took <= FALLBACK_SILENCE + TIMER_INTERVAL * 2, "{took:?}");
    let took = c
        .run_until(&mut net, Duration::from_secs(5), true, both_direct)
        .expect("direct again");
    assert!(
        took <= Duration::from_secs(1),
        "direct again after {took:?}"
    );
    assert_eq!(path_of(&net, 0), PathStatus::Direct(new));
    assert_ne!(old, new);
}

#[test]
fn relay_failure_while_relayed_moves_the_pair_to_the_other_relay() {
    let mut net = natted_relayed_pair(120);
    let mut c = Coordinator::default();
    c.run_until(&mut net, Duration::from_secs(1), true, |_| false);
    assert!((0..2).all(|i| path_of(&net, i) == PathStatus::Relay("r1".into())));
    // r1 dies: both lose it, and (as their agents choose r2 and publish it) each learns
    // the other is now homed on r2.
    for i in 0..2 {
        net.nodes[i]
            .core
            .set_relays(vec![("r2".into(), 1200)], net.now);
    }
    let (a, b) = (private_config(&net, 0), private_config(&net, 1));
    let on_r2 = |mut p: PeerConfig| {
        p.relay = Some("r2".into());
        p
    };
    net.set_peers(0, vec![on_r2(b)]);
    net.set_peers(1, vec![on_r2(a)]);
    assert!((0..2).all(|i| path_of(&net, i) == PathStatus::Relay("r2".into())));
    let before = net.nodes[1].delivered.len();
    c.run_until(&mut net, Duration::from_millis(500), true, |_| false);
    let got = net.nodes[1].delivered.len() - before;
    assert!(got >= 45, "only {got} of 50 packets through r2");
}
