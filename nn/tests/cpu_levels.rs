//! The AVX2 path on an AVX-512 machine: with the level capped (`FMNIST_CPU=avx2`, here
//! `set_cpu_level`), both models train and infer to the same figures as at the CPU's best
//! level within f32 rounding, each level is deterministic, and the kernels report running at
//! the capped level only. Its own test binary: the cap is process-wide, and other tests
//! compare bytes.

use candle_core::{DType, Device, Tensor};
use fmnist_nn::learner::Learner;
use fmnist_nn::models::{self, ModelKind, DROPOUT_STREAM};
use fmnist_nn::ops::{self, CpuLevel};
use fmnist_nn::optim::study_optimizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What a short training shows: the loss of each step, the weights after them, and the eval
/// logits of a fixed batch.
struct Trained {
    losses: Vec<f32>,
    weights: Vec<f32>,
    logits: Vec<f32>,
    /// The levels the kernels ran at.
    levels: Vec<CpuLevel>,
}

fn batch(rng: &mut ChaCha8Rng, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let pixels: Vec<f32> = (0..n * 28 * 28)
        .map(|_| rng.gen_range(-1.0f32..2.0))
        .collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.gen_range(0..10)).collect();
    Ok((
        Tensor::from_vec(pixels, (n, 1, 28, 28), &Device::Cpu)?,
        Tensor::from_vec(labels, n, &Device::Cpu)?,
    ))
}

fn train(kind: ModelKind, level: Option<CpuLevel>) -> candle_core::Result<Trained> {
    ops::set_cpu_level(level);
    ops::take_levels_run();
    let mut learner = Learner::init(kind, 3, &Device::Cpu, DType::F32, &study_optimizer(kind))?;
    let mut data = ChaCha8Rng::seed_from_u64(11);
    let mut dropout = ChaCha8Rng::seed_from_u64(12);
    dropout.set_stream(DROPOUT_STREAM);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let (images, labels) = batch(&mut data, 32)?;
        let out = learner.step(&images, &labels, &mut dropout)?;
        losses.push(out.loss.to_scalar::<f32>()?);
    }
    let (images, _) = batch(&mut data, 50)?;
    let logits = learner.model.forward(&images)?.flatten_all()?.to_vec1()?;
    let mut weights = Vec::new();
    for (_, var) in models::sorted_vars(&learner.varmap) {
        weights.extend(var.flatten_all()?.to_vec1::<f32>()?);
    }
    let levels = ops::take_levels_run();
    ops::set_cpu_level(None);
    Ok(Trained {
        losses,
        weights,
        logits,
        levels,
    })
}

/// Largest |a-b| over the largest |b|; NaN counts as infinitely far.
fn relative_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    f64::from(fmnist_nn::check::max_abs_diff(a, b) / scale)
}

#[test]
fn the_avx2_path_matches_the_best_level_and_each_is_deterministic() -> candle_core::Result<()> {
    let best = ops::detected_cpu_level();
    if best < CpuLevel::Avx512 {
        eprintln!(
            "note: this CPU's best level is {best}: the capped and uncapped runs both take the \
             AVX2 (or generic) path; checking determinism and agreement only"
        );
    }
    for kind in [ModelKind::Baseline, ModelKind::Resnet18] {
        let full = train(kind, None)?;
        let again = train(kind, None)?;
        assert!(
            full.weights == again.weights && full.logits == again.logits,
            "{kind:?}: two runs at the best level differ"
        );
        let capped = train(kind, Some(CpuLevel::Avx2))?;
        let capped_again = train(kind, Some(CpuLevel::Avx2))?;
        assert!(
            capped.weights == capped_again.weights,
            "{kind:?}: two AVX2-capped runs differ"
        );
        // `fmnist-pipe check`'s bounds for two f32 paths (fmnist_nn::check::Tolerance): a
        // few Adam steps through batch norm carry rounding differences forward, while a
        // broken kernel lands orders of magnitude above them.
        let bounds = fmnist_nn::check::Tolerance::default();
        for (what, d, tolerance) in [
            (
                "losses",
                relative_diff(&capped.losses, &full.losses),
                bounds.loss_rel,
            ),
            (
                "weights",
                fmnist_nn::check::rel_l2(&capped.weights, &full.weights),
                bounds.param_rel_l2,
            ),
            (
                "logits",
                relative_diff(&capped.logits, &full.logits),
                bounds.final_logits_rel,
            ),
        ] {
            eprintln!("{kind:?}: {what} of the AVX2 path against the {best} path: {d:.2e}");
            assert!(
                d <= tolerance, // false for NaN
                "{kind:?}: {what} of the AVX2 path differ by {d} (relative) from the {best} path"
            );
        }
        // The levels the kernels report, not the bits: on some CPUs (this project's AMD EPYC)
        // the two levels round alike.
        assert_eq!(full.levels, [best], "{kind:?}: kernels at the best level");
        assert_eq!(
            capped.levels,
            [best.min(CpuLevel::Avx2)],
            "{kind:?}: kernels capped to AVX2"
        );
        eprintln!(
            "{kind:?}: capped weights bit-identical to the {best} path: {}",
            capped.weights == full.weights
        );
        assert!(
            full.losses.iter().all(|l| l.is_finite()),
            "{kind:?}: {:?}",
            full.losses
        );
    }
    Ok(())
}
