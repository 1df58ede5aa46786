//! The Winograd input gradient of a 3x3 stride-1 convolution followed by a 2x2/2 max pool:
//! the forward's tile computation run backwards (its adjoint). A pool window is a tile, so a
//! tile's output gradient is one pooled value at one of its four pixels and A dY A^T is that
//! value times one of four fixed patterns (as in the weight gradient). Per transform point the
//! products sum over the output channels with the filters transposed, [Cin x Cout] x
//! [Cout x tiles]; B (.) B^T takes each tile back to its 4x4 input window, and the windows,
//! which overlap by two pixels, are summed into the input plane. The forward's 16 multiplies
//! per channel pair and tile, on the forward's tiles, and the gradient is never expanded to
//! the unpooled map.

use super::*;

/// The gradient at the input of the convolution `g`, from the gradient at the pooled output
/// (`grad`, after the ReLU) and each window's argmax (`indices`, positions in the conv output
/// plane); None when Winograd does not suit the layer or an index lies outside its window
/// (im2col's path takes any index, and reports those off the plane).
pub fn input_grad_pooled(
    g: &ConvGeometry,
    w: &[f32],
    pool: &PoolGeometry,
    indices: &[u32],
    grad: &[f32],
) -> Option<Vec<f32>> {
    let pooled = PooledGrad::new(g, pool, indices, grad)?;
    let (cin, cout) = (g.in_channels, g.out_channels);
    // The filters in the transform domain with their channels swapped: `[point][ci][co]`.
    let u = transform_weight(g, w);
    let mut u_t = vec![0f32; u.len()];
    for (u_p, t_p) in u
        .chunks_exact(cout * cin)
        .zip(u_t.chunks_exact_mut(cin * cout))
    {
        for (co, row) in u_p.chunks_exact(cin).enumerate() {
            for (ci, v) in row.iter().enumerate() {
                t_p[ci * cout + co] = *v;
            }
        }
    }
    let image_len = g.in_image_len();
    let mut dx = zeroed(g.batch * image_len);
    let in_windows = dx
        .par_chunks_mut(image_len)
        .enumerate()
        .map_init(Scratch::default, |s, (n, out)| {
            let in_windows = pooled.pixels(g, n, &mut s.which);
            if in_windows {
                input_image(g, &u_t, n, pooled.grad, out, s);
            }
            in_windows
        })
        .all(|ok| ok);
    in_windows.then_some(dx)
}

dispatch! {
    /// Image `n`'s input gradient into `out` ([Cin, H, W]), `s.which` holding where its
    /// pooled values came from.
    fn input_image => input_image_generic(
        g: &ConvGeometry,
        u_t: &[f32],
        n: usize,
        grad: &[f32],
        out: &mut [f32],
        s: &mut Scratch,
    )
}

#[inline(always)]
fn input_image_generic(
    g: &ConvGeometry,
    u_t: &[f32],
    n: usize,
    grad: &[f32],
    out: &mut [f32],
    s: &mut Scratch,
) {
    let (th, tw) = tiles(g);
    let tile_count = th * tw;
    let row = lanes(tile_count);
    let (cin, cout) = (g.in_channels, g.out_channels);
    let grad = &grad[n * cout * tile_count..(n + 1) * cout * tile_count];
    // The gradient at the products' output, one point at a time, `z[co][tile]`; the padding
    // tiles stay zero.
    let z = &mut s.m;
    z.clear();
    z.resize(cout * row, 0.0);
    s.v.resize(POINTS * cin * row, 0.0);
    for point in 0..POINTS {
        let pattern = pooled_pattern(point);
        for ((z_co, g_co), q_co) in z
            .chunks_exact_mut(row)
            .zip(grad.chunks_exact(tile_count))
            .zip(s.which.chunks_exact(tile_count))
        {
            for ((z, gv), q) in z_co.iter_mut().zip(g_co).zip(q_co) {
                *z = gv * pick(&pattern, *q);
            }
        }
        let ops = Operands {
            lhs: &u_t[point * cin * cout..(point + 1) * cin * cout],
            lhs_row: cout,
            rhs: z,
            rhs_row: row,
            out: &mut s.v[point * cin * row..(point + 1) * cin * row],
            out_row: row,
        };
        tile_product(cin, cout, row, ops, false);
    }
    let (h, w, p) = (g.height, g.width, g.padding);
    let pairs = tw + 1;
    s.pixels.resize(POINTS * row, 0.0);
    for (ci, plane) in out.chunks_exact_mut(h * w).enumerate() {
        windows(&s.v, ci * row, cin * row, row, &mut s.pixels);
        // The padded plane's sums, its columns split by parity as the forward reads them.
        let sums = &mut s.sums;
        sums.zero((2 * th + 2) * pairs);
        for ty in 0..th {
            for r in 0..4 {
                let at = (2 * ty + r) * pairs;
                for c in 0..4 {
                    let src = &s.pixels[(4 * r + c) * row + ty * tw..][..tw];
                    for (d, v) in sums.half(c)[at + c / 2..][..tw].iter_mut().zip(src) {
                        *d += *v;
                    }
                }
            }
        }
        for (iy, out_row) in plane.chunks_exact_mut(w).enumerate() {
            let at = (iy + p) * pairs;
            for (ix, v) in out_row.iter_mut().enumerate() {
                let x = ix + p;
                *v = sums.half(x)[at + x / 2];
            }
        }
    }
}

/// B^T's transpose applied to four values: `y0, y1 - y2 + y3, y1 + y2 - y0, -y3`.
#[inline(always)]
fn window_1d([y0, y1, y2, y3]: [Lanes; 4]) -> [Lanes; 4] {
    let mut neg = y3;
    for v in &mut neg {
        *v = -*v;
    }
    [y0, add(sub(y1, y2), y3), sub(add(y1, y2), y0), neg]
}

/// B dV B^T of every tile of one input channel: `dv` holds its 16 points `point` apart from
/// `base` (tiles along rows of `row`), `out` gets the 16 pixels of each tile's 4x4 input
/// window, `[pixel][tile]`.
#[inline(always)]
fn windows(dv: &[f32], base: usize, point: usize, row: usize, out: &mut [f32]) {
    for t in (0..row).step_by(LANE) {
        let at = base + t;
        // Along each row i of points, then down each column of the results.
        let r0 = window_1d(load4(dv, at, point));
        let r1 = window_1d(load4(dv, at + 4 * point, point));
        let r2 = window_1d(load4(dv, at + 8 * point, point));
        let r3 = window_1d(load4(dv, at + 12 * point, point));
        for c in 0..4 {
            for (r, lanes) in window_1d([r0[c], r1[c], r2[c], r3[c]]).iter().enumerate() {
                let dst = (4 * r + c) * row + t;
                out[dst..dst + LANE].copy_from_slice(lanes);
            }
        }
    }
}
