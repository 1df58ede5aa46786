//! Grids of small grayscale images (samples, class means, filters, activation maps), each
//! with a caption below it and a title over the whole grid.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{check_canvas, ensure_font, text_width, PlotError, FONT_FAMILY};

/// One grayscale image of a grid. `pixels` are row-major, `width * height` of them, drawn
/// as gray levels with 0 = black and 1 = white (values outside [0, 1] are clamped).
#[derive(Debug, Clone, PartialEq)]
pub struct Tile {
    pub pixels: Vec<f32>,
    pub width: usize,
    pub height: usize,
    /// Caption under the image; `\n` starts a new line (e.g. "true: Shirt\npred: Coat").
    pub label: String,
}

impl Tile {
    /// A tile from intensities already in [0, 1].
    pub fn new(pixels: Vec<f32>, width: usize, height: usize, label: impl Into<String>) -> Self {
        Tile {
            pixels,
            width,
            height,
            label: label.into(),
        }
    }

    /// A tile from 8-bit pixels (0 = black, 255 = white), e.g. a Fashion-MNIST image.
    pub fn from_u8(pixels: &[u8], width: usize, height: usize, label: impl Into<String>) -> Self {
        Self::new(
            pixels.iter().map(|&p| f32::from(p) / 255.0).collect(),
            width,
            height,
            label,
        )
    }

    /// A tile from arbitrary values (filter weights, activations), min-max scaled so the
    /// smallest is black and the largest white. A constant input is drawn mid-gray;
    /// non-finite values are drawn black.
    pub fn scaled(values: &[f32], width: usize, height: usize, label: impl Into<String>) -> Self {
        let finite = values.iter().copied().filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        let span = hi - lo;
        let pixels = values
            .iter()
            .map(|&v| {
                if !v.is_finite() {
                    0.0
                } else if span > 0.0 {
                    (v - lo) / span
                } else {
                    0.5
                }
            })
            .collect();
        Self::new(pixels, width, height, label)
    }
}

const TITLE_SIZE: f64 = 20.0;
const CAPTION_SIZE: f64 = 13.0;
const LINE_HEIGHT: u32 = 16;
const PAD: u32 = 8;
const MAX_TILE_SIDE: usize = 4096;

/// How many output pixels per image pixel: `scale`, times the whole factor that brings a
/// smaller image (a 3x3 filter among 28x28 maps) up to the grid's largest one.
fn tile_magnification(tile: &Tile, max_w: usize, max_h: usize, scale: usize) -> usize {
    let fit = (max_w / (tile.width * scale)).min(max_h / (tile.height * scale));
    scale * fit.max(1)
}

/// Writes `tiles` as a PNG grid of `cols` columns, each image magnified `scale` times
/// (nearest neighbour) with its caption below and `title` on top.
pub fn save_image_grid(
    path: &Path,
    title: &str,
    tiles: &[Tile],
    cols: usize,
    scale: usize,
) -> Result<(), PlotError> {
    ensure_font();
    if tiles.is_empty() {
        return Err(PlotError::invalid(path, "no images to draw"));
    }
    if cols == 0 || scale == 0 {
        return Err(PlotError::invalid(
            path,
            format!("cols ({cols}) and scale ({scale}) must be at least 1"),
        ));
    }
    for (i, t) in tiles.iter().enumerate() {
        if t.width == 0 || t.height == 0 || t.pixels.len() != t.width * t.height {
            return Err(PlotError::invalid(
                path,
                format!(
                    "image {i} ({:?}) has {} pixels for a {}x{} shape",
                    t.label,
                    t.pixels.len(),
                    t.width,
                    t.height
                ),
            ));
        }
    }
    let cols = cols.min(tiles.len());
    let rows = tiles.len().div_ceil(cols);
    let max_w = tiles.iter().map(|t| t.width).max().unwrap_or(1) * scale;
    let max_h = tiles.iter().map(|t| t.height).max().unwrap_or(1) * scale;
    if max_w > MAX_TILE_SIDE || max_h > MAX_TILE_SIDE {
        return Err(PlotError::invalid(
            path,
            format!("magnified images of {max_w}x{max_h} pixels exceed {MAX_TILE_SIDE} per side"),
        ));
    }
    let caption_lines = tiles
        .iter()
        .map(|t| t.label.lines().count())
        .max()
        .unwrap_or(0) as u32;
    let caption_w = tiles
        .iter()
        .map(|t| text_width(&t.label, CAPTION_SIZE))
        .max()
        .unwrap_or(0);
    let cell_w = (max_w as u32).max(caption_w) + PAD;
    let cell_h = max_h as u32 + caption_lines * LINE_HEIGHT + PAD;
    let title_h = if title.is_empty() { PAD } else { 36 };
    let width = (cell_w * cols as u32 + PAD).max(text_width(title, TITLE_SIZE) + 2 * PAD);
    let height = title_h + cell_h * rows as u32 + PAD;
    check_canvas(path, width, height)?;

    let err = PlotError::drawing(path);
    // Text goes through plotters into an RGB buffer; the images are then copied into the
    // same buffer pixel by pixel (exact, and much faster than one rectangle per pixel).
    let (w, h) = (width as usize, height as usize);
    let mut buffer = vec![255u8; w * h * 3];
    // Where each tile's top-left pixel and caption centre go.
    let grid_left = (width - cell_w * cols as u32) / 2;
    let cell_origin = |i: usize| {
        let (row, col) = ((i / cols) as u32, (i % cols) as u32);
        (grid_left + col * cell_w, title_h + row * cell_h)
    };
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (width, height)).into_drawing_area();
        let centered = |size: f64| {
            TextStyle::from((FONT_FAMILY, size).into_font())
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top))
        };
        if !title.is_empty() {
            root.draw(&Text::new(
                title.to_string(),
                (width as i32 / 2, 8),
                centered(TITLE_SIZE),
            ))
            .map_err(&err)?;
        }
        for (i, tile) in tiles.iter().enumerate() {
            let (cell_x, cell_y) = cell_origin(i);
            for (l, line) in tile.label.lines().enumerate() {
                root.draw(&Text::new(
                    line.to_string(),
                    (
                        (cell_x + cell_w / 2) as i32,
                        (cell_y + max_h as u32 + 3 + l as u32 * LINE_HEIGHT) as i32,
                    ),
                    centered(CAPTION_SIZE),
                ))
                .map_err(&err)?;
            }
        }
        root.present().map_err(&err)?;
    }
    for (i, tile) in tiles.iter().enumerate() {
        let (cell_x, cell_y) = cell_origin(i);
        let magnify = tile_magnification(tile, max_w, max_h, scale);
        let (img_w, img_h) = (tile.width * magnify, tile.height * magnify);
        let x0 = cell_x as usize + (cell_w as usize - img_w) / 2;
        let y0 = cell_y as usize + (max_h - img_h) / 2;
        for y in 0..img_h {
            let row = &tile.pixels[(y / magnify) * tile.width..][..tile.width];
            let start = ((y0 + y) * w + x0) * 3;
            for (x, px) in buffer[start..start + img_w * 3]
                .chunks_exact_mut(3)
                .enumerate()
            {
                let level = (row[x / magnify].clamp(0.0, 1.0) * 255.0).round() as u8;
                px.fill(level);
            }
        }
    }
    image::save_buffer_with_format(
        path,
        &buffer,
        width,
        height,
        image::ColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(PlotError::drawing(path))?;
    Ok(())
}
