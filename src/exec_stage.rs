//! The far side of a remote runner: `fmnist-pipe __exec-stage SPEC` runs one built-in stage
//! described by a job spec (written by the submit host) into the spec's temp folder, and
//! writes the kind's metrics next to the spec. It decides nothing and publishes nothing: the
//! engine on the submit host does both once the job has finished.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fmnist_stages::ops::Kernels;
use fmnist_stages::{Input, StageContext};
use serde::{Deserialize, Serialize};

use crate::config::Resources;
use crate::error::PipeError;
use crate::progress::Console;
use crate::registry::Registry;
use crate::runner::{LocalRunner, Ran, Runner, StageEnd, Work};

/// One upstream stage's outputs, as the job sees them.
#[derive(Serialize, Deserialize)]
pub struct JobInput {
    pub stage: String,
    pub kind: String,
    pub dir: PathBuf,
    pub fingerprint: String,
    pub params: serde_json::Value,
}

/// Everything a job needs to run one built-in stage: the `StageContext` in data.
#[derive(Serialize, Deserialize)]
pub struct JobSpec {
    pub stage: String,
    pub kind: String,
    /// The stage's table (minus engine keys), overrides applied.
    pub table: toml::Table,
    pub inputs: Vec<JobInput>,
    pub out_dir: PathBuf,
    pub scratch_dir: PathBuf,
    #[serde(default)]
    pub continue_dir: Option<PathBuf>,
    pub device: String,
    pub kernels: Kernels,
    pub seed: u64,
}

impl JobSpec {
    pub fn from_context(kind: &str, table: &toml::Table, ctx: &StageContext) -> JobSpec {
        JobSpec {
            stage: ctx.name.to_string(),
            kind: kind.to_string(),
            table: table.clone(),
            inputs: ctx
                .inputs
                .iter()
                .map(|i| JobInput {
                    stage: i.stage.clone(),
                    kind: i.kind.clone(),
                    dir: i.dir.clone(),
                    fingerprint: i.fingerprint.clone(),
                    params: i.params.clone(),
                })
                .collect(),
            out_dir: ctx.out_dir.to_path_buf(),
            scratch_dir: ctx.scratch_dir.to_path_buf(),
            continue_dir: ctx.continue_dir.map(Path::to_path_buf),
            device: ctx.device.to_string(),
            kernels: ctx.kernels,
            seed: ctx.seed,
        }
    }
}

/// Where a job writes its result: beside its spec.
pub fn result_path(spec: &Path) -> PathBuf {
    spec.with_file_name("result.json")
}

/// Runs the stage a spec describes. Exit 1 when it fails, 130 when cancelled (scancel sends
/// SIGTERM first).
pub fn run(spec_path: &Path) -> Result<(), PipeError> {
    let text =
        std::fs::read_to_string(spec_path).map_err(|e| PipeError::io_at(spec_path, "read", e))?;
    let spec: JobSpec = serde_json::from_str(&text)
        .map_err(|e| PipeError::Config(format!("{}: {e}", spec_path.display())))?;
    let registry = Registry::builtins();
    let kind = registry.get(&spec.kind).ok_or_else(|| {
        PipeError::Config(format!(
            "job spec names kind `{}`, which this binary lacks",
            spec.kind
        ))
    })?;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    let _ = ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
    let inputs: Vec<Input> = spec
        .inputs
        .into_iter()
        .map(|i| Input {
            stage: i.stage,
            kind: i.kind,
            dir: i.dir,
            fingerprint: i.fingerprint,
            params: i.params,
        })
        .collect();
    let console = Console::new();
    let progress = console.stage(&spec.stage);
    let ctx = StageContext {
        name: &spec.stage,
        inputs: &inputs,
        out_dir: &spec.out_dir,
        scratch_dir: &spec.scratch_dir,
        continue_dir: spec.continue_dir.as_deref(),
        device: &spec.device,
        kernels: spec.kernels,
        seed: spec.seed,
        progress: &progress,
        cancel: &cancel,
    };
    let work = Work::Builtin {
        kind,
        table: &spec.table,
        ctx,
    };
    match LocalRunner.run(&spec.stage, &Resources::default(), work) {
        Ok(Ran { metrics, .. }) => {
            let result = result_path(spec_path);
            let tmp = result.with_extension("json.tmp");
            let text = serde_json::to_string(&metrics)
                .map_err(|e| PipeError::io("cannot encode metrics", std::io::Error::other(e)))?;
            std::fs::write(&tmp, text).map_err(|e| PipeError::io_at(&tmp, "write", e))?;
            std::fs::rename(&tmp, &result).map_err(|e| PipeError::io_at(&result, "write", e))
        }
        Err(StageEnd::Interrupted) => Err(PipeError::Interrupted),
        Err(StageEnd::Failed(msg) | StageEnd::Refused(msg)) => Err(PipeError::StageFailed(msg)),
    }
}
