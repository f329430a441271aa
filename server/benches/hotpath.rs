//! The engine's own request path, without a real model: lookup in the
//! model table, validation, admission, routing, the replica queue and the
//! reply, through `Engine::infer` with the mock backend (no compute). A
//! fixed number of requests per cell, so `perf stat -e instructions:u`
//! around it gives instructions per request, which a busy shared machine
//! disturbs far less than time.
//!
//! `cargo bench --bench hotpath` (`-- --requests N`, `-- --reps R`).

use bytes::Bytes;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::Backend;
use shoal::engine::{Engine, ModelConfigFile};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Models in the table besides the one requested: lookups see a realistic table.
const OTHER_MODELS: usize = 15;

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn engine() -> Engine {
    let engine = Engine::new();
    let file = ModelConfigFile::parse("m", "max_batch_size = 8\ninstance_count = 2\n").unwrap();
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
                    Ok(Box::new(MockBackend::new(4, Duration::ZERO, l.clone()))
                        as Box<dyn Backend>)
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
            shape: vec![1, 4],
            data: Bytes::from(vec![0u8; 16]),
        }],
        ..Default::default()
    }
}

/// Wall and CPU µs per request for `n` requests at `concurrency`.
async fn cell(engine: &Engine, n: usize, concurrency: usize) -> (f64, f64) {
    let cpu = cpu_seconds();
    let t = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let e = engine.clone();
            let each = n / concurrency;
            tokio::spawn(async move {
                for _ in 0..each {
                    e.infer(request()).await.expect("mock answers");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let wall = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let cpu = (cpu_seconds() - cpu) * 1e6 / n as f64;
    (wall, cpu)
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let engine = engine();
        // Warm: threads started, allocator settled.
        cell(&engine, n / 10, 8).await;
        println!("| concurrency | requests | wall µs/req (median of {reps}) | CPU µs/req |");
        println!("|---:|---:|---:|---:|");
        for c in [1, 64] {
            let (mut walls, mut cpus) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let (w, cpu) = cell(&engine, n, c).await;
                walls.push(w);
                cpus.push(cpu);
            }
            println!("| {c} | {n} | {:.2} | {:.2} |", median(walls), median(cpus));
        }
        engine.shutdown();
    });
}
