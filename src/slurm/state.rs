//! What Slurm says about a job, and what that means for its stage: `squeue -t all` while
//! Slurm keeps the job (queued, running, and MinJobAge after), `scontrol` for a finished
//! job's exit code, `sacct` where accounting keeps jobs longer.

use std::path::Path;
use std::process::Command;

use crate::config::Resources;
use crate::runner::StageEnd;

/// How many lines of a failed job's log are shown.
const LOG_TAIL_LINES: usize = 15;

/// A job's state as Slurm reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JobState {
    /// PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY...
    pub(super) state: String,
    /// The job script's exit status and the signal that ended it ("1:0").
    pub(super) exit_code: Option<String>,
    pub(super) reason: Option<String>,
}

impl JobState {
    pub(super) fn finished(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
                | "STOPPED"
                | "REQUEUE_HOLD"
                | "REQUEUE_FED"
                | "RESV_DEL_HOLD"
                | "SPECIAL_EXIT"
        )
    }
}

/// What a look at a job found.
pub(super) enum Seen {
    State(JobState),
    /// Slurm no longer knows the job (purged after MinJobAge, or a new controller state).
    Gone,
    /// The controller did not answer (restarting, overloaded): look again later.
    Unreachable(String),
}

/// The job's state: `squeue -t all` lists it while queued, running and for a while after
/// (MinJobAge); `scontrol` adds the exit code of a finished one; `sacct` answers where
/// accounting keeps jobs longer.
pub(super) fn look(job: &str) -> Seen {
    let out = match Command::new("squeue")
        .args(["-h", "-t", "all", "-j", job, "-o", "%T|%r"])
        .output()
    {
        Ok(out) => out,
        Err(e) => return Seen::Unreachable(format!("cannot run squeue: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = stdout.lines().next().filter(|_| out.status.success()) {
        let (state, reason) = line.trim().split_once('|').unwrap_or((line.trim(), ""));
        let mut seen = JobState {
            state: state.to_string(),
            exit_code: None,
            reason: (!reason.is_empty() && reason != "None").then(|| reason.to_string()),
        };
        if seen.finished() {
            if let Some(detail) = final_state(job) {
                seen.exit_code = detail.exit_code;
                seen.reason = seen.reason.or(detail.reason);
            }
        }
        return Seen::State(seen);
    }
    if out.status.success() || stderr.contains("Invalid job id") {
        return match final_state(job) {
            Some(state) => Seen::State(state),
            None => Seen::Gone,
        };
    }
    Seen::Unreachable(stderr.trim().to_string())
}

/// A finished job's state and exit code from `scontrol` (or `sacct`).
fn final_state(job: &str) -> Option<JobState> {
    if let Ok(out) = Command::new("scontrol")
        .args(["show", "job", job, "-o"])
        .output()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
                .map(str::to_string)
        };
        if let Some(state) = field("JobState") {
            return Some(JobState {
                state,
                exit_code: field("ExitCode"),
                reason: field("Reason").filter(|r| r != "None"),
            });
        }
    }
    let out = Command::new("sacct")
        .args(["-n", "-X", "-P", "-j", job, "-o", "State,ExitCode,Reason"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.lines().next()?.split('|');
    // "CANCELLED by 0" -> "CANCELLED".
    let state = parts.next()?.split_whitespace().next()?.to_string();
    Some(JobState {
        state,
        exit_code: parts.next().map(str::to_string),
        reason: parts
            .next()
            .map(str::to_string)
            .filter(|r| !r.is_empty() && r != "None"),
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return "    (the job printed nothing)".to_string();
    }
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a finished job's state means for the stage.
pub(super) fn judge(
    job: &str,
    state: &JobState,
    log: &Path,
    resources: &Resources,
) -> Result<(), StageEnd> {
    let clean_exit = state.exit_code.as_deref().is_none_or(|c| c == "0:0");
    if state.state == "COMPLETED" && clean_exit {
        return Ok(());
    }
    let reason = state
        .reason
        .as_ref()
        .map(|r| format!(", reason {r}"))
        .unwrap_or_default();
    let what = match state.state.as_str() {
        "COMPLETED" | "FAILED" => format!(
            "Slurm job {job} failed (exit code {}{reason})",
            state.exit_code.as_deref().unwrap_or("?")
        ),
        "CANCELLED" => format!("Slurm job {job} was cancelled (scancel){reason}"),
        "TIMEOUT" => format!(
            "Slurm job {job} hit its time limit ({}){reason}; raise resources.time",
            resources
                .time
                .as_deref()
                .unwrap_or("the partition's default")
        ),
        "OUT_OF_MEMORY" => format!(
            "Slurm job {job} ran out of memory ({}){reason}; raise resources.mem",
            resources
                .mem
                .as_deref()
                .unwrap_or("the partition's default")
        ),
        "NODE_FAIL" | "BOOT_FAIL" | "LOST" => {
            format!(
                "Slurm job {job} was lost with its node ({}){reason}",
                state.state
            )
        }
        other => format!("Slurm job {job} ended {other}{reason}"),
    };
    Err(StageEnd::Failed(format!(
        "{what}; last lines of {}:\n{}",
        log.display(),
        log_tail(log)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_become_stage_failures_naming_the_job() {
        let log = Path::new("/nonexistent/log");
        let state = |s: &str, code: &str| JobState {
            state: s.into(),
            exit_code: Some(code.into()),
            reason: None,
        };
        let r = Resources::default();
        assert!(judge("7", &state("COMPLETED", "0:0"), log, &r).is_ok());
        for (s, code, says) in [
            ("FAILED", "3:0", "job 7 failed (exit code 3:0"),
            ("CANCELLED", "0:15", "job 7 was cancelled"),
            ("TIMEOUT", "0:0", "job 7 hit its time limit"),
            ("NODE_FAIL", "0:0", "job 7 was lost"),
        ] {
            match judge("7", &state(s, code), log, &r) {
                Err(StageEnd::Failed(msg)) => assert!(msg.contains(says), "{msg}"),
                _ => panic!("{s} accepted"),
            }
        }
        assert!(!state("PENDING", "0:0").finished());
        assert!(state("OUT_OF_MEMORY", "0:125").finished());
    }
}
