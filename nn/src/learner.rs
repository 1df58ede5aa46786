//! One training loop and one evaluator, as burn's learner: a [`Learner`] (model, variables,
//! optimizer) takes one training step at a time, [`Learner::train_epoch`] runs an epoch of
//! them over an index order, and [`evaluate`] runs a model in eval mode over a data set. The
//! train and evaluate stages, `fmnist-pipe bench` and `fmnist-pipe check` all go through
//! here; what differs between them (thread pools, progress, cancellation, gradient
//! inspection) comes in through [`EpochHooks`] and [`EvalHooks`].

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand_chacha::ChaCha8Rng;

use crate::data::{Dataset, Normalization};
use crate::models::{self, Classifier, ModelKind};
use crate::optim::{Optimizer, OptimizerConfig};

/// A model, its variables and their optimizer: what training updates and a checkpoint holds.
pub struct Learner {
    pub model: Box<dyn Classifier>,
    pub varmap: VarMap,
    pub optimizer: Box<dyn Optimizer>,
}

/// What one training step computed.
pub struct StepOutput {
    /// [B, 10] training-mode logits.
    pub logits: Tensor,
    /// The batch's mean cross-entropy (a scalar).
    pub loss: Tensor,
}

/// Running figures of an epoch: mean loss and accuracy over the batches so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochTotals {
    /// Sum over batches of mean loss x batch size.
    pub loss_sum: f64,
    pub correct: usize,
    pub seen: usize,
    /// The last batch's mean loss.
    pub last_loss: f32,
    /// Seconds since the epoch started.
    pub seconds: f64,
}

impl EpochTotals {
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.seen.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
    pub fn images_per_s(&self) -> f64 {
        self.seen as f64 / self.seconds.max(1e-9)
    }
}

/// A step as [`EpochHooks::run_step`] receives it.
pub type StepFn<'a> = dyn FnMut() -> candle_core::Result<StepOutput> + Send + 'a;

/// What a caller adds to [`Learner::train_epoch`]; every method has a do-nothing default.
pub trait EpochHooks {
    /// Runs one step: a caller may run it on a thread pool of its choosing, with its kernels.
    fn run_step(&mut self, step: &mut StepFn) -> anyhow::Result<StepOutput> {
        Ok(step()?)
    }
    /// Called before each batch; an error (e.g. cancellation) ends the epoch with it.
    fn before_batch(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Called after each batch with the totals so far.
    fn after_batch(&mut self, _totals: &EpochTotals) {}
}

/// Hooks that add nothing.
pub struct NoHooks;
impl EpochHooks for NoHooks {}
impl EvalHooks for NoHooks {}

/// Training did not converge: a batch's loss was not finite.
#[derive(Debug, thiserror::Error)]
#[error("training diverged (loss is {loss}); try a smaller learning rate")]
pub struct Diverged {
    pub loss: f64,
}

impl Learner {
    /// A fresh model of `kind` with weights drawn from `seed` (in `dtype` on `device`) and the
    /// optimizer `optimizer` over its trainable variables.
    pub fn init(
        kind: ModelKind,
        seed: u64,
        device: &Device,
        dtype: DType,
        optimizer: &OptimizerConfig,
    ) -> candle_core::Result<Self> {
        let (model, varmap) = models::init_as(kind, seed, device, dtype)?;
        let optimizer = optimizer.build(models::trainable_vars(&varmap))?;
        Ok(Learner {
            model,
            varmap,
            optimizer,
        })
    }

    /// One training step: forward in training mode (dropout masks from `dropout`),
    /// cross-entropy, backward, `inspect(&grads)` (before the update), optimizer step.
    pub fn step_inspecting(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        dropout: &mut ChaCha8Rng,
        inspect: impl FnOnce(&GradStore) -> candle_core::Result<()>,
    ) -> candle_core::Result<StepOutput> {
        let logits = self.model.forward_train(images, dropout)?;
        let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        let grads = crate::ops::grad_sink::backward(&loss)?;
        inspect(&grads)?;
        self.optimizer.step(&grads)?;
        Ok(StepOutput { logits, loss })
    }

    /// [`Learner::step_inspecting`] without inspection.
    pub fn step(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        dropout: &mut ChaCha8Rng,
    ) -> candle_core::Result<StepOutput> {
        self.step_inspecting(images, labels, dropout, |_| Ok(()))
    }

    /// One epoch: the images of `order` in batches of `batch_size`, each made by `batch`
    /// (indices -> images, labels), one step each. Fails with [`Diverged`] on a non-finite
    /// loss, or with whatever a hook returns.
    pub fn train_epoch(
        &mut self,
        order: &[usize],
        batch_size: usize,
        mut batch: impl FnMut(&[usize]) -> anyhow::Result<(Tensor, Tensor)>,
        dropout: &mut ChaCha8Rng,
        hooks: &mut dyn EpochHooks,
    ) -> anyhow::Result<EpochTotals> {
        let started = Instant::now();
        let mut totals = EpochTotals {
            last_loss: f32::NAN,
            ..EpochTotals::default()
        };
        for indices in order.chunks(batch_size.max(1)) {
            hooks.before_batch()?;
            let (images, labels) = batch(indices)?;
            let out = hooks.run_step(&mut || {
                crate::compute::with_workers_polling(|| self.step(&images, &labels, dropout))
            })?;
            let batch_loss = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !batch_loss.is_finite() {
                return Err(Diverged {
                    loss: batch_loss as f64,
                }
                .into());
            }
            totals.last_loss = batch_loss;
            totals.loss_sum += batch_loss as f64 * indices.len() as f64;
            totals.correct += count_correct(&out.logits, &labels)?;
            totals.seen += indices.len();
            totals.seconds = started.elapsed().as_secs_f64();
            hooks.after_batch(&totals);
        }
        totals.seconds = started.elapsed().as_secs_f64();
        Ok(totals)
    }
}

/// How many rows of `logits` have their maximum at the label.
pub fn count_correct(logits: &Tensor, labels: &Tensor) -> candle_core::Result<usize> {
    let predicted = logits.argmax(D::Minus1)?;
    let hits = predicted.eq(labels)?.to_dtype(DType::U32)?.sum_all()?;
    Ok(hits.to_scalar::<u32>()? as usize)
}

/// What a caller adds to [`evaluate`]; do-nothing defaults.
pub trait EvalHooks {
    /// Called before each batch; an error (e.g. cancellation) ends the evaluation with it.
    fn before_batch(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Called after each batch.
    fn after_batch(&mut self) {}
}

/// A model's eval-mode results on a data set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The predicted class of each image, in the set's order.
    pub predicted: Vec<u8>,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction of images predicted right.
    pub accuracy: f64,
    /// Seconds spent in the forward passes (up to reading the classes back, which
    /// synchronizes a GPU), not in making batches.
    pub forward_seconds: f64,
}

impl Evaluation {
    pub fn images_per_s(&self) -> f64 {
        self.predicted.len() as f64 / self.forward_seconds.max(1e-9)
    }
}

/// Runs `model` in eval mode over `set` in batches of `batch_size`.
pub fn evaluate(
    model: &dyn Classifier,
    set: &Dataset,
    batch_size: usize,
    norm: Normalization,
    device: &Device,
    hooks: &mut dyn EvalHooks,
) -> anyhow::Result<Evaluation> {
    let order: Vec<usize> = (0..set.len()).collect();
    let mut predicted = Vec::with_capacity(set.len());
    let (mut loss_sum, mut forward_seconds) = (0f64, 0f64);
    for indices in order.chunks(batch_size.max(1)) {
        hooks.before_batch()?;
        let (images, labels) = set.batch(indices, norm, device)?;
        let started = Instant::now();
        let logits = crate::compute::with_workers_polling(|| model.forward(&images))?;
        let classes = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        forward_seconds += started.elapsed().as_secs_f64();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        loss_sum += loss.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64 * indices.len() as f64;
        predicted.extend(classes.into_iter().map(|c| c as u8));
        hooks.after_batch();
    }
    let n = set.len().max(1) as f64;
    let correct = predicted
        .iter()
        .zip(&set.labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(Evaluation {
        predicted,
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        forward_seconds,
    })
}
