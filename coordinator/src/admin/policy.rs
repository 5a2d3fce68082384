//! `policy check`, `policy apply` and `policy explain`: parse, compile against the live
//! directory, run the policy's tests; apply stores a version and pushes it only if all pass.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use sha2::Digest;

use ward_shared::policy::{self, Compiled, Directory, Policy};

use super::api::{
    ExplainDeviceView, ExplainMissView, ExplainView, PolicyOutcome, PolicyTestView, ShadowRulesView,
};
use super::ops::{Live, Notice, Snapshot};
use crate::audit::Action;
use crate::store::{Audit, Store};

/// What an applied policy's check computed: the maturity assessment recorded on apply takes
/// it instead of judging the directory, running the tests and compiling again.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The stored version.
    pub version: i64,
    /// The directory judged under the policy's requirements ([`Live::directory_for`]).
    pub directory: Arc<Directory>,
    /// [`policy::compile`] of the policy against `directory` (no routes).
    pub compiled: Arc<Compiled>,
    /// How many of the policy's test expectations ran (all passed: it was applied).
    pub tests: usize,
}

/// The name a stored policy version goes by once applied (in messages that cite its lines):
/// the same on every replica, whether it was applied there or read from the change feed, so
/// the registry knows a version read back as the one in force and does not compile it again.
pub fn stored_name(version: i64) -> String {
    format!("policy v{version}")
}

/// Checks (and with `apply`, stores and pushes) a policy file sent base64-encoded. A refusal is
/// an `ok: false` outcome, audited as `policy.refused` when applying; the previous policy stays.
pub fn check(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    file_name: &str,
    content_b64: &str,
    apply: bool,
    now: i64,
) -> Result<PolicyOutcome> {
    check_applied(store, live, snap, file_name, content_b64, apply, now).map(|(out, _)| out)
}

/// [`check`], and when the policy was applied, what its check computed. The registry gets the
/// compile with the policy ([`Notice::Policy`]) and uses it when it still matches its own
/// directory: one compile per apply, not one here and one there.
pub fn check_applied(
    store: &dyn Store,
    live: &dyn Live,
    snap: &Snapshot,
    file_name: &str,
    content_b64: &str,
    apply: bool,
    now: i64,
) -> Result<(PolicyOutcome, Option<Applied>)> {
    use base64::Engine;
    let started = std::time::Instant::now();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(content_b64)
        .map_err(|_| anyhow!("policy content is not valid base64"))?;
    let refuse =
        |msg: String, tests: Vec<PolicyTestView>| -> Result<(PolicyOutcome, Option<Applied>)> {
            if apply {
                store.append_audit(
                    Audit {
                        actor: "admin",
                        action: Action::PolicyRefused,
                        target: file_name,
                        detail: serde_json::json!({ "reason": msg }),
                    },
                    now,
                )?;
                tracing::warn!(file = file_name, reason = %msg, "policy refused");
            }
            Ok((
                PolicyOutcome {
                    ok: false,
                    message: msg,
                    tests,
                    warnings: vec![],
                    changes: vec![],
                    devices: None,
                    version: None,
                    shadow_rules: None,
                },
                None,
            ))
        };
    let mut p = match policy::parse(&bytes, file_name) {
        Ok(p) => p,
        Err(e) => return refuse(e.to_string(), vec![]),
    };
    let warnings: Vec<String> = policy::warnings(&p, &snap.directory)
        .iter()
        .map(|w| w.to_string())
        .collect();
    // Access as it would be: every device's latest posture judged by this policy's requirements.
    let t = std::time::Instant::now();
    let dir = live.directory_for(&p)?;
    let judge_ms = t.elapsed().as_millis();
    let t = std::time::Instant::now();
    let compiled = policy::compile(&p, &dir, now);
    let compile_ms = t.elapsed().as_millis();
    let t = std::time::Instant::now();
    let outcomes = policy::run_tests(&p, &dir, now);
    let tests_ms = t.elapsed().as_millis();
    let failed = outcomes.iter().filter(|t| !t.pass).count();
    let tests: Vec<PolicyTestView> = outcomes
        .iter()
        .map(|t| PolicyTestView {
            pass: t.pass,
            text: format!(
                "{}: {} -> {} expected {}, got {}: {}",
                t.pos,
                t.from,
                t.target,
                if t.expect_allow { "allow" } else { "deny" },
                if t.allowed { "allow" } else { "deny" },
                t.why
            ),
        })
        .collect();
    if failed > 0 {
        return refuse(
            format!(
                "{failed} of {} policy tests failed; nothing was applied",
                outcomes.len()
            ),
            tests,
        );
    }
    let t = std::time::Instant::now();
    let (shown, change_count) =
        policy::diff_bounded(&snap.compiled, &compiled, &dir, MAX_CHANGES_LISTED);
    let diff_ms = t.elapsed().as_millis();
    let changes = listed(&shown, change_count);
    drop(shown);
    let mut out = PolicyOutcome {
        ok: true,
        message: "policy is valid and its tests pass".into(),
        tests,
        warnings,
        changes,
        devices: Some(compiled.devices.len()),
        version: None,
        shadow_rules: None,
    };
    let (shadow, shadow_remove) = p.shadow_counts();
    if shadow + shadow_remove > 0 {
        out.shadow_rules = Some(ShadowRulesView {
            shadow,
            shadow_remove,
        });
    }
    if apply {
        let text = String::from_utf8(bytes).map_err(|_| anyhow!("policy is not UTF-8"))?;
        let sha = hex::encode(sha2::Sha256::digest(text.as_bytes()));
        let summary = if out.changes.is_empty() {
            "no access changes".to_string()
        } else {
            out.changes.join("; ")
        };
        let version = store.save_policy(&text, &sha, &summary, "admin", now)?;
        p.file = stored_name(version);
        let applied = Applied {
            version,
            directory: Arc::new(dir),
            compiled: Arc::new(compiled),
            tests: outcomes.len(),
        };
        let handover = crate::registry::PolicyCompile {
            compiled: Arc::clone(&applied.compiled),
            directory: Arc::clone(&applied.directory),
            at_ms: now,
        };
        live.notify(Notice::Policy(
            p,
            u64::try_from(version).unwrap_or(0),
            Some(handover),
        ));
        tracing::info!(
            version,
            changes = change_count,
            elapsed_ms = started.elapsed().as_millis(),
            judge_ms,
            compile_ms,
            tests_ms,
            diff_ms,
            "policy applied"
        );
        out.version = Some(version);
        return Ok((out, Some(applied)));
    }
    Ok((out, None))
}

/// `policy explain SRC DST` under the applied policy (an empty one denies everything).
pub fn explain(
    applied: Option<&Policy>,
    dir: &Directory,
    src: &str,
    dst: &str,
    now: i64,
) -> Result<ExplainView> {
    let empty;
    let p = match applied {
        Some(p) => p,
        None => {
            empty = policy::parse(b"", "no policy").map_err(|e| anyhow!("{e}"))?;
            &empty
        }
    };
    let e = policy::explain(p, dir, src, dst, now).map_err(|e| anyhow!("{e}"))?;
    Ok(ExplainView {
        allowed: e.allowed,
        src: e.src.clone(),
        dst: e.dst.clone(),
        target: e.target.clone(),
        devices: e
            .devices
            .iter()
            .map(|d| ExplainDeviceView {
                src: d.src_hostname.clone(),
                dst: d.dst_hostname.clone(),
                allowed: d.allowed,
                allowed_by: d.allowed_by.iter().map(|(r, _)| r.clone()).collect(),
                misses: d
                    .misses
                    .iter()
                    .map(|m| ExplainMissView {
                        rule: m.rule.clone(),
                        reasons: m.reasons.clone(),
                    })
                    .collect(),
                blocked: d.blocked.clone(),
            })
            .collect(),
        notes: e.notes.clone(),
        shadow: e.candidate.as_ref().map(|c| {
            if c.allowed {
                "would-allow".to_string()
            } else {
                "would-deny".to_string()
            }
        }),
        text: e.to_string(),
    })
}

/// Adds the behaviour-risk check of every rule in the explanation whose posture has
/// `max_risk`: the requirement, the cap, the source device's risk now and whether it passes.
/// `risk` gives a device's risk and why (the registry's view); `ask` the "sign in again"
/// reason of a requirement the device fails under `risk_signin_above`.
pub fn add_risk_checks(
    view: &mut ExplainView,
    applied: Option<&Policy>,
    dir: &Directory,
    risk: &dyn Fn(ward_shared::wire::DeviceId) -> (u8, String),
    ask: &dyn Fn(ward_shared::wire::DeviceId, &str) -> Option<String>,
) {
    let Some(p) = applied else {
        return;
    };
    let mut lines: Vec<String> = Vec::new();
    for d in &view.devices {
        let Some(src) = dir.devices.iter().find(|x| x.hostname == d.src) else {
            continue;
        };
        let rules = d.allowed_by.iter().chain(d.misses.iter().map(|m| &m.rule));
        for name in rules {
            let Some(rule) = p.rules.iter().find(|r| &r.name == name) else {
                continue;
            };
            for req in &rule.posture {
                if let Some(level) = p.postures.get(&req.value).and_then(|q| q.risk_signin_above) {
                    let (score, _) = risk(src.id);
                    let verdict = match ask(src.id, &req.value) {
                        Some(why) => format!("fails: {why}"),
                        None if score > level => "passes: signed in since the risk rose".into(),
                        None => "passes".to_string(),
                    };
                    let line = format!(
                        "sign-in check: rule {:?} needs posture {:?} (risk_signin_above {level}); {}'s risk is {score}, {verdict}",
                        rule.name, req.value, src.hostname
                    );
                    if !lines.contains(&line) {
                        lines.push(line);
                    }
                }
                let Some(max) = p.postures.get(&req.value).and_then(|q| q.max_risk) else {
                    continue;
                };
                let (score, why) = risk(src.id);
                let verdict = if score > max {
                    format!("fails: {why}")
                } else {
                    "passes".to_string()
                };
                let line = format!(
                    "risk check: rule {:?} needs posture {:?} (max_risk {max}); {}'s risk is {score}, {verdict}",
                    rule.name, req.value, src.hostname
                );
                if !lines.contains(&line) {
                    lines.push(line);
                }
            }
        }
    }
    for l in lines {
        view.text.push_str(&format!("\n  {l}"));
        view.notes.push(l);
    }
}

/// A routed destination in `policy explain`: `IP:PORT[/PROTO]`, `IP:icmp` or `IP` (tcp, any
/// port is not supported: a port is needed) outside the overlay. `None`: not a routed address
/// (explained as a service or device).
pub fn routed_target(
    dst: &str,
    me: &super::ops::Identity,
) -> Option<(
    std::net::IpAddr,
    ward_shared::filter::Proto,
    u16,
    std::net::Ipv6Addr,
)> {
    use ward_shared::filter::Proto;
    let v6 = match me
        .ipv6_prefix
        .parse::<ward_shared::routes::Prefix>()
        .ok()?
        .addr()
    {
        std::net::IpAddr::V6(a) => a,
        std::net::IpAddr::V4(_) => return None,
    };
    let (host, rest) = match dst.rsplit_once(':') {
        Some((h, r)) if h.parse::<std::net::IpAddr>().is_ok() => (h, Some(r)),
        _ => (dst, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().ok()?;
    let overlay = ward_shared::routes::overlaps_overlay(&ward_shared::routes::Prefix::host(ip), v6);
    if overlay {
        return None;
    }
    let (proto, port) = match rest {
        None => (Proto::Tcp, 0),
        Some("icmp") => (Proto::Icmp, 0),
        Some(r) => {
            let (p, pr) = match r.split_once('/') {
                Some((p, "udp")) => (p, Proto::Udp),
                Some((p, "tcp")) | Some((p, "")) => (p, Proto::Tcp),
                Some(_) => return None,
                None => (r, Proto::Tcp),
            };
            (pr, p.parse().ok()?)
        }
    };
    Some((ip, proto, port, v6))
}

/// `policy explain SRC IP:PORT` for a routed address: through which approved router, by which
/// rule, or why not.
pub fn explain_routed(
    applied: Option<&Policy>,
    dir: &Directory,
    routers: &[policy::Router],
    v6: std::net::Ipv6Addr,
    src: &str,
    (ip, proto, port): (std::net::IpAddr, ward_shared::filter::Proto, u16),
    now: i64,
) -> Result<ExplainView> {
    let empty;
    let p = match applied {
        Some(p) => p,
        None => {
            empty = policy::parse(b"", "no policy").map_err(|e| anyhow!("{e}"))?;
            &empty
        }
    };
    let e = policy::explain_routed(p, dir, routers, v6, src, ip, proto, port, now);
    Ok(ExplainView {
        allowed: e.allowed,
        src: e.src.clone(),
        dst: ip.to_string(),
        target: match proto {
            ward_shared::filter::Proto::Icmp => format!("{ip} (icmp)"),
            ward_shared::filter::Proto::Tcp => format!("{ip}:{port}/tcp"),
            ward_shared::filter::Proto::Udp => format!("{ip}:{port}/udp"),
        },
        devices: Vec::new(),
        notes: e.lines.clone(),
        shadow: None,
        text: e.to_string(),
    })
}

/// At most this many access changes are listed in a policy check's or apply's answer (and the
/// stored summary): a change to a rule every device falls under lists one line per device pair
/// and service (two million at 10 000 devices, over 64 MiB of answer); the rest are counted.
pub const MAX_CHANGES_LISTED: usize = 1000;

/// The listed changes as text, then one line counting the others (`total` in all).
fn listed<T: std::fmt::Display>(shown: &[T], total: usize) -> Vec<String> {
    let mut out: Vec<String> = shown.iter().map(|c| c.to_string()).collect();
    if total > shown.len() {
        out.push(format!(
            "… and {} more access changes (not listed)",
            total - shown.len()
        ));
    }
    out
}

#[cfg(test)]
mod listing_tests {
    use super::listed;

    #[test]
    fn changes_beyond_the_bound_are_counted_not_listed() {
        let few = ["a", "b"];
        assert_eq!(
            listed(&few, 2),
            vec!["a", "b"],
            "within the bound: all listed"
        );
        let many = ["a", "b"];
        assert_eq!(
            listed(&many, 5),
            vec!["a", "b", "… and 3 more access changes (not listed)"]
        );
        let none: [&str; 0] = [];
        assert!(listed(&none, 0).is_empty(), "no change: nothing listed");
    }
}
