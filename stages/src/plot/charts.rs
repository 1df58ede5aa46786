//! Charts: line charts (training curves), grouped bar charts (class balance, per-class
//! scores of several models), histograms (pixel intensities) and annotated heatmaps
//! (confusion matrices).

use std::path::Path;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::{
    AsRangedCoord, DefaultFormatting, KeyPointHint, Ranged, ValueFormatter,
};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{check_canvas, ensure_font, series_color, text_width, PlotError, FONT_FAMILY};

const TITLE_SIZE: u32 = 22;
const AXIS_DESC_SIZE: u32 = 15;
const TICK_SIZE: u32 = 13;
const LEGEND_SIZE: u32 = 13;

/// One named line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// (x, y) points, drawn in the given order; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            name: name.into(),
            points,
        }
    }
}

/// One named set of bars of a grouped bar chart: a value per category.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    pub name: String,
    pub values: Vec<f64>,
}

impl BarSeries {
    pub fn new(name: impl Into<String>, values: Vec<f64>) -> Self {
        BarSeries {
            name: name.into(),
            values,
        }
    }
}

/// How a histogram's counts axis is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistogramScale {
    Linear,
    /// Log10 of the counts: for skewed data such as pixel intensities, where most pixels
    /// are background zeros.
    Log,
}

/// The chart being drawn into a frame (see [`Frame::draw`]).
type Chart<'a, X, Y> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>;

/// What differs between the charts' frames.
struct Frame<'p> {
    path: &'p Path,
    title: &'p str,
    /// Canvas width and height, in pixels.
    size: (u32, u32),
    /// The x label area's height and the y label area's width, in pixels.
    label_areas: (u32, u32),
    /// Room right of the plot (the heatmap's last column label needs more).
    margin_right: u32,
}

impl Frame<'_> {
    fn new<'p>(
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
    fn draw<X: AsRangedCoord, Y: AsRangedCoord>(
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
fn mesh<'a, 'c, X, Y>(chart: &'c mut Chart<'a, X, Y>) -> MeshStyle<'a, 'c, X, Y, BitMapBackend<'a>>
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
fn draw_legend<X: Ranged, Y: Ranged>(
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
fn tick_label(v: f64) -> String {
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
fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let span = hi - lo;
    if span <= f64::EPSILON * hi.abs().max(1.0) {
        let half = (hi.abs() * 0.1).max(0.5);
        (lo - half, hi + half)
    } else {
        (lo - span * pad, hi + span * pad)
    }
}

/// Writes a line chart of `series` (one colour each, with markers and a legend).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let finite = |&&(x, y): &&(f64, f64)| x.is_finite() && y.is_finite();
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().filter(finite).copied())
        .collect();
    if all.is_empty() {
        return Err(PlotError::invalid(path, "no finite points to draw"));
    }
    let min_max = |f: fn(&(f64, f64)) -> f64| {
        all.iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            })
    };
    let (x_lo, x_hi) = min_max(|p| p.0);
    let (y_lo, y_hi) = min_max(|p| p.1);
    let (x0, x1) = padded(x_lo, x_hi, 0.03);
    let (y0, y1) = padded(y_lo, y_hi, 0.08);
    // Epoch-like x values (few distinct integers) get one tick each.
    let integral_x = all.iter().all(|p| (p.0 - p.0.round()).abs() < 1e-9);
    let x_ticks = if integral_x && x_hi - x_lo <= 20.0 {
        (x_hi - x_lo) as usize + 1
    } else {
        10
    };

    let err = PlotError::drawing(path);
    let frame = Frame::new(path, title, (900, 560), (48, 72));
    frame.draw(x0..x1, y0..y1, |chart| {
        mesh(chart)
            .x_desc(x_label)
            .y_desc(y_label)
            .x_labels(x_ticks)
            .y_labels(8)
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| tick_label(*v))
            .draw()
            .map_err(&err)?;
        for (i, s) in series.iter().enumerate() {
            let color = series_color(i);
            let points: Vec<(f64, f64)> = s.points.iter().filter(finite).copied().collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(&err)?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(&err)?;
        }
        // Put the legend where the curves are not at their end: losses fall, accuracies rise.
        let ends: Vec<f64> = series
            .iter()
            .filter_map(|s| s.points.iter().rfind(finite).map(|p| p.1))
            .collect();
        let mean_end = ends.iter().sum::<f64>() / ends.len().max(1) as f64;
        let legend_at = if mean_end > (y0 + y1) / 2.0 {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        };
        draw_legend(chart, legend_at, path)
    })
}

/// Writes a grouped bar chart: one group per category, one coloured bar per series, and a
/// legend naming the series.
pub fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[BarSeries],
) -> Result<(), PlotError> {
    if categories.is_empty() || series.is_empty() {
        return Err(PlotError::invalid(
            path,
            "no categories or no series to draw",
        ));
    }
    for s in series {
        if s.values.len() != categories.len() {
            return Err(PlotError::invalid(
                path,
                format!(
                    "series {:?} has {} values for {} categories",
                    s.name,
                    s.values.len(),
                    categories.len()
                ),
            ));
        }
        if let Some(v) = s.values.iter().find(|v| !v.is_finite()) {
            return Err(PlotError::invalid(
                path,
                format!("series {:?} holds the non-finite value {v}", s.name),
            ));
        }
    }
    let values = series.iter().flat_map(|s| s.values.iter().copied());
    let (v_lo, v_hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (y0, y1) = if v_hi - v_lo <= 0.0 {
        (0.0, 1.0)
    } else {
        (
            if v_lo < 0.0 { v_lo * 1.08 } else { 0.0 },
            // Headroom for the legend in the upper right corner.
            if v_hi > 0.0 { v_hi * 1.25 } else { 0.0 },
        )
    };

    let n = categories.len();
    let widest = categories
        .iter()
        .map(|c| text_width(c, f64::from(TICK_SIZE)))
        .max()
        .unwrap_or(0);
    let slot = (widest + 14).max(series.len() as u32 * 14 + 16);
    let width = (n as u32 * slot + 120).max(640);
    let err = PlotError::drawing(path);
    let key_points: Vec<f64> = (0..n).map(|i| i as f64).collect();
    let x = TickedAxis::new(-0.5..n as f64 - 0.5, key_points);
    Frame::new(path, title, (width, 520), (36, 72)).draw(x, y0..y1, |chart| {
        mesh(chart)
            .disable_x_mesh()
            .y_desc(y_label)
            .y_labels(8)
            .x_label_formatter(&|x| {
                let i = x.round();
                if i >= 0.0 && (i as usize) < n {
                    categories[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| tick_label(*v))
            .draw()
            .map_err(&err)?;
        let group = 0.8;
        let bar = group / series.len() as f64;
        for (s_idx, s) in series.iter().enumerate() {
            let color = series_color(s_idx);
            let bars = s.values.iter().enumerate().map(move |(c, &v)| {
                let left = c as f64 - group / 2.0 + s_idx as f64 * bar;
                Rectangle::new([(left, 0.0), (left + bar * 0.92, v)], color.filled())
            });
            let drawn = chart.draw_series(bars).map_err(&err)?;
            if series.len() > 1 || !s.name.is_empty() {
                drawn.label(s.name.clone()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            }
        }
        if series.len() > 1 || series.iter().any(|s| !s.name.is_empty()) {
            draw_legend(chart, SeriesLabelPosition::UpperRight, path)?;
        }
        Ok(())
    })
}

/// Writes a histogram of `counts`, equal-width bins covering `range`, on a linear axis.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    counts: &[u64],
    range: (f64, f64),
) -> Result<(), PlotError> {
    histogram_with_scale(path, title, x_label, counts, range, HistogramScale::Linear)
}

/// Writes a histogram of `counts`, equal-width bins covering `range`, with the counts
/// axis linear or logarithmic.
pub fn histogram_with_scale(
    path: &Path,
    title: &str,
    x_label: &str,
    counts: &[u64],
    range: (f64, f64),
    scale: HistogramScale,
) -> Result<(), PlotError> {
    let (lo, hi) = range;
    if counts.is_empty() {
        return Err(PlotError::invalid(path, "no bins to draw"));
    }
    if !(lo.is_finite() && hi.is_finite() && lo < hi) {
        return Err(PlotError::invalid(
            path,
            format!("range ({lo}, {hi}) is not an increasing finite interval"),
        ));
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    // Bar heights in axis units; on the log axis a count c is drawn as log10(c), and
    // empty bins are left out (log10(0) does not exist).
    let height_of = |c: u64| -> Option<f64> {
        match scale {
            HistogramScale::Linear => Some(c as f64),
            HistogramScale::Log => (c > 0).then(|| (c as f64).log10()),
        }
    };
    let (y_top, key_points, y_desc) = match scale {
        HistogramScale::Linear => ((max as f64 * 1.05).max(1.0), None, "count"),
        HistogramScale::Log => {
            let decades = (max.max(1) as f64).log10().ceil().max(1.0);
            let points = (0..=decades as u32).map(f64::from).collect();
            (decades + 0.15, Some(points), "count (log scale)")
        }
    };

    let err = PlotError::drawing(path);
    let log = key_points.is_some();
    let key_points = key_points.unwrap_or_else(|| nice_ticks(0.0, y_top, 8));
    let y = TickedAxis::new(0.0..y_top, key_points);
    Frame::new(path, title, (900, 520), (48, 80)).draw(lo..hi, y, |chart| {
        mesh(chart)
            .disable_x_mesh()
            .x_desc(x_label)
            .y_desc(y_desc)
            .x_labels(11)
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| {
                if log {
                    tick_label(10f64.powf(*v).round())
                } else {
                    tick_label(*v)
                }
            })
            .draw()
            .map_err(&err)?;
        let bin = (hi - lo) / counts.len() as f64;
        let color = series_color(0);
        chart
            .draw_series(counts.iter().enumerate().filter_map(|(i, &c)| {
                let top = height_of(c)?;
                let left = lo + i as f64 * bin;
                Some(Rectangle::new(
                    [(left, 0.0), (left + bin, top)],
                    color.filled(),
                ))
            }))
            .map_err(&err)?;
        Ok(())
    })
}

/// About `target` evenly spaced round tick values covering `lo..=hi` (steps of 1, 2 or 5
/// times a power of ten).
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
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

/// Writes a confusion-matrix heatmap: rows are "true" classes, columns "predicted".
/// See [`heatmap_with_axes`].
pub fn heatmap(
    path: &Path,
    title: &str,
    matrix: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    annotate: bool,
) -> Result<(), PlotError> {
    heatmap_with_axes(
        path,
        title,
        matrix,
        row_labels,
        col_labels,
        annotate,
        ("true", "predicted"),
    )
}

/// Writes `matrix` as a grid of cells shaded from white (smallest value, or 0) to dark
/// blue (largest), row 0 on top. With `annotate`, each cell shows its value (integers
/// without decimals). `axes` names the (rows, columns) axes.
pub fn heatmap_with_axes(
    path: &Path,
    title: &str,
    matrix: &[Vec<f64>],
    row_labels: &[String],
    col_labels: &[String],
    annotate: bool,
    axes: (&str, &str),
) -> Result<(), PlotError> {
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 {
        return Err(PlotError::invalid(path, "the matrix is empty"));
    }
    if let Some((i, r)) = matrix.iter().enumerate().find(|(_, r)| r.len() != cols) {
        return Err(PlotError::invalid(
            path,
            format!("row {i} has {} values, row 0 has {cols}", r.len()),
        ));
    }
    if row_labels.len() != rows || col_labels.len() != cols {
        return Err(PlotError::invalid(
            path,
            format!(
                "{} row and {} column labels for a {rows}x{cols} matrix",
                row_labels.len(),
                col_labels.len()
            ),
        ));
    }
    let values = || matrix.iter().flatten().copied().filter(|v| v.is_finite());
    let v_lo = values().fold(0.0f64, f64::min);
    let v_hi = values().fold(f64::NEG_INFINITY, f64::max);
    let span = if v_hi > v_lo { v_hi - v_lo } else { 1.0 };
    let integral = values().all(|v| (v - v.round()).abs() < 1e-9);
    let cell_text = |v: f64| {
        if !v.is_finite() {
            "-".to_string()
        } else if integral {
            format!("{:.0}", v)
        } else {
            format!("{:.2}", v)
        }
    };

    let text_size = 12.0;
    let widest_annotation = if annotate {
        matrix
            .iter()
            .flatten()
            .map(|&v| text_width(&cell_text(v), text_size))
            .max()
            .unwrap_or(0)
    } else {
        0
    };
    let widest_col = col_labels
        .iter()
        .map(|c| text_width(c, f64::from(TICK_SIZE)))
        .max()
        .unwrap_or(0);
    let widest_row = row_labels
        .iter()
        .map(|c| text_width(c, f64::from(TICK_SIZE)))
        .max()
        .unwrap_or(0);
    let cell = (widest_col + 8).max(widest_annotation + 10).max(40);
    let y_area = widest_row + 40;
    let width = y_area + cell * cols as u32 + 40;
    let height = 60 + cell * rows as u32 + 60;
    let err = PlotError::drawing(path);
    let centers = |n: usize| (0..n).map(|i| i as f64 + 0.5).collect::<Vec<_>>();
    let x = TickedAxis::new(0.0..cols as f64, centers(cols));
    // Reversed so row 0 is drawn on top, as a matrix is read.
    let y = TickedAxis::new(rows as f64..0.0, centers(rows));
    let frame = Frame {
        margin_right: 24,
        ..Frame::new(path, title, (width, height), (48, y_area))
    };
    frame.draw(x, y, |chart| {
        let label_of = |labels: &[String], v: f64| {
            let i = v.floor();
            if i >= 0.0 && (i as usize) < labels.len() {
                labels[i as usize].clone()
            } else {
                String::new()
            }
        };
        mesh(chart)
            .disable_mesh()
            .y_desc(axes.0)
            .x_desc(axes.1)
            .x_label_formatter(&|v| label_of(col_labels, *v))
            .y_label_formatter(&|v| label_of(row_labels, *v))
            .draw()
            .map_err(&err)?;
        let shade = |v: f64| -> f64 {
            if v.is_finite() {
                ((v - v_lo) / span).clamp(0.0, 1.0)
            } else {
                0.0
            }
        };
        chart
            .draw_series(matrix.iter().enumerate().flat_map(|(r, row)| {
                row.iter().enumerate().map(move |(c, &v)| {
                    let (x, y) = (c as f64, r as f64);
                    Rectangle::new([(x, y), (x + 1.0, y + 1.0)], blues(shade(v)).filled())
                })
            }))
            .map_err(&err)?;
        if annotate {
            chart
                .draw_series(matrix.iter().enumerate().flat_map(|(r, row)| {
                    row.iter().enumerate().map(move |(c, &v)| {
                        let ink: &'static RGBColor = if shade(v) > 0.55 { &WHITE } else { &BLACK };
                        let style = TextStyle::from((FONT_FAMILY, text_size).into_font())
                            .color(ink)
                            .pos(Pos::new(HPos::Center, VPos::Center));
                        Text::new(cell_text(v), (c as f64 + 0.5, r as f64 + 0.5), style)
                    })
                }))
                .map_err(&err)?;
        }
        Ok(())
    })
}

/// A linear f64 axis with ticks exactly at the given values (category centres, round
/// counts): plotters' own `with_key_points` cannot take a label formatter.
struct TickedAxis {
    start: f64,
    end: f64,
    ticks: Vec<f64>,
}

impl TickedAxis {
    fn new(range: std::ops::Range<f64>, ticks: Vec<f64>) -> Self {
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

/// A white-to-dark-blue colour for `t` in [0, 1] (after matplotlib's "Blues").
fn blues(t: f64) -> RGBColor {
    const STOPS: [(f64, (f64, f64, f64)); 5] = [
        (0.0, (247.0, 251.0, 255.0)),
        (0.25, (198.0, 219.0, 239.0)),
        (0.5, (107.0, 174.0, 214.0)),
        (0.75, (33.0, 113.0, 181.0)),
        (1.0, (8.0, 48.0, 107.0)),
    ];
    let t = t.clamp(0.0, 1.0);
    let upper = STOPS
        .iter()
        .position(|s| s.0 >= t)
        .unwrap_or(STOPS.len() - 1);
    let lower = upper.saturating_sub(1);
    let (t0, c0) = STOPS[lower];
    let (t1, c1) = STOPS[upper];
    let f = if t1 > t0 { (t - t0) / (t1 - t0) } else { 0.0 };
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    RGBColor(mix(c0.0, c1.0), mix(c0.1, c1.1), mix(c0.2, c1.2))
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

    #[test]
    fn blues_runs_from_light_to_dark() {
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(0.5), RGBColor(107, 174, 214));
    }
}
