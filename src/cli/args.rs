//! The command line's grammar (clap): every command, its flags and their help text.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use crate::experiments;

#[derive(Parser)]
#[command(
    name = "fmnist-pipe",
    version,
    about = "Declarative, incremental pipeline orchestrator for a Fashion-MNIST study"
)]
pub(super) struct Cli {
    /// The pipeline file; its folder is the workspace (artifacts/, pipeline.lock).
    #[arg(long, short = 'f', global = true, default_value = "pipeline.toml")]
    pub(super) file: PathBuf,
    /// More detail (fingerprints, decisions) on stderr.
    #[arg(long, short = 'v', global = true)]
    pub(super) verbose: bool,
    #[command(subcommand)]
    pub(super) command: Cmd,
}

#[derive(Subcommand)]
pub(super) enum Cmd {
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
pub(super) enum ReferenceArg {
    Portable,
    F64,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum KernelsArg {
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
pub(super) enum BenchModel {
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
pub(super) enum DagFormat {
    Text,
    Dot,
    Mermaid,
}
