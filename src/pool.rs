//! The bounded blocking pool: a few std threads, started as work comes,
//! and a bounded job queue; with async-io's reactor thread, the only
//! threads in the process.
//!
//! SQLite and HTTP calls block; they run here so the event loop never does.
//! A full queue is an answer, not a wait: [`Pool::submit`] returns
//! [`PoolError::Full`] at once, which the client sees as `OVER_CAPACITY`. A
//! job still queued when its deadline passes is answered
//! [`PoolError::Timeout`] and not run. (`smol::unblock` is not used: its
//! pool grows to 500 threads behind an unbounded queue.)
//!
//! The store's group commits take the first lane ([`Pool::submit_first`]):
//! a thread that comes free runs a job of that lane before any other, so
//! a burst of reads can neither refuse nor hold up a commit.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `[pool]`.
#[derive(Debug, Clone, Default)]
pub struct PoolConfig {
    pub threads: usize,
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// The queue is full; try again later.
    Full,
    /// The job waited past its deadline and was not run.
    Timeout,
    /// The pool is shutting down, or the job panicked.
    Gone,
}

type Job = Box<dyn FnOnce(bool) + Send>;

struct Queued {
    /// `None`: only a wake-up, for a job put in the first lane.
    job: Option<Job>,
    queued_at: Instant,
    deadline: Instant,
}

/// Counters shared with the worker threads.
#[derive(Default)]
pub struct PoolStats {
    /// Threads running a job now (for starting another when all are).
    pub busy: AtomicU64,
    pub run: AtomicU64,
    pub rejected: AtomicU64,
    pub timed_out: AtomicU64,
    /// Queue wait plus run time, in microseconds.
    pub latency_us_sum: AtomicU64,
    /// Counts per bucket of the histogram bounds
    /// ([`crate::ops::histogram::BOUNDS`]), +Inf last.
    pub latency_buckets: [AtomicU64; crate::ops::histogram::BOUNDS.len() + 1],
}

/// Most jobs waiting in the first lane (the store's writer has one batch
/// in flight at a time); past it `Full`, counted as any refusal.
pub const FIRST_LANE: usize = 4;

pub struct Pool {
    /// Unbounded as a channel, bounded by `queue` in `submit` (every job
    /// is submitted from the event loop): a bounded channel allocates and
    /// touches every slot at start, resident memory for an empty queue.
    tx: async_channel::Sender<Queued>,
    queue: usize,
    pub stats: Arc<PoolStats>,
    threads: usize,
    /// Threads are started as work comes, up to `threads`: an idle
    /// gateway (or one with no LLM provider called yet) keeps none of
    /// their stacks and heaps resident.
    rx: async_channel::Receiver<Queued>,
    started: std::cell::Cell<usize>,
    /// The first lane: taken before the queue (bounded by
    /// [`FIRST_LANE`] in `submit_first`).
    first: async_channel::Sender<Queued>,
    first_rx: async_channel::Receiver<Queued>,
}

impl Pool {
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Pool> {
        let (tx, rx) = async_channel::unbounded::<Queued>();
        let (first, first_rx) = async_channel::unbounded::<Queued>();
        Ok(Pool {
            tx,
            queue: queue.max(1),
            stats: Arc::new(PoolStats::default()),
            threads: threads.max(1),
            rx,
            started: std::cell::Cell::new(0),
            first,
            first_rx,
        })
    }

    /// Before a job is queued: starts the first thread, or one more when
    /// every started thread is busy, up to the pool's size. False when no
    /// thread runs and none could be started.
    fn grow(&self) -> bool {
        let started = self.started.get();
        let all_busy = self.stats.busy.load(Relaxed) as usize + self.tx.len() >= started;
        if started < self.threads && all_busy {
            let (rx, stats, first) = (self.rx.clone(), self.stats.clone(), self.first_rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("hivegate-pool-{started}"))
                .spawn(move || worker(rx, first, stats));
            if spawned.is_ok() {
                self.started.set(started + 1);
            }
        }
        self.started.get() > 0
    }

    /// Jobs waiting to run.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    pub fn capacity(&self) -> usize {
        self.queue
    }

    /// Queues `f` to run on a pool thread within `deadline`. Returns at
    /// once: `Err(Full)` when the queue is full, otherwise a future of the
    /// result.
    pub fn submit<T, F>(
        &self,
        deadline: Duration,
        f: F,
    ) -> Result<impl Future<Output = Result<T, PoolError>>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (queued, answer) = job(deadline, f);
        // A thread to run it first (a job queued with none would run
        // later for a caller told it was refused).
        if self.tx.len() >= self.queue || !self.grow() || self.tx.try_send(queued).is_err() {
            self.stats.rejected.fetch_add(1, Relaxed);
            return Err(PoolError::Full);
        }
        Ok(answer)
    }

    /// [`Pool::submit`] in the first lane: run before every queued job,
    /// and not refused while the queue is full (only past
    /// [`FIRST_LANE`] of its own).
    pub fn submit_first<T, F>(
        &self,
        deadline: Duration,
        f: F,
    ) -> Result<impl Future<Output = Result<T, PoolError>>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (queued, answer) = job(deadline, f);
        // Nothing queued (only the event loop queues, so nothing can be
        // queued meanwhile): the queue's head is as first as the lane.
        let queued = if self.tx.is_empty() && self.grow() {
            match self.tx.try_send(queued) {
                Ok(()) => return Ok(answer),
                Err(e) => e.into_inner(),
            }
        } else {
            queued
        };
        if self.first.len() >= FIRST_LANE || !self.grow() || self.first.try_send(queued).is_err() {
            self.stats.rejected.fetch_add(1, Relaxed);
            return Err(PoolError::Full);
        }
        // A thread waiting on the queue wakes and looks at the lane; a
        // busy one looks there when its job ends.
        let wake = Queued {
            job: None,
            queued_at: Instant::now(),
            deadline: Instant::now(),
        };
        let _ = self.tx.try_send(wake);
        Ok(answer)
    }

    /// A hint for `retry_after_ms` when the queue is full: the time the
    /// queue takes to drain at the average job latency so far.
    pub fn retry_after_ms(&self) -> u64 {
        let s = &self.stats;
        let done = s.run.load(Relaxed).max(1);
        let avg_us = s.latency_us_sum.load(Relaxed) / done;
        let drain_us = avg_us * self.queued() as u64 / self.threads as u64;
        (drain_us / 1000).clamp(10, 5000)
    }
}

/// `f` as a job for the queue, and the future of its answer.
fn job<T, F>(deadline: Duration, f: F) -> (Queued, impl Future<Output = Result<T, PoolError>>)
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (reply_tx, reply_rx) = async_channel::bounded::<Result<T, PoolError>>(1);
    let job: Job = Box::new(move |expired| {
        let result = if expired {
            Err(PoolError::Timeout)
        } else {
            Ok(f())
        };
        // The caller may have gone (client disconnected); that is fine.
        let _ = reply_tx.try_send(result);
    });
    let now = Instant::now();
    let queued = Queued {
        job: Some(job),
        queued_at: now,
        deadline: now + deadline,
    };
    (queued, async move {
        reply_rx.recv().await.unwrap_or(Err(PoolError::Gone))
    })
}

fn worker(
    rx: async_channel::Receiver<Queued>,
    first: async_channel::Receiver<Queued>,
    stats: Arc<PoolStats>,
) {
    loop {
        // The first lane before the queue, every time a thread is free.
        let next = match first.is_empty() {
            true => None,
            false => first.try_recv().ok(),
        };
        let q = match next {
            Some(q) => q,
            None => match rx.recv_blocking() {
                Ok(q) => q,
                Err(_) => return,
            },
        };
        let Some(job) = q.job else { continue };
        let expired = Instant::now() > q.deadline;
        if expired {
            stats.timed_out.fetch_add(1, Relaxed);
            job(true);
            continue;
        }
        // A panicking job must not take the thread (and so the pool's
        // capacity) with it; its caller sees `Gone`. (Release builds abort
        // on panic instead, and systemd restarts the service: a panic is a
        // bug, never a reaction to input.)
        stats.busy.fetch_add(1, Relaxed);
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(false)));
        stats.busy.fetch_sub(1, Relaxed);
        let latency = q.queued_at.elapsed();
        stats.run.fetch_add(1, Relaxed);
        stats
            .latency_us_sum
            .fetch_add(latency.as_micros() as u64, Relaxed);
        stats.latency_buckets[crate::ops::histogram::bucket(latency)].fetch_add(1, Relaxed);
        drop(ran);
    }
}

impl Pool {
    /// Prometheus lines for the pool.
    pub fn render(&self, out: &mut String) {
        use crate::ops::metrics::{counter, gauge};
        let s = &self.stats;
        gauge(
            out,
            "hivegate_pool_queue_depth",
            "Jobs waiting for a pool thread.",
            self.queued() as u64,
        );
        gauge(
            out,
            "hivegate_pool_queue_capacity",
            "Bound of the pool's job queue.",
            self.capacity() as u64,
        );
        counter(
            out,
            "hivegate_pool_jobs_run_total",
            "Jobs run on the pool.",
            s.run.load(Relaxed),
        );
        counter(
            out,
            "hivegate_pool_jobs_rejected_total",
            "Jobs refused because the queue was full.",
            s.rejected.load(Relaxed),
        );
        counter(
            out,
            "hivegate_pool_jobs_timed_out_total",
            "Jobs not run because their deadline passed in the queue.",
            s.timed_out.load(Relaxed),
        );
        let name = "hivegate_pool_job_seconds";
        crate::ops::histogram::family(out, name, "Time from submission to the end of the job.");
        let counts: Vec<u64> = s.latency_buckets.iter().map(|c| c.load(Relaxed)).collect();
        crate::ops::histogram::write(out, name, "", &counts, s.latency_us_sum.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use std::sync::mpsc;

    /// Keeps a pool thread busy until the returned sender says go.
    fn occupy(
        pool: &Pool,
    ) -> (
        impl std::future::Future<Output = Result<(), PoolError>>,
        mpsc::Sender<()>,
    ) {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let busy = pool
            .submit(Duration::from_secs(5), move || {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
        started_rx.recv().unwrap();
        (busy, release_tx)
    }

    /// The worker counts a job just after the job has answered: wait for it.
    fn wait_for_run_count(pool: &Pool, n: u64) {
        let end = Instant::now() + Duration::from_secs(5);
        while pool.stats.run.load(Relaxed) < n && Instant::now() < end {
            std::thread::yield_now();
        }
    }

    #[test]
    fn runs_jobs_and_returns_results() {
        let pool = Pool::new(2, 4).unwrap();
        let a = pool.submit(Duration::from_secs(5), || 2 + 2).unwrap();
        assert_eq!(block_on(a), Ok(4));
        wait_for_run_count(&pool, 1);
        assert_eq!(pool.stats.run.load(Relaxed), 1);
    }

    #[test]
    fn threads_start_as_work_comes_and_a_busy_one_gets_a_sibling() {
        let pool = Pool::new(2, 4).unwrap();
        assert_eq!(pool.started.get(), 0, "no thread before any work");
        // A long job holds the first thread; the next still runs at once,
        // on a second thread, rather than waiting behind it.
        let (busy, release_tx) = occupy(&pool);
        assert_eq!(pool.started.get(), 1);
        let quick = pool.submit(Duration::from_secs(5), || 7).unwrap();
        assert_eq!(block_on(quick), Ok(7));
        assert_eq!(pool.started.get(), 2);
        release_tx.send(()).unwrap();
        let _ = block_on(busy);
        // Never more than the pool's size.
        for _ in 0..3 {
            let _ = block_on(pool.submit(Duration::from_secs(5), || 0).unwrap());
        }
        assert_eq!(pool.started.get(), 2);
    }

    #[test]
    fn a_full_queue_refuses_at_once() {
        let pool = Pool::new(1, 1).unwrap();
        // Occupy the only thread...
        let (busy, release_tx) = occupy(&pool);
        // ...fill the one queue slot...
        let queued = pool.submit(Duration::from_secs(5), || 1).unwrap();
        // ...and the next is refused without waiting.
        assert_eq!(
            pool.submit(Duration::from_secs(5), || 2).err(),
            Some(PoolError::Full)
        );
        assert_eq!(pool.stats.rejected.load(Relaxed), 1);
        release_tx.send(()).unwrap();
        assert_eq!(block_on(busy), Ok(()));
        assert_eq!(block_on(queued), Ok(1));
    }

    #[test]
    fn the_first_lane_goes_before_the_queue_and_past_a_full_one() {
        let pool = Pool::new(1, 2).unwrap();
        let (busy, release_tx) = occupy(&pool);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = |name: &'static str| {
            let order = order.clone();
            move || order.lock().unwrap().push(name)
        };
        // The queue is full of reads...
        let r1 = pool.submit(Duration::from_secs(5), log("read 1")).unwrap();
        let r2 = pool.submit(Duration::from_secs(5), log("read 2")).unwrap();
        assert!(pool.submit(Duration::from_secs(5), log("read 3")).is_err());
        // ...and a commit still goes in, and runs first.
        let w = pool
            .submit_first(Duration::from_secs(5), log("commit"))
            .unwrap();
        release_tx.send(()).unwrap();
        block_on(busy).unwrap();
        block_on(w).unwrap();
        block_on(r1).unwrap();
        block_on(r2).unwrap();
        assert_eq!(*order.lock().unwrap(), ["commit", "read 1", "read 2"]);
        // The lane has its own bound (the first job, with nothing queued,
        // goes to the head of the queue instead).
        let (busy, release_tx) = occupy(&pool);
        let lane: Vec<_> = (0..=FIRST_LANE)
            .map(|_| pool.submit_first(Duration::from_secs(5), || ()).unwrap())
            .collect();
        assert_eq!(
            pool.submit_first(Duration::from_secs(5), || ()).err(),
            Some(PoolError::Full)
        );
        release_tx.send(()).unwrap();
        block_on(busy).unwrap();
        for f in lane {
            block_on(f).unwrap();
        }
    }

    #[test]
    fn a_job_past_its_deadline_is_not_run() {
        let pool = Pool::new(1, 4).unwrap();
        let (busy, release_tx) = occupy(&pool);
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        let late = pool
            .submit(Duration::ZERO, move || {
                r.fetch_add(1, Relaxed);
            })
            .unwrap();
        // The deadline passes while the job waits behind the busy one.
        std::thread::sleep(Duration::from_millis(5));
        release_tx.send(()).unwrap();
        block_on(busy).unwrap();
        assert_eq!(block_on(late), Err(PoolError::Timeout));
        assert_eq!(ran.load(Relaxed), 0);
        assert_eq!(pool.stats.timed_out.load(Relaxed), 1);
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_thread() {
        let pool = Pool::new(1, 4).unwrap();
        let bad = pool
            .submit(Duration::from_secs(5), || -> u32 { panic!("boom") })
            .unwrap();
        assert_eq!(block_on(bad), Err(PoolError::Gone));
        let good = pool.submit(Duration::from_secs(5), || 7).unwrap();
        assert_eq!(block_on(good), Ok(7));
    }

    #[test]
    fn renders_a_histogram() {
        let pool = Pool::new(1, 4).unwrap();
        block_on(pool.submit(Duration::from_secs(5), || ()).unwrap()).unwrap();
        wait_for_run_count(&pool, 1);
        let mut out = String::new();
        pool.render(&mut out);
        assert!(
            out.contains("hivegate_pool_job_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("hivegate_pool_job_seconds_count 1\n"));
    }
}
