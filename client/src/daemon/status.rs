//! The typed views `ward status` and `ward posture` print, built from the agent core, the data
//! plane and the state file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ward_shared::filter::{PortRange, Proto};
use ward_shared::wire::WgPublicKey;

use crate::agent::Netcheck;
use crate::agent::{Agent, Phase};
use crate::api::{
    CountersView, DeviceView, InboundView, NetcheckView, OwnLeaseView, PeerView, PostureView,
    ReachView, RelayCheckView, State, StatusView,
};
use crate::dataplane::{self, DataPlane};
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
    let peers = netmap
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
            let (path, reachable) = match (s.dataplane, p.wg_public_key, hs) {
                (None, _, _) => ("control-plane only (no data plane)".to_string(), false),
                (_, None, _) => ("peer has no data plane up".to_string(), false),
                (_, _, Some(_)) => (
                    format!(
                        "direct {}",
                        ps.and_then(|s| s.endpoint)
                            .map(|e| e.to_string())
                            .unwrap_or_default()
                    ),
                    true,
                ),
                (_, _, None) if since.is_some_and(|t| t > UNREACHABLE_AFTER) => (
                    format!(
                        "unreachable: no direct path answered ({})",
                        s.agent.map_or_else(
                            || unreachable_reason(&Netcheck::default()),
                            |a| unreachable_reason(a.netcheck())
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
                last_handshake_secs: hs.map(|d| d.as_secs()),
                rx_bytes: ps.map(|s| s.rx_bytes).unwrap_or(0),
                tx_bytes: ps.map(|s| s.tx_bytes).unwrap_or(0),
                dropped_bad_source: ps.map(|s| s.dropped_bad_source).unwrap_or(0),
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
            icmp_unreachable_sent: c.icmp_unreachable_sent,
            path: dp.path_counters(),
            discovery: dp.discovery_counters(),
        }
    });
    let reach = netmap
        .map(|nm| nm.reach.as_slice())
        .unwrap_or_default()
        .iter()
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
    let inbound = netmap
        .map(|nm| nm.inbound.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|r| r.not_after_ms.is_none_or(|t| t > now))
        .map(|r| {
            let mut from: Vec<String> = r
                .sources
                .iter()
                .map(|ip| names.get(ip).cloned().unwrap_or_else(|| ip.to_string()))
                .collect();
            from.sort();
            from.dedup();
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
    StatusView {
        state,
        peers,
        device: Some(DeviceView {
            device_id: st.device_id.0,
            hostname: st.hostname.clone(),
            ipv4: st.ipv4,
            ipv6: st.ipv6,
            coordinator: st.coordinator.clone(),
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
        }),
    }
}

/// Why no direct path answered, from what address discovery found.
pub(super) fn unreachable_reason(nc: &Netcheck) -> String {
    if nc.relays().next().is_none() {
        return "both sides may be behind NAT; relays are not available yet".into();
    }
    if !nc.udp() {
        return "no relay answered address discovery: UDP may be blocked here; relays cannot carry traffic yet".into();
    }
    if nc.mapping_varies() == Some(true) {
        return "this device's NAT maps by destination: a relay is needed, not available yet"
            .into();
    }
    let refl: Vec<String> = nc.reflexive().iter().map(|a| a.to_string()).collect();
    format!(
        "this device is reachable at {}; the peer's NAT may map by destination: a relay is needed, not available yet",
        refl.join(", ")
    )
}

/// `ward netcheck`.
pub fn netcheck(agent: Option<&Agent>) -> NetcheckView {
    let Some(nc) = agent.map(|a| a.netcheck()) else {
        return NetcheckView {
            udp: false,
            reflexive: Vec::new(),
            mapping_varies_by_dest: None,
            relays: Vec::new(),
        };
    };
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
            })
            .collect(),
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
