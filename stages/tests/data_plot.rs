//! The shared plotting primitives write PNGs that decode, with the size the layout
//! promises, and refuse data they cannot draw with an error naming the file.

use std::path::Path;

use fmnist_stages::plot::{self, BarSeries, HistogramScale, PlotError, Series, Tile};

fn decode(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{} does not decode: {e}", path.display()))
        .to_rgb8()
}

/// Pixels that are neither white nor the given fill colours: text and lines were drawn.
fn count_dark(img: &image::RgbImage) -> usize {
    img.pixels()
        .filter(|p| p.0.iter().all(|&c| c < 100))
        .count()
}

fn keep(dir: &Path) {
    // PLOT_KEEP=/some/dir copies the outputs there for a look.
    if let Ok(target) = std::env::var("PLOT_KEEP") {
        std::fs::create_dir_all(&target).unwrap();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), Path::new(&target).join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn image_grid_has_the_promised_layout_and_draws_captions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    let gradient: Vec<u8> = (0..28 * 28).map(|i| (i % 28 * 9) as u8).collect();
    let tiles: Vec<Tile> = (0..7)
        .map(|i| match i % 3 {
            0 => Tile::from_u8(&gradient, 28, 28, format!("class {i}")),
            1 => Tile::scaled(
                &[-1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
                3,
                3,
                "filter",
            ),
            _ => Tile::new(vec![0.0; 28 * 28], 28, 28, "true: Shirt\npred: T-shirt/top"),
        })
        .collect();
    plot::save_image_grid(&path, "Samples", &tiles, 3, 3).unwrap();
    let img = decode(&path);
    // 3 columns x 3 rows; cells at least 28*3 px wide and tall.
    assert!(
        img.width() >= 3 * 84 && img.height() >= 3 * 84 + 36,
        "{:?}",
        img.dimensions()
    );
    assert!(
        img.width() < 1000 && img.height() < 800,
        "{:?}",
        img.dimensions()
    );
    assert!(count_dark(&img) > 0);
    keep(dir.path());
}

#[test]
fn scaled_tiles_span_black_to_white() {
    let t = Tile::scaled(&[2.0, 4.0, 6.0, f32::NAN], 2, 2, "");
    assert_eq!(t.pixels, vec![0.0, 0.5, 1.0, 0.0]);
    let flat = Tile::scaled(&[3.0; 4], 2, 2, "");
    assert_eq!(flat.pixels, vec![0.5; 4]);
    assert_eq!(Tile::from_u8(&[0, 255], 2, 1, "").pixels, vec![0.0, 1.0]);
}

#[test]
fn text_renders_with_the_embedded_font() {
    // A title-only grid: the title's glyph pixels must be there, which needs the font.
    let dir = tempfile::tempdir().unwrap();
    let with_text = dir.path().join("t.png");
    let without = dir.path().join("n.png");
    let tile = Tile::new(vec![1.0; 4], 2, 2, "");
    plot::save_image_grid(
        &with_text,
        "Hello, Fashion-MNIST",
        std::slice::from_ref(&tile),
        1,
        1,
    )
    .unwrap();
    plot::save_image_grid(&without, "", &[tile], 1, 1).unwrap();
    let dark = count_dark(&decode(&with_text));
    assert!(dark > 100, "only {dark} dark pixels: text did not render");
    assert_eq!(count_dark(&decode(&without)), 0);
}

#[test]
fn line_chart_writes_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("curves.png");
    let loss = |scale: f64| (1..=5).map(|e| (e as f64, scale / e as f64)).collect();
    let series = [
        Series::new("baseline train loss", loss(0.9)),
        Series::new("resnet18 train loss", loss(0.6)),
        Series::new("with a gap", vec![(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.3)]),
    ];
    plot::line_chart(&path, "Training loss", "epoch", "loss", &series).unwrap();
    let img = decode(&path);
    assert_eq!(img.dimensions(), (900, 560));
    assert!(count_dark(&img) > 500);
    // A single point still gets a sensible range.
    plot::line_chart(
        &path,
        "one",
        "x",
        "y",
        &[Series::new("a", vec![(1.0, 2.0)])],
    )
    .unwrap();
    keep(dir.path());
}

#[test]
fn bar_chart_writes_a_png_and_checks_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bars.png");
    let cats: Vec<String> = fmnist_stages::data::CLASS_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let series = [
        BarSeries::new(
            "baseline",
            (0..10).map(|i| 0.8 + i as f64 / 100.0).collect(),
        ),
        BarSeries::new(
            "resnet18",
            (0..10).map(|i| 0.9 - i as f64 / 100.0).collect(),
        ),
    ];
    plot::bar_chart(&path, "Per-class accuracy", "accuracy", &cats, &series).unwrap();
    let img = decode(&path);
    assert!(
        img.width() >= 640 && img.height() == 520,
        "{:?}",
        img.dimensions()
    );
    let bad = [BarSeries::new("short", vec![1.0])];
    let e = plot::bar_chart(&path, "t", "y", &cats, &bad).unwrap_err();
    assert!(matches!(e, PlotError::InvalidData { .. }));
    assert!(
        e.to_string().contains("bars.png") && e.to_string().contains("1 values"),
        "{e}"
    );
    keep(dir.path());
}

#[test]
fn histogram_writes_linear_and_log_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let counts: Vec<u64> = (0..64)
        .map(|i| if i == 0 { 1_000_000 } else { 1000 + i * 37 })
        .collect();
    let lin = dir.path().join("hist.png");
    let log = dir.path().join("hist_log.png");
    plot::histogram(&lin, "Pixels", "intensity", &counts, (0.0, 1.0)).unwrap();
    plot::histogram_with_scale(
        &log,
        "Pixels",
        "intensity",
        &counts,
        (0.0, 1.0),
        HistogramScale::Log,
    )
    .unwrap();
    assert_eq!(decode(&lin).dimensions(), (900, 520));
    assert_eq!(decode(&log).dimensions(), (900, 520));
    let e = plot::histogram(&lin, "t", "x", &counts, (1.0, 0.0)).unwrap_err();
    assert!(e.to_string().contains("not an increasing"), "{e}");
    keep(dir.path());
}

#[test]
fn heatmap_writes_an_annotated_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("confusion.png");
    let labels: Vec<String> = fmnist_stages::data::CLASS_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let matrix: Vec<Vec<f64>> = (0..10)
        .map(|r| {
            (0..10)
                .map(|c| {
                    if r == c {
                        900.0
                    } else {
                        ((r * 7 + c * 3) % 40) as f64
                    }
                })
                .collect()
        })
        .collect();
    plot::heatmap(&path, "Confusion matrix", &matrix, &labels, &labels, true).unwrap();
    let img = decode(&path);
    assert!(
        img.width() > 400 && img.height() > 400,
        "{:?}",
        img.dimensions()
    );
    // A ragged matrix is refused, naming the file.
    let ragged = vec![vec![1.0, 2.0], vec![3.0]];
    let two: Vec<String> = vec!["a".into(), "b".into()];
    let e = plot::heatmap(&path, "t", &ragged, &two, &two, false).unwrap_err();
    assert!(
        e.to_string().contains("confusion.png") && e.to_string().contains("row 1"),
        "{e}"
    );
    keep(dir.path());
}

#[test]
fn unwritable_destination_is_an_error_not_a_panic() {
    let path = Path::new("/nonexistent-dir-for-plot-test/x.png");
    let e = plot::line_chart(
        path,
        "t",
        "x",
        "y",
        &[Series::new("a", vec![(0.0, 1.0), (1.0, 2.0)])],
    )
    .unwrap_err();
    assert!(e.to_string().contains("x.png"), "{e}");
}

#[test]
fn empty_inputs_are_refused() {
    let p = Path::new("e.png");
    assert!(plot::save_image_grid(p, "t", &[], 3, 1).is_err());
    assert!(plot::save_image_grid(p, "t", &[Tile::new(vec![0.0; 3], 2, 2, "")], 3, 1).is_err());
    assert!(plot::line_chart(p, "t", "x", "y", &[]).is_err());
    assert!(plot::histogram(p, "t", "x", &[], (0.0, 1.0)).is_err());
    assert!(plot::heatmap(p, "t", &[], &[], &[], true).is_err());
}
