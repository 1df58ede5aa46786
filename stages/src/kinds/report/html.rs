//! HTML building blocks of the report: escaping, any JSON value as tables, the Markdown
//! subset comparison.md uses, inlined PNG figures and galleries, the page's style and its
//! render check.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;

use crate::files::file_name;
use crate::format;

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Counts the images inlined so far (for the stage's metrics).
#[derive(Default)]
pub(super) struct Page {
    pub(super) images: usize,
    pub(super) image_bytes: usize,
}

impl Page {
    /// A `<figure>` with the PNG at `path` inlined and `caption` under it.
    pub(super) fn figure(&mut self, path: &Path, caption: &str) -> anyhow::Result<String> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.images += 1;
        self.image_bytes += bytes.len();
        let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Ok(format!(
            "<figure><img src=\"data:image/png;base64,{data}\" alt=\"{alt}\"><figcaption>{alt}</figcaption></figure>\n",
            alt = escape(caption)
        ))
    }

    /// Figures for each PNG in `paths`, in a wrapping gallery.
    pub(super) fn gallery(&mut self, paths: &[PathBuf]) -> anyhow::Result<String> {
        if paths.is_empty() {
            return Ok(String::new());
        }
        let mut html = String::from("<div class=\"gallery\">\n");
        for p in paths {
            html.push_str(&self.figure(p, &file_name(p))?);
        }
        html.push_str("</div>\n");
        Ok(html)
    }
}

/// Columns that lead a table rendered from a list of objects (histories, per-class lists),
/// in this order; the rest follow alphabetically.
const LEADING_COLUMNS: &[&str] = &[
    "epoch",
    "class",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "precision",
    "recall",
    "f1",
    "support",
    "lr",
];

/// Renders any JSON value as HTML: objects as key/value tables, lists of objects as tables
/// with a column per key, lists of scalars inline (long ones shortened).
pub(super) fn json_html(value: &serde_json::Value, depth: usize) -> String {
    use serde_json::Value;
    const MAX_INLINE: usize = 24;
    const MAX_ROWS: usize = 200;
    if depth > 6 {
        return format!("<code>{}</code>", escape(&value.to_string()));
    }
    match value {
        Value::Null => "<span class=\"muted\">none</span>".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format::json_number(n),
        Value::String(s) => escape(s),
        Value::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            let shown: Vec<String> = items
                .iter()
                .take(MAX_INLINE)
                .map(|v| json_html(v, depth + 1))
                .collect();
            let more = items.len().saturating_sub(MAX_INLINE);
            let tail = if more > 0 {
                format!(", … ({more} more)")
            } else {
                String::new()
            };
            format!("[{}{tail}]", shown.join(", "))
        }
        Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
            let mut columns: Vec<String> = Vec::new();
            for item in items {
                if let Value::Object(map) = item {
                    for k in map.keys() {
                        if !columns.contains(k) {
                            columns.push(k.clone());
                        }
                    }
                }
            }
            // JSON objects come back sorted by key; put the columns people look for first.
            columns.sort_by_key(|c| {
                LEADING_COLUMNS
                    .iter()
                    .position(|l| l == c)
                    .unwrap_or(LEADING_COLUMNS.len())
            });
            let mut html = String::from("<table><thead><tr>");
            for c in &columns {
                let _ = write!(html, "<th>{}</th>", escape(c));
            }
            html.push_str("</tr></thead><tbody>\n");
            for item in items.iter().take(MAX_ROWS) {
                html.push_str("<tr>");
                for c in &columns {
                    let cell = item
                        .get(c)
                        .map(|v| json_html(v, depth + 1))
                        .unwrap_or_default();
                    let _ = write!(html, "<td>{cell}</td>");
                }
                html.push_str("</tr>\n");
            }
            html.push_str("</tbody></table>\n");
            if items.len() > MAX_ROWS {
                let _ = write!(
                    html,
                    "<p class=\"muted\">… {} more rows</p>",
                    items.len() - MAX_ROWS
                );
            }
            html
        }
        Value::Array(items) => {
            let mut html = String::from("<ol>");
            for item in items.iter().take(MAX_ROWS) {
                let _ = write!(html, "<li>{}</li>", json_html(item, depth + 1));
            }
            html.push_str("</ol>");
            html
        }
        Value::Object(map) if map.is_empty() => "<span class=\"muted\">{}</span>".to_string(),
        Value::Object(map) => {
            let mut html = String::from("<table class=\"kv\"><tbody>\n");
            for (k, v) in map {
                let _ = writeln!(
                    html,
                    "<tr><th>{}</th><td>{}</td></tr>",
                    escape(k),
                    json_html(v, depth + 1)
                );
            }
            html.push_str("</tbody></table>\n");
            html
        }
    }
}

pub(super) fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Each of these JSON files as a titled block.
pub(super) fn json_html_of(paths: &[PathBuf]) -> anyhow::Result<String> {
    let mut html = String::new();
    for path in paths {
        let value = read_json(path)?;
        let _ = write!(
            html,
            "<h4>{}</h4>\n<div class=\"json\">{}</div>\n",
            escape(&file_name(path)),
            json_html(&value, 0)
        );
    }
    Ok(html)
}

/// Renders the small Markdown subset comparison.md uses: `#` headings, pipe tables,
/// paragraphs.
pub fn markdown_html(text: &str) -> String {
    let mut html = String::new();
    let mut table: Vec<Vec<String>> = Vec::new();
    let flush = |table: &mut Vec<Vec<String>>, html: &mut String| {
        if table.is_empty() {
            return;
        }
        html.push_str("<table>");
        for (i, row) in table.iter().enumerate() {
            let tag = if i == 0 { "th" } else { "td" };
            html.push_str("<tr>");
            for cell in row {
                let _ = write!(html, "<{tag}>{}</{tag}>", escape(cell));
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
        table.clear();
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(row) = line.strip_prefix('|') {
            let cells: Vec<String> = row
                .trim_end_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect();
            let is_rule = cells
                .iter()
                .all(|c| !c.is_empty() && c.chars().all(|ch| matches!(ch, '-' | ':')));
            if !is_rule {
                table.push(cells);
            }
            continue;
        }
        flush(&mut table, &mut html);
        if line.is_empty() {
            continue;
        }
        let level = line.chars().take_while(|&c| c == '#').count();
        if level > 0 {
            // Sections of the page are h2; headings of a rendered file sit below them.
            let tag = format!("h{}", (level + 2).min(6));
            let _ = writeln!(html, "<{tag}>{}</{tag}>", escape(line[level..].trim()));
        } else {
            let _ = writeln!(html, "<p>{}</p>", escape(line));
        }
    }
    flush(&mut table, &mut html);
    html
}

pub(super) const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
nav ol { columns: 2; }
table { border-collapse: collapse; margin: .6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f4f8; }
table.kv > tbody > tr > th { width: 1%; white-space: nowrap; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.8em; color: #555; }
.muted { color: #888; }
code { font-size: 0.85em; }
";

/// Marks on `<body data-images-ok="N/M" data-script-errors="K">` how many of the page's
/// images decoded and how many script errors happened, so a headless browser's DOM dump can
/// prove the page renders.
pub(super) const IMAGE_CHECK: &str = "
var scriptErrors = 0;
window.addEventListener('error', function () { scriptErrors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  document.body.setAttribute('data-script-errors', String(scriptErrors));
});
";
