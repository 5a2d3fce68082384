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
#[allow(clippy::too_many_arguments)] // each is one independent input of the decision
pub fn issue(
    store: &dyn Store,
    signer: &SigningKey,
    ttl: &LeaseTtl,
    risky_ttl_ms: Option<u64>,
    id: DeviceId,
    key: WgPublicKey,
    proof: Option<&KeyProof>,
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
    let row = store
        .issue_lease(id, key, ttl_ms, now_ms)
        .map_err(|e| match e {
            StoreError::Refused { code, message } => (code, message),
            other => internal(id, &other),
        })?;
    let Some(lease) = sign_row(signer, std::slice::from_ref(&fresh), row) else {
        return Err((ErrorCode::Internal, "lease for an unknown device".into()));
    };
    info!(device = %id, serial = lease.lease.serial, ttl_ms, "lease issued");
    Ok(lease)
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

/// Signs a stored lease for the device it belongs to (its addresses come from `devices`).
pub fn sign_row(signer: &SigningKey, devices: &[Device], row: LeaseRow) -> Option<SignedLease> {
    let d = devices.iter().find(|d| d.id == row.device_id)?;
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
