//! End-to-end tests of the engine through the real binary, with command stages that log each
//! execution to runs.log in a throwaway workspace.
//! (Over 500 lines: one scenario per test, each with its own pipeline text inline.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

mod common;
use common::text;

const BIN: &str = env!("CARGO_BIN_EXE_fmnist-pipe");

/// a -> (b, c) -> d. b reads a.txt as a dep, c and d use `needs`.
const DIAMOND: &str = r#"
[stages.a]
cmd = "echo a >> runs.log; echo A > a.txt"
outs = ["a.txt"]

[stages.b]
cmd = "echo b >> runs.log; cat a.txt > b.txt; echo B >> b.txt"
deps = ["a.txt"]
outs = ["b.txt"]

[stages.c]
cmd = "echo c >> runs.log; mkdir -p c && cat a.txt > c/out.txt"
needs = ["a"]
outs = ["c"]

[stages.d]
cmd = "echo d >> runs.log; cat b.txt c/out.txt > d.txt"
needs = ["b", "c"]
outs = ["d.txt"]
"#;

struct Workspace {
    dir: TempDir,
}

impl Workspace {
    fn new(pipeline: &str) -> Workspace {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
        Workspace { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn pipe(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run fmnist-pipe")
    }

    /// Runs and returns the stages executed by this call, in order.
    fn run_ok(&self, args: &[&str]) -> Vec<String> {
        let before = self.runs().len();
        let out = self.pipe(&[&["run"], args].concat());
        assert_eq!(out.status.code(), Some(0), "run failed:\n{}", text(&out));
        self.runs()[before..].to_vec()
    }

    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("runs.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn edit(&self, from: &str, to: &str) {
        let file = self.path("pipeline.toml");
        let text = std::fs::read_to_string(&file).expect("read pipeline");
        assert!(text.contains(from), "pipeline has no `{from}`");
        std::fs::write(&file, text.replacen(from, to, 1)).expect("write pipeline");
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn diamond_runs_each_stage_once_then_nothing() {
    let ws = Workspace::new(DIAMOND);
    let ran = ws.run_ok(&[]);
    assert_eq!(sorted(ran.clone()), ["a", "b", "c", "d"]);
    assert_eq!(ran.first().map(String::as_str), Some("a"));
    assert_eq!(ran.last().map(String::as_str), Some("d"));
    assert_eq!(ws.read("d.txt"), "A\nB\nA\n");
    assert!(ws.path("pipeline.lock").is_file());

    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(ws.runs().len(), 4, "second run executed something");
    assert_eq!(
        text(&out).matches("up to date").count(),
        4,
        "{}",
        text(&out)
    );
}

#[test]
fn changed_command_reruns_it_and_downstream_only() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    ws.edit("cat a.txt > c/out.txt", "cat a.txt a.txt > c/out.txt");
    assert_eq!(ws.run_ok(&[]), ["c", "d"]);
    assert_eq!(ws.read("d.txt"), "A\nB\nA\nA\n");
}

#[test]
fn identical_output_stops_propagation() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    // A different command writing the same bytes: c reruns, d's inputs did not change.
    ws.edit("cat a.txt > c/out.txt", "printf 'A\\n' > c/out.txt");
    assert_eq!(ws.run_ok(&[]), ["c"]);
}

#[test]
fn stage_selection_runs_upstream_not_downstream() {
    let ws = Workspace::new(DIAMOND);
    assert_eq!(ws.run_ok(&["--stage", "b"]), ["a", "b"]);
    assert!(!ws.path("d.txt").exists());
    assert_eq!(sorted(ws.run_ok(&[])), ["c", "d"]);
}

#[test]
fn deleted_output_reruns_only_its_stage() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    std::fs::remove_file(ws.path("d.txt")).expect("remove d.txt");
    let status = ws.pipe(&["status"]);
    assert!(
        text(&status).contains("output missing: d.txt"),
        "{}",
        text(&status)
    );
    // The cache holds d's outputs for this very fingerprint, so it comes back without work.
    let out = ws.pipe(&["run"]);
    assert!(
        text(&out).contains("d: restored from cache"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.runs().len(), 4);
    assert_eq!(ws.read("d.txt"), "A\nB\nA\n");

    // Without the cache the stage itself reruns, and only it.
    std::fs::remove_dir_all(ws.path("artifacts/.cache")).expect("remove cache");
    std::fs::write(ws.path("d.txt"), "tampered").expect("tamper");
    assert_eq!(ws.run_ok(&[]), ["d"]);
    assert_eq!(ws.read("d.txt"), "A\nB\nA\n");
}

#[test]
fn failing_stage_keeps_previous_outputs_and_lock_entry() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    let lock_before = ws.read("pipeline.lock");
    ws.edit(
        "cat b.txt c/out.txt > d.txt",
        "echo half > d.txt; echo boom >&2; exit 3",
    );
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("boom"), "log tail not shown:\n{shown}");
    assert!(shown.contains("exit status 3"), "{shown}");
    assert_eq!(
        ws.read("d.txt"),
        "A\nB\nA\n",
        "previous output not restored"
    );
    assert_eq!(
        ws.read("pipeline.lock"),
        lock_before,
        "lock changed after a failure"
    );
    assert!(ws.read("artifacts/.logs/d.log").contains("boom"));
}

#[test]
fn failure_stops_downstream() {
    let ws = Workspace::new(DIAMOND);
    ws.edit(
        "echo a >> runs.log; echo A > a.txt",
        "echo a >> runs.log; exit 1",
    );
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(ws.runs(), ["a"]);
    assert!(text(&out).contains("stage failed: a"), "{}", text(&out));
}

#[test]
fn missing_declared_output_is_a_failure() {
    let ws = Workspace::new("[stages.x]\ncmd = 'true'\nouts = ['never.txt']\n");
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("did not write its declared output `never.txt`"),
        "{}",
        text(&out)
    );
}

#[test]
fn reverting_a_change_restores_from_cache() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    ws.edit("echo A > a.txt", "echo Z > a.txt");
    assert_eq!(sorted(ws.run_ok(&[])), ["a", "b", "c", "d"]);
    assert_eq!(ws.read("d.txt"), "Z\nB\nZ\n");
    ws.edit("echo Z > a.txt", "echo A > a.txt");
    let before = ws.runs().len();
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        ws.runs().len(),
        before,
        "a reverted stage was executed:\n{}",
        text(&out)
    );
    assert_eq!(
        text(&out).matches("restored from cache").count(),
        4,
        "{}",
        text(&out)
    );
    assert_eq!(ws.read("d.txt"), "A\nB\nA\n");
    assert_eq!(ws.read("c/out.txt"), "A\n");
    // And the restored state is recorded: nothing left to do.
    assert!(ws.run_ok(&[]).is_empty());
}

#[test]
fn force_reruns_named_stage_only() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    assert_eq!(ws.run_ok(&["--stage", "c", "--force"]), ["c"]);
}

#[test]
fn dry_run_changes_nothing() {
    let ws = Workspace::new(DIAMOND);
    let out = ws.pipe(&["run", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(ws.runs().is_empty());
    assert!(!ws.path("pipeline.lock").exists());
    assert_eq!(text(&out).matches("would run").count(), 4, "{}", text(&out));
}

#[test]
fn set_override_changes_fingerprint() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    let ran = ws.run_ok(&["--set", r#"d.cmd="echo d >> runs.log; echo other > d.txt""#]);
    assert_eq!(ran, ["d"]);
    assert_eq!(ws.read("d.txt"), "other\n");
}

#[test]
fn status_explains_staleness() {
    let ws = Workspace::new(DIAMOND);
    let out = ws.pipe(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out).matches("never run").count(), 8, "{}", text(&out));
    ws.run_ok(&[]);
    ws.edit("echo B >> b.txt", "echo BB >> b.txt");
    std::fs::write(ws.path("a.txt"), "edited\n").expect("edit a.txt");
    let shown = text(&ws.pipe(&["status"]));
    assert!(shown.contains("output modified: a.txt"), "{shown}");
    assert!(
        shown.contains(
            r#"params.cmd: "echo b >> runs.log; cat a.txt > b.txt; echo B >> b.txt" -> "#
        ),
        "{shown}"
    );
    assert!(shown.contains("dep modified: a.txt"), "{shown}");
    // a's outputs were edited by hand: the run cache has its run, so the plan restores it.
    assert!(shown.contains("a  stale, in the run cache"), "{shown}");
    assert!(shown.contains("upstream `b` is stale"), "{shown}");

    let json = ws.pipe(&["status", "--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    let states: Vec<&str> = report
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["state"].as_str())
        .collect();
    assert_eq!(states, ["stale", "stale", "up to date", "stale"]);
    let first_reason = &report[1]["reasons"][0];
    assert_eq!(first_reason["reason"], "param_changed", "{first_reason}");
    assert_eq!(first_reason["param"], "params.cmd", "{first_reason}");
    assert_eq!(report[0]["decision"], "restore", "{}", report[0]);
}

#[test]
fn damaged_lock_warns_and_reruns() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    std::fs::write(ws.path("pipeline.lock"), "format = 1\n[stages.a\ngarbage")
        .expect("damage lock");
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("warning: "), "{}", text(&out));
    assert!(text(&out).contains("damaged"), "{}", text(&out));
    // Stale, but every fingerprint is in the run cache: restored, not executed.
    assert_eq!(ws.runs().len(), 4);
    assert!(ws.run_ok(&[]).is_empty());
}

#[test]
fn second_run_is_refused_while_one_holds_the_workspace() {
    use fs4::fs_std::FileExt;
    let ws = Workspace::new(DIAMOND);
    std::fs::create_dir_all(ws.path("artifacts")).expect("artifacts");
    let held = std::fs::File::create(ws.path("artifacts/.run.lock")).expect("lock file");
    assert!(held.try_lock_exclusive().expect("lock"));
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("a run is already in progress"),
        "{}",
        text(&out)
    );
    assert!(ws.runs().is_empty());
}

#[test]
fn dag_formats() {
    let ws = Workspace::new(DIAMOND);
    let textual = text(&ws.pipe(&["dag"]));
    assert!(textual.contains("d  [cmd]  <- b, c"), "{textual}");
    let dot = text(&ws.pipe(&["dag", "--format", "dot"]));
    assert!(
        dot.starts_with("digraph pipeline {") && dot.contains("\"a\" -> \"c\";"),
        "{dot}"
    );
    let mermaid = text(&ws.pipe(&["dag", "--format", "mermaid"]));
    assert!(
        mermaid.starts_with("flowchart TD") && mermaid.contains("s0 --> s1"),
        "{mermaid}"
    );
}

#[test]
fn clean_removes_outputs_and_run_restores_them() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    let out = ws.pipe(&["clean", "--stage", "c"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!ws.path("c").exists());
    let out = ws.pipe(&["run"]);
    assert!(
        text(&out).contains("c: restored from cache"),
        "{}",
        text(&out)
    );
    assert_eq!(ws.runs().len(), 4);
    let out = ws.pipe(&["gc"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

/// Each case: pipeline text, extra arguments, a fragment the single error message must hold.
#[test]
fn bad_input_exits_2_with_one_clear_message() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "[stages.a]\ncmd = 'true'\nout = ['x']\n",
            &["run"],
            &[
                "pipeline.toml:3",
                "unknown key `out`",
                "did you mean `outs`",
            ],
        ),
        (
            "[stages.a]\ncmd = 'true'\nneeds = ['nope']\n",
            &["run"],
            &["pipeline.toml:3", "needs `nope`, which is no stage"],
        ),
        (
            "[stages.a]\ncmd = 'true'\nneeds = ['b']\n[stages.b]\ncmd = 'true'\nneeds = ['a']\n",
            &["run"],
            &["dependency cycle: a -> b -> a"],
        ),
        (
            "[stages.a]\ncmd = 'true'\nkind = 'train'\n",
            &["run"],
            &["pipeline.toml:1", "both `kind` and `cmd`"],
        ),
        (
            "[stages.a]\nouts = ['x']\n",
            &["run"],
            &["pipeline.toml:1", "neither `kind` nor `cmd`"],
        ),
        (
            "[stages.a]\nkind = 'trian'\n",
            &["run"],
            &["pipeline.toml:2", "unknown kind `trian`", "known kinds"],
        ),
        (
            "[stages.a]\ncmd = 'true'\nouts = 'x'\n",
            &["run"],
            &["pipeline.toml:3", "`outs`", "must be an array"],
        ),
        (
            "[pipeline]\nseed = 'x'\n[stages.a]\ncmd = 'true'\n",
            &["run"],
            &["pipeline.toml:2", "`seed`", "non-negative integer"],
        ),
        (
            "[pipeline]\nsede = 1\n[stages.a]\ncmd = 'true'\n",
            &["run"],
            &["unknown key `sede`", "did you mean `seed`"],
        ),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--stage", "b"],
            &["--stage: no stage named `b`"],
        ),
        (
            "[stages.alpha]\ncmd = 'true'\n",
            &["run", "--set", "alpah.cmd=x"],
            &["no stage named `alpah`", "did you mean `alpha`"],
        ),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--set", "a.cmd"],
            &["malformed --set `a.cmd`"],
        ),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--set", "cmd=x"],
            &["malformed --set `cmd=x`"],
        ),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--set", "a.cmd=1"],
            &["`cmd`", "must be a string", "--set `a.cmd=1`"],
        ),
        ("[stages.a\ncmd = 'true'\n", &["run"], &["pipeline.toml:1"]),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--file", "missing.toml"],
            &["missing.toml not found"],
        ),
        (
            "[stages.a]\ncmd = 'true'\n",
            &["run", "--bogus"],
            &["--bogus"],
        ),
    ];
    for (pipeline, args, fragments) in cases {
        let ws = Workspace::new(pipeline);
        let out = ws.pipe(args);
        let shown = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} on {pipeline:?}:\n{shown}"
        );
        for fragment in *fragments {
            assert!(
                shown.contains(fragment),
                "{args:?} on {pipeline:?}: no `{fragment}` in:\n{shown}"
            );
        }
        assert!(!shown.contains("panicked"), "{shown}");
        assert!(ws.runs().is_empty());
        assert!(!Path::new(&ws.path("artifacts")).exists() || args.contains(&"--bogus"));
    }
}

#[test]
fn interrupt_exits_130_and_keeps_previous_outputs() {
    let ws = Workspace::new("[stages.slow]\ncmd = 'echo slow >> runs.log; echo new > out.txt; sleep 5'\nouts = ['out.txt']\n");
    std::fs::write(ws.path("out.txt"), "old\n").expect("seed output");
    let child = Command::new(BIN)
        .arg("run")
        .current_dir(ws.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start run");
    // Wait until the command is under way, then interrupt the engine.
    let started = std::time::Instant::now();
    while ws.runs().is_empty() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert_eq!(ws.read("out.txt"), "old\n");
    assert!(
        !ws.path("pipeline.lock").exists() || !ws.read("pipeline.lock").contains("[stages.slow]")
    );
}

/// b and c each wait for the other's marker: they only both succeed when run at once.
#[test]
fn independent_stages_run_in_parallel() {
    let wait_for = |me: &str, other: &str| {
        format!(
            "touch {me}.started; i=0; while [ ! -e {other}.started ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; test -e {other}.started && echo {me} > {me}.txt"
        )
    };
    let pipeline = format!(
        "[stages.b]\ncmd = '{}'\nouts = ['b.txt']\n[stages.c]\ncmd = '{}'\nouts = ['c.txt']\n",
        wait_for("b", "c"),
        wait_for("c", "b")
    );
    let ws = Workspace::new(&pipeline);
    let out = ws.pipe(&["run", "-j", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(ws.read("b.txt"), "b\n");
    assert_eq!(ws.read("c.txt"), "c\n");
}

#[test]
fn status_names_changed_upstream_outputs() {
    let ws = Workspace::new(DIAMOND);
    ws.run_ok(&[]);
    ws.edit("cat a.txt > c/out.txt", "echo other > c/out.txt");
    assert_eq!(ws.run_ok(&["--stage", "c"]), ["c"]);
    let shown = text(&ws.pipe(&["status"]));
    assert!(shown.contains("input changed: outputs of `c`"), "{shown}");
    assert_eq!(shown.matches("up to date").count(), 3, "{shown}");
}
