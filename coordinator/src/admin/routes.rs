//! `device routes NAME [--approve P…] [--revoke P…]`: a device's routed prefixes, what it
//! advertises, what an administrator approved, and what it forwards now.

use anyhow::{anyhow, bail, Result};
use ward_shared::policy;
use ward_shared::routes::{overlaps_overlay, Prefix};

use super::api::{DeviceRoutesView, RouteView};
use super::ops::{Live, Notice, Snapshot};
use crate::store::Store;

/// Parses `--approve`/`--revoke` values: prefixes, or `exit` for both default routes (an
/// exit node). A prefix overlapping the overlay pools is refused for approval.
pub fn parse_prefixes(
    v: &[String],
    v6: std::net::Ipv6Addr,
    approving: bool,
) -> Result<Vec<Prefix>> {
    let mut out = Vec::new();
    for s in v {
        if s == "exit" {
            out.extend([Prefix::V4_DEFAULT, Prefix::V6_DEFAULT]);
            continue;
        }
        let p: Prefix = s.parse().map_err(|e| anyhow!("{e}"))?;
        if approving && p.is_default() {
            bail!("approve an exit node with `--approve exit`, not {p}");
        }
        if approving && overlaps_overlay(&p, v6) {
            bail!("{p} overlaps the overlay address pools; it can never be approved");
        }
        out.push(p);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Approves/revokes (audited, pushed to the registry) and lists the device's routes.
#[allow(clippy::too_many_arguments)]
pub fn device_routes(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    v6: std::net::Ipv6Addr,
    name: &str,
    approve: &[String],
    revoke: &[String],
    actor: &str,
    now: i64,
) -> Result<DeviceRoutesView> {
    let dev = store.device_by_name(name)?;
    let approve = parse_prefixes(approve, v6, true)?;
    let revoke = parse_prefixes(revoke, v6, false)?;
    if !approve.is_empty() || !revoke.is_empty() {
        store.approve_routes(dev.id, name, &approve, &revoke, actor, now)?;
        live.notify(Notice::Routes(store.device_routes()?));
        tracing::info!(device = %dev.id, approved = approve.len(), revoked = revoke.len(), "device routes changed");
    }
    let rows: Vec<_> = store
        .device_routes()?
        .into_iter()
        .filter(|r| r.device == dev.id)
        .collect();
    let advertised: Vec<Prefix> = rows
        .iter()
        .filter(|r| r.advertised)
        .map(|r| r.prefix)
        .collect();
    let exit_offered = advertised.iter().any(Prefix::is_default);
    let (auto, auto_exit) = match (
        &snap.policy,
        snap.directory.devices.iter().find(|d| d.id == dev.id),
    ) {
        (Some(p), Some(d)) => {
            policy::auto_approved(p, &snap.directory, d, &advertised, exit_offered, v6)
        }
        _ => (Vec::new(), false),
    };
    let routes = rows
        .iter()
        .map(|r| {
            let by_policy = auto.contains(&r.prefix) || (r.prefix.is_default() && auto_exit);
            let allowed = r.prefix.is_default() || !overlaps_overlay(&r.prefix, v6);
            RouteView {
                prefix: r.prefix.to_string(),
                advertised: r.advertised,
                approved: r.approved,
                auto_approved: by_policy,
                active: r.advertised && (r.approved || by_policy) && allowed,
            }
        })
        .collect();
    Ok(DeviceRoutesView {
        device: dev.hostname.to_string(),
        routes,
    })
}
