//! im2col and col2im, the gathers that turn a convolution into GEMMs: per-row segment copies,
//! or per-tap gather tables on narrow feature maps; the weight restricted to the taps that
//! touch the image, and its gradient expanded back.

use super::conv_geometry::{valid_range, ConvGeometry};
use rayon::prelude::*;

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
pub(super) enum Walk {
    Rows,
    Gather {
        into_plane: Vec<Vec<u32>>,
        into_padded: Vec<Vec<u32>>,
    },
}

impl Walk {
    pub(super) fn new(g: &ConvGeometry, taps: &[(usize, usize)]) -> Self {
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
pub(super) fn im2col_gather(
    g: &ConvGeometry,
    tables: &[Vec<u32>],
    x: &[f32],
    images: usize,
    col: &mut [f32],
) {
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
pub(super) fn im2col(
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
pub(super) fn col2im_add(
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

/// The weight restricted to the active taps, [Cout, Cin * taps]; None when all taps are active.
pub(super) fn active_weight(
    g: &ConvGeometry,
    taps: &[(usize, usize)],
    w: &[f32],
) -> Option<Vec<f32>> {
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
pub(super) fn expand_weight_grad(
    g: &ConvGeometry,
    taps: &[(usize, usize)],
    grad: Vec<f32>,
) -> Vec<f32> {
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
pub(super) fn inner_threads(tasks: usize) -> usize {
    let threads = rayon::current_num_threads();
    if tasks >= threads {
        1
    } else {
        threads
    }
}
