//! Housekeeping commands: `clean` (outputs and lock entries gone, the run cache keeps a
//! copy) and `gc` (cached runs and checkpoints nothing refers to any more).

use std::collections::BTreeSet;

use crate::cache::RunCache;
use crate::error::PipeError;
use crate::lock;
use crate::plan;
use crate::publish::remove_path;
use crate::stage_run::{continue_name, scratch_name, CONTINUE_DIR};
use crate::workspace::{self, RunGuard, Workspace, ENGINE_FOLDERS};

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
    workspace::check_inside(&ws.pipeline, chosen.iter().copied(), &ENGINE_FOLDERS)?;
    workspace::recover_crashed_run(&artifacts, crate::output::warn_line)?;
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
    lock::write_indexed(
        &ws.lock_path,
        &ws.lock,
        Some(&workspace::lock_index(&ws.pipeline)),
    )?;
    Ok(cleaned)
}

/// Drops cached runs (and their files) that the current lock does not reference, plus
/// leftovers of interrupted runs.
pub fn gc(ws: &Workspace) -> Result<crate::cache::GcReport, PipeError> {
    gc_keeping(ws, &[], false)
}

/// [`gc`], keeping the cached runs of these fingerprints too, and with `all_continuations`
/// every end state a longer run could continue from (`gc --all-experiments`).
pub fn gc_keeping(
    ws: &Workspace,
    also: &[String],
    all_continuations: bool,
) -> Result<crate::cache::GcReport, PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let _guard = RunGuard::acquire(&artifacts)?;
    workspace::check_inside(&ws.pipeline, [], &ENGINE_FOLDERS)?;
    workspace::recover_crashed_run(&artifacts, crate::output::warn_line)?;
    let keep = ws
        .lock
        .stages
        .values()
        .map(|e| e.fingerprint.clone())
        .chain(also.iter().cloned())
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
    // Likewise the end states longer runs could continue from: those of the pipeline's
    // current lineages are kept, or all of them when asked.
    let planned = plan::plan(ws, None, &BTreeSet::new(), None);
    let resumable: BTreeSet<String> = planned
        .iter()
        .filter_map(|p| {
            let name = &ws.pipeline.stages[p.index].name;
            Some(scratch_name(name, p.fingerprint.as_deref()?))
        })
        .collect();
    report.scratch_removed += remove_unlisted(&artifacts.join(".scratch"), &resumable)?;
    if !all_continuations {
        let continuable: BTreeSet<String> = planned
            .iter()
            .filter_map(|p| Some(continue_name(p.lineage.as_deref()?)))
            .collect();
        let continue_dir = artifacts.join(".cache").join(CONTINUE_DIR);
        report.scratch_removed += remove_unlisted(&continue_dir, &continuable)?;
    }
    Ok(report)
}

/// Deletes the entries of `dir` whose names `keep` lacks; returns how many.
fn remove_unlisted(dir: &std::path::Path, keep: &BTreeSet<String>) -> Result<usize, PipeError> {
    let mut removed = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if !keep.contains(&*entry.file_name().to_string_lossy()) {
                let path = entry.path();
                remove_path(&path).map_err(|e| PipeError::io_at(&path, "remove", e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}
