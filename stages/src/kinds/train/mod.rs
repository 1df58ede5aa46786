//! The `train` stage: trains a baseline CNN or a ResNet-18 on Fashion-MNIST with a seeded,
//! resumable loop (a checkpoint after each epoch in the scratch folder: [`checkpoint`]) and
//! writes the model, its per-epoch history and timings, the resolved config and loss/accuracy
//! curves ([`outputs`], which other stages read through [`TrainedModel`]). The training step
//! and the evaluation are fmnist-nn's learner.

mod checkpoint;
pub mod outputs;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::compute::ComputePools;
use crate::context::{Cancelled, Metrics, StageContext, StageError};
use crate::data::{Dataset, Normalization, Split, IMAGE_SIDE, PIXELS};
use crate::device;
use crate::download::DataFiles;
use crate::kind::stage_kind;
use crate::learner::{self, EpochHooks, EpochTotals, EvalHooks, Learner, StepFn, StepOutput};
use crate::models::{ModelKind, DROPOUT_STREAM};
use crate::optim::OptimizerConfig;
pub use outputs::{architecture_name, EpochRecord, EpochTiming, History, Timings, TrainedModel};

pub const NAME: &str = "train";

/// Bump when outputs would change for the same params. 2: fused CPU kernels (batch norm,
/// conv+ReLU+pool, linear, optimizer updates) round differently, so model bytes differ.
/// 3: Winograd for the baseline's conv2 and a split fully connected product, likewise.
/// 4: history.json no longer holds seconds and images/s (they moved to timings.json, left
/// out of the hash downstream stages see); model bytes are unchanged.
pub const VERSION: u32 = 4;

/// The `train` kind.
pub struct Train;

stage_kind!(
    Train,
    UNHASHED_OUTPUTS = outputs::UNHASHED_OUTPUTS,
    PROGRESS_PARAMS = &["epochs"],
);

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

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    crate::ops::with_kernels(ctx.kernels, || train(params, ctx))
}

fn train(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    crate::ops::tune_allocator_for_training();
    let seed = params.seed.unwrap_or(ctx.seed);
    let device = device::select(ctx.device)?;
    let data = DataFiles::first(ctx)?;
    let train_set = data.load_nonempty(Split::Train, params.train_limit)?;
    let test_set = data.load(Split::Test)?;

    let checkpoint::Resumed {
        mut learner,
        mut history,
        mut timings,
        scratch_checkpoint: mut last_checkpoint,
    } = checkpoint::resume(&params, seed, &device, ctx)?;

    let setup = EpochSetup {
        params: &params,
        seed,
        norm: Normalization::default(),
        device: &device,
        train_set: &train_set,
        test_set: &test_set,
    };
    let mut pools = ComputePools::new();
    for epoch in history.len()..params.epochs {
        let (record, timing) = train_epoch(&setup, epoch, &mut learner, &mut pools, ctx)?;
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
            timing.seconds,
            timing.images_per_s
        ));
        history.push(record);
        timings.push(timing);
        checkpoint::save_checkpoint(
            &params,
            seed,
            ctx.scratch_dir,
            &learner,
            &history,
            &timings,
            &mut last_checkpoint,
        )?;
    }

    if let Some(dir) = ctx.continue_dir {
        if let Err(e) = checkpoint::save_end_state(&params, seed, dir, &learner, &history, &timings)
        {
            // Only a longer run later loses: it trains from the start.
            let msg = format!("could not keep the end state for longer runs: {e:#}");
            tracing::warn!("{msg}");
            ctx.progress.println(&format!("warning: {msg}"));
        }
    }

    let mut resolved = params.clone();
    resolved.seed = Some(seed);
    let param_count = learner.model.param_count();
    let kernels = ctx.kernels.running_on(&device, DType::F32);
    let config = serde_json::json!({
        "stage": ctx.name,
        "kind": NAME,
        "version": VERSION,
        "model": params.model,
        "params": resolved,
        "device": device::describe(&device),
        "kernels": kernels,
        "param_count": param_count,
        "train_images": train_set.len(),
        "test_images": test_set.len(),
        "normalization": Normalization::default(),
    });
    let last = history
        .last()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("training finished without a completed epoch"))?;
    let history = History {
        model: params.model,
        epochs: history,
    };
    let timings = Timings { epochs: timings };
    outputs::write(ctx.out_dir, &learner.varmap, &config, &history, &timings)?;
    Ok(serde_json::json!({
        "model": params.model,
        "param_count": param_count,
        "epochs": history.epochs.len(),
        "final_train_loss": last.train_loss,
        "final_train_accuracy": last.train_accuracy,
        "test_accuracy": last.test_accuracy,
        "train_images_per_s": timings.images_per_s(),
        "device": device::describe(&device),
        "kernels": kernels,
        "cpu_level": crate::ops::cpu_level(),
    }))
}

/// What every epoch needs besides the learner.
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

/// The stage's side of the learner's loops: steps on this stage's share of the cores with
/// its kernels, progress, and Ctrl-C.
struct StageHooks<'a, 'c> {
    ctx: &'a StageContext<'c>,
    pools: &'a mut ComputePools,
}

impl EpochHooks for StageHooks<'_, '_> {
    fn run_step(&mut self, step: &mut StepFn) -> anyhow::Result<StepOutput> {
        let kernels = self.ctx.kernels;
        Ok(self
            .pools
            .install(|| crate::ops::with_kernels(kernels, step))??)
    }
    fn before_batch(&mut self) -> anyhow::Result<()> {
        self.ctx.check_cancel().map_err(|_| Cancelled.into())
    }
    fn after_batch(&mut self, totals: &EpochTotals) {
        self.ctx.progress.advance(1);
        self.ctx.progress.message(&format!(
            "loss {:.4}  acc {:.2}%  {:.0} img/s",
            totals.mean_loss(),
            100.0 * totals.accuracy(),
            totals.images_per_s()
        ));
    }
}

impl EvalHooks for StageHooks<'_, '_> {
    fn before_batch(&mut self) -> anyhow::Result<()> {
        self.ctx.check_cancel().map_err(|_| Cancelled.into())
    }
}

/// Test batches of the per-epoch evaluation.
const EVAL_BATCH: usize = 500;

fn train_epoch(
    setup: &EpochSetup,
    epoch: usize,
    learner: &mut Learner,
    pools: &mut ComputePools,
    ctx: &StageContext,
) -> anyhow::Result<(EpochRecord, EpochTiming)> {
    let params = setup.params;
    let lr = params.optimizer.lr() * params.lr_decay.powi(epoch as i32);
    learner.optimizer.set_learning_rate(lr);
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
    let batch = |indices: &[usize]| -> anyhow::Result<(Tensor, Tensor)> {
        Ok(if params.augment {
            augmented_batch(
                setup.train_set,
                indices,
                &mut augment_rng,
                setup.norm,
                setup.device,
            )?
        } else {
            setup.train_set.batch(indices, setup.norm, setup.device)?
        })
    };
    let mut hooks = StageHooks { ctx, pools };
    let totals = learner
        .train_epoch(
            &order,
            params.batch_size,
            batch,
            &mut dropout_rng,
            &mut hooks,
        )
        .map_err(|e| match e.downcast::<learner::Diverged>() {
            Ok(d) => anyhow::anyhow!(
                "training diverged in epoch {} (loss is {}); try a smaller learning rate",
                epoch + 1,
                d.loss
            ),
            Err(e) => e,
        })?;
    let last_epoch = epoch + 1 == params.epochs;
    let (test_loss, test_accuracy) = if params.eval_every_epoch || last_epoch {
        let eval = learner::evaluate(
            learner.model.as_ref(),
            setup.test_set,
            EVAL_BATCH,
            setup.norm,
            setup.device,
            &mut hooks,
        )?;
        (Some(eval.loss), Some(eval.accuracy))
    } else {
        (None, None)
    };
    let record = EpochRecord {
        epoch: epoch + 1,
        lr,
        train_loss: totals.mean_loss(),
        train_accuracy: totals.accuracy(),
        test_loss,
        test_accuracy,
    };
    let timing = EpochTiming {
        epoch: epoch + 1,
        seconds: totals.seconds,
        images_per_s: totals.images_per_s(),
    };
    Ok((record, timing))
}

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
