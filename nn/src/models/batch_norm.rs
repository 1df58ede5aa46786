//! BatchNorm2d as PyTorch has it (eps 1e-5, momentum 0.1, weight 1, bias 0, running mean 0,
//! running variance 1, unbiased running variance), torchvision's parameter names, with the
//! ReLU that follows it in ResNet optionally fused in. Compute goes through `ops`.

use candle_core::{Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::ops;

const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNorm {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        // Var::from_tensor shares a VarMap variable's storage, so running-stat updates land in
        // the map that training saves; a loaded checkpoint's tensors are copied instead.
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
        Ok(BatchNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
        })
    }

    /// Training mode normalizes with the batch's statistics and folds them into the running
    /// ones; eval mode uses the running ones. `relu` applies a ReLU to the result.
    pub fn forward(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if !train {
            return ops::batch_norm_eval(
                x,
                &self.weight,
                &self.bias,
                self.running_mean.as_tensor(),
                self.running_var.as_tensor(),
                EPS,
                relu,
            );
        }
        let (y, mean, var) = ops::batch_norm_train(x, &self.weight, &self.bias, EPS, relu)?;
        let count = (x.elem_count() / x.dim(1)?.max(1)) as f64;
        let unbiased = if count > 1.0 {
            count / (count - 1.0)
        } else {
            1.0
        };
        let new_mean =
            ((self.running_mean.as_tensor() * (1.0 - MOMENTUM))? + (mean.detach() * MOMENTUM)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - MOMENTUM))?
            + (var.detach() * (MOMENTUM * unbiased))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)?;
        Ok(y)
    }

    /// Eval mode folded into the convolution before it: `(weight * s, beta - mean * s)` with
    /// `s = gamma / sqrt(running_var + eps)` per output channel, so inference runs the conv
    /// (and its ReLU) with no separate normalization pass.
    pub fn fold_into_conv(
        &self,
        conv_weight: &Tensor,
        conv_bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let scale = (&self.weight / (self.running_var.as_tensor() + EPS)?.sqrt()?)?;
        let weight = ops::scale_output_channels(conv_weight, &scale)?;
        let mean = match conv_bias {
            Some(b) => (self.running_mean.as_tensor() - b)?,
            None => self.running_mean.as_tensor().clone(),
        };
        let bias = (&self.bias - (mean * &scale)?)?;
        Ok((weight, bias))
    }

    /// Trainable parameters (weight and bias).
    pub fn param_count(&self) -> usize {
        self.weight.elem_count() + self.bias.elem_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn folding_into_the_conv_matches_conv_then_eval_batch_norm() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let bn = BatchNorm::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), 4)?;
        // Non-trivial statistics and affine parameters.
        bn.running_mean
            .set(&Tensor::new(&[0.5f32, -1.0, 0.0, 2.0], &dev)?)?;
        bn.running_var
            .set(&Tensor::new(&[0.25f32, 4.0, 1.0, 0.01], &dev)?)?;
        let x = Tensor::randn(0f32, 1.0, (3, 2, 6, 6), &dev)?;
        let w = Tensor::randn(0f32, 0.5, (4, 2, 3, 3), &dev)?;
        let b = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev)?;
        for relu in [false, true] {
            let unfolded = bn.forward(&ops::conv2d(&x, &w, Some(&b), 1, 1)?, false, relu)?;
            let (fw, fb) = bn.fold_into_conv(&w, Some(&b))?;
            let folded = if relu {
                ops::conv2d_relu(&x, &fw, Some(&fb), 1, 1)?
            } else {
                ops::conv2d(&x, &fw, Some(&fb), 1, 1)?
            };
            let diff = (unfolded - folded)?.abs()?.flatten_all()?.max(0)?;
            assert!(diff.to_scalar::<f32>()? < 1e-4, "relu={relu}");
        }
        Ok(())
    }
}
