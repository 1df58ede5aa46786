//! Thread pools for a job's compute, sized to its fair share of the cores: all of them when
//! the job runs alone, an even split while other jobs run beside it ([`running_jobs`]; the
//! pipeline counts each running stage as one [`ComputeJob`]). The study's two trainings on two cores then get one
//! thread each, which keeps both cores busy with useful work; sharing one pool of two, each
//! training's single-threaded stretches left a core idle or contended (the pair ran at ~1.08x
//! the throughput of one, against ~1.2x with a thread each). Results do not depend on the
//! thread count, so neither do the models.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;

/// How many compute jobs this process is running right now. A caller holds a [`ComputeJob`]
/// while a job (a pipeline stage) runs; [`ComputePools`] size their thread pools from
/// [`running_jobs`] so that jobs running side by side share the cores instead of contending
/// for all of them.
static RUNNING_JOBS: AtomicUsize = AtomicUsize::new(0);

/// Counts a job as running for as long as it is alive.
pub struct ComputeJob(());

impl ComputeJob {
    pub fn start() -> Self {
        RUNNING_JOBS.fetch_add(1, Ordering::SeqCst);
        ComputeJob(())
    }
}

impl Drop for ComputeJob {
    fn drop(&mut self) {
        RUNNING_JOBS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Jobs running in this process now (at least 1: the caller).
pub fn running_jobs() -> usize {
    RUNNING_JOBS.load(Ordering::SeqCst).max(1)
}

pub struct ComputePools {
    cores: usize,
    /// `pools[t - 1]` has `t` threads; built the first time that share comes up.
    pools: Vec<Option<rayon::ThreadPool>>,
}

impl ComputePools {
    /// Pools over as many cores as rayon's global pool uses (RAYON_NUM_THREADS or all).
    pub fn new() -> Self {
        let cores = rayon::current_num_threads().max(1);
        Self {
            cores,
            pools: (0..cores).map(|_| None).collect(),
        }
    }

    /// Runs `f` on a pool holding this job's current share of the cores.
    pub fn install<R: Send>(&mut self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let threads = (self.cores / running_jobs()).clamp(1, self.cores);
        let slot = &mut self.pools[threads - 1];
        if let Some(pool) = slot {
            return Ok(pool.install(f));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .context("starting compute threads")?;
        Ok(slot.insert(pool).install(f))
    }
}

impl Default for ComputePools {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` with the current pool's other threads polling for work instead of sleeping.
///
/// A training step forks and joins hundreds of times, with short single-threaded stretches
/// between. An idle rayon thread sleeps after a few dozen empty polls, and waking it is a
/// futex call plus, on a virtual machine, a halted virtual CPU to bring back: 6% of a
/// 2-thread ResNet step went to the scheduler and the helper missed the start of many
/// forks. OpenMP runtimes (PyTorch's) spin between parallel regions for the same reason.
/// The pollers run other tasks as soon as they are queued, and yield the core to any other
/// runnable thread between polls. Which thread runs which task never changes what is
/// computed, so results are unchanged.
pub fn with_workers_polling<R>(f: impl FnOnce() -> R) -> R {
    let Some(origin) = rayon::current_thread_index() else {
        return f();
    };
    if rayon::current_num_threads() < 2 {
        return f();
    }
    let done = Arc::new(AtomicBool::new(false));
    // A broadcast gives each thread its own poller; a spawned one could be stolen by one
    // thread while another sleeps, or be popped by the caller's own thread.
    let flag = Arc::clone(&done);
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != origin {
            poll_until(&flag);
        }
    });
    // Set on unwinding too, or the pollers would spin on after a panic.
    let _stop = SetOnDrop(done);
    f()
}

/// How long a poller goes on with nothing to run before it leaves the thread to rayon's own
/// sleep: longer than the serial stretches between a step's forks, short against a step.
const IDLE_LIMIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs queued tasks of the current pool until `done`, or until it has found nothing to run
/// for [`IDLE_LIMIT`], yielding the core between polls.
///
/// A poller can end up running inside a task of the very work it polls for: its thread took
/// one of the step's tasks (from another poller that had not yet seen its own step end, or
/// from rayon's own search for work), and that task, waiting on a join, ran the broadcast
/// poller. Spinning there until the step ends would deadlock: the step waits for the task
/// beneath the poller (it hung the eval_stages test once, and the stress test below without
/// these checks). The idle limit bounds every such case; the thread-local flag ends the
/// commonest one, a poller under another poller, at once.
fn poll_until(done: &AtomicBool) {
    if POLLING.with(|p| p.replace(true)) {
        return;
    }
    let _reset = ClearPollingOnDrop;
    let mut idle_since = None;
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        let now = std::time::Instant::now();
        if now.duration_since(*idle_since.get_or_insert(now)) > IDLE_LIMIT {
            return;
        }
        std::thread::yield_now();
    }
}

thread_local! {
    /// Whether a poller runs on this thread (further down its stack).
    static POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`POLLING`] when the poller ends, also by a panic in a task it ran.
struct ClearPollingOnDrop;

impl Drop for ClearPollingOnDrop {
    fn drop(&mut self) {
        POLLING.with(|p| p.set(false));
    }
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Back-to-back polled calls, each forking, as training steps do, finish: a hang fails
    /// the test after 60 s. Without `poll_until`'s checks this hung within seconds; with the
    /// nesting flag alone it hung once in ~40 runs; with both it takes ~1 s on 2 cores.
    #[test]
    fn back_to_back_polled_calls_never_deadlock() {
        const CALLS: u64 = 20_000;
        /// `x`, after ~1 µs of arithmetic the optimizer cannot drop.
        fn busy(x: u64) -> u64 {
            let mut h = x;
            for _ in 0..300 {
                h = std::hint::black_box(h.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            std::hint::black_box(h);
            x
        }
        let (sent, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .expect("a 2-thread pool");
            let total: u64 = pool.install(|| {
                (0..CALLS)
                    .map(|k| {
                        with_workers_polling(|| {
                            // Tasks that each fork once, with a little work on both sides, so
                            // that a thread often waits on a join whose other half the other
                            // thread took: where a nested poller would be run.
                            (0..64usize)
                                .into_par_iter()
                                .with_max_len(1)
                                .map(|i| {
                                    let i = i as u64;
                                    let (a, b) = rayon::join(|| busy(i * k), || busy(i + k));
                                    a + b
                                })
                                .sum::<u64>()
                        })
                    })
                    .sum()
            });
            let _ = sent.send(total);
        });
        let want: u64 = (0..CALLS)
            .map(|k| (0..64u64).map(|i| busy(i * k) + busy(i + k)).sum::<u64>())
            .sum();
        match received.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(total) => assert_eq!(total, want),
            Err(_) => panic!("{CALLS} back-to-back polled calls did not finish in 60 s: deadlock"),
        }
    }

    #[test]
    fn the_share_shrinks_while_other_stages_run() -> anyhow::Result<()> {
        let mut pools = ComputePools::new();
        let cores = pools.cores;
        assert_eq!(pools.install(rayon::current_num_threads)?, cores);
        let running: Vec<ComputeJob> = (0..3).map(|_| ComputeJob::start()).collect();
        assert_eq!(
            pools.install(rayon::current_num_threads)?,
            (cores / 3).max(1)
        );
        drop(running);
        assert_eq!(pools.install(rayon::current_num_threads)?, cores);
        Ok(())
    }

    /// CPU seconds a thread has used (user + system), from its /proc stat file.
    #[cfg(target_os = "linux")]
    fn cpu_seconds(stat_path: &std::path::Path) -> f64 {
        let stat = std::fs::read_to_string(stat_path).unwrap();
        // Fields after the command name, which is in parentheses: utime is the 12th, stime
        // the 13th of them.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // Linux reports these in USER_HZ, 100 per second on every architecture it supports.
        ticks / 100.0
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn pollers_stop_after_the_work_even_on_a_panic() {
        // The pool's own threads, by their stat files: other tests run in this process too.
        let stats = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = std::sync::Arc::clone(&stats);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .start_handler(move |_| {
                let task = std::fs::read_link("/proc/thread-self").unwrap();
                record
                    .lock()
                    .unwrap()
                    .push(std::path::Path::new("/proc").join(task).join("stat"));
            })
            .build()
            .unwrap();
        // The work forks, and its result comes back.
        let sum = pool.install(|| {
            with_workers_polling(|| (0..1000u64).into_par_iter().map(|i| i * i).sum::<u64>())
        });
        assert_eq!(sum, (0..1000u64).map(|i| i * i).sum::<u64>());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.install(|| with_workers_polling(|| panic!("a failing step")))
        }));
        assert!(panicked.is_err());
        // Two pollers left spinning would burn about two CPU seconds a second.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let stats = stats.lock().unwrap().clone();
        assert_eq!(stats.len(), 3);
        let pool_seconds = || stats.iter().map(|s| cpu_seconds(s)).sum::<f64>();
        let before = pool_seconds();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let used = pool_seconds() - before;
        assert!(
            used < 0.25,
            "{used} CPU seconds in 0.5 s idle: pollers still running"
        );
    }
}
