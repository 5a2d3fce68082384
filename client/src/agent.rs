//! The agent's trust decisions, free of I/O: which peer keys may be configured (only keys under
//! a valid lease from the pinned coordinator key, judged in coordinator time) and when this
//! device's own key is due for rotation. The daemon drives these from its timers and the
//! control channel; the whole-system simulation drives them with a fake clock.

use ed25519_dalek::VerifyingKey;

use ward_shared::lease::{LeaseError, SignedLease};
use ward_shared::wire::Netmap;

use crate::dataplane::PeerConfig;

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
        for l in &p.leases {
            match l.verify_for(issuer, coordinator_now_ms, p.device_id, p.ipv4, p.ipv6) {
                Ok(lease) => ok.push(PeerConfig {
                    device_id: p.device_id.0,
                    hostname: p.hostname.to_string(),
                    public_key: lease.wg_public_key.0,
                    ipv4: p.ipv4,
                    ipv6: p.ipv6,
                    endpoints: p.endpoints.clone(),
                }),
                Err(e) => refused.push((p.hostname.to_string(), e)),
            }
        }
    }
    (ok, refused)
}

/// A device rotates its key once half of its lease is spent.
pub fn rotation_due(own: &SignedLease, coordinator_now_ms: i64) -> bool {
    let l = &own.lease;
    coordinator_now_ms >= l.not_before_ms + (l.not_after_ms - l.not_before_ms) / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use std::net::Ipv4Addr;
    use ward_shared::lease::Lease;
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
                device_id: DeviceId(1),
                hostname: Hostname::parse("me").unwrap(),
                ipv4: Ipv4Addr::new(100, 64, 0, 1),
                ipv6: "fd00::1".parse().unwrap(),
                v6_prefix: "fd00::".parse().unwrap(),
                observed_addr: None,
            },
            peers: vec![Peer {
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
            }],
            inbound: vec![],
            reach: vec![],
        }
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
    fn rotation_at_half_life() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let l = lease(1, 1, 1000, 21_000, 1).sign(&k);
        assert!(!rotation_due(&l, 10_999));
        assert!(rotation_due(&l, 11_000));
    }
}
