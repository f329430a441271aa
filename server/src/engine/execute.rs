//! Running one batch on a replica: assemble the backend's inputs from the
//! requests (and, for stateful models, from each key's state or window),
//! run, split the outputs back along dim 0, store the keys' new state,
//! answer every request, and let each key's next request go.

use super::batcher::BatchPolicy;
use super::config::{ControlKind, InputSource, Warmup};
use super::error::EngineError;
use super::model::ModelCore;
use super::replica::{Answer, Pending, Reply, ReplyTo, Taken};
use super::request::Timing;
use super::state::KeyState;
use crate::backend::{Backend, BatchInput, BatchOutput};
use crate::telemetry::SPAN_TARGET;
use crate::tensor::{join_bytes_elements, scalar_bytes, split_bytes_elements, DataType, Tensor};
use bytes::Bytes;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Batch numbers, unique in the process, for traces and logs.
static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

/// A request of the batch with its key's state, taken out of the store
/// for the duration of the run.
struct Slot {
    p: Pending,
    state: Option<KeyState>,
    /// State bytes when taken, for the held-bytes gauge.
    bytes_before: usize,
    /// The traced request's span of the phase it is in (assembly, compute).
    phase: Option<tracing::Span>,
    timing: Timing,
}

impl Slot {
    /// Ends the current phase span and, for a traced request, starts `next`.
    fn enter_phase(&mut self, next: impl FnOnce(&tracing::Span) -> tracing::Span) {
        self.phase = None;
        self.phase = self.p.trace.as_ref().map(|t| next(&t.request));
    }
}

/// Runs `taken` as one batch, which the caller took at `start`. The
/// answers go into `answered`, for the caller to send once it has let go
/// of the backend: a client's next request must find the replica free to
/// run inline. Also returns when the answers were ready: the caller's
/// clock for what follows (each clock read is tens of nanoseconds, and a
/// small model's request made fourteen of them).
pub fn execute(
    replica: usize,
    core: &Arc<ModelCore>,
    backend: &mut dyn Backend,
    policy: &mut dyn BatchPolicy,
    taken: Taken,
    start: Instant,
    answered: &mut Vec<(ReplyTo, Reply)>,
) -> (Executed, Instant) {
    let cfg = &core.config;
    let n = taken.requests.len();
    let batch_id = NEXT_BATCH.fetch_add(1, Relaxed);
    let mut requests = taken.requests;
    for p in &mut requests {
        let waited = start.saturating_duration_since(p.enqueued);
        core.metrics.queue_duration.record(waited.as_secs_f64());
        core.stats.queue.add(waited);
        p.hold.leave_queue();
    }
    core.replica_metrics[replica].requests.increment(n as u64);

    // Bring each key's state here; a key whose state lives on another
    // replica moves (a migration, only under non-affinity routing).
    let stateful = cfg.is_stateful();
    let store = core.keys.store(replica);
    let counters = &core.keys.counters;
    let mut slots: Vec<Slot> = Vec::with_capacity(n);
    for (mut p, owner) in requests.into_iter().zip(taken.owners) {
        if let Some(t) = p.trace.as_mut() {
            t.queue = None;
            t.request.record("batch.id", batch_id);
            t.request.record("model.version", core.version);
            t.request.record("replica", replica);
        }
        let timing = Timing {
            queue: start.saturating_duration_since(p.enqueued),
            batch_id,
            key_hash: p.key_hash,
            ..Timing::default()
        };
        let state = match (&p.key, stateful) {
            (Some(key), true) => {
                let found = match owner {
                    Some(o) if o != replica => {
                        counters.migrations.fetch_add(1, Relaxed);
                        core.keys.store(o).take(key)
                    }
                    _ => store.take(key),
                };
                if found.is_some() {
                    counters.hits.fetch_add(1, Relaxed);
                } else {
                    counters.misses.fetch_add(1, Relaxed);
                }
                Some(found.unwrap_or_default())
            }
            _ => None,
        };
        let bytes_before = state.as_ref().map_or(0, KeyState::bytes);
        let mut slot = Slot {
            p,
            state,
            bytes_before,
            phase: None,
            timing,
        };
        slot.enter_phase(|r| tracing::info_span!(target: SPAN_TARGET, parent: r, "assemble", batch.id = batch_id));
        if slot.p.sequence_start {
            if let Some(s) = slot.state.as_mut() {
                *s = KeyState::default();
            }
        }
        slots.push(slot);
    }

    // Windows: append this request's event; under `skip` a window that is
    // not yet full answers at once, without running the model.
    let mut pokes = Vec::new();
    if let Some(w) = &cfg.window {
        let ci = cfg
            .inputs
            .iter()
            .position(|s| s.name == w.input)
            .expect("window input is a client input");
        let mut kept = Vec::with_capacity(slots.len());
        for mut slot in slots {
            let state = slot.state.as_mut().expect("window models are keyed");
            state
                .window
                .push_back(Bytes::copy_from_slice(&slot.p.inputs[ci].data));
            while state.window.len() > w.length {
                state.window.pop_front();
            }
            if w.warmup == Warmup::Skip && state.window.len() < w.length {
                let fill = (state.window.len(), w.length);
                let (poke, state) = store_and_finish(core, replica, &mut slot);
                pokes.extend(poke);
                slot.phase = None;
                answered.push((
                    slot.p.reply.share(),
                    Ok(Answer {
                        outputs: Vec::new(),
                        window_fill: Some(fill),
                        timing: slot.timing,
                        state,
                    }),
                ));
                continue;
            }
            kept.push(slot);
        }
        slots = kept;
    }
    if slots.is_empty() {
        poke_all(core, pokes);
        return (Executed::Ran, Instant::now());
    }

    let total_rows: usize = slots.iter().map(|s| s.p.rows).sum();
    let batched = cfg.max_batch_size > 0;
    let mut backend_panicked = false;
    // Owned bytes the state and window inputs point into during the run.
    let window_rows: Vec<Vec<u8>> = match &cfg.window {
        None => Vec::new(),
        Some(w) => {
            let event = w.event_bytes();
            slots
                .iter()
                .map(|s| {
                    let win = &s.state.as_ref().expect("keyed").window;
                    let mut buf = vec![0u8; event * (w.length - win.len())];
                    for e in win {
                        buf.extend_from_slice(e);
                    }
                    buf
                })
                .collect()
        }
    };
    // Control inputs, one value per row: the request's sequence flags and
    // correlation id (Triton's START / END / READY / CORRID).
    let control_rows: Vec<Vec<u8>> = cfg
        .controls
        .iter()
        .map(|c| {
            let mut buf = Vec::new();
            for s in &slots {
                let flag = |on: bool| c.false_true[on as usize];
                let value = match c.kind {
                    ControlKind::Start => flag(s.p.sequence_start),
                    ControlKind::End => flag(s.p.sequence_end),
                    ControlKind::Ready => flag(true),
                    ControlKind::CorrId => {
                        let key = s.p.key.as_deref().unwrap_or_default();
                        if c.datatype == DataType::Bytes {
                            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
                            buf.extend_from_slice(key.as_bytes());
                            continue;
                        }
                        // Admission checked that a numeric id parses.
                        buf.extend(corrid_bytes(c.datatype, key).unwrap_or_default());
                        continue;
                    }
                };
                buf.extend(scalar_bytes(c.datatype, value).unwrap_or_default());
            }
            buf
        })
        .collect();
    // The backend gathers the batch from the requests' buffers inside its
    // run, so the compute span covers that copy too.
    for s in slots.iter_mut() {
        s.timing.batch_rows = total_rows;
        s.enter_phase(|r| {
            r.record("batch.size", total_rows);
            tracing::info_span!(target: SPAN_TARGET, parent: r, "compute",
                batch.id = batch_id, batch.size = total_rows, replica)
        });
    }
    let result = {
        let inputs: Vec<BatchInput<'_>> = cfg
            .graph_inputs
            .iter()
            .map(|(name, source)| match *source {
                InputSource::Client(i) => {
                    let first = &slots[0].p.inputs[i];
                    // Triton's reshape: the same bytes in the model's shape.
                    let row = cfg.inputs[i].reshape.as_deref().unwrap_or(if batched {
                        &first.shape[1..]
                    } else {
                        &first.shape
                    });
                    let shape = if batched {
                        std::iter::once(total_rows as i64)
                            .chain(row.iter().copied())
                            .collect()
                    } else {
                        row.to_vec()
                    };
                    BatchInput {
                        name,
                        datatype: cfg.inputs[i].datatype,
                        shape,
                        parts: slots.iter().map(|s| &s.p.inputs[i].data[..]).collect(),
                    }
                }
                InputSource::State(j) => {
                    let spec = &cfg.states[j];
                    BatchInput {
                        name,
                        datatype: spec.datatype,
                        shape: std::iter::once(total_rows as i64)
                            .chain(spec.dims.iter().copied())
                            .collect(),
                        parts: slots
                            .iter()
                            .map(|s| {
                                let st = s.state.as_ref().expect("stateful requests are keyed");
                                st.sequence
                                    .get(j)
                                    .map_or(&core.initial_state[j][..], |b| &b[..])
                            })
                            .collect(),
                    }
                }
                InputSource::Control(j) => BatchInput {
                    name,
                    datatype: cfg.controls[j].datatype,
                    shape: vec![total_rows as i64, 1],
                    parts: vec![&control_rows[j][..]],
                },
                InputSource::Window(_) => {
                    let w = cfg.window.as_ref().expect("window source has a window");
                    BatchInput {
                        name,
                        datatype: w.datatype,
                        shape: [total_rows as i64, w.length as i64]
                            .into_iter()
                            .chain(w.event_dims.iter().copied())
                            .collect(),
                        parts: window_rows.iter().map(|b| &b[..]).collect(),
                    }
                }
            })
            .collect();
        let t0 = Instant::now();
        // A backend that panics (tch's non-`f_` calls do, e.g. on GPU memory
        // exhaustion) fails this batch with INTERNAL; the replica reloads it.
        let r =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.run(&inputs))) {
                Ok(r) => r,
                Err(payload) => {
                    backend_panicked = true;
                    Err(crate::backend::BackendError::Runtime(format!(
                        "the backend panicked: {}",
                        panic_message(&payload)
                    )))
                }
            };
        let t_out = Instant::now();
        (r, t_out.saturating_duration_since(t0), t_out)
    };
    let (result, infer_time, t_out) = result;
    for s in slots.iter_mut() {
        s.phase = None;
        s.timing.compute = infer_time;
    }
    core.metrics
        .compute_duration
        .record(infer_time.as_secs_f64());
    core.metrics.batch_size.record(total_rows as f64);
    core.metrics.execution_count.increment(1);
    core.metrics.inference_count.increment(total_rows as u64);

    let split = result
        .map_err(|e| EngineError::Internal(e.to_string()))
        .and_then(|outs| split_outputs(&outs, &slots, batched, total_rows).map(|per| (outs, per)));
    // Answers are sent after the statistics are recorded, so a client that
    // reads statistics after its answer sees its own execution counted.
    let mut answers: Vec<(Slot, Result<Answer, EngineError>)> = Vec::with_capacity(slots.len());
    match split {
        Ok((outs, per_output)) => {
            // Output-major to request-major.
            let mut columns: Vec<std::vec::IntoIter<Tensor>> =
                per_output.into_iter().map(|v| v.into_iter()).collect();
            let client_index: Vec<Option<usize>> = cfg
                .outputs
                .iter()
                .map(|o| outs.iter().position(|b| b.name == o.name))
                .collect();
            let has_reshaped_output = cfg.outputs.iter().any(|o| o.reshape.is_some());
            let state_index: Vec<Option<usize>> = cfg
                .states
                .iter()
                .map(|s| outs.iter().position(|b| b.name == s.output))
                .collect();
            for mut slot in slots {
                let mine: Vec<Tensor> = columns
                    .iter_mut()
                    .map(|c| c.next().expect("one per request"))
                    .collect();
                if let Some(st) = slot.state.as_mut() {
                    st.sequence.resize(cfg.states.len(), Bytes::new());
                    for (j, idx) in state_index.iter().enumerate() {
                        if let Some(i) = idx {
                            // A copy: a slice would pin the whole batch buffer.
                            st.sequence[j] = Bytes::copy_from_slice(&mine[*i].data);
                        }
                    }
                }
                let mut outputs: Vec<Tensor> = match &slot.p.outputs {
                    None => client_index
                        .iter()
                        .flatten()
                        .map(|&i| mine[i].clone())
                        .collect(),
                    Some(sel) => sel
                        .iter()
                        .filter_map(|&c| client_index[c])
                        .map(|i| mine[i].clone())
                        .collect(),
                };
                if has_reshaped_output {
                    for t in outputs.iter_mut() {
                        let spec = cfg.outputs.iter().find(|o| o.name == t.name);
                        if spec.is_some_and(|o| o.reshape.is_some()) {
                            let dims = &spec.expect("checked above").dims;
                            t.shape = if batched {
                                std::iter::once(t.shape[0])
                                    .chain(dims.iter().copied())
                                    .collect()
                            } else {
                                dims.clone()
                            };
                        }
                    }
                }
                let timing = slot.timing;
                answers.push((
                    slot,
                    Ok(Answer {
                        outputs,
                        window_fill: None,
                        timing,
                        state: None,
                    }),
                ));
            }
        }
        Err(e) => answers.extend(slots.into_iter().map(|s| (s, Err(e.clone())))),
    }
    let done = Instant::now();
    core.stats.record_execution(
        total_rows,
        t_out
            .saturating_duration_since(start)
            .saturating_sub(infer_time),
        infer_time,
        done.saturating_duration_since(t_out),
    );
    let objective = cfg.adaptive.map(|a| a.objective);
    for (mut slot, mut answer) in answers {
        if answer.is_ok() {
            let latency = done.saturating_duration_since(slot.p.enqueued);
            policy.observe_latency(latency);
            if objective.is_some_and(|o| latency > o) {
                core.metrics.objective_missed.increment(1);
            }
        }
        let (poke, state) = store_and_finish(core, replica, &mut slot);
        pokes.extend(poke);
        if let Ok(a) = answer.as_mut() {
            a.state = state;
        }
        answered.push((slot.p.reply.share(), answer));
    }
    poke_all(core, pokes);
    core.replica_metrics[replica]
        .live_keys
        .set(core.keys.store(replica).live_keys.load(Relaxed) as f64);
    let executed = if backend_panicked {
        Executed::BackendPanicked
    } else {
        Executed::Ran
    };
    (executed, done)
}

/// How a batch's execution went, for the replica loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executed {
    /// Answered (successes or errors).
    Ran,
    /// The backend panicked: the batch failed with INTERNAL, and the
    /// backend must be reloaded before it runs again.
    BackendPanicked,
}

/// Puts a key's state back on this replica (or frees it at the end of its
/// sequence) and lets the key's next request go. Returns the replica to
/// wake when that request waits elsewhere, and, when the request asked for
/// it, a copy of the key's state as this request left it (empty after
/// `sequence_end`): taken here, before the key's next request can change
/// it, so a snapshot always matches the request it follows.
fn store_and_finish(
    core: &ModelCore,
    replica: usize,
    slot: &mut Slot,
) -> (Option<usize>, Option<KeyState>) {
    let Some(key) = slot.p.key.clone() else {
        return (None, None);
    };
    let mut copy = None;
    let holds = match slot.state.take() {
        None => None,
        Some(state) if slot.p.sequence_end => {
            drop(state);
            core.keys.account(slot.bytes_before, 0);
            if slot.p.return_state {
                copy = Some(KeyState::default());
            }
            Some(false)
        }
        Some(state) => {
            core.keys.account(slot.bytes_before, state.bytes());
            if slot.p.return_state {
                // Rows are `Bytes`: the copy shares them.
                copy = Some(state.clone());
            }
            core.keys.store(replica).put(key, state);
            Some(true)
        }
    };
    (slot.p.hold.finish_key(holds), copy)
}

fn poke_all(core: &ModelCore, pokes: Vec<usize>) {
    for r in pokes {
        core.poke(r);
    }
}

/// Splits every backend output along dim 0 into each request's rows
/// (output-major). Fixed-size outputs are zero-copy slices of the batch
/// buffer.
fn split_outputs(
    outs: &[BatchOutput],
    slots: &[Slot],
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
        per_output.push(split_rows(o, slots.iter().map(|s| s.p.rows), total_rows)?);
    }
    Ok(per_output)
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

/// A numeric correlation id as one little-endian value of `dt`; `None`
/// when the key is not such a number.
pub fn corrid_bytes(dt: DataType, key: &str) -> Option<Vec<u8>> {
    Some(match dt {
        DataType::Uint64 => key.parse::<u64>().ok()?.to_le_bytes().to_vec(),
        DataType::Int64 => key.parse::<i64>().ok()?.to_le_bytes().to_vec(),
        DataType::Uint32 => key.parse::<u32>().ok()?.to_le_bytes().to_vec(),
        DataType::Int32 => key.parse::<i32>().ok()?.to_le_bytes().to_vec(),
        _ => return None,
    })
}

/// The text of a panic's payload (a `&str` or `String`, as `panic!` makes).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".to_string())
}
