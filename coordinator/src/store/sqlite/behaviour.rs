//! Behaviour baselines (one JSON snapshot per device and per group) and anomalies (JSON, keyed
//! by id).

use rusqlite::params;
use ward_shared::wire::DeviceId;

use super::SqliteStore;
use crate::store::Result;

pub(super) fn save_baselines(
    s: &SqliteStore,
    rows: &[(DeviceId, String)],
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(
            "INSERT INTO behaviour_baselines(device_id, snapshot, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(device_id) DO UPDATE SET snapshot = ?2, updated_ms = ?3",
        )?;
        for (id, snap) in rows {
            st.execute(params![id.0 as i64, snap, now_ms])?;
        }
        Ok(())
    })
}

pub(super) fn baselines(s: &SqliteStore) -> Result<Vec<(DeviceId, String)>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare("SELECT device_id, snapshot FROM behaviour_baselines")?;
        let rows = st
            .query_map([], |r| {
                Ok((DeviceId(r.get::<_, i64>(0)? as u64), r.get(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    })
}

pub(super) fn save_group_baselines(
    s: &SqliteStore,
    rows: &[(String, String)],
    now_ms: i64,
) -> Result<()> {
    s.with_tx(|tx| {
        let mut st = tx.prepare(
            "INSERT INTO behaviour_group_baselines(name, snapshot, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET snapshot = ?2, updated_ms = ?3",
        )?;
        for (name, snap) in rows {
            st.execute(params![name, snap, now_ms])?;
        }
        Ok(())
    })
}

pub(super) fn group_baselines(s: &SqliteStore) -> Result<Vec<(String, String)>> {
    s.with_tx(|tx| {
        let mut st = tx.prepare("SELECT name, snapshot FROM behaviour_group_baselines")?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    })
}

pub(super) fn save_anomaly(
    s: &SqliteStore,
    id: u64,
    device: DeviceId,
    at_ms: i64,
    json: &str,
) -> Result<()> {
    s.with_tx(|tx| {
        tx.execute(
            "INSERT INTO anomalies(id, device_id, at_ms, anomaly) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET anomaly = ?4",
            params![id as i64, device.0 as i64, at_ms, json],
        )?;
        Ok(())
    })
}

pub(super) fn anomalies(s: &SqliteStore, since_ms: i64) -> Result<Vec<String>> {
    s.with_tx(|tx| {
        let mut st =
            tx.prepare("SELECT anomaly FROM anomalies WHERE at_ms >= ?1 ORDER BY at_ms, id")?;
        let rows = st
            .query_map([since_ms], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    })
}
