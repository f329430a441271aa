//! The engine's error enum. The API layer maps [`ErrorKind`] to HTTP status
//! and gRPC code in one table (`api::error`).

/// Coarse error classes shared by every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    Overloaded,
    DeadlineExceeded,
    Unavailable,
    Cancelled,
    Internal,
}

impl ErrorKind {
    /// Label used in metrics (`reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("model {0} is overloaded: its queue is full")]
    Overloaded(String),
    /// Rejected by the adaptive batcher: it could no longer meet the
    /// model's latency objective.
    #[error("{0}")]
    Shed(String),
    /// Still queued when its queue policy's timeout expired (Triton's
    /// REJECT); retryable, as Triton's UNAVAILABLE.
    #[error("{0}")]
    QueueTimeout(String),
    #[error("deadline exceeded before the request could run")]
    DeadlineExceeded,
    #[error("{0}")]
    Unavailable(String),
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::Overloaded(_) | EngineError::Shed(_) | EngineError::QueueTimeout(_) => {
                ErrorKind::Overloaded
            }
            EngineError::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            EngineError::Unavailable(_) => ErrorKind::Unavailable,
            EngineError::Cancelled => ErrorKind::Cancelled,
            EngineError::Internal(_) => ErrorKind::Internal,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        EngineError::InvalidArgument(msg.into())
    }
}
