//! Throughput measurement (ignored by default: it reads the real dataset and takes minutes):
//! one epoch on the first 6,400 training images, then the test set once.
//!
//! `FMNIST_MODEL=resnet18 cargo test --release -p fmnist-stages --test train_throughput -- --ignored --nocapture`

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use fmnist_stages::train::{self, Params};
use fmnist_stages::{Input, Progress, StageContext};

struct PrintSummaries;

impl Progress for PrintSummaries {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn finish(&self, summary: &str) {
        println!("{summary}");
    }
    fn println(&self, line: &str) {
        println!("{line}");
    }
}

#[test]
#[ignore = "needs /usr/share/datasets/fashion-mnist and minutes of CPU"]
fn one_epoch_on_6400_real_images() -> anyhow::Result<()> {
    let data = Path::new("/usr/share/datasets/fashion-mnist");
    let model = std::env::var("FMNIST_MODEL").unwrap_or_else(|_| "baseline".into());
    let optimizer = if model == "baseline" {
        "{ name = \"adadelta\", lr = 1.0 }"
    } else {
        "{ name = \"adam\", lr = 1e-4 }"
    };
    let params: Params = toml::from_str(&format!(
        "model = \"{model}\"\nepochs = 1\ntrain_limit = 6400\noptimizer = {optimizer}"
    ))?;
    let inputs = vec![Input {
        stage: "download".into(),
        kind: "download".into(),
        dir: data.to_path_buf(),
        fingerprint: String::new(),
        params: serde_json::Value::Null,
    }];
    let (out, scratch) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        name: "throughput",
        inputs: &inputs,
        out_dir: out.path(),
        scratch_dir: scratch.path(),
        device: "cpu",
        kernels: fmnist_stages::ops::Kernels::Fast,
        seed: 42,
        progress: &PrintSummaries,
        cancel: &cancel,
    };
    let started = Instant::now();
    let metrics = train::run(params, &ctx)?;
    println!(
        "total {:.1}s (training + 10,000-image test evaluation + outputs)\n{metrics:#}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
