//! Convolutions on feature maps so small that nearly every kernel tap lands on the image for
//! every output pixel (ResNet's 2x2 and 1x1 layers), computed as one dense layer between
//! flattened images: `y[n, (co, p)] = sum_(ci, q) x[n, (ci, q)] * u[(co, p), (ci, q)]`. The
//! "unrolled" weight `u` holds `w[co, ci, tap]` where that tap links output pixel `p` to input
//! pixel `q`, zero where no tap does. NCHW images already are those flat rows, so there is no
//! im2col, no col2im and no output scatter; and the taps that only read padding (56% of the
//! multiply-adds of a 3x3 layer on a 2x2 map) are never computed.

use super::conv_geometry::{valid_range, ConvGeometry, ConvGrads};
use super::gemm::{sgemm_column_parallel, MatRef};
use super::scratch::Scratch;
use super::zeroed;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Least share of real taps in the unrolled weight for the dense form to pay: below it, the
/// zeros cost more multiply-adds than im2col's padding taps and gathers save.
const MIN_DENSITY: usize = 3; // out of DENSITY_SCALE
const DENSITY_SCALE: usize = 4;
/// Largest unrolled weight (elements) worth building on every pass (16 MiB).
const MAX_UNROLLED: usize = 1 << 22;

/// Whether the dense form suits the layer: the unrolled weight is small and at least 3/4 of it
/// is real taps.
pub fn suits(g: &ConvGeometry) -> bool {
    let (rows, cols) = (g.out_image_len(), g.in_image_len());
    if rows == 0 || cols == 0 || rows.saturating_mul(cols) > MAX_UNROLLED {
        return false;
    }
    // Per channel pair: (output pixel, input pixel) pairs a tap links, against all of them.
    let linked = tap_span(g.out_height, g.height, g) * tap_span(g.out_width, g.width, g);
    let all = g.out_pixels() * g.height * g.width;
    linked * DENSITY_SCALE >= all * MIN_DENSITY
}

/// Over all kernel rows (or columns), how many output rows land inside the image.
fn tap_span(out_len: usize, in_len: usize, g: &ConvGeometry) -> usize {
    (0..g.kernel)
        .map(|k| {
            let (lo, hi) = valid_range(out_len, in_len, g.stride, g.padding, k);
            hi - lo
        })
        .sum()
}

/// Per (output pixel, input pixel) pair, the tap that links them (`None`: none does).
fn tap_table(g: &ConvGeometry) -> Vec<Option<usize>> {
    let in_pixels = g.height * g.width;
    let mut table = vec![None; g.out_pixels() * in_pixels];
    for (p, row) in table.chunks_exact_mut(in_pixels).enumerate() {
        let (oy, ox) = (p / g.out_width, p % g.out_width);
        for ki in 0..g.kernel {
            for kj in 0..g.kernel {
                let iy = (oy * g.stride + ki).checked_sub(g.padding);
                let ix = (ox * g.stride + kj).checked_sub(g.padding);
                if let (Some(iy), Some(ix)) = (iy, ix) {
                    if iy < g.height && ix < g.width {
                        row[iy * g.width + ix] = Some(ki * g.kernel + kj);
                    }
                }
            }
        }
    }
    table
}

/// A vector of `count` chunks of `chunk` values, each written once, in parallel, by
/// `fill(index, chunk)`, which must write every slot of its chunk. These buffers are megabytes
/// (the unrolled weight, a layer4 weight gradient): zeroing them first and then writing them
/// would cost a second pass over memory.
fn write_once(
    count: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let len = count * chunk;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(index, slots)| fill(index, slots));
    // SAFETY: the first `len` slots are `count` whole chunks, and each `fill` below writes
    // every slot of its chunk (its loops run over the chunk's full extent).
    unsafe { out.set_len(len) };
    out
}

/// The unrolled weight, row-major `[Cout * HoWo, Cin * HW]`, one output channel per task.
fn unroll(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    let table = tap_table(g);
    let (cin, in_pixels, taps) = (g.in_channels, g.height * g.width, g.kernel * g.kernel);
    let per_co = g.out_pixels() * cin * in_pixels;
    write_once(g.out_channels, per_co, |co, u_co| {
        let w_co = &w[co * cin * taps..(co + 1) * cin * taps];
        for (links, u_p) in table
            .chunks_exact(in_pixels)
            .zip(u_co.chunks_exact_mut(cin * in_pixels))
        {
            for (w_tap, u_ci) in w_co.chunks_exact(taps).zip(u_p.chunks_exact_mut(in_pixels)) {
                for (slot, tap) in u_ci.iter_mut().zip(links) {
                    slot.write(tap.map_or(0.0, |t| w_tap[t]));
                }
            }
        }
    })
}

/// Column ranges per GEMM, each a single-threaded GEMM. A fixed count, not the thread count:
/// the GEMM's blocking depends on the part's width, so the bits would otherwise depend on how
/// many threads the machine has.
const PARTS: usize = 8;

/// Forward: bias (optional), then ReLU if `relu`; NCHW out.
pub fn forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    forward_unrolled(g, x, w, bias, relu).0
}

/// [`forward`], also returning the unrolled weight for the backward pass to reuse.
pub fn forward_unrolled(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (rows, cols) = (g.out_image_len(), g.in_image_len());
    let u = unroll(g, w);
    let mut y = zeroed(g.batch * rows);
    if let Some(b) = bias {
        y.par_chunks_mut(rows).for_each(|image| {
            for (plane, bv) in image.chunks_exact_mut(g.out_pixels()).zip(b) {
                plane.fill(*bv);
            }
        });
    }
    sgemm_column_parallel(
        g.batch,
        rows,
        cols,
        &mut y,
        rows,
        bias.is_some(),
        MatRef::row_major(x, cols),
        MatRef::transposed(&u, cols),
        PARTS,
    );
    if relu {
        y.par_chunks_mut(rows)
            .for_each(|image| image.iter_mut().for_each(|v| *v = v.max(0.0)));
    }
    (y, u)
}

/// The gradients for the output gradient `grad_y` (NCHW); each only when `want` asks for it.
/// `unrolled`: the forward pass's unrolled weight, if it kept it.
pub fn backward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: &[f32],
    (want_x, want_w, want_b): (bool, bool, bool),
    unrolled: Option<Vec<f32>>,
) -> ConvGrads {
    let (rows, cols) = (g.out_image_len(), g.in_image_len());
    let grad_x = want_x.then(|| {
        let u = unrolled.unwrap_or_else(|| unroll(g, w));
        let mut gx = zeroed(g.batch * cols);
        sgemm_column_parallel(
            g.batch,
            cols,
            rows,
            &mut gx,
            cols,
            false,
            MatRef::row_major(grad_y, rows),
            MatRef::row_major(&u, cols),
            PARTS,
        );
        gx
    });
    let grad_w = want_w.then(|| {
        let mut gu = Scratch::take();
        let gu = gu.sized(rows * cols);
        sgemm_column_parallel(
            rows,
            cols,
            g.batch,
            gu,
            cols,
            false,
            MatRef::transposed(grad_y, rows),
            MatRef::row_major(x, cols),
            PARTS,
        );
        fold(g, gu)
    });
    let bias = want_b.then(|| {
        let hw = g.out_pixels();
        (0..g.out_channels)
            .into_par_iter()
            .map(|co| {
                (0..g.batch)
                    .map(|n| {
                        let at = n * rows + co * hw;
                        grad_y[at..at + hw].iter().sum::<f32>()
                    })
                    .sum()
            })
            .collect()
    });
    ConvGrads {
        x: grad_x,
        w: grad_w,
        bias,
    }
}

/// The weight gradient `[Cout, Cin, K, K]` from the unrolled weight's: each tap's entries
/// summed over output pixels, in pixel order.
fn fold(g: &ConvGeometry, gu: &[f32]) -> Vec<f32> {
    let table = tap_table(g);
    let (cols, in_pixels, taps) = (g.in_image_len(), g.height * g.width, g.kernel * g.kernel);
    // Per tap, the (output pixel, input pixel) pairs it links, in pixel order.
    let mut pairs = vec![Vec::new(); taps];
    for (i, tap) in table.iter().enumerate() {
        if let Some(t) = tap {
            pairs[*t].push((i / in_pixels, i % in_pixels));
        }
    }
    let per_co = g.in_channels * taps;
    write_once(g.out_channels, per_co, |co, gw_co| {
        let gu_co = &gu[co * g.out_pixels() * cols..(co + 1) * g.out_pixels() * cols];
        for (ci, gw_ci) in gw_co.chunks_exact_mut(taps).enumerate() {
            for (slot, links) in gw_ci.iter_mut().zip(&pairs) {
                let mut sum = 0.0;
                for &(p, q) in links {
                    sum += gu_co[p * cols + ci * in_pixels + q];
                }
                slot.write(sum);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(size: usize, channels: usize, kernel: usize, stride: usize) -> ConvGeometry {
        let padding = kernel / 2;
        ConvGeometry::new(
            (2, channels, size, size),
            (channels, channels, kernel, kernel),
            stride,
            padding,
        )
        .unwrap_or_else(|e| panic!("geometry: {e}"))
    }

    #[test]
    fn takes_resnets_tiny_maps_and_leaves_the_rest() {
        assert!(suits(&geometry(2, 256, 3, 1)), "layer3, 2x2");
        assert!(suits(&geometry(1, 512, 3, 1)), "layer4, 1x1");
        assert!(suits(&geometry(2, 256, 3, 2)), "layer4's strided conv");
        assert!(!suits(&geometry(4, 128, 3, 1)), "layer2, 4x4: 39% dense");
        assert!(!suits(&geometry(4, 128, 3, 2)), "layer3's strided conv");
        assert!(!suits(&geometry(2, 256, 1, 2)), "layer4's downsample: 25%");
        assert!(!suits(&geometry(7, 64, 3, 1)), "layer1");
    }
}
