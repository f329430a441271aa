//! Bad input over REST JSON, REST binary and gRPC: each gets a clear 4xx /
//! INVALID_ARGUMENT or NOT_FOUND, and the server answers a good request
//! right after.

mod common;

use common::{ffnn_input, Server};
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use tonic::Code;

fn light_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::model_repository();
    for m in ["ffnn", "types"] {
        std::os::unix::fs::symlink(repo.join(m), dir.path().join(m)).unwrap();
    }
    dir
}

struct Rest {
    c: reqwest::Client,
    base: String,
}

impl Rest {
    async fn post(&self, path: &str, header_len: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut r = self.c.post(format!("{}{path}", self.base)).body(body);
        if let Some(h) = header_len {
            r = r.header("Inference-Header-Content-Length", h);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn good(&self) {
        let body = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": ffnn_input(1, 3)}]});
        let (status, v) = self
            .post(
                "/v2/models/ffnn/infer",
                None,
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        assert_eq!(status, 200, "good request after a bad one failed: {v}");
    }
}

/// (name, path, header length, body, status, words the message must hold)
type Case<'a> = (&'a str, &'a str, Option<String>, Vec<u8>, u16, &'a str);

fn ffnn_json(shape: Value, datatype: &str, data: Value) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}),
    )
    .unwrap()
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let repo = light_repo();
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--max-body-bytes",
            "1048576",
            "--grpc-max-message-bytes",
            "1048576",
        ],
    );
    let rest = Rest {
        c: reqwest::Client::new(),
        base: s.http.clone(),
    };
    let ones = |n: usize| json!(vec![0.5f32; n]);
    let infer = "/v2/models/ffnn/infer";
    let bin_header = |size: usize| {
        serde_json::to_vec(
            &json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32",
            "parameters": {"binary_data_size": size}}]}),
        )
        .unwrap()
    };
    let with_tail = |mut head: Vec<u8>, tail: usize| {
        let n = head.len();
        head.extend(std::iter::repeat_n(0u8, tail));
        (head, n.to_string())
    };

    let mut cases: Vec<Case> = vec![
        (
            "invalid JSON",
            infer,
            None,
            b"{".to_vec(),
            400,
            "invalid JSON",
        ),
        (
            "unknown model",
            "/v2/models/nope/infer",
            None,
            ffnn_json(json!([1, 784]), "FP32", ones(784)),
            404,
            "unknown model",
        ),
        (
            "unknown version",
            "/v2/models/ffnn/versions/9/infer",
            None,
            ffnn_json(json!([1, 784]), "FP32", ones(784)),
            404,
            "unknown version",
        ),
        (
            "wrong datatype",
            infer,
            None,
            ffnn_json(json!([1, 784]), "INT32", json!(vec![1; 784])),
            400,
            "datatype INT32",
        ),
        (
            "wrong shape",
            infer,
            None,
            ffnn_json(json!([1, 783]), "FP32", ones(783)),
            400,
            "does not match",
        ),
        (
            "data size vs shape",
            infer,
            None,
            ffnn_json(json!([1, 784]), "FP32", ones(780)),
            400,
            "needs 3136",
        ),
        (
            "missing input",
            infer,
            None,
            serde_json::to_vec(&json!({"inputs": []})).unwrap(),
            400,
            "missing input",
        ),
        (
            "extra input",
            infer,
            None,
            serde_json::to_vec(&json!({"inputs": [
            {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": ones(784)},
            {"name": "bogus", "shape": [1], "datatype": "FP32", "data": [1.0]}]}))
            .unwrap(),
            400,
            "unexpected input \"bogus\"",
        ),
        (
            "negative dim",
            infer,
            None,
            ffnn_json(json!([-1, 784]), "FP32", ones(784)),
            400,
            "negative",
        ),
        (
            "overflowing dims",
            infer,
            None,
            ffnn_json(
                json!([1, 9223372036854775807i64, 9223372036854775807i64]),
                "FP32",
                ones(1),
            ),
            400,
            "does not match",
        ),
        (
            "overflowing element count",
            "/v2/models/types/infer",
            None,
            serde_json::to_vec(&json!({"inputs": [
            {"name": "in_fp32", "shape": [1, 4], "datatype": "FP32", "data": ones(4)}]}))
            .unwrap(),
            400,
            "missing input",
        ),
        (
            "empty batch",
            infer,
            None,
            ffnn_json(json!([0, 784]), "FP32", json!([])),
            400,
            "empty batch",
        ),
        (
            "batch above max_batch_size",
            infer,
            None,
            ffnn_json(json!([65, 784]), "FP32", ones(65 * 784)),
            400,
            "exceeds max_batch_size",
        ),
        (
            "unknown datatype",
            infer,
            None,
            ffnn_json(json!([1, 784]), "FLOAT32", ones(784)),
            400,
            "unknown datatype",
        ),
        (
            "string in FP32 data",
            infer,
            None,
            ffnn_json(json!([1, 1]), "FP32", json!(["a"])),
            400,
            "not a valid FP32",
        ),
        (
            "unknown output",
            infer,
            None,
            serde_json::to_vec(&json!({
            "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": ones(784)}],
            "outputs": [{"name": "nope"}]}))
            .unwrap(),
            400,
            "unexpected output",
        ),
        (
            "no inputs field",
            infer,
            None,
            b"{}".to_vec(),
            400,
            "missing field `inputs`",
        ),
        (
            "input without data",
            infer,
            None,
            serde_json::to_vec(&json!({"inputs": [
            {"name": "input", "shape": [1, 784], "datatype": "FP32"}]}))
            .unwrap(),
            400,
            "carries no data",
        ),
        (
            "shape is not a list",
            infer,
            None,
            serde_json::to_vec(&json!({"inputs": [
            {"name": "input", "shape": "1,784", "datatype": "FP32", "data": [1]}]}))
            .unwrap(),
            400,
            "invalid JSON",
        ),
        (
            "negative timeout",
            infer,
            None,
            serde_json::to_vec(&json!({"parameters": {"timeout": -5}, "inputs": [
            {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": ones(784)}]}))
            .unwrap(),
            400,
            "timeout",
        ),
        (
            "oversize body",
            infer,
            None,
            vec![b' '; 2 << 20],
            413,
            "exceeds the limit",
        ),
    ];
    // Binary extension.
    let (b, h) = with_tail(bin_header(3136), 3000);
    cases.push((
        "truncated binary body",
        infer,
        Some(h),
        b,
        400,
        "runs past the end",
    ));
    let (b, h) = with_tail(bin_header(3136), 3136 + 8);
    cases.push((
        "unclaimed binary bytes",
        infer,
        Some(h),
        b,
        400,
        "not claimed",
    ));
    let (b, _) = with_tail(bin_header(3136), 3136);
    let len = b.len();
    cases.push((
        "header length beyond the body",
        infer,
        Some((len + 1).to_string()),
        b.clone(),
        400,
        "exceeds the body",
    ));
    cases.push((
        "header length not a number",
        infer,
        Some("abc".into()),
        b,
        400,
        "not a number",
    ));
    let (b, h) = with_tail(bin_header(3000), 3000);
    cases.push(("binary size vs shape", infer, Some(h), b, 400, "needs 3136"));
    // A BYTES element whose length prefix runs past its data.
    let head = serde_json::to_vec(&json!({"inputs": types_inputs_with_bytes(8)})).unwrap();
    let n = head.len();
    let mut b = head;
    b.extend_from_slice(&types_binary_tail(true));
    cases.push((
        "malformed BYTES",
        "/v2/models/types/infer",
        Some(n.to_string()),
        b,
        400,
        "malformed BYTES",
    ));

    assert!(cases.len() >= 20);
    for (name, path, hl, body, status, words) in cases {
        let (got, v) = rest.post(path, hl.as_deref(), body).await;
        assert_eq!(got, status, "{name}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no error message in {v}"));
        assert!(msg.contains(words), "{name}: {msg:?} lacks {words:?}");
        rest.good().await;
    }

    // gRPC.
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let input = ffnn_input(1, 5);
    let raw = || bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&input));
    let tensor = |dt: &str, shape: Vec<i64>| pb::model_infer_request::InferInputTensor {
        name: "input".into(),
        datatype: dt.into(),
        shape,
        ..Default::default()
    };
    let good = pb::ModelInferRequest {
        model_name: "ffnn".into(),
        inputs: vec![tensor("FP32", vec![1, 784])],
        raw_input_contents: vec![raw()],
        ..Default::default()
    };
    let mut grpc_cases: Vec<(&str, pb::ModelInferRequest, Code, &str)> = Vec::new();
    let mut r = good.clone();
    r.model_name = "nope".into();
    grpc_cases.push(("unknown model", r, Code::NotFound, "unknown model"));
    let mut r = good.clone();
    r.model_version = "x".into();
    grpc_cases.push(("unknown version", r, Code::NotFound, "unknown version"));
    let mut r = good.clone();
    r.inputs[0].datatype = "FP64".into();
    grpc_cases.push(("wrong datatype", r, Code::InvalidArgument, "datatype FP64"));
    let mut r = good.clone();
    r.raw_input_contents.push(raw());
    grpc_cases.push((
        "raw count mismatch",
        r,
        Code::InvalidArgument,
        "raw_input_contents has 2",
    ));
    let mut r = good.clone();
    r.raw_input_contents[0] = r.raw_input_contents[0].slice(..100);
    grpc_cases.push(("raw size mismatch", r, Code::InvalidArgument, "100 bytes"));
    let mut r = good.clone();
    r.inputs[0].contents = Some(pb::InferTensorContents {
        fp32_contents: input.clone(),
        ..Default::default()
    });
    grpc_cases.push(("contents and raw", r, Code::InvalidArgument, "both given"));
    let mut r = good.clone();
    r.raw_input_contents.clear();
    grpc_cases.push(("no data", r, Code::InvalidArgument, "carries no data"));
    let mut r = good.clone();
    r.raw_input_contents.clear();
    r.inputs[0].datatype = "FP16".into();
    r.inputs[0].contents = Some(pb::InferTensorContents {
        fp32_contents: input.clone(),
        ..Default::default()
    });
    grpc_cases.push((
        "FP16 typed contents",
        r,
        Code::InvalidArgument,
        "raw_input_contents",
    ));
    let mut r = good.clone();
    r.inputs[0].datatype = "F32".into();
    grpc_cases.push((
        "unknown datatype",
        r,
        Code::InvalidArgument,
        "unknown datatype",
    ));
    let mut r = good.clone();
    r.inputs[0].shape = vec![1, 28, 28];
    grpc_cases.push(("wrong rank", r, Code::InvalidArgument, "does not match"));
    let mut r = good.clone();
    r.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(true)),
        },
    );
    grpc_cases.push(("non-integer timeout", r, Code::InvalidArgument, "timeout"));
    let mut r = good.clone();
    r.outputs
        .push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "output".into(),
            ..Default::default()
        });
    r.outputs
        .push(pb::model_infer_request::InferRequestedOutputTensor {
            name: "output".into(),
            ..Default::default()
        });
    grpc_cases.push(("output requested twice", r, Code::InvalidArgument, "twice"));
    for (name, req, code, words) in grpc_cases {
        let e = client.model_infer(req).await.expect_err(name);
        assert_eq!(e.code(), code, "{name}: {e:?}");
        assert!(
            e.message().contains(words),
            "{name}: {:?} lacks {words:?}",
            e.message()
        );
        client
            .model_infer(good.clone())
            .await
            .unwrap_or_else(|e| panic!("good request after {name}: {e:?}"));
    }
    // Over the message limit: refused by the transport, server unharmed.
    let mut big = good.clone();
    big.raw_input_contents[0] = bytes::Bytes::from(vec![0u8; 2 << 20]);
    let e = client.model_infer(big).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{e:?}"
    );
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    client.model_infer(good).await.unwrap();
    rest.good().await;
    assert_eq!(s.stop(), Some(0));
}

/// Inputs of the `types` model, every one binary, 1 row of 4 elements.
fn types_inputs_with_bytes(bytes_size: usize) -> Value {
    let mut v = Vec::new();
    for (t, dt, size) in TYPES {
        let size = if *dt == "BYTES" { bytes_size } else { size * 4 };
        v.push(
            json!({"name": format!("in_{t}"), "shape": [1, 4], "datatype": dt,
            "parameters": {"binary_data_size": size}}),
        );
    }
    json!(v)
}

const TYPES: &[(&str, &str, usize)] = &[
    ("bool", "BOOL", 1),
    ("uint8", "UINT8", 1),
    ("uint16", "UINT16", 2),
    ("uint32", "UINT32", 4),
    ("uint64", "UINT64", 8),
    ("int8", "INT8", 1),
    ("int16", "INT16", 2),
    ("int32", "INT32", 4),
    ("int64", "INT64", 8),
    ("fp16", "FP16", 2),
    ("fp32", "FP32", 4),
    ("fp64", "FP64", 8),
    ("bytes", "BYTES", 0),
];

fn types_binary_tail(malformed: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (_, dt, size) in TYPES {
        if *dt == "BYTES" {
            // Two 4-byte headers; the second claims 100 bytes that are not there.
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(if malformed { 100u32 } else { 0 }).to_le_bytes());
        } else {
            out.extend(std::iter::repeat_n(0u8, size * 4));
        }
    }
    out
}

/// Timeouts too large for the clock: a `grpc-timeout` of more digits than
/// the spec's eight, and `timeout` parameters near u64::MAX, are answered
/// (as no deadline, or as a clear error), never a panicked handler.
#[tokio::test]
async fn huge_timeouts_do_not_panic_the_handler() {
    let repo = light_repo();
    let s = Server::start_with_repo(repo.path(), &[]);
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let input = ffnn_input(1, 5);
    let good = common::ffnn_grpc_request(&input);
    for header in ["99999999999999999H", "9999999999H", "18446744073709551615S"] {
        let mut req = tonic::Request::new(good.clone());
        req.metadata_mut()
            .insert("grpc-timeout", header.parse().unwrap());
        let r = client.model_infer(req).await;
        assert!(
            r.is_ok() || r.as_ref().unwrap_err().code() == Code::InvalidArgument,
            "grpc-timeout {header}: {r:?}"
        );
    }
    let mut huge = good.clone();
    huge.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Uint64Param(
                u64::MAX / 2,
            )),
        },
    );
    client.model_infer(huge).await.unwrap();
    let c = reqwest::Client::new();
    let body = json!({"parameters": {"timeout": u64::MAX}, "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": input}]});
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    // The server is whole: a plain request still works on a new connection.
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    client.model_infer(good).await.unwrap();
    assert_eq!(s.stop(), Some(0));
}

/// Sends raw bytes on a new connection and returns the status line's code
/// (0 when the server closed without answering).
async fn raw_http(base: &str, request: &[u8], half_close: bool) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    // The status line is enough; the connection may stay open after it.
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(2).any(|w| w == b"\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Hostile bodies and paths (issue 16, property 5): each gets a clear 4xx,
/// nothing outside the repository or /dev/shm is touched, and the server
/// answers a good request after each.
#[tokio::test]
async fn hostile_bodies_and_paths_get_clear_4xx() {
    let repo = light_repo();
    // Explicit mode, so the repository API acts on names (in mode none it
    // refuses every load, whatever the name).
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--max-body-bytes",
            "1048576",
            "--model-control-mode",
            "explicit",
            "--load-model",
            "ffnn,types",
        ],
    );
    let rest = Rest {
        c: reqwest::Client::new(),
        base: s.http.clone(),
    };
    let infer = "/v2/models/ffnn/infer";
    let host = s.http.trim_start_matches("http://").to_string();

    // A Content-Length far above the body, the client then done sending.
    let lie = format!(
        "POST {infer} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{\"inputs\": ["
    );
    let code = raw_http(&s.http, lie.as_bytes(), true).await;
    assert_eq!(code, 400, "content-length lie");
    rest.good().await;
    // A Content-Length above --max-body-bytes: refused before it is read.
    let big =
        format!("POST {infer} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5000000000\r\n\r\n");
    assert_eq!(raw_http(&s.http, big.as_bytes(), true).await, 413);
    // Chunked past --max-body-bytes.
    let mut chunked =
        format!("POST {infer} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 100_000).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 100_000));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_http(&s.http, &chunked, false).await, 413);
    rest.good().await;

    let nested = format!(
        "{{\"inputs\": [{{\"name\": \"input\", \"shape\": [1, 784], \"datatype\": \"FP32\", \"data\": {}{}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let digits = format!(
        "{{\"inputs\": [{{\"name\": \"input\", \"shape\": [1, 1], \"datatype\": \"FP32\", \"data\": [1{}]}}]}}",
        "0".repeat(1_000_000 - 100)
    );
    let overflow_shape = serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [4611686018427387904i64, 4611686018427387904i64, 16], "datatype": "FP32", "data": [1.0]}]})).unwrap();
    let negative_shape = serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [-1, 784], "datatype": "FP32", "data": [1.0]}]})).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("JSON nested 100k deep", nested.into_bytes()),
        ("a number of a million digits", digits.into_bytes()),
        ("a shape whose element count overflows", overflow_shape),
        ("a negative dim", negative_shape),
    ];
    for (name, body) in cases {
        let (status, v) = rest.post(infer, None, body).await;
        assert!((400..500).contains(&status), "{name}: {status} {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{name}: {v}"
        );
        rest.good().await;
    }
    // BYTES length prefixes that overflow, in the binary extension.
    let header = serde_json::to_vec(&json!({"inputs": [{"name": "bytes_in", "shape": [1, 4], "datatype": "BYTES", "parameters": {"binary_data_size": 8}}]})).unwrap();
    let n = header.len();
    let mut body = header;
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    body.extend_from_slice(b"abcd");
    let (status, v) = rest
        .post("/v2/models/types/infer", Some(&n.to_string()), body)
        .await;
    assert!((400..500).contains(&status), "BYTES prefix: {status} {v}");

    // Model names that try to leave the repository, or are merely hostile.
    let long = "m".repeat(10_000);
    for name in [
        "..",
        "..%2F..%2Fetc",
        "%2e%2e",
        "a%00b",
        "%2Fetc%2Fpasswd",
        long.as_str(),
    ] {
        for path in [
            format!("/v2/models/{name}/infer"),
            format!("/v2/models/{name}"),
            format!("/v2/models/{name}/config"),
            format!("/v2/repository/models/{name}/load"),
        ] {
            let r = rest
                .c
                .post(format!("{}{path}", s.http))
                .body("{}")
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            // GET-only routes answer 405 to a POST: still a clear 4xx.
            assert!((400..500).contains(&status), "{path}: {status}");
            let r = rest
                .c
                .get(format!("{}{path}", s.http))
                .send()
                .await
                .unwrap();
            assert!(
                (400..500).contains(&r.status().as_u16()),
                "GET {path}: {}",
                r.status()
            );
        }
    }
    // Shared-memory keys that try to leave /dev/shm.
    for key in [
        "/../etc/passwd",
        "..",
        "/a/b",
        "/a\u{0}b",
        &format!("/{}", "k".repeat(10_000)),
    ] {
        let r = rest
            .c
            .post(format!(
                "{}/v2/systemsharedmemory/region/r/register",
                s.http
            ))
            .json(&json!({"key": key, "offset": 0, "byte_size": 8}))
            .send()
            .await
            .unwrap();
        assert!(
            (400..500).contains(&r.status().as_u16()),
            "key {key:?}: {}",
            r.status()
        );
    }
    rest.good().await;
    assert_eq!(s.stop(), Some(0));
}

/// Slowloris (issue 16, property 4): clients that send a request's headers
/// a byte at a time, or start and stop, are cut off after
/// `--http-header-timeout-ms`, and a good request is answered meanwhile.
#[tokio::test]
async fn slow_headers_are_cut_off_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let repo = light_repo();
    let s = Server::start_with_repo(repo.path(), &["--http-header-timeout-ms", "500"]);
    let rest = Rest {
        c: reqwest::Client::new(),
        base: s.http.clone(),
    };
    let addr = s.http.trim_start_matches("http://").to_string();
    let start = "POST /v2/models/ffnn/infer HTTP/1.1\r\nHost: x\r\n";
    let mut stalled = Vec::new();
    for _ in 0..50 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(start.as_bytes()).await.unwrap();
        stalled.push(c);
    }
    // One more trickles a header byte every 100 ms, forever.
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickle.write_all(start.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let trickler = tokio::spawn(async move {
        loop {
            if trickle.write_all(b"X").await.is_err() {
                return t0.elapsed();
            }
            let mut b = [0u8; 64];
            match tokio::time::timeout(std::time::Duration::from_millis(100), trickle.read(&mut b))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
                _ => {}
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                return t0.elapsed();
            }
        }
    });
    // Served while they stall.
    let t = std::time::Instant::now();
    rest.good().await;
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
    let cut = trickler.await.unwrap();
    assert!(
        cut < std::time::Duration::from_secs(3),
        "a trickling client kept its connection for {cut:?}"
    );
    // The stalled ones were closed too: reading them ends.
    for mut c in stalled {
        let mut b = Vec::new();
        let r =
            tokio::time::timeout(std::time::Duration::from_secs(3), c.read_to_end(&mut b)).await;
        assert!(r.is_ok(), "a stalled connection is still open");
    }
    // On a new connection: hyper's header timer also runs while a
    // keep-alive connection waits for its next request, so the pooled one
    // may be closing just as it is reused.
    let fresh = Rest {
        c: reqwest::Client::new(),
        base: s.http.clone(),
    };
    fresh.good().await;
    assert_eq!(s.stop(), Some(0));
}
