use super::*;
use crate::audit::Action;
use crate::model::DeviceStatus;
use crate::store::TokenSpec;
use std::net::Ipv4Addr;
use ward_shared::names::Hostname;
use ward_shared::wire::ErrorCode;

// Every test that does not need SQLite's file semantics runs twice: on an in-memory SQLite
// database and on a fresh database of a throw-away PostgreSQL cluster (`postgres::testpg`).
thread_local! {
    static PG_URL: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// The PostgreSQL database of the running test, if it runs on PostgreSQL.
fn backend_url() -> Option<String> {
    PG_URL.with(|u| u.borrow().clone())
}

/// A fresh store on the running test's backend.
fn new_store() -> SqliteStore {
    match backend_url() {
        Some(url) => SqliteStore::open_postgres(&url, None).unwrap(),
        None => SqliteStore::open_in_memory().unwrap(),
    }
}

fn on_sqlite(test: fn()) {
    test()
}

fn on_postgres(test: fn()) {
    let Some(url) = crate::store::postgres::testpg::fresh_database() else {
        return;
    };
    PG_URL.with(|u| *u.borrow_mut() = Some(url));
    test()
}

fn n(s: &str) -> Name {
    Name::parse("name", s).unwrap()
}

fn setup() -> (SqliteStore, AddressPools) {
    let s = new_store();
    s.add_user(&n("alice"), &[n("eng")], "admin", 1000).unwrap();
    (s, AddressPools::from_random([1, 2, 3, 4, 5]))
}

fn enroll(
    s: &SqliteStore,
    pools: &AddressPools,
    token: &str,
    secret: &[u8],
    host: &str,
    key: u8,
    now: i64,
) -> Result<Device> {
    s.enroll(
        EnrollSpec {
            token_id: token,
            token_secret: secret,
            hostname: Hostname::sanitize(host).unwrap(),
            os: "linux".into(),
            identity_hash: [key; 32],
        },
        pools,
        &mut |_| Ok((vec![1, 2, 3], 99)),
        now,
    )
    .map(|(d, _)| d)
}

/// Creates token `id` (secret `s`) for `user`, good for `uses` enrollments until 5000.
fn user_token(s: &SqliteStore, id: &str, user: &str, uses: i64) {
    s.create_token(
        TokenSpec {
            id,
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n(user)),
            tags: &[],
            expires_ms: 5000,
            uses,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
}

fn token_lifecycle_and_refusals() {
    let (s, pools) = setup();
    let h = ward_shared::token::hash_secret(b"s1");
    s.create_token(
        TokenSpec {
            id: "t1",
            secret_hash: h,
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 5000,
            uses: 1,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    let d = enroll(&s, &pools, "t1", b"s1", "laptop", 1, 2000).unwrap();
    assert_eq!(d.hostname.as_str(), "laptop");
    assert_eq!(d.user.as_deref(), Some("alice"));
    assert_eq!(d.ipv4, Ipv4Addr::new(100, 64, 0, 1));
    let used = enroll(&s, &pools, "t1", b"s1", "laptop", 2, 2000).unwrap_err();
    assert!(
        matches!(
            used,
            StoreError::Refused {
                code: ErrorCode::TokenUsed,
                ..
            }
        ),
        "{used}"
    );
    let wrong = enroll(&s, &pools, "t1", b"nope", "laptop", 2, 2000).unwrap_err();
    assert!(matches!(
        wrong,
        StoreError::Refused {
            code: ErrorCode::TokenInvalid,
            ..
        }
    ));
    let unknown = enroll(&s, &pools, "zz", b"s1", "x", 2, 2000).unwrap_err();
    assert!(matches!(
        unknown,
        StoreError::Refused {
            code: ErrorCode::TokenInvalid,
            ..
        }
    ));

    s.create_token(
        TokenSpec {
            id: "t2",
            secret_hash: ward_shared::token::hash_secret(b"s2"),
            user: None,
            tags: &[n("server")],
            expires_ms: 5000,
            uses: 3,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    let expired = enroll(&s, &pools, "t2", b"s2", "db", 3, 5000).unwrap_err();
    assert!(matches!(
        expired,
        StoreError::Refused {
            code: ErrorCode::TokenExpired,
            ..
        }
    ));
    let d2 = enroll(&s, &pools, "t2", b"s2", "laptop", 3, 4000).unwrap();
    assert_eq!(d2.hostname.as_str(), "laptop-2");
    assert_eq!(d2.tags, vec![n("server")]);
    s.revoke_token("t2", "admin", 4100).unwrap();
    let revoked = enroll(&s, &pools, "t2", b"s2", "db", 4, 4200).unwrap_err();
    assert!(matches!(
        revoked,
        StoreError::Refused {
            code: ErrorCode::TokenRevoked,
            ..
        }
    ));
    let toks = s.list_tokens().unwrap();
    assert_eq!(toks.len(), 2);
    assert_eq!(toks[0].uses_left, 0);
    // Every refusal is audited, and the chain verifies.
    let log = s.audit_log(100).unwrap();
    assert_eq!(
        log.iter().filter(|e| e.action == "enroll.refused").count(),
        5
    );
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn token_lifecycle_and_refusals_sqlite() {
    on_sqlite(token_lifecycle_and_refusals);
}
#[test]
fn token_lifecycle_and_refusals_postgres() {
    on_postgres(token_lifecycle_and_refusals);
}

fn same_identity_cannot_enroll_twice() {
    let (s, pools) = setup();
    s.create_token(
        TokenSpec {
            id: "t",
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 5000,
            uses: 5,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    enroll(&s, &pools, "t", b"s", "a", 7, 2000).unwrap();
    let e = enroll(&s, &pools, "t", b"s", "b", 7, 2000).unwrap_err();
    assert!(matches!(
        e,
        StoreError::Refused {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // The refused attempt did not spend a use.
    assert_eq!(s.list_tokens().unwrap()[0].uses_left, 4);
}
#[test]
fn same_identity_cannot_enroll_twice_sqlite() {
    on_sqlite(same_identity_cannot_enroll_twice);
}
#[test]
fn same_identity_cannot_enroll_twice_postgres() {
    on_postgres(same_identity_cannot_enroll_twice);
}

fn revoke_and_disable() {
    let (s, pools) = setup();
    s.create_token(
        TokenSpec {
            id: "t",
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 5000,
            uses: 2,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    let d = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
    assert!(d.is_live());
    let ids = s
        .set_user_disabled(&n("alice"), true, "admin", 2100)
        .unwrap();
    assert_eq!(ids, vec![d.id]);
    assert!(!s.device(d.id).unwrap().is_live());
    s.set_user_disabled(&n("alice"), false, "admin", 2200)
        .unwrap();
    let r = s.revoke_device("a", "admin", 2300).unwrap();
    assert_eq!(r.status, DeviceStatus::Revoked);
    assert!(matches!(
        s.revoke_device("a", "admin", 2400),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.revoke_device("nope", "admin", 2400),
        Err(StoreError::NotFound(_))
    ));
}
#[test]
fn revoke_and_disable_sqlite() {
    on_sqlite(revoke_and_disable);
}
#[test]
fn revoke_and_disable_postgres() {
    on_postgres(revoke_and_disable);
}

/// A change the database could not take (kept in the journal) is what every read returns:
/// the device lookup a session makes, the list the change feed diffs, admin's `show`.
fn journaled_changes_are_in_force_for_every_read() {
    let (s, pools) = setup();
    s.add_user(&n("bob"), &[], "admin", 1000).unwrap();
    user_token(&s, "t", "alice", 3);
    user_token(&s, "u", "bob", 3);
    let a = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
    let q = enroll(&s, &pools, "t", b"s", "q", 2, 2000).unwrap();
    let b = enroll(&s, &pools, "u", b"s", "b", 3, 2000).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    s.attach_journal(&tmp.path().join("narrowing.journal"))
        .unwrap();
    s.journal_narrowing(Narrowing::RevokeDevice { device: "a".into() }, 3000)
        .unwrap();
    s.journal_narrowing(
        Narrowing::QuarantineDevice {
            device: "q".into(),
            reason: "stolen".into(),
        },
        3001,
    )
    .unwrap();
    s.journal_narrowing(Narrowing::DisableUser { user: "bob".into() }, 3002)
        .unwrap();

    let by_identity = s.device_by_identity(&[1; 32]).unwrap().unwrap();
    assert_eq!(by_identity.status, DeviceStatus::Revoked);
    assert_eq!(by_identity.revoked_ms, Some(3000));
    assert!(!s.device(a.id).unwrap().is_live());
    assert!(!s.device_by_name("a").unwrap().is_live());
    let q = s.device(q.id).unwrap();
    assert_eq!(
        q.quarantine.as_ref().map(|q| q.reason.as_str()),
        Some("stolen")
    );
    assert!(q.is_live(), "a quarantined device stays enrolled");
    assert!(s.device(b.id).unwrap().user_disabled);
    let all = s.list_devices().unwrap();
    assert!(all.iter().all(|d| d.id == q.id || !d.is_live()), "{all:?}");
    let users = s.list_users().unwrap();
    let disabled: Vec<_> = users
        .iter()
        .filter(|u| u.disabled)
        .map(|u| u.name.as_str())
        .collect();
    assert_eq!(disabled, ["bob"]);
    assert_eq!(s.journal_pending(), 3);

    // Written to the database, the journal is empty and the rows say the same.
    assert_eq!(s.flush_journal(4000).unwrap(), 3);
    assert_eq!(s.journal_pending(), 0);
    assert!(!s.device(a.id).unwrap().is_live());
    assert!(s.device(q.id).unwrap().quarantine.is_some());
    assert!(s.device(b.id).unwrap().user_disabled);
}
#[test]
fn journaled_changes_are_in_force_for_every_read_sqlite() {
    on_sqlite(journaled_changes_are_in_force_for_every_read);
}
#[test]
fn journaled_changes_are_in_force_for_every_read_postgres() {
    on_postgres(journaled_changes_are_in_force_for_every_read);
}

fn audit_chain_detects_edits() {
    let (s, _) = setup();
    s.append_audit(
        Audit {
            actor: "a",
            action: Action::UserAdd,
            target: "t",
            detail: serde_json::json!({"k": 1}),
        },
        5,
    )
    .unwrap();
    assert!(s.verify_audit().unwrap().ok);
    {
        // Updates are blocked by a trigger...
        assert!(s
            .raw_sql("UPDATE audit SET actor = 'mallory' WHERE seq = 1")
            .is_err());
        // ...an attacker with the database drops it, and verification still catches the edit.
        let drop = match s.backend_kind() {
            "postgres" => "DROP TRIGGER audit_no_update ON audit",
            _ => "DROP TRIGGER audit_no_update",
        };
        s.raw_sql(&format!(
            "{drop}; UPDATE audit SET actor = 'mallory' WHERE seq = 1;"
        ))
        .unwrap();
    }
    let v = s.verify_audit().unwrap();
    assert!(!v.ok);
    assert_eq!(v.first_bad_seq, Some(1));
}
#[test]
fn audit_chain_detects_edits_sqlite() {
    on_sqlite(audit_chain_detects_edits);
}
#[test]
fn audit_chain_detects_edits_postgres() {
    on_postgres(audit_chain_detects_edits);
}

fn policies_and_grants() {
    let (s, _) = setup();
    assert!(s.current_policy().unwrap().is_none());
    assert_eq!(s.save_policy("a", "h1", "+x", "admin", 10).unwrap(), 1);
    assert_eq!(s.save_policy("b", "h2", "-x", "admin", 20).unwrap(), 2);
    assert_eq!(s.current_policy().unwrap().unwrap().text, "b");
    assert_eq!(s.policy_history().unwrap().len(), 2);
    let g = GrantRow {
        id: "g1".into(),
        principal: "alice".into(),
        service: "db".into(),
        not_after_ms: 100,
        reason: None,
        actor: "admin".into(),
        created_ms: 10,
    };
    s.add_grant(&g, 10).unwrap();
    assert_eq!(s.active_grants(50).unwrap(), vec![g.clone()]);
    assert!(s.active_grants(100).unwrap().is_empty());
    s.remove_grant("g1", "admin", 60).unwrap();
    assert!(s.active_grants(50).unwrap().is_empty());
    assert!(matches!(
        s.remove_grant("g1", "admin", 70),
        Err(StoreError::NotFound(_))
    ));
    let u = s
        .edit_user_groups(&n("alice"), &[n("ops"), n("eng")], &[], "admin", 80)
        .unwrap();
    assert_eq!(u.groups, vec![n("eng"), n("ops")]);
    let u = s
        .edit_user_groups(&n("alice"), &[], &[n("eng"), n("nope")], "admin", 81)
        .unwrap();
    assert_eq!(u.groups, vec![n("ops")]);
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn policies_and_grants_sqlite() {
    on_sqlite(policies_and_grants);
}
#[test]
fn policies_and_grants_postgres() {
    on_postgres(policies_and_grants);
}

fn leases_issue_rotate_revoke() {
    let (s, pools) = setup();
    s.create_token(
        TokenSpec {
            id: "t",
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 5000,
            uses: 1,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    let d = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
    let l1 = s
        .issue_lease(d.id, WgPublicKey([1; 32]), 10_000, 3000)
        .unwrap();
    let l2 = s
        .issue_lease(d.id, WgPublicKey([2; 32]), 10_000, 4000)
        .unwrap();
    assert!(l2.serial > l1.serial);
    assert_eq!(s.active_leases(5000).unwrap().len(), 2);
    assert_eq!(
        s.revoke_leases(d.id, Some(l2.serial), "rotated", 5000)
            .unwrap(),
        vec![l1.serial]
    );
    assert_eq!(s.active_leases(5000).unwrap(), vec![l2.clone()]);
    assert!(s.active_leases(14_000).unwrap().is_empty(), "expired");
    assert_eq!(s.lease_counts().unwrap().get(&d.id), Some(&2));
    s.revoke_device("a", "admin", 6000).unwrap();
    assert!(s.active_leases(6000).unwrap().is_empty());
    assert!(matches!(
        s.issue_lease(d.id, WgPublicKey([3; 32]), 10_000, 7000),
        Err(StoreError::Refused { .. })
    ));
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn leases_issue_rotate_revoke_sqlite() {
    on_sqlite(leases_issue_rotate_revoke);
}
#[test]
fn leases_issue_rotate_revoke_postgres() {
    on_postgres(leases_issue_rotate_revoke);
}

fn users_are_unique() {
    let (s, _) = setup();
    assert!(matches!(
        s.add_user(&n("alice"), &[], "admin", 1),
        Err(StoreError::Conflict(_))
    ));
    let users = s.list_users().unwrap();
    assert_eq!(users[0].groups, vec![n("eng")]);
}
#[test]
fn users_are_unique_sqlite() {
    on_sqlite(users_are_unique);
}
#[test]
fn users_are_unique_postgres() {
    on_postgres(users_are_unique);
}

/// Two handles on one database file, as two admin requests (or two coordinators) would have.
fn two_handles() -> (Option<tempfile::TempDir>, SqliteStore, SqliteStore) {
    if let Some(url) = backend_url() {
        let a = SqliteStore::open_postgres(&url, None).unwrap();
        let b = SqliteStore::open_postgres(&url, None).unwrap();
        return (None, a, b);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ward.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    (Some(dir), a, b)
}

fn concurrent_tag_edits_both_survive() {
    let (_dir, a, b) = two_handles();
    let pools = AddressPools::from_random([1, 2, 3, 4, 5]);
    a.add_user(&n("alice"), &[], "admin", 1).unwrap();
    a.create_token(
        TokenSpec {
            id: "t",
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n("alice")),
            tags: &[],
            expires_ms: 5000,
            uses: 1,
            hostname: None,
        },
        "admin",
        1,
    )
    .unwrap();
    enroll(&a, &pools, "t", b"s", "box", 1, 2).unwrap();
    for i in 0..40 {
        let (ta, tb) = (n(&format!("a{i}")), n(&format!("b{i}")));
        std::thread::scope(|sc| {
            sc.spawn(|| {
                a.edit_device_tags("box", std::slice::from_ref(&ta), &[], "admin", 10)
                    .unwrap()
            });
            sc.spawn(|| {
                b.edit_device_tags("box", std::slice::from_ref(&tb), &[], "admin", 10)
                    .unwrap()
            });
        });
        let tags = a.device_by_name("box").unwrap().tags;
        assert!(tags.contains(&ta), "round {i}: {tags:?}");
        assert!(tags.contains(&tb), "round {i}: {tags:?}");
    }
    assert_eq!(a.device_by_name("box").unwrap().tags.len(), 80);
    // Removing is also merged, not overwritten.
    std::thread::scope(|sc| {
        sc.spawn(|| {
            a.edit_device_tags("box", &[], &[n("a0")], "admin", 11)
                .unwrap()
        });
        sc.spawn(|| {
            b.edit_device_tags("box", &[], &[n("b0")], "admin", 11)
                .unwrap()
        });
    });
    let tags = a.device_by_name("box").unwrap().tags;
    assert_eq!(tags.len(), 78);
    assert!(a.verify_audit().unwrap().ok);
}
#[test]
fn concurrent_tag_edits_both_survive_sqlite() {
    on_sqlite(concurrent_tag_edits_both_survive);
}
#[test]
fn concurrent_tag_edits_both_survive_postgres() {
    on_postgres(concurrent_tag_edits_both_survive);
}

fn concurrent_group_edits_both_survive() {
    let (_dir, a, b) = two_handles();
    a.add_user(&n("alice"), &[], "admin", 1).unwrap();
    for i in 0..40 {
        let (ga, gb) = (n(&format!("a{i}")), n(&format!("b{i}")));
        std::thread::scope(|sc| {
            sc.spawn(|| {
                a.edit_user_groups(&n("alice"), std::slice::from_ref(&ga), &[], "admin", 10)
                    .unwrap()
            });
            sc.spawn(|| {
                b.edit_user_groups(&n("alice"), std::slice::from_ref(&gb), &[], "admin", 10)
                    .unwrap()
            });
        });
        let groups = &b.list_users().unwrap()[0].groups;
        assert!(groups.contains(&ga), "round {i}: {groups:?}");
        assert!(groups.contains(&gb), "round {i}: {groups:?}");
    }
    assert_eq!(a.list_users().unwrap()[0].groups.len(), 80);
    assert!(a.verify_audit().unwrap().ok);
}
#[test]
fn concurrent_group_edits_both_survive_sqlite() {
    on_sqlite(concurrent_group_edits_both_survive);
}
#[test]
fn concurrent_group_edits_both_survive_postgres() {
    on_postgres(concurrent_group_edits_both_survive);
}

fn corrupt_columns_are_errors_not_empty() {
    let (s, pools) = setup();
    s.create_token(
        TokenSpec {
            id: "t",
            secret_hash: ward_shared::token::hash_secret(b"s"),
            user: Some(&n("alice")),
            tags: &[n("web")],
            expires_ms: 5000,
            uses: 2,
            hostname: None,
        },
        "admin",
        1000,
    )
    .unwrap();
    let d = enroll(&s, &pools, "t", b"s", "box", 1, 2000).unwrap();
    assert_eq!(d.tags, vec![n("web")]);
    let raw = |sql: &str| {
        s.raw_sql(sql).unwrap();
    };
    let is_corrupt = |r: Result<Device>, col: &str| match r {
        Err(StoreError::Corrupt {
            table, column, row, ..
        }) => {
            assert_eq!((table, column, row.as_str()), ("devices", col, "1"));
        }
        other => panic!("expected a corrupt {col}, got {other:?}"),
    };

    raw("UPDATE devices SET tags = 'not json' WHERE id = 1");
    is_corrupt(s.device_by_name("box"), "tags");
    assert!(matches!(s.list_devices(), Err(StoreError::Corrupt { .. })));
    // A tag edit must not "repair" an unreadable set into just the new tag.
    assert!(matches!(
        s.edit_device_tags("box", &[n("db")], &[], "admin", 3000),
        Err(StoreError::Corrupt { .. })
    ));
    raw("UPDATE devices SET tags = '[]', endpoints = '[\"nope\"]' WHERE id = 1");
    is_corrupt(s.device(d.id), "endpoints");
    raw("UPDATE devices SET endpoints = '[]' WHERE id = 1");
    assert!(s.device(d.id).unwrap().tags.is_empty());

    raw("UPDATE tokens SET tags = '{' WHERE id = 't'");
    assert!(matches!(
        s.list_tokens(),
        Err(StoreError::Corrupt {
            table: "tokens",
            column: "tags",
            ..
        })
    ));
    // Enrolling with a token whose tags cannot be read refuses rather than dropping them.
    assert!(enroll(&s, &pools, "t", b"s", "box2", 2, 2000).is_err());
}
#[test]
fn corrupt_columns_are_errors_not_empty_sqlite() {
    on_sqlite(corrupt_columns_are_errors_not_empty);
}
#[test]
fn corrupt_columns_are_errors_not_empty_postgres() {
    on_postgres(corrupt_columns_are_errors_not_empty);
}

#[test]
fn relays_keep_only_their_secret_hash_and_older_rows_have_none() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ward.db");
    // A database from before relay credentials (schema 5) with a relay in it.
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5i64).unwrap();
        conn.execute(
            "INSERT INTO relays(name, addr, created_ms) VALUES ('old', 'a:1', 1)",
            [],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.relays().unwrap().len(), 1);
    assert_eq!(s.relay_secret_hash("old").unwrap(), None);
    let h = ward_shared::token::hash_secret(b"secret");
    s.add_relay(&n("new"), "b:2", &h, "admin", 2).unwrap();
    assert_eq!(s.relay_secret_hash("new").unwrap(), Some(h));
    assert_eq!(s.relay_secret_hash("nope").unwrap(), None);
    // The secret itself is stored nowhere: only its hash is in the row.
    let raw: Vec<u8> = {
        let conn = Connection::open(&path).unwrap();
        conn.query_row(
            "SELECT secret_hash FROM relays WHERE name = 'new'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(raw, h);
    s.remove_relay(&n("new"), "admin", 3).unwrap();
    assert_eq!(s.relay_secret_hash("new").unwrap(), None);
}

/// A file-backed store anchored in `dir`, and the raw connection an attacker with file access
/// would use.
fn anchored(dir: &std::path::Path) -> SqliteStore {
    let db = dir.join("ward.db");
    if !db.exists() {
        drop(SqliteStore::open(&db).unwrap());
    }
    SqliteStore::open_existing(
        &db,
        Some(Anchor {
            key: crate::store::anchor::AuditKey::from_bytes([3; 32]),
            checkpoint: dir.join("audit.checkpoint"),
        }),
    )
    .unwrap()
}

fn raw(dir: &std::path::Path, sql: &str) {
    let c = Connection::open(dir.join("ward.db")).unwrap();
    c.execute_batch(sql).unwrap();
}

#[test]
fn audit_anchor_tells_truncation_rollback_and_tampering_apart() {
    use crate::store::VerdictKind;
    let tmp = tempfile::tempdir().unwrap();
    let s = anchored(tmp.path());
    for (i, u) in ["a", "b", "c", "d"].iter().enumerate() {
        s.add_user(&n(u), &[], "admin", 1000 + i as i64).unwrap();
    }
    let v = s.verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Intact, "{}", v.message);
    assert!(v.ok && v.message.contains("intact"), "{}", v.message);
    let cp = std::fs::read_to_string(tmp.path().join("audit.checkpoint")).unwrap();
    assert!(cp.contains("\"rows\":4"), "{cp}");
    drop(s);

    // Rows deleted from the tail: the chain that is left verifies, the keyed head does not.
    let saved = std::fs::read(tmp.path().join("ward.db")).unwrap();
    raw(
        tmp.path(),
        "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq > 2;",
    );
    let v = anchored(tmp.path()).verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Truncated, "{}", v.message);
    assert_eq!(v.lost, Some((3, 4)));
    assert!(!v.ok);

    // The keyed head rolled back with the rows: the checkpoint outside the database still
    // counts them.
    raw(tmp.path(), "DELETE FROM audit_head;");
    let v = anchored(tmp.path()).verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Tampered, "{}", v.message);
    std::fs::write(tmp.path().join("ward.db"), &saved).unwrap();
    let s = anchored(tmp.path());
    assert!(s.verify_audit().unwrap().ok);
    let old_copy = std::fs::read(tmp.path().join("ward.db")).unwrap();
    s.add_user(&n("e"), &[], "admin", 2000).unwrap();
    drop(s);
    // An old copy of the whole database: fewer rows than the checkpoint.
    std::fs::write(tmp.path().join("ward.db"), &old_copy).unwrap();
    let s = anchored(tmp.path());
    let v = s.verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::RolledBack, "{}", v.message);
    assert_eq!(v.lost, Some((5, 5)));
    // The operator accepts: recorded, re-anchored, intact again.
    s.accept_rollback(serde_json::json!({ "found": "rolled_back" }), "admin", 4000)
        .unwrap();
    let v = s.verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Intact, "{}", v.message);
    assert!(s
        .audit_log(10)
        .unwrap()
        .iter()
        .any(|e| e.action == "audit.rollback_accepted"));
    drop(s);

    // A row appended without the key, with a valid chain hash, is not anchored.
    let c = Connection::open(tmp.path().join("ward.db")).unwrap();
    let (seq, prev): (i64, Vec<u8>) = c
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let h = audit::audit_hash(&prev, seq + 1, 5, "admin", "user.add", "z", "{}");
    c.execute(
        "INSERT INTO audit VALUES (?1, 5, 'admin', 'user.add', 'z', '{}', ?2, ?3)",
        rusqlite::params![seq + 1, prev, h],
    )
    .unwrap();
    drop(c);
    let s = anchored(tmp.path());
    let v = s.verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Tampered, "{}", v.message);
    drop(s);

    // No checkpoint at all.
    raw(tmp.path(), "DROP TRIGGER IF EXISTS audit_no_delete; DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit);");
    std::fs::remove_file(tmp.path().join("audit.checkpoint")).unwrap();
    let v = anchored(tmp.path()).verify_audit().unwrap();
    assert_eq!(v.kind, VerdictKind::Unanchored, "{}", v.message);
}

#[test]
fn open_existing_never_creates_a_database() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("ward.db");
    assert!(matches!(
        SqliteStore::open_existing(&p, None),
        Err(StoreError::Missing(_))
    ));
    assert!(!p.exists(), "nothing was created");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(
        SqliteStore::open_existing(&p, None),
        Err(StoreError::Missing(_))
    ));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
}

fn token(s: &SqliteStore, id: &str, user: Option<&str>, tags: &[&str], hostname: Option<&str>) {
    let tags: Vec<Name> = tags.iter().map(|t| n(t)).collect();
    let user = user.map(n);
    let hostname = hostname.map(|h| Hostname::parse(h).unwrap());
    s.create_token(
        TokenSpec {
            id,
            secret_hash: ward_shared::token::hash_secret(id.as_bytes()),
            user: user.as_ref(),
            tags: &tags,
            expires_ms: 1_000_000,
            uses: 1,
            hostname: hostname.as_ref(),
        },
        "admin",
        1000,
    )
    .unwrap();
}

/// A user who enrolls first as `ci-runner` with an ordinary token gets a self-chosen name;
/// the server enrolling later with a `--hostname ci-runner` token gets that name, bound,
/// whatever it asked for, and the first device is moved aside to `ci-runner-2`.
fn a_bound_name_goes_to_its_token_and_moves_a_squatter_aside() {
    let (s, pools) = setup();
    token(&s, "user", Some("alice"), &[], None);
    token(&s, "srv", None, &["ci"], Some("ci-runner"));
    let squatter = enroll(&s, &pools, "user", b"user", "ci-runner", 1, 2000).unwrap();
    assert_eq!(squatter.hostname.as_str(), "ci-runner");
    assert!(!squatter.name_bound);
    let server = enroll(&s, &pools, "srv", b"srv", "whatever", 2, 3000).unwrap();
    assert_eq!(server.hostname.as_str(), "ci-runner");
    assert!(server.name_bound);
    let moved = s.device(squatter.id).unwrap();
    assert_eq!(moved.hostname.as_str(), "ci-runner-2");
    assert!(!moved.name_bound);
    assert_eq!(s.device_by_name("ci-runner").unwrap().id, server.id);
    let tokens = s.list_tokens().unwrap();
    let tok = |id: &str| tokens.iter().find(|t| t.id == id).unwrap().clone();
    assert_eq!(tok("srv").hostname.as_deref(), Some("ci-runner"));
    assert_eq!(tok("user").hostname, None);
    let log = s.audit_log(100).unwrap();
    assert!(log
        .iter()
        .any(|e| e.action == "device.rename" && e.target == "ci-runner"));

    // A second token binding a name an active device holds bound: refused, clearly.
    token(&s, "srv2", None, &["ci"], Some("ci-runner"));
    let e = enroll(&s, &pools, "srv2", b"srv2", "x", 3, 4000).unwrap_err();
    match e {
        StoreError::Refused {
            code: ErrorCode::BadRequest,
            message,
        } => assert!(
            message.contains("held by another active device"),
            "{message}"
        ),
        other => panic!("{other}"),
    }
    assert_eq!(s.list_devices().unwrap().len(), 2);
    // The refused enrollment did not use the token up.
    let srv2 = s.list_tokens().unwrap();
    assert_eq!(srv2.iter().find(|t| t.id == "srv2").unwrap().uses_left, 1);
    // A name held by a revoked device is freed for the bound enrollment.
    s.revoke_device("ci-runner", "admin", 5000).unwrap();
    let again = enroll(&s, &pools, "srv2", b"srv2", "x", 3, 6000).unwrap();
    assert_eq!(again.hostname.as_str(), "ci-runner");
    assert!(again.name_bound);
    // A bound name binds one device only.
    let multi = s.create_token(
        TokenSpec {
            id: "multi",
            secret_hash: [0; 32],
            user: None,
            tags: &[n("ci")],
            expires_ms: 1_000_000,
            uses: 2,
            hostname: Some(&Hostname::parse("web").unwrap()),
        },
        "admin",
        1000,
    );
    assert!(matches!(multi, Err(StoreError::Invalid(_))), "{multi:?}");
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn a_bound_name_goes_to_its_token_and_moves_a_squatter_aside_sqlite() {
    on_sqlite(a_bound_name_goes_to_its_token_and_moves_a_squatter_aside);
}
#[test]
fn a_bound_name_goes_to_its_token_and_moves_a_squatter_aside_postgres() {
    on_postgres(a_bound_name_goes_to_its_token_and_moves_a_squatter_aside);
}

fn rename_and_approve_bind_names_and_are_audited() {
    let (s, pools) = setup();
    token(&s, "a", Some("alice"), &[], None);
    token(&s, "b", Some("alice"), &[], None);
    token(&s, "c", None, &["db"], Some("db1"));
    let a = enroll(&s, &pools, "a", b"a", "laptop", 1, 2000).unwrap();
    let b = enroll(&s, &pools, "b", b"b", "db1", 2, 2000).unwrap();
    let c = enroll(&s, &pools, "c", b"c", "x", 3, 2000).unwrap();
    assert!(!a.name_bound && !b.name_bound && c.name_bound);
    // Approve binds the current name, once.
    let a2 = s.approve_device_name("laptop", "admin", 3000).unwrap();
    assert!(a2.name_bound);
    assert_eq!(a2.hostname.as_str(), "laptop");
    assert!(matches!(
        s.approve_device_name("laptop", "admin", 3000),
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.approve_device_name("nope", "admin", 3000),
        Err(StoreError::NotFound(_))
    ));
    // Rename to a name another active device holds bound: refused, nothing changes.
    let held = s
        .rename_device("db1-2", &Hostname::parse("db1").unwrap(), "admin", 3000)
        .unwrap_err();
    assert!(matches!(held, StoreError::Conflict(_)), "{held}");
    assert_eq!(s.device(b.id).unwrap().hostname.as_str(), "db1-2");
    // Rename to a free name binds it.
    let b2 = s
        .rename_device("db1-2", &Hostname::parse("db2").unwrap(), "admin", 3000)
        .unwrap();
    assert_eq!(b2.hostname.as_str(), "db2");
    assert!(b2.name_bound);
    // Renaming a device to its own name binds it.
    let c2 = s
        .rename_device("db1", &Hostname::parse("db1").unwrap(), "admin", 3000)
        .unwrap();
    assert_eq!(c2.id, c.id);
    let log = s.audit_log(100).unwrap();
    assert!(log
        .iter()
        .any(|e| e.action == "device.approve" && e.target == "laptop"));
    // db1-2 moved aside when the bound db1 enrolled, then the two admin renames.
    assert_eq!(
        log.iter().filter(|e| e.action == "device.rename").count(),
        3
    );
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn rename_and_approve_bind_names_and_are_audited_sqlite() {
    on_sqlite(rename_and_approve_bind_names_and_are_audited);
}
#[test]
fn rename_and_approve_bind_names_and_are_audited_postgres() {
    on_postgres(rename_and_approve_bind_names_and_are_audited);
}

/// Devices enrolled before names could be bound keep their access: the upgrade marks them
/// bound; tokens made before it bind no name.
#[test]
fn upgrade_marks_existing_devices_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ward.db");
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7i64).unwrap();
        conn.execute_batch(
            "INSERT INTO tokens(id, secret_hash, tags, created_ms, expires_ms, uses_total, uses_left) VALUES ('t', x'00', '[\"ci\"]', 1, 9, 1, 0);
             INSERT INTO devices(hostname, tags, addr_index, ipv4, ipv6, identity_hash, os, status, token_id, created_ms, last_seen_ms, cert_not_after_ms)
               VALUES ('ci-runner', '[\"ci\"]', 1, '100.64.0.1', 'fd00::1', x'01', 'linux', 'active', 't', 1, 1, 0);",
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let d = s.device_by_name("ci-runner").unwrap();
    assert!(d.name_bound);
    assert_eq!(s.list_tokens().unwrap()[0].hostname, None);
}

mod flow_records {
    use super::*;
    use crate::store::{FlowQuery, FlowsStored};
    use ward_shared::filter::Proto;
    use ward_shared::flows::{
        DenyCause, FlowRecord, FlowReport, FlowVerdict, FlowWindow, Role, ShadowVerdict,
    };

    const W: i64 = 60_000;
    const NOW: i64 = 100 * W;

    fn rec(port: u16, bytes: u64) -> FlowRecord {
        FlowRecord {
            role: Role::Initiator,
            peer: Some(DeviceId(2)),
            peer_addr: "100.64.0.2".parse().unwrap(),
            peer_user: Some("bob".into()),
            peer_tags: vec!["db".into()],
            proto: Proto::Tcp,
            port,
            verdict: FlowVerdict::Allowed,
            rule: Some("eng-db".into()),
            policy_version: Some(2),
            reason: None,
            packets_out: 1,
            bytes_out: bytes,
            packets_in: 1,
            bytes_in: bytes,
            connections: 1,
            shadow: None,
        }
    }

    fn report(seq: u64, start: i64, records: Vec<FlowRecord>) -> FlowReport {
        FlowReport {
            seq,
            windows: vec![FlowWindow {
                start_ms: start,
                end_ms: start + W,
                records,
            }],
            dropped_records: 0,
        }
    }

    fn all(s: &SqliteStore) -> Vec<FlowRow> {
        s.flows(&FlowQuery {
            since_ms: i64::MIN,
            involving: None,
            limit: 1000,
        })
        .unwrap()
    }

    #[test]
    fn a_report_is_stored_once_even_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let s = SqliteStore::open(&path).unwrap();
        let r = report(1, NOW - W, vec![rec(5432, 100)]);
        assert!(matches!(
            s.store_flows(DeviceId(1), &r, 0, NOW).unwrap(),
            FlowsStored::Stored { records: 1, .. }
        ));
        assert_eq!(
            s.store_flows(DeviceId(1), &r, 0, NOW).unwrap(),
            FlowsStored::Duplicate
        );
        drop(s);
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.store_flows(DeviceId(1), &r, 0, NOW).unwrap(),
            FlowsStored::Duplicate
        );
        // The same seq from another device is another report.
        assert!(matches!(
            s.store_flows(DeviceId(3), &r, 0, NOW).unwrap(),
            FlowsStored::Stored { .. }
        ));
        let rows = all(&s);
        let mine: Vec<_> = rows.iter().filter(|r| r.reporter == DeviceId(1)).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].record.bytes_out, 100, "never counted twice");
        assert_eq!(mine[0].record, rec(5432, 100));
    }

    /// The candidate verdict is stored and read back; records of one key merge their
    /// verdicts (a would-deny wins, none keeps what was there).
    fn shadow_verdicts_are_stored_and_merged() {
        let s = new_store();
        let mut allow = rec(80, 10);
        allow.shadow = Some(ShadowVerdict::WouldAllow);
        let mut deny = rec(80, 10);
        deny.shadow = Some(ShadowVerdict::WouldDeny);
        let mut other = rec(443, 10);
        other.shadow = Some(ShadowVerdict::WouldAllow);
        let r = report(1, NOW - W, vec![allow.clone(), other.clone(), rec(22, 1)]);
        s.store_flows(DeviceId(1), &r, 0, NOW).unwrap();
        let by_port = |s: &SqliteStore, p: u16| {
            all(s)
                .into_iter()
                .find(|r| r.record.port == p)
                .map(|r| r.record.shadow)
        };
        assert_eq!(by_port(&s, 80), Some(Some(ShadowVerdict::WouldAllow)));
        assert_eq!(by_port(&s, 22), Some(None));
        let r = report(2, NOW - W, vec![deny, rec(443, 10)]);
        s.store_flows(DeviceId(1), &r, 0, NOW).unwrap();
        assert_eq!(by_port(&s, 80), Some(Some(ShadowVerdict::WouldDeny)));
        assert_eq!(by_port(&s, 443), Some(Some(ShadowVerdict::WouldAllow)));
        let rows = all(&s);
        let row = rows.iter().find(|r| r.record.port == 80).unwrap();
        assert_eq!(row.record.bytes_out, 20, "one row, counts merged");
    }
    #[test]
    fn shadow_verdicts_are_stored_and_merged_sqlite() {
        on_sqlite(shadow_verdicts_are_stored_and_merged);
    }
    #[test]
    fn shadow_verdicts_are_stored_and_merged_postgres() {
        on_postgres(shadow_verdicts_are_stored_and_merged);
    }

    fn relabeled_records_are_stored_and_a_retransmission_judged_otherwise_is_the_same_report() {
        let s = new_store();
        let mut denied = rec(5432, 60);
        denied.role = Role::Responder;
        denied.verdict = FlowVerdict::Denied;
        denied.rule = None;
        denied.reason = Some(DenyCause::NoRule);
        let received = report(1, NOW - W, vec![denied.clone()]);
        let mut relabeled = received.clone();
        relabeled.windows[0].records[0].reason = Some(DenyCause::Posture);
        assert!(matches!(
            s.store_flows_relabeled(DeviceId(1), &received, &relabeled, 0, NOW)
                .unwrap(),
            FlowsStored::Stored { records: 1, .. }
        ));
        // Sent again after the device's posture changed: judged `no rule` this time, but the
        // same report (report 1 with other content would mean the device numbers anew).
        assert_eq!(
            s.store_flows_relabeled(DeviceId(1), &received, &received, 0, NOW)
                .unwrap(),
            FlowsStored::Duplicate
        );
        let rows = all(&s);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].record.reason, Some(DenyCause::Posture));
        assert_eq!(rows[0].record.bytes_out, 60, "counted once");
    }
    #[test]
    fn relabeled_records_are_stored_and_a_retransmission_judged_otherwise_is_the_same_report_sqlite(
    ) {
        on_sqlite(
            relabeled_records_are_stored_and_a_retransmission_judged_otherwise_is_the_same_report,
        );
    }
    #[test]
    fn relabeled_records_are_stored_and_a_retransmission_judged_otherwise_is_the_same_report_postgres(
    ) {
        on_postgres(
            relabeled_records_are_stored_and_a_retransmission_judged_otherwise_is_the_same_report,
        );
    }

    fn records_of_one_key_and_window_are_merged_and_others_kept_apart() {
        let s = new_store();
        s.store_flows(DeviceId(1), &report(1, NOW - W, vec![rec(22, 10)]), 0, NOW)
            .unwrap();
        // The rest of the same window in the next report, plus another port.
        s.store_flows(
            DeviceId(1),
            &report(2, NOW - W, vec![rec(22, 5), rec(80, 7)]),
            0,
            NOW,
        )
        .unwrap();
        // The next window.
        s.store_flows(DeviceId(1), &report(3, NOW, vec![rec(22, 1)]), 0, NOW)
            .unwrap();
        let mut denied = rec(22, 3);
        denied.verdict = FlowVerdict::Denied;
        denied.rule = None;
        denied.reason = Some(DenyCause::NoRule);
        s.store_flows(DeviceId(1), &report(4, NOW, vec![denied.clone()]), 0, NOW)
            .unwrap();
        let rows = all(&s);
        assert_eq!(rows.len(), 4, "{rows:#?}");
        let get = |start: i64, port: u16, v: FlowVerdict| {
            rows.iter()
                .find(|r| {
                    r.window_start_ms == start && r.record.port == port && r.record.verdict == v
                })
                .unwrap()
                .record
                .clone()
        };
        let merged = get(NOW - W, 22, FlowVerdict::Allowed);
        assert_eq!(
            (merged.bytes_out, merged.packets_out, merged.connections),
            (15, 2, 2)
        );
        assert_eq!(get(NOW - W, 80, FlowVerdict::Allowed).bytes_out, 7);
        assert_eq!(get(NOW, 22, FlowVerdict::Allowed).bytes_out, 1);
        assert_eq!(get(NOW, 22, FlowVerdict::Denied), denied);
    }
    #[test]
    fn records_of_one_key_and_window_are_merged_and_others_kept_apart_sqlite() {
        on_sqlite(records_of_one_key_and_window_are_merged_and_others_kept_apart);
    }
    #[test]
    fn records_of_one_key_and_window_are_merged_and_others_kept_apart_postgres() {
        on_postgres(records_of_one_key_and_window_are_merged_and_others_kept_apart);
    }

    fn gaps_and_dropped_records_are_counted() {
        let s = new_store();
        let mut r = report(1, NOW - W, vec![rec(22, 1)]);
        s.store_flows(DeviceId(1), &r, 0, NOW).unwrap();
        r.seq = 4;
        r.dropped_records = 7;
        assert_eq!(
            s.store_flows(DeviceId(1), &r, 0, NOW).unwrap(),
            FlowsStored::Stored {
                records: 1,
                refused: 0,
                gap: 2
            }
        );
        let src = &s.flow_sources().unwrap()[0];
        assert_eq!(
            (
                src.last_seq,
                src.reports,
                src.missing_seqs,
                src.dropped_records
            ),
            (4, 2, 2, 7)
        );
        // A late report fills its gap; the drop count is the device's latest (cumulative).
        r.seq = 3;
        r.dropped_records = 5;
        s.store_flows(DeviceId(1), &r, 0, NOW).unwrap();
        let src = &s.flow_sources().unwrap()[0];
        assert_eq!(
            (
                src.last_seq,
                src.reports,
                src.missing_seqs,
                src.dropped_records
            ),
            (4, 3, 1, 7)
        );
    }
    #[test]
    fn gaps_and_dropped_records_are_counted_sqlite() {
        on_sqlite(gaps_and_dropped_records_are_counted);
    }
    #[test]
    fn gaps_and_dropped_records_are_counted_postgres() {
        on_postgres(gaps_and_dropped_records_are_counted);
    }

    fn retention_refuses_old_windows_and_prunes_old_rows() {
        let s = new_store();
        let keep_after = NOW - 10 * W;
        // Too old, and too far in the future: acknowledged but not stored.
        let old = report(1, keep_after - 2 * W, vec![rec(22, 1)]);
        let future = report(2, NOW + 11 * W, vec![rec(22, 1)]);
        for r in [&old, &future] {
            assert_eq!(
                s.store_flows(DeviceId(1), r, keep_after, NOW).unwrap(),
                FlowsStored::Stored {
                    records: 0,
                    refused: 1,
                    gap: 0
                }
            );
        }
        assert!(all(&s).is_empty());
        assert_eq!(s.flow_sources().unwrap()[0].refused_records, 2);
        // Two windows kept; later one of them ages out.
        s.store_flows(
            DeviceId(1),
            &report(3, NOW - 5 * W, vec![rec(22, 1)]),
            keep_after,
            NOW,
        )
        .unwrap();
        s.store_flows(
            DeviceId(1),
            &report(4, NOW - W, vec![rec(22, 1)]),
            keep_after,
            NOW,
        )
        .unwrap();
        assert_eq!(all(&s).len(), 2);
        assert_eq!(s.prune_flows(NOW - 3 * W, 1000).unwrap(), 1);
        let left = all(&s);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].window_start_ms, NOW - W);
        // The batch bound holds.
        assert_eq!(s.prune_flows(NOW + 10 * W, 0).unwrap(), 0);
        assert_eq!(all(&s).len(), 1);
        // Report marks received before the cutoff go; their seqs stay stored-before.
        assert_eq!(s.prune_flows(NOW + 1, 1000).unwrap(), 1);
        assert_eq!(
            s.store_flows(DeviceId(1), &report(3, NOW, vec![rec(22, 1)]), 0, NOW + 2)
                .unwrap(),
            FlowsStored::Duplicate
        );
        assert!(all(&s).is_empty());
    }
    #[test]
    fn retention_refuses_old_windows_and_prunes_old_rows_sqlite() {
        on_sqlite(retention_refuses_old_windows_and_prunes_old_rows);
    }
    #[test]
    fn retention_refuses_old_windows_and_prunes_old_rows_postgres() {
        on_postgres(retention_refuses_old_windows_and_prunes_old_rows);
    }

    fn queries_select_by_device_and_time_and_values_stay_in_range() {
        let s = new_store();
        let mut huge = rec(443, u64::MAX);
        huge.packets_out = u64::MAX;
        huge.peer_user = Some("evil\x1b[2Jname".into());
        s.store_flows(DeviceId(1), &report(1, NOW - W, vec![huge.clone()]), 0, NOW)
            .unwrap();
        s.store_flows(DeviceId(1), &report(2, NOW - W, vec![huge]), 0, NOW)
            .unwrap();
        let mut other = rec(80, 1);
        other.peer = Some(DeviceId(4));
        s.store_flows(DeviceId(3), &report(1, NOW - 30 * W, vec![other]), 0, NOW)
            .unwrap();
        let rows = all(&s);
        let big = rows.iter().find(|r| r.record.port == 443).unwrap();
        assert_eq!(
            big.record.bytes_out,
            i64::MAX as u64,
            "saturates, never wraps"
        );
        assert_eq!(big.record.peer_user.as_deref(), Some("evil[2Jname"));
        let q = |since_ms: i64, involving: Option<Vec<DeviceId>>| {
            s.flows(&FlowQuery {
                since_ms,
                involving,
                limit: 100,
            })
            .unwrap()
            .len()
        };
        assert_eq!(q(i64::MIN, None), 2);
        assert_eq!(q(NOW - 10 * W, None), 1);
        // Device 2 is the peer of device 1's record; device 4 of device 3's.
        assert_eq!(q(i64::MIN, Some(vec![DeviceId(2)])), 1);
        assert_eq!(q(i64::MIN, Some(vec![DeviceId(3), DeviceId(1)])), 2);
        assert_eq!(q(i64::MIN, Some(vec![DeviceId(4)])), 1);
        assert_eq!(q(i64::MIN, Some(vec![DeviceId(9)])), 0);
    }
    #[test]
    fn queries_select_by_device_and_time_and_values_stay_in_range_sqlite() {
        on_sqlite(queries_select_by_device_and_time_and_values_stay_in_range);
    }
    #[test]
    fn queries_select_by_device_and_time_and_values_stay_in_range_postgres() {
        on_postgres(queries_select_by_device_and_time_and_values_stay_in_range);
    }
}

mod flow_renumbering {
    use super::*;
    use crate::store::FlowsStored;
    use ward_shared::flows::{FlowReport, FlowWindow};

    fn report(seq: u64, start_ms: i64, dropped: u64) -> FlowReport {
        FlowReport {
            seq,
            windows: vec![FlowWindow {
                start_ms,
                end_ms: start_ms + 60_000,
                records: vec![],
            }],
            dropped_records: dropped,
        }
    }

    /// A device that lost its state numbers its reports from 1 again: its new reports are
    /// stored, not taken for retransmissions; another report under a used number (not 1) is not.
    fn a_device_numbering_from_one_again_is_stored_and_counted() {
        let s = new_store();
        let d = DeviceId(1);
        for seq in 1..=3 {
            s.store_flows(d, &report(seq, 0, 4), 0, 1000).unwrap();
        }
        assert_eq!(
            s.store_flows(d, &report(2, 0, 4), 0, 1000).unwrap(),
            FlowsStored::Duplicate
        );
        assert_eq!(
            s.store_flows(d, &report(2, 60_000, 4), 0, 1000).unwrap(),
            FlowsStored::Duplicate,
            "a different report under a used number other than 1 is kept out"
        );
        // Numbering starts over.
        assert!(matches!(
            s.store_flows(d, &report(1, 120_000, 1), 0, 1000).unwrap(),
            FlowsStored::Stored { gap: 0, .. }
        ));
        assert!(matches!(
            s.store_flows(d, &report(2, 180_000, 1), 0, 1000).unwrap(),
            FlowsStored::Stored { gap: 0, .. }
        ));
        assert_eq!(
            s.store_flows(d, &report(2, 180_000, 1), 0, 1000).unwrap(),
            FlowsStored::Duplicate
        );
        let src = &s.flow_sources().unwrap()[0];
        assert_eq!(
            (
                src.last_seq,
                src.reports,
                src.missing_seqs,
                src.renumbered,
                src.dropped_records
            ),
            (2, 5, 0, 1, 5)
        );
    }
    #[test]
    fn a_device_numbering_from_one_again_is_stored_and_counted_sqlite() {
        on_sqlite(a_device_numbering_from_one_again_is_stored_and_counted);
    }
    #[test]
    fn a_device_numbering_from_one_again_is_stored_and_counted_postgres() {
        on_postgres(a_device_numbering_from_one_again_is_stored_and_counted);
    }
}

fn audit_counts_read_only_rows_since_the_last_sequence_number() {
    let (s, _) = setup(); // one user.add row
    let (all, top) = s.audit_counts_since(0).unwrap();
    assert_eq!(all.get("user.add"), Some(&1));
    for action in [
        Action::DeviceRevoke,
        Action::DeviceRevoke,
        Action::LeaseIssue,
    ] {
        s.append_audit(
            Audit {
                actor: "a",
                action,
                target: "t",
                detail: serde_json::json!({}),
            },
            5,
        )
        .unwrap();
    }
    let (new, top2) = s.audit_counts_since(top).unwrap();
    assert_eq!(new.get("device.revoke"), Some(&2));
    assert_eq!(new.get("lease.issue"), Some(&1));
    assert_eq!(new.get("user.add"), None);
    assert_eq!(top2, top + 3);
    let (none, top3) = s.audit_counts_since(top2).unwrap();
    assert!(none.is_empty());
    assert_eq!(top3, top2);
}

#[test]
fn users_the_provider_disabled_under_older_code_become_provider_suspended() {
    let (s, _) = setup();
    let oidc = |user: &str, disabled: bool| crate::store::OidcUser {
        user: user.into(),
        issuer: "https://idp".into(),
        sub: format!("sub-{user}"),
        refresh_token: None,
        groups: vec![],
        amr: vec![],
        sid: None,
        auth_time_ms: Some(1000),
        last_auth_ms: Some(1000),
        last_refresh_ms: Some(1000),
        provider_disabled: disabled,
        reason: disabled.then(|| "the identity provider no longer accepts the sign-in".into()),
        revision: 0,
    };
    for u in ["bob", "carol", "dave"] {
        s.add_user(&n(u), &[], "admin", 1000).unwrap();
    }
    // bob: disabled by the provider the old way (users.disabled by the actor oidc).
    s.save_oidc_user(&oidc("bob", true), None, "oidc", 1100)
        .unwrap();
    s.set_user_disabled(&n("bob"), true, "oidc", 1100).unwrap();
    // carol: suspended by the provider, but an administrator disabled her afterwards.
    s.save_oidc_user(&oidc("carol", true), None, "oidc", 1100)
        .unwrap();
    s.set_user_disabled(&n("carol"), true, "oidc", 1100)
        .unwrap();
    s.set_user_disabled(&n("carol"), true, "admin", 1200)
        .unwrap();
    // dave: an administrator's disable of a provider user the provider still accepts.
    s.save_oidc_user(&oidc("dave", false), None, "oidc", 1100)
        .unwrap();
    s.set_user_disabled(&n("dave"), true, "admin", 1200)
        .unwrap();
    // alice: a local user an administrator disabled.
    s.set_user_disabled(&n("alice"), true, "admin", 1200)
        .unwrap();

    assert_eq!(
        s.repair_provider_disabled("repair", 2000).unwrap(),
        vec!["bob".to_string()]
    );
    let disabled: Vec<String> = s
        .list_users()
        .unwrap()
        .into_iter()
        .filter(|u| u.disabled)
        .map(|u| u.name)
        .collect();
    assert_eq!(disabled, vec!["alice", "carol", "dave"]);
    // The provider's suspension stays, so bob's access stays cut by the registry.
    let bob = s
        .oidc_users()
        .unwrap()
        .into_iter()
        .find(|u| u.user == "bob")
        .unwrap();
    assert!(bob.provider_disabled);
    let log = s.audit_log(1).unwrap();
    assert_eq!(
        (
            log[0].actor.as_str(),
            log[0].action.as_str(),
            log[0].target.as_str()
        ),
        ("repair", "user.enable", "bob")
    );
    // Once repaired, nothing more to do; the chain still verifies.
    assert!(s
        .repair_provider_disabled("repair", 3000)
        .unwrap()
        .is_empty());
    assert!(s.verify_audit().unwrap().ok);
}
#[test]
fn audit_counts_read_only_rows_since_the_last_sequence_number_sqlite() {
    on_sqlite(audit_counts_read_only_rows_since_the_last_sequence_number);
}
#[test]
fn audit_counts_read_only_rows_since_the_last_sequence_number_postgres() {
    on_postgres(audit_counts_read_only_rows_since_the_last_sequence_number);
}

/// Audit rows of chosen actions: the newest `limit` of them, oldest first, whatever other rows
/// lie between them.
fn audit_rows_of_chosen_actions_are_read_alone() {
    let (s, _) = setup(); // one user.add row
    let row = |action, target: &str, ts| {
        s.append_audit(
            Audit {
                actor: "a",
                action,
                target,
                detail: serde_json::json!({"n": target}),
            },
            ts,
        )
        .unwrap();
    };
    row(Action::DeviceQuarantine, "q1", 10);
    for i in 0..50 {
        row(Action::LeaseIssue, &format!("l{i}"), 11 + i);
    }
    row(Action::UserDisable, "u1", 70);
    row(Action::LeaseIssue, "l50", 71);
    row(Action::LeaseRevoke, "r1", 72);
    row(Action::DeviceQuarantine, "q2", 73);
    let wanted = ["device.quarantine", "user.disable", "lease.revoke"];
    let targets = |rows: Vec<crate::store::AuditEntry>| -> Vec<String> {
        rows.into_iter().map(|r| r.target).collect()
    };
    let all = s.audit_log_of(&wanted, 100).unwrap();
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq), "oldest first");
    assert_eq!(all[1].detail, serde_json::json!({"n": "u1"}));
    assert_eq!(targets(all), ["q1", "u1", "r1", "q2"]);
    assert_eq!(targets(s.audit_log_of(&wanted, 2).unwrap()), ["r1", "q2"]);
    assert_eq!(
        targets(s.audit_log_of(&["lease.revoke"], 100).unwrap()),
        ["r1"]
    );
    assert!(s.audit_log_of(&[], 100).unwrap().is_empty());
    assert!(s.audit_log_of(&wanted, 0).unwrap().is_empty());
}
#[test]
fn audit_rows_of_chosen_actions_are_read_alone_sqlite() {
    on_sqlite(audit_rows_of_chosen_actions_are_read_alone);
}
#[test]
fn audit_rows_of_chosen_actions_are_read_alone_postgres() {
    on_postgres(audit_rows_of_chosen_actions_are_read_alone);
}

/// Every device's latest posture report time in one read; devices that never reported are
/// absent.
fn posture_times_are_each_devices_latest() {
    let (s, pools) = setup();
    user_token(&s, "t", "alice", 3);
    let a = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
    let b = enroll(&s, &pools, "t", b"s", "b", 2, 2000).unwrap();
    let c = enroll(&s, &pools, "t", b"s", "c", 3, 2000).unwrap();
    let v = serde_json::json!({});
    s.save_posture(a.id, &v, &v, 3000).unwrap();
    s.save_posture(b.id, &v, &v, 3100).unwrap();
    s.save_posture(a.id, &v, &v, 3500).unwrap();
    let times = s.posture_times().unwrap();
    assert_eq!(times.get(&a.id), Some(&3500));
    assert_eq!(times.get(&b.id), Some(&3100));
    assert_eq!(times.get(&c.id), None);
    assert_eq!(times.len(), 2);
}
#[test]
fn posture_times_are_each_devices_latest_sqlite() {
    on_sqlite(posture_times_are_each_devices_latest);
}
#[test]
fn posture_times_are_each_devices_latest_postgres() {
    on_postgres(posture_times_are_each_devices_latest);
}

/// A batch of contact is written in one go: each device gets its own time, key and endpoints,
/// a touch naming no key keeps the stored one, and an empty batch writes nothing.
#[test]
fn touches_are_written_together() {
    let (s, pools) = setup();
    user_token(&s, "t", "alice", 2);
    let a = enroll(&s, &pools, "t", b"s", "a", 1, 2000).unwrap();
    let b = enroll(&s, &pools, "t", b"s", "b", 2, 2000).unwrap();
    let key = WgPublicKey([9; 32]);
    let ep: SocketAddr = "192.0.2.7:51820".parse().unwrap();
    s.touch_device(b.id, Some(key), &[], 2500).unwrap();
    s.touch_devices(&[]).unwrap();
    s.touch_devices(&[
        crate::store::Touch {
            id: a.id,
            wg: Some(key),
            endpoints: vec![ep],
            at_ms: 3000,
        },
        crate::store::Touch {
            id: b.id,
            wg: None,
            endpoints: vec![],
            at_ms: 3100,
        },
    ])
    .unwrap();
    let (a, b) = (s.device(a.id).unwrap(), s.device(b.id).unwrap());
    assert_eq!(
        (a.last_seen_ms, a.wg_public_key, a.endpoints),
        (3000, Some(key), vec![ep])
    );
    assert_eq!(
        (b.last_seen_ms, b.wg_public_key),
        (3100, Some(key)),
        "no key named keeps the stored one"
    );
}

/// Two writers that read the same provider identity: the second write is refused as stale and
/// changes nothing; read again, it applies on top of the first. A refresh claim is one
/// holder's at a time until it runs out.
fn provider_identity_writes_are_conditional_and_refresh_is_claimed() {
    let (s, _) = setup();
    let row = crate::store::OidcUser {
        user: "alice".into(),
        issuer: "https://idp".into(),
        sub: "sub-alice".into(),
        refresh_token: Some("rt-1".into()),
        groups: vec![],
        amr: vec![],
        sid: None,
        auth_time_ms: Some(1000),
        last_auth_ms: Some(1000),
        last_refresh_ms: Some(1000),
        provider_disabled: false,
        reason: None,
        revision: 0,
    };
    s.save_oidc_user(&row, None, "oidc", 1000).unwrap();
    // A second "first" write (another replica's sign-in that read no row) is stale.
    assert!(matches!(
        s.save_oidc_user(&row, None, "oidc", 1000),
        Err(StoreError::Stale(_))
    ));
    let read_by_a = s
        .oidc_user_by_sub("https://idp", "sub-alice")
        .unwrap()
        .unwrap();
    let read_by_b = read_by_a.clone();
    assert_eq!(read_by_a.revision, 1);
    // A: a back-channel logout.
    let mut a = read_by_a;
    a.provider_disabled = true;
    a.reason = Some("signed out".into());
    s.save_oidc_user(&a, None, "oidc", 1100).unwrap();
    // B: a refresh that read the row before the logout must not write the old row back.
    let mut b = read_by_b;
    b.refresh_token = Some("rt-2".into());
    b.last_refresh_ms = Some(1200);
    let audit_len = s.audit_log(1000).unwrap().len();
    assert!(matches!(
        s.save_oidc_user(
            &b,
            Some((Action::OidcUserChange, serde_json::json!({}))),
            "oidc",
            1200
        ),
        Err(StoreError::Stale(_))
    ));
    assert_eq!(
        s.audit_log(1000).unwrap().len(),
        audit_len,
        "nothing audited"
    );
    let now = s
        .oidc_user_by_sub("https://idp", "sub-alice")
        .unwrap()
        .unwrap();
    assert!(now.provider_disabled && now.refresh_token.as_deref() == Some("rt-1"));
    // Read again, B's change lands on top of A's.
    let mut b = now;
    b.refresh_token = Some("rt-2".into());
    s.save_oidc_user(&b, None, "oidc", 1300).unwrap();
    let now = s
        .oidc_user_by_sub("https://idp", "sub-alice")
        .unwrap()
        .unwrap();
    assert!(now.provider_disabled && now.refresh_token.as_deref() == Some("rt-2"));
    assert_eq!(now.revision, 3);

    // Refresh claims: A holds it until 5000; B waits; A renews; B takes over once it ran out.
    let claim = |who: &str, now: i64, until: i64| {
        s.claim_oidc_refresh("https://idp", "sub-alice", who, now, until)
            .unwrap()
    };
    assert!(claim("A", 2000, 5000));
    assert!(!claim("B", 3000, 6000));
    assert!(claim("A", 4000, 7000));
    assert!(!claim("B", 6999, 9000));
    assert!(claim("B", 7000, 10_000));
    assert!(!claim("A", 8000, 11_000));
    // An unknown identity is never claimed.
    assert!(!s
        .claim_oidc_refresh("https://idp", "sub-nobody", "A", 1, 2)
        .unwrap());
    // Claims do not change the row's revision (a claim is not an identity change).
    let after = s
        .oidc_user_by_sub("https://idp", "sub-alice")
        .unwrap()
        .unwrap();
    assert_eq!(after.revision, 3);
}
#[test]
fn provider_identity_writes_are_conditional_and_refresh_is_claimed_sqlite() {
    on_sqlite(provider_identity_writes_are_conditional_and_refresh_is_claimed);
}
#[test]
fn provider_identity_writes_are_conditional_and_refresh_is_claimed_postgres() {
    on_postgres(provider_identity_writes_are_conditional_and_refresh_is_claimed);
}
