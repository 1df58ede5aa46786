//! Experiments: every successful `run` leaves the whole pipeline in one state (stage ->
//! fingerprint); that state, with the params and metrics of each stage's run, is recorded
//! as an *experiment* in artifacts/.cache/experiments/<id>.json, `id` a short hash of the
//! state and the name given by `run --name` or derived from the id (adjective-noun).
//!
//! - `record`: the record written after each successful run; `runs`: `exp runs`, every
//!   stage run the run cache remembers.
//! - `show`: `exp show`, one row per experiment (table, `--csv`, `--json`); `html`: its
//!   `--html` page, training curves overlaid.
//! - `diff`: `params diff` and `metrics diff` between two experiments, the workspace and
//!   the lock committed in git.
//! - `sweep`: `run --sweep`, a grid of `--set` value lists run one combination after another.
//! - `apply`: `exp apply`, an experiment's params written into pipeline.toml (toml_edit,
//!   comments kept) and its outputs restored from the run cache.

pub mod apply;
pub mod diff;
pub mod html;
pub mod record;
pub mod runs;
pub mod show;
pub mod sweep;

pub use crate::clock::{format_utc, now_utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Pipeline;
use crate::error::{suggestion, PipeError};
use crate::lock::LockFile;
use crate::manifest::MISSING;

/// One stage of a recorded state: what its run was given and what it measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageState {
    pub kind: String,
    pub fingerprint: String,
    /// The hashed params, as the lock records them.
    #[serde(default)]
    pub params: Value,
    /// The stage's metrics (a command stage's: the numbers of an output named metrics.json).
    #[serde(default)]
    pub metrics: Value,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Stage name -> its state.
pub type State = BTreeMap<String, StageState>;

/// One recorded experiment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Experiment {
    pub id: String,
    pub name: String,
    /// The order experiments were recorded in (1, 2, ...): times can tie.
    #[serde(default)]
    pub seq: u64,
    /// When this state was first reached (UTC, RFC 3339).
    pub created: String,
    /// The `--set` overrides of the run that recorded it, if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
    pub stages: State,
}

/// Where experiments are recorded.
pub fn dir(artifacts: &Path) -> PathBuf {
    artifacts.join(".cache").join("experiments")
}

/// Every recorded experiment, oldest first.
pub fn load_all(artifacts: &Path) -> Vec<Experiment> {
    let mut all: Vec<Experiment> = std::fs::read_dir(dir(artifacts))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.path().extension().is_some_and(|x| x == "json") && e.file_name() != "index.json"
        })
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            serde_json::from_str(&text).ok()
        })
        .collect();
    all.sort_by(|a, b| (a.seq, &a.created, &a.id).cmp(&(b.seq, &b.created, &b.id)));
    all
}

/// The stages of the workspace's pipeline that neither are up to date nor can be restored
/// from the run cache (local, and the remote one when `[cache] remote` is set): what a
/// restoring run would have to compute.
pub fn not_restorable(ws: &crate::workspace::Workspace) -> Vec<String> {
    let artifacts = ws.pipeline.artifacts();
    let console = crate::progress::Console::new();
    let planned = if ws.pipeline.cache.remote.is_some() {
        let tiered = crate::remote::TieredCache::new(&artifacts, &ws.pipeline.cache, &console);
        crate::plan::plan(ws, None, &Default::default(), Some(&tiered))
    } else {
        let local = crate::cache::RunCache::new(&artifacts);
        crate::plan::plan(ws, None, &Default::default(), Some(&local))
    };
    planned
        .into_iter()
        .filter(|p| matches!(p.decision, crate::plan::Decision::Run(_)))
        .map(|p| ws.pipeline.stages[p.index].name.clone())
        .collect()
}

/// Every stage fingerprint of every recorded experiment (what `gc --all-experiments` keeps).
pub fn fingerprints(artifacts: &Path) -> Vec<String> {
    load_all(artifacts)
        .into_iter()
        .flat_map(|e| e.stages.into_values().map(|s| s.fingerprint))
        .collect()
}

/// The experiment named (or with the id) `name`; exit 2 naming it otherwise.
pub fn find<'a>(all: &'a [Experiment], name: &str) -> Result<&'a Experiment, PipeError> {
    all.iter()
        .find(|e| e.name == name)
        .or_else(|| all.iter().find(|e| e.id == name))
        .ok_or_else(|| {
            let hint = suggestion(name, all.iter().map(|e| e.name.as_str()));
            let known = if all.is_empty() {
                "no experiment is recorded yet (each successful `run` records one)".to_string()
            } else {
                format!("`fmnist-pipe exp show` lists {}", all.len())
            };
            PipeError::Config(format!("unknown experiment `{name}`{hint}; {known}"))
        })
}

/// The short id of a state: a hash of its stage -> fingerprint map.
pub fn id_of(state: &State) -> String {
    id_of_map(
        state
            .iter()
            .map(|(k, v)| (k.as_str(), v.fingerprint.as_str())),
    )
}

/// [`id_of`] the state the lock describes for the pipeline's stages, without building it.
pub fn id_from_lock(lock: &LockFile, pipeline: &Pipeline) -> String {
    id_of_map(
        lock.stages
            .iter()
            .filter(|(name, _)| pipeline.index_of(name).is_some())
            .map(|(k, e)| (k.as_str(), e.fingerprint.as_str())),
    )
}

fn id_of_map<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let map: BTreeMap<&str, &str> = pairs.collect();
    let json = serde_json::to_string(&map).unwrap_or_default();
    blake3::hash(json.as_bytes()).to_hex()[..8].to_string()
}

const ADJECTIVES: [&str; 32] = [
    "amber", "bold", "brisk", "calm", "crisp", "dapper", "eager", "fond", "gentle", "glad",
    "hardy", "jolly", "keen", "lively", "lucid", "merry", "nimble", "noble", "plucky", "proud",
    "quick", "quiet", "rapid", "sharp", "shy", "sleek", "snug", "steady", "sunny", "swift", "tidy",
    "witty",
];
const NOUNS: [&str; 32] = [
    "badger", "beetle", "bison", "crane", "dingo", "eagle", "egret", "ferret", "finch", "gecko",
    "heron", "ibex", "koala", "lemur", "lynx", "marten", "moose", "newt", "ocelot", "otter",
    "panda", "puffin", "quail", "raven", "robin", "seal", "shrew", "stoat", "tapir", "viper",
    "walrus", "yak",
];

/// A readable name derived from the id: adjective-noun, with the id's first digits added
/// when another experiment already has that name.
pub fn auto_name(id: &str, taken: &[&str]) -> String {
    let byte = |i: usize| usize::from_str_radix(id.get(i..i + 2).unwrap_or("00"), 16).unwrap_or(0);
    let base = format!(
        "{}-{}",
        ADJECTIVES[byte(0) % ADJECTIVES.len()],
        NOUNS[byte(2) % NOUNS.len()]
    );
    if taken.contains(&base.as_str()) {
        format!("{base}-{}", &id[..4.min(id.len())])
    } else {
        base
    }
}

/// The state the lock describes, for the pipeline's stages (in the lock's order).
/// `artifacts` finds command stages' metrics.json in the run cache or the workspace.
pub fn state_from_lock(lock: &LockFile, pipeline: Option<&Pipeline>, artifacts: &Path) -> State {
    lock.stages
        .iter()
        .filter(|(name, _)| pipeline.is_none_or(|p| p.index_of(name).is_some()))
        .map(|(name, e)| {
            let mut metrics = serde_json::to_value(&e.metrics).unwrap_or(Value::Null);
            if e.kind == "cmd" {
                if let Some(found) = command_metrics(e, artifacts) {
                    metrics = found;
                }
            }
            let state = StageState {
                kind: e.kind.clone(),
                fingerprint: e.fingerprint.clone(),
                params: serde_json::to_value(&e.params).unwrap_or(Value::Null),
                metrics,
                seconds: e.seconds,
                seed: e.seed,
                finished: e.finished.clone(),
                device: e.device.clone(),
            };
            (name.clone(), state)
        })
        .collect()
}

/// A command stage's metrics: the JSON of its output named metrics.json, from the run cache
/// (or the workspace when its bytes are the recorded ones).
pub(crate) fn command_metrics(e: &crate::lock::LockEntry, artifacts: &Path) -> Option<Value> {
    let record = e
        .outs
        .iter()
        .find(|r| r.blake3 != MISSING && r.path.rsplit('/').next() == Some("metrics.json"))?;
    let object = crate::cache::RunCache::new(artifacts).object(&record.blake3);
    let root = artifacts.parent().unwrap_or(artifacts);
    let bytes = std::fs::read(object).ok().or_else(|| {
        let bytes = std::fs::read(root.join(&record.path)).ok()?;
        (blake3::hash(&bytes).to_hex().as_str() == record.blake3).then_some(bytes)
    })?;
    serde_json::from_slice(&bytes).ok()
}

/// Every param of a state, flattened to `stage.key.sub` (arrays are values), plus
/// `pipeline.seed` when a stage ran with the pipeline's seed.
pub fn flat_params(state: &State) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (stage, s) in state {
        flatten(&s.params, stage, &mut out);
    }
    if let Some(seed) = state.values().find_map(|s| s.seed) {
        out.insert("pipeline.seed".to_string(), Value::from(seed));
    }
    out
}

fn flatten(value: &Value, prefix: &str, out: &mut BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                flatten(v, &format!("{prefix}.{k}"), out);
            }
        }
        Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Every number a state measured, flattened to `stage.key.sub`, with each training
/// stage's time as `stage.seconds`.
pub fn all_metrics(state: &State) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (stage, s) in state {
        let mut flat = BTreeMap::new();
        flatten(&s.metrics, stage, &mut flat);
        for (k, v) in flat {
            if let Some(x) = v.as_f64() {
                out.insert(k, x);
            }
        }
        if s.kind == "train" {
            out.insert(format!("{stage}.seconds"), s.seconds);
        }
    }
    out
}

/// The metrics `exp show` shows: test accuracy and loss per model (evaluate), training time
/// (train), every number of a command stage's metrics.
pub fn is_key_metric(state_kinds: &BTreeMap<String, String>, key: &str) -> bool {
    let Some((stage, rest)) = key.split_once('.') else {
        return false;
    };
    match state_kinds.get(stage).map(String::as_str) {
        Some("evaluate") => {
            rest.starts_with("models.") && (rest.ends_with(".accuracy") || rest.ends_with(".loss"))
        }
        Some("train") => rest == "seconds",
        Some("cmd") => true,
        _ => false,
    }
}

/// A value as a person reads it in a table: floats to four significant digits.
pub fn show_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_f64() => short_float(n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

pub fn short_float(f: f64) -> String {
    if !f.is_finite() {
        return f.to_string();
    }
    if f == 0.0 {
        return "0".to_string();
    }
    if f.abs() >= 1e5 || f.abs() < 1e-2 {
        let s = format!("{f:.3e}");
        // 1.000e-3 -> 1e-3
        match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        }
    } else {
        let digits = (3 - f.abs().log10().floor() as i32).clamp(0, 6) as usize;
        let s = format!("{f:.digits$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    }
}

/// `exp ...`.
#[derive(clap::Subcommand)]
pub enum ExpCmd {
    /// One row per experiment, newest first: the params that differ between rows, test
    /// accuracy and loss per model, training times; `*` marks the workspace's state.
    Show {
        /// Sort by this column (its header, its full key, `name` or `when`), ascending.
        #[arg(long, value_name = "COLUMN")]
        sort: Option<String>,
        /// Reverse the order.
        #[arg(long)]
        reverse: bool,
        /// Every experiment with all its params and metrics, as JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// The table's columns unabbreviated, as CSV.
        #[arg(long, conflicts_with = "html")]
        csv: bool,
        /// Write a self-contained HTML page to PATH: each training stage's curves (train
        /// loss, test accuracy per epoch) of the experiments overlaid, and the table.
        #[arg(long, value_name = "PATH", conflicts_with = "json")]
        html: Option<PathBuf>,
        /// Only these experiments (names or ids).
        names: Vec<String>,
    },
    /// Every stage run the run cache remembers, newest first: when it finished (UTC), the stage,
    /// how long it took, where it ran, its headline metrics.
    Runs {
        /// Each run's whole record (params, metrics, ...), as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the experiment's params into pipeline.toml (comments and layout kept) and
    /// restore its outputs from the run cache (nothing is recomputed).
    Apply { name: String },
}

/// `params diff` / `metrics diff`.
#[derive(clap::Subcommand)]
pub enum DiffCmd {
    /// What changed from A to B (experiment names). Default B: the workspace; default A:
    /// the pipeline.lock of git's HEAD if there is one, else the previous experiment.
    Diff {
        a: Option<String>,
        b: Option<String>,
        /// Unchanged ones too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
}

/// Runs `exp` subcommands; `run_one` is an ordinary `run` (used by `apply`).
pub fn dispatch_exp(
    file: &Path,
    command: ExpCmd,
    run_one: &mut sweep::RunOne,
) -> Result<(), PipeError> {
    match command {
        ExpCmd::Show {
            sort,
            reverse,
            json,
            csv,
            html,
            names,
        } => {
            let ws = crate::workspace::Workspace::load(
                file,
                &[],
                crate::registry::Registry::builtins(),
            )?;
            let artifacts = ws.pipeline.artifacts();
            let current = id_from_lock(&ws.lock, &ws.pipeline);
            let width = width();
            show::run(
                &load_all(&artifacts),
                Some(&current),
                &show::Options {
                    sort,
                    reverse,
                    json,
                    csv,
                    width,
                    names,
                    html,
                    artifacts: artifacts.clone(),
                },
            )
        }
        ExpCmd::Runs { json } => {
            let ws = crate::workspace::Workspace::load(
                file,
                &[],
                crate::registry::Registry::builtins(),
            )?;
            let artifacts = ws.pipeline.artifacts();
            runs::run(&artifacts, &ws.lock, &load_all(&artifacts), json, width())
        }
        ExpCmd::Apply { name } => {
            apply::run(file, &name, run_one, &|l| crate::output::warn_line(l))
        }
    }
}

/// The terminal's width as COLUMNS says (at least 40), else 80.
fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .filter(|&w: &usize| w >= 40)
        .unwrap_or(80)
}

/// Runs `params diff` / `metrics diff`.
pub fn dispatch_diff(file: &Path, what: diff::What, command: DiffCmd) -> Result<(), PipeError> {
    let DiffCmd::Diff { a, b, all, json } = command;
    let ws = crate::workspace::Workspace::load(file, &[], crate::registry::Registry::builtins())?;
    diff::run(&ws, what, a.as_deref(), b.as_deref(), all, json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn floats_read_short() {
        assert_eq!(short_float(1e-3), "1e-3");
        assert_eq!(short_float(3e-4), "3e-4");
        assert_eq!(short_float(0.87654321), "0.8765");
        assert_eq!(short_float(1.0), "1");
        assert_eq!(short_float(12.34567), "12.35");
        assert_eq!(short_float(f64::NAN), "NaN");
    }

    #[test]
    fn names_are_deterministic_and_unique() {
        let a = auto_name("0a1b2c3d", &[]);
        assert_eq!(a, auto_name("0a1b2c3d", &[]));
        assert!(a.contains('-'));
        let b = auto_name("0a1b2c3d", &[a.as_str()]);
        assert_ne!(a, b);
        assert!(b.ends_with("-0a1b"), "{b}");
    }
}
