//! Logs and traces: the process's `tracing` subscriber (text or JSON lines
//! on stderr, the access log among them) and, when an OTLP endpoint is
//! given, OpenTelemetry spans exported over OTLP/gRPC, continuing a W3C
//! `traceparent` from the request's HTTP headers or gRPC metadata.
//!
//! Request spans carry their own target ([`SPAN_TARGET`]) that only the
//! OpenTelemetry layer listens to, and are made only while tracing is on,
//! so with tracing off the request path pays one relaxed load.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The target of request spans; only the OpenTelemetry layer sees it.
pub const SPAN_TARGET: &str = "shoal_span";
/// The target of access-log records.
pub const ACCESS_TARGET: &str = "shoal_access";

static TRACING: AtomicBool = AtomicBool::new(false);
static ACCESS_LOG: AtomicBool = AtomicBool::new(false);
static ACCESS_LOG_KEYS: AtomicBool = AtomicBool::new(false);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, with the fields tracing records at the top level.
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// Write an access-log record per call (target [`ACCESS_TARGET`]).
    pub access_log: bool,
    /// Put the correlation key itself in the access log, not only its hash.
    pub access_log_keys: bool,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; `None`: no tracing.
    pub otlp_endpoint: Option<String>,
    /// Share of root requests traced (a sampled `traceparent` is always followed).
    pub trace_rate: f64,
    /// Debug level where RUST_LOG is unset (Triton's `--log-verbose`).
    pub verbose: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--trace-rate must lie in [0, 1], not {0}")]
    Rate(f64),
    #[error("OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("logging is already set up: {0}")]
    Init(String),
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes what is buffered.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter. Blocks:
    /// call it off the async runtime, while the runtime is still running
    /// (the gRPC channel's task lives there).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            TRACING.store(false, Ordering::Relaxed);
            if let Err(e) = p.shutdown() {
                eprintln!("shoal: flushing traces: {e}");
            }
        }
    }
}

/// Installs the process-wide subscriber. With an OTLP endpoint this must
/// run inside a tokio runtime (the exporter's channel is made there).
pub fn init(cfg: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    if !(0.0..=1.0).contains(&cfg.trace_rate) {
        return Err(TelemetryError::Rate(cfg.trace_rate));
    }
    // Request spans are for the OpenTelemetry layer only; the access log
    // is on or off by its flag, whatever RUST_LOG says.
    let access = if cfg.access_log { "info" } else { "off" };
    // An empty RUST_LOG counts as unset (it would otherwise mean errors only).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        // h2 warns once per misbehaving connection (a rapid-reset client
        // opens thousands): a client must not be able to flood the log.
        .unwrap_or_else(|| {
            EnvFilter::new(if cfg.verbose {
                "debug"
            } else {
                "info,h2=error"
            })
        })
        .add_directive(
            format!("{SPAN_TARGET}=off")
                .parse()
                .expect("static directive"),
        )
        .add_directive(
            format!("{ACCESS_TARGET}={access}")
                .parse()
                .expect("static directive"),
        );
    let fmt = match cfg.log_format {
        // Colours only on a terminal: a pod's log file or a pipe gets
        // plain text that grep and log shippers read.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);

    let provider = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let err = |reason: String| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                reason,
            };
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| err(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("shoal")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                        cfg.trace_rate,
                    ))))
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("shoal"))
            .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Init(e.to_string()))?;
    TRACING.store(provider.is_some(), Ordering::Relaxed);
    ACCESS_LOG.store(cfg.access_log, Ordering::Relaxed);
    ACCESS_LOG_KEYS.store(cfg.access_log_keys, Ordering::Relaxed);
    Ok(Telemetry { provider })
}

/// Whether request spans are being made.
pub fn tracing_on() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Whether access-log records are written.
pub fn access_log_on() -> bool {
    ACCESS_LOG.load(Ordering::Relaxed)
}

/// Whether the access log names keys (else only their hash).
pub fn access_log_keys() -> bool {
    ACCESS_LOG_KEYS.load(Ordering::Relaxed)
}

/// HTTP headers (and gRPC metadata, which travel as HTTP/2 headers) as a
/// carrier of the W3C trace context.
pub struct HeaderCarrier<'a>(pub &'a axum::http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The span of one inference call, continuing the caller's trace when its
/// headers carry one; `None` while tracing is off. `name` is the span name
/// (the route or RPC) as OpenTelemetry shows it.
pub fn request_span(
    name: &str,
    protocol: &'static str,
    model: &str,
    headers: &axum::http::HeaderMap,
) -> Option<Span> {
    if !tracing_on() {
        return None;
    }
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "infer",
        otel.name = name,
        otel.kind = "server",
        rpc.system = protocol,
        model = model,
        model.version = tracing::field::Empty,
        batch.id = tracing::field::Empty,
        batch.size = tracing::field::Empty,
        replica = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.message = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
    // A span without a parent (no or a malformed traceparent) is a root.
    let _ = span.set_parent(parent);
    Some(span)
}

/// Marks a request span failed.
pub fn record_error(span: &Option<Span>, message: &str) {
    if let Some(s) = span {
        s.record("otel.status_code", "ERROR");
        s.record("error.message", message);
    }
}
