use crate::store::db::{Row, Tx};
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::audit::Action;
use ward_shared::names::Hostname;
use ward_shared::secret::ct_eq;
use ward_shared::wire::ErrorCode;

/// One token row; unparseable tags are [`StoreError::Corrupt`].
pub(super) fn token_row(r: &Row<'_>) -> Result<TokenInfo> {
    let id: String = r.get(0)?;
    let tags: String = r.get(2)?;
    let revoked: Option<i64> = r.get(7)?;
    Ok(TokenInfo {
        hostname: r.get(8)?,
        tags: json_list("tokens", "tags", &id, &tags)?,
        id,
        user: r.get(1)?,
        created_ms: r.get(3)?,
        expires_ms: r.get(4)?,
        uses_total: r.get(5)?,
        uses_left: r.get(6)?,
        revoked: revoked.is_some(),
    })
}

pub(super) const TOKEN_COLS: &str =
    "t.id, u.name, t.tags, t.created_ms, t.expires_ms, t.uses_total, t.uses_left, t.revoked_ms, t.hostname";

/// secret_hash, user_id, tags, expires_ms, uses_left, revoked_ms, hostname
pub(super) type TokenRow = (
    Vec<u8>,
    Option<i64>,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

pub(super) fn enroll_tx(
    tx: &Tx<'_>,
    spec: &EnrollSpec<'_>,
    pools: &AddressPools,
    issue: &mut dyn FnMut(DeviceId) -> anyhow::Result<(Vec<u8>, i64)>,
    now_ms: i64,
) -> Result<(Device, Vec<u8>)> {
    let refuse = |code, message: &str| StoreError::Refused {
        code,
        message: message.to_string(),
    };
    let row: Option<TokenRow> = tx
        .query_row(
            "SELECT secret_hash, user_id, tags, expires_ms, uses_left, revoked_ms, hostname FROM tokens WHERE id = ?1",
            [spec.token_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
        )
        .optional()?;
    let Some((hash, uid, tags, expires_ms, uses_left, revoked, bound_name)) = row else {
        return Err(refuse(
            ErrorCode::TokenInvalid,
            "token is not valid (unknown token)",
        ));
    };
    let given = ward_shared::token::hash_secret(spec.token_secret);
    if !ct_eq(&hash, &given) {
        return Err(refuse(
            ErrorCode::TokenInvalid,
            "token is not valid (wrong secret)",
        ));
    }
    if revoked.is_some() {
        return Err(refuse(ErrorCode::TokenRevoked, "token has been revoked"));
    }
    if now_ms >= expires_ms {
        return Err(refuse(ErrorCode::TokenExpired, "token has expired"));
    }
    if uses_left <= 0 {
        return Err(refuse(ErrorCode::TokenUsed, "token has already been used"));
    }
    if let Some(uid) = uid {
        let disabled: i64 =
            tx.query_row("SELECT disabled FROM users WHERE id = ?1", [uid], |r| {
                r.get(0)
            })?;
        if disabled != 0 {
            return Err(refuse(
                ErrorCode::UserDisabled,
                "the token's user is disabled",
            ));
        }
    }
    let known: bool = tx
        .query_row(
            "SELECT 1 FROM devices WHERE identity_hash = ?1",
            [spec.identity_hash.to_vec()],
            |_| Ok(true),
        )
        .optional()?
        .unwrap_or(false);
    if known {
        return Err(refuse(
            ErrorCode::BadRequest,
            "this identity key is already enrolled",
        ));
    }
    // Redeem: the WHERE clause makes the decrement atomic even under concurrent writers
    // (PostgreSQL included); zero rows changed means another enrollment won the race.
    let n = tx.execute(
        "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
        [spec.token_id],
    )?;
    if n != 1 {
        return Err(refuse(ErrorCode::TokenUsed, "token has already been used"));
    }
    // A name the token binds is the device's, whatever it asked for: a device that took it as
    // a self-chosen display name moves aside; one holding it bound refuses the enrollment.
    // Without one, the asked-for name (first free of name, name-2, ...) is a display name
    // that `device:NAME` rules never match.
    let (hostname, name_bound) = match bound_name {
        Some(b) => {
            let b =
                Hostname::parse(&b).map_err(|e| corrupt("tokens", "hostname", spec.token_id, e))?;
            match devices::free_name(tx, &b, None, "coordinator", now_ms) {
                Ok(_) => {}
                Err(StoreError::Conflict(_)) => {
                    return Err(refuse(
                        ErrorCode::BadRequest,
                        &format!(
                            "the hostname {:?} this token binds is held by another active device; rename or revoke it first",
                            b.as_str()
                        ),
                    ))
                }
                Err(e) => return Err(e),
            }
            (b, true)
        }
        None => (
            devices::first_free_name(tx, &spec.hostname)
                .map_err(|_| refuse(ErrorCode::BadRequest, "no free hostname"))?,
            false,
        ),
    };
    let next_index: i64 = tx.query_row(
        "SELECT COALESCE(MAX(addr_index), 0) + 1 FROM devices",
        [],
        |r| r.get(0),
    )?;
    let (ipv4, ipv6) = pools
        .addresses(next_index as u64)
        .ok_or_else(|| refuse(ErrorCode::Internal, "the overlay address pool is full"))?;
    // The device inherits the token's tags; unreadable ones refuse, never become none.
    json_list("tokens", "tags", spec.token_id, &tags)?;
    tx.execute(
        "INSERT INTO devices(hostname, user_id, tags, addr_index, ipv4, ipv6, identity_hash, os, status, token_id, created_ms, last_seen_ms, cert_not_after_ms, name_bound) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,'active',?9,?10,?10,0,?11)",
        params![hostname.as_str(), uid, tags, next_index, ipv4.to_string(), ipv6.to_string(), spec.identity_hash.to_vec(), spec.os, spec.token_id, now_ms, name_bound],
    )?;
    let id = DeviceId(tx.last_insert_rowid()? as u64);
    let (cert, not_after) =
        issue(id).map_err(|e| StoreError::Invalid(format!("issuing certificate: {e:#}")))?;
    tx.execute(
        "UPDATE devices SET cert_not_after_ms = ?2 WHERE id = ?1",
        params![id.0 as i64, not_after],
    )?;
    append_audit_tx(
        tx,
        Audit {
            actor: "device",
            action: Action::DeviceEnroll,
            target: hostname.as_str(),
            detail: serde_json::json!({
                "device_id": id, "token": spec.token_id, "ipv4": ipv4, "ipv6": ipv6, "os": spec.os,
                "requested_hostname": spec.hostname.as_str(),
                "name_bound": name_bound,
            }),
        },
        now_ms,
    )?;
    let dev = query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
        .into_iter()
        .next()
        .ok_or_else(|| {
            corrupt(
                "devices",
                "id",
                id,
                "the new device vanished inside its own transaction",
            )
        })?;
    Ok((dev, cert))
}
pub(super) fn create_token(
    s: &SqliteStore,
    spec: TokenSpec<'_>,
    actor: &str,
    now_ms: i64,
) -> Result<TokenInfo> {
    let TokenSpec {
        id,
        secret_hash,
        user,
        tags,
        expires_ms,
        uses,
        hostname,
    } = spec;
    if hostname.is_some() && uses != 1 {
        return Err(StoreError::Invalid(
            "a token with --hostname binds one device: it must have --uses 1".into(),
        ));
    }
    if !(1..=10_000).contains(&uses) {
        return Err(StoreError::Invalid(format!(
            "--uses must be between 1 and 10000, not {uses}"
        )));
    }
    if user.is_none() && tags.is_empty() {
        return Err(StoreError::Invalid(
            "a token needs --user NAME or at least one --tag".into(),
        ));
    }
    s.with_tx(|tx| {
        let uid = match user {
            Some(u) => {
                let (uid, disabled) = user_id(tx, u.as_str())?;
                if disabled {
                    return Err(StoreError::Invalid(format!("user {:?} is disabled", u.as_str())));
                }
                Some(uid)
            }
            None => None,
        };
        tx.execute(
            "INSERT INTO tokens(id, secret_hash, user_id, tags, created_ms, expires_ms, uses_total, uses_left, hostname) VALUES (?1,?2,?3,?4,?5,?6,?7,?7,?8)",
            params![id, secret_hash.to_vec(), uid, names_json(tags), now_ms, expires_ms, uses, hostname.map(|h| h.as_str())],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::TokenCreate,
                target: id,
                detail: serde_json::json!({
                    "user": user.map(|u| u.as_str()),
                    "tags": tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
                    "expires_ms": expires_ms,
                    "uses": uses,
                    "hostname": hostname.map(|h| h.as_str()),
                }),
            },
            now_ms,
        )?;
        Ok(TokenInfo {
            id: id.to_string(),
            user: user.map(|u| u.to_string()),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            created_ms: now_ms,
            expires_ms,
            uses_total: uses,
            uses_left: uses,
            revoked: false,
            hostname: hostname.map(|h| h.to_string()),
        })
    })
}

pub(super) fn list_tokens(s: &SqliteStore) -> Result<Vec<TokenInfo>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(&format!(
            "SELECT {TOKEN_COLS} FROM tokens t LEFT JOIN users u ON u.id = t.user_id ORDER BY t.created_ms, t.id"
        ))?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(token_row(&r)?);
        }
        Ok(out)
    })
}

pub(super) fn revoke_token(
    s: &SqliteStore,
    id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<TokenInfo> {
    s.with_tx(|tx| {
        let n = tx.execute(
            "UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, now_ms],
        )?;
        let info = tx
            .query_row(
                &format!("SELECT {TOKEN_COLS} FROM tokens t LEFT JOIN users u ON u.id = t.user_id WHERE t.id = ?1"),
                [id],
                |r| Ok(token_row(r)),
            )
            .optional()?
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("no token with id {id:?}")))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("token {id} is already revoked")));
        }
        append_audit_tx(
            tx,
            Audit { actor, action: Action::TokenRevoke, target: id, detail: serde_json::json!({}) },
            now_ms,
        )?;
        Ok(info)
    })
}

pub(super) fn token_hostname(s: &SqliteStore, id: &str) -> Result<Option<Hostname>> {
    s.with_tx(|tx| {
        let h: Option<Option<String>> = tx
            .query_row("SELECT hostname FROM tokens WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        h.flatten()
            .map(|h| Hostname::parse(&h).map_err(|e| corrupt("tokens", "hostname", id, e)))
            .transpose()
    })
}
