//! A GEMM operand whose rows are contiguous but whose columns are far apart (a transposed
//! view, the "dot product" form of the weight gradients) copied into row-major order before
//! the product. The gemm crate packs such an operand one scalar at a time, striding across
//! the whole operand for each packed row (~3.5 cycles per value here); this copy also moves
//! scalars (the compiler emits no shuffles for it), but 4x4 blocks at a time, so the four
//! source columns and four destination rows it touches stay in cache.

use super::gemm::MatRef;
use std::cell::RefCell;

thread_local! {
    /// The copy's buffer, kept per thread: its own, not a [`super::scratch::Scratch`], whose
    /// pool hands any buffer to any taker (a small copy buffer taken by a large user would be
    /// grown, page faults and all, on every call).
    static COPY: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` of the `k x n` view `src` copied row-major into this thread's copy buffer.
pub fn with_row_major<R>(
    src: MatRef<'_>,
    k: usize,
    n: usize,
    f: impl FnOnce(MatRef<'_>) -> R,
) -> R {
    // Taken out for the call: a nested call on this thread (a pool thread waiting inside
    // `f` runs other tasks) finds it empty and uses a buffer of its own.
    // try_with: a thread being torn down has no buffer left; a fresh one serves.
    let mut buf = COPY
        .try_with(|c| std::mem::take(&mut *c.borrow_mut()))
        .unwrap_or_default();
    if buf.len() < k * n {
        buf.resize(k * n, 0.0);
    }
    to_row_major(src, k, n, &mut buf[..k * n]);
    let out = f(MatRef::row_major(&buf[..k * n], n));
    // Kept if it is the larger; freed when the thread is being torn down.
    let _ = COPY.try_with(|c| {
        let mut kept = c.borrow_mut();
        if kept.len() < buf.len() {
            *kept = buf;
        }
    });
    out
}

/// Side of the blocks moved at once.
const BLOCK: usize = 4;

/// `dst[p * n + j] = src[p][j]` for the `k x n` view `src`: row-major, `n` per row.
pub fn to_row_major(src: MatRef<'_>, k: usize, n: usize, dst: &mut [f32]) {
    let (data, cs, rs) = (src.data, src.col_stride, src.row_stride);
    let (k_blocks, n_blocks) = (k / BLOCK * BLOCK, n / BLOCK * BLOCK);
    for j0 in (0..n_blocks).step_by(BLOCK) {
        for p0 in (0..k_blocks).step_by(BLOCK) {
            // Column j0 + c of the view, rows p0..p0 + 4 (contiguous when rs == 1).
            let cols: [[f32; BLOCK]; BLOCK] = std::array::from_fn(|c| {
                std::array::from_fn(|r| data[(p0 + r) * rs + (j0 + c) * cs])
            });
            for r in 0..BLOCK {
                let row: [f32; BLOCK] = std::array::from_fn(|c| cols[c][r]);
                dst[(p0 + r) * n + j0..][..BLOCK].copy_from_slice(&row);
            }
        }
        for p in k_blocks..k {
            for j in j0..j0 + BLOCK {
                dst[p * n + j] = data[p * rs + j * cs];
            }
        }
    }
    for j in n_blocks..n {
        for p in 0..k {
            dst[p * n + j] = data[p * rs + j * cs];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value lands where the view says, for sizes with and without whole blocks.
    #[test]
    fn copies_every_value_to_its_place() {
        for (k, n) in [(1, 1), (3, 5), (4, 4), (9, 13), (16, 7)] {
            let col_stride = k + 3;
            let data: Vec<f32> = (0..n * col_stride).map(|i| i as f32).collect();
            let view = MatRef {
                data: &data,
                row_stride: 1,
                col_stride,
            };
            let mut dst = vec![f32::NAN; k * n];
            to_row_major(view, k, n, &mut dst);
            for p in 0..k {
                for j in 0..n {
                    assert_eq!(
                        dst[p * n + j],
                        data[p + j * col_stride],
                        "k {k} n {n} at ({p}, {j})"
                    );
                }
            }
            let sum = with_row_major(view, k, n, |m| m.data.iter().sum::<f32>());
            assert_eq!(sum, dst.iter().sum::<f32>());
        }
    }
}
