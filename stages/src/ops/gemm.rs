//! A bounds-checked, safe wrapper around the `gemm` crate's f32 matrix multiply, the one
//! place the CPU kernels touch raw pointers.

use gemm::Parallelism;

/// A read-only matrix view: `data[row * row_stride + col * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix that has `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols,
        }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "gemm: {what} view {rows}x{cols} exceeds its buffer of {}",
            self.data.len()
        );
    }
}

/// `dst[m x n] (row-major, row stride dst_stride) = (accumulate ? dst : 0) + lhs[m x k] * rhs[k x n]`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * dst_stride..row * dst_stride + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * dst_stride + n <= dst.len(),
        "gemm: destination {m}x{n} exceeds its buffer of {}",
        dst.len()
    );
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index the kernel touches lies inside the three slices (checked above), `dst`
    // is exclusively borrowed and cannot alias the shared `lhs`/`rhs` borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
