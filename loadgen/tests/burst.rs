//! Burst recovery against the backlog arithmetic, alone in its binary: cargo
//! runs the tests of one binary in parallel, and the real-FFNN tests beside
//! it would take the cores the synthetic processor needs to keep its pace.

use shoal_loadgen::analyze::{burst_recovery, summarize};
use shoal_loadgen::pipeline::{run, Experiment, Load};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
use std::time::Duration;

const SERVICE: Duration = Duration::from_millis(5);
const TASKS: usize = 2;

#[tokio::test]
async fn burst_recovery_matches_the_backlog_arithmetic() {
    // Capacity c = 2 tasks / service time (400 ev/s: the synthetic task
    // paces its sleeps so that overruns do not come off it); 100 ev/s with
    // 1 s bursts of 700 ev/s every 5 s. A burst leaves (700 - c) x 1 s of
    // backlog, which drains at c - 100 ev/s: 1 s at c = 400.
    let (base, burst) = (100.0, 700.0);
    let schedule = Schedule::Bursts {
        base,
        burst,
        burst_len: Duration::from_secs(1),
        period: Duration::from_secs(5),
    };
    let exp = Experiment {
        load: Load::Open(schedule.clone()),
        duration: Duration::from_secs(13),
        mp: TASKS,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 13,
        partition_capacity: 1 << 16,
        data: None,
    };
    let r = run(&exp, Scorer::synthetic(SERVICE)).await;
    assert!(summarize(&r, 0.0).reconciled);
    let capacity = TASKS as f64 / SERVICE.as_secs_f64();
    let expected = ((burst - capacity).max(0.0) / (capacity - base)).max(0.1);
    let rec = burst_recovery(&r, &schedule);
    assert_eq!(rec.len(), 2, "{rec:?}");
    for b in &rec {
        let t = b
            .recovery_s
            .unwrap_or_else(|| panic!("no recovery: {rec:?}"));
        // The 100 ms windows and the 20% band around the baseline p99 end a
        // recovery a little before the backlog is gone.
        assert!(
            (0.4 * expected - 0.2..=1.5 * expected + 0.5).contains(&t),
            "recovery {t} s against {expected:.2} s from capacity {capacity:.0} ev/s: {rec:?}"
        );
    }
}
