//! The fast path's fork-join pool: [`super::map_blocks`] hands its blocks to worker threads that wait
//! for the next job by spinning for a while before they sleep.
//!
//! A training step at batch 256 runs about ten parallel regions a millisecond apart (the forward blocks,
//! the backward blocks, the partial sums, the optimiser), separated by the graph's serial work. rayon's
//! workers fall asleep within microseconds of running out of work, so each region began with a futex wake
//! and a reschedule on the other core: 8% of a step's cycles went to the kernel's scheduler. These
//! workers spin on an atomic for up to [`SPIN`] before they park, as OpenMP's active wait policy (which
//! PyTorch's CPU kernels use) does; a job that finds them spinning starts at once, and an idle process
//! stops burning cycles after that window.
//!
//! The protocol: the caller publishes a job (a counter of claimed blocks and the function, on its stack)
//! and bumps the epoch; the caller and every worker claim blocks until none is left; every worker then
//! reports the epoch done, and the caller returns only once all have, so no worker touches the job after
//! it is gone. One job at a time: a caller that finds the pool busy (a nested or concurrent call) runs its
//! blocks itself. A panic in a block is caught where it happens and re-raised in the caller.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// A job: block indices `0..n` to claim, and what to run on each.
struct Job<'a> {
    next: AtomicUsize,
    n: usize,
    /// Block `i` runs on thread `i` (the caller is thread 0, worker `k` thread `k + 1`) instead of on
    /// whichever thread claims it first.
    pinned: bool,
    run: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// Bumped once per job; a worker runs each epoch's job once.
    epoch: AtomicUsize,
    /// The current job, type- and lifetime-erased; valid while the caller waits in [`Pool::run`].
    job: AtomicUsize,
    /// Workers that have finished the current epoch.
    done: AtomicUsize,
    /// Parked workers wait here for the epoch to move.
    lock: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
}

pub(super) struct Pool {
    shared: &'static Shared,
    workers: usize,
    /// Held by the one caller whose job is running.
    busy: AtomicBool,
}

impl Pool {
    /// The pool for `threads` threads in all (the caller and `threads − 1` workers), built on first use.
    pub(super) fn get(threads: usize) -> Option<&'static Pool> {
        static POOL: OnceLock<Pool> = OnceLock::new();
        let pool = POOL.get_or_init(|| Pool::new(threads.saturating_sub(1)));
        (pool.workers + 1 == threads && pool.workers > 0).then_some(pool)
    }

    fn new(workers: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            job: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        }));
        for k in 0..workers {
            thread::Builder::new()
                .name(format!("flowmap-kernel-{k}"))
                .spawn(move || worker(shared, k + 1))
                .expect("spawn a kernel worker thread");
        }
        Pool {
            shared,
            workers,
            busy: AtomicBool::new(false),
        }
    }

    /// Runs `run(i)` for every `i < n` across the caller and the workers; `false` (nothing run) when the
    /// pool is already running another caller's job.
    pub(super) fn run(&self, n: usize, run: &(dyn Fn(usize) + Sync)) -> bool {
        self.start(n, false, run)
    }

    /// As [`Pool::run`], with block `i` on thread `i` every time (the caller runs block 0), so that what
    /// a block reads stays in its core's cache from one call to the next; at most one block per thread.
    pub(super) fn run_pinned(&self, n: usize, run: &(dyn Fn(usize) + Sync)) -> bool {
        assert!(n <= self.workers + 1, "a pinned job has at most one block per thread");
        self.start(n, true, run)
    }

    fn start(&self, n: usize, pinned: bool, run: &(dyn Fn(usize) + Sync)) -> bool {
        if self.busy.swap(true, Ordering::Acquire) {
            return false;
        }
        let panic: Mutex<Option<Box<dyn std::any::Any + Send>>> = Mutex::new(None);
        let guarded = |i: usize| {
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| run(i))) {
                panic.lock().expect("panic slot").get_or_insert(p);
            }
        };
        let job = Job {
            next: AtomicUsize::new(0),
            n,
            pinned,
            run: &guarded,
        };
        let s = self.shared;
        s.done.store(0, Ordering::Relaxed);
        s.job.store(&job as *const Job<'_> as usize, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().expect("pool lock");
            s.wake.notify_all();
        }
        claim(&job, 0);
        // Every worker reports the epoch done before the job leaves this frame.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.workers {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        s.job.store(0, Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);
        if let Some(p) = panic.into_inner().expect("panic slot") {
            resume_unwind(p);
        }
        true
    }
}

/// Claims and runs blocks of `job` until none is left (a pinned job: runs block `me`, if there is one).
fn claim(job: &Job<'_>, me: usize) {
    if job.pinned {
        if me < job.n {
            (job.run)(me);
        }
        return;
    }
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.n {
            return;
        }
        (job.run)(i);
    }
}

/// Worker thread `me` (the caller of a job is thread 0).
fn worker(s: &'static Shared, me: usize) {
    // Epoch 0 is the pool's start, before any job: a worker that starts late still runs the first job.
    let mut seen = 0;
    loop {
        // Spin for the next epoch, then park until it comes.
        let start = Instant::now();
        let mut epoch = s.epoch.load(Ordering::Acquire);
        while epoch == seen {
            if start.elapsed() < SPIN {
                // Check the epoch between single pauses (one can take ~100 cycles), the clock less often.
                for _ in 0..64 {
                    if s.epoch.load(Ordering::Relaxed) != seen {
                        break;
                    }
                    std::hint::spin_loop();
                }
            } else {
                let mut g = s.lock.lock().expect("pool lock");
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen {
                    g = s.wake.wait(g).expect("pool lock");
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
            }
            epoch = s.epoch.load(Ordering::Acquire);
        }
        seen = epoch;
        // SAFETY: the caller published this job before bumping the epoch (Release, paired with the Acquire
        // load above) and keeps it alive until every worker has counted itself done below.
        let job = unsafe { &*(s.job.load(Ordering::Relaxed) as *const Job<'_>) };
        claim(job, me);
        s.done.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` blocks on `pool`, counting how often each ran.
    fn counts(pool: &Pool, n: usize) -> Vec<usize> {
        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        assert!(pool.run(n, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        }));
        hits.into_iter().map(AtomicUsize::into_inner).collect()
    }

    #[test]
    fn every_block_runs_once_whether_the_workers_spin_or_sleep() {
        for workers in [1, 3] {
            let pool = Pool::new(workers);
            for round in 0..300 {
                // Some jobs find the workers spinning, some parked (after the spin window).
                if round % 50 == 0 {
                    thread::sleep(SPIN * 3);
                }
                let n = [0, 1, 2, 7, 64][round % 5];
                assert_eq!(counts(&pool, n), vec![1; n], "{workers} workers, round {round}");
            }
        }
    }

    #[test]
    fn a_pinned_job_runs_block_i_on_thread_i() {
        let pool = Pool::new(3);
        // The thread each block index ran on the first time: it must be the same every time.
        let mut home: Vec<Option<thread::ThreadId>> = vec![None; 4];
        for round in 0..200 {
            if round % 50 == 0 {
                thread::sleep(SPIN * 3);
            }
            let n = round % 5;
            let ran: Vec<Mutex<Vec<thread::ThreadId>>> = (0..n).map(|_| Mutex::new(Vec::new())).collect();
            assert!(pool.run_pinned(n, &|i| ran[i].lock().unwrap().push(thread::current().id())));
            for (i, r) in ran.into_iter().enumerate() {
                let r = r.into_inner().unwrap();
                assert_eq!(r.len(), 1, "round {round}: block {i} runs once");
                assert_eq!(
                    *home[i].get_or_insert(r[0]),
                    r[0],
                    "round {round}: block {i} changed threads"
                );
            }
        }
        assert_eq!(home[0], Some(thread::current().id()), "block 0 runs on the caller");
        let mut ids: Vec<String> = home.iter().map(|id| format!("{:?}", id.unwrap())).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 4, "each block on its own thread");
    }

    #[test]
    fn a_panicking_block_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(1);
        let caught = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 5 {
                    panic!("block 5 fails");
                }
            })
        }));
        let message = caught.expect_err("the panic reaches the caller");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"block 5 fails"));
        assert_eq!(counts(&pool, 16), vec![1; 16]);
    }

    #[test]
    fn a_busy_pool_refuses_nested_and_concurrent_jobs() {
        let pool = Pool::new(1);
        let refused = AtomicUsize::new(0);
        assert!(pool.run(4, &|_| {
            if !pool.run(2, &|_| {}) {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }));
        assert_eq!(refused.load(Ordering::Relaxed), 4);
        // Two threads submitting at once: each job either runs in full on the pool or is refused whole.
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..500 {
                        let hits: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
                        let ran = pool.run(8, &|i| {
                            hits[i].fetch_add(1, Ordering::Relaxed);
                        });
                        let want = usize::from(ran);
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == want));
                    }
                });
            }
        });
    }
}
