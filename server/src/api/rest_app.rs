//! The REST app as it is served: the body codecs and the access log around
//! the whole router once, and the infer route taken before the router.
//!
//! Why not `Router::layer`: axum applies a layer to every route separately,
//! and each layer it applies is one more boxed clone of the route's service
//! and one more boxed future per request, each a move of the (large) infer
//! future. The three layers shoal serves with cost 2 µs and 21 allocations
//! per request that way (`cargo bench --bench hotpath`). Around the router
//! they run once per request, for every route.
//!
//! Why the infer route first: it is the one route that carries traffic. A
//! POST to `/v2/models/{m}[/versions/{v}]/infer` is recognised by its path
//! and calls the same handler the router would, without the route table,
//! the path-parameter deserializer, the state extractor or the per-route
//! box. A path with a percent escape goes through the router, whose `Path`
//! extractor decodes it; so does anything else.
//!
//! Why before the codecs too, when the request names no encoding (neither
//! `Content-Encoding` nor `Accept-Encoding`, as perf_analyzer's and most
//! inference clients' requests): the two layers then pass it through
//! unchanged, but still cost a boxed response body each, a wrapper per
//! body frame and a future per layer. The one thing they add to such an
//! answer, `Vary: accept-encoding` on a compressible one, the direct path
//! adds the same way.

use super::access::AccessLayer;
use super::http::{infer_call, HttpState, ModelPath};
use axum::body::Body;
use axum::http::{header, HeaderValue, Method, Request, Response};
use axum::Router;
use futures::future::{BoxFuture, Either};
use std::convert::Infallible;
use std::task::{Context, Poll};
use tower::{Layer, Service};
use tower_http::compression::{Compression, CompressionBody, CompressionLayer};
use tower_http::decompression::{
    DecompressionBody, RequestDecompression, RequestDecompressionLayer,
};

/// The REST service: [`serve`] builds it.
pub type RestApp = super::access::AccessLog<Direct>;

/// `router` with what every served request goes through: gzip and zstd
/// request bodies (`Content-Encoding`) and response bodies
/// (`Accept-Encoding`), and the access log, outermost so it counts the
/// bytes as they travel; the infer route is taken before the router.
pub fn serve(state: HttpState, router: Router) -> RestApp {
    let inner = InferFirst {
        state: state.clone(),
        router,
    };
    let codecs = CompressionLayer::new().gzip(true).zstd(true).layer(
        RequestDecompressionLayer::new()
            .gzip(true)
            .zstd(true)
            .layer(inner),
    );
    AccessLayer::new("http").layer(Direct {
        state,
        codecs: Codecs { inner: codecs },
    })
}

/// The infer route for a request that names no encoding, then the codecs
/// around [`InferFirst`] for everything else.
#[derive(Clone)]
pub struct Direct {
    state: HttpState,
    codecs: Codecs,
}

impl Service<Request<Body>> for Direct {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<BoxFuture<'static, Result<Response<Body>, Infallible>>, CodecsFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.codecs.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let plain = |h: &axum::http::HeaderMap| {
            !h.contains_key(header::CONTENT_ENCODING) && !h.contains_key(header::ACCEPT_ENCODING)
        };
        match infer_path(&req).filter(|_| plain(req.headers())) {
            Some(p) => Either::Left(infer(&self.state, p, req, true)),
            None => Either::Right(self.codecs.call(req)),
        }
    }
}

/// The infer handler on `req`, boxed (its future is large); `vary`: with
/// the header the codecs would have added.
fn infer<B>(
    state: &HttpState,
    p: ModelPath,
    req: Request<B>,
    vary: bool,
) -> BoxFuture<'static, Result<Response<Body>, Infallible>>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    let st = state.clone();
    let (parts, body) = req.into_parts();
    Box::pin(async move {
        let mut r = infer_call(&st, p, &parts.headers, body).await;
        if vary {
            vary_as_the_codecs_would(&mut r);
        }
        Ok(r)
    })
}

/// What the compression layer adds to an answer it does not compress
/// (the client accepts no encoding): `Vary: accept-encoding` where the
/// answer could have been compressed, so a cache keeps the variants apart.
fn vary_as_the_codecs_would(r: &mut Response<Body>) {
    use tower_http::compression::predicate::{DefaultPredicate, Predicate};
    let h = r.headers();
    if h.contains_key(header::CONTENT_ENCODING)
        || h.contains_key(header::CONTENT_RANGE)
        || !DefaultPredicate::new().should_compress(r)
    {
        return;
    }
    let listed = r.headers().get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if !listed {
        r.headers_mut()
            .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

type Compressed = Compression<RequestDecompression<InferFirst>>;

/// The compression layers around [`InferFirst`], with the compressed
/// response body boxed back into axum's body type (what the access log
/// and the connection take).
#[derive(Clone)]
pub struct Codecs {
    inner: Compressed,
}

/// What the compression layer answers with: the decompression layer boxes
/// the inner body (it may answer 415 itself).
type CompressedBody = CompressionBody<
    tower_http::body::UnsyncBoxBody<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>,
>;

type CodecsFuture = futures::future::MapOk<
    <Compressed as Service<Request<Body>>>::Future,
    fn(Response<CompressedBody>) -> Response<Body>,
>;

impl Service<Request<Body>> for Codecs {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CodecsFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use futures::TryFutureExt;
        let rebox: fn(Response<CompressedBody>) -> Response<Body> = |r| r.map(Body::new);
        self.inner.call(req).map_ok(rebox)
    }
}

/// The infer route, then the router for everything else.
#[derive(Clone)]
pub struct InferFirst {
    state: HttpState,
    router: Router,
}

type Decoded = DecompressionBody<Body>;

impl Service<Request<Decoded>> for InferFirst {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<
        BoxFuture<'static, Result<Response<Body>, Infallible>>,
        <Router as Service<Request<Decoded>>>::Future,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both ends are always ready: the router is, and the infer route
        // admits (or refuses) in the engine.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Decoded>) -> Self::Future {
        match infer_path(&req) {
            // The codecs around this service add what they add.
            Some(p) => Either::Left(infer(&self.state, p, req, false)),
            None => Either::Right(self.router.call(req)),
        }
    }
}

/// The model and version of a POST to the infer route, when its path
/// needs no decoding; `None` sends the request to the router.
fn infer_path<B>(req: &Request<B>) -> Option<ModelPath> {
    if req.method() != Method::POST {
        return None;
    }
    let rest = req
        .uri()
        .path()
        .strip_prefix("/v2/models/")?
        .strip_suffix("/infer")?;
    let mut parts = rest.split('/');
    let m = parts.next()?;
    let v = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some("versions"), Some(v), None) => Some(v),
        _ => return None,
    };
    let plain = |s: &str| !s.is_empty() && !s.contains('%');
    if !plain(m) || v.is_some_and(|v| !plain(v)) {
        return None;
    }
    Some(ModelPath {
        m: m.to_string(),
        v: v.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(method: Method, p: &str) -> Option<(String, Option<String>)> {
        let req = Request::builder().method(method).uri(p).body(()).unwrap();
        infer_path(&req).map(|p| (p.m, p.v))
    }

    #[test]
    fn the_infer_route_is_recognised_only_where_the_router_would_match_it() {
        let some = |m: &str, v: Option<&str>| Some((m.to_string(), v.map(str::to_string)));
        assert_eq!(
            path(Method::POST, "/v2/models/ffnn/infer"),
            some("ffnn", None)
        );
        assert_eq!(
            path(Method::POST, "/v2/models/ffnn/versions/3/infer?x=1"),
            some("ffnn", Some("3"))
        );
        // A model named like a path word is still a model.
        assert_eq!(
            path(Method::POST, "/v2/models/infer/infer"),
            some("infer", None)
        );
        for p in [
            "/v2/models//infer",
            "/v2/models/a/b/infer",
            "/v2/models/ffnn/versions/infer",
            "/v2/models/ffnn/versions//infer",
            "/v2/models/ffnn/versions/1/2/infer",
            "/v2/models/ffnn/infer/",
            "/v2/models/ff%20nn/infer",
            "/v2/models/ffnn/versions/%31/infer",
            "/v2/models/ffnn/ready",
            "/v2/models/infer",
        ] {
            assert_eq!(path(Method::POST, p), None, "{p}");
        }
        assert_eq!(path(Method::GET, "/v2/models/ffnn/infer"), None);
        assert_eq!(path(Method::PUT, "/v2/models/ffnn/infer"), None);
    }
}
