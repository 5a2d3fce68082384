//! The server side of OpenID Connect: the device sign-in on an enrollment connection, the
//! refresh loop that keeps re-checking every signed-in user, and the push endpoints
//! (back-channel logout, SCIM) that take access away at once.
//!
//! A provider *refusal* (invalid_grant on refresh, a logout token, SCIM `active=false`)
//! suspends the user in the registry's trust decision: the user's devices stay enrolled and
//! connected, every rule that reached them through the user goes, and each is rotated; the
//! peers drop them within the usual trust-change bound, and access given back returns within
//! a netmap push. A provider *outage* (network error, timeout, 5xx) refuses new sign-ins but never cuts
//! an existing device: its sign-in still stands until `--max-auth-age`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};

use ward_shared::names::{Hostname, Name};
use ward_shared::secret::ct_eq;
use ward_shared::wire::{
    self, Bytes, CoordinatorMsg, ErrorCode, LoginPending, LoginStart, TokenSecret, PROTOCOL_VERSION,
};

use super::link::Link;
use super::session::{refuse, send_msg};
use super::{now_ms, Ctx, LiveRegistry};
use crate::admin::ops;
use crate::audit::Action;
use crate::oidc::core::{provider_groups, user_name_for, PollAnswer};
use crate::oidc::http;
use crate::oidc::jwt::{check_logout_token, IdClaims};
use crate::oidc::provider::{Poll, Provider, ProviderError, Tokens};
use crate::oidc::OidcConfig;
use crate::store::{Audit, DeviceSignIn, OidcUser, Store, TokenSpec};

/// What `serve` needs for OpenID Connect.
#[derive(Debug, Clone)]
pub struct OidcServe {
    pub cfg: OidcConfig,
    /// HTTP listener for the push endpoints.
    pub listen: Option<SocketAddr>,
    /// The bearer token SCIM requests must carry (SCIM is off without one).
    pub scim_token: Option<String>,
    /// The provider group whose members may sign in to the console with the provider.
    pub console_admin_group: Option<String>,
}

pub(super) const ACTOR: &str = "oidc";
/// Why a refused refresh disabled a user (the refresh loop keeps retrying those).
const REASON_REFRESH: &str = "the identity provider no longer accepts the sign-in";
/// Longest a device sign-in may wait for the user, whatever the provider says.
const MAX_LOGIN_SECS: u64 = 15 * 60;

pub(super) fn audit(store: &dyn Store, action: Action, target: &str, detail: serde_json::Value) {
    let a = Audit {
        actor: ACTOR,
        action,
        target,
        detail,
    };
    if let Err(e) = store.append_audit(a, now_ms()) {
        tracing::error!(error = %e, "audit append failed");
    }
}

/// A `login_start` on a connection without a client certificate.
pub(super) async fn login(ctx: &Arc<Ctx>, link: &mut Link, req: LoginStart) -> Result<()> {
    let remote = link.remote;
    match login_inner(ctx, link, req).await {
        Ok(enrolled) => {
            send_msg(&mut link.send, &CoordinatorMsg::Enrolled(enrolled)).await?;
            link.finish(Duration::from_secs(2)).await;
        }
        Err((code, message)) => {
            warn!(%remote, ?code, reason = %message, "sign-in refused");
            refuse(link, code, message).await;
        }
    }
    Ok(())
}

pub(super) type Refusal = (ErrorCode, String);

pub(super) fn failed(m: impl Into<String>) -> Refusal {
    (ErrorCode::LoginFailed, m.into())
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| (ErrorCode::Internal, format!("internal error: {e}")))?
}

/// What every attempt that asks the provider checks first (an enrollment or signing an
/// enrolled device in again): a provider is configured, the address is within the enrollment
/// rate limit (`what` names the attempt in the refusal), the protocol is spoken.
pub(super) fn admit_provider_attempt(
    ctx: &Ctx,
    remote: std::net::SocketAddr,
    protocol: u32,
    what: &str,
) -> Result<Arc<crate::oidc::provider::Provider>, Refusal> {
    let Some(p) = ctx.oidc.clone() else {
        return Err(failed(
            "this coordinator has no OpenID provider configured (serve --oidc-issuer)",
        ));
    };
    let admitted = ctx
        .gate
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(remote.ip().to_canonical(), now_ms());
    if admitted == crate::gate::Admit::Limited {
        return Err((
            ErrorCode::Unauthorized,
            format!("too many {what} attempts from this address; try again later"),
        ));
    }
    if !ward_shared::wire::speaks(protocol) {
        return Err((
            ErrorCode::Protocol,
            format!("protocol version {protocol} is not supported"),
        ));
    }
    Ok(p)
}

/// The checks every sign-in starts with, whichever flow follows: a provider is configured, the
/// address is within the enrollment rate limit, the protocol matches, the hostname and the CSR
/// are well-formed. Returns the provider and the sanitized hostname.
pub(super) fn admit_login(
    ctx: &Ctx,
    remote: std::net::SocketAddr,
    req: &LoginStart,
) -> Result<(Arc<crate::oidc::provider::Provider>, Hostname), Refusal> {
    let p = admit_provider_attempt(ctx, remote, req.protocol, "enrollment")?;
    let hostname = Hostname::sanitize(&req.hostname)
        .map_err(|e| (ErrorCode::BadRequest, format!("hostname refused: {e}")))?;
    crate::pki::Ca::csr_identity(&req.csr_der.0)
        .map_err(|e| (ErrorCode::BadRequest, e.to_string()))?;
    Ok((p, hostname))
}

async fn login_inner(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    req: LoginStart,
) -> Result<wire::Enrolled, Refusal> {
    let remote = link.remote;
    let (p, hostname) = admit_login(ctx, remote, &req)?;

    let store = ctx.store.clone();
    let refused = |why: &str| {
        audit(
            store.as_ref(),
            Action::OidcSignInRefused,
            hostname.as_str(),
            serde_json::json!({ "reason": why, "remote": remote.to_string() }),
        );
        failed(why)
    };
    let (claims, tokens) = device_grant(link, &p, &refused).await?;
    let (enrolled, user) = enroll_signed_in(
        ctx,
        remote,
        &req,
        &hostname,
        &p,
        &claims,
        &tokens,
        "device_grant",
    )
    .await?;
    info!(%user, device = %enrolled.device_id, "device signed in through the identity provider");
    Ok(enrolled)
}

/// After the provider vouched for the user, in either flow: the Ward user (created on first
/// sign-in where the provider's configuration allows it; an existing local user is never taken
/// over), the device enrolled for it, and its sign-in (auth time, `amr`) stored and handed to
/// the trust core at once. A refusal is audited with the flow's name.
#[allow(clippy::too_many_arguments)] // the sign-in's parts, each used once
pub(super) async fn enroll_signed_in(
    ctx: &Arc<Ctx>,
    remote: SocketAddr,
    req: &LoginStart,
    hostname: &Hostname,
    p: &Provider,
    claims: &IdClaims,
    tokens: &Tokens,
    flow: &'static str,
) -> Result<(wire::Enrolled, String), Refusal> {
    let now = now_ms();
    let ctx2 = ctx.clone();
    let (c2, host2) = (claims.clone(), hostname.clone());
    let refresh = tokens.refresh_token.clone();
    let issuer = p.cfg.issuer.clone();
    let create = p.cfg.create_users;
    let user =
        blocking(move || sign_in_user(&ctx2, &issuer, create, &c2, refresh, &host2, now)).await;
    let (user, token_id, secret) = match user {
        Ok(x) => x,
        Err((code, m)) => {
            audit(
                ctx.store.as_ref(),
                Action::OidcSignInRefused,
                hostname.as_str(),
                serde_json::json!({ "reason": m, "sub": claims.sub, "flow": flow }),
            );
            return Err((code, m));
        }
    };
    let enroll = wire::EnrollRequest {
        protocol: PROTOCOL_VERSION,
        token_id,
        token_secret: TokenSecret(Bytes(secret)),
        hostname: req.hostname.clone(),
        os: req.os.clone(),
        csr_der: req.csr_der.clone(),
    };
    let enrolled = super::session::enroll(ctx, enroll, remote).await?;
    let si = DeviceSignIn {
        device: enrolled.device_id,
        user: user.clone(),
        at_ms: now,
        auth_time_ms: claims.auth_time_ms.unwrap_or(now),
        amr: claims.amr.clone(),
    };
    if let Err(e) = ctx.store.record_sign_in(&si) {
        tracing::error!(error = %e, "recording the device sign-in failed");
    }
    ops::Live::notify(
        &LiveRegistry {
            events: ctx.events.clone(),
        },
        ops::Notice::SignIn(
            enrolled.device_id,
            crate::oidc::core::SignIn {
                auth_time_ms: si.auth_time_ms,
                amr: si.amr.clone(),
            },
        ),
    );
    Ok((enrolled, user))
}

/// The device authorization grant on `link`: starts it at the provider, sends
/// `login_pending`, polls until the user confirms (or refuses, or time runs out), verifies the
/// ID token and its nonce and merges userinfo. Every refusal goes through `refused` (which
/// audits it). Used for enrollment and for signing an enrolled device in again.
pub(super) async fn device_grant(
    link: &mut Link,
    p: &Provider,
    refused: &(dyn Fn(&str) -> Refusal + Sync),
) -> Result<(IdClaims, Tokens), Refusal> {
    let remote = link.remote;
    let started = now_ms();
    let mut raw = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
    let nonce = hex::encode(raw);
    let auth = match p.start_device(&nonce).await {
        Ok(a) => a,
        Err(e) => {
            p.log_failure("device sign-in could not start", &e);
            return Err(refused(&format!("sign-in is unavailable: {e}")));
        }
    };
    let pending = LoginPending {
        verification_uri: auth.verification_uri.clone(),
        verification_uri_complete: auth.verification_uri_complete.clone(),
        user_code: auth.user_code.clone(),
        expires_in_secs: auth.expires_in,
    };
    send_msg(&mut link.send, &CoordinatorMsg::LoginPending(pending))
        .await
        .map_err(|e| failed(format!("the device went away: {e}")))?;
    info!(%remote, "device sign-in started");

    let mut interval = Duration::from_secs(auth.interval.unwrap_or(5).clamp(1, 60));
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(auth.expires_in.clamp(1, MAX_LOGIN_SECS));
    let tokens: Tokens = loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = link.closer.closed() => return Err(failed("the device closed the connection")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(refused("the sign-in was not completed in time"));
        }
        match p.poll_device(&auth.device_code).await {
            Ok(Poll::Done(t)) => break *t,
            Ok(Poll::Wait(PollAnswer::Pending)) => {}
            Ok(Poll::Wait(PollAnswer::SlowDown)) => interval += Duration::from_secs(5),
            Ok(Poll::Wait(PollAnswer::Denied)) => {
                return Err(refused("the user refused the sign-in"))
            }
            Ok(Poll::Wait(PollAnswer::Expired)) => return Err(refused("the sign-in code expired")),
            Ok(Poll::Wait(PollAnswer::Failed(m))) => return Err(refused(&m)),
            // An outage while polling: keep trying until the deadline.
            Err(ProviderError::Down(m)) => {
                warn!(error = %m, "token endpoint unavailable while polling")
            }
            Err(e) => return Err(refused(&e.to_string())),
        }
    };
    let now = now_ms();
    let Some(id_token) = tokens.id_token.as_deref() else {
        return Err(refused("the provider sent no ID token"));
    };
    let mut claims = match p
        .id_token(
            id_token,
            Some((&nonce, started)),
            tokens.access_token.as_deref(),
            now,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => return Err(refused(&format!("ID token refused: {e}"))),
    };
    if let Some(n) = &claims.nonce {
        let fresh = p
            .nonces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(n, now);
        if let Err(e) = fresh {
            return Err(refused(&format!("ID token refused: {e}")));
        }
    }
    if let Err(e) = merge_userinfo(p, &tokens, &mut claims).await {
        return Err(refused(&format!("userinfo: {e}")));
    }

    Ok((claims, tokens))
}

/// Adds the userinfo claims (groups, names) the ID token lacks; the subject must match.
async fn merge_userinfo(p: &Provider, t: &Tokens, c: &mut IdClaims) -> Result<(), ProviderError> {
    let Some(at) = t.access_token.as_deref() else {
        return Ok(());
    };
    let v = p.userinfo(at).await?;
    if v.is_null() {
        return Ok(());
    }
    if v.get("sub").and_then(|s| s.as_str()) != Some(c.sub.as_str()) {
        return Err(ProviderError::Refused(
            "userinfo names a different subject than the ID token".into(),
        ));
    }
    if v.get("groups").is_some() {
        c.groups = crate::oidc::jwt::str_list(&v, "groups");
    }
    if c.preferred_username.is_none() {
        c.preferred_username = v
            .get("preferred_username")
            .and_then(|s| s.as_str())
            .map(str::to_string);
    }
    if c.email.is_none() {
        c.email = v.get("email").and_then(|s| s.as_str()).map(str::to_string);
    }
    Ok(())
}

/// Finds or creates the user for `c`, syncs its provider groups, stores the refresh token and
/// mints a single-use enrollment token for it (the device then enrolls exactly as with an
/// admin's token). Returns (user, token id, token secret).
pub(super) fn sign_in_user(
    ctx: &Arc<Ctx>,
    issuer: &str,
    create: bool,
    c: &IdClaims,
    refresh: Option<String>,
    hostname: &Hostname,
    now: i64,
) -> Result<(String, String, Vec<u8>), Refusal> {
    let store = ctx.store.as_ref();
    let internal = |e: crate::store::StoreError| (ErrorCode::Internal, format!("{e}"));
    let existing = store.oidc_user_by_sub(issuer, &c.sub).map_err(internal)?;
    let (name, row) = match existing {
        Some(u) => (
            Name::parse("user name", &u.user).map_err(|e| failed(e.to_string()))?,
            u,
        ),
        None => {
            let name = user_name_for(c).map_err(|e| failed(format!("no usable user name: {e}")))?;
            let users = store.list_users().map_err(internal)?;
            if users.iter().any(|u| u.name == name.as_str()) {
                return Err(failed(format!(
                    "a local user named {:?} already exists and is not linked to this provider identity; \
                     an administrator can link it: ward-coordinator user link {} --oidc-sub {}",
                    name.as_str(),
                    name.as_str(),
                    c.sub
                )));
            }
            if !create {
                return Err(failed(format!(
                    "{:?} has no Ward user and this coordinator does not create users on sign-in",
                    name.as_str()
                )));
            }
            store.add_user(&name, &[], ACTOR, now).map_err(internal)?;
            let row = OidcUser {
                user: name.to_string(),
                issuer: issuer.to_string(),
                sub: c.sub.clone(),
                refresh_token: None,
                groups: Vec::new(),
                amr: Vec::new(),
                sid: None,
                auth_time_ms: None,
                last_auth_ms: None,
                last_refresh_ms: None,
                provider_disabled: false,
                reason: None,
                revision: 0,
            };
            (name, row)
        }
    };
    let detail = serde_json::json!({
        "sub": c.sub, "hostname": hostname.as_str(),
    });
    store_identity(
        ctx,
        &name,
        row,
        c,
        refresh,
        (Action::OidcSignIn, detail),
        now,
    )?;
    let mut id = [0u8; 8];
    let mut secret = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let id_hex = hex::encode(id);
    store
        .create_token(
            TokenSpec {
                id: &id_hex,
                secret_hash: ward_shared::token::hash_secret(&secret),
                user: Some(&name),
                tags: &[],
                expires_ms: now + 60_000,
                uses: 1,
                hostname: None,
            },
            ACTOR,
            now,
        )
        .map_err(internal)?;
    Ok((name.to_string(), id_hex, secret))
}

/// Stores what a successful sign-in says about `name` (provider groups, amr, sid, auth time,
/// the refresh token) with one audit row (`audit`, to which the groups and amr are added), and
/// gives back access the provider had taken away (a fresh sign-in is the provider's word
/// again; an admin's own `user disable` is not the provider's and stays).
pub(super) fn store_identity(
    ctx: &Arc<Ctx>,
    name: &Name,
    mut row: OidcUser,
    c: &IdClaims,
    refresh: Option<String>,
    audit: (Action, serde_json::Value),
    now: i64,
) -> Result<OidcUser, Refusal> {
    let store = ctx.store.as_ref();
    let internal = |e: crate::store::StoreError| (ErrorCode::Internal, format!("{e}"));
    let live = LiveRegistry {
        events: ctx.events.clone(),
    };
    // Read, change and write the row under the rows' lock, from the row as it is now; the
    // write is conditional on the row's revision, so another replica's change in between is
    // read again rather than written over.
    let _rows = user_rows_lock();
    let (action, detail) = audit;
    let new_row = row.clone();
    for _ in 0..ROW_ATTEMPTS {
        row = match store
            .oidc_user_by_sub(&new_row.issuer, &new_row.sub)
            .map_err(internal)?
        {
            Some(fresh) => fresh,
            None => new_row.clone(),
        };
        sync_groups(store, &live, name, &row.groups, &c.groups, now)
            .map_err(|e| failed(format!("{e:#}")))?;
        let was_disabled = row.provider_disabled;
        row.groups = provider_groups(&c.groups)
            .iter()
            .map(|g| g.to_string())
            .collect();
        row.amr = c.amr.clone();
        row.sid = c.sid.clone();
        row.auth_time_ms = Some(c.auth_time_ms.unwrap_or(now));
        row.last_auth_ms = Some(now);
        row.last_refresh_ms = Some(now);
        if refresh.is_some() {
            row.refresh_token = refresh.clone();
        }
        row.provider_disabled = false;
        row.reason = None;
        let mut detail = detail.clone();
        if let Some(d) = detail.as_object_mut() {
            d.insert("groups".into(), serde_json::json!(row.groups));
            d.insert("amr".into(), serde_json::json!(row.amr));
        }
        match store.save_oidc_user(&row, Some((action, detail)), ACTOR, now) {
            Err(crate::store::StoreError::Stale(m)) => {
                info!(user = %name.as_str(), why = %m, "provider identity changed meanwhile: read again");
                continue;
            }
            r => r.map_err(internal)?,
        }
        if was_disabled {
            ops::Live::notify(&live, ops::Notice::Identity(name.to_string(), None));
        }
        row.revision += 1;
        return Ok(row);
    }
    Err((
        ErrorCode::Internal,
        format!(
            "the provider identity of {:?} kept changing; try again",
            name.as_str()
        ),
    ))
}

/// How often a read-change-write of a provider identity's row is tried when another replica
/// changed the row in between.
const ROW_ATTEMPTS: usize = 5;

/// Moves the user's provider groups from `old` to `new`; groups an administrator gave the user
/// locally stay.
fn sync_groups(
    store: &dyn Store,
    live: &LiveRegistry,
    user: &Name,
    old: &[String],
    new: &[String],
    now: i64,
) -> Result<bool> {
    let old = provider_groups(old);
    let new = provider_groups(new);
    let add: Vec<Name> = new.iter().filter(|g| !old.contains(g)).cloned().collect();
    let remove: Vec<Name> = old.iter().filter(|g| !new.contains(g)).cloned().collect();
    if add.is_empty() && remove.is_empty() {
        return Ok(false);
    }
    let u = store.edit_user_groups(user, &add, &remove, ACTOR, now)?;
    ops::Live::notify(live, ops::Notice::User(u));
    info!(user = %user.as_str(), ?add, ?remove, "provider groups changed");
    Ok(true)
}

/// Held while a provider user's row is read, changed and written back (refresh, logout,
/// SCIM): without it a refresh that read the row before a logout landed wrote the old row back
/// over it, and the suspension was lost in the store while the registry kept it.
fn user_rows_lock() -> std::sync::MutexGuard<'static, ()> {
    static ROWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ROWS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The provider took the access of the user signed in as (`issuer`, `sub`) away (`disabled`)
/// or gave it back, applied to the row as stored now (read again if another replica changed it
/// meanwhile). `keep(row)` false: the stored row no longer calls for it (nothing written).
fn provider_verdict(
    ctx: &Arc<Ctx>,
    issuer: &str,
    sub: &str,
    disabled: bool,
    reason: &str,
    keep: impl Fn(&OidcUser) -> bool,
) -> Result<()> {
    let store = ctx.store.as_ref();
    let now = now_ms();
    let mut attempts = 0;
    let row = loop {
        let Some(mut row) = store.oidc_user_by_sub(issuer, sub)? else {
            return Ok(());
        };
        if row.provider_disabled == disabled || !keep(&row) {
            return Ok(());
        }
        row.provider_disabled = disabled;
        row.reason = disabled.then(|| reason.to_string());
        let detail = serde_json::json!({ "disabled": disabled, "reason": reason, "sub": row.sub });
        match store.save_oidc_user(&row, Some((Action::OidcUserChange, detail)), ACTOR, now) {
            Err(crate::store::StoreError::Stale(_)) if attempts + 1 < ROW_ATTEMPTS => {
                attempts += 1;
            }
            r => {
                r?;
                break row;
            }
        }
    };
    let live = LiveRegistry {
        events: ctx.events.clone(),
    };
    // Through the trust decision, not `user disable`: the devices stay enrolled and connected
    // and only what reached them through the user changes, so access given back returns at
    // the next netmap push instead of after the agent's reconnect.
    let why = disabled.then(|| reason.to_string());
    ops::Live::notify(&live, ops::Notice::Identity(row.user.clone(), why));
    warn!(user = %row.user, disabled, %reason, "identity provider changed the user's access");
    Ok(())
}

/// Every `refresh_interval`: each signed-in user's refresh token, then userinfo.
pub(super) async fn refresh_loop(ctx: Arc<Ctx>, p: Arc<Provider>) {
    let every = Duration::from_millis(p.cfg.refresh_interval_ms.max(1000) as u64);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let store = ctx.store.clone();
        let rows = match tokio::task::spawn_blocking(move || store.oidc_users()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "listing signed-in users failed");
                continue;
            }
            Err(_) => continue,
        };
        for row in rows {
            // A user the provider disabled through a refused refresh is retried (an account
            // enabled again at the provider comes back); one it signed out or deactivated
            // (logout, SCIM) waits for a new sign-in or SCIM active=true.
            if row.provider_disabled && !refused_by_refresh(&row) {
                continue;
            }
            let Some(rt) = row.refresh_token.clone() else {
                continue;
            };
            // One replica at a time refreshes a user (the provider may rotate the refresh
            // token on every use, and a second use of a rotated one is refused): the claim
            // outlives two rounds, so its holder keeps it and another replica takes over
            // only when the holder stops.
            let store = ctx.store.clone();
            let (issuer, sub, me) = (row.issuer.clone(), row.sub.clone(), ctx.replica_id.clone());
            let now = now_ms();
            let until = now.saturating_add(2 * every.as_millis() as i64 + CLAIM_SLACK_MS);
            match tokio::task::spawn_blocking(move || {
                store.claim_oidc_refresh(&issuer, &sub, &me, now, until)
            })
            .await
            {
                Ok(Ok(true)) => {}
                Ok(Ok(false)) => continue,
                Ok(Err(e)) => {
                    tracing::error!(user = %row.user, error = %e, "claiming the user's refresh failed");
                    continue;
                }
                Err(_) => continue,
            }
            refresh_one(&ctx, &p, row, &rt).await;
        }
    }
}

/// Added to a refresh claim's two rounds, for a slow round.
const CLAIM_SLACK_MS: i64 = 10_000;

/// The user's access was taken away by a refused refresh (not a logout or SCIM).
fn refused_by_refresh(r: &OidcUser) -> bool {
    r.reason
        .as_deref()
        .is_some_and(|r| r.starts_with(REASON_REFRESH))
}

async fn refresh_one(ctx: &Arc<Ctx>, p: &Arc<Provider>, row: OidcUser, rt: &str) {
    let now = now_ms();
    let outcome = async {
        let t = p.refresh(rt).await?;
        let mut c = match t.id_token.as_deref() {
            Some(idt) => {
                p.id_token(idt, None, t.access_token.as_deref(), now)
                    .await?
            }
            None => IdClaims {
                sub: row.sub.clone(),
                groups: row.groups.clone(),
                ..Default::default()
            },
        };
        if c.sub != row.sub {
            return Err(ProviderError::Refused(
                "the refreshed ID token names another subject".into(),
            ));
        }
        merge_userinfo(p, &t, &mut c).await?;
        Ok::<_, ProviderError>((t, c))
    }
    .await;
    let ctx2 = ctx.clone();
    let used = rt.to_string();
    let res = match outcome {
        Ok((t, c)) => {
            tokio::task::spawn_blocking(move || -> Result<()> {
                let store = ctx2.store.as_ref();
                // The row as it is now, not as it was before the provider answered: a logout,
                // SCIM change or sign-in that landed meanwhile (here or at another replica)
                // must not be written over; the write is conditional on the row's revision.
                let _rows = user_rows_lock();
                let mut attempts = 0;
                let row = loop {
                    let Some(mut row) = store.oidc_user_by_sub(&row.issuer, &row.sub)? else {
                        return Ok(());
                    };
                    let name = Name::parse("user name", &row.user)?;
                    let live = LiveRegistry {
                        events: ctx2.events.clone(),
                    };
                    let changed = sync_groups(store, &live, &name, &row.groups, &c.groups, now)?;
                    let old_groups = row.groups.clone();
                    row.groups = provider_groups(&c.groups)
                        .iter()
                        .map(|g| g.to_string())
                        .collect();
                    // A sign-in meanwhile stored a token of its own: that one stays.
                    if row.refresh_token.as_deref() == Some(used.as_str()) {
                        if let Some(new) = &t.refresh_token {
                            row.refresh_token = Some(new.clone());
                        }
                    }
                    row.last_refresh_ms = Some(now);
                    let audit = changed.then(|| {
                        (
                            Action::OidcUserChange,
                            serde_json::json!({ "groups": row.groups, "before": old_groups }),
                        )
                    });
                    match store.save_oidc_user(&row, audit, ACTOR, now) {
                        Err(crate::store::StoreError::Stale(_)) if attempts + 1 < ROW_ATTEMPTS => {
                            attempts += 1;
                        }
                        r => {
                            r?;
                            break row;
                        }
                    }
                };
                // Only a refresh's own refusal is lifted by a refresh that works: a logout or
                // SCIM deactivation waits for a new sign-in or SCIM active=true.
                if row.provider_disabled {
                    provider_verdict(
                        &ctx2,
                        &row.issuer,
                        &row.sub,
                        false,
                        "the identity provider accepts the sign-in again",
                        refused_by_refresh,
                    )?;
                }
                Ok(())
            })
            .await
        }
        Err(ProviderError::Down(m)) => {
            // An outage is not a revocation: existing devices keep their sign-in until
            // --max-auth-age.
            warn!(user = %row.user, error = %m, "identity provider unavailable: refresh skipped");
            return;
        }
        Err(e) => {
            let reason = format!("{REASON_REFRESH}: {e}");
            tokio::task::spawn_blocking(move || {
                let _rows = user_rows_lock();
                // Refused is about the token this refresh used: a sign-in meanwhile brought a
                // new one, which the next round tries.
                provider_verdict(&ctx2, &row.issuer, &row.sub, true, &reason, |r| {
                    r.refresh_token.as_deref() == Some(used.as_str())
                })
            })
            .await
        }
    };
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "applying the refresh failed"),
        Err(e) => tracing::error!(error = %e, "refresh task failed"),
    }
}

/// The push endpoints: `POST /oidc/backchannel-logout` and `PATCH /scim/v2/Users/{sub}`.
pub(super) async fn push_listener(
    ctx: Arc<Ctx>,
    p: Arc<Provider>,
    l: tokio::net::TcpListener,
    scim_token: Option<String>,
) {
    let scim_token = Arc::new(scim_token);
    let slots = Arc::new(tokio::sync::Semaphore::new(32));
    loop {
        let Ok((mut s, remote)) = l.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (ctx, p, scim_token) = (ctx.clone(), p.clone(), scim_token.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let req = match tokio::time::timeout(Duration::from_secs(5), http::read_request(&mut s))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = http::write_response(&mut s, 400, &err_json(&format!("{e:#}"))).await;
                    return;
                }
                Err(_) => return,
            };
            let (status, body) = push(&ctx, &p, scim_token.as_deref(), req, remote).await;
            let _ = http::write_response(&mut s, status, &body).await;
        });
    }
}

fn err_json(m: &str) -> String {
    serde_json::json!({ "error": m }).to_string()
}

async fn push(
    ctx: &Arc<Ctx>,
    p: &Arc<Provider>,
    scim_token: Option<&str>,
    req: http::PushRequest,
    remote: SocketAddr,
) -> (u16, String) {
    let refused = |what: &str, why: String| {
        warn!(%remote, endpoint = what, reason = %why, "push refused");
        audit(
            ctx.store.as_ref(),
            Action::OidcPushRefused,
            what,
            serde_json::json!({ "reason": why, "remote": remote.to_string() }),
        );
        why
    };
    if req.path == "/oidc/backchannel-logout" {
        if req.method != "POST" {
            return (405, err_json("POST only"));
        }
        let form = http::decode_form(&req.body);
        let Some((_, token)) = form.iter().find(|(k, _)| k == "logout_token") else {
            return (
                400,
                err_json(&refused("backchannel-logout", "no logout_token".into())),
            );
        };
        let now = now_ms();
        let claims = match p.verify(token).await {
            Ok(payload) => check_logout_token(&payload, &p.cfg.issuer, &p.cfg.client_id, now)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let claims = match claims {
            Ok(c) => c,
            Err(e) => return (400, err_json(&refused("backchannel-logout", e))),
        };
        if let Err(e) = p
            .jtis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accept(&claims.jti, now)
        {
            return (
                400,
                err_json(&refused("backchannel-logout", format!("logout token {e}"))),
            );
        }
        let ctx2 = ctx.clone();
        let issuer = p.cfg.issuer.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<usize> {
            let _rows = user_rows_lock();
            let rows = ctx2.store.oidc_users()?;
            let hit: Vec<OidcUser> = rows
                .into_iter()
                .filter(|r| r.issuer == issuer)
                .filter(|r| match (&claims.sub, &claims.sid) {
                    (Some(sub), _) => &r.sub == sub,
                    (None, Some(sid)) => r.sid.as_ref() == Some(sid),
                    (None, None) => false,
                })
                .collect();
            let n = hit.len();
            for r in hit {
                // By sid: only while the stored row is still that session's.
                let sid = r.sid.clone();
                provider_verdict(
                    &ctx2,
                    &r.issuer,
                    &r.sub,
                    true,
                    "signed out at the identity provider (back-channel logout)",
                    |now| claims.sub.is_some() || now.sid == sid,
                )?;
            }
            Ok(n)
        })
        .await;
        return match res {
            Ok(Ok(_)) => (200, String::new()),
            Ok(Err(e)) => (500, err_json(&format!("{e:#}"))),
            Err(e) => (500, err_json(&e.to_string())),
        };
    }
    if let Some(sub) = req.path.strip_prefix("/scim/v2/Users/") {
        let Some(want) = scim_token else {
            return (
                404,
                err_json("SCIM is not enabled (serve --scim-token-file)"),
            );
        };
        if !req
            .bearer
            .as_deref()
            .is_some_and(|b| ct_eq(b.as_bytes(), want.as_bytes()))
        {
            return (
                401,
                err_json(&refused("scim", "missing or wrong bearer token".into())),
            );
        }
        if req.method != "PATCH" {
            return (405, err_json("PATCH only"));
        }
        let active = match crate::oidc::core::scim_active(&req.body) {
            Ok(a) => a,
            Err(e) => return (400, err_json(&refused("scim", e.to_string()))),
        };
        let sub = sub.to_string();
        let ctx2 = ctx.clone();
        let issuer = p.cfg.issuer.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<Option<OidcUser>> {
            let _rows = user_rows_lock();
            let Some(row) = ctx2.store.oidc_user_by_sub(&issuer, &sub)? else {
                return Ok(None);
            };
            provider_verdict(
                &ctx2,
                &row.issuer,
                &row.sub,
                !active,
                "deactivated at the identity provider (SCIM)",
                |_| true,
            )?;
            Ok(Some(row))
        })
        .await;
        return match res {
            Ok(Ok(Some(row))) => (
                200,
                serde_json::json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                    "id": row.sub, "userName": row.user, "active": active,
                })
                .to_string(),
            ),
            Ok(Ok(None)) => (
                404,
                err_json(&refused("scim", "no signed-in user with that id".into())),
            ),
            Ok(Err(e)) => (500, err_json(&format!("{e:#}"))),
            Err(e) => (500, err_json(&e.to_string())),
        };
    }
    (404, err_json("not found"))
}

/// [`merge_userinfo`] for the browser and console sign-ins.
pub(crate) async fn add_userinfo(
    p: &Provider,
    t: &Tokens,
    c: &mut IdClaims,
) -> Result<(), ProviderError> {
    merge_userinfo(p, t, c).await
}
