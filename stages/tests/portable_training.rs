//! The portable path (candle tensor ops only: what CUDA and Metal run) trained on the CPU
//! against the fast CPU kernels, both models, on the fixture subset: a few steps from the same
//! weights, batches and dropout masks, losses per step, first-step gradients, the weights
//! reached and the eval logits within `check::Tolerance`; and the train stage end to end with
//! `kernels = portable`. `cargo test portable` runs these with the op-level portable tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use fmnist_stages::check::{self, CheckRun, PathSpec};
use fmnist_stages::data::{Dataset, Split};
use fmnist_stages::models::ModelKind;
use fmnist_stages::ops::Kernels;
use fmnist_stages::train::{self, Params};
use fmnist_stages::{Input, NoProgress, StageContext};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

fn fixture_train_set() -> Dataset {
    match Dataset::load(&fixture_dir(), Split::Train) {
        Ok(d) => d,
        Err(e) => panic!("fixture training set: {e}"),
    }
}

fn portable_against_fast(model: ModelKind) -> anyhow::Result<()> {
    let report = check::compare(
        &CheckRun::new(model),
        &PathSpec::f32_on(candle_core::Device::Cpu, Kernels::Fast),
        &PathSpec::cpu_portable(),
        &fixture_train_set(),
    )?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    assert!(report.passed, "{model}: {:?}", report.failures);
    assert_eq!(report.steps.len(), 5);
    assert_eq!(
        report.fast_dispatches[1], 0,
        "the portable side ran fast kernels"
    );
    assert!(
        report.fast_dispatches[0] > 0,
        "the fast side never took a fast kernel: the comparison compared nothing"
    );
    for step in &report.steps {
        assert!(
            step.loss
                .iter()
                .all(|l| l.is_finite() && *l > 0.0 && *l < 10.0),
            "{model} step {}: losses {:?}",
            step.step,
            step.loss
        );
    }
    // The two paths really are different code: their f32 results differ in the last bits.
    assert!(
        report.param_rel_l2 > 0.0,
        "{model}: bit-identical weights, the portable path did not run"
    );
    Ok(())
}

#[test]
fn portable_baseline_training_steps_match_the_fast_path() -> anyhow::Result<()> {
    portable_against_fast(ModelKind::Baseline)
}

#[test]
fn portable_resnet18_training_steps_match_the_fast_path() -> anyhow::Result<()> {
    portable_against_fast(ModelKind::Resnet18)
}

/// The f32 portable path is as close to an f64 run as the fast kernels are: neither is off.
#[test]
fn portable_and_fast_first_steps_are_both_close_to_f64() -> anyhow::Result<()> {
    let data = fixture_train_set();
    let run = CheckRun {
        steps: 1,
        ..CheckRun::new(ModelKind::Resnet18)
    };
    for checked in [
        PathSpec::cpu_portable(),
        PathSpec::f32_on(candle_core::Device::Cpu, Kernels::Fast),
    ] {
        let report = check::compare(&run, &checked, &PathSpec::cpu_f64(), &data)?;
        assert!(
            report.passed,
            "{}: {:?}",
            checked.describe(),
            report.failures
        );
    }
    Ok(())
}

fn run_train_stage(kernels: Kernels, out: &Path) -> anyhow::Result<serde_json::Value> {
    let params: Params = toml::from_str(
        r#"
model = "resnet18"
epochs = 1
batch_size = 32
train_limit = 96
optimizer = { name = "adam", lr = 1e-3 }
"#,
    )?;
    let inputs = vec![Input {
        stage: "download".into(),
        kind: "download".into(),
        dir: fixture_dir(),
        fingerprint: "fixture".into(),
        params: serde_json::Value::Null,
    }];
    let scratch = tempfile::tempdir()?;
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        name: "train-resnet",
        inputs: &inputs,
        out_dir: out,
        scratch_dir: scratch.path(),
        continue_dir: None,
        device: "cpu",
        kernels,
        seed: 3,
        progress: &NoProgress,
        cancel: &cancel,
    };
    train::run(params, &ctx)
}

/// The stage puts the choice in force on the threads it trains on: the portable run's model
/// differs from the fast run's in its bits, learns as much, and says how it was trained.
#[test]
fn portable_train_stage_trains_resnet18_and_records_its_kernels() -> anyhow::Result<()> {
    let (fast_dir, portable_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let fast = run_train_stage(Kernels::Fast, fast_dir.path())?;
    let portable = run_train_stage(Kernels::Portable, portable_dir.path())?;
    assert_eq!(portable["kernels"], "portable");
    assert_eq!(fast["kernels"], "fast");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        portable_dir.path().join("config.json"),
    )?)?;
    assert_eq!(config["kernels"], "portable");
    let read = |d: &Path| std::fs::read(d.join("model.safetensors"));
    assert_ne!(
        read(fast_dir.path())?,
        read(portable_dir.path())?,
        "the portable run produced the fast run's bytes"
    );
    let loss = |m: &serde_json::Value| m["final_train_loss"].as_f64().unwrap_or(f64::NAN);
    let (lf, lp) = (loss(&fast), loss(&portable));
    assert!(
        (lf - lp).abs() <= 0.05 * lf,
        "final train loss fast {lf}, portable {lp}"
    );
    let acc = portable["test_accuracy"].as_f64().unwrap_or(f64::NAN);
    assert!((0.0..=1.0).contains(&acc), "test accuracy {acc}");
    Ok(())
}
