//! The shared-memory extension on the wire: Triton's
//! `/v2/systemsharedmemory/...` REST endpoints and gRPC calls, the tensor
//! parameters that point into a region, and CUDA shared memory answered
//! "unsupported" on both protocols.

use super::error::ApiError;
use super::http::HttpState;
use crate::engine::InferResponse;
use crate::shm::{OutputTarget, RegionStatus, SharedMemory, ShmRef};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_proto as pb;
use std::collections::HashMap;

pub const REGION: &str = "shared_memory_region";
pub const OFFSET: &str = "shared_memory_offset";
pub const BYTE_SIZE: &str = "shared_memory_byte_size";

/// How the token's messages name this API.
pub const TOKEN_WHAT: &str = "shared-memory registration (--shm-token)";

/// The REST `authorization` header.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

const CUDA_UNSUPPORTED: &str =
    "CUDA shared memory is not supported by this server (no GPU); use system shared memory";

/// A tensor parameter as both protocols carry it.
pub enum ParamView<'a> {
    Str(&'a str),
    Int(i128),
    Other,
}

/// Reads a tensor's `shared_memory_*` parameters: `None` when it has no
/// region, an error when they are incomplete or mistyped. `what` names the
/// tensor in errors, formatted only then (every request passes here).
pub fn shm_ref<'a>(
    what: &dyn std::fmt::Display,
    get: impl Fn(&str) -> Option<ParamView<'a>>,
) -> Result<Option<ShmRef>, ApiError> {
    let int = |key: &str| -> Result<Option<u64>, ApiError> {
        match get(key) {
            None => Ok(None),
            Some(ParamView::Int(v)) => u64::try_from(v).map(Some).map_err(|_| {
                ApiError::invalid(format!("{what}: {key} must not be negative, got {v}"))
            }),
            Some(_) => Err(ApiError::invalid(format!(
                "{what}: {key} must be an integer"
            ))),
        }
    };
    let region = match get(REGION) {
        None => {
            if get(BYTE_SIZE).is_some() || get(OFFSET).is_some() {
                return Err(ApiError::invalid(format!(
                    "{what}: {BYTE_SIZE} or {OFFSET} given without {REGION}"
                )));
            }
            return Ok(None);
        }
        Some(ParamView::Str(s)) => s.to_string(),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "{what}: {REGION} must be a string"
            )))
        }
    };
    let byte_size = int(BYTE_SIZE)?
        .ok_or_else(|| ApiError::invalid(format!("{what}: {REGION} needs {BYTE_SIZE}")))?;
    Ok(Some(ShmRef {
        region,
        offset: int(OFFSET)?.unwrap_or(0),
        byte_size,
    }))
}

/// [`shm_ref`] over gRPC tensor parameters.
pub fn grpc_ref(
    what: &dyn std::fmt::Display,
    params: &HashMap<String, pb::InferParameter>,
) -> Result<Option<ShmRef>, ApiError> {
    use pb::infer_parameter::ParameterChoice::*;
    shm_ref(what, |k| {
        Some(match params.get(k)?.parameter_choice.as_ref()? {
            StringParam(s) => ParamView::Str(s),
            Int64Param(v) => ParamView::Int(*v as i128),
            Uint64Param(v) => ParamView::Int(*v as i128),
            _ => ParamView::Other,
        })
    })
}

/// [`shm_ref`] over REST tensor parameters, looked up by `get`.
pub fn http_ref<'v>(
    what: &dyn std::fmt::Display,
    get: impl Fn(&str) -> Option<&'v Value>,
) -> Result<Option<ShmRef>, ApiError> {
    shm_ref(what, |k| {
        Some(match get(k)? {
            Value::String(s) => ParamView::Str(s),
            Value::Number(n) => n
                .as_i64()
                .map(|v| v as i128)
                .or(n.as_u64().map(|v| v as i128))
                .map_or(ParamView::Other, ParamView::Int),
            _ => ParamView::Other,
        })
    })
}

/// The outputs a request asked to have written into shared memory, with
/// their regions held from decoding until the answer.
#[derive(Default)]
pub struct ShmOutputs(Vec<(String, OutputTarget)>);

/// An output that went into shared memory: the response says where.
pub struct Written {
    pub name: String,
    pub reference: ShmRef,
    pub byte_size: usize,
}

impl ShmOutputs {
    pub fn push(&mut self, name: String, target: OutputTarget) {
        self.0.push((name, target));
    }

    /// Writes the outputs that have a region and empties their data.
    pub fn write(&self, resp: &mut InferResponse) -> Result<Vec<Written>, ApiError> {
        let mut written = Vec::new();
        if self.0.is_empty() {
            return Ok(written);
        }
        for t in &mut resp.outputs {
            let Some((_, target)) = self.0.iter().find(|(n, _)| *n == t.name) else {
                continue;
            };
            target.write(&t.name, &t.data)?;
            written.push(Written {
                name: t.name.clone(),
                reference: target.reference.clone(),
                byte_size: t.data.len(),
            });
            t.data = Bytes::new();
        }
        Ok(written)
    }
}

impl Written {
    /// The output's response parameters, as Triton reports them.
    pub fn grpc_parameters(&self) -> HashMap<String, pb::InferParameter> {
        use pb::infer_parameter::ParameterChoice::*;
        let p = |c| pb::InferParameter {
            parameter_choice: Some(c),
        };
        let mut m = HashMap::new();
        m.insert(REGION.into(), p(StringParam(self.reference.region.clone())));
        m.insert(BYTE_SIZE.into(), p(Int64Param(self.byte_size as i64)));
        if self.reference.offset != 0 {
            m.insert(OFFSET.into(), p(Int64Param(self.reference.offset as i64)));
        }
        m
    }

    pub fn json_parameters(&self) -> Value {
        let mut v = json!({REGION: self.reference.region, BYTE_SIZE: self.byte_size});
        if self.reference.offset != 0 {
            v[OFFSET] = json!(self.reference.offset);
        }
        v
    }
}

fn name_filter(name: &str) -> Option<&str> {
    Some(name).filter(|n| !n.is_empty())
}

pub fn grpc_status(
    shm: &SharedMemory,
    r: pb::SystemSharedMemoryStatusRequest,
) -> Result<pb::SystemSharedMemoryStatusResponse, ApiError> {
    use pb::system_shared_memory_status_response::RegionStatus as Pb;
    let regions = shm
        .status(name_filter(&r.name))?
        .into_iter()
        .map(|s| {
            let v = Pb {
                name: s.name.clone(),
                key: s.key,
                offset: s.offset,
                byte_size: s.byte_size,
            };
            (s.name, v)
        })
        .collect();
    Ok(pb::SystemSharedMemoryStatusResponse { regions })
}

pub fn grpc_register(
    shm: &SharedMemory,
    r: pb::SystemSharedMemoryRegisterRequest,
) -> Result<pb::SystemSharedMemoryRegisterResponse, ApiError> {
    shm.register(&r.name, &r.key, r.offset, r.byte_size)?;
    tracing::debug!(name = %r.name, key = %r.key, byte_size = r.byte_size, "shared memory registered");
    Ok(pb::SystemSharedMemoryRegisterResponse {})
}

pub fn grpc_unregister(
    shm: &SharedMemory,
    r: pb::SystemSharedMemoryUnregisterRequest,
) -> pb::SystemSharedMemoryUnregisterResponse {
    shm.unregister(name_filter(&r.name));
    pb::SystemSharedMemoryUnregisterResponse {}
}

/// Every CUDA shared-memory call, on either protocol.
pub fn cuda_unsupported() -> ApiError {
    ApiError::unsupported(CUDA_UNSUPPORTED)
}

/// The REST endpoints of the extension, merged into the main router.
pub fn routes() -> Router<HttpState> {
    async fn cuda() -> ApiError {
        cuda_unsupported()
    }
    Router::new()
        .route("/v2/systemsharedmemory/status", get(status_all))
        .route(
            "/v2/systemsharedmemory/region/{name}/status",
            get(status_one),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/register",
            post(register),
        )
        .route("/v2/systemsharedmemory/unregister", post(unregister_all))
        .route(
            "/v2/systemsharedmemory/region/{name}/unregister",
            post(unregister_one),
        )
        .route("/v2/cudasharedmemory/status", get(cuda))
        .route("/v2/cudasharedmemory/region/{name}/status", get(cuda))
        .route("/v2/cudasharedmemory/region/{name}/register", post(cuda))
        .route("/v2/cudasharedmemory/unregister", post(cuda))
        .route("/v2/cudasharedmemory/region/{name}/unregister", post(cuda))
}

fn status_json(regions: Vec<RegionStatus>) -> Json<Value> {
    Json(Value::Array(
        regions
            .into_iter()
            .map(|s| json!({"name": s.name, "key": s.key, "offset": s.offset, "byte_size": s.byte_size}))
            .collect(),
    ))
}

async fn status_all(
    State(st): State<HttpState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.shm_token.check(authorization(&headers), TOKEN_WHAT)?;
    Ok(status_json(st.shm.status(None)?))
}

async fn status_one(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.shm_token.check(authorization(&headers), TOKEN_WHAT)?;
    Ok(status_json(st.shm.status(Some(&name))?))
}

#[derive(Deserialize)]
struct RegisterBody {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

async fn register(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    st.shm_token.check(authorization(&headers), TOKEN_WHAT)?;
    let b: RegisterBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(format!(
            "register body must be {{\"key\", \"offset\", \"byte_size\"}}: {e}"
        ))
    })?;
    st.shm.register(&name, &b.key, b.offset, b.byte_size)?;
    Ok(Json(json!({})))
}

async fn unregister_all(
    State(st): State<HttpState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.shm_token.check(authorization(&headers), TOKEN_WHAT)?;
    st.shm.unregister(None);
    Ok(Json(json!({})))
}

async fn unregister_one(
    State(st): State<HttpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.shm_token.check(authorization(&headers), TOKEN_WHAT)?;
    st.shm.unregister(Some(&name));
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> serde_json::Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tensor_parameters() {
        let empty = params(json!({}));
        assert_eq!(http_ref(&"input x", |k| empty.get(k)).unwrap(), None);
        let given = params(json!({REGION: "r", BYTE_SIZE: 16, OFFSET: 8}));
        let r = http_ref(&"input x", |k| given.get(k)).unwrap().unwrap();
        assert_eq!((r.region.as_str(), r.offset, r.byte_size), ("r", 8, 16));
        for bad in [
            json!({BYTE_SIZE: 16}),
            json!({REGION: "r"}),
            json!({REGION: 3, BYTE_SIZE: 16}),
            json!({REGION: "r", BYTE_SIZE: -1}),
            json!({REGION: "r", BYTE_SIZE: 16, OFFSET: "8"}),
        ] {
            let m = params(bad.clone());
            let e = http_ref(&"input x", |k| m.get(k)).unwrap_err();
            assert!(e.message.starts_with("input x"), "{bad}: {}", e.message);
        }
        let mut g = HashMap::new();
        g.insert(
            REGION.to_string(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                    "r".into(),
                )),
            },
        );
        assert!(grpc_ref(&"output y", &g).is_err());
        g.insert(
            BYTE_SIZE.to_string(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(4)),
            },
        );
        assert_eq!(grpc_ref(&"output y", &g).unwrap().unwrap().byte_size, 4);
    }
}
