//! Replicas of one instance on one database: what a replica must reload when the change feed
//! moves, and which of its sessions another replica has taken over. No I/O: the driver
//! (`server::replica`) reads the store, passes rows in and turns the answers into registry
//! events.
//!
//! The drive loop:
//!
//! ```text
//! every FEED_POLL (or when the database's notification wakes it):
//!     v = store.feed_version()
//!     if feed.wants(v): rows = store.feed_since(feed.seen(), N); reloads = feed.handle_rows(&rows)
//!     for each kind in reloads: re-read it from the store, diff against the last read,
//!                               send the differences to the registry actor
//! every SESSION_POLL:
//!     stale_sessions(&mine, &store.sessions(), me) -> close those local sessions
//! with every feed step, and once at start:
//!     batch = store.scan_evidence_since(evidence.after(), N)
//!     evidence.handle_batch(batch) -> rows for the registry (`handle_remote_denied`)
//! ```
//!
//! The feed is the audit log: every write other replicas must see appends an audit row in the
//! same transaction, so the log's last sequence number is a version counter that can never
//! run ahead of the data it announces.

use std::collections::{BTreeMap, BTreeSet};

use ward_shared::wire::DeviceId;

use crate::model::Device;
use crate::registry::ScanEvidence;
use crate::store::replicas::{EvidenceBatch, FeedRow, SessionRow};

/// What to re-read from the store after some feed rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloads {
    pub devices: bool,
    pub users: bool,
    pub policy: bool,
    pub grants: bool,
    pub relays: bool,
    pub routes: bool,
    pub leases: bool,
    pub sign_ins: bool,
    /// Devices' trust as the replicas holding their sessions judged it (`device_trust`).
    pub trust: bool,
    /// Which users the identity provider suspended (`oidc_users`).
    pub suspensions: bool,
}

impl Reloads {
    pub fn any(&self) -> bool {
        self.devices
            || self.users
            || self.policy
            || self.grants
            || self.relays
            || self.routes
            || self.leases
            || self.sign_ins
            || self.trust
            || self.suspensions
    }

    /// Everything (at start, and after the feed skipped rows it could not read).
    pub fn all() -> Self {
        Self {
            devices: true,
            users: true,
            policy: true,
            grants: true,
            relays: true,
            routes: true,
            leases: true,
            sign_ins: true,
            trust: true,
            suspensions: true,
        }
    }

    /// Both sets of reloads.
    pub fn merge(&mut self, o: &Reloads) {
        self.devices |= o.devices;
        self.users |= o.users;
        self.policy |= o.policy;
        self.grants |= o.grants;
        self.relays |= o.relays;
        self.routes |= o.routes;
        self.leases |= o.leases;
        self.sign_ins |= o.sign_ins;
        self.trust |= o.trust;
        self.suspensions |= o.suspensions;
    }
}

/// What one audit action makes other replicas reload. Actions that change nothing the
/// registry holds (refusals, tokens, console, suggestions, the audit anchor) reload nothing;
/// an action this version does not know reloads everything (a newer replica's write is never
/// missed).
pub fn reloads_for(action: &str) -> Reloads {
    let mut r = Reloads::default();
    match action {
        "device.enroll"
        | "device.revoke"
        | "device.rotate"
        | "device.quarantine"
        | "device.release"
        | "device.tag"
        | "device.rename"
        | "device.approve"
        | "device.cert_renewed" => r.devices = true,
        // A user's disabled flag and groups are part of each of their devices' rows.
        "user.add" | "user.disable" | "user.enable" | "user.groups" => {
            r.users = true;
            r.devices = true;
        }
        // The provider suspended a user (or changed its groups).
        "oidc.user_change" => {
            r.users = true;
            r.devices = true;
            r.suspensions = true;
        }
        "policy.apply" => r.policy = true,
        "grant.add" | "grant.remove" => r.grants = true,
        "relay.add" | "relay.remove" => r.relays = true,
        "device.routes" => r.routes = true,
        "lease.issue" | "lease.revoke" => r.leases = true,
        // A sign-in also lifts a provider suspension.
        "oidc.sign_in" | "oidc.link" | "device.login" => {
            r.sign_ins = true;
            r.suspensions = true;
        }
        // The replica holding the device's session judged its trust differently: the other
        // replicas judge the device's peers by the stored verdict.
        "device.trust" => r.trust = true,
        // The verdict itself reaches other replicas through `device.trust`; these rows are
        // the human-readable history.
        "posture.pass" | "posture.fail" | "posture.refused" => {}
        // Behaviour risk is learned from the flows each replica receives.
        "anomaly.raised" | "anomaly.ack" | "risk.above" | "risk.below" => {}
        "coordinator.start"
        | "connect.refused"
        | "enroll.refused"
        | "token.create"
        | "token.revoke"
        | "policy.refused"
        | "lease.refused"
        | "audit.anchored"
        | "audit.rollback_accepted"
        | "suggestion.accept"
        | "suggestion.dismiss"
        | "suggestion.snooze"
        | "console.link"
        | "console.login"
        | "console.login_refused"
        | "oidc.sign_in_refused"
        | "device.login_refused"
        | "oidc.push_refused" => {}
        // Each replica's coordinator addresses live in its own data directory (`addrs set`
        // is run against each); nothing the registry loads from the store changed.
        "addrs.set" => {}
        _ => r = Reloads::all(),
    }
    r
}

/// The change feed's position: the last audit sequence number this replica applied.
#[derive(Debug, Clone)]
pub struct Feed {
    seen: i64,
}

impl Feed {
    /// Starts after `version`: the registry was loaded from the store when it stood there
    /// (read the version before loading, so a write in between is applied twice, never
    /// missed).
    pub fn new(version: i64) -> Self {
        Self { seen: version }
    }

    pub fn seen(&self) -> i64 {
        self.seen
    }

    /// Whether the store's version is past what was applied.
    pub fn wants(&self, version: i64) -> bool {
        version > self.seen
    }

    /// The reloads the rows ask for; the position moves to the last row.
    #[must_use]
    pub fn handle_rows(&mut self, rows: &[FeedRow]) -> Reloads {
        let mut r = Reloads::default();
        for row in rows {
            if row.seq <= self.seen {
                continue;
            }
            r.merge(&reloads_for(&row.action));
            self.seen = row.seq;
        }
        r
    }
}

/// Devices that changed between two reads of the device table, for the registry: changed or
/// new rows (a revoked row included: the registry removes it) and ids gone from the table.
/// `last_seen_ms` alone, written on every contact, is not a change. A new WireGuard key or
/// endpoint list is: it is how the devices whose sessions this replica holds learn where a
/// device on another replica is (without it neither end of a cross-replica pair knows the
/// other's address and no tunnel forms). The registry keeps the contact of a session it
/// holds itself over a stored row (`Registry::handle_device_upserted`).
pub fn diff_devices(
    old: &BTreeMap<DeviceId, Device>,
    new: &[Device],
) -> (Vec<Device>, Vec<DeviceId>) {
    let changed = new
        .iter()
        .filter(|d| device_changed(old.get(&d.id), d))
        .cloned()
        .collect();
    let ids: BTreeSet<DeviceId> = new.iter().map(|d| d.id).collect();
    let gone = old.keys().filter(|id| !ids.contains(id)).copied().collect();
    (changed, gone)
}

/// Whether a device row read again (`new`) differs from the one read before (`old`) in more
/// than `last_seen_ms`; a row not read before has changed.
pub fn device_changed(old: Option<&Device>, new: &Device) -> bool {
    let Some(o) = old else { return true };
    // Every field named, so a new one is a decision here, not a silent omission.
    let Device {
        id,
        hostname,
        user,
        user_disabled,
        tags,
        ipv4,
        ipv6,
        os,
        status,
        created_ms,
        last_seen_ms: _,
        cert_not_after_ms,
        revoked_ms,
        wg_public_key,
        endpoints,
        quarantine,
        name_bound,
    } = o;
    !(*id == new.id
        && *hostname == new.hostname
        && *user == new.user
        && *user_disabled == new.user_disabled
        && *tags == new.tags
        && *ipv4 == new.ipv4
        && *ipv6 == new.ipv6
        && *os == new.os
        && *status == new.status
        && *created_ms == new.created_ms
        && *cert_not_after_ms == new.cert_not_after_ms
        && *revoked_ms == new.revoked_ms
        && *wg_public_key == new.wg_public_key
        && *endpoints == new.endpoints
        && *quarantine == new.quarantine
        && *name_bound == new.name_bound)
}

/// The sessions this replica (`me`) holds that another replica has claimed since (the
/// device reconnected there): they are stale and must be closed, so a device is served by
/// one replica at a time. `mine` maps each local session to when it was claimed.
pub fn stale_sessions(
    mine: &BTreeMap<DeviceId, i64>,
    rows: &[SessionRow],
    me: &str,
) -> Vec<DeviceId> {
    rows.iter()
        .filter(|r| r.replica != me)
        .filter(|r| {
            mine.get(&r.device)
                .is_some_and(|since| r.since_ms >= *since)
        })
        .map(|r| r.device)
        .collect()
}

/// Each user the identity provider knows, and why it suspended them (`None`: it did not),
/// from the stored provider rows (a user with several is suspended if any row is).
pub fn suspensions(rows: &[crate::store::OidcUser]) -> BTreeMap<String, Option<String>> {
    let mut out: BTreeMap<String, Option<String>> = BTreeMap::new();
    for r in rows {
        let e = out.entry(r.user.clone()).or_default();
        if r.provider_disabled && e.is_none() {
            *e = Some(
                r.reason
                    .clone()
                    .unwrap_or_else(|| "the identity provider took access away".into()),
            );
        }
    }
    out
}

/// The device sessions other replicas (not `me`) hold whose heartbeat is fresh: the ones a
/// replica treats as online and judged by their holder. A dead replica's sessions are
/// nobody's (the devices reconnect elsewhere).
pub fn remote_sessions(
    sessions: &[SessionRow],
    replicas: &[crate::store::replicas::ReplicaRow],
    me: &str,
    now_ms: i64,
) -> BTreeMap<DeviceId, crate::registry::RemoteSession> {
    let live: BTreeSet<&str> = replicas
        .iter()
        .filter(|r| alive(r.last_seen_ms, now_ms))
        .map(|r| r.id.as_str())
        .collect();
    sessions
        .iter()
        .filter(|s| s.replica != me && live.contains(s.replica.as_str()))
        .map(|s| {
            (
                s.device,
                crate::registry::RemoteSession {
                    replica: s.replica.clone(),
                    home_relay: s.home_relay.clone(),
                },
            )
        })
        .collect()
}

/// A replica is alive when its heartbeat is at most this old.
pub const ALIVE_WITHIN_MS: i64 = 5_000;

pub fn alive(last_seen_ms: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(last_seen_ms) <= ALIVE_WITHIN_MS
}

/// The scan evidence feed's position (`scan_evidence` ids only grow). Every row another
/// replica stored goes to the registry; this replica's own rows are already in its trust
/// book, except those stored before it started (a restart), which the first read takes too.
#[derive(Debug, Clone)]
pub struct EvidenceFeed {
    me: String,
    after: i64,
    started: bool,
}

impl EvidenceFeed {
    pub fn new(me: &str) -> Self {
        Self {
            me: me.to_string(),
            after: 0,
            started: false,
        }
    }

    /// Read the rows after this id next.
    pub fn after(&self) -> i64 {
        self.after
    }

    /// One read's rows: what the registry must count. The first read (at start) takes every
    /// stored row, later ones only other replicas' rows.
    pub fn handle_batch(&mut self, batch: EvidenceBatch) -> Vec<ScanEvidence> {
        let first = !self.started;
        self.started = true;
        self.after = self.after.max(batch.last_id);
        batch
            .rows
            .into_iter()
            .filter(|r| first || r.replica != self.me)
            .map(|r| ScanEvidence {
                source: r.source,
                reporter: r.reporter,
                proto: r.proto,
                port: r.port,
                at_ms: r.at_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, action: &str) -> FeedRow {
        FeedRow {
            seq,
            action: action.into(),
            target: "x".into(),
        }
    }

    #[test]
    fn every_change_another_replica_must_apply_maps_to_a_reload() {
        assert!(reloads_for("policy.apply").policy);
        assert!(reloads_for("device.revoke").devices);
        assert!(reloads_for("device.quarantine").devices);
        assert!(reloads_for("device.release").devices);
        assert!(reloads_for("device.enroll").devices);
        let u = reloads_for("user.disable");
        assert!(u.users && u.devices, "a disabled user's devices change too");
        assert!(reloads_for("grant.add").grants);
        assert!(reloads_for("grant.remove").grants);
        assert!(reloads_for("relay.add").relays);
        assert!(reloads_for("device.routes").routes);
        assert!(reloads_for("lease.issue").leases);
        assert!(reloads_for("lease.revoke").leases);
        assert!(reloads_for("oidc.sign_in").sign_ins);
        // A suspension by the provider (and its lifting by a new sign-in) reaches every replica.
        assert!(reloads_for("oidc.user_change").suspensions);
        assert!(reloads_for("oidc.sign_in").suspensions);
        assert!(reloads_for("device.login").suspensions);
        assert!(!reloads_for("policy.apply").suspensions);
    }

    #[test]
    fn every_known_action_is_mapped_and_unknown_ones_reload_everything() {
        for a in crate::audit::Action::ALL {
            // Known actions never fall through to "reload everything".
            assert_ne!(reloads_for(a.as_str()), Reloads::all(), "{}", a.as_str());
        }
        assert_eq!(reloads_for("something.new"), Reloads::all());
        assert!(!reloads_for("token.create").any());
        assert!(!reloads_for("coordinator.start").any());
    }

    #[test]
    fn the_feed_moves_forward_and_never_applies_a_row_twice() {
        let mut f = Feed::new(10);
        assert!(!f.wants(10));
        assert!(f.wants(11));
        let r = f.handle_rows(&[row(9, "policy.apply"), row(11, "token.create")]);
        assert!(!r.any(), "row 9 was already applied");
        assert_eq!(f.seen(), 11);
        let r = f.handle_rows(&[row(12, "grant.add"), row(13, "device.revoke")]);
        assert!(r.grants && r.devices && !r.policy);
        assert_eq!(f.seen(), 13);
        assert!(!f.handle_rows(&[row(13, "policy.apply")]).any());
    }

    fn dev(id: u64, seen: i64) -> Device {
        Device {
            id: DeviceId(id),
            hostname: ward_shared::names::Hostname::parse(&format!("d{id}")).unwrap(),
            user: None,
            user_disabled: false,
            tags: vec![],
            ipv4: "100.64.0.1".parse().unwrap(),
            ipv6: "fd7a::1".parse().unwrap(),
            os: "linux".into(),
            status: crate::model::DeviceStatus::Active,
            created_ms: 1,
            last_seen_ms: seen,
            cert_not_after_ms: 2,
            revoked_ms: None,
            wg_public_key: None,
            endpoints: vec![],
            quarantine: None,
            name_bound: false,
        }
    }

    #[test]
    fn device_diff_reports_changes_and_removals_but_not_last_seen() {
        let old: BTreeMap<_, _> = [(DeviceId(1), dev(1, 5)), (DeviceId(2), dev(2, 5))].into();
        let mut revoked = dev(2, 5);
        revoked.status = crate::model::DeviceStatus::Revoked;
        let (changed, gone) = diff_devices(&old, &[dev(1, 99), revoked.clone(), dev(3, 1)]);
        assert_eq!(
            changed.iter().map(|d| d.id).collect::<Vec<_>>(),
            [DeviceId(2), DeviceId(3)]
        );
        assert!(gone.is_empty());
        let (changed, gone) = diff_devices(&old, &[dev(1, 5)]);
        assert!(changed.is_empty());
        assert_eq!(gone, [DeviceId(2)]);
        // A device's new key or endpoints are a change: other replicas' peers need them.
        let mut keyed = dev(1, 7);
        keyed.wg_public_key = Some(ward_shared::wire::WgPublicKey([3; 32]));
        assert_eq!(diff_devices(&old, &[keyed, dev(2, 5)]).0.len(), 1);
        let mut moved = dev(1, 7);
        moved.endpoints = vec!["192.168.1.2:51820".parse().unwrap()];
        assert_eq!(diff_devices(&old, &[moved, dev(2, 5)]).0.len(), 1);
    }

    fn srow(d: u64, replica: &str, since: i64) -> SessionRow {
        SessionRow {
            device: DeviceId(d),
            replica: replica.into(),
            since_ms: since,
            home_relay: None,
        }
    }

    #[test]
    fn a_session_claimed_later_elsewhere_is_stale_here() {
        let mine: BTreeMap<_, _> =
            [(DeviceId(1), 100), (DeviceId(2), 100), (DeviceId(3), 300)].into();
        let rows = [
            srow(1, "r2", 200), // moved to r2 after ours: stale
            srow(2, "r1", 100), // still ours
            srow(3, "r2", 200), // r2's claim is older than ours: ours wins
            srow(4, "r2", 500), // not ours at all
        ];
        assert_eq!(stale_sessions(&mine, &rows, "r1"), [DeviceId(1)]);
        assert!(stale_sessions(&BTreeMap::new(), &rows, "r1").is_empty());
    }

    #[test]
    fn a_trust_verdict_stored_by_another_replica_reloads_the_trust_rows_only() {
        let r = reloads_for("device.trust");
        assert!(r.trust);
        assert_eq!(
            r,
            Reloads {
                trust: true,
                ..Reloads::default()
            }
        );
        assert!(Reloads::all().trust);
        let mut f = Feed::new(0);
        let r = f.handle_rows(&[row(1, "posture.fail"), row(2, "device.trust")]);
        assert!(r.trust && !r.devices);
    }

    fn hb(id: &str, last_seen_ms: i64) -> crate::store::replicas::ReplicaRow {
        crate::store::replicas::ReplicaRow {
            id: id.into(),
            address: "a".into(),
            started_ms: 0,
            last_seen_ms,
            sessions: 0,
        }
    }

    fn oidc(user: &str, disabled: bool) -> crate::store::OidcUser {
        crate::store::OidcUser {
            user: user.into(),
            issuer: "https://idp".into(),
            sub: format!("sub-{user}"),
            refresh_token: None,
            groups: vec![],
            amr: vec![],
            sid: None,
            auth_time_ms: None,
            last_auth_ms: None,
            last_refresh_ms: None,
            provider_disabled: disabled,
            reason: disabled.then(|| "refresh refused".into()),
            revision: 0,
        }
    }

    #[test]
    fn provider_suspensions_are_read_per_user() {
        let mut second = oidc("carol", true);
        second.issuer = "https://other".into();
        second.reason = None;
        let s = suspensions(&[
            oidc("alice", false),
            oidc("bob", true),
            oidc("carol", false),
            second,
        ]);
        assert_eq!(s["alice"], None);
        assert_eq!(s["bob"].as_deref(), Some("refresh refused"));
        assert_eq!(
            s["carol"].as_deref(),
            Some("the identity provider took access away"),
            "suspended by one of its providers: suspended"
        );
    }

    #[test]
    fn sessions_held_elsewhere_count_only_on_live_replicas() {
        let mut rows = [srow(1, "r1", 10), srow(2, "r2", 10), srow(3, "dead", 10)];
        rows[1].home_relay = Some("relay-a".into());
        let reps = [hb("r1", 10_000), hb("r2", 9_000), hb("dead", 1_000)];
        let held = remote_sessions(&rows, &reps, "r1", 10_000);
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), [DeviceId(2)]);
        assert_eq!(held[&DeviceId(2)].replica, "r2");
        assert_eq!(held[&DeviceId(2)].home_relay.as_deref(), Some("relay-a"));
        // A replica with no heartbeat row at all holds nothing either.
        assert!(remote_sessions(&rows, &[], "r1", 10_000).is_empty());
    }

    #[test]
    fn a_replica_is_alive_while_its_heartbeat_is_fresh() {
        assert!(alive(1_000, 1_000 + ALIVE_WITHIN_MS));
        assert!(!alive(1_000, 1_001 + ALIVE_WITHIN_MS));
    }

    fn ev(id: i64, replica: &str) -> crate::store::replicas::EvidenceRow {
        crate::store::replicas::EvidenceRow {
            id,
            source: DeviceId(1),
            reporter: DeviceId(2),
            proto: ward_shared::filter::Proto::Tcp,
            port: 22,
            at_ms: id,
            replica: replica.into(),
        }
    }

    #[test]
    fn the_evidence_feed_takes_own_rows_only_at_start_and_moves_past_unreadable_ones() {
        let mut f = EvidenceFeed::new("r1");
        let first = f.handle_batch(EvidenceBatch {
            rows: vec![ev(1, "r1"), ev(2, "r2")],
            last_id: 3,
        });
        assert_eq!(first.len(), 2, "stored before this start: counted");
        assert_eq!(f.after(), 3, "row 3 did not parse: read past it");
        let next = f.handle_batch(EvidenceBatch {
            rows: vec![ev(4, "r1"), ev(5, "r2")],
            last_id: 5,
        });
        assert_eq!(
            next.len(),
            1,
            "this replica's own rows are in its book already"
        );
        assert_eq!(next[0].at_ms, 5);
        let empty = f.handle_batch(EvidenceBatch {
            rows: vec![],
            last_id: 0,
        });
        assert!(empty.is_empty());
        assert_eq!(f.after(), 5, "an empty read never moves the position back");
    }
}
