//! Shared forwards across sequences: the forwards that sessions of one model ask for at about
//! the same time (concurrent requests, each on its own worker thread) run as one
//! [`forward_batch`] on a batching thread.
//!
//! Decoding is bound by reading the weights: a forward over a few more rows costs little more
//! than one over a single row, so requests that step together share that cost. Each sequence
//! still gets exactly the logits it would get alone (the forward is row-wise, see
//! [`super::transformer`]), so batching never changes an output.
//!
//! How a batch forms: a session lends itself (moved, no copy of the cache) to the batching
//! thread and blocks until it comes back with its result. The thread takes the first arrival,
//! everything already queued, then waits a short window for the other live sessions of the
//! model (its members) that have not arrived yet. The window is a fraction of the recent
//! forward time, so a member busy elsewhere (drafting, a policy call) costs at most that
//! fraction, while members that step in lockstep always share.
//!
//! A long prompt is prefilled in chunks ([`super::Model::with_prefill_chunk`]), one batched
//! forward each: the other sequences' steps join the batches in between instead of waiting for
//! the whole prompt (a 4000-token prompt is half a minute of the 1.5B's prefill on two cores).
//! Between chunks the prefill also asks whether its request is still wanted ([`interruptible`]):
//! a client that leaves during a long prompt stops it there.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::error::{ModelError, Result};
use super::transformer::{BatchItem, Forward, Rows, Session, forward_batch};

/// The wait for members still on their way, as a fraction of the mean forward time.
const WINDOW_FRACTION: f64 = 0.1;
/// Never wait longer than this, whatever a forward costs.
const MAX_WINDOW: Duration = Duration::from_millis(20);
/// Nor shorter: about what waking a blocked thread takes.
const MIN_WINDOW: Duration = Duration::from_micros(200);

type Stop = Box<dyn Fn() -> bool>;

thread_local! {
    /// What a chunked prefill on this thread asks between chunks ([`interruptible`]).
    static STOP: RefCell<Option<Stop>> = const { RefCell::new(None) };
}

/// Runs `f` with `stop` asked between the chunks of every chunked prefill it runs on this thread
/// (the caller's thread runs the chunk loop; [`super::Model::with_prefill_chunk`]). Once `stop`
/// says yes, the prefill ends with [`ModelError::Interrupted`] and caches none of its
/// positions. The server passes "the client has gone", so a long prompt nobody waits for stops
/// early.
pub fn interruptible<T>(stop: impl Fn() -> bool + 'static, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Stop>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            STOP.with(|s| *s.borrow_mut() = prev);
        }
    }
    let _restore = Restore(STOP.with(|s| s.replace(Some(Box::new(stop)))));
    f()
}

fn stop_asked() -> bool {
    STOP.with(|s| s.borrow().as_ref().is_some_and(|stop| stop()))
}

/// Counters of one batcher (read with [`super::Model::batch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batched forwards run.
    pub forwards: u64,
    /// Sequences in them (sequences / forwards = mean batch size).
    pub sequences: u64,
    /// Sessions alive now that may join a batch.
    pub members: u64,
}

struct Job {
    session: Session,
    tokens: Vec<u32>,
    rows: Rows,
    reply: mpsc::SyncSender<(Session, Result<Forward>)>,
}

#[derive(Default)]
struct Shared {
    members: AtomicUsize,
    /// The most new positions of a prefill ([`Rows::Last`]) in one forward; 0: no limit.
    prefill_chunk: AtomicUsize,
    forwards: AtomicU64,
    sequences: AtomicU64,
}

/// The batching thread's handle. Dropping the last handle (model clones and sessions hold one)
/// ends the thread.
#[derive(Debug)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("members", &self.members.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Batcher {
    pub(crate) fn start(max_batch: usize) -> Result<Arc<Batcher>> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name("verdict-batch".into())
            .spawn(move || batch_loop(&rx, &s, max_batch))
            .map_err(|e| ModelError::Invalid(format!("cannot start the batching thread: {e}")))?;
        Ok(Arc::new(Batcher { tx, shared }))
    }

    /// A new member: a live session whose forwards go through this batcher.
    pub(crate) fn join(self: &Arc<Self>) -> Membership {
        self.shared.members.fetch_add(1, Ordering::SeqCst);
        Membership {
            batcher: self.clone(),
        }
    }

    pub fn stats(&self) -> BatchStats {
        let s = &self.shared;
        BatchStats {
            forwards: s.forwards.load(Ordering::Relaxed),
            sequences: s.sequences.load(Ordering::Relaxed),
            members: s.members.load(Ordering::Relaxed) as u64,
        }
    }

    /// Prefills of more than `chunk` positions run as forwards of at most `chunk` (0: whole).
    /// Rows are independent, so this changes no result, only who waits for whom.
    pub(crate) fn set_prefill_chunk(&self, chunk: usize) {
        self.shared.prefill_chunk.store(chunk, Ordering::Relaxed);
    }

    /// Runs `session`'s forward in the next batch (a long prefill in the next few, see
    /// [`super::Model::with_prefill_chunk`]). The session is lent to the batching thread and put
    /// back before this returns; if that thread is gone, it runs here instead.
    pub(crate) fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        rows: Rows,
    ) -> Result<Forward> {
        let chunk = self.shared.prefill_chunk.load(Ordering::Relaxed);
        if rows != Rows::Last || chunk == 0 || tokens.len() <= chunk {
            return self.forward_once(session, tokens, rows);
        }
        let start = session.len();
        let mut last = None;
        for part in tokens.chunks(chunk) {
            let result = if last.is_some() && stop_asked() {
                Err(ModelError::Interrupted)
            } else {
                self.forward_once(session, part, rows)
            };
            match result {
                Ok(f) => last = Some(f),
                Err(e) => {
                    // As an unchunked forward that failed: none of the tokens stays cached.
                    let _ = session.truncate(start);
                    return Err(e);
                }
            }
        }
        last.ok_or_else(|| ModelError::Invalid("an empty prefill".into()))
    }

    fn forward_once(&self, session: &mut Session, tokens: &[u32], rows: Rows) -> Result<Forward> {
        let stand_in = session.placeholder();
        let lent = std::mem::replace(session, stand_in);
        let (reply, back) = mpsc::sync_channel(1);
        let job = Job {
            session: lent,
            tokens: tokens.to_vec(),
            rows,
            reply,
        };
        if let Err(mpsc::SendError(job)) = self.tx.send(job) {
            *session = job.session;
            return session.forward_alone(tokens, rows);
        }
        match back.recv() {
            Ok((s, result)) => {
                *session = s;
                result
            }
            // Only if the batching thread died mid-batch (a bug): the cache went with it.
            Err(_) => Err(ModelError::Invalid(
                "the batching thread stopped during this sequence's forward; its KV cache is lost"
                    .into(),
            )),
        }
    }
}

/// A session's membership of its model's batcher: counted while the session lives.
#[derive(Debug)]
pub struct Membership {
    batcher: Arc<Batcher>,
}

impl Membership {
    pub(crate) fn batcher(&self) -> &Arc<Batcher> {
        &self.batcher
    }

    /// The membership of a forked session.
    pub(crate) fn join_again(&self) -> Membership {
        self.batcher.join()
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.batcher.shared.members.fetch_sub(1, Ordering::SeqCst);
    }
}

fn batch_loop(rx: &mpsc::Receiver<Job>, shared: &Shared, max_batch: usize) {
    // Mean seconds per batched forward (exponential moving average).
    let mut mean_s: Option<f64> = None;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < max_batch {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let window = mean_s
            .map(|s| Duration::from_secs_f64(s * WINDOW_FRACTION).clamp(MIN_WINDOW, MAX_WINDOW))
            .unwrap_or(Duration::ZERO);
        let deadline = Instant::now() + window;
        // Members still computing elsewhere may arrive within the window.
        while jobs.len() < max_batch && jobs.len() < shared.members.load(Ordering::SeqCst) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }

        let t0 = Instant::now();
        let results = catch_unwind(AssertUnwindSafe(|| {
            let mut items: Vec<BatchItem<'_>> = jobs
                .iter_mut()
                .map(|j| BatchItem {
                    session: &mut j.session,
                    tokens: &j.tokens,
                    rows: j.rows,
                })
                .collect();
            forward_batch(&mut items)
        }))
        .unwrap_or_else(|_| {
            (0..jobs.len())
                .map(|_| Err(ModelError::Invalid("the batched forward panicked".into())))
                .collect()
        });
        let s = t0.elapsed().as_secs_f64();
        mean_s = Some(mean_s.map_or(s, |m| 0.8 * m + 0.2 * s));
        shared.forwards.fetch_add(1, Ordering::Relaxed);
        shared
            .sequences
            .fetch_add(jobs.len() as u64, Ordering::Relaxed);
        for (job, result) in jobs.into_iter().zip(results) {
            // A requester that went away (its thread ended) simply drops its session.
            let _ = job.reply.send((job.session, result));
        }
    }
}
