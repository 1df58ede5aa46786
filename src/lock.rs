//! pipeline.lock: what each stage last ran with (fingerprint, params, inputs) and produced
//! (output manifest, metrics). Human-readable TOML in a stable order, written atomically.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::PipeError;
use crate::manifest::FileRecord;

pub const LOCK_FORMAT: u32 = 1;
const HEADER: &str = "# pipeline.lock: written by fmnist-pipe after each stage succeeds. Commit it; do not edit it.\n\n";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    pub format: u32,
    #[serde(default)]
    pub stages: BTreeMap<String, LockEntry>,
}

/// One stage's last successful run. Scalars first: TOML wants them before sub-tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    pub kind: String,
    pub version: u32,
    pub fingerprint: String,
    /// Content hash of all outputs: what downstream fingerprints include (early cutoff).
    pub outs_hash: String,
    /// Recorded, not hashed: where it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Recorded, not hashed: "fast" CPU kernels or the "portable" path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernels: Option<String>,
    /// Recorded, not hashed: the job that ran it when not this machine ("slurm job 42").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub seconds: f64,
    /// Recorded, not hashed: when the run finished (UTC, RFC 3339); kept by a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// The hashed params (canonical; unset options omitted).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub params: toml::Table,
    /// Upstream stage -> its outs_hash when this stage ran.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub metrics: toml::Table,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<FileRecord>,
    #[serde(default)]
    pub outs: Vec<FileRecord>,
}

impl LockEntry {
    pub fn params_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.params).unwrap_or(serde_json::Value::Null)
    }
}

/// The lock file's location beside the pipeline file.
pub fn lock_path(pipeline_file: &Path) -> PathBuf {
    pipeline_file.with_extension("lock")
}

/// Reads the lock, and the journal of a run that ended before rewriting it. A missing lock is
/// empty; a damaged one is reported as a warning and treated as empty, so every stage reads as
/// stale instead of the tool refusing to work. A lock written by a newer fmnist-pipe is refused
/// (exit 2): rewriting it in this version's format would lose what it records.
#[cfg(test)]
pub fn read(path: &Path) -> Result<(LockFile, Option<String>), PipeError> {
    read_indexed(path, None)
}

/// [`read`], taking the lock from `index` (a JSON copy [`write`] keeps) when that copy is of
/// exactly the lock's current bytes: TOML parsing of a 2,000-stage lock took ~100 ms.
pub fn read_indexed(
    path: &Path,
    index: Option<&Path>,
) -> Result<(LockFile, Option<String>), PipeError> {
    let (mut lock, warning) = read_lock(path, index)?;
    let replayed = replay_journal(&journal_path(path), &mut lock);
    Ok((lock, warning.or(replayed)))
}

/// A JSON copy of the lock, valid only for the lock bytes whose blake3 it names.
#[derive(Deserialize)]
struct Index {
    lock_blake3: String,
    lock: LockFile,
}

fn from_index(index: &Path, text: &str) -> Option<LockFile> {
    let bytes = std::fs::read(index).ok()?;
    let index: Index = serde_json::from_slice(&bytes).ok()?;
    let current = blake3::hash(text.as_bytes()).to_hex();
    (index.lock_blake3 == current.as_str() && index.lock.format == LOCK_FORMAT)
        .then_some(index.lock)
}

fn read_lock(path: &Path, index: Option<&Path>) -> Result<(LockFile, Option<String>), PipeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((LockFile::default(), None))
        }
        Err(e) => {
            return Ok((
                LockFile::default(),
                Some(format!(
                    "cannot read {}: {e}; treating every stage as stale",
                    path.display()
                )),
            ))
        }
    };
    if let Some(lock) = index.and_then(|i| from_index(i, &text)) {
        return Ok((lock, None));
    }
    #[derive(Deserialize)]
    struct FormatOnly {
        format: Option<i64>,
    }
    if let Ok(FormatOnly {
        format: Some(format),
    }) = toml::from_str::<FormatOnly>(&text)
    {
        if format > i64::from(LOCK_FORMAT) {
            return Err(PipeError::Config(format!(
                "{} has format {format}, written by a newer fmnist-pipe (this one reads format {LOCK_FORMAT}); upgrade fmnist-pipe, or delete the lock to start over",
                path.display()
            )));
        }
    }
    Ok(match toml::from_str::<LockFile>(&text) {
        Ok(lock) if lock.format == LOCK_FORMAT => (lock, None),
        Ok(lock) => (
            LockFile::default(),
            Some(format!("{} has format {} (this fmnist-pipe writes {LOCK_FORMAT}); treating every stage as stale", path.display(), lock.format)),
        ),
        Err(e) => {
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(":{l}")).unwrap_or_default();
            (
                LockFile::default(),
                Some(format!(
                    "{}{at} is damaged ({}); treating every stage as stale",
                    path.display(),
                    e.message().trim().replace('\n', " ")
                )),
            )
        }
    })
}

/// The journal beside the lock: one JSON line per stage finished since the lock was last
/// written, so a run that ends early (killed) loses no record.
pub fn journal_path(lock_path: &Path) -> PathBuf {
    lock_path.with_extension("lock.journal")
}

/// Applies a journal left by a run that did not finish; a torn last line (the run died while
/// writing it) is skipped. Returns a note for the user when it applied anything.
fn replay_journal(path: &Path, lock: &mut LockFile) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut applied = 0;
    for line in text.lines() {
        if let Ok(JournalLine { stage, entry }) = serde_json::from_str::<JournalLine>(line) {
            lock.stages.insert(stage, entry);
            applied += 1;
        }
    }
    (applied > 0).then(|| {
        format!(
            "{}: {applied} stage(s) recorded by a run that ended before rewriting the lock",
            path.display()
        )
    })
}

#[derive(Serialize, Deserialize)]
struct JournalLine {
    stage: String,
    entry: LockEntry,
}

/// Appends finished stages to the journal (opened by a run, which holds the workspace).
pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
}

impl Journal {
    pub fn open(lock_path: &Path) -> Result<Journal, PipeError> {
        let path = journal_path(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| PipeError::io_at(&path, "open", e))?;
        Ok(Journal { file, path })
    }

    /// One line per finished stage, written in one call (a process killed between two calls
    /// leaves whole lines behind; the OS keeps what was written).
    pub fn record(&mut self, stage: &str, entry: &LockEntry) -> Result<(), PipeError> {
        let line = serde_json::to_string(&JournalLine {
            stage: stage.to_string(),
            entry: entry.clone(),
        })
        .map_err(|e| PipeError::io_at(&self.path, "encode", std::io::Error::other(e)))?;
        self.file
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| PipeError::io_at(&self.path, "append to", e))
    }
}

/// Writes the lock atomically (temp file + rename), so a crash never leaves half a lock, and
/// the JSON copy [`read_indexed`] takes instead of parsing the TOML (best effort: without it
/// reads are only slower); then drops the journal the lock now contains.
pub fn write_indexed(path: &Path, lock: &LockFile, index: Option<&Path>) -> Result<(), PipeError> {
    let body = toml::to_string(lock).map_err(|e| {
        PipeError::io(
            format!("cannot encode {}", path.display()),
            std::io::Error::other(e),
        )
    })?;
    let tmp = path.with_extension("lock.tmp");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(HEADER.as_bytes())?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(PipeError::io_at(path, "write", e));
    }
    if let Some(index) = index {
        let text = format!("{HEADER}{body}");
        #[derive(Serialize)]
        struct IndexOf<'a> {
            lock_blake3: String,
            lock: &'a LockFile,
        }
        let copy = IndexOf {
            lock_blake3: blake3::hash(text.as_bytes()).to_hex().to_string(),
            lock,
        };
        let written = serde_json::to_vec(&copy)
            .map_err(std::io::Error::other)
            .and_then(|json| {
                if let Some(dir) = index.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let tmp = index.with_extension("json.tmp");
                std::fs::write(&tmp, json)?;
                std::fs::rename(&tmp, index)
            });
        if written.is_err() {
            let _ = std::fs::remove_file(index);
        }
    }
    // Everything the journal recorded is in the lock now.
    match std::fs::remove_file(journal_path(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(PipeError::io_at(&journal_path(path), "remove", e))
        }
        _ => Ok(()),
    }
}

/// JSON (params, metrics) as a TOML table; nulls have no TOML form and are dropped.
pub fn json_to_table(value: &serde_json::Value) -> toml::Table {
    match json_to_toml(value) {
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            let mut t = toml::Table::new();
            t.insert("value".to_string(), other);
            t
        }
        None => toml::Table::new(),
    }
}

fn json_to_toml(value: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value;
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(items) => toml::Value::Array(items.iter().filter_map(json_to_toml).collect()),
        Value::Object(map) => toml::Value::Table(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), json_to_toml(v)?)))
                .collect(),
        ),
    })
}
