//! What the orchestrator hands a stage: its inputs, an output folder, the device, a progress
//! sink and a cancel flag. The contract every stage kind implements.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// A stage counts as one compute job while it runs (the orchestrator holds a
/// [`RunningStage`]); compute-heavy stages size their thread pools from [`running_stages`] so
/// that stages running side by side share the cores.
pub use fmnist_nn::compute::{running_jobs as running_stages, ComputeJob as RunningStage};

/// A stage's result figures (accuracy, counts, ...), recorded in the lock and printed.
pub type Metrics = serde_json::Value;

/// One upstream stage's published outputs, as a stage sees them.
#[derive(Debug, Clone)]
pub struct Input {
    /// The upstream stage's name in pipeline.toml (e.g. "train-baseline").
    pub stage: String,
    /// The upstream stage's kind (e.g. "train"); lets a stage find "the download" or
    /// "every trained model" among its inputs without knowing the names.
    pub kind: String,
    /// The folder holding that stage's outputs (artifacts/<stage>/).
    pub dir: PathBuf,
    /// The upstream stage's fingerprint (hex), for reports.
    pub fingerprint: String,
    /// The upstream stage's resolved params (the pipeline.toml table, overrides applied), for
    /// reports.
    pub params: serde_json::Value,
}

/// Everything a stage needs to run, apart from its typed params.
pub struct StageContext<'a> {
    /// This stage's name in pipeline.toml.
    pub name: &'a str,
    /// Upstream outputs, in the order of `needs`.
    pub inputs: &'a [Input],
    /// An empty temporary folder: write every output here. It is renamed into
    /// artifacts/<name>/ only if the stage returns Ok.
    pub out_dir: &'a Path,
    /// A folder that survives failure and interruption (checkpoints for resume). It is keyed
    /// by the stage's fingerprint, so it only ever holds state of a run with the same inputs
    /// and params; the orchestrator deletes it once the stage succeeds.
    pub scratch_dir: &'a Path,
    /// For kinds with `PROGRESS_PARAMS`: a folder shared by every run of the stage whose
    /// params differ from this one's in those alone (same inputs, seed and version). A run
    /// leaves its final state there, and a longer run starts from the furthest shorter one
    /// instead of from scratch. Several runs may use it at once: write each state under a
    /// temporary name and rename it into place. None for kinds without progress params.
    pub continue_dir: Option<&'a Path>,
    /// The pipeline's device request: "auto" | "cpu" | "cuda" | "cuda:N" | "metal".
    pub device: &'a str,
    /// The ops to run on the CPU: the fast kernels, or the portable path a GPU runs. Stages
    /// that compute put it in force (`ops::with_kernels`) on every thread they compute on.
    pub kernels: crate::ops::Kernels,
    /// The pipeline-wide seed (a stage's own `seed` param overrides it).
    pub seed: u64,
    /// Where to report progress of long work.
    pub progress: &'a dyn Progress,
    /// Set when the user pressed Ctrl-C: check it between units of work and return
    /// `Err(Cancelled)` promptly.
    pub cancel: &'a AtomicBool,
}

impl StageContext<'_> {
    /// The first input of the given kind, or an error naming what is missing.
    pub fn input_of_kind(&self, kind: &str) -> Result<&Input, StageError> {
        self.inputs
            .iter()
            .find(|i| i.kind == kind)
            .ok_or_else(|| StageError::MissingInput {
                stage: self.name.to_string(),
                kind: kind.to_string(),
            })
    }

    /// Every input of the given kind, in `needs` order.
    pub fn inputs_of_kind<'s>(&'s self, kind: &'s str) -> impl Iterator<Item = &'s Input> + 's {
        self.inputs.iter().filter(move |i| i.kind == kind)
    }

    /// `Err(Cancelled)` once Ctrl-C was pressed.
    pub fn check_cancel(&self) -> Result<(), Cancelled> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

/// The stage stopped because the user interrupted the run.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;

/// Errors common to every stage kind. Kind-specific errors are carried as `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Params that do not fit the kind: the orchestrator reports these as config errors
    /// (exit 2) before anything runs.
    #[error("{0}")]
    InvalidParams(String),
    #[error("stage `{stage}` needs a `{kind}` stage among its `needs`")]
    MissingInput { stage: String, kind: String },
}

/// A sink for progress of long work. The orchestrator draws a bar on a terminal and writes
/// plain lines otherwise; stages only report.
pub trait Progress: Sync {
    /// A new phase of `total` units (0 = unknown), e.g. ("epoch 1/5", 938, "batches").
    fn start(&self, phase: &str, total: u64, unit: &str);
    /// `done` more units finished.
    fn advance(&self, done: u64);
    /// A short live status (running loss, images/s, ...).
    fn message(&self, msg: &str);
    /// The phase is over; `summary` is printed as one line (e.g. per-epoch figures).
    fn finish(&self, summary: &str);
    /// A line of text for the user (a stage's summary table, ...).
    fn println(&self, line: &str);
}

/// Progress that goes nowhere: for tests and library use.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn finish(&self, _: &str) {}
    fn println(&self, _: &str) {}
}
