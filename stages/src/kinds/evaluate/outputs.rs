//! What an evaluate stage publishes, written and read here only: the report reads it through
//! [`EvaluateOutputs`].
//!
//! metrics.json (every model's figures), timings.json (inference speed: unhashed, like
//! train's timings), comparison.md (the seed study's table with this run's rows),
//! confusion-STAGE.png, misclassified-STAGE.png, per-class-accuracy.png.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::files::pngs_in;
use crate::kind::Outputs;

const METRICS_FILE: &str = "metrics.json";
const TIMINGS_FILE: &str = "timings.json";
/// Published and cached, but left out of the hash downstream stages see: wall-clock speed
/// differs on every run of the same model.
pub const UNHASHED_OUTPUTS: &[&str] = &[TIMINGS_FILE];
const COMPARISON_FILE: &str = "comparison.md";
pub(super) const PER_CLASS_CHART: &str = "per-class-accuracy.png";
const CONFUSION_PREFIX: &str = "confusion-";

/// The confusion-matrix heatmap of the model trained by `stage`.
pub(super) fn confusion_chart(stage: &str) -> String {
    format!("{CONFUSION_PREFIX}{stage}.png")
}

/// The grid of misclassified test images of the model trained by `stage`.
pub(super) fn misclassified_grid(stage: &str) -> String {
    format!("misclassified-{stage}.png")
}

/// Writes metrics.json, timings.json and comparison.md (the charts are drawn straight into
/// `out`).
pub(super) fn write(
    out: &Path,
    metrics: &serde_json::Value,
    timings: &serde_json::Value,
    comparison: &str,
) -> anyhow::Result<()> {
    for (file, value) in [(METRICS_FILE, metrics), (TIMINGS_FILE, timings)] {
        let mut text = serde_json::to_string_pretty(value)?;
        text.push('\n');
        let path = out.join(file);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let path = out.join(COMPARISON_FILE);
    std::fs::write(&path, comparison).with_context(|| format!("writing {}", path.display()))
}

/// An evaluate stage's outputs, as the report reads them.
pub type EvaluateOutputs = Outputs<super::Evaluate>;

impl EvaluateOutputs {
    /// metrics.json, when there is one, each model's `inference_images_per_s` filled in
    /// from timings.json.
    pub fn metrics(&self) -> anyhow::Result<Option<serde_json::Value>> {
        let Some(mut metrics) = self.json(METRICS_FILE)? else {
            return Ok(None);
        };
        let timings = self.json(TIMINGS_FILE)?;
        let speeds = timings.as_ref().and_then(|t| t.get("models")?.as_object());
        if let (Some(models), Some(speeds)) = (
            metrics.get_mut("models").and_then(|m| m.as_object_mut()),
            speeds,
        ) {
            for (stage, model) in models.iter_mut() {
                let speed = speeds
                    .get(stage)
                    .and_then(|s| s.get("inference_images_per_s"));
                if let (Some(model), Some(speed)) = (model.as_object_mut(), speed) {
                    model.insert("inference_images_per_s".into(), speed.clone());
                }
            }
        }
        Ok(Some(metrics))
    }

    /// A JSON file of the stage, when it is there.
    fn json(&self, file: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let path = self.path(file);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Ok(Some(value))
    }

    /// comparison.md, when there is one.
    pub fn comparison_markdown(&self) -> anyhow::Result<Option<String>> {
        let path = self.path(COMPARISON_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Some(text))
    }

    /// (confusion matrices, the other charts), each sorted by name.
    pub fn charts(&self) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
        Ok(pngs_in(&self.dir)?.into_iter().partition(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(CONFUSION_PREFIX))
        }))
    }
}
