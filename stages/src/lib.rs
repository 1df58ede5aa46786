//! fmnist-stages: the Fashion-MNIST study's domain. Each built-in stage kind is a plain
//! function `run(params, &StageContext) -> Result<Metrics>`; this crate knows nothing of
//! DAGs, fingerprints or caching (the orchestrator in `src/` does), so every stage can be
//! called and tested on its own.

pub mod bench;
pub mod check;
pub mod compute;
pub mod context;
pub mod data;
pub mod device;
pub mod download;
pub mod evaluate;
pub mod models;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod report;
pub mod stats;
pub mod train;
pub mod visualize;

pub use context::{Cancelled, Input, Metrics, NoProgress, Progress, StageContext, StageError};
