//! The pipeline over a real Kafka-protocol broker: tansu, started here on a
//! loopback port chosen at run time (scripts/setup.sh builds it once).

mod common;

use shoal_loadgen::analyze::summarize;
use shoal_loadgen::pipeline::{run_on, EndTime, Experiment, Load, Transport};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
use shoal_loadgen::{experiment, scorer_for, Mode};
use std::time::Duration;

#[path = "../../server/tests/common/broker.rs"]
mod broker;
use broker::Broker;

#[tokio::test]
async fn events_go_through_kafka_and_the_books_balance() {
    let broker = Broker::start();
    let transport = Transport::Kafka {
        brokers: broker.addr.clone(),
    };
    let exp = Experiment {
        load: Load::Open(Schedule::Constant { rate: 500.0 }),
        duration: Duration::from_secs(2),
        mp: 2,
        rows: 1,
        point_len: 784,
        keys: Some(20),
        zipf: None,
        seed: 11,
        partition_capacity: 1 << 16,
        data: None,
    };
    let r = run_on(
        &exp,
        Scorer::synthetic(Duration::from_micros(200)),
        &transport,
    )
    .await
    .unwrap();
    let s = summarize(&r, 0.25);
    assert!(s.reconciled, "{}", s.reconciliation_line());
    assert_eq!(s.scored, r.produced, "{}", s.reconciliation_line());
    assert!((990..=1010).contains(&r.produced), "{}", r.produced);
    // tansu keeps the producer's CreateTime: end times are the sink's.
    assert_eq!(s.end_time, EndTime::SinkReceive);
    assert!(s.p50_us > 0.0 && s.p99_us < 2_000_000.0, "{s:?}");

    // Closed loop over Kafka too (fresh topics: the first fetch can take a
    // second, so give it three).
    let closed = Experiment {
        load: Load::Closed,
        duration: Duration::from_secs(3),
        ..exp
    };
    let r = run_on(&closed, Scorer::Noop, &transport).await.unwrap();
    let s = summarize(&r, 0.0);
    assert!(
        s.reconciled && r.produced > 5,
        "{}",
        s.reconciliation_line()
    );
}

#[tokio::test]
async fn kafka_native_mode_has_shoal_consume_the_topic_and_every_event_comes_back() {
    let broker = Broker::start();
    let mut m = common::model_opts("ffnn", "model.onnx");
    m.brokers = Some(broker.addr.clone());
    let setup = scorer_for(Mode::KafkaNative, &m).await.unwrap();
    // 2 partitions, 50 keys, 2 rows of 784 per event, raw tensors.
    let exp = experiment(&m, 2, 2.0, Load::Open(Schedule::Constant { rate: 400.0 }));
    let r = run_on(&exp, setup.scorer.clone(), &m.transport())
        .await
        .unwrap();
    let s = summarize(&r, 0.25);
    assert!(s.reconciled, "{}", s.reconciliation_line());
    assert_eq!(s.scored, r.produced, "{}", s.reconciliation_line());
    assert!((790..=810).contains(&r.produced), "{}", r.produced);
    assert!(s.p50_us > 0.0 && s.p99_us < 2_000_000.0, "{s:?}");

    // Closed loop: the sink's answer releases the next event.
    let closed = experiment(&m, 2, 1.0, Load::Closed);
    let r = run_on(&closed, setup.scorer.clone(), &m.transport())
        .await
        .unwrap();
    let s = summarize(&r, 0.0);
    assert!(
        s.reconciled && r.produced > 5 && s.scored == r.produced,
        "{}",
        s.reconciliation_line()
    );

    // Events shoal cannot score come back from the error topic: here the
    // warm-up's, whose 100 values are no whole row of the FFNN's 784.
    let mut bad = m.clone();
    bad.isz = vec![100];
    let exp = experiment(&bad, 1, 1.0, Load::Closed);
    let err = run_on(&exp, setup.scorer.clone(), &bad.transport())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("refused") && err.contains("invalid_argument"),
        "{err}"
    );

    // A stateful model with a state topic: shoal snapshots each key's
    // state per event, and every event still comes back scored.
    let mut keyed = common::model_opts("decay", "model.onnx");
    keyed.brokers = m.brokers.clone();
    (keyed.input, keyed.isz, keyed.bsz, keyed.kafka_state) = ("x".into(), vec![4], 1, true);
    let setup = scorer_for(Mode::KafkaNative, &keyed).await.unwrap();
    let exp = experiment(
        &keyed,
        2,
        1.0,
        Load::Open(Schedule::Constant { rate: 400.0 }),
    );
    let r = run_on(&exp, setup.scorer.clone(), &keyed.transport())
        .await
        .unwrap();
    let s = summarize(&r, 0.25);
    assert!(
        s.reconciled && s.scored == r.produced && r.produced > 300,
        "{}",
        s.reconciliation_line()
    );

    // Without a broker there is no topic for shoal to consume.
    m.brokers = None;
    let err = run_on(&exp, setup.scorer.clone(), &m.transport())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--brokers"), "{err}");
}
