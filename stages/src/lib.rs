//! fmnist-stages: the Fashion-MNIST study's domain. Each built-in stage kind implements
//! [`StageKind`] in `kinds/` (download, stats, train, evaluate, visualize, report); this crate
//! knows nothing of DAGs, fingerprints or caching (the orchestrator in `src/` does), so every
//! stage can be called and tested on its own. The numerics are in fmnist-nn.

pub mod context;
pub mod files;
pub mod format;
pub mod kind;
pub mod kinds;
pub mod plot;

pub use context::{Cancelled, Input, Metrics, NoProgress, Progress, StageContext, StageError};
pub use kind::StageKind;
pub use kinds::{download, evaluate, report, stats, train, visualize};

/// The numerics live in fmnist-nn; re-exported so that callers (the engine's `bench` and
/// `check` commands, its global allocator) reach them through this crate as before.
pub use fmnist_nn::{
    bench, check, compute, data, device, learner, models, ops, optim, test_support,
};
