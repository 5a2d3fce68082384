//! HTML building blocks: escaping, the page frame, forms. Every value that reaches a page goes
//! through [`esc`] (text and attribute values alike), because device names, tags, posture
//! reasons and audit details are attacker-controlled.

use std::fmt::Write;

/// Escapes text for HTML element content and double- or single-quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The console's pages, for the navigation bar.
pub const NAV: &[(&str, &str)] = &[
    ("/devices", "Devices"),
    ("/graph", "Flow graph"),
    ("/policy", "Policy"),
    ("/grants", "Grants"),
    ("/quarantine", "Quarantine"),
    ("/audit", "Audit log"),
    ("/maturity", "Maturity"),
];

/// A whole page: title, navigation, a sign-out form (carrying the CSRF token) and the body.
pub fn page(title: &str, csrf: &str, body: &str) -> String {
    let mut nav = String::new();
    for (href, name) in NAV {
        let _ = write!(nav, r#"<a href="{href}">{name}</a> "#);
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t} · Ward console</title>
<link rel="stylesheet" href="/static/console.css"></head>
<body><header><strong>Ward</strong> <nav>{nav}</nav>{signout}</header>
<main><h1>{t}</h1>
{body}
</main></body></html>
"#,
        t = esc(title),
        signout = post_form("/logout", csrf, &[], "Sign out", "signout"),
    )
}

/// A page shown without a session (sign-in hints and errors).
pub fn bare_page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t} · Ward console</title>
<link rel="stylesheet" href="/static/console.css"></head>
<body><main><h1>{t}</h1>
{body}
</main></body></html>
"#,
        t = esc(title),
    )
}

/// A POST form with the CSRF token, hidden fields and one submit button.
pub fn post_form(
    action: &str,
    csrf: &str,
    fields: &[(&str, &str)],
    button: &str,
    class: &str,
) -> String {
    let mut s = format!(
        r#"<form method="post" action="{}" class="{}"><input type="hidden" name="csrf" value="{}">"#,
        esc(action),
        esc(class),
        esc(csrf)
    );
    for (k, v) in fields {
        let _ = write!(
            s,
            r#"<input type="hidden" name="{}" value="{}">"#,
            esc(k),
            esc(v)
        );
    }
    let _ = write!(
        s,
        r#"<button type="submit">{}</button></form>"#,
        esc(button)
    );
    s
}

/// A table from a header row and rows of already-escaped cells.
pub fn table(id: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(r#"<table id="{}"><thead><tr>"#, esc(id));
    for h in headers {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            let _ = write!(s, "<td>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// A duration in the CLI's style (`42s`, `5m`, `3h`, `2d`); negative is `0s`.
pub fn dur_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The style sheet served at `/static/console.css` (a file, because the CSP allows no inline
/// style).
pub const CSS: &str = r#"
body{font-family:system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:.6em 1em;display:flex;gap:1em;align-items:center}
header a{color:#cfe3ff;margin-right:.8em;text-decoration:none}
header form{margin-left:auto}
main{padding:1em 2em}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.5em}
th,td{border:1px solid #d5d9e0;padding:.3em .6em;text-align:left;vertical-align:top;font-size:.92em}
th{background:#eef1f5}
.pass{color:#17692e}.fail{color:#a11d1d;font-weight:600}
.state-active{color:#17692e}.state-quarantined{color:#a15c00;font-weight:600}
.state-revoked,.state-user-disabled{color:#a11d1d}
form{display:inline}
pre{background:#fff;border:1px solid #d5d9e0;padding:.6em;overflow:auto}
.add{color:#17692e}.del{color:#a11d1d}
.note{color:#5a6472}
svg{background:#fff;border:1px solid #d5d9e0}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        let f = post_form("/x", "t\"><script>", &[("name", "a\"b")], "<b>", "c");
        assert!(!f.contains("<script>") && !f.contains("<b>"), "{f}");
        assert!(f.contains("a&quot;b"));
    }

    #[test]
    fn durations() {
        assert_eq!(dur_ms(-5), "0s");
        assert_eq!(dur_ms(42_000), "42s");
        assert_eq!(dur_ms(600_000), "10m");
        assert_eq!(dur_ms(3 * 3_600_000), "3h");
        assert_eq!(dur_ms(3 * 86_400_000), "3d");
    }
}
