//! The states of a WireGuard key rotation. A rotation is loss-free because each step waits for
//! the one before it: new key → lease on it → the coordinator pushes that lease to the peers
//! (before it answers) → settle → switch → confirm once peers hold sessions under the new key →
//! the old lease is revoked.

use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

use ward_shared::keyproof;
use ward_shared::lease::SignedLease;
use ward_shared::wire::DeviceMsg;

use super::{Agent, Event, Now, PrivateKey};

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

/// The rotation transitions of [`Agent`].
impl Agent {
    /// A lease from the coordinator: for the key in use (`Unleased` → `Idle`), or for the key
    /// being rotated to (`Requested` → `Settling`). One that does not verify ends the session.
    pub(super) fn handle_lease(&mut self, lease: SignedLease, now: Now) {
        let Some(issuer) = self.cfg.lease_key else {
            return self.protocol_error("no pinned lease key; enroll again".into(), now);
        };
        let coord_now = self.coordinator_ms(now.unix_ms);
        if let Err(e) = lease.verify_for(
            &issuer,
            coord_now,
            self.cfg.device_id,
            self.cfg.ipv4,
            self.cfg.ipv6,
        ) {
            return self.protocol_error(
                format!("the coordinator sent a lease that does not verify: {e}"),
                now,
            );
        }
        let serial = lease.lease.serial;
        if lease.lease.wg_public_key == self.key.public() {
            info!(
                serial,
                expires_in_s = lease.lease.not_after_ms.saturating_sub(coord_now) / 1000,
                "lease granted"
            );
            self.own_lease = Some(lease);
            self.transmits.push_back(DeviceMsg::LeaseActive { serial });
            if let Rotation::Unleased { .. } = self.rotation {
                self.rotation = Rotation::Idle;
            }
            return;
        }
        match &self.rotation {
            Rotation::Requested { key } if key.public() == lease.lease.wg_public_key => {
                // Peers already have the new key (the coordinator pushed it before answering);
                // give the deltas a moment to land, then switch.
                self.rotation = Rotation::Settling {
                    key: *key,
                    lease: Box::new(lease),
                    switch_at: now.instant + ROTATION_SETTLE,
                };
            }
            Rotation::Requested { .. }
            | Rotation::Unleased { .. }
            | Rotation::Idle
            | Rotation::Settling { .. }
            | Rotation::Confirming { .. } => warn!(
                serial,
                "ignoring a lease for a key this device does not hold"
            ),
        }
    }

    /// One look at the rotation: switch when settled, confirm when peers moved, start one when
    /// due (half-life) or asked for.
    pub(super) fn rotation_step(&mut self, now: Now) {
        if let Rotation::Settling {
            key,
            lease,
            switch_at,
        } = &self.rotation
        {
            if now.instant >= *switch_at {
                let (key, lease) = (*key, lease.clone());
                let serial = lease.lease.serial;
                info!(serial, key = %lease.lease.wg_public_key.to_base64(), "rotated to a new WireGuard key");
                self.key = key;
                self.own_lease = Some((*lease).clone());
                self.key_since = now.instant;
                self.rotations += 1;
                self.old_key_peers = None;
                self.events.push_back(Event::SwitchKey { key, lease });
                self.rotation = Rotation::Confirming {
                    serial,
                    since: now.instant,
                };
            }
        }
        if let Rotation::Confirming { serial, since } = self.rotation {
            let waited = now.instant.saturating_duration_since(since);
            let timed_out = waited >= ROTATION_CONFIRM_MAX;
            if self.old_key_peers == Some(0) || timed_out {
                if let Some(n) = self.old_key_peers.filter(|n| *n > 0) {
                    warn!(peers = n, "peers did not complete a handshake under the new key in time; giving up the old lease anyway");
                }
                debug!(
                    serial,
                    after_ms = waited.as_millis() as u64,
                    "rotation confirmed"
                );
                self.transmits.push_back(DeviceMsg::LeaseActive { serial });
                self.rotation = Rotation::Idle;
            }
        }
        let due = self
            .own_lease
            .as_ref()
            .is_some_and(|l| rotation_due(l, self.coordinator_ms(now.unix_ms)));
        if self.rotation == Rotation::Idle && (due || self.queued.is_some()) {
            if let Some(reason) = &self.queued {
                info!(%reason, "rotating for a trust change asked for earlier");
            }
            self.start_rotation(now);
        }
    }

    /// Asks for a lease on the spare key. Without a spare key (the driver has not refilled it
    /// yet) the rotation waits for the next tick.
    pub(super) fn start_rotation(&mut self, _now: Now) {
        let Some(key) = self.spare.take() else {
            self.events.push_back(Event::NeedKey);
            return;
        };
        self.queued = None;
        let public = key.public();
        debug!(key = %public.to_base64(), "rotating: asking for a lease on a new key");
        let request = self.lease_request(&key);
        self.transmits.push_back(request);
        self.rotation = Rotation::Requested { key };
        self.events.push_back(Event::NeedKey);
    }
}

impl Agent {
    /// A lease request for `key`, with the proof that this device holds its private half,
    /// made against the pinned lease key. Without a pinned key there is no proof, and the
    /// coordinator refuses the request (as it must: this agent would trust no lease anyway).
    pub(super) fn lease_request(&self, key: &PrivateKey) -> DeviceMsg {
        let wg_public_key = key.public();
        let proof = self
            .cfg
            .lease_key
            .as_ref()
            .and_then(|lk| keyproof::prove(&key.0, lk, self.cfg.device_id, &wg_public_key));
        DeviceMsg::LeaseRequest {
            wg_public_key,
            proof,
        }
    }
}

/// A device rotates its key once half of its lease is spent.
pub fn rotation_due(own: &SignedLease, coordinator_now_ms: i64) -> bool {
    let l = &own.lease;
    coordinator_now_ms
        >= l.not_before_ms
            .saturating_add(l.not_after_ms.saturating_sub(l.not_before_ms) / 2)
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
