//! Transport benchmark: the same ResNet50-sized request (1x3x224x224 FP32,
//! ~600 KB) over gRPC on TCP, gRPC on a Unix socket, and system shared
//! memory (tensors by reference, gRPC carrying only the metadata), at
//! concurrency 1 and 8, all against one `shoal` in one run.
//!
//! Two models: `identity_600k` (no compute, the output is as large as the
//! input, so the transport is all there is) and `resnet50` (the compute
//! dominates). The shared-memory client writes each input into its region
//! and reads each output back, as a real client would.
//!
//! `cargo bench --bench transport` (`-- --quick` for a short run,
//! `-- --seconds N` per cell).

use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper_util::rt::TokioIo;
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

const INPUT_SHAPE: [i64; 4] = [1, 3, 224, 224];
const INPUT_BYTES: usize = 3 * 224 * 224 * 4;
const CONCURRENCY: [usize; 2] = [1, 8];
/// Connections per transport; workers share them round-robin.
const CONNECTIONS: usize = 4;

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

struct Cell {
    model: &'static str,
    transport: &'static str,
    concurrency: usize,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    server_cpu_us: f64,
}

impl Cell {
    fn throughput(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64
    }
}

/// Runs `concurrency` closed loops; latencies count after `warmup`.
async fn closed_loop<F, Fut>(
    server_pid: u32,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    call: F,
) -> (u64, u64, Histogram<u64>, f64)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let measure_from = Instant::now() + warmup;
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
    let s0 = cpu_seconds(server_pid);
    tokio::time::sleep_until(end.into()).await;
    let s1 = cpu_seconds(server_pid);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut requests, mut errors) = (0, 0);
    for t in tasks {
        let (h, ok, err) = t.await.unwrap();
        hist.add(h).unwrap();
        requests += ok;
        errors += err;
    }
    let cpu_us = (s1 - s0) * 1e6 / requests.max(1) as f64;
    (requests, errors, hist, cpu_us)
}

fn input() -> Bytes {
    let data: Vec<f32> = (0..INPUT_BYTES / 4)
        .map(|i| ((i % 251) as f32 / 251.0) - 0.5)
        .collect();
    Bytes::copy_from_slice(bytemuck::cast_slice(&data))
}

fn param_str(s: &str) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(s.into())),
    }
}

fn param_int(v: usize) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(v as i64)),
    }
}

fn shm_params(region: &str, offset: usize, size: usize) -> HashMap<String, pb::InferParameter> {
    let mut m = HashMap::new();
    m.insert("shared_memory_region".into(), param_str(region));
    m.insert("shared_memory_offset".into(), param_int(offset));
    m.insert("shared_memory_byte_size".into(), param_int(size));
    m
}

/// One client's shared-memory object: the input at 0, the output after it.
struct Region {
    name: String,
    path: PathBuf,
    file: std::fs::File,
}

impl Drop for Region {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn uds_channel(path: PathBuf) -> Channel {
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
}

fn client(ch: &Channel) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

#[allow(clippy::too_many_arguments)]
async fn cell(
    server_pid: u32,
    model: &'static str,
    output_bytes: usize,
    transport: &'static str,
    channels: Vec<Channel>,
    regions: Option<Arc<Vec<Region>>>,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> Cell {
    let data = input();
    let (requests, errors, hist, server_cpu_us) =
        closed_loop(server_pid, concurrency, warmup, measure, move |w| {
            let mut c = client(&channels[w % channels.len()]);
            let data = data.clone();
            let regions = regions.clone();
            async move {
                let mut tensor = pb::model_infer_request::InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: INPUT_SHAPE.to_vec(),
                    ..Default::default()
                };
                let mut req = pb::ModelInferRequest {
                    model_name: model.into(),
                    ..Default::default()
                };
                let Some(regions) = regions else {
                    req.inputs = vec![tensor];
                    req.raw_input_contents = vec![data];
                    return match c.model_infer(req).await {
                        Ok(r) => r.into_inner().raw_output_contents[0].len() == output_bytes,
                        Err(_) => false,
                    };
                };
                let r = &regions[w];
                // What a client does: write the input, read the output.
                if r.file.write_all_at(&data, 0).is_err() {
                    return false;
                }
                tensor.parameters = shm_params(&r.name, 0, INPUT_BYTES);
                req.inputs = vec![tensor];
                req.outputs = vec![pb::model_infer_request::InferRequestedOutputTensor {
                    name: "output".into(),
                    parameters: shm_params(&r.name, INPUT_BYTES, output_bytes),
                }];
                if c.model_infer(req).await.is_err() {
                    return false;
                }
                let mut out = vec![0u8; output_bytes];
                r.file.read_exact_at(&mut out, INPUT_BYTES as u64).is_ok()
            }
        })
        .await;
    Cell {
        model,
        transport,
        concurrency,
        requests,
        errors,
        elapsed: measure,
        hist,
        server_cpu_us,
    }
}

async fn register_regions(
    ch: &Channel,
    model: &str,
    output_bytes: usize,
    n: usize,
) -> Arc<Vec<Region>> {
    let mut regions = Vec::new();
    for w in 0..n {
        let name = format!("bench_{model}_{w}");
        let key = format!("shoal_bench_{}_{name}", std::process::id());
        let path = PathBuf::from("/dev/shm").join(&key);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create a POSIX shared-memory object in /dev/shm");
        let size = INPUT_BYTES + output_bytes;
        file.set_len(size as u64).unwrap();
        client(ch)
            .system_shared_memory_register(pb::SystemSharedMemoryRegisterRequest {
                name: name.clone(),
                key: format!("/{key}"),
                offset: 0,
                byte_size: size as u64,
            })
            .await
            .expect("register shared memory");
        regions.push(Region { name, path, file });
    }
    Arc::new(regions)
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
    let warmup = Duration::from_millis(if quick { 300 } else { 1000 });
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        repo.join("identity_600k/1/model.onnx").exists()
            && repo.join("resnet50/1/model.onnx").exists(),
        "run scripts/setup.sh first"
    );
    // Only the two models, so the server starts fast.
    let light = tempfile::tempdir().unwrap();
    for m in ["identity_600k", "resnet50"] {
        std::os::unix::fs::symlink(repo.join(m), light.path().join(m)).unwrap();
    }
    let sock = light.path().join("grpc.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let server = shoal::launch::Launched::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_shoal")),
            light.path(),
            &["--grpc-uds", sock.to_str().unwrap()],
            "warn",
        )
        .expect("start shoal");
        let pid = server.child.id();
        let mut tcp = Vec::new();
        let mut uds = Vec::new();
        for _ in 0..CONNECTIONS {
            tcp.push(Channel::from_shared(server.grpc.clone()).unwrap().connect().await.unwrap());
            uds.push(uds_channel(sock.clone()));
        }
        let max_c = *CONCURRENCY.iter().max().unwrap();
        let mut cells = Vec::new();
        for (model, output_bytes, scale) in [("identity_600k", INPUT_BYTES, 1), ("resnet50", 4000, 2)] {
            let regions = register_regions(&uds[0], model, output_bytes, max_c).await;
            for c in CONCURRENCY {
                let m = measure * scale;
                let transports: [(&str, &Vec<Channel>, bool); 4] = [
                    ("grpc tcp", &tcp, false),
                    ("grpc uds", &uds, false),
                    ("shm + grpc tcp", &tcp, true),
                    ("shm + grpc uds", &uds, true),
                ];
                for (name, channels, shm) in transports {
                    let regions = shm.then(|| regions.clone());
                    cells.push(
                        cell(pid, model, output_bytes, name, channels.clone(), regions, c, warmup, m)
                            .await,
                    );
                }
            }
        }
        server.sigterm();
        drop(server);

        println!("\n| model | transport | concurrency | req/s | p50 µs | p99 µs | server CPU µs/req | errors |");
        println!("|---|---|---:|---:|---:|---:|---:|---:|");
        for c in &cells {
            println!(
                "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                c.model,
                c.transport,
                c.concurrency,
                c.throughput(),
                c.p(0.5),
                c.p(0.99),
                c.server_cpu_us,
                c.errors
            );
        }
        println!("\nRatios against gRPC on TCP (same model and concurrency): throughput ×, p50 ×");
        for base in cells.iter().filter(|c| c.transport == "grpc tcp") {
            let others: Vec<String> = cells
                .iter()
                .filter(|c| {
                    c.model == base.model && c.concurrency == base.concurrency && c.transport != "grpc tcp"
                })
                .map(|c| {
                    format!(
                        "{}: {:.2}x / {:.2}x",
                        c.transport,
                        c.throughput() / base.throughput(),
                        c.p(0.5) / base.p(0.5)
                    )
                })
                .collect();
            println!("{} c={}: {}", base.model, base.concurrency, others.join("; "));
        }
    });
}
