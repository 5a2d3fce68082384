//! Signing an enrolled device in again (`ward up --login` on an enrolled device): the device
//! opens a connection with its certificate (which names it) and sends `sign_in_start` instead
//! of `hello`; the coordinator runs the same sign-in as enrollment (the device grant, or the
//! browser flow when the device sends `pkce`), and on success:
//!
//! 1. checks that the provider identity belongs to the user the device belongs to: another
//!    user, an unknown identity, or a tag-owned device is refused, audited
//!    (`device.login_refused`), and nothing changes;
//! 2. stores the user's identity facts (provider groups, amr, auth time, refresh token; a
//!    provider suspension is lifted as on any sign-in) and the device's sign-in, audited
//!    `device.login`;
//! 3. tells the registry, which judges `max_auth_age`, `amr` and `risk_signin_above` again at
//!    once: the verdict and the netmap follow at the next flush.
//!
//! Keys are not re-issued: the device's certificate and lease stay, and the lease keeps
//! rotating as usual. The sign-in runs on its own connection, not on the device's session, so
//! minutes of waiting for a person never hold the session's message loop or its limits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tracing::{info, warn};

use ward_shared::names::Name;
use ward_shared::wire::{CoordinatorMsg, ErrorCode, FrameDecoder, SignInStart, SignedIn};

use super::link::Link;
use super::oidc::{audit, blocking, failed, store_identity, Refusal};
use super::session::{refuse, send_msg};
use super::{now_ms, Ctx, LiveRegistry};
use crate::admin::ops;
use crate::audit::Action;
use crate::model::Device;
use crate::pki::cert_identity;
use crate::store::DeviceSignIn;

/// A `sign_in_start` on a connection with the device certificate `cert`.
pub(super) async fn sign_in_again(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    mut dec: FrameDecoder,
    cert: &[u8],
    req: SignInStart,
) -> Result<()> {
    let remote = link.remote;
    match inner(ctx, link, &mut dec, cert, req).await {
        Ok(done) => {
            send_msg(&mut link.send, &CoordinatorMsg::SignedIn(done)).await?;
            link.finish(Duration::from_secs(2)).await;
        }
        Err((code, message)) => {
            warn!(%remote, ?code, reason = %message, "signing in again refused");
            refuse(link, code, message).await;
        }
    }
    Ok(())
}

/// Whether `user` (the provider identity's Ward user, if any) may sign `dev` in: only its own
/// user. `Err` says why not, in one line.
pub fn same_user(dev: &Device, user: Option<&str>) -> Result<(), String> {
    let Some(owner) = dev.user.as_deref() else {
        return Err(format!(
            "{} belongs to tags, not to a user: no one can sign it in",
            dev.hostname
        ));
    };
    match user {
        Some(u) if u == owner => Ok(()),
        Some(u) => Err(format!(
            "{} belongs to {owner:?}, but the sign-in was {u:?}: sign in as {owner:?}",
            dev.hostname
        )),
        None => Err(format!(
            "{} belongs to {owner:?}, but the sign-in is an identity no Ward user is linked to",
            dev.hostname
        )),
    }
}

async fn inner(
    ctx: &Arc<Ctx>,
    link: &mut Link,
    dec: &mut FrameDecoder,
    cert: &[u8],
    req: SignInStart,
) -> Result<SignedIn, Refusal> {
    let remote = link.remote;
    // Each attempt asks the provider: the enrollment rate limit per address applies.
    let p = super::oidc::admit_provider_attempt(ctx, remote, req.protocol, "sign-in")?;
    let Some(identity) = cert_identity(cert) else {
        return Err((ErrorCode::Unauthorized, "unreadable certificate".into()));
    };
    let store = ctx.store.clone();
    let dev = blocking(move || {
        store
            .device_by_identity(&identity)
            .map_err(|e| (ErrorCode::Internal, format!("device lookup failed: {e}")))
    })
    .await?;
    let Some(dev) = dev else {
        return Err((
            ErrorCode::Unauthorized,
            "this certificate belongs to no enrolled device".into(),
        ));
    };
    if !dev.is_live() {
        let why = if dev.user_disabled {
            "the device's user is disabled"
        } else {
            "the device has been revoked"
        };
        return Err((ErrorCode::DeviceRevoked, why.into()));
    }
    let target = dev.hostname.to_string();
    let store = ctx.store.clone();
    let refused = |why: &str| {
        audit(
            store.as_ref(),
            Action::DeviceLoginRefused,
            &target,
            serde_json::json!({ "reason": why, "remote": remote.to_string(), "device": dev.id }),
        );
        failed(why)
    };
    // A tag-owned device has no person to sign in: refuse before bothering the provider.
    same_user(&dev, dev.user.as_deref()).map_err(|m| refused(&m))?;
    let (claims, tokens) = match &req.pkce {
        Some(pkce) => super::login_code::browser(link, dec, &p, pkce, &refused).await?,
        None => super::oidc::device_grant(link, &p, &refused).await?,
    };
    let now = now_ms();

    let issuer = p.cfg.issuer.clone();
    let store = ctx.store.clone();
    let sub = claims.sub.clone();
    let row = blocking(move || {
        store
            .oidc_user_by_sub(&issuer, &sub)
            .map_err(|e| (ErrorCode::Internal, format!("{e}")))
    })
    .await?;
    if let Err(m) = same_user(&dev, row.as_ref().map(|r| r.user.as_str())) {
        audit(
            ctx.store.as_ref(),
            Action::DeviceLoginRefused,
            &target,
            serde_json::json!({
                "reason": m, "sub": claims.sub, "device": dev.id,
                "signed_in_as": row.as_ref().map(|r| r.user.clone()),
            }),
        );
        return Err((ErrorCode::Unauthorized, m));
    }
    let Some(row) = row else {
        // same_user refused a missing identity above.
        return Err((ErrorCode::Internal, "no provider identity".into()));
    };
    let user = Name::parse("user name", &row.user).map_err(|e| failed(e.to_string()))?;
    let ctx2 = ctx.clone();
    let c2 = claims.clone();
    let refresh = tokens.refresh_token.clone();
    let detail = serde_json::json!({
        "sub": claims.sub, "hostname": dev.hostname.as_str(), "device": dev.id,
        "flow": if req.pkce.is_some() { "browser" } else { "device_code" },
    });
    let dev_id = dev.id;
    let stored = blocking(move || {
        let row = store_identity(
            &ctx2,
            &user,
            row,
            &c2,
            refresh,
            (Action::DeviceLogin, detail),
            now,
        )?;
        let si = DeviceSignIn {
            device: dev_id,
            user: row.user.clone(),
            at_ms: now,
            auth_time_ms: c2.auth_time_ms.unwrap_or(now),
            amr: c2.amr.clone(),
        };
        ctx2.store.record_sign_in(&si).map_err(|e| {
            (
                ErrorCode::Internal,
                format!("recording the sign-in failed: {e}"),
            )
        })?;
        Ok((row, si))
    })
    .await;
    let (row, si) = stored?;
    ops::Live::notify(
        &LiveRegistry {
            events: ctx.events.clone(),
        },
        ops::Notice::SignIn(
            dev_id,
            crate::oidc::core::SignIn {
                auth_time_ms: si.auth_time_ms,
                amr: si.amr.clone(),
            },
        ),
    );
    info!(user = %row.user, device = %dev_id, "device signed in again");
    Ok(SignedIn {
        user: row.user,
        auth_time_ms: si.auth_time_ms,
        amr: si.amr,
        groups: row.groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ward_shared::names::Hostname;
    use ward_shared::wire::DeviceId;

    fn dev(user: Option<&str>, tags: &[&str]) -> Device {
        Device {
            os: "debian".into(),
            name_bound: false,
            ..Device::active(
                DeviceId(7),
                Hostname::sanitize("laptop").unwrap(),
                user.map(str::to_string),
                tags.iter()
                    .map(|t| Name::parse("tag", t).unwrap())
                    .collect(),
                "100.64.0.7".parse().unwrap(),
                "fd00::7".parse().unwrap(),
            )
        }
    }

    #[test]
    fn only_the_devices_own_user_may_sign_it_in() {
        let alice = dev(Some("alice"), &[]);
        assert_eq!(same_user(&alice, Some("alice")), Ok(()));
        let bob = same_user(&alice, Some("bob")).unwrap_err();
        assert!(
            bob.contains("belongs to \"alice\"") && bob.contains("\"bob\""),
            "{bob}"
        );
        let nobody = same_user(&alice, None).unwrap_err();
        assert!(nobody.contains("no Ward user"), "{nobody}");
        let server = dev(None, &["db"]);
        let tagged = same_user(&server, Some("alice")).unwrap_err();
        assert!(tagged.contains("belongs to tags"), "{tagged}");
        assert!(same_user(&server, None).is_err());
    }
}
