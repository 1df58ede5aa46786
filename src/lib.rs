//! fmnist-pipe's engine: a declarative, incremental pipeline runner. The stages themselves
//! (the Fashion-MNIST study) live in the fmnist-stages crate and reach the engine only
//! through `registry`.
//!
//! How a `run` flows:
//!
//! - `config` reads pipeline.toml (with `--set` overrides) into a validated `Pipeline`;
//!   `dag` orders it; `workspace` loads it with its `lock` and guards every change (run
//!   lock, path fence, crash recovery through `journal`).
//! - `plan` assesses each stage against the lock (`fingerprint`, `manifest`) into a
//!   `Decision`: up to date, restore from the `cache`, or run, with typed `reason`s.
//!   `status` and `run --dry-run` only render the plan.
//! - `execute` hands the selected stages to `schedule` (the ready set, `-j`, failure
//!   propagation); each goes through `stage_run` (decide, restore or run, publish), whose
//!   work is done by a `runner` (`LocalRunner`: built-in kinds in-process, commands through
//!   `command_stage`; `slurm`: one batch job per stage, running `exec_stage` for built-in
//!   kinds), and outputs land through `publish`.
//! - `cache` is the local run cache; with `[cache] remote` set, `remote` puts a shared one
//!   (S3 or a shared disk) behind it for `run`, and holds `push`, `pull`, `status --remote`.
//! - `maintenance` holds `clean` and `gc`; `experiments` records each successful run's
//!   state (stage -> fingerprint) and shows, diffs, sweeps and applies them; `cli` is the
//!   command line over all of it.

pub mod cache;
pub mod check;
pub mod cli;
pub mod clock;
pub mod command_stage;
pub mod config;
pub mod dag;
pub mod error;
pub mod exec_stage;
pub mod execute;
pub mod experiments;
pub mod files;
pub mod fingerprint;
pub mod journal;
pub mod lock;
pub mod maintenance;
pub mod manifest;
pub mod output;
#[cfg(test)]
mod parse_proptest;
pub mod paths;
pub mod plan;
pub mod progress;
pub mod publish;
pub mod reason;
pub mod registry;
pub mod remote;
pub mod runner;
pub mod schedule;
pub mod slurm;
pub mod stage_end;
pub mod stage_run;
pub mod workspace;
