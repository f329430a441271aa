//! KServe v2 over gRPC: `inference.GRPCInferenceService`, as Triton serves it.

use super::access::AccessInfo;
use super::auth::{grpc_authorization, Bearer};
use super::error::ApiError;
use super::metadata;
use super::repository::RepositoryApi;
use super::shm::{self as shm_api, ShmOutputs, Written};
use crate::engine::{Engine, InferRequest, InferResponse, Param};
use crate::shm::SharedMemory;
use crate::telemetry;
use crate::tensor::{join_bytes_elements, DataType, Tensor};
use bytes::Bytes;
use futures::Stream;
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// Span names: the RPCs, as OpenTelemetry's gRPC conventions name them.
const MODEL_INFER_SPAN: &str = "inference.GRPCInferenceService/ModelInfer";
const MODEL_STREAM_INFER_SPAN: &str = "inference.GRPCInferenceService/ModelStreamInfer";

/// Responses a stream may buffer before it stops reading new requests.
const STREAM_BUFFER: usize = 256;

#[derive(Clone)]
pub struct GrpcService {
    engine: Engine,
    shm: Arc<SharedMemory>,
    /// Needed to register, unregister or list shared-memory regions.
    shm_token: Bearer,
    /// The model repository extension; `None`: refused as turned off.
    repository: Option<RepositoryApi>,
    /// Cancelled at shutdown: open streams end once their requests are
    /// answered.
    stop: CancellationToken,
}

impl GrpcService {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            shm: Arc::default(),
            shm_token: Bearer::default(),
            repository: None,
            stop: CancellationToken::new(),
        }
    }

    /// At `stop`, each open stream reads no more requests, answers those
    /// it has, and ends with UNAVAILABLE, so a client holding a stream
    /// open does not hold up the shutdown.
    pub fn with_shutdown(mut self, stop: CancellationToken) -> Self {
        self.stop = stop;
        self
    }

    pub fn with_repository(mut self, api: RepositoryApi) -> Self {
        self.repository = Some(api);
        self
    }

    fn repository(&self) -> Result<&RepositoryApi, Status> {
        self.repository.as_ref().ok_or_else(|| {
            ApiError::permission_denied("the model repository API is not served here").into()
        })
    }

    /// Shares a shared-memory registry (with the REST front end, so a
    /// region registered over one protocol serves the other).
    pub fn with_shared_memory(mut self, shm: Arc<SharedMemory>, token: Bearer) -> Self {
        self.shm = shm;
        self.shm_token = token;
        self
    }

    /// The tonic service. Requests may come gzip- or zstd-compressed
    /// (the message limit applies to what they expand to); responses are
    /// compressed only as `response` allows, and then only in an encoding
    /// the client's `grpc-accept-encoding` lists.
    pub fn into_server(
        self,
        max_message_bytes: usize,
        response: ResponseCompression,
    ) -> GrpcInferenceServiceServer<Self> {
        use tonic::codec::CompressionEncoding::{Gzip, Zstd};
        let mut server = GrpcInferenceServiceServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes)
            .accept_compressed(Gzip)
            .accept_compressed(Zstd);
        if matches!(
            response,
            ResponseCompression::Gzip | ResponseCompression::Any
        ) {
            server = server.send_compressed(Gzip);
        }
        if matches!(
            response,
            ResponseCompression::Zstd | ResponseCompression::Any
        ) {
            server = server.send_compressed(Zstd);
        }
        server
    }
}

/// Which encodings gRPC responses may be compressed with
/// (`--grpc-response-compression`). Off by default, as Triton's
/// `--grpc-infer-response-compression-level`: gRPC clients list gzip in
/// `grpc-accept-encoding` whether or not they want it (the C++ library
/// always does), and compressing every answer on a sidecar's loopback
/// costs CPU and latency for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ResponseCompression {
    /// Never compress responses.
    #[default]
    None,
    Gzip,
    Zstd,
    /// gzip or zstd, whichever the client accepts.
    Any,
}

/// Parses the `grpc-timeout` header (e.g. `100m`, `5S`) into a duration.
/// The spec allows at most eight digits; longer values are not timeouts.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (num, unit) = value.split_at(value.len().checked_sub(1)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn param_i64(p: &pb::InferParameter) -> Option<i64> {
    use pb::infer_parameter::ParameterChoice::*;
    match p.parameter_choice.as_ref()? {
        Int64Param(v) => Some(*v),
        Uint64Param(v) => i64::try_from(*v).ok(),
        StringParam(s) => s.parse().ok(),
        DoubleParam(d) => Some(*d as i64),
        BoolParam(_) => None,
    }
}

/// A parameter as a key: strings as they are, integers in decimal.
fn param_key(p: &pb::InferParameter) -> Option<String> {
    use pb::infer_parameter::ParameterChoice::*;
    match p.parameter_choice.as_ref()? {
        StringParam(s) => Some(s.clone()),
        Int64Param(v) => Some(v.to_string()),
        Uint64Param(v) => Some(v.to_string()),
        _ => None,
    }
}

fn param_bool(req: &pb::ModelInferRequest, name: &str) -> Result<bool, ApiError> {
    use pb::infer_parameter::ParameterChoice::*;
    match req
        .parameters
        .get(name)
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => Ok(false),
        Some(BoolParam(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(format!(
            "parameter {name} must be a boolean"
        ))),
    }
}

/// What a call's metadata adds to its request.
#[derive(Debug, Default, Clone)]
pub struct CallMeta {
    /// The gRPC deadline.
    pub deadline: Option<Instant>,
    /// The `x-correlation-key` metadata.
    pub correlation_key: Option<String>,
}

/// Decodes a protobuf request into the engine's form, with the outputs it
/// wants written into shared memory.
pub fn decode_request(
    req: pb::ModelInferRequest,
    meta: CallMeta,
    shm: &SharedMemory,
) -> Result<(InferRequest, ShmOutputs), ApiError> {
    let deadline = meta.deadline;
    let timeout = match req.parameters.get("timeout") {
        None => None,
        Some(p) => {
            let us = param_i64(p).filter(|&v| v >= 0).ok_or_else(|| {
                ApiError::invalid("parameter timeout must be a non-negative integer (µs)")
            })?;
            Some(Duration::from_micros(us as u64))
        }
    };
    let priority = match req.parameters.get("priority") {
        None => 0,
        Some(p) => param_i64(p).filter(|&v| v >= 0).ok_or_else(|| {
            ApiError::invalid(
                "parameter priority must be a non-negative integer (1 is the highest)",
            )
        })? as u64,
    };
    let explicit = |name: &str| -> Result<Option<String>, ApiError> {
        match req.parameters.get(name) {
            None => Ok(None),
            Some(p) => param_key(p).map(Some).ok_or_else(|| {
                ApiError::invalid(format!("parameter {name} must be a string or an integer"))
            }),
        }
    };
    // The explicit parameter wins over the metadata, which wins over
    // Triton's sequence_id.
    let correlation_key = explicit("correlation_key")?
        .or(meta.correlation_key)
        .or(explicit("sequence_id")?.filter(|s| s != "0"));
    let sequence_start = param_bool(&req, "sequence_start")?;
    let sequence_end = param_bool(&req, "sequence_end")?;
    // Inputs in shared memory have no raw_input_contents entry (Triton's
    // rule), so the raw entries belong to the other inputs, in order.
    let in_shm = req
        .inputs
        .iter()
        .map(|t| shm_api::grpc_ref(&format_args!("input {:?}", t.name), &t.parameters))
        .collect::<Result<Vec<_>, _>>()?;
    let raw = req.raw_input_contents;
    let by_value = in_shm.iter().filter(|r| r.is_none()).count();
    if !raw.is_empty() && raw.len() != by_value {
        return Err(ApiError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs not in shared memory",
            raw.len(),
            by_value
        )));
    }
    let mut inputs = Vec::with_capacity(req.inputs.len());
    let mut raw = raw.into_iter();
    for (t, in_shm) in req.inputs.into_iter().zip(in_shm) {
        let datatype = DataType::parse(&t.datatype).ok_or_else(|| {
            ApiError::invalid(format!(
                "input {:?}: unknown datatype {:?}",
                t.name, t.datatype
            ))
        })?;
        if let Some(r) = in_shm {
            if t.contents.is_some() {
                return Err(ApiError::invalid(format!(
                    "input {:?}: contents and {} are both given",
                    t.name,
                    shm_api::REGION
                )));
            }
            let data = shm.input(&t.name, &r)?;
            inputs.push(Tensor {
                name: t.name,
                datatype,
                shape: t.shape,
                data,
            });
            continue;
        }
        let data = match (raw.next(), t.contents) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(format!(
                    "input {:?}: contents and raw_input_contents are both given",
                    t.name
                )))
            }
            (Some(bytes), None) => bytes,
            (None, Some(c)) => contents_to_bytes(&t.name, datatype, c)?,
            (None, None) => {
                return Err(ApiError::invalid(format!(
                    "input {:?} carries no data",
                    t.name
                )));
            }
        };
        inputs.push(Tensor {
            name: t.name,
            datatype,
            shape: t.shape,
            data,
        });
    }
    let mut shm_outputs = ShmOutputs::default();
    for o in &req.outputs {
        if let Some(r) = shm_api::grpc_ref(&format_args!("output {:?}", o.name), &o.parameters)? {
            shm_outputs.push(o.name.clone(), shm.output(&o.name, &r)?);
        }
    }
    let request = InferRequest {
        model: req.model_name,
        version: Some(req.model_version).filter(|v| !v.is_empty()),
        id: req.id,
        inputs,
        outputs: req.outputs.into_iter().map(|o| o.name).collect(),
        deadline,
        timeout,
        priority,
        correlation_key,
        sequence_start,
        sequence_end,
        return_state: false,
        span: None,
    };
    Ok((request, shm_outputs))
}

fn to_param(p: Param) -> pb::InferParameter {
    use pb::infer_parameter::ParameterChoice;
    pb::InferParameter {
        parameter_choice: Some(match p {
            Param::Bool(b) => ParameterChoice::BoolParam(b),
            Param::Int(i) => ParameterChoice::Int64Param(i),
            Param::Str(s) => ParameterChoice::StringParam(s),
        }),
    }
}

/// Typed `contents` to raw little-endian bytes, checking integer ranges.
fn contents_to_bytes(
    name: &str,
    dt: DataType,
    c: pb::InferTensorContents,
) -> Result<Bytes, ApiError> {
    fn narrow<S: Copy + std::fmt::Display, T: TryFrom<S> + bytemuck::Pod>(
        name: &str,
        v: &[S],
    ) -> Result<Vec<u8>, ApiError> {
        let mut out = Vec::with_capacity(v.len() * std::mem::size_of::<T>());
        for &x in v {
            let t = T::try_from(x).map_err(|_| {
                ApiError::invalid(format!(
                    "input {name:?}: value {x} out of range for its datatype"
                ))
            })?;
            out.extend_from_slice(bytemuck::bytes_of(&t));
        }
        Ok(out)
    }
    let bytes: Vec<u8> = match dt {
        DataType::Bool => c.bool_contents.iter().map(|&b| b as u8).collect(),
        DataType::Int8 => narrow::<i32, i8>(name, &c.int_contents)?,
        DataType::Int16 => narrow::<i32, i16>(name, &c.int_contents)?,
        DataType::Int32 => bytemuck::cast_slice(&c.int_contents).to_vec(),
        DataType::Int64 => bytemuck::cast_slice(&c.int64_contents).to_vec(),
        DataType::Uint8 => narrow::<u32, u8>(name, &c.uint_contents)?,
        DataType::Uint16 => narrow::<u32, u16>(name, &c.uint_contents)?,
        DataType::Uint32 => bytemuck::cast_slice(&c.uint_contents).to_vec(),
        DataType::Uint64 => bytemuck::cast_slice(&c.uint64_contents).to_vec(),
        DataType::Fp32 => bytemuck::cast_slice(&c.fp32_contents).to_vec(),
        DataType::Fp64 => bytemuck::cast_slice(&c.fp64_contents).to_vec(),
        DataType::Bytes => join_bytes_elements(c.bytes_contents.iter().map(|b| &b[..])),
        DataType::Fp16 | DataType::Bf16 => {
            return Err(ApiError::invalid(format!(
                "input {name:?}: {dt} has no typed contents field; send it in raw_input_contents"
            )))
        }
    };
    Ok(Bytes::from(bytes))
}

/// Encodes a response with `raw_output_contents`, as Triton does. Outputs
/// already `written` to shared memory keep an empty raw entry, so raw
/// entries still line up with the outputs.
pub fn encode_response(resp: InferResponse, written: &[Written]) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut raw = Vec::with_capacity(resp.outputs.len());
    for t in resp.outputs {
        let parameters = written
            .iter()
            .find(|w| w.name == t.name)
            .map(Written::grpc_parameters)
            .unwrap_or_default();
        outputs.push(pb::model_infer_response::InferOutputTensor {
            name: t.name,
            datatype: t.datatype.as_str().to_string(),
            shape: t.shape,
            parameters,
            contents: None,
        });
        raw.push(t.data);
    }
    pb::ModelInferResponse {
        model_name: resp.model,
        model_version: resp.version,
        id: resp.id,
        parameters: resp
            .parameters
            .into_iter()
            .map(|(k, v)| (k, to_param(v)))
            .collect(),
        outputs,
        raw_output_contents: raw,
    }
}

fn call_meta<T>(req: &Request<T>) -> CallMeta {
    let md = req.metadata();
    CallMeta {
        deadline: md
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .and_then(|d| Instant::now().checked_add(d)),
        correlation_key: md
            .get("x-correlation-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for GrpcService {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.engine.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        let ready = self
            .engine
            .model(&r.name, Some(&r.version))
            .is_ok_and(|mv| self.engine.version_ready(&mv));
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: metadata::SERVER_NAME.into(),
            version: metadata::SERVER_VERSION.into(),
            extensions: super::EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let mv = self
            .engine
            .model(&r.name, Some(&r.version))
            .map_err(ApiError::from)?;
        Ok(Response::new(metadata::model_metadata(&self.engine, &mv)))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let meta = call_meta(&req);
        let span = telemetry::request_span(
            MODEL_INFER_SPAN,
            "grpc",
            &req.get_ref().model_name,
            req.metadata().as_ref(),
        );
        let result = async {
            let (mut request, shm_outputs) = decode_request(req.into_inner(), meta, &self.shm)?;
            request.span = span.clone();
            let key = telemetry::access_log_keys()
                .then(|| request.correlation_key.clone())
                .flatten();
            let mut resp = self.engine.infer(request).await.map_err(ApiError::from)?;
            let written = shm_outputs.write(&mut resp)?;
            let info =
                telemetry::access_log_on().then(|| AccessInfo::answered(&resp, key.as_deref()));
            let _encode = span.as_ref().map(|s| {
                tracing::info_span!(target: telemetry::SPAN_TARGET, parent: s, "encode").entered()
            });
            let mut r = Response::new(encode_response(resp, &written));
            if let Some(info) = info {
                r.extensions_mut().insert(info);
            }
            Ok::<_, ApiError>(r)
        }
        .await;
        if let Err(e) = &result {
            telemetry::record_error(&span, &e.message);
        }
        Ok(result?)
    }

    type ModelStreamInferStream = StreamOut;

    async fn model_stream_infer(
        &self,
        req: Request<Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let meta = call_meta(&req);
        // Each message's span continues the trace the stream's metadata carries.
        let stream_headers = if telemetry::tracing_on() {
            req.metadata().clone().into_headers()
        } else {
            Default::default()
        };
        let timeout = meta
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let engine = self.engine.clone();
        let shm = self.shm.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            // The answers being worked on, awaited at shutdown.
            let mut answering = tokio::task::JoinSet::new();
            loop {
                while answering.try_join_next().is_some() {}
                let msg = tokio::select! {
                    m = incoming.message() => m,
                    _ = tx.closed() => break,
                    _ = stop.cancelled() => {
                        while answering.join_next().await.is_some() {}
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "server is shutting down: the stream ends; requests sent after the last answer were not read",
                            )))
                            .await;
                        return;
                    }
                };
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                // Requests of one stream are admitted in stream order (so a
                // key's requests keep it) and then run concurrently; each
                // answer carries its request id.
                let id = msg.id.clone();
                let msg_meta = CallMeta {
                    deadline: timeout.and_then(|d| Instant::now().checked_add(d)),
                    correlation_key: meta.correlation_key.clone(),
                };
                let span = telemetry::request_span(
                    MODEL_STREAM_INFER_SPAN,
                    "grpc",
                    &msg.model_name,
                    &stream_headers,
                );
                let submitted = decode_request(msg, msg_meta, &shm).map(|(mut r, o)| {
                    r.span = span.clone();
                    (engine.submit(r), o)
                });
                let tx = tx.clone();
                answering.spawn(async move {
                    let outcome = async {
                        let (s, shm_outputs) = submitted?;
                        let mut resp = s.wait().await.map_err(ApiError::from)?;
                        let written = shm_outputs.write(&mut resp)?;
                        Ok::<_, ApiError>((resp, written))
                    };
                    let reply = tokio::select! {
                        r = outcome => r,
                        _ = tx.closed() => return,
                    };
                    let item = match reply {
                        Ok((resp, written)) => {
                            let _encode = span.as_ref().map(|s| {
                                tracing::info_span!(target: telemetry::SPAN_TARGET, parent: s, "encode")
                                    .entered()
                            });
                            pb::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(encode_response(resp, &written)),
                            }
                        }
                        Err(e) => {
                            telemetry::record_error(&span, &e.message);
                            pb::ModelStreamInferResponse {
                                error_message: e.message,
                                infer_response: Some(pb::ModelInferResponse {
                                    id,
                                    ..Default::default()
                                }),
                            }
                        }
                    };
                    let _ = tx.send(Ok(item)).await;
                });
            }
            // The client is done sending: the answers still being worked
            // on go out on their own (dropping the set would abort them).
            answering.detach_all();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn model_config(
        &self,
        req: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = req.into_inner();
        let mv = self
            .engine
            .model(&r.name, Some(&r.version))
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(metadata::model_config(&mv)),
        }))
    }

    async fn model_statistics(
        &self,
        req: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = req.into_inner();
        let stats =
            metadata::statistics(&self.engine, &r.name, &r.version).map_err(ApiError::from)?;
        Ok(Response::new(stats))
    }

    async fn system_shared_memory_status(
        &self,
        req: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        self.shm_token
            .check(grpc_authorization(&req), shm_api::TOKEN_WHAT)?;
        Ok(Response::new(shm_api::grpc_status(
            &self.shm,
            req.into_inner(),
        )?))
    }

    async fn system_shared_memory_register(
        &self,
        req: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        self.shm_token
            .check(grpc_authorization(&req), shm_api::TOKEN_WHAT)?;
        Ok(Response::new(shm_api::grpc_register(
            &self.shm,
            req.into_inner(),
        )?))
    }

    async fn system_shared_memory_unregister(
        &self,
        req: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        self.shm_token
            .check(grpc_authorization(&req), shm_api::TOKEN_WHAT)?;
        Ok(Response::new(shm_api::grpc_unregister(
            &self.shm,
            req.into_inner(),
        )))
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        Err(shm_api::cuda_unsupported().into())
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        Err(shm_api::cuda_unsupported().into())
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        Err(shm_api::cuda_unsupported().into())
    }

    async fn repository_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.repository()?.grpc_index(req).await
    }

    async fn repository_model_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.repository()?.grpc_load(req).await
    }

    async fn repository_model_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.repository()?.grpc_unload(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None, "nine digits");
        assert_eq!(parse_grpc_timeout("+5S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn typed_contents_are_range_checked() {
        let c = pb::InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        let e = contents_to_bytes("a", DataType::Int8, c).unwrap_err();
        assert!(e.message.contains("out of range"), "{}", e.message);
        let c = pb::InferTensorContents {
            fp32_contents: vec![1.5],
            ..Default::default()
        };
        assert_eq!(
            &contents_to_bytes("a", DataType::Fp32, c).unwrap()[..],
            &1.5f32.to_le_bytes()
        );
    }
}
