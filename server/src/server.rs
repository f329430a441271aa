//! Wires the engine to its listeners: REST, gRPC and admin, and runs until
//! a shutdown signal, draining in-flight requests before it returns.

use crate::api::repository::{self, RepositoryApi};
use crate::api::{admin, grpc::GrpcService, http};
use crate::config::Args;
use crate::engine::control::{ControlError, ControlMode, ModelControl};
use crate::engine::{Engine, EngineOptions, LoadError};
use axum::serve::ListenerExt;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Time the servers get to flush answers after the engine is idle.
const FLUSH_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics recorder: {0}")]
    Metrics(String),
    #[error("{0} server failed: {1}")]
    Serve(&'static str, String),
}

/// The addresses actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
}

impl std::fmt::Display for Bound {
    /// The one line a script reads to find the ports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "shoal listening http={} grpc={} metrics={}",
            self.http, self.grpc, self.metrics
        )
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Bind {
        what,
        addr,
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| ServeError::Bind { what, addr, source })?;
    Ok(l)
}

/// Loads the repository, serves until `shutdown` resolves, then drains.
pub async fn run(args: Args, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let prom = admin::install_recorder().map_err(ServeError::Metrics)?;
    let options = EngineOptions {
        ort_library: args.ort_library.clone(),
    };
    let repo = args.model_repository.clone();
    let mode = args.model_control_mode;
    let engine = if mode == ControlMode::None {
        let options = options.clone();
        tokio::task::spawn_blocking(move || Engine::load(&repo, &options))
            .await
            .map_err(|e| ServeError::Serve("loader", e.to_string()))??
    } else {
        Engine::new()
    };
    let control = ModelControl::new(
        engine.clone(),
        args.model_repository.clone(),
        options,
        mode,
        Duration::from_secs(args.shutdown_timeout_secs),
    );
    control.initial_load(&args.load_models).await?;
    for (name, model) in engine.models().iter() {
        for (v, mv) in &model.versions {
            let c = mv.config();
            let providers: Vec<&str> = mv
                .replicas
                .iter()
                .map(|r| r.execution_provider.as_str())
                .collect();
            tracing::info!(
                model = %name,
                version = v,
                replicas = mv.replicas.len(),
                max_batch_size = c.max_batch_size,
                dynamic_batching = c.dynamic_batching.is_some(),
                execution_providers = ?providers,
                "model ready"
            );
        }
    }

    let http_l = bind("http", SocketAddr::new(args.bind, args.http_port))?;
    let grpc_l = bind("grpc", SocketAddr::new(args.bind, args.grpc_port))?;
    let admin_l = bind("metrics", SocketAddr::new(args.bind, args.metrics_port))?;
    let bound = Bound {
        http: http_l.local_addr().expect("bound socket"),
        grpc: grpc_l.local_addr().expect("bound socket"),
        metrics: admin_l.local_addr().expect("bound socket"),
    };

    let stop = CancellationToken::new();
    let admin_thread =
        admin::spawn(admin_l, engine.clone(), prom, stop.clone()).map_err(|source| {
            ServeError::Bind {
                what: "metrics",
                addr: bound.metrics,
                source,
            }
        })?;

    let http_l = tokio::net::TcpListener::from_std(http_l)
        .map_err(|source| ServeError::Bind {
            what: "http",
            addr: bound.http,
            source,
        })?
        .tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
    let repository_api = RepositoryApi::new(
        control.clone(),
        args.repository_api,
        args.repository_token.clone(),
    );
    let app = http::router(http::HttpState {
        engine: engine.clone(),
        max_body_bytes: args.max_body_bytes,
    })
    .merge(repository::router(repository_api.clone()));
    let http_stop = stop.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http_l, app)
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
            .map_err(|e| e.to_string())
    });

    let grpc_l = tokio::net::TcpListener::from_std(grpc_l).map_err(|source| ServeError::Bind {
        what: "grpc",
        addr: bound.grpc,
        source,
    })?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_l);
    let incoming = tokio_stream::StreamExt::map(incoming, |s| {
        s.inspect(|tcp| {
            let _ = tcp.set_nodelay(true);
        })
    });
    let svc = GrpcService::new(engine.clone())
        .with_repository(repository_api)
        .into_server(args.grpc_max_message_bytes);
    let grpc_stop = stop.clone();
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move { grpc_stop.cancelled().await })
            .await
            .map_err(|e| e.to_string())
    });

    tracing::info!(http = %bound.http, grpc = %bound.grpc, metrics = %bound.metrics, "listening");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{bound}");
        let _ = out.flush();
    }

    if mode == ControlMode::Poll {
        let (control, stop) = (control.clone(), stop.clone());
        let every = Duration::from_secs(args.repository_poll_secs);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(every) => control.poll().await,
                }
            }
        });
    }

    shutdown.await;
    tracing::info!("shutting down: readiness off, refusing new requests, draining in-flight ones");
    engine.stop_accepting();
    stop.cancel();
    // In-flight requests are answered by the engine; then the servers get a
    // moment to write those answers and close their connections. An idle
    // client connection that ignores GOAWAY cannot hold the exit hostage.
    let drain = async {
        engine.wait_idle().await;
        tracing::debug!("engine idle");
        let servers = async {
            let h = http_task.await;
            let g = grpc_task.await;
            (h, g)
        };
        match tokio::time::timeout(FLUSH_GRACE, servers).await {
            Ok((Ok(Err(e)), _)) => tracing::warn!("http server: {e}"),
            Ok((_, Ok(Err(e)))) => tracing::warn!("grpc server: {e}"),
            Ok(_) => tracing::debug!("servers closed"),
            Err(_) => tracing::debug!("connections still open after the flush grace; closing"),
        }
    };
    if tokio::time::timeout(Duration::from_secs(args.shutdown_timeout_secs), drain)
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within the shutdown timeout");
    }
    let e = engine.clone();
    let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
    let _ = admin_thread.join();
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
