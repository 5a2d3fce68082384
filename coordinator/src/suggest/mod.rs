//! Least-privilege suggestions from observed flows, free of I/O (time passed in).
//!
//! ```text
//! admin `policy suggest` request:
//!   rows   = store.flows(since)                       both ends' records in the window
//!   pairs  = flows::pair(&rows, &Tolerance, now_ms)   one flow per span, with its status
//!   found  = suggest(&Input { policy, dir, pairs, now_ms, min_days, .. })
//!   text   = write::candidate(policy_text, policy, dir, pairs, &found, mode, now_ms)  (--write)
//!   diff   = replay::replay(candidate, dir, pairs, now_ms)                     (policy replay)
//! ```
//!
//! Suggestions are of four kinds:
//! - `add`: denied attempts (reason `no rule`) from one identity to one port of one device, seen
//!   on enough days, or traffic that only a just-in-time grant allowed, look like a missing rule.
//!   The new rule names identities (a user, a bound device name, a tag) and the exact ports
//!   seen, never an address and never a whole protocol. A source that was denied on many
//!   distinct destinations or ports looks like a scan or lateral movement: it gets an
//!   `investigate` finding and never a rule.
//! - `narrow`: a service port range of which only some ports were used; a rule's group of which
//!   only some members used it; a service on several devices of which only some were reached.
//! - `expire`: a rule or grant that allowed no flow in the window.
//!
//! Only flows confirmed by both ends (pair status `paired` or `mismatch`: both ends reported
//! the flow) count toward an allow; one-sided and pending flows are counted in the evidence
//! and never used. The server side is the responder of the pair (from connection state), never
//! guessed from port numbers. Each suggestion carries a stable ID (a hash of its kind and
//! subject) so dismissals and acceptances can be tracked across runs.

pub mod replay;
pub mod write;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowVerdict};
use ward_shared::policy::{DirDevice, Directory, Policy, Selector};
use ward_shared::wire::DeviceId;

use crate::flows::{Pair, PairStatus};

/// One day, for counting the days on which something was seen.
pub const DAY_MS: i64 = 86_400_000;
/// A source denied on at least this many distinct (device, protocol, port) is probing.
pub const SCAN_DISTINCT_TARGETS: usize = 10;
/// Fewest denied connections (both ends confirming) before a denial looks like a missing rule.
pub const MIN_DENIED_CONNECTIONS: u64 = 3;
/// Most suggestions of one kind listed (the rest are counted, not listed).
pub const MAX_PER_KIND: usize = 1000;

/// What `suggest` looks at.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The policy in force.
    pub policy: &'a Policy,
    /// Users, devices and active grants.
    pub dir: &'a Directory,
    /// The window's flows, paired.
    pub pairs: &'a [Pair],
    pub now_ms: i64,
    /// Start of the window.
    pub since_ms: i64,
    /// Evidence seen on fewer distinct days than this is low confidence.
    pub min_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Add,
    Narrow,
    Expire,
    Investigate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Narrow => "narrow",
            Kind::Expire => "expire",
            Kind::Investigate => "investigate",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    Low,
    Medium,
    High,
}

impl Confidence {
    pub fn as_str(self) -> &'static str {
        match self {
            Confidence::Low => "low",
            Confidence::Medium => "medium",
            Confidence::High => "high",
        }
    }
}

/// One port (or ICMP) a flow used: `tcp/8080`, `icmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortUse {
    pub proto: Proto,
    /// 0 for ICMP.
    pub port: u16,
}

impl std::fmt::Display for PortUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.proto {
            Proto::Icmp => f.write_str("icmp"),
            Proto::Tcp => write!(f, "tcp/{}", self.port),
            Proto::Udp => write!(f, "udp/{}", self.port),
        }
    }
}

/// The concrete policy change. Selectors are written as the policy language writes them
/// (`user:alice`, `device:web1`, `tag:ci`, `group:eng`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A new service (these devices, exactly these ports) and a rule from these sources to it.
    AddRule {
        rule: String,
        from: Vec<String>,
        service: String,
        devices: Vec<String>,
        ports: Vec<PortUse>,
    },
    /// The service opens only these ports (instead of its ranges).
    NarrowPorts {
        service: String,
        ports: Vec<PortUse>,
    },
    /// The rule's `from` becomes this list.
    NarrowFrom {
        rule_index: usize,
        rule: String,
        from: Vec<String>,
    },
    /// The service lives only on these devices.
    NarrowDevices {
        service: String,
        devices: Vec<String>,
    },
    /// Remove the rule.
    ExpireRule { rule_index: usize, rule: String },
    /// Remove the grant (`grant rm ID`; grants are not in the policy file).
    ExpireGrant { grant: String },
    /// Nothing to write: look at it.
    Investigate { device: String },
}

/// What was seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    pub first_seen_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    /// Distinct UTC days with a flow.
    pub days_seen: u32,
    /// Connections (at least one per span).
    pub flows: u64,
    pub bytes: u64,
    /// Distinct source devices.
    pub sources: u32,
    /// Flows only one end reported: shown, never used.
    pub one_sided: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suggestion {
    /// Stable: a hash of kind and subject.
    pub id: String,
    pub kind: Kind,
    /// What it is about (`rule "eng-to-db"`, `service web ports`, `grant g1a2b`).
    pub subject: String,
    /// The change in one line.
    pub summary: String,
    pub change: Change,
    pub evidence: Evidence,
    pub confidence: Confidence,
    pub confidence_reason: String,
    /// What else the admin should know (devices a selector admits that were never seen).
    pub notes: Vec<String>,
}

impl Suggestion {
    /// Low-confidence items and findings are listed, never written.
    pub fn writable(&self) -> bool {
        self.confidence != Confidence::Low && self.kind != Kind::Investigate
    }
}

/// The stable ID of a suggestion: 12 hex digits of SHA-256 over kind and subject.
pub fn suggestion_id(kind: Kind, subject: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(kind.as_str().as_bytes());
    h.update([0u8]);
    h.update(subject.as_bytes());
    let d = h.finalize();
    format!("s{}", hex::encode(&d[..6]))
}

/// Whether both ends reported the flow: only these count toward an allow.
pub fn confirmed(p: &Pair) -> bool {
    match p.status {
        PairStatus::Paired | PairStatus::Mismatch => true,
        PairStatus::Denied => p.initiator_counts.is_some() && p.responder_counts.is_some(),
        PairStatus::OneSided | PairStatus::Pending => false,
    }
}

/// Connections in a pair (at least one).
pub(crate) fn connections(p: &Pair) -> u64 {
    let i = p.initiator_counts.map_or(0, |c| c.connections);
    let r = p.responder_counts.map_or(0, |c| c.connections);
    i.max(r).max(1)
}

pub(crate) fn bytes(p: &Pair) -> u64 {
    let i = p.initiator_counts.map_or(0, |c| c.bytes());
    let r = p.responder_counts.map_or(0, |c| c.bytes());
    i.max(r)
}

/// Adds pairs to an evidence record.
#[derive(Default)]
struct Acc {
    ev: Evidence,
    days: BTreeSet<i64>,
    sources: BTreeSet<DeviceId>,
}

impl Acc {
    fn add(&mut self, p: &Pair) {
        if !confirmed(p) {
            self.ev.one_sided += 1;
            return;
        }
        self.ev.first_seen_ms = Some(
            self.ev
                .first_seen_ms
                .map_or(p.start_ms, |x| x.min(p.start_ms)),
        );
        self.ev.last_seen_ms = Some(self.ev.last_seen_ms.map_or(p.end_ms, |x| x.max(p.end_ms)));
        self.days.insert(p.start_ms.div_euclid(DAY_MS));
        self.ev.flows = self.ev.flows.saturating_add(connections(p));
        self.ev.bytes = self.ev.bytes.saturating_add(bytes(p));
        if let Some(i) = p.initiator {
            self.sources.insert(i);
        }
    }

    fn done(mut self) -> Evidence {
        self.ev.days_seen = u32::try_from(self.days.len()).unwrap_or(u32::MAX);
        self.ev.sources = u32::try_from(self.sources.len()).unwrap_or(u32::MAX);
        self.ev
    }
}

/// Who a selector admits, over the live devices.
pub struct Index<'a> {
    policy: &'a Policy,
    dir: &'a Directory,
    by_id: BTreeMap<DeviceId, &'a DirDevice>,
}

impl<'a> Index<'a> {
    pub fn new(policy: &'a Policy, dir: &'a Directory) -> Self {
        Self {
            policy,
            dir,
            by_id: dir
                .devices
                .iter()
                .filter(|d| d.live)
                .map(|d| (d.id, d))
                .collect(),
        }
    }

    pub fn device(&self, id: DeviceId) -> Option<&'a DirDevice> {
        self.by_id.get(&id).copied()
    }

    pub fn name(&self, id: Option<DeviceId>) -> String {
        match id {
            Some(id) => self
                .dir
                .devices
                .iter()
                .find(|d| d.id == id)
                .map_or_else(|| id.to_string(), |d| d.hostname.clone()),
            None => "-".into(),
        }
    }

    fn in_group(&self, user: &str, group: &str) -> bool {
        self.policy
            .groups
            .get(group)
            .is_some_and(|g| g.members.iter().any(|m| m.value == user))
            || self
                .dir
                .users
                .iter()
                .any(|u| u.name == user && u.groups.iter().any(|g| g == group))
    }

    pub fn matches(&self, sel: &Selector, d: &DirDevice) -> bool {
        match sel {
            Selector::User(u) => d.user.as_deref() == Some(u.as_str()),
            Selector::Group(g) => d.user.as_deref().is_some_and(|u| self.in_group(u, g)),
            Selector::Tag(t) => d.tags.iter().any(|x| x == t),
            Selector::Device(h) => d.name_bound && d.hostname == *h,
        }
    }

    /// The live devices any of `sels` admits.
    pub fn admitted(&self, sels: &[Selector]) -> BTreeSet<DeviceId> {
        self.by_id
            .values()
            .filter(|d| sels.iter().any(|s| self.matches(s, d)))
            .map(|d| d.id)
            .collect()
    }

    /// The narrowest identity selector for a source device that admits no device outside
    /// `observed`; if none does, the device's own narrowest one with how many unobserved
    /// devices it admits.
    pub fn source_selector(
        &self,
        id: DeviceId,
        observed: &BTreeSet<DeviceId>,
    ) -> Option<(Selector, usize)> {
        let d = self.device(id)?;
        let mut options = Vec::new();
        if let Some(u) = &d.user {
            options.push(Selector::User(u.clone()));
        }
        if d.name_bound {
            options.push(Selector::Device(d.hostname.clone()));
        }
        for t in &d.tags {
            options.push(Selector::Tag(t.clone()));
        }
        let mut best: Option<(Selector, usize)> = None;
        for s in options {
            let extra = self
                .admitted(std::slice::from_ref(&s))
                .difference(observed)
                .count();
            if extra == 0 {
                return Some((s, 0));
            }
            if best.as_ref().is_none_or(|(_, e)| extra < *e) {
                best = Some((s, extra));
            }
        }
        best
    }
}

/// Every suggestion for the input, sorted by kind then subject.
pub fn suggest(input: &Input<'_>) -> Vec<Suggestion> {
    let ix = Index::new(input.policy, input.dir);
    let logging_days: BTreeSet<i64> = input
        .pairs
        .iter()
        .map(|p| p.start_ms.div_euclid(DAY_MS))
        .collect();
    let logging_days = u32::try_from(logging_days.len()).unwrap_or(u32::MAX);
    let mut out = Vec::new();
    let scanners = investigate(input, &ix, &mut out);
    add(input, &ix, &scanners, &mut out);
    narrow(input, &ix, &mut out);
    expire(input, logging_days, &mut out);
    out.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    out.retain(|s| {
        let n = per_kind.entry(s.kind).or_default();
        *n += 1;
        *n <= MAX_PER_KIND
    });
    out
}

fn make(
    kind: Kind,
    subject: String,
    summary: String,
    change: Change,
    evidence: Evidence,
    (confidence, confidence_reason): (Confidence, String),
    notes: Vec<String>,
) -> Suggestion {
    Suggestion {
        id: suggestion_id(kind, &subject),
        kind,
        subject,
        summary,
        change,
        evidence,
        confidence,
        confidence_reason,
        notes,
    }
}

fn by_days(days: u32, min_days: u32, at_least: Confidence) -> (Confidence, String) {
    if days < min_days {
        (
            Confidence::Low,
            format!("seen on {days} day(s), fewer than --min-days {min_days}"),
        )
    } else {
        (at_least, format!("seen on {days} day(s)"))
    }
}

pub(crate) fn port_of(p: &Pair) -> PortUse {
    PortUse {
        proto: p.proto,
        port: if p.proto == Proto::Icmp { 0 } else { p.port },
    }
}

/// Denials with no rule, from known devices to known devices.
pub(crate) fn no_rule_denial(p: &Pair) -> bool {
    p.verdict == FlowVerdict::Denied
        && p.reason == Some(DenyCause::NoRule)
        && p.initiator.is_some()
        && p.responder.is_some()
}

/// Sources denied on many distinct targets: findings, never rules. Returns those sources.
fn investigate(input: &Input<'_>, ix: &Index<'_>, out: &mut Vec<Suggestion>) -> BTreeSet<DeviceId> {
    let mut targets: BTreeMap<DeviceId, BTreeSet<(DeviceId, PortUse)>> = BTreeMap::new();
    let mut accs: BTreeMap<DeviceId, Acc> = BTreeMap::new();
    for p in input.pairs.iter().filter(|p| no_rule_denial(p)) {
        let (Some(i), Some(r)) = (p.initiator, p.responder) else {
            continue;
        };
        targets.entry(i).or_default().insert((r, port_of(p)));
        accs.entry(i).or_default().add(p);
    }
    let mut scanners = BTreeSet::new();
    for (src, t) in targets {
        if t.len() < SCAN_DISTINCT_TARGETS {
            continue;
        }
        scanners.insert(src);
        let devices: BTreeSet<DeviceId> = t.iter().map(|(d, _)| *d).collect();
        let name = ix.name(Some(src));
        let ev = accs.remove(&src).unwrap_or_default().done();
        out.push(make(
            Kind::Investigate,
            format!("device {name} denied on many targets"),
            format!(
                "{name} was denied on {} distinct device/port targets ({} devices): a scan or lateral movement, not a missing rule",
                t.len(),
                devices.len()
            ),
            Change::Investigate { device: name },
            ev,
            (
                Confidence::High,
                format!("{} distinct targets (threshold {SCAN_DISTINCT_TARGETS})", t.len()),
            ),
            vec![],
        ));
    }
    scanners
}

/// A bound device name for a responder, or `None`.
fn dest_selector(ix: &Index<'_>, id: DeviceId) -> Option<String> {
    let d = ix.device(id)?;
    d.name_bound
        .then(|| Selector::Device(d.hostname.clone()).to_string())
}

fn add(
    input: &Input<'_>,
    ix: &Index<'_>,
    scanners: &BTreeSet<DeviceId>,
    out: &mut Vec<Suggestion>,
) {
    // Repeated denials: per (source, destination, port).
    let mut denied: BTreeMap<(DeviceId, DeviceId, PortUse), Acc> = BTreeMap::new();
    for p in input.pairs.iter().filter(|p| no_rule_denial(p)) {
        let (Some(i), Some(r)) = (p.initiator, p.responder) else {
            continue;
        };
        if scanners.contains(&i) {
            continue;
        }
        denied.entry((i, r, port_of(p))).or_default().add(p);
    }
    for ((src, dst, port), acc) in denied {
        let ev = acc.done();
        if ev.flows == 0 {
            // Only one end reported the attempts: shown by `flows --denied`, never a rule.
            continue;
        }
        let observed = BTreeSet::from([src]);
        let Some((sel, extra)) = ix.source_selector(src, &observed) else {
            continue;
        };
        let (src_name, dst_name) = (ix.name(Some(src)), ix.name(Some(dst)));
        let mut notes = Vec::new();
        let mut conf = by_days(ev.days_seen, input.min_days, Confidence::Medium);
        if extra > 0 {
            notes.push(format!(
                "{sel} admits {extra} device(s) never seen doing this"
            ));
        }
        let devices = match dest_selector(ix, dst) {
            Some(s) => vec![s],
            None => {
                conf = (
                    Confidence::Low,
                    format!("{dst_name} has no bound name to scope a service to"),
                );
                vec![format!("device:{dst_name}")]
            }
        };
        if ev.flows < MIN_DENIED_CONNECTIONS && conf.0 != Confidence::Low {
            conf = (
                Confidence::Low,
                format!("only {} denied connection(s)", ev.flows),
            );
        }
        let subject = format!("{src_name} -> {dst_name} {port}");
        let base = format!("{}-{}-{}", src_name, dst_name, port).replace('/', "-");
        out.push(make(
            Kind::Add,
            subject,
            format!(
                "allow {sel} to reach {port} on {dst_name}: {} denied connection(s) with no rule",
                ev.flows
            ),
            Change::AddRule {
                rule: format!("suggested-{base}"),
                from: vec![sel.to_string()],
                service: format!("suggested-{base}"),
                devices,
                ports: vec![port],
            },
            ev,
            conf,
            notes,
        ));
    }
    // Traffic only a grant allowed: per grant, its sources, destinations and ports.
    for g in &input.dir.grants {
        let label = format!("grant:{}", g.id);
        let mut acc = Acc::default();
        let mut dsts = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut srcs = BTreeSet::new();
        for p in input
            .pairs
            .iter()
            .filter(|p| p.verdict == FlowVerdict::Allowed && p.rule.as_deref() == Some(&label))
        {
            acc.add(p);
            if confirmed(p) {
                if let (Some(i), Some(r)) = (p.initiator, p.responder) {
                    srcs.insert(i);
                    dsts.insert(r);
                    ports.insert(port_of(p));
                }
            }
        }
        let ev = acc.done();
        if srcs.is_empty() {
            continue;
        }
        let mut notes = Vec::new();
        let mut from = BTreeSet::new();
        for s in &srcs {
            if let Some((sel, extra)) = ix.source_selector(*s, &srcs) {
                if extra > 0 {
                    notes.push(format!(
                        "{sel} admits {extra} device(s) never seen using the grant"
                    ));
                }
                from.insert(sel.to_string());
            }
        }
        let mut conf = by_days(ev.days_seen, input.min_days, Confidence::Medium);
        let mut devices = Vec::new();
        for d in &dsts {
            match dest_selector(ix, *d) {
                Some(s) => devices.push(s),
                None => {
                    conf = (
                        Confidence::Low,
                        format!(
                            "{} has no bound name to scope a service to",
                            ix.name(Some(*d))
                        ),
                    );
                    devices.push(format!("device:{}", ix.name(Some(*d))));
                }
            }
        }
        let ports: Vec<PortUse> = ports.into_iter().collect();
        let port_list: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        out.push(make(
            Kind::Add,
            format!("grant {} used as standing access", g.id),
            format!(
                "traffic allowed only by grant {} ({} -> {}): make it a rule for {}",
                g.id,
                g.from,
                g.to,
                port_list.join(",")
            ),
            Change::AddRule {
                rule: format!("suggested-from-grant-{}", g.id),
                from: from.into_iter().collect(),
                service: format!("suggested-from-grant-{}", g.id),
                devices,
                ports,
            },
            ev,
            conf,
            notes,
        ));
    }
}

/// Allowed pairs whose rule is `name` (as flow records carry it: cut to their text limit).
fn used_by<'p>(pairs: &'p [Pair], name: &str) -> impl Iterator<Item = &'p Pair> {
    let name = ward_shared::flows::clip(name);
    pairs
        .iter()
        .filter(move |p| p.verdict == FlowVerdict::Allowed && p.rule.as_deref() == Some(&name))
}

fn narrow(input: &Input<'_>, ix: &Index<'_>, out: &mut Vec<Suggestion>) {
    let p = input.policy;
    let live_rules: Vec<(usize, &ward_shared::policy::Rule)> = p
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.expires_ms.is_none_or(|x| x > input.now_ms))
        .collect();
    // Per service: what its rules' confirmed flows used.
    for (svc_name, svc) in &p.services {
        let rules: Vec<String> = live_rules
            .iter()
            .filter(|(_, r)| r.to.iter().any(|t| t.value == *svc_name))
            .map(|(_, r)| ward_shared::flows::clip(&r.name))
            .collect();
        if rules.is_empty() {
            continue;
        }
        let members = ix.admitted(
            &svc.devices
                .iter()
                .map(|s| s.value.clone())
                .collect::<Vec<_>>(),
        );
        let mut acc = Acc::default();
        let mut ports = BTreeSet::new();
        let mut reached = BTreeSet::new();
        for pr in input.pairs.iter().filter(|pr| {
            pr.verdict == FlowVerdict::Allowed
                && pr.rule.as_ref().is_some_and(|r| rules.contains(r))
                && pr.responder.is_some_and(|d| members.contains(&d))
                && svc.ports.allows(pr.proto, pr.port)
        }) {
            acc.add(pr);
            if confirmed(pr) {
                ports.insert(port_of(pr));
                if let Some(d) = pr.responder {
                    reached.insert(d);
                }
            }
        }
        let ev = acc.done();
        if ports.is_empty() {
            continue;
        }
        // Port ranges of which only some ports were used.
        let ranged = svc
            .ports
            .tcp
            .iter()
            .map(|r| (Proto::Tcp, r))
            .chain(svc.ports.udp.iter().map(|r| (Proto::Udp, r)))
            .any(|(proto, r)| {
                r.lo != r.hi
                    && ports
                        .iter()
                        .filter(|u| u.proto == proto && r.contains(u.port))
                        .count()
                        < usize::from(r.hi - r.lo) + 1
            });
        if ranged {
            let list: Vec<String> = ports.iter().map(|u| u.to_string()).collect();
            let open: Vec<String> = svc
                .ports
                .by_proto()
                .iter()
                .map(|(pr, rs)| ward_shared::policy::format_ports(*pr, rs))
                .collect();
            out.push(make(
                Kind::Narrow,
                format!("service {svc_name} ports"),
                format!(
                    "service {svc_name} opens {} but only {} was used: open only those",
                    open.join(","),
                    list.join(",")
                ),
                Change::NarrowPorts {
                    service: svc_name.clone(),
                    ports: ports.iter().copied().collect(),
                },
                ev.clone(),
                by_days(ev.days_seen, input.min_days, Confidence::High),
                vec![format!(
                    "every rule to service {svc_name} is narrowed: {}",
                    rules.join(", ")
                )],
            ));
        }
        // A service on several devices of which only some were reached.
        if members.len() > 1 && reached.len() < members.len() {
            let mut devices = Vec::new();
            let mut conf = by_days(ev.days_seen, input.min_days, Confidence::Medium);
            for d in &reached {
                match dest_selector(ix, *d) {
                    Some(s) => devices.push(s),
                    None => {
                        conf = (
                            Confidence::Low,
                            format!("{} has no bound name", ix.name(Some(*d))),
                        );
                        devices.push(format!("device:{}", ix.name(Some(*d))));
                    }
                }
            }
            out.push(make(
                Kind::Narrow,
                format!("service {svc_name} devices"),
                format!(
                    "service {svc_name} is on {} devices but only {} were reached: {}",
                    members.len(),
                    reached.len(),
                    devices.join(", ")
                ),
                Change::NarrowDevices {
                    service: svc_name.clone(),
                    devices,
                },
                ev,
                conf,
                vec![format!(
                    "{} device(s) would no longer offer service {svc_name}",
                    members.len() - reached.len()
                )],
            ));
        }
    }
    // Groups of which only some members used the rule.
    for (idx, rule) in &live_rules {
        if !rule
            .from
            .iter()
            .any(|s| matches!(s.value, Selector::Group(_)))
        {
            continue;
        }
        let mut acc = Acc::default();
        let mut seen = BTreeSet::new();
        for pr in used_by(input.pairs, &rule.name) {
            acc.add(pr);
            if confirmed(pr) {
                if let Some(i) = pr.initiator {
                    seen.insert(i);
                }
            }
        }
        let ev = acc.done();
        if seen.is_empty() {
            continue;
        }
        let mut from: BTreeSet<String> = BTreeSet::new();
        let mut unseen_total = 0usize;
        let mut narrowed = false;
        for s in &rule.from {
            let admitted = ix.admitted(std::slice::from_ref(&s.value));
            let used: BTreeSet<DeviceId> = admitted.intersection(&seen).copied().collect();
            if !matches!(s.value, Selector::Group(_)) || used.len() == admitted.len() {
                from.insert(s.value.to_string());
                continue;
            }
            narrowed = true;
            for d in &used {
                match ix.source_selector(*d, &seen) {
                    Some((sel, extra)) => {
                        unseen_total += extra;
                        from.insert(sel.to_string());
                    }
                    // A device no identity names: the group cannot be narrowed to it.
                    None => narrowed = false,
                }
            }
            if !narrowed {
                break;
            }
        }
        if !narrowed || from.is_empty() {
            continue;
        }
        let all = ix.admitted(
            &rule
                .from
                .iter()
                .map(|s| s.value.clone())
                .collect::<Vec<_>>(),
        );
        let never = all.difference(&seen).count();
        let mut notes = vec![format!(
            "the rule now admits {never} device(s) never seen using it"
        )];
        if unseen_total > 0 {
            notes.push(format!(
                "the narrowed selectors still admit {unseen_total} device(s) never seen using it"
            ));
        }
        let from: Vec<String> = from.into_iter().collect();
        out.push(make(
            Kind::Narrow,
            format!("rule {:?} sources", rule.name),
            format!(
                "rule {:?}: only {} device(s) used it; from = [{}]",
                rule.name,
                seen.len(),
                from.join(", ")
            ),
            Change::NarrowFrom {
                rule_index: *idx,
                rule: rule.name.clone(),
                from,
            },
            ev.clone(),
            by_days(ev.days_seen, input.min_days, Confidence::Medium),
            notes,
        ));
    }
}

fn expire(input: &Input<'_>, logging_days: u32, out: &mut Vec<Suggestion>) {
    let conf = |acc: &Evidence| -> (Confidence, String) {
        if acc.one_sided > 0 {
            (
                Confidence::Low,
                format!(
                    "{} flow(s) used it that only one end reported",
                    acc.one_sided
                ),
            )
        } else if logging_days < input.min_days {
            (
                Confidence::Low,
                format!(
                    "flows were recorded on {logging_days} day(s) of the window, fewer than --min-days {}",
                    input.min_days
                ),
            )
        } else {
            (
                Confidence::High,
                format!("no flow in {logging_days} day(s) of flow records"),
            )
        }
    };
    for (idx, rule) in input.policy.rules.iter().enumerate() {
        if rule.expires_ms.is_some_and(|x| x <= input.now_ms) {
            continue;
        }
        let mut acc = Acc::default();
        used_by(input.pairs, &rule.name).for_each(|p| acc.add(p));
        let ev = acc.done();
        if ev.flows > 0 {
            continue;
        }
        let c = conf(&ev);
        out.push(make(
            Kind::Expire,
            format!("rule {:?}", rule.name),
            format!(
                "rule {:?} allowed no flow in the window: remove it",
                rule.name
            ),
            Change::ExpireRule {
                rule_index: idx,
                rule: rule.name.clone(),
            },
            ev,
            c,
            vec![],
        ));
    }
    for g in &input.dir.grants {
        if g.not_after_ms <= input.now_ms {
            continue;
        }
        let label = format!("grant:{}", g.id);
        let mut acc = Acc::default();
        used_by(input.pairs, &label).for_each(|p| acc.add(p));
        let ev = acc.done();
        if ev.flows > 0 {
            continue;
        }
        let c = conf(&ev);
        out.push(make(
            Kind::Expire,
            format!("grant {}", g.id),
            format!(
                "grant {} ({} -> {}) allowed no flow: `ward-coordinator grant rm {}`",
                g.id, g.from, g.to, g.id
            ),
            Change::ExpireGrant {
                grant: g.id.clone(),
            },
            ev,
            c,
            vec![],
        ));
    }
}
