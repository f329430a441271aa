//! The request path without the network, with the mock backend (no
//! compute, 784 FP32 inputs as the FFNN's):
//! - the engine alone (`Engine::infer`: lookup in the model table,
//!   validation, admission, routing, the replica or the inline run, the
//!   reply);
//! - the gRPC handler's work around it (protobuf bytes decoded,
//!   `decode_request`, the engine, `encode_response`, protobuf bytes
//!   encoded);
//! - the REST app as served (`rest_app::serve`: the router and every layer
//!   around it), fed the binary-extension request perf_analyzer sends, its
//!   answer's body collected; the same router with the layers applied per
//!   route (`Router::layer`, as shoal served it before); and the REST
//!   decoder alone on that request.
//!
//! Per request: wall and CPU µs, and heap allocations, counted by a wrapper
//! around the binaries' allocator (mimalloc). A fixed number of requests
//! per cell, so `perf stat` around it compares runs too.
//!
//! `cargo bench --bench hotpath` (`-- --requests N`, `-- --reps R`,
//! `-- --path engine|grpc|rest|rest-per-route|decode|ort`; `ort`, the
//! engine with the FFNN on ONNX Runtime, runs only when asked for;
//! `-- --concurrency C`: that one only; `-- --warmup W`: requests before
//! the cells, default N/10). `scripts/hotpath_instructions.sh` runs it
//! under callgrind for instructions per request.

use bytes::Bytes;
use http_body_util::BodyExt;
use prost::Message;
use shoal::api::grpc::{decode_request, encode_response, CallMeta};
use shoal::api::http as rest;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::Backend;
use shoal::engine::{Engine, ModelConfigFile};
use shoal::shm::SharedMemory;
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Heap allocations (and reallocations) since the start.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: forwards every call to the binaries' allocator unchanged; the counter has no
// effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { shoal::alloc::Mimalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { shoal::alloc::Mimalloc.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { shoal::alloc::Mimalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { shoal::alloc::Mimalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Models in the table besides the one requested: lookups see a realistic table.
const OTHER_MODELS: usize = 15;
const WIDTH: usize = 784;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Model `m` as the transport benchmarks serve the FFNN: the defaults (no
/// batching, one replica), among other models.
fn engine() -> Engine {
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", "").unwrap();
    let log = Arc::new(MockLog::default());
    for i in 0..=OTHER_MODELS {
        let name = if i == 0 {
            "m".to_string()
        } else {
            format!("other{i}")
        };
        let l = log.clone();
        engine
            .add_version(
                &name,
                1,
                &file,
                Arc::new(move || {
                    Ok(
                        Box::new(MockBackend::new(WIDTH as i64, Duration::ZERO, l.clone()))
                            as Box<dyn Backend>,
                    )
                }),
            )
            .unwrap();
    }
    engine
}

fn request() -> InferRequest {
    InferRequest {
        model: "m".into(),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, WIDTH as i64],
            data: Bytes::from(vec![0u8; 4 * WIDTH]),
        }],
        ..Default::default()
    }
}

/// A ModelInfer request as it arrives off the wire.
fn grpc_bytes() -> Bytes {
    shoal_proto::ModelInferRequest {
        model_name: "m".into(),
        inputs: vec![shoal_proto::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, WIDTH as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(vec![0u8; 4 * WIDTH])],
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// The JSON header perf_analyzer's HTTP client sends (captured with
/// strace), followed by the input's raw bytes.
const REST_HEADER: &str = r#"{"id":"","inputs":[{"name":"x","datatype":"FP32","shape":[1,784],"parameters":{"binary_data_size":3136}}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;

fn rest_body() -> Bytes {
    let mut b = REST_HEADER.as_bytes().to_vec();
    b.resize(REST_HEADER.len() + 4 * WIDTH, 0);
    b.into()
}

fn rest_request(body: &Bytes) -> axum::http::Request<axum::body::Body> {
    axum::http::Request::post("/v2/models/m/infer")
        .header("host", "127.0.0.1:8000")
        .header("user-agent", "libcurl-agent/1.0")
        .header("accept", "*/*")
        .header(rest::HEADER_LENGTH, REST_HEADER.len())
        .header("content-type", "application/octet-stream")
        .header("content-length", body.len())
        .body(axum::body::Body::from(body.clone()))
        .expect("a valid request")
}

#[derive(Clone)]
enum App {
    Served(Box<shoal::api::rest_app::RestApp>),
    PerRoute(axum::Router),
}

#[derive(Clone, Copy)]
enum Path {
    Engine,
    Grpc,
    Rest,
    /// The same router with the same layers applied the usual axum way,
    /// `Router::layer` (each route wrapped), and no direct infer route:
    /// how shoal served REST before `rest_app`.
    RestPerRoute,
    RestDecode,
    /// The engine with the FFNN on ONNX Runtime (shoal's defaults: no
    /// batching, one replica), `--path ort` only: it needs the model files.
    Ort,
}

/// One request through `path`; the answer's encoded length for gRPC.
async fn one(engine: &Engine, shm: &SharedMemory, wire: &Bytes, app: &App, path: Path) -> usize {
    match path {
        Path::Engine => {
            engine.infer(request()).await.expect("mock answers");
            0
        }
        Path::Grpc => {
            let msg = shoal_proto::ModelInferRequest::decode(wire.clone()).expect("valid protobuf");
            let (req, _) = decode_request(msg, CallMeta::default(), shm).expect("valid request");
            let resp = engine.infer(req).await.expect("mock answers");
            encode_response(resp, &[]).encode_to_vec().len()
        }
        Path::Ort => engine
            .infer(InferRequest {
                model: "ffnn".into(),
                inputs: vec![Tensor {
                    name: "input".into(),
                    datatype: DataType::Fp32,
                    shape: vec![1, WIDTH as i64],
                    data: wire.clone(),
                }],
                ..Default::default()
            })
            .await
            .expect("the FFNN answers")
            .outputs
            .len(),
        Path::RestDecode => {
            let mut h = axum::http::HeaderMap::new();
            h.insert(rest::HEADER_LENGTH, REST_HEADER.len().into());
            let r = rest::decode_rest_request("m", &h, wire.clone(), shm).unwrap();
            r.inputs.len()
        }
        Path::Rest | Path::RestPerRoute => {
            use tower::ServiceExt;
            let req = rest_request(wire);
            let resp = match app {
                App::Served(a) => (**a).clone().oneshot(req).await,
                App::PerRoute(r) => r.clone().oneshot(req).await,
            }
            .expect("the router is infallible");
            assert_eq!(resp.status(), 200, "the REST app answers");
            let body = resp.into_body().collect().await.expect("a body");
            body.to_bytes().len()
        }
    }
}

/// Requests the served model ran on the threads that submitted them.
fn inline_runs(engine: &Engine, path: Path) -> u64 {
    let model = if matches!(path, Path::Ort) {
        "ffnn"
    } else {
        "m"
    };
    engine.model(model, None).map_or(0, |m| m.inline_runs())
}

/// Wall µs, CPU µs, allocations per request and the share of requests run
/// inline, for `n` requests at `concurrency`.
async fn cell(engine: &Engine, path: Path, n: usize, concurrency: usize) -> (f64, f64, f64, f64) {
    let shm = Arc::new(SharedMemory::new());
    let wire = match path {
        Path::Rest | Path::RestPerRoute | Path::RestDecode => rest_body(),
        Path::Ort => Bytes::from(vec![0u8; 4 * WIDTH]),
        _ => grpc_bytes(),
    };
    let state = rest::HttpState {
        engine: engine.clone(),
        max_body_bytes: 64 << 20,
        shm: shm.clone(),
        shm_token: shoal::api::auth::Bearer::new(None),
    };
    let app = match path {
        Path::RestPerRoute => {
            use tower_http::compression::CompressionLayer;
            use tower_http::decompression::RequestDecompressionLayer;
            let per_route = rest::router(state)
                .layer(RequestDecompressionLayer::new().gzip(true).zstd(true))
                .layer(CompressionLayer::new().gzip(true).zstd(true))
                .layer(shoal::api::access::AccessLayer::new("http"));
            App::PerRoute(per_route)
        }
        _ => App::Served(Box::new(shoal::api::rest_app::serve(
            state.clone(),
            rest::router(state),
        ))),
    };
    let allocs = ALLOCATIONS.load(Relaxed);
    let inline = inline_runs(engine, path);
    let cpu = cpu_seconds();
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (e, shm, wire, app) = (engine.clone(), shm.clone(), wire.clone(), app.clone());
            let each = n / concurrency;
            tokio::spawn(async move {
                for _ in 0..each {
                    std::hint::black_box(one(&e, &shm, &wire, &app, path).await);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let cpu = (cpu_seconds() - cpu) * 1e6 / n as f64;
    let allocs = (ALLOCATIONS.load(Relaxed) - allocs) as f64 / n as f64;
    let inline = (inline_runs(engine, path) - inline) as f64 / n as f64;
    (wall, cpu, allocs, inline)
}

/// The FFNN of `model_repository` (run scripts/setup.sh first) with an
/// empty config.toml, on ONNX Runtime.
async fn ort_cells(n: usize, reps: usize, warmup: usize, concurrencies: &[usize]) {
    let dir = std::env::temp_dir().join(format!("hotpath-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("ffnn")).unwrap();
    let model =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository/ffnn/1");
    assert!(
        model.join("model.onnx").exists(),
        "run scripts/setup.sh first"
    );
    let _ = std::os::unix::fs::symlink(&model, dir.join("ffnn/1"));
    std::fs::write(dir.join("ffnn/config.toml"), "").unwrap();
    let engine = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            Engine::load(&dir, &shoal::engine::EngineOptions::default())
        })
        .await
        .unwrap()
        .expect("the FFNN loads")
    };
    if warmup > 0 {
        cell(&engine, Path::Ort, warmup, 8).await;
    }
    print_header(reps);
    print_rows(
        &engine,
        Path::Ort,
        "engine, FFNN on ONNX Runtime",
        n,
        reps,
        concurrencies,
    )
    .await;
    engine.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

fn print_header(reps: usize) {
    println!("| path | concurrency | requests | wall µs/req (median of {reps}) | CPU µs/req | allocations/req | run inline |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
}

/// One row per concurrency: the medians of `reps` cells of `n` requests.
async fn print_rows(
    engine: &Engine,
    path: Path,
    label: &str,
    n: usize,
    reps: usize,
    concurrencies: &[usize],
) {
    for &c in concurrencies {
        let (mut walls, mut cpus, mut allocs, mut inline) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let (w, cpu, a, i) = cell(engine, path, n, c).await;
            walls.push(w);
            cpus.push(cpu);
            allocs.push(a);
            inline.push(i);
        }
        println!(
            "| {label} | {c} | {n} | {:.2} | {:.2} | {:.1} | {:.0}% |",
            median(walls),
            median(cpus),
            median(allocs),
            median(inline) * 100.0
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse().ok())
            .unwrap_or(default)
    };
    let n = arg("--requests", 100_000);
    let reps = arg("--reps", 5).max(1);
    let warmup = arg("--warmup", n / 10);
    let concurrencies = match arg("--concurrency", 0) {
        0 => vec![1, 8, 64],
        c => vec![c],
    };
    // `--path engine|grpc|rest|rest-per-route|decode|ort`: one path only.
    let only = args
        .windows(2)
        .find(|w| w[0] == "--path")
        .map(|w| w[1].clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if only.as_deref() == Some("ort") {
        rt.block_on(ort_cells(n, reps, warmup, &concurrencies));
        return;
    }
    rt.block_on(async {
        let engine = engine();
        // Warm: threads started, allocator settled, replicas measured.
        if warmup > 0 {
            cell(&engine, Path::Grpc, warmup, 8).await;
        }
        print_header(reps);
        for (path, label) in [
            (Path::Engine, "engine"),
            (Path::Grpc, "gRPC handler"),
            (Path::Rest, "REST app"),
            (Path::RestPerRoute, "REST app, layers per route"),
            (Path::RestDecode, "REST decoder alone"),
        ] {
            let key = match path {
                Path::Engine => "engine",
                Path::Grpc => "grpc",
                Path::Rest => "rest",
                Path::RestPerRoute => "rest-per-route",
                Path::RestDecode => "decode",
                Path::Ort => "ort",
            };
            if only.as_deref().is_none_or(|o| o == key) {
                print_rows(&engine, path, label, n, reps, &concurrencies).await;
            }
        }
        engine.shutdown();
    });
}
