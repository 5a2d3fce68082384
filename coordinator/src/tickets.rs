//! Relay tickets: what a device presents to a relay, signed with the lease key and bound to the
//! certificate its control session authenticated with. I/O-free: the caller reads the device
//! afresh from the store and passes the time in.
//!
//! ```text
//! on relay_ticket_request from device D (session authenticated with cert identity I):
//!   dev = store.device(D)
//!   match issuer.issue(&lease_key, &dev, I, now_ms)
//!     Ok(ticket)  -> send relay_ticket{ticket}
//!     Err(..)     -> send error, close the session
//! ```
//!
//! A device asks when its session starts, at half the ticket's life and after a certificate
//! renewal; more often than once per [`MIN_REISSUE_MS`] it gets the ticket it was last given
//! (a device cannot make the coordinator sign in a loop).

use ed25519_dalek::SigningKey;
use std::collections::BTreeMap;

use ward_shared::relay::{SignedTicket, Ticket, TICKET_NOT_BEFORE_SKEW_MS, TICKET_TTL_MS};
use ward_shared::wire::{DeviceId, ErrorCode};

use crate::model::Device;

/// A device asking again sooner than this gets its last ticket again.
pub const MIN_REISSUE_MS: i64 = 15_000;

/// Why a ticket was not issued: the code and message the device is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketRefusal {
    #[error("the device is not allowed on the network")]
    NotLive,
}

impl TicketRefusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            TicketRefusal::NotLive => ErrorCode::DeviceRevoked,
        }
    }
}

/// Issues tickets: serials from a counter, the last ticket per device kept for the rate limit.
#[derive(Debug)]
pub struct TicketIssuer {
    next_serial: u64,
    /// Per device: when its last ticket was issued, and the ticket.
    last: BTreeMap<DeviceId, (i64, SignedTicket)>,
}

impl TicketIssuer {
    /// `first_serial`: the driver passes its start time in ms, so serials keep increasing
    /// across restarts.
    pub fn new(first_serial: u64) -> Self {
        Self {
            next_serial: first_serial.max(1),
            last: BTreeMap::new(),
        }
    }

    /// A ticket for `dev` bound to `cert_identity` (the SHA-256 of the public key in the
    /// certificate its session authenticated with), valid from `now_ms - 5 s` for
    /// [`TICKET_TTL_MS`]. Refused unless the device is live (active or quarantined).
    pub fn issue(
        &mut self,
        key: &SigningKey,
        dev: &Device,
        cert_identity: [u8; 32],
        now_ms: i64,
    ) -> Result<SignedTicket, TicketRefusal> {
        if !dev.is_live() {
            self.last.remove(&dev.id);
            return Err(TicketRefusal::NotLive);
        }
        if let Some((at, t)) = self.last.get(&dev.id) {
            let recent = now_ms >= *at && now_ms - at < MIN_REISSUE_MS;
            if recent && t.ticket.cert_identity == cert_identity {
                return Ok(t.clone());
            }
        }
        // Forget tickets that have expired (bounds the map by the devices asking lately).
        self.last.retain(|_, (_, t)| t.ticket.not_after_ms > now_ms);
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        let t = Ticket {
            device_id: dev.id,
            cert_identity,
            not_before_ms: now_ms - TICKET_NOT_BEFORE_SKEW_MS,
            not_after_ms: now_ms + TICKET_TTL_MS,
            serial,
        }
        .sign(key);
        self.last.insert(dev.id, (now_ms, t.clone()));
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use super::*;
    use crate::store::{DeviceStatus, Quarantine};
    use ward_shared::relay::TicketError;

    fn dev(id: u64) -> Device {
        crate::model::test_device(id)
    }

    const T0: i64 = 1_800_000_000_000;

    #[test]
    fn a_live_device_gets_a_ticket_for_its_certificate() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut iss = TicketIssuer::new(100);
        let t = iss.issue(&key, &dev(1), [9; 32], T0).unwrap();
        let ok = t.verify_for(&key.verifying_key(), T0, &[9; 32]).unwrap();
        assert_eq!(ok.device_id, DeviceId(1));
        assert_eq!(ok.serial, 100);
        assert_eq!(ok.not_before_ms, T0 - 5_000);
        assert_eq!(ok.not_after_ms, T0 + TICKET_TTL_MS);
        // Bound to the certificate: useless with another one.
        assert_eq!(
            t.verify_for(&key.verifying_key(), T0, &[8; 32]),
            Err(TicketError::WrongCertificate { serial: 100 })
        );
        // A quarantined device is still live.
        let mut q = dev(2);
        q.quarantine = Some(Quarantine {
            since_ms: T0,
            reason: "t".into(),
            automatic: false,
        });
        let t2 = iss.issue(&key, &q, [7; 32], T0).unwrap();
        assert_eq!(t2.ticket.serial, 101);
    }

    #[test]
    fn a_device_that_is_not_live_is_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut iss = TicketIssuer::new(1);
        let mut revoked = dev(1);
        revoked.status = DeviceStatus::Revoked;
        revoked.revoked_ms = Some(T0);
        assert_eq!(
            iss.issue(&key, &revoked, [9; 32], T0),
            Err(TicketRefusal::NotLive)
        );
        let mut disabled = dev(2);
        disabled.user_disabled = true;
        let err = iss.issue(&key, &disabled, [9; 32], T0).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DeviceRevoked);
        // A device revoked after it got a ticket is refused, not served from the cache.
        iss.issue(&key, &dev(3), [1; 32], T0).unwrap();
        let mut later = dev(3);
        later.status = DeviceStatus::Revoked;
        assert!(iss.issue(&key, &later, [1; 32], T0 + 1).is_err());
    }

    #[test]
    fn asking_too_often_returns_the_same_ticket() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut iss = TicketIssuer::new(1);
        let a = iss.issue(&key, &dev(1), [9; 32], T0).unwrap();
        let b = iss.issue(&key, &dev(1), [9; 32], T0 + 1_000).unwrap();
        assert_eq!(a, b);
        // Another device is not limited by the first.
        let other = iss.issue(&key, &dev(2), [9; 32], T0 + 1_000).unwrap();
        assert_eq!(other.ticket.serial, 2);
        // A renewed certificate (new identity) gets a fresh ticket at once.
        let renewed = iss.issue(&key, &dev(1), [5; 32], T0 + 2_000).unwrap();
        assert_eq!(renewed.ticket.cert_identity, [5; 32]);
        assert_eq!(renewed.ticket.serial, 3);
        // After the interval, a fresh one.
        let c = iss
            .issue(&key, &dev(1), [5; 32], T0 + 2_000 + MIN_REISSUE_MS)
            .unwrap();
        assert_eq!(c.ticket.serial, 4);
        assert_eq!(
            c.ticket.not_after_ms,
            T0 + 2_000 + MIN_REISSUE_MS + TICKET_TTL_MS
        );
    }
}
