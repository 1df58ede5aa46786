//! Splits one training step into forward, backward and optimizer time, and times inference:
//! `cargo run --release -p fmnist-stages --example step_profile -- baseline|resnet18 [THREADS] [--train-only | --infer-only]`.
use candle_core::{DType, Device};
use fmnist_stages::data::{Dataset, Normalization, Split};
use fmnist_stages::models::{self, ModelKind, DROPOUT_STREAM};
use fmnist_stages::optim::OptimizerConfig;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: fmnist_stages::ops::HugePageAlloc = fmnist_stages::ops::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = match args.first().map(String::as_str) {
        Some("resnet18") => ModelKind::Resnet18,
        _ => ModelKind::Baseline,
    };
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    fmnist_stages::ops::tune_allocator_for_training();
    let data = Dataset::load(
        Path::new(fmnist_stages::bench::DEFAULT_DATA_DIR),
        Split::Train,
    )?
    .truncated(2048);
    let device = Device::Cpu;
    let (model, varmap) = models::init(kind, 42, &device)?;
    let cfg: OptimizerConfig = serde_json::from_value(match kind {
        ModelKind::Baseline => serde_json::json!({ "name": "adadelta", "lr": 1.0 }),
        ModelKind::Resnet18 => serde_json::json!({ "name": "adam", "lr": 1e-4 }),
    })?;
    let mut opt = cfg.build(models::trainable_vars(&varmap))?;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    rng.set_stream(DROPOUT_STREAM);
    let order: Vec<usize> = (0..2048).collect();
    let infer_only = args.iter().any(|a| a == "--infer-only");
    let (mut tf, mut tb, mut ts) = (0.0, 0.0, 0.0);
    for (i, idx) in order
        .chunks(64)
        .take(if infer_only { 0 } else { 32 })
        .enumerate()
    {
        let (x, y) = data.batch(idx, Normalization::default(), &device)?;
        let t0 = Instant::now();
        let logits = model.forward_train(&x, &mut rng)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        if i >= 2 {
            tf += (t1 - t0).as_secs_f64();
            tb += (t2 - t1).as_secs_f64();
            ts += (t3 - t2).as_secs_f64();
        }
    }
    let n = 30.0;
    println!("{kind} per batch of 64: forward {:.1} ms, backward {:.1} ms, step {:.1} ms, total {:.1} ms ({:.0} img/s)",
        tf / n * 1e3, tb / n * 1e3, ts / n * 1e3, (tf + tb + ts) / n * 1e3, 64.0 * n / (tf + tb + ts));
    if args.iter().any(|a| a == "--train-only") {
        return Ok(());
    }
    let idx: Vec<usize> = (0..1000).collect();
    let (x, _) = data.batch(&idx, Normalization::default(), &device)?;
    let _ = model.forward(&x)?.to_vec2::<f32>()?;
    for _ in 0..if infer_only { 5 } else { 1 } {
        let t0 = Instant::now();
        let _ = model.forward(&x)?.to_vec2::<f32>()?;
        println!(
            "inference batch 1000: {:.1} ms ({:.0} img/s)",
            t0.elapsed().as_secs_f64() * 1e3,
            1000.0 / t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
