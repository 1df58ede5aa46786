//! Batch normalization over the channels of NCHW tensors as candle custom ops for the CPU:
//! training mode (batch statistics, with the whole backward pass in two parallel passes) and
//! inference mode (a per-channel affine), each with an optional fused ReLU; and the residual
//! `relu(a + b)` of a ResNet block. candle's own batch norm runs about ten single-threaded
//! passes forward (each allocating a tensor) and more backward: ResNet-18 spent most of its
//! non-convolution time there.
//!
//! Per-channel sums run one channel per task (or, on small maps, one fixed group of images per
//! task), in a fixed order, so the results do not depend on the thread count (bit-reproducible
//! training).

use super::{cpu_slice, relu_grad, tensor_from_vec, with_cpu_slices, zeroed, ELEMENTWISE_CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// How an NCHW (or [N, C]) tensor splits into per-channel runs: `images` runs of `pixels`
/// contiguous elements per channel.
#[derive(Debug, Clone, Copy)]
pub struct Planes {
    pub images: usize,
    pub channels: usize,
    pub pixels: usize,
}

impl Planes {
    pub fn of(shape: &Shape) -> Result<Self> {
        let dims = shape.dims();
        if dims.len() < 2 {
            candle_core::bail!("batch norm needs an [N, C, ...] input, got {dims:?}");
        }
        Ok(Self {
            images: dims[0],
            channels: dims[1],
            pixels: dims[2..].iter().product(),
        })
    }

    /// Elements per channel over the whole batch.
    pub fn per_channel(&self) -> usize {
        self.images * self.pixels
    }

    fn image_len(&self) -> usize {
        self.channels * self.pixels
    }

    /// The contiguous run of channel `c` in image `n`.
    fn run<'a>(&self, data: &'a [f32], n: usize, c: usize) -> &'a [f32] {
        let start = (n * self.channels + c) * self.pixels;
        &data[start..start + self.pixels]
    }
}

/// Sums `f` over the elements of equal-length runs (zipped), with eight independent f32 lanes
/// over `chunks_exact` (so the loop vectorizes), returned in f64.
fn lane_sum<const N: usize>(runs: [&[f32]; N], f: impl Fn([f32; N]) -> f32) -> f64 {
    let len = runs[0].len();
    let whole = len / 8 * 8;
    let mut lanes = [0f32; 8];
    for base in (0..whole).step_by(8) {
        let chunks = runs.map(|r| &r[base..base + 8]);
        for (lane, acc) in lanes.iter_mut().enumerate() {
            *acc += f(chunks.map(|c| c[lane]));
        }
    }
    let tail: f32 = (whole..len).map(|i| f(runs.map(|r| r[i]))).sum();
    lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
}

/// Below this many pixels per plane, per-channel sums walk the batch image by image (every
/// channel's accumulator at once) instead of channel by channel: ResNet's 4x4 to 1x1 maps
/// made runs of 16 to 1 elements, each paying a loop's set-up and a cache line of its own.
const SHORT_RUN: usize = 32;
/// Fixed image groups for those sums, added in order (bit-reproducible whatever the threads).
const IMAGE_GROUPS: usize = 8;

/// Per-channel sums of the `K` values `f(c, [data..][i])` over every image and pixel of
/// channel `c` (f32 within a plane, f64 across planes), image by image: for short runs.
fn short_run_sums<const N: usize, const K: usize>(
    p: &Planes,
    data: [&[f32]; N],
    f: impl Fn(usize, [f32; N]) -> [f32; K] + Sync,
) -> Vec<[f64; K]> {
    let groups = p.images.clamp(1, IMAGE_GROUPS);
    let per_group = p.images.div_ceil(groups).max(1);
    let partials: Vec<Vec<[f64; K]>> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![[0f64; K]; p.channels];
            for n in group * per_group..((group + 1) * per_group).min(p.images) {
                for (c, total) in acc.iter_mut().enumerate() {
                    let runs = data.map(|d| p.run(d, n, c));
                    let mut sum = [0f32; K];
                    for i in 0..p.pixels {
                        let v = f(c, runs.map(|r| r[i]));
                        for (s, v) in sum.iter_mut().zip(v) {
                            *s += v;
                        }
                    }
                    for (t, s) in total.iter_mut().zip(sum) {
                        *t += s as f64;
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![[0f64; K]; p.channels];
    for part in &partials {
        for (t, v) in total.iter_mut().zip(part) {
            for (a, b) in t.iter_mut().zip(v) {
                *a += b;
            }
        }
    }
    total
}

/// Per-channel mean and biased variance (two passes, f64 accumulation).
pub fn channel_mean_var(p: &Planes, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let count = p.per_channel().max(1) as f64;
    if p.pixels < SHORT_RUN {
        let sums = short_run_sums(p, [x], |_, [v]| [v]);
        let mean: Vec<f32> = sums.iter().map(|[s]| (s / count) as f32).collect();
        let squares = short_run_sums(p, [x], |c, [v]| [(v - mean[c]) * (v - mean[c])]);
        let var = squares.iter().map(|[s]| (s / count) as f32).collect();
        return (mean, var);
    }
    (0..p.channels)
        .into_par_iter()
        .map(|c| {
            let runs = || (0..p.images).map(move |n| p.run(x, n, c));
            let mean = runs().map(|run| lane_sum([run], |[v]| v)).sum::<f64>() / count;
            let m = mean as f32;
            let var = runs()
                .map(|run| lane_sum([run], |[v]| (v - m) * (v - m)))
                .sum::<f64>()
                / count;
            (m, var as f32)
        })
        .unzip()
}

/// `y = scale[c] * x + shift[c]`, then ReLU when asked.
fn channel_affine(p: &Planes, x: &[f32], scale: &[f32], shift: &[f32], relu: bool) -> Vec<f32> {
    let mut y = zeroed(x.len());
    let image_len = p.image_len().max(1);
    y.par_chunks_mut(image_len)
        .zip(x.par_chunks(image_len))
        .for_each(|(y_img, x_img)| {
            for (c, (y_run, x_run)) in y_img
                .chunks_mut(p.pixels.max(1))
                .zip(x_img.chunks(p.pixels.max(1)))
                .enumerate()
            {
                let (a, b) = (scale[c], shift[c]);
                if relu {
                    for (o, v) in y_run.iter_mut().zip(x_run) {
                        *o = (a * v + b).max(0.0);
                    }
                } else {
                    for (o, v) in y_run.iter_mut().zip(x_run) {
                        *o = a * v + b;
                    }
                }
            }
        });
    y
}

/// `(gamma / sqrt(var + eps), beta - mean * that)` per channel.
pub fn fold_affine(
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    mean.iter()
        .zip(var)
        .zip(gamma.iter().zip(beta))
        .map(|((&m, &v), (&g, &b))| {
            let scale = g / (v + eps).sqrt();
            (scale, b - m * scale)
        })
        .unzip()
}

/// Gradients of the training-mode batch norm (and its fused ReLU, through the output `y`).
pub struct BatchNormGrads {
    pub x: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

/// Backward of [`batch_norm_train_forward`] with the batch statistics it used.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_train_backward(
    p: &Planes,
    x: &[f32],
    y: &[f32],
    grad_y: &[f32],
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    relu: bool,
) -> BatchNormGrads {
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    // The gradient reaching the affine output: ReLU passes it where the output is positive.
    let dz = |dy: f32, out: f32| if relu && out <= 0.0 { 0.0 } else { dy };
    let (sum_dz, sum_dz_xhat): (Vec<f32>, Vec<f32>) = if p.pixels < SHORT_RUN {
        short_run_sums(p, [x, y, grad_y], |c, [xv, yv, gv]| {
            let d = dz(gv, yv);
            [d, d * (xv - mean[c]) * inv_std[c]]
        })
        .into_iter()
        .map(|[a, b]| (a as f32, b as f32))
        .unzip()
    } else {
        (0..p.channels)
            .into_par_iter()
            .map(|c| {
                let (m, s) = (mean[c], inv_std[c]);
                let mut sum = 0f64;
                let mut sum_xhat = 0f64;
                for n in 0..p.images {
                    let runs = [p.run(x, n, c), p.run(y, n, c), p.run(grad_y, n, c)];
                    sum += lane_sum(runs, |[_, yv, gv]| dz(gv, yv));
                    sum_xhat += lane_sum(runs, |[xv, yv, gv]| dz(gv, yv) * (xv - m) * s);
                }
                (sum as f32, sum_xhat as f32)
            })
            .unzip()
    };
    let count = p.per_channel().max(1) as f32;
    let mut grad_x = zeroed(x.len());
    let image_len = p.image_len().max(1);
    let pixels = p.pixels.max(1);
    grad_x
        .par_chunks_mut(image_len)
        .zip(x.par_chunks(image_len))
        .zip(y.par_chunks(image_len).zip(grad_y.par_chunks(image_len)))
        .for_each(|((gx_img, x_img), (y_img, gy_img))| {
            for c in 0..p.channels {
                let range = c * pixels..(c + 1) * pixels;
                let (m, s) = (mean[c], inv_std[c]);
                let k = gamma[c] * s;
                let mean_dz = sum_dz[c] / count;
                let mean_dz_xhat = sum_dz_xhat[c] / count;
                for (((o, &xv), &yv), &gv) in gx_img[range.clone()]
                    .iter_mut()
                    .zip(&x_img[range.clone()])
                    .zip(&y_img[range.clone()])
                    .zip(&gy_img[range])
                {
                    *o = k * (dz(gv, yv) - mean_dz - (xv - m) * s * mean_dz_xhat);
                }
            }
        });
    BatchNormGrads {
        x: grad_x,
        gamma: sum_dz_xhat,
        beta: sum_dz,
    }
}

/// Training-mode batch norm as a custom op on (x, gamma, beta) with the batch statistics
/// already computed (the caller also needs them for the running statistics).
pub struct BatchNormTrainOp {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
    pub eps: f32,
    pub relu: bool,
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "fmnist-batch-norm-train"
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
        let p = Planes::of(l1.shape())?;
        let (x, gamma, beta) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let (scale, shift) = fold_affine(&self.mean, &self.var, gamma, beta, self.eps);
        let y = channel_affine(&p, x, &scale, &shift, self.relu);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = Planes::of(x.shape())?;
        let grad_res = grad_res.contiguous()?;
        let grads = with_cpu_slices(&[x, res, &grad_res, gamma], |s| {
            Ok(batch_norm_train_backward(
                &p, s[0], s[1], s[2], s[3], &self.mean, &self.var, self.eps, self.relu,
            ))
        })?;
        let device = x.device();
        let gx = x
            .track_op()
            .then(|| tensor_from_vec(grads.x, x.shape(), device))
            .transpose()?;
        let gg = tensor_from_vec(grads.gamma, gamma.shape(), device)?;
        let gb = tensor_from_vec(grads.beta, beta.shape(), device)?;
        super::grad_sink::route3([x, gamma, beta], (gx, Some(gg), Some(gb)))
    }
}

/// Inference-mode batch norm folded into `scale * x + shift` per channel (no backward: eval
/// runs without gradients).
pub struct ChannelAffineOp {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub relu: bool,
}

impl CustomOp1 for ChannelAffineOp {
    fn name(&self) -> &'static str {
        "fmnist-channel-affine"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = Planes::of(layout.shape())?;
        if p.channels != self.scale.len() {
            candle_core::bail!(
                "batch norm: input has {} channels, the layer {}",
                p.channels,
                self.scale.len()
            );
        }
        let x = cpu_slice(storage, layout)?;
        let y = channel_affine(&p, x, &self.scale, &self.shift, self.relu);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

/// `relu(a + b)` for two tensors of one shape (a ResNet block's residual join).
pub struct AddReluOp;

impl CustomOp2 for AddReluOp {
    fn name(&self) -> &'static str {
        "fmnist-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "add_relu: shapes {:?} and {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (a, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        let mut y = zeroed(a.len());
        y.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(
                a.par_chunks(ELEMENTWISE_CHUNK)
                    .zip(b.par_chunks(ELEMENTWISE_CHUNK)),
            )
            .for_each(|(y, (a, b))| {
                for ((o, u), v) in y.iter_mut().zip(a).zip(b) {
                    *o = (u + v).max(0.0);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_res = grad_res.contiguous()?;
        let grad = with_cpu_slices(&[res, &grad_res], |s| Ok(relu_grad(s[0], s[1])))?;
        let grad = tensor_from_vec(grad, res.shape(), res.device())?;
        Ok((
            a.track_op().then(|| grad.clone()),
            b.track_op().then_some(grad),
        ))
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::{
        add_relu, batch_norm_eval, batch_norm_train, reference_batch_norm_eval,
        reference_batch_norm_train,
    };
    use candle_core::{Device, Result, Tensor, Var};

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        // A fixed pseudo-random pattern with an offset, so means are not zero.
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15 ^ seed) >> 40;
                (h % 2000) as f32 / 500.0 - 1.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    const SHAPES: [[usize; 4]; 5] = [
        [4, 3, 5, 5],
        [3, 6, 1, 1],
        [2, 4, 7, 3],
        [1, 2, 9, 9],
        [16, 8, 2, 2],
    ];

    #[test]
    fn train_forward_and_backward_match_candle() -> Result<()> {
        for (i, shape) in SHAPES.iter().enumerate() {
            for relu in [false, true] {
                let c = shape[1];
                let x = Var::from_tensor(&random(shape, i as u64)?)?;
                let gamma = Var::from_tensor(&(random(&[c], 7)? + 1.0)?)?;
                let beta = Var::from_tensor(&random(&[c], 8)?)?;
                let upstream = random(shape, 99)?;
                let run = |fast: bool| -> Result<Vec<Tensor>> {
                    let f = if fast {
                        batch_norm_train
                    } else {
                        reference_batch_norm_train
                    };
                    let (y, mean, var) = f(&x, &gamma, &beta, 1e-5, relu)?;
                    let grads = (&y * &upstream)?.sum_all()?.backward()?;
                    let mut out = vec![y, mean, var];
                    for v in [&x, &gamma, &beta] {
                        out.push(grads.get(v).expect("gradient").clone());
                    }
                    Ok(out)
                };
                let (fast, reference) = (run(true)?, run(false)?);
                for (what, (a, b)) in ["y", "mean", "var", "dx", "dgamma", "dbeta"]
                    .iter()
                    .zip(fast.iter().zip(&reference))
                {
                    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                    let d = max_diff(a, b)?;
                    assert!(
                        d <= 1e-4 * scale,
                        "{what} differs by {d} for {shape:?} relu={relu}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn eval_and_add_relu_match_candle() -> Result<()> {
        for (i, shape) in SHAPES.iter().enumerate() {
            let c = shape[1];
            let x = random(shape, i as u64)?;
            let gamma = random(&[c], 1)?;
            let beta = random(&[c], 2)?;
            let mean = random(&[c], 3)?;
            let var = (random(&[c], 4)?.abs()? + 0.1)?;
            for relu in [false, true] {
                let fast = batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, relu)?;
                let reference =
                    reference_batch_norm_eval(&x, &gamma, &beta, &mean, &var, 1e-5, relu)?;
                assert!(max_diff(&fast, &reference)? < 1e-5, "{shape:?} relu={relu}");
            }
            let a = Var::from_tensor(&x)?;
            let b = Var::from_tensor(&random(shape, 5)?)?;
            let upstream = random(shape, 6)?;
            let fast = add_relu(&a, &b)?;
            let reference = (a.as_tensor() + b.as_tensor())?.relu()?;
            assert!(max_diff(&fast, &reference)? == 0.0);
            let grads_fast = (&fast * &upstream)?.sum_all()?.backward()?;
            let grads_ref = (&reference * &upstream)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let (gf, gr) = (grads_fast.get(v), grads_ref.get(v));
                assert!(max_diff(gf.expect("grad"), gr.expect("grad"))? == 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn channel_count_mismatch_is_an_error() -> Result<()> {
        let x = random(&[2, 3, 4, 4], 0)?;
        let wrong = random(&[4], 1)?;
        assert!(batch_norm_train(&x, &wrong, &wrong, 1e-5, false).is_err());
        Ok(())
    }
}
