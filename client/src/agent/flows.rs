//! The flow log: the data plane's flow samples aggregated in windows, turned into numbered
//! reports and kept until the coordinator acknowledges them. Free of I/O; time is passed in.
//!
//! ```text
//! every FLOW_TICK:  log.add(samples, dropped, &FlowContext::from(netmap), coordinator_ms)
//!                   log.handle_timeout(coordinator_ms)     closes a window that ended
//! in a session whose netmap says `flows`:
//!                   log.poll_report(now) -> DeviceMsg::Flows   (rate-limited, few in flight)
//! flows_ack{seq}:   log.handle_ack(seq)                     forgets that report
//! session ends:     log.session_ended()                     unacknowledged ones go again
//! ```
//!
//! Windows are aligned to multiples of the window length in coordinator time, so both ends of
//! a flow report the same windows. A window's records are keyed by (other end, role, protocol,
//! port, verdict, rule or reason); the other end's device, user and tags and the policy
//! version are those of the netmap when the flow was first seen in the window. Bounds: at most
//! `max_window_records` records per window and `max_spool_records` records in reports not yet
//! acknowledged; past either, the oldest go and are counted in `dropped_records` (cumulative,
//! carried by every report; an empty report carries it if nothing else would).
//!
//! Early report: when [`FlowLogConfig::burst_new_flows`] new outgoing records (new other end,
//! port or protocol) appear in one window, the window is closed at once (its end is the time
//! of the burst, not the aligned end) and its report goes out without waiting for
//! [`MIN_REPORT_GAP`], so that a scan reaches the coordinator's behaviour detector within a
//! harvest tick instead of a window later. Once per aligned window: the rest of that window is
//! reported at its usual end (the coordinator merges overlapping windows of one flow).
//!
//! Reports are numbered from 1; a retransmission repeats the report unchanged. The log's
//! [`FlowLogState`] (next sequence number, dropped count, unacknowledged reports) is what the
//! daemon saves so that numbers are never reused after a restart.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use ward_shared::filter::{FlowCounts, FlowSample, Proto, SampleKey};
use ward_shared::flows::{
    clip, DenyCause, FlowRecord, FlowReport, FlowVerdict, FlowWindow, Role, ShadowVerdict,
    DEFAULT_WINDOW_MS, MAX_FLOW_TAGS, MAX_RECORDS_PER_REPORT,
};
use ward_shared::wire::{DeviceId, Netmap};

/// How often the agent harvests the data plane's samples and checks the window.
pub const FLOW_TICK: Duration = Duration::from_secs(1);
/// Least time between two reports sent (the coordinator's per-session limits are shared with
/// `denied_flows`).
pub const MIN_REPORT_GAP: Duration = Duration::from_secs(2);
/// Most reports sent and not acknowledged at once.
pub const MAX_IN_FLIGHT: usize = 4;
/// A report not acknowledged this long is sent again in the same session (the coordinator may
/// drop it when over its limits).
pub const RESEND_AFTER: Duration = Duration::from_secs(30);
/// Least time between two saves of the state when only counts or acknowledgements changed (a
/// new report number is saved before the report can leave).
pub const SAVE_GAP: Duration = Duration::from_secs(5);
/// Most reports kept unacknowledged, whatever their size (small reports count too).
pub const MAX_SPOOL_REPORTS: usize = 256;
/// Default cap on distinct records in one window.
pub const DEFAULT_MAX_WINDOW_RECORDS: usize = 4096;
/// Default number of new outgoing records in one window that report it early (a scan).
pub const DEFAULT_BURST_NEW_FLOWS: usize = 16;
/// Default cap on records in reports not yet acknowledged (64 full reports).
pub const DEFAULT_MAX_SPOOL_RECORDS: usize = 64 * MAX_RECORDS_PER_REPORT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLogConfig {
    pub window_ms: i64,
    pub max_window_records: usize,
    pub max_spool_records: usize,
    /// Test only: reported packet and byte counts are scaled down by this percentage.
    pub underreport_percent: u8,
    /// New outgoing records in one window that close it early and send it at once (0: never).
    pub burst_new_flows: usize,
}

impl Default for FlowLogConfig {
    fn default() -> Self {
        FlowLogConfig {
            window_ms: DEFAULT_WINDOW_MS,
            max_window_records: DEFAULT_MAX_WINDOW_RECORDS,
            max_spool_records: DEFAULT_MAX_SPOOL_RECORDS,
            underreport_percent: 0,
            burst_new_flows: DEFAULT_BURST_NEW_FLOWS,
        }
    }
}

/// Who the other ends are, from the netmap at capture time.
#[derive(Debug, Default, Clone)]
pub struct FlowContext {
    peers: HashMap<IpAddr, PeerMeta>,
    /// The reach list: which rule lets this device open what on which peer.
    reach: Vec<ReachRule>,
    policy_version: Option<u64>,
}

/// (device, proto, port ranges, rule) of one reach entry.
type ReachRule = (DeviceId, Proto, Vec<(u16, u16)>, Arc<str>);

#[derive(Debug, Clone)]
struct PeerMeta {
    id: DeviceId,
    user: Option<String>,
    tags: Vec<String>,
}

impl FlowContext {
    pub fn from_netmap(nm: &Netmap) -> FlowContext {
        let mut peers = HashMap::new();
        for p in &nm.peers {
            let meta = PeerMeta {
                id: p.device_id,
                user: p.user.as_deref().map(clip),
                tags: p.tags.iter().take(MAX_FLOW_TAGS).map(|t| clip(t)).collect(),
            };
            peers.insert(IpAddr::V4(p.ipv4), meta.clone());
            peers.insert(IpAddr::V6(p.ipv6), meta);
        }
        let reach = nm
            .reach_view()
            .iter()
            .map(|r| {
                (
                    r.device_id,
                    r.proto,
                    r.ports.iter().map(|p| (p.lo, p.hi)).collect(),
                    Arc::from(clip(&r.rule).as_str()),
                )
            })
            .collect();
        FlowContext {
            peers,
            reach,
            policy_version: nm.policy_version,
        }
    }

    /// The reach entry's rule that covers a flow this device opens to `id`.
    fn reach_rule(&self, id: DeviceId, proto: Proto, port: u16) -> Option<Arc<str>> {
        self.reach
            .iter()
            .find(|(d, p, ports, _)| {
                *d == id
                    && *p == proto
                    && (proto == Proto::Icmp
                        || ports.iter().any(|&(lo, hi)| lo <= port && port <= hi))
            })
            .map(|(.., rule)| rule.clone())
    }
}

/// What a record in a window is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RecKey {
    remote: IpAddr,
    role: Role,
    proto: Proto,
    port: u16,
    verdict: FlowVerdict,
    rule: Option<Arc<str>>,
    reason: Option<DenyCause>,
}

#[derive(Debug, Clone)]
struct Agg {
    peer: Option<DeviceId>,
    user: Option<String>,
    tags: Vec<String>,
    policy_version: Option<u64>,
    counts: FlowCounts,
    /// The candidate view's verdict: a field, not part of the key (under one candidate policy
    /// it follows from the key; across a change within the window a would-deny wins).
    shadow: Option<ShadowVerdict>,
}

#[derive(Debug)]
struct Window {
    start_ms: i64,
    records: HashMap<RecKey, Agg>,
    /// Keys in the order they were first seen (the oldest goes first at the cap).
    order: VecDeque<RecKey>,
    /// New outgoing records since the window opened.
    new_out: usize,
}

/// What survives a daemon restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowLogState {
    pub next_seq: u64,
    pub dropped_records: u64,
    pub last_acked: Option<u64>,
    pub spool: Vec<FlowReport>,
}

/// Figures for `ward status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowLogStatus {
    /// Whether the coordinator accepts flow reports (its netmap says `flows`).
    pub enabled: bool,
    pub window_ms: i64,
    /// Distinct records in the window being filled.
    pub window_records: usize,
    /// Reports (and their records) not yet acknowledged.
    pub spool_reports: usize,
    pub spool_records: usize,
    /// Records dropped because a cap was hit (cumulative, as reported).
    pub flow_records_dropped: u64,
    /// Samples the data plane could not keep between harvests (part of the above).
    pub flow_samples_dropped: u64,
    pub reports_sent: u64,
    pub reports_acked: u64,
    pub last_acked_seq: Option<u64>,
    pub next_seq: u64,
    /// Windows closed early on a burst of new outgoing flows.
    pub early_reports: u64,
}

#[derive(Debug)]
pub struct FlowLog {
    cfg: FlowLogConfig,
    window: Option<Window>,
    spool: VecDeque<FlowReport>,
    spool_records: usize,
    next_seq: u64,
    dropped: u64,
    /// `dropped` as carried by the last report built.
    dropped_reported: u64,
    samples_dropped: u64,
    /// Reports sent in this session and not acknowledged: seq and when sent.
    in_flight: Vec<(u64, Instant)>,
    last_sent: Option<Instant>,
    last_acked: Option<u64>,
    reports_sent: u64,
    reports_acked: u64,
    /// Changed since the last [`FlowLog::take_dirty`].
    dirty: bool,
    /// `next_seq` and time of the last save.
    saved_seq: u64,
    saved_at: Option<Instant>,
    /// The aligned start of the last window closed early (once per window).
    early_start: Option<i64>,
    /// A report closed early, sent without waiting for the gap.
    urgent: Option<u64>,
    /// Windows closed early (for `ward status`).
    early_reports: u64,
}

impl FlowLog {
    pub fn new(cfg: FlowLogConfig) -> FlowLog {
        let cfg = FlowLogConfig {
            window_ms: cfg.window_ms.max(1),
            max_window_records: cfg.max_window_records.max(1),
            max_spool_records: cfg.max_spool_records.max(1),
            underreport_percent: cfg.underreport_percent.min(100),
            burst_new_flows: cfg.burst_new_flows,
        };
        FlowLog {
            cfg,
            window: None,
            spool: VecDeque::new(),
            spool_records: 0,
            next_seq: 1,
            dropped: 0,
            dropped_reported: 0,
            samples_dropped: 0,
            in_flight: Vec::new(),
            last_sent: None,
            last_acked: None,
            reports_sent: 0,
            reports_acked: 0,
            dirty: false,
            saved_seq: 1,
            saved_at: None,
            early_start: None,
            urgent: None,
            early_reports: 0,
        }
    }

    /// Restores what a previous run saved (sequence numbers continue; its reports go again).
    pub fn restore(&mut self, state: FlowLogState) {
        self.next_seq = state.next_seq.max(1);
        self.dropped = state.dropped_records;
        self.dropped_reported = state.dropped_records;
        self.last_acked = state.last_acked;
        self.spool = state
            .spool
            .into_iter()
            .filter(|r| r.seq != 0 && r.seq < self.next_seq)
            .collect();
        self.spool_records = self.spool.iter().map(records_in).sum();
        self.enforce_spool_cap();
        self.saved_seq = self.next_seq;
    }

    pub fn state(&self) -> FlowLogState {
        FlowLogState {
            next_seq: self.next_seq,
            dropped_records: self.dropped,
            last_acked: self.last_acked,
            spool: self.spool.iter().cloned().collect(),
        }
    }

    /// Whether the state must be saved now: at once when a new report number was drawn (so it
    /// is saved before the report leaves: a restart never reuses it), else when something
    /// changed and [`SAVE_GAP`] passed since the last save.
    pub fn take_dirty(&mut self, now: Instant) -> bool {
        let due = self.next_seq != self.saved_seq
            || (self.dirty
                && self
                    .saved_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= SAVE_GAP));
        if due {
            self.dirty = false;
            self.saved_seq = self.next_seq;
            self.saved_at = Some(now);
        }
        due
    }

    /// Samples harvested from the data plane at `coord_ms` (coordinator time), plus how many it
    /// had to drop. A window that ended before `coord_ms` is closed first.
    pub fn add(
        &mut self,
        samples: Vec<FlowSample>,
        samples_dropped: u64,
        ctx: &FlowContext,
        coord_ms: i64,
    ) {
        self.handle_timeout(coord_ms);
        if samples_dropped > 0 {
            self.samples_dropped = self.samples_dropped.saturating_add(samples_dropped);
            self.count_dropped(samples_dropped);
        }
        if samples.is_empty() {
            return;
        }
        let window_ms = self.cfg.window_ms;
        let w = self.window.get_or_insert_with(|| Window {
            start_ms: coord_ms.div_euclid(window_ms).saturating_mul(window_ms),
            records: HashMap::new(),
            order: VecDeque::new(),
            new_out: 0,
        });
        let mut evicted = 0u64;
        for FlowSample { key, counts } in samples {
            let SampleKey {
                remote,
                role,
                proto,
                port,
                verdict,
                mut rule,
                reason,
                shadow,
            } = key;
            let meta = ctx.peers.get(&remote);
            if rule.is_none() && verdict == FlowVerdict::Allowed && role == Role::Initiator {
                rule = meta.and_then(|m| ctx.reach_rule(m.id, proto, port));
            }
            let k = RecKey {
                remote,
                role,
                proto,
                port,
                verdict,
                rule,
                reason,
            };
            if let Some(a) = w.records.get_mut(&k) {
                a.counts.add(&counts);
                a.shadow = ShadowVerdict::merge(a.shadow, shadow);
                continue;
            }
            while w.records.len() >= self.cfg.max_window_records {
                let Some(old) = w.order.pop_front() else {
                    break;
                };
                if w.records.remove(&old).is_some() {
                    evicted += 1;
                }
            }
            if k.role == Role::Initiator {
                w.new_out += 1;
            }
            w.order.push_back(k.clone());
            w.records.insert(
                k,
                Agg {
                    peer: meta.map(|m| m.id),
                    user: meta.and_then(|m| m.user.clone()),
                    tags: meta.map(|m| m.tags.clone()).unwrap_or_default(),
                    policy_version: (verdict == FlowVerdict::Allowed)
                        .then_some(ctx.policy_version)
                        .flatten(),
                    counts,
                    shadow,
                },
            );
        }
        if evicted > 0 {
            self.count_dropped(evicted);
        }
        let burst = self.cfg.burst_new_flows;
        let early = self.window.as_ref().is_some_and(|w| {
            burst > 0 && w.new_out >= burst && self.early_start != Some(w.start_ms)
        });
        if early {
            self.close_early(coord_ms);
        }
    }

    /// A burst of new outgoing flows: the window closes now and its report skips the gap.
    fn close_early(&mut self, coord_ms: i64) {
        let Some(start) = self.window.as_ref().map(|w| w.start_ms) else {
            return;
        };
        self.early_start = Some(start);
        let before = self.next_seq;
        self.close_window_at(Some(coord_ms.max(start.saturating_add(1))));
        if self.next_seq != before {
            self.urgent = Some(before);
            self.early_reports += 1;
        }
    }

    /// Closes the window if it ended by `coord_ms`: its records become reports.
    pub fn handle_timeout(&mut self, coord_ms: i64) {
        let ended = self
            .window
            .as_ref()
            .is_some_and(|w| coord_ms >= w.start_ms.saturating_add(self.cfg.window_ms));
        if ended {
            self.close_window();
        } else if self.window.is_none() && self.dropped != self.dropped_reported {
            // Nothing to carry it: an empty report tells the coordinator about the loss.
            self.push_report(Vec::new());
        }
    }

    /// Closes the current window now (the daemon does at shutdown, before saving).
    pub fn close_window(&mut self) {
        self.close_window_at(None);
    }

    /// Closes the current window, ending it at `end` (early) or at its aligned end.
    fn close_window_at(&mut self, end: Option<i64>) {
        let Some(w) = self.window.take() else {
            return;
        };
        let aligned_end = w.start_ms.saturating_add(self.cfg.window_ms);
        let end_ms = end.map_or(aligned_end, |e| e.min(aligned_end));
        let mut records = w.records;
        let mut ordered: Vec<FlowRecord> = w
            .order
            .into_iter()
            .filter_map(|k| {
                let a = records.remove(&k)?;
                Some(self.record(k, a))
            })
            .collect();
        if ordered.is_empty() && self.dropped == self.dropped_reported {
            return;
        }
        if ordered.is_empty() {
            self.push_report(Vec::new());
            return;
        }
        while !ordered.is_empty() {
            let rest = ordered.split_off(ordered.len().min(MAX_RECORDS_PER_REPORT));
            let chunk = std::mem::replace(&mut ordered, rest);
            self.push_report(vec![FlowWindow {
                start_ms: w.start_ms,
                end_ms,
                records: chunk,
            }]);
        }
    }

    fn record(&self, k: RecKey, a: Agg) -> FlowRecord {
        let keep = u128::from(100 - self.cfg.underreport_percent);
        // keep <= 100, so the result is at most v and fits.
        let scale = |v: u64| u64::try_from(u128::from(v) * keep / 100).unwrap_or(v);
        let allowed = k.verdict == FlowVerdict::Allowed;
        FlowRecord {
            role: k.role,
            peer: a.peer,
            peer_addr: k.remote,
            peer_user: a.user,
            peer_tags: a.tags,
            proto: k.proto,
            port: k.port,
            verdict: k.verdict,
            rule: k.rule.filter(|_| allowed).map(|r| clip(&r)),
            policy_version: a.policy_version.filter(|_| allowed),
            reason: k.reason.filter(|_| !allowed),
            packets_out: scale(a.counts.packets_out),
            bytes_out: scale(a.counts.bytes_out),
            packets_in: scale(a.counts.packets_in),
            bytes_in: scale(a.counts.bytes_in),
            connections: a.counts.connections,
            shadow: a.shadow,
        }
    }

    fn push_report(&mut self, windows: Vec<FlowWindow>) {
        let n: usize = windows.iter().map(|w| w.records.len()).sum();
        // Room first, so that this report carries the count of what made room for it.
        while (self.spool_records + n > self.cfg.max_spool_records
            || self.spool.len() >= MAX_SPOOL_REPORTS)
            && !self.spool.is_empty()
        {
            self.drop_oldest();
        }
        let report = FlowReport {
            seq: self.next_seq,
            windows,
            dropped_records: self.dropped,
        };
        self.next_seq = self.next_seq.saturating_add(1);
        self.dropped_reported = self.dropped;
        self.spool_records += n;
        self.spool.push_back(report);
        self.dirty = true;
    }

    /// Drops the oldest reports while the spool is over its cap (the newest one, which carries
    /// the count, always stays).
    fn enforce_spool_cap(&mut self) {
        while (self.spool_records > self.cfg.max_spool_records
            || self.spool.len() > MAX_SPOOL_REPORTS)
            && self.spool.len() > 1
        {
            self.drop_oldest();
        }
    }

    fn drop_oldest(&mut self) {
        let Some(old) = self.spool.pop_front() else {
            return;
        };
        let n = records_in(&old);
        self.spool_records -= n;
        self.in_flight.retain(|(s, _)| *s != old.seq);
        self.dropped = self.dropped.saturating_add(n as u64);
        self.dirty = true;
    }

    fn count_dropped(&mut self, n: u64) {
        self.dropped = self.dropped.saturating_add(n);
        self.dirty = true;
    }

    /// The next report to send now, if any: the oldest not in flight, at most
    /// [`MAX_IN_FLIGHT`] at once, [`MIN_REPORT_GAP`] apart; one in flight for
    /// [`RESEND_AFTER`] goes again.
    pub fn poll_report(&mut self, now: Instant) -> Option<FlowReport> {
        let urgent = self
            .urgent
            .is_some_and(|u| self.spool.iter().any(|r| r.seq == u));
        if !urgent {
            self.urgent = None;
        }
        if !urgent
            && self
                .last_sent
                .is_some_and(|t| now.saturating_duration_since(t) < MIN_REPORT_GAP)
        {
            return None;
        }
        self.in_flight
            .retain(|(_, sent)| now.saturating_duration_since(*sent) < RESEND_AFTER);
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            return None;
        }
        let in_flight = &self.in_flight;
        let pending = |r: &&FlowReport| !in_flight.iter().any(|(s, _)| *s == r.seq);
        let report = match self.urgent.filter(|_| urgent) {
            Some(u) => self
                .spool
                .iter()
                .filter(pending)
                .find(|r| r.seq == u)
                .or_else(|| self.spool.iter().find(pending)),
            None => self.spool.iter().find(pending),
        }?
        .clone();
        if self.urgent == Some(report.seq) {
            self.urgent = None;
        }
        self.in_flight.push((report.seq, now));
        self.last_sent = Some(now);
        self.reports_sent += 1;
        Some(report)
    }

    /// The coordinator stored report `seq`: forget it. An unknown seq is ignored.
    pub fn handle_ack(&mut self, seq: u64) {
        let Some(i) = self.spool.iter().position(|r| r.seq == seq) else {
            return;
        };
        if let Some(r) = self.spool.remove(i) {
            self.spool_records -= records_in(&r);
        }
        self.in_flight.retain(|(s, _)| *s != seq);
        self.last_acked = Some(seq);
        self.reports_acked += 1;
        self.dirty = true;
    }

    /// The session ended: what was in flight is sent again (in order) in the next one.
    pub fn session_ended(&mut self) {
        self.in_flight.clear();
        self.last_sent = None;
    }

    pub fn status(&self, enabled: bool) -> FlowLogStatus {
        FlowLogStatus {
            enabled,
            window_ms: self.cfg.window_ms,
            window_records: self.window.as_ref().map_or(0, |w| w.records.len()),
            spool_reports: self.spool.len(),
            spool_records: self.spool_records,
            flow_records_dropped: self.dropped,
            flow_samples_dropped: self.samples_dropped,
            reports_sent: self.reports_sent,
            reports_acked: self.reports_acked,
            last_acked_seq: self.last_acked,
            next_seq: self.next_seq,
            early_reports: self.early_reports,
        }
    }
}

fn records_in(r: &FlowReport) -> usize {
    r.windows.iter().map(|w| w.records.len()).sum()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use std::net::Ipv4Addr;
    use ward_shared::names::Hostname;
    use ward_shared::wire::{Peer, Reach, SelfInfo};

    const W: i64 = 60_000;
    const T0: i64 = 1_800_000_000_000 - 1_800_000_000_000 % W;

    fn addr(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(100, 64, 0, n))
    }

    fn sample(remote: u8, role: Role, port: u16, bytes: u64) -> FlowSample {
        FlowSample {
            key: SampleKey {
                remote: addr(remote),
                role,
                proto: Proto::Tcp,
                port,
                verdict: FlowVerdict::Allowed,
                rule: (role == Role::Responder).then(|| Arc::from("eng")),
                reason: None,
                shadow: None,
            },
            counts: FlowCounts {
                packets_out: 1,
                bytes_out: bytes,
                packets_in: 2,
                bytes_in: 2 * bytes,
                connections: 1,
            },
        }
    }

    fn denied(remote: u8, port: u16) -> FlowSample {
        let mut s = sample(remote, Role::Responder, port, 60);
        s.key.verdict = FlowVerdict::Denied;
        s.key.rule = None;
        s.key.reason = Some(DenyCause::NoRule);
        s.counts = FlowCounts {
            packets_in: 1,
            bytes_in: 60,
            connections: 1,
            ..FlowCounts::default()
        };
        s
    }

    fn netmap() -> Netmap {
        let mut nm = Netmap {
            resumed: None,
            seq: 1,
            me: SelfInfo {
                routes: Default::default(),
                device_id: DeviceId(1),
                hostname: Hostname::parse("me").unwrap(),
                ipv4: Ipv4Addr::new(100, 64, 0, 1),
                ipv6: "fd00::1".parse().unwrap(),
                v6_prefix: "fd00::".parse().unwrap(),
                observed_addr: None,
            },
            peers: vec![],
            inbound: vec![].into(),
            reach: vec![],
            reach_grants: vec![],
            reach_services: vec![],
            relays: vec![],
            punch: true,
            flows: true,
            policy_version: Some(9),
            shadow_filter: None,
            dns_domain: None,
            coordinators: Vec::new(),
            peer_sets: Vec::new().into(),
            on_demand: false,
        };
        nm.peers.push(Peer {
            routes: Default::default(),
            device_id: DeviceId(2),
            hostname: Hostname::parse("bob").unwrap(),
            user: Some("bob@example.com".into()),
            tags: vec!["tag:db".into()],
            ipv4: Ipv4Addr::new(100, 64, 0, 2),
            ipv6: "fd00::2".parse().unwrap(),
            wg_public_key: None,
            endpoints: vec![],
            online: true,
            leases: vec![],
            relay: None,
        });
        nm.reach.push(Reach {
            service: "db".into(),
            device_id: DeviceId(2),
            hostname: Hostname::parse("bob").unwrap(),
            proto: Proto::Tcp,
            ports: vec![ward_shared::filter::PortRange { lo: 5432, hi: 5432 }],
            rule: "eng-db".into(),
            not_after_ms: None,
        });
        nm
    }

    fn log(cfg: FlowLogConfig) -> FlowLog {
        FlowLog::new(cfg)
    }

    #[test]
    fn a_window_aggregates_and_closes_on_time_with_context() {
        let ctx = FlowContext::from_netmap(&netmap());
        let mut l = log(FlowLogConfig::default());
        l.add(vec![sample(2, Role::Initiator, 5432, 100)], 0, &ctx, T0 + 5);
        l.add(
            vec![sample(2, Role::Initiator, 5432, 50), denied(3, 22)],
            0,
            &ctx,
            T0 + 30_000,
        );
        assert_eq!(l.status(true).window_records, 2);
        l.handle_timeout(T0 + W - 1);
        assert!(l.spool.is_empty(), "the window is still open");
        l.handle_timeout(T0 + W);
        let now = Instant::now();
        let r = l.poll_report(now).unwrap();
        assert_eq!(r.seq, 1);
        r.validate().unwrap();
        let w = &r.windows[0];
        assert_eq!((w.start_ms, w.end_ms), (T0, T0 + W));
        let a = &w.records[0];
        assert_eq!(a.peer, Some(DeviceId(2)));
        assert_eq!(a.peer_user.as_deref(), Some("bob@example.com"));
        assert_eq!(a.peer_tags, vec!["tag:db".to_string()]);
        assert_eq!(a.rule.as_deref(), Some("eng-db"), "from the reach list");
        assert_eq!(a.policy_version, Some(9));
        assert_eq!((a.packets_out, a.bytes_out), (2, 150));
        assert_eq!((a.packets_in, a.bytes_in, a.connections), (4, 300, 2));
        let d = &w.records[1];
        assert_eq!((d.peer, d.verdict), (None, FlowVerdict::Denied));
        assert_eq!(
            (d.reason, d.rule.clone(), d.policy_version),
            (Some(DenyCause::NoRule), None, None)
        );
        // A later sample opens the next aligned window.
        l.add(vec![denied(3, 23)], 0, &ctx, T0 + W + 10);
        l.handle_timeout(T0 + 2 * W);
        assert_eq!(l.spool.back().unwrap().windows[0].start_ms, T0 + W);
        assert_eq!(l.spool.back().unwrap().seq, 2);
    }

    #[test]
    fn a_burst_of_new_outgoing_flows_closes_the_window_early_and_skips_the_gap() {
        let ctx = FlowContext::from_netmap(&netmap());
        let mut l = log(FlowLogConfig {
            burst_new_flows: 4,
            ..FlowLogConfig::default()
        });
        // A normal report goes first, so the gap would hold the next one back.
        l.add(vec![sample(2, Role::Initiator, 5432, 100)], 0, &ctx, T0 + 5);
        l.handle_timeout(T0 + W);
        let now = Instant::now();
        assert_eq!(l.poll_report(now).map(|r| r.seq), Some(1));
        // Three new outgoing records and inbound ones: no burst yet.
        let three: Vec<FlowSample> = (0..3)
            .map(|p| sample(2, Role::Initiator, 100 + p, 10))
            .chain((0..5).map(|p| sample(3, Role::Responder, 200 + p, 10)))
            .collect();
        l.add(three, 0, &ctx, T0 + W + 1_000);
        assert!(l.spool.iter().all(|r| r.seq == 1), "no early report");
        // The fourth new one (a repeat of a known key does not count) closes the window now.
        l.add(
            vec![
                sample(2, Role::Initiator, 100, 10),
                sample(2, Role::Initiator, 103, 10),
            ],
            0,
            &ctx,
            T0 + W + 2_500,
        );
        assert_eq!(l.status(true).early_reports, 1);
        let r = l.poll_report(now).expect("sent at once, inside the gap");
        assert_eq!(r.seq, 2);
        assert_eq!(
            (r.windows[0].start_ms, r.windows[0].end_ms),
            (T0 + W, T0 + W + 2_500)
        );
        assert_eq!(r.windows[0].records.len(), 9);
        r.validate().unwrap();
        // Once per aligned window: more new flows in it wait for its end and the gap.
        let more: Vec<FlowSample> = (0..8)
            .map(|p| sample(2, Role::Initiator, 300 + p, 10))
            .collect();
        l.add(more, 0, &ctx, T0 + W + 3_000);
        assert_eq!(l.status(true).early_reports, 1);
        assert_eq!(l.poll_report(now), None, "the gap holds again");
        l.handle_timeout(T0 + 2 * W);
        let rest = l.poll_report(now + MIN_REPORT_GAP).unwrap();
        assert_eq!(
            (rest.windows[0].start_ms, rest.windows[0].end_ms),
            (T0 + W, T0 + 2 * W)
        );
        assert_eq!(rest.windows[0].records.len(), 8);
        // Off (0): never early.
        let mut off = log(FlowLogConfig {
            burst_new_flows: 0,
            ..FlowLogConfig::default()
        });
        let many: Vec<FlowSample> = (0..100)
            .map(|p| sample(2, Role::Initiator, p, 10))
            .collect();
        off.add(many, 0, &ctx, T0 + 5);
        assert!(off.spool.is_empty());
    }

    #[test]
    fn a_scan_of_100000_flows_stays_within_the_caps_and_is_counted() {
        let ctx = FlowContext::default();
        let cfg = FlowLogConfig {
            max_spool_records: 10 * MAX_RECORDS_PER_REPORT,
            ..FlowLogConfig::default()
        };
        let mut l = log(cfg);
        for chunk in 0..100u32 {
            let batch = (0..1000u32)
                .map(|i| {
                    let n = chunk * 1000 + i;
                    denied((n % 200) as u8 + 10, (n / 200) as u16)
                })
                .collect();
            l.add(batch, 0, &ctx, T0 + i64::from(chunk));
            assert!(l.status(true).window_records <= DEFAULT_MAX_WINDOW_RECORDS);
        }
        let st = l.status(true);
        assert_eq!(st.window_records, DEFAULT_MAX_WINDOW_RECORDS);
        assert_eq!(
            st.flow_records_dropped,
            100_000 - DEFAULT_MAX_WINDOW_RECORDS as u64
        );
        // The newest records are the ones kept.
        let w = l.window.as_ref().unwrap();
        assert!(w.records.contains_key(&RecKey {
            remote: addr(((99_999 % 200) + 10) as u8),
            role: Role::Responder,
            proto: Proto::Tcp,
            port: (99_999 / 200) as u16,
            verdict: FlowVerdict::Denied,
            rule: None,
            reason: Some(DenyCause::NoRule),
        }));
        l.handle_timeout(T0 + W);
        let st = l.status(true);
        assert!(st.spool_records <= 10 * MAX_RECORDS_PER_REPORT);
        assert_eq!(
            st.flow_records_dropped,
            100_000 - st.spool_records as u64,
            "every record is either spooled or counted as dropped"
        );
        let last = l.spool.back().unwrap();
        assert_eq!(last.dropped_records, st.flow_records_dropped);
        assert_eq!(last.seq, (DEFAULT_MAX_WINDOW_RECORDS as u64).div_ceil(56));
    }

    #[test]
    fn reports_are_kept_until_acked_and_resent_in_order_after_a_reconnect() {
        let ctx = FlowContext::default();
        let mut l = log(FlowLogConfig {
            window_ms: 1000,
            ..FlowLogConfig::default()
        });
        for i in 0..6 {
            l.add(vec![denied(3, i)], 0, &ctx, T0 + i64::from(i) * 1000);
        }
        l.handle_timeout(T0 + 10_000);
        assert_eq!(l.spool.len(), 6);
        let t = Instant::now();
        // At most MAX_IN_FLIGHT, MIN_REPORT_GAP apart.
        let first = l.poll_report(t).unwrap();
        assert_eq!(first.seq, 1);
        assert_eq!(l.poll_report(t), None, "too soon");
        let mut sent = vec![first.clone()];
        for k in 1..10 {
            if let Some(r) = l.poll_report(t + MIN_REPORT_GAP * k) {
                sent.push(r);
            }
        }
        assert_eq!(sent.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        l.handle_ack(2);
        l.handle_ack(99); // unknown: ignored
        assert_eq!(l.status(true).spool_reports, 5);
        assert_eq!(l.status(true).last_acked_seq, Some(2));
        // The session breaks: 1, 3, 4 go again, in order, unchanged, then 5 and 6.
        l.session_ended();
        let t2 = t + Duration::from_secs(60);
        let mut again = vec![];
        for k in 0..10 {
            if let Some(r) = l.poll_report(t2 + MIN_REPORT_GAP * k) {
                again.push(r);
            }
            if again.len() == 2 {
                l.handle_ack(again[0].seq);
            }
        }
        assert_eq!(
            again.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 3, 4, 5, 6]
        );
        assert_eq!(again[0], first, "a retransmission repeats the report");
        // Not acked for RESEND_AFTER: sent again in the same session.
        let late = t2 + RESEND_AFTER + MIN_REPORT_GAP * 20;
        assert_eq!(l.poll_report(late).map(|r| r.seq), Some(3));
    }

    #[test]
    fn a_small_spool_drops_the_oldest_and_says_so_and_state_survives_a_restart() {
        let ctx = FlowContext::default();
        let mut l = log(FlowLogConfig {
            window_ms: 1000,
            max_spool_records: 3,
            ..FlowLogConfig::default()
        });
        for i in 0..5 {
            l.add(
                vec![denied(3, i), denied(4, i)],
                0,
                &ctx,
                T0 + i64::from(i) * 1000,
            );
        }
        l.handle_timeout(T0 + 10_000);
        let st = l.state();
        assert_eq!(st.spool.len(), 1, "two records a report, three at most");
        assert_eq!(st.spool[0].seq, 5);
        assert_eq!(st.dropped_records, 8);
        assert_eq!(st.spool[0].dropped_records, 8);
        assert_eq!(st.next_seq, 6);
        let t = Instant::now();
        assert!(l.take_dirty(t));
        l.handle_ack(5);
        assert!(!l.take_dirty(t), "only an ack: saved later");
        assert!(l.take_dirty(t + SAVE_GAP));
        // A restart: numbering continues, the spool goes again.
        let mut l2 = log(FlowLogConfig::default());
        l2.restore(serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap());
        assert_eq!(l2.poll_report(Instant::now()).map(|r| r.seq), Some(5));
        l2.add(vec![denied(3, 1)], 0, &ctx, T0 + 20_000);
        l2.close_window();
        let r = l2.spool.back().unwrap();
        assert_eq!((r.seq, r.dropped_records), (6, 8));
        // Samples the data plane dropped count too, and an empty report carries a new count.
        l2.add(vec![], 5, &ctx, T0 + 30_000);
        l2.handle_timeout(T0 + 30_001);
        let r = l2.spool.back().unwrap();
        assert_eq!((r.seq, r.dropped_records, r.windows.len()), (7, 13, 0));
    }

    #[test]
    fn the_underreport_hook_scales_counts_down() {
        let ctx = FlowContext::default();
        let mut l = log(FlowLogConfig {
            underreport_percent: 50,
            ..FlowLogConfig::default()
        });
        l.add(vec![sample(2, Role::Initiator, 80, 1001)], 0, &ctx, T0);
        l.close_window();
        let rec = &l.spool[0].windows[0].records[0];
        assert_eq!((rec.bytes_out, rec.bytes_in), (500, 1001));
        assert_eq!(
            (rec.packets_out, rec.packets_in, rec.connections),
            (0, 1, 1)
        );
    }

    #[test]
    fn the_candidate_verdict_reaches_the_record_and_a_would_deny_wins_a_merge() {
        let ctx = FlowContext::from_netmap(&netmap());
        let mut l = log(FlowLogConfig::default());
        let mut a = sample(2, Role::Responder, 80, 100);
        a.key.shadow = Some(ShadowVerdict::WouldAllow);
        let mut b = a.clone();
        b.key.shadow = Some(ShadowVerdict::WouldDeny);
        let mut c = sample(2, Role::Responder, 443, 100);
        c.key.shadow = Some(ShadowVerdict::WouldAllow);
        let plain = sample(2, Role::Responder, 22, 100);
        l.add(vec![a, c], 0, &ctx, T0);
        l.add(vec![b, plain], 0, &ctx, T0 + 1);
        l.close_window();
        let recs = &l.spool[0].windows[0].records;
        let by_port = |p: u16| recs.iter().find(|r| r.port == p).map(|r| r.shadow);
        assert_eq!(recs.len(), 3, "one record per key: {recs:#?}");
        assert_eq!(by_port(80), Some(Some(ShadowVerdict::WouldDeny)));
        assert_eq!(by_port(443), Some(Some(ShadowVerdict::WouldAllow)));
        assert_eq!(by_port(22), Some(None));
    }
}
