//! Peer sets: the source populations of a device's inbound filter, carried once per netmap.
//!
//! A dense policy gives every destination dozens of inbound rules over the same few source
//! populations (a group, a tag, "every laptop"). Listing every source address in every rule
//! makes a netmap O(rules × devices) and re-sends all of it on each change. Protocol version 2
//! carries each distinct population once, as a [`PeerSet`] of minimal CIDR prefixes
//! ([`aggregate`]), and rules name sets by id ([`crate::filter::FilterRule::source_sets`]).
//! A delta carries only the prefixes a set gained or lost ([`PeerSetChange`]).
//!
//! The coordinator turns the compiler's flat rules into this form per device with [`factor`],
//! keeping set ids stable across recomputes (the same population keeps its id while its
//! membership changes), and diffs the sets it last sent with [`diff`]. The device applies the
//! changes ([`apply_changes`]) and its packet filter resolves set ids to prefix lookups; a rule
//! naming a set the netmap does not hold allows nothing.
//!
//! Everything here is pure: no I/O, no clock.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::filter::{FilterRule, Sources};
use crate::routes::Prefix;

/// A numbered source population: the devices whose overlay addresses lie in `prefixes`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerSet {
    pub id: u32,
    /// Sorted, non-overlapping prefixes.
    pub prefixes: Vec<Prefix>,
}

/// How one set changed in a delta: a new set, or prefixes gained/lost by an existing one, or a
/// whole replacement (when that is smaller than the difference).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSetChange {
    pub id: u32,
    /// The set's whole new content, replacing what the device holds (or creating it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefixes: Option<Vec<Prefix>>,
    /// Prefixes the set gained (applied after `remove`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Prefix>,
    /// Prefixes the set lost; each must be in the set the device holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Prefix>,
}

/// Why a delta's set changes do not fit the sets a device holds (it missed something: it must
/// get a full netmap, never guess).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerSetError {
    #[error("peer set {0} is changed but the device does not hold it")]
    Unknown(u32),
    #[error("peer set {id} loses {prefix}, which it does not hold")]
    NotHeld { id: u32, prefix: Prefix },
}

/// The smallest list of prefixes that covers exactly `addrs` (IPv4-mapped IPv6 counts as
/// IPv4): contiguous runs of addresses become CIDR blocks, nothing outside `addrs` is covered.
/// Sorted, IPv4 first.
pub fn aggregate(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<Prefix> {
    let mut v4: Vec<u128> = Vec::new();
    let mut v6: Vec<u128> = Vec::new();
    for a in addrs {
        match a.to_canonical() {
            IpAddr::V4(x) => v4.push(u128::from(u32::from(x))),
            IpAddr::V6(x) => v6.push(u128::from(x)),
        }
    }
    let mut out = Vec::new();
    cover(&mut v4, 32, &mut out);
    cover(&mut v6, 128, &mut out);
    out
}

/// Appends the minimal CIDR cover of `vals` (addresses of a `width`-bit family) to `out`.
fn cover(vals: &mut Vec<u128>, width: u32, out: &mut Vec<Prefix>) {
    vals.sort_unstable();
    vals.dedup();
    let mut i = 0;
    while i < vals.len() {
        // The run of consecutive addresses starting at vals[i].
        let start = vals[i];
        let mut end = start;
        while i + 1 < vals.len() && vals[i + 1] == end.wrapping_add(1) && vals[i + 1] != 0 {
            i += 1;
            end = vals[i];
        }
        i += 1;
        // Split [start, end] into aligned blocks, largest first.
        let mut at = start;
        loop {
            let align = if at == 0 {
                width
            } else {
                at.trailing_zeros().min(width)
            };
            let remaining = end - at; // count - 1
            let fit = if remaining == u128::MAX {
                128
            } else {
                127 - (remaining + 1).leading_zeros()
            };
            let bits = align.min(fit);
            let len = u8::try_from(width - bits).unwrap_or(0);
            let addr = if width == 32 {
                IpAddr::V4(Ipv4Addr::from(u32::try_from(at).unwrap_or(0)))
            } else {
                IpAddr::V6(Ipv6Addr::from(at))
            };
            out.push(Prefix::new(addr, len));
            let size_minus_one = if bits >= 128 {
                u128::MAX
            } else {
                (1u128 << bits) - 1
            };
            if at
                .checked_add(size_minus_one)
                .is_none_or(|last| last >= end)
            {
                break;
            }
            at += size_minus_one + 1;
        }
    }
}

/// `prefixes` (an [`aggregate`] cover) without the addresses `gone`: each block holding one
/// is split into the blocks around it, so exactly those addresses leave and the result is
/// the cover [`aggregate`] gives for what remains (same order, same blocks).
pub fn without(prefixes: &[Prefix], gone: &[IpAddr]) -> Vec<Prefix> {
    without_changes(prefixes, gone).map_or_else(|| prefixes.to_vec(), |n| n.kept)
}

/// [`without`] and what it changed, as a delta carries it: `None` when the set holds none of
/// `gone`; else the set without them, the blocks it gained (the pieces of a split block, never
/// in the set before: a cover's blocks do not overlap) and the blocks it lost. One pass, no
/// comparison of the old set with the new.
pub fn without_changes(prefixes: &[Prefix], gone: &[IpAddr]) -> Option<Narrowed> {
    let gone: Vec<IpAddr> = gone.iter().map(|a| a.to_canonical()).collect();
    // A cover's blocks are sorted and do not overlap: the one block that can hold an address
    // is found by a binary search (as in `contains_sorted`), not by a walk of the set.
    let mut hits: Vec<usize> = gone
        .iter()
        .filter_map(|a| {
            let i = prefixes.partition_point(|p| p.addr() <= *a);
            (i > 0 && prefixes[i - 1].contains(*a)).then(|| i - 1)
        })
        .collect();
    if hits.is_empty() {
        return None;
    }
    hits.sort_unstable();
    hits.dedup();
    let mut kept = Vec::with_capacity(prefixes.len() + 1);
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let mut from = 0;
    for h in hits {
        kept.extend_from_slice(&prefixes[from..h]);
        removed.push(prefixes[h]);
        let at = kept.len();
        split_out(prefixes[h], &gone, &mut kept);
        added.extend_from_slice(&kept[at..]);
        from = h + 1;
    }
    kept.extend_from_slice(&prefixes[from..]);
    Some(Narrowed {
        kept,
        added,
        removed,
    })
}

/// What [`without_changes`] made of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Narrowed {
    /// The set without the addresses.
    pub kept: Vec<Prefix>,
    /// Blocks it gained (pieces of the blocks that held an address).
    pub added: Vec<Prefix>,
    /// Blocks it lost.
    pub removed: Vec<Prefix>,
}

/// The change that turns set `id` into `new` by `add` and `remove` (worked out by the
/// caller), or its whole content when that is shorter; `None` when nothing changes.
pub fn change(id: u32, new: &[Prefix], add: &[Prefix], remove: &[Prefix]) -> Option<PeerSetChange> {
    if add.is_empty() && remove.is_empty() {
        return None;
    }
    Some(if add.len() + remove.len() > new.len() {
        whole(id, new)
    } else {
        PeerSetChange {
            id,
            prefixes: None,
            add: add.to_vec(),
            remove: remove.to_vec(),
        }
    })
}

/// Appends `p` minus `gone` to `out`, in address order.
fn split_out(p: Prefix, gone: &[IpAddr], out: &mut Vec<Prefix>) {
    if !gone.iter().any(|a| p.contains(*a)) {
        out.push(p);
        return;
    }
    let width: u8 = if p.is_ipv4() { 32 } else { 128 };
    if p.len() >= width {
        return;
    }
    let len = p.len() + 1;
    let lo = Prefix::new(p.addr(), len);
    let step = 1u128 << (width - len);
    let hi_addr = match p.addr() {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
            u32::from(a).wrapping_add(u32::try_from(step).unwrap_or(0)),
        )),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add(step))),
    };
    split_out(lo, gone, out);
    split_out(Prefix::new(hi_addr, len), gone, out);
}

/// Whether `ip` is in one of `prefixes`.
pub fn contains(prefixes: &[Prefix], ip: IpAddr) -> bool {
    prefixes.iter().any(|p| p.contains(ip))
}

/// Whether `ip` is in one of `prefixes`, which are sorted and non-overlapping (a set's
/// aggregation): one binary search instead of a walk.
pub fn contains_sorted(prefixes: &[Prefix], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    // Non-overlapping: the only prefix that can hold `ip` is the last one starting at or
    // before it.
    let i = prefixes.partition_point(|p| p.addr() <= ip);
    i > 0 && prefixes[i - 1].contains(ip)
}

/// Each set cut down to the addresses in `held` it contains: the sets as a device sees them
/// when it holds only some of its peers (a source it holds no peer for cannot reach it, so
/// nothing it may receive is decided differently). Never wider than `full`. A cut set lists
/// its addresses as host prefixes (sorted, so still non-overlapping), which [`recut`] can
/// change one address at a time.
pub fn restrict(full: &SetBook, held: &[IpAddr]) -> SetBook {
    full.iter()
        .map(|(id, prefixes)| (*id, Arc::new(restrict_one(prefixes, held))))
        .collect()
}

/// One set of [`restrict`].
fn restrict_one(prefixes: &[Prefix], held: &[IpAddr]) -> Vec<Prefix> {
    let mut kept: Vec<Prefix> = held
        .iter()
        .filter(|a| contains_sorted(prefixes, **a))
        .map(|a| Prefix::host(*a))
        .collect();
    kept.sort_unstable();
    kept.dedup();
    kept.shrink_to_fit();
    kept
}

/// [`restrict`] of `full` for `held`, reusing `prev` where it can: `prev` is a `(full, cut)`
/// pair made for the held addresses before they gained `gained` and lost `lost`. A set
/// whose full allocation is the one `prev` cut (aggregations are interned, so an unchanged
/// population keeps its allocation across compiles) is brought up to date from its old cut
/// by those addresses alone. A set whose population changed is cut from its old cut too,
/// through the prefixes the set gained and lost (worked out once for every session holding
/// the same old and new set, in `agg`): what the old cut held stays unless its prefix was
/// lost, and another held address comes in only through a gained prefix, so a held address
/// is searched in the few prefixes that changed, not in the thousands of the whole set. A
/// set new to the book is cut afresh. After a policy change or a revocation, a session's sets
/// cost what changed, not every held address searched in every set. The result is what
/// [`restrict`] gives.
pub fn restrict_reusing(
    full: &SetBook,
    held: &[IpAddr],
    prev: (&SetBook, &SetBook),
    gained: &[IpAddr],
    lost: &[IpAddr],
    agg: &mut Aggregated,
) -> SetBook {
    let (prev_full, prev_cut) = prev;
    let gained: Vec<Prefix> = gained.iter().map(|a| Prefix::host(*a)).collect();
    let lost: Vec<Prefix> = lost.iter().map(|a| Prefix::host(*a)).collect();
    full.iter()
        .map(|(id, f)| {
            let (Some(o), Some(c)) = (prev_full.get(id), prev_cut.get(id)) else {
                return (*id, Arc::new(restrict_one(f, held)));
            };
            // The old set's cut for the addresses held now.
            let recut = recut_one(o, c, &gained, &lost);
            if Arc::ptr_eq(o, f) {
                let cut = match recut {
                    Some((next, _, _)) => Arc::new(next),
                    None => Arc::clone(c),
                };
                return (*id, cut);
            }
            let was: &[Prefix] = recut.as_ref().map_or(c, |(next, _, _)| next);
            // An address the old set held is in the new one unless the old prefix holding it
            // is gone, and then only if a prefix the new set gained holds it (prefixes do not
            // overlap, so no other can).
            let (added, removed) = agg.changed(o, f);
            let mut kept: Vec<Prefix> = was
                .iter()
                .filter(|h| !contains_sorted(removed, h.addr()) || contains_sorted(added, h.addr()))
                .copied()
                .chain(
                    held.iter()
                        .filter(|a| contains_sorted(added, **a))
                        .map(|a| Prefix::host(*a)),
                )
                .collect();
            kept.sort_unstable();
            kept.dedup();
            kept.shrink_to_fit();
            (*id, Arc::new(kept))
        })
        .collect()
}

/// [`restrict`] brought up to date after the held addresses gained `gained` and lost `lost`,
/// from `cut` (what `restrict` or `recut` gave for the same `full`), with the changes that
/// turn `cut` into it: a set neither touches keeps its allocation and has no change. `None`
/// when `cut` is not a cut of `full` (other set ids).
pub fn recut(
    full: &SetBook,
    cut: &SetBook,
    gained: &[IpAddr],
    lost: &[IpAddr],
) -> Option<(SetBook, Vec<PeerSetChange>)> {
    if full.len() != cut.len() || full.keys().ne(cut.keys()) {
        return None;
    }
    let gained: Vec<Prefix> = gained.iter().map(|a| Prefix::host(*a)).collect();
    let lost: Vec<Prefix> = lost.iter().map(|a| Prefix::host(*a)).collect();
    let mut changes = Vec::new();
    let mut out = SetBook::new();
    for ((id, f), c) in full.iter().zip(cut.values()) {
        let Some((next, add, remove)) = recut_one(f, c, &gained, &lost) else {
            out.insert(*id, Arc::clone(c));
            continue;
        };
        out.insert(*id, Arc::new(next));
        changes.push(PeerSetChange {
            id: *id,
            prefixes: None,
            add,
            remove,
        });
    }
    Some((out, changes))
}

/// One set of [`recut`]: the new cut with what it added and removed, or `None` when the
/// gained and lost host prefixes leave it as it is.
fn recut_one(
    f: &[Prefix],
    c: &[Prefix],
    gained: &[Prefix],
    lost: &[Prefix],
) -> Option<(Vec<Prefix>, Vec<Prefix>, Vec<Prefix>)> {
    let mut add: Vec<Prefix> = gained
        .iter()
        .filter(|h| contains_sorted(f, h.addr()) && c.binary_search(h).is_err())
        .copied()
        .collect();
    let mut remove: Vec<Prefix> = lost
        .iter()
        .filter(|h| c.binary_search(h).is_ok() && !add.contains(h))
        .copied()
        .collect();
    if add.is_empty() && remove.is_empty() {
        return None;
    }
    add.sort_unstable();
    add.dedup();
    remove.sort_unstable();
    remove.dedup();
    // Sized once: a session holds its cuts for as long as it is up (tens of thousands of
    // them at 10 000 sessions), so the slack of a growing vector stays allocated.
    let mut next: Vec<Prefix> = Vec::with_capacity(c.len() + add.len());
    next.extend(
        c.iter()
            .filter(|h| remove.binary_search(h).is_err())
            .copied(),
    );
    for h in &add {
        if let Err(i) = next.binary_search(h) {
            next.insert(i, *h);
        }
    }
    Some((next, add, remove))
}

/// The sets a device holds, by id, each set's prefixes shared: every session whose filter names a population holds the one
/// aggregation of it (at 10 000 devices a dense policy's populations are thousands of
/// prefixes each, too many to copy per session).
pub type SetBook = BTreeMap<u32, Arc<Vec<Prefix>>>;

/// The sets as a book.
pub fn book(sets: &[PeerSet]) -> SetBook {
    sets.iter()
        .map(|s| (s.id, Arc::new(s.prefixes.clone())))
        .collect()
}

/// A device's inbound filter (and candidate filter) in set form.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Factored {
    /// Shared by every session given the same rules (interned by [`Aggregated`]).
    pub inbound: Arc<Vec<FilterRule>>,
    pub shadow: Option<Vec<FilterRule>>,
    pub sets: SetBook,
}

/// Turns flat rules (every source address listed) into rules naming sets, one set per distinct
/// source population, shared by every rule over it. `prev` is what the device was last given:
/// a population keeps the id of the set with the same content, or else the id its rule (by
/// rule and service name) used before, so a membership change is a small set change and the
/// rules themselves stay equal. Rules keep their order; literal sources are moved into sets.
pub fn factor(
    inbound: &[FilterRule],
    shadow: Option<&[FilterRule]>,
    prev: Option<&Factored>,
) -> Factored {
    factor_with(inbound, shadow, prev, &mut Aggregated::default())
}

/// [`aggregate`] of each shared source list seen, kept while the caller keeps the lists (one
/// compile's): a list every destination's rule points to is aggregated once, not once per
/// device factored. Each entry holds a clone of its list, so no other list can take its
/// address while it is cached.
///
/// Aggregations are interned: equal contents share one allocation, also across compiles while
/// any session still holds it, so a session's sets are compared with what it was sent by
/// pointer, and a set's change ([`Aggregated::diff`]) is worked out once for every session
/// that holds the same old and new set, not once per session (at 10 000 dense devices a
/// quarantine diffed thousands of prefixes per set for each of 10 000 sessions).
#[derive(Debug, Default)]
pub struct Aggregated {
    by_list: FxHashMap<usize, (Sources, Arc<Vec<Prefix>>)>,
    interned: FxHashMap<Arc<Vec<Prefix>>, ()>,
    /// (old set, new set) by allocation → (added, removed); the key's sets are held so their
    /// addresses cannot be reused while the entry lives.
    diffs: FxHashMap<(usize, usize), DiffMemo>,
    /// Factored rule lists, interned like the aggregations: thousands of sessions are given
    /// a few distinct lists.
    rules: BTreeMap<Arc<Vec<FilterRule>>, ()>,
    /// Factored inbound lists by what they were made from: (the compiled list's address and
    /// length, each rule's set id or 0) → (the compiled list as it was, the factored one).
    /// Sessions with the same compiled rules and set ids get one list without converting
    /// and interning their rules again (a hundred rules a session at 10 000 dense devices).
    /// The list is held (the caller's own allocation, or a copy), so its address is its own
    /// while the entry lives; a copy is compared first, so an address reused by another list
    /// finds nothing.
    factored: FxHashMap<(usize, usize, Vec<u32>), FactoredMemo>,
}

type FactoredMemo = (Arc<Vec<FilterRule>>, Arc<Vec<FilterRule>>);

/// At most this many factored lists are remembered between compiles (a few dozen distinct
/// ones are usual); past it the memo starts over.
const FACTORED_HELD: usize = 4096;

type DiffMemo = (Arc<Vec<Prefix>>, Arc<Vec<Prefix>>, Vec<Prefix>, Vec<Prefix>);

impl Aggregated {
    /// Forgets every list (the lists' compile was replaced) and every aggregation no session
    /// holds any more.
    pub fn clear(&mut self) {
        self.by_list.clear();
        self.diffs.clear();
        self.factored.clear();
        self.interned.retain(|a, _| Arc::strong_count(a) > 1);
        self.rules.retain(|a, _| Arc::strong_count(a) > 1);
    }

    /// `rules` as one shared allocation: the one already kept for equal contents, if any.
    pub fn intern_rules(&mut self, rules: Vec<FilterRule>) -> Arc<Vec<FilterRule>> {
        if let Some((kept, _)) = self.rules.get_key_value(&rules) {
            return Arc::clone(kept);
        }
        let fresh = Arc::new(rules);
        self.rules.insert(Arc::clone(&fresh), ());
        fresh
    }

    /// `prefixes` as one shared allocation: the one already kept for equal contents, if any.
    pub fn intern(&mut self, prefixes: Vec<Prefix>) -> Arc<Vec<Prefix>> {
        let fresh = Arc::new(prefixes);
        match self.interned.get_key_value(&fresh) {
            Some((kept, _)) => Arc::clone(kept),
            None => {
                self.interned.insert(Arc::clone(&fresh), ());
                fresh
            }
        }
    }

    fn of(&mut self, s: &Sources) -> Arc<Vec<Prefix>> {
        if let Some((_, p)) = self.by_list.get(&s.id()) {
            return Arc::clone(p);
        }
        let p = self.intern(aggregate(s.iter().copied()));
        self.by_list.insert(s.id(), (s.clone(), Arc::clone(&p)));
        p
    }

    /// [`diff`], each distinct pair of old and new set worked out once.
    pub fn diff(&mut self, old: &SetBook, new: &SetBook) -> (Vec<PeerSetChange>, Vec<u32>) {
        let mut changes = Vec::new();
        for (id, n) in new {
            let Some(o) = old.get(id) else {
                changes.push(whole(*id, n));
                continue;
            };
            if Arc::ptr_eq(o, n) {
                continue;
            }
            let (_, _, add, remove) = self.diff_of(o, n);
            changes.extend(change(*id, n, add, remove));
        }
        (changes, removed_ids(old, new))
    }

    /// The prefixes of `new` that `old` lacks and those of `old` that `new` lacks (each
    /// sorted, not overlapping), each distinct pair worked out once, as in
    /// [`Aggregated::diff`].
    pub fn changed(
        &mut self,
        old: &Arc<Vec<Prefix>>,
        new: &Arc<Vec<Prefix>>,
    ) -> (&[Prefix], &[Prefix]) {
        let (_, _, add, remove) = self.diff_of(old, new);
        (add, remove)
    }

    fn diff_of(&mut self, o: &Arc<Vec<Prefix>>, n: &Arc<Vec<Prefix>>) -> &DiffMemo {
        let key = (Arc::as_ptr(o) as usize, Arc::as_ptr(n) as usize);
        self.diffs.entry(key).or_insert_with(|| {
            let (add, remove) = set_difference(o, n);
            (Arc::clone(o), Arc::clone(n), add, remove)
        })
    }
}

fn whole(id: u32, n: &[Prefix]) -> PeerSetChange {
    PeerSetChange {
        id,
        prefixes: Some(n.to_vec()),
        add: Vec::new(),
        remove: Vec::new(),
    }
}

/// (in `n` not `o`, in `o` not `n`), both sorted.
fn set_difference(o: &[Prefix], n: &[Prefix]) -> (Vec<Prefix>, Vec<Prefix>) {
    let os: BTreeSet<&Prefix> = o.iter().collect();
    let ns: BTreeSet<&Prefix> = n.iter().collect();
    (
        ns.difference(&os).map(|p| **p).collect(),
        os.difference(&ns).map(|p| **p).collect(),
    )
}

fn removed_ids(old: &SetBook, new: &SetBook) -> Vec<u32> {
    old.keys()
        .filter(|k| !new.contains_key(k))
        .copied()
        .collect()
}

/// [`factor`], aggregating source lists through `agg`.
pub fn factor_with(
    inbound: &[FilterRule],
    shadow: Option<&[FilterRule]>,
    prev: Option<&Factored>,
    agg: &mut Aggregated,
) -> Factored {
    factor_impl(inbound, None, shadow, prev, agg)
}

/// [`factor_with`] for a compiled list shared by many devices: its factoring is remembered by
/// the allocation itself (held, so its address stays its own), so the thousands of sessions
/// that share it find it without comparing a hundred rules each.
pub fn factor_shared(
    inbound: &Arc<Vec<FilterRule>>,
    shadow: Option<&[FilterRule]>,
    prev: Option<&Factored>,
    agg: &mut Aggregated,
) -> Factored {
    factor_impl(inbound, Some(inbound), shadow, prev, agg)
}

fn factor_impl(
    inbound: &[FilterRule],
    shared: Option<&Arc<Vec<FilterRule>>>,
    shadow: Option<&[FilterRule]>,
    prev: Option<&Factored>,
    agg: &mut Aggregated,
) -> Factored {
    // Distinct populations, in order of first use.
    let mut pops: Vec<Arc<Vec<Prefix>>> = Vec::new();
    // Distinct source lists seen, by allocation: the compiler gives every rule over a
    // population the same shared list. Equal lists in two allocations are found equal by
    // `agg`, which interns their aggregations (comparing lists by content here cost thousands
    // of addresses a rule at 10 000 dense devices, where populations differ late).
    let mut by_sources: FxHashMap<usize, usize> = FxHashMap::default();
    // By allocation: `agg` interns aggregations, so equal contents are one allocation.
    let mut by_prefixes: FxHashMap<usize, usize> = FxHashMap::default();
    let all = inbound.iter().chain(shadow.into_iter().flatten());
    // Each rule's population (None: no sources at all).
    let mut rule_pop: Vec<Option<usize>> = Vec::new();
    for r in all {
        if r.sources.is_empty() {
            rule_pop.push(None);
            continue;
        }
        if let Some(p) = by_sources.get(&r.sources.id()) {
            rule_pop.push(Some(*p));
            continue;
        }
        let prefixes = agg.of(&r.sources);
        let p = *by_prefixes
            .entry(Arc::as_ptr(&prefixes) as usize)
            .or_insert_with(|| {
                pops.push(prefixes);
                pops.len() - 1
            });
        by_sources.insert(r.sources.id(), p);
        rule_pop.push(Some(p));
    }
    // Ids: same content first, then the id the same rule used, then new ones.
    let empty = Factored::default();
    let prev = prev.unwrap_or(&empty);
    let mut ids: Vec<Option<u32>> = vec![None; pops.len()];
    let mut claimed: BTreeSet<u32> = BTreeSet::new();
    // By allocation first (what `agg` interned); a set made elsewhere (a narrowing, another
    // `Aggregated`) by content, compared only where length and ends already match.
    let by_ptr: FxHashMap<usize, u32> = prev
        .sets
        .iter()
        .map(|(id, p)| (Arc::as_ptr(p) as usize, *id))
        .collect();
    type Sig = (usize, Option<Prefix>, Option<Prefix>);
    let sig = |p: &[Prefix]| -> Sig { (p.len(), p.first().copied(), p.last().copied()) };
    type Candidates<'a> = Vec<(u32, &'a Arc<Vec<Prefix>>)>;
    let mut by_sig: FxHashMap<Sig, Candidates<'_>> = FxHashMap::default();
    for (id, p) in &prev.sets {
        by_sig.entry(sig(p)).or_default().push((*id, p));
    }
    for (i, p) in pops.iter().enumerate() {
        let found = by_ptr.get(&(Arc::as_ptr(p) as usize)).copied().or_else(|| {
            by_sig
                .get(&sig(p))
                .and_then(|c| c.iter().find(|(_, q)| **q == *p).map(|(id, _)| *id))
        });
        if let Some(id) = found {
            if claimed.insert(id) {
                ids[i] = Some(id);
            }
        }
    }
    let mut prev_key: FxHashMap<(&str, &str), u32> = FxHashMap::default();
    for r in prev.inbound.iter().chain(prev.shadow.iter().flatten()) {
        if let [id] = r.source_sets.as_slice() {
            prev_key.entry((&r.rule, &r.service)).or_insert(*id);
        }
    }
    let all = inbound.iter().chain(shadow.into_iter().flatten());
    for (r, p) in all.zip(&rule_pop) {
        let Some(p) = *p else { continue };
        if ids[p].is_some() {
            continue;
        }
        if let Some(&id) = prev_key.get(&(r.rule.as_str(), r.service.as_str())) {
            if prev.sets.contains_key(&id) && claimed.insert(id) {
                ids[p] = Some(id);
            }
        }
    }
    let mut next = prev
        .sets
        .keys()
        .chain(claimed.iter())
        .max()
        .map_or(1u64, |m| u64::from(*m) + 1);
    if next + pops.len() as u64 > u64::from(u32::MAX) {
        // Ids ran out (after billions of populations): number afresh.
        ids.iter_mut().for_each(|x| *x = None);
        next = 1;
    }
    for id in ids.iter_mut().filter(|x| x.is_none()) {
        *id = Some(u32::try_from(next).unwrap_or(u32::MAX));
        next += 1;
    }
    let mut sets = SetBook::new();
    for (p, id) in pops.into_iter().zip(&ids) {
        if let Some(id) = id {
            sets.insert(*id, p);
        }
    }
    let convert = |r: &FilterRule, p: Option<usize>| -> FilterRule {
        let mut out = FilterRule {
            rule: r.rule.clone(),
            service: r.service.clone(),
            sources: Sources::default(),
            source_sets: r.source_sets.clone(),
            proto: r.proto,
            ports: r.ports.clone(),
            not_after_ms: r.not_after_ms,
            dests: r.dests.clone(),
        };
        if let Some(id) = p.and_then(|p| ids[p]) {
            out.source_sets = vec![id];
        }
        out
    };
    let n = inbound.len();
    let set_ids: Vec<u32> = rule_pop[..n]
        .iter()
        .map(|p| p.and_then(|p| ids[p]).unwrap_or(0))
        .collect();
    let key = (inbound.as_ptr() as usize, n, set_ids);
    // A held list that is the caller's own allocation is the same list; any other is
    // compared (an address reused by another list finds nothing).
    let same = |held: &Arc<Vec<FilterRule>>| {
        shared.is_some_and(|s| Arc::ptr_eq(s, held)) || held[..] == *inbound
    };
    let inbound_out = match agg.factored.get(&key) {
        Some((held, out)) if same(held) => Arc::clone(out),
        _ => {
            let out = agg.intern_rules(
                inbound
                    .iter()
                    .zip(&rule_pop)
                    .map(|(r, p)| convert(r, *p))
                    .collect(),
            );
            if agg.factored.len() >= FACTORED_HELD {
                agg.factored.clear();
            }
            let held = shared
                .cloned()
                .unwrap_or_else(|| Arc::new(inbound.to_vec()));
            agg.factored.insert(key, (held, Arc::clone(&out)));
            out
        }
    };
    let shadow_out = shadow.map(|s| {
        s.iter()
            .zip(&rule_pop[n..])
            .map(|(r, p)| convert(r, *p))
            .collect()
    });
    Factored {
        inbound: inbound_out,
        shadow: shadow_out,
        sets,
    }
}

/// The changes that turn `old` into `new`, and the ids `new` no longer has.
pub fn diff(old: &SetBook, new: &SetBook) -> (Vec<PeerSetChange>, Vec<u32>) {
    Aggregated::default().diff(old, new)
}

/// Applies a delta's set changes to `sets` (kept sorted by id, prefixes sorted). On an error
/// `sets` is unchanged.
pub fn apply_changes(
    sets: &mut Vec<PeerSet>,
    changes: &[PeerSetChange],
    removed: &[u32],
) -> Result<(), PeerSetError> {
    if changes.is_empty() && removed.is_empty() {
        return Ok(());
    }
    // Sets held in the order this function leaves them (by id, each once) take the changes in
    // place: only the sets named are copied and changed, then written back, so a change of
    // one set of many costs that set, and a change that does not fit leaves every set as it
    // was. Any other list is rebuilt whole (and left in that order).
    if !sets.windows(2).all(|w| w[0].id < w[1].id) {
        return apply_changes_rebuilding(sets, changes, removed);
    }
    if apply_differences(sets, changes, removed) {
        return Ok(());
    }
    let held = |id: u32| {
        sets.binary_search_by_key(&id, |s| s.id)
            .ok()
            .map(|i| sets[i].prefixes.clone())
    };
    // Each named set as the changes leave it; `None`: removed (and not sent again).
    let mut named: BTreeMap<u32, Option<Vec<Prefix>>> =
        removed.iter().map(|id| (*id, None)).collect();
    for c in changes {
        let entry = named.entry(c.id).or_insert_with(|| held(c.id));
        if let Some(p) = &c.prefixes {
            *entry = Some(p.clone());
        }
        let Some(entry) = entry.as_mut() else {
            return Err(PeerSetError::Unknown(c.id));
        };
        change_set(entry, c)?;
    }
    for (id, prefixes) in named {
        match (sets.binary_search_by_key(&id, |s| s.id), prefixes) {
            (Ok(i), Some(prefixes)) => sets[i].prefixes = prefixes,
            (Ok(i), None) => {
                sets.remove(i);
            }
            (Err(i), Some(prefixes)) => sets.insert(i, PeerSet { id, prefixes }),
            (Err(_), None) => {}
        }
    }
    Ok(())
}

/// The common delta, made where the sets are without copying them: differences only (no
/// whole replacement, no set removed), each set named once and held, sorted and without
/// duplicates, every removal held. Checks all of that before it changes anything; returns
/// `false` (nothing changed) for anything else, which [`apply_changes`] then handles, errors
/// included. `sets` must be sorted by id.
fn apply_differences(sets: &mut [PeerSet], changes: &[PeerSetChange], removed: &[u32]) -> bool {
    if !removed.is_empty() || changes.iter().any(|c| c.prefixes.is_some()) {
        return false;
    }
    let mut at = Vec::with_capacity(changes.len());
    for c in changes {
        let Ok(i) = sets.binary_search_by_key(&c.id, |s| s.id) else {
            return false;
        };
        let held = &sets[i].prefixes;
        let removals_held = c.remove.iter().all(|r| held.binary_search(r).is_ok());
        let mut gone = c.remove.clone();
        gone.sort_unstable();
        gone.dedup();
        if at.iter().any(|(j, _)| *j == i)
            || !removals_held
            || gone.len() != c.remove.len()
            || !held.windows(2).all(|w| w[0] < w[1])
        {
            return false;
        }
        at.push((i, gone));
    }
    for (c, (i, gone)) in changes.iter().zip(at) {
        let set = &mut sets[i].prefixes;
        if !gone.is_empty() {
            set.retain(|p| gone.binary_search(p).is_err());
        }
        for a in &c.add {
            if let Err(k) = set.binary_search(a) {
                set.insert(k, *a);
            }
        }
    }
    true
}

/// One change's removals and additions made to the set it names (its whole content, when it
/// carries one, already in place).
fn change_set(entry: &mut Vec<Prefix>, c: &PeerSetChange) -> Result<(), PeerSetError> {
    for r in &c.remove {
        let Some(at) = entry.iter().position(|p| p == r) else {
            return Err(PeerSetError::NotHeld {
                id: c.id,
                prefix: *r,
            });
        };
        entry.remove(at);
    }
    entry.extend(c.add.iter().copied());
    entry.sort_unstable();
    entry.dedup();
    Ok(())
}

/// [`apply_changes`] by rebuilding every set: for a list not ordered by id, and the reference
/// the in-place path is tested against.
fn apply_changes_rebuilding(
    sets: &mut Vec<PeerSet>,
    changes: &[PeerSetChange],
    removed: &[u32],
) -> Result<(), PeerSetError> {
    let mut b: BTreeMap<u32, Vec<Prefix>> =
        sets.iter().map(|s| (s.id, s.prefixes.clone())).collect();
    for id in removed {
        b.remove(id);
    }
    for c in changes {
        let entry = match &c.prefixes {
            Some(p) => {
                let e = b.entry(c.id).or_default();
                *e = p.clone();
                e
            }
            None => b.get_mut(&c.id).ok_or(PeerSetError::Unknown(c.id))?,
        };
        change_set(entry, c)?;
    }
    *sets = b
        .into_iter()
        .map(|(id, prefixes)| PeerSet { id, prefixes })
        .collect();
    Ok(())
}

/// Folds the set changes of a later delta (`changes`, `removed`) into those of an earlier one
/// (`held_changes`, `held_removed`), so that applying the result with [`apply_changes`] equals
/// applying both in turn. Relies on what [`diff`] guarantees: a change's `add` holds no prefix
/// the set already had and its `remove` only prefixes it had. A later difference on a set the
/// earlier delta removed (or on a replaced set, a prefix it does not hold) is refused: the
/// delta sequence itself is broken, and nothing is guessed.
pub fn merge_changes(
    held_changes: &[PeerSetChange],
    held_removed: &[u32],
    changes: &[PeerSetChange],
    removed: &[u32],
) -> Result<(Vec<PeerSetChange>, Vec<u32>), PeerSetError> {
    let mut out: BTreeMap<u32, PeerSetChange> =
        held_changes.iter().map(|c| (c.id, c.clone())).collect();
    let mut gone: Vec<u32> = held_removed.to_vec();
    for id in removed {
        out.remove(id);
        if !gone.contains(id) {
            gone.push(*id);
        }
    }
    for c2 in changes {
        if c2.prefixes.is_some() {
            // A replacement: whatever came before no longer matters.
            out.insert(c2.id, c2.clone());
            continue;
        }
        let Some(c1) = out.get_mut(&c2.id) else {
            if gone.contains(&c2.id) {
                return Err(PeerSetError::Unknown(c2.id));
            }
            out.insert(c2.id, c2.clone());
            continue;
        };
        if let Some(p) = &c1.prefixes {
            // Earlier replacement: work the later difference into the content.
            let mut set: BTreeSet<Prefix> = p.iter().copied().collect();
            for r in &c1.remove {
                set.remove(r);
            }
            set.extend(c1.add.iter().copied());
            for r in &c2.remove {
                if !set.remove(r) {
                    return Err(PeerSetError::NotHeld {
                        id: c2.id,
                        prefix: *r,
                    });
                }
            }
            set.extend(c2.add.iter().copied());
            *c1 = PeerSetChange {
                id: c2.id,
                prefixes: Some(set.into_iter().collect()),
                add: Vec::new(),
                remove: Vec::new(),
            };
            continue;
        }
        // Two differences: a prefix added then removed was never held (it leaves both lists);
        // one removed then added again is removed and added (apply removes first).
        let a1: BTreeSet<Prefix> = c1.add.iter().copied().collect();
        let r2: BTreeSet<Prefix> = c2.remove.iter().copied().collect();
        let mut remove: BTreeSet<Prefix> = c1.remove.iter().copied().collect();
        remove.extend(r2.difference(&a1).copied());
        let mut add: BTreeSet<Prefix> = a1.difference(&r2).copied().collect();
        add.extend(c2.add.iter().copied());
        c1.remove = remove.into_iter().collect();
        c1.add = add.into_iter().collect();
    }
    Ok((out.into_values().collect(), gone))
}

/// Rules with their sets written out as addresses: the flat form a protocol-1 device gets and
/// older code reads. Prefixes wider than `max_hosts` addresses are not expanded (their rules
/// lose them: fail closed); sets the rules name but `sets` lacks add nothing.
pub fn expand(rules: &[FilterRule], sets: &[PeerSet], max_hosts: u32) -> Vec<FilterRule> {
    let b = book(sets);
    rules
        .iter()
        .map(|r| {
            let mut out = r.clone();
            let mut srcs: Vec<IpAddr> = r.sources.to_vec();
            for id in &r.source_sets {
                for p in b.get(id).into_iter().flat_map(|v| v.iter()) {
                    srcs.extend(hosts(p, max_hosts));
                }
            }
            srcs.sort_unstable();
            srcs.dedup();
            out.sources = srcs.into();
            out.source_sets = Vec::new();
            out
        })
        .collect()
}

/// The addresses in `p`, if there are at most `max` of them.
pub fn hosts(p: &Prefix, max: u32) -> Vec<IpAddr> {
    let width: u32 = if p.is_ipv4() { 32 } else { 128 };
    let bits = width - u32::from(p.len());
    if bits >= 32 || (1u64 << bits) > u64::from(max) {
        return Vec::new();
    }
    let base: u128 = match p.addr() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    (0..(1u128 << bits))
        .map(|i| {
            let v = base + i;
            if width == 32 {
                IpAddr::V4(Ipv4Addr::from(u32::try_from(v).unwrap_or(0)))
            } else {
                IpAddr::V6(Ipv6Addr::from(v))
            }
        })
        .collect()
}

/// Whether rule `r` names `ip` as a source, directly or through one of `sets`.
pub fn rule_has_source(r: &FilterRule, sets: &SetBook, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    r.sources.iter().any(|s| s.to_canonical() == ip)
        || r.source_sets
            .iter()
            .any(|id| sets.get(id).is_some_and(|p| contains(p, ip)))
}

#[cfg(test)]
mod tests;
