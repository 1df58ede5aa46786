//! "Bit-reproducible whatever the thread count" (README): the train stage run on compute
//! pools of 1 and of 2 threads writes identical model bytes, for both models (the ResNet-18
//! with batch norm, whose reductions are the likeliest to depend on the split of the work).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use fmnist_stages::train::{self, Params};
use fmnist_stages::{Input, NoProgress, StageContext};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

/// The model bytes of a short training run on a pool of `threads` threads.
fn model_bytes(p: &Params, threads: usize) -> anyhow::Result<Vec<u8>> {
    let inputs = vec![Input {
        stage: "download".into(),
        kind: "download".into(),
        dir: fixture_dir(),
        fingerprint: "fixture".into(),
        params: serde_json::Value::Null,
    }];
    let (out, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        name: "train-threads",
        inputs: &inputs,
        out_dir: out.path(),
        scratch_dir: scratch.path(),
        continue_dir: None,
        device: "cpu",
        kernels: fmnist_stages::ops::Kernels::Fast,
        seed: 42,
        progress: &NoProgress,
        cancel: &cancel,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| train::run(p.clone(), &ctx))?;
    Ok(std::fs::read(out.path().join("model.safetensors"))?)
}

fn same_bytes_on_1_and_2_threads(toml_text: &str) -> anyhow::Result<()> {
    let p: Params = toml::from_str(toml_text)?;
    let one = model_bytes(&p, 1)?;
    let two = model_bytes(&p, 2)?;
    println!("{}: blake3 {}", p.model, blake3::hash(&one).to_hex());
    assert!(
        one == two,
        "{}: 1 and 2 compute threads gave different model bytes",
        p.model
    );
    Ok(())
}

#[test]
fn baseline_bytes_do_not_depend_on_the_thread_count() -> anyhow::Result<()> {
    same_bytes_on_1_and_2_threads(
        r#"
        model = "baseline"
        epochs = 1
        train_limit = 192
        optimizer = { name = "adadelta" }
        eval_every_epoch = false
        "#,
    )
}

#[test]
fn resnet_bytes_do_not_depend_on_the_thread_count() -> anyhow::Result<()> {
    same_bytes_on_1_and_2_threads(
        r#"
        model = "resnet18"
        epochs = 1
        train_limit = 128
        optimizer = { name = "adam", lr = 1e-3 }
        eval_every_epoch = false
        "#,
    )
}
