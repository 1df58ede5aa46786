//! How a stage's work gets done once the engine has decided it must run and prepared where
//! it writes (a temp folder, or its command outputs moved aside): the seam between the engine
//! and where stages execute. [`LocalRunner`] runs built-in kinds in this process and command
//! stages as local process groups; a cluster runner (Slurm) implements the same trait. What
//! happens before (plan, cache) and after (publish, lock) is the engine's, whatever the runner.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use fmnist_stages::{Cancelled, Metrics, Progress, StageContext};

use crate::command_stage;
use crate::config::{Executor, Resources};
use crate::publish::Backup;
use crate::registry::Kind;
pub use crate::stage_end::{io_fail, StageEnd};

/// One stage's work, ready to run.
pub enum Work<'a> {
    /// A built-in kind: write every output into `ctx.out_dir`.
    Builtin {
        kind: &'a Kind,
        table: &'a toml::Table,
        ctx: StageContext<'a>,
    },
    /// A shell command run in `root`; its previous outputs are in `backup`, which also
    /// journals whatever runs the command (so a later run can end it after a crash).
    Command {
        root: &'a Path,
        cmd: &'a str,
        log: &'a Path,
        backup: &'a mut Backup,
        progress: &'a dyn Progress,
        cancel: &'a AtomicBool,
    },
}

/// What a finished piece of work reports.
pub struct Ran {
    /// The kind's figures (Null for commands).
    pub metrics: Metrics,
    /// Where it ran, when not in this process or as a local command (e.g. "slurm job 42"),
    /// for the lock.
    pub placed: Option<String>,
}

/// Carries out a stage's work. `Ok` means the work finished; the engine then checks and
/// publishes what it wrote.
pub trait Runner: Sync {
    /// Runs `stage`'s work; `resources` is what the stage asks of a cluster.
    fn run(&self, stage: &str, resources: &Resources, work: Work<'_>) -> Result<Ran, StageEnd>;
}

/// The runner for each executor a pipeline can name; Slurm's only when some stage uses it.
pub struct Runners {
    pub local: LocalRunner,
    /// `slurm::SlurmRunner` when a selected stage runs on Slurm.
    pub slurm: Option<Box<dyn Runner>>,
}

impl Runners {
    pub fn for_executor(&self, executor: Executor) -> &dyn Runner {
        match (executor, &self.slurm) {
            (Executor::Slurm, Some(slurm)) => slurm.as_ref(),
            _ => &self.local,
        }
    }
}

/// Runs everything on this machine: built-in kinds in-process, commands as process groups.
pub struct LocalRunner;

impl Runner for LocalRunner {
    fn run(&self, _stage: &str, _: &Resources, work: Work<'_>) -> Result<Ran, StageEnd> {
        match work {
            Work::Builtin { kind, table, ctx } => {
                let result = {
                    let _running = fmnist_stages::context::RunningStage::start();
                    kind.run(table, &ctx)
                };
                let metrics = result.map_err(|e| {
                    if e.downcast_ref::<Cancelled>().is_some() || ctx.cancel.load(Ordering::Relaxed)
                    {
                        StageEnd::Interrupted
                    } else {
                        StageEnd::Failed(format!("{e:#}"))
                    }
                })?;
                Ok(Ran {
                    metrics,
                    placed: None,
                })
            }
            Work::Command {
                root,
                cmd,
                log,
                backup,
                cancel,
                ..
            } => {
                command_stage::execute(root, log, cmd, backup, cancel)?;
                Ok(Ran {
                    metrics: Metrics::Null,
                    placed: None,
                })
            }
        }
    }
}
