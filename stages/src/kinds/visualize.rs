//! The `visualize` stage: shows what each trained model (the `train` inputs) learned — its
//! first convolution's filters as an image grid, and, for chosen test images, every feature
//! map of the first conv layer and of one deeper layer beside the input image.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::context::{Cancelled, Metrics, StageContext, StageError};
use crate::data::{Dataset, Normalization, Split, CLASS_NAMES, IMAGE_SIDE};
use crate::device;
use crate::download::DataFiles;
use crate::kind::{stage_kind, Outputs};
use crate::models::Classifier;
use crate::plot::{self, Tile};
use crate::train::TrainedModel;

/// Bump when outputs would change for the same params.
pub const NAME: &str = "visualize";
pub const VERSION: u32 = 1;
const FILTERS_MARK: &str = "-filters-";

/// The `visualize` kind.
pub struct Visualize;

stage_kind!(Visualize);

/// A visualize stage's outputs, as the report reads them.
pub type VisualizeOutputs = Outputs<Visualize>;

impl VisualizeOutputs {
    /// (first-layer filter grids, activation maps), each sorted by name.
    pub fn images(&self) -> anyhow::Result<(Vec<std::path::PathBuf>, Vec<std::path::PathBuf>)> {
        Ok(crate::files::pngs_in(&self.dir)?
            .into_iter()
            .partition(|p| crate::files::file_name(p).contains(FILTERS_MARK)))
    }
}

/// A test image to show activations for: a class name (its first test image) or an index
/// (a number, or a string of digits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Sample {
    Index(usize),
    Class(String),
}

impl Sample {
    /// The test-set index this sample names directly, if it does.
    fn index(&self) -> Option<usize> {
        match self {
            Sample::Index(i) => Some(*i),
            Sample::Class(text) => text.trim().parse().ok(),
        }
    }
}

/// The `[stages.NAME]` table of a visualize stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Test images whose activation maps are drawn: class names ("Sneaker") or test-set
    /// indices (17).
    #[serde(default = "default_samples")]
    pub samples: Vec<Sample>,
}

fn default_samples() -> Vec<Sample> {
    vec![
        Sample::Class("Sneaker".to_string()),
        Sample::Class("Trouser".to_string()),
    ]
}

impl Default for Params {
    fn default() -> Self {
        Params {
            samples: default_samples(),
        }
    }
}

/// The index in CLASS_NAMES of `name` (case-insensitive, "T-shirt/top" also as "tshirt").
fn class_index(name: &str) -> Option<usize> {
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let wanted = squash(name);
    CLASS_NAMES
        .iter()
        .position(|c| squash(c) == wanted || (squash(c).starts_with(&wanted) && wanted.len() >= 5))
}

impl Params {
    /// Values serde cannot rule out by type.
    pub fn validate(&self) -> Result<(), StageError> {
        if self.samples.is_empty() {
            return Err(StageError::InvalidParams(
                "samples must name at least one test image (a class name or an index)".into(),
            ));
        }
        for s in &self.samples {
            if let (Sample::Class(name), None) = (s, s.index()) {
                if class_index(name).is_none() {
                    return Err(StageError::InvalidParams(format!(
                        "unknown class `{name}` in samples: expected a test-set index or one of {}",
                        CLASS_NAMES.join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A chosen test image: its index, class and the name its PNGs carry.
struct Chosen {
    index: usize,
    class: usize,
    slug: String,
}

fn slug(text: &str) -> String {
    let mut s = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    s.trim_end_matches('-').to_string()
}

fn class_name(class: usize) -> &'static str {
    CLASS_NAMES.get(class).copied().unwrap_or("?")
}

fn choose(samples: &[Sample], set: &Dataset) -> anyhow::Result<Vec<Chosen>> {
    let mut chosen = Vec::new();
    let mut seen = HashSet::new();
    for s in samples {
        let (index, slug_text) = if let Some(i) = s.index() {
            if i >= set.len() {
                anyhow::bail!(
                    "sample index {i} is outside the test set (it has {} images)",
                    set.len()
                );
            }
            (i, None)
        } else {
            // Only class names have no index.
            let Sample::Class(name) = s else { continue };
            let class = class_index(name).with_context(|| {
                format!(
                    "unknown class `{name}`: expected one of {}",
                    CLASS_NAMES.join(", ")
                )
            })?;
            let index = set
                .labels
                .iter()
                .position(|&l| l as usize == class)
                .with_context(|| format!("the test set has no `{}` image", class_name(class)))?;
            (index, Some(slug(class_name(class))))
        };
        if !seen.insert(index) {
            continue;
        }
        let class = set.labels[index] as usize;
        let slug_text =
            slug_text.unwrap_or_else(|| format!("test{index}-{}", slug(class_name(class))));
        chosen.push(Chosen {
            index,
            class,
            slug: slug_text,
        });
    }
    Ok(chosen)
}

/// Runs the stage: see the module doc.
pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    crate::ops::with_kernels(ctx.kernels, || run_with_kernels(params, ctx))
}

fn run_with_kernels(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let device = device::select(ctx.device)?;
    let test_set = DataFiles::first(ctx)?.load(Split::Test)?;
    let chosen = choose(&params.samples, &test_set)?;
    let trained = TrainedModel::read_all(ctx)?;

    let mut files = Vec::new();
    for info in &trained {
        if ctx.check_cancel().is_err() {
            return Err(Cancelled.into());
        }
        let model = info.load(&device)?;
        files.push(write_filters(ctx.out_dir, info, model.as_ref())?);
        for sample in &chosen {
            files.extend(write_activations(
                ctx.out_dir,
                info,
                model.as_ref(),
                &test_set,
                sample,
                &device,
            )?);
        }
    }
    // The engine prefixes each line with this stage's name.
    ctx.progress.println(&format!(
        "wrote {} images for {} models and {} test images",
        files.len(),
        trained.len(),
        chosen.len()
    ));
    let samples: Vec<serde_json::Value> = chosen
        .iter()
        .map(|c| serde_json::json!({ "index": c.index, "class": class_name(c.class) }))
        .collect();
    Ok(serde_json::json!({ "images": files, "samples": samples }))
}

/// <stage>-filters-conv1.png: each first-layer filter, contrast-scaled on its own.
fn write_filters(
    out: &Path,
    info: &TrainedModel,
    model: &dyn Classifier,
) -> anyhow::Result<String> {
    let weight = model.first_conv_weight().to_device(&Device::Cpu)?;
    let (c_out, _, kh, kw) = weight.dims4()?;
    let values = weight.flatten_all()?.to_vec1::<f32>()?;
    let per_filter = values.len() / c_out.max(1);
    let tiles: Vec<Tile> = values
        .chunks(per_filter)
        .enumerate()
        .map(|(i, w)| Tile::scaled(&w[..kh * kw], kw, kh, format!("{i}")))
        .collect();
    let name = format!("{}{FILTERS_MARK}conv1.png", info.stage);
    // Magnify small kernels to about 42 pixels so the weights are visible.
    let scale = (42 / kh.max(1)).max(1);
    plot::save_image_grid(
        &out.join(&name),
        &format!(
            "{} ({}): conv1 filters {kh}x{kw}",
            info.stage,
            info.architecture_name()
        ),
        &tiles,
        16,
        scale,
    )?;
    Ok(name)
}

/// <stage>-activations-<sample>-<layer>.png for each labelled layer the model exposes.
fn write_activations(
    out: &Path,
    info: &TrainedModel,
    model: &dyn Classifier,
    set: &Dataset,
    sample: &Chosen,
    device: &Device,
) -> anyhow::Result<Vec<String>> {
    let (image, _) = set.batch(&[sample.index], Normalization::default(), device)?;
    let mut names = Vec::new();
    for (layer, maps) in model.feature_maps(&image)? {
        let maps = maps.to_device(&Device::Cpu)?;
        let (_, channels, h, w) = maps.dims4()?;
        let values = maps.flatten_all()?.to_vec1::<f32>()?;
        let mut tiles = vec![Tile::from_u8(
            set.image(sample.index),
            IMAGE_SIDE,
            IMAGE_SIDE,
            format!("input #{}", sample.index),
        )];
        tiles.extend(
            values
                .chunks(h * w)
                .take(channels)
                .enumerate()
                .map(|(c, m)| Tile::scaled(m, w, h, format!("{layer}[{c}]"))),
        );
        let name = format!(
            "{}-activations-{}-{}.png",
            info.stage,
            sample.slug,
            slug(&layer)
        );
        plot::save_image_grid(
            &out.join(&name),
            &format!(
                "{}: {layer} feature maps ({channels} of {w}x{h}) of test image #{} ({})",
                info.stage,
                sample.index,
                class_name(sample.class)
            ),
            &tiles,
            11,
            2,
        )?;
        names.push(name);
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_as_names_or_indices_and_bad_names_are_listed() {
        let p: Result<Params, _> =
            toml::from_str(r#"samples = ["Sneaker", 17, "t-shirt/top", "42"]"#);
        let p = p.unwrap_or_default();
        assert_eq!(p.samples[1], Sample::Index(17));
        assert_eq!(p.samples[3].index(), Some(42));
        assert!(p.validate().is_ok());
        assert_eq!(class_index("tshirt/top"), Some(0));
        assert_eq!(class_index("ankle boot"), Some(9));
        let bad = Params {
            samples: vec![Sample::Class("Sock".into())],
        };
        let msg = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("Sock") && msg.contains("Ankle boot"), "{msg}");
        assert!(toml::from_str::<Params>("sample = []").is_err());
    }

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("T-shirt/top"), "t-shirt-top");
        assert_eq!(slug("Ankle boot"), "ankle-boot");
        assert_eq!(slug("layer1"), "layer1");
    }
}
