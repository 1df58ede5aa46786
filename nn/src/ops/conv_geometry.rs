//! The shapes of one 2-D convolution, what follows it (a max pool) and the gradients it
//! gives, shared by the im2col path (conv, conv_backward), the two Winograd paths and the
//! dense form, which do not import each other's code.

use super::pool::PoolGeometry;
use candle_core::Result;

/// Output pixels per GEMM that keep the kernel efficient: smaller feature maps are batched.
const TARGET_COLUMNS: usize = 256;
/// Fixed number of partial weight-gradient accumulators (independent of the thread count so
/// that the summation order, and so the bits, never change).
pub(super) const WEIGHT_GRAD_GROUPS: usize = 8;

/// Shapes of one convolution (square kernel, stride and padding).
#[derive(Debug, Clone, Copy)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeometry {
    pub fn new(
        x: (usize, usize, usize, usize),
        w: (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (batch, in_channels, height, width) = x;
        let (out_channels, w_in, kh, kw) = w;
        if w_in != in_channels || kh != kw {
            candle_core::bail!(
                "conv2d: weight {w:?} does not fit input {x:?} (need [Cout, {in_channels}, K, K])"
            );
        }
        if stride == 0 {
            candle_core::bail!("conv2d: stride must be at least 1");
        }
        if height + 2 * padding < kh || width + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh} larger than padded input {height}x{width}");
        }
        Ok(Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel: kh,
            stride,
            padding,
            out_height: (height + 2 * padding - kh) / stride + 1,
            out_width: (width + 2 * padding - kw) / stride + 1,
        })
    }

    /// For a 3x3 stride-1 convolution, the one that takes its output gradient back to its
    /// input gradient: the filters rotated by 180 degrees with their channels swapped, padded
    /// by `2 - padding` (which maps the output grid back onto the input's). None for other
    /// layers or when the maps do not line up.
    pub fn input_grad_geometry(&self) -> Option<ConvGeometry> {
        if (self.kernel, self.stride) != (3, 1) {
            return None;
        }
        let back = ConvGeometry::new(
            (
                self.batch,
                self.out_channels,
                self.out_height,
                self.out_width,
            ),
            (self.in_channels, self.out_channels, 3, 3),
            1,
            2usize.checked_sub(self.padding)?,
        )
        .ok()?;
        ((back.out_height, back.out_width) == (self.height, self.width)).then_some(back)
    }

    /// Kernel taps `(ki, kj)` that touch the image for at least one output pixel. On tiny
    /// feature maps (ResNet's 1x1 layer4 with 3x3 kernels) most taps only ever see padding;
    /// leaving them out of im2col saves their whole share of the GEMMs.
    pub(super) fn active_taps(&self) -> Vec<(usize, usize)> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let rows: Vec<usize> = (0..k)
            .filter(|&ki| {
                let (lo, hi) = valid_range(self.out_height, self.height, s, p, ki);
                lo < hi
            })
            .collect();
        let cols: Vec<usize> = (0..k)
            .filter(|&kj| {
                let (lo, hi) = valid_range(self.out_width, self.width, s, p, kj);
                lo < hi
            })
            .collect();
        rows.iter()
            .flat_map(|&ki| cols.iter().map(move |&kj| (ki, kj)))
            .collect()
    }
    pub(super) fn out_pixels(&self) -> usize {
        self.out_height * self.out_width
    }
    pub(super) fn in_image_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    pub(super) fn out_image_len(&self) -> usize {
        self.out_channels * self.out_pixels()
    }
    /// 1x1, stride 1, no padding: the image itself is its im2col matrix.
    pub(super) fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }
    pub(super) fn images_per_chunk(&self) -> usize {
        TARGET_COLUMNS
            .div_ceil(self.out_pixels().max(1))
            .clamp(1, self.batch.max(1))
    }
    /// Multiply-adds x 2 of the forward pass, counting every kernel tap (as PyTorch does).
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.out_image_len() * self.in_channels * self.kernel * self.kernel)
            as f64
    }
}

/// Gradients of the convolution; each is computed only when asked for.
pub struct ConvGrads {
    pub x: Option<Vec<f32>>,
    pub w: Option<Vec<f32>>,
    pub bias: Option<Vec<f32>>,
}

/// Output columns `ox` in `lo..hi` read input column `ox*s + kj - p` inside `0..width`.
pub(super) fn valid_range(
    out_w: usize,
    width: usize,
    s: usize,
    p: usize,
    kj: usize,
) -> (usize, usize) {
    // ox*s + kj >= p  <=>  ox >= ceil((p - kj) / s)
    let lo = if p > kj { (p - kj).div_ceil(s) } else { 0 };
    // ox*s + kj - p <= width - 1  <=>  ox <= (width - 1 + p - kj) / s
    let hi = if width + p > kj {
        ((width - 1 + p - kj) / s + 1).min(out_w)
    } else {
        0
    };
    (lo.min(out_w), hi.max(lo.min(out_w)))
}

/// A max pooling that follows a convolution: square window, stride, padding (-inf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool {
    /// This pooling of the convolution's output for `images` images.
    pub fn geometry(&self, g: &ConvGeometry, images: usize) -> Result<PoolGeometry> {
        PoolGeometry::new(
            (images, g.out_channels, g.out_height, g.out_width),
            self.kernel,
            self.stride,
            self.padding,
        )
    }
}
