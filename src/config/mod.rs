//! pipeline.toml: the schema (a `[pipeline]` table and `[stages.NAME]` tables), `--set`
//! overrides, and validation with file:line messages. Everything a user can get wrong in the
//! file is reported here, before anything runs.

mod cache;
mod overrides;
mod paths;
mod placement;
mod settings;
mod source;
mod stage_table;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::error::{suggestion, PipeError};
use crate::registry::Registry;

use cache::cache_settings;
pub use cache::{check_endpoint, check_remote, CacheSettings, PushMode};
use overrides::apply_override;
pub use overrides::Override;
pub use paths::paths_overlap;
use paths::resolve_links;
pub use placement::{Executor, Resources};
use settings::{pipeline_settings, PipelineSettings};
use source::{entries, Entries, RawDoc, Source};
use stage_table::stage_from_entries;

const TOP_KEYS: &[&str] = &["cache", "pipeline", "stages"];
pub(super) const CACHE_KEYS: &[&str] = &["endpoint", "push", "remote", "required"];
pub(super) const PIPELINE_KEYS: &[&str] = &["device", "executor", "kernels", "seed"];
pub(super) const COMMAND_KEYS: &[&str] = &["cmd", "deps", "outs", "needs", "executor", "resources"];
/// Keys of a built-in stage's table that belong to the engine, not to the kind's params.
pub(super) const BUILTIN_ENGINE_KEYS: &[&str] = &["kind", "needs", "executor", "resources"];
/// The deepest key path `--set` takes (pipeline params nest two or three levels).
pub(super) const MAX_SET_DEPTH: usize = 32;
/// The longest stage name: names become parts of file names (artifacts/.tmp/NAME-...-PID-N,
/// artifacts/.scratch/NAME-FINGERPRINT), which file systems cap at 255 bytes.
pub(super) const MAX_STAGE_NAME: usize = 128;
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
    /// Where stages run unless they say otherwise (`--executor` overrides it for one run).
    pub executor: Executor,
    /// The `[cache]` table: the remote run cache, if any (hashed and recorded nowhere).
    pub cache: CacheSettings,
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
    /// This stage's own `executor`, if it names one.
    pub executor: Option<Executor>,
    /// What it asks of a cluster (recorded, not hashed).
    pub resources: Resources,
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
        /// Params that only say how far a run goes (see [`crate::fingerprint::lineage`]).
        progress_params: &'static [&'static str],
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

    /// Where this stage runs in `pipeline`.
    pub fn executor_in(&self, pipeline: &Pipeline) -> Executor {
        self.executor.unwrap_or(pipeline.executor)
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
    let mut cache_entries = doc.cache.map(entries).unwrap_or_default();
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
        } else if o.table == "cache" {
            &mut cache_entries
        } else if let Some((_, _, e)) = stage_tables.iter_mut().find(|(n, _, _)| *n == o.table) {
            e
        } else {
            let hint = suggestion(
                &o.table,
                stage_tables
                    .iter()
                    .map(|(n, _, _)| n.as_str())
                    .chain(["pipeline", "cache"]),
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
        executor,
    } = pipeline_settings(&src, &pipeline_entries)?;
    let cache = cache_settings(&src, &cache_entries)?;

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
        executor,
        cache,
        stages,
    })
}
