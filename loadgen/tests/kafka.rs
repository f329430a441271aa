//! The pipeline over a real Kafka-protocol broker: tansu, started here on a
//! loopback port chosen at run time (scripts/setup.sh builds it once).

use shoal_loadgen::analyze::summarize;
use shoal_loadgen::pipeline::{run_on, EndTime, Experiment, Load, Transport};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::scorer::Scorer;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tansu_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var("SHOAL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/shoal")
        });
    let p = home.join("tansu/bin/tansu");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it builds the tansu broker)",
        p.display()
    );
    p
}

struct Broker {
    child: Child,
    addr: String,
}

impl Broker {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        let addr = format!("127.0.0.1:{port}");
        let t = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "tansu did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
