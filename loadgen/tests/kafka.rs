//! The pipeline over a real Kafka-protocol broker: tansu, started here on a
//! loopback port chosen at run time (scripts/setup.sh builds it once).

use shoal_loadgen::analyze::summarize;
use shoal_loadgen::pipeline::{run_on, EndTime, Experiment, Load, Transport};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
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
        Scorer::Synthetic(Duration::from_micros(200)),
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
