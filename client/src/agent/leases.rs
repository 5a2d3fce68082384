//! Which peer keys may be configured: only keys under a valid lease from the pinned coordinator
//! key, for that peer's addresses, unexpired in coordinator time.
//!
//! The cache keeps, per peer device, the leases whose signature verified and the data-plane
//! entries they gave. A full netmap checks every peer again, but a lease whose exact fields
//! and signature verified before under the same key has only its time window and owner
//! checked again. A delta checks only the devices it names ([`LeaseCache::update`]), so one
//! peer's change costs one peer's work, whatever the number of peers.
//!
//! Each check holds for a window of coordinator time: from the latest lease start or end at
//! or before the time it was made, up to the earliest one after (kept per device in ordered
//! sets, so they follow every delta exactly). Between netmaps only timestamps are compared,
//! so a new clock offset (every ping measures one) costs nothing while coordinator time stays
//! inside the window, and checks again once it crosses a lease's start or end, either way.

use ed25519_dalek::VerifyingKey;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use tracing::debug;

use ward_shared::lease::{verify_signatures, LeaseError, SignedLease, NOT_BEFORE_SKEW_MS};
use ward_shared::wire::{DeviceId, Netmap, NetmapDelta, Peer, RelayInfo};

use crate::dataplane::PeerConfig;

/// The data-plane entries per peer device (a device has two while it rotates its key).
pub type PeerMap = BTreeMap<u64, Vec<PeerConfig>>;

/// What the last check found for one peer device.
#[derive(Debug, Clone, Default)]
struct Checked {
    /// The device's leases whose signature verified under the cache's issuer.
    signed: Vec<SignedLease>,
    /// One entry per usable lease.
    configs: Vec<PeerConfig>,
    /// The latest start or end of a signed lease at or before the check's time (`i64::MIN`
    /// with none): before it, the same leases give another answer.
    from_ms: i64,
    /// The earliest start or end of a signed lease after the check's time (`i64::MAX` with
    /// none): from then on, the same leases give another answer.
    until_ms: i64,
}

/// Verified peers, and when each peer of the netmap was first seen (for "unreachable" in the
/// status view).
#[derive(Debug, Default)]
pub struct LeaseCache {
    /// The key the remembered signatures verified under.
    issuer: Option<[u8; 32]>,
    devices: BTreeMap<DeviceId, Checked>,
    /// Every device's `until_ms`, to know the earliest at once.
    ends: BTreeSet<(i64, DeviceId)>,
    /// The first of `ends` (`i64::MAX` with none), kept beside it: the agent reads it after
    /// every lease change to know when to look again.
    earliest_end_ms: i64,
    /// Every device's `from_ms`, to know the latest at once.
    starts: BTreeSet<(i64, DeviceId)>,
    /// The last of `starts` (`i64::MIN` with none).
    latest_start_ms: i64,
    /// The netmap sequence `devices` answers for; `None` once a new full netmap arrived (the
    /// entries then only serve as remembered signatures).
    current: Option<u64>,
    /// How many times every peer was checked ([`LeaseCache::peers`] without a cached answer).
    full_checks: u64,
    first_seen: BTreeMap<DeviceId, Instant>,
}

impl LeaseCache {
    /// The peers to configure for `nm` at `coordinator_now_ms`, checking every peer. No
    /// pinned lease key means no peer can be trusted: none is configured (fail closed).
    pub fn peers(
        &mut self,
        nm: &Netmap,
        issuer: Option<&VerifyingKey>,
        coordinator_now_ms: i64,
        now: Instant,
    ) -> PeerMap {
        // A set first: with thousands of peers, a scan of the peer list per remembered peer
        // (quadratic) cost more than everything else a netmap does.
        let ids: BTreeSet<DeviceId> = nm.peers.iter().map(|p| p.device_id).collect();
        self.first_seen.retain(|id, _| ids.contains(id));
        for p in &nm.peers {
            self.first_seen.entry(p.device_id).or_insert(now);
        }
        if self.still_valid(nm, coordinator_now_ms) {
            return self.configured();
        }
        self.full_checks += 1;
        let Some(issuer) = issuer else {
            self.clear_checks();
            return PeerMap::new();
        };
        self.use_issuer(issuer);
        let mut old = std::mem::take(&mut self.devices);
        self.ends.clear();
        self.starts.clear();
        // Every signature not verified before, in one batch: a full netmap of thousands of
        // peers (a first one, or one after a new key) costs a fraction of one verification
        // each.
        let fresh: Vec<&SignedLease> = nm
            .peers
            .iter()
            .flat_map(|p| {
                let before = old.get(&p.device_id);
                p.leases
                    .iter()
                    .filter(move |l| !before.is_some_and(|b| b.signed.contains(l)))
            })
            .collect();
        let verdicts = verify_signatures(&fresh, issuer);
        let checked: Checks = fresh
            .iter()
            .zip(verdicts)
            .map(|(l, ok)| (std::ptr::from_ref(*l) as usize, ok))
            .collect();
        for p in &nm.peers {
            let before = old.remove(&p.device_id);
            let c = check_peer(
                p,
                &nm.relays,
                issuer,
                coordinator_now_ms,
                before.as_ref(),
                &checked,
            );
            self.devices
                .entry(p.device_id)
                .and_modify(|d| {
                    // The same device listed twice (never sent): both lists count.
                    d.signed.extend(c.signed.iter().cloned());
                    d.configs.extend(c.configs.iter().cloned());
                    d.from_ms = d.from_ms.max(c.from_ms);
                    d.until_ms = d.until_ms.min(c.until_ms);
                })
                .or_insert(c);
        }
        self.ends = self
            .devices
            .iter()
            .map(|(id, c)| (c.until_ms, *id))
            .collect();
        self.starts = self
            .devices
            .iter()
            .map(|(id, c)| (c.from_ms, *id))
            .collect();
        self.current = Some(nm.seq);
        self.ends_changed();
        self.configured()
    }

    /// After `delta` was applied to `nm`: the changed devices' entries (empty for a device
    /// that has none any more), checking only the devices the delta names. `None` when the
    /// cache cannot answer from the last check (another netmap, coordinator time outside the
    /// window the last check holds for, the relay list changed, no pinned key): then
    /// [`LeaseCache::peers`] must.
    pub fn update(
        &mut self,
        nm: &Netmap,
        delta: &NetmapDelta,
        issuer: Option<&VerifyingKey>,
        coordinator_now_ms: i64,
        now: Instant,
    ) -> Option<Vec<(u64, Vec<PeerConfig>)>> {
        let issuer = issuer?;
        if self.current != Some(delta.base_seq)
            || !self.holds_at(coordinator_now_ms)
            || delta.relays.is_some()
            || self.issuer != Some(issuer.to_bytes())
        {
            return None;
        }
        let mut changed = Vec::new();
        let upserted: BTreeSet<DeviceId> = delta.upsert.iter().map(|p| p.device_id).collect();
        for id in delta.remove.iter().filter(|id| !upserted.contains(id)) {
            if let Some(c) = self.devices.remove(id) {
                self.ends.remove(&(c.until_ms, *id));
                self.starts.remove(&(c.from_ms, *id));
                changed.push((id.0, Vec::new()));
            }
            self.first_seen.remove(id);
        }
        for p in &delta.upsert {
            let before = self.devices.remove(&p.device_id);
            if let Some(b) = &before {
                self.ends.remove(&(b.until_ms, p.device_id));
                self.starts.remove(&(b.from_ms, p.device_id));
            }
            let c = check_peer(
                p,
                &nm.relays,
                issuer,
                coordinator_now_ms,
                before.as_ref(),
                &Checks::new(),
            );
            self.ends.insert((c.until_ms, p.device_id));
            self.starts.insert((c.from_ms, p.device_id));
            self.first_seen.entry(p.device_id).or_insert(now);
            changed.push((p.device_id.0, c.configs.clone()));
            self.devices.insert(p.device_id, c);
        }
        self.current = Some(nm.seq);
        self.ends_changed();
        Some(changed)
    }

    /// Whether [`LeaseCache::peers`] would give what it gave last, from its cache: the same
    /// netmap sequence, and coordinator time still inside the window the last check holds
    /// for (no lease started or ended since, and time did not go back before one did). The
    /// expiry tick and every new clock offset ask this first, so an unchanged netmap costs a
    /// comparison, not a rebuild.
    pub fn still_valid(&self, nm: &Netmap, coordinator_now_ms: i64) -> bool {
        self.current == Some(nm.seq) && self.holds_at(coordinator_now_ms)
    }

    /// How many times every peer was checked: each full netmap, new lease key, or
    /// coordinator time outside the cached window, but not a delta or an unchanged look.
    pub fn full_checks(&self) -> u64 {
        self.full_checks
    }

    /// A new full netmap arrived: check every peer again (remembered signatures still count).
    pub fn invalidate(&mut self) {
        self.current = None;
    }

    /// The device left the network.
    pub fn clear(&mut self) {
        self.clear_checks();
        self.first_seen.clear();
    }

    /// When the peer first appeared in a netmap.
    pub fn first_seen(&self, id: DeviceId) -> Option<Instant> {
        self.first_seen.get(&id).copied()
    }

    fn clear_checks(&mut self) {
        self.issuer = None;
        self.devices.clear();
        self.ends.clear();
        self.starts.clear();
        self.ends_changed();
        self.current = None;
    }

    fn ends_changed(&mut self) {
        self.earliest_end_ms = self.ends.first().map_or(i64::MAX, |(t, _)| *t);
        self.latest_start_ms = self.starts.last().map_or(i64::MIN, |(t, _)| *t);
    }

    /// Remembered signatures count only under the key they verified under.
    fn use_issuer(&mut self, issuer: &VerifyingKey) {
        let key = issuer.to_bytes();
        if self.issuer != Some(key) {
            self.clear_checks();
            self.issuer = Some(key);
        }
    }

    /// Whether every device's last check holds at `coordinator_now_ms`.
    fn holds_at(&self, coordinator_now_ms: i64) -> bool {
        (self.latest_start_ms..self.earliest_end_ms).contains(&coordinator_now_ms)
    }

    /// The earliest time, in coordinator ms, at which a device's configured leases change by
    /// the clock alone (see `Checked::until_ms`; `i64::MAX` if none will).
    pub fn earliest_end_ms(&self) -> i64 {
        self.earliest_end_ms
    }

    fn configured(&self) -> PeerMap {
        self.devices
            .iter()
            .filter(|(_, c)| !c.configs.is_empty())
            .map(|(id, c)| (id.0, c.configs.clone()))
            .collect()
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
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for p in &nm.peers {
        let (c, r) = check_leases(
            p,
            &nm.relays,
            issuer,
            coordinator_now_ms,
            None,
            &Checks::new(),
        );
        ok.extend(c.configs);
        refused.extend(r);
    }
    (ok, refused)
}

/// Signatures already checked in a batch, by the address of the lease in the netmap being
/// checked, and whether each verified.
type Checks = BTreeMap<usize, bool>;

/// [`check_leases`], logging the refusals.
fn check_peer(
    p: &Peer,
    relays: &[RelayInfo],
    issuer: &VerifyingKey,
    coordinator_now_ms: i64,
    before: Option<&Checked>,
    checked: &Checks,
) -> Checked {
    let (c, refused) = check_leases(p, relays, issuer, coordinator_now_ms, before, checked);
    for (peer, why) in refused {
        debug!(%peer, error = %why, "peer lease not usable");
    }
    c
}

/// One peer's leases: a lease `before` holds as verified (the same fields and signature) is
/// not verified again, nor one whose signature `checked` answers for; its time window and
/// owner always are.
fn check_leases(
    p: &Peer,
    relays: &[RelayInfo],
    issuer: &VerifyingKey,
    coordinator_now_ms: i64,
    before: Option<&Checked>,
    checked: &Checks,
) -> (Checked, Vec<(String, LeaseError)>) {
    let mut c = Checked {
        from_ms: i64::MIN,
        until_ms: i64::MAX,
        ..Checked::default()
    };
    let mut refused = Vec::new();
    for l in &p.leases {
        let known = before.is_some_and(|b| b.signed.iter().any(|s| s == l));
        let signed = if known {
            Ok(())
        } else {
            match checked.get(&(std::ptr::from_ref(l) as usize)) {
                Some(true) => Ok(()),
                Some(false) => Err(LeaseError::BadSignature),
                None => l.verify_signature(issuer),
            }
        };
        if signed.is_ok() {
            c.signed.push(l.clone());
            // Usable from its start (with the skew allowed) to its end, so the answer for
            // this lease changes only where coordinator time crosses one of the two, forward
            // or back; an inverted lease is refused whatever the time.
            let starts = l.lease.not_before_ms.saturating_sub(NOT_BEFORE_SKEW_MS);
            if l.lease.not_before_ms < l.lease.not_after_ms {
                for edge in [starts, l.lease.not_after_ms] {
                    if edge > coordinator_now_ms {
                        c.until_ms = c.until_ms.min(edge);
                    } else {
                        c.from_ms = c.from_ms.max(edge);
                    }
                }
            }
        }
        match signed.and_then(|()| l.check_for(coordinator_now_ms, p.device_id, p.ipv4, p.ipv6)) {
            Ok(lease) => {
                c.configs.push(PeerConfig {
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
                        .filter(|r| relays.iter().any(|i| &i.name == r)),
                })
            }
            Err(e) => refused.push((p.hostname.to_string(), e)),
        }
    }
    (c, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use std::net::Ipv4Addr;
    use ward_shared::lease::{Lease, SignedLease};
    use ward_shared::names::Hostname;
    use ward_shared::wire::{SelfInfo, WgPublicKey};

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
            resumed: None,
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
            inbound: vec![].into(),
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
            peer_sets: Vec::new().into(),
            on_demand: false,
        }
    }

    fn delta(base: u64, upsert: Vec<Peer>, remove: Vec<DeviceId>) -> NetmapDelta {
        NetmapDelta {
            upsert,
            remove,
            ..NetmapDelta::after(base)
        }
    }

    fn keys(m: &PeerMap) -> Vec<[u8; 32]> {
        m.values().flatten().map(|c| c.public_key).collect()
    }

    /// A netmap of `n` peers (devices 2 to n+1), one lease each, signed by `k`.
    fn many(k: &SigningKey, n: u8) -> Netmap {
        let mut nm = netmap(Vec::new());
        let template = nm.peers.remove(0);
        for i in 0..n {
            let dev = u64::from(i) + 2;
            let ip = i + 2;
            let mut p = template.clone();
            p.device_id = DeviceId(dev);
            p.ipv4 = Ipv4Addr::new(100, 64, 0, ip);
            p.ipv6 = format!("fd00::{ip}").parse().unwrap();
            p.leases = vec![lease(dev, i + 10, 0, 1_000, ip).sign(k)];
            nm.peers.push(p);
        }
        nm
    }

    #[test]
    fn a_forged_lease_among_many_is_refused_alone() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let issuer = k.verifying_key();
        let mut nm = many(&k, 20);
        // Two keys changed after signing: the batch fails, each is then checked alone.
        nm.peers[5].leases[0].lease.wg_public_key = WgPublicKey([99; 32]);
        nm.peers[17].leases[0].lease.wg_public_key = WgPublicKey([98; 32]);
        let mut c = LeaseCache::default();
        let m = c.peers(&nm, Some(&issuer), 500, Instant::now());
        let configured: Vec<u64> = m.keys().copied().collect();
        let want: Vec<u64> = (2..22).filter(|d| *d != 7 && *d != 19).collect();
        assert_eq!(configured, want);
        // All genuine: every peer, from one batch.
        let nm = many(&k, 20);
        let m = LeaseCache::default().peers(&nm, Some(&issuer), 500, Instant::now());
        assert_eq!(m.len(), 20);
        // Another coordinator's key: none.
        let other = SigningKey::from_bytes(&[2; 32]).verifying_key();
        let m = LeaseCache::default().peers(&nm, Some(&other), 500, Instant::now());
        assert!(m.is_empty());
    }

    #[test]
    fn remembered_signatures_still_check_fields_time_and_key() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let good = lease(2, 10, 0, 1000, 2).sign(&k);
        let now = Instant::now();
        let mut c = LeaseCache::default();
        let m = c.peers(
            &netmap(vec![good.clone()]),
            Some(&k.verifying_key()),
            500,
            now,
        );
        assert_eq!(keys(&m), vec![[10; 32]]);
        assert_eq!(c.devices[&DeviceId(2)].signed.len(), 1, "remembered");
        // The same signature over altered fields (a longer lease, another key) is not taken
        // from memory: it is verified, and refused.
        let mut longer = good.clone();
        longer.lease.not_after_ms = 10_000;
        let mut rekeyed = good.clone();
        rekeyed.lease.wg_public_key = WgPublicKey([99; 32]);
        let three = netmap(vec![good.clone(), longer, rekeyed]);
        c.invalidate();
        let m = c.peers(&three, Some(&k.verifying_key()), 500, now);
        assert_eq!(keys(&m), vec![[10; 32]]);
        let (_, refused) = check_leases(
            &three.peers[0],
            &[],
            &k.verifying_key(),
            500,
            c.devices.get(&DeviceId(2)),
            &Checks::new(),
        );
        assert_eq!(refused.len(), 2);
        assert!(refused.iter().all(|(_, e)| *e == LeaseError::BadSignature));
        // A remembered lease still ends on time.
        let m = c.peers(
            &netmap(vec![good.clone()]),
            Some(&k.verifying_key()),
            1000,
            now,
        );
        assert!(m.is_empty());
        // Remembered under one key means nothing under another.
        c.invalidate();
        let m = c.peers(&netmap(vec![good]), Some(&other.verifying_key()), 500, now);
        assert!(m.is_empty());
        assert!(c.devices[&DeviceId(2)].signed.is_empty());
    }

    #[test]
    fn a_delta_checks_only_the_devices_it_names() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let issuer = Some(k.verifying_key());
        let now = Instant::now();
        let mut nm = netmap(vec![lease(2, 10, 0, 5000, 2).sign(&k)]);
        let mut third = nm.peers[0].clone();
        third.device_id = DeviceId(3);
        third.ipv4 = Ipv4Addr::new(100, 64, 0, 3);
        third.ipv6 = "fd00::3".parse().unwrap();
        third.leases = vec![lease(3, 30, 0, 5000, 3).sign(&k)];
        nm.peers.push(third.clone());
        let mut c = LeaseCache::default();
        assert_eq!(c.peers(&nm, issuer.as_ref(), 500, now).len(), 2);

        // A new key for device 3, ending before anything else: only device 3 changes, and
        // the cached answer lasts only until that lease ends.
        let mut rotated = third.clone();
        rotated.leases.push(lease(3, 31, 0, 3000, 3).sign(&k));
        let d = delta(nm.seq, vec![rotated], vec![]);
        nm.apply(&d).unwrap();
        let changed = c.update(&nm, &d, issuer.as_ref(), 600, now).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, 3);
        let got: Vec<_> = changed[0].1.iter().map(|p| p.public_key).collect();
        assert_eq!(got, vec![[30; 32], [31; 32]]);
        assert!(c.still_valid(&nm, 2999));
        assert!(!c.still_valid(&nm, 3000));

        // A forged lease in a delta is refused like in a full netmap.
        let mut forged = third.clone();
        forged.leases = vec![lease(3, 32, 0, 5000, 3).sign(&SigningKey::from_bytes(&[7; 32]))];
        let d = delta(nm.seq, vec![forged], vec![]);
        nm.apply(&d).unwrap();
        let changed = c.update(&nm, &d, issuer.as_ref(), 700, now).unwrap();
        assert_eq!(changed, vec![(3, vec![])]);
        // The device's earlier lease end no longer bounds the cache.
        assert!(c.still_valid(&nm, 4000));

        // A removed device goes; the other stays as configured.
        let d = delta(nm.seq, vec![], vec![DeviceId(2)]);
        nm.apply(&d).unwrap();
        let changed = c.update(&nm, &d, issuer.as_ref(), 800, now).unwrap();
        assert_eq!(changed, vec![(2, vec![])]);
        assert!(c.first_seen(DeviceId(2)).is_none());
        assert!(c.peers(&nm, issuer.as_ref(), 800, now).is_empty());

        // What a delta cannot be answered from: a gap, a new relay list, no pinned key, a
        // lease ended since the last check (time going back is in the clock offset test).
        let d = delta(nm.seq, vec![], vec![]);
        assert!(c
            .update(
                &nm,
                &delta(nm.seq + 5, vec![], vec![]),
                issuer.as_ref(),
                800,
                now
            )
            .is_none());
        let relays = NetmapDelta {
            relays: Some(vec![]),
            ..d.clone()
        };
        assert!(c.update(&nm, &relays, issuer.as_ref(), 800, now).is_none());
        assert!(c.update(&nm, &d, None, 800, now).is_none());
        let mut short = third.clone();
        short.leases = vec![lease(3, 33, 0, 900, 3).sign(&k)];
        let d = delta(nm.seq, vec![short], vec![]);
        nm.apply(&d).unwrap();
        assert!(c.update(&nm, &d, issuer.as_ref(), 800, now).is_some());
        let d = delta(nm.seq, vec![], vec![]);
        nm.apply(&d).unwrap();
        assert!(c.update(&nm, &d, issuer.as_ref(), 900, now).is_none());
    }

    #[test]
    fn a_lease_not_yet_valid_is_taken_when_it_starts() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let starts = 10_000;
        let nb = starts + NOT_BEFORE_SKEW_MS;
        let nm = netmap(vec![lease(2, 10, nb, nb + 5000, 2).sign(&k)]);
        let now = Instant::now();
        let mut c = LeaseCache::default();
        assert!(c.peers(&nm, Some(&k.verifying_key()), 500, now).is_empty());
        assert!(c.still_valid(&nm, starts - 1));
        assert!(!c.still_valid(&nm, starts));
        let m = c.peers(&nm, Some(&k.verifying_key()), starts, now);
        assert_eq!(keys(&m), vec![[10; 32]]);
    }

    #[test]
    fn coordinator_time_is_checked_again_only_when_it_crosses_a_lease_start_or_end() {
        let k = SigningKey::from_bytes(&[1; 32]);
        // One lease usable from 5 000 (its start less the skew allowed) to 20 000, one that
        // ended at 8 000. Checked at 9 000, the answer holds on [8 000, 20 000).
        let nb = 5_000 + NOT_BEFORE_SKEW_MS;
        let nm = netmap(vec![
            lease(2, 10, nb, 20_000, 2).sign(&k),
            lease(2, 11, 0, 8_000, 2).sign(&k),
        ]);
        let issuer = Some(k.verifying_key());
        let now = Instant::now();
        let mut c = LeaseCache::default();
        assert_eq!(
            keys(&c.peers(&nm, issuer.as_ref(), 9_000, now)),
            vec![[10; 32]]
        );
        assert_eq!(c.full_checks(), 1);
        for t in [8_000, 9_500, 19_999] {
            assert!(c.still_valid(&nm, t), "{t}");
        }
        for t in [7_999, 20_000] {
            assert!(!c.still_valid(&nm, t), "{t}");
        }
        // Another clock offset inside the window: the cached answer, no check.
        assert_eq!(
            keys(&c.peers(&nm, issuer.as_ref(), 12_000, now)),
            vec![[10; 32]]
        );
        assert_eq!(c.full_checks(), 1);
        // Time set back before the second lease's end, then before the first one's start:
        // each is checked again and answers for that time.
        assert_eq!(
            keys(&c.peers(&nm, issuer.as_ref(), 7_000, now)),
            vec![[10; 32], [11; 32]]
        );
        assert_eq!(
            keys(&c.peers(&nm, issuer.as_ref(), 4_000, now)),
            vec![[11; 32]]
        );
        assert_eq!(c.full_checks(), 3);
        // A delta is not answered from a window the time has left.
        let d = delta(nm.seq, vec![], vec![]);
        let mut next = nm.clone();
        next.apply(&d).unwrap();
        assert!(c.update(&next, &d, issuer.as_ref(), 9_000, now).is_none());
        assert!(c.update(&next, &d, issuer.as_ref(), 4_500, now).is_some());
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
        let both = c.peers(&nm, Some(&k.verifying_key()), 500, now);
        assert_eq!(keys(&both), vec![[10; 32], [11; 32]]);
        assert!(c.first_seen(DeviceId(2)).is_some());
        // Past the first lease's end the cache is not used: one key is left.
        let left = c.peers(&nm, Some(&k.verifying_key()), 1500, now);
        assert_eq!(keys(&left), vec![[11; 32]]);
        // Without a pinned issuer nothing is trusted.
        c.invalidate();
        assert!(c.peers(&nm, None, 500, now).is_empty());
    }
}
