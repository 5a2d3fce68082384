use super::*;
use crate::filter::{Filter, PortRange, Proto, Verdict};
use proptest::prelude::*;
use std::time::Instant;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn rule(name: &str, sources: &[IpAddr], port: u16) -> FilterRule {
    FilterRule {
        rule: name.into(),
        service: format!("svc-{name}"),
        sources: sources.to_vec().into(),
        source_sets: Vec::new(),
        proto: Proto::Tcp,
        ports: vec![PortRange { lo: port, hi: port }],
        not_after_ms: None,
        dests: Vec::new(),
    }
}

fn v4(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x6440_0000 + n))
}

fn v6(n: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(n),
    ))
}

#[test]
fn aggregation_is_minimal_and_exact() {
    // 100.64.0.1 ..= 100.64.0.10 and fd00::1 ..= fd00::4.
    let addrs: Vec<IpAddr> = (1..=10).map(v4).chain((1..=4).map(v6)).collect();
    let p = aggregate(addrs.iter().copied());
    assert_eq!(
        p,
        vec![
            pfx("100.64.0.1/32"),
            pfx("100.64.0.2/31"),
            pfx("100.64.0.4/30"),
            pfx("100.64.0.8/31"),
            pfx("100.64.0.10/32"),
            pfx("fd00::1/128"),
            pfx("fd00::2/127"),
            pfx("fd00::4/128"),
        ]
    );
    for a in &addrs {
        assert!(contains(&p, *a), "{a} lost");
    }
    for out in [v4(0), v4(11), v6(0), v6(5)] {
        assert!(!contains(&p, out), "{out} added");
    }
    // Mapped IPv4 counts as IPv4; duplicates collapse; the edges of the space work.
    assert_eq!(
        aggregate([ip("::ffff:100.64.0.1"), ip("100.64.0.1")]),
        vec![pfx("100.64.0.1/32")]
    );
    assert_eq!(
        aggregate([ip("255.255.255.255"), ip("255.255.255.254")]),
        vec![pfx("255.255.255.254/31")]
    );
    assert_eq!(aggregate([ip("0.0.0.0")]), vec![pfx("0.0.0.0/32")]);
    assert!(aggregate([]).is_empty());
}

#[test]
fn an_address_taken_out_splits_only_its_block() {
    let cover = vec![pfx("100.64.0.0/29"), pfx("100.64.0.9/32")];
    assert_eq!(
        without(&cover, &[ip("100.64.0.5")]),
        vec![
            pfx("100.64.0.0/30"),
            pfx("100.64.0.4/32"),
            pfx("100.64.0.6/31"),
            pfx("100.64.0.9/32")
        ]
    );
    // A host block goes whole; an address not held changes nothing; mapped IPv4 counts.
    assert_eq!(
        without(&cover, &[ip("::ffff:100.64.0.9")]),
        vec![pfx("100.64.0.0/29")]
    );
    assert_eq!(without(&cover, &[ip("100.64.0.8")]), cover);
    assert_eq!(
        without(&[pfx("fd00::/126")], &[ip("fd00::3")]),
        vec![pfx("fd00::/127"), pfx("fd00::2/128")]
    );
}

proptest! {
    /// The cover holds exactly the addresses given, and no two of its prefixes could merge.
    #[test]
    fn aggregation_covers_exactly(ns in proptest::collection::btree_set(0u32..300, 0..80)) {
        let addrs: Vec<IpAddr> = ns.iter().map(|n| v4(*n)).collect();
        let p = aggregate(addrs.iter().copied());
        for n in 0u32..300 {
            prop_assert_eq!(contains(&p, v4(n)), ns.contains(&n), "address {}", n);
        }
        let total: u64 = p.iter().map(|x| 1u64 << (32 - u32::from(x.len()))).sum();
        prop_assert_eq!(total, ns.len() as u64);
        for w in p.windows(2) {
            prop_assert!(w[0] < w[1] && !w[0].overlaps(&w[1]));
        }
    }

    /// Cutting a new book for new held addresses from the old book's cut gives what a fresh
    /// cut gives: sets kept in the same allocation are cut again from the old cut by the
    /// addresses gained and lost, a set whose allocation changed (same id, other members)
    /// and a new set are cut afresh, and a set gone from the book is gone from the cut.
    #[test]
    fn a_cut_made_from_the_previous_cut_equals_a_fresh_cut(
        a in proptest::collection::btree_set(0u32..300, 0..60),
        b in proptest::collection::btree_set(0u32..300, 0..60),
        b2 in proptest::collection::btree_set(0u32..300, 0..60),
        c in proptest::collection::btree_set(0u32..300, 0..60),
        held in proptest::collection::vec(0u32..310, 0..12),
        held2 in proptest::collection::vec(0u32..310, 0..12),
    ) {
        let set = |ns: &BTreeSet<u32>| {
            Arc::new(aggregate(ns.iter().flat_map(|n| [v4(*n), v6(*n)])))
        };
        let (kept, changed, fresh, gone) = (set(&a), set(&b), set(&b2), set(&c));
        let prev_full: SetBook =
            BTreeMap::from([(1, Arc::clone(&kept)), (2, changed), (3, gone)]);
        let full: SetBook = BTreeMap::from([(1, kept), (2, fresh), (4, set(&c))]);
        let old: Vec<IpAddr> = held.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let new: Vec<IpAddr> = held2.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let gained: Vec<IpAddr> = new.iter().copied().filter(|x| !old.contains(x)).collect();
        let lost: Vec<IpAddr> = old.iter().copied().filter(|x| !new.contains(x)).collect();
        let prev_cut = restrict(&prev_full, &old);
        let mut agg = Aggregated::default();
        let cut = restrict_reusing(&full, &new, (&prev_full, &prev_cut), &gained, &lost, &mut agg);
        prop_assert_eq!(&cut, &restrict(&full, &new));
        // Nothing gained or lost: a kept set's cut is the old allocation itself.
        let same = restrict_reusing(&full, &old, (&prev_full, &prev_cut), &[], &[], &mut agg);
        prop_assert!(Arc::ptr_eq(&same[&1], &prev_cut[&1]));
    }

    /// A set restricted to some addresses holds exactly those of them it held, in both
    /// families, and the binary search agrees with the walk.
    #[test]
    fn a_restricted_set_holds_the_held_addresses_it_held(
        ns in proptest::collection::btree_set(0u32..300, 0..80),
        held in proptest::collection::vec(0u32..310, 0..12),
        held2 in proptest::collection::vec(0u32..310, 0..12),
    ) {
        let mut addrs: Vec<IpAddr> = ns.iter().map(|n| v4(*n)).collect();
        addrs.extend(ns.iter().map(|n| v6(*n)));
        let full: SetBook = BTreeMap::from([(7, Arc::new(aggregate(addrs)))]);
        let held: Vec<IpAddr> = held.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let cut = restrict(&full, &held);
        prop_assert_eq!(cut.keys().collect::<Vec<_>>(), vec![&7]);
        for w in cut[&7].windows(2) {
            prop_assert!(w[0] < w[1] && !w[0].overlaps(&w[1]));
        }
        // Changing the held addresses one way and back again by `recut` gives what a fresh
        // cut gives each time.
        let other: Vec<IpAddr> = held2.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let gained: Vec<IpAddr> = other.iter().copied().filter(|a| !held.contains(a)).collect();
        let lost: Vec<IpAddr> = held.iter().copied().filter(|a| !other.contains(a)).collect();
        let (there, changes) = recut(&full, &cut, &gained, &lost).expect("same ids");
        prop_assert_eq!(&there, &restrict(&full, &other));
        // The changes are what a device holding the cut applies to get there.
        let mut device: Vec<PeerSet> = cut
            .iter()
            .map(|(id, p)| PeerSet { id: *id, prefixes: p.to_vec() })
            .collect();
        apply_changes(&mut device, &changes, &[]).expect("the changes fit");
        prop_assert_eq!(book(&device), there.clone());
        let (back, _) = recut(&full, &there, &lost, &gained).expect("same ids");
        prop_assert_eq!(&back, &cut);
        prop_assert!(recut(&full, &SetBook::new(), &gained, &lost).is_none());
        for n in 0u32..310 {
            for a in [v4(n), v6(n)] {
                prop_assert_eq!(contains_sorted(&full[&7], a), contains(&full[&7], a));
                prop_assert_eq!(
                    contains(&cut[&7], a),
                    ns.contains(&n) && held.contains(&a),
                    "address {}", a
                );
            }
        }
    }

    /// Taking addresses out of a cover gives the cover of what remains, block for block, in
    /// both families.
    #[test]
    fn taking_addresses_out_gives_the_cover_of_the_rest(
        ns in proptest::collection::btree_set(0u32..300, 0..80),
        gone in proptest::collection::vec(0u32..310, 0..6),
    ) {
        let mut addrs: Vec<IpAddr> = ns.iter().map(|n| v4(*n)).collect();
        addrs.extend(ns.iter().map(|n| v6(*n)));
        let gone: Vec<IpAddr> = gone.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let rest: Vec<IpAddr> = addrs.iter().copied().filter(|a| !gone.contains(a)).collect();
        prop_assert_eq!(without(&aggregate(addrs), &gone), aggregate(rest));
    }

    /// Taking addresses out reports what it changed: the change applied to the set a device
    /// holds gives the narrowed set, the same as a diff of the two would; a set without the
    /// addresses reports nothing. Covers and sets cut to host prefixes alike.
    #[test]
    fn a_narrowing_reports_the_change_a_device_applies(
        ns in proptest::collection::btree_set(0u32..300, 0..80),
        gone in proptest::collection::vec(0u32..310, 0..6),
        hosts in any::<bool>(),
    ) {
        let mut addrs: Vec<IpAddr> = ns.iter().map(|n| v4(*n)).collect();
        addrs.extend(ns.iter().map(|n| v6(*n)));
        let set = if hosts {
            let mut h: Vec<Prefix> = addrs.iter().map(|a| Prefix::host(*a)).collect();
            h.sort_unstable();
            h
        } else {
            aggregate(addrs.clone())
        };
        let gone: Vec<IpAddr> = gone.iter().flat_map(|n| [v4(*n), v6(*n)]).collect();
        let held = gone.iter().any(|a| addrs.contains(a));
        let rest: Vec<IpAddr> = addrs.iter().copied().filter(|a| !gone.contains(a)).collect();
        // What is left, made afresh: the cover of the rest, or the rest's host prefixes.
        let expected = if hosts {
            let mut h: Vec<Prefix> = rest.iter().map(|a| Prefix::host(*a)).collect();
            h.sort_unstable();
            h
        } else {
            aggregate(rest)
        };
        match without_changes(&set, &gone) {
            None => prop_assert!(!held),
            Some(n) => {
                prop_assert!(held);
                prop_assert_eq!(&n.kept, &expected);
                let mut sets = vec![PeerSet { id: 3, prefixes: set.clone() }];
                let c: Vec<PeerSetChange> =
                    change(3, &n.kept, &n.added, &n.removed).into_iter().collect();
                apply_changes(&mut sets, &c, &[]).expect("the change fits the set held");
                prop_assert_eq!(&sets[0].prefixes, &n.kept);
                let old: SetBook = [(3, Arc::new(set.clone()))].into_iter().collect();
                let new: SetBook = [(3, Arc::new(n.kept.clone()))].into_iter().collect();
                prop_assert_eq!(diff(&old, &new).0, c);
            }
        }
    }

    /// Factoring then filtering decides every flow as the flat rules did, and the set diff of
    /// two factorings turns the first's sets into the second's.
    #[test]
    fn sets_decide_like_flat_rules(
        pops in proptest::collection::vec(proptest::collection::btree_set(0u32..40, 0..25), 1..5),
        uses in proptest::collection::vec((0usize..5, 1u16..4), 1..12),
        pops2 in proptest::collection::vec(proptest::collection::btree_set(0u32..40, 0..25), 1..5),
    ) {
        let build = |pops: &[std::collections::BTreeSet<u32>]| -> Vec<FilterRule> {
            uses.iter()
                .enumerate()
                .map(|(i, (p, port))| {
                    let srcs: Vec<IpAddr> = pops[p % pops.len()]
                        .iter()
                        .flat_map(|n| [v4(*n), v6(*n)])
                        .collect();
                    rule(&format!("r{}", i % 4), &srcs, *port)
                })
                .collect()
        };
        let flat = build(&pops);
        let f1 = factor(&flat, None, None);
        let mut flat_filter = Filter::new(1024);
        flat_filter.set_rules(flat.clone());
        let sets1: Vec<PeerSet> = f1.sets.iter().map(|(id, p)| PeerSet { id: *id, prefixes: p.to_vec() }).collect();
        let mut set_filter = Filter::new(1024);
        set_filter.set_rules_with_sets(f1.inbound.to_vec(), &sets1);
        let now = Instant::now();
        for n in 0u32..42 {
            for port in 0u16..5 {
                for src in [v4(n), v6(n)] {
                    let pkt = syn(src, port);
                    prop_assert_eq!(
                        flat_filter.check_inbound(&pkt, now, 0),
                        set_filter.check_inbound(&pkt, now, 0),
                        "{} port {}", src, port
                    );
                }
            }
        }
        // Expansion gives back the flat sources.
        let back = expand(&f1.inbound, &sets1, 1 << 16);
        for (a, b) in back.iter().zip(&flat) {
            let mut want = b.sources.to_vec();
            want.sort_unstable();
            want.dedup();
            prop_assert_eq!(&a.sources, &want);
        }
        // A second policy: the diff applied to the first sets gives the second's.
        let f2 = factor(&build(&pops2), None, Some(&f1));
        let (changes, removed) = diff(&f1.sets, &f2.sets);
        let mut held = sets1.clone();
        apply_changes(&mut held, &changes, &removed).unwrap();
        prop_assert_eq!(book(&held), f2.sets.clone());
    }
}

/// An IPv4 or IPv6 TCP SYN from `src` to port `port`.
fn syn(src: IpAddr, port: u16) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    match src {
        IpAddr::V4(s) => {
            let mut p = vec![0u8; 20];
            p[0] = 0x45;
            p[2..4].copy_from_slice(&40u16.to_be_bytes());
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&s.octets());
            p[16..20].copy_from_slice(&[100, 64, 0, 200]);
            p.extend(tcp);
            p
        }
        IpAddr::V6(s) => {
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[4..6].copy_from_slice(&20u16.to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&s.octets());
            p[24..40].copy_from_slice(
                &Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_00c8u128).octets(),
            );
            p.extend(tcp);
            p
        }
    }
}

#[test]
fn rules_over_one_population_share_one_set() {
    let eng: Vec<IpAddr> = (1..=20).flat_map(|n| [v4(n), v6(n)]).collect();
    let ops: Vec<IpAddr> = (30..=31).flat_map(|n| [v4(n), v6(n)]).collect();
    let rules: Vec<FilterRule> = (0..50)
        .map(|i| rule(&format!("r{i}"), if i % 10 == 0 { &ops } else { &eng }, 22))
        .collect();
    let f = factor(&rules, Some(&rules[..3]), None);
    assert_eq!(f.sets.len(), 2, "{:?}", f.sets);
    assert!(f
        .inbound
        .iter()
        .all(|r| r.sources.is_empty() && r.source_sets.len() == 1));
    let shadow = f.shadow.as_ref().unwrap();
    assert_eq!(shadow.len(), 3);
    assert_eq!(shadow[1].source_sets, f.inbound[1].source_sets);
    // 20 consecutive devices (.1 to .20): 6 prefixes per family, not 40 addresses.
    let eng_set = &f.sets[&f.inbound[1].source_sets[0]];
    assert_eq!(eng_set.len(), 12, "{eng_set:?}");
    // A rule without sources stays without.
    let f = factor(&[rule("none", &[], 1)], None, None);
    assert!(f.sets.is_empty() && f.inbound[0].source_sets.is_empty());
}

#[test]
fn a_member_joining_keeps_the_id_and_sends_only_the_change() {
    let before: Vec<IpAddr> = [1, 2, 3, 5, 8].into_iter().map(v4).collect();
    let after: Vec<IpAddr> = [1, 2, 3, 5, 8, 13].into_iter().map(v4).collect();
    let f1 = factor(
        &[rule("a", &before, 22), rule("b", &before, 80)],
        None,
        None,
    );
    let f2 = factor(
        &[rule("a", &after, 22), rule("b", &after, 80)],
        None,
        Some(&f1),
    );
    assert_eq!(f1.inbound, f2.inbound, "the rules do not change");
    let (changes, removed) = diff(&f1.sets, &f2.sets);
    assert!(removed.is_empty());
    assert_eq!(
        changes,
        vec![PeerSetChange {
            id: f1.inbound[0].source_sets[0],
            prefixes: None,
            add: vec![pfx("100.64.0.13/32")],
            remove: vec![],
        }]
    );
    // A population that goes takes its id away; a new one gets a fresh id.
    let f3 = factor(&[rule("c", &[v4(20)], 22)], None, Some(&f2));
    let (changes, removed) = diff(&f2.sets, &f3.sets);
    assert_eq!(removed, vec![f1.inbound[0].source_sets[0]]);
    assert_eq!(changes.len(), 1);
    assert!(changes[0].prefixes.is_some());
    assert_ne!(changes[0].id, f1.inbound[0].source_sets[0]);
}

#[test]
fn changes_that_do_not_fit_are_refused_and_change_nothing() {
    let mut sets = vec![PeerSet {
        id: 1,
        prefixes: vec![pfx("100.64.0.1/32")],
    }];
    let orig = sets.clone();
    let unknown = PeerSetChange {
        id: 9,
        prefixes: None,
        add: vec![pfx("100.64.0.2/32")],
        remove: vec![],
    };
    assert_eq!(
        apply_changes(&mut sets, &[unknown], &[]),
        Err(PeerSetError::Unknown(9))
    );
    let not_held = PeerSetChange {
        id: 1,
        prefixes: None,
        add: vec![],
        remove: vec![pfx("100.64.0.7/32")],
    };
    assert!(matches!(
        apply_changes(&mut sets, &[not_held], &[1]),
        Err(PeerSetError::Unknown(1))
    ));
    assert_eq!(sets, orig);
    let not_held = PeerSetChange {
        id: 1,
        prefixes: None,
        add: vec![],
        remove: vec![pfx("100.64.0.7/32")],
    };
    assert!(matches!(
        apply_changes(&mut sets, &[not_held], &[]),
        Err(PeerSetError::NotHeld { id: 1, .. })
    ));
    assert_eq!(sets, orig);
}

#[test]
fn an_unknown_set_id_allows_nothing() {
    let mut f = Filter::new(64);
    let mut r = rule("a", &[], 22);
    r.source_sets = vec![7];
    f.set_rules_with_sets(
        vec![r],
        &[PeerSet {
            id: 1,
            prefixes: vec![pfx("100.64.0.0/24")],
        }],
    );
    let now = Instant::now();
    assert_ne!(f.check_inbound(&syn(v4(1), 22), now, 0), Verdict::Allow);
    // The same rule with the set present allows the whole prefix, and nothing outside it.
    let mut r = rule("a", &[], 22);
    r.source_sets = vec![1];
    f.set_rules_with_sets(
        vec![r],
        &[PeerSet {
            id: 1,
            prefixes: vec![pfx("100.64.0.0/24")],
        }],
    );
    assert_eq!(f.check_inbound(&syn(v4(1), 22), now, 0), Verdict::Allow);
    assert_eq!(f.check_inbound(&syn(v4(255), 22), now, 0), Verdict::Allow);
    assert_ne!(f.check_inbound(&syn(v4(256), 22), now, 0), Verdict::Allow);
    // Sets changing under unchanged rules take effect (a member leaving is cut off).
    let mut r = rule("a", &[], 22);
    r.source_sets = vec![1];
    f.set_rules_with_sets(
        vec![r],
        &[PeerSet {
            id: 1,
            prefixes: vec![pfx("100.64.0.9/32")],
        }],
    );
    assert_ne!(f.check_inbound(&syn(v4(2), 22), now, 0), Verdict::Allow);
    assert_eq!(f.check_inbound(&syn(v4(9), 22), now, 0), Verdict::Allow);
}

#[test]
fn hosts_expand_small_prefixes_only() {
    assert_eq!(hosts(&pfx("100.64.0.2/31"), 16), vec![v4(2), v4(3)]);
    assert!(hosts(&pfx("100.64.0.0/10"), 1 << 16).is_empty());
    assert!(hosts(&pfx("fd00::/64"), 1 << 16).is_empty());
    let mut r = rule("a", &[], 1);
    r.source_sets = vec![1];
    let sets = book(&[PeerSet {
        id: 1,
        prefixes: vec![pfx("100.64.0.2/31")],
    }]);
    assert!(rule_has_source(&r, &sets, v4(3)));
    assert!(rule_has_source(&r, &sets, ip("::ffff:100.64.0.2")));
    assert!(!rule_has_source(&r, &sets, v4(4)));
}

#[test]
fn a_shared_aggregation_cache_gives_what_a_fresh_factoring_gives() {
    let a: Vec<IpAddr> = (1..=40).map(v4).collect();
    let b: Vec<IpAddr> = (30..=90).map(v4).chain((1..=3).map(v6)).collect();
    // One list shared by two destinations' rules, as a compile shares it.
    let shared = rule("a", &a, 22);
    let mut also = rule("a2", &[], 80);
    also.sources = shared.sources.clone();
    let mut agg = Aggregated::default();
    let first = vec![shared.clone(), also.clone(), rule("b", &b, 443)];
    assert_eq!(
        factor_with(&first, None, None, &mut agg),
        factor(&first, None, None)
    );
    // Other lists through the same cache, some equal in content to cached ones but not the
    // same allocation, and a factoring that follows a previous one.
    let prev = factor(&first, None, None);
    let second = vec![rule("a", &a[..20], 22), rule("b", &b, 443), also];
    assert_eq!(
        factor_with(&second, None, Some(&prev), &mut agg),
        factor(&second, None, Some(&prev))
    );
    agg.clear();
    assert_eq!(
        factor_with(&second, None, Some(&prev), &mut agg),
        factor(&second, None, Some(&prev))
    );
}

#[test]
fn equal_aggregations_are_one_allocation_and_each_set_change_is_diffed_once() {
    let a: Vec<IpAddr> = (1..=40).map(|n| v4(n * 2)).collect();
    let mut agg = Aggregated::default();
    // Two devices' filters over two lists equal in content (not the same allocation).
    let one = factor_with(&[rule("a", &a, 22)], None, None, &mut agg);
    let two = factor_with(&[rule("a", &a, 80)], None, None, &mut agg);
    let (s1, s2) = (&one.sets[&1], &two.sets[&1]);
    assert!(Arc::ptr_eq(s1, s2), "one interned aggregation");
    // A compile later: the aggregation survives while sessions hold it.
    agg.clear();
    let again = factor_with(&[rule("a", &a, 22)], None, Some(&one), &mut agg);
    assert!(Arc::ptr_eq(&again.sets[&1], s1));
    assert_eq!(again.sets.keys().collect::<Vec<_>>(), vec![&1]);
    // A member leaves: the same change for both sessions, worked out once, equal to the plain
    // diff.
    let fewer = factor_with(&[rule("a", &a[1..], 22)], None, Some(&one), &mut agg);
    let d1 = agg.diff(&one.sets, &fewer.sets);
    let d2 = agg.diff(&two.sets, &fewer.sets);
    assert_eq!(d1, diff(&one.sets, &fewer.sets));
    assert_eq!(d1, d2);
    assert_eq!(agg.diffs.len(), 1);
    assert_eq!(d1.0[0].remove, vec![Prefix::host(a[0])]);
    // Nothing changed: nothing to send, nothing memoised.
    assert_eq!(agg.diff(&one.sets, &two.sets), (vec![], vec![]));
    assert_eq!(agg.diffs.len(), 1);
}

/// Sessions whose compiled rules and set ids are the same get one factored list, made once;
/// a list changed in place (the same address and length, other rules) is factored afresh.
#[test]
fn factored_lists_are_made_once_for_equal_inputs_and_afresh_for_changed_ones() {
    let a: Vec<IpAddr> = (1..=40).map(v4).collect();
    let mut agg = Aggregated::default();
    let mut list = vec![rule("a", &a, 22), rule("b", &a, 80)];
    let one = factor_with(&list, None, None, &mut agg);
    let two = factor_with(&list, None, None, &mut agg);
    assert!(Arc::ptr_eq(&one.inbound, &two.inbound));
    assert_eq!(one, factor(&list, None, None));
    assert_eq!(agg.factored.len(), 1);
    // An equal list elsewhere: the same (interned) list.
    let copy = factor_with(&list.clone(), None, None, &mut agg);
    assert!(Arc::ptr_eq(&one.inbound, &copy.inbound));
    // The same allocation, other contents: not the remembered list.
    list[1].ports = vec![PortRange { lo: 443, hi: 443 }];
    let three = factor_with(&list, None, None, &mut agg);
    assert_eq!(three, factor(&list, None, None));
    assert_eq!(three.inbound[1].ports, vec![PortRange { lo: 443, hi: 443 }]);
    // Another session's ids for the same rules (it was sent set 7 before): its own list.
    let mut prev = factor(&list, None, None);
    let old = prev.sets.remove(&1).unwrap();
    prev.sets.insert(7, old);
    prev.inbound = Arc::new(
        prev.inbound
            .iter()
            .map(|r| FilterRule {
                source_sets: vec![7],
                ..r.clone()
            })
            .collect(),
    );
    let four = factor_with(&list, None, Some(&prev), &mut agg);
    assert_eq!(four, factor(&list, None, Some(&prev)));
    assert!(four.inbound.iter().all(|r| r.source_sets == vec![7]));
    agg.clear();
    assert!(agg.factored.is_empty());
}

/// A shared compiled list is remembered by its allocation: the sessions that share it get the
/// same factored list as [`factor`] gives, made once; a list that is not that allocation (an
/// equal copy, or a changed one) is compared, never taken on its address alone.
#[test]
fn shared_lists_are_factored_once_and_others_by_content() {
    let a: Vec<IpAddr> = (1..=40).map(v4).collect();
    let mut agg = Aggregated::default();
    let shared = Arc::new(vec![rule("a", &a, 22), rule("b", &a, 80)]);
    let one = factor_shared(&shared, None, None, &mut agg);
    assert_eq!(one, factor(&shared, None, None));
    let two = factor_shared(&shared, None, None, &mut agg);
    assert!(Arc::ptr_eq(&one.inbound, &two.inbound));
    assert_eq!(agg.factored.len(), 1);
    // The memo holds the list itself, not a copy.
    assert_eq!(Arc::strong_count(&shared), 2);
    // An equal copy, shared or not: the same (interned) list.
    let copy = Arc::new(shared.to_vec());
    assert!(Arc::ptr_eq(
        &factor_shared(&copy, None, None, &mut agg).inbound,
        &one.inbound
    ));
    assert!(Arc::ptr_eq(
        &factor_with(&shared, None, None, &mut agg).inbound,
        &one.inbound
    ));
    // Other rules: their own factoring.
    let other = Arc::new(vec![rule("a", &a, 443)]);
    let three = factor_shared(&other, None, None, &mut agg);
    assert_eq!(three, factor(&other, None, None));
    assert_eq!(three.inbound[0].ports, vec![PortRange { lo: 443, hi: 443 }]);
    // Forgotten with the compile: the list is no longer held.
    agg.clear();
    assert_eq!(Arc::strong_count(&shared), 1);
}

/// A prefix of a small pool (so that changes hit held prefixes often).
fn pool_prefix(n: u8) -> Prefix {
    Prefix::host(v4(u32::from(n % 12)))
}

/// Sets of pool prefixes by id, each sorted and without duplicates.
fn pool_sets(held: &BTreeMap<u32, Vec<u8>>) -> Vec<PeerSet> {
    held.iter()
        .map(|(id, p)| {
            let mut prefixes: Vec<Prefix> = p.iter().map(|n| pool_prefix(*n)).collect();
            prefixes.sort_unstable();
            prefixes.dedup();
            PeerSet { id: *id, prefixes }
        })
        .collect()
}

proptest! {
    /// Set changes applied in place (only the named sets copied) give what rebuilding every
    /// set gives, the same error when they do not fit, and on an error the sets as they were:
    /// sets held by id, changes that replace, create, shrink and grow sets, remove sets, name
    /// sets not held, remove prefixes not held, and name one set several times.
    #[test]
    fn set_changes_in_place_equal_a_rebuild(
        held in proptest::collection::btree_map(0u32..6, proptest::collection::vec(any::<u8>(), 0..5), 0..6),
        changes in proptest::collection::vec(
            (0u32..8, proptest::option::of(proptest::collection::vec(any::<u8>(), 0..4)),
             proptest::collection::vec(any::<u8>(), 0..3), proptest::collection::vec(any::<u8>(), 0..3)),
            0..5),
        removed in proptest::collection::vec(0u32..8, 0..3),
    ) {
        let sets = pool_sets(&held);
        let changes: Vec<PeerSetChange> = changes
            .iter()
            .map(|(id, whole, add, remove)| PeerSetChange {
                id: *id,
                prefixes: whole.as_ref().map(|w| w.iter().map(|n| pool_prefix(*n)).collect()),
                add: add.iter().map(|n| pool_prefix(*n)).collect(),
                remove: remove.iter().map(|n| pool_prefix(*n)).collect(),
            })
            .collect();
        let mut in_place = sets.clone();
        let mut rebuilt = sets.clone();
        let a = apply_changes(&mut in_place, &changes, &removed);
        let b = apply_changes_rebuilding(&mut rebuilt, &changes, &removed);
        prop_assert_eq!(&a, &b);
        prop_assert_eq!(&in_place, &rebuilt);
        if a.is_err() {
            prop_assert_eq!(&in_place, &sets);
        }
    }

    /// The common delta (held sets each named once, losing prefixes they hold and gaining
    /// others) is made where the sets are, and gives what rebuilding every set gives.
    #[test]
    fn set_differences_in_place_equal_a_rebuild(
        held in proptest::collection::btree_map(0u32..6, proptest::collection::vec(any::<u8>(), 1..8), 1..6),
        picks in proptest::collection::vec(
            (any::<proptest::sample::Index>(),
             proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
             proptest::collection::vec(any::<u8>(), 0..3)),
            1..4),
    ) {
        let sets = pool_sets(&held);
        let mut changes: Vec<PeerSetChange> = Vec::new();
        for (set, gone, add) in &picks {
            let set = &sets[set.index(sets.len())];
            if changes.iter().any(|c| c.id == set.id) {
                continue;
            }
            let mut remove: Vec<Prefix> =
                gone.iter().map(|i| set.prefixes[i.index(set.prefixes.len())]).collect();
            remove.sort_unstable();
            remove.dedup();
            changes.push(PeerSetChange {
                id: set.id,
                prefixes: None,
                add: add.iter().map(|n| pool_prefix(*n)).collect(),
                remove,
            });
        }
        let mut in_place = sets.clone();
        let mut rebuilt = sets.clone();
        prop_assert!(apply_differences(&mut in_place, &changes, &[]));
        prop_assert_eq!(apply_changes_rebuilding(&mut rebuilt, &changes, &[]), Ok(()));
        prop_assert_eq!(&in_place, &rebuilt);
    }
}
