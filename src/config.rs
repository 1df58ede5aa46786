//! pipeline.toml: the schema (a `[pipeline]` table and `[stages.NAME]` tables), `--set`
//! overrides, and validation with file:line messages. Everything a user can get wrong in the
//! file is reported here, before anything runs.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{suggestion, PipeError};
use crate::registry::Registry;

const TOP_KEYS: &[&str] = &["pipeline", "stages"];
const PIPELINE_KEYS: &[&str] = &["device", "kernels", "seed"];
const COMMAND_KEYS: &[&str] = &["cmd", "deps", "outs", "needs"];
/// Keys of a built-in stage's table that belong to the engine, not to the kind's params.
const BUILTIN_ENGINE_KEYS: &[&str] = &["kind", "needs"];
/// The deepest key path `--set` takes (pipeline params nest two or three levels).
const MAX_SET_DEPTH: usize = 32;
/// The longest stage name: names become parts of file names (artifacts/.tmp/NAME-...-PID-N,
/// artifacts/.scratch/NAME-FINGERPRINT), which file systems cap at 255 bytes.
const MAX_STAGE_NAME: usize = 128;
/// The folder (beside pipeline.toml) that holds every built-in stage's outputs.
pub const ARTIFACTS_DIR: &str = "artifacts";

/// The parsed, validated pipeline with overrides applied.
#[derive(Debug)]
pub struct Pipeline {
    /// The workspace root: the folder holding pipeline.toml. Commands run here.
    pub root: PathBuf,
    pub device: String,
    /// The CPU's ops: "fast" kernels or the "portable" path a GPU runs (FMNIST_KERNELS
    /// overrides the file). Recorded, not hashed, like the device.
    pub kernels: fmnist_stages::ops::Kernels,
    pub seed: u64,
    /// In file order.
    pub stages: Vec<Stage>,
}

#[derive(Debug)]
pub struct Stage {
    pub name: String,
    /// Stages whose outputs this one reads as a whole (`needs`): their output hashes enter
    /// the fingerprint and a built-in stage gets them as `Input`s.
    pub needs: Vec<String>,
    /// Stages that must finish first because a `deps` path lies in their outputs; those
    /// paths are hashed as deps, so only ordering comes from here.
    pub after: Vec<String>,
    pub body: Body,
    /// The params that enter the fingerprint, as canonical JSON.
    pub hashed_params: serde_json::Value,
    /// Every resolved param (defaults filled in), handed to downstream stages.
    pub full_params: serde_json::Value,
    /// "pipeline.toml:LINE" of the stage's header, for messages about the whole stage.
    pub at: String,
    /// "pipeline.toml:LINE" of its `needs`.
    needs_at: String,
}

#[derive(Debug)]
pub enum Body {
    Builtin {
        kind: String,
        version: u32,
        /// Output files (relative to the stage's folder) kept out of the content hash
        /// downstream stages see.
        unhashed_outputs: &'static [&'static str],
        /// The stage's table minus `kind` and `needs`, overrides applied.
        table: toml::Table,
    },
    Command {
        cmd: String,
        deps: Vec<String>,
        outs: Vec<String>,
    },
}

impl Stage {
    /// The kind name as recorded in the lock and shown to stages: "cmd" for command stages.
    pub fn kind_name(&self) -> &str {
        match &self.body {
            Body::Builtin { kind, .. } => kind,
            Body::Command { .. } => "cmd",
        }
    }

    pub fn version(&self) -> u32 {
        match &self.body {
            Body::Builtin { version, .. } => *version,
            Body::Command { .. } => 0,
        }
    }

    pub fn is_builtin(&self) -> bool {
        matches!(self.body, Body::Builtin { .. })
    }

    /// The workspace-relative paths this stage writes.
    pub fn out_roots(&self) -> Vec<String> {
        match &self.body {
            Body::Builtin { .. } => vec![format!("{ARTIFACTS_DIR}/{}", self.name)],
            Body::Command { outs, .. } => outs.clone(),
        }
    }

    /// The content hash of this stage's outputs as downstream stages see it: every output
    /// file but the kind's unhashed ones (timings and the like).
    pub fn outputs_digest(&self, outs: &[crate::manifest::FileRecord]) -> String {
        match &self.body {
            Body::Builtin {
                unhashed_outputs, ..
            } if !unhashed_outputs.is_empty() => {
                let folder = format!("{ARTIFACTS_DIR}/{}/", self.name);
                let hashed: Vec<_> = outs
                    .iter()
                    .filter(|r| {
                        let inner = r.path.strip_prefix(&folder).unwrap_or(&r.path);
                        !unhashed_outputs.contains(&inner)
                    })
                    .cloned()
                    .collect();
                crate::manifest::digest(&hashed)
            }
            _ => crate::manifest::digest(outs),
        }
    }

    pub fn deps(&self) -> &[String] {
        match &self.body {
            Body::Builtin { .. } => &[],
            Body::Command { deps, .. } => deps,
        }
    }

    /// Every stage that must finish before this one.
    pub fn upstream(&self) -> impl Iterator<Item = &String> {
        self.needs.iter().chain(self.after.iter())
    }
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    pub fn artifacts(&self) -> PathBuf {
        self.root.join(ARTIFACTS_DIR)
    }

    /// A `Config` error for a name given on the command line that is not a stage.
    pub fn unknown_stage(&self, what: &str, name: &str) -> PipeError {
        let hint = suggestion(name, self.stages.iter().map(|s| s.name.as_str()));
        PipeError::Config(format!("{what}: no stage named `{name}`{hint}"))
    }
}

/// One `--set STAGE.KEY=VALUE` (or `--set pipeline.KEY=VALUE`).
#[derive(Debug, Clone)]
pub struct Override {
    pub raw: String,
    pub table: String,
    pub key_path: Vec<String>,
    pub value: toml::Value,
}

impl std::str::FromStr for Override {
    type Err = PipeError;

    fn from_str(raw: &str) -> Result<Self, PipeError> {
        let malformed = |why: &str| {
            PipeError::Config(format!(
                "malformed --set `{raw}`: {why} (expected STAGE.KEY=VALUE, e.g. train.epochs=3)"
            ))
        };
        let (lhs, rhs) = raw.split_once('=').ok_or_else(|| malformed("no `=`"))?;
        let (table, key) = lhs
            .trim()
            .split_once('.')
            .ok_or_else(|| malformed("no `.` between stage and key"))?;
        let key_path: Vec<String> = key.split('.').map(|k| k.trim().to_string()).collect();
        if table.trim().is_empty() || key_path.iter().any(|k| k.is_empty()) {
            return Err(malformed("empty stage or key name"));
        }
        // Each part nests a table: tens of thousands overflowed the stack when freed.
        if key_path.len() > MAX_SET_DEPTH {
            return Err(malformed(&format!(
                "a key path of {} parts (at most {MAX_SET_DEPTH})",
                key_path.len()
            )));
        }
        let rhs = rhs.trim();
        if rhs.is_empty() {
            return Err(malformed("no value after `=`"));
        }
        let value = match toml::from_str::<toml::Table>(&format!("v = {rhs}")) {
            Ok(mut t) => t.remove("v").ok_or_else(|| malformed("no value"))?,
            // A bare word (`device=cpu`) is taken as a string; anything that looks like it
            // meant to be TOML (quotes, arrays, tables) must parse.
            Err(_)
                if !rhs.starts_with(['"', '\'', '[', '{'])
                    && !rhs.contains(char::is_whitespace) =>
            {
                toml::Value::String(rhs.to_string())
            }
            Err(e) => return Err(malformed(&format!("value is not TOML: {}", e.message()))),
        };
        Ok(Override {
            raw: raw.to_string(),
            table: table.trim().to_string(),
            key_path,
            value,
        })
    }
}

/// The text of pipeline.toml, kept to turn byte spans into line numbers.
struct Source {
    shown: String,
    text: String,
    /// Workspace paths no stage may write: the pipeline file and its lock.
    reserved: Vec<String>,
    /// Byte offset of each line's start, for span -> line in O(log n).
    line_starts: Vec<usize>,
}

impl Source {
    fn at(&self, span: Option<&Range<usize>>) -> String {
        match span {
            Some(span) => {
                let line = self.line_starts.partition_point(|&s| s <= span.start);
                format!("{}:{}", self.shown, line.max(1))
            }
            None => self.shown.clone(),
        }
    }

    fn error(&self, span: Option<&Range<usize>>, msg: impl std::fmt::Display) -> PipeError {
        PipeError::Config(format!("{}: {msg}", self.at(span)))
    }

    fn toml_error(&self, e: &toml::de::Error) -> PipeError {
        let msg = e.message().trim().replace('\n', " ");
        self.error(e.span().as_ref(), msg)
    }
}

type SpannedTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    #[serde(default)]
    pipeline: Option<SpannedTable>,
    #[serde(default)]
    stages: Option<BTreeMap<Spanned<String>, SpannedTable>>,
}

/// A value with where it was written (None for a value from `--set`).
struct Entry {
    value: toml::Value,
    key_span: Option<Range<usize>>,
    value_span: Option<Range<usize>>,
    from_override: Option<String>,
}

type Entries = BTreeMap<String, Entry>;

fn entries(table: SpannedTable) -> Entries {
    table
        .into_iter()
        .map(|(k, v)| {
            let key_span = Some(k.span());
            let value_span = Some(v.span());
            (
                k.into_inner(),
                Entry {
                    value: v.into_inner(),
                    key_span,
                    value_span,
                    from_override: None,
                },
            )
        })
        .collect()
}

/// Reads, overrides and validates a pipeline file.
pub fn load(
    file: &Path,
    overrides: &[Override],
    registry: &Registry,
) -> Result<Pipeline, PipeError> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PipeError::Config(format!(
                "pipeline file {} not found (run in a folder with pipeline.toml, or pass --file PATH)",
                file.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(PipeError::Config(format!(
                "pipeline file {} is not UTF-8 text",
                file.display()
            )))
        }
        Err(e) if file.is_dir() => {
            return Err(PipeError::Config(format!(
                "{} is a folder, not a pipeline file ({e}); pass --file FOLDER/pipeline.toml",
                file.display()
            )))
        }
        Err(e) => return Err(PipeError::io_at(file, "read", e)),
    };
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let line_starts = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    let src = Source {
        shown: file.display().to_string(),
        text,
        reserved: vec![file_name(file), file_name(&crate::lock::lock_path(file))],
        line_starts,
    };
    let root = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };

    // One parse when the file is well-formed; only on an error a second one, to name a
    // misspelled top-level key with its line and a suggestion.
    let doc: RawDoc = match toml::from_str(&src.text) {
        Ok(doc) => doc,
        Err(e) => {
            let top: BTreeMap<Spanned<String>, toml::Value> =
                toml::from_str(&src.text).map_err(|e| src.toml_error(&e))?;
            if let Some(key) = top
                .keys()
                .find(|k| !TOP_KEYS.contains(&k.get_ref().as_str()))
            {
                return Err(src.error(
                    Some(&key.span()),
                    format!(
                        "unknown top-level key `{}`{}",
                        key.get_ref(),
                        suggestion(key.get_ref(), TOP_KEYS.iter().copied())
                    ),
                ));
            }
            return Err(src.toml_error(&e));
        }
    };

    let mut pipeline_entries = doc.pipeline.map(entries).unwrap_or_default();
    let mut stage_tables: Vec<(String, Range<usize>, Entries)> = doc
        .stages
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.get_ref().clone(), k.span(), entries(v)))
        .collect();
    stage_tables.sort_by_key(|(_, span, _)| span.start);

    for o in overrides {
        let target = if o.table == "pipeline" {
            &mut pipeline_entries
        } else if let Some((_, _, e)) = stage_tables.iter_mut().find(|(n, _, _)| *n == o.table) {
            e
        } else {
            let hint = suggestion(
                &o.table,
                stage_tables
                    .iter()
                    .map(|(n, _, _)| n.as_str())
                    .chain(["pipeline"]),
            );
            return Err(PipeError::Config(format!(
                "--set `{}`: no stage named `{}`{hint}",
                o.raw, o.table
            )));
        };
        apply_override(target, o)?;
    }

    let PipelineSettings {
        device,
        kernels,
        seed,
    } = pipeline_settings(&src, &pipeline_entries)?;

    let mut stages = Vec::with_capacity(stage_tables.len());
    for (name, span, e) in stage_tables {
        stages.push(stage_from_entries(&src, registry, name, &span, e)?);
    }
    if stages.is_empty() {
        return Err(src.error(None, "no stages: add a [stages.NAME] table"));
    }
    resolve_links(&src, &mut stages)?;
    Ok(Pipeline {
        root,
        device,
        kernels,
        seed,
        stages,
    })
}

fn apply_override(target: &mut Entries, o: &Override) -> Result<(), PipeError> {
    let (first, rest) = o
        .key_path
        .split_first()
        .ok_or_else(|| PipeError::Config(format!("malformed --set `{}`", o.raw)))?;
    if rest.is_empty() {
        target.insert(
            first.clone(),
            Entry {
                value: o.value.clone(),
                key_span: None,
                value_span: None,
                from_override: Some(o.raw.clone()),
            },
        );
        return Ok(());
    }
    let entry = target.entry(first.clone()).or_insert_with(|| Entry {
        value: toml::Value::Table(toml::Table::new()),
        key_span: None,
        value_span: None,
        from_override: Some(o.raw.clone()),
    });
    entry.from_override = Some(o.raw.clone());
    let mut node = &mut entry.value;
    for key in rest {
        let table = node.as_table_mut().ok_or_else(|| {
            PipeError::Config(format!(
                "--set `{}`: `{key}`'s parent is not a table",
                o.raw
            ))
        })?;
        node = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    *node = o.value.clone();
    Ok(())
}

/// The `[pipeline]` table's values, defaults filled in.
struct PipelineSettings {
    device: String,
    kernels: fmnist_stages::ops::Kernels,
    seed: u64,
}

fn pipeline_settings(src: &Source, entries: &Entries) -> Result<PipelineSettings, PipeError> {
    use fmnist_stages::ops::{kernels_from_env, Kernels, KERNELS_ENV};
    let mut device = "auto".to_string();
    let mut kernels = Kernels::Fast;
    let mut seed = 42u64;
    for (key, entry) in entries {
        let at = entry.value_span.as_ref();
        match key.as_str() {
            "device" => {
                device = entry
                    .value
                    .as_str()
                    .ok_or_else(|| {
                        wrong_type(
                            src,
                            entry,
                            "pipeline",
                            key,
                            "a string (auto | cpu | cuda | cuda:N | metal)",
                        )
                    })?
                    .to_string();
                let known = device == "auto"
                    || device == "cpu"
                    || device == "metal"
                    || device == "cuda"
                    || device
                        .strip_prefix("cuda:")
                        .is_some_and(|n| n.parse::<usize>().is_ok());
                if !known {
                    return Err(src.error(at, format!("[pipeline] device `{device}` is not one of auto, cpu, cuda, cuda:N, metal")));
                }
            }
            "kernels" => {
                kernels = entry
                    .value
                    .as_str()
                    .ok_or_else(|| {
                        wrong_type(src, entry, "pipeline", key, "a string (fast | portable)")
                    })?
                    .parse()
                    .map_err(|e| src.error(at, format!("[pipeline] {e}")))?;
            }
            "seed" => {
                seed = entry
                    .value
                    .as_integer()
                    .and_then(|s| u64::try_from(s).ok())
                    .ok_or_else(|| {
                        wrong_type(src, entry, "pipeline", key, "a non-negative integer")
                    })?;
            }
            other => {
                return Err(src.error(
                    entry.key_span.as_ref(),
                    format!(
                        "unknown key `{other}` in [pipeline]{}",
                        suggestion(other, PIPELINE_KEYS.iter().copied())
                    ),
                ))
            }
        }
    }
    if let Some(from_env) =
        kernels_from_env().map_err(|e| PipeError::Config(format!("{KERNELS_ENV}: {e}")))?
    {
        kernels = from_env;
    }
    Ok(PipelineSettings {
        device,
        kernels,
        seed,
    })
}

fn wrong_type(src: &Source, entry: &Entry, table: &str, key: &str, expected: &str) -> PipeError {
    let origin = match &entry.from_override {
        Some(raw) => format!(" (from --set `{raw}`)"),
        None => String::new(),
    };
    src.error(
        entry.value_span.as_ref(),
        format!(
            "`{key}` in {table} must be {expected}, found {}{origin}",
            entry.value.type_str()
        ),
    )
}

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

fn stage_from_entries(
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
        hashed_params,
        full_params,
        at: src.at(Some(span)),
        needs_at,
    })
}

/// Places a kind's validation message on the line of the key (or value) it names.
fn params_error(
    src: &Source,
    stage: &str,
    span: &Range<usize>,
    e: &Entries,
    kind: &str,
    msg: &str,
) -> PipeError {
    let names: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    let mut at = Some(span.clone());
    let mut hint = String::new();
    if let Some(first) = names.first() {
        if let Some(entry) = e.get(*first) {
            at = entry.key_span.clone().or(at);
        } else if let Some(entry) = e.values().find(|v| {
            v.value_span
                .as_ref()
                .is_some_and(|s| src.text.get(s.clone()).is_some_and(|t| t.contains(first)))
        }) {
            at = entry.value_span.clone();
        }
        if msg.starts_with("unknown field") && !msg.contains("did you mean") {
            hint = suggestion(first, names.iter().skip(1).copied());
        }
    }
    src.error(
        at.as_ref(),
        format!("stage `{stage}` (kind `{kind}`): {msg}{hint}"),
    )
}

/// Normalizes workspace-relative paths and rejects ones that leave the workspace.
fn clean_paths(
    src: &Source,
    entry: &Entry,
    stage: &str,
    key: &str,
    paths: Vec<String>,
) -> Result<Vec<String>, PipeError> {
    paths
        .into_iter()
        .map(|p| {
            let path = Path::new(&p);
            let mut parts = Vec::new();
            for c in path.components() {
                match c {
                    Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
                    Component::CurDir => {}
                    _ => {
                        return Err(src.error(
                            entry.value_span.as_ref(),
                            format!("`{key}` of stage `{stage}`: `{p}` must be a relative path inside the workspace"),
                        ))
                    }
                }
            }
            if parts.is_empty() {
                return Err(src.error(entry.value_span.as_ref(), format!("`{key}` of stage `{stage}`: empty path")));
            }
            let joined = parts.join("/");
            let engine_owned = joined == ARTIFACTS_DIR
                || joined.starts_with(&format!("{ARTIFACTS_DIR}/."))
                || src.reserved.iter().any(|r| paths_overlap(&joined, r));
            if key == "outs" && engine_owned {
                return Err(src.error(
                    entry.value_span.as_ref(),
                    format!("`outs` of stage `{stage}`: `{p}` is reserved for the engine (the pipeline file, its lock, artifacts/ and its hidden folders)"),
                ));
            }
            Ok(joined)
        })
        .collect()
}

/// True when one path is the other or lies inside it.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let inside = |x: &str, dir: &str| {
        x.len() > dir.len() && x.starts_with(dir) && x.as_bytes()[dir.len()] == b'/'
    };
    a == b || inside(a, b) || inside(b, a)
}

/// The entries of `owners` strictly inside folder `dir`.
fn inside_of<'a>(
    owners: &'a BTreeMap<String, String>,
    dir: &str,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    // Every "dir/..." sorts between "dir/" and "dir0" ('0' follows '/').
    owners.range(format!("{dir}/")..format!("{dir}0"))
}

/// `path` and every folder above it: "a/b/c" -> "a/b/c", "a/b", "a".
fn path_and_parents(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(path), |p| p.rfind('/').map(|i| &p[..i]))
}

/// Checks `needs`, derives ordering from `deps`, and rejects two stages writing one path.
fn resolve_links(src: &Source, stages: &mut [Stage]) -> Result<(), PipeError> {
    let names: BTreeSet<String> = stages.iter().map(|s| s.name.clone()).collect();
    // Every output root and its stage, sorted: overlaps are found through each path's
    // parents and a range scan, not by comparing every pair (a long pipeline was quadratic).
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for stage in stages.iter() {
        for out in stage.out_roots() {
            let clash = path_and_parents(&out)
                .find_map(|p| owners.get(p).map(|o| (p.to_string(), o.clone())))
                .or_else(|| {
                    inside_of(&owners, &out)
                        .next()
                        .map(|(p, o)| (p.clone(), o.clone()))
                });
            if let Some((path, other)) = clash {
                let longer = if path.len() > out.len() { path } else { out };
                return Err(src.error(
                    None,
                    format!(
                        "stages `{other}` and `{}` both write `{longer}`",
                        stage.name
                    ),
                ));
            }
            owners.insert(out, stage.name.clone());
        }
    }
    for stage in stages.iter_mut() {
        for need in &stage.needs {
            if !names.contains(need) {
                return Err(PipeError::Config(format!(
                    "{}: stage `{}` needs `{need}`, which is no stage{}",
                    stage.needs_at,
                    stage.name,
                    suggestion(need, names.iter().map(String::as_str))
                )));
            }
        }
        let mut after: Vec<String> = Vec::new();
        for dep in stage.deps() {
            let upstream_owners = path_and_parents(dep)
                .filter_map(|p| owners.get(p))
                .chain(inside_of(&owners, dep).map(|(_, o)| o));
            for owner in upstream_owners {
                if *owner != stage.name && !stage.needs.contains(owner) && !after.contains(owner) {
                    after.push(owner.clone());
                }
            }
        }
        stage.after = after;
    }
    Ok(())
}
