//! The one frame every chart is drawn in (canvas, title, margins, label areas, the house
//! style of mesh and legend), and the axis helpers the charts share.

use std::path::Path;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::prelude::*;

use super::{check_canvas, ensure_font, PlotError, FONT_FAMILY};

pub(super) const TITLE_SIZE: u32 = 22;
pub(super) const AXIS_DESC_SIZE: u32 = 15;
pub(super) const TICK_SIZE: u32 = 13;
pub(super) const LEGEND_SIZE: u32 = 13;

/// The chart being drawn into a frame (see [`Frame::draw`]).
pub(super) type Chart<'a, X, Y> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>;

/// What differs between the charts' frames.
pub(super) struct Frame<'p> {
    path: &'p Path,
    title: &'p str,
    /// Canvas width and height, in pixels.
    size: (u32, u32),
    /// The x label area's height and the y label area's width, in pixels.
    label_areas: (u32, u32),
    /// Room right of the plot (the heatmap's last column label needs more).
    pub(super) margin_right: u32,
}

impl Frame<'_> {
    pub(super) fn new<'p>(
        path: &'p Path,
        title: &'p str,
        size: (u32, u32),
        label_areas: (u32, u32),
    ) -> Frame<'p> {
        Frame {
            path,
            title,
            size,
            label_areas,
            margin_right: MARGIN,
        }
    }

    /// The one frame every chart has: a white canvas of the checked size, the title, the
    /// margins and label areas, and coordinates `x` by `y`; `draw` draws the mesh and the
    /// data into it; then the PNG is written.
    pub(super) fn draw<X: AsRangedCoord, Y: AsRangedCoord>(
        &self,
        x: X,
        y: Y,
        draw: impl FnOnce(&mut Chart<'_, X::CoordDescType, Y::CoordDescType>) -> Result<(), PlotError>,
    ) -> Result<(), PlotError> {
        ensure_font();
        check_canvas(self.path, self.size.0, self.size.1)?;
        let err = PlotError::drawing(self.path);
        let root = BitMapBackend::new(self.path, self.size).into_drawing_area();
        root.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, (FONT_FAMILY, TITLE_SIZE))
            .margin(MARGIN)
            .margin_right(self.margin_right)
            .x_label_area_size(self.label_areas.0)
            .y_label_area_size(self.label_areas.1)
            .build_cartesian_2d(x, y)
            .map_err(&err)?;
        draw(&mut chart)?;
        root.present().map_err(&err)?;
        Ok(())
    }
}

const MARGIN: u32 = 16;

/// The mesh in the house style (fonts, light grid); the caller adds its labels and draws.
pub(super) fn mesh<'a, 'c, X, Y>(
    chart: &'c mut Chart<'a, X, Y>,
) -> MeshStyle<'a, 'c, X, Y, BitMapBackend<'a>>
where
    X: Ranged + ValueFormatter<X::ValueType>,
    Y: Ranged + ValueFormatter<Y::ValueType>,
{
    let mut mesh = chart.configure_mesh();
    mesh.label_style((FONT_FAMILY, TICK_SIZE))
        .axis_desc_style((FONT_FAMILY, AXIS_DESC_SIZE))
        .light_line_style(RGBColor(235, 235, 235))
        .max_light_lines(2);
    mesh
}

/// The series' legend in the house style at `position`.
pub(super) fn draw_legend<X: Ranged, Y: Ranged>(
    chart: &mut Chart<'_, X, Y>,
    position: SeriesLabelPosition,
    path: &Path,
) -> Result<(), PlotError> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, LEGEND_SIZE))
        .draw()
        .map_err(PlotError::drawing(path))
}

/// A short tick label: integers without decimals, others with up to 4 significant decimals.
pub(super) fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if (v - v.round()).abs() < 1e-9 * v.abs().max(1.0) {
        return format!("{:.0}", v.round());
    }
    if v.abs() < 1e-3 || v.abs() >= 1e6 {
        return format!("{v:.2e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `lo..hi` widened by `pad` of its span on each side; a degenerate span is widened so
/// the single value sits in the middle.
pub(super) fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let half = (hi.abs() * 0.1).max(0.5);
        (lo - half, hi + half)
    } else {
        (lo - span * pad, hi + span * pad)
    }
}

/// About `target` evenly spaced round tick values covering `lo..=hi` (steps of 1, 2 or 5
/// times a power of ten).
pub(super) fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    let raw = (hi - lo) / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return vec![lo];
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// A linear f64 axis with ticks exactly at the given values (category centres, round
/// counts): plotters' own `with_key_points` cannot take a label formatter.
pub(super) struct TickedAxis {
    start: f64,
    end: f64,
    ticks: Vec<f64>,
}

impl TickedAxis {
    pub(super) fn new(range: std::ops::Range<f64>, ticks: Vec<f64>) -> Self {
        TickedAxis {
            start: range.start,
            end: range.end,
            ticks,
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let fraction = (value - self.start) / (self.end - self.start);
        let pixels = fraction * f64::from(limit.1 - limit.0);
        if pixels.is_finite() {
            limit.0 + pixels.round() as i32
        } else {
            limit.0
        }
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        let max = hint.max_num_points().max(1);
        let stride = self.ticks.len().div_ceil(max).max(1);
        self.ticks.iter().step_by(stride).copied().collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.start..self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(tick_label(3.0), "3");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(0.123456), "0.1235");
        assert_eq!(tick_label(0.0), "0");
    }

    #[test]
    fn nice_ticks_are_round_and_cover_the_range() {
        assert_eq!(
            nice_ticks(0.0, 100.0, 5),
            vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        );
        let t = nice_ticks(0.0, 7300.0, 8);
        assert_eq!(t.first(), Some(&0.0));
        assert!(
            t.windows(2).all(|w| (w[1] - w[0] - 1000.0).abs() < 1e-9),
            "{t:?}"
        );
    }
}
