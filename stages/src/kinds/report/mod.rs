//! The `report` stage: one self-contained HTML page (every PNG inlined as a data URI, no
//! network) gathering the study — data statistics, training curves and histories, the model
//! comparison, confusion matrices, filters and activation maps — with each input's params
//! and fingerprint. It reads each built-in input through that kind's reader of its outputs
//! (train's `TrainedModel`, evaluate's `EvaluateOutputs`, ...); the HTML pieces are in
//! [`html`].

mod html;

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::context::{Input, Metrics, StageContext, StageError};
use crate::evaluate::EvaluateOutputs;
use crate::files;
use crate::kind::stage_kind;
use crate::train::TrainedModel;
use crate::visualize::VisualizeOutputs;
use crate::{download, evaluate, format, stats, train, visualize};
pub use html::{escape, markdown_html};
use html::{json_html, json_html_of, Page, IMAGE_CHECK, STYLE};

pub const NAME: &str = "report";

/// Bump when outputs would change for the same params.
/// Bump when outputs would change for the same params. 3: the training section shows each
/// model's timings (from timings.json) apart from its history.
pub const VERSION: u32 = 3;

/// The `report` kind.
pub struct Report;

stage_kind!(Report);

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

/// One section of the page: an anchor, a heading and its HTML body.
struct Section {
    id: String,
    title: String,
    body: String,
}

fn input_heading(input: &Input) -> String {
    format!(
        "<h3>{} <span class=\"muted\">({})</span></h3>\n",
        escape(&input.stage),
        escape(&input.kind)
    )
}

/// Each input's JSON files and images: the stats stage's, and any other stage's.
fn files_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<String> {
    let mut html = String::new();
    for input in inputs {
        html.push_str(&input_heading(input));
        html.push_str(&json_html_of(&output_files(input, "json")?)?);
        html.push_str(&page.gallery(&output_files(input, "png")?)?);
    }
    Ok(html)
}

/// Where each model trained, its curves, per-epoch history and timings.
fn training_section(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<String> {
    let mut html = String::new();
    for input in inputs {
        html.push_str(&input_heading(input));
        let Ok(config) = TrainedModel::config_of(input) else {
            // Not a train stage's outputs as this build writes them: its images only.
            html.push_str(&page.gallery(&files::pngs_in(&input.dir)?)?);
            continue;
        };
        if let Some(device) = &config.device {
            let kernels = config
                .kernels
                .as_ref()
                .map(|k| format!(" with the {} kernels", escape(k)))
                .unwrap_or_default();
            let _ = writeln!(
                html,
                "<p>Trained on <code>{}</code>{kernels}.</p>",
                escape(device)
            );
        }
        let model = TrainedModel::read(input)?;
        html.push_str(&page.gallery(&model.charts())?);
        if let Ok(history) = model.history() {
            html.push_str("<h4>Per-epoch history</h4>\n");
            html.push_str(&json_html(&serde_json::to_value(&history.epochs)?, 0));
        }
        if let Some(timings) = model.timings()? {
            let _ = writeln!(
                html,
                "<h4>Per-epoch time</h4>\n<p>{:.0} images/s over all epochs.</p>",
                timings.images_per_s()
            );
            html.push_str(&json_html(&serde_json::to_value(&timings.epochs)?, 0));
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
            Some(serde_json::Value::Number(n)) => format::json_number(n),
            Some(other) => escape(&other.to_string()),
            None => String::new(),
        }
    };
    for (stage, m) in models {
        let accuracy = m
            .get("accuracy")
            .and_then(|a| a.as_f64())
            .map(format::percent)
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
        let outputs = EvaluateOutputs::of(input);
        comparison.push_str(&input_heading(input));
        if let Some(text) = outputs.comparison_markdown()? {
            comparison.push_str(&markdown_html(&text));
        }
        if let Some(metrics) = outputs.metrics()? {
            comparison.push_str(&metrics_tables(&metrics));
        }
        let (matrices, others) = outputs.charts()?;
        comparison.push_str(&page.gallery(&others)?);
        confusion.push_str(&page.gallery(&matrices)?);
    }
    Ok((comparison, confusion))
}

fn visualize_sections(page: &mut Page, inputs: &[&Input]) -> anyhow::Result<(String, String)> {
    let mut filters = String::new();
    let mut activations = String::new();
    for input in inputs {
        let (f, a) = VisualizeOutputs::of(input).images()?;
        filters.push_str(&page.gallery(&f)?);
        activations.push_str(&page.gallery(&a)?);
    }
    Ok((filters, activations))
}

/// An input's output files with extension `ext`: those in a built-in stage's folder; for a
/// command stage (whose `dir` is the workspace root) only its declared `outs` and the files
/// in declared folders, so files it did not declare (whose changes would not make the report
/// stale) never enter the report.
fn output_files(input: &Input, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let Some(outs) = input.params.get("outs").and_then(|o| o.as_array()) else {
        return files::with_extension(&input.dir, ext);
    };
    let mut files = Vec::new();
    for out in outs.iter().filter_map(|o| o.as_str()) {
        let path = input.dir.join(out);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => files.extend(files::with_extension(&path, ext)?),
            Ok(m) if m.is_file() && files::has_extension(&path, ext) => files.push(path),
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

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let of_kind =
        |kind: &str| -> Vec<&Input> { ctx.inputs.iter().filter(|i| i.kind == kind).collect() };
    let known = [
        download::NAME,
        stats::NAME,
        train::NAME,
        evaluate::NAME,
        visualize::NAME,
    ];
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
        files_section(&mut page, &of_kind(stats::NAME))?,
    );
    add(
        "training",
        "Training curves",
        training_section(&mut page, &of_kind(train::NAME))?,
    );
    let (comparison, confusion) = comparison_section(&mut page, &of_kind(evaluate::NAME))?;
    add("comparison", "Model comparison", comparison);
    add("confusion", "Confusion matrices", confusion);
    let (filters, activations) = visualize_sections(&mut page, &of_kind(visualize::NAME))?;
    add("filters", "First-layer filters", filters);
    add("activations", "Activation maps", activations);
    add("other", "Other inputs", files_section(&mut page, &others)?);
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
