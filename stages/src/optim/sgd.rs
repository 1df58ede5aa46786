//! SGD with optional momentum, dampening, Nesterov and L2 weight decay, as `torch.optim.SGD`
//! (the momentum buffer starts as the first gradient).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{read_step, restore, step_tensor, with_weight_decay, Optimizer};

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

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_tensor();
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
                self.momentum_buffer[i] = Some(buffer);
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
                out.push((format!("{name}.momentum_buffer"), buf.clone()));
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
