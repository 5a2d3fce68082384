//! Server-rendered inline SVG: the flow graph and the maturity chart. Presentation attributes
//! only (the CSP allows no inline style); every label is escaped.

use super::html::esc;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One edge of the flow graph: initiator → responder, summed over proto/port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// Flows allowed and denied.
    pub allowed: u64,
    pub denied: u64,
    /// `tcp/22, udp/53` …
    pub ports: Vec<String>,
}

/// Nodes on a circle, an arrow per edge: green for allowed, red dashed for denied (an edge
/// with both is drawn twice, slightly apart).
pub fn flow_graph(edges: &[Edge]) -> String {
    let mut nodes: Vec<&str> = Vec::new();
    for e in edges {
        for n in [e.from.as_str(), e.to.as_str()] {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
    }
    nodes.sort_unstable();
    let (w, h) = (720.0f64, 520.0f64);
    let (cx, cy, r) = (w / 2.0, h / 2.0, 200.0f64);
    let n = nodes.len().max(1) as f64;
    let pos: BTreeMap<&str, (f64, f64)> = nodes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (*name, (cx + r * a.cos(), cy + r * a.sin()))
        })
        .collect();
    let mut s = format!(
        r##"<svg id="flow-graph" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="flow graph">
<defs><marker id="arrow-ok" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#17692e"/></marker>
<marker id="arrow-deny" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#a11d1d"/></marker></defs>
"##
    );
    if edges.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{cx}" y="{cy}" text-anchor="middle" fill="#5a6472">no flows recorded in this window</text>"##
        );
    }
    for e in edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(e.from.as_str()), pos.get(e.to.as_str()))
        else {
            continue;
        };
        let ports = esc(&e.ports.join(", "));
        for (kind, count, offset) in [("allowed", e.allowed, -4.0), ("denied", e.denied, 4.0)] {
            if count == 0 {
                continue;
            }
            // Shorten to stop at the node's circle, shift sideways so both kinds show.
            let (dx, dy) = (x2 - x1, y2 - y1);
            let len = (dx * dx + dy * dy).sqrt().max(1.0);
            let (ux, uy) = (dx / len, dy / len);
            let (ox, oy) = (-uy * offset, ux * offset);
            let (ax, ay) = (x1 + ux * 22.0 + ox, y1 + uy * 22.0 + oy);
            let (bx, by) = (x2 - ux * 22.0 + ox, y2 - uy * 22.0 + oy);
            let (stroke, extra, marker) = if kind == "allowed" {
                ("#17692e", "", "arrow-ok")
            } else {
                ("#a11d1d", r#" stroke-dasharray="6 4""#, "arrow-deny")
            };
            let _ = write!(
                s,
                r#"<line class="edge edge-{kind}" data-from="{f}" data-to="{t}" x1="{ax:.1}" y1="{ay:.1}" x2="{bx:.1}" y2="{by:.1}" stroke="{stroke}" stroke-width="2"{extra} marker-end="url(#{marker})"><title>{f} → {t}: {count} {kind} ({ports})</title></line>"#,
                f = esc(&e.from),
                t = esc(&e.to),
            );
        }
    }
    for (name, (x, y)) in &pos {
        // The label outside the circle, away from the centre (where the edges run).
        let (dx, dy) = (x - cx, y - cy);
        let d = (dx * dx + dy * dy).sqrt().max(1.0);
        let (lx, ly) = (x + dx / d * 34.0, y + dy / d * 34.0 + 4.0);
        let _ = write!(
            s,
            r##"<g class="node" data-name="{n}"><circle cx="{x:.1}" cy="{y:.1}" r="20" fill="#cfe3ff" stroke="#1d2430"/><text x="{tx:.1}" y="{ty:.1}" text-anchor="middle" font-size="13" fill="#1d2430">{n}</text></g>"##,
            n = esc(name),
            tx = lx,
            ty = ly,
        );
    }
    s.push_str("</svg>");
    s
}

/// One line of the maturity chart: a pillar's stage (0 = Traditional … 3 = Optimal) at each
/// recorded assessment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub name: String,
    pub points: Vec<u8>,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A step chart: x is the assessment (oldest left, labelled by `x_labels`), y the stage.
pub fn maturity_chart(stages: &[&str], x_labels: &[String], series: &[Series]) -> String {
    let (w, h) = (760.0f64, 340.0f64);
    let (left, right, top, bottom) = (110.0f64, 190.0f64, 20.0f64, 50.0f64);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let levels = stages.len().max(2) as f64 - 1.0;
    let n = x_labels.len();
    let x = |i: usize| {
        if n <= 1 {
            left + pw / 2.0
        } else {
            left + pw * i as f64 / (n - 1) as f64
        }
    };
    let y = |stage: u8| top + ph - ph * f64::from(stage) / levels;
    let mut s = format!(
        r#"<svg id="maturity-chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="maturity over time">
"#
    );
    for (i, st) in stages.iter().enumerate() {
        let yy = y(i as u8);
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{x2:.1}" y2="{yy:.1}" stroke="#d5d9e0"/><text x="{tx}" y="{ty:.1}" text-anchor="end" font-size="12" fill="#1d2430">{label}</text>"##,
            x2 = left + pw,
            tx = left - 8.0,
            ty = yy + 4.0,
            label = esc(st),
        );
    }
    // At most ~8 x labels, evenly picked.
    let step = n.div_ceil(8).max(1);
    for (i, l) in x_labels.iter().enumerate() {
        if i % step != 0 && i + 1 != n {
            continue;
        }
        let _ = write!(
            s,
            r##"<text x="{xx:.1}" y="{yy:.1}" text-anchor="middle" font-size="11" fill="#5a6472">{label}</text>"##,
            xx = x(i),
            yy = h - bottom + 18.0,
            label = esc(l),
        );
    }
    for (k, se) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        // Lines a little apart so equal stages stay visible.
        let nudge = (k as f64 - series.len() as f64 / 2.0) * 2.0;
        let mut pts = String::new();
        for (i, &p) in se.points.iter().enumerate() {
            let _ = write!(pts, "{:.1},{:.1} ", x(i), y(p) + nudge);
        }
        let _ = write!(
            s,
            r#"<polyline class="series" data-pillar="{name}" points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            name = esc(&se.name),
            pts = pts.trim_end(),
        );
        for (i, &p) in se.points.iter().enumerate() {
            let _ = write!(
                s,
                r#"<circle class="point" cx="{:.1}" cy="{:.1}" r="3" fill="{color}"><title>{}: {}</title></circle>"#,
                x(i),
                y(p) + nudge,
                esc(&se.name),
                esc(stages.get(usize::from(p)).copied().unwrap_or("?")),
            );
        }
        let ly = top + 16.0 * k as f64;
        let _ = write!(
            s,
            r##"<rect x="{lx}" y="{ry:.1}" width="12" height="4" fill="{color}"/><text x="{tx}" y="{ty:.1}" font-size="12" fill="#1d2430">{name}</text>"##,
            lx = w - right + 16.0,
            ry = ly,
            tx = w - right + 34.0,
            ty = ly + 6.0,
            name = esc(&se.name),
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_draws_both_kinds_and_escapes_names() {
        let g = flow_graph(&[Edge {
            from: "<script>alert(1)</script>".into(),
            to: "db".into(),
            allowed: 3,
            denied: 1,
            ports: vec!["tcp/22".into()],
        }]);
        assert!(!g.contains("<script>"), "{g}");
        assert!(g.contains("&lt;script&gt;"));
        assert_eq!(g.matches("class=\"edge edge-allowed\"").count(), 1);
        assert_eq!(g.matches("class=\"edge edge-denied\"").count(), 1);
        assert_eq!(g.matches("class=\"node\"").count(), 2);
        assert!(flow_graph(&[]).contains("no flows recorded"));
    }

    #[test]
    fn chart_has_a_line_per_pillar() {
        let c = maturity_chart(
            &["Traditional", "Initial", "Advanced", "Optimal"],
            &["d1".into(), "d2".into()],
            &[
                Series {
                    name: "Identity".into(),
                    points: vec![0, 2],
                },
                Series {
                    name: "Devices<x>".into(),
                    points: vec![1, 1],
                },
            ],
        );
        assert_eq!(c.matches("<polyline").count(), 2);
        assert_eq!(c.matches("class=\"point\"").count(), 4);
        assert!(c.contains("Devices&lt;x&gt;") && !c.contains("Devices<x>"));
    }
}
