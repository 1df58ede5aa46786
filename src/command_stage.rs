//! Command stages: a user's shell command run in the workspace as the leader of a process
//! group of its own, with its declared outputs protected while it runs. Cancelling ends the
//! whole group; the group is journaled before the command starts, so a run that follows a
//! crash ends what the crashed run left running.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use libc::pid_t;

use crate::journal::Group;
use crate::publish::Backup;
use crate::stage_end::StageEnd;

/// How many lines of a failed command's log are shown.
const LOG_TAIL_LINES: usize = 15;
/// How long a cancelled command's group has between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed group's processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The process groups of the commands running now (for `kill_running_groups`).
static RUNNING: Mutex<BTreeSet<pid_t>> = Mutex::new(BTreeSet::new());

/// SIGKILLs every running command's group: for leaving at once (a second Ctrl-C). Their
/// journal records stay, so the next run puts the previous outputs back.
pub fn kill_running_groups() {
    let groups = RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    for &pgid in groups.iter() {
        signal_group(pgid, libc::SIGKILL);
    }
}

/// Keeps a group in RUNNING while it lives.
struct Registered(pid_t);

impl Registered {
    fn new(pgid: pid_t) -> Registered {
        RUNNING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pgid);
        Registered(pgid)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        RUNNING
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// Runs a command stage's `sh -c CMD` in the workspace `root`, its output in `log_path`.
/// `backup` holds the stage's previous outputs (the caller took it and settles it); the
/// command's process group is journaled with it before the command starts.
pub fn execute(
    root: &Path,
    log_path: &Path,
    cmd: &str,
    backup: &mut Backup,
    cancel: &AtomicBool,
) -> Result<(), StageEnd> {
    let logs = File::create(log_path).and_then(|log| Ok((log.try_clone()?, log)));
    let (log, log_err) =
        logs.map_err(|e| StageEnd::Failed(format!("cannot create {}: {e}", log_path.display())))?;
    let (mut child, pgid) = spawn_in_group(root, cmd, log, log_err, backup)
        .map_err(|e| StageEnd::Failed(format!("cannot start `sh -c`: {e}")))?;
    let registered = Registered::new(pgid);
    // Wait in slices so Ctrl-C can stop the command. On Linux the slice ends the moment the
    // child exits (poll on a pidfd), so a long chain of quick commands pays no latency per
    // stage; elsewhere the pause grows from 0.1 ms so quick commands finish quickly and slow
    // ones cost no CPU.
    let exited = ExitWatch::new(child.id());
    let mut pause = Duration::from_micros(100);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                end_group(&mut child, pgid);
                return Err(StageEnd::Failed(format!(
                    "cannot wait for the command: {e}"
                )));
            }
        }
        if cancel.load(Ordering::Relaxed) {
            end_group(&mut child, pgid);
            return Err(StageEnd::Interrupted);
        }
        if !exited.wait(Duration::from_millis(50)) {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    };
    drop(registered);
    if status.success() {
        return Ok(());
    }
    // A signal sent to the group from outside (a terminal's Ctrl-C reaches only us).
    let killed_by_sigint = {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(libc::SIGINT)
    };
    if killed_by_sigint || cancel.load(Ordering::Relaxed) {
        return Err(StageEnd::Interrupted);
    }
    let tail = log_tail(log_path, LOG_TAIL_LINES);
    let code = status
        .code()
        .map(|c| format!("exit status {c}"))
        .unwrap_or_else(|| "killed by a signal".to_string());
    Err(StageEnd::Failed(format!(
        "command failed ({code}); last lines of {}:\n{tail}",
        log_path.display()
    )))
}

/// A child's exit as something to wait on with a timeout: a pidfd on Linux.
struct ExitWatch {
    #[cfg(target_os = "linux")]
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl ExitWatch {
    fn new(pid: u32) -> ExitWatch {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::FromRawFd;
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
            let pidfd = (fd >= 0).then(|| {
                // SAFETY: the descriptor was just returned to us and nothing else owns it.
                unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) }
            });
            ExitWatch { pidfd }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = pid;
            ExitWatch {}
        }
    }

    /// Waits up to `limit` for the child to exit. False when this cannot wait (no pidfd):
    /// the caller then sleeps instead.
    fn wait(&self, limit: Duration) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(fd) = &self.pidfd {
            let mut poll = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on the stack; the result only tells whether it is ready.
            unsafe { libc::poll(&mut poll, 1, limit.as_millis() as libc::c_int) };
            return true;
        }
        let _ = limit;
        false
    }
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

/// The pipe ends of the start gate, as raw descriptors for the forked child.
#[derive(Clone, Copy)]
struct GateFds {
    pid_rx: RawFd,
    pid_tx: RawFd,
    go_rx: RawFd,
    go_tx: RawFd,
}

/// Starts `sh -c CMD` as the leader of a new process group. On Linux it gets SIGKILL when
/// the thread that started it (the stage's, which waits for it) dies, even by kill -9. The
/// child stops at a gate before exec: it sends its pid, we journal its group, and only then
/// does it run the command, so no crash can leave a group running unrecorded.
fn spawn_in_group(
    root: &Path,
    cmd: &str,
    stdout: File,
    stderr: File,
    backup: &mut Backup,
) -> std::io::Result<(Child, pid_t)> {
    let (pid_rx, pid_tx) = std::io::pipe()?;
    let (go_rx, go_tx) = std::io::pipe()?;
    let fds = GateFds {
        pid_rx: pid_rx.as_raw_fd(),
        pid_tx: pid_tx.as_raw_fd(),
        go_rx: go_rx.as_raw_fd(),
        go_tx: go_tx.as_raw_fd(),
    };
    // SAFETY: getpid has no preconditions.
    let engine = unsafe { libc::getpid() };
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on descriptors it inherited and on its stack.
    unsafe {
        command.pre_exec(move || child_gate(engine, fds));
    }
    std::thread::scope(|scope| {
        let backup = &mut *backup;
        let recorder = scope.spawn(move || {
            admit(pid_rx, go_tx, |pid| {
                let start = start_time(pid)?;
                Ok(backup.set_group(Group { pgid: pid, start })?)
            })
        });
        let spawned = command.spawn();
        // Without our write ends, the recorder sees the end of the pipe if no child came.
        drop((pid_tx, go_rx));
        let admitted = recorder
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the recorder panicked")));
        match (spawned, admitted) {
            (Ok(child), Ok(Some(pid))) => Ok((child, pid)),
            (Ok(mut child), _) => {
                // Unreachable: the gate opens only once the group is recorded.
                let _ = child.kill();
                let _ = child.wait();
                Err(std::io::Error::other(
                    "the command's process group was not recorded",
                ))
            }
            // The journal's refusal says more than the child's "operation canceled".
            (Err(_), Err(refused)) => Err(refused),
            (Err(e), Ok(_)) => Err(e),
        }
    })
}

/// The child's side of the gate, between fork and exec (async-signal-safe calls only).
fn child_gate(engine: pid_t, fds: GateFds) -> std::io::Result<()> {
    let os_error = std::io::Error::last_os_error;
    // SAFETY: plain system calls on descriptors this child owns and on stack buffers.
    unsafe {
        libc::close(fds.pid_rx);
        libc::close(fds.go_tx);
        #[cfg(target_os = "linux")]
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) == -1 {
            return Err(os_error());
        }
        // The engine may have died before the line above: then nothing would kill us.
        if libc::getppid() != engine {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        let pid = libc::getpid().to_ne_bytes();
        if libc::write(fds.pid_tx, pid.as_ptr().cast(), pid.len()) != pid.len() as isize {
            return Err(os_error());
        }
        let mut go = 0u8;
        loop {
            let n = libc::read(fds.go_rx, (&mut go as *mut u8).cast(), 1);
            if n == -1 && os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n == 1 && go == 1 {
                return Ok(());
            }
            return Err(std::io::Error::from_raw_os_error(libc::ECANCELED));
        }
    }
}

/// The engine's side of the gate: reads the child's pid, records it, opens the gate if
/// that worked. None when no child reached the gate.
fn admit(
    mut pid_rx: std::io::PipeReader,
    mut go_tx: std::io::PipeWriter,
    record: impl FnOnce(pid_t) -> std::io::Result<()>,
) -> std::io::Result<Option<pid_t>> {
    let mut buf = [0u8; std::mem::size_of::<pid_t>()];
    if pid_rx.read_exact(&mut buf).is_err() {
        return Ok(None);
    }
    let pid = pid_t::from_ne_bytes(buf);
    let recorded = record(pid);
    // A child that is gone no longer needs the answer.
    let _ = go_tx.write_all(&[u8::from(recorded.is_ok())]);
    recorded.map(|()| Some(pid))
}

fn signal_group(pgid: pid_t, signal: libc::c_int) {
    // Never 0 or 1: killpg(0) would signal our own group.
    if pgid > 1 {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::killpg(pgid, signal);
        }
    }
}

/// Ends a running command's whole group: SIGTERM, TERM_GRACE for it to leave, then SIGKILL;
/// reaps the leader.
fn end_group(child: &mut Child, pgid: pid_t) {
    signal_group(pgid, libc::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    loop {
        let _ = child.try_wait();
        if !group_alive(pgid) {
            break;
        }
        if Instant::now() >= deadline {
            signal_group(pgid, libc::SIGKILL);
            wait_gone(pgid);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.wait();
}

fn wait_gone(pgid: pid_t) {
    let deadline = Instant::now() + KILL_WAIT;
    while group_alive(pgid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends a group that a crashed run recorded, if it still runs and is the one recorded:
/// its leader, if alive, started when recorded, and no member started before it. Returns
/// whether it did.
#[cfg(target_os = "linux")]
pub fn end_leftover_group(group: &Group) -> bool {
    // SAFETY: getpgrp has no preconditions.
    if group.pgid <= 1 || group.pgid == unsafe { libc::getpgrp() } {
        return false;
    }
    let members = proc::group_members(group.pgid);
    let ours = !members.is_empty()
        && members
            .iter()
            .all(|m| m.start >= group.start && (m.pid != group.pgid || m.start == group.start));
    if ours {
        signal_group(group.pgid, libc::SIGKILL);
        wait_gone(group.pgid);
    }
    ours
}

/// Without /proc a recorded group cannot be told from a later one that reuses its id, so
/// it is left alone.
#[cfg(not(target_os = "linux"))]
pub fn end_leftover_group(group: &Group) -> bool {
    tracing::warn!(
        pgid = group.pgid,
        "a crashed run may have left this process group running"
    );
    false
}

#[cfg(target_os = "linux")]
fn group_alive(pgid: pid_t) -> bool {
    !proc::group_members(pgid).is_empty()
}

#[cfg(not(target_os = "linux"))]
fn group_alive(pgid: pid_t) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::killpg(pgid, 0) == 0 }
}

#[cfg(target_os = "linux")]
fn start_time(pid: pid_t) -> std::io::Result<u64> {
    proc::stat(pid).map(|s| s.start).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("cannot read /proc/{pid}/stat"),
        )
    })
}

#[cfg(not(target_os = "linux"))]
fn start_time(_pid: pid_t) -> std::io::Result<u64> {
    Ok(0)
}

/// Processes as /proc shows them.
#[cfg(target_os = "linux")]
mod proc {
    use libc::pid_t;

    pub struct Stat {
        pub pid: pid_t,
        state: char,
        pgrp: pid_t,
        /// Clock ticks after boot.
        pub start: u64,
    }

    pub fn stat(pid: pid_t) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID PGRP ..." where COMM may hold anything, ")" included.
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Stat {
            pid,
            state: fields.first()?.chars().next()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// The live (not zombie) processes of a group.
    pub fn group_members(pgid: pid_t) -> Vec<Stat> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<pid_t>().ok())
            .filter_map(stat)
            .filter(|s| s.pgrp == pgid && s.state != 'Z' && s.state != 'X')
            .collect()
    }
}
