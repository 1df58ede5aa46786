//! Throughput benchmark behind `fmnist-pipe bench`: trains a model for one epoch on the first N
//! real training images (batch 64, the study's optimizer), then runs inference over the same
//! images, and reports images/s and peak memory. Run with the same N and threads as the PyTorch
//! reference (`scripts/bench-vs-torch.sh` does both) to compare.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{Dataset, Normalization, Split, PIXELS};
use crate::device;
use crate::learner::{self, Learner, NoHooks};
use crate::models::{ModelKind, DROPOUT_STREAM};
use crate::ops::{self, Kernels};
use crate::optim;

/// Where the real data set lives when no directory is given.
pub const DEFAULT_DATA_DIR: &str = crate::data::DEBIAN_DATA_DIR;
/// Training batch size (the study's).
pub const TRAIN_BATCH: usize = 64;
/// Inference batch size (the PyTorch reference evaluates in batches of 1000 too).
pub const INFER_BATCH: usize = 1000;

/// What one benchmark run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: ModelKind,
    pub images: usize,
    pub threads: usize,
    /// Where it ran: "cpu", "cuda:0", ...
    pub device: String,
    /// "fast" (this crate's CPU kernels) or "portable" (candle's tensor ops only, the path a
    /// GPU runs).
    pub kernels: Kernels,
    /// The x86 vector level the CPU kernels ran at ("avx512", "avx2", "generic").
    pub cpu_level: ops::CpuLevel,
    pub train_seconds: f64,
    pub train_images_per_s: f64,
    pub final_batch_loss: f32,
    pub infer_seconds: f64,
    pub infer_images_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MiB; None where /proc is unavailable.
    pub peak_rss_mib: Option<f64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} on {} images, {}, {} threads, {} kernels, CPU level {}",
            self.model, self.images, self.device, self.threads, self.kernels, self.cpu_level
        )?;
        writeln!(
            f,
            "  train      {:>8.1} images/s  ({:.2}s, last batch loss {:.4})",
            self.train_images_per_s, self.train_seconds, self.final_batch_loss
        )?;
        writeln!(
            f,
            "  inference  {:>8.1} images/s  ({:.2}s, batch {INFER_BATCH})",
            self.infer_images_per_s, self.infer_seconds
        )?;
        match self.peak_rss_mib {
            Some(mib) => write!(f, "  peak RSS   {mib:>8.1} MiB"),
            None => write!(f, "  peak RSS   unknown"),
        }
    }
}

/// What to benchmark, and where.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: ModelKind,
    /// How many of the first training images.
    pub images: usize,
    /// CPU compute threads.
    pub threads: usize,
    /// Folder with the four IDX files.
    pub data_dir: PathBuf,
    pub kernels: Kernels,
    /// A device request: "cpu", "cuda", "cuda:N", "metal", "auto".
    pub device: String,
}

/// Benchmarks as `options` say.
pub fn run(options: &BenchOptions) -> anyhow::Result<BenchReport> {
    if options.images == 0 {
        anyhow::bail!("bench needs at least one image (--images N with N >= 1)");
    }
    if options.threads == 0 {
        anyhow::bail!("bench needs at least one thread");
    }
    let device = device::select(&options.device)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.threads)
        .build()
        .context("starting the benchmark's thread pool")?;
    ops::tune_allocator_for_training();
    pool.install(|| ops::with_kernels(options.kernels, || measure(options, &device)))
}

fn measure(options: &BenchOptions, device: &Device) -> anyhow::Result<BenchReport> {
    let (kind, data_dir) = (options.model, options.data_dir.as_path());
    let train_set = Dataset::load(data_dir, Split::Train)
        .with_context(|| format!("loading the training set from {}", data_dir.display()))?
        .truncated(options.images);
    let images = train_set.len();
    if images == 0 {
        anyhow::bail!("the training set in {} is empty", data_dir.display());
    }
    let norm = Normalization::default();
    let mut learner = Learner::init(kind, 42, device, DType::F32, &optim::study_optimizer(kind))?;
    let order = train_set.shuffled_indices(42);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(42);
    dropout_rng.set_stream(DROPOUT_STREAM);
    let batch = |indices: &[usize]| Ok(train_set.batch(indices, norm, device)?);
    let trained =
        learner.train_epoch(&order, TRAIN_BATCH, batch, &mut dropout_rng, &mut NoHooks)?;
    let (train_seconds, last_loss) = (trained.seconds, trained.last_loss);

    // One small warm-up batch first, as the PyTorch side of scripts/bench-vs-torch.sh does.
    let warm = images.min(TRAIN_BATCH);
    let warm_up = Dataset {
        images: train_set.images[..warm * PIXELS].to_vec(),
        labels: train_set.labels[..warm].to_vec(),
    };
    learner::evaluate(
        &*learner.model,
        &warm_up,
        TRAIN_BATCH,
        norm,
        device,
        &mut NoHooks,
    )?;
    let inferred = learner::evaluate(
        &*learner.model,
        &train_set,
        INFER_BATCH,
        norm,
        device,
        &mut NoHooks,
    )?;
    let infer_seconds = inferred.forward_seconds;

    Ok(BenchReport {
        model: kind,
        images,
        threads: options.threads,
        device: device::describe(device),
        kernels: options.kernels,
        cpu_level: ops::cpu_level(),
        train_seconds,
        train_images_per_s: images as f64 / train_seconds.max(1e-9),
        final_batch_loss: last_loss,
        infer_seconds,
        infer_images_per_s: images as f64 / infer_seconds.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// VmHWM (the process's peak resident set) from /proc/self/status, in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
