//! I/O-free rules of the OpenID Connect sign-in: the user name a provider identity maps to,
//! the provider groups a user is given, the device-flow poll answers, replay books for nonces
//! and logout `jti`s, the SCIM `PATCH` parser, and the sign-in requirements a policy's posture
//! can demand (`max_auth_age`, `amr`), judged with reasons in words. Time is passed in.

use std::collections::BTreeMap;

use serde_json::Value;
use ward_shared::names::Name;

use super::jwt::{IdClaims, JwtError};

/// The user name a first sign-in creates: `preferred_username`, else `email`, lowercased; it
/// must be a valid Ward name (`[a-z0-9._@-]{1,64}`).
pub fn user_name_for(c: &IdClaims) -> Result<Name, String> {
    let raw = c
        .preferred_username
        .as_deref()
        .or(c.email.as_deref())
        .ok_or("the provider sent neither preferred_username nor email")?;
    Name::parse("user name", &raw.to_ascii_lowercase()).map_err(|e| e.to_string())
}

/// The provider's groups that are valid Ward group names, lowercased, sorted, deduplicated.
/// A provider group `eng` is the policy's `group:eng`.
pub fn provider_groups(groups: &[String]) -> Vec<Name> {
    let mut out: Vec<Name> = groups
        .iter()
        .filter_map(|g| Name::parse("group name", &g.to_ascii_lowercase()).ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What one token-endpoint answer means for a device sign-in (RFC 8628 3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    /// The user has not finished yet: poll again after the interval.
    Pending,
    /// Poll again, 5 s slower.
    SlowDown,
    /// The user refused.
    Denied,
    /// The device code expired.
    Expired,
    /// Anything else: the sign-in fails with this reason.
    Failed(String),
}

/// Reads a token-endpoint error body (`{"error": "..."}`).
pub fn poll_answer(body: &[u8]) -> PollAnswer {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let err = v.get("error").and_then(Value::as_str).unwrap_or("");
    match err {
        "authorization_pending" => PollAnswer::Pending,
        "slow_down" => PollAnswer::SlowDown,
        "access_denied" => PollAnswer::Denied,
        "expired_token" => PollAnswer::Expired,
        "" => PollAnswer::Failed("the provider's token endpoint answered without a token".into()),
        e => PollAnswer::Failed(format!(
            "the provider refused: {}",
            e.chars().take(64).collect::<String>()
        )),
    }
}

/// Values that may be used once only (ID token nonces, logout token `jti`s), remembered until
/// they could no longer be accepted anyway.
#[derive(Debug, Default)]
pub struct ReplayBook {
    seen: BTreeMap<String, i64>,
    keep_ms: i64,
}

/// More entries than this and the oldest are forgotten (they are past any token's life).
const MAX_REPLAY_ENTRIES: usize = 100_000;

impl ReplayBook {
    pub fn new(keep_ms: i64) -> Self {
        Self {
            seen: BTreeMap::new(),
            keep_ms,
        }
    }

    /// Records `value`; refuses one seen before.
    pub fn accept(&mut self, value: &str, now_ms: i64) -> Result<(), JwtError> {
        self.seen.retain(|_, t| *t + self.keep_ms > now_ms);
        if self.seen.contains_key(value) {
            return Err(JwtError::NonceReplayed);
        }
        if self.seen.len() >= MAX_REPLAY_ENTRIES {
            if let Some(oldest) = self
                .seen
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(value.to_string(), now_ms);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScimError {
    #[error("the body is not a SCIM PatchOp: {0}")]
    Malformed(String),
    #[error("the patch changes nothing Ward understands (only active=true/false)")]
    NoActive,
}

/// Reads a SCIM 2.0 `PATCH /Users/{id}` body (RFC 7644 3.5.2) for the one attribute Ward acts on:
/// `active`. Accepts `{"op":"replace","path":"active","value":false}` and
/// `{"op":"replace","value":{"active":false}}` (ops are case-insensitive, as providers vary).
pub fn scim_active(body: &[u8]) -> Result<bool, ScimError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ScimError::Malformed(e.to_string()))?;
    let ops = v
        .get("Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| ScimError::Malformed("no Operations array".into()))?;
    let mut active = None;
    for op in ops.iter().take(64) {
        let kind = op
            .get("op")
            .and_then(Value::as_str)
            .ok_or_else(|| ScimError::Malformed("an operation has no op".into()))?
            .to_ascii_lowercase();
        if kind != "replace" && kind != "add" {
            continue;
        }
        let val = op.get("value");
        let found = match op.get("path").and_then(Value::as_str) {
            Some(p) if p.eq_ignore_ascii_case("active") => val,
            Some(_) => None,
            None => val.and_then(|v| v.get("active")),
        };
        if let Some(f) = found {
            active = Some(match f {
                Value::Bool(b) => *b,
                Value::String(s) if s.eq_ignore_ascii_case("true") => true,
                Value::String(s) if s.eq_ignore_ascii_case("false") => false,
                _ => return Err(ScimError::Malformed("active is not a boolean".into())),
            });
        }
    }
    active.ok_or(ScimError::NoActive)
}

/// What a rule's posture demands of the sign-in behind a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthRequirement {
    pub max_auth_age_ms: Option<i64>,
    /// Any one of these must be in the sign-in's `amr`.
    pub amr: Vec<String>,
}

/// The sign-in behind a device, as the coordinator last verified it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SignIn {
    pub auth_time_ms: i64,
    pub amr: Vec<String>,
}

/// Why `sign_in` does not meet `req` (empty: it does). A device enrolled with a token (no
/// sign-in) fails every requirement.
pub fn judge_sign_in(req: &AuthRequirement, sign_in: Option<&SignIn>, now_ms: i64) -> Vec<String> {
    let mut why = Vec::new();
    if req.max_auth_age_ms.is_none() && req.amr.is_empty() {
        return why;
    }
    let Some(s) = sign_in else {
        why.push(
            "sign-in: the device was enrolled with a token, not signed in through the identity provider"
                .into(),
        );
        return why;
    };
    if let Some(max) = req.max_auth_age_ms {
        let age = now_ms - s.auth_time_ms;
        if age > max {
            why.push(format!(
                "max_auth_age: signed in {} ago, the rule allows {}",
                human(age),
                human(max)
            ));
        }
    }
    if !req.amr.is_empty() && !req.amr.iter().any(|a| s.amr.contains(a)) {
        why.push(format!(
            "amr: sign-in used [{}], the rule needs {}",
            s.amr.join(", "),
            req.amr.join(" or ")
        ));
    }
    why
}

fn human(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_preferred_username_then_email() {
        let mut c = IdClaims {
            preferred_username: Some("Alice".into()),
            email: Some("a@x.org".into()),
            ..Default::default()
        };
        assert_eq!(user_name_for(&c).unwrap().as_str(), "alice");
        c.preferred_username = None;
        assert_eq!(user_name_for(&c).unwrap().as_str(), "a@x.org");
        c.email = None;
        assert!(user_name_for(&c).is_err());
        c.preferred_username = Some("bad name!".into());
        assert!(user_name_for(&c).is_err());
    }

    #[test]
    fn provider_groups_are_valid_names_only() {
        let g = provider_groups(&["Eng".into(), "eng".into(), "a b".into(), "ops".into()]);
        let g: Vec<&str> = g.iter().map(Name::as_str).collect();
        assert_eq!(g, vec!["eng", "ops"]);
    }

    #[test]
    fn poll_answers() {
        assert_eq!(
            poll_answer(br#"{"error":"authorization_pending"}"#),
            PollAnswer::Pending
        );
        assert_eq!(
            poll_answer(br#"{"error":"slow_down"}"#),
            PollAnswer::SlowDown
        );
        assert_eq!(
            poll_answer(br#"{"error":"access_denied"}"#),
            PollAnswer::Denied
        );
        assert_eq!(
            poll_answer(br#"{"error":"expired_token"}"#),
            PollAnswer::Expired
        );
        assert!(matches!(poll_answer(b"<html>"), PollAnswer::Failed(_)));
        assert!(
            matches!(poll_answer(br#"{"error":"invalid_grant"}"#), PollAnswer::Failed(m) if m.contains("invalid_grant"))
        );
    }

    #[test]
    fn a_value_is_accepted_once_until_it_is_forgotten() {
        let mut b = ReplayBook::new(1000);
        assert!(b.accept("n", 0).is_ok());
        assert_eq!(b.accept("n", 500), Err(JwtError::NonceReplayed));
        assert!(b.accept("m", 500).is_ok());
        assert!(b.accept("n", 1500).is_ok());
    }

    #[test]
    fn scim_patches_are_parsed() {
        let p = |s: &str| scim_active(s.as_bytes());
        assert_eq!(
            p(
                r#"{"schemas":["urn:ietf:params:scim:api:messages:2.0:PatchOp"],"Operations":[{"op":"replace","path":"active","value":false}]}"#
            ),
            Ok(false)
        );
        assert_eq!(
            p(r#"{"Operations":[{"op":"Replace","value":{"active":true}}]}"#),
            Ok(true)
        );
        assert_eq!(
            p(r#"{"Operations":[{"op":"replace","path":"active","value":"False"}]}"#),
            Ok(false)
        );
        assert_eq!(
            p(r#"{"Operations":[{"op":"replace","path":"name.givenName","value":"x"}]}"#),
            Err(ScimError::NoActive)
        );
        assert_eq!(
            p(r#"{"Operations":[{"op":"remove","path":"active"}]}"#),
            Err(ScimError::NoActive)
        );
        assert!(matches!(
            p(r#"{"Operations":[{"op":"replace","path":"active","value":3}]}"#),
            Err(ScimError::Malformed(_))
        ));
        assert!(matches!(p("{}"), Err(ScimError::Malformed(_))));
        assert!(matches!(p("not json"), Err(ScimError::Malformed(_))));
        assert!(matches!(
            p(r#"{"Operations":[{"path":"active"}]}"#),
            Err(ScimError::Malformed(_))
        ));
    }

    #[test]
    fn sign_in_requirements_are_judged_with_reasons() {
        let req = AuthRequirement {
            max_auth_age_ms: Some(3_600_000),
            amr: vec!["mfa".into()],
        };
        let pwd = SignIn {
            auth_time_ms: 0,
            amr: vec!["pwd".into()],
        };
        let why = judge_sign_in(&req, Some(&pwd), 7_200_000);
        assert_eq!(
            why,
            vec![
                "max_auth_age: signed in 2h ago, the rule allows 1h".to_string(),
                "amr: sign-in used [pwd], the rule needs mfa".to_string(),
            ]
        );
        let mfa = SignIn {
            auth_time_ms: 0,
            amr: vec!["pwd".into(), "mfa".into()],
        };
        assert!(judge_sign_in(&req, Some(&mfa), 1000).is_empty());
        assert_eq!(judge_sign_in(&req, None, 0).len(), 1);
        assert!(judge_sign_in(&AuthRequirement::default(), None, 0).is_empty());
    }
}
