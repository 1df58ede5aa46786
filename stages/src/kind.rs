//! The contract of a built-in stage kind: what the engine's registry lists. A kind is a type
//! (a unit struct in `kinds/`) naming itself, its version and what of its params and outputs
//! stays out of fingerprints, with typed `Params` and a `run`. Each kind's module also
//! exports a typed reader of its own outputs, so no other stage spells its file names.

use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::{Input, Metrics, StageContext, StageError};

pub trait StageKind: 'static {
    /// The name a pipeline gives in `kind = "..."`.
    const NAME: &'static str;
    /// Part of every fingerprint of the kind: bump it when the outputs would change for the
    /// same params and inputs (e.g. different model bytes), so stale results are not reused.
    const VERSION: u32;
    /// Top-level params left out of the fingerprint: they cannot change the outputs (e.g.
    /// download mirrors and timeouts).
    const UNHASHED_PARAMS: &'static [&'static str] = &[];
    /// Output files (relative to the stage's folder) that are published, cached and restored
    /// like the others but left out of the content hash downstream stages see: run-dependent
    /// facts such as timings, so that a rerun to identical results does not make the
    /// consumers stale.
    const UNHASHED_OUTPUTS: &'static [&'static str] = &[];
    /// Top-level params that only say how far a run goes (train's `epochs`), such that the
    /// first part of a longer run is the whole of a shorter one. Runs whose params differ in
    /// these alone share a continuation folder ([`StageContext::continue_dir`]).
    const PROGRESS_PARAMS: &'static [&'static str] = &[];

    /// The stage's `[stages.NAME]` table (minus `kind` and `needs`), deserialized: unknown or
    /// wrong-typed keys are config errors; what it serializes back to (defaults filled in)
    /// is what gets hashed.
    type Params: DeserializeOwned + Serialize + 'static;

    /// Rules out values the types cannot (ranges, combinations), as config errors before
    /// anything runs.
    fn validate(params: &Self::Params) -> Result<(), StageError>;

    /// Runs the stage: reads `ctx.inputs`, writes into `ctx.out_dir`, returns its metrics.
    fn run(params: Self::Params, ctx: &StageContext) -> anyhow::Result<Metrics>;
}

/// Implements [`StageKind`] for the unit struct `$kind` from the items of its module:
/// `NAME`, `VERSION`, `Params` (with `Params::validate`) and `run`; further `CONST = value`
/// pairs set the unhashed params and outputs.
macro_rules! stage_kind {
    ($kind:ident $(, $key:ident = $value:expr)* $(,)?) => {
        impl $crate::kind::StageKind for $kind {
            const NAME: &'static str = NAME;
            const VERSION: u32 = VERSION;
            $(const $key: &'static [&'static str] = $value;)*
            type Params = Params;
            fn validate(params: &Params) -> Result<(), $crate::context::StageError> {
                params.validate()
            }
            fn run(
                params: Params,
                ctx: &$crate::context::StageContext,
            ) -> anyhow::Result<$crate::context::Metrics> {
                run(params, ctx)
            }
        }
    };
}
pub(crate) use stage_kind;

/// A stage's published outputs as other stages see them: its kind's module adds the typed
/// readers (`impl Outputs<Stats> { ... }`), which alone know the file names.
pub struct Outputs<K> {
    /// The stage's name in pipeline.toml.
    pub stage: String,
    pub(crate) dir: PathBuf,
    kind: PhantomData<K>,
}

impl<K: StageKind> Outputs<K> {
    /// The outputs of `input` (which the caller found to be of kind `K`).
    pub fn of(input: &Input) -> Self {
        Outputs {
            stage: input.stage.clone(),
            dir: input.dir.clone(),
            kind: PhantomData,
        }
    }

    /// The outputs of the stage's first input of kind `K`.
    pub fn first(ctx: &StageContext) -> Result<Self, StageError> {
        ctx.input_of_kind(K::NAME).map(Self::of)
    }

    /// A file of the outputs (for the kind's readers).
    pub(crate) fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}
