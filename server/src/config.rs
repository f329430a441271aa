//! Command-line flags (each with an environment variable), named as
//! Triton's where Triton has one.

use crate::engine::control::ControlMode;
use crate::telemetry::{LogFormat, TelemetryConfig};
use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "shoal",
    version,
    about = "KServe v2 inference server with dynamic batching",
    after_help = "Subcommands:\n  shoal healthcheck [--url URL] [--timeout-ms MS]   exit 0 when a health endpoint answers 200 (exec probes); see `shoal healthcheck --help`"
)]
pub struct Args {
    /// Model repository: <dir>/<model>/<version>/model.onnx and
    /// <dir>/<model>/config.toml (or Triton's config.pbtxt). `--model-store`
    /// is Triton's older name for it.
    #[arg(long, env = "SHOAL_MODEL_REPOSITORY", alias = "model-store")]
    pub model_repository: PathBuf,

    /// As Triton's: true (the default) stops startup when a model fails to
    /// load in mode none; false serves the others, the failures in the index.
    #[arg(long, env = "SHOAL_EXIT_ON_ERROR", default_value_t = true,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub exit_on_error: bool,

    /// As Triton's: true refuses a model whose config does not declare its
    /// inputs and outputs (no completion from the graph).
    #[arg(long, env = "SHOAL_STRICT_MODEL_CONFIG", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub strict_model_config: bool,

    /// As Triton's `default-max-batch-size` (its `--backend-config` key,
    /// formerly this flag): the max_batch_size an ONNX model gets when its
    /// config.pbtxt (or no config) leaves it and its inputs or outputs to
    /// the graph and every graph input and output has a dynamic first dim;
    /// with no scheduler named it then batches as `dynamic_batching {}`.
    /// Triton's default is 4; shoal's is 0 (such models run each request
    /// alone). config.toml models are never changed.
    #[arg(long, env = "SHOAL_DEFAULT_MAX_BATCH_SIZE", default_value_t = 0)]
    pub default_max_batch_size: u32,

    /// As Triton's: `[BACKEND,]SETTING=VALUE` (repeat, or separate with
    /// `;` in the variable). shoal reads `default-max-batch-size`, global
    /// or for `onnxruntime` (which wins, as in Triton), over the flag
    /// above; other settings and backends are ignored with a warning.
    #[arg(
        long = "backend-config",
        env = "SHOAL_BACKEND_CONFIG",
        value_delimiter = ';'
    )]
    pub backend_config: Vec<String>,

    /// Also export Triton's names (nv_inference_request_success, ...) for the
    /// series both have, so dashboards built for Triton work unchanged.
    #[arg(long, env = "SHOAL_METRICS_TRITON_NAMES", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub metrics_triton_names: bool,

    /// As Triton's: a level above 0 logs at debug level where RUST_LOG does
    /// not say otherwise.
    #[arg(long, env = "SHOAL_LOG_VERBOSE", default_value_t = 0)]
    pub log_verbose: u32,

    /// Address every listener binds to; the loopback default suits a sidecar.
    #[arg(long, env = "SHOAL_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// REST port (0 picks a free one).
    #[arg(long, env = "SHOAL_HTTP_PORT", default_value_t = 8000)]
    pub http_port: u16,

    /// gRPC port (0 picks a free one).
    #[arg(long, env = "SHOAL_GRPC_PORT", default_value_t = 8001)]
    pub grpc_port: u16,

    /// Prometheus metrics and health port (0 picks a free one).
    #[arg(long, env = "SHOAL_METRICS_PORT", default_value_t = 8002)]
    pub metrics_port: u16,

    /// Path of libonnxruntime.so; otherwise ORT_DYLIB_PATH or the setup location.
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,

    /// Largest REST request body accepted, in bytes.
    #[arg(long, env = "SHOAL_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Most system shared-memory regions registered at once (each holds an
    /// open descriptor of its object).
    #[arg(long, env = "SHOAL_SHM_MAX_REGIONS", default_value_t = 128)]
    pub shm_max_regions: usize,

    /// Most bytes of system shared memory registered at once, all regions
    /// together.
    #[arg(long, env = "SHOAL_SHM_MAX_BYTES", default_value_t = 16 << 30)]
    pub shm_max_bytes: u64,

    /// Bearer token required to register, unregister or list system
    /// shared-memory regions (none: any client that reaches the port may).
    #[arg(long, env = "SHOAL_SHM_TOKEN")]
    pub shm_token: Option<String>,

    /// A new connection must send its first byte, and an HTTP/1.1 client
    /// a request's headers, within this many milliseconds, or the
    /// connection is closed (slowloris).
    #[arg(long, env = "SHOAL_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,

    /// A batch that runs longer than this many seconds fails with
    /// UNAVAILABLE, and its replica leaves service (and readiness) until
    /// the backend returns: a watchdog for a hung backend. 0 turns it off.
    #[arg(long, env = "SHOAL_BATCH_TIMEOUT_SECS", default_value_t = 60)]
    pub batch_timeout_secs: u64,

    /// Client connections open at once, REST and gRPC together; one more
    /// is closed as soon as it is accepted.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// A connection with no request in flight for this many seconds is
    /// closed gracefully (GOAWAY on HTTP/2; clients reconnect).
    #[arg(long, env = "SHOAL_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,

    /// HTTP/2 streams one connection may have open at once (REST over h2
    /// and gRPC).
    #[arg(long, env = "SHOAL_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Largest HTTP/2 header list accepted, in bytes (REST over h2 and gRPC).
    #[arg(long, env = "SHOAL_MAX_HEADER_LIST_BYTES", default_value_t = 16 << 10)]
    pub max_header_list_bytes: u32,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "SHOAL_GRPC_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub grpc_max_message_bytes: usize,

    /// Compress gRPC responses (when the client accepts the encoding):
    /// none, gzip, zstd or any. Requests may be compressed regardless.
    #[arg(
        long,
        env = "SHOAL_GRPC_RESPONSE_COMPRESSION",
        value_enum,
        default_value_t
    )]
    pub grpc_response_compression: crate::api::grpc::ResponseCompression,

    /// Seconds to wait for in-flight requests after SIGTERM/SIGINT.
    #[arg(long, env = "SHOAL_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,

    /// Threads of the network runtime (default: one per core).
    #[arg(long, env = "SHOAL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// none: load every model at startup, no changes; poll: also follow the
    /// repository's changes; explicit: load only on request (and --load-model).
    #[arg(long, env = "SHOAL_MODEL_CONTROL_MODE", value_enum, default_value_t = ControlMode::None)]
    pub model_control_mode: ControlMode,

    /// Models to load at startup in explicit mode (repeat, or comma-separate); `*`: all.
    #[arg(long = "load-model", env = "SHOAL_LOAD_MODEL", value_delimiter = ',')]
    pub load_models: Vec<String>,

    /// Seconds between repository polls in poll mode.
    #[arg(long, env = "SHOAL_REPOSITORY_POLL_SECS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub repository_poll_secs: u64,

    /// Serve the model repository API (index, load, unload).
    #[arg(long, env = "SHOAL_REPOSITORY_API", default_value_t = true, action = clap::ArgAction::Set)]
    pub repository_api: bool,

    /// Bearer token the repository API requires (prefer the environment
    /// variable: a flag shows in the process list).
    #[arg(long, env = "SHOAL_REPOSITORY_TOKEN", hide_env_values = true)]
    pub repository_token: Option<String>,
    /// Also serve REST on this Unix domain socket (a stale socket file
    /// there is replaced; the file is removed at exit).
    #[arg(long, env = "SHOAL_HTTP_UDS")]
    pub http_uds: Option<PathBuf>,

    /// Also serve gRPC on this Unix domain socket.
    #[arg(long, env = "SHOAL_GRPC_UDS")]
    pub grpc_uds: Option<PathBuf>,

    /// Serve REST on TCP; `false` leaves only --http-uds.
    #[arg(long, env = "SHOAL_HTTP_TCP", default_value_t = true, action = clap::ArgAction::Set)]
    pub http_tcp: bool,

    /// Serve gRPC on TCP; `false` leaves only --grpc-uds.
    #[arg(long, env = "SHOAL_GRPC_TCP", default_value_t = true, action = clap::ArgAction::Set)]
    pub grpc_tcp: bool,

    /// PEM certificate chain: serve REST and gRPC over TLS on TCP (Unix
    /// sockets and the metrics port stay plain).
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: require client certificates they sign (mutual TLS).
    #[arg(long, env = "SHOAL_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Log lines as human-readable text or as JSON objects (one a line).
    /// RUST_LOG sets the levels (default `info`).
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Write an access-log record per REST request and gRPC call (target
    /// `shoal_access`, in the log format).
    #[arg(long, env = "SHOAL_ACCESS_LOG", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub access_log: bool,

    /// Put correlation keys themselves in the access log (by default only
    /// a hash of each, since keys may identify people or devices).
    #[arg(long, env = "SHOAL_ACCESS_LOG_KEYS", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub access_log_keys: bool,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector (e.g.
    /// http://127.0.0.1:4317); tracing is off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share of requests traced, in [0, 1], when the caller's traceparent
    /// does not decide (a sampled traceparent is always followed).
    #[arg(long, env = "SHOAL_TRACE_RATE", default_value_t = 1.0)]
    pub trace_rate: f64,

    #[command(flatten)]
    pub kafka: crate::kafka::KafkaArgs,
}

impl Args {
    /// The logging and tracing part of the flags.
    pub fn telemetry(&self) -> TelemetryConfig {
        TelemetryConfig {
            log_format: self.log_format,
            access_log: self.access_log,
            access_log_keys: self.access_log_keys,
            otlp_endpoint: self.otlp_endpoint.clone().filter(|e| !e.is_empty()),
            trace_rate: self.trace_rate,
            verbose: self.log_verbose > 0,
        }
    }

    /// `default-max-batch-size` as Triton resolves it: `--backend-config`
    /// for `onnxruntime`, else its global one, else the older flag. Also
    /// returns what was ignored, to be logged; a malformed setting is an
    /// error naming it.
    pub fn default_max_batch_size(&self) -> Result<(u32, Vec<String>), String> {
        const KEY: &str = "default-max-batch-size";
        let (mut global, mut onnx, mut ignored) = (None, None, Vec::new());
        for spec in &self.backend_config {
            let bad = |why: &str| format!("--backend-config {spec:?}: {why}");
            let (backend, setting) = match spec.split_once(',') {
                Some((b, _)) if b.trim().is_empty() => return Err(bad("empty backend name")),
                Some((b, s)) => (Some(b.trim()), s),
                None => (None, spec.as_str()),
            };
            let (key, value) = setting
                .split_once('=')
                .ok_or_else(|| bad("expected [BACKEND,]SETTING=VALUE"))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() || value.is_empty() {
                return Err(bad("expected [BACKEND,]SETTING=VALUE"));
            }
            let slot = match (backend, key) {
                (None, KEY) => &mut global,
                (Some("onnxruntime"), KEY) => &mut onnx,
                _ => {
                    ignored.push(format!(
                        "--backend-config {spec:?} is ignored: shoal reads only {KEY}, global or for onnxruntime"
                    ));
                    continue;
                }
            };
            *slot = Some(
                value
                    .parse::<u32>()
                    .map_err(|_| bad(&format!("{KEY} must be a whole number >= 0")))?,
            );
        }
        Ok((
            onnx.or(global).unwrap_or(self.default_max_batch_size),
            ignored,
        ))
    }

    /// The TLS files, when TLS is on.
    pub fn tls(&self) -> Option<crate::listen::TlsFiles> {
        Some(crate::listen::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["shoal", "--model-repository", "r"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    #[test]
    fn default_max_batch_size_resolves_as_tritons_backend_config() {
        let get = |extra: &[&str]| args(extra).default_max_batch_size();
        assert_eq!(get(&[]).unwrap(), (0, vec![]));
        assert_eq!(get(&["--default-max-batch-size", "3"]).unwrap().0, 3);
        // Global over the flag, onnxruntime's over the global, in any order.
        let (n, ignored) = get(&[
            "--default-max-batch-size=3",
            "--backend-config=onnxruntime,default-max-batch-size=8",
            "--backend-config=default-max-batch-size=5",
            "--backend-config=tensorflow,default-max-batch-size=7",
            "--backend-config=onnxruntime,enable-global-threadpool=1",
        ])
        .unwrap();
        assert_eq!(n, 8);
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(ignored[0].contains("tensorflow"), "{ignored:?}");
        let (n, _) = get(&[
            "--default-max-batch-size=3",
            "--backend-config=default-max-batch-size=5",
        ])
        .unwrap();
        assert_eq!(n, 5);
        // Triton's malformed forms are refused, naming the setting.
        for bad in [
            ",default-max-batch-size=3",
            "default-max-batch-size=",
            "default-max-batch-size",
            "onnxruntime,default-max-batch-size=-1",
            "default-max-batch-size=four",
        ] {
            let e = get(&["--backend-config", bad]).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
