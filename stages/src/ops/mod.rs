//! Convolution and pooling entry points the models call. Every model goes through these, so
//! the CPU fast kernels (custom candle ops) can replace candle's reference ops in one place;
//! on GPUs candle's own kernels run.

use candle_core::{Result, Tensor, D};

/// 2-D convolution, NCHW input `x` [B,Cin,H,W], weight [Cout,Cin,K,K], optional bias [Cout],
/// square stride and zero padding (PyTorch's `F.conv2d` semantics).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

/// Max pooling over square windows; padding counts as -inf (PyTorch's `F.max_pool2d`).
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let x = if padding > 0 {
        pad_with_neg_inf(x, padding)?
    } else {
        x.clone()
    };
    x.max_pool2d_with_stride(kernel, stride)
}

fn pad_with_neg_inf(x: &Tensor, pad: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let cols = Tensor::full(f32::NEG_INFINITY, (b, c, h, pad), x.device())?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&cols, x, &cols], D::Minus1)?;
    let rows = Tensor::full(f32::NEG_INFINITY, (b, c, pad, w + 2 * pad), x.device())?
        .to_dtype(x.dtype())?;
    Tensor::cat(&[&rows, &x, &rows], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn padded_max_pool_ignores_padding() -> Result<()> {
        // All-negative input: zero padding would wrongly win the max at the borders.
        let x = Tensor::new(&[[[[-1f32, -2.], [-3., -4.]]]], &Device::Cpu)?;
        let y = max_pool2d(&x, 3, 2, 1)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![-1.0]);
        Ok(())
    }
}
