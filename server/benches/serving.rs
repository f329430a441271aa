//! Serving benchmark: FFNN and ResNet50 over gRPC (the real `shoal`
//! binary on loopback) against the same engine in-process, in one run so
//! the ratios are comparable on a shared, noisy machine.
//!
//! `cargo bench --bench serving` (add `-- --quick` for a short run,
//! `-- --seconds N` to change the measurement time per cell).

use bytes::Bytes;
use hdrhistogram::Histogram;
use shoal::engine::{Engine, EngineOptions};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line (11, 12 here).
    (ticks(11) + ticks(12)) / 100.0
}

struct Cell {
    name: String,
    /// CPU µs per request spent by the server process and by this process.
    server_cpu_us: Option<f64>,
    client_cpu_us: f64,
    concurrency: usize,
    requests: u64,
    rows_per_request: usize,
    elapsed: Duration,
    hist: Histogram<u64>,
    errors: u64,
}

impl Cell {
    fn throughput(&self) -> f64 {
        self.requests as f64 * self.rows_per_request as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64
    }
}

fn repo() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        p.join("resnet50/1/model.onnx").exists(),
        "run scripts/setup.sh first"
    );
    p
}

fn ffnn_request() -> (Vec<i64>, Bytes) {
    let data: Vec<f32> = (0..784).map(|i| (i % 255) as f32 / 255.0).collect();
    (
        vec![1, 784],
        Bytes::copy_from_slice(bytemuck::cast_slice(&data)),
    )
}

fn resnet_request() -> (Vec<i64>, Bytes) {
    let data: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| ((i % 251) as f32 / 251.0) - 0.5)
        .collect();
    (
        vec![1, 3, 224, 224],
        Bytes::copy_from_slice(bytemuck::cast_slice(&data)),
    )
}

/// Runs `concurrency` closed loops for `warmup + measure`, recording the
/// latency of requests that start after the warm-up.
async fn closed_loop<F, Fut>(
    name: String,
    server_pid: Option<u32>,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    call: F,
) -> Cell
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let me = std::process::id();
    let mut cpu_marks: Option<(f64, f64)> = None;
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut ok, mut err) = (0u64, 0u64);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let good = call(worker).await;
                if t >= measure_from {
                    if good {
                        ok += 1;
                        hist.record(t.elapsed().as_micros().max(1) as u64).unwrap();
                    } else {
                        err += 1;
                    }
                }
            }
            (hist, ok, err)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    cpu_marks.get_or_insert((cpu_seconds(me), server_pid.map_or(0.0, cpu_seconds)));
    tokio::time::sleep_until(end.into()).await;
    let (c0, s0) = cpu_marks.unwrap();
    let (c1, s1) = (cpu_seconds(me), server_pid.map_or(0.0, cpu_seconds));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut requests, mut errors) = (0, 0);
    for t in tasks {
        let (h, ok, err) = t.await.unwrap();
        hist.add(h).unwrap();
        requests += ok;
        errors += err;
    }
    let per_req = |secs: f64| secs * 1e6 / requests.max(1) as f64;
    Cell {
        name,
        server_cpu_us: server_pid.map(|_| per_req(s1 - s0)),
        client_cpu_us: per_req(c1 - c0),
        concurrency,
        requests,
        rows_per_request: 1,
        elapsed: measure,
        hist,
        errors,
    }
}

async fn grpc_cell(
    server_pid: u32,
    channels: &[Channel],
    model: &str,
    input: (Vec<i64>, Bytes),
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> Cell {
    let req = pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: input.0,
            ..Default::default()
        }],
        raw_input_contents: vec![input.1],
        ..Default::default()
    };
    let channels = channels.to_vec();
    closed_loop(
        format!("{model} grpc"),
        Some(server_pid),
        concurrency,
        warmup,
        measure,
        move |w| {
            let mut client = GrpcInferenceServiceClient::new(channels[w % channels.len()].clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20);
            let req = req.clone();
            async move { client.model_infer(req).await.is_ok() }
        },
    )
    .await
}

async fn engine_cell(
    engine: &Engine,
    model: &str,
    input: (Vec<i64>, Bytes),
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> Cell {
    let engine = engine.clone();
    let model_name = model.to_string();
    closed_loop(
        format!("{model} in-process"),
        None,
        concurrency,
        warmup,
        measure,
        move |_| {
            let engine = engine.clone();
            let req = InferRequest {
                model: model_name.clone(),
                inputs: vec![Tensor {
                    name: "input".into(),
                    datatype: DataType::Fp32,
                    shape: input.0.clone(),
                    data: input.1.clone(),
                }],
                ..Default::default()
            };
            async move { engine.infer(req).await.is_ok() }
        },
    )
    .await
}

fn start_server(repo: &std::path::Path) -> shoal::launch::Launched {
    shoal::launch::Launched::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_shoal")),
        repo,
        &[],
        "warn",
    )
    .expect("start shoal")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let seconds: u64 = args
        .windows(2)
        .find(|w| w[0] == "--seconds")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(if quick { 2 } else { 5 });
    let measure = Duration::from_secs(seconds);
    let warmup = Duration::from_secs(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let repo = repo();
        let server = start_server(&repo);
        let grpc = server.grpc.clone();
        let server_pid = server.child.id();
        let engine = {
            let repo = repo.clone();
            tokio::task::spawn_blocking(move || Engine::load(&repo, &EngineOptions::default()))
                .await
                .unwrap()
                .expect("load repository in-process")
        };
        let mut channels = Vec::new();
        for _ in 0..4 {
            channels.push(
                Channel::from_shared(grpc.clone())
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
        }
        let mut cells = Vec::new();
        for model in ["ffnn", "ffnn_nobatch"] {
            for c in [1, 64] {
                cells.push(grpc_cell(server_pid, &channels, model, ffnn_request(), c, warmup, measure).await);
                cells.push(engine_cell(&engine, model, ffnn_request(), c, warmup, measure).await);
            }
        }
        if !quick {
            cells.push(
                grpc_cell(
                    server_pid,
                    &channels,
                    "resnet50",
                    resnet_request(),
                    8,
                    warmup,
                    measure * 2,
                )
                .await,
            );
            cells.push(
                engine_cell(
                    &engine,
                    "resnet50",
                    resnet_request(),
                    8,
                    warmup,
                    measure * 2,
                )
                .await,
            );
        }
        server.sigterm();
        drop(server);
        engine.shutdown();

        println!("\n| cell | concurrency | rows/s | p50 µs | p99 µs | server CPU µs/req | client CPU µs/req | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for c in &cells {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {} |",
                c.name,
                c.concurrency,
                c.throughput(),
                c.p(0.5),
                c.p(0.99),
                c.server_cpu_us.map_or("-".to_string(), |v| format!("{v:.1}")),
                c.client_cpu_us,
                c.errors
            );
        }
        let find = |name: &str, conc: usize| {
            cells
                .iter()
                .find(|c| c.name == name && c.concurrency == conc)
        };
        println!();
        if let (Some(on), Some(off)) = (find("ffnn grpc", 64), find("ffnn_nobatch grpc", 64)) {
            println!(
                "ffnn gRPC c=64, batching on / off throughput: {:.2}x",
                on.throughput() / off.throughput()
            );
        }
        if let (Some(on), Some(off)) = (
            find("ffnn in-process", 64),
            find("ffnn_nobatch in-process", 64),
        ) {
            println!(
                "ffnn in-process c=64, batching on / off throughput: {:.2}x",
                on.throughput() / off.throughput()
            );
        }
        for m in ["ffnn", "ffnn_nobatch"] {
            if let (Some(g), Some(e)) = (
                find(&format!("{m} grpc"), 1),
                find(&format!("{m} in-process"), 1),
            ) {
                println!(
                    "{m} c=1 p50: gRPC {:.0} µs, in-process {:.0} µs, difference {:.0} µs",
                    g.p(0.5),
                    e.p(0.5),
                    g.p(0.5) - e.p(0.5)
                );
            }
        }
        if let (Some(g), Some(e)) = (find("resnet50 grpc", 8), find("resnet50 in-process", 8)) {
            println!(
                "resnet50 c=8 throughput, server / in-process: {:.3}",
                g.throughput() / e.throughput()
            );
        }
    });
}
