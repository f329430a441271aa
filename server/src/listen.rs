//! Listeners beyond plain TCP, for a sidecar: Unix domain sockets (the
//! client on the same host skips the TCP stack, and file permissions guard
//! access) and TLS with rustls on the TCP listeners, optionally requiring
//! client certificates. Each listener is served by its own server task;
//! all of them stop on one cancellation token.

use crate::api::grpc::GrpcService;
pub use crate::connections::HttpLimits;
use crate::connections::{self, ConnBody, ConnService, ConnectionSlots, Protocol, ServerTask};
use axum::serve::ListenerExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shoal_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client that opens a TCP connection and never finishes the handshake
/// holds nothing longer than this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshaken connections waiting to be served.
const ACCEPT_BACKLOG: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("Unix socket {path}: {message}")]
    Socket { path: PathBuf, message: String },
}

/// PEM files for TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When given, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, ListenError> {
    std::fs::read(path).map_err(|source| ListenError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ListenError> {
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ListenError::Pem {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ListenError::Pem {
            what,
            path: path.to_path_buf(),
            message: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A rustls acceptor from PEM files, offering `alpn` (gRPC needs `h2`).
pub fn tls_acceptor(files: &TlsFiles, alpn: &[&[u8]]) -> Result<TlsAcceptor, ListenError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certs("certificate", &files.cert)?;
    let key_pem = read_pem("private key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ListenError::Pem {
        what: "private key",
        path: files.key.clone(),
        message: e.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ListenError::Tls(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("client CA", ca)? {
                roots
                    .add(c)
                    .map_err(|e| ListenError::Tls(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| ListenError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| ListenError::Tls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds a Unix socket at `path`. A socket file left by a server that is
/// gone is replaced; a live socket or any other file is an error, so a
/// typo never deletes someone's file and two servers never share a path.
pub fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ListenError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |message: String| ListenError::Socket {
        path: path.to_path_buf(),
        message,
    };
    if path.to_string_lossy().contains(char::is_whitespace) {
        // The listening line is space-separated.
        return Err(err("the path must not contain whitespace".into()));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("another server is listening on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("cannot remove stale socket: {e}")))?;
            tracing::info!(path = %path.display(), "removed a stale socket file");
        }
        Ok(_) => return Err(err("exists and is not a socket".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    let l = UnixListener::bind(path).map_err(|e| err(format!("cannot bind: {e}")))?;
    Ok((l, SocketFile(path.to_path_buf())))
}

/// Removes its socket file when dropped (at shutdown).
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A TLS connection over TCP, served by both axum and tonic.
pub struct TlsConn(tokio_rustls::server::TlsStream<TcpStream>);

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and runs their TLS handshakes concurrently (a
/// slow client delays no one), handing over the finished ones.
fn tls_accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    stop: CancellationToken,
) -> mpsc::Receiver<(TlsConn, SocketAddr)> {
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.cancelled() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((TlsConn(tls), peer)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// Handshaken TLS connections as an axum listener.
struct TlsListener {
    rx: mpsc::Receiver<(TlsConn, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop stopped: shutdown is under way.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves REST on each listener given.
pub fn serve_http(
    tcp: Option<tokio::net::TcpListener>,
    uds: Option<UnixListener>,
    tls: Option<TlsAcceptor>,
    app: crate::api::rest_app::RestApp,
    stop: &CancellationToken,
    limits: HttpLimits,
    slots: &ConnectionSlots,
) -> io::Result<Vec<ServerTask>> {
    serve(
        tcp,
        uds,
        tls,
        app,
        axum::body::Body::new,
        Protocol::Rest,
        stop,
        limits,
        slots,
    )
}

/// Serves gRPC on each listener given.
pub fn serve_grpc(
    tcp: Option<tokio::net::TcpListener>,
    uds: Option<UnixListener>,
    tls: Option<TlsAcceptor>,
    svc: GrpcInferenceServiceServer<GrpcService>,
    stop: &CancellationToken,
    limits: HttpLimits,
    slots: &ConnectionSlots,
) -> io::Result<Vec<ServerTask>> {
    use tower::Layer;
    let svc = crate::api::access::AccessLayer::new("grpc").layer(svc);
    serve(
        tcp,
        uds,
        tls,
        svc,
        tonic::body::Body::new,
        Protocol::Grpc,
        stop,
        limits,
        slots,
    )
}

#[allow(clippy::too_many_arguments)]
fn serve<S, ReqB, ResB>(
    tcp: Option<tokio::net::TcpListener>,
    uds: Option<UnixListener>,
    tls: Option<TlsAcceptor>,
    svc: S,
    body: fn(hyper::body::Incoming) -> ReqB,
    protocol: Protocol,
    stop: &CancellationToken,
    limits: HttpLimits,
    slots: &ConnectionSlots,
) -> io::Result<Vec<ServerTask>>
where
    S: ConnService<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: ConnBody,
{
    let spawner = connections::Spawner {
        svc,
        body,
        protocol,
        stop: stop.clone(),
        limits,
        slots: slots.clone(),
    };
    let mut tasks = Vec::new();
    match (tcp, tls) {
        (Some(l), Some(acceptor)) => {
            let local = l.local_addr()?;
            let rx = tls_accept_loop(l, acceptor, stop.clone());
            tasks.push(spawner.spawn(TlsListener { rx, local }));
        }
        (Some(l), None) => {
            tasks.push(spawner.spawn(l.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            })));
        }
        (None, _) => {}
    }
    if let Some(l) = uds {
        tasks.push(spawner.spawn(l));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_socket_is_replaced_and_others_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A socket whose server is gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (live, file) = bind_unix(&path).unwrap();
        // A live one is refused.
        let e = bind_unix(&path).unwrap_err();
        assert!(e.to_string().contains("listening"), "{e}");
        drop(live);
        drop(file);
        assert!(!path.exists(), "the socket file is removed on drop");
        // A regular file is never deleted.
        std::fs::write(&path, b"data").unwrap();
        let e = bind_unix(&path).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
    }

    #[test]
    fn bad_tls_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let files = TlsFiles {
            cert: cert.clone(),
            key: dir.path().join("missing.pem"),
            client_ca: None,
        };
        let e = tls_acceptor(&files, &[]).err().unwrap();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
