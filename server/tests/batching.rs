//! The engine's batcher and admission, driven through `Engine::infer` with
//! the mock backend (`y = 2x + 1`), which logs the size of every batch.

use bytes::Bytes;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::{Backend, BackendError};
use shoal::engine::{Engine, EngineError, ModelConfigFile};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn engine_with(config: &str, width: i64, delay: Duration) -> (Engine, Arc<MockLog>) {
    engine_of(config, move |log| MockBackend::new(width, delay, log))
}

/// An engine serving model `m` from `config`, each replica's backend made
/// by `make` (given the shared batch log).
fn engine_of(
    config: &str,
    make: impl Fn(Arc<MockLog>) -> MockBackend + Send + Sync + 'static,
) -> (Engine, Arc<MockLog>) {
    let log = Arc::new(MockLog::default());
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", config).unwrap();
    let l = log.clone();
    engine
        .add_version(
            "m",
            1,
            &file,
            Arc::new(move || Ok(Box::new(make(l.clone())) as Box<dyn Backend>)),
        )
        .unwrap();
    (engine, log)
}

fn request(rows: usize, width: usize, base: f32) -> InferRequest {
    let values: Vec<f32> = (0..rows * width).map(|i| base + i as f32).collect();
    InferRequest {
        model: "m".into(),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![rows as i64, width as i64],
            data: Bytes::from(bytemuck::cast_slice::<f32, u8>(&values).to_vec()),
        }],
        ..Default::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    bytemuck::pod_collect_to_vec::<u8, f32>(&t.data)
}

#[tokio::test]
async fn merges_along_dim0_and_splits_back_exactly() {
    let (engine, log) = engine_with(
        "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 100000\n",
        2,
        Duration::ZERO,
    );
    let futs = [(1, 0.0), (2, 100.0), (3, 1000.0)].map(|(rows, base)| {
        let e = engine.clone();
        tokio::spawn(async move { (rows, base, e.infer(request(rows, 2, base)).await) })
    });
    for f in futs {
        let (rows, base, r) = f.await.unwrap();
        let out = &r.unwrap().outputs[0];
        assert_eq!(out.shape, vec![rows as i64, 2]);
        let want: Vec<f32> = (0..rows * 2)
            .map(|i| (base + i as f32) * 2.0 + 1.0)
            .collect();
        assert_eq!(values(out), want);
    }
    assert_eq!(
        *log.batches.lock(),
        vec![6],
        "the three requests share one batch of 6 rows"
    );
}

#[tokio::test]
async fn requests_with_different_dims_never_share_a_batch() {
    let (engine, log) = engine_with(
        "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 50000\n",
        -1,
        Duration::ZERO,
    );
    let a = engine.infer(request(1, 3, 0.0));
    let b = engine.infer(request(1, 5, 0.0));
    let c = engine.infer(request(2, 3, 0.0));
    let (a, b, c) = tokio::join!(a, b, c);
    assert_eq!(a.unwrap().outputs[0].shape, vec![1, 3]);
    assert_eq!(b.unwrap().outputs[0].shape, vec![1, 5]);
    assert_eq!(c.unwrap().outputs[0].shape, vec![2, 3]);
    let mut batches = log.batches.lock().clone();
    batches.sort();
    assert_eq!(
        batches,
        vec![1, 3],
        "width 3 rows merge (1+2), width 5 runs alone"
    );
}

#[tokio::test]
async fn waits_up_to_the_queue_delay_for_more() {
    let (engine, log) = engine_with(
        "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 150000\n",
        2,
        Duration::ZERO,
    );
    let t = Instant::now();
    engine.infer(request(1, 2, 0.0)).await.unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "ran after {waited:?}, before the delay"
    );
    assert!(
        waited < Duration::from_secs(2),
        "waited far too long: {waited:?}"
    );
    assert_eq!(*log.batches.lock(), vec![1]);
}

#[tokio::test]
async fn a_full_batch_does_not_wait_for_the_delay() {
    let (engine, log) = engine_with(
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 5000000\n",
        2,
        Duration::ZERO,
    );
    let t = Instant::now();
    let (a, b) = tokio::join!(
        engine.infer(request(2, 2, 0.0)),
        engine.infer(request(2, 2, 0.0))
    );
    a.unwrap();
    b.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a full batch waited {:?}",
        t.elapsed()
    );
    assert_eq!(*log.batches.lock(), vec![4]);
}

#[tokio::test]
async fn preferred_batch_size_runs_at_once() {
    let (engine, log) = engine_with(
        "max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 5000000\npreferred_batch_sizes = [4]\n",
        2,
        Duration::ZERO,
    );
    let t = Instant::now();
    let futs: Vec<_> = (0..4)
        .map(|i| engine.infer(request(1, 2, i as f32)))
        .collect();
    for r in futures::future::join_all(futs).await {
        r.unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "preferred batch waited {:?}",
        t.elapsed()
    );
    assert_eq!(*log.batches.lock(), vec![4]);
}

#[tokio::test]
async fn batching_none_runs_each_request_alone() {
    let (engine, log) = engine_with(
        "max_batch_size = 8\nbatching = \"none\"\n",
        2,
        Duration::from_millis(20),
    );
    let futs: Vec<_> = (0..3)
        .map(|i| engine.infer(request(2, 2, i as f32)))
        .collect();
    for r in futures::future::join_all(futs).await {
        r.unwrap();
    }
    assert_eq!(*log.batches.lock(), vec![2, 2, 2]);
}

#[tokio::test]
async fn default_batching_merges_what_queued_while_busy_with_no_delay() {
    // No [dynamic_batching]: the first request runs at once (no delay);
    // the ones that queue meanwhile run together next.
    let (engine, log) = engine_with("max_batch_size = 8\n", 2, Duration::from_millis(100));
    let first = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(1, 2, 0.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let rest: Vec<_> = (0..3)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move { e.infer(request(2, 2, i as f32)).await })
        })
        .collect();
    first.await.unwrap().unwrap();
    for r in rest {
        r.await.unwrap().unwrap();
    }
    assert_eq!(*log.batches.lock(), vec![1, 6]);
}

#[tokio::test]
async fn full_queue_rejects_at_once_and_loses_nothing() {
    let (engine, log) = engine_with(
        "max_batch_size = 1\nmax_queue_size = 2\n",
        1,
        Duration::from_millis(300),
    );
    let first = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(1, 1, 0.0)).await }
    });
    // Let the replica take the first request into execution.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move { e.infer(request(1, 1, i as f32)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t = Instant::now();
    let rejected = engine.infer(request(1, 1, 9.0)).await;
    assert!(
        matches!(rejected, Err(EngineError::Overloaded(_))),
        "{rejected:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "rejection blocked for {:?}",
        t.elapsed()
    );
    first.await.unwrap().unwrap();
    for q in queued {
        q.await.unwrap().unwrap();
    }
    assert_eq!(
        log.batches.lock().len(),
        3,
        "the three admitted requests all ran"
    );
    // Capacity is back once the queue drained.
    engine.infer(request(1, 1, 0.0)).await.unwrap();
}

#[tokio::test]
async fn expired_deadline_fails_without_running() {
    let (engine, log) = engine_with("max_batch_size = 1\n", 1, Duration::from_millis(300));
    let busy = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(1, 1, 0.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut late = request(1, 1, 5.0);
    late.deadline = Some(Instant::now() + Duration::from_millis(50));
    let t = Instant::now();
    let r = engine.infer(late).await;
    assert!(matches!(r, Err(EngineError::DeadlineExceeded)), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "answered after {:?}",
        t.elapsed()
    );
    busy.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        *log.batches.lock(),
        vec![1],
        "the expired request never reached the backend"
    );

    let mut past = request(1, 1, 0.0);
    past.deadline = Some(Instant::now());
    assert!(matches!(
        engine.infer(past).await,
        Err(EngineError::DeadlineExceeded)
    ));
}

/// A request past its deadline behind a head that waits for company (a
/// different shape, so not a candidate of its batch) leaves the queue when
/// the replica wakes for its deadline: kept, it would cut every later wait
/// short and the replica would spin until the head's batch runs.
#[tokio::test]
async fn an_expired_request_leaves_a_waiting_queue_at_its_deadline() {
    let (engine, log) = engine_with(
        "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 400000\npriority_levels = 2\ndefault_priority_level = 2\n",
        -1,
        Duration::ZERO,
    );
    // The late one queues first, so the replica's wait ends at its
    // deadline; the head comes next, ahead of it by priority.
    let mut late = with_priority(request(1, 5, 0.0), 2);
    late.deadline = Some(Instant::now() + Duration::from_millis(30));
    let late = engine.submit(late);
    let head = tokio::spawn(engine.submit(with_priority(request(1, 3, 0.0), 1)).wait());
    let r = late.wait().await;
    assert!(matches!(r, Err(EngineError::DeadlineExceeded)), "{r:?}");
    let model = engine.model("m", None).unwrap();
    let t = Instant::now();
    // Its place in the replica's load is given back when it leaves the
    // queue.
    while model.core.holds().loads[0] != 1 {
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "the expired request is still queued: {:?}",
            model.core.holds()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(!head.is_finished(), "the head still waits for company");
    head.await.unwrap().unwrap();
    assert_eq!(
        *log.batches.lock(),
        vec![1],
        "the expired request never ran"
    );
    assert!(model.core.holds().is_empty());
}

#[tokio::test]
async fn cancelled_request_is_dropped_before_compute() {
    let (engine, log) = engine_with("max_batch_size = 1\n", 1, Duration::from_millis(200));
    let busy = tokio::spawn({
        let e = engine.clone();
        async move { e.infer(request(1, 1, 0.0)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The client gives up while its request still waits in the queue.
    let gone =
        tokio::time::timeout(Duration::from_millis(30), engine.infer(request(1, 1, 1.0))).await;
    assert!(gone.is_err(), "the request should still be queued");
    busy.await.unwrap().unwrap();
    engine.infer(request(1, 1, 2.0)).await.unwrap();
    assert_eq!(
        *log.batches.lock(),
        vec![1, 1],
        "only the busy and the last request ran"
    );
}

#[tokio::test]
async fn backend_failure_reaches_every_request_of_the_batch() {
    let log = Arc::new(MockLog::default());
    let engine = Engine::new();
    let file = ModelConfigFile::parse(
        "m",
        "max_batch_size = 4\n[dynamic_batching]\nmax_queue_delay_us = 50000\n",
    )
    .unwrap();
    let l = log.clone();
    engine
        .add_version(
            "m",
            1,
            &file,
            Arc::new(move || Ok(Box::new(MockBackend::failing(1, l.clone())) as Box<dyn Backend>)),
        )
        .unwrap();
    let (a, b) = tokio::join!(
        engine.infer(request(1, 1, 0.0)),
        engine.infer(request(1, 1, 0.0))
    );
    for r in [a, b] {
        assert!(
            matches!(r, Err(EngineError::Internal(ref m)) if m.contains("mock failure")),
            "{r:?}"
        );
    }
    // The model keeps serving after a failed batch.
    assert_eq!(log.batches.lock().len(), 1);
}

#[tokio::test]
async fn replicas_share_keyless_load() {
    let (engine, log) = engine_with(
        "max_batch_size = 1\ninstance_count = 2\n",
        1,
        Duration::from_millis(100),
    );
    let t = Instant::now();
    let futs: Vec<_> = (0..4)
        .map(|i| engine.infer(request(1, 1, i as f32)))
        .collect();
    for r in futures::future::join_all(futs).await {
        r.unwrap();
    }
    // Four 100 ms executions on two replicas take about 200 ms, not 400.
    assert!(
        t.elapsed() < Duration::from_millis(380),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(log.batches.lock().len(), 4);
}

#[tokio::test]
async fn a_failing_backend_load_fails_the_model_load() {
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", "instance_count = 2\n").unwrap();
    let r = engine.add_version(
        "m",
        1,
        &file,
        Arc::new(|| {
            Err::<Box<dyn Backend>, _>(BackendError::Load {
                path: "x".into(),
                reason: "boom".into(),
            })
        }),
    );
    assert!(r.unwrap_err().to_string().contains("boom"));
    assert!(matches!(
        engine.model("m", None),
        Err(EngineError::NotFound(_))
    ));
}

/// Runs `req` in the background and records `label` when it is answered.
fn tracked(
    engine: &Engine,
    req: InferRequest,
    label: &'static str,
    done: &Arc<parking_lot::Mutex<Vec<&'static str>>>,
) -> tokio::task::JoinHandle<Result<(), EngineError>> {
    let (e, done) = (engine.clone(), done.clone());
    tokio::spawn(async move {
        let r = e.infer(req).await;
        done.lock().push(label);
        r.map(|_| ())
    })
}

fn with_priority(mut r: InferRequest, priority: u64) -> InferRequest {
    r.priority = priority;
    r
}

fn with_timeout(mut r: InferRequest, ms: u64) -> InferRequest {
    r.timeout = Some(Duration::from_millis(ms));
    r
}

#[tokio::test]
async fn priority_levels_run_the_highest_first_and_bound_each_level() {
    let (engine, log) = engine_with(
        "max_batch_size = 1\n[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 2\n[dynamic_batching.priority_queue_policy.2]\nmax_queue_size = 3\n",
        1,
        Duration::from_millis(100),
    );
    let done = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = tracked(&engine, request(1, 1, 0.0), "busy", &done);
    tokio::time::sleep(Duration::from_millis(30)).await;
    // Three of the default (low) level fill its queue; priority 0 and an
    // out-of-range priority mean the default level, as in Triton.
    let mut waiting = vec![
        tracked(&engine, request(1, 1, 1.0), "low1", &done),
        tracked(&engine, with_priority(request(1, 1, 2.0), 0), "low2", &done),
        tracked(&engine, with_priority(request(1, 1, 3.0), 9), "low3", &done),
    ];
    tokio::time::sleep(Duration::from_millis(10)).await;
    let t = Instant::now();
    let full = engine.infer(with_priority(request(1, 1, 4.0), 2)).await;
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    match &full {
        Err(e @ EngineError::Overloaded(_)) => {
            assert!(e.to_string().contains("priority level 2"), "{e}")
        }
        other => panic!("the low level's queue is full: {other:?}"),
    }
    // The high level has its own room, and runs first.
    waiting.push(tracked(
        &engine,
        with_priority(request(1, 1, 5.0), 1),
        "high1",
        &done,
    ));
    tokio::time::sleep(Duration::from_millis(5)).await;
    waiting.push(tracked(
        &engine,
        with_priority(request(1, 1, 6.0), 1),
        "high2",
        &done,
    ));
    busy.await.unwrap().unwrap();
    for w in waiting {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        *done.lock(),
        vec!["busy", "high1", "high2", "low1", "low2", "low3"]
    );
    assert_eq!(log.batches.lock().len(), 6);
    // Every level's slots came back.
    for _ in 0..3 {
        engine.infer(request(1, 1, 0.0)).await.unwrap();
    }
}

#[tokio::test]
async fn queue_timeout_rejects_unless_the_request_may_override_it() {
    // REJECT with a default timeout; the request's own timeout is ignored
    // (allow_timeout_override is off).
    let (engine, log) = engine_with(
        "max_batch_size = 1\n[dynamic_batching]\ndefault_timeout_us = 50000\n",
        1,
        Duration::from_millis(200),
    );
    let done = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = tracked(&engine, request(1, 1, 0.0), "busy", &done);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let r = engine.infer(with_timeout(request(1, 1, 1.0), 10_000)).await;
    match &r {
        Err(e @ EngineError::QueueTimeout(_)) => {
            assert!(e.to_string().contains("timeout expired"), "{e}");
            assert_eq!(e.kind(), shoal::engine::ErrorKind::Overloaded, "retryable");
        }
        other => panic!("the queue timeout expired: {other:?}"),
    }
    busy.await.unwrap().unwrap();
    assert_eq!(
        *log.batches.lock(),
        vec![1],
        "the timed-out request never ran"
    );

    // With the override allowed, each request's timeout is its own.
    let (engine, log) = engine_with(
        "max_batch_size = 1\n[dynamic_batching]\nallow_timeout_override = true\n",
        1,
        Duration::from_millis(200),
    );
    let busy = tracked(&engine, request(1, 1, 0.0), "busy", &done);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let patient = tracked(
        &engine,
        with_timeout(request(1, 1, 1.0), 5_000),
        "patient",
        &done,
    );
    let hasty = engine.infer(with_timeout(request(1, 1, 2.0), 50)).await;
    assert!(
        matches!(hasty, Err(EngineError::QueueTimeout(_))),
        "{hasty:?}"
    );
    busy.await.unwrap().unwrap();
    patient.await.unwrap().unwrap();
    assert_eq!(log.batches.lock().len(), 2);
}

#[tokio::test]
async fn queue_timeout_delay_moves_the_request_behind_the_others() {
    let (engine, log) = engine_with(
        "max_batch_size = 1\n[dynamic_batching]\ntimeout_action = \"delay\"\nallow_timeout_override = true\n",
        1,
        Duration::from_millis(150),
    );
    let done = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let busy = tracked(&engine, request(1, 1, 0.0), "busy", &done);
    tokio::time::sleep(Duration::from_millis(30)).await;
    let late = tracked(
        &engine,
        with_timeout(request(1, 1, 1.0), 20),
        "timed_out",
        &done,
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let other = tracked(&engine, request(1, 1, 2.0), "untimed", &done);
    for h in [busy, late, other] {
        h.await.unwrap().unwrap();
    }
    assert_eq!(*done.lock(), vec!["busy", "untimed", "timed_out"]);
    assert_eq!(log.batches.lock().len(), 3, "a delayed request still runs");
}

#[tokio::test]
async fn high_priority_keeps_its_latency_while_low_priority_is_shed() {
    // A saturated replica (2 ms per request, one at a time): 32 low-priority
    // clients against a low-level bound of 16, and one high-priority client.
    let (engine, _log) = engine_with(
        "max_batch_size = 1\n[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 2\n[dynamic_batching.priority_queue_policy.2]\nmax_queue_size = 16\n",
        1,
        Duration::from_millis(2),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let low: Vec<_> = (0..32)
        .map(|_| {
            let (e, stop, shed) = (engine.clone(), stop.clone(), shed.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    match e.infer(request(1, 1, 1.0)).await {
                        Ok(_) => lat.push(t.elapsed()),
                        Err(EngineError::Overloaded(_)) => {
                            shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut high = Vec::new();
    for _ in 0..60 {
        let t = Instant::now();
        engine
            .infer(with_priority(request(1, 1, 2.0), 1))
            .await
            .unwrap();
        high.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut low_lat = Vec::new();
    for h in low {
        low_lat.extend(h.await.unwrap());
    }
    let pct = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    let high_p99 = pct(&mut high, 0.99);
    let low_p50 = pct(&mut low_lat, 0.5);
    let shed = shed.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("high p99 {high_p99:?}, low p50 {low_p50:?}, low shed {shed}");
    assert!(shed > 0, "the low level was never full");
    // The high request waits for at most the batch in progress: two
    // executions (4 ms), against the low level's queue of sixteen (32 ms);
    // the bound leaves room for a loaded machine's scheduling.
    assert!(
        high_p99 < Duration::from_millis(15),
        "high p99 {high_p99:?}"
    );
    assert!(
        low_p50 > 2 * high_p99,
        "low p50 {low_p50:?}, high p99 {high_p99:?}"
    );
}

#[tokio::test]
async fn a_panicking_backend_fails_its_batch_and_the_replica_goes_on() {
    let log = Arc::new(MockLog::default());
    let created = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let engine = Engine::new();
    // A sequence model: keyed, so a panic must also free the key's turn.
    let file = ModelConfigFile::parse("m", "max_batch_size = 4\nsequence = true\n").unwrap();
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
    let keyed = |key: &str, v: f32| {
        let mut r = request(1, 1, v);
        r.correlation_key = Some(key.into());
        r
    };
    let r = engine.infer(keyed("a", 666.0)).await;
    match &r {
        Err(EngineError::Internal(m)) => assert!(m.contains("panicked"), "{m}"),
        other => panic!("expected INTERNAL: {other:?}"),
    }
    // The replica reloads its backend (after answering, so the client
    // does not wait on the reload) and serves; the key's next request is
    // not stuck behind the failed one.
    let t = Instant::now();
    while created.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(t.elapsed() < Duration::from_secs(2), "never reloaded");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(created.load(std::sync::atomic::Ordering::SeqCst), 2);
    let ok = engine.infer(keyed("a", 1.0)).await.unwrap();
    assert_eq!(values(&ok.outputs[0]), vec![3.0]);
    // Requests queued behind a panicking batch are all answered.
    let futs: Vec<_> = (0..6)
        .map(|i| {
            let e = engine.clone();
            let r = keyed(
                &format!("k{}", i % 3),
                if i == 2 { 666.0 } else { i as f32 },
            );
            tokio::spawn(async move { e.infer(r).await })
        })
        .collect();
    let mut failed = 0;
    for f in futs {
        match f.await.unwrap() {
            Ok(_) => {}
            Err(EngineError::Internal(_)) => failed += 1,
            Err(e) => panic!("{e}"),
        }
    }
    // The poisoned request's batch failed (it may have held others).
    assert!((1..=4).contains(&failed), "{failed}");
    engine.infer(keyed("k2", 5.0)).await.unwrap();
    assert!(created.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}

/// The batch watchdog (issue 16, property 8): a backend that hangs fails
/// its batch with UNAVAILABLE once the batch timeout passes, its replica
/// leaves readiness and the router's choice (keyless requests go to the
/// other replica), what was queued on it fails fast, and it serves again
/// once the backend returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_backend_fails_its_batch_and_leaves_service_until_it_returns() {
    let (engine, _log) = engine_of("max_batch_size = 4\ninstance_count = 2\n", |log| {
        MockBackend::hanging_on(1, 666.0, Duration::from_millis(2500), log)
    });
    let limit = Duration::from_millis(300);
    let watchdog = {
        let e = engine.clone();
        tokio::spawn(async move {
            loop {
                e.watch_batches(limit);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    assert!(engine.is_ready());
    let t = Instant::now();
    let hung = {
        let e = engine.clone();
        tokio::spawn(async move { e.infer(request(1, 1, 666.0)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Meanwhile the other replica serves keyless requests. One that was
    // queued behind the hung batch before the watchdog saw it fails with
    // UNAVAILABLE, and its retry is served.
    let mut retried = 0;
    for i in 0..20 {
        let r = loop {
            match engine.infer(request(1, 1, i as f32)).await {
                Err(EngineError::Unavailable(m)) if m.contains("is hung") && retried < 3 => {
                    retried += 1
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(values(&r.outputs[0]), vec![2.0 * i as f32 + 1.0]);
    }
    match hung.await.unwrap() {
        Err(EngineError::Unavailable(m)) => assert!(m.contains("batch timeout"), "{m}"),
        other => panic!("expected UNAVAILABLE: {other:?}"),
    }
    let failed_after = t.elapsed();
    assert!(
        failed_after >= limit && failed_after < Duration::from_millis(1500),
        "failed after {failed_after:?}"
    );
    assert!(!engine.is_ready(), "a hung replica keeps the server ready");
    let mv = engine.model("m", None).unwrap();
    assert!(!engine.version_ready(&mv));
    // A request queued on the hung replica itself fails fast.
    let stuck = mv.replicas.iter().position(|r| r.hung()).unwrap();
    let rx = mv.submit_to(request(1, 1, 5.0), Some(stuck)).unwrap();
    let t = Instant::now();
    match rx.await.unwrap() {
        Err(EngineError::Unavailable(m)) => assert!(m.contains("is hung"), "{m}"),
        other => panic!("expected UNAVAILABLE: {:?}", other.map(|_| ())),
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // While hung, keyless requests still land on the healthy replica.
    for i in 0..20 {
        engine.infer(request(1, 1, i as f32)).await.unwrap();
    }
    // The backend returns: the replica serves and readiness is back.
    let back = Instant::now();
    while !engine.is_ready() {
        assert!(back.elapsed() < Duration::from_secs(5), "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(engine.version_ready(&mv));
    let futs: Vec<_> = (0..8)
        .map(|i| {
            let e = engine.clone();
            tokio::spawn(async move { e.infer(request(1, 1, i as f32)).await })
        })
        .collect();
    for f in futs {
        f.await.unwrap().unwrap();
    }
    watchdog.abort();
}

/// Shutdown does not wait on a hung replica (its backend may never
/// return): the process can exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_on_a_hung_replica() {
    let (engine, _log) = engine_of("max_batch_size = 4\n", |log| {
        MockBackend::hanging_on(1, 666.0, Duration::from_secs(30), log)
    });
    let hung = {
        let e = engine.clone();
        tokio::spawn(async move { e.infer(request(1, 1, 666.0)).await })
    };
    let t = Instant::now();
    while engine.is_ready() {
        engine.watch_batches(Duration::from_millis(200));
        assert!(t.elapsed() < Duration::from_secs(5), "never marked hung");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        hung.await.unwrap(),
        Err(EngineError::Unavailable(_))
    ));
    let t = Instant::now();
    let e = engine.clone();
    tokio::task::spawn_blocking(move || e.shutdown())
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// One guard owns what an admitted request holds (issue 16 review): its
/// admission slots, its replica's load, its key's ticket. Whatever happens
/// to the requests (refused when full, queue timeouts, expired deadlines,
/// clients that leave, a backend that panics, a batch the watchdog fails,
/// requests queued behind it), once all are answered nothing is held: the
/// model admits a full queue again, the router sees idle replicas, and
/// every key's next request runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_held_after_every_kind_of_trouble() {
    let config = "max_batch_size = 4\ninstance_count = 2\n\
        [dynamic_batching]\nmax_queue_delay_us = 500\npriority_levels = 2\n\
        default_priority_level = 2\nmax_queue_size = 24\n\
        [dynamic_batching.priority_queue_policy.2]\nmax_queue_size = 12\n\
        timeout_action = \"reject\"\nallow_timeout_override = true\n";
    let (engine, _log) = engine_of(config, |log| {
        MockBackend::new(1, Duration::from_millis(2), log).troubled(
            13.0,
            666.0,
            Duration::from_millis(400),
        )
    });
    let watchdog = {
        let e = engine.clone();
        tokio::spawn(async move {
            loop {
                e.watch_batches(Duration::from_millis(150));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let outcomes = Arc::new(parking_lot::Mutex::new(std::collections::BTreeMap::<
        String,
        usize,
    >::new()));
    let clients: Vec<_> = (0..16u64)
        .map(|c| {
            let (e, outcomes) = (engine.clone(), outcomes.clone());
            tokio::spawn(async move {
                for i in 0..60u64 {
                    let n = c * 60 + i;
                    let value = match n % 97 {
                        5 | 50 => 13.0,
                        71 if n < 1000 => 666.0,
                        _ => (n % 11) as f32,
                    };
                    let mut r = request(1, 1, value);
                    if n % 3 == 0 {
                        r.correlation_key = Some(format!("k{}", n % 7));
                    }
                    r.priority = 1 + n % 2;
                    match n % 5 {
                        1 => r.deadline = Some(Instant::now() + Duration::from_millis(n % 4)),
                        2 => r.timeout = Some(Duration::from_micros(200 + 100 * (n % 9))),
                        _ => {}
                    }
                    let outcome = if n % 7 == 3 {
                        // A client that gives up: its request is dropped
                        // wherever it is.
                        match tokio::time::timeout(Duration::from_millis(1), e.infer(r)).await {
                            Err(_) => "left".to_string(),
                            Ok(r) => outcome_of(&r),
                        }
                    } else {
                        outcome_of(&e.infer(r).await)
                    };
                    *outcomes.lock().entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();
    let t = Instant::now();
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a request was never answered")
            .unwrap();
    }
    let outcomes = outcomes.lock().clone();
    eprintln!("960 requests in {:?}: {outcomes:?}", t.elapsed());
    // The mix reached each path it means to test.
    for kind in ["ok", "overloaded", "internal", "unavailable", "left"] {
        assert!(outcomes.contains_key(kind), "no {kind:?}: {outcomes:?}");
    }
    assert!(
        outcomes.contains_key("deadline") || outcomes.contains_key("queue_timeout"),
        "{outcomes:?}"
    );
    let mv = engine.model("m", None).unwrap();
    let t = Instant::now();
    // A hung batch's requests stay held until its backend returns.
    while !mv.core.holds().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "still held after every answer: {:?}",
            mv.core.holds()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Every key's turn came back: each key's next request runs at once.
    for k in 0..7 {
        let mut r = request(1, 1, 1.0);
        r.correlation_key = Some(format!("k{k}"));
        tokio::time::timeout(Duration::from_secs(2), engine.infer(r))
            .await
            .expect("a key's next request waits on a ticket never finished")
            .unwrap();
    }
    watchdog.abort();
    engine.shutdown();
}

fn outcome_of(r: &Result<shoal::InferResponse, EngineError>) -> String {
    match r {
        Ok(_) => "ok",
        Err(EngineError::Overloaded(_)) => "overloaded",
        Err(EngineError::Internal(_)) => "internal",
        Err(EngineError::Unavailable(_)) => "unavailable",
        Err(EngineError::DeadlineExceeded) => "deadline",
        Err(EngineError::QueueTimeout(_)) => "queue_timeout",
        Err(e) => return format!("other: {e}"),
    }
    .to_string()
}
