//! Adam (Kingma & Ba) as PyTorch's `torch.optim.Adam`: bias-corrected moments, L2 weight decay
//! folded into the gradient (not AdamW's decoupled decay), no amsgrad.

use candle_core::{Result, Tensor, Var};

use super::{fused, with_weight_decay, zeros_slot, Buffers, Slot, StepInfo, UpdateRule};

pub struct Adam {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl UpdateRule for Adam {
    const SLOTS: &'static [Slot] = &[Slot::zeros("exp_avg"), Slot::zeros("exp_avg_sq")];

    fn update(&self, at: StepInfo, var: &Var, grad: &Tensor, buffers: &mut Buffers) -> Result<()> {
        let StepInfo { step, lr } = at;
        let (beta1, beta2) = self.betas;
        let t = step as i32;
        let bias_correction1 = 1.0 - beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        let param = var.as_tensor();
        let (exp_avg, exp_avg_sq) = (zeros_slot(&buffers[0])?, zeros_slot(&buffers[1])?);
        let (beta1_f32, beta2_f32) = (beta1 as f32, beta2 as f32);
        let (one_minus_beta1, one_minus_beta2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
        let (weight_decay, eps) = (self.weight_decay as f32, self.eps as f32);
        // The tensor ops divide by a scalar as candle does, multiplying by its reciprocal;
        // the fused loop does the same (one division less per element, same results).
        let (step_size_f32, inv_bias_correction2_sqrt) =
            (step_size as f32, (1.0 / bias_correction2_sqrt) as f32);
        let states = [exp_avg, exp_avg_sq];
        let fused = fused::update_with_two_states(param, grad, states, |g, p, m, v| {
            let g = g + *p * weight_decay;
            *m = *m * beta1_f32 + g * one_minus_beta1;
            *v = *v * beta2_f32 + g * g * one_minus_beta2;
            let denom = v.sqrt() * inv_bias_correction2_sqrt + eps;
            *p -= *m / denom * step_size_f32;
        })?;
        if fused {
            return Ok(());
        }
        let grad = with_weight_decay(grad, param, self.weight_decay)?;
        let exp_avg = ((exp_avg * beta1)? + (&grad * (1.0 - beta1))?)?;
        let exp_avg_sq = ((exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
        let denom = ((exp_avg_sq.sqrt()? / bias_correction2_sqrt)? + self.eps)?;
        let update = ((&exp_avg / denom)? * step_size)?;
        var.set(&(param - update)?)?;
        buffers[0] = Some(exp_avg.detach());
        buffers[1] = Some(exp_avg_sq.detach());
        Ok(())
    }
}
