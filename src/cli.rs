//! The command line: arguments (clap), tracing, dispatch to the engine's commands, and the
//! exit code of every error class (0 ok, 1 stage failed, 2 bad usage or pipeline file or a
//! run in progress, 130 interrupted).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

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

#[derive(Parser)]
#[command(
    name = "fmnist-pipe",
    version,
    about = "Declarative, incremental pipeline orchestrator for a Fashion-MNIST study"
)]
struct Cli {
    /// The pipeline file; its folder is the workspace (artifacts/, pipeline.lock).
    #[arg(long, short = 'f', global = true, default_value = "pipeline.toml")]
    file: PathBuf,
    /// More detail (fingerprints, decisions) on stderr.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every stale stage (or the named ones and what they need).
    Run {
        /// Run only this stage and its stale upstream stages (repeatable).
        #[arg(long = "stage", short = 's', value_name = "NAME")]
        stages: Vec<String>,
        /// Run even if up to date (the named stages, or every stage when none is named).
        #[arg(long)]
        force: bool,
        /// Show what would run, and why, without running anything.
        #[arg(long = "dry-run", short = 'n')]
        dry_run: bool,
        /// Override a value of the pipeline file for this run, e.g. train.epochs=3.
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        sets: Vec<String>,
        /// How many independent stages may run at once (default: number of CPUs).
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// Where stages run for this run (stages that name their own executor keep it):
        /// local | slurm. Default: the pipeline's `executor`.
        #[arg(long, value_name = "EXECUTOR")]
        executor: Option<String>,
        /// The name of the experiment this run records (default: adjective-noun from its
        /// state's hash). With --sweep, NAME-1, NAME-2, ...
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Run the grid of the --set value lists (STAGE.KEY=V1,V2,...; commas inside quotes
        /// or brackets do not split), each combination an experiment. Combinations run one
        /// after another (-j applies within each); stages they share are computed once; at
        /// the end the workspace is restored to its own params. pipeline.toml is not changed.
        #[arg(long)]
        sweep: bool,
    },
    /// Runs one built-in stage from a job spec (what a Slurm job runs).
    #[command(name = "__exec-stage", hide = true)]
    ExecStage { spec: PathBuf },
    /// Show which stages are up to date and why the others are not.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Per stage, whether its recorded run is in the local run cache and in the remote
        /// cache ([cache] remote); contacts the remote.
        #[arg(long)]
        remote: bool,
        /// Override a value of the pipeline file, e.g. cache.remote=s3://BUCKET/PREFIX.
        #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Upload the outputs of the runs the lock names to the remote cache ([cache] remote).
    Push {
        /// Only these stages (repeatable).
        #[arg(long = "stage", short = 's', value_name = "NAME")]
        stages: Vec<String>,
        /// Override a value of the pipeline file, e.g. cache.remote=s3://BUCKET/PREFIX.
        #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Download the outputs of the runs the lock names from the remote cache into the local
    /// one, and put missing or changed outputs back in place.
    Pull {
        /// Only these stages (repeatable).
        #[arg(long = "stage", short = 's', value_name = "NAME")]
        stages: Vec<String>,
        /// Override a value of the pipeline file, e.g. cache.remote=s3://BUCKET/PREFIX.
        #[arg(long = "set", value_name = "TABLE.KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the stage graph.
    Dag {
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Delete stage outputs and their lock entries (the run cache keeps a copy).
    Clean {
        #[arg(long = "stage", short = 's', value_name = "NAME")]
        stages: Vec<String>,
    },
    /// Drop cached runs the lock no longer refers to.
    Gc {
        /// Keep the runs of every recorded experiment too (`exp apply` restores them).
        #[arg(long)]
        all_experiments: bool,
    },
    /// Train one epoch on the first N real images, then infer over them: images/s and peak
    /// memory (scripts/bench-vs-torch.sh compares with PyTorch).
    Bench {
        #[arg(long, value_enum, default_value_t = BenchModel::Baseline)]
        model: BenchModel,
        /// How many training images.
        #[arg(long, default_value_t = 6400)]
        images: usize,
        /// Compute threads (default: number of CPUs).
        #[arg(long)]
        threads: Option<usize>,
        /// Folder with the four IDX files (plain or .gz).
        #[arg(long, default_value = fmnist_stages::bench::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// fast: our CPU kernels; portable: candle's tensor ops only, every op (the path a GPU
        /// runs).
        #[arg(long, value_enum, default_value_t = KernelsArg::Fast)]
        kernels: KernelsArg,
        /// Same as --kernels portable.
        #[arg(long, hide = true)]
        stock_kernels: bool,
        /// cpu | cuda | cuda:N | metal | auto.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Train a few steps of both models on DEVICE and on the CPU's portable path from the same
    /// weights and batches, and compare losses, gradients and eval logits (exit 1 when they
    /// differ beyond the stated tolerance). `--device cpu` checks the fast CPU kernels.
    Check {
        /// The device to check: cuda | cuda:N | metal | cpu | auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Kernels on that device (off the CPU every op is portable anyway).
        #[arg(long, value_enum, default_value_t = KernelsArg::Fast)]
        kernels: KernelsArg,
        /// The CPU reference: portable (f32, the graph a GPU runs) or f64 (near-exact).
        #[arg(long, value_enum, default_value_t = ReferenceArg::Portable)]
        reference: ReferenceArg,
        /// Folder with the four IDX files (plain or .gz).
        #[arg(long, default_value = fmnist_stages::bench::DEFAULT_DATA_DIR)]
        data: PathBuf,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Which models (repeatable; default both).
        #[arg(long = "model", value_enum)]
        models: Vec<BenchModel>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Experiments: every successful run's state of the pipeline, recorded.
    Exp {
        #[command(subcommand)]
        command: experiments::ExpCmd,
    },
    /// Compare params between experiments, the workspace and git's HEAD.
    Params {
        #[command(subcommand)]
        command: experiments::DiffCmd,
    },
    /// Compare metrics between experiments, the workspace and git's HEAD.
    Metrics {
        #[command(subcommand)]
        command: experiments::DiffCmd,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ReferenceArg {
    Portable,
    F64,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelsArg {
    Fast,
    Portable,
}

impl From<KernelsArg> for fmnist_stages::ops::Kernels {
    fn from(k: KernelsArg) -> Self {
        match k {
            KernelsArg::Fast => fmnist_stages::ops::Kernels::Fast,
            KernelsArg::Portable => fmnist_stages::ops::Kernels::Portable,
        }
    }
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum BenchModel {
    Baseline,
    Resnet18,
}

impl From<BenchModel> for fmnist_stages::models::ModelKind {
    fn from(m: BenchModel) -> Self {
        match m {
            BenchModel::Baseline => fmnist_stages::models::ModelKind::Baseline,
            BenchModel::Resnet18 => fmnist_stages::models::ModelKind::Resnet18,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
    Mermaid,
}

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
    match dispatch(cli) {
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
            let report = maintenance::gc_keeping(&ws, &also)?;
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
