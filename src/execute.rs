//! `run`: the plan carried out. Takes the workspace's guards, hands the selected stages to
//! the scheduler, each to `stage_run` on a worker, and records every finished stage: a line
//! on the console and in the lock's journal (each stage's worker has already kept its outputs
//! in the run cache, and pushed them with a remote). `--dry-run` only renders the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cache::{Cache, RunCache};
use crate::error::PipeError;
use crate::lock::{self, LockEntry, LockFile};
use crate::plan::{self, Decision};
use crate::progress::{self, Console};
use crate::reason;
use crate::remote::TieredCache;
use crate::runner::Runners;
use crate::schedule::{schedule, Books, Flow};
use crate::stage_run::{self, Env, Outcome, Published};
use crate::workspace::{self, RunGuard, Workspace, ENGINE_FOLDERS};

pub struct RunOptions {
    pub targets: Vec<usize>,
    pub force: bool,
    pub dry_run: bool,
    pub jobs: usize,
}

/// Runs every stale selected stage. Ok when all of them succeeded (or were up to date).
pub fn run(
    ws: &mut Workspace,
    opts: &RunOptions,
    runners: &Runners,
    console: &Console,
    cancel: &AtomicBool,
) -> Result<(), PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let selected = ws.dag.select(&opts.targets);
    let forced: BTreeSet<usize> = match (opts.force, opts.targets.is_empty()) {
        (false, _) => BTreeSet::new(),
        (true, true) => selected.clone(),
        (true, false) => opts.targets.iter().copied().collect(),
    };
    if opts.dry_run {
        // The plan from the local run cache only: a dry run stays offline.
        return dry_run(ws, &selected, &forced, &RunCache::new(&artifacts), console);
    }
    let _guard = RunGuard::acquire(&artifacts)?;
    workspace::recover_crashed_run(&artifacts, |note| console.line(note))?;
    workspace::check_inside(&ws.pipeline, selected.iter().copied(), &ENGINE_FOLDERS)?;

    let local;
    let tiered;
    let cache: &dyn Cache = if ws.pipeline.cache.remote.is_some() {
        tiered = TieredCache::new(&artifacts, &ws.pipeline.cache, console);
        if ws.pipeline.cache.required {
            tiered.check().map_err(remote_required)?;
        }
        &tiered
    } else {
        local = RunCache::new(&artifacts);
        &local
    };
    let lock = take_lock(ws);
    let journal = lock::Journal::open(&ws.lock_path)?;
    let env = Env {
        ws,
        runners,
        cache,
        console,
        cancel,
        forced: &forced,
    };
    let mut recorder = Recorder::new(&env, lock, journal);
    console.start_run(selected.len());
    schedule(
        &ws.dag,
        &selected,
        opts.jobs,
        &mut recorder,
        |i, (entry, upstream)| caught(&env, i, entry, &upstream),
    );
    console.end_run();
    let Recorder {
        lock,
        lock_dirty,
        failures,
        refused,
        interrupted,
        mut lock_error,
        ..
    } = recorder;
    if lock_dirty {
        let index = workspace::lock_index(&ws.pipeline);
        if let Err(e) = lock::write_indexed(&ws.lock_path, &lock, Some(&index)) {
            lock_error.get_or_insert(e);
        }
    }
    ws.lock = lock;
    if let Some(e) = lock_error {
        return Err(e);
    }
    if let Some(message) = cache.failure() {
        return Err(remote_required(message));
    }
    if interrupted || cancel.load(Ordering::Relaxed) {
        return Err(PipeError::Interrupted);
    }
    if let Some(message) = refused {
        return Err(PipeError::Config(message));
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

/// `run --dry-run`: the plan of the selected stages, nothing touched.
fn dry_run(
    ws: &Workspace,
    selected: &BTreeSet<usize>,
    forced: &BTreeSet<usize>,
    cache: &dyn Cache,
    console: &Console,
) -> Result<(), PipeError> {
    for planned in plan::plan(ws, Some(selected), forced, Some(cache)) {
        let name = &ws.pipeline.stages[planned.index].name;
        console.line(&match &planned.decision {
            Decision::UpToDate { .. } => format!("{name}: up to date"),
            Decision::Restore { hit, .. } => format!("{name}: would restore from {}", hit.from),
            Decision::Run(reasons) => {
                format!("{name}: would run ({})", reason::joined(reasons))
            }
        });
    }
    Ok(())
}

/// The run fails because its required remote cache did (exit 1).
fn remote_required(message: String) -> PipeError {
    PipeError::StageFailed(format!(
        "{message}; [cache] required = true, so the run stops (finished stages were recorded)"
    ))
}

/// [`stage_run::process`], a panic turned into a failed stage.
fn caught(
    env: &Env,
    i: usize,
    entry: Option<LockEntry>,
    upstream: &BTreeMap<String, Published>,
) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        stage_run::process(env, i, entry, upstream)
    }))
    .unwrap_or_else(|_| Outcome::Failed("the stage panicked (a bug: please report it)".into()))
}

/// The lock as this run starts from it: stages no longer in the pipeline dropped, in the
/// current format.
fn take_lock(ws: &mut Workspace) -> (LockFile, bool) {
    let mut lock = std::mem::take(&mut ws.lock);
    let known: BTreeSet<&str> = ws.pipeline.stages.iter().map(|s| s.name.as_str()).collect();
    let mut dirty = lock.format != lock::LOCK_FORMAT;
    lock.format = lock::LOCK_FORMAT;
    let before = lock.stages.len();
    lock.stages.retain(|name, _| known.contains(name.as_str()));
    dirty |= lock.stages.len() != before;
    (lock, dirty)
}

/// The run's bookkeeping, on the scheduler's thread: the lock as it grows, what finished,
/// what failed.
struct Recorder<'a> {
    env: &'a Env<'a>,
    lock: LockFile,
    lock_dirty: bool,
    /// Each finished stage is appended to the lock's journal (one line; rewriting the whole
    /// lock per stage made a long pipeline quadratic); the lock is rewritten once, at the
    /// end.
    journal: lock::Journal,
    published: BTreeMap<String, Published>,
    failures: Vec<String>,
    /// A stage refused as configured: the run ends with this config error.
    refused: Option<String>,
    interrupted: bool,
    lock_error: Option<PipeError>,
}

impl<'a> Recorder<'a> {
    fn new(env: &'a Env<'a>, (lock, lock_dirty): (LockFile, bool), journal: lock::Journal) -> Self {
        Recorder {
            env,
            lock,
            lock_dirty,
            journal,
            published: BTreeMap::new(),
            failures: Vec::new(),
            refused: None,
            interrupted: false,
            lock_error: None,
        }
    }
}

type Job = (Option<LockEntry>, BTreeMap<String, Published>);

impl Books<Job, Outcome> for Recorder<'_> {
    /// Stage i's lock entry and its upstream stages as published.
    fn prepare(&mut self, i: usize) -> Job {
        let stage = &self.env.ws.pipeline.stages[i];
        let upstream = stage
            .needs
            .iter()
            .filter_map(|n| self.published.get(n).map(|p| (n.clone(), p.clone())))
            .collect();
        (self.lock.stages.get(&stage.name).cloned(), upstream)
    }

    fn halted(&self) -> bool {
        self.env.cancel.load(Ordering::Relaxed)
    }

    fn finish(&mut self, i: usize, outcome: Outcome) -> Flow {
        let env = self.env;
        let stage = &env.ws.pipeline.stages[i];
        let name = &stage.name;
        let console = env.console;
        console.stage_done();
        let (entry, record) = match outcome {
            Outcome::UpToDate { entry, refreshed } => {
                console.line(&format!("{name}: up to date"));
                (entry, refreshed)
            }
            Outcome::Restored { entry, from } => {
                console.line(&format!("{name}: restored from {from}"));
                (entry, true)
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
                (entry, true)
            }
            Outcome::Failed(message) => {
                console.line(&format!("{name}: FAILED: {message}"));
                self.failures.push(name.clone());
                return Flow::Halt;
            }
            Outcome::Refused(message) => {
                console.line(&format!("{name}: REFUSED: {message}"));
                self.refused
                    .get_or_insert(format!("stage `{name}`: {message}"));
                return Flow::Halt;
            }
            Outcome::Interrupted => {
                console.line(&format!("{name}: interrupted"));
                self.interrupted = true;
                return Flow::Halt;
            }
        };
        self.published.insert(
            name.clone(),
            Published {
                outs_hash: entry.outs_hash.clone(),
                fingerprint: entry.fingerprint.clone(),
            },
        );
        if record {
            if let Err(e) = self.journal.record(name, &entry) {
                self.lock_error = Some(e);
            }
            self.lock.stages.insert(name.clone(), entry);
            self.lock_dirty = true;
        }
        if self.lock_error.is_some() || env.cache.failure().is_some() {
            Flow::Halt
        } else {
            Flow::Unblock
        }
    }
}

/// "key=value ..." of a stage's scalar metrics, for its "done" line.
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

#[cfg(test)]
#[path = "execute_tests.rs"]
mod tests;
