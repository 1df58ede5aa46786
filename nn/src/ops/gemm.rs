//! A bounds-checked, safe wrapper around the `gemm` crate's f32 matrix multiply, the one
//! place the CPU kernels touch raw pointers.

use super::transpose::with_row_major;
use super::SharedDst;
use gemm::Parallelism;
use rayon::prelude::*;

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

    /// Columns `start..` of this view.
    pub fn skip_columns(self, start: usize) -> Self {
        Self {
            data: &self.data[(start * self.col_stride).min(self.data.len())..],
            ..self
        }
    }

    /// Rows `start..` of this view.
    pub fn skip_rows(self, start: usize) -> Self {
        Self {
            data: &self.data[(start * self.row_stride).min(self.data.len())..],
            ..self
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
    check_operands(m, n, k, dst.len(), dst_stride, lhs, rhs);
    if worth_copying(rhs, m, k, n) {
        return with_row_major(rhs, k, n, |rhs| {
            sgemm(m, n, k, dst, dst_stride, accumulate, lhs, rhs, threads)
        });
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index the kernel touches lies inside the three slices (checked above), `dst`
    // is exclusively borrowed and cannot alias the shared `lhs`/`rhs` borrows.
    unsafe {
        raw_sgemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_stride,
            accumulate,
            lhs,
            rhs,
            parallelism,
        )
    }
}

/// Fewest values of a transposed right-hand operand worth copying row-major before the product.
const COPY_TRANSPOSED_FROM: usize = 4096;

/// Products of at most this many outputs the gemm crate computes as dot products, unpacked.
const CRATE_DOT_PRODUCTS_UP_TO: usize = 16 * 16;

/// Whether the `k x n` right-hand operand of an `m x n` product is better copied row-major
/// first: a transposed view (rows contiguous, columns apart). For a row-major destination the
/// gemm crate computes the transposed product, in which this operand is the one it packs along
/// the other axis, a scalar at a time; the packing's layout does not change its sums, so the
/// bits stay the same. Not for a single row or a small product: those the crate computes
/// without packing (a matrix-vector product, dot products), and a copy would only change
/// which kernel, and so the order of the sums.
fn worth_copying(rhs: MatRef<'_>, m: usize, k: usize, n: usize) -> bool {
    rhs.row_stride == 1
        && rhs.col_stride != 1
        && m > 1
        && n > 1
        && m * n > CRATE_DOT_PRODUCTS_UP_TO
        && k * n >= COPY_TRANSPOSED_FROM
}

/// Panics unless an `m x n` destination with row stride `dst_stride` fits `dst_len` elements
/// and the operand views fit their buffers.
fn check_operands(
    m: usize,
    n: usize,
    k: usize,
    dst_len: usize,
    dst_stride: usize,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
) {
    assert!(
        (m - 1) * dst_stride + n <= dst_len,
        "gemm: destination {m}x{n} exceeds its buffer of {dst_len}"
    );
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
}

/// The gemm crate's product into the `m x n` row-major matrix at `dst`.
///
/// # Safety
/// `dst` must point at `m` rows of `n` writable elements `dst_stride` apart that nothing else
/// reads or writes during the call; `lhs` and `rhs` must hold the `m x k` and `k x n` views.
#[allow(clippy::too_many_arguments)]
unsafe fn raw_sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallelism: Parallelism,
) {
    let level = super::cpu_level::cpu_level();
    super::cpu_level::note_level_run(level);
    #[cfg(target_arch = "x86_64")]
    if level == super::cpu_level::CpuLevel::Avx2
        && super::cpu_level::detected() > super::cpu_level::CpuLevel::Avx2
    {
        if let Some(simd) = gemm_common::simd::V3::try_new() {
            avx2_sgemm(
                simd,
                m,
                n,
                k,
                dst,
                dst_stride,
                accumulate,
                lhs,
                rhs,
                parallelism,
            );
            return;
        }
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
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

/// [`raw_sgemm`] through the gemm crate's AVX2 (FMA) microkernels, which its own dispatch
/// passes over on an AVX-512 CPU: the path an AVX2-only machine takes, for a capped level.
///
/// # Safety
/// As [`raw_sgemm`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn avx2_sgemm(
    simd: gemm_common::simd::V3,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parallelism: Parallelism,
) {
    use gemm_f32::microkernel::fma::f32 as ukr;
    // f32 lanes of one AVX2 register.
    const LANES: usize = 8;
    gemm_common::gemm::gemm_basic_generic::<
        _,
        f32,
        LANES,
        { ukr::MR_DIV_N * LANES },
        { ukr::NR },
        { ukr::MR_DIV_N },
        { ukr::H_M },
        { ukr::H_N },
    >(
        simd,
        m,
        n,
        k,
        dst,
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
        |a, b, c| a * b + c,
        &ukr::UKR,
        &ukr::H_UKR,
        false,
        parallelism,
    )
}

/// [`sgemm`] with the `n` columns cut into `parts` ranges computed in parallel, each single-
/// threaded. On the fully connected layer's shapes (n = 9216, k = 64..128) the gemm crate's
/// own threading barely ran faster than one thread. The gemm crate's blocking depends on the
/// shape it is given, so a column's bits can depend on the width of its range: callers pass a
/// fixed `parts`, never the thread count.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_column_parallel(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_stride: usize,
    accumulate: bool,
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    parts: usize,
) {
    if m == 0 || n == 0 || k == 0 || parts <= 1 {
        sgemm(m, n, k, dst, dst_stride, accumulate, lhs, rhs, 1);
        return;
    }
    check_operands(m, n, k, dst.len(), dst_stride, lhs, rhs);
    let width = n.div_ceil(parts);
    let base = SharedDst(dst.as_mut_ptr());
    (0..n.div_ceil(width)).into_par_iter().for_each(|part| {
        let start = part * width;
        let cols = width.min(n - start);
        let product = |rhs: MatRef<'_>| {
            // SAFETY: rows 0..m, columns start..start+cols of the destination lie inside `dst`
            // (checked above, start + cols <= n) and no other task writes those columns; `dst`
            // is exclusively borrowed for the whole call, so nothing else reads or writes it;
            // `lhs` and `rhs` were bounds-checked for the full product, of which this is a part
            // (or `rhs` is a row-major copy of exactly this part).
            unsafe {
                raw_sgemm(
                    m,
                    cols,
                    k,
                    base.at(start),
                    dst_stride,
                    accumulate,
                    lhs,
                    rhs,
                    Parallelism::None,
                )
            }
        };
        let rhs = rhs.skip_columns(start);
        if worth_copying(rhs, m, k, cols) {
            with_row_major(rhs, k, cols, product);
        } else {
            product(rhs);
        }
    });
}
