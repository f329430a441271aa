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
}

/// Handles for one model version.
pub struct ModelMetrics {
    labels: Vec<(&'static str, String)>,
    pub success: Counter,
    pub request_duration: Histogram,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub inference_count: Counter,
    pub execution_count: Counter,
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
            batch_size: metrics::histogram!(BATCH_SIZE, &labels),
            queue_depth: metrics::gauge!(QUEUE_DEPTH, &labels),
            inference_count: metrics::counter!(INFERENCE_COUNT, &labels),
            execution_count: metrics::counter!(EXECUTION_COUNT, &labels),
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
