//! The peers a device on demand holds (protocol 4): a session whose device may talk with more
//! peers than the coordinator lists in full is sent only the peers it asked for (and those
//! that asked for it), bounded by [`MAX_HELD_PEERS`]; past the bound the peer wanted longest
//! ago is let go. Holding a peer grants nothing: the netmap is always what policy allows
//! intersected with what is held, so a held peer the policy no longer allows is simply not
//! sent, and comes back if the policy allows it again.
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;

use ward_shared::wire::{DeviceId, MAX_HELD_PEERS};

/// How a session's netmaps list peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PeerMode {
    /// Not decided until the session's first netmap: the peers the device's `hello` said it
    /// holds (kept if the session turns out to be on demand).
    Undecided(Vec<DeviceId>),
    /// Every peer policy allows (protocol 1–3, or few enough peers).
    Full,
    /// Only the held peers policy allows.
    OnDemand(Held),
}

impl Default for PeerMode {
    fn default() -> Self {
        PeerMode::Undecided(Vec::new())
    }
}

impl PeerMode {
    /// The held set, on demand.
    pub(super) fn held(&self) -> Option<&Held> {
        match self {
            PeerMode::OnDemand(h) => Some(h),
            PeerMode::Undecided(_) | PeerMode::Full => None,
        }
    }
}

/// The peers one session holds, least recently wanted first out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Held {
    /// Each held peer and the tick it was last wanted at.
    by_id: BTreeMap<DeviceId, u64>,
    /// The same, by tick (ticks are unique).
    by_tick: BTreeMap<u64, DeviceId>,
    tick: u64,
}

impl Held {
    /// Holds `ids` (the first [`MAX_HELD_PEERS`] distinct ones, in order).
    pub(super) fn new(ids: impl IntoIterator<Item = DeviceId>) -> Self {
        let mut h = Held::default();
        for id in ids {
            if h.by_id.len() >= MAX_HELD_PEERS {
                break;
            }
            if !h.by_id.contains_key(&id) {
                h.hold(id);
            }
        }
        h
    }

    pub(super) fn contains(&self, id: &DeviceId) -> bool {
        self.by_id.contains_key(id)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The held peers, by id.
    pub(super) fn ids(&self) -> impl Iterator<Item = &DeviceId> + '_ {
        self.by_id.keys()
    }

    /// Holds `id` as the most recently wanted peer; returns the peer let go to stay within
    /// [`MAX_HELD_PEERS`], if any.
    pub(super) fn hold(&mut self, id: DeviceId) -> Option<DeviceId> {
        self.tick += 1;
        if let Some(old) = self.by_id.insert(id, self.tick) {
            self.by_tick.remove(&old);
        }
        self.by_tick.insert(self.tick, id);
        if self.by_id.len() <= MAX_HELD_PEERS {
            return None;
        }
        let (_, oldest) = self.by_tick.pop_first()?;
        self.by_id.remove(&oldest);
        Some(oldest)
    }

    /// Lets go of `id` (a device that left the network).
    pub(super) fn release(&mut self, id: DeviceId) {
        if let Some(t) = self.by_id.remove(&id) {
            self.by_tick.remove(&t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_the_peer_wanted_longest_ago_goes() {
        let mut h = Held::new((1..=MAX_HELD_PEERS as u64).map(DeviceId));
        assert_eq!(h.len(), MAX_HELD_PEERS);
        // Wanting 1 again makes 2 the oldest.
        assert_eq!(h.hold(DeviceId(1)), None);
        assert_eq!(h.hold(DeviceId(5000)), Some(DeviceId(2)));
        assert!(h.contains(&DeviceId(1)) && h.contains(&DeviceId(5000)));
        assert!(!h.contains(&DeviceId(2)));
        assert_eq!(h.len(), MAX_HELD_PEERS);
        assert_eq!(h.by_tick.len(), h.by_id.len());
    }

    #[test]
    fn a_hello_list_is_bounded_and_deduplicated() {
        let ids = [3, 3, 1].into_iter().chain(10..5000).map(DeviceId);
        let h = Held::new(ids);
        assert_eq!(h.len(), MAX_HELD_PEERS);
        assert!(h.contains(&DeviceId(3)) && h.contains(&DeviceId(1)));
        let ids: Vec<u64> = h.ids().take(3).map(|d| d.0).collect();
        assert_eq!(ids, vec![1, 3, 10]);
    }

    #[test]
    fn release_forgets_a_peer() {
        let mut h = Held::new([DeviceId(1), DeviceId(2)]);
        h.release(DeviceId(1));
        h.release(DeviceId(9));
        assert!(!h.contains(&DeviceId(1)));
        assert_eq!(h.len(), 1);
        assert_eq!(h.by_tick.len(), 1);
        assert_eq!(PeerMode::OnDemand(h.clone()).held(), Some(&h));
        assert_eq!(PeerMode::Full.held(), None);
    }
}
