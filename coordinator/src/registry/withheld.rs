//! What trust withholds from a device, told to it in its posture verdict: the access its
//! policy would give it (`ideal`) minus the access it has (`have`), one entry per service,
//! destination and rule, at most a bound of them.
//!
//! Both sides come as reach grants (a rule's destinations on one service, shared lists), so a
//! quarantined device of a dense policy, which would reach a service on thousands of devices
//! by dozens of rules, costs a walk of those lists and the entries told, not one string-laden
//! entry per (service, destination, rule, protocol) sorted and then mostly thrown away.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use ward_shared::names::Hostname;
use ward_shared::policy::{ReachDest, ReachGrant};
use ward_shared::wire::DeviceId;
use ward_shared::wire::Unavailable;

/// One withheld (service, rule): its destinations not reached now, by hostname, each
/// hostname once.
struct Group<'a> {
    service: &'a str,
    rule: &'a str,
    dests: Vec<&'a ReachDest>,
}

/// Where an entry sorts: (service, hostname, rule), as [`Unavailable`] sorts.
type Key<'a> = (&'a str, &'a Hostname, &'a str);

impl<'a> Group<'a> {
    fn key(&self, at: usize) -> Key<'a> {
        (self.service, &self.dests[at].hostname, self.rule)
    }
}

/// The destinations of `grants` by (service, rule), each list sorted by device id without
/// duplicates (the grants of one service and rule usually share one list: one per protocol).
fn by_service_rule(grants: &[Arc<ReachGrant>]) -> BTreeMap<(&str, &str), Vec<&ReachDest>> {
    let mut lists: BTreeMap<(&str, &str), Vec<&Arc<[ReachDest]>>> = BTreeMap::new();
    for g in grants {
        let at = lists
            .entry((g.service.as_str(), g.rule.as_str()))
            .or_default();
        if !at.iter().any(|l| Arc::ptr_eq(l, &g.devices)) {
            at.push(&g.devices);
        }
    }
    lists
        .into_iter()
        .map(|(k, ls)| {
            let mut all: Vec<&ReachDest> = ls.iter().flat_map(|l| l.iter()).collect();
            if ls.len() > 1 {
                all.sort_by_key(|d| d.device_id);
                all.dedup_by_key(|d| d.device_id);
            }
            (k, all)
        })
        .collect()
}

/// The entries of access `ideal` gives device `me` that `have` does not (compared by service,
/// destination and rule, as the flat reach lists would be), sorted as [`Unavailable`] sorts,
/// cut to `max` entries, and how many were left out. Each withheld (service, rule) keeps its
/// first entry while there is room, so the list names every kind of access withheld before it
/// repeats one; the rest of the room is taken in order. `reasons` says why a (service, rule)
/// is withheld; it is asked once per (service, rule) told.
pub(super) fn withheld(
    ideal: &[Arc<ReachGrant>],
    have: &[Arc<ReachGrant>],
    me: DeviceId,
    max: usize,
    mut reasons: impl FnMut(&str, &str) -> Vec<String>,
) -> (Vec<Unavailable>, u64) {
    let have = by_service_rule(have);
    let mut groups: Vec<Group> = Vec::new();
    for ((service, rule), dests) in by_service_rule(ideal) {
        let reached = have.get(&(service, rule)).map(Vec::as_slice).unwrap_or(&[]);
        let mut out: Vec<&ReachDest> = Vec::new();
        let mut r = reached.iter().peekable();
        for d in dests.into_iter().filter(|d| d.device_id != me) {
            while r.next_if(|x| x.device_id < d.device_id).is_some() {}
            if r.peek().is_none_or(|x| x.device_id != d.device_id) {
                out.push(d);
            }
        }
        out.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        out.dedup_by(|a, b| a.hostname == b.hostname);
        if !out.is_empty() {
            groups.push(Group {
                service,
                rule,
                dests: out,
            });
        }
    }
    let total: usize = groups.iter().map(|g| g.dests.len()).sum();

    // (group, position) of the entries told.
    let mut told: Vec<(usize, usize)> = Vec::new();
    if total <= max {
        for (gi, g) in groups.iter().enumerate() {
            told.extend((0..g.dests.len()).map(|at| (gi, at)));
        }
    } else {
        // The first entry of each (service, rule), in list order, while there is room.
        let mut firsts: Vec<usize> = (0..groups.len()).collect();
        firsts.sort_by(|a, b| groups[*a].key(0).cmp(&groups[*b].key(0)));
        firsts.truncate(max);
        let mut first_told = vec![false; groups.len()];
        for gi in &firsts {
            first_told[*gi] = true;
            told.push((*gi, 0));
        }
        // The rest of the room in list order: a merge of the groups' sorted lists that stops
        // once the room is taken.
        let mut heap: BinaryHeap<Reverse<(Key, usize, usize)>> = groups
            .iter()
            .enumerate()
            .map(|(gi, g)| Reverse((g.key(0), gi, 0)))
            .collect();
        while told.len() < max {
            let Some(Reverse((_, gi, at))) = heap.pop() else {
                break;
            };
            if at + 1 < groups[gi].dests.len() {
                heap.push(Reverse((groups[gi].key(at + 1), gi, at + 1)));
            }
            if !(at == 0 && first_told[gi]) {
                told.push((gi, at));
            }
        }
    }

    let mut why: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut list: Vec<Unavailable> = told
        .iter()
        .map(|&(gi, at)| {
            let g = &groups[gi];
            Unavailable {
                service: g.service.to_string(),
                hostname: g.dests[at].hostname.clone(),
                rule: g.rule.to_string(),
                reasons: why
                    .entry(gi)
                    .or_insert_with(|| reasons(g.service, g.rule))
                    .clone(),
            }
        })
        .collect();
    list.sort();
    let more = (total - list.len()) as u64;
    (list, more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use ward_shared::filter::{PortRange, Proto};
    use ward_shared::policy::expand_reach;

    /// The flat way: every (service, destination, rule, protocol) entry made, sorted,
    /// deduplicated, then cut (each withheld (service, rule) first, then in order).
    fn flat(
        ideal: &[Arc<ReachGrant>],
        have: &[Arc<ReachGrant>],
        me: DeviceId,
        max: usize,
        reasons: impl Fn(&str, &str) -> Vec<String>,
    ) -> (Vec<Unavailable>, u64) {
        let have: BTreeSet<(String, DeviceId, String)> = expand_reach(have, me)
            .into_iter()
            .map(|r| (r.service, r.device_id, r.rule))
            .collect();
        let mut list: Vec<Unavailable> = expand_reach(ideal, me)
            .into_iter()
            .filter(|r| !have.contains(&(r.service.clone(), r.device_id, r.rule.clone())))
            .map(|r| Unavailable {
                reasons: reasons(&r.service, &r.rule),
                service: r.service,
                hostname: r.hostname,
                rule: r.rule,
            })
            .collect();
        list.sort();
        list.dedup();
        let total = list.len();
        if total <= max {
            return (list, 0);
        }
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        let mut keep = vec![false; total];
        let mut kept = 0;
        for (i, u) in list.iter().enumerate() {
            if kept < max && seen.insert((u.service.clone(), u.rule.clone())) {
                keep[i] = true;
                kept += 1;
            }
        }
        for k in keep.iter_mut() {
            if kept == max {
                break;
            }
            if !*k {
                *k = true;
                kept += 1;
            }
        }
        let mut flags = keep.into_iter();
        list.retain(|_| flags.next().unwrap_or(false));
        let more = (total - list.len()) as u64;
        (list, more)
    }

    fn why(service: &str, rule: &str) -> Vec<String> {
        vec![format!("posture of {rule} on {service}")]
    }

    /// Grants over up to 3 services and 3 rules, destinations among 12 devices whose
    /// hostnames repeat (two devices may share a name), both protocols sharing a list or not.
    fn grants() -> impl Strategy<Value = Vec<Arc<ReachGrant>>> {
        prop::collection::vec(
            (
                0..3u8,
                0..3u8,
                prop::collection::btree_set(1..13u64, 0..10),
                any::<bool>(),
            ),
            0..8,
        )
        .prop_map(|specs| {
            let mut out = Vec::new();
            for (s, r, ids, both) in specs {
                let devices: Arc<[ReachDest]> = ids
                    .iter()
                    .map(|i| ReachDest {
                        device_id: DeviceId(*i),
                        hostname: Hostname::parse(&format!("h{}", i % 9)).expect("hostname"),
                    })
                    .collect();
                let protos: &[Proto] = if both {
                    &[Proto::Tcp, Proto::Udp]
                } else {
                    &[Proto::Tcp]
                };
                for proto in protos {
                    out.push(Arc::new(ReachGrant {
                        service: format!("svc{s}"),
                        proto: *proto,
                        ports: vec![PortRange { lo: 22, hi: 22 }],
                        rule: format!("rule{r}"),
                        not_after_ms: None,
                        devices: Arc::clone(&devices),
                    }));
                }
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The same entries, in the same order, with the same count left out, as making every
        /// flat entry and cutting the sorted list.
        #[test]
        fn withheld_entries_are_those_of_the_flat_lists(
            ideal in grants(),
            have in grants(),
            me in 1..13u64,
            max in 1..12usize,
        ) {
            let me = DeviceId(me);
            let got = withheld(&ideal, &have, me, max, why);
            prop_assert_eq!(got, flat(&ideal, &have, me, max, why));
        }
    }

    /// A device quarantined from a service on 5 000 destinations by 40 rules, and from another
    /// on one, is told 256 entries: one for each rule first, and counted the rest.
    #[test]
    fn a_large_withheld_access_is_cut_and_counted() {
        let devices: Arc<[ReachDest]> = (1..=5000u64)
            .map(|i| ReachDest {
                device_id: DeviceId(i),
                hostname: Hostname::parse(&format!("host{i:05}")).expect("hostname"),
            })
            .collect();
        let grant = |service: &str, rule: String, devices: &Arc<[ReachDest]>| {
            Arc::new(ReachGrant {
                service: service.into(),
                proto: Proto::Tcp,
                ports: vec![PortRange { lo: 22, hi: 22 }],
                rule,
                not_after_ms: None,
                devices: Arc::clone(devices),
            })
        };
        let mut ideal: Vec<Arc<ReachGrant>> = (0..40)
            .map(|r| grant("ssh", format!("rule{r:02}"), &devices))
            .collect();
        // A service that sorts after all of them, on one destination.
        ideal.push(grant("zz", "last".into(), &devices[..1].into()));
        let mut asked = 0;
        let (list, more) = withheld(&ideal, &[], DeviceId(7), 256, |_, _| {
            asked += 1;
            vec!["quarantined: test".into()]
        });
        assert_eq!(list.len(), 256);
        assert_eq!(more, 40 * 4999 + 1 - 256);
        let rules: BTreeSet<&str> = list.iter().map(|u| u.rule.as_str()).collect();
        assert_eq!(rules.len(), 41, "every withheld rule is named");
        assert!(
            list.iter().any(|u| u.service == "zz"),
            "a service listed last is named"
        );
        assert_eq!(asked, 41, "reasons asked once per rule told");
        assert!(list.windows(2).all(|w| w[0] < w[1]), "sorted, each once");
        assert!(list.iter().all(|u| u.hostname.as_str() != "host00007"));
    }
}
