//! `shoal-noop`: a KServe v2 server that does no inference, the transport
//! ceiling shoal's request path is measured against (issue 18). Over gRPC
//! (tonic, the same proto) and REST (hyper through axum, with the binary
//! tensor extension) it answers the calls perf_analyzer makes: health,
//! server and model metadata, model config, and infer, whose outputs are
//! zeros of the declared shape with the request's batch size. It decodes
//! what it must to answer (the protobuf message, the REST JSON header) and
//! nothing more: no validation, no queue, no thread hop.
//!
//! ```sh
//! shoal-noop --grpc-port 8001 --http-port 8000   # an `ffnn`-shaped model
//! ```
//! It prints `grpc <addr>` and `http <addr>` once listening (port 0 works).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};
use shoal::tensor::DataType;
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Status};

// shoal's allocator, so the ceiling is measured on the same terms.
#[global_allocator]
static GLOBAL: shoal::alloc::Mimalloc = shoal::alloc::Mimalloc;

#[derive(Parser, Debug)]
#[command(about = "A KServe v2 server that answers without inference (a transport baseline)")]
struct Args {
    /// Address to bind both listeners to.
    #[arg(long, env = "SHOAL_NOOP_BIND", default_value = "127.0.0.1")]
    bind: String,
    /// gRPC port (0: any free one).
    #[arg(long, env = "SHOAL_NOOP_GRPC_PORT", default_value_t = 8001)]
    grpc_port: u16,
    /// REST port (0: any free one).
    #[arg(long, env = "SHOAL_NOOP_HTTP_PORT", default_value_t = 8000)]
    http_port: u16,
    /// The model's name.
    #[arg(long, env = "SHOAL_NOOP_MODEL", default_value = "ffnn")]
    model: String,
    /// An input, `NAME:DATATYPE:DIM[,DIM...]` (dims without the batch dim).
    #[arg(long, env = "SHOAL_NOOP_INPUT", default_value = "input:FP32:784")]
    input: String,
    /// An output, as `--input`; answered with zeros.
    #[arg(long, env = "SHOAL_NOOP_OUTPUT", default_value = "output:FP32:10")]
    output: String,
    /// The model's max batch size (0: no batch dimension).
    #[arg(long, env = "SHOAL_NOOP_MAX_BATCH_SIZE", default_value_t = 64)]
    max_batch_size: i32,
}

/// A tensor of the model: name, datatype and dims (batch dim excluded).
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    datatype: DataType,
    dims: Vec<i64>,
}

impl Spec {
    fn parse(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.splitn(3, ':');
        let (Some(name), Some(dt), Some(dims)) = (parts.next(), parts.next(), parts.next()) else {
            anyhow::bail!("{s:?}: expected NAME:DATATYPE:DIMS");
        };
        let datatype =
            DataType::parse(dt).ok_or_else(|| anyhow::anyhow!("{dt:?}: no such datatype"))?;
        anyhow::ensure!(
            datatype.size().is_some(),
            "{dt:?}: only fixed-size datatypes"
        );
        let dims = dims
            .split(',')
            .map(|d| d.trim().parse::<i64>())
            .collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(dims.iter().all(|&d| d > 0), "{s:?}: dims must be positive");
        Ok(Self {
            name: name.to_string(),
            datatype,
            dims,
        })
    }

    /// The shape of `batch` rows (no batch dim when the model has none).
    fn shape(&self, batch: Option<i64>) -> Vec<i64> {
        batch.into_iter().chain(self.dims.iter().copied()).collect()
    }

    fn bytes(&self, batch: Option<i64>) -> usize {
        let elements: i64 = self.shape(batch).iter().product();
        elements.max(0) as usize * self.datatype.size().unwrap_or(1)
    }
}

struct Model {
    name: String,
    input: Spec,
    output: Spec,
    max_batch_size: i32,
}

impl Model {
    /// The batch size a request's first dim gives, when the model batches.
    fn batch(&self, first_input_shape: &[i64]) -> Option<i64> {
        (self.max_batch_size > 0).then(|| first_input_shape.first().copied().unwrap_or(1).max(0))
    }

    fn metadata(&self) -> pb::ModelMetadataResponse {
        let t = |s: &Spec| pb::model_metadata_response::TensorMetadata {
            name: s.name.clone(),
            datatype: s.datatype.as_str().into(),
            shape: if self.max_batch_size > 0 {
                std::iter::once(-1).chain(s.dims.iter().copied()).collect()
            } else {
                s.dims.clone()
            },
        };
        pb::ModelMetadataResponse {
            name: self.name.clone(),
            versions: vec!["1".into()],
            platform: "noop".into(),
            inputs: vec![t(&self.input)],
            outputs: vec![t(&self.output)],
        }
    }

    fn config(&self) -> pb::ModelConfig {
        pb::ModelConfig {
            name: self.name.clone(),
            platform: "noop".into(),
            max_batch_size: self.max_batch_size,
            input: vec![pb::ModelInput {
                name: self.input.name.clone(),
                data_type: self.input.datatype.triton_enum(),
                dims: self.input.dims.clone(),
                ..Default::default()
            }],
            output: vec![pb::ModelOutput {
                name: self.output.name.clone(),
                data_type: self.output.datatype.triton_enum(),
                dims: self.output.dims.clone(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

#[derive(Clone)]
struct Noop(Arc<Model>);

type StreamOut = Pin<Box<dyn Stream<Item = Result<pb::ModelStreamInferResponse, Status>> + Send>>;

fn unimplemented<T>() -> Result<tonic::Response<T>, Status> {
    Err(Status::unimplemented(
        "shoal-noop answers health, metadata, config and infer only",
    ))
}

#[tonic::async_trait]
impl GrpcInferenceService for Noop {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<tonic::Response<pb::ServerLiveResponse>, Status> {
        Ok(tonic::Response::new(pb::ServerLiveResponse { live: true }))
    }
    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<tonic::Response<pb::ServerReadyResponse>, Status> {
        Ok(tonic::Response::new(pb::ServerReadyResponse {
            ready: true,
        }))
    }
    async fn model_ready(
        &self,
        r: Request<pb::ModelReadyRequest>,
    ) -> Result<tonic::Response<pb::ModelReadyResponse>, Status> {
        let ready = r.get_ref().name == self.0.name;
        Ok(tonic::Response::new(pb::ModelReadyResponse { ready }))
    }
    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<tonic::Response<pb::ServerMetadataResponse>, Status> {
        Ok(tonic::Response::new(pb::ServerMetadataResponse {
            name: "shoal-noop".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["binary_tensor_data".into()],
        }))
    }
    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<tonic::Response<pb::ModelMetadataResponse>, Status> {
        self.known(&r.get_ref().name)?;
        Ok(tonic::Response::new(self.0.metadata()))
    }
    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<tonic::Response<pb::ModelConfigResponse>, Status> {
        self.known(&r.get_ref().name)?;
        Ok(tonic::Response::new(pb::ModelConfigResponse {
            config: Some(self.0.config()),
        }))
    }
    async fn model_infer(
        &self,
        r: Request<pb::ModelInferRequest>,
    ) -> Result<tonic::Response<pb::ModelInferResponse>, Status> {
        let r = r.into_inner();
        self.known(&r.model_name)?;
        let m = &self.0;
        let batch = m.batch(r.inputs.first().map_or(&[][..], |t| &t.shape[..]));
        Ok(tonic::Response::new(pb::ModelInferResponse {
            model_name: r.model_name,
            model_version: "1".into(),
            id: r.id,
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: m.output.name.clone(),
                datatype: m.output.datatype.as_str().into(),
                shape: m.output.shape(batch),
                ..Default::default()
            }],
            raw_output_contents: vec![Bytes::from(vec![0u8; m.output.bytes(batch)])],
            ..Default::default()
        }))
    }
    type ModelStreamInferStream = StreamOut;
    async fn model_stream_infer(
        &self,
        _: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<tonic::Response<StreamOut>, Status> {
        unimplemented()
    }
    async fn model_statistics(
        &self,
        _: Request<pb::ModelStatisticsRequest>,
    ) -> Result<tonic::Response<pb::ModelStatisticsResponse>, Status> {
        unimplemented()
    }
    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<tonic::Response<pb::RepositoryIndexResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_load(
        &self,
        _: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<tonic::Response<pb::RepositoryModelLoadResponse>, Status> {
        unimplemented()
    }
    async fn repository_model_unload(
        &self,
        _: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<tonic::Response<pb::RepositoryModelUnloadResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_status(
        &self,
        _: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_register(
        &self,
        _: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }
    async fn system_shared_memory_unregister(
        &self,
        _: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<tonic::Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }
    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<tonic::Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        unimplemented()
    }
    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<tonic::Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        unimplemented()
    }
    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<tonic::Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        unimplemented()
    }
}

impl Noop {
    fn known(&self, name: &str) -> Result<(), Status> {
        if name == self.0.name {
            Ok(())
        } else {
            Err(Status::not_found(format!("unknown model {name:?}")))
        }
    }
}

fn not_found(name: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("unknown model {name:?}")})),
    )
        .into_response()
}

async fn rest_metadata(State(n): State<Noop>, Path(name): Path<String>) -> Response {
    if name != n.0.name {
        return not_found(&name);
    }
    let m = n.0.metadata();
    let t = |v: &[pb::model_metadata_response::TensorMetadata]| {
        v.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect::<Vec<_>>()
    };
    Json(json!({
        "name": m.name, "versions": m.versions, "platform": m.platform,
        "inputs": t(&m.inputs), "outputs": t(&m.outputs),
    }))
    .into_response()
}

async fn rest_config(State(n): State<Noop>, Path(name): Path<String>) -> Response {
    if name != n.0.name {
        return not_found(&name);
    }
    let m = &n.0;
    let t = |s: &Spec| json!({"name": s.name, "data_type": s.datatype.triton_config_name(), "dims": s.dims});
    Json(json!({
        "name": m.name, "platform": "noop", "max_batch_size": m.max_batch_size,
        "input": [t(&m.input)], "output": [t(&m.output)],
    }))
    .into_response()
}

/// Reads the JSON header (all of the body, or the part
/// `Inference-Header-Content-Length` gives) for the batch size and whether
/// the output goes back binary; the tensor bytes are never looked at.
async fn rest_infer(
    State(n): State<Noop>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if name != n.0.name {
        return not_found(&name);
    }
    let m = &n.0;
    let header_len = headers
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(body.len())
        .min(body.len());
    let header: Value = match serde_json::from_slice(&body[..header_len]) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response()
        }
    };
    let shape: Vec<i64> = header["inputs"][0]["shape"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    let batch = m.batch(&shape);
    let binary = header["outputs"]
        .as_array()
        .and_then(|o| o.first())
        .map(|o| o["parameters"]["binary_data"].as_bool() == Some(true))
        .unwrap_or(header["parameters"]["binary_data_output"].as_bool() == Some(true));
    let bytes = m.output.bytes(batch);
    let mut out = json!({
        "model_name": m.name, "model_version": "1",
        "outputs": [{"name": m.output.name, "datatype": m.output.datatype.as_str(), "shape": m.output.shape(batch)}],
    });
    if let Some(id) = header.get("id") {
        out["id"] = id.clone();
    }
    if !binary {
        let zeros = bytes / m.output.datatype.size().unwrap_or(1);
        out["outputs"][0]["data"] = json!(vec![0; zeros]);
        return Json(out).into_response();
    }
    out["outputs"][0]["parameters"] = json!({"binary_data_size": bytes});
    let mut body = serde_json::to_vec(&out).unwrap_or_default();
    let json_len = body.len();
    body.resize(json_len + bytes, 0);
    let mut r = Response::new(axum::body::Body::from(body));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        "inference-header-content-length",
        HeaderValue::from(json_len),
    );
    r
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = Arc::new(Model {
        name: args.model,
        input: Spec::parse(&args.input)?,
        output: Spec::parse(&args.output)?,
        max_batch_size: args.max_batch_size,
    });
    let noop = Noop(model);
    let grpc = tokio::net::TcpListener::bind((args.bind.as_str(), args.grpc_port)).await?;
    let http = tokio::net::TcpListener::bind((args.bind.as_str(), args.http_port)).await?;
    println!("grpc {}", grpc.local_addr()?);
    println!("http {}", http.local_addr()?);
    let app = Router::new()
        .route(
            "/v2",
            get(|| async {
                Json(json!({
                    "name": "shoal-noop",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": ["binary_tensor_data"],
                }))
            }),
        )
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2/models/{name}", get(rest_metadata))
        .route("/v2/models/{name}/ready", get(|| async { StatusCode::OK }))
        .route("/v2/models/{name}/config", get(rest_config))
        .route("/v2/models/{name}/infer", post(rest_infer))
        .with_state(noop.clone());
    let grpc_server = tonic::transport::Server::builder()
        .add_service(GrpcInferenceServiceServer::new(noop).max_decoding_message_size(64 << 20))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(grpc));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = grpc_server => r?,
        r = axum::serve(http, app) => r?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
