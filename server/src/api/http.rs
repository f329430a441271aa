//! KServe v2 over REST (axum), with the binary tensor data extension:
//! a JSON header of `Inference-Header-Content-Length` bytes followed by the
//! raw tensors, in input order.

use super::access::AccessInfo;
use super::error::ApiError;
use super::shm::{self as shm_api, ShmOutputs, Written};
use super::{json, metadata};
use crate::engine::{Engine, InferRequest, InferResponse, Param};
use crate::shm::SharedMemory;
use crate::telemetry;
use crate::tensor::{DataType, Tensor};
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::{json as j, Map, Value};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// The headers every request is looked up for, parsed once: a lookup by
/// `&str` parses and validates the name on each call, about half of its
/// 500 instructions (callgrind).
static LENGTH_NAME: HeaderName = HeaderName::from_static(HEADER_LENGTH);
static KEY_NAME: HeaderName = HeaderName::from_static("x-correlation-key");

#[derive(Clone)]
pub struct HttpState {
    pub engine: Engine,
    pub max_body_bytes: usize,
    /// Shared with the gRPC front end.
    pub shm: Arc<SharedMemory>,
    /// Needed to register, unregister or list shared-memory regions.
    pub shm_token: super::auth::Bearer,
}

/// The REST router; no socket, so tests can drive it directly.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{m}", get(model_metadata))
        .route("/v2/models/{m}/versions/{v}", get(model_metadata))
        .route("/v2/models/{m}/ready", get(model_ready))
        .route("/v2/models/{m}/versions/{v}/ready", get(model_ready))
        .route("/v2/models/{m}/config", get(model_config))
        .route("/v2/models/{m}/versions/{v}/config", get(model_config))
        .route("/v2/models/{m}/stats", get(model_stats))
        .route("/v2/models/{m}/versions/{v}/stats", get(model_stats))
        .route("/v2/models/{m}/infer", post(infer))
        .route("/v2/models/{m}/versions/{v}/infer", post(infer))
        .merge(shm_api::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        // The infer handler enforces its own, configurable limit; it reads
        // the body after decompression, so the limit bounds what a
        // compressed body expands to (a zip bomb gets 413).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// `/{m}` or `/{m}/versions/{v}` path parameters.
#[derive(Deserialize)]
pub(crate) struct ModelPath {
    pub(crate) m: String,
    pub(crate) v: Option<String>,
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(st): State<HttpState>) -> StatusCode {
    if st.engine.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> Json<Value> {
    Json(j!({
        "name": metadata::SERVER_NAME,
        "version": metadata::SERVER_VERSION,
        "extensions": super::EXTENSIONS,
    }))
}

async fn model_metadata(
    State(st): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    let mv = st.engine.model(&p.m, p.v.as_deref())?;
    let md = metadata::model_metadata(&st.engine, &mv);
    let tensors = |ts: &[shoal_proto::model_metadata_response::TensorMetadata]| {
        ts.iter()
            .map(|t| j!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    // Beyond KServe's fields: which execution provider and device runs each
    // replica, in replica order (clients ignore unknown fields).
    let providers: Vec<&str> = mv
        .replicas
        .iter()
        .map(|r| r.execution_provider.as_str())
        .collect();
    Ok(Json(j!({
        "name": md.name,
        "versions": md.versions,
        "platform": md.platform,
        "inputs": tensors(&md.inputs),
        "outputs": tensors(&md.outputs),
        "execution_providers": providers,
    })))
}

async fn model_ready(
    State(st): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<StatusCode, ApiError> {
    let mv = st.engine.model(&p.m, p.v.as_deref())?;
    Ok(if st.engine.version_ready(&mv) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

async fn model_config(
    State(st): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    let mv = st.engine.model(&p.m, p.v.as_deref())?;
    Ok(Json(crate::engine::pbtxt::to_json(
        &metadata::model_config(&mv),
    )))
}

fn stats_json(s: shoal_proto::ModelStatisticsResponse) -> Value {
    let d = |x: Option<shoal_proto::StatisticDuration>| {
        let x = x.unwrap_or_default();
        j!({"count": x.count, "ns": x.ns})
    };
    let models: Vec<Value> = s
        .model_stats
        .into_iter()
        .map(|m| {
            let is = m.inference_stats.unwrap_or_default();
            j!({
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": {
                    "success": d(is.success), "fail": d(is.fail), "queue": d(is.queue),
                    "compute_input": d(is.compute_input), "compute_infer": d(is.compute_infer),
                    "compute_output": d(is.compute_output),
                },
                "batch_stats": m.batch_stats.into_iter().map(|b| j!({
                    "batch_size": b.batch_size,
                    "compute_input": d(b.compute_input),
                    "compute_infer": d(b.compute_infer),
                    "compute_output": d(b.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    j!({ "model_stats": models })
}

async fn model_stats(
    State(st): State<HttpState>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    let s = metadata::statistics(&st.engine, &p.m, p.v.as_deref().unwrap_or(""))?;
    Ok(Json(stats_json(s)))
}

async fn all_stats(State(st): State<HttpState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(stats_json(metadata::statistics(&st.engine, "", "")?)))
}

#[derive(Deserialize)]
struct RestRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default, borrow)]
    parameters: Params<'a>,
    #[serde(borrow)]
    inputs: Vec<RestInput<'a>>,
    #[serde(default, borrow)]
    outputs: Vec<RestOutput<'a>>,
}

#[derive(Deserialize)]
struct RestInput<'a> {
    name: String,
    shape: Vec<i64>,
    #[serde(borrow)]
    datatype: Cow<'a, str>,
    #[serde(default, borrow)]
    parameters: Params<'a>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct RestOutput<'a> {
    name: String,
    #[serde(default, borrow)]
    parameters: Params<'a>,
}

/// A KServe `parameters` object as decoded: its entries in order, each
/// name borrowed from the body unless it had to be unescaped. Requests
/// carry one or two parameters, which a list finds as fast as a map would,
/// without a tree node and a string per name (a third of the JSON
/// header's allocations). A repeated name means its last value, as a
/// map would keep it.
#[derive(Default)]
pub(crate) struct Params<'a>(Vec<(Cow<'a, str>, Value)>);

impl Params<'_> {
    pub(crate) fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Params<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A name, borrowed where the input allows it.
        struct Name<'a>(Cow<'a, str>);
        impl<'de> Deserialize<'de> for Name<'de> {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Name<'de>;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a parameter name")
                    }
                    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                        Ok(Name(Cow::Borrowed(v)))
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                        Ok(Name(Cow::Owned(v.to_string())))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Params<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Params<'a>, A::Error> {
                let mut entries = Vec::with_capacity(m.size_hint().unwrap_or(0).min(16));
                while let Some((Name(k), v)) = m.next_entry::<Name<'de>, Value>()? {
                    entries.push((k, v));
                }
                Ok(Params(entries))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

async fn infer(
    State(st): State<HttpState>,
    Path(p): Path<ModelPath>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_call(&st, p, &headers, body).await
}

/// The infer route's handler, for the router and for
/// [`super::rest_app`]'s direct path alike.
pub(crate) async fn infer_call<B>(
    st: &HttpState,
    p: ModelPath,
    headers: &HeaderMap,
    body: B,
) -> Response
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    // The route template, not the path: span names stay few.
    let span = telemetry::request_span("POST /v2/models/{model}/infer", "http", &p.m, headers);
    let mut r = match infer_traced(st, &p, headers, body, &span).await {
        Ok(r) => r,
        Err(e) => {
            telemetry::record_error(&span, &e.message);
            e.into_response()
        }
    };
    if telemetry::access_log_on() && r.extensions().get::<AccessInfo>().is_none() {
        r.extensions_mut()
            .insert(AccessInfo::failed(&p.m, p.v.as_deref()));
    }
    r
}

async fn infer_traced<B>(
    st: &HttpState,
    p: &ModelPath,
    headers: &HeaderMap,
    body: B,
    span: &Option<tracing::Span>,
) -> Result<Response, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let body = read_body(body, st.max_body_bytes).await?;
    let (mut request, binary_outputs, shm_outputs) =
        decode_infer(&p.m, p.v.clone(), headers, body, &st.shm, false)?;
    request.span = span.clone();
    let key = telemetry::access_log_keys()
        .then(|| request.correlation_key.clone())
        .flatten();
    let mut resp = st.engine.infer(request).await?;
    let written = shm_outputs.write(&mut resp)?;
    let info = telemetry::access_log_on().then(|| AccessInfo::answered(&resp, key.as_deref()));
    let _encode = span.as_ref().map(|s| {
        tracing::info_span!(target: telemetry::SPAN_TARGET, parent: s, "encode").entered()
    });
    let mut r = encode_infer(resp, &binary_outputs, &written);
    if let Some(info) = info {
        r.extensions_mut().insert(info);
    }
    Ok(r)
}

/// How much of an oversize body is read and discarded before answering 413,
/// so a client still writing it reads the answer instead of a reset.
const DISCARD_LIMIT: usize = 64 << 20;

/// Reads the body up to `limit` bytes, never holding more than that. A
/// body that comes in one frame (hyper's usual for a request that fits its
/// read buffer) is that frame, not a copy of it.
async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    // A declared length past what would ever be read is refused before
    // reading anything (smaller overshoots are read and discarded below,
    // so the client reads the answer rather than a reset).
    let declared = body.size_hint().lower();
    if declared > DISCARD_LIMIT as u64 && declared > limit as u64 {
        return Err(ApiError::too_large(format!(
            "request body of {declared} bytes exceeds the limit of {limit} bytes (--max-body-bytes)"
        )));
    }
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            if first.is_none() && buf.is_empty() {
                first = Some(data);
            } else {
                if let Some(f) = first.take() {
                    buf.extend_from_slice(&f);
                }
                buf.extend_from_slice(&data);
            }
        } else {
            first = None;
            buf = BytesMut::new();
            if seen > DISCARD_LIMIT {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::too_large(format!(
            "request body exceeds the limit of {limit} bytes (--max-body-bytes)"
        )));
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// Which outputs go back as binary: the request-wide
/// `binary_data_output` default, overridden per output by `binary_data`.
pub(crate) struct BinaryOutputs {
    default: bool,
    per_output: Vec<(String, bool)>,
}

impl BinaryOutputs {
    /// Every output as binary (answers to requests that were raw bytes).
    pub(crate) fn all() -> Self {
        Self {
            default: true,
            per_output: Vec::new(),
        }
    }

    fn binary(&self, name: &str) -> bool {
        self.per_output
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default, |&(_, b)| b)
    }
}

/// The REST decoder alone (JSON or the binary extension to an engine
/// request), for the property tests that throw hostile bodies at it.
pub fn decode_rest_request(
    model: &str,
    headers: &HeaderMap,
    body: Bytes,
    shm: &SharedMemory,
) -> Result<InferRequest, ApiError> {
    decode_infer(model, None, headers, body, shm, false).map(|(r, _, _)| r)
}

/// `binary_answer`: outputs go back as binary unless the request says
/// otherwise (REST answers JSON by default; Kafka answers in the format
/// of the request).
pub(crate) fn decode_infer(
    model: &str,
    version: Option<String>,
    headers: &HeaderMap,
    body: Bytes,
    shm: &SharedMemory,
    binary_answer: bool,
) -> Result<(InferRequest, BinaryOutputs, ShmOutputs), ApiError> {
    let (header, mut binary) = match headers.get(&LENGTH_NAME) {
        None => (body, Bytes::new()),
        Some(v) => {
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::invalid("Inference-Header-Content-Length is not a number")
                })?;
            if n > body.len() {
                return Err(ApiError::invalid(format!(
                    "Inference-Header-Content-Length {n} exceeds the body of {} bytes",
                    body.len()
                )));
            }
            let binary = body.slice(n..);
            (body.slice(..n), binary)
        }
    };
    let req: RestRequest = serde_json::from_slice(&header)
        .map_err(|e| ApiError::invalid(format!("invalid JSON request: {e}")))?;
    let timeout = match req.parameters.get("timeout") {
        None => None,
        Some(v) => {
            let us = v.as_u64().ok_or_else(|| {
                ApiError::invalid("parameter timeout must be a non-negative integer (µs)")
            })?;
            Some(Duration::from_micros(us))
        }
    };
    let priority = match req.parameters.get("priority") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            ApiError::invalid(
                "parameter priority must be a non-negative integer (1 is the highest)",
            )
        })?,
    };
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for i in req.inputs {
        let datatype = DataType::parse(&i.datatype).ok_or_else(|| {
            ApiError::invalid(format!(
                "input {:?}: unknown datatype {:?}",
                i.name, i.datatype
            ))
        })?;
        let in_shm =
            shm_api::http_ref(&format_args!("input {:?}", i.name), |k| i.parameters.get(k))?;
        if let Some(r) = in_shm {
            if i.data.is_some() || i.parameters.contains_key("binary_data_size") {
                return Err(ApiError::invalid(format!(
                    "input {:?}: data and {} are both given",
                    i.name,
                    shm_api::REGION
                )));
            }
            inputs.push(Tensor {
                data: shm.input(&i.name, &r)?,
                name: i.name,
                datatype,
                shape: i.shape,
            });
            continue;
        }
        let data = match (i.parameters.get("binary_data_size"), &i.data) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(format!(
                    "input {:?} has both data and binary_data_size",
                    i.name
                )))
            }
            (Some(size), None) => {
                let n = size
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "input {:?}: binary_data_size must be a non-negative integer",
                            i.name
                        ))
                    })?;
                if n > binary.len() {
                    return Err(ApiError::invalid(format!(
                        "input {:?}: binary_data_size {n} runs past the end of the body ({} bytes left)",
                        i.name,
                        binary.len()
                    )));
                }
                binary.split_to(n)
            }
            (None, Some(d)) => json::to_bytes(&i.name, datatype, d)?,
            (None, None) => {
                return Err(ApiError::invalid(format!(
                    "input {:?} carries no data",
                    i.name
                )))
            }
        };
        inputs.push(Tensor {
            name: i.name,
            datatype,
            shape: i.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(ApiError::invalid(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    let flag = |m: &Params, key: &str| -> Result<Option<bool>, ApiError> {
        match m.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ApiError::invalid(format!(
                "parameter {key} must be a boolean"
            ))),
        }
    };
    let binary_outputs = BinaryOutputs {
        default: flag(&req.parameters, "binary_data_output")?.unwrap_or(binary_answer),
        per_output: req
            .outputs
            .iter()
            .filter_map(|o| match flag(&o.parameters, "binary_data") {
                Ok(Some(b)) => Some(Ok((o.name.clone(), b))),
                Ok(None) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?,
    };
    let mut shm_outputs = ShmOutputs::default();
    for o in &req.outputs {
        if let Some(r) = shm_api::http_ref(&format_args!("output {:?}", o.name), |k| {
            o.parameters.get(k)
        })? {
            shm_outputs.push(o.name.clone(), shm.output(&o.name, &r)?);
        }
    }
    let key_param = |name: &str| -> Result<Option<String>, ApiError> {
        match req.parameters.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
            Some(_) => Err(ApiError::invalid(format!(
                "parameter {name} must be a string or an integer"
            ))),
        }
    };
    let header_key = headers
        .get(&KEY_NAME)
        .map(|v| {
            v.to_str()
                .map(str::to_string)
                .map_err(|_| ApiError::invalid("x-correlation-key is not visible ASCII"))
        })
        .transpose()?;
    // The explicit parameter wins over the header, which wins over
    // Triton's sequence_id.
    let correlation_key = key_param("correlation_key")?
        .or(header_key)
        .or(key_param("sequence_id")?.filter(|s| s != "0"));
    let request = InferRequest {
        model: model.to_string(),
        version,
        id: req.id.unwrap_or_default(),
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        deadline: None,
        timeout,
        priority,
        correlation_key,
        sequence_start: flag(&req.parameters, "sequence_start")?.unwrap_or(false),
        sequence_end: flag(&req.parameters, "sequence_end")?.unwrap_or(false),
        return_state: false,
        span: None,
    };
    Ok((request, binary_outputs, shm_outputs))
}

/// The JSON part of an infer answer, serialized straight from the
/// response: building a `serde_json::Value` tree first cost a map and a
/// string per field of every answer (issue 18).
#[derive(Serialize)]
struct AnswerHead<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    id: &'a str,
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Map<String, Value>>,
    outputs: Vec<AnswerTensor<'a>>,
}

#[derive(Serialize)]
struct AnswerTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<TensorParameters>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

/// An output's parameters: the common one typed, so an answer of binary
/// tensors builds no JSON map.
#[derive(Serialize)]
#[serde(untagged)]
enum TensorParameters {
    Binary { binary_data_size: usize },
    Other(Value),
}

fn encode_infer(resp: InferResponse, binary: &BinaryOutputs, written: &[Written]) -> Response {
    let (body, header_length) = encode_answer(&resp, binary, written);
    let Some(n) = header_length else {
        return (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
    };
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(LENGTH_NAME.clone(), HeaderValue::from(n));
    r
}

/// An infer answer's REST body, and the length of its JSON header when
/// binary tensors follow it (`Inference-Header-Content-Length`); `None`:
/// the body is JSON alone. Kafka-native serving writes the same bodies.
pub(crate) fn encode_answer(
    resp: &InferResponse,
    binary: &BinaryOutputs,
    written: &[Written],
) -> (Bytes, Option<usize>) {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut blobs: Vec<&Bytes> = Vec::new();
    for t in &resp.outputs {
        let mut o = AnswerTensor {
            name: &t.name,
            datatype: t.datatype.as_str(),
            shape: &t.shape,
            parameters: None,
            data: None,
        };
        if let Some(w) = written.iter().find(|w| w.name == t.name) {
            o.parameters = Some(TensorParameters::Other(w.json_parameters()));
        } else if binary.binary(&t.name) {
            o.parameters = Some(TensorParameters::Binary {
                binary_data_size: t.data.len(),
            });
            blobs.push(&t.data);
        } else {
            o.data = Some(json::from_bytes(t.datatype, &t.data));
        }
        outputs.push(o);
    }
    let parameters = (!resp.parameters.is_empty()).then(|| {
        resp.parameters
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Param::Bool(b) => Value::Bool(*b),
                    Param::Int(i) => Value::from(*i),
                    Param::Str(s) => Value::String(s.clone()),
                };
                (k.clone(), v)
            })
            .collect()
    });
    let head = AnswerHead {
        id: &resp.id,
        model_name: &resp.model,
        model_version: &resp.version,
        parameters,
        outputs,
    };
    // The head is written straight into the body, sized for a typical
    // head and the tensors after it: one buffer, no copy of the head. A
    // `Vec`, not a `BytesMut` writer: serde_json writes each key, value
    // and punctuation separately, and `Vec`'s `write_all` is one append
    // where the writer's loops (a third of the head's instructions).
    let tensors = blobs.iter().map(|b| b.len()).sum::<usize>();
    let mut body = Vec::with_capacity(256 + tensors);
    serde_json::to_writer(&mut body, &head).expect("answer heads serialize");
    if blobs.is_empty() {
        return (Bytes::from(body), None);
    }
    let head_len = body.len();
    body.reserve(tensors);
    for b in &blobs {
        body.extend_from_slice(b);
    }
    (Bytes::from(body), Some(head_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<(InferRequest, BinaryOutputs), ApiError> {
        let shm = SharedMemory::default();
        decode_infer(
            "m",
            None,
            &HeaderMap::new(),
            Bytes::copy_from_slice(body.as_bytes()),
            &shm,
            false,
        )
        .map(|(r, b, _)| (r, b))
    }

    /// Parameters as a list keep what a map gave: a name written with
    /// escapes is the same name, the last of a repeated name wins, names
    /// nobody reads are ignored, and a value of the wrong type is an error.
    #[test]
    fn parameters_read_as_a_map_would_read_them() {
        let (r, _) = decode(
            r#"{"parameters": {"priority": 9, "x-unknown": [1, {"a": null}], "priority": 2,
                 "correlation\u005fkey": "k1", "timeout": 1500},
                "inputs": [{"name": "x", "datatype": "FP\u0033\u0032", "shape": [1],
                            "data": [1.0]}]}"#,
        )
        .unwrap();
        assert_eq!(r.priority, 2);
        assert_eq!(r.correlation_key.as_deref(), Some("k1"));
        assert_eq!(r.timeout, Some(Duration::from_micros(1500)));
        assert_eq!(r.inputs[0].datatype, DataType::Fp32);

        let (_, b) = decode(
            r#"{"parameters": {"binary_data_output": false},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                "outputs": [{"name": "y", "parameters": {"binary_data": false, "binary_data": true}},
                            {"name": "z"}]}"#,
        )
        .unwrap();
        assert!(b.binary("y"));
        assert!(!b.binary("z"));

        for (body, says) in [
            (
                r#"{"parameters": {"priority": "high"}, "inputs": []}"#,
                "priority",
            ),
            (r#"{"parameters": [1, 2], "inputs": []}"#, "a map"),
            (r#"{"parameters": null, "inputs": []}"#, "a map"),
            (
                r#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                               "parameters": {"binary_data_size": -4}}]}"#,
                "binary_data_size",
            ),
        ] {
            let e = decode(body).err().expect(body);
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }
}
