//! Inline execution (issue 18): a lone request that finds its replica idle
//! runs on the thread that received it, for a backend whose executions are
//! measured cheap, and only where the answer is the replica thread's.

use bytes::Bytes;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::Backend;
use shoal::engine::{Engine, EngineError, ModelConfigFile};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::sync::Arc;
use std::time::Duration;

/// Batches a replica measures before it lets a request run inline.
const MEASURED_FIRST: usize = 8;

fn engine_of(config: &str, make: impl Fn(Arc<MockLog>) -> MockBackend) -> (Engine, Arc<MockLog>) {
    let log = Arc::new(MockLog::default());
    let engine = make(log.clone()).serve("m", config).unwrap();
    (engine, log)
}

fn request(rows: usize, base: f32) -> InferRequest {
    let values: Vec<f32> = (0..rows).map(|i| base + i as f32).collect();
    InferRequest {
        model: "m".into(),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![rows as i64, 1],
            data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&values).to_vec()),
        }],
        ..Default::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    bytemuck::pod_collect_to_vec::<u8, f32>(&t.data)
}

fn inline_runs(engine: &Engine) -> u64 {
    engine.model("m", None).unwrap().inline_runs()
}

/// Sends `n` requests one after another; each answer must be `2x + 1`.
async fn sequential(engine: &Engine, n: usize) {
    for i in 0..n {
        let r = engine.infer(request(1, i as f32)).await.unwrap();
        assert_eq!(values(&r.outputs[0]), vec![2.0 * i as f32 + 1.0]);
    }
}

#[tokio::test]
async fn a_cheap_lone_request_runs_on_the_thread_that_received_it() {
    let me = std::thread::current().id();
    for config in ["", "max_batch_size = 4\n"] {
        let (engine, log) = engine_of(config, |log| MockBackend::new(1, Duration::ZERO, log));
        sequential(&engine, 40).await;
        let threads = log.threads.lock().clone();
        assert_eq!(threads.len(), 40);
        // The replica measures its cost first, on its own thread.
        let replica = threads[0];
        assert_ne!(replica, me);
        assert!(
            threads[..MEASURED_FIRST].iter().all(|t| *t == replica),
            "{config:?}: {threads:?}"
        );
        assert!(
            threads[MEASURED_FIRST..].iter().all(|t| *t == me),
            "{config:?}: {threads:?}"
        );
        assert_eq!(inline_runs(&engine), (40 - MEASURED_FIRST) as u64);
        engine.shutdown();
    }
}

#[tokio::test]
async fn an_expensive_model_never_runs_inline() {
    // 300 µs a run, past the default bound of 100 µs.
    let (engine, log) = engine_of("", |log| {
        MockBackend::new(1, Duration::from_micros(300), log)
    });
    sequential(&engine, 20).await;
    assert_eq!(inline_runs(&engine), 0);
    let threads = log.threads.lock();
    assert!(threads
        .iter()
        .all(|t| *t == threads[0] && *t != std::thread::current().id()));
    engine.shutdown();
}

#[tokio::test]
async fn a_zero_bound_or_a_batching_delay_keeps_every_run_on_the_replica() {
    for config in [
        "inline_execution_max_us = 0\n",
        // The lone request waits for company: it is not its own batch.
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 50\n",
        // An adaptive policy learns from every batch on its thread.
        "max_batch_size = 4\nlatency_objective_ms = 5\n",
    ] {
        let (engine, log) = engine_of(config, |log| MockBackend::new(1, Duration::ZERO, log));
        sequential(&engine, 20).await;
        assert_eq!(inline_runs(&engine), 0, "{config:?}");
        let threads = log.threads.lock();
        let me = std::thread::current().id();
        assert!(
            threads.iter().all(|t| *t == threads[0] && *t != me),
            "{config:?}"
        );
        engine.shutdown();
    }
}

#[test]
fn a_bound_past_ten_milliseconds_is_refused() {
    let err = MockBackend::new(1, Duration::ZERO, Default::default())
        .serve("m", "inline_execution_max_us = 20000\n")
        .unwrap_err();
    assert!(err.to_string().contains("inline_execution_max_us"), "{err}");
}

#[tokio::test]
async fn a_panic_inline_fails_its_request_and_the_replica_reloads() {
    let created = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let log = Arc::new(MockLog::default());
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", "").unwrap();
    let (l, n) = (log.clone(), created.clone());
    engine
        .add_version(
            "m",
            1,
            &file,
            Arc::new(move || {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Box::new(MockBackend::panicking_on(1, 666.0, l.clone())) as Box<dyn Backend>)
            }),
        )
        .unwrap();
    sequential(&engine, MEASURED_FIRST).await;
    let before = inline_runs(&engine);
    match engine.infer(request(1, 666.0)).await {
        Err(EngineError::Internal(m)) => assert!(m.contains("panicked"), "{m}"),
        other => panic!("expected INTERNAL: {other:?}"),
    }
    assert_eq!(
        inline_runs(&engine),
        before + 1,
        "the poisoned request ran inline"
    );
    // The replica thread loads a fresh backend, then serves again, inline
    // once more after it has measured the new one.
    let t = std::time::Instant::now();
    while created.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(t.elapsed() < Duration::from_secs(2), "never reloaded");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sequential(&engine, 5).await;
    engine.shutdown();
}

/// Under concurrency, requests that find the replica busy queue for it as
/// before; every answer is still its own request's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_run_inline_or_queue_and_each_gets_its_answer() {
    let (engine, log) = engine_of("max_batch_size = 8\n", |log| {
        MockBackend::new(1, Duration::ZERO, log)
    });
    sequential(&engine, MEASURED_FIRST).await;
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let e = engine.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    let x = (t * 1000 + i) as f32;
                    let r = e.infer(request(1, x)).await.unwrap();
                    assert_eq!(values(&r.outputs[0]), vec![2.0 * x + 1.0]);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rows: usize = log.batches.lock().iter().sum();
    assert_eq!(rows, MEASURED_FIRST + 1600);
    assert!(inline_runs(&engine) > 0);
    engine.shutdown();
}
