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

/// Restores the newest good checkpoint of a run with these params and seed from the scratch
/// folder. A checkpoint whose files are missing, truncated, changed (size or blake3 differ
/// from `checkpoint.json`) or do not load is discarded with a warning to the user, and the one
/// before it is tried. Returns the state to train from and the checkpoint it holds (None:
/// from the start). Only a failure to build the initial state is an error.
pub(super) fn resume(
    params: &Params,
    seed: u64,
    device: &Device,
    ctx: &StageContext,
) -> anyhow::Result<(Learner, Option<Checkpoint>)> {
    let warn = |msg: &str| {
        tracing::warn!("{msg}");
        ctx.progress.println(&format!("warning: {msg}"));
    };
    let fresh = || Learner::init(params.model, seed, device, DType::F32, &params.optimizer);
    let mut state = fresh()?;
    let Some(mut meta) = read_checkpoint_meta(params, seed, ctx.scratch_dir, &warn) else {
        return Ok((state, None));
    };
    meta.checkpoints.sort_by_key(|c| c.epochs_done);
    for (i, checkpoint) in meta.checkpoints.iter().enumerate().rev() {
        match restore(checkpoint, params, ctx.scratch_dir, device, &mut state) {
            Ok(()) => return Ok((state, Some(checkpoint.clone()))),
            Err(problem) => {
                let next = match i.checked_sub(1).map(|j| &meta.checkpoints[j]) {
                    Some(c) => format!("falling back to the one after epoch {}", c.epochs_done),
                    None => "training starts from the first epoch".to_string(),
                };
                warn(&format!(
                    "discarding the checkpoint after epoch {}: {problem}; {next}",
                    checkpoint.epochs_done
                ));
                // The failed load may have overwritten part of the state.
                state = fresh()?;
            }
        }
    }
    Ok((state, None))
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
        warn(&format!(
            "ignoring {}: {why}; training starts from the first epoch",
            path.display()
        ));
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
