//! The record a successful `run` leaves: the workspace's state as an experiment, created the
//! first time that state is reached, its `seen` time (and name, with `--name`) updated after.

use std::path::Path;

use super::{auto_name, dir, id_of, load_all, now_utc, state_from_lock, Experiment};
use crate::error::PipeError;
use crate::workspace::Workspace;

/// Records the workspace's state after a successful run; returns the experiment.
/// `name`: `run --name`; `overrides`: the run's `--set`s.
pub fn after_run(
    ws: &Workspace,
    name: Option<&str>,
    overrides: &[String],
) -> Result<Experiment, PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let state = state_from_lock(&ws.lock, Some(&ws.pipeline), &artifacts);
    let id = id_of(&state);
    let all = load_all(&artifacts);
    let now = now_utc();
    let existing = all.iter().find(|e| e.id == id).cloned();
    let others: Vec<&str> = all
        .iter()
        .filter(|e| e.id != id)
        .map(|e| e.name.as_str())
        .collect();
    // A name another experiment has: the state is recorded under its own name, and the
    // clash reported (exit 2) after the run's work is kept.
    let clash = name.filter(|n| others.contains(n));
    let name = name.filter(|n| !others.contains(n));
    let next = all.iter().map(|e| e.seq.max(e.seen_seq)).max().unwrap_or(0) + 1;
    let mut experiment = match existing {
        Some(mut e) => {
            e.seen = now;
            if let Some(name) = name {
                e.name = name.to_string();
            }
            if e.overrides.is_empty() {
                e.overrides = overrides.to_vec();
            }
            e.stages = state;
            e
        }
        None => Experiment {
            seq: all.iter().map(|e| e.seq).max().unwrap_or(0) + 1,
            ..fresh(&id, &others, &now, overrides, state, name)
        },
    };
    experiment.seen_seq = next;
    write(&artifacts, &experiment)?;
    if let Some(clash) = clash {
        return Err(PipeError::Config(format!(
            "--name `{clash}`: another experiment has that name; this run's state is recorded as `{}`",
            experiment.name
        )));
    }
    Ok(experiment)
}

fn fresh(
    id: &str,
    others: &[&str],
    now: &str,
    overrides: &[String],
    state: super::State,
    name: Option<&str>,
) -> Experiment {
    Experiment {
        id: id.to_string(),
        seq: 0,
        seen_seq: 0,
        name: name.map_or_else(|| auto_name(id, others), str::to_string),
        created: now.to_string(),
        seen: now.to_string(),
        overrides: overrides.to_vec(),
        stages: state,
    }
}

fn write(artifacts: &Path, e: &Experiment) -> Result<(), PipeError> {
    let folder = dir(artifacts);
    std::fs::create_dir_all(&folder).map_err(|err| PipeError::io_at(&folder, "create", err))?;
    let path = folder.join(format!("{}.json", e.id));
    let text = serde_json::to_string_pretty(e)
        .map_err(|err| PipeError::io("cannot encode an experiment", std::io::Error::other(err)))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|err| PipeError::io_at(&path, "write", err))
}
