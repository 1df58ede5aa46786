//! `exp show`: one row per experiment, newest first: its name and time, the params that
//! differ between the rows (only those) and the key metrics, the workspace's current one
//! marked `*`. The table fits the terminal (COLUMNS, else 80): headers are abbreviated
//! (a legend says how) and the columns that do not fit are named in a note; `--csv` and
//! `--json` have every column at full precision.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{all_metrics, flat_params, is_key_metric, Experiment};
use crate::error::PipeError;
use crate::output;

pub struct Options {
    pub sort: Option<String>,
    pub reverse: bool,
    pub json: bool,
    pub csv: bool,
    /// Table width (COLUMNS, else 80).
    pub width: usize,
    /// Only these experiments (names or ids); all when empty.
    pub names: Vec<String>,
    /// Write the HTML page (curves and table) here.
    pub html: Option<std::path::PathBuf>,
    /// Where the run cache is (the HTML page's histories).
    pub artifacts: std::path::PathBuf,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Param,
    Accuracy,
    Loss,
    Time,
    Metric,
}

struct Column {
    key: String,
    label: String,
    role: Role,
    values: Vec<Option<Value>>,
}

impl Column {
    fn cell(&self, row: usize) -> String {
        let Some(v) = &self.values[row] else {
            return "-".to_string();
        };
        let x = v.as_f64();
        match (self.role, x) {
            (Role::Accuracy, Some(x)) => format!("{:.2}%", 100.0 * x),
            (Role::Time, Some(x)) => format!("{x:.1}s"),
            (Role::Loss | Role::Metric, Some(x)) => super::short_float(x),
            _ => {
                let s = super::show_value(v);
                if s.chars().count() > 24 {
                    format!("{}…", s.chars().take(23).collect::<String>())
                } else {
                    s
                }
            }
        }
    }
}

/// "train-baseline" -> "base": the last `-` part, cut to 4 letters past 5.
pub(super) fn short(stage: &str) -> String {
    let last = stage.rsplit('-').next().unwrap_or(stage);
    if last.chars().count() > 5 {
        last.chars().take(4).collect()
    } else {
        last.to_string()
    }
}

/// The rows in display order and the columns, for `exps` (`current`: the workspace's id).
fn columns(exps: &[&Experiment]) -> Vec<Column> {
    let params: Vec<BTreeMap<String, Value>> =
        exps.iter().map(|e| flat_params(&e.stages)).collect();
    let metrics: Vec<BTreeMap<String, f64>> = exps.iter().map(|e| all_metrics(&e.stages)).collect();
    let kinds: BTreeMap<String, String> = exps
        .iter()
        .flat_map(|e| e.stages.iter().map(|(k, s)| (k.clone(), s.kind.clone())))
        .collect();
    let mut cols = Vec::new();
    let param_keys: BTreeSet<&String> = params.iter().flat_map(|p| p.keys()).collect();
    for key in param_keys {
        let values: Vec<Option<Value>> = params.iter().map(|p| p.get(key).cloned()).collect();
        if values.iter().any(|v| v != &values[0]) {
            cols.push(Column {
                key: key.clone(),
                label: String::new(),
                role: Role::Param,
                values,
            });
        }
    }
    let metric_keys: BTreeSet<&String> = metrics
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| is_key_metric(&kinds, k))
        .collect();
    let mut metric_cols: Vec<Column> = metric_keys
        .into_iter()
        .map(|key| {
            let role = if key.ends_with(".accuracy") {
                Role::Accuracy
            } else if key.ends_with(".loss")
                && kinds.get(stage_of(key)).is_some_and(|k| k == "evaluate")
            {
                Role::Loss
            } else if key.ends_with(".seconds")
                && kinds.get(stage_of(key)).is_some_and(|k| k == "train")
            {
                Role::Time
            } else {
                Role::Metric
            };
            Column {
                key: key.clone(),
                label: String::new(),
                role,
                values: metrics
                    .iter()
                    .map(|m| m.get(key).map(|x| Value::from(*x)))
                    .collect(),
            }
        })
        .collect();
    // Per model: accuracy, loss, then the training times.
    metric_cols.sort_by_key(|c| (c.role == Role::Time, model_of(&c.key), c.role as u8));
    cols.extend(metric_cols);
    label(&mut cols);
    cols
}

fn stage_of(key: &str) -> &str {
    key.split('.').next().unwrap_or(key)
}

/// The model (or stage) a metric is about: evaluate's `models.<stage>`, else its stage.
fn model_of(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    match parts.as_slice() {
        [_, "models", model, ..] => model.to_string(),
        [stage, ..] => stage.to_string(),
        [] => String::new(),
    }
}

/// Short, unambiguous headers: the last key (`lr`), else `base.lr`, else the full key.
fn label(cols: &mut [Column]) {
    let candidates: Vec<Vec<String>> = cols
        .iter()
        .map(|c| {
            let last = c.key.rsplit('.').next().unwrap_or(&c.key).to_string();
            let model = short(&model_of(&c.key));
            match c.role {
                Role::Accuracy => vec![format!("{model}.acc"), c.key.clone()],
                Role::Loss => vec![format!("{model}.loss"), c.key.clone()],
                Role::Time => vec![format!("{model}.time"), c.key.clone()],
                Role::Param | Role::Metric => {
                    vec![
                        last.clone(),
                        format!("{}.{last}", short(stage_of(&c.key))),
                        c.key.clone(),
                    ]
                }
            }
        })
        .collect();
    let mut level = vec![0usize; cols.len()];
    loop {
        let labels: Vec<&String> = candidates
            .iter()
            .zip(&level)
            .map(|(c, &l)| &c[l.min(c.len() - 1)])
            .collect();
        let mut changed = false;
        for i in 0..cols.len() {
            let clash = (0..cols.len()).any(|j| j != i && labels[j] == labels[i]);
            if clash && level[i] + 1 < candidates[i].len() {
                level[i] += 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (i, c) in cols.iter_mut().enumerate() {
        c.label = candidates[i][level[i].min(candidates[i].len() - 1)].clone();
    }
}

/// Orders the experiments: newest first, or by `--sort` (ascending; `--reverse` flips).
fn order<'a>(exps: &'a [Experiment], opts: &Options) -> Result<Vec<&'a Experiment>, PipeError> {
    let mut rows: Vec<&Experiment> = exps.iter().collect();
    rows.reverse();
    if let Some(sort) = &opts.sort {
        let cols = columns(&rows);
        let keyed: Vec<(usize, Option<Value>)> = match sort.as_str() {
            "name" => rows
                .iter()
                .enumerate()
                .map(|(i, e)| (i, Some(Value::from(e.name.clone()))))
                .collect(),
            "when" | "created" => rows
                .iter()
                .enumerate()
                .map(|(i, e)| (i, Some(Value::from(e.seq))))
                .collect(),
            _ => {
                let col = cols
                    .iter()
                    .find(|c| c.label == *sort || c.key == *sort)
                    .ok_or_else(|| {
                        let names = ["name", "when"]
                            .into_iter()
                            .map(str::to_string)
                            .chain(cols.iter().map(|c| c.label.clone()))
                            .collect::<Vec<_>>();
                        PipeError::Config(format!(
                            "--sort `{sort}`: no such column{}; columns: {}",
                            crate::error::suggestion(sort, names.iter().map(String::as_str)),
                            names.join(", ")
                        ))
                    })?;
                col.values.iter().cloned().enumerate().collect()
            }
        };
        let mut keyed = keyed;
        keyed.sort_by(|(_, a), (_, b)| compare(a, b));
        if opts.reverse {
            keyed.reverse();
        }
        rows = keyed.into_iter().map(|(i, _)| rows[i]).collect();
    } else if opts.reverse {
        rows.reverse();
    }
    Ok(rows)
}

/// Numbers by value, other values by their text, missing ones last.
fn compare(a: &Option<Value>, b: &Option<Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => super::show_value(x).cmp(&super::show_value(y)),
        },
    }
}

/// `exp show`.
pub fn run(exps: &[Experiment], current: Option<&str>, opts: &Options) -> Result<(), PipeError> {
    let selected: Vec<Experiment> = if opts.names.is_empty() {
        exps.to_vec()
    } else {
        opts.names
            .iter()
            .map(|n| super::find(exps, n).cloned())
            .collect::<Result<_, _>>()?
    };
    let rows = order(&selected, opts)?;
    let cols = columns(&rows);
    if let Some(path) = &opts.html {
        let mut header = vec!["name".to_string(), "when (UTC)".to_string()];
        header.extend(cols.iter().map(|c| c.label.clone()));
        let cells = rows
            .iter()
            .enumerate()
            .map(|(r, e)| {
                let mut line = vec![e.name.clone(), when(e)];
                line.extend(cols.iter().map(|c| c.cell(r)));
                line
            })
            .collect();
        super::html::write(path, &rows, (header, cells), current, &opts.artifacts)?;
        return output::emit_line(&format!(
            "wrote {} ({} experiments)",
            path.display(),
            rows.len()
        ));
    }
    if opts.json {
        let items: Vec<Value> = rows
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "id": e.id,
                    "created": e.created,
                    "current": Some(e.id.as_str()) == current,
                    "overrides": e.overrides,
                    "params": flat_params(&e.stages),
                    "metrics": all_metrics(&e.stages),
                    "fingerprints": e.stages.iter().map(|(k, s)| (k.clone(), s.fingerprint.clone())).collect::<BTreeMap<_, _>>(),
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&items).unwrap_or_default();
        return output::emit_line(&text);
    }
    if opts.csv {
        let mut lines = Vec::new();
        let mut header = vec!["current".to_string(), "name".into(), "created".into()];
        header.extend(cols.iter().map(|c| c.key.clone()));
        lines.push(csv_line(&header));
        for (r, e) in rows.iter().enumerate() {
            let mut cells = vec![
                (Some(e.id.as_str()) == current).to_string(),
                e.name.clone(),
                e.created.clone(),
            ];
            cells.extend(cols.iter().map(|c| match &c.values[r] {
                None => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            }));
            lines.push(csv_line(&cells));
        }
        return output::emit(&lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    }
    if rows.is_empty() {
        return output::emit_line(
            "no experiments yet: each successful `fmnist-pipe run` records one",
        );
    }
    let mut text = table(&rows, &cols, current, opts.width);
    if opts.names.is_empty() && !rows.iter().any(|e| Some(e.id.as_str()) == current) {
        text.push_str("(the workspace's state is none of these: `fmnist-pipe run` records it)\n");
    }
    output::emit(&text)
}

fn csv_line(cells: &[String]) -> String {
    cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The text table, columns dropped from the right (times, losses, other metrics, params)
/// until it fits `width`.
/// "MM-DD HH:MM" of when an experiment was first reached.
fn when(e: &Experiment) -> String {
    e.created.get(5..16).unwrap_or(&e.created).replace('T', " ")
}

fn table(rows: &[&Experiment], cols: &[Column], current: Option<&str>, width: usize) -> String {
    let mut fixed: Vec<(String, Vec<String>)> = vec![
        (
            " ".to_string(),
            rows.iter()
                .map(|e| {
                    if Some(e.id.as_str()) == current {
                        "*"
                    } else {
                        " "
                    }
                    .to_string()
                })
                .collect(),
        ),
        (
            "name".to_string(),
            rows.iter().map(|e| e.name.clone()).collect(),
        ),
        (
            "when (UTC)".to_string(),
            rows.iter().map(|e| when(e)).collect(),
        ),
    ];
    let mut shown: Vec<(usize, String, Vec<String>)> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                i,
                c.label.clone(),
                (0..rows.len()).map(|r| c.cell(r)).collect(),
            )
        })
        .collect();
    let col_width = |label: &str, cells: &[String]| {
        cells
            .iter()
            .chain([&label.to_string()])
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let total = |fixed: &[(String, Vec<String>)], shown: &[(usize, String, Vec<String>)]| {
        fixed
            .iter()
            .map(|(l, c)| col_width(l, c) + 2)
            .sum::<usize>()
            + shown
                .iter()
                .map(|(_, l, c)| col_width(l, c) + 2)
                .sum::<usize>()
    };
    let mut dropped = Vec::new();
    for role in [
        Role::Time,
        Role::Loss,
        Role::Metric,
        Role::Accuracy,
        Role::Param,
    ] {
        while total(&fixed, &shown) > width + 2 {
            let Some(pos) = shown.iter().rposition(|(i, _, _)| cols[*i].role == role) else {
                break;
            };
            let (i, _, _) = shown.remove(pos);
            dropped.push(cols[i].label.clone());
        }
    }
    let mut all: Vec<(String, Vec<String>, bool)> =
        fixed.drain(..).map(|(l, c)| (l, c, false)).collect();
    all.extend(
        shown
            .into_iter()
            .map(|(i, l, c)| (l, c, cols[i].role != Role::Param)),
    );
    let widths: Vec<usize> = all.iter().map(|(l, c, _)| col_width(l, c)).collect();
    let mut out = String::new();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .zip(&all)
            .map(|((s, w), (_, _, right))| {
                if *right {
                    format!("{s:>w$}")
                } else {
                    format!("{s:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out.push_str(&line(all.iter().map(|(l, _, _)| l.as_str()).collect()));
    out.push('\n');
    for r in 0..rows.len() {
        out.push_str(&line(all.iter().map(|(_, c, _)| c[r].as_str()).collect()));
        out.push('\n');
    }
    // The legend: which stage each short name stands for.
    let mut legend = BTreeMap::new();
    for c in cols {
        let stage = if matches!(c.role, Role::Param | Role::Metric) {
            stage_of(&c.key).to_string()
        } else {
            model_of(&c.key)
        };
        if c.label.starts_with(&format!("{}.", short(&stage))) && short(&stage) != stage {
            legend.insert(short(&stage), stage);
        }
    }
    let mut notes: Vec<String> = legend
        .iter()
        .map(|(s, stage)| format!("{s} = {stage}"))
        .collect();
    if cols.iter().any(|c| c.role == Role::Accuracy) {
        notes.push("acc/loss = test set; time = training".to_string());
    }
    if !notes.is_empty() {
        out.push_str(&format!("({})\n", notes.join("; ")));
    }
    if !dropped.is_empty() {
        out.push_str(&format!(
            "(not shown for width: {}; --csv and --json have every column)\n",
            dropped.join(", ")
        ));
    }
    out
}
