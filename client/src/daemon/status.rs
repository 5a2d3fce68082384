//! The typed views `ward status` and `ward posture` print, built from the agent core, the data
//! plane and the state file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ward_shared::filter::{PortRange, Proto};
use ward_shared::wire::WgPublicKey;

use super::relays::relay_link::Transports;
use crate::agent::{Agent, ConnState, Phase};
use crate::agent::{Netcheck, Relays};
use crate::api::{
    CountersView, DeviceView, ExitNodeView, InboundView, NetcheckView, OwnLeaseView, PathView,
    PeerView, PostureView, ReachView, RelayCheckView, State, StatusView,
};
use crate::dataplane::{self, DataPlane, PathStatus};
use crate::state::State as Identity;
use ward_runtime::now_ms;

/// A peer with no handshake this long after it was configured is reported unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(15);

/// What the status view is built from.
pub struct Sources<'a> {
    pub identity: Option<&'a Identity>,
    /// `None` while stopped.
    pub agent: Option<&'a Agent>,
    pub dataplane: Option<&'a DataPlane>,
    pub tun: Option<&'a str>,
    /// The transports of the control session and the relay links.
    pub transports: &'a Transports,
    /// The exit node chosen with `ward up --exit-node` (`None`: none).
    pub exit_node: Option<&'a str>,
}

pub fn status(s: Sources<'_>) -> StatusView {
    let Some(st) = s.identity else {
        return StatusView {
            state: State::NeedsLogin,
            peers: vec![],
            device: None,
        };
    };
    let state = match s.agent.map(|a| a.phase()) {
        None => State::Stopped,
        Some(Phase::Connecting) => State::Connecting,
        Some(Phase::Connected) => State::Connected,
        Some(Phase::Revoked) => State::Revoked,
    };
    let offset = s.agent.and_then(|a| a.clock_offset_ms());
    // Peers' lease stamps come unverified from the netmap: arithmetic on them saturates.
    let now = now_ms().saturating_add(offset.unwrap_or(0));
    let netmap = s.agent.and_then(|a| a.netmap());
    let dp_status: BTreeMap<u64, dataplane::PeerStatus> = s
        .dataplane
        .map(|dp| dp.status().into_iter().map(|p| (p.device_id, p)).collect())
        .unwrap_or_default();
    let peers: Vec<PeerView> = netmap
        .map(|nm| nm.peers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let ps = dp_status.get(&p.device_id.0);
            let since = s
                .agent
                .and_then(|a| a.peer_first_seen(p.device_id))
                .map(|t| Instant::now().saturating_duration_since(t));
            let hs = ps.and_then(|s| s.last_handshake);
            let path = match ps.map(|s| &s.path) {
                Some(PathStatus::Direct(addr)) => PathView::Direct { addr: *addr },
                Some(PathStatus::Relay(relay)) => PathView::Relay {
                    relay: relay.clone(),
                },
                Some(PathStatus::None) | None => PathView::None,
            };
            let (path_text, reachable) = match (s.dataplane, p.wg_public_key, hs, &path) {
                (None, _, _, _) => ("control-plane only (no data plane)".to_string(), false),
                (_, None, _, _) => ("peer has no data plane up".to_string(), false),
                (_, _, Some(_), PathView::Direct { .. } | PathView::Relay { .. }) => {
                    (path.to_string(), true)
                }
                (_, _, Some(_), PathView::None) => (
                    format!(
                        "direct {}",
                        ps.and_then(|s| s.endpoint)
                            .map(|e| e.to_string())
                            .unwrap_or_default()
                    ),
                    true,
                ),
                (_, _, None, _) if since.is_some_and(|t| t > UNREACHABLE_AFTER) => (
                    format!(
                        "unreachable: no direct path answered ({})",
                        s.agent.map_or_else(
                            || unreachable_reason(&Netcheck::default(), &Relays::default(), None),
                            |a| unreachable_reason(a.netcheck(), a.relays(), p.relay.as_deref())
                        )
                    ),
                    false,
                ),
                _ => ("connecting".to_string(), false),
            };
            let newest = p.leases.iter().max_by_key(|l| l.lease.serial);
            PeerView {
                lease_expires_in_secs: newest
                    .map(|l| l.lease.not_after_ms.saturating_sub(now) / 1000),
                key_age_secs: newest
                    .map(|l| now.saturating_sub(l.lease.not_before_ms).max(0) / 1000),
                lease_serial: newest.map(|l| l.lease.serial),
                device_id: p.device_id.0,
                hostname: p.hostname.to_string(),
                user: p.user.clone(),
                tags: p.tags.clone(),
                ipv4: p.ipv4,
                ipv6: p.ipv6,
                online: p.online,
                public_key: p.wg_public_key.map(|k| k.to_base64()),
                endpoints: p.endpoints.clone(),
                endpoint: ps.and_then(|s| s.endpoint),
                path_mtu: ps.and_then(|s| s.path_mtu),
                reachable,
                path,
                path_text,
                last_handshake_secs: hs.map(|d| d.as_secs()),
                rx_bytes: ps.map(|s| s.rx_bytes).unwrap_or(0),
                tx_bytes: ps.map(|s| s.tx_bytes).unwrap_or(0),
                dropped_bad_source: ps.map(|s| s.dropped_bad_source).unwrap_or(0),
                dns_name: None,
            }
        })
        .collect();
    let counters = s.dataplane.map(|dp| {
        let c = dp.counters();
        CountersView {
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            dropped_no_route: c.dropped_no_route,
            dropped_no_endpoint: c.dropped_no_endpoint,
            dropped_bad_source: c.dropped_bad_source,
            dropped_garbage: c.dropped_garbage,
            dropped_bad_tun_packet: c.dropped_bad_tun_packet,
            dropped_filter_no_rule: c.dropped_filter_no_rule,
            dropped_filter_expired: c.dropped_filter_expired,
            dropped_filter_other: c.dropped_filter_other,
            dropped_wrong_destination: c.dropped_wrong_destination,
            dropped_wrong_source: c.dropped_wrong_source,
            icmp_unreachable_sent: c.icmp_unreachable_sent,
            held_for_peer: c.held_for_peer,
            held_dropped: c.held_dropped,
            held_replayed: c.held_replayed,
            peer_wants: c.peer_wants,
            path: dp.path_counters(),
            discovery: dp.discovery_counters(),
        }
    });
    let reach = netmap
        .map(|nm| nm.reach_view())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.not_after_ms.is_none_or(|t| t > now))
        .map(|r| ReachView {
            service: r.service.clone(),
            hostname: r.hostname.to_string(),
            device_id: r.device_id.0,
            ports: fmt_ports(&r.proto, &r.ports),
            rule: r.rule.clone(),
            expires_in_secs: r.not_after_ms.map(|t| t.saturating_sub(now) / 1000),
        })
        .collect();
    let names: BTreeMap<IpAddr, String> = netmap
        .map(|nm| {
            nm.peers
                .iter()
                .flat_map(|p| {
                    [
                        (IpAddr::V4(p.ipv4), p.hostname.to_string()),
                        (IpAddr::V6(p.ipv6), p.hostname.to_string()),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let sets = netmap
        .map(|nm| ward_shared::peerset::book(&nm.peer_sets))
        .unwrap_or_default();
    let own: Vec<IpAddr> = netmap
        .map(|nm| vec![IpAddr::V4(nm.me.ipv4), IpAddr::V6(nm.me.ipv6)])
        .unwrap_or_default();
    let inbound = netmap
        .map(|nm| nm.inbound.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|r| r.not_after_ms.is_none_or(|t| t > now))
        .map(|r| {
            let from = inbound_from(r, &sets, &names, &own);
            InboundView {
                service: r.service.clone(),
                from,
                ports: fmt_ports(&r.proto, &r.ports),
                rule: r.rule.clone(),
                expires_in_secs: r.not_after_ms.map(|t| t.saturating_sub(now) / 1000),
            }
        })
        .collect();
    let lease = s.agent.and_then(|a| a.own_lease()).map(|l| OwnLeaseView {
        serial: l.lease.serial,
        expires_in_secs: l.lease.not_after_ms.saturating_sub(now) / 1000,
        ttl_secs: l.lease.not_after_ms.saturating_sub(l.lease.not_before_ms) / 1000,
    });
    let clock_warning = offset.filter(|o| o.saturating_abs() > 30_000).map(|o| {
        format!(
            "this device's clock is {:.1} s {} the coordinator's (corrected for)",
            o.saturating_abs() as f64 / 1000.0,
            if o > 0 { "behind" } else { "ahead of" }
        )
    });
    let key = match s.agent {
        Some(a) => a.public_key(),
        None => {
            let mut k = [0u8; 32];
            if st.wg_private_key.0.len() == 32 {
                k.copy_from_slice(&st.wg_private_key.0);
            }
            WgPublicKey(dataplane::public_key_for(&k))
        }
    };
    let verdict = s.agent.and_then(|a| a.posture_verdict());
    let exit_node = s.exit_node.map(|name| {
        let carries_default = netmap.is_some_and(|nm| {
            nm.peers
                .iter()
                .any(|p| p.hostname.as_str() == name && p.routes.iter().any(|r| r.is_default()))
        });
        exit_node_view(
            name,
            carries_default,
            peers.iter().find(|p: &&PeerView| p.hostname == name),
        )
    });
    StatusView {
        state,
        peers,
        device: Some(DeviceView {
            device_id: st.device_id.0,
            hostname: st.hostname.clone(),
            ipv4: st.ipv4,
            ipv6: st.ipv6,
            coordinator: s
                .agent
                .and_then(|a| a.coordinator())
                .unwrap_or(&st.coordinator)
                .to_string(),
            coordinators: s
                .agent
                .map(|a| a.coordinators().addrs().to_vec())
                .unwrap_or_else(|| st.coordinator_list()),
            lease,
            key: key.to_base64(),
            key_age_secs: s.agent.map(|a| {
                Instant::now()
                    .saturating_duration_since(a.key_since())
                    .as_secs()
            }),
            rotations: s.agent.map(|a| a.rotations()).unwrap_or(0),
            clock_warning,
            clock_offset_ms: offset,
            quarantine: verdict.and_then(|v| v.quarantine.clone()),
            unavailable: verdict.map(|v| v.unavailable.clone()).unwrap_or_default(),
            unavailable_more: verdict.map(|v| v.unavailable_more).unwrap_or(0),
            risk: verdict.and_then(|v| v.risk.clone()),
            sign_in_again: verdict.and_then(|v| v.sign_in_again().map(str::to_string)),
            reach,
            inbound,
            connected_secs: s
                .agent
                .and_then(|a| a.connected_since())
                .map(|t| Instant::now().saturating_duration_since(t).as_secs()),
            last_error: s.agent.and_then(|a| a.last_error()).map(String::from),
            tun: s.dataplane.and(s.tun).map(String::from),
            port: s.dataplane.map(|d| d.local_port()),
            public_key: s.dataplane.map(|d| WgPublicKey(d.public_key()).to_base64()),
            counters,
            home_relay: s.agent.and_then(|a| a.relays().home()).map(String::from),
            control_transport: s.transports.control.map(|t| t.to_string()),
            relay_transports: s
                .transports
                .relays
                .iter()
                .map(|(n, t)| (n.clone(), t.to_string()))
                .collect(),
            relay_udp_bound: s.transports.relay_udp_bound.iter().cloned().collect(),
            relay_udp_fallbacks: s.transports.relay_udp_fallbacks,
            flow_log: s.agent.map(|a| {
                let f = a.flow_status();
                crate::api::FlowLogView {
                    enabled: f.enabled,
                    window_ms: u64::try_from(f.window_ms).unwrap_or(0),
                    window_records: f.window_records as u64,
                    spool_reports: f.spool_reports as u64,
                    spool_records: f.spool_records as u64,
                    flow_records_dropped: f.flow_records_dropped,
                    reports_sent: f.reports_sent,
                    reports_acked: f.reports_acked,
                    last_acked_seq: f.last_acked_seq,
                    next_seq: f.next_seq,
                    early_reports: f.early_reports,
                }
            }),
            dns: None,
            exit_node,
            on_demand: netmap.is_some_and(|nm| nm.on_demand),
        }),
    }
}

/// The chosen exit node `name` as `ward status` shows it: `allowed` when the netmap gives this
/// device a default route through it, reachable when its peer entry answers too.
/// Who may open the inbound rule `r`, by name: its literal sources, then the members of the
/// peer sets it names: the peers whose addresses the sets hold, and any prefix that holds no
/// peer as written. This device's own addresses (`own`) are left out: a rule's source list is
/// shared by all its destinations, so it may list this device, which never reaches itself
/// through the overlay.
fn inbound_from(
    r: &ward_shared::filter::FilterRule,
    sets: &ward_shared::peerset::SetBook,
    names: &BTreeMap<IpAddr, String>,
    own: &[IpAddr],
) -> Vec<String> {
    let set_prefixes = r
        .source_sets
        .iter()
        .flat_map(|id| sets.get(id))
        .flat_map(|v| v.iter());
    let mut from: Vec<String> = r
        .sources
        .iter()
        .filter(|ip| !own.contains(ip))
        .map(|ip| names.get(ip).cloned().unwrap_or_else(|| ip.to_string()))
        .chain(set_prefixes.flat_map(|p| {
            let peers: Vec<String> = names
                .iter()
                .filter(|(ip, _)| p.contains(**ip))
                .map(|(_, n)| n.clone())
                .collect();
            if !peers.is_empty() {
                peers
            } else if own.iter().any(|ip| p.contains(*ip)) {
                vec![]
            } else {
                vec![p.to_string()]
            }
        }))
        .collect();
    from.sort();
    from.dedup();
    from
}

pub fn exit_node_view(name: &str, allowed: bool, peer: Option<&PeerView>) -> ExitNodeView {
    let reachable = allowed && peer.is_some_and(|p| p.reachable);
    let path = peer.filter(|_| reachable).map(|p| p.path_text.clone());
    let text = match (allowed, peer, &path) {
        (true, _, Some(path)) => {
            format!("exit node {name}: internet traffic goes through it ({path})")
        }
        (true, Some(p), None) => format!(
            "exit node {name} unavailable ({}): internet traffic is blocked (fail closed)",
            p.path_text
        ),
        (true, None, None) => format!(
            "exit node {name} unavailable (not connected): internet traffic is blocked (fail closed)"
        ),
        (false, Some(_), _) => format!(
            "exit node {name} unavailable (it offers no default route to this device: not approved as an exit node, or no policy rule grants it): internet traffic is blocked (fail closed)"
        ),
        (false, None, _) => format!(
            "exit node {name} unavailable (not in this device's netmap: unknown, offline, revoked or not allowed): internet traffic is blocked (fail closed)"
        ),
    };
    ExitNodeView {
        name: name.to_string(),
        allowed,
        reachable,
        path,
        text,
    }
}

/// Why no direct path answered, from what address discovery found, and why no relay carries
/// the traffic instead (`peer_relay`: the peer's home relay).
pub(super) fn unreachable_reason(
    nc: &Netcheck,
    relays: &Relays,
    peer_relay: Option<&str>,
) -> String {
    let relay_note = relay_note(relays, peer_relay);
    if nc.relays().next().is_none() {
        return "both sides may be behind NAT; no relay is configured".into();
    }
    if !nc.udp() {
        return format!(
            "no relay answered address discovery: UDP may be blocked here; {relay_note}"
        );
    }
    if nc.mapping_varies() == Some(true) {
        return format!("this device's NAT maps by destination: a relay is needed; {relay_note}");
    }
    let refl: Vec<String> = nc.reflexive().iter().map(|a| a.to_string()).collect();
    format!(
        "this device is reachable at {}; the peer's NAT may map by destination: a relay is needed; {relay_note}",
        refl.join(", ")
    )
}

/// Why the relay does not carry a peer's traffic.
fn relay_note(relays: &Relays, peer_relay: Option<&str>) -> String {
    let Some(name) = peer_relay else {
        return "the peer has no home relay".into();
    };
    match relays.conns().find(|c| c.name == name).map(|c| &c.state) {
        None => format!("the peer's relay {name} is not one of this device's relays"),
        Some(ConnState::Idle) => format!("no ticket for the peer's relay {name} yet"),
        Some(ConnState::Connecting) => format!("not connected to the peer's relay {name}"),
        Some(ConnState::Up { .. }) => format!("no answer through the relay {name} yet"),
    }
}

/// `ward netcheck`.
pub fn netcheck(agent: Option<&Agent>, transports: &Transports) -> NetcheckView {
    let Some(a) = agent else {
        return NetcheckView {
            udp: false,
            reflexive: Vec::new(),
            mapping_varies_by_dest: None,
            relays: Vec::new(),
            home_relay: None,
            control_transport: None,
        };
    };
    let nc = a.netcheck();
    let conns = a.relays();
    NetcheckView {
        udp: nc.udp(),
        reflexive: nc.reflexive(),
        mapping_varies_by_dest: nc.mapping_varies(),
        relays: nc
            .relays()
            .map(|r| RelayCheckView {
                name: r.name.clone(),
                addr: r.addr.clone(),
                latency_ms: r
                    .latency
                    .map(|l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
                observed: r.observed,
                error: r.error.clone(),
                transport: transports.relays.get(&r.name).map(|t| t.to_string()),
                plain_udp: transports.relay_udp_bound.contains(&r.name),
                ..relay_conn_view(conns, &r.name)
            })
            .collect(),
        home_relay: conns.home().map(String::from),
        control_transport: transports.control.map(|t| t.to_string()),
    }
}

/// One relay's connection state for `ward netcheck` (the discovery fields left empty).
fn relay_conn_view(relays: &Relays, name: &str) -> RelayCheckView {
    let c = relays.conns().find(|c| c.name == name);
    let (connection, rtt_ms) = match c.map(|c| &c.state) {
        None | Some(ConnState::Idle) => ("idle", None),
        Some(ConnState::Connecting) => ("connecting", None),
        Some(ConnState::Up { rtt, .. }) => (
            "up",
            Some(u64::try_from(rtt.as_millis()).unwrap_or(u64::MAX)),
        ),
    };
    RelayCheckView {
        name: name.to_string(),
        addr: String::new(),
        latency_ms: None,
        observed: None,
        error: None,
        connection: connection.into(),
        rtt_ms,
        connection_error: c.and_then(|c| c.last_error.clone()),
        transport: None,
        plain_udp: false,
    }
}

pub fn posture(agent: Option<&Agent>, custom_checks: Vec<String>) -> PostureView {
    PostureView {
        report: agent.and_then(|a| a.posture_report()).cloned(),
        verdict: agent.and_then(|a| a.posture_verdict()).cloned(),
        wants: agent.map(|a| a.posture_wants().clone()).unwrap_or_default(),
        custom_checks,
    }
}

/// `tcp/22,80-90`, `udp/*`, `icmp`.
fn fmt_ports(proto: &Proto, ports: &[PortRange]) -> String {
    let p = serde_json::to_value(proto)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    if ports.is_empty() {
        return p;
    }
    let list: Vec<String> = ports
        .iter()
        .map(|r| {
            if r.lo == r.hi {
                r.lo.to_string()
            } else if r.lo == 0 && r.hi == u16::MAX {
                "*".into()
            } else {
                format!("{}-{}", r.lo, r.hi)
            }
        })
        .collect();
    format!("{p}/{}", list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(reachable: bool, path_text: &str) -> PeerView {
        PeerView {
            device_id: 7,
            hostname: "exit".into(),
            user: None,
            tags: vec![],
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, 7),
            ipv6: std::net::Ipv6Addr::LOCALHOST,
            online: true,
            public_key: None,
            endpoints: vec![],
            endpoint: None,
            path_mtu: None,
            reachable,
            path: PathView::None,
            path_text: path_text.into(),
            last_handshake_secs: None,
            rx_bytes: 0,
            tx_bytes: 0,
            dropped_bad_source: 0,
            lease_serial: None,
            lease_expires_in_secs: None,
            key_age_secs: None,
            dns_name: None,
        }
    }

    /// A rule's sources are named by peer; this device's own addresses, which a shared source
    /// list may hold, are not shown, as a literal source or as a set prefix of its own.
    #[test]
    fn inbound_sources_are_named_without_this_device() {
        use ward_shared::filter::{FilterRule, Proto};
        use ward_shared::routes::Prefix;
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let own = [ip("100.64.0.1"), ip("fd00::1")];
        let names: BTreeMap<IpAddr, String> = [
            (ip("100.64.0.2"), "db".to_string()),
            (ip("fd00::2"), "db".to_string()),
        ]
        .into();
        let rule = |sources: Vec<IpAddr>, source_sets: Vec<u32>| FilterRule {
            rule: "r".into(),
            service: "s".into(),
            sources: sources.into(),
            source_sets,
            proto: Proto::Tcp,
            ports: vec![],
            not_after_ms: None,
            dests: vec![],
        };
        let none = ward_shared::peerset::SetBook::new();
        let flat = rule(
            vec![own[0], own[1], ip("100.64.0.2"), ip("100.64.0.9")],
            vec![],
        );
        assert_eq!(
            inbound_from(&flat, &none, &names, &own),
            ["100.64.0.9", "db"]
        );
        let host = |s: &str| Prefix::host(ip(s));
        let sets: ward_shared::peerset::SetBook = [(
            4,
            std::sync::Arc::new(vec![
                host("100.64.0.1"),
                host("100.64.0.2"),
                host("100.64.0.9"),
                host("fd00::1"),
            ]),
        )]
        .into();
        assert_eq!(
            inbound_from(&rule(vec![], vec![4]), &sets, &names, &own),
            ["100.64.0.9/32", "db"]
        );
    }

    #[test]
    fn an_allowed_answering_exit_node_is_in_use_with_its_path() {
        let v = exit_node_view("exit", true, Some(&peer(true, "relay r1")));
        assert!(v.allowed && v.reachable);
        assert_eq!(v.path.as_deref(), Some("relay r1"));
        assert_eq!(
            v.text,
            "exit node exit: internet traffic goes through it (relay r1)"
        );
    }

    #[test]
    fn an_exit_node_without_a_default_route_is_unavailable_and_blocks() {
        // In the netmap and answering, but the policy grants no default route through it.
        let v = exit_node_view("exit", false, Some(&peer(true, "direct 1.2.3.4:5")));
        assert!(!v.allowed && !v.reachable && v.path.is_none());
        assert!(
            v.text.starts_with("exit node exit unavailable ("),
            "{}",
            v.text
        );
        assert!(v
            .text
            .ends_with("internet traffic is blocked (fail closed)"));
        let v = exit_node_view("gone", false, None);
        assert!(v.text.contains("not in this device's netmap"), "{}", v.text);
        assert!(v.text.ends_with("blocked (fail closed)"));
    }

    #[test]
    fn an_allowed_exit_node_that_does_not_answer_is_unavailable() {
        let v = exit_node_view("exit", true, Some(&peer(false, "connecting")));
        assert!(v.allowed && !v.reachable);
        assert_eq!(
            v.text,
            "exit node exit unavailable (connecting): internet traffic is blocked (fail closed)"
        );
        let v = exit_node_view("exit", true, None);
        assert!(!v.reachable && v.text.contains("(not connected)"));
    }
}
