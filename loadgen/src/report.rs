//! Tables for people and JSON for scripts.

use crate::analyze::Summary;
use serde::Serialize;

/// One row of the `compare` table (Crayfish's Table 4).
#[derive(Debug, Clone, Serialize)]
pub struct CompareRow {
    pub mode: String,
    pub mp: usize,
    pub sustainable_rate: f64,
    pub summary: Option<Summary>,
}

pub fn summary_table(s: &Summary) -> String {
    format!(
        "| offered ev/s | throughput ev/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | scored | failed |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} |",
        s.offered_rate,
        s.throughput,
        s.p50_us / 1e3,
        s.p90_us / 1e3,
        s.p99_us / 1e3,
        s.p999_us / 1e3,
        s.max_us / 1e3,
        s.scored,
        s.failed_total()
    )
}

pub fn compare_table(rows: &[CompareRow]) -> String {
    let mut t = String::from(
        "| serving | mp | sustainable throughput ev/s | p50 ms | p99 ms (at that rate) |\n|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let (p50, p99) = r
            .summary
            .as_ref()
            .map_or((0.0, 0.0), |s| (s.p50_us / 1e3, s.p99_us / 1e3));
        t.push_str(&format!(
            "| {} | {} | {:.0} | {:.3} | {:.3} |\n",
            r.mode, r.mp, r.sustainable_rate, p50, p99
        ));
    }
    t
}
