//! The one table mapping error kinds to HTTP status and gRPC code.

use crate::engine::control::ControlError;
use crate::engine::{EngineError, ErrorKind};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Errors the API layer reports; engine errors keep their kind.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiErrorKind {
    Engine(ErrorKind),
    /// The body or message exceeds the configured limit.
    PayloadTooLarge,
    /// The name is taken (a shared-memory region registered twice).
    AlreadyExists,
    /// A protocol feature this build does not offer (CUDA shared memory).
    Unsupported,
    /// A protected endpoint was called without a bearer token.
    Unauthenticated,
    /// A wrong token, or an endpoint turned off.
    PermissionDenied,
}

/// How long a client should wait before retrying a rejection for overload:
/// REST's `Retry-After` (whole seconds, so 1) and `retry-after-ms`, gRPC's
/// `retry-after-ms` metadata. A queue that was full drains within
/// milliseconds at the rates shoal serves; the hint spaces retries out
/// rather than predicting the drain.
pub const RETRY_AFTER_MS: u64 = 100;

/// Kinds whose rejection carries the retry hint.
fn retry_hint(kind: ApiErrorKind) -> bool {
    kind == ApiErrorKind::Engine(ErrorKind::Overloaded)
}

/// kind → (HTTP status, gRPC code). Every error of every protocol goes
/// through this table.
pub fn codes(kind: ApiErrorKind) -> (StatusCode, tonic::Code) {
    use ApiErrorKind::*;
    use ErrorKind::*;
    match kind {
        Engine(InvalidArgument) => (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument),
        Engine(NotFound) => (StatusCode::NOT_FOUND, tonic::Code::NotFound),
        // A full queue or a shed request is worth retrying: 503 /
        // UNAVAILABLE as Triton answers it, which clients built for Triton
        // (Flink's connector among them: 5xx retried, 4xx failed at once)
        // retry, with a hint (`retry_hint`).
        Engine(Overloaded) => (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable),
        Engine(DeadlineExceeded) => (StatusCode::GATEWAY_TIMEOUT, tonic::Code::DeadlineExceeded),
        Engine(Unavailable) => (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable),
        // 499: nginx's "client closed request"; nobody is left to read it.
        Engine(Cancelled) => (
            StatusCode::from_u16(499).expect("valid status"),
            tonic::Code::Cancelled,
        ),
        Engine(Internal) => (StatusCode::INTERNAL_SERVER_ERROR, tonic::Code::Internal),
        PayloadTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            tonic::Code::ResourceExhausted,
        ),
        AlreadyExists => (StatusCode::CONFLICT, tonic::Code::AlreadyExists),
        Unsupported => (StatusCode::NOT_IMPLEMENTED, tonic::Code::Unimplemented),
        Unauthenticated => (StatusCode::UNAUTHORIZED, tonic::Code::Unauthenticated),
        PermissionDenied => (StatusCode::FORBIDDEN, tonic::Code::PermissionDenied),
    }
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::Engine(ErrorKind::InvalidArgument),
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::Engine(ErrorKind::NotFound),
            message: message.into(),
        }
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::PayloadTooLarge,
            message: message.into(),
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::Unauthenticated,
            message: message.into(),
        }
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::PermissionDenied,
            message: message.into(),
        }
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self {
            kind: ApiErrorKind::Unsupported,
            message: message.into(),
        }
    }
}

impl From<crate::shm::ShmError> for ApiError {
    fn from(e: crate::shm::ShmError) -> Self {
        use crate::shm::ShmErrorClass as C;
        let kind = match e.class() {
            C::NotFound => ApiErrorKind::Engine(ErrorKind::NotFound),
            C::InvalidArgument => ApiErrorKind::Engine(ErrorKind::InvalidArgument),
            C::AlreadyExists => ApiErrorKind::AlreadyExists,
            C::Internal => ApiErrorKind::Engine(ErrorKind::Internal),
        };
        Self {
            kind,
            message: e.to_string(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self {
            kind: ApiErrorKind::Engine(e.kind()),
            message: e.to_string(),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let code = codes(e.kind).1;
        if retry_hint(e.kind) {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("retry-after-ms", RETRY_AFTER_MS.into());
            tonic::Status::with_metadata(code, e.message, md)
        } else {
            tonic::Status::new(code, e.message)
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        Self {
            kind: ApiErrorKind::Engine(e.kind()),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = codes(self.kind).0;
        let mut response = (
            status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if retry_hint(self.kind) {
            let h = response.headers_mut();
            let secs = RETRY_AFTER_MS.div_ceil(1000).max(1);
            h.insert(axum::http::header::RETRY_AFTER, secs.into());
            h.insert("retry-after-ms", RETRY_AFTER_MS.into());
        }
        if self.kind == ApiErrorKind::Unauthenticated {
            // RFC 6750: say which scheme the client should use.
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_the_promised_pairs() {
        let overloaded = codes(ApiErrorKind::Engine(ErrorKind::Overloaded));
        assert_eq!(
            overloaded,
            (StatusCode::SERVICE_UNAVAILABLE, tonic::Code::Unavailable)
        );
        let e = ApiError {
            kind: ApiErrorKind::Engine(ErrorKind::Overloaded),
            message: "queue full".into(),
        };
        let r = e.clone().into_response();
        assert_eq!(r.headers()["retry-after"], "1");
        assert_eq!(r.headers()["retry-after-ms"], "100");
        let s = tonic::Status::from(e);
        assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "100");
        let plain = tonic::Status::from(ApiError::invalid("bad"));
        assert!(plain.metadata().get("retry-after-ms").is_none());
        let deadline = codes(ApiErrorKind::Engine(ErrorKind::DeadlineExceeded));
        assert_eq!(
            deadline,
            (StatusCode::GATEWAY_TIMEOUT, tonic::Code::DeadlineExceeded)
        );
        assert_eq!(
            codes(ApiErrorKind::AlreadyExists),
            (StatusCode::CONFLICT, tonic::Code::AlreadyExists)
        );
        assert_eq!(
            codes(ApiErrorKind::Unsupported),
            (StatusCode::NOT_IMPLEMENTED, tonic::Code::Unimplemented)
        );
        assert_eq!(
            codes(ApiErrorKind::Unauthenticated),
            (StatusCode::UNAUTHORIZED, tonic::Code::Unauthenticated)
        );
        assert_eq!(
            codes(ApiErrorKind::PermissionDenied),
            (StatusCode::FORBIDDEN, tonic::Code::PermissionDenied)
        );
        let invalid = codes(ApiErrorKind::Engine(ErrorKind::InvalidArgument));
        assert_eq!(
            invalid,
            (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument)
        );
    }
}
