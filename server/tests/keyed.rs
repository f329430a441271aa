//! Correlation keys, affinity routing and keyed state through the real
//! binary: per-key order and exactly-once under concurrency over gRPC
//! (stream and unary) and REST, the same under round_robin and random with
//! migrations counted, sliding windows, expiry, eviction, sequence start/end.

mod common;

use common::Server;
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::collections::BTreeMap;
use std::time::Duration;

fn repo_with(models: &[&str], extra: &[(&str, &str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let repo = common::model_repository();
    for m in models {
        std::os::unix::fs::symlink(repo.join(m), dir.path().join(m)).unwrap();
    }
    // (name, source model, config.toml)
    for (name, source, config) in extra {
        let d = dir.path().join(name);
        std::fs::create_dir_all(d.join("1")).unwrap();
        std::fs::copy(
            repo.join(source).join("1/model.onnx"),
            d.join("1/model.onnx"),
        )
        .unwrap();
        std::fs::write(d.join("config.toml"), config).unwrap();
    }
    dir
}

fn param_str(s: &str) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(s.into())),
    }
}

fn param_bool(b: bool) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(b)),
    }
}

/// One accumulator step for `key`: x = [1, seq, key_id, 0].
fn step(model: &str, key: &str, key_id: u32, seq: u32) -> pb::ModelInferRequest {
    let x = [1.0f32, seq as f32, key_id as f32, 0.0];
    let mut r = pb::ModelInferRequest {
        model_name: model.into(),
        id: format!("{key}#{seq}"),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&x))],
        ..Default::default()
    };
    r.parameters
        .insert("correlation_key".into(), param_str(key));
    r
}

/// The running sum after the key's `seq`-th step, if every step before it
/// ran exactly once and in order.
fn expected(seq: u32, key_id: u32) -> [f32; 4] {
    let s = seq as f32;
    [s, s * (s + 1.0) / 2.0, s * key_id as f32, 0.0]
}

fn y_of(r: &pb::ModelInferResponse) -> [f32; 4] {
    assert_eq!(
        r.outputs.len(),
        1,
        "only y is returned, the state output stays inside"
    );
    assert_eq!(r.outputs[0].name, "y");
    let v: Vec<f32> = bytemuck::pod_collect_to_vec(&r.raw_output_contents[0]);
    v.try_into().unwrap()
}

async fn metric(s: &Server, name: &str, model: &str) -> f64 {
    let text = common::get_text(&reqwest::Client::new(), format!("{}/metrics", s.metrics)).await;
    common::metric_sum(&text, name, &[&format!("model=\"{model}\"")])
}

/// Many keys, each pipelined on its own gRPC stream (so their arrival order
/// is fixed), plus unary gRPC and REST clients on other keys, all at once.
async fn order_and_state_under_concurrency(s: &Server, model: &str) {
    const STREAM_KEYS: u32 = 24;
    const STEPS: u32 = 40;
    let mut tasks = Vec::new();
    for k in 0..STREAM_KEYS {
        let grpc = s.grpc.clone();
        let model = model.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(grpc).await.unwrap();
            let key = format!("stream-{k}");
            let reqs: Vec<_> = (1..=STEPS).map(|seq| step(&model, &key, k, seq)).collect();
            let mut out = c
                .model_stream_infer(tokio_stream::iter(reqs))
                .await
                .unwrap()
                .into_inner();
            let mut got = BTreeMap::new();
            while let Some(item) = out.message().await.unwrap() {
                assert_eq!(item.error_message, "", "{key}");
                let r = item.infer_response.unwrap();
                let seq: u32 = r.id.rsplit('#').next().unwrap().parse().unwrap();
                got.insert(seq, y_of(&r));
                if got.len() == STEPS as usize {
                    break;
                }
            }
            for seq in 1..=STEPS {
                assert_eq!(got[&seq], expected(seq, k), "{key} step {seq}");
            }
        }));
    }
    for k in 0..8u32 {
        let grpc = s.grpc.clone();
        let model = model.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = GrpcInferenceServiceClient::connect(grpc).await.unwrap();
            let key = format!("unary-{k}");
            for seq in 1..=STEPS {
                let r = c
                    .model_infer(step(&model, &key, 100 + k, seq))
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(y_of(&r), expected(seq, 100 + k), "{key} step {seq}");
            }
        }));
    }
    for k in 0..8u32 {
        let http = s.http.clone();
        let model = model.to_string();
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let key = format!("rest-{k}");
            for seq in 1..=STEPS {
                let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                    "data": [1.0, seq as f32, (200 + k) as f32, 0.0]}]});
                let v: Value = c
                    .post(format!("{http}/v2/models/{model}/infer"))
                    .header("x-correlation-key", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let y: Vec<f32> = v["outputs"][0]["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(y, expected(seq, 200 + k).to_vec(), "{key} step {seq}: {v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn affinity_keeps_order_and_state_without_migrations() {
    let repo = repo_with(&["accumulator"], &[]);
    let s = Server::start_with_repo(repo.path(), &[]);
    order_and_state_under_concurrency(&s, "accumulator").await;
    assert_eq!(
        metric(&s, "shoal_state_migrations_total", "accumulator").await,
        0.0
    );
    assert!(metric(&s, "shoal_state_hits_total", "accumulator").await > 0.0);
    // Every replica served keys: affinity spreads keys, it does not pin all to one.
    let text = reqwest::get(format!("{}/metrics", s.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let busy = text
        .lines()
        .filter(|l| {
            l.starts_with("shoal_replica_requests_total") && l.contains("model=\"accumulator\"")
        })
        .filter(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                > 0.0
        })
        .count();
    assert_eq!(busy, 4, "{text}");
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn round_robin_and_random_migrate_and_stay_exact() {
    let repo = repo_with(&["accumulator_rr", "accumulator_random"], &[]);
    let s = Server::start_with_repo(repo.path(), &[]);
    for model in ["accumulator_rr", "accumulator_random"] {
        order_and_state_under_concurrency(&s, model).await;
        let migrations = metric(&s, "shoal_state_migrations_total", model).await;
        assert!(
            migrations > 0.0,
            "{model}: a spread policy moves state between replicas"
        );
    }
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn sequence_start_end_keyless_and_bounds() {
    let small =
        "max_batch_size = 8\ninstance_count = 2\n[dynamic_batching]\nmax_queue_delay_us = 100\n\
                 [keyed_state]\nmax_keys = 2\nidle_timeout_s = 1\n\
                 [[sequence_state]]\ninput = \"h_in\"\noutput = \"h_out\"\ninitial = 0.0\n";
    let repo = repo_with(&[], &[("acc_small", "accumulator", small)]);
    let s = Server::start_with_repo(repo.path(), &[]);
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let m = "acc_small";
    let run = |key: &'static str, seq: u32, start: bool, end: bool| {
        let mut r = step(m, key, 1, seq);
        if start {
            r.parameters
                .insert("sequence_start".into(), param_bool(true));
        }
        if end {
            r.parameters.insert("sequence_end".into(), param_bool(true));
        }
        let mut c = c.clone();
        async move { y_of(&c.model_infer(r).await.unwrap().into_inner())[0] }
    };
    for seq in 1..=3 {
        assert_eq!(run("a", seq, false, false).await, seq as f32);
    }
    // sequence_start resets the key's state.
    assert_eq!(run("a", 1, true, false).await, 1.0);
    assert_eq!(run("a", 2, false, false).await, 2.0);
    // sequence_end answers, then frees the state.
    assert_eq!(run("a", 3, false, true).await, 3.0);
    assert_eq!(run("a", 1, false, false).await, 1.0);

    // max_keys = 2: a third key evicts the least recently used one.
    assert_eq!(run("b", 1, false, false).await, 1.0);
    assert_eq!(run("a", 2, false, false).await, 2.0);
    assert_eq!(run("c", 1, false, false).await, 1.0); // evicts b
    assert_eq!(
        run("b", 1, false, false).await,
        1.0,
        "b starts over after its eviction"
    );
    assert!(metric(&s, "shoal_state_evictions_total", m).await >= 1.0);

    // Idle keys expire after idle_timeout_s.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        run("b", 1, false, false).await,
        1.0,
        "b expired and starts over"
    );
    assert!(metric(&s, "shoal_state_expirations_total", m).await >= 1.0);

    // A keyless request to a stateful model is refused clearly.
    let mut keyless = step(m, "x", 1, 1);
    keyless.parameters.clear();
    let e = c.model_infer(keyless).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("correlation key"), "{}", e.message());
    // Two rows for one key are refused too.
    let mut two = step(m, "a", 1, 1);
    two.inputs[0].shape = vec![2, 4];
    two.raw_input_contents[0] = bytes::Bytes::from(vec![0u8; 32]);
    let e = c.model_infer(two).await.unwrap_err();
    assert!(e.message().contains("one row"), "{}", e.message());
    // Triton's sequence_id works as a key.
    let mut by_seq_id = step(m, "unused", 1, 1);
    by_seq_id.parameters.clear();
    by_seq_id.parameters.insert(
        "sequence_id".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::Uint64Param(77)),
        },
    );
    let first = y_of(&c.model_infer(by_seq_id.clone()).await.unwrap().into_inner())[0];
    let second = y_of(&c.model_infer(by_seq_id).await.unwrap().into_inner())[0];
    assert_eq!((first, second), (1.0, 2.0));
    assert_eq!(s.stop(), Some(0));
}

/// The trajectory model on one stacked window, run in-process.
fn reference_trajectory(window: &[[f32; 2]]) -> Vec<f32> {
    use shoal::backend::{Backend, BackendOptions, BatchInput};
    let path = common::model_repository().join("trajectory/1/model.onnx");
    let mut b = shoal::backend::ort::OrtBackend::load(&path, &BackendOptions::default()).unwrap();
    let flat: Vec<f32> = window.iter().flatten().copied().collect();
    let out = b
        .run(&[BatchInput {
            name: "positions",
            datatype: shoal::tensor::DataType::Fp32,
            shape: vec![1, 8, 2],
            parts: vec![bytemuck::cast_slice(&flat)],
        }])
        .unwrap();
    bytemuck::pod_collect_to_vec(&out[0].data)
}

#[tokio::test]
async fn windows_stack_each_keys_last_events() {
    let repo = repo_with(&["trajectory", "trajectory_skip"], &[]);
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let post = |model: &str, id: String, pos: [f32; 2]| {
        let c = c.clone();
        let url = format!("{}/v2/models/{model}/infer", s.http);
        async move {
            let body = json!({"id": id, "inputs": [{"name": "positions", "shape": [1, 2], "datatype": "FP32", "data": pos}]});
            let r = c.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // Two agents interleaved; the key comes from the id by the paper's regex.
    let agents = ["little3_7_", "big1_2_"];
    let mut history: Vec<Vec<[f32; 2]>> = vec![Vec::new(), Vec::new()];
    for step in 0..11 {
        for (a, agent) in agents.iter().enumerate() {
            let pos = [step as f32 + a as f32 * 100.0, -(step as f32)];
            history[a].push(pos);
            let id = format!("/collision/tracking/agent_position/{agent}{step}");
            let v = post("trajectory", id, pos).await;
            let got: Vec<f32> = v["outputs"][0]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(v["outputs"][0]["shape"], json!([1, 12, 2]));
            let h = &history[a];
            let mut window = vec![[0.0f32; 2]; 8usize.saturating_sub(h.len())];
            window.extend_from_slice(&h[h.len().saturating_sub(8)..]);
            common::assert_close(&got, &reference_trajectory(&window), 1e-5);
        }
    }
    // skip warm-up: no outputs until the window is full, then predictions.
    for step in 0..9 {
        let v = post(
            "trajectory_skip",
            format!("/collision/tracking/agent_position/solo_1_{step}"),
            [step as f32, 1.0],
        )
        .await;
        if step < 7 {
            assert_eq!(v["outputs"], json!([]), "{v}");
            assert_eq!(v["parameters"]["window_fill"], step + 1);
            assert_eq!(v["parameters"]["window_length"], 8);
        } else {
            assert_eq!(v["outputs"][0]["shape"], json!([1, 12, 2]), "{v}");
        }
    }
    // An id the regex does not match is keyless: refused by a window model.
    let r = c
        .post(format!("{}/v2/models/trajectory/infer", s.http))
        .json(&json!({"id": "no-agent-here", "inputs": [{"name": "positions", "shape": [1, 2], "datatype": "FP32", "data": [0, 0]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(s.stop(), Some(0));
}
