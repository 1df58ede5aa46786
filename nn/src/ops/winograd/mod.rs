//! Winograd F(2x2, 3x3) convolution for 3x3 stride-1 layers on the CPU (Lavin & Gray, 2015):
//! each 2x2 block of output pixels comes from a 4x4 input tile with 16 multiplies per channel
//! pair instead of im2col's 36, as 16 small GEMMs over all the tiles of an image. The output
//! transform can end in bias, ReLU and a 2x2/2 max pool, whose windows are exactly the 2x2
//! output blocks, so the unpooled map is never stored. Both transforms work on 16 tiles per
//! vector, the input one straight from the NCHW image.
//! The weight and input gradients of a layer followed by that pool use its tiles (`weight_grad`
//! reuses the input transform, `input_grad` runs the forward backwards).

use super::conv_geometry::ConvGeometry;
use super::pool::PoolGeometry;
use super::simd::dispatch;
use super::zeroed;
use rayon::prelude::*;
use tile_product::{tile_product, Operands};

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
/// (G w G^T)[point].
fn transform_weight(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    let (cout, cin) = (g.out_channels, g.in_channels);
    let mut u = vec![0f32; POINTS * cout * cin];
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
                    u[((4 * i + j) * cout + co) * cin + ci] = v;
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

/// Tiles per vector lane group: the transforms work on 16 at once (one AVX-512 register, two
/// AVX2 ones), tile counts are padded to a multiple. Against 8, the baseline trained ~9% and
/// inferred ~20% faster on AVX-512, the same on AVX2, same bits.
const LANE: usize = 16;
type Lanes = [f32; LANE];

fn lanes(tiles: usize) -> usize {
    tiles.next_multiple_of(LANE)
}

/// Per-task buffers: the input plane split by column parity, the transformed input
/// `v[point][ci][tile]` (in the input gradient: its gradient), the products
/// `m[point][co][tile]` (in the gradients: the transformed output gradient, one point at a
/// time), the output transform's pixels (in the input gradient: the input windows'), the
/// pooled gradient `[tile][co]` (weight gradient) and which pixel of its tile each value came
/// from (`[tile][co]` in the weight gradient, `[co][tile]` in the input gradient), and the
/// input gradient's sums.
#[derive(Default)]
struct Scratch {
    split: SplitPlane,
    v: Vec<f32>,
    m: Vec<f32>,
    pixels: Vec<f32>,
    grad_t: Vec<f32>,
    which: Vec<u32>,
    sums: SplitSums,
    /// Whether an argmax seen so far lay outside its tile (the weight gradient then refuses).
    outside: bool,
}

/// A padded plane's sums with its columns split by parity, as [`SplitPlane`] lays them.
#[derive(Default)]
struct SplitSums {
    even: Vec<f32>,
    odd: Vec<f32>,
}

impl SplitSums {
    /// Both halves `len` long, all zeros.
    fn zero(&mut self, len: usize) {
        for half in [&mut self.even, &mut self.odd] {
            half.clear();
            half.resize(len, 0.0);
        }
    }

    /// The half that holds padded column `x` (at `x / 2` of each row).
    fn half(&mut self, x: usize) -> &mut [f32] {
        if x.is_multiple_of(2) {
            &mut self.even
        } else {
            &mut self.odd
        }
    }
}

/// The gradient at a pooled output: values, each window's argmax in the conv output plane,
/// and each tile's top-left pixel there.
struct PooledGrad<'a> {
    indices: &'a [u32],
    grad: &'a [f32],
    corners: Vec<u32>,
}

impl<'a> PooledGrad<'a> {
    /// The gradient at the pool after the layer `g`, when that pool is the 2x2/2 one of
    /// [`suits_pooled`] and `pool`, `indices` and `grad` describe exactly the layer's tiles;
    /// None otherwise.
    fn new(
        g: &ConvGeometry,
        pool: &PoolGeometry,
        indices: &'a [u32],
        grad: &'a [f32],
    ) -> Option<Self> {
        let (th, tw) = tiles(g);
        let fits = suits_pooled(g, pool.kernel, pool.stride, pool.padding)
            && (pool.planes, pool.height, pool.width)
                == (g.batch * g.out_channels, g.out_height, g.out_width)
            && (pool.out_height, pool.out_width) == (th, tw)
            && indices.len() == g.batch * g.out_channels * th * tw
            && grad.len() == indices.len();
        fits.then(|| PooledGrad {
            indices,
            grad,
            corners: tile_corners(g),
        })
    }

    /// Which pixel of its tile each of image `n`'s values came from (`[co][tile]`, see
    /// [`tile_pixel`]); false if one lies outside its tile.
    fn pixels(&self, g: &ConvGeometry, n: usize, which: &mut Vec<u32>) -> bool {
        let per_image = g.out_channels * self.corners.len();
        let idx = &self.indices[n * per_image..(n + 1) * per_image];
        let wo = g.out_width as u32;
        which.clear();
        let mut inside = true;
        for plane in idx.chunks_exact(self.corners.len()) {
            for (at, corner) in plane.iter().zip(&self.corners) {
                let (q, ok) = tile_pixel(*at, *corner, wo);
                inside &= ok;
                which.push(q);
            }
        }
        inside
    }
}

/// Which pixel of its tile the argmax `at` is, `q = 2 * dy + dx` as [`pooled_pattern`] numbers
/// them, for the tile whose top-left pixel is `corner` in an output plane `wo` wide (even);
/// and whether `at` lies in that tile at all (pool indices from our forward always do).
#[inline(always)]
fn tile_pixel(at: u32, corner: u32, wo: u32) -> (u32, bool) {
    let offset = at.wrapping_sub(corner);
    let (dy, dx) = (u32::from(offset >= wo), offset % 2);
    (2 * dy + dx, offset == dy * wo + dx)
}

/// A e A^T at transform point `point` for a tile whose output gradient `e` is a single 1, at
/// pixel `q = 2 * dy + dx` (index q of the result): the outer product of A's columns
/// (1, 1, 1, 0) (for 0) and (0, 1, -1, -1) (for 1), so 0 or +-1. A pooled value's tile in the
/// transform domain is the value times these.
fn pooled_pattern(point: usize) -> [f32; 4] {
    const A: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
    let (i, j) = (point / 4, point % 4);
    [
        A[0][i] * A[0][j],
        A[0][i] * A[1][j],
        A[1][i] * A[0][j],
        A[1][i] * A[1][j],
    ]
}

/// `pattern[q]` as selects, which vectorize (an indexed load did not).
#[inline(always)]
fn pick(pattern: &[f32; 4], q: u32) -> f32 {
    if q == 0 {
        pattern[0]
    } else if q == 1 {
        pattern[1]
    } else if q == 2 {
        pattern[2]
    } else {
        pattern[3]
    }
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

/// One input plane zero-padded to whole tiles (rows of `2 * tw + 2` pixels) with its columns
/// split by parity: `even[row][k]` = padded column 2k, `odd[row][k]` = padded column 2k + 1.
/// Tile `tx` starts at column 2tx, so pixel column j of 16 neighbouring tiles is 16
/// consecutive values of `even` (j = 0, 2) or `odd` (j = 1, 3), j = 2 and 3 one further on.
#[derive(Default)]
struct SplitPlane {
    /// The input plane (height, width, padding) the halves were zeroed for: only its own
    /// pixels are written while it stays the same, so the border stays zero.
    zeroed_for: Option<(usize, usize, usize)>,
    even: Vec<f32>,
    odd: Vec<f32>,
}

impl SplitPlane {
    /// Pairs per padded row.
    fn pairs(g: &ConvGeometry) -> usize {
        tiles(g).1 + 1
    }

    /// `plane` ([H, W]) split straight from its rows (a row copy into a padded plane first
    /// was a `memcpy` call per row).
    #[inline(always)]
    fn split(&mut self, g: &ConvGeometry, plane: &[f32]) {
        let (th, _) = tiles(g);
        let pairs = Self::pairs(g);
        let (h, w, p) = (g.height, g.width, g.padding);
        let len = (2 * th + 2) * pairs;
        if self.zeroed_for != Some((h, w, p)) {
            self.zeroed_for = Some((h, w, p));
            // A lane group read at the last tiles may run past the last row: zeros.
            for half in [&mut self.even, &mut self.odd] {
                half.clear();
                half.resize(len + LANE, 0.0);
            }
        }
        // Image column ix is padded column ix + p: pixel pair k (columns 2k, 2k + 1) lands at
        // k + p / 2 of one half and k + (p + 1) / 2 of the other.
        let (first, second) = if p.is_multiple_of(2) {
            (&mut self.even, &mut self.odd)
        } else {
            (&mut self.odd, &mut self.even)
        };
        for (iy, row) in plane.chunks_exact(w).take(h).enumerate() {
            let at = (iy + p) * pairs;
            let a = &mut first[at + p / 2..][..w.div_ceil(2)];
            let b = &mut second[at + p.div_ceil(2)..][..w / 2];
            let pixel_pairs = row.chunks_exact(2);
            if let [last] = pixel_pairs.remainder() {
                a[w / 2] = *last;
            }
            for ((a, b), pair) in a.iter_mut().zip(b.iter_mut()).zip(pixel_pairs) {
                *a = pair[0];
                *b = pair[1];
            }
        }
    }

    /// Pixel column `j` of 16 tiles from tile `tx` on, down padded rows `row..row + 4`.
    #[inline(always)]
    fn tile_column(&self, pairs: usize, row: usize, tx: usize, j: usize) -> [Lanes; 4] {
        let half = if j.is_multiple_of(2) {
            &self.even
        } else {
            &self.odd
        };
        load4(half, row * pairs + tx + j / 2, pairs)
    }
}

/// Row length of the transformed input `v[point][ci][tile]`: the tiles rounded up to whole
/// lanes, and a lane more, so that every lane group is stored whole (16-wide stores, no
/// partial copies), the lanes past a tile row's end landing on the next row's first tiles
/// before those are written, or, after the last row, in the slack.
fn v_row(g: &ConvGeometry) -> usize {
    let (th, tw) = tiles(g);
    lanes(th * tw) + LANE
}

/// B^T d B of every tile, 16 tiles of a tile row per vector, into `v[point][ci][tile]` (rows
/// of [`v_row`]): tiles contiguous, so the GEMMs read `v` as it lies and the image needs no
/// channels-last copy.
#[inline(always)]
fn transform_input(
    g: &ConvGeometry,
    x: &[f32],
    n: usize,
    split: &mut SplitPlane,
    v: &mut Vec<f32>,
) {
    let (th, tw) = tiles(g);
    let (h, w, cin) = (g.height, g.width, g.in_channels);
    let image = &x[n * cin * h * w..(n + 1) * cin * h * w];
    let row_len = v_row(g);
    v.resize(POINTS * cin * row_len, 0.0);
    let point_stride = cin * row_len;
    let pairs = SplitPlane::pairs(g);
    for (ci, plane) in image.chunks_exact(h * w).enumerate() {
        split.split(g, plane);
        for ty in 0..th {
            for tx in (0..tw).step_by(LANE) {
                // B^T down each of the tiles' four pixel columns, then B along each row.
                let [c0, c1, c2, c3] = [
                    input_1d(split.tile_column(pairs, 2 * ty, tx, 0)),
                    input_1d(split.tile_column(pairs, 2 * ty, tx, 1)),
                    input_1d(split.tile_column(pairs, 2 * ty, tx, 2)),
                    input_1d(split.tile_column(pairs, 2 * ty, tx, 3)),
                ];
                let at = ci * row_len + ty * tw + tx;
                let rows = [
                    [c0[0], c1[0], c2[0], c3[0]],
                    [c0[1], c1[1], c2[1], c3[1]],
                    [c0[2], c1[2], c2[2], c3[2]],
                    [c0[3], c1[3], c2[3], c3[3]],
                ];
                for (i, row) in rows.into_iter().enumerate() {
                    for (j, lanes) in input_1d(row).iter().enumerate() {
                        let dst = (4 * i + j) * point_stride + at;
                        v[dst..dst + LANE].copy_from_slice(lanes);
                    }
                }
            }
        }
    }
}

/// The first `real` lanes of `src` to the start of `dst`: a whole fixed-size vector store
/// when all 16 are real (a partial copy of run-time length compiles to a `memcpy` call).
#[inline(always)]
fn store_lanes<T: Copy>(dst: &mut [T], src: &[T; LANE], real: usize) {
    if real == LANE {
        dst[..LANE].copy_from_slice(src);
    } else {
        dst[..real].copy_from_slice(&src[..real]);
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
                    // the tile's corner, as whole values so that they stay in registers.
                    let mut best = quad[0];
                    let mut offset = [0u32; LANE];
                    for (lanes, &step) in quad[1..].iter().zip(&offsets[1..]) {
                        let (mut next, mut next_offset) = ([0f32; LANE], [0u32; LANE]);
                        for l in 0..LANE {
                            let (v, b) = (lanes[l], best[l]);
                            // All ones where v wins: bit masks and non-short-circuit logic, no
                            // branches, which the compiler turned into masked stores through
                            // the stack and reloads, or into scalar code.
                            let take = u32::from((v > b) | (v.is_nan() & !b.is_nan()));
                            let mask = take.wrapping_neg();
                            next[l] = f32::from_bits((v.to_bits() & mask) | (b.to_bits() & !mask));
                            next_offset[l] = (step & mask) | (offset[l] & !mask);
                        }
                        (best, offset) = (next, next_offset);
                    }
                    let at = co * tile_count + t;
                    let real = LANE.min(tile_count - t);
                    store_lanes(&mut out[at..], &best, real);
                    if let Some(idx) = idx.as_deref_mut() {
                        let mut positions = [0u32; LANE];
                        for ((p, c), o) in positions.iter_mut().zip(&corners[t..]).zip(offset) {
                            *p = c + o;
                        }
                        store_lanes(&mut idx[at..], &positions, real);
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
    let (cin, cout) = (g.in_channels, g.out_channels);
    // The transformed input `v[point][ci][tile]` (tiles beyond the count: never read back).
    s.m.resize(POINTS * cout * tiles_padded, 0.0);
    transform_input(g, x, n, &mut s.split, &mut s.v);
    let row_len = v_row(g);
    for point in 0..POINTS {
        let ops = Operands {
            lhs: &u[point * cout * cin..(point + 1) * cout * cin],
            lhs_row: cin,
            rhs: &s.v[point * cin * row_len..(point + 1) * cin * row_len],
            rhs_row: row_len,
            out: &mut s.m[point * cout * tiles_padded..(point + 1) * cout * tiles_padded],
            out_row: tiles_padded,
        };
        tile_product(cout, cin, tiles_padded, ops, false);
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

mod input_grad;
#[cfg(test)]
mod tests;
mod tile_product;
mod weight_grad;

pub use input_grad::input_grad_pooled;
pub use weight_grad::weight_grad_pooled;
