//! KServe v2 / Open Inference Protocol gRPC types and service stubs,
//! wire-compatible with Triton's `inference.GRPCInferenceService`.

#![allow(clippy::all, missing_docs)]

/// Generated from `proto/grpc_service.proto` and `proto/model_config.proto`.
pub mod inference {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

pub use inference::*;

/// The encoded `FileDescriptorSet` of both protos (`inference.ModelConfig`
/// among them), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));
