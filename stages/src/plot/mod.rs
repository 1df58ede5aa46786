//! Shared plotting primitives for every stage that draws: labelled grayscale image grids,
//! line charts, grouped bar charts, histograms and annotated heatmaps, all written as PNG.
//! Text is drawn with an embedded DejaVu Sans font, so no system font is ever needed.

mod charts;
mod frame;
mod grid;
mod heatmap;

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::style::{FontStyle, RGBColor};

pub use charts::{
    bar_chart, histogram, histogram_with_scale, line_chart, BarSeries, HistogramScale, Series,
};
pub use grid::{save_image_grid, Tile};
pub use heatmap::{heatmap, heatmap_with_axes};

/// DejaVu Sans (see stages/assets/LICENSE-DejaVuSans.txt).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// The family name the primitives draw text with. Registered under the generic names too,
/// so code that asks plotters for "sans-serif" (its default) also finds it.
pub const FONT_FAMILY: &str = "sans-serif";
const FAMILY_ALIASES: [&str; 4] = ["sans-serif", "serif", "monospace", "DejaVu Sans"];

/// Registers the embedded font with plotters (once per process). Every primitive here
/// calls it; call it yourself only when drawing with plotters directly.
pub fn ensure_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        for family in FAMILY_ALIASES {
            for style in [
                FontStyle::Normal,
                FontStyle::Bold,
                FontStyle::Italic,
                FontStyle::Oblique,
            ] {
                // The bytes are a known-good font compiled into the binary, so this cannot
                // fail at run time; a broken asset would show up in the tests.
                if plotters::style::register_font(family, style, DEJAVU_SANS).is_err() {
                    tracing::error!("the embedded DejaVu Sans font is not a valid font");
                }
            }
        }
    });
}

/// A plot that could not be drawn or written, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The data handed to the primitive cannot be drawn (empty, mismatched lengths, ...).
    #[error("{}: cannot plot: {reason}", path.display())]
    InvalidData { path: PathBuf, reason: String },
    /// Drawing or encoding the PNG failed (unwritable folder, full disk, ...).
    #[error("{}: cannot draw or write the image: {reason}", path.display())]
    Draw { path: PathBuf, reason: String },
}

impl PlotError {
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        PlotError::InvalidData {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    /// A `map_err` adaptor turning any plotters error into `Draw` for `path`.
    pub(crate) fn drawing<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> PlotError + '_ {
        move |e| PlotError::Draw {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Distinct series colours (matplotlib's "tab10"), so a model keeps its colour across
/// charts when it keeps its position in the series list.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The colour of series number `i` (cycling through [`PALETTE`]).
pub fn series_color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Refuses the `(0, 0)`-and-up sizes plotters would turn into a panic or a huge allocation.
pub(crate) fn check_canvas(path: &Path, width: u32, height: u32) -> Result<(), PlotError> {
    const MAX_SIDE: u32 = 16_384;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(PlotError::invalid(
            path,
            format!("image size {width}x{height} is outside 1..={MAX_SIDE} pixels per side"),
        ));
    }
    Ok(())
}

/// Text width in pixels at `size` in the embedded font (for laying out captions and axes).
pub(crate) fn text_width(text: &str, size: f64) -> u32 {
    ensure_font();
    let font = plotters::style::FontDesc::new(
        plotters::style::FontFamily::Name(FONT_FAMILY),
        size,
        FontStyle::Normal,
    );
    text.lines()
        .map(|line| font.box_size(line).map(|(w, _)| w).unwrap_or(0))
        .max()
        .unwrap_or(0)
}
