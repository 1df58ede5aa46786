//! The `evaluate` stage: measures every trained model (the `train` inputs) on the test set —
//! accuracy, loss, per-class precision/recall/F1, confusion matrix, parameter count,
//! inference speed — and writes metrics.json, a comparison table against the seed study's
//! figures, confusion-matrix heatmaps, a grid of misclassified images and per-class bars.

pub mod outputs;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::context::{Cancelled, Metrics, StageContext, StageError};
use crate::data::{Dataset, Normalization, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::device;
use crate::download::DataFiles;
use crate::format;
use crate::kind::stage_kind;
use crate::learner::{self, EvalHooks, Evaluation};
use crate::models::ModelKind;
use crate::plot::{self, BarSeries, Tile};
use crate::train::TrainedModel;
pub use outputs::EvaluateOutputs;

pub const NAME: &str = "evaluate";

/// Bump when outputs would change for the same params (3: the CPU kernels of the forward pass
/// round differently, so the same model can score a little differently; 4: inference speed
/// moved from metrics.json to the unhashed timings.json).
pub const VERSION: u32 = 4;

/// The `evaluate` kind.
pub struct Evaluate;

stage_kind!(Evaluate, UNHASHED_OUTPUTS = outputs::UNHASHED_OUTPUTS);

/// The `[stages.NAME]` table of an evaluate stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Evaluate on the first N test images only (0 = all 10,000).
    #[serde(default)]
    pub test_limit: usize,
    /// Images per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How many misclassified test images the grid shows per model.
    #[serde(default = "default_misclassified")]
    pub misclassified: usize,
}

fn default_batch_size() -> usize {
    500
}
fn default_misclassified() -> usize {
    32
}

impl Default for Params {
    fn default() -> Self {
        Params {
            test_limit: 0,
            batch_size: default_batch_size(),
            misclassified: default_misclassified(),
        }
    }
}

impl Params {
    /// Values serde cannot rule out by type.
    pub fn validate(&self) -> Result<(), StageError> {
        if self.batch_size == 0 {
            return Err(StageError::InvalidParams(
                "batch_size must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// One class's precision, recall and F1 (0 where undefined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Test images of this class.
    pub support: u64,
}

/// One model's figures in metrics.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    pub model: ModelKind,
    pub optimizer: String,
    pub accuracy: f64,
    pub loss: f64,
    pub per_class: Vec<ClassMetrics>,
    /// Rows = true class, columns = predicted class.
    pub confusion: Vec<Vec<u64>>,
    pub params: usize,
    pub final_train_loss: f64,
    /// Wall-clock speed: written to timings.json (unhashed), not to metrics.json, so that
    /// evaluating the same model again leaves the report up to date.
    #[serde(skip_serializing, default)]
    pub inference_images_per_s: f64,
    pub test_images: usize,
}

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    crate::ops::with_kernels(ctx.kernels, || run_with_kernels(params, ctx))
}

fn run_with_kernels(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let device = device::select(ctx.device)?;
    let test_set = DataFiles::first(ctx)?.load_nonempty(Split::Test, params.test_limit)?;
    let trained = TrainedModel::read_all(ctx)?;

    let mut all = serde_json::Map::new();
    let mut speeds = serde_json::Map::new();
    let mut results = Vec::new();
    for model_info in &trained {
        let model = model_info.load(&device)?;
        let batches = test_set.len().div_ceil(params.batch_size);
        ctx.progress.start("evaluating", batches as u64, "batches");
        let predictions = learner::evaluate(
            model.as_ref(),
            &test_set,
            params.batch_size,
            Normalization::default(),
            &device,
            &mut StageHooks(ctx),
        )?;
        let confusion = confusion_matrix(&test_set.labels, &predictions.predicted);
        let metrics = ModelMetrics {
            model: model_info.kind,
            optimizer: model_info.optimizer_description(),
            accuracy: accuracy(&confusion),
            loss: predictions.loss,
            per_class: per_class(&confusion),
            params: model.param_count(),
            final_train_loss: model_info.final_train_loss()?,
            inference_images_per_s: predictions.images_per_s(),
            test_images: test_set.len(),
            confusion,
        };
        write_model_plots(
            ctx.out_dir,
            model_info,
            &metrics,
            &test_set,
            &predictions,
            &params,
        )?;
        // The engine prefixes each line with this stage's name.
        ctx.progress.finish(&format!(
            "{}: test accuracy {:.2}%, loss {:.4}, {:.0} images/s",
            model_info.stage,
            100.0 * metrics.accuracy,
            metrics.loss,
            metrics.inference_images_per_s
        ));
        all.insert(model_info.stage.clone(), serde_json::to_value(&metrics)?);
        speeds.insert(
            model_info.stage.clone(),
            serde_json::json!({ "inference_images_per_s": metrics.inference_images_per_s }),
        );
        results.push((model_info, metrics));
    }

    let metrics_json = serde_json::json!({
        "device": device::describe(&device),
        "test_images": test_set.len(),
        "models": all,
    });
    let table = comparison_markdown(&results);
    let timings = serde_json::json!({ "models": speeds });
    outputs::write(ctx.out_dir, &metrics_json, &timings, &table)?;
    for line in table.lines().filter(|l| !l.trim().is_empty()) {
        ctx.progress.println(line);
    }
    write_per_class_chart(ctx.out_dir, &results)?;

    let summary: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(m, r)| {
            (
                m.stage.clone(),
                serde_json::json!({ "accuracy": r.accuracy, "loss": r.loss }),
            )
        })
        .collect();
    Ok(serde_json::json!({ "test_images": test_set.len(), "models": summary }))
}

/// The stage's side of the evaluator: progress and Ctrl-C.
struct StageHooks<'a, 'c>(&'a StageContext<'c>);

impl EvalHooks for StageHooks<'_, '_> {
    fn before_batch(&mut self) -> anyhow::Result<()> {
        self.0.check_cancel().map_err(|_| Cancelled.into())
    }
    fn after_batch(&mut self) {
        self.0.progress.advance(1);
    }
}

/// Rows = true class, columns = predicted class.
pub fn confusion_matrix(truth: &[u8], predicted: &[u8]) -> Vec<Vec<u64>> {
    let n = CLASS_NAMES.len();
    let mut m = vec![vec![0u64; n]; n];
    for (&t, &p) in truth.iter().zip(predicted) {
        if let Some(cell) = m
            .get_mut(t as usize)
            .and_then(|row| row.get_mut(p as usize))
        {
            *cell += 1;
        }
    }
    m
}

/// The diagonal entry of row `i` (0 where a ragged matrix has none).
fn diagonal(confusion: &[Vec<u64>], i: usize) -> u64 {
    confusion
        .get(i)
        .and_then(|row| row.get(i))
        .copied()
        .unwrap_or(0)
}

/// Trace over total (0 for an empty matrix).
pub fn accuracy(confusion: &[Vec<u64>]) -> f64 {
    let total: u64 = confusion.iter().flatten().sum();
    let hits: u64 = (0..confusion.len()).map(|i| diagonal(confusion, i)).sum();
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// Precision, recall and F1 of each class from a confusion matrix.
pub fn per_class(confusion: &[Vec<u64>]) -> Vec<ClassMetrics> {
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    (0..confusion.len())
        .map(|c| {
            let hits = diagonal(confusion, c);
            let support: u64 = confusion.get(c).map_or(0, |row| row.iter().sum());
            let predicted: u64 = confusion.iter().filter_map(|row| row.get(c)).sum();
            let precision = ratio(hits, predicted);
            let recall = ratio(hits, support);
            let f1 = if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            };
            ClassMetrics {
                class: CLASS_NAMES.get(c).copied().unwrap_or("?").to_string(),
                precision,
                recall,
                f1,
                support,
            }
        })
        .collect()
}

fn class_labels() -> Vec<String> {
    CLASS_NAMES.iter().map(|s| s.to_string()).collect()
}

/// confusion-<stage>.png and misclassified-<stage>.png.
fn write_model_plots(
    out: &Path,
    info: &TrainedModel,
    metrics: &ModelMetrics,
    set: &Dataset,
    predictions: &Evaluation,
    params: &Params,
) -> anyhow::Result<()> {
    let matrix: Vec<Vec<f64>> = metrics
        .confusion
        .iter()
        .map(|row| row.iter().map(|&v| v as f64).collect())
        .collect();
    plot::heatmap(
        &out.join(outputs::confusion_chart(&info.stage)),
        &format!(
            "{} ({}): confusion matrix, accuracy {:.2}%",
            info.stage,
            info.architecture_name(),
            100.0 * metrics.accuracy
        ),
        &matrix,
        &class_labels(),
        &class_labels(),
        true,
    )?;

    let tiles: Vec<Tile> = set
        .labels
        .iter()
        .zip(&predictions.predicted)
        .enumerate()
        .filter(|(_, (t, p))| t != p)
        .take(params.misclassified)
        .map(|(i, (&t, &p))| {
            let name = |c: u8| CLASS_NAMES.get(c as usize).copied().unwrap_or("?");
            Tile::from_u8(
                set.image(i),
                IMAGE_SIDE,
                IMAGE_SIDE,
                format!("#{i}\ntrue: {}\npred: {}", name(t), name(p)),
            )
        })
        .collect();
    if !tiles.is_empty() {
        plot::save_image_grid(
            &out.join(outputs::misclassified_grid(&info.stage)),
            &format!("{}: misclassified test images", info.stage),
            &tiles,
            8,
            3,
        )?;
    }
    Ok(())
}

/// per-class-accuracy.png: each class's recall (accuracy on that class), one bar per model.
fn write_per_class_chart(
    out: &Path,
    results: &[(&TrainedModel, ModelMetrics)],
) -> anyhow::Result<()> {
    let series: Vec<BarSeries> = results
        .iter()
        .map(|(info, m)| {
            BarSeries::new(
                info.stage.clone(),
                m.per_class.iter().map(|c| c.recall).collect(),
            )
        })
        .collect();
    plot::bar_chart(
        &out.join(outputs::PER_CLASS_CHART),
        "Per-class test accuracy",
        "accuracy",
        &class_labels(),
        &series,
    )?;
    Ok(())
}

/// Fashion-MNIST's test images, the set the seed's figures are measured on.
const FULL_TEST_SET: usize = 10_000;

/// The seed study's table, this run's rows first, then the seed's own figures.
fn comparison_markdown(results: &[(&TrainedModel, ModelMetrics)]) -> String {
    let mut s = String::from("## Model comparison\n\n");
    s.push_str("| Stage | Architecture | Optimizer | Loss | Batch | Epochs | Final test accuracy | Final train loss |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for (info, m) in results {
        s.push_str(&format!(
            "| {} | {} | {} | cross-entropy | {} | {} | {} | {:.4} |\n",
            info.stage,
            info.architecture_name(),
            m.optimizer,
            info.params.batch_size,
            info.params.epochs,
            format::percent(m.accuracy),
            m.final_train_loss
        ));
    }
    s.push_str("| seed (reference) | Baseline CNN | Adadelta lr 1.0 x0.7/epoch | cross-entropy | 64 | 5 | 91.34% | 0.2318 |\n");
    s.push_str("| seed (reference) | ResNet-18 | Adam lr 1e-4 | cross-entropy | 64 | 5 | 89.47% | 0.1571 |\n");
    let n = results.first().map_or(0, |(_, m)| m.test_images);
    if n == FULL_TEST_SET {
        s.push_str("\nAccuracies are on all 10,000 test images, as the seed's are.\n");
    } else {
        s.push_str(&format!(
            "\nThis run's accuracies are on the first {} test images only (`test_limit`); \
             the seed's on all 10,000.\n",
            format::count(n)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_from_a_confusion_matrix() {
        let truth = [0u8, 0, 1, 1, 1, 2];
        let pred = [0u8, 1, 1, 1, 0, 2];
        let m = confusion_matrix(&truth, &pred);
        assert_eq!(m[0][0], 1);
        assert_eq!(m[0][1], 1);
        assert_eq!(m[1][1], 2);
        assert_eq!(m[1][0], 1);
        assert!((accuracy(&m) - 4.0 / 6.0).abs() < 1e-12);
        let pc = per_class(&m);
        assert!((pc[0].precision - 0.5).abs() < 1e-12);
        assert!((pc[1].recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((pc[2].f1 - 1.0).abs() < 1e-12);
        assert_eq!(pc[3].f1, 0.0);
        assert_eq!(pc[1].support, 3);
    }

    #[test]
    fn unknown_params_are_rejected() {
        let err = toml::from_str::<Params>("test_limt = 5")
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("test_limit")));
        let p: Params = toml::from_str("").unwrap_or_default();
        assert_eq!(p, Params::default());
        let zero = Params {
            batch_size: 0,
            ..Params::default()
        };
        assert!(zero.validate().is_err());
    }
}
