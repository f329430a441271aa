//! shoal-loadgen: the benchmark of the Crayfish paper (EDBT 2024) rebuilt in
//! Rust: a producer writes tensor events to an input topic, a processor
//! scores them embedded (the shoal engine in-process) or external (any
//! KServe v2 server over gRPC or REST), a sink measures end-to-end latency,
//! an analyzer reports throughput, percentiles and sustainable throughput.

pub mod analyze;
pub mod batching;
pub mod event;
pub mod kafka;
pub mod native;
pub mod npy;
pub mod pipeline;
pub mod plot;
pub mod progress;
pub mod report;
pub mod schedule;
pub mod scorer;
pub mod server;
pub mod sustain;
pub mod transport;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "shoal-loadgen",
    version,
    about = "Embedded versus external model serving on a stream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One experiment at a given load.
    Run(RunOpts),
    /// The main job: FFNN through embedded, gRPC and REST at mp 1 and 2,
    /// each one's sustainable throughput, as Crayfish's Table 4.
    Compare(CompareOpts),
    /// The batching benchmark: a load schedule (phases with bursts) served
    /// in-process under adaptive batching, no batching and a grid of static
    /// settings; per phase p50, p99, throughput, goodput, p99 recovery.
    Batching(BatchingOpts),
}

#[derive(Args, Debug, Clone)]
pub struct BatchingOpts {
    #[arg(long, env = "LOADGEN_MODEL", default_value = "ffnn")]
    pub model: String,
    #[arg(long, env = "LOADGEN_INPUT", default_value = "input")]
    pub input: String,
    /// Shape of one data point, comma-separated.
    #[arg(
        long,
        env = "LOADGEN_ISZ",
        default_value = "784",
        value_delimiter = ','
    )]
    pub isz: Vec<i64>,
    #[arg(
        long,
        env = "LOADGEN_MODEL_REPOSITORY",
        default_value = "model_repository"
    )]
    pub model_repository: PathBuf,
    /// Phases as `share_of_capacity:seconds`, comma-separated.
    #[arg(
        long,
        env = "LOADGEN_PHASES",
        value_delimiter = ',',
        default_value = "0.1:3,0.6:3,1.2:3,0.6:3,0.1:3"
    )]
    pub phases: Vec<String>,
    /// Bursts on top of every phase: `factor,burst_seconds,period_seconds`;
    /// `none` for none.
    #[arg(long, env = "LOADGEN_BURST", default_value = "1.5,0.3,1.5")]
    pub burst: String,
    /// Poisson arrivals instead of evenly spaced ones.
    #[arg(long, env = "LOADGEN_POISSON")]
    pub poisson: bool,
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Static grid: max_batch_size values.
    #[arg(
        long,
        env = "LOADGEN_MAX_BATCH_SIZES",
        value_delimiter = ',',
        default_value = "1,4,16,64"
    )]
    pub max_batch_sizes: Vec<usize>,
    /// Static grid: queue delays in ms.
    #[arg(
        long,
        env = "LOADGEN_DELAYS_MS",
        value_delimiter = ',',
        default_value = "0,0.5,1,2,5,10"
    )]
    pub delays_ms: Vec<f64>,
    /// Latency objective in ms (default: derived from the measured cost).
    #[arg(long, env = "LOADGEN_OBJECTIVE_MS")]
    pub objective_ms: Option<f64>,
    /// Capacity in rows/s (default: measured).
    #[arg(long, env = "LOADGEN_CAPACITY")]
    pub capacity: Option<f64>,
    /// Seconds of the capacity measurement.
    #[arg(long, env = "LOADGEN_COST_SECONDS", default_value_t = 2.0)]
    pub cost_seconds: f64,
    /// Interleaved rounds of the contenders (adaptive, no batching, the
    /// best static settings) after the grid pass; each keeps its median.
    #[arg(long, env = "LOADGEN_ROUNDS", default_value_t = 3)]
    pub rounds: usize,
    /// Folder for report.json, report.md and the timeline plots.
    #[arg(long, env = "LOADGEN_OUT")]
    pub out: Option<PathBuf>,
}

impl BatchingOpts {
    pub fn config(&self) -> Result<batching::BenchConfig, String> {
        let phases = self
            .phases
            .iter()
            .map(|p| {
                let (a, b) = p
                    .split_once(':')
                    .ok_or_else(|| format!("phase {p:?}: want share:seconds"))?;
                let share: f64 = a.parse().map_err(|_| format!("phase {p:?}: bad share"))?;
                let secs: f64 = b.parse().map_err(|_| format!("phase {p:?}: bad seconds"))?;
                if !(share > 0.0 && secs > 0.0) {
                    return Err(format!("phase {p:?}: share and seconds must be > 0"));
                }
                Ok((share, secs))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let burst = match self.burst.as_str() {
            "none" => None,
            b => {
                let v: Vec<f64> = b
                    .split(',')
                    .map(|x| x.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("--burst {b:?}: want factor,seconds,period"))?;
                match v[..] {
                    [f, len, period] if f > 0.0 && len > 0.0 && period > len => {
                        Some(schedule::Burst {
                            factor: f,
                            len: Duration::from_secs_f64(len),
                            period: Duration::from_secs_f64(period),
                        })
                    }
                    _ => {
                        return Err(format!(
                            "--burst {b:?}: want factor,seconds,period with period > seconds"
                        ))
                    }
                }
            }
        };
        Ok(batching::BenchConfig {
            repository: self.model_repository.clone(),
            workload: batching::Workload::new(&self.model, &self.input, &self.isz, self.seed),
            phases,
            burst,
            poisson: self.poisson,
            seed: self.seed,
            max_batch_sizes: self.max_batch_sizes.clone(),
            delays_ms: self.delays_ms.clone(),
            objective_ms: self.objective_ms,
            capacity: self.capacity,
            cost_seconds: self.cost_seconds,
            rounds: self.rounds.max(1),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The shoal engine in the processor's process.
    Embedded,
    /// A KServe v2 server over gRPC.
    Grpc,
    /// A KServe v2 server over REST (binary tensor extension).
    Rest,
    /// No scoring: the pipeline's own speed.
    Noop,
    /// shoal consumes the input topic and writes the output topic itself
    /// (`--kafka-*`): no processor, no per-event RPC. Needs `--brokers`.
    KafkaNative,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Embedded => "embedded",
            Mode::Grpc => "grpc",
            Mode::Rest => "rest",
            Mode::Noop => "noop",
            Mode::KafkaNative => "kafka-native",
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ModelOpts {
    /// Model name.
    #[arg(long, env = "LOADGEN_MODEL", default_value = "ffnn")]
    pub model: String,
    /// Input tensor name.
    #[arg(long, env = "LOADGEN_INPUT", default_value = "input")]
    pub input: String,
    /// Shape of one data point (`isz`), comma-separated.
    #[arg(
        long,
        env = "LOADGEN_ISZ",
        default_value = "784",
        value_delimiter = ','
    )]
    pub isz: Vec<i64>,
    /// Data points per event (`bsz`).
    #[arg(long, env = "LOADGEN_BSZ", default_value_t = 1)]
    pub bsz: u32,
    /// Model repository for embedded mode and for the sidecar loadgen starts.
    #[arg(
        long,
        env = "LOADGEN_MODEL_REPOSITORY",
        default_value = "model_repository"
    )]
    pub model_repository: PathBuf,
    /// External server (e.g. http://127.0.0.1:8001 for gRPC, :8000 for REST);
    /// when absent, loadgen starts `shoal` itself on loopback.
    #[arg(long, env = "LOADGEN_SERVER")]
    pub server: Option<String>,
    /// The `shoal` binary to start (default: next to this one).
    #[arg(long, env = "LOADGEN_SHOAL_BIN")]
    pub shoal_bin: Option<PathBuf>,
    /// kafka-native: give shoal a state topic (`--kafka-state-topic`), so
    /// a stateful model snapshots each key's state per event.
    #[arg(long, env = "LOADGEN_KAFKA_STATE")]
    pub kafka_state: bool,
    /// Key space of a keyed workload; keyless when absent. Keys become the
    /// Kafka message key and the request's correlation key.
    #[arg(long, env = "LOADGEN_KEYS")]
    pub keys: Option<u64>,
    /// Input data points from a `.npy` file (float32/64, shape [N, isz...])
    /// instead of seeded synthetic ones.
    #[arg(long, env = "LOADGEN_NPY")]
    pub npy: Option<PathBuf>,
    /// Zipf exponent of the keys (e.g. 1.0); uniform when absent.
    #[arg(long, env = "LOADGEN_ZIPF")]
    pub zipf: Option<f64>,
    #[arg(long, env = "LOADGEN_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Fraction of the run discarded as warm-up.
    #[arg(long, env = "LOADGEN_WARMUP", default_value_t = 0.25)]
    pub warmup: f64,
    /// Folder for the JSON report.
    #[arg(long, env = "LOADGEN_OUT")]
    pub out: Option<PathBuf>,
    /// Kafka bootstrap servers (e.g. 127.0.0.1:9092); in-memory topics
    /// when absent.
    #[arg(long, env = "LOADGEN_BROKERS")]
    pub brokers: Option<String>,
}

impl ModelOpts {
    pub fn transport(&self) -> pipeline::Transport {
        match &self.brokers {
            Some(b) => pipeline::Transport::Kafka { brokers: b.clone() },
            None => pipeline::Transport::Memory,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunOpts {
    #[command(flatten)]
    pub model: ModelOpts,
    #[arg(long, env = "LOADGEN_MODE", value_enum, default_value = "embedded")]
    pub mode: Mode,
    /// Input rate, events/s (`ir`).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// Bursts as `burst_rate,burst_seconds,period_seconds` (`bd`, `tbb`):
    /// `--rate` between bursts.
    #[arg(long, env = "LOADGEN_BURSTS", value_delimiter = ',')]
    pub bursts: Option<Vec<f64>>,
    /// One event in flight at a time instead of an open-loop rate.
    #[arg(long, env = "LOADGEN_CLOSED_LOOP")]
    pub closed_loop: bool,
    /// Seconds to run.
    #[arg(long, env = "LOADGEN_DURATION", default_value_t = 10.0)]
    pub duration: f64,
    /// Processor parallelism (`mp`).
    #[arg(long, env = "LOADGEN_MP", default_value_t = 1)]
    pub mp: usize,
    /// Repeat the run this many times and report mean and spread.
    #[arg(long, env = "LOADGEN_REPEAT", default_value_t = 1)]
    pub repeat: usize,
}

#[derive(Args, Debug, Clone)]
pub struct CompareOpts {
    #[command(flatten)]
    pub model: ModelOpts,
    /// Serving modes to compare.
    #[arg(
        long,
        env = "LOADGEN_MODES",
        value_enum,
        value_delimiter = ',',
        default_value = "embedded,grpc,rest"
    )]
    pub modes: Vec<Mode>,
    /// Processor parallelisms to compare.
    #[arg(
        long,
        env = "LOADGEN_MPS",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    pub mp: Vec<usize>,
    /// Seconds per probe of the sustainable-throughput search.
    #[arg(long, env = "LOADGEN_PROBE_SECONDS", default_value_t = 3.0)]
    pub probe_seconds: f64,
    /// More models run through the same modes after `--model`, each row
    /// labelled with its model: e.g. `ffnn_torch` for the TorchScript row
    /// next to ONNX `ffnn` (build with `--features torch`).
    #[arg(long, env = "LOADGEN_ALSO_MODELS", value_delimiter = ',')]
    pub also_models: Vec<String>,
}

impl RunOpts {
    pub fn load(&self) -> Result<pipeline::Load, String> {
        if self.closed_loop {
            return Ok(pipeline::Load::Closed);
        }
        match &self.bursts {
            None => Ok(pipeline::Load::Open(schedule::Schedule::Constant {
                rate: self.rate,
            })),
            Some(v) if v.len() == 3 && v[1] > 0.0 && v[2] > v[1] => {
                Ok(pipeline::Load::Open(schedule::Schedule::Bursts {
                    base: self.rate,
                    burst: v[0],
                    burst_len: Duration::from_secs_f64(v[1]),
                    period: Duration::from_secs_f64(v[2]),
                }))
            }
            Some(_) => Err(
                "--bursts takes burst_rate,burst_seconds,period_seconds with period > burst".into(),
            ),
        }
    }
}

/// The experiment an option set describes (the load is set by the caller).
pub fn experiment(
    m: &ModelOpts,
    mp: usize,
    duration: f64,
    load: pipeline::Load,
) -> pipeline::Experiment {
    pipeline::Experiment {
        load,
        duration: Duration::from_secs_f64(duration),
        mp: mp.max(1),
        rows: m.bsz.max(1),
        point_len: m.isz.iter().product::<i64>().max(1) as usize,
        keys: m.keys,
        zipf: m.zipf,
        seed: m.seed,
        partition_capacity: 1 << 20,
        data: None,
    }
}

/// Everything a scorer of a mode needs, kept alive for the run (a sidecar
/// started here stops when this is dropped).
pub struct ScorerSetup {
    pub scorer: scorer::Scorer,
    pub sidecar: Option<server::Sidecar>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Server(#[from] server::ServerError),
    #[error(transparent)]
    Load(#[from] shoal::engine::LoadError),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
}

pub async fn scorer_for(mode: Mode, m: &ModelOpts) -> Result<ScorerSetup, SetupError> {
    let target = scorer::Target {
        model: m.model.clone(),
        input: m.input.clone(),
        shape: m.isz.clone(),
    };
    let sidecar = match (mode, &m.server) {
        (Mode::Grpc | Mode::Rest, None) => {
            let bin = m.shoal_bin.clone().unwrap_or_else(server::default_binary);
            Some(server::Sidecar::start(&bin, &m.model_repository)?)
        }
        _ => None,
    };
    let url = |grpc: bool| {
        m.server
            .clone()
            .or_else(|| {
                sidecar
                    .as_ref()
                    .map(|s| if grpc { s.grpc.clone() } else { s.http.clone() })
            })
            .unwrap_or_default()
    };
    let scorer = match mode {
        Mode::Noop => scorer::Scorer::Noop,
        Mode::KafkaNative => scorer::Scorer::KafkaNative(native::Target {
            bin: m.shoal_bin.clone().unwrap_or_else(server::default_binary),
            repository: m.model_repository.clone(),
            model: m.model.clone(),
            state_topic: m.kafka_state,
        }),
        Mode::Embedded => {
            let repo = m.model_repository.clone();
            let engine = tokio::task::spawn_blocking(move || {
                shoal::Engine::load(&repo, &Default::default())
            })
            .await
            .expect("loader thread")?;
            scorer::Scorer::Embedded { engine, target }
        }
        Mode::Grpc => {
            let u = url(true);
            let channel = tonic::transport::Channel::from_shared(u.clone())
                .map_err(|e| SetupError::Connect {
                    url: u.clone(),
                    reason: e.to_string(),
                })?
                .connect()
                .await
                .map_err(|e| SetupError::Connect {
                    url: u.clone(),
                    reason: e.to_string(),
                })?;
            let client =
                shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(
                    channel,
                )
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20);
            scorer::Scorer::Grpc { client, target }
        }
        Mode::Rest => {
            let base = url(false);
            scorer::Scorer::Rest {
                client: reqwest::Client::new(),
                url: format!("{base}/v2/models/{}/infer", m.model),
                target,
            }
        }
    };
    Ok(ScorerSetup { scorer, sidecar })
}
