//! A worker replica: one OS thread that owns a backend session, a FIFO
//! queue, and the batching loop. Inference never runs on tokio threads.

use super::batcher::{BatchPolicy, Decision, QueueView};
use super::error::EngineError;
use super::model::ModelCore;
use crate::backend::{Backend, BackendError, BackendFactory, BatchInput, BatchOutput, Signature};
use crate::tensor::{join_bytes_elements, split_bytes_elements, DataType, Tensor};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub type Reply = Result<Vec<Tensor>, EngineError>;

/// A validated request waiting in a replica queue.
pub struct Pending {
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
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Pending>,
    /// Rows of all queued requests.
    rows: usize,
    stopping: bool,
    sleep: Sleep,
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

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Requests queued or executing here: the router's load signal.
    load: AtomicUsize,
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
    shared: Arc<Shared>,
    go: mpsc::Sender<Go>,
    thread: JoinHandle<()>,
}

impl StartingReplica {
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
                if ready_tx.send(Ok((sig, ep))).is_err() {
                    return;
                }
                if let Ok(Some((core, policy))) = go_rx.recv() {
                    Worker {
                        core,
                        shared: thread_shared,
                        backend,
                        policy,
                    }
                    .run();
                }
            })
            .map_err(|e| BackendError::Runtime(format!("cannot spawn replica thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok((signature, execution_provider))) => Ok(Self {
                id,
                signature,
                execution_provider,
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

    pub fn enqueue(&self, p: Pending) -> Result<(), Pending> {
        let mut q = self.shared.queue.lock();
        if q.stopping {
            return Err(p);
        }
        self.shared.load.fetch_add(1, Ordering::Relaxed);
        q.rows += p.rows;
        q.items.push_back(p);
        let wake = match q.sleep {
            Sleep::Busy => false,
            Sleep::Idle => true,
            Sleep::Until { wake_rows } => q.rows >= wake_rows,
        };
        drop(q);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Stops taking requests, lets the queue drain, joins the thread.
    pub fn stop(&self) {
        let mut q = self.shared.queue.lock();
        q.stopping = true;
        drop(q);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    core: Arc<ModelCore>,
    shared: Arc<Shared>,
    backend: Box<dyn Backend>,
    policy: Box<dyn BatchPolicy>,
}

impl Worker {
    fn run(mut self) {
        let mut rows = Vec::new();
        let mut picked = Vec::new();
        while let Some(batch) = self.next_batch(&mut rows, &mut picked) {
            self.execute(batch);
        }
    }

    /// Blocks until the policy releases a batch; `None` once stopped and drained.
    fn next_batch(
        &mut self,
        rows: &mut Vec<usize>,
        picked: &mut Vec<usize>,
    ) -> Option<Vec<Pending>> {
        let mut q = self.shared.queue.lock();
        loop {
            let now = Instant::now();
            self.purge(&mut q, now);
            if q.items.is_empty() {
                if q.stopping {
                    return None;
                }
                q.sleep = Sleep::Idle;
                self.shared.wake.wait(&mut q);
                q.sleep = Sleep::Busy;
                continue;
            }
            rows.clear();
            picked.clear();
            let head_sig = &q.items[0].signature;
            for (i, p) in q.items.iter().enumerate() {
                if p.signature == *head_sig {
                    rows.push(p.rows);
                    picked.push(i);
                }
            }
            let view = QueueView {
                rows,
                oldest_wait: now.saturating_duration_since(q.items[0].enqueued),
                more_incompatible: picked.len() < q.items.len(),
            };
            let n = match self.policy.decide(view) {
                Decision::Dispatch(n) => n.clamp(1, picked.len()),
                // Shutting down: nothing more will arrive, do not wait.
                Decision::Wait(_) if q.stopping => picked.len(),
                Decision::Wait(d) => {
                    let wake_at = self.earliest_deadline(&q.items).map_or(d, |dl| {
                        d.min(dl.saturating_duration_since(now) + Duration::from_micros(1))
                    });
                    q.sleep = Sleep::Until {
                        wake_rows: self.policy.wake_rows().unwrap_or(0),
                    };
                    self.shared.wake.wait_for(&mut q, wake_at);
                    q.sleep = Sleep::Busy;
                    continue;
                }
            };
            let mut batch = Vec::with_capacity(n);
            // Remove back to front so earlier indexes stay valid.
            for &i in picked[..n].iter().rev() {
                let p = q.items.remove(i).expect("index from this scan");
                q.rows -= p.rows;
                batch.push(p);
            }
            batch.reverse();
            return Some(batch);
        }
    }

    fn earliest_deadline(&self, items: &VecDeque<Pending>) -> Option<Instant> {
        items.iter().filter_map(|p| p.deadline).min()
    }

    /// Drops requests that can no longer be answered usefully, before they
    /// cost compute: expired deadlines and clients that have gone away.
    fn purge(&self, q: &mut Queue, now: Instant) {
        let core = &self.core;
        let items = &mut q.items;
        let mut gone = 0;
        let mut i = 0;
        while i < items.len() {
            let p = &items[i];
            let expired = p.deadline.is_some_and(|d| d <= now);
            if !expired && !p.reply.is_closed() {
                i += 1;
                continue;
            }
            let p = items.remove(i).expect("index checked above");
            q.rows -= p.rows;
            if expired {
                // Counted by the caller, which receives this answer.
                let _ = p.reply.send(Err(EngineError::DeadlineExceeded));
            } else {
                // The client left; nobody else will count it.
                core.metrics.failure("cancelled");
                core.stats
                    .fail
                    .add(now.saturating_duration_since(p.enqueued));
            }
            gone += 1;
        }
        if gone > 0 {
            self.shared.load.fetch_sub(gone, Ordering::Relaxed);
            core.release(gone);
        }
    }

    fn execute(&mut self, batch: Vec<Pending>) {
        let core = self.core.clone();
        let start = Instant::now();
        for p in &batch {
            let waited = start.saturating_duration_since(p.enqueued);
            core.metrics.queue_duration.record(waited.as_secs_f64());
            core.stats.queue.add(waited);
        }
        core.release(batch.len());
        let total_rows: usize = batch.iter().map(|p| p.rows).sum();
        let batched = core.config.max_batch_size > 0;

        let result = {
            let inputs: Vec<BatchInput<'_>> = core
                .config
                .inputs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let first = &batch[0].inputs[i];
                    let shape = if batched {
                        let mut s = Vec::with_capacity(first.shape.len());
                        s.push(total_rows as i64);
                        s.extend_from_slice(&first.shape[1..]);
                        s
                    } else {
                        first.shape.clone()
                    };
                    BatchInput {
                        name: &spec.name,
                        datatype: spec.datatype,
                        shape,
                        parts: batch.iter().map(|p| &p.inputs[i].data[..]).collect(),
                    }
                })
                .collect();
            let t0 = Instant::now();
            let r = self.backend.run(&inputs);
            (r, t0.elapsed())
        };
        let (result, infer_time) = result;
        self.policy.observe(total_rows, infer_time);
        core.metrics
            .compute_duration
            .record(infer_time.as_secs_f64());
        core.metrics.batch_size.record(total_rows as f64);
        core.metrics.execution_count.increment(1);
        core.metrics.inference_count.increment(total_rows as u64);

        let t_out = Instant::now();
        let replies = result
            .map_err(|e| EngineError::Internal(e.to_string()))
            .and_then(|outs| split_outputs(&outs, &batch, batched, total_rows));
        let n = batch.len();
        match replies {
            Ok(per_request) => {
                for (p, outs) in batch.into_iter().zip(per_request) {
                    let _ = p.reply.send(Ok(outs));
                }
            }
            Err(e) => {
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
        core.stats.record_execution(
            total_rows,
            t_out
                .saturating_duration_since(start)
                .saturating_sub(infer_time),
            infer_time,
            t_out.elapsed(),
        );
        self.shared.load.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Splits batch outputs back along dim 0 into each request's rows and
/// selects the outputs each request asked for. Fixed-size outputs are
/// zero-copy slices of the batch buffer.
fn split_outputs(
    outs: &[BatchOutput],
    batch: &[Pending],
    batched: bool,
    total_rows: usize,
) -> Result<Vec<Vec<Tensor>>, EngineError> {
    let mut per_output: Vec<Vec<Tensor>> = Vec::with_capacity(outs.len());
    for o in outs {
        if !batched {
            per_output.push(vec![Tensor {
                name: o.name.clone(),
                datatype: o.datatype,
                shape: o.shape.clone(),
                data: o.data.clone(),
            }]);
            continue;
        }
        if o.shape.first().copied() != Some(total_rows as i64) {
            return Err(EngineError::Internal(format!(
                "output {} has shape {:?}; expected {total_rows} rows along dim 0",
                o.name, o.shape
            )));
        }
        let parts = split_rows(o, batch.iter().map(|p| p.rows), total_rows)?;
        per_output.push(parts);
    }
    let mut result: Vec<Vec<Tensor>> = (0..batch.len()).map(|_| Vec::new()).collect();
    // Transpose output-major to request-major, honouring each selection.
    let mut columns: Vec<std::vec::IntoIter<Tensor>> =
        per_output.into_iter().map(|v| v.into_iter()).collect();
    for (r, p) in batch.iter().enumerate() {
        let mine: Vec<Tensor> = columns
            .iter_mut()
            .map(|c| c.next().expect("one per request"))
            .collect();
        result[r] = match &p.outputs {
            None => mine,
            Some(sel) => sel.iter().map(|&i| mine[i].clone()).collect(),
        };
    }
    Ok(result)
}

fn split_rows(
    o: &BatchOutput,
    rows: impl Iterator<Item = usize>,
    total_rows: usize,
) -> Result<Vec<Tensor>, EngineError> {
    let mut out = Vec::new();
    let tensor = |shape0: usize, data: Bytes| {
        let mut shape = o.shape.clone();
        shape[0] = shape0 as i64;
        Tensor {
            name: o.name.clone(),
            datatype: o.datatype,
            shape,
            data,
        }
    };
    if o.datatype == DataType::Bytes {
        let elems = split_bytes_elements(&o.data).ok_or_else(|| {
            EngineError::Internal(format!("output {} is malformed BYTES", o.name))
        })?;
        let per_row = elems.len().checked_div(total_rows).unwrap_or(0);
        let mut at = 0;
        for r in rows {
            let chunk = &elems[at..at + r * per_row];
            at += r * per_row;
            out.push(tensor(
                r,
                Bytes::from(join_bytes_elements(chunk.iter().map(|b| &b[..]))),
            ));
        }
        return Ok(out);
    }
    let row_bytes = o.data.len() / total_rows.max(1);
    if row_bytes * total_rows != o.data.len() {
        return Err(EngineError::Internal(format!(
            "output {} does not split into {total_rows} rows",
            o.name
        )));
    }
    let mut at = 0;
    for r in rows {
        out.push(tensor(r, o.data.slice(at..at + r * row_bytes)));
        at += r * row_bytes;
    }
    Ok(out)
}
