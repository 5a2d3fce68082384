//! The `relays` table: the relays every device is told about, with the SHA-256 of each one's
//! credential secret (the secret itself is never stored).

use crate::store::db::Row;
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::audit::Action;

fn relay_row(r: &Row<'_>) -> rusqlite::Result<RelayRow> {
    Ok(RelayRow {
        name: r.get(0)?,
        addr: r.get(1)?,
        created_ms: r.get(2)?,
    })
}

pub(super) fn add_relay(
    s: &SqliteStore,
    name: &Name,
    addr: &str,
    secret_hash: &[u8; 32],
    actor: &str,
    now_ms: i64,
) -> Result<RelayRow> {
    s.with_tx(|tx| {
        let exists = tx
            .query_row(
                "SELECT 1 FROM relays WHERE name = ?1",
                [name.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if exists {
            return Err(StoreError::Conflict(format!(
                "relay {:?} already exists (remove it first to change its address)",
                name.as_str()
            )));
        }
        tx.execute(
            "INSERT INTO relays(name, addr, created_ms, secret_hash) VALUES (?1, ?2, ?3, ?4)",
            params![name.as_str(), addr, now_ms, &secret_hash[..]],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::RelayAdd,
                target: name.as_str(),
                detail: serde_json::json!({ "addr": addr }),
            },
            now_ms,
        )?;
        Ok(RelayRow {
            name: name.to_string(),
            addr: addr.to_string(),
            created_ms: now_ms,
        })
    })
}

pub(super) fn relays(s: &SqliteStore) -> Result<Vec<RelayRow>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare("SELECT name, addr, created_ms FROM relays ORDER BY name")?;
        let rows = stmt.query_map([], relay_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

pub(super) fn relay_secret_hash(s: &SqliteStore, name: &str) -> Result<Option<[u8; 32]>> {
    s.with_tx(|tx| {
        let h: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT secret_hash FROM relays WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        Ok(h.flatten()
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    })
}

pub(super) fn remove_relay(
    s: &SqliteStore,
    name: &Name,
    actor: &str,
    now_ms: i64,
) -> Result<RelayRow> {
    s.with_tx(|tx| {
        let r = tx
            .query_row(
                "SELECT name, addr, created_ms FROM relays WHERE name = ?1",
                [name.as_str()],
                relay_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no relay named {:?}", name.as_str())))?;
        tx.execute("DELETE FROM relays WHERE name = ?1", [name.as_str()])?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::RelayRemove,
                target: name.as_str(),
                detail: serde_json::json!({ "addr": r.addr }),
            },
            now_ms,
        )?;
        Ok(r)
    })
}
