//! The evaluate, visualize and report stages end to end on the fixture subset: a tiny
//! baseline is trained once (and an untrained ResNet-18 saved), then each downstream stage runs on them
//! and its outputs are checked (metrics consistent with the confusion matrix, PNGs that
//! decode at sensible sizes, a self-contained report whose images all load in Chromium).
//! (Over 500 lines: the three stages share the one trained fixture, trained once per test
//! binary, which a split into files would train again for each.)

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;

use fmnist_stages::models::{self, ModelKind};
use fmnist_stages::test_support::{chromium, open_in_chromium};
use fmnist_stages::{evaluate, report, train, visualize, Input, NoProgress, StageContext};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

fn input(stage: &str, kind: &str, dir: PathBuf, params: serde_json::Value) -> Input {
    Input {
        stage: stage.into(),
        kind: kind.into(),
        dir,
        fingerprint: format!("fp-{stage}"),
        params,
    }
}

fn download_input() -> Input {
    input(
        "download",
        "download",
        fixture_dir(),
        serde_json::Value::Null,
    )
}

/// Where the shared stage outputs of this file go (kept after the run for inspection,
/// replaced by the next run).
fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval_stages")
}

/// A fresh, empty out folder for stage `name` under [`work_dir`].
fn out_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = work_dir().join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `f` as stage `name` with `inputs`, writing into `out`.
fn run_stage<T>(
    name: &str,
    inputs: &[Input],
    out: &Path,
    f: impl FnOnce(&StageContext) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let scratch = tempfile::tempdir()?;
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        name,
        inputs,
        out_dir: out,
        scratch_dir: scratch.path(),
        continue_dir: None,
        device: "cpu",
        kernels: fmnist_stages::ops::Kernels::Fast,
        seed: 7,
        progress: &NoProgress,
        cancel: &cancel,
    };
    f(&ctx)
}

/// Two models trained once for every test of this file (kept alive for the process).
struct Trained {
    inputs: Vec<Input>,
}

/// A trained baseline (200 images, one epoch) and an untrained ResNet-18 laid out as a
/// train stage lays out its outputs: training a ResNet on CPU costs more time than this file
/// may take, and evaluation only needs its weights, config and history.
fn train_models() -> anyhow::Result<Trained> {
    let mut inputs = vec![download_input()];

    let params: train::Params = toml::from_str(
        r#"
        model = "baseline"
        epochs = 1
        train_limit = 256
        batch_size = 32
        optimizer = { name = "adadelta", lr = 1.0 }
        lr_decay = 0.7
        "#,
    )?;
    let dir = out_dir("train-baseline")?;
    run_stage("train-baseline", &[download_input()], &dir, |ctx| {
        train::run(params.clone(), ctx)
    })?;
    inputs.push(input(
        "train-baseline",
        "train",
        dir,
        serde_json::to_value(&params)?,
    ));

    let params: train::Params = toml::from_str(
        r#"
        model = "resnet18"
        optimizer = { name = "adam", lr = 1e-4 }
        "#,
    )?;
    let dir = out_dir("train-resnet")?;
    let (_, varmap) = models::init(ModelKind::Resnet18, 3, &candle_core::Device::Cpu)?;
    models::save_varmap(&varmap, &dir.join("model.safetensors"))?;
    let config = serde_json::json!({ "model": "resnet18", "params": params });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let history = serde_json::json!({ "model": "resnet18", "epochs": [{
        "epoch": 1, "lr": 1e-4, "train_loss": 2.25, "train_accuracy": 0.2,
        "test_loss": null, "test_accuracy": null, "seconds": 1.0, "images_per_s": 64.0
    }]});
    std::fs::write(dir.join("history.json"), history.to_string())?;
    inputs.push(input(
        "train-resnet",
        "train",
        dir,
        serde_json::to_value(&params)?,
    ));
    Ok(Trained { inputs })
}

fn trained() -> &'static Trained {
    static TRAINED: OnceLock<Trained> = OnceLock::new();
    TRAINED.get_or_init(|| match train_models() {
        Ok(t) => t,
        Err(e) => panic!("training the test models failed: {e:#}"),
    })
}

/// The evaluate stage's outputs, computed once.
fn evaluated() -> &'static (PathBuf, serde_json::Value) {
    static EVALUATED: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    EVALUATED.get_or_init(|| {
        let params: evaluate::Params = match toml::from_str("test_limit = 300") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let run = || -> anyhow::Result<(PathBuf, serde_json::Value)> {
            let dir = out_dir("evaluate")?;
            let metrics = run_stage("evaluate", &trained().inputs, &dir, |ctx| {
                evaluate::run(params, ctx)
            })?;
            Ok((dir, metrics))
        };
        match run() {
            Ok(r) => r,
            Err(e) => panic!("evaluate failed: {e:#}"),
        }
    })
}

/// The visualize stage's outputs (default samples plus test image 3), computed once.
fn visualized() -> &'static (PathBuf, serde_json::Value) {
    static VISUALIZED: OnceLock<(PathBuf, serde_json::Value)> = OnceLock::new();
    VISUALIZED.get_or_init(|| {
        let params: visualize::Params =
            match toml::from_str(r#"samples = ["Sneaker", "Trouser", 3]"#) {
                Ok(p) => p,
                Err(e) => panic!("{e}"),
            };
        let run = || -> anyhow::Result<(PathBuf, serde_json::Value)> {
            let dir = out_dir("visualize")?;
            let metrics = run_stage("visualize", &trained().inputs, &dir, |ctx| {
                visualize::run(params, ctx)
            })?;
            Ok((dir, metrics))
        };
        match run() {
            Ok(r) => r,
            Err(e) => panic!("visualize failed: {e:#}"),
        }
    })
}

fn png_size(path: &Path) -> anyhow::Result<(u32, u32)> {
    let img = image::open(path)
        .map_err(|e| anyhow::anyhow!("{} does not decode: {e}", path.display()))?;
    Ok((img.width(), img.height()))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

#[test]
fn evaluate_metrics_agree_with_the_confusion_matrix() -> anyhow::Result<()> {
    let (out, summary) = evaluated();
    let metrics = read_json(&out.join("metrics.json"))?;
    let models = metrics["models"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("metrics.json has no models"))?;
    assert_eq!(models.len(), 2);
    for (stage, m) in models {
        let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion"].clone())?;
        assert_eq!(confusion.len(), 10, "{stage}");
        assert!(confusion.iter().all(|r| r.len() == 10), "{stage}");
        let total: u64 = confusion.iter().flatten().sum();
        assert_eq!(total, 300, "{stage}: confusion sums to the test count");
        let trace: u64 = (0..10).map(|i| confusion[i][i]).sum();
        let acc = m["accuracy"].as_f64().unwrap_or(f64::NAN);
        assert!((acc - trace as f64 / total as f64).abs() < 1e-12, "{stage}");
        assert_eq!(summary["models"][stage]["accuracy"], m["accuracy"]);
        let per_class = m["per_class"].as_array().cloned().unwrap_or_default();
        assert_eq!(per_class.len(), 10);
        let support: u64 = per_class.iter().filter_map(|c| c["support"].as_u64()).sum();
        assert_eq!(support, 300);
        for c in &per_class {
            for key in ["precision", "recall", "f1"] {
                let v = c[key].as_f64().unwrap_or(-1.0);
                assert!((0.0..=1.0).contains(&v), "{stage} {key} {v}");
            }
        }
        assert!(m["loss"].as_f64().is_some_and(|l| l.is_finite() && l > 0.0));
        assert!(m["final_train_loss"].as_f64().is_some_and(|l| l > 0.0));
    }
    assert_eq!(models["train-resnet"]["final_train_loss"], 2.25);
    // Speed is a timing: in the unhashed timings.json, not in metrics.json.
    let timings = read_json(&out.join("timings.json"))?;
    for (stage, m) in models {
        assert!(m.get("inference_images_per_s").is_none(), "{stage}");
        assert!(timings["models"][stage]["inference_images_per_s"]
            .as_f64()
            .is_some_and(|v| v > 0.0));
    }
    let baseline = &models["train-baseline"];
    assert_eq!(baseline["params"], 1_199_882);
    assert_eq!(models["train-resnet"]["params"], 11_175_370);
    // 256 images and one epoch already beat chance (10%) by far.
    assert!(baseline["accuracy"].as_f64().unwrap_or(0.0) > 0.3);

    let table = std::fs::read_to_string(out.join("comparison.md"))?;
    assert!(
        table.contains("| train-baseline | Baseline CNN | Adadelta lr 1.0 x0.7/epoch | cross-entropy | 32 | 1 |"),
        "{table}"
    );
    assert!(
        table.contains("| train-resnet | ResNet-18 | Adam lr 1e-4 |"),
        "{table}"
    );
    assert!(table.contains("first 300 test images"), "{table}");
    assert!(table.contains("ResNet-18"));
    assert!(table.contains("91.34%") && table.contains("89.47%"));
    let acc_text = format!(
        "{:.2}%",
        100.0 * baseline["accuracy"].as_f64().unwrap_or(0.0)
    );
    assert!(table.contains(&acc_text), "{table}");
    Ok(())
}

#[test]
fn evaluate_pngs_decode() -> anyhow::Result<()> {
    let (out, _) = evaluated();
    for stage in ["train-baseline", "train-resnet"] {
        let (w, h) = png_size(&out.join(format!("confusion-{stage}.png")))?;
        assert!(w >= 400 && h >= 400, "confusion {w}x{h}");
    }
    // The tiny baseline certainly misclassifies some of 300 images.
    let (w, h) = png_size(&out.join("misclassified-train-baseline.png"))?;
    assert!(w >= 8 * 28 * 3 && h >= 28 * 3, "misclassified {w}x{h}");
    let (w, h) = png_size(&out.join("per-class-accuracy.png"))?;
    assert!(w >= 400 && h >= 200, "per-class {w}x{h}");
    Ok(())
}

#[test]
fn evaluate_without_models_or_with_bad_params_fails_clearly() -> anyhow::Result<()> {
    let only_data = [download_input()];
    let tmp = tempfile::tempdir()?;
    let err = run_stage("evaluate", &only_data, tmp.path(), |ctx| {
        evaluate::run(evaluate::Params::default(), ctx)
    })
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.contains("`train`"), "{err}");
    let err = toml::from_str::<evaluate::Params>("batch = 3")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("test_limit") && err.contains("batch_size"),
        "{err}"
    );
    Ok(())
}

#[test]
fn visualize_writes_filters_and_activation_grids() -> anyhow::Result<()> {
    let (out, metrics) = visualized();
    let class_of_3 = {
        let labels =
            fmnist_stages::data::Dataset::load(&fixture_dir(), fmnist_stages::data::Split::Test)?
                .labels;
        fmnist_stages::data::CLASS_NAMES[labels[3] as usize]
            .to_lowercase()
            .replace(['/', ' '], "-")
    };
    let mut expected = Vec::new();
    for (stage, layers) in [
        ("train-baseline", ["conv1", "conv2"]),
        ("train-resnet", ["conv1", "layer1"]),
    ] {
        expected.push(format!("{stage}-filters-conv1.png"));
        for sample in [
            "sneaker".to_string(),
            "trouser".to_string(),
            format!("test3-{class_of_3}"),
        ] {
            for layer in layers {
                expected.push(format!("{stage}-activations-{sample}-{layer}.png"));
            }
        }
    }
    let listed: Vec<String> = serde_json::from_value(metrics["images"].clone())?;
    let mut sorted_expected = expected.clone();
    sorted_expected.sort();
    let mut sorted_listed = listed.clone();
    sorted_listed.sort();
    assert_eq!(sorted_listed, sorted_expected);
    for name in &expected {
        let (w, h) = png_size(&out.join(name))?;
        assert!(w >= 300 && h >= 100, "{name}: {w}x{h}");
    }
    // 32 baseline filters of 3x3 magnified 14x in 16 columns; 64 ResNet ones of 7x7 6x.
    let (w, h) = png_size(&out.join("train-baseline-filters-conv1.png"))?;
    assert!(w >= 16 * 42 && h >= 2 * 42, "baseline filters {w}x{h}");
    let (w, h) = png_size(&out.join("train-resnet-filters-conv1.png"))?;
    assert!(w >= 16 * 42 && h >= 4 * 42, "resnet filters {w}x{h}");
    // 1 input + 64 maps in 11 columns = 6 rows of at least 56 pixels.
    let (_, h) = png_size(&out.join("train-baseline-activations-sneaker-conv2.png"))?;
    assert!(h >= 6 * 56, "conv2 activations {h} high");
    assert_eq!(metrics["samples"][0]["class"], "Sneaker");
    Ok(())
}

#[test]
fn visualize_rejects_unknown_classes_and_out_of_range_indices() {
    let bad: visualize::Params = match toml::from_str(r#"samples = ["Sock"]"#) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let msg = bad
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(msg.contains("Sneaker"), "{msg}");
    let far: visualize::Params = match toml::from_str("samples = [100000]") {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    let tmp = match tempfile::tempdir() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let err = run_stage("visualize", &trained().inputs, tmp.path(), |ctx| {
        visualize::run(far, ctx)
    })
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(err.contains("outside the test set"), "{err}");
}

/// A stats-like input: a JSON file (with text that needs escaping) and a chart.
fn stats_input() -> anyhow::Result<Input> {
    let dir = out_dir("stats")?;
    let stats = serde_json::json!({
        "train": { "images": 1000, "mean": 0.2860, "note": "<T-shirt/top & \"Coat\">" },
        "class_counts": [100, 100, 100, 100, 100, 100, 100, 100, 100, 100],
    });
    std::fs::write(dir.join("stats.json"), stats.to_string())?;
    fmnist_stages::plot::bar_chart(
        &dir.join("class-balance.png"),
        "class balance",
        "images",
        &["a".to_string(), "b".to_string()],
        &[fmnist_stages::plot::BarSeries::new("train", vec![3.0, 4.0])],
    )?;
    Ok(input(
        "stats",
        "stats",
        dir,
        serde_json::json!({ "sample_grid": 5 }),
    ))
}

/// The report over every other stage's outputs, computed once: (dir, metrics, inputs).
fn reported() -> &'static (PathBuf, serde_json::Value, Vec<Input>) {
    static REPORTED: OnceLock<(PathBuf, serde_json::Value, Vec<Input>)> = OnceLock::new();
    REPORTED.get_or_init(|| {
        let run = || -> anyhow::Result<(PathBuf, serde_json::Value, Vec<Input>)> {
            let mut inputs = vec![download_input(), stats_input()?];
            inputs.extend(trained().inputs.iter().skip(1).cloned());
            inputs.push(input(
                "evaluate",
                "evaluate",
                evaluated().0.clone(),
                serde_json::json!({ "test_limit": 300 }),
            ));
            inputs.push(input(
                "visualize",
                "visualize",
                visualized().0.clone(),
                serde_json::json!({ "samples": ["Sneaker", "Trouser", 3] }),
            ));
            let dir = out_dir("report")?;
            let metrics = run_stage("report", &inputs, &dir, |ctx| {
                report::run(report::Params::default(), ctx)
            })?;
            Ok((dir, metrics, inputs))
        };
        match run() {
            Ok(r) => r,
            Err(e) => panic!("report failed: {e:#}"),
        }
    })
}

#[test]
fn report_inlines_every_image_and_escapes_text() -> anyhow::Result<()> {
    use base64::Engine as _;
    let (dir, metrics, inputs) = reported();
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    let mut pngs = 0;
    for input in inputs {
        for entry in std::fs::read_dir(&input.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "png") {
                let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&path)?);
                assert!(
                    html.contains(&format!("src=\"data:image/png;base64,{data}\"")),
                    "{} is not inlined",
                    path.display()
                );
                pngs += 1;
            }
        }
    }
    // stats 1, baseline curves 2, evaluate 2+2+1, visualize 14.
    assert_eq!(pngs, 22);
    assert_eq!(html.matches("<img ").count(), pngs);
    assert_eq!(metrics["images"], pngs);
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"));
    assert!(html.contains("&lt;T-shirt/top &amp; &quot;Coat&quot;&gt;"));
    assert!(!html.contains("<T-shirt"));
    for section in [
        "data",
        "training",
        "comparison",
        "confusion",
        "filters",
        "activations",
        "provenance",
    ] {
        assert!(
            html.contains(&format!("<a href=\"#{section}\">")),
            "toc lacks {section}"
        );
        assert!(
            html.contains(&format!("<section id=\"{section}\">")),
            "no {section} section"
        );
    }
    for input in inputs {
        assert!(html.contains(&format!("<code>{}</code>", input.fingerprint)));
    }
    assert!(
        html.contains("<td>91.34%</td>"),
        "comparison table not rendered"
    );
    assert!(
        html.contains("<th>sample_grid</th>"),
        "input params missing"
    );
    // Parameter counts read with separators; per-class figures of both models side by side.
    assert!(html.contains("<td>1,199,882</td>") && html.contains("<td>11,175,370</td>"));
    assert!(
        html.contains("<th colspan=\"3\">train-baseline</th><th colspan=\"3\">train-resnet</th>")
    );
    assert!(html.contains("<tr><th>Ankle boot</th><td>"));
    // Histories list the epoch first.
    assert!(
        html.contains("<thead><tr><th>epoch</th><th>train_loss</th>"),
        "history columns"
    );
    assert!(html.contains("Pipeline seed <code>7</code>, device <code>cpu</code>"));
    Ok(())
}

#[test]
fn report_renders_in_headless_chromium() -> anyhow::Result<()> {
    if chromium("the report's browser check").is_none() {
        return Ok(());
    }
    let (dir, metrics, _) = reported();
    let view = open_in_chromium(&dir.join("report.html"))?;
    let n = metrics["images"].as_u64().unwrap_or(0);
    assert!(n > 0);
    assert_eq!(
        view.body_attribute("data-images-ok"),
        Some(format!("{n}/{n}").as_str()),
        "not every image decoded; stderr tail:\n{}",
        view.stderr_tail
    );
    assert_eq!(view.body_attribute("data-script-errors"), Some("0"));
    assert!(view.console.is_empty(), "console: {:?}", view.console);
    assert!(view.dom.contains("<section id=\"activations\">"));
    Ok(())
}

/// The browser check itself can fail: a copy of the report with a corrupt image and a
/// script that throws is caught on all three counts.
#[test]
fn the_browser_check_catches_a_broken_image_and_a_script_error() -> anyhow::Result<()> {
    if chromium("the browser check's own check").is_none() {
        return Ok(());
    }
    let (dir, metrics, _) = reported();
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    let broken = html.replacen(
        "</body>",
        "<img src=\"data:image/png;base64,iVBORw0KGgoAAAA=\" alt=\"corrupt\">\
         <script>notDefinedAnywhere();</script></body>",
        1,
    );
    let tmp = tempfile::tempdir()?;
    let page = tmp.path().join("broken.html");
    std::fs::write(&page, broken)?;
    let view = open_in_chromium(&page)?;
    let n = metrics["images"].as_u64().unwrap_or(0);
    assert_eq!(
        view.body_attribute("data-images-ok"),
        Some(format!("{n}/{}", n + 1).as_str())
    );
    assert_ne!(view.body_attribute("data-script-errors"), Some("0"));
    assert!(
        view.console
            .iter()
            .any(|l| l.contains("notDefinedAnywhere")),
        "{:?}",
        view.console
    );
    Ok(())
}

#[test]
fn a_train_input_without_its_files_is_named_in_the_error() -> anyhow::Result<()> {
    let empty = tempfile::tempdir()?;
    let inputs = [
        download_input(),
        input(
            "train-broken",
            "train",
            empty.path().to_path_buf(),
            serde_json::Value::Null,
        ),
    ];
    let out = tempfile::tempdir()?;
    let err = run_stage("evaluate", &inputs, out.path(), |ctx| {
        evaluate::run(evaluate::Params::default(), ctx)
    })
    .err()
    .map(|e| format!("{e:#}"))
    .unwrap_or_default();
    assert!(
        err.contains("config.json") && err.contains("train-broken"),
        "{err}"
    );
    Ok(())
}
