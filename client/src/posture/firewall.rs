//! Host firewall: is there an input chain that denies by default?
//!
//! "Denies by default" means a filter chain on the input hook (IPv4, IPv6 or both) whose
//! policy is drop, or that has an unconditional `drop`/`reject` rule (firewalld ends its input
//! chain with `reject with icmpx admin-prohibited` under an accept policy; old RHEL ends
//! INPUT with `-j REJECT`): whatever earlier rules do not accept is then refused. In nftables
//! an accept in one base chain does not stop the next one, so any such chain is enough.
//! `nft list ruleset`, `iptables-save` and `iptables-legacy-save` are read (iptables-legacy
//! rules are invisible to nft); the firewall is active if any shows such a chain.

use super::run::{Limits, RunError, Runner};
use super::COMMAND_TIMEOUT;

/// Largest ruleset read (large Kubernetes nodes have rulesets of several MiB).
const MAX_RULESET: usize = 16 * 1024 * 1024;

/// Whether `nft list ruleset` output has a default-deny input chain: a chain of
/// `type filter hook input` in an `ip`, `ip6` or `inet` table with `policy drop`, or with an
/// unconditional `drop` or `reject` rule (counters and comments allowed). iptables-nft tables
/// appear here too (`table ip filter { chain INPUT { type filter hook input … policy drop; } }`).
/// Anything it does not understand counts as not denying (fail closed).
pub fn firewall_from_nft(text: &str) -> bool {
    let mut depth = 0usize;
    let mut family_ok = false;
    // Inside a chain: (is an input filter base chain, denies).
    let mut chain: Option<(bool, bool)> = None;
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let unquoted = strip_quoted(line);
        if depth == 0 {
            if let Some(rest) = line.strip_prefix("table ") {
                family_ok = matches!(rest.split_whitespace().next(), Some("ip" | "ip6" | "inet"));
            }
        } else if depth == 1 && line.starts_with("chain ") {
            chain = Some((false, false));
        } else if depth == 2 {
            if let Some((input, denies)) = chain.as_mut() {
                if line.starts_with("type ") {
                    let (hook_input, drop_policy) = base_chain(&unquoted);
                    *input = hook_input;
                    *denies |= drop_policy;
                } else if nft_rule_denies_all(&unquoted) {
                    *denies = true;
                }
            }
        }
        let opens = unquoted.matches('{').count();
        let closes = unquoted.matches('}').count();
        depth = (depth + opens).saturating_sub(closes);
        if depth <= 1 {
            if let Some((input, denies)) = chain.take() {
                if family_ok && input && denies {
                    return true;
                }
            }
        }
    }
    false
}

/// Whether `iptables-save` output has a default-deny INPUT chain in the `filter` table:
/// `:INPUT DROP`, or an unconditional `-A INPUT -j DROP` / `-j REJECT …` rule.
pub fn firewall_from_iptables_save(text: &str) -> bool {
    let mut table = "";
    for raw in text.lines() {
        let line = raw.trim();
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            continue;
        }
        if table != "filter" {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [":INPUT", "DROP", ..] => return true,
            ["-A", "INPUT", "-j", "DROP" | "REJECT"]
            | ["-A", "INPUT", "-j", "REJECT", "--reject-with", _] => return true,
            _ => {}
        }
    }
    false
}

/// Reads the firewall state from `nft list ruleset`, then `iptables-save`, then
/// `iptables-legacy-save` (rules of the legacy backend are invisible to the other two), until
/// one shows a default-deny input chain. `false` needs at least one source read.
pub(crate) fn read_firewall(runner: &Runner) -> Result<bool, String> {
    type Parse = fn(&str) -> bool;
    let limits = Limits {
        timeout: COMMAND_TIMEOUT,
        max_stdout: MAX_RULESET,
    };
    let sources: [(&str, &[&str], Parse); 3] = [
        ("nft", &["list", "ruleset"], firewall_from_nft),
        ("iptables-save", &[], firewall_from_iptables_save),
        ("iptables-legacy-save", &[], firewall_from_iptables_save),
    ];
    let mut read_one = false;
    let mut errors = Vec::new();
    for (program, args, parse) in sources {
        match runner.tool(program, args, None, limits) {
            Ok(out) => {
                if parse(&String::from_utf8_lossy(&out)) {
                    return Ok(true);
                }
                read_one = true;
            }
            Err(RunError::NotFound) => {}
            Err(e) => errors.push(format!("{program}: {e}")),
        }
    }
    if read_one {
        Ok(false)
    } else if errors.is_empty() {
        Err("nft and iptables-save not found".to_string())
    } else {
        Err(errors.join("; "))
    }
}

/// `type filter hook input priority filter; policy drop;` → (input filter hook, drop policy).
fn base_chain(line: &str) -> (bool, bool) {
    let mut input = false;
    let mut drop = false;
    for part in line.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        match words.as_slice() {
            ["type", "filter", "hook", "input", ..] => input = true,
            ["policy", "drop"] => drop = true,
            _ => {}
        }
    }
    (input, drop)
}

/// An nft rule that refuses every packet reaching it: `drop` or `reject …`, possibly after a
/// counter. Quoted text has been blanked out already (see [`strip_quoted`]).
fn nft_rule_denies_all(line: &str) -> bool {
    let mut words: Vec<&str> = line.split_whitespace().collect();
    // A trailing `comment ""` (its text blanked).
    if let [.., "comment", q] = words.as_slice() {
        if q.starts_with('"') {
            words.truncate(words.len() - 2);
        }
    }
    let rest: &[&str] = match words.as_slice() {
        ["counter", "packets", _, "bytes", _, rest @ ..] => rest,
        ["counter", rest @ ..] => rest,
        rest => rest,
    };
    matches!(rest, ["drop"] | ["reject", ..])
}

/// The line with the text inside double quotes removed (`comment "a {b}"` → `comment ""`), so
/// braces and words in comments and interface names do not count.
fn strip_quoted(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut quoted = false;
    for c in line.chars() {
        if c == '"' {
            quoted = !quoted;
            out.push(c);
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_fixtures() {
        let cases = [
            (include_str!("fixtures/nft/default-accept.txt"), false),
            (include_str!("fixtures/nft/input-drop.txt"), true),
            (include_str!("fixtures/nft/empty.txt"), false),
            (
                include_str!("fixtures/nft/iptables-nft-input-drop.txt"),
                true,
            ),
            (include_str!("fixtures/nft/firewalld-reject.txt"), true),
            (include_str!("fixtures/nft/output-drop-only.txt"), false),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            assert_eq!(firewall_from_nft(text), want, "case {i}");
        }
    }

    #[test]
    fn nft_edge_cases() {
        // A drop policy on a nat or netdev chain, a drop rule on some traffic only, braces in
        // comments and a bridge table are not a host firewall.
        let not = [
            "table ip nat {\n\tchain INPUT {\n\t\ttype nat hook input priority 100; policy drop;\n\t}\n}\n",
            "table inet f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 22 drop\n\t\tiifname \"eth0\" reject\n\t}\n}\n",
            "table inet f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\tiifname \"x}}\" accept comment \"drop {\"\n\t}\n}\n",
            "table bridge f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy drop;\n\t}\n}\n",
            "table inet f {\n\tchain helper {\n\t\tdrop\n\t}\n}\n",
            "garbage { { {\n",
        ];
        for t in not {
            assert!(!firewall_from_nft(t), "{t}");
        }
        let yes = [
            "table ip6 f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy drop;\n\t}\n}\n",
            "table inet f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\tcounter packets 12 bytes 3400 drop comment \"the end {x}\"\n\t}\n}\n",
            "table inet f {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\treject\n\t}\n}\n",
            // A second table after an accepting one.
            "table inet a {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t}\n}\ntable ip b {\n\tchain INPUT {\n\t\ttype filter hook input priority 0; policy drop;\n\t}\n}\n",
        ];
        for t in yes {
            assert!(firewall_from_nft(t), "{t}");
        }
    }

    #[test]
    fn iptables_save_fixtures() {
        let cases = [
            (include_str!("fixtures/iptables/input-drop.txt"), true),
            (include_str!("fixtures/iptables/input-accept.txt"), false),
            (include_str!("fixtures/iptables/reject-last-rule.txt"), true),
            (
                include_str!("fixtures/iptables/reject-first-rule.txt"),
                true,
            ),
            (include_str!("fixtures/iptables/empty.txt"), false),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            assert_eq!(firewall_from_iptables_save(text), want, "case {i}");
        }
    }

    #[test]
    fn iptables_save_edge_cases() {
        let not = [
            // INPUT in the nat table.
            "*nat\n:INPUT DROP [0:0]\nCOMMIT\n",
            // Conditional drops.
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i eth0 -j DROP\n-A INPUT -p tcp -j REJECT\nCOMMIT\n",
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP --something\nCOMMIT\n",
            ":INPUT DROP [0:0]\n",
        ];
        for t in not {
            assert!(!firewall_from_iptables_save(t), "{t}");
        }
        assert!(firewall_from_iptables_save(
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n"
        ));
        assert!(firewall_from_iptables_save(
            "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n"
        ));
    }

    fn root_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join(crate::posture::run::FIXTURE_DIR);
        std::fs::create_dir_all(&fx).unwrap();
        for (name, text) in files {
            std::fs::write(fx.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn reading_combines_nft_and_iptables() {
        let drop = include_str!("fixtures/nft/input-drop.txt");
        let accept = include_str!("fixtures/nft/default-accept.txt");
        let ipt_drop = include_str!("fixtures/iptables/input-drop.txt");
        let ipt_accept = include_str!("fixtures/iptables/input-accept.txt");

        let r = root_with(&[]);
        assert_eq!(
            read_firewall(&Runner::new(r.path())).unwrap_err(),
            "nft and iptables-save not found"
        );
        let r = root_with(&[("nft list ruleset", drop)]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(true));
        let r = root_with(&[("nft list ruleset", accept)]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(false));
        // iptables-legacy rules are not in nft's view.
        let r = root_with(&[("nft list ruleset", accept), ("iptables-save", ipt_drop)]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(true));
        let r = root_with(&[("iptables-save", ipt_accept)]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(false));
        let r = root_with(&[("iptables-save", ipt_drop)]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(true));
        let r = root_with(&[
            ("nft list ruleset", accept),
            ("iptables-save", ipt_accept),
            ("iptables-legacy-save", ipt_drop),
        ]);
        assert_eq!(read_firewall(&Runner::new(r.path())), Ok(true));
    }
}
