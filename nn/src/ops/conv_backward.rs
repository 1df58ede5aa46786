//! The backward pass of the CPU convolution: the weight gradient as a GEMM against im2col
//! (summed per fixed group of chunks, in order: bit-reproducible whatever the thread count),
//! the input gradient as a GEMM followed by col2im, the bias gradient as a sum; Winograd for
//! the pooled layers it suits.

use super::conv_dense;
pub use super::conv_geometry::ConvGrads;
use super::conv_geometry::{ConvGeometry, WEIGHT_GRAD_GROUPS};
use super::gemm::{sgemm, MatRef};
use super::im2col::{active_weight, col2im_add, expand_weight_grad, im2col, inner_threads, Walk};
use super::pool::PoolGeometry;
use super::scratch::Scratch;
use super::{winograd, winograd4, zeroed};
use rayon::prelude::*;

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

/// [`conv_backward`] from either form of the output gradient: the dense form on tiny maps,
/// F(4x4, 3x3) on small ones, the weight and input gradients through F(2x2, 3x3) where a 2x2
/// pool follows a 3x3 stride-1 layer with wide maps, everything else through
/// [`im2col_backward`].
pub fn conv_backward_from(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: OutputGrad,
    want: (bool, bool, bool),
) -> ConvGrads {
    if let (true, OutputGrad::Dense(grad)) = (conv_dense::suits(g), grad_y) {
        return conv_dense::backward(g, x, w, grad, want, None);
    }
    let (want_x, want_w, want_b) = want;
    if let (true, OutputGrad::Dense(grad)) = (winograd4::suits(g), grad_y) {
        let grad_x = want_x.then(|| winograd4::input_grad(g, w, grad)).flatten();
        let rest = im2col_backward(g, x, w, grad_y, (want_x && grad_x.is_none(), false, want_b));
        return ConvGrads {
            x: grad_x.or(rest.x),
            w: want_w.then(|| winograd4::weight_grad(g, x, grad)),
            bias: rest.bias,
        };
    }
    if let OutputGrad::Pooled {
        pool,
        indices,
        grad,
    } = grad_y
    {
        // Each through Winograd where it suits, whatever im2col is left to do in one pass.
        let grad_w = want_w
            .then(|| winograd::weight_grad_pooled(g, x, pool, indices, grad))
            .flatten();
        let grad_x = want_x
            .then(|| winograd::input_grad_pooled(g, w, pool, indices, grad))
            .flatten();
        let rest = im2col_backward(
            g,
            x,
            w,
            grad_y,
            (
                want_x && grad_x.is_none(),
                want_w && grad_w.is_none(),
                want_b,
            ),
        );
        return ConvGrads {
            x: grad_x.or(rest.x),
            w: grad_w.or(rest.w),
            bias: rest.bias,
        };
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
        let (mut col_buf, mut gcol_buf) = (Scratch::take(), Scratch::take());
        let mut gy_buf = Vec::new();
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
                    let col = col_buf.sized(ckk * ncols);
                    im2col(g, &taps, &walk, x_chunk, images, col);
                    col
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
                    let gcol = gcol_buf.sized(ckk * ncols);
                    sgemm(ckk, ncols, cout, gcol, ncols, false, w_t, gy_mat, threads);
                    col2im_add(g, &taps, &walk, gcol, images, gx);
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
