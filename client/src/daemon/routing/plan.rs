//! What the host needs for an exit node, as data (no I/O): the `ip` commands that install
//! the default routes into the tunnel and the policy rules that keep Ward's own traffic and
//! the local networks outside it, the commands that undo them, and the difference between
//! what is installed and what is wanted.
//!
//! The design (the wg-quick / Tailscale way): Ward's own sockets (control QUIC and TCP, relay
//! links, the data plane's UDP socket) carry the firewall mark [`EXIT_MARK`]. The default
//! routes go into Ward's routing table [`EXIT_TABLE`], never into `main`, and two rules per
//! family pick it:
//!
//! ```text
//! 5740: from all lookup main suppress_prefixlength 0   (LAN, overlay and other specific routes)
//! 5741: not from all fwmark 0x5741 lookup 22337         (the rest, unmarked: into the tunnel)
//! ```
//!
//! Marked packets skip 5741 and reach `main`'s default route: the coordinator, the relays and
//! the peers' endpoints stay on the underlay. Removing the rules and the table's routes puts
//! the host back exactly as it was.

use serde::{Deserialize, Serialize};

/// The firewall mark on Ward's own sockets ("WA").
pub const EXIT_MARK: u32 = 0x5741;
/// Ward's routing table for the exit node's default routes (the mark's value).
pub const EXIT_TABLE: u32 = 0x5741;
/// Priority of the rule that lets `main`'s specific routes win.
pub const PRIO_SUPPRESS: u32 = 5740;
/// Priority of the rule that sends unmarked traffic to [`EXIT_TABLE`].
pub const PRIO_DIVERT: u32 = 5741;

/// An address family, as `ip -4` / `ip -6` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

/// One piece of host state installed for an exit node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitItem {
    /// `default dev TUN` in [`EXIT_TABLE`].
    Route { family: Family, tun: String },
    /// `lookup main suppress_prefixlength 0` at [`PRIO_SUPPRESS`].
    Suppress { family: Family },
    /// `not fwmark EXIT_MARK lookup EXIT_TABLE` at [`PRIO_DIVERT`].
    Divert { family: Family },
}

impl ExitItem {
    pub fn family(&self) -> Family {
        match self {
            ExitItem::Route { family, .. }
            | ExitItem::Suppress { family }
            | ExitItem::Divert { family } => *family,
        }
    }

    /// The `ip` arguments that install this item.
    pub fn install_args(&self) -> Vec<String> {
        self.args(true)
    }

    /// The `ip` arguments that remove this item (a route by table alone: the TUN may be gone
    /// after a crash, and the table is Ward's).
    pub fn remove_args(&self) -> Vec<String> {
        self.args(false)
    }

    fn args(&self, install: bool) -> Vec<String> {
        let f = self.family().flag();
        let table = EXIT_TABLE.to_string();
        let v: Vec<String> = match self {
            ExitItem::Route { tun, .. } if install => {
                vec![f, "route", "replace", "default", "dev", tun, "table", &table]
                    .into_iter()
                    .map(String::from)
                    .collect()
            }
            ExitItem::Route { .. } => [f, "route", "del", "default", "table", &table]
                .into_iter()
                .map(String::from)
                .collect(),
            ExitItem::Suppress { .. } => {
                let prio = PRIO_SUPPRESS.to_string();
                [
                    f,
                    "rule",
                    if install { "add" } else { "del" },
                    "priority",
                    &prio,
                    "lookup",
                    "main",
                    "suppress_prefixlength",
                    "0",
                ]
                .into_iter()
                .map(String::from)
                .collect()
            }
            ExitItem::Divert { .. } => {
                let prio = PRIO_DIVERT.to_string();
                let mark = format!("{EXIT_MARK:#x}");
                [
                    f,
                    "rule",
                    if install { "add" } else { "del" },
                    "priority",
                    &prio,
                    "not",
                    "fwmark",
                    &mark,
                    "lookup",
                    &table,
                ]
                .into_iter()
                .map(String::from)
                .collect()
            }
        };
        v
    }
}

/// What the host needs while an exit node is chosen (`exit`), in install order: per family
/// the table's default route first, then the rule that keeps specific routes, and the rule
/// that diverts last (so nothing is diverted into an empty table). Both families go into the
/// tunnel whatever the exit node offers: the data plane sends each family only to an exit
/// node that carries its default route and drops the rest, so IPv6 never leaks around an
/// IPv4-only exit node, and nothing leaks while the exit node is missing from the netmap.
pub fn exit_plan(tun: &str, exit: bool) -> Vec<ExitItem> {
    if !exit {
        return Vec::new();
    }
    [Family::V4, Family::V6]
        .into_iter()
        .flat_map(|family| {
            [
                ExitItem::Route {
                    family,
                    tun: tun.to_string(),
                },
                ExitItem::Suppress { family },
                ExitItem::Divert { family },
            ]
        })
        .collect()
}

/// The steps from `installed` to `want`: what to remove (in removal order: the reverse of
/// installation, so the diverting rule goes first) and what to install (in `want`'s order).
pub fn reconcile(installed: &[ExitItem], want: &[ExitItem]) -> (Vec<ExitItem>, Vec<ExitItem>) {
    let remove = installed
        .iter()
        .rev()
        .filter(|i| !want.contains(i))
        .cloned()
        .collect();
    let install = want
        .iter()
        .filter(|i| !installed.contains(i))
        .cloned()
        .collect();
    (remove, install)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(args: Vec<String>) -> String {
        args.join(" ")
    }

    #[test]
    fn no_exit_node_installs_nothing() {
        assert!(exit_plan("ward0", false).is_empty());
    }

    #[test]
    fn an_exit_node_diverts_both_families_after_their_routes() {
        let plan = exit_plan("ward0", true);
        let cmds: Vec<String> = plan.iter().map(|i| joined(i.install_args())).collect();
        assert_eq!(
            cmds,
            [
                "-4 route replace default dev ward0 table 22337",
                "-4 rule add priority 5740 lookup main suppress_prefixlength 0",
                "-4 rule add priority 5741 not fwmark 0x5741 lookup 22337",
                "-6 route replace default dev ward0 table 22337",
                "-6 rule add priority 5740 lookup main suppress_prefixlength 0",
                "-6 rule add priority 5741 not fwmark 0x5741 lookup 22337",
            ]
        );
    }

    #[test]
    fn removal_undoes_each_item_without_needing_the_tun() {
        let plan = exit_plan("ward0", true);
        let cmds: Vec<String> = plan.iter().map(|i| joined(i.remove_args())).collect();
        assert_eq!(cmds[0], "-4 route del default table 22337");
        assert_eq!(
            cmds[1],
            "-4 rule del priority 5740 lookup main suppress_prefixlength 0"
        );
        assert_eq!(
            cmds[2],
            "-4 rule del priority 5741 not fwmark 0x5741 lookup 22337"
        );
        assert!(cmds[3..].iter().all(|c| c.starts_with("-6 ")));
    }

    #[test]
    fn leaving_the_exit_node_removes_the_divert_rule_first() {
        let installed = exit_plan("ward0", true);
        let (remove, install) = reconcile(&installed, &[]);
        assert!(install.is_empty());
        assert_eq!(remove.len(), 6);
        assert_eq!(remove[0], ExitItem::Divert { family: Family::V6 });
        assert_eq!(
            remove[2],
            ExitItem::Route {
                family: Family::V6,
                tun: "ward0".into()
            }
        );
        assert_eq!(remove[3], ExitItem::Divert { family: Family::V4 });
    }

    #[test]
    fn reconciling_installs_only_what_is_missing() {
        let want = exit_plan("ward0", true);
        let (remove, install) = reconcile(&want[..3], &want);
        assert!(remove.is_empty());
        assert_eq!(install, want[3..].to_vec());
        let (remove, install) = reconcile(&want, &want);
        assert!(remove.is_empty() && install.is_empty());
    }

    #[test]
    fn a_new_tun_name_replaces_the_route() {
        let old = exit_plan("ward0", true);
        let new = exit_plan("ward1", true);
        let (remove, install) = reconcile(&old, &new);
        assert_eq!(remove.len(), 2);
        assert!(remove.iter().all(|i| matches!(i, ExitItem::Route { .. })));
        assert_eq!(install.len(), 2);
    }

    #[test]
    fn the_persisted_form_round_trips() {
        let plan = exit_plan("ward0", true);
        let s = serde_json::to_string(&plan).unwrap();
        let back: Vec<ExitItem> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, plan);
    }
}
