//! CPU 2-D convolution as a candle custom op: im2col + GEMM forward with a fused bias, and a
//! backward that computes the weight gradient as a GEMM against im2col, the input gradient as
//! a GEMM followed by col2im, and the bias gradient as a sum (instead of candle's slow
//! conv_transpose2d path).
//!
//! The batch is cut into chunks of whole images, wide enough (in output pixels) for the GEMM to
//! run efficiently even where the feature maps are tiny (ResNet's deep layers); chunks run in
//! parallel. Weight gradients are summed per fixed group of chunks and the groups added in
//! order, so the result does not depend on how rayon schedules the work (bit-reproducible).

use super::gemm::{sgemm, MatRef};
use super::pool::{pool_planes, PoolGeometry};
use super::winograd;
use super::{cpu_slice, relu_grad, tensor_from_vec, with_cpu_slices, zeroed};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Output pixels per GEMM that keep the kernel efficient: smaller feature maps are batched.
const TARGET_COLUMNS: usize = 256;
/// Fixed number of partial weight-gradient accumulators (independent of the thread count so
/// that the summation order, and so the bits, never change).
const WEIGHT_GRAD_GROUPS: usize = 8;
/// Elements per parallel task of the output-mask multiply.
const MASK_CHUNK: usize = 1 << 15;

/// Shapes of one convolution (square kernel, stride and padding).
#[derive(Debug, Clone, Copy)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeometry {
    pub fn new(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (batch, in_channels, height, width) = x;
        let (out_channels, w_in, kh, kw) = w;
        if w_in != in_channels || kh != kw {
            candle_core::bail!(
                "conv2d: weight {w:?} does not fit input {x:?} (need [Cout, {in_channels}, K, K])"
            );
        }
        if stride == 0 {
            candle_core::bail!("conv2d: stride must be at least 1");
        }
        if height + 2 * padding < kh || width + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh} larger than padded input {height}x{width}");
        }
        Ok(Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel: kh,
            stride,
            padding,
            out_height: (height + 2 * padding - kh) / stride + 1,
            out_width: (width + 2 * padding - kw) / stride + 1,
        })
    }

    /// Kernel taps `(ki, kj)` that touch the image for at least one output pixel. On tiny
    /// feature maps (ResNet's 1x1 layer4 with 3x3 kernels) most taps only ever see padding;
    /// leaving them out of im2col saves their whole share of the GEMMs.
    fn active_taps(&self) -> Vec<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let rows: Vec<usize> = (0..k)
            .filter(|&ki| {
                let (lo, hi) = valid_range(self.out_height, self.height, s, p, ki);
                lo < hi
            })
            .collect();
        let cols: Vec<usize> = (0..k)
            .filter(|&kj| {
                let (lo, hi) = valid_range(self.out_width, self.width, s, p, kj);
                lo < hi
            })
            .collect();
        rows.iter()
            .flat_map(|&ki| cols.iter().map(move |&kj| (ki, kj)))
            .collect()
    }
    fn out_pixels(&self) -> usize {
        self.out_height * self.out_width
    }
    fn in_image_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    fn out_image_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }
    /// 1x1, stride 1, no padding: the image itself is its im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
    fn images_per_chunk(&self) -> usize {
        TARGET_COLUMNS
            .div_ceil(self.out_pixels().max(1))
            .clamp(1, self.batch.max(1))
    }
    /// Multiply-adds x 2 of the forward pass, counting every kernel tap (as PyTorch does).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.out_image_len() * self.in_channels * self.kernel * self.kernel)
            as f64
    }
}

/// Below this output width im2col and col2im go through a per-tap gather table instead of
/// copying row segments: on ResNet's 7x7 down to 1x1 maps the per-row bookkeeping cost more
/// than the copying.
const GATHER_BELOW_WIDTH: usize = 16;
/// A gather-table entry for an output pixel that reads padding.
const PADDING: u32 = u32::MAX;

/// For each active tap, the input-plane offset each output pixel reads (or `PADDING`).
fn gather_tables(g: &ConvGeometry, taps: &[(usize, usize)]) -> Vec<Vec<u32>> {
    let (s, p) = (g.stride as isize, g.padding as isize);
    taps.iter()
        .map(|&(ki, kj)| {
            let mut table = Vec::with_capacity(g.out_pixels());
            for oy in 0..g.out_height as isize {
                let iy = oy * s + ki as isize - p;
                for ox in 0..g.out_width as isize {
                    let ix = ox * s + kj as isize - p;
                    let inside =
                        (0..g.height as isize).contains(&iy) && (0..g.width as isize).contains(&ix);
                    table.push(if inside {
                        (iy as usize * g.width + ix as usize) as u32
                    } else {
                        PADDING
                    });
                }
            }
            table
        })
        .collect()
}

/// For each active tap, the offset each output pixel reads in the zero-padded plane
/// ((H + 2p) x (W + 2p)): every entry is valid, so the gather needs no padding test.
fn padded_gather_tables(g: &ConvGeometry, taps: &[(usize, usize)]) -> Vec<Vec<u32>> {
    let padded_width = g.width + 2 * g.padding;
    taps.iter()
        .map(|&(ki, kj)| {
            (0..g.out_height)
                .flat_map(|oy| {
                    (0..g.out_width).map(move |ox| {
                        ((oy * g.stride + ki) * padded_width + ox * g.stride + kj) as u32
                    })
                })
                .collect()
        })
        .collect()
}

/// How im2col/col2im walk the input: row segments for wide maps, gather tables for small ones
/// (im2col reads a zero-padded copy of each plane, col2im scatters into the plane itself).
enum Walk {
    Rows,
    Gather {
        into_plane: Vec<Vec<u32>>,
        into_padded: Vec<Vec<u32>>,
    },
}

impl Walk {
    fn new(g: &ConvGeometry, taps: &[(usize, usize)]) -> Self {
        if g.out_width < GATHER_BELOW_WIDTH {
            Walk::Gather {
                into_plane: gather_tables(g, taps),
                into_padded: padded_gather_tables(g, taps),
            }
        } else {
            Walk::Rows
        }
    }
}

/// im2col through the padded gather tables (see [`Walk`]).
fn im2col_gather(g: &ConvGeometry, tables: &[Vec<u32>], x: &[f32], images: usize, col: &mut [f32]) {
    let (p, plane_len) = (g.padding, g.height * g.width);
    let padded_width = g.width + 2 * p;
    let mut padded = vec![0f32; padded_width * (g.height + 2 * p)];
    let (hw_out, ncols) = (g.out_pixels(), images * g.out_pixels());
    for img in 0..images {
        for ci in 0..g.in_channels {
            let start = (img * g.in_channels + ci) * plane_len;
            let plane = &x[start..start + plane_len];
            for (iy, src) in plane.chunks(g.width.max(1)).enumerate() {
                let at = (iy + p) * padded_width + p;
                padded[at..at + g.width].copy_from_slice(src);
            }
            for (tap, table) in tables.iter().enumerate() {
                let row = ci * tables.len() + tap;
                let dst = &mut col[row * ncols + img * hw_out..row * ncols + (img + 1) * hw_out];
                for (d, &at) in dst.iter_mut().zip(table) {
                    *d = padded[at as usize];
                }
            }
        }
    }
}

/// im2col of `images` consecutive images: `col[patch_row][image * HoWo + pixel]`.
fn im2col(
    g: &ConvGeometry,
    taps: &[(usize, usize)],
    walk: &Walk,
    x: &[f32],
    images: usize,
    col: &mut [f32],
) {
    if let Walk::Gather { into_padded, .. } = walk {
        im2col_gather(g, into_padded, x, images, col);
        return;
    }
    let (s, p) = (g.stride, g.padding);
    let (hw_out, ncols) = (g.out_pixels(), images * g.out_pixels());
    for img in 0..images {
        let x_img = &x[img * g.in_image_len()..(img + 1) * g.in_image_len()];
        for ci in 0..g.in_channels {
            let plane = &x_img[ci * g.height * g.width..(ci + 1) * g.height * g.width];
            for (tap, &(ki, kj)) in taps.iter().enumerate() {
                let row = ci * taps.len() + tap;
                let dst = &mut col[row * ncols + img * hw_out..row * ncols + (img + 1) * hw_out];
                let (lo, hi) = valid_range(g.out_width, g.width, s, p, kj);
                for oy in 0..g.out_height {
                    let out_row = &mut dst[oy * g.out_width..(oy + 1) * g.out_width];
                    let iy = (oy * s + ki) as isize - p as isize;
                    if iy < 0 || iy >= g.height as isize || lo >= hi {
                        out_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    out_row[..lo].fill(0.0);
                    out_row[hi..].fill(0.0);
                    let ix0 = lo * s + kj - p;
                    if s == 1 {
                        out_row[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                    } else {
                        for (o, v) in out_row[lo..hi].iter_mut().zip(src[ix0..].iter().step_by(s)) {
                            *o = *v;
                        }
                    }
                }
            }
        }
    }
}

/// col2im: adds `col` (laid out as im2col's output) back into `images` consecutive images.
fn col2im_add(
    g: &ConvGeometry,
    taps: &[(usize, usize)],
    walk: &Walk,
    col: &[f32],
    images: usize,
    x: &mut [f32],
) {
    let (s, p) = (g.stride, g.padding);
    let (hw_out, ncols) = (g.out_pixels(), images * g.out_pixels());
    for img in 0..images {
        let x_img = &mut x[img * g.in_image_len()..(img + 1) * g.in_image_len()];
        for ci in 0..g.in_channels {
            let plane = &mut x_img[ci * g.height * g.width..(ci + 1) * g.height * g.width];
            for (tap, &(ki, kj)) in taps.iter().enumerate() {
                let row = ci * taps.len() + tap;
                let src = &col[row * ncols + img * hw_out..row * ncols + (img + 1) * hw_out];
                if let Walk::Gather { into_plane, .. } = walk {
                    for (v, &at) in src.iter().zip(&into_plane[tap]) {
                        if let Some(d) = plane.get_mut(at as usize) {
                            *d += *v;
                        }
                    }
                    continue;
                }
                let (lo, hi) = valid_range(g.out_width, g.width, s, p, kj);
                if lo >= hi {
                    continue;
                }
                for oy in 0..g.out_height {
                    let iy = (oy * s + ki) as isize - p as isize;
                    if iy < 0 || iy >= g.height as isize {
                        continue;
                    }
                    let in_row = &mut plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    let col_row = &src[oy * g.out_width + lo..oy * g.out_width + hi];
                    let ix0 = lo * s + kj - p;
                    if s == 1 {
                        for (d, v) in in_row[ix0..ix0 + (hi - lo)].iter_mut().zip(col_row) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in in_row[ix0..].iter_mut().step_by(s).zip(col_row) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    }
}

/// Output columns `ox` in `lo..hi` read input column `ox*s + kj - p` inside `0..width`.
fn valid_range(out_w: usize, width: usize, s: usize, p: usize, kj: usize) -> (usize, usize) {
    // ox*s + kj >= p  <=>  ox >= ceil((p - kj) / s)
    let lo = if p > kj { (p - kj).div_ceil(s) } else { 0 };
    // ox*s + kj - p <= width - 1  <=>  ox <= (width - 1 + p - kj) / s
    let hi = if width + p > kj {
        ((width - 1 + p - kj) / s + 1).min(out_w)
    } else {
        0
    };
    (lo.min(out_w), hi.max(lo.min(out_w)))
}

/// The weight restricted to the active taps, [Cout, Cin * taps]; None when all taps are active.
fn active_weight(g: &ConvGeometry, taps: &[(usize, usize)], w: &[f32]) -> Option<Vec<f32>> {
    let k = g.kernel;
    if taps.len() == k * k {
        return None;
    }
    let offsets: Vec<usize> = taps.iter().map(|&(ki, kj)| ki * k + kj).collect();
    let mut out = vec![0f32; g.out_channels * g.in_channels * taps.len()];
    // In parallel over whole filters: ResNet's 1x1-map layers pick 1 of 9 taps out of up to
    // 2.4M weights, in the forward and again in the backward pass of every step.
    let filters_per_task = ELEMENTS_PER_TASK.div_ceil(taps.len());
    out.par_chunks_mut(filters_per_task * taps.len())
        .zip(w.par_chunks(filters_per_task * k * k))
        .for_each(|(dst, src)| {
            for (active, filter) in dst
                .chunks_exact_mut(taps.len())
                .zip(src.chunks_exact(k * k))
            {
                for (d, &o) in active.iter_mut().zip(&offsets) {
                    *d = filter[o];
                }
            }
        });
    Some(out)
}

/// Elements per parallel task of the weight gathers.
const ELEMENTS_PER_TASK: usize = 1 << 15;

/// Spreads a gradient over the active taps back to the full [Cout, Cin, K, K] (zeros elsewhere).
fn expand_weight_grad(g: &ConvGeometry, taps: &[(usize, usize)], grad: Vec<f32>) -> Vec<f32> {
    let k = g.kernel;
    if taps.len() == k * k {
        return grad;
    }
    let mut full = vec![0f32; g.out_channels * g.in_channels * k * k];
    for (filter, active) in full.chunks_mut(k * k).zip(grad.chunks(taps.len())) {
        for (&(ki, kj), v) in taps.iter().zip(active) {
            filter[ki * k + kj] = *v;
        }
    }
    full
}

/// GEMM parallelism inside a task: use the threads only when there are too few tasks.
fn inner_threads(tasks: usize) -> usize {
    let threads = rayon::current_num_threads();
    if tasks >= threads {
        1
    } else {
        threads
    }
}

/// Forward, then ReLU if `relu`: Winograd for the 3x3 stride-1 layers it suits, else
/// [`im2col_forward`].
pub fn conv_forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    if winograd::suits(g) {
        return winograd::forward(g, x, w, winograd::Epilogue::Map { bias, relu }).0;
    }
    im2col_forward(g, x, w, bias, relu)
}

/// Forward: `y[n, co, p] = bias[co] + sum_r w[co, r] * col_n[r, p]`, then ReLU if `relu`
/// (applied to each chunk while it is still in cache).
pub fn im2col_forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let plan = ForwardPlan::new(g, w);
    let mut y = zeroed(g.batch * g.out_image_len());
    y.par_chunks_mut(plan.per_chunk * g.out_image_len())
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (chunk, y_chunk)| {
            plan.chunk(x, bias, relu, chunk, y_chunk, scratch);
        });
    y
}

/// A max pooling that follows a convolution: square window, stride, padding (-inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool {
    /// This pooling of the convolution's output for `images` images.
    pub fn geometry(&self, g: &ConvGeometry, images: usize) -> Result<PoolGeometry> {
        PoolGeometry::new(
            (images, g.out_channels, g.out_height, g.out_width),
            self.kernel,
            self.stride,
            self.padding,
        )
    }
}

/// [`conv_forward`] followed by max pooling, each chunk pooled while in cache: the pooled
/// output and, with `keep_indices`, per pooled value the index of its maximum in its conv
/// output plane (the backward pass needs them; inference does not).
pub fn conv_forward_pooled(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
    pool: MaxPool,
    keep_indices: bool,
) -> Result<(Vec<f32>, Option<Vec<u32>>)> {
    if winograd::suits_pooled(g, pool.kernel, pool.stride, pool.padding) {
        let epilogue = winograd::Epilogue::Pooled {
            bias,
            relu,
            indices: keep_indices,
        };
        return Ok(winograd::forward(g, x, w, epilogue));
    }
    let plan = ForwardPlan::new(g, w);
    let pool = pool.geometry(g, g.batch)?;
    let pooled_image = g.out_channels * pool.out_height * pool.out_width;
    let chunk_len = plan.per_chunk * pooled_image;
    let mut y = zeroed(g.batch * pooled_image);
    let run = |(scratch, conv_out): &mut (Scratch, Vec<f32>),
               chunk: usize,
               y_chunk: &mut [f32],
               idx_chunk: Option<&mut [u32]>| {
        let images = y_chunk.len() / pooled_image;
        conv_out.resize(images * g.out_image_len(), 0.0);
        plan.chunk(x, bias, relu, chunk, conv_out, scratch);
        pool_planes(&pool, conv_out, y_chunk, idx_chunk);
    };
    let buffers = || (Scratch::default(), Vec::new());
    if !keep_indices {
        y.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each_init(buffers, |buf, (chunk, y_chunk)| {
                run(buf, chunk, y_chunk, None)
            });
        return Ok((y, None));
    }
    let mut idx = zeroed(y.len());
    y.par_chunks_mut(chunk_len)
        .zip(idx.par_chunks_mut(chunk_len))
        .enumerate()
        .for_each_init(buffers, |buf, (chunk, (y_chunk, idx_chunk))| {
            run(buf, chunk, y_chunk, Some(idx_chunk))
        });
    Ok((y, Some(idx)))
}

/// Per-task buffers, reused across the chunks one task computes.
#[derive(Default)]
struct Scratch {
    col: Vec<f32>,
    gemm_out: Vec<f32>,
}

/// What every forward chunk shares: the taps, the weight restricted to them, the chunking.
struct ForwardPlan<'a> {
    g: &'a ConvGeometry,
    taps: Vec<(usize, usize)>,
    walk: Walk,
    weight: std::borrow::Cow<'a, [f32]>,
    per_chunk: usize,
    threads: usize,
}

impl<'a> ForwardPlan<'a> {
    fn new(g: &'a ConvGeometry, w: &'a [f32]) -> Self {
        let taps = g.active_taps();
        let walk = Walk::new(g, &taps);
        let weight = match active_weight(g, &taps, w) {
            Some(active) => std::borrow::Cow::Owned(active),
            None => std::borrow::Cow::Borrowed(w),
        };
        let per_chunk = g.images_per_chunk();
        let threads = inner_threads(g.batch.div_ceil(per_chunk));
        Self {
            g,
            taps,
            walk,
            weight,
            per_chunk,
            threads,
        }
    }

    /// Computes chunk `chunk` (whole images) into `out`, laid out NCHW.
    fn chunk(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        chunk: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let g = self.g;
        let (cout, ckk, hw) = (
            g.out_channels,
            g.in_channels * self.taps.len(),
            g.out_pixels(),
        );
        let first = chunk * self.per_chunk;
        let images = out.len() / g.out_image_len();
        let x_chunk = &x[first * g.in_image_len()..(first + images) * g.in_image_len()];
        let ncols = images * hw;
        let col: &[f32] = if g.is_pointwise() && images == 1 {
            x_chunk
        } else {
            scratch.col.resize(ckk * ncols, 0.0);
            im2col(g, &self.taps, &self.walk, x_chunk, images, &mut scratch.col);
            &scratch.col
        };
        let w_mat = MatRef::row_major(&self.weight, ckk);
        let col_mat = MatRef::row_major(col, ncols);
        if images == 1 {
            // The GEMM writes [Cout, HoWo] straight into the NCHW output, on top of the bias.
            if let Some(b) = bias {
                for (row, bv) in out.chunks_mut(hw).zip(b) {
                    row.fill(*bv);
                }
            }
            sgemm(
                cout,
                hw,
                ckk,
                out,
                hw,
                bias.is_some(),
                w_mat,
                col_mat,
                self.threads,
            );
            if relu {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            return;
        }
        let tmp = &mut scratch.gemm_out;
        tmp.resize(cout * ncols, 0.0);
        sgemm(
            cout,
            ncols,
            ckk,
            tmp,
            ncols,
            false,
            w_mat,
            col_mat,
            self.threads,
        );
        for img in 0..images {
            for co in 0..cout {
                let bv = bias.map_or(0.0, |b| b[co]);
                let src = &tmp[co * ncols + img * hw..co * ncols + (img + 1) * hw];
                let dst = &mut out[(img * cout + co) * hw..(img * cout + co + 1) * hw];
                if relu {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = (*s + bv).max(0.0);
                    }
                } else {
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = *s + bv;
                    }
                }
            }
        }
    }
}

/// Gradients of the convolution; each is computed only when asked for.
pub struct ConvGrads {
    pub x: Option<Vec<f32>>,
    pub w: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

pub fn conv_backward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: &[f32],
    want: (bool, bool, bool),
) -> ConvGrads {
    conv_backward_from(g, x, w, OutputGrad::Dense(grad_y), want)
}

/// The gradient at a convolution's output, as the backward pass receives it.
#[derive(Clone, Copy)]
pub enum OutputGrad<'a> {
    /// One value per output pixel, NCHW.
    Dense(&'a [f32]),
    /// A max pool followed the convolution: the gradient at the pooled output and, per pooled
    /// value, where in its conv output plane the maximum was. Each chunk of images is expanded
    /// to the dense gradient only while in cache, so the full-size (mostly zero) gradient never
    /// exists.
    Pooled {
        pool: &'a PoolGeometry,
        indices: &'a [u32],
        grad: &'a [f32],
    },
}

impl OutputGrad<'_> {
    /// The sum of one output plane's gradient (image `n`, channel `co`).
    fn plane_sum(&self, g: &ConvGeometry, n: usize, co: usize) -> f32 {
        let plane = n * g.out_channels + co;
        match *self {
            OutputGrad::Dense(grad) => {
                let hw = g.out_pixels();
                grad[plane * hw..(plane + 1) * hw].iter().sum()
            }
            OutputGrad::Pooled { pool, grad, .. } => {
                let len = pool.out_height * pool.out_width;
                grad[plane * len..(plane + 1) * len].iter().sum()
            }
        }
    }

    /// Images `first..first + images` as one [Cout, images * HoWo] matrix: the dense gradient
    /// itself when that is one image, else gathered (or expanded from the pooled one) into
    /// `buf`.
    fn chunk<'b>(
        &'b self,
        g: &ConvGeometry,
        first: usize,
        images: usize,
        buf: &'b mut Vec<f32>,
    ) -> &'b [f32] {
        let (cout, hw) = (g.out_channels, g.out_pixels());
        let ncols = images * hw;
        match *self {
            OutputGrad::Dense(grad) => {
                let raw = &grad[first * cout * hw..(first + images) * cout * hw];
                if images == 1 {
                    return raw;
                }
                buf.resize(cout * ncols, 0.0);
                for i in 0..images {
                    for co in 0..cout {
                        let src = &raw[(i * cout + co) * hw..(i * cout + co + 1) * hw];
                        buf[co * ncols + i * hw..co * ncols + (i + 1) * hw].copy_from_slice(src);
                    }
                }
            }
            OutputGrad::Pooled {
                pool,
                indices,
                grad,
            } => {
                let len = pool.out_height * pool.out_width;
                buf.clear();
                buf.resize(cout * ncols, 0.0);
                for i in 0..images {
                    for co in 0..cout {
                        let plane = (first + i) * cout + co;
                        let range = plane * len..(plane + 1) * len;
                        let dst = &mut buf[co * ncols + i * hw..co * ncols + (i + 1) * hw];
                        for (at, gv) in indices[range.clone()].iter().zip(&grad[range]) {
                            dst[*at as usize] += *gv;
                        }
                    }
                }
            }
        }
        buf
    }
}

/// [`conv_backward`] from either form of the output gradient: the weight gradient through
/// Winograd where a 2x2 pool follows a 3x3 stride-1 layer with wide maps, everything else
/// through [`im2col_backward`].
pub fn conv_backward_from(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: OutputGrad,
    want: (bool, bool, bool),
) -> ConvGrads {
    let (want_x, want_w, want_b) = want;
    if let (
        true,
        OutputGrad::Pooled {
            pool,
            indices,
            grad,
        },
    ) = (want_w, grad_y)
    {
        if let Some(grad_w) = winograd::weight_grad_pooled(g, x, pool, indices, grad) {
            let rest = im2col_backward(g, x, w, grad_y, (want_x, false, want_b));
            return ConvGrads {
                w: Some(grad_w),
                ..rest
            };
        }
    }
    im2col_backward(g, x, w, grad_y, want)
}

/// The gradients through im2col: the weight's as a GEMM against im2col, the input's as a GEMM
/// followed by col2im, the bias's as a sum.
pub fn im2col_backward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: OutputGrad,
    want: (bool, bool, bool),
) -> ConvGrads {
    let (want_x, want_w, want_b) = want;
    let taps = g.active_taps();
    let walk = Walk::new(g, &taps);
    let w_active = active_weight(g, &taps, w);
    let w: &[f32] = w_active.as_deref().unwrap_or(w);
    let (cout, ckk, hw) = (g.out_channels, g.in_channels * taps.len(), g.out_pixels());
    let bias = want_b.then(|| {
        (0..cout)
            .into_par_iter()
            .map(|co| (0..g.batch).map(|n| grad_y.plane_sum(g, n, co)).sum())
            .collect()
    });
    if !want_x && !want_w {
        return ConvGrads {
            x: None,
            w: None,
            bias,
        };
    }
    let per_chunk = g.images_per_chunk();
    let chunks = g.batch.div_ceil(per_chunk);
    let groups = chunks.min(WEIGHT_GRAD_GROUPS);
    let chunks_per_group = chunks.div_ceil(groups);
    let images_per_group = chunks_per_group * per_chunk;
    let groups = g.batch.div_ceil(images_per_group);
    let threads = inner_threads(groups);
    let mut grad_x = if want_x {
        zeroed(g.batch * g.in_image_len())
    } else {
        Vec::new()
    };
    let mut partials = if want_w {
        vec![0f32; groups * cout * ckk]
    } else {
        Vec::new()
    };
    let w_t = MatRef::transposed(w, ckk);
    let run_group = |group: usize, gx_group: Option<&mut [f32]>, gw: Option<&mut [f32]>| {
        let first_image = group * images_per_group;
        let last_image = (first_image + images_per_group).min(g.batch);
        let mut gx_group = gx_group;
        let mut gw = gw;
        let mut col_buf = Vec::new();
        let mut gy_buf = Vec::new();
        let mut gcol_buf = Vec::new();
        let mut first_chunk = true;
        let mut img = first_image;
        while img < last_image {
            let images = per_chunk.min(last_image - img);
            let ncols = images * hw;
            let x_chunk = &x[img * g.in_image_len()..(img + images) * g.in_image_len()];
            let gy = grad_y.chunk(g, img, images, &mut gy_buf);
            let gy_mat = MatRef::row_major(gy, ncols);
            if let Some(gw) = gw.as_deref_mut() {
                let col: &[f32] = if g.is_pointwise() && images == 1 {
                    x_chunk
                } else {
                    col_buf.resize(ckk * ncols, 0.0);
                    im2col(g, &taps, &walk, x_chunk, images, &mut col_buf);
                    &col_buf
                };
                let col_t = MatRef::transposed(col, ncols);
                sgemm(
                    cout,
                    ckk,
                    ncols,
                    gw,
                    ckk,
                    !first_chunk,
                    gy_mat,
                    col_t,
                    threads,
                );
            }
            if let Some(gx_group) = gx_group.as_deref_mut() {
                let offset = (img - first_image) * g.in_image_len();
                let gx = &mut gx_group[offset..offset + images * g.in_image_len()];
                if g.is_pointwise() && images == 1 {
                    sgemm(ckk, ncols, cout, gx, ncols, false, w_t, gy_mat, threads);
                } else {
                    gcol_buf.resize(ckk * ncols, 0.0);
                    sgemm(
                        ckk,
                        ncols,
                        cout,
                        &mut gcol_buf,
                        ncols,
                        false,
                        w_t,
                        gy_mat,
                        threads,
                    );
                    col2im_add(g, &taps, &walk, &gcol_buf, images, gx);
                }
            }
            first_chunk = false;
            img += images;
        }
    };
    match (want_x, want_w) {
        (true, true) => grad_x
            .par_chunks_mut(images_per_group * g.in_image_len())
            .zip(partials.par_chunks_mut(cout * ckk))
            .enumerate()
            .for_each(|(group, (gx, gw))| run_group(group, Some(gx), Some(gw))),
        (true, false) => grad_x
            .par_chunks_mut(images_per_group * g.in_image_len())
            .enumerate()
            .for_each(|(group, gx)| run_group(group, Some(gx), None)),
        (false, _) => partials
            .par_chunks_mut(cout * ckk)
            .enumerate()
            .for_each(|(group, gw)| run_group(group, None, Some(gw))),
    }
    let grad_w = want_w.then(|| {
        let mut total = partials[..cout * ckk].to_vec();
        for part in partials.chunks(cout * ckk).skip(1) {
            for (t, v) in total.iter_mut().zip(part) {
                *t += *v;
            }
        }
        expand_weight_grad(g, &taps, total)
    });
    ConvGrads {
        x: want_x.then_some(grad_x),
        w: grad_w,
        bias,
    }
}

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
    /// Whether a backward pass may follow (so the pool's argmax indices are worth keeping).
    pub keep_indices: bool,
    pub pool_indices: Mutex<Option<Vec<u32>>>,
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
        let mut y = conv_forward(&g, x, w, bias, self.relu);
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
        Ok((gx, gw, gb))
    }
}
