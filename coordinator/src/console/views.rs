//! The console's pages as pure functions from the admin API's typed answers to HTML: no I/O,
//! no clock (time is passed in), so every page is testable without a server. Every value is
//! escaped through [`esc`].

use std::collections::BTreeMap;
use std::fmt::Write;

use super::html::{dur_ms, esc, page, post_form, table};
use super::svg::{self, Edge, Series};
use crate::admin::api::{
    fmt_time, AuditVerifyView, AuditView, DeviceDetail, DeviceView, FlowsTopView, GrantView,
    MaturityHistoryView, MaturityView, PolicyShowView, PolicyVersionView,
};
use crate::maturity::{Pillar, Stage};
use crate::model::DeviceState;
use ward_shared::wire::PostureVerdict;

/// A device and, when known, its posture verdict.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device: DeviceView,
    pub posture: Option<PostureVerdict>,
}

/// The devices page: state, user, tags, posture (pass/fail and why), lease and key age,
/// path, and a quarantine (or release) button per device.
pub fn devices(csrf: &str, now_ms: i64, rows: &[DeviceRow]) -> String {
    let headers = [
        "Device", "State", "User", "Tags", "Address", "Posture", "Lease", "Key age", "Path",
        "Action",
    ];
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let d = &r.device;
            let name = d.hostname.to_string();
            vec![
                format!(
                    r#"<a href="/devices/{}" class="device-name">{}</a>"#,
                    esc(&url_path(&name)),
                    esc(&name)
                ),
                state_cell(d),
                esc(d.user.as_deref().unwrap_or("-")),
                esc(&list(&d.tags)),
                esc(&d.ipv4.to_string()),
                posture_cell(r.posture.as_ref()),
                match d.lease_expires_ms {
                    Some(t) => format!("expires in {}", esc(&dur_ms(t - now_ms))),
                    None => "none".into(),
                },
                d.lease_issued_ms
                    .map(|t| esc(&dur_ms(now_ms - t)))
                    .unwrap_or_else(|| "-".into()),
                path_cell(d),
                action_cell(csrf, d),
            ]
        })
        .collect();
    let summary = format!(
        "<p class=\"note\">{} devices, {} online.</p>",
        rows.len(),
        rows.iter().filter(|r| r.device.online).count()
    );
    page(
        "Devices",
        csrf,
        &(summary + &table("devices", &headers, &body)),
    )
}

/// One device: its fields, posture verdict in full, and the quarantine/release button.
pub fn device(csrf: &str, now_ms: i64, d: &DeviceDetail) -> String {
    let v = &d.device;
    let name = v.hostname.to_string();
    let mut rows = vec![
        ("State", state_cell(v)),
        ("User", esc(v.user.as_deref().unwrap_or("-"))),
        ("Tags", esc(&list(&v.tags))),
        ("Addresses", esc(&format!("{} {}", v.ipv4, v.ipv6))),
        ("OS", esc(&v.os)),
        ("Online", v.online.to_string()),
        ("Last seen", esc(&fmt_time(v.last_seen_ms))),
        (
            "Lease",
            match v.lease_expires_ms {
                Some(t) => format!(
                    "serial {} expires in {}",
                    v.lease_serial.unwrap_or(0),
                    esc(&dur_ms(t - now_ms))
                ),
                None => "none".into(),
            },
        ),
        ("Key rotations", v.rotations.to_string()),
        (
            "Endpoints",
            esc(&v
                .endpoints
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")),
        ),
    ];
    if let Some(q) = &v.quarantine {
        rows.push((
            "Quarantine",
            format!("since {}: {}", esc(&fmt_time(q.since_ms)), esc(&q.reason)),
        ));
    }
    let mut s = String::from("<table id=\"device\"><tbody>");
    for (k, val) in rows {
        let _ = write!(s, "<tr><th>{k}</th><td>{val}</td></tr>");
    }
    s.push_str("</tbody></table>");
    let _ = write!(s, "<h2>Posture</h2>{}", posture_detail(&d.posture));
    s.push_str("<h2>Actions</h2>");
    s.push_str(&action_cell(csrf, v));
    page(&format!("Device {name}"), csrf, &s)
}

/// The flow graph: who talks to whom in the window, allowed (green) and denied (red, dashed)
/// edges, with the table it is drawn from.
pub fn graph(csrf: &str, window: &str, top: &[FlowsTopView]) -> String {
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for t in top {
        let e = edges
            .entry((t.initiator.clone(), t.responder.clone()))
            .or_insert_with(|| Edge {
                from: t.initiator.clone(),
                to: t.responder.clone(),
                ..Edge::default()
            });
        e.denied += t.denied;
        e.allowed += t.flows.saturating_sub(t.denied);
        let p = proto_port(t);
        if !e.ports.contains(&p) {
            e.ports.push(p);
        }
    }
    let edges: Vec<Edge> = edges.into_values().collect();
    let rows: Vec<Vec<String>> = top
        .iter()
        .map(|t| {
            vec![
                esc(&t.initiator),
                esc(&t.responder),
                esc(&proto_port(t)),
                t.flows.to_string(),
                if t.denied > 0 {
                    format!("<span class=\"fail\">{}</span>", t.denied)
                } else {
                    "0".into()
                },
                t.bytes.to_string(),
            ]
        })
        .collect();
    let body = format!(
        r#"<p class="note">Flows in the last {w} (both ends' records). Green: allowed; red dashed: denied. Windows: <a href="/graph?since=1h">1h</a> <a href="/graph?since=1d">1d</a> <a href="/graph?since=7d">7d</a></p>
{svg}
{table}"#,
        w = esc(window),
        svg = svg::flow_graph(&edges),
        table = table(
            "flows",
            &["From", "To", "Port", "Flows", "Denied", "Bytes"],
            &rows
        ),
    );
    page("Flow graph", csrf, &body)
}

/// Two versions' texts to compare on the policy page.
#[derive(Debug, Clone)]
pub struct PolicyDiff {
    pub from: i64,
    pub to: i64,
    pub old: String,
    pub new: String,
}

/// The policy page: the current text, the version history, and a diff between two versions.
pub fn policy(
    csrf: &str,
    current: &PolicyShowView,
    history: &[PolicyVersionView],
    diff: Option<&PolicyDiff>,
) -> String {
    let mut s = String::new();
    match (&current.version, &current.text) {
        (Some(v), Some(t)) => {
            let _ = write!(
                s,
                "<p>Version {v}, applied {}.</p><pre id=\"policy-text\">{}</pre>",
                esc(&current.created_ms.map(fmt_time).unwrap_or_default()),
                esc(t)
            );
        }
        _ => s.push_str("<p class=\"fail\">No policy applied: everything is denied.</p>"),
    }
    s.push_str("<h2>History</h2>");
    let rows: Vec<Vec<String>> = history
        .iter()
        .rev()
        .map(|h| {
            let prev = history
                .iter()
                .filter(|p| p.version < h.version)
                .map(|p| p.version)
                .max();
            vec![
                h.version.to_string(),
                esc(&fmt_time(h.created_ms)),
                esc(&h.actor),
                esc(&h.summary),
                match prev {
                    Some(p) => format!(
                        r#"<a href="/policy?from={p}&amp;to={v}">diff {p} → {v}</a>"#,
                        v = h.version
                    ),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    s.push_str(&table(
        "policy-history",
        &["Version", "Applied", "By", "Changes", "Diff"],
        &rows,
    ));
    if let Some(d) = diff {
        let _ = write!(
            s,
            "<h2>Changes from version {} to {}</h2><pre id=\"policy-diff\">",
            d.from, d.to
        );
        for (op, line) in line_diff(&d.old, &d.new) {
            let (class, mark) = match op {
                Op::Same => ("same", ' '),
                Op::Add => ("add", '+'),
                Op::Del => ("del", '-'),
            };
            let _ = writeln!(s, "<span class=\"{class}\">{mark} {}</span>", esc(line));
        }
        s.push_str("</pre>");
    }
    page("Policy", csrf, &s)
}

/// Grants with the time each has left (expired ones are not listed by the coordinator).
pub fn grants(csrf: &str, now_ms: i64, grants: &[GrantView]) -> String {
    let rows: Vec<Vec<String>> = grants
        .iter()
        .map(|g| {
            let left = g.not_after_ms - now_ms;
            vec![
                esc(&g.id),
                esc(&g.principal),
                esc(&g.service),
                if left > 0 {
                    esc(&dur_ms(left))
                } else {
                    "<span class=\"fail\">expired</span>".into()
                },
                esc(g.reason.as_deref().unwrap_or("-")),
                esc(&g.actor),
            ]
        })
        .collect();
    let body = if rows.is_empty() {
        "<p class=\"note\">No active grants.</p>".to_string()
    } else {
        table(
            "grants",
            &["Id", "Who", "Service", "Time left", "Reason", "By"],
            &rows,
        )
    };
    page("Grants", csrf, &body)
}

/// Quarantined devices, why and since when, each with a release button.
pub fn quarantine(csrf: &str, now_ms: i64, devices: &[DeviceView]) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .filter_map(|d| {
            let q = d.quarantine.as_ref()?;
            Some(vec![
                esc(&d.hostname.to_string()),
                esc(&q.reason),
                if q.automatic {
                    "trust rule"
                } else {
                    "administrator"
                }
                .into(),
                format!(
                    "{} ({} ago)",
                    esc(&fmt_time(q.since_ms)),
                    esc(&dur_ms(now_ms - q.since_ms))
                ),
                post_form(
                    "/release",
                    csrf,
                    &[("name", &d.hostname.to_string())],
                    "Release",
                    "release",
                ),
            ])
        })
        .collect();
    let body = if rows.is_empty() {
        "<p class=\"note\">No device is quarantined.</p>".to_string()
    } else {
        table(
            "quarantine",
            &["Device", "Reason", "By", "Since", "Action"],
            &rows,
        )
    };
    page("Quarantine", csrf, &body)
}

/// The audit log, newest first, under the chain verification result.
pub fn audit(csrf: &str, entries: &[AuditView], verify: &AuditVerifyView) -> String {
    let mut s = format!(
        "<p id=\"audit-verify\" class=\"{}\">Chain verification: {} ({} rows): {}</p>",
        if verify.ok { "pass" } else { "fail" },
        if verify.ok { "OK" } else { "FAILED" },
        verify.rows,
        esc(&verify.message)
    );
    let rows: Vec<Vec<String>> = entries
        .iter()
        .rev()
        .map(|e| {
            vec![
                e.seq.to_string(),
                esc(&fmt_time(e.ts_ms)),
                esc(&e.actor),
                esc(&e.action),
                esc(&e.target),
                esc(&e.detail.to_string()),
            ]
        })
        .collect();
    s.push_str(&table(
        "audit",
        &["Seq", "Time", "Actor", "Action", "Target", "Detail"],
        &rows,
    ));
    page("Audit log", csrf, &s)
}

/// The live maturity assessment per pillar and its recorded history as a chart.
pub fn maturity(csrf: &str, live: &MaturityView, history: &MaturityHistoryView) -> String {
    let mut s = String::from("<h2>Now</h2>");
    let rows: Vec<Vec<String>> = live
        .assessment
        .pillars
        .iter()
        .map(|p| {
            let next: Vec<String> = p
                .functions
                .iter()
                .filter(|f| f.stage == p.stage)
                .filter_map(|f| f.next_step.clone())
                .collect();
            vec![
                esc(p.pillar.as_str()),
                esc(p.stage.as_str()),
                esc(&p.weakest),
                esc(&next.join("; ")),
            ]
        })
        .collect();
    s.push_str(&table(
        "maturity-now",
        &["Pillar", "Stage", "Weakest function", "Next step"],
        &rows,
    ));
    let _ = write!(
        s,
        "<h2>History</h2><p class=\"{}\">{} recorded assessments; hash chain {}.</p>",
        if history.verified { "pass" } else { "fail" },
        history.entries.len(),
        if history.verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
    let stages: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
    // The live assessment is the chart's last point, so a single recorded day still draws a line.
    let mut labels: Vec<String> = history
        .entries
        .iter()
        .map(|e| fmt_time(e.ts_ms).chars().take(10).collect())
        .collect();
    labels.push("now".into());
    let series: Vec<Series> = Pillar::ALL
        .iter()
        .map(|&p| Series {
            name: p.as_str().to_string(),
            points: history
                .entries
                .iter()
                .map(|e| e.stages.get(&p).copied())
                .chain(std::iter::once(live.assessment.stage(p)))
                .map(|st| stage_index(st.unwrap_or(Stage::Traditional)))
                .collect(),
        })
        .collect();
    s.push_str(&svg::maturity_chart(&stages, &labels, &series));
    page("Maturity", csrf, &s)
}

/// An error page with the session's frame (4xx/5xx bodies).
pub fn error(csrf: &str, message: &str) -> String {
    page(
        "Error",
        csrf,
        &format!("<p class=\"fail\" id=\"error\">{}</p>", esc(message)),
    )
}

/// Line diff operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Same,
    Add,
    Del,
}

/// A line diff (longest common subsequence; inputs over 2 000 lines each are compared as
/// whole-text replacement, to bound the work).
pub fn line_diff<'a>(old: &'a str, new: &'a str) -> Vec<(Op, &'a str)> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    if a.len() > 2000 || b.len() > 2000 {
        return a
            .iter()
            .map(|l| (Op::Del, *l))
            .chain(b.iter().map(|l| (Op::Add, *l)))
            .collect();
    }
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0u16; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n && j < m {
        if a[i] == b[j] {
            out.push((Op::Same, a[i]));
            i += 1;
            j += 1;
        } else if lcs[i + 1][j] >= lcs[i][j + 1] {
            out.push((Op::Del, a[i]));
            i += 1;
        } else {
            out.push((Op::Add, b[j]));
            j += 1;
        }
    }
    out.extend(a[i..].iter().map(|l| (Op::Del, *l)));
    out.extend(b[j..].iter().map(|l| (Op::Add, *l)));
    out
}

fn stage_index(s: Stage) -> u8 {
    Stage::ALL
        .iter()
        .position(|x| *x == s)
        .and_then(|i| u8::try_from(i).ok())
        .unwrap_or(0)
}

fn state_cell(d: &DeviceView) -> String {
    let st = d.state.as_str();
    let online = if d.online { "online" } else { "offline" };
    format!(
        r#"<span class="state state-{st}" data-state="{st}">{st}</span> <span class="note">{online}</span>"#
    )
}

fn posture_cell(v: Option<&PostureVerdict>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    if v.results.is_empty() {
        return "<span class=\"note\">no requirements</span>".into();
    }
    v.results
        .iter()
        .map(|e| {
            if e.passed {
                format!("<span class=\"pass\">{}: pass</span>", esc(&e.requirement))
            } else {
                format!(
                    "<span class=\"fail\">{}: FAIL</span> <span class=\"note\">{}</span>",
                    esc(&e.requirement),
                    esc(&e.failures.join("; "))
                )
            }
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

fn posture_detail(v: &PostureVerdict) -> String {
    let mut s = String::from("<ul id=\"posture\">");
    for l in v.lines() {
        let _ = write!(s, "<li>{}</li>", esc(&l));
    }
    s.push_str("</ul>");
    s
}

fn path_cell(d: &DeviceView) -> String {
    if !d.online {
        return "-".into();
    }
    match &d.relay {
        Some(r) => format!("relayed via {}", esc(r)),
        None => "direct".into(),
    }
}

fn action_cell(csrf: &str, d: &DeviceView) -> String {
    let name = d.hostname.to_string();
    match d.state {
        DeviceState::Quarantined => {
            post_form("/release", csrf, &[("name", &name)], "Release", "release")
        }
        DeviceState::Active => post_form(
            "/quarantine",
            csrf,
            &[("name", &name)],
            "Quarantine",
            "quarantine",
        ),
        DeviceState::UserDisabled | DeviceState::Revoked => "-".into(),
    }
}

fn proto_port(t: &FlowsTopView) -> String {
    let p = format!("{:?}", t.proto).to_lowercase();
    if t.port == 0 {
        p
    } else {
        format!("{p}/{}", t.port)
    }
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// Percent-encodes a path segment (names are DNS labels today; this keeps any byte safe).
pub fn url_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeviceStatus, Quarantine};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use ward_shared::names::Hostname;
    use ward_shared::posture::Evaluation;

    const NOW: i64 = 1_800_000_000_000;

    fn dev(name: &str, state: DeviceState) -> DeviceView {
        DeviceView {
            id: "d1".into(),
            hostname: Hostname::parse(name).unwrap(),
            name_bound: true,
            user: Some("alice".into()),
            user_disabled: false,
            tags: vec!["web".into()],
            ipv4: Ipv4Addr::new(100, 64, 0, 1),
            ipv6: Ipv6Addr::LOCALHOST,
            os: "linux".into(),
            status: DeviceStatus::Active,
            created_ms: NOW,
            last_seen_ms: NOW,
            cert_not_after_ms: 0,
            revoked_ms: None,
            wg_public_key: None,
            endpoints: vec![],
            quarantine: (state == DeviceState::Quarantined).then(|| Quarantine {
                since_ms: NOW - 60_000,
                reason: "<img src=x onerror=alert(1)>".into(),
                automatic: false,
            }),
            lease_expires_ms: Some(NOW + 300_000),
            lease_serial: Some(4),
            lease_key: None,
            lease_issued_ms: Some(NOW - 120_000),
            relay: Some("r1".into()),
            rotations: 3,
            online: true,
            state,
        }
    }

    /// No `<script`, `<img` or event-handler markup survives from attacker-controlled values.
    fn assert_inert(html: &str) {
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
    }

    #[test]
    fn devices_page_shows_state_posture_lease_and_path() {
        let mut v = PostureVerdict::default();
        v.results.push(Evaluation {
            requirement: "baseline".into(),
            passed: false,
            failures: vec!["firewall: no host firewall is active".into()],
        });
        let html = devices(
            "tok",
            NOW,
            &[
                DeviceRow {
                    device: dev("web1", DeviceState::Active),
                    posture: Some(v),
                },
                DeviceRow {
                    device: dev("db1", DeviceState::Quarantined),
                    posture: None,
                },
            ],
        );
        assert!(html.contains(r#"data-state="active""#));
        assert!(html.contains(r#"data-state="quarantined""#));
        assert!(html.contains("baseline: FAIL"));
        assert!(html.contains("no host firewall is active"));
        assert!(html.contains("expires in 5m"));
        assert!(html.contains("relayed via r1"));
        assert!(html.contains(r#"action="/quarantine""#));
        assert!(html.contains(r#"action="/release""#));
        assert!(html.contains(r#"name="csrf" value="tok""#));
        assert_inert(&html);
    }

    #[test]
    fn attacker_controlled_values_render_inert() {
        // Hostnames are DNS labels, so the markup arrives through what a device reports
        // itself (OS string, posture failure text, tags via admin) and reasons.
        let mut d = dev("web1", DeviceState::Quarantined);
        d.os = "<script>alert(1)</script>".into();
        d.tags = vec!["<script>x</script>".into()];
        d.user = Some("\"><script>alert(2)</script>".into());
        let mut v = PostureVerdict::default();
        v.results.push(Evaluation {
            requirement: "<script>r</script>".into(),
            passed: false,
            failures: vec!["<script>f</script>".into()],
        });
        let detail = DeviceDetail {
            device: d.clone(),
            posture: v.clone(),
            posture_report: None,
            stored_posture: None,
            flows: None,
            sign_in: None,
        };
        for html in [
            devices(
                "t",
                NOW,
                &[DeviceRow {
                    device: d.clone(),
                    posture: Some(v),
                }],
            ),
            device("t", NOW, &detail),
            quarantine("t", NOW, std::slice::from_ref(&d)),
            graph(
                "t",
                "1d",
                &[FlowsTopView {
                    initiator: "<script>a</script>".into(),
                    responder: "b".into(),
                    proto: ward_shared::filter::Proto::Tcp,
                    port: 22,
                    bytes: 1,
                    flows: 2,
                    denied: 1,
                    spans: 1,
                }],
            ),
            error("t", "<script>e</script>"),
        ] {
            assert_inert(&html);
            assert!(
                html.contains("&lt;script&gt;") || html.contains("&lt;img"),
                "{html}"
            );
        }
    }

    #[test]
    fn quarantine_page_lists_only_quarantined_devices_with_release() {
        let html = quarantine(
            "t",
            NOW,
            &[
                dev("web1", DeviceState::Active),
                dev("db1", DeviceState::Quarantined),
            ],
        );
        assert!(html.contains("db1") && !html.contains(">web1<"), "{html}");
        assert_eq!(html.matches(r#"action="/release""#).count(), 1);
        assert!(html.contains("60s ago"), "{html}");
        assert!(quarantine("t", NOW, &[]).contains("No device is quarantined"));
    }

    #[test]
    fn grants_show_time_left() {
        let g = GrantView {
            id: "g1".into(),
            principal: "alice".into(),
            service: "db".into(),
            not_after_ms: NOW + 90 * 60_000,
            reason: Some("incident".into()),
            actor: "admin".into(),
            created_ms: NOW,
        };
        let html = grants("t", NOW, &[g]);
        assert!(html.contains("<td>90m</td>"), "{html}");
    }

    #[test]
    fn policy_diff_marks_added_and_removed_lines() {
        let d = line_diff("a\nb\nc\n", "a\nc\nd\n");
        assert_eq!(
            d,
            vec![
                (Op::Same, "a"),
                (Op::Del, "b"),
                (Op::Same, "c"),
                (Op::Add, "d")
            ]
        );
        let html = policy(
            "t",
            &PolicyShowView {
                version: Some(2),
                text: Some("x = \"<b>\"".into()),
                created_ms: Some(NOW),
                sha256: None,
            },
            &[
                PolicyVersionView {
                    version: 1,
                    created_ms: NOW - 1000,
                    actor: "admin".into(),
                    sha256: "s".into(),
                    summary: "first".into(),
                },
                PolicyVersionView {
                    version: 2,
                    created_ms: NOW,
                    actor: "admin".into(),
                    sha256: "t".into(),
                    summary: "second".into(),
                },
            ],
            Some(&PolicyDiff {
                from: 1,
                to: 2,
                old: "a\nb".into(),
                new: "a\n<c>".into(),
            }),
        );
        assert!(html.contains("from=1&amp;to=2"));
        assert!(html.contains("<span class=\"del\">- b</span>"));
        assert!(html.contains("<span class=\"add\">+ &lt;c&gt;</span>"));
        assert!(!html.contains("<b>") && !html.contains("<c>"));
    }

    #[test]
    fn url_path_encodes_everything_but_safe_bytes() {
        assert_eq!(url_path("web-1.x"), "web-1.x");
        assert_eq!(url_path("a/b?c"), "a%2Fb%3Fc");
    }
}
