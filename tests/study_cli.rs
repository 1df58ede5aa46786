//! The study end to end through the real binary: the built-in stages (download, stats, train,
//! evaluate, visualize, report) on the committed fixture subset, in a temp workspace.

use std::path::Path;
use std::process::{Command, Output};
use std::time::SystemTime;

mod common;
use common::{fixture_dir, text};

/// A small version of the default pipeline: same stages, a few hundred images.
fn pipeline(samples: &str) -> String {
    format!(
        r#"
[pipeline]
device = "cpu"
seed = 7

[stages.download]
kind = "download"
sources = ["{fixtures}"]
expect = "fixture-subset"

[stages.stats]
kind = "stats"
needs = ["download"]

[stages.train-baseline]
kind = "train"
needs = ["download"]
model = "baseline"
epochs = 1
batch_size = 32
train_limit = 256
optimizer = {{ name = "adadelta", lr = 1.0 }}
lr_decay = 0.7

[stages.train-resnet]
kind = "train"
needs = ["download"]
model = "resnet18"
epochs = 1
batch_size = 32
train_limit = 64
eval_every_epoch = false
optimizer = {{ name = "adam", lr = 1e-3 }}

[stages.evaluate]
kind = "evaluate"
needs = ["download", "train-baseline", "train-resnet"]
test_limit = 200

[stages.visualize]
kind = "visualize"
needs = ["download", "train-baseline", "train-resnet"]
samples = {samples}

[stages.report]
kind = "report"
needs = ["stats", "train-baseline", "train-resnet", "evaluate", "visualize"]
"#,
        fixtures = fixture_dir().display()
    )
}

fn fmnist(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fmnist-pipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("the fmnist-pipe binary runs")
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_study_runs_then_reruns_only_what_a_change_affects() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    std::fs::write(dir.join("pipeline.toml"), pipeline(r#"["Sneaker"]"#)).unwrap();

    let first = fmnist(dir, &["run"]);
    assert!(first.status.success(), "{}", text(&first));
    let art = dir.join("artifacts");
    for f in [
        "download/train-images-idx3-ubyte",
        "stats/stats.json",
        "train-baseline/model.safetensors",
        "train-baseline/history.json",
        "train-resnet/model.safetensors",
        "evaluate/metrics.json",
        "evaluate/comparison.md",
        "report/report.html",
    ] {
        assert!(art.join(f).is_file(), "missing {f}\n{}", text(&first));
    }
    assert!(dir.join("pipeline.lock").is_file());
    let report = std::fs::read_to_string(art.join("report/report.html")).unwrap();
    assert!(
        report.contains("Trained on <code>cpu</code> with the fast kernels"),
        "the report names where each model trained"
    );

    // The confusion matrix accounts for every evaluated image.
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("evaluate/metrics.json")).unwrap())
            .unwrap();
    let baseline = &metrics["models"]["train-baseline"];
    let confusion = baseline["confusion"].as_array().unwrap();
    let total: u64 = confusion
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 200);
    let accuracy = baseline["accuracy"].as_f64().unwrap();
    assert!(
        accuracy > 0.3,
        "a trained baseline beats chance: {accuracy}"
    );

    let model = art.join("train-baseline/model.safetensors");
    let model_time = modified(&model);
    let visualize_time = modified(&art.join("visualize"));

    // Nothing changed: nothing runs.
    let second = fmnist(dir, &["run"]);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(modified(&model), model_time);
    assert_eq!(modified(&art.join("visualize")), visualize_time);

    // A visualize param changes: visualize (and the report showing it) rerun; training does not.
    std::fs::write(dir.join("pipeline.toml"), pipeline(r#"["Trouser", 3]"#)).unwrap();
    let status = fmnist(dir, &["status"]);
    assert!(text(&status).contains("samples"), "{}", text(&status));
    let third = fmnist(dir, &["run"]);
    assert!(third.status.success(), "{}", text(&third));
    assert_eq!(modified(&model), model_time, "training must not rerun");
    assert_ne!(modified(&art.join("visualize")), visualize_time);

    // Early cutoff: retraining to the same model bytes (only its timings differ) leaves
    // evaluate, visualize and the report up to date.
    let model_bytes = std::fs::read(&model).unwrap();
    let retrain = fmnist(dir, &["run", "--force", "--stage", "train-baseline"]);
    assert!(retrain.status.success(), "{}", text(&retrain));
    assert!(
        text(&retrain).contains("train-baseline: done"),
        "{}",
        text(&retrain)
    );
    assert_eq!(
        std::fs::read(&model).unwrap(),
        model_bytes,
        "same seed, same bytes"
    );
    let after = fmnist(dir, &["run"]);
    let shown = text(&after);
    assert!(after.status.success(), "{shown}");
    for stage in ["evaluate", "visualize", "report"] {
        assert!(shown.contains(&format!("{stage}: up to date")), "{shown}");
    }
}

#[test]
fn bad_stage_params_are_config_errors_listing_valid_values() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    std::fs::write(dir.join("pipeline.toml"), pipeline(r#"["Sneaker"]"#)).unwrap();
    let out = fmnist(
        dir,
        &["run", "--set", r#"train-baseline.model="mlp""#, "--dry-run"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(
        msg.contains("mlp") && msg.contains("baseline") && msg.contains("resnet18"),
        "{msg}"
    );

    let out = fmnist(
        dir,
        &[
            "run",
            "--set",
            r#"train-resnet.optimizer={ name = "rmsprop", lr = 0.1 }"#,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("adadelta"), "{}", text(&out));
}

/// Download and one short ResNet-18 training, on `device`.
fn resnet_only_pipeline(device: &str) -> String {
    format!(
        r#"
[pipeline]
device = "{device}"
seed = 7

[stages.download]
kind = "download"
sources = ["{fixtures}"]
expect = "fixture-subset"

[stages.train-resnet]
kind = "train"
needs = ["download"]
model = "resnet18"
epochs = 1
batch_size = 32
train_limit = 64
eval_every_epoch = false
optimizer = {{ name = "adam", lr = 1e-3 }}
"#,
        fixtures = fixture_dir().display()
    )
}

/// `kernels = "portable"` (here through --set) trains on the path a GPU runs; the lock and
/// the model's config.json say so; the setting is recorded, not hashed, so switching back to
/// the fast kernels does not make the stage stale. `auto` without a GPU build is the CPU.
#[test]
fn portable_kernels_setting_trains_and_is_recorded_not_hashed() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    std::fs::write(dir.join("pipeline.toml"), resnet_only_pipeline("auto")).unwrap();
    let out = fmnist(dir, &["run", "--set", "pipeline.kernels=portable"]);
    assert!(out.status.success(), "{}", text(&out));
    let lock = std::fs::read_to_string(dir.join("pipeline.lock")).unwrap();
    let lock: toml::Table = toml::from_str(&lock).unwrap();
    let entry = &lock["stages"]["train-resnet"];
    assert_eq!(entry["kernels"].as_str(), Some("portable"), "{entry}");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("artifacts/train-resnet/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["kernels"], "portable");
    if !cfg!(feature = "cuda") {
        assert_eq!(
            config["device"], "cpu",
            "auto without a GPU build is the CPU"
        );
    }
    let status = fmnist(dir, &["status"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        !text(&status).contains("stale"),
        "kernels are recorded, not hashed: {}",
        text(&status)
    );
    assert!(
        text(&status).contains("up to date (ran on cpu/portable)"),
        "{}",
        text(&status)
    );
}

#[test]
fn bad_kernels_and_cpu_level_values_are_config_errors() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    let pipeline = resnet_only_pipeline("cpu").replace("seed = 7", "seed = 7\nkernels = \"gpu\"");
    std::fs::write(dir.join("pipeline.toml"), pipeline).unwrap();
    let out = fmnist(dir, &["run", "--dry-run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("pipeline.toml:") && text(&out).contains("fast or portable"),
        "{}",
        text(&out)
    );

    std::fs::write(dir.join("pipeline.toml"), resnet_only_pipeline("cpu")).unwrap();
    for (var, value, expected) in [
        ("FMNIST_KERNELS", "turbo", "fast or portable"),
        ("FMNIST_CPU", "avx9", "auto, avx2 or avx512"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fmnist-pipe"))
            .args(["run", "--dry-run"])
            .current_dir(dir)
            .env(var, value)
            .output()
            .expect("the fmnist-pipe binary runs");
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let said = text(&out);
        assert!(said.contains(var) && said.contains(expected), "{said}");
    }
}

/// A build without CUDA asked for CUDA says which build to make (exit 1), for a stage and for
/// `check`, and keeps the previous outputs.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_a_cuda_build_names_the_feature() {
    let ws = tempfile::tempdir().unwrap();
    let dir = ws.path();
    std::fs::write(dir.join("pipeline.toml"), resnet_only_pipeline("cuda")).unwrap();
    let out = fmnist(dir, &["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--features cuda"), "{}", text(&out));
    assert!(!dir.join("artifacts/train-resnet").exists());

    let fixtures = fixture_dir();
    let out = fmnist(
        dir,
        &[
            "check",
            "--device",
            "cuda",
            "--data",
            fixtures.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--features cuda"), "{}", text(&out));
}
