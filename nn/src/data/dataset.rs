//! The in-memory Fashion-MNIST dataset: u8 images and labels, normalization, seeded
//! shuffling and batches as candle tensors.

use std::path::Path;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::idx::{IdxArray, IdxError};

/// Where the Debian package `dataset-fashion-mnist` installs the data.
pub const DEBIAN_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

pub const IMAGE_SIDE: usize = 28;
pub const PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Which half of Fashion-MNIST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    /// The file-name prefix of the original distribution ("train" / "t10k").
    pub fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
    pub fn images_file(self) -> String {
        format!("{}-images-idx3-ubyte", self.prefix())
    }
    pub fn labels_file(self) -> String {
        format!("{}-labels-idx1-ubyte", self.prefix())
    }
}

/// Pixel normalization: x = (p / 255 - mean) / std.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    pub mean: f32,
    pub std: f32,
}

impl Default for Normalization {
    /// The training set's figures (the study's protocol).
    fn default() -> Self {
        Normalization {
            mean: 0.2860,
            std: 0.3530,
        }
    }
}

/// Images (row-major 28x28 u8, one after another) and their labels (0..=9).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Loads one split from a folder holding the IDX files (plain or .gz).
    pub fn load(dir: &Path, split: Split) -> Result<Self, IdxError> {
        let pick = |name: String| {
            let plain = dir.join(&name);
            if plain.exists() {
                plain
            } else {
                dir.join(format!("{name}.gz"))
            }
        };
        let images = IdxArray::read(&pick(split.images_file()))?;
        let labels = IdxArray::read(&pick(split.labels_file()))?;
        Self::from_arrays(
            images,
            labels,
            &dir.join(split.images_file()).display().to_string(),
        )
    }

    /// Checks that images are Nx28x28, labels are N and in 0..=9.
    pub fn from_arrays(images: IdxArray, labels: IdxArray, name: &str) -> Result<Self, IdxError> {
        let bad = |reason: String| IdxError::Malformed {
            file: name.to_string(),
            reason,
        };
        if images.dims.len() != 3 || images.dims[1] != IMAGE_SIDE || images.dims[2] != IMAGE_SIDE {
            return Err(bad(format!(
                "images have shape {:?}, expected [N, 28, 28]",
                images.dims
            )));
        }
        if labels.dims.len() != 1 || labels.dims[0] != images.dims[0] {
            return Err(bad(format!(
                "labels have shape {:?}, expected [{}] to match the images",
                labels.dims, images.dims[0]
            )));
        }
        if let Some(l) = labels.data.iter().find(|&&l| l > 9) {
            return Err(bad(format!("label {l} is outside 0..=9")));
        }
        Ok(Dataset {
            images: images.data,
            labels: labels.data,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` examples (all when n is 0 or larger than the set).
    pub fn truncated(mut self, n: usize) -> Self {
        if n > 0 && n < self.len() {
            self.images.truncate(n * PIXELS);
            self.labels.truncate(n);
        }
        self
    }

    /// Image `i`'s 784 pixels.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// A permutation of 0..len drawn from `seed` (same seed, same order, on every platform).
    pub fn shuffled_indices(&self, seed: u64) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        idx
    }

    /// The examples at `indices` as (images [B,1,28,28] f32 normalized, labels [B] u32).
    pub fn batch(
        &self,
        indices: &[usize],
        norm: Normalization,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let scale = 1.0 / (255.0 * norm.std);
        let shift = norm.mean / norm.std;
        let mut pixels = Vec::with_capacity(indices.len() * PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            pixels.extend(self.image(i).iter().map(|&p| p as f32 * scale - shift));
            labels.push(self.labels[i] as u32);
        }
        let b = indices.len();
        Ok((
            Tensor::from_vec(pixels, (b, 1, IMAGE_SIDE, IMAGE_SIDE), device)?,
            Tensor::from_vec(labels, b, device)?,
        ))
    }
}
