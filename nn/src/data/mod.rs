//! Fashion-MNIST data: the IDX file format, the in-memory dataset, batching and
//! normalization.

pub mod dataset;
pub mod idx;

pub use dataset::{
    Dataset, Normalization, Split, CLASS_NAMES, DEBIAN_DATA_DIR, IMAGE_SIDE, PIXELS,
};
pub use idx::{IdxArray, IdxError};
