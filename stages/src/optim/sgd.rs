//! SGD with optional momentum, dampening, Nesterov and L2 weight decay, as `torch.optim.SGD`
//! (the momentum buffer starts as the first gradient).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{fused, read_step, restore, step_tensor, with_weight_decay, Optimizer};

pub struct Sgd {
    params: Vec<(String, Var)>,
    /// None until the parameter's first step (PyTorch initializes the buffer to the gradient).
    momentum_buffer: Vec<Option<Tensor>>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: bool,
    steps: u64,
}

impl Sgd {
    pub fn new(
        params: Vec<(String, Var)>,
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> Self {
        Sgd {
            momentum_buffer: vec![None; params.len()],
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            steps: 0,
        }
    }
}

impl Sgd {
    /// The update of parameter `i` as one in-place pass on the CPU (f32 arithmetic in
    /// PyTorch's order); false when it does not apply and the tensor ops must run instead.
    fn step_fused(&mut self, i: usize, param: &Tensor, grad: &Tensor) -> Result<bool> {
        let (lr, weight_decay) = (self.lr as f32, self.weight_decay as f32);
        let (momentum, one_minus_dampening) = (self.momentum as f32, (1.0 - self.dampening) as f32);
        let nesterov = self.nesterov;
        let direction = move |grad: f32, param: f32| grad + param * weight_decay;
        if self.momentum == 0.0 {
            return fused::update_stateless(param, grad, |g, p| *p -= direction(g, *p) * lr);
        }
        // PyTorch starts the buffer as the first direction itself (no dampening).
        let first = self.momentum_buffer[i].is_none();
        let buffer = match &self.momentum_buffer[i] {
            Some(buffer) => buffer.clone(),
            None => param.zeros_like()?,
        };
        let fused = fused::update_with_one_state(param, grad, &buffer, |g, p, b| {
            let d = direction(g, *p);
            *b = if first {
                d
            } else {
                *b * momentum + d * one_minus_dampening
            };
            let step = if nesterov { d + *b * momentum } else { *b };
            *p -= step * lr;
        })?;
        if fused {
            self.momentum_buffer[i] = Some(buffer);
        }
        Ok(fused)
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        for i in 0..self.params.len() {
            // A handle (not a borrow of self), as the fused step updates self's buffers.
            let var = self.params[i].1.clone();
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_tensor();
            if self.step_fused(i, param, grad)? {
                continue;
            }
            let mut direction = with_weight_decay(grad, param, self.weight_decay)?;
            if self.momentum != 0.0 {
                let buffer = match &self.momentum_buffer[i] {
                    None => direction.clone(),
                    Some(buf) => ((buf * self.momentum)? + (&direction * (1.0 - self.dampening))?)?,
                };
                direction = if self.nesterov {
                    (direction + (&buffer * self.momentum)?)?
                } else {
                    buffer.clone()
                };
                self.momentum_buffer[i] = Some(buffer.detach());
            }
            var.set(&(param - (direction * self.lr)?)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("step".to_string(), step_tensor(self.steps)?)];
        for (i, (name, _)) in self.params.iter().enumerate() {
            if let Some(buf) = &self.momentum_buffer[i] {
                out.push((format!("{name}.momentum_buffer"), buf.copy()?));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.steps = read_step(state)?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            let key = format!("{name}.momentum_buffer");
            self.momentum_buffer[i] = if state.contains_key(&key) {
                Some(restore(state, &key, var.as_tensor())?)
            } else {
                None
            };
        }
        Ok(())
    }
}
