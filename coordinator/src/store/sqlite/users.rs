use crate::store::db::{Params, Tx};
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::audit::Action;

pub(super) fn user_id(tx: &Tx<'_>, name: &str) -> Result<(i64, bool)> {
    tx.query_row(
        "SELECT id, disabled FROM users WHERE name = ?1",
        [name],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? != 0)),
    )
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))
}
pub(super) fn add_user(
    s: &SqliteStore,
    name: &Name,
    groups: &[Name],
    actor: &str,
    now_ms: i64,
) -> Result<User> {
    s.with_tx(|tx| {
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM users WHERE name = ?1",
                [name.as_str()],
                |_| Ok(true),
            )
            .optional()?
            .unwrap_or(false);
        if exists {
            return Err(StoreError::Conflict(format!(
                "user {name:?} already exists"
            )));
        }
        tx.execute(
            "INSERT INTO users(name, disabled, created_ms) VALUES (?1, 0, ?2)",
            params![name.as_str(), now_ms],
        )?;
        let uid = tx.last_insert_rowid()?;
        for g in groups {
            tx.execute(
                "INSERT OR IGNORE INTO user_groups(user_id, grp) VALUES (?1, ?2)",
                params![uid, g.as_str()],
            )?;
        }
        let groups = groups.to_vec();
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::UserAdd,
                target: name.as_str(),
                detail: serde_json::json!({ "groups": groups }),
            },
            now_ms,
        )?;
        Ok(User {
            name: name.to_string(),
            groups,
            disabled: false,
            created_ms: now_ms,
        })
    })
}

const USER_SELECT: &str = "SELECT u.name, u.disabled, u.created_ms, COALESCE((SELECT json_group_array(grp) FROM (SELECT grp FROM user_groups g WHERE g.user_id = u.id ORDER BY grp) AS ug), '[]') FROM users u";

/// Users matching `cond` (groups sorted); unparseable groups are [`StoreError::Corrupt`].
fn query_users(tx: &Tx<'_>, cond: &str, p: impl Params) -> Result<Vec<User>> {
    let mut stmt = tx.prepare(&format!("{USER_SELECT} {cond} ORDER BY u.name"))?;
    let mut rows = stmt.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        let groups: String = r.get(3)?;
        out.push(User {
            groups: json_names("users", "groups", &name, &groups)?,
            name,
            disabled: r.get::<_, i64>(1)? != 0,
            created_ms: r.get(2)?,
        });
    }
    Ok(out)
}

pub(super) fn list_users(s: &SqliteStore) -> Result<Vec<User>> {
    s.with_tx(|tx| query_users(tx, "", []))
}

pub(super) fn set_user_disabled(
    s: &SqliteStore,
    name: &Name,
    disabled: bool,
    actor: &str,
    now_ms: i64,
) -> Result<Vec<DeviceId>> {
    s.with_tx(|tx| {
        let (uid, _) = user_id(tx, name.as_str())?;
        tx.execute(
            "UPDATE users SET disabled = ?1 WHERE id = ?2",
            params![disabled as i64, uid],
        )?;
        let mut stmt = tx.prepare("SELECT id FROM devices WHERE user_id = ?1 ORDER BY id")?;
        let ids = stmt
            .query_map([uid], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|i| DeviceId(i as u64))
            .collect::<Vec<_>>();
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: if disabled {
                    Action::UserDisable
                } else {
                    Action::UserEnable
                },
                target: name.as_str(),
                detail: serde_json::json!({ "devices": ids }),
            },
            now_ms,
        )?;
        Ok(ids)
    })
}

pub(super) fn edit_user_groups(
    s: &SqliteStore,
    name: &Name,
    add: &[Name],
    remove: &[Name],
    actor: &str,
    now_ms: i64,
) -> Result<User> {
    s.with_tx(|tx| {
        let (uid, _) = user_id(tx, name.as_str())?;
        for g in add {
            tx.execute(
                "INSERT OR IGNORE INTO user_groups(user_id, grp) VALUES (?1, ?2)",
                params![uid, g.as_str()],
            )?;
        }
        for g in remove {
            tx.execute(
                "DELETE FROM user_groups WHERE user_id = ?1 AND grp = ?2",
                params![uid, g.as_str()],
            )?;
        }
        let user = query_users(tx, "WHERE u.id = ?1", [uid])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no user named {name:?}")))?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::UserGroups,
                target: name.as_str(),
                detail: serde_json::json!({ "groups": user.groups }),
            },
            now_ms,
        )?;
        Ok(user)
    })
}
