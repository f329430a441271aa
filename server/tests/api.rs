//! The real `shoal` binary on port 0 with the real FFNN through ONNX
//! Runtime: REST JSON, REST binary, gRPC unary and stream, versions,
//! metrics, bad input and graceful shutdown.

mod common;

use common::{assert_close, f32s, ffnn_input, reference_ffnn, Server};
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::time::Duration;

/// A repository with the small models only (links into the real one), so
/// servers start fast.
fn light_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::model_repository();
    for m in ["ffnn", "ffnn_nobatch", "types"] {
        std::os::unix::fs::symlink(repo.join(m), dir.path().join(m)).unwrap();
    }
    dir
}

fn binary_body(header: &Value, blobs: &[&[u8]]) -> (Vec<u8>, usize) {
    let mut body = serde_json::to_vec(header).unwrap();
    let n = body.len();
    for b in blobs {
        body.extend_from_slice(b);
    }
    (body, n)
}

#[tokio::test]
async fn rest_json_and_binary_match_in_process_ort() {
    let repo = light_repo();
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let input = ffnn_input(3, 7);
    let want = reference_ffnn(2, &input);

    // JSON in, JSON out; no version: the latest (2).
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .json(&json!({"id": "r1", "inputs": [{"name": "input", "shape": [3, 784], "datatype": "FP32", "data": input}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model_version"], "2");
    assert_eq!(v["id"], "r1");
    assert_eq!(v["outputs"][0]["shape"], json!([3, 10]));
    assert_close(&f32s(&v["outputs"][0]["data"]), &want, 1e-6);

    // Binary in, binary out, explicit version 1.
    let want1 = reference_ffnn(1, &input);
    let header = json!({
        "inputs": [{"name": "input", "shape": [3, 784], "datatype": "FP32", "parameters": {"binary_data_size": input.len() * 4}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}],
    });
    let (body, n) = binary_body(&header, &[bytemuck::cast_slice(&input)]);
    let r = c
        .post(format!("{}/v2/models/ffnn/versions/1/infer", s.http))
        .header("Inference-Header-Content-Length", n)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hl: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..hl]).unwrap();
    assert_eq!(head["model_version"], "1");
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        3 * 10 * 4
    );
    let got: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[hl..]);
    assert_close(&got, &want1, 1e-6);

    // The infer route's direct path and the router answer alike: a
    // percent-escaped path goes through the router (its `Path` extractor
    // decodes it), a plain one does not. Answers and errors, headers too.
    for (plain, escaped) in [
        (
            "/v2/models/ffnn/versions/1/infer",
            "/v2/models/ff%6En/versions/%31/infer",
        ),
        ("/v2/models/nope/infer", "/v2/models/n%6Fpe/infer"),
        (
            "/v2/models/ffnn/versions/9/infer",
            "/v2/models/ffnn/versions/%39/infer",
        ),
    ] {
        let mut answers = Vec::new();
        for path in [plain, escaped] {
            let r = c
                .post(format!("{}{path}", s.http))
                .header("Inference-Header-Content-Length", n)
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let mut headers: Vec<(String, String)> = r
                .headers()
                .iter()
                .filter(|(k, _)| *k != "date")
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            headers.sort();
            answers.push((r.status(), headers, r.bytes().await.unwrap()));
        }
        assert_eq!(answers[0], answers[1], "{plain} against {escaped}");
    }
    assert_eq!(
        c.get(format!("{}/v2/models/ffnn/infer", s.http))
            .send()
            .await
            .unwrap()
            .status(),
        405,
        "GET on the infer route"
    );

    // Request-wide binary_data_output with JSON input.
    let r = c
        .post(format!("{}/v2/models/ffnn_nobatch/infer", s.http))
        .json(&json!({"parameters": {"binary_data_output": true},
            "inputs": [{"name": "input", "shape": [3, 784], "datatype": "FP32", "data": input}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let hl: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    assert_close(
        &bytemuck::pod_collect_to_vec::<u8, f32>(&bytes[hl..]),
        &reference_ffnn(1, &input),
        1e-6,
    );

    // Metadata, readiness, config and statistics.
    let md: Value = common::get_json(&c, format!("{}/v2/models/ffnn", s.http)).await;
    assert_eq!(md["versions"], json!(["1", "2"]));
    assert_eq!(
        md["inputs"][0],
        json!({"name": "input", "datatype": "FP32", "shape": [-1, 784]})
    );
    for path in [
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/ffnn/ready",
        "/v2/models/ffnn/versions/1/ready",
    ] {
        assert_eq!(
            c.get(format!("{}{path}", s.http))
                .send()
                .await
                .unwrap()
                .status(),
            200,
            "{path}"
        );
    }
    let cfg: Value = common::get_json(&c, format!("{}/v2/models/ffnn/config", s.http)).await;
    assert_eq!(cfg["max_batch_size"], 64);
    assert_eq!(cfg["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(cfg["input"][0]["dims"], json!([784]));
    let st: Value =
        common::get_json(&c, format!("{}/v2/models/ffnn/versions/2/stats", s.http)).await;
    assert_eq!(st["model_stats"][0]["inference_count"], 3);
    assert_eq!(
        st["model_stats"][0]["inference_stats"]["success"]["count"],
        1
    );
    let server: Value = common::get_json(&c, format!("{}/v2", s.http)).await;
    assert_eq!(server["name"], "shoal");
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn grpc_unary_typed_raw_and_stream_match_in_process_ort() {
    let repo = light_repo();
    let s = Server::start_with_repo(repo.path(), &[]);
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let input = ffnn_input(2, 11);
    let want = reference_ffnn(2, &input);
    let tensor =
        |contents: Option<pb::InferTensorContents>| pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![2, 784],
            parameters: Default::default(),
            contents,
        };

    // Raw contents.
    let raw = pb::ModelInferRequest {
        model_name: "ffnn".into(),
        id: "g1".into(),
        inputs: vec![tensor(None)],
        raw_input_contents: vec![bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&input))],
        ..Default::default()
    };
    let r = client.model_infer(raw.clone()).await.unwrap().into_inner();
    assert_eq!((r.model_version.as_str(), r.id.as_str()), ("2", "g1"));
    assert_eq!(r.outputs[0].shape, vec![2, 10]);
    assert_close(
        &bytemuck::pod_collect_to_vec::<u8, f32>(&r.raw_output_contents[0]),
        &want,
        1e-6,
    );

    // Typed contents.
    let typed = pb::ModelInferRequest {
        model_name: "ffnn".into(),
        inputs: vec![tensor(Some(pb::InferTensorContents {
            fp32_contents: input.clone(),
            ..Default::default()
        }))],
        ..Default::default()
    };
    let r = client.model_infer(typed).await.unwrap().into_inner();
    assert_close(
        &bytemuck::pod_collect_to_vec::<u8, f32>(&r.raw_output_contents[0]),
        &want,
        1e-6,
    );

    // Metadata and config as Triton clients read them.
    let md = client
        .model_metadata(pb::ModelMetadataRequest {
            name: "ffnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(md.inputs[0].shape, vec![-1, 784]);
    let cfg = client
        .model_config(pb::ModelConfigRequest {
            name: "ffnn".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!((cfg.max_batch_size, cfg.input[0].data_type), (64, 11));
    assert!(
        client
            .server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    // Bidirectional stream: every request answered with its id.
    let reqs: Vec<_> = (0..16)
        .map(|i| {
            let mut r = raw.clone();
            r.id = format!("s{i}");
            r
        })
        .collect();
    let mut stream = client
        .model_stream_infer(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(item) = stream.message().await.unwrap() {
        assert_eq!(item.error_message, "");
        let r = item.infer_response.unwrap();
        assert_close(
            &bytemuck::pod_collect_to_vec::<u8, f32>(&r.raw_output_contents[0]),
            &want,
            1e-6,
        );
        seen.insert(r.id);
        if seen.len() == 16 {
            break;
        }
    }
    assert_eq!(seen.len(), 16);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn grpc_deadline_and_timeout_parameter() {
    let s = Server::start(&[]);
    let mut client = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let rows = 16usize;
    let data = vec![0.1f32; rows * 3 * 224 * 224];
    let req = pb::ModelInferRequest {
        model_name: "resnet50".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 3, 224, 224],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&data))],
        ..Default::default()
    };
    // Occupy the single ResNet50 replica, then ask for an answer in 50 ms.
    let mut busy_client = client.clone();
    let busy_req = req.clone();
    let busy = tokio::spawn(async move { busy_client.model_infer(busy_req).await });
    // Wait until the replica has taken it (its queue time is recorded).
    let stats = pb::ModelStatisticsRequest {
        name: "resnet50".into(),
        version: String::new(),
    };
    let queued = |s: pb::ModelStatisticsResponse| {
        s.model_stats[0]
            .inference_stats
            .unwrap()
            .queue
            .unwrap()
            .count
    };
    for _ in 0..200 {
        if queued(
            client
                .model_statistics(stats.clone())
                .await
                .unwrap()
                .into_inner(),
        ) == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut timed = req.clone();
    timed.parameters.insert(
        "timeout".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(50_000)),
        },
    );
    let e = client.model_infer(timed).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    let mut with_deadline = tonic::Request::new(req.clone());
    with_deadline.set_timeout(Duration::from_millis(50));
    let e = client.model_infer(with_deadline).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    busy.await.unwrap().unwrap();
    let st = client
        .model_statistics(pb::ModelStatisticsRequest {
            name: "resnet50".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.model_stats[0].execution_count, 1,
        "timed-out requests never ran"
    );
    drop(client);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_requests() {
    let repo = light_repo();
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let input = ffnn_input(1, 1);
    for _ in 0..3 {
        let r = c
            .post(format!("{}/v2/models/ffnn/infer", s.http))
            .json(&json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": input}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .json(&json!({"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    for needle in [
        "shoal_request_success_total{model=\"ffnn\",version=\"2\"} 3",
        "shoal_request_failure_total{model=\"ffnn\",version=\"2\",reason=\"invalid_argument\"} 1",
        "shoal_inference_count_total{model=\"ffnn\",version=\"2\"} 3",
        "shoal_request_duration_seconds_bucket",
        "shoal_queue_duration_seconds_bucket",
        "shoal_compute_duration_seconds_bucket",
        "shoal_batch_size_bucket",
        "shoal_queue_depth",
        "shoal_execution_count_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    common::promtool_check(&text);
    assert_eq!(
        c.get(format!("{}/v2/health/ready", s.metrics))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(s.stop(), Some(0));
}

/// Inline execution with the real ONNX Runtime backend behind the real
/// server (issue 18): once the replica has measured a few runs, a lone
/// request runs on the network thread, with the answer in-process ORT gives.
#[tokio::test]
async fn a_cheap_model_runs_inline_with_the_same_answers() {
    // The widest bound, so a loaded test machine cannot push the smoothed
    // cost of this small model past it.
    let repo = common::repo_of("ffnn", "ffnn", "inline_execution_max_us = 10000\n");
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let n = 30;
    for seed in 0..n {
        let input = ffnn_input(1, seed);
        let y = common::rest_ffnn(&c, &s.http, "ffnn", &input).await;
        common::assert_close(&y, &reference_ffnn(1, &input), 1e-5);
    }
    let text = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    };
    // The first eight ran on the replica thread, to measure the model.
    let inline =
        value("shoal_replica_inline_executions_total{model=\"ffnn\",version=\"1\",replica=\"0\"}");
    assert_eq!(inline, (n - 8) as f64);
    assert_eq!(
        value("shoal_inline_execution_seconds_count{model=\"ffnn\",version=\"1\"}"),
        inline
    );
    assert_eq!(
        value("shoal_inference_count_total{model=\"ffnn\",version=\"1\"}"),
        n as f64
    );
    common::promtool_check(&text);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn sigterm_answers_in_flight_requests_then_exits_zero() {
    let s = Server::start(&[]);
    let c = reqwest::Client::new();
    let rows = 16usize;
    let data = vec![0.5f32; rows * 3 * 224 * 224];
    let header = json!({"inputs": [{"name": "input", "shape": [rows, 3, 224, 224], "datatype": "FP32",
        "parameters": {"binary_data_size": data.len() * 4}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}]});
    let (body, n) = binary_body(&header, &[bytemuck::cast_slice(&data)]);
    let url = format!("{}/v2/models/resnet50/infer", s.http);
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move {
            c.post(url)
                .header("Inference-Header-Content-Length", n)
                .body(body)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Readiness is off while the in-flight request drains (admin port).
    let ready = c.get(format!("{}/v2/health/ready", s.metrics)).send().await;
    if let Ok(r) = ready {
        assert_eq!(r.status(), 503);
    }
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    assert_eq!(s.stop_after_signal(), Some(0));
}

/// A port already taken (issue 16, property 8) fails the start with a
/// message naming the listener and the address, for each of the three.
#[test]
fn a_taken_port_fails_the_start_and_names_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    for (flag, what) in [
        ("--metrics-port", "metrics"),
        ("--http-port", "http"),
        ("--grpc-port", "grpc"),
    ] {
        let repo = common::ffnn_repo_with_config("");
        let err = common::failed_start(&[
            "--model-repository",
            repo.path().to_str().unwrap(),
            flag,
            &port,
        ]);
        assert!(
            err.contains(what) && err.contains(&format!("127.0.0.1:{port}")),
            "{flag}: {err}"
        );
    }
}
