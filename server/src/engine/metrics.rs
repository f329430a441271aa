//! Metric names, buckets and per-model handles. Handles are created once
//! per model version so the hot path does no label formatting.

use metrics::{Counter, Gauge, Histogram};
use std::collections::HashMap;

pub const PREFIX: &str = "shoal";

pub const REQUEST_SUCCESS: &str = "shoal_request_success_total";
pub const REQUEST_FAILURE: &str = "shoal_request_failure_total";
pub const REQUEST_DURATION: &str = "shoal_request_duration_seconds";
pub const QUEUE_DURATION: &str = "shoal_queue_duration_seconds";
pub const COMPUTE_DURATION: &str = "shoal_compute_duration_seconds";
pub const BATCH_SIZE: &str = "shoal_batch_size";
pub const QUEUE_DEPTH: &str = "shoal_queue_depth";
pub const INFERENCE_COUNT: &str = "shoal_inference_count_total";
pub const EXECUTION_COUNT: &str = "shoal_execution_count_total";
pub const REPLICA_REQUESTS: &str = "shoal_replica_requests_total";
pub const REPLICA_INLINE: &str = "shoal_replica_inline_executions_total";
pub const INLINE_DURATION: &str = "shoal_inline_execution_seconds";
pub const REPLICA_PANICS: &str = "shoal_replica_panics_total";
pub const REPLICA_HANGS: &str = "shoal_replica_hangs_total";
pub const REPLICA_HUNG: &str = "shoal_replica_hung";
pub const REPLICA_QUEUE_DEPTH: &str = "shoal_replica_queue_depth";
pub const REPLICA_LIVE_KEYS: &str = "shoal_replica_live_keys";
pub const STATE_HITS: &str = "shoal_state_hits_total";
pub const STATE_MISSES: &str = "shoal_state_misses_total";
pub const STATE_MIGRATIONS: &str = "shoal_state_migrations_total";
pub const STATE_EVICTIONS: &str = "shoal_state_evictions_total";
pub const STATE_EXPIRATIONS: &str = "shoal_state_expirations_total";
pub const STATE_BYTES: &str = "shoal_state_bytes";
pub const OBJECTIVE_MISSED: &str = "shoal_objective_missed_total";
pub const OBJECTIVE_SHED: &str = "shoal_objective_shed_total";
pub const BATCH_TARGET: &str = "shoal_batch_target_size";
pub const BATCH_TARGET_WAIT: &str = "shoal_batch_target_wait_seconds";
pub const BATCH_COST_FIXED: &str = "shoal_batch_cost_fixed_seconds";
pub const BATCH_COST_PER_ROW: &str = "shoal_batch_cost_per_row_seconds";
pub const OBJECTIVE_MARGIN: &str = "shoal_objective_margin_ratio";
pub const CPU_PRESSURE: &str = "shoal_batch_cpu_pressure_ratio";

/// Buckets for the latency histograms, in seconds (50 µs to 10 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Buckets for the batch size histogram.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Describes every metric once, so `# HELP` lines carry units.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(REQUEST_SUCCESS, "Inference requests answered successfully");
    describe_counter!(REQUEST_FAILURE, "Inference requests that failed, by reason");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "End-to-end request time inside the engine"
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time a request waited in its replica queue"
    );
    describe_histogram!(
        COMPUTE_DURATION,
        Unit::Seconds,
        "Time one batch spent in the backend"
    );
    describe_histogram!(BATCH_SIZE, "Rows per executed batch");
    describe_gauge!(QUEUE_DEPTH, "Requests admitted and not yet executed");
    describe_counter!(INFERENCE_COUNT, "Rows inferred (a batch of n counts n)");
    describe_counter!(EXECUTION_COUNT, "Backend executions (a batch counts once)");
    describe_counter!(REPLICA_REQUESTS, "Requests executed by a replica");
    describe_counter!(
        REPLICA_INLINE,
        "Requests a replica's backend ran on a network thread instead of the replica thread (a lone request on an idle replica, then what queued behind it, for a cheap model)"
    );
    describe_histogram!(
        INLINE_DURATION,
        Unit::Seconds,
        "How long each inline run held a network thread: a request and the batches it drained after it (bounded by the model's inline_execution_max_us)"
    );
    describe_counter!(
        REPLICA_PANICS,
        "Batches whose execution panicked on a replica (their requests failed with INTERNAL; the backend was reloaded)"
    );
    describe_counter!(
        REPLICA_HANGS,
        "Batches that ran past --batch-timeout-secs on a replica (their requests failed with UNAVAILABLE)"
    );
    describe_gauge!(
        REPLICA_HUNG,
        "1 while a replica's batch runs past --batch-timeout-secs (the model is not ready), else 0"
    );
    describe_gauge!(
        REPLICA_QUEUE_DEPTH,
        "Requests queued or running on a replica"
    );
    describe_gauge!(REPLICA_LIVE_KEYS, "Keys whose state a replica holds");
    describe_counter!(STATE_HITS, "Keyed requests that found their key's state");
    describe_counter!(
        STATE_MISSES,
        "Keyed requests that started their key's state"
    );
    describe_counter!(STATE_MIGRATIONS, "Key states moved between replicas");
    describe_counter!(STATE_EVICTIONS, "Keys evicted to stay within max_keys");
    describe_counter!(STATE_EXPIRATIONS, "Keys expired after idle_timeout_s");
    describe_gauge!(STATE_BYTES, Unit::Bytes, "Bytes of keyed state held");
    describe_counter!(
        OBJECTIVE_MISSED,
        "Responses whose queue + compute time exceeded the latency objective"
    );
    describe_counter!(
        OBJECTIVE_SHED,
        "Requests rejected before running because they could no longer meet the latency objective or their deadline"
    );
    describe_gauge!(
        BATCH_TARGET,
        "Rows the adaptive batcher aims for on a replica at its last decision"
    );
    describe_gauge!(
        BATCH_TARGET_WAIT,
        Unit::Seconds,
        "Wait for more requests the adaptive batcher chose at its last decision"
    );
    describe_gauge!(
        BATCH_COST_FIXED,
        Unit::Seconds,
        "Learned cost of a batch on a replica: fixed part (a in a + b*rows)"
    );
    describe_gauge!(
        BATCH_COST_PER_ROW,
        Unit::Seconds,
        "Learned cost of a batch on a replica: per-row part (b in a + b*rows)"
    );
    describe_gauge!(
        OBJECTIVE_MARGIN,
        "Fraction of the latency objective the adaptive batcher plans with (its p99 correction)"
    );
    describe_gauge!(
        CPU_PRESSURE,
        "Share of recent time some thread waited for a CPU (Linux PSI), as the adaptive batcher reads it"
    );
}

/// Gauges of one replica's adaptive batcher.
pub struct ControllerMetrics {
    pub target: Gauge,
    pub wait: Gauge,
    pub cost_fixed: Gauge,
    pub cost_per_row: Gauge,
    pub margin: Gauge,
    pub cpu_pressure: Gauge,
}

impl ControllerMetrics {
    pub fn new(model: &str, version: &str, replica: usize) -> Self {
        let labels = replica_labels(model, version, replica);
        Self {
            target: metrics::gauge!(BATCH_TARGET, &labels),
            wait: metrics::gauge!(BATCH_TARGET_WAIT, &labels),
            cost_fixed: metrics::gauge!(BATCH_COST_FIXED, &labels),
            cost_per_row: metrics::gauge!(BATCH_COST_PER_ROW, &labels),
            margin: metrics::gauge!(OBJECTIVE_MARGIN, &labels),
            cpu_pressure: metrics::gauge!(CPU_PRESSURE, &labels),
        }
    }
}

/// The labels of every per-replica series.
fn replica_labels(model: &str, version: &str, replica: usize) -> [(&'static str, String); 3] {
    [
        ("model", model.to_string()),
        ("version", version.to_string()),
        ("replica", replica.to_string()),
    ]
}

/// Handles for one replica.
pub struct ReplicaMetrics {
    pub requests: Counter,
    pub inline: Counter,
    pub panics: Counter,
    pub hangs: Counter,
    pub hung: Gauge,
    pub queue_depth: Gauge,
    pub live_keys: Gauge,
}

impl ReplicaMetrics {
    pub fn new(model: &str, version: &str, replica: usize) -> Self {
        let labels = replica_labels(model, version, replica);
        Self {
            requests: metrics::counter!(REPLICA_REQUESTS, &labels),
            inline: metrics::counter!(REPLICA_INLINE, &labels),
            panics: metrics::counter!(REPLICA_PANICS, &labels),
            hangs: metrics::counter!(REPLICA_HANGS, &labels),
            hung: metrics::gauge!(REPLICA_HUNG, &labels),
            queue_depth: metrics::gauge!(REPLICA_QUEUE_DEPTH, &labels),
            live_keys: metrics::gauge!(REPLICA_LIVE_KEYS, &labels),
        }
    }
}

/// Handles mirroring a model's keyed-state counters.
pub struct StateMetrics {
    hits: Counter,
    misses: Counter,
    migrations: Counter,
    evictions: Counter,
    expirations: Counter,
    bytes: Gauge,
}

impl StateMetrics {
    pub fn new(model: &str, version: &str) -> Self {
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        Self {
            hits: metrics::counter!(STATE_HITS, &labels),
            misses: metrics::counter!(STATE_MISSES, &labels),
            migrations: metrics::counter!(STATE_MIGRATIONS, &labels),
            evictions: metrics::counter!(STATE_EVICTIONS, &labels),
            expirations: metrics::counter!(STATE_EXPIRATIONS, &labels),
            bytes: metrics::gauge!(STATE_BYTES, &labels),
        }
    }

    /// Copies the table's atomic counters into the exported metrics.
    pub fn sync(&self, c: &super::state::StateCounters) {
        use std::sync::atomic::Ordering::Relaxed;
        self.hits.absolute(c.hits.load(Relaxed));
        self.misses.absolute(c.misses.load(Relaxed));
        self.migrations.absolute(c.migrations.load(Relaxed));
        self.evictions.absolute(c.evictions.load(Relaxed));
        self.expirations.absolute(c.expirations.load(Relaxed));
        self.bytes.set(c.bytes.load(Relaxed) as f64);
    }
}

/// Handles for one model version.
pub struct ModelMetrics {
    labels: Vec<(&'static str, String)>,
    pub success: Counter,
    pub request_duration: Histogram,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub inline_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub inference_count: Counter,
    pub execution_count: Counter,
    pub objective_missed: Counter,
    pub objective_shed: Counter,
    failures: parking_lot::Mutex<HashMap<&'static str, Counter>>,
}

impl std::fmt::Debug for ModelMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelMetrics")
            .field("labels", &self.labels)
            .finish()
    }
}

impl ModelMetrics {
    pub fn new(model: &str, version: &str) -> Self {
        let labels = vec![
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        Self {
            success: metrics::counter!(REQUEST_SUCCESS, &labels),
            request_duration: metrics::histogram!(REQUEST_DURATION, &labels),
            queue_duration: metrics::histogram!(QUEUE_DURATION, &labels),
            compute_duration: metrics::histogram!(COMPUTE_DURATION, &labels),
            inline_duration: metrics::histogram!(INLINE_DURATION, &labels),
            batch_size: metrics::histogram!(BATCH_SIZE, &labels),
            queue_depth: metrics::gauge!(QUEUE_DEPTH, &labels),
            inference_count: metrics::counter!(INFERENCE_COUNT, &labels),
            execution_count: metrics::counter!(EXECUTION_COUNT, &labels),
            objective_missed: metrics::counter!(OBJECTIVE_MISSED, &labels),
            objective_shed: metrics::counter!(OBJECTIVE_SHED, &labels),
            failures: parking_lot::Mutex::new(HashMap::new()),
            labels,
        }
    }

    pub fn failure(&self, reason: &'static str) {
        let mut map = self.failures.lock();
        map.entry(reason)
            .or_insert_with(|| {
                let mut labels = self.labels.clone();
                labels.push(("reason", reason.to_string()));
                metrics::counter!(REQUEST_FAILURE, &labels)
            })
            .increment(1);
    }
}
