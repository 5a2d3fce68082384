//! The maturity table: one row per recorded assessment, hash-chained like the audit table
//! (each row's hash covers the previous row's hash), so `maturity history` can tell an
//! untouched trend from an edited one.

use crate::store::db::Tx;
use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};

use super::*;
use crate::store::MaturityRow;

/// Rows `maturity history` reads at most (one a day plus one per policy change: decades).
const MAX_ROWS: i64 = 100_000;

fn row_hash(prev: &[u8], seq: i64, ts_ms: i64, trigger: &str, assessment: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    for part in [
        seq.to_be_bytes().as_slice(),
        ts_ms.to_be_bytes().as_slice(),
        trigger.as_bytes(),
        assessment.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().to_vec()
}

pub(super) fn append_tx(tx: &Tx<'_>, trigger: &str, assessment: &str, now_ms: i64) -> Result<i64> {
    let last: Option<(i64, Vec<u8>)> = tx
        .query_row(
            "SELECT seq, hash FROM maturity ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, vec![0u8; 32]),
    };
    let hash = row_hash(&prev, seq, now_ms, trigger, assessment);
    tx.execute(
        "INSERT INTO maturity(seq, ts_ms, trigger, assessment, prev_hash, hash) VALUES (?1,?2,?3,?4,?5,?6)",
        params![seq, now_ms, trigger, assessment, prev, hash],
    )?;
    Ok(seq)
}

pub(super) fn history_tx(tx: &Tx<'_>) -> Result<MaturityChain> {
    let mut stmt = tx.prepare(
        "SELECT seq, ts_ms, trigger, assessment, prev_hash, hash FROM maturity ORDER BY seq LIMIT ?1",
    )?;
    let rows = stmt.query_map([MAX_ROWS], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Vec<u8>>(4)?,
            r.get::<_, Vec<u8>>(5)?,
        ))
    })?;
    let mut out = MaturityChain {
        rows: Vec::new(),
        verified: true,
        first_bad_seq: None,
    };
    let mut prev = vec![0u8; 32];
    let mut expect_seq = 1;
    for row in rows {
        let (seq, ts_ms, trigger, assessment, prev_hash, hash) = row?;
        let ok = seq == expect_seq
            && prev_hash == prev
            && hash == row_hash(&prev, seq, ts_ms, &trigger, &assessment);
        if !ok && out.verified {
            out.verified = false;
            out.first_bad_seq = Some(seq);
        }
        expect_seq = seq + 1;
        prev = hash.clone();
        out.rows.push(MaturityRow {
            seq,
            ts_ms,
            trigger,
            assessment,
            hash: hex::encode(hash),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ((), SqliteStore) {
        ((), SqliteStore::open_in_memory().unwrap())
    }

    #[test]
    fn appends_chain_and_verify() {
        let (_d, s) = store();
        assert!(s.maturity_history().unwrap().rows.is_empty());
        assert_eq!(s.append_maturity("daily", "{\"a\":1}", 10).unwrap(), 1);
        assert_eq!(
            s.append_maturity("policy.apply v2", "{\"a\":2}", 20)
                .unwrap(),
            2
        );
        let h = s.maturity_history().unwrap();
        assert!(h.verified, "{h:?}");
        assert_eq!(h.rows.len(), 2);
        assert_eq!(h.rows[1].trigger, "policy.apply v2");
        assert_eq!(h.rows[1].ts_ms, 20);
    }

    #[test]
    fn an_edited_or_deleted_row_breaks_the_chain() {
        let (_d, s) = store();
        for i in 0..3 {
            s.append_maturity("daily", &format!("{{\"n\":{i}}}"), i)
                .unwrap();
        }
        s.with_tx(|tx| {
            tx.execute(
                "UPDATE maturity SET assessment = '{\"n\":9}' WHERE seq = 2",
                [],
            )?;
            Ok(())
        })
        .unwrap();
        let h = s.maturity_history().unwrap();
        assert!(!h.verified);
        assert_eq!(h.first_bad_seq, Some(2));

        let (_d2, s) = store();
        for i in 0..3 {
            s.append_maturity("daily", "{}", i).unwrap();
        }
        s.with_tx(|tx| {
            tx.execute("DELETE FROM maturity WHERE seq = 2", [])?;
            Ok(())
        })
        .unwrap();
        let h = s.maturity_history().unwrap();
        assert!(!h.verified);
        assert_eq!(h.first_bad_seq, Some(3));
    }
}
