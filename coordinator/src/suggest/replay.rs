//! `policy replay`: the stored flows judged by a candidate policy.
//!
//! The candidate is compiled against the directory as it is now (grants included); every flow
//! between two known devices is then judged by the responder's inbound rules in that
//! compilation (the responder's filter is what decides). A flow that was allowed and would be
//! denied is listed as newly denied (a used flow losing access: the list to read before
//! applying); a flow denied for want of a rule that would be allowed is newly allowed. Flows
//! are summed per (initiator, responder, protocol, port).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

use ward_shared::filter::Proto;
use ward_shared::flows::{DenyCause, FlowVerdict};
use ward_shared::policy::{self, Compiled, Directory, Policy};
use ward_shared::wire::DeviceId;

use super::{bytes, confirmed, connections, port_of, PortUse};
use crate::flows::Pair;

/// One (initiator, responder, port) whose verdict would change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFlow {
    pub initiator: String,
    pub responder: String,
    pub port: PortUse,
    pub flows: u64,
    pub bytes: u64,
    pub last_seen_ms: i64,
    /// Whether both ends reported at least one of these flows.
    pub confirmed: bool,
    /// The rule or grant that allowed it when it was seen (newly denied only).
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replayed {
    pub newly_denied: Vec<ReplayFlow>,
    pub newly_allowed: Vec<ReplayFlow>,
    /// Flows whose verdict would not change.
    pub unchanged: u64,
    /// Flows with an end that is not a known device, or denied for reasons a policy does not
    /// decide (quarantine, no lease, spoofing): not judged.
    pub skipped: u64,
}

/// Judges `pairs` by `candidate`.
pub fn replay(candidate: &Policy, dir: &Directory, pairs: &[Pair], now_ms: i64) -> Replayed {
    let compiled = policy::compile(candidate, dir, now_ms);
    let addrs: BTreeMap<DeviceId, [IpAddr; 2]> = dir
        .devices
        .iter()
        .map(|d| (d.id, [IpAddr::V4(d.ipv4), IpAddr::V6(d.ipv6)]))
        .collect();
    let name = |id: DeviceId| -> String {
        dir.devices
            .iter()
            .find(|d| d.id == id)
            .map_or_else(|| id.to_string(), |d| d.hostname.clone())
    };
    let mut out = Replayed::default();
    let mut denied: BTreeMap<(DeviceId, DeviceId, PortUse), ReplayFlow> = BTreeMap::new();
    let mut allowed: BTreeMap<(DeviceId, DeviceId, PortUse), ReplayFlow> = BTreeMap::new();
    for p in pairs {
        let (Some(i), Some(r)) = (p.initiator, p.responder) else {
            out.skipped += 1;
            continue;
        };
        let was = match (p.verdict, p.reason) {
            (FlowVerdict::Allowed, _) => true,
            (FlowVerdict::Denied, Some(DenyCause::NoRule | DenyCause::Expired)) => false,
            (FlowVerdict::Denied, _) => {
                out.skipped += 1;
                continue;
            }
        };
        let would = addrs
            .get(&i)
            .is_some_and(|a| allows(&compiled, r, a, p.proto, p.port, now_ms));
        if was == would {
            out.unchanged += 1;
            continue;
        }
        let map = if was { &mut denied } else { &mut allowed };
        let e = map.entry((i, r, port_of(p))).or_insert_with(|| ReplayFlow {
            initiator: name(i),
            responder: name(r),
            port: port_of(p),
            flows: 0,
            bytes: 0,
            last_seen_ms: p.end_ms,
            confirmed: false,
            rule: None,
        });
        e.flows = e.flows.saturating_add(connections(p));
        e.bytes = e.bytes.saturating_add(bytes(p));
        e.last_seen_ms = e.last_seen_ms.max(p.end_ms);
        e.confirmed |= confirmed(p);
        if was && e.rule.is_none() {
            e.rule.clone_from(&p.rule);
        }
    }
    out.newly_denied = denied.into_values().collect();
    out.newly_allowed = allowed.into_values().collect();
    out
}

/// Whether `dst`'s inbound rules in `c` let one of `src` open `proto`/`port`.
pub fn allows(
    c: &Compiled,
    dst: DeviceId,
    src: &[IpAddr],
    proto: Proto,
    port: u16,
    now_ms: i64,
) -> bool {
    let Some(access) = c.devices.get(&dst) else {
        return false;
    };
    access.inbound.iter().any(|r| {
        r.proto == proto
            && r.sources.iter().any(|s| src.contains(s))
            && (proto == Proto::Icmp || r.ports.iter().any(|x| x.contains(port)))
            && r.not_after_ms.is_none_or(|t| now_ms < t)
    })
}
