//! A workspace: the folder of a pipeline file, loaded (pipeline, graph, lock), and the
//! guards every command that changes it goes through: the run lock, the path fence and the
//! recovery of a crashed run.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::config::{Pipeline, ARTIFACTS_DIR};
use crate::dag::Dag;
use crate::error::PipeError;
use crate::lock::{self, LockFile};
use crate::paths::Fence;
use crate::registry::Registry;

/// A loaded workspace: the validated pipeline, its graph and the lock as last written.
pub struct Workspace {
    pub pipeline: Pipeline,
    pub dag: Dag,
    pub lock_path: PathBuf,
    pub lock: LockFile,
    pub registry: Registry,
}

impl Workspace {
    pub fn load(
        file: &Path,
        overrides: &[crate::config::Override],
        registry: Registry,
    ) -> Result<Workspace, PipeError> {
        let pipeline = crate::config::load(file, overrides, &registry)?;
        let dag = Dag::build(&pipeline)?;
        let lock_path = lock::lock_path(file);
        let (lock, warning) = lock::read_indexed(&lock_path, Some(&lock_index(&pipeline)))?;
        if let Some(warning) = warning {
            crate::output::warn_line(&format!("warning: {warning}"));
        }
        Ok(Workspace {
            pipeline,
            dag,
            lock_path,
            lock,
            registry,
        })
    }

    /// Stage indices for names given on the command line.
    pub fn targets(&self, names: &[String]) -> Result<Vec<usize>, PipeError> {
        names
            .iter()
            .map(|n| {
                self.pipeline
                    .index_of(n)
                    .ok_or_else(|| self.pipeline.unknown_stage("--stage", n))
            })
            .collect()
    }
}

/// Where the lock's JSON copy lives (see `lock::read_indexed`): in the engine's cache folder.
pub fn lock_index(pipeline: &Pipeline) -> PathBuf {
    pipeline.artifacts().join(".cache").join("lock-index.json")
}

/// Holds artifacts/.run.lock for as long as it lives, so two runs never share a workspace.
pub struct RunGuard {
    _file: File,
}

impl RunGuard {
    pub fn acquire(artifacts: &Path) -> Result<RunGuard, PipeError> {
        std::fs::create_dir_all(artifacts).map_err(|e| PipeError::io_at(artifacts, "create", e))?;
        let path = artifacts.join(".run.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| PipeError::io_at(&path, "open", e))?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&file) {
            Ok(true) => Ok(RunGuard { _file: file }),
            Ok(false) => Err(PipeError::Busy(path.display().to_string())),
            Err(e) => Err(PipeError::io_at(&path, "lock", e)),
        }
    }
}

/// The engine's own folders under artifacts/, which it creates, empties and deletes.
pub const ENGINE_FOLDERS: [&str; 5] = [".tmp", ".cache", ".logs", ".scratch", ".journal"];

/// Refuses (exit 2) to touch any output of `stages`, or any of the engine's `folders` under
/// artifacts/, that resolves outside the workspace (a symlink pointing out, say).
pub fn check_inside(
    pipeline: &Pipeline,
    stages: impl IntoIterator<Item = usize>,
    folders: &[&str],
) -> Result<(), PipeError> {
    let fence = Fence::new(&pipeline.root, &pipeline.artifacts())
        .map_err(|e| PipeError::Config(e.to_string()))?;
    for i in stages {
        let stage = &pipeline.stages[i];
        for out in stage.out_roots() {
            fence
                .check(&out)
                .map_err(|e| PipeError::Config(format!("stage `{}`: {e}", stage.name)))?;
        }
    }
    for folder in folders {
        fence
            .check(&format!("{ARTIFACTS_DIR}/{folder}"))
            .map_err(|e| PipeError::Config(e.to_string()))?;
    }
    Ok(())
}

/// Holding the run lock: ends what a crashed run left running (process groups, Slurm
/// jobs), puts back the outputs it had
/// moved aside, clears its leftovers in .tmp. Every command that changes the workspace
/// (run, clean, gc) starts with it, so none of them deletes a backup still needed.
pub fn recover_crashed_run(artifacts: &Path, say: impl Fn(&str)) -> Result<(), PipeError> {
    // First the cluster jobs, so that none writes while outputs are put back.
    for note in crate::slurm::cancel_leftover_jobs(artifacts) {
        say(&note);
    }
    let notes = crate::journal::recover(artifacts, crate::command_stage::end_leftover_group)
        .map_err(|e| {
            PipeError::io(
                "cannot recover from an interrupted run",
                std::io::Error::other(e),
            )
        })?;
    for note in notes {
        say(&note);
    }
    Ok(())
}
