//! fmnist-stages: the Fashion-MNIST study's domain. Each built-in stage kind is a plain
//! function `run(params, &StageContext) -> Result<Metrics>`; this crate knows nothing of
//! DAGs, fingerprints or caching (the orchestrator in `src/` does), so every stage can be
//! called and tested on its own.

pub mod context;
pub mod download;
pub mod evaluate;
pub mod plot;
pub mod report;
pub mod stats;
pub mod train;
pub mod visualize;

pub use context::{Cancelled, Input, Metrics, NoProgress, Progress, StageContext, StageError};

/// The numerics live in fmnist-nn; re-exported so that callers (the engine's `bench` and
/// `check` commands, its global allocator) reach them through this crate as before.
pub use fmnist_nn::{bench, check, compute, data, device, models, ops, optim};
