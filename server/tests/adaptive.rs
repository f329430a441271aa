//! Adaptive batching through the real engine: earliest-deadline-first
//! order and shedding with the mock backend, and the controller's metrics
//! from the real binary. The real FFNN against no batching and static
//! settings is in `adaptive_ffnn.rs`, a binary of its own so that no other
//! test shares the cores while it measures.

mod common;

use bytes::Bytes;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::Backend;
use shoal::engine::{Engine, EngineError, ErrorKind, ModelConfigFile};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn mock_engine(config: &str, delay: Duration) -> Engine {
    let log = Arc::new(MockLog::default());
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", config).unwrap();
    engine
        .add_version(
            "m",
            1,
            &file,
            Arc::new(move || {
                Ok(Box::new(MockBackend::new(2, delay, log.clone())) as Box<dyn Backend>)
            }),
        )
        .unwrap();
    engine
}

fn mock_request(tag: f32, deadline: Option<Duration>) -> InferRequest {
    InferRequest {
        model: "m".into(),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 2],
            data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&[tag, tag]).to_vec()),
        }],
        deadline: deadline.map(|d| Instant::now() + d),
        ..Default::default()
    }
}

#[tokio::test]
async fn requests_with_deadlines_run_earliest_deadline_first() {
    // One request per batch, 40 ms each, an objective far away: nothing is
    // shed, only the order changes.
    let engine = mock_engine(
        "max_batch_size = 1\nlatency_objective_ms = 60000\n",
        Duration::from_millis(40),
    );
    let order = Arc::new(Mutex::new(Vec::new()));
    let spawn = |tag: f32, deadline: Option<Duration>| {
        let (e, order) = (engine.clone(), order.clone());
        tokio::spawn(async move {
            let r = e.infer(mock_request(tag, deadline)).await;
            assert!(r.is_ok(), "{tag}: {r:?}");
            order.lock().unwrap().push(tag as u32);
        })
    };
    // The blocker occupies the replica while the others queue.
    let blocker = spawn(0.0, None);
    tokio::time::sleep(Duration::from_millis(15)).await;
    let a = spawn(1.0, None);
    tokio::time::sleep(Duration::from_millis(2)).await;
    let b = spawn(2.0, Some(Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(2)).await;
    let c = spawn(3.0, Some(Duration::from_secs(10)));
    for h in [blocker, a, b, c] {
        h.await.unwrap();
    }
    // Due: a at arrival + 60 s, b + 20 s, c + 10 s.
    assert_eq!(*order.lock().unwrap(), vec![0, 3, 2, 1]);
}

#[tokio::test]
async fn requests_that_cannot_make_the_objective_are_shed_before_running() {
    // 25 ms per batch of one, a 40 ms objective, eight queued at once: the
    // first runs; by then the others have waited 25 ms, and 25 + 25 > 40,
    // so they are shed rather than run late.
    let log_engine = mock_engine(
        "max_batch_size = 1\nlatency_objective_ms = 40\n",
        Duration::from_millis(25),
    );
    // Teach the controller the cost first.
    for _ in 0..3 {
        log_engine.infer(mock_request(0.0, None)).await.unwrap();
    }
    let t0 = Instant::now();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let e = log_engine.clone();
            tokio::spawn(async move { e.infer(mock_request(i as f32, None)).await })
        })
        .collect();
    let mut ok = 0;
    let mut shed = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e @ EngineError::Shed(_)) => {
                assert_eq!(e.kind(), ErrorKind::Overloaded);
                assert!(e.to_string().contains("latency objective"), "{e}");
                shed += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(ok >= 1 && shed >= 5, "ok {ok} shed {shed}");
    // Shed requests cost no compute: all of it took about one or two runs.
    assert!(
        t0.elapsed() < Duration::from_millis(25 * 4),
        "{:?}",
        t0.elapsed()
    );
    // The model keeps serving.
    log_engine.infer(mock_request(9.0, None)).await.unwrap();
}

#[tokio::test]
async fn the_real_binary_exports_the_controller_in_metrics() {
    let dir = common::ffnn_repo_with_config("max_batch_size = 64\nlatency_objective_ms = 5\n");
    let s = common::Server::start_with_repo(dir.path(), &[]);
    let c = reqwest::Client::new();
    let data: Vec<f32> = (0..784).map(|j| j as f32 / 784.0).collect();
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": data}]});
    for _ in 0..20 {
        let r = c
            .post(format!("{}/v2/models/ffnn/infer", s.http))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let text = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    let labels = "{model=\"ffnn\",version=\"1\",replica=\"0\"}";
    for needle in [
        format!("shoal_batch_target_size{labels}"),
        format!("shoal_batch_target_wait_seconds{labels}"),
        format!("shoal_objective_margin_ratio{labels}"),
        "shoal_objective_missed_total{model=\"ffnn\",version=\"1\"}".to_string(),
        "shoal_objective_shed_total{model=\"ffnn\",version=\"1\"} 0".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle} in\n{text}");
    }
    // The learned cost: both coefficients present, and a + b > 0 after
    // twenty runs.
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{labels}")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    let (a, b) = (
        value("shoal_batch_cost_fixed_seconds"),
        value("shoal_batch_cost_per_row_seconds"),
    );
    assert!(a >= 0.0 && b >= 0.0 && a + b > 0.0, "a {a} b {b}");
    // The CPU pressure it planned with: a share, whether or not this host
    // has PSI (0 where it has not).
    let p = value("shoal_batch_cpu_pressure_ratio");
    assert!((0.0..=1.0).contains(&p), "cpu pressure {p}");
    common::promtool_check(&text);
    assert_eq!(s.stop(), Some(0));
}
