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

/// kind → (HTTP status, gRPC code). Every error of every protocol goes
/// through this table.
pub fn codes(kind: ApiErrorKind) -> (StatusCode, tonic::Code) {
    use ApiErrorKind::*;
    use ErrorKind::*;
    match kind {
        Engine(InvalidArgument) => (StatusCode::BAD_REQUEST, tonic::Code::InvalidArgument),
        Engine(NotFound) => (StatusCode::NOT_FOUND, tonic::Code::NotFound),
        Engine(Overloaded) => (
            StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::ResourceExhausted,
        ),
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
        tonic::Status::new(codes(e.kind).1, e.message)
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
            (
                StatusCode::TOO_MANY_REQUESTS,
                tonic::Code::ResourceExhausted
            )
        );
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
