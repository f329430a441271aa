//! shoal: a KServe v2 inference server with dynamic batching and worker
//! replicas. The [`engine`] is usable in-process without any network; the
//! [`api`] serves it over gRPC and REST.

pub mod alloc;
pub mod api;
pub mod backend;
pub mod config;
pub mod connections;
pub mod engine;
pub mod gpu;
pub mod healthcheck;
pub mod kafka;
pub mod launch;
pub mod listen;
pub mod server;
pub mod shm;
pub mod telemetry;
pub mod tensor;

pub use engine::{Engine, EngineError, InferRequest, InferResponse};
