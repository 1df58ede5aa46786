//! fmnist-nn: the Fashion-MNIST study's numerics, knowing nothing of pipelines. The fast CPU
//! kernels and the portable path every GPU runs ([`ops`]), the two models ([`models`]), the
//! optimizers ([`optim`]), the data set in memory ([`data`]), device selection ([`device`]),
//! compute thread sizing ([`compute`]), and one training loop and one evaluator
//! ([`learner`]) that the train and evaluate stages, `fmnist-pipe bench` ([`bench`]) and
//! `fmnist-pipe check` ([`check`]) all run.

pub mod bench;
pub mod check;
pub mod compute;
pub mod data;
pub mod device;
pub mod learner;
pub mod models;
pub mod ops;
pub mod optim;
pub mod test_support;
