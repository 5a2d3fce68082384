//! What only several coordinators on one PostgreSQL database can show: two independent store
//! instances (two pools, as two replicas have) racing for one single-use token and appending
//! to one audit chain, one replica's commit waking the other's change feed listener, and the
//! database (or the listening connection) going away mid-use.

use super::listen::APPLICATION_NAME;
use super::testpg;
use crate::audit::Action;
use crate::store::anchor::AuditKey;
use crate::store::replicas::ReplicaStore;
use crate::store::{Anchor, Audit, EnrollSpec, SqliteStore, Store, StoreError, TokenSpec};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use ward_shared::addr::AddressPools;
use ward_shared::names::{Hostname, Name};

fn n(s: &str) -> Name {
    Name::parse("name", s).unwrap()
}

/// A replica's store: its own pool and its own checkpoint file, the instance's audit key.
fn replica(url: &str, dir: &std::path::Path, i: usize) -> SqliteStore {
    SqliteStore::open_postgres(
        url,
        Some(Anchor {
            key: AuditKey::from_bytes([7; 32]),
            checkpoint: dir.join(format!("replica{i}.checkpoint")),
        }),
    )
    .unwrap()
}

fn enroll(s: &SqliteStore, pools: &AddressPools, i: usize) -> Result<(), StoreError> {
    s.enroll(
        EnrollSpec {
            token_id: "once",
            token_secret: b"secret",
            hostname: Hostname::sanitize(&format!("racer-{i}")).unwrap(),
            os: "linux".into(),
            identity_hash: [i as u8; 32],
        },
        pools,
        &mut |_| Ok((vec![1, 2, 3], 99_999)),
        2_000,
    )
    .map(|_| ())
}

#[test]
fn single_use_token_redeemed_once_by_100_racers_on_two_replicas() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&url, dir.path(), 1), replica(&url, dir.path(), 2));
    a.add_user(&n("alice"), &[], "admin", 1_000).unwrap();
    a.create_token(
        TokenSpec {
            id: "once",
            secret_hash: ward_shared::token::hash_secret(b"secret"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 1_000_000,
            uses: 1,
            hostname: None,
        },
        "admin",
        1_000,
    )
    .unwrap();
    let pools = AddressPools::from_random([1, 2, 3, 4, 5]);
    let results: Vec<Result<(), StoreError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let (s, pools) = (if i % 2 == 0 { &a } else { &b }, &pools);
                sc.spawn(move || enroll(s, pools, i))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Refused { .. })))
        .count();
    let other: Vec<_> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .filter(|e| !matches!(e, StoreError::Refused { .. }))
        .collect();
    assert!(other.is_empty(), "unexpected errors: {other:?}");
    assert_eq!((won, refused), (1, 99));
    assert_eq!(b.list_devices().unwrap().len(), 1);
    assert_eq!(a.list_tokens().unwrap()[0].uses_left, 0);
    let log = b.audit_log(1_000).unwrap();
    let audited = log
        .iter()
        .filter(|e| e.action == Action::EnrollRefused.as_str())
        .count();
    assert_eq!(audited, 99, "every refusal is audited");
    for s in [&a, &b] {
        let v = s.verify_audit().unwrap();
        assert!(v.ok, "{}", v.message);
    }
}

#[test]
fn two_replicas_appending_at_once_never_fork_the_audit_chain() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&url, dir.path(), 1), replica(&url, dir.path(), 2));
    std::thread::scope(|sc| {
        for t in 0..8 {
            let s = if t % 2 == 0 { &a } else { &b };
            sc.spawn(move || {
                for k in 0..25 {
                    s.append_audit(
                        Audit {
                            actor: "admin",
                            action: Action::UserAdd,
                            target: &format!("u{t}-{k}"),
                            detail: serde_json::json!({ "writer": t }),
                        },
                        1_000 + k,
                    )
                    .unwrap();
                }
            });
        }
    });
    for s in [&a, &b] {
        let v = s.verify_audit().unwrap();
        assert!(v.ok, "{}", v.message);
        let chain = s.verify_chain().unwrap();
        assert!(chain.ok, "{}", chain.message);
        assert_eq!(chain.rows, 200);
    }
    let log = a.audit_log(1_000).unwrap();
    let seqs: Vec<i64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "one chain, no gaps");
}

#[test]
fn database_outage_is_a_storage_fault_and_the_pool_recovers() {
    if !testpg::available() {
        return;
    }
    let cluster = testpg::Cluster::start();
    let url = cluster.create_database();
    let s = SqliteStore::open_postgres(&url, None).unwrap();
    s.add_user(&n("alice"), &[], "admin", 1_000).unwrap();
    s.create_token(
        TokenSpec {
            id: "once",
            secret_hash: ward_shared::token::hash_secret(b"secret"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 1_000_000,
            uses: 1,
            hostname: None,
        },
        "admin",
        1_000,
    )
    .unwrap();
    let (tx, wakes) = mpsc::channel();
    assert!(s
        .start_feed_listener(move || {
            let _ = tx.send(());
        })
        .unwrap());
    wakes.recv_timeout(Duration::from_secs(10)).unwrap();
    let db = s.database();
    assert!(
        db.reachable && db.listener.as_ref().unwrap().listening,
        "{db:?}"
    );
    cluster.pg_stop();
    let db = s.database();
    assert!(!db.reachable && db.error.is_some(), "{db:?}");
    assert_eq!(db.schema_version, None);
    let pools = AddressPools::from_random([1, 2, 3, 4, 5]);
    // Enrollment fails closed: a storage fault, neither a device nor a refusal.
    let e = enroll(&s, &pools, 1).unwrap_err();
    assert!(e.is_storage_fault(), "{e:?}");
    let e = s.list_users().unwrap_err();
    assert!(e.is_storage_fault(), "{e:?}");
    let e = s
        .save_policy("x", "sha", "admin", "summary", 2_000)
        .unwrap_err();
    assert!(e.is_storage_fault(), "{e:?}");
    assert!(!s.quick_check(2_000).unwrap().ok);
    assert!(!s.database().listener.unwrap().listening);
    while wakes.try_recv().is_ok() {}
    cluster.pg_start();
    // The listener reconnects (backoff at most 5 s) and wakes the feed to catch up.
    wakes.recv_timeout(Duration::from_secs(15)).unwrap();
    let l = s.database().listener.unwrap();
    assert!(l.listening && l.connects >= 2, "{l:?}");
    // The pool reconnects by itself; nothing written during the outage exists.
    let users = s.list_users().unwrap();
    assert_eq!(users.len(), 1);
    assert!(s.current_policy().unwrap().is_none());
    assert_eq!(s.list_tokens().unwrap()[0].uses_left, 1);
    enroll(&s, &pools, 1).unwrap();
    assert_eq!(s.list_devices().unwrap().len(), 1);
    assert!(s.quick_check(3_000).unwrap().ok);
}

#[test]
fn migrations_run_once_when_replicas_start_together() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let stores: Vec<SqliteStore> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| SqliteStore::open_postgres(&url, None)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    stores[0].add_user(&n("bob"), &[], "admin", 1).unwrap();
    assert_eq!(stores[3].list_users().unwrap().len(), 1);
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let v: i64 = c
        .query_one("SELECT version FROM ward_schema", &[])
        .unwrap()
        .get(0);
    assert_eq!(v as usize, crate::store::schema::MIGRATIONS.len());
}

/// Waits for the next wake-up; how long it took.
fn next_wake(wakes: &mpsc::Receiver<()>, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    wakes.recv_timeout(within).ok().map(|()| t.elapsed())
}

/// Two replicas on `url`, B's feed listener started and its first wake-up (the catch-up after
/// LISTEN) taken: each later wake-up arrives on the receiver.
fn listening_pair(
    url: &str,
    dir: &std::path::Path,
) -> (SqliteStore, SqliteStore, mpsc::Receiver<()>) {
    let (a, b) = (replica(url, dir, 1), replica(url, dir, 2));
    let (tx, wakes) = mpsc::channel();
    assert!(b
        .start_feed_listener(move || {
            let _ = tx.send(());
        })
        .unwrap());
    next_wake(&wakes, Duration::from_secs(10)).expect("catch-up wake after LISTEN");
    (a, b, wakes)
}

/// A write committed through one replica's store wakes the other replica's listener at once
/// (the version counter is what it then reads); a rolled-back write wakes nobody.
#[test]
fn a_commit_on_one_replica_wakes_the_other_replicas_listener() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, wakes) = listening_pair(&url, dir.path());
    let mut took = Vec::new();
    for i in 0..10 {
        let v = b.feed_version().unwrap();
        let t = Instant::now();
        a.add_user(&n(&format!("user{i}")), &[], "admin", 1_000)
            .unwrap();
        wakes
            .recv_timeout(Duration::from_secs(2))
            .expect("a notification for the commit");
        took.push(t.elapsed());
        // Woken after the commit: the new row is visible.
        assert!(b.feed_version().unwrap() > v);
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!(
        "commit on A -> wake on B: median {median:?}, max {:?}",
        took[took.len() - 1]
    );
    assert!(median < Duration::from_millis(200), "{took:?}");
    // A transaction that notifies and then fails is rolled back: nothing is delivered.
    assert!(a
        .raw_sql("SELECT pg_notify('ward_feed', '999'); SELECT 1/0;")
        .is_err());
    assert_eq!(next_wake(&wakes, Duration::from_millis(500)), None);
    let l = b.database().listener.unwrap();
    assert_eq!((l.listening, l.notifications, l.connects), (true, 10, 1));
    // SQLite has nothing to listen to.
    let lite = SqliteStore::open_in_memory().unwrap();
    assert!(!lite.start_feed_listener(|| {}).unwrap());
    assert_eq!(lite.database().listener, None);
}

/// A listener whose connection the server terminated reconnects, wakes the feed once to catch
/// up, and is woken by the next commit again.
#[test]
fn a_terminated_listener_reconnects_and_wakes() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b, wakes) = listening_pair(&url, dir.path());
    let killed = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = '{APPLICATION_NAME}' AND datname = current_database()"
    );
    a.raw_sql(&killed).unwrap();
    // A write while the listener is gone is caught up by the wake after re-LISTEN.
    a.add_user(&n("during"), &[], "admin", 1_000).unwrap();
    next_wake(&wakes, Duration::from_secs(10)).expect("a wake after reconnecting");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = b.database().listener.unwrap();
        if l.listening && l.connects == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{l:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    while wakes.try_recv().is_ok() {}
    a.add_user(&n("after"), &[], "admin", 1_000).unwrap();
    let took = next_wake(&wakes, Duration::from_secs(2)).expect("woken after the reconnect");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let db = b.database();
    assert!(db.reachable, "{db:?}");
    assert_eq!(
        db.schema_version,
        Some(crate::store::schema::MIGRATIONS.len() as i64)
    );
    assert!(db.round_trip_ms.is_some());
    // `postgresql://ward@/t_N?host=DIR` → `DIR/t_N`, no user.
    let name = url.split("@/").nth(1).unwrap().split('?').next().unwrap();
    assert!(db.location.ends_with(&format!("/{name}")), "{db:?}");
    assert!(!db.location.contains("ward@"), "{db:?}");
}

/// Session claims and posture sequence numbers upsert on PostgreSQL too (a bare column name in
/// the upsert's condition is ambiguous there).
#[test]
fn session_claims_and_posture_sequences_upsert_on_postgres() {
    let Some(url) = testpg::fresh_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (replica(&url, dir.path(), 0), replica(&url, dir.path(), 1));
    let d = ward_shared::wire::DeviceId(7);
    a.claim_session(d, "ra", 100).unwrap();
    b.claim_session(d, "rb", 200).unwrap();
    // A late, older claim does not take the session back.
    a.claim_session(d, "ra", 150).unwrap();
    let rows = a.sessions().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].replica.as_str(), rows[0].since_ms), ("rb", 200));
    a.raise_posture_seq(d, 10).unwrap();
    b.raise_posture_seq(d, 4).unwrap();
    assert_eq!(b.posture_seq(d).unwrap(), 10);
    b.raise_posture_seq(d, 11).unwrap();
    assert_eq!(a.posture_seq(d).unwrap(), 11);
}

#[test]
fn pool_options_are_checked_and_bound_the_connections_a_store_holds() {
    use super::{PgBackend, PoolOptions};
    assert!(PoolOptions::new(0, Duration::from_secs(1)).is_err());
    assert!(PoolOptions::new(PoolOptions::MAX_SIZE + 1, Duration::from_secs(1)).is_err());
    assert!(PoolOptions::new(4, Duration::from_millis(10)).is_err());
    assert!(PoolOptions::new(4, PoolOptions::MAX_WAIT + Duration::from_secs(1)).is_err());
    let d = PoolOptions::default();
    assert_eq!((d.size(), d.wait()), (16, Duration::from_secs(5)));
    if !testpg::available() {
        return;
    }
    let cluster = testpg::Cluster::start();
    let url = cluster.create_database();
    let wait = Duration::from_millis(300);
    let b = PgBackend::connect(&url, PoolOptions::new(2, wait).unwrap()).unwrap();
    let first = b.client().unwrap();
    let second = b.client().unwrap();
    // A third request waits for the pool's wait, then fails as a storage fault.
    let t = Instant::now();
    let e = b.client().err().expect("the pool is exhausted");
    assert!(e.is_storage_fault(), "{e:?}");
    assert!(t.elapsed() >= wait && t.elapsed() < Duration::from_secs(5));
    // A connection given back serves the next request.
    drop(first);
    let third = b.client().unwrap();
    drop((second, third));
}
