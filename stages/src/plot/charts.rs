//! Charts: line charts (training curves), grouped bar charts (class balance, per-class
//! scores of several models) and histograms (pixel intensities), each drawn in the one
//! [`Frame`].

use std::path::Path;

use plotters::prelude::*;

use super::frame::{
    draw_legend, mesh, nice_ticks, padded, tick_label, Frame, TickedAxis, TICK_SIZE,
};
use super::{series_color, text_width, PlotError};

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
