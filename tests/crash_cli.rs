//! Crash consistency through the real binary: a five-stage command pipeline whose commands
//! write their outputs slowly, the engine killed (SIGKILL) or signalled (SIGTERM, SIGINT)
//! at seeded random moments, then run again. Every round must end with the outputs of an
//! uninterrupted run, a readable lock that says all is up to date, no process of the
//! pipeline left, and nothing outside the workspace touched.
//! (Over 500 lines: one scenario per test, each with its own pipeline text inline.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

mod common;
use common::text;

const BIN: &str = env!("CARGO_BIN_EXE_fmnist-pipe");

/// Every process a test's engine starts inherits this variable; one found after the
/// engine is gone is a leftover.
const TOKEN_VAR: &str = "CRASH_CLI_TOKEN";

/// Writes OUT from INPUTs in ten steps, in a subshell: the `sh -c` the engine starts is
/// not what writes, so a crashed engine leaves a writer behind for the next run to end.
const SLOW_SH: &str = r#"out=$1; tag=$2; shift 2
( cat "$@"; i=0; while [ $i -lt 8 ]; do echo "$tag $i"; sleep 0.02; i=$((i+1)); done ) > "$out"
echo "$tag end" >> "$out"
"#;

/// a -> b -> c -> e, a -> d -> e; c's output is a folder.
const PIPELINE: &str = r#"
[stages.a]
cmd = "sh tools/slow.sh a.txt A input.txt"
deps = ["tools/slow.sh", "input.txt"]
outs = ["a.txt"]

[stages.b]
cmd = "sh tools/slow.sh b.txt B1 a.txt"
deps = ["tools/slow.sh", "a.txt"]
outs = ["b.txt"]

[stages.c]
cmd = "mkdir -p c && sh tools/slow.sh c/out.txt C b.txt"
deps = ["tools/slow.sh", "b.txt"]
outs = ["c"]

[stages.d]
cmd = "sh tools/slow.sh d.txt D a.txt"
deps = ["tools/slow.sh", "a.txt"]
outs = ["d.txt"]

[stages.e]
cmd = "sh tools/slow.sh e.txt E c/out.txt d.txt"
deps = ["tools/slow.sh", "c/out.txt", "d.txt"]
outs = ["e.txt"]
"#;

const OUTPUTS: [&str; 5] = ["a.txt", "b.txt", "c", "d.txt", "e.txt"];

/// Two versions of the first stage's input.
const INPUTS: [&str; 2] = ["first input\n", "second input\n"];

/// A small seeded generator (SplitMix64): reproducible rounds without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed(default: u64) -> u64 {
    std::env::var("CRASH_CLI_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A workspace in a folder of its own, with a canary file beside it.
struct Workspace {
    outer: tempfile::TempDir,
    dir: PathBuf,
    canary: PathBuf,
    canary_mtime: SystemTime,
    token: String,
}

const CANARY: &str = "outside the workspace: must not change\n";

impl Workspace {
    fn new(name: &str) -> Workspace {
        Workspace::with_pipeline(name, PIPELINE)
    }

    fn with_pipeline(name: &str, pipeline: &str) -> Workspace {
        let outer = tempfile::tempdir().expect("temp dir");
        let dir = outer.path().join("ws");
        std::fs::create_dir_all(dir.join("tools")).expect("create workspace");
        std::fs::write(dir.join("pipeline.toml"), pipeline).expect("write pipeline");
        std::fs::write(dir.join("tools/slow.sh"), SLOW_SH).expect("write script");
        std::fs::write(dir.join("input.txt"), INPUTS[0]).expect("write input");
        let canary = outer.path().join("canary.txt");
        std::fs::write(&canary, CANARY).expect("write canary");
        let canary_mtime = std::fs::metadata(&canary)
            .and_then(|m| m.modified())
            .expect("canary mtime");
        let token = format!("{name}-{}-{:?}", std::process::id(), Instant::now());
        Workspace {
            outer,
            dir,
            canary,
            canary_mtime,
            token,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .current_dir(&self.dir)
            .env(TOKEN_VAR, &self.token)
            .stdin(Stdio::null());
        cmd
    }

    fn pipe(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run fmnist-pipe")
    }

    fn run_ok(&self, args: &[&str]) -> Output {
        let out = self.pipe(&[&["run", "-j", "2"], args].concat());
        assert_eq!(out.status.code(), Some(0), "run failed:\n{}", text(&out));
        out
    }

    /// A run in the background, its output thrown away.
    fn start(&self, args: &[&str]) -> Child {
        self.command(&[&["run", "-j", "2"], args].concat())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fmnist-pipe")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn set_input(&self, version: usize) {
        std::fs::write(self.path("input.txt"), INPUTS[version]).expect("write input");
    }

    fn edit(&self, from: &str, to: &str) {
        let file = self.path("pipeline.toml");
        let text = std::fs::read_to_string(&file).expect("read pipeline");
        assert!(text.contains(from), "pipeline has no `{from}`");
        std::fs::write(&file, text.replacen(from, to, 1)).expect("write pipeline");
    }

    /// Every file under the declared outputs, by workspace path.
    fn outputs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        for out in OUTPUTS {
            collect(&self.dir, &self.path(out), &mut files);
        }
        files
    }

    /// The lock parses, names every stage, and `status` says each is up to date.
    fn assert_up_to_date(&self, context: &str) {
        let lock = std::fs::read_to_string(self.path("pipeline.lock")).expect("read lock");
        let lock: toml::Table = toml::from_str(&lock)
            .unwrap_or_else(|e| panic!("{context}: pipeline.lock does not parse: {e}"));
        let stages = lock.get("stages").and_then(|s| s.as_table());
        assert_eq!(stages.map(|s| s.len()), Some(5), "{context}: {lock:?}");
        let out = self.pipe(&["status", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{context}: {}", text(&out));
        let report: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).expect("status --json");
        for stage in &report {
            assert_eq!(stage["state"], "up to date", "{context}: {stage}");
        }
        assert_eq!(report.len(), 5, "{context}");
    }

    /// `status` blames no stage's outputs: each is as its lock entry says.
    fn assert_outputs_match_lock(&self, context: &str) {
        let out = self.pipe(&["status"]);
        let shown = text(&out);
        assert!(
            !shown.contains("output"),
            "{context}: outputs differ from the lock:\n{shown}"
        );
    }

    fn assert_clean(&self, context: &str) {
        let left = leftovers(&self.token);
        assert!(left.is_empty(), "{context}: processes left: {left:?}");
        let journal = self.path("artifacts/.journal");
        let records: Vec<_> = std::fs::read_dir(&journal)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            records.is_empty(),
            "{context}: journal records left: {records:?}"
        );
        let canary = std::fs::read_to_string(&self.canary).expect("read canary");
        assert_eq!(canary, CANARY, "{context}: the canary changed");
        let mtime = std::fs::metadata(&self.canary)
            .and_then(|m| m.modified())
            .expect("canary mtime");
        assert_eq!(
            mtime, self.canary_mtime,
            "{context}: the canary was touched"
        );
        let siblings: Vec<_> = std::fs::read_dir(self.outer.path())
            .expect("list the folder around the workspace")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(siblings.len(), 2, "{context}: {siblings:?}");
    }
}

fn collect(root: &Path, path: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
    let rel = path
        .strip_prefix(root)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            files.insert(format!("{rel}/"), Vec::new());
            let mut items: Vec<PathBuf> = std::fs::read_dir(path)
                .expect("list output folder")
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .collect();
            items.sort();
            for item in items {
                collect(root, &item, files);
            }
        }
        Ok(_) => {
            files.insert(rel, std::fs::read(path).expect("read output"));
        }
        Err(_) => {}
    }
}

/// Live processes (not zombies) whose environment carries `token`, as "PID CMDLINE".
fn leftovers(token: &str) -> Vec<String> {
    let needle = format!("{TOKEN_VAR}={token}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        if state == "Z" || state == "X" {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        found.push(format!("{name} [{state}] {cmdline}"));
    }
    found
}

/// The outputs of uninterrupted runs, per input version.
fn references() -> [BTreeMap<String, Vec<u8>>; 2] {
    let ws = Workspace::new("reference");
    ws.run_ok(&[]);
    let first = ws.outputs();
    ws.set_input(1);
    ws.run_ok(&[]);
    let second = ws.outputs();
    assert_ne!(first, second);
    assert_eq!(first.len(), 6, "{:?}", first.keys());
    [first, second]
}

fn send(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet, so the
    // pid is still ours.
    let done = unsafe { libc::kill(pid, signal) };
    assert_eq!(done, 0, "kill {pid}");
}

/// Starts `run --force` on a changed or unchanged input, delivers `signal` to the engine
/// alone at a random moment, checks the state it leaves, reruns to completion and checks
/// the result against an uninterrupted run's.
fn crash_rounds(signal: i32, rounds: usize, default_seed: u64) {
    let seed = seed(default_seed);
    let mut rng = Rng(seed);
    let reference = references();
    let ws = Workspace::new(&format!("signal{signal}"));
    let started = Instant::now();
    ws.run_ok(&[]);
    // Kill moments spread over a whole run's length (measured, so a slow machine is fine).
    let span = started.elapsed().as_millis() as u64 + 50;
    let mut stopped = 0;
    let (mut rolled_back, mut ended) = (0, 0);
    for round in 0..rounds {
        let previous = ws.outputs();
        let version = rng.below(2) as usize;
        ws.set_input(version);
        let delay = rng.below(span);
        let context = format!("seed {seed}, round {round}, signal {signal} after {delay} ms");
        let child = ws.start(&["--force"]);
        std::thread::sleep(Duration::from_millis(delay));
        send(&child, signal);
        let out = child.wait_with_output().expect("wait for the engine");
        if signal != libc::SIGKILL {
            use std::os::unix::process::ExitStatusExt;
            let code = out.status.code();
            // 130: interrupted; 0: it was done first; killed by the signal itself: it came
            // before the handler was installed, when nothing had started.
            let before_handler = out.status.signal() == Some(signal);
            assert!(
                code == Some(130) || code == Some(0) || before_handler,
                "{context}: {:?}\n{}",
                out.status,
                text(&out)
            );
            stopped += usize::from(code == Some(130));
            // Stopped from inside: every output is the previous one or the new complete
            // one, as the lock says, and nothing is left running or journaled.
            let now = ws.outputs();
            for (path, bytes) in &now {
                assert!(
                    previous.get(path) == Some(bytes)
                        || reference[version].get(path) == Some(bytes),
                    "{context}: {path} is neither the previous output nor the new one"
                );
            }
            ws.assert_outputs_match_lock(&context);
            ws.assert_clean(&format!("{context}, after the signal"));
        }
        let rerun = text(&ws.run_ok(&[]));
        rolled_back += usize::from(rerun.contains("rolled back an interrupted run"));
        ended += usize::from(rerun.contains("ended the processes"));
        assert!(
            ws.outputs() == reference[version],
            "{context}: outputs differ from an uninterrupted run's"
        );
        ws.assert_up_to_date(&context);
        ws.assert_clean(&context);
    }
    eprintln!(
        "seed {seed}, signal {signal}: {rounds} rounds in {:.1} s; {stopped} interrupted, \
         {rolled_back} rolled back, {ended} with processes left to end",
        started.elapsed().as_secs_f64()
    );
    if signal == libc::SIGKILL {
        // The rounds must have hit stages mid-write, with writers left running.
        assert!(
            rolled_back * 2 >= rounds,
            "seed {seed}: {rolled_back} rollbacks"
        );
        assert!(ended > 0, "seed {seed}: no round left a process behind");
    } else {
        assert!(
            stopped * 2 >= rounds,
            "seed {seed}: only {stopped} of {rounds} rounds were interrupted mid-run"
        );
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_leaves_nothing() {
    crash_rounds(libc::SIGKILL, 30, 0x5EED_0001);
}

#[test]
fn sigterm_restores_previous_outputs_and_ends_every_command() {
    crash_rounds(libc::SIGTERM, 10, 0x5EED_0002);
}

#[test]
fn sigint_restores_previous_outputs_and_ends_every_command() {
    crash_rounds(libc::SIGINT, 10, 0x5EED_0003);
}

/// A stage killed mid-write, then a run that only recovers: the outputs are the previous
/// run's bytes, not the partial new ones.
#[test]
fn recovery_puts_back_the_previous_runs_bytes() {
    let ws = Workspace::new("previous");
    ws.run_ok(&[]);
    let previous = ws.outputs();
    ws.edit("B1 a.txt", "B2 a.txt");
    let child = ws.start(&[]);
    // Kill the engine once b's new output is half written.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let b = std::fs::read_to_string(ws.path("b.txt")).unwrap_or_default();
        if b.contains("B2 2") {
            break;
        }
        assert!(Instant::now() < deadline, "b never started writing");
        std::thread::sleep(Duration::from_millis(5));
    }
    send(&child, libc::SIGKILL);
    let _ = child.wait_with_output();
    let partial = std::fs::read_to_string(ws.path("b.txt")).expect("read b.txt");
    assert!(
        partial.contains("B2") && !partial.contains("B2 end"),
        "{partial}"
    );

    // `a` is up to date: this run does nothing but recover.
    let out = ws.run_ok(&["--stage", "a"]);
    let shown = text(&out);
    assert!(
        shown.contains("b: rolled back an interrupted run"),
        "{shown}"
    );
    assert!(
        ws.outputs() == previous,
        "recovery did not restore the previous outputs"
    );
    assert!(
        leftovers(&ws.token).is_empty(),
        "{:?}",
        leftovers(&ws.token)
    );
    let status = text(&ws.pipe(&["status"]));
    assert!(status.contains("params.cmd"), "{status}");
    ws.assert_outputs_match_lock("after recovery");

    ws.run_ok(&[]);
    let b = std::fs::read_to_string(ws.path("b.txt")).expect("read b.txt");
    assert!(b.ends_with("B2 end\n"), "{b}");
    ws.assert_up_to_date("after the rerun");
    ws.assert_clean("after the rerun");
}

/// `first` is quick; `stubborn` ignores SIGTERM (so does its `sleep`, which inherits that).
const STUBBORN: &str = r#"
[stages.first]
cmd = "echo first > first.txt"
outs = ["first.txt"]

[stages.stubborn]
cmd = "trap '' TERM; echo new > out.txt; touch started; sleep 30; echo done >> out.txt"
needs = ["first"]
outs = ["out.txt"]
"#;

/// Starts the stubborn stage over an old out.txt and interrupts once it is under way.
fn interrupt_stubborn(ws: &Workspace) -> (Child, Instant) {
    ws.run_ok(&["--stage", "first"]);
    std::fs::write(ws.path("out.txt"), "old\n").expect("seed output");
    let child = ws.start(&[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ws.path("started").exists() {
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    send(&child, libc::SIGINT);
    (child, Instant::now())
}

fn wait_no_leftovers(ws: &Workspace) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !leftovers(&ws.token).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        leftovers(&ws.token).is_empty(),
        "{:?}",
        leftovers(&ws.token)
    );
}

#[test]
fn a_command_ignoring_sigterm_is_killed_after_the_grace_period() {
    let ws = Workspace::with_pipeline("stubborn", STUBBORN);
    let (child, signalled) = interrupt_stubborn(&ws);
    let out = child.wait_with_output().expect("wait for the engine");
    let took = signalled.elapsed();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.path("out.txt")).unwrap_or_default(),
        "old\n"
    );
    ws.assert_clean("after the grace period");
}

#[test]
fn a_second_signal_kills_the_groups_at_once_and_the_next_run_rolls_back() {
    let ws = Workspace::with_pipeline("second", STUBBORN);
    let (child, signalled) = interrupt_stubborn(&ws);
    std::thread::sleep(Duration::from_millis(200));
    send(&child, libc::SIGINT);
    let out = child.wait_with_output().expect("wait for the engine");
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
    assert!(
        signalled.elapsed() < Duration::from_millis(1500),
        "{:?}",
        signalled.elapsed()
    );
    wait_no_leftovers(&ws);
    // It left at once: the partial output is in place, the old one journaled aside.
    assert_eq!(
        std::fs::read_to_string(ws.path("out.txt")).unwrap_or_default(),
        "new\n"
    );
    let out = ws.run_ok(&["--stage", "first"]);
    assert!(
        text(&out).contains("stubborn: rolled back an interrupted run"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(ws.path("out.txt")).unwrap_or_default(),
        "old\n"
    );
    ws.assert_clean("after recovery");
}
