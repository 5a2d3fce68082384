//! Leases: the coordinator's signed statement that a WireGuard key belongs to a device, for a
//! while. A peer configures a key only under a valid lease, and drops it when the lease ends,
//! on its own clock (corrected to coordinator time), with no word from the coordinator.
//!
//! Signed bytes (version 1), all integers big-endian:
//! `"ward-lease-v1\0" | device_id u64 | wg_key [32] | ipv4 [4] | ipv6 [16] | not_before_ms i64 |
//!  not_after_ms i64 | serial u64 | issuer [32]`
//! The issuer is the coordinator's Ed25519 public key, so a lease from another coordinator
//! never verifies against ours even if its signature is valid.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::wire::{Bytes, DeviceId, WgPublicKey};

const DOMAIN: &[u8] = b"ward-lease-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lease {
    pub device_id: DeviceId,
    pub wg_public_key: WgPublicKey,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub serial: u64,
}

/// A lease with the coordinator's signature (base64 in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedLease {
    #[serde(flatten)]
    pub lease: Lease,
    pub signature: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease signature does not verify (forged, altered, or from another coordinator)")]
    BadSignature,
    #[error("lease {serial} expired {ago_ms} ms ago")]
    Expired { serial: u64, ago_ms: i64 },
    #[error("lease {serial} is not valid for another {in_ms} ms")]
    NotYetValid { serial: u64, in_ms: i64 },
    #[error("lease {serial} is for device {lease_device} at {lease_addrs}, not for {expected}")]
    WrongOwner {
        serial: u64,
        lease_device: DeviceId,
        lease_addrs: String,
        expected: String,
    },
    #[error("lease validity is inverted (not_after before not_before)")]
    Inverted,
}

/// Clock skew tolerated at the start of a lease (the end is never stretched).
pub const NOT_BEFORE_SKEW_MS: i64 = 5_000;

impl Lease {
    fn signed_bytes(&self, issuer: &VerifyingKey) -> Vec<u8> {
        let mut b = Vec::with_capacity(DOMAIN.len() + 8 + 32 + 4 + 16 + 8 + 8 + 8 + 32);
        b.extend_from_slice(DOMAIN);
        b.extend_from_slice(&self.device_id.0.to_be_bytes());
        b.extend_from_slice(&self.wg_public_key.0);
        b.extend_from_slice(&self.ipv4.octets());
        b.extend_from_slice(&self.ipv6.octets());
        b.extend_from_slice(&self.not_before_ms.to_be_bytes());
        b.extend_from_slice(&self.not_after_ms.to_be_bytes());
        b.extend_from_slice(&self.serial.to_be_bytes());
        b.extend_from_slice(issuer.as_bytes());
        b
    }

    /// Signs with the coordinator's key.
    pub fn sign(self, key: &SigningKey) -> SignedLease {
        let sig = key.sign(&self.signed_bytes(&key.verifying_key()));
        SignedLease {
            lease: self,
            signature: Bytes(sig.to_bytes().to_vec()),
        }
    }
}

impl SignedLease {
    /// Signature and time window, against the pinned coordinator key and coordinator time.
    pub fn verify(&self, issuer: &VerifyingKey, now_ms: i64) -> Result<&Lease, LeaseError> {
        self.verify_signature(issuer)?;
        self.check_window(now_ms)
    }

    /// The signature alone, against the pinned coordinator key.
    pub fn verify_signature(&self, issuer: &VerifyingKey) -> Result<(), LeaseError> {
        let sig = self.signature().ok_or(LeaseError::BadSignature)?;
        issuer
            .verify(&self.lease.signed_bytes(issuer), &sig)
            .map_err(|_| LeaseError::BadSignature)
    }

    /// The signature as the verifier reads it: `None` unless it is 64 bytes.
    fn signature(&self) -> Option<Signature> {
        let sig: [u8; 64] = self.signature.0.as_slice().try_into().ok()?;
        Some(Signature::from_bytes(&sig))
    }

    /// The time window alone, in coordinator time: for a lease whose signature was verified.
    pub fn check_window(&self, now_ms: i64) -> Result<&Lease, LeaseError> {
        let l = &self.lease;
        if l.not_after_ms <= l.not_before_ms {
            return Err(LeaseError::Inverted);
        }
        if now_ms >= l.not_after_ms {
            return Err(LeaseError::Expired {
                serial: l.serial,
                ago_ms: now_ms - l.not_after_ms,
            });
        }
        if now_ms + NOT_BEFORE_SKEW_MS < l.not_before_ms {
            return Err(LeaseError::NotYetValid {
                serial: l.serial,
                in_ms: l.not_before_ms - now_ms,
            });
        }
        Ok(l)
    }

    /// `verify`, and the lease must be for this device and these addresses.
    pub fn verify_for(
        &self,
        issuer: &VerifyingKey,
        now_ms: i64,
        device: DeviceId,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Result<&Lease, LeaseError> {
        self.verify_signature(issuer)?;
        self.check_for(now_ms, device, ipv4, ipv6)
    }

    /// `verify_for` without the signature: the time window and the owner, for a lease whose
    /// signature (these exact fields, this issuer) was verified before.
    pub fn check_for(
        &self,
        now_ms: i64,
        device: DeviceId,
        ipv4: Ipv4Addr,
        ipv6: Ipv6Addr,
    ) -> Result<&Lease, LeaseError> {
        let l = self.check_window(now_ms)?;
        if l.device_id != device || l.ipv4 != ipv4 || l.ipv6 != ipv6 {
            return Err(LeaseError::WrongOwner {
                serial: l.serial,
                lease_device: l.device_id,
                lease_addrs: format!("{}/{}", l.ipv4, l.ipv6),
                expected: format!("{device} at {ipv4}/{ipv6}"),
            });
        }
        Ok(l)
    }
}

/// Parses a 32-byte Ed25519 public key.
pub fn issuer_key(bytes: &[u8]) -> Option<VerifyingKey> {
    let arr: [u8; 32] = bytes.try_into().ok()?;
    VerifyingKey::from_bytes(&arr).ok()
}

/// Below this many leases one batch costs more than verifying each.
const BATCH_FROM: usize = 4;

/// Whether each of `leases` carries a valid signature under `issuer`: for each, what
/// [`SignedLease::verify_signature`] says. Many at once (a full netmap's peers) are checked
/// in one Ed25519 batch verification, which costs well under a single verification per
/// signature; only if the batch fails is each checked alone, to tell which. The batch draws
/// its random weights from a transcript of its inputs, not from the OS, so the answer is
/// deterministic.
pub fn verify_signatures(leases: &[&SignedLease], issuer: &VerifyingKey) -> Vec<bool> {
    let one_by_one = |leases: &[&SignedLease]| -> Vec<bool> {
        leases
            .iter()
            .map(|l| l.verify_signature(issuer).is_ok())
            .collect()
    };
    if leases.len() < BATCH_FROM {
        return one_by_one(leases);
    }
    let sigs: Option<Vec<Signature>> = leases.iter().map(|l| l.signature()).collect();
    let Some(sigs) = sigs else {
        return one_by_one(leases);
    };
    let bytes: Vec<Vec<u8>> = leases
        .iter()
        .map(|l| l.lease.signed_bytes(issuer))
        .collect();
    let messages: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
    let keys = vec![*issuer; leases.len()];
    match ed25519_dalek::verify_batch(&messages, &sigs, &keys) {
        Ok(()) => vec![true; leases.len()],
        Err(_) => one_by_one(leases),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn lease() -> Lease {
        Lease {
            device_id: DeviceId(7),
            wg_public_key: WgPublicKey([9; 32]),
            ipv4: Ipv4Addr::new(100, 64, 0, 7),
            ipv6: "fd00::7".parse().unwrap(),
            not_before_ms: 1_000_000,
            not_after_ms: 1_600_000,
            serial: 42,
        }
    }

    #[test]
    fn a_batch_says_what_each_verification_says() {
        let k = key(1);
        let issuer = k.verifying_key();
        let mut leases: Vec<SignedLease> = (0..12u64)
            .map(|i| {
                let mut l = lease();
                l.serial = i;
                l.sign(&k)
            })
            .collect();
        let all: Vec<&SignedLease> = leases.iter().collect();
        assert_eq!(verify_signatures(&all, &issuer), vec![true; 12]);
        // Altered after signing, signed by another key, a signature of the wrong length.
        leases[3].lease.not_after_ms += 1;
        leases[7] = {
            let mut l = lease();
            l.serial = 7;
            l.sign(&key(2))
        };
        leases[9].signature.0.pop();
        for n in [2, 12] {
            let some: Vec<&SignedLease> = leases.iter().take(n).collect();
            let want: Vec<bool> = some
                .iter()
                .map(|l| l.verify_signature(&issuer).is_ok())
                .collect();
            assert_eq!(verify_signatures(&some, &issuer), want);
        }
        let got = verify_signatures(&leases.iter().collect::<Vec<_>>(), &issuer);
        let bad: Vec<usize> = (0..12).filter(|i| !got[*i]).collect();
        assert_eq!(bad, [3, 7, 9]);
        // Under another issuer nothing verifies, batched or not.
        let other = key(3).verifying_key();
        assert!(verify_signatures(&all_of(&leases), &other)
            .iter()
            .all(|ok| !ok));
    }

    fn all_of(l: &[SignedLease]) -> Vec<&SignedLease> {
        l.iter().collect()
    }

    #[test]
    fn valid_lease_verifies() {
        let k = key(1);
        let s = lease().sign(&k);
        let l = s
            .verify_for(
                &k.verifying_key(),
                1_000_001,
                DeviceId(7),
                lease().ipv4,
                lease().ipv6,
            )
            .unwrap();
        assert_eq!(l.serial, 42);
    }

    #[test]
    fn forged_altered_foreign_expired_and_misowned_are_refused() {
        let k = key(1);
        let vk = k.verifying_key();
        let s = lease().sign(&k);
        // Altered field.
        let mut t = s.clone();
        t.lease.not_after_ms += 1_000_000;
        assert_eq!(t.verify(&vk, 1_000_001), Err(LeaseError::BadSignature));
        // Altered key.
        let mut t = s.clone();
        t.lease.wg_public_key = WgPublicKey([8; 32]);
        assert_eq!(t.verify(&vk, 1_000_001), Err(LeaseError::BadSignature));
        // Garbage signature.
        let mut t = s.clone();
        t.signature = Bytes(vec![0; 12]);
        assert_eq!(t.verify(&vk, 1_000_001), Err(LeaseError::BadSignature));
        // Another coordinator's lease.
        let other = lease().sign(&key(2));
        assert_eq!(other.verify(&vk, 1_000_001), Err(LeaseError::BadSignature));
        // Expired, and not yet valid (beyond the skew).
        assert!(matches!(
            s.verify(&vk, 1_600_000),
            Err(LeaseError::Expired { ago_ms: 0, .. })
        ));
        assert!(matches!(
            s.verify(&vk, 1_000_000 - NOT_BEFORE_SKEW_MS - 1),
            Err(LeaseError::NotYetValid { .. })
        ));
        assert!(s.verify(&vk, 1_000_000 - NOT_BEFORE_SKEW_MS + 1).is_ok());
        // Someone else's addresses.
        let e = s
            .verify_for(
                &vk,
                1_000_001,
                DeviceId(7),
                Ipv4Addr::new(100, 64, 0, 8),
                lease().ipv6,
            )
            .unwrap_err();
        assert!(matches!(e, LeaseError::WrongOwner { .. }), "{e}");
        assert!(s
            .verify_for(&vk, 1_000_001, DeviceId(8), lease().ipv4, lease().ipv6)
            .is_err());
        // Inverted validity, even if signed.
        let mut inv = lease();
        inv.not_after_ms = inv.not_before_ms;
        assert_eq!(
            inv.sign(&k).verify(&vk, 1_000_000),
            Err(LeaseError::Inverted)
        );
    }

    /// A version-1 lease as first written: must keep decoding and verifying, byte for byte.
    #[test]
    fn golden_v1_lease() {
        let golden = r#"{"device_id":7,"wg_public_key":"CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=","ipv4":"100.64.0.7","ipv6":"fd00::7","not_before_ms":1000000,"not_after_ms":1600000,"serial":42,"signature":"Vs0A25QwL3mIguWXWwoLjXhFFsMvOSf5foAlR4W1/66OneSOvTbiAqjtq41p+c6m4qgjiBnuESTc2i5kPSS0Aw=="}"#;
        let k = key(1);
        let back: SignedLease = serde_json::from_str(golden).unwrap();
        assert_eq!(back.lease, lease());
        assert!(back.verify(&k.verifying_key(), 1_000_001).is_ok());
        // Ed25519 is deterministic: signing the same lease reproduces the golden bytes.
        assert_eq!(serde_json::to_string(&lease().sign(&k)).unwrap(), golden);
    }
}
