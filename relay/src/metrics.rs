//! `--metrics-listen`: the relay's counters in the Prometheus text format (docs/metrics.md),
//! served by the shared `/metrics` responder of `ward_runtime::metrics`.

use crate::core::{Refusal, Stats};
use crate::forward::{self, Drop};
use std::sync::Arc;
use tokio::net::TcpListener;
use ward_runtime::metrics::{Exposition, Kind, Limits};

/// Everything the relay counts, at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub discovery: Stats,
    pub forward: forward::Stats,
    pub udp: crate::udp_path::UdpCounters,
    pub control_up: bool,
}

/// Takes a [`Snapshot`] of the live counters.
pub type Shared = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// The counters as Prometheus text.
pub fn render(snap: &Snapshot) -> String {
    let s = &snap.discovery;
    let f = &snap.forward;
    let mut e = Exposition::new();
    e.counter(
        "ward_relay_requests_total",
        "Address-discovery datagrams received.",
        s.datagrams,
    );
    e.counter(
        "ward_relay_answered_total",
        "Binding requests answered.",
        s.answered,
    );
    let refused: Vec<(&str, f64)> = Refusal::ALL
        .iter()
        .map(|r| (r.as_str(), s.refused(*r) as f64))
        .collect();
    e.labelled(
        "ward_relay_refused_total",
        Kind::Counter,
        "Address-discovery datagrams not answered, by reason.",
        "reason",
        &refused,
    );
    e.gauge(
        "ward_relay_sources",
        "Source addresses in the rate-limit table.",
        s.sources as f64,
    );
    e.counter(
        "ward_relay_sources_evicted_total",
        "Sources evicted from the full rate-limit table.",
        s.evicted,
    );
    e.gauge(
        "ward_relay_devices",
        "Devices connected with an accepted ticket.",
        f.devices as f64,
    );
    e.gauge(
        "ward_relay_pending_connections",
        "Connections still waiting for their Hello.",
        f.pending as f64,
    );
    e.gauge(
        "ward_relay_control_up",
        "1 while the control session with the coordinator is up.",
        f64::from(u8::from(snap.control_up)),
    );
    e.counter(
        "ward_relay_relayed_bytes_total",
        "WireGuard bytes forwarded between devices.",
        f.bytes_relayed,
    );
    e.counter(
        "ward_relay_relayed_datagrams_total",
        "Datagrams forwarded between devices.",
        f.datagrams_relayed,
    );
    let dropped: Vec<(&str, f64)> = Drop::ALL
        .iter()
        .map(|d| (d.as_str(), f.dropped(*d) as f64))
        .collect();
    e.labelled(
        "ward_relay_dropped_total",
        Kind::Counter,
        "Datagrams from devices not forwarded, by reason.",
        "reason",
        &dropped,
    );
    let tickets: Vec<(&str, f64)> = forward::Refusal::ALL
        .iter()
        .map(|r| (r.as_str(), f.refused(*r) as f64))
        .collect();
    e.labelled(
        "ward_relay_ticket_refusals_total",
        Kind::Counter,
        "Device connections refused, by reason.",
        "reason",
        &tickets,
    );
    let u = &snap.udp;
    e.counter(
        "ward_relay_udp_bound_total",
        "Plain-UDP source addresses bound by a confirm carrying the nonce sent over QUIC.",
        u.bind.bound,
    );
    e.counter(
        "ward_relay_udp_received_total",
        "Data datagrams received in plain UDP and forwarded.",
        u.received,
    );
    e.counter(
        "ward_relay_udp_sent_total",
        "Datagrams sent in plain UDP to a bound device.",
        u.sent,
    );
    e.counter(
        "ward_relay_udp_send_failed_total",
        "Plain-UDP sends the socket refused (dropped).",
        u.send_failed,
    );
    let udp_dropped: Vec<(&str, f64)> = crate::udp_bind::UdpDrop::ALL
        .iter()
        .map(|d| (d.as_str(), u.bind.dropped(*d) as f64))
        .collect();
    e.labelled(
        "ward_relay_udp_dropped_total",
        Kind::Counter,
        "Plain-UDP datagrams not forwarded by the binding check, by reason.",
        "reason",
        &udp_dropped,
    );
    e.finish()
}

/// Serves `GET /metrics` on `listener` until the task is dropped (the shared responder:
/// bounded request head, time and connections).
pub async fn serve(listener: TcpListener, stats: Shared) {
    ward_runtime::metrics::serve(listener, Limits::default(), move || {
        let text = render(&stats());
        async move { text }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter() {
        let text = render(&Snapshot::default());
        for want in [
            "ward_relay_devices 0",
            "ward_relay_control_up 0",
            "ward_relay_relayed_bytes_total 0",
            "ward_relay_dropped_total{reason=\"queue_full\"} 0",
            "ward_relay_ticket_refusals_total{reason=\"bad_signature\"} 0",
            "ward_relay_requests_total 0",
            "ward_relay_refused_total{reason=\"malformed\"} 0",
            "ward_relay_refused_total{reason=\"wrong_kind\"} 0",
            "ward_relay_refused_total{reason=\"rate_limited\"} 0",
            "ward_relay_sources 0",
            "ward_relay_udp_bound_total 0",
            "ward_relay_udp_sent_total 0",
            "ward_relay_udp_dropped_total{reason=\"wrong_source\"} 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        ward_runtime::metrics::parse_strict(&text).unwrap();
    }
}
