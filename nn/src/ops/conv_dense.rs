//! Convolutions on feature maps so small that nearly every kernel tap lands on the image for
//! every output pixel (ResNet's 2x2 and 1x1 layers), computed as one dense layer between
//! flattened images: `y[n, (co, p)] = sum_(ci, q) x[n, (ci, q)] * u[(co, p), (ci, q)]`. The
//! "unrolled" weight `u` holds `w[co, ci, tap]` where that tap links output pixel `p` to input
//! pixel `q`, zero where no tap does. NCHW images already are those flat rows, so there is no
//! im2col, no col2im and no output scatter; and the taps that only read padding (56% of the
//! multiply-adds of a 3x3 layer on a 2x2 map) are never computed.

use super::conv_backward::ConvGrads;
use super::conv_geometry::{valid_range, ConvGeometry};
use super::gemm::{sgemm_column_parallel, MatRef};
use super::zeroed;
use rayon::prelude::*;

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

/// Per output pixel, the `(tap, input pixel)` pairs that link it to the image.
fn links(g: &ConvGeometry) -> Vec<Vec<(usize, usize)>> {
    (0..g.out_pixels())
        .map(|p| {
            let (oy, ox) = (p / g.out_width, p % g.out_width);
            let mut pairs = Vec::with_capacity(g.kernel * g.kernel);
            for ki in 0..g.kernel {
                for kj in 0..g.kernel {
                    let iy = (oy * g.stride + ki).checked_sub(g.padding);
                    let ix = (ox * g.stride + kj).checked_sub(g.padding);
                    if let (Some(iy), Some(ix)) = (iy, ix) {
                        if iy < g.height && ix < g.width {
                            pairs.push((ki * g.kernel + kj, iy * g.width + ix));
                        }
                    }
                }
            }
            pairs
        })
        .collect()
}

/// The unrolled weight, row-major `[Cout * HoWo, Cin * HW]`, one output channel per task.
fn unroll(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    let links = links(g);
    let (cols, in_pixels, taps) = (g.in_image_len(), g.height * g.width, g.kernel * g.kernel);
    let mut u = zeroed(g.out_image_len() * cols);
    u.par_chunks_mut(g.out_pixels() * cols)
        .zip(w.par_chunks(g.in_channels * taps))
        .for_each(|(u_co, w_co)| {
            for (ci, w_tap) in w_co.chunks_exact(taps).enumerate() {
                for (p, pairs) in links.iter().enumerate() {
                    let row = &mut u_co[p * cols + ci * in_pixels..][..in_pixels];
                    for &(tap, q) in pairs {
                        row[q] = w_tap[tap];
                    }
                }
            }
        });
    u
}

/// Column ranges per GEMM: one single-threaded part per thread (bit-identical to one part).
fn parts() -> usize {
    rayon::current_num_threads()
}

/// Forward: bias (optional), then ReLU if `relu`; NCHW out.
pub fn forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
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
        parts(),
    );
    if relu {
        y.par_chunks_mut(rows)
            .for_each(|image| image.iter_mut().for_each(|v| *v = v.max(0.0)));
    }
    y
}

/// The gradients for the output gradient `grad_y` (NCHW); each only when `want` asks for it.
pub fn backward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    grad_y: &[f32],
    (want_x, want_w, want_b): (bool, bool, bool),
) -> ConvGrads {
    let (rows, cols) = (g.out_image_len(), g.in_image_len());
    let grad_x = want_x.then(|| {
        let u = unroll(g, w);
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
            parts(),
        );
        gx
    });
    let grad_w = want_w.then(|| {
        let mut gu = zeroed(rows * cols);
        sgemm_column_parallel(
            rows,
            cols,
            g.batch,
            &mut gu,
            cols,
            false,
            MatRef::transposed(grad_y, rows),
            MatRef::row_major(x, cols),
            parts(),
        );
        fold(g, &gu)
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
    let links = links(g);
    let (cols, in_pixels, taps) = (g.in_image_len(), g.height * g.width, g.kernel * g.kernel);
    let mut gw = zeroed(g.out_channels * g.in_channels * taps);
    gw.par_chunks_mut(g.in_channels * taps)
        .zip(gu.par_chunks(g.out_pixels() * cols))
        .for_each(|(gw_co, gu_co)| {
            for (ci, gw_tap) in gw_co.chunks_exact_mut(taps).enumerate() {
                for (p, pairs) in links.iter().enumerate() {
                    let row = &gu_co[p * cols + ci * in_pixels..][..in_pixels];
                    for &(tap, q) in pairs {
                        gw_tap[tap] += row[q];
                    }
                }
            }
        });
    gw
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
