//! The inbound filter as the two packet paths share it, with no lock that both take per packet.
//!
//! The stateful [`Filter`] needs every packet this device sends (to record the flow, so
//! replies pass) and every decrypted packet it receives (for a verdict). The receive path
//! locks the filter once per batch ([`FilterGuard`], held by the batch) and judges every packet
//! of the batch under that one lock. The send path never locks the filter: it writes what it
//! sent into its own [`OutboundLog`] and hands the log over once per batch, before the batch's
//! datagrams leave ([`SharedFilter::hand_over`]). Whoever locks the filter next (the receive
//! path, a timer, a control call) applies the handed-over logs first, in order.
//!
//! So a reply can never be judged before the flow it answers is recorded: the reply arrives
//! after the request left, the request left after its log was handed over, and the receive
//! path applies every handed-over log before it judges a batch. The filter sees the same calls
//! with the same arguments as if the send path had called it per packet, except that a run of
//! packets of one flow with the same flow-relevant header fields in one batch is applied as one
//! call (repeated only when the first call could not record the flow, so the filter's
//! counters stay the same).

use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ward_shared::filter::{Filter, FilterCounters, FilterRule, FlowSample, Verdict};
use ward_shared::flows::DenyCause;
use ward_shared::peerset::PeerSet;

use super::lock;

/// Handed-over outbound records above which the send path applies them itself (a device that
/// only sends, never receives, still keeps its flow table current and its memory bounded).
const MAX_PENDING_RECORDS: usize = 4096;
/// The same bound on the handed-over records' packet bytes: a record keeps its whole first
/// packet, and a send-only stream of datagrams (one record each) would otherwise hold some
/// 4096 packets, megabytes that stay allocated once the log has grown to them.
const MAX_PENDING_BYTES: usize = 256 * 1024;

/// The filter plus the outbound logs handed over by the send path and not yet applied.
/// Lock order: `filter`, then `pending`.
pub(super) struct SharedFilter {
    filter: Mutex<Filter>,
    pending: Mutex<OutboundLog>,
}

impl SharedFilter {
    pub(super) fn new(filter: Filter) -> SharedFilter {
        SharedFilter {
            filter: Mutex::new(filter),
            pending: Mutex::new(OutboundLog::default()),
        }
    }

    /// Locks the filter with every handed-over outbound record applied. The receive path holds
    /// this for one batch; control calls for one call.
    pub(super) fn lock(&self) -> FilterGuard<'_> {
        let mut filter = lock(&self.filter);
        lock(&self.pending).apply(&mut filter);
        FilterGuard { filter }
    }

    /// Hands a batch's outbound log over (one lock of the pending list) and empties it. If too
    /// many records are waiting (nothing has locked the filter for a while), applies them here.
    pub(super) fn hand_over(&self, log: &mut OutboundLog) {
        if log.is_empty() {
            return;
        }
        let mut pending = lock(&self.pending);
        pending.append(log);
        if pending.items.len() < MAX_PENDING_RECORDS && pending.bytes.len() < MAX_PENDING_BYTES {
            return;
        }
        drop(pending);
        // Lock order: the filter first.
        self.apply_pending();
    }

    /// Applies the handed-over outbound records now.
    pub(super) fn apply_pending(&self) {
        drop(self.lock());
    }

    pub(super) fn set_rules(&self, rules: Vec<FilterRule>) {
        self.lock().filter.set_rules(rules);
    }

    pub(super) fn set_rules_with_sets(&self, rules: Vec<FilterRule>, sets: &[PeerSet]) {
        self.lock().filter.set_rules_with_sets(rules, sets);
    }

    pub(super) fn set_routed(&self, routed: Vec<ward_shared::routes::Prefix>) {
        self.lock().filter.set_routed(routed);
    }

    pub(super) fn set_shadow_rules(&self, rules: Option<Vec<FilterRule>>) {
        self.lock().filter.set_shadow_rules(rules);
    }

    pub(super) fn take_denied(&self) -> Vec<ward_shared::wire::DeniedFlow> {
        self.lock().filter.take_denied()
    }

    /// The flow-record samples since the last call and how many found no room.
    pub(super) fn take_samples(&self) -> (Vec<FlowSample>, u64) {
        self.lock().filter.take_samples()
    }

    pub(super) fn counters(&self) -> FilterCounters {
        self.lock().filter.counters()
    }

    pub(super) fn expire(&self, now: Instant) {
        self.lock().filter.expire(now);
    }
}

/// The filter, locked for one receive batch.
pub(super) struct FilterGuard<'a> {
    filter: MutexGuard<'a, Filter>,
}

impl FilterGuard<'_> {
    /// A decrypted packet from a peer; see [`Filter::check_inbound`].
    pub(super) fn check_inbound(
        &mut self,
        packet: &[u8],
        now: Instant,
        coordinator_now_ms: i64,
    ) -> Verdict {
        self.filter.check_inbound(packet, now, coordinator_now_ms)
    }

    /// A decrypted packet dropped before the filter judged it; see
    /// [`Filter::note_dropped_inbound`].
    pub(super) fn note_dropped(&mut self, packet: &[u8], remote: Option<IpAddr>, why: DenyCause) {
        self.filter.note_dropped_inbound(packet, remote, why);
    }

    /// Applies (and empties) a log kept by the batch that holds this guard.
    pub(super) fn apply(&mut self, log: &mut OutboundLog) {
        if !log.is_empty() {
            log.apply(&mut self.filter);
        }
    }
}

/// Packets this device sent, for [`Filter::handle_outbound`], kept by one batch of the send
/// path. Consecutive packets with the same [`FlowSig`] at the same `now` share one record.
#[derive(Default)]
pub(super) struct OutboundLog {
    bytes: Vec<u8>,
    items: Vec<Record>,
}

struct Record {
    start: usize,
    len: usize,
    now: Instant,
    sig: Option<FlowSig>,
    /// Further packets of the run, after the first.
    repeats: u32,
    /// Bytes of the whole run.
    bytes: u64,
    /// Dropped before sending, and why (for flow records; the flow is not recorded).
    dropped: Option<DenyCause>,
}

impl OutboundLog {
    /// Records a packet read from the TUN and about to be sent to a peer.
    pub(super) fn record(&mut self, packet: &[u8], now: Instant) {
        let sig = FlowSig::of(packet);
        if let Some(last) = self.items.last_mut() {
            if sig.is_some() && last.sig == sig && last.now == now && last.dropped.is_none() {
                last.repeats = last.repeats.saturating_add(1);
                last.bytes = last.bytes.saturating_add(packet.len() as u64);
                return;
            }
        }
        self.push(packet, now, sig, None);
    }

    /// Records a packet read from the TUN and dropped before sending (for flow records).
    pub(super) fn record_dropped(&mut self, packet: &[u8], now: Instant, why: DenyCause) {
        self.push(packet, now, None, Some(why));
    }

    fn push(
        &mut self,
        packet: &[u8],
        now: Instant,
        sig: Option<FlowSig>,
        dropped: Option<DenyCause>,
    ) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(packet);
        self.items.push(Record {
            start,
            len: packet.len(),
            now,
            sig,
            repeats: 0,
            bytes: packet.len() as u64,
            dropped,
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    /// Moves `other`'s records to the end of this log, leaving `other` empty.
    fn append(&mut self, other: &mut OutboundLog) {
        if self.is_empty() {
            std::mem::swap(self, other);
            return;
        }
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.items.extend(other.items.drain(..).map(|r| Record {
            start: r.start + base,
            ..r
        }));
        other.clear();
    }

    /// Feeds every record to the filter, in order, and empties the log. A run's first packet
    /// stands for the run: the others would find the flow it recorded and change nothing; only
    /// if it could not be recorded (table full) is the call repeated, so the filter counts each.
    fn apply(&mut self, filter: &mut Filter) {
        for r in &self.items {
            let Some(packet) = self.bytes.get(r.start..r.start + r.len) else {
                continue;
            };
            if let Some(why) = r.dropped {
                filter.note_dropped_outbound(packet, why);
                continue;
            }
            let untracked = filter.counters().outbound_untracked;
            let packets = u64::from(r.repeats) + 1;
            filter.handle_outbound_run(packet, r.now, packets, r.bytes);
            if r.repeats > 0 && filter.counters().outbound_untracked != untracked {
                // The run's traffic is counted above; only the table's counters repeat.
                for _ in 0..r.repeats {
                    filter.handle_outbound_run(packet, r.now, 0, 0);
                }
            }
        }
        self.clear();
    }
}

/// The header fields [`Filter::handle_outbound`] acts on, for a TCP or UDP packet over IPv4 or
/// over IPv6 without extension headers that is well-formed as far as the filter checks. Two
/// packets with the same signature are the same call to the filter at the same `now`. `None`
/// for anything else (each such packet gets its own record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowSig {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP FIN, SYN, RST and ACK: the flags the filter looks at.
    tcp_flags: u8,
}

/// TCP FIN | SYN | RST | ACK.
const TCP_FLAGS_SEEN: u8 = 0x01 | 0x02 | 0x04 | 0x10;

impl FlowSig {
    fn of(p: &[u8]) -> Option<FlowSig> {
        let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match p.first()? >> 4 {
            4 => {
                let hdr: &[u8; 20] = p.get(..20)?.try_into().ok()?;
                let ihl = usize::from(hdr[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
                let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
                if ihl < 20 || total < ihl || total > p.len() || frag & 0x1fff != 0 {
                    return None;
                }
                let src = <[u8; 4]>::try_from(&hdr[12..16]).ok()?;
                let dst = <[u8; 4]>::try_from(&hdr[16..20]).ok()?;
                (src.into(), dst.into(), hdr[9], p.get(ihl..total)?)
            }
            6 => {
                let hdr: &[u8; 40] = p.get(..40)?.try_into().ok()?;
                let total = 40 + usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
                if total > p.len() {
                    return None;
                }
                let src = <[u8; 16]>::try_from(&hdr[8..24]).ok()?;
                let dst = <[u8; 16]>::try_from(&hdr[24..40]).ok()?;
                (src.into(), dst.into(), hdr[6], p.get(40..total)?)
            }
            _ => return None,
        };
        let (ports, tcp_flags) = match proto {
            6 => (l4.get(..4)?, l4.get(..20)?.get(13)? & TCP_FLAGS_SEEN),
            17 => (l4.get(..8)?.get(..4)?, 0),
            _ => return None,
        };
        Some(FlowSig {
            src,
            dst,
            proto,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            tcp_flags,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use std::net::Ipv4Addr;
    use std::time::Duration;
    use ward_shared::filter::{DenyReason, PortRange, Proto};

    fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[9] = 6;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[32] = 0x50;
        p[33] = flags;
        p
    }

    const ME: [u8; 4] = [100, 64, 0, 1];
    const PEER: [u8; 4] = [100, 64, 0, 2];
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const PSH: u8 = 0x08;

    #[test]
    fn a_handed_over_flow_lets_its_reply_pass() {
        let f = SharedFilter::new(Filter::with_seed(16, 1));
        let now = Instant::now();
        let mut log = OutboundLog::default();
        log.record(&tcp4(ME, 40000, PEER, 22, SYN), now);
        let reply = tcp4(PEER, 22, ME, 40000, SYN | ACK);
        // Not handed over yet: the reply is refused (and the refusal recorded).
        assert_eq!(
            f.lock().check_inbound(&reply, now, 0),
            Verdict::Deny(DenyReason::NoRule)
        );
        f.hand_over(&mut log);
        assert!(log.is_empty());
        assert_eq!(f.lock().check_inbound(&reply, now, 0), Verdict::Allow);
        assert_eq!(f.counters().allowed_tracked, 1);
        assert_eq!(f.take_denied().len(), 1);
    }

    #[test]
    fn runs_of_one_flow_share_a_record_but_not_across_flows_flags_or_time() {
        let now = Instant::now();
        let mut log = OutboundLog::default();
        for _ in 0..10 {
            log.record(&tcp4(ME, 40000, PEER, 22, ACK), now);
            log.record(&tcp4(ME, 40000, PEER, 22, ACK | PSH), now);
        }
        assert_eq!(log.items.len(), 1);
        assert_eq!(log.items[0].repeats, 19);
        log.record(&tcp4(ME, 40000, PEER, 22, ACK | 0x01), now);
        log.record(&tcp4(ME, 40001, PEER, 22, ACK), now);
        log.record(
            &tcp4(ME, 40001, PEER, 22, ACK),
            now + Duration::from_millis(1),
        );
        assert_eq!(log.items.len(), 4);
        // Malformed (total length beyond the packet): no signature, its own record.
        let mut bad = tcp4(ME, 40001, PEER, 22, ACK);
        bad[2..4].copy_from_slice(&100u16.to_be_bytes());
        log.record(&bad, now + Duration::from_millis(1));
        log.record(&bad, now + Duration::from_millis(1));
        assert_eq!(log.items.len(), 6);
    }

    #[test]
    fn a_full_table_counts_every_packet_of_a_run_it_could_not_record() {
        let f = SharedFilter::new(Filter::with_seed(1, 1));
        let now = Instant::now();
        let mut log = OutboundLog::default();
        log.record(&tcp4(ME, 40000, PEER, 22, SYN), now);
        for _ in 0..3 {
            log.record(&tcp4(ME, 40001, PEER, 22, SYN), now);
        }
        f.hand_over(&mut log);
        assert_eq!(f.counters().outbound_untracked, 3);
    }

    #[test]
    fn set_rules_applies_earlier_outbound_packets_first() {
        let f = SharedFilter::new(Filter::with_seed(16, 1));
        let now = Instant::now();
        let mut log = OutboundLog::default();
        log.record(&tcp4(ME, 40000, PEER, 22, SYN), now);
        f.hand_over(&mut log);
        f.set_rules(vec![FilterRule {
            dests: Default::default(),
            rule: "r".into(),
            service: "s".into(),
            sources: vec![IpAddr::V4(Ipv4Addr::from(PEER))].into(),
            source_sets: Vec::new(),
            proto: Proto::Tcp,
            ports: vec![PortRange { lo: 80, hi: 80 }],
            not_after_ms: None,
        }]);
        let reply = tcp4(PEER, 22, ME, 40000, SYN | ACK);
        assert_eq!(f.lock().check_inbound(&reply, now, 0), Verdict::Allow);
    }

    #[test]
    fn a_send_only_device_applies_its_own_records_when_too_many_wait() {
        let f = SharedFilter::new(Filter::with_seed(MAX_PENDING_RECORDS * 2, 1));
        let now = Instant::now();
        for port in 0..MAX_PENDING_RECORDS as u16 {
            let mut log = OutboundLog::default();
            log.record(&tcp4(ME, 1000 + port, PEER, 22, SYN), now);
            f.hand_over(&mut log);
        }
        assert!(lock(&f.pending).is_empty());
        assert_eq!(lock(&f.filter).flow_count(), MAX_PENDING_RECORDS);
    }

    #[test]
    fn a_send_only_datagram_stream_keeps_the_pending_bytes_bounded() {
        let f = SharedFilter::new(Filter::with_seed(16, 1));
        let start = Instant::now();
        // One 1200-byte datagram per batch, each at its own `now`: one record each.
        let mut big = tcp4(ME, 40000, PEER, 22, SYN);
        big.resize(1200, 0);
        big[2..4].copy_from_slice(&1200u16.to_be_bytes());
        let mut most = 0;
        for i in 0..2000u64 {
            let mut log = OutboundLog::default();
            log.record(&big, start + Duration::from_micros(i));
            f.hand_over(&mut log);
            let pending = lock(&f.pending);
            most = most.max(pending.bytes.capacity());
            assert!(pending.bytes.len() < MAX_PENDING_BYTES);
        }
        // The log's buffer never grew past the bound's next doubling.
        assert!(
            most <= 2 * MAX_PENDING_BYTES,
            "pending grew to {most} bytes"
        );
        // Nothing was lost on the way: the flow is recorded.
        f.apply_pending();
        assert_eq!(lock(&f.filter).flow_count(), 1);
    }
}
