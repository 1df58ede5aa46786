//! Winograd F(4x4, 3x3) for the 3x3 stride-1 convolutions on small maps (ResNet's 7x7 and
//! 4x4 layers; Lavin & Gray, 2015): each 4x4 block of output pixels comes from a 6x6 input
//! tile with 36 multiplies per channel pair instead of 144, 3-4x fewer than im2col on these
//! maps. The tiles of many images go through the 36 GEMMs together, so they stay wide where an
//! image has a single tile. Tiles are the vector lanes of both transforms: the transformed
//! input is `v[ci][point][tile]`, the GEMM output `m[point][co][tile]`.
//!
//! The input gradient is the same convolution of the output gradient with the filters flipped
//! and their channels swapped ([`input_grad`]); the weight gradient is taken in the transform
//! domain, by the same GEMMs over tiles ([`weight_grad`]).

use super::conv_geometry::ConvGeometry;
use super::gemm::{sgemm, MatRef};
use super::scratch::Scratch;
use super::simd::dispatch;
use super::{zeroed, SharedDst};
use rayon::prelude::*;

/// Transform points per tile (6x6).
const POINTS: usize = 36;
/// Output pixels per tile side, input pixels per tile window side.
const TILE: usize = 4;
const WINDOW: usize = 6;
/// Tiles per vector in the transforms.
const LANES: usize = 16;
/// Tiles per pass (input transform, GEMMs, output transform): a constant, so the work and so
/// the bits never depend on the thread count.
const CHUNK_TILES: usize = 256;

type Lanes = [f32; LANES];

/// Whether the layer is a 3x3 stride-1 convolution on a map small enough (4x4 to 8x8 output)
/// for these tiles, with channels enough for the GEMMs to dominate the transforms.
pub fn suits(g: &ConvGeometry) -> bool {
    g.kernel == 3
        && g.stride == 1
        && g.padding <= 2
        && g.in_channels >= 8
        && g.out_channels >= 8
        && (TILE..=2 * TILE).contains(&g.out_height)
        && (TILE..=2 * TILE).contains(&g.out_width)
}

/// G of F(4x4, 3x3): the filter transform's 6x3 matrix.
const G: [[f32; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The filters in the transform domain, `u[co][point][ci]` = (G f G^T)[point] for the filter
/// `f = w[co][ci]` (or, with `flipped`, `w[ci][co]` rotated by 180 degrees: the input
/// gradient's filters, where `co`/`ci` are the forward's input/output channels). One task per
/// output channel, 16 input channels per vector.
fn transform_weight(cout: usize, cin: usize, w: &[f32], flipped: bool) -> Vec<f32> {
    let mut u = zeroed(cout * POINTS * cin);
    u.par_chunks_mut(POINTS * cin)
        .enumerate()
        .for_each(|(co, u_co)| filters(co, cout, cin, w, flipped, u_co));
    u
}

dispatch! {
    fn filters => filters_generic(
    co: usize,
    cout: usize,
    cin: usize,
    w: &[f32],
    flipped: bool,
    u_co: &mut [f32],
    )
}

/// [`transform_weight`] for output channel `co`, into `u_co[point][ci]`.
#[inline(always)]
fn filters_generic(co: usize, cout: usize, cin: usize, w: &[f32], flipped: bool, u_co: &mut [f32]) {
    for ci0 in (0..cin).step_by(LANES) {
        let lanes = LANES.min(cin - ci0);
        let mut f = [[[0f32; LANES]; 3]; 3];
        for (a, row) in f.iter_mut().enumerate() {
            for (b, tap) in row.iter_mut().enumerate() {
                for (lane, v) in tap.iter_mut().enumerate().take(lanes) {
                    let ci = ci0 + lane;
                    *v = if flipped {
                        w[(ci * cout + co) * 9 + (2 - a) * 3 + (2 - b)]
                    } else {
                        w[(co * cin + ci) * 9 + a * 3 + b]
                    };
                }
            }
        }
        let mut gf = [[[0f32; LANES]; 3]; WINDOW];
        for (i, row) in gf.iter_mut().enumerate() {
            for (c, out) in row.iter_mut().enumerate() {
                for l in 0..LANES {
                    out[l] = G[i][0] * f[0][c][l] + G[i][1] * f[1][c][l] + G[i][2] * f[2][c][l];
                }
            }
        }
        for (i, gf_row) in gf.iter().enumerate() {
            for (j, g_row) in G.iter().enumerate() {
                let mut out = [0f32; LANES];
                for (l, o) in out.iter_mut().enumerate() {
                    *o =
                        gf_row[0][l] * g_row[0] + gf_row[1][l] * g_row[1] + gf_row[2][l] * g_row[2];
                }
                let at = (i * WINDOW + j) * cin + ci0;
                u_co[at..at + lanes].copy_from_slice(&out[..lanes]);
            }
        }
    }
}

/// Where the tiles are: tiles per image and per row, and each tile's window origin.
struct Tiling {
    per_row: usize,
    per_image: usize,
}

impl Tiling {
    fn new(g: &ConvGeometry) -> Self {
        let per_row = g.out_width.div_ceil(TILE);
        Self {
            per_row,
            per_image: g.out_height.div_ceil(TILE) * per_row,
        }
    }

    /// Tile `t`'s image and the position of its top-left output pixel.
    fn locate(&self, t: usize) -> (usize, usize, usize) {
        let (n, k) = (t / self.per_image, t % self.per_image);
        (n, TILE * (k / self.per_row), TILE * (k % self.per_row))
    }
}

/// `B^T` applied to six lane vectors (rows or columns of a window).
#[inline(always)]
fn input_1d(d: &[Lanes; 6]) -> [Lanes; 6] {
    let mut b = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
        b[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        b[1][l] = -4.0 * d1 - 4.0 * d2 + d3 + d4;
        b[2][l] = 4.0 * d1 - 4.0 * d2 - d3 + d4;
        b[3][l] = -2.0 * d1 - d2 + 2.0 * d3 + d4;
        b[4][l] = 2.0 * d1 - d2 - 2.0 * d3 + d4;
        b[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    b
}

/// `A^T` applied to six lane vectors.
#[inline(always)]
fn output_1d(m: &[Lanes; 6]) -> [Lanes; 4] {
    let mut o = [[0f32; LANES]; 4];
    for l in 0..LANES {
        let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
        o[0][l] = m0 + m1 + m2 + m3 + m4;
        o[1][l] = m1 - m2 + 2.0 * m3 - 2.0 * m4;
        o[2][l] = m1 + m2 + 4.0 * m3 + 4.0 * m4;
        o[3][l] = m1 - m2 + 8.0 * m3 - 8.0 * m4 + m5;
    }
    o
}

/// Which transform a block of tiles goes through.
#[derive(Clone, Copy)]
enum Transform {
    /// B^T d B of each tile's 6x6 input window (padding reads as zero).
    Input,
    /// A dY A^T of each tile's 4x4 output gradient (pixels past the map's edge read as zero):
    /// the gradient at the GEMM output `m`.
    OutputGrad,
}

impl Transform {
    /// The square of pixels each tile reads: its side, how far up and left of the tile's first
    /// output pixel it starts, and the plane it lies on (height, width, image length).
    fn square(self, g: &ConvGeometry) -> (usize, usize, usize, usize, usize) {
        match self {
            Transform::Input => (WINDOW, g.padding, g.height, g.width, g.in_image_len()),
            Transform::OutputGrad => (TILE, 0, g.out_height, g.out_width, g.out_image_len()),
        }
    }

    /// Channels, and pixels per channel plane, of what it reads.
    fn planes(self, g: &ConvGeometry) -> (usize, usize) {
        match self {
            Transform::Input => (g.in_channels, g.height * g.width),
            Transform::OutputGrad => (g.out_channels, g.out_pixels()),
        }
    }
}

/// For 16 tiles starting at `first_tile` (of `tiles`), the pixels of their squares that lie
/// on the plane: `(lane-major position in the block, offset in channel 0)`; pixels off the
/// plane and lanes past the last tile stay zero.
fn block_pixels(
    kind: Transform,
    g: &ConvGeometry,
    tiling: &Tiling,
    first_tile: usize,
    tiles: usize,
) -> Vec<(u32, u32)> {
    let (side, shift, height, width, image_len) = kind.square(g);
    let mut pixels = Vec::with_capacity(side * side * LANES);
    for lane in 0..LANES.min(tiles.saturating_sub(first_tile)) {
        let (n, oy, ox) = tiling.locate(first_tile + lane);
        for r in 0..side {
            for c in 0..side {
                let iy = (oy + r).checked_sub(shift).filter(|&y| y < height);
                let ix = (ox + c).checked_sub(shift).filter(|&x| x < width);
                if let (Some(iy), Some(ix)) = (iy, ix) {
                    let at = n * image_len + iy * width + ix;
                    pixels.push((((r * side + c) * LANES + lane) as u32, at as u32));
                }
            }
        }
    }
    pixels
}

/// [`block_pixels`] of every block of 16 of the `tiles` tiles.
fn pixel_groups(
    kind: Transform,
    g: &ConvGeometry,
    tiling: &Tiling,
    tiles: usize,
) -> Vec<Vec<(u32, u32)>> {
    (0..tiles.next_multiple_of(LANES))
        .step_by(LANES)
        .map(|t| block_pixels(kind, g, tiling, t, tiles))
        .collect()
}

dispatch! {
    fn transform_channel => transform_channel_generic(
    kind: Transform,
    plane: &[f32],
    groups: &[Vec<(u32, u32)>],
    dst: &mut [f32],
    )
}

/// `kind` applied to every tile of one channel (`plane`: its plane in the first image), into
/// `dst[point][tile]`.
#[inline(always)]
fn transform_channel_generic(
    kind: Transform,
    plane: &[f32],
    groups: &[Vec<(u32, u32)>],
    dst: &mut [f32],
) {
    let row = dst.len() / POINTS;
    for (group, pixels) in groups.iter().enumerate() {
        let offset = group * LANES;
        match kind {
            Transform::Input => {
                transform_tiles::<WINDOW>(plane, pixels, input_1d, dst, row, offset)
            }
            Transform::OutputGrad => {
                transform_tiles::<TILE>(plane, pixels, output_grad_1d, dst, row, offset)
            }
        }
    }
}

/// One block of 16 tiles in the transform domain: the tiles' pixels gathered from `plane`
/// (`pixels`: lane-major position in the block, offset in `plane`; the rest zero), `one_d`
/// applied down the columns and then along the rows, point `(i, j)` stored at
/// `(i * WINDOW + j) * row + offset` of `dst`.
#[inline(always)]
fn transform_tiles<const N: usize>(
    plane: &[f32],
    pixels: &[(u32, u32)],
    one_d: impl Fn(&[Lanes; N]) -> [Lanes; WINDOW],
    dst: &mut [f32],
    row: usize,
    offset: usize,
) {
    let mut d = [[[0f32; LANES]; N]; N];
    let flat = d.as_flattened_mut().as_flattened_mut();
    for &(pos, at) in pixels {
        flat[pos as usize] = plane[at as usize];
    }
    let mut cols = [[[0f32; LANES]; N]; WINDOW];
    for c in 0..N {
        let column: [Lanes; N] = std::array::from_fn(|r| d[r][c]);
        for (i, lanes) in one_d(&column).into_iter().enumerate() {
            cols[i][c] = lanes;
        }
    }
    for (i, row_lanes) in cols.iter().enumerate() {
        for (j, lanes) in one_d(row_lanes).into_iter().enumerate() {
            let at = (i * WINDOW + j) * row + offset;
            dst[at..at + LANES].copy_from_slice(&lanes);
        }
    }
}

dispatch! {
    fn output_channel => output_channel_generic(
    m: &[f32],
    co: usize,
    g: &ConvGeometry,
    tiles_padded: usize,
    bias: f32,
    relu: bool,
    groups: &[Vec<(u32, u32)>],
    out: SharedDst,
    )
}

/// A^T m A of every tile for output channel `co`, plus bias, ReLU if asked, written straight
/// into channel `co`'s planes of `out` (a chunk of whole NCHW images). `groups` are the
/// output gradient's pixel lists ([`block_pixels`] with [`Transform::OutputGrad`]): the same
/// tile pixels on the map, here scattered to instead of gathered from.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_channel_generic(
    m: &[f32],
    co: usize,
    g: &ConvGeometry,
    tiles_padded: usize,
    bias: f32,
    relu: bool,
    groups: &[Vec<(u32, u32)>],
    out: SharedDst,
) {
    let floor = if relu { 0.0 } else { f32::NEG_INFINITY };
    let (cout, plane) = (g.out_channels, co * g.out_pixels());
    for (group, pixels) in groups.iter().enumerate() {
        let t = group * LANES;
        let load = |p: usize| -> Lanes {
            let at = (p * cout + co) * tiles_padded + t;
            let mut lanes = [0f32; LANES];
            lanes.copy_from_slice(&m[at..at + LANES]);
            lanes
        };
        let mut rows = [[[0f32; LANES]; TILE]; WINDOW];
        for (i, row) in rows.iter_mut().enumerate() {
            let r = [
                load(i * WINDOW),
                load(i * WINDOW + 1),
                load(i * WINDOW + 2),
                load(i * WINDOW + 3),
                load(i * WINDOW + 4),
                load(i * WINDOW + 5),
            ];
            *row = output_1d(&r);
        }
        // block[r][c][lane], the layout of the pixel lists' positions.
        let mut block = [[[0f32; LANES]; TILE]; TILE];
        for c in 0..TILE {
            let column = [
                rows[0][c], rows[1][c], rows[2][c], rows[3][c], rows[4][c], rows[5][c],
            ];
            for (r, lanes) in output_1d(&column).into_iter().enumerate() {
                block[r][c] = lanes;
            }
        }
        let flat = block.as_flattened().as_flattened();
        for &(pos, at) in pixels {
            // SAFETY: `at` is a pixel on the map of an image of the chunk `out` points to
            // (block_pixels keeps only those), in channel `co`'s plane; each task writes
            // only its own channel's planes.
            unsafe { *out.at(at as usize + plane) = (flat[pos as usize] + bias).max(floor) };
        }
    }
}

/// `kind` applied to every tile of `src` (the `tiles` tiles of whole images), into
/// `dst[channel][point][tile]` with the tiles padded to whole vectors (zeros past the last).
fn transform_planes(
    kind: Transform,
    g: &ConvGeometry,
    tiling: &Tiling,
    src: &[f32],
    tiles: usize,
    dst: &mut Scratch,
) {
    let tiles_padded = tiles.next_multiple_of(LANES);
    let (channels, plane_len) = kind.planes(g);
    let groups = pixel_groups(kind, g, tiling, tiles);
    dst.sized(channels * POINTS * tiles_padded)
        .par_chunks_mut(POINTS * tiles_padded)
        .enumerate()
        .for_each(|(c, dst_c)| transform_channel(kind, &src[c * plane_len..], &groups, dst_c));
}

/// The convolution `g` of `x` with the transformed filters `u`, plus bias, ReLU if asked.
fn convolve(g: &ConvGeometry, x: &[f32], u: &[f32], bias: Option<&[f32]>, relu: bool) -> Vec<f32> {
    let tiling = Tiling::new(g);
    let (cin, cout) = (g.in_channels, g.out_channels);
    let images_per_chunk = CHUNK_TILES.div_ceil(tiling.per_image).min(g.batch.max(1));
    let mut y = zeroed(g.batch * g.out_image_len());
    let (mut v, mut m) = (Scratch::take(), Scratch::take());
    for (chunk, y_chunk) in y
        .chunks_mut(images_per_chunk * g.out_image_len())
        .enumerate()
    {
        let images = y_chunk.len() / g.out_image_len();
        let first_image = chunk * images_per_chunk;
        let tiles = images * tiling.per_image;
        let tiles_padded = tiles.next_multiple_of(LANES);
        let x_chunk = &x[first_image * g.in_image_len()..][..images * g.in_image_len()];
        transform_planes(Transform::Input, g, &tiling, x_chunk, tiles, &mut v);
        m.sized(POINTS * cout * tiles_padded)
            .par_chunks_mut(cout * tiles_padded)
            .enumerate()
            .for_each(|(point, m_point)| {
                // v as [ci][point][tile]: rows POINTS * tiles_padded apart.
                let v_point = MatRef {
                    data: &v.all()[point * tiles_padded..],
                    row_stride: POINTS * tiles_padded,
                    col_stride: 1,
                };
                sgemm(
                    cout,
                    tiles_padded,
                    cin,
                    m_point,
                    tiles_padded,
                    false,
                    // u as [co][point][ci]: rows POINTS * cin apart.
                    MatRef {
                        data: &u[point * cin..],
                        row_stride: POINTS * cin,
                        col_stride: 1,
                    },
                    v_point,
                    1,
                );
            });
        let groups = pixel_groups(Transform::OutputGrad, g, &tiling, tiles);
        let out = SharedDst(y_chunk.as_mut_ptr());
        (0..cout).into_par_iter().for_each(|co| {
            let b = bias.map_or(0.0, |b| b[co]);
            output_channel(m.all(), co, g, tiles_padded, b, relu, &groups, out);
        });
    }
    y
}

/// Forward (`suits(g)`): bias (optional), then ReLU if `relu`; NCHW out.
pub fn forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let u = transform_weight(g.out_channels, g.in_channels, w, false);
    convolve(g, x, &u, bias, relu)
}

/// The input gradient for the output gradient `grad_y` (`suits(g)`): the convolution of
/// `grad_y` with the filters rotated by 180 degrees and their channels swapped
/// ([`ConvGeometry::input_grad_geometry`]).
pub fn input_grad(g: &ConvGeometry, w: &[f32], grad_y: &[f32]) -> Option<Vec<f32>> {
    let back = g.input_grad_geometry().filter(suits)?;
    let u = transform_weight(g.in_channels, g.out_channels, w, true);
    Some(convolve(&back, grad_y, &u, None, false))
}

/// `A` (the transpose of [`output_1d`]'s matrix) applied to four lane vectors: a tile's
/// output gradient taken back to the six transform points.
#[inline(always)]
fn output_grad_1d(y: &[Lanes; 4]) -> [Lanes; 6] {
    let mut a = [[0f32; LANES]; 6];
    for l in 0..LANES {
        let (y0, y1, y2, y3) = (y[0][l], y[1][l], y[2][l], y[3][l]);
        a[0][l] = y0;
        a[1][l] = y0 + y1 + y2 + y3;
        a[2][l] = y0 - y1 + y2 - y3;
        a[3][l] = y0 + 2.0 * y1 + 4.0 * y2 + 8.0 * y3;
        a[4][l] = y0 - 2.0 * y1 + 4.0 * y2 - 8.0 * y3;
        a[5][l] = y3;
    }
    a
}

/// The weight gradient for the output gradient `grad_y` (`suits(g)`), in the transform
/// domain: per point, the GEMM output's gradient (A dY A^T) times the transformed input summed
/// over all tiles, then G^T (.) G back to 3x3. A third of im2col's multiply-adds on 7x7 maps
/// and no im2col buffer; chunks of tiles in a fixed order, so the bits never depend on the
/// thread count.
pub fn weight_grad(g: &ConvGeometry, x: &[f32], grad_y: &[f32]) -> Vec<f32> {
    let tiling = Tiling::new(g);
    let (cin, cout) = (g.in_channels, g.out_channels);
    let images_per_chunk = CHUNK_TILES.div_ceil(tiling.per_image).min(g.batch.max(1));
    let mut du = zeroed(POINTS * cout * cin);
    let (mut v, mut dm) = (Scratch::take(), Scratch::take());
    let mut first_image = 0;
    while first_image < g.batch {
        let images = images_per_chunk.min(g.batch - first_image);
        let tiles = images * tiling.per_image;
        let tiles_padded = tiles.next_multiple_of(LANES);
        let x_chunk = &x[first_image * g.in_image_len()..][..images * g.in_image_len()];
        let gy_chunk = &grad_y[first_image * g.out_image_len()..][..images * g.out_image_len()];
        transform_planes(Transform::Input, g, &tiling, x_chunk, tiles, &mut v);
        transform_planes(Transform::OutputGrad, g, &tiling, gy_chunk, tiles, &mut dm);
        let accumulate = first_image > 0;
        du.par_chunks_mut(cout * cin)
            .enumerate()
            .for_each(|(point, du_point)| {
                sgemm(
                    cout,
                    cin,
                    tiles_padded,
                    du_point,
                    cin,
                    accumulate,
                    // dm as [co][point][tile]: rows POINTS * tiles_padded apart.
                    MatRef {
                        data: &dm.all()[point * tiles_padded..],
                        row_stride: POINTS * tiles_padded,
                        col_stride: 1,
                    },
                    // v as [ci][point][tile], read transposed: [tile][ci].
                    MatRef {
                        data: &v.all()[point * tiles_padded..],
                        row_stride: 1,
                        col_stride: POINTS * tiles_padded,
                    },
                    1,
                );
            });
        first_image += images;
    }
    // G^T du G per channel pair, du in [point][co][ci].
    let mut grad_w = zeroed(cout * cin * 9);
    grad_w
        .par_chunks_mut(cin * 9)
        .enumerate()
        .for_each(|(co, gw_co)| {
            // [3x3][ci] from the vector kernel, interleaved here to [ci][3x3] by plain moves
            // (compiled for AVX-512, the interleave became scatters).
            let mut by_tap = vec![0f32; 9 * cin];
            filters_back(co, cout, cin, &du, &mut by_tap);
            for (ci, gw) in gw_co.chunks_exact_mut(9).enumerate() {
                for (tap, v) in gw.iter_mut().enumerate() {
                    *v = by_tap[tap * cin + ci];
                }
            }
        });
    grad_w
}

dispatch! {
    fn filters_back => filters_back_generic(
    co: usize,
    cout: usize,
    cin: usize,
    du: &[f32],
    by_tap: &mut [f32],
    )
}

/// The weight gradient's way back from the transform domain for output channel `co`:
/// `by_tap[3x3][ci]` = G^T du G of the 6x6 points `du[point][co][ci]`, 16 input channels per
/// vector.
#[inline(always)]
fn filters_back_generic(co: usize, cout: usize, cin: usize, du: &[f32], by_tap: &mut [f32]) {
    for ci0 in (0..cin).step_by(LANES) {
        let lanes = LANES.min(cin - ci0);
        let mut d = [[0f32; LANES]; POINTS];
        for (p, dp) in d.iter_mut().enumerate() {
            let at = (p * cout + co) * cin + ci0;
            if lanes == LANES {
                dp.copy_from_slice(&du[at..at + LANES]);
            } else {
                dp[..lanes].copy_from_slice(&du[at..at + lanes]);
            }
        }
        // G^T du, column by column: gtd[a][j].
        let mut gtd = [[[0f32; LANES]; WINDOW]; 3];
        for j in 0..WINDOW {
            let column = [
                d[j],
                d[WINDOW + j],
                d[2 * WINDOW + j],
                d[3 * WINDOW + j],
                d[4 * WINDOW + j],
                d[5 * WINDOW + j],
            ];
            for (a, lanes_out) in filter_back_1d(&column).into_iter().enumerate() {
                gtd[a][j] = lanes_out;
            }
        }
        // (G^T du) G, row by row: taps (a, b).
        for (a, row) in gtd.iter().enumerate() {
            for (b, lanes_out) in filter_back_1d(row).into_iter().enumerate() {
                let at = (a * 3 + b) * cin + ci0;
                if lanes == LANES {
                    by_tap[at..at + LANES].copy_from_slice(&lanes_out);
                } else {
                    by_tap[at..at + lanes].copy_from_slice(&lanes_out[..lanes]);
                }
            }
        }
    }
}

/// `G^T` applied to six lane vectors, each sum in index order.
#[inline(always)]
fn filter_back_1d(x: &[Lanes; WINDOW]) -> [Lanes; 3] {
    let mut out = [[0f32; LANES]; 3];
    for (a, o) in out.iter_mut().enumerate() {
        for l in 0..LANES {
            o[l] = G[0][a] * x[0][l]
                + G[1][a] * x[1][l]
                + G[2][a] * x[2][l]
                + G[3][a] * x[3][l]
                + G[4][a] * x[4][l]
                + G[5][a] * x[5][l];
        }
    }
    out
}

#[cfg(test)]
mod tests;
