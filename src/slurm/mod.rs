//! The Slurm runner: each stage's work becomes one batch job. The engine stays on the
//! submit host (plan, lock, publishing); the job runs the same binary's hidden
//! `__exec-stage` for a built-in kind, or the stage's command, in the workspace, which must
//! be on a file system the compute nodes share. State comes from `squeue` while the job is
//! queued or running and from `scontrol`/`sacct` once it left the queue, at a bounded poll
//! interval; Ctrl-C cancels the job (`scancel`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fmnist_stages::{Metrics, Progress};

use crate::config::Resources;
use crate::error::PipeError;
use crate::exec_stage::{result_path, JobSpec};
use crate::runner::{io_fail, Ran, Runner, StageEnd, Work};

mod state;
use state::{judge, look, JobState, Seen};

/// The longest pause between two looks at a job's state (`FMNIST_SLURM_POLL_MAX` seconds
/// overrides it).
const POLL_MAX: Duration = Duration::from_secs(5);
const POLL_MAX_ENV: &str = "FMNIST_SLURM_POLL_MAX";
/// How long the controller may not answer before the stage fails.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(300);
/// How long a cancelled job has to leave the queue before we stop waiting for it.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Submits stages as Slurm jobs.
pub struct SlurmRunner {
    /// The workspace root: jobs start there.
    root: PathBuf,
    /// This binary, which the job runs for built-in kinds.
    exe: PathBuf,
    /// artifacts/.jobs: each job's script, spec and result.
    jobs_dir: PathBuf,
    /// artifacts/.logs: each job's output, as a local command's log.
    logs_dir: PathBuf,
    poll_max: Duration,
    serial: AtomicU64,
}

impl SlurmRunner {
    /// Checks that Slurm's client commands are here; exit 2 saying what to do if not.
    pub fn new(root: &Path, artifacts: &Path) -> Result<SlurmRunner, PipeError> {
        let found = Command::new("sbatch")
            .arg("--version")
            .output()
            .map(|o| o.status.success());
        if !matches!(found, Ok(true)) {
            return Err(PipeError::Config(
                "executor `slurm`: `sbatch` is not on PATH (or does not run). Run on a Slurm \
                 submit host, install Slurm's client commands, or use `--executor local`"
                    .to_string(),
            ));
        }
        let exe = std::env::current_exe()
            .map_err(|e| PipeError::io("cannot find this program's path for the jobs", e))?;
        let poll_max = match std::env::var(POLL_MAX_ENV) {
            Ok(v) => v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s <= 600.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    PipeError::Config(format!(
                        "{POLL_MAX_ENV}={v}: expected seconds, more than 0 and at most 600"
                    ))
                })?,
            Err(_) => POLL_MAX,
        };
        Ok(SlurmRunner {
            root: root.to_path_buf(),
            exe,
            jobs_dir: artifacts.join(".jobs"),
            logs_dir: artifacts.join(".logs"),
            poll_max,
            serial: AtomicU64::new(0),
        })
    }

    /// A fresh folder for one job under artifacts/.jobs.
    fn job_dir(&self, stage: &str) -> Result<PathBuf, StageEnd> {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .jobs_dir
            .join(format!("{stage}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_fail("create", &dir))?;
        std::fs::create_dir_all(&self.logs_dir).map_err(io_fail("create", &self.logs_dir))?;
        Ok(dir)
    }
}

/// `'text'` for sh, whatever it holds.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The `sbatch` options for a stage's resources.
fn sbatch_options(stage: &str, resources: &Resources, log: &Path, root: &Path) -> Vec<String> {
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name=fmnist-{stage}"),
        format!("--output={}", log.display()),
        format!("--chdir={}", root.display()),
        // A job lost with its node fails its stage instead of quietly queueing again.
        "--no-requeue".to_string(),
    ];
    if let Some(cpus) = resources.cpus {
        args.push(format!("--cpus-per-task={cpus}"));
    }
    if let Some(mem) = &resources.mem {
        args.push(format!("--mem={mem}"));
    }
    if let Some(time) = &resources.time {
        args.push(format!("--time={time}"));
    }
    if let Some(gpus) = resources.gpus {
        args.push(format!("--gpus={gpus}"));
    }
    if let Some(partition) = &resources.partition {
        args.push(format!("--partition={partition}"));
    }
    if let Some(account) = &resources.account {
        args.push(format!("--account={account}"));
    }
    args.extend(resources.extra.iter().cloned());
    args
}

impl SlurmRunner {
    /// Submits `script` and follows the job to its end; cancels it on Ctrl-C.
    fn submit_and_wait(
        &self,
        stage: &str,
        resources: &Resources,
        job_dir: &Path,
        script: &str,
        progress: &dyn Progress,
        cancel: &AtomicBool,
    ) -> Result<String, StageEnd> {
        let log = self.logs_dir.join(format!("{stage}.log"));
        let _ = std::fs::remove_file(&log);
        let script_path = job_dir.join("job.sh");
        let options = sbatch_options(stage, resources, &log, &self.root);
        // Slurm starts a job whose --chdir is missing in /tmp instead: refuse that.
        let text = format!(
            "#!/bin/sh\n# submitted by fmnist-pipe: sbatch {}\ncd {} || exit 97\n{script}\n",
            options.join(" "),
            sh_quote(&self.root.to_string_lossy())
        );
        std::fs::write(&script_path, text).map_err(io_fail("write", &script_path))?;
        let out = Command::new("sbatch")
            .args(&options)
            .arg(&script_path)
            .output()
            .map_err(|e| StageEnd::Refused(format!("cannot run sbatch: {e}")))?;
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(StageEnd::Refused(format!(
                "sbatch refused the job: {said} (check this stage's resources and the cluster's partitions: `sinfo`)"
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        // "--parsable" prints "ID" or "ID;cluster".
        let job = stdout
            .trim()
            .split(';')
            .next()
            .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                StageEnd::Failed(format!("sbatch printed no job id: {}", stdout.trim()))
            })?
            .to_string();
        // Recorded at once: a run that follows a crash of this one cancels the job.
        let record = job_dir.join(JOB_ID_FILE);
        std::fs::write(&record, format!("{job}\nfmnist-{stage}\n"))
            .map_err(io_fail("write", &record))?;
        progress.println(&format!("Slurm job {job} submitted"));
        let mut shown = String::new();
        let mut pause = Duration::from_millis(100);
        let mut unreachable_since: Option<Instant> = None;
        let state = loop {
            if cancel.load(Ordering::Relaxed) {
                self.cancel_job(&job);
                progress.println(&format!("Slurm job {job} cancelled"));
                return Err(StageEnd::Interrupted);
            }
            let state = match look(&job) {
                Seen::State(state) => {
                    unreachable_since = None;
                    state
                }
                Seen::Gone => JobState {
                    state: "LOST".to_string(),
                    exit_code: None,
                    reason: Some("Slurm no longer knows the job".to_string()),
                },
                Seen::Unreachable(why) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE_LIMIT {
                        return Err(StageEnd::Failed(format!(
                            "lost touch with Slurm about job {job} for {} s: {why}; the job may still run (scancel {job})",
                            UNREACHABLE_LIMIT.as_secs()
                        )));
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(self.poll_max);
                    continue;
                }
            };
            if state.finished() {
                break state;
            }
            if state.state != shown {
                shown = state.state.clone();
                let reason = state
                    .reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                progress.println(&format!("Slurm job {job} {shown}{reason}"));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(self.poll_max);
        };
        judge(&job, &state, &log, resources)?;
        Ok(job)
    }

    /// scancel, then wait (bounded) for the job to leave the queue, so its writes are over.
    fn cancel_job(&self, job: &str) {
        cancel_and_wait(job);
    }
}

/// A job folder's record of the job it submitted: "ID\nNAME\n".
const JOB_ID_FILE: &str = "job";

/// scancel, then wait (bounded) for the job to end, so its writes are over.
fn cancel_and_wait(job: &str) {
    let _ = Command::new("scancel").arg(job).status();
    let deadline = Instant::now() + CANCEL_WAIT;
    while Instant::now() < deadline {
        match look(job) {
            Seen::State(state) if !state.finished() => {
                std::thread::sleep(Duration::from_millis(200))
            }
            _ => break,
        }
    }
}

/// Holding the run lock, before any output is put back: cancels the jobs a crashed run left
/// queued or running (each job folder under artifacts/.jobs names its job), so none of them
/// writes into the workspace afterwards, and clears the folders. Returns a line per job.
pub fn cancel_leftover_jobs(artifacts: &Path) -> Vec<String> {
    let Ok(folders) = std::fs::read_dir(artifacts.join(".jobs")) else {
        return Vec::new();
    };
    let mut notes = Vec::new();
    for folder in folders.flatten() {
        let path = folder.path();
        let record = std::fs::read_to_string(path.join(JOB_ID_FILE)).unwrap_or_default();
        let mut lines = record.lines();
        if let (Some(job), Some(name)) = (lines.next(), lines.next()) {
            if still_ours(job, name) {
                cancel_and_wait(job);
                notes.push(format!(
                    "cancelled Slurm job {job} ({name}), which an interrupted run left behind"
                ));
            }
        }
        let _ = crate::files::remove_path(&path);
    }
    notes
}

/// Whether `job` is still queued or running under the name we gave it (ids are reused once
/// a cluster's state is reset).
fn still_ours(job: &str, name: &str) -> bool {
    if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let listed = Command::new("squeue")
        .args(["-h", "-j", job, "-o", "%j|%T"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    listed.lines().any(|line| {
        let (listed_name, state) = line.trim().split_once('|').unwrap_or((line, ""));
        listed_name == name
            && !JobState {
                state: state.to_string(),
                exit_code: None,
                reason: None,
            }
            .finished()
    })
}

impl Runner for SlurmRunner {
    fn run(&self, stage: &str, resources: &Resources, work: Work<'_>) -> Result<Ran, StageEnd> {
        let job_dir = self.job_dir(stage)?;
        let result = match work {
            Work::Builtin { kind, table, ctx } => {
                let spec_path = job_dir.join("spec.json");
                let spec = JobSpec::from_context(kind.name, table, &ctx);
                let text = serde_json::to_string_pretty(&spec)
                    .map_err(|e| StageEnd::Failed(format!("cannot encode the job spec: {e}")))?;
                std::fs::write(&spec_path, text).map_err(io_fail("write", &spec_path))?;
                let script = format!(
                    "exec {} __exec-stage {}",
                    sh_quote(&self.exe.to_string_lossy()),
                    sh_quote(&spec_path.to_string_lossy())
                );
                let job = self.submit_and_wait(
                    stage,
                    resources,
                    &job_dir,
                    &script,
                    ctx.progress,
                    ctx.cancel,
                )?;
                let result = result_path(&spec_path);
                let metrics: Metrics = std::fs::read_to_string(&result)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or_else(|| {
                        StageEnd::Failed(format!(
                            "Slurm job {job} completed without writing {}",
                            result.display()
                        ))
                    })?;
                Ok(Ran {
                    metrics,
                    placed: Some(format!("slurm job {job}")),
                })
            }
            Work::Command {
                cmd,
                progress,
                cancel,
                ..
            } => {
                let script = format!("exec sh -c {}", sh_quote(cmd));
                let job =
                    self.submit_and_wait(stage, resources, &job_dir, &script, progress, cancel)?;
                Ok(Ran {
                    metrics: Metrics::Null,
                    placed: Some(format!("slurm job {job}")),
                })
            }
        };
        if result.is_ok() {
            let _ = std::fs::remove_dir_all(&job_dir);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_any_text() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn resources_become_sbatch_options() {
        let resources = Resources {
            cpus: Some(2),
            mem: Some("4G".into()),
            time: Some("00:30:00".into()),
            gpus: Some(1),
            partition: Some("gpu".into()),
            account: Some("lab".into()),
            extra: vec!["--qos=short".into()],
        };
        let args = sbatch_options("train", &resources, Path::new("/w/l.log"), Path::new("/w"));
        for want in [
            "--parsable",
            "--job-name=fmnist-train",
            "--output=/w/l.log",
            "--chdir=/w",
            "--cpus-per-task=2",
            "--mem=4G",
            "--time=00:30:00",
            "--gpus=1",
            "--partition=gpu",
            "--account=lab",
            "--qos=short",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
        }
    }
}
