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
        .for_each_init(Vec::new, |rows, (plane, (y_plane, idx_plane))| {
            let src = &x[plane * in_plane..(plane + 1) * in_plane];
            pool_plane(g, src, y_plane, idx_plane, rows)
        });
    (y, idx)
}

/// Max pooling forward without the argmax indices (inference: nothing will backpropagate).
pub fn pool_forward_values(g: &PoolGeometry, x: &[f32]) -> Vec<f32> {
    let (in_plane, out_plane) = (g.height * g.width, g.out_height * g.out_width);
    let mut y = zeroed(g.planes * out_plane);
    y.par_chunks_mut(out_plane)
        .enumerate()
        .for_each_init(Vec::new, |rows, (plane, y_plane)| {
            let src = &x[plane * in_plane..(plane + 1) * in_plane];
            max_only_plane(g, src, y_plane, rows)
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
            let mut rows = Vec::new();
            for ((src, y_plane), idx_plane) in planes.zip(idx.chunks_mut(out_plane)) {
                pool_plane(g, src, y_plane, idx_plane, &mut rows);
            }
        }
        None => {
            let mut rows = Vec::new();
            for (src, y_plane) in planes {
                max_only_plane(g, src, y_plane, &mut rows);
            }
        }
    }
}

/// Whether `v` takes over from `best` in a window scanned in row-major order: a greater
/// value does, and a NaN always does (PyTorch propagates NaN), so the first maximum wins, or
/// the last NaN.
#[inline(always)]
fn takes_over(v: f32, best: f32) -> bool {
    v > best || v.is_nan()
}

/// Pooling in two passes: each input row's best over every window's columns, then the best
/// of those down each window's rows. Adjacent windows share those row results (ResNet's
/// 3x3/2 stem pool computes each once instead of 1.5 times), and both passes are short fixed
/// loops. With [`takes_over`] the winner is the one a row-major scan of the window finds: the
/// rows are visited in order and each row's winner is its own scan's winner.
fn row_winners<T: Copy>(
    g: &PoolGeometry,
    src: &[f32],
    rows: &mut Vec<(f32, T)>,
    at: impl Fn(usize) -> T,
) {
    rows.clear();
    for (iy, row) in src.chunks_exact(g.width).enumerate() {
        for ox in 0..g.out_width {
            let (x0, x1) = g.window(ox, g.width);
            let (mut best, mut best_at) = (f32::NEG_INFINITY, at(iy * g.width + x0));
            for (ix, &v) in row.iter().enumerate().take(x1).skip(x0) {
                // Selects, not branches: which value wins is data, and mispredicted jumps
                // had cost more than the comparisons.
                let take = takes_over(v, best);
                best = if take { v } else { best };
                best_at = if take { at(iy * g.width + ix) } else { best_at };
            }
            rows.push((best, best_at));
        }
    }
}

/// The second pass: down each window's rows of `rows` ([`row_winners`]), `emit(output index,
/// value, its tag)` for every window.
fn window_winners<T: Copy>(
    g: &PoolGeometry,
    rows: &[(f32, T)],
    mut emit: impl FnMut(usize, f32, T),
) {
    for oy in 0..g.out_height {
        let (y0, y1) = g.window(oy, g.height);
        for ox in 0..g.out_width {
            let (mut best, mut best_at) = rows[y0 * g.out_width + ox];
            for iy in y0 + 1..y1 {
                let (v, v_at) = rows[iy * g.out_width + ox];
                let take = takes_over(v, best);
                best = if take { v } else { best };
                best_at = if take { v_at } else { best_at };
            }
            emit(oy * g.out_width + ox, best, best_at);
        }
    }
}

/// One plane's window maxima only: no index bookkeeping.
fn max_only_plane(g: &PoolGeometry, src: &[f32], y_plane: &mut [f32], rows: &mut Vec<(f32, ())>) {
    row_winners(g, src, rows, |_| ());
    window_winners(g, rows, |o, v, ()| y_plane[o] = v);
}

/// One plane: the max of each window and where in the plane it was.
fn pool_plane(
    g: &PoolGeometry,
    src: &[f32],
    y_plane: &mut [f32],
    idx_plane: &mut [u32],
    rows: &mut Vec<(f32, u32)>,
) {
    if g.kernel == 2 && g.stride == 2 && g.padding == 0 {
        pool_2x2_plane(g, src, y_plane, idx_plane);
        return;
    }
    row_winners(g, src, rows, |i| i as u32);
    window_winners(g, rows, |o, v, at| {
        y_plane[o] = v;
        idx_plane[o] = at;
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The window scanned pixel by pixel in row-major order, with the same rule.
    fn scanned(g: &PoolGeometry, src: &[f32]) -> Vec<(f32, u32)> {
        let mut out = Vec::new();
        for oy in 0..g.out_height {
            let (y0, y1) = g.window(oy, g.height);
            for ox in 0..g.out_width {
                let (x0, x1) = g.window(ox, g.width);
                let mut best = (f32::NEG_INFINITY, (y0 * g.width + x0) as u32);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let v = src[iy * g.width + ix];
                        if takes_over(v, best.0) {
                            best = (v, (iy * g.width + ix) as u32);
                        }
                    }
                }
                out.push(best);
            }
        }
        out
    }

    #[test]
    fn two_passes_pick_the_pixel_a_row_major_scan_picks_with_ties_nan_and_padding() {
        // Few distinct values, so windows hold ties; some NaN and -inf.
        let values = [
            0.0,
            1.0,
            1.0,
            -1.0,
            f32::NAN,
            f32::NEG_INFINITY,
            2.0,
            2.0,
            0.5,
        ];
        for (h, w, k, s, p) in [
            (14, 14, 3, 2, 1),
            (7, 9, 3, 2, 1),
            (5, 5, 3, 1, 1),
            (6, 6, 3, 3, 0),
            (8, 7, 4, 2, 2),
        ] {
            let g = PoolGeometry::new((1, 3, h, w), k, s, p).unwrap();
            for seed in 0..20usize {
                let src: Vec<f32> = (0..h * w)
                    .map(|i| values[(i * 7 + seed * 13 + i * i * seed) % values.len()])
                    .collect();
                let want = scanned(&g, &src);
                let plane = g.out_height * g.out_width;
                let (mut y, mut idx) = (vec![0.0; plane], vec![0; plane]);
                pool_plane(&g, &src, &mut y, &mut idx, &mut Vec::new());
                let mut values_only = vec![0.0; plane];
                max_only_plane(&g, &src, &mut values_only, &mut Vec::new());
                for (o, &(v, at)) in want.iter().enumerate() {
                    let what = format!("{h}x{w} k{k} s{s} p{p} seed {seed} output {o}");
                    assert_eq!(idx[o], at, "{what}");
                    assert_eq!(y[o].to_bits(), v.to_bits(), "{what}");
                    assert_eq!(values_only[o].to_bits(), v.to_bits(), "{what}");
                }
            }
        }
    }
}
