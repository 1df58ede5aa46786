//! When stages run: the ready set (every parent finished), at most `jobs` at once, in
//! pipeline order among the ready ones, and what a finished stage unblocks. It knows nothing
//! of what a stage does or how it is recorded: `prepare`, `work` and `finish` say that.

use std::collections::BTreeSet;
use std::sync::{mpsc, Mutex, PoisonError};

use crate::dag::Dag;

/// What the scheduler does after a stage finished.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Its children may run once their other parents finished.
    Unblock,
    /// Start nothing more; wait for what runs, then return (a failure, an interrupt).
    Halt,
}

/// The scheduler's caller's side, called on the scheduler's thread only.
pub trait Books<J, O> {
    /// Stage i is about to start: the snapshot it needs of what finished.
    fn prepare(&mut self, i: usize) -> J;
    /// Stage i completed with `outcome`.
    fn finish(&mut self, i: usize, outcome: O) -> Flow;
    /// Asked before each start: stop starting stages (Ctrl-C).
    fn halted(&self) -> bool;
}

/// Runs the `selected` stages of `dag`: `work(i, job)` on a worker thread (or inline when
/// it is the only stage that can run), `books` told of each start and finish.
pub fn schedule<J: Send, O: Send>(
    dag: &Dag,
    selected: &BTreeSet<usize>,
    jobs: usize,
    books: &mut impl Books<J, O>,
    work: impl Fn(usize, J) -> O + Sync,
) {
    let stage_count = dag.order.len();
    let mut position = vec![0; stage_count];
    for (pos, &i) in dag.order.iter().enumerate() {
        position[i] = pos;
    }
    // Parents not yet finished, per selected stage; a stage is ready at zero. Ready stages
    // start in pipeline order.
    let mut unmet: Vec<Option<usize>> = vec![None; stage_count];
    let mut ready: BTreeSet<(usize, usize)> = BTreeSet::new();
    for &i in selected {
        let parents = dag.parents(i).len();
        unmet[i] = Some(parents);
        if parents == 0 {
            ready.insert((position[i], i));
        }
    }
    let jobs = jobs.max(1);
    let mut halt = false;
    let (done_tx, done_rx) = mpsc::channel::<(usize, O)>();
    let (job_tx, job_rx) = mpsc::channel::<(usize, J)>();
    let job_rx = Mutex::new(job_rx);
    let work = &work;
    std::thread::scope(|scope| {
        let mut running = 0usize;
        let mut workers = 0usize;
        let mut inline: Option<(usize, O)> = None;
        loop {
            halt = halt || books.halted();
            // A worker is started only when every existing one is busy, so a huge -j costs
            // nothing and a chain needs none. A stage's compute (rayon inside candle and
            // our kernels) goes to the global pool, across every core.
            while !halt && running < jobs {
                let Some((_, i)) = ready.pop_first() else {
                    break;
                };
                let job = books.prepare(i);
                running += 1;
                // Alone (nothing running, nothing else ready, as along a chain): run it
                // here, without handing it to a worker and back.
                if running == 1 && ready.is_empty() {
                    inline = Some((i, work(i, job)));
                    break;
                }
                if running > workers {
                    workers += 1;
                    let (done_tx, job_rx) = (done_tx.clone(), &job_rx);
                    scope.spawn(move || worker(job_rx, &done_tx, work));
                }
                if job_tx.send((i, job)).is_err() {
                    break;
                }
            }
            if running == 0 {
                break;
            }
            let (i, outcome) = match inline.take() {
                Some(done) => done,
                None => match done_rx.recv() {
                    Ok(done) => done,
                    Err(_) => break,
                },
            };
            running -= 1;
            match books.finish(i, outcome) {
                Flow::Halt => halt = true,
                Flow::Unblock => {
                    for child in dag.children(i) {
                        if let Some(n) = unmet[child].as_mut() {
                            *n -= 1;
                            if *n == 0 {
                                ready.insert((position[child], child));
                            }
                        }
                    }
                }
            }
        }
        // The workers end when the queue closes.
        drop(job_tx);
    });
}

/// A worker thread: runs the stages it is sent until the queue closes.
fn worker<J, O>(
    jobs: &Mutex<mpsc::Receiver<(usize, J)>>,
    done: &mpsc::Sender<(usize, O)>,
    work: &(impl Fn(usize, J) -> O + Sync),
) {
    loop {
        let next = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((i, job)) = next else {
            return;
        };
        if done.send((i, work(i, job))).is_err() {
            return;
        }
    }
}
