//! SGD with optional momentum, dampening, Nesterov and L2 weight decay, as `torch.optim.SGD`
//! (the momentum buffer starts as the first gradient).

use candle_core::{Result, Tensor, Var};

use super::{fused, with_weight_decay, Buffers, Slot, StepInfo, UpdateRule};

pub struct Sgd {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    /// The update as one in-place pass on the CPU (f32 arithmetic in PyTorch's order); false
    /// when it does not apply and the tensor ops must run instead.
    fn update_fused(
        &self,
        lr: f64,
        param: &Tensor,
        grad: &Tensor,
        momentum_buffer: &mut Option<Tensor>,
    ) -> Result<bool> {
        let (lr, weight_decay) = (lr as f32, self.weight_decay as f32);
        let (momentum, one_minus_dampening) = (self.momentum as f32, (1.0 - self.dampening) as f32);
        let nesterov = self.nesterov;
        let direction = move |grad: f32, param: f32| grad + param * weight_decay;
        if self.momentum == 0.0 {
            return fused::update_stateless(param, grad, |g, p| *p -= direction(g, *p) * lr);
        }
        // PyTorch starts the buffer as the first direction itself (no dampening).
        let first = momentum_buffer.is_none();
        let buffer = match momentum_buffer {
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
            *momentum_buffer = Some(buffer);
        }
        Ok(fused)
    }
}

impl UpdateRule for Sgd {
    const SLOTS: &'static [Slot] = &[Slot::first_update("momentum_buffer")];

    fn update(&self, at: StepInfo, var: &Var, grad: &Tensor, buffers: &mut Buffers) -> Result<()> {
        let lr = at.lr;
        let param = var.as_tensor();
        let momentum_buffer = &mut buffers[0];
        if self.update_fused(lr, param, grad, momentum_buffer)? {
            return Ok(());
        }
        let mut direction = with_weight_decay(grad, param, self.weight_decay)?;
        if self.momentum != 0.0 {
            let buffer = match momentum_buffer {
                None => direction.clone(),
                Some(buf) => ((&*buf * self.momentum)? + (&direction * (1.0 - self.dampening))?)?,
            };
            direction = if self.nesterov {
                (direction + (&buffer * self.momentum)?)?
            } else {
                buffer.clone()
            };
            *momentum_buffer = Some(buffer.detach());
        }
        var.set(&(param - (direction * lr)?)?)?;
        Ok(())
    }
}
