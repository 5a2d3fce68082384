//! Console sign-in with the identity provider (`serve --oidc-issuer … --console-admin-group G`):
//! authorization code + PKCE (S256) + `state` + `nonce`, the callback on the console's own
//! listener (`http://LISTEN/oidc/callback`, registered at the provider), the ID token verified
//! like a device sign-in's, and a session only for a member of the console administrators'
//! provider group. Without `--console-admin-group` this sign-in is refused (console-link only).
//!
//! [`Attempts`] is the I/O-free part: each `GET /oidc/start` makes an attempt (state, nonce,
//! verifier, drawn by the caller) bound to the browser by a random cookie whose hash keys it;
//! the callback finds the attempt by that cookie only, takes it (once), and its `state` must be
//! the redirect's. A callback URL sent to someone else's browser (login CSRF) has no attempt
//! there; a replayed one finds it gone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use ward_shared::oauth;

use super::auth::{self, Method, SECRET_LEN};
use super::html::esc;
use super::web::{bare, cookie_named, random, Console, COOKIE};
use crate::audit::Action;
use crate::oidc::core::provider_groups;
use crate::oidc::provider::{AuthorizeParams, Provider, CONSOLE_SCOPE};

/// The cookie binding an attempt to the browser that started it.
pub const ATTEMPT_COOKIE: &str = "ward_console_oidc";
/// How long a console sign-in may take at the provider.
pub const ATTEMPT_TTL_MS: i64 = 10 * 60 * 1000;
/// Attempts kept at once (the oldest is dropped beyond this).
pub const MAX_ATTEMPTS: usize = 64;
/// The callback path on the console listener.
pub const CALLBACK_PATH: &str = "/oidc/callback";

/// What the console needs for provider sign-in.
pub struct ConsoleOidc {
    pub provider: Arc<Provider>,
    /// Members of this provider group may sign in; `None`: nobody may (console-link only).
    pub admin_group: Option<String>,
    pub attempts: Mutex<Attempts>,
}

impl ConsoleOidc {
    pub fn new(provider: Arc<Provider>, admin_group: Option<String>) -> Self {
        Self {
            provider,
            admin_group,
            attempts: Mutex::new(Attempts::default()),
        }
    }

    /// The provider's name on the sign-in button: its issuer's host.
    pub fn label(&self) -> String {
        let i = self.provider.cfg.issuer.as_str();
        let host = i
            .strip_prefix("https://")
            .unwrap_or(i)
            .split('/')
            .next()
            .unwrap_or(i);
        host.to_string()
    }
}

/// One console sign-in in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    pub created_ms: i64,
}

/// Why a callback found no attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("this browser has no sign-in in progress (start again from the sign-in page)")]
    Missing,
    #[error("the sign-in is unknown or was already used (start again from the sign-in page)")]
    Unknown,
    #[error("the sign-in took longer than 10 minutes (start again from the sign-in page)")]
    Expired,
}

/// Console sign-ins in progress, keyed by the hash of their browser-binding cookie.
#[derive(Debug, Default)]
pub struct Attempts {
    map: BTreeMap<[u8; 32], Attempt>,
}

impl Attempts {
    /// Records an attempt for the browser holding `binding`.
    pub fn start(&mut self, binding: &[u8; SECRET_LEN], attempt: Attempt, now_ms: i64) {
        self.map
            .retain(|_, a| a.created_ms + ATTEMPT_TTL_MS > now_ms);
        while self.map.len() >= MAX_ATTEMPTS {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, a)| a.created_ms)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.map.remove(&oldest);
        }
        self.map.insert(hash(binding), attempt);
    }

    /// Takes (once) the attempt of the browser whose cookie is `binding_hex`.
    pub fn take(
        &mut self,
        binding_hex: Option<&str>,
        now_ms: i64,
    ) -> Result<Attempt, AttemptError> {
        let hex = binding_hex.ok_or(AttemptError::Missing)?;
        let raw: [u8; SECRET_LEN] = hex::decode(hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(AttemptError::Unknown)?;
        let a = self.map.remove(&hash(&raw)).ok_or(AttemptError::Unknown)?;
        if a.created_ms + ATTEMPT_TTL_MS <= now_ms {
            return Err(AttemptError::Expired);
        }
        Ok(a)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Whether the (provider) groups include the console administrators' group.
pub fn is_admin(groups: &[String], admin_group: &str) -> bool {
    let want = admin_group.to_ascii_lowercase();
    provider_groups(groups).iter().any(|g| g.as_str() == want)
}

fn hash(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

type St = State<Arc<Console>>;

fn clear_attempt_cookie(r: &mut Response) {
    let clear = format!("{ATTEMPT_COOKIE}=; HttpOnly; SameSite=Lax; Path=/oidc/; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// `GET /oidc/start`: a new attempt and the redirect to the provider.
pub async fn start(State(c): St) -> Response {
    let Some(o) = c.oidc() else {
        return bare(
            StatusCode::NOT_FOUND,
            "Sign in",
            "This coordinator has no identity provider (serve --oidc-issuer).",
        );
    };
    let now = c.now();
    let (state, nonce, verifier) = (
        oauth::random_value(&random()),
        oauth::random_value(&random()),
        oauth::random_value(&random()),
    );
    let redirect_uri = format!("{}{CALLBACK_PATH}", c.base_url());
    let params = AuthorizeParams {
        redirect_uri: &redirect_uri,
        scope: CONSOLE_SCOPE,
        state: &state,
        nonce: &nonce,
        code_challenge: &oauth::challenge_s256(&verifier),
    };
    let url = match o.provider.authorize_url(&params).await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "console sign-in could not start");
            return bare(
                StatusCode::BAD_GATEWAY,
                "Sign in",
                &format!("Sign-in is unavailable: {e}"),
            );
        }
    };
    let binding = random();
    o.attempts.lock().unwrap_or_else(|p| p.into_inner()).start(
        &binding,
        Attempt {
            state,
            nonce,
            verifier,
            created_ms: now,
        },
        now,
    );
    let mut r = (StatusCode::SEE_OTHER, [(header::LOCATION, url.as_str())]).into_response();
    let cookie = format!(
        "{ATTEMPT_COOKIE}={}; HttpOnly; SameSite=Lax; Path=/oidc/; Max-Age={}",
        hex::encode(binding),
        ATTEMPT_TTL_MS / 1000
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /oidc/callback`: the provider's redirect. Refusals are 4xx pages, log lines and
/// `console.login_refused` audit rows; nothing opens a session but a verified administrator.
pub async fn callback(State(c): St, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let Some(o) = c.oidc() else {
        return bare(StatusCode::NOT_FOUND, "Not found", "No such page.");
    };
    let now = c.now();
    let refuse = |status: StatusCode, why: String| {
        let c = c.clone();
        async move {
            warn!(reason = %why, "console sign-in refused");
            c.audit(
                Action::ConsoleLoginRefused,
                "console".into(),
                serde_json::json!({ "method": Method::Oidc.as_str(), "why": why }),
            )
            .await;
            let mut r = bare(status, "Sign-in refused", &why);
            clear_attempt_cookie(&mut r);
            r
        }
    };
    let attempt = o
        .attempts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take(cookie_named(&headers, ATTEMPT_COOKIE).as_deref(), now);
    let attempt = match attempt {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()).await,
    };
    let code = match oauth::read_callback(q.as_deref().unwrap_or(""), &attempt.state) {
        Ok(code) => code,
        Err(oauth::CallbackError::Refused(why)) => {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("the identity provider refused the sign-in: {why}"),
            )
            .await
        }
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()).await,
    };
    let redirect_uri = format!("{}{CALLBACK_PATH}", c.base_url());
    let p = &o.provider;
    let tokens = match p.redeem_code(&code, &attempt.verifier, &redirect_uri).await {
        Ok(t) => t,
        Err(e) => {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("the code was not redeemed: {e}"),
            )
            .await
        }
    };
    let Some(id_token) = tokens.id_token.as_deref() else {
        return refuse(
            StatusCode::FORBIDDEN,
            "the provider sent no ID token".into(),
        )
        .await;
    };
    let now = c.now();
    let mut claims = match p
        .id_token_code(
            id_token,
            &attempt.nonce,
            tokens.access_token.as_deref(),
            now,
        )
        .await
    {
        Ok(cl) => cl,
        Err(e) => return refuse(StatusCode::FORBIDDEN, format!("ID token refused: {e}")).await,
    };
    let fresh = p
        .nonces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .accept(&attempt.nonce, now);
    if let Err(e) = fresh {
        return refuse(StatusCode::FORBIDDEN, format!("ID token refused: {e}")).await;
    }
    if let Err(e) = crate::server::oidc::add_userinfo(p, &tokens, &mut claims).await {
        return refuse(StatusCode::FORBIDDEN, format!("userinfo: {e}")).await;
    }
    let who = claims
        .preferred_username
        .clone()
        .or_else(|| claims.email.clone())
        .unwrap_or_else(|| claims.sub.clone());
    let who = oauth::printable(&who, 64);
    let Some(group) = o.admin_group.as_deref() else {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "{who} may not use the console: sign-in with the identity provider is off \
                 (start serve with --console-admin-group GROUP)"
            ),
        )
        .await;
    };
    if !is_admin(&claims.groups, group) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("{who} is not in the console administrators' group {group:?}"),
        )
        .await;
    }
    let (sid, csrf) = (random(), random());
    let s = c.open_session(Method::Oidc, &sid, &csrf, now);
    info!(session = %s.tag, user = %who, method = s.method.as_str(), "console sign-in");
    c.audit(
        Action::ConsoleLogin,
        format!("session:{}", s.tag),
        serde_json::json!({
            "method": s.method.as_str(), "user": who, "sub": claims.sub, "group": group,
        }),
    )
    .await;
    let cookie = format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        hex::encode(sid),
        auth::SESSION_MAX_MS / 1000
    );
    // The redirect from the provider is cross-site: a SameSite=Strict cookie set here is
    // sent from the next same-site navigation on, so the page links on rather than redirects.
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        super::html::bare_page(
            "Signed in",
            &format!(
                "<p id=\"signed-in\">Signed in as {}.</p><p><a id=\"continue\" href=\"/devices\">Continue to the console</a></p>",
                esc(&who)
            ),
        ),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    clear_attempt_cookie(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(t: i64) -> Attempt {
        Attempt {
            state: "st".into(),
            nonce: "n".into(),
            verifier: "v".into(),
            created_ms: t,
        }
    }

    #[test]
    fn an_attempt_is_found_by_its_browser_cookie_once() {
        let mut a = Attempts::default();
        a.start(&[1; 32], attempt(0), 0);
        assert_eq!(a.take(None, 1), Err(AttemptError::Missing));
        assert_eq!(a.take(Some("zz"), 1), Err(AttemptError::Unknown));
        assert_eq!(
            a.take(Some(&hex::encode([2u8; 32])), 1),
            Err(AttemptError::Unknown)
        );
        assert_eq!(a.take(Some(&hex::encode([1u8; 32])), 1), Ok(attempt(0)));
        assert_eq!(
            a.take(Some(&hex::encode([1u8; 32])), 2),
            Err(AttemptError::Unknown)
        );
    }

    #[test]
    fn attempts_expire_and_are_bounded() {
        let mut a = Attempts::default();
        a.start(&[1; 32], attempt(0), 0);
        assert_eq!(
            a.take(Some(&hex::encode([1u8; 32])), ATTEMPT_TTL_MS),
            Err(AttemptError::Expired)
        );
        for i in 0..(MAX_ATTEMPTS as u8 + 5) {
            a.start(&[i; 32], attempt(i64::from(i)), i64::from(i));
        }
        assert_eq!(a.len(), MAX_ATTEMPTS);
        // The oldest were dropped.
        assert_eq!(
            a.take(Some(&hex::encode([0u8; 32])), 100),
            Err(AttemptError::Unknown)
        );
        assert!(a.take(Some(&hex::encode([68u8; 32])), 100).is_ok());
    }

    #[test]
    fn only_the_admin_group_is_admin() {
        let g = vec!["Eng".to_string(), "ward-admins".to_string()];
        assert!(is_admin(&g, "ward-admins"));
        assert!(is_admin(&g, "WARD-ADMINS"));
        assert!(!is_admin(&g, "ops"));
        assert!(!is_admin(&[], "ward-admins"));
        assert!(!is_admin(&["ward admins".to_string()], "ward admins"));
    }
}
