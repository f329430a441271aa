//! Live figures of a running experiment, for the progress bar: rate
//! scored, backlog (sent but not yet through the sink) and the p99 of the
//! events that finished since the last look.

use hdrhistogram::Histogram;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Shared between the producer, the sink and whoever draws the bar.
#[derive(Debug)]
pub struct Live {
    sent: AtomicU64,
    done: AtomicU64,
    recent: Mutex<Histogram<u64>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            done: AtomicU64::new(0),
            recent: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
            ),
        }
    }
}

/// One look at a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub rate: f64,
    pub backlog: u64,
    /// p99 (ms) of the events finished since the previous snapshot.
    pub recent_p99_ms: f64,
}

impl Live {
    pub fn sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }

    pub fn done(&self, latency_ns: u64) {
        self.done.fetch_add(1, Relaxed);
        if let Ok(mut h) = self.recent.lock() {
            let _ = h.record((latency_ns / 1_000).max(1));
        }
    }

    /// Figures since the start (`elapsed`); resets the recent window.
    pub fn snapshot(&self, elapsed: Duration) -> Snapshot {
        let done = self.done.load(Relaxed);
        let sent = self.sent.load(Relaxed);
        let recent_p99_ms = match self.recent.lock() {
            Ok(mut h) => {
                let p = if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(0.99) as f64 / 1e3
                };
                h.reset();
                p
            }
            Err(_) => 0.0,
        };
        Snapshot {
            rate: done as f64 / elapsed.as_secs_f64().max(1e-9),
            backlog: sent.saturating_sub(done),
            recent_p99_ms,
        }
    }

    pub fn message(s: &Snapshot) -> String {
        format!(
            "{:.0} ev/s, backlog {}, p99 {:.2} ms",
            s.rate, s.backlog, s.recent_p99_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_report_rate_backlog_and_recent_tail() {
        let live = Live::default();
        for _ in 0..10 {
            live.sent();
        }
        for i in 0..4 {
            live.done(1_000_000 * (i + 1));
        }
        let s = live.snapshot(Duration::from_secs(2));
        assert_eq!(s.backlog, 6);
        assert!((s.rate - 2.0).abs() < 1e-9);
        assert!((s.recent_p99_ms - 4.0).abs() < 0.1, "{s:?}");
        // The window restarts after each look.
        assert_eq!(live.snapshot(Duration::from_secs(2)).recent_p99_ms, 0.0);
        assert!(
            Live::message(&s).starts_with("2 ev/s, backlog 6, p99 4.0"),
            "{}",
            Live::message(&s)
        );
    }
}
