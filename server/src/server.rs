//! Wires the engine to its listeners: REST, gRPC and admin, and runs until
//! a shutdown signal, draining in-flight requests before it returns.

use crate::api::auth::Bearer;
use crate::api::repository::{self, RepositoryApi};
use crate::api::{admin, grpc::GrpcService, http};
use crate::config::Args;
use crate::engine::control::{ControlError, ControlMode, ModelControl};
use crate::engine::{Engine, EngineOptions, LoadError};
use crate::listen::{self, ListenError};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("{0}")]
    Config(String),
    #[error("metrics recorder: {0}")]
    Metrics(String),
    #[error("{0} server failed: {1}")]
    Serve(&'static str, String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
}

/// The addresses actually bound (port 0 resolved).
#[derive(Debug, Clone)]
pub struct Bound {
    /// `None`: no TCP listener (`--http-tcp false`).
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub http_uds: Option<PathBuf>,
    pub grpc_uds: Option<PathBuf>,
    /// The TCP listeners speak TLS.
    pub tls: bool,
}

impl std::fmt::Display for Bound {
    /// The one line a script reads to find the ports. The first three
    /// fields are always there (`off` for a protocol without TCP); the
    /// others follow only when configured, so older readers still match.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tcp = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        write!(
            f,
            "shoal listening http={} grpc={} metrics={}",
            tcp(self.http),
            tcp(self.grpc),
            self.metrics
        )?;
        if let Some(p) = &self.http_uds {
            write!(f, " http_uds={}", p.display())?;
        }
        if let Some(p) = &self.grpc_uds {
            write!(f, " grpc_uds={}", p.display())?;
        }
        if self.tls {
            write!(f, " tls=on")?;
        }
        Ok(())
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
    crate::gpu::spawn_metrics(std::time::Duration::from_secs(5));
    let (default_max_batch_size, ignored) =
        args.default_max_batch_size().map_err(ServeError::Config)?;
    for i in ignored {
        tracing::warn!("{i}");
    }
    let options = EngineOptions {
        ort_library: args.ort_library.clone(),
        strict_model_config: args.strict_model_config,
        default_max_batch_size,
    };
    let repo = args.model_repository.clone();
    let mode = args.model_control_mode;
    // Mode none with --exit-on-error=false loads model by model, as the
    // other modes do, so one broken model leaves the rest serving.
    let each = mode == ControlMode::None && !args.exit_on_error;
    let engine = if mode == ControlMode::None && !each {
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
    if each {
        control.load_every_model().await?;
    } else {
        control.initial_load(&args.load_models).await?;
    }
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

    if !args.http_tcp && args.http_uds.is_none() {
        return Err(ServeError::Config(
            "--http-tcp false needs --http-uds: REST would listen nowhere".into(),
        ));
    }
    if !args.grpc_tcp && args.grpc_uds.is_none() {
        return Err(ServeError::Config(
            "--grpc-tcp false needs --grpc-uds: gRPC would listen nowhere".into(),
        ));
    }
    let tls = args.tls();
    let http_tls = tls
        .as_ref()
        .map(|t| listen::tls_acceptor(t, &[b"h2", b"http/1.1"]))
        .transpose()?;
    let grpc_tls = tls
        .as_ref()
        .map(|t| listen::tls_acceptor(t, &[b"h2"]))
        .transpose()?;
    let http_l = args
        .http_tcp
        .then(|| bind("http", SocketAddr::new(args.bind, args.http_port)))
        .transpose()?;
    let grpc_l = args
        .grpc_tcp
        .then(|| bind("grpc", SocketAddr::new(args.bind, args.grpc_port)))
        .transpose()?;
    let admin_l = bind("metrics", SocketAddr::new(args.bind, args.metrics_port))?;
    // The socket files are removed when these guards drop, at return.
    let http_uds = args
        .http_uds
        .as_deref()
        .map(listen::bind_unix)
        .transpose()?;
    let grpc_uds = args
        .grpc_uds
        .as_deref()
        .map(listen::bind_unix)
        .transpose()?;
    let (http_uds, _http_uds_file) = http_uds.unzip();
    let (grpc_uds, _grpc_uds_file) = grpc_uds.unzip();
    let bound = Bound {
        http: http_l
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket")),
        grpc: grpc_l
            .as_ref()
            .map(|l| l.local_addr().expect("bound socket")),
        metrics: admin_l.local_addr().expect("bound socket"),
        http_uds: args.http_uds.clone(),
        grpc_uds: args.grpc_uds.clone(),
        tls: tls.is_some(),
    };

    let shm = std::sync::Arc::new(
        crate::shm::SharedMemory::new().with_limits(args.shm_max_regions, args.shm_max_bytes),
    );
    let stop = CancellationToken::new();
    let admin_thread = admin::spawn(
        admin_l,
        engine.clone(),
        prom,
        args.metrics_triton_names,
        stop.clone(),
    )
    .map_err(|source| ServeError::Bind {
        what: "metrics",
        addr: bound.metrics,
        source,
    })?;

    let tokio_tcp = |what, l: Option<std::net::TcpListener>| {
        l.map(|l| {
            let addr = l.local_addr().expect("bound socket");
            tokio::net::TcpListener::from_std(l).map_err(|source| ServeError::Bind {
                what,
                addr,
                source,
            })
        })
        .transpose()
    };
    let http_l = tokio_tcp("http", http_l)?;
    let grpc_l = tokio_tcp("grpc", grpc_l)?;
    let repository_api = RepositoryApi::new(
        control.clone(),
        args.repository_api,
        args.repository_token.clone(),
    );
    let http_state = http::HttpState {
        engine: engine.clone(),
        max_body_bytes: args.max_body_bytes,
        shm: shm.clone(),
        shm_token: Bearer::new(args.shm_token.clone()),
    };
    let app = crate::api::rest_app::serve(
        http_state.clone(),
        http::router(http_state).merge(repository::router(repository_api.clone())),
    );
    let limits = listen::HttpLimits {
        header_read_timeout: std::time::Duration::from_millis(args.http_header_timeout_ms.max(1)),
        max_concurrent_streams: args.max_concurrent_streams,
        max_header_list_bytes: args.max_header_list_bytes,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs.max(1)),
    };
    let slots = crate::connections::ConnectionSlots::new(args.max_connections);
    let http_tasks = listen::serve_http(http_l, http_uds, http_tls, app, &stop, limits, &slots)
        .map_err(|e| ServeError::Serve("http", e.to_string()))?;
    let svc = GrpcService::new(engine.clone())
        .with_shared_memory(shm.clone(), Bearer::new(args.shm_token.clone()))
        .with_repository(repository_api)
        .with_shutdown(stop.clone())
        .into_server(args.grpc_max_message_bytes, args.grpc_response_compression);
    let grpc_tasks = listen::serve_grpc(grpc_l, grpc_uds, grpc_tls, svc, &stop, limits, &slots)
        .map_err(|e| ServeError::Serve("grpc", e.to_string()))?;

    // Kafka-native serving starts once the models are loaded; a broker
    // that does not answer fails startup within seconds.
    let kafka = match args.kafka.config(args.max_body_bytes)? {
        None => None,
        Some(cfg) => {
            if let Some((m, v)) = &cfg.model {
                if mode == ControlMode::None {
                    engine
                        .model(m, v.as_deref())
                        .map_err(|e| ServeError::Config(format!("--kafka-model {m}: {e}")))?;
                }
            }
            let (engine, rt) = (engine.clone(), tokio::runtime::Handle::current());
            let k = tokio::task::spawn_blocking(move || {
                crate::kafka::KafkaServing::start(engine, cfg, rt)
            })
            .await
            .map_err(|e| ServeError::Serve("kafka", e.to_string()))??;
            Some(k)
        }
    };

    tracing::info!(%bound, "listening");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{bound}");
        let _ = out.flush();
    }

    if args.batch_timeout_secs > 0 {
        let (engine, stop) = (engine.clone(), stop.clone());
        let limit = Duration::from_secs(args.batch_timeout_secs);
        // Checked four times per limit (at least every 250 ms).
        let every = (limit / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => engine.watch_batches(limit),
                }
            }
        });
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

    let kafka_failed = async {
        match &kafka {
            Some(k) => k.failed().await,
            None => std::future::pending().await,
        }
    };
    let mut failure = None;
    tokio::select! {
        _ = shutdown => {}
        reason = kafka_failed => failure = Some(reason),
    }
    // Kafka intake stops first: what it took finishes and is committed
    // while the engine still accepts work.
    if let Some(k) = kafka {
        let timeout = Duration::from_secs(args.shutdown_timeout_secs);
        match tokio::task::spawn_blocking(move || k.stop(timeout)).await {
            Ok(Err(e)) => tracing::warn!("{e}"),
            Err(e) => tracing::warn!("kafka consumer: {e}"),
            Ok(Ok(())) => {}
        }
    }
    tracing::info!("shutting down: readiness off, refusing new requests, draining in-flight ones");
    engine.stop_accepting();
    stop.cancel();
    // Every connection has been sent GOAWAY (HTTP/2) or told to close
    // after its current request (HTTP/1.1). A connection ends when its
    // requests are answered and its client has closed, or, once nothing is
    // in flight on it, after a short linger (connections.rs): a client that
    // ignores GOAWAY cannot hold the exit hostage, and a slow reader of a
    // long answer is not cut off.
    let drain = async {
        engine.wait_idle().await;
        tracing::debug!("engine idle");
        for (what, tasks) in [("http", http_tasks), ("grpc", grpc_tasks)] {
            for t in tasks {
                if let Ok(Err(e)) = t.await {
                    tracing::warn!("{what} server: {e}");
                }
            }
        }
        tracing::debug!("servers closed");
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
    match failure {
        Some(reason) => Err(crate::kafka::KafkaError::Fatal(reason).into()),
        None => Ok(()),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    // Registered now, not at the first poll: `run` prints the listening
    // line before it awaits this, and a SIGTERM in between must not take
    // the default action (killing the process without a drain).
    #[cfg(unix)]
    let (term, int) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
