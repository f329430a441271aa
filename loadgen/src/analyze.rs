//! From per-event records to what a person reads: throughput, latency
//! percentiles after a warm-up, exact reconciliation, and whether the load
//! was sustainable.

use crate::event::Outcome;
use crate::pipeline::RunResult;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub produced: u64,
    pub scored: u64,
    /// Failed events by reason, including those rejected at the input topic.
    pub failed: BTreeMap<String, u64>,
    /// produced == scored + failed, exactly.
    pub reconciled: bool,
    pub offered_rate: f64,
    /// Events scored per second, counted by end time after the warm-up.
    pub throughput: f64,
    pub warmup_s: f64,
    pub measured_events: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The median latency of the first and the last fifth of the run
    /// (warm-up included: a backlog that builds up from the start shows
    /// here even when it levels off later).
    pub early_p50_us: f64,
    pub late_p50_us: f64,
    /// Where end times came from (the broker's LogAppendTime or the sink).
    pub end_time: crate::pipeline::EndTime,
}

impl Summary {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Sustainable: everything offered is served (within 5%), nothing
    /// fails, and latency at the end is not running away from latency at
    /// the start (no growing backlog).
    pub fn sustainable(&self) -> bool {
        self.failed_total() == 0
            && self.throughput >= 0.95 * self.offered_rate
            && self.late_p50_us <= 2.0 * self.early_p50_us + 5_000.0
    }

    /// The line a run ends with.
    pub fn reconciliation_line(&self) -> String {
        format!(
            "reconciliation: produced {} = scored {} + failed {} ({}){}",
            self.produced,
            self.scored,
            self.failed_total(),
            self.failed
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            if self.reconciled { "" } else { "  MISMATCH" }
        )
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

pub fn summarize(r: &RunResult, warmup_fraction: f64) -> Summary {
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for (reason, n) in [
        ("rejected_at_input", r.input_rejected),
        ("transport_error_at_input", r.input_lost),
        ("transport_error_at_output", r.output_lost),
        ("malformed", r.malformed),
    ] {
        if n > 0 {
            failed.insert(reason.into(), n);
        }
    }
    let mut scored = 0u64;
    for rec in &r.records {
        match rec.outcome {
            Outcome::Scored => scored += 1,
            o => *failed.entry(o.as_str().into()).or_default() += 1,
        }
    }
    let failed_total: u64 = failed.values().sum();
    let dur_ns = r.duration.as_nanos() as u64;
    let warm_ns = (dur_ns as f64 * warmup_fraction.clamp(0.0, 0.9)) as u64;
    let mut h = hist();
    let mut early = hist();
    let mut late = hist();
    let fifth = dur_ns / 5;
    let mut completed_in_window = 0u64;
    for rec in r.records.iter().filter(|x| x.outcome == Outcome::Scored) {
        let end = rec.scheduled_ns + rec.latency_ns;
        if end >= warm_ns && end <= dur_ns {
            completed_in_window += 1;
        }
        let us = (rec.latency_ns / 1_000).max(1);
        if rec.scheduled_ns < fifth {
            let _ = early.record(us);
        } else if rec.scheduled_ns >= dur_ns.saturating_sub(fifth) {
            let _ = late.record(us);
        }
        if rec.scheduled_ns >= warm_ns {
            let _ = h.record(us);
        }
    }
    let window_s = (dur_ns - warm_ns) as f64 / 1e9;
    let q = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64
        }
    };
    Summary {
        produced: r.produced,
        scored,
        reconciled: r.produced == scored + failed_total,
        failed,
        offered_rate: r.offered_rate,
        throughput: completed_in_window as f64 / window_s.max(1e-9),
        warmup_s: warm_ns as f64 / 1e9,
        measured_events: h.len(),
        p50_us: q(&h, 0.5),
        p90_us: q(&h, 0.9),
        p99_us: q(&h, 0.99),
        p999_us: q(&h, 0.999),
        max_us: if h.is_empty() { 0.0 } else { h.max() as f64 },
        early_p50_us: q(&early, 0.5),
        late_p50_us: q(&late, 0.5),
        end_time: r.end_time,
    }
}

/// Mean and sample standard deviation.
pub fn spread(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// How one burst went: the p99 before it, and how long after its end the
/// p99 took to come back to that level (Crayfish's burst recovery time).
#[derive(Debug, Clone, Serialize)]
pub struct BurstRecovery {
    pub burst_start_s: f64,
    pub burst_end_s: f64,
    pub baseline_p99_us: f64,
    /// `None`: latency had not recovered before the next burst or the end.
    pub recovery_s: Option<f64>,
}

/// Width of the windows latency is followed in.
const WINDOW_NS: u64 = 100_000_000;

/// Burst recovery per burst of a `Bursts` schedule: windows of 100 ms by
/// scheduled time; the baseline is the p99 of the second before the burst;
/// recovered at the first window from the burst's end whose p99 is within
/// 20% (or 1 ms) of the baseline.
pub fn burst_recovery(r: &RunResult, schedule: &crate::schedule::Schedule) -> Vec<BurstRecovery> {
    let crate::schedule::Schedule::Bursts {
        burst_len, period, ..
    } = *schedule
    else {
        return Vec::new();
    };
    let dur = r.duration.as_nanos() as u64;
    let windows = dur.div_ceil(WINDOW_NS) as usize;
    let mut per_window: Vec<Histogram<u64>> = (0..windows).map(|_| hist()).collect();
    for rec in r.records.iter().filter(|x| x.outcome == Outcome::Scored) {
        if let Some(h) = per_window.get_mut((rec.scheduled_ns / WINDOW_NS) as usize) {
            let _ = h.record((rec.latency_ns / 1_000).max(1));
        }
    }
    let p99 = |from: u64, to: u64| {
        let mut h = hist();
        let (a, b) = (
            (from / WINDOW_NS) as usize,
            ((to / WINDOW_NS) as usize).min(windows),
        );
        for w in per_window.get(a..b).unwrap_or_default() {
            let _ = h.add(w);
        }
        (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64)
    };
    let period_ns = period.as_nanos() as u64;
    let mut out = Vec::new();
    let mut k = 0u64;
    loop {
        let start = k * period_ns + (period - burst_len).as_nanos() as u64;
        let end = (k + 1) * period_ns;
        if end > dur {
            break;
        }
        k += 1;
        let Some(baseline) = p99(start.saturating_sub(1_000_000_000), start) else {
            continue;
        };
        let limit = (baseline * 1.2).max(baseline + 1_000.0);
        let next_start = start + period_ns;
        let mut recovery = None;
        let mut w = end;
        while w + WINDOW_NS <= dur.min(next_start) {
            if p99(w, w + WINDOW_NS).is_some_and(|p| p <= limit) {
                recovery = Some((w - end) as f64 / 1e9);
                break;
            }
            w += WINDOW_NS;
        }
        out.push(BurstRecovery {
            burst_start_s: start as f64 / 1e9,
            burst_end_s: end as f64 / 1e9,
            baseline_p99_us: baseline,
            recovery_s: recovery,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Record;
    use std::time::Duration;

    fn result(records: Vec<Record>, produced: u64, rejected: u64) -> RunResult {
        RunResult {
            produced,
            input_rejected: rejected,
            input_lost: 0,
            output_lost: 0,
            malformed: 0,
            end_time: crate::pipeline::EndTime::SinkReceive,
            records,
            duration: Duration::from_secs(4),
            offered_rate: produced as f64 / 4.0,
        }
    }

    #[test]
    fn spread_is_mean_and_sample_deviation() {
        assert_eq!(spread(&[]), (0.0, 0.0));
        assert_eq!(spread(&[3.0]), (3.0, 0.0));
        let (m, sd) = spread(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
        assert!((m - 5.0).abs() < 1e-12 && (sd - 2.138_089_935).abs() < 1e-6);
    }

    #[test]
    fn reconciliation_is_exact() {
        let rec = |o| Record {
            scheduled_ns: 2_000_000_000,
            latency_ns: 1_000_000,
            outcome: o,
        };
        let s = summarize(
            &result(vec![rec(Outcome::Scored), rec(Outcome::TimedOut)], 3, 1),
            0.25,
        );
        assert!(s.reconciled, "{}", s.reconciliation_line());
        assert_eq!(s.failed_total(), 2);
        let lost = summarize(&result(vec![rec(Outcome::Scored)], 3, 1), 0.25);
        assert!(!lost.reconciled);
        assert!(lost.reconciliation_line().contains("MISMATCH"));
    }

    #[test]
    fn warmup_is_discarded_and_a_growing_backlog_is_unsustainable() {
        // 1000 events/s for 4 s; latency grows linearly: a backlog.
        let records: Vec<Record> = (0..4000u64)
            .map(|i| Record {
                scheduled_ns: i * 1_000_000,
                latency_ns: i * 100_000,
                outcome: Outcome::Scored,
            })
            .collect();
        let s = summarize(&result(records, 4000, 0), 0.25);
        assert_eq!(s.measured_events, 3000);
        assert!(s.late_p50_us > 2.0 * s.early_p50_us + 5_000.0);
        assert!(!s.sustainable());
        // Flat latency: sustainable.
        let flat: Vec<Record> = (0..4000u64)
            .map(|i| Record {
                scheduled_ns: i * 1_000_000,
                latency_ns: 2_000_000,
                outcome: Outcome::Scored,
            })
            .collect();
        let s = summarize(&result(flat, 4000, 0), 0.25);
        assert!(s.sustainable(), "{s:?}");
        assert!((s.p50_us - 2000.0).abs() < 10.0);
    }
}
