//! `run`'s unit tests: built-in stages through the real scheduler, with a test-only kind
//! (the real kinds live in fmnist-stages and are wired in by the registry).

use super::*;
use crate::registry::{builtin, Registry};
use crate::runner::{LocalRunner, Runners};
use fmnist_stages::{Cancelled, Metrics, StageContext};

const VERSION: u32 = 1;

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Params {
    text: String,
    #[serde(default)]
    fail: bool,
    #[serde(default)]
    cancel: bool,
    /// Where each execution is logged; unhashed, like download's `sources`.
    log: String,
}

fn run_echo(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&params.log)?;
    writeln!(log, "{}", ctx.name)?;
    anyhow::ensure!(ctx.scratch_dir.is_dir(), "no scratch dir");
    std::fs::write(ctx.scratch_dir.join("checkpoint"), "state")?;
    let mut body = params.text.clone();
    for input in ctx.inputs {
        let upstream = std::fs::read_to_string(input.dir.join("out.txt"))?;
        body.push_str(&format!(
            "|{}:{}:{}:{}",
            input.stage,
            input.kind,
            &input.fingerprint[..8],
            upstream
        ));
    }
    std::fs::write(ctx.out_dir.join("out.txt"), &body)?;
    // Differs on every run, like a training's timings.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    std::fs::write(ctx.out_dir.join("timings.txt"), now.as_nanos().to_string())?;
    if params.cancel {
        return Err(Cancelled.into());
    }
    anyhow::ensure!(!params.fail, "asked to fail");
    Ok(serde_json::json!({ "chars": body.len(), "seed": ctx.seed, "device": ctx.device }))
}

fn registry() -> Registry {
    let mut echo = builtin::<Params, std::convert::Infallible>(
        "echo",
        VERSION,
        run_echo,
        &["log"],
        |_| Ok(()),
    );
    echo.unhashed_outputs = &["timings.txt"];
    Registry::from_kinds([echo])
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(gen_text: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runs.log");
        let text = format!(
            "[pipeline]\ndevice = 'cpu'\nseed = 7\n\n[stages.gen]\nkind = 'echo'\ntext = '{gen_text}'\nlog = '{0}'\n\n[stages.use]\nkind = 'echo'\nneeds = ['gen']\ntext = 'use'\nlog = '{0}'\n",
            log.display()
        );
        std::fs::write(dir.path().join("pipeline.toml"), text).unwrap();
        Setup { dir }
    }

    fn load(&self, sets: &[&str]) -> Result<Workspace, PipeError> {
        let overrides: Vec<crate::config::Override> =
            sets.iter().map(|s| s.parse().unwrap()).collect();
        Workspace::load(
            &self.dir.path().join("pipeline.toml"),
            &overrides,
            registry(),
        )
    }

    fn run(&self, sets: &[&str]) -> Result<(), PipeError> {
        self.run_forced(sets, &[])
    }

    /// Runs with `--force --stage NAME` for each of `forced` (a plain run when empty).
    fn run_forced(&self, sets: &[&str], forced: &[&str]) -> Result<(), PipeError> {
        let mut ws = self.load(sets)?;
        let names: Vec<String> = forced.iter().map(|s| s.to_string()).collect();
        let opts = RunOptions {
            targets: ws.targets(&names)?,
            force: !forced.is_empty(),
            dry_run: false,
            jobs: 2,
        };
        run(
            &mut ws,
            &opts,
            &Runners {
                local: LocalRunner,
                slurm: None,
            },
            &Console::new(),
            &AtomicBool::new(false),
        )
    }

    fn runs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("runs.log"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(rel)).unwrap()
    }
}

#[test]
fn builtin_stage_publishes_outputs_and_records_the_lock() {
    let s = Setup::new("hello");
    s.run(&[]).unwrap();
    assert_eq!(s.runs(), 2);
    let ws = s.load(&[]).unwrap();
    let gen = &ws.lock.stages["gen"];
    assert_eq!(s.read("artifacts/gen/out.txt"), "hello");
    assert_eq!(
        s.read("artifacts/use/out.txt"),
        format!("use|gen:echo:{}:hello", &gen.fingerprint[..8])
    );
    assert_eq!(gen.device.as_deref(), Some("cpu"));
    assert_eq!(gen.seed, Some(7));
    assert_eq!(
        gen.metrics.get("chars").and_then(|v| v.as_integer()),
        Some(5)
    );
    assert!(
        !gen.params.contains_key("log"),
        "unhashed params are not recorded as hashed"
    );
    let outs: Vec<&str> = gen.outs.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(outs, ["artifacts/gen/out.txt", "artifacts/gen/timings.txt"]);
    assert!(
        !s.dir
            .path()
            .join("artifacts/.scratch")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "scratch kept after success"
    );
    assert!(
        !s.dir
            .path()
            .join("artifacts/.tmp")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "temp dirs left behind"
    );

    // Up to date, and an unhashed param changes nothing.
    s.run(&["gen.log=\"other.log\""]).unwrap();
    s.run(&[]).unwrap();
    assert_eq!(s.runs(), 2);
    // The seed enters built-in fingerprints.
    s.run(&["pipeline.seed=8"]).unwrap();
    assert_eq!(s.runs(), 4);
}

#[test]
fn failed_builtin_keeps_previous_outputs_lock_and_scratch() {
    let s = Setup::new("hello");
    s.run(&[]).unwrap();
    let lock_before = s.read("pipeline.lock");
    let err = s.run(&["gen.text=\"bye\"", "gen.fail=true"]).unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert_eq!(s.read("artifacts/gen/out.txt"), "hello");
    assert_eq!(s.read("pipeline.lock"), lock_before);
    assert_eq!(s.runs(), 3, "downstream ran after a failure");
    let scratch: Vec<_> = s
        .dir
        .path()
        .join("artifacts/.scratch")
        .read_dir()
        .unwrap()
        .collect();
    assert_eq!(
        scratch.len(),
        1,
        "scratch of the failed run must survive for resume"
    );

    let err = s.run(&["gen.text=\"bye\"", "gen.cancel=true"]).unwrap_err();
    assert_eq!(err.exit_code(), 130, "{err}");
    assert_eq!(s.read("artifacts/gen/out.txt"), "hello");
}

#[test]
fn builtin_params_are_validated_before_anything_runs() {
    let s = Setup::new("hello");
    let err = s
        .run(&["gen.txet=\"x\""])
        .expect_err("unknown param accepted");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("unknown field `txet`"), "{err}");
    let err = s.run(&["use.fail=3"]).expect_err("wrong type accepted");
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("stage `use` (kind `echo`)"),
        "{err}"
    );
    assert_eq!(s.runs(), 0);
}

#[test]
fn registry_hides_unhashed_params_from_the_fingerprint_only() {
    let reg = registry();
    let kind = reg.get("echo").unwrap();
    let table: toml::Table = toml::from_str("text = 'a'\nlog = '/x'").unwrap();
    let v = kind.validate(&table).unwrap();
    assert_eq!(v.full["log"], "/x");
    assert_eq!(v.full["fail"], false, "defaults are filled in");
    assert!(v.hashed.get("log").is_none());
    assert!(reg.known_kinds().contains("echo"));
}

#[test]
fn a_rerun_to_the_same_bytes_leaves_downstream_alone() {
    let s = Setup::new("hello");
    s.run(&[]).unwrap();
    assert_eq!(s.runs(), 2);
    let timings = s.read("artifacts/gen/timings.txt");
    s.run_forced(&[], &["gen"]).unwrap();
    assert_eq!(s.runs(), 3, "the forced stage reran");
    assert_ne!(s.read("artifacts/gen/timings.txt"), timings);
    s.run(&[]).unwrap();
    assert_eq!(
        s.runs(),
        3,
        "downstream reran for a change in an unhashed output"
    );
    // A hashed output that changes still reaches downstream.
    s.run(&["gen.text=\"other\""]).unwrap();
    assert_eq!(s.runs(), 5);
}
