//! Cumulative per-model-version statistics, as Triton's ModelStatistics
//! reports them (perf_analyzer reads them to split queue and compute time).

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and a cumulative duration.
#[derive(Debug, Default)]
pub struct Duration64 {
    pub count: AtomicU64,
    pub ns: AtomicU64,
}

impl Duration64 {
    pub fn add(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }
    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Relaxed), self.ns.load(Relaxed))
    }
}

/// Executions of one batch size: count and nanoseconds per phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub count: u64,
    pub input_ns: u64,
    pub infer_ns: u64,
    pub output_ns: u64,
}

#[derive(Debug, Default)]
pub struct ModelStats {
    pub success: Duration64,
    pub fail: Duration64,
    pub queue: Duration64,
    pub compute_input: Duration64,
    pub compute_infer: Duration64,
    pub compute_output: Duration64,
    pub inference_count: AtomicU64,
    pub execution_count: AtomicU64,
    pub last_inference_ms: AtomicU64,
    /// Per batch size: executions and their cumulative compute times.
    pub batches: Mutex<BTreeMap<usize, BatchStats>>,
}

impl ModelStats {
    /// Forgets everything counted so far: a warm-up is not traffic.
    pub fn reset(&self) {
        for d in [
            &self.success,
            &self.fail,
            &self.queue,
            &self.compute_input,
            &self.compute_infer,
            &self.compute_output,
        ] {
            d.count.store(0, Relaxed);
            d.ns.store(0, Relaxed);
        }
        self.inference_count.store(0, Relaxed);
        self.execution_count.store(0, Relaxed);
        self.last_inference_ms.store(0, Relaxed);
        self.batches.lock().clear();
    }

    pub fn record_execution(
        &self,
        rows: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        self.compute_input.add(input);
        self.compute_infer.add(infer);
        self.compute_output.add(output);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        self.execution_count.fetch_add(1, Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.last_inference_ms.store(now_ms, Relaxed);
        let mut b = self.batches.lock();
        let e = b.entry(rows).or_default();
        e.count += 1;
        e.input_ns += input.as_nanos() as u64;
        e.infer_ns += infer.as_nanos() as u64;
        e.output_ns += output.as_nanos() as u64;
    }
}
