use crate::store::db::Row;
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::audit::Action;

pub(super) fn grant_row(r: &Row<'_>) -> rusqlite::Result<GrantRow> {
    Ok(GrantRow {
        id: r.get(0)?,
        principal: r.get(1)?,
        service: r.get(2)?,
        not_after_ms: r.get(3)?,
        reason: r.get(4)?,
        actor: r.get(5)?,
        created_ms: r.get(6)?,
    })
}

impl SqliteStore {
    fn policy_history_limit(&self, limit: i64) -> Result<Vec<PolicyVersion>> {
        self.with_tx(|tx| {
            let mut stmt = tx.prepare(
                "SELECT version, text, sha256, actor, created_ms, summary FROM policies ORDER BY version DESC LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit], |r| {
                Ok(PolicyVersion {
                    version: r.get(0)?,
                    text: r.get(1)?,
                    sha256: r.get(2)?,
                    actor: r.get(3)?,
                    created_ms: r.get(4)?,
                    summary: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
}
pub(super) fn save_policy(
    s: &SqliteStore,
    text: &str,
    sha256: &str,
    summary: &str,
    actor: &str,
    now_ms: i64,
) -> Result<i64> {
    s.with_tx(|tx| {
        tx.execute(
            "INSERT INTO policies(text, sha256, actor, created_ms, summary) VALUES (?1,?2,?3,?4,?5)",
            params![text, sha256, actor, now_ms, summary],
        )?;
        let v = tx.last_insert_rowid()?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::PolicyApply,
                target: &format!("v{v}"),
                detail: serde_json::json!({ "sha256": sha256, "changes": summary }),
            },
            now_ms,
        )?;
        Ok(v)
    })
}

pub(super) fn current_policy(s: &SqliteStore) -> Result<Option<PolicyVersion>> {
    Ok(s.policy_history_limit(1)?.into_iter().next())
}

pub(super) fn policy_history(s: &SqliteStore) -> Result<Vec<PolicyVersion>> {
    s.policy_history_limit(10_000)
}

pub(super) fn add_grant(s: &SqliteStore, g: &GrantRow, now_ms: i64) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "INSERT INTO grants(id, principal, service, not_after_ms, reason, actor, created_ms) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            params![g.id, g.principal, g.service, g.not_after_ms, g.reason, g.actor, g.created_ms],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor: &g.actor,
                action: Action::GrantAdd,
                target: &g.id,
                detail: serde_json::json!({ "from": g.principal, "to": g.service, "not_after_ms": g.not_after_ms, "reason": g.reason }),
            },
            now_ms,
        )
    })
}

pub(super) fn active_grants(s: &SqliteStore, now_ms: i64) -> Result<Vec<GrantRow>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT id, principal, service, not_after_ms, reason, actor, created_ms FROM grants WHERE removed_ms IS NULL AND not_after_ms > ?1 ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map([now_ms], grant_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

pub(super) fn remove_grant(
    s: &SqliteStore,
    id: &str,
    actor: &str,
    now_ms: i64,
) -> Result<GrantRow> {
    s.with_tx(|tx| {
        let g = tx
            .query_row(
                "SELECT id, principal, service, not_after_ms, reason, actor, created_ms FROM grants WHERE id = ?1 AND removed_ms IS NULL",
                [id],
                grant_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no active grant with id {id:?}")))?;
        tx.execute("UPDATE grants SET removed_ms = ?2 WHERE id = ?1", params![id, now_ms])?;
        append_audit_tx(tx, Audit { actor, action: Action::GrantRemove, target: id, detail: serde_json::json!({}) }, now_ms)?;
        Ok(g)
    })
}
