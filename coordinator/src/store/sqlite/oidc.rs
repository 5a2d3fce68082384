//! Provider identities (`oidc_users`) and device sign-ins (`device_sign_ins`).

use crate::store::db::Row;
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::audit::Action;
use crate::store::{DeviceSignIn, OidcUser};

const USER_COLS: &str = "u.name, o.issuer, o.sub, o.refresh_token, o.groups, o.amr, o.sid, \
     o.auth_time_ms, o.last_auth_ms, o.last_refresh_ms, o.provider_disabled, o.reason, o.revision";

fn json_list(r: &Row<'_>, i: usize, column: &'static str) -> rusqlite::Result<Vec<String>> {
    let s: String = r.get(i)?;
    serde_json::from_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("oidc {column}: {e}").into(),
        )
    })
}

fn row_user(r: &Row<'_>) -> rusqlite::Result<OidcUser> {
    Ok(OidcUser {
        user: r.get(0)?,
        issuer: r.get(1)?,
        sub: r.get(2)?,
        refresh_token: r.get(3)?,
        groups: json_list(r, 4, "groups")?,
        amr: json_list(r, 5, "amr")?,
        sid: r.get(6)?,
        auth_time_ms: r.get(7)?,
        last_auth_ms: r.get(8)?,
        last_refresh_ms: r.get(9)?,
        provider_disabled: r.get::<_, i64>(10)? != 0,
        reason: r.get(11)?,
        revision: r.get(12)?,
    })
}

pub(super) fn by_sub(s: &SqliteStore, issuer: &str, sub: &str) -> Result<Option<OidcUser>> {
    s.with_tx(|tx| {
        Ok(tx
            .query_row(
                &format!(
                    "SELECT {USER_COLS} FROM oidc_users o JOIN users u ON u.id = o.user_id \
                     WHERE o.issuer = ?1 AND o.sub = ?2"
                ),
                params![issuer, sub],
                row_user,
            )
            .optional()?)
    })
}

pub(super) fn list(s: &SqliteStore) -> Result<Vec<OidcUser>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(&format!(
            "SELECT {USER_COLS} FROM oidc_users o JOIN users u ON u.id = o.user_id ORDER BY u.name"
        ))?;
        let rows = st.query_map([], row_user)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

pub(super) fn claim_refresh(
    s: &SqliteStore,
    issuer: &str,
    sub: &str,
    holder: &str,
    now_ms: i64,
    until_ms: i64,
) -> Result<bool> {
    s.with_tx(|tx| {
        let n = tx.execute(
            "UPDATE oidc_users SET refresh_holder = ?3, refresh_until_ms = ?5 \
             WHERE issuer = ?1 AND sub = ?2 \
             AND (refresh_holder IS NULL OR refresh_holder = ?3 OR refresh_until_ms <= ?4)",
            params![issuer, sub, holder, now_ms, until_ms],
        )?;
        Ok(n == 1)
    })
}

pub(super) fn save(
    s: &SqliteStore,
    u: &OidcUser,
    audit: Option<(Action, serde_json::Value)>,
    actor: &str,
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        let (uid, _) = user_id(tx, &u.user)?;
        // One provider identity per user, one user per provider identity.
        let other: Option<i64> = tx
            .query_row(
                "SELECT user_id FROM oidc_users WHERE issuer = ?1 AND sub = ?2",
                params![u.issuer, u.sub],
                |r| r.get(0),
            )
            .optional()?;
        if other.is_some_and(|o| o != uid) {
            return Err(StoreError::Conflict(format!(
                "the provider identity {:?} is already linked to another user",
                u.sub
            )));
        }
        // Conditional on the revision the caller read (the write lock is held: no one
        // changes the row between this read and the write).
        let stored: i64 = tx
            .query_row(
                "SELECT revision FROM oidc_users WHERE user_id = ?1",
                params![uid],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if stored != u.revision {
            return Err(StoreError::Stale(format!(
                "the provider identity of {:?} changed meanwhile (revision {stored}, written from {})",
                u.user, u.revision
            )));
        }
        let groups = serde_json::to_string(&u.groups).unwrap_or_else(|_| "[]".into());
        let amr = serde_json::to_string(&u.amr).unwrap_or_else(|_| "[]".into());
        tx.execute(
            "INSERT INTO oidc_users(user_id, issuer, sub, refresh_token, groups, amr, sid, \
             auth_time_ms, last_auth_ms, last_refresh_ms, provider_disabled, reason, revision) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
             ON CONFLICT(user_id) DO UPDATE SET issuer = ?2, sub = ?3, refresh_token = ?4, \
             groups = ?5, amr = ?6, sid = ?7, auth_time_ms = ?8, last_auth_ms = ?9, \
             last_refresh_ms = ?10, provider_disabled = ?11, reason = ?12, revision = ?13",
            params![
                uid,
                u.issuer,
                u.sub,
                u.refresh_token,
                groups,
                amr,
                u.sid,
                u.auth_time_ms,
                u.last_auth_ms,
                u.last_refresh_ms,
                u.provider_disabled as i64,
                u.reason,
                stored + 1
            ],
        )?;
        if let Some((action, detail)) = audit {
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action,
                    target: &u.user,
                    detail,
                },
                now_ms,
            )?;
        }
        Ok(())
    })
}

pub(super) fn record_sign_in(s: &SqliteStore, si: &DeviceSignIn) -> Result<()> {
    s.with_tx(|tx| {
        let (uid, _) = user_id(tx, &si.user)?;
        tx.execute(
            "INSERT INTO device_sign_ins(device_id, user_id, at_ms, auth_time_ms, amr) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(device_id) DO UPDATE SET user_id = ?2, \
             at_ms = ?3, auth_time_ms = ?4, amr = ?5",
            params![
                si.device.0 as i64,
                uid,
                si.at_ms,
                si.auth_time_ms,
                serde_json::to_string(&si.amr).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        Ok(())
    })
}

pub(super) fn sign_ins(s: &SqliteStore) -> Result<Vec<DeviceSignIn>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(
            "SELECT d.device_id, u.name, d.at_ms, d.auth_time_ms, d.amr FROM device_sign_ins d \
             JOIN users u ON u.id = d.user_id ORDER BY d.device_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(DeviceSignIn {
                device: DeviceId(r.get::<_, i64>(0)? as u64),
                user: r.get(1)?,
                at_ms: r.get(2)?,
                auth_time_ms: r.get(3)?,
                amr: json_list(r, 4, "amr")?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

/// See [`crate::store::Store::repair_provider_disabled`]. The provider's disable is told from
/// an administrator's by the actor of the user's latest `user.disable`/`user.enable` row.
pub(super) fn repair_provider_disabled(
    s: &SqliteStore,
    actor: &str,
    now_ms: i64,
) -> Result<Vec<String>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(
            "SELECT u.id, u.name FROM users u JOIN oidc_users o ON o.user_id = u.id \
             WHERE u.disabled = 1 AND o.provider_disabled = 1 AND ( \
               SELECT a.actor FROM audit a WHERE a.target = u.name \
               AND a.action IN ('user.disable', 'user.enable') \
               ORDER BY a.seq DESC LIMIT 1) = 'oidc' \
             ORDER BY u.name",
        )?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(st);
        for (uid, name) in &rows {
            tx.execute("UPDATE users SET disabled = 0 WHERE id = ?1", [uid])?;
            append_audit_tx(
                tx,
                Audit {
                    actor,
                    action: Action::UserEnable,
                    target: name,
                    detail: serde_json::json!({
                        "reason": "disabled by the identity provider under an older coordinator; \
                                   now suspended by the provider instead (lifted by a new sign-in \
                                   or the provider's word)",
                    }),
                },
                now_ms,
            )?;
        }
        Ok(rows.into_iter().map(|(_, n)| n).collect())
    })
}
