//! Built-in stage kinds: kind name -> implementation. The one place that knows both the
//! engine and the stages crate; adding a kind is one line in [`Registry::builtins`] naming a
//! type that implements fmnist-stages' `StageKind`.

use std::collections::BTreeMap;

use fmnist_stages::{Metrics, StageContext, StageKind};
use serde::de::DeserializeOwned;
use serde::Serialize;

type ValidateFn = dyn Fn(&toml::Table) -> Result<serde_json::Value, String> + Send + Sync;
type RunFn = dyn Fn(&toml::Table, &StageContext) -> anyhow::Result<Metrics> + Send + Sync;

/// One built-in kind: its version (part of every fingerprint) and type-erased entry points.
pub struct Kind {
    pub name: &'static str,
    pub version: u32,
    /// Top-level params that do not enter the fingerprint (e.g. download mirrors).
    pub unhashed: &'static [&'static str],
    /// Output files (paths relative to the stage's folder) that are published, cached and
    /// restored like the others but left out of the content hash downstream stages see
    /// (timings: a retrain to identical model bytes must not make its consumers stale).
    pub unhashed_outputs: &'static [&'static str],
    /// Top-level params that only say how far a run goes (train's `epochs`): runs differing
    /// in these alone share a continuation folder (see [`crate::fingerprint::lineage`]).
    pub progress_params: &'static [&'static str],
    validate: Box<ValidateFn>,
    run: Box<RunFn>,
}

/// A built-in stage's params after validation.
pub struct Validated {
    /// Every param, defaults filled in (what downstream stages see).
    pub full: serde_json::Value,
    /// `full` minus the kind's unhashed params (what the fingerprint sees).
    pub hashed: serde_json::Value,
}

/// A [`StageKind`] as the engine sees it: its name, version, unhashed params and outputs, and
/// type-erased entry points.
pub fn kind<K: StageKind>() -> Kind {
    Kind {
        unhashed_outputs: K::UNHASHED_OUTPUTS,
        progress_params: K::PROGRESS_PARAMS,
        ..builtin(K::NAME, K::VERSION, K::run, K::UNHASHED_PARAMS, K::validate)
    }
}

/// Wires a stage (`VERSION`, `Params`, `run`, a validation) as a kind, with no unhashed
/// outputs (see [`kind`] for a `StageKind`). The
/// stage's table (minus `kind` and `needs`) is deserialized into `P`, so unknown or
/// wrong-typed params are config errors before anything runs; `check` rules out values the
/// types cannot (ranges, combinations), also as config errors; the resolved `P` (defaults
/// included) is what gets hashed.
pub fn builtin<P, E>(
    name: &'static str,
    version: u32,
    run: fn(P, &StageContext) -> anyhow::Result<Metrics>,
    unhashed: &'static [&'static str],
    check: fn(&P) -> Result<(), E>,
) -> Kind
where
    P: DeserializeOwned + Serialize + 'static,
    E: std::fmt::Display + 'static,
{
    Kind {
        name,
        version,
        unhashed,
        unhashed_outputs: &[],
        progress_params: &[],
        validate: Box::new(move |table| {
            let params = parse::<P>(table)?;
            check(&params).map_err(|e| e.to_string())?;
            serde_json::to_value(&params).map_err(|e| format!("params cannot be represented: {e}"))
        }),
        run: Box::new(move |table, ctx| {
            let params = parse::<P>(table).map_err(anyhow::Error::msg)?;
            run(params, ctx)
        }),
    }
}

fn parse<P: DeserializeOwned>(table: &toml::Table) -> Result<P, String> {
    P::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e| e.message().trim().replace('\n', " "))
}

impl Kind {
    pub fn validate(&self, table: &toml::Table) -> Result<Validated, String> {
        let full = (self.validate)(table)?;
        let mut hashed = full.clone();
        if let Some(map) = hashed.as_object_mut() {
            for key in self.unhashed {
                map.remove(*key);
            }
        }
        Ok(Validated { full, hashed })
    }

    pub fn run(&self, table: &toml::Table, ctx: &StageContext) -> anyhow::Result<Metrics> {
        (self.run)(table, ctx)
    }
}

/// The set of kinds a pipeline may name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Kind>,
}

impl Registry {
    pub fn from_kinds(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Registry {
            kinds: kinds.into_iter().map(|k| (k.name, k)).collect(),
        }
    }

    /// The kinds this binary ships: one line per `StageKind` of fmnist-stages.
    pub fn builtins() -> Self {
        use fmnist_stages::kinds::{download, evaluate, report, stats, train, visualize};
        Registry::from_kinds([
            kind::<download::Download>(),
            kind::<stats::StatsKind>(),
            kind::<train::Train>(),
            kind::<evaluate::Evaluate>(),
            kind::<visualize::Visualize>(),
            kind::<report::Report>(),
        ])
    }

    pub fn get(&self, kind: &str) -> Option<&Kind> {
        self.kinds.get(kind)
    }

    /// "a, b, c" (or a note that there are none), for error messages.
    pub fn known_kinds(&self) -> String {
        if self.kinds.is_empty() {
            "(none: this build has no built-in kinds)".to_string()
        } else {
            self.kinds.keys().copied().collect::<Vec<_>>().join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_come_from_the_stage_kinds() {
        let registry = Registry::builtins();
        assert_eq!(
            registry.known_kinds(),
            "download, evaluate, report, stats, train, visualize"
        );
        let train = registry
            .get("train")
            .map(|k| (k.version, k.unhashed_outputs));
        assert_eq!(train, Some((4, &["timings.json"][..])));
        let download = registry.get("download").map(|k| k.unhashed);
        assert_eq!(download, Some(&["sources", "retries", "timeout_secs"][..]));
    }
}
