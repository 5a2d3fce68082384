//! Pairing flow records from the two ends of a tunnel, free of I/O (time passed in).
//!
//! ```text
//! admin `flows` request:
//!   rows  = store.flows(query)                     both ends' records in the period
//!   pairs = pair(&rows, &Tolerance::default(), now_ms)
//!   (filter, sort, render; `top` sums pairs per (initiator, responder, proto, port))
//! ```
//!
//! The initiator's record (role initiator, peer = responder) and the responder's (role
//! responder, peer = initiator) describe one flow: they share the key (initiator,
//! responder, proto, port). Within a key, records whose windows overlap (the two devices' windows
//! need not be aligned) are joined transitively into one span, and each end's counts over the
//! span are summed; a span whose counts disagree is joined with the next adjacent span when the
//! two together agree (packets in flight at a window boundary are counted by the sender in one
//! window and by the receiver in the next). A span one end alone reported also joins a
//! touching span that is no clean pair (a disagreement, a denial, or the other end's records
//! alone): it is that flow's head or tail across the boundary. A span is then:
//!
//! - `denied` when either end recorded a denial. The enforcing end is usually the responder
//!   (its inbound filter), while the initiator saw an outbound flow with no reply; or the
//!   initiator's own filter refused it and nothing left the device. Either way the flow is
//!   one-sided or lopsided by nature, so it is reported as `denied` with both ends' counts,
//!   never as `one_sided` or `mismatch`.
//! - `paired` when both ends recorded it and their counts agree within the [`Tolerance`]
//!   (the initiator's out against the responder's in, and the reverse);
//! - `mismatch` when both ends recorded it and the counts disagree beyond it (loss, tampering or
//!   a bug);
//! - `one_sided` when only one end recorded it and the grace period for the other end's upload
//!   has passed since the span ended; `pending` before that.
//!
//! Denial reasons are corrected at intake by [`relabel`]: a device's filter knows only its own
//! inbound rules, so it records a packet that a posture requirement or a quarantine stopped as
//! `no rule`; the coordinator, which knows why, records `posture` or `quarantine` instead.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowRecord, FlowReport, FlowVerdict, Role, ShadowVerdict};
use ward_shared::policy::{self, Directory, Policy};
use ward_shared::wire::DeviceId;

use crate::store::FlowRow;

/// How far the two ends' counts may disagree, and how long one end's upload may lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tolerance {
    /// Allowed difference in percent of the larger count.
    pub percent: u64,
    /// Plus this many packets (in flight at a window boundary).
    pub packets: u64,
    /// Plus this many bytes (two full-size packets).
    pub bytes: u64,
    /// A record seen by one end is `pending`, not `one_sided`, until this long after its span.
    pub grace_ms: i64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            percent: 10,
            packets: 2,
            bytes: 3000,
            grace_ms: 2 * ward_shared::flows::DEFAULT_WINDOW_MS,
        }
    }
}

/// What pairing found for one span of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairStatus {
    Paired,
    Mismatch,
    OneSided,
    Pending,
    Denied,
}

impl PairStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PairStatus::Paired => "paired",
            PairStatus::Mismatch => "mismatch",
            PairStatus::OneSided => "one_sided",
            PairStatus::Pending => "pending",
            PairStatus::Denied => "denied",
        }
    }
}

/// One end's counts over a span, as that end reported them (`out`: sent by it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub connections: u64,
}

impl Counts {
    fn add(&mut self, r: &ward_shared::flows::FlowRecord) {
        self.packets_out = self.packets_out.saturating_add(r.packets_out);
        self.bytes_out = self.bytes_out.saturating_add(r.bytes_out);
        self.packets_in = self.packets_in.saturating_add(r.packets_in);
        self.bytes_in = self.bytes_in.saturating_add(r.bytes_in);
        self.connections = self.connections.saturating_add(r.connections);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes_out.saturating_add(self.bytes_in)
    }
}

/// One flow over one span, with both ends' view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    /// `None`: the initiator is an address no device holds (as the responder reported it).
    pub initiator: Option<DeviceId>,
    pub responder: Option<DeviceId>,
    /// The address of the end that is not a known device, if one is not.
    pub unknown_addr: Option<IpAddr>,
    pub proto: Proto,
    pub port: u16,
    pub start_ms: i64,
    pub end_ms: i64,
    pub verdict: FlowVerdict,
    /// The rule or grant that allowed it (the responder's word first: its inbound filter
    /// decides).
    pub rule: Option<String>,
    pub reason: Option<DenyCause>,
    pub policy_version: Option<u64>,
    pub status: PairStatus,
    /// The initiator's user and tags as the responder knew them, and the reverse.
    pub initiator_user: Option<String>,
    pub initiator_tags: Vec<String>,
    pub responder_user: Option<String>,
    pub responder_tags: Vec<String>,
    /// What the initiator reported (`None`: nothing).
    pub initiator_counts: Option<Counts>,
    pub responder_counts: Option<Counts>,
    /// The counts that disagree beyond the tolerance (`mismatch` only), e.g. `bytes i→r`.
    pub disagree: Vec<String>,
    /// The candidate view's verdict, as the end that decided reported it (merged over the
    /// span: a would-deny wins).
    pub shadow: Option<ShadowVerdict>,
}

/// The key both ends' records share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    initiator: End,
    responder: End,
    proto: Proto,
    port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Device(DeviceId),
    Addr(IpAddr),
}

/// Whether only one end reported the records of a span.
fn one_end_only(span: &[&FlowRow]) -> bool {
    span.windows(2)
        .all(|w| w[0].record.role == w[1].record.role)
}

/// Whether any record of a span is a denial.
fn any_denied(span: &[&FlowRow]) -> bool {
    span.iter().any(|r| r.record.verdict == FlowVerdict::Denied)
}

/// Pairs the records (any order) into spans, sorted by start time then key.
pub fn pair(rows: &[FlowRow], tol: &Tolerance, now_ms: i64) -> Vec<Pair> {
    let mut by_key: BTreeMap<Key, Vec<&FlowRow>> = BTreeMap::new();
    for row in rows {
        let me = End::Device(row.reporter);
        let other = match row.record.peer {
            Some(p) => End::Device(p),
            None => End::Addr(row.record.peer_addr),
        };
        let (initiator, responder) = match row.record.role {
            Role::Initiator => (me, other),
            Role::Responder => (other, me),
        };
        by_key
            .entry(Key {
                initiator,
                responder,
                proto: row.record.proto,
                port: row.record.port,
            })
            .or_default()
            .push(row);
    }
    let mut out = Vec::new();
    for (key, mut rows) in by_key {
        rows.sort_by_key(|r| (r.window_start_ms, r.window_end_ms));
        // Spans: windows overlapping transitively.
        let mut spans: Vec<(i64, i64, Vec<&FlowRow>)> = Vec::new();
        for r in rows {
            let joins = spans.last().is_some_and(|(start, end, _)| {
                r.window_start_ms < *end
                    || r.window_start_ms == *start
                    || r.window_start_ms == r.window_end_ms && r.window_start_ms <= *end
            });
            match spans.last_mut() {
                Some((_, end, span)) if joins => {
                    *end = (*end).max(r.window_end_ms);
                    span.push(r);
                }
                _ => spans.push((r.window_start_ms, r.window_end_ms, vec![r])),
            }
        }
        // Packets in flight at a window boundary are counted in one window by the sender and
        // in the next by the receiver: a span that disagrees, or that only one end reported,
        // or that is followed by a span only one end reported (a last ACK that arrived after
        // the boundary), is judged together with the span right after it when that makes the
        // two agree. A span that disagrees anyway also takes in a one-end tail touching it:
        // the tail is that flow's packets in flight, and left alone it would sit `pending`
        // for the whole grace period and then read as a second, one-sided flow.
        let mut spans = spans.into_iter().peekable();
        while let Some((start, mut end, mut span)) = spans.next() {
            let mut p = judge(&key, &span, start, end, tol, now_ms);
            while let Some((next_start, next_end, next)) = spans.peek() {
                if *next_start > end {
                    break;
                }
                let incomplete =
                    |s: PairStatus| matches!(s, PairStatus::Pending | PairStatus::OneSided);
                let next_incomplete = one_end_only(next) && !any_denied(next);
                let worth = match p.status {
                    PairStatus::Mismatch | PairStatus::Pending | PairStatus::OneSided => true,
                    PairStatus::Paired => one_end_only(next),
                    PairStatus::Denied => next_incomplete,
                };
                if !worth {
                    break;
                }
                let mut both = span.clone();
                both.extend(next.iter().copied());
                let joined = judge(&key, &both, start, (*next_end).max(end), tol, now_ms);
                let accept = match (p.status, joined.status) {
                    (_, PairStatus::Paired) => true,
                    // A one-end tail of a span that disagrees anyway.
                    (PairStatus::Mismatch, PairStatus::Mismatch) => one_end_only(next),
                    // A one-end head (the first packets, counted by one end before the
                    // boundary and by the other after it) of a span that is no clean pair: the
                    // other end's records alone, a disagreement (an end that under-reports), or
                    // a denial (the initiator's SYN before the boundary, the responder's
                    // refusal after it). A clean pair is never spoilt by a head.
                    (s, PairStatus::Mismatch | PairStatus::Denied) if incomplete(s) => {
                        judge(&key, next, *next_start, *next_end, tol, now_ms).status
                            != PairStatus::Paired
                    }
                    // A one-end tail of a denial, the same way round.
                    (PairStatus::Denied, PairStatus::Denied) => next_incomplete,
                    _ => false,
                };
                if !accept {
                    break;
                }
                end = (*next_end).max(end);
                span = both;
                p = joined;
                spans.next();
            }
            out.push(p);
        }
    }
    out.sort_by(|a, b| {
        (a.start_ms, a.initiator, a.responder, a.proto, a.port).cmp(&(
            b.start_ms,
            b.initiator,
            b.responder,
            b.proto,
            b.port,
        ))
    });
    out
}

fn judge(key: &Key, span: &[&FlowRow], start: i64, end: i64, tol: &Tolerance, now: i64) -> Pair {
    let mut ini: Option<Counts> = None;
    let mut resp: Option<Counts> = None;
    let mut p = Pair {
        initiator: match key.initiator {
            End::Device(d) => Some(d),
            End::Addr(_) => None,
        },
        responder: match key.responder {
            End::Device(d) => Some(d),
            End::Addr(_) => None,
        },
        unknown_addr: match (key.initiator, key.responder) {
            (End::Addr(a), _) | (_, End::Addr(a)) => Some(a),
            _ => None,
        },
        proto: key.proto,
        port: key.port,
        start_ms: start,
        end_ms: end,
        verdict: FlowVerdict::Allowed,
        rule: None,
        reason: None,
        policy_version: None,
        status: PairStatus::Paired,
        initiator_user: None,
        initiator_tags: Vec::new(),
        responder_user: None,
        responder_tags: Vec::new(),
        initiator_counts: None,
        responder_counts: None,
        disagree: Vec::new(),
        shadow: None,
    };
    // The responder's records go last, so its rule and reason win.
    let mut ordered: Vec<&&FlowRow> = span.iter().collect();
    ordered.sort_by_key(|r| r.record.role);
    for r in ordered {
        let rec = &r.record;
        match rec.role {
            Role::Initiator => {
                ini.get_or_insert_with(Counts::default).add(rec);
                p.responder_user = rec.peer_user.clone();
                p.responder_tags = rec.peer_tags.clone();
            }
            Role::Responder => {
                resp.get_or_insert_with(Counts::default).add(rec);
                p.initiator_user = rec.peer_user.clone();
                p.initiator_tags = rec.peer_tags.clone();
            }
        }
        match rec.verdict {
            FlowVerdict::Denied => {
                p.verdict = FlowVerdict::Denied;
                if rec.reason.is_some() {
                    p.reason = rec.reason;
                }
            }
            FlowVerdict::Allowed => {
                if rec.rule.is_some() {
                    p.rule = rec.rule.clone();
                }
            }
        }
        if rec.policy_version.is_some() {
            p.policy_version = p.policy_version.max(rec.policy_version);
        }
        p.shadow = ShadowVerdict::merge(p.shadow, rec.shadow);
    }
    p.status = match (&ini, &resp) {
        _ if p.verdict == FlowVerdict::Denied => PairStatus::Denied,
        (Some(i), Some(r)) => {
            p.disagree = disagreements(i, r, tol);
            if p.disagree.is_empty() {
                PairStatus::Paired
            } else {
                PairStatus::Mismatch
            }
        }
        _ if now.saturating_sub(end) < tol.grace_ms => PairStatus::Pending,
        _ => PairStatus::OneSided,
    };
    if p.verdict == FlowVerdict::Denied {
        p.rule = None;
    }
    p.initiator_counts = ini;
    p.responder_counts = resp;
    p
}

/// Which directions' counts disagree beyond the tolerance.
fn disagreements(i: &Counts, r: &Counts, tol: &Tolerance) -> Vec<String> {
    // |a - b| <= percent % of the larger + slack, in u128 so nothing overflows.
    let close = |a: u64, b: u64, slack: u64| {
        u128::from(a.abs_diff(b)) * 100
            <= u128::from(a.max(b)) * u128::from(tol.percent) + u128::from(slack) * 100
    };
    let mut out = Vec::new();
    if !close(i.packets_out, r.packets_in, tol.packets) {
        out.push("packets i→r".to_string());
    }
    if !close(i.packets_in, r.packets_out, tol.packets) {
        out.push("packets r→i".to_string());
    }
    if !close(i.bytes_out, r.bytes_in, tol.bytes) {
        out.push("bytes i→r".to_string());
    }
    if !close(i.bytes_in, r.bytes_out, tol.bytes) {
        out.push("bytes r→i".to_string());
    }
    out
}

/// What `flows top` ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TopBy {
    Bytes,
    Flows,
    Denied,
}

/// One (initiator, responder, proto, port) summed over its spans, for `flows top`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopEntry {
    pub initiator: Option<DeviceId>,
    pub responder: Option<DeviceId>,
    pub unknown_addr: Option<IpAddr>,
    pub proto: Proto,
    pub port: u16,
    /// Bytes both ways, the larger of the two ends' accounts, per span.
    pub bytes: u64,
    /// Connections started, the larger of the two ends' accounts, per span.
    pub flows: u64,
    /// Connections started in denied spans (at least one per denied span).
    pub denied: u64,
    pub spans: u64,
}

/// (initiator, responder, the unknown end's address, proto, port).
type TopKey = (
    Option<DeviceId>,
    Option<DeviceId>,
    Option<IpAddr>,
    Proto,
    u16,
);

/// Sums pairs per (initiator, responder, proto, port), largest first by `by`, at most `limit`.
pub fn top(pairs: &[Pair], by: TopBy, limit: usize) -> Vec<TopEntry> {
    let mut sums: BTreeMap<TopKey, TopEntry> = BTreeMap::new();
    for p in pairs {
        let e = sums
            .entry((p.initiator, p.responder, p.unknown_addr, p.proto, p.port))
            .or_insert_with(|| TopEntry {
                initiator: p.initiator,
                responder: p.responder,
                unknown_addr: p.unknown_addr,
                proto: p.proto,
                port: p.port,
                bytes: 0,
                flows: 0,
                denied: 0,
                spans: 0,
            });
        let ends = [p.initiator_counts, p.responder_counts];
        let bytes = ends.iter().flatten().map(Counts::bytes).max().unwrap_or(0);
        let conns = ends
            .iter()
            .flatten()
            .map(|c| c.connections)
            .max()
            .unwrap_or(0);
        e.bytes = e.bytes.saturating_add(bytes);
        e.flows = e.flows.saturating_add(conns);
        if p.verdict == FlowVerdict::Denied {
            e.denied = e.denied.saturating_add(conns.max(1));
        }
        e.spans += 1;
    }
    let mut v: Vec<TopEntry> = sums.into_values().collect();
    v.sort_by(|a, b| {
        let k = |e: &TopEntry| match by {
            TopBy::Bytes => e.bytes,
            TopBy::Flows => e.flows,
            TopBy::Denied => e.denied,
        };
        k(b).cmp(&k(a))
    });
    if by == TopBy::Denied {
        v.retain(|e| e.denied > 0);
    }
    v.truncate(limit);
    v
}

/// Whether [`relabel`] could change anything in `report` (so the registry need not be asked
/// when nothing was denied for a reason it corrects).
pub fn may_relabel(report: &FlowReport) -> bool {
    report
        .windows
        .iter()
        .flat_map(|w| &w.records)
        .any(|r| candidate(r).is_some())
}

/// Corrects the denial reasons of `report` (from `reporter`) that only the coordinator can
/// know, and says how many records it changed.
///
/// A denied record whose reason is `no rule` (or, at the initiator, which has no tunnel to a
/// peer it may not reach, `no lease`) is judged for source S and destination D: S is the
/// other end when the reporter was the responder, the reporter otherwise; D the reverse (an
/// end the record names only by address is found by address). If the policy does not allow
/// S to reach D on the flow's protocol and port now, but would if S met every posture
/// requirement and were not quarantined, the reason becomes `quarantine` when S is
/// quarantined, else `posture`. Anything else (an unknown device, no policy, a flow the policy
/// allows now, or one it would deny anyway) keeps the device's reason.
///
/// The judgement uses the policy explainer, so it agrees with `policy explain`, and the
/// state of S now (its posture and quarantine), with rule and grant expiries taken at the
/// window's end (or now, if earlier). A report is judged when it arrives, usually within
/// seconds of its window's end, so a posture change in between can label a record by the
/// newer state.
pub fn relabel(
    reporter: DeviceId,
    report: &mut FlowReport,
    policy: Option<&Policy>,
    dir: &Directory,
    now_ms: i64,
) -> usize {
    let Some(p) = policy else {
        return 0;
    };
    let mut changed = 0;
    for w in &mut report.windows {
        let at_ms = w.end_ms.min(now_ms);
        for r in &mut w.records {
            let Some(cause) = judge_denial(reporter, r, p, dir, at_ms) else {
                continue;
            };
            if r.reason != Some(cause) {
                r.reason = Some(cause);
                changed += 1;
            }
        }
    }
    changed
}

/// The record's reported role with the reasons [`relabel`] may correct, else `None`.
fn candidate(r: &FlowRecord) -> Option<Role> {
    if r.verdict != FlowVerdict::Denied {
        return None;
    }
    match (r.role, r.reason?) {
        (Role::Responder, DenyCause::NoRule) => Some(Role::Responder),
        (Role::Initiator, DenyCause::NoRule | DenyCause::NoLease) => Some(Role::Initiator),
        _ => None,
    }
}

/// `posture` or `quarantine` if that is what stopped the record's flow, else `None`.
fn judge_denial(
    reporter: DeviceId,
    r: &FlowRecord,
    p: &Policy,
    dir: &Directory,
    at_ms: i64,
) -> Option<DenyCause> {
    let role = candidate(r)?;
    let other = match r.peer {
        Some(id) => dir.devices.iter().find(|d| d.id == id)?,
        None => dir
            .devices
            .iter()
            .find(|d| IpAddr::V4(d.ipv4) == r.peer_addr || IpAddr::V6(d.ipv6) == r.peer_addr)?,
    };
    let me = dir.devices.iter().find(|d| d.id == reporter)?;
    let (src, dst) = match role {
        Role::Responder => (other, me),
        Role::Initiator => (me, other),
    };
    let all_met = p.postures.keys().all(|q| src.posture_passed.contains(q));
    if !src.quarantined && all_met {
        return None;
    }
    // A port no service opens (a scan's usual target) is `no rule` whatever the source's
    // state: decided without the explainer, whose cost grows with the directory.
    if !p.services.values().any(|s| s.ports.allows(r.proto, r.port)) {
        return None;
    }
    let target = match r.proto {
        Proto::Icmp => format!("device:{}:icmp", dst.hostname),
        Proto::Tcp => format!("device:{}:{}/tcp", dst.hostname, r.port),
        Proto::Udp => format!("device:{}:{}/udp", dst.hostname, r.port),
    };
    let from = format!("device:{}", src.hostname);
    let (src_id, dst_id) = (src.id, dst.id);
    let allows = |d: &Directory| -> Option<bool> {
        let e = policy::explain(p, d, &from, &target, at_ms).ok()?;
        Some(
            e.devices
                .iter()
                .any(|x| x.src_id == src_id && x.dst_id == dst_id && x.allowed),
        )
    };
    if allows(dir)? {
        return None;
    }
    let quarantined = src.quarantined;
    let mut lifted = dir.clone();
    let s = lifted.devices.iter_mut().find(|d| d.id == src_id)?;
    s.quarantined = false;
    s.posture_passed = p.postures.keys().cloned().collect();
    s.posture_failures.clear();
    if !allows(&lifted)? {
        return None;
    }
    Some(if quarantined {
        DenyCause::Quarantine
    } else {
        DenyCause::Posture
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::flows::FlowRecord;

    const A: DeviceId = DeviceId(1);
    const B: DeviceId = DeviceId(2);
    const W: i64 = 60_000;

    fn rec(role: Role, peer: DeviceId, out: (u64, u64), inn: (u64, u64)) -> FlowRecord {
        FlowRecord {
            role,
            peer: Some(peer),
            peer_addr: format!("100.64.0.{}", peer.0).parse().unwrap(),
            peer_user: Some(format!("u{}", peer.0)),
            peer_tags: vec![],
            proto: Proto::Tcp,
            port: 5432,
            verdict: FlowVerdict::Allowed,
            rule: Some("eng-db".into()),
            policy_version: Some(3),
            reason: None,
            packets_out: out.0,
            bytes_out: out.1,
            packets_in: inn.0,
            bytes_in: inn.1,
            connections: 1,
            shadow: None,
        }
    }

    fn row(reporter: DeviceId, start: i64, end: i64, record: FlowRecord) -> FlowRow {
        FlowRow {
            reporter,
            window_start_ms: start,
            window_end_ms: end,
            record,
        }
    }

    /// A talks to B: A's record as initiator, B's as responder.
    fn both(a_out: (u64, u64), b_out: (u64, u64)) -> Vec<FlowRow> {
        vec![
            row(A, 0, W, rec(Role::Initiator, B, a_out, b_out)),
            row(B, 0, W, rec(Role::Responder, A, b_out, a_out)),
        ]
    }

    #[test]
    fn both_ends_agreeing_are_paired() {
        let p = pair(&both((10, 1000), (9, 20_000)), &Tolerance::default(), W);
        assert_eq!(p.len(), 1);
        let p = &p[0];
        assert_eq!(p.status, PairStatus::Paired);
        assert_eq!((p.initiator, p.responder), (Some(A), Some(B)));
        assert_eq!(p.initiator_counts.unwrap().bytes_out, 1000);
        assert_eq!(p.responder_counts.unwrap().bytes_in, 1000);
        assert_eq!(p.rule.as_deref(), Some("eng-db"));
        assert_eq!(p.initiator_user.as_deref(), Some("u1"));
        assert_eq!(p.responder_user.as_deref(), Some("u2"));
    }

    #[test]
    fn counts_within_the_tolerance_pair_and_beyond_it_mismatch() {
        let tol = Tolerance::default();
        // 100 packets against 108: 10 % + 2 = 12 allowed.
        let mut rows = both((100, 100_000), (100, 100_000));
        rows[1].record.packets_in = 108;
        assert_eq!(pair(&rows, &tol, W)[0].status, PairStatus::Paired);
        rows[1].record.packets_in = 115;
        let p = &pair(&rows, &tol, W)[0];
        assert_eq!(p.status, PairStatus::Mismatch);
        assert_eq!(p.disagree, vec!["packets i→r".to_string()]);
        // Bytes are crossed: the initiator's in against the responder's out. Half reported
        // (an end that under-reports by 50 %) is far beyond the tolerance.
        let mut rows = both((100, 100_000), (100, 100_000));
        rows[1].record.bytes_out = 50_000;
        rows[1].record.packets_out = 50;
        let p = &pair(&rows, &tol, W)[0];
        assert_eq!(p.status, PairStatus::Mismatch);
        assert_eq!(
            p.disagree,
            vec!["packets r→i".to_string(), "bytes r→i".to_string()]
        );
        // Small flows: two packets of slack.
        let mut rows = both((2, 120), (0, 0));
        rows[1].record.packets_in = 0;
        rows[1].record.bytes_in = 0;
        assert_eq!(pair(&rows, &tol, W)[0].status, PairStatus::Paired);
        rows[0].record.packets_out = 3;
        assert_eq!(pair(&rows, &tol, W)[0].status, PairStatus::Mismatch);
    }

    #[test]
    fn one_end_only_is_pending_during_the_grace_period_then_one_sided() {
        let tol = Tolerance::default();
        let rows = vec![row(A, 0, W, rec(Role::Initiator, B, (5, 500), (5, 500)))];
        assert_eq!(pair(&rows, &tol, W + 1)[0].status, PairStatus::Pending);
        assert_eq!(
            pair(&rows, &tol, W + tol.grace_ms - 1)[0].status,
            PairStatus::Pending
        );
        let p = &pair(&rows, &tol, W + tol.grace_ms)[0];
        assert_eq!(p.status, PairStatus::OneSided);
        assert!(p.responder_counts.is_none());
        // The responder's record alone is one-sided the same way.
        let rows = vec![row(B, 0, W, rec(Role::Responder, A, (5, 500), (5, 500)))];
        let p = &pair(&rows, &tol, 10 * W)[0];
        assert_eq!(p.status, PairStatus::OneSided);
        assert_eq!((p.initiator, p.responder), (Some(A), Some(B)));
    }

    #[test]
    fn denied_flows_are_denied_with_both_counts_never_a_mismatch() {
        let tol = Tolerance::default();
        // The initiator sent 3 SYNs and saw no reply; the responder's filter refused them.
        let mut rows = both((3, 180), (0, 0));
        rows[1].record.verdict = FlowVerdict::Denied;
        rows[1].record.rule = None;
        rows[1].record.reason = Some(DenyCause::NoRule);
        rows[1].record.packets_in = 1; // lost two: would be a mismatch if allowed
        let p = &pair(&rows, &tol, 10 * W)[0];
        assert_eq!(p.status, PairStatus::Denied);
        assert_eq!(p.verdict, FlowVerdict::Denied);
        assert_eq!(p.reason, Some(DenyCause::NoRule));
        assert_eq!(p.rule, None);
        assert_eq!(p.initiator_counts.unwrap().packets_out, 3);
        assert_eq!(p.responder_counts.unwrap().packets_in, 1);
        // Denied by one end alone (the initiator's own filter): denied, not one-sided.
        let mut rows = vec![row(A, 0, W, rec(Role::Initiator, B, (3, 180), (0, 0)))];
        rows[0].record.verdict = FlowVerdict::Denied;
        rows[0].record.reason = Some(DenyCause::Posture);
        assert_eq!(pair(&rows, &tol, 10 * W)[0].status, PairStatus::Denied);
    }

    #[test]
    fn a_denied_attempt_split_by_a_window_boundary_is_one_denied_flow() {
        let tol = Tolerance::default();
        let syn = |reporter, start, role, peer, out, inn, denied: bool| {
            let mut r = row(reporter, start, start + W, rec(role, peer, out, inn));
            if denied {
                r.record.verdict = FlowVerdict::Denied;
                r.record.rule = None;
                r.record.reason = Some(DenyCause::NoRule);
            }
            r
        };
        // A's SYN left in A's first window; B refused it in B's next one.
        let rows = vec![
            syn(A, 0, Role::Initiator, B, (1, 60), (0, 0), false),
            syn(B, W, Role::Responder, A, (0, 0), (1, 60), true),
        ];
        // And the other way round (the two ends' clock corrections differ by a little).
        let reversed = vec![
            syn(B, 0, Role::Responder, A, (0, 0), (1, 60), true),
            syn(A, W, Role::Initiator, B, (1, 60), (0, 0), false),
        ];
        for rows in [rows, reversed] {
            for now in [W + 1, 10 * W] {
                let p = pair(&rows, &tol, now);
                assert_eq!(p.len(), 1, "{p:#?}");
                assert_eq!(p[0].status, PairStatus::Denied);
                assert_eq!(p[0].reason, Some(DenyCause::NoRule));
                assert_eq!((p[0].start_ms, p[0].end_ms), (0, 2 * W));
                assert_eq!(p[0].initiator_counts.unwrap().packets_out, 1);
                assert_eq!(p[0].responder_counts.unwrap().packets_in, 1);
            }
        }
        // A flow both ends agree on stays paired next to a later denial, and a denial is not
        // stretched over a later flow both ends reported.
        let rows = vec![
            syn(A, 0, Role::Initiator, B, (4, 400), (4, 400), false),
            syn(B, 0, Role::Responder, A, (4, 400), (4, 400), false),
            syn(A, W, Role::Initiator, B, (1, 60), (0, 0), true),
        ];
        let p = pair(&rows, &tol, 10 * W);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(
            (p[0].status, p[1].status),
            (PairStatus::Paired, PairStatus::Denied)
        );
        let rows = vec![
            syn(B, 0, Role::Responder, A, (0, 0), (1, 60), true),
            syn(A, W, Role::Initiator, B, (4, 400), (4, 400), false),
            syn(B, W, Role::Responder, A, (4, 400), (4, 400), false),
        ];
        let p = pair(&rows, &tol, 10 * W);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(
            (p[0].status, p[1].status),
            (PairStatus::Denied, PairStatus::Paired)
        );
    }

    #[test]
    fn misaligned_windows_are_summed_over_their_overlap() {
        // A's windows start at 0 and 60 s; B's at 30 s and 90 s: one span, summed.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (10, 1000), (10, 1000))),
            row(A, W, 2 * W, rec(Role::Initiator, B, (10, 1000), (10, 1000))),
            row(
                B,
                W / 2,
                W + W / 2,
                rec(Role::Responder, A, (15, 1500), (15, 1500)),
            ),
            row(
                B,
                W + W / 2,
                3 * W,
                rec(Role::Responder, A, (5, 500), (5, 500)),
            ),
        ];
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Paired);
        assert_eq!((p[0].start_ms, p[0].end_ms), (0, 3 * W));
        assert_eq!(p[0].initiator_counts.unwrap().bytes_out, 2000);
        // Aligned consecutive windows stay separate spans.
        let mut rows = both((1, 100), (1, 100));
        rows.extend(both((2, 200), (2, 200)).into_iter().map(|mut r| {
            r.window_start_ms += W;
            r.window_end_ms += W;
            r
        }));
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.status == PairStatus::Paired));
    }

    #[test]
    fn packets_in_flight_at_a_window_boundary_are_not_a_mismatch() {
        // A sent 30 packets in its first window; 10 of them reached B in B's second window.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (30, 42_000), (0, 0))),
            row(B, 0, W, rec(Role::Responder, A, (0, 0), (20, 28_000))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (10, 14_000))),
        ];
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Paired);
        assert_eq!((p[0].start_ms, p[0].end_ms), (0, 2 * W));
        // A real disagreement stays a mismatch, and the next window stays its own span.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (30, 42_000), (0, 0))),
            row(B, 0, W, rec(Role::Responder, A, (0, 0), (10, 14_000))),
            row(A, W, 2 * W, rec(Role::Initiator, B, (5, 500), (0, 0))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (5, 500))),
        ];
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Mismatch);
        assert_eq!(p[1].status, PairStatus::Paired);
    }

    #[test]
    fn a_one_end_head_joins_the_span_after_it_unless_that_is_a_clean_pair() {
        let tol = Tolerance::default();
        // A under-reports by half; its first packet was counted by A before the boundary and
        // by B after it. One flow, a mismatch at once: not a pending head plus a mismatch.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (1, 60), (0, 0))),
            row(A, W, 2 * W, rec(Role::Initiator, B, (15, 21_000), (0, 0))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (31, 42_060))),
        ];
        for now in [W + W / 2, 10 * W] {
            let p = pair(&rows, &tol, now);
            assert_eq!(p.len(), 1, "{p:#?}");
            assert_eq!(p[0].status, PairStatus::Mismatch);
            assert_eq!((p[0].start_ms, p[0].end_ms), (0, 2 * W));
            assert_eq!(p[0].initiator_counts.unwrap().packets_out, 16);
        }
        // The whole flow in one window at each end, the windows touching: each end's record
        // alone is the other's missing half, agreeing or not.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (15, 21_000), (0, 0))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (30, 42_000))),
        ];
        let p = pair(&rows, &tol, W + W / 2);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Mismatch);
        // A head that would spoil a clean pair stays on its own.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (100, 100_000), (0, 0))),
            row(A, W, 2 * W, rec(Role::Initiator, B, (10, 1000), (0, 0))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (10, 1000))),
        ];
        let p = pair(&rows, &tol, W + W / 2);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(
            (p[0].status, p[1].status),
            (PairStatus::Pending, PairStatus::Paired)
        );
    }

    #[test]
    fn a_one_end_tail_joins_a_mismatched_span_instead_of_waiting_as_pending() {
        // A under-reports by half; B counted A's last packet in its next window, which A
        // never reported. One flow, a mismatch at once: not a mismatch plus a pending tail.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (15, 21_000), (0, 0))),
            row(B, 0, W, rec(Role::Responder, A, (0, 0), (30, 42_000))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (1, 40))),
        ];
        for now in [W + W / 2, 10 * W] {
            let p = pair(&rows, &Tolerance::default(), now);
            assert_eq!(p.len(), 1, "{p:#?}");
            assert_eq!(p[0].status, PairStatus::Mismatch);
            assert_eq!((p[0].start_ms, p[0].end_ms), (0, 2 * W));
            assert_eq!(p[0].responder_counts.unwrap().packets_in, 31);
        }
        // A tail reported by both ends is a flow of its own, judged on its own counts.
        let mut rows = rows;
        rows.push(row(A, W, 2 * W, rec(Role::Initiator, B, (1, 40), (0, 0))));
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Mismatch);
        assert_eq!(p[1].status, PairStatus::Paired);
    }

    #[test]
    fn a_last_packet_after_the_boundary_joins_the_span_before_it() {
        // Both ends agree on the first window; B counted A's last packet in its next window,
        // which A never reported: one flow, paired, not a pending or one-sided span.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (31, 42_040), (0, 0))),
            row(B, 0, W, rec(Role::Responder, A, (0, 0), (30, 42_000))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (1, 40))),
        ];
        for now in [W + W / 2, 10 * W] {
            let p = pair(&rows, &Tolerance::default(), now);
            assert_eq!(p.len(), 1, "{p:#?}");
            assert_eq!(p[0].status, PairStatus::Paired);
            assert_eq!((p[0].start_ms, p[0].end_ms), (0, 2 * W));
        }
        // A's first packet went out just before a boundary, B counted it after it.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (1, 40), (0, 0))),
            row(A, W, 2 * W, rec(Role::Initiator, B, (30, 42_000), (0, 0))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (31, 42_040))),
        ];
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Paired);
        // A window one end never reported, with more than boundary traffic, stays one-sided.
        let rows = vec![
            row(A, 0, W, rec(Role::Initiator, B, (30, 42_000), (0, 0))),
            row(B, 0, W, rec(Role::Responder, A, (0, 0), (30, 42_000))),
            row(B, W, 2 * W, rec(Role::Responder, A, (0, 0), (500, 700_000))),
        ];
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2, "{p:#?}");
        assert_eq!(p[0].status, PairStatus::Paired);
        assert_eq!(p[1].status, PairStatus::OneSided);
    }

    #[test]
    fn different_ports_and_directions_are_different_flows() {
        let mut rows = both((1, 100), (1, 100));
        rows[1].record.port = 22;
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2);
        assert!(p.iter().all(|p| p.status == PairStatus::OneSided));
        // B initiating to A is not A initiating to B.
        let mut rows = both((1, 100), (1, 100));
        rows[1] = row(B, 0, W, rec(Role::Initiator, A, (1, 100), (1, 100)));
        let p = pair(&rows, &Tolerance::default(), 10 * W);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn an_unknown_address_is_kept_and_never_paired() {
        let mut r = rec(Role::Responder, A, (0, 0), (4, 240));
        r.peer = None;
        r.peer_addr = "100.64.9.9".parse().unwrap();
        r.verdict = FlowVerdict::Denied;
        r.reason = Some(DenyCause::SpoofedSource);
        let p = pair(&[row(B, 0, W, r)], &Tolerance::default(), 10 * W);
        assert_eq!(p[0].initiator, None);
        assert_eq!(p[0].unknown_addr, Some("100.64.9.9".parse().unwrap()));
        assert_eq!(p[0].status, PairStatus::Denied);
    }

    #[test]
    fn top_ranks_by_bytes_flows_and_denied() {
        let mut rows = both((10, 10_000), (10, 10_000));
        let mut denied = both((3, 180), (0, 0));
        for r in &mut denied {
            r.record.port = 22;
        }
        denied[1].record.verdict = FlowVerdict::Denied;
        denied[1].record.reason = Some(DenyCause::NoRule);
        denied[1].record.connections = 3;
        rows.extend(denied);
        let pairs = pair(&rows, &Tolerance::default(), 10 * W);
        let t = top(&pairs, TopBy::Bytes, 10);
        assert_eq!((t[0].port, t[0].bytes), (5432, 20_000));
        let t = top(&pairs, TopBy::Denied, 10);
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].port, t[0].denied), (22, 3));
        let t = top(&pairs, TopBy::Flows, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].port, 22);
    }

    mod relabel {
        use super::*;
        use std::net::{Ipv4Addr, Ipv6Addr};
        use ward_shared::flows::FlowWindow;
        use ward_shared::policy::{DirDevice, DirUser};

        const DB: DeviceId = DeviceId(1);
        const ALICE: DeviceId = DeviceId(2);
        const BOB: DeviceId = DeviceId(3);
        const NOW: i64 = 1_000 * W;

        const POLICY: &str = r#"
[posture.healthy]
firewall = true

[services.db]
devices = ["tag:db"]
ports = ["tcp/5432"]

[services.web]
devices = ["tag:db"]
ports = ["tcp/8080", "udp/53", "icmp"]

[services.patch]
devices = ["tag:db"]
ports = ["tcp/8443"]
remediation = true

[[rules]]
name = "db-needs-healthy"
from = ["alice"]
to = ["db"]
posture = ["healthy"]

[[rules]]
name = "web-for-all"
from = ["alice", "bob"]
to = ["web", "patch"]
"#;

        fn dev(id: DeviceId, host: &str, user: Option<&str>, tags: &[&str]) -> DirDevice {
            DirDevice {
                id,
                hostname: host.into(),
                user: user.map(str::to_string),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ipv4: Ipv4Addr::new(100, 64, 0, id.0 as u8),
                ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id.0 as u16),
                live: true,
                posture_passed: ["healthy".to_string()].into_iter().collect(),
                posture_failures: Default::default(),
                quarantined: false,
                name_bound: true,
            }
        }

        /// db, alice (failing `healthy` when `alice_fails`) and bob (quarantined when
        /// `bob_quarantined`).
        fn world(alice_fails: bool, bob_quarantined: bool) -> (Policy, Directory) {
            let p = policy::parse(POLICY.as_bytes(), "policy.toml").unwrap();
            let mut alice = dev(ALICE, "alice-laptop", Some("alice"), &[]);
            if alice_fails {
                alice.posture_passed.clear();
                alice
                    .posture_failures
                    .insert("healthy".into(), vec!["firewall: off".into()]);
            }
            let mut bob = dev(BOB, "bob-laptop", Some("bob"), &[]);
            bob.quarantined = bob_quarantined;
            let user = |n: &str| DirUser {
                name: n.into(),
                groups: vec![],
                disabled: false,
                suspended: None,
            };
            let d = Directory {
                users: vec![user("alice"), user("bob")],
                devices: vec![dev(DB, "db", None, &["db"]), alice, bob],
                grants: vec![],
            };
            (p, d)
        }

        /// A denied record as `role` saw it, the other end `peer` (by id, or by address only
        /// when `by_addr`), reason `reason`.
        fn denied(
            role: Role,
            peer: DeviceId,
            proto: Proto,
            port: u16,
            reason: DenyCause,
        ) -> FlowRecord {
            let mut r = rec(role, peer, (0, 0), (1, 60));
            r.peer_addr = IpAddr::V4(Ipv4Addr::new(100, 64, 0, peer.0 as u8));
            r.proto = proto;
            r.port = port;
            r.verdict = FlowVerdict::Denied;
            r.rule = None;
            r.policy_version = None;
            r.reason = Some(reason);
            r
        }

        fn report(records: Vec<FlowRecord>) -> FlowReport {
            FlowReport {
                seq: 1,
                windows: vec![FlowWindow {
                    start_ms: NOW - 2 * W,
                    end_ms: NOW - W,
                    records,
                }],
                dropped_records: 0,
            }
        }

        /// The reason after relabelling one record reported by `reporter`.
        fn judged(
            reporter: DeviceId,
            r: FlowRecord,
            p: &Policy,
            d: &Directory,
        ) -> Option<DenyCause> {
            let mut rep = report(vec![r]);
            relabel(reporter, &mut rep, Some(p), d, NOW);
            rep.windows[0].records[0].reason
        }

        #[test]
        fn a_flow_allowed_but_for_posture_is_labelled_posture() {
            let (p, d) = world(true, false);
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            assert!(may_relabel(&report(vec![r.clone()])));
            let mut rep = report(vec![r.clone()]);
            assert_eq!(relabel(DB, &mut rep, Some(&p), &d, NOW), 1);
            assert_eq!(rep.windows[0].records[0].reason, Some(DenyCause::Posture));
            // The initiator's record of the same flow, the responder known only by address.
            let mut i = denied(Role::Initiator, DB, Proto::Tcp, 5432, DenyCause::NoLease);
            i.peer = None;
            assert_eq!(judged(ALICE, i, &p, &d), Some(DenyCause::Posture));
        }

        #[test]
        fn a_quarantined_source_is_labelled_quarantine() {
            let (p, d) = world(false, true);
            for (proto, port) in [(Proto::Tcp, 8080), (Proto::Udp, 53), (Proto::Icmp, 8)] {
                let r = denied(Role::Responder, BOB, proto, port, DenyCause::NoRule);
                assert_eq!(
                    judged(DB, r, &p, &d),
                    Some(DenyCause::Quarantine),
                    "{proto:?}"
                );
            }
            // Quarantine wins over a failing requirement: it is what the admin must lift.
            let (p, mut d) = world(true, false);
            d.devices[1].quarantined = true;
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            assert_eq!(judged(DB, r, &p, &d), Some(DenyCause::Quarantine));
        }

        #[test]
        fn a_flow_no_rule_allows_stays_no_rule() {
            let (p, d) = world(true, true);
            // No rule lets bob reach db:5432, compliant or not; nothing opens db:22.
            let r = denied(Role::Responder, BOB, Proto::Tcp, 5432, DenyCause::NoRule);
            assert_eq!(judged(DB, r, &p, &d), Some(DenyCause::NoRule));
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 22, DenyCause::NoRule);
            assert_eq!(judged(DB, r, &p, &d), Some(DenyCause::NoRule));
            // The wrong direction: db may not open anything on alice.
            let r = denied(Role::Responder, DB, Proto::Tcp, 5432, DenyCause::NoRule);
            assert_eq!(judged(ALICE, r, &p, &d), Some(DenyCause::NoRule));
            // Allowed now (the state changed since): the device's reason stands.
            let (p, d) = world(false, false);
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            assert!(may_relabel(&report(vec![r.clone()])));
            let mut rep = report(vec![r]);
            assert_eq!(relabel(DB, &mut rep, Some(&p), &d, NOW), 0);
            assert_eq!(rep.windows[0].records[0].reason, Some(DenyCause::NoRule));
        }

        #[test]
        fn unknown_devices_other_reasons_and_no_policy_are_left_alone() {
            let (p, d) = world(true, true);
            // An address no device holds, and an id the directory does not know.
            let mut r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            r.peer = None;
            r.peer_addr = "100.64.9.9".parse().unwrap();
            assert_eq!(judged(DB, r, &p, &d), Some(DenyCause::NoRule));
            let r = denied(
                Role::Responder,
                DeviceId(77),
                Proto::Tcp,
                5432,
                DenyCause::NoRule,
            );
            assert_eq!(judged(DB, r, &p, &d), Some(DenyCause::NoRule));
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            assert_eq!(judged(DeviceId(77), r, &p, &d), Some(DenyCause::NoRule));
            // Reasons the device knows best, and `no lease` at the responder, are kept.
            for reason in [
                DenyCause::Expired,
                DenyCause::NoLease,
                DenyCause::SpoofedSource,
                DenyCause::WrongDestination,
                DenyCause::Malformed,
            ] {
                let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, reason);
                assert!(!may_relabel(&report(vec![r.clone()])), "{reason:?}");
                assert_eq!(judged(DB, r, &p, &d), Some(reason));
            }
            // Allowed flows are never touched; without a policy nothing is.
            let r = rec(Role::Responder, ALICE, (1, 60), (1, 60));
            assert!(!may_relabel(&report(vec![r])));
            let r = denied(Role::Responder, ALICE, Proto::Tcp, 5432, DenyCause::NoRule);
            let mut rep = report(vec![r]);
            assert_eq!(relabel(DB, &mut rep, None, &d, NOW), 0);
            assert_eq!(rep.windows[0].records[0].reason, Some(DenyCause::NoRule));
        }
    }
}
