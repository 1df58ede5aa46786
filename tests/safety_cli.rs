//! Nothing escapes, nothing is trusted blindly, nothing panics: the real binary against symlinks
//! that lead out of the workspace, outputs that would overwrite the engine's own files, a
//! corrupted run-cache object, a closed or full standard output, and malformed inputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::text;

const BIN: &str = env!("CARGO_BIN_EXE_fmnist-pipe");

/// A workspace folder inside a parent that also holds a folder "outside" the workspace.
struct Sandbox {
    parent: tempfile::TempDir,
}

impl Sandbox {
    fn new(pipeline: &str) -> Sandbox {
        let parent = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(parent.path().join("ws")).expect("ws");
        std::fs::create_dir_all(parent.path().join("outside")).expect("outside");
        std::fs::write(parent.path().join("outside/keep.txt"), "precious").expect("canary");
        let sandbox = Sandbox { parent };
        sandbox.write("pipeline.toml", pipeline);
        sandbox
    }

    fn ws(&self) -> PathBuf {
        self.parent.path().join("ws")
    }

    fn outside(&self) -> PathBuf {
        self.parent.path().join("outside")
    }

    fn write(&self, rel: &str, text: &str) {
        std::fs::write(self.ws().join(rel), text).expect("write");
    }

    fn pipe(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(self.ws())
            .env_remove("RUST_LOG")
            .output()
            .expect("run fmnist-pipe")
    }

    fn canary_intact(&self) -> bool {
        std::fs::read_to_string(self.outside().join("keep.txt"))
            .ok()
            .as_deref()
            == Some("precious")
    }
}

fn assert_refused(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    assert!(text(out).contains(needle), "{}", text(out));
    assert!(!text(out).contains("panicked"), "{}", text(out));
}

#[test]
fn outputs_behind_a_symlink_out_of_the_workspace_are_never_touched() {
    let sb = Sandbox::new(
        r#"
[stages.leak]
cmd = "echo overwritten > lnk/keep.txt"
outs = ["lnk/keep.txt"]
"#,
    );
    std::os::unix::fs::symlink(sb.outside(), sb.ws().join("lnk")).expect("symlink");
    for args in [&["clean"][..], &["clean", "--stage", "leak"], &["run"]] {
        let out = sb.pipe(args);
        assert_refused(&out, "lnk/keep.txt");
        assert!(
            text(&out).contains("outside the workspace"),
            "{}",
            text(&out)
        );
        assert!(
            sb.canary_intact(),
            "{args:?} touched a file outside the workspace"
        );
    }
}

#[test]
fn gc_refuses_engine_folders_linked_out_of_the_workspace() {
    let sb = Sandbox::new("[stages.a]\ncmd = \"echo a > a.txt\"\nouts = [\"a.txt\"]\n");
    std::fs::create_dir_all(sb.ws().join("artifacts")).expect("artifacts");
    std::os::unix::fs::symlink(sb.outside(), sb.ws().join("artifacts/.cache")).expect("symlink");
    let out = sb.pipe(&["gc"]);
    assert_refused(&out, ".cache");
    assert!(sb.canary_intact());
}

#[test]
fn the_pipeline_file_and_the_lock_cannot_be_outputs() {
    for out in ["pipeline.toml", "pipeline.lock", "artifacts/.cache/x"] {
        let sb = Sandbox::new(&format!("[stages.a]\ncmd = \"true\"\nouts = [\"{out}\"]\n"));
        let res = sb.pipe(&["clean"]);
        assert_refused(&res, "reserved for the engine");
        assert!(sb.ws().join("pipeline.toml").is_file());
    }
}

/// The run cache restores a previous run's outputs only after checking their hash: a cached
/// object whose bytes changed is dropped with a warning and the stage recomputed.
#[test]
fn a_corrupted_run_cache_object_is_detected_and_the_stage_recomputed() {
    let sb = Sandbox::new("[stages.a]\ncmd = \"echo first > a.txt\"\nouts = [\"a.txt\"]\n");
    let run = |sb: &Sandbox| {
        let out = sb.pipe(&["run"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        out
    };
    run(&sb);
    let first = std::fs::read(sb.ws().join("a.txt")).expect("a.txt");
    sb.write(
        "pipeline.toml",
        "[stages.a]\ncmd = \"echo second > a.txt\"\nouts = [\"a.txt\"]\n",
    );
    run(&sb);
    // Same size, other bytes, in the cached copy of the first run's output.
    let object = objects(&sb.ws().join("artifacts/.cache/objects"))
        .into_iter()
        .find(|p| std::fs::read(p).ok().as_deref() == Some(first.as_slice()))
        .expect("the first output is in the run cache");
    std::fs::write(&object, "FIRST\n").expect("corrupt the object");
    sb.write(
        "pipeline.toml",
        "[stages.a]\ncmd = \"echo first > a.txt\"\nouts = [\"a.txt\"]\n",
    );
    let out = run(&sb);
    assert!(text(&out).contains("corrupt"), "{}", text(&out));
    assert!(text(&out).contains("a: running"), "{}", text(&out));
    assert_eq!(std::fs::read(sb.ws().join("a.txt")).expect("a.txt"), first);
    let status = sb.pipe(&["status"]);
    assert!(text(&status).contains("up to date"), "{}", text(&status));
}

fn objects(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for prefix in std::fs::read_dir(dir).expect("objects").flatten() {
        for item in std::fs::read_dir(prefix.path()).expect("prefix").flatten() {
            found.push(item.path());
        }
    }
    found
}

/// `fmnist-pipe dag | head` (the reader leaves early) ends quietly, as ripgrep does; a full
/// disk is an error (exit 1), not a panic.
#[test]
fn a_closed_or_full_standard_output_is_no_panic() {
    let mut pipeline = String::new();
    for i in 0..3000 {
        pipeline.push_str(&format!(
            "[stages.a-stage-with-a-long-descriptive-name-{i:05}]\ncmd = \"true\"\n"
        ));
    }
    let sb = Sandbox::new(&pipeline);
    let mut child = Command::new(BIN)
        .arg("dag")
        .current_dir(sb.ws())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dag");
    // The graph's text is larger than a pipe holds: writing it must meet the closed end.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("dag ends");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));

    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let out = Command::new(BIN)
            .arg("status")
            .current_dir(sb.ws())
            .stdout(full)
            .output()
            .expect("status");
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(!text(&out).contains("panicked"), "{}", text(&out));
        assert!(text(&out).contains("standard output"), "{}", text(&out));
    } else {
        println!("skipped the full-disk half: this system has no /dev/full");
    }
}

#[test]
fn malformed_inputs_are_config_errors() {
    let sb = Sandbox::new("[stages.a]\ncmd = \"true\"\n");
    std::fs::write(
        sb.ws().join("latin1.toml"),
        b"[stages.caf\xe9]\ncmd = \"true\"\n",
    )
    .expect("write");
    assert_refused(&sb.pipe(&["run", "--file", "latin1.toml"]), "not UTF-8");
    std::fs::create_dir_all(sb.ws().join("folder")).expect("folder");
    assert_refused(&sb.pipe(&["status", "--file", "folder"]), "is a folder");
    let long = "n".repeat(240);
    sb.write("long.toml", &format!("[stages.{long}]\ncmd = \"true\"\n"));
    assert_refused(&sb.pipe(&["run", "--file", "long.toml"]), "at most 128");
    sb.write("pipeline.lock", "format = 99\n[stages.a]\nfuture = true\n");
    let out = sb.pipe(&["run"]);
    assert_refused(&out, "newer fmnist-pipe");
    assert!(
        std::fs::read_to_string(sb.ws().join("pipeline.lock"))
            .expect("lock")
            .contains("format = 99"),
        "a newer lock must be left as it is"
    );
}

/// -j only bounds how many stages run at once: a huge value starts no idle threads.
#[test]
fn a_huge_jobs_value_costs_nothing() {
    let sb = Sandbox::new("[stages.a]\ncmd = \"echo a > a.txt\"\nouts = [\"a.txt\"]\n");
    let started = Instant::now();
    let out = sb.pipe(&["run", "-j", "1000000"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// The lock is rewritten once at the end of a run; what finished before a crash is in its
/// journal, which the next command reads and the next write folds in.
#[test]
fn the_lock_journal_is_folded_into_the_lock() {
    let sb = Sandbox::new(
        "[stages.a]\ncmd = \"echo a > a.txt\"\nouts = [\"a.txt\"]\n\n[stages.b]\ncmd = \"cat a.txt > b.txt\"\nneeds = [\"a\"]\nouts = [\"b.txt\"]\n",
    );
    let out = sb.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!sb.ws().join("pipeline.lock.journal").exists());
    let lock = std::fs::read_to_string(sb.ws().join("pipeline.lock")).expect("lock");
    // A run killed after both stages but before its final write leaves only the journal.
    let entries: toml::Table = toml::from_str(&lock).expect("lock parses");
    let mut journal = String::new();
    for (name, entry) in entries["stages"].as_table().expect("stages") {
        let entry = serde_json::to_value(entry).expect("entry as JSON");
        journal.push_str(&serde_json::json!({ "stage": name, "entry": entry }).to_string());
        journal.push('\n');
    }
    journal.push_str("{\"stage\": \"torn"); // the line being written when it died
    std::fs::write(sb.ws().join("pipeline.lock.journal"), journal).expect("journal");
    std::fs::write(sb.ws().join("pipeline.lock"), "format = 1\n").expect("old lock");
    let status = sb.pipe(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    assert_eq!(
        text(&status).matches("up to date").count(),
        2,
        "{}",
        text(&status)
    );
    let out = sb.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("running"), "{}", text(&out));
}

#[test]
fn gc_removes_checkpoints_no_run_would_resume() {
    let sb = Sandbox::new("[stages.a]\ncmd = \"echo a > a.txt\"\nouts = [\"a.txt\"]\n");
    let stale = sb.ws().join("artifacts/.scratch/train-0123456789abcdef");
    std::fs::create_dir_all(&stale).expect("scratch");
    std::fs::write(stale.join("checkpoint.json"), "{}").expect("checkpoint");
    let out = sb.pipe(&["gc"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("1 abandoned checkpoint"),
        "{}",
        text(&out)
    );
    assert!(!stale.exists());
}

/// A dependency that is a symlink loop is an error that names it.
#[test]
fn a_symlink_loop_is_named() {
    let sb = Sandbox::new(
        "[stages.a]\ncmd = \"cat loop > a.txt\"\ndeps = [\"loop\"]\nouts = [\"a.txt\"]\n",
    );
    std::os::unix::fs::symlink("loop", sb.ws().join("loop")).expect("symlink");
    let out = sb.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("loop: "), "{}", text(&out));
    assert!(!text(&out).contains("panicked"), "{}", text(&out));
}
