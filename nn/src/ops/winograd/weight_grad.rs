//! The Winograd weight gradient of a 3x3 stride-1 convolution followed by a 2x2/2 max pool:
//! it reuses the forward's input transform and tile layout (the parent module's).

use super::super::conv_geometry::WEIGHT_GRAD_GROUPS;
use super::super::gemm::{sgemm, MatRef};
use super::tile_product::{self, tile_product, Operands};
use super::*;

/// The weight gradient of the convolution `g` when the 2x2/2 max pool of [`suits_pooled`]
/// follows it, from the gradient at the pooled output (`grad`, after the ReLU) and each
/// window's argmax (`indices`, positions in the conv output plane); None when Winograd does
/// not suit. dW = G^T (sum over tiles of (A gy A^T) * (B^T d B)) G: the input transform is the
/// forward's, and since a pool window is a tile, each tile's output gradient has a single
/// non-zero pixel, so A gy A^T is the pooled value times one of four fixed patterns. Per image
/// that is 16 products [Cin x tiles] x [tiles x Cout], summed per fixed group of images and the
/// groups added in order (bit-reproducible whatever the thread count).
pub fn weight_grad_pooled(
    g: &ConvGeometry,
    x: &[f32],
    pool: &PoolGeometry,
    indices: &[u32],
    grad: &[f32],
) -> Option<Vec<f32>> {
    let pooled = PooledGrad::new(g, pool, indices, grad)?;
    let (cin, cout) = (g.in_channels, g.out_channels);
    let part_len = POINTS * cout * cin;
    let groups = g.batch.min(WEIGHT_GRAD_GROUPS);
    let per_group = g.batch.div_ceil(groups);
    let mut partials = vec![0f32; groups * part_len];
    let in_tiles = partials
        .par_chunks_mut(part_len)
        .enumerate()
        .map(|(group, part)| {
            let mut s = Scratch::default();
            let images = group * per_group..((group + 1) * per_group).min(g.batch);
            for (k, n) in images.enumerate() {
                weight_image(g, x, n, &pooled, part, k > 0, &mut s);
            }
            !s.outside
        })
        .all(|ok| ok);
    if !in_tiles {
        // An argmax outside its tile: im2col's path takes any index.
        return None;
    }
    let mut total = partials[..part_len].to_vec();
    for part in partials.chunks(part_len).skip(1) {
        for (t, v) in total.iter_mut().zip(part) {
            *t += *v;
        }
    }
    // G^T M G per filter: rows of G^T are (1, 1/2, 1/2, 0), (0, 1/2, -1/2, 0), (0, 1/2, 1/2, 1).
    let gt = |[a, b, c, d]: [f32; 4]| {
        [
            a + 0.5 * b + 0.5 * c,
            0.5 * b - 0.5 * c,
            0.5 * b + 0.5 * c + d,
        ]
    };
    let mut dw = vec![0f32; cout * cin * 9];
    for co in 0..cout {
        for ci in 0..cin {
            let m = |point: usize| total[(point * cin + ci) * cout + co];
            let rows: [[f32; 3]; 4] =
                [0, 1, 2, 3].map(|i| gt([m(4 * i), m(4 * i + 1), m(4 * i + 2), m(4 * i + 3)]));
            let filter = &mut dw[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            for j in 0..3 {
                let [a, b, c] = gt([rows[0][j], rows[1][j], rows[2][j], rows[3][j]]);
                filter[j] = a;
                filter[3 + j] = b;
                filter[6 + j] = c;
            }
        }
    }
    Some(dw)
}

dispatch! {
    /// One image's share of the weight gradient, added to `m` (`[point][ci][co]`; overwritten
    /// when not `accumulate`).
    fn weight_image => weight_image_generic(
        g: &ConvGeometry,
        x: &[f32],
        n: usize,
        pooled: &PooledGrad,
        m: &mut [f32],
        accumulate: bool,
        s: &mut Scratch,
    )
}

#[inline(always)]
fn weight_image_generic(
    g: &ConvGeometry,
    x: &[f32],
    n: usize,
    pooled: &PooledGrad,
    m: &mut [f32],
    accumulate: bool,
    s: &mut Scratch,
) {
    let (th, tw) = tiles(g);
    let tile_count = th * tw;
    let (cin, cout) = (g.in_channels, g.out_channels);
    transform_input(g, x, n, &mut s.split, &mut s.v);
    let row_len = v_row(g);
    // Per tile and output channel ([tile][co]: the product's right-hand side has the output
    // channels along its rows, so the transformed input serves as it lies, [ci][tile]), the
    // pooled gradient and which pixel of its tile it came from, q = 2 * dy + dx.
    let wo = g.out_width as u32;
    let plane = n * cout * tile_count..(n + 1) * cout * tile_count;
    let (idx, grad) = (&pooled.indices[plane.clone()], &pooled.grad[plane]);
    s.grad_t.resize(tile_count * cout, 0.0);
    s.which.resize(tile_count * cout, 0);
    for (co, (g_co, i_co)) in grad
        .chunks_exact(tile_count)
        .zip(idx.chunks_exact(tile_count))
        .enumerate()
    {
        for (t, ((gv, at), corner)) in g_co.iter().zip(i_co).zip(&pooled.corners).enumerate() {
            let (q, inside) = tile_pixel(*at, *corner, wo);
            s.grad_t[t * cout + co] = *gv;
            s.which[t * cout + co] = q;
            s.outside |= !inside;
        }
    }
    // One point at a time, so the [tiles x Cout] operand stays in cache.
    let z = &mut s.m;
    z.resize(tile_count * cout, 0.0);
    for point in 0..POINTS {
        let pattern = pooled_pattern(point);
        for ((out, gv), q) in z.iter_mut().zip(&s.grad_t).zip(&s.which) {
            *out = gv * pick(&pattern, *q);
        }
        let m_point = &mut m[point * cin * cout..(point + 1) * cin * cout];
        let v_point = &s.v[point * cin * row_len..(point + 1) * cin * row_len];
        if !tile_product::fits(cout) {
            let (v, z) = (
                MatRef::row_major(v_point, row_len),
                MatRef::row_major(z, cout),
            );
            sgemm(cin, cout, tile_count, m_point, cout, accumulate, v, z, 1);
            continue;
        }
        let ops = Operands {
            lhs: v_point,
            lhs_row: row_len,
            rhs: z,
            rhs_row: cout,
            out: m_point,
            out_row: cout,
        };
        tile_product(cin, tile_count, cout, ops, accumulate);
    }
}
