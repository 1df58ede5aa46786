//! CPU 2-D convolution as a candle custom op: im2col + GEMM forward with a fused bias, and a
//! backward that computes the weight gradient as a GEMM against im2col, the input gradient as
//! a GEMM followed by col2im, and the bias gradient as a sum (instead of candle's slow
//! conv_transpose2d path).
//!
//! The batch is cut into chunks of whole images, wide enough (in output pixels) for the GEMM to
//! run efficiently even where the feature maps are tiny (ResNet's deep layers); chunks run in
//! parallel. Weight gradients are summed per fixed group of chunks and the groups added in
//! order, so the result does not depend on how rayon schedules the work (bit-reproducible).

use super::conv_dense;
use super::conv_geometry::{ConvGeometry, MaxPool};
use super::gemm::{sgemm, MatRef};
use super::im2col::{active_weight, im2col, inner_threads, Walk};
use super::pool::pool_planes;
use super::scratch::Scratch;
use super::zeroed;
use super::{winograd, winograd4};
use candle_core::Result;
use rayon::prelude::*;

/// Forward, then ReLU if `relu`: the dense form on tiny maps, Winograd F(4x4, 3x3) on small
/// ones and F(2x2, 3x3) on wide ones for the 3x3 stride-1 layers they suit, else
/// [`im2col_forward`].
pub fn conv_forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    if conv_dense::suits(g) {
        return conv_dense::forward(g, x, w, bias, relu);
    }
    if winograd4::suits(g) {
        return winograd4::forward(g, x, w, bias, relu);
    }
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
        .for_each_init(ChunkBuffers::take, |scratch, (chunk, y_chunk)| {
            plan.chunk(x, bias, relu, chunk, y_chunk, scratch);
        });
    y
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
    let run = |(scratch, conv_out): &mut (ChunkBuffers, Scratch),
               chunk: usize,
               y_chunk: &mut [f32],
               idx_chunk: Option<&mut [u32]>| {
        let images = y_chunk.len() / pooled_image;
        let conv_out = conv_out.sized(images * g.out_image_len());
        plan.chunk(x, bias, relu, chunk, conv_out, scratch);
        pool_planes(&pool, conv_out, y_chunk, idx_chunk);
    };
    let buffers = || (ChunkBuffers::take(), Scratch::take());
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

/// Per-task buffers, reused across the chunks one task computes (and from the thread's
/// scratch pool, across calls).
struct ChunkBuffers {
    col: Scratch,
    gemm_out: Scratch,
}

impl ChunkBuffers {
    fn take() -> Self {
        Self {
            col: Scratch::take(),
            gemm_out: Scratch::take(),
        }
    }
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
        scratch: &mut ChunkBuffers,
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
            let col = scratch.col.sized(ckk * ncols);
            im2col(g, &self.taps, &self.walk, x_chunk, images, col);
            col
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
        let tmp = scratch.gemm_out.sized(cout * ncols);
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
