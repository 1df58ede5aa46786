//! Thread pools for a job's compute, sized to its fair share of the cores: all of them when
//! the job runs alone, an even split while other jobs run beside it ([`running_jobs`]; the
//! pipeline counts each running stage as one [`ComputeJob`]). The study's two trainings on two cores then get one
//! thread each, which keeps both cores busy with useful work; sharing one pool of two, each
//! training's single-threaded stretches left a core idle or contended (the pair ran at ~1.08x
//! the throughput of one, against ~1.2x with a thread each). Results do not depend on the
//! thread count, so neither do the models.

use std::sync::atomic::{AtomicUsize, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
