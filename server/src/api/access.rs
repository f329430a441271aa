//! The access log (`--access-log`): one record per REST request or gRPC
//! call, written when its response body ends (or the client goes away), as
//! a `tracing` event of target [`ACCESS_TARGET`], so it comes out in the
//! process's log format (text or JSON lines). Fields: protocol, method,
//! path (the route or the RPC), HTTP status and gRPC status, model,
//! version, bytes in and out as on the wire (compressed where the body
//! is), queue and compute microseconds, call duration, and the correlation
//! key's hash (the key itself only with `--access-log-keys`).

use crate::engine::InferResponse;
use crate::telemetry::{access_log_keys, access_log_on, ACCESS_TARGET};
use axum::http::{HeaderMap, Request, Response};
use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a handler knows about a call and the log wants: set as a response
/// extension.
#[derive(Debug, Clone, Default)]
pub struct AccessInfo {
    pub model: String,
    pub version: String,
    pub queue_us: Option<u64>,
    pub compute_us: Option<u64>,
    pub key_hash: Option<u64>,
    pub key: Option<String>,
}

impl AccessInfo {
    /// The record of an answered inference; `key` is the request's
    /// explicit correlation key.
    pub fn answered(resp: &InferResponse, key: Option<&str>) -> Self {
        Self {
            model: resp.model.clone(),
            version: resp.version.clone(),
            queue_us: Some(resp.timing.queue.as_micros() as u64),
            compute_us: Some(resp.timing.compute.as_micros() as u64),
            key_hash: resp.timing.key_hash,
            key: key.filter(|_| access_log_keys()).map(str::to_string),
        }
    }

    /// The record of a failed inference of `model`.
    pub fn failed(model: &str, version: Option<&str>) -> Self {
        Self {
            model: model.to_string(),
            version: version.unwrap_or_default().to_string(),
            ..Self::default()
        }
    }
}

/// A body type the log can wrap and hand on unchanged in type: axum's and
/// tonic's boxed bodies.
pub trait Rebox: Body<Data = Bytes> + Send + Unpin + Sized + 'static {
    fn rebox<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>;
}

impl Rebox for axum::body::Body {
    fn rebox<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        axum::body::Body::new(body)
    }
}

impl Rebox for tonic::body::Body {
    fn rebox<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        tonic::body::Body::new(body)
    }
}

/// The tower layer; a no-op (one relaxed load) while the log is off.
#[derive(Debug, Clone, Copy)]
pub struct AccessLayer {
    protocol: &'static str,
}

impl AccessLayer {
    pub fn new(protocol: &'static str) -> Self {
        Self { protocol }
    }
}

impl<S> tower::Layer<S> for AccessLayer {
    type Service = AccessLog<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AccessLog {
            inner,
            protocol: self.protocol,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    protocol: &'static str,
}

impl<S, B> tower::Service<Request<B>> for AccessLog<S>
where
    S: tower::Service<Request<B>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Rebox,
    B::Error: Into<BoxError>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<Response<B>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !access_log_on() {
            return Either::Left(self.inner.call(req));
        }
        let start = Instant::now();
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let bytes_in = Arc::new(AtomicU64::new(0));
        let counted = bytes_in.clone();
        let req = req.map(|b| {
            B::rebox(Watched {
                inner: b,
                watch: Counter(counted),
            })
        });
        let fut = self.inner.call(req);
        let protocol = self.protocol;
        Either::Right(Box::pin(async move {
            let resp = fut.await?;
            let record = Record {
                protocol,
                method,
                path,
                status: resp.status().as_u16(),
                grpc_status: grpc_status(resp.headers()),
                info: resp.extensions().get::<AccessInfo>().cloned(),
                bytes_in,
                bytes_out: 0,
                start,
            };
            Ok(resp.map(|b| {
                B::rebox(Watched {
                    inner: b,
                    watch: Some(record),
                })
            }))
        }))
    }
}

fn grpc_status(h: &HeaderMap) -> Option<i32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// What a [`Watched`] body reports to: each frame it passes on, and its
/// end (the last frame, or the body dropped early), once.
trait Watch {
    fn frame(&mut self, f: &Frame<Bytes>);
    fn end(&mut self) {}
}

/// A body passed through unchanged while a [`Watch`] sees it.
struct Watched<B, W: Watch> {
    inner: B,
    watch: W,
}

impl<B: Body<Data = Bytes> + Unpin, W: Watch + Unpin> Body for Watched<B, W> {
    type Data = Bytes;
    type Error = B::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => self.watch.frame(f),
            Poll::Ready(None) => self.watch.end(),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B, W: Watch> Drop for Watched<B, W> {
    fn drop(&mut self) {
        self.watch.end();
    }
}

/// Counts the request bytes read.
struct Counter(Arc<AtomicU64>);

impl Watch for Counter {
    fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(d) = f.data_ref() {
            self.0.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
    }
}

struct Record {
    protocol: &'static str,
    method: String,
    path: String,
    status: u16,
    grpc_status: Option<i32>,
    info: Option<AccessInfo>,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
    start: Instant,
}

impl Record {
    fn write(&self) {
        let info = self.info.clone().unwrap_or_default();
        let opt = |s: String| (!s.is_empty()).then_some(s);
        tracing::info!(
            target: ACCESS_TARGET,
            protocol = self.protocol,
            method = %self.method,
            path = %self.path,
            status = self.status,
            grpc_status = self.grpc_status,
            model = opt(info.model),
            version = opt(info.version),
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out,
            queue_us = info.queue_us,
            compute_us = info.compute_us,
            duration_us = self.start.elapsed().as_micros() as u64,
            key_hash = info.key_hash.map(|h| format!("{h:016x}")),
            key = info.key,
            "access"
        );
    }
}

/// The response side: counts what is sent, takes the gRPC status from the
/// trailers, and writes the record at the end.
impl Watch for Option<Record> {
    fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(rec) = self {
            if let Some(d) = f.data_ref() {
                rec.bytes_out += d.len() as u64;
            } else if let Some(t) = f.trailers_ref() {
                rec.grpc_status = grpc_status(t).or(rec.grpc_status);
            }
        }
    }
    fn end(&mut self) {
        if let Some(rec) = self.take() {
            rec.write();
        }
    }
}
