//! The `suggestions` table: what administrators decided about flow-based policy suggestions.

use crate::store::db::Tx;
use rusqlite::params;

use super::*;
use crate::audit::Action;
use crate::store::SuggestionState;

pub(super) fn marks(s: &SqliteStore) -> Result<Vec<SuggestionMark>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT id, kind, subject, state, reason, until_ms, flows, days, actor, updated_ms FROM suggestions ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, i64>(7)?,
                r.get::<_, String>(8)?,
                r.get::<_, i64>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, kind, subject, state, reason, until_ms, flows, days, actor, updated_ms) = row?;
            let Some(state) = SuggestionState::parse(&state) else {
                return Err(corrupt("suggestions", "state", &id, format!("unknown state {state:?}")));
            };
            out.push(SuggestionMark {
                id,
                kind,
                subject,
                state,
                reason,
                until_ms,
                flows: u64::try_from(flows).unwrap_or(0),
                days: u32::try_from(days).unwrap_or(0),
                actor,
                updated_ms,
            });
        }
        Ok(out)
    })
}

pub(super) fn mark_tx(tx: &Tx<'_>, m: &SuggestionMark) -> Result<()> {
    tx.execute(
        "INSERT INTO suggestions(id, kind, subject, state, reason, until_ms, flows, days, actor, updated_ms)
         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)
         ON CONFLICT(id) DO UPDATE SET kind=?2, subject=?3, state=?4, reason=?5, until_ms=?6,
             flows=?7, days=?8, actor=?9, updated_ms=?10",
        params![
            m.id,
            m.kind,
            m.subject,
            m.state.as_str(),
            m.reason,
            m.until_ms,
            i64::try_from(m.flows).unwrap_or(i64::MAX),
            i64::from(m.days),
            m.actor,
            m.updated_ms
        ],
    )?;
    let action = match m.state {
        SuggestionState::Accepted => Action::SuggestionAccept,
        SuggestionState::Dismissed => Action::SuggestionDismiss,
        SuggestionState::Snoozed => Action::SuggestionSnooze,
    };
    append_audit_tx(
        tx,
        Audit {
            actor: &m.actor,
            action,
            target: &m.id,
            detail: serde_json::json!({
                "kind": m.kind,
                "subject": m.subject,
                "reason": m.reason,
                "until_ms": m.until_ms,
                "flows": m.flows,
                "days": m.days,
            }),
        },
        m.updated_ms,
    )
}
