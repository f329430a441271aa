//! Affinity benchmark: a keyed stateful workload (the accumulator, 4
//! replicas, 1,000 keys drawn uniformly) on the in-process engine, open
//! loop at a fraction of the measured capacity, for `affinity`,
//! `round_robin` and `random` routing in one run.
//!
//! `cargo bench --bench affinity` (`-- --seconds N`, `-- --load 0.7`,
//! `-- --keys 1000`). Latency counts from each request's scheduled send
//! time, so a stall cannot hide (no coordinated omission).

use bytes::Bytes;
use hdrhistogram::Histogram;
use shoal::engine::{Engine, EngineOptions};
use shoal::tensor::{DataType, Tensor};
use shoal::InferRequest;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

fn request(model: &str, key: u64) -> InferRequest {
    let x = [1.0f32, key as f32, 0.0, 0.0];
    InferRequest {
        model: model.into(),
        correlation_key: Some(format!("agent-{key}")),
        inputs: vec![Tensor {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 4],
            data: Bytes::copy_from_slice(bytemuck::cast_slice(&x)),
        }],
        ..Default::default()
    }
}

/// xorshift64*: a seeded, allocation-free key stream.
struct Keys(u64, u64);

impl Keys {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % self.1
    }
}

/// Closed loop with many clients: the most the engine sustains.
async fn capacity(engine: &Engine, model: &str, keys: u64, secs: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..256u64 {
        let (engine, model, done) = (engine.clone(), model.to_string(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = Keys(0x9e37_79b9 ^ ((c + 1) * 7919), keys);
            while Instant::now() < end {
                if engine.infer(request(&model, k.next())).await.is_ok() {
                    done.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Relaxed) as f64 / secs
}

fn migrations(engine: &Engine, model: &str) -> u64 {
    let mv = engine.model(model, None).unwrap();
    mv.core.keys.counters.migrations.load(Relaxed)
}

struct Run {
    policy: &'static str,
    offered: f64,
    achieved: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    migrations: u64,
    errors: u64,
}

async fn open_loop(
    engine: &Engine,
    model: &str,
    policy: &'static str,
    rate: f64,
    keys: u64,
    secs: f64,
) -> Run {
    let before = migrations(engine, model);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * secs) as u64;
    let start = Instant::now() + Duration::from_millis(20);
    // The generator has an OS thread of its own: on a runtime worker, a
    // generator that falls behind never yields and starves the tasks that
    // take the answers, which turns a small overload into a collapse.
    let runtime = tokio::runtime::Handle::current();
    let (engine2, model2) = (engine.clone(), model.to_string());
    let generator = std::thread::spawn(move || {
        let mut k = Keys(0x1234_5678_9abc_def1, keys);
        for i in 0..total {
            let scheduled = start + interval * i as u32;
            let now = Instant::now();
            if scheduled > now + Duration::from_micros(50) {
                std::thread::sleep(scheduled - now);
            }
            let submitted = engine2.submit(request(&model2, k.next()));
            let tx = tx.clone();
            runtime.spawn(async move {
                let ok = submitted.wait().await.is_ok();
                let _ = tx.send(ok.then(|| scheduled.elapsed().as_micros() as u64));
            });
        }
    });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut errors = 0;
    while let Some(r) = rx.recv().await {
        match r {
            Some(us) => hist.record(us.max(1)).unwrap(),
            None => errors += 1,
        }
    }
    generator.join().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let after = migrations(engine, model);
    Run {
        policy,
        offered: rate,
        achieved: hist.len() as f64 / elapsed,
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
        p999: hist.value_at_quantile(0.999),
        migrations: after - before,
        errors,
    }
}

fn main() {
    let secs: f64 = arg("--seconds", 5.0);
    let load: f64 = arg("--load", 0.7);
    let fixed_rate: f64 = arg("--rate", 0.0);
    let keys: u64 = arg("--keys", 1000);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        repo.join("accumulator/1/model.onnx").exists(),
        "run scripts/setup.sh first"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Only the three accumulator variants, 4 replicas each.
        let dir = tempfile::tempdir().unwrap();
        for m in ["accumulator", "accumulator_rr", "accumulator_random"] {
            std::os::unix::fs::symlink(repo.join(m), dir.path().join(m)).unwrap();
        }
        let path = dir.path().to_path_buf();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&path, &EngineOptions::default()))
            .await
            .unwrap()
            .unwrap();
        // Closed loop gives an upper bound; the sustainable rate is the
        // highest open-loop rate (generator included) that is served in full
        // with a bounded tail: step down by 15% until one holds.
        let upper = capacity(&engine, "accumulator", keys, 2.0).await;
        let mut cap = if fixed_rate > 0.0 { fixed_rate / load } else { upper };
        loop {
            if fixed_rate > 0.0 {
                break;
            }
            let probe = open_loop(&engine, "accumulator", "probe", cap, keys, 1.5).await;
            let holds = probe.achieved >= 0.97 * cap && probe.p99 < 20_000 && probe.errors == 0;
            println!(
                "  probe {cap:.0} req/s: achieved {:.0}, p99 {} µs{}",
                probe.achieved,
                probe.p99,
                if holds { " (sustainable)" } else { "" }
            );
            if holds || cap < 1_000.0 {
                break;
            }
            cap *= 0.85;
        }
        let rate = cap * load;
        println!(
            "closed-loop bound {upper:.0} req/s; sustainable (affinity, open loop) {cap:.0} req/s; offered load {:.0}%: {rate:.0} req/s",
            load * 100.0
        );
        let mut runs = Vec::new();
        let order: String = arg("--order", "affinity,round_robin,random".to_string());
        for policy in order.split(',') {
            let (policy, model) = match policy {
                "affinity" => ("affinity", "accumulator"),
                "round_robin" => ("round_robin", "accumulator_rr"),
                "random" => ("random", "accumulator_random"),
                other => panic!("unknown policy {other}"),
            };
            // A discarded warm-up at the same rate: the first open-loop run
            // after a phase change pays for allocator and runtime growth.
            open_loop(&engine, model, policy, rate, keys, 1.0).await;
            runs.push(open_loop(&engine, model, policy, rate, keys, secs).await);
        }
        println!("\n| routing | offered req/s | achieved req/s | p50 µs | p99 µs | p99.9 µs | migrations | errors |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &runs {
            println!(
                "| {} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
                r.policy, r.offered, r.achieved, r.p50, r.p99, r.p999, r.migrations, r.errors
            );
        }
        let aff = runs.iter().find(|r| r.policy == "affinity").unwrap_or(&runs[0]);
        for r in runs.iter().filter(|r| r.policy != "affinity") {
            println!("p99 {} / affinity: {:.2}x", r.policy, r.p99 as f64 / aff.p99.max(1) as f64);
        }
        engine.shutdown();
    });
}
