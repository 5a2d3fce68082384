//! Scan detection across replicas on one store: two registries (as two `serve` processes
//! hold them) on one database, driven the way the server drives them: each registry's
//! `ScanEvidence` output is stored (`add_scan_evidence`), and each feed step reads what the
//! other stored (`scan_evidence_since` through `replicas::EvidenceFeed`) into
//! `Registry::handle_remote_denied`. On SQLite (one file, two handles) and on PostgreSQL (two
//! stores on one database; `WARD_REQUIRE_PG=1` makes a missing cluster a failure).

use std::collections::BTreeMap;

use ward_shared::addr::AddressPools;
use ward_shared::filter::Proto;
use ward_shared::policy;
use ward_shared::wire::{DeniedFlow, DeviceId, DeviceUpdate};

use crate::registry::{Output, Registry, RemoteSession};
use crate::replicas::EvidenceFeed;
use crate::store::replicas::ReplicaStore;
use crate::store::SqliteStore;

const T0: i64 = 1_800_000_000_000;
/// The source, and the two devices whose filters refuse its packets.
const SRC: DeviceId = DeviceId(1);
const R2: DeviceId = DeviceId(2);
const R3: DeviceId = DeviceId(3);

struct Replica {
    id: &'static str,
    reg: Registry,
    store: SqliteStore,
    feed: EvidenceFeed,
    /// Quarantines this replica asked for.
    quarantined: Vec<(DeviceId, String)>,
}

impl Replica {
    fn new(id: &'static str, store: SqliteStore, now: i64) -> Self {
        let p = policy::parse(
            br#"
[groups]
eng = ["alice"]
[services.web]
devices = ["group:eng"]
ports = ["tcp/80"]
[[rules]]
from = ["group:eng"]
to = ["web"]
[trust]
scan_denied_flows = 4
scan_window = "10s"
"#,
            "t.toml",
        )
        .unwrap();
        let reg = Registry::new(
            AddressPools::from_random([0; 5]),
            [1, 2, 3].map(crate::model::test_device),
            [],
            Some(p),
            vec![],
            vec![],
            now,
        );
        let mut r = Self {
            id,
            reg,
            store,
            feed: EvidenceFeed::new(id),
            quarantined: Vec::new(),
        };
        // As the replica task does at start: everything stored so far.
        r.follow(now);
        r
    }

    /// The registry's outputs, carried out as the server does (evidence stored; quarantines
    /// recorded).
    fn drain(&mut self) {
        while let Some(o) = self.reg.poll_output() {
            match o {
                Output::ScanEvidence {
                    reporter,
                    flows,
                    at_ms,
                    window_ms,
                } => {
                    self.store
                        .add_scan_evidence(self.id, reporter, &flows, at_ms, window_ms)
                        .unwrap();
                }
                Output::Quarantine { device, reason } => self.quarantined.push((device, reason)),
                _ => {}
            }
        }
    }

    /// One feed step: the evidence the other replicas stored since the last.
    fn follow(&mut self, now: i64) {
        let batch = self
            .store
            .scan_evidence_since(self.feed.after(), 4096)
            .unwrap();
        let rows = self.feed.handle_batch(batch);
        self.reg.handle_remote_denied(&rows, now);
        self.drain();
    }

    fn open(&mut self, id: DeviceId, conn: u64) {
        let addr = format!("10.0.0.{}:1", id.0).parse().unwrap();
        self.reg
            .handle_session_opened(id, conn, addr, DeviceUpdate::default())
            .unwrap();
        self.drain();
    }

    /// Which devices other replicas hold (the sessions table, as `share_sessions` reads it).
    fn held_elsewhere(&mut self, held: &[(DeviceId, &str)]) {
        let m: BTreeMap<DeviceId, RemoteSession> = held
            .iter()
            .map(|(d, r)| {
                (
                    *d,
                    RemoteSession {
                        replica: (*r).into(),
                        home_relay: None,
                    },
                )
            })
            .collect();
        self.reg.handle_remote_sessions(m);
        self.drain();
    }

    /// `reporter` (whose session is here) reports denied flows from the source on `ports`.
    fn report(&mut self, reporter: DeviceId, ports: std::ops::Range<u16>, now: i64) {
        let flows: Vec<DeniedFlow> = ports
            .map(|port| DeniedFlow {
                src: std::net::IpAddr::V4(crate::model::test_device(SRC.0).ipv4),
                proto: Proto::Tcp,
                port,
                count: 1,
            })
            .collect();
        self.reg.handle_denied_flows(reporter, &flows, now);
        self.drain();
    }

    fn risk(&self, id: DeviceId) -> u8 {
        self.reg.risk(id).0
    }
}

/// Two stores on one database: one SQLite file, or one PostgreSQL database.
fn two_stores(pg: bool) -> Option<(Option<tempfile::TempDir>, SqliteStore, SqliteStore)> {
    if pg {
        let url = crate::store::postgres::testpg::fresh_database()?;
        let a = SqliteStore::open_postgres(&url, None).unwrap();
        let b = SqliteStore::open_postgres(&url, None).unwrap();
        return Some((None, a, b));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ward.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    Some((Some(dir), a, b))
}

/// Replica r1 holds reporter 2, r2 holds reporter 3 and the source. Each reporter alone
/// weighs at most half the threshold, so neither replica could tell on its own evidence; with
/// the evidence shared, r2 (the source's holder) quarantines it and raises its risk at its
/// first feed step after the second report, and r1 (not the holder) does not act too. Below
/// the threshold nobody acts.
fn a_scan_reported_on_two_replicas_is_caught_by_the_sources_holder(pg: bool) {
    let Some((_dir, sa, sb)) = two_stores(pg) else {
        return;
    };
    let mut a = Replica::new("r1", sa, T0);
    let mut b = Replica::new("r2", sb, T0);
    a.open(R2, 12);
    b.open(R3, 23);
    b.open(SRC, 21);
    a.held_elsewhere(&[(R3, "r2"), (SRC, "r2")]);
    b.held_elsewhere(&[(R2, "r1")]);
    // Below the threshold: r1's reporter 1 flow, r2's reporter 100, which weigh at most
    // half the threshold (2): 3 of the 4 needed, shared or not.
    a.report(R2, 1000..1001, T0 + 100);
    b.report(R3, 2000..2100, T0 + 110);
    assert!(b.quarantined.is_empty(), "one reporter is never enough");
    for r in [&mut a, &mut b] {
        r.follow(T0 + 200);
    }
    assert!(a.quarantined.is_empty() && b.quarantined.is_empty());
    // r1's reporter sees one more: r1's book has it all now, but r2 holds the source.
    a.report(R2, 1001..1002, T0 + 300);
    assert!(a.quarantined.is_empty(), "{:?}", a.quarantined);
    assert!(b.quarantined.is_empty(), "not read yet");
    // r2 reads r1's stored evidence at its next feed step: two reporters, four flows.
    b.follow(T0 + 450);
    assert_eq!(b.quarantined.len(), 1, "{:?}", b.quarantined);
    assert_eq!(b.quarantined[0].0, SRC);
    assert!(
        b.quarantined[0].1.ends_with("reported by d2, d3"),
        "{}",
        b.quarantined[0].1
    );
    assert!(b.risk(SRC) >= 60, "risk raised as on one replica");
    // r1 saw all of it too, but defers to the holder.
    a.follow(T0 + 450);
    assert!(a.quarantined.is_empty(), "{:?}", a.quarantined);
    assert_eq!(a.risk(SRC), 0);
}

#[test]
fn a_scan_reported_on_two_replicas_is_caught_on_sqlite() {
    a_scan_reported_on_two_replicas_is_caught_by_the_sources_holder(false);
}

#[test]
fn a_scan_reported_on_two_replicas_is_caught_on_postgres() {
    a_scan_reported_on_two_replicas_is_caught_by_the_sources_holder(true);
}

/// The source's session moves from r1 to r2 in the middle of the window: r2 already holds
/// what r1's reporter said, and catches the scan when the rest of the evidence arrives there.
/// A replica started after the evidence was stored (a restart) reads it at start.
fn a_source_moving_to_the_other_replica_keeps_the_evidence_against_it(pg: bool) {
    let Some((_dir, sa, sb)) = two_stores(pg) else {
        return;
    };
    let mut a = Replica::new("r1", sa, T0);
    let mut b = Replica::new("r2", sb, T0);
    a.open(R2, 12);
    a.open(SRC, 11);
    b.open(R3, 23);
    b.held_elsewhere(&[(R2, "r1"), (SRC, "r1")]);
    a.held_elsewhere(&[(R3, "r2")]);
    a.report(R2, 1000..1010, T0 + 1_000);
    b.follow(T0 + 1_100);
    assert!(a.quarantined.is_empty() && b.quarantined.is_empty());
    // The source fails over to r2 (r1 closes its stale session) 4 s later.
    a.reg.handle_session_moved(SRC);
    a.drain();
    b.open(SRC, 21);
    b.held_elsewhere(&[(R2, "r1")]);
    a.held_elsewhere(&[(R3, "r2"), (SRC, "r2")]);
    assert!(b.quarantined.is_empty());
    // r2's own reporter completes it, within the window of r1's evidence.
    b.report(R3, 2000..2002, T0 + 5_000);
    assert_eq!(b.quarantined.len(), 1, "{:?}", b.quarantined);
    assert_eq!(b.quarantined[0].0, SRC);
    a.follow(T0 + 5_100);
    assert!(a.quarantined.is_empty(), "r1 no longer holds the source");

    // A replica started after the evidence was stored (r2 restarted) reads it at start.
    let Some((_dir2, sc, sd)) = two_stores(pg) else {
        return;
    };
    let mut c = Replica::new("r1", sc, T0);
    c.open(R2, 12);
    c.report(R2, 1000..1010, T0 + 1_000);
    let mut d = Replica::new("r2", sd, T0 + 2_000);
    d.open(SRC, 21);
    d.open(R3, 23);
    d.held_elsewhere(&[(R2, "r1")]);
    d.report(R3, 2000..2002, T0 + 3_000);
    assert_eq!(d.quarantined.len(), 1, "{:?}", d.quarantined);
    // Past the window, stored evidence no longer counts.
    let Some((_dir3, se, sf)) = two_stores(pg) else {
        return;
    };
    let mut e = Replica::new("r1", se, T0);
    e.open(R2, 12);
    e.report(R2, 1000..1010, T0 + 1_000);
    let mut f = Replica::new("r2", sf, T0 + 12_000);
    f.open(SRC, 21);
    f.open(R3, 23);
    f.held_elsewhere(&[(R2, "r1")]);
    f.report(R3, 2000..2002, T0 + 12_000);
    assert!(f.quarantined.is_empty(), "{:?}", f.quarantined);
}

#[test]
fn a_source_moving_replicas_keeps_its_evidence_on_sqlite() {
    a_source_moving_to_the_other_replica_keeps_the_evidence_against_it(false);
}

#[test]
fn a_source_moving_replicas_keeps_its_evidence_on_postgres() {
    a_source_moving_to_the_other_replica_keeps_the_evidence_against_it(true);
}

/// One reporter floods evidence against the source (and against others): the table and the
/// other replica's trust book stay within their bounds, and the flood alone quarantines
/// nobody.
fn a_flood_of_evidence_from_one_reporter_stays_bounded(pg: bool) {
    let Some((_dir, sa, sb)) = two_stores(pg) else {
        return;
    };
    let mut a = Replica::new("r1", sa, T0);
    let mut b = Replica::new("r2", sb, T0);
    a.open(R2, 12);
    b.open(SRC, 21);
    a.held_elsewhere(&[(SRC, "r2")]);
    b.held_elsewhere(&[(R2, "r1")]);
    for i in 0..200u16 {
        let lo = 1 + (i % 250) * 256;
        a.report(R2, lo..lo + 256, T0 + i64::from(i));
    }
    let stored = a.store.scan_evidence_since(0, 1_000_000).unwrap().rows;
    assert_eq!(stored.len(), crate::trust::MAX_DENIED_PER_REPORTER);
    b.follow(T0 + 300);
    assert!(b.quarantined.is_empty() && a.quarantined.is_empty());
    let book = b.reg.denied_remembered(SRC);
    assert!(book <= crate::trust::MAX_DENIED_PER_REPORTER, "{book}");
}

#[test]
fn a_flood_of_evidence_stays_bounded_on_sqlite() {
    a_flood_of_evidence_from_one_reporter_stays_bounded(false);
}

#[test]
fn a_flood_of_evidence_stays_bounded_on_postgres() {
    a_flood_of_evidence_from_one_reporter_stays_bounded(true);
}
