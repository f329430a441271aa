//! Requests and responses as the engine sees them, free of any protocol.

use super::state::KeyState;
use crate::tensor::Tensor;
use std::time::{Duration, Instant};

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
    /// The request parameter `timeout`. For most models a deadline (the
    /// earlier of it and `deadline` applies); for a model whose queue
    /// policy sets timeouts, Triton's queue timeout, honored only where the
    /// policy allows an override.
    pub timeout: Option<Duration>,
    /// The request parameter `priority` (1 the highest; 0: the model's
    /// default level).
    pub priority: u64,
    /// The explicit correlation key (parameter `correlation_key`, header
    /// `x-correlation-key`, or Triton's `sequence_id`). A model's regex may
    /// refine it, or find the key in `id` when this is absent.
    pub correlation_key: Option<String>,
    /// Reset the key's state before this request (Triton's `sequence_start`).
    pub sequence_start: bool,
    /// Free the key's state after this request (Triton's `sequence_end`).
    pub sequence_end: bool,
    /// Return the key's state as this request leaves it, in
    /// [`InferResponse::state`] (Kafka-native serving snapshots it).
    pub return_state: bool,
    /// The call's trace span (`crate::telemetry::request_span`): the engine
    /// hangs its queue, assembly and compute spans under it. `None`: untraced.
    pub span: Option<tracing::Span>,
}

/// A response parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Str(String),
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model: String,
    pub version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
    /// E.g. `window_fill` while a skip-warmup window is not yet full.
    pub parameters: Vec<(String, Param)>,
    /// Where the request's time went, for logs and response headers.
    pub timing: Timing,
    /// The key's state after this request, when it asked for it (a stateful
    /// model's keyed request with `return_state`).
    pub state: Option<KeyState>,
}

/// Where one request's time went on its replica.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// From admission to its batch's start.
    pub queue: Duration,
    /// Its batch's backend run.
    pub compute: Duration,
    /// The batch it ran in (unique in the process) and the batch's rows.
    pub batch_id: u64,
    pub batch_rows: usize,
    /// The correlation key's hash, for logs that must not hold the key.
    pub key_hash: Option<u64>,
}
