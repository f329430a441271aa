//! The inference engine: model repository, replicas, batching. Knows no
//! protocol, so the load generator embeds it in-process and the API layer
//! only decodes, calls [`Engine::infer`], and encodes.

pub mod adaptive;
pub mod batcher;
pub mod config;
pub mod control;
pub mod error;
pub mod execute;
pub mod hold;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod pbtxt;
pub mod pressure;
pub mod replica;
pub mod repository;
pub mod request;
pub mod smoothed_rate;
pub mod state;
pub mod stats;
pub mod warmup;

pub use config::{ModelConfig, ModelConfigFile};
pub use error::{EngineError, ErrorKind};
pub use model::{LoadError, ModelVersion, Restored};
pub use request::{InferRequest, InferResponse, Param};

use crate::backend::BackendFactory;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// All loaded versions of one model, newest last.
#[derive(Debug, Default)]
pub struct Model {
    pub versions: BTreeMap<u64, Arc<ModelVersion>>,
}

impl Model {
    pub fn latest(&self) -> Option<&Arc<ModelVersion>> {
        self.versions.values().next_back()
    }
}

type ModelTable = BTreeMap<String, Arc<Model>>;

/// The engine handle; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Swapped whole on load, so lookups clone an `Arc` and never hold the
    /// lock while a request runs.
    models: RwLock<Arc<ModelTable>>,
    stopping: AtomicBool,
    /// `infer` calls not yet returned; shutdown waits for them.
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts one request for as long as it lives (also when its future is
/// dropped by a client that went away).
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Options for loading a repository.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Path of libonnxruntime; `None`: `ORT_DYLIB_PATH` or known locations.
    pub ort_library: Option<std::path::PathBuf>,
    /// Refuse configs that leave inputs or outputs to the graph
    /// (Triton's `--strict-model-config`).
    pub strict_model_config: bool,
    /// `max_batch_size` given to an ONNX model whose config.pbtxt (or
    /// missing config) leaves it and its inputs or outputs to the graph,
    /// where the graph can batch (Triton's `default-max-batch-size`); 0:
    /// such models take no batch dimension.
    pub default_max_batch_size: u32,
}

/// A request the engine has taken; `wait` for its answer.
pub struct Submitted {
    state: SubmitState,
    _guard: InFlight,
}

enum SubmitState {
    /// No such model or version: nothing to count it against.
    Unknown(EngineError),
    Queued {
        mv: Arc<ModelVersion>,
        rx: Result<tokio::sync::oneshot::Receiver<replica::Reply>, EngineError>,
        started: Instant,
        deadline: Option<Instant>,
        id: String,
    },
}

impl Submitted {
    /// Why the engine refused the request at once (unknown model, invalid
    /// input, a full queue), before it was queued; `None`: it is queued.
    /// Lets a caller that can hold the request (a Kafka consumer) retry
    /// after an overload instead of failing it.
    pub fn refusal(&self) -> Option<&EngineError> {
        match &self.state {
            SubmitState::Unknown(e) => Some(e),
            SubmitState::Queued { rx: Err(e), .. } => Some(e),
            SubmitState::Queued { rx: Ok(_), .. } => None,
        }
    }

    /// The answer. Dropping this future cancels the request.
    pub async fn wait(self) -> Result<InferResponse, EngineError> {
        let (mv, rx, started, deadline, id) = match self.state {
            SubmitState::Unknown(e) => return Err(e),
            SubmitState::Queued {
                mv,
                rx,
                started,
                deadline,
                id,
            } => (mv, rx, started, deadline, id),
        };
        let result: Result<InferResponse, EngineError> = async {
            let rx = rx?;
            let reply = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), rx)
                    .await
                    .map_err(|_| EngineError::DeadlineExceeded)?,
                None => rx.await,
            };
            let answer = reply.map_err(|_| EngineError::Internal("replica stopped".into()))??;
            let mut parameters = Vec::new();
            if let Some((have, need)) = answer.window_fill {
                // The model did not run: the key's window is still filling.
                parameters.push(("window_fill".to_string(), Param::Int(have as i64)));
                parameters.push(("window_length".to_string(), Param::Int(need as i64)));
            }
            Ok(InferResponse {
                model: mv.core.config.name.clone(),
                version: mv.core.version.to_string(),
                id,
                outputs: answer.outputs,
                parameters,
                timing: answer.timing,
                state: answer.state,
            })
        }
        .await;
        let core = &mv.core;
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => {
                core.metrics.success.increment(1);
                core.metrics.request_duration.record(elapsed.as_secs_f64());
                core.stats.success.add(elapsed);
            }
            Err(e) => {
                core.metrics.failure(e.kind().as_str());
                core.stats.fail.add(elapsed);
            }
        }
        result
    }
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads every model and version of a repository laid out as
    /// `<repo>/<model>/<version>/model.onnx` with `<repo>/<model>/config.toml`.
    pub fn load(repository: &Path, options: &EngineOptions) -> Result<Self, LoadError> {
        let engine = Self::new();
        for entry in repository::scan(repository, options)? {
            let factory =
                repository::factory_for(&entry, options).map_err(|source| LoadError::Backend {
                    model: entry.name.clone(),
                    version: entry.version,
                    source,
                })?;
            let mv = ModelVersion::load(&entry.name, entry.version, &entry.config, factory)?;
            if let Err(reason) = warmup::run(&mv, warmup::Fallback::Nothing) {
                mv.replicas.iter().for_each(|r| r.stop());
                return Err(LoadError::Config(config::ConfigError {
                    model: entry.name.clone(),
                    reason,
                }));
            }
            engine.insert_version(&entry.name, entry.version, Arc::new(mv));
        }
        Ok(engine)
    }

    /// Loads one model version and makes it visible once all its replicas
    /// are warm.
    pub fn add_version(
        &self,
        name: &str,
        version: u64,
        file: &ModelConfigFile,
        factory: Arc<dyn BackendFactory>,
    ) -> Result<(), LoadError> {
        let mv = Arc::new(ModelVersion::load(name, version, file, factory)?);
        self.insert_version(name, version, mv);
        Ok(())
    }

    fn insert_version(&self, name: &str, version: u64, mv: Arc<ModelVersion>) {
        let mut table = self.inner.models.write();
        let mut next: ModelTable = (**table).clone();
        let mut model = next
            .get(name)
            .map(|m| Model {
                versions: m.versions.clone(),
            })
            .unwrap_or_default();
        model.versions.insert(version, mv);
        next.insert(name.to_string(), Arc::new(model));
        *table = Arc::new(next);
    }

    /// Puts `model` in place of a model's versions (`None` removes the
    /// model) in one step, so a request sees the old set or the new one,
    /// never a mix. Returns the set that served before: its replicas keep
    /// running until the caller retires them.
    pub fn swap_model(&self, name: &str, model: Option<Model>) -> Option<Arc<Model>> {
        let mut table = self.inner.models.write();
        let mut next: ModelTable = (**table).clone();
        let old = match model {
            Some(m) => next.insert(name.to_string(), Arc::new(m)),
            None => next.remove(name),
        };
        *table = Arc::new(next);
        old
    }

    /// A snapshot of the loaded models.
    pub fn models(&self) -> Arc<ModelTable> {
        self.inner.models.read().clone()
    }

    /// Finds a model version; `None` or `""` means the latest.
    pub fn model(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<ModelVersion>, EngineError> {
        let table = self.models();
        let model = table
            .get(name)
            .ok_or_else(|| EngineError::NotFound(format!("unknown model {name:?}")))?;
        match version.filter(|v| !v.is_empty()) {
            None => model.latest().cloned(),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .and_then(|n| model.versions.get(&n).cloned()),
        }
        .ok_or_else(|| {
            EngineError::NotFound(format!(
                "unknown version {:?} of model {name:?}",
                version.unwrap_or_default()
            ))
        })
    }

    /// Ready: not shutting down, and no model has a hung replica.
    pub fn is_ready(&self) -> bool {
        !self.inner.stopping.load(Ordering::Relaxed)
            && self
                .models()
                .values()
                .all(|m| m.versions.values().all(|mv| mv.healthy()))
    }

    /// Whether `mv` is ready: the server accepts requests and no replica
    /// of it is hung.
    pub fn version_ready(&self, mv: &ModelVersion) -> bool {
        !self.inner.stopping.load(Ordering::Relaxed) && mv.healthy()
    }

    /// One pass of the batch watchdog over every loaded replica: batches
    /// running longer than `limit` fail and their replicas leave service
    /// until they return. Called periodically by the server.
    pub fn watch_batches(&self, limit: std::time::Duration) {
        let now = Instant::now();
        for m in self.models().values() {
            for mv in m.versions.values() {
                mv.watch(limit, now);
            }
        }
    }

    /// Runs one request through validation, admission, batching and the
    /// backend. Dropping the future before it resolves cancels the request:
    /// the replica skips it before it costs compute.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, EngineError> {
        self.submit(request).wait().await
    }

    /// Validates, admits and queues a request now, without waiting: a
    /// caller that submits requests one after another (a gRPC stream) fixes
    /// their arrival order, which is each key's execution order.
    pub fn submit(&self, request: InferRequest) -> Submitted {
        let started = Instant::now();
        self.inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.inner.clone());
        let mv = match self.model(&request.model, request.version.as_deref()) {
            Ok(mv) => mv,
            Err(e) => {
                return Submitted {
                    state: SubmitState::Unknown(e),
                    _guard: guard,
                }
            }
        };
        let mut deadline = request.deadline;
        if let Some(t) = request.timeout {
            // A timeout past what the clock can hold is no deadline.
            let at = started.checked_add(t);
            if let (false, Some(d)) = (mv.core.config.priorities.triton_timeouts, at) {
                deadline = Some(deadline.map_or(d, |h| h.min(d)));
            }
        }
        let mut request = request;
        request.deadline = deadline;
        let id = request.id.clone();
        let rx = if self.inner.stopping.load(Ordering::Relaxed) {
            Err(EngineError::Unavailable("server is shutting down".into()))
        } else if deadline.is_some_and(|d| d <= started) {
            Err(EngineError::DeadlineExceeded)
        } else {
            mv.submit(request)
        };
        Submitted {
            state: SubmitState::Queued {
                mv,
                rx,
                started,
                deadline,
                id,
            },
            _guard: guard,
        }
    }
    /// Resolves once no `infer` call is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.inner.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Readiness off; new requests are refused, queued ones still run.
    pub fn stop_accepting(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
    }

    /// Refuses new requests, lets queued ones finish, stops the replicas.
    pub fn shutdown(&self) {
        self.stop_accepting();
        let table = self.models();
        for model in table.values() {
            for mv in model.versions.values() {
                for r in &mv.replicas {
                    r.stop();
                }
            }
        }
    }
}
