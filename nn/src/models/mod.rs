//! The study's two classifiers (a baseline CNN and a 1-channel ResNet-18), their seeded
//! initialization, and loading them back from `model.safetensors`.
//!
//! Training code builds a model with [`init`] (weights drawn from a seeded ChaCha8 stream into
//! a `VarMap`, whose variables the optimizer updates); evaluation code calls [`load`].

pub mod baseline;
pub mod batch_norm;
pub mod init;
pub mod resnet;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use baseline::Baseline;
pub use resnet::ResNet18;

/// Which architecture; spelled in pipeline.toml as "baseline" | "resnet18".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Baseline,
    Resnet18,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Baseline => "baseline",
            ModelKind::Resnet18 => "resnet18",
        }
    }

    /// Trainable parameters of the architecture (weights and biases; not BN running stats).
    pub fn expected_param_count(self) -> usize {
        match self {
            ModelKind::Baseline => 1_199_882,
            ModelKind::Resnet18 => 11_175_370,
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Fashion-MNIST classifier: [B,1,28,28] normalized images in, [B,10] logits out.
pub trait Classifier: Send + Sync {
    /// Eval mode: no dropout, batch norm uses its running statistics.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    /// Training mode: dropout masks drawn from `rng`, batch norm uses batch statistics and
    /// updates its running statistics in place.
    fn forward_train(&self, x: &Tensor, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor>;
    /// The first convolution's weight, [Cout, 1, K, K].
    fn first_conv_weight(&self) -> &Tensor;
    /// Eval-mode activations of the first conv layer (after its ReLU) and of one deeper layer,
    /// labelled: baseline ("conv1", "conv2"), ResNet-18 ("conv1", "layer1").
    fn feature_maps(&self, x: &Tensor) -> candle_core::Result<Vec<(String, Tensor)>>;
    /// Trainable parameters (weights and biases; batch norm running stats excluded).
    fn param_count(&self) -> usize;
}

/// Builds `kind` from the variables `vb` provides (a `VarMap` being filled, or a checkpoint).
pub fn build(kind: ModelKind, vb: VarBuilder) -> candle_core::Result<Box<dyn Classifier>> {
    Ok(match kind {
        ModelKind::Baseline => Box::new(Baseline::new(vb)?),
        ModelKind::Resnet18 => Box::new(ResNet18::new(vb)?),
    })
}

/// ChaCha stream used for weight init (shuffling uses stream 0 via `Dataset::shuffled_indices`,
/// dropout its own), so the draws for different purposes never overlap.
pub const INIT_STREAM: u64 = 1;
/// ChaCha stream used for dropout masks.
pub const DROPOUT_STREAM: u64 = 2;

/// A fresh model whose weights are drawn from `seed` (PyTorch / torchvision default init),
/// with its variables in the returned `VarMap` (for the optimizer and for saving).
pub fn init(
    kind: ModelKind,
    seed: u64,
    device: &Device,
) -> candle_core::Result<(Box<dyn Classifier>, VarMap)> {
    init_as(kind, seed, device, DType::F32)
}

/// [`init`] with the variables in `dtype` (the same draws, rounded once): an f64 model is the
/// exact reference the f32 paths are measured against.
pub fn init_as(
    kind: ModelKind,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<(Box<dyn Classifier>, VarMap)> {
    let varmap = VarMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(INIT_STREAM);
    let backend = init::SeededInit::new(&varmap, rng);
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let model = build(kind, vb)?;
    Ok((model, varmap))
}

/// True for variables the optimizer must not touch (batch norm running statistics).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The trainable variables of `varmap`, sorted by name (a fixed order for optimizer state).
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    sorted_vars(varmap)
        .into_iter()
        .filter(|(name, _)| !is_buffer(name))
        .collect()
}

/// Every variable of `varmap` (buffers included), sorted by name.
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<(String, Var)> = match varmap.data().lock() {
        Ok(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Err(poisoned) => poisoned
            .into_inner()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Writes every variable of `varmap` (weights and BN running stats) to a safetensors file.
pub fn save_varmap(varmap: &VarMap, path: &Path) -> anyhow::Result<()> {
    let vars = sorted_vars(varmap);
    let tensors: Vec<(String, Tensor)> = vars
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    candle_core::safetensors::save(&tensors.into_iter().collect(), path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Overwrites every variable of `varmap` with the values in a safetensors file, which must
/// hold all of them with matching shapes.
pub fn load_into_varmap(varmap: &VarMap, path: &Path) -> anyhow::Result<()> {
    let device = sorted_vars(varmap)
        .first()
        .map(|(_, v)| v.device().clone())
        .unwrap_or(Device::Cpu);
    let stored = candle_core::safetensors::load(path, &device)
        .with_context(|| format!("reading {}", path.display()))?;
    for (name, var) in sorted_vars(varmap) {
        let value = stored
            .get(&name)
            .with_context(|| format!("{} has no tensor `{name}`", path.display()))?;
        var.set(&value.to_dtype(var.dtype())?)
            .with_context(|| format!("loading `{name}` from {}", path.display()))?;
    }
    Ok(())
}

/// Loads a trained model from its `model.safetensors` (as the train stage writes it).
pub fn load(
    kind: ModelKind,
    weights: &Path,
    device: &Device,
) -> anyhow::Result<Box<dyn Classifier>> {
    let bytes = std::fs::read(weights).with_context(|| format!("reading {}", weights.display()))?;
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
        .with_context(|| format!("{} is not a safetensors file", weights.display()))?;
    build(kind, vb).with_context(|| {
        format!(
            "{} does not hold a {kind} model's weights",
            weights.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_batch(b: usize) -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..b * 784)
            .map(|i| ((i * 37) % 255) as f32 / 255.0 - 0.3)
            .collect();
        Tensor::from_vec(data, (b, 1, 28, 28), &Device::Cpu)
    }

    #[test]
    fn parameter_counts_match_pytorch() -> anyhow::Result<()> {
        for kind in [ModelKind::Baseline, ModelKind::Resnet18] {
            let (model, varmap) = init(kind, 0, &Device::Cpu)?;
            assert_eq!(model.param_count(), kind.expected_param_count(), "{kind}");
            let in_map: usize = trainable_vars(&varmap)
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum();
            assert_eq!(in_map, kind.expected_param_count(), "{kind} var map");
        }
        Ok(())
    }

    #[test]
    fn shapes_of_logits_filters_and_feature_maps() -> anyhow::Result<()> {
        let x = image_batch(2)?;
        let (model, _) = init(ModelKind::Baseline, 1, &Device::Cpu)?;
        assert_eq!(model.forward(&x)?.dims(), &[2, 10]);
        assert_eq!(model.first_conv_weight().dims(), &[32, 1, 3, 3]);
        let maps = model.feature_maps(&x)?;
        assert_eq!(maps[0].0, "conv1");
        assert_eq!(maps[0].1.dims(), &[2, 32, 26, 26]);
        assert_eq!(maps[1].1.dims(), &[2, 64, 24, 24]);

        let (model, _) = init(ModelKind::Resnet18, 1, &Device::Cpu)?;
        assert_eq!(model.forward(&x)?.dims(), &[2, 10]);
        assert_eq!(model.first_conv_weight().dims(), &[64, 1, 7, 7]);
        let maps = model.feature_maps(&x)?;
        assert_eq!(maps[0].1.dims(), &[2, 64, 14, 14]);
        assert_eq!(maps[1].0, "layer1");
        assert_eq!(maps[1].1.dims(), &[2, 64, 7, 7]);
        Ok(())
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() -> anyhow::Result<()> {
        let w = |seed| -> anyhow::Result<Vec<f32>> {
            let (m, _) = init(ModelKind::Baseline, seed, &Device::Cpu)?;
            Ok(m.first_conv_weight().flatten_all()?.to_vec1()?)
        };
        assert_eq!(w(7)?, w(7)?);
        assert_ne!(w(7)?, w(8)?);
        // PyTorch's default bound for conv1: 1/sqrt(9).
        assert!(w(7)?.iter().all(|v| v.abs() <= 1.0 / 3.0));
        Ok(())
    }

    #[test]
    fn batch_norm_train_mode_updates_running_stats_and_save_load_round_trips() -> anyhow::Result<()>
    {
        let (model, varmap) = init(ModelKind::Resnet18, 3, &Device::Cpu)?;
        let x = image_batch(4)?;
        let before = model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        model.forward_train(&x, &mut rng)?;
        let after = model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(
            before, after,
            "eval output must follow the updated running stats"
        );

        let stats = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .get("bn1.running_mean")
            .map(|v| v.as_tensor().clone())
            .context("bn1.running_mean missing")?;
        assert!(stats.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        save_varmap(&varmap, &path)?;
        let loaded = load(ModelKind::Resnet18, &path, &Device::Cpu)?;
        assert_eq!(loaded.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, after);
        assert!(load(ModelKind::Baseline, &path, &Device::Cpu).is_err());
        Ok(())
    }
}
