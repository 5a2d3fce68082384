//! Policy text → [`Policy`]: bounds first, then TOML, then meaning.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use toml::Spanned;

use super::{
    AutoApprovers, FileRequirement, Group, Located, OsRequirement, Policy, PolicyError, PolicyTest,
    Pos, Posture, Rule, RuleMode, Selector, Service, ServicePorts, Target, TestSource, Trust,
    VersionOp, MAX_ITEMS, MAX_NESTING, MAX_POLICY_BYTES,
};
use crate::filter::{PortRange, Proto};
use crate::names::{Hostname, Name};
use crate::posture::MAX_WANTS;
use crate::routes::Prefix;

/// Parses and validates a policy. `file_name` is only used in messages.
///
/// Refuses, before the TOML parser sees the text: more than [`MAX_POLICY_BYTES`], invalid
/// UTF-8, nesting deeper than [`MAX_NESTING`]. Then refuses TOML errors, unknown keys, more than
/// [`MAX_ITEMS`] rules/services/tests/groups/postures, more than [`MAX_WANTS`] distinct processes,
/// files or custom checks over all posture requirements (a device reports no more), values out of
/// bounds, and references to groups, services or posture requirements the file does not define.
/// Every error names a line and column.
pub fn parse(src: &[u8], file_name: &str) -> Result<Policy, PolicyError> {
    let whole = |message: String| PolicyError {
        file: file_name.to_string(),
        pos: None,
        message,
    };
    if src.len() > MAX_POLICY_BYTES {
        return Err(whole(format!(
            "file is too large ({} bytes, at most {MAX_POLICY_BYTES})",
            src.len()
        )));
    }
    let text = match std::str::from_utf8(src) {
        Ok(t) => t,
        Err(e) => {
            let at = e.valid_up_to();
            let line = 1 + src[..at].iter().filter(|b| **b == b'\n').count();
            let line_start = src[..at]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            return Err(PolicyError {
                file: file_name.to_string(),
                pos: Some(Pos {
                    line,
                    column: at - line_start + 1,
                }),
                message: format!(
                    "not valid UTF-8 (byte 0x{:02x} at byte column {})",
                    src[at],
                    at - line_start + 1
                ),
            });
        }
    };
    let cx = Cx {
        file: file_name,
        text,
        lines: line_starts(text),
    };
    if let Err((offset, msg)) = check_nesting(text) {
        return Err(cx.err(offset, msg));
    }
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
        let msg = e.message().trim().to_string();
        match e.span() {
            Some(s) => cx.err(s.start, msg),
            None => whole(msg),
        }
    })?;
    for (what, n) in [
        ("rules", raw.rules.len()),
        ("services", raw.services.len()),
        ("tests", raw.tests.len()),
        ("groups", raw.groups.len()),
        ("posture requirements", raw.posture.len()),
    ] {
        if n > MAX_ITEMS {
            return Err(whole(format!("too many {what} ({n}, at most {MAX_ITEMS})")));
        }
    }
    cx.build(raw)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    groups: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    #[serde(default)]
    posture: BTreeMap<Spanned<String>, RawPosture>,
    #[serde(default)]
    services: BTreeMap<Spanned<String>, RawService>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    tests: Vec<Spanned<RawTest>>,
    trust: Option<RawTrust>,
    auto_approvers: Option<RawAutoApprovers>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoApprovers {
    #[serde(default)]
    routes: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    #[serde(default)]
    exit_node: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    quarantine_after_failing: Option<Spanned<String>>,
    scan_denied_flows: Option<Spanned<i64>>,
    scan_window: Option<Spanned<String>>,
    risky_lease_ttl: Option<Spanned<String>>,
    clean_after: Option<Spanned<String>>,
    risk_threshold: Option<Spanned<i64>>,
    quarantine_above_risk: Option<Spanned<i64>>,
    quarantine_malicious: Option<bool>,
    behaviour_learning: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPosture {
    #[serde(default)]
    os: Vec<Spanned<String>>,
    firewall: Option<bool>,
    disk_encryption: Option<bool>,
    #[serde(default)]
    processes: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<Spanned<RawFile>>,
    min_ward_version: Option<Spanned<String>>,
    max_report_age: Option<Spanned<String>>,
    #[serde(default)]
    custom: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    screen_lock: Option<bool>,
    max_package_age: Option<Spanned<String>>,
    kernel: Option<Spanned<String>>,
    max_risk: Option<Spanned<i64>>,
    risk_signin_above: Option<Spanned<i64>>,
    max_auth_age: Option<Spanned<String>>,
    amr: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: Spanned<String>,
    sha256: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    #[serde(default)]
    routes: Vec<Spanned<String>>,
    ports: Vec<Spanned<String>>,
    #[serde(default)]
    remediation: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    from: Vec<Spanned<String>>,
    to: Vec<Spanned<String>>,
    #[serde(default)]
    posture: Vec<Spanned<String>>,
    expires: Option<Spanned<toml::Value>>,
    #[serde(default)]
    shadow: Option<Spanned<bool>>,
    #[serde(default)]
    shadow_remove: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    from: Spanned<String>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

struct Cx<'a> {
    file: &'a str,
    text: &'a str,
    lines: Vec<usize>,
}

impl Cx<'_> {
    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.lines.partition_point(|s| *s <= offset).max(1);
        let start = self.lines[line - 1];
        let column = 1 + self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Pos { line, column }
    }

    fn err(&self, offset: usize, message: String) -> PolicyError {
        PolicyError {
            file: self.file.to_string(),
            pos: Some(self.pos(offset)),
            message,
        }
    }

    fn at<T>(&self, s: &Spanned<T>) -> Pos {
        self.pos(s.span().start)
    }

    fn build(&self, raw: RawPolicy) -> Result<Policy, PolicyError> {
        let mut p = Policy {
            file: self.file.to_string(),
            ..Policy::default()
        };
        for (name, members) in raw.groups {
            let g = self.name("group", &name)?;
            let mut seen = BTreeSet::new();
            let mut list = Vec::new();
            for m in members {
                let u = self.name("user", &m)?;
                if seen.insert(u.clone()) {
                    list.push(Located {
                        value: u,
                        pos: self.at(&m),
                    });
                }
            }
            p.groups.insert(
                g,
                Group {
                    pos: self.at(&name),
                    members: list,
                },
            );
        }
        // What devices will be asked to report, over every requirement: refused here rather
        // than silently cut off by `posture::wants`, where the cut checks would fail forever.
        let mut processes = BTreeSet::new();
        let mut paths = BTreeSet::new();
        let mut customs = BTreeSet::new();
        for (name, raw) in raw.posture {
            let n = self.name("posture requirement", &name)?;
            let posture = self.posture(n.clone(), self.at(&name), raw)?;
            processes.extend(posture.processes.iter().cloned());
            paths.extend(posture.files.iter().map(|f| f.path.clone()));
            customs.extend(posture.custom.keys().cloned());
            for (what, count) in [
                ("processes", processes.len()),
                ("files", paths.len()),
                ("custom checks", customs.len()),
            ] {
                if count > MAX_WANTS {
                    return Err(self.err(
                        name.span().start,
                        format!(
                            "posture requirements name more than {MAX_WANTS} distinct {what} in all (a device reports at most {MAX_WANTS})"
                        ),
                    ));
                }
            }
            p.postures.insert(n, posture);
        }
        if let Some(t) = raw.trust {
            p.trust = self.trust(t)?;
        }
        for (name, raw) in raw.services {
            let n = self.name("service", &name)?;
            let s = self.service(&p, n.clone(), &name, raw)?;
            p.services.insert(n, s);
        }
        if let Some(a) = raw.auto_approvers {
            p.auto_approvers = self.auto_approvers(&p, a)?;
        }
        let mut rule_names = BTreeSet::new();
        for (i, raw) in raw.rules.into_iter().enumerate() {
            let rule = self.rule(&p, i, raw)?;
            if !rule_names.insert(rule.name.clone()) {
                return Err(PolicyError {
                    file: self.file.to_string(),
                    pos: Some(rule.pos),
                    message: format!("rule name {:?} is used twice", rule.name),
                });
            }
            p.rules.push(rule);
        }
        for raw in raw.tests {
            let t = self.test(&p, raw)?;
            p.tests.push(t);
        }
        Ok(p)
    }

    fn name(&self, kind: &'static str, s: &Spanned<String>) -> Result<String, PolicyError> {
        Name::parse(kind, s.get_ref())
            .map(|n| n.as_str().to_string())
            .map_err(|e| self.err(s.span().start, e.to_string()))
    }

    fn hostname(&self, s: &str, at: usize) -> Result<String, PolicyError> {
        Hostname::parse(s)
            .map(|h| h.as_str().to_string())
            .map_err(|e| self.err(at, e.to_string()))
    }

    fn selector(
        &self,
        p: &Policy,
        s: &Spanned<String>,
        bare_user: bool,
    ) -> Result<Located<Selector>, PolicyError> {
        let at = s.span().start;
        let raw = s.get_ref().as_str();
        let (kind, rest) = match raw.split_once(':') {
            Some((k, r)) => (k, r),
            None if bare_user => ("user", raw),
            None => {
                return Err(self.err(
                    at,
                    format!("bad selector {raw:?}: use tag:T, device:HOSTNAME, user:U or group:G"),
                ))
            }
        };
        let sub = |k: &'static str| -> Result<String, PolicyError> {
            Name::parse(k, rest)
                .map(|n| n.as_str().to_string())
                .map_err(|e| self.err(at, e.to_string()))
        };
        let value = match kind {
            "user" => Selector::User(sub("user")?),
            "tag" => Selector::Tag(sub("tag")?),
            "device" => Selector::Device(self.hostname(rest, at)?),
            "group" => {
                let g = sub("group")?;
                if !p.groups.contains_key(&g) {
                    return Err(self.err(at, format!("group {g:?} is not defined")));
                }
                Selector::Group(g)
            }
            other => {
                return Err(self.err(
                    at,
                    format!(
                        "bad selector {raw:?}: unknown kind {other:?} (use tag:, device:, user: or group:)"
                    ),
                ))
            }
        };
        Ok(Located {
            value,
            pos: self.pos(at),
        })
    }

    /// `[auto_approvers]`: `routes = { "PREFIX" = [selectors] }`, `exit_node = [selectors]`.
    fn auto_approvers(
        &self,
        p: &Policy,
        raw: RawAutoApprovers,
    ) -> Result<AutoApprovers, PolicyError> {
        let mut out = AutoApprovers::default();
        for (prefix, sels) in raw.routes {
            let at = prefix.span().start;
            let value: Prefix = prefix
                .get_ref()
                .parse()
                .map_err(|e: crate::routes::PrefixError| self.err(at, e.to_string()))?;
            if value.is_default() {
                return Err(self.err(
                    at,
                    "a default route is approved with auto_approvers.exit_node, not routes"
                        .to_string(),
                ));
            }
            let mut list = Vec::new();
            for s in &sels {
                list.push(self.selector(p, s, false)?);
            }
            out.routes.push((
                Located {
                    value,
                    pos: self.pos(at),
                },
                list,
            ));
        }
        for s in &raw.exit_node {
            out.exit_node.push(self.selector(p, s, false)?);
        }
        Ok(out)
    }

    fn service(
        &self,
        p: &Policy,
        name: String,
        key: &Spanned<String>,
        raw: RawService,
    ) -> Result<Service, PolicyError> {
        if raw.devices.is_empty() && raw.routes.is_empty() {
            return Err(self.err(
                key.span().start,
                format!("service {name:?} lists no devices and no routes"),
            ));
        }
        if raw.routes.len() > MAX_ITEMS {
            return Err(self.err(
                key.span().start,
                format!("service {name:?} lists too many routes (at most {MAX_ITEMS})"),
            ));
        }
        let mut routes: Vec<Located<Prefix>> = Vec::new();
        for r in &raw.routes {
            let at = r.span().start;
            let prefix: Prefix = r
                .get_ref()
                .parse()
                .map_err(|e: crate::routes::PrefixError| self.err(at, e.to_string()))?;
            if !routes.iter().any(|x| x.value == prefix) {
                routes.push(Located {
                    value: prefix,
                    pos: self.pos(at),
                });
            }
        }
        if raw.ports.is_empty() {
            return Err(self.err(key.span().start, format!("service {name:?} opens no ports")));
        }
        let mut devices = Vec::new();
        for d in &raw.devices {
            let sel = self.selector(p, d, false)?;
            if !devices
                .iter()
                .any(|x: &Located<Selector>| x.value == sel.value)
            {
                devices.push(sel);
            }
        }
        let mut ports = ServicePorts::default();
        let mut seen: Vec<(Proto, PortRange, usize)> = Vec::new();
        for spec in &raw.ports {
            let at = spec.span().start;
            let (proto, range) = parse_port_spec(spec.get_ref()).map_err(|m| self.err(at, m))?;
            if proto == Proto::Icmp {
                if ports.icmp {
                    return Err(self.err(at, format!("service {name:?} lists icmp twice")));
                }
                ports.icmp = true;
                continue;
            }
            if let Some((_, other, _)) = seen
                .iter()
                .find(|(p2, r2, _)| *p2 == proto && r2.lo <= range.hi && range.lo <= r2.hi)
            {
                let what = if *other == range {
                    "duplicate"
                } else {
                    "overlapping"
                };
                return Err(self.err(
                    at,
                    format!(
                        "{what} port range in service {name:?}: {} and {}",
                        super::format_ports(proto, &[*other]),
                        super::format_ports(proto, &[range])
                    ),
                ));
            }
            seen.push((proto, range, at));
            match proto {
                Proto::Tcp => ports.tcp.push(range),
                Proto::Udp => ports.udp.push(range),
                Proto::Icmp => {}
            }
        }
        ports.tcp.sort();
        ports.udp.sort();
        Ok(Service {
            name,
            pos: self.at(key),
            devices,
            routes,
            ports,
            remediation: raw.remediation,
        })
    }

    fn rule(&self, p: &Policy, index: usize, raw: Spanned<RawRule>) -> Result<Rule, PolicyError> {
        let pos = self.at(&raw);
        let start = raw.span().start;
        let raw = raw.into_inner();
        let name = match &raw.name {
            Some(n) => {
                let s = n.get_ref().trim();
                if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
                    return Err(self.err(
                        n.span().start,
                        "a rule name must be 1 to 128 printable characters".into(),
                    ));
                }
                if s.starts_with("grant:") {
                    return Err(self.err(
                        n.span().start,
                        "rule names starting with \"grant:\" are reserved for grants".into(),
                    ));
                }
                s.to_string()
            }
            None => format!("rule #{} (line {})", index + 1, pos.line),
        };
        if raw.from.is_empty() {
            return Err(self.err(start, format!("rule {name:?} has an empty `from`")));
        }
        if raw.to.is_empty() {
            return Err(self.err(start, format!("rule {name:?} has an empty `to`")));
        }
        let mut from = Vec::new();
        for f in &raw.from {
            let sel = self.selector(p, f, true)?;
            if !from
                .iter()
                .any(|x: &Located<Selector>| x.value == sel.value)
            {
                from.push(sel);
            }
        }
        let mut to = Vec::new();
        for t in &raw.to {
            let s = self.name("service", t)?;
            if !p.services.contains_key(&s) {
                return Err(self.err(t.span().start, format!("service {s:?} is not defined")));
            }
            if !to.iter().any(|x: &Located<String>| x.value == s) {
                to.push(Located {
                    value: s,
                    pos: self.at(t),
                });
            }
        }
        let mut posture = Vec::new();
        for q in &raw.posture {
            let s = self.name("posture requirement", q)?;
            if !p.postures.contains_key(&s) {
                return Err(self.err(
                    q.span().start,
                    format!("posture requirement {s:?} is not defined"),
                ));
            }
            if !posture.iter().any(|x: &Located<String>| x.value == s) {
                posture.push(Located {
                    value: s,
                    pos: self.at(q),
                });
            }
        }
        let expires_ms = match &raw.expires {
            None => None,
            Some(v) => {
                let text =
                    match v.get_ref() {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Datetime(d) => d.to_string(),
                        _ => return Err(self.err(
                            v.span().start,
                            "expires must be an RFC 3339 date-time like \"2027-01-31T00:00:00Z\""
                                .into(),
                        )),
                    };
                Some(parse_rfc3339_ms(&text).map_err(|m| self.err(v.span().start, m))?)
            }
        };
        let on = |b: &Option<Spanned<bool>>| b.as_ref().is_some_and(|x| *x.get_ref());
        let mode = match (on(&raw.shadow), on(&raw.shadow_remove)) {
            (false, false) => RuleMode::Enforced,
            (true, false) => RuleMode::Shadow,
            (false, true) => RuleMode::ShadowRemove,
            (true, true) => {
                return Err(self.err(
                    start,
                    format!(
                        "rule {name:?} is both `shadow` (a candidate, not enforced) and `shadow_remove` (enforced, dropped from the candidate): set one"
                    ),
                ))
            }
        };
        Ok(Rule {
            name,
            pos,
            from,
            to,
            posture,
            expires_ms,
            mode,
        })
    }

    fn test(&self, p: &Policy, raw: Spanned<RawTest>) -> Result<PolicyTest, PolicyError> {
        let pos = self.at(&raw);
        let raw = raw.into_inner();
        let at = raw.from.span().start;
        let f = raw.from.get_ref().as_str();
        let from = match f.split_once(':') {
            None => TestSource::User(self.name("user", &raw.from)?),
            Some(("user", u)) => TestSource::User(
                Name::parse("user", u)
                    .map(|n| n.as_str().to_string())
                    .map_err(|e| self.err(at, e.to_string()))?,
            ),
            Some(("device", h)) => TestSource::Device(self.hostname(h, at)?),
            Some(_) => {
                return Err(self.err(
                    at,
                    format!("a test's `from` is a user or device:HOSTNAME, not {f:?}"),
                ))
            }
        };
        let targets = |list: &[Spanned<String>]| -> Result<Vec<Located<Target>>, PolicyError> {
            list.iter()
                .map(|t| {
                    let at = t.span().start;
                    let target = parse_target(t.get_ref()).map_err(|m| self.err(at, m))?;
                    if !p.services.contains_key(&target.service) {
                        return Err(
                            self.err(at, format!("service {:?} is not defined", target.service))
                        );
                    }
                    Ok(Located {
                        value: target,
                        pos: self.pos(at),
                    })
                })
                .collect()
        };
        Ok(PolicyTest {
            pos,
            from,
            allow: targets(&raw.allow)?,
            deny: targets(&raw.deny)?,
        })
    }

    fn posture(&self, name: String, pos: Pos, raw: RawPosture) -> Result<Posture, PolicyError> {
        let mut os = Vec::new();
        for o in &raw.os {
            os.push(parse_os(o.get_ref()).map_err(|m| self.err(o.span().start, m))?);
        }
        let mut processes = Vec::new();
        for pr in &raw.processes {
            let s = pr.get_ref();
            if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
                return Err(self.err(
                    pr.span().start,
                    "a process name must be 1 to 256 printable characters".into(),
                ));
            }
            processes.push(s.clone());
        }
        let mut processes_seen = BTreeSet::new();
        processes.retain(|p| processes_seen.insert(p.clone()));
        let mut files: Vec<FileRequirement> = Vec::new();
        for f in &raw.files {
            let f = f.get_ref();
            let path = f.path.get_ref();
            if !path.starts_with('/') || path.len() > 4096 || path.chars().any(char::is_control) {
                return Err(self.err(
                    f.path.span().start,
                    format!("file path {path:?} must be absolute"),
                ));
            }
            if files.iter().any(|x| x.path == *path) {
                return Err(self.err(
                    f.path.span().start,
                    format!("file {path:?} is listed twice in posture requirement {name:?}"),
                ));
            }
            let sha256 = match &f.sha256 {
                None => None,
                Some(h) => {
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(h.get_ref(), &mut sha256).map_err(|_| {
                        self.err(
                            h.span().start,
                            "sha256 must be 64 hexadecimal digits".into(),
                        )
                    })?;
                    Some(sha256)
                }
            };
            files.push(FileRequirement {
                path: path.clone(),
                sha256,
            });
        }
        let min_ward_version = match &raw.min_ward_version {
            None => None,
            Some(v) => {
                let s = v.get_ref();
                let ok = !s.is_empty()
                    && s.len() <= 32
                    && s.split('.')
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                if !ok {
                    return Err(self.err(
                        v.span().start,
                        format!("min_ward_version {s:?} is not a version like \"0.3.1\""),
                    ));
                }
                Some(s.clone())
            }
        };
        let duration = |v: &Option<Spanned<String>>| -> Result<Option<u64>, PolicyError> {
            match v {
                None => Ok(None),
                Some(v) => parse_duration_ms(v.get_ref())
                    .map(Some)
                    .map_err(|m| self.err(v.span().start, m)),
            }
        };
        let max_report_age_ms = duration(&raw.max_report_age)?;
        let max_package_age_ms = duration(&raw.max_package_age)?;
        let max_auth_age_ms = duration(&raw.max_auth_age)?;
        if let (Some(0), Some(v)) = (max_auth_age_ms, &raw.max_auth_age) {
            return Err(self.err(
                v.span().start,
                "max_auth_age must be longer than 0s".to_string(),
            ));
        }
        let mut amr = Vec::new();
        if let Some(list) = &raw.amr {
            if list.get_ref().is_empty() {
                return Err(self.err(
                    list.span().start,
                    "amr is empty: name at least one method (e.g. [\"mfa\"]) or leave it out"
                        .to_string(),
                ));
            }
            for m in list.get_ref() {
                let v = m.get_ref();
                // RFC 8176 method names are short lowercase tokens ("pwd", "mfa", "hwk").
                let ok = !v.is_empty()
                    && v.len() <= 32
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if !ok {
                    return Err(self.err(
                        m.span().start,
                        format!("amr {v:?} is not an authentication method name like \"mfa\""),
                    ));
                }
                if !amr.contains(v) {
                    amr.push(v.clone());
                }
            }
        }
        let kernel = match &raw.kernel {
            None => None,
            Some(k) => Some(parse_kernel(k.get_ref()).map_err(|m| self.err(k.span().start, m))?),
        };
        let mut custom = BTreeMap::new();
        for (k, v) in raw.custom {
            let check = self.name("custom check", &k)?;
            let at = v.span().start;
            let v = v.into_inner();
            let shape_ok = match &v {
                toml::Value::Boolean(b) => *b,
                toml::Value::Table(_) => true,
                _ => false,
            };
            if !shape_ok {
                return Err(self.err(
                    at,
                    format!(
                        "custom.{check} must be true (its output's \"pass\" is true) or a table of expected values"
                    ),
                ));
            }
            custom.insert(check, toml_to_json(v).map_err(|m| self.err(at, m))?);
        }
        Ok(Posture {
            name,
            pos,
            os,
            firewall: raw.firewall,
            disk_encryption: raw.disk_encryption,
            processes,
            files,
            min_ward_version,
            max_report_age_ms,
            custom,
            screen_lock: raw.screen_lock,
            max_package_age_ms,
            kernel,
            max_risk: match &raw.max_risk {
                None => None,
                Some(n) => Some(self.risk("max_risk", n)?),
            },
            risk_signin_above: match &raw.risk_signin_above {
                None => None,
                Some(n) => Some(self.risk("risk_signin_above", n)?),
            },
            max_auth_age_ms,
            amr,
        })
    }

    /// A risk score: 0 to 100.
    fn risk(&self, key: &str, n: &Spanned<i64>) -> Result<u8, PolicyError> {
        match u8::try_from(*n.get_ref()) {
            Ok(x @ 0..=100) => Ok(x),
            _ => Err(self.err(
                n.span().start,
                format!("{key} {} is out of range (0 to 100)", n.get_ref()),
            )),
        }
    }

    fn trust(&self, raw: RawTrust) -> Result<Trust, PolicyError> {
        const S: u64 = 1000;
        const M: u64 = 60 * S;
        const H: u64 = 60 * M;
        const D: u64 = 24 * H;
        // Bounds keep a typo from making the reaction useless (a 0 s window never sees a scan)
        // or a lease lifetime the coordinator cannot keep up with (a 1 ms TTL).
        let bounded = |key: &str,
                       v: &Option<Spanned<String>>,
                       (lo, lo_s): (u64, &str),
                       (hi, hi_s): (u64, &str)|
         -> Result<Option<u64>, PolicyError> {
            let Some(v) = v else {
                return Ok(None);
            };
            let at = v.span().start;
            let ms = parse_duration_ms(v.get_ref()).map_err(|m| self.err(at, m))?;
            if ms < lo || ms > hi {
                return Err(self.err(
                    at,
                    format!("{key} {:?} is out of range ({lo_s} to {hi_s})", v.get_ref()),
                ));
            }
            Ok(Some(ms))
        };
        let scan_denied_flows = match &raw.scan_denied_flows {
            None => None,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(x @ 1..=100_000) => Some(x),
                _ => {
                    return Err(self.err(
                        n.span().start,
                        format!(
                            "scan_denied_flows {} is out of range (1 to 100000)",
                            n.get_ref()
                        ),
                    ))
                }
            },
        };
        let defaults = Trust::default();
        Ok(Trust {
            quarantine_after_failing_ms: bounded(
                "quarantine_after_failing",
                &raw.quarantine_after_failing,
                (S, "1s"),
                (30 * D, "30d"),
            )?,
            scan_denied_flows,
            scan_window_ms: bounded("scan_window", &raw.scan_window, (S, "1s"), (H, "1h"))?
                .unwrap_or(defaults.scan_window_ms),
            risky_lease_ttl_ms: bounded(
                "risky_lease_ttl",
                &raw.risky_lease_ttl,
                (10 * S, "10s"),
                (D, "1d"),
            )?,
            clean_after_ms: bounded("clean_after", &raw.clean_after, (M, "1m"), (30 * D, "30d"))?
                .unwrap_or(defaults.clean_after_ms),
            risk_threshold: match &raw.risk_threshold {
                None => defaults.risk_threshold,
                Some(n) => self.risk("risk_threshold", n)?,
            },
            quarantine_above_risk: match &raw.quarantine_above_risk {
                None => None,
                Some(n) => Some(self.risk("quarantine_above_risk", n)?),
            },
            quarantine_malicious: raw.quarantine_malicious.unwrap_or(false),
            behaviour_learning_ms: bounded(
                "behaviour_learning",
                &raw.behaviour_learning,
                (S, "1s"),
                (90 * D, "90d"),
            )?
            .unwrap_or(defaults.behaviour_learning_ms),
        })
    }
}

/// TOML → JSON for custom-check expectations. Dates become their RFC 3339 text (what a check
/// would print); non-finite floats have no JSON form and are refused rather than turned into
/// `null`, which would then match nothing a check can print.
fn toml_to_json(v: toml::Value) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match v {
        toml::Value::String(s) => J::String(s),
        toml::Value::Integer(i) => J::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(J::Number)
            .ok_or_else(|| format!("{f} has no JSON form; use a finite number"))?,
        toml::Value::Boolean(b) => J::Bool(b),
        toml::Value::Datetime(d) => J::String(d.to_string()),
        toml::Value::Array(a) => J::Array(
            a.into_iter()
                .map(toml_to_json)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        toml::Value::Table(t) => {
            let mut m = serde_json::Map::new();
            for (k, v) in t {
                m.insert(k, toml_to_json(v)?);
            }
            J::Object(m)
        }
    })
}

/// `tcp/22`, `tcp/8000-8080`, `udp/53`, `tcp/*`, `udp/*`, `icmp`.
pub(crate) fn parse_port_spec(s: &str) -> Result<(Proto, PortRange), String> {
    let bad =
        || format!("bad port spec {s:?}: use tcp/N, tcp/N-M, tcp/*, udp/N, udp/N-M, udp/* or icmp");
    if s == "icmp" {
        return Ok((Proto::Icmp, PortRange { lo: 0, hi: 0 }));
    }
    let (proto, ports) = s.split_once('/').ok_or_else(bad)?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        _ => return Err(bad()),
    };
    if ports == "*" {
        return Ok((
            proto,
            PortRange {
                lo: 0,
                hi: u16::MAX,
            },
        ));
    }
    let port = |x: &str| -> Result<u16, String> {
        if x.is_empty() || x.len() > 5 || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match x.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("bad port in {s:?}: ports are 1 to 65535")),
            Ok(n) => Ok(n),
        }
    };
    let range = match ports.split_once('-') {
        None => {
            let p = port(ports)?;
            PortRange { lo: p, hi: p }
        }
        Some((a, b)) => {
            let (lo, hi) = (port(a)?, port(b)?);
            if lo > hi {
                return Err(format!("bad port range in {s:?}: {lo} is above {hi}"));
            }
            PortRange { lo, hi }
        }
    };
    Ok((proto, range))
}

/// `db:5432`, `db:53/udp`, `db:icmp` or `db` (ICMP echo).
pub(crate) fn parse_target(s: &str) -> Result<Target, String> {
    let bad = || format!("bad target {s:?}: use SERVICE:PORT[/PROTO] or SERVICE (icmp)");
    let (service, rest) = match s.split_once(':') {
        None => (s, None),
        Some((a, b)) => (a, Some(b)),
    };
    let service = Name::parse("service", service)
        .map_err(|e| format!("bad target {s:?}: {e}"))?
        .as_str()
        .to_string();
    let (proto, port) = match parse_port_proto(rest)? {
        Some(pp) => pp,
        None => (Proto::Icmp, 0),
    };
    if proto != Proto::Icmp && port == 0 {
        return Err(bad());
    }
    Ok(Target {
        service,
        proto,
        port,
    })
}

/// `None` → no port given; `Some("icmp")` → ICMP; `Some("22")` → tcp/22; `Some("53/udp")`.
pub(crate) fn parse_port_proto(rest: Option<&str>) -> Result<Option<(Proto, u16)>, String> {
    let Some(rest) = rest else {
        return Ok(None);
    };
    if rest == "icmp" {
        return Ok(Some((Proto::Icmp, 0)));
    }
    let (port, proto) = match rest.split_once('/') {
        None => (rest, Proto::Tcp),
        Some((p, "tcp")) => (p, Proto::Tcp),
        Some((p, "udp")) => (p, Proto::Udp),
        Some((_, other)) => return Err(format!("unknown protocol {other:?} (tcp or udp)")),
    };
    let n: u16 = port
        .parse()
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| format!("bad port {port:?}: ports are 1 to 65535"))?;
    Ok(Some((proto, n)))
}

fn parse_os(s: &str) -> Result<OsRequirement, String> {
    let bad = || format!("bad os requirement {s:?}: use NAME or NAME>=VERSION (>=, >, <=, <, =)");
    let split = s.find(['<', '>', '=']);
    let (name, version) = match split {
        None => (s, None),
        Some(i) => (&s[..i], Some(parse_version_bound(&s[i..]).ok_or_else(bad)?)),
    };
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(bad());
    }
    Ok(OsRequirement {
        name: name.to_string(),
        version,
    })
}

/// `>=6.1`, `<7`, `=6.1.0`, or a bare `6.1` (a minimum, the usual wish for a kernel).
fn parse_kernel(s: &str) -> Result<(VersionOp, String), String> {
    let bad = || {
        format!("bad kernel requirement {s:?}: use VERSION or >=VERSION (>=, >, <=, <, =), like \">=6.1\"")
    };
    let bound = if s.starts_with(['<', '>', '=']) {
        parse_version_bound(s)
    } else {
        parse_version_bound(&format!(">={s}"))
    };
    let (op, v) = bound.ok_or_else(bad)?;
    // Compared against the numeric prefix of `uname -r`, so only digits and dots can match.
    if !v
        .split('.')
        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    Ok((op, v))
}

/// `>=V`, `<=V`, `==V`, `>V`, `<V`, `=V` with `V` 1 to 32 of `[A-Za-z0-9.]`.
fn parse_version_bound(rest: &str) -> Option<(VersionOp, String)> {
    let (op, v) = if let Some(v) = rest.strip_prefix(">=") {
        (VersionOp::Ge, v)
    } else if let Some(v) = rest.strip_prefix("<=") {
        (VersionOp::Le, v)
    } else if let Some(v) = rest.strip_prefix("==") {
        (VersionOp::Eq, v)
    } else if let Some(v) = rest.strip_prefix('>') {
        (VersionOp::Gt, v)
    } else if let Some(v) = rest.strip_prefix('<') {
        (VersionOp::Lt, v)
    } else if let Some(v) = rest.strip_prefix('=') {
        (VersionOp::Eq, v)
    } else {
        return None;
    };
    let ok =
        !v.is_empty() && v.len() <= 32 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.');
    ok.then(|| (op, v.to_string()))
}

/// A duration in the one grammar of [`crate::duration`].
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    crate::duration::parse_ms(s).map_err(|e| e.to_string())
}

/// RFC 3339 date-time (with `Z` or an offset) → ms since the Unix epoch.
pub(crate) fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            format!("expires {s:?} is not an RFC 3339 date-time like \"2027-01-31T00:00:00Z\"")
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("expires {s:?} is out of range"))
}

fn line_starts(text: &str) -> Vec<usize> {
    let mut v = vec![0];
    v.extend(
        text.bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i + 1),
    );
    v
}

/// Refuses nesting (arrays, inline tables, dotted keys, table-header segments) deeper than
/// [`MAX_NESTING`] without recursion, so no input can overflow the parser's stack. Strings and
/// comments are skipped. Returns the byte offset of the offending character.
pub(crate) fn check_nesting(text: &str) -> Result<(), (usize, String)> {
    let b = text.as_bytes();
    let too_deep = |i: usize| (i, format!("nested deeper than {MAX_NESTING} levels"));
    let mut stack: Vec<u8> = Vec::new();
    let mut header = false;
    let mut header_dots = 0usize;
    let mut key_dots = 0usize;
    let mut in_key = true;
    let mut line_blank = true;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                if stack.is_empty() && !header {
                    in_key = true;
                    key_dots = 0;
                }
                line_blank = true;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                i = skip_string(b, i);
                line_blank = false;
                continue;
            }
            b'[' if stack.is_empty() && !header && in_key && line_blank => {
                header = true;
                header_dots = 0;
                key_dots = 0;
                if b.get(i + 1) == Some(&b'[') {
                    i += 1;
                }
            }
            b']' if header && stack.is_empty() => {
                header = false;
                header_dots = key_dots;
                key_dots = 0;
                if b.get(i + 1) == Some(&b']') {
                    i += 1;
                }
            }
            b'[' | b'{' => {
                stack.push(c);
                if c == b'{' {
                    in_key = true;
                    key_dots = 0;
                }
                if header_dots + stack.len() + key_dots > MAX_NESTING {
                    return Err(too_deep(i));
                }
            }
            b']' | b'}' => {
                stack.pop();
                in_key = false;
            }
            b',' if stack.last() == Some(&b'{') => {
                in_key = true;
                key_dots = 0;
            }
            b'=' => in_key = false,
            b'.' if in_key || header => {
                key_dots += 1;
                if header_dots + stack.len() + key_dots > MAX_NESTING {
                    return Err(too_deep(i));
                }
            }
            _ => {}
        }
        line_blank = false;
        i += 1;
    }
    Ok(())
}

/// Index just past the string starting at `i` (basic, literal, or their multi-line forms);
/// an unterminated string runs to the end (the TOML parser reports it).
fn skip_string(b: &[u8], i: usize) -> usize {
    let q = b[i];
    let multi = b.get(i + 1) == Some(&q) && b.get(i + 2) == Some(&q);
    let mut j = if multi { i + 3 } else { i + 1 };
    while j < b.len() {
        let c = b[j];
        if c == b'\\' && q == b'"' {
            j += 2;
            continue;
        }
        if !multi && c == b'\n' {
            return j;
        }
        if c == q {
            if !multi {
                return j + 1;
            }
            if b.get(j + 1) == Some(&q) && b.get(j + 2) == Some(&q) {
                // Up to two more quotes may close the string (`""""` ends with a quote inside).
                let mut k = j + 3;
                while k < b.len() && b[k] == q && k < j + 5 {
                    k += 1;
                }
                return k;
            }
        }
        j += 1;
    }
    b.len()
}
