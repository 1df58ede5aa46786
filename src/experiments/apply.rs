//! `exp apply NAME`: the experiment's params written into pipeline.toml (only the values that
//! differ, through toml_edit, so comments and layout stay), checked by reloading the file,
//! then its outputs restored from the run cache by an ordinary run (nothing recomputed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use super::{find, flat_params, load_all, Experiment};
use crate::error::PipeError;
use crate::registry::Registry;
use crate::workspace::Workspace;

/// The params the pipeline file gives now, flattened like an experiment's.
fn file_params(ws: &Workspace) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for s in &ws.pipeline.stages {
        super::flatten(&s.hashed_params, &s.name, &mut out);
    }
    out.insert("pipeline.seed".to_string(), Value::from(ws.pipeline.seed));
    out
}

fn to_toml(v: &Value) -> Option<toml_edit::Value> {
    Some(match v {
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64()?.into(),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(items) => {
            let mut a = toml_edit::Array::new();
            for i in items {
                a.push(to_toml(i)?);
            }
            a.into()
        }
        Value::Object(map) => {
            let mut t = toml_edit::InlineTable::new();
            for (k, i) in map {
                t.insert(k, to_toml(i)?);
            }
            t.into()
        }
        Value::Null => return None,
    })
}

/// The table item a flattened key lives in (`stages.NAME` or `pipeline`), and the rest.
fn split_key<'a>(key: &'a str, stages: &BTreeSet<&str>) -> Option<(Vec<String>, Vec<&'a str>)> {
    let (head, rest) = key.split_once('.')?;
    let parts: Vec<&str> = rest.split('.').collect();
    if head == "pipeline" && !stages.contains("pipeline") {
        return Some((vec!["pipeline".to_string()], parts));
    }
    Some((vec!["stages".to_string(), head.to_string()], parts))
}

/// Sets (or with None removes) `path` under `item`, keeping the decor of a replaced value.
fn set(item: &mut toml_edit::Item, path: &[&str], value: Option<toml_edit::Value>) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = item;
    for p in parents {
        let exists = node.get(p).is_some_and(|i| !i.is_none());
        if !exists && value.is_none() {
            return true;
        }
        match node.get_mut(p) {
            Some(next) => node = next,
            None => return false,
        }
    }
    let Some(table) = node.as_table_like_mut() else {
        return false;
    };
    match value {
        None => {
            table.remove(last);
        }
        Some(mut v) => {
            if let Some(old) = table.get(last).and_then(|i| i.as_value()) {
                *v.decor_mut() = old.decor().clone();
            }
            table.insert(last, toml_edit::Item::Value(v));
        }
    }
    true
}

/// Writes `exp`'s params into the pipeline file; returns the keys changed.
fn write_params(file: &Path, ws: &Workspace, exp: &Experiment) -> Result<Vec<String>, PipeError> {
    let unknown: Vec<&String> = exp
        .stages
        .keys()
        .filter(|s| ws.pipeline.index_of(s).is_none())
        .collect();
    if !unknown.is_empty() {
        return Err(PipeError::Config(format!(
            "experiment `{}` has stages pipeline.toml no longer has: {}",
            exp.name,
            unknown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let now = file_params(ws);
    let target = flat_params(&exp.stages);
    let stage_names: BTreeSet<&str> = exp.stages.keys().map(String::as_str).collect();
    let in_exp = |key: &str| {
        key.split_once('.').is_some_and(|(s, _)| {
            stage_names.contains(s) || (s == "pipeline" && target.contains_key(key))
        })
    };
    let keys: BTreeSet<&String> = now
        .keys()
        .chain(target.keys())
        .filter(|k| in_exp(k))
        .collect();
    let changes: Vec<(&String, Option<&Value>)> = keys
        .into_iter()
        .filter(|k| now.get(*k) != target.get(*k))
        .map(|k| (k, target.get(k)))
        .collect();
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(file).map_err(|e| PipeError::io_at(file, "read", e))?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| PipeError::Config(format!("{}: {e}", file.display())))?;
    let mut changed = Vec::new();
    for (key, value) in &changes {
        let (table, path) = split_key(key, &stage_names)
            .ok_or_else(|| PipeError::Config(format!("cannot place param `{key}`")))?;
        let mut item = doc.as_item_mut();
        for t in &table {
            item = item.get_mut(t).ok_or_else(|| {
                PipeError::Config(format!("{}: no table for `{key}`", file.display()))
            })?;
        }
        let v = match value {
            Some(v) => Some(
                to_toml(v)
                    .ok_or_else(|| PipeError::Config(format!("param `{key}` has no TOML form")))?,
            ),
            None => None,
        };
        if !set(item, &path, v) {
            return Err(PipeError::Config(format!(
                "{}: cannot write `{key}` (a value where a table was expected)",
                file.display()
            )));
        }
        changed.push((*key).clone());
    }
    let tmp = file.with_extension("toml.apply-tmp");
    std::fs::write(&tmp, doc.to_string()).map_err(|e| PipeError::io_at(&tmp, "write", e))?;
    // The file must now give exactly the experiment's params.
    let check = Workspace::load(&tmp, &[], Registry::builtins()).map(|w| file_params(&w));
    let mismatch: Vec<String> = match &check {
        Ok(after) => target
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect(),
        Err(e) => vec![e.to_string()],
    };
    if !mismatch.is_empty() {
        let _ = std::fs::remove_file(&tmp);
        return Err(PipeError::Config(format!(
            "cannot make {} give experiment `{}`'s params ({}); the file was left as it was",
            file.display(),
            exp.name,
            mismatch.join(", ")
        )));
    }
    std::fs::rename(&tmp, file).map_err(|e| PipeError::io_at(file, "replace", e))?;
    Ok(changed)
}

/// `exp apply NAME`.
pub fn run(
    file: &Path,
    name: &str,
    run_one: &mut super::sweep::RunOne,
    say: &dyn Fn(&str),
) -> Result<(), PipeError> {
    let ws = Workspace::load(file, &[], Registry::builtins())?;
    let artifacts = ws.pipeline.artifacts();
    let all = load_all(&artifacts);
    let exp = find(&all, name)?;
    let changed = write_params(file, &ws, exp)?;
    drop(ws);
    if changed.is_empty() {
        say(&format!(
            "{} already gives `{}`'s params",
            file.display(),
            exp.name
        ));
    } else {
        say(&format!(
            "{}: wrote {} ({})",
            file.display(),
            exp.name,
            changed.join(", ")
        ));
    }
    let ws = Workspace::load(file, &[], Registry::builtins())?;
    let missing = super::not_restorable(&ws);
    drop(ws);
    if !missing.is_empty() {
        say(&format!(
            "not in the run cache (removed by gc?): {}; `fmnist-pipe run` recomputes them",
            missing.join(", ")
        ));
        return Ok(());
    }
    run_one(&[], None).map(|_| ())
}
