//! The browser sign-in on an enrollment connection: OpenID Connect authorization code + PKCE
//! (S256) on the device's loopback redirect (RFC 8252), with the coordinator as the relying
//! party that holds the client secret and redeems the code.
//!
//! The exchange, all on one connection pinned to the coordinator's CA:
//! 1. the device sends `login_start` with `pkce` (its loopback `redirect_uri` and the S256
//!    challenge of a verifier only it knows);
//! 2. the coordinator draws a fresh `state` and `nonce`, builds the authorization URL and answers
//!    `login_authorize` (URL + state);
//! 3. the provider redirects the browser to the device's listener, which checks `state` and sends
//!    `login_callback` (code, state, verifier);
//! 4. the coordinator checks `state` against the one it issued *for this connection*, the
//!    verifier against the challenge, redeems the code with the verifier and the client secret,
//!    verifies the ID token (issuer, audience, signature, expiry, and the nonce it must carry),
//!    and enrolls the device for the user exactly as the device grant does.
//!
//! `state` and `nonce` live only in this task's locals: a callback on any other connection has
//! nothing to match, and a code redeemed elsewhere lacks the verifier. Every refusal is one line
//! to the device, a log line and an audit row; nothing is granted on any error.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};

use ward_shared::oauth::{self, MAX_PARAM_LEN, RANDOM_LEN};
use ward_shared::secret::ct_eq;
use ward_shared::wire::{
    self, CoordinatorMsg, DeviceMsg, ErrorCode, FrameDecoder, LoginAuthorize, LoginCallback,
    LoginPkce, LoginStart,
};

use super::link::Link;
use super::oidc::{add_userinfo, admit_login, audit, enroll_signed_in, failed, Refusal};
use super::session::{read_frame, refuse, send_msg};
use super::{now_ms, Ctx};
use crate::audit::Action;
use crate::oidc::jwt::IdClaims;
use crate::oidc::provider::{AuthorizeParams, Provider, Tokens, SCOPE};

/// Longest a browser sign-in may take from `login_authorize` to the callback.
pub const BROWSER_LOGIN_SECS: u64 = 10 * 60;

/// A `login_start` with `pkce` on a connection without a client certificate.
pub(super) async fn login(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    mut dec: FrameDecoder,
    req: LoginStart,
) -> Result<()> {
    let remote = link.remote;
    match login_inner(ctx, link, &mut dec, req).await {
        Ok(enrolled) => {
            send_msg(&mut link.send, &CoordinatorMsg::Enrolled(enrolled)).await?;
            link.finish(Duration::from_secs(2)).await;
        }
        Err((code, message)) => {
            warn!(%remote, ?code, reason = %message, "browser sign-in refused");
            refuse(link, code, message).await;
        }
    }
    Ok(())
}

fn random() -> [u8; RANDOM_LEN] {
    let mut b = [0u8; RANDOM_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    b
}

/// What a provider's `error` on the redirect means, in one line.
pub fn callback_error_reason(error: &str) -> String {
    match error {
        "access_denied" => "the user refused the sign-in at the identity provider".into(),
        e => format!(
            "the identity provider refused the sign-in: {}",
            oauth::printable(e, 64)
        ),
    }
}

async fn login_inner(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    dec: &mut FrameDecoder,
    req: LoginStart,
) -> Result<wire::Enrolled, Refusal> {
    let remote = link.remote;
    let (p, hostname) = admit_login(ctx, remote, &req)?;
    let Some(pkce) = req.pkce.clone() else {
        return Err((ErrorCode::BadRequest, "no pkce in a browser sign-in".into()));
    };
    let store = ctx.store.clone();
    let refused = |why: &str| {
        audit(
            store.as_ref(),
            Action::OidcSignInRefused,
            hostname.as_str(),
            serde_json::json!({ "reason": why, "remote": remote.to_string(), "flow": "browser" }),
        );
        failed(why)
    };
    let (claims, tokens) = browser(link, dec, &p, &pkce, &refused).await?;
    let (enrolled, user) = enroll_signed_in(
        ctx, remote, &req, &hostname, &p, &claims, &tokens, "browser",
    )
    .await?;
    info!(%user, device = %enrolled.device_id, "device signed in through the browser");
    Ok(enrolled)
}

/// The browser sign-in on `link` for the device's `pkce`: checks the loopback redirect and the
/// challenge, sends `login_authorize`, waits for the device's `login_callback`, redeems the
/// code with the verifier, verifies the ID token and its nonce and merges userinfo. Every
/// refusal after the checks goes through `refused` (which audits it). Used for enrollment and
/// for signing an enrolled device in again.
pub(super) async fn browser(
    link: &mut Link,
    dec: &mut FrameDecoder,
    p: &Provider,
    pkce: &LoginPkce,
    refused: &(dyn Fn(&str) -> Refusal + Sync),
) -> Result<(IdClaims, Tokens), Refusal> {
    let remote = link.remote;
    oauth::check_loopback_redirect(&pkce.redirect_uri)
        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
    oauth::check_challenge(&pkce.code_challenge)
        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;

    let state = oauth::random_value(&random());
    let nonce = oauth::random_value(&random());
    let params = AuthorizeParams {
        redirect_uri: &pkce.redirect_uri,
        scope: SCOPE,
        state: &state,
        nonce: &nonce,
        code_challenge: &pkce.code_challenge,
    };
    let authorize_url = match p.authorize_url(&params).await {
        Ok(u) => u,
        Err(e) => {
            p.log_failure("browser sign-in could not start", &e);
            return Err(refused(&format!("sign-in is unavailable: {e}")));
        }
    };
    let msg = CoordinatorMsg::LoginAuthorize(LoginAuthorize {
        authorize_url,
        state: state.clone(),
        expires_in_secs: BROWSER_LOGIN_SECS,
    });
    send_msg(&mut link.send, &msg)
        .await
        .map_err(|e| failed(format!("the device went away: {e}")))?;
    info!(%remote, "browser sign-in started");

    let wait = Duration::from_secs(BROWSER_LOGIN_SECS);
    let frame = tokio::select! {
        r = tokio::time::timeout(wait, read_frame(&mut link.recv, dec)) => r,
        _ = link.closer.closed() => return Err(failed("the device closed the connection")),
    };
    let frame = match frame {
        Err(_) => return Err(refused("the sign-in was not completed in time")),
        Ok(Err(e)) => return Err((ErrorCode::Protocol, format!("bad frame: {e:#}"))),
        Ok(Ok(None)) => return Err(failed("the device closed the connection")),
        Ok(Ok(Some(f))) => f,
    };
    let cb: LoginCallback = match wire::decode::<DeviceMsg>(&frame) {
        Ok(DeviceMsg::LoginCallback(cb)) => cb,
        Ok(_) => {
            return Err((
                ErrorCode::Protocol,
                "expected login_callback after login_authorize".into(),
            ))
        }
        Err(e) => return Err((ErrorCode::Protocol, e.to_string())),
    };
    let code = check_callback(&cb, &state, &pkce.code_challenge).map_err(|m| refused(&m))?;

    let tokens = match p
        .redeem_code(&code, &cb.code_verifier, &pkce.redirect_uri)
        .await
    {
        Ok(t) => t,
        Err(e) => return Err(refused(&format!("the code was not redeemed: {e}"))),
    };
    let now = now_ms();
    let Some(id_token) = tokens.id_token.as_deref() else {
        return Err(refused("the provider sent no ID token"));
    };
    let mut claims = match p
        .id_token_code(id_token, &nonce, tokens.access_token.as_deref(), now)
        .await
    {
        Ok(c) => c,
        Err(e) => return Err(refused(&format!("ID token refused: {e}"))),
    };
    let fresh = p
        .nonces
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .accept(&nonce, now);
    if let Err(e) = fresh {
        return Err(refused(&format!("ID token refused: {e}")));
    }
    if let Err(e) = add_userinfo(p, &tokens, &mut claims).await {
        return Err(refused(&format!("userinfo: {e}")));
    }

    Ok((claims, tokens))
}

/// The code of a callback for the attempt that issued `state` with `challenge`, or why not.
/// The state is checked first: a provider error with another attempt's state is not believed.
pub fn check_callback(cb: &LoginCallback, state: &str, challenge: &str) -> Result<String, String> {
    if !ct_eq(cb.state.as_bytes(), state.as_bytes()) {
        return Err(oauth::CallbackError::StateMismatch.to_string());
    }
    if let Some(e) = &cb.error {
        return Err(callback_error_reason(e));
    }
    let code = match &cb.code {
        Some(c) if !c.is_empty() && c.len() <= MAX_PARAM_LEN => c.clone(),
        Some(c) if !c.is_empty() => {
            return Err(oauth::CallbackError::TooLong("code".into()).to_string())
        }
        _ => return Err(oauth::CallbackError::Missing("code").to_string()),
    };
    if oauth::check_verifier(&cb.code_verifier).is_err()
        || !oauth::verifier_matches(&cb.code_verifier, challenge)
    {
        return Err(
            "the PKCE verifier does not match the challenge this sign-in started with".into(),
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb(state: &str, code: Option<&str>, error: Option<&str>, verifier: &str) -> LoginCallback {
        LoginCallback {
            state: state.into(),
            code: code.map(str::to_string),
            error: error.map(str::to_string),
            code_verifier: verifier.into(),
        }
    }

    #[test]
    fn a_callback_must_match_the_attempts_state_and_challenge() {
        let v = oauth::random_value(&[7; RANDOM_LEN]);
        let ch = oauth::challenge_s256(&v);
        let st = oauth::random_value(&[9; RANDOM_LEN]);
        assert_eq!(
            check_callback(&cb(&st, Some("c"), None, &v), &st, &ch),
            Ok("c".into())
        );
        let wrong = check_callback(&cb("other", Some("c"), None, &v), &st, &ch).unwrap_err();
        assert!(wrong.contains("state does not match"), "{wrong}");
        // A forged denial with another state is a state mismatch, not a denial.
        let forged =
            check_callback(&cb("other", None, Some("access_denied"), &v), &st, &ch).unwrap_err();
        assert!(forged.contains("state does not match"), "{forged}");
        let denied =
            check_callback(&cb(&st, None, Some("access_denied"), &v), &st, &ch).unwrap_err();
        assert_eq!(
            denied,
            "the user refused the sign-in at the identity provider"
        );
        let other = oauth::random_value(&[8; RANDOM_LEN]);
        let bad = check_callback(&cb(&st, Some("c"), None, &other), &st, &ch).unwrap_err();
        assert!(bad.contains("PKCE verifier"), "{bad}");
        let bad = check_callback(&cb(&st, Some("c"), None, "short"), &st, &ch).unwrap_err();
        assert!(bad.contains("PKCE verifier"), "{bad}");
        let none = check_callback(&cb(&st, None, None, &v), &st, &ch).unwrap_err();
        assert!(none.contains("no code"), "{none}");
        let long = "c".repeat(MAX_PARAM_LEN + 1);
        let long = check_callback(&cb(&st, Some(&long), None, &v), &st, &ch).unwrap_err();
        assert!(long.contains("longer than"), "{long}");
    }

    #[test]
    fn provider_errors_are_one_printable_line() {
        let r = callback_error_reason("server_error\nforged");
        assert!(!r.contains('\n'));
        assert!(r.starts_with("the identity provider refused the sign-in"));
    }
}
