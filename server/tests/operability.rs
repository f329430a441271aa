//! What operators rely on, through the real binary and real protocols: a
//! bare `model.onnx` served as it is, the `healthcheck` exec probe, JSON
//! logs and the access log, gzip/zstd on REST and gRPC (with the limits
//! after decompression), and OpenTelemetry traces received by an OTLP/gRPC
//! collector built here from the OTLP protos.

mod common;

use common::{assert_close, f32s, ffnn_infer_body, ffnn_input, reference_ffnn, Captured, Server};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span as OtlpSpan;
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A repository holding only the FFNN's version 1 (`ffnn`), for fast starts.
fn ffnn_repo() -> tempfile::TempDir {
    common::ffnn_repo_with_config("")
}

#[tokio::test]
async fn a_bare_model_file_is_served_as_a_model_named_after_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("digits");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::copy(
        common::model_repository().join("ffnn/1/model.onnx"),
        single.join("model.onnx"),
    )
    .unwrap();
    let s = Captured::start(&single, &[], &[]);
    let c = reqwest::Client::new();
    let md: Value = common::get_json(&c, format!("{}/v2/models/digits", s.http)).await;
    assert_eq!(md["versions"], json!(["1"]), "{md}");
    assert_eq!(md["inputs"][0]["shape"], json!([-1, 784]), "{md}");
    let input = ffnn_input(2, 3);
    let y = common::rest_ffnn(&c, &s.http, "digits", &input).await;
    assert_close(&y, &reference_ffnn(1, &input), 1e-5);
    let log = s.stop().join("\n");
    assert!(
        log.contains("bare model file") && log.contains("digits"),
        "the log says how the model was found:\n{log}"
    );
}

fn healthcheck(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("healthcheck")
        .args(args)
        .env_remove("SHOAL_HEALTHCHECK_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn healthcheck_subcommand_is_an_exec_probe() {
    let repo = ffnn_repo();
    let s = Server::start_with_repo(repo.path(), &[]);
    for path in ["/v2/health/live", "/v2/health/ready"] {
        let (code, err) = healthcheck(&["--url", &format!("{}{path}", s.metrics)]);
        assert_eq!(code, 0, "{path}: {err}");
    }
    let (code, err) = healthcheck(&["--url", &format!("{}/nope", s.metrics)]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let (code, err) = healthcheck(&["--url", "https://127.0.0.1:1/"]);
    assert_eq!(code, 1);
    assert!(err.contains("only http://"), "{err}");
    let metrics = s.metrics.clone();
    assert_eq!(s.stop(), Some(0));
    let (code, err) = healthcheck(&[
        "--url",
        &format!("{metrics}/v2/health/live"),
        "--timeout-ms",
        "500",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}

#[tokio::test]
async fn json_logs_and_the_access_log_cover_rest_and_grpc() {
    let repo = ffnn_repo();
    let s = Captured::start(repo.path(), &["--log-format", "json", "--access-log"], &[]);
    let c = reqwest::Client::new();
    let input = ffnn_input(1, 5);
    let body = serde_json::to_vec(&ffnn_infer_body(&input)).unwrap();
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .header("content-type", "application/json")
        .header("x-correlation-key", "user-4711")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rest_out = r.bytes().await.unwrap().len();
    let r = c
        .post(format!("{}/v2/models/nope/infer", s.http))
        .json(&ffnn_infer_body(&input))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    g.model_infer(common::ffnn_grpc_request(&input))
        .await
        .unwrap();
    let e = g
        .model_infer(pb::ModelInferRequest {
            model_name: "nope".into(),
            ..common::ffnn_grpc_request(&input)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    drop(g);

    let lines = s.stop();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["message"] == "model ready" && r["model"] == "ffnn"),
        "the engine's own events carry their fields: {lines:#?}"
    );
    let access: Vec<&Value> = records
        .iter()
        .filter(|r| r["target"] == "shoal_access")
        .collect();
    let find = |path: &str, model: &str| {
        access
            .iter()
            .find(|r| r["path"] == path && r["model"] == model)
            .unwrap_or_else(|| panic!("no access record for {path} {model}: {access:#?}"))
    };
    let rest = find("/v2/models/ffnn/infer", "ffnn");
    assert_eq!(rest["protocol"], "http");
    assert_eq!(rest["method"], "POST");
    assert_eq!(rest["status"], 200);
    assert_eq!(rest["version"], "1");
    assert_eq!(rest["bytes_in"], body.len());
    assert_eq!(rest["bytes_out"], rest_out);
    assert!(
        rest["queue_us"].is_u64() && rest["compute_us"].is_u64(),
        "{rest}"
    );
    assert!(rest["duration_us"].is_u64(), "{rest}");
    assert_eq!(rest["key_hash"].as_str().map(str::len), Some(16), "{rest}");
    assert!(
        !lines.iter().any(|l| l.contains("user-4711")),
        "the key itself is never logged by default"
    );
    let missing = find("/v2/models/nope/infer", "nope");
    assert_eq!(missing["status"], 404);
    assert!(missing.get("queue_us").is_none(), "{missing}");

    let rpc = "/inference.GRPCInferenceService/ModelInfer";
    let grpc = find(rpc, "ffnn");
    assert_eq!(grpc["protocol"], "grpc");
    assert_eq!(grpc["grpc_status"], 0);
    assert!(grpc["bytes_in"].as_u64().unwrap() > 784 * 4, "{grpc}");
    assert!(grpc["bytes_out"].as_u64().unwrap() > 10 * 4, "{grpc}");
    let failed = access
        .iter()
        .find(|r| r["path"] == rpc && r["grpc_status"] == 5)
        .unwrap_or_else(|| panic!("no NOT_FOUND record: {access:#?}"));
    assert_eq!(
        failed["status"], 200,
        "gRPC errors travel in a 200 response"
    );
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn rest_bodies_compress_both_ways_within_the_body_limit() {
    let repo = ffnn_repo();
    let s = Server::start_with_repo(repo.path(), &["--max-body-bytes", "1000000"]);
    let c = reqwest::Client::new();
    let url = format!("{}/v2/models/ffnn/infer", s.http);
    let input = ffnn_input(4, 9);
    let want = reference_ffnn(1, &input);
    let plain = serde_json::to_vec(&ffnn_infer_body(&input)).unwrap();

    for (encoding, body) in [
        ("gzip", gzip(&plain)),
        ("zstd", zstd::encode_all(&plain[..], 3).unwrap()),
    ] {
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .header("accept-encoding", encoding)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{encoding}");
        assert_eq!(
            r.headers().get("content-encoding").unwrap(),
            encoding,
            "the answer comes back {encoding}-compressed"
        );
        let raw = r.bytes().await.unwrap();
        let text = match encoding {
            "gzip" => gunzip(&raw),
            _ => zstd::decode_all(&raw[..]).unwrap(),
        };
        assert!(
            text.len() > raw.len(),
            "{encoding}: {} -> {}",
            text.len(),
            raw.len()
        );
        let v: Value = serde_json::from_slice(&text).unwrap();
        assert_close(&f32s(&v["outputs"][0]["data"]), &want, 1e-5);
    }

    // Without Accept-Encoding the answer is plain.
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(plain.clone())
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    // ... but still says it varies by Accept-Encoding, as the compression
    // layer says it (a request naming no encoding skips the codecs).
    assert_eq!(r.headers().get("vary").unwrap(), "accept-encoding");
    let v: Value = r.json().await.unwrap();
    assert_close(&f32s(&v["outputs"][0]["data"]), &want, 1e-5);

    // Either header alone is honoured: a plain body with a compressed
    // answer, a compressed body with a plain answer.
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("accept-encoding", "gzip")
        .body(plain.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("content-encoding").unwrap(), "gzip");
    let v: Value = serde_json::from_slice(&gunzip(&r.bytes().await.unwrap())).unwrap();
    assert_close(&f32s(&v["outputs"][0]["data"]), &want, 1e-5);
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "zstd")
        .body(zstd::encode_all(&plain[..], 3).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    let v: Value = r.json().await.unwrap();
    assert_close(&f32s(&v["outputs"][0]["data"]), &want, 1e-5);

    // A zip bomb: 20 kB on the wire, 20 MB inflated, against a 1 MB limit.
    let bomb = gzip(&vec![b' '; 20 << 20]);
    assert!(bomb.len() < 100_000);
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("--max-body-bytes"),
        "{e}"
    );

    // Corrupt and unknown encodings are the client's error.
    let r = c
        .post(&url)
        .header("content-encoding", "gzip")
        .body(b"not gzip at all".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(&url)
        .header("content-encoding", "br")
        .body(plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);

    // The server still serves.
    let r = c
        .post(&url)
        .json(&ffnn_infer_body(&input))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn grpc_messages_compress_both_ways_within_the_message_limit() {
    use tonic::codec::CompressionEncoding;
    let repo = ffnn_repo();
    let input = ffnn_input(3, 2);
    let want = reference_ffnn(1, &input);
    // By default answers go back uncompressed, even to a client that
    // accepts gzip (every gRPC C++ client says it does).
    let s = Server::start_with_repo(repo.path(), &[]);
    let r = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap()
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .model_infer(common::ffnn_grpc_request(&input))
        .await
        .unwrap();
    assert_eq!(r.metadata().get("grpc-encoding"), None);
    drop(s);
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--grpc-max-message-bytes",
            "1000000",
            "--grpc-response-compression",
            "any",
        ],
    );
    for enc in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
            .await
            .unwrap()
            .send_compressed(enc)
            .accept_compressed(enc);
        let r = g
            .model_infer(common::ffnn_grpc_request(&input))
            .await
            .unwrap();
        let name = match enc {
            CompressionEncoding::Gzip => "gzip",
            _ => "zstd",
        };
        assert_eq!(
            r.metadata()
                .get("grpc-encoding")
                .and_then(|v| v.to_str().ok()),
            Some(name),
            "the answer comes back {name}-compressed"
        );
        let r = r.into_inner();
        assert_close(
            &bytemuck::pod_collect_to_vec::<u8, f32>(&r.raw_output_contents[0]),
            &want,
            1e-6,
        );
    }
    // 8 MB of zeros compress to a few kB; inflated they pass the 1 MB limit.
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap()
        .send_compressed(CompressionEncoding::Gzip);
    let zeros = vec![0f32; 2 << 20];
    let e = g
        .model_infer(common::ffnn_grpc_request(&zeros))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    g.model_infer(common::ffnn_grpc_request(&input))
        .await
        .unwrap();
}

/// An OTLP/gRPC trace collector: keeps every span it is sent.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<OtlpSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &OtlpSpan, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    let v = s
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match v {
        V::StringValue(s) => s.clone(),
        V::IntValue(i) => i.to_string(),
        V::BoolValue(b) => b.to_string(),
        V::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn traces_continue_the_callers_trace_with_queue_assembly_compute_and_encoding() {
    let collector = Collector::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", l.local_addr().unwrap());
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let repo = ffnn_repo();
    let s = Captured::start(
        repo.path(),
        &["--otlp-endpoint", &otlp, "--trace-rate", "1"],
        // Export every 100 ms instead of every 5 s.
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let input = ffnn_input(1, 1);
    let rest_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let rest_parent = "00f067aa0ba902b7";
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .header("traceparent", format!("00-{rest_trace}-{rest_parent}-01"))
        .json(&ffnn_infer_body(&input))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let grpc_trace = "0af7651916cd43dd8448eb211c80319c";
    let grpc_parent = "b7ad6b7169203331";
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let mut req = tonic::Request::new(common::ffnn_grpc_request(&input));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{grpc_trace}-{grpc_parent}-01").parse().unwrap(),
    );
    g.model_infer(req).await.unwrap();
    // A failing call is traced as an error.
    let e = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(e.status(), 400);

    let names = ["queue", "assemble", "compute", "encode"];
    let tree = |trace: &str, parent: &str| -> Option<(OtlpSpan, Vec<OtlpSpan>)> {
        let spans = collector.spans.lock().unwrap();
        let root = spans
            .iter()
            .find(|s| hex(&s.trace_id) == trace && hex(&s.parent_span_id) == parent)?
            .clone();
        let children: Vec<OtlpSpan> = spans
            .iter()
            .filter(|s| s.parent_span_id == root.span_id)
            .cloned()
            .collect();
        (children.len() >= names.len()).then_some((root, children))
    };
    let t0 = Instant::now();
    let (rest, grpc) = loop {
        if let (Some(a), Some(b)) = (tree(rest_trace, rest_parent), tree(grpc_trace, grpc_parent)) {
            break (a, b);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "spans received: {:#?}",
            collector.spans.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for ((root, children), name) in [
        (&rest, "POST /v2/models/{model}/infer"),
        (&grpc, "inference.GRPCInferenceService/ModelInfer"),
    ] {
        assert_eq!(root.name, name);
        assert_eq!(root.kind, 2, "a SERVER span: {root:?}");
        assert_eq!(attr(root, "model").as_deref(), Some("ffnn"));
        assert_eq!(attr(root, "model.version").as_deref(), Some("1"));
        let batch = attr(root, "batch.id").expect("the request span names its batch");
        assert_eq!(attr(root, "batch.size").as_deref(), Some("1"));
        let mut got: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
        got.sort_unstable();
        let mut want = names.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "{name}");
        let child = |n: &str| children.iter().find(|c| c.name == n).unwrap();
        let compute = child("compute");
        assert_eq!(attr(compute, "batch.id"), Some(batch.clone()));
        assert_eq!(attr(compute, "batch.size").as_deref(), Some("1"));
        // The phases follow one another inside the request span.
        let (q, a, k, e) = (child("queue"), child("assemble"), compute, child("encode"));
        assert!(
            q.end_time_unix_nano <= a.start_time_unix_nano + 1_000,
            "{q:?} {a:?}"
        );
        assert!(
            a.end_time_unix_nano <= k.start_time_unix_nano + 1_000,
            "{a:?} {k:?}"
        );
        assert!(
            k.end_time_unix_nano <= e.start_time_unix_nano,
            "{k:?} {e:?}"
        );
        assert!(root.start_time_unix_nano <= q.start_time_unix_nano);
        assert!(e.end_time_unix_nano <= root.end_time_unix_nano);
    }
    let t0 = Instant::now();
    loop {
        let failed = collector.spans.lock().unwrap().iter().any(|s| {
            s.status.as_ref().is_some_and(|st| st.code == 2)
                && attr(s, "error.message").is_some_and(|m| m.contains("shape"))
        });
        if failed {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no span with an error status"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop();
}
