//! Running a pipeline: decide per stage whether it is up to date, restorable from the run
//! cache, or must run; run stale stages in dependency order with independent ones in
//! parallel; publish outputs atomically and record each success in pipeline.lock.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fmnist_stages::{Cancelled, Input, StageContext};

use crate::cache::RunCache;
use crate::command_stage;
use crate::config::{Body, Pipeline, Stage, ARTIFACTS_DIR};
use crate::dag::Dag;
use crate::error::PipeError;
use crate::fingerprint::{self, Recipe};
use crate::lock::{self, LockEntry, LockFile};
use crate::manifest::{self, FileRecord, MISSING};
use crate::paths::Fence;
use crate::progress::{self, Console};
use crate::publish::{publish_dir, remove_path, temp_dir, Backup};
use crate::registry::Registry;

/// A loaded workspace: the validated pipeline, its graph and the lock as last written.
pub struct Workspace {
    pub pipeline: Pipeline,
    pub dag: Dag,
    pub lock_path: PathBuf,
    pub lock: LockFile,
    pub registry: Registry,
}

impl Workspace {
    pub fn load(
        file: &Path,
        overrides: &[crate::config::Override],
        registry: Registry,
    ) -> Result<Workspace, PipeError> {
        let pipeline = crate::config::load(file, overrides, &registry)?;
        let dag = Dag::build(&pipeline)?;
        let lock_path = lock::lock_path(file);
        let (lock, warning) = lock::read_indexed(&lock_path, Some(&lock_index(&pipeline)))?;
        if let Some(warning) = warning {
            crate::output::warn_line(&format!("warning: {warning}"));
        }
        Ok(Workspace {
            pipeline,
            dag,
            lock_path,
            lock,
            registry,
        })
    }

    /// Stage indices for names given on the command line.
    pub fn targets(&self, names: &[String]) -> Result<Vec<usize>, PipeError> {
        names
            .iter()
            .map(|n| {
                self.pipeline
                    .index_of(n)
                    .ok_or_else(|| self.pipeline.unknown_stage("--stage", n))
            })
            .collect()
    }
}

/// Where the lock's JSON copy lives (see `lock::read_indexed`): in the engine's cache folder.
fn lock_index(pipeline: &Pipeline) -> PathBuf {
    pipeline.artifacts().join(".cache").join("lock-index.json")
}

/// Holds artifacts/.run.lock for as long as it lives, so two runs never share a workspace.
pub struct RunGuard {
    _file: File,
}

impl RunGuard {
    pub fn acquire(artifacts: &Path) -> Result<RunGuard, PipeError> {
        std::fs::create_dir_all(artifacts).map_err(|e| PipeError::io_at(artifacts, "create", e))?;
        let path = artifacts.join(".run.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| PipeError::io_at(&path, "open", e))?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => Ok(RunGuard { _file: file }),
            Ok(false) => Err(PipeError::Busy(path.display().to_string())),
            Err(e) => Err(PipeError::io_at(&path, "lock", e)),
        }
    }
}

/// What a stage's inputs and recorded state say about it.
struct Evaluation {
    fingerprint: String,
    deps: Vec<FileRecord>,
    upstream: BTreeMap<String, String>,
    /// Why it must run; empty when it is up to date.
    reasons: Vec<String>,
    /// The outputs as found on disk, when the fingerprint matched the lock.
    current_outs: Option<Vec<FileRecord>>,
}

/// Upstream stage -> the content hash of its outputs (None: not known yet, e.g. it would
/// rerun in a dry run).
type UpstreamHashes = BTreeMap<String, Option<String>>;

fn evaluate(
    pipeline: &Pipeline,
    stage: &Stage,
    entry: Option<&LockEntry>,
    upstream_hashes: &UpstreamHashes,
) -> Result<Evaluation, String> {
    let previous_deps = entry.map(|e| e.deps.as_slice()).unwrap_or(&[]);
    let deps = manifest::scan(&pipeline.root, stage.deps(), previous_deps)
        .map_err(|e| format!("cannot read deps: {e}"))?;
    let mut upstream = BTreeMap::new();
    let mut pending = Vec::new();
    for need in &stage.needs {
        match upstream_hashes.get(need).cloned().flatten() {
            Some(hash) => {
                upstream.insert(need.clone(), hash);
            }
            None => {
                pending.push(need.clone());
                // Assume the last recorded inputs so the stage's own changes still show.
                if let Some(hash) = entry.and_then(|e| e.upstream.get(need)) {
                    upstream.insert(need.clone(), hash.clone());
                }
            }
        }
    }
    let fingerprint = fingerprint::fingerprint(&Recipe {
        kind: stage.kind_name(),
        version: stage.version(),
        params: &stage.hashed_params,
        seed: stage.is_builtin().then_some(pipeline.seed),
        upstream: &upstream,
        deps_digest: &manifest::digest(&deps),
    });
    let mut reasons: Vec<String> = pending
        .iter()
        .map(|p| format!("upstream `{p}` is stale"))
        .collect();
    let Some(entry) = entry else {
        reasons.push("never run".to_string());
        return Ok(Evaluation {
            fingerprint,
            deps,
            upstream,
            reasons,
            current_outs: None,
        });
    };
    if entry.fingerprint != fingerprint || !pending.is_empty() {
        if entry.fingerprint != fingerprint {
            reasons.extend(why_fingerprint_changed(
                pipeline, stage, entry, &upstream, &deps,
            ));
        }
        return Ok(Evaluation {
            fingerprint,
            deps,
            upstream,
            reasons,
            current_outs: None,
        });
    }
    let outs =
        scan_outs(pipeline, stage, &entry.outs).map_err(|e| format!("cannot read outputs: {e}"))?;
    if manifest::digest(&outs) != entry.outs_hash || outs.iter().any(|r| r.blake3 == MISSING) {
        manifest::diff("output", &entry.outs, &outs, &mut reasons);
        if reasons.is_empty() {
            reasons.push("outputs changed".to_string());
        }
    }
    Ok(Evaluation {
        fingerprint,
        deps,
        upstream,
        reasons,
        current_outs: Some(outs),
    })
}

fn why_fingerprint_changed(
    pipeline: &Pipeline,
    stage: &Stage,
    entry: &LockEntry,
    upstream: &BTreeMap<String, String>,
    deps: &[FileRecord],
) -> Vec<String> {
    let mut reasons = Vec::new();
    if entry.kind != stage.kind_name() {
        reasons.push(format!("kind: {} -> {}", entry.kind, stage.kind_name()));
    } else if entry.version != stage.version() {
        reasons.push(format!(
            "kind `{}` version: {} -> {}",
            entry.kind,
            entry.version,
            stage.version()
        ));
    }
    fingerprint::diff_params(
        "params",
        &entry.params_json(),
        &stage.hashed_params,
        &mut reasons,
    );
    if stage.is_builtin() && entry.seed != Some(pipeline.seed) {
        let old = entry
            .seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "(unset)".to_string());
        reasons.push(format!("seed: {old} -> {}", pipeline.seed));
    }
    for (name, hash) in upstream {
        if entry.upstream.get(name) != Some(hash) {
            reasons.push(format!("input changed: outputs of `{name}`"));
        }
    }
    for name in entry.upstream.keys() {
        if !upstream.contains_key(name) {
            reasons.push(format!("input removed: `{name}`"));
        }
    }
    manifest::diff("dep", &entry.deps, deps, &mut reasons);
    if reasons.is_empty() {
        reasons.push("fingerprint recipe changed".to_string());
    }
    reasons
}

fn scan_outs(
    pipeline: &Pipeline,
    stage: &Stage,
    previous: &[FileRecord],
) -> std::io::Result<Vec<FileRecord>> {
    manifest::scan(&pipeline.root, &stage.out_roots(), previous)
}

/// One stage's state for `status`.
#[derive(Debug, serde::Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub kind: String,
    /// "up to date" | "stale" | "never run"
    pub state: String,
    pub reasons: Vec<String>,
    pub fingerprint: Option<String>,
    /// Where the last recorded run computed, e.g. "cpu/fast" or "cuda:0/portable" (built-in
    /// stages that report a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<String>,
    /// The fingerprint the stage has now (with its upstream as recorded where that is stale).
    #[serde(skip)]
    pub current_fingerprint: Option<String>,
}

/// "DEVICE/KERNELS" of a recorded run, from the device and kernels its stage reported.
fn ran_on(entry: &LockEntry) -> Option<String> {
    let reported = |key: &str| entry.metrics.get(key).and_then(|v| v.as_str());
    let device = reported("device")?;
    match reported("kernels").or(entry.kernels.as_deref()) {
        Some(kernels) => Some(format!("{device}/{kernels}")),
        None => Some(device.to_string()),
    }
}

/// Every stage's state, in run order, without running anything.
pub fn status(ws: &Workspace) -> Result<Vec<StageStatus>, PipeError> {
    let mut hashes: UpstreamHashes = BTreeMap::new();
    let mut report = Vec::new();
    for &i in &ws.dag.order {
        let stage = &ws.pipeline.stages[i];
        let entry = ws.lock.stages.get(&stage.name);
        let (state, reasons, fp, current) = match evaluate(&ws.pipeline, stage, entry, &hashes) {
            Ok(ev) if ev.reasons.is_empty() => {
                hashes.insert(stage.name.clone(), entry.map(|e| e.outs_hash.clone()));
                let fp = Some(ev.fingerprint);
                ("up to date", ev.reasons, fp.clone(), fp)
            }
            Ok(ev) => {
                hashes.insert(stage.name.clone(), None);
                let state = if entry.is_none() {
                    "never run"
                } else {
                    "stale"
                };
                let recorded = entry.map(|e| e.fingerprint.clone());
                (state, ev.reasons, recorded, Some(ev.fingerprint))
            }
            Err(e) => {
                hashes.insert(stage.name.clone(), None);
                ("stale", vec![e], None, None)
            }
        };
        report.push(StageStatus {
            stage: stage.name.clone(),
            kind: stage.kind_name().to_string(),
            state: state.to_string(),
            reasons,
            fingerprint: fp,
            ran_on: entry.and_then(ran_on),
            current_fingerprint: current,
        });
    }
    Ok(report)
}

pub struct RunOptions {
    pub targets: Vec<usize>,
    pub force: bool,
    pub dry_run: bool,
    pub jobs: usize,
}

/// What happened to one stage.
enum Outcome {
    UpToDate { entry: LockEntry, refreshed: bool },
    Restored(LockEntry),
    Ran { entry: LockEntry, took: Duration },
    WouldRun(Vec<String>),
    Failed(String),
    Interrupted,
}

/// What a task needs to know about one finished upstream stage.
#[derive(Clone)]
struct Published {
    outs_hash: Option<String>,
    fingerprint: String,
}

struct RunShared<'a> {
    ws: &'a Workspace,
    cache: RunCache,
    console: &'a Console,
    cancel: &'a AtomicBool,
    force: BTreeSet<usize>,
    dry_run: bool,
}

/// The engine's own folders under artifacts/, which it creates, empties and deletes.
const ENGINE_FOLDERS: [&str; 5] = [".tmp", ".cache", ".logs", ".scratch", ".journal"];

/// Refuses (exit 2) to touch any output of `stages`, or any of the engine's `folders` under
/// artifacts/, that resolves outside the workspace (a symlink pointing out, say).
fn check_inside(
    pipeline: &Pipeline,
    stages: impl IntoIterator<Item = usize>,
    folders: &[&str],
) -> Result<(), PipeError> {
    let fence = Fence::new(&pipeline.root, &pipeline.artifacts())
        .map_err(|e| PipeError::Config(e.to_string()))?;
    for i in stages {
        let stage = &pipeline.stages[i];
        for out in stage.out_roots() {
            fence
                .check(&out)
                .map_err(|e| PipeError::Config(format!("stage `{}`: {e}", stage.name)))?;
        }
    }
    for folder in folders {
        fence
            .check(&format!("{ARTIFACTS_DIR}/{folder}"))
            .map_err(|e| PipeError::Config(e.to_string()))?;
    }
    Ok(())
}

/// Holding the run lock: ends what a crashed run left running, puts back the outputs it had
/// moved aside, clears its leftovers in .tmp. Every command that changes the workspace
/// (run, clean, gc) starts with it, so none of them deletes a backup still needed.
fn recover_crashed_run(artifacts: &Path, say: impl Fn(&str)) -> Result<(), PipeError> {
    let notes = crate::journal::recover(artifacts).map_err(|e| {
        PipeError::io(
            "cannot recover from an interrupted run",
            std::io::Error::other(e),
        )
    })?;
    for note in notes {
        say(&note);
    }
    Ok(())
}

/// Runs every stale selected stage. Returns Ok when all of them succeeded (or were up to date).
pub fn run(
    ws: &mut Workspace,
    opts: &RunOptions,
    console: &Console,
    cancel: &AtomicBool,
) -> Result<(), PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let _guard = if opts.dry_run {
        None
    } else {
        Some(RunGuard::acquire(&artifacts)?)
    };
    if !opts.dry_run {
        recover_crashed_run(&artifacts, |note| console.line(note))?;
    }
    let selected = ws.dag.select(&opts.targets);
    if !opts.dry_run {
        check_inside(&ws.pipeline, selected.iter().copied(), &ENGINE_FOLDERS)?;
    }
    let force: BTreeSet<usize> = match (opts.force, opts.targets.is_empty()) {
        (false, _) => BTreeSet::new(),
        (true, true) => selected.clone(),
        (true, false) => opts.targets.iter().copied().collect(),
    };
    let mut lock = std::mem::take(&mut ws.lock);
    let known: BTreeSet<&str> = ws.pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    let mut lock_dirty = lock.format != lock::LOCK_FORMAT;
    lock.format = lock::LOCK_FORMAT;
    let before = lock.stages.len();
    lock.stages.retain(|name, _| known.contains(name.as_str()));
    lock_dirty |= lock.stages.len() != before;
    // Each finished stage is appended to the lock's journal (one line; rewriting the whole
    // lock per stage made a long pipeline quadratic); the lock is rewritten once, at the end.
    let mut journal = if opts.dry_run {
        None
    } else {
        Some(lock::Journal::open(&ws.lock_path)?)
    };

    let shared = RunShared {
        ws,
        cache: RunCache::new(&artifacts),
        console,
        cancel,
        force,
        dry_run: opts.dry_run,
    };
    let mut failures: Vec<String> = Vec::new();
    let mut interrupted = false;
    let mut lock_error = None;

    let dag = &shared.ws.dag;
    let stage_count = shared.ws.pipeline.stages.len();
    let mut position = vec![0; stage_count];
    for (pos, &i) in dag.order.iter().enumerate() {
        position[i] = pos;
    }
    // Parents not yet published, per selected stage; a stage is ready at zero. Ready stages
    // start in pipeline order.
    let mut unmet: Vec<Option<usize>> = vec![None; stage_count];
    let mut ready: BTreeSet<(usize, usize)> = BTreeSet::new();
    for &i in &selected {
        let parents = dag.parents(i).len();
        unmet[i] = Some(parents);
        if parents == 0 {
            ready.insert((position[i], i));
        }
    }
    let mut published: BTreeMap<String, Published> = BTreeMap::new();
    let jobs = opts.jobs.max(1);
    let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let job_rx = std::sync::Mutex::new(job_rx);
    std::thread::scope(|scope| {
        let mut running = 0usize;
        let mut workers = 0usize;
        let mut inline: Option<(usize, Outcome)> = None;
        loop {
            let stop = !failures.is_empty()
                || interrupted
                || lock_error.is_some()
                || cancel.load(Ordering::Relaxed);
            // Stages run on worker threads, at most -j at once; a worker is started only when
            // every existing one is busy, so a huge -j costs nothing and a chain needs one. A
            // stage's compute (rayon inside candle and our kernels) goes to the global pool,
            // across every core.
            while !stop && running < jobs {
                let Some((_, i)) = ready.pop_first() else {
                    break;
                };
                let stage = &shared.ws.pipeline.stages[i];
                let upstream: BTreeMap<String, Published> = stage
                    .needs
                    .iter()
                    .filter_map(|n| published.get(n).map(|p| (n.clone(), p.clone())))
                    .collect();
                let entry = lock.stages.get(&stage.name).cloned();
                running += 1;
                // Alone (nothing running, nothing else ready, as along a chain): run it
                // here, without handing it to a worker and back.
                if running == 1 && ready.is_empty() {
                    inline = Some((i, run_caught(&shared, i, entry, &upstream)));
                    break;
                }
                if running > workers {
                    workers += 1;
                    let (tx, job_rx, shared) = (tx.clone(), &job_rx, &shared);
                    scope.spawn(move || work(shared, job_rx, &tx));
                }
                if job_tx.send(Job { i, entry, upstream }).is_err() {
                    break;
                }
            }
            if running == 0 {
                break;
            }
            let (i, outcome) = match inline.take() {
                Some(done) => done,
                None => match rx.recv() {
                    Ok(done) => done,
                    Err(_) => break,
                },
            };
            running -= 1;
            let stage = &shared.ws.pipeline.stages[i];
            let name = &stage.name;
            let mut record = |lock: &mut LockFile, entry: LockEntry| {
                let logged = match journal.as_mut() {
                    Some(j) => j.record(name, &entry),
                    None => Ok(()),
                };
                lock.stages.insert(name.clone(), entry);
                lock_dirty = true;
                logged
            };
            let result = match outcome {
                Outcome::UpToDate { entry, refreshed } => {
                    console.line(&format!("{name}: up to date"));
                    published.insert(
                        name.clone(),
                        Published {
                            outs_hash: Some(entry.outs_hash.clone()),
                            fingerprint: entry.fingerprint.clone(),
                        },
                    );
                    if refreshed {
                        record(&mut lock, entry)
                    } else {
                        Ok(())
                    }
                }
                Outcome::Restored(entry) => {
                    console.line(&format!("{name}: restored from cache"));
                    published.insert(
                        name.clone(),
                        Published {
                            outs_hash: Some(entry.outs_hash.clone()),
                            fingerprint: entry.fingerprint.clone(),
                        },
                    );
                    record(&mut lock, entry)
                }
                Outcome::Ran { entry, took } => {
                    let metrics = if entry.metrics.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", compact_metrics(&entry.metrics))
                    };
                    console.line(&format!(
                        "{name}: done in {}{metrics}",
                        progress::duration(took)
                    ));
                    published.insert(
                        name.clone(),
                        Published {
                            outs_hash: Some(entry.outs_hash.clone()),
                            fingerprint: entry.fingerprint.clone(),
                        },
                    );
                    if let Err(e) = shared.cache.store(&shared.ws.pipeline.root, &entry) {
                        console.line(&format!(
                            "warning: {name}: could not store outputs in the run cache: {e}"
                        ));
                    }
                    record(&mut lock, entry)
                }
                Outcome::WouldRun(reasons) => {
                    console.line(&format!("{name}: would run ({})", reasons.join("; ")));
                    let fingerprint = lock
                        .stages
                        .get(name)
                        .map(|e| e.fingerprint.clone())
                        .unwrap_or_default();
                    published.insert(
                        name.clone(),
                        Published {
                            outs_hash: None,
                            fingerprint,
                        },
                    );
                    Ok(())
                }
                Outcome::Failed(message) => {
                    console.line(&format!("{name}: FAILED: {message}"));
                    failures.push(name.clone());
                    Ok(())
                }
                Outcome::Interrupted => {
                    console.line(&format!("{name}: interrupted"));
                    interrupted = true;
                    Ok(())
                }
            };
            if let Err(e) = result {
                lock_error = Some(e);
            }
            if published.contains_key(name) {
                for child in dag.children(i) {
                    if let Some(n) = unmet[child].as_mut() {
                        *n -= 1;
                        if *n == 0 {
                            ready.insert((position[child], child));
                        }
                    }
                }
            }
        }
        // The workers end when the queue closes.
        drop(job_tx);
    });
    if lock_dirty && !opts.dry_run {
        let index = lock_index(&ws.pipeline);
        if let Err(e) = lock::write_indexed(&ws.lock_path, &lock, Some(&index)) {
            lock_error.get_or_insert(e);
        }
    }
    ws.lock = lock;
    if let Some(e) = lock_error {
        return Err(e);
    }
    if interrupted || cancel.load(Ordering::Relaxed) {
        return Err(PipeError::Interrupted);
    }
    if !failures.is_empty() {
        let what = if failures.len() == 1 {
            "stage"
        } else {
            "stages"
        };
        return Err(PipeError::StageFailed(format!(
            "{what} failed: {}; their previous outputs and lock entries were kept",
            failures.join(", ")
        )));
    }
    Ok(())
}

/// A stage for a worker: its index, its lock entry and its upstream stages as published.
struct Job {
    i: usize,
    entry: Option<LockEntry>,
    upstream: BTreeMap<String, Published>,
}

/// [`process_stage`], a panic turned into a failed stage.
fn run_caught(
    shared: &RunShared,
    i: usize,
    entry: Option<LockEntry>,
    upstream: &BTreeMap<String, Published>,
) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        process_stage(shared, i, entry, upstream)
    }))
    .unwrap_or_else(|_| Outcome::Failed("the stage panicked (a bug: please report it)".into()))
}

/// A worker thread: runs the stages it is sent until the queue closes, reporting each outcome.
fn work(
    shared: &RunShared,
    jobs: &std::sync::Mutex<mpsc::Receiver<Job>>,
    done: &mpsc::Sender<(usize, Outcome)>,
) {
    loop {
        let next = jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        let Ok(Job { i, entry, upstream }) = next else {
            return;
        };
        let outcome = run_caught(shared, i, entry, &upstream);
        if done.send((i, outcome)).is_err() {
            return;
        }
    }
}

fn compact_metrics(metrics: &toml::Table) -> String {
    metrics
        .iter()
        .filter(|(_, v)| !v.is_table() && !v.is_array())
        .map(|(k, v)| match v {
            // Four significant decimals are what a person reads; the lock keeps full precision.
            toml::Value::Float(f) => format!("{k}={}", short_float(*f)),
            toml::Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn short_float(f: f64) -> String {
    if f != 0.0 && (f.abs() >= 1e5 || f.abs() < 1e-3) {
        format!("{f:.3e}")
    } else if f.abs() >= 100.0 {
        format!("{f:.1}")
    } else {
        format!("{f:.4}")
    }
}

fn process_stage(
    shared: &RunShared,
    i: usize,
    entry: Option<LockEntry>,
    upstream: &BTreeMap<String, Published>,
) -> Outcome {
    let ws = shared.ws;
    let stage = &ws.pipeline.stages[i];
    let hashes: UpstreamHashes = upstream
        .iter()
        .map(|(k, v)| (k.clone(), v.outs_hash.clone()))
        .collect();
    let ev = match evaluate(&ws.pipeline, stage, entry.as_ref(), &hashes) {
        Ok(ev) => ev,
        Err(e) => return Outcome::Failed(e),
    };
    tracing::debug!(stage = %stage.name, fingerprint = %ev.fingerprint, reasons = ?ev.reasons, "evaluated");
    let forced = shared.force.contains(&i);
    if !forced && ev.reasons.is_empty() {
        if let (Some(entry), Some(outs)) = (entry, ev.current_outs) {
            let refreshed = entry.outs != outs;
            return Outcome::UpToDate {
                entry: LockEntry { outs, ..entry },
                refreshed,
            };
        }
    }
    if shared.dry_run {
        let reasons = if forced && ev.reasons.is_empty() {
            vec!["forced".to_string()]
        } else {
            ev.reasons
        };
        return Outcome::WouldRun(reasons);
    }
    if let Some(missing) = ev.deps.iter().find(|r| r.blake3 == MISSING) {
        return Outcome::Failed(format!("dep `{}` does not exist", missing.path));
    }
    if !forced {
        if let Some(cached) = shared.cache.lookup(&ev.fingerprint) {
            match restore(shared, stage, &cached) {
                Ok(outs) => {
                    let entry = LockEntry {
                        outs,
                        deps: ev.deps,
                        upstream: ev.upstream,
                        ..cached
                    };
                    return Outcome::Restored(entry);
                }
                Err(e) => shared.console.line(&format!(
                    "warning: {}: cannot restore from the run cache ({e}); running it instead",
                    stage.name
                )),
            }
        }
    }
    shared.console.line(&format!(
        "{}: running{}",
        stage.name,
        if ev.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", ev.reasons.join("; "))
        }
    ));
    let started = Instant::now();
    let result = match &stage.body {
        Body::Builtin { kind, table, .. } => {
            run_builtin(shared, stage, kind, table, &ev.fingerprint, upstream)
        }
        Body::Command { cmd, outs, .. } => command_stage::run_command(
            &ws.pipeline.root,
            &ws.pipeline.artifacts(),
            &stage.name,
            cmd,
            outs,
            shared.cancel,
        ),
    };
    let (outs, metrics) = match result {
        Ok(done) => done,
        Err(StageEnd::Failed(msg)) => return Outcome::Failed(msg),
        Err(StageEnd::Interrupted) => return Outcome::Interrupted,
    };
    let took = started.elapsed();
    let builtin = stage.is_builtin();
    let entry = LockEntry {
        kind: stage.kind_name().to_string(),
        version: stage.version(),
        fingerprint: ev.fingerprint,
        outs_hash: manifest::digest(&outs),
        // The device the stage reports it used ("auto" resolved), else the one asked for.
        device: builtin.then(|| {
            metrics
                .get("device")
                .and_then(|d| d.as_str())
                .map_or_else(|| ws.pipeline.device.clone(), str::to_string)
        }),
        kernels: builtin.then(|| ws.pipeline.kernels.to_string()),
        seed: builtin.then_some(ws.pipeline.seed),
        seconds: (took.as_secs_f64() * 1000.0).round() / 1000.0,
        params: lock::json_to_table(&stage.hashed_params),
        upstream: ev.upstream,
        metrics: lock::json_to_table(&metrics),
        deps: ev.deps,
        outs,
    };
    Outcome::Ran { entry, took }
}

pub(crate) enum StageEnd {
    Failed(String),
    Interrupted,
}

pub(crate) fn io_fail(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StageEnd {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |e| StageEnd::Failed(format!("cannot {what} {}: {e}", path.display()))
}

/// A stage's folder under artifacts/.scratch (checkpoints), one per fingerprint.
fn scratch_name(stage: &str, fingerprint: &str) -> String {
    format!("{stage}-{}", &fingerprint[..16.min(fingerprint.len())])
}

fn run_builtin(
    shared: &RunShared,
    stage: &Stage,
    kind: &str,
    table: &toml::Table,
    fingerprint: &str,
    upstream: &BTreeMap<String, Published>,
) -> Result<(Vec<FileRecord>, serde_json::Value), StageEnd> {
    let ws = shared.ws;
    let artifacts = ws.pipeline.artifacts();
    let implementation = ws
        .registry
        .get(kind)
        .ok_or_else(|| StageEnd::Failed(format!("unknown kind `{kind}`")))?;
    let out_dir = temp_dir(&artifacts, &stage.name, "out");
    std::fs::create_dir_all(&out_dir).map_err(io_fail("create", &out_dir))?;
    let scratch_dir = artifacts
        .join(".scratch")
        .join(scratch_name(&stage.name, fingerprint));
    std::fs::create_dir_all(&scratch_dir).map_err(io_fail("create", &scratch_dir))?;
    let inputs: Vec<Input> = stage
        .needs
        .iter()
        .filter_map(|need| {
            let up = ws.pipeline.stage(need)?;
            let dir = match up.body {
                Body::Builtin { .. } => artifacts.join(&up.name),
                // A command stage's outputs are workspace paths; hand over the workspace.
                Body::Command { .. } => ws.pipeline.root.clone(),
            };
            Some(Input {
                stage: up.name.clone(),
                kind: up.kind_name().to_string(),
                dir,
                fingerprint: upstream
                    .get(need)
                    .map(|p| p.fingerprint.clone())
                    .unwrap_or_default(),
                params: up.full_params.clone(),
            })
        })
        .collect();
    let progress = shared.console.stage(&stage.name);
    let ctx = StageContext {
        name: &stage.name,
        inputs: &inputs,
        out_dir: &out_dir,
        scratch_dir: &scratch_dir,
        device: &ws.pipeline.device,
        kernels: ws.pipeline.kernels,
        seed: ws.pipeline.seed,
        progress: &progress,
        cancel: shared.cancel,
    };
    let result = {
        let _running = fmnist_stages::context::RunningStage::start();
        implementation.run(table, &ctx)
    };
    let metrics = match result {
        Ok(metrics) => metrics,
        Err(e) => {
            let _ = remove_path(&out_dir);
            if e.downcast_ref::<Cancelled>().is_some() || shared.cancel.load(Ordering::Relaxed) {
                return Err(StageEnd::Interrupted);
            }
            return Err(StageEnd::Failed(format!("{e:#}")));
        }
    };
    let shown = format!("{ARTIFACTS_DIR}/{}", stage.name);
    let staged_rel = out_dir
        .strip_prefix(&ws.pipeline.root)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default();
    let outs = manifest::scan_as(
        &ws.pipeline.root,
        [(staged_rel.as_str(), shown.as_str())],
        &[],
    )
    .map_err(io_fail("read", &out_dir))?;
    publish_dir(&artifacts, &stage.name, &out_dir)
        .map_err(io_fail("publish", &artifacts.join(&stage.name)))?;
    let _ = remove_path(&scratch_dir);
    Ok((outs, metrics))
}

/// Puts a cached run's outputs in place; returns their records as now on disk.
fn restore(
    shared: &RunShared,
    stage: &Stage,
    cached: &LockEntry,
) -> std::io::Result<Vec<FileRecord>> {
    let root = &shared.ws.pipeline.root;
    let artifacts = shared.ws.pipeline.artifacts();
    match &stage.body {
        Body::Builtin { .. } => {
            let shown = format!("{ARTIFACTS_DIR}/{}", stage.name);
            let staged = temp_dir(&artifacts, &stage.name, "restore");
            std::fs::create_dir_all(&staged)?;
            let filled = (|| {
                for r in cached.outs.iter().filter(|r| r.blake3 != MISSING) {
                    let inner = r
                        .path
                        .strip_prefix(&shown)
                        .unwrap_or(&r.path)
                        .trim_start_matches('/');
                    shared.cache.materialize(r, &staged.join(inner))?;
                }
                let staged_rel = staged
                    .strip_prefix(root)
                    .map(|p| p.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                manifest::scan_as(root, [(staged_rel.as_str(), shown.as_str())], &[])
            })();
            let outs = match filled {
                Ok(outs) => outs,
                Err(e) => {
                    let _ = remove_path(&staged);
                    return Err(e);
                }
            };
            publish_dir(&artifacts, &stage.name, &staged)?;
            Ok(outs)
        }
        Body::Command { outs, .. } => {
            let backup = Backup::take(root, &artifacts, &stage.name, outs)?;
            let filled = (|| {
                for r in cached.outs.iter().filter(|r| r.blake3 != MISSING) {
                    shared.cache.materialize(r, &root.join(&r.path))?;
                }
                manifest::scan(root, outs, &[])
            })();
            match filled {
                Ok(records) => {
                    backup.discard();
                    Ok(records)
                }
                Err(e) => {
                    backup.restore();
                    Err(e)
                }
            }
        }
    }
}

/// Deletes the outputs and lock entries of the given stages (all when empty). The run
/// cache is kept, so running again restores them without work.
pub fn clean(ws: &mut Workspace, targets: &[usize]) -> Result<Vec<String>, PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let _guard = RunGuard::acquire(&artifacts)?;
    let chosen: Vec<usize> = if targets.is_empty() {
        (0..ws.pipeline.stages.len()).collect()
    } else {
        targets.to_vec()
    };
    check_inside(&ws.pipeline, chosen.iter().copied(), &ENGINE_FOLDERS)?;
    recover_crashed_run(&artifacts, crate::output::warn_line)?;
    let mut cleaned = Vec::new();
    for i in chosen {
        let stage = &ws.pipeline.stages[i];
        for out in stage.out_roots() {
            let path = ws.pipeline.root.join(&out);
            remove_path(&path).map_err(|e| PipeError::io_at(&path, "remove", e))?;
        }
        ws.lock.stages.remove(&stage.name);
        cleaned.push(stage.name.clone());
    }
    if targets.is_empty() {
        for leftover in [".tmp", ".scratch", ".logs"] {
            let path = artifacts.join(leftover);
            remove_path(&path).map_err(|e| PipeError::io_at(&path, "remove", e))?;
        }
    }
    ws.lock.format = lock::LOCK_FORMAT;
    lock::write_indexed(&ws.lock_path, &ws.lock, Some(&lock_index(&ws.pipeline)))?;
    Ok(cleaned)
}

/// Drops cached runs (and their files) that the current lock does not reference, plus
/// leftovers of interrupted runs.
pub fn gc(ws: &Workspace) -> Result<crate::cache::GcReport, PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let _guard = RunGuard::acquire(&artifacts)?;
    check_inside(&ws.pipeline, [], &ENGINE_FOLDERS)?;
    recover_crashed_run(&artifacts, crate::output::warn_line)?;
    let keep = ws
        .lock
        .stages
        .values()
        .map(|e| e.fingerprint.clone())
        .collect();
    let mut report = RunCache::new(&artifacts).gc(&keep).map_err(|e| {
        PipeError::io(
            format!("cannot collect {}", artifacts.join(".cache").display()),
            e,
        )
    })?;
    let tmp = artifacts.join(".tmp");
    remove_path(&tmp).map_err(|e| PipeError::io_at(&tmp, "remove", e))?;
    // Checkpoints of trainings abandoned for other params or inputs: only the ones a run of
    // the pipeline as it stands could resume are kept.
    let resumable: BTreeSet<String> = status(ws)?
        .into_iter()
        .filter_map(|s| Some(scratch_name(&s.stage, &s.current_fingerprint?)))
        .collect();
    let scratch = artifacts.join(".scratch");
    if let Ok(dirs) = std::fs::read_dir(&scratch) {
        for dir in dirs.flatten() {
            if !resumable.contains(&*dir.file_name().to_string_lossy()) {
                let path = dir.path();
                remove_path(&path).map_err(|e| PipeError::io_at(&path, "remove", e))?;
                report.scratch_removed += 1;
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    //! Built-in stages through the real scheduler, with a test-only kind (the real kinds
    //! live in fmnist-stages and are wired in by the registry).
    use super::*;
    use crate::registry::{builtin, Registry};
    use fmnist_stages::Metrics;

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
        if params.cancel {
            return Err(Cancelled.into());
        }
        anyhow::ensure!(!params.fail, "asked to fail");
        Ok(serde_json::json!({ "chars": body.len(), "seed": ctx.seed, "device": ctx.device }))
    }

    fn registry() -> Registry {
        Registry::from_kinds([builtin::<Params, std::convert::Infallible>(
            "echo",
            VERSION,
            run_echo,
            &["log"],
            |_| Ok(()),
        )])
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
            let mut ws = self.load(sets)?;
            let opts = RunOptions {
                targets: vec![],
                force: false,
                dry_run: false,
                jobs: 2,
            };
            run(&mut ws, &opts, &Console::new(), &AtomicBool::new(false))
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
        assert_eq!(gen.outs.len(), 1);
        assert_eq!(gen.outs[0].path, "artifacts/gen/out.txt");
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
}
