//! Bearer tokens for the endpoints that change what the server serves or
//! touches: the model repository extension and shared-memory registration.

use super::error::ApiError;
use std::sync::Arc;

/// A required bearer token, or none (anyone who can reach the port may call).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<Arc<str>>);

impl Bearer {
    /// An empty token counts as none.
    pub fn new(token: Option<String>) -> Self {
        Self(token.filter(|t| !t.is_empty()).map(Arc::from))
    }

    /// Checks an `authorization` header (HTTP) or metadata value (gRPC);
    /// `what` names the API in the messages.
    pub fn check(&self, authorization: Option<&str>, what: &str) -> Result<(), ApiError> {
        let Some(token) = &self.0 else {
            return Ok(());
        };
        let Some(value) = authorization else {
            return Err(ApiError::unauthenticated(format!(
                "{what} needs a bearer token: send 'Authorization: Bearer <token>'"
            )));
        };
        let given = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    "the authorization is not a bearer token ('Bearer <token>')",
                )
            })?;
        if !same(given.as_bytes(), token.as_bytes()) {
            return Err(ApiError::permission_denied("wrong bearer token"));
        }
        Ok(())
    }
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `authorization` metadata of a gRPC call.
pub fn grpc_authorization<T>(req: &tonic::Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::error::ApiErrorKind;

    #[test]
    fn none_given_wrong_and_right() {
        assert!(Bearer::new(None).check(None, "x").is_ok());
        assert!(Bearer::new(Some(String::new())).check(None, "x").is_ok());
        let b = Bearer::new(Some("s3cret".into()));
        assert_eq!(
            b.check(None, "x").unwrap_err().kind,
            ApiErrorKind::Unauthenticated
        );
        assert_eq!(
            b.check(Some("Basic s3cret"), "x").unwrap_err().kind,
            ApiErrorKind::Unauthenticated
        );
        assert_eq!(
            b.check(Some("Bearer nope"), "x").unwrap_err().kind,
            ApiErrorKind::PermissionDenied
        );
        assert!(b.check(Some("bearer s3cret"), "x").is_ok());
    }
}
