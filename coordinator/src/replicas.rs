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
//! ```
//!
//! The feed is the audit log: every write other replicas must see appends an audit row in the
//! same transaction, so the log's last sequence number is a version counter that can never
//! run ahead of the data it announces.

use std::collections::{BTreeMap, BTreeSet};

use ward_shared::wire::DeviceId;

use crate::model::Device;
use crate::store::replicas::{FeedRow, SessionRow};

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
        "user.add" | "user.disable" | "user.enable" | "user.groups" | "oidc.user_change" => {
            r.users = true;
            r.devices = true;
        }
        "policy.apply" => r.policy = true,
        "grant.add" | "grant.remove" => r.grants = true,
        "relay.add" | "relay.remove" => r.relays = true,
        "device.routes" => r.routes = true,
        "lease.issue" | "lease.revoke" => r.leases = true,
        "oidc.sign_in" | "oidc.link" | "device.login" => r.sign_ins = true,
        // The replica holding the device's session judged it and wrote the verdict; another
        // replica's peers see the device's quarantine (a device row) when one follows.
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
    let mut changed = Vec::new();
    for d in new {
        let same = old.get(&d.id).is_some_and(|o| {
            let mut o = o.clone();
            o.last_seen_ms = d.last_seen_ms;
            &o == d
        });
        if !same {
            changed.push(d.clone());
        }
    }
    let ids: BTreeSet<DeviceId> = new.iter().map(|d| d.id).collect();
    let gone = old.keys().filter(|id| !ids.contains(id)).copied().collect();
    (changed, gone)
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

/// A replica is alive when its heartbeat is at most this old.
pub const ALIVE_WITHIN_MS: i64 = 5_000;

pub fn alive(last_seen_ms: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(last_seen_ms) <= ALIVE_WITHIN_MS
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
    fn a_replica_is_alive_while_its_heartbeat_is_fresh() {
        assert!(alive(1_000, 1_000 + ALIVE_WITHIN_MS));
        assert!(!alive(1_000, 1_001 + ALIVE_WITHIN_MS));
    }
}
