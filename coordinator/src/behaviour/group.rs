//! Group baselines: what the members of a group (a user group `group:NAME` or a tag
//! `tag:NAME`) usually send and how many connections they open per minute, so that a device is
//! judged against its peers as well as against its own past. This covers what a device's own
//! baseline cannot: a device still in its learning period (a new laptop exfiltrating on day
//! one), and a device whose own baseline drifted up slowly.
//!
//! Fixed size per group (two statistics and at most [`MAX_MEMBERS_KEPT`] member ids), at most
//! [`super::Config::max_groups`] groups (the least recently fed is dropped first) and at most
//! [`super::Config::max_groups_per_device`] groups per device. Stored as JSON, one row per group.
//!
//! Anti-poisoning: only a member's own windows feed its groups; a window that spikes (against
//! the device's own baseline or against a group) feeds nothing; each member's window weighs
//! `alpha / members`, so one device cannot move its group faster than its share. A group is
//! only judged against once it has [`super::Config::min_group_members`] members and is older
//! than the learning period.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use ward_shared::wire::DeviceId;

use super::baseline::{Ewma, Rates};

/// Member ids kept per group (enough to tell "several members" from "one").
pub const MAX_MEMBERS_KEPT: usize = 16;

/// One group's usual per-member rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupBaseline {
    /// When the group was first fed (its learning period runs from here).
    pub since_ms: i64,
    /// The last window fed (eviction order).
    pub last_ms: i64,
    /// Bytes out per minute of one member.
    pub bytes_out: Ewma,
    /// New connections per minute of one member.
    pub connections: Ewma,
    /// Members that fed it (at most [`MAX_MEMBERS_KEPT`]).
    pub members: BTreeSet<DeviceId>,
}

impl GroupBaseline {
    pub fn new(now_ms: i64) -> Self {
        Self {
            since_ms: now_ms,
            last_ms: now_ms,
            bytes_out: Ewma::default(),
            connections: Ewma::default(),
            members: BTreeSet::new(),
        }
    }

    /// Whether the group may judge its members: enough members, old enough.
    pub fn trusted(&self, now_ms: i64, learning_ms: i64, min_members: usize) -> bool {
        self.members.len() >= min_members.max(2) && now_ms - self.since_ms >= learning_ms
    }

    /// Folds one member's window in; `alpha` is the window's weight for one device.
    pub fn learn(&mut self, member: DeviceId, r: &Rates, alpha: f64, end_ms: i64) {
        if self.members.len() < MAX_MEMBERS_KEPT {
            self.members.insert(member);
        }
        let a = alpha / self.members.len().max(1) as f64;
        self.bytes_out.observe(r.bytes_out, a);
        self.connections.observe(r.connections, a);
        self.last_ms = self.last_ms.max(end_ms);
    }

    /// The usual upper range of a member's bytes out per minute (mean + 3 sd, at least
    /// `floor`).
    pub fn usual_bytes(&self, floor: f64) -> f64 {
        (self.bytes_out.mean + 3.0 * self.bytes_out.sd()).max(floor)
    }

    /// The usual upper range of a member's connections per minute.
    pub fn usual_connections(&self, floor: f64) -> f64 {
        (self.connections.mean + 3.0 * self.connections.sd()).max(floor)
    }

    /// A restored row with impossible numbers is refused.
    pub fn is_well_formed(&self) -> bool {
        [self.bytes_out, self.connections]
            .iter()
            .all(|e| e.mean.is_finite() && e.var.is_finite() && e.mean >= 0.0)
            && self.members.len() <= MAX_MEMBERS_KEPT
    }

    pub fn accounted_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.members.len() * (std::mem::size_of::<DeviceId>() + 16)
    }
}

/// Every group's baseline, bounded.
#[derive(Debug, Default)]
pub struct Groups {
    map: BTreeMap<String, GroupBaseline>,
}

impl Groups {
    pub fn get(&self, name: &str) -> Option<&GroupBaseline> {
        self.map.get(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Feeds `name` with a member's window (`span`: its start and end), creating the group
    /// (and dropping the least recently fed one beyond `cap`).
    pub fn learn(
        &mut self,
        name: &str,
        member: DeviceId,
        r: &Rates,
        alpha: f64,
        (start_ms, end_ms): (i64, i64),
        cap: usize,
    ) {
        if !self.map.contains_key(name) {
            while self.map.len() >= cap.max(1) {
                let Some(oldest) = self
                    .map
                    .iter()
                    .min_by_key(|(n, g)| (g.last_ms, (*n).clone()))
                    .map(|(n, _)| n.clone())
                else {
                    break;
                };
                self.map.remove(&oldest);
            }
            self.map
                .insert(name.to_string(), GroupBaseline::new(start_ms));
        }
        if let Some(g) = self.map.get_mut(name) {
            g.learn(member, r, alpha, end_ms);
        }
    }

    /// A device left (revoked): it no longer counts as a member anywhere.
    pub fn forget_member(&mut self, id: DeviceId) {
        for g in self.map.values_mut() {
            g.members.remove(&id);
        }
    }

    /// Every group as stored (JSON).
    pub fn snapshots(&self) -> Vec<(String, String)> {
        self.map
            .iter()
            .filter_map(|(n, g)| Some((n.clone(), serde_json::to_string(g).ok()?)))
            .collect()
    }

    /// Restores a stored group; a damaged one is refused (the group learns afresh).
    pub fn restore(&mut self, name: &str, snapshot: &str, cap: usize) -> Result<(), String> {
        let g: GroupBaseline = serde_json::from_str(snapshot).map_err(|e| e.to_string())?;
        if !g.is_well_formed() {
            return Err("the stored group baseline has impossible values".into());
        }
        if !self.map.contains_key(name) && self.map.len() >= cap.max(1) {
            return Err("more stored groups than the cap".into());
        }
        self.map.insert(name.to_string(), g);
        Ok(())
    }

    pub fn accounted_bytes(&self) -> usize {
        self.map
            .iter()
            .map(|(n, g)| n.capacity() + g.accounted_bytes() + 32)
            .sum()
    }
}
