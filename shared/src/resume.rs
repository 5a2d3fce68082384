//! Resuming a netmap on a new control session: the device says what it holds, the
//! coordinator leaves out of the first netmap what the device has already.
//!
//! A device keeps its netmap when its session ends (its tunnels run on their leases), so when
//! it reconnects (a coordinator restart, a network change, a laptop waking) it already holds
//! nearly everything the new session's first netmap would carry. Without this, a coordinator
//! restart sends every device every one of its peers again: about 90 KB per device at 10 000
//! devices with about 230 peers each, 900 MB in all, most of it what the devices hold.
//!
//! The exchange, per session:
//! 1. The device's `hello` carries a [`Holding`]: its netmap's peers split into `n` buckets by
//!    device id (`id mod n`, `n` a power of two), one 128-bit digest per bucket (SHA-256 over
//!    each peer's SHA-256 in id order; a peer's SHA-256 is over its JSON as the wire writes
//!    it). Its size depends on `n` only, which the device picks from its peer count (at most
//!    [`MAX_BUCKETS`]: 16 KB of digests, 22 KB in base64), so a hello stays small whatever
//!    the netmap.
//! 2. The coordinator computes the same digests over the netmap it would send
//!    ([`resume`]). A bucket whose digest matches holds exactly the same peers on both sides;
//!    its peers are left out. The netmap says which buckets it carries ([`Resumed`]).
//! 3. The device replaces its peers in the carried buckets with the netmap's, keeps its own in
//!    the others ([`merge`]); everything else in the netmap (filter, peer sets, reach) is whole
//!    as always.
//!
//! What a wrong digest can do: a device that lies about what it holds only withholds peers
//! from itself or keeps ones it was not sent; its peers still enforce their own filters and
//! every lease still expires. A device whose merge fails (a carried peer outside the carried
//! buckets, a bucket count it did not ask for) drops the session and asks for a whole netmap
//! next time. An older coordinator ignores `hello.holding` and sends whole netmaps; an older
//! device sends none and gets them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wire::{Bytes, DeviceId, Peer};

/// The most buckets a [`Holding`] may have (16 KB of digests).
pub const MAX_BUCKETS: usize = 1024;
/// Bytes of each bucket's digest.
pub const DIGEST_LEN: usize = 16;

/// What a device holds of its netmap's peers, per bucket (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// The buckets' digests, [`DIGEST_LEN`] bytes each, bucket 0 first.
    pub buckets: Bytes,
}

/// What a resumed netmap carries: the peers of these buckets (out of `buckets`); the device
/// keeps its own peers of every other bucket.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resumed {
    /// How many buckets the device's holding had.
    pub buckets: u32,
    /// The buckets whose peers this netmap carries (all of them, possibly none).
    #[serde(default)]
    pub sent: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("holding of {0} bytes is not a whole number of {DIGEST_LEN}-byte digests")]
    Ragged(usize),
    #[error("holding of {0} buckets: the count must be a power of two from 1 to {MAX_BUCKETS}")]
    BucketCount(usize),
    #[error("resumed netmap for {got} buckets, but this device said it holds {held}")]
    OtherBuckets { held: u32, got: u32 },
    #[error("resumed netmap names bucket {0}, beyond its bucket count")]
    NoSuchBucket(u32),
    #[error("resumed netmap carries peer {0} outside the buckets it says it carries")]
    Stray(DeviceId),
}

/// One peer's digest: SHA-256 over its JSON (as [`crate::wire::encode`] writes it).
pub fn peer_digest(p: &Peer) -> [u8; 32] {
    // Writing our own plain struct to JSON cannot fail; if it ever did, the digest of nothing
    // would match no real peer's, and the peer would be sent whole.
    let json = serde_json::to_vec(p).unwrap_or_default();
    digest_json(&json)
}

/// SHA-256 of a peer's JSON.
pub fn digest_json(json: &[u8]) -> [u8; 32] {
    Sha256::digest(json).into()
}

/// The bucket of `id` among `n` (a power of two).
pub fn bucket(id: DeviceId, n: u32) -> u32 {
    (id.0 & u64::from(n.saturating_sub(1))) as u32
}

impl Holding {
    /// What a device holding `peers` says it holds: about one bucket per peer (a power of
    /// two, at most [`MAX_BUCKETS`]), so one changed peer costs about itself.
    pub fn of(peers: &[Peer]) -> Holding {
        let n = peers.len().clamp(1, MAX_BUCKETS).next_power_of_two();
        let digests = bucket_digests(peers.iter().map(|p| (p.device_id, peer_digest(p))), n);
        Holding {
            buckets: Bytes(digests.concat()),
        }
    }

    /// The number of buckets, once the holding is checked to be well formed.
    pub fn count(&self) -> Result<u32, ResumeError> {
        let len = self.buckets.0.len();
        if !len.is_multiple_of(DIGEST_LEN) {
            return Err(ResumeError::Ragged(len));
        }
        let n = len / DIGEST_LEN;
        if n == 0 || n > MAX_BUCKETS || !n.is_power_of_two() {
            return Err(ResumeError::BucketCount(n));
        }
        Ok(n as u32)
    }

    fn digest(&self, b: u32) -> &[u8] {
        let at = b as usize * DIGEST_LEN;
        &self.buckets.0[at..at + DIGEST_LEN]
    }
}

/// Each bucket's digest over `(id, peer digest)` pairs, `n` buckets.
fn bucket_digests(
    peers: impl Iterator<Item = (DeviceId, [u8; 32])>,
    n: usize,
) -> Vec<[u8; DIGEST_LEN]> {
    let mut by_bucket: Vec<Vec<(DeviceId, [u8; 32])>> = vec![Vec::new(); n];
    for (id, d) in peers {
        by_bucket[bucket(id, n as u32) as usize].push((id, d));
    }
    by_bucket
        .into_iter()
        .map(|mut ps| {
            ps.sort_by_key(|(id, _)| *id);
            let mut h = Sha256::new();
            for (_, d) in &ps {
                h.update(d);
            }
            let full: [u8; 32] = h.finalize().into();
            let mut out = [0u8; DIGEST_LEN];
            out.copy_from_slice(&full[..DIGEST_LEN]);
            out
        })
        .collect()
}

/// Leaves out of `peers` (a netmap about to be sent) those of every bucket the device holds
/// exactly; `digest` gives each peer's digest ([`peer_digest`], or the same from a cache).
/// Returns what the netmap must say it carries, or `None` when no bucket with peers matched
/// (the netmap is then sent whole, as to a device that holds nothing).
pub fn resume(
    peers: &mut Vec<Peer>,
    holding: &Holding,
    mut digest: impl FnMut(&Peer) -> [u8; 32],
) -> Result<Option<Resumed>, ResumeError> {
    let n = holding.count()?;
    let ours = bucket_digests(peers.iter().map(|p| (p.device_id, digest(p))), n as usize);
    let mut sent = Vec::new();
    let mut kept = vec![false; n as usize];
    for (b, d) in ours.iter().enumerate() {
        if holding.digest(b as u32) == d.as_slice() {
            kept[b] = true;
        } else {
            sent.push(b as u32);
        }
    }
    let before = peers.len();
    peers.retain(|p| !kept[bucket(p.device_id, n) as usize]);
    if peers.len() == before {
        return Ok(None);
    }
    Ok(Some(Resumed { buckets: n, sent }))
}

/// The device's side: `carried` (a resumed netmap's peers) and what it keeps of `held` (its
/// own peers) make the netmap's whole peer list, sorted by id. `asked` is the bucket count of
/// the holding this device sent.
pub fn merge(
    held: &[Peer],
    carried: Vec<Peer>,
    r: &Resumed,
    asked: Option<u32>,
) -> Result<Vec<Peer>, ResumeError> {
    if asked != Some(r.buckets) {
        return Err(ResumeError::OtherBuckets {
            held: asked.unwrap_or(0),
            got: r.buckets,
        });
    }
    let n = r.buckets;
    let mut sent = vec![false; n as usize];
    for &b in &r.sent {
        *sent
            .get_mut(b as usize)
            .ok_or(ResumeError::NoSuchBucket(b))? = true;
    }
    if let Some(p) = carried
        .iter()
        .find(|p| !sent[bucket(p.device_id, n) as usize])
    {
        return Err(ResumeError::Stray(p.device_id));
    }
    let mut all = carried;
    all.extend(
        held.iter()
            .filter(|p| !sent[bucket(p.device_id, n) as usize])
            .cloned(),
    );
    all.sort_by_key(|p| p.device_id);
    all.dedup_by_key(|p| p.device_id);
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Hostname;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn peer(id: u64) -> Peer {
        Peer {
            device_id: DeviceId(id),
            hostname: Hostname::parse(&format!("dev{id}")).unwrap(),
            user: Some("alice".into()),
            tags: vec![],
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: Ipv6Addr::LOCALHOST,
            wg_public_key: None,
            endpoints: vec![format!("192.0.2.1:{}", 1000 + id).parse().unwrap()],
            online: true,
            leases: vec![],
            relay: None,
            routes: vec![],
        }
    }

    /// The coordinator's side then the device's, as the wire carries them.
    fn round_trip(held: &[Peer], now: &[Peer]) -> (Vec<Peer>, Option<Resumed>, usize) {
        let holding = Holding::of(held);
        let asked = holding.count().ok();
        let mut carried = now.to_vec();
        let r = resume(&mut carried, &holding, peer_digest).unwrap();
        let sent = carried.len();
        let merged = match &r {
            Some(r) => merge(held, carried, r, asked).unwrap(),
            None => carried,
        };
        (merged, r, sent)
    }

    #[test]
    fn an_unchanged_netmap_carries_no_peer_and_the_device_keeps_all() {
        let peers: Vec<Peer> = (1..=100).map(peer).collect();
        let (merged, r, sent) = round_trip(&peers, &peers);
        assert_eq!(sent, 0);
        assert_eq!(r.unwrap().sent, Vec::<u32>::new());
        assert_eq!(merged, peers);
    }

    #[test]
    fn only_the_buckets_of_changed_added_and_removed_peers_are_carried() {
        let held: Vec<Peer> = (1..=100).map(peer).collect();
        let mut now = held.clone();
        now[9].endpoints.clear(); // device 10 changed
        now.retain(|p| p.device_id != DeviceId(20)); // device 20 left
        now.push(peer(120)); // device 120 joined (bucket 120 held nothing)
        now.sort_by_key(|p| p.device_id);
        let (merged, r, sent) = round_trip(&held, &now);
        assert_eq!(
            merged, now,
            "the device ends with exactly the coordinator's peers"
        );
        let r = r.unwrap();
        assert_eq!(r.buckets, 128);
        assert_eq!(r.sent, vec![10, 20, 120]);
        assert_eq!(
            sent, 2,
            "the changed and the new peer; the departed needs none"
        );
    }

    #[test]
    fn a_lease_or_online_flag_change_is_a_change() {
        let held: Vec<Peer> = (1..=8).map(peer).collect();
        let mut now = held.clone();
        now[3].online = false;
        let (merged, r, _) = round_trip(&held, &now);
        assert_eq!(merged, now);
        assert_eq!(r.unwrap().sent, vec![4]);
    }

    #[test]
    fn nothing_in_common_is_sent_whole() {
        let held: Vec<Peer> = (1..=8).map(peer).collect();
        let now: Vec<Peer> = (9..=16).map(peer).collect();
        let (merged, r, sent) = round_trip(&held, &now);
        assert!(r.is_none(), "no bucket with peers matched");
        assert_eq!((merged, sent), (now, 8));
        // A device that holds nothing matches only empty buckets.
        let (merged, r, _) = round_trip(&[], &held);
        assert!(r.is_none());
        assert_eq!(merged, held);
    }

    #[test]
    fn bucket_counts_are_powers_of_two_and_bounded() {
        for (peers, n) in [(0, 1), (1, 1), (3, 4), (100, 128), (5000, MAX_BUCKETS)] {
            let ps: Vec<Peer> = (1..=peers).map(peer).collect();
            assert_eq!(
                Holding::of(&ps).count().unwrap() as usize,
                n,
                "{peers} peers"
            );
        }
        let bad = |len: usize| Holding {
            buckets: Bytes(vec![0; len]),
        };
        assert_eq!(bad(17).count(), Err(ResumeError::Ragged(17)));
        assert_eq!(bad(0).count(), Err(ResumeError::BucketCount(0)));
        assert_eq!(
            bad(3 * DIGEST_LEN).count(),
            Err(ResumeError::BucketCount(3))
        );
        assert_eq!(
            bad(2048 * DIGEST_LEN).count(),
            Err(ResumeError::BucketCount(2048))
        );
        let mut ps = vec![peer(1)];
        assert!(resume(&mut ps, &bad(5), peer_digest).is_err());
    }

    #[test]
    fn a_merge_that_does_not_fit_the_holding_is_refused() {
        let held: Vec<Peer> = (1..=4).map(peer).collect();
        let r = Resumed {
            buckets: 4,
            sent: vec![1],
        };
        assert_eq!(
            merge(&held, vec![], &r, Some(8)),
            Err(ResumeError::OtherBuckets { held: 8, got: 4 })
        );
        assert_eq!(
            merge(&held, vec![], &r, None),
            Err(ResumeError::OtherBuckets { held: 0, got: 4 })
        );
        let beyond = Resumed {
            buckets: 4,
            sent: vec![4],
        };
        assert_eq!(
            merge(&held, vec![], &beyond, Some(4)),
            Err(ResumeError::NoSuchBucket(4))
        );
        // Peer 2 is in bucket 2, which the netmap does not say it carries.
        assert_eq!(
            merge(&held, vec![peer(2)], &r, Some(4)),
            Err(ResumeError::Stray(DeviceId(2)))
        );
        // Bucket 1 carried empty: the device drops its peer 1 (and 5 would go too).
        assert_eq!(
            merge(&held, vec![], &r, Some(4)).unwrap(),
            vec![peer(2), peer(3), peer(4)]
        );
    }

    #[test]
    fn the_coordinators_cached_digest_is_the_devices() {
        let mut cache = crate::wire::PeerJson::default();
        let mut p = peer(3);
        assert_eq!(cache.digest(&p), peer_digest(&p));
        assert_eq!(cache.digest(&p), peer_digest(&p), "from the cache");
        p.online = false;
        assert_eq!(
            cache.digest(&p),
            peer_digest(&p),
            "a changed peer, hashed afresh"
        );
        p.routes = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            cache.digest(&p),
            peer_digest(&p),
            "a peer the cache does not keep"
        );
    }

    #[test]
    fn the_digest_is_of_the_json_the_wire_writes() {
        let p = peer(7);
        let framed = crate::wire::encode(&p);
        assert_eq!(peer_digest(&p), digest_json(&framed[4..]));
    }
}
