//! Backends benchmark: ONNX Runtime against TorchScript (libtorch) on the same weights, with the same intra-op
//! threads, batch and device, both in-process (the engine embedded) and through the real `shoal` binary over gRPC,
//! in one run so the ratios hold on a shared, noisy machine. Reports throughput, p50/p99, which execution provider
//! ran each model, and GPU memory before and after.
//!
//! `cargo bench -p shoal --features torch --bench backends [-- --quick] [-- --seconds N]`
//!
//! Knobs (environment): `SHOAL_BENCH_DEVICE` (`cpu`; e.g. `cuda:0`), `SHOAL_BENCH_MODELS` (`ffnn,resnet50`),
//! `SHOAL_BENCH_BATCHES` (rows per request; default 1,32 for FFNN and 1,4 for ResNet50 on the CPU),
//! `SHOAL_BENCH_THREADS` (intra-op threads of both backends, default 1), `SHOAL_BENCH_BACKENDS` (`onnx,torch`),
//! `SHOAL_BENCH_REPO` (where `<model>/1/model.onnx` live; `<model>_torch/1/model.pt` is traced there if missing).
//! A backend that cannot load on the device (say ONNX Runtime without its CUDA provider) is reported and skipped.

use bytes::Bytes;
use hdrhistogram::Histogram;
use shoal::engine::{Engine, EngineOptions};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Model {
    name: &'static str,
    dims: &'static [i64],
    out_dims: &'static [i64],
    cpu_batches: &'static [usize],
}

const MODELS: &[Model] = &[
    Model {
        name: "ffnn",
        dims: &[784],
        out_dims: &[10],
        cpu_batches: &[1, 32],
    },
    Model {
        name: "resnet50",
        dims: &[3, 224, 224],
        out_dims: &[1000],
        cpu_batches: &[1, 4],
    },
];

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
}

struct Cell {
    model: String,
    backend: &'static str,
    batch: usize,
    path: &'static str,
    provider: String,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Cell {
    fn rows_per_s(&self) -> f64 {
        (self.requests * self.batch as u64) as f64 / self.elapsed.as_secs_f64()
    }
    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1e3
    }
}

/// One closed loop: `warmup_calls` unmeasured calls (TorchScript's profiling executor optimizes the graph over the
/// first runs), then calls for `measure`.
async fn closed_loop<F, Fut>(
    warmup_calls: usize,
    measure: Duration,
    call: F,
) -> (Histogram<u64>, u64, u64, Duration)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..warmup_calls {
        call().await;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    let (mut ok, mut err) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < measure {
        let t = Instant::now();
        if call().await {
            ok += 1;
            hist.record(t.elapsed().as_micros().max(1) as u64).unwrap();
        } else {
            err += 1;
        }
    }
    (hist, ok, err, start.elapsed())
}

fn input(dims: &[i64], batch: usize) -> (Vec<i64>, Bytes) {
    let n: usize = batch * dims.iter().product::<i64>() as usize;
    let data: Vec<f32> = (0..n).map(|i| ((i % 251) as f32 / 251.0) - 0.5).collect();
    let mut shape = vec![batch as i64];
    shape.extend_from_slice(dims);
    (shape, Bytes::copy_from_slice(bytemuck::cast_slice(&data)))
}

/// A repository holding one model served by one backend, configured alike for both backends.
fn repo_for(
    src: &Path,
    m: &Model,
    backend: &str,
    device: &str,
    threads: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{}_{backend}", m.name);
    let vdir = dir.path().join(&name).join("1");
    std::fs::create_dir_all(&vdir).unwrap();
    let onnx = src.join(m.name).join("1/model.onnx");
    assert!(
        onnx.is_file(),
        "{} missing: run scripts/setup.sh (or models/generate.py)",
        onnx.display()
    );
    let (platform, file, target) = if backend == "onnx" {
        ("onnxruntime_onnx", "model.onnx", onnx)
    } else {
        let pt = src.join(format!("{}_torch/1/model.pt", m.name));
        if !pt.is_file() {
            shoal::backend::torch_export::export(m.name, &onnx, &pt)
                .expect("trace the TorchScript twin");
        }
        ("pytorch_libtorch", "model.pt", pt)
    };
    std::os::unix::fs::symlink(std::path::absolute(target).unwrap(), vdir.join(file)).unwrap();
    let cfg = format!(
        "platform = \"{platform}\"\nmax_batch_size = 64\nbatching = \"none\"\ninstance_count = 1\n\
         intra_op_threads = {threads}\ndevice = \"{device}\"\n\n\
         [[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = {:?}\n\n\
         [[output]]\nname = \"output\"\ndatatype = \"FP32\"\ndims = {:?}\n",
        m.dims, m.out_dims
    );
    std::fs::write(dir.path().join(&name).join("config.toml"), cfg).unwrap();
    dir
}

fn gpu_memory() -> String {
    let gpus = shoal::gpu::discover();
    if gpus.is_empty() {
        return "no GPU".into();
    }
    gpus.iter()
        .map(|g| {
            format!(
                "gpu{} {:.0} MiB used",
                g.index,
                g.memory_used_bytes as f64 / (1 << 20) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One model served by one backend, both in-process and by its own server, alive for the whole model's cells so
/// that the cells can be interleaved.
struct Contestant {
    backend: &'static str,
    name: String,
    engine: Engine,
    server: shoal::launch::Launched,
    channel: tonic::transport::Channel,
    provider_in: String,
    provider_srv: String,
    _repo: tempfile::TempDir,
}

async fn start(
    backend: &'static str,
    m: &Model,
    repo: tempfile::TempDir,
) -> Result<Contestant, String> {
    let name = format!("{}_{backend}", m.name);
    let engine = {
        let repo = repo.path().to_path_buf();
        tokio::task::spawn_blocking(move || Engine::load(&repo, &EngineOptions::default()))
            .await
            .unwrap()
            .map_err(|e| e.to_string())?
    };
    let provider_in = engine
        .model(&name, None)
        .map(|mv| {
            mv.replicas
                .iter()
                .map(|r| r.execution_provider.clone())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    // SHOAL_BIN: the server binary when this bench runs away from its build tree (scripts/gpu_bench.sh).
    let bin =
        std::env::var("SHOAL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_shoal").to_string());
    let server = shoal::launch::Launched::start(Path::new(&bin), repo.path(), &[], "warn")
        .map_err(|e| format!("server: {e}"))?;
    let md: serde_json::Value = reqwest::get(format!("{}/v2/models/{name}", server.http))
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let provider_srv = md["execution_providers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(Contestant {
        backend,
        name,
        engine,
        server,
        channel,
        provider_in,
        provider_srv,
        _repo: repo,
    })
}

/// One closed-loop slice of `measure` against a contestant, in-process or through its server.
async fn slice(
    c: &Contestant,
    server: bool,
    shape: &[i64],
    data: &Bytes,
    warmup: usize,
    measure: Duration,
) -> (Histogram<u64>, u64, u64, Duration) {
    if server {
        let req = pb::ModelInferRequest {
            model_name: c.name.clone(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: shape.to_vec(),
                ..Default::default()
            }],
            raw_input_contents: vec![data.clone()],
            ..Default::default()
        };
        closed_loop(warmup, measure, || {
            let mut client = GrpcInferenceServiceClient::new(c.channel.clone())
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            let req = req.clone();
            async move { client.model_infer(req).await.is_ok() }
        })
        .await
    } else {
        let tensor = Tensor {
            name: "input".into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
            data: data.clone(),
        };
        closed_loop(warmup, measure, || {
            let engine = c.engine.clone();
            let req = InferRequest {
                model: c.name.clone(),
                inputs: vec![tensor.clone()],
                ..Default::default()
            };
            async move { engine.infer(req).await.is_ok() }
        })
        .await
    }
}

/// Every (backend, path) cell of one model and batch, measured in `rounds` interleaved slices so that a noisy
/// neighbour weighs on all cells alike.
async fn measure_batch(
    m: &Model,
    contestants: &[Contestant],
    batch: usize,
    warmup: usize,
    measure: Duration,
    rounds: u32,
    cells: &mut Vec<Cell>,
) {
    let (shape, data) = input(m.dims, batch);
    let first = cells.len();
    for c in contestants {
        for server in [false, true] {
            slice(c, server, &shape, &data, warmup, Duration::ZERO).await;
            cells.push(Cell {
                model: m.name.into(),
                backend: c.backend,
                batch,
                path: if server { "server gRPC" } else { "in-process" },
                provider: if server {
                    c.provider_srv.clone()
                } else {
                    c.provider_in.clone()
                },
                requests: 0,
                errors: 0,
                elapsed: Duration::ZERO,
                hist: Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap(),
            });
        }
    }
    for _ in 0..rounds {
        let mut k = first;
        for c in contestants {
            for server in [false, true] {
                let (hist, ok, err, elapsed) =
                    slice(c, server, &shape, &data, 0, measure / rounds).await;
                let cell = &mut cells[k];
                cell.hist.add(hist).unwrap();
                cell.requests += ok;
                cell.errors += err;
                cell.elapsed += elapsed;
                k += 1;
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let seconds: f64 = args
        .windows(2)
        .find(|w| w[0] == "--seconds")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(if quick { 1.0 } else { 3.0 });
    let measure = Duration::from_secs_f64(seconds);
    let device = std::env::var("SHOAL_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let threads: usize = std::env::var("SHOAL_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let models =
        env_list("SHOAL_BENCH_MODELS").unwrap_or_else(|| vec!["ffnn".into(), "resnet50".into()]);
    let backends =
        env_list("SHOAL_BENCH_BACKENDS").unwrap_or_else(|| vec!["onnx".into(), "torch".into()]);
    let batches: Option<Vec<usize>> = env_list("SHOAL_BENCH_BATCHES").map(|v| {
        v.iter()
            .map(|b| b.parse().expect("SHOAL_BENCH_BATCHES"))
            .collect()
    });
    let src = std::env::var("SHOAL_BENCH_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "device {device}, {threads} intra-op threads, {seconds} s per cell; GPU memory before: {}",
        gpu_memory()
    );
    let mut cells = Vec::new();
    rt.block_on(async {
        for m in MODELS.iter().filter(|m| models.iter().any(|n| n == m.name)) {
            let batches = batches.clone().unwrap_or_else(|| m.cpu_batches.to_vec());
            let warmup = if m.name == "ffnn" { 50 } else { 3 };
            let mut contestants = Vec::new();
            for backend in ["onnx", "torch"] {
                if !backends.iter().any(|b| b == backend) {
                    continue;
                }
                let repo = repo_for(&src, m, backend, &device, threads);
                match start(backend, m, repo).await {
                    Ok(c) => contestants.push(c),
                    Err(e) => println!("skipped {} {backend} on {device}: {e}", m.name),
                }
            }
            println!("GPU memory with {} loaded: {}", m.name, gpu_memory());
            for &batch in &batches {
                measure_batch(m, &contestants, batch, warmup, measure, 5, &mut cells).await;
            }
            println!("GPU memory after {} ran: {}", m.name, gpu_memory());
            for c in contestants {
                c.server.sigterm();
                c.engine.shutdown();
            }
        }
    });
    println!("\n| model | backend | batch | path | provider | rows/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---:|---|---|---:|---:|---:|---:|");
    for c in &cells {
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {} |",
            c.model,
            c.backend,
            c.batch,
            c.path,
            c.provider,
            c.rows_per_s(),
            c.ms(0.5),
            c.ms(0.99),
            c.errors
        );
    }
    println!();
    let find = |model: &str, backend: &str, batch: usize, path: &str| {
        cells.iter().find(|c| {
            c.model == model && c.backend == backend && c.batch == batch && c.path == path
        })
    };
    for c in cells.iter().filter(|c| c.backend == "onnx") {
        if let Some(t) = find(&c.model, "torch", c.batch, c.path) {
            println!(
                "{} batch {} {}: TorchScript / ONNX Runtime throughput {:.2}x",
                c.model,
                c.batch,
                c.path,
                t.rows_per_s() / c.rows_per_s()
            );
        }
    }
    for c in cells.iter().filter(|c| c.path == "server gRPC") {
        if let Some(e) = find(&c.model, c.backend, c.batch, "in-process") {
            println!(
                "{} {} batch {}: server / in-process throughput {:.2}x",
                c.model,
                c.backend,
                c.batch,
                c.rows_per_s() / e.rows_per_s()
            );
        }
    }
}
