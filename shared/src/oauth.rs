//! The browser sign-in's pieces both sides need (OAuth 2.0 authorization code with PKCE on a
//! loopback redirect, RFC 6749, RFC 7636, RFC 8252), free of I/O: PKCE verifiers and their S256
//! challenges, `state`/`nonce` values made from random bytes the caller drew, the loopback
//! redirect URI rule, and the strict parser of the redirect's query (`code` + `state`, or
//! `error` + `state`).
//!
//! The parser refuses anything a browser following a real provider's redirect would not send:
//! a missing or repeated parameter, a value longer than [`MAX_PARAM_LEN`], bad percent-encoding,
//! a `state` other than the one this attempt issued. A provider's `error` is only believed when
//! its `state` is right (otherwise anyone could abort someone else's sign-in with a forged one).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::secret::ct_eq;

/// Longest value of one callback parameter (codes of real providers are well under 1 KiB).
pub const MAX_PARAM_LEN: usize = 2048;
/// Longest callback query accepted.
pub const MAX_QUERY_LEN: usize = 8192;
/// Random bytes in a verifier, `state` or `nonce` (256 bits; 43 base64url characters).
pub const RANDOM_LEN: usize = 32;

/// Why a callback or a PKCE value was refused. Every message is one line a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    #[error("the sign-in callback is malformed: {0}")]
    Malformed(String),
    #[error("the sign-in callback has no {0} parameter")]
    Missing(&'static str),
    #[error("the sign-in callback repeats the {0} parameter")]
    Duplicate(String),
    #[error("the sign-in callback's {0} parameter is longer than {MAX_PARAM_LEN} bytes")]
    TooLong(String),
    #[error("the sign-in callback's state does not match this sign-in (a stale or forged redirect); start again")]
    StateMismatch,
    #[error("the identity provider refused the sign-in: {0}")]
    Refused(String),
}

/// Why a PKCE verifier or redirect URI is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkceError {
    #[error("the PKCE code verifier must be 43 to 128 characters of [A-Za-z0-9-._~]")]
    BadVerifier,
    #[error("the PKCE code challenge must be 43 base64url characters (S256)")]
    BadChallenge,
    #[error("the redirect URI must be http://127.0.0.1:PORT/PATH or http://[::1]:PORT/PATH (a loopback listener, RFC 8252): {0}")]
    NotLoopback(String),
}

/// A fresh value for a verifier, `state` or `nonce`: `random` base64url without padding.
pub fn random_value(random: &[u8; RANDOM_LEN]) -> String {
    URL_SAFE_NO_PAD.encode(random)
}

/// The S256 challenge of `verifier` (RFC 7636 4.2).
pub fn challenge_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// A verifier as RFC 7636 4.1 allows it.
pub fn check_verifier(v: &str) -> Result<(), PkceError> {
    let ok = (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(PkceError::BadVerifier)
    }
}

/// An S256 challenge: the base64url SHA-256 of a verifier, 43 characters.
pub fn check_challenge(c: &str) -> Result<(), PkceError> {
    let ok = c.len() == 43
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(PkceError::BadChallenge)
    }
}

/// Whether `verifier` is the one `challenge` was made from (constant time).
pub fn verifier_matches(verifier: &str, challenge: &str) -> bool {
    ct_eq(challenge_s256(verifier).as_bytes(), challenge.as_bytes())
}

/// A loopback redirect URI a device's `ward up --login` may ask for: `http`, the literal
/// loopback address (never the name `localhost`, which a resolver may point elsewhere), an
/// explicit non-zero port, a plain path, no query or fragment.
pub fn check_loopback_redirect(uri: &str) -> Result<(), PkceError> {
    let bad = |why: &str| PkceError::NotLoopback(why.to_string());
    if uri.len() > 200 {
        return Err(bad("too long"));
    }
    let rest = uri
        .strip_prefix("http://")
        .ok_or_else(|| bad("not http://"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => return Err(bad("no path")),
    };
    let port = if let Some(p) = hostport.strip_prefix("127.0.0.1:") {
        p
    } else if let Some(p) = hostport.strip_prefix("[::1]:") {
        p
    } else {
        return Err(bad("the host is not 127.0.0.1 or [::1] with a port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('0') => {}
        _ => return Err(bad("the port is not a number from 1 to 65535")),
    }
    let path_ok = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
    if !path_ok {
        return Err(bad(
            "the path may only hold [A-Za-z0-9/._-] (no query or fragment)",
        ));
    }
    Ok(())
}

/// Reads the redirect's query (what follows `?`, without the `#fragment`) for the attempt whose
/// `state` is `expected_state`. Returns the authorization code; a provider error with the right
/// state is [`CallbackError::Refused`] (`access_denied`: the user declined).
pub fn read_callback(query: &str, expected_state: &str) -> Result<String, CallbackError> {
    if query.len() > MAX_QUERY_LEN {
        return Err(CallbackError::Malformed(format!(
            "the query is longer than {MAX_QUERY_LEN} bytes"
        )));
    }
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode(k)?;
        let slot = match k.as_str() {
            "code" => &mut code,
            "state" => &mut state,
            "error" => &mut error,
            "error_description" => &mut description,
            // Others (iss, session_state, scope) are not Ward's to judge here.
            _ => continue,
        };
        if slot.is_some() {
            return Err(CallbackError::Duplicate(k));
        }
        if v.len() > MAX_PARAM_LEN * 3 {
            return Err(CallbackError::TooLong(k));
        }
        let v = decode(v)?;
        if v.len() > MAX_PARAM_LEN {
            return Err(CallbackError::TooLong(k));
        }
        *slot = Some(v);
    }
    let state = state.ok_or(CallbackError::Missing("state"))?;
    if expected_state.is_empty() || !ct_eq(state.as_bytes(), expected_state.as_bytes()) {
        return Err(CallbackError::StateMismatch);
    }
    if let Some(e) = error {
        let mut why = printable(&e, 64);
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            why = format!("{why} ({})", printable(&d, 160));
        }
        return Err(CallbackError::Refused(why));
    }
    match code {
        Some(c) if !c.is_empty() => Ok(c),
        _ => Err(CallbackError::Missing("code")),
    }
}

/// `s` cut to `max` characters, control characters replaced (it ends up in a log line).
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; the result must
/// be UTF-8.
fn decode(s: &str) -> Result<String, CallbackError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return Err(CallbackError::Malformed("bad percent-encoding".into()));
                };
                out.push(v);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| CallbackError::Malformed("a value is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "s7aTe-value_0123456789abcdefghijklmnopqrstu";

    #[test]
    fn s256_matches_the_rfc_7636_example() {
        // RFC 7636 appendix B.
        let v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            challenge_s256(v),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(verifier_matches(
            v,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!verifier_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXX",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(check_verifier(v).is_ok());
        assert!(check_challenge(&challenge_s256(v)).is_ok());
    }

    #[test]
    fn random_values_are_valid_verifiers_and_differ_by_input() {
        let a = random_value(&[1; RANDOM_LEN]);
        let b = random_value(&[2; RANDOM_LEN]);
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(check_verifier(&a).is_ok());
    }

    #[test]
    fn bad_verifiers_and_challenges_are_refused() {
        assert_eq!(check_verifier("short"), Err(PkceError::BadVerifier));
        assert_eq!(
            check_verifier(&"a".repeat(129)),
            Err(PkceError::BadVerifier)
        );
        assert_eq!(
            check_verifier(&format!("{}+", "a".repeat(43))),
            Err(PkceError::BadVerifier)
        );
        assert_eq!(check_challenge("abc"), Err(PkceError::BadChallenge));
        assert_eq!(
            check_challenge(&format!("{}=", "a".repeat(42))),
            Err(PkceError::BadChallenge)
        );
    }

    #[test]
    fn only_literal_loopback_redirects_are_allowed() {
        assert!(check_loopback_redirect("http://127.0.0.1:43123/callback").is_ok());
        assert!(check_loopback_redirect("http://[::1]:8080/cb").is_ok());
        for bad in [
            "https://127.0.0.1:1/callback",
            "http://localhost:8080/callback",
            "http://127.0.0.1/callback",
            "http://127.0.0.1:0/callback",
            "http://127.0.0.1:65536/callback",
            "http://127.0.0.1:080/callback",
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/cb?x=1",
            "http://127.0.0.1:8080/cb#f",
            "http://127.0.0.1.evil.test:80/cb",
            "http://10.0.0.1:8080/callback",
            "http://user@127.0.0.1:8080/callback",
        ] {
            assert!(
                matches!(check_loopback_redirect(bad), Err(PkceError::NotLoopback(_))),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn a_good_callback_gives_the_code() {
        let q = format!("code=abc%2F123+x&state={STATE}&iss=https%3A%2F%2Fidp");
        assert_eq!(read_callback(&q, STATE), Ok("abc/123 x".to_string()));
    }

    #[test]
    fn missing_and_repeated_parameters_are_refused() {
        assert_eq!(
            read_callback("code=abc", STATE),
            Err(CallbackError::Missing("state"))
        );
        assert_eq!(
            read_callback(&format!("state={STATE}"), STATE),
            Err(CallbackError::Missing("code"))
        );
        assert_eq!(
            read_callback(&format!("code=&state={STATE}"), STATE),
            Err(CallbackError::Missing("code"))
        );
        assert_eq!(
            read_callback(&format!("code=a&code=b&state={STATE}"), STATE),
            Err(CallbackError::Duplicate("code".into()))
        );
        assert_eq!(
            read_callback(&format!("code=a&state={STATE}&st%61te={STATE}"), STATE),
            Err(CallbackError::Duplicate("state".into()))
        );
        assert_eq!(
            read_callback("", STATE),
            Err(CallbackError::Missing("state"))
        );
    }

    #[test]
    fn a_wrong_state_is_refused_even_with_a_provider_error() {
        assert_eq!(
            read_callback("code=a&state=other", STATE),
            Err(CallbackError::StateMismatch)
        );
        assert_eq!(
            read_callback("error=access_denied&state=other", STATE),
            Err(CallbackError::StateMismatch)
        );
        assert_eq!(
            read_callback("code=a&state=", ""),
            Err(CallbackError::StateMismatch)
        );
        let near = format!("code=a&state={}", &STATE[..STATE.len() - 1]);
        assert_eq!(
            read_callback(&near, STATE),
            Err(CallbackError::StateMismatch)
        );
    }

    #[test]
    fn a_denied_consent_is_a_refusal_with_the_providers_words() {
        let q = format!(
            "error=access_denied&error_description=End-User+aborted+interaction&state={STATE}"
        );
        assert_eq!(
            read_callback(&q, STATE),
            Err(CallbackError::Refused(
                "access_denied (End-User aborted interaction)".into()
            ))
        );
        let q = format!("error=access_denied%0Aforged-log-line&state={STATE}");
        let Err(CallbackError::Refused(why)) = read_callback(&q, STATE) else {
            panic!("not refused");
        };
        assert!(!why.contains('\n'));
    }

    #[test]
    fn overlong_and_malformed_values_are_refused() {
        let long = "a".repeat(MAX_PARAM_LEN + 1);
        assert_eq!(
            read_callback(&format!("code={long}&state={STATE}"), STATE),
            Err(CallbackError::TooLong("code".into()))
        );
        let huge = "a".repeat(MAX_QUERY_LEN + 1);
        assert!(matches!(
            read_callback(&huge, STATE),
            Err(CallbackError::Malformed(_))
        ));
        assert!(matches!(
            read_callback(&format!("code=%zz&state={STATE}"), STATE),
            Err(CallbackError::Malformed(_))
        ));
        assert!(matches!(
            read_callback(&format!("code=%ff&state={STATE}"), STATE),
            Err(CallbackError::Malformed(_))
        ));
        assert!(matches!(
            read_callback(&format!("code=%4&state={STATE}"), STATE),
            Err(CallbackError::Malformed(_))
        ));
    }
}
