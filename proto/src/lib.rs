//! KServe v2 / Open Inference Protocol gRPC types and service stubs,
//! wire-compatible with Triton's `inference.GRPCInferenceService`.

#![allow(clippy::all, missing_docs)]

/// Generated from `proto/grpc_service.proto` and `proto/model_config.proto`.
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

pub use inference::*;
