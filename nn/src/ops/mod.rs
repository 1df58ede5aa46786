//! Convolution, pooling and batch-norm entry points the models call. Every model goes through
//! these, so the CPU fast kernels (custom candle ops in `conv`, `pool` and `norm`) replace
//! the portable path in one place. The portable path (the `reference_*` functions) is made of
//! candle tensor ops with a backward on every backend: GPUs, dtypes other than f32, and
//! `kernels = "portable"` on the CPU run it.

mod conv;
mod conv_backward;
mod conv_dense;
mod conv_geometry;
mod conv_op;
mod cpu_level;
mod gemm;
pub mod grad_sink;
mod huge_pages;
mod im2col;
mod kernels;
mod linear;
mod norm;
mod pool;
mod scratch;
mod simd;
mod transpose;
mod winograd;
mod winograd4;

pub use conv::conv_forward;
pub use conv_backward::conv_backward;
pub use conv_geometry::{ConvGeometry, MaxPool};
pub use cpu_level::{
    cpu_level, cpu_level_from_env, detected as detected_cpu_level, set_cpu_level, take_levels_run,
    CpuLevel, UnknownCpuLevel, CPU_LEVEL_ENV,
};
pub use huge_pages::HugePageAlloc;
pub(crate) use kernels::note_fast_dispatch;
pub use kernels::{
    fast_dispatches, kernels, kernels_from_env, set_kernels, with_kernels, Kernels, UnknownKernels,
    KERNELS_ENV,
};
pub use pool::{pool_backward, pool_forward, portable_max_pool2d, PoolGeometry};

use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Whether the fast CPU kernels are chosen on this thread and apply to all of `tensors`
/// (counted, so a check of the portable path can see that none ran).
fn use_fast_kernels(tensors: &[&Tensor]) -> bool {
    let chosen = kernels();
    let fast = tensors
        .iter()
        .all(|t| chosen.running_on(t.device(), t.dtype()) == Kernels::Fast);
    if fast {
        kernels::note_fast_dispatch();
    }
    fast
}

/// Asks glibc's malloc to keep freed memory instead of returning it to the kernel after every
/// training step: candle allocates and frees multi-MiB tensors each batch, and re-faulting
/// those pages cost ~10% of a baseline training step. Process-wide; call once at start-up
/// (the bench and training entry points). A no-op off glibc.
pub fn tune_allocator_for_training() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts allocator tuning parameters; the values are in range
        // (the mmap threshold's maximum is 32 MiB on 64-bit glibc).
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, 512 << 20);
            mallopt(M_TOP_PAD, 64 << 20);
        }
    }
}

/// 2-D convolution, NCHW input `x` [B,Cin,H,W], weight [Cout,Cin,K,K], optional bias [Cout],
/// square stride and zero padding (PyTorch's `F.conv2d` semantics).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    conv2d_activated(x, weight, bias, stride, padding, false, None, None)
}

/// `relu(conv2d(..))` in one op on the CPU (no separate ReLU pass forward or backward).
pub fn conv2d_relu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    conv2d_activated(x, weight, bias, stride, padding, true, None, None)
}

/// `max_pool2d(relu(conv2d(..)), pool)` in one op on the CPU: each chunk of the conv output
/// is pooled while in cache, and the unpooled output never becomes a tensor.
pub fn conv2d_relu_pool(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    pool: MaxPool,
) -> Result<Tensor> {
    conv2d_activated(x, weight, bias, stride, padding, true, Some(pool), None)
}

/// `flatten_from(1)(max_pool2d(relu(conv2d(..)), pool) * mask)` in one op on the CPU: a
/// dropout mask (`mask`, one factor per pooled element, scale included) and the flatten before
/// a linear layer fused in, so neither becomes a node of the autograd graph (each such node
/// cost a single-threaded multiply, or a zero-fill and add of its gradient, every step).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_relu_pool_flat(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    pool: MaxPool,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let output = OutputMask {
        mask,
        flatten: true,
    };
    conv2d_activated(
        x,
        weight,
        bias,
        stride,
        padding,
        true,
        Some(pool),
        Some(output),
    )
}

/// What [`conv2d_relu_pool_flat`] adds after the pooling.
struct OutputMask {
    mask: Option<Vec<f32>>,
    flatten: bool,
}

#[allow(clippy::too_many_arguments)]
fn conv2d_activated(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    relu: bool,
    pool: Option<MaxPool>,
    output: Option<OutputMask>,
) -> Result<Tensor> {
    if use_fast_kernels(&[x, weight]) && bias.is_none_or(|b| use_fast_kernels(&[b])) {
        let tracked = x.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
        let cout = weight.dim(0)?;
        let bias_arg = match bias {
            Some(b) => {
                if b.dims() != [cout] {
                    candle_core::bail!("conv2d: bias {:?} does not match {cout} filters", b.dims());
                }
                b.contiguous()?
            }
            None => Tensor::zeros(cout, DType::F32, x.device())?,
        };
        let op = conv_op::Conv2dOp::new(stride, padding, bias.is_some(), relu, pool, tracked);
        let op = match output {
            Some(o) => op.with_output(o.mask, o.flatten),
            None => op,
        };
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias_arg, op);
    }
    let y = reference_conv2d(x, weight, bias, stride, padding)?;
    let y = if relu { y.relu()? } else { y };
    let y = match pool {
        Some(p) => max_pool2d(&y, p.kernel, p.stride, p.padding)?,
        None => y,
    };
    let Some(output) = output else {
        return Ok(y);
    };
    let y = match output.mask {
        Some(mask) => {
            y.mul(&Tensor::from_vec(mask, y.shape(), y.device())?.to_dtype(y.dtype())?)?
        }
        None => y,
    };
    if output.flatten {
        y.flatten_from(1)
    } else {
        Ok(y)
    }
}

/// candle's own convolution (the portable path, and the reference the tests compare against).
pub fn reference_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Max pooling over square windows; padding counts as -inf (PyTorch's `F.max_pool2d`).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if use_fast_kernels(&[x]) {
        let op = pool::MaxPool2dOp {
            kernel,
            stride,
            padding,
            keep_indices: x.track_op(),
            indices: Mutex::new(None),
        };
        return x.contiguous()?.apply_op1(op);
    }
    portable_max_pool2d(x, kernel, stride, padding)
}

/// Fully connected layer `x wᵀ + b` (x [B, in], weight [out, in], bias [out]), then ReLU if
/// `relu`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
    if use_fast_kernels(&[x, weight, bias]) && x.rank() == 2 {
        let op = linear::LinearOp { relu };
        return x
            .contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    reference_linear(x, weight, bias, relu)
}

/// candle's matmul for [`linear`] (the portable path and the tests' reference).
pub fn reference_linear(x: &Tensor, weight: &Tensor, bias: &Tensor, relu: bool) -> Result<Tensor> {
    let y = x.matmul(&weight.t()?)?.broadcast_add(bias)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// Training-mode batch norm over dim 1 of `x` ([N, C, ...]) with the batch's statistics,
/// then ReLU if `relu`: returns `(y, batch mean, biased batch variance)`, the last two [C]
/// for the caller's running statistics.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_channel_params(x, &[gamma, beta])?;
    if use_fast_kernels(&[x, gamma, beta]) {
        let x = x.contiguous()?;
        let planes = norm::Planes::of(x.shape())?;
        let (mean, var) = with_cpu_slices(&[&x], |s| Ok(norm::channel_mean_var(&planes, s[0])))?;
        let mean_t = Tensor::new(mean.as_slice(), x.device())?;
        let var_t = Tensor::new(var.as_slice(), x.device())?;
        let op = norm::BatchNormTrainOp {
            mean,
            var,
            eps: eps as f32,
            relu,
        };
        let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
        return Ok((y, mean_t, var_t));
    }
    reference_batch_norm_train(x, gamma, beta, eps, relu)
}

/// candle tensor ops for [`batch_norm_train`] (the portable path and the tests' reference).
pub fn reference_batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let per_channel = x.transpose(0, 1)?.flatten_from(1)?;
    let mean = per_channel.mean_keepdim(1)?;
    let var = per_channel.broadcast_sub(&mean)?.sqr()?.mean_keepdim(1)?;
    let shape = channel_shape(x)?;
    let y = x
        .broadcast_sub(&mean.reshape(shape.as_slice())?)?
        .broadcast_div(&(var.reshape(shape.as_slice())? + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?;
    let y = if relu { y.relu()? } else { y };
    Ok((y, mean.flatten_all()?, var.flatten_all()?))
}

/// Inference-mode batch norm with running statistics, then ReLU if `relu`.
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    check_channel_params(x, &[gamma, beta, running_mean, running_var])?;
    if use_fast_kernels(&[x, gamma, beta, running_mean, running_var]) {
        let (scale, shift) = norm::fold_affine(
            &running_mean.to_vec1::<f32>()?,
            &running_var.to_vec1::<f32>()?,
            &gamma.to_vec1::<f32>()?,
            &beta.to_vec1::<f32>()?,
            eps as f32,
        );
        let op = norm::ChannelAffineOp { scale, shift, relu };
        return x.contiguous()?.apply_op1(op);
    }
    reference_batch_norm_eval(x, gamma, beta, running_mean, running_var, eps, relu)
}

/// candle tensor ops for [`batch_norm_eval`] (the portable path and the tests' reference).
pub fn reference_batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let shape = channel_shape(x)?;
    let y = x
        .broadcast_sub(&running_mean.reshape(shape.as_slice())?)?
        .broadcast_div(&(running_var.reshape(shape.as_slice())? + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape(shape.as_slice())?)?
        .broadcast_add(&beta.reshape(shape.as_slice())?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `relu(a + b)`, one pass forward and backward on the CPU.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if use_fast_kernels(&[a, b]) && a.shape() == b.shape() {
        return a.contiguous()?.apply_op2(&b.contiguous()?, norm::AddReluOp);
    }
    (a + b)?.relu()
}

/// [1, C, 1, ...]: per-channel values broadcast against `x`.
/// `w[c, ..] * scale[c]` for every output channel `c` of a weight [C, ...], without
/// gradients: eval mode folding batch norm into a convolution, once per forward pass over 45 MB
/// of ResNet-18 weights (candle's broadcast multiply ran it on one thread, element by element).
pub fn scale_output_channels(w: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (w, scale) = (w.detach(), scale.detach());
    let channels = w.dim(0)?;
    if scale.dims() != [channels] {
        candle_core::bail!(
            "scale {:?} does not match {channels} channels",
            scale.dims()
        );
    }
    if use_fast_kernels(&[&w, &scale]) {
        let (w, scale) = (w.contiguous()?, scale.contiguous()?);
        let per_channel = w.elem_count() / channels.max(1);
        let scaled = with_cpu_slices(&[&w, &scale], |s| {
            let mut out = zeroed(s[0].len());
            out.par_chunks_mut(per_channel.max(1))
                .zip(s[0].par_chunks(per_channel.max(1)))
                .zip(s[1].par_iter())
                .for_each(|((o, v), k)| o.iter_mut().zip(v).for_each(|(o, v)| *o = v * k));
            Ok(out)
        })?;
        return tensor_from_vec(scaled, w.shape(), w.device());
    }
    let mut shape = vec![1; w.rank()];
    shape[0] = channels;
    w.broadcast_mul(&scale.reshape(shape)?)
}

fn channel_shape(x: &Tensor) -> Result<Vec<usize>> {
    let mut shape = vec![1; x.rank()];
    shape[1] = x.dim(1)?;
    Ok(shape)
}

fn check_channel_params(x: &Tensor, params: &[&Tensor]) -> Result<()> {
    let channels = x.dim(1)?;
    for p in params {
        if p.dims() != [channels] {
            candle_core::bail!(
                "batch norm: a parameter of shape {:?} does not fit {channels} channels",
                p.dims()
            );
        }
    }
    Ok(())
}

/// Elements per parallel task in the purely elementwise ops.
const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// A destination's address, shared by parallel tasks that each write their own disjoint set
/// of its elements (which the caller's SAFETY comment shows).
#[derive(Clone, Copy)]
pub(super) struct SharedDst(pub(super) *mut f32);
// SAFETY: the tasks sharing it write disjoint elements and nobody reads them meanwhile.
unsafe impl Send for SharedDst {}
unsafe impl Sync for SharedDst {}

impl SharedDst {
    /// The address `offset` elements in (a method, so closures capture the whole Send wrapper).
    ///
    /// # Safety
    /// `offset` must lie inside the destination buffer.
    pub(super) unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// A zero-filled buffer of `n` elements, filled in parallel when large: the ops' output
/// buffers are allocated on the calling thread, where zeroing (and first-touch page faults)
/// of multi-MiB buffers was a serial stretch of every training step.
fn zeroed<T: Default + Copy + Send + Sync>(n: usize) -> Vec<T> {
    if n < 4 * ELEMENTWISE_CHUNK {
        return vec![T::default(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.par_extend(rayon::iter::repeat_n(T::default(), n));
    v
}

/// The gradient through a ReLU whose output was `y`: `grad_y` where `y > 0`, else 0.
fn relu_grad(y: &[f32], grad_y: &[f32]) -> Vec<f32> {
    let mut out = zeroed(y.len());
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(
            y.par_chunks(ELEMENTWISE_CHUNK)
                .zip(grad_y.par_chunks(ELEMENTWISE_CHUNK)),
        )
        .for_each(|(o, (y, g))| {
            for ((o, &yv), &gv) in o.iter_mut().zip(y).zip(g) {
                *o = if yv > 0.0 { gv } else { 0.0 };
            }
        });
    out
}

/// The f32 elements a contiguous CPU layout covers.
fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fast CPU ops need contiguous inputs"),
    }
}

/// Runs `f` on the f32 data of contiguous CPU tensors (holding their storage locks meanwhile).
fn with_cpu_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(cpu) => slices.push(cpu_slice(cpu, layout)?),
            _ => candle_core::bail!("fast CPU ops called on a non-CPU tensor"),
        }
    }
    f(&slices)
}

fn tensor_from_vec(data: Vec<f32>, shape: &Shape, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(data, shape.clone(), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_max_pool_ignores_padding() -> Result<()> {
        // All-negative input: zero padding would wrongly win the max at the borders.
        let x = Tensor::new(&[[[[-1f32, -2.], [-3., -4.]]]], &Device::Cpu)?;
        let y = max_pool2d(&x, 3, 2, 1)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-1.0]);
        let y_ref = portable_max_pool2d(&x, 3, 2, 1)?;
        assert_eq!(y_ref.flatten_all()?.to_vec1::<f32>()?, vec![-1.0]);
        Ok(())
    }
}
