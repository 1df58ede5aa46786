//! Stages as Slurm jobs, against a real one-node Slurm (`scripts/slurm-local.sh up`): the
//! fixture study gives the same bytes through Slurm as locally, independent stages queue at
//! once, a cancelled job fails its stage and keeps the previous outputs, a rerun resumes the
//! training from its checkpoint, Ctrl-C cancels the jobs, a stage marked local stays local,
//! and a missing or refusing sbatch is a config error. Without a Slurm the tests that need
//! one are skipped with a printed reason, or fail when CI is set.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{fixture_dir, text};

/// One test at a time on the cluster: the tests look jobs up by name and count what is
/// queued, and the one node has two CPUs.
static CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The cluster to this test alone, or None (the test skips) when there is no Slurm.
fn on_cluster(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    slurm_ready(test).then(|| {
        CLUSTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
}

/// True when a Slurm controller answers; otherwise says why the test skips (or panics in
/// CI, where a skipped test would pass without testing anything).
fn slurm_ready(test: &str) -> bool {
    let answered = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string());
    match answered {
        Some(states)
            if states.lines().any(|s| {
                s.starts_with("idle") || s.starts_with("mix") || s.starts_with("alloc")
            }) =>
        {
            true
        }
        other => {
            let why = format!(
                "{test}: no usable Slurm here (sinfo said {other:?}); start one with `scripts/slurm-local.sh up`"
            );
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED {why}");
            false
        }
    }
}

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A workspace for jobs: under the repo's target/ (a file system this host's Slurm node
    /// shares, unlike a private /tmp), removed when dropped.
    fn new(pipeline: &str) -> Workspace {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/slurm-tests");
        std::fs::create_dir_all(&base).expect("create target/slurm-tests");
        let dir = tempfile::tempdir_in(base).expect("temp workspace");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
        Workspace { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmnist-pipe"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            .env("FMNIST_SLURM_POLL_MAX", "0.5");
        cmd
    }

    fn pipe(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("fmnist-pipe runs")
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fmnist-pipe starts")
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn lock(&self) -> toml::Table {
        toml::from_str(&self.read("pipeline.lock")).expect("lock parses")
    }
}

/// The squeue states of this workspace's jobs by name, e.g. {"fmnist-a": "RUNNING"}.
fn queued(names: &[&str]) -> Vec<(String, String)> {
    let out = Command::new("squeue")
        .args(["-h", "-o", "%j|%T|%i", "-n", &names.join(",")])
        .output()
        .expect("squeue runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('|');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Waits (bounded) until `f` holds.
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(child: Child) -> Output {
    child.wait_with_output().expect("fmnist-pipe ends")
}

/// Names unique to one test, so tests running side by side never see each other's jobs.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id())
}

/// The fixture study, two epochs of the baseline so a cancelled training has a checkpoint.
fn study(executor: &str) -> String {
    format!(
        r#"
[pipeline]
device = "cpu"
seed = 11
executor = "{executor}"

[stages.download]
kind = "download"
sources = ["{fixtures}"]
expect = "fixture-subset"

[stages.train-baseline]
kind = "train"
needs = ["download"]
model = "baseline"
epochs = 2
batch_size = 32
train_limit = 256
optimizer = {{ name = "adadelta", lr = 1.0 }}
resources = {{ cpus = 1, mem = "2G", time = "00:10:00" }}

[stages.evaluate]
kind = "evaluate"
needs = ["download", "train-baseline"]
test_limit = 200
"#,
        fixtures = fixture_dir().display()
    )
}

/// Every file under artifacts/STAGE/ but its timings, with its bytes.
fn stage_files(ws: &Workspace, stage: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let dir = ws.path(&format!("artifacts/{stage}"));
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read stage folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .to_string();
            // Wall-clock figures differ between any two runs (and are kept out of the hash).
            if rel == "timings.json" {
                continue;
            }
            files.push((rel, std::fs::read(&path).expect("read output")));
        }
    }
    files.sort();
    files
}

#[test]
fn the_study_through_slurm_gives_the_local_bytes_and_records_the_jobs() {
    let Some(_cluster) =
        on_cluster("the_study_through_slurm_gives_the_local_bytes_and_records_the_jobs")
    else {
        return;
    };
    let local = Workspace::new(&study("local"));
    let out = local.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let slurm = Workspace::new(&study("slurm"));
    let out = slurm.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("Slurm job"), "{shown}");
    for stage in ["download", "train-baseline", "evaluate"] {
        let (a, b) = (stage_files(&local, stage), stage_files(&slurm, stage));
        assert!(!a.is_empty(), "{stage}: no outputs");
        let names: Vec<&String> = a.iter().map(|(n, _)| n).collect();
        assert!(
            a == b,
            "{stage}: outputs differ between local and Slurm ({names:?})"
        );
        let placed = slurm.lock()["stages"][stage]
            .get("placed")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        assert!(
            placed
                .as_deref()
                .is_some_and(|p| p.starts_with("slurm job ")),
            "{stage}: lock says {placed:?}"
        );
    }
    let out = slurm.pipe(&["status"]);
    assert!(
        text(&out).lines().all(|l| !l.contains("stale")),
        "{}",
        text(&out)
    );
}

#[test]
fn independent_stages_are_in_the_queue_at_once() {
    let Some(_cluster) = on_cluster("independent_stages_are_in_the_queue_at_once") else {
        return;
    };
    let (a, b) = (unique("qa"), unique("qb"));
    let ws = Workspace::new(&format!(
        r#"
[pipeline]
executor = "slurm"

[stages.{a}]
cmd = "sleep 4; echo a > a.txt"
outs = ["a.txt"]
resources = {{ cpus = 1, mem = "100M" }}

[stages.{b}]
cmd = "sleep 4; echo b > b.txt"
outs = ["b.txt"]
resources = {{ cpus = 1, mem = "100M" }}
"#
    ));
    let child = ws.spawn(&["run", "-j", "2"]);
    let names = [format!("fmnist-{a}"), format!("fmnist-{b}")];
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    wait_for("both jobs in the queue", Duration::from_secs(60), || {
        queued(&names).len() == 2
    });
    let out = finish(child);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(ws.read("a.txt"), "a\n");
    assert_eq!(ws.read("b.txt"), "b\n");
}

#[test]
fn a_cancelled_job_fails_its_stage_keeps_outputs_and_the_rerun_resumes() {
    let Some(_cluster) =
        on_cluster("a_cancelled_job_fails_its_stage_keeps_outputs_and_the_rerun_resumes")
    else {
        return;
    };
    let ws = Workspace::new(&study("slurm"));
    let out = ws.pipe(&["run", "--stage", "download"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A first training to keep, then a longer one to cancel after its first epoch.
    let out = ws.pipe(&[
        "run",
        "--stage",
        "train-baseline",
        "--set",
        "train-baseline.epochs=1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let model_before = stage_files(&ws, "train-baseline");
    let lock_before = ws.lock()["stages"]["train-baseline"].clone();

    let longer = [
        "run",
        "--stage",
        "train-baseline",
        "--set",
        "train-baseline.epochs=40",
    ];
    let child = ws.spawn(&longer);
    let scratch = ws.path("artifacts/.scratch");
    wait_for(
        "a checkpoint of the first epoch",
        Duration::from_secs(120),
        || {
            std::fs::read_dir(&scratch)
                .map(|dirs| {
                    dirs.flatten()
                        .any(|d| d.path().join("checkpoint.json").exists())
                })
                .unwrap_or(false)
        },
    );
    let jobs = queued(&["fmnist-train-baseline"]);
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let id_out = Command::new("squeue")
        .args(["-h", "-o", "%i", "-n", "fmnist-train-baseline"])
        .output()
        .expect("squeue");
    let id = String::from_utf8_lossy(&id_out.stdout).trim().to_string();
    let cancelled = Command::new("scancel").arg(&id).status().expect("scancel");
    assert!(cancelled.success());
    let out = finish(child);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains(&format!("Slurm job {id} was cancelled")),
        "{shown}"
    );
    assert_eq!(
        stage_files(&ws, "train-baseline"),
        model_before,
        "outputs changed"
    );
    assert_eq!(
        ws.lock()["stages"]["train-baseline"],
        lock_before,
        "lock changed"
    );

    // The rerun picks the checkpoint up (fewer epochs, so it ends soon).
    let resumed = ws.pipe(&[
        "run",
        "--stage",
        "train-baseline",
        "--set",
        "train-baseline.epochs=40",
        "--dry-run",
    ]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    let child = ws.spawn(&longer);
    let log = ws.path("artifacts/.logs/train-baseline.log");
    wait_for("the resumed job's log", Duration::from_secs(120), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("resuming after epoch"))
    });
    // Enough shown: stop it (Ctrl-C on the submit host cancels the job and exits 130).
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    let out = finish(child);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    wait_for(
        "the job to leave the queue",
        Duration::from_secs(30),
        || queued(&["fmnist-train-baseline"]).is_empty(),
    );
    assert_eq!(stage_files(&ws, "train-baseline"), model_before);
}

#[test]
fn a_stage_marked_local_runs_here_inside_a_slurm_pipeline() {
    let Some(_cluster) = on_cluster("a_stage_marked_local_runs_here_inside_a_slurm_pipeline")
    else {
        return;
    };
    let (here, there) = (unique("here"), unique("there"));
    let ws = Workspace::new(&format!(
        r#"
[pipeline]
executor = "slurm"

[stages.{here}]
executor = "local"
cmd = "echo job=${{SLURM_JOB_ID:-none}} > here.txt"
outs = ["here.txt"]

[stages.{there}]
cmd = "echo job=${{SLURM_JOB_ID:-none}} > there.txt"
outs = ["there.txt"]
needs = ["{here}"]
"#
    ));
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(ws.read("here.txt"), "job=none\n");
    let there_text = ws.read("there.txt");
    let id = there_text.trim().trim_start_matches("job=");
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "{there_text}"
    );
    let lock = ws.lock();
    assert!(lock["stages"][&here].get("placed").is_none());
    assert_eq!(
        lock["stages"][&there]["placed"].as_str(),
        Some(format!("slurm job {id}").as_str())
    );
    // `--executor local` sends the pipeline's stages here for one run.
    let out = ws.pipe(&["run", "--force", "--executor", "local"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(ws.read("there.txt"), "job=none\n");
}

#[test]
fn a_run_after_a_killed_submit_host_cancels_its_jobs_first() {
    let Some(_cluster) = on_cluster("a_run_after_a_killed_submit_host_cancels_its_jobs_first")
    else {
        return;
    };
    let stage = unique("orphan");
    let pipeline = |cmd: &str| {
        format!(
            "[pipeline]\nexecutor = \"slurm\"\n\n[stages.{stage}]\ncmd = \"{cmd}\"\nouts = [\"out.txt\"]\n"
        )
    };
    let ws = Workspace::new(&pipeline("echo v1 > out.txt"));
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // A slow version whose job writes late, then the submit host dies (kill -9).
    std::fs::write(
        ws.path("pipeline.toml"),
        pipeline("sleep 8; echo late > out.txt"),
    )
    .unwrap();
    let mut child = ws.spawn(&["run"]);
    let name = format!("fmnist-{stage}");
    wait_for("the job running", Duration::from_secs(60), || {
        queued(&[&name]).iter().any(|(_, s)| s == "RUNNING")
    });
    child.kill().expect("kill -9 the engine");
    let _ = child.wait();
    assert!(!queued(&[&name]).is_empty(), "the job outlived its engine");
    // The next run cancels it before anything else and puts v1 back; the late write never
    // comes.
    std::fs::write(ws.path("pipeline.toml"), pipeline("echo v1 > out.txt")).unwrap();
    let out = ws.pipe(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = ws.pipe(&["run"]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(shown.contains("cancelled Slurm job"), "{shown}");
    assert!(queued(&[&name]).is_empty(), "{shown}");
    std::thread::sleep(Duration::from_secs(9));
    assert_eq!(ws.read("out.txt"), "v1\n");
}

#[test]
fn a_refused_submission_is_a_config_error() {
    let Some(_cluster) = on_cluster("a_refused_submission_is_a_config_error") else {
        return;
    };
    let ws = Workspace::new(
        r#"
[pipeline]
executor = "slurm"

[stages.a]
cmd = "echo a > a.txt"
outs = ["a.txt"]
resources = { partition = "no-such-partition" }
"#,
    );
    let out = ws.pipe(&["run"]);
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(shown.contains("sbatch refused the job"), "{shown}");
    assert!(!ws.path("a.txt").exists());
}

#[test]
fn no_sbatch_on_path_is_a_config_error_before_anything_runs() {
    let ws = Workspace::new(
        r#"
[pipeline]
executor = "slurm"

[stages.a]
cmd = "echo a > a.txt"
outs = ["a.txt"]
"#,
    );
    let empty = tempfile::tempdir().expect("empty dir");
    let out = ws
        .command(&["run"])
        .env("PATH", empty.path())
        .output()
        .expect("fmnist-pipe runs");
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(2), "{shown}");
    assert!(shown.contains("`sbatch` is not on PATH"), "{shown}");
    assert!(shown.contains("--executor local"), "{shown}");
    assert!(!ws.path("a.txt").exists());
    // Bad placement values are caught when the file is read.
    std::fs::write(
        ws.path("pipeline.toml"),
        "[pipeline]\nexecutor = \"pbs\"\n[stages.a]\ncmd = \"true\"\n",
    )
    .unwrap();
    let out = ws.pipe(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("pipeline.toml:2"), "{}", text(&out));
}
