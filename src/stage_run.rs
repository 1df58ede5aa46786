//! One stage, decided and done: assess it against the lock now that its upstream stages
//! have finished, restore it from the cache or hand its work to the runner, check and
//! publish what it wrote, and describe the result as the lock entry to record. Runs on a
//! scheduler worker and writes nothing shared: recording is the caller's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use fmnist_stages::{Input, StageContext};

use crate::cache::{Cache, Hit};
use crate::config::{Body, Stage, ARTIFACTS_DIR};
use crate::lock::{self, LockEntry};
use crate::manifest::{self, FileRecord, MISSING};
use crate::plan::{self, Assessment, Decision, UpstreamHashes};
use crate::progress::Console;
use crate::publish::{publish_dir, remove_path, temp_dir, Backup};
use crate::reason;
use crate::runner::{io_fail, Ran, Runners, StageEnd, Work};
use crate::workspace::Workspace;

/// What happened to one stage.
pub enum Outcome {
    UpToDate {
        entry: LockEntry,
        refreshed: bool,
    },
    Restored {
        entry: LockEntry,
        from: &'static str,
    },
    Ran {
        entry: LockEntry,
        took: Duration,
    },
    Failed(String),
    /// Refused as configured (exit 2 once the run ends).
    Refused(String),
    Interrupted,
}

/// What every stage of a run shares.
pub struct Env<'a> {
    pub ws: &'a Workspace,
    pub runners: &'a Runners,
    pub cache: &'a dyn Cache,
    pub console: &'a Console,
    pub cancel: &'a AtomicBool,
    pub forced: &'a BTreeSet<usize>,
}

/// A finished upstream stage, as its consumers see it.
#[derive(Clone)]
pub struct Published {
    pub outs_hash: String,
    pub fingerprint: String,
}

/// Decides stage `i` and carries the decision out.
pub fn process(
    env: &Env,
    i: usize,
    entry: Option<LockEntry>,
    upstream: &BTreeMap<String, Published>,
) -> Outcome {
    let stage = &env.ws.pipeline.stages[i];
    let hashes: UpstreamHashes = upstream
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.outs_hash.clone())))
        .collect();
    let mut assessment = match plan::assess(&env.ws.pipeline, stage, entry.as_ref(), &hashes) {
        Ok(a) => a,
        Err(reason) => return Outcome::Failed(reason.to_string()),
    };
    tracing::debug!(stage = %stage.name, fingerprint = %assessment.fingerprint, reasons = ?assessment.reasons, "assessed");
    let decision = plan::decide(&mut assessment, env.forced.contains(&i), Some(env.cache));
    let reasons = match decision {
        Decision::UpToDate { outs } => {
            let Some(entry) = entry else {
                return Outcome::Failed("up to date without a lock entry (a bug)".into());
            };
            let refreshed = entry.outs != outs;
            return Outcome::UpToDate {
                entry: LockEntry { outs, ..entry },
                refreshed,
            };
        }
        Decision::Restore { hit, reasons } => match restore_outputs(env.ws, env.cache, stage, &hit)
        {
            Ok(outs) => {
                let from = hit.from;
                let entry = LockEntry {
                    outs,
                    deps: assessment.deps,
                    upstream: assessment.upstream,
                    ..hit.entry
                };
                return Outcome::Restored { entry, from };
            }
            Err(e) => {
                env.console.line(&format!(
                    "warning: {}: cannot restore from the {} ({e}); running it instead",
                    stage.name, hit.from
                ));
                reasons
            }
        },
        Decision::Run(reasons) => reasons,
    };
    if let Some(missing) = assessment.deps.iter().find(|r| r.blake3 == MISSING) {
        return Outcome::Failed(format!("dep `{}` does not exist", missing.path));
    }
    env.console.line(&format!(
        "{}: running{}",
        stage.name,
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reason::joined(&reasons))
        }
    ));
    let started = Instant::now();
    let result = match &stage.body {
        Body::Builtin { kind, table, .. } => {
            let keys = RunKeys {
                fingerprint: &assessment.fingerprint,
                lineage: assessment.lineage.as_deref(),
            };
            run_builtin(env, stage, kind, table, keys, upstream)
        }
        Body::Command { cmd, outs, .. } => run_command(env, stage, cmd, outs),
    };
    match result {
        Ok((outs, ran)) => {
            let took = started.elapsed();
            let entry = new_entry(env, stage, assessment, outs, ran, took);
            // Kept (and pushed, with a remote) here on the stage's worker: a slow upload
            // holds up no other stage.
            if let Err(e) = env.cache.store(&env.ws.pipeline.root, &entry) {
                env.console.line(&format!(
                    "warning: {}: could not store outputs in the run cache: {e}",
                    stage.name
                ));
            }
            Outcome::Ran { entry, took }
        }
        Err(StageEnd::Failed(msg)) => Outcome::Failed(msg),
        Err(StageEnd::Refused(msg)) => Outcome::Refused(msg),
        Err(StageEnd::Interrupted) => Outcome::Interrupted,
    }
}

/// The lock entry of a run that just finished.
fn new_entry(
    env: &Env,
    stage: &Stage,
    assessment: Assessment,
    outs: Vec<FileRecord>,
    ran: Ran,
    took: Duration,
) -> LockEntry {
    let metrics = &ran.metrics;
    let pipeline = &env.ws.pipeline;
    let builtin = stage.is_builtin();
    LockEntry {
        kind: stage.kind_name().to_string(),
        version: stage.version(),
        fingerprint: assessment.fingerprint,
        outs_hash: stage.outputs_digest(&outs),
        // The device the stage reports it used ("auto" resolved), else the one asked for.
        device: builtin.then(|| {
            metrics
                .get("device")
                .and_then(|d| d.as_str())
                .map_or_else(|| pipeline.device.clone(), str::to_string)
        }),
        kernels: builtin.then(|| pipeline.kernels.to_string()),
        placed: ran.placed,
        seed: builtin.then_some(pipeline.seed),
        seconds: (took.as_secs_f64() * 1000.0).round() / 1000.0,
        finished: Some(crate::clock::now_utc()),
        params: lock::json_to_table(&stage.hashed_params),
        upstream: assessment.upstream,
        metrics: lock::json_to_table(metrics),
        deps: assessment.deps,
        outs,
    }
}

/// The folder under artifacts/.cache holding the continuation folders.
pub const CONTINUE_DIR: &str = "continue";

/// A stage's folder under artifacts/.scratch (checkpoints), one per fingerprint.
pub fn scratch_name(stage: &str, fingerprint: &str) -> String {
    format!("{stage}-{}", &fingerprint[..16.min(fingerprint.len())])
}

/// The folder under artifacts/.cache/continue shared by the runs of one lineage (see
/// `fingerprint::lineage`): end states that longer runs continue from.
pub fn continue_name(lineage: &str) -> String {
    lineage[..32.min(lineage.len())].to_string()
}

/// The keys a built-in stage's folders are named by.
#[derive(Clone, Copy)]
struct RunKeys<'a> {
    fingerprint: &'a str,
    lineage: Option<&'a str>,
}

/// Workspace-relative form of a path under the root, `/`-separated.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default()
}

/// A built-in stage: runs into a temp folder, published by one rename on success.
fn run_builtin(
    env: &Env,
    stage: &Stage,
    kind: &str,
    table: &toml::Table,
    keys: RunKeys,
    upstream: &BTreeMap<String, Published>,
) -> Result<(Vec<FileRecord>, Ran), StageEnd> {
    let pipeline = &env.ws.pipeline;
    let artifacts = pipeline.artifacts();
    let implementation = env
        .ws
        .registry
        .get(kind)
        .ok_or_else(|| StageEnd::Failed(format!("unknown kind `{kind}`")))?;
    let out_dir = temp_dir(&artifacts, &stage.name, "out");
    std::fs::create_dir_all(&out_dir).map_err(io_fail("create", &out_dir))?;
    let scratch_dir = artifacts
        .join(".scratch")
        .join(scratch_name(&stage.name, keys.fingerprint));
    std::fs::create_dir_all(&scratch_dir).map_err(io_fail("create", &scratch_dir))?;
    let continue_dir = match keys.lineage {
        Some(lineage) => {
            let dir = artifacts
                .join(".cache")
                .join(CONTINUE_DIR)
                .join(continue_name(lineage));
            std::fs::create_dir_all(&dir).map_err(io_fail("create", &dir))?;
            Some(dir)
        }
        None => None,
    };
    let inputs: Vec<Input> = stage
        .needs
        .iter()
        .filter_map(|need| {
            let up = pipeline.stage(need)?;
            let dir = match up.body {
                Body::Builtin { .. } => artifacts.join(&up.name),
                // A command stage's outputs are workspace paths; hand over the workspace.
                Body::Command { .. } => pipeline.root.clone(),
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
    let progress = env.console.stage(&stage.name);
    let ctx = StageContext {
        name: &stage.name,
        inputs: &inputs,
        out_dir: &out_dir,
        scratch_dir: &scratch_dir,
        continue_dir: continue_dir.as_deref(),
        device: &pipeline.device,
        kernels: pipeline.kernels,
        seed: pipeline.seed,
        progress: &progress,
        cancel: env.cancel,
    };
    let work = Work::Builtin {
        kind: implementation,
        table,
        ctx,
    };
    let runner = env.runners.for_executor(stage.executor_in(pipeline));
    let ran = match runner.run(&stage.name, &stage.resources, work) {
        Ok(ran) => ran,
        Err(end) => {
            let _ = remove_path(&out_dir);
            return Err(end);
        }
    };
    let shown = format!("{ARTIFACTS_DIR}/{}", stage.name);
    let staged = relative(&pipeline.root, &out_dir);
    let outs = manifest::scan_as(&pipeline.root, [(staged.as_str(), shown.as_str())], &[])
        .map_err(io_fail("read", &out_dir))?;
    publish_dir(&artifacts, &stage.name, &out_dir)
        .map_err(io_fail("publish", &artifacts.join(&stage.name)))?;
    let _ = remove_path(&scratch_dir);
    Ok((outs, ran))
}

/// A command stage: its declared outputs moved aside (journaled), the command run in
/// place, the previous outputs put back unless it succeeds and writes every one of them.
fn run_command(
    env: &Env,
    stage: &Stage,
    cmd: &str,
    outs: &[String],
) -> Result<(Vec<FileRecord>, Ran), StageEnd> {
    let root = &env.ws.pipeline.root;
    let artifacts = env.ws.pipeline.artifacts();
    let logs = artifacts.join(".logs");
    std::fs::create_dir_all(&logs).map_err(io_fail("create", &logs))?;
    let log = logs.join(format!("{}.log", stage.name));
    let mut backup = Backup::take_for_command(root, &artifacts, &stage.name, outs)
        .map_err(|e| StageEnd::Failed(format!("cannot move previous outputs aside: {e}")))?;
    for out in outs {
        if let Some(parent) = root.join(out).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
    }
    let progress = env.console.stage(&stage.name);
    let work = Work::Command {
        root,
        cmd,
        log: &log,
        backup: &mut backup,
        progress: &progress,
        cancel: env.cancel,
    };
    let runner = env
        .runners
        .for_executor(stage.executor_in(&env.ws.pipeline));
    let checked = runner
        .run(&stage.name, &stage.resources, work)
        .and_then(|ran| {
            let records = manifest::scan(root, outs, &[])
                .map_err(|e| StageEnd::Failed(format!("cannot read outputs: {e}")))?;
            match records.iter().find(|r| r.blake3 == MISSING) {
                Some(missing) => Err(StageEnd::Failed(format!(
                    "the command did not write its declared output `{}`",
                    missing.path
                ))),
                None => Ok((records, ran)),
            }
        });
    match checked {
        Ok(done) => {
            backup.discard();
            Ok(done)
        }
        Err(end) => {
            backup.restore();
            Err(end)
        }
    }
}

/// Puts a cached run's outputs in place (from `cache`, which verifies every file); returns
/// their records as now on disk. Nothing changes unless every file could be had.
pub fn restore_outputs(
    ws: &Workspace,
    cache: &dyn Cache,
    stage: &Stage,
    hit: &Hit,
) -> std::io::Result<Vec<FileRecord>> {
    let root = &ws.pipeline.root;
    let artifacts = ws.pipeline.artifacts();
    let cached = hit.entry.outs.iter().filter(|r| r.blake3 != MISSING);
    match &stage.body {
        Body::Builtin { .. } => {
            let shown = format!("{ARTIFACTS_DIR}/{}", stage.name);
            let staged = temp_dir(&artifacts, &stage.name, "restore");
            std::fs::create_dir_all(&staged)?;
            let filled = (|| {
                for r in cached {
                    let inner = r
                        .path
                        .strip_prefix(&shown)
                        .unwrap_or(&r.path)
                        .trim_start_matches('/');
                    cache.materialize(hit, r, &staged.join(inner))?;
                }
                let staged_rel = relative(root, &staged);
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
                for r in cached {
                    cache.materialize(hit, r, &root.join(&r.path))?;
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
