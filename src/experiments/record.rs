//! The record a successful `run` leaves. A state reached for the first time becomes a new
//! experiment (its file holds the state: each stage's fingerprint, params and metrics);
//! every run appends one line to experiments/log.jsonl (which experiment the workspace was
//! left in, when, with which `--set`s). A run that reaches a known state only appends that
//! line: a no-op run of a large pipeline reads and writes no experiment file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{auto_name, dir, id_from_lock, load_all, now_utc, state_from_lock, Experiment};
use crate::error::PipeError;
use crate::workspace::Workspace;

const INDEX: &str = "index.json";
const LOG: &str = "log.jsonl";

/// One line of the log: a run left the workspace in experiment `id`.
#[derive(Serialize, Deserialize)]
pub struct Visit {
    pub id: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
}

/// Which experiment each run left the workspace in, oldest first (torn lines skipped).
pub fn visits(artifacts: &Path) -> Vec<Visit> {
    std::fs::read_to_string(dir(artifacts).join(LOG))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// id -> name of every experiment (a small file beside them, rebuilt when missing).
fn index(artifacts: &Path) -> BTreeMap<String, String> {
    let path = dir(artifacts).join(INDEX);
    match std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        Some(index) => index,
        None => {
            let index: BTreeMap<String, String> = load_all(artifacts)
                .into_iter()
                .map(|e| (e.id, e.name))
                .collect();
            // Best effort: without it the next run only rebuilds it again.
            let _ = write_json(&path, &index);
            index
        }
    }
}

/// Records the workspace's state after a successful run; returns (name, id).
/// `name`: `run --name`; `overrides`: the run's `--set`s.
pub fn after_run(
    ws: &Workspace,
    name: Option<&str>,
    overrides: &[String],
) -> Result<(String, String), PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let folder = dir(&artifacts);
    std::fs::create_dir_all(&folder).map_err(|err| PipeError::io_at(&folder, "create", err))?;
    let id = id_from_lock(&ws.lock, &ws.pipeline);
    let file = folder.join(format!("{id}.json"));
    let mut index = index(&artifacts);
    let known = file.is_file();
    let mut clash = None;
    let recorded_name = match (known, index.get(&id)) {
        (true, Some(existing)) if name.is_none_or(|n| n == existing) => existing.clone(),
        _ => {
            // A new state, or a new name for a known one: the experiment's file is (re)written.
            let others: Vec<&str> = index
                .iter()
                .filter(|(i, _)| **i != id)
                .map(|(_, n)| n.as_str())
                .collect();
            clash = name.filter(|n| others.contains(n));
            let wanted = name.filter(|n| !others.contains(n));
            let experiment = match std::fs::read(&file)
                .ok()
                .and_then(|b| serde_json::from_slice::<Experiment>(&b).ok())
            {
                Some(mut e) => {
                    if let Some(n) = wanted {
                        e.name = n.to_string();
                    }
                    e
                }
                None => Experiment {
                    seq: index.len() as u64 + 1,
                    name: wanted.map_or_else(|| auto_name(&id, &others), str::to_string),
                    id: id.clone(),
                    created: now_utc(),
                    overrides: overrides.to_vec(),
                    stages: state_from_lock(&ws.lock, Some(&ws.pipeline), &artifacts),
                },
            };
            write_json(&file, &experiment)?;
            index.insert(id.clone(), experiment.name.clone());
            write_json(&folder.join(INDEX), &index)?;
            experiment.name
        }
    };
    let visit = Visit {
        id: id.clone(),
        at: now_utc(),
        overrides: overrides.to_vec(),
    };
    let log = folder.join(LOG);
    let line = serde_json::to_string(&visit).unwrap_or_default();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()))
        .map_err(|err| PipeError::io_at(&log, "append to", err))?;
    if let Some(clash) = clash {
        return Err(PipeError::Config(format!(
            "--name `{clash}`: another experiment has that name; this run's state is recorded as `{recorded_name}`"
        )));
    }
    Ok((recorded_name, id))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PipeError> {
    let text = serde_json::to_vec_pretty(value)
        .map_err(|err| PipeError::io("cannot encode an experiment", std::io::Error::other(err)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|err| PipeError::io_at(path, "write", err))
}
