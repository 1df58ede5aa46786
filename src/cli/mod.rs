//! The command line: tracing, dispatch to the engine's commands (the grammar is in `args`),
//! and the
//! exit code of every error class (0 ok, 1 stage failed, 2 bad usage or pipeline file or a
//! run in progress, 130 interrupted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;

mod args;
use args::{BenchModel, Cli, Cmd, DagFormat, ReferenceArg};

use std::process::ExitCode;

use crate::config::Executor;
use crate::config::Override;
use crate::error::PipeError;
use crate::execute::RunOptions;
use crate::progress::Console;
use crate::registry::Registry;
use crate::runner::{LocalRunner, Runners};
use crate::slurm::SlurmRunner;
use crate::workspace::Workspace;
use crate::{check, command_stage, exec_stage, execute, experiments, maintenance, output, plan};

/// The whole program: parse, trace, dispatch, map the error to its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // -v asks for our debug traces; RUST_LOG, when set, says exactly what to trace.
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => Some(tracing_subscriber::EnvFilter::new(spec)),
        _ if cli.verbose => Some(tracing_subscriber::EnvFilter::new(
            "fmnist_pipe=debug,fmnist_stages=debug",
        )),
        _ => None,
    };
    if let Some(filter) = filter {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let checked = fmnist_stages::ops::cpu_level_from_env()
        .map_err(|e| PipeError::Config(format!("{}: {e}", fmnist_stages::ops::CPU_LEVEL_ENV)));
    match checked.and_then(|_| dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::warn_line(&format!("error: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// The `--set` values, parsed.
fn parse_sets(sets: &[String]) -> Result<Vec<Override>, PipeError> {
    sets.iter().map(|s| s.parse()).collect()
}

/// Whether any stage a run of `targets` selects goes to Slurm.
fn uses_slurm(ws: &Workspace, targets: &[usize]) -> bool {
    ws.dag
        .select(targets)
        .iter()
        .any(|&i| ws.pipeline.stages[i].executor_in(&ws.pipeline) == Executor::Slurm)
}

fn dispatch(cli: Cli) -> Result<(), PipeError> {
    match cli.command {
        Cmd::Run {
            stages,
            force,
            dry_run,
            sets,
            jobs,
            executor,
            name,
            sweep,
        } => {
            let args = RunArgs {
                stages,
                force,
                dry_run,
                jobs,
                executor,
            };
            let cancel = interruptible();
            if sweep {
                if dry_run {
                    return Err(PipeError::Config(
                        "--sweep runs the grid; --dry-run shows one run's plan".to_string(),
                    ));
                }
                let mut run_one = |sets: &[String], name: Option<&str>| {
                    run_once(&cli.file, &args, sets, name, &cancel)
                };
                experiments::sweep::run(&cli.file, &sets, name.as_deref(), &mut run_one, &|l| {
                    output::warn_line(l)
                })
            } else {
                run_once(&cli.file, &args, &sets, name.as_deref(), &cancel).map(|_| ())
            }
        }
        Cmd::ExecStage { spec } => exec_stage::run(&spec),
        Cmd::Status {
            json,
            remote: true,
            sets,
        } => {
            let ws = Workspace::load(&cli.file, &parse_sets(&sets)?, Registry::builtins())?;
            let states = crate::remote::remote_status(&ws)?;
            if json {
                let text = serde_json::to_string_pretty(&states)
                    .map_err(|e| PipeError::io("cannot encode status", std::io::Error::other(e)))?;
                return output::emit_line(&text);
            }
            let width = states.iter().map(|s| s.stage.len()).max().unwrap_or(0);
            let (mut to_push, mut to_pull) = (0, 0);
            for s in &states {
                let line = match (s.fingerprint.is_some(), s.local, s.remote) {
                    (false, _, _) => "never run".to_string(),
                    (true, local, remote) => {
                        to_push += usize::from(local && remote != "yes");
                        to_pull += usize::from(!local && remote == "yes");
                        format!(
                            "local cache: {}  remote: {remote}",
                            if local { "yes" } else { "no" }
                        )
                    }
                };
                output::emit_line(&format!("{:width$}  {line}", s.stage))?;
            }
            output::emit_line(&format!(
                "{to_push} to push (fmnist-pipe push), {to_pull} to pull (fmnist-pipe pull)"
            ))
        }
        Cmd::Push { stages, sets } => {
            let ws = Workspace::load(&cli.file, &parse_sets(&sets)?, Registry::builtins())?;
            let targets = ws.targets(&stages)?;
            crate::remote::push(&ws, &targets, &Console::new())
        }
        Cmd::Pull { stages, sets } => {
            let mut ws = Workspace::load(&cli.file, &parse_sets(&sets)?, Registry::builtins())?;
            let targets = ws.targets(&stages)?;
            crate::remote::pull(&mut ws, &targets, &Console::new())
        }
        Cmd::Status { json, sets, .. } => {
            let ws = Workspace::load(&cli.file, &parse_sets(&sets)?, Registry::builtins())?;
            let cache = crate::cache::RunCache::new(&ws.pipeline.artifacts());
            let planned = plan::plan(&ws, None, &Default::default(), Some(&cache));
            let report = plan::status(&ws, &planned);
            if json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| PipeError::io("cannot encode status", std::io::Error::other(e)))?;
                output::emit_line(&text)?;
            } else {
                let width = report.iter().map(|s| s.stage.len()).max().unwrap_or(0);
                for s in &report {
                    let restorable = if s.decision == "restore" {
                        ", in the run cache"
                    } else {
                        ""
                    };
                    let ran_on = s
                        .ran_on
                        .as_ref()
                        .map(|on| format!(" (ran on {on})"))
                        .unwrap_or_default();
                    output::emit_line(&format!(
                        "{:width$}  {}{restorable}{ran_on}",
                        s.stage, s.state
                    ))?;
                    for reason in &s.reasons {
                        output::emit_line(&format!("{:width$}    - {}", "", reason.text))?;
                    }
                }
            }
            Ok(())
        }
        Cmd::Dag { format } => {
            let ws = Workspace::load(&cli.file, &[], Registry::builtins())?;
            let text = match format {
                DagFormat::Text => ws.dag.render_text(&ws.pipeline),
                DagFormat::Dot => ws.dag.render_dot(&ws.pipeline),
                DagFormat::Mermaid => ws.dag.render_mermaid(&ws.pipeline),
            };
            output::emit(&text)?;
            Ok(())
        }
        Cmd::Clean { stages } => {
            let mut ws = Workspace::load(&cli.file, &[], Registry::builtins())?;
            let targets = ws.targets(&stages)?;
            let cleaned = maintenance::clean(&mut ws, &targets)?;
            output::emit_line(&format!("cleaned: {}", cleaned.join(", ")))?;
            Ok(())
        }
        Cmd::Gc { all_experiments } => {
            let ws = Workspace::load(&cli.file, &[], Registry::builtins())?;
            let also = if all_experiments {
                experiments::fingerprints(&ws.pipeline.artifacts())
            } else {
                Vec::new()
            };
            let report = maintenance::gc_keeping(&ws, &also, all_experiments)?;
            output::emit_line(&format!(
                "removed {} cached runs and {} files ({:.1} MB), {} abandoned checkpoint folders",
                report.runs_removed,
                report.objects_removed,
                report.bytes_freed as f64 / 1e6,
                report.scratch_removed
            ))
        }
        Cmd::Exp { command } => {
            let args = RunArgs {
                stages: Vec::new(),
                force: false,
                dry_run: false,
                jobs: None,
                executor: None,
            };
            let cancel = interruptible();
            let mut run_one = |sets: &[String], name: Option<&str>| {
                run_once(&cli.file, &args, sets, name, &cancel)
            };
            experiments::dispatch_exp(&cli.file, command, &mut run_one)
        }
        Cmd::Params { command } => {
            experiments::dispatch_diff(&cli.file, experiments::diff::What::Params, command)
        }
        Cmd::Metrics { command } => {
            experiments::dispatch_diff(&cli.file, experiments::diff::What::Metrics, command)
        }
        Cmd::Bench {
            model,
            images,
            threads,
            data,
            kernels,
            stock_kernels,
            device,
            json,
        } => {
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let options = fmnist_stages::bench::BenchOptions {
                model: model.into(),
                images,
                threads,
                data_dir: data,
                kernels: if stock_kernels {
                    fmnist_stages::ops::Kernels::Portable
                } else {
                    kernels.into()
                },
                device,
            };
            let report = fmnist_stages::bench::run(&options)
                .map_err(|e| PipeError::StageFailed(format!("bench: {e:#}")))?;
            if json {
                output::emit_line(&serde_json::to_string(&report).unwrap_or_default())?;
            } else {
                output::emit_line(&report.to_string())?;
            }
            Ok(())
        }
        Cmd::Check {
            device,
            kernels,
            reference,
            data,
            steps,
            batch_size,
            models,
            json,
        } => check::run(&check::Options {
            device,
            kernels: kernels.into(),
            reference: match reference {
                ReferenceArg::Portable => check::Reference::Portable,
                ReferenceArg::F64 => check::Reference::F64,
            },
            data,
            steps,
            batch_size,
            models: if models.is_empty() {
                vec![BenchModel::Baseline.into(), BenchModel::Resnet18.into()]
            } else {
                models.into_iter().map(Into::into).collect()
            },
            json,
        }),
    }
}

/// What `run` was asked, besides its `--set`s and `--name` (a sweep runs with it repeatedly).
struct RunArgs {
    stages: Vec<String>,
    force: bool,
    dry_run: bool,
    jobs: Option<usize>,
    executor: Option<String>,
}

/// The run's cancel flag, raised by Ctrl-C.
fn interruptible() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&cancel);
    // First Ctrl-C (or SIGTERM, SIGHUP): ask stages to stop, ending their commands'
    // process groups, and keep what finished; second: kill the groups and leave now.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            command_stage::kill_running_groups();
            std::process::exit(130);
        }
    });
    cancel
}

/// One `run` with these `--set`s; a successful one (not a dry run) records the workspace's
/// state as an experiment, whose name it returns.
fn run_once(
    file: &std::path::Path,
    args: &RunArgs,
    sets: &[String],
    name: Option<&str>,
    cancel: &Arc<AtomicBool>,
) -> Result<String, PipeError> {
    let mut ws = Workspace::load(file, &parse_sets(sets)?, Registry::builtins())?;
    if let Some(executor) = &args.executor {
        ws.pipeline.executor = executor
            .parse()
            .map_err(|e| PipeError::Config(format!("--executor: {e}")))?;
    }
    let targets = ws.targets(&args.stages)?;
    let runners = Runners {
        local: LocalRunner,
        slurm: if !args.dry_run && uses_slurm(&ws, &targets) {
            let slurm = SlurmRunner::new(&ws.pipeline.root, &ws.pipeline.artifacts())?;
            Some(Box::new(slurm) as Box<dyn crate::runner::Runner>)
        } else {
            None
        },
    };
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if jobs == 0 {
        return Err(PipeError::Config("-j must be at least 1".to_string()));
    }
    let opts = RunOptions {
        targets,
        force: args.force,
        dry_run: args.dry_run,
        jobs,
    };
    let result = execute::run(&mut ws, &opts, &runners, &Console::new(), cancel);
    let recorded = match result {
        Ok(()) if !args.dry_run => match experiments::record::after_run(&ws, name, sets) {
            Ok((name, id)) => {
                output::warn_line(&format!("experiment: {name} ({id})"));
                Ok(name)
            }
            // The run's work is done and recorded in the lock: a record that cannot be
            // written is only a warning.
            Err(PipeError::Io { context, source }) => {
                output::warn_line(&format!(
                    "warning: the experiment was not recorded: {context}: {source}"
                ));
                Ok(String::new())
            }
            Err(e) => Err(e),
        },
        Ok(()) => Ok(String::new()),
        Err(e) => Err(e),
    };
    // The process ends next: freeing a large pipeline's structures one by one took
    // longer than a no-op run's checks.
    std::mem::forget(ws);
    recorded
}
