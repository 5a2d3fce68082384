//! Peers on demand in the registry: what a session on demand is sent, what `want_peer` holds
//! and refuses, and that deltas keep such a session equal to a fresh one.

use super::*;

/// Devices 1–3 (alice) and 4–6 (bob), strangers to each other; every session on demand.
fn on_demand_teams() -> Registry {
    let mut r = two_teams();
    r.set_peers_on_demand_above(0);
    r
}

fn v4(id: u64) -> IpAddr {
    IpAddr::V4(dev(id).ipv4)
}

fn refusals(out: &[Output], conn: ConnId) -> Vec<(PeerRef, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send {
                conn: c,
                msg: CoordinatorMsg::PeerRefused { by, reason },
            } if *c == conn => Some((by.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

/// The (rule, service) pairs of a netmap's filter that let `ip` in.
fn lets_in(nm: &Netmap, ip: IpAddr) -> BTreeSet<(String, String)> {
    let sets = peerset::book(&nm.peer_sets);
    nm.inbound
        .iter()
        .filter(|r| peerset::rule_has_source(r, &sets, ip))
        .map(|r| (r.rule.clone(), r.service.clone()))
        .collect()
}

/// The same for the compiled (every source listed) filter of `dev`.
fn compiled_lets_in(r: &Registry, dev: u64, ip: IpAddr) -> BTreeSet<(String, String)> {
    let no_sets = peerset::SetBook::new();
    r.compiled
        .devices
        .get(&DeviceId(dev))
        .map(|a| {
            a.inbound
                .iter()
                .filter(|r| peerset::rule_has_source(r, &no_sets, ip))
                .map(|r| (r.rule.clone(), r.service.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn ids(peers: &[Peer]) -> Vec<u64> {
    peers.iter().map(|p| p.device_id.0).collect()
}

#[test]
fn a_session_on_demand_gets_the_peers_it_wants_and_they_get_it_first() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 2, 3, 4]);
    let out = drain(&mut r);
    let first = netmap(&out, 10);
    assert!(first.on_demand);
    assert!(first.peers.is_empty(), "{:?}", ids(&first.peers));
    // Its rules and reach are whole; the sets its rules name hold only the peers it holds
    // (none yet), so they grow with what it holds, not with the devices the rules name.
    assert!(!first.inbound.is_empty());
    assert!(!first.peer_sets.is_empty());
    assert!(first.peer_sets.iter().all(|s| s.prefixes.is_empty()));
    assert!(!compiled_lets_in(&r, 1, v4(2)).is_empty());

    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 1),
        Ok(vec![DeviceId(2)])
    );
    let out = drain(&mut r);
    // The peer is told of the device before the device of the peer.
    let pos = |conn| {
        out.iter()
            .position(|o| matches!(o, Output::Send { conn: c, msg: CoordinatorMsg::NetmapDelta(_) } if *c == conn))
            .expect("a delta")
    };
    assert!(pos(20) < pos(10), "{out:?}");
    assert_eq!(ids(&deltas(&out, 20)[0].upsert), vec![1]);
    assert_eq!(ids(&deltas(&out, 10)[0].upsert), vec![2]);
    // The delta that brings the peer brings its addresses into the sets naming it.
    let mut held = first.clone();
    held.apply(&deltas(&out, 10)[0]).expect("applies");
    for ip in [v4(2), IpAddr::V6(dev(2).ipv6)] {
        assert_eq!(lets_in(&held, ip), compiled_lets_in(&r, 1, ip));
    }
    assert!(lets_in(&held, v4(3)).is_empty(), "device 3 is not held");
    // The services it may reach list the held destinations only.
    assert!(first.reach_services.iter().all(|l| l.devices.is_empty()));
    assert!(held
        .reach_services
        .iter()
        .any(|l| l.devices == vec![DeviceId(2)]));
    assert!(held
        .reach_services
        .iter()
        .all(|l| l.devices.iter().all(|d| *d == DeviceId(2))));
    assert!(deltas(&out, 30).is_empty(), "device 3 wanted nothing");
    // By IPv6 address too, and again: held already, nothing new to send.
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(IpAddr::V6(dev(2).ipv6)), 2),
        Ok(vec![DeviceId(2)])
    );
    assert!(deltas(&drain(&mut r), 10).is_empty());
    assert_eq!(r.want_counters().granted, 2);
    assert_eq!(r.held_peers(), (4, 2));
}

#[test]
fn a_want_by_key_finds_the_lease_holder() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 3]);
    r.handle_lease(lease_on(3, [7; 32], 1));
    drain(&mut r);
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Key(WgPublicKey([7; 32])), 1),
        Ok(vec![DeviceId(3)])
    );
    let out = drain(&mut r);
    let up = &deltas(&out, 10)[0].upsert;
    assert_eq!(ids(up), vec![3]);
    assert_eq!(up[0].wg_public_key, Some(WgPublicKey([7; 32])));
    // A key nobody holds reads like a stranger.
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Key(WgPublicKey([9; 32])), 1),
        Err(WantRefused::NotAllowed)
    );
}

#[test]
fn strangers_unknown_addresses_and_itself_are_refused_alike() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 4]);
    drain(&mut r);
    let unknown: IpAddr = "100.64.9.9".parse().unwrap();
    for by in [
        PeerRef::Addr(v4(4)),
        PeerRef::Addr(unknown),
        PeerRef::Addr(v4(1)),
    ] {
        assert_eq!(
            r.handle_want_peer(DeviceId(1), 10, by.clone(), 1),
            Err(WantRefused::NotAllowed),
            "{by}"
        );
    }
    let out = drain(&mut r);
    let refused = refusals(&out, 10);
    assert_eq!(refused.len(), 3);
    let reason = |i: usize| refused[i].1.replace(&refused[i].0.to_string(), "X");
    assert_eq!(
        reason(0),
        reason(1),
        "a stranger and an unknown address read alike"
    );
    assert!(reason(0).contains("policy"), "{}", reason(0));
    // Nothing was held either way.
    assert!(deltas(&out, 10).is_empty() && deltas(&out, 40).is_empty());
    assert_eq!(r.want_counters().refused, 3);
    // Another connection's want is no one's.
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 99, PeerRef::Addr(v4(2)), 1),
        Err(WantRefused::NoSession)
    );
}

#[test]
fn a_session_below_the_bound_or_on_protocol_3_gets_every_peer() {
    let mut r = two_teams();
    open_sessions(&mut r, &[1]);
    let nm = netmap(&drain(&mut r), 10);
    assert!(!nm.on_demand);
    assert_eq!(ids(&nm.peers), vec![2, 3]);
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 1),
        Err(WantRefused::NotOnDemand)
    );
    assert_eq!(refusals(&drain(&mut r), 10).len(), 1);

    let mut r = on_demand_teams();
    r.handle_session_opened_speaking(
        DeviceId(1),
        10,
        addr("10.0.0.1:1"),
        DeviceUpdate::default(),
        3,
    )
    .unwrap();
    let nm = netmap(&drain(&mut r), 10);
    assert!(!nm.on_demand);
    assert_eq!(ids(&nm.peers), vec![2, 3]);
}

#[test]
fn a_reconnect_keeps_the_held_peers_policy_still_allows() {
    let mut r = on_demand_teams();
    r.handle_session_opened_holding(
        DeviceId(1),
        10,
        addr("10.0.0.1:1"),
        DeviceUpdate::default(),
        PROTOCOL_VERSION,
        vec![DeviceId(3), DeviceId(4), DeviceId(77)],
    )
    .unwrap();
    let nm = netmap(&drain(&mut r), 10);
    assert!(nm.on_demand);
    assert_eq!(
        ids(&nm.peers),
        vec![3],
        "a stranger and an unknown id are not sent"
    );
}

#[test]
fn a_held_peer_revoked_or_cut_by_policy_is_removed_and_comes_back_when_allowed() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 2]);
    drain(&mut r);
    r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(3)), 1)
        .unwrap();
    r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 1)
        .unwrap();
    drain(&mut r);
    // A policy where alice's devices no longer reach each other.
    let apart = policy::parse(
        br#"
[groups]
b = ["bob"]
[services.b]
devices = ["group:b"]
ports = ["tcp/22"]
[[rules]]
from = ["group:b"]
to = ["b"]
"#,
        "test.toml",
    )
    .unwrap();
    r.handle_policy(apart);
    let out = drain(&mut r);
    let removed: BTreeSet<u64> = deltas(&out, 10)
        .iter()
        .flat_map(|d| d.remove.iter().map(|x| x.0))
        .collect();
    assert_eq!(removed, BTreeSet::from([2, 3]));
    // Allowed again: the held peers come back without a new want.
    r.handle_policy(open_policy());
    let out = drain(&mut r);
    let back: BTreeSet<u64> = deltas(&out, 10)
        .iter()
        .flat_map(|d| d.upsert.iter().map(|x| x.device_id.0))
        .collect();
    assert_eq!(back, BTreeSet::from([2, 3]));
    // Revoked: gone from the holder, and from its held set.
    r.handle_device_removed(DeviceId(3), "revoked");
    let out = drain(&mut r);
    assert!(deltas(&out, 10)
        .iter()
        .any(|d| d.remove == vec![DeviceId(3)]));
    assert_eq!(r.held_peers(), (2, 2), "device 1 holds 2, device 2 holds 1");
}

#[test]
fn wants_past_the_budget_are_dropped_until_the_next_second() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1]);
    drain(&mut r);
    for _ in 0..WANTS_PER_SECOND {
        assert_eq!(
            r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 5),
            Ok(vec![DeviceId(2)])
        );
    }
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 900),
        Err(WantRefused::Limited)
    );
    assert!(
        refusals(&drain(&mut r), 10).is_empty(),
        "a dropped want is not refused"
    );
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(3)), 1_005),
        Ok(vec![DeviceId(3)])
    );
    assert_eq!(r.want_counters().limited, 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever the order of wants, sessions opening and closing, endpoint changes, policy
    /// changes that keep who may reach whom (only the ports) and a revocation, and however
    /// many outputs are taken between them, every session on demand holds exactly the peers
    /// it and its peers wanted during the session (less the revoked), as deltas built them,
    /// its filter lets in what the compile in force lets in from them, and its grants are
    /// those of a fresh session.
    #[test]
    fn wants_and_churn_keep_every_session_on_demand_equal_to_its_held_set(
        steps in proptest::collection::vec((0u8..6, 1u64..6, 1u64..7, 0usize..8), 1..40)
    ) {
        let mut r = reg(&[1, 2, 3, 4, 5]);
        r.set_peers_on_demand_above(0);
        let mut ch = Churn::default();
        let mut removed: BTreeSet<u64> = BTreeSet::new();
        let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for (what, dev, other, outputs) in steps {
            match what {
                0 if !removed.contains(&dev) => {
                    if !ch.conn_of.contains_key(&dev) {
                        model.insert(dev, BTreeSet::new());
                    }
                    ch.open(&mut r, dev);
                }
                1 => {
                    ch.close(&mut r, dev);
                    model.remove(&dev);
                }
                2 if dev == 5 => {
                    r.handle_device_removed(DeviceId(dev), "revoked");
                    removed.insert(dev);
                    ch.gone(dev);
                    model.remove(&dev);
                    for m in model.values_mut() {
                        m.remove(&dev);
                    }
                }
                2 if dev == 3 || dev == 4 => {
                    // The same population over other ports: the sets keep their
                    // allocations and are cut again from what each session was sent.
                    // Two rules stay as they are, so a change to the third reaches a
                    // version-5 session as an edit of its filter and grants.
                    let ports = match other % 3 {
                        0 => "tcp/22",
                        1 => "tcp/23",
                        _ => "tcp/*\", \"icmp",
                    };
                    let text = format!(
                        "[groups]\neng = [\"alice\"]\n[services.all]\ndevices = [\"group:eng\"]\nports = [\"{ports}\"]\n[[rules]]\nfrom = [\"group:eng\"]\nto = [\"all\"]\n\
                         [services.web]\ndevices = [\"group:eng\"]\nports = [\"tcp/80\"]\n[[rules]]\nfrom = [\"group:eng\"]\nto = [\"web\"]\n\
                         [services.dns]\ndevices = [\"group:eng\"]\nports = [\"udp/53\"]\n[[rules]]\nfrom = [\"group:eng\"]\nto = [\"dns\"]\n"
                    );
                    r.handle_policy(policy::parse(text.as_bytes(), "test.toml").unwrap());
                }
                3 => {
                    if let Some(&c) = ch.conn_of.get(&dev) {
                        r.handle_session_update(
                            DeviceId(dev),
                            c,
                            DeviceUpdate {
                                wg_port: 51820 + other as u16,
                                ..Default::default()
                            },
                        );
                    }
                }
                _ => {
                    if let Some(&c) = ch.conn_of.get(&dev) {
                        // Only a session that has its first netmap is on demand yet.
                        ch.take(&mut r, usize::MAX);
                        let got = r.handle_want_peer(DeviceId(dev), c, PeerRef::Addr(v4(other)), 0);
                        let allowed = other != dev && other <= 5 && !removed.contains(&other);
                        proptest::prop_assert_eq!(got.is_ok(), allowed, "{} wants {}", dev, other);
                        if allowed {
                            model.entry(dev).or_default().insert(other);
                            if let Some(m) = model.get_mut(&other) {
                                m.insert(dev);
                            }
                        }
                    }
                }
            }
            ch.take(&mut r, outputs);
        }
        ch.take(&mut r, usize::MAX);
        for (dev, c) in ch.conn_of.clone() {
            let got: BTreeSet<u64> = ch
                .held
                .get(&c)
                .map(|nm| nm.peers.iter().map(|p| p.device_id.0).collect())
                .unwrap_or_default();
            let want = model.get(&dev).cloned().unwrap_or_default();
            proptest::prop_assert_eq!(&got, &want, "device {}", dev);
            // Its filter lets in what the compile lets in from the peers it holds, and
            // nothing from any other device.
            let nm = &ch.held[&c];
            for other in 1u64..=5 {
                let ip = v4(other);
                let expect = if got.contains(&other) {
                    compiled_lets_in(&r, dev, ip)
                } else {
                    BTreeSet::new()
                };
                proptest::prop_assert_eq!(lets_in(nm, ip), expect, "device {} from {}", dev, other);
            }
            // And each held peer as deltas left it (endpoints, online) is what a fresh
            // session holding the same peers is sent.
            let before = ch.held.get(&c).map(|nm| nm.peers.clone()).unwrap_or_default();
            let lists_before = ch
                .held
                .get(&c)
                .map(|nm| nm.reach_services.clone())
                .unwrap_or_default();
            let sorted_grants = |nm: Option<&Netmap>| {
                let mut g = nm.map(|nm| nm.reach_grants.clone()).unwrap_or_default();
                g.sort();
                g
            };
            let grants_before = sorted_grants(ch.held.get(&c));
            r.handle_session_closed(DeviceId(dev), c);
            ch.take(&mut r, usize::MAX);
            r.handle_session_opened_holding(
                DeviceId(dev),
                c,
                addr(&format!("10.0.0.{dev}:4000")),
                DeviceUpdate { wg_port: 51820, ..Default::default() },
                PROTOCOL_VERSION,
                got.iter().map(|i| DeviceId(*i)).collect(),
            )
            .unwrap();
            ch.held.remove(&c);
            ch.take(&mut r, usize::MAX);
            let fresh = ch.held.get(&c).map(|nm| nm.peers.clone()).unwrap_or_default();
            proptest::prop_assert_eq!(before, fresh, "device {}", dev);
            // The services' destination lists name the held peers only, as a fresh
            // session's do.
            let lists = ch
                .held
                .get(&c)
                .map(|nm| nm.reach_services.clone())
                .unwrap_or_default();
            for l in &lists {
                proptest::prop_assert!(l.devices.iter().all(|d| got.contains(&d.0)), "{:?}", l);
            }
            proptest::prop_assert_eq!(lists_before, lists, "device {}", dev);
            // And its grants, edited by each policy change, are a fresh session's.
            proptest::prop_assert_eq!(grants_before, sorted_grants(ch.held.get(&c)), "device {}", dev);
        }
    }
}

#[test]
fn a_change_to_a_device_concerns_its_holders_only() {
    let mut r = reg(&[1, 2, 3, 4, 5]);
    r.set_peers_on_demand_above(0);
    open_sessions(&mut r, &[1, 2, 3, 4, 5]);
    drain(&mut r);
    r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(2)), 1)
        .unwrap();
    drain(&mut r);
    let moved = |r: &mut Registry, dev: u64, port: u16| {
        r.handle_session_update(
            DeviceId(dev),
            dev * 10,
            DeviceUpdate {
                wg_port: port,
                local_endpoints: vec![addr(&format!("192.168.1.{dev}:{port}"))],
                ..Default::default()
            },
        );
        drain(r)
    };
    // Nobody holds 3: its move is nobody's delta.
    let out = moved(&mut r, 3, 4000);
    assert!(
        [10, 20, 30, 40, 50]
            .iter()
            .all(|c| deltas(&out, *c).is_empty()),
        "{out:?}"
    );
    // 2 is held by 1 only: its own session and 1's are looked at, no other.
    let produced = r.sessions_produced();
    let out = moved(&mut r, 2, 4001);
    assert_eq!(r.sessions_produced() - produced, 2);
    let told: Vec<ConnId> = [10, 20, 30, 40, 50]
        .into_iter()
        .filter(|c| !deltas(&out, *c).is_empty())
        .collect();
    assert_eq!(told, vec![10]);
    assert!(deltas(&out, 10)[0].upsert[0]
        .endpoints
        .contains(&addr("192.168.1.2:4001")));
}

#[test]
fn a_name_holds_the_service_s_devices_or_the_device_of_that_name() {
    // alice (1–3) reaches service `a` on her own devices; bob's are strangers.
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 2, 3, 4]);
    drain(&mut r);
    let name = |s: &str| PeerRef::Name(ward_shared::wire::Label::parse(s).unwrap());
    // The service: every device of it device 1 may reach (not itself).
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, name("A"), 1),
        Ok(vec![DeviceId(2), DeviceId(3)])
    );
    let out = drain(&mut r);
    let sent: BTreeSet<u64> = deltas(&out, 10)
        .iter()
        .flat_map(|d| d.upsert.iter().map(|p| p.device_id.0))
        .collect();
    assert_eq!(sent, BTreeSet::from([2, 3]));
    // A device by its hostname.
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 2]);
    drain(&mut r);
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, name("h2"), 1),
        Ok(vec![DeviceId(2)])
    );
    // A stranger's hostname and an unknown name read alike.
    for n in ["h4", "nothing"] {
        assert_eq!(
            r.handle_want_peer(DeviceId(1), 10, name(n), 1),
            Err(WantRefused::NotAllowed),
            "{n}"
        );
    }
    let out = drain(&mut r);
    assert_eq!(refusals(&out, 10).len(), 2);
}

#[test]
fn at_bound_zero_a_device_without_peers_yet_is_on_demand_too() {
    let mut r = reg(&[1]);
    r.set_peers_on_demand_above(0);
    open_sessions(&mut r, &[1]);
    let nm = netmap(&drain(&mut r), 10);
    assert!(nm.on_demand && nm.peers.is_empty());
    // A device joins: nobody asked for it, nobody is sent it.
    r.handle_device_upserted(dev(2));
    open_sessions(&mut r, &[2]);
    let out = drain(&mut r);
    assert!(
        deltas(&out, 10).iter().all(|d| d.upsert.is_empty()),
        "{out:?}"
    );
    assert!(netmap(&out, 20).on_demand);
}

/// A quarantine and a departure in one batch, on demand: the quarantined device leaves the
/// held sets at once and no pass before the compile cuts it back in.
#[test]
fn a_quarantined_held_peer_stays_out_of_the_sets_until_the_compile() {
    let mut r = on_demand_teams();
    open_sessions(&mut r, &[1, 2, 3]);
    let mut held: BTreeMap<ConnId, Netmap> = BTreeMap::new();
    let apply = |held: &mut BTreeMap<ConnId, Netmap>, out: &[Output]| {
        out.iter().for_each(|o| apply_output(held, o));
    };
    let out = drain(&mut r);
    apply(&mut held, &out);
    for (n, p) in [(1, 2), (2, 3)] {
        assert!(r
            .handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(p)), n)
            .is_ok());
    }
    let out = drain(&mut r);
    apply(&mut held, &out);
    assert!(!lets_in(&held[&10], v4(2)).is_empty());
    r.handle_device_upserted(quarantined(2));
    r.handle_device_removed(DeviceId(3), "revoked");
    let mut out_once = false;
    while let Some(o) = r.poll_output() {
        apply(&mut held, std::slice::from_ref(&o));
        let open = !lets_in(&held[&10], v4(2)).is_empty();
        out_once |= !open;
        assert!(!(out_once && open), "let in again by {o:?}");
    }
    assert!(out_once);
}

/// A session sent every peer while it had few goes on demand once its peers are well past the
/// bound: a whole netmap on demand, holding the peers it had; a protocol-3 session never does.
#[test]
fn a_session_whose_peers_grow_past_the_bound_goes_on_demand() {
    let mut r = reg(&[1, 2]);
    r.set_peers_on_demand_above(2);
    open_sessions(&mut r, &[1]);
    r.handle_session_opened_speaking(
        DeviceId(2),
        20,
        addr("10.0.0.2:1"),
        DeviceUpdate::default(),
        3,
    )
    .unwrap();
    let out = drain(&mut r);
    let nm = netmap(&out, 10);
    assert!(!nm.on_demand);
    assert_eq!(ids(&nm.peers), vec![2]);
    assert!(!netmap(&out, 20).on_demand);
    // Up to twice the bound, it stays as it is.
    for id in [3, 4, 5] {
        r.handle_device_upserted(dev(id));
    }
    let out = drain(&mut r);
    assert!(out.iter().all(|o| !matches!(
        o,
        Output::Send {
            msg: CoordinatorMsg::Netmap(_),
            ..
        }
    )));
    assert_eq!(
        ids(&deltas(&out, 10).last().expect("a delta").upsert),
        vec![3, 4, 5]
    );
    // Past it: a whole netmap on demand, with the peers it had.
    r.handle_device_upserted(dev(6));
    let out = drain(&mut r);
    let nm = netmap(&out, 10);
    assert!(nm.on_demand);
    assert_eq!(ids(&nm.peers), vec![2, 3, 4, 5]);
    assert_eq!(
        r.handle_want_peer(DeviceId(1), 10, PeerRef::Addr(v4(6)), 1),
        Ok(vec![DeviceId(6)])
    );
    let d = deltas(&drain(&mut r), 10);
    assert_eq!(ids(&d[0].upsert), vec![6]);
    assert_eq!(d[0].base_seq, nm.seq, "deltas follow the new netmap");
    // The protocol-3 session keeps every peer: no new netmap, deltas only.
    assert!(!out.iter().any(|o| matches!(
        o,
        Output::Send {
            conn: 20,
            msg: CoordinatorMsg::Netmap(_)
        }
    )));
}
