//! Policy + directory → per-device access, and the policy's own tests.
//!
//! Cost: resolving selectors is O(devices) per rule; emitting peers is O(sources ×
//! destinations) per rule and service, which is the size of that output itself. Inbound rules
//! share one source list per rule and service ([`Sources`]): O(sources + destinations).
//! Reach is by reference: one destination list per service and one grant per (rule, service,
//! protocol), shared by every source device (a pointer each), so it costs O(rules × services
//! × members), not O(sources × destinations). Nothing recurses or backtracks.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::peers::Peers;

use super::{
    proto_name, Compiled, DeviceAccess, DirDevice, Directory, Policy, Pos, ReachDest, ReachGrant,
    RuleMode, Selector, TestSource, View,
};
use crate::filter::{FilterRule, Proto, Sources};
use crate::names::Hostname;
use crate::wire::DeviceId;

/// The outcome of one expectation of a `[[tests]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestOutcome {
    /// Where the expectation is written.
    pub pos: Pos,
    /// The test's source, as written (`alice`, `device:laptop`).
    pub from: String,
    /// `db:5432/tcp`.
    pub target: String,
    /// Whether the test expects the access to be allowed.
    pub expect_allow: bool,
    /// Whether the policy allows it.
    pub allowed: bool,
    pub pass: bool,
    /// Which rule allowed it, or why nothing did.
    pub why: String,
}

/// Compiles `p` against `d` at coordinator time `now_ms`. Only live devices appear; every live
/// device has an entry (possibly empty). See the module documentation for the rules.
///
/// The enforced view gives `peers`, `inbound` and `reach`; when the policy has shadow rules,
/// the candidate view is compiled the same way and only its inbound rules are kept
/// ([`DeviceAccess::shadow_inbound`]): a candidate rule never adds a peer or a reach entry.
pub fn compile(p: &Policy, d: &Directory, now_ms: i64) -> Compiled {
    let mut out = compile_view(p, d, now_ms, View::Enforced);
    if p.has_shadow() {
        let candidate = compile_view(p, d, now_ms, View::Candidate);
        for (id, acc) in &mut out.devices {
            let inbound = candidate
                .devices
                .get(id)
                .map(|c| c.inbound.to_vec())
                .unwrap_or_default();
            acc.shadow_inbound = Some(inbound);
        }
        out.next_expiry_ms = match (out.next_expiry_ms, candidate.next_expiry_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    out
}

/// What device `id` may open elsewhere under `p` and `d` at `now_ms`, as [`compile`]'s
/// enforced view gives it (`compile(p, d, now_ms).devices[&id].reach_flat(id)`), without
/// compiling the other devices: O(rules × devices) to resolve the selectors, then the
/// device's own grants. Empty for a device that is not live or not in `d`.
pub fn reach_of(p: &Policy, d: &Directory, id: DeviceId, now_ms: i64) -> Vec<super::Reach> {
    super::expand_reach(&reach_grants_of(p, d, id, now_ms), id)
}

/// [`reach_of`] before it is expanded: the grants whose destinations, less `id` itself, are
/// its entries (unsorted), each destination list made once per rule and service.
pub fn reach_grants_of(
    p: &Policy,
    d: &Directory,
    id: DeviceId,
    now_ms: i64,
) -> Vec<Arc<ReachGrant>> {
    let Some(me) = d.devices.iter().position(|x| x.id == id) else {
        return Vec::new();
    };
    let dev = &d.devices[me];
    if !dev.live {
        return Vec::new();
    }
    let ix = Index::new(p, d);
    let mut grants: Vec<Arc<ReachGrant>> = Vec::new();
    for rule in effective_rules(p, d)
        .into_iter()
        .filter(|r| r.mode.in_view(View::Enforced))
    {
        if rule.expires_ms.is_some_and(|t| t <= now_ms) {
            continue;
        }
        if !rule.posture.iter().all(|q| dev.posture_passed.contains(*q))
            || !rule.from.iter().any(|sel| ix.resolve(sel).contains(&me))
        {
            continue;
        }
        for svc_name in &rule.to {
            let Some(svc) = p.services.get(*svc_name) else {
                continue;
            };
            if dev.quarantined && !svc.remediation {
                continue;
            }
            let dests: Arc<[ReachDest]> = svc
                .devices
                .iter()
                .flat_map(|sel| ix.resolve(&sel.value))
                .filter(|i| d.devices[*i].live)
                .filter_map(|i| {
                    let x = &d.devices[i];
                    let hostname = Hostname::parse(&x.hostname)
                        .or_else(|_| Hostname::sanitize(&x.hostname))
                        .ok()?;
                    Some((
                        x.id,
                        ReachDest {
                            device_id: x.id,
                            hostname,
                        },
                    ))
                })
                .collect::<BTreeMap<DeviceId, ReachDest>>()
                .into_values()
                .collect();
            if !dests.iter().any(|x| x.device_id != id) {
                continue;
            }
            for (proto, ports) in svc.ports.by_proto() {
                grants.push(Arc::new(ReachGrant {
                    service: svc.name.clone(),
                    proto,
                    ports,
                    rule: rule.name.clone(),
                    not_after_ms: rule.expires_ms,
                    devices: Arc::clone(&dests),
                }));
            }
        }
    }
    grants
}

/// Makes `new` share the lists it has in common with `old` (source lists and reach grants
/// equal in content take `old`'s allocations) and returns the devices whose access differs
/// between the two: in one and not the other, or with different peers, filters, reach or
/// routes. `new` is unchanged in value.
///
/// A compile after a change to a few devices (a quarantine, a failed posture check, a
/// departure) gives most devices the same access; with the shared lists back under one
/// allocation, comparing a device's access costs a walk of its peers and a pointer per rule,
/// and the caller brings up to date only the devices named here. Cost: one ordered lookup per
/// distinct list of each compile, then O(peers + rules) per device.
pub fn carry_over(new: &mut Compiled, old: &Compiled) -> BTreeSet<DeviceId> {
    // Each distinct list of `old` enters the ordered maps once: lists are shared by many
    // devices, and an ordered insert compares contents (thousands of destinations or sources
    // at 10 000 dense devices), so it is skipped for an allocation already seen.
    let mut old_sources: BTreeMap<&[IpAddr], &Sources> = BTreeMap::new();
    let mut old_grants: BTreeMap<&ReachGrant, &Arc<ReachGrant>> = BTreeMap::new();
    let mut old_seen: rustc_hash::FxHashSet<usize> = rustc_hash::FxHashSet::default();
    let mut old_lists: BTreeMap<&Vec<FilterRule>, &Arc<Vec<FilterRule>>> = BTreeMap::new();
    for acc in old.devices.values() {
        let first = old_seen.insert(Arc::as_ptr(&acc.inbound) as usize);
        if first {
            old_lists.entry(&*acc.inbound).or_insert(&acc.inbound);
        }
        let inbound = acc.inbound.iter().filter(|_| first);
        for r in inbound.chain(acc.shadow_inbound.iter().flatten()) {
            if old_seen.insert(r.sources.id()) {
                old_sources.entry(&r.sources[..]).or_insert(&r.sources);
            }
        }
        for g in &acc.reach {
            if old_seen.insert(Arc::as_ptr(g) as usize) {
                old_grants.entry(&**g).or_insert(g);
            }
        }
    }
    // Each distinct list of `new` is looked up once (by its allocation's address).
    let mut sources_seen: BTreeMap<usize, Sources> = BTreeMap::new();
    let mut grants_seen: BTreeMap<*const ReachGrant, Arc<ReachGrant>> = BTreeMap::new();
    // Rule lists are shared: each distinct one is rewritten once (the old list kept in the
    // entry, so its address is not reused while the entry lives).
    type Rewritten = (Arc<Vec<FilterRule>>, Arc<Vec<FilterRule>>);
    let mut lists_seen: rustc_hash::FxHashMap<usize, Rewritten> = rustc_hash::FxHashMap::default();
    for acc in new.devices.values_mut() {
        let key = Arc::as_ptr(&acc.inbound) as usize;
        if let Some((_, done)) = lists_seen.get(&key) {
            acc.inbound = Arc::clone(done);
        } else {
            let mut rules: Vec<FilterRule> = acc.inbound.to_vec();
            for r in &mut rules {
                let kept = sources_seen.entry(r.sources.id()).or_insert_with(|| {
                    old_sources
                        .get(&r.sources[..])
                        .map_or_else(|| r.sources.clone(), |o| (*o).clone())
                });
                r.sources = kept.clone();
            }
            // The old compile's list when equal (its sources are shared now, so equal lists
            // compare by pointer), so that equal access compares by pointer too.
            let done = old_lists
                .get(&rules)
                .map_or_else(|| Arc::new(rules), |o| Arc::clone(o));
            lists_seen.insert(key, (Arc::clone(&acc.inbound), Arc::clone(&done)));
            acc.inbound = done;
        }
        for r in acc.shadow_inbound.iter_mut().flatten() {
            let kept = sources_seen.entry(r.sources.id()).or_insert_with(|| {
                old_sources
                    .get(&r.sources[..])
                    .map_or_else(|| r.sources.clone(), |o| (*o).clone())
            });
            r.sources = kept.clone();
        }
        for g in &mut acc.reach {
            let kept = grants_seen.entry(Arc::as_ptr(g)).or_insert_with(|| {
                old_grants
                    .get(&**g)
                    .map_or_else(|| Arc::clone(g), |o| Arc::clone(o))
            });
            *g = Arc::clone(kept);
        }
    }
    // One index for both compiles when they index the same devices, so that peers compare
    // word by word rather than id by id (thousands of ids for each of 10 000 dense devices).
    let indexes = (
        old.devices
            .values()
            .next()
            .map(|a| Arc::clone(a.peers.index())),
        new.devices
            .values()
            .next()
            .map(|a| Arc::clone(a.peers.index())),
    );
    if let (Some(o), Some(n)) = indexes {
        if !Arc::ptr_eq(&o, &n) && o[..] == n[..] {
            for acc in new.devices.values_mut() {
                if Arc::ptr_eq(acc.peers.index(), &n) {
                    acc.peers.share_index(&o);
                }
            }
        }
    }
    let mut changed: BTreeSet<DeviceId> = old
        .devices
        .keys()
        .filter(|id| !new.devices.contains_key(id))
        .copied()
        .collect();
    changed.extend(
        new.devices
            .iter()
            .filter(|(id, acc)| old.devices.get(id) != Some(acc))
            .map(|(id, _)| *id),
    );
    changed
}

/// Whether [`compile`] of `p` against `d` gives the same result at `a_ms` as at `b_ms`: time
/// enters a compile only through rule and grant expiries (which rules count, and
/// `next_expiry_ms`), so it does when no expiry lies in `(min, max]`. A compile made for one
/// moment can then stand for the other (a policy apply's check hands its compile to the
/// registry).
pub fn same_at(p: &Policy, d: &Directory, a_ms: i64, b_ms: i64) -> bool {
    let (lo, hi) = (a_ms.min(b_ms), a_ms.max(b_ms));
    let between = |t: i64| lo < t && t <= hi;
    !p.rules
        .iter()
        .filter_map(|r| r.expires_ms)
        .chain(d.grants.iter().map(|g| g.not_after_ms))
        .any(between)
}

/// Compiles one view of the policy (peers, inbound rules and reach list as if only that
/// view's rules existed).
fn compile_view(p: &Policy, d: &Directory, now_ms: i64, view: View) -> Compiled {
    let ix = Index::new(p, d);
    let mut devices: BTreeMap<DeviceId, DeviceAccess> = d
        .devices
        .iter()
        .filter(|x| x.live)
        .map(|x| (x.id, DeviceAccess::default()))
        .collect();
    let hostnames: Vec<Option<Hostname>> = d
        .devices
        .iter()
        .map(|x| {
            Hostname::parse(&x.hostname)
                .or_else(|_| Hostname::sanitize(&x.hostname))
                .ok()
        })
        .collect();
    // Live destination devices of each service.
    let svc_devices: BTreeMap<&str, Vec<usize>> = p
        .services
        .iter()
        .map(|(name, s)| {
            let mut v: Vec<usize> = s
                .devices
                .iter()
                .flat_map(|sel| ix.resolve(&sel.value))
                .filter(|i| d.devices[*i].live)
                .collect();
            v.sort_unstable();
            v.dedup();
            (name.as_str(), v)
        })
        .collect();
    // Each service's reach destinations (those with a usable name), built once and shared.
    let svc_reach: BTreeMap<&str, Arc<[ReachDest]>> = svc_devices
        .iter()
        .map(|(name, v)| {
            let dests: Arc<[ReachDest]> = v
                .iter()
                .filter_map(|i| {
                    let id = d.devices[*i].id;
                    Some((
                        id,
                        ReachDest {
                            device_id: id,
                            hostname: hostnames[*i].clone()?,
                        },
                    ))
                })
                .collect::<BTreeMap<DeviceId, ReachDest>>()
                .into_values()
                .collect();
            (*name, dests)
        })
        .collect();
    // Peers by population: each device's list of the populations (device-index bit sets) it
    // may talk to, joined once at the end. Adding every (source, destination) pair to both
    // sides' peer sets would cost O(sources × destinations) set inserts per rule and service.
    let words = d.devices.len().div_ceil(64);
    let bits = |v: &[usize]| -> Vec<u64> {
        let mut b = vec![0u64; words];
        for &i in v {
            b[i / 64] |= 1 << (i % 64);
        }
        b
    };
    let mut pops: Vec<Vec<u64>> = Vec::new();
    let svc_pop: BTreeMap<&str, usize> = svc_devices
        .iter()
        .map(|(name, v)| {
            pops.push(bits(v));
            (*name, pops.len() - 1)
        })
        .collect();
    let mut links: Vec<Vec<usize>> = vec![Vec::new(); d.devices.len()];
    let mut source_lists: BTreeMap<Vec<usize>, Sources> = BTreeMap::new();
    // Inbound rules and grants are made once per rule, service and protocol (equal ones
    // once), and each device holds their numbers: at 10 000 dense devices, making every
    // destination its own copies of a hundred rules (and growing, sorting and comparing them
    // device by device) was a third of the compile. Each distinct list is built once below.
    let mut entries: Vec<FilterRule> = Vec::new();
    let mut entry_no: BTreeMap<FilterRule, u32> = BTreeMap::new();
    let mut inbound_of: Vec<Vec<u32>> = vec![Vec::new(); d.devices.len()];
    let mut grants: Vec<Arc<ReachGrant>> = Vec::new();
    let mut grant_no: BTreeMap<Arc<ReachGrant>, u32> = BTreeMap::new();
    let mut reach_of: Vec<Vec<u32>> = vec![Vec::new(); d.devices.len()];
    let mut next_expiry_ms: Option<i64> = None;
    for rule in effective_rules(p, d)
        .into_iter()
        .filter(|r| r.mode.in_view(view))
    {
        if let Some(t) = rule.expires_ms {
            if t <= now_ms {
                continue;
            }
            next_expiry_ms = Some(next_expiry_ms.map_or(t, |n| n.min(t)));
        }
        let mut sources: Vec<usize> = rule
            .from
            .iter()
            .flat_map(|sel| ix.resolve(sel))
            .filter(|i| {
                let dev = &d.devices[*i];
                dev.live && rule.posture.iter().all(|q| dev.posture_passed.contains(*q))
            })
            .collect();
        sources.sort_unstable();
        sources.dedup();
        if sources.is_empty() {
            continue;
        }
        for svc_name in &rule.to {
            let Some(svc) = p.services.get(*svc_name) else {
                continue;
            };
            let srcs: Vec<usize> = sources
                .iter()
                .copied()
                .filter(|i| svc.remediation || !d.devices[*i].quarantined)
                .collect();
            if srcs.is_empty() {
                continue;
            }
            // One source list per rule and service, shared by every destination. A
            // destination that is also a source finds its own addresses in it: harmless, as
            // the data plane takes an overlay source address only from the peer that owns it,
            // so no packet from this device's own address ever reaches its filter.
            // Equal source lists (one rule to several services, several rules from one
            // group) share one allocation.
            let sources = source_lists
                .entry(srcs.clone())
                .or_insert_with(|| {
                    let mut addrs: Vec<IpAddr> = srcs
                        .iter()
                        .flat_map(|i| {
                            let dev = &d.devices[*i];
                            [IpAddr::V4(dev.ipv4), IpAddr::V6(dev.ipv6)]
                        })
                        .collect();
                    addrs.sort_unstable();
                    addrs.dedup();
                    Sources::from(addrs)
                })
                .clone();
            let by_proto = svc.ports.by_proto();
            let dsts = svc_devices.get(*svc_name).map_or(&[][..], Vec::as_slice);
            if let Some(dests) = svc_reach.get(*svc_name).filter(|x| !x.is_empty()) {
                let made: Vec<u32> = by_proto
                    .iter()
                    .map(|(proto, ports)| {
                        let g = Arc::new(ReachGrant {
                            service: svc.name.clone(),
                            proto: *proto,
                            ports: ports.clone(),
                            rule: rule.name.clone(),
                            not_after_ms: rule.expires_ms,
                            devices: Arc::clone(dests),
                        });
                        *grant_no.entry(g).or_insert_with_key(|g| {
                            grants.push(Arc::clone(g));
                            (grants.len() - 1) as u32
                        })
                    })
                    .collect();
                for &src in &srcs {
                    let src_id = d.devices[src].id;
                    // A device never reaches itself: a source whose only destination is
                    // itself gets nothing from this rule and service.
                    if !dests.iter().any(|x| x.device_id != src_id) {
                        continue;
                    }
                    reach_of[src].extend_from_slice(&made);
                }
            }
            if !dsts.is_empty() {
                // Sources peer with every destination, destinations with every source (a
                // device is never its own peer: see the join below).
                if let Some(&dp) = svc_pop.get(*svc_name) {
                    for &src in &srcs {
                        links[src].push(dp);
                    }
                }
                pops.push(bits(&srcs));
                let sp = pops.len() - 1;
                for &dst in dsts {
                    links[dst].push(sp);
                }
            }
            if dsts.is_empty() {
                continue;
            }
            let made: Vec<u32> = by_proto
                .iter()
                .map(|(proto, ports)| {
                    let r = FilterRule {
                        rule: rule.name.clone(),
                        service: svc.name.clone(),
                        sources: sources.clone(),
                        source_sets: Vec::new(),
                        proto: *proto,
                        ports: ports.clone(),
                        not_after_ms: rule.expires_ms,
                        dests: Vec::new(),
                    };
                    *entry_no.entry(r).or_insert_with_key(|r| {
                        entries.push(r.clone());
                        (entries.len() - 1) as u32
                    })
                })
                .collect();
            for &dst in dsts {
                // Nothing to open when the destination is its only source.
                if srcs.iter().all(|&src| src == dst) {
                    continue;
                }
                inbound_of[dst].extend_from_slice(&made);
            }
        }
    }
    // Each device's peers: the union of its populations (itself left out by `Peers`), one
    // shared bit set per distinct list of populations, over the device ids in ascending order.
    let sorted = d.devices.windows(2).all(|w| w[0].id < w[1].id);
    let order: Vec<usize> = if sorted {
        (0..d.devices.len()).collect()
    } else {
        let mut o: Vec<usize> = (0..d.devices.len()).collect();
        o.sort_by_key(|&i| d.devices[i].id);
        o
    };
    // Position in the index of each directory entry.
    let mut pos = vec![0usize; d.devices.len()];
    for (k, &i) in order.iter().enumerate() {
        pos[i] = k;
    }
    let index: Arc<[DeviceId]> = order.iter().map(|&i| d.devices[i].id).collect();
    let mut joined: BTreeMap<Vec<usize>, Arc<Vec<u64>>> = BTreeMap::new();
    for (i, l) in links.iter_mut().enumerate() {
        if l.is_empty() {
            continue;
        }
        let Some(acc) = devices.get_mut(&d.devices[i].id) else {
            continue;
        };
        l.sort_unstable();
        l.dedup();
        let bits = joined.entry(std::mem::take(l)).or_insert_with_key(|l| {
            let mut join = vec![0u64; words];
            for &pop in l {
                for (w, x) in join.iter_mut().zip(&pops[pop]) {
                    *w |= x;
                }
            }
            if !sorted {
                let mut by_id = vec![0u64; words];
                for (k, w) in join.iter().enumerate() {
                    let mut w = *w;
                    while w != 0 {
                        let b = w.trailing_zeros() as usize;
                        w &= w - 1;
                        let p = pos[k * 64 + b];
                        by_id[p / 64] |= 1 << (p % 64);
                    }
                }
                join = by_id;
            }
            Arc::new(join)
        });
        acc.peers = Peers::new(d.devices[i].id, Arc::clone(&index), Arc::clone(bits));
    }
    // Each device's rules and grants, sorted and deduplicated: the numbers are made distinct
    // by content above, so sorting them by their entries' rank orders the entries, and equal
    // numbers are equal entries. Equal rule lists are one allocation.
    let rank = |n: usize, cmp: &dyn Fn(usize, usize) -> std::cmp::Ordering| -> Vec<u32> {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by(|a, b| cmp(*a, *b));
        let mut rank = vec![0u32; n];
        for (r, i) in order.into_iter().enumerate() {
            rank[i] = r as u32;
        }
        rank
    };
    let entry_rank = rank(entries.len(), &|a, b| entries[a].cmp(&entries[b]));
    let grant_rank = rank(grants.len(), &|a, b| grants[a].cmp(&grants[b]));
    let mut by_rank: Vec<u32> = vec![0; entries.len()];
    for (i, r) in entry_rank.iter().enumerate() {
        by_rank[*r as usize] = i as u32;
    }
    let mut grant_by_rank: Vec<u32> = vec![0; grants.len()];
    for (i, r) in grant_rank.iter().enumerate() {
        grant_by_rank[*r as usize] = i as u32;
    }
    // A device listed twice in the directory gets both entries' rules, as one device.
    let mut held: BTreeMap<DeviceId, (Vec<u32>, Vec<u32>)> = BTreeMap::new();
    for (i, dev) in d.devices.iter().enumerate() {
        if !devices.contains_key(&dev.id) {
            continue;
        }
        let h = held.entry(dev.id).or_default();
        h.0.extend(inbound_of[i].iter().map(|n| entry_rank[*n as usize]));
        h.1.extend(reach_of[i].iter().map(|n| grant_rank[*n as usize]));
    }
    let mut lists: rustc_hash::FxHashMap<Vec<u32>, Arc<Vec<FilterRule>>> =
        rustc_hash::FxHashMap::default();
    for (id, acc) in devices.iter_mut() {
        let (mut inbound, mut reach) = held.remove(id).unwrap_or_default();
        inbound.sort_unstable();
        inbound.dedup();
        acc.inbound = match lists.get(&inbound) {
            Some(kept) => Arc::clone(kept),
            None => {
                let list: Arc<Vec<FilterRule>> = Arc::new(
                    inbound
                        .iter()
                        .map(|r| entries[by_rank[*r as usize] as usize].clone())
                        .collect(),
                );
                lists.insert(inbound, Arc::clone(&list));
                list
            }
        };
        reach.sort_unstable();
        reach.dedup();
        acc.reach = reach
            .iter()
            .map(|r| Arc::clone(&grants[grant_by_rank[*r as usize] as usize]))
            .collect();
    }
    Compiled {
        devices,
        next_expiry_ms,
    }
}

/// Runs the policy's `[[tests]]` at `now_ms`. Tests are about the policy's intent: they judge
/// identities (a user by name and groups; a device by hostname, tags and owner), assume a
/// compliant, non-quarantined device, and ignore just-in-time grants. Rules expired at `now_ms`
/// do not count.
pub fn run_tests(p: &Policy, d: &Directory, now_ms: i64) -> Vec<TestOutcome> {
    let ix = Index::new(p, d);
    let mut out = Vec::new();
    for t in &p.tests {
        let from = t.from.to_string();
        let expectations = t
            .allow
            .iter()
            .map(|x| (x, true))
            .chain(t.deny.iter().map(|x| (x, false)));
        for (target, expect_allow) in expectations {
            let tg = &target.value;
            let mut by = Vec::new();
            let mut expired = Vec::new();
            let port_open = p
                .services
                .get(&tg.service)
                .is_some_and(|s| s.ports.allows(tg.proto, tg.port));
            for rule in p.rules.iter().filter(|r| r.mode.in_view(View::Enforced)) {
                if !rule.to.iter().any(|s| s.value == tg.service) {
                    continue;
                }
                if !rule
                    .from
                    .iter()
                    .any(|s| ix.identity_matches(&s.value, &t.from))
                {
                    continue;
                }
                match rule.expires_ms {
                    Some(x) if x <= now_ms => expired.push(format!(
                        "rule {:?} (line {}) expired at {}",
                        rule.name,
                        rule.pos.line,
                        format_ms(x)
                    )),
                    _ => by.push(format!("rule {:?} (line {})", rule.name, rule.pos.line)),
                }
            }
            let allowed = port_open && !by.is_empty();
            let target_s = match tg.proto {
                Proto::Icmp => format!("{} (icmp)", tg.service),
                pr => format!("{}:{}/{}", tg.service, tg.port, proto_name(pr)),
            };
            let why = if allowed {
                format!("allowed by {}", by.join(", "))
            } else if !by.is_empty() {
                format!(
                    "denied: {} is not open in service {:?} (default deny)",
                    match tg.proto {
                        Proto::Icmp => "icmp".to_string(),
                        pr => format!("{}/{}", tg.port, proto_name(pr)),
                    },
                    tg.service
                )
            } else {
                let mut s =
                    format!("denied: no rule allows {from} to reach {target_s} (default deny)");
                if !expired.is_empty() {
                    s.push_str("; ");
                    s.push_str(&expired.join("; "));
                }
                s
            };
            out.push(TestOutcome {
                pos: target.pos,
                from: from.clone(),
                target: target_s,
                expect_allow,
                allowed,
                pass: allowed == expect_allow,
                why,
            });
        }
    }
    out
}

/// For each device, the posture requirements named by the rules whose sources include it:
/// the only requirements whose failure costs that device access (for automatic quarantine and
/// risk, which must not punish a device for a requirement no rule of its needs).
pub fn requirements_by_device(p: &Policy, d: &Directory) -> BTreeMap<DeviceId, BTreeSet<String>> {
    let ix = Index::new(p, d);
    let mut out: BTreeMap<DeviceId, BTreeSet<String>> = BTreeMap::new();
    for rule in p
        .rules
        .iter()
        .filter(|r| !r.posture.is_empty() && r.mode.in_view(View::Enforced))
    {
        for sel in &rule.from {
            for i in ix.resolve(&sel.value) {
                out.entry(d.devices[i].id)
                    .or_default()
                    .extend(rule.posture.iter().map(|q| q.value.clone()));
            }
        }
    }
    out
}

/// A policy rule or a just-in-time grant, in one shape.
pub(crate) struct EffRule<'a> {
    pub name: String,
    /// `None` for grants.
    pub pos: Option<Pos>,
    pub from: Vec<Selector>,
    pub to: Vec<&'a str>,
    pub posture: Vec<&'a str>,
    pub expires_ms: Option<i64>,
    /// Grants are [`RuleMode::Enforced`] (in both views).
    pub mode: RuleMode,
}

/// The policy's rules followed by the directory's grants (grants naming an unknown service or a
/// malformed source are skipped).
pub(crate) fn effective_rules<'a>(p: &'a Policy, d: &'a Directory) -> Vec<EffRule<'a>> {
    let mut v: Vec<EffRule<'a>> = p
        .rules
        .iter()
        .map(|r| EffRule {
            name: r.name.clone(),
            pos: Some(r.pos),
            from: r.from.iter().map(|s| s.value.clone()).collect(),
            to: r.to.iter().map(|s| s.value.as_str()).collect(),
            posture: r.posture.iter().map(|s| s.value.as_str()).collect(),
            expires_ms: r.expires_ms,
            mode: r.mode,
        })
        .collect();
    for g in &d.grants {
        let Some(svc) = p
            .services
            .get_key_value(g.to.as_str())
            .map(|(k, _)| k.as_str())
        else {
            continue;
        };
        let from = match g.from.strip_prefix("device:") {
            Some(h) => Selector::Device(h.to_string()),
            None => Selector::User(g.from.strip_prefix("user:").unwrap_or(&g.from).to_string()),
        };
        v.push(EffRule {
            name: format!("grant:{}", g.id),
            pos: None,
            from: vec![from],
            to: vec![svc],
            posture: Vec::new(),
            expires_ms: Some(g.not_after_ms),
            mode: RuleMode::Enforced,
        });
    }
    v
}

/// Lookups over the directory, with group membership from the policy and the directory.
pub(crate) struct Index<'a> {
    pub d: &'a Directory,
    pub by_host: BTreeMap<&'a str, Vec<usize>>,
    pub by_user: BTreeMap<&'a str, Vec<usize>>,
    pub by_tag: BTreeMap<&'a str, Vec<usize>>,
    /// Group → member user names.
    pub groups: BTreeMap<&'a str, BTreeSet<&'a str>>,
    /// Users the identity provider suspended → why (no user or group selector names their
    /// devices).
    pub suspended: BTreeMap<&'a str, &'a str>,
}

impl<'a> Index<'a> {
    pub fn new(p: &'a Policy, d: &'a Directory) -> Index<'a> {
        let mut ix = Index {
            d,
            by_host: BTreeMap::new(),
            by_user: BTreeMap::new(),
            by_tag: BTreeMap::new(),
            groups: BTreeMap::new(),
            suspended: d
                .users
                .iter()
                .filter_map(|u| Some((u.name.as_str(), u.suspended.as_deref()?)))
                .collect(),
        };
        for (i, dev) in d.devices.iter().enumerate() {
            ix.by_host.entry(dev.hostname.as_str()).or_default().push(i);
            if let Some(u) = &dev.user {
                if !ix.suspended.contains_key(u.as_str()) {
                    ix.by_user.entry(u.as_str()).or_default().push(i);
                }
            }
            for t in &dev.tags {
                ix.by_tag.entry(t.as_str()).or_default().push(i);
            }
        }
        for (g, members) in &p.groups {
            ix.groups
                .entry(g.as_str())
                .or_default()
                .extend(members.members.iter().map(|m| m.value.as_str()));
        }
        for u in &d.users {
            for g in &u.groups {
                ix.groups
                    .entry(g.as_str())
                    .or_default()
                    .insert(u.name.as_str());
            }
        }
        ix
    }

    /// Every device (live or not) a selector names, as indices into `d.devices`. `device:NAME`
    /// names only a device whose name is bound.
    pub fn resolve(&self, sel: &Selector) -> Vec<usize> {
        let get = |m: &BTreeMap<&str, Vec<usize>>, k: &str| m.get(k).cloned().unwrap_or_default();
        match sel {
            Selector::User(u) => get(&self.by_user, u),
            Selector::Tag(t) => get(&self.by_tag, t),
            Selector::Device(h) => get(&self.by_host, h)
                .into_iter()
                .filter(|i| self.d.devices[*i].name_bound)
                .collect(),
            Selector::Group(g) => self
                .groups
                .get(g.as_str())
                .map(|users| users.iter().flat_map(|u| get(&self.by_user, u)).collect())
                .unwrap_or_default(),
        }
    }

    /// Whether a selector names this device.
    pub fn matches_device(&self, sel: &Selector, dev: &DirDevice) -> bool {
        if matches!(sel, Selector::User(_) | Selector::Group(_)) && self.suspension(dev).is_some() {
            return false;
        }
        self.matches_identity(sel, dev)
    }

    /// Why a user or group selector that names this device's user does not name the device
    /// now: the identity provider suspended the user.
    pub fn suspended_match(&self, sel: &Selector, dev: &DirDevice) -> Option<String> {
        let why = self.suspension(dev)?;
        let user = dev.user.as_deref()?;
        (matches!(sel, Selector::User(_) | Selector::Group(_)) && self.matches_identity(sel, dev))
            .then(|| format!("user {user} has no access from the identity provider: {why}"))
    }

    fn suspension(&self, dev: &DirDevice) -> Option<&'a str> {
        self.suspended.get(dev.user.as_deref()?).copied()
    }

    /// Whether a selector names this device, whatever the provider said about its user.
    fn matches_identity(&self, sel: &Selector, dev: &DirDevice) -> bool {
        match sel {
            Selector::User(u) => dev.user.as_deref() == Some(u.as_str()),
            Selector::Tag(t) => dev.tags.iter().any(|x| x == t),
            Selector::Device(h) => dev.name_bound && dev.hostname == *h,
            Selector::Group(g) => dev
                .user
                .as_deref()
                .is_some_and(|u| self.groups.get(g.as_str()).is_some_and(|m| m.contains(u))),
        }
    }

    /// Whether a selector names a test's source identity.
    fn identity_matches(&self, sel: &Selector, src: &TestSource) -> bool {
        match src {
            TestSource::User(u) => match sel {
                Selector::User(x) => x == u,
                Selector::Group(g) => self
                    .groups
                    .get(g.as_str())
                    .is_some_and(|m| m.contains(u.as_str())),
                Selector::Tag(_) | Selector::Device(_) => false,
            },
            TestSource::Device(h) => {
                if let Selector::Device(x) = sel {
                    return x == h;
                }
                self.by_host.get(h.as_str()).is_some_and(|devs| {
                    devs.iter()
                        .any(|i| self.matches_device(sel, &self.d.devices[*i]))
                })
            }
        }
    }
}

/// ms since the epoch as RFC 3339 (UTC), for messages.
pub(crate) fn format_ms(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}
