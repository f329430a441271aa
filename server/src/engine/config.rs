//! The per-model `config.toml` of the model repository, and its resolution
//! against the I/O signature the backend reads from the model file.

use crate::backend::{Signature, TensorSpec};
use crate::tensor::DataType;
use serde::Deserialize;
use std::time::Duration;

/// Default bound on requests waiting per model version.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;

/// `<repo>/<model>/config.toml` as written by the user.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigFile {
    /// `onnxruntime_onnx` (the default for `model.onnx`) or `pytorch_libtorch`
    /// (the default for `model.pt`, with the `torch` feature).
    pub platform: Option<String>,
    /// Where the replicas run: `"cpu"` (default), `"cuda"` (every GPU),
    /// `"cuda:N"`, `"auto"` (every GPU, else the CPU), or a list of these;
    /// replica `i` takes entry `i` of the expanded list, cyclically.
    pub device: Option<DeviceFile>,
    /// 0: the model takes no batch dimension. >0: dim 0 is the batch
    /// dimension, `dims` exclude it and a request may carry up to this many rows.
    #[serde(default)]
    pub max_batch_size: u32,
    /// Worker replicas, each with its own session on its own OS thread.
    pub instance_count: Option<usize>,
    /// Threads ONNX Runtime may use inside one operator, per replica.
    pub intra_op_threads: Option<usize>,
    pub inter_op_threads: Option<usize>,
    /// Triton's dynamic batcher with fixed knobs. Without it (and without
    /// an objective) a batching model merges whatever queued while its
    /// replica was busy, with no added delay.
    pub dynamic_batching: Option<DynamicBatchingFile>,
    /// The p99 of queue + compute time the model should stay under; turns
    /// on adaptive batching (batch size and wait chosen online).
    pub latency_objective_ms: Option<f64>,
    /// With an objective: reject, before they cost compute, the requests
    /// that can no longer meet it (default true).
    pub shed_late: Option<bool>,
    /// `none`: one request per execution, never merged.
    pub batching: Option<String>,
    /// A request that arrives at an idle replica with an empty queue, and
    /// whose batch would be that request alone, runs on the thread that
    /// received it instead of hopping to the replica thread and back, while
    /// the replica's smoothed execution time stays under this many µs
    /// (default 100; 0: always hop). Only for backends that run on any
    /// thread (ONNX Runtime on the CPU).
    pub inline_execution_max_us: Option<u64>,
    /// Bound on queued requests when no `[dynamic_batching]` is given.
    pub max_queue_size: Option<usize>,
    #[serde(default)]
    pub input: Vec<IoFile>,
    #[serde(default)]
    pub output: Vec<IoFile>,
    /// How requests are spread over replicas: `affinity` (default),
    /// `round_robin` or `random`.
    pub routing: Option<String>,
    /// The key is what this matches in the request key (the explicit
    /// `correlation_key`, else the request id).
    pub correlation_key_regex: Option<String>,
    pub keyed_state: Option<KeyedStateFile>,
    #[serde(default)]
    pub sequence_state: Vec<SequenceStateFile>,
    /// Requests form sequences (Triton's `sequence_batching`): each needs a
    /// correlation key and carries one row. Implied by `sequence_control`.
    #[serde(default)]
    pub sequence: bool,
    #[serde(default)]
    pub sequence_control: Vec<ControlFile>,
    pub window: Option<WindowFile>,
    /// Which of the version directories load: `"latest"` (the default, as
    /// Triton's), `"all"`, `{ latest = N }` or `{ specific = [..] }`.
    pub version_policy: Option<VersionPolicy>,
    /// ONNX Runtime providers a GPU replica runs before CUDA, as Triton's
    /// `gpu_execution_accelerator` names them: `["tensorrt"]` requires
    /// TensorRT, `[]` turns it off; absent, TensorRT where available.
    pub gpu_execution_accelerators: Option<Vec<String>>,
    /// Samples run on every replica before the version serves (Triton's
    /// `model_warmup`).
    #[serde(default)]
    pub warmup: Vec<WarmupFile>,
    /// The Triton `ModelConfig` this file was read from (config.pbtxt), so
    /// the model-config calls return what the user wrote, completed.
    #[serde(skip)]
    pub triton: Option<std::sync::Arc<shoal_proto::ModelConfig>>,
    /// Set by the repository scan where Triton would auto-complete this
    /// config (a config.pbtxt, or none, that leaves inputs or outputs to
    /// the graph; never config.toml), holding Triton's
    /// `default-max-batch-size`: see [`Self::triton_autocompleted`].
    #[serde(skip)]
    pub triton_autocomplete: Option<u32>,
}

/// Triton's `version_policy`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "VersionPolicyRepr")]
pub enum VersionPolicy {
    All,
    /// The N highest version numbers (`"latest"` alone is N = 1).
    Latest(u32),
    Specific(Vec<u64>),
}

/// How config.toml writes a version policy.
#[derive(Deserialize)]
#[serde(untagged)]
enum VersionPolicyRepr {
    Name(String),
    Latest { latest: u32 },
    Specific { specific: Vec<u64> },
}

impl TryFrom<VersionPolicyRepr> for VersionPolicy {
    type Error = String;
    fn try_from(r: VersionPolicyRepr) -> Result<Self, String> {
        match r {
            VersionPolicyRepr::Name(n) if n == "all" => Ok(VersionPolicy::All),
            VersionPolicyRepr::Name(n) if n == "latest" => Ok(VersionPolicy::Latest(1)),
            VersionPolicyRepr::Name(n) => Err(format!(
                "version_policy {n:?} is not \"all\", \"latest\", {{ latest = N }} or {{ specific = [..] }}"
            )),
            VersionPolicyRepr::Latest { latest: 0 } => {
                Err("version_policy latest must be >= 1".into())
            }
            VersionPolicyRepr::Latest { latest } => Ok(VersionPolicy::Latest(latest)),
            VersionPolicyRepr::Specific { specific } => Ok(VersionPolicy::Specific(specific)),
        }
    }
}

impl VersionPolicy {
    /// The versions of `available` (sorted ascending) this policy loads.
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::All => available.to_vec(),
            VersionPolicy::Latest(n) => {
                let keep = (*n as usize).min(available.len());
                available[available.len() - keep..].to_vec()
            }
            VersionPolicy::Specific(v) => available
                .iter()
                .copied()
                .filter(|a| v.contains(a))
                .collect(),
        }
    }
}

/// `device = "cuda"` or `device = ["cuda:0", "cpu"]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum DeviceFile {
    One(String),
    Many(Vec<String>),
}

impl DeviceFile {
    /// The entries, parsed.
    pub fn specs(&self) -> Result<Vec<crate::gpu::DeviceSpec>, String> {
        let all: &[String] = match self {
            DeviceFile::One(s) => std::slice::from_ref(s),
            DeviceFile::Many(v) => v,
        };
        if all.is_empty() {
            return Err("device list is empty".into());
        }
        all.iter()
            .map(|s| crate::gpu::DeviceSpec::parse(s))
            .collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyedStateFile {
    pub max_keys: Option<usize>,
    pub idle_timeout_s: Option<u64>,
    /// The same in microseconds (Triton's `max_sequence_idle_microseconds`);
    /// wins over `idle_timeout_s`.
    pub idle_timeout_us: Option<u64>,
}

/// A graph input the server fills from the request's sequence flags
/// (Triton's `sequence_batching.control_input`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    pub input: String,
    /// `"start"`, `"end"`, `"ready"` or `"corrid"`.
    pub kind: String,
    pub datatype: String,
    /// The values for false and true (start, end, ready); default 0 and 1.
    pub false_true: Option<[f64; 2]>,
}

/// What a control input carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// The request starts its sequence.
    Start,
    /// The request ends its sequence.
    End,
    /// The row holds a request (always, since shoal batches only requests).
    Ready,
    /// The sequence's correlation id.
    CorrId,
}

/// A resolved control input.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlSpec {
    pub input: String,
    pub kind: ControlKind,
    pub datatype: DataType,
    pub false_true: [f64; 2],
}

/// A state output that feeds a state input of the next request of the key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceStateFile {
    pub input: String,
    pub output: String,
    #[serde(default)]
    pub initial: f64,
    /// Optional: checked against the graph when given (Triton's config
    /// states them).
    pub datatype: Option<String>,
    pub dims: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowFile {
    pub input: String,
    pub length: usize,
    /// `pad` (zeros before the first events) or `skip` (answer without
    /// running until the window is full).
    pub warmup: Option<String>,
}

/// How requests are spread over a model's replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// A key always goes to the replica rendezvous hashing picks; keyless
    /// requests to the least-loaded replica.
    Affinity,
    RoundRobin,
    Random,
}

/// Bounds on per-key bookkeeping and state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedLimits {
    pub max_keys: usize,
    pub idle_timeout: Duration,
}

impl KeyedLimits {
    /// Whether a key idle this long (nothing in flight) has expired.
    pub fn expired(&self, idle_for: Duration) -> bool {
        idle_for >= self.idle_timeout
    }
}

pub const DEFAULT_MAX_KEYS: usize = 100_000;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// A resolved sequence state pair.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSpec {
    pub input: String,
    pub output: String,
    pub datatype: DataType,
    /// Dims of one key's state (without the batch dim), all fixed.
    pub dims: Vec<i64>,
    pub initial: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmup {
    Pad,
    Skip,
}

/// A resolved sliding window over one input.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSpec {
    pub input: String,
    pub length: usize,
    pub warmup: Warmup,
    pub datatype: DataType,
    /// Dims of one event (without batch and window dims), all fixed.
    pub event_dims: Vec<i64>,
}

impl WindowSpec {
    /// Bytes of one event.
    pub fn event_bytes(&self) -> usize {
        self.event_dims.iter().product::<i64>() as usize * self.datatype.size().unwrap_or(0)
    }
}

/// Where each graph input's data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSource {
    /// The request's input at this index of `ModelConfig::inputs`.
    Client(usize),
    /// The key's stored state, `ModelConfig::states[i]`.
    State(usize),
    /// The key's window, built from the request input at this index.
    Window(usize),
    /// The request's sequence flag or id, `ModelConfig::controls[i]`.
    Control(usize),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatchingFile {
    #[serde(default)]
    pub max_queue_delay_us: u64,
    #[serde(default)]
    pub preferred_batch_sizes: Vec<u32>,
    pub max_queue_size: Option<usize>,
    /// Triton's priority levels: requests name one (parameter `priority`,
    /// 1 the highest); 0 means none.
    #[serde(default)]
    pub priority_levels: u32,
    /// The level of a request that names none (or one out of range).
    #[serde(default)]
    pub default_priority_level: u32,
    /// Triton's `default_queue_policy`, beside `max_queue_size`:
    /// `"reject"` (the default) or `"delay"`.
    pub timeout_action: Option<String>,
    #[serde(default)]
    pub default_timeout_us: u64,
    #[serde(default)]
    pub allow_timeout_override: bool,
    /// Per-level policies, keyed by the level (`[dynamic_batching.priority_queue_policy.1]`).
    #[serde(default)]
    pub priority_queue_policy: std::collections::BTreeMap<String, QueuePolicyFile>,
}

/// One warm-up sample as written (`[[warmup]]`, or Triton's `model_warmup`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupFile {
    pub name: String,
    /// Rows of the sample (the inputs are repeated); 1 for a model
    /// without batching.
    #[serde(default = "one")]
    pub batch_size: u32,
    /// Runs per replica; 0 means 1, as in Triton.
    #[serde(default)]
    pub count: u32,
    pub inputs: Vec<WarmupInputFile>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupInputFile {
    pub name: String,
    pub datatype: String,
    /// One row's dims (without the batch dim).
    pub dims: Vec<i64>,
    /// `"zero"` or `"random"`; or give `file`.
    pub data: Option<String>,
    /// Raw row-major bytes of one row, in the model directory's `warmup/`.
    pub file: Option<String>,
    /// `file`'s content, read with the config.
    #[serde(skip)]
    pub file_bytes: Option<bytes::Bytes>,
}

/// Where a warm-up input's values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmupData {
    Zero,
    Random,
    /// One row's bytes.
    File(bytes::Bytes),
}

/// A resolved warm-up sample: inputs in the model's input order.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmupSample {
    pub name: String,
    pub batch_size: usize,
    pub count: usize,
    /// (dims of one row, data) per model input.
    pub inputs: Vec<(Vec<i64>, WarmupData)>,
}

/// Triton's `ModelQueuePolicy` (its `max_queue_size` is the table's own
/// field for the default policy).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueuePolicyFile {
    /// `"reject"` (the default) or `"delay"`.
    pub timeout_action: Option<String>,
    /// Queue timeout of a request that gives none; 0: no timeout.
    #[serde(default)]
    pub default_timeout_us: u64,
    /// The request parameter `timeout` may set a request's queue timeout.
    #[serde(default)]
    pub allow_timeout_override: bool,
    /// Only in per-level policies (the default policy's is the table's).
    pub max_queue_size: Option<usize>,
}

/// What happens to a request still queued when its queue timeout expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutAction {
    /// It fails (UNAVAILABLE / 503, retryable), as Triton's REJECT.
    Reject,
    /// It moves behind every request that has not timed out (Triton's DELAY).
    Delay,
}

/// One priority level's queue policy, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    pub timeout_action: TimeoutAction,
    pub default_timeout: Option<Duration>,
    pub allow_timeout_override: bool,
    /// Requests of this level that may wait at once.
    pub max_queue_size: usize,
}

/// Priority levels and their queue policies, resolved. With no levels
/// every request is level 1 and `policies` has that one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priorities {
    /// 0: the model has no priority levels.
    pub levels: u32,
    pub default_level: u32,
    /// Index `level - 1` (every level from 1 to `max(levels, 1)`).
    pub policies: Vec<QueuePolicy>,
    /// True when some policy sets a timeout or lets requests set one: the
    /// `timeout` parameter then means Triton's queue timeout (honored only
    /// where `allow_timeout_override`), not shoal's request deadline.
    pub triton_timeouts: bool,
}

impl Priorities {
    /// The level of a request asking for `asked` (0: none), as Triton's
    /// `SetPriority`: out of range falls back to the default level.
    pub fn level(&self, asked: u64) -> u32 {
        if asked == 0 || asked > self.levels as u64 {
            self.default_level.max(1)
        } else {
            asked as u32
        }
    }

    pub fn policy(&self, level: u32) -> &QueuePolicy {
        &self.policies[(level.max(1) as usize - 1).min(self.policies.len() - 1)]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoFile {
    pub name: String,
    pub datatype: String,
    pub dims: Vec<i64>,
    /// The shape the model sees instead of `dims` (same elements, row-major).
    pub reshape: Option<Vec<i64>>,
    /// Where the tensor is written (`dir/config.pbtxt line 7`), so a
    /// mismatch with the graph names the place.
    #[serde(skip)]
    pub at: Option<String>,
}

/// Batching knobs after validation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicBatching {
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<usize>,
}

/// A model's I/O tensor as the protocol sees it: `dims` exclude the batch
/// dimension when the model batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
    /// The model's own dims of one row when they differ from `dims`
    /// (Triton's `reshape`): the bytes are the same, only the shape changes.
    pub reshape: Option<Vec<i64>>,
}

/// Adaptive batching: the controller chooses batch size and wait online to
/// keep queue + compute time under `objective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveBatching {
    pub objective: Duration,
    pub shed_late: bool,
}

/// A model version's configuration, validated and completed from its graph.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub platform: String,
    pub max_batch_size: usize,
    pub instance_count: usize,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    /// The fixed-knob batcher; with `adaptive`, the knobs it reports (no
    /// delay, no preferred sizes). `None`: no batching.
    pub dynamic_batching: Option<DynamicBatching>,
    pub adaptive: Option<AdaptiveBatching>,
    /// Bound on the requests queued for the model (all levels together).
    pub max_queue_size: usize,
    pub priorities: Priorities,
    /// Inputs as clients send them (state inputs hidden, windowed ones as
    /// one event).
    pub inputs: Vec<IoSpec>,
    /// Outputs as clients see them (state outputs hidden).
    pub outputs: Vec<IoSpec>,
    /// The backend's inputs, in graph order, with their data source.
    pub graph_inputs: Vec<(String, InputSource)>,
    pub routing: Routing,
    pub correlation_key_regex: Option<String>,
    pub keyed_limits: KeyedLimits,
    pub states: Vec<StateSpec>,
    pub window: Option<WindowSpec>,
    /// A sequence model: keyed, one row per request, even without state.
    pub sequence: bool,
    pub controls: Vec<ControlSpec>,
    pub version_policy: VersionPolicy,
    pub warmup: Vec<WarmupSample>,
    /// Longest smoothed execution that may run on the receiving thread
    /// (`inline_execution_max_us`); zero: never.
    pub inline_max: Duration,
    /// The config.pbtxt this came from, if any.
    pub triton: Option<std::sync::Arc<shoal_proto::ModelConfig>>,
}

/// Tokio's guidance for the longest a task may run between awaits.
const DEFAULT_INLINE_MAX_US: u64 = 100;
/// A bound past which "cheap" means nothing: 10 ms on a runtime thread.
const MAX_INLINE_MAX_US: u64 = 10_000;

impl ModelConfig {
    /// True when requests of a key depend on the key's earlier requests.
    pub fn is_stateful(&self) -> bool {
        !self.states.is_empty() || self.window.is_some() || self.sequence
    }

    /// True when shoal holds each key's state itself (sequence state pairs
    /// or a window), so it can snapshot and restore it. A sequence model
    /// whose backend keeps its own state is stateful without this.
    pub fn holds_key_state(&self) -> bool {
        !self.states.is_empty() || self.window.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("model {model}: {reason}")]
pub struct ConfigError {
    pub model: String,
    pub reason: String,
}

impl ModelConfigFile {
    pub fn parse(model: &str, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            model: model.to_string(),
            reason: format!("invalid config.toml: {e}"),
        })
    }

    /// Validates the file and completes it with the graph's signature.
    pub fn resolve(&self, model: &str, graph: &Signature) -> Result<ModelConfig, ConfigError> {
        match self.triton_autocompleted(model, graph) {
            Some(completed) => completed.resolve_as_written(model, graph),
            None => self.resolve_as_written(model, graph),
        }
    }

    /// What Triton's onnxruntime backend makes of a config it
    /// auto-completes, where every graph input and output has a dynamic
    /// first dimension (the model can batch): no `max_batch_size` becomes
    /// `default-max-batch-size` (0 leaves it), and a `max_batch_size` above
    /// 1 with no scheduler named gets `dynamic_batching {}` (merge what
    /// queued, no delay). `None` where nothing changes.
    fn triton_autocompleted(&self, model: &str, graph: &Signature) -> Option<Self> {
        let default_max_batch_size = self.triton_autocomplete?;
        let onnx = self.platform.as_deref().unwrap_or("onnxruntime_onnx") == "onnxruntime_onnx";
        let can_batch = !graph.inputs.is_empty()
            && graph
                .inputs
                .iter()
                .chain(&graph.outputs)
                .all(TensorSpec::has_dynamic_first_dim);
        if !onnx || !can_batch {
            return None;
        }
        let max_batch_size = match self.max_batch_size {
            0 => default_max_batch_size,
            written => written,
        };
        let scheduler_named =
            self.dynamic_batching.is_some() || self.sequence || !self.sequence_control.is_empty();
        // config.pbtxt without a scheduler reads as `batching = "none"`
        // (Triton's default scheduler); auto-completion names the dynamic one.
        let batching = match max_batch_size {
            _ if scheduler_named => self.batching.clone(),
            0 => self.batching.clone(),
            1 => Some("none".into()),
            _ => None,
        };
        if max_batch_size == self.max_batch_size && batching == self.batching {
            return None;
        }
        if max_batch_size != self.max_batch_size {
            tracing::warn!(
                model,
                max_batch_size,
                "autofilled max_batch_size from --default-max-batch-size: the graph can batch and the config sets none (write max_batch_size to choose another)"
            );
        }
        Some(Self {
            max_batch_size,
            batching,
            triton_autocomplete: None,
            ..self.clone()
        })
    }

    /// [`Self::resolve`] of the file as it stands.
    fn resolve_as_written(
        &self,
        model: &str,
        graph: &Signature,
    ) -> Result<ModelConfig, ConfigError> {
        let err = |reason: String| ConfigError {
            model: model.to_string(),
            reason,
        };
        let max_batch_size = self.max_batch_size as usize;
        let instance_count = self.instance_count.unwrap_or(1);
        if instance_count == 0 || instance_count > 256 {
            return Err(err(format!(
                "instance_count must be 1..=256, got {instance_count}"
            )));
        }
        let intra = self.intra_op_threads.unwrap_or(1);
        let inter = self.inter_op_threads.unwrap_or(1);
        if intra == 0 || inter == 0 {
            return Err(err(
                "intra_op_threads and inter_op_threads must be >= 1".into()
            ));
        }
        let dynamic_batching = self.resolve_batching(max_batch_size).map_err(err)?;
        let adaptive = match self.latency_objective_ms {
            None => {
                if self.shed_late.is_some() {
                    return Err(err("shed_late needs latency_objective_ms".into()));
                }
                None
            }
            Some(ms) if !(ms.is_finite() && ms > 0.0 && ms <= 3_600_000.0) => {
                return Err(err(format!(
                    "latency_objective_ms must be a positive number of milliseconds, got {ms}"
                )))
            }
            Some(ms) => Some(AdaptiveBatching {
                objective: Duration::from_secs_f64(ms / 1e3),
                shed_late: self.shed_late.unwrap_or(true),
            }),
        };
        let max_queue_size = self
            .dynamic_batching
            .as_ref()
            .and_then(|d| d.max_queue_size)
            .or(self.max_queue_size)
            .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        if max_queue_size == 0 {
            return Err(err("max_queue_size must be >= 1".into()));
        }
        let priorities = self.resolve_priorities(max_queue_size).map_err(err)?;
        // Each level is bounded by its policy; together they are bounded by
        // the sum, so a level's bound is never cut by another level's load.
        let max_queue_size = if priorities.levels > 0 {
            priorities.policies.iter().map(|p| p.max_queue_size).sum()
        } else {
            max_queue_size
        };
        let routing = match self.routing.as_deref() {
            None | Some("affinity") => Routing::Affinity,
            Some("round_robin") => Routing::RoundRobin,
            Some("random") => Routing::Random,
            Some(other) => {
                return Err(err(format!(
                    "routing {other:?} is not one of affinity, round_robin, random"
                )))
            }
        };
        if let Some(re) = &self.correlation_key_regex {
            regex::Regex::new(re)
                .map_err(|e| err(format!("invalid correlation_key_regex {re:?}: {e}")))?;
        }
        let keyed = self.keyed_state.clone().unwrap_or_default();
        let keyed_limits = KeyedLimits {
            max_keys: keyed.max_keys.unwrap_or(DEFAULT_MAX_KEYS),
            idle_timeout: match (keyed.idle_timeout_us, keyed.idle_timeout_s) {
                (Some(us), _) => Duration::from_micros(us),
                (None, Some(s)) => Duration::from_secs(s),
                (None, None) => DEFAULT_IDLE_TIMEOUT,
            },
        };
        if keyed_limits.max_keys == 0 || keyed_limits.idle_timeout.is_zero() {
            return Err(err(
                "keyed_state max_keys and idle_timeout_s must be >= 1".into()
            ));
        }
        // Configured [[input]]s describe what clients send; state and
        // window inputs are the server's to fill, so check those against
        // the graph alone.
        let graph_io = resolve_io(model, "input", &[], &graph.inputs, max_batch_size)?;
        let outputs_all = resolve_io(
            model,
            "output",
            &self.output,
            &graph.outputs,
            max_batch_size,
        )?;
        if self.is_keyed_stateful() && max_batch_size == 0 {
            return Err(err(
                "sequence_state, sequence controls and window need max_batch_size > 0 (one row per key)".into(),
            ));
        }
        let graph_outputs = resolve_io(model, "output", &[], &graph.outputs, max_batch_size)?;
        let mut states = Vec::new();
        for st in &self.sequence_state {
            let i = graph_io
                .iter()
                .find(|g| g.name == st.input)
                .ok_or_else(|| {
                    err(format!(
                        "sequence_state input {:?} is not a graph input",
                        st.input
                    ))
                })?;
            // The graph's, not the configured outputs: a Triton config
            // lists only what clients see, never the state.
            let o = graph_outputs
                .iter()
                .find(|g| g.name == st.output)
                .ok_or_else(|| {
                    err(format!(
                        "sequence_state output {:?} is not a graph output",
                        st.output
                    ))
                })?;
            let declared_dt = st.datatype.as_deref().map(|d| (d, DataType::parse(d)));
            if let Some((d, dt)) = declared_dt {
                if dt != Some(i.datatype) {
                    return Err(err(format!(
                        "sequence_state {:?}: datatype {d} is not the graph's {}",
                        st.input,
                        i.datatype.as_str()
                    )));
                }
            }
            if let Some(d) = &st.dims {
                let fit = d.len() == i.dims.len()
                    && d.iter().zip(&i.dims).all(|(&a, &b)| b < 0 || a == b);
                if !fit {
                    return Err(err(format!(
                        "sequence_state {:?}: dims {d:?} are not the graph's {:?}",
                        st.input, i.dims
                    )));
                }
            }
            let fixed = i.dims.iter().all(|&x| x > 0);
            let same = i.dims.len() == o.dims.len()
                && i.dims.iter().zip(&o.dims).all(|(&a, &b)| b < 0 || a == b);
            if i.datatype != o.datatype || i.datatype.size().is_none() || !fixed || !same {
                return Err(err(format!(
                    "sequence_state {} {:?} {} -> {} {:?} {}: datatypes must match and be numeric, dims equal and fixed",
                    st.output, o.dims, o.datatype, st.input, i.dims, i.datatype
                )));
            }
            states.push(StateSpec {
                input: st.input.clone(),
                output: st.output.clone(),
                datatype: i.datatype,
                dims: i.dims.clone(),
                initial: st.initial,
            });
        }
        let mut controls: Vec<ControlSpec> = Vec::new();
        for c in &self.sequence_control {
            let what = format!("sequence control input {:?}", c.input);
            let g = graph_io
                .iter()
                .find(|g| g.name == c.input)
                .ok_or_else(|| err(format!("{what} is not a graph input")))?;
            let kind = match c.kind.as_str() {
                "start" => ControlKind::Start,
                "end" => ControlKind::End,
                "ready" => ControlKind::Ready,
                "corrid" => ControlKind::CorrId,
                o => {
                    return Err(err(format!(
                        "{what}: kind {o:?} is not start, end, ready or corrid"
                    )))
                }
            };
            let datatype = DataType::parse(&c.datatype)
                .ok_or_else(|| err(format!("{what}: unknown datatype {:?}", c.datatype)))?;
            let allowed = match kind {
                ControlKind::CorrId => matches!(
                    datatype,
                    DataType::Uint64
                        | DataType::Int64
                        | DataType::Uint32
                        | DataType::Int32
                        | DataType::Bytes
                ),
                _ => datatype != DataType::Bytes,
            };
            if !allowed || datatype != g.datatype || !(g.dims.is_empty() || g.dims == [1]) {
                return Err(err(format!(
                    "{what}: the graph has it as {} {:?}; a control is one value per row of the configured datatype {} ({})",
                    g.datatype.as_str(),
                    g.dims,
                    c.datatype,
                    if kind == ControlKind::CorrId { "UINT64, INT64, UINT32, INT32 or BYTES" } else { "numeric or BOOL" }
                )));
            }
            if controls.iter().any(|x| x.input == c.input) {
                return Err(err(format!("{what} is given twice")));
            }
            controls.push(ControlSpec {
                input: c.input.clone(),
                kind,
                datatype,
                false_true: c.false_true.unwrap_or([0.0, 1.0]),
            });
        }
        let window = match &self.window {
            None => None,
            Some(w) => {
                let g = graph_io.iter().find(|g| g.name == w.input).ok_or_else(|| {
                    err(format!("window input {:?} is not a graph input", w.input))
                })?;
                if w.length == 0 || w.length > 4096 {
                    return Err(err(format!(
                        "window length must be 1..=4096, got {}",
                        w.length
                    )));
                }
                let fits = g
                    .dims
                    .first()
                    .is_some_and(|&d| d < 0 || d as usize == w.length);
                let event_dims = g.dims.get(1..).unwrap_or_default().to_vec();
                if !fits || event_dims.iter().any(|&d| d <= 0) || g.datatype.size().is_none() {
                    return Err(err(format!(
                        "window input {:?} has dims {:?}: expected [{}, <fixed event dims>] of a numeric type",
                        w.input, g.dims, w.length
                    )));
                }
                let warmup = match w.warmup.as_deref() {
                    None | Some("pad") => Warmup::Pad,
                    Some("skip") => Warmup::Skip,
                    Some(o) => return Err(err(format!("window warmup {o:?} is not pad or skip"))),
                };
                Some(WindowSpec {
                    input: w.input.clone(),
                    length: w.length,
                    warmup,
                    datatype: g.datatype,
                    event_dims,
                })
            }
        };
        // What clients send: configured inputs if given, else the graph's,
        // minus state inputs, with the window input as one event.
        let client_candidates = if self.input.is_empty() {
            graph_io.clone()
        } else {
            resolve_io(
                model,
                "client input",
                &self.input,
                &graph.inputs,
                max_batch_size,
            )?
        };
        let mut inputs = Vec::new();
        for mut c in client_candidates {
            if states.iter().any(|s| s.input == c.name)
                || controls.iter().any(|x| x.input == c.name)
            {
                continue;
            }
            if let Some(w) = window.as_ref().filter(|w| w.input == c.name) {
                c.dims = w.event_dims.clone();
            }
            inputs.push(c);
        }
        let mut graph_inputs = Vec::new();
        for g in &graph_io {
            let source = if let Some(i) = states.iter().position(|s| s.input == g.name) {
                InputSource::State(i)
            } else if let Some(i) = controls.iter().position(|x| x.input == g.name) {
                InputSource::Control(i)
            } else {
                let i = inputs
                    .iter()
                    .position(|c| c.name == g.name)
                    .ok_or_else(|| err(format!("config omits graph input {:?}", g.name)))?;
                if window.as_ref().is_some_and(|w| w.input == g.name) {
                    InputSource::Window(i)
                } else {
                    InputSource::Client(i)
                }
            };
            graph_inputs.push((g.name.clone(), source));
        }
        let outputs = outputs_all
            .into_iter()
            .filter(|o| !states.iter().any(|s| s.output == o.name))
            .collect();
        let warmup = self.resolve_warmup(max_batch_size, &inputs).map_err(err)?;
        let inline_us = self
            .inline_execution_max_us
            .unwrap_or(DEFAULT_INLINE_MAX_US);
        if inline_us > MAX_INLINE_MAX_US {
            return Err(err(format!(
                "inline_execution_max_us must be at most {MAX_INLINE_MAX_US} (longer blocks a network thread), got {inline_us}"
            )));
        }
        let inline_max = Duration::from_micros(inline_us);
        Ok(ModelConfig {
            name: model.to_string(),
            platform: self
                .platform
                .clone()
                .unwrap_or_else(|| "onnxruntime_onnx".to_string()),
            max_batch_size,
            instance_count,
            intra_op_threads: intra,
            inter_op_threads: inter,
            dynamic_batching,
            adaptive,
            max_queue_size,
            priorities,
            inputs,
            outputs,
            graph_inputs,
            routing,
            correlation_key_regex: self.correlation_key_regex.clone(),
            keyed_limits,
            states,
            window,
            sequence: self.sequence || !controls.is_empty(),
            controls,
            version_policy: self
                .version_policy
                .clone()
                .unwrap_or(VersionPolicy::Latest(1)),
            warmup,
            inline_max,
            triton: self.triton.clone(),
        })
    }

    /// The batcher's knobs. Without `[dynamic_batching]` a batching model
    /// gets Triton's `dynamic_batching {}`: no delay, batches are what
    /// queued while every replica was busy. At low load that is exactly
    /// no batching (the queue is empty when the replica frees up); at high
    /// load batches grow with the backlog, which only raises throughput.
    /// `batching = "none"` opts out.
    fn resolve_batching(&self, max_batch_size: usize) -> Result<Option<DynamicBatching>, String> {
        let adaptive = self.latency_objective_ms.is_some();
        match self.batching.as_deref() {
            None => {}
            Some("none") => {
                if self.dynamic_batching.is_some() || adaptive {
                    return Err(
                        "batching = \"none\" excludes [dynamic_batching] and latency_objective_ms"
                            .into(),
                    );
                }
                return Ok(None);
            }
            Some(other) => {
                return Err(format!(
                    "batching must be \"none\" or absent, got {other:?}"
                ))
            }
        }
        let Some(db) = &self.dynamic_batching else {
            return Ok((max_batch_size > 0).then(DynamicBatching::default));
        };
        if max_batch_size == 0 {
            // Checked here, not when config.pbtxt is read: Triton's
            // auto-complete may fill max_batch_size in from the graph.
            return Err(if self.sequence && self.triton.is_some() {
                "sequence_batching needs max_batch_size > 0 in shoal (a request is one row of its sequence)"
            } else {
                "[dynamic_batching] needs max_batch_size > 0"
            }
            .into());
        }
        if adaptive && (db.max_queue_delay_us > 0 || !db.preferred_batch_sizes.is_empty()) {
            return Err(
                "latency_objective_ms chooses batch sizes and delays itself: drop max_queue_delay_us and preferred_batch_sizes (max_queue_size stays)"
                    .into(),
            );
        }
        let mut preferred = Vec::new();
        for &p in &db.preferred_batch_sizes {
            let p = p as usize;
            if p == 0 || p > max_batch_size {
                return Err(format!(
                    "preferred batch size {p} must be in 1..=max_batch_size ({max_batch_size})"
                ));
            }
            preferred.push(p);
        }
        preferred.sort_unstable();
        preferred.dedup();
        Ok(Some(DynamicBatching {
            max_queue_delay: Duration::from_micros(db.max_queue_delay_us),
            preferred_batch_sizes: preferred,
        }))
    }

    /// Warm-up samples checked against the client-facing inputs: every
    /// input given once, its datatype and (fixed) dims the model's, a
    /// file's size one row's.
    fn resolve_warmup(
        &self,
        max_batch_size: usize,
        inputs: &[IoSpec],
    ) -> Result<Vec<WarmupSample>, String> {
        let mut out = Vec::new();
        for w in &self.warmup {
            let what = format!("warm-up sample {:?}", w.name);
            let batch_size = w.batch_size as usize;
            let max = max_batch_size.max(1);
            if batch_size == 0 || batch_size > max {
                return Err(format!(
                    "{what}: batch_size {batch_size} must be in 1..={max}"
                ));
            }
            let mut slots: Vec<Option<(Vec<i64>, WarmupData)>> = vec![None; inputs.len()];
            for i in &w.inputs {
                let at = inputs
                    .iter()
                    .position(|s| s.name == i.name)
                    .ok_or_else(|| {
                        format!(
                            "{what}: the model has no input {:?} (it takes {:?})",
                            i.name,
                            inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
                        )
                    })?;
                let spec = &inputs[at];
                let dt = DataType::parse(&i.datatype).ok_or_else(|| {
                    format!(
                        "{what}: input {:?}: unknown datatype {:?}",
                        i.name, i.datatype
                    )
                })?;
                if dt != spec.datatype {
                    return Err(format!(
                        "{what}: input {:?} is {} in the sample and {} in the model",
                        i.name,
                        i.datatype,
                        spec.datatype.as_str()
                    ));
                }
                let fits = i.dims.len() == spec.dims.len()
                    && i.dims
                        .iter()
                        .zip(&spec.dims)
                        .all(|(&a, &b)| a >= 0 && (b < 0 || a == b));
                if !fits {
                    return Err(format!(
                        "{what}: input {:?} dims {:?} do not fit the model's {:?}",
                        i.name, i.dims, spec.dims
                    ));
                }
                let data = match (i.data.as_deref(), &i.file_bytes, &i.file) {
                    (Some("zero"), None, None) => WarmupData::Zero,
                    (Some("random"), None, None) => WarmupData::Random,
                    (None, Some(b), Some(f)) => {
                        let want = crate::tensor::element_count(&i.dims)
                            .zip(dt.size())
                            .map(|(n, s)| n * s);
                        if want.is_some_and(|w| w != b.len()) {
                            return Err(format!(
                                "{what}: input {:?}: warmup/{f} holds {} bytes, one row of {} {:?} is {}",
                                i.name,
                                b.len(),
                                i.datatype,
                                i.dims,
                                want.unwrap_or(0)
                            ));
                        }
                        WarmupData::File(b.clone())
                    }
                    _ => {
                        return Err(format!(
                            "{what}: input {:?} needs exactly one of data = \"zero\", data = \"random\" or file",
                            i.name
                        ))
                    }
                };
                if slots[at].replace((i.dims.clone(), data)).is_some() {
                    return Err(format!("{what}: input {:?} given twice", i.name));
                }
            }
            let inputs = slots
                .into_iter()
                .zip(inputs)
                .map(|(s, spec)| {
                    s.ok_or_else(|| format!("{what}: input {:?} is missing", spec.name))
                })
                .collect::<Result<_, _>>()?;
            out.push(WarmupSample {
                name: w.name.clone(),
                batch_size,
                count: (w.count as usize).max(1),
                inputs,
            });
        }
        Ok(out)
    }

    /// Priority levels and queue policies; `queue_size` is the default
    /// policy's bound.
    fn resolve_priorities(&self, queue_size: usize) -> Result<Priorities, String> {
        let db = self.dynamic_batching.as_ref();
        let levels = db.map_or(0, |d| d.priority_levels);
        let default_level = db.map_or(0, |d| d.default_priority_level);
        if levels > 0 && !(1..=levels).contains(&default_level) {
            return Err(format!(
                "default_priority_level {default_level} must be in 1..={levels} (priority_levels)"
            ));
        }
        if levels == 0 && default_level != 0 {
            return Err("default_priority_level needs priority_levels".into());
        }
        let resolve =
            |f: &QueuePolicyFile, size: usize, what: &str| -> Result<QueuePolicy, String> {
                let timeout_action = match f.timeout_action.as_deref() {
                    None | Some("reject") | Some("REJECT") => TimeoutAction::Reject,
                    Some("delay") | Some("DELAY") => TimeoutAction::Delay,
                    Some(o) => {
                        return Err(format!(
                            "{what}: timeout_action {o:?} is not \"reject\" or \"delay\""
                        ))
                    }
                };
                if size == 0 {
                    return Err(format!("{what}: max_queue_size must be >= 1"));
                }
                Ok(QueuePolicy {
                    timeout_action,
                    default_timeout: (f.default_timeout_us > 0)
                        .then(|| Duration::from_micros(f.default_timeout_us)),
                    allow_timeout_override: f.allow_timeout_override,
                    max_queue_size: size,
                })
            };
        let default_file = db.map_or_else(QueuePolicyFile::default, |d| QueuePolicyFile {
            timeout_action: d.timeout_action.clone(),
            default_timeout_us: d.default_timeout_us,
            allow_timeout_override: d.allow_timeout_override,
            max_queue_size: None,
        });
        let default = resolve(&default_file, queue_size, "default queue policy")?;
        let mut per_level = std::collections::BTreeMap::new();
        for (key, f) in db.map(|d| &d.priority_queue_policy).into_iter().flatten() {
            match key.parse::<u32>() {
                Ok(l) if (1..=levels).contains(&l) => {
                    per_level.insert(l, f);
                }
                _ => {
                    return Err(format!(
                        "priority_queue_policy for level {key:?}: levels are 1..={levels} (priority_levels)"
                    ))
                }
            }
        }
        let mut policies = Vec::new();
        for level in 1..=levels.max(1) {
            policies.push(match per_level.get(&level) {
                None => default.clone(),
                Some(f) => resolve(
                    f,
                    f.max_queue_size.unwrap_or(queue_size),
                    &format!("priority_queue_policy for level {level}"),
                )?,
            });
        }
        let triton_timeouts = policies
            .iter()
            .any(|p| p.default_timeout.is_some() || p.allow_timeout_override);
        Ok(Priorities {
            levels,
            default_level,
            policies,
            triton_timeouts,
        })
    }

    fn is_keyed_stateful(&self) -> bool {
        !self.sequence_state.is_empty()
            || self.window.is_some()
            || self.sequence
            || !self.sequence_control.is_empty()
    }
}

/// Checks the configured tensors against the graph, or derives them from it.
fn resolve_io(
    model: &str,
    kind: &str,
    configured: &[IoFile],
    graph: &[TensorSpec],
    max_batch_size: usize,
) -> Result<Vec<IoSpec>, ConfigError> {
    let err = |reason: String| ConfigError {
        model: model.to_string(),
        reason,
    };
    // The protocol-level dims of a graph tensor: without the batch dim when
    // batching, which must then be dynamic in the graph.
    let graph_dims = |spec: &TensorSpec| -> Result<Vec<i64>, ConfigError> {
        if max_batch_size == 0 {
            return Ok(spec.shape.clone());
        }
        if !spec.has_dynamic_first_dim() {
            return Err(err(format!(
                "{kind} {} has shape {:?}: max_batch_size > 0 needs a dynamic first dimension",
                spec.name, spec.shape
            )));
        }
        Ok(spec.shape[1..].to_vec())
    };
    if configured.is_empty() {
        return graph
            .iter()
            .map(|g| {
                Ok(IoSpec {
                    name: g.name.clone(),
                    datatype: g.datatype,
                    dims: graph_dims(g)?,
                    reshape: None,
                })
            })
            .collect();
    }
    let mut out = Vec::with_capacity(configured.len());
    for c in configured {
        let err = |reason: String| ConfigError {
            model: model.to_string(),
            reason: match &c.at {
                Some(at) => format!("{at}: {reason}"),
                None => reason,
            },
        };
        let datatype = DataType::parse(&c.datatype).ok_or_else(|| {
            err(format!(
                "{kind} {}: unknown datatype {:?}",
                c.name, c.datatype
            ))
        })?;
        let g = graph
            .iter()
            .find(|g| g.name == c.name)
            .ok_or_else(|| err(format!("{kind} {:?} is not in the model graph", c.name)))?;
        if g.datatype != datatype {
            return Err(err(format!(
                "{kind} {}: config says {datatype}, the graph says {}",
                c.name, g.datatype
            )));
        }
        if c.dims.iter().any(|&d| d < -1 || d == 0) {
            return Err(err(format!(
                "{kind} {}: dims must be positive or -1",
                c.name
            )));
        }
        let gd = graph_dims(g)?;
        if let Some(r) = &c.reshape {
            // Only a relabelling of the same bytes: both shapes fixed, the
            // same element count, and the model's matching the graph.
            let fixed = |d: &[i64]| d.iter().all(|&x| x > 0);
            // Checked: a dims list is client-written text, and an
            // overflowing product must be an error, not a panic.
            let count = |d: &[i64]| d.iter().try_fold(1i64, |a, &x| a.checked_mul(x));
            let graph_fits =
                gd.len() == r.len() && gd.iter().zip(r).all(|(&g, &r)| g < 0 || g == r);
            let same_count = count(&c.dims).is_some_and(|n| count(r) == Some(n));
            if !fixed(&c.dims) || !fixed(r) || !same_count || !graph_fits {
                return Err(err(format!(
                    "{kind} {}: reshape {:?} of dims {:?} needs both fixed, the same element count, and the graph's {:?}",
                    c.name, r, c.dims, gd
                )));
            }
            out.push(IoSpec {
                name: c.name.clone(),
                datatype,
                dims: c.dims.clone(),
                reshape: Some(r.clone()),
            });
            continue;
        }
        let compatible = gd.len() == c.dims.len()
            && gd
                .iter()
                .zip(&c.dims)
                .all(|(&g, &c)| g < 0 || c < 0 || g == c);
        if !compatible {
            return Err(err(format!(
                "{kind} {}: config dims {:?} do not match the graph's {:?}",
                c.name, c.dims, gd
            )));
        }
        // Keep the more specific of the two for every dim.
        let dims = gd
            .iter()
            .zip(&c.dims)
            .map(|(&g, &c)| if g >= 0 { g } else { c })
            .collect();
        out.push(IoSpec {
            name: c.name.clone(),
            datatype,
            dims,
            reshape: None,
        });
    }
    if kind == "input" && out.len() != graph.len() {
        let missing: Vec<_> = graph
            .iter()
            .filter(|g| !out.iter().any(|o| o.name == g.name))
            .map(|g| g.name.as_str())
            .collect();
        return Err(err(format!("config omits graph inputs {missing:?}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 784],
            }],
            outputs: vec![TensorSpec {
                name: "output".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 10],
            }],
        }
    }

    #[test]
    fn derives_io_from_graph_and_strips_batch_dim() {
        let f = ModelConfigFile::parse("m", "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 50\npreferred_batch_sizes = [4, 2, 4]\n").unwrap();
        let c = f.resolve("m", &graph()).unwrap();
        assert_eq!(c.inputs[0].dims, vec![784]);
        assert_eq!(c.outputs[0].dims, vec![10]);
        let db = c.dynamic_batching.unwrap();
        assert_eq!(db.preferred_batch_sizes, vec![2, 4]);
        assert_eq!(db.max_queue_delay, Duration::from_micros(50));
        assert_eq!(c.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
    }

    #[test]
    fn reshape_relabels_the_same_elements() {
        let resolve = |reshape: &str| {
            ModelConfigFile::parse(
                "m",
                &format!("max_batch_size = 8\n[[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = [28, 28]\nreshape = {reshape}\n"),
            )
            .unwrap()
            .resolve("m", &graph())
        };
        let c = resolve("[784]").unwrap();
        assert_eq!(c.inputs[0].dims, vec![28, 28]);
        assert_eq!(c.inputs[0].reshape, Some(vec![784]));
        for bad in ["[783]", "[28, 28]", "[-1]"] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.contains("reshape"), "{bad}: {e}");
        }
    }

    #[test]
    fn warmup_samples_resolve_against_the_inputs() {
        let resolve = |text: &str| {
            ModelConfigFile::parse("m", text)
                .unwrap()
                .resolve("m", &graph())
        };
        let c = resolve("max_batch_size = 8\n[[warmup]]\nname = \"z\"\nbatch_size = 8\ncount = 3\ninputs = [{ name = \"input\", datatype = \"FP32\", dims = [784], data = \"random\" }]\n").unwrap();
        assert_eq!(
            c.warmup,
            vec![WarmupSample {
                name: "z".into(),
                batch_size: 8,
                count: 3,
                inputs: vec![(vec![784], WarmupData::Random)],
            }]
        );
        for (bad, says) in [
            ("batch_size = 9\ninputs = [{ name = \"input\", datatype = \"FP32\", dims = [784], data = \"zero\" }]", "batch_size 9"),
            ("inputs = [{ name = \"input\", datatype = \"FP64\", dims = [784], data = \"zero\" }]", "FP64 in the sample"),
            ("inputs = [{ name = \"input\", datatype = \"FP32\", dims = [783], data = \"zero\" }]", "[783] do not fit"),
            ("inputs = [{ name = \"input\", datatype = \"FP32\", dims = [784], data = \"ones\" }]", "exactly one of"),
            ("inputs = []", "input \"input\" is missing"),
        ] {
            let e = resolve(&format!("max_batch_size = 8\n[[warmup]]\nname = \"w\"\n{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_sequence_model_left_to_the_graph_takes_its_batch_size_from_auto_complete() {
        let text = "backend: \"onnxruntime\"\nsequence_batching { max_sequence_idle_microseconds: 5000000 }\n";
        let read = crate::engine::pbtxt::parse("m", "m/config.pbtxt", text)
            .unwrap()
            .config;
        let with = |default_max_batch_size| ModelConfigFile {
            triton_autocomplete: Some(default_max_batch_size),
            ..read.clone()
        };
        // No size to fill in (shoal's default): refused, naming the block.
        let e = with(0).resolve("m", &graph()).unwrap_err().to_string();
        assert!(
            e.contains("sequence_batching needs max_batch_size > 0"),
            "{e}"
        );
        // Triton's default size: the sequence batcher, rows of keyed sequences.
        let c = with(4).resolve("m", &graph()).unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert!(c.sequence);
        assert_eq!(c.dynamic_batching, Some(DynamicBatching::default()));
        assert_eq!(c.inputs[0].dims, vec![784]);
    }

    #[test]
    fn triton_autocompletion_batches_only_a_batchable_onnx_graph() {
        let file = |mbs: u32, autocomplete: Option<u32>| ModelConfigFile {
            max_batch_size: mbs,
            // As config.pbtxt reads: no scheduler written means Triton's
            // default one, each request alone.
            batching: (mbs > 0).then(|| "none".to_string()),
            triton_autocomplete: autocomplete,
            ..Default::default()
        };
        // The default size, dims without the batch dimension, and the
        // dynamic batcher with no delay.
        let c = file(0, Some(4)).resolve("m", &graph()).unwrap();
        assert_eq!(c.max_batch_size, 4);
        assert_eq!(c.inputs[0].dims, vec![784]);
        assert_eq!(c.outputs[0].dims, vec![10]);
        assert_eq!(c.dynamic_batching, Some(DynamicBatching::default()));
        // A written size stays, and gets the dynamic batcher as in Triton;
        // a size of 1 keeps the default scheduler.
        let c = file(8, Some(0)).resolve("m", &graph()).unwrap();
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.dynamic_batching, Some(DynamicBatching::default()));
        let c = file(0, Some(1)).resolve("m", &graph()).unwrap();
        assert_eq!((c.max_batch_size, c.dynamic_batching), (1, None));
        // Not auto-completed (config.toml, a config that lists its I/O):
        // as written.
        let c = file(8, None).resolve("m", &graph()).unwrap();
        assert_eq!(c.dynamic_batching, None);
        let c = file(0, Some(0)).resolve("m", &graph()).unwrap();
        assert_eq!(
            (c.max_batch_size, c.inputs[0].dims.clone()),
            (0, vec![-1, 784])
        );
        // A graph whose inputs or outputs do not all start with a dynamic
        // dimension cannot batch (Triton's test), nor can a scalar.
        for (inp, out) in [
            (vec![1, 784], vec![-1, 10]),
            (vec![-1, 784], vec![1, 10]),
            (vec![], vec![-1]),
        ] {
            let g = Signature {
                inputs: vec![TensorSpec {
                    name: "input".into(),
                    datatype: DataType::Fp32,
                    shape: inp.clone(),
                }],
                outputs: vec![TensorSpec {
                    name: "output".into(),
                    datatype: DataType::Fp32,
                    shape: out,
                }],
            };
            let c = file(0, Some(4)).resolve("m", &g).unwrap();
            assert_eq!(c.max_batch_size, 0, "{inp:?}");
            assert!(c.dynamic_batching.is_none());
        }
        // Only ONNX models: Triton's PyTorch backend does not auto-complete.
        let torch = ModelConfigFile {
            platform: Some("pytorch_libtorch".into()),
            ..file(0, Some(4))
        };
        assert_eq!(torch.resolve("m", &graph()).unwrap().max_batch_size, 0);
        // A written batcher is kept, and checked against the filled size.
        let mut f = file(0, Some(4));
        f.dynamic_batching = Some(DynamicBatchingFile {
            preferred_batch_sizes: vec![2, 4],
            ..Default::default()
        });
        let c = f.resolve("m", &graph()).unwrap();
        assert_eq!(
            c.dynamic_batching.unwrap().preferred_batch_sizes,
            vec![2, 4]
        );
        f.dynamic_batching.as_mut().unwrap().preferred_batch_sizes = vec![8];
        let e = f.resolve("m", &graph()).unwrap_err().to_string();
        assert!(e.contains("max_batch_size (4)"), "{e}");
    }

    #[test]
    fn without_batching_dims_are_the_graph_shape() {
        let c = ModelConfigFile::default().resolve("m", &graph()).unwrap();
        assert_eq!(c.inputs[0].dims, vec![-1, 784]);
        assert!(c.dynamic_batching.is_none());
    }

    #[test]
    fn batching_default_objective_and_opt_out() {
        let resolve = |text: &str| {
            ModelConfigFile::parse("m", text)
                .unwrap()
                .resolve("m", &graph())
                .unwrap()
        };
        // A batching model with no knobs merges what queued, with no delay.
        let c = resolve("max_batch_size = 8\n");
        assert_eq!(c.dynamic_batching, Some(DynamicBatching::default()));
        assert_eq!(c.adaptive, None);
        assert_eq!(
            resolve("max_batch_size = 8\nbatching = \"none\"\n").dynamic_batching,
            None
        );
        let c = resolve("max_batch_size = 8\nlatency_objective_ms = 2.5\n[dynamic_batching]\nmax_queue_size = 7\n");
        assert_eq!(
            c.adaptive,
            Some(AdaptiveBatching {
                objective: Duration::from_micros(2500),
                shed_late: true
            })
        );
        assert_eq!(c.max_queue_size, 7);
        let c = resolve("max_batch_size = 8\nlatency_objective_ms = 1\nshed_late = false\n");
        assert!(!c.adaptive.unwrap().shed_late);
    }

    #[test]
    fn rejects_mismatches_with_clear_reasons() {
        let cases = [
            ("max_batch_size = 4\n[[input]]\nname = \"input\"\ndatatype = \"INT64\"\ndims = [784]\n", "graph says FP32"),
            ("max_batch_size = 4\n[[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = [783]\n", "do not match"),
            ("max_batch_size = 4\n[[input]]\nname = \"nope\"\ndatatype = \"FP32\"\ndims = [784]\n", "not in the model graph"),
            ("[dynamic_batching]\n", "needs max_batch_size"),
            ("max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]\n", "preferred batch size 8"),
            ("instance_count = 0\n", "instance_count"),
            ("max_batch_size = 4\nmax_queue_size = 0\n", "max_queue_size"),
            ("correlation_key_regex = \"(unclosed\"\n", "invalid correlation_key_regex"),
            ("routing = \"sticky\"\n", "routing \"sticky\""),
            ("max_batch_size = 4\n[[sequence_state]]\ninput = \"nope\"\noutput = \"output\"\n", "not a graph input"),
            ("[window]\ninput = \"input\"\nlength = 8\n", "need max_batch_size > 0"),
            ("max_batch_size = 4\nlatency_objective_ms = 0\n", "positive number"),
            ("max_batch_size = 4\nlatency_objective_ms = -2.5\n", "positive number"),
            ("max_batch_size = 4\nlatency_objective_ms = nan\n", "positive number"),
            ("max_batch_size = 4\nshed_late = false\n", "shed_late needs"),
            ("max_batch_size = 4\nlatency_objective_ms = 5\n[dynamic_batching]\nmax_queue_delay_us = 100\n", "drop max_queue_delay_us"),
            ("max_batch_size = 4\nbatching = \"none\"\nlatency_objective_ms = 5\n", "excludes"),
            ("max_batch_size = 4\nbatching = \"sometimes\"\n", "batching must be"),
        ];
        for (text, want) in cases {
            let e = ModelConfigFile::parse("m", text)
                .unwrap()
                .resolve("m", &graph())
                .unwrap_err();
            assert!(e.to_string().contains(want), "{text:?} gave {e}");
        }
        assert!(ModelConfigFile::parse("m", "bogus_key = 1")
            .unwrap_err()
            .to_string()
            .contains("bogus_key"));
    }

    fn spec(name: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn state_inputs_are_hidden_and_fed_by_the_server() {
        let g = Signature {
            inputs: vec![spec("x", &[-1, 4]), spec("h_in", &[-1, 4])],
            outputs: vec![spec("y", &[-1, 4]), spec("h_out", &[-1, 4])],
        };
        let f = ModelConfigFile::parse(
            "acc",
            "max_batch_size = 8\n[[sequence_state]]\ninput = \"h_in\"\noutput = \"h_out\"\ninitial = 1.5\n",
        )
        .unwrap();
        let c = f.resolve("acc", &g).unwrap();
        assert_eq!(
            c.inputs.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["x"]
        );
        assert_eq!(
            c.outputs
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>(),
            ["y"]
        );
        assert_eq!(
            c.graph_inputs,
            vec![
                ("x".to_string(), InputSource::Client(0)),
                ("h_in".to_string(), InputSource::State(0))
            ]
        );
        assert_eq!(c.states[0].dims, vec![4]);
        assert!(c.is_stateful());
        assert_eq!(c.routing, Routing::Affinity);
    }

    #[test]
    fn window_input_is_one_event_for_clients() {
        let g = Signature {
            inputs: vec![spec("positions", &[-1, 8, 2])],
            outputs: vec![spec("future", &[-1, 12, 2])],
        };
        let f = ModelConfigFile::parse(
            "t",
            "max_batch_size = 8\nrouting = \"random\"\n[window]\ninput = \"positions\"\nlength = 8\nwarmup = \"skip\"\n",
        )
        .unwrap();
        let c = f.resolve("t", &g).unwrap();
        assert_eq!(c.inputs[0].dims, vec![2]);
        assert_eq!(c.graph_inputs[0].1, InputSource::Window(0));
        let w = c.window.unwrap();
        assert_eq!(
            (w.length, w.warmup, w.event_dims),
            (8, Warmup::Skip, vec![2])
        );
        assert_eq!(c.routing, Routing::Random);
        let bad = ModelConfigFile::parse(
            "t",
            "max_batch_size = 8\n[window]\ninput = \"positions\"\nlength = 5\n",
        )
        .unwrap();
        assert!(bad
            .resolve("t", &g)
            .unwrap_err()
            .to_string()
            .contains("expected [5"));
    }

    #[test]
    fn batching_needs_dynamic_first_dim() {
        let mut g = graph();
        g.inputs[0].shape = vec![1, 784];
        let e = ModelConfigFile::parse("m", "max_batch_size = 4")
            .unwrap()
            .resolve("m", &g)
            .unwrap_err();
        assert!(e.to_string().contains("dynamic first dimension"), "{e}");
    }
}
