use rusqlite::params;
use ward_shared::wire::ErrorCode;

use super::*;
use crate::audit::Action;

pub(super) fn issue_lease(
    s: &SqliteStore,
    device: DeviceId,
    key: WgPublicKey,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<LeaseRow> {
    s.with_tx(|tx| {
        let dev = query_devices(tx, "WHERE d.id = ?1", [device.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device {device}")))?;
        if !dev.is_live() {
            return Err(StoreError::Refused { code: ErrorCode::DeviceRevoked, message: "the device is not allowed on the network".into() });
        }
        let not_after = now_ms + ttl_ms;
        tx.execute(
            "INSERT INTO leases(device_id, wg_key, not_before_ms, not_after_ms, issued_ms) VALUES (?1,?2,?3,?4,?3)",
            params![device.0 as i64, key.to_base64(), now_ms, not_after],
        )?;
        let serial = tx.last_insert_rowid()? as u64;
        append_audit_tx(
            tx,
            Audit {
                actor: "device",
                action: Action::LeaseIssue,
                target: dev.hostname.as_str(),
                detail: serde_json::json!({ "serial": serial, "wg_key": key.to_base64(), "not_after_ms": not_after, "ttl_ms": ttl_ms }),
            },
            now_ms,
        )?;
        Ok(LeaseRow { serial, device_id: device, wg_public_key: key, not_before_ms: now_ms, not_after_ms: not_after })
    })
}

pub(super) fn revoke_leases(
    s: &SqliteStore,
    device: DeviceId,
    keep_serial: Option<u64>,
    reason: &str,
    now_ms: i64,
) -> Result<Vec<u64>> {
    s.with_tx(|tx| {
        let keep = keep_serial.map(|k| k as i64).unwrap_or(i64::MAX);
        let mut stmt = tx.prepare(
            "SELECT serial FROM leases WHERE device_id = ?1 AND serial < ?2 AND revoked_ms IS NULL AND not_after_ms > ?3 ORDER BY serial",
        )?;
        let serials = stmt
            .query_map(params![device.0 as i64, keep, now_ms], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        if serials.is_empty() {
            return Ok(vec![]);
        }
        tx.execute(
            "UPDATE leases SET revoked_ms = ?3, revoke_reason = ?4 WHERE device_id = ?1 AND serial < ?2 AND revoked_ms IS NULL AND not_after_ms > ?3",
            params![device.0 as i64, keep, now_ms, reason],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor: "coordinator",
                action: Action::LeaseRevoke,
                target: &device.to_string(),
                detail: serde_json::json!({ "serials": serials, "reason": reason }),
            },
            now_ms,
        )?;
        Ok(serials.into_iter().map(|s| s as u64).collect())
    })
}

pub(super) fn active_leases(s: &SqliteStore, now_ms: i64) -> Result<Vec<LeaseRow>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT serial, device_id, wg_key, not_before_ms, not_after_ms FROM leases WHERE revoked_ms IS NULL AND not_after_ms > ?1 ORDER BY serial",
        )?;
        let rows = stmt.query_map([now_ms], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?, r.get::<_, i64>(4)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (serial, dev, key, nb, na) = row?;
            out.push(LeaseRow {
                serial: serial as u64,
                device_id: DeviceId(dev as u64),
                wg_public_key: WgPublicKey::try_from(key).map_err(|e| corrupt("leases", "wg_key", serial, e))?,
                not_before_ms: nb,
                not_after_ms: na,
            });
        }
        Ok(out)
    })
}

pub(super) fn lease_counts(s: &SqliteStore) -> Result<BTreeMap<DeviceId, i64>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare("SELECT device_id, COUNT(*) FROM leases GROUP BY device_id")?;
        let rows = stmt.query_map([], |r| {
            Ok((DeviceId(r.get::<_, i64>(0)? as u64), r.get::<_, i64>(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
    })
}
