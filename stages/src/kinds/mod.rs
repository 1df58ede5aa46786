//! The built-in stage kinds, one [`StageKind`](crate::StageKind) each. A kind reads other
//! stages' outputs only through their readers (`download::DataFiles`,
//! `train::TrainedModel`, `evaluate::EvaluateOutputs`, `stats::read`), never by file name.

pub mod download;
pub mod evaluate;
pub mod report;
pub mod stats;
pub mod train;
pub mod visualize;
