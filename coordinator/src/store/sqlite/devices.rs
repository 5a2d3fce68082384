use crate::store::db::{Params, Row, Tx};
use rusqlite::{params, OptionalExtension};
use std::collections::BTreeMap;

use super::*;
use crate::audit::Action;
use crate::model::DeviceStatus;
use ward_shared::names::Hostname;

pub(super) const DEVICE_COLS: &str = "d.id, d.hostname, u.name, COALESCE(u.disabled, 0), d.tags, d.ipv4, d.ipv6, d.os, d.status, d.created_ms, d.last_seen_ms, d.cert_not_after_ms, d.revoked_ms, d.wg_key, d.endpoints, d.quarantine, d.name_bound";

/// One device row; a value that does not parse is [`StoreError::Corrupt`], never a default.
fn device_row(r: &Row<'_>) -> Result<Device> {
    let id: i64 = r.get(0)?;
    let hostname: String = r.get(1)?;
    let user: Option<String> = r.get(2)?;
    let disabled: i64 = r.get(3)?;
    let tags: String = r.get(4)?;
    let ipv4: String = r.get(5)?;
    let ipv6: String = r.get(6)?;
    let os: String = r.get(7)?;
    let status: String = r.get(8)?;
    let wg: Option<String> = r.get(13)?;
    let endpoints: String = r.get(14)?;
    let quarantine: Option<String> = r.get(15)?;
    let name_bound: i64 = r.get(16)?;
    let bad = |column, detail: String| corrupt("devices", column, id, detail);
    Ok(Device {
        id: DeviceId(id as u64),
        hostname: Hostname::parse(&hostname).map_err(|e| bad("hostname", e.to_string()))?,
        user,
        user_disabled: disabled != 0,
        tags: json_names("devices", "tags", id, &tags)?,
        ipv4: ipv4
            .parse()
            .map_err(|_| bad("ipv4", format!("{ipv4:?} is not an address")))?,
        ipv6: ipv6
            .parse()
            .map_err(|_| bad("ipv6", format!("{ipv6:?} is not an address")))?,
        os,
        status: match status.as_str() {
            "active" => DeviceStatus::Active,
            "revoked" => DeviceStatus::Revoked,
            other => return Err(bad("status", format!("unknown device status {other:?}"))),
        },
        created_ms: r.get(9)?,
        last_seen_ms: r.get(10)?,
        cert_not_after_ms: r.get(11)?,
        revoked_ms: r.get(12)?,
        wg_public_key: match wg {
            Some(k) => Some(WgPublicKey::try_from(k).map_err(|e| bad("wg_key", e))?),
            None => None,
        },
        endpoints: serde_json::from_str(&endpoints).map_err(|e| bad("endpoints", e.to_string()))?,
        // An unreadable quarantine stays a quarantine (fail closed) rather than failing every
        // listing: the device keeps only remediation access until an admin releases it.
        quarantine: quarantine.map(|q| {
            serde_json::from_str(&q).unwrap_or_else(|_| Quarantine {
                since_ms: 0,
                reason: format!("unreadable quarantine record {q:?}"),
                automatic: false,
            })
        }),
        name_bound: name_bound != 0,
    })
}

pub(super) fn query_devices(tx: &Tx<'_>, cond: &str, p: impl Params) -> Result<Vec<Device>> {
    let sql = format!("SELECT {DEVICE_COLS} FROM devices d LEFT JOIN users u ON u.id = d.user_id {cond} ORDER BY d.id");
    let mut stmt = tx.prepare(&sql)?;
    let mut rows = stmt.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(device_row(&r)?);
    }
    Ok(out)
}

pub(super) fn device_by_identity(
    s: &SqliteStore,
    identity_hash: &[u8; 32],
) -> Result<Option<Device>> {
    s.with_tx(|tx| {
        Ok(
            query_devices(tx, "WHERE d.identity_hash = ?1", [identity_hash.to_vec()])?
                .into_iter()
                .next(),
        )
    })
}

pub(super) fn device_by_name(s: &SqliteStore, name: &str) -> Result<Device> {
    s.with_tx(|tx| {
        query_devices(tx, "WHERE d.hostname = ?1", [name])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))
    })
}

pub(super) fn device(s: &SqliteStore, id: DeviceId) -> Result<Device> {
    s.with_tx(|tx| {
        query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device {id}")))
    })
}

pub(super) fn list_devices(s: &SqliteStore) -> Result<Vec<Device>> {
    s.with_tx(|tx| query_devices(tx, "", []))
}

pub(super) fn revoke_device(
    s: &SqliteStore,
    name: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Device> {
    s.with_tx(|tx| {
        let n = tx.execute(
            "UPDATE devices SET status = 'revoked', revoked_ms = ?2 WHERE hostname = ?1 AND status = 'active'",
            params![name, now_ms],
        )?;
        let dev = query_devices(tx, "WHERE d.hostname = ?1", [name])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!("device {name:?} is already revoked")));
        }
        tx.execute(
            "UPDATE leases SET revoked_ms = ?2, revoke_reason = 'device revoked' WHERE device_id = ?1 AND revoked_ms IS NULL",
            params![dev.id.0 as i64, now_ms],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::DeviceRevoke,
                target: name,
                detail: serde_json::json!({ "device_id": dev.id, "ipv4": dev.ipv4 }),
            },
            now_ms,
        )?;
        Ok(dev)
    })
}

pub(super) fn touch_device(
    s: &SqliteStore,
    id: DeviceId,
    wg: Option<WgPublicKey>,
    endpoints: &[SocketAddr],
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "UPDATE devices SET last_seen_ms = ?2, wg_key = COALESCE(?3, wg_key), endpoints = ?4 WHERE id = ?1",
            params![
                id.0 as i64,
                now_ms,
                wg.map(|k| k.to_base64()),
                serde_json::to_string(endpoints).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        Ok(())
    })
}

/// Every touch in one transaction (one commit, one WAL sync).
pub(super) fn touch_devices(s: &SqliteStore, touches: &[crate::store::Touch]) -> Result<()> {
    if touches.is_empty() {
        return Ok(());
    }
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "UPDATE devices SET last_seen_ms = ?2, wg_key = COALESCE(?3, wg_key), endpoints = ?4 WHERE id = ?1",
        )?;
        for t in touches {
            stmt.execute(params![
                t.id.0 as i64,
                t.at_ms,
                t.wg.map(|k| k.to_base64()),
                serde_json::to_string(&t.endpoints).unwrap_or_else(|_| "[]".into())
            ])?;
        }
        Ok(())
    })
}

pub(super) fn set_device_cert(
    s: &SqliteStore,
    id: DeviceId,
    not_after_ms: i64,
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "UPDATE devices SET cert_not_after_ms = ?2 WHERE id = ?1",
            params![id.0 as i64, not_after_ms],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor: "device",
                action: Action::DeviceCertRenewed,
                target: &id.to_string(),
                detail: serde_json::json!({ "not_after_ms": not_after_ms }),
            },
            now_ms,
        )
    })
}

pub(super) fn set_quarantine(
    s: &SqliteStore,
    id: DeviceId,
    quarantine: Option<&Quarantine>,
    actor: &str,
    now_ms: i64,
) -> Result<Device> {
    s.with_tx(|tx| {
        let json = quarantine
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Invalid(format!("quarantine record: {e}")))?;
        let n = tx.execute(
            "UPDATE devices SET quarantine = ?2 WHERE id = ?1",
            params![id.0 as i64, json],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no device {id}")));
        }
        // Scan evidence against the device is spent, as in every replica's trust book when
        // the quarantine changes: a replica starting later must not count it again.
        tx.execute(
            "DELETE FROM scan_evidence WHERE source_id = ?1",
            [id.0 as i64],
        )?;
        let dev = query_devices(tx, "WHERE d.id = ?1", [id.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device {id}")))?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: if quarantine.is_some() {
                    Action::DeviceQuarantine
                } else {
                    Action::DeviceRelease
                },
                target: dev.hostname.as_str(),
                detail: serde_json::json!({ "quarantine": quarantine }),
            },
            now_ms,
        )?;
        Ok(dev)
    })
}

pub(super) fn save_posture(
    s: &SqliteStore,
    id: DeviceId,
    report: &serde_json::Value,
    evaluation: &serde_json::Value,
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "INSERT INTO posture(device_id, report, evaluation, updated_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(device_id) DO UPDATE SET report = ?2, evaluation = ?3, updated_ms = ?4",
            params![
                id.0 as i64,
                report.to_string(),
                evaluation.to_string(),
                now_ms
            ],
        )?;
        Ok(())
    })
}

pub(super) fn posture(
    s: &SqliteStore,
    id: DeviceId,
) -> Result<Option<(serde_json::Value, serde_json::Value, i64)>> {
    s.with_tx(|tx| {
        let row: Option<(String, String, i64)> = tx
            .query_row(
                "SELECT report, evaluation, updated_ms FROM posture WHERE device_id = ?1",
                [id.0 as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((r, e, t)) = row else {
            return Ok(None);
        };
        let parse = |column, s: &str| {
            serde_json::from_str(s).map_err(|e| corrupt("posture", column, id, e))
        };
        Ok(Some((parse("report", &r)?, parse("evaluation", &e)?, t)))
    })
}

/// When each device's latest posture report was stored.
pub(super) fn posture_times(s: &SqliteStore) -> Result<BTreeMap<DeviceId, i64>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare("SELECT device_id, updated_ms FROM posture")?;
        let rows = stmt.query_map([], |r| {
            let id: i64 = r.get(0)?;
            Ok((DeviceId(id as u64), r.get::<_, i64>(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<BTreeMap<_, _>>>()?)
    })
}

pub(super) fn edit_device_tags(
    s: &SqliteStore,
    name: &str,
    add: &[Name],
    remove: &[Name],
    actor: &str,
    now_ms: i64,
) -> Result<Device> {
    s.with_tx(|tx| {
        let not_found = || StoreError::NotFound(format!("no device named {name:?}"));
        let dev = query_devices(tx, "WHERE d.hostname = ?1", [name])?
            .into_iter()
            .next()
            .ok_or_else(not_found)?;
        let mut tags = dev.tags;
        for t in add {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        tags.retain(|t| !remove.contains(t));
        let json =
            serde_json::to_string(&tags).map_err(|e| StoreError::Invalid(format!("tags: {e}")))?;
        tx.execute(
            "UPDATE devices SET tags = ?2 WHERE id = ?1",
            params![dev.id.0 as i64, json],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::DeviceTag,
                target: name,
                detail: serde_json::json!({ "tags": tags }),
            },
            now_ms,
        )?;
        query_devices(tx, "WHERE d.id = ?1", [dev.id.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(not_found)
    })
}

/// The first of `base`, `base-2`, `base-3`, … that no device (active or revoked) holds.
pub(super) fn first_free_name(tx: &Tx<'_>, base: &Hostname) -> Result<Hostname> {
    let mut name = base.clone();
    let mut k = 2;
    while name_holder(tx, name.as_str())?.is_some() {
        name = base.with_suffix(k);
        k += 1;
        if k > 10_000 {
            return Err(StoreError::Conflict(format!(
                "no free hostname for {:?}",
                base.as_str()
            )));
        }
    }
    Ok(name)
}

/// The device holding `name`: its id, whether it is active, whether the name is bound.
fn name_holder(tx: &Tx<'_>, name: &str) -> Result<Option<(i64, bool, bool)>> {
    Ok(tx
        .query_row(
            "SELECT id, status = 'active', name_bound FROM devices WHERE hostname = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? != 0)),
        )
        .optional()?)
}

/// Frees `name` for an administrator-bound use. Nobody holds it: `None`. A revoked device, or
/// an active device whose name is self-chosen (a display name), holds it: that device moves to
/// the first free `name-N` (audited, its binding unchanged) and its id is returned. An active
/// device with a bound name holds it: `Conflict`, nothing changes. `except` is the device being
/// renamed itself.
pub(super) fn free_name(
    tx: &Tx<'_>,
    name: &Hostname,
    except: Option<DeviceId>,
    actor: &str,
    now_ms: i64,
) -> Result<Option<DeviceId>> {
    let Some((id, active, bound)) = name_holder(tx, name.as_str())? else {
        return Ok(None);
    };
    if except.is_some_and(|e| e.0 as i64 == id) {
        return Ok(None);
    }
    if active && bound {
        return Err(StoreError::Conflict(format!(
            "the name {:?} is bound to another active device",
            name.as_str()
        )));
    }
    let aside = first_free_name(tx, name)?;
    tx.execute(
        "UPDATE devices SET hostname = ?2 WHERE id = ?1",
        params![id, aside.as_str()],
    )?;
    append_audit_tx(
        tx,
        Audit {
            actor,
            action: Action::DeviceRename,
            target: name.as_str(),
            detail: serde_json::json!({
                "device_id": id, "new": aside.as_str(), "bound": false,
                "why": "moved aside for an administrator-bound name",
            }),
        },
        now_ms,
    )?;
    Ok(Some(DeviceId(id as u64)))
}

/// The active device named `name` (an admin names devices by hostname): not found, or
/// revoked, is an error in words.
fn active_device_named(tx: &Tx<'_>, name: &str) -> Result<Device> {
    let dev = query_devices(tx, "WHERE d.hostname = ?1", [name])?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))?;
    if dev.status != DeviceStatus::Active {
        return Err(StoreError::Conflict(format!("device {name:?} is revoked")));
    }
    Ok(dev)
}

pub(super) fn rename_device(
    s: &SqliteStore,
    old: &str,
    new: &Hostname,
    actor: &str,
    now_ms: i64,
) -> Result<Device> {
    s.with_tx(|tx| {
        let dev = active_device_named(tx, old)?;
        free_name(tx, new, Some(dev.id), actor, now_ms)?;
        tx.execute(
            "UPDATE devices SET hostname = ?2, name_bound = 1 WHERE id = ?1",
            params![dev.id.0 as i64, new.as_str()],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::DeviceRename,
                target: old,
                detail: serde_json::json!({
                    "device_id": dev.id, "new": new.as_str(), "bound": true,
                    "was_bound": dev.name_bound,
                }),
            },
            now_ms,
        )?;
        query_devices(tx, "WHERE d.id = ?1", [dev.id.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device named {old:?}")))
    })
}

pub(super) fn approve_device_name(
    s: &SqliteStore,
    name: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Device> {
    s.with_tx(|tx| {
        let dev = active_device_named(tx, name)?;
        if dev.name_bound {
            return Err(StoreError::Conflict(format!(
                "the name of device {name:?} is already bound"
            )));
        }
        tx.execute(
            "UPDATE devices SET name_bound = 1 WHERE id = ?1",
            [dev.id.0 as i64],
        )?;
        append_audit_tx(
            tx,
            Audit {
                actor,
                action: Action::DeviceApprove,
                target: name,
                detail: serde_json::json!({ "device_id": dev.id }),
            },
            now_ms,
        )?;
        query_devices(tx, "WHERE d.id = ?1", [dev.id.0 as i64])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(format!("no device named {name:?}")))
    })
}
