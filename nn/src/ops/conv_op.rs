//! The CPU convolution as a candle custom op (x, weight, bias), with ReLU, max pooling,
//! an output mask (dropout) and flattening fused in.

use super::conv::{conv_forward, conv_forward_pooled};
use super::conv_backward::{conv_backward_from, OutputGrad};
use super::conv_dense;
use super::conv_geometry::{ConvGeometry, MaxPool};
use super::grad_sink;
use super::{cpu_slice, relu_grad, tensor_from_vec, with_cpu_slices};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Elements per parallel task of the output-mask multiply.
const MASK_CHUNK: usize = 1 << 15;

/// The candle custom op: arguments (x, weight, bias); a missing bias is passed as zeros.
/// With `relu` the op is `relu(conv(x))`, its backward masking the gradient by the output;
/// with `pool` the output is then max-pooled, the argmax indices kept in the op between the
/// forward and the backward pass.
pub struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
    pub has_bias: bool,
    pub relu: bool,
    pub pool: Option<MaxPool>,
    /// Whether a backward pass may follow (so the pool's argmax indices and the dense form's
    /// unrolled weight are worth keeping).
    pub keep_indices: bool,
    pub pool_indices: Mutex<Option<Vec<u32>>>,
    /// The dense form's unrolled weight (tiny maps, see `conv_dense`), kept between the
    /// forward and the backward pass when one may follow.
    pub unrolled: Mutex<Option<Vec<f32>>>,
    /// Multiplies the output elementwise (a dropout mask, scale included), forward and backward.
    pub output_mask: Option<Vec<f32>>,
    /// Whether the output is [B, C * H * W] instead of [B, C, H, W].
    pub flatten: bool,
}

impl Conv2dOp {
    pub fn new(
        stride: usize,
        padding: usize,
        has_bias: bool,
        relu: bool,
        pool: Option<MaxPool>,
        keep_indices: bool,
    ) -> Self {
        Self {
            stride,
            padding,
            has_bias,
            relu,
            pool,
            keep_indices,
            pool_indices: Mutex::new(None),
            unrolled: Mutex::new(None),
            output_mask: None,
            flatten: false,
        }
    }

    /// The op with its output multiplied by `mask` (one factor per output element) and, with
    /// `flatten`, shaped [B, C * H * W]: dropout and the flatten before a linear layer, fused.
    pub fn with_output(mut self, mask: Option<Vec<f32>>, flatten: bool) -> Self {
        self.output_mask = mask;
        self.flatten = flatten;
        self
    }

    /// The op's output shape for a conv output (or pooled) of `dims`.
    fn output_shape(&self, (b, c, h, w): (usize, usize, usize, usize)) -> Shape {
        if self.flatten {
            Shape::from((b, c * h * w))
        } else {
            Shape::from((b, c, h, w))
        }
    }

    /// `y *= mask` when the op has an output mask.
    fn apply_mask(&self, y: &mut [f32]) -> Result<()> {
        let Some(mask) = &self.output_mask else {
            return Ok(());
        };
        if mask.len() != y.len() {
            candle_core::bail!(
                "conv2d: output mask of {} for {} outputs",
                mask.len(),
                y.len()
            );
        }
        y.par_chunks_mut(MASK_CHUNK)
            .zip(mask.par_chunks(MASK_CHUNK))
            .for_each(|(y, m)| y.iter_mut().zip(m).for_each(|(v, k)| *v *= k));
        Ok(())
    }

    fn indices(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<u32>>>> {
        self.pool_indices
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv2d: poisoned pool index lock".into()))
    }

    fn unrolled(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<f32>>>> {
        self.unrolled
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv2d: poisoned unrolled weight lock".into()))
    }

    /// The gradient at the op's output taken back through the output mask and the ReLU (both
    /// elementwise on the op's output): what the pooling (if any) received.
    fn activation_grad(&self, res: &[f32], grad_res: &[f32]) -> Result<Vec<f32>> {
        let mut grad = if self.relu {
            relu_grad(res, grad_res)
        } else {
            grad_res.to_vec()
        };
        self.apply_mask(&mut grad)?;
        Ok(grad)
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "fmnist-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(
            l1.shape().dims4()?,
            l2.shape().dims4()?,
            self.stride,
            self.padding,
        )?;
        let x = cpu_slice(s1, l1)?;
        let w = cpu_slice(s2, l2)?;
        let b = cpu_slice(s3, l3)?;
        let bias = self.has_bias.then_some(b);
        if let Some(pool) = self.pool {
            let (mut y, idx) =
                conv_forward_pooled(&g, x, w, bias, self.relu, pool, self.keep_indices)?;
            *self.indices()? = idx;
            self.apply_mask(&mut y)?;
            let pool = pool.geometry(&g, g.batch)?;
            let shape =
                self.output_shape((g.batch, g.out_channels, pool.out_height, pool.out_width));
            return Ok((CpuStorage::F32(y), shape));
        }
        let mut y = if self.keep_indices && conv_dense::suits(&g) {
            let (y, unrolled) = conv_dense::forward_unrolled(&g, x, w, bias, self.relu);
            *self.unrolled()? = Some(unrolled);
            y
        } else {
            conv_forward(&g, x, w, bias, self.relu)
        };
        self.apply_mask(&mut y)?;
        let shape = self.output_shape((g.batch, g.out_channels, g.out_height, g.out_width));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = ConvGeometry::new(x.dims4()?, w.dims4()?, self.stride, self.padding)?;
        let want = (x.track_op(), w.track_op(), self.has_bias && b.track_op());
        let grad_res = grad_res.contiguous()?;
        let grads = with_cpu_slices(&[x, w, res, &grad_res], |s| {
            let (x, w) = (s[0], s[1]);
            let grad = self.activation_grad(s[2], s[3])?;
            let Some(pool) = self.pool else {
                if let Some(unrolled) = self.unrolled()?.take() {
                    return Ok(conv_dense::backward(&g, x, w, &grad, want, Some(unrolled)));
                }
                return Ok(conv_backward_from(&g, x, w, OutputGrad::Dense(&grad), want));
            };
            let pool = pool.geometry(&g, g.batch)?;
            let indices = self.indices()?;
            let Some(indices) = indices.as_ref() else {
                candle_core::bail!("conv2d: backward without saved pool indices");
            };
            let source = OutputGrad::Pooled {
                pool: &pool,
                indices,
                grad: &grad,
            };
            Ok(conv_backward_from(&g, x, w, source, want))
        })?;
        let device = x.device();
        let gx = grads
            .x
            .map(|v| tensor_from_vec(v, x.shape(), device))
            .transpose()?;
        let gw = grads
            .w
            .map(|v| tensor_from_vec(v, w.shape(), device))
            .transpose()?;
        let gb = grads
            .bias
            .map(|v| tensor_from_vec(v, b.shape(), device))
            .transpose()?;
        grad_sink::route3([x, w, b], (gx, gw, gb))
    }
}
