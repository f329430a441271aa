//! Property tests (proptest, stable Rust) for every parser that takes bytes
//! from a client: the REST JSON request and the binary tensor extension,
//! the gRPC ModelInfer request (raw and typed contents) and what the engine
//! then validates, BYTES tensor decoding, config.toml and config.pbtxt, and
//! shared-memory registration. Each property is "an error or a value,
//! never a panic" (and, for the engine, an answer for every request).
//!
//! The inputs are mostly well-formed with one thing wrong, so the cases
//! reach past the first check; raw bytes cover the rest. Failing cases are
//! shrunk and saved under `server/tests/fuzz_decoders.proptest-regressions`
//! (committed: the corpus of what once failed). CI runs the default case
//! counts below; a long run:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release -p shoal --test fuzz_decoders
//! ```

use axum::http::HeaderMap;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};
use shoal::api::grpc::{decode_request, CallMeta};
use shoal::api::http::decode_rest_request;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::{Backend, Signature};
use shoal::engine::{Engine, ModelConfigFile};
use shoal::shm::SharedMemory;
use shoal::tensor::split_bytes_elements;
use shoal_proto as pb;
use std::sync::Arc;

const DATATYPES: [&str; 15] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "BF16", "FP32", "FP64", "BYTES", "F32",
];

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::sample::select(&DATATYPES[..]).prop_map(String::from),
        1 => "[A-Z0-9]{0,6}",
    ]
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![6 => 0i64..6, 1 => -3i64..0, 1 => any::<i64>(), 1 => Just(i64::MAX)]
}

fn shape() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(dim(), 0..5)
}

/// JSON values whose keys come from the request schema, so nesting lands
/// where the decoder looks.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|v| json!(v)),
        any::<f64>().prop_map(|v| json!(v)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    proptest::sample::select(vec![
                        "inputs",
                        "outputs",
                        "name",
                        "shape",
                        "datatype",
                        "data",
                        "parameters",
                        "binary_data_size",
                        "binary_data",
                        "shared_memory_region",
                        "shared_memory_byte_size",
                        "timeout",
                        "priority",
                        "sequence_id",
                        "id",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
}

/// A REST request with one input: mostly right, any part possibly wrong.
fn rest_request() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just("x".to_string()), ".{0,4}"],
        datatype(),
        shape(),
        prop_oneof![
            prop::collection::vec(any::<f32>(), 0..40).prop_map(|v| json!(v)),
            json_value()
        ],
        prop::option::of(json_value()),
    )
        .prop_map(|(name, dt, shape, data, params)| {
            let mut input = json!({"name": name, "datatype": dt, "shape": shape, "data": data});
            if let Some(p) = params {
                input["parameters"] = p;
            }
            json!({"inputs": [input]})
        })
}

/// `PROPTEST_CASES` when set (the long run), else the CI default.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn shm() -> SharedMemory {
    SharedMemory::with_dir(std::env::temp_dir())
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn rest_json_bodies_never_panic(body in prop_oneof![
        rest_request().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..256),
    ]) {
        let _ = decode_rest_request("m", &HeaderMap::new(), Bytes::from(body), &shm());
    }

    #[test]
    fn rest_binary_extension_never_panics(
        header in rest_request(),
        size in prop_oneof![0u64..64, any::<u64>()],
        tail in prop::collection::vec(any::<u8>(), 0..128),
        length_delta in -4i64..4,
    ) {
        let mut h = header;
        h["inputs"][0]["parameters"] = json!({"binary_data_size": size});
        if let Some(i) = h["inputs"][0].as_object_mut() {
            i.remove("data");
        }
        let head = serde_json::to_vec(&h).unwrap();
        let n = (head.len() as i64 + length_delta).max(0);
        let mut body = head;
        body.extend(tail);
        let mut headers = HeaderMap::new();
        headers.insert("inference-header-content-length", n.to_string().parse().unwrap());
        let _ = decode_rest_request("m", &headers, Bytes::from(body), &shm());
    }

    #[test]
    fn bytes_tensors_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = split_bytes_elements(&Bytes::from(data));
    }

    #[test]
    fn shared_memory_registration_never_panics(
        key in prop_oneof![".{0,40}", Just("/../etc/passwd".to_string()), Just("/a\0b".to_string())],
        offset in any::<u64>(),
        size in any::<u64>(),
    ) {
        let _ = shm().register("r", &key, offset, size);
    }
}

/// A request the mock model accepts: FP32 `x` of `[rows, 4]` with exactly
/// the bytes it needs, and the parameters given.
fn good_grpc_request() -> impl Strategy<Value = pb::ModelInferRequest> {
    (1usize..4, prop::collection::vec(any::<f32>(), 12)).prop_map(|(rows, values)| {
        pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![rows as i64, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::copy_from_slice(bytemuck::cast_slice(
                &values[..rows * 4],
            ))],
            ..Default::default()
        }
    })
}

fn grpc_request() -> impl Strategy<Value = pb::ModelInferRequest> {
    prop_oneof![1 => good_grpc_request(), 3 => any_grpc_request()]
}

fn any_grpc_request() -> impl Strategy<Value = pb::ModelInferRequest> {
    (
        prop_oneof![Just("x".to_string()), ".{0,4}"],
        datatype(),
        shape(),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..3),
        prop::option::of(prop::collection::vec(any::<f32>(), 0..32)),
        prop::option::of(prop::collection::vec(any::<i32>(), 0..32)),
        prop::collection::vec(
            (
                proptest::sample::select(vec![
                    "timeout",
                    "priority",
                    "sequence_id",
                    "sequence_start",
                    "correlation_key",
                    "shared_memory_region",
                ]),
                prop_oneof![
                    any::<i64>().prop_map(pb::infer_parameter::ParameterChoice::Int64Param),
                    any::<u64>().prop_map(pb::infer_parameter::ParameterChoice::Uint64Param),
                    any::<bool>().prop_map(pb::infer_parameter::ParameterChoice::BoolParam),
                    ".{0,8}".prop_map(pb::infer_parameter::ParameterChoice::StringParam),
                ],
            ),
            0..3,
        ),
    )
        .prop_map(|(name, datatype, shape, raw, fp32, int, params)| {
            let contents = (fp32.is_some() || int.is_some()).then(|| pb::InferTensorContents {
                fp32_contents: fp32.unwrap_or_default(),
                int_contents: int.unwrap_or_default(),
                ..Default::default()
            });
            pb::ModelInferRequest {
                model_name: "m".into(),
                inputs: vec![pb::model_infer_request::InferInputTensor {
                    name,
                    datatype,
                    shape,
                    contents,
                    ..Default::default()
                }],
                raw_input_contents: raw.into_iter().map(Bytes::from).collect(),
                parameters: params
                    .into_iter()
                    .map(|(k, c)| {
                        (
                            k.to_string(),
                            pb::InferParameter {
                                parameter_choice: Some(c),
                            },
                        )
                    })
                    .collect(),
                ..Default::default()
            }
        })
}

/// An engine with one model, `m`: the mock backend (`y = 2x + 1`) on FP32
/// `x` of `[-1, 4]`, batching on.
fn engine() -> Engine {
    let log = Arc::new(MockLog::default());
    MockBackend::new(4, std::time::Duration::ZERO, log)
        .serve("m", "max_batch_size = 8\n")
        .unwrap()
}

#[test]
fn grpc_requests_through_the_engine_never_panic() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let engine = rt.block_on(async { engine() });
    let shm = shm();
    let mut config = cases(1000);
    // The macro finds its file by itself; a hand-made runner is told.
    config.failure_persistence = Some(Box::new(
        proptest::test_runner::FileFailurePersistence::Direct(
            "tests/fuzz_decoders_grpc.proptest-regressions",
        ),
    ));
    let n = config.cases;
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let decoded = std::cell::Cell::new(0u64);
    let answered = std::cell::Cell::new(0u64);
    runner
        .run(&grpc_request(), |req| {
            let meta = CallMeta {
                deadline: None,
                correlation_key: None,
            };
            if let Ok((request, _)) = decode_request(req, meta, &shm) {
                decoded.set(decoded.get() + 1);
                // Whatever decodes, the engine answers: a value or an error.
                let r = rt.block_on(engine.infer(request));
                answered.set(answered.get() + r.is_ok() as u64);
            }
            Ok(())
        })
        .unwrap();
    let (decoded, answered) = (decoded.get(), answered.get());
    eprintln!("{n} gRPC cases: {decoded} decoded, {answered} answered with outputs");
    assert!(
        decoded > 0 && answered > 0,
        "the cases never reached the engine"
    );
    engine.shutdown();
}

/// The model's graph for the config properties: FP32 `x` [-1, 4] → `y`.
fn graph() -> Signature {
    // The mock model's own signature: FP32 `x` and `y` of [-1, 4].
    MockBackend::new(4, std::time::Duration::ZERO, Arc::new(MockLog::default()))
        .signature()
        .clone()
}

/// config.toml lines, right and wrong, in any order.
fn toml_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        (0u32..100).prop_map(|n| format!("max_batch_size = {n}\n")),
        any::<i64>().prop_map(|n| format!("instance_count = {n}\n")),
        Just("[dynamic_batching]\n".to_string()),
        (0u32..5).prop_map(|n| format!("priority_levels = {n}\n")),
        (0u32..5).prop_map(|n| format!("default_priority_level = {n}\n")),
        any::<u64>().prop_map(|n| format!("default_timeout_us = {n}\n")),
        Just("[dynamic_batching.priority_queue_policy.1]\nmax_queue_size = 0\n".to_string()),
        Just("[[input]]\nname = \"x\"\ndatatype = \"FP32\"\ndims = [4]\n".to_string()),
        shape().prop_map(|d| format!("[[output]]\nname = \"y\"\ndatatype = \"FP32\"\ndims = {d:?}\nreshape = [4]\n")),
        Just("[[warmup]]\nname = \"w\"\ninputs = [{ name = \"x\", datatype = \"FP32\", dims = [4], data = \"random\" }]\n".to_string()),
        Just("sequence = true\n".to_string()),
        Just("[[sequence_control]]\ninput = \"x\"\nkind = \"corrid\"\ndatatype = \"UINT64\"\n".to_string()),
        ".{0,20}\n",
    ];
    prop::collection::vec(line, 0..8).prop_map(|v| v.concat())
}

/// config.pbtxt fragments, right and wrong, in any order.
fn pbtxt_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        (0i32..100).prop_map(|n| format!("max_batch_size: {n}\n")),
        Just("input [ { name: \"x\" data_type: TYPE_FP32 dims: [ 4 ] } ]\n".to_string()),
        shape().prop_map(|d| format!("output {{ name: \"y\" data_type: TYPE_FP32 dims: {d:?} }}\n")),
        Just("dynamic_batching { priority_levels: 2 default_priority_level: 1 }\n".to_string()),
        Just("sequence_batching { control_input [ { name: \"x\" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [0, 1] } ] } ] }\n".to_string()),
        Just("model_warmup [ { name: \"w\" batch_size: 1 inputs { key: \"x\" value { data_type: TYPE_FP32 dims: [4] zero_data: true } } } ]\n".to_string()),
        Just("instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0, 1 ] } ]\n".to_string()),
        Just("version_policy: { specific: { versions: [ -1 ] } }\n".to_string()),
        Just("input [ { name: \"x\" \n".to_string()),
        "[ -~]{0,20}\n",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn config_toml_never_panics(text in toml_text()) {
        if let Ok(f) = ModelConfigFile::parse("m", &text) {
            let _ = f.resolve("m", &graph());
        }
    }

    #[test]
    fn config_pbtxt_never_panics(text in pbtxt_text()) {
        if let Ok(p) = shoal::engine::pbtxt::parse("m", "m/config.pbtxt", &text) {
            let _ = p.config.resolve("m", &graph());
        }
    }
}
