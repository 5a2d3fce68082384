//! `flows` and `flows top`: both ends' flow records, paired ([`crate::flows`]), filtered by
//! selectors, with what each device's reports say about their own delivery (gaps, drops).

use anyhow::{bail, Result};
use std::collections::{BTreeMap, BTreeSet};

use ward_shared::flows::{FlowVerdict, ShadowVerdict};
use ward_shared::wire::DeviceId;

use super::api::{FlowSourceView, FlowSummary, FlowView, FlowsTopView, FlowsView};
use crate::flows::{pair, top, Pair, PairStatus, Tolerance, TopBy};
use crate::model::{Device, User};
use crate::store::{FlowQuery, Store};

/// Most stored records one request reads (newest windows first).
const MAX_ROWS: usize = 200_000;

/// What `flows` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowFilter {
    /// Initiators matching this selector only.
    #[serde(default)]
    pub from: Option<String>,
    /// Responders matching this selector only.
    #[serde(default)]
    pub to: Option<String>,
    /// Denied flows only.
    #[serde(default)]
    pub denied: bool,
    /// Flows seen by one end only.
    #[serde(default)]
    pub one_sided: bool,
    /// Flows the rule or grant NAME allowed.
    #[serde(default)]
    pub rule: Option<String>,
    /// Flows whose candidate verdict (shadow rules) is this one only.
    #[serde(default)]
    pub shadow: Option<ShadowVerdict>,
    /// Windows that ended in the last this many seconds.
    pub since_secs: u64,
    /// Most flows listed (newest first).
    pub limit: usize,
}

/// `flows`: the pairs the filter selects, newest last, with the summary of all pairs in the
/// period and every device's delivery counters.
pub fn flows(store: &dyn Store, f: &FlowFilter, now: i64) -> Result<FlowsView> {
    let (pairs, names) = paired(store, f, now)?;
    let mut summary = FlowSummary::default();
    for p in &pairs {
        match p.status {
            PairStatus::Paired => summary.paired += 1,
            PairStatus::Mismatch => summary.mismatch += 1,
            PairStatus::OneSided => summary.one_sided += 1,
            PairStatus::Pending => summary.pending += 1,
            PairStatus::Denied => summary.denied += 1,
        }
    }
    let sources: Vec<FlowSourceView> = store
        .flow_sources()?
        .into_iter()
        .map(|s| {
            summary.missing_seqs += s.missing_seqs;
            summary.dropped_records += s.dropped_records;
            summary.refused_records += s.refused_records;
            let name = names
                .get(&s.device)
                .cloned()
                .unwrap_or_else(|| s.device.to_string());
            FlowSourceView::new(s, name)
        })
        .collect();
    let mut flows: Vec<FlowView> = pairs
        .iter()
        .filter(|p| !f.denied || p.verdict == FlowVerdict::Denied)
        .filter(|p| !f.one_sided || p.status == PairStatus::OneSided)
        .filter(|p| f.rule.is_none() || p.rule == f.rule)
        .filter(|p| f.shadow.is_none() || p.shadow == f.shadow)
        .map(|p| view(p, &names))
        .collect();
    let extra = flows.len().saturating_sub(f.limit.max(1));
    flows.drain(..extra);
    Ok(FlowsView {
        flows,
        summary,
        sources,
    })
}

/// `flows top`: (initiator, responder, proto, port) ranked by `by`.
pub fn flows_top(
    store: &dyn Store,
    f: &FlowFilter,
    by: TopBy,
    now: i64,
) -> Result<Vec<FlowsTopView>> {
    let (pairs, names) = paired(store, f, now)?;
    let pairs: Vec<Pair> = pairs
        .into_iter()
        .filter(|p| f.rule.is_none() || p.rule == f.rule)
        .collect();
    Ok(top(&pairs, by, f.limit.max(1))
        .into_iter()
        .map(|t| FlowsTopView {
            initiator: end_name(t.initiator, t.unknown_addr, &names),
            responder: end_name(t.responder, t.unknown_addr, &names),
            proto: t.proto,
            port: t.port,
            bytes: t.bytes,
            flows: t.flows,
            denied: t.denied,
            spans: t.spans,
        })
        .collect())
}

/// The pairs in the period whose ends match the selectors, and every device's name.
fn paired(
    store: &dyn Store,
    f: &FlowFilter,
    now: i64,
) -> Result<(Vec<Pair>, BTreeMap<DeviceId, String>)> {
    let devices = store.list_devices()?;
    let users = store.list_users()?;
    let from = f
        .from
        .as_deref()
        .map(|s| select(s, &devices, &users))
        .transpose()?;
    let to =
        f.to.as_deref()
            .map(|s| select(s, &devices, &users))
            .transpose()?;
    let involving = match (&from, &to) {
        (None, None) => None,
        (a, b) => Some(
            a.iter()
                .chain(b.iter())
                .flatten()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        ),
    };
    let since_ms = now.saturating_sub(
        i64::try_from(f.since_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000),
    );
    let rows = store.flows(&FlowQuery {
        since_ms,
        involving,
        limit: MAX_ROWS,
    })?;
    let pairs = pair(&rows, &Tolerance::default(), now)
        .into_iter()
        .filter(|p| {
            from.as_ref()
                .is_none_or(|s| p.initiator.is_some_and(|d| s.contains(&d)))
        })
        .filter(|p| {
            to.as_ref()
                .is_none_or(|s| p.responder.is_some_and(|d| s.contains(&d)))
        })
        .collect();
    let names = devices
        .iter()
        .map(|d| (d.id, d.hostname.to_string()))
        .collect();
    Ok((pairs, names))
}

/// The devices a selector names: `NAME` (a device's hostname, else a user), `user:NAME`,
/// `group:NAME`, `tag:NAME`, `device:NAME`. A selector that names nothing is an error.
pub fn select(sel: &str, devices: &[Device], users: &[User]) -> Result<BTreeSet<DeviceId>> {
    let of_users = |names: &BTreeSet<&str>| -> BTreeSet<DeviceId> {
        devices
            .iter()
            .filter(|d| d.user.as_deref().is_some_and(|u| names.contains(u)))
            .map(|d| d.id)
            .collect()
    };
    let out: BTreeSet<DeviceId> = if let Some(g) = sel.strip_prefix("group:") {
        let names = users
            .iter()
            .filter(|u| u.groups.iter().any(|x| x.as_str() == g))
            .map(|u| u.name.as_str())
            .collect();
        of_users(&names)
    } else if let Some(t) = sel.strip_prefix("tag:") {
        devices
            .iter()
            .filter(|d| d.tags.iter().any(|x| x.as_str() == t))
            .map(|d| d.id)
            .collect()
    } else if let Some(h) = sel.strip_prefix("device:") {
        devices
            .iter()
            .filter(|d| d.hostname.as_str() == h)
            .map(|d| d.id)
            .collect()
    } else if let Some(u) = sel.strip_prefix("user:") {
        of_users(&BTreeSet::from([u]))
    } else {
        let by_host: BTreeSet<DeviceId> = devices
            .iter()
            .filter(|d| d.hostname.as_str() == sel)
            .map(|d| d.id)
            .collect();
        if by_host.is_empty() {
            of_users(&BTreeSet::from([sel]))
        } else {
            by_host
        }
    };
    if out.is_empty() {
        bail!(
            "{sel:?} selects no device (a device or user name, user:NAME, group:NAME, tag:NAME or \
             device:NAME)"
        );
    }
    Ok(out)
}

fn end_name(
    id: Option<DeviceId>,
    addr: Option<std::net::IpAddr>,
    names: &BTreeMap<DeviceId, String>,
) -> String {
    match (id, addr) {
        (Some(d), _) => names.get(&d).cloned().unwrap_or_else(|| d.to_string()),
        (None, Some(a)) => a.to_string(),
        (None, None) => "-".into(),
    }
}

fn view(p: &Pair, names: &BTreeMap<DeviceId, String>) -> FlowView {
    FlowView {
        initiator: end_name(p.initiator, p.unknown_addr, names),
        responder: end_name(p.responder, p.unknown_addr, names),
        initiator_id: p.initiator.map(|d| d.to_string()),
        responder_id: p.responder.map(|d| d.to_string()),
        proto: p.proto,
        port: p.port,
        start_ms: p.start_ms,
        end_ms: p.end_ms,
        verdict: p.verdict,
        rule: p.rule.clone(),
        reason: p.reason,
        policy_version: p.policy_version,
        status: p.status,
        initiator_user: p.initiator_user.clone(),
        initiator_tags: p.initiator_tags.clone(),
        responder_user: p.responder_user.clone(),
        responder_tags: p.responder_tags.clone(),
        initiator_counts: p.initiator_counts,
        responder_counts: p.responder_counts,
        disagree: p.disagree.clone(),
        shadow: p.shadow,
    }
}
