//! Routed services and route approval: policy + directory + approved routers → who reaches
//! which routed prefix through which router, and what each router lets through.
//!
//! A service with `routes` is reached through a subnet router: for each routed prefix of the
//! service, the live router whose approved routes cover it most specifically (ties: the lowest
//! device id) carries it. Default routes (`0.0.0.0/0`, `::/0`) are carried by every approved
//! exit node; the device picks one (`ward up --exit-node`). A rule that allows a source to
//! reach the service makes the router a peer of the source, tells the source the prefix
//! through that router ([`DeviceAccess::routes`]), and gives the router an inbound rule with
//! `dests` (the routed addresses only, never the router itself).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::compile::{effective_rules, Index};
use super::{Compiled, DirDevice, Directory, Policy, Selector, View};
use crate::filter::{FilterRule, Sources};
use crate::routes::{overlaps_overlay, Prefix};
use crate::wire::DeviceId;

/// A device's approved routes (as the coordinator stores them; an approved exit node holds
/// `0.0.0.0/0` and `::/0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Router {
    pub id: DeviceId,
    pub routes: Vec<Prefix>,
}

/// Adds routed access to `out` (compiled from the same `p` and `d` at `now_ms`): peers, the
/// routers' `dests` rules, and each source's [`DeviceAccess::routes`]. Only live routers carry
/// routes; a route overlapping the overlay pools (`v6_prefix` is the coordinator's ULA /48) is
/// ignored, whatever the store says. Shadow rules are not compiled for routed services.
///
/// [`DeviceAccess::routes`]: super::DeviceAccess::routes
pub fn compile_routes(
    p: &Policy,
    d: &Directory,
    routers: &[Router],
    v6_prefix: std::net::Ipv6Addr,
    now_ms: i64,
    out: &mut Compiled,
) {
    let live: BTreeMap<DeviceId, &DirDevice> = d
        .devices
        .iter()
        .filter(|x| x.live)
        .map(|x| (x.id, x))
        .collect();
    let routers: Vec<(DeviceId, Vec<Prefix>)> = routers
        .iter()
        .filter(|r| live.contains_key(&r.id))
        .map(|r| {
            let ok = r
                .routes
                .iter()
                .copied()
                .filter(|p| p.is_default() || !overlaps_overlay(p, v6_prefix))
                .collect();
            (r.id, ok)
        })
        .collect();
    if routers.is_empty() {
        // Nothing to add, nor to sort again (a dense policy's rules compare their long source
        // lists when sorted: at 10 000 devices that re-sort was most of a compile).
        return;
    }
    // The routers given rules here: only their (shared) rule lists are copied and sorted.
    let mut touched: BTreeSet<DeviceId> = BTreeSet::new();
    let ix = Index::new(p, d);
    for rule in effective_rules(p, d)
        .into_iter()
        .filter(|r| r.mode.in_view(View::Enforced))
    {
        if rule.expires_ms.is_some_and(|t| t <= now_ms) {
            continue;
        }
        if let Some(t) = rule.expires_ms {
            out.next_expiry_ms = Some(out.next_expiry_ms.map_or(t, |n| n.min(t)));
        }
        let mut sources: Vec<usize> = rule
            .from
            .iter()
            .flat_map(|sel| ix.resolve(sel))
            .filter(|i| {
                let dev = &d.devices[*i];
                dev.live && rule.posture.iter().all(|q| dev.posture_passed.contains(*q))
            })
            .collect();
        sources.sort_unstable();
        sources.dedup();
        for svc_name in &rule.to {
            let Some(svc) = p.services.get(*svc_name) else {
                continue;
            };
            if svc.routes.is_empty() {
                continue;
            }
            let srcs: Vec<&DirDevice> = sources
                .iter()
                .map(|i| &d.devices[*i])
                .filter(|dev| svc.remediation || !dev.quarantined)
                .collect();
            if srcs.is_empty() {
                continue;
            }
            for route in &svc.routes {
                for router in carriers(&routers, &route.value) {
                    let sources: Sources = srcs
                        .iter()
                        .filter(|s| s.id != router)
                        .flat_map(|s| [IpAddr::V4(s.ipv4), IpAddr::V6(s.ipv6)])
                        .collect();
                    if sources.is_empty() {
                        continue;
                    }
                    for s in srcs.iter().filter(|s| s.id != router) {
                        if let Some(acc) = out.devices.get_mut(&s.id) {
                            acc.peers.insert(router);
                            acc.routes.entry(router).or_default().push(route.value);
                        }
                    }
                    if let Some(acc) = out.devices.get_mut(&router) {
                        acc.peers
                            .extend(srcs.iter().map(|s| s.id).filter(|x| *x != router));
                        touched.insert(router);
                        for (proto, ports) in svc.ports.by_proto() {
                            Arc::make_mut(&mut acc.inbound).push(FilterRule {
                                rule: rule.name.clone(),
                                service: svc.name.clone(),
                                sources: sources.clone(),
                                source_sets: Vec::new(),
                                proto,
                                ports,
                                not_after_ms: rule.expires_ms,
                                dests: vec![route.value],
                            });
                        }
                    }
                }
            }
        }
    }
    for (id, acc) in out.devices.iter_mut() {
        if touched.contains(id) {
            let inbound = Arc::make_mut(&mut acc.inbound);
            inbound.sort();
            inbound.dedup();
        }
        for v in acc.routes.values_mut() {
            v.sort();
            v.dedup();
        }
    }
}

/// The routers that carry `prefix`: for a default route, every router holding that default
/// route (an exit node); otherwise the one whose approved route covers it most specifically,
/// the lowest id on a tie.
pub fn carriers(routers: &[(DeviceId, Vec<Prefix>)], prefix: &Prefix) -> Vec<DeviceId> {
    if prefix.is_default() {
        return routers
            .iter()
            .filter(|(_, r)| r.contains(prefix))
            .map(|(id, _)| *id)
            .collect();
    }
    let best = routers
        .iter()
        .filter_map(|(id, r)| {
            r.iter()
                .filter(|a| !a.is_default() && a.covers(prefix))
                .map(|a| a.len())
                .max()
                .map(|len| (len, std::cmp::Reverse(*id)))
        })
        .max();
    best.map(|(_, std::cmp::Reverse(id))| vec![id])
        .unwrap_or_default()
}

/// Which of `advertised` the policy's `[auto_approvers]` approve for `dev` (plus the exit-node
/// offer, when `exit_node` is true and `dev` matches `exit_node`). Overlay-overlapping prefixes
/// are never approved.
pub fn auto_approved(
    p: &Policy,
    d: &Directory,
    dev: &DirDevice,
    advertised: &[Prefix],
    exit_node: bool,
    v6_prefix: std::net::Ipv6Addr,
) -> (Vec<Prefix>, bool) {
    let ix = Index::new(p, d);
    let matches =
        |sels: &[super::Located<Selector>]| sels.iter().any(|s| ix.matches_device(&s.value, dev));
    let routes = advertised
        .iter()
        .copied()
        .filter(|a| !a.is_default() && !overlaps_overlay(a, v6_prefix))
        .filter(|a| {
            p.auto_approvers
                .routes
                .iter()
                .any(|(pre, sels)| pre.value.covers(a) && matches(sels))
        })
        .collect();
    let exit = exit_node && matches(&p.auto_approvers.exit_node);
    (routes, exit)
}

/// The answer of [`explain_routed`]: whether `src` may open `proto`/`port` to a routed address,
/// through which router, by which rule, or why not (one line each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedExplanation {
    pub src: String,
    pub dst: IpAddr,
    pub allowed: bool,
    pub lines: Vec<String>,
}

impl std::fmt::Display for RoutedExplanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} → {} (routed): {}",
            self.src,
            self.dst,
            if self.allowed { "allowed" } else { "denied" }
        )?;
        for l in &self.lines {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

/// Explains whether `src` (a hostname, a user, `user:U` or `device:H`) may open
/// `proto`/`port` (`port` ignored for ICMP) to the routed address `dst`, with the same
/// compilation the netmaps come from ([`compile_routes`]), so the answer matches what the
/// routers enforce.
#[allow(clippy::too_many_arguments)]
pub fn explain_routed(
    p: &Policy,
    d: &Directory,
    routers: &[Router],
    v6_prefix: std::net::Ipv6Addr,
    src: &str,
    dst: IpAddr,
    proto: crate::filter::Proto,
    port: u16,
    now_ms: i64,
) -> RoutedExplanation {
    let mut c = super::compile(p, d, now_ms);
    compile_routes(p, d, routers, v6_prefix, now_ms, &mut c);
    let (kind, name) = match src.split_once(':') {
        Some(("device", h)) => ("device", h),
        Some(("user", u)) => ("user", u),
        _ if d.devices.iter().any(|x| x.hostname == src) => ("device", src),
        _ => ("user", src),
    };
    let devs: Vec<&DirDevice> = d
        .devices
        .iter()
        .filter(|x| match kind {
            "device" => x.hostname == name,
            _ => x.user.as_deref() == Some(name),
        })
        .collect();
    let mut out = RoutedExplanation {
        src: src.to_string(),
        dst,
        allowed: false,
        lines: Vec::new(),
    };
    if devs.is_empty() {
        out.lines
            .push(format!("{src} has no devices (default deny)"));
        return out;
    }
    let services: Vec<&str> = p
        .services
        .values()
        .filter(|s| s.routes.iter().any(|r| r.value.contains(dst)))
        .map(|s| s.name.as_str())
        .collect();
    if services.is_empty() {
        out.lines.push(format!(
            "no service routes {dst}: nothing can reach it (default deny)"
        ));
        return out;
    }
    out.lines
        .push(format!("services routing {dst}: {}", services.join(", ")));
    for dev in devs {
        let Some(acc) = c.devices.get(&dev.id) else {
            out.lines
                .push(format!("{}: not live (default deny)", dev.hostname));
            continue;
        };
        let via: Vec<(DeviceId, Prefix)> = acc
            .routes
            .iter()
            .flat_map(|(r, ps)| ps.iter().map(move |p| (*r, *p)))
            .filter(|(_, p)| p.contains(dst))
            .collect();
        if via.is_empty() {
            out.lines.push(format!(
                "{}: no rule gives it a route to {dst} through an approved router (default deny)",
                dev.hostname
            ));
            continue;
        }
        for (router, prefix) in via {
            let rname = d
                .devices
                .iter()
                .find(|x| x.id == router)
                .map_or_else(|| router.to_string(), |x| x.hostname.clone());
            let rules: Vec<&FilterRule> = c
                .devices
                .get(&router)
                .map(|a| {
                    a.inbound
                        .iter()
                        .filter(|r| {
                            r.dests.iter().any(|p| p.contains(dst))
                                && r.sources.contains(&IpAddr::V4(dev.ipv4))
                                && r.proto == proto
                                && (proto == crate::filter::Proto::Icmp
                                    || r.ports.iter().any(|x| x.contains(port)))
                        })
                        .collect()
                })
                .unwrap_or_default();
            if rules.is_empty() {
                out.lines.push(format!(
                    "{}: routed via {rname} ({prefix}), but no rule opens {} there (default deny)",
                    dev.hostname,
                    super::format_ports(proto, &[crate::filter::PortRange { lo: port, hi: port }])
                ));
            } else {
                out.allowed = true;
                let names: Vec<String> = rules
                    .iter()
                    .map(|r| format!("rule {:?} (service {})", r.rule, r.service))
                    .collect();
                out.lines.push(format!(
                    "{}: allowed via router {rname} ({prefix}) by {}",
                    dev.hostname,
                    names.join(", ")
                ));
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::filter::tests::pkt;
    use crate::filter::{Filter, Proto, Verdict};
    use crate::policy::{parse, DirUser};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    const NOW: i64 = 1_800_000_000_000;
    const POLICY: &str = r#"
[services.legacy-db]
routes = ["10.20.5.10/32"]
ports = ["tcp/5432"]

[services.internet]
routes = ["0.0.0.0/0"]
ports = ["tcp/1-65535", "udp/1-65535", "icmp"]

[services.ssh]
devices = ["tag:router"]
ports = ["tcp/22"]

[auto_approvers]
routes = { "10.20.0.0/16" = ["tag:router"] }
exit_node = ["tag:exit"]

[[rules]]
name = "alice-db"
from = ["alice"]
to = ["legacy-db", "ssh"]

[[rules]]
name = "bob-internet"
from = ["bob"]
to = ["internet"]

[[tests]]
from = "alice"
allow = ["legacy-db:5432"]
deny = ["legacy-db:22"]
"#;

    fn dev(id: u64, host: &str, user: Option<&str>, tags: &[&str]) -> DirDevice {
        DirDevice {
            id: DeviceId(id),
            hostname: host.into(),
            user: user.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ipv4: Ipv4Addr::new(100, 64, 0, id as u8),
            ipv6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, id as u16),
            live: true,
            posture_passed: Default::default(),
            posture_failures: Default::default(),
            quarantined: false,
            name_bound: true,
        }
    }

    fn dir() -> Directory {
        let user = |n: &str| DirUser {
            name: n.into(),
            groups: vec![],
            disabled: false,
            suspended: None,
        };
        Directory {
            users: vec![user("alice"), user("bob")],
            devices: vec![
                dev(1, "alice-laptop", Some("alice"), &[]),
                dev(2, "bob-laptop", Some("bob"), &[]),
                dev(3, "router1", None, &["router"]),
                dev(4, "exit1", None, &["exit"]),
            ],
            grants: vec![],
        }
    }

    fn pre(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ula() -> Ipv6Addr {
        "fd00::".parse().unwrap()
    }

    fn routers() -> Vec<Router> {
        vec![
            Router {
                id: DeviceId(3),
                routes: vec![pre("10.20.0.0/16")],
            },
            Router {
                id: DeviceId(4),
                routes: vec![Prefix::V4_DEFAULT, Prefix::V6_DEFAULT],
            },
        ]
    }

    fn compiled(routers: &[Router]) -> Compiled {
        let p = parse(POLICY.as_bytes(), "p.toml").unwrap();
        let d = dir();
        let mut c = super::super::compile(&p, &d, NOW);
        compile_routes(&p, &d, routers, ula(), NOW, &mut c);
        // Routes keep the peer relation symmetric, as the compile does: the registry finds
        // the sessions a device's change concerns from that device's own peers.
        for (id, a) in &c.devices {
            for p in &a.peers.iter().collect::<Vec<_>>() {
                assert!(
                    c.devices.get(p).is_some_and(|b| b.peers.contains(id)),
                    "{id:?} has peer {p:?} but not the other way"
                );
            }
        }
        c
    }

    #[test]
    fn parses_routed_services_and_auto_approvers() {
        let p = parse(POLICY.as_bytes(), "p.toml").unwrap();
        let db = &p.services["legacy-db"];
        assert!(db.devices.is_empty());
        assert_eq!(db.routes[0].value, pre("10.20.5.10/32"));
        assert_eq!(db.routes[0].pos.line, 3);
        assert_eq!(p.auto_approvers.routes.len(), 1);
        assert_eq!(p.auto_approvers.exit_node.len(), 1);
        assert!(super::super::run_tests(&p, &dir(), NOW)
            .iter()
            .all(|t| t.pass));
    }

    #[test]
    fn refuses_bad_routes() {
        for (src, want) in [
            (
                "[services.x]\nroutes = [\"10.20.5.1/16\"]\nports = [\"tcp/1\"]\n",
                "p.toml:2:11: \"10.20.5.1/16\" has host bits set (did you mean 10.20.0.0/16?)",
            ),
            (
                "[services.x]\nports = [\"tcp/1\"]\n",
                "service \"x\" lists no devices and no routes",
            ),
            (
                "[auto_approvers]\nroutes = { \"0.0.0.0/0\" = [\"tag:x\"] }\n",
                "a default route is approved with auto_approvers.exit_node",
            ),
            ("[auto_approvers]\nsubnets = []\n", "unknown field"),
        ] {
            let e = parse(src.as_bytes(), "p.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }

    #[test]
    fn routed_service_compiles_to_router_dest_rules_and_client_routes() {
        let c = compiled(&routers());
        let alice = &c.devices[&DeviceId(1)];
        assert!(alice.peers.contains(&DeviceId(3)));
        assert_eq!(alice.routes[&DeviceId(3)], vec![pre("10.20.5.10/32")]);
        assert!(
            !alice.routes.contains_key(&DeviceId(4)),
            "alice has no exit grant"
        );
        let router = &c.devices[&DeviceId(3)];
        assert!(router.peers.contains(&DeviceId(1)));
        assert!(!router.peers.contains(&DeviceId(2)));
        let routed: Vec<&FilterRule> = router
            .inbound
            .iter()
            .filter(|r| !r.dests.is_empty())
            .collect();
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].dests, vec![pre("10.20.5.10/32")]);
        assert_eq!(routed[0].rule, "alice-db");
        assert!(routed[0]
            .sources
            .contains(&IpAddr::V4(Ipv4Addr::new(100, 64, 0, 1))));
        // The router's own ssh rule stays a device rule.
        assert!(router
            .inbound
            .iter()
            .any(|r| r.service == "ssh" && r.dests.is_empty()));
        // bob gets the exit node's default route; the exit node a default-route rule.
        let bob = &c.devices[&DeviceId(2)];
        assert_eq!(bob.routes[&DeviceId(4)], vec![Prefix::V4_DEFAULT]);
        let exit = &c.devices[&DeviceId(4)];
        assert!(exit
            .inbound
            .iter()
            .all(|r| r.dests == vec![Prefix::V4_DEFAULT]));
        assert!(!exit.inbound.is_empty());
    }

    #[test]
    fn unapproved_or_overlay_routes_carry_nothing() {
        let c = compiled(&[]);
        assert!(c.devices[&DeviceId(1)].routes.is_empty());
        assert!(!c.devices[&DeviceId(2)].peers.contains(&DeviceId(4)));
        let bad = vec![Router {
            id: DeviceId(3),
            routes: vec![pre("0.0.0.0/1")], // covers the overlay's 100.64.0.0/10
        }];
        let c = compiled(&bad);
        assert!(c.devices[&DeviceId(1)].routes.is_empty());
        assert!(c.devices[&DeviceId(3)]
            .inbound
            .iter()
            .all(|r| r.dests.is_empty()));
    }

    #[test]
    fn most_specific_router_carries_a_prefix() {
        let r = vec![
            (DeviceId(7), vec![pre("10.0.0.0/8")]),
            (DeviceId(9), vec![pre("10.20.0.0/16")]),
            (DeviceId(8), vec![pre("10.20.0.0/16")]),
        ];
        assert_eq!(carriers(&r, &pre("10.20.5.10/32")), vec![DeviceId(8)]);
        assert_eq!(carriers(&r, &pre("10.30.0.1/32")), vec![DeviceId(7)]);
        assert!(carriers(&r, &pre("192.168.0.0/24")).is_empty());
        assert!(carriers(&r, &Prefix::V4_DEFAULT).is_empty());
    }

    #[test]
    fn auto_approval_by_tag() {
        let p = parse(POLICY.as_bytes(), "p.toml").unwrap();
        let d = dir();
        let adv = [
            pre("10.20.0.0/16"),
            pre("10.30.0.0/16"),
            pre("100.64.0.0/24"),
        ];
        let (r, exit) = auto_approved(&p, &d, &d.devices[2], &adv, true, ula());
        assert_eq!(r, vec![pre("10.20.0.0/16")]);
        assert!(!exit, "router1 is not tagged exit");
        let (r, exit) = auto_approved(&p, &d, &d.devices[3], &adv, true, ula());
        assert!(r.is_empty());
        assert!(exit);
        let (r, exit) = auto_approved(&p, &d, &d.devices[0], &adv, true, ula());
        assert!(r.is_empty() && !exit);
    }

    #[test]
    fn explains_routed_destinations() {
        let p = parse(POLICY.as_bytes(), "p.toml").unwrap();
        let d = dir();
        let dst: IpAddr = "10.20.5.10".parse().unwrap();
        let e = explain_routed(
            &p,
            &d,
            &routers(),
            ula(),
            "alice",
            dst,
            Proto::Tcp,
            5432,
            NOW,
        );
        assert!(e.allowed, "{e}");
        assert!(
            e.to_string()
                .contains("via router router1 (10.20.5.10/32) by rule \"alice-db\""),
            "{e}"
        );
        let e = explain_routed(&p, &d, &routers(), ula(), "alice", dst, Proto::Tcp, 22, NOW);
        assert!(!e.allowed);
        assert!(e.to_string().contains("no rule opens tcp/22"), "{e}");
        let e = explain_routed(&p, &d, &routers(), ula(), "bob", dst, Proto::Tcp, 5432, NOW);
        assert!(e.allowed, "bob may use the exit node: {e}");
        assert!(
            e.to_string().contains("via router exit1 (0.0.0.0/0)"),
            "{e}"
        );
        assert!(!e.to_string().contains("router1"), "{e}");
        let e = explain_routed(&p, &d, &[], ula(), "alice", dst, Proto::Tcp, 5432, NOW);
        assert!(!e.allowed);
        assert!(e.to_string().contains("through an approved router"), "{e}");
    }

    #[test]
    fn router_filter_opens_routed_destinations_only() {
        let c = compiled(&routers());
        let mut f = Filter::new(1024);
        f.set_rules(c.devices[&DeviceId(3)].inbound.to_vec());
        f.set_routed(vec![pre("10.20.0.0/16")]);
        let now = Instant::now();
        let alice = "100.64.0.1";
        let bob = "100.64.0.2";
        let router = "100.64.0.3";
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let tcp =
            |src: &str, dst: &str, port: u16| pkt::tcp(ip(src), 40000, ip(dst), port, pkt::SYN);
        assert_eq!(
            f.check_inbound(&tcp(alice, "10.20.5.10", 5432), now, NOW),
            Verdict::Allow
        );
        // Denied port, another routed host, another device.
        assert!(matches!(
            f.check_inbound(&tcp(alice, "10.20.5.10", 22), now, NOW),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            f.check_inbound(&tcp(alice, "10.20.5.11", 5432), now, NOW),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            f.check_inbound(&tcp(bob, "10.20.5.10", 5432), now, NOW),
            Verdict::Deny(_)
        ));
        // The router's own ssh rule opens the router, never a routed address.
        assert_eq!(
            f.check_inbound(&tcp(alice, router, 22), now, NOW),
            Verdict::Allow
        );
        assert!(matches!(
            f.check_inbound(&tcp(alice, "10.20.7.7", 22), now, NOW),
            Verdict::Deny(_)
        ));
        // Revoking the route's rules cuts the open flow.
        f.set_rules(Vec::new());
        assert!(matches!(
            f.check_inbound(
                &pkt::tcp(ip(alice), 40000, ip("10.20.5.10"), 5432, pkt::ACK),
                now,
                NOW
            ),
            Verdict::Deny(_)
        ));
    }
}
