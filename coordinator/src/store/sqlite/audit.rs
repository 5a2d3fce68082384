use rusqlite::{params, OptionalExtension};

use super::*;
use sha2::{Digest, Sha256};
use ward_shared::secret::ct_eq;

pub(super) fn audit_hash(
    prev: &[u8],
    seq: i64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    for part in [
        seq.to_be_bytes().as_slice(),
        ts_ms.to_be_bytes().as_slice(),
        actor.as_bytes(),
        action.as_bytes(),
        target.as_bytes(),
        detail.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().to_vec()
}

pub(super) fn append_audit_tx(
    tx: &rusqlite::Transaction<'_>,
    a: Audit<'_>,
    now_ms: i64,
) -> Result<()> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, vec![0u8; 32]),
    };
    let detail = a.detail.to_string();
    let hash = audit_hash(
        &prev,
        seq,
        now_ms,
        a.actor,
        a.action.as_str(),
        a.target,
        &detail,
    );
    tx.execute(
        "INSERT INTO audit(seq, ts_ms, actor, action, target, detail, prev_hash, hash) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
        params![seq, now_ms, a.actor, a.action.as_str(), a.target, detail, prev, hash],
    )?;
    Ok(())
}
pub(super) fn append_audit(s: &SqliteStore, a: Audit<'_>, now_ms: i64) -> Result<()> {
    s.with_tx(|tx| append_audit_tx(tx, a, now_ms))
}

pub(super) fn audit_log(s: &SqliteStore, limit: i64) -> Result<Vec<AuditEntry>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT seq, ts_ms, actor, action, target, detail, hash FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = stmt.query_map([limit], |r| {
            let detail: String = r.get(5)?;
            let hash: Vec<u8> = r.get(6)?;
            Ok(AuditEntry {
                seq: r.get(0)?,
                ts_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
                hash: hex::encode(hash),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

pub(super) fn verify_audit(s: &SqliteStore) -> Result<AuditVerdict> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT seq, ts_ms, actor, action, target, detail, prev_hash, hash FROM audit ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        let mut prev = vec![0u8; 32];
        let mut expect_seq = 1i64;
        let mut n = 0i64;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let ts: i64 = r.get(1)?;
            let actor: String = r.get(2)?;
            let action: String = r.get(3)?;
            let target: String = r.get(4)?;
            let detail: String = r.get(5)?;
            let prev_hash: Vec<u8> = r.get(6)?;
            let hash: Vec<u8> = r.get(7)?;
            n += 1;
            let bad = |why: &str| AuditVerdict {
                ok: false,
                rows: n,
                first_bad_seq: Some(seq),
                message: format!("audit row {seq}: {why}"),
            };
            if seq != expect_seq {
                return Ok(bad(&format!("expected row {expect_seq} (a row was removed or inserted)")));
            }
            if !ct_eq(&prev_hash, &prev) {
                return Ok(bad("does not chain to the previous row"));
            }
            let want = audit_hash(&prev, seq, ts, &actor, &action, &target, &detail);
            if !ct_eq(&want, &hash) {
                return Ok(bad("contents do not match its hash (edited)"));
            }
            prev = hash;
            expect_seq += 1;
        }
        Ok(AuditVerdict {
            ok: true,
            rows: n,
            first_bad_seq: None,
            message: format!("audit log intact: {n} rows, chain head {}", hex::encode(&prev[..8])),
        })
    })
}
