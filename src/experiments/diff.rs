//! `params diff [A] [B]` and `metrics diff [A] [B]`: A and B are experiment names (or ids).
//! Without B, the workspace's current state is the new side; without A, the old side is the
//! pipeline.lock of git's HEAD when the workspace is in a git repository that has one, else
//! the experiment a run last left the workspace in before its current state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use super::{all_metrics, find, flat_params, load_all, state_from_lock, State};
use crate::error::PipeError;
use crate::lock::LockFile;
use crate::output;
use crate::workspace::Workspace;

#[derive(Clone, Copy, PartialEq)]
pub enum What {
    Params,
    Metrics,
}

/// One side of a diff: what it is called and its state.
struct Side {
    label: String,
    state: State,
}

/// pipeline.lock as committed at git's HEAD, if the workspace is in a repository with one.
fn head_lock(lock_path: &Path) -> Option<LockFile> {
    let dir = lock_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = lock_path.file_name()?.to_string_lossy().into_owned();
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["show", &format!("HEAD:./{name}")])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).ok()
}

fn sides(ws: &Workspace, a: Option<&str>, b: Option<&str>) -> Result<(Side, Side), PipeError> {
    let artifacts = ws.pipeline.artifacts();
    let all = load_all(&artifacts);
    let workspace = state_from_lock(&ws.lock, Some(&ws.pipeline), &artifacts);
    let current_id = super::id_of(&workspace);
    let named = |n: &str| -> Result<Side, PipeError> {
        let e = find(&all, n)?;
        Ok(Side {
            label: e.name.clone(),
            state: e.stages.clone(),
        })
    };
    let new = match b {
        Some(b) => named(b)?,
        None => Side {
            label: "workspace".to_string(),
            state: workspace,
        },
    };
    let old = match a {
        Some(a) => named(a)?,
        None => match head_lock(&ws.lock_path) {
            Some(lock) => Side {
                label: "HEAD".to_string(),
                state: state_from_lock(&lock, Some(&ws.pipeline), &artifacts),
            },
            None => {
                // The state a run last left the workspace in before this one.
                let visits = super::record::visits(&artifacts);
                let previous = visits
                    .iter()
                    .rev()
                    .filter(|v| v.id != current_id)
                    .find_map(|v| all.iter().find(|e| e.id == v.id))
                    .ok_or_else(|| {
                        PipeError::Config(
                            "nothing to compare with: no git HEAD with a pipeline.lock and no \
                             earlier experiment; name two experiments (`exp show` lists them)"
                                .to_string(),
                        )
                    })?;
                Side {
                    label: previous.name.clone(),
                    state: previous.stages.clone(),
                }
            }
        },
    };
    Ok((old, new))
}

/// `params diff` / `metrics diff`.
pub fn run(
    ws: &Workspace,
    what: What,
    a: Option<&str>,
    b: Option<&str>,
    all: bool,
    json: bool,
) -> Result<(), PipeError> {
    let (old, new) = sides(ws, a, b)?;
    let rows: Vec<(String, Option<Value>, Option<Value>)> = match what {
        What::Params => pair(flat_params(&old.state), flat_params(&new.state)),
        What::Metrics => {
            let to_values = |m: BTreeMap<String, f64>| -> BTreeMap<String, Value> {
                m.into_iter().map(|(k, v)| (k, Value::from(v))).collect()
            };
            pair(
                to_values(all_metrics(&old.state)),
                to_values(all_metrics(&new.state)),
            )
        }
    };
    let rows: Vec<_> = rows.into_iter().filter(|(_, o, n)| all || o != n).collect();
    let delta = |o: &Option<Value>, n: &Option<Value>| -> Option<f64> {
        Some(n.as_ref()?.as_f64()? - o.as_ref()?.as_f64()?)
    };
    if json {
        let items: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(k, o, n)| {
                let mut item = serde_json::json!({ "old": o, "new": n });
                if what == What::Metrics {
                    item["diff"] = delta(o, n).map_or(Value::Null, Value::from);
                }
                (k.clone(), item)
            })
            .collect();
        let body = serde_json::json!({ "old": old.label, "new": new.label, "changes": items });
        return output::emit_line(&serde_json::to_string_pretty(&body).unwrap_or_default());
    }
    let noun = if what == What::Params {
        "params"
    } else {
        "metrics"
    };
    if rows.is_empty() {
        return output::emit_line(&format!(
            "no {noun} differ between {} and {}",
            old.label, new.label
        ));
    }
    let show = |v: &Option<Value>| v.as_ref().map_or("-".to_string(), super::show_value);
    let mut table: Vec<Vec<String>> = vec![vec![
        if what == What::Params {
            "param"
        } else {
            "metric"
        }
        .to_string(),
        old.label.clone(),
        new.label.clone(),
    ]];
    if what == What::Metrics {
        table[0].push("change".to_string());
    }
    for (k, o, n) in &rows {
        let mut line = vec![k.clone(), show(o), show(n)];
        if what == What::Metrics {
            line.push(delta(o, n).map_or("-".to_string(), |d| {
                let sign = if d > 0.0 { "+" } else { "" };
                format!("{sign}{}", super::short_float(d))
            }));
        }
        table.push(line);
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let text: String = table
        .iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(i, (s, w))| {
                    if i == 0 {
                        format!("{s:<w$}")
                    } else {
                        format!("{s:>w$}")
                    }
                })
                .collect();
            format!("{}\n", cells.join("  ").trim_end())
        })
        .collect();
    output::emit(&text)
}

fn pair(
    old: BTreeMap<String, Value>,
    new: BTreeMap<String, Value>,
) -> Vec<(String, Option<Value>, Option<Value>)> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .map(|k| (k.clone(), old.get(k).cloned(), new.get(k).cloned()))
        .collect()
}
