//! The F(2x2) products, one per transform point: `out[r][j] (+)= sum over p of
//! lhs[r][p] * rhs[p][j]`, read in place. The forward's is `m[co][tile]` from `u[co][ci]` and
//! `v[ci][tile]`, the weight gradient's `m[ci][co]` from the transformed input `v[ci][tile]`
//! and the transformed output gradient `z[tile][co]`, the input gradient's `dv[ci][tile]` from
//! the transposed filters `u[ci][co]` and the transformed output gradient `z[co][tile]`. Each block of 6 rows by 16
//! columns keeps its sums in registers (12 AVX2 vectors) while p streams past: a row of `rhs`
//! loaded once per block, an element of `lhs` broadcast. With k as short as 32 (the forward's
//! input channels), the gemm crate spent about as long packing both operands and setting up
//! each call as multiplying; at AVX2 that left the baseline's conv2 well behind its AVX-512
//! speed.

use super::super::cpu_level::{cpu_level, CpuLevel};
use super::{Lanes, LANE};

/// Rows per block.
const ROWS: usize = 6;

/// A product's operands, rows `lhs_row`, `rhs_row` and `out_row` apart.
pub(super) struct Operands<'a> {
    pub lhs: &'a [f32],
    pub lhs_row: usize,
    pub rhs: &'a [f32],
    pub rhs_row: usize,
    pub out: &'a mut [f32],
    pub out_row: usize,
}

/// Whether [`tile_product`] takes products `n` columns wide.
pub(super) fn fits(n: usize) -> bool {
    n.is_multiple_of(LANE)
}

/// `out[r][j] = sum_p lhs[r][p] * rhs[p][j]` for `r < rows` and `j < n` (`fits(n)`): a chain
/// of fused multiply-adds over `p` in order, starting from zero, or from `out[r][j]` itself
/// with `accumulate`. Blocks are 6 rows
/// by 32 columns where AVX-512 runs (12 of its 32 registers; 16 columns left a load or
/// broadcast per multiply-add), by 16 columns elsewhere (12 of AVX2's 16); the bits are the
/// same either way.
#[inline(always)]
pub(super) fn tile_product(rows: usize, k: usize, n: usize, ops: Operands, accumulate: bool) {
    debug_assert!(fits(n), "tile_product: {n} columns are not whole vectors");
    let wide = cpu_level() == CpuLevel::Avx512;
    let Operands {
        lhs,
        lhs_row,
        rhs,
        rhs_row,
        out,
        out_row,
    } = ops;
    let mut r = 0;
    while r < rows {
        let height = ROWS.min(rows - r);
        let mut j = 0;
        while j < n {
            let at = Block {
                r,
                j,
                k,
                lhs_row,
                rhs_row,
                out_row,
                accumulate,
            };
            j += if wide && j + 2 * LANE <= n {
                at.rows::<2>(height, lhs, rhs, out)
            } else {
                at.rows::<1>(height, lhs, rhs, out)
            };
        }
        r += height;
    }
}

/// Where a block starts (row, column) and the operands' shapes.
#[derive(Clone, Copy)]
struct Block {
    r: usize,
    j: usize,
    k: usize,
    lhs_row: usize,
    rhs_row: usize,
    out_row: usize,
    accumulate: bool,
}

impl Block {
    /// The block of `height` rows by `V` vectors of 16 columns; returns the columns done.
    #[inline(always)]
    fn rows<const V: usize>(
        self,
        height: usize,
        lhs: &[f32],
        rhs: &[f32],
        out: &mut [f32],
    ) -> usize {
        match height {
            6 => self.run::<6, V>(lhs, rhs, out),
            5 => self.run::<5, V>(lhs, rhs, out),
            4 => self.run::<4, V>(lhs, rhs, out),
            3 => self.run::<3, V>(lhs, rhs, out),
            2 => self.run::<2, V>(lhs, rhs, out),
            _ => self.run::<1, V>(lhs, rhs, out),
        }
        V * LANE
    }

    /// Rows `r..r + R`, columns `j..j + 16 V`.
    #[inline(always)]
    fn run<const R: usize, const V: usize>(self, lhs: &[f32], rhs: &[f32], out: &mut [f32]) {
        let Block {
            r,
            j,
            k,
            lhs_row,
            rhs_row,
            out_row,
            accumulate,
        } = self;
        let lhs_rows: [&[f32]; R] = std::array::from_fn(|i| &lhs[(r + i) * lhs_row..][..k]);
        let mut acc = [[[0f32; LANE]; V]; R];
        if accumulate {
            for (i, sums) in acc.iter_mut().enumerate() {
                let row = &out[(r + i) * out_row + j..][..V * LANE];
                for (vec_sums, chunk) in sums.iter_mut().zip(row.chunks_exact(LANE)) {
                    vec_sums.copy_from_slice(chunk);
                }
            }
        }
        for p in 0..k {
            let row = &rhs[p * rhs_row + j..][..V * LANE];
            let lanes: [Lanes; V] = std::array::from_fn(|c| {
                let mut l: Lanes = [0.0; LANE];
                l.copy_from_slice(&row[c * LANE..(c + 1) * LANE]);
                l
            });
            for (sums, lhs_row) in acc.iter_mut().zip(&lhs_rows) {
                let a = lhs_row[p];
                for (vec_sums, vec) in sums.iter_mut().zip(&lanes) {
                    for (s, x) in vec_sums.iter_mut().zip(vec) {
                        *s = a.mul_add(*x, *s);
                    }
                }
            }
        }
        for (i, sums) in acc.iter().enumerate() {
            let row = &mut out[(r + i) * out_row + j..][..V * LANE];
            for (vec_sums, chunk) in sums.iter().zip(row.chunks_exact_mut(LANE)) {
                chunk.copy_from_slice(vec_sums);
            }
        }
    }
}
