//! Fully connected layer `y = x wᵀ + b` (PyTorch's weight layout [out, in]) as a candle custom
//! op for the CPU, with an optional fused ReLU. candle's `Linear` multiplies by a transposed
//! view and its backward adds the weight gradient back through that transpose, a strided
//! single-threaded pass over the whole weight (1.2M elements for the baseline's fc1) every step;
//! here all three products are GEMMs on contiguous data and the bias is fused.

use super::gemm::{sgemm, sgemm_column_parallel, MatRef};
use rayon::prelude::*;

/// Fixed cuts of the wide products (columns of the gradients, the reduction of the forward):
/// fixed so that the sums, and so the bits, do not depend on the thread count.
const PARTS: usize = 4;
use super::{cpu_slice, relu_grad, tensor_from_vec, with_cpu_slices, zeroed};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The op on (x [B, in], weight [out, in], bias [out]).
pub struct LinearOp {
    pub relu: bool,
}

fn dims(x: &Shape, w: &Shape) -> Result<(usize, usize, usize)> {
    let (batch, inputs) = x.dims2()?;
    let (outputs, w_inputs) = w.dims2()?;
    if w_inputs != inputs {
        candle_core::bail!(
            "linear: weight [{outputs}, {w_inputs}] does not fit input [{batch}, {inputs}]"
        );
    }
    Ok((batch, inputs, outputs))
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fmnist-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, inputs, outputs) = dims(l1.shape(), l2.shape())?;
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        if b.len() != outputs {
            candle_core::bail!("linear: bias of {} for {outputs} outputs", b.len());
        }
        // The reduction over the inputs cut into PARTS slices in parallel, partial products
        // added in order on top of the bias (the output is too narrow to split its columns).
        let span = inputs.div_ceil(PARTS).max(1);
        let partials: Vec<Vec<f32>> = (0..inputs.div_ceil(span))
            .into_par_iter()
            .map(|part| {
                let start = part * span;
                let mut partial = vec![0f32; batch * outputs];
                sgemm(
                    batch,
                    outputs,
                    span.min(inputs - start),
                    &mut partial,
                    outputs,
                    false,
                    MatRef::row_major(x, inputs).skip_columns(start),
                    MatRef::transposed(w, inputs).skip_rows(start),
                    1,
                );
                partial
            })
            .collect();
        let mut y: Vec<f32> = (0..batch).flat_map(|_| b.iter().copied()).collect();
        for partial in &partials {
            for (acc, v) in y.iter_mut().zip(partial) {
                *acc += *v;
            }
        }
        if self.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(y), Shape::from((batch, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, inputs, outputs) = dims(x.shape(), w.shape())?;
        let grad_res = grad_res.contiguous()?;
        let (relu, want_x) = (self.relu, x.track_op());
        let (gx, gw, gb) = with_cpu_slices(&[x, w, res, &grad_res], |s| {
            let (x, w, y, gy) = (s[0], s[1], s[2], s[3]);
            let masked;
            let gy = if relu {
                masked = relu_grad(y, gy);
                &masked[..]
            } else {
                gy
            };
            let gy_mat = MatRef::row_major(gy, outputs);
            let input_grad = || {
                if !want_x {
                    return Vec::new();
                }
                let mut gx = zeroed(batch * inputs);
                sgemm_column_parallel(
                    batch,
                    inputs,
                    outputs,
                    &mut gx,
                    inputs,
                    false,
                    gy_mat,
                    MatRef::row_major(w, inputs),
                    PARTS,
                );
                gx
            };
            let weight_grad = || {
                let mut gw = zeroed(outputs * inputs);
                sgemm_column_parallel(
                    outputs,
                    inputs,
                    batch,
                    &mut gw,
                    inputs,
                    false,
                    MatRef::transposed(gy, outputs),
                    MatRef::row_major(x, inputs),
                    PARTS,
                );
                gw
            };
            let (gx, gw) = rayon::join(input_grad, weight_grad);
            let mut gb = vec![0f32; outputs];
            for row in gy.chunks(outputs.max(1)) {
                for (acc, v) in gb.iter_mut().zip(row) {
                    *acc += *v;
                }
            }
            Ok((gx, gw, gb))
        })?;
        let device = x.device();
        let grads = (
            want_x
                .then(|| tensor_from_vec(gx, x.shape(), device))
                .transpose()?,
            Some(tensor_from_vec(gw, w.shape(), device)?),
            Some(tensor_from_vec(gb, b.shape(), device)?),
        );
        super::grad_sink::route3([x, w, b], grads)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{linear, reference_linear};
    use candle_core::{Device, Result, Tensor, Var};

    #[test]
    fn forward_and_backward_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        for (batch, inputs, outputs) in [(1, 1, 1), (4, 7, 3), (64, 300, 17), (3, 9216, 10)] {
            for relu in [false, true] {
                let x = Var::from_tensor(&Tensor::randn(0f32, 1., (batch, inputs), &dev)?)?;
                let w = Var::from_tensor(&Tensor::randn(0f32, 0.2, (outputs, inputs), &dev)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, outputs, &dev)?)?;
                let upstream = Tensor::randn(0f32, 1., (batch, outputs), &dev)?;
                let run = |fast: bool| -> Result<Vec<Tensor>> {
                    let f = if fast { linear } else { reference_linear };
                    let y = f(&x, &w, &b, relu)?;
                    let grads = (&y * &upstream)?.sum_all()?.backward()?;
                    let mut out = vec![y];
                    for v in [&x, &w, &b] {
                        out.push(grads.get(v).expect("gradient").clone());
                    }
                    Ok(out)
                };
                for (what, (a, r)) in ["y", "dx", "dw", "db"]
                    .iter()
                    .zip(run(true)?.iter().zip(&run(false)?))
                {
                    let scale = r.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                    let d = (a - r)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    assert!(
                        d <= 1e-4 * scale,
                        "{what}: {d} for {batch}x{inputs}->{outputs}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn mismatched_weight_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &dev)?;
        let b = Tensor::zeros(3, candle_core::DType::F32, &dev)?;
        assert!(linear(&x, &w, &b, false).is_err());
        Ok(())
    }
}
