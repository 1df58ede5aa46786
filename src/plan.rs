//! What must run, and why: every stage assessed against the lock into a [`Decision`]. The
//! scheduler asks it per stage as upstream stages finish (their real output hashes known);
//! `status` and `run --dry-run` ask it for the whole pipeline up front, with the outputs of
//! stages that would run marked unknown. Nothing here writes anything.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::cache::{Cache, Hit};
use crate::config::{Pipeline, Stage};
use crate::fingerprint;
use crate::lock::LockEntry;
use crate::manifest::{self, FileRecord, MISSING};
use crate::reason::{FileSide, Reason, ShownReason};
use crate::workspace::Workspace;

/// Upstream stage -> the content hash of its outputs (None: not known yet, because it would
/// run first).
pub type UpstreamHashes = BTreeMap<String, Option<String>>;

/// A stage's inputs and recorded state, compared.
pub struct Assessment {
    /// The fingerprint the stage has now (with recorded upstream hashes where they are not
    /// known yet).
    pub fingerprint: String,
    /// Its lineage (see [`fingerprint::lineage`]), for kinds with progress params.
    pub lineage: Option<String>,
    pub deps: Vec<FileRecord>,
    /// Upstream stage -> output hash, as they enter the fingerprint.
    pub upstream: BTreeMap<String, String>,
    /// Why it must run; empty when it is up to date.
    pub reasons: Vec<Reason>,
    /// The outputs as found on disk, when the fingerprint matched the lock.
    pub current_outs: Option<Vec<FileRecord>>,
}

/// What to do with one stage.
pub enum Decision {
    /// The lock's entry stands; `outs` are its outputs as on disk now (their times may have
    /// moved, which the lock then records).
    UpToDate {
        outs: Vec<FileRecord>,
    },
    /// Stale, but an earlier run with the same fingerprint is in the cache.
    Restore {
        hit: Box<Hit>,
        reasons: Vec<Reason>,
    },
    Run(Vec<Reason>),
}

/// Compares a stage with its lock entry. `Err` when its deps or outputs cannot be read.
pub fn assess(
    pipeline: &Pipeline,
    stage: &Stage,
    entry: Option<&LockEntry>,
    upstream_hashes: &UpstreamHashes,
) -> Result<Assessment, Reason> {
    let previous_deps = entry.map(|e| e.deps.as_slice()).unwrap_or(&[]);
    let deps = manifest::scan(&pipeline.root, stage.deps(), previous_deps).map_err(|e| {
        Reason::Unreadable {
            side: FileSide::Dep,
            error: e.to_string(),
        }
    })?;
    let mut upstream = BTreeMap::new();
    let mut reasons = Vec::new();
    for need in &stage.needs {
        match upstream_hashes.get(need).cloned().flatten() {
            Some(hash) => {
                upstream.insert(need.clone(), hash);
            }
            None => {
                reasons.push(Reason::UpstreamStale {
                    stage: need.clone(),
                });
                // Assume the last recorded inputs so the stage's own changes still show.
                if let Some(hash) = entry.and_then(|e| e.upstream.get(need)) {
                    upstream.insert(need.clone(), hash.clone());
                }
            }
        }
    }
    let upstream_pending = !reasons.is_empty();
    let deps_digest = manifest::digest(&deps);
    let fingerprint = fingerprint::of_stage(pipeline, stage, &upstream, &deps_digest);
    let lineage = fingerprint::lineage(pipeline, stage, &upstream, &deps_digest);
    let mut assessment = Assessment {
        fingerprint,
        lineage,
        deps,
        upstream,
        reasons,
        current_outs: None,
    };
    let Some(entry) = entry else {
        assessment.reasons.push(Reason::NeverRun);
        return Ok(assessment);
    };
    if entry.fingerprint != assessment.fingerprint {
        why_fingerprint_changed(pipeline, stage, entry, &mut assessment);
        return Ok(assessment);
    }
    if upstream_pending {
        return Ok(assessment);
    }
    let outs = manifest::scan(&pipeline.root, &stage.out_roots(), &entry.outs).map_err(|e| {
        Reason::Unreadable {
            side: FileSide::Output,
            error: e.to_string(),
        }
    })?;
    // Per file, not by the outputs' digest: files kept out of that digest (timings) are
    // still checked against the lock.
    manifest::diff(
        FileSide::Output,
        &entry.outs,
        &outs,
        &mut assessment.reasons,
    );
    let missing = outs.iter().any(|r| r.blake3 == MISSING);
    if missing && assessment.reasons.is_empty() {
        assessment.reasons.push(Reason::OutputsChanged);
    }
    assessment.current_outs = Some(outs);
    Ok(assessment)
}

fn why_fingerprint_changed(
    pipeline: &Pipeline,
    stage: &Stage,
    entry: &LockEntry,
    assessment: &mut Assessment,
) {
    let reasons = &mut assessment.reasons;
    let found_before = reasons.len();
    if entry.kind != stage.kind_name() {
        reasons.push(Reason::KindChanged {
            from: entry.kind.clone(),
            to: stage.kind_name().to_string(),
        });
    } else if entry.version != stage.version() {
        reasons.push(Reason::VersionChanged {
            kind: entry.kind.clone(),
            from: entry.version,
            to: stage.version(),
        });
    }
    fingerprint::diff_params(
        "params",
        &entry.params_json(),
        &stage.hashed_params,
        reasons,
    );
    if stage.is_builtin() && entry.seed != Some(pipeline.seed) {
        reasons.push(Reason::SeedChanged {
            from: entry.seed,
            to: pipeline.seed,
        });
    }
    for (name, hash) in &assessment.upstream {
        if entry.upstream.get(name) != Some(hash) {
            reasons.push(Reason::InputChanged {
                stage: name.clone(),
            });
        }
    }
    for name in entry.upstream.keys() {
        if !assessment.upstream.contains_key(name) {
            reasons.push(Reason::InputRemoved {
                stage: name.clone(),
            });
        }
    }
    manifest::diff(FileSide::Dep, &entry.deps, &assessment.deps, reasons);
    if reasons.len() == found_before {
        reasons.push(Reason::RecipeChanged);
    }
}

/// Turns an assessment into what to do: `forced` runs regardless; a stale stage whose
/// fingerprint the cache knows is restored (when a cache is given and no upstream is
/// pending, so the fingerprint is final).
pub fn decide(assessment: &mut Assessment, forced: bool, cache: Option<&dyn Cache>) -> Decision {
    if !forced && assessment.reasons.is_empty() {
        if let Some(outs) = assessment.current_outs.take() {
            return Decision::UpToDate { outs };
        }
    }
    let pending = assessment
        .reasons
        .iter()
        .any(|r| matches!(r, Reason::UpstreamStale { .. }));
    if !forced && !pending {
        if let Some(hit) = cache.and_then(|c| c.lookup(&assessment.fingerprint)) {
            let reasons = std::mem::take(&mut assessment.reasons);
            return Decision::Restore {
                hit: Box::new(hit),
                reasons,
            };
        }
    }
    let mut reasons = std::mem::take(&mut assessment.reasons);
    if reasons.is_empty() {
        reasons.push(Reason::Forced);
    }
    Decision::Run(reasons)
}

/// One stage in a whole-pipeline plan.
pub struct Planned {
    pub index: usize,
    pub decision: Decision,
    /// The fingerprint the stage has now (None when its files could not be read).
    pub fingerprint: Option<String>,
    /// Its lineage, for kinds with progress params (see [`fingerprint::lineage`]).
    pub lineage: Option<String>,
}

/// Decides every stage in `selected` (all when None), in run order, before anything runs:
/// the outputs of a stage that would run count as unknown downstream.
pub fn plan(
    ws: &Workspace,
    selected: Option<&BTreeSet<usize>>,
    forced: &BTreeSet<usize>,
    cache: Option<&dyn Cache>,
) -> Vec<Planned> {
    let mut hashes: UpstreamHashes = BTreeMap::new();
    let mut planned = Vec::new();
    for &i in &ws.dag.order {
        if selected.is_some_and(|s| !s.contains(&i)) {
            continue;
        }
        let stage = &ws.pipeline.stages[i];
        let entry = ws.lock.stages.get(&stage.name);
        let (decision, fingerprint, lineage) = match assess(&ws.pipeline, stage, entry, &hashes) {
            Ok(mut assessment) => {
                let decision = decide(&mut assessment, forced.contains(&i), cache);
                (decision, Some(assessment.fingerprint), assessment.lineage)
            }
            Err(reason) => (Decision::Run(vec![reason]), None, None),
        };
        let known = match &decision {
            Decision::UpToDate { .. } => entry.map(|e| e.outs_hash.clone()),
            Decision::Restore { hit, .. } => Some(hit.entry.outs_hash.clone()),
            Decision::Run(_) => None,
        };
        hashes.insert(stage.name.clone(), known);
        planned.push(Planned {
            index: i,
            decision,
            fingerprint,
            lineage,
        });
    }
    planned
}

/// One stage's state for `status`.
#[derive(Serialize)]
pub struct StageStatus<'a> {
    pub stage: &'a str,
    pub kind: &'a str,
    /// "up to date" | "stale" | "never run"
    pub state: &'static str,
    /// "up_to_date" | "restore" (the run cache has it) | "run"
    pub decision: &'static str,
    pub reasons: Vec<ShownReason<'a>>,
    /// The fingerprint recorded in the lock (the current one when up to date).
    pub fingerprint: Option<&'a str>,
    /// Where the last recorded run computed, e.g. "cpu/fast" or "cuda:0/portable" (built-in
    /// stages that report a device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<String>,
}

/// The plan of every stage as `status` shows it.
pub fn status<'a>(ws: &'a Workspace, planned: &'a [Planned]) -> Vec<StageStatus<'a>> {
    planned
        .iter()
        .map(|p| {
            let stage = &ws.pipeline.stages[p.index];
            let entry = ws.lock.stages.get(&stage.name);
            let (state, decision, reasons): (_, _, &[Reason]) = match &p.decision {
                Decision::UpToDate { .. } => ("up to date", "up_to_date", &[]),
                Decision::Restore { reasons, .. } => (
                    if entry.is_none() {
                        "never run"
                    } else {
                        "stale"
                    },
                    "restore",
                    reasons,
                ),
                Decision::Run(reasons) => (
                    if entry.is_none() {
                        "never run"
                    } else {
                        "stale"
                    },
                    "run",
                    reasons,
                ),
            };
            let fingerprint = match &p.decision {
                Decision::UpToDate { .. } => p.fingerprint.as_deref(),
                _ => entry.map(|e| e.fingerprint.as_str()),
            };
            StageStatus {
                stage: &stage.name,
                kind: stage.kind_name(),
                state,
                decision,
                reasons: reasons.iter().map(ShownReason::from).collect(),
                fingerprint,
                ran_on: entry.and_then(ran_on),
            }
        })
        .collect()
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
