use crate::store::db::Tx;
use rusqlite::{params, OptionalExtension};

use super::*;
use crate::store::anchor::CheckpointError;
use crate::store::VerdictKind;
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

pub(super) fn append_audit_tx(tx: &Tx<'_>, a: Audit<'_>, now_ms: i64) -> Result<()> {
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
    // Other replicas on PostgreSQL wake at this transaction's commit.
    crate::store::postgres::listen::notify_feed(tx, seq)?;
    Ok(())
}
pub(super) fn append_audit(s: &SqliteStore, a: Audit<'_>, now_ms: i64) -> Result<()> {
    s.with_tx(|tx| append_audit_tx(tx, a, now_ms))
}

pub(super) fn audit_counts_since(
    s: &SqliteStore,
    after_seq: i64,
) -> Result<(BTreeMap<String, u64>, i64)> {
    s.with_tx(|tx| {
        // The primary key bounds the scan to the rows written since `after_seq`.
        let mut stmt = tx.prepare(
            "SELECT action, COUNT(*), MAX(seq) FROM audit WHERE seq > ?1 GROUP BY action",
        )?;
        let rows = stmt.query_map([after_seq], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let (mut counts, mut top) = (BTreeMap::new(), after_seq);
        for row in rows {
            let (action, n, max) = row?;
            *counts.entry(action).or_insert(0u64) += u64::try_from(n).unwrap_or(0);
            top = top.max(max);
        }
        Ok((counts, top))
    })
}

pub(super) fn audit_log(s: &SqliteStore, limit: i64) -> Result<Vec<AuditEntry>> {
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(
            "SELECT seq, ts_ms, actor, action, target, detail, hash FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?1) AS recent ORDER BY seq",
        )?;
        let rows = stmt.query_map([limit], entry)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

/// The newest `limit` rows whose action is one of `actions`, oldest first (through the
/// `audit_action` index: as many rows read as returned, however long the log).
pub(super) fn audit_log_of(
    s: &SqliteStore,
    actions: &[&str],
    limit: i64,
) -> Result<Vec<AuditEntry>> {
    if actions.is_empty() || limit <= 0 {
        return Ok(Vec::new());
    }
    let marks: Vec<String> = (0..actions.len()).map(|i| format!("?{}", i + 2)).collect();
    let sql = format!(
        "SELECT seq, ts_ms, actor, action, target, detail, hash FROM (SELECT * FROM audit WHERE action IN ({}) ORDER BY seq DESC LIMIT ?1) AS recent ORDER BY seq",
        marks.join(", ")
    );
    let mut params: Vec<&dyn rusqlite::ToSql> = vec![&limit];
    params.extend(actions.iter().map(|a| a as &dyn rusqlite::ToSql));
    s.with_tx(|tx| {
        let mut stmt = tx.prepare(&sql)?;
        let rows = stmt.query_map(params.as_slice(), entry)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    })
}

/// One row of `SELECT seq, ts_ms, actor, action, target, detail, hash`.
fn entry(r: &crate::store::db::Row<'_>) -> rusqlite::Result<AuditEntry> {
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
}

/// The table's last row: (seq, hash, ts_ms).
pub(super) fn tail(tx: &Tx<'_>) -> Result<Option<(i64, Vec<u8>, i64)>> {
    Ok(tx
        .query_row(
            "SELECT seq, hash, ts_ms FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

/// The database's keyed head: (seq, hash, mac).
type HeadRow = (i64, Vec<u8>, Vec<u8>);

fn head_row(tx: &Tx<'_>) -> Result<Option<HeadRow>> {
    Ok(tx
        .query_row(
            "SELECT seq, hash, mac FROM audit_head WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?)
}

fn set_head(tx: &Tx<'_>, key: &AuditKey, seq: i64, hash: &[u8]) -> Result<()> {
    tx.execute(
        "INSERT INTO audit_head(id, seq, hash, mac) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, mac = excluded.mac",
        params![seq, hash, key.head_mac(seq, hash).to_vec()],
    )?;
    Ok(())
}

/// After a transaction's work, before its commit: if it appended audit rows, moves the keyed
/// head to the new tail and returns (rows, head, head's time) for the checkpoint. The head only
/// moves forward from where it was: a head that no longer matches the tail seen at the start of
/// the transaction (rows deleted or appended behind the coordinator's back) is left alone and
/// reported, so start-up finds the fault instead of it being re-anchored over.
pub(super) fn advance_head(
    tx: &Tx<'_>,
    key: &AuditKey,
    before: Option<(i64, Vec<u8>, i64)>,
) -> Result<Option<(i64, Vec<u8>, i64)>> {
    let after = tail(tx)?;
    if after.as_ref().map(|t| t.0) == before.as_ref().map(|t| t.0) {
        return Ok(None);
    }
    let Some((seq, hash, ts)) = after else {
        return Ok(None);
    };
    let head = head_row(tx)?;
    let consistent = match (&head, &before) {
        (Some((hs, hh, _)), Some((bs, bh, _))) => hs == bs && ct_eq(hh, bh),
        (None, None) => true,
        _ => false,
    };
    if !consistent {
        tracing::error!(
            head_seq = head.as_ref().map(|h| h.0),
            table_seq = before.as_ref().map(|b| b.0),
            "the audit table's tail does not match its keyed head; not re-anchoring (run `audit verify`)"
        );
        return Ok(None);
    }
    set_head(tx, key, seq, &hash)?;
    Ok(Some((seq, hash, ts)))
}

/// Anchors the chain as it stands now: the keyed head and a fresh checkpoint. For a database
/// that has never been anchored (created before anchoring existed) and for an operator's
/// `audit accept-rollback`; `detail` (if any) is appended first as an audit row of `action`.
pub(super) fn reanchor(
    s: &SqliteStore,
    action: Option<(Audit<'_>, i64)>,
) -> Result<(i64, Vec<u8>)> {
    let Some(anchor) = s.anchor() else {
        return Err(StoreError::Invalid("this store has no audit anchor".into()));
    };
    let (seq, hash, ts) = s.raw_tx(|tx| {
        tx.execute("DELETE FROM audit_head", [])?;
        if let Some((a, now)) = action {
            append_audit_tx(tx, a, now)?;
        }
        let (seq, hash, ts) = tail(tx)?.unwrap_or((0, vec![0u8; 32], 0));
        if seq > 0 {
            set_head(tx, &anchor.key, seq, &hash)?;
        }
        Ok((seq, hash, ts))
    })?;
    Checkpoint::new(&anchor.key, seq, &hash, ts)
        .write_atomic(&anchor.checkpoint)
        .map_err(|e| StoreError::Invalid(format!("writing the audit checkpoint: {e}")))?;
    Ok((seq, hash))
}

pub(super) fn verify_audit(s: &SqliteStore) -> Result<AuditVerdict> {
    let chain = verify_chain(s)?;
    let Some(anchor) = s.anchor() else {
        return Ok(chain);
    };
    if !chain.ok {
        return Ok(chain);
    }
    s.with_tx(|tx| anchored_verdict(tx, anchor, chain.rows))
}

fn verdict(
    kind: VerdictKind,
    rows: i64,
    lost: Option<(i64, i64)>,
    message: String,
) -> AuditVerdict {
    AuditVerdict {
        ok: kind == VerdictKind::Intact,
        rows,
        first_bad_seq: lost.map(|l| l.0),
        message,
        kind,
        lost,
    }
}

/// The chain verified row by row (`rows` of them); now compare its tail with the keyed head and
/// the checkpoint.
fn anchored_verdict(tx: &Tx<'_>, anchor: &Anchor, rows: i64) -> Result<AuditVerdict> {
    let (tseq, thash, _) = tail(tx)?.unwrap_or((0, vec![0u8; 32], 0));
    let head = head_row(tx)?;
    if let Some((hs, hh, mac)) = &head {
        if !ct_eq(mac, &anchor.key.head_mac(*hs, hh)) {
            return Ok(verdict(
                VerdictKind::Tampered,
                rows,
                None,
                "audit log TAMPERED: the database's audit head does not carry a valid MAC under audit.key".into(),
            ));
        }
        if *hs > tseq {
            return Ok(verdict(
                VerdictKind::Truncated,
                rows,
                Some((tseq + 1, *hs)),
                format!(
                    "audit log TRUNCATED: rows {}..={hs} were deleted from the table (the database's keyed head counts {hs} rows, the table ends at row {tseq})",
                    tseq + 1
                ),
            ));
        }
        let at_head: Option<Vec<u8>> = tx
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [hs], |r| r.get(0))
            .optional()?;
        if !at_head.is_some_and(|h| ct_eq(&h, hh)) {
            return Ok(verdict(
                VerdictKind::Tampered,
                rows,
                Some((*hs, *hs)),
                format!("audit log TAMPERED: row {hs} is not the row its keyed head names (the chain was rewritten)"),
            ));
        }
        if *hs < tseq {
            return Ok(verdict(
                VerdictKind::Tampered,
                rows,
                Some((hs + 1, tseq)),
                format!(
                    "audit log TAMPERED: rows {}..={tseq} were appended without the audit key",
                    hs + 1
                ),
            ));
        }
    } else if tseq > 0 {
        return Ok(verdict(
            VerdictKind::Tampered,
            rows,
            Some((1, tseq)),
            format!("audit log TAMPERED: {tseq} rows but no keyed head (audit_head was deleted)"),
        ));
    }
    let cp = match Checkpoint::read(&anchor.checkpoint, &anchor.key) {
        Ok(cp) => cp,
        Err(CheckpointError::Missing(p)) => {
            return Ok(verdict(
                VerdictKind::Unanchored,
                rows,
                None,
                format!("audit log UNANCHORED: the checkpoint {p} is missing"),
            ))
        }
        Err(e) => {
            return Ok(verdict(
                VerdictKind::Tampered,
                rows,
                None,
                format!("audit log TAMPERED: {e}"),
            ))
        }
    };
    if cp.rows > tseq {
        return Ok(verdict(
            VerdictKind::RolledBack,
            rows,
            Some((tseq + 1, cp.rows)),
            format!(
                "database ROLLED BACK: rows {}..={} of the audit log (and every write they recorded) are gone; the checkpoint of {} ms counts {} rows, the database ends at row {tseq}",
                tseq + 1,
                cp.rows,
                cp.time_ms,
                cp.rows
            ),
        ));
    }
    if cp.rows > 0 {
        let at_cp: Option<Vec<u8>> = tx
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [cp.rows], |r| {
                r.get(0)
            })
            .optional()?;
        if !at_cp.is_some_and(|h| ct_eq(&h, &cp.head_bytes())) {
            return Ok(verdict(
                VerdictKind::RolledBack,
                rows,
                Some((1, cp.rows)),
                format!(
                    "database ROLLED BACK: its history diverges from the checkpoint at or before row {} (an older copy was restored and written to since)",
                    cp.rows
                ),
            ));
        }
    }
    let lag = if tseq > cp.rows {
        format!(" (checkpoint {} rows behind)", tseq - cp.rows)
    } else {
        String::new()
    };
    Ok(verdict(
        VerdictKind::Intact,
        rows,
        None,
        format!(
            "audit log intact: {rows} rows, chain head {}, anchored{lag}",
            hex::encode(&thash[..thash.len().min(8)])
        ),
    ))
}

pub(super) fn verify_chain(s: &SqliteStore) -> Result<AuditVerdict> {
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
                message: format!("audit log TAMPERED: audit row {seq}: {why}"),
                kind: VerdictKind::Tampered,
                lost: None,
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
            kind: VerdictKind::Intact,
            lost: None,
        })
    })
}
