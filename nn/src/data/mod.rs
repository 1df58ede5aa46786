//! Fashion-MNIST data: the IDX file format, the in-memory dataset, batching and
//! normalization.

pub mod dataset;
pub mod idx;

pub use dataset::{Dataset, Normalization, Split, CLASS_NAMES, IMAGE_SIDE, PIXELS};
pub use idx::{IdxArray, IdxError};
