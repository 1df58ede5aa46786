//! Winograd F(2x2, 3x3) convolution for 3x3 stride-1 layers on the CPU (Lavin & Gray, 2015):
//! each 2x2 block of output pixels comes from a 4x4 input tile with 16 multiplies per channel
//! pair instead of im2col's 36, as 16 small GEMMs over all the tiles of an image. The output
//! transform can end in bias, ReLU and a 2x2/2 max pool, whose windows are exactly the 2x2
//! output blocks, so the unpooled map is never stored. The input transform works on the image
//! channels-last, 16 channels per vector, the output transform on 16 tiles per vector.
//! (Only the forward pass: as the input gradient, a separate pass from the weight gradient, it
//! ran a baseline step ~2% slower than im2col's shared pass on these 2 cores.)

use super::conv_geometry::ConvGeometry;
use super::gemm::{sgemm, MatRef};
use super::simd::dispatch;
use super::zeroed;
use rayon::prelude::*;

/// Transform points per tile (4x4).
const POINTS: usize = 16;

/// Whether the layer is a 3x3 stride-1 convolution wide and deep enough for the transforms to
/// pay (the baseline's conv2; ResNet's 3x3 layers see maps of 7x7 and less).
pub fn suits(g: &ConvGeometry) -> bool {
    g.kernel == 3
        && g.stride == 1
        && g.padding <= 2
        && g.in_channels >= 8
        && g.out_channels >= 8
        && g.out_height >= 8
        && g.out_width >= 8
}

/// Whether `suits(g)` and the 2x2/2 unpadded max pool that follows lines up with the 2x2
/// output blocks.
pub fn suits_pooled(g: &ConvGeometry, kernel: usize, stride: usize, padding: usize) -> bool {
    suits(g)
        && (kernel, stride, padding) == (2, 2, 0)
        && g.out_height.is_multiple_of(2)
        && g.out_width.is_multiple_of(2)
}

/// What follows the transform back to pixels.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// Bias (optional) and ReLU (optional); the full output map, NCHW.
    Map { bias: Option<&'a [f32]>, relu: bool },
    /// Bias, ReLU, then the 2x2/2 max pool: pooled values, and with indices the position of
    /// each window's maximum in its output plane (ties to the first in row-major order, NaN
    /// wins, as [`super::pool`] does).
    Pooled {
        bias: Option<&'a [f32]>,
        relu: bool,
        indices: bool,
    },
}

/// The filters in the transform domain, laid out for the GEMMs: `u[point][co][ci]` =
/// (G w G^T)[point], input channels padded with zeros to whole lanes.
fn transform_weight(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    let (cout, cin) = (g.out_channels, g.in_channels);
    let cin_p = lanes(cin);
    let mut u = vec![0f32; POINTS * cout * cin_p];
    for co in 0..cout {
        for ci in 0..cin {
            let f = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            // G f: rows f0, (f0 + f1 + f2)/2, (f0 - f1 + f2)/2, f2 (each a row of 3).
            let mut gf = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (f[j], f[3 + j], f[6 + j]);
                gf[0][j] = a;
                gf[1][j] = 0.5 * (a + b + c);
                gf[2][j] = 0.5 * (a - b + c);
                gf[3][j] = c;
            }
            for (i, row) in gf.iter().enumerate() {
                let [a, b, c] = *row;
                let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (j, v) in out.into_iter().enumerate() {
                    u[((4 * i + j) * cout + co) * cin_p + ci] = v;
                }
            }
        }
    }
    u
}

/// Tile counts of one output plane.
fn tiles(g: &ConvGeometry) -> (usize, usize) {
    (g.out_height.div_ceil(2), g.out_width.div_ceil(2))
}

/// Channels (or tiles) per vector lane group: the transforms work on 16 at once (one AVX-512
/// register, two AVX2 ones), channel counts are padded with zeros to a multiple. Against 8,
/// the baseline trained ~9% and inferred ~20% faster on AVX-512, the same on AVX2, same bits.
const LANE: usize = 16;
type Lanes = [f32; LANE];

fn lanes(channels: usize) -> usize {
    channels.next_multiple_of(LANE)
}

/// Per-task buffers: the zero-padded image channels-last `xt[row][col][ci]`, the transformed
/// input `v[point][tile][ci]`, the GEMM output `m[point][co][tile]` (the weight gradient's
/// transformed output gradient, one point at a time), the output transform's pixels, and for
/// the weight gradient which pixel of its tile each pooled value came from.
#[derive(Default)]
struct Scratch {
    xt: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
    pixels: Vec<f32>,
    which: Vec<u32>,
}

#[inline(always)]
fn load(s: &[f32]) -> Lanes {
    let mut out = [0f32; LANE];
    out.copy_from_slice(&s[..LANE]);
    out
}

#[inline(always)]
fn add(mut a: Lanes, b: Lanes) -> Lanes {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

#[inline(always)]
fn sub(mut a: Lanes, b: Lanes) -> Lanes {
    for (x, y) in a.iter_mut().zip(b) {
        *x -= y;
    }
    a
}

/// `B^T` applied to four values (rows or columns of a tile): `d0 - d2, d1 + d2, d2 - d1,
/// d1 - d3`.
#[inline(always)]
fn input_1d([d0, d1, d2, d3]: [Lanes; 4]) -> [Lanes; 4] {
    [sub(d0, d2), add(d1, d2), sub(d2, d1), sub(d1, d3)]
}

/// `A^T` applied to four values: `m0 + m1 + m2, m1 - m2 - m3`.
#[inline(always)]
fn output_1d([m0, m1, m2, m3]: [Lanes; 4]) -> [Lanes; 2] {
    [add(add(m0, m1), m2), sub(sub(m1, m2), m3)]
}

/// B^T down each column j of the 4x4 tile whose top-left pixel's lanes start at `base`.
#[inline(always)]
fn input_tile_columns(xt: &[f32], base: usize, row: usize, pixel: usize) -> [[Lanes; 4]; 4] {
    // Plain inlined calls: array `map`/`from_fn` and closures called four times were left out
    // of line (and so without AVX2), spilling every lane.
    [
        input_1d(load4(xt, base, row)),
        input_1d(load4(xt, base + pixel, row)),
        input_1d(load4(xt, base + 2 * pixel, row)),
        input_1d(load4(xt, base + 3 * pixel, row)),
    ]
}

/// Four lane groups `stride` apart from `base`.
#[inline(always)]
fn load4(buf: &[f32], base: usize, stride: usize) -> [Lanes; 4] {
    [
        load(&buf[base..]),
        load(&buf[base + stride..]),
        load(&buf[base + 2 * stride..]),
        load(&buf[base + 3 * stride..]),
    ]
}

/// A^T m A of 16 tiles: `m` holds the 16 transform points of one output channel,
/// `point` apart, the tiles' lanes starting at `base`; their four pixels top-left, top-right,
/// bottom-left, bottom-right.
#[inline(always)]
fn output_tiles(m: &[f32], base: usize, point: usize) -> [Lanes; 4] {
    // m A along each row i (left and right pixel columns), then A^T down them.
    let r0 = output_1d(load4(m, base, point));
    let r1 = output_1d(load4(m, base + 4 * point, point));
    let r2 = output_1d(load4(m, base + 8 * point, point));
    let r3 = output_1d(load4(m, base + 12 * point, point));
    let [top_left, bottom_left] = output_1d([r0[0], r1[0], r2[0], r3[0]]);
    let [top_right, bottom_right] = output_1d([r0[1], r1[1], r2[1], r3[1]]);
    [top_left, top_right, bottom_left, bottom_right]
}

/// The image channels-last and zero-padded, then B^T d B of every tile, 16 channels at a time.
#[inline(always)]
fn transform_input(
    g: &ConvGeometry,
    x: &[f32],
    n: usize,
    xt: &mut Vec<f32>,
    v: &mut [f32],
    tiles_padded: usize,
) {
    let (th, tw) = tiles(g);
    let cin_p = lanes(g.in_channels);
    let cols = 2 * tw + 2;
    xt.clear();
    xt.resize((2 * th + 2) * cols * cin_p, 0.0);
    let image = g.in_channels * g.height * g.width;
    fill_channels_last(g, &x[n * image..(n + 1) * image], xt);
    for ty in 0..th {
        for tx in 0..tw {
            let t = ty * tw + tx;
            for c in (0..cin_p).step_by(LANE) {
                let row_stride = cols * cin_p;
                let base = (2 * ty * cols + 2 * tx) * cin_p + c;
                let [c0, c1, c2, c3] = input_tile_columns(xt, base, row_stride, cin_p);
                let rows = [
                    [c0[0], c1[0], c2[0], c3[0]],
                    [c0[1], c1[1], c2[1], c3[1]],
                    [c0[2], c1[2], c2[2], c3[2]],
                    [c0[3], c1[3], c2[3], c3[3]],
                ];
                for (i, row) in rows.into_iter().enumerate() {
                    for (j, lanes) in input_1d(row).iter().enumerate() {
                        let at = ((4 * i + j) * tiles_padded + t) * cin_p + c;
                        v[at..at + LANE].copy_from_slice(lanes);
                    }
                }
            }
        }
    }
}

/// The NCHW image into the zeroed, zero-padded channels-last `xt`, 16 channels by 16 pixels
/// at a time: 16 contiguous loads, 16 contiguous stores.
#[inline(always)]
fn fill_channels_last(g: &ConvGeometry, x_img: &[f32], xt: &mut [f32]) {
    let (h, w, p, cin) = (g.height, g.width, g.padding, g.in_channels);
    let cin_p = lanes(cin);
    let cols = 2 * tiles(g).1 + 2;
    let zeros = vec![0f32; w.next_multiple_of(LANE)];
    let mut widened: [Vec<f32>; LANE] = Default::default();
    for c in (0..cin).step_by(LANE) {
        for iy in 0..h {
            for (k, row) in widened.iter_mut().enumerate() {
                let ci = c + k;
                row.clear();
                if ci < cin {
                    row.extend_from_slice(&x_img[(ci * h + iy) * w..(ci * h + iy + 1) * w]);
                }
                row.resize(zeros.len(), 0.0);
            }
            let start = ((iy + p) * cols + p) * cin_p;
            for ix in (0..w).step_by(LANE) {
                let mut block = [[0f32; LANE]; LANE];
                for (lanes, row) in block.iter_mut().zip(&widened) {
                    *lanes = load(&row[ix..]);
                }
                let pixels = xt[start + ix * cin_p..].chunks_exact_mut(cin_p);
                for (q, pixel) in pixels.take(LANE.min(w - ix)).enumerate() {
                    for (d, lanes) in pixel[c..c + LANE].iter_mut().zip(&block) {
                        *d = lanes[q];
                    }
                }
            }
        }
    }
}

/// A^T m A of every tile, 16 tiles at a time, then the epilogue, into the image's NCHW
/// output (and pool indices). `m` is `[point][co][tile]` with `tiles` columns per row (the tile
/// count rounded up to whole lanes); `corners[t]` is tile t's top-left pixel in its plane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_output(
    g: &ConvGeometry,
    m: &[f32],
    tiles_padded: usize,
    corners: &[u32],
    epilogue: Epilogue,
    out: &mut [f32],
    mut idx: Option<&mut [u32]>,
    pixels: &mut Vec<f32>,
) {
    let (th, tw) = tiles(g);
    let tile_count = th * tw;
    let cout = g.out_channels;
    let (ho, wo) = (g.out_height, g.out_width);
    let (bias, relu) = match epilogue {
        Epilogue::Map { bias, relu } | Epilogue::Pooled { bias, relu, .. } => (bias, relu),
    };
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    let point = cout * tiles_padded;
    // Offsets of the four pixels from the tile's corner, in the pool's row-major order.
    let offsets = [0, 1, wo as u32, wo as u32 + 1];
    pixels.clear();
    pixels.resize(4 * tiles_padded, 0.0);
    for co in 0..cout {
        let bv = bias.map_or(0.0, |b| b[co]);
        for t in (0..tiles_padded).step_by(LANE) {
            let mut quad = output_tiles(m, co * tiles_padded + t, point);
            for lanes in &mut quad {
                for v in lanes.iter_mut() {
                    *v = (*v + bv).max(floor);
                }
            }
            match epilogue {
                Epilogue::Map { .. } => {
                    for (q, lanes) in quad.iter().enumerate() {
                        pixels[q * tiles_padded + t..q * tiles_padded + t + LANE]
                            .copy_from_slice(lanes);
                    }
                }
                Epilogue::Pooled { .. } => {
                    // Lane-wise selects (no branches): the winner's value and its offset from
                    // the tile's corner.
                    let mut best = quad[0];
                    let mut offset = [0u32; LANE];
                    for (lanes, step) in quad[1..].iter().zip(&offsets[1..]) {
                        for ((b, o), v) in best.iter_mut().zip(offset.iter_mut()).zip(lanes) {
                            let take = *v > *b || (v.is_nan() && !b.is_nan());
                            *b = if take { *v } else { *b };
                            *o = if take { *step } else { *o };
                        }
                    }
                    let real = LANE.min(tile_count - t.min(tile_count));
                    let at = co * tile_count + t;
                    out[at..at + real].copy_from_slice(&best[..real]);
                    if let Some(positions) = idx.as_deref_mut() {
                        let corner = &corners[t..t + real];
                        for ((p, c), o) in
                            positions[at..at + real].iter_mut().zip(corner).zip(offset)
                        {
                            *p = c + o;
                        }
                    }
                }
            }
        }
        if let Epilogue::Map { .. } = epilogue {
            let plane = &mut out[co * ho * wo..(co + 1) * ho * wo];
            let quarter = |q: usize| &pixels[q * tiles_padded..q * tiles_padded + tile_count];
            for (oy, row) in plane.chunks_exact_mut(wo).enumerate() {
                let (ty, dy) = (oy / 2, oy % 2);
                let left = &quarter(2 * dy)[ty * tw..(ty + 1) * tw];
                let right = &quarter(2 * dy + 1)[ty * tw..(ty + 1) * tw];
                for (pair, (l, r)) in row.chunks_mut(2).zip(left.iter().zip(right)) {
                    pair[0] = *l;
                    if let Some(d) = pair.get_mut(1) {
                        *d = *r;
                    }
                }
            }
        }
    }
}

dispatch! {
    /// One image: input transform, the 16 GEMMs, output transform.
    fn image => image_generic(
        g: &ConvGeometry,
        x: &[f32],
        n: usize,
        u: &[f32],
        corners: &[u32],
        epilogue: Epilogue,
        out: &mut [f32],
        idx: Option<&mut [u32]>,
        s: &mut Scratch,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn image_generic(
    g: &ConvGeometry,
    x: &[f32],
    n: usize,
    u: &[f32],
    corners: &[u32],
    epilogue: Epilogue,
    out: &mut [f32],
    idx: Option<&mut [u32]>,
    s: &mut Scratch,
) {
    let (th, tw) = tiles(g);
    let tile_count = th * tw;
    let tiles_padded = lanes(tile_count);
    let (cin_p, cout) = (lanes(g.in_channels), g.out_channels);
    // The transformed input `v[point][tile][ci]` (tiles beyond the count: never read back).
    s.v.resize(POINTS * tiles_padded * cin_p, 0.0);
    s.m.resize(POINTS * cout * tiles_padded, 0.0);
    transform_input(g, x, n, &mut s.xt, &mut s.v, tiles_padded);
    for point in 0..POINTS {
        let v = &s.v[point * tiles_padded * cin_p..(point + 1) * tiles_padded * cin_p];
        sgemm(
            cout,
            tiles_padded,
            cin_p,
            &mut s.m[point * cout * tiles_padded..(point + 1) * cout * tiles_padded],
            tiles_padded,
            false,
            MatRef::row_major(&u[point * cout * cin_p..(point + 1) * cout * cin_p], cin_p),
            MatRef::transposed(v, cin_p),
            1,
        );
    }
    transform_output(
        g,
        &s.m,
        tiles_padded,
        corners,
        epilogue,
        out,
        idx,
        &mut s.pixels,
    );
}

/// The convolution of every image (NCHW) with weight `w` [Cout, Cin, 3, 3] under `g`
/// (`suits(g)`), through `epilogue`; with the pooled epilogue the output is
/// [B, Cout, Ho/2, Wo/2] and the indices come back when asked for.
pub fn forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    epilogue: Epilogue,
) -> (Vec<f32>, Option<Vec<u32>>) {
    let u = transform_weight(g, w);
    let corners = tile_corners(g);
    let (th, tw) = tiles(g);
    let tiles_per_image = th * tw;
    let cout = g.out_channels;
    let (out_image, want_idx) = match epilogue {
        Epilogue::Map { .. } => (cout * g.out_height * g.out_width, false),
        Epilogue::Pooled { indices, .. } => (cout * tiles_per_image, indices),
    };
    let mut y = zeroed(g.batch * out_image);
    let mut idx: Vec<u32> = if want_idx {
        zeroed(g.batch * out_image)
    } else {
        Vec::new()
    };
    let run = |s: &mut Scratch, n: usize, out: &mut [f32], idx: Option<&mut [u32]>| {
        image(g, x, n, &u, &corners, epilogue, out, idx, s);
    };
    if want_idx {
        y.par_chunks_mut(out_image)
            .zip(idx.par_chunks_mut(out_image))
            .enumerate()
            .for_each_init(Scratch::default, |s, (n, (out, i))| run(s, n, out, Some(i)));
        (y, Some(idx))
    } else {
        y.par_chunks_mut(out_image)
            .enumerate()
            .for_each_init(Scratch::default, |s, (n, out)| run(s, n, out, None));
        (y, None)
    }
}

/// Each tile's top-left pixel in the conv output plane.
fn tile_corners(g: &ConvGeometry) -> Vec<u32> {
    let (th, tw) = tiles(g);
    (0..th)
        .flat_map(|ty| (0..tw).map(move |tx| (2 * ty * g.out_width + 2 * tx) as u32))
        .collect()
}

#[cfg(test)]
mod tests;
mod weight_grad;

pub use weight_grad::weight_grad_pooled;
