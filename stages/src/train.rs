//! The `train` stage: trains a baseline CNN or a ResNet-18 on Fashion-MNIST with a seeded,
//! resumable loop (a checkpoint after each epoch in the scratch folder, recorded with its
//! blake3; a damaged one is discarded with a warning for the one before it) and writes the
//! model, its per-epoch history, the resolved config and loss/accuracy curves.

use std::collections::HashMap;
use std::path::Path;
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

/// What `checkpoint.json` in the scratch folder records: the run it belongs to and its last
/// (at most two) epoch checkpoints, oldest first, each with the size and blake3 of its files,
/// so that a damaged latest checkpoint falls back to the one before it.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT`]; format 1 (no `format` field) recorded no hashes.
    format: u32,
    version: u32,
    params: Params,
    seed: u64,
    checkpoints: Vec<Checkpoint>,
}

/// The state after `epochs_done` epochs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checkpoint {
    epochs_done: usize,
    history: Vec<EpochRecord>,
    model: FileRecord,
    optimizer: FileRecord,
}

/// A checkpoint file (a name in the scratch folder) as it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileRecord {
    file: String,
    size: u64,
    blake3: String,
}

const CHECKPOINT_META: &str = "checkpoint.json";
const CHECKPOINT_FORMAT: u32 = 2;

/// The model, its variables and their optimizer: what a checkpoint restores.
struct TrainState {
    model: Box<dyn Classifier>,
    varmap: VarMap,
    optimizer: Box<dyn Optimizer>,
}

impl TrainState {
    /// The seeded initial state of a run.
    fn fresh(params: &Params, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let (model, varmap) = models::init(params.model, seed, device)?;
        let optimizer = params.optimizer.build(models::trainable_vars(&varmap))?;
        Ok(TrainState {
            model,
            varmap,
            optimizer,
        })
    }
}

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

    let (mut state, mut last_checkpoint) = resume(&params, seed, &device, ctx)?;
    let mut history = last_checkpoint
        .as_ref()
        .map(|c| c.history.clone())
        .unwrap_or_default();
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
            state.model.as_ref(),
            state.optimizer.as_mut(),
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
            &state,
            &history,
            &mut last_checkpoint,
        )?;
    }

    write_outputs(
        &params,
        seed,
        &device,
        state.model.as_ref(),
        &state.varmap,
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

/// The names of the model and optimizer files of the checkpoint after `epochs_done` epochs.
fn checkpoint_names(epochs_done: usize) -> (String, String) {
    (
        format!("epoch-{epochs_done}.model.safetensors"),
        format!("epoch-{epochs_done}.optimizer.safetensors"),
    )
}

/// Flushes a written file to the disk.
fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", path.display()))
}

/// Best effort: makes renames in `dir` durable (not possible everywhere, e.g. on Windows).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes the checkpoint file `name` in `dir` through a temporary name, flushed, and returns
/// its size and hash as they are on the disk.
fn write_checkpoint_file(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<FileRecord> {
    let tmp = dir.join(format!("{name}.tmp"));
    write(&tmp)?;
    let bytes = std::fs::read(&tmp).with_context(|| format!("reading back {}", tmp.display()))?;
    sync_file(&tmp)?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(FileRecord {
        file: name.to_string(),
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// Writes the model and optimizer state after an epoch, then (atomically) the metadata that
/// records them next to the previous checkpoint, then deletes older checkpoint files: an
/// interruption at any moment, or damage to the newest files, leaves a usable checkpoint.
fn save_checkpoint(
    params: &Params,
    seed: u64,
    dir: &Path,
    state: &TrainState,
    history: &[EpochRecord],
    last: &mut Option<Checkpoint>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let epochs_done = history.len();
    let (model_name, optim_name) = checkpoint_names(epochs_done);
    let model = write_checkpoint_file(dir, &model_name, |path| {
        models::save_varmap(&state.varmap, path)
    })?;
    let optim_state: HashMap<String, Tensor> = state.optimizer.state()?.into_iter().collect();
    let optimizer = write_checkpoint_file(dir, &optim_name, |path| {
        candle_core::safetensors::save(&optim_state, path)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    let current = Checkpoint {
        epochs_done,
        history: history.to_vec(),
        model,
        optimizer,
    };
    let previous = last.as_ref().filter(|c| c.epochs_done < epochs_done);
    let meta = CheckpointMeta {
        format: CHECKPOINT_FORMAT,
        version: VERSION,
        params: params.clone(),
        seed,
        checkpoints: previous.cloned().into_iter().chain([current]).collect(),
    };
    let meta_path = dir.join(CHECKPOINT_META);
    let tmp = dir.join(format!("{CHECKPOINT_META}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&meta)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, &meta_path)
        .with_context(|| format!("writing {}", meta_path.display()))?;
    sync_dir(dir);
    remove_unrecorded_checkpoints(dir, &meta.checkpoints);
    *last = meta.checkpoints.into_iter().last();
    Ok(())
}

/// Deletes the checkpoint files in `dir` that `kept` does not name (older epochs, leftovers
/// of an interrupted write or of an older format). Best effort: a leftover only costs disk
/// space.
fn remove_unrecorded_checkpoints(dir: &Path, kept: &[Checkpoint]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let ours = name.starts_with("epoch-")
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.tmp"));
        let recorded = kept
            .iter()
            .any(|c| c.model.file == name || c.optimizer.file == name);
        if ours && !recorded {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Restores the newest good checkpoint of a run with these params and seed from the scratch
/// folder. A checkpoint whose files are missing, truncated, changed (size or blake3 differ
/// from `checkpoint.json`) or do not load is discarded with a warning to the user, and the one
/// before it is tried. Returns the state to train from and the checkpoint it holds (None:
/// from the start). Only a failure to build the initial state is an error.
fn resume(
    params: &Params,
    seed: u64,
    device: &Device,
    ctx: &StageContext,
) -> anyhow::Result<(TrainState, Option<Checkpoint>)> {
    let warn = |msg: &str| {
        tracing::warn!("{msg}");
        ctx.progress.println(&format!("warning: {msg}"));
    };
    let fresh = || TrainState::fresh(params, seed, device);
    let mut state = fresh()?;
    let Some(mut meta) = read_checkpoint_meta(params, seed, ctx.scratch_dir, &warn) else {
        return Ok((state, None));
    };
    meta.checkpoints.sort_by_key(|c| c.epochs_done);
    for (i, checkpoint) in meta.checkpoints.iter().enumerate().rev() {
        match restore(checkpoint, params, ctx.scratch_dir, device, &mut state) {
            Ok(()) => return Ok((state, Some(checkpoint.clone()))),
            Err(problem) => {
                let next = match i.checked_sub(1).map(|j| &meta.checkpoints[j]) {
                    Some(c) => format!("falling back to the one after epoch {}", c.epochs_done),
                    None => "training starts from the first epoch".to_string(),
                };
                warn(&format!(
                    "discarding the checkpoint after epoch {}: {problem}; {next}",
                    checkpoint.epochs_done
                ));
                // The failed load may have overwritten part of the state.
                state = fresh()?;
            }
        }
    }
    Ok((state, None))
}

/// `checkpoint.json` in `dir` when it belongs to this run; anything else (none, unreadable,
/// an older format without hashes, another run's) is None, with a warning unless absent.
fn read_checkpoint_meta(
    params: &Params,
    seed: u64,
    dir: &Path,
    warn: &dyn Fn(&str),
) -> Option<CheckpointMeta> {
    let path = dir.join(CHECKPOINT_META);
    let ignored = |why: String| {
        warn(&format!(
            "ignoring {}: {why}; training starts from the first epoch",
            path.display()
        ));
        None
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return ignored(format!("cannot read it ({e})")),
    };
    let value: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => return ignored(format!("not valid JSON ({e})")),
    };
    match value.get("format").map(|f| f.as_u64()) {
        Some(Some(f)) if f == u64::from(CHECKPOINT_FORMAT) => {}
        None => return ignored("written in an older format without checksums".into()),
        Some(f) => {
            return ignored(format!(
                "unknown format {} (expected {CHECKPOINT_FORMAT})",
                f.map_or("?".to_string(), |f| f.to_string())
            ))
        }
    }
    let meta: CheckpointMeta = match serde_json::from_value(value) {
        Ok(m) => m,
        Err(e) => return ignored(format!("unreadable ({e})")),
    };
    if meta.version != VERSION || &meta.params != params || meta.seed != seed {
        return ignored("it belongs to a run with other params, seed or stage version".into());
    }
    Some(meta)
}

/// Verifies a checkpoint's files and loads them into `state`; the error says which file is
/// wrong and how. `state` may be partly overwritten when this fails.
fn restore(
    checkpoint: &Checkpoint,
    params: &Params,
    dir: &Path,
    device: &Device,
    state: &mut TrainState,
) -> Result<(), String> {
    let (model_name, optim_name) = checkpoint_names(checkpoint.epochs_done);
    if !(1..=params.epochs).contains(&checkpoint.epochs_done)
        || checkpoint.history.len() != checkpoint.epochs_done
        || checkpoint.model.file != model_name
        || checkpoint.optimizer.file != optim_name
    {
        return Err(format!(
            "its entry in {} is inconsistent",
            dir.join(CHECKPOINT_META).display()
        ));
    }
    let model_path = dir.join(&model_name);
    let optim_path = dir.join(&optim_name);
    let model_bytes = read_verified(&model_path, &checkpoint.model)?;
    let optim_bytes = read_verified(&optim_path, &checkpoint.optimizer)?;
    let in_file = |path: &Path| {
        let path = path.display().to_string();
        move |e: candle_core::Error| format!("{path} does not load: {e}")
    };
    let tensors = candle_core::safetensors::load_buffer(&model_bytes, device)
        .map_err(in_file(&model_path))?;
    let optim_state = candle_core::safetensors::load_buffer(&optim_bytes, device)
        .map_err(in_file(&optim_path))?;
    // Check every variable before overwriting any.
    let mut values = Vec::new();
    for (name, var) in state
        .varmap
        .data()
        .lock()
        .map_err(|e| e.to_string())?
        .iter()
    {
        let value = tensors
            .get(name)
            .ok_or_else(|| format!("{} has no tensor `{name}`", model_path.display()))?;
        if value.dims() != var.dims() {
            return Err(format!(
                "{}: tensor `{name}` has shape {:?}, the model's is {:?}",
                model_path.display(),
                value.dims(),
                var.dims()
            ));
        }
        values.push((
            var.clone(),
            value.to_dtype(var.dtype()).map_err(in_file(&model_path))?,
        ));
    }
    for (var, value) in values {
        var.set(&value).map_err(in_file(&model_path))?;
    }
    state
        .optimizer
        .load_state(&optim_state)
        .map_err(in_file(&optim_path))
}

/// The bytes of a checkpoint file when its size and blake3 are those recorded.
fn read_verified(path: &Path, record: &FileRecord) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{} is missing", path.display()),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    let size = bytes.len() as u64;
    if size != record.size {
        return Err(format!(
            "{} is {size} bytes, {CHECKPOINT_META} recorded {}{}",
            path.display(),
            record.size,
            if size < record.size {
                " (truncated)"
            } else {
                ""
            }
        ));
    }
    let hash = blake3::hash(&bytes).to_hex();
    if hash.as_str() != record.blake3 {
        return Err(format!(
            "{} was changed or damaged after it was written (blake3 {hash}, {CHECKPOINT_META} recorded {})",
            path.display(),
            record.blake3
        ));
    }
    Ok(bytes)
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
        "kernels": ctx.kernels.running_on(device, DType::F32),
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
        "kernels": ctx.kernels.running_on(device, DType::F32),
    }))
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
