//! The model repository extension over REST and gRPC (Triton's): index,
//! load and unload, which can be turned off or require a bearer token.

use super::auth::{grpc_authorization, Bearer};
use super::error::ApiError;
use crate::engine::control::{IndexEntry, ModelControl};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value};
use shoal_proto as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The repository endpoints and who may call them.
#[derive(Clone, Debug)]
pub struct RepositoryApi {
    control: Arc<ModelControl>,
    enabled: bool,
    token: Bearer,
}

impl RepositoryApi {
    /// `token`: when set, every call needs `Authorization: Bearer <token>`.
    pub fn new(control: Arc<ModelControl>, enabled: bool, token: Option<String>) -> Self {
        Self {
            control,
            enabled,
            token: Bearer::new(token),
        }
    }

    /// Checks the `authorization` header (HTTP) or metadata (gRPC).
    fn authorize(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        if !self.enabled {
            return Err(ApiError::permission_denied(
                "the model repository API is turned off (--repository-api=false)",
            ));
        }
        self.token.check(authorization, "the model repository API")
    }

    pub async fn grpc_index(
        &self,
        req: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        self.authorize(grpc_authorization(&req))?;
        let r = req.into_inner();
        one_repository(&r.repository_name)?;
        let models = self
            .control
            .index(r.ready)
            .into_iter()
            .map(|e| pb::repository_index_response::ModelIndex {
                name: e.name,
                version: e.version.map(|v| v.to_string()).unwrap_or_default(),
                state: e.state.map(|s| s.as_str().to_string()).unwrap_or_default(),
                reason: e.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    pub async fn grpc_load(
        &self,
        req: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        self.authorize(grpc_authorization(&req))?;
        let r = req.into_inner();
        one_repository(&r.repository_name)?;
        no_overrides(r.parameters.keys())?;
        self.control
            .load(&r.model_name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    pub async fn grpc_unload(
        &self,
        req: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        self.authorize(grpc_authorization(&req))?;
        let r = req.into_inner();
        one_repository(&r.repository_name)?;
        self.control
            .unload(&r.model_name)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guess was right.
/// shoal serves one repository; Triton's multi-repository name must be empty.
fn one_repository(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "repository_name {name:?}: shoal serves one repository, leave it empty"
        )))
    }
}

/// Triton's load may carry a config or files to load instead of the
/// repository's; shoal loads only what is on disk.
fn no_overrides<'a>(mut keys: impl Iterator<Item = &'a String>) -> Result<(), ApiError> {
    match keys.find(|k| *k == "config" || k.starts_with("file:")) {
        Some(k) => Err(ApiError::invalid(format!(
            "load parameter {k:?} is not supported: shoal loads the model as it is in the repository"
        ))),
        None => Ok(()),
    }
}

/// The REST routes; merged into the main router.
pub fn router(api: RepositoryApi) -> Router {
    Router::new()
        .route("/v2/repository/index", post(index))
        .route("/v2/repository/models/{m}/load", post(load))
        .route("/v2/repository/models/{m}/unload", post(unload))
        .with_state(api)
}

fn http_authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// An optional JSON body (tritonclient sends an empty one for the index).
fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

#[derive(Deserialize, Default)]
struct IndexBody {
    #[serde(default)]
    ready: bool,
}

#[derive(Deserialize, Default)]
struct ControlBody {
    #[serde(default)]
    parameters: Map<String, Value>,
}

fn entry_json(e: IndexEntry) -> Value {
    let mut m = Map::new();
    m.insert("name".into(), e.name.into());
    if let Some(v) = e.version {
        m.insert("version".into(), v.to_string().into());
    }
    if let Some(s) = e.state {
        m.insert("state".into(), s.as_str().into());
    }
    if !e.reason.is_empty() {
        m.insert("reason".into(), e.reason.into());
    }
    Value::Object(m)
}

async fn index(
    State(api): State<RepositoryApi>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<Json<Value>, ApiError> {
    api.authorize(http_authorization(&headers))?;
    let b: IndexBody = body(&bytes)?;
    let entries = api.control.index(b.ready);
    Ok(Json(Value::Array(
        entries.into_iter().map(entry_json).collect(),
    )))
}

async fn load(
    State(api): State<RepositoryApi>,
    Path(m): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    api.authorize(http_authorization(&headers))?;
    let b: ControlBody = body(&bytes)?;
    no_overrides(b.parameters.keys())?;
    api.control.load(&m).await?;
    Ok(StatusCode::OK)
}

async fn unload(
    State(api): State<RepositoryApi>,
    Path(m): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    api.authorize(http_authorization(&headers))?;
    // Only `unload_dependents` is defined, and shoal has no ensembles.
    let _: ControlBody = body(&bytes)?;
    api.control.unload(&m).await?;
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::control::ControlMode;
    use crate::engine::{Engine, EngineOptions};
    use std::time::Duration;

    fn api(enabled: bool, token: Option<&str>) -> RepositoryApi {
        let control = ModelControl::new(
            Engine::new(),
            "/nonexistent".into(),
            EngineOptions::default(),
            ControlMode::None,
            Duration::from_secs(1),
        );
        RepositoryApi::new(control, enabled, token.map(str::to_string))
    }

    #[test]
    fn token_checks() {
        use super::super::error::ApiErrorKind;
        let open = api(true, None);
        assert!(open.authorize(None).is_ok());
        let off = api(false, None);
        assert_eq!(
            off.authorize(None).unwrap_err().kind,
            ApiErrorKind::PermissionDenied
        );
        let locked = api(true, Some("s3cret"));
        assert_eq!(
            locked.authorize(None).unwrap_err().kind,
            ApiErrorKind::Unauthenticated
        );
        assert_eq!(
            locked.authorize(Some("Basic czNjcmV0")).unwrap_err().kind,
            ApiErrorKind::Unauthenticated
        );
        assert_eq!(
            locked.authorize(Some("Bearer s3cre")).unwrap_err().kind,
            ApiErrorKind::PermissionDenied
        );
        assert!(locked.authorize(Some("Bearer s3cret")).is_ok());
        assert!(locked.authorize(Some("bearer s3cret")).is_ok());
    }

    #[test]
    fn overrides_are_refused() {
        let keys = ["config".to_string()];
        assert!(no_overrides(keys.iter()).is_err());
        let keys = ["file:1/model.onnx".to_string()];
        assert!(no_overrides(keys.iter()).is_err());
        let keys = ["unload_dependents".to_string()];
        assert!(no_overrides(keys.iter()).is_ok());
    }
}
