//! A gRPC ModelInfer message as it arrives on the wire (protobuf bytes,
//! raw or typed contents, parameters, shared-memory references): decoded
//! by prost, turned into the engine's request, served, and its
//! shared-memory outputs written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use shoal::api::grpc::{decode_request, CallMeta};
use shoal_proto as pb;

fuzz_target!(|data: &[u8]| {
    let Ok(mut message) = pb::ModelInferRequest::decode(data) else {
        return;
    };
    // Every case goes to the one model; the name is checked before
    // anything else, so fuzzing it would only waste cases.
    message.model_name = "m".into();
    message.model_version.clear();
    let h = shoal_fuzz::harness();
    let meta = CallMeta {
        deadline: None,
        correlation_key: None,
    };
    match decode_request(message, meta, &h.shm) {
        Ok((request, outputs)) => shoal_fuzz::serve(h, request, Some(&outputs)),
        Err(e) => shoal_fuzz::refused(&e),
    }
});
