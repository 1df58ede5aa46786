//! Annotated heatmaps (confusion matrices), drawn in the one [`Frame`].

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::frame::{mesh, Frame, TickedAxis, TICK_SIZE};
use super::{text_width, PlotError, FONT_FAMILY};

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
    let mut frame = Frame::new(path, title, (width, height), (48, y_area));
    frame.margin_right = 24;
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
    fn blues_runs_from_light_to_dark() {
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(0.5), RGBColor(107, 174, 214));
    }
}
