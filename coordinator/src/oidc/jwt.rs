//! I/O-free JSON Web Signature and token checks for the OpenID Connect relying party: ID tokens
//! (after a device sign-in or a refresh) and back-channel logout tokens.
//!
//! Only asymmetric algorithms are accepted: RS256, ES256 and EdDSA (Ed25519), verified with
//! `ring` against the provider's JWKS. `alg: none` and every HMAC algorithm are refused before
//! any key is looked at (an HS256 token "signed" with the provider's public key as the secret is
//! the classic confusion attack). Time arrives as an argument; nothing here reads a clock.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

/// Longest compact JWS accepted (ID tokens with many groups stay well below).
pub const MAX_JWT_LEN: usize = 32 * 1024;
/// Clock skew tolerated on `exp`, `iat` and `nbf`.
pub const SKEW_MS: i64 = 60_000;
/// A logout token older than this (by `iat`) is refused.
pub const LOGOUT_MAX_AGE_MS: i64 = 5 * 60_000;
/// The `events` member a back-channel logout token must carry.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// Why a token was refused. The messages are what `ward up --login` and the audit rows show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token uses alg none (unsigned): refused")]
    AlgNone,
    #[error("token uses the symmetric algorithm {0}: only RS256, ES256 and EdDSA are accepted")]
    Symmetric(String),
    #[error("token uses the unsupported algorithm {0}")]
    UnsupportedAlg(String),
    #[error("token is signed with key {0:?}, which the provider's key set does not hold")]
    UnknownKid(String),
    #[error("token signature does not verify against the provider's keys")]
    BadSignature,
    #[error("token issuer {got:?} is not the configured issuer {want:?}")]
    WrongIssuer { got: String, want: String },
    #[error("token audience {got:?} does not include this coordinator's client id {want:?}")]
    WrongAudience { got: String, want: String },
    #[error("token authorized party (azp) {0:?} is not this coordinator's client id")]
    WrongAzp(String),
    #[error("token expired {0} s ago")]
    Expired(i64),
    #[error("token is issued in the future (iat {0} s ahead)")]
    IssuedInFuture(i64),
    #[error("token nonce does not match this sign-in (replayed or foreign token)")]
    NonceMismatch,
    #[error("token nonce was already used by an earlier sign-in (replay)")]
    NonceReplayed,
    #[error(
        "token was issued {0} s before this sign-in started (an earlier sign-in's token: replay)"
    )]
    IssuedBeforeSignIn(i64),
    #[error(
        "token at_hash does not match the access token it came with (a token from another sign-in)"
    )]
    AtHash,
    #[error("token lacks the claim {0}")]
    Missing(&'static str),
    #[error("logout token {0}")]
    Logout(&'static str),
}

/// A signing algorithm this relying party accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    EdDsa,
}

/// One provider key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// Modulus and exponent, big-endian.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point `04 || x || y`.
    P256(Vec<u8>),
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub key: PublicKey,
}

/// The provider's key set. Keys of other types (symmetric `oct`, encryption-only keys,
/// unsupported curves) are skipped, never an error: providers publish those too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

fn b64(s: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed("bad base64url".into()))
}

impl Jwks {
    pub fn parse(body: &[u8]) -> Result<Self, JwtError> {
        let raw: RawJwks = serde_json::from_slice(body)
            .map_err(|e| JwtError::Malformed(format!("key set: {e}")))?;
        let mut keys = Vec::new();
        for k in raw.keys {
            if k.use_.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (k.kty.as_str(), k.crv.as_deref()) {
                ("RSA", _) => match (&k.n, &k.e) {
                    (Some(n), Some(e)) => PublicKey::Rsa {
                        n: b64(n)?,
                        e: b64(e)?,
                    },
                    _ => continue,
                },
                ("EC", Some("P-256")) => match (&k.x, &k.y) {
                    (Some(x), Some(y)) => {
                        let (x, y) = (b64(x)?, b64(y)?);
                        if x.len() != 32 || y.len() != 32 {
                            continue;
                        }
                        let mut p = vec![4u8];
                        p.extend_from_slice(&x);
                        p.extend_from_slice(&y);
                        PublicKey::P256(p)
                    }
                    _ => continue,
                },
                ("OKP", Some("Ed25519")) => match &k.x {
                    Some(x) => PublicKey::Ed25519(b64(x)?),
                    None => continue,
                },
                _ => continue,
            };
            keys.push(Jwk { kid: k.kid, key });
        }
        Ok(Jwks { keys })
    }
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A compact JWS, split and decoded but not yet verified.
#[derive(Debug)]
pub struct Jws {
    pub alg: Alg,
    pub kid: Option<String>,
    signing_input: String,
    signature: Vec<u8>,
    payload: Vec<u8>,
}

impl Jws {
    /// Splits and decodes `token`; refuses `none`, HMAC and unknown algorithms here.
    pub fn parse(token: &str) -> Result<Self, JwtError> {
        let token = token.trim();
        if token.len() > MAX_JWT_LEN {
            return Err(JwtError::Malformed(format!(
                "longer than {MAX_JWT_LEN} bytes"
            )));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("not three dot-separated parts".into()));
        };
        let header: Header = serde_json::from_slice(&b64(h)?)
            .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
        let alg = match header.alg.as_str() {
            "RS256" => Alg::Rs256,
            "ES256" => Alg::Es256,
            "EdDSA" => Alg::EdDsa,
            a if a.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
            a if a.starts_with("HS") => return Err(JwtError::Symmetric(a.to_string())),
            a => return Err(JwtError::UnsupportedAlg(a.chars().take(32).collect())),
        };
        Ok(Jws {
            alg,
            kid: header.kid,
            signing_input: format!("{h}.{p}"),
            signature: b64(s)?,
            payload: b64(p)?,
        })
    }

    /// Verifies the signature with the key `kid` names (or, without a `kid`, any key of the
    /// algorithm's type). [`JwtError::UnknownKid`] tells the caller to refetch the key set once.
    pub fn verify(&self, jwks: &Jwks) -> Result<&[u8], JwtError> {
        use ring::signature as sig;
        let candidates: Vec<&Jwk> = match &self.kid {
            Some(kid) => {
                let found: Vec<&Jwk> = jwks
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if found.is_empty() {
                    return Err(JwtError::UnknownKid(kid.chars().take(64).collect()));
                }
                found
            }
            None => jwks.keys.iter().collect(),
        };
        let msg = self.signing_input.as_bytes();
        for k in candidates {
            let ok = match (self.alg, &k.key) {
                (Alg::Rs256, PublicKey::Rsa { n, e }) => sig::RsaPublicKeyComponents { n, e }
                    .verify(&sig::RSA_PKCS1_2048_8192_SHA256, msg, &self.signature)
                    .is_ok(),
                (Alg::Es256, PublicKey::P256(p)) => {
                    sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, p)
                        .verify(msg, &self.signature)
                        .is_ok()
                }
                (Alg::EdDsa, PublicKey::Ed25519(x)) => {
                    sig::UnparsedPublicKey::new(&sig::ED25519, x)
                        .verify(msg, &self.signature)
                        .is_ok()
                }
                _ => false,
            };
            if ok {
                return Ok(&self.payload);
            }
        }
        Err(JwtError::BadSignature)
    }
}

/// What an ID token must satisfy.
#[derive(Debug, Clone)]
pub struct IdTokenRules<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The nonce this sign-in sent: a token carrying another one is refused.
    pub nonce: Option<&'a str>,
    /// Whether the token must carry the nonce (the authorization code flow). Device-flow ID
    /// tokens may lack it (providers do not carry it over): `not_before_ms` and `at_hash` bind
    /// those to this sign-in instead.
    pub nonce_required: bool,
    /// The token must be issued at or after this (less [`REPLAY_SKEW_MS`]): an older token is
    /// from an earlier sign-in (a replay).
    pub not_before_ms: Option<i64>,
    /// The access token that came with the ID token: its `at_hash`, when present, must match.
    pub access_token: Option<&'a str>,
    pub alg: Alg,
    pub now_ms: i64,
}

/// Clock difference tolerated between the provider and the coordinator when judging whether an
/// ID token was issued during this sign-in.
pub const REPLAY_SKEW_MS: i64 = 5_000;

/// The claims Ward uses from a verified ID token (or userinfo).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdClaims {
    pub sub: String,
    pub email: Option<String>,
    pub preferred_username: Option<String>,
    pub groups: Vec<String>,
    pub amr: Vec<String>,
    /// `auth_time` in ms (when the user last actively authenticated).
    pub auth_time_ms: Option<i64>,
    pub sid: Option<String>,
    pub nonce: Option<String>,
    pub exp_ms: i64,
    pub iat_ms: i64,
}

fn str_claim(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn num_claim(v: &Value, k: &str) -> Option<i64> {
    v.get(k)
        .and_then(|x| x.as_i64().or_else(|| x.as_f64().map(|f| f as i64)))
}

/// A string-or-array claim as a list of strings (others ignored), bounded.
pub fn str_list(v: &Value, k: &str) -> Vec<String> {
    match v.get(k) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .take(256)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn check_iss_aud(v: &Value, issuer: &str, client_id: &str) -> Result<(), JwtError> {
    let iss = str_claim(v, "iss").ok_or(JwtError::Missing("iss"))?;
    if iss != issuer {
        return Err(JwtError::WrongIssuer {
            got: iss,
            want: issuer.to_string(),
        });
    }
    let aud = str_list(v, "aud");
    if aud.is_empty() {
        return Err(JwtError::Missing("aud"));
    }
    if !aud.iter().any(|a| a == client_id) {
        return Err(JwtError::WrongAudience {
            got: aud.join(","),
            want: client_id.to_string(),
        });
    }
    match str_claim(v, "azp") {
        Some(azp) if azp != client_id => return Err(JwtError::WrongAzp(azp)),
        None if aud.len() > 1 => return Err(JwtError::Missing("azp")),
        _ => {}
    }
    Ok(())
}

/// Checks a verified ID token's claims (OpenID Connect Core 3.1.3.7).
pub fn check_id_token(payload: &[u8], r: &IdTokenRules<'_>) -> Result<IdClaims, JwtError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    check_iss_aud(&v, r.issuer, r.client_id)?;
    let exp_ms = num_claim(&v, "exp").ok_or(JwtError::Missing("exp"))? * 1000;
    let iat_ms = num_claim(&v, "iat").ok_or(JwtError::Missing("iat"))? * 1000;
    if exp_ms + SKEW_MS <= r.now_ms {
        return Err(JwtError::Expired((r.now_ms - exp_ms) / 1000));
    }
    if iat_ms > r.now_ms + SKEW_MS {
        return Err(JwtError::IssuedInFuture((iat_ms - r.now_ms) / 1000));
    }
    let nonce = str_claim(&v, "nonce");
    match (r.nonce, nonce.as_deref()) {
        (Some(want), Some(got)) if want != got => return Err(JwtError::NonceMismatch),
        (Some(_), None) if r.nonce_required => return Err(JwtError::NonceMismatch),
        _ => {}
    }
    if let Some(nb) = r.not_before_ms {
        // The user authenticated during this sign-in: a token of an earlier one (even
        // refreshed since, with a recent `iat`) carries that sign-in's `auth_time`.
        let at = num_claim(&v, "auth_time").map_or(iat_ms, |t| t * 1000);
        let first = at.min(iat_ms);
        if first + REPLAY_SKEW_MS < nb {
            return Err(JwtError::IssuedBeforeSignIn((nb - first) / 1000));
        }
    }
    if let (Some(at), Some(want)) = (r.access_token, str_claim(&v, "at_hash")) {
        let digest: Vec<u8> = match r.alg {
            Alg::Rs256 | Alg::Es256 => ring::digest::digest(&ring::digest::SHA256, at.as_bytes())
                .as_ref()
                .to_vec(),
            Alg::EdDsa => ring::digest::digest(&ring::digest::SHA512, at.as_bytes())
                .as_ref()
                .to_vec(),
        };
        if URL_SAFE_NO_PAD.encode(&digest[..digest.len() / 2]) != want {
            return Err(JwtError::AtHash);
        }
    }
    let sub = str_claim(&v, "sub").ok_or(JwtError::Missing("sub"))?;
    if sub.is_empty() || sub.len() > 255 {
        return Err(JwtError::Malformed(
            "sub is empty or longer than 255".into(),
        ));
    }
    Ok(IdClaims {
        sub,
        email: str_claim(&v, "email"),
        preferred_username: str_claim(&v, "preferred_username"),
        groups: str_list(&v, "groups"),
        amr: str_list(&v, "amr"),
        auth_time_ms: num_claim(&v, "auth_time").map(|t| t * 1000),
        sid: str_claim(&v, "sid"),
        nonce,
        exp_ms,
        iat_ms,
    })
}

/// A verified back-channel logout token's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutClaims {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
    pub iat_ms: i64,
}

/// Checks a verified logout token's claims (OpenID Connect Back-Channel Logout 1.0, 2.6):
/// issuer, audience, a recent `iat`, a `jti` (the caller refuses a replayed one), the logout
/// event, `sub` and/or `sid`, and no `nonce`.
pub fn check_logout_token(
    payload: &[u8],
    issuer: &str,
    client_id: &str,
    now_ms: i64,
) -> Result<LogoutClaims, JwtError> {
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| JwtError::Malformed(format!("claims: {e}")))?;
    check_iss_aud(&v, issuer, client_id)?;
    let iat_ms = num_claim(&v, "iat").ok_or(JwtError::Missing("iat"))? * 1000;
    if iat_ms > now_ms + SKEW_MS {
        return Err(JwtError::IssuedInFuture((iat_ms - now_ms) / 1000));
    }
    if iat_ms + LOGOUT_MAX_AGE_MS < now_ms {
        return Err(JwtError::Logout("is too old (iat more than 5 minutes ago)"));
    }
    if let Some(exp) = num_claim(&v, "exp") {
        if exp * 1000 + SKEW_MS <= now_ms {
            return Err(JwtError::Expired((now_ms - exp * 1000) / 1000));
        }
    }
    if v.get("nonce").is_some() {
        return Err(JwtError::Logout(
            "carries a nonce (forbidden in logout tokens)",
        ));
    }
    let events = v
        .get("events")
        .and_then(Value::as_object)
        .ok_or(JwtError::Logout("has no events claim"))?;
    if !events
        .get(BACKCHANNEL_LOGOUT_EVENT)
        .is_some_and(Value::is_object)
    {
        return Err(JwtError::Logout(
            "does not carry the back-channel logout event",
        ));
    }
    let jti = str_claim(&v, "jti").ok_or(JwtError::Missing("jti"))?;
    let sub = str_claim(&v, "sub");
    let sid = str_claim(&v, "sid");
    if sub.is_none() && sid.is_none() {
        return Err(JwtError::Logout("names neither sub nor sid"));
    }
    Ok(LogoutClaims {
        sub,
        sid,
        jti,
        iat_ms,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self as sig, KeyPair};
    use serde_json::json;

    pub const ISS: &str = "https://idp.test";
    pub const CID: &str = "ward";
    pub const NOW: i64 = 1_800_000_000_000;

    fn enc(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// A signing key made in the test, with its JWKS entry.
    pub enum TestKey {
        Es(sig::EcdsaKeyPair, String),
        Ed(sig::Ed25519KeyPair, String),
        Rs(sig::RsaKeyPair, String),
    }

    impl TestKey {
        pub fn es256(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pk8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            TestKey::Es(
                sig::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).unwrap(),
                kid.into(),
            )
        }
        pub fn ed25519(kid: &str) -> Self {
            let pk8 = sig::Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            TestKey::Ed(
                sig::Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap(),
                kid.into(),
            )
        }
        pub fn rs256(kid: &str) -> Self {
            let der = base64::engine::general_purpose::STANDARD
                .decode(include_str!("testdata/rsa2048.der.b64").trim())
                .unwrap();
            TestKey::Rs(sig::RsaKeyPair::from_der(&der).unwrap(), kid.into())
        }
        pub fn jwk(&self) -> Value {
            match self {
                TestKey::Es(k, kid) => {
                    let p = k.public_key().as_ref();
                    json!({"kty":"EC","crv":"P-256","kid":kid,"x":enc(&p[1..33]),"y":enc(&p[33..65])})
                }
                TestKey::Ed(k, kid) => {
                    json!({"kty":"OKP","crv":"Ed25519","kid":kid,"x":enc(k.public_key().as_ref())})
                }
                TestKey::Rs(k, kid) => {
                    let p: ring::rsa::PublicKeyComponents<Vec<u8>> = k.public().into();
                    json!({"kty":"RSA","kid":kid,"use":"sig",
                        "n":enc(&p.n),
                        "e":enc(&p.e)})
                }
            }
        }
        pub fn sign(&self, claims: &Value) -> String {
            let (alg, kid) = match self {
                TestKey::Es(_, k) => ("ES256", k),
                TestKey::Ed(_, k) => ("EdDSA", k),
                TestKey::Rs(_, k) => ("RS256", k),
            };
            let input = format!(
                "{}.{}",
                enc(json!({"alg":alg,"kid":kid,"typ":"JWT"})
                    .to_string()
                    .as_bytes()),
                enc(claims.to_string().as_bytes())
            );
            let rng = SystemRandom::new();
            let s = match self {
                TestKey::Es(k, _) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
                TestKey::Ed(k, _) => k.sign(input.as_bytes()).as_ref().to_vec(),
                TestKey::Rs(k, _) => {
                    let mut out = vec![0u8; k.public().modulus_len()];
                    k.sign(&sig::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut out)
                        .unwrap();
                    out
                }
            };
            format!("{input}.{}", enc(&s))
        }
    }

    pub fn jwks_of(keys: &[&TestKey]) -> Jwks {
        let v = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        Jwks::parse(v.to_string().as_bytes()).unwrap()
    }

    pub fn id_claims() -> Value {
        json!({"iss":ISS,"aud":CID,"sub":"u-1","exp":NOW/1000+300,"iat":NOW/1000,
            "nonce":"n-1","email":"alice@example.com","preferred_username":"alice",
            "groups":["eng","ops"],"amr":["pwd","mfa"],"auth_time":NOW/1000-10})
    }

    fn rules(nonce: Option<&str>, alg: Alg) -> IdTokenRules<'_> {
        IdTokenRules {
            issuer: ISS,
            client_id: CID,
            nonce,
            nonce_required: true,
            not_before_ms: None,
            access_token: None,
            alg,
            now_ms: NOW,
        }
    }

    fn check(token: &str, jwks: &Jwks) -> Result<IdClaims, JwtError> {
        let jws = Jws::parse(token)?;
        let payload = jws.verify(jwks)?;
        check_id_token(payload, &rules(Some("n-1"), jws.alg))
    }

    #[test]
    fn device_flow_tokens_are_bound_by_issue_time_and_at_hash() {
        let k = TestKey::es256("k");
        let jwks = jwks_of(&[&k]);
        let run = |c: Value, nb: Option<i64>, at: Option<&str>| {
            let t = k.sign(&c);
            let jws = Jws::parse(&t)?;
            let p = jws.verify(&jwks)?;
            let mut r = rules(Some("n-9"), jws.alg);
            r.nonce_required = false;
            r.not_before_ms = nb;
            r.access_token = at;
            check_id_token(p, &r)
        };
        let mut c = id_claims();
        c.as_object_mut().unwrap().remove("nonce");
        // No nonce is accepted in the device flow, a foreign one is not.
        assert!(run(c.clone(), Some(NOW - 15_000), None).is_ok());
        assert_eq!(run(id_claims(), None, None), Err(JwtError::NonceMismatch));
        // An earlier sign-in's token (issued before this one started) is a replay.
        assert_eq!(
            run(c.clone(), Some(NOW + 30_000), None),
            Err(JwtError::IssuedBeforeSignIn(40))
        );
        // So is one refreshed since (recent iat) whose auth_time is the earlier sign-in's.
        let mut refreshed = c.clone();
        refreshed["iat"] = json!(NOW / 1000 + 30);
        assert_eq!(
            run(refreshed, Some(NOW + 30_000), None),
            Err(JwtError::IssuedBeforeSignIn(40))
        );
        // at_hash binds the ID token to the access token it came with.
        let h = ring::digest::digest(&ring::digest::SHA256, b"access-1");
        c["at_hash"] = json!(enc(&h.as_ref()[..16]));
        assert!(run(c.clone(), None, Some("access-1")).is_ok());
        assert_eq!(run(c, None, Some("access-2")), Err(JwtError::AtHash));
    }

    #[test]
    fn a_good_token_verifies_with_each_accepted_algorithm() {
        for k in [
            TestKey::es256("k1"),
            TestKey::ed25519("k2"),
            TestKey::rs256("k3"),
        ] {
            let jwks = jwks_of(&[&k]);
            let c = check(&k.sign(&id_claims()), &jwks).unwrap();
            assert_eq!(c.sub, "u-1");
            assert_eq!(c.groups, vec!["eng", "ops"]);
            assert_eq!(c.amr, vec!["pwd", "mfa"]);
            assert_eq!(c.auth_time_ms, Some(NOW - 10_000));
        }
    }

    #[test]
    fn a_forged_signature_is_refused() {
        let good = TestKey::es256("k1");
        let forger = TestKey::es256("k1");
        let jwks = jwks_of(&[&good]);
        assert_eq!(
            check(&forger.sign(&id_claims()), &jwks),
            Err(JwtError::BadSignature)
        );
        // A payload swapped under a genuine signature.
        let t = good.sign(&id_claims());
        let mut parts: Vec<&str> = t.split('.').collect();
        let mut c = id_claims();
        c["sub"] = json!("admin");
        let p = enc(c.to_string().as_bytes());
        parts[1] = &p;
        assert_eq!(check(&parts.join("."), &jwks), Err(JwtError::BadSignature));
    }

    #[test]
    fn alg_none_and_hmac_with_the_public_key_as_secret_are_refused() {
        let k = TestKey::rs256("k1");
        let jwks = jwks_of(&[&k]);
        let body = enc(id_claims().to_string().as_bytes());
        let none = format!("{}.{body}.", enc(br#"{"alg":"none"}"#));
        assert_eq!(check(&none, &jwks), Err(JwtError::AlgNone));
        // HS256 keyed with the RSA public key's JWK text: refused before any key is used.
        let input = format!("{}.{body}", enc(br#"{"alg":"HS256","kid":"k1"}"#));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.jwk().to_string().as_bytes());
        let tag = ring::hmac::sign(&key, input.as_bytes());
        let hs = format!("{input}.{}", enc(tag.as_ref()));
        assert_eq!(check(&hs, &jwks), Err(JwtError::Symmetric("HS256".into())));
    }

    #[test]
    fn an_unknown_kid_is_reported_so_the_key_set_can_be_refetched() {
        let old = TestKey::es256("old");
        let new = TestKey::ed25519("new");
        let t = new.sign(&id_claims());
        assert_eq!(
            check(&t, &jwks_of(&[&old])),
            Err(JwtError::UnknownKid("new".into()))
        );
        // After the refetch the rotated key is there.
        assert!(check(&t, &jwks_of(&[&old, &new])).is_ok());
    }

    #[test]
    fn a_key_of_the_wrong_type_for_the_algorithm_never_verifies() {
        let es = TestKey::es256("same");
        let ed = TestKey::ed25519("same");
        assert_eq!(
            check(&es.sign(&id_claims()), &jwks_of(&[&ed])),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn expired_future_wrong_issuer_audience_azp_and_nonce_are_refused() {
        let k = TestKey::es256("k");
        let jwks = jwks_of(&[&k]);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = id_claims();
            f(&mut c);
            check(&k.sign(&c), &jwks)
        };
        assert!(matches!(
            with(&|c| c["exp"] = json!(NOW / 1000 - 120)),
            Err(JwtError::Expired(120))
        ));
        // Within the skew still passes.
        assert!(with(&|c| c["exp"] = json!(NOW / 1000 - 30)).is_ok());
        assert!(matches!(
            with(&|c| c["iat"] = json!(NOW / 1000 + 600)),
            Err(JwtError::IssuedInFuture(600))
        ));
        assert!(matches!(
            with(&|c| c["iss"] = json!("https://evil.test")),
            Err(JwtError::WrongIssuer { .. })
        ));
        assert!(matches!(
            with(&|c| c["aud"] = json!("someone-else")),
            Err(JwtError::WrongAudience { .. })
        ));
        assert!(matches!(
            with(&|c| c["aud"] = json!([CID, "other"])),
            Err(JwtError::Missing("azp"))
        ));
        assert!(with(&|c| {
            c["aud"] = json!([CID, "other"]);
            c["azp"] = json!(CID)
        })
        .is_ok());
        assert!(matches!(
            with(&|c| c["azp"] = json!("other")),
            Err(JwtError::WrongAzp(_))
        ));
        assert_eq!(
            with(&|c| c["nonce"] = json!("an-older-login")),
            Err(JwtError::NonceMismatch)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("nonce");
            }),
            Err(JwtError::NonceMismatch)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
            Err(JwtError::Missing("sub"))
        );
    }

    #[test]
    fn garbage_tokens_are_malformed_not_panics() {
        let jwks = Jwks::default();
        let long = "x".repeat(MAX_JWT_LEN + 1);
        for t in ["", "a", "a.b", "a.b.c.d", "!!.!!.!!", long.as_str()] {
            assert!(
                matches!(check(t, &jwks), Err(JwtError::Malformed(_))),
                "{t}"
            );
        }
        assert!(Jwks::parse(b"{}").is_err());
        // Unsupported key types are skipped.
        let j = Jwks::parse(
            br#"{"keys":[{"kty":"oct","k":"AAAA"},{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}]}"#,
        )
        .unwrap();
        assert!(j.keys.is_empty());
    }

    pub fn logout_claims() -> Value {
        json!({"iss":ISS,"aud":CID,"iat":NOW/1000,"jti":"j-1","sub":"u-1","sid":"s-1",
            "events":{BACKCHANNEL_LOGOUT_EVENT:{}}})
    }

    #[test]
    fn logout_tokens_are_checked() {
        let k = TestKey::es256("k");
        let jwks = jwks_of(&[&k]);
        let run = |f: &dyn Fn(&mut Value)| {
            let mut c = logout_claims();
            f(&mut c);
            let t = k.sign(&c);
            let jws = Jws::parse(&t)?;
            check_logout_token(jws.verify(&jwks)?, ISS, CID, NOW)
        };
        let ok = run(&|_| {}).unwrap();
        assert_eq!(ok.sub.as_deref(), Some("u-1"));
        assert_eq!(ok.jti, "j-1");
        assert!(matches!(
            run(&|c| c["nonce"] = json!("n")),
            Err(JwtError::Logout(m)) if m.contains("nonce")
        ));
        assert!(matches!(
            run(&|c| c["events"] = json!({})),
            Err(JwtError::Logout(m)) if m.contains("event")
        ));
        assert!(matches!(
            run(&|c| {
                c.as_object_mut().unwrap().remove("events");
            }),
            Err(JwtError::Logout(_))
        ));
        assert_eq!(
            run(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
            Err(JwtError::Missing("jti"))
        );
        assert!(matches!(
            run(&|c| {
                let o = c.as_object_mut().unwrap();
                o.remove("sub");
                o.remove("sid");
            }),
            Err(JwtError::Logout(m)) if m.contains("neither")
        ));
        assert!(matches!(
            run(&|c| c["iat"] = json!(NOW / 1000 - 3600)),
            Err(JwtError::Logout(m)) if m.contains("old")
        ));
        assert!(matches!(
            run(&|c| c["aud"] = json!("x")),
            Err(JwtError::WrongAudience { .. })
        ));
        assert!(matches!(
            run(&|c| c["iss"] = json!("https://x")),
            Err(JwtError::WrongIssuer { .. })
        ));
    }
}
