//! Micro-benchmark: forward + backward of the models' convolution (and pooling) layers at
//! batch 64, candle's stock CPU ops against the custom ops in `fmnist_nn::ops`, in ms per
//! batch and GFLOP/s. Run: `cargo run --release -p fmnist-nn --example conv_bench [reps]`.

use candle_core::{Device, Result, Tensor, Var};
use fmnist_nn::ops;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

struct Layer {
    name: &'static str,
    cin: usize,
    cout: usize,
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// Whether the layer's input needs a gradient (not for the first layer).
    input_grad: bool,
}

const LAYERS: &[Layer] = &[
    Layer {
        name: "baseline conv1 1->32 28 k3",
        cin: 1,
        cout: 32,
        size: 28,
        kernel: 3,
        stride: 1,
        padding: 0,
        input_grad: false,
    },
    Layer {
        name: "baseline conv2 32->64 26 k3",
        cin: 32,
        cout: 64,
        size: 26,
        kernel: 3,
        stride: 1,
        padding: 0,
        input_grad: true,
    },
    Layer {
        name: "resnet stem 1->64 28 k7 s2",
        cin: 1,
        cout: 64,
        size: 28,
        kernel: 7,
        stride: 2,
        padding: 3,
        input_grad: false,
    },
    Layer {
        name: "resnet l1 64->64 7 k3",
        cin: 64,
        cout: 64,
        size: 7,
        kernel: 3,
        stride: 1,
        padding: 1,
        input_grad: true,
    },
    Layer {
        name: "resnet l2 64->128 7 k3 s2",
        cin: 64,
        cout: 128,
        size: 7,
        kernel: 3,
        stride: 2,
        padding: 1,
        input_grad: true,
    },
    Layer {
        name: "resnet l2 128->128 4 k3",
        cin: 128,
        cout: 128,
        size: 4,
        kernel: 3,
        stride: 1,
        padding: 1,
        input_grad: true,
    },
    Layer {
        name: "resnet l2 down 64->128 7 k1 s2",
        cin: 64,
        cout: 128,
        size: 7,
        kernel: 1,
        stride: 2,
        padding: 0,
        input_grad: true,
    },
    Layer {
        name: "resnet l3 256->256 2 k3",
        cin: 256,
        cout: 256,
        size: 2,
        kernel: 3,
        stride: 1,
        padding: 1,
        input_grad: true,
    },
    Layer {
        name: "resnet l4 512->512 1 k3",
        cin: 512,
        cout: 512,
        size: 1,
        kernel: 3,
        stride: 1,
        padding: 1,
        input_grad: true,
    },
];

const BATCH: usize = 64;

fn random(rng: &mut ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu)
}

/// Median seconds of `reps` runs of `f`, after one warm-up run.
fn time(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    println!(
        "batch {BATCH}, {} rayon threads, median of {reps}",
        rayon::current_num_threads()
    );
    println!(
        "{:<32} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "layer (fwd+bwd)",
        "candle ms",
        "ours ms",
        "speedup",
        "cand GF/s",
        "ours GF/s",
        "fwd ms",
        "fwd GF/s"
    );
    for l in LAYERS {
        let x_data = random(&mut rng, &[BATCH, l.cin, l.size, l.size])?;
        let x_var = Var::from_tensor(&x_data)?;
        let x = if l.input_grad {
            x_var.as_tensor().clone()
        } else {
            x_data
        };
        let w = Var::from_tensor(&random(&mut rng, &[l.cout, l.cin, l.kernel, l.kernel])?)?;
        let geometry = ops::ConvGeometry::new(x.dims4()?, w.dims4()?, l.stride, l.padding)?;
        let fwd_flops = geometry.flops();
        let train_flops = fwd_flops * if l.input_grad { 3.0 } else { 2.0 };
        let probe = random(
            &mut rng,
            &[BATCH, l.cout, geometry.out_height, geometry.out_width],
        )?;
        let candle = time(reps, || {
            let y = ops::reference_conv2d(&x, &w, None, l.stride, l.padding)?;
            (&y * &probe)?.sum_all()?.backward().map(|_| ())
        })?;
        let ours = time(reps, || {
            let y = ops::conv2d(&x, &w, None, l.stride, l.padding)?;
            (&y * &probe)?.sum_all()?.backward().map(|_| ())
        })?;
        let x_plain = x.detach();
        let w_plain = w.as_tensor().detach();
        let fwd = time(reps, || {
            ops::conv2d(&x_plain, &w_plain, None, l.stride, l.padding).map(|_| ())
        })?;
        println!(
            "{:<32} {:>9.2} {:>9.2} {:>6.1}x {:>9.1} {:>9.1} {:>9.2} {:>9.1}",
            l.name,
            candle * 1e3,
            ours * 1e3,
            candle / ours,
            train_flops / candle / 1e9,
            train_flops / ours / 1e9,
            fwd * 1e3,
            fwd_flops / fwd / 1e9
        );
    }
    for (name, dims, k, s, p) in [
        ("baseline pool 64ch 24 k2", [BATCH, 64, 24, 24], 2, 2, 0),
        ("resnet pool 64ch 14 k3 s2 p1", [BATCH, 64, 14, 14], 3, 2, 1),
    ] {
        let x = Var::from_tensor(&random(&mut rng, &dims)?)?;
        let probe_dims = ops::max_pool2d(&x.detach(), k, s, p)?.dims().to_vec();
        let probe = random(&mut rng, &probe_dims)?;
        // candle cannot backprop overlapping windows: time its forward only there.
        let candle = time(reps, || {
            let y = ops::portable_max_pool2d(&x, k, s, p)?;
            if k == s {
                (&y * &probe)?.sum_all()?.backward()?;
            }
            Ok(())
        })?;
        let ours = time(reps, || {
            let y = ops::max_pool2d(&x, k, s, p)?;
            (&y * &probe)?.sum_all()?.backward().map(|_| ())
        })?;
        let note = if k == s { "" } else { " (candle: fwd only)" };
        println!(
            "{name:<32} {:>9.2} {:>9.2} {:>6.1}x{note}",
            candle * 1e3,
            ours * 1e3,
            candle / ours
        );
    }
    Ok(())
}
