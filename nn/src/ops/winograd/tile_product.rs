//! The F(2x2) forward's products, one per transform point: `m[co][tile] = sum over ci of
//! u[co][ci] * v[ci][tile]`, read in place. Each block of 6 output channels by 16 tiles keeps
//! its sums in registers (12 AVX2 vectors) while the input channels stream past: a row of `v`
//! loaded once per block, an element of `u` broadcast. With k (input channels) as short as
//! 32, the gemm crate spent about as long packing both operands and setting up each call as
//! multiplying; at AVX2 that left the baseline's conv2 well behind its AVX-512 speed.

use super::super::cpu_level::{cpu_level, CpuLevel};
use super::{Lanes, LANE};

/// Output channels per block.
const ROWS: usize = 6;

/// `m[co * m_row + t] = sum_ci u[co * cin + ci] * v[ci * v_row + t]` for `co < cout` and
/// `t < tiles` (a multiple of 16), the sum over `ci` in order, as fused multiply-adds. Blocks
/// are 6 channels by 32 tiles where AVX-512 runs (12 of its 32 registers; 16 tiles left a
/// load or broadcast per multiply-add), by 16 tiles elsewhere (12 of AVX2's 16); the bits are
/// the same either way.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile_product(
    cout: usize,
    cin: usize,
    tiles: usize,
    u: &[f32],
    v: &[f32],
    v_row: usize,
    m: &mut [f32],
    m_row: usize,
) {
    let wide = cpu_level() == CpuLevel::Avx512;
    let mut co = 0;
    while co < cout {
        let rows = ROWS.min(cout - co);
        let mut t = 0;
        while t < tiles {
            let at = Block {
                co,
                t,
                cin,
                v_row,
                m_row,
            };
            t += if wide && t + 2 * LANE <= tiles {
                at.rows::<2>(rows, u, v, m)
            } else {
                at.rows::<1>(rows, u, v, m)
            };
        }
        co += rows;
    }
}

/// Where a block starts (output channel, tile) and the operands' shapes.
#[derive(Clone, Copy)]
struct Block {
    co: usize,
    t: usize,
    cin: usize,
    v_row: usize,
    m_row: usize,
}

impl Block {
    /// The block of `rows` channels by `V` vectors of 16 tiles; returns the tiles done.
    #[inline(always)]
    fn rows<const V: usize>(self, rows: usize, u: &[f32], v: &[f32], m: &mut [f32]) -> usize {
        match rows {
            6 => self.run::<6, V>(u, v, m),
            5 => self.run::<5, V>(u, v, m),
            4 => self.run::<4, V>(u, v, m),
            3 => self.run::<3, V>(u, v, m),
            2 => self.run::<2, V>(u, v, m),
            _ => self.run::<1, V>(u, v, m),
        }
        V * LANE
    }

    /// Output channels `co..co + R`, tiles `t..t + 16 V`.
    #[inline(always)]
    fn run<const R: usize, const V: usize>(self, u: &[f32], v: &[f32], m: &mut [f32]) {
        let Block {
            co,
            t,
            cin,
            v_row,
            m_row,
        } = self;
        let u_rows: [&[f32]; R] = std::array::from_fn(|r| &u[(co + r) * cin..][..cin]);
        let mut acc = [[[0f32; LANE]; V]; R];
        for ci in 0..cin {
            let row = &v[ci * v_row + t..][..V * LANE];
            let lanes: [Lanes; V] = std::array::from_fn(|k| {
                let mut l: Lanes = [0.0; LANE];
                l.copy_from_slice(&row[k * LANE..(k + 1) * LANE]);
                l
            });
            for (sums, u_row) in acc.iter_mut().zip(&u_rows) {
                let a = u_row[ci];
                for (vec_sums, vec) in sums.iter_mut().zip(&lanes) {
                    for (s, x) in vec_sums.iter_mut().zip(vec) {
                        *s = a.mul_add(*x, *s);
                    }
                }
            }
        }
        for (r, sums) in acc.iter().enumerate() {
            let out = &mut m[(co + r) * m_row + t..][..V * LANE];
            for (k, vec_sums) in sums.iter().enumerate() {
                out[k * LANE..(k + 1) * LANE].copy_from_slice(vec_sums);
            }
        }
    }
}
