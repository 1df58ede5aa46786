//! Optimizers with PyTorch's update rules and defaults: Adadelta, Adam (L2 weight decay, not
//! AdamW) and SGD with momentum. candle-nn has only SGD and AdamW; these are ours, so their
//! state can be checkpointed and their steps checked against PyTorch's numbers.
//!
//! Each algorithm is only its [`UpdateRule`]: the per-variable buffers it keeps, and the
//! update of one variable. [`Stateful`] holds the variables, the buffers, the step counter
//! and the learning rate, and saves and restores them, the same for every rule.

mod adadelta;
mod adam;
mod config;
mod fused;
mod sgd;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

pub use adadelta::Adadelta;
pub use adam::Adam;
pub use config::{study_optimizer, OptimizerConfig};
pub use sgd::Sgd;

/// One optimization algorithm over a fixed set of named variables.
pub trait Optimizer: Send {
    /// Updates every variable that has a gradient in `grads` (others are left alone, as
    /// PyTorch skips parameters whose `.grad` is None).
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn set_learning_rate(&mut self, lr: f64);
    /// The optimizer's state as named tensors (for checkpoints).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores state written by `state()`.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// How a per-variable buffer of an update rule starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotInit {
    /// Zeros shaped like the variable (required in a saved state).
    Zeros,
    /// Empty until the variable's first update sets it (PyTorch's SGD momentum buffer);
    /// absent from a saved state until then.
    FirstUpdate,
}

/// A per-variable buffer an update rule keeps: its name in checkpoints
/// (`<variable>.<name>`) and how it starts.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub name: &'static str,
    pub init: SlotInit,
}

impl Slot {
    /// A buffer that starts as zeros.
    pub const fn zeros(name: &'static str) -> Self {
        Slot {
            name,
            init: SlotInit::Zeros,
        }
    }
    /// A buffer that the first update sets.
    pub const fn first_update(name: &'static str) -> Self {
        Slot {
            name,
            init: SlotInit::FirstUpdate,
        }
    }
}

/// What a step hands an update rule besides the variable: the optimizer's step count (from
/// 1) and its current learning rate.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub step: u64,
    pub lr: f64,
}

/// One variable's buffers, in the order of its rule's `SLOTS`.
pub type Buffers = [Option<Tensor>];

/// An optimization algorithm's update of one variable, over the buffers it declares. Each
/// rule takes one fused in-place pass on the CPU where it applies (f32 arithmetic in
/// PyTorch's order: `fused`), and its tensor ops otherwise (the portable path).
pub trait UpdateRule: Send {
    /// The per-variable buffers, in the order `update` receives them.
    const SLOTS: &'static [Slot];
    /// Updates `var` from its gradient and its buffers (None: a `FirstUpdate` buffer not yet
    /// set).
    fn update(
        &self,
        at: StepInfo,
        var: &Var,
        grad: &Tensor,
        buf: &mut [Option<Tensor>],
    ) -> Result<()>;
}

/// An [`UpdateRule`] with its state: the variables, one set of buffers per variable, the step
/// counter and the learning rate.
pub struct Stateful<R> {
    rule: R,
    params: Vec<(String, Var)>,
    /// `buffers[i][s]`: variable `i`'s buffer for slot `s`.
    buffers: Vec<Vec<Option<Tensor>>>,
    lr: f64,
    steps: u64,
}

impl<R: UpdateRule> Stateful<R> {
    pub fn new(params: Vec<(String, Var)>, lr: f64, rule: R) -> Result<Self> {
        let buffers = params
            .iter()
            .map(|(_, var)| {
                R::SLOTS
                    .iter()
                    .map(|slot| match slot.init {
                        SlotInit::Zeros => var.as_tensor().zeros_like().map(Some),
                        SlotInit::FirstUpdate => Ok(None),
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stateful {
            rule,
            params,
            buffers,
            lr,
            steps: 0,
        })
    }
}

impl<R: UpdateRule> Optimizer for Stateful<R> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        for ((_, var), buffers) in self.params.iter().zip(&mut self.buffers) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let at = StepInfo {
                step: self.steps,
                lr: self.lr,
            };
            self.rule.update(at, var, grad, buffers)?;
        }
        Ok(())
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), step_tensor(self.steps)?)];
        for ((name, _), buffers) in self.params.iter().zip(&self.buffers) {
            for (slot, buffer) in R::SLOTS.iter().zip(buffers) {
                if let Some(buffer) = buffer {
                    out.push((format!("{name}.{}", slot.name), buffer.copy()?));
                }
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.steps = read_step(state)?;
        for ((name, var), buffers) in self.params.iter().zip(&mut self.buffers) {
            for (slot, buffer) in R::SLOTS.iter().zip(buffers.iter_mut()) {
                let key = format!("{name}.{}", slot.name);
                *buffer = if slot.init == SlotInit::FirstUpdate && !state.contains_key(&key) {
                    None
                } else {
                    Some(restore(state, &key, var.as_tensor())?)
                };
            }
        }
        Ok(())
    }
}

/// `grad + weight_decay * param` (PyTorch's L2 penalty folded into the gradient).
fn with_weight_decay(grad: &Tensor, param: &Tensor, weight_decay: f64) -> Result<Tensor> {
    if weight_decay == 0.0 {
        Ok(grad.clone())
    } else {
        grad + (param * weight_decay)?
    }
}

/// The buffer of a `Zeros` slot (always set).
fn zeros_slot(buffer: &Option<Tensor>) -> Result<&Tensor> {
    buffer
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg("optimizer buffer is not set".into()))
}

/// Looks up `key` in a saved state and checks its shape; the result has its own storage, as the
/// fused path updates state in place.
fn restore(state: &HashMap<String, Tensor>, key: &str, like: &Tensor) -> Result<Tensor> {
    let t = state
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no `{key}`")))?;
    if t.dims() != like.dims() {
        candle_core::bail!(
            "optimizer state `{key}` has shape {:?}, expected {:?}",
            t.dims(),
            like.dims()
        );
    }
    fused::owned_copy(t.to_device(like.device())?.to_dtype(like.dtype())?)
}

/// The step counter as a one-element tensor (i64: exact, and safetensors can hold it).
fn step_tensor(steps: u64) -> Result<Tensor> {
    Tensor::new(&[steps as i64], &candle_core::Device::Cpu)
}

fn read_step(state: &HashMap<String, Tensor>) -> Result<u64> {
    let t = state
        .get("step")
        .ok_or_else(|| candle_core::Error::Msg("optimizer state has no `step`".into()))?;
    let v = t.to_vec1::<i64>()?;
    match v.as_slice() {
        [s] if *s >= 0 => Ok(*s as u64),
        _ => candle_core::bail!("optimizer state `step` is malformed: {v:?}"),
    }
}
