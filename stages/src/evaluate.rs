//! The `evaluate` stage: measures every trained model (the `train` inputs) on the test set —
//! accuracy, loss, per-class precision/recall/F1, confusion matrix, parameter count,
//! inference speed — and writes metrics.json, a comparison table against the seed study's
//! figures, confusion-matrix heatmaps, a grid of misclassified images and per-class bars.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, D};
use serde::{Deserialize, Serialize};

use crate::context::{Cancelled, Input, Metrics, StageContext, StageError};
use crate::data::{Dataset, Normalization, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::device;
use crate::models::{self, Classifier, ModelKind};
use crate::optim::OptimizerConfig;
use crate::plot::{self, BarSeries, Tile};
use crate::report::group_thousands;
use crate::train;

/// Bump when outputs would change for the same params (3: the CPU kernels of the forward pass
/// round differently, so the same model can score a little differently).
pub const VERSION: u32 = 3;

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

/// A train stage's outputs, as downstream stages read them.
pub struct TrainedModel {
    /// The train stage's name (e.g. "train-baseline").
    pub stage: String,
    pub kind: ModelKind,
    /// The train stage's resolved params (from its config.json).
    pub params: train::Params,
    pub dir: PathBuf,
}

impl TrainedModel {
    /// Every `train` input of the stage, or an error when there is none.
    pub fn read_all(ctx: &StageContext) -> anyhow::Result<Vec<TrainedModel>> {
        let trained: Vec<TrainedModel> = ctx
            .inputs_of_kind("train")
            .map(TrainedModel::read)
            .collect::<anyhow::Result<_>>()?;
        if trained.is_empty() {
            return Err(StageError::MissingInput {
                stage: ctx.name.to_string(),
                kind: "train".to_string(),
            }
            .into());
        }
        Ok(trained)
    }

    /// Reads the config.json a train stage wrote into `input.dir`.
    pub fn read(input: &Input) -> anyhow::Result<Self> {
        let path = input.dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("reading {} (train stage `{}`)", path.display(), input.stage)
        })?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let params: train::Params = serde_json::from_value(config["params"].clone())
            .with_context(|| format!("{} has no valid `params` table", path.display()))?;
        Ok(TrainedModel {
            stage: input.stage.clone(),
            kind: params.model,
            params,
            dir: input.dir.clone(),
        })
    }

    /// Loads the trained weights onto `device`.
    pub fn load(&self, device: &Device) -> anyhow::Result<Box<dyn Classifier>> {
        models::load(self.kind, &self.dir.join("model.safetensors"), device)
    }

    /// The last epoch's mean training loss, from history.json.
    pub fn final_train_loss(&self) -> anyhow::Result<f64> {
        let path = self.dir.join("history.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let history: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let epochs: Vec<train::EpochRecord> = serde_json::from_value(history["epochs"].clone())
            .with_context(|| format!("{} has no valid `epochs` list", path.display()))?;
        epochs
            .last()
            .map(|e| e.train_loss)
            .with_context(|| format!("{} records no epoch", path.display()))
    }

    /// "Adadelta lr 1.0 x0.7/epoch", "Adam lr 1e-4".
    pub fn optimizer_description(&self) -> String {
        let (name, lr) = match &self.params.optimizer {
            OptimizerConfig::Adadelta { lr, .. } => ("Adadelta", *lr),
            OptimizerConfig::Adam { lr, .. } => ("Adam", *lr),
            OptimizerConfig::Sgd { lr, .. } => ("SGD", *lr),
        };
        let decay = if (self.params.lr_decay - 1.0).abs() > f64::EPSILON {
            format!(" x{}/epoch", self.params.lr_decay)
        } else {
            String::new()
        };
        format!("{name} lr {}{decay}", format_lr(lr))
    }
}

/// A learning rate as the seed study writes it: "1.0", "0.1", "1e-4", "2.5e-3".
pub fn format_lr(lr: f64) -> String {
    if lr != 0.0 && lr.abs() < 0.01 {
        format!("{lr:e}")
    } else {
        format!("{lr:?}")
    }
}

/// The human name of an architecture, as the seed study's table spells it.
pub fn architecture_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Baseline => "Baseline CNN",
        ModelKind::Resnet18 => "ResNet-18",
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
    pub inference_images_per_s: f64,
    pub test_images: usize,
}

/// What the model predicted for each test image, and the figures derived from it.
struct Predictions {
    predicted: Vec<u8>,
    loss: f64,
    images_per_s: f64,
}

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    crate::ops::with_kernels(ctx.kernels, || run_with_kernels(params, ctx))
}

fn run_with_kernels(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let device = device::select(ctx.device)?;
    let data_dir = &ctx.input_of_kind("download")?.dir;
    let test_set = Dataset::load(data_dir, Split::Test)
        .with_context(|| format!("loading the test set from {}", data_dir.display()))?
        .truncated(params.test_limit);
    if test_set.is_empty() {
        anyhow::bail!("the test set in {} is empty", data_dir.display());
    }
    let trained = TrainedModel::read_all(ctx)?;

    let mut all = serde_json::Map::new();
    let mut results = Vec::new();
    for model_info in &trained {
        let model = model_info.load(&device)?;
        let predictions = predict(model.as_ref(), &test_set, &params, &device, ctx)?;
        let confusion = confusion_matrix(&test_set.labels, &predictions.predicted);
        let metrics = ModelMetrics {
            model: model_info.kind,
            optimizer: model_info.optimizer_description(),
            accuracy: accuracy(&confusion),
            loss: predictions.loss,
            per_class: per_class(&confusion),
            params: model.param_count(),
            final_train_loss: model_info.final_train_loss()?,
            inference_images_per_s: predictions.images_per_s,
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
        results.push((model_info, metrics));
    }

    let metrics_json = serde_json::json!({
        "device": device::describe(&device),
        "test_images": test_set.len(),
        "models": all,
    });
    let mut text = serde_json::to_string_pretty(&metrics_json)?;
    text.push('\n');
    let path = ctx.out_dir.join("metrics.json");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;

    let table = comparison_markdown(&results);
    let path = ctx.out_dir.join("comparison.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
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

/// Eval-mode predictions and mean cross-entropy over `set`, timing the forward passes.
fn predict(
    model: &dyn Classifier,
    set: &Dataset,
    params: &Params,
    device: &Device,
    ctx: &StageContext,
) -> anyhow::Result<Predictions> {
    let order: Vec<usize> = (0..set.len()).collect();
    let batches = order.len().div_ceil(params.batch_size);
    ctx.progress.start("evaluating", batches as u64, "batches");
    let mut predicted = Vec::with_capacity(set.len());
    let mut loss_sum = 0f64;
    let mut forward_seconds = 0f64;
    for indices in order.chunks(params.batch_size) {
        if ctx.check_cancel().is_err() {
            return Err(Cancelled.into());
        }
        let (images, labels) = set.batch(indices, Normalization::default(), device)?;
        let started = Instant::now();
        let logits = model.forward(&images)?;
        let classes = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        // Reading the classes back synchronizes a GPU, so the time covers the real work.
        forward_seconds += started.elapsed().as_secs_f64();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        loss_sum += loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64 * indices.len() as f64;
        predicted.extend(classes.into_iter().map(|c| c as u8));
        ctx.progress.advance(1);
    }
    Ok(Predictions {
        predicted,
        loss: loss_sum / set.len().max(1) as f64,
        images_per_s: set.len() as f64 / forward_seconds.max(1e-9),
    })
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
    predictions: &Predictions,
    params: &Params,
) -> anyhow::Result<()> {
    let matrix: Vec<Vec<f64>> = metrics
        .confusion
        .iter()
        .map(|row| row.iter().map(|&v| v as f64).collect())
        .collect();
    plot::heatmap(
        &out.join(format!("confusion-{}.png", info.stage)),
        &format!(
            "{} ({}): confusion matrix, accuracy {:.2}%",
            info.stage,
            architecture_name(info.kind),
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
            &out.join(format!("misclassified-{}.png", info.stage)),
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
        &out.join("per-class-accuracy.png"),
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
            "| {} | {} | {} | cross-entropy | {} | {} | {:.2}% | {:.4} |\n",
            info.stage,
            architecture_name(info.kind),
            m.optimizer,
            info.params.batch_size,
            info.params.epochs,
            100.0 * m.accuracy,
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
            group_thousands(n as i128)
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
    fn learning_rates_and_counts_read_like_the_seed_table() {
        assert_eq!(format_lr(1.0), "1.0");
        assert_eq!(format_lr(0.1), "0.1");
        assert_eq!(format_lr(1e-4), "1e-4");
        assert_eq!(format_lr(2.5e-3), "2.5e-3");
        assert_eq!(group_thousands(300), "300");
        assert_eq!(group_thousands(10_000), "10,000");
        assert_eq!(group_thousands(-1_199_882), "-1,199,882");
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
