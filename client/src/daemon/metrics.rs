//! `ward daemon --metrics-listen`: this device's metrics in the Prometheus text format (every
//! family is listed in docs/metrics.md).
//!
//! Built from the same sources as `ward status`: the status view (control state, lease, key,
//! peers by path) and every data-plane counter. Labels come from fixed sets (direction, path,
//! reason, state); no label ever carries a device id, hostname or address.

use ward_runtime::metrics::{Exposition, Kind};

use crate::api::{PathView, State, StatusView};
use crate::dataplane::{DataPlaneCounters, DiscoveryCounters, PathMtuCounters};

/// The data plane's counters at one moment (`None` without a data plane: every counter 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct DataPlaneSnapshot {
    pub counters: DataPlaneCounters,
    pub path: PathMtuCounters,
    pub discovery: DiscoveryCounters,
}

/// The device's metrics as Prometheus text.
pub fn render(view: &StatusView, dp: Option<&DataPlaneSnapshot>) -> String {
    let mut e = Exposition::new();
    let dp = dp.copied().unwrap_or_default();
    // Destructured without `..`: a counter added to the data plane fails to compile here
    // until it is exported (and then the docs test asks for its documentation).
    let DataPlaneCounters {
        tx_packets,
        tx_bytes,
        rx_packets,
        rx_bytes,
        dropped_no_route,
        dropped_no_endpoint,
        dropped_bad_source,
        dropped_garbage,
        dropped_bad_tun_packet,
        handshake_initiations_sent,
        dropped_filter_no_rule,
        dropped_filter_expired,
        dropped_filter_other,
        dropped_wrong_destination,
        dropped_wrong_source,
        icmp_unreachable_sent,
        path_switches,
        direct_probes_sent,
        relay_tx_datagrams,
        relay_rx_datagrams,
        relay_dropped_queue_full,
        relay_dropped_unknown,
        peer_key_conflicts,
        held_for_peer,
        held_dropped,
        held_replayed,
        peer_wants,
    } = dp.counters;
    let PathMtuCounters {
        dropped_too_big,
        icmp_too_big_sent,
        path_mtu_changes,
        send_failed_too_big,
        send_failed_unreachable,
        send_failed_refused,
        send_failed_no_buffer,
        send_failed_other,
        probes_sent,
        probes_acked,
        probes_lost,
    } = dp.path;
    let DiscoveryCounters {
        requests_sent,
        responses_received,
        malformed,
        dropped_full,
    } = dp.discovery;

    let f = |v: u64| v as f64;
    e.labelled(
        "ward_device_packets_total",
        Kind::Counter,
        "IP packets through the tunnel: out (encrypted and sent to a peer), in (decrypted, checked and delivered).",
        "direction",
        &[("in", f(rx_packets)), ("out", f(tx_packets))],
    );
    e.labelled(
        "ward_device_bytes_total",
        Kind::Counter,
        "IP bytes through the tunnel, by direction (as ward_device_packets_total).",
        "direction",
        &[("in", f(rx_bytes)), ("out", f(tx_bytes))],
    );
    e.labelled(
        "ward_device_relay_datagrams_total",
        Kind::Counter,
        "WireGuard datagrams through a relay: out (queued for a relay), in (arrived through one).",
        "direction",
        &[
            ("in", f(relay_rx_datagrams)),
            ("out", f(relay_tx_datagrams)),
        ],
    );
    e.labelled(
        "ward_device_dropped_packets_total",
        Kind::Counter,
        "Packets and datagrams dropped by the data plane, by reason.",
        "reason",
        &[
            ("no_route", f(dropped_no_route)),
            ("no_endpoint", f(dropped_no_endpoint)),
            ("bad_source", f(dropped_bad_source)),
            ("garbage", f(dropped_garbage)),
            ("bad_tun_packet", f(dropped_bad_tun_packet)),
            ("filter_no_rule", f(dropped_filter_no_rule)),
            ("filter_expired", f(dropped_filter_expired)),
            ("filter_other", f(dropped_filter_other)),
            ("wrong_destination", f(dropped_wrong_destination)),
            ("wrong_source", f(dropped_wrong_source)),
            ("too_big", f(dropped_too_big)),
            ("relay_queue_full", f(relay_dropped_queue_full)),
            ("relay_unknown", f(relay_dropped_unknown)),
            ("held_for_peer", f(held_dropped)),
        ],
    );
    e.labelled(
        "ward_device_peers_on_demand_total",
        Kind::Counter,
        "Peers on demand: packets and initiations held while their peer was asked for, those \
         sent once it arrived, and the peers asked for.",
        "event",
        &[
            ("held", f(held_for_peer)),
            ("replayed", f(held_replayed)),
            ("wanted", f(peer_wants)),
        ],
    );
    e.counter(
        "ward_device_handshake_initiations_total",
        "WireGuard handshake initiations sent (every candidate path counted).",
        handshake_initiations_sent,
    );
    e.counter(
        "ward_device_icmp_unreachable_sent_total",
        "ICMP administratively-prohibited errors written back to the TUN for destinations without a peer.",
        icmp_unreachable_sent,
    );
    e.counter(
        "ward_device_path_switches_total",
        "Path changes over all peers (direct and relayed, or to another direct address).",
        path_switches,
    );
    e.counter(
        "ward_device_direct_probes_total",
        "Keepalives sent to direct candidates while relayed (hole punching).",
        direct_probes_sent,
    );
    e.counter(
        "ward_device_peer_key_conflicts_total",
        "Peer entries ignored because their key is held by another device's entry.",
        peer_key_conflicts,
    );
    e.counter(
        "ward_device_icmp_too_big_sent_total",
        "ICMP fragmentation-needed / packet-too-big errors written back to the TUN.",
        icmp_too_big_sent,
    );
    e.counter(
        "ward_device_path_mtu_changes_total",
        "Path MTU changes learned.",
        path_mtu_changes,
    );
    e.labelled(
        "ward_device_path_mtu_probes_total",
        Kind::Counter,
        "Active path-MTU probes of direct paths: sent, acknowledged by the peer, lost (unanswered when their round ended).",
        "outcome",
        &[
            ("acked", f(probes_acked)),
            ("lost", f(probes_lost)),
            ("sent", f(probes_sent)),
        ],
    );
    e.labelled(
        "ward_device_send_failures_total",
        Kind::Counter,
        "Datagrams the kernel refused to send, by reason.",
        "reason",
        &[
            ("too_big", f(send_failed_too_big)),
            ("unreachable", f(send_failed_unreachable)),
            ("refused", f(send_failed_refused)),
            ("no_buffer", f(send_failed_no_buffer)),
            ("other", f(send_failed_other)),
        ],
    );
    e.counter(
        "ward_device_discovery_requests_total",
        "Address-discovery binding requests sent.",
        requests_sent,
    );
    e.labelled(
        "ward_device_discovery_responses_total",
        Kind::Counter,
        "Address-discovery responses, by outcome: accepted, malformed, dropped (inbox full).",
        "outcome",
        &[
            ("accepted", f(responses_received)),
            ("malformed", f(malformed)),
            ("dropped", f(dropped_full)),
        ],
    );

    // From the status view.
    let states = [
        State::NeedsLogin,
        State::Stopped,
        State::Connecting,
        State::Connected,
        State::Revoked,
    ];
    let one_hot: Vec<(&str, f64)> = states
        .iter()
        .map(|s| (state_name(*s), f64::from(u8::from(*s == view.state))))
        .collect();
    e.labelled(
        "ward_device_control_state",
        Kind::Gauge,
        "The control session's state (1 on the current one).",
        "state",
        &one_hot,
    );
    let dev = view.device.as_ref();
    e.counter(
        "ward_device_key_rotations_total",
        "WireGuard key rotations since the daemon started.",
        dev.map(|d| d.rotations).unwrap_or(0),
    );
    e.gauge(
        "ward_device_key_age_seconds",
        "Age of the current WireGuard key (0 while stopped).",
        dev.and_then(|d| d.key_age_secs).unwrap_or(0) as f64,
    );
    e.gauge(
        "ward_device_lease_expires_in_seconds",
        "Seconds until this device's own lease expires (0 without a lease).",
        dev.and_then(|d| d.lease.as_ref())
            .map(|l| l.expires_in_secs.max(0))
            .unwrap_or(0) as f64,
    );
    e.gauge(
        "ward_device_quarantined",
        "1 while the coordinator has this device quarantined.",
        f64::from(u8::from(dev.is_some_and(|d| d.quarantine.is_some()))),
    );
    e.gauge(
        "ward_device_relay_udp_bound",
        "QUIC relay links whose relayed datagrams go in plain UDP now (bound).",
        dev.map_or(0, |d| d.relay_udp_bound.len()) as f64,
    );
    e.counter(
        "ward_device_relay_udp_fallbacks_total",
        "Plain-UDP bind attempts or refreshes to relays left unanswered (the link went or stayed on QUIC datagrams).",
        dev.map_or(0, |d| d.relay_udp_fallbacks),
    );
    let flows = dev.and_then(|d| d.flow_log.as_ref());
    e.counter(
        "ward_device_flow_records_dropped_total",
        "Flow records dropped because a cap was hit (window, spool, data-plane samples).",
        flows.map_or(0, |f| f.flow_records_dropped),
    );
    e.gauge(
        "ward_device_flow_spool_records",
        "Flow records in reports the coordinator has not acknowledged yet.",
        flows.map_or(0, |f| f.spool_records) as f64,
    );
    let mut peers = [("direct", 0.0), ("relay", 0.0), ("none", 0.0)];
    let mut bytes = [[0.0f64; 2]; 3];
    for p in &view.peers {
        let i = match p.path {
            PathView::Direct { .. } => 0,
            PathView::Relay { .. } => 1,
            PathView::None => 2,
        };
        peers[i].1 += 1.0;
        bytes[i][0] += p.rx_bytes as f64;
        bytes[i][1] += p.tx_bytes as f64;
    }
    e.labelled(
        "ward_device_peers",
        Kind::Gauge,
        "Peers in the netmap, by the path their traffic takes now.",
        "path",
        &peers,
    );
    e.gauge(
        "ward_device_peers_reachable",
        "Peers with a completed handshake on a path.",
        view.peers.iter().filter(|p| p.reachable).count() as f64,
    );
    e.family(
        "ward_device_peer_bytes",
        Kind::Gauge,
        "Bytes exchanged with peers (their current sessions), summed by the path each peer uses now; a peer that changes path moves its bytes with it.",
    );
    for (i, (path, _)) in peers.iter().enumerate() {
        for (j, dir) in ["in", "out"].iter().enumerate() {
            e.sample(
                "ward_device_peer_bytes",
                &[("direction", dir), ("path", path)],
                bytes[i][j],
            );
        }
    }
    e.finish()
}

fn state_name(s: State) -> &'static str {
    match s {
        State::NeedsLogin => "needs_login",
        State::Stopped => "stopped",
        State::Connecting => "connecting",
        State::Connected => "connected",
        State::Revoked => "revoked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_and_parses_strictly() {
        let view = StatusView {
            state: State::Connected,
            peers: vec![],
            device: None,
        };
        let dp = DataPlaneSnapshot {
            counters: DataPlaneCounters {
                tx_packets: 3,
                rx_bytes: 700,
                dropped_filter_no_rule: 2,
                handshake_initiations_sent: 5,
                relay_tx_datagrams: 4,
                ..Default::default()
            },
            path: PathMtuCounters {
                send_failed_refused: 1,
                ..Default::default()
            },
            discovery: DiscoveryCounters::default(),
        };
        let text = render(&view, Some(&dp));
        let p = ward_runtime::metrics::parse_strict(&text).unwrap();
        let v = |n: &str, l: &[(&str, &str)]| p.value(n, l).unwrap_or(-1.0);
        assert_eq!(v("ward_device_packets_total", &[("direction", "out")]), 3.0);
        assert_eq!(v("ward_device_bytes_total", &[("direction", "in")]), 700.0);
        assert_eq!(
            v(
                "ward_device_dropped_packets_total",
                &[("reason", "filter_no_rule")]
            ),
            2.0
        );
        assert_eq!(v("ward_device_handshake_initiations_total", &[]), 5.0);
        assert_eq!(
            v("ward_device_relay_datagrams_total", &[("direction", "out")]),
            4.0
        );
        assert_eq!(
            v("ward_device_send_failures_total", &[("reason", "refused")]),
            1.0
        );
        assert_eq!(
            v("ward_device_control_state", &[("state", "connected")]),
            1.0
        );
        assert_eq!(v("ward_device_control_state", &[("state", "stopped")]), 0.0);
        // Without a data plane every family is still there, at zero.
        let bare = render(&view, None);
        let q = ward_runtime::metrics::parse_strict(&bare).unwrap();
        assert_eq!(q.families, p.families);
    }
}
