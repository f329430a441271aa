//! A worker replica: one OS thread that owns a backend session, a FIFO
//! queue, and the batching loop. A lone request that finds its replica idle
//! may run on the thread that received it ([`Replica::run_or_enqueue`]),
//! which then also runs what queued meanwhile, as the replica thread would
//! have: only when the batches and the answers are the same as on the
//! replica thread, and only for a backend whose measured executions are
//! cheap, so a network thread is never held longer than the model's
//! `inline_execution_max_us`.

use super::batcher::{BatchPolicy, Decision, QueueView};
use super::config::TimeoutAction;
use super::error::EngineError;
use super::execute::Executed;
use super::hold::Hold;
use super::keys::Key;
use super::model::ModelCore;
use crate::backend::{Backend, BackendError, BackendFactory, Signature};
use crate::tensor::Tensor;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A request's successful answer from its replica.
#[derive(Debug, Default)]
pub struct Answer {
    pub outputs: Vec<Tensor>,
    /// Events in the key's window and its length, when a skip-warmup
    /// window was not full and the model did not run.
    pub window_fill: Option<(usize, usize)>,
    pub timing: super::request::Timing,
    /// The key's state after this request, when it asked for it
    /// ([`super::InferRequest::return_state`]).
    pub state: Option<super::state::KeyState>,
}

/// A traced request's spans while it is on a replica.
pub struct RequestTrace {
    pub request: tracing::Span,
    /// Open from admission until its batch starts.
    pub queue: Option<tracing::Span>,
}

pub type Reply = Result<Answer, EngineError>;

/// Where a request's answer goes: taken once, by the replica that ran it
/// or, if its batch hangs, by the watchdog that gave up on it.
pub struct ReplyTo(Arc<Mutex<Option<oneshot::Sender<Reply>>>>);

impl ReplyTo {
    pub fn new(tx: oneshot::Sender<Reply>) -> Self {
        Self(Arc::new(Mutex::new(Some(tx))))
    }

    /// Answers, unless answered already; false if nobody received it.
    pub fn send(&self, r: Reply) -> bool {
        match self.0.lock().take() {
            Some(tx) => tx.send(r).is_ok(),
            None => false,
        }
    }

    /// Whether nobody waits for the answer any more.
    pub fn is_closed(&self) -> bool {
        self.0.lock().as_ref().is_none_or(|tx| tx.is_closed())
    }

    pub(super) fn share(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The batch a replica is executing, for the watchdog.
struct Running {
    since: Instant,
    replies: Vec<ReplyTo>,
    /// The watchdog gave up on it.
    fired: bool,
}

/// A validated request waiting in a replica queue.
pub struct Pending {
    /// The correlation key.
    pub key: Option<Key>,
    /// The key's hash, computed once at admission (routing, logs).
    pub key_hash: Option<u64>,
    /// Its admission slot, its place in the replica's load and its key's
    /// ticket, each given back once (on drop at the latest).
    pub hold: Hold,
    /// Priority level (1 the highest; 1 for a model without levels).
    pub level: u32,
    /// Its queue timeout expired under a DELAY policy: it runs after every
    /// request that has not timed out.
    pub delayed: bool,
    /// When its queue policy's timeout expires, if it has one.
    pub queue_deadline: Option<Instant>,
    pub sequence_start: bool,
    pub sequence_end: bool,
    pub return_state: bool,
    /// Inputs in the model's input order.
    pub inputs: Vec<Tensor>,
    /// Rows along the batch dimension (1 for a model without batching).
    pub rows: usize,
    /// Non-batch dims of every input; only equal signatures share a batch.
    pub signature: Vec<i64>,
    /// Indexes of the outputs wanted, in the order asked; `None`: all.
    pub outputs: Option<Vec<usize>>,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub reply: ReplyTo,
    pub trace: Option<RequestTrace>,
}

impl Pending {
    /// Its deadline passed or its client has gone away: running it would
    /// waste compute.
    fn unanswerable(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|d| d <= now) || self.reply.is_closed()
    }

    /// Dispatch rank: lower runs first.
    fn rank(&self) -> u32 {
        if self.delayed {
            u32::MAX
        } else {
            self.level
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Pending>,
    /// Rows of all queued requests.
    rows: usize,
    /// Queued requests that carry a key (their order needs the key table).
    keyed: usize,
    /// Queued requests with a queue timeout.
    timed: usize,
    /// No queue timeout expires before this (it may be early, never late):
    /// the purge scans the queue for expired ones only once it has passed.
    next_timeout: Option<Instant>,
    /// Rows ever queued here: the policy's arrival rate.
    arrived_rows: u64,
    stopping: bool,
    sleep: Sleep,
    /// A caller is running a request on its own thread: arrivals do not
    /// wake the worker (the backend is taken); the caller wakes it after.
    inline_running: bool,
    /// An inline run panicked: the worker reloads the backend now, on its
    /// own thread, rather than before the next batch.
    reload: bool,
}

impl Queue {
    /// Removes the request at `i`, keeping the counts.
    fn take(&mut self, i: usize) -> Option<Pending> {
        let p = self.items.remove(i)?;
        self.rows -= p.rows;
        self.keyed -= p.key.is_some() as usize;
        self.timed -= p.queue_deadline.is_some() as usize;
        Some(p)
    }
}

/// What the worker is doing, so producers wake it only when it matters:
/// every needless wake-up of a batching replica is a context switch.
#[derive(Default, Clone, Copy)]
enum Sleep {
    /// Executing or scanning; it looks at the queue again by itself.
    #[default]
    Busy,
    /// Waiting for the queue to become non-empty.
    Idle,
    /// Waiting out a batching delay; wake early once this many rows wait.
    Until { wake_rows: usize },
}

/// A replica's backend, used by whichever thread runs a batch: the
/// replica thread, or a caller running a lone request inline.
struct BackendSlot {
    /// `None` once the replica thread has stopped (it drops the backend on
    /// its own thread, where it was made).
    backend: Option<Box<dyn Backend>>,
    /// The last batch panicked: the replica thread loads a fresh backend
    /// before the next one, and nothing runs inline until it has.
    reload: bool,
    /// How long a network thread may be held by inline runs: its own
    /// request's and the batches it drains after it.
    inline_max: Duration,
    /// Set when the replica's requests may run inline at all.
    inline: Option<Inline>,
    /// Smoothed execution time of this replica's batches: the median of
    /// the first [`INLINE_AFTER`], then 1/8 per batch, a batch counting at
    /// most four times the estimate (a run preempted by the scheduler must
    /// not stop inlining; a model that really slows down gets there in a
    /// few runs).
    cost: Duration,
    /// Batches measured; the first ones run on the replica thread.
    measured: u32,
    first: [Duration; INLINE_AFTER as usize],
}

/// Batches measured on a replica before a request may run inline.
const INLINE_AFTER: u32 = 8;

/// What a thread other than the replica's needs to run its batches.
struct Inline {
    /// A copy of the replica's policy ([`BatchPolicy::inline_copy`]): the
    /// batches drained inline are the ones the replica thread would take.
    policy: Box<dyn BatchPolicy>,
    scratch: Scratch,
}

impl BackendSlot {
    fn observe(&mut self, took: Duration) {
        let n = self.measured as usize;
        if n < self.first.len() {
            // The first runs are cold (page faults, lazy initialization).
            self.first[n] = took;
            if n + 1 == self.first.len() {
                let mut sorted = self.first;
                sorted.sort_unstable();
                self.cost = sorted[sorted.len() / 2];
            }
        } else {
            let took = took.min(self.cost.max(Duration::from_micros(1)) * 4);
            self.cost = self.cost - self.cost / 8 + took / 8;
        }
        self.measured = self.measured.saturating_add(1);
    }

    fn inline_allowed(&self) -> bool {
        self.inline.is_some() && self.cheap()
    }

    /// Healthy, measured, and its smoothed execution under the bound.
    fn cheap(&self) -> bool {
        !self.reload
            && self.backend.is_some()
            && self.measured >= INLINE_AFTER
            && self.cost <= self.inline_max
    }
}

/// The part of a replica other threads touch: its queue and its wake-up.
pub struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Requests queued or executing here: the router's load signal
    /// (counted and given back by each request's [`Hold`]).
    pub(super) load: AtomicUsize,
    running: Mutex<Option<Running>>,
    /// Its batch ran past the batch timeout and has not returned.
    hung: AtomicBool,
    backend: Mutex<BackendSlot>,
    /// Requests run inline, on the thread that submitted them.
    inline_runs: AtomicU64,
}

impl Shared {
    pub(super) fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// Wakes the worker to rescan its queue (a key it waits on was freed).
    pub fn poke(&self) {
        let _q = self.queue.lock();
        self.wake.notify_one();
    }
}

/// Handle to a running replica.
pub struct Replica {
    pub id: usize,
    pub execution_provider: String,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What a loaded replica waits for before it serves: its model's shared
/// core and its batching policy, or `None` when the model load is abandoned.
type Go = Option<(Arc<ModelCore>, Box<dyn BatchPolicy>)>;

/// A replica whose backend is loaded, waiting for its model to go live.
pub struct StartingReplica {
    pub id: usize,
    pub signature: Signature,
    pub execution_provider: String,
    /// The backend may run on a caller's thread (see [`Backend::runs_on_any_thread`]).
    any_thread: bool,
    shared: Arc<Shared>,
    go: mpsc::Sender<Go>,
    thread: JoinHandle<()>,
}

impl StartingReplica {
    /// Its wake-up handle, for the model's other replicas.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Starts the replica thread and loads its backend there; returns once
    /// the backend is ready (or failed).
    pub fn spawn(
        model: &str,
        id: usize,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<Self, BackendError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            load: AtomicUsize::new(0),
            running: Mutex::new(None),
            hung: AtomicBool::new(false),
            inline_runs: AtomicU64::new(0),
            backend: Mutex::new(BackendSlot {
                backend: None,
                reload: false,
                inline_max: Duration::ZERO,
                inline: None,
                cost: Duration::ZERO,
                measured: 0,
                first: [Duration::ZERO; INLINE_AFTER as usize],
            }),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<Go>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shoal-{model}-{id}"))
            .spawn(move || {
                let backend = match factory.create() {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let sig = backend.signature().clone();
                let ep = backend.execution_provider().to_string();
                let any_thread = backend.runs_on_any_thread();
                thread_shared.backend.lock().backend = Some(backend);
                if ready_tx.send(Ok((sig, ep, any_thread))).is_err() {
                    return;
                }
                if let Ok(Some((core, policy))) = go_rx.recv() {
                    Worker {
                        id,
                        core,
                        shared: thread_shared.clone(),
                        factory,
                        policy,
                    }
                    .run();
                }
                // Dropped here, on the thread that made it.
                let backend = thread_shared.backend.lock().backend.take();
                drop(backend);
            })
            .map_err(|e| BackendError::Runtime(format!("cannot spawn replica thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok((signature, execution_provider, any_thread))) => Ok(Self {
                id,
                signature,
                execution_provider,
                any_thread,
                shared,
                go: go_tx,
                thread,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(BackendError::Runtime(
                    "replica thread died while loading".into(),
                ))
            }
        }
    }

    /// Lets the replica serve.
    pub fn start(self, core: Arc<ModelCore>, policy: Box<dyn BatchPolicy>) -> Replica {
        if self.any_thread && !core.config.inline_max.is_zero() {
            if let Some(policy) = policy.inline_copy() {
                let mut slot = self.shared.backend.lock();
                slot.inline_max = core.config.inline_max;
                slot.inline = Some(Inline {
                    policy,
                    scratch: Scratch::default(),
                });
            }
        }
        let _ = self.go.send(Some((core, policy)));
        Replica {
            id: self.id,
            execution_provider: self.execution_provider,
            shared: self.shared,
            thread: Mutex::new(Some(self.thread)),
        }
    }

    /// Abandons a replica whose model failed to load.
    pub fn abort(self) {
        let _ = self.go.send(None);
        let _ = self.thread.join();
    }
}

impl Replica {
    pub fn load(&self) -> usize {
        self.shared.load.load(Ordering::Relaxed)
    }

    /// Queues a request; a stopping replica hands it back.
    pub fn enqueue(&self, mut p: Pending) -> Result<(), Box<Pending>> {
        let mut q = self.shared.queue.lock();
        if q.stopping {
            return Err(Box::new(p));
        }
        p.hold.count_load();
        q.rows += p.rows;
        q.arrived_rows += p.rows as u64;
        q.keyed += p.key.is_some() as usize;
        q.timed += p.queue_deadline.is_some() as usize;
        if let Some(d) = p.queue_deadline {
            q.next_timeout = Some(q.next_timeout.map_or(d, |n| n.min(d)));
        }
        // The queue stays ordered by rank, arrival order within a rank, so
        // the front the dispatch scans holds the most urgent requests. The
        // walk from the back is one step when every request has one rank.
        let rank = p.rank();
        let mut at = q.items.len();
        while at > 0 && q.items[at - 1].rank() > rank {
            at -= 1;
        }
        q.items.insert(at, p);
        let wake = match q.sleep {
            Sleep::Busy => false,
            Sleep::Idle => !q.inline_running,
            Sleep::Until { wake_rows } => q.rows >= wake_rows,
        };
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Runs `p` here, on the calling thread, when it is alone: the replica's
    /// queue empty and its backend free, the policy one that would dispatch
    /// it at once and learns nothing, its key's turn (if it has a key), and
    /// the replica's executions cheap (under the model's
    /// `inline_execution_max_us`, smoothed, after a few measured). Then
    /// runs what queued meanwhile (flat combining, see [`combine`]). The
    /// batches, their answers, statistics and metrics are those of the
    /// replica thread; what is saved is the hop there and back (two
    /// wake-ups, which cost more than a small model's compute). Otherwise
    /// queues it as [`Replica::enqueue`] does.
    pub fn run_or_enqueue(&self, core: &Arc<ModelCore>, p: Pending) -> Result<(), Box<Pending>> {
        let Some((slot, owner)) = self.claim(core, &p) else {
            return self.enqueue(p);
        };
        let mut p = p;
        p.hold.count_load();
        let first = Taken {
            requests: vec![p],
            owners: vec![owner],
        };
        combine(self.id, &self.shared, core, slot, first);
        Ok(())
    }

    /// The backend, if `p` may run inline now (see [`Replica::run_or_enqueue`]),
    /// with where its key's state is.
    fn claim(
        &self,
        core: &ModelCore,
        p: &Pending,
    ) -> Option<(parking_lot::MutexGuard<'_, BackendSlot>, Option<usize>)> {
        let mut q = self.shared.queue.lock();
        // An empty queue and a free backend: the worker is asleep or on its
        // way there (it finds nothing to take). It need not be asleep yet:
        // a client's next request often comes before the worker has gone
        // back to its queue after answering the previous one.
        if q.stopping || q.inline_running || !q.items.is_empty() {
            return None;
        }
        if self.hung() {
            return None;
        }
        // Never waits: a held backend means a batch is running.
        let slot = self.shared.backend.try_lock()?;
        if !slot.inline_allowed() {
            return None;
        }
        let mut owner = None;
        if let Some(key) = &p.key {
            let mut check = [(Some(key), p.hold.ticket(), None, false)];
            core.keys.check(&mut check);
            if !check[0].3 {
                return None;
            }
            owner = check[0].2;
        }
        q.inline_running = true;
        Some((slot, owner))
    }

    /// Requests it ran inline so far.
    pub fn inline_runs(&self) -> u64 {
        self.shared.inline_runs.load(Ordering::Relaxed)
    }

    /// Whether its batch has run past the batch timeout and not returned.
    pub fn hung(&self) -> bool {
        self.shared.hung.load(Ordering::Relaxed)
    }

    /// The watchdog's look at this replica: a batch running longer than
    /// `limit` fails its requests with UNAVAILABLE (their clients retry;
    /// the thread cannot be stopped, its late results are dropped) and
    /// marks the replica hung, which takes the model out of readiness and
    /// the router's choice. While hung, what is queued here fails too
    /// rather than wait on it. Returns whether it is hung.
    pub fn watch(&self, core: &ModelCore, limit: Duration, now: Instant) -> bool {
        {
            let mut running = self.shared.running.lock();
            let Some(r) = running.as_mut() else {
                return false;
            };
            let ran = now.saturating_duration_since(r.since);
            if ran < limit {
                return false;
            }
            if !r.fired {
                r.fired = true;
                self.shared.hung.store(true, Ordering::Relaxed);
                let m = &core.replica_metrics[self.id];
                m.hangs.increment(1);
                m.hung.set(1.0);
                let message = format!(
                    "model {} replica {}: its batch has run for {:.1} s, past the batch timeout of {:.1} s (--batch-timeout-secs); the batch failed and the replica is out of service until it returns",
                    core.config.name,
                    self.id,
                    ran.as_secs_f64(),
                    limit.as_secs_f64()
                );
                tracing::error!(model = %core.config.name, replica = self.id, "{message}");
                for reply in &r.replies {
                    reply.send(Err(EngineError::Unavailable(message.clone())));
                }
            }
        }
        let failed = self.fail_queued(|| {
            EngineError::Unavailable(format!(
                "model {} replica {} is hung (a batch ran past --batch-timeout-secs); retry",
                core.config.name, self.id
            ))
        });
        for r in failed {
            core.poke(r);
        }
        true
    }

    /// Fails every queued request with `err`, freeing what each holds.
    /// Returns the replicas to wake (keys freed for them).
    fn fail_queued(&self, err: impl Fn() -> EngineError) -> Vec<usize> {
        let mut q = self.shared.queue.lock();
        let mut pokes = Vec::new();
        while let Some(mut p) = q.take(0) {
            pokes.extend(p.hold.finish_key(None));
            // Counted by the caller, which receives this answer.
            p.reply.send(Err(err()));
        }
        pokes
    }

    /// Stops taking requests, lets the queue drain, joins the thread.
    pub fn stop(&self) {
        let mut q = self.shared.queue.lock();
        q.stopping = true;
        drop(q);
        self.shared.wake.notify_all();
        if self.hung() {
            // Its backend may never return: leave the thread to the
            // process's exit rather than wait on it forever.
            tracing::warn!(replica = self.id, "not waiting for a hung replica to stop");
            return;
        }
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    id: usize,
    core: Arc<ModelCore>,
    shared: Arc<Shared>,
    /// Reloads the backend after it panicked.
    factory: Arc<dyn BackendFactory>,
    policy: Box<dyn BatchPolicy>,
}

/// Buffers one dispatch decision reuses.
#[derive(Default)]
struct Scratch {
    /// Candidates in dispatch order: queue index and state owner.
    picked: Vec<(usize, Option<usize>)>,
    rows: Vec<usize>,
    waits: Vec<Duration>,
    slack: Vec<Option<Duration>>,
}

impl Scratch {
    fn clear(&mut self) {
        self.picked.clear();
        self.rows.clear();
        self.waits.clear();
        self.slack.clear();
    }
}

/// What wakes the worker out of its queue.
enum Next {
    Batch(Taken),
    /// The backend panicked in an inline run: load a fresh one.
    Reload,
}

/// A batch taken from the queue, with where each keyed request's state is.
pub struct Taken {
    pub requests: Vec<Pending>,
    pub owners: Vec<Option<usize>>,
}

/// Sends a batch's answers, each once (the watchdog may have answered a
/// hung batch's already).
fn send_all(answered: &mut Vec<(ReplyTo, Reply)>) {
    for (to, answer) in answered.drain(..) {
        to.send(answer);
    }
}

/// Runs a replica's batches on the calling thread in its worker's place
/// (flat combining): `first`, then what queued meanwhile, each batch the
/// one the worker would take, for as long as the thread has been held less
/// than the model's `inline_execution_max_us`. The caller holds the backend
/// and the queue's inline flag, so arrivals queue without waking the
/// worker, and the requests drained here never cross threads. Then the
/// worker gets the queue back, woken if anything is left in it.
fn combine(
    id: usize,
    shared: &Shared,
    core: &Arc<ModelCore>,
    mut slot: parking_lot::MutexGuard<'_, BackendSlot>,
    first: Taken,
) {
    let mut inline = slot
        .inline
        .take()
        .expect("combining only where inline is set");
    let t0 = Instant::now();
    let mut answered = Vec::new();
    let mut ran = 0;
    let mut next = Some(first);
    // When the next batch is taken: the clock read that decides whether
    // the drain goes on is that batch's start.
    let mut start = t0;
    while let Some(batch) = next {
        ran += batch.requests.len() as u64;
        run_batch(
            id,
            core,
            shared,
            &mut slot,
            inline.policy.as_mut(),
            batch,
            start,
            &mut answered,
        );
        // At once, so a client's next request queues while this thread
        // still holds the backend, and is drained here.
        send_all(&mut answered);
        start = Instant::now();
        next = drain_next(shared, core, &slot, &mut inline, start - t0);
    }
    slot.inline = Some(inline);
    let reload = slot.reload;
    drop(slot);
    core.metrics
        .inline_duration
        .record((start - t0).as_secs_f64());
    shared.inline_runs.fetch_add(ran, Ordering::Relaxed);
    let m = &core.replica_metrics[id];
    m.inline.increment(ran);
    m.queue_depth.set(shared.load() as f64);
    core.state_metrics.sync(&core.keys.counters);
    let mut q = shared.queue.lock();
    q.inline_running = false;
    q.reload |= reload;
    // Arrivals since the last look did not wake the worker.
    let wake = reload || !q.items.is_empty();
    drop(q);
    if wake {
        shared.wake.notify_one();
    }
}

/// The next batch an inline run may take: the one the worker would take
/// now, while the backend stays healthy and cheap and the thread, `held`
/// so far, stays within the bound.
fn drain_next(
    shared: &Shared,
    core: &ModelCore,
    slot: &BackendSlot,
    inline: &mut Inline,
    held: Duration,
) -> Option<Taken> {
    if !slot.cheap() || held + slot.cost > slot.inline_max {
        return None;
    }
    let mut q = shared.queue.lock();
    loop {
        if q.stopping || q.reload || q.items.is_empty() {
            return None;
        }
        match q.scan(core, inline.policy.as_mut(), &mut inline.scratch) {
            Scan::Take(batch) => return Some(batch),
            Scan::Poke(pokes) => {
                if !pokes.is_empty() {
                    parking_lot::MutexGuard::unlocked(&mut q, || {
                        pokes.iter().for_each(|&r| core.poke(r))
                    });
                }
            }
            Scan::Empty | Scan::Blocked | Scan::Wait(_) => return None,
        }
    }
}

/// Executes one batch, taken at `t0`, on the slot's backend, on whichever
/// thread holds the slot: watched by the watchdog while it runs, a panic
/// failing only its requests (the replica thread reloads the backend
/// before the next).
#[allow(clippy::too_many_arguments)]
fn run_batch(
    id: usize,
    core: &Arc<ModelCore>,
    shared: &Shared,
    slot: &mut BackendSlot,
    policy: &mut dyn BatchPolicy,
    batch: Taken,
    t0: Instant,
    answered: &mut Vec<(ReplyTo, Reply)>,
) {
    let Some(backend) = slot.backend.as_mut() else {
        // The replica thread has stopped; dropped requests answer INTERNAL.
        return;
    };
    *shared.running.lock() = Some(Running {
        since: t0,
        replies: batch.requests.iter().map(|p| p.reply.share()).collect(),
        fired: false,
    });
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        super::execute::execute(id, core, backend.as_mut(), policy, batch, t0, answered)
    }));
    let done = match outcome {
        Ok((Executed::Ran, done)) => done,
        Ok((Executed::BackendPanicked, done)) => {
            core.replica_metrics[id].panics.increment(1);
            slot.reload = true;
            done
        }
        Err(payload) => {
            // Its requests were dropped in the unwinding: their clients get
            // INTERNAL, their holds freed their keys.
            tracing::error!(
                model = %core.config.name,
                replica = id,
                panic = %super::execute::panic_message(&payload),
                "a batch's execution panicked; its requests failed"
            );
            core.replica_metrics[id].panics.increment(1);
            slot.reload = true;
            Instant::now()
        }
    };
    let ran = shared.running.lock().take();
    if ran.is_some_and(|r| r.fired) {
        shared.hung.store(false, Ordering::Relaxed);
        core.replica_metrics[id].hung.set(0.0);
        tracing::warn!(
            model = %core.config.name,
            replica = id,
            ran_s = t0.elapsed().as_secs_f64(),
            "the hung batch returned; the replica serves again"
        );
    }
    slot.observe(done.saturating_duration_since(t0));
}

impl Worker {
    fn run(mut self) {
        let mut scratch = Scratch::default();
        let mut answered = Vec::new();
        loop {
            let batch = match self.next_batch(&mut scratch) {
                None => return,
                Some(Next::Batch(b)) => b,
                Some(Next::Reload) => {
                    let mut slot = self.shared.backend.lock();
                    if slot.reload {
                        self.reload_backend(&mut slot);
                    }
                    continue;
                }
            };
            let rows: usize = batch.requests.iter().map(|p| p.rows).sum();
            // Waits only for a caller's inline run to finish.
            let mut slot = self.shared.backend.lock();
            let t0 = Instant::now();
            run_batch(
                self.id,
                &self.core,
                &self.shared,
                &mut slot,
                self.policy.as_mut(),
                batch,
                t0,
                &mut answered,
            );
            let reload = slot.reload;
            drop(slot);
            send_all(&mut answered);
            // After the batch answered, so its clients do not wait on it.
            if reload {
                self.reload_backend(&mut self.shared.backend.lock());
            }
            // The policy learns what a batch costs the replica: the backend
            // run and the assembly, split and answers around it, which for
            // a small model are as large as the run.
            let done = Instant::now();
            self.policy.observe(rows, done - t0, done);
            self.core.replica_metrics[self.id]
                .queue_depth
                .set(self.shared.load() as f64);
            self.core.state_metrics.sync(&self.core.keys.counters);
        }
    }

    /// A new backend from the factory after the old one panicked (its state
    /// cannot be trusted). If that fails the old one stays: the next batch
    /// tells whether it still works.
    fn reload_backend(&self, slot: &mut BackendSlot) {
        let model = &self.core.config.name;
        slot.reload = false;
        match self.factory.create() {
            Ok(b) => {
                slot.backend = Some(b);
                tracing::error!(model = %model, replica = self.id, "the backend panicked; its batch failed with INTERNAL and the backend was reloaded");
            }
            Err(e) => {
                tracing::error!(model = %model, replica = self.id, error = %e, "the backend panicked and could not be reloaded; keeping it")
            }
        }
    }

    /// Blocks until the policy releases a batch (or an inline run asks for
    /// a reload); `None` once stopped and drained.
    fn next_batch(&mut self, sc: &mut Scratch) -> Option<Next> {
        let mut q = self.shared.queue.lock();
        loop {
            if std::mem::take(&mut q.reload) {
                return Some(Next::Reload);
            }
            match q.scan(&self.core, self.policy.as_mut(), sc) {
                Scan::Take(batch) => return Some(Next::Batch(batch)),
                Scan::Poke(pokes) => {
                    if !pokes.is_empty() {
                        // Never hold our queue while taking another replica's.
                        parking_lot::MutexGuard::unlocked(&mut q, || {
                            pokes.iter().for_each(|&r| self.core.poke(r))
                        });
                    }
                }
                Scan::Empty => {
                    if q.stopping {
                        return None;
                    }
                    q.sleep = Sleep::Idle;
                    self.shared.wake.wait(&mut q);
                    q.sleep = Sleep::Busy;
                }
                Scan::Blocked => {
                    // Every request waits on a key busy elsewhere; the
                    // replica that finishes it pokes us.
                    if q.stopping && q.items.iter().all(|p| p.key.is_none()) {
                        return None;
                    }
                    q.sleep = Sleep::Idle;
                    self.shared.wake.wait_for(&mut q, Duration::from_millis(50));
                    q.sleep = Sleep::Busy;
                }
                Scan::Wait(wake_at) => {
                    q.sleep = Sleep::Until {
                        wake_rows: self.policy.wake_rows().unwrap_or(0),
                    };
                    self.shared.wake.wait_for(&mut q, wake_at);
                    q.sleep = Sleep::Busy;
                }
            }
        }
    }
}

/// What one look at a replica's queue found.
enum Scan {
    /// A batch to run now.
    Take(Taken),
    /// Requests were dropped or shed: wake these replicas (keys freed for
    /// them), then look again.
    Poke(Vec<usize>),
    /// Nothing queued.
    Empty,
    /// Every queued request waits on its key, busy elsewhere.
    Blocked,
    /// The policy waits for more requests, at most this long.
    Wait(Duration),
}

/// How many queued requests one dispatch looks at.
fn scan_limit(core: &ModelCore) -> usize {
    (4 * core.config.max_batch_size).max(64)
}

impl Queue {
    /// The replica's dispatch decision, made by whichever thread runs its
    /// next batch: drops what can no longer be answered usefully, then asks
    /// `policy` about the batch headed by the most urgent eligible request.
    fn scan(&mut self, core: &ModelCore, policy: &mut dyn BatchPolicy, sc: &mut Scratch) -> Scan {
        let q = self;
        let now = Instant::now();
        if q.timed == 0 {
            q.next_timeout = None;
        } else if q.next_timeout.is_some_and(|t| t <= now) {
            let mut pokes = Vec::new();
            q.queue_timeouts(core, now, &mut pokes);
            if !pokes.is_empty() {
                return Scan::Poke(pokes);
            }
        }
        if q.items.is_empty() {
            return Scan::Empty;
        }
        sc.clear();
        // A keyed request may run only when it is its key's next ticket
        // (the previous one finished, on whichever replica), and its
        // state's location decides a migration. One table lock per scan.
        // Only the front of the queue is scanned: a batch never needs
        // more, and a deep backlog must not make every dispatch slower.
        let window = q.items.len().min(scan_limit(core));
        let mut checks: Vec<(Option<&Key>, u64, Option<usize>, bool)> = Vec::new();
        if q.keyed > 0 {
            checks.extend(
                q.items
                    .iter()
                    .take(window)
                    .map(|p| (p.key.as_ref(), p.hold.ticket(), None, false)),
            );
            core.keys.check(&mut checks);
        }
        let eligible = |i: usize| checks.get(i).is_none_or(|c| c.3);
        // Earliest deadline first when the policy asks for it: a request
        // without its own deadline is due one objective after it came.
        // Per-key order still holds: only a key's next ticket is eligible.
        let order = policy.deadline_order();
        let due = |p: &Pending| {
            order.map(|o| {
                let by_objective = p.enqueued + o;
                p.deadline.map_or(by_objective, |d| d.min(by_objective))
            })
        };
        let head = match order {
            None => (0..window).find(|&i| eligible(i)),
            Some(_) => (0..window)
                .filter(|&i| eligible(i))
                .min_by_key(|&i| (q.items[i].rank(), due(&q.items[i]), i)),
        };
        let Some(head) = head else {
            return Scan::Blocked;
        };
        let head_sig = &q.items[head].signature;
        let first = if order.is_some() { 0 } else { head };
        // A batch holds at most max_batch_size requests (each has a row
        // or more); one more tells a policy that the batch cannot grow.
        // Looking further would only make every decision slower.
        let enough = core.config.max_batch_size.max(1) + 1;
        for (i, p) in q.items.iter().enumerate().take(window).skip(first) {
            if p.signature == *head_sig && eligible(i) {
                sc.picked.push((i, checks.get(i).and_then(|c| c.2)));
                // In arrival order the first ones are the batch; due order
                // needs every candidate to sort.
                if order.is_none() && sc.picked.len() == enough {
                    break;
                }
            }
        }
        // Past `enough` the batch overflows whatever else waits, so a
        // scan cut short reports incompatible requests as waiting.
        let more_incompatible =
            sc.picked.len() == enough && order.is_none() || sc.picked.len() < q.items.len();
        // Without own deadlines, arrival order already is due order.
        if order.is_some()
            && sc
                .picked
                .iter()
                .any(|&(i, _)| q.items[i].deadline.is_some())
        {
            sc.picked
                .sort_by_key(|&(i, _)| (q.items[i].rank(), due(&q.items[i]), i));
        }
        sc.picked.truncate(enough);
        drop(checks);
        // Requests that can no longer be answered usefully are dropped
        // before they cost compute. Only candidates are looked at (a look
        // takes the reply's lock); one deeper in the queue is dropped when
        // it gets here, its client answered by its deadline timer or gone.
        if sc.picked.iter().any(|&(i, _)| q.items[i].unanswerable(now)) {
            let mut dead: Vec<usize> = sc
                .picked
                .iter()
                .map(|&(i, _)| i)
                .filter(|&i| q.items[i].unanswerable(now))
                .collect();
            return Scan::Poke(q.drop_unanswerable(core, &mut dead, now));
        }
        for &(i, _) in sc.picked.iter() {
            let p = &q.items[i];
            sc.rows.push(p.rows);
            sc.waits.push(now.saturating_duration_since(p.enqueued));
            sc.slack
                .push(p.deadline.map(|d| d.saturating_duration_since(now)));
        }
        let view = QueueView {
            now,
            rows: &sc.rows,
            waits: &sc.waits,
            slack: &sc.slack,
            oldest_wait: sc.waits[0],
            more_incompatible,
            arrived_rows: q.arrived_rows,
        };
        let n = match policy.decide(view) {
            Decision::Dispatch(n) => n.clamp(1, sc.picked.len()),
            // Shutting down: nothing more will arrive, do not wait.
            Decision::Wait(_) if q.stopping => sc.picked.len(),
            Decision::Wait(d) => {
                // A request past its deadline anywhere in the queue would
                // end every wait at once: drop those before waiting.
                let mut dead: Vec<usize> = (0..q.items.len())
                    .filter(|&i| q.items[i].deadline.is_some_and(|dl| dl <= now))
                    .collect();
                if !dead.is_empty() {
                    return Scan::Poke(q.drop_unanswerable(core, &mut dead, now));
                }
                return Scan::Wait(q.earliest_deadline().map_or(d, |dl| {
                    d.min(dl.saturating_duration_since(now) + Duration::from_micros(1))
                }));
            }
            Decision::Shed(which) => {
                let mut idx: Vec<usize> = which
                    .into_iter()
                    .filter_map(|j| sc.picked.get(j).map(|&(i, _)| i))
                    .collect();
                if idx.is_empty() {
                    // A policy naming nothing valid must not spin.
                    idx.push(sc.picked[0].0);
                }
                return Scan::Poke(q.shed(core, &mut idx, order));
            }
        };
        let mut chosen: Vec<(usize, Option<usize>)> = sc.picked[..n].to_vec();
        // Remove back to front so earlier indexes stay valid; the batch
        // itself runs in arrival order.
        chosen.sort_unstable_by_key(|&(i, _)| std::cmp::Reverse(i));
        let mut requests = Vec::with_capacity(n);
        let mut owners = Vec::with_capacity(n);
        for &(i, owner) in &chosen {
            let p = q.take(i).expect("index from this scan");
            requests.push(p);
            owners.push(owner);
        }
        requests.reverse();
        owners.reverse();
        Scan::Take(Taken { requests, owners })
    }

    /// Rejects the queued requests at `idx` that the policy found can no
    /// longer be answered in time. A request whose own deadline comes
    /// before the objective's gets DEADLINE_EXCEEDED, the others a shed
    /// (RESOURCE_EXHAUSTED). Returns the replicas to wake.
    fn shed(
        &mut self,
        core: &ModelCore,
        idx: &mut Vec<usize>,
        objective: Option<Duration>,
    ) -> Vec<usize> {
        let q = self;
        idx.sort_unstable_by(|a, b| b.cmp(a));
        idx.dedup();
        let mut pokes = Vec::new();
        for &i in idx.iter() {
            let Some(mut p) = q.take(i) else { continue };
            pokes.extend(p.hold.finish_key(None));
            let own_deadline_first = match (p.deadline, objective) {
                (Some(d), Some(o)) => d < p.enqueued + o,
                (Some(_), None) => true,
                (None, _) => false,
            };
            core.metrics.objective_shed.increment(1);
            let err = if own_deadline_first {
                EngineError::DeadlineExceeded
            } else {
                EngineError::Shed(format!(
                    "model {}: request shed, it can no longer finish within the latency objective of {:.3} ms",
                    core.config.name,
                    objective.unwrap_or_default().as_secs_f64() * 1e3
                ))
            };
            // Counted by the caller, which receives this answer.
            let _ = p.reply.send(Err(err));
        }
        pokes
    }

    /// Applies the queue policies to requests whose queue timeout expired:
    /// REJECT answers them, DELAY moves them behind every request that has
    /// not timed out. Called once the earliest timeout has passed; scans the
    /// whole queue, not the front window (a timed-out request's client is
    /// waiting for this answer).
    fn queue_timeouts(&mut self, core: &ModelCore, now: Instant, pokes: &mut Vec<usize>) {
        let q = self;
        let mut i = 0;
        let mut unseen = q.items.len();
        let mut next: Option<Instant> = None;
        while i < unseen {
            match q.items[i].queue_deadline {
                Some(d) if d <= now => {}
                d => {
                    if let Some(d) = d {
                        next = Some(next.map_or(d, |n| n.min(d)));
                    }
                    i += 1;
                    continue;
                }
            }
            let mut p = q.take(i).expect("index checked above");
            unseen -= 1;
            let policy = core.config.priorities.policy(p.level);
            match policy.timeout_action {
                TimeoutAction::Delay => {
                    p.delayed = true;
                    p.queue_deadline = None;
                    q.rows += p.rows;
                    q.keyed += p.key.is_some() as usize;
                    q.items.push_back(p);
                }
                TimeoutAction::Reject => {
                    pokes.extend(p.hold.finish_key(None));
                    // Counted by the caller, which receives this answer.
                    let _ = p.reply.send(Err(EngineError::QueueTimeout(format!(
                        "request timeout expired: model {} (priority level {}) did not start it within {} µs",
                        core.config.name,
                        p.level,
                        p.queue_deadline
                            .map_or(0, |d| d.saturating_duration_since(p.enqueued).as_micros())
                    ))));
                }
            }
        }
        q.next_timeout = next;
    }

    /// The earliest request deadline or queue timeout in the queue.
    fn earliest_deadline(&self) -> Option<Instant> {
        let q = self;
        let deadline = q.items.iter().filter_map(|p| p.deadline).min();
        match (deadline, q.next_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the requests at `idx` (each [`Pending::unanswerable`]):
    /// expired deadlines and clients that have gone away. Returns the
    /// replicas to wake because a key they wait on is free.
    fn drop_unanswerable(
        &mut self,
        core: &ModelCore,
        idx: &mut [usize],
        now: Instant,
    ) -> Vec<usize> {
        let q = self;
        let mut pokes = Vec::new();
        // Back to front, so earlier indexes stay valid.
        idx.sort_unstable_by(|a, b| b.cmp(a));
        for &i in idx.iter() {
            let Some(mut p) = q.take(i) else { continue };
            // Its key's next request must not wait for it forever.
            pokes.extend(p.hold.finish_key(None));
            if p.deadline.is_some_and(|d| d <= now) {
                // Counted by the caller, which receives this answer.
                let _ = p.reply.send(Err(EngineError::DeadlineExceeded));
            } else {
                // The client left; nobody else will count it.
                core.metrics.failure("cancelled");
                core.stats
                    .fail
                    .add(now.saturating_duration_since(p.enqueued));
            }
        }
        pokes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> BackendSlot {
        BackendSlot {
            backend: None,
            reload: false,
            inline_max: Duration::from_micros(100),
            inline: None,
            cost: Duration::ZERO,
            measured: 0,
            first: [Duration::ZERO; INLINE_AFTER as usize],
        }
    }

    #[test]
    fn the_cost_ignores_a_cold_start_and_a_preempted_run_but_follows_a_slowdown() {
        let us = Duration::from_micros;
        let mut s = slot();
        // A cold first run of 5 ms, then the model's 10 µs.
        s.observe(us(5000));
        for _ in 1..INLINE_AFTER {
            s.observe(us(10));
        }
        assert_eq!(s.cost, us(10));
        // One run preempted for 20 ms moves the estimate by 1/8 of 40 µs.
        s.observe(us(20_000));
        assert!(s.cost < us(20), "{:?}", s.cost);
        for _ in 0..20 {
            s.observe(us(10));
        }
        // A model that now takes 1 ms per run passes the bound within ten.
        let mut runs = 0;
        while s.cost <= s.inline_max {
            s.observe(us(1000));
            runs += 1;
        }
        assert!(runs <= 10, "{runs}");
    }
}
