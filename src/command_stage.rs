//! Command stages: a user's shell command run in the workspace, with its declared outputs
//! protected while it runs.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::executor::{io_fail, StageEnd};
use crate::manifest::{self, FileRecord, MISSING};
use crate::publish::Backup;

/// How many lines of a failed command's log are shown.
const LOG_TAIL_LINES: usize = 15;

/// Runs a command stage: `sh -c CMD` in the workspace root, its output in
/// artifacts/.logs/NAME.log, its declared outputs moved aside first and put back unless it
/// succeeds and writes every one of them.
pub fn run_command(
    root: &Path,
    artifacts: &Path,
    stage_name: &str,
    cmd: &str,
    outs: &[String],
    cancel: &AtomicBool,
) -> Result<(Vec<FileRecord>, serde_json::Value), StageEnd> {
    let logs = artifacts.join(".logs");
    std::fs::create_dir_all(&logs).map_err(io_fail("create", &logs))?;
    let log_path = logs.join(format!("{stage_name}.log"));
    let backup = Backup::take(root, artifacts, stage_name, outs)
        .map_err(|e| StageEnd::Failed(format!("cannot move previous outputs aside: {e}")))?;
    let fail_with = |msg: String| {
        backup.restore();
        StageEnd::Failed(msg)
    };
    for out in outs {
        if let Some(parent) = root.join(out).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
    }
    let log = File::create(&log_path)
        .map_err(|e| fail_with(format!("cannot create {}: {e}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| fail_with(format!("cannot open {}: {e}", log_path.display())))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| fail_with(format!("cannot start `sh -c`: {e}")))?;
    // Poll rather than block so Ctrl-C can stop the command; the wait grows so quick
    // commands finish quickly and slow ones cost no CPU.
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(fail_with(format!("cannot wait for the command: {e}"))),
        }
        if cancel.load(Ordering::Relaxed) {
            let _ = child.kill();
            let _ = child.wait();
            backup.restore();
            return Err(StageEnd::Interrupted);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    if !status.success() {
        // Ctrl-C on a terminal reaches the command too; it may die before our flag is set.
        let killed_by_sigint = {
            use std::os::unix::process::ExitStatusExt;
            status.signal() == Some(2)
        };
        if killed_by_sigint || cancel.load(Ordering::Relaxed) {
            backup.restore();
            return Err(StageEnd::Interrupted);
        }
        let tail = log_tail(&log_path, LOG_TAIL_LINES);
        let code = status
            .code()
            .map(|c| format!("exit status {c}"))
            .unwrap_or_else(|| "killed by a signal".to_string());
        return Err(fail_with(format!(
            "command failed ({code}); last lines of {}:\n{tail}",
            log_path.display()
        )));
    }
    let records = match manifest::scan(root, outs, &[]) {
        Ok(r) => r,
        Err(e) => return Err(fail_with(format!("cannot read outputs: {e}"))),
    };
    if let Some(missing) = records.iter().find(|r| r.blake3 == MISSING) {
        return Err(fail_with(format!(
            "the command did not write its declared output `{}`",
            missing.path
        )));
    }
    backup.discard();
    Ok((records, serde_json::Value::Null))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        return "    (the command printed nothing)".to_string();
    }
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
