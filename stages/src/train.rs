//! The `train` stage: trains a baseline CNN or a ResNet-18 on Fashion-MNIST with a seeded,
//! resumable loop (a checkpoint after each epoch in the scratch folder) and writes the model,
//! its per-epoch history, the resolved config and loss/accuracy curves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::compute::ComputePools;
use crate::context::{Cancelled, Metrics, StageContext, StageError};
use crate::data::{Dataset, Normalization, Split, IMAGE_SIDE, PIXELS};
use crate::device;
use crate::models::{self, Classifier, ModelKind, DROPOUT_STREAM};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::plot::{self, Series};

/// Bump when outputs would change for the same params. 2: fused CPU kernels (batch norm,
/// conv+ReLU+pool, linear, optimizer updates) round differently, so model bytes differ.
/// 3: Winograd for the baseline's conv2 and a split fully connected product, likewise.
pub const VERSION: u32 = 3;

/// The `[stages.NAME]` table of a train stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// "baseline" | "resnet18".
    pub model: ModelKind,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// `{ name = "adadelta" | "adam" | "sgd", lr = ..., <that optimizer's settings> }`.
    pub optimizer: OptimizerConfig,
    /// The learning rate is multiplied by this after each epoch (1.0 = constant).
    #[serde(default = "default_lr_decay")]
    pub lr_decay: f64,
    /// Overrides the pipeline's seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Train on the first N training images only (0 = all).
    #[serde(default)]
    pub train_limit: usize,
    /// Random horizontal flips and shifts of up to 2 pixels.
    #[serde(default)]
    pub augment: bool,
    /// Evaluate on the test set after every epoch (else only after the last).
    #[serde(default = "default_true")]
    pub eval_every_epoch: bool,
}

fn default_epochs() -> usize {
    5
}
fn default_batch_size() -> usize {
    64
}
fn default_lr_decay() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}

impl Params {
    /// Values serde cannot rule out by type.
    pub fn validate(&self) -> Result<(), StageError> {
        let bad = |m: &str| Err(StageError::InvalidParams(m.to_string()));
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if !(self.lr_decay > 0.0 && self.lr_decay.is_finite()) {
            return bad("lr_decay must be a positive number (1.0 = no decay)");
        }
        self.optimizer.validate().map_err(StageError::InvalidParams)
    }
}

/// One epoch's figures, as history.json records them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// What `checkpoint.json` in the scratch folder records about the last completed epoch.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointMeta {
    version: u32,
    params: Params,
    seed: u64,
    epochs_done: usize,
    history: Vec<EpochRecord>,
}

const CHECKPOINT_META: &str = "checkpoint.json";

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    crate::ops::with_kernels(ctx.kernels, || train(params, ctx))
}

fn train(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    crate::ops::tune_allocator_for_training();
    let seed = params.seed.unwrap_or(ctx.seed);
    let device = device::select(ctx.device)?;
    let data_dir = &ctx.input_of_kind("download")?.dir;
    let train_set = Dataset::load(data_dir, Split::Train)
        .with_context(|| format!("loading the training set from {}", data_dir.display()))?
        .truncated(params.train_limit);
    let test_set = Dataset::load(data_dir, Split::Test)
        .with_context(|| format!("loading the test set from {}", data_dir.display()))?;
    if train_set.is_empty() {
        anyhow::bail!("the training set in {} is empty", data_dir.display());
    }
    let norm = Normalization::default();

    let (model, varmap) = models::init(params.model, seed, &device)?;
    let mut optimizer = params.optimizer.build(models::trainable_vars(&varmap))?;
    let mut history = resume(&params, seed, ctx.scratch_dir, &varmap, optimizer.as_mut())?;
    if !history.is_empty() {
        ctx.progress.println(&format!(
            "resuming after epoch {}/{} from {}",
            history.len(),
            params.epochs,
            ctx.scratch_dir.display()
        ));
    }

    let setup = EpochSetup {
        params: &params,
        seed,
        norm,
        device: &device,
        train_set: &train_set,
        test_set: &test_set,
    };
    let mut pools = ComputePools::new();
    for epoch in history.len()..params.epochs {
        let record = train_epoch(
            &setup,
            epoch,
            model.as_ref(),
            optimizer.as_mut(),
            &mut pools,
            ctx,
        )?;
        ctx.progress.finish(&format!(
            "epoch {}/{}: loss {:.4}, train acc {:.2}%{}, lr {:.3e}, {:.1}s, {:.0} img/s",
            epoch + 1,
            params.epochs,
            record.train_loss,
            100.0 * record.train_accuracy,
            record
                .test_accuracy
                .map(|a| format!(", test acc {:.2}%", 100.0 * a))
                .unwrap_or_default(),
            record.lr,
            record.seconds,
            record.images_per_s
        ));
        history.push(record);
        save_checkpoint(
            &params,
            seed,
            ctx.scratch_dir,
            &varmap,
            optimizer.as_ref(),
            &history,
        )?;
    }

    write_outputs(
        &params,
        seed,
        &device,
        model.as_ref(),
        &varmap,
        &history,
        &train_set,
        &test_set,
        ctx,
    )
}

/// What every epoch needs besides the model and optimizer.
struct EpochSetup<'a> {
    params: &'a Params,
    seed: u64,
    norm: Normalization,
    device: &'a Device,
    train_set: &'a Dataset,
    test_set: &'a Dataset,
}

/// A 64-bit mix (splitmix64's finalizer): per-epoch seeds that differ in every bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of everything random in epoch `epoch` (shuffle, dropout, augmentation): derived
/// from the run's seed alone, so a resumed run draws exactly what an uninterrupted one does.
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    mix(seed ^ mix(epoch as u64 + 1))
}

/// ChaCha stream for augmentation draws (init uses 1, dropout 2).
const AUGMENT_STREAM: u64 = 3;

fn train_epoch(
    setup: &EpochSetup,
    epoch: usize,
    model: &dyn Classifier,
    optimizer: &mut dyn Optimizer,
    pools: &mut ComputePools,
    ctx: &StageContext,
) -> anyhow::Result<EpochRecord> {
    let params = setup.params;
    let lr = params.optimizer.lr() * params.lr_decay.powi(epoch as i32);
    optimizer.set_learning_rate(lr);
    let seed = epoch_seed(setup.seed, epoch);
    let order = setup.train_set.shuffled_indices(seed);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(seed);
    dropout_rng.set_stream(DROPOUT_STREAM);
    let mut augment_rng = ChaCha8Rng::seed_from_u64(seed);
    augment_rng.set_stream(AUGMENT_STREAM);

    let batches = order.len().div_ceil(params.batch_size);
    ctx.progress.start(
        &format!("epoch {}/{}", epoch + 1, params.epochs),
        batches as u64,
        "batches",
    );
    let started = Instant::now();
    let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
    for indices in order.chunks(params.batch_size) {
        if ctx.check_cancel().is_err() {
            return Err(Cancelled.into());
        }
        let (images, labels) = if params.augment {
            augmented_batch(
                setup.train_set,
                indices,
                &mut augment_rng,
                setup.norm,
                setup.device,
            )?
        } else {
            setup.train_set.batch(indices, setup.norm, setup.device)?
        };
        let (logits, loss) = pools.install(|| {
            crate::ops::with_kernels(ctx.kernels, || -> candle_core::Result<(Tensor, Tensor)> {
                let logits = model.forward_train(&images, &mut dropout_rng)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                let grads = loss.backward()?;
                optimizer.step(&grads)?;
                Ok((logits, loss))
            })
        })??;

        let batch_loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        if !batch_loss.is_finite() {
            anyhow::bail!(
                "training diverged in epoch {} (loss is {batch_loss}); try a smaller learning rate",
                epoch + 1
            );
        }
        loss_sum += batch_loss * indices.len() as f64;
        correct += count_correct(&logits, &labels)?;
        seen += indices.len();
        ctx.progress.advance(1);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        ctx.progress.message(&format!(
            "loss {:.4}  acc {:.2}%  {:.0} img/s",
            loss_sum / seen as f64,
            100.0 * correct as f64 / seen as f64,
            seen as f64 / secs
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    let last_epoch = epoch + 1 == params.epochs;
    let (test_loss, test_accuracy) = if params.eval_every_epoch || last_epoch {
        let (l, a) = evaluate(model, setup.test_set, setup.norm, setup.device, ctx)?;
        (Some(l), Some(a))
    } else {
        (None, None)
    };
    Ok(EpochRecord {
        epoch: epoch + 1,
        lr,
        train_loss: loss_sum / seen as f64,
        train_accuracy: correct as f64 / seen as f64,
        test_loss,
        test_accuracy,
        seconds,
        images_per_s: seen as f64 / seconds.max(1e-9),
    })
}

fn count_correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<usize> {
    let predicted = logits.argmax(D::Minus1)?;
    let hits = predicted.eq(labels)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(hits.to_scalar::<u32>()? as usize)
}

/// Mean cross-entropy and accuracy on `set` in eval mode.
fn evaluate(
    model: &dyn Classifier,
    set: &Dataset,
    norm: Normalization,
    device: &Device,
    ctx: &StageContext,
) -> anyhow::Result<(f64, f64)> {
    const EVAL_BATCH: usize = 500;
    let order: Vec<usize> = (0..set.len()).collect();
    let (mut loss_sum, mut correct) = (0f64, 0usize);
    for indices in order.chunks(EVAL_BATCH) {
        if ctx.check_cancel().is_err() {
            return Err(Cancelled.into());
        }
        let (images, labels) = set.batch(indices, norm, device)?;
        let logits = model.forward(&images)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        loss_sum += loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64 * indices.len() as f64;
        correct += count_correct(&logits, &labels)?;
    }
    let n = set.len().max(1) as f64;
    Ok((loss_sum / n, correct as f64 / n))
}

/// A training batch with each image flipped left-right with probability 1/2 and shifted by
/// up to 2 pixels each way (vacated pixels are background, 0).
fn augmented_batch(
    set: &Dataset,
    indices: &[usize],
    rng: &mut ChaCha8Rng,
    norm: Normalization,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    const MAX_SHIFT: i64 = 2;
    let side = IMAGE_SIDE as i64;
    let mut images = Vec::with_capacity(indices.len() * PIXELS);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        let src = set.image(i);
        let flip = rng.gen_bool(0.5);
        let dx = rng.gen_range(-MAX_SHIFT..=MAX_SHIFT);
        let dy = rng.gen_range(-MAX_SHIFT..=MAX_SHIFT);
        for y in 0..side {
            for x in 0..side {
                let (sx, sy) = (x - dx, y - dy);
                let sx = if flip { side - 1 - sx } else { sx };
                let inside = (0..side).contains(&sx) && (0..side).contains(&sy);
                images.push(if inside {
                    src[(sy * side + sx) as usize]
                } else {
                    0
                });
            }
        }
        labels.push(set.labels[i]);
    }
    let augmented = Dataset { images, labels };
    let all: Vec<usize> = (0..indices.len()).collect();
    augmented.batch(&all, norm, device)
}

fn checkpoint_files(dir: &Path, epochs_done: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("epoch-{epochs_done}.model.safetensors")),
        dir.join(format!("epoch-{epochs_done}.optimizer.safetensors")),
    )
}

/// Writes the model and optimizer state after an epoch, then (atomically) the metadata that
/// points at them, so an interruption at any moment leaves the previous checkpoint usable.
fn save_checkpoint(
    params: &Params,
    seed: u64,
    dir: &Path,
    varmap: &VarMap,
    optimizer: &dyn Optimizer,
    history: &[EpochRecord],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let epochs_done = history.len();
    let (model_file, optim_file) = checkpoint_files(dir, epochs_done);
    models::save_varmap(varmap, &model_file)?;
    let state: HashMap<String, Tensor> = optimizer.state()?.into_iter().collect();
    candle_core::safetensors::save(&state, &optim_file)
        .with_context(|| format!("writing {}", optim_file.display()))?;
    let meta = CheckpointMeta {
        version: VERSION,
        params: params.clone(),
        seed,
        epochs_done,
        history: history.to_vec(),
    };
    let tmp = dir.join(format!("{CHECKPOINT_META}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&meta)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_META))
        .with_context(|| format!("writing {}", dir.join(CHECKPOINT_META).display()))?;
    if epochs_done > 1 {
        let (old_model, old_optim) = checkpoint_files(dir, epochs_done - 1);
        // Best effort: a leftover old checkpoint only costs disk space.
        let _ = std::fs::remove_file(old_model);
        let _ = std::fs::remove_file(old_optim);
    }
    Ok(())
}

/// Restores the last checkpoint of a run with these params and seed, if the scratch folder
/// has one; returns the history so far (empty = start from scratch).
fn resume(
    params: &Params,
    seed: u64,
    dir: &Path,
    varmap: &VarMap,
    optimizer: &mut dyn Optimizer,
) -> anyhow::Result<Vec<EpochRecord>> {
    let meta_path = dir.join(CHECKPOINT_META);
    let Ok(text) = std::fs::read_to_string(&meta_path) else {
        return Ok(Vec::new());
    };
    let meta: CheckpointMeta = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(
                "ignoring unreadable checkpoint {}: {e}",
                meta_path.display()
            );
            return Ok(Vec::new());
        }
    };
    if meta.version != VERSION
        || &meta.params != params
        || meta.seed != seed
        || meta.epochs_done > params.epochs
        || meta.history.len() != meta.epochs_done
    {
        tracing::warn!(
            "ignoring checkpoint of a different run in {}",
            dir.display()
        );
        return Ok(Vec::new());
    }
    let (model_file, optim_file) = checkpoint_files(dir, meta.epochs_done);
    models::load_into_varmap(varmap, &model_file)?;
    let device = varmap
        .all_vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu);
    let state = candle_core::safetensors::load(&optim_file, &device)
        .with_context(|| format!("reading {}", optim_file.display()))?;
    optimizer.load_state(&state)?;
    Ok(meta.history)
}

#[allow(clippy::too_many_arguments)]
fn write_outputs(
    params: &Params,
    seed: u64,
    device: &Device,
    model: &dyn Classifier,
    varmap: &VarMap,
    history: &[EpochRecord],
    train_set: &Dataset,
    test_set: &Dataset,
    ctx: &StageContext,
) -> anyhow::Result<Metrics> {
    let out = ctx.out_dir;
    models::save_varmap(varmap, &out.join("model.safetensors"))?;
    let history_json = serde_json::json!({ "model": params.model, "epochs": history });
    write_json(&out.join("history.json"), &history_json)?;

    let mut resolved = params.clone();
    resolved.seed = Some(seed);
    let config = serde_json::json!({
        "stage": ctx.name,
        "kind": "train",
        "version": VERSION,
        "model": params.model,
        "params": resolved,
        "device": device::describe(device),
        "kernels": effective_kernels(device, ctx.kernels),
        "param_count": model.param_count(),
        "train_images": train_set.len(),
        "test_images": test_set.len(),
        "normalization": Normalization::default(),
    });
    write_json(&out.join("config.json"), &config)?;
    write_curves(out, params.model, history)?;

    let last = history
        .last()
        .context("training finished without a completed epoch")?;
    let total_images: f64 = history.iter().map(|r| r.images_per_s * r.seconds).sum();
    let total_seconds: f64 = history.iter().map(|r| r.seconds).sum();
    Ok(serde_json::json!({
        "model": params.model,
        "param_count": model.param_count(),
        "epochs": history.len(),
        "final_train_loss": last.train_loss,
        "final_train_accuracy": last.train_accuracy,
        "test_accuracy": last.test_accuracy,
        "train_images_per_s": total_images / total_seconds.max(1e-9),
        "device": device::describe(device),
        "kernels": effective_kernels(device, ctx.kernels),
    }))
}

/// The kernels that really ran: off the CPU every op is portable.
fn effective_kernels(device: &Device, asked: crate::ops::Kernels) -> crate::ops::Kernels {
    if device.is_cpu() {
        asked
    } else {
        crate::ops::Kernels::Portable
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// loss.png and accuracy.png: per-epoch training (and, where measured, test) curves.
fn write_curves(out: &Path, kind: ModelKind, history: &[EpochRecord]) -> anyhow::Result<()> {
    let points = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<(f64, f64)> {
        history
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
    let loss = with_test(points(&|r| Some(r.train_loss)), points(&|r| r.test_loss));
    plot::line_chart(
        &out.join("loss.png"),
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
        &out.join("accuracy.png"),
        &format!("{kind}: accuracy"),
        "epoch",
        "accuracy (%)",
        &accuracy,
    )?;
    Ok(())
}
