//! The flow tables: `flows` (one row per reporter, window and flow key, counts merged),
//! `flow_reports` (each (device, seq) stored, so a retransmission is stored once) and
//! `flow_sources` (per device: highest seq, gaps, dropped records).
//!
//! Merging is a read and a write of the key's row inside the report's transaction (counts
//! added with saturation in Rust, never SQL arithmetic that could overflow into a float); a
//! PostgreSQL store does the same under its own transaction.

use crate::store::db::{Row, Tx};
use rusqlite::{params, OptionalExtension};
use std::net::IpAddr;

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowRecord, FlowReport, FlowVerdict, Role, ShadowVerdict};

use super::*;

/// Windows starting more than this after the coordinator's now are not stored.
const FUTURE_SLACK_MS: i64 = 10 * 60 * 1000;

/// A flow enum's wire name (`initiator`, `tcp`, `no_rule`), as stored.
fn name_of<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn parse_name<T: serde::de::DeserializeOwned>(column: &'static str, id: i64, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| corrupt("flows", column, id, e))
}

/// Counts are u64 on the wire and i64 in SQL: anything above i64::MAX is stored as i64::MAX.
fn sql_count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Text a device sent, for tables: control characters removed.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

pub(super) fn store_flows_tx(
    tx: &Tx<'_>,
    reporter: DeviceId,
    report: &FlowReport,
    relabeled: &FlowReport,
    keep_after_ms: i64,
    now_ms: i64,
) -> Result<FlowsStored> {
    let dev = i64::try_from(reporter.0).map_err(|_| StoreError::Invalid("device id".into()))?;
    let seq = sql_count(report.seq);
    let source: Option<(i64, i64, i64)> = tx
        .query_row(
            "SELECT last_seq, floor_seq, missing_seqs FROM flow_sources WHERE device_id = ?1",
            [dev],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let (mut last_seq, floor_seq, mut missing) = source.unwrap_or((0, 0, 0));
    let digest = report_digest(report);
    let seen: Option<Vec<u8>> = tx
        .query_row(
            "SELECT digest FROM flow_reports WHERE device_id = ?1 AND seq = ?2",
            params![dev, seq],
            |r| r.get(0),
        )
        .optional()?;
    let mut renumbered = 0i64;
    match seen {
        Some(d) if d == digest => return Ok(FlowsStored::Duplicate),
        // Report 1 again with other content: the device lost its state and numbers from 1
        // again. Its old marks go, so its new reports are stored, not taken for old ones.
        Some(_) if seq == 1 => {
            tx.execute("DELETE FROM flow_reports WHERE device_id = ?1", [dev])?;
            (last_seq, missing, renumbered) = (0, 0, 1);
        }
        // Another report under a number already used: kept out (it cannot be told from a
        // replay), acknowledged so the device moves on.
        Some(_) => return Ok(FlowsStored::Duplicate),
        None if seq <= floor_seq => return Ok(FlowsStored::Duplicate),
        None => {}
    }
    tx.execute(
        "INSERT INTO flow_reports(device_id, seq, received_ms, records, digest)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            dev,
            seq,
            now_ms,
            report
                .windows
                .iter()
                .map(|w| w.records.len() as i64)
                .sum::<i64>(),
            digest
        ],
    )?;
    // The records as the coordinator relabeled them; the marks above are the received
    // report's, so a retransmission is recognised whatever its records were judged to be.
    let (mut stored, mut refused) = (0usize, 0usize);
    for w in &relabeled.windows {
        if w.end_ms < keep_after_ms || w.start_ms > now_ms.saturating_add(FUTURE_SLACK_MS) {
            refused += w.records.len();
            continue;
        }
        for r in &w.records {
            merge_record(tx, dev, w.start_ms, w.end_ms, r)?;
            stored += 1;
        }
    }
    // A seq beyond the next opens a gap; one below the highest fills one.
    let (gap, last_seq, missing) = if seq > last_seq {
        let gap = seq - last_seq - 1;
        (gap, seq, missing.saturating_add(gap))
    } else {
        (0, last_seq, missing.saturating_sub(1).max(0))
    };
    // After a renumbering the device's cumulative dropped count starts over too: it is added
    // to the count from before.
    tx.execute(
        "INSERT INTO flow_sources(device_id, last_seq, floor_seq, reports, missing_seqs,
             dropped_records, refused_records, renumbered, last_report_ms)
         VALUES (?1, ?2, 0, 1, ?3, ?4, ?5, 0, ?6)
         ON CONFLICT(device_id) DO UPDATE SET
             last_seq = excluded.last_seq,
             floor_seq = CASE WHEN ?7 = 1 THEN 0 ELSE flow_sources.floor_seq END,
             reports = flow_sources.reports + 1,
             missing_seqs = excluded.missing_seqs,
             dropped_records = CASE WHEN ?7 = 1
                 THEN flow_sources.dropped_records + excluded.dropped_records
                 ELSE MAX(flow_sources.dropped_records, excluded.dropped_records) END,
             refused_records = flow_sources.refused_records + excluded.refused_records,
             renumbered = flow_sources.renumbered + ?7,
             last_report_ms = excluded.last_report_ms",
        params![
            dev,
            last_seq,
            missing,
            sql_count(report.dropped_records),
            refused as i64,
            now_ms,
            renumbered
        ],
    )?;
    Ok(FlowsStored::Stored {
        records: stored,
        refused,
        gap: u64::try_from(gap).unwrap_or(0),
    })
}

/// SHA-256 of the report as encoded: a retransmission repeats it exactly.
fn report_digest(report: &FlowReport) -> Vec<u8> {
    use sha2::Digest;
    let bytes = serde_json::to_vec(report).unwrap_or_default();
    sha2::Sha256::digest(&bytes).to_vec()
}

/// A stored row's id, window end, packets and bytes out and in, connections and candidate
/// verdict (`''`: none).
type StoredCounts = (i64, i64, i64, i64, i64, i64, i64, String);

/// Adds one record to its key's row in the window, or inserts the row.
fn merge_record(tx: &Tx<'_>, dev: i64, start_ms: i64, end_ms: i64, r: &FlowRecord) -> Result<()> {
    let peer_addr = r.peer_addr.to_string();
    let role = name_of(&r.role);
    let proto = name_of(&r.proto);
    let verdict = name_of(&r.verdict);
    let rule = r.rule.as_deref().map(printable).unwrap_or_default();
    let reason = r.reason.map(|c| name_of(&c)).unwrap_or_default();
    let peer_id = r.peer.and_then(|p| i64::try_from(p.0).ok());
    let peer_user = r.peer_user.as_deref().map(printable);
    let tags: Vec<String> = r.peer_tags.iter().map(|t| printable(t)).collect();
    let tags = serde_json::to_string(&tags).unwrap_or_else(|_| "[]".into());
    let policy_version = r.policy_version.map(sql_count);
    let existing: Option<StoredCounts> = tx
        .query_row(
            "SELECT id, window_end_ms, packets_out, bytes_out, packets_in, bytes_in, connections,
                 shadow
             FROM flows WHERE reporter = ?1 AND window_start_ms = ?2 AND peer_addr = ?3
             AND role = ?4 AND proto = ?5 AND port = ?6 AND verdict = ?7 AND rule = ?8
             AND reason = ?9",
            params![
                dev,
                start_ms,
                peer_addr,
                role,
                proto,
                i64::from(r.port),
                verdict,
                rule,
                reason
            ],
            |x| {
                Ok((
                    x.get(0)?,
                    x.get(1)?,
                    x.get(2)?,
                    x.get(3)?,
                    x.get(4)?,
                    x.get(5)?,
                    x.get(6)?,
                    x.get(7)?,
                ))
            },
        )
        .optional()?;
    let add = |a: i64, b: u64| a.saturating_add(sql_count(b)).max(0);
    match existing {
        Some((id, end, po, bo, pi, bi, c, had)) => {
            // An unreadable stored verdict counts as none: the new one decides.
            let had: Option<ShadowVerdict> = (!had.is_empty())
                .then(|| serde_json::from_value(serde_json::Value::String(had)).ok())
                .flatten();
            let shadow = ShadowVerdict::merge(had, r.shadow)
                .map(|v| name_of(&v))
                .unwrap_or_default();
            tx.execute(
                "UPDATE flows SET window_end_ms = ?2, peer_id = ?3, peer_user = ?4, peer_tags = ?5,
                     policy_version = ?6, packets_out = ?7, bytes_out = ?8, packets_in = ?9,
                     bytes_in = ?10, connections = ?11, shadow = ?12
                 WHERE id = ?1",
                params![
                    id,
                    end.max(end_ms),
                    peer_id,
                    peer_user,
                    tags,
                    policy_version,
                    add(po, r.packets_out),
                    add(bo, r.bytes_out),
                    add(pi, r.packets_in),
                    add(bi, r.bytes_in),
                    add(c, r.connections),
                    shadow,
                ],
            )?;
        }
        None => {
            tx.execute(
                "INSERT INTO flows(reporter, window_start_ms, window_end_ms, peer_id, peer_addr,
                     role, proto, port, verdict, rule, reason, peer_user, peer_tags,
                     policy_version, packets_out, bytes_out, packets_in, bytes_in, connections,
                     shadow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                     ?17, ?18, ?19, ?20)",
                params![
                    dev,
                    start_ms,
                    end_ms,
                    peer_id,
                    peer_addr,
                    role,
                    proto,
                    i64::from(r.port),
                    verdict,
                    rule,
                    reason,
                    peer_user,
                    tags,
                    policy_version,
                    sql_count(r.packets_out),
                    sql_count(r.bytes_out),
                    sql_count(r.packets_in),
                    sql_count(r.bytes_in),
                    sql_count(r.connections),
                    r.shadow.map(|v| name_of(&v)).unwrap_or_default(),
                ],
            )?;
        }
    }
    Ok(())
}

const FLOW_COLUMNS: &str = "id, reporter, window_start_ms, window_end_ms, peer_id, peer_addr, \
     role, proto, port, verdict, rule, reason, peer_user, peer_tags, policy_version, \
     packets_out, bytes_out, packets_in, bytes_in, connections, shadow";

pub(super) fn flows(s: &SqliteStore, q: &FlowQuery) -> Result<Vec<FlowRow>> {
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    s.with_tx(|tx| {
        let mut out = Vec::new();
        match &q.involving {
            None => {
                let mut stmt = tx.prepare(&format!(
                    "SELECT {FLOW_COLUMNS} FROM flows WHERE window_end_ms >= ?1
                     ORDER BY window_end_ms DESC, id DESC LIMIT ?2"
                ))?;
                let mut rows = stmt.query(params![q.since_ms, limit])?;
                while let Some(r) = rows.next()? {
                    out.push(flow_row(&r)?);
                }
            }
            Some(ids) => {
                // Each device's rows through the two indexes, merged without duplicates.
                let mut seen = std::collections::BTreeSet::new();
                let mut stmt = tx.prepare(&format!(
                    "SELECT {FLOW_COLUMNS} FROM flows WHERE reporter = ?1 AND window_end_ms >= ?2
                     UNION
                     SELECT {FLOW_COLUMNS} FROM flows WHERE peer_id = ?1 AND window_end_ms >= ?2
                     ORDER BY window_end_ms DESC, id DESC LIMIT ?3"
                ))?;
                for id in ids {
                    let Ok(id) = i64::try_from(id.0) else {
                        continue;
                    };
                    let mut rows = stmt.query(params![id, q.since_ms, limit])?;
                    while let Some(r) = rows.next()? {
                        let row_id: i64 = r.get(0)?;
                        if seen.insert(row_id) {
                            out.push(flow_row(&r)?);
                        }
                    }
                }
                out.sort_by_key(|r| std::cmp::Reverse(r.window_end_ms));
                out.truncate(q.limit);
            }
        }
        Ok(out)
    })
}

fn flow_row(r: &Row<'_>) -> Result<FlowRow> {
    let id: i64 = r.get(0)?;
    let count = |i: usize| -> Result<u64> {
        let v: i64 = r.get(i)?;
        u64::try_from(v).map_err(|e| corrupt("flows", "counts", id, e))
    };
    let reporter: i64 = r.get(1)?;
    let peer_id: Option<i64> = r.get(4)?;
    let peer_addr: String = r.get(5)?;
    let peer_addr: IpAddr = peer_addr
        .parse()
        .map_err(|e| corrupt("flows", "peer_addr", id, e))?;
    let role: Role = parse_name("role", id, &r.get::<_, String>(6)?)?;
    let proto: Proto = parse_name("proto", id, &r.get::<_, String>(7)?)?;
    let port: i64 = r.get(8)?;
    let verdict: FlowVerdict = parse_name("verdict", id, &r.get::<_, String>(9)?)?;
    let rule: String = r.get(10)?;
    let reason: String = r.get(11)?;
    let reason: Option<DenyCause> = if reason.is_empty() {
        None
    } else {
        Some(parse_name("reason", id, &reason)?)
    };
    let tags: String = r.get(13)?;
    let policy_version: Option<i64> = r.get(14)?;
    let shadow: String = r.get(20)?;
    let shadow: Option<ShadowVerdict> = if shadow.is_empty() {
        None
    } else {
        Some(parse_name("shadow", id, &shadow)?)
    };
    Ok(FlowRow {
        reporter: DeviceId(
            u64::try_from(reporter).map_err(|e| corrupt("flows", "reporter", id, e))?,
        ),
        window_start_ms: r.get(2)?,
        window_end_ms: r.get(3)?,
        record: FlowRecord {
            role,
            peer: peer_id.and_then(|p| u64::try_from(p).ok()).map(DeviceId),
            peer_addr,
            peer_user: r.get(12)?,
            peer_tags: json_list("flows", "peer_tags", id, &tags)?,
            proto,
            port: u16::try_from(port).map_err(|e| corrupt("flows", "port", id, e))?,
            verdict,
            rule: (!rule.is_empty()).then_some(rule),
            policy_version: policy_version.and_then(|v| u64::try_from(v).ok()),
            reason,
            packets_out: count(15)?,
            bytes_out: count(16)?,
            packets_in: count(17)?,
            bytes_in: count(18)?,
            connections: count(19)?,
            shadow,
        },
    })
}

pub(super) fn flow_sources(s: &SqliteStore) -> Result<Vec<FlowSource>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT device_id, last_seq, reports, missing_seqs, dropped_records, refused_records,
                 last_report_ms, renumbered FROM flow_sources ORDER BY device_id",
        )?;
        let rows = stmt.query_map([], |r| {
            let u = |i: usize| -> rusqlite::Result<u64> {
                Ok(u64::try_from(r.get::<_, i64>(i)?).unwrap_or(0))
            };
            Ok(FlowSource {
                device: DeviceId(u(0)?),
                last_seq: u(1)?,
                reports: u(2)?,
                missing_seqs: u(3)?,
                dropped_records: u(4)?,
                refused_records: u(5)?,
                last_report_ms: r.get(6)?,
                renumbered: u(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

pub(super) fn prune_tx(tx: &Tx<'_>, before_ms: i64, max_rows: usize) -> Result<u64> {
    let n = tx.execute(
        "DELETE FROM flows WHERE id IN
             (SELECT id FROM flows WHERE window_end_ms < ?1 ORDER BY window_end_ms LIMIT ?2)",
        params![before_ms, i64::try_from(max_rows).unwrap_or(i64::MAX)],
    )?;
    // The marks of old reports go too; their sequence numbers stay refused through the floor.
    tx.execute(
        "UPDATE flow_sources SET floor_seq = MAX(floor_seq,
             (SELECT MAX(seq) FROM flow_reports
              WHERE flow_reports.device_id = flow_sources.device_id AND received_ms < ?1))
         WHERE EXISTS (SELECT 1 FROM flow_reports
              WHERE flow_reports.device_id = flow_sources.device_id AND received_ms < ?1)",
        [before_ms],
    )?;
    tx.execute(
        "DELETE FROM flow_reports WHERE received_ms < ?1",
        [before_ms],
    )?;
    Ok(n as u64)
}
