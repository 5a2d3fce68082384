//! The `device_routes` table: routed prefixes each device advertises and the ones an
//! administrator approved.

use rusqlite::params;
use ward_shared::routes::Prefix;

use super::*;
use crate::audit::Action;

pub(super) fn device_routes(s: &SqliteStore) -> Result<Vec<RouteRow>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(
            "SELECT device_id, prefix, advertised, approved FROM device_routes
             WHERE advertised <> 0 OR approved <> 0 ORDER BY device_id, prefix",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, prefix, adv, appr) = row?;
            // A row that does not parse is skipped (and so routes nothing): fail closed.
            let Ok(prefix) = prefix.parse::<Prefix>() else {
                tracing::error!(device = id, %prefix, "stored route does not parse; ignored");
                continue;
            };
            out.push(RouteRow {
                device: DeviceId(id as u64),
                prefix,
                advertised: adv != 0,
                approved: appr != 0,
            });
        }
        Ok(out)
    })
}

pub(super) fn set_advertised(
    s: &SqliteStore,
    device: DeviceId,
    prefixes: &[Prefix],
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "UPDATE device_routes SET advertised = 0, updated_ms = ?2 WHERE device_id = ?1",
            params![device.0 as i64, now_ms],
        )?;
        for p in prefixes {
            tx.execute(
                "INSERT INTO device_routes(device_id, prefix, advertised, approved, updated_ms)
                 VALUES (?1, ?2, 1, 0, ?3)
                 ON CONFLICT(device_id, prefix) DO UPDATE SET advertised = 1, updated_ms = ?3",
                params![device.0 as i64, p.to_string(), now_ms],
            )?;
        }
        Ok(())
    })
}

pub(super) fn approve(
    s: &SqliteStore,
    device: DeviceId,
    target: &str,
    approve: &[Prefix],
    revoke: &[Prefix],
    actor: &str,
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        for p in approve {
            tx.execute(
                "INSERT INTO device_routes(device_id, prefix, advertised, approved, updated_ms)
                 VALUES (?1, ?2, 0, 1, ?3)
                 ON CONFLICT(device_id, prefix) DO UPDATE SET approved = 1, updated_ms = ?3",
                params![device.0 as i64, p.to_string(), now_ms],
            )?;
        }
        for p in revoke {
            tx.execute(
                "UPDATE device_routes SET approved = 0, updated_ms = ?3
                 WHERE device_id = ?1 AND prefix = ?2",
                params![device.0 as i64, p.to_string(), now_ms],
            )?;
        }
        let list = |v: &[Prefix]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::DeviceRoutes,
                target,
                detail: serde_json::json!({ "approve": list(approve), "revoke": list(revoke) }),
            },
            now_ms,
        )?;
        Ok(())
    })
}
