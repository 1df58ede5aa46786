//! The `stats` stage: a first look at the data. For each split it counts images per class
//! and computes pixel mean and standard deviation (over pixels scaled to [0, 1]), overall
//! and per class, into stats.json; it draws sample images per class, the mean image of
//! each class, the pixel-intensity histogram and the class balance as PNGs, and prints a
//! short summary.
//!
//! ```toml
//! [stages.stats]
//! kind = "stats"
//! needs = ["download"]
//! samples_per_class = 10   # images per class in samples_<split>.png
//! ```

use std::path::Path;

use anyhow::Context as _;
use rayon::prelude::*;

use crate::context::{Metrics, StageContext, StageError};
use crate::data::{Dataset, Split, CLASS_NAMES, IMAGE_SIDE, PIXELS};
use crate::download::DataFiles;
use crate::format::count;
use crate::kind::{stage_kind, Outputs};
use crate::plot::{self, BarSeries, HistogramScale, Tile};

pub const NAME: &str = "stats";
pub const VERSION: u32 = 1;
const STATS_FILE: &str = "stats.json";

/// The `stats` kind.
pub struct StatsKind;

stage_kind!(StatsKind);

/// A stats stage's outputs, as other stages read them.
pub type StatsOutputs = Outputs<StatsKind>;

impl StatsOutputs {
    /// stats.json, as the JSON it is.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        let path = self.path(STATS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }

    /// stats.json, typed.
    pub fn read(&self) -> anyhow::Result<Stats> {
        Ok(serde_json::from_value(self.json()?)?)
    }

    /// The charts (sample grids, class means, histograms, class balance), sorted by name.
    pub fn charts(&self) -> anyhow::Result<Vec<std::path::PathBuf>> {
        crate::files::pngs_in(&self.dir)
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// How many examples of each class the sample grid shows (the first ones of the split).
    #[serde(default = "default_samples_per_class")]
    pub samples_per_class: usize,
}

fn default_samples_per_class() -> usize {
    10
}

impl Default for Params {
    fn default() -> Self {
        Params {
            samples_per_class: default_samples_per_class(),
        }
    }
}

impl Params {
    pub fn validate(&self) -> Result<(), StageError> {
        if !(1..=50).contains(&self.samples_per_class) {
            return Err(StageError::InvalidParams(format!(
                "`samples_per_class` = {} must be within 1..=50",
                self.samples_per_class
            )));
        }
        Ok(())
    }
}

/// Figures of one split, as written to stats.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitStats {
    pub count: usize,
    /// Images per class, in label order.
    pub per_class: Vec<usize>,
    /// Pixel mean over all images, pixels scaled to [0, 1].
    pub mean: f64,
    /// Pixel standard deviation (population) over all images, pixels scaled to [0, 1].
    pub std: f64,
    pub per_class_mean: Vec<f64>,
    pub per_class_std: Vec<f64>,
    /// Counts of the 256 pixel values 0..=255 over all images.
    pub histogram: Vec<u64>,
}

/// stats.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub class_names: Vec<String>,
    pub train: SplitStats,
    pub test: SplitStats,
}

/// Per-class integer sums: exact, so the figures do not depend on summation order.
#[derive(Clone)]
struct Sums {
    count: usize,
    sum: u64,
    sum_sq: u64,
    pixel_sums: Vec<u64>,
    histogram: Vec<u64>,
}

impl Sums {
    fn new() -> Self {
        Sums {
            count: 0,
            sum: 0,
            sum_sq: 0,
            pixel_sums: vec![0; PIXELS],
            histogram: vec![0; 256],
        }
    }

    fn add_image(&mut self, image: &[u8]) {
        self.count += 1;
        for (acc, &p) in self.pixel_sums.iter_mut().zip(image) {
            *acc += u64::from(p);
            self.histogram[p as usize] += 1;
        }
    }

    fn merge(mut self, other: Sums) -> Sums {
        self.count += other.count;
        for (a, b) in self.pixel_sums.iter_mut().zip(&other.pixel_sums) {
            *a += b;
        }
        for (a, b) in self.histogram.iter_mut().zip(&other.histogram) {
            *a += b;
        }
        self
    }

    /// Fills `sum` and `sum_sq` from the histogram (cheaper than per pixel).
    fn finish(mut self) -> Sums {
        self.sum = (0..256u64).map(|v| v * self.histogram[v as usize]).sum();
        self.sum_sq = (0..256u64)
            .map(|v| v * v * self.histogram[v as usize])
            .sum();
        self
    }

    /// (mean, population std) of pixel / 255.
    fn mean_std(&self) -> (f64, f64) {
        let n = (self.count * PIXELS) as f64;
        if n == 0.0 {
            return (0.0, 0.0);
        }
        let mean = self.sum as f64 / n;
        let var = (self.sum_sq as f64 / n - mean * mean).max(0.0);
        (mean / 255.0, var.sqrt() / 255.0)
    }

    /// The mean image, in [0, 1].
    fn mean_image(&self) -> Vec<f32> {
        let n = self.count.max(1) as f64;
        self.pixel_sums
            .iter()
            .map(|&s| (s as f64 / n / 255.0) as f32)
            .collect()
    }
}

/// Per-class sums of a split, computed in parallel over chunks of images.
fn class_sums(data: &Dataset) -> Vec<Sums> {
    let chunk = 2048;
    data.images
        .par_chunks(chunk * PIXELS)
        .zip(data.labels.par_chunks(chunk))
        .fold(
            || vec![Sums::new(); CLASS_NAMES.len()],
            |mut acc, (images, labels)| {
                for (image, &label) in images.chunks_exact(PIXELS).zip(labels) {
                    acc[label as usize].add_image(image);
                }
                acc
            },
        )
        .reduce(
            || vec![Sums::new(); CLASS_NAMES.len()],
            |a, b| a.into_iter().zip(b).map(|(x, y)| x.merge(y)).collect(),
        )
        .into_iter()
        .map(Sums::finish)
        .collect()
}

/// Computes one split's figures (and its per-class sums, for the mean images).
fn split_stats(data: &Dataset) -> (SplitStats, Vec<Sums>) {
    let per_class = class_sums(data);
    let total = per_class
        .iter()
        .cloned()
        .fold(Sums::new(), Sums::merge)
        .finish();
    let (mean, std) = total.mean_std();
    let (per_class_mean, per_class_std) = per_class.iter().map(Sums::mean_std).unzip();
    (
        SplitStats {
            count: data.len(),
            per_class: per_class.iter().map(|s| s.count).collect(),
            mean,
            std,
            per_class_mean,
            per_class_std,
            histogram: total.histogram,
        },
        per_class,
    )
}

pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let data_files = DataFiles::first(ctx)?;
    let mut figures = Vec::new();
    for split in [Split::Train, Split::Test] {
        ctx.check_cancel()?;
        let data = data_files.load(split)?;
        let (stats, sums) = split_stats(&data);
        draw_split(&params, ctx.out_dir, split, &data, &stats, &sums)?;
        figures.push(stats);
    }
    let test = figures.pop().context("test figures missing")?;
    let train = figures.pop().context("train figures missing")?;
    let stats = Stats {
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        train,
        test,
    };
    draw_balance(ctx.out_dir, &stats)?;
    let json_path = ctx.out_dir.join(STATS_FILE);
    std::fs::write(&json_path, serde_json::to_string_pretty(&stats)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    for line in summary(&stats) {
        ctx.progress.println(&line);
    }
    let brief = |s: &SplitStats| {
        serde_json::json!({
            "count": s.count,
            "mean": round4(s.mean),
            "std": round4(s.std),
            "min_per_class": s.per_class.iter().min(),
            "max_per_class": s.per_class.iter().max(),
        })
    };
    Ok(serde_json::json!({ "train": brief(&stats.train), "test": brief(&stats.test) }))
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// The terminal summary: one line per split, then the least and most frequent classes.
pub fn summary(stats: &Stats) -> Vec<String> {
    let line = |name: &str, s: &SplitStats| {
        let lo = s.per_class.iter().min().copied().unwrap_or(0);
        let hi = s.per_class.iter().max().copied().unwrap_or(0);
        let balance = if lo == hi {
            format!("{} per class", count(lo))
        } else {
            format!("{} to {} per class", count(lo), count(hi))
        };
        format!(
            "{name:<5} {:>6} images ({balance}), pixel mean {:.4}, std {:.4}",
            count(s.count),
            s.mean,
            s.std
        )
    };
    let mut lines = vec![line("train", &stats.train), line("test", &stats.test)];
    let t = &stats.train;
    let by_mean = |pick_max: bool| {
        (0..t.per_class_mean.len()).reduce(|a, b| {
            let better = if pick_max {
                t.per_class_mean[b] > t.per_class_mean[a]
            } else {
                t.per_class_mean[b] < t.per_class_mean[a]
            };
            if better {
                b
            } else {
                a
            }
        })
    };
    if let (Some(dark), Some(bright)) = (by_mean(false), by_mean(true)) {
        lines.push(format!(
            "darkest class {} (mean {:.3}), brightest {} (mean {:.3})",
            stats.class_names[dark],
            t.per_class_mean[dark],
            stats.class_names[bright],
            t.per_class_mean[bright]
        ));
    }
    lines
}

/// 60000 -> "60,000".
fn draw_split(
    params: &Params,
    out: &Path,
    split: Split,
    data: &Dataset,
    stats: &SplitStats,
    sums: &[Sums],
) -> anyhow::Result<()> {
    let name = match split {
        Split::Train => "train",
        Split::Test => "test",
    };
    // One row per class: its first `samples_per_class` images.
    let mut samples = Vec::new();
    for (class, class_name) in CLASS_NAMES.iter().enumerate() {
        let picked = (0..data.len())
            .filter(|&i| data.labels[i] as usize == class)
            .take(params.samples_per_class);
        for (k, i) in picked.enumerate() {
            let label = if k == 0 { *class_name } else { "" };
            samples.push(Tile::from_u8(data.image(i), IMAGE_SIDE, IMAGE_SIDE, label));
        }
        // Keep rows aligned when a class has fewer images than asked (small subsets).
        while samples.len() % params.samples_per_class != 0 {
            samples.push(Tile::new(vec![1.0; PIXELS], IMAGE_SIDE, IMAGE_SIDE, ""));
        }
    }
    plot::save_image_grid(
        &out.join(format!("samples_{name}.png")),
        &format!(
            "Fashion-MNIST {name}: first {} images of each class",
            params.samples_per_class
        ),
        &samples,
        params.samples_per_class,
        2,
    )?;
    let means: Vec<Tile> = sums
        .iter()
        .zip(CLASS_NAMES)
        .map(|(s, class)| Tile::new(s.mean_image(), IMAGE_SIDE, IMAGE_SIDE, class))
        .collect();
    plot::save_image_grid(
        &out.join(format!("class_means_{name}.png")),
        &format!("Mean image of each class ({name})"),
        &means,
        5,
        4,
    )?;
    plot::histogram_with_scale(
        &out.join(format!("pixel_histogram_{name}.png")),
        &format!(
            "Pixel intensities ({name}): mean {:.4}, std {:.4}",
            stats.mean, stats.std
        ),
        "pixel value / 255",
        &stats.histogram,
        (0.0, 1.0),
        HistogramScale::Log,
    )?;
    Ok(())
}

fn draw_balance(out: &Path, stats: &Stats) -> anyhow::Result<()> {
    let share = |s: &SplitStats| {
        let n = s.count.max(1) as f64;
        s.per_class.iter().map(|&c| 100.0 * c as f64 / n).collect()
    };
    plot::bar_chart(
        &out.join("class_balance.png"),
        "Class balance",
        "share of the split (%)",
        &stats.class_names,
        &[
            BarSeries::new(
                format!("train ({})", count(stats.train.count)),
                share(&stats.train),
            ),
            BarSeries::new(
                format!("test ({})", count(stats.test.count)),
                share(&stats.test),
            ),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_a_tiny_dataset_are_exact() {
        // Two images: all 0 (class 0) and all 255 (class 1): mean 0.5, std 0.5.
        let mut images = vec![0u8; PIXELS];
        images.extend(vec![255u8; PIXELS]);
        let data = Dataset {
            images,
            labels: vec![0, 1],
        };
        let (s, sums) = split_stats(&data);
        assert_eq!(s.count, 2);
        assert_eq!(&s.per_class[..3], &[1, 1, 0]);
        assert!((s.mean - 0.5).abs() < 1e-12 && (s.std - 0.5).abs() < 1e-12);
        assert_eq!((s.per_class_mean[1], s.per_class_std[1]), (1.0, 0.0));
        assert_eq!(s.histogram[0], PIXELS as u64);
        assert_eq!(s.histogram[255], PIXELS as u64);
        assert_eq!(sums[1].mean_image()[0], 1.0);
    }
}
