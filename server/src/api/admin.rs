//! The admin endpoints (Prometheus metrics, health) on their own thread and
//! runtime, so probes answer while the inference runtime is saturated.

use crate::engine::{metrics as m, Engine};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; later calls return
/// the same handle. Must run before models load so their handles record.
pub fn install_recorder() -> Result<PrometheusHandle, String> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), m::LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(m::BATCH_SIZE.into()), m::BATCH_BUCKETS)
                })
                .map_err(|e| e.to_string())?;
            let handle = builder.install_recorder().map_err(|e| e.to_string())?;
            m::describe();
            Ok(handle)
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    engine: Engine,
    handle: PrometheusHandle,
    /// Also export Triton's names (`--metrics-triton-names`).
    triton_names: bool,
}

pub fn router(engine: Engine, handle: PrometheusHandle, triton_names: bool) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .with_state(AdminState {
            engine,
            handle,
            triton_names,
        })
}

async fn metrics(State(st): State<AdminState>) -> impl IntoResponse {
    let mut text = st.handle.render();
    if st.triton_names {
        let triton = super::triton_metrics::derive(&text);
        text.push_str(&triton);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

async fn ready(State(st): State<AdminState>) -> StatusCode {
    if st.engine.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Serves the admin router on its own OS thread and single-threaded runtime
/// until `stop` fires.
pub fn spawn(
    listener: std::net::TcpListener,
    engine: Engine,
    handle: PrometheusHandle,
    triton_names: bool,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("shoal-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("admin runtime failed to start: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let upkeep_handle = handle.clone();
                let upkeep_stop = stop.clone();
                // Histograms buffer samples until upkeep folds them in; without
                // it memory would grow between scrapes.
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tokio::select! {
                            _ = tick.tick() => upkeep_handle.run_upkeep(),
                            _ = upkeep_stop.cancelled() => break,
                        }
                    }
                });
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("admin listener: {e}");
                        return;
                    }
                };
                let app = router(engine, handle, triton_names);
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                {
                    tracing::error!("admin server: {e}");
                }
            });
        })
}
