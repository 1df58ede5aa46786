//! `exp show --html PATH`: one self-contained page (inline SVG and CSS, no script, nothing
//! fetched) with each training stage's curves of the selected experiments overlaid (train
//! loss and test accuracy per epoch, from the history.json of each run in the run cache)
//! and the `exp show` table beside them.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::Experiment;
use crate::cache::RunCache;
use crate::error::PipeError;

const COLORS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One run's curve: (epoch, value) points.
type Curve = Vec<(f64, f64)>;

/// The per-epoch history of a training run, from the run cache: (train loss, test accuracy).
fn history(cache: &RunCache, fingerprint: &str) -> Option<(Curve, Curve)> {
    let entry = cache.lookup(fingerprint)?;
    let record = entry
        .outs
        .iter()
        .find(|r| r.path.rsplit('/').next() == Some("history.json"))?;
    let bytes = std::fs::read(cache.object(&record.blake3)).ok()?;
    let json: Value = serde_json::from_slice(&bytes).ok()?;
    let mut loss = Vec::new();
    let mut acc = Vec::new();
    for e in json.get("epochs")?.as_array()? {
        let epoch = e.get("epoch").and_then(Value::as_f64)?;
        if let Some(l) = e.get("train_loss").and_then(Value::as_f64) {
            loss.push((epoch, l));
        }
        if let Some(a) = e.get("test_accuracy").and_then(Value::as_f64) {
            acc.push((epoch, 100.0 * a));
        }
    }
    Some((loss, acc))
}

fn view<'a>(v: &'a [(String, &'static str, Curve)]) -> Vec<(String, &'static str, &'a Curve)> {
    v.iter().map(|(n, c, p)| (n.clone(), *c, p)).collect()
}

/// An SVG line chart of `series` (label, color, points).
fn chart(title: &str, y_label: &str, series: &[(String, &str, &Curve)]) -> String {
    let (w, h, left, right, top, bottom) = (440.0, 260.0, 56.0, 12.0, 28.0, 40.0);
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, _, c)| c.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>{}</title><text x="{}" y="18" text-anchor="middle" class="t">{}</text>"#,
        escape(title),
        w / 2.0,
        escape(title)
    );
    if points.is_empty() {
        svg.push_str(
            r#"<text x="220" y="130" text-anchor="middle">no epochs recorded</text></svg>"#,
        );
        return svg;
    }
    let (mut x0, mut x1) = (f64::MAX, f64::MIN);
    let (mut y0, mut y1) = (f64::MAX, f64::MIN);
    for (x, y) in &points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 - x0 < 1.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    y0 -= pad;
    y1 += pad;
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (y1 - y) / (y1 - y0) * (h - top - bottom);
    let _ = write!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        w - left - right,
        h - top - bottom
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end" class="a">{}</text><line x1="{left}" x2="{}" y1="{gy:.1}" y2="{gy:.1}" stroke="#eee"/>"##,
            left - 4.0,
            sy(y) + 4.0,
            super::short_float(y),
            w - right,
            gy = sy(y)
        );
    }
    let first = x0.ceil() as i64;
    let last = x1.floor() as i64;
    let step = ((last - first) / 8).max(1);
    for e in (first..=last).step_by(step as usize) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle" class="a">{e}</text>"#,
            sx(e as f64),
            h - bottom + 16.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle" class="a">epoch</text><text x="14" y="{}" text-anchor="middle" class="a" transform="rotate(-90 14 {})">{}</text>"#,
        left + (w - left - right) / 2.0,
        h - 6.0,
        top + (h - top - bottom) / 2.0,
        top + (h - top - bottom) / 2.0,
        escape(y_label)
    );
    for (label, color, curve) in series {
        let pts: Vec<String> = curve
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"><title>{}</title></polyline>"#,
            pts.join(" "),
            escape(label)
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = write!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
        }
    }
    svg.push_str("</svg>");
    svg
}

/// Writes the page for `rows` (in table order) to `path`.
pub fn write(
    path: &Path,
    rows: &[&Experiment],
    table: (Vec<String>, Vec<Vec<String>>),
    current: Option<&str>,
    artifacts: &Path,
) -> Result<(), PipeError> {
    let cache = RunCache::new(artifacts);
    let color = |i: usize| COLORS[i % COLORS.len()];
    let mut html = String::from(
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fmnist-pipe experiments</title><style>
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:1em}.t{font-weight:600;font-size:14px}.a{font-size:11px;fill:#555}
.sw{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle}
</style></head><body><h1>Experiments</h1>
"#,
    );
    let (header, cells) = table;
    html.push_str("<table><tr><th class=\"l\"></th>");
    for (i, h) in header.iter().enumerate() {
        let class = if i < 2 { " class=\"l\"" } else { "" };
        let _ = write!(html, "<th{class}>{}</th>", escape(h));
    }
    html.push_str("</tr>\n");
    for (r, e) in rows.iter().enumerate() {
        let mark = if Some(e.id.as_str()) == current {
            " (workspace)"
        } else {
            ""
        };
        let _ = write!(
            html,
            "<tr><td class=\"l\"><span class=\"sw\" style=\"background:{}\"></span></td>",
            color(r)
        );
        for (i, c) in cells[r].iter().enumerate() {
            let class = if i < 2 { " class=\"l\"" } else { "" };
            let extra = if i == 0 { mark } else { "" };
            let _ = write!(html, "<td{class}>{}{extra}</td>", escape(c));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    let mut train_stages: Vec<&String> = rows
        .iter()
        .flat_map(|e| {
            e.stages
                .iter()
                .filter(|(_, s)| s.kind == "train")
                .map(|(n, _)| n)
        })
        .collect();
    train_stages.sort();
    train_stages.dedup();
    for stage in train_stages {
        let mut losses = Vec::new();
        let mut accs = Vec::new();
        let mut wanted = 0;
        for (r, e) in rows.iter().enumerate() {
            let Some(s) = e.stages.get(stage) else {
                continue;
            };
            wanted += 1;
            if let Some((loss, acc)) = history(&cache, &s.fingerprint) {
                losses.push((e.name.clone(), color(r), loss));
                accs.push((e.name.clone(), color(r), acc));
            }
        }
        let _ = writeln!(
            html,
            "<h2>{}</h2><div class=\"charts\">{}{}</div>",
            escape(stage),
            chart(&format!("{stage}: train loss"), "loss", &view(&losses)),
            chart(
                &format!("{stage}: test accuracy"),
                "accuracy (%)",
                &view(&accs)
            )
        );
        if losses.len() < wanted {
            let _ = writeln!(
                html,
                "<p>{} of {wanted} experiments' histories are no longer in the run cache.</p>",
                wanted - losses.len()
            );
        }
    }
    html.push_str("</body></html>\n");
    std::fs::write(path, html).map_err(|e| PipeError::io_at(path, "write", e))
}
