//! The generation workers: a fixed set of OS threads (a step is blocking CPU work that must not
//! run on the async runtime) fed from one bounded queue. Each worker runs one request to its
//! end, so at most `workers` generations hold KV caches at once; arrivals past `max_queue`
//! waiting requests are refused with 429 instead of piling up. Waiting jobs start in order of
//! priority (lower first, vLLM's convention), then of arrival: with every priority 0 (the
//! server's `fcfs` policy) the queue is first come, first served.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::metrics::Metrics;

/// A unit of work: one request's whole generation. Jobs queued when a drain begins still run.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A waiting job, ordered so that the heap's top is the lowest priority value, then the
/// earliest arrival.
struct Queued {
    key: Reverse<(i64, u64)>,
    job: Job,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

struct State {
    queue: BinaryHeap<Queued>,
    /// Jobs submitted so far: each one's arrival number.
    arrivals: u64,
    busy: usize,
    closed: bool,
    /// Exponential moving average of job durations, for Retry-After.
    avg_job_s: f64,
}

struct Shared {
    state: Mutex<State>,
    ready: Condvar,
    idle: Condvar,
    max_queue: usize,
    workers: usize,
    metrics: Arc<Metrics>,
}

pub struct Pool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The queue is full: retry after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub retry_after_s: u64,
    pub queued: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job panicking never holds this lock (jobs run outside it), so poison is benign.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Pool {
    pub fn new(workers: usize, max_queue: usize, metrics: Arc<Metrics>) -> std::io::Result<Pool> {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: BinaryHeap::new(),
                arrivals: 0,
                busy: 0,
                closed: false,
                avg_job_s: 1.0,
            }),
            ready: Condvar::new(),
            idle: Condvar::new(),
            max_queue,
            workers,
            metrics,
        });
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("verdict-gen-{i}"))
                    .spawn(move || worker(&s))?,
            );
        }
        Ok(Pool {
            shared,
            threads: Mutex::new(threads),
        })
    }

    /// Queues `job` at priority 0, or refuses when `max_queue` requests already wait (a free
    /// worker takes a job at once, so an idle server never refuses).
    pub fn submit(&self, job: Job) -> Result<(), Full> {
        self.submit_at(0, job)
    }

    /// [`Pool::submit`] at `priority`: it starts before every waiting job of a higher value.
    pub fn submit_at(&self, priority: i64, job: Job) -> Result<(), Full> {
        let mut st = self.shared.lock();
        let free = self.shared.workers.saturating_sub(st.busy);
        if st.closed || st.queue.len() >= self.shared.max_queue + free {
            let waves = (st.queue.len() / self.shared.workers + 1) as f64;
            let retry_after_s = (st.avg_job_s * waves).ceil().clamp(1.0, 60.0) as u64;
            return Err(Full {
                retry_after_s,
                queued: st.queue.len(),
            });
        }
        let arrival = st.arrivals;
        st.arrivals += 1;
        st.queue.push(Queued {
            key: Reverse((priority, arrival)),
            job,
        });
        self.shared.metrics.queue_depth.set(st.queue.len() as i64);
        drop(st);
        self.shared.ready.notify_one();
        Ok(())
    }

    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    pub fn busy(&self) -> usize {
        self.shared.lock().busy
    }

    /// Refuses new jobs, waits (up to `timeout`) until the queue is empty and no job runs, and
    /// stops the threads. Returns whether everything finished in time.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.ready.notify_all();
        while !(st.queue.is_empty() && st.busy == 0) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .idle
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        true
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut st = s.lock();
            loop {
                if let Some(q) = st.queue.pop() {
                    st.busy += 1;
                    s.metrics.queue_depth.set(st.queue.len() as i64);
                    break q.job;
                }
                if st.closed {
                    return;
                }
                st = s.ready.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        s.metrics.active.inc();
        let t0 = Instant::now();
        // A panic in a job (a bug) must not take the worker with it; the job's own channel is
        // dropped by the unwind, which tells its HTTP side that it failed.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a generation job panicked; the worker carries on");
        }
        s.metrics.active.dec();
        let mut st = s.lock();
        st.busy -= 1;
        st.avg_job_s = 0.8 * st.avg_job_s + 0.2 * t0.elapsed().as_secs_f64();
        if st.queue.is_empty() && st.busy == 0 {
            s.idle.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    #[test]
    fn bounded_queue_refuses_then_drains() {
        let metrics = Arc::new(Metrics::new());
        let pool = Pool::new(1, 2, metrics).unwrap();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let done = Arc::new(AtomicUsize::new(0));
        // Job 1 occupies the only worker until the gate opens.
        pool.submit(Box::new(move || {
            started_tx.send(()).unwrap();
            gate_rx.recv().unwrap();
        }))
        .unwrap();
        started_rx.recv().unwrap();
        for _ in 0..2 {
            let d = done.clone();
            pool.submit(Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        }
        let full = pool.submit(Box::new(|| {})).unwrap_err();
        assert_eq!(full.queued, 2);
        assert!(full.retry_after_s >= 1);
        gate_tx.send(()).unwrap();
        assert!(pool.drain(Duration::from_secs(10)));
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert!(pool.submit(Box::new(|| {})).is_err(), "closed after drain");
    }

    #[test]
    fn waiting_jobs_start_by_priority_then_arrival() {
        let pool = Pool::new(1, 8, Arc::new(Metrics::new())).unwrap();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        pool.submit(Box::new(move || {
            started_tx.send(()).unwrap();
            gate_rx.recv().unwrap();
        }))
        .unwrap();
        started_rx.recv().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        for (name, priority) in [("a", 0), ("b", 5), ("c", -1), ("d", 0), ("e", -1)] {
            let o = order.clone();
            pool.submit_at(priority, Box::new(move || o.lock().unwrap().push(name)))
                .unwrap();
        }
        gate_tx.send(()).unwrap();
        assert!(pool.drain(Duration::from_secs(10)));
        assert_eq!(*order.lock().unwrap(), ["c", "e", "a", "d", "b"]);
    }

    #[test]
    fn a_panicking_job_does_not_kill_the_worker() {
        let pool = Pool::new(1, 4, Arc::new(Metrics::new())).unwrap();
        pool.submit(Box::new(|| panic!("boom"))).unwrap();
        let (tx, rx) = mpsc::channel();
        pool.submit(Box::new(move || tx.send(7).unwrap())).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(7));
        assert!(pool.drain(Duration::from_secs(10)));
    }
}
