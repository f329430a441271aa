//! Requests and responses as the engine sees them, free of any protocol.

use crate::tensor::Tensor;
use std::time::Instant;

/// One inference request.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model: String,
    /// `None` or empty: the latest version.
    pub version: Option<String>,
    /// Echoed in the response.
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Names of the outputs wanted; empty: all of them.
    pub outputs: Vec<String>,
    /// The request fails with DeadlineExceeded rather than run after this.
    pub deadline: Option<Instant>,
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
}
