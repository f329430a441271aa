//! How each accepted connection is served, REST and gRPC alike: hyper's
//! HTTP/1.1 and HTTP/2 with shoal's limits, a cap on open connections,
//! timeouts for connections that stay silent or idle, and a close at
//! shutdown that answers every request in flight and that no client can
//! hold up by ignoring GOAWAY.
//!
//! gRPC is served here rather than by tonic's `Server` because that server
//! waits on each connection's graceful close with no bound: a client that
//! never answers the GOAWAY ping, or a connection that never sent a byte,
//! keeps it from returning (hyper issue 4170). Owning the loop lets a
//! connection with nothing in flight be closed after a short linger while
//! one with requests in flight gets the whole shutdown timeout.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// After shutdown starts, a connection with nothing in flight and nothing
/// left to write for this long is closed, whether or not its client
/// finished the GOAWAY exchange. A client that answers the GOAWAY ping
/// closes well within it (a local round trip). A slow reader of a long
/// answer keeps its connection while the answer is being written (up to
/// the shutdown timeout).
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// How long a closing connection waits for its client to close too.
const LINGERING_CLOSE: Duration = Duration::from_millis(500);

/// How often a connection with requests in flight rechecks, while shutting
/// down, whether it has become idle.
const BUSY_RECHECK: Duration = Duration::from_millis(50);

/// Connections accepted and refused, and open now.
pub const CONNECTIONS_OPEN: &str = "shoal_connections_open";
pub const CONNECTIONS_REFUSED: &str = "shoal_connections_refused_total";
pub const CONNECTIONS_CLOSED_IDLE: &str = "shoal_connections_closed_idle_total";

/// Connection limits, shared by the REST and gRPC listeners.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// A connection must send its first byte, and an HTTP/1.1 request its
    /// headers, within this (slowloris).
    pub header_read_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Largest HTTP/2 header list accepted, in bytes.
    pub max_header_list_bytes: u32,
    /// A connection with no request in flight for this long is closed
    /// (GOAWAY on HTTP/2, `Connection: close` semantics on HTTP/1.1).
    pub idle_timeout: Duration,
}

/// The cap on open connections, one for the whole server: a connection
/// beyond it is closed as soon as it is accepted, so the server's memory
/// stays bounded and the client learns at once instead of hanging in the
/// kernel's backlog.
#[derive(Debug, Clone)]
pub struct ConnectionSlots(Arc<Semaphore>);

impl ConnectionSlots {
    pub fn new(max: usize) -> Self {
        metrics::describe_gauge!(CONNECTIONS_OPEN, "Client connections open (REST and gRPC)");
        metrics::describe_counter!(
            CONNECTIONS_REFUSED,
            "Client connections closed on accept because --max-connections were open"
        );
        metrics::describe_counter!(
            CONNECTIONS_CLOSED_IDLE,
            "Client connections closed for sending nothing within the header timeout or for \
             staying idle past --idle-timeout-secs"
        );
        Self(Arc::new(Semaphore::new(
            max.clamp(1, Semaphore::MAX_PERMITS),
        )))
    }

    fn take(&self, protocol: &'static str) -> Option<OwnedSemaphorePermit> {
        match self.0.clone().try_acquire_owned() {
            Ok(p) => {
                metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
                Some(p)
            }
            Err(_) => {
                metrics::counter!(CONNECTIONS_REFUSED, "protocol" => protocol).increment(1);
                None
            }
        }
    }
}

/// What a connection has been doing, for its idle and shutdown timers.
struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    /// Nanoseconds after `born` when `in_flight` last fell to zero.
    idle_since_ns: AtomicU64,
    /// Nanoseconds after `born` of the last write that made progress: an
    /// answer's body is done for its service once hyper holds all of it,
    /// which for a large one is long before a slow client has read it.
    wrote_ns: AtomicU64,
    /// The last write found the socket full: hyper holds bytes the client
    /// has not taken yet (a slow reader of a long answer).
    write_blocked: AtomicBool,
    /// Whether the client has sent any byte.
    heard: AtomicBool,
    /// Whether it speaks HTTP/2 (seen on its first request).
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ns: AtomicU64::new(0),
            wrote_ns: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Nothing in flight and nothing waiting to be written.
    fn quiet(&self) -> bool {
        self.idle() && !self.write_blocked.load(Ordering::Relaxed)
    }

    /// Notes a write's outcome: progress, or a full socket.
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                let ns = self.born.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                self.wrote_ns.store(ns, Ordering::Relaxed);
                if self.write_blocked.load(Ordering::Relaxed) {
                    self.write_blocked.store(false, Ordering::Relaxed);
                }
            }
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    fn idle_since(&self) -> Instant {
        self.born + Duration::from_nanos(self.idle_since_ns.load(Ordering::Relaxed))
    }

    /// Since when nothing has been in flight and nothing written.
    fn quiet_since(&self) -> Instant {
        let wrote = Duration::from_nanos(self.wrote_ns.load(Ordering::Relaxed));
        self.idle_since().max(self.born + wrote)
    }
}

/// One request in flight on a connection, until its response body has
/// been sent or dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ns = a.born.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        // Stored before the count falls, so a timer that sees zero reads an
        // idle start no older than the last request's end.
        a.idle_since_ns.fetch_max(ns, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's stream, noting the first byte the client sends and
/// each write's progress. Dropped (when hyper is done with it), it hands
/// the stream back for a lingering close.
struct Heard<IO> {
    io: Option<IO>,
    activity: Arc<Activity>,
    back: Arc<parking_lot::Mutex<Option<IO>>>,
}

impl<IO> Drop for Heard<IO> {
    fn drop(&mut self) {
        *self.back.lock() = self.io.take();
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection handed back")
}

impl<IO: AsyncRead + Unpin> AsyncRead for Heard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let r = Pin::new(io).poll_read(cx, buf);
        if buf.filled().len() > before && !self.activity.heard.load(Ordering::Relaxed) {
            self.activity.heard.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Heard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let r = Pin::new(io).poll_write(cx, buf);
        self.activity.wrote(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let Some(io) = self.io.as_mut() else {
            return Poll::Ready(Err(gone()));
        };
        let r = Pin::new(io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Err(gone())),
        }
    }
}

/// Closes a connection the way nginx's lingering close does: send FIN,
/// then read and discard what the client still sends until it closes too
/// (or `LINGERING_CLOSE` passes). Closing a socket with unread bytes in it
/// makes the kernel send RST, and a client's kernel that receives RST
/// discards what it had not read yet: the last answers and the GOAWAY.
async fn lingering_close<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(LINGERING_CLOSE, async {
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Which HTTP versions a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// REST: HTTP/1.1 and HTTP/2 (prior knowledge or ALPN).
    Rest,
    /// gRPC: HTTP/2 only.
    Grpc,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Rest => "http",
            Protocol::Grpc => "grpc",
        }
    }
}

/// A running server task; `Err` carries its failure.
pub type ServerTask = JoinHandle<Result<(), String>>;

/// A service a connection can run: a tower service from `Request<ReqB>`
/// that never fails (errors are answers), with a body hyper can send.
pub trait ConnService<ReqB, ResB>:
    tower::Service<Request<ReqB>, Response = Response<ResB>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<T, ReqB, ResB> ConnService<ReqB, ResB> for T where
    T: tower::Service<Request<ReqB>, Response = Response<ResB>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// A response body a connection can send.
pub trait ConnBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B> ConnBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What every listener of one protocol serves, and how.
pub struct Spawner<S, ReqB> {
    pub svc: S,
    /// Turns hyper's request body into the one `svc` takes.
    pub body: fn(Incoming) -> ReqB,
    pub protocol: Protocol,
    pub stop: CancellationToken,
    pub limits: HttpLimits,
    pub slots: ConnectionSlots,
}

impl<S, ReqB> Spawner<S, ReqB> {
    /// Serves every connection `listener` accepts until `stop`; then stops
    /// accepting (the listening socket closes, so new clients are refused
    /// at once), closes each connection gracefully, and ends when all are
    /// closed.
    pub fn spawn<L, ResB>(&self, mut listener: L) -> ServerTask
    where
        L: axum::serve::Listener,
        S: ConnService<ReqB, ResB>,
        ReqB: Send + 'static,
        ResB: ConnBody,
    {
        let (svc, body, protocol, limits) =
            (self.svc.clone(), self.body, self.protocol, self.limits);
        let (stop, slots) = (self.stop.clone(), self.slots.clone());
        tokio::spawn(async move {
            // Each connection task holds a sender; all dropped: all closed.
            let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
            loop {
                let (io, _peer) = tokio::select! {
                    c = listener.accept() => c,
                    _ = stop.cancelled() => match futures::FutureExt::now_or_never(listener.accept()) {
                        // Connections the kernel completed before the
                        // listener closes are served (their requests are
                        // refused with a status), not reset with the backlog.
                        Some(c) => c,
                        None => break,
                    },
                };
                let Some(permit) = slots.take(protocol.name()) else {
                    tracing::debug!(
                        protocol = protocol.name(),
                        "connection refused: at --max-connections"
                    );
                    drop(io);
                    continue;
                };
                let conn = serve_one(io, svc.clone(), body, protocol, stop.clone(), limits);
                let open = open_tx.clone();
                tokio::spawn(async move {
                    conn.await;
                    metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
                    drop(permit);
                    drop(open);
                });
            }
            drop(listener);
            drop(open_tx);
            let _ = open_rx.recv().await;
            Ok(())
        })
    }
}

/// What a connection's timer decided.
enum Verdict {
    Keep,
    /// Start a graceful close (GOAWAY).
    Close,
    /// Close the socket now.
    Drop,
}

fn serve_one<IO, S, ReqB, ResB>(
    io: IO,
    svc: S,
    body: fn(Incoming) -> ReqB,
    protocol: Protocol,
    stop: CancellationToken,
    limits: HttpLimits,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnService<ReqB, ResB>,
    ReqB: Send + 'static,
    ResB: ConnBody,
{
    let activity = Activity::new();
    let back = Arc::new(parking_lot::Mutex::new(None));
    let io = TokioIo::new(Heard {
        io: Some(io),
        activity: activity.clone(),
        back: back.clone(),
    });
    let per_request = {
        let (activity, stop) = (activity.clone(), stop.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_flight = activity.begin();
            let h1 = req.version() < hyper::Version::HTTP_2;
            if !h1 && !activity.h2.load(Ordering::Relaxed) {
                activity.h2.store(true, Ordering::Relaxed);
            }
            let (mut svc, stop) = (svc.clone(), stop.clone());
            async move {
                std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                let mut resp = svc.call(req.map(body)).await?;
                if h1 && stop.is_cancelled() {
                    // Shutting down: hyper closes the connection after this
                    // answer, and the client knows not to reuse it.
                    resp.headers_mut().insert(
                        hyper::header::CONNECTION,
                        hyper::header::HeaderValue::from_static("close"),
                    );
                }
                Ok::<_, Infallible>(resp.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    async move {
        drive(io, per_request, protocol, &activity, &stop, &limits).await;
        // hyper is done with the stream (the connection future dropped).
        let io = back.lock().take();
        if let Some(io) = io {
            lingering_close(io).await;
        }
    }
}

/// Runs hyper on one connection until it ends or its timers close it.
async fn drive<IO, S, B>(
    io: TokioIo<IO>,
    per_request: S,
    protocol: Protocol,
    activity: &Activity,
    stop: &CancellationToken,
    limits: &HttpLimits,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    {
        let mut b = Builder::new(TokioExecutor::new());
        if protocol == Protocol::Grpc {
            b = b.http2_only();
        }
        b.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        b.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(limits.max_header_list_bytes);
        let conn = b.serve_connection_with_upgrades(io, per_request);
        tokio::pin!(conn);
        let mut closing: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let wake = next_check(activity, closing, limits, now);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::trace!("connection ended: {e}");
                    }
                    return;
                }
                _ = stop.cancelled(), if closing.is_none() => {
                    // HTTP/2 gets GOAWAY now. An HTTP/1.1 connection is not
                    // closed under a client that may be writing its next
                    // request (a reset without an answer): each answer from
                    // now on says `Connection: close`, and one left idle is
                    // closed after the linger.
                    if protocol == Protocol::Grpc || activity.h2.load(Ordering::Relaxed) {
                        conn.as_mut().graceful_shutdown();
                    }
                    closing = Some(Instant::now());
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    match verdict(activity, closing, limits, Instant::now()) {
                        Verdict::Keep => {}
                        Verdict::Close => {
                            metrics::counter!(CONNECTIONS_CLOSED_IDLE, "protocol" => protocol.name())
                                .increment(1);
                            conn.as_mut().graceful_shutdown();
                            closing = Some(Instant::now());
                        }
                        Verdict::Drop => {
                            tracing::debug!(
                                protocol = protocol.name(),
                                shutting_down = closing.is_some(),
                                "closing a quiet connection"
                            );
                            if closing.is_none() {
                                metrics::counter!(CONNECTIONS_CLOSED_IDLE, "protocol" => protocol.name())
                                    .increment(1);
                            }
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// When the connection's timer should next look at it.
fn next_check(a: &Activity, closing: Option<Instant>, l: &HttpLimits, now: Instant) -> Instant {
    match closing {
        Some(since) if a.quiet() => since.max(a.quiet_since()) + CLOSE_LINGER,
        Some(_) => now + BUSY_RECHECK,
        None if !a.heard.load(Ordering::Relaxed) => a.born + l.header_read_timeout,
        None if a.idle() => a.idle_since() + l.idle_timeout,
        None => now + l.idle_timeout,
    }
}

fn verdict(a: &Activity, closing: Option<Instant>, l: &HttpLimits, now: Instant) -> Verdict {
    let idle_for = |from: Instant| a.idle().then(|| now.saturating_duration_since(from));
    match closing {
        Some(since) => match a
            .quiet()
            .then(|| now.saturating_duration_since(since.max(a.quiet_since())))
        {
            Some(d) if d >= CLOSE_LINGER => Verdict::Drop,
            _ => Verdict::Keep,
        },
        None if !a.heard.load(Ordering::Relaxed) => {
            if now.saturating_duration_since(a.born) >= l.header_read_timeout {
                Verdict::Drop
            } else {
                Verdict::Keep
            }
        }
        None => match idle_for(a.idle_since()) {
            Some(d) if d >= l.idle_timeout => Verdict::Close,
            _ => Verdict::Keep,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_streams: 8,
            max_header_list_bytes: 1 << 14,
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_silent_connection_is_dropped_after_the_header_timeout() {
        let a = Activity::new();
        let l = limits();
        assert!(matches!(verdict(&a, None, &l, a.born), Verdict::Keep));
        assert_eq!(
            next_check(&a, None, &l, a.born),
            a.born + l.header_read_timeout
        );
        let late = a.born + l.header_read_timeout;
        assert!(matches!(verdict(&a, None, &l, late), Verdict::Drop));
        // Once it has spoken, the idle timeout applies instead.
        a.heard.store(true, Ordering::Relaxed);
        assert!(matches!(verdict(&a, None, &l, late), Verdict::Keep));
        assert!(matches!(
            verdict(&a, None, &l, a.born + l.idle_timeout),
            Verdict::Close
        ));
    }

    #[test]
    fn requests_in_flight_hold_the_connection_open_and_idleness_restarts_after_them() {
        let a = Activity::new();
        a.heard.store(true, Ordering::Relaxed);
        let l = limits();
        let req = a.begin();
        let far = a.born + l.idle_timeout * 3;
        assert!(matches!(verdict(&a, None, &l, far), Verdict::Keep));
        // Shutting down: a busy connection is never dropped.
        assert!(matches!(verdict(&a, Some(a.born), &l, far), Verdict::Keep));
        drop(req);
        assert!(a.idle());
        let ended = a.idle_since();
        assert!(ended >= a.born);
        assert!(matches!(
            verdict(&a, None, &l, ended + l.idle_timeout / 2),
            Verdict::Keep
        ));
        assert!(matches!(
            verdict(&a, None, &l, ended + l.idle_timeout),
            Verdict::Close
        ));
        // Shutting down and idle: dropped after the linger, not before.
        let stop = ended + Duration::from_millis(10);
        assert_eq!(next_check(&a, Some(stop), &l, stop), stop + CLOSE_LINGER);
        assert!(matches!(verdict(&a, Some(stop), &l, stop), Verdict::Keep));
        assert!(matches!(
            verdict(&a, Some(stop), &l, stop + CLOSE_LINGER),
            Verdict::Drop
        ));
    }

    #[test]
    fn the_connection_cap_refuses_beyond_max_and_frees_on_close() {
        let slots = ConnectionSlots::new(2);
        let a = slots.take("http").unwrap();
        let _b = slots.take("grpc").unwrap();
        assert!(slots.take("http").is_none());
        drop(a);
        assert!(slots.take("http").is_some());
    }
}
