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
//! the peers' endpoints stay on the underlay. Replies to them arrive unmarked, and a strict
//! reverse-path filter would look their source up in Ward's table (the TUN) and drop them, so,
//! like wg-quick, the mark is saved in the connection's conntrack entry on the way out and put
//! back on the way in (nftables table `inet ward_exit`), and `src_valid_mark` makes the
//! reverse-path check use it. Removing all of it puts the host back exactly as it was.

use serde::{Deserialize, Serialize};

/// The firewall mark on Ward's own sockets ("WA").
pub const EXIT_MARK: u32 = 0x5741;
/// Ward's routing table for the exit node's default routes (the mark's value).
pub const EXIT_TABLE: u32 = 0x5741;
/// Priority of the rule that lets `main`'s specific routes win.
pub const PRIO_SUPPRESS: u32 = 5740;
/// Priority of the rule that sends unmarked traffic to [`EXIT_TABLE`].
pub const PRIO_DIVERT: u32 = 5741;

/// Ward's nftables table that keeps the mark on replies to Ward's own connections.
pub const CONNMARK_TABLE: &str = "ward_exit";
/// The sysctl that makes the reverse-path filter use a packet's mark.
pub const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

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
    /// The nftables table [`CONNMARK_TABLE`]: the mark saved in conntrack and restored on
    /// replies.
    Connmark,
    /// [`SRC_VALID_MARK`] set to 1 (it was 0; removing sets it back to 0). Where it already
    /// was 1 nothing is installed and nothing is recorded.
    SrcValidMark,
    /// `default dev TUN` in [`EXIT_TABLE`].
    Route { family: Family, tun: String },
    /// `lookup main suppress_prefixlength 0` at [`PRIO_SUPPRESS`].
    Suppress { family: Family },
    /// `not fwmark EXIT_MARK lookup EXIT_TABLE` at [`PRIO_DIVERT`].
    Divert { family: Family },
}

/// A host command, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `ip ARGS`.
    Ip(Vec<String>),
    /// `nft -f -` with this script.
    NftScript(String),
    /// `nft ARGS`.
    Nft(Vec<String>),
    /// Write `value` to the sysctl file `path`.
    Sysctl {
        path: &'static str,
        value: &'static str,
    },
}

impl ExitItem {
    /// The family whose routing this item belongs to (`None`: both or neither).
    pub fn family(&self) -> Option<Family> {
        match self {
            ExitItem::Connmark | ExitItem::SrcValidMark => None,
            ExitItem::Route { family, .. }
            | ExitItem::Suppress { family }
            | ExitItem::Divert { family } => Some(*family),
        }
    }

    /// What installs this item.
    pub fn install(&self) -> Action {
        match self {
            ExitItem::Connmark => {
                let m = format!("{EXIT_MARK:#x}");
                Action::NftScript(format!(
                    "table inet {CONNMARK_TABLE} {{\n\
                     chain premangle {{ type filter hook prerouting priority mangle; policy accept;\n\
                     meta l4proto {{ tcp, udp }} meta mark set ct mark\n}}\n\
                     chain postmangle {{ type filter hook postrouting priority mangle; policy accept;\n\
                     meta l4proto {{ tcp, udp }} meta mark {m} ct mark set meta mark\n}}\n}}\n"
                ))
            }
            ExitItem::SrcValidMark => Action::Sysctl {
                path: SRC_VALID_MARK,
                value: "1",
            },
            _ => Action::Ip(self.ip_args(true)),
        }
    }

    /// What removes this item (a route by table alone: the TUN may be gone after a crash,
    /// and the table is Ward's).
    pub fn remove(&self) -> Action {
        match self {
            ExitItem::Connmark => Action::Nft(
                ["delete", "table", "inet", CONNMARK_TABLE]
                    .into_iter()
                    .map(String::from)
                    .collect(),
            ),
            ExitItem::SrcValidMark => Action::Sysctl {
                path: SRC_VALID_MARK,
                value: "0",
            },
            _ => Action::Ip(self.ip_args(false)),
        }
    }

    fn ip_args(&self, install: bool) -> Vec<String> {
        let table = EXIT_TABLE.to_string();
        let op = if install { "add" } else { "del" };
        let v: Vec<String> = match self {
            ExitItem::Connmark | ExitItem::SrcValidMark => Vec::new(),
            ExitItem::Route { family, tun } if install => [
                family.flag(),
                "route",
                "replace",
                "default",
                "dev",
                tun,
                "table",
                &table,
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            ExitItem::Route { family, .. } => {
                [family.flag(), "route", "del", "default", "table", &table]
                    .into_iter()
                    .map(String::from)
                    .collect()
            }
            ExitItem::Suppress { family } => {
                let prio = PRIO_SUPPRESS.to_string();
                [
                    family.flag(),
                    "rule",
                    op,
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
            ExitItem::Divert { family } => {
                let prio = PRIO_DIVERT.to_string();
                let mark = format!("{EXIT_MARK:#x}");
                [
                    family.flag(),
                    "rule",
                    op,
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

/// What the host needs while an exit node is chosen (`exit`), in install order: the mark
/// kept on replies first, then per family the table's default route, the rule that keeps
/// specific routes, and the rule that diverts last (so nothing is diverted into an empty
/// table). `src_valid_mark_on` says whether the host already has [`SRC_VALID_MARK`] on (then
/// it is left alone). Both families go into the tunnel whatever the exit node offers: the
/// data plane sends each family only to an exit node that carries its default route and
/// drops the rest, so IPv6 never leaks around an IPv4-only exit node, and nothing leaks while
/// the exit node is missing from the netmap.
pub fn exit_plan(tun: &str, exit: bool, src_valid_mark_on: bool) -> Vec<ExitItem> {
    if !exit {
        return Vec::new();
    }
    let mut plan = vec![ExitItem::Connmark];
    if !src_valid_mark_on {
        plan.push(ExitItem::SrcValidMark);
    }
    for family in [Family::V4, Family::V6] {
        plan.push(ExitItem::Route {
            family,
            tun: tun.to_string(),
        });
        plan.push(ExitItem::Suppress { family });
        plan.push(ExitItem::Divert { family });
    }
    plan
}

/// The steps from `installed` to `want`: what to remove (in removal order: the reverse of
/// installation, so the diverting rule goes first) and what to install (in `want`'s order).
/// An item installed stays installed while wanted: `SrcValidMark`, once Ward set it, is not
/// dropped because the host now reads 1.
pub fn reconcile(installed: &[ExitItem], want: &[ExitItem]) -> (Vec<ExitItem>, Vec<ExitItem>) {
    let keep = |i: &ExitItem| {
        want.contains(i) || (*i == ExitItem::SrcValidMark && want.contains(&ExitItem::Connmark))
    };
    let remove = installed
        .iter()
        .rev()
        .filter(|i| !keep(i))
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

    fn shown(a: Action) -> String {
        match a {
            Action::Ip(args) => format!("ip {}", args.join(" ")),
            Action::Nft(args) => format!("nft {}", args.join(" ")),
            Action::NftScript(_) => "nft -f -".to_string(),
            Action::Sysctl { path, value } => format!("{path}={value}"),
        }
    }

    #[test]
    fn no_exit_node_installs_nothing() {
        assert!(exit_plan("ward0", false, false).is_empty());
    }

    #[test]
    fn an_exit_node_keeps_marks_then_diverts_both_families_after_their_routes() {
        let plan = exit_plan("ward0", true, false);
        let cmds: Vec<String> = plan.iter().map(|i| shown(i.install())).collect();
        assert_eq!(
            cmds,
            [
                "nft -f -",
                "/proc/sys/net/ipv4/conf/all/src_valid_mark=1",
                "ip -4 route replace default dev ward0 table 22337",
                "ip -4 rule add priority 5740 lookup main suppress_prefixlength 0",
                "ip -4 rule add priority 5741 not fwmark 0x5741 lookup 22337",
                "ip -6 route replace default dev ward0 table 22337",
                "ip -6 rule add priority 5740 lookup main suppress_prefixlength 0",
                "ip -6 rule add priority 5741 not fwmark 0x5741 lookup 22337",
            ]
        );
        let Action::NftScript(script) = ExitItem::Connmark.install() else {
            panic!("the connmark item is an nft script");
        };
        assert!(script.contains("table inet ward_exit"));
        assert!(script.contains("meta mark set ct mark"));
        assert!(script.contains("meta mark 0x5741 ct mark set meta mark"));
    }

    #[test]
    fn a_host_with_src_valid_mark_on_keeps_it_untouched() {
        let plan = exit_plan("ward0", true, true);
        assert!(!plan.contains(&ExitItem::SrcValidMark));
        assert_eq!(plan.len(), 7);
    }

    #[test]
    fn removal_undoes_each_item_without_needing_the_tun() {
        let plan = exit_plan("ward0", true, false);
        let cmds: Vec<String> = plan.iter().map(|i| shown(i.remove())).collect();
        assert_eq!(cmds[0], "nft delete table inet ward_exit");
        assert_eq!(cmds[1], "/proc/sys/net/ipv4/conf/all/src_valid_mark=0");
        assert_eq!(cmds[2], "ip -4 route del default table 22337");
        assert_eq!(
            cmds[3],
            "ip -4 rule del priority 5740 lookup main suppress_prefixlength 0"
        );
        assert_eq!(
            cmds[4],
            "ip -4 rule del priority 5741 not fwmark 0x5741 lookup 22337"
        );
        assert!(cmds[5..].iter().all(|c| c.starts_with("ip -6 ")));
    }

    #[test]
    fn leaving_the_exit_node_removes_the_divert_rules_first_and_the_marks_last() {
        let installed = exit_plan("ward0", true, false);
        let (remove, install) = reconcile(&installed, &[]);
        assert!(install.is_empty());
        assert_eq!(remove.len(), 8);
        assert_eq!(remove[0], ExitItem::Divert { family: Family::V6 });
        assert_eq!(remove[3], ExitItem::Divert { family: Family::V4 });
        assert_eq!(remove[6], ExitItem::SrcValidMark);
        assert_eq!(remove[7], ExitItem::Connmark);
    }

    #[test]
    fn reconciling_installs_only_what_is_missing() {
        let want = exit_plan("ward0", true, false);
        let (remove, install) = reconcile(&want[..4], &want);
        assert!(remove.is_empty());
        assert_eq!(install, want[4..].to_vec());
        let (remove, install) = reconcile(&want, &want);
        assert!(remove.is_empty() && install.is_empty());
    }

    #[test]
    fn src_valid_mark_set_by_ward_stays_while_the_exit_node_does() {
        let installed = exit_plan("ward0", true, false);
        // The host now reads 1 (Ward set it): the plan leaves it out, nothing is undone.
        let want = exit_plan("ward0", true, true);
        let (remove, install) = reconcile(&installed, &want);
        assert!(remove.is_empty() && install.is_empty());
    }

    #[test]
    fn a_new_tun_name_replaces_the_routes() {
        let old = exit_plan("ward0", true, true);
        let new = exit_plan("ward1", true, true);
        let (remove, install) = reconcile(&old, &new);
        assert_eq!(remove.len(), 2);
        assert!(remove.iter().all(|i| matches!(i, ExitItem::Route { .. })));
        assert_eq!(install.len(), 2);
    }

    #[test]
    fn the_persisted_form_round_trips() {
        let plan = exit_plan("ward0", true, false);
        let s = serde_json::to_string(&plan).unwrap();
        let back: Vec<ExitItem> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, plan);
    }
}
