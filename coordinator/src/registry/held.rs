//! The leases the registry holds: each live device's valid leases, oldest first, indexed by
//! key and by end. Who holds a key (asked before every lease is issued), when the next lease
//! ends (asked on every turn of the actor's loop) and which leases have ended are lookups, not
//! walks over every device's leases: at 10 000 devices those walks were a share of the
//! coordinator's core in their own right.
//!
//! Pure: no I/O, no clock (time is passed in).

use std::collections::{BTreeMap, BTreeSet};

use ward_shared::lease::SignedLease;
use ward_shared::wire::{DeviceId, WgPublicKey};

#[derive(Debug, Default)]
pub(super) struct HeldLeases {
    /// Each device's leases by serial, oldest first; no empty lists.
    by_device: BTreeMap<DeviceId, Vec<SignedLease>>,
    /// The devices holding a lease on each key (one, unless the store held a conflict).
    by_key: BTreeMap<WgPublicKey, BTreeSet<DeviceId>>,
    /// (not after, device, serial) of every lease held.
    by_end: BTreeSet<(i64, DeviceId, u64)>,
}

impl HeldLeases {
    /// The leases as loaded, at most `max` per device (the newest).
    pub(super) fn new(leases: impl IntoIterator<Item = SignedLease>, max: usize) -> Self {
        let mut by_device: BTreeMap<DeviceId, Vec<SignedLease>> = BTreeMap::new();
        for l in leases {
            by_device.entry(l.lease.device_id).or_default().push(l);
        }
        let mut held = Self::default();
        for (id, mut v) in by_device {
            v.sort_by_key(|l| l.lease.serial);
            v.dedup_by_key(|l| l.lease.serial);
            let extra = v.len().saturating_sub(max);
            v.drain(..extra);
            for l in &v {
                held.index(id, l);
            }
            held.by_device.insert(id, v);
        }
        held
    }

    /// Device `id`'s leases, oldest first (empty when it holds none).
    pub(super) fn of(&self, id: DeviceId) -> &[SignedLease] {
        self.by_device.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Whether device `id` holds any lease.
    #[cfg(test)]
    pub(super) fn holds_any(&self, id: DeviceId) -> bool {
        self.by_device.contains_key(&id)
    }

    /// The device holding a lease on `key` (the lowest id, should the store hold two).
    pub(super) fn holder(&self, key: &WgPublicKey) -> Option<DeviceId> {
        self.by_key.get(key).and_then(|s| s.first().copied())
    }

    /// When the next held lease ends (ms).
    pub(super) fn next_end(&self) -> Option<i64> {
        self.by_end.first().map(|(end, _, _)| *end)
    }

    /// Adds `lease`, keeping at most `max` for its device: the oldest beyond that are
    /// returned. `None` when the device already holds that serial (nothing changed).
    pub(super) fn insert(&mut self, lease: SignedLease, max: usize) -> Option<Vec<SignedLease>> {
        let id = lease.lease.device_id;
        let v = self.by_device.entry(id).or_default();
        if v.iter().any(|l| l.lease.serial == lease.lease.serial) {
            return None;
        }
        let at = v.partition_point(|l| l.lease.serial < lease.lease.serial);
        v.insert(at, lease.clone());
        let extra = v.len().saturating_sub(max);
        let dropped: Vec<SignedLease> = v.drain(..extra).collect();
        self.index(id, &lease);
        for l in &dropped {
            self.unindex(id, l);
        }
        Some(dropped)
    }

    /// Removes device `id`'s leases with these serials and returns them; `None` when the
    /// device holds no lease at all.
    pub(super) fn remove_serials(
        &mut self,
        id: DeviceId,
        serials: &[u64],
    ) -> Option<Vec<SignedLease>> {
        let v = self.by_device.get_mut(&id)?;
        let (gone, kept): (Vec<SignedLease>, Vec<SignedLease>) = std::mem::take(v)
            .into_iter()
            .partition(|l| serials.contains(&l.lease.serial));
        if kept.is_empty() {
            self.by_device.remove(&id);
        } else {
            *v = kept;
        }
        for l in &gone {
            self.unindex(id, l);
        }
        Some(gone)
    }

    /// Removes and returns every lease device `id` holds.
    pub(super) fn remove_device(&mut self, id: DeviceId) -> Option<Vec<SignedLease>> {
        let gone = self.by_device.remove(&id)?;
        for l in &gone {
            self.unindex(id, l);
        }
        Some(gone)
    }

    /// Drops every lease that has ended by `now_ms` (its `not_after_ms` at or before it);
    /// returns the devices that lost leases, with how many each.
    pub(super) fn expire(&mut self, now_ms: i64) -> Vec<(DeviceId, usize)> {
        let mut lost: BTreeMap<DeviceId, usize> = BTreeMap::new();
        while let Some(&(end, id, serial)) = self.by_end.first() {
            if end > now_ms {
                break;
            }
            self.by_end.pop_first();
            let Some(v) = self.by_device.get_mut(&id) else {
                continue;
            };
            let Some(at) = v.iter().position(|l| l.lease.serial == serial) else {
                continue;
            };
            let l = v.remove(at);
            if v.is_empty() {
                self.by_device.remove(&id);
            }
            self.unkey(id, &l.lease.wg_public_key);
            *lost.entry(id).or_default() += 1;
        }
        lost.into_iter().collect()
    }

    fn index(&mut self, id: DeviceId, l: &SignedLease) {
        self.by_key
            .entry(l.lease.wg_public_key)
            .or_default()
            .insert(id);
        self.by_end
            .insert((l.lease.not_after_ms, id, l.lease.serial));
    }

    fn unindex(&mut self, id: DeviceId, l: &SignedLease) {
        self.by_end
            .remove(&(l.lease.not_after_ms, id, l.lease.serial));
        self.unkey(id, &l.lease.wg_public_key);
    }

    /// Forgets that `id` holds `key`, unless another of its leases is on the same key.
    fn unkey(&mut self, id: DeviceId, key: &WgPublicKey) {
        if self.of(id).iter().any(|l| &l.lease.wg_public_key == key) {
            return;
        }
        if let Some(s) = self.by_key.get_mut(key) {
            s.remove(&id);
            if s.is_empty() {
                self.by_key.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::lease::Lease;

    fn lease(device: u64, key: u8, serial: u64, end: i64) -> SignedLease {
        SignedLease {
            lease: Lease {
                device_id: DeviceId(device),
                wg_public_key: WgPublicKey([key; 32]),
                ipv4: "100.64.0.1".parse().expect("v4"),
                ipv6: "fd00::1".parse().expect("v6"),
                not_before_ms: 0,
                not_after_ms: end,
                serial,
            },
            signature: ward_shared::wire::Bytes(vec![0; 64]),
        }
    }

    fn serials(h: &HeldLeases, device: u64) -> Vec<u64> {
        h.of(DeviceId(device))
            .iter()
            .map(|l| l.lease.serial)
            .collect()
    }

    /// What the indexes say must match a walk over every lease held.
    fn consistent(h: &HeldLeases) {
        let mut ends = BTreeSet::new();
        let mut keys: BTreeMap<WgPublicKey, BTreeSet<DeviceId>> = BTreeMap::new();
        for (id, v) in &h.by_device {
            assert!(!v.is_empty(), "no empty lists");
            for l in v {
                ends.insert((l.lease.not_after_ms, *id, l.lease.serial));
                keys.entry(l.lease.wg_public_key).or_default().insert(*id);
            }
        }
        assert_eq!(h.by_end, ends);
        assert_eq!(h.by_key, keys);
    }

    #[test]
    fn loading_keeps_the_newest_per_device_and_indexes_them() {
        let h = HeldLeases::new(
            [
                lease(1, 1, 3, 300),
                lease(1, 2, 1, 100),
                lease(1, 3, 2, 200),
                lease(2, 9, 7, 50),
            ],
            2,
        );
        assert_eq!(serials(&h, 1), [2, 3]);
        assert_eq!(h.holder(&WgPublicKey([2; 32])), None, "dropped at load");
        assert_eq!(h.holder(&WgPublicKey([1; 32])), Some(DeviceId(1)));
        assert_eq!(h.next_end(), Some(50));
        consistent(&h);
    }

    #[test]
    fn a_lease_beyond_the_limit_drops_the_oldest_and_a_repeat_changes_nothing() {
        let mut h = HeldLeases::default();
        assert_eq!(h.insert(lease(1, 1, 1, 100), 2), Some(vec![]));
        assert_eq!(h.insert(lease(1, 2, 2, 200), 2), Some(vec![]));
        assert_eq!(h.insert(lease(1, 2, 2, 200), 2), None, "same serial");
        let dropped = h.insert(lease(1, 3, 3, 300), 2).expect("new serial");
        assert_eq!(dropped, vec![lease(1, 1, 1, 100)]);
        assert_eq!(serials(&h, 1), [2, 3]);
        assert_eq!(h.holder(&WgPublicKey([1; 32])), None);
        assert_eq!(h.next_end(), Some(200));
        consistent(&h);
    }

    #[test]
    fn a_key_stays_held_while_another_lease_of_the_device_is_on_it() {
        let mut h = HeldLeases::default();
        h.insert(lease(1, 5, 1, 100), 2);
        h.insert(lease(1, 5, 2, 200), 2);
        assert_eq!(
            h.remove_serials(DeviceId(1), &[1]).map(|v| v.len()),
            Some(1)
        );
        assert_eq!(h.holder(&WgPublicKey([5; 32])), Some(DeviceId(1)));
        assert_eq!(
            h.remove_serials(DeviceId(1), &[2]).map(|v| v.len()),
            Some(1)
        );
        assert_eq!(h.holder(&WgPublicKey([5; 32])), None);
        assert!(!h.holds_any(DeviceId(1)));
        assert_eq!(h.remove_serials(DeviceId(1), &[2]), None, "holds nothing");
        consistent(&h);
    }

    #[test]
    fn leases_end_in_order_and_only_those_that_ended() {
        let mut h = HeldLeases::default();
        h.insert(lease(1, 1, 1, 100), 2);
        h.insert(lease(1, 2, 2, 300), 2);
        h.insert(lease(2, 3, 3, 100), 2);
        h.insert(lease(3, 4, 4, 200), 2);
        assert!(h.expire(99).is_empty());
        assert_eq!(
            h.expire(100),
            vec![(DeviceId(1), 1), (DeviceId(2), 1)],
            "the end itself is past"
        );
        assert_eq!(serials(&h, 1), [2]);
        assert!(!h.holds_any(DeviceId(2)));
        assert_eq!(h.next_end(), Some(200));
        assert_eq!(h.expire(1_000), vec![(DeviceId(1), 1), (DeviceId(3), 1)]);
        assert_eq!(h.next_end(), None);
        consistent(&h);
    }

    #[test]
    fn a_removed_device_leaves_no_key_or_end_behind() {
        let mut h = HeldLeases::default();
        h.insert(lease(1, 1, 1, 100), 2);
        h.insert(lease(2, 2, 2, 200), 2);
        assert_eq!(h.remove_device(DeviceId(1)).map(|v| v.len()), Some(1));
        assert_eq!(h.remove_device(DeviceId(1)), None);
        assert_eq!(h.holder(&WgPublicKey([1; 32])), None);
        assert_eq!(h.next_end(), Some(200));
        consistent(&h);
    }

    #[test]
    fn a_conflicting_store_names_the_lowest_holder_until_it_lets_go() {
        let mut h = HeldLeases::new([lease(4, 7, 1, 100), lease(2, 7, 2, 100)], 2);
        assert_eq!(h.holder(&WgPublicKey([7; 32])), Some(DeviceId(2)));
        h.remove_device(DeviceId(2));
        assert_eq!(h.holder(&WgPublicKey([7; 32])), Some(DeviceId(4)));
        consistent(&h);
    }
}
