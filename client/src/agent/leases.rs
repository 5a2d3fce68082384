//! Which peer keys may be configured: only keys under a valid lease from the pinned coordinator
//! key, for that peer's addresses, unexpired in coordinator time. The peers are checked again
//! for each netmap (and clock offset); between netmaps only timestamps are compared, until the
//! earliest configured lease ends. A signature is verified once per lease: a lease whose exact
//! fields and signature were verified under the same key before (in the previous check) has
//! only its time window and owner checked again, so a delta that changes one peer costs one
//! signature check, not one per peer.

use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;
use tracing::debug;

use ward_shared::lease::{Lease, LeaseError};
use ward_shared::wire::{DeviceId, Netmap};

use crate::dataplane::PeerConfig;

/// The result of the last full check: valid for one netmap and clock offset, until the
/// earliest configured lease ends.
#[derive(Debug, Clone)]
struct Verified {
    netmap_seq: u64,
    clock_offset_ms: Option<i64>,
    valid_until_ms: i64,
    peers: Vec<PeerConfig>,
}

/// Verified peers, and when each peer of the netmap was first seen (for "unreachable" in the
/// status view).
#[derive(Debug, Default)]
pub struct LeaseCache {
    verified: Option<Verified>,
    first_seen: BTreeMap<DeviceId, Instant>,
    signatures: Signatures,
}

/// Leases whose signature verified under `issuer`, keyed by the signature with the lease
/// compared in full: a lease that differs in anything is verified again. Holds the leases of
/// the last check only.
#[derive(Debug, Default)]
pub struct Signatures {
    issuer: Option<[u8; 32]>,
    /// Signature → the lease it verified for, and the check that last saw it. Nothing is
    /// cloned for a lease seen before.
    good: HashMap<Vec<u8>, (Lease, u64)>,
    round: u64,
}

impl LeaseCache {
    /// The peers to configure for `nm` at `coordinator_now_ms`. No pinned lease key means no
    /// peer can be trusted: none is configured (fail closed).
    pub fn peers(
        &mut self,
        nm: &Netmap,
        issuer: Option<&VerifyingKey>,
        clock_offset_ms: Option<i64>,
        coordinator_now_ms: i64,
        now: Instant,
    ) -> Vec<PeerConfig> {
        // A set first: with thousands of peers, a scan of the peer list per remembered peer
        // (quadratic) cost more than everything else a netmap does.
        let ids: BTreeSet<DeviceId> = nm.peers.iter().map(|p| p.device_id).collect();
        self.first_seen.retain(|id, _| ids.contains(id));
        for p in &nm.peers {
            self.first_seen.entry(p.device_id).or_insert(now);
        }
        if self.still_valid(nm, clock_offset_ms, coordinator_now_ms) {
            if let Some(v) = &self.verified {
                return v.peers.clone();
            }
        }
        let (peers, refused) = match issuer {
            Some(issuer) => {
                leased_peers_cached(nm, issuer, coordinator_now_ms, &mut self.signatures)
            }
            None => (Vec::new(), Vec::new()),
        };
        for (peer, why) in refused {
            debug!(%peer, error = %why, "peer lease not usable");
        }
        // The configured keys as a set: a scan per lease is quadratic in the peers.
        let keys: BTreeSet<[u8; 32]> = peers.iter().map(|c| c.public_key).collect();
        let valid_until_ms = nm
            .peers
            .iter()
            .flat_map(|p| &p.leases)
            .filter(|l| keys.contains(&l.lease.wg_public_key.0))
            .map(|l| l.lease.not_after_ms)
            .min()
            .unwrap_or(i64::MAX);
        self.verified = Some(Verified {
            netmap_seq: nm.seq,
            clock_offset_ms,
            valid_until_ms,
            peers: peers.clone(),
        });
        peers
    }

    /// A new full netmap arrived: check every signature again.
    /// Whether [`LeaseCache::peers`] would give what it gave last, from its cache: the same
    /// netmap sequence and clock offset, and no configured lease ended since. The expiry
    /// tick asks this first, so an unchanged netmap costs a comparison, not a rebuild.
    pub fn still_valid(
        &self,
        nm: &Netmap,
        clock_offset_ms: Option<i64>,
        coordinator_now_ms: i64,
    ) -> bool {
        self.verified.as_ref().is_some_and(|v| {
            v.netmap_seq == nm.seq
                && v.clock_offset_ms == clock_offset_ms
                && coordinator_now_ms < v.valid_until_ms
        })
    }

    pub fn invalidate(&mut self) {
        self.verified = None;
    }

    /// The device left the network.
    pub fn clear(&mut self) {
        self.verified = None;
        self.first_seen.clear();
        self.signatures = Signatures::default();
    }

    /// When the peer first appeared in a netmap.
    pub fn first_seen(&self, id: DeviceId) -> Option<Instant> {
        self.first_seen.get(&id).copied()
    }
}

/// One data-plane entry per peer key that holds a valid lease: signed by `issuer`, for that
/// peer's device id and addresses, and unexpired at `coordinator_now_ms`. Everything else is
/// returned as a refusal (peer hostname, why), never configured.
pub fn leased_peers(
    nm: &Netmap,
    issuer: &VerifyingKey,
    coordinator_now_ms: i64,
) -> (Vec<PeerConfig>, Vec<(String, LeaseError)>) {
    leased_peers_cached(nm, issuer, coordinator_now_ms, &mut Signatures::default())
}

/// [`leased_peers`], verifying only the signatures `sigs` does not hold from the last check
/// under the same key; `sigs` then holds this netmap's leases whose signature verified.
pub fn leased_peers_cached(
    nm: &Netmap,
    issuer: &VerifyingKey,
    coordinator_now_ms: i64,
    sigs: &mut Signatures,
) -> (Vec<PeerConfig>, Vec<(String, LeaseError)>) {
    let key = issuer.to_bytes();
    if sigs.issuer != Some(key) {
        sigs.issuer = Some(key);
        sigs.good.clear();
    }
    sigs.round += 1;
    let round = sigs.round;
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for p in &nm.peers {
        for l in &p.leases {
            let known = match sigs.good.get_mut(&l.signature.0) {
                Some((lease, seen)) if *lease == l.lease => {
                    *seen = round;
                    true
                }
                _ => false,
            };
            let signed = if known {
                Ok(())
            } else {
                l.verify_signature(issuer)
            };
            let checked =
                signed.and_then(|()| l.check_for(coordinator_now_ms, p.device_id, p.ipv4, p.ipv6));
            if checked.is_ok() && !known {
                sigs.good
                    .insert(l.signature.0.clone(), (l.lease.clone(), round));
            }
            match checked {
                Ok(lease) => ok.push(PeerConfig {
                    routes: p.routes.clone(),
                    device_id: p.device_id.0,
                    hostname: p.hostname.to_string(),
                    public_key: lease.wg_public_key.0,
                    ipv4: p.ipv4,
                    ipv6: p.ipv6,
                    endpoints: p.endpoints.clone(),
                    // Only a relay of this netmap's list: a name the relays do not know
                    // would only drop packets.
                    relay: p
                        .relay
                        .clone()
                        .filter(|r| nm.relays.iter().any(|i| &i.name == r)),
                }),
                Err(e) => refused.push((p.hostname.to_string(), e)),
            }
        }
    }
    // Only the leases this netmap holds stay.
    sigs.good.retain(|_, (_, seen)| *seen == round);
    (ok, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use std::net::Ipv4Addr;
    use ward_shared::lease::{Lease, SignedLease};
    use ward_shared::names::Hostname;
    use ward_shared::wire::{DeviceId, Peer, SelfInfo, WgPublicKey};

    fn lease(dev: u64, key: u8, nb: i64, na: i64, ip: u8) -> Lease {
        Lease {
            device_id: DeviceId(dev),
            wg_public_key: WgPublicKey([key; 32]),
            ipv4: Ipv4Addr::new(100, 64, 0, ip),
            ipv6: format!("fd00::{ip}").parse().unwrap(),
            not_before_ms: nb,
            not_after_ms: na,
            serial: key as u64,
        }
    }

    fn netmap(leases: Vec<SignedLease>) -> Netmap {
        Netmap {
            seq: 1,
            me: SelfInfo {
                routes: Default::default(),
                device_id: DeviceId(1),
                hostname: Hostname::parse("me").unwrap(),
                ipv4: Ipv4Addr::new(100, 64, 0, 1),
                ipv6: "fd00::1".parse().unwrap(),
                v6_prefix: "fd00::".parse().unwrap(),
                observed_addr: None,
            },
            peers: vec![Peer {
                routes: Default::default(),
                device_id: DeviceId(2),
                hostname: Hostname::parse("peer").unwrap(),
                user: None,
                tags: vec![],
                ipv4: Ipv4Addr::new(100, 64, 0, 2),
                ipv6: "fd00::2".parse().unwrap(),
                wg_public_key: None,
                endpoints: vec![],
                online: true,
                leases,
                relay: None,
            }],
            inbound: vec![],
            reach: vec![],
            reach_grants: vec![],
            reach_services: vec![],
            relays: vec![],
            punch: false,
            flows: false,
            policy_version: None,
            shadow_filter: None,
            dns_domain: None,
            coordinators: Vec::new(),
            peer_sets: Vec::new(),
        }
    }

    #[test]
    fn remembered_signatures_still_check_fields_time_and_key() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let good = lease(2, 10, 0, 1000, 2).sign(&k);
        let mut sigs = Signatures::default();
        let (ok, _) = leased_peers_cached(
            &netmap(vec![good.clone()]),
            &k.verifying_key(),
            500,
            &mut sigs,
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(sigs.good.len(), 1, "the verified signature is remembered");
        // The same signature over altered fields (a longer lease, another key) is not taken
        // from memory: it is verified, and refused.
        let mut longer = good.clone();
        longer.lease.not_after_ms = 10_000;
        let mut rekeyed = good.clone();
        rekeyed.lease.wg_public_key = WgPublicKey([99; 32]);
        let (ok, refused) = leased_peers_cached(
            &netmap(vec![good.clone(), longer, rekeyed]),
            &k.verifying_key(),
            500,
            &mut sigs,
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].public_key, [10; 32]);
        assert_eq!(refused.len(), 2);
        assert!(refused.iter().all(|(_, e)| *e == LeaseError::BadSignature));
        // A remembered lease still ends on time.
        let (ok, refused) = leased_peers_cached(
            &netmap(vec![good.clone()]),
            &k.verifying_key(),
            1000,
            &mut sigs,
        );
        assert!(ok.is_empty());
        assert!(matches!(refused[0].1, LeaseError::Expired { .. }));
        // Remembered under one key means nothing under another.
        let mut sigs = Signatures::default();
        leased_peers_cached(
            &netmap(vec![good.clone()]),
            &k.verifying_key(),
            500,
            &mut sigs,
        );
        let (ok, refused) =
            leased_peers_cached(&netmap(vec![good]), &other.verifying_key(), 500, &mut sigs);
        assert!(ok.is_empty());
        assert_eq!(refused[0].1, LeaseError::BadSignature);
        assert!(sigs.good.is_empty());
    }

    #[test]
    fn only_valid_leases_become_peers() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let nm = netmap(vec![
            lease(2, 10, 0, 1000, 2).sign(&k),     // valid
            lease(2, 11, 0, 1000, 2).sign(&other), // another coordinator
            lease(2, 12, 0, 400, 2).sign(&k),      // expired at 500
            lease(2, 13, 0, 1000, 9).sign(&k),     // someone else's address
            lease(3, 14, 0, 1000, 2).sign(&k),     // another device's lease
        ]);
        let (ok, refused) = leased_peers(&nm, &k.verifying_key(), 500);
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].public_key, [10; 32]);
        assert_eq!(refused.len(), 4);
        // At 1000 the last valid lease ends too: nothing is configured.
        assert!(leased_peers(&nm, &k.verifying_key(), 1000).0.is_empty());
    }

    #[test]
    fn cache_checks_again_when_the_earliest_lease_ends() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let nm = netmap(vec![
            lease(2, 10, 0, 1000, 2).sign(&k),
            lease(2, 11, 0, 2000, 2).sign(&k),
        ]);
        let now = Instant::now();
        let mut c = LeaseCache::default();
        assert_eq!(
            c.peers(&nm, Some(&k.verifying_key()), None, 500, now).len(),
            2
        );
        assert!(c.first_seen(DeviceId(2)).is_some());
        // Past the first lease's end the cache is not used: one key is left.
        let left = c.peers(&nm, Some(&k.verifying_key()), None, 1500, now);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].public_key, [11; 32]);
        // Without a pinned issuer nothing is trusted.
        c.invalidate();
        assert!(c.peers(&nm, None, None, 500, now).is_empty());
    }
}
