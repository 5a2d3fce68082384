//! Lease issuing: the TTL a device gets, the stored lease row and its signature. Synchronous
//! over the [`Store`], so the server (on a blocking thread) and the whole-system simulations
//! issue leases through the same code.
//!
//! Order matters and stays with the caller: after [`issue`] the registry must push the lease to
//! the device's peers (`Registry::handle_lease`) before the device is told about it.

use ed25519_dalek::SigningKey;
use std::collections::BTreeMap;
use tracing::{error, info};
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
/// (`Registry::risky_lease_ttl_ms`). Refuses a device that is not live.
pub fn issue(
    store: &dyn Store,
    signer: &SigningKey,
    ttl: &LeaseTtl,
    risky_ttl_ms: Option<u64>,
    id: DeviceId,
    key: WgPublicKey,
    now_ms: i64,
) -> Result<SignedLease, Refusal> {
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
