//! Adadelta (Zeiler 2012) with PyTorch's update order: lr 1.0, rho 0.9, eps 1e-6 by default.

use candle_core::{Result, Tensor, Var};

use super::{fused, with_weight_decay, zeros_slot, Buffers, Slot, StepInfo, UpdateRule};

pub struct Adadelta {
    pub rho: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl UpdateRule for Adadelta {
    const SLOTS: &'static [Slot] = &[Slot::zeros("square_avg"), Slot::zeros("acc_delta")];

    fn update(&self, at: StepInfo, var: &Var, grad: &Tensor, buffers: &mut Buffers) -> Result<()> {
        let lr = at.lr;
        let param = var.as_tensor();
        let (square_avg, acc_delta) = (zeros_slot(&buffers[0])?, zeros_slot(&buffers[1])?);
        let (rho, one_minus_rho) = (self.rho as f32, (1.0 - self.rho) as f32);
        let (lr_f32, eps, weight_decay) = (lr as f32, self.eps as f32, self.weight_decay as f32);
        let states = [square_avg, acc_delta];
        let fused = fused::update_with_two_states(param, grad, states, |g, p, sq, acc| {
            let g = g + *p * weight_decay;
            *sq = *sq * rho + g * g * one_minus_rho;
            let std = (*sq + eps).sqrt();
            let delta = (*acc + eps).sqrt() / std * g;
            *acc = *acc * rho + delta * delta * one_minus_rho;
            *p -= delta * lr_f32;
        })?;
        if fused {
            return Ok(());
        }
        let grad = with_weight_decay(grad, param, self.weight_decay)?;
        let new_square_avg = ((square_avg * self.rho)? + (grad.sqr()? * (1.0 - self.rho))?)?;
        let std = (&new_square_avg + self.eps)?.sqrt()?;
        let delta = ((acc_delta + self.eps)?.sqrt()? / std)?.mul(&grad)?;
        let new_acc_delta = ((acc_delta * self.rho)? + (delta.sqr()? * (1.0 - self.rho))?)?;
        var.set(&(param - (delta * lr)?)?)?;
        buffers[0] = Some(new_square_avg.detach());
        buffers[1] = Some(new_acc_delta.detach());
        Ok(())
    }
}
