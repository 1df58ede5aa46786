//! Max pooling, padding counted as -inf as in PyTorch, two ways: on the CPU a candle custom op
//! whose forward pass remembers where each maximum came from and whose backward pass scatters
//! the gradient there; and the portable path, candle tensor ops only, which every backend can
//! differentiate (candle's own max-pool backward refuses kernel != stride, e.g. ResNet's 3x3/2
//! stem pool).

use super::{cpu_slice, tensor_from_vec, zeroed};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Shapes of one pooling (square window).
#[derive(Debug, Clone, Copy)]
pub struct PoolGeometry {
    pub planes: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl PoolGeometry {
    pub fn new(
        (b, c, h, w): (usize, usize, usize, usize),
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            candle_core::bail!("max_pool2d: kernel and stride must be at least 1");
        }
        if 2 * padding > kernel {
            candle_core::bail!("max_pool2d: padding {padding} exceeds half the kernel {kernel}");
        }
        if h + 2 * padding < kernel || w + 2 * padding < kernel {
            candle_core::bail!("max_pool2d: kernel {kernel} larger than padded input {h}x{w}");
        }
        Ok(Self {
            planes: b * c,
            height: h,
            width: w,
            kernel,
            stride,
            padding,
            out_height: (h + 2 * padding - kernel) / stride + 1,
            out_width: (w + 2 * padding - kernel) / stride + 1,
        })
    }
}

impl PoolGeometry {
    /// The input rows (or columns) `lo..hi` that output row (column) `o` covers, padding
    /// left out; `size` is the input's height (width).
    fn window(&self, o: usize, size: usize) -> (usize, usize) {
        let lo = (o * self.stride).saturating_sub(self.padding);
        let hi = (o * self.stride + self.kernel - self.padding).min(size);
        (lo, hi)
    }
}

/// Max pooling forward: values, and for each output the index of its maximum in its plane.
pub fn pool_forward(g: &PoolGeometry, x: &[f32]) -> (Vec<f32>, Vec<u32>) {
    let (in_plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
    let mut y = zeroed(g.planes * out_plane);
    let mut idx = zeroed(g.planes * out_plane);
    y.par_chunks_mut(out_plane)
        .zip(idx.par_chunks_mut(out_plane))
        .enumerate()
        .for_each(|(plane, (y_plane, idx_plane))| {
            pool_plane(
                g,
                &x[plane * in_plane..(plane + 1) * in_plane],
                y_plane,
                idx_plane,
            )
        });
    (y, idx)
}

/// Max pooling forward without the argmax indices (inference: nothing will backpropagate).
pub fn pool_forward_values(g: &PoolGeometry, x: &[f32]) -> Vec<f32> {
    let (in_plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
    let mut y = zeroed(g.planes * out_plane);
    y.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(plane, y_plane)| {
            max_only_plane(g, &x[plane * in_plane..(plane + 1) * in_plane], y_plane)
        });
    y
}

/// Pools consecutive planes of `x` into `y`, and the argmax indices into `idx` when given
/// (serially; for callers that already run in parallel).
pub fn pool_planes(g: &PoolGeometry, x: &[f32], y: &mut [f32], idx: Option<&mut [u32]>) {
    let (in_plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
    let planes = x.chunks(in_plane).zip(y.chunks_mut(out_plane));
    match idx {
        Some(idx) => {
            for ((src, y_plane), idx_plane) in planes.zip(idx.chunks_mut(out_plane)) {
                pool_plane(g, src, y_plane, idx_plane);
            }
        }
        None => {
            for (src, y_plane) in planes {
                max_only_plane(g, src, y_plane);
            }
        }
    }
}

/// One plane's window maxima only: no index bookkeeping, no data-dependent branches.
fn max_only_plane(g: &PoolGeometry, src: &[f32], y_plane: &mut [f32]) {
    for oy in 0..g.out_height {
        let (y0, y1) = g.window(oy, g.height);
        for ox in 0..g.out_width {
            let (x0, x1) = g.window(ox, g.width);
            let (mut best, mut nan) = (f32::NEG_INFINITY, false);
            for row in src[y0 * g.width..y1 * g.width].chunks(g.width) {
                for &v in &row[x0..x1] {
                    best = best.max(v);
                    nan |= v.is_nan();
                }
            }
            // f32::max skips NaN; PyTorch propagates it.
            y_plane[oy * g.out_width + ox] = if nan { f32::NAN } else { best };
        }
    }
}

/// One plane: the max of each window and where in the plane it was.
fn pool_plane(g: &PoolGeometry, src: &[f32], y_plane: &mut [f32], idx_plane: &mut [u32]) {
    if g.kernel == 2 && g.stride == 2 && g.padding == 0 {
        pool_2x2_plane(g, src, y_plane, idx_plane);
        return;
    }
    for oy in 0..g.out_height {
        let (y0, y1) = g.window(oy, g.height);
        for ox in 0..g.out_width {
            let (x0, x1) = g.window(ox, g.width);
            let mut best = f32::NEG_INFINITY;
            let mut best_at = y0 * g.width + x0;
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let v = src[iy * g.width + ix];
                    // A NaN wins its window (and then stays), as PyTorch propagates NaN.
                    if v > best || v.is_nan() {
                        best = v;
                        best_at = iy * g.width + ix;
                    }
                }
            }
            y_plane[oy * g.out_width + ox] = best;
            idx_plane[oy * g.out_width + ox] = best_at as u32;
        }
    }
}

/// The baseline's 2x2/2 unpadded pooling without the general loop's bounds arithmetic.
fn pool_2x2_plane(g: &PoolGeometry, src: &[f32], y: &mut [f32], idx: &mut [u32]) {
    let w = g.width;
    for oy in 0..g.out_height {
        let top = &src[2 * oy * w..2 * oy * w + w];
        let bottom = &src[(2 * oy + 1) * w..(2 * oy + 2) * w];
        let y_row = &mut y[oy * g.out_width..(oy + 1) * g.out_width];
        let idx_row = &mut idx[oy * g.out_width..(oy + 1) * g.out_width];
        for ox in 0..g.out_width {
            let candidates = [
                top[2 * ox],
                top[2 * ox + 1],
                bottom[2 * ox],
                bottom[2 * ox + 1],
            ];
            let mut best = 0;
            for (i, v) in candidates.iter().enumerate().skip(1) {
                if *v > candidates[best] || (v.is_nan() && !candidates[best].is_nan()) {
                    best = i;
                }
            }
            y_row[ox] = candidates[best];
            let (dy, dx) = (best / 2, best % 2);
            idx_row[ox] = ((2 * oy + dy) * w + 2 * ox + dx) as u32;
        }
    }
}

/// Max pooling backward: each output's gradient goes to the input that won its window.
pub fn pool_backward(g: &PoolGeometry, idx: &[u32], grad_y: &[f32]) -> Vec<f32> {
    let (in_plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
    let mut gx = zeroed(g.planes * in_plane);
    gx.par_chunks_mut(in_plane)
        .enumerate()
        .for_each(|(plane, gx_plane)| {
            let range = plane * out_plane..(plane + 1) * out_plane;
            for (i, gv) in idx[range.clone()].iter().zip(&grad_y[range]) {
                gx_plane[*i as usize] += *gv;
            }
        });
    gx
}

/// The candle custom op. The argmax indices live in the op (one op per call) between the
/// forward and the backward pass.
pub struct MaxPool2dOp {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub keep_indices: bool,
    pub indices: Mutex<Option<Vec<u32>>>,
}

impl CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "fmnist-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let g = PoolGeometry::new(dims, self.kernel, self.stride, self.padding)?;
        let x = cpu_slice(storage, layout)?;
        if !self.keep_indices {
            let shape = Shape::from((dims.0, dims.1, g.out_height, g.out_width));
            return Ok((CpuStorage::F32(pool_forward_values(&g, x)), shape));
        }
        let (y, idx) = pool_forward(&g, x);
        {
            let mut slot = self
                .indices
                .lock()
                .map_err(|_| candle_core::Error::Msg("max_pool2d: poisoned index lock".into()))?;
            *slot = Some(idx);
        }
        let shape = Shape::from((dims.0, dims.1, g.out_height, g.out_width));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = PoolGeometry::new(arg.dims4()?, self.kernel, self.stride, self.padding)?;
        let slot = self
            .indices
            .lock()
            .map_err(|_| candle_core::Error::Msg("max_pool2d: poisoned index lock".into()))?;
        let Some(idx) = slot.as_ref() else {
            candle_core::bail!("max_pool2d: backward without saved indices");
        };
        let grad_res = grad_res.contiguous()?;
        let gx = super::with_cpu_slices(&[&grad_res], |s| Ok(pool_backward(&g, idx, s[0])))?;
        Ok(Some(tensor_from_vec(gx, arg.shape(), arg.device())?))
    }
}

/// Max pooling from candle tensor ops that have a backward on every backend, with PyTorch's
/// semantics: -inf padding, any kernel, stride and padding, the gradient of each window going
/// to its first maximum in row-major order (overlapping windows add up), NaN propagated.
///
/// Each of the `kernel`² window positions becomes a strided view of the padded input (narrow,
/// then a reshape that puts the stride in its own dimension, then narrow to its first slot);
/// the output is the sum of those views masked to each window's first maximum.
pub fn portable_max_pool2d(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let g = PoolGeometry::new((b, c, h, w), kernel, stride, padding)?;
    let (oh, ow) = (g.out_height, g.out_width);
    // Rows (columns) past the last window only fill the reshape; no window reads them.
    let padded_h = (h + 2 * padding).max(kernel - 1 + stride * oh);
    let padded_w = (w + 2 * padding).max(kernel - 1 + stride * ow);
    let xp = pad_neg_inf(x, 2, padding, padded_h - h - padding)?;
    let xp = pad_neg_inf(&xp, 3, padding, padded_w - w - padding)?;

    let mut windows = Vec::with_capacity(kernel * kernel);
    for ky in 0..kernel {
        let rows = xp
            .narrow(2, ky, stride * oh)?
            .reshape((b, c, oh, stride, padded_w))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for kx in 0..kernel {
            let cols = rows
                .narrow(3, kx, stride * ow)?
                .reshape((b, c, oh, ow, stride))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            windows.push(cols);
        }
    }

    let detached: Vec<Tensor> = windows.iter().map(Tensor::detach).collect();
    let mut max = detached[0].clone();
    let mut nan = detached[0].ne(&detached[0])?.to_dtype(DType::F32)?;
    for v in &detached[1..] {
        max = max.maximum(v)?;
        nan = nan.maximum(&v.ne(v)?.to_dtype(DType::F32)?)?;
    }
    let zeros = max.zeros_like()?;
    let mut taken = zeros.to_dtype(DType::F32)?;
    let mut pooled: Option<Tensor> = None;
    for (view, value) in windows.iter().zip(&detached) {
        let hit = value.eq(&max)?.to_dtype(DType::F32)?;
        // 1 where this position is the window's first maximum.
        let first = (&hit - (&hit * &taken)?)?;
        taken = (&taken + &first)?;
        let picked = first.gt(0.5)?.where_cond(view, &zeros)?;
        pooled = Some(match pooled {
            None => picked,
            Some(sum) => (sum + picked)?,
        });
    }
    let pooled =
        pooled.ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty window".into()))?;
    // A window holding NaN has no maximum equal to itself: give it NaN, as PyTorch does.
    let nan_value = Tensor::full(f32::NAN, max.shape(), max.device())?.to_dtype(max.dtype())?;
    nan.gt(0.5)?.where_cond(&nan_value, &pooled)
}

/// `x` with `before` and `after` slices of -inf added along `dim` (no-op when both are 0).
fn pad_neg_inf(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    if before == 0 && after == 0 {
        return Ok(x.clone());
    }
    let slab = |n: usize| -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        dims[dim] = n;
        Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())
    };
    let mut parts = Vec::with_capacity(3);
    if before > 0 {
        parts.push(slab(before)?);
    }
    parts.push(x.clone());
    if after > 0 {
        parts.push(slab(after)?);
    }
    Tensor::cat(&parts, dim)
}
