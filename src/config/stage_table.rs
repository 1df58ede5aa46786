//! One `[stages.NAME]` table into a `Stage`: a built-in kind (its params validated by the
//! kind) or a command stage (`cmd`, `deps`, `outs`).

use std::ops::Range;

use super::paths::clean_paths;
use super::source::{params_error, wrong_type, Entries, Entry, Source};
use super::{Body, Executor, Resources, Stage, BUILTIN_ENGINE_KEYS, COMMAND_KEYS, MAX_STAGE_NAME};
use crate::error::{suggestion, PipeError};
use crate::registry::Registry;
use serde::Deserialize;

fn string_list(
    src: &Source,
    entry: &Entry,
    stage: &str,
    key: &str,
    what: &str,
) -> Result<Vec<String>, PipeError> {
    let expected = format!("an array of {what}");
    let table = format!("stage `{stage}`");
    let items = entry
        .value
        .as_array()
        .ok_or_else(|| wrong_type(src, entry, &table, key, &expected))?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| wrong_type(src, entry, &table, key, &expected))
        })
        .collect()
}

/// Takes a stage's `executor` and `resources` out of its table (they are not params).
fn placement(
    src: &Source,
    stage: &str,
    e: &mut Entries,
) -> Result<(Option<Executor>, Resources), PipeError> {
    let table = format!("stage `{stage}`");
    let executor = match e.remove("executor") {
        Some(entry) => Some(
            entry
                .value
                .as_str()
                .ok_or_else(|| {
                    wrong_type(src, &entry, &table, "executor", "a string (local | slurm)")
                })?
                .parse::<Executor>()
                .map_err(|msg| src.error(entry.value_span.as_ref(), format!("{table}: {msg}")))?,
        ),
        None => None,
    };
    let resources = match e.remove("resources") {
        Some(entry) => {
            let at = entry.value_span.as_ref();
            let resources = Resources::deserialize(entry.value.clone()).map_err(|err| {
                let msg = err.message().trim().replace('\n', " ");
                src.error(at, format!("{table}: resources: {msg}"))
            })?;
            resources
                .check()
                .map_err(|msg| src.error(at, format!("{table}: {msg}")))?;
            resources
        }
        None => Resources::default(),
    };
    Ok((executor, resources))
}

pub(super) fn stage_from_entries(
    src: &Source,
    registry: &Registry,
    name: String,
    span: &Range<usize>,
    mut e: Entries,
) -> Result<Stage, PipeError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || name == "pipeline"
    {
        return Err(src.error(
            Some(span),
            format!(
                "stage name `{name}` must be letters, digits, `-` and `_` (and not `pipeline`)"
            ),
        ));
    }
    if name.len() > MAX_STAGE_NAME {
        return Err(src.error(
            Some(span),
            format!(
                "stage name `{}...` is {} characters long; at most {MAX_STAGE_NAME} (it names folders and files)",
                &name[..24],
                name.len()
            ),
        ));
    }
    let (needs, needs_at) = match e.remove("needs") {
        Some(entry) => (
            string_list(src, &entry, &name, "needs", "stage names")?,
            src.at(entry.value_span.as_ref()),
        ),
        None => (Vec::new(), src.at(Some(span))),
    };
    let (executor, resources) = placement(src, &name, &mut e)?;
    let has_cmd = e.contains_key("cmd");
    let kind_entry = e.remove("kind");
    let (body, hashed_params, full_params) = match (kind_entry, has_cmd) {
        (Some(_), true) => {
            return Err(src.error(Some(span), format!("stage `{name}` has both `kind` and `cmd`; a stage is either built-in (kind) or a command (cmd)")))
        }
        (None, false) => {
            return Err(src.error(
                Some(span),
                format!(
                    "stage `{name}` has neither `kind` nor `cmd`; set `kind` to one of {} or give a `cmd`",
                    registry.known_kinds()
                ),
            ))
        }
        (Some(kind_entry), false) => {
            let kind = kind_entry
                .value
                .as_str()
                .ok_or_else(|| wrong_type(src, &kind_entry, &format!("stage `{name}`"), "kind", "a string"))?
                .to_string();
            let implementation = registry.get(&kind).ok_or_else(|| {
                src.error(
                    kind_entry.value_span.as_ref(),
                    format!("unknown kind `{kind}` in stage `{name}`; known kinds: {}", registry.known_kinds()),
                )
            })?;
            let table: toml::Table = e.iter().map(|(k, v)| (k.clone(), v.value.clone())).collect();
            let validated = implementation
                .validate(&table)
                .map_err(|msg| params_error(src, &name, span, &e, &kind, &msg))?;
            let body = Body::Builtin {
                kind,
                version: implementation.version,
                unhashed_outputs: implementation.unhashed_outputs,
                progress_params: implementation.progress_params,
                table,
            };
            (body, validated.hashed, validated.full)
        }
        (None, true) => {
            let mut cmd = None;
            let mut deps = Vec::new();
            let mut outs = Vec::new();
            for (key, entry) in &e {
                match key.as_str() {
                    "cmd" => {
                        cmd = Some(
                            entry
                                .value
                                .as_str()
                                .ok_or_else(|| wrong_type(src, entry, &format!("stage `{name}`"), key, "a string"))?
                                .to_string(),
                        )
                    }
                    "deps" => deps = clean_paths(src, entry, &name, key, string_list(src, entry, &name, key, "paths")?)?,
                    "outs" => outs = clean_paths(src, entry, &name, key, string_list(src, entry, &name, key, "paths")?)?,
                    other => {
                        let candidates = COMMAND_KEYS.iter().chain(BUILTIN_ENGINE_KEYS).copied();
                        return Err(src.error(
                            entry.key_span.as_ref(),
                            format!("unknown key `{other}` in command stage `{name}`{}", suggestion(other, candidates)),
                        ));
                    }
                }
            }
            let cmd = cmd.unwrap_or_default();
            if cmd.trim().is_empty() {
                return Err(src.error(Some(span), format!("stage `{name}`: `cmd` is empty")));
            }
            let mut sorted_deps = deps.clone();
            sorted_deps.sort();
            let mut sorted_outs = outs.clone();
            sorted_outs.sort();
            let params = serde_json::json!({ "cmd": cmd, "deps": sorted_deps, "outs": sorted_outs });
            (Body::Command { cmd, deps, outs }, params.clone(), params)
        }
    };
    Ok(Stage {
        name,
        needs,
        after: Vec::new(),
        body,
        executor,
        resources,
        hashed_params,
        full_params,
        at: src.at(Some(span)),
        needs_at,
    })
}
