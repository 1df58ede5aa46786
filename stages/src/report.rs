//! The `report` stage: one self-contained HTML page (every PNG inlined as a data URI, no
//! network) gathering the study — data statistics, training curves and histories, the model
//! comparison, confusion matrices, filters and activation maps — with each input's params
//! and fingerprint. It reads its inputs' folders generically, by kind and file name.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::context::{Input, Metrics, StageContext, StageError};

/// Bump when outputs would change for the same params.
pub const VERSION: u32 = 2;

/// The `[stages.NAME]` table of a report stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The page's title.
    #[serde(default = "default_title")]
    pub title: String,
}

fn default_title() -> String {
    "Fashion-MNIST: baseline CNN vs ResNet-18".to_string()
}

impl Default for Params {
    fn default() -> Self {
        Params {
            title: default_title(),
        }
    }
}

impl Params {
    /// Values serde cannot rule out by type.
    pub fn validate(&self) -> Result<(), StageError> {
        if self.title.trim().is_empty() {
            return Err(StageError::InvalidParams(
                "title must not be empty".to_string(),
            ));
        }
        Ok(())
    }
}

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

/// One section of the page: an anchor, a heading and its HTML body.
struct Section {
    id: String,
    title: String,
    body: String,
}

/// Files of one kind in a folder, sorted by name.
fn files_with_extension(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading the folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading the folder {}", dir.display()))?;
        let path = entry.path();
        // Regular files only: a symlink could lead anywhere outside the stage's outputs.
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Counts the images inlined so far (for the stage's metrics).
#[derive(Default)]
struct Page {
    images: usize,
    image_bytes: usize,
}

impl Page {
    /// A `<figure>` with the PNG at `path` inlined and `caption` under it.
    fn figure(&mut self, path: &Path, caption: &str) -> anyhow::Result<String> {
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
    fn gallery(&mut self, paths: &[PathBuf]) -> anyhow::Result<String> {
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

/// An integer with thousands separators: "1,199,882".
pub fn group_thousands(n: i128) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::from(if n < 0 { "-" } else { "" });
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A number as people read it: integers whole (grouped by thousands), others to 4 decimals
/// (tiny ones in e-form).
fn format_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return group_thousands(i.into());
    }
    if let Some(u) = n.as_u64() {
        return group_thousands(u.into());
    }
    let v = n.as_f64().unwrap_or(f64::NAN);
    if v != 0.0 && v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
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
fn json_html(value: &serde_json::Value, depth: usize) -> String {
    use serde_json::Value;
    const MAX_INLINE: usize = 24;
    const MAX_ROWS: usize = 200;
    if depth > 6 {
        return format!("<code>{}</code>", escape(&value.to_string()));
    }
    match value {
        Value::Null => "<span class=\"muted\">none</span>".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => format_number(n),
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

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// Each of these JSON files as a titled block.
fn json_html_of(paths: &[PathBuf]) -> anyhow::Result<String> {
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

fn input_heading(input: &Input) -> String {
    format!(
        "<h3>{} <span class=\"muted\">({})</span></h3>\n",
        escape(&input.stage),
        escape(&input.kind)
    )
}

fn stats_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<String> {
    let mut html = String::new();
    for input in inputs {
        html.push_str(&input_heading(input));
        html.push_str(&json_html_of(&files_with_extension(&input.dir, "json")?)?);
        html.push_str(&page.gallery(&files_with_extension(&input.dir, "png")?)?);
    }
    Ok(html)
}

fn training_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<String> {
    let mut html = String::new();
    for input in inputs {
        html.push_str(&input_heading(input));
        let config = input.dir.join("config.json");
        if config.is_file() {
            let config = read_json(&config)?;
            let said = |key: &str| config.get(key).and_then(|v| v.as_str()).map(escape);
            if let Some(device) = said("device") {
                let kernels = said("kernels")
                    .map(|k| format!(" with the {k} kernels"))
                    .unwrap_or_default();
                let _ = writeln!(html, "<p>Trained on <code>{device}</code>{kernels}.</p>");
            }
        }
        html.push_str(&page.gallery(&files_with_extension(&input.dir, "png")?)?);
        let history = input.dir.join("history.json");
        if history.is_file() {
            let value = read_json(&history)?;
            html.push_str("<h4>Per-epoch history</h4>\n");
            html.push_str(&json_html(value.get("epochs").unwrap_or(&value), 0));
        }
    }
    Ok(html)
}

/// Per-model accuracy/loss/speed and per-class figures from metrics.json.
fn metrics_tables(metrics: &serde_json::Value) -> String {
    let Some(models) = metrics.get("models").and_then(|m| m.as_object()) else {
        return json_html(metrics, 0);
    };
    let mut html = String::from(
        "<h4>Test-set figures</h4>\n<table><tr><th>stage</th><th>model</th><th>accuracy</th>\
         <th>loss</th><th>parameters</th><th>final train loss</th><th>inference images/s</th></tr>\n",
    );
    let num = |v: &serde_json::Value, key: &str| -> String {
        match v.get(key) {
            Some(serde_json::Value::Number(n)) => format_number(n),
            Some(other) => escape(&other.to_string()),
            None => String::new(),
        }
    };
    for (stage, m) in models {
        let accuracy = m
            .get("accuracy")
            .and_then(|a| a.as_f64())
            .map(|a| format!("{:.2}%", 100.0 * a))
            .unwrap_or_default();
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{accuracy}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(stage),
            escape(m.get("model").and_then(|v| v.as_str()).unwrap_or("")),
            num(m, "loss"),
            num(m, "params"),
            num(m, "final_train_loss"),
            m.get("inference_images_per_s")
                .and_then(|v| v.as_f64())
                .map(|v| format!("{v:.0}"))
                .unwrap_or_default(),
        );
    }
    html.push_str("</table>\n");
    html.push_str(&per_class_table(models));
    html
}

/// One row per class, precision/recall/F1 of every model side by side.
fn per_class_table(models: &serde_json::Map<String, serde_json::Value>) -> String {
    let lists: Vec<(&String, &Vec<serde_json::Value>)> = models
        .iter()
        .filter_map(|(stage, m)| Some((stage, m.get("per_class")?.as_array()?)))
        .collect();
    let Some(rows) = lists.iter().map(|(_, l)| l.len()).max() else {
        return String::new();
    };
    const FIGURES: [&str; 3] = ["precision", "recall", "f1"];
    let mut html = String::from(
        "<h4>Per-class precision, recall and F1</h4>\n<table><thead><tr><th rowspan=\"2\">class</th>",
    );
    for (stage, _) in &lists {
        let _ = write!(
            html,
            "<th colspan=\"{}\">{}</th>",
            FIGURES.len(),
            escape(stage)
        );
    }
    html.push_str("</tr><tr>");
    for _ in &lists {
        for f in FIGURES {
            let _ = write!(html, "<th>{f}</th>");
        }
    }
    html.push_str("</tr></thead><tbody>\n");
    for row in 0..rows {
        let class = lists
            .iter()
            .find_map(|(_, l)| l.get(row)?.get("class")?.as_str())
            .unwrap_or("?");
        let _ = write!(html, "<tr><th>{}</th>", escape(class));
        for (_, list) in &lists {
            for f in FIGURES {
                let cell = list
                    .get(row)
                    .and_then(|c| c.get(f))
                    .and_then(|v| v.as_f64())
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_default();
                let _ = write!(html, "<td>{cell}</td>");
            }
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody></table>\n");
    html
}

fn comparison_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<(String, String)> {
    let mut comparison = String::new();
    let mut confusion = String::new();
    for input in inputs {
        comparison.push_str(&input_heading(input));
        let md = input.dir.join("comparison.md");
        if md.is_file() {
            let text = std::fs::read_to_string(&md)
                .with_context(|| format!("reading {}", md.display()))?;
            comparison.push_str(&markdown_html(&text));
        }
        let metrics = input.dir.join("metrics.json");
        if metrics.is_file() {
            comparison.push_str(&metrics_tables(&read_json(&metrics)?));
        }
        let (matrices, others): (Vec<PathBuf>, Vec<PathBuf>) =
            files_with_extension(&input.dir, "png")?
                .into_iter()
                .partition(|p| file_name(p).starts_with("confusion"));
        comparison.push_str(&page.gallery(&others)?);
        confusion.push_str(&page.gallery(&matrices)?);
    }
    Ok((comparison, confusion))
}

fn visualize_sections(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<(String, String)> {
    let mut filters = String::new();
    let mut activations = String::new();
    for input in inputs {
        let (f, a): (Vec<PathBuf>, Vec<PathBuf>) = files_with_extension(&input.dir, "png")?
            .into_iter()
            .partition(|p| file_name(p).contains("-filters-"));
        filters.push_str(&page.gallery(&f)?);
        activations.push_str(&page.gallery(&a)?);
    }
    Ok((filters, activations))
}

fn other_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<String> {
    let mut html = String::new();
    for input in inputs {
        html.push_str(&input_heading(input));
        html.push_str(&json_html_of(&output_files(input, "json")?)?);
        html.push_str(&page.gallery(&output_files(input, "png")?)?);
    }
    Ok(html)
}

/// An input's output files with extension `ext`: those in a built-in stage's folder; for a
/// command stage (whose `dir` is the workspace root) only its declared `outs` and the files
/// in declared folders, so files it did not declare (whose changes would not make the report
/// stale) never enter the report.
fn output_files(input: &Input, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let Some(outs) = input.params.get("outs").and_then(|o| o.as_array()) else {
        return files_with_extension(&input.dir, ext);
    };
    let mut files = Vec::new();
    for out in outs.iter().filter_map(|o| o.as_str()) {
        let path = input.dir.join(out);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => files.extend(files_with_extension(&path, ext)?),
            Ok(m)
                if m.is_file()
                    && path
                        .extension()
                        .is_some_and(|e| e.eq_ignore_ascii_case(ext)) =>
            {
                files.push(path)
            }
            _ => {}
        }
    }
    files.sort();
    Ok(files)
}

fn provenance_section(ctx: &StageContext, params: &Params) -> anyhow::Result<String> {
    let mut html = format!(
        "<p>Pipeline seed <code>{}</code>, device <code>{}</code>. Each stage below is \
         identified by its fingerprint (its kind, version, params and inputs' contents).</p>\n",
        ctx.seed,
        escape(ctx.device)
    );
    html.push_str(
        "<table><tr><th>stage</th><th>kind</th><th>fingerprint</th><th>params</th></tr>\n",
    );
    for input in ctx.inputs {
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(&input.stage),
            escape(&input.kind),
            escape(&input.fingerprint),
            json_html(&input.params, 0)
        );
    }
    let _ = writeln!(
        html,
        "<tr><td>{}</td><td>report</td><td class=\"muted\">this page</td><td>{}</td></tr>",
        escape(ctx.name),
        json_html(&serde_json::to_value(params)?, 0)
    );
    html.push_str("</table>\n");
    Ok(html)
}

const STYLE: &str = "
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
const IMAGE_CHECK: &str = "
var scriptErrors = 0;
window.addEventListener('error', function () { scriptErrors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  document.body.setAttribute('data-script-errors', String(scriptErrors));
});
";

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let of_kind =
        |kind: &str| -> Vec<&Input> { ctx.inputs.iter().filter(|i| i.kind == kind).collect() };
    let known = ["download", "stats", "train", "evaluate", "visualize"];
    let others: Vec<&Input> = ctx
        .inputs
        .iter()
        .filter(|i| !known.contains(&i.kind.as_str()))
        .collect();

    let mut page = Page::default();
    let mut sections = Vec::new();
    let mut add = |id: &str, title: &str, body: String| {
        if !body.trim().is_empty() {
            sections.push(Section {
                id: id.to_string(),
                title: title.to_string(),
                body,
            });
        }
    };
    add(
        "data",
        "Data statistics",
        stats_section(&mut page, &of_kind("stats"))?,
    );
    add(
        "training",
        "Training curves",
        training_section(&mut page, &of_kind("train"))?,
    );
    let (comparison, confusion) = comparison_section(&mut page, &of_kind("evaluate"))?;
    add("comparison", "Model comparison", comparison);
    add("confusion", "Confusion matrices", confusion);
    let (filters, activations) = visualize_sections(&mut page, &of_kind("visualize"))?;
    add("filters", "First-layer filters", filters);
    add("activations", "Activation maps", activations);
    add("other", "Other inputs", other_section(&mut page, &others)?);
    add(
        "provenance",
        "Inputs, params and fingerprints",
        provenance_section(ctx, &params)?,
    );

    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n<script>{IMAGE_CHECK}</script>\n\
         </head>\n<body>\n<h1>{title}</h1>\n<nav><h2>Contents</h2><ol>\n",
        title = escape(&params.title)
    );
    for s in &sections {
        let _ = writeln!(
            html,
            "<li><a href=\"#{}\">{}</a></li>",
            s.id,
            escape(&s.title)
        );
    }
    html.push_str("</ol></nav>\n");
    for s in &sections {
        let _ = write!(
            html,
            "<section id=\"{}\">\n<h2>{}</h2>\n{}</section>\n",
            s.id,
            escape(&s.title),
            s.body
        );
    }
    html.push_str("</body>\n</html>\n");

    let path = ctx.out_dir.join("report.html");
    std::fs::write(&path, &html).with_context(|| format!("writing {}", path.display()))?;
    ctx.progress.println(&format!(
        // out_dir is a temp folder renamed into artifacts/<stage>/ on success: name the final place.
        "wrote artifacts/{}/report.html ({} images, {:.1} MB)",
        ctx.name,
        page.images,
        html.len() as f64 / 1e6
    ));
    Ok(serde_json::json!({
        "images": page.images,
        "image_bytes": page.image_bytes,
        "html_bytes": html.len(),
        "sections": sections.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command stage's input is the workspace root: only its declared outputs (and the
    /// regular files in declared folders) reach the report, never other files or symlinks.
    #[test]
    fn command_stage_inputs_show_only_declared_outputs() -> anyhow::Result<()> {
        let ws = tempfile::tempdir()?;
        let root = ws.path();
        std::fs::write(root.join("summary.json"), "{}")?;
        std::fs::write(root.join("undeclared.json"), "{}")?;
        std::fs::create_dir_all(root.join("plots"))?;
        std::fs::write(root.join("plots/extra.json"), "{}")?;
        let outside = tempfile::tempdir()?;
        std::fs::write(outside.path().join("secret.json"), "{}")?;
        std::os::unix::fs::symlink(
            outside.path().join("secret.json"),
            root.join("plots/link.json"),
        )?;
        let input = Input {
            stage: "summarize".into(),
            kind: "cmd".into(),
            dir: root.to_path_buf(),
            fingerprint: String::new(),
            params: serde_json::json!({ "cmd": "x", "deps": [], "outs": ["plots", "summary.json"] }),
        };
        let names: Vec<String> = output_files(&input, "json")?
            .iter()
            .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
            .collect();
        assert_eq!(names, vec!["plots/extra.json", "summary.json"]);
        Ok(())
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape(r#"<a href="x">T-shirt/top & 'Coat'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;T-shirt/top &amp; &#39;Coat&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn markdown_tables_become_html_tables() {
        let html = markdown_html("## Title <x>\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\nNote.\n");
        assert!(html.contains("<h4>Title &lt;x&gt;</h4>"), "{html}");
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"), "{html}");
        assert!(
            html.contains("<tr><td>1</td><td>&lt;2&gt;</td></tr>"),
            "{html}"
        );
        assert!(!html.contains("---"));
        assert!(html.contains("<p>Note.</p>"));
    }

    #[test]
    fn json_renders_as_tables() {
        let v = serde_json::json!({"epochs": [{"epoch": 1, "lr": 0.0001}, {"epoch": 2, "lr": 0.5}],
                                   "name": "<b>"});
        let html = json_html(&v, 0);
        assert!(html.contains("<th>epoch</th><th>lr</th>"), "{html}");
        assert!(html.contains("<td>1.000e-4</td>"), "{html}");
        assert!(html.contains("&lt;b&gt;"));
        assert!(toml::from_str::<Params>("titel = \"x\"").is_err());
    }
}
