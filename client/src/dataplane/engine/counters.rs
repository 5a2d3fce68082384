//! Data-plane counters: shared atomics, and the per-batch tallies each packet path keeps so
//! that no atomic is touched per packet.

use std::sync::atomic::{AtomicU64, Ordering};

use super::super::DataPlaneCounters;

/// Counters shared by all threads; each thread accumulates into [`LocalCounters`] per batch.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) tx_packets: AtomicU64,
    pub(super) tx_bytes: AtomicU64,
    pub(super) rx_packets: AtomicU64,
    pub(super) rx_bytes: AtomicU64,
    pub(super) dropped_no_route: AtomicU64,
    pub(super) dropped_no_endpoint: AtomicU64,
    pub(super) dropped_bad_source: AtomicU64,
    pub(super) dropped_garbage: AtomicU64,
    pub(super) dropped_bad_tun_packet: AtomicU64,
    pub(super) handshake_initiations_sent: AtomicU64,
    pub(super) dropped_filter_no_rule: AtomicU64,
    pub(super) dropped_filter_expired: AtomicU64,
    pub(super) dropped_filter_other: AtomicU64,
    pub(super) dropped_wrong_destination: AtomicU64,
    pub(super) dropped_wrong_source: AtomicU64,
    pub(super) icmp_unreachable_sent: AtomicU64,
    pub(super) direct_probes_sent: AtomicU64,
    pub(super) peer_key_conflicts: AtomicU64,
    pub(super) held_for_peer: AtomicU64,
    pub(super) held_dropped: AtomicU64,
    pub(super) held_replayed: AtomicU64,
    pub(super) peer_wants: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> DataPlaneCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DataPlaneCounters {
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            dropped_no_route: g(&self.dropped_no_route),
            dropped_no_endpoint: g(&self.dropped_no_endpoint),
            dropped_bad_source: g(&self.dropped_bad_source),
            dropped_garbage: g(&self.dropped_garbage),
            dropped_bad_tun_packet: g(&self.dropped_bad_tun_packet),
            handshake_initiations_sent: g(&self.handshake_initiations_sent),
            dropped_filter_no_rule: g(&self.dropped_filter_no_rule),
            dropped_filter_expired: g(&self.dropped_filter_expired),
            dropped_filter_other: g(&self.dropped_filter_other),
            dropped_wrong_destination: g(&self.dropped_wrong_destination),
            dropped_wrong_source: g(&self.dropped_wrong_source),
            icmp_unreachable_sent: g(&self.icmp_unreachable_sent),
            direct_probes_sent: g(&self.direct_probes_sent),
            peer_key_conflicts: g(&self.peer_key_conflicts),
            held_for_peer: g(&self.held_for_peer),
            held_dropped: g(&self.held_dropped),
            held_replayed: g(&self.held_replayed),
            peer_wants: g(&self.peer_wants),
            ..DataPlaneCounters::default()
        }
    }
}

#[derive(Default)]
pub(super) struct LocalCounters {
    pub(super) tx_packets: u64,
    pub(super) tx_bytes: u64,
    pub(super) rx_packets: u64,
    pub(super) rx_bytes: u64,
    pub(super) dropped_no_route: u64,
    pub(super) dropped_no_endpoint: u64,
    pub(super) dropped_bad_source: u64,
    pub(super) dropped_garbage: u64,
    pub(super) dropped_bad_tun_packet: u64,
    pub(super) handshake_initiations_sent: u64,
    pub(super) dropped_filter_no_rule: u64,
    pub(super) dropped_filter_expired: u64,
    pub(super) dropped_filter_other: u64,
    pub(super) dropped_wrong_destination: u64,
    pub(super) dropped_wrong_source: u64,
    pub(super) icmp_unreachable_sent: u64,
    pub(super) direct_probes_sent: u64,
    pub(super) held_for_peer: u64,
    pub(super) held_dropped: u64,
    pub(super) peer_wants: u64,
}

impl LocalCounters {
    pub(super) fn flush(&mut self, c: &Counters) {
        let add = |a: &AtomicU64, v: &mut u64| {
            if *v != 0 {
                a.fetch_add(*v, Ordering::Relaxed);
                *v = 0;
            }
        };
        add(&c.tx_packets, &mut self.tx_packets);
        add(&c.tx_bytes, &mut self.tx_bytes);
        add(&c.rx_packets, &mut self.rx_packets);
        add(&c.rx_bytes, &mut self.rx_bytes);
        add(&c.dropped_no_route, &mut self.dropped_no_route);
        add(&c.dropped_no_endpoint, &mut self.dropped_no_endpoint);
        add(&c.dropped_bad_source, &mut self.dropped_bad_source);
        add(&c.dropped_garbage, &mut self.dropped_garbage);
        add(&c.dropped_bad_tun_packet, &mut self.dropped_bad_tun_packet);
        add(
            &c.handshake_initiations_sent,
            &mut self.handshake_initiations_sent,
        );
        add(&c.dropped_filter_no_rule, &mut self.dropped_filter_no_rule);
        add(&c.dropped_filter_expired, &mut self.dropped_filter_expired);
        add(&c.dropped_filter_other, &mut self.dropped_filter_other);
        add(
            &c.dropped_wrong_destination,
            &mut self.dropped_wrong_destination,
        );
        add(&c.dropped_wrong_source, &mut self.dropped_wrong_source);
        add(&c.icmp_unreachable_sent, &mut self.icmp_unreachable_sent);
        add(&c.direct_probes_sent, &mut self.direct_probes_sent);
        add(&c.held_for_peer, &mut self.held_for_peer);
        add(&c.held_dropped, &mut self.held_dropped);
        add(&c.peer_wants, &mut self.peer_wants);
    }
}
