//! Experiments through the real binary: runs recorded as experiments, `exp show`,
//! `params diff` / `metrics diff`, `run --sweep` and `exp apply`. Command stages where
//! training is not the point (a script writes metrics.json from its arguments), and one
//! small study (download, a 1-epoch baseline on 256 images, evaluate) for the metrics
//! columns and a sweep over the learning rate.
//! Over 500 lines: each test walks one user loop end to end (edit and rerun, git, sweep
//! and apply, the study), and the shared workspace helpers sit beside them.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

mod common;
use common::{fixture_dir, text};

const BIN: &str = env!("CARGO_BIN_EXE_fmnist-pipe");

/// prep (shared) -> a and b; a and b write metrics.json from their command's arguments and
/// log each execution to runs.log.
const PIPELINE: &str = r#"# Experiments test pipeline: keep this comment.
[stages.prep]
cmd = "echo prep >> runs.log; echo data > data.txt"
outs = ["data.txt"]

[stages.a]
cmd = "sh score.sh a 0.5 2"  # a's score and loss
needs = ["prep"]
deps = ["score.sh"]
outs = ["a/metrics.json"]

[stages.b]
cmd = "sh score.sh b 1 1"
needs = ["prep"]
deps = ["score.sh"]
outs = ["b/metrics.json"]
"#;

const SCORE: &str = r#"echo "$1 $2 $3" >> runs.log
mkdir -p "$1"
printf '{"score": %s, "loss": %s}\n' "$2" "$3" > "$1/metrics.json"
"#;

struct Ws {
    dir: TempDir,
}

impl Ws {
    fn new(pipeline: &str) -> Ws {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).unwrap();
        std::fs::write(dir.path().join("score.sh"), SCORE).unwrap();
        Ws { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn pipe(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env_remove("COLUMNS")
            .output()
            .expect("run fmnist-pipe")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.pipe(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} failed:\n{}",
            text(&out)
        );
        text(&out)
    }

    fn stdout(&self, args: &[&str]) -> String {
        let out = self.pipe(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} failed:\n{}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.stdout(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
    }

    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("runs.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap()
    }

    fn edit(&self, from: &str, to: &str) {
        let text = self.read("pipeline.toml");
        assert!(text.contains(from), "{from} not in pipeline.toml");
        std::fs::write(self.path("pipeline.toml"), text.replace(from, to)).unwrap();
    }
}

fn number(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite(), "{what}: {x}");
    x
}

/// `status` says every one of the `stages` is up to date.
fn up_to_date(ws: &Ws, stages: usize) {
    let status = ws.stdout(&["status"]);
    assert_eq!(status.lines().count(), stages, "{status}");
    assert!(
        status.lines().all(|l| l.contains("  up to date")),
        "{status}"
    );
}

/// The rows of `exp show --json`, newest first.
fn experiments(ws: &Ws) -> Vec<Value> {
    ws.json(&["exp", "show", "--json"])
        .as_array()
        .expect("an array")
        .clone()
}

#[test]
fn edits_and_reruns_are_experiments_compared_by_show_and_diff() {
    let ws = Ws::new(PIPELINE);
    let first = ws.ok(&["run", "--name", "first"]);
    assert!(first.contains("experiment: first"), "{first}");
    let lock = ws.read("pipeline.lock");
    assert!(
        lock.lines()
            .any(|l| l.starts_with("finished = \"20") && l.ends_with("Z\"")),
        "each run's finish time is recorded:\n{lock}"
    );
    ws.edit("sh score.sh a 0.5 2", "sh score.sh a 0.75 1.5");
    ws.ok(&["run"]);
    ws.edit("sh score.sh a 0.75 1.5", "sh score.sh a 0.625 1");
    ws.ok(&["run", "--name", "third"]);
    assert_eq!(ws.runs().iter().filter(|l| *l == "prep").count(), 1);

    let rows = experiments(&ws);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["name"], "third");
    assert_eq!(rows[2]["name"], "first");
    let auto = rows[1]["name"].as_str().unwrap().to_string();
    assert!(
        auto.split('-').count() == 2 && auto.chars().all(|c| c.is_ascii_lowercase() || c == '-'),
        "an automatic adjective-noun name: {auto}"
    );
    assert_eq!(rows[0]["current"], true);
    assert_eq!(rows[1]["current"], false);
    let scores: Vec<f64> = rows
        .iter()
        .map(|r| number(&r["metrics"]["a.score"], "a.score"))
        .collect();
    assert_eq!(scores, [0.625, 0.75, 0.5]);
    assert_eq!(rows[1]["params"]["a.cmd"], "sh score.sh a 0.75 1.5");

    // The table: the changed param as a column, b's unchanged one not; current marked.
    let table = ws.stdout(&["exp", "show"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].contains("cmd") && lines[0].contains("a.score"),
        "{table}"
    );
    assert!(
        !table.contains("sh score.sh b 1 1"),
        "unchanged params are not columns:\n{table}"
    );
    assert!(
        lines[1].starts_with('*') && lines[1].contains("third"),
        "{table}"
    );
    assert!(
        lines[2].contains(&auto) && lines[2].contains("0.75"),
        "{table}"
    );
    assert!(
        lines[3].contains("first") && lines[3].contains("0.5"),
        "{table}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");

    let sorted = ws.stdout(&["exp", "show", "--sort", "a.score"]);
    let order: Vec<&str> = sorted.lines().skip(1).take(3).collect();
    assert!(
        order[0].contains("first") && order[2].contains(&auto),
        "{sorted}"
    );
    let csv = ws.stdout(&["exp", "show", "--csv"]);
    assert!(csv.starts_with("current,name,created,a.cmd,"), "{csv}");
    assert!(
        csv.lines().nth(1).unwrap().starts_with("true,third,"),
        "{csv}"
    );
    let picked = ws.json(&["exp", "show", "--json", "first", "third"]);
    assert_eq!(picked.as_array().map(Vec::len), Some(2), "{picked}");
    let bad_sort = ws.pipe(&["exp", "show", "--sort", "nope"]);
    assert_eq!(bad_sort.status.code(), Some(2), "{}", text(&bad_sort));

    // No git: the workspace against the previous experiment.
    let params = ws.stdout(&["params", "diff"]);
    assert!(
        params.contains(&auto) && params.contains("sh score.sh a 0.75 1.5"),
        "{params}"
    );
    assert!(params.contains("sh score.sh a 0.625 1"), "{params}");
    let metrics = ws.json(&["metrics", "diff", "--json"]);
    assert_eq!(metrics["old"], auto.as_str());
    assert_eq!(metrics["new"], "workspace");
    let score = &metrics["changes"]["a.score"];
    assert!(
        (number(&score["diff"], "diff") - (0.625 - 0.75)).abs() < 1e-12,
        "{metrics}"
    );
    assert!(
        metrics["changes"].get("b.score").is_none(),
        "unchanged: {metrics}"
    );
    let named = ws.stdout(&["metrics", "diff", "first", "third"]);
    assert!(named.contains("a.loss") && named.contains("-1"), "{named}");
    assert!(named.contains("+0.125"), "{named}");

    // A name another experiment has: the run's work is kept, recorded under its own name.
    ws.edit("sh score.sh b 1 1", "sh score.sh b 2 2");
    let clash = ws.pipe(&["run", "--name", "first"]);
    assert_eq!(clash.status.code(), Some(2), "{}", text(&clash));
    assert!(
        text(&clash).contains("another experiment has that name"),
        "{}",
        text(&clash)
    );
    let rows = experiments(&ws);
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["current"], true);
    assert_ne!(rows[0]["name"], "first");
    assert_eq!(rows.iter().filter(|r| r["name"] == "first").count(), 1);

    let unknown = ws.pipe(&["params", "diff", "frist"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown).contains("unknown experiment `frist` (did you mean `first`?)"),
        "{}",
        text(&unknown)
    );
}

#[test]
fn diffs_default_to_the_lock_committed_in_git() {
    let ws = Ws::new(PIPELINE);
    let git = |args: &[&str]| {
        Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(ws.path(""))
            .output()
    };
    if git(&["init", "-q"]).is_err() {
        eprintln!("no git here: skipped");
        return;
    }
    ws.ok(&["run"]);
    let committed = git(&["add", "pipeline.lock", "pipeline.toml"])
        .and_then(|_| git(&["commit", "-qm", "first"]))
        .unwrap();
    assert!(committed.status.success(), "{}", text(&committed));
    ws.edit("sh score.sh b 1 1", "sh score.sh b 2 1");
    ws.ok(&["run"]);
    let diff = ws.stdout(&["metrics", "diff"]);
    let header = diff.lines().next().unwrap();
    assert!(
        header.contains("HEAD") && header.contains("workspace"),
        "{diff}"
    );
    assert!(diff.contains("b.score") && diff.contains("+1"), "{diff}");
    let params = ws.json(&["params", "diff", "--json"]);
    assert_eq!(params["old"], "HEAD");
    assert_eq!(params["changes"]["b.cmd"]["new"], "sh score.sh b 2 1");
    assert_eq!(params["changes"]["b.cmd"]["old"], "sh score.sh b 1 1");
}

#[test]
fn a_sweep_runs_the_grid_once_per_stage_and_apply_restores_a_combination() {
    let ws = Ws::new(PIPELINE);
    ws.ok(&["run"]);
    let file_before = ws.read("pipeline.toml");
    let runs_before = ws.runs().len();
    let out = ws.ok(&[
        "run",
        "--sweep",
        "--set",
        r#"a.cmd="sh score.sh a 0.1 1","sh score.sh a 0.2 1""#,
        "--set",
        r#"b.cmd='sh score.sh b 3 1', 'sh score.sh b 4 1'"#,
        "-j",
        "2",
    ]);
    assert!(out.contains("sweep 4/4"), "{out}");
    let ran = &ws.runs()[runs_before..];
    let count = |p: &str| ran.iter().filter(|l| l.starts_with(p)).count();
    assert_eq!(count("prep"), 0, "prep is shared: {ran:?}");
    assert_eq!(count("a "), 2, "each a value once: {ran:?}");
    assert_eq!(count("b "), 2, "each b value once: {ran:?}");
    assert_eq!(
        ws.read("pipeline.toml"),
        file_before,
        "the file is left alone"
    );
    up_to_date(&ws, 3);
    assert_eq!(
        ws.read("a/metrics.json").trim(),
        r#"{"score": 0.5, "loss": 2}"#
    );

    let rows = experiments(&ws);
    assert_eq!(
        rows.len(),
        5,
        "the original and four combinations: {rows:?}"
    );
    let current: Vec<&Value> = rows.iter().filter(|r| r["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["params"]["a.cmd"], "sh score.sh a 0.5 2");
    let mut grid: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| r["current"] == false)
        .map(|r| {
            (
                number(&r["metrics"]["a.score"], "a.score"),
                number(&r["metrics"]["b.score"], "b.score"),
            )
        })
        .collect();
    grid.sort_by(|x, y| x.partial_cmp(y).unwrap());
    assert_eq!(grid, [(0.1, 3.0), (0.1, 4.0), (0.2, 3.0), (0.2, 4.0)]);

    // Without git, diffs compare with the state the workspace was in before: the last
    // combination.
    let diff = ws.json(&["params", "diff", "--json"]);
    assert_eq!(
        diff["changes"]["a.cmd"]["old"], "sh score.sh a 0.2 1",
        "{diff}"
    );
    assert_eq!(
        diff["changes"]["a.cmd"]["new"], "sh score.sh a 0.5 2",
        "{diff}"
    );
    assert_eq!(
        diff["changes"]["b.cmd"]["old"], "sh score.sh b 4 1",
        "{diff}"
    );

    // Apply one combination: the file gets its params, comments kept, nothing recomputed.
    let target = rows
        .iter()
        .find(|r| r["metrics"]["a.score"] == 0.2 && r["metrics"]["b.score"] == 4.0)
        .unwrap();
    let name = target["name"].as_str().unwrap();
    let before = ws.runs().len();
    let applied = ws.ok(&["exp", "apply", name]);
    assert!(applied.contains("a: restored from cache"), "{applied}");
    assert!(applied.contains("b: restored from cache"), "{applied}");
    assert_eq!(ws.runs().len(), before, "nothing recomputed: {applied}");
    let file = ws.read("pipeline.toml");
    assert!(
        file.contains(r#"cmd = "sh score.sh a 0.2 1"  # a's score and loss"#),
        "{file}"
    );
    assert!(file.contains("sh score.sh b 4 1"), "{file}");
    assert!(
        file.starts_with("# Experiments test pipeline: keep this comment.\n"),
        "{file}"
    );
    assert_eq!(file.lines().count(), file_before.lines().count(), "{file}");
    up_to_date(&ws, 3);
    let rows = experiments(&ws);
    let current: Vec<&Value> = rows.iter().filter(|r| r["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["name"], name);

    // gc --all-experiments keeps every experiment's runs; a plain gc only the workspace's.
    let other = rows
        .iter()
        .find(|r| r["metrics"]["a.score"] == 0.1 && r["metrics"]["b.score"] == 3.0)
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    ws.ok(&["gc", "--all-experiments"]);
    let applied = ws.ok(&["exp", "apply", &other]);
    assert!(applied.contains("a: restored from cache"), "{applied}");
    assert_eq!(ws.runs().len(), before, "nothing recomputed: {applied}");
    ws.ok(&["gc"]);
    let gone = ws.ok(&["exp", "apply", name]);
    assert!(gone.contains("not in the run cache"), "{gone}");
    assert_eq!(ws.runs().len(), before, "apply never recomputes: {gone}");

    let unknown = ws.pipe(&["exp", "apply", "no-such-exp"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown).contains("unknown experiment `no-such-exp`"),
        "{}",
        text(&unknown)
    );
}

#[test]
fn bad_sweeps_exit_2_naming_the_value_before_anything_runs() {
    let ws = Ws::new(PIPELINE);
    for (set, says) in [
        ("a.nope=1,2", "nope"),
        ("zz.cmd=\"x\",\"y\"", "zz"),
        ("a.cmd=\"sh score.sh a 1 1\",3", "a string"),
        ("a.cmd=1,,2", "empty"),
    ] {
        let out = ws.pipe(&["run", "--sweep", "--set", set]);
        assert_eq!(out.status.code(), Some(2), "{set}: {}", text(&out));
        assert!(text(&out).contains(says), "{set}: {}", text(&out));
        assert!(ws.runs().is_empty(), "{set}: nothing runs");
    }
}

#[test]
fn a_failed_combination_does_not_stop_the_sweep() {
    let ws = Ws::new(PIPELINE);
    ws.ok(&["run"]);
    let out = ws.pipe(&[
        "run",
        "--sweep",
        "--set",
        r#"a.cmd="exit 3","sh score.sh a 0.3 1""#,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("1 of 2 combinations failed"),
        "{}",
        text(&out)
    );
    let rows = experiments(&ws);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(number(&rows[0]["metrics"]["a.score"], "a.score"), 0.3);
    assert_eq!(rows[1]["current"], true, "back on its own params: {rows:?}");
    up_to_date(&ws, 3);
}

/// download, a small baseline training and its evaluation (tests/study_cli.rs's pipeline,
/// cut down).
fn study() -> String {
    format!(
        r#"[pipeline]
device = "cpu"
seed = 7

[stages.download]
kind = "download"
sources = ["{fixtures}"]
expect = "fixture-subset"

[stages.train-baseline]
kind = "train"
needs = ["download"]
model = "baseline"
epochs = 1
batch_size = 32
train_limit = 256
# The learning rate the sweep varies.
optimizer = {{ name = "adadelta", lr = 1.0 }}
lr_decay = 0.7

[stages.evaluate]
kind = "evaluate"
needs = ["download", "train-baseline"]
test_limit = 200
"#,
        fixtures = fixture_dir().display()
    )
}

#[test]
fn a_learning_rate_sweep_on_the_study_lists_accuracies_and_applies() {
    let ws = Ws::new(&study());
    let mut log = ws.ok(&["run"]);
    log += &ws.ok(&[
        "run",
        "--sweep",
        "--set",
        "train-baseline.optimizer.lr=0.5,0.25",
    ]);
    assert_eq!(log.matches("download: running").count(), 1, "{log}");
    assert_eq!(log.matches("train-baseline: running").count(), 3, "{log}");
    assert!(log.contains("train-baseline: restored from cache"), "{log}");
    up_to_date(&ws, 3);
    assert!(ws.read("pipeline.toml").contains("lr = 1.0 }"));

    let rows = experiments(&ws);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let mut seen = Vec::new();
    for r in &rows {
        let lr = number(&r["params"]["train-baseline.optimizer.lr"], "lr");
        let acc = number(
            &r["metrics"]["evaluate.models.train-baseline.accuracy"],
            "accuracy",
        );
        let loss = number(&r["metrics"]["evaluate.models.train-baseline.loss"], "loss");
        let secs = number(&r["metrics"]["train-baseline.seconds"], "seconds");
        assert!(acc > 0.0 && acc <= 1.0 && loss > 0.0 && secs > 0.0, "{r}");
        assert_eq!(r["current"], lr == 1.0, "{r}");
        seen.push(lr);
    }
    seen.sort_by(f64::total_cmp);
    assert_eq!(seen, [0.25, 0.5, 1.0]);
    let table = ws.stdout(&["exp", "show"]);
    let header = table.lines().next().unwrap();
    for column in ["lr", "base.acc", "base.loss", "base.time"] {
        assert!(header.contains(column), "{column}: {table}");
    }
    assert!(table.contains("0.25") && table.contains('%'), "{table}");
    assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");

    // Every run remembered: three trainings, three evaluations, one download.
    let runs = ws.json(&["exp", "runs", "--json"]);
    let runs = runs.as_array().unwrap();
    let of = |stage: &str| runs.iter().filter(|r| r["stage"] == stage).count();
    assert_eq!(
        (of("download"), of("train-baseline"), of("evaluate")),
        (1, 3, 3),
        "{runs:?}"
    );
    for r in runs {
        assert!(
            r["finished"].as_str().is_some_and(|f| f.starts_with("20")),
            "{r}"
        );
        assert!(number(&r["seconds"], "seconds") >= 0.0, "{r}");
    }
    let listed = ws.stdout(&["exp", "runs"]);
    assert!(listed.contains("lr 0.25 1ep acc "), "{listed}");
    assert_eq!(listed.lines().count(), 1 + 7, "{listed}");

    // The page: one curve per experiment in each of the training stage's two charts.
    let page = ws.path("experiments.html");
    ws.ok(&["exp", "show", "--html", page.to_str().unwrap()]);
    let html = ws.read("experiments.html");
    assert!(html.contains("train-baseline: test accuracy"), "{html}");
    assert_eq!(html.matches("<polyline").count(), 2 * 3, "{html}");
    for r in &rows {
        assert!(html.contains(r["name"].as_str().unwrap()), "{html}");
    }
    assert!(!html.contains("NaN") && !html.contains("<script") && !html.contains("src="));
    // As a browser shows it: every curve parsed (a malformed `points` list is a console
    // error in Chromium), nothing else complained.
    if fmnist_stages::test_support::chromium("exp show --html in Chromium").is_some() {
        let view = fmnist_stages::test_support::open_in_chromium(&page).expect("chromium runs");
        assert!(
            view.console.is_empty(),
            "console: {:?}\n{}",
            view.console,
            view.stderr_tail
        );
        assert_eq!(view.dom.matches("<polyline").count(), 2 * 3, "{}", view.dom);
        for r in &rows {
            assert!(view.dom.contains(r["name"].as_str().unwrap()));
        }
    }

    let other = rows
        .iter()
        .find(|r| r["params"]["train-baseline.optimizer.lr"] == 0.25)
        .unwrap();
    let applied = ws.ok(&["exp", "apply", other["name"].as_str().unwrap()]);
    assert!(
        applied.contains("train-baseline: restored from cache"),
        "{applied}"
    );
    assert!(!applied.contains("running"), "{applied}");
    let file = ws.read("pipeline.toml");
    assert!(
        file.contains("optimizer = { name = \"adadelta\", lr = 0.25 }"),
        "{file}"
    );
    assert!(
        file.contains("# The learning rate the sweep varies."),
        "{file}"
    );
    let again = ws.ok(&["run"]);
    assert!(!again.contains("running"), "{again}");
    up_to_date(&ws, 3);
}

#[test]
fn a_longer_training_continues_from_a_shorter_one_to_the_same_bytes() {
    let continued = Ws::new(&study());
    let first = continued.ok(&["run"]);
    assert!(first.contains("epoch 1/1"), "{first}");
    continued.edit("epochs = 1", "epochs = 2");
    let log = continued.ok(&["run"]);
    assert!(
        log.contains("continuing from the end of an earlier 1-epoch run"),
        "{log}"
    );
    assert!(
        log.contains("epoch 2/2") && !log.contains("epoch 1/2"),
        "{log}"
    );

    let from_scratch = Ws::new(&study().replace("epochs = 1", "epochs = 2"));
    let log = from_scratch.ok(&["run"]);
    assert!(
        log.contains("epoch 1/2") && log.contains("epoch 2/2"),
        "{log}"
    );
    assert!(!log.contains("continuing"), "{log}");
    for file in [
        "artifacts/train-baseline/model.safetensors",
        "artifacts/train-baseline/history.json",
        "artifacts/train-baseline/config.json",
        "artifacts/evaluate/metrics.json",
    ] {
        let (a, b) = (continued.path(file), from_scratch.path(file));
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert!(
            a == b,
            "{file} differs between the continued and the scratch run"
        );
    }

    // A sweep's longer combination continues from its shorter one, and the lineage's end
    // states survive gc while the pipeline can use them.
    let log = from_scratch.ok(&["run", "--sweep", "--set", "train-baseline.epochs=3,4"]);
    assert!(
        log.contains("earlier 2-epoch run") && log.contains("earlier 3-epoch run"),
        "{log}"
    );
    for n in 1..=3 {
        assert!(!log.contains(&format!("epoch {n}/4")), "{log}");
    }
    from_scratch.ok(&["gc"]);
    from_scratch.edit("epochs = 2", "epochs = 5");
    let log = from_scratch.ok(&["run"]);
    assert!(log.contains("earlier 4-epoch run"), "{log}");
    assert!(
        log.contains("epoch 5/5") && !log.contains("epoch 4/5"),
        "{log}"
    );
}
