//! The SQLite schema, as migrations applied in order.

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: first schema.
    r#"
    CREATE TABLE users(
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE user_groups(
        user_id INTEGER NOT NULL REFERENCES users(id),
        grp TEXT NOT NULL,
        PRIMARY KEY(user_id, grp)
    );
    CREATE TABLE tokens(
        id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        user_id INTEGER REFERENCES users(id),
        tags TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        uses_total INTEGER NOT NULL,
        uses_left INTEGER NOT NULL,
        revoked_ms INTEGER
    );
    CREATE TABLE devices(
        id INTEGER PRIMARY KEY,
        hostname TEXT NOT NULL UNIQUE,
        user_id INTEGER REFERENCES users(id),
        tags TEXT NOT NULL,
        addr_index INTEGER NOT NULL UNIQUE,
        ipv4 TEXT NOT NULL UNIQUE,
        ipv6 TEXT NOT NULL UNIQUE,
        identity_hash BLOB NOT NULL UNIQUE,
        os TEXT NOT NULL,
        status TEXT NOT NULL,
        token_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        cert_not_after_ms INTEGER NOT NULL,
        revoked_ms INTEGER,
        wg_key TEXT,
        endpoints TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE audit(
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
    "#,
    // 2: policy versions and just-in-time grants.
    r#"
    CREATE TABLE policies(
        version INTEGER PRIMARY KEY,
        text TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        actor TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        summary TEXT NOT NULL
    );
    CREATE TABLE grants(
        id TEXT PRIMARY KEY,
        principal TEXT NOT NULL,
        service TEXT NOT NULL,
        not_after_ms INTEGER NOT NULL,
        reason TEXT,
        actor TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        removed_ms INTEGER
    );
    "#,
    // 3: leases.
    r#"
    CREATE TABLE leases(
        serial INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id INTEGER NOT NULL REFERENCES devices(id),
        wg_key TEXT NOT NULL,
        not_before_ms INTEGER NOT NULL,
        not_after_ms INTEGER NOT NULL,
        issued_ms INTEGER NOT NULL,
        revoked_ms INTEGER,
        revoke_reason TEXT
    );
    CREATE INDEX leases_device ON leases(device_id, serial);
    "#,
    // 4: quarantine and posture.
    r#"
    ALTER TABLE devices ADD COLUMN quarantine TEXT;
    CREATE TABLE posture(
        device_id INTEGER PRIMARY KEY REFERENCES devices(id),
        report TEXT NOT NULL,
        evaluation TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
    // 5: relays (address discovery now; forwarding later).
    r#"
    CREATE TABLE relays(
        name TEXT PRIMARY KEY,
        addr TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    "#,
    // 6: relay credentials: the SHA-256 of each relay's secret (a relay added before this
    // migration has none and cannot open a control session until it is added again).
    r#"
    ALTER TABLE relays ADD COLUMN secret_hash BLOB;
    "#,
    // 7: the audit chain's keyed head: one row (row count, head hash, HMAC under `audit.key`,
    // which lives in the data directory, never here), moved forward in the transaction that
    // appends audit rows. A table tail behind it means rows were deleted from the table.
    r#"
    CREATE TABLE audit_head(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq INTEGER NOT NULL,
        hash BLOB NOT NULL,
        mac BLOB NOT NULL
    );
    "#,
    // 8: administrator-bound device names. A token may carry the hostname its device gets
    // (`token create --hostname`); `devices.name_bound` says whether an administrator chose the
    // name (only a bound name is matched by `device:NAME` selectors). Devices enrolled before
    // this migration are marked bound, so no deployment loses access on upgrade.
    r#"
    ALTER TABLE tokens ADD COLUMN hostname TEXT;
    ALTER TABLE devices ADD COLUMN name_bound INTEGER NOT NULL DEFAULT 1;
    "#,
    // 9: flow records. `flow_reports` holds each (device, seq) stored with the SHA-256 of the
    // report, written in the same transaction as the report's records, so a retransmission is
    // stored once and a device that restarted its numbering is told apart; `flow_sources`
    // keeps per device the highest seq, the sequence numbers never received (gaps) and the
    // records the device says it dropped. `flows` holds one row per (reporter, window, other
    // end, role, proto, port, verdict, rule, reason); text columns hold '' for "none" so the
    // key is unique in SQL's sense (NULLs never conflict).
    r#"
    CREATE TABLE flow_reports(
        device_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        received_ms INTEGER NOT NULL,
        records INTEGER NOT NULL,
        digest BLOB NOT NULL,
        PRIMARY KEY(device_id, seq)
    );
    CREATE INDEX flow_reports_received ON flow_reports(received_ms);
    CREATE TABLE flow_sources(
        device_id INTEGER PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        floor_seq INTEGER NOT NULL,
        reports INTEGER NOT NULL,
        missing_seqs INTEGER NOT NULL,
        dropped_records INTEGER NOT NULL,
        refused_records INTEGER NOT NULL,
        renumbered INTEGER NOT NULL,
        last_report_ms INTEGER NOT NULL
    );
    CREATE TABLE flows(
        id INTEGER PRIMARY KEY,
        reporter INTEGER NOT NULL,
        window_start_ms INTEGER NOT NULL,
        window_end_ms INTEGER NOT NULL,
        peer_id INTEGER,
        peer_addr TEXT NOT NULL,
        role TEXT NOT NULL,
        proto TEXT NOT NULL,
        port INTEGER NOT NULL,
        verdict TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        peer_user TEXT,
        peer_tags TEXT NOT NULL,
        policy_version INTEGER,
        packets_out INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        packets_in INTEGER NOT NULL,
        bytes_in INTEGER NOT NULL,
        connections INTEGER NOT NULL,
        UNIQUE(reporter, window_start_ms, peer_addr, role, proto, port, verdict, rule, reason)
    );
    CREATE INDEX flows_window ON flows(window_end_ms);
    CREATE INDEX flows_reporter ON flows(reporter, window_end_ms);
    CREATE INDEX flows_peer ON flows(peer_id, window_end_ms);
    "#,
    // 10: maturity assessments, append-only and hash-chained like the audit table: each row's
    // hash covers the previous row's hash, its seq, time, trigger and assessment (JSON), so an
    // edited, inserted or deleted row breaks the chain `maturity history` verifies.
    r#"
    CREATE TABLE maturity(
        seq INTEGER PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        trigger TEXT NOT NULL,
        assessment TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash BLOB NOT NULL
    );
    "#,
    // 11: the lifecycle of flow-based policy suggestions (accepted, dismissed, snoozed), with
    // the evidence when the state was set, so a dismissed one returns only on new evidence.
    r#"
    CREATE TABLE suggestions(
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        until_ms INTEGER,
        flows INTEGER NOT NULL,
        days INTEGER NOT NULL,
        actor TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
    // 12: the candidate verdict of flow records (policies with shadow rules): 'would_allow',
    // 'would_deny' or '' (none). Not part of a row's key: records of one key merge, and a
    // would-deny wins.
    r#"
    ALTER TABLE flows ADD COLUMN shadow TEXT NOT NULL DEFAULT '';
    "#,
    // 13: users signed in through the OpenID provider (one provider identity per user), with
    // the refresh token the coordinator re-checks them with and the provider's verdict; and
    // who signed each device in, when, and how (`amr`).
    r#"
    CREATE TABLE oidc_users(
        user_id INTEGER PRIMARY KEY REFERENCES users(id),
        issuer TEXT NOT NULL,
        sub TEXT NOT NULL,
        refresh_token TEXT,
        groups TEXT NOT NULL DEFAULT '[]',
        amr TEXT NOT NULL DEFAULT '[]',
        sid TEXT,
        auth_time_ms INTEGER,
        last_auth_ms INTEGER,
        last_refresh_ms INTEGER,
        provider_disabled INTEGER NOT NULL DEFAULT 0,
        reason TEXT,
        UNIQUE(issuer, sub)
    );
    CREATE TABLE device_sign_ins(
        device_id INTEGER PRIMARY KEY REFERENCES devices(id),
        user_id INTEGER NOT NULL REFERENCES users(id),
        at_ms INTEGER NOT NULL,
        auth_time_ms INTEGER NOT NULL,
        amr TEXT NOT NULL
    );
    "#,
    // 14: routed prefixes per device: what it advertises (`ward up --advertise-routes`; an
    // exit node advertises 0.0.0.0/0 and ::/0) and what an administrator approved. Nothing is
    // routed unless it is both advertised and approved (or approved by the policy's
    // auto_approvers, which is computed, not stored).
    r#"
    CREATE TABLE device_routes (
        device_id INTEGER NOT NULL,
        prefix TEXT NOT NULL,
        advertised INTEGER NOT NULL DEFAULT 0,
        approved INTEGER NOT NULL DEFAULT 0,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (device_id, prefix)
    );
    "#,
    // 15: behaviour: a serialized baseline per device (written periodically and on shutdown,
    // so a restart keeps what was learned) and the anomalies raised, with their labels (JSON).
    r#"
    CREATE TABLE behaviour_baselines(
        device_id INTEGER PRIMARY KEY,
        snapshot TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE anomalies(
        id INTEGER PRIMARY KEY,
        device_id INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        anomaly TEXT NOT NULL
    );
    CREATE INDEX anomalies_at ON anomalies(at_ms);
    "#,
    // 16: behaviour group baselines: what a member of a group (`group:NAME`, `tag:NAME`)
    // usually does, a serialized snapshot per group, written with the device baselines.
    r#"
    CREATE TABLE behaviour_group_baselines(
        name TEXT PRIMARY KEY,
        snapshot TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    "#,
    // 17: replicas of one instance on one database: each replica's heartbeat (for `status`)
    // which replica holds each device's control session (the newest claim wins), and each
    // device's last accepted posture report number (a replay is refused on any replica).
    r#"
    CREATE TABLE replicas(
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        started_ms INTEGER NOT NULL,
        last_seen_ms INTEGER NOT NULL,
        sessions INTEGER NOT NULL
    );
    CREATE TABLE device_sessions(
        device_id INTEGER PRIMARY KEY,
        replica TEXT NOT NULL,
        since_ms INTEGER NOT NULL
    );
    CREATE TABLE posture_seqs(
        device_id INTEGER PRIMARY KEY,
        seq INTEGER NOT NULL
    );
    "#,
    // 18: each device's trust as the replica holding its session last judged it: the
    // posture verdict (JSON evaluations), behaviour risk, scan counters (JSON; always `[]`
    // from migration 19, which shares scan evidence in a table of its own), who wrote it
    // and when. Other replicas judge the device's peers by it; a replica taking the device's
    // session over starts from it. And the relay each held session receives relayed traffic
    // through (peers on every replica reach the device there).
    r#"
    CREATE TABLE device_trust(
        device_id INTEGER PRIMARY KEY,
        replica TEXT NOT NULL,
        verdict TEXT NOT NULL,
        risk INTEGER NOT NULL,
        risk_reason TEXT NOT NULL,
        counters TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    ALTER TABLE device_sessions ADD COLUMN home_relay TEXT;
    "#,
    // 19: denied flows reported against a source, as scan evidence every replica's trust
    // book reads (the reporters' sessions may be on other replicas than the source's), bounded
    // per source and reporter and pruned to the scan window. The id only grows (it is the
    // evidence feed's position), hence AUTOINCREMENT.
    r#"
    CREATE TABLE scan_evidence(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        source_id INTEGER NOT NULL,
        reporter_id INTEGER NOT NULL,
        proto TEXT NOT NULL,
        port INTEGER NOT NULL,
        at_ms INTEGER NOT NULL,
        replica TEXT NOT NULL
    );
    CREATE INDEX scan_evidence_flow ON scan_evidence(source_id, reporter_id, proto, port);
    CREATE INDEX scan_evidence_reporter ON scan_evidence(reporter_id);
    CREATE INDEX scan_evidence_at ON scan_evidence(at_ms);
    "#,
    // 20: a provider identity's row has a revision (a write that started from an older
    // revision is refused, so two replicas never write over each other's change) and a
    // refresh claim (one replica at a time refreshes a user's provider tokens).
    r#"
    ALTER TABLE oidc_users ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE oidc_users ADD COLUMN refresh_holder TEXT;
    ALTER TABLE oidc_users ADD COLUMN refresh_until_ms INTEGER NOT NULL DEFAULT 0;
    "#,
    // 21: audit rows by action, newest first: an assessment reads the few actions it counts
    // (quarantines, user disables, lease revocations) without the lease issues that fill most
    // of a large deployment's log.
    r#"
    CREATE INDEX audit_action ON audit(action, seq);
    "#,
];
