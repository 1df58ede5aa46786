//! The train stage end to end on the fixture subset of Fashion-MNIST: both models learn,
//! outputs are written, runs are byte-reproducible, an interrupted run resumes to the same
//! bytes, and bad params are rejected with the valid values listed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use fmnist_stages::train::{self, Params};
use fmnist_stages::{Cancelled, Input, NoProgress, Progress, StageContext};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

fn download_input() -> Vec<Input> {
    vec![Input {
        stage: "download".into(),
        kind: "download".into(),
        dir: fixture_dir(),
        fingerprint: "fixture".into(),
        params: serde_json::Value::Null,
    }]
}

fn params(toml_text: &str) -> Params {
    match toml::from_str(toml_text) {
        Ok(p) => p,
        Err(e) => panic!("test params do not parse: {e}"),
    }
}

/// Runs the stage with fresh out/scratch folders (or the given scratch folder).
fn run_stage(
    p: &Params,
    out: &Path,
    scratch: &Path,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> anyhow::Result<serde_json::Value> {
    let inputs = download_input();
    let ctx = StageContext {
        name: "train-test",
        inputs: &inputs,
        out_dir: out,
        scratch_dir: scratch,
        device: "cpu",
        kernels: fmnist_stages::ops::Kernels::Fast,
        seed: 42,
        progress,
        cancel,
    };
    train::run(p.clone(), &ctx)
}

fn train_once(p: &Params) -> anyhow::Result<(tempfile::TempDir, serde_json::Value)> {
    let out = tempfile::tempdir()?;
    let scratch = tempfile::tempdir()?;
    let metrics = run_stage(
        p,
        out.path(),
        scratch.path(),
        &NoProgress,
        &AtomicBool::new(false),
    )?;
    Ok((out, metrics))
}

fn history(out: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let h: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("history.json"))?)?;
    Ok(h["epochs"].as_array().cloned().unwrap_or_default())
}

#[test]
fn baseline_learns_and_writes_its_outputs() -> anyhow::Result<()> {
    let p = params(
        r#"
        model = "baseline"
        epochs = 2
        train_limit = 320
        optimizer = { name = "adadelta", lr = 1.0 }
        lr_decay = 0.7
        "#,
    );
    let (out, metrics) = train_once(&p)?;
    let epochs = history(out.path())?;
    assert_eq!(epochs.len(), 2);
    let loss = |i: usize| epochs[i]["train_loss"].as_f64().unwrap_or(f64::NAN);
    assert!(
        loss(0) < 2.30,
        "first epoch loss {} not below chance",
        loss(0)
    );
    assert!(loss(1) < loss(0), "loss did not fall: {epochs:?}");
    assert!((epochs[1]["lr"].as_f64().unwrap_or(0.0) - 0.7).abs() < 1e-12);
    let acc = epochs[1]["test_accuracy"].as_f64().unwrap_or(0.0);
    assert!(acc > 0.3, "test accuracy {acc} after 2 small epochs");

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("config.json"))?)?;
    assert_eq!(config["param_count"], 1_199_882);
    assert_eq!(config["model"], "baseline");
    assert_eq!(config["device"], "cpu");
    assert_eq!(config["params"]["seed"], 42);
    assert_eq!(metrics["param_count"], 1_199_882);
    for file in ["model.safetensors", "loss.png", "accuracy.png"] {
        assert!(out.path().join(file).is_file(), "{file} missing");
    }
    let model = fmnist_stages::models::load(
        fmnist_stages::models::ModelKind::Baseline,
        &out.path().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(model.param_count(), 1_199_882);
    Ok(())
}

#[test]
fn resnet_learns_and_saves_running_stats() -> anyhow::Result<()> {
    let p = params(
        r#"
        model = "resnet18"
        epochs = 2
        train_limit = 128
        optimizer = { name = "adam", lr = 1e-3 }
        eval_every_epoch = false
        "#,
    );
    let (out, metrics) = train_once(&p)?;
    let epochs = history(out.path())?;
    let loss = |i: usize| epochs[i]["train_loss"].as_f64().unwrap_or(f64::NAN);
    assert!(loss(1) < loss(0), "loss did not fall: {epochs:?}");
    assert!(epochs[0]["test_accuracy"].is_null());
    assert!(epochs[1]["test_accuracy"].is_f64());
    assert_eq!(metrics["param_count"], 11_175_370);
    let tensors = candle_core::safetensors::load(
        out.path().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let running_var = tensors
        .get("layer1.0.bn1.running_var")
        .ok_or_else(|| anyhow::anyhow!("running stats not saved"))?;
    let values = running_var.to_vec1::<f32>()?;
    assert!(
        values.iter().any(|v| (v - 1.0).abs() > 1e-3),
        "running var never updated"
    );
    Ok(())
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() -> anyhow::Result<()> {
    let text = r#"
        model = "baseline"
        epochs = 1
        train_limit = 192
        optimizer = { name = "adadelta" }
        eval_every_epoch = false
    "#;
    let (a, _) = train_once(&params(text))?;
    let (b, _) = train_once(&params(text))?;
    let bytes = |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors"));
    assert!(
        bytes(&a)? == bytes(&b)?,
        "same seed gave different model bytes"
    );
    let (c, _) = train_once(&params(&format!("{text}\nseed = 7")))?;
    assert!(bytes(&a)? != bytes(&c)?, "seed is ignored");
    Ok(())
}

/// Flips the cancel flag once `after` batches are done (a Ctrl-C in the middle of training).
struct CancelAfter<'a> {
    after: u64,
    done: AtomicU64,
    cancel: &'a AtomicBool,
}

impl Progress for CancelAfter<'_> {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, n: u64) {
        if self.done.fetch_add(n, Ordering::SeqCst) + n >= self.after {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
    fn message(&self, _: &str) {}
    fn finish(&self, _: &str) {}
    fn println(&self, _: &str) {}
}

fn interrupted_then_resumed_matches_uninterrupted(
    text: &str,
    cancel_after: u64,
) -> anyhow::Result<()> {
    let p = params(text);
    let (reference, _) = train_once(&p)?;

    let scratch = tempfile::tempdir()?;
    let first_out = tempfile::tempdir()?;
    let cancel = AtomicBool::new(false);
    let progress = CancelAfter {
        after: cancel_after,
        done: AtomicU64::new(0),
        cancel: &cancel,
    };
    let err = match run_stage(&p, first_out.path(), scratch.path(), &progress, &cancel) {
        Ok(_) => anyhow::bail!("the run was not interrupted"),
        Err(e) => e,
    };
    assert!(
        err.downcast_ref::<Cancelled>().is_some(),
        "unexpected error: {err:#}"
    );
    assert!(scratch.path().join("checkpoint.json").is_file());

    let resumed_out = tempfile::tempdir()?;
    run_stage(
        &p,
        resumed_out.path(),
        scratch.path(),
        &NoProgress,
        &AtomicBool::new(false),
    )?;
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors"));
    assert!(
        bytes(reference.path())? == bytes(resumed_out.path())?,
        "resumed run differs from an uninterrupted one"
    );
    assert_eq!(history(resumed_out.path())?.len(), p.epochs);
    Ok(())
}

#[test]
fn baseline_resumes_after_interruption_to_identical_bytes() -> anyhow::Result<()> {
    // 3 batches per epoch; Ctrl-C during the second epoch.
    interrupted_then_resumed_matches_uninterrupted(
        r#"
        model = "baseline"
        epochs = 2
        train_limit = 192
        optimizer = { name = "adadelta" }
        lr_decay = 0.7
        augment = true
        eval_every_epoch = false
        "#,
        4,
    )
}

#[test]
fn resnet_resumes_after_interruption_to_identical_bytes() -> anyhow::Result<()> {
    // 1 batch per epoch, 3 epochs; Ctrl-C during epoch 2, seen before epoch 3's batch: the
    // rerun resumes from the epoch-2 checkpoint (BN running stats and Adam moments included).
    interrupted_then_resumed_matches_uninterrupted(
        r#"
        model = "resnet18"
        epochs = 3
        batch_size = 32
        train_limit = 32
        optimizer = { name = "adam", lr = 1e-3 }
        eval_every_epoch = false
        "#,
        2,
    )
}

#[test]
fn bad_names_are_rejected_with_the_valid_ones_listed() {
    let err = |text: &str| match toml::from_str::<Params>(text) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let msg = err("model = \"vgg\"\noptimizer = { name = \"adam\" }");
    assert!(
        msg.contains("baseline") && msg.contains("resnet18"),
        "{msg}"
    );
    let msg = err("model = \"baseline\"\noptimizer = { name = \"adamw\" }");
    assert!(
        msg.contains("adadelta") && msg.contains("adam") && msg.contains("sgd"),
        "{msg}"
    );
    let msg = err("model = \"baseline\"\noptimizer = { name = \"adam\" }\nepoch = 3");
    assert!(msg.contains("epoch"), "{msg}");
    let msg = err("model = \"baseline\"\noptimizer = { name = \"adadelta\", betas = [0.9, 0.99] }");
    assert!(msg.contains("betas"), "{msg}");
}

#[test]
fn invalid_values_and_devices_are_clear_errors() -> anyhow::Result<()> {
    let p = params("model = \"baseline\"\nepochs = 0\noptimizer = { name = \"adam\" }");
    assert!(p.validate().is_err());
    let p = params("model = \"baseline\"\noptimizer = { name = \"adam\", betas = [1.5, 0.9] }");
    assert!(p.validate().is_err());

    let p = params("model = \"baseline\"\ntrain_limit = 64\noptimizer = { name = \"adam\" }");
    let inputs = download_input();
    let (out, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        name: "train-test",
        inputs: &inputs,
        out_dir: out.path(),
        scratch_dir: scratch.path(),
        device: "tpu",
        kernels: fmnist_stages::ops::Kernels::Fast,
        seed: 1,
        progress: &NoProgress,
        cancel: &cancel,
    };
    let msg = train::run(p, &ctx)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("cpu") && msg.contains("cuda"), "{msg}");
    Ok(())
}
