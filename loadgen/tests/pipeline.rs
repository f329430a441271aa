//! The pipeline end to end, in memory: every processor mode with the real
//! engine and the real FFNN, exact reconciliation, the sustainable-rate
//! search against a processor of known capacity, and a stall that shows in
//! the open-loop latency of every event scheduled during it. Burst recovery
//! has a binary of its own (`burst.rs`).

mod common;

use shoal_loadgen::analyze::summarize;
use shoal_loadgen::pipeline::{run, Experiment, Load};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
use shoal_loadgen::sustain::{search, Search};
use shoal_loadgen::{experiment, scorer_for, Mode, ModelOpts};
use std::time::Duration;

fn model_opts() -> ModelOpts {
    common::model_opts("ffnn", "model.onnx")
}

#[tokio::test]
async fn every_mode_scores_every_event_with_the_real_ffnn() {
    let m = model_opts();
    assert!(
        m.shoal_bin.as_ref().unwrap().exists(),
        "the shoal binary is built beside shoal-loadgen (cargo build --workspace)"
    );
    for mode in [Mode::Embedded, Mode::Grpc, Mode::Rest] {
        let setup = scorer_for(mode, &m).await.unwrap();
        let exp = experiment(&m, 2, 2.0, Load::Open(Schedule::Constant { rate: 300.0 }));
        let r = run(&exp, setup.scorer.clone()).await;
        let s = summarize(&r, 0.25);
        assert!(s.reconciled, "{mode:?}: {}", s.reconciliation_line());
        assert_eq!(
            s.scored,
            r.produced,
            "{mode:?}: {}",
            s.reconciliation_line()
        );
        assert!(
            (590..=610).contains(&r.produced),
            "{mode:?} produced {}",
            r.produced
        );
        assert!(s.p50_us > 0.0 && s.p99_us < 1_000_000.0, "{mode:?}: {s:?}");
    }
}

#[tokio::test]
async fn closed_loop_keeps_one_event_in_flight() {
    let exp = Experiment {
        load: Load::Closed,
        duration: Duration::from_secs(1),
        mp: 2,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 1,
        partition_capacity: 16,
        data: None,
    };
    let r = run(&exp, Scorer::synthetic(Duration::from_millis(5))).await;
    let s = summarize(&r, 0.0);
    assert!(s.reconciled);
    // 5 ms per event, one at a time: about 200 in a second, not 2 x 200.
    assert!((150..=205).contains(&r.produced), "{}", r.produced);
}

#[tokio::test]
async fn the_search_finds_a_known_capacity_within_ten_percent() {
    // Two tasks, 5 ms per event each: capacity 400 events/s.
    let base = Experiment {
        load: Load::Closed,
        duration: Duration::from_secs(3),
        mp: 2,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 3,
        partition_capacity: 1 << 16,
        data: None,
    };
    let s = Search {
        start_rate: 50.0,
        ..Search::default()
    };
    let found = search(&base, &Scorer::synthetic(Duration::from_millis(5)), &s).await;
    assert!(
        (360.0..=440.0).contains(&found.rate),
        "found {} after {:?}",
        found.rate,
        found.probes
    );
}

#[tokio::test]
async fn a_stall_shows_in_every_event_scheduled_during_it() {
    // 200 ev/s on one task, 1 ms each; event 200 (t = 1 s) stalls 1 s.
    let exp = Experiment {
        load: Load::Open(Schedule::Constant { rate: 200.0 }),
        duration: Duration::from_secs(3),
        mp: 1,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 5,
        partition_capacity: 1 << 16,
        data: None,
    };
    let stall = Duration::from_secs(1);
    let r = run(
        &exp,
        Scorer::Stall {
            service: Duration::from_millis(1),
            at_seq: 200,
            stall,
        },
    )
    .await;
    assert!(summarize(&r, 0.0).reconciled);
    let start = 1_000_000_000u64;
    let end = start + stall.as_nanos() as u64;
    let during: Vec<_> = r
        .records
        .iter()
        .filter(|x| x.scheduled_ns >= start && x.scheduled_ns < end)
        .collect();
    assert!(during.len() >= 190, "{}", during.len());
    for rec in during {
        // Each waits at least until the stall is over.
        let remaining = end - rec.scheduled_ns;
        assert!(
            rec.latency_ns + 2_000_000 >= remaining,
            "event at {} ns waited only {} ns",
            rec.scheduled_ns,
            rec.latency_ns
        );
    }
}

#[tokio::test]
async fn a_full_input_topic_rejects_and_the_books_still_balance() {
    let exp = Experiment {
        load: Load::Open(Schedule::Constant { rate: 2000.0 }),
        duration: Duration::from_secs(1),
        mp: 1,
        rows: 1,
        point_len: 4,
        keys: None,
        zipf: None,
        seed: 9,
        partition_capacity: 8,
        data: None,
    };
    let r = run(&exp, Scorer::synthetic(Duration::from_millis(10))).await;
    let s = summarize(&r, 0.0);
    assert!(r.input_rejected > 0);
    assert!(s.reconciled, "{}", s.reconciliation_line());
    assert_eq!(s.failed["rejected_at_input"], r.input_rejected);
    assert!(!s.sustainable());
}

#[tokio::test]
async fn npy_data_points_are_scored_by_the_real_ffnn() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("points.npy");
    let values: Vec<f32> = (0..5 * 784).map(|i| (i % 97) as f32 / 97.0).collect();
    shoal_loadgen::npy::write_f32(&path, &[5, 784], &values).unwrap();
    let mut m = model_opts();
    m.keys = None;
    let setup = scorer_for(Mode::Embedded, &m).await.unwrap();
    let mut exp = experiment(&m, 1, 1.0, Load::Open(Schedule::Constant { rate: 200.0 }));
    let data = shoal_loadgen::npy::payloads(&path, &[784], 2).unwrap();
    assert_eq!(data.len(), 3);
    exp.data = Some(std::sync::Arc::new(data));
    let r = run(&exp, setup.scorer.clone()).await;
    let s = summarize(&r, 0.0);
    assert!(
        s.reconciled && s.scored == r.produced && r.produced >= 190,
        "{}",
        s.reconciliation_line()
    );
}
