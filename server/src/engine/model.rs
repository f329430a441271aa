//! A loaded model version: its resolved config, its replicas, admission
//! control, request validation and routing.

use super::adaptive::{AdaptiveBatching, ControllerStatus};
use super::batcher::{BatchPolicy, NoBatching, StaticBatching};
use super::config::{IoSpec, ModelConfig, ModelConfigFile, Routing};
use super::error::EngineError;
use super::hold::Hold;
use super::keys::{key_hash, rendezvous, KeyExtractor};
use super::metrics::{ControllerMetrics, ModelMetrics, ReplicaMetrics, StateMetrics};
use super::pressure::CpuPressure;
use super::replica::{Pending, Replica, Reply, ReplyTo, RequestTrace, Shared, StartingReplica};
use super::state::{KeyState, KeyTable};
use super::stats::ModelStats;
use super::InferRequest;
use crate::backend::BackendFactory;
use crate::tensor::{count_bytes_elements, element_count, scalar_bytes, DataType, Tensor};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the replicas of one version share.
pub struct ModelCore {
    pub config: ModelConfig,
    pub version: u64,
    pub metrics: ModelMetrics,
    pub replica_metrics: Vec<ReplicaMetrics>,
    pub state_metrics: StateMetrics,
    pub stats: ModelStats,
    /// Per-key order, state location and bounds.
    pub keys: KeyTable,
    pub extractor: KeyExtractor,
    /// One row of each sequence state's initial value.
    pub initial_state: Vec<Bytes>,
    /// Every replica's wake-up, to hand a key's turn to another replica.
    wakers: Vec<Arc<Shared>>,
    /// Requests admitted and not yet taken into a batch (each one's
    /// [`Hold`] gives its slot back).
    pub(super) queued: AtomicUsize,
    /// The same per priority level (index `level - 1`), when the model
    /// has levels: each level's queue policy bounds its own.
    pub(super) level_queued: Vec<AtomicUsize>,
    /// Round-robin position, and the counter random routing hashes.
    spread: AtomicU64,
}

impl std::fmt::Debug for ModelCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCore")
            .field("model", &self.config.name)
            .field("version", &self.version)
            .finish()
    }
}

impl ModelCore {
    /// Wakes a replica to rescan its queue.
    pub fn poke(&self, replica: usize) {
        if let Some(w) = self.wakers.get(replica) {
            w.poke();
        }
    }

    /// A replica's shared half (its queue, wake-up and load).
    pub(super) fn shared(&self, replica: usize) -> Option<&Arc<Shared>> {
        self.wakers.get(replica)
    }

    /// What the admitted requests hold now: admission slots (the model's,
    /// then each priority level's), each replica's load, and the keys
    /// with a request in flight. All zero once every request is answered,
    /// whatever happened to them (tests check that nothing leaks).
    pub fn holds(&self) -> Holds {
        Holds {
            queued: self.queued.load(Ordering::Relaxed),
            level_queued: self
                .level_queued
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            loads: self.wakers.iter().map(|s| s.load()).collect(),
            keys_in_flight: self.keys.in_flight(),
        }
    }
}

/// See [`ModelCore::holds`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holds {
    pub queued: usize,
    pub level_queued: Vec<usize>,
    pub loads: Vec<usize>,
    pub keys_in_flight: usize,
}

impl Holds {
    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
            && self.keys_in_flight == 0
            && self.level_queued.iter().all(|&n| n == 0)
            && self.loads.iter().all(|&n| n == 0)
    }
}

/// What [`ModelVersion::restore_state`] did with a key's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The key holds it.
    Installed,
    /// The key had been idle for the model's `idle_timeout` or longer: it
    /// is expired, as it would be in a process that had held it all along,
    /// and its next request starts afresh.
    Expired,
}

/// One loaded version of a model.
pub struct ModelVersion {
    pub core: Arc<ModelCore>,
    pub replicas: Vec<Replica>,
    /// Each replica's adaptive batcher, when the model has an objective.
    pub controllers: Vec<Arc<ControllerStatus>>,
}

impl std::fmt::Debug for ModelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelVersion")
            .field("name", &self.core.config.name)
            .field("version", &self.core.version)
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    #[error("model {model} version {version}: {source}")]
    Backend {
        model: String,
        version: u64,
        source: crate::backend::BackendError,
    },
    #[error("model repository {path}: {reason}")]
    Repository { path: String, reason: String },
}

impl ModelVersion {
    /// Starts every replica (each loads its own backend on its own thread),
    /// resolves the config against the graph, and only then goes live.
    pub fn load(
        name: &str,
        version: u64,
        file: &ModelConfigFile,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<Self, LoadError> {
        let count = file.instance_count.unwrap_or(1).clamp(1, 256);
        let mut starting = Vec::with_capacity(count);
        for id in 0..count {
            match StartingReplica::spawn(name, id, factory.clone()) {
                Ok(r) => starting.push(r),
                Err(source) => {
                    starting.into_iter().for_each(StartingReplica::abort);
                    return Err(LoadError::Backend {
                        model: name.to_string(),
                        version,
                        source,
                    });
                }
            }
        }
        let config = match file.resolve(name, &starting[0].signature) {
            Ok(c) => c,
            Err(e) => {
                starting.into_iter().for_each(StartingReplica::abort);
                return Err(e.into());
            }
        };
        let abort = |starting: Vec<StartingReplica>, reason: String| {
            starting.into_iter().for_each(StartingReplica::abort);
            LoadError::Config(super::config::ConfigError {
                model: name.to_string(),
                reason,
            })
        };
        let extractor = match KeyExtractor::new(config.correlation_key_regex.as_deref()) {
            Ok(x) => x,
            Err(e) => {
                return Err(abort(
                    starting,
                    format!("invalid correlation_key_regex: {e}"),
                ))
            }
        };
        let mut initial_state = Vec::new();
        for st in &config.states {
            let elems = element_count(&st.dims).unwrap_or(0);
            let one = scalar_bytes(st.datatype, st.initial).unwrap_or_default();
            initial_state.push(Bytes::from(one.repeat(elems)));
        }
        let v = version.to_string();
        let core = Arc::new(ModelCore {
            metrics: ModelMetrics::new(name, &v),
            replica_metrics: (0..count)
                .map(|r| ReplicaMetrics::new(name, &v, r))
                .collect(),
            state_metrics: StateMetrics::new(name, &v),
            stats: ModelStats::default(),
            keys: KeyTable::new(config.keyed_limits, count),
            extractor,
            initial_state,
            wakers: starting.iter().map(StartingReplica::shared).collect(),
            queued: AtomicUsize::new(0),
            level_queued: (0..config.priorities.levels)
                .map(|_| AtomicUsize::new(0))
                .collect(),
            spread: AtomicU64::new(0),
            version,
            config,
        });
        let mut controllers = Vec::new();
        let replicas = starting
            .into_iter()
            .map(|r| {
                let cfg = &core.config;
                let policy: Box<dyn BatchPolicy> = match (&cfg.adaptive, &cfg.dynamic_batching) {
                    (Some(a), _) => {
                        let p = AdaptiveBatching::new(
                            format!("{name}/{v}/{}", r.id),
                            cfg.max_batch_size.max(1),
                            a.objective,
                            a.shed_late,
                        )
                        .with_metrics(ControllerMetrics::new(name, &v, r.id))
                        .with_pressure(CpuPressure::system());
                        controllers.push(p.status());
                        Box::new(p)
                    }
                    (None, Some(db)) => Box::new(StaticBatching {
                        max_batch_size: cfg.max_batch_size,
                        config: db.clone(),
                    }),
                    (None, None) => Box::new(NoBatching),
                };
                r.start(core.clone(), policy)
            })
            .collect();
        Ok(Self {
            core,
            replicas,
            controllers,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.core.config
    }

    /// Validates, admits, routes and enqueues a request; the receiver gets
    /// the answer.
    pub fn submit(&self, req: InferRequest) -> Result<oneshot::Receiver<Reply>, EngineError> {
        self.submit_to(req, None)
    }

    /// [`ModelVersion::submit`] to the given replica (warm-up reaches each
    /// one), or routed as usual with `None`.
    pub fn submit_to(
        &self,
        req: InferRequest,
        replica: Option<usize>,
    ) -> Result<oneshot::Receiver<Reply>, EngineError> {
        let target = replica.filter(|&r| r < self.replicas.len());
        let cfg = &self.core.config;
        let (inputs, rows, signature) = self.validate_inputs(req.inputs)?;
        let outputs = self.select_outputs(&req.outputs)?;
        let key = self
            .core
            .extractor
            .extract(req.correlation_key.as_deref(), &req.id);
        if cfg.is_stateful() {
            if key.is_none() {
                return Err(EngineError::invalid(format!(
                    "model {} keeps state per key: give a correlation key (parameter correlation_key, header x-correlation-key, or sequence_id){}",
                    cfg.name,
                    cfg.correlation_key_regex
                        .as_ref()
                        .map_or(String::new(), |re| format!(" matching {re:?}"))
                )));
            }
            if rows != 1 {
                return Err(EngineError::invalid(format!(
                    "model {} keeps state per key: a request carries one row (one step of its key), not {rows}",
                    cfg.name
                )));
            }
            let k = key.as_deref().unwrap_or_default();
            for c in &cfg.controls {
                let numeric = c.kind == super::config::ControlKind::CorrId
                    && c.datatype != crate::tensor::DataType::Bytes;
                if numeric && super::execute::corrid_bytes(c.datatype, k).is_none() {
                    return Err(EngineError::invalid(format!(
                        "model {} takes its sequence id as {} (control input {:?}): {k:?} is not one",
                        cfg.name,
                        c.datatype.as_str(),
                        c.input
                    )));
                }
            }
        }
        let priorities = &cfg.priorities;
        let level = priorities.level(req.priority);
        let policy = priorities.policy(level);
        let queue_timeout = match req.timeout {
            Some(t) if policy.allow_timeout_override && !t.is_zero() => Some(t),
            _ => policy.default_timeout,
        };
        // Admission: a full model (or priority level) answers at once,
        // never blocks or grows. The hold gives the slot back on every path.
        let mut hold = Hold::admit(&self.core, level)?;
        // One routing rule for keyed and keyless requests; the key's hash is
        // computed here, outside the key table's lock.
        let hash = key.as_deref().map(key_hash);
        let pick = || match target {
            Some(r) => r,
            None => self.route(hash),
        };
        match &key {
            None => hold.route(pick(), None),
            Some(k) => match self.core.keys.admit(k, Instant::now(), pick) {
                Ok(t) => hold.route(t.replica, Some((k.clone(), t.number))),
                Err(_) => {
                    return Err(EngineError::Overloaded(format!(
                        "{}: all {} tracked keys have requests in flight",
                        cfg.name, cfg.keyed_limits.max_keys
                    )));
                }
            },
        }
        let replica = hold.replica();
        let (tx, rx) = oneshot::channel();
        let enqueued = Instant::now();
        let pending = Pending {
            level,
            delayed: false,
            queue_deadline: queue_timeout.and_then(|t| enqueued.checked_add(t)),
            key,
            key_hash: hash,
            hold,
            sequence_start: req.sequence_start,
            sequence_end: req.sequence_end,
            return_state: req.return_state,
            inputs,
            rows,
            signature,
            outputs,
            enqueued,
            deadline: req.deadline,
            reply: ReplyTo::new(tx),
            trace: req.span.map(|request| {
                let queue = tracing::info_span!(target: crate::telemetry::SPAN_TARGET, parent: &request, "queue", replica);
                RequestTrace {
                    request,
                    queue: Some(queue),
                }
            }),
        };
        // A stopping replica hands the request back; dropping it gives
        // back what it holds.
        if self.replicas[replica]
            .run_or_enqueue(&self.core, pending)
            .is_err()
        {
            return Err(EngineError::Unavailable(format!(
                "model {} is shutting down",
                cfg.name
            )));
        }
        Ok(rx)
    }

    /// Makes `state` the state of the key a request with correlation key
    /// `key` has (after the model's regex), on the replica that key routes
    /// to: a restore from a snapshot, while the key has nothing in flight.
    /// `idle_for` is how long ago the key's last request was (its snapshot's
    /// age): the key expires as if this process had held it all along, so a
    /// key idle past `idle_timeout` is not installed at all, and one that is
    /// not expires that much sooner. A state that does not fit this model's
    /// state and window is refused.
    pub fn restore_state(
        &self,
        key: &str,
        state: KeyState,
        idle_for: Duration,
    ) -> Result<Restored, EngineError> {
        let cfg = &self.core.config;
        let invalid = |why: String| {
            Err(EngineError::invalid(format!(
                "model {} version {}: a restored state of key {key:?} {why}",
                cfg.name, self.core.version
            )))
        };
        if !cfg.holds_key_state() {
            return invalid("for a model whose keyed state shoal does not hold".into());
        }
        let Some(k) = self.core.extractor.extract(Some(key), "") else {
            return invalid("for a key the model's correlation_key_regex does not match".into());
        };
        if !state.sequence.is_empty() {
            if state.sequence.len() != cfg.states.len() {
                return invalid(format!(
                    "has {} sequence states, the model {}",
                    state.sequence.len(),
                    cfg.states.len()
                ));
            }
            for (j, row) in state.sequence.iter().enumerate() {
                let want = self.core.initial_state[j].len();
                if row.len() != want {
                    return invalid(format!(
                        "has {} bytes of state {}, the model {want}",
                        row.len(),
                        cfg.states[j].input
                    ));
                }
            }
        }
        match &cfg.window {
            None if !state.window.is_empty() => {
                return invalid("has a window, the model none".into());
            }
            None => {}
            Some(w) => {
                let event = w.event_bytes();
                if state.window.len() > w.length || state.window.iter().any(|e| e.len() != event) {
                    return invalid(format!(
                        "has a window that is not up to {} events of {event} bytes",
                        w.length
                    ));
                }
            }
        }
        if cfg.keyed_limits.expired(idle_for) {
            return Ok(Restored::Expired);
        }
        let now = Instant::now();
        let last_used = now.checked_sub(idle_for).unwrap_or(now);
        let hash = key_hash(&k);
        self.core
            .keys
            .restore(&k, state, last_used, || self.route(Some(hash)))
            .map_err(|why| {
                EngineError::Overloaded(format!(
                    "{}: the state of key {key:?} cannot be restored ({why:?})",
                    cfg.name
                ))
            })?;
        Ok(Restored::Installed)
    }

    /// The replica a request with this key hash (or none) goes to. A key
    /// stays with its replica (its state is there); a keyless request
    /// avoids a hung one.
    fn route(&self, hash: Option<u64>) -> usize {
        let n = self.replicas.len();
        let r = match self.core.config.routing {
            Routing::Affinity => match hash {
                Some(h) => return rendezvous(h, 0..n).expect("a model has replicas"),
                None => return self.least_loaded(),
            },
            Routing::RoundRobin => {
                (self.core.spread.fetch_add(1, Ordering::Relaxed) % n as u64) as usize
            }
            Routing::Random => {
                (mix(self.core.spread.fetch_add(1, Ordering::Relaxed)) % n as u64) as usize
            }
        };
        if self.replicas[r].hung() {
            self.least_loaded()
        } else {
            r
        }
    }

    /// The least loaded replica that is not hung (any, if all are).
    fn least_loaded(&self) -> usize {
        self.replicas
            .iter()
            .enumerate()
            .min_by_key(|(_, r)| (r.hung(), r.load()))
            .map(|(i, _)| i)
            .expect("a model has at least one replica")
    }

    /// Requests its replicas ran on the threads that submitted them.
    pub fn inline_runs(&self) -> u64 {
        self.replicas.iter().map(Replica::inline_runs).sum()
    }

    /// Whether no replica is hung (readiness).
    pub fn healthy(&self) -> bool {
        !self.replicas.iter().any(Replica::hung)
    }

    /// The watchdog's pass over the replicas (see [`Replica::watch`]).
    pub fn watch(&self, limit: std::time::Duration, now: Instant) {
        for r in &self.replicas {
            r.watch(&self.core, limit, now);
        }
    }

    fn select_outputs(&self, names: &[String]) -> Result<Option<Vec<usize>>, EngineError> {
        if names.is_empty() {
            return Ok(None);
        }
        let cfg = &self.core.config;
        let mut idx = Vec::with_capacity(names.len());
        for n in names {
            let i = cfg
                .outputs
                .iter()
                .position(|o| &o.name == n)
                .ok_or_else(|| {
                    EngineError::invalid(format!(
                        "unexpected output {n:?} for model {}: it has {:?}",
                        cfg.name,
                        names_of(&cfg.outputs)
                    ))
                })?;
            if idx.contains(&i) {
                return Err(EngineError::invalid(format!(
                    "output {n:?} requested twice"
                )));
            }
            idx.push(i);
        }
        Ok(Some(idx))
    }

    /// Checks names, datatypes, shapes and byte sizes against the model;
    /// returns the inputs in model order, the batch rows and the shape
    /// signature that decides which requests may share a batch.
    fn validate_inputs(
        &self,
        inputs: Vec<Tensor>,
    ) -> Result<(Vec<Tensor>, usize, Vec<i64>), EngineError> {
        let cfg = &self.core.config;
        let mut slots: Vec<Option<Tensor>> = (0..cfg.inputs.len()).map(|_| None).collect();
        for t in inputs {
            let i = cfg
                .inputs
                .iter()
                .position(|s| s.name == t.name)
                .ok_or_else(|| {
                    EngineError::invalid(format!(
                        "unexpected input {:?} for model {}: it takes {:?}",
                        t.name,
                        cfg.name,
                        names_of(&cfg.inputs)
                    ))
                })?;
            if slots[i].is_some() {
                return Err(EngineError::invalid(format!(
                    "input {:?} given twice",
                    t.name
                )));
            }
            slots[i] = Some(t);
        }
        let mut rows: Option<usize> = None;
        let mut signature = Vec::new();
        let mut out = Vec::with_capacity(slots.len());
        for (spec, slot) in cfg.inputs.iter().zip(slots) {
            let t = slot.ok_or_else(|| {
                EngineError::invalid(format!(
                    "missing input {:?} for model {}",
                    spec.name, cfg.name
                ))
            })?;
            let r = check_tensor(spec, &t, cfg.max_batch_size)?;
            if cfg.max_batch_size > 0 {
                match rows {
                    None => rows = Some(r),
                    Some(prev) if prev != r => {
                        return Err(EngineError::invalid(format!(
                            "inputs disagree on the batch size: {prev} and {r} (input {:?})",
                            spec.name
                        )))
                    }
                    _ => {}
                }
                signature.extend_from_slice(&t.shape[1..]);
            } else {
                signature.extend_from_slice(&t.shape);
            }
            signature.push(-1); // separator between inputs
            out.push(t);
        }
        Ok((out, rows.unwrap_or(1), signature))
    }
}

/// A counter through splitmix64 is a cheap, lock-free uniform spread for
/// `random` routing.
fn mix(z: u64) -> u64 {
    super::keys::mix(z.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

fn names_of(specs: &[IoSpec]) -> Vec<&str> {
    specs.iter().map(|s| s.name.as_str()).collect()
}

/// Validates one tensor; returns its rows along the batch dimension.
fn check_tensor(spec: &IoSpec, t: &Tensor, max_batch_size: usize) -> Result<usize, EngineError> {
    if t.datatype != spec.datatype {
        return Err(EngineError::invalid(format!(
            "input {:?}: datatype {} does not match the model's {}",
            t.name, t.datatype, spec.datatype
        )));
    }
    if let Some(d) = t.shape.iter().find(|&&d| d < 0) {
        return Err(EngineError::invalid(format!(
            "input {:?}: shape {:?} has a negative dimension {d}",
            t.name, t.shape
        )));
    }
    let (rows, dims) = if max_batch_size > 0 {
        let Some((&b, rest)) = t.shape.split_first() else {
            return Err(EngineError::invalid(format!(
                "input {:?}: shape {:?} lacks the batch dimension (expected [-1{}])",
                t.name,
                t.shape,
                spec.dims
                    .iter()
                    .map(|d| format!(", {d}"))
                    .collect::<String>()
            )));
        };
        if b == 0 {
            return Err(EngineError::invalid(format!(
                "input {:?}: empty batch (dim 0 is 0)",
                t.name
            )));
        }
        if b as u64 > max_batch_size as u64 {
            return Err(EngineError::invalid(format!(
                "input {:?}: batch size {b} exceeds max_batch_size {max_batch_size}",
                t.name
            )));
        }
        (b as usize, rest)
    } else {
        (1, &t.shape[..])
    };
    let fits = dims.len() == spec.dims.len()
        && dims.iter().zip(&spec.dims).all(|(&d, &s)| s < 0 || d == s);
    if !fits {
        let expected: Vec<i64> = if max_batch_size > 0 {
            std::iter::once(-1)
                .chain(spec.dims.iter().copied())
                .collect()
        } else {
            spec.dims.clone()
        };
        return Err(EngineError::invalid(format!(
            "input {:?}: shape {:?} does not match the model's {:?}",
            t.name, t.shape, expected
        )));
    }
    let elements = element_count(&t.shape).ok_or_else(|| {
        EngineError::invalid(format!("input {:?}: shape {:?} overflows", t.name, t.shape))
    })?;
    match t.datatype.size() {
        Some(size) => {
            let want = elements.checked_mul(size).ok_or_else(|| {
                EngineError::invalid(format!("input {:?}: shape {:?} overflows", t.name, t.shape))
            })?;
            if t.data.len() != want {
                return Err(EngineError::invalid(format!(
                    "input {:?}: {} bytes of data, but shape {:?} of {} needs {want}",
                    t.name,
                    t.data.len(),
                    t.shape,
                    t.datatype
                )));
            }
        }
        None => {
            debug_assert_eq!(t.datatype, DataType::Bytes);
            match count_bytes_elements(&t.data) {
                Some(n) if n == elements => {}
                Some(n) => {
                    return Err(EngineError::invalid(format!(
                        "input {:?}: {n} BYTES elements, but shape {:?} needs {elements}",
                        t.name, t.shape
                    )))
                }
                None => {
                    return Err(EngineError::invalid(format!(
                        "input {:?}: malformed BYTES data (a length prefix runs past the end)",
                        t.name
                    )))
                }
            }
        }
    }
    Ok(rows)
}
