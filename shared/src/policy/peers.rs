//! A device's peers in a compile: a bit set over the compile's device index, shared by every
//! device whose rules reach the same populations. A dense policy makes each of 10 000 devices
//! a peer of thousands of others; as ordered sets of ids those were tens of millions of
//! entries (about a gigabyte), as shared bit sets they are a few hundred allocations of
//! 1.25 KB. The device itself may be a member of the shared bits; it is never a member of its
//! own peers.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::wire::DeviceId;

/// The devices one device may exchange packets with (see [`super::DeviceAccess::peers`]).
#[derive(Clone, Default)]
pub struct Peers {
    /// The device these are the peers of (left out of every answer).
    me: Option<DeviceId>,
    /// The ids bit `i` stands for, ascending (shared by the whole compile).
    index: Arc<[DeviceId]>,
    /// `index.len()` bits, shared by devices that reach the same populations.
    bits: Arc<Vec<u64>>,
}

impl Peers {
    /// The peers of `me` in `bits` over `index` (ids ascending; `bits` may include `me`).
    pub fn new(me: DeviceId, index: Arc<[DeviceId]>, bits: Arc<Vec<u64>>) -> Self {
        debug_assert!(bits.len() >= index.len().div_ceil(64));
        debug_assert!(index.windows(2).all(|w| w[0] < w[1]));
        Peers {
            me: Some(me),
            index,
            bits,
        }
    }

    /// `ids` as the peers of `me` (`None`: of no device in particular), with an index of
    /// their own.
    pub fn from_ids(me: Option<DeviceId>, ids: impl IntoIterator<Item = DeviceId>) -> Self {
        let set: BTreeSet<DeviceId> = ids.into_iter().filter(|i| Some(*i) != me).collect();
        let index: Arc<[DeviceId]> = set.into_iter().collect();
        let mut bits = vec![0u64; index.len().div_ceil(64)];
        for i in 0..index.len() {
            bits[i / 64] |= 1 << (i % 64);
        }
        Peers {
            me,
            index,
            bits: Arc::new(bits),
        }
    }

    pub fn contains(&self, id: &DeviceId) -> bool {
        if Some(*id) == self.me {
            return false;
        }
        self.index.binary_search(id).is_ok_and(|i| self.bit(i))
    }

    /// The peers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = DeviceId> + '_ {
        let me = self.me;
        self.bits
            .iter()
            .enumerate()
            .flat_map(|(k, &w)| {
                let mut w = w;
                std::iter::from_fn(move || {
                    (w != 0).then(|| {
                        let b = w.trailing_zeros() as usize;
                        w &= w - 1;
                        k * 64 + b
                    })
                })
            })
            .filter_map(|i| self.index.get(i).copied())
            .filter(move |id| Some(*id) != me)
    }

    pub fn len(&self) -> usize {
        let all: usize = self.bits.iter().map(|w| w.count_ones() as usize).sum();
        let me_in = self
            .me
            .is_some_and(|m| self.index.binary_search(&m).is_ok_and(|i| self.bit(i)));
        all - usize::from(me_in)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `id` (never `me`): sets its bit (copying bits shared with other devices first),
    /// or, for an id the index lacks, rebuilds these peers over an index of their own.
    pub fn insert(&mut self, id: DeviceId) {
        if Some(id) == self.me {
            return;
        }
        match self.index.binary_search(&id) {
            Ok(i) => {
                if !self.bit(i) {
                    Arc::make_mut(&mut self.bits)[i / 64] |= 1 << (i % 64);
                }
            }
            Err(_) => {
                let ids: Vec<DeviceId> = self.iter().chain([id]).collect();
                *self = Peers::from_ids(self.me, ids);
            }
        }
    }

    fn bit(&self, i: usize) -> bool {
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Some ids of a compile's index, as bits over it ([`Peers::mask`]).
#[derive(Debug, Clone)]
pub struct PeerMask {
    index: Arc<[DeviceId]>,
    bits: Vec<u64>,
}

impl PartialEq for Peers {
    fn eq(&self, other: &Self) -> bool {
        if self.me == other.me && Arc::ptr_eq(&self.index, &other.index) {
            return Arc::ptr_eq(&self.bits, &other.bits) || self.same_words(other);
        }
        self.iter().eq(other.iter())
    }
}

impl Peers {
    /// The ids the bits stand for (shared by the whole compile).
    pub fn index(&self) -> &Arc<[DeviceId]> {
        &self.index
    }

    /// Uses `index` instead of the index held, which must list the same ids (a compile
    /// that indexes the same devices as the one before shares its index, so that equal
    /// peers compare word by word).
    pub fn share_index(&mut self, index: &Arc<[DeviceId]>) {
        debug_assert_eq!(self.index[..], index[..]);
        self.index = Arc::clone(index);
    }

    /// The ids of this peers' index that `keep` accepts, as bits over that index: what
    /// [`Peers::count_above_in`] counts against, for every device of a compile at once.
    pub fn mask(&self, keep: impl Fn(DeviceId) -> bool) -> PeerMask {
        let mut bits = vec![0u64; self.index.len().div_ceil(64)];
        for (i, id) in self.index.iter().enumerate() {
            if keep(*id) {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        PeerMask {
            index: Arc::clone(&self.index),
            bits,
        }
    }

    /// How many peers with an id above `above` are in `mask`, counted word by word; `None`
    /// when `mask` was made over another index (count them one by one then).
    pub fn count_above_in(&self, above: DeviceId, mask: &PeerMask) -> Option<u64> {
        if !Arc::ptr_eq(&self.index, &mask.index) {
            return None;
        }
        let from = self.index.partition_point(|x| *x <= above);
        let me_at = self.me_at();
        let n = (from / 64..self.index.len().div_ceil(64))
            .map(|k| {
                let mut w = self.word(k) & mask.bits[k] & self.valid(k, me_at);
                if k == from / 64 {
                    w &= !0u64 << (from % 64);
                }
                u64::from(w.count_ones())
            })
            .sum();
        Some(n)
    }

    /// Over one index: whether the bits agree, leaving out `me`'s and those past the index.
    fn same_words(&self, other: &Peers) -> bool {
        let me_at = self.me_at();
        (0..self.index.len().div_ceil(64)).all(|k| {
            let valid = self.valid(k, me_at);
            self.word(k) & valid == other.word(k) & valid
        })
    }

    /// `me`'s position in the index, if it is there.
    fn me_at(&self) -> Option<usize> {
        self.me.and_then(|m| self.index.binary_search(&m).ok())
    }

    /// Word `k` of the bits (zero past their end).
    fn word(&self, k: usize) -> u64 {
        self.bits.get(k).copied().unwrap_or(0)
    }

    /// The bits of word `k` that stand for a peer: inside the index, and not `me` (at
    /// `me_at`).
    fn valid(&self, k: usize, me_at: Option<usize>) -> u64 {
        let n = self.index.len();
        let mut mask = if (k + 1) * 64 <= n {
            !0u64
        } else {
            (1u64 << (n - k * 64)) - 1
        };
        if let Some(i) = me_at.filter(|i| i / 64 == k) {
            mask &= !(1u64 << (i % 64));
        }
        mask
    }
}

impl Eq for Peers {}

impl fmt::Debug for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromIterator<DeviceId> for Peers {
    fn from_iter<T: IntoIterator<Item = DeviceId>>(iter: T) -> Self {
        Peers::from_ids(None, iter)
    }
}

impl Extend<DeviceId> for Peers {
    fn extend<T: IntoIterator<Item = DeviceId>>(&mut self, iter: T) {
        for id in iter {
            self.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<DeviceId> {
        v.iter().map(|i| DeviceId(*i)).collect()
    }

    #[test]
    fn shared_bits_answer_for_each_device_without_itself() {
        let index: Arc<[DeviceId]> = ids(&[2, 5, 7, 9, 70]).into();
        // 2, 5 and 70 (bits 0, 1, 4).
        let bits = Arc::new(vec![0b10011u64]);
        let a = Peers::new(DeviceId(5), Arc::clone(&index), Arc::clone(&bits));
        let b = Peers::new(DeviceId(7), Arc::clone(&index), Arc::clone(&bits));
        assert_eq!(a.iter().collect::<Vec<_>>(), ids(&[2, 70]));
        assert_eq!(b.iter().collect::<Vec<_>>(), ids(&[2, 5, 70]));
        assert!(!a.contains(&DeviceId(5)) && b.contains(&DeviceId(5)));
        assert!(!a.contains(&DeviceId(3)) && !a.contains(&DeviceId(9)));
        assert_eq!((a.len(), b.len()), (2, 3));
        assert_eq!(a, ids(&[2, 70]).into_iter().collect::<Peers>());
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "{DeviceId(2), DeviceId(70)}");
    }

    /// Over one index, peers in two allocations are equal exactly when they hold the same
    /// ids: whether `me`'s own bit is set, and bits past the index, do not count; the
    /// answer agrees with comparing their ids one by one.
    #[test]
    fn peers_over_one_index_compare_by_their_words_as_by_their_ids() {
        let index: Arc<[DeviceId]> = (1..=130).map(DeviceId).collect::<Vec<_>>().into();
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let me = DeviceId(1 + rnd() % 130);
            // Random words (past-the-index bits too); the second differs from the first in
            // one bit: anywhere, `me`'s own, past the index, or nowhere.
            let a_words = vec![rnd(), rnd(), rnd()];
            let mut b_words = a_words.clone();
            match rnd() % 4 {
                0 => b_words[(rnd() % 3) as usize] ^= 1 << (rnd() % 64),
                1 => {
                    let i = (me.0 - 1) as usize;
                    b_words[i / 64] ^= 1 << (i % 64);
                }
                2 => b_words[2] ^= 1 << (2 + rnd() % 62),
                _ => {}
            }
            let a = Peers::new(me, Arc::clone(&index), Arc::new(a_words));
            let b = Peers::new(me, Arc::clone(&index), Arc::new(b_words));
            let by_ids = a.iter().eq(b.iter());
            assert_eq!(a == b, by_ids, "{a:?} {b:?}");
        }
        // A compile indexing the same devices shares the index of the one before.
        let other: Arc<[DeviceId]> = (1..=130).map(DeviceId).collect::<Vec<_>>().into();
        let mut c = Peers::new(DeviceId(3), Arc::clone(&other), Arc::new(vec![!0, !0, 3]));
        let d = Peers::new(DeviceId(3), Arc::clone(&index), Arc::new(vec![!0, !0, 3]));
        assert_eq!(c, d);
        c.share_index(&index);
        assert!(Arc::ptr_eq(c.index(), d.index()));
        assert_eq!(c, d);
    }

    /// Counting peers above an id within a mask agrees with counting them one by one, and
    /// a mask over another index is refused.
    #[test]
    fn peers_above_an_id_in_a_mask_count_as_one_by_one() {
        let index: Arc<[DeviceId]> = (1..=150)
            .map(|i| DeviceId(i * 2))
            .collect::<Vec<_>>()
            .into();
        let mut state = 0x0bad_cafe_1234_5678u64;
        let mut rnd = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let me = DeviceId(2 * (1 + rnd() % 150));
            let bits = Arc::new(vec![rnd(), rnd(), !0]);
            let p = Peers::new(me, Arc::clone(&index), bits);
            let cut = rnd() % 7;
            let mask = p.mask(|id| id.0 % 7 != cut);
            let above = DeviceId(rnd() % 310);
            let slow = p.iter().filter(|b| *b > above && b.0 % 7 != cut).count() as u64;
            assert_eq!(
                p.count_above_in(above, &mask),
                Some(slow),
                "{p:?} above {above:?}"
            );
        }
        let other = Peers::from_ids(Some(DeviceId(1)), [DeviceId(2), DeviceId(3)]);
        let mask = other.mask(|_| true);
        let p = Peers::new(DeviceId(2), index, Arc::new(vec![!0, !0, !0]));
        assert_eq!(p.count_above_in(DeviceId(0), &mask), None);
        assert_eq!(other.count_above_in(DeviceId(0), &mask), Some(2));
    }

    #[test]
    fn insert_copies_shared_bits_and_grows_the_index_when_it_must() {
        let index: Arc<[DeviceId]> = ids(&[1, 2, 3]).into();
        let bits = Arc::new(vec![0b001u64]);
        let mut a = Peers::new(DeviceId(3), Arc::clone(&index), Arc::clone(&bits));
        let b = Peers::new(DeviceId(2), Arc::clone(&index), Arc::clone(&bits));
        a.insert(DeviceId(2));
        a.insert(DeviceId(3));
        assert_eq!(a.iter().collect::<Vec<_>>(), ids(&[1, 2]));
        assert_eq!(
            b.iter().collect::<Vec<_>>(),
            ids(&[1]),
            "b's bits are untouched"
        );
        a.insert(DeviceId(40));
        assert_eq!(a.iter().collect::<Vec<_>>(), ids(&[1, 2, 40]));
        assert!(!a.contains(&DeviceId(3)));
        let mut d = Peers::default();
        assert!(d.is_empty());
        d.extend(ids(&[4, 1, 4]));
        assert_eq!(d.iter().collect::<Vec<_>>(), ids(&[1, 4]));
    }
}
