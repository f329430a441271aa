//! The batching benchmark: one model, one load schedule (phases of rate
//! with bursts), served in-process by the shoal engine under adaptive
//! batching, no batching, and every static setting of a grid; per phase
//! p50, p99, throughput, goodput (answers within the objective per second)
//! and how long p99 takes to come back under the objective after a step.
//!
//! Requests go straight to the engine from an open-loop producer thread,
//! not through Crayfish's per-partition pipeline: that pipeline scores one
//! event per partition at a time, so it would cap the requests in flight at
//! `mp` and hide the batcher. Latency counts from when the request was
//! handed to the engine; how far the producer fell behind its schedule is
//! reported apart (on a 2-core machine the producer competes with the
//! server for the cores, and its lag is not the batcher's doing).

use crate::schedule::Schedule;
use bytes::Bytes;
use shoal::tensor::{DataType, Tensor};
use shoal::{Engine, EngineError, InferRequest};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One batching configuration of the model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Setting {
    /// One request per execution.
    None,
    /// Triton's dynamic batcher with fixed knobs.
    Static {
        max_batch_size: usize,
        delay_us: u64,
    },
    /// shoal's controller with this objective.
    Adaptive { objective_ms: f64 },
}

impl Setting {
    pub fn label(&self) -> String {
        match self {
            Setting::None => "none".into(),
            Setting::Static {
                max_batch_size,
                delay_us,
            } => format!("static b{max_batch_size} d{}ms", *delay_us as f64 / 1e3),
            Setting::Adaptive { objective_ms } => format!("adaptive {objective_ms:.2}ms"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("model repository {path}: {reason}")]
    Repository { path: String, reason: String },
    #[error(transparent)]
    Load(#[from] shoal::engine::LoadError),
    #[error("{0}")]
    Run(String),
}

fn repo_err(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Repository {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes a one-model repository into `dst`: the model's version folders
/// linked from `src`, its `config.toml` with the batching keys replaced by
/// `setting`'s. Everything else (threads, replicas, I/O) stays as written.
pub fn write_repository(
    src: &Path,
    model: &str,
    setting: &Setting,
    dst: &Path,
) -> Result<PathBuf, BenchError> {
    let from = src.join(model);
    let to = dst.join(model);
    std::fs::create_dir_all(&to).map_err(|e| repo_err(&to, e))?;
    let text = std::fs::read_to_string(from.join("config.toml"))
        .map_err(|e| repo_err(&from.join("config.toml"), e))?;
    let mut cfg: toml::Table = text.parse().map_err(|e| repo_err(&from, e))?;
    for k in [
        "dynamic_batching",
        "latency_objective_ms",
        "shed_late",
        "batching",
    ] {
        cfg.remove(k);
    }
    match setting {
        Setting::None => {
            cfg.insert("batching".into(), "none".into());
        }
        Setting::Static {
            max_batch_size,
            delay_us,
        } => {
            cfg.insert("max_batch_size".into(), (*max_batch_size as i64).into());
            let mut db = toml::Table::new();
            db.insert("max_queue_delay_us".into(), (*delay_us as i64).into());
            cfg.insert("dynamic_batching".into(), db.into());
        }
        Setting::Adaptive { objective_ms } => {
            cfg.insert("latency_objective_ms".into(), (*objective_ms).into());
        }
    }
    std::fs::write(
        to.join("config.toml"),
        toml::to_string(&cfg).expect("a table"),
    )
    .map_err(|e| repo_err(&to, e))?;
    for entry in std::fs::read_dir(&from).map_err(|e| repo_err(&from, e))? {
        let entry = entry.map_err(|e| repo_err(&from, e))?;
        let name = entry.file_name();
        if entry.path().is_dir() && name.to_string_lossy().parse::<u64>().is_ok() {
            let link = to.join(&name);
            if !link.exists() {
                let target = std::fs::canonicalize(entry.path()).map_err(|e| repo_err(&from, e))?;
                std::os::unix::fs::symlink(target, &link).map_err(|e| repo_err(&link, e))?;
            }
        }
    }
    Ok(dst.to_path_buf())
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Served,
    /// Rejected to protect the objective, or by a full queue.
    Shed,
    Failed,
}

#[derive(Debug, Clone, Copy)]
pub struct Rec {
    pub scheduled: f64,
    /// From the hand-off to the engine to the answer, seconds.
    pub latency: f64,
    /// How late the producer handed it over, seconds.
    pub lag: f64,
    pub fate: Fate,
}

/// One open-loop run: every request's fate, and the adaptive controllers'
/// target batch size sampled over time.
#[derive(Debug, Default)]
pub struct OpenRun {
    pub records: Vec<Rec>,
    /// (seconds, mean target rows over the replicas).
    pub targets: Vec<(f64, f64)>,
    pub duration: f64,
    /// Wall time from the first send to the last answer, seconds.
    pub elapsed: f64,
}

/// The model's request shape and a pool of payloads.
#[derive(Debug, Clone)]
pub struct Workload {
    pub model: String,
    pub input: String,
    /// One data point's shape (without the batch dimension).
    pub shape: Vec<i64>,
    pub payloads: Arc<Vec<Bytes>>,
}

impl Workload {
    pub fn new(model: &str, input: &str, shape: &[i64], seed: u64) -> Self {
        let len = shape.iter().product::<i64>().max(1) as usize;
        let payloads = crate::pipeline::synthetic_payloads(seed, 8, len);
        Self {
            model: model.into(),
            input: input.into(),
            shape: shape.to_vec(),
            payloads: Arc::new(payloads),
        }
    }

    fn request(&self, i: usize) -> InferRequest {
        InferRequest {
            model: self.model.clone(),
            inputs: vec![Tensor {
                name: self.input.clone(),
                datatype: DataType::Fp32,
                shape: std::iter::once(1)
                    .chain(self.shape.iter().copied())
                    .collect(),
                data: self.payloads[i % self.payloads.len()].clone(),
            }],
            ..Default::default()
        }
    }
}

fn fate(r: &Result<shoal::InferResponse, EngineError>) -> Fate {
    match r {
        Ok(_) => Fate::Served,
        Err(EngineError::Overloaded(_) | EngineError::Shed(_) | EngineError::DeadlineExceeded) => {
            Fate::Shed
        }
        Err(_) => Fate::Failed,
    }
}

/// Sends one request at each offset from a thread of its own and awaits
/// every answer on the runtime.
pub async fn open_loop(engine: &Engine, w: &Workload, offsets: Vec<Duration>) -> OpenRun {
    let records = Arc::new(Mutex::new(Vec::with_capacity(offsets.len())));
    let duration = offsets.last().map_or(0.0, |d| d.as_secs_f64());
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(20);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let engine = engine.clone();
        let model = w.model.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !done.load(Relaxed) {
                tick.tick().await;
                if let Ok(mv) = engine.model(&model, None) {
                    let n = mv.controllers.len();
                    if n > 0 {
                        let sum: u64 = mv
                            .controllers
                            .iter()
                            .map(|c| c.snapshot().target_rows)
                            .sum();
                        let t = start.elapsed().as_secs_f64();
                        out.push((t, sum as f64 / n as f64));
                    }
                }
            }
            out
        })
    };
    let producer = {
        let engine = engine.clone();
        let w = w.clone();
        let records = records.clone();
        std::thread::spawn(move || {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            for (i, off) in offsets.into_iter().enumerate() {
                let at = start + off;
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                let sent = Instant::now();
                let sub = engine.submit(w.request(i));
                let records = records.clone();
                let tx = tx.clone();
                handle.spawn(async move {
                    let r = sub.wait().await;
                    let end = Instant::now();
                    let rec = Rec {
                        scheduled: off.as_secs_f64(),
                        latency: end.saturating_duration_since(sent).as_secs_f64(),
                        lag: sent.saturating_duration_since(at).as_secs_f64(),
                        fate: fate(&r),
                    };
                    records.lock().expect("records").push(rec);
                    drop(tx);
                });
            }
            drop(tx);
            // Every answer is in once the last sender is gone.
            let _ = rx.recv();
        })
    };
    let _ = tokio::task::spawn_blocking(move || producer.join()).await;
    let elapsed = start.elapsed().as_secs_f64();
    done.store(true, Relaxed);
    let targets = sampler.await.unwrap_or_default();
    let mut records = std::mem::take(&mut *records.lock().expect("records"));
    records.sort_by(|a, b| a.scheduled.total_cmp(&b.scheduled));
    OpenRun {
        records,
        targets,
        duration,
        elapsed,
    }
}

/// Loads a one-model engine for `setting` from `src`.
pub async fn load_engine(src: &Path, model: &str, setting: &Setting) -> Result<Engine, BenchError> {
    let dir = tempfile::tempdir().map_err(|e| repo_err(src, e))?;
    let repo = write_repository(src, model, setting, dir.path())?;
    let engine = tokio::task::spawn_blocking(move || Engine::load(&repo, &Default::default()))
        .await
        .map_err(|e| BenchError::Run(e.to_string()))??;
    // The engine holds its sessions; the temporary folder can go.
    drop(dir);
    Ok(engine)
}

/// The model's cost as this benchmark sees it: the latency of one request
/// alone (median of sequential ones) and the capacity in rows/s, from a
/// closed loop that keeps `4 · max_batch` requests in flight with the
/// largest batch and no delay.
pub async fn measure_cost(
    engine: &Engine,
    w: &Workload,
    max_batch: usize,
    secs: f64,
) -> (f64, f64) {
    let mut alone = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let _ = engine.infer(w.request(i)).await;
        alone.push(t.elapsed().as_secs_f64());
        if t.elapsed().as_secs_f64() > secs / 2.0 && alone.len() >= 5 {
            break;
        }
    }
    alone.sort_by(f64::total_cmp);
    let t1 = alone[alone.len() / 2];
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..4 * max_batch.max(1))
        .map(|c| {
            let e = engine.clone();
            let w = w.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    if e.infer(w.request(c + n as usize)).await.is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    (t1, total as f64 / t0.elapsed().as_secs_f64())
}

/// One phase's figures for one setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PhaseStats {
    pub phase: usize,
    pub offered_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub throughput: f64,
    pub goodput: f64,
    pub shed: usize,
    pub failed: usize,
    /// p99 of the producer's lag behind its schedule, ms.
    pub producer_lag_p99_ms: f64,
    /// Seconds from the phase's start (a step of the load) until the
    /// 100 ms windows meet the objective (see `windows`) for a second on
    /// end, or to the phase's end; `None`: they never did.
    pub recovery_s: Option<f64>,
}

const WINDOW: f64 = 0.1;

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

/// One window of the p99 timeline.
struct Window {
    /// Its middle, seconds into the run.
    mid: f64,
    /// p99 of its answers, seconds; NaN when none was answered.
    p99: f64,
    /// Whether the window misses the objective.
    over: bool,
}

/// Share of requests beyond the rejections that overload forces which may
/// be rejected before a window counts as missing the objective: a p99
/// objective tolerates 1% misses.
const MISS_SHARE: f64 = 0.01;

/// The windows of [from, to) that had requests scheduled in them. A window
/// misses the objective when the p99 of its answers is over it, or when
/// more of its requests were rejected than the offered load forces (its
/// excess over `capacity`) plus 1%. So shedding at 120% of capacity is not
/// a miss, while shedding at 60% is: the p99 that counts is that of the
/// requests the server could have answered.
fn windows(run: &OpenRun, from: f64, to: f64, objective: f64, capacity: f64) -> Vec<Window> {
    let n = (((to - from) / WINDOW).ceil() as usize).max(1);
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut rejected = vec![0usize; n];
    for r in run
        .records
        .iter()
        .filter(|r| (from..to).contains(&r.scheduled))
    {
        let i = (((r.scheduled - from) / WINDOW) as usize).min(n - 1);
        match r.fate {
            Fate::Served => lat[i].push(r.latency),
            _ => rejected[i] += 1,
        }
    }
    lat.iter_mut()
        .zip(rejected)
        .enumerate()
        .filter(|(_, (v, rej))| !v.is_empty() || *rej > 0)
        .map(|(i, (v, rej))| {
            let offered = v.len() + rej;
            let forced = (1.0 - capacity * WINDOW / offered as f64).max(0.0);
            let p99 = quantile(v, 0.99);
            let over = p99 > objective || rej as f64 / offered as f64 > forced + MISS_SHARE;
            Window {
                mid: from + (i as f64 + 0.5) * WINDOW,
                p99,
                over,
            }
        })
        .collect()
}

/// How long a phase takes to hold the objective: seconds from its start
/// to the first window from which a second of windows (or the rest of the
/// phase, if shorter) all meet it. A single stall later in the phase is
/// noise that the phase's p99 shows, not a failure to recover from the
/// step. `None`: no such stretch.
fn recovery(windows: &[Window], from: f64) -> Option<f64> {
    let hold = (HOLD_S / WINDOW).round() as usize;
    (0..windows.len())
        .find(|&i| windows[i..].iter().take(hold).all(|w| !w.over))
        .map(|i| (windows[i].mid - WINDOW / 2.0 - from).max(0.0))
}

/// A recovery holds the objective this long.
const HOLD_S: f64 = 1.0;

/// Per-phase figures of a run against `schedule`'s phases.
pub fn phase_stats(
    run: &OpenRun,
    schedule: &Schedule,
    objective: f64,
    capacity: f64,
) -> Vec<PhaseStats> {
    schedule
        .phase_bounds()
        .iter()
        .enumerate()
        .map(|(phase, &(from, to))| {
            let recs: Vec<&Rec> = run
                .records
                .iter()
                .filter(|r| (from..to).contains(&r.scheduled))
                .collect();
            let mut lat: Vec<f64> = recs
                .iter()
                .filter(|r| r.fate == Fate::Served)
                .map(|r| r.latency)
                .collect();
            let served = lat.len();
            let good = lat.iter().filter(|&&l| l <= objective).count();
            let secs = to - from;
            let recovery_s = recovery(&windows(run, from, to, objective, capacity), from);
            let mut lag: Vec<f64> = recs.iter().map(|r| r.lag).collect();
            PhaseStats {
                producer_lag_p99_ms: quantile(&mut lag, 0.99) * 1e3,
                phase,
                offered_per_s: recs.len() as f64 / secs,
                p50_ms: quantile(&mut lat.clone(), 0.5) * 1e3,
                p99_ms: quantile(&mut lat, 0.99) * 1e3,
                throughput: served as f64 / secs,
                goodput: good as f64 / secs,
                shed: recs.iter().filter(|r| r.fate == Fate::Shed).count(),
                failed: recs.iter().filter(|r| r.fate == Fate::Failed).count(),
                recovery_s,
            }
        })
        .collect()
}

/// p99 (ms) of the answers per window over the whole run, for the
/// timeline plot; windows with no answer are left out.
pub fn p99_series(run: &OpenRun, objective: f64, capacity: f64) -> Vec<(f64, f64)> {
    windows(run, 0.0, run.duration.max(WINDOW), objective, capacity)
        .into_iter()
        .filter(|w| !w.p99.is_nan())
        .map(|w| (w.mid, w.p99 * 1e3))
        .collect()
}

/// What `bench` runs.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub repository: PathBuf,
    pub workload: Workload,
    /// (share of capacity, seconds) per phase.
    pub phases: Vec<(f64, f64)>,
    pub burst: Option<crate::schedule::Burst>,
    pub poisson: bool,
    pub seed: u64,
    pub max_batch_sizes: Vec<usize>,
    pub delays_ms: Vec<f64>,
    /// Overrides the objective derived from the measured cost.
    pub objective_ms: Option<f64>,
    /// Overrides the measured capacity, rows/s.
    pub capacity: Option<f64>,
    pub cost_seconds: f64,
    /// Interleaved rounds of the contenders after the grid pass.
    pub rounds: usize,
}

/// One setting's run over the whole schedule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SettingResult {
    pub label: String,
    pub setting: Setting,
    pub phases: Vec<PhaseStats>,
    pub goodput: f64,
    pub throughput: f64,
    pub shed: usize,
    pub failed: usize,
    #[serde(skip)]
    pub p99_series: Vec<(f64, f64)>,
    #[serde(skip)]
    pub targets: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub capacity_rows_per_s: f64,
    pub alone_ms: f64,
    pub objective_ms: f64,
    pub objective_rule: String,
    pub phases: Vec<(f64, f64)>,
    pub poisson: bool,
    /// Interleaved rounds of the contenders.
    pub rounds: usize,
    /// Every setting, one pass.
    pub grid: Vec<SettingResult>,
    /// The contenders, each its median round: what the comparison uses.
    pub results: Vec<SettingResult>,
}

/// The model's `max_batch_size` as configured in the repository.
pub fn configured_max_batch(repo: &Path, model: &str) -> Result<usize, BenchError> {
    let path = repo.join(model).join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| repo_err(&path, e))?;
    let cfg: toml::Table = text.parse().map_err(|e| repo_err(&path, e))?;
    Ok(cfg
        .get("max_batch_size")
        .and_then(|v| v.as_integer())
        .unwrap_or(0)
        .max(1) as usize)
}

/// Measures the model, derives the objective, and runs the schedule under
/// adaptive batching, no batching and every static setting of the grid.
pub async fn bench(
    c: &BenchConfig,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport, BenchError> {
    let model = c.workload.model.clone();
    let max_batch = configured_max_batch(&c.repository, &model)?;
    let greedy = Setting::Static {
        max_batch_size: max_batch,
        delay_us: 0,
    };
    let engine = load_engine(&c.repository, &model, &greedy).await?;
    let (alone, closed) = measure_cost(&engine, &c.workload, max_batch, c.cost_seconds).await;
    // The open loop costs the machine more than a closed one (a producer
    // thread, a task per request): offer 1.5x the closed-loop figure and
    // take what gets answered as the capacity the schedule is scaled to.
    let over = Schedule::Constant { rate: 1.5 * closed };
    let offsets = over.offsets(Duration::from_secs_f64(c.cost_seconds));
    let sat = open_loop(&engine, &c.workload, offsets).await;
    engine.shutdown();
    // Answers over the wall time they took: a producer that falls behind
    // stretches the run, and the capacity must not count that as speed.
    let answered = sat
        .records
        .iter()
        .filter(|r| r.fate == Fate::Served)
        .count() as f64;
    let measured = (answered / sat.elapsed.max(1e-9)).min(closed);
    let capacity = c.capacity.unwrap_or(measured);
    // A full batch takes max_batch / capacity. At the highest load a
    // request waits for the batch in flight, for its own to fill, and for
    // its own to run: three batch times; one more absorbs noise. The floor
    // is the scheduling jitter of a shared 2-core machine.
    let full = max_batch as f64 / capacity;
    let objective_ms = c
        .objective_ms
        .unwrap_or_else(|| (4.0 * full * 1e3).max(2.0));
    progress(&format!(
        "{model}: alone {:.3} ms, capacity {capacity:.0} rows/s at batch {max_batch} (closed loop {closed:.0}), objective {objective_ms:.2} ms",
        alone * 1e3
    ));
    let schedule = Schedule::Phased {
        phases: c
            .phases
            .iter()
            .map(|&(share, secs)| (share * capacity, Duration::from_secs_f64(secs)))
            .collect(),
        burst: c.burst,
    };
    let length = schedule.length().unwrap_or_default();
    let offsets = if c.poisson {
        schedule.poisson_offsets(length, c.seed)
    } else {
        schedule.offsets(length)
    };
    let mut settings = vec![Setting::Adaptive { objective_ms }, Setting::None];
    for &b in &c.max_batch_sizes {
        for &d in &c.delays_ms {
            settings.push(Setting::Static {
                max_batch_size: b,
                delay_us: (d * 1e3).round() as u64,
            });
        }
    }
    let objective = objective_ms / 1e3;
    let run = |setting: Setting| run_setting(c, setting, &schedule, &offsets, objective, capacity);
    let mut results = Vec::new();
    for setting in settings {
        let r = run(setting).await?;
        progress(&format!(
            "{:<22} goodput {:>9.1}/s  throughput {:>9.1}/s  shed {}",
            r.label, r.goodput, r.throughput, r.shed
        ));
        results.push(r);
    }
    // One pass over the grid ranks the settings, but on a shared machine
    // one run can land in a noisy minute. The contenders (adaptive, no
    // batching, the best static setting overall and of each phase) run
    // again, interleaved, and each keeps its median round.
    let mut contenders: Vec<Setting> = vec![Setting::Adaptive { objective_ms }, Setting::None];
    let statics: Vec<&SettingResult> = results
        .iter()
        .filter(|r| matches!(r.setting, Setting::Static { .. }))
        .collect();
    let mut picks: Vec<&SettingResult> = Vec::new();
    if let Some(b) = statics
        .iter()
        .max_by(|a, b| a.goodput.total_cmp(&b.goodput))
    {
        picks.push(b);
    }
    for i in 0..c.phases.len() {
        if let Some(b) = statics
            .iter()
            .max_by(|a, b| a.phases[i].goodput.total_cmp(&b.phases[i].goodput))
        {
            picks.push(b);
        }
    }
    for p in picks {
        if !contenders.contains(&p.setting) {
            contenders.push(p.setting.clone());
        }
    }
    let mut rounds: Vec<Vec<SettingResult>> = vec![Vec::new(); contenders.len()];
    for round in 0..c.rounds {
        for j in 0..contenders.len() {
            // Rotate the order so no contender always runs first.
            let k = (j + round) % contenders.len();
            let r = run(contenders[k].clone()).await?;
            progress(&format!(
                "round {round}: {:<22} goodput {:>9.1}/s  throughput {:>9.1}/s  shed {}",
                r.label, r.goodput, r.throughput, r.shed
            ));
            rounds[k].push(r);
        }
    }
    let finals = rounds
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|mut v| {
            v.sort_by(|a, b| a.goodput.total_cmp(&b.goodput));
            v.swap_remove(v.len() / 2)
        })
        .collect();
    Ok(BenchReport {
        model,
        capacity_rows_per_s: capacity,
        alone_ms: alone * 1e3,
        objective_ms,
        objective_rule: "max(4 x max_batch_size / capacity, 2 ms)".into(),
        phases: c.phases.clone(),
        poisson: c.poisson,
        rounds: c.rounds,
        grid: results,
        results: finals,
    })
}

/// One setting over the whole schedule: a fresh engine, a short warm-up,
/// the open-loop run, its figures.
async fn run_setting(
    c: &BenchConfig,
    setting: Setting,
    schedule: &Schedule,
    offsets: &[Duration],
    objective: f64,
    capacity: f64,
) -> Result<SettingResult, BenchError> {
    let model = &c.workload.model;
    let engine = load_engine(&c.repository, model, &setting).await?;
    for i in 0..20 {
        let _ = engine.infer(c.workload.request(i)).await;
    }
    let run = open_loop(&engine, &c.workload, offsets.to_vec()).await;
    engine.shutdown();
    let phases = phase_stats(&run, schedule, objective, capacity);
    let secs = schedule
        .length()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);
    let served: Vec<&Rec> = run
        .records
        .iter()
        .filter(|r| r.fate == Fate::Served)
        .collect();
    Ok(SettingResult {
        label: setting.label(),
        goodput: served.iter().filter(|r| r.latency <= objective).count() as f64 / secs,
        throughput: served.len() as f64 / secs,
        shed: run.records.iter().filter(|r| r.fate == Fate::Shed).count(),
        failed: run
            .records
            .iter()
            .filter(|r| r.fate == Fate::Failed)
            .count(),
        p99_series: p99_series(&run, objective, capacity),
        targets: run.targets,
        setting,
        phases,
    })
}

impl BenchReport {
    fn statics(&self) -> impl Iterator<Item = &SettingResult> {
        self.results
            .iter()
            .filter(|r| matches!(r.setting, Setting::Static { .. }))
    }

    pub fn adaptive(&self) -> Option<&SettingResult> {
        self.results
            .iter()
            .find(|r| matches!(r.setting, Setting::Adaptive { .. }))
    }

    pub fn best_static(&self) -> Option<&SettingResult> {
        self.statics()
            .max_by(|a, b| a.goodput.total_cmp(&b.goodput))
    }

    /// Markdown: per phase, adaptive against the best static setting of
    /// that phase and no batching; then the whole schedule.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "### {} (capacity {:.0} rows/s, objective {:.2} ms, {} arrivals)\n",
            self.model,
            self.capacity_rows_per_s,
            self.objective_ms,
            if self.poisson {
                "Poisson"
            } else {
                "evenly spaced"
            }
        );
        let _ = writeln!(s, "| phase | load | setting | p50 ms | p99 ms | throughput/s | goodput/s | shed | p99 recovery s | producer lag p99 ms |");
        let _ = writeln!(s, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        let Some(adaptive) = self.adaptive() else {
            return s;
        };
        let none = self
            .results
            .iter()
            .find(|r| matches!(r.setting, Setting::None));
        for (i, &(share, _)) in self.phases.iter().enumerate() {
            let best = self
                .statics()
                .max_by(|a, b| a.phases[i].goodput.total_cmp(&b.phases[i].goodput));
            let rows = [Some(adaptive), best, none];
            for r in rows.into_iter().flatten() {
                let p = &r.phases[i];
                let rec = p
                    .recovery_s
                    .map_or("never".to_string(), |x| format!("{x:.1}"));
                let label = if best.is_some_and(|b| std::ptr::eq(r, b)) {
                    format!("best static: {}", r.label)
                } else {
                    r.label.clone()
                };
                let _ = writeln!(
                    s,
                    "| {i} | {:.0}% | {label} | {:.3} | {:.3} | {:.1} | {:.1} | {} | {rec} | {:.2} |",
                    share * 100.0,
                    p.p50_ms,
                    p.p99_ms,
                    p.throughput,
                    p.goodput,
                    p.shed,
                    p.producer_lag_p99_ms
                );
            }
            if let Some(b) = best {
                let ratio = goodput_ratio(adaptive.phases[i].goodput, b.phases[i].goodput);
                let _ = writeln!(
                    s,
                    "| {i} | | **adaptive / best static goodput** | | | | **{ratio}** | | | |"
                );
            }
        }
        let _ = writeln!(
            s,
            "\nContenders above: each its median of {} interleaved rounds. Grid (one pass), whole-schedule goodput/s:\n",
            self.rounds
        );
        for r in &self.grid {
            let _ = writeln!(
                s,
                "- {}: goodput {:.1}, throughput {:.1}, shed {}",
                r.label, r.goodput, r.throughput, r.shed
            );
        }
        if let Some(b) = self.best_static() {
            let _ = writeln!(
                s,
                "\nWhole schedule: adaptive goodput {:.1}/s, best single static ({}) {:.1}/s: **{}x**; no batching {:.1}/s.",
                adaptive.goodput,
                b.label,
                b.goodput,
                goodput_ratio(adaptive.goodput, b.goodput),
                none.map_or(f64::NAN, |n| n.goodput)
            );
        }
        s
    }
}

/// `adaptive / best` to three places. Every static setting can miss the
/// objective throughout (the backlog of an overload): no ratio then.
fn goodput_ratio(adaptive: f64, best: f64) -> String {
    match best > 0.0 {
        true => format!("{:.3}", adaptive / best),
        false => format!("{adaptive:.1}/s vs 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodput_ratio_has_none_against_zero() {
        assert_eq!(goodput_ratio(3.0, 2.0), "1.500");
        assert_eq!(goodput_ratio(31.5, 0.0), "31.5/s vs 0");
    }

    #[test]
    fn repository_rewrite_keeps_the_model_and_swaps_batching_keys() {
        let src = tempfile::tempdir().unwrap();
        let m = src.path().join("m");
        std::fs::create_dir_all(m.join("1")).unwrap();
        std::fs::write(m.join("1/model.onnx"), b"x").unwrap();
        std::fs::write(
            m.join("config.toml"),
            "max_batch_size = 16\nintra_op_threads = 2\n[dynamic_batching]\nmax_queue_delay_us = 1000\n",
        )
        .unwrap();
        for (setting, want) in [
            (Setting::None, "batching = \"none\""),
            (
                Setting::Static {
                    max_batch_size: 4,
                    delay_us: 500,
                },
                "max_queue_delay_us = 500",
            ),
            (
                Setting::Adaptive { objective_ms: 2.5 },
                "latency_objective_ms = 2.5",
            ),
        ] {
            let dst = tempfile::tempdir().unwrap();
            write_repository(src.path(), "m", &setting, dst.path()).unwrap();
            let text = std::fs::read_to_string(dst.path().join("m/config.toml")).unwrap();
            assert!(text.contains(want), "{text}");
            assert!(text.contains("intra_op_threads = 2"), "{text}");
            assert_eq!(
                text.contains("max_queue_delay_us"),
                matches!(setting, Setting::Static { .. })
            );
            assert!(dst.path().join("m/1/model.onnx").exists());
            // The rewritten file is a valid model config.
            shoal::engine::ModelConfigFile::parse("m", &text).unwrap();
        }
    }

    fn run_of(recs: &[(f64, f64, Fate)]) -> OpenRun {
        OpenRun {
            records: recs
                .iter()
                .map(|&(s, l, f)| Rec {
                    scheduled: s,
                    latency: l,
                    lag: 0.0,
                    fate: f,
                })
                .collect(),
            targets: Vec::new(),
            duration: 2.0,
            elapsed: 2.0,
        }
    }

    #[test]
    fn phase_figures_count_goodput_and_recovery() {
        let schedule = Schedule::Phased {
            phases: vec![
                (100.0, Duration::from_secs(1)),
                (100.0, Duration::from_secs(2)),
            ],
            burst: None,
        };
        let mut recs = Vec::new();
        for i in 0..100 {
            recs.push((i as f64 / 100.0, 0.001, Fate::Served));
        }
        for i in 0..200 {
            // Phase 1: late for its first 300 ms, then fine.
            let late = i < 30;
            let t = 1.0 + i as f64 / 100.0;
            recs.push((t, if late { 0.05 } else { 0.001 }, Fate::Served));
        }
        let with = |recs: &[(f64, f64, Fate)], at: &[f64]| {
            let mut v = recs.to_vec();
            for r in v
                .iter_mut()
                .filter(|r| at.iter().any(|a| (r.0 - a).abs() < 1e-9))
            {
                r.2 = Fate::Shed;
            }
            v
        };
        // One rejection near the end: a blip, not a failure to recover.
        let s = phase_stats(&run_of(&with(&recs, &[2.95])), &schedule, 0.01, 1000.0);
        assert_eq!(s[0].recovery_s, Some(0.0));
        assert_eq!(s[0].goodput, 100.0);
        assert_eq!(s[1].throughput, 199.0 / 2.0);
        assert_eq!(s[1].goodput, 169.0 / 2.0);
        assert_eq!(s[1].shed, 1);
        assert!((s[1].recovery_s.unwrap() - 0.3).abs() < 1e-9);
        // One in the window at 1.5 s: the second that holds starts after it.
        let s = phase_stats(&run_of(&with(&recs, &[1.55])), &schedule, 0.01, 1000.0);
        assert!((s[1].recovery_s.unwrap() - 0.6).abs() < 1e-9);
        // At a capacity of 90/s the 10 requests of a window force one out:
        // that rejection is not a miss, four are.
        let s = phase_stats(&run_of(&with(&recs, &[1.55])), &schedule, 0.01, 90.0);
        assert!((s[1].recovery_s.unwrap() - 0.3).abs() < 1e-9);
        let heavy = with(&recs, &[1.51, 1.52, 1.53, 1.55]);
        let s = phase_stats(&run_of(&heavy), &schedule, 0.01, 90.0);
        assert_eq!(s[1].shed, 4);
        assert!((s[1].recovery_s.unwrap() - 0.6).abs() < 1e-9);
        // Late throughout: never.
        let late: Vec<_> = recs
            .iter()
            .map(|&(t, l, f)| (t, if t >= 1.0 { 0.05 } else { l }, f))
            .collect();
        let s = phase_stats(&run_of(&late), &schedule, 0.01, 1000.0);
        assert_eq!(s[1].recovery_s, None);
    }
}
