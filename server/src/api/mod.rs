//! Protocol front ends: KServe v2 over gRPC (tonic) and REST (axum), the
//! admin endpoints, and the one table that maps error kinds to both.

pub mod access;
pub mod admin;
pub mod auth;
pub mod error;
pub mod grpc;
pub mod http;
pub mod json;
pub mod metadata;
pub mod repository;
pub mod rest_app;
pub mod shm;
pub mod triton_metrics;

/// Protocol extensions this server implements, as listed in server metadata.
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "statistics",
    "system_shared_memory",
];
