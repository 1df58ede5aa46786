//! Adam (Kingma & Ba) as PyTorch's `torch.optim.Adam`: bias-corrected moments, L2 weight decay
//! folded into the gradient (not AdamW's decoupled decay), no amsgrad.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::{fused, read_step, restore, step_tensor, with_weight_decay, zeros_like_all, Optimizer};

pub struct Adam {
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    steps: u64,
}

impl Adam {
    pub fn new(
        params: Vec<(String, Var)>,
        lr: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        Ok(Adam {
            exp_avg: zeros_like_all(&params)?,
            exp_avg_sq: zeros_like_all(&params)?,
            params,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            steps: 0,
        })
    }
}

impl Optimizer for Adam {
    /// One fused in-place pass per parameter on the CPU (f32 arithmetic in PyTorch's order);
    /// the tensor ops below are the general path.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let bias_correction1 = 1.0 - self.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = self.lr / bias_correction1;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_tensor();
            let (beta1, beta2) = (self.beta1 as f32, self.beta2 as f32);
            let (one_minus_beta1, one_minus_beta2) =
                ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
            let (weight_decay, eps) = (self.weight_decay as f32, self.eps as f32);
            // The tensor ops divide by a scalar as candle does, multiplying by its reciprocal;
            // the fused loop does the same (one division less per element, same results).
            let (step_size_f32, inv_bias_correction2_sqrt) =
                (step_size as f32, (1.0 / bias_correction2_sqrt) as f32);
            let states = [&self.exp_avg[i], &self.exp_avg_sq[i]];
            let fused = fused::update_with_two_states(param, grad, states, |g, p, m, v| {
                let g = g + *p * weight_decay;
                *m = *m * beta1 + g * one_minus_beta1;
                *v = *v * beta2 + g * g * one_minus_beta2;
                let denom = v.sqrt() * inv_bias_correction2_sqrt + eps;
                *p -= *m / denom * step_size_f32;
            })?;
            if fused {
                continue;
            }
            let grad = with_weight_decay(grad, param, self.weight_decay)?;
            let exp_avg = ((&self.exp_avg[i] * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
            let exp_avg_sq =
                ((&self.exp_avg_sq[i] * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + self.eps)?;
            let update = ((&exp_avg / denom)? * step_size)?;
            var.set(&(param - update)?)?;
            self.exp_avg[i] = exp_avg.detach();
            self.exp_avg_sq[i] = exp_avg_sq.detach();
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
            out.push((format!("{name}.exp_avg"), self.exp_avg[i].copy()?));
            out.push((format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].copy()?));
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.steps = read_step(state)?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            self.exp_avg[i] = restore(state, &format!("{name}.exp_avg"), var.as_tensor())?;
            self.exp_avg_sq[i] = restore(state, &format!("{name}.exp_avg_sq"), var.as_tensor())?;
        }
        Ok(())
    }
}
