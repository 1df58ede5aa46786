//! `exp runs`: every stage run the run cache remembers (artifacts/.cache/runs), newest
//! first: when it finished (UTC), the stage (known from the lock and the recorded experiments),
//! its fingerprint, how long it took, where it ran and its headline metrics.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::Experiment;
use crate::error::PipeError;
use crate::lock::{LockEntry, LockFile};
use crate::output;

/// The cached runs: (stage name if known, entry), newest first.
fn cached(artifacts: &Path, lock: &LockFile, exps: &[Experiment]) -> Vec<(String, LockEntry)> {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for e in exps {
        for (stage, s) in &e.stages {
            names.insert(s.fingerprint.clone(), stage.clone());
        }
    }
    for (stage, e) in &lock.stages {
        names.insert(e.fingerprint.clone(), stage.clone());
    }
    let mut runs: Vec<(String, LockEntry)> = std::fs::read_dir(artifacts.join(".cache/runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|f| f.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|f| {
            let entry: LockEntry = toml::from_str(&std::fs::read_to_string(f.path()).ok()?).ok()?;
            let stage = names.get(&entry.fingerprint).cloned().unwrap_or_default();
            Some((stage, entry))
        })
        .collect();
    runs.sort_by(|(sa, a), (sb, b)| {
        (&b.finished, sb, &b.fingerprint).cmp(&(&a.finished, sa, &a.fingerprint))
    });
    runs
}

/// A run's headline: a training's lr, epochs and test accuracy, each model's accuracy
/// (evaluate), a command stage's numbers; nothing for the other kinds.
fn headline(e: &LockEntry, artifacts: &Path) -> String {
    let mut metrics = serde_json::to_value(&e.metrics).unwrap_or(Value::Null);
    if e.kind == "cmd" {
        metrics = super::command_metrics(e, artifacts).unwrap_or(metrics);
    }
    let number = |v: &Value, path: &[&str]| path.iter().try_fold(v, |v, k| v.get(k))?.as_f64();
    match e.kind.as_str() {
        "train" => {
            let params = serde_json::to_value(&e.params).unwrap_or(Value::Null);
            let mut parts = Vec::new();
            if let Some(lr) = number(&params, &["optimizer", "lr"]) {
                parts.push(format!("lr {}", super::short_float(lr)));
            }
            if let Some(n) = number(&metrics, &["epochs"]) {
                parts.push(format!("{n}ep"));
            }
            if let Some(a) = number(&metrics, &["test_accuracy"]) {
                parts.push(format!("acc {:.2}%", 100.0 * a));
            }
            parts.join(" ")
        }
        "evaluate" => metrics
            .get("models")
            .and_then(Value::as_object)
            .map(|models| {
                models
                    .iter()
                    .filter_map(|(m, v)| {
                        let a = number(v, &["accuracy"])?;
                        Some(format!("{} {:.2}%", super::show::short(m), 100.0 * a))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default(),
        "cmd" => {
            let mut flat = BTreeMap::new();
            super::flatten(&metrics, "", &mut flat);
            flat.iter()
                .filter_map(|(k, v)| {
                    Some(format!(
                        "{}={}",
                        k.trim_start_matches('.'),
                        super::short_float(v.as_f64()?)
                    ))
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        _ => String::new(),
    }
}

/// `exp runs`.
pub fn run(
    artifacts: &Path,
    lock: &LockFile,
    exps: &[Experiment],
    json: bool,
    width: usize,
) -> Result<(), PipeError> {
    let runs = cached(artifacts, lock, exps);
    if json {
        let items: Vec<Value> = runs
            .iter()
            .map(|(stage, e)| {
                let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.remove("outs");
                    o.remove("deps");
                    o.insert("stage".into(), Value::from(stage.clone()));
                }
                v
            })
            .collect();
        return output::emit_line(&serde_json::to_string_pretty(&items).unwrap_or_default());
    }
    if runs.is_empty() {
        return output::emit_line("the run cache is empty");
    }
    let rows: Vec<[String; 6]> = runs
        .iter()
        .map(|(stage, e)| {
            [
                e.finished
                    .as_deref()
                    .and_then(|f| f.get(5..19))
                    .map_or("-".to_string(), |f| f.replace('T', " ")),
                if stage.is_empty() {
                    format!("({})", e.kind)
                } else {
                    stage.clone()
                },
                e.fingerprint.chars().take(8).collect(),
                format!("{:.1}s", e.seconds),
                e.device.clone().unwrap_or_else(|| "-".into()),
                headline(e, artifacts),
            ]
        })
        .collect();
    let header = ["finished", "stage", "run", "took", "device", "metrics"];
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let used: usize = widths.iter().map(|w| w + 2).sum();
    let room = width.saturating_sub(used).max(10);
    let mut out = String::new();
    for r in std::iter::once(header.map(str::to_string)).chain(rows) {
        let mut cells: Vec<String> = (0..5)
            .map(|c| {
                let w = widths[c];
                if c == 3 {
                    format!("{:>w$}", r[c])
                } else {
                    format!("{:<w$}", r[c])
                }
            })
            .collect();
        let m = &r[5];
        cells.push(if m.chars().count() > room {
            format!("{}…", m.chars().take(room - 1).collect::<String>())
        } else {
            m.clone()
        });
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    output::emit(&out)
}
