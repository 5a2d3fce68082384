//! Proof that a device holds the private half of the WireGuard key it asks a lease for.
//!
//! WireGuard keys are X25519 keys: they cannot sign, but they can agree. The proof is a MAC
//! keyed by the Diffie-Hellman of the device's WireGuard private key with the coordinator's
//! lease key, taken as an X25519 key (the Montgomery form of the Ed25519 lease-verifying key
//! every device pinned at enrollment; the coordinator uses the matching scalar of its signing
//! key, as `crypto_sign_ed25519_sk_to_curve25519` does):
//!
//! ```text
//! device:      s = X25519(wg_private, montgomery(lease_verifying_key))
//! coordinator: s = X25519(scalar(lease_signing_key), wg_public)
//! proof = HMAC-SHA256(key = s, "ward lease key proof v1" || device id (u64 BE) || wg_public)
//! ```
//!
//! Only the holder of `wg_private` (or of the coordinator's signing key) can compute `s`, so a
//! device that copies a peer's public key from its netmap cannot lease it. The proof names the
//! requesting device, so it is worthless to any other device; a replay by the same device for
//! the same key asks for what it could ask for anyway. A low-order "public key" (for which `s`
//! is known to everyone) is refused. The MAC is compared in constant time.
//!
//! No I/O, no randomness: both sides are pure functions of their inputs.

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::wire::{DeviceId, WgPublicKey};

const DOMAIN: &[u8] = b"ward lease key proof v1";

/// A key-possession proof: 32 bytes, base64 in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyProof(pub [u8; 32]);

impl std::fmt::Debug for KeyProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyProof(..)")
    }
}
impl TryFrom<String> for KeyProof {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        WgPublicKey::try_from(s)
            .map(|k| KeyProof(k.0))
            .map_err(|_| "key proof is not 32 bytes of base64".to_string())
    }
}
impl From<KeyProof> for String {
    fn from(p: KeyProof) -> String {
        WgPublicKey(p.0).to_base64()
    }
}

/// Why a proof was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the key is a low-order point, not a WireGuard public key")]
    WeakKey,
    #[error("the proof does not show possession of the key's private half")]
    Mismatch,
}

/// The WireGuard public key of `wg_private`.
pub fn public_for(wg_private: &[u8; 32]) -> WgPublicKey {
    WgPublicKey(PublicKey::from(&StaticSecret::from(*wg_private)).to_bytes())
}

/// The device's proof for `public` (the public half of `wg_private`), against the pinned
/// lease key. `None` if the lease key is not a valid curve point or the DH is degenerate.
pub fn prove(
    wg_private: &[u8; 32],
    lease_key: &VerifyingKey,
    device: DeviceId,
    public: &WgPublicKey,
) -> Option<KeyProof> {
    let theirs = PublicKey::from(lease_key.to_montgomery().to_bytes());
    let shared = StaticSecret::from(*wg_private).diffie_hellman(&theirs);
    if !shared.was_contributory() {
        return None;
    }
    Some(KeyProof(mac(shared.as_bytes(), device, public)))
}

/// The coordinator's check of `proof` for device `device` asking a lease on `public`.
pub fn verify(
    signer: &SigningKey,
    device: DeviceId,
    public: &WgPublicKey,
    proof: &KeyProof,
) -> Result<(), ProofError> {
    let ours = StaticSecret::from(signer.to_scalar_bytes());
    let shared = ours.diffie_hellman(&PublicKey::from(public.0));
    if !shared.was_contributory() {
        return Err(ProofError::WeakKey);
    }
    let want = mac(shared.as_bytes(), device, public);
    // Constant time: the comparison leaks nothing about where the first difference is.
    let diff = want
        .iter()
        .zip(proof.0.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff == 0 {
        Ok(())
    } else {
        Err(ProofError::Mismatch)
    }
}

/// HMAC-SHA256 (RFC 2104) of the domain, device and key, keyed by the shared secret.
fn mac(key: &[u8; 32], device: DeviceId, public: &WgPublicKey) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(DOMAIN)
        .chain_update(device.0.to_be_bytes())
        .chain_update(public.0)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wg(seed: u8) -> ([u8; 32], WgPublicKey) {
        let private = [seed; 32];
        let public = PublicKey::from(&StaticSecret::from(private)).to_bytes();
        (private, WgPublicKey(public))
    }

    #[test]
    fn the_holder_proves_and_nobody_else_does() {
        let coord = SigningKey::from_bytes(&[7; 32]);
        let (private, public) = wg(1);
        let d = DeviceId(5);
        let p = prove(&private, &coord.verifying_key(), d, &public).unwrap();
        assert_eq!(verify(&coord, d, &public, &p), Ok(()));
        // Bound to the device: another device cannot present it.
        assert_eq!(
            verify(&coord, DeviceId(6), &public, &p),
            Err(ProofError::Mismatch)
        );
        // Another private key (an attacker's) proves nothing about this public key.
        let (other, _) = wg(2);
        let forged = prove(&other, &coord.verifying_key(), d, &public).unwrap();
        assert_eq!(
            verify(&coord, d, &public, &forged),
            Err(ProofError::Mismatch)
        );
        // Against another coordinator's key: refused.
        let elsewhere = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            verify(&elsewhere, d, &public, &p),
            Err(ProofError::Mismatch)
        );
        assert_eq!(
            verify(&coord, d, &public, &KeyProof([0; 32])),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn low_order_keys_are_refused() {
        let coord = SigningKey::from_bytes(&[7; 32]);
        // The identity and a point of order 8: their DH is all zeros, known to everyone.
        for weak in [[0u8; 32], {
            let mut k = [0u8; 32];
            k[0] = 1;
            k
        }] {
            let p = KeyProof(mac(&[0; 32], DeviceId(1), &WgPublicKey(weak)));
            assert_eq!(
                verify(&coord, DeviceId(1), &WgPublicKey(weak), &p),
                Err(ProofError::WeakKey)
            );
        }
    }

    #[test]
    fn proofs_round_trip_as_base64() {
        let p = KeyProof([9; 32]);
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<KeyProof>(&j).unwrap(), p);
        assert!(serde_json::from_str::<KeyProof>("\"AAAA\"").is_err());
    }

    #[test]
    fn hmac_matches_rfc_4231_shape() {
        // HMAC-SHA256 with a 32-byte key: the construction, checked against a direct
        // computation of H(K^opad || H(K^ipad || m)).
        let key = [0x0bu8; 32];
        let m = mac(&key, DeviceId(1), &WgPublicKey([2; 32]));
        let mut msg = DOMAIN.to_vec();
        msg.extend(1u64.to_be_bytes());
        msg.extend([2u8; 32]);
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&key);
        let ip: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(msg).collect();
        let inner = Sha256::digest(&ip);
        let op: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(inner).collect();
        assert_eq!(m, <[u8; 32]>::from(Sha256::digest(&op)));
    }
}
