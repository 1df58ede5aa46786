//! The train stage end to end on the fixture subset of Fashion-MNIST: both models learn,
//! outputs are written, runs are byte-reproducible, an interrupted run resumes to the same
//! bytes (also when its newest checkpoints were damaged: they are discarded with a warning),
//! and bad params are rejected with the valid values listed.
//! (Over 500 lines: the checkpoint-damage cases share the interrupted run and the reference
//! model bytes built once above them.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

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
        continue_dir: None,
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
    // Timings live in timings.json (left out of the hash downstream stages see), not in
    // history.json.
    assert!(
        epochs.iter().all(|e| e.get("seconds").is_none()),
        "{epochs:?}"
    );
    let timings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("timings.json"))?)?;
    assert_eq!(timings["epochs"].as_array().map(Vec::len), Some(2));
    assert!(timings["epochs"][1]["images_per_s"].as_f64().unwrap_or(0.0) > 0.0);
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

/// Records the lines the stage prints for the user.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn lines(&self) -> Vec<String> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Progress for Recorder {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn finish(&self, _: &str) {}
    fn println(&self, line: &str) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push(line.to_string());
        }
    }
}

/// 2 batches per epoch, 3 epochs: small enough to train several times per test.
const DAMAGE_RUN: &str = r#"
    model = "baseline"
    epochs = 3
    train_limit = 128
    optimizer = { name = "adadelta" }
    lr_decay = 0.7
    eval_every_epoch = false
"#;

/// The model bytes of an uninterrupted DAMAGE_RUN (trained once for all tests).
fn reference_model() -> &'static [u8] {
    static REFERENCE: OnceLock<Vec<u8>> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let run = || -> anyhow::Result<Vec<u8>> {
            let (out, _) = train_once(&params(DAMAGE_RUN))?;
            Ok(std::fs::read(out.path().join("model.safetensors"))?)
        };
        match run() {
            Ok(bytes) => bytes,
            Err(e) => panic!("the reference run failed: {e:#}"),
        }
    })
}

/// A DAMAGE_RUN stopped by Ctrl-C in its third epoch: its scratch folder holds the
/// checkpoints after epochs 1 and 2.
fn interrupted_damage_run() -> anyhow::Result<tempfile::TempDir> {
    let scratch = tempfile::tempdir()?;
    let out = tempfile::tempdir()?;
    let cancel = AtomicBool::new(false);
    let progress = CancelAfter {
        after: 5,
        done: AtomicU64::new(0),
        cancel: &cancel,
    };
    match run_stage(
        &params(DAMAGE_RUN),
        out.path(),
        scratch.path(),
        &progress,
        &cancel,
    ) {
        Ok(_) => anyhow::bail!("the run was not interrupted"),
        Err(e) if e.downcast_ref::<Cancelled>().is_some() => {}
        Err(e) => return Err(e),
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scratch.path().join("checkpoint.json"))?)?;
    let recorded: Vec<u64> = meta["checkpoints"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["epochs_done"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(recorded, [1, 2], "{meta}");
    for file in [MODEL_1, OPTIM_1, MODEL_2, OPTIM_2] {
        assert!(scratch.path().join(file).is_file(), "{file} missing");
    }
    Ok(scratch)
}

const MODEL_1: &str = "epoch-1.model.safetensors";
const OPTIM_1: &str = "epoch-1.optimizer.safetensors";
const MODEL_2: &str = "epoch-2.model.safetensors";
const OPTIM_2: &str = "epoch-2.optimizer.safetensors";

/// Reruns DAMAGE_RUN in `scratch`; checks that it ends with the bytes of an uninterrupted
/// run, all 3 epochs in its history and only the last two checkpoints kept. Returns what it
/// printed.
fn rerun_matches_uninterrupted(scratch: &Path) -> anyhow::Result<Vec<String>> {
    let out = tempfile::tempdir()?;
    let recorder = Recorder::default();
    run_stage(
        &params(DAMAGE_RUN),
        out.path(),
        scratch,
        &recorder,
        &AtomicBool::new(false),
    )?;
    let lines = recorder.lines();
    assert!(
        std::fs::read(out.path().join("model.safetensors"))? == reference_model(),
        "rerun differs from an uninterrupted run; it printed {lines:#?}"
    );
    assert_eq!(history(out.path())?.len(), 3);
    let mut left: Vec<String> = std::fs::read_dir(scratch)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "checkpoint.json",
            "epoch-2.model.safetensors",
            "epoch-2.optimizer.safetensors",
            "epoch-3.model.safetensors",
            "epoch-3.optimizer.safetensors",
        ]
    );
    Ok(lines)
}

/// Overwrites 64 bytes near the end of a file (tensor data) with their complement.
fn overwrite_bytes(path: &Path) -> anyhow::Result<()> {
    let mut bytes = std::fs::read(path)?;
    let n = bytes.len();
    for b in &mut bytes[n - 100..n - 36] {
        *b = !*b;
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

/// Cuts a file to half its length.
fn truncate(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = f.metadata()?.len();
    f.set_len(len / 2)?;
    Ok(())
}

/// The printed lines that contain every one of `words`.
/// Exactly one of `lines` holds every one of `parts`.
fn assert_one(lines: &[String], parts: &[&str]) {
    assert_eq!(lines_with(lines, parts).len(), 1, "{parts:?} in {lines:#?}");
}

fn lines_with<'a>(lines: &'a [String], words: &[&str]) -> Vec<&'a String> {
    lines
        .iter()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

#[test]
fn changed_latest_checkpoint_is_discarded_with_a_warning() -> anyhow::Result<()> {
    let scratch = interrupted_damage_run()?;
    overwrite_bytes(&scratch.path().join(MODEL_2))?;
    let lines = rerun_matches_uninterrupted(scratch.path())?;
    assert_one(
        &lines,
        &["warning", MODEL_2, "changed or damaged", "blake3"],
    );
    assert_one(&lines, &["resuming after epoch 1/3"]);
    Ok(())
}

#[test]
fn truncated_latest_checkpoint_is_discarded_with_a_warning() -> anyhow::Result<()> {
    let scratch = interrupted_damage_run()?;
    truncate(&scratch.path().join(MODEL_2))?;
    let lines = rerun_matches_uninterrupted(scratch.path())?;
    assert_one(&lines, &["warning", MODEL_2, "truncated"]);
    assert_one(&lines, &["resuming after epoch 1/3"]);
    Ok(())
}

#[test]
fn with_both_checkpoints_damaged_training_starts_over() -> anyhow::Result<()> {
    let scratch = interrupted_damage_run()?;
    overwrite_bytes(&scratch.path().join(OPTIM_2))?;
    truncate(&scratch.path().join(MODEL_1))?;
    let lines = rerun_matches_uninterrupted(scratch.path())?;
    assert_one(&lines, &["warning", OPTIM_2, "changed or damaged"]);
    assert_one(&lines, &["warning", MODEL_1, "truncated", "first epoch"]);
    assert!(lines_with(&lines, &["resuming"]).is_empty(), "{lines:#?}");
    Ok(())
}

#[test]
fn unloadable_checkpoint_with_matching_hash_is_discarded() -> anyhow::Result<()> {
    // The optimizer's state in the model's place, recorded as if written so: it passes the
    // size and hash checks but lacks the model's tensors.
    let scratch = interrupted_damage_run()?;
    let dir = scratch.path();
    std::fs::copy(dir.join(OPTIM_2), dir.join(MODEL_2))?;
    let bytes = std::fs::read(dir.join(MODEL_2))?;
    let meta_path = dir.join("checkpoint.json");
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path)?)?;
    let record = &mut meta["checkpoints"][1]["model"];
    record["size"] = bytes.len().into();
    record["blake3"] = blake3::hash(&bytes).to_hex().to_string().into();
    std::fs::write(&meta_path, serde_json::to_vec(&meta)?)?;
    let lines = rerun_matches_uninterrupted(dir)?;
    assert_one(&lines, &["warning", MODEL_2, "no tensor"]);
    assert_one(&lines, &["resuming after epoch 1/3"]);
    Ok(())
}

#[test]
fn old_format_checkpoint_json_is_ignored_with_a_warning() -> anyhow::Result<()> {
    // Format 1 recorded one checkpoint and no hashes.
    let scratch = interrupted_damage_run()?;
    let meta_path = scratch.path().join("checkpoint.json");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta_path)?)?;
    let old = serde_json::json!({
        "version": meta["version"],
        "params": meta["params"],
        "seed": meta["seed"],
        "epochs_done": 2,
        "history": meta["checkpoints"][1]["history"],
    });
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&old)?)?;
    let lines = rerun_matches_uninterrupted(scratch.path())?;
    assert_one(&lines, &["warning", "checkpoint.json", "older format"]);
    assert!(lines_with(&lines, &["resuming"]).is_empty(), "{lines:#?}");

    std::fs::write(&meta_path, b"{ not json")?;
    let lines = rerun_matches_uninterrupted(scratch.path())?;
    assert_one(&lines, &["warning", "checkpoint.json", "not valid JSON"]);
    Ok(())
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
        continue_dir: None,
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
