//! The candidate policy `policy suggest --write FILE` writes: the policy text in force with the
//! writable suggestions applied, and generated `[[tests]]` pinning the observed flows.
//!
//! The original text is kept block by block (a block is a table header and the lines up to the
//! next header). A rule or service a suggestion changes is written anew in place of its block
//! (comments inside that block are lost); removed rules leave a comment; new services and rules
//! and the tests are appended. Grants are not in the file: an unused grant becomes a comment
//! naming the command that removes it.
//!
//! In shadow mode the enforced policy is left as it is: new and narrowed rules are added with
//! `shadow = true` (evaluated on live traffic, not enforced), and the rules they replace or
//! expire get `shadow_remove = true` (still enforced, absent from the candidate view).
//!
//! The generated tests are checked against the candidate (allow: a service on the responder
//! that opens the port; deny: one that lists the responder) and only those that hold are
//! written, so `policy check` accepts the file. A used flow the candidate would deny gets no
//! allow test; `policy replay` lists it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use ward_shared::filter::Proto;
use ward_shared::flows::FlowVerdict;
use ward_shared::policy::{
    self, Directory, Located, Policy, PolicyTest, Pos, Rule, Service, Target, TestSource,
};
use ward_shared::wire::DeviceId;

use super::{confirmed, no_rule_denial, port_of, Change, Index, PortUse, Suggestion};
use crate::flows::Pair;

/// Most generated test expectations (allow and deny together).
pub const MAX_GENERATED_TESTS: usize = 1000;

/// Enforced changes, or shadow rules beside the enforced policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Shadow,
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Written {
    pub text: String,
    /// IDs of the suggestions applied.
    pub applied: Vec<String>,
    pub allow_tests: usize,
    pub deny_tests: usize,
    /// Observed flows no generated test could pin (no service describes them, or the candidate
    /// denies a used flow).
    pub unpinned: usize,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("the policy text cannot be rewritten: {0}")]
    Layout(String),
    #[error("the candidate does not parse ({0}); this is a bug in `policy suggest`")]
    Candidate(String),
}

/// Builds the candidate from the policy `text` (which parsed to `p`) and the suggestions.
pub fn candidate(
    text: &str,
    p: &Policy,
    dir: &Directory,
    pairs: &[Pair],
    suggestions: &[Suggestion],
    mode: Mode,
    now_ms: i64,
) -> Result<Written, WriteError> {
    let mut blocks = split(text);
    let rule_blocks = blocks.iter().filter(|b| b.kind == BlockKind::Rule).count();
    if rule_blocks != p.rules.len() {
        return Err(WriteError::Layout(format!(
            "found {rule_blocks} [[rules]] headers for {} rules (rules written as inline tables are not supported)",
            p.rules.len()
        )));
    }
    let service_blocks: BTreeSet<&str> = blocks
        .iter()
        .filter_map(|b| match &b.kind {
            BlockKind::Service(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    if let Some(n) = p
        .services
        .keys()
        .find(|n| !service_blocks.contains(n.as_str()))
    {
        return Err(WriteError::Layout(format!(
            "service {n:?} has no [services.{n}] header (services written inline are not supported)"
        )));
    }
    let mut rules: Vec<RuleEdit> = p.rules.iter().map(RuleEdit::of).collect();
    let mut services: BTreeMap<String, ServiceEdit> = p
        .services
        .iter()
        .map(|(n, s)| (n.clone(), ServiceEdit::of(s)))
        .collect();
    let mut added = String::new();
    let mut out = Written::default();
    for s in suggestions.iter().filter(|s| s.writable()) {
        match &s.change {
            Change::AddRule {
                rule,
                from,
                service,
                devices,
                ports,
            } => {
                let svc = unique(service, &services);
                let se = ServiceEdit {
                    devices: devices.clone(),
                    ports: ports.iter().map(|u| u.to_string()).collect(),
                    remediation: false,
                    changed: true,
                };
                let re = RuleEdit {
                    name: rule.clone(),
                    from: from.clone(),
                    to: vec![svc.clone()],
                    posture: vec![],
                    expires_ms: None,
                    changed: true,
                    remove: false,
                };
                let _ = writeln!(
                    added,
                    "\n# Added by `policy suggest` ({}): {}",
                    s.id, s.summary
                );
                added.push_str(&service_text(&svc, &se));
                added.push_str(&rule_text(&re, (mode == Mode::Shadow).then_some("shadow")));
                services.insert(svc, se);
            }
            Change::NarrowPorts { service, ports } => {
                let Some(se) = services.get_mut(service) else {
                    continue;
                };
                se.ports = ports.iter().map(|u| u.to_string()).collect();
                se.changed = true;
            }
            Change::NarrowDevices { service, devices } => {
                let Some(se) = services.get_mut(service) else {
                    continue;
                };
                se.devices = devices.clone();
                se.changed = true;
            }
            Change::NarrowFrom {
                rule_index, from, ..
            } => {
                let Some(re) = rules.get_mut(*rule_index) else {
                    continue;
                };
                re.from = from.clone();
                re.changed = true;
            }
            Change::ExpireRule { rule_index, .. } => {
                let Some(re) = rules.get_mut(*rule_index) else {
                    continue;
                };
                re.remove = true;
            }
            Change::ExpireGrant { grant } => {
                let _ = writeln!(
                    added,
                    "\n# Unused grant {grant} ({}): remove it with `ward-coordinator grant rm {grant}`",
                    s.id
                );
            }
            Change::Investigate { .. } => continue,
        }
        out.applied.push(s.id.clone());
    }
    // Replace changed blocks in place.
    let mut rule_no = 0;
    let shadow_services: BTreeMap<String, String> = match mode {
        Mode::Enforce => BTreeMap::new(),
        Mode::Shadow => services
            .iter()
            .filter(|(n, se)| se.changed && p.services.contains_key(*n))
            .map(|(n, _)| (n.clone(), unique(&format!("{n}-suggested"), &services)))
            .collect(),
    };
    for b in blocks.iter_mut() {
        match &b.kind {
            BlockKind::Rule => {
                let Some(re) = rules.get(rule_no) else {
                    break;
                };
                rule_no += 1;
                let renamed = re.to.iter().any(|t| shadow_services.contains_key(t));
                match (mode, re.remove, re.changed || renamed) {
                    (_, false, false) => {}
                    (Mode::Enforce, true, _) => {
                        b.text = format!(
                            "# rule {:?} removed by `policy suggest`: it allowed no flow in the window\n",
                            re.name
                        );
                    }
                    (Mode::Enforce, false, true) => {
                        b.text = format!("# Narrowed by `policy suggest`\n{}", rule_text(re, None));
                    }
                    (Mode::Shadow, true, _) => {
                        b.text = rule_text(re, Some("shadow_remove"));
                    }
                    (Mode::Shadow, false, true) => {
                        let mut copy = re.clone();
                        copy.name = format!("{} (suggested)", re.name);
                        for t in copy.to.iter_mut() {
                            if let Some(n) = shadow_services.get(t) {
                                *t = n.clone();
                            }
                        }
                        b.text = format!(
                            "{}{}",
                            rule_text(&RuleEdit::of(&p.rules[rule_no - 1]), Some("shadow_remove")),
                            rule_text(&copy, Some("shadow"))
                        );
                    }
                }
            }
            BlockKind::Service(name) => {
                let Some(se) = services.get(name) else {
                    continue;
                };
                if !se.changed {
                    continue;
                }
                match mode {
                    Mode::Enforce => {
                        b.text =
                            format!("# Narrowed by `policy suggest`\n{}", service_text(name, se));
                    }
                    Mode::Shadow => {
                        let Some(orig) = p.services.get(name) else {
                            continue;
                        };
                        let new = shadow_services.get(name).cloned().unwrap_or_default();
                        b.text = format!(
                            "{}{}",
                            service_text(name, &ServiceEdit::of(orig)),
                            service_text(&new, se)
                        );
                    }
                }
            }
            BlockKind::Other => {}
        }
    }
    let mut text_out: String = blocks.iter().map(|b| b.text.as_str()).collect();
    if !text_out.is_empty() && !text_out.ends_with('\n') {
        text_out.push('\n');
    }
    text_out.push_str(&added);
    // Tests are judged against the enforced view: the candidate, or in shadow mode the policy
    // in force (the parser of this build may not know shadow rules).
    let judged = match mode {
        Mode::Enforce => policy::parse(text_out.as_bytes(), &p.file)
            .map_err(|e| WriteError::Candidate(e.to_string()))?,
        Mode::Shadow => p.clone(),
    };
    let tests = tests_for(&judged, dir, pairs, now_ms, &mut out);
    text_out.push_str(&tests);
    if mode == Mode::Enforce {
        let final_p = policy::parse(text_out.as_bytes(), &p.file)
            .map_err(|e| WriteError::Candidate(e.to_string()))?;
        let failed = policy::run_tests(&final_p, dir, now_ms)
            .iter()
            .filter(|t| !t.pass)
            .count();
        if failed > 0 {
            out.notes.push(format!(
                "{failed} test(s) of the original policy fail on the candidate: review before applying"
            ));
        }
    } else {
        out.notes.push(
            "shadow rules: `shadow = true` rules are evaluated on live traffic but not enforced; \
             `shadow_remove = true` rules stay enforced"
                .into(),
        );
    }
    out.notes
        .push("comments inside rewritten rule and service blocks are not kept".into());
    out.text = text_out;
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BlockKind {
    Rule,
    Service(String),
    Other,
}

struct Block {
    kind: BlockKind,
    text: String,
}

/// Splits TOML text at table headers (`[x]`, `[[x]]` at the start of a line).
fn split(text: &str) -> Vec<Block> {
    let mut out = vec![Block {
        kind: BlockKind::Other,
        text: String::new(),
    }];
    for line in text.split_inclusive('\n') {
        if let Some(kind) = header(line) {
            out.push(Block {
                kind,
                text: String::new(),
            });
        }
        if let Some(b) = out.last_mut() {
            b.text.push_str(line);
        }
    }
    out
}

fn header(line: &str) -> Option<BlockKind> {
    let t = line.trim();
    let t = match t.find('#') {
        // A `#` inside a quoted key is not a comment; policy keys never hold one.
        Some(i) => t[..i].trim_end(),
        None => t,
    };
    if t.starts_with("[[") && t.ends_with("]]") {
        let inner = t[2..t.len() - 2].trim();
        return Some(if inner == "rules" {
            BlockKind::Rule
        } else {
            BlockKind::Other
        });
    }
    if t.starts_with('[') && t.ends_with(']') {
        let inner = t[1..t.len() - 1].trim();
        if let Some(rest) = inner.strip_prefix("services.") {
            let name = rest.trim().trim_matches('"').to_string();
            return Some(BlockKind::Service(name));
        }
        return Some(BlockKind::Other);
    }
    None
}

#[derive(Debug, Clone)]
struct RuleEdit {
    name: String,
    from: Vec<String>,
    to: Vec<String>,
    posture: Vec<String>,
    expires_ms: Option<i64>,
    changed: bool,
    remove: bool,
}

impl RuleEdit {
    fn of(r: &Rule) -> Self {
        Self {
            name: r.name.clone(),
            from: r.from.iter().map(|s| s.value.to_string()).collect(),
            to: r.to.iter().map(|s| s.value.clone()).collect(),
            posture: r.posture.iter().map(|s| s.value.clone()).collect(),
            expires_ms: r.expires_ms,
            changed: false,
            remove: false,
        }
    }
}

#[derive(Debug, Clone)]
struct ServiceEdit {
    devices: Vec<String>,
    ports: Vec<String>,
    remediation: bool,
    changed: bool,
}

impl ServiceEdit {
    fn of(s: &Service) -> Self {
        Self {
            devices: s.devices.iter().map(|d| d.value.to_string()).collect(),
            ports: s
                .ports
                .by_proto()
                .iter()
                .flat_map(|(pr, rs)| match pr {
                    Proto::Icmp => vec!["icmp".to_string()],
                    _ => rs
                        .iter()
                        .map(|r| policy::format_ports(*pr, std::slice::from_ref(r)))
                        .collect(),
                })
                .collect(),
            remediation: s.remediation,
            changed: false,
        }
    }
}

/// A TOML basic string (JSON string escapes are valid TOML ones).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| q(s)).collect();
    format!("[{}]", items.join(", "))
}

fn key(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        name.to_string()
    } else {
        q(name)
    }
}

fn service_text(name: &str, s: &ServiceEdit) -> String {
    let mut t = format!(
        "[services.{}]\ndevices = {}\nports = {}\n",
        key(name),
        list(&s.devices),
        list(&s.ports)
    );
    if s.remediation {
        t.push_str("remediation = true\n");
    }
    t.push('\n');
    t
}

/// A `[[rules]]` block; `flag` is `shadow` or `shadow_remove`.
fn rule_text(r: &RuleEdit, flag: Option<&str>) -> String {
    let mut t = format!(
        "[[rules]]\nname = {}\nfrom = {}\nto = {}\n",
        q(&r.name),
        list(&r.from),
        list(&r.to)
    );
    if !r.posture.is_empty() {
        let _ = writeln!(t, "posture = {}", list(&r.posture));
    }
    if let Some(x) = r.expires_ms {
        let _ = writeln!(t, "expires = {}", q(&rfc3339(x)));
    }
    if let Some(f) = flag {
        let _ = writeln!(t, "{f} = true");
    }
    t.push('\n');
    t
}

/// A service name not yet taken.
fn unique(base: &str, taken: &BTreeMap<String, ServiceEdit>) -> String {
    let base: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@') {
                c
            } else {
                '-'
            }
        })
        .take(56)
        .collect();
    if !taken.contains_key(&base) {
        return base;
    }
    (2..)
        .map(|n| format!("{base}-{n}"))
        .find(|n| !taken.contains_key(n))
        .unwrap_or(base)
}

/// Target text as tests write it: `svc:8080/tcp`, `svc` for ICMP.
fn target_text(service: &str, u: PortUse) -> String {
    match u.proto {
        Proto::Icmp => service.to_string(),
        Proto::Tcp => format!("{service}:{}/tcp", u.port),
        Proto::Udp => format!("{service}:{}/udp", u.port),
    }
}

/// Whether a single expectation holds on `p`.
fn holds(p: &Policy, dir: &Directory, from: &TestSource, t: Target, allow: bool, now: i64) -> bool {
    let loc = Located {
        value: t,
        pos: Pos::default(),
    };
    let test = PolicyTest {
        pos: Pos::default(),
        from: from.clone(),
        allow: if allow { vec![loc.clone()] } else { vec![] },
        deny: if allow { vec![] } else { vec![loc] },
    };
    let one = Policy {
        tests: vec![test],
        ..p.clone()
    };
    policy::run_tests(&one, dir, now).iter().all(|o| o.pass)
}

/// The `[[tests]]` text pinning observed allowed flows and denials that hold on `p`.
fn tests_for(p: &Policy, dir: &Directory, pairs: &[Pair], now: i64, out: &mut Written) -> String {
    let ix = Index::new(p, dir);
    // Tests name services, not devices: a denial is pinned only if the compiled policy denies
    // it device to device too (else a deny test on one service would hide access through
    // another), and a denial the candidate allows (a suggested rule) is pinned as an allow.
    let compiled = policy::compile(p, dir, now);
    let would_allow = |i: DeviceId, r: DeviceId, u: PortUse| {
        ix.device(i).is_some_and(|d| {
            let a = [IpAddr::V4(d.ipv4), IpAddr::V6(d.ipv6)];
            super::replay::allows(&compiled, r, &a, u.proto, u.port, now)
        })
    };
    let mut allowed: BTreeSet<(DeviceId, DeviceId, PortUse)> = BTreeSet::new();
    let mut denied: BTreeSet<(DeviceId, DeviceId, PortUse)> = BTreeSet::new();
    for pr in pairs {
        let (Some(i), Some(r)) = (pr.initiator, pr.responder) else {
            continue;
        };
        let key = (i, r, port_of(pr));
        if pr.verdict == FlowVerdict::Allowed && confirmed(pr) {
            allowed.insert(key);
        } else if no_rule_denial(pr) {
            if would_allow(i, r, key.2) {
                if confirmed(pr) {
                    allowed.insert(key);
                }
            } else {
                denied.insert(key);
            }
        }
    }
    let mut by_source: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    let mut budget = MAX_GENERATED_TESTS;
    for (set, allow) in [(&allowed, true), (&denied, false)] {
        for (i, r, u) in set.iter() {
            if budget == 0 {
                out.unpinned += 1;
                continue;
            }
            let Some(src) = ix.device(*i) else {
                out.unpinned += 1;
                continue;
            };
            let (from, from_text) = match (&src.user, src.name_bound) {
                (Some(user), _) => (TestSource::User(user.clone()), user.clone()),
                (None, true) => (
                    TestSource::Device(src.hostname.clone()),
                    format!("device:{}", src.hostname),
                ),
                (None, false) => {
                    out.unpinned += 1;
                    continue;
                }
            };
            let Some(dst) = ix.device(*r) else {
                out.unpinned += 1;
                continue;
            };
            let found = p.services.iter().find(|(name, s)| {
                s.devices.iter().any(|d| ix.matches(&d.value, dst))
                    && (!allow || s.ports.allows(u.proto, u.port))
                    && holds(
                        p,
                        dir,
                        &from,
                        Target {
                            service: (*name).clone(),
                            proto: u.proto,
                            port: u.port,
                        },
                        allow,
                        now,
                    )
            });
            let Some((name, _)) = found else {
                out.unpinned += 1;
                continue;
            };
            let e = by_source.entry(from_text).or_default();
            let set = if allow { &mut e.0 } else { &mut e.1 };
            if set.insert(target_text(name, *u)) {
                budget -= 1;
                if allow {
                    out.allow_tests += 1;
                } else {
                    out.deny_tests += 1;
                }
            }
        }
    }
    if by_source.is_empty() {
        return String::new();
    }
    let mut t = String::from(
        "\n# Tests generated by `policy suggest` from the stored flows: allow = observed allowed\n\
         # flows (confirmed by both ends), deny = observed denied attempts.\n",
    );
    for (from, (allow, deny)) in by_source {
        let _ = writeln!(t, "[[tests]]\nfrom = {}", q(&from));
        if !allow.is_empty() {
            let _ = writeln!(
                t,
                "allow = {}",
                list(&allow.into_iter().collect::<Vec<_>>())
            );
        }
        if !deny.is_empty() {
            let _ = writeln!(t, "deny = {}", list(&deny.into_iter().collect::<Vec<_>>()));
        }
        t.push('\n');
    }
    t
}

/// Coordinator time (ms) as the policy's `expires` takes it, to the second.
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        // Unreachable for an expiry the parser read; if it were, the rule is written expired.
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}
