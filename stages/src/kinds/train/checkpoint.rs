//! The train stage's checkpoints in the scratch folder: after each epoch the model and
//! optimizer state, recorded with their size and blake3 in `checkpoint.json` next to the one
//! before; on resume a damaged latest checkpoint is discarded with a warning for the one
//! before it.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::outputs::{EpochRecord, EpochTiming};
use super::{Params, VERSION};
use crate::context::StageContext;
use crate::learner::Learner;
use crate::models;

/// What `checkpoint.json` in the scratch folder records: the run it belongs to and its last
/// (at most two) epoch checkpoints, oldest first, each with the size and blake3 of its files,
/// so that a damaged latest checkpoint falls back to the one before it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CheckpointMeta {
    /// [`CHECKPOINT_FORMAT`]; format 1 (no `format` field) recorded no hashes.
    format: u32,
    version: u32,
    params: Params,
    seed: u64,
    checkpoints: Vec<Checkpoint>,
}

/// The state after `epochs_done` epochs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    epochs_done: usize,
    pub(super) history: Vec<EpochRecord>,
    /// Each epoch's time (kept out of `history`, as timings.json is out of history.json).
    #[serde(default)]
    pub(super) timings: Vec<EpochTiming>,
    model: FileRecord,
    optimizer: FileRecord,
}

/// A checkpoint file (a name in the scratch folder) as it was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileRecord {
    file: String,
    size: u64,
    blake3: String,
}

const CHECKPOINT_META: &str = "checkpoint.json";
const CHECKPOINT_FORMAT: u32 = 2;

/// The names of the model and optimizer files of the checkpoint after `epochs_done` epochs.
fn checkpoint_names(epochs_done: usize) -> (String, String) {
    (
        format!("epoch-{epochs_done}.model.safetensors"),
        format!("epoch-{epochs_done}.optimizer.safetensors"),
    )
}

/// Flushes a written file to the disk.
fn sync_file(path: &Path) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("flushing {}", path.display()))
}

/// Best effort: makes renames in `dir` durable (not possible everywhere, e.g. on Windows).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes the checkpoint file `name` in `dir` through a temporary name, flushed, and returns
/// its size and hash as they are on the disk.
fn write_checkpoint_file(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<FileRecord> {
    let tmp = dir.join(format!("{name}.tmp"));
    write(&tmp)?;
    let bytes = std::fs::read(&tmp).with_context(|| format!("reading back {}", tmp.display()))?;
    sync_file(&tmp)?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(FileRecord {
        file: name.to_string(),
        size: bytes.len() as u64,
        blake3: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// Writes the model and optimizer state after an epoch, then (atomically) the metadata that
/// records them next to the previous checkpoint, then deletes older checkpoint files: an
/// interruption at any moment, or damage to the newest files, leaves a usable checkpoint.
pub(super) fn save_checkpoint(
    params: &Params,
    seed: u64,
    dir: &Path,
    state: &Learner,
    history: &[EpochRecord],
    timings: &[EpochTiming],
    last: &mut Option<Checkpoint>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let epochs_done = history.len();
    let (model_name, optim_name) = checkpoint_names(epochs_done);
    let model = write_checkpoint_file(dir, &model_name, |path| {
        models::save_varmap(&state.varmap, path)
    })?;
    let optim_state: HashMap<String, Tensor> = state.optimizer.state()?.into_iter().collect();
    let optimizer = write_checkpoint_file(dir, &optim_name, |path| {
        candle_core::safetensors::save(&optim_state, path)
            .with_context(|| format!("writing {}", path.display()))
    })?;
    let current = Checkpoint {
        epochs_done,
        history: history.to_vec(),
        timings: timings.to_vec(),
        model,
        optimizer,
    };
    let previous = last.as_ref().filter(|c| c.epochs_done < epochs_done);
    let meta = CheckpointMeta {
        format: CHECKPOINT_FORMAT,
        version: VERSION,
        params: params.clone(),
        seed,
        checkpoints: previous.cloned().into_iter().chain([current]).collect(),
    };
    let meta_path = dir.join(CHECKPOINT_META);
    let tmp = dir.join(format!("{CHECKPOINT_META}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&meta)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, &meta_path)
        .with_context(|| format!("writing {}", meta_path.display()))?;
    sync_dir(dir);
    remove_unrecorded_checkpoints(dir, &meta.checkpoints);
    *last = meta.checkpoints.into_iter().last();
    Ok(())
}

/// Deletes the checkpoint files in `dir` that `kept` does not name (older epochs, leftovers
/// of an interrupted write or of an older format). Best effort: a leftover only costs disk
/// space.
fn remove_unrecorded_checkpoints(dir: &Path, kept: &[Checkpoint]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let ours = name.starts_with("epoch-")
            && (name.ends_with(".safetensors") || name.ends_with(".safetensors.tmp"));
        let recorded = kept
            .iter()
            .any(|c| c.model.file == name || c.optimizer.file == name);
        if ours && !recorded {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Where training picks up: the state to train from, the epochs behind it, and the scratch
/// checkpoint it came from (None when it came from elsewhere or from the start), which the
/// next scratch checkpoint keeps as its fallback.
pub(super) struct Resumed {
    pub(super) learner: Learner,
    pub(super) history: Vec<EpochRecord>,
    pub(super) timings: Vec<EpochTiming>,
    pub(super) scratch_checkpoint: Option<Checkpoint>,
}

/// The state to train from: the newest good checkpoint of this very run in the scratch
/// folder (an interrupted run), or, when further along, the end state of the furthest
/// shorter run of the same lineage in the continuation folder (same params but fewer
/// epochs): the first epochs of this run are that whole run, as every epoch's draws and
/// learning rate depend on its index alone. A checkpoint whose files are missing, truncated,
/// changed (size or blake3 differ from `checkpoint.json`) or do not load is discarded with a
/// warning to the user, and the one before it is tried. Only a failure to build the initial
/// state is an error.
pub(super) fn resume(
    params: &Params,
    seed: u64,
    device: &Device,
    ctx: &StageContext,
) -> anyhow::Result<Resumed> {
    let warn = |msg: &str| {
        tracing::warn!("{msg}");
        ctx.progress.println(&format!("warning: {msg}"));
    };
    let fresh = || Learner::init(params.model, seed, device, DType::F32, &params.optimizer);
    let from_start = "training starts from the first epoch";
    let interrupted = load_newest(
        ctx.scratch_dir,
        params,
        seed,
        device,
        &fresh,
        &warn,
        from_start,
    )?;
    let done = interrupted.as_ref().map_or(0, |(_, c)| c.epochs_done);
    if let Some(continue_dir) = ctx.continue_dir {
        for epochs in end_states(continue_dir)
            .into_iter()
            .filter(|&n| n > done && n <= params.epochs)
        {
            let shorter = Params {
                epochs,
                ..params.clone()
            };
            let dir = continue_dir.join(end_state_name(epochs));
            let Some((learner, checkpoint)) = load_newest(
                &dir,
                &shorter,
                seed,
                device,
                &fresh,
                &warn,
                "not continuing from that run",
            )?
            else {
                continue;
            };
            if checkpoint.epochs_done != epochs {
                continue;
            }
            let mut history = checkpoint.history;
            // The shorter run evaluated its last epoch; this one evaluates only its own last
            // unless it evaluates every epoch.
            if !params.eval_every_epoch && epochs < params.epochs {
                if let Some(last) = history.last_mut() {
                    last.test_loss = None;
                    last.test_accuracy = None;
                }
            }
            ctx.progress.println(&format!(
                "continuing from the end of an earlier {epochs}-epoch run with the same params ({}): {} of {} epochs to train",
                dir.display(),
                params.epochs - epochs,
                params.epochs
            ));
            return Ok(Resumed {
                learner,
                history,
                timings: checkpoint.timings,
                scratch_checkpoint: None,
            });
        }
    }
    Ok(match interrupted {
        Some((learner, checkpoint)) => {
            ctx.progress.println(&format!(
                "resuming after epoch {}/{} from {}",
                checkpoint.epochs_done,
                params.epochs,
                ctx.scratch_dir.display()
            ));
            Resumed {
                learner,
                history: checkpoint.history.clone(),
                timings: checkpoint.timings.clone(),
                scratch_checkpoint: Some(checkpoint),
            }
        }
        None => Resumed {
            learner: fresh()?,
            history: Vec::new(),
            timings: Vec::new(),
            scratch_checkpoint: None,
        },
    })
}

/// The newest good checkpoint in `dir` of a run with exactly these params and seed, loaded
/// into a fresh state, trying older ones (with a warning) when it is damaged; the warning
/// that none is usable ends with `instead` (what happens then).
fn load_newest(
    dir: &Path,
    params: &Params,
    seed: u64,
    device: &Device,
    fresh: &dyn Fn() -> candle_core::Result<Learner>,
    warn: &dyn Fn(&str),
    instead: &str,
) -> anyhow::Result<Option<(Learner, Checkpoint)>> {
    let give_up = |msg: &str| warn(&format!("{msg}; {instead}"));
    let Some(mut meta) = read_checkpoint_meta(params, seed, dir, &give_up) else {
        return Ok(None);
    };
    meta.checkpoints.sort_by_key(|c| c.epochs_done);
    for (i, checkpoint) in meta.checkpoints.iter().enumerate().rev() {
        let mut state = fresh()?;
        match restore(checkpoint, params, dir, device, &mut state) {
            Ok(()) => return Ok(Some((state, checkpoint.clone()))),
            Err(problem) => {
                let discarding = format!(
                    "discarding the checkpoint after epoch {}: {problem}",
                    checkpoint.epochs_done
                );
                match i.checked_sub(1).map(|j| &meta.checkpoints[j]) {
                    Some(c) => warn(&format!(
                        "{discarding}; falling back to the one after epoch {}",
                        c.epochs_done
                    )),
                    None => give_up(&discarding),
                }
            }
        }
    }
    Ok(None)
}

/// The folder in the continuation folder holding the end state of an `epochs`-epoch run.
fn end_state_name(epochs: usize) -> String {
    format!("epochs-{epochs}")
}

/// The epoch counts of the end states in `dir`, furthest first.
fn end_states(dir: &Path) -> Vec<usize> {
    let mut found: Vec<usize> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("epochs-")?
                .parse()
                .ok()
        })
        .collect();
    found.sort_unstable_by(|a, b| b.cmp(a));
    found
}

/// Leaves the end state of a finished run in the continuation folder for longer runs of
/// the same lineage: written whole under a temporary name, then renamed into place, so a
/// concurrent reader sees all of it or none. An end state already there (the same run,
/// deterministic) is kept.
pub(super) fn save_end_state(
    params: &Params,
    seed: u64,
    continue_dir: &Path,
    state: &Learner,
    history: &[EpochRecord],
    timings: &[EpochTiming],
) -> anyhow::Result<()> {
    let target = continue_dir.join(end_state_name(history.len()));
    if target.join(CHECKPOINT_META).is_file() {
        return Ok(());
    }
    let tmp = continue_dir.join(format!(
        ".{}.{}.tmp",
        end_state_name(history.len()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    let written =
        save_checkpoint(params, seed, &tmp, state, history, timings, &mut None).and_then(|()| {
            std::fs::rename(&tmp, &target)
                .with_context(|| format!("moving {} into place", target.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if written.is_err() && target.join(CHECKPOINT_META).is_file() {
        // Another run of the same lineage got there first.
        return Ok(());
    }
    written
}

/// `checkpoint.json` in `dir` when it belongs to this run; anything else (none, unreadable,
/// an older format without hashes, another run's) is None, with a warning unless absent.
fn read_checkpoint_meta(
    params: &Params,
    seed: u64,
    dir: &Path,
    warn: &dyn Fn(&str),
) -> Option<CheckpointMeta> {
    let path = dir.join(CHECKPOINT_META);
    let ignored = |why: String| {
        warn(&format!("ignoring {}: {why}", path.display()));
        None
    };
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return ignored(format!("cannot read it ({e})")),
    };
    let value: serde_json::Value = match serde_json::from_slice(&text) {
        Ok(v) => v,
        Err(e) => return ignored(format!("not valid JSON ({e})")),
    };
    match value.get("format").map(|f| f.as_u64()) {
        Some(Some(f)) if f == u64::from(CHECKPOINT_FORMAT) => {}
        None => return ignored("written in an older format without checksums".into()),
        Some(f) => {
            return ignored(format!(
                "unknown format {} (expected {CHECKPOINT_FORMAT})",
                f.map_or("?".to_string(), |f| f.to_string())
            ))
        }
    }
    let meta: CheckpointMeta = match serde_json::from_value(value) {
        Ok(m) => m,
        Err(e) => return ignored(format!("unreadable ({e})")),
    };
    if meta.version != VERSION || &meta.params != params || meta.seed != seed {
        return ignored("it belongs to a run with other params, seed or stage version".into());
    }
    Some(meta)
}

/// Verifies a checkpoint's files and loads them into `state`; the error says which file is
/// wrong and how. `state` may be partly overwritten when this fails.
fn restore(
    checkpoint: &Checkpoint,
    params: &Params,
    dir: &Path,
    device: &Device,
    state: &mut Learner,
) -> Result<(), String> {
    let (model_name, optim_name) = checkpoint_names(checkpoint.epochs_done);
    if !(1..=params.epochs).contains(&checkpoint.epochs_done)
        || checkpoint.history.len() != checkpoint.epochs_done
        || checkpoint.model.file != model_name
        || checkpoint.optimizer.file != optim_name
    {
        return Err(format!(
            "its entry in {} is inconsistent",
            dir.join(CHECKPOINT_META).display()
        ));
    }
    let model_path = dir.join(&model_name);
    let optim_path = dir.join(&optim_name);
    let model_bytes = read_verified(&model_path, &checkpoint.model)?;
    let optim_bytes = read_verified(&optim_path, &checkpoint.optimizer)?;
    let in_file = |path: &Path| {
        let path = path.display().to_string();
        move |e: candle_core::Error| format!("{path} does not load: {e}")
    };
    let tensors = candle_core::safetensors::load_buffer(&model_bytes, device)
        .map_err(in_file(&model_path))?;
    let optim_state = candle_core::safetensors::load_buffer(&optim_bytes, device)
        .map_err(in_file(&optim_path))?;
    // Check every variable before overwriting any.
    let mut values = Vec::new();
    for (name, var) in state
        .varmap
        .data()
        .lock()
        .map_err(|e| e.to_string())?
        .iter()
    {
        let value = tensors
            .get(name)
            .ok_or_else(|| format!("{} has no tensor `{name}`", model_path.display()))?;
        if value.dims() != var.dims() {
            return Err(format!(
                "{}: tensor `{name}` has shape {:?}, the model's is {:?}",
                model_path.display(),
                value.dims(),
                var.dims()
            ));
        }
        values.push((
            var.clone(),
            value.to_dtype(var.dtype()).map_err(in_file(&model_path))?,
        ));
    }
    for (var, value) in values {
        var.set(&value).map_err(in_file(&model_path))?;
    }
    state
        .optimizer
        .load_state(&optim_state)
        .map_err(in_file(&optim_path))
}

/// The bytes of a checkpoint file when its size and blake3 are those recorded.
fn read_verified(path: &Path, record: &FileRecord) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{} is missing", path.display()),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    let size = bytes.len() as u64;
    if size != record.size {
        return Err(format!(
            "{} is {size} bytes, {CHECKPOINT_META} recorded {}{}",
            path.display(),
            record.size,
            if size < record.size {
                " (truncated)"
            } else {
                ""
            }
        ));
    }
    let hash = blake3::hash(&bytes).to_hex();
    if hash.as_str() != record.blake3 {
        return Err(format!(
            "{} was changed or damaged after it was written (blake3 {hash}, {CHECKPOINT_META} recorded {})",
            path.display(),
            record.blake3
        ));
    }
    Ok(bytes)
}
