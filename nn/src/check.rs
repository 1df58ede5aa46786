//! Two ways of running the same training, compared step by step: a model trained for a few
//! steps from the same weights, batches and dropout masks on two paths (a device and a choice
//! of kernels each), every step's loss and gradients compared, then the eval-mode logits.
//! `fmnist-pipe check` runs it for a GPU against the CPU's portable path (the graph a GPU
//! runs, computed on the CPU); the tests run it for the CPU's fast kernels against it.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{Dataset, Normalization};
use crate::device;
use crate::learner::Learner;
use crate::models::{self, ModelKind, DROPOUT_STREAM};
use crate::ops::{self, Kernels};
use crate::optim;

/// Where and how one side of the comparison computes.
#[derive(Debug, Clone)]
pub struct PathSpec {
    pub device: Device,
    pub kernels: Kernels,
    /// F32 as the study trains; F64 makes an exact reference (portable ops only).
    pub dtype: DType,
}

impl PathSpec {
    /// The CPU running the portable path: the reference every other path is checked against.
    pub fn cpu_portable() -> Self {
        PathSpec {
            device: Device::Cpu,
            kernels: Kernels::Portable,
            dtype: DType::F32,
        }
    }

    /// f32 on `device` with `kernels`, as the study trains.
    pub fn f32_on(device: Device, kernels: Kernels) -> Self {
        PathSpec {
            device,
            kernels,
            dtype: DType::F32,
        }
    }

    /// The portable path in f64 on the CPU: close to exact arithmetic, so it tells which of two
    /// f32 paths is further from the truth.
    pub fn cpu_f64() -> Self {
        PathSpec {
            dtype: DType::F64,
            ..Self::cpu_portable()
        }
    }

    /// "cpu/fast", "cuda:0/portable", ...
    pub fn describe(&self) -> String {
        let kernels = self.kernels.running_on(&self.device, self.dtype);
        let dtype = match self.dtype {
            DType::F32 => String::new(),
            other => format!("/{}", other.as_str()),
        };
        format!("{}/{kernels}{dtype}", device::describe(&self.device))
    }
}

/// How far apart the two paths may be. f32 sums taken in another order differ in the last
/// bits, and training carries those differences forward: ResNet-18's gradients after a few
/// Adam steps differ by tens of percent between any two f32 paths (each as far from an f64
/// run as from the other), so gradients are compared where the weights are still the same,
/// at the first step, and the later steps through their losses and the weights they reach.
/// A broken op (a wrong gradient, a mis-routed max-pool gradient, a wrong optimizer update)
/// lands orders of magnitude above these bounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// |loss_a - loss_b| / |loss_b| at every step.
    pub loss_rel: f64,
    /// ‖grad_a - grad_b‖ / ‖grad_b‖ over all parameters together, first step.
    pub first_grad_rel_l2: f64,
    /// The same for each parameter on its own, first step.
    pub first_param_grad_rel_l2: f64,
    /// ‖param_a - param_b‖ / ‖param_b‖ over all variables after the last step.
    pub param_rel_l2: f64,
    /// max |logit_a - logit_b| / max(1, max |logit_b|) of eval mode, before any step.
    pub initial_logits_rel: f64,
    /// The same after the last step.
    pub final_logits_rel: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            loss_rel: 5e-3,
            first_grad_rel_l2: 2e-2,
            first_param_grad_rel_l2: 5e-2,
            param_rel_l2: 1e-2,
            initial_logits_rel: 1e-4,
            final_logits_rel: 5e-2,
        }
    }
}

/// One training step on both paths.
#[derive(Debug, Clone, Serialize)]
pub struct StepCheck {
    pub step: usize,
    pub loss: [f32; 2],
    pub loss_rel_diff: f64,
    /// ‖grad_a - grad_b‖ / ‖grad_b‖ over all parameters' gradients together.
    pub grad_rel_l2: f64,
    /// The same per parameter: the largest, and which parameter.
    pub worst_param_grad_rel_l2: f64,
    pub worst_param: String,
}

/// What to train for a check.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub model: ModelKind,
    pub steps: usize,
    pub batch_size: usize,
    /// Weights, batch order and dropout masks derive from it.
    pub seed: u64,
    pub tolerance: Tolerance,
}

impl CheckRun {
    /// Five steps of 64 images, seed 42, the default tolerance.
    pub fn new(model: ModelKind) -> Self {
        CheckRun {
            model,
            steps: 5,
            batch_size: 64,
            seed: 42,
            tolerance: Tolerance::default(),
        }
    }
}

/// The whole comparison of one model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCheck {
    pub model: ModelKind,
    /// The two paths, as [`PathSpec::describe`] names them: [checked, reference].
    pub paths: [String; 2],
    pub batch_size: usize,
    pub steps: Vec<StepCheck>,
    pub max_loss_rel_diff: f64,
    pub param_rel_l2: f64,
    pub initial_logits_rel_diff: f64,
    pub final_logits_rel_diff: f64,
    /// Fast CPU kernels each path called (a portable path must call none).
    pub fast_dispatches: [u64; 2],
    /// Wall time of each path's steps, seconds.
    pub seconds: [f64; 2],
    pub tolerance: Tolerance,
    /// What exceeded its tolerance (empty when the check passed).
    pub failures: Vec<String>,
    pub passed: bool,
}

/// Trains `run.model` on `checked` and on `reference` side by side (same weights, batches from
/// `data` and dropout masks; the study's optimizer for the model) and compares them. Errors
/// only when a path cannot run at all; differences are in the report.
pub fn compare(
    run: &CheckRun,
    checked: &PathSpec,
    reference: &PathSpec,
    data: &Dataset,
) -> anyhow::Result<ModelCheck> {
    let (steps, batch_size) = (run.steps, run.batch_size);
    if steps == 0 || batch_size == 0 {
        anyhow::bail!("check needs at least one step of at least one image");
    }
    if data.is_empty() {
        anyhow::bail!("check needs training images; the data set is empty");
    }
    let mut sides = [Side::new(run, checked)?, Side::new(run, reference)?];
    let order = data.shuffled_indices(run.seed);
    let norm = Normalization::default();
    let (eval_images, _) = data.batch(&order[..batch_size.min(order.len())], norm, &Device::Cpu)?;
    let initial_logits_rel_diff = logits_rel_diff(&mut sides, &eval_images)?;
    let mut step_checks = Vec::with_capacity(steps);
    for step in 0..steps {
        let start = (step * batch_size) % order.len();
        let indices: Vec<usize> = (0..batch_size)
            .map(|i| order[(start + i) % order.len()])
            .collect();
        let (images, labels) = data.batch(&indices, norm, &Device::Cpu)?;
        let [a, b] = &mut sides;
        let (loss_a, grads_a) = a.step(&images, &labels)?;
        let (loss_b, grads_b) = b.step(&images, &labels)?;
        let (worst_param_grad_rel_l2, worst_param) = grads_a
            .iter()
            .zip(&grads_b)
            .map(|((name, ga), (_, gb))| (rel_l2(ga, gb), name.clone()))
            .fold((0.0, String::new()), |worst, next| {
                if exceeds(next.0, worst.0) {
                    next
                } else {
                    worst
                }
            });
        let flat = |g: &NamedValues| -> Vec<f32> {
            g.iter().flat_map(|(_, v)| v.iter().copied()).collect()
        };
        step_checks.push(StepCheck {
            step: step + 1,
            loss: [loss_a, loss_b],
            loss_rel_diff: (loss_a as f64 - loss_b as f64).abs() / (loss_b as f64).abs().max(1e-12),
            grad_rel_l2: rel_l2(&flat(&grads_a), &flat(&grads_b)),
            worst_param_grad_rel_l2,
            worst_param,
        });
    }
    let final_logits_rel_diff = logits_rel_diff(&mut sides, &eval_images)?;
    let param_rel_l2 = rel_l2(&sides[0].all_params()?, &sides[1].all_params()?);
    let max_loss_rel_diff = step_checks
        .iter()
        .map(|s| s.loss_rel_diff)
        .fold(0.0, nan_max);

    let t = &run.tolerance;
    let mut failures = Vec::new();
    let mut check = |what: String, value: f64, bound: f64| {
        if exceeds(value, bound) {
            failures.push(format!("{what} {value:.3e} exceeds {bound:.0e}"));
        }
    };
    check("loss difference".into(), max_loss_rel_diff, t.loss_rel);
    if let Some(first) = step_checks.first() {
        check(
            "first-step gradient difference".into(),
            first.grad_rel_l2,
            t.first_grad_rel_l2,
        );
        check(
            format!("first-step gradient difference of {}", first.worst_param),
            first.worst_param_grad_rel_l2,
            t.first_param_grad_rel_l2,
        );
    }
    check("parameter difference".into(), param_rel_l2, t.param_rel_l2);
    check(
        "initial eval logits difference".into(),
        initial_logits_rel_diff,
        t.initial_logits_rel,
    );
    check(
        "final eval logits difference".into(),
        final_logits_rel_diff,
        t.final_logits_rel,
    );
    for (side, spec) in sides.iter().zip([checked, reference]) {
        if spec.kernels == Kernels::Portable && side.fast_dispatches > 0 {
            failures.push(format!(
                "{} called {} fast CPU kernels",
                spec.describe(),
                side.fast_dispatches
            ));
        }
    }
    Ok(ModelCheck {
        model: run.model,
        paths: [checked.describe(), reference.describe()],
        batch_size,
        steps: step_checks,
        max_loss_rel_diff,
        param_rel_l2,
        initial_logits_rel_diff,
        final_logits_rel_diff,
        fast_dispatches: [sides[0].fast_dispatches, sides[1].fast_dispatches],
        seconds: [sides[0].seconds, sides[1].seconds],
        tolerance: *t,
        passed: failures.is_empty(),
        failures,
    })
}

/// max |a - b| / max(1, max |b|) of both sides' eval-mode logits on `images`.
fn logits_rel_diff(sides: &mut [Side; 2], images: &Tensor) -> anyhow::Result<f64> {
    let a = sides[0].eval_logits(images)?;
    let b = sides[1].eval_logits(images)?;
    if a.len() != b.len() {
        return Ok(f64::NAN);
    }
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs() as f64));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, nan_max);
    Ok(diff / scale)
}

/// The largest `|a[i] - b[i]|`, NaN when any difference is NaN (or the lengths differ), so a
/// kernel that returns NaN fails every bound: `f32::max` would drop the NaN.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NAN;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, nan_max) as f32
}

/// The larger of two, NaN winning (so a NaN anywhere fails a check).
pub fn nan_max(m: f64, v: f64) -> f64 {
    if exceeds(v, m) {
        v
    } else {
        m
    }
}

/// `value > bound`, or `value` is NaN.
fn exceeds(value: f64, bound: f64) -> bool {
    use std::cmp::Ordering::{Equal, Less};
    !matches!(value.partial_cmp(&bound), Some(Less | Equal))
}

/// Each parameter's name and values (gradients, on the CPU).
type NamedValues = Vec<(String, Vec<f32>)>;

/// One path's learner and dropout stream.
struct Side {
    spec: PathSpec,
    learner: Learner,
    params: Vec<(String, Var)>,
    dropout_rng: ChaCha8Rng,
    fast_dispatches: u64,
    seconds: f64,
}

impl Side {
    fn new(run: &CheckRun, spec: &PathSpec) -> anyhow::Result<Self> {
        // Weights are drawn on the CPU from the seed, then moved: the same on every device.
        let optimizer = optim::study_optimizer(run.model);
        let learner = Learner::init(run.model, run.seed, &spec.device, spec.dtype, &optimizer)?;
        let params = models::trainable_vars(&learner.varmap);
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(run.seed);
        dropout_rng.set_stream(DROPOUT_STREAM);
        Ok(Side {
            spec: spec.clone(),
            learner,
            params,
            dropout_rng,
            fast_dispatches: 0,
            seconds: 0.0,
        })
    }

    /// Runs `f` with this side's kernels, counting its fast kernel calls and time.
    fn on_path<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let kernels = self.spec.kernels;
        let started = Instant::now();
        let before = ops::fast_dispatches();
        let result = ops::with_kernels(kernels, || f(self));
        self.fast_dispatches += ops::fast_dispatches() - before;
        self.seconds += started.elapsed().as_secs_f64();
        result
    }

    /// One training step; returns the loss and every parameter's gradient (on the CPU), taken
    /// before the optimizer updates the parameters.
    fn step(&mut self, images: &Tensor, labels: &Tensor) -> anyhow::Result<(f32, NamedValues)> {
        self.on_path(|side| {
            let x = images
                .to_device(&side.spec.device)?
                .to_dtype(side.spec.dtype)?;
            let y = labels.to_device(&side.spec.device)?;
            let mut out = Vec::with_capacity(side.params.len());
            let params = &side.params;
            let step = side
                .learner
                .step_inspecting(&x, &y, &mut side.dropout_rng, |grads| {
                    for (name, var) in params {
                        let values = match grads.get(var.as_tensor()) {
                            Some(g) => to_cpu_vec(g)?,
                            None => vec![0.0; var.elem_count()],
                        };
                        out.push((name.clone(), values));
                    }
                    Ok(())
                })?;
            Ok((to_cpu_vec(&step.loss)?[0], out))
        })
    }

    fn eval_logits(&mut self, images: &Tensor) -> anyhow::Result<Vec<f32>> {
        self.on_path(|side| {
            let x = images
                .to_device(&side.spec.device)?
                .to_dtype(side.spec.dtype)?;
            Ok(to_cpu_vec(&side.learner.model.forward(&x)?)?)
        })
    }

    /// Every variable (running statistics included), flattened in name order.
    fn all_params(&self) -> anyhow::Result<Vec<f32>> {
        let mut all = Vec::new();
        for (_, var) in models::sorted_vars(&self.learner.varmap) {
            all.extend(to_cpu_vec(var.as_tensor())?);
        }
        Ok(all)
    }
}

fn to_cpu_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// ‖a - b‖ / ‖b‖ (0 when both are 0; NaN stays NaN).
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    if diff == 0.0 {
        0.0
    } else {
        (diff / norm.max(1e-300)).sqrt()
    }
}
