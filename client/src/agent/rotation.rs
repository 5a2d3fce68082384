//! The states of a WireGuard key rotation. A rotation is loss-free because each step waits for
//! the one before it: new key → lease on it → the coordinator pushes that lease to the peers
//! (before it answers) → settle → switch → confirm once peers hold sessions under the new key →
//! the old lease is revoked.

use std::time::{Duration, Instant};

use ward_shared::lease::SignedLease;

use super::PrivateKey;

/// Between receiving the lease for a new key and switching to it: time for peers' deltas.
pub const ROTATION_SETTLE: Duration = Duration::from_millis(750);
/// After switching keys, the old lease is given up (`LeaseActive`) once every peer that had a
/// session has a session under the new key, or after this long at most.
pub const ROTATION_CONFIRM_MAX: Duration = Duration::from_secs(5);

/// Where this session's key rotation stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Rotation {
    /// This session holds no lease for the key in use yet: no rotation may start (after a
    /// reconnect the old lease may be stale, and a rotation must not race the first lease).
    /// `requested`: the lease for the key in use was asked for.
    Unleased { requested: bool },
    /// Leased; nothing in flight.
    Idle,
    /// A lease was asked for `key`.
    Requested { key: PrivateKey },
    /// The lease for `key` arrived (peers already have it); switch at `switch_at`.
    Settling {
        key: PrivateKey,
        lease: Box<SignedLease>,
        switch_at: Instant,
    },
    /// Switched to the key of lease `serial` at `since`; waiting for peers to move to it.
    Confirming { serial: u64, since: Instant },
}

impl Rotation {
    /// When this state wants a wake-up of its own.
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Rotation::Settling { switch_at, .. } => Some(*switch_at),
            Rotation::Confirming { since, .. } => Some(*since + ROTATION_CONFIRM_MAX),
            Rotation::Unleased { .. } | Rotation::Idle | Rotation::Requested { .. } => None,
        }
    }
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
    use ward_shared::wire::{DeviceId, WgPublicKey};

    #[test]
    fn rotation_at_half_life() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let l = Lease {
            device_id: DeviceId(1),
            wg_public_key: WgPublicKey([1; 32]),
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: "fd00::1".parse().unwrap(),
            not_before_ms: 1000,
            not_after_ms: 21_000,
            serial: 1,
        }
        .sign(&k);
        assert!(!rotation_due(&l, 10_999));
        assert!(rotation_due(&l, 11_000));
    }
}
