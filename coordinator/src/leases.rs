//! Lease issuing: the TTL a device gets, the stored lease row and its signature. Synchronous
//! over the [`Store`], so the server (on a blocking thread) and the whole-system simulations
//! issue leases through the same code.
//!
//! Order matters and stays with the caller: after [`issue`] the registry must push the lease to
//! the device's peers (`Registry::handle_lease`) before the device is told about it.

use ed25519_dalek::SigningKey;
use std::collections::BTreeMap;
use tracing::{error, info, warn};
use ward_shared::keyproof::{self, KeyProof};
use ward_shared::lease::{Lease, SignedLease};
use ward_shared::wire::{DeviceId, ErrorCode, WgPublicKey};

use crate::store::{Device, LeaseRow, Store, StoreError};

/// Lease lifetimes: a default, shorter ones per tag, and a ceiling.
#[derive(Debug, Clone)]
pub struct LeaseTtl {
    pub default_ms: i64,
    pub per_tag_ms: BTreeMap<String, i64>,
    pub max_ms: i64,
}

impl LeaseTtl {
    /// The shortest TTL among the device's tags (or the default), never above the maximum.
    pub fn for_tags(&self, tags: &[String]) -> i64 {
        tags.iter()
            .filter_map(|t| self.per_tag_ms.get(t).copied())
            .min()
            .unwrap_or(self.default_ms)
            .min(self.max_ms)
            .max(1_000)
    }
}

/// Why a lease was not issued: the code and message the device is sent.
pub type Refusal = (ErrorCode, String);

/// Issues, records (audited, in one transaction) and signs a lease on `key` for device `id`.
/// `risky_ttl_ms` is the policy's shorter TTL when the device is risky now
/// (`Registry::risky_lease_ttl_ms`). Refuses a device that is not live, and a key the device
/// has not proved it holds ([`check_proof`]). The caller has asked the registry first whether
/// the key is free (`Registry::check_lease_request`).
///
/// `current` is the lease the device holds on `key` already (`Registry::current_lease`). If
/// it is [`reusable`] (in the first half of its life, and ending no later than a lease issued
/// now would) it is the answer: a device that reconnects asks for a lease on the key it uses,
/// and a new one would go to every peer (each checking its signature) for nothing. The
/// checks before it are the same as for a new lease.
#[allow(clippy::too_many_arguments)] // each is one independent input of the decision
pub fn issue(
    store: &dyn Store,
    signer: &SigningKey,
    ttl: &LeaseTtl,
    risky_ttl_ms: Option<u64>,
    id: DeviceId,
    key: WgPublicKey,
    proof: Option<&KeyProof>,
    current: Option<&SignedLease>,
    now_ms: i64,
) -> Result<SignedLease, Refusal> {
    check_proof(signer, id, &key, proof)?;
    // Tags can change while connected: read the device afresh.
    let fresh = store.device(id).map_err(|e| internal(id, &e))?;
    if !fresh.is_live() {
        return Err((
            ErrorCode::DeviceRevoked,
            "the device is not allowed on the network".into(),
        ));
    }
    let tags: Vec<String> = fresh.tags.iter().map(|t| t.to_string()).collect();
    let mut ttl_ms = ttl.for_tags(&tags);
    if let Some(risky) = risky_ttl_ms {
        ttl_ms = ttl_ms
            .min(i64::try_from(risky).unwrap_or(i64::MAX))
            .max(1_000);
    }
    if let Some(l) = current.filter(|l| reusable(l, &fresh, &key, ttl_ms, now_ms)) {
        info!(device = %id, serial = l.lease.serial, "lease still fresh; sent again");
        return Ok(l.clone());
    }
    let row = store
        .issue_lease(id, key, ttl_ms, now_ms)
        .map_err(|e| match e {
            StoreError::Refused { code, message } => (code, message),
            other => internal(id, &other),
        })?;
    let Some(lease) = sign_row(signer, |_| Some(&fresh), row) else {
        return Err((ErrorCode::Internal, "lease for an unknown device".into()));
    };
    info!(device = %id, serial = lease.lease.serial, ttl_ms, "lease issued");
    Ok(lease)
}

/// Whether `current` may answer a request from device `dev` (as stored now) for a lease on
/// `key` at `now_ms`, when a new lease would live `ttl_ms`: it is that device's lease on that
/// key and its addresses, it has started, it is in the first half of its life (the device
/// would otherwise rotate at once), and it ends no later than a new lease would (so a shorter
/// TTL, for a risky device or a tag, takes effect now).
pub fn reusable(
    current: &SignedLease,
    dev: &Device,
    key: &WgPublicKey,
    ttl_ms: i64,
    now_ms: i64,
) -> bool {
    let l = &current.lease;
    let half = l
        .not_before_ms
        .saturating_add(l.not_after_ms.saturating_sub(l.not_before_ms) / 2);
    l.device_id == dev.id
        && l.ipv4 == dev.ipv4
        && l.ipv6 == dev.ipv6
        && &l.wg_public_key == key
        && l.not_before_ms <= now_ms
        && now_ms < half
        && l.not_after_ms <= now_ms.saturating_add(ttl_ms)
}

/// Refuses a lease request that does not prove possession of the key's private half: an
/// agent that sends no proof predates proofs and must be upgraded; a wrong proof is a device
/// asking for a key that is not its own.
pub fn check_proof(
    signer: &SigningKey,
    id: DeviceId,
    key: &WgPublicKey,
    proof: Option<&KeyProof>,
) -> Result<(), Refusal> {
    let Some(proof) = proof else {
        warn!(device = %id, "lease request without a key proof refused");
        return Err((
            ErrorCode::Protocol,
            "lease requests must prove possession of the WireGuard key; upgrade ward on this device"
                .into(),
        ));
    };
    keyproof::verify(signer, id, key, proof).map_err(|e| {
        warn!(device = %id, error = %e, "lease request with a bad key proof refused");
        (ErrorCode::BadRequest, format!("lease refused: {e}"))
    })
}

/// Signs a stored lease for the device it belongs to (its addresses come from `device`,
/// which looks a device up by id).
pub fn sign_row<'a>(
    signer: &SigningKey,
    device: impl FnOnce(DeviceId) -> Option<&'a Device>,
    row: LeaseRow,
) -> Option<SignedLease> {
    let d = device(row.device_id).filter(|d| d.id == row.device_id)?;
    Some(
        Lease {
            device_id: d.id,
            wg_public_key: row.wg_public_key,
            ipv4: d.ipv4,
            ipv6: d.ipv6,
            not_before_ms: row.not_before_ms,
            not_after_ms: row.not_after_ms,
            serial: row.serial,
        }
        .sign(signer),
    )
}

fn internal(id: DeviceId, e: &StoreError) -> Refusal {
    error!(device = %id, error = %e, "lease issue failed");
    (
        ErrorCode::Internal,
        "the coordinator could not issue a lease".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_need_a_proof_of_key_possession() {
        let signer = SigningKey::from_bytes(&[5; 32]);
        let private = [4u8; 32];
        let public = keyproof::public_for(&private);
        let id = DeviceId(2);
        let good = keyproof::prove(&private, &signer.verifying_key(), id, &public).unwrap();
        assert_eq!(check_proof(&signer, id, &public, Some(&good)), Ok(()));
        // An agent that sends no proof is told to upgrade.
        let (code, msg) = check_proof(&signer, id, &public, None).unwrap_err();
        assert_eq!(code, ErrorCode::Protocol);
        assert!(msg.contains("upgrade"), "{msg}");
        // Another device's proof, or a proof made with another private key: refused.
        assert_eq!(
            check_proof(&signer, DeviceId(3), &public, Some(&good))
                .unwrap_err()
                .0,
            ErrorCode::BadRequest
        );
        let forged = keyproof::prove(&[6; 32], &signer.verifying_key(), id, &public).unwrap();
        assert_eq!(
            check_proof(&signer, id, &public, Some(&forged))
                .unwrap_err()
                .0,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn a_fresh_lease_on_the_same_key_is_reusable_and_nothing_else_is() {
        let signer = SigningKey::from_bytes(&[5; 32]);
        let dev = crate::model::test_device(2);
        let (id, key) = (&dev, WgPublicKey([7; 32]));
        let l = Lease {
            device_id: dev.id,
            wg_public_key: key,
            ipv4: dev.ipv4,
            ipv6: dev.ipv6,
            not_before_ms: 10_000,
            not_after_ms: 30_000,
            serial: 4,
        }
        .sign(&signer);
        let ttl = 20_000;
        assert!(reusable(&l, id, &key, ttl, 10_000));
        assert!(reusable(&l, id, &key, ttl, 19_999));
        assert!(!reusable(&l, id, &key, ttl, 20_000), "half spent: rotate");
        assert!(!reusable(&l, id, &key, ttl, 9_999), "not started");
        let mut other = dev.clone();
        other.id = DeviceId(3);
        assert!(!reusable(&l, &other, &key, ttl, 15_000), "another device's");
        let mut moved = dev.clone();
        moved.ipv4 = std::net::Ipv4Addr::new(100, 64, 9, 9);
        assert!(!reusable(&l, &moved, &key, ttl, 15_000), "other addresses");
        assert!(
            !reusable(&l, id, &WgPublicKey([8; 32]), ttl, 15_000),
            "another key"
        );
        // A shorter TTL now (a risky device, a tag): a new lease would end sooner.
        assert!(!reusable(&l, id, &key, 5_000, 15_000));
        assert!(reusable(&l, id, &key, 15_000, 15_000));
    }

    #[test]
    fn a_request_for_a_key_with_a_fresh_lease_gets_that_lease_and_writes_nothing() {
        use crate::store::{EnrollSpec, SqliteStore, TokenSpec};
        use ward_shared::names::{Hostname, Name};
        let store = SqliteStore::open_in_memory().unwrap();
        let name = |s: &str| Name::parse("name", s).unwrap();
        store.add_user(&name("alice"), &[], "admin", 1_000).unwrap();
        store
            .create_token(
                TokenSpec {
                    id: "t",
                    secret_hash: ward_shared::token::hash_secret(b"s"),
                    user: Some(&name("alice")),
                    tags: &[],
                    expires_ms: 5_000,
                    uses: 1,
                    hostname: None,
                },
                "admin",
                1_000,
            )
            .unwrap();
        let (dev, _) = store
            .enroll(
                EnrollSpec {
                    token_id: "t",
                    token_secret: b"s",
                    hostname: Hostname::sanitize("a").unwrap(),
                    os: "linux".into(),
                    identity_hash: [1; 32],
                },
                &ward_shared::addr::AddressPools::from_random([1, 2, 3, 4, 5]),
                &mut |_| Ok((vec![1, 2, 3], 99)),
                2_000,
            )
            .unwrap();
        let signer = SigningKey::from_bytes(&[5; 32]);
        let ttl = LeaseTtl {
            default_ms: 60_000,
            per_tag_ms: BTreeMap::new(),
            max_ms: 60_000,
        };
        let private = [4u8; 32];
        let key = keyproof::public_for(&private);
        let proof = keyproof::prove(&private, &signer.verifying_key(), dev.id, &key).unwrap();
        let get = |risky: Option<u64>, current: Option<&SignedLease>, now: i64| {
            issue(
                &store,
                &signer,
                &ttl,
                risky,
                dev.id,
                key,
                Some(&proof),
                current,
                now,
            )
        };
        let first = get(None, None, 10_000).unwrap();
        let issued = || store.lease_counts().unwrap().get(&dev.id).copied();
        assert_eq!(issued(), Some(1));
        // Reconnected 10 s later, asking for the key in use: the same lease, nothing stored.
        let again = get(None, Some(&first), 20_000).unwrap();
        assert_eq!(again, first);
        assert_eq!(issued(), Some(1));
        // The same request still needs its proof, and a live device.
        let forged = keyproof::prove(&[6; 32], &signer.verifying_key(), dev.id, &key).unwrap();
        assert!(issue(
            &store,
            &signer,
            &ttl,
            None,
            dev.id,
            key,
            Some(&forged),
            Some(&first),
            20_000
        )
        .is_err());
        // Risky now (a 10 s TTL): a new, shorter lease.
        let short = get(Some(10_000), Some(&first), 21_000).unwrap();
        assert!(short.lease.serial > first.lease.serial);
        assert_eq!(short.lease.not_after_ms, 31_000);
        // Half spent: a new lease.
        let late = get(None, Some(&first), 40_000).unwrap();
        assert!(late.lease.serial > short.lease.serial);
        assert_eq!(issued(), Some(3));
        store.revoke_device("a", "admin", 41_000).unwrap();
        assert_eq!(
            get(None, Some(&late), 42_000).unwrap_err().0,
            ErrorCode::DeviceRevoked,
            "a revoked device gets nothing, not even its old lease"
        );
    }

    #[test]
    fn ttl_by_tag_is_the_shortest_and_capped() {
        let t = LeaseTtl {
            default_ms: 600_000,
            per_tag_ms: [
                ("server".to_string(), 3_600_000),
                ("kiosk".to_string(), 60_000),
            ]
            .into_iter()
            .collect(),
            max_ms: 1_800_000,
        };
        assert_eq!(t.for_tags(&[]), 600_000);
        assert_eq!(t.for_tags(&["server".into()]), 1_800_000);
        assert_eq!(t.for_tags(&["server".into(), "kiosk".into()]), 60_000);
        assert_eq!(t.for_tags(&["other".into()]), 600_000);
    }
}
