//! [`ReplicaStore`] on SQLite: several `serve` processes on one database file (WAL mode, so
//! readers never wait for the writer). Reads here use deferred transactions: polling the feed
//! never takes the write lock.

use std::collections::{BTreeMap, BTreeSet};

use rusqlite::{params, OptionalExtension, TransactionBehavior};
use ward_shared::filter::Proto;
use ward_shared::wire::DeviceId;

use super::{Backend, SqliteStore};
use crate::audit::Action;
use crate::store::db::Tx;
use crate::store::replicas::{
    DatabaseStatus, EvidenceBatch, EvidenceRow, FeedRow, ReplicaRow, ReplicaStore, SessionRow,
    TrustRow, MAX_EVIDENCE_PER_REPORTER,
};
use crate::store::{Audit, Result};

impl SqliteStore {
    /// A read: on SQLite a deferred transaction (polling never takes the write lock); on
    /// PostgreSQL an ordinary transaction.
    fn read<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
                let out = f(&Tx::Lite(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(pg) => pg.with_tx(f),
        }
    }

    /// A write with no audit row (bookkeeping other replicas read, never a change they apply).
    fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T>) -> Result<T> {
        self.raw_tx(f)
    }
}

impl ReplicaStore for SqliteStore {
    fn feed_version(&self) -> Result<i64> {
        self.read(|tx| {
            Ok(tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?)
        })
    }

    fn feed_since(&self, after_seq: i64, limit: usize) -> Result<Vec<FeedRow>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT seq, action, target FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![after_seq, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(FeedRow {
                        seq: r.get(0)?,
                        action: r.get(1)?,
                        target: r.get(2)?,
                    })
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn replica_heartbeat(&self, row: &ReplicaRow) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO replicas(id, address, started_ms, last_seen_ms, sessions)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET address = ?2, started_ms = ?3,
                     last_seen_ms = ?4, sessions = ?5",
                params![
                    row.id,
                    row.address,
                    row.started_ms,
                    row.last_seen_ms,
                    i64::try_from(row.sessions).unwrap_or(i64::MAX)
                ],
            )?;
            Ok(())
        })
    }

    fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT id, address, started_ms, last_seen_ms, sessions FROM replicas ORDER BY id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(ReplicaRow {
                    id: r.get(0)?,
                    address: r.get(1)?,
                    started_ms: r.get(2)?,
                    last_seen_ms: r.get(3)?,
                    sessions: u64::try_from(r.get::<_, i64>(4)?).unwrap_or(0),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn claim_session(&self, device: DeviceId, replica: &str, since_ms: i64) -> Result<()> {
        self.write(|tx| {
            // An older claim never overwrites a newer one (claims can arrive out of order).
            // The stored column is named with its table: PostgreSQL finds a bare name in the
            // upsert ambiguous (the stored row or `excluded`).
            tx.execute(
                "INSERT INTO device_sessions(device_id, replica, since_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device_id) DO UPDATE SET replica = ?2, since_ms = ?3,
                     home_relay = NULL
                 WHERE device_sessions.since_ms <= ?3",
                params![device.0 as i64, replica, since_ms],
            )?;
            Ok(())
        })
    }

    fn release_session(&self, device: DeviceId, replica: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM device_sessions WHERE device_id = ?1 AND replica = ?2",
                params![device.0 as i64, replica],
            )?;
            Ok(())
        })
    }

    fn set_session_relay(
        &self,
        device: DeviceId,
        replica: &str,
        relay: Option<&str>,
    ) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE device_sessions SET home_relay = ?3 WHERE device_id = ?1 AND replica = ?2",
                params![device.0 as i64, replica, relay],
            )?;
            Ok(())
        })
    }

    fn sessions(&self) -> Result<Vec<SessionRow>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT device_id, replica, since_ms, home_relay FROM device_sessions
                 ORDER BY device_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SessionRow {
                    device: DeviceId(u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0)),
                    replica: r.get(1)?,
                    since_ms: r.get(2)?,
                    home_relay: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    fn posture_seq(&self, device: DeviceId) -> Result<u64> {
        self.read(|tx| {
            let v: Option<i64> = tx
                .query_row(
                    "SELECT seq FROM posture_seqs WHERE device_id = ?1",
                    [device.0 as i64],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
        })
    }

    fn database(&self) -> DatabaseStatus {
        self.probe_database()
    }

    fn raise_posture_seq(&self, device: DeviceId, seq: u64) -> Result<()> {
        // Sequence numbers above i64::MAX are stored as i64::MAX: still above every real one.
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.write(|tx| {
            tx.execute(
                "INSERT INTO posture_seqs(device_id, seq) VALUES (?1, ?2)
                 ON CONFLICT(device_id) DO UPDATE SET seq = MAX(posture_seqs.seq, ?2)",
                params![device.0 as i64, seq],
            )?;
            Ok(())
        })
    }

    fn save_device_trust(&self, row: &TrustRow, audit: Option<serde_json::Value>) -> Result<()> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO device_trust(device_id, replica, verdict, risk, risk_reason,
                     counters, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(device_id) DO UPDATE SET replica = ?2, verdict = ?3, risk = ?4,
                     risk_reason = ?5, counters = ?6, updated_ms = ?7",
                params![
                    row.device.0 as i64,
                    row.replica,
                    row.verdict,
                    row.risk,
                    row.risk_reason,
                    row.counters,
                    row.updated_ms
                ],
            )?;
            if let Some(detail) = audit {
                let host: Option<String> = tx
                    .query_row(
                        "SELECT hostname FROM devices WHERE id = ?1",
                        [row.device.0 as i64],
                        |r| r.get(0),
                    )
                    .optional()?;
                let target = host.unwrap_or_else(|| row.device.to_string());
                super::append_audit_tx(
                    tx,
                    Audit {
                        actor: "coordinator",
                        action: Action::DeviceTrust,
                        target: &target,
                        detail,
                    },
                    row.updated_ms,
                )?;
            }
            Ok(())
        })
    }

    fn device_trust(&self) -> Result<Vec<TrustRow>> {
        self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT device_id, replica, verdict, risk, risk_reason, counters, updated_ms
                 FROM device_trust ORDER BY device_id",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(TrustRow {
                    device: DeviceId(u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0)),
                    replica: r.get(1)?,
                    verdict: r.get(2)?,
                    risk: r.get(3)?,
                    risk_reason: r.get(4)?,
                    counters: r.get(5)?,
                    updated_ms: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }
    fn add_scan_evidence(
        &self,
        replica: &str,
        reporter: DeviceId,
        flows: &[(DeviceId, Proto, u16)],
        at_ms: i64,
        window_ms: i64,
    ) -> Result<usize> {
        if flows.is_empty() {
            return Ok(0);
        }
        let rep = reporter.0 as i64;
        self.write(|tx| {
            tx.execute(
                "DELETE FROM scan_evidence WHERE at_ms < ?1",
                [at_ms.saturating_sub(window_ms.max(0))],
            )?;
            let held: i64 = tx.query_row(
                "SELECT COUNT(*) FROM scan_evidence WHERE reporter_id = ?1",
                [rep],
                |r| r.get(0),
            )?;
            let mut room_reporter = MAX_EVIDENCE_PER_REPORTER.saturating_sub(count(held));
            let mut by_source: BTreeMap<DeviceId, BTreeSet<(Proto, u16)>> = BTreeMap::new();
            for (src, proto, port) in flows {
                by_source.entry(*src).or_default().insert((*proto, *port));
            }
            let mut added = 0;
            for (src, wanted) in by_source {
                let src = src.0 as i64;
                let mut stmt = tx.prepare(
                    "SELECT proto, port FROM scan_evidence WHERE source_id = ?1 AND reporter_id = ?2",
                )?;
                let have: BTreeSet<(String, i64)> = stmt
                    .query_map(params![src, rep], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                let mut room = crate::trust::MAX_DENIED_PER_REPORTER
                    .saturating_sub(have.len())
                    .min(room_reporter);
                for (proto, port) in wanted {
                    if room == 0 {
                        break;
                    }
                    let name = proto_name(proto);
                    if have.contains(&(name.to_string(), i64::from(port))) {
                        continue;
                    }
                    tx.execute(
                        "INSERT INTO scan_evidence(source_id, reporter_id, proto, port, at_ms, replica)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![src, rep, name, i64::from(port), at_ms, replica],
                    )?;
                    room -= 1;
                    room_reporter -= 1;
                    added += 1;
                }
                // The source's oldest evidence goes when it holds more than the trust book
                // remembers.
                let total: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM scan_evidence WHERE source_id = ?1",
                    [src],
                    |r| r.get(0),
                )?;
                let over = count(total).saturating_sub(crate::trust::MAX_DENIED_REMEMBERED);
                if over > 0 {
                    tx.execute(
                        "DELETE FROM scan_evidence WHERE id IN
                           (SELECT id FROM scan_evidence WHERE source_id = ?1 ORDER BY id LIMIT ?2)",
                        params![src, over as i64],
                    )?;
                }
            }
            if added > 0 {
                crate::store::postgres::listen::notify_feed(tx, 0)?;
            }
            Ok(added)
        })
    }

    fn scan_evidence_since(&self, after_id: i64, limit: usize) -> Result<EvidenceBatch> {
        let rows: Vec<(i64, i64, i64, String, i64, i64, String)> = self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT id, source_id, reporter_id, proto, port, at_ms, replica
                 FROM scan_evidence WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(
                params![after_id, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        let mut out = EvidenceBatch {
            rows: Vec::with_capacity(rows.len()),
            last_id: rows.last().map_or(after_id, |r| r.0),
        };
        for (id, src, rep, proto, port, at_ms, replica) in rows {
            let parsed = match proto.as_str() {
                "tcp" => Some(Proto::Tcp),
                "udp" => Some(Proto::Udp),
                "icmp" => Some(Proto::Icmp),
                _ => None,
            };
            let (Some(proto), Ok(port), Ok(source), Ok(reporter)) = (
                parsed,
                u16::try_from(port),
                u64::try_from(src),
                u64::try_from(rep),
            ) else {
                tracing::error!(
                    table = "scan_evidence",
                    row = id,
                    "a stored scan evidence row does not parse; left out"
                );
                continue;
            };
            out.rows.push(EvidenceRow {
                id,
                source: DeviceId(source),
                reporter: DeviceId(reporter),
                proto,
                port,
                at_ms,
                replica,
            });
        }
        Ok(out)
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
        Proto::Icmp => "icmp",
    }
}

/// A `COUNT(*)` as a size (never negative).
fn count(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

impl SqliteStore {
    /// [`ReplicaStore::database`]: where, the schema version, and a timed `SELECT 1`.
    fn probe_database(&self) -> DatabaseStatus {
        let mut st = DatabaseStatus {
            backend: self.backend_kind().to_string(),
            ..DatabaseStatus::default()
        };
        let started = std::time::Instant::now();
        let res = match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
                st.location = match conn.path() {
                    Some(p) if !p.is_empty() => p.to_string(),
                    _ => ":memory:".to_string(),
                };
                conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                    .and_then(|_| {
                        let ms = started.elapsed().as_secs_f64() * 1000.0;
                        let v: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
                        Ok((ms, v))
                    })
                    .map_err(crate::store::StoreError::from)
            }
            Backend::Postgres(pg) => {
                st.location = pg.location();
                st.listener = Some(
                    self.listener
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .as_ref()
                        .map(|l| l.status())
                        .unwrap_or_default(),
                );
                pg.ping().and_then(|()| {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    Ok((ms, pg.schema_version()?))
                })
            }
        };
        match res {
            Ok((ms, v)) => {
                st.reachable = true;
                st.round_trip_ms = Some((ms * 1000.0).round() / 1000.0);
                st.schema_version = Some(v);
            }
            Err(e) => st.error = Some(e.to_string()),
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Audit, Store};

    #[test]
    fn the_feed_follows_the_audit_log() {
        let s = SqliteStore::open_in_memory().unwrap();
        assert_eq!(s.feed_version().unwrap(), 0);
        for t in ["a", "b", "c"] {
            s.append_audit(
                Audit {
                    actor: "admin",
                    action: crate::audit::Action::DeviceRevoke,
                    target: t,
                    detail: serde_json::json!({}),
                },
                1,
            )
            .unwrap();
        }
        let v = s.feed_version().unwrap();
        assert_eq!(v, 3);
        let rows = s.feed_since(1, 10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.target.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        assert_eq!(rows[0].action, "device.revoke");
        assert_eq!(s.feed_since(0, 1).unwrap().len(), 1);
        assert!(s.feed_since(3, 10).unwrap().is_empty());
    }

    /// Two stores on one file (as two replica processes): one's writes are the other's feed,
    /// and a session claimed through one is seen through the other.
    #[test]
    fn two_stores_on_one_file_share_the_feed_and_the_claims() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ward.db");
        let a = SqliteStore::open(&path).unwrap();
        let b = SqliteStore::open(&path).unwrap();
        let v = b.feed_version().unwrap();
        let n = ward_shared::names::Name::parse("user", "carol").unwrap();
        a.add_user(&n, &[], "admin", 1).unwrap();
        assert!(b.feed_version().unwrap() > v);
        let rows = b.feed_since(v, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].action.as_str(), rows[0].target.as_str()),
            ("user.add", "carol")
        );
        a.claim_session(DeviceId(1), "ra", 10).unwrap();
        b.claim_session(DeviceId(1), "rb", 20).unwrap();
        assert_eq!(a.sessions().unwrap()[0].replica, "rb");
        b.raise_posture_seq(DeviceId(1), 42).unwrap();
        assert_eq!(a.posture_seq(DeviceId(1)).unwrap(), 42);
    }

    #[test]
    fn the_newest_session_claim_wins_and_release_keeps_a_newer_one() {
        let s = SqliteStore::open_in_memory().unwrap();
        let d = DeviceId(7);
        s.claim_session(d, "r1", 100).unwrap();
        s.claim_session(d, "r2", 200).unwrap();
        // A late, older claim from r1 does not take it back.
        s.claim_session(d, "r1", 150).unwrap();
        let rows = s.sessions().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].replica.as_str(), rows[0].since_ms), ("r2", 200));
        // Only the holder records the session's home relay; a new claim clears it.
        s.set_session_relay(d, "r1", Some("relay-a")).unwrap();
        assert_eq!(s.sessions().unwrap()[0].home_relay, None);
        s.set_session_relay(d, "r2", Some("relay-b")).unwrap();
        assert_eq!(
            s.sessions().unwrap()[0].home_relay.as_deref(),
            Some("relay-b")
        );
        s.claim_session(d, "r2", 300).unwrap();
        assert_eq!(s.sessions().unwrap()[0].home_relay, None);
        // r1 closing its stale session leaves r2's claim alone.
        s.release_session(d, "r1").unwrap();
        assert_eq!(s.sessions().unwrap().len(), 1);
        s.release_session(d, "r2").unwrap();
        assert!(s.sessions().unwrap().is_empty());
    }

    #[test]
    fn the_posture_sequence_only_rises() {
        let s = SqliteStore::open_in_memory().unwrap();
        let d = DeviceId(3);
        assert_eq!(s.posture_seq(d).unwrap(), 0);
        s.raise_posture_seq(d, 10).unwrap();
        s.raise_posture_seq(d, 4).unwrap();
        assert_eq!(s.posture_seq(d).unwrap(), 10);
        s.raise_posture_seq(d, 11).unwrap();
        assert_eq!(s.posture_seq(d).unwrap(), 11);
        assert_eq!(s.posture_seq(DeviceId(4)).unwrap(), 0);
    }

    /// `status`'s database probe on SQLite: the file's path, the schema version, a round trip,
    /// and no listener (nothing to listen to).
    #[test]
    fn the_database_probe_names_the_file_and_its_schema() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ward.db");
        let s = SqliteStore::open(&path).unwrap();
        let d = s.database();
        assert_eq!(d.backend, "sqlite");
        assert_eq!(d.location, path.display().to_string());
        assert!(d.reachable && d.error.is_none(), "{d:?}");
        assert_eq!(
            d.schema_version,
            Some(crate::store::schema::MIGRATIONS.len() as i64)
        );
        assert!(d.round_trip_ms.is_some_and(|ms| ms >= 0.0));
        assert_eq!(d.listener, None);
        assert!(!s.start_feed_listener(|| {}).unwrap());
    }

    fn trust_row(replica: &str, verdict: &str, at: i64) -> TrustRow {
        TrustRow {
            device: DeviceId(5),
            replica: replica.into(),
            verdict: verdict.into(),
            risk: 40,
            risk_reason: "scan".into(),
            counters: "[]".into(),
            updated_ms: at,
        }
    }

    /// On both backends: one row per device, replaced by the newer write; an audited write
    /// moves the change feed by one `device.trust` row, a checkpoint does not.
    pub(crate) fn device_trust_rows_replace_and_audited_writes_move_the_feed(s: &SqliteStore) {
        assert!(s.device_trust().unwrap().is_empty());
        let v0 = s.feed_version().unwrap();
        let a = trust_row("r1", "[]", 100);
        s.save_device_trust(&a, Some(serde_json::json!({ "failing": [] })))
            .unwrap();
        assert_eq!(s.device_trust().unwrap(), vec![a]);
        let v1 = s.feed_version().unwrap();
        assert_eq!(v1, v0 + 1);
        let rows = s.feed_since(v0, 10).unwrap();
        assert_eq!(rows[0].action, "device.trust");
        assert_eq!(rows[0].target, "d5", "no such device: named by its id");
        let b = trust_row("r2", "[{\"requirement\":\"x\"}]", 200);
        s.save_device_trust(&b, None).unwrap();
        assert_eq!(s.device_trust().unwrap(), vec![b]);
        assert_eq!(s.feed_version().unwrap(), v1, "a checkpoint is not news");
        assert!(s.verify_audit().unwrap().ok);
    }

    #[test]
    fn device_trust_rows_on_sqlite() {
        device_trust_rows_replace_and_audited_writes_move_the_feed(
            &SqliteStore::open_in_memory().unwrap(),
        );
    }

    #[test]
    fn device_trust_rows_on_postgres() {
        let Some(url) = crate::store::postgres::testpg::fresh_database() else {
            return;
        };
        device_trust_rows_replace_and_audited_writes_move_the_feed(
            &SqliteStore::open_postgres(&url, None).unwrap(),
        );
    }

    fn flows(src: u64, ports: std::ops::Range<u16>) -> Vec<(DeviceId, Proto, u16)> {
        ports.map(|p| (DeviceId(src), Proto::Tcp, p)).collect()
    }

    /// On both backends: evidence is read back in order from a position; a flow already
    /// stored for the (source, reporter) is not stored again; one reporter's flood stays
    /// within its bounds (per source, across sources), a source's oldest evidence goes past
    /// its bound, and rows older than the window are pruned by the next write.
    pub(crate) fn scan_evidence_is_bounded_and_read_in_order(s: &SqliteStore) {
        use crate::trust::{MAX_DENIED_PER_REPORTER, MAX_DENIED_REMEMBERED};
        let w = 10_000;
        let v0 = s.feed_version().unwrap();
        assert_eq!(
            s.add_scan_evidence("r1", DeviceId(2), &flows(1, 20..23), 1_000, w)
                .unwrap(),
            3
        );
        assert_eq!(
            s.add_scan_evidence("r1", DeviceId(2), &flows(1, 21..25), 1_100, w)
                .unwrap(),
            2,
            "21 and 22 are already stored"
        );
        assert_eq!(s.feed_version().unwrap(), v0, "no audit row");
        let all = s.scan_evidence_since(0, 100).unwrap();
        assert_eq!(all.rows.len(), 5);
        assert_eq!(all.last_id, all.rows[4].id);
        assert!(all.rows.windows(2).all(|p| p[0].id < p[1].id));
        assert_eq!(
            (all.rows[0].source, all.rows[0].reporter, all.rows[0].port),
            (DeviceId(1), DeviceId(2), 20)
        );
        assert_eq!(all.rows[0].replica, "r1");
        let tail = s.scan_evidence_since(all.rows[2].id, 100).unwrap();
        assert_eq!(tail.rows.len(), 2);
        assert_eq!(
            s.scan_evidence_since(all.last_id, 100).unwrap(),
            EvidenceBatch {
                rows: vec![],
                last_id: all.last_id
            }
        );
        // A flood from reporter 3 against source 1: 100 reports of 256 new ports each.
        for i in 0..100u16 {
            let at = 2_000 + i64::from(i);
            s.add_scan_evidence("r1", DeviceId(3), &flows(1, i * 256..i * 256 + 256), at, w)
                .unwrap();
        }
        let rows = |s: &SqliteStore| s.scan_evidence_since(0, 100_000).unwrap().rows;
        let from3 = rows(s).iter().filter(|r| r.reporter == DeviceId(3)).count();
        assert_eq!(from3, MAX_DENIED_PER_REPORTER);
        // ... and against many sources: bounded per reporter in all.
        for src in 10..40u64 {
            s.add_scan_evidence("r1", DeviceId(3), &flows(src, 0..256), 3_000, w)
                .unwrap();
        }
        let from3 = rows(s).iter().filter(|r| r.reporter == DeviceId(3)).count();
        assert_eq!(from3, MAX_EVIDENCE_PER_REPORTER);
        // Many reporters against one source: its oldest evidence goes past its bound.
        for rep in 100..120u64 {
            s.add_scan_evidence("r2", DeviceId(rep), &flows(1, 0..256), 4_000, w)
                .unwrap();
        }
        let against1: Vec<_> = rows(s)
            .into_iter()
            .filter(|r| r.source == DeviceId(1))
            .collect();
        assert_eq!(against1.len(), MAX_DENIED_REMEMBERED);
        assert!(
            against1.iter().all(|r| r.reporter != DeviceId(2)),
            "the oldest went first"
        );
        // A write past the window prunes everything older than it.
        s.add_scan_evidence("r2", DeviceId(5), &flows(6, 1..2), 20_000, w)
            .unwrap();
        let left = rows(s);
        assert_eq!(left.len(), 1, "{}", left.len());
        assert_eq!(left[0].source, DeviceId(6));
        // An empty report writes nothing.
        assert_eq!(
            s.add_scan_evidence("r2", DeviceId(5), &[], 20_001, w)
                .unwrap(),
            0
        );
    }

    #[test]
    fn scan_evidence_on_sqlite() {
        scan_evidence_is_bounded_and_read_in_order(&SqliteStore::open_in_memory().unwrap());
    }

    #[test]
    fn scan_evidence_on_postgres() {
        let Some(url) = crate::store::postgres::testpg::fresh_database() else {
            return;
        };
        scan_evidence_is_bounded_and_read_in_order(
            &SqliteStore::open_postgres(&url, None).unwrap(),
        );
    }

    /// Ids keep growing after every row was pruned (SQLite would reuse them without
    /// AUTOINCREMENT, and a reader's position would skip the new rows).
    #[test]
    fn scan_evidence_ids_never_go_back_after_a_prune() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.add_scan_evidence("r1", DeviceId(2), &flows(1, 1..4), 1_000, 100)
            .unwrap();
        let last = s.scan_evidence_since(0, 10).unwrap().last_id;
        s.add_scan_evidence("r1", DeviceId(2), &flows(1, 9..10), 5_000, 100)
            .unwrap();
        let after = s.scan_evidence_since(last, 10).unwrap();
        assert_eq!(after.rows.len(), 1);
        assert!(after.rows[0].id > last);
    }

    /// A row whose protocol does not parse is left out, and read past.
    #[test]
    fn unreadable_scan_evidence_is_left_out() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.add_scan_evidence("r1", DeviceId(2), &flows(1, 1..3), 1_000, 10_000)
            .unwrap();
        s.raw_sql("UPDATE scan_evidence SET proto = 'sctp' WHERE port = 2")
            .unwrap();
        let b = s.scan_evidence_since(0, 10).unwrap();
        assert_eq!(b.rows.len(), 1);
        assert_eq!(b.rows[0].port, 1);
        assert_eq!(b.last_id, b.rows[0].id + 1);
    }

    #[test]
    fn heartbeats_refresh_one_row_per_replica() {
        let s = SqliteStore::open_in_memory().unwrap();
        let mut row = ReplicaRow {
            id: "r1".into(),
            address: "10.0.0.1:7443".into(),
            started_ms: 1,
            last_seen_ms: 1,
            sessions: 0,
        };
        s.replica_heartbeat(&row).unwrap();
        row.last_seen_ms = 5;
        row.sessions = 3;
        s.replica_heartbeat(&row).unwrap();
        assert_eq!(s.replicas().unwrap(), vec![row]);
    }
}
