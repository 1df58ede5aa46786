//! Adadelta (Zeiler 2012) with PyTorch's update order: lr 1.0, rho 0.9, eps 1e-6 by default.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{fused, read_step, restore, step_tensor, with_weight_decay, zeros_like_all, Optimizer};

pub struct Adadelta {
    params: Vec<(String, Var)>,
    square_avg: Vec<Tensor>,
    acc_delta: Vec<Tensor>,
    lr: f64,
    rho: f64,
    eps: f64,
    weight_decay: f64,
    steps: u64,
}

impl Adadelta {
    pub fn new(
        params: Vec<(String, Var)>,
        lr: f64,
        rho: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        Ok(Adadelta {
            square_avg: zeros_like_all(&params)?,
            acc_delta: zeros_like_all(&params)?,
            params,
            lr,
            rho,
            eps,
            weight_decay,
            steps: 0,
        })
    }
}

impl Optimizer for Adadelta {
    /// One fused in-place pass per parameter on the CPU (f32 arithmetic in PyTorch's order);
    /// the tensor ops below are the general path.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_tensor();
            let (rho, one_minus_rho) = (self.rho as f32, (1.0 - self.rho) as f32);
            let (lr, eps, weight_decay) =
                (self.lr as f32, self.eps as f32, self.weight_decay as f32);
            let states = [&self.square_avg[i], &self.acc_delta[i]];
            let fused = fused::update_with_two_states(param, grad, states, |g, p, sq, acc| {
                let g = g + *p * weight_decay;
                *sq = *sq * rho + g * g * one_minus_rho;
                let std = (*sq + eps).sqrt();
                let delta = (*acc + eps).sqrt() / std * g;
                *acc = *acc * rho + delta * delta * one_minus_rho;
                *p -= delta * lr;
            })?;
            if fused {
                continue;
            }
            let grad = with_weight_decay(grad, param, self.weight_decay)?;
            let square_avg =
                ((&self.square_avg[i] * self.rho)? + (grad.sqr()? * (1.0 - self.rho))?)?;
            let std = (&square_avg + self.eps)?.sqrt()?;
            let delta = ((&self.acc_delta[i] + self.eps)?.sqrt()? / std)?.mul(&grad)?;
            let acc_delta =
                ((&self.acc_delta[i] * self.rho)? + (delta.sqr()? * (1.0 - self.rho))?)?;
            var.set(&(param - (delta * self.lr)?)?)?;
            self.square_avg[i] = square_avg.detach();
            self.acc_delta[i] = acc_delta.detach();
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
            out.push((format!("{name}.square_avg"), self.square_avg[i].copy()?));
            out.push((format!("{name}.acc_delta"), self.acc_delta[i].copy()?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.steps = read_step(state)?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            self.square_avg[i] = restore(state, &format!("{name}.square_avg"), var.as_tensor())?;
            self.acc_delta[i] = restore(state, &format!("{name}.acc_delta"), var.as_tensor())?;
        }
        Ok(())
    }
}
