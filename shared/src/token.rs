//! Enrollment tokens: `ward1-` followed by base64url of
//! `len(addr) u8 | addr | ca_sha256 [32] | id [8] | secret [32]`, then, only when the instance
//! has more than one coordinator address, `count u8 | (len(addr) u8 | addr) × count` with the
//! other addresses (replicas the device may fail over to).
//!
//! A token with one address is byte-for-byte what the first version minted, so old tokens parse
//! (as one address) and one-address tokens still work with agents that predate the extension;
//! an agent that predates it refuses a several-address token as malformed (trailing bytes).
//!
//! The token tells the device where the coordinator is and which CA to pin (so there is no
//! trust-on-first-use), and carries a secret whose SHA-256 alone the coordinator stores.

use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::fmt;

pub const TOKEN_PREFIX: &str = "ward1-";
pub const TOKEN_ID_LEN: usize = 8;
pub const TOKEN_SECRET_LEN: usize = 32;
/// Longest coordinator address a token may carry (a DNS name plus port).
pub const MAX_ADDR_LEN: usize = 255;
/// Most coordinator addresses a token (or a netmap) carries, the first one included.
pub const MAX_COORDINATORS: usize = 8;
const MAX_TOKEN_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Ward enrollment token (it should start with {TOKEN_PREFIX:?})")]
    Prefix,
    #[error("enrollment token is not valid base64url")]
    Encoding,
    #[error("enrollment token is truncated or has trailing bytes")]
    Length,
    #[error("enrollment token's coordinator address is not valid UTF-8")]
    Address,
    #[error("enrollment token carries more than {MAX_COORDINATORS} coordinator addresses")]
    TooManyAddresses,
}

/// A parsed enrollment token. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    /// The address the device dials first.
    pub coordinator: String,
    /// The instance's other coordinator addresses, in order (empty for one coordinator).
    pub alternates: Vec<String>,
    pub ca_sha256: [u8; 32],
    pub id: [u8; TOKEN_ID_LEN],
    pub secret: Secret,
}

impl EnrollToken {
    pub fn encode(&self) -> String {
        let addr = self.coordinator.as_bytes();
        let addr = &addr[..addr.len().min(MAX_ADDR_LEN)];
        let mut raw = Vec::with_capacity(1 + addr.len() + 32 + TOKEN_ID_LEN + TOKEN_SECRET_LEN);
        raw.push(addr.len() as u8);
        raw.extend_from_slice(addr);
        raw.extend_from_slice(&self.ca_sha256);
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.secret.expose());
        let alternates: Vec<&[u8]> = self
            .alternates
            .iter()
            .map(|a| &a.as_bytes()[..a.len().min(MAX_ADDR_LEN)])
            .take(MAX_COORDINATORS - 1)
            .collect();
        if !alternates.is_empty() {
            raw.push(alternates.len() as u8);
            for a in alternates {
                raw.push(a.len() as u8);
                raw.extend_from_slice(a);
            }
        }
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw))
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let s = s.trim();
        let body = s.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        if body.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Length);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Encoding)?;
        let (&alen, rest) = raw.split_first().ok_or(TokenError::Length)?;
        let alen = alen as usize;
        if rest.len() < alen + 32 + TOKEN_ID_LEN + TOKEN_SECRET_LEN {
            return Err(TokenError::Length);
        }
        let (addr, rest) = rest.split_at(alen);
        let (ca, rest) = rest.split_at(32);
        let (id, rest) = rest.split_at(TOKEN_ID_LEN);
        let (secret, extension) = rest.split_at(TOKEN_SECRET_LEN);
        let coordinator = std::str::from_utf8(addr)
            .map_err(|_| TokenError::Address)?
            .to_string();
        let alternates = parse_alternates(extension)?;
        let mut ca_sha256 = [0u8; 32];
        ca_sha256.copy_from_slice(ca);
        let mut idb = [0u8; TOKEN_ID_LEN];
        idb.copy_from_slice(id);
        Ok(Self {
            coordinator,
            alternates,
            ca_sha256,
            id: idb,
            secret: Secret::new(secret.to_vec()),
        })
    }

    /// Every coordinator address the token carries, the first one first.
    pub fn coordinators(&self) -> Vec<String> {
        std::iter::once(self.coordinator.clone())
            .chain(self.alternates.iter().cloned())
            .collect()
    }

    /// The token's public identifier, as stored and shown by `token ls`.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

/// The optional tail after the secret: `count u8 | (len u8 | addr) × count`, nothing after it.
/// Empty means one address (a token minted before the extension, or for one coordinator).
fn parse_alternates(mut raw: &[u8]) -> Result<Vec<String>, TokenError> {
    let Some((&count, rest)) = raw.split_first() else {
        return Ok(Vec::new());
    };
    let count = count as usize;
    if count == 0 {
        return Err(TokenError::Length);
    }
    if count >= MAX_COORDINATORS {
        return Err(TokenError::TooManyAddresses);
    }
    raw = rest;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (&len, rest) = raw.split_first().ok_or(TokenError::Length)?;
        let len = len as usize;
        if len == 0 || rest.len() < len {
            return Err(TokenError::Length);
        }
        let (addr, rest) = rest.split_at(len);
        out.push(
            std::str::from_utf8(addr)
                .map_err(|_| TokenError::Address)?
                .to_string(),
        );
        raw = rest;
    }
    if !raw.is_empty() {
        return Err(TokenError::Length);
    }
    Ok(out)
}

impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollToken")
            .field("coordinator", &self.coordinator)
            .field("alternates", &self.alternates)
            .field("ca_sha256", &hex::encode(self.ca_sha256))
            .field("id", &self.id_hex())
            .field("secret", &self.secret)
            .finish()
    }
}

/// What the coordinator stores for a token secret.
pub fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_literal_address_round_trips() {
        for coordinator in [
            "[fd00:77::1]:7443",
            "[2001:db8::1]:443",
            "coord.example:7443",
        ] {
            let t = EnrollToken {
                coordinator: coordinator.into(),
                ..sample()
            };
            let back = EnrollToken::parse(&t.encode()).unwrap();
            assert_eq!(back, t);
            assert_eq!(back.coordinator, coordinator);
            assert!(
                back.coordinator.parse::<std::net::SocketAddr>().is_ok()
                    || !coordinator.starts_with('[')
            );
        }
    }

    fn sample() -> EnrollToken {
        EnrollToken {
            coordinator: "10.99.0.1:7443".into(),
            alternates: Vec::new(),
            ca_sha256: [7; 32],
            id: [1, 2, 3, 4, 5, 6, 7, 8],
            secret: Secret::new(vec![9; 32]),
        }
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let s = t.encode();
        assert!(s.starts_with("ward1-"));
        assert_eq!(EnrollToken::parse(&s).unwrap(), t);
        assert_eq!(EnrollToken::parse(&format!("  {s}\n")).unwrap(), t);
    }

    #[test]
    fn golden() {
        // A token minted by version 1 must keep parsing.
        let s = "ward1-DjEwLjk5LjAuMTo3NDQzBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcBAgMEBQYHCAkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJ";
        assert_eq!(EnrollToken::parse(s).unwrap(), sample());
        assert_eq!(sample().encode(), s);
    }

    #[test]
    fn several_addresses_round_trip_and_old_tokens_give_one() {
        let t = EnrollToken {
            alternates: vec!["10.99.0.2:7443".into(), "[fd00:77::3]:7443".into()],
            ..sample()
        };
        let s = t.encode();
        let back = EnrollToken::parse(&s).unwrap();
        assert_eq!(back, t);
        assert_eq!(
            back.coordinators(),
            ["10.99.0.1:7443", "10.99.0.2:7443", "[fd00:77::3]:7443"]
        );
        // One address encodes exactly as before the extension (the golden test pins it).
        assert_eq!(sample().coordinators(), ["10.99.0.1:7443"]);
        assert!(s.len() > sample().encode().len());
        // Every truncation of the extension is an error, never a panic or a silent drop.
        let raw = URL_SAFE_NO_PAD.decode(&s["ward1-".len()..]).unwrap();
        let base = raw.len() - (1 + 1 + 14 + 1 + 17);
        for cut in base + 1..raw.len() {
            let short = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(&raw[..cut]));
            assert_eq!(EnrollToken::parse(&short), Err(TokenError::Length), "{cut}");
        }
        // Trailing garbage after the list, a zero count, too many addresses: refused.
        let mut extra = raw.clone();
        extra.push(1);
        let enc = |r: &[u8]| format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(r));
        assert_eq!(EnrollToken::parse(&enc(&extra)), Err(TokenError::Length));
        let mut zero = raw[..base].to_vec();
        zero.push(0);
        assert_eq!(EnrollToken::parse(&enc(&zero)), Err(TokenError::Length));
        let mut many = raw[..base].to_vec();
        many.push(MAX_COORDINATORS as u8);
        for _ in 0..MAX_COORDINATORS {
            many.extend_from_slice(&[3, b'a', b':', b'1']);
        }
        assert_eq!(
            EnrollToken::parse(&enc(&many)),
            Err(TokenError::TooManyAddresses)
        );
        // The encoder never writes more than the parser accepts.
        let wide = EnrollToken {
            alternates: (0..20).map(|i| format!("h{i}:1")).collect(),
            ..sample()
        };
        let back = EnrollToken::parse(&wide.encode()).unwrap();
        assert_eq!(back.coordinators().len(), MAX_COORDINATORS);
    }

    #[test]
    fn debug_hides_secret() {
        let d = format!("{:?}", sample());
        assert!(!d.contains("9, 9"), "{d}");
        assert!(d.contains("redacted"));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(EnrollToken::parse("hello"), Err(TokenError::Prefix));
        assert_eq!(EnrollToken::parse("ward1-!!!"), Err(TokenError::Encoding));
        assert_eq!(EnrollToken::parse("ward1-"), Err(TokenError::Length));
        let s = sample().encode();
        assert_eq!(
            EnrollToken::parse(&s[..s.len() - 4]),
            Err(TokenError::Length)
        );
        let long = format!("ward1-{}", "A".repeat(5000));
        assert_eq!(EnrollToken::parse(&long), Err(TokenError::Length));
        // Every truncation is an error, never a panic.
        for i in 0..s.len() {
            let _ = EnrollToken::parse(&s[..i]);
        }
    }
}
