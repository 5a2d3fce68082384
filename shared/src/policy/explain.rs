//! Why a source may or may not reach a destination, and what changes between compilations.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use super::compile::{effective_rules, format_ms, EffRule, Index};
use super::parse::parse_port_proto;
use super::{
    format_ports, proto_name, Compiled, DirDevice, Directory, Policy, Pos, ReachDest, RuleMode,
    Selector, Service, View,
};
use crate::filter::{PortRange, Proto};
use crate::wire::DeviceId;

/// The answer of [`explain`]: one entry per (source device, destination device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub src: String,
    pub dst: String,
    /// `db1:5432/tcp`, `db:icmp`, `db (any port)`.
    pub target: String,
    /// True if at least one source device may reach at least one destination device.
    pub allowed: bool,
    pub devices: Vec<DeviceExplanation>,
    /// Things that are not per device (`alice has no devices`).
    pub notes: Vec<String>,
    /// The candidate view's verdict, when the policy has shadow rules.
    pub candidate: Option<CandidateVerdict>,
}

/// What the policy's candidate view (see [`super::RuleMode`]) would decide for the same
/// question: evaluated by peers on live traffic, never enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateVerdict {
    /// True if at least one source device could reach at least one destination device.
    pub allowed: bool,
    /// The candidate rules that would allow it (name, line; grants have no line).
    pub allowed_by: Vec<(String, Option<Pos>)>,
    /// Enforced rules that allow it today and are `shadow_remove` (absent from the
    /// candidate).
    pub removed: Vec<(String, Option<Pos>)>,
}

impl fmt::Display for CandidateVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let refs = |v: &[(String, Option<Pos>)]| {
            v.iter()
                .map(|(n, p)| rule_ref(n, *p))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.allowed {
            write!(f, "shadow: would allow (by {})", refs(&self.allowed_by))
        } else if self.removed.is_empty() {
            write!(f, "shadow: would deny (no candidate rule allows it)")
        } else {
            let one = self.removed.len() == 1;
            write!(
                f,
                "shadow: would deny ({} {} removed in the candidate)",
                refs(&self.removed),
                if one { "is" } else { "are" }
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceExplanation {
    pub src_id: DeviceId,
    pub src_hostname: String,
    pub dst_id: DeviceId,
    pub dst_hostname: String,
    pub allowed: bool,
    /// Rules (name, line; grants have no line) that allow it.
    pub allowed_by: Vec<(String, Option<Pos>)>,
    /// Rules that name this source and destination but did not apply, with why.
    pub misses: Vec<Miss>,
    /// Why nothing could apply at all (device not live, same device).
    pub blocked: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Miss {
    pub rule: String,
    pub pos: Option<Pos>,
    pub reasons: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} → {}: {}",
            self.src,
            self.target,
            if self.allowed { "allowed" } else { "denied" }
        )?;
        if let Some(c) = &self.candidate {
            writeln!(f, "  {c}")?;
        }
        for n in &self.notes {
            writeln!(f, "  {n}")?;
        }
        for d in &self.devices {
            write!(f, "  {} → {}: ", d.src_hostname, d.dst_hostname)?;
            if d.allowed {
                let by: Vec<String> = d.allowed_by.iter().map(|(n, p)| rule_ref(n, *p)).collect();
                writeln!(f, "allowed by {}", by.join(", "))?;
            } else {
                writeln!(
                    f,
                    "denied: no rule allows {} to reach {} (default deny)",
                    d.src_hostname,
                    self.target_on(&d.dst_hostname)
                )?;
                for b in &d.blocked {
                    writeln!(f, "    {b}")?;
                }
            }
            for m in &d.misses {
                writeln!(
                    f,
                    "    {} did not apply: {}",
                    rule_ref(&m.rule, m.pos),
                    m.reasons.join("; ")
                )?;
            }
        }
        Ok(())
    }
}

impl Explanation {
    fn target_on(&self, host: &str) -> String {
        match self.target.split_once(':') {
            Some((_, rest)) => format!("{host}:{rest}"),
            None => host.to_string(),
        }
    }
}

fn rule_ref(name: &str, pos: Option<Pos>) -> String {
    match pos {
        Some(p) => format!("rule {name:?} (line {})", p.line),
        None => format!("{name:?}"),
    }
}

/// Explains whether `src` may reach `dst` at `now_ms`, with the same logic as
/// [`compile`](super::compile) (so the answer matches what the filters enforce).
///
/// `src`: a device hostname, a user name (explained per device), or `user:U` / `device:H`.
/// `dst`: `SERVICE` or `HOSTNAME` (or `device:HOSTNAME`), optionally `:PORT[/PROTO]` (protocol
/// tcp by default) or `:icmp`; without a port, any port the services open counts.
pub fn explain(
    p: &Policy,
    d: &Directory,
    src: &str,
    dst: &str,
    now_ms: i64,
) -> Result<Explanation, String> {
    let ix = Index::new(p, d);
    let mut notes = Vec::new();
    // Source devices.
    let (src_kind, src_name) = match src.split_once(':') {
        Some(("user", u)) => ("user", u),
        Some(("device", h)) => ("device", h),
        Some(_) => {
            return Err(format!(
                "bad source {src:?}: use a hostname, a user, user:U or device:H"
            ))
        }
        None if ix.by_host.contains_key(src) => ("device", src),
        None => ("user", src),
    };
    let src_devs: Vec<usize> = if src_kind == "device" {
        ix.by_host
            .get(src_name)
            .cloned()
            .ok_or_else(|| format!("unknown device {src_name:?}"))?
    } else {
        let known = d.users.iter().any(|u| u.name == src_name) || ix.by_user.contains_key(src_name);
        if !known {
            return Err(format!(
                "unknown source {src_name:?}: not a device hostname or a user"
            ));
        }
        let v = ix.by_user.get(src_name).cloned().unwrap_or_default();
        if v.is_empty() {
            notes.push(format!("user {src_name:?} has no devices"));
        }
        v
    };
    // Destination: a service or a device.
    let (name_part, rest) = {
        let s = dst.strip_prefix("device:").unwrap_or(dst);
        let s = s.strip_prefix("service:").unwrap_or(s);
        match s.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        }
    };
    let want = parse_port_proto(rest).map_err(|e| format!("bad destination {dst:?}: {e}"))?;
    let only_service: Option<&Service> = if dst.starts_with("device:") {
        None
    } else if dst.starts_with("service:") {
        Some(
            p.services
                .get(name_part)
                .ok_or_else(|| format!("no service named {name_part:?}"))?,
        )
    } else if p.services.contains_key(name_part) && ix.by_host.contains_key(name_part) {
        // A name that is both: the question is about the host (every service on it).
        notes.push(format!(
            "{name_part:?} is both a device and a service; explained for the device (ask for service:{name_part} to see only that service)"
        ));
        None
    } else {
        p.services.get(name_part)
    };
    let dst_devs: Vec<usize> = match only_service {
        Some(s) => {
            let mut v: Vec<usize> = s
                .devices
                .iter()
                .flat_map(|x| ix.resolve(&x.value))
                .collect();
            v.sort_unstable();
            v.dedup();
            if v.is_empty() {
                notes.push(format!("service {:?} has no devices", s.name));
            }
            v
        }
        None => ix.by_host.get(name_part).cloned().ok_or_else(|| {
            format!("unknown destination {name_part:?}: not a service or a device hostname")
        })?,
    };
    let target = match want {
        Some((Proto::Icmp, _)) => format!("{name_part}:icmp"),
        Some((pr, port)) => format!("{name_part}:{port}/{}", proto_name(pr)),
        None => format!("{name_part} (any port)"),
    };
    let all = effective_rules(p, d);
    let view_rules =
        |view: View| -> Vec<&EffRule<'_>> { all.iter().filter(|r| r.mode.in_view(view)).collect() };
    let rules = view_rules(View::Enforced);
    let mut devices = Vec::new();
    for &si in &src_devs {
        for &di in &dst_devs {
            let (s, t) = (&d.devices[si], &d.devices[di]);
            devices.push(explain_pair(
                p,
                &ix,
                &rules,
                s,
                t,
                only_service,
                want,
                now_ms,
            ));
        }
    }
    let allowed = devices.iter().any(|x| x.allowed);
    let candidate = p.has_shadow().then(|| {
        let rules = view_rules(View::Candidate);
        let mut allowed_by: Vec<(String, Option<Pos>)> = Vec::new();
        for &si in &src_devs {
            for &di in &dst_devs {
                let (s, t) = (&d.devices[si], &d.devices[di]);
                let e = explain_pair(p, &ix, &rules, s, t, only_service, want, now_ms);
                allowed_by.extend(e.allowed_by);
            }
        }
        allowed_by.sort();
        allowed_by.dedup();
        let mut removed: Vec<(String, Option<Pos>)> = devices
            .iter()
            .flat_map(|x| x.allowed_by.iter().cloned())
            .filter(|(name, pos)| {
                all.iter()
                    .any(|r| r.mode == RuleMode::ShadowRemove && r.name == *name && r.pos == *pos)
            })
            .collect();
        removed.sort();
        removed.dedup();
        CandidateVerdict {
            allowed: !allowed_by.is_empty(),
            allowed_by,
            removed,
        }
    });
    Ok(Explanation {
        src: src.to_string(),
        dst: dst.to_string(),
        target,
        allowed,
        devices,
        notes,
        candidate,
    })
}

#[allow(clippy::too_many_arguments)]
fn explain_pair(
    p: &Policy,
    ix: &Index<'_>,
    rules: &[&EffRule<'_>],
    s: &DirDevice,
    t: &DirDevice,
    only_service: Option<&Service>,
    want: Option<(Proto, u16)>,
    now_ms: i64,
) -> DeviceExplanation {
    let mut blocked = Vec::new();
    if s.id == t.id {
        blocked.push(
            "source and destination are the same device (local traffic, not via the overlay)"
                .to_string(),
        );
    }
    if !s.live {
        blocked.push(format!(
            "source device {} is not live (inactive, revoked or its user disabled)",
            s.hostname
        ));
    }
    if !t.live {
        blocked.push(format!(
            "destination device {} is not live (inactive, revoked or its user disabled)",
            t.hostname
        ));
    }
    let mut allowed_by = Vec::new();
    let mut misses = Vec::new();
    for r in rules {
        if !r.from.iter().any(|sel| ix.matches_device(sel, s)) {
            if let Some(why) = r.from.iter().find_map(|sel| ix.suspended_match(sel, s)) {
                misses.push(Miss {
                    rule: r.name.clone(),
                    pos: r.pos,
                    reasons: vec![why],
                });
            } else if r.from.iter().any(|sel| names_unbound(sel, s)) {
                misses.push(Miss {
                    rule: r.name.clone(),
                    pos: r.pos,
                    reasons: vec![self_chosen(s)],
                });
            }
            continue;
        }
        let mut reasons: Vec<String> = Vec::new();
        let mut any_service = false;
        let mut ok_somewhere = false;
        for svc_name in &r.to {
            let Some(svc) = p.services.get(*svc_name) else {
                continue;
            };
            if only_service.is_some_and(|o| o.name != svc.name) {
                continue;
            }
            let on_dst = svc
                .devices
                .iter()
                .any(|sel| ix.matches_device(&sel.value, t));
            if !on_dst {
                if svc.devices.iter().any(|sel| names_unbound(&sel.value, t)) {
                    any_service = true;
                    reasons.push(format!(
                        "service {} is not on {}: {}",
                        svc.name,
                        t.hostname,
                        self_chosen(t)
                    ));
                }
                continue;
            }
            any_service = true;
            let mut why = Vec::new();
            let port_ok = match want {
                Some((pr, port)) => svc.ports.allows(pr, port),
                None => true,
            };
            if !port_ok {
                let shown = match want {
                    Some((Proto::Icmp, _)) => "icmp".to_string(),
                    Some((pr, port)) => format!("{port}/{}", proto_name(pr)),
                    None => String::new(),
                };
                let open: Vec<String> = svc
                    .ports
                    .by_proto()
                    .iter()
                    .map(|(pr, ports)| format_ports(*pr, ports))
                    .collect();
                why.push(format!(
                    "{shown} is not in service {} ({})",
                    svc.name,
                    open.join(", ")
                ));
            }
            if s.quarantined && !svc.remediation {
                why.push(format!(
                    "source device {} is quarantined (service {} is not a remediation service)",
                    s.hostname, svc.name
                ));
            }
            if why.is_empty() {
                ok_somewhere = true;
            } else {
                reasons.extend(why);
            }
        }
        if !any_service {
            continue;
        }
        if let Some(x) = r.expires_ms {
            if x <= now_ms {
                reasons.insert(0, format!("expired at {}", format_ms(x)));
                ok_somewhere = false;
            }
        }
        for q in &r.posture {
            if !s.posture_passed.contains(*q) {
                reasons.push(posture_miss(q, s));
                ok_somewhere = false;
            }
        }
        if ok_somewhere && blocked.is_empty() {
            allowed_by.push((r.name.clone(), r.pos));
        } else {
            if reasons.is_empty() {
                reasons.extend(blocked.iter().cloned());
            }
            reasons.dedup();
            misses.push(Miss {
                rule: r.name.clone(),
                pos: r.pos,
                reasons,
            });
        }
    }
    DeviceExplanation {
        src_id: s.id,
        src_hostname: s.hostname.clone(),
        dst_id: t.id,
        dst_hostname: t.hostname.clone(),
        allowed: !allowed_by.is_empty(),
        allowed_by,
        misses,
        blocked,
    }
}

/// Whether `sel` is `device:NAME` for this device's name while the name is self-chosen: the
/// selector would name it if an administrator bound the name.
fn names_unbound(sel: &Selector, dev: &DirDevice) -> bool {
    matches!(sel, Selector::Device(h) if !dev.name_bound && *h == dev.hostname)
}

/// Why a `device:NAME` selector does not name a device that calls itself NAME.
fn self_chosen(dev: &DirDevice) -> String {
    format!(
        "name `{}` is self-chosen; bind it with `device approve` or a token's --hostname",
        dev.hostname
    )
}

/// `posture "baseline" not met by alice-phone (disk_encryption: …; process osqueryd: not
/// running)`: the failed checks are what the admin (or the device's user) has to fix, so they
/// belong in the answer, not in a second lookup. Without recorded failures (no evaluation yet)
/// the reason is the bare fact.
fn posture_miss(requirement: &str, s: &DirDevice) -> String {
    let base = format!("posture {requirement:?} not met by {}", s.hostname);
    match s.posture_failures.get(requirement) {
        Some(f) if !f.is_empty() => format!("{base} ({})", f.join("; ")),
        _ => base,
    }
}

/// Whether access was gained or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ChangeKind {
    Gained,
    Lost,
}

/// One source device gaining or losing one (destination, service, protocol/ports).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AccessChange {
    pub kind: ChangeKind,
    pub src: DeviceId,
    pub src_hostname: String,
    pub dst: DeviceId,
    pub dst_hostname: String,
    pub service: String,
    pub proto: Proto,
    pub ports: Vec<PortRange>,
}

impl fmt::Display for AccessChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (sign, verb) = match self.kind {
            ChangeKind::Gained => ('+', "can now reach"),
            ChangeKind::Lost => ('-', "can no longer reach"),
        };
        write!(
            f,
            "{sign} {} {verb} {} {} {}",
            self.src_hostname,
            self.dst_hostname,
            self.service,
            format_ports(self.proto, &self.ports)
        )
    }
}

/// What access changes from `old` to `new`, per source device, ignoring which rule grants it
/// and its expiry. Sorted: losses and gains by source.
pub fn diff(old: &Compiled, new: &Compiled, d: &Directory) -> Vec<AccessChange> {
    diff_bounded(old, new, d, usize::MAX).0
}

/// How many entries the merge in [`diff_bounded`] finds between one destination list on each
/// side (or none on one side), without `me`; `None` for several lists on a side (those are
/// merged the long way).
///
/// The count over whole lists is the same for every device with the same pair of lists
/// (thousands of entries each at 10 000 dense devices), so it is made once per pair
/// (`memo`, by the lists' addresses) and `me`'s own entries are then taken out of it.
fn count_changes(
    old: Option<&Vec<&Arc<[ReachDest]>>>,
    new: Option<&Vec<&Arc<[ReachDest]>>>,
    me: DeviceId,
    memo: &mut rustc_hash::FxHashMap<(usize, usize), usize>,
) -> Option<usize> {
    fn one<'a>(l: Option<&Vec<&'a Arc<[ReachDest]>>>) -> Option<&'a [ReachDest]> {
        match l.map(|v| v.as_slice()) {
            None | Some([]) => Some(&[]),
            Some([x]) => Some(&x[..]),
            Some(_) => None,
        }
    }
    let (a, b) = (one(old)?, one(new)?);
    let key = (a.as_ptr() as usize, b.as_ptr() as usize);
    let all = *memo.entry(key).or_insert_with(|| {
        let (mut i, mut j, mut n) = (0, 0, 0);
        // Each list is sorted by device id, one entry a device (built from a map by id).
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.device_id == y.device_id => {
                    if x.hostname != y.hostname {
                        n += 2;
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), Some(y)) if x.device_id < y.device_id => {
                    n += 1;
                    i += 1;
                }
                (Some(_), None) => {
                    n += 1;
                    i += 1;
                }
                (_, Some(_)) => {
                    n += 1;
                    j += 1;
                }
                (None, None) => break,
            }
        }
        n
    });
    fn find(l: &[ReachDest], me: DeviceId) -> Option<&ReachDest> {
        l.binary_search_by_key(&me, |d| d.device_id)
            .ok()
            .map(|i| &l[i])
    }
    let mine = match (find(a, me), find(b, me)) {
        (Some(x), Some(y)) if x.hostname != y.hostname => 2,
        (Some(_), Some(_)) | (None, None) => 0,
        _ => 1,
    };
    Some(all - mine)
}

/// The first `max` changes of [`diff`] (in its order) and how many there are in all. A change
/// to a rule every device falls under is one change per device pair and service (millions at
/// 10 000 devices): counting them does not build them. Keys borrow from the compiles; only the
/// listed changes are allocated.
pub fn diff_bounded(
    old: &Compiled,
    new: &Compiled,
    d: &Directory,
    max: usize,
) -> (Vec<AccessChange>, usize) {
    type Key<'a> = (DeviceId, &'a str, &'a str, Proto, &'a [PortRange]);
    /// A device's grants by what they open (service, protocol, ports), each with its
    /// destination lists (one per service in a compile; deduplicated by pointer).
    type Opens<'a> = BTreeMap<(&'a str, Proto, &'a [PortRange]), Vec<&'a Arc<[ReachDest]>>>;
    fn opens(a: Option<&super::DeviceAccess>) -> Opens<'_> {
        let mut m: Opens<'_> = BTreeMap::new();
        for g in a.map(|a| a.reach.as_slice()).unwrap_or_default() {
            let v = m
                .entry((g.service.as_str(), g.proto, &g.ports[..]))
                .or_default();
            if !v.iter().any(|l| Arc::ptr_eq(l, &g.devices)) {
                v.push(&g.devices);
            }
        }
        m
    }
    /// The destinations of some lists, without `me`, sorted and deduplicated.
    fn dests<'a>(
        lists: Option<&Vec<&'a Arc<[ReachDest]>>>,
        me: DeviceId,
    ) -> Vec<(DeviceId, &'a str)> {
        let mut v: Vec<(DeviceId, &'a str)> = lists
            .into_iter()
            .flatten()
            .flat_map(|l| l.iter())
            .filter(|d| d.device_id != me)
            .map(|d| (d.device_id, d.hostname.as_str()))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
    let hosts: BTreeMap<DeviceId, &str> = d
        .devices
        .iter()
        .map(|x| (x.id, x.hostname.as_str()))
        .collect();
    let ids: BTreeSet<DeviceId> = old
        .devices
        .keys()
        .chain(new.devices.keys())
        .copied()
        .collect();
    // Gains come before losses in the order; within each kind, by source then key. Only
    // what a device's grants open differently is expanded: an (service, protocol, ports)
    // over equal destination lists on both sides changes nothing, whatever its rule.
    let (mut gained, mut lost) = (Vec::new(), Vec::new());
    let mut total = 0usize;
    // Two compiles made apart (a policy check's against the applied one) share no lists:
    // each pair of destination lists is compared once, not once per device that has it (at
    // 10 000 dense devices, thousands of entries a list, 50 grants a device).
    let mut lists: rustc_hash::FxHashMap<(usize, usize), bool> = Default::default();
    let mut counts: rustc_hash::FxHashMap<(usize, usize), usize> = Default::default();
    let mut same_list = |x: &Arc<[ReachDest]>, y: &Arc<[ReachDest]>| -> bool {
        let key = (
            Arc::as_ptr(x).cast::<u8>() as usize,
            Arc::as_ptr(y).cast::<u8>() as usize,
        );
        Arc::ptr_eq(x, y) || *lists.entry(key).or_insert_with(|| **x == **y)
    };
    for id in ids {
        let (oa, na) = (old.devices.get(&id), new.devices.get(&id));
        let same = match (oa, na) {
            (Some(a), Some(b)) => {
                a.reach.len() == b.reach.len()
                    && a.reach.iter().zip(&b.reach).all(|(g, h)| {
                        Arc::ptr_eq(g, h)
                            || (g.service == h.service
                                && g.proto == h.proto
                                && g.ports == h.ports
                                && g.rule == h.rule
                                && g.not_after_ms == h.not_after_ms
                                && same_list(&g.devices, &h.devices))
                    })
            }
            (None, None) => true,
            _ => false,
        };
        if same {
            continue;
        }
        let (mo, mn) = (opens(oa), opens(na));
        let (mut plus, mut minus): (Vec<Key<'_>>, Vec<Key<'_>>) = (Vec::new(), Vec::new());
        let keys: BTreeSet<&(&str, Proto, &[PortRange])> = mo.keys().chain(mn.keys()).collect();
        // Both lists full: what is left is only counted, without building or sorting.
        let counting = gained.len() >= max && lost.len() >= max;
        for key in keys {
            let (lo, ln) = (mo.get(key), mn.get(key));
            let equal = match (lo, ln) {
                (Some(a), Some(b)) => {
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same_list(x, y))
                }
                _ => false,
            };
            if equal {
                continue;
            }
            if counting {
                if let Some(n) = count_changes(lo, ln, id, &mut counts) {
                    total += n;
                    continue;
                }
            }
            let (a, b) = (dests(lo, id), dests(ln, id));
            let (service, proto, ports) = *key;
            let (mut i, mut j) = (0, 0);
            while i < a.len() || j < b.len() {
                let (x, y) = (a.get(i), b.get(j));
                match (x, y) {
                    (Some(x), Some(y)) if x == y => {
                        i += 1;
                        j += 1;
                    }
                    (Some(x), Some(y)) if x < y => {
                        minus.push((x.0, x.1, service, proto, ports));
                        i += 1;
                    }
                    (Some(x), None) => {
                        minus.push((x.0, x.1, service, proto, ports));
                        i += 1;
                    }
                    (_, Some(y)) => {
                        plus.push((y.0, y.1, service, proto, ports));
                        j += 1;
                    }
                    (None, None) => break,
                }
            }
        }
        plus.sort_unstable();
        minus.sort_unstable();
        for (kind, set, out) in [
            (ChangeKind::Gained, &plus, &mut gained),
            (ChangeKind::Lost, &minus, &mut lost),
        ] {
            for (dst, dst_hostname, service, proto, ports) in set {
                total += 1;
                if out.len() >= max {
                    continue;
                }
                out.push(AccessChange {
                    kind,
                    src: id,
                    src_hostname: hosts
                        .get(&id)
                        .map_or_else(|| id.to_string(), |h| h.to_string()),
                    dst: *dst,
                    dst_hostname: dst_hostname.to_string(),
                    service: service.to_string(),
                    proto: *proto,
                    ports: ports.to_vec(),
                });
            }
        }
    }
    let mut out = gained;
    out.extend(lost);
    out.sort();
    out.truncate(max);
    (out, total)
}
