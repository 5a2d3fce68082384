//! The console's sign-in state, I/O-free: one-time login links and sessions.
//!
//! Secrets arrive as bytes the caller drew from the OS, and time as `now_ms`; nothing here
//! reads a clock or a random source. Only SHA-256 hashes of link secrets and session ids are
//! kept, so a memory dump of the map does not hand out a working cookie.
//!
//! The drive loop: `console-link` calls [`Auth::add_link`] with a fresh secret and prints the
//! URL; `GET /login?secret=…` calls [`Auth::redeem_link`] with a fresh session id and CSRF
//! token, which sets the cookie; every request then calls [`Auth::session`] (which touches the
//! idle timer), and every POST also [`Auth::check_csrf`]. A sign-in method other than the link
//! (an identity provider) creates its session through [`Auth::open_session`] with its own
//! [`Method`].

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// How long a login link stays redeemable.
pub const LINK_TTL_MS: i64 = 5 * 60 * 1000;
/// A session ends after this long without a request.
pub const SESSION_IDLE_MS: i64 = 30 * 60 * 1000;
/// A session ends this long after sign-in, however active.
pub const SESSION_MAX_MS: i64 = 12 * 60 * 60 * 1000;
/// Unredeemed links kept at once (the oldest is dropped beyond this).
pub const MAX_LINKS: usize = 64;
/// Sessions kept at once (the least recently used is dropped beyond this).
pub const MAX_SESSIONS: usize = 256;
/// Length of secrets, session ids and CSRF tokens, in bytes (hex-encoded on the wire).
pub const SECRET_LEN: usize = 32;

/// How a session was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// A one-time link from `ward-coordinator console-link` (admin socket access).
    Link,
    /// The identity provider (authorization code + PKCE), for a member of the console
    /// administrators' group (`serve --console-admin-group`).
    Oidc,
}

impl Method {
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Link => "console-link",
            Method::Oidc => "oidc",
        }
    }
}

/// Why a login link was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the login link is malformed")]
    Malformed,
    #[error("the login link is unknown or was already used (links work once)")]
    Unknown,
    #[error("the login link has expired (links last 5 minutes): run `ward-coordinator console-link` again")]
    Expired,
}

/// Why a request has no session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not signed in")]
    Missing,
    #[error("the session is unknown (signed out, or the coordinator restarted)")]
    Unknown,
    #[error("the session expired")]
    Expired,
}

/// A live session, as a request sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The first 8 hex digits of the session id's hash: names the session in logs and audit
    /// rows without revealing the cookie.
    pub tag: String,
    pub method: Method,
    /// The per-session CSRF token every form carries (hex).
    pub csrf: String,
    pub created_ms: i64,
}

/// One-time links and sessions.
#[derive(Debug, Default)]
pub struct Auth {
    /// Link secret hash → expiry.
    links: BTreeMap<[u8; 32], i64>,
    /// Session id hash → session.
    sessions: BTreeMap<[u8; 32], Session>,
}

#[derive(Debug, Clone)]
struct Session {
    method: Method,
    csrf: [u8; SECRET_LEN],
    created_ms: i64,
    last_ms: i64,
}

impl Auth {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a login link's secret; returns when it expires. Expired links are pruned,
    /// and the oldest is dropped when [`MAX_LINKS`] are waiting.
    pub fn add_link(&mut self, secret: &[u8; SECRET_LEN], now_ms: i64) -> i64 {
        self.links.retain(|_, exp| *exp > now_ms);
        while self.links.len() >= MAX_LINKS {
            let Some(oldest) = self
                .links
                .iter()
                .min_by_key(|(_, exp)| **exp)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.links.remove(&oldest);
        }
        let expires = now_ms + LINK_TTL_MS;
        self.links.insert(hash(secret), expires);
        expires
    }

    /// Redeems a link (hex secret from the URL) once: on success a session exists for
    /// `session_id` with `csrf` as its token. A used, unknown or expired link is refused, and
    /// an expired one is forgotten.
    pub fn redeem_link(
        &mut self,
        secret_hex: &str,
        session_id: &[u8; SECRET_LEN],
        csrf: &[u8; SECRET_LEN],
        now_ms: i64,
    ) -> Result<SessionInfo, LinkError> {
        let secret = decode_secret(secret_hex).ok_or(LinkError::Malformed)?;
        let key = hash(&secret);
        let expires = self.links.remove(&key).ok_or(LinkError::Unknown)?;
        if expires <= now_ms {
            return Err(LinkError::Expired);
        }
        Ok(self.open_session(Method::Link, session_id, csrf, now_ms))
    }

    /// Opens a session after a sign-in method succeeded.
    pub fn open_session(
        &mut self,
        method: Method,
        session_id: &[u8; SECRET_LEN],
        csrf: &[u8; SECRET_LEN],
        now_ms: i64,
    ) -> SessionInfo {
        self.prune(now_ms);
        while self.sessions.len() >= MAX_SESSIONS {
            let Some(lru) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.last_ms)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.sessions.remove(&lru);
        }
        let key = hash(session_id);
        let s = Session {
            method,
            csrf: *csrf,
            created_ms: now_ms,
            last_ms: now_ms,
        };
        let info = info(&key, &s);
        self.sessions.insert(key, s);
        info
    }

    /// The session a cookie value (hex session id) names, its idle timer restarted. Expired
    /// sessions are removed.
    pub fn session(
        &mut self,
        cookie: Option<&str>,
        now_ms: i64,
    ) -> Result<SessionInfo, SessionError> {
        let id =
            decode_secret(cookie.ok_or(SessionError::Missing)?).ok_or(SessionError::Unknown)?;
        let key = hash(&id);
        let s = self.sessions.get_mut(&key).ok_or(SessionError::Unknown)?;
        if expired(s, now_ms) {
            self.sessions.remove(&key);
            return Err(SessionError::Expired);
        }
        s.last_ms = now_ms;
        Ok(info(&key, s))
    }

    /// Ends a session (sign out).
    pub fn close(&mut self, cookie: &str) {
        if let Some(id) = decode_secret(cookie) {
            self.sessions.remove(&hash(&id));
        }
    }

    /// Drops expired links and sessions.
    pub fn prune(&mut self, now_ms: i64) {
        self.links.retain(|_, exp| *exp > now_ms);
        self.sessions.retain(|_, s| !expired(s, now_ms));
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn links(&self) -> usize {
        self.links.len()
    }
}

/// Whether a submitted CSRF token (hex) is the session's, compared in constant time.
pub fn check_csrf(session: &SessionInfo, submitted: &str) -> bool {
    let (a, b) = (session.csrf.as_bytes(), submitted.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn expired(s: &Session, now_ms: i64) -> bool {
    now_ms - s.last_ms >= SESSION_IDLE_MS || now_ms - s.created_ms >= SESSION_MAX_MS
}

fn info(key: &[u8; 32], s: &Session) -> SessionInfo {
    SessionInfo {
        tag: hex::encode(&key[..4]),
        method: s.method,
        csrf: hex::encode(s.csrf),
        created_ms: s.created_ms,
    }
}

fn hash(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn decode_secret(s: &str) -> Option<[u8; SECRET_LEN]> {
    if s.len() != SECRET_LEN * 2 {
        return None;
    }
    let v = hex::decode(s).ok()?;
    v.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_800_000_000_000;

    fn b(x: u8) -> [u8; 32] {
        [x; 32]
    }

    #[test]
    fn a_link_works_once() {
        let mut a = Auth::new();
        a.add_link(&b(1), T0);
        let s = a
            .redeem_link(&hex::encode(b(1)), &b(2), &b(3), T0 + 1000)
            .unwrap();
        assert_eq!(s.method, Method::Link);
        assert_eq!(s.csrf, hex::encode(b(3)));
        assert_eq!(
            a.redeem_link(&hex::encode(b(1)), &b(4), &b(5), T0 + 2000),
            Err(LinkError::Unknown)
        );
        assert_eq!(a.sessions(), 1);
    }

    #[test]
    fn links_expire_and_bad_ones_are_refused() {
        let mut a = Auth::new();
        let exp = a.add_link(&b(1), T0);
        assert_eq!(exp, T0 + LINK_TTL_MS);
        assert_eq!(
            a.redeem_link(&hex::encode(b(1)), &b(2), &b(3), exp),
            Err(LinkError::Expired)
        );
        // Expired then forgotten: a retry is unknown.
        assert_eq!(
            a.redeem_link(&hex::encode(b(1)), &b(2), &b(3), exp),
            Err(LinkError::Unknown)
        );
        assert_eq!(
            a.redeem_link("zz", &b(2), &b(3), T0),
            Err(LinkError::Malformed)
        );
        assert_eq!(
            a.redeem_link(&"g".repeat(64), &b(2), &b(3), T0),
            Err(LinkError::Malformed)
        );
        assert_eq!(
            a.redeem_link(&hex::encode(b(9)), &b(2), &b(3), T0),
            Err(LinkError::Unknown)
        );
        assert_eq!(a.sessions(), 0);
    }

    #[test]
    fn sessions_expire_when_idle_and_at_their_absolute_limit() {
        let mut a = Auth::new();
        a.add_link(&b(1), T0);
        a.redeem_link(&hex::encode(b(1)), &b(2), &b(3), T0).unwrap();
        let cookie = hex::encode(b(2));
        // Active use keeps it alive past the idle limit...
        let mut t = T0;
        while t + SESSION_IDLE_MS / 2 < T0 + SESSION_MAX_MS {
            t += SESSION_IDLE_MS / 2;
            assert!(a.session(Some(&cookie), t).is_ok(), "at {}", t - T0);
        }
        // ...but not past the absolute one.
        assert_eq!(
            a.session(Some(&cookie), T0 + SESSION_MAX_MS),
            Err(SessionError::Expired)
        );
        assert_eq!(
            a.session(Some(&cookie), T0 + SESSION_MAX_MS),
            Err(SessionError::Unknown)
        );

        a.add_link(&b(5), T0);
        a.redeem_link(&hex::encode(b(5)), &b(6), &b(7), T0).unwrap();
        let c2 = hex::encode(b(6));
        assert!(a.session(Some(&c2), T0 + SESSION_IDLE_MS - 1).is_ok());
        assert_eq!(
            a.session(Some(&c2), T0 + 2 * SESSION_IDLE_MS),
            Err(SessionError::Expired)
        );
        assert_eq!(a.session(None, T0), Err(SessionError::Missing));
        assert_eq!(a.session(Some("nope"), T0), Err(SessionError::Unknown));
    }

    #[test]
    fn csrf_must_match_exactly() {
        let mut a = Auth::new();
        let s = a.open_session(Method::Link, &b(2), &b(3), T0);
        assert!(check_csrf(&s, &hex::encode(b(3))));
        assert!(!check_csrf(&s, &hex::encode(b(4))));
        assert!(!check_csrf(&s, ""));
        assert!(!check_csrf(&s, &hex::encode(b(3))[..63]));
        let mut wrong_last = hex::encode(b(3));
        wrong_last.pop();
        wrong_last.push('4');
        assert!(!check_csrf(&s, &wrong_last));
    }

    #[test]
    fn sign_out_and_bounds() {
        let mut a = Auth::new();
        a.open_session(Method::Link, &b(2), &b(3), T0);
        a.close(&hex::encode(b(2)));
        assert_eq!(
            a.session(Some(&hex::encode(b(2))), T0),
            Err(SessionError::Unknown)
        );
        for i in 0..(MAX_LINKS as u32 + 10) {
            let mut s = [0u8; 32];
            s[..4].copy_from_slice(&i.to_be_bytes());
            a.add_link(&s, T0 + i64::from(i));
        }
        assert_eq!(a.links(), MAX_LINKS);
        for i in 0..(MAX_SESSIONS as u32 + 10) {
            let mut s = [0u8; 32];
            s[..4].copy_from_slice(&i.to_be_bytes());
            a.open_session(Method::Link, &s, &b(1), T0 + i64::from(i));
        }
        assert_eq!(a.sessions(), MAX_SESSIONS);
    }
}
