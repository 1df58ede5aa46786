//! What a train stage publishes, written and read here only: other stages get a trained
//! model, its params, history and timings through [`TrainedModel`], never by file name.
//!
//! | file | hashed | content |
//! |---|---|---|
//! | model.safetensors | yes | every variable (weights, batch-norm running statistics) |
//! | config.json | yes | resolved params, seed, device and kernels, sizes |
//! | history.json | yes | per epoch: lr, train and test loss and accuracy |
//! | loss.png, accuracy.png | yes | the history's curves |
//! | timings.json | no ([`UNHASHED_OUTPUTS`]) | per epoch: seconds and images/s |
//!
//! Timings differ on every run, so they stay out of the content hash downstream stages see:
//! a retrain to identical model bytes does not make evaluate, visualize or report stale.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::Params;
use crate::context::{Input, StageContext, StageError};
use crate::format;
use crate::models::{self, Classifier, ModelKind};
use crate::optim::OptimizerConfig;
use crate::plot::{self, Series};

const MODEL_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.json";
const HISTORY_FILE: &str = "history.json";
const TIMINGS_FILE: &str = "timings.json";
const CHARTS: [&str; 2] = ["loss.png", "accuracy.png"];

/// Outputs left out of the content hash downstream stages see.
pub const UNHASHED_OUTPUTS: &[&str] = &[TIMINGS_FILE];

/// One epoch's figures, as history.json records them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
}

/// One epoch's training time, as timings.json records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochTiming {
    pub epoch: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// history.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub model: ModelKind,
    pub epochs: Vec<EpochRecord>,
}

/// timings.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub epochs: Vec<EpochTiming>,
}

impl Timings {
    /// Images per second over all epochs.
    pub fn images_per_s(&self) -> f64 {
        let images: f64 = self.epochs.iter().map(|t| t.images_per_s * t.seconds).sum();
        let seconds: f64 = self.epochs.iter().map(|t| t.seconds).sum();
        images / seconds.max(1e-9)
    }
}

/// The parts of config.json other stages read.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainConfig {
    /// The resolved params (seed included).
    pub params: Params,
    /// Where the training ran ("cpu", "cuda:0"); absent in hand-made fixtures.
    #[serde(default)]
    pub device: Option<String>,
    /// The kernels that ran ("fast", "portable").
    #[serde(default)]
    pub kernels: Option<String>,
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, stage: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {} (train stage `{stage}`)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
}

/// Writes every output of a finished training into `out`; `config` is config.json.
pub(super) fn write(
    out: &Path,
    varmap: &candle_nn::VarMap,
    config: &serde_json::Value,
    history: &History,
    timings: &Timings,
) -> anyhow::Result<()> {
    models::save_varmap(varmap, &out.join(MODEL_FILE))?;
    write_json(&out.join(HISTORY_FILE), history)?;
    write_json(&out.join(TIMINGS_FILE), timings)?;
    write_json(&out.join(CONFIG_FILE), config)?;
    write_curves(out, history)
}

/// loss.png and accuracy.png: per-epoch training (and, where measured, test) curves.
fn write_curves(out: &Path, history: &History) -> anyhow::Result<()> {
    let points = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .epochs
            .iter()
            .filter_map(|r| f(r).map(|v| (r.epoch as f64, v)))
            .collect()
    };
    let with_test = |train: Vec<(f64, f64)>, test: Vec<(f64, f64)>| {
        let mut series = vec![Series::new("train", train)];
        if !test.is_empty() {
            series.push(Series::new("test", test));
        }
        series
    };
    let kind = history.model;
    let loss = with_test(points(&|r| Some(r.train_loss)), points(&|r| r.test_loss));
    plot::line_chart(
        &out.join(CHARTS[0]),
        &format!("{kind}: cross-entropy loss"),
        "epoch",
        "loss",
        &loss,
    )?;
    let accuracy = with_test(
        points(&|r| Some(100.0 * r.train_accuracy)),
        points(&|r| r.test_accuracy.map(|a| 100.0 * a)),
    );
    plot::line_chart(
        &out.join(CHARTS[1]),
        &format!("{kind}: accuracy"),
        "epoch",
        "accuracy (%)",
        &accuracy,
    )?;
    Ok(())
}

/// A train stage's outputs, as downstream stages read them.
pub struct TrainedModel {
    /// The train stage's name (e.g. "train-baseline").
    pub stage: String,
    pub kind: ModelKind,
    /// The train stage's resolved params (from its config.json).
    pub params: Params,
    dir: PathBuf,
}

impl TrainedModel {
    /// Every `train` input of the stage, or an error when there is none.
    pub fn read_all(ctx: &StageContext) -> anyhow::Result<Vec<TrainedModel>> {
        let trained: Vec<TrainedModel> = ctx
            .inputs_of_kind(super::NAME)
            .map(TrainedModel::read)
            .collect::<anyhow::Result<_>>()?;
        if trained.is_empty() {
            return Err(StageError::MissingInput {
                stage: ctx.name.to_string(),
                kind: super::NAME.to_string(),
            }
            .into());
        }
        Ok(trained)
    }

    /// Reads the config.json a train stage wrote into `input.dir`.
    pub fn read(input: &Input) -> anyhow::Result<Self> {
        let config = Self::config_of(input)?;
        Ok(TrainedModel {
            stage: input.stage.clone(),
            kind: config.params.model,
            params: config.params,
            dir: input.dir.clone(),
        })
    }

    /// The config.json of a train input.
    pub fn config_of(input: &Input) -> anyhow::Result<TrainConfig> {
        read_json(&input.dir.join(CONFIG_FILE), &input.stage)
    }

    /// Loads the trained weights onto `device`.
    pub fn load(&self, device: &Device) -> anyhow::Result<Box<dyn Classifier>> {
        models::load(self.kind, &self.dir.join(MODEL_FILE), device)
    }

    /// The per-epoch history.
    pub fn history(&self) -> anyhow::Result<History> {
        read_json(&self.dir.join(HISTORY_FILE), &self.stage)
    }

    /// The per-epoch timings; None for outputs that have none (hand-made fixtures).
    pub fn timings(&self) -> anyhow::Result<Option<Timings>> {
        let path = self.dir.join(TIMINGS_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        read_json(&path, &self.stage).map(Some)
    }

    /// The last epoch's mean training loss.
    pub fn final_train_loss(&self) -> anyhow::Result<f64> {
        let path = self.dir.join(HISTORY_FILE);
        self.history()?
            .epochs
            .last()
            .map(|e| e.train_loss)
            .with_context(|| format!("{} records no epoch", path.display()))
    }

    /// The loss and accuracy charts that exist.
    pub fn charts(&self) -> Vec<PathBuf> {
        CHARTS
            .iter()
            .map(|c| self.dir.join(c))
            .filter(|p| p.is_file())
            .collect()
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
        format!("{name} lr {}{decay}", format::learning_rate(lr))
    }

    /// The human name of the architecture, as the seed study's table spells it.
    pub fn architecture_name(&self) -> &'static str {
        architecture_name(self.kind)
    }
}

/// The human name of an architecture, as the seed study's table spells it.
pub fn architecture_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Baseline => "Baseline CNN",
        ModelKind::Resnet18 => "ResNet-18",
    }
}
