//! Adaptive batching through the real engine: earliest-deadline-first
//! order and shedding with the mock backend, then the real FFNN through
//! ONNX Runtime against no batching and static settings.

mod common;

use bytes::Bytes;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::Backend;
use shoal::engine::{Engine, EngineError, ErrorKind, ModelConfigFile};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::path::Path;
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

/// A one-model repository with the FFNN and `config` as its config.toml.
fn ffnn_repo(config: &str) -> tempfile::TempDir {
    let src = common::model_repository().join("ffnn/1");
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("ffnn");
    std::fs::create_dir_all(&m).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(src).unwrap(), m.join("1")).unwrap();
    std::fs::write(
        m.join("config.toml"),
        format!("platform = \"onnxruntime_onnx\"\nintra_op_threads = 1\n{config}"),
    )
    .unwrap();
    dir
}

fn load(config: &str) -> Engine {
    let dir = ffnn_repo(config);
    Engine::load(Path::new(dir.path()), &Default::default()).unwrap()
}

fn ffnn_request(i: usize) -> InferRequest {
    let v: Vec<f32> = (0..784)
        .map(|j| ((i * 31 + j) % 97) as f32 / 97.0)
        .collect();
    InferRequest {
        model: "ffnn".into(),
        inputs: vec![Tensor {
            name: "input".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 784],
            data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&v).to_vec()),
        }],
        ..Default::default()
    }
}

/// p50 latencies of two engines at a load far below capacity: requests
/// one at a time, `gap` apart, alternating between the engines so both see
/// the same noise. A shed request (the machine stalled past the objective)
/// is not a latency sample.
async fn low_load_p50s(a: &Engine, b: &Engine, n: usize, gap: Duration) -> (Duration, Duration) {
    let mut lat = [Vec::with_capacity(n), Vec::with_capacity(n)];
    for i in 0..2 * n {
        let (e, side) = if i % 2 == 0 { (a, 0) } else { (b, 1) };
        let t = Instant::now();
        match e.infer(ffnn_request(i)).await {
            Ok(_) => lat[side].push(t.elapsed()),
            Err(EngineError::Shed(_)) => {}
            Err(err) => panic!("{err}"),
        }
        tokio::time::sleep(gap).await;
    }
    for l in &mut lat {
        l.sort();
    }
    (lat[0][lat[0].len() / 2], lat[1][lat[1].len() / 2])
}

/// Answered rows per second with `c` requests in flight for `secs`.
async fn closed_loop(engine: &Engine, c: usize, secs: f64) -> f64 {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..c)
        .map(|k| {
            let e = engine.clone();
            tokio::spawn(async move {
                let mut n = 0usize;
                let mut i = 0;
                while Instant::now() < stop {
                    // Under noise the controller may shed; only answers count.
                    match e.infer(ffnn_request(k + i)).await {
                        Ok(_) => n += 1,
                        Err(EngineError::Shed(_)) => {}
                        Err(err) => panic!("{err}"),
                    }
                    i += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / t0.elapsed().as_secs_f64()
}

/// One test, so the measurements never overlap another test's work; each
/// comparison alternates its contenders over several rounds and compares
/// medians, which a shared machine's noise moves least.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ffnn_adaptive_matches_no_batching_at_low_load_and_static_at_high_load() {
    let adaptive = load("max_batch_size = 64\nlatency_objective_ms = 5\n");
    let none = load("max_batch_size = 64\nbatching = \"none\"\n");
    low_load_p50s(&adaptive, &none, 50, Duration::ZERO).await;
    let (a50, n50) = low_load_p50s(&adaptive, &none, 1000, Duration::from_micros(300)).await;
    // 10%, with 5 µs for the timer's own resolution.
    assert!(
        a50 <= n50.mul_f64(1.10) + Duration::from_micros(5),
        "low load p50: adaptive {a50:?} vs no batching {n50:?}"
    );

    let statics = [
        load("max_batch_size = 64\n[dynamic_batching]\nmax_queue_delay_us = 0\n"),
        load("max_batch_size = 64\n[dynamic_batching]\nmax_queue_delay_us = 500\n"),
        load("max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 0\n"),
    ];
    // Throughput of the batching itself: shedding off, so a stall of the
    // shared machine past the objective does not count as lost work.
    let adaptive = load("max_batch_size = 64\nlatency_objective_ms = 5\nshed_late = false\n");
    closed_loop(&adaptive, 64, 0.3).await;
    // Short turns, interleaved, summed: drift in the machine's load hits
    // every contender alike.
    let (mut ad, mut st) = (0.0, [0.0; 3]);
    for _ in 0..6 {
        ad += closed_loop(&adaptive, 64, 0.25).await;
        for (i, s) in statics.iter().enumerate() {
            st[i] += closed_loop(s, 64, 0.25).await;
        }
    }
    let st = st.iter().copied().fold(0.0, f64::max);
    assert!(
        ad >= 0.9 * st,
        "high load: adaptive {ad:.0} rows/s vs best static {st:.0} (sums of 6 turns)"
    );
    eprintln!("low load p50 adaptive {a50:?} none {n50:?}; high load adaptive {ad:.0}/s best static {st:.0}/s");
}

#[tokio::test]
async fn the_real_binary_exports_the_controller_in_metrics() {
    let dir = ffnn_repo("max_batch_size = 64\nlatency_objective_ms = 5\n");
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
    let text = c
        .get(format!("{}/metrics", s.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    common::promtool_check(&text);
    assert_eq!(s.stop(), Some(0));
}
