//! A Triton model repository served unchanged by the real binary: models
//! that exist only as `config.pbtxt`, written as Triton's docs write them,
//! with version policies, instance groups, a batcher and fields shoal
//! ignores (named in the log), beside broken and refused configs that fail
//! alone; the config calls return what was written, completed.

mod common;

use common::{assert_close, f32s, ffnn_infer_body, ffnn_input, reference_ffnn};
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::Path;

const CLF: &str = r#"
# The Crayfish FFNN as a Triton user writes it.
name: "clf"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "input"
    data_type: TYPE_FP32
    dims: [ 784 ]
  }
]
output {
  name: "output"
  data_type: TYPE_FP32
  dims: 10
  label_filename: "labels.txt"  # ignored, with a warning
}
instance_group [ { count: 2, kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 32 }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
model_warmup [
  { name: "zeros" batch_size: 1 inputs { key: "input" value { data_type: TYPE_FP32 dims: [784] zero_data: true } } }
]
"#;

/// Version directory `v` of `model` holding the FFNN's version `ffnn_v`.
fn version(repo: &Path, model: &str, v: u32, ffnn_v: u32) {
    let src = common::model_repository().join(format!("ffnn/{ffnn_v}"));
    let dir = repo.join(model);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(src).unwrap(), dir.join(v.to_string()))
        .unwrap();
}

fn config(repo: &Path, model: &str, file: &str, text: &str) {
    std::fs::write(repo.join(model).join(file), text).unwrap();
}

fn triton_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    // Three versions on disk; Triton's default policy loads the latest.
    for (v, f) in [(1, 1), (2, 1), (3, 2)] {
        version(r, "clf", v, f);
    }
    config(r, "clf", "config.pbtxt", CLF);
    for m in [
        "every",
        "pinned",
        "bare",
        "both",
        "syntax",
        "ensemble",
        "wrong_type",
        "wrong_dims",
        "reshaped",
    ] {
        version(r, m, 1, 1);
        version(r, m, 2, 2);
    }
    config(
        r,
        "every",
        "config.pbtxt",
        "platform: \"onnxruntime_onnx\"\nmax_batch_size: 4\nversion_policy: { all { } }\n",
    );
    config(
        r,
        "pinned",
        "config.pbtxt",
        "backend: \"onnxruntime\"\nmax_batch_size: 4\nversion_policy: { specific: { versions: [1] } }\n",
    );
    // Nothing but the backend: inputs and outputs come from the graph.
    config(r, "bare", "config.pbtxt", "backend: \"onnxruntime\"\n");
    config(r, "both", "config.pbtxt", "max_batch_size: 2\n");
    config(r, "both", "config.toml", "max_batch_size = 16\n");
    config(
        r,
        "syntax",
        "config.pbtxt",
        "name: \"syntax\"\nmax_batch_size: 4\ninput [ { name: \"input\" data_type: TYPE_FP32 dims: [784] } }\n",
    );
    config(
        r,
        "ensemble",
        "config.pbtxt",
        "platform: \"ensemble\"\nensemble_scheduling { step [ { model_name: \"clf\" model_version: -1 } ] }\n",
    );
    config(
        r,
        "wrong_type",
        "config.pbtxt",
        "max_batch_size: 4\ninput [ { name: \"input\" data_type: TYPE_INT32 dims: [784] } ]\n",
    );
    // Clients send 28x28 images and get 2x5 scores; the graph takes 784
    // values and gives 10.
    config(
        r,
        "reshaped",
        "config.pbtxt",
        r#"
max_batch_size: 4
input [ { name: "input" data_type: TYPE_FP32 dims: [ 28, 28 ] reshape: { shape: [ 784 ] } } ]
output [ { name: "output" data_type: TYPE_FP32 dims: [ 2, 5 ] reshape { shape: [ 10 ] } } ]
"#,
    );
    config(
        r,
        "wrong_dims",
        "config.pbtxt",
        "# the graph takes [-1, 784]\nmax_batch_size: 4\noutput [\n  {\n    name: \"output\"\n    data_type: TYPE_FP32\n    dims: [ 12 ]\n  }\n]\n",
    );
    dir
}

async fn index(c: &reqwest::Client, http: &str) -> Vec<Value> {
    c.post(format!("{http}/v2/repository/index"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn reason(ix: &[Value], model: &str) -> String {
    ix.iter()
        .filter(|e| e["name"] == model)
        .map(|e| format!("{} {}", e["state"], e["reason"]))
        .collect::<Vec<_>>()
        .join("; ")
}

#[tokio::test]
async fn a_triton_repository_is_served_unchanged() {
    let repo = triton_repo();
    // Explicit mode loads each model on its own, so the broken ones fail
    // alone (Triton's --exit-on-error=false); the default mode's startup
    // fails on the first, below.
    let s = common::Captured::start(
        repo.path(),
        &[
            "--model-control-mode",
            "explicit",
            "--load-model",
            "*",
            "--metrics-triton-names",
        ],
        &[],
    );
    let c = reqwest::Client::new();

    // Versions as the policies say.
    for (model, want) in [
        ("clf", vec!["3"]),
        ("every", vec!["1", "2"]),
        ("pinned", vec!["1"]),
        ("bare", vec!["2"]),
        // config.toml's default is Triton's too.
        ("both", vec!["2"]),
    ] {
        let md: Value = common::get_json(&c, format!("{}/v2/models/{model}", s.http)).await;
        assert_eq!(md["versions"], json!(want), "{model}: {md}");
    }

    // The config as loaded: what was written, completed.
    let cfg: Value = common::get_json(&c, format!("{}/v2/models/clf/config", s.http)).await;
    assert_eq!(cfg["name"], "clf");
    assert_eq!(cfg["backend"], "onnxruntime");
    assert_eq!(cfg["max_batch_size"], 8);
    assert_eq!(
        cfg["version_policy"],
        json!({"latest": {"num_versions": 1}})
    );
    assert_eq!(cfg["input"][0]["dims"], json!([784]));
    assert_eq!(cfg["input"][0]["data_type"], "TYPE_FP32");
    assert_eq!(cfg["output"][0]["label_filename"], "labels.txt");
    assert_eq!(cfg["instance_group"][0]["count"], 2);
    assert_eq!(cfg["instance_group"][0]["kind"], "KIND_CPU");
    assert_eq!(cfg["instance_group"][0]["name"], "clf_0");
    assert_eq!(
        cfg["dynamic_batching"]["preferred_batch_size"],
        json!([4, 8])
    );
    assert_eq!(
        cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"],
        32
    );
    assert_eq!(cfg["model_warmup"][0]["name"], "zeros");
    assert_eq!(cfg["default_model_filename"], "model.onnx");
    // Autocompleted from the graph; no batcher where none was written.
    let bare: Value = common::get_json(&c, format!("{}/v2/models/bare/config", s.http)).await;
    assert_eq!(bare["input"][0]["name"], "input", "{bare}");
    // No max_batch_size: 0, so the dims are the graph's whole shape.
    assert_eq!(bare["max_batch_size"], 0, "{bare}");
    assert_eq!(bare["output"][0]["dims"], json!([-1, 10]), "{bare}");
    assert!(bare.get("dynamic_batching").is_none(), "{bare}");
    let both: Value = common::get_json(&c, format!("{}/v2/models/both/config", s.http)).await;
    assert_eq!(both["max_batch_size"], 16, "config.toml wins: {both}");
    // A max_batch_size with the I/O left to the graph and no scheduler:
    // Triton's auto-completion names the dynamic batcher.
    let every: Value = common::get_json(&c, format!("{}/v2/models/every/config", s.http)).await;
    assert_eq!(every["max_batch_size"], 4, "{every}");
    assert!(every.get("dynamic_batching").is_some(), "{every}");

    // gRPC gives the same message.
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let gc = g
        .model_config(pb::ModelConfigRequest {
            name: "clf".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(gc.max_batch_size, 8);
    assert_eq!(gc.instance_group[0].count, 2);
    assert_eq!(gc.model_warmup.len(), 1);
    assert_eq!(gc.output[0].label_filename, "labels.txt");

    // It serves: the latest version is the FFNN's version 2.
    let x = ffnn_input(3, 7);
    let body = ffnn_infer_body(&x);
    let r = common::post_json(&c, format!("{}/v2/models/clf/infer", s.http), &body).await;
    assert_eq!(r["model_version"], "3", "{r}");
    assert_close(
        &f32s(&r["outputs"][0]["data"]),
        &reference_ffnn(2, &x),
        1e-5,
    );

    // Triton's metric names beside shoal's, for Triton's dashboards.
    let text = common::get_text(&c, format!("{}/metrics", s.inner.metrics)).await;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains("model=\"clf\"")
                    && l.contains("version=\"3\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} for clf 3 in:\n{text}"))
    };
    assert_eq!(value("nv_inference_request_success"), 1.0);
    // The same counts as shoal's own series (which include the load's
    // warm-up run on each replica).
    assert_eq!(
        value("nv_inference_count"),
        value("shoal_inference_count_total")
    );
    assert!(value("nv_inference_count") >= 3.0);
    assert_eq!(
        value("nv_inference_exec_count"),
        value("shoal_execution_count_total")
    );
    let us = value("nv_inference_request_duration_us");
    assert!(
        us > 0.0 && (us - value("shoal_request_duration_seconds_sum") * 1e6).abs() < 1.0,
        "{us}"
    );
    assert!(value("nv_inference_compute_infer_duration_us") > 0.0);
    assert_eq!(value("nv_inference_pending_request_count"), 0.0);
    assert!(text.contains("shoal_request_success_total"));
    // Triton's own names break three of promtool's naming rules (counters
    // without _total, `_us`, counters named `_count`); nothing else may.
    common::promtool_check_allowing(&text, |l| {
        l.starts_with("nv_")
            && (l.contains("should have \"_total\" suffix")
                || l.contains("should not contain abbreviated units")
                || l.contains("should not have \"_count\" suffix"))
    });

    // reshape: the client's shapes outside, the graph's inside.
    let md: Value = common::get_json(&c, format!("{}/v2/models/reshaped", s.http)).await;
    assert_eq!(md["inputs"][0]["shape"], json!([-1, 28, 28]), "{md}");
    assert_eq!(md["outputs"][0]["shape"], json!([-1, 2, 5]), "{md}");
    let x = ffnn_input(2, 11);
    let body =
        json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 28, 28], "data": x}]});
    let r = common::post_json(&c, format!("{}/v2/models/reshaped/infer", s.http), &body).await;
    assert_eq!(r["outputs"][0]["shape"], json!([2, 2, 5]), "{r}");
    assert_close(
        &f32s(&r["outputs"][0]["data"]),
        &reference_ffnn(2, &x),
        1e-5,
    );

    // Broken and refused configs fail alone, saying where and why.
    let ix = index(&c, &s.http).await;
    let syntax = reason(&ix, "syntax");
    assert!(
        syntax.contains("UNAVAILABLE") && syntax.contains("syntax/config.pbtxt: line 3"),
        "{syntax}"
    );
    let ens = reason(&ix, "ensemble");
    assert!(
        ens.contains("UNAVAILABLE") && ens.contains("ensemble"),
        "{ens}"
    );
    let wrong = reason(&ix, "wrong_type");
    assert!(
        wrong.contains("UNAVAILABLE")
            && wrong.contains("INT32")
            && wrong.contains("wrong_type/config.pbtxt line 2 (input `input`)"),
        "{wrong}"
    );
    let dims = reason(&ix, "wrong_dims");
    assert!(
        dims.contains("wrong_dims/config.pbtxt line 5 (output `output`)")
            && dims.contains("[12] do not match the graph's [10]"),
        "{dims}"
    );

    let log = s.stop().join("\n");
    assert!(
        log.lines()
            .any(|l| l.contains("warm-up done") && l.contains("clf") && l.contains("replicas=2")),
        "clf's model_warmup did not run on both replicas:\n{log}"
    );
    assert!(
        log.contains("output.label_filename"),
        "an ignored field is not named in the log:\n{log}"
    );
    assert!(
        log.contains("both config.toml and config.pbtxt"),
        "the precedence is not said:\n{log}"
    );
}

#[test]
fn a_broken_config_pbtxt_stops_the_default_startup_naming_file_and_line() {
    let repo = triton_repo();
    std::fs::remove_dir_all(repo.path().join("ensemble")).unwrap();
    std::fs::remove_dir_all(repo.path().join("wrong_type")).unwrap();
    // Triton's older name of the flag.
    let err = common::failed_start(&[
        std::ffi::OsStr::new("--model-store"),
        repo.path().as_os_str(),
    ]);
    assert!(
        err.contains("syntax/config.pbtxt: line 3, column"),
        "the error names the file and line: {err}"
    );
    // A malformed Triton backend setting stops startup, naming it.
    let err = common::failed_start(&[
        std::ffi::OsStr::new("--model-store"),
        repo.path().as_os_str(),
        std::ffi::OsStr::new("--backend-config=onnxruntime,default-max-batch-size=-1"),
    ]);
    assert!(
        err.contains("\"onnxruntime,default-max-batch-size=-1\""),
        "{err}"
    );
}

#[tokio::test]
async fn tritons_flags_exit_on_error_strict_config_and_verbose_logs() {
    let repo = triton_repo();
    let s = common::Captured::start(
        repo.path(),
        &[
            "--exit-on-error=false",
            "--strict-model-config",
            "--log-verbose",
            "1",
        ],
        &[("RUST_LOG", "")],
    );
    let c = reqwest::Client::new();
    let ix = index(&c, &s.http).await;
    // Mode none, but one model's failure no longer stops the others.
    assert!(reason(&ix, "clf").contains("READY"), "{ix:?}");
    assert!(reason(&ix, "syntax").contains("line 3"), "{ix:?}");
    // Strict: a config that leaves the I/O to the graph is refused.
    for m in ["bare", "every"] {
        let r = reason(&ix, m);
        assert!(
            r.contains("UNAVAILABLE") && r.contains("--strict-model-config"),
            "{m}: {r}"
        );
    }
    // Changes are still refused in mode none.
    let r = c
        .post(format!("{}/v2/repository/models/bare/load", s.http))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
    let log = s.stop().join("\n");
    assert!(
        log.contains("DEBUG") && log.contains("reading Triton's config.pbtxt"),
        "--log-verbose 1 logs at debug level:\n{log}"
    );
}

/// A ResNet50 with room for one queued request: concurrent callers overflow it.
fn one_slot_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("slow");
    std::fs::create_dir_all(&m).unwrap();
    let src = common::model_repository().join("resnet50/1");
    std::os::unix::fs::symlink(std::fs::canonicalize(src).unwrap(), m.join("1")).unwrap();
    config(
        dir.path(),
        "slow",
        "config.pbtxt",
        r#"
backend: "onnxruntime"
max_batch_size: 1
dynamic_batching { default_queue_policy { max_queue_size: 1 } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"#,
    );
    dir
}

#[tokio::test]
async fn a_full_queue_answers_retryable_unavailable_with_a_retry_hint() {
    let repo = one_slot_repo();
    let s = common::Server::start_with_repo(repo.path(), &[]);
    let image = vec![0u8; 3 * 224 * 224 * 4];
    let head = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                    "parameters": {"binary_data_size": image.len()}}],
    }))
    .unwrap();
    let mut body = head.clone();
    body.extend_from_slice(&image);
    let c = reqwest::Client::new();
    let rest = (0..8).map(|_| {
        c.post(format!("{}/v2/models/slow/infer", s.http))
            .header("Inference-Header-Content-Length", head.len())
            .body(body.clone())
            .send()
    });
    let grpc = (0..8).map(|_| {
        let addr = s.grpc.clone();
        let image = image.clone();
        async move {
            let mut g = GrpcInferenceServiceClient::connect(addr).await.unwrap();
            g.model_infer(pb::ModelInferRequest {
                model_name: "slow".into(),
                inputs: vec![pb::model_infer_request::InferInputTensor {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 3, 224, 224],
                    ..Default::default()
                }],
                raw_input_contents: vec![image.into()],
                ..Default::default()
            })
            .await
        }
    });
    let (rest, grpc) = tokio::join!(
        futures::future::join_all(rest),
        futures::future::join_all(grpc)
    );
    let (mut ok, mut rejected) = (0, 0);
    for r in rest {
        let r = r.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            503 => {
                rejected += 1;
                assert_eq!(r.headers()["retry-after"], "1");
                assert_eq!(r.headers()["retry-after-ms"], "100");
            }
            other => panic!("REST answered {other}: {}", r.text().await.unwrap()),
        }
    }
    for r in grpc {
        match r {
            Ok(_) => ok += 1,
            Err(e) if e.code() == tonic::Code::Unavailable => {
                rejected += 1;
                assert_eq!(e.metadata().get("retry-after-ms").unwrap(), "100", "{e:?}");
            }
            Err(e) => panic!("gRPC answered {e:?}"),
        }
    }
    assert!(ok >= 1 && rejected >= 1, "ok {ok}, rejected {rejected}");
    assert_eq!(s.stop(), Some(0));
}

/// `model_warmup` as Triton's docs write it: every sample runs `count`
/// times on every replica before the model serves; a sample that does not
/// fit the model fails that model's load, naming the sample and why.
#[tokio::test]
async fn model_warmup_runs_every_sample_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for m in ["warm", "cold", "short_file", "no_such_input"] {
        version(r, m, 1, 1);
    }
    let warmup_dir = r.join("warm/warmup");
    std::fs::create_dir_all(&warmup_dir).unwrap();
    let row: Vec<f32> = ffnn_input(1, 3);
    std::fs::write(
        warmup_dir.join("row.bin"),
        bytemuck::cast_slice::<f32, u8>(&row),
    )
    .unwrap();
    config(
        r,
        "warm",
        "config.pbtxt",
        r#"
backend: "onnxruntime"
max_batch_size: 8
instance_group [ { count: 2 kind: KIND_CPU } ]
model_warmup [
  {
    name: "zeros"
    batch_size: 4
    count: 2
    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 784 ] zero_data: true } }
  },
  {
    name: "recorded"
    batch_size: 1
    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 784 ] input_data_file: "row.bin" } }
  },
  {
    name: "noise"
    batch_size: 8
    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 784 ] random_data: true } }
  }
]
"#,
    );
    config(
        r,
        "cold",
        "config.pbtxt",
        "backend: \"onnxruntime\"\nmax_batch_size: 8\n",
    );
    std::fs::create_dir_all(r.join("short_file/warmup")).unwrap();
    std::fs::write(r.join("short_file/warmup/row.bin"), [0u8; 100]).unwrap();
    config(
        r,
        "short_file",
        "config.pbtxt",
        "max_batch_size: 8\nmodel_warmup { name: \"rec\" batch_size: 1 inputs { key: \"input\" value { data_type: TYPE_FP32 dims: [784] input_data_file: \"row.bin\" } } }\n",
    );
    config(
        r,
        "no_such_input",
        "config.pbtxt",
        "max_batch_size: 8\nmodel_warmup { name: \"z\" batch_size: 1 inputs { key: \"nope\" value { data_type: TYPE_FP32 dims: [784] zero_data: true } } }\n",
    );
    // The default mode: a startup load, with --exit-on-error=false so the
    // broken samples fail their own models only.
    let s = common::Captured::start(r, &["--exit-on-error=false"], &[]);
    let c = reqwest::Client::new();

    // Before any client request: 2 + 1 + 1 runs on each of the 2 replicas,
    // and none of them in the statistics clients read.
    let metrics = common::get_text(&c, format!("{}/metrics", s.inner.metrics)).await;
    let per_replica: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("shoal_replica_requests_total{") && l.contains("model=\"warm\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(per_replica, vec![4.0, 4.0], "{metrics}");
    let stats: Value =
        common::get_json(&c, format!("{}/v2/models/warm/versions/1/stats", s.http)).await;
    assert_eq!(stats["model_stats"][0]["inference_count"], 0, "{stats}");
    let cfg: Value = common::get_json(&c, format!("{}/v2/models/warm/config", s.http)).await;
    assert_eq!(
        cfg["model_warmup"][1]["inputs"]["input"]["input_data_file"],
        "row.bin"
    );

    // The first ten requests of each, one at a time: p100 is the cold
    // start where there was no warm-up (printed for the record; a 2-core
    // machine's scheduling makes a bound on it flaky).
    for m in ["cold", "warm"] {
        let x = ffnn_input(1, 9);
        let mut times = Vec::new();
        for _ in 0..10 {
            let t = std::time::Instant::now();
            let y = common::rest_ffnn(&c, &s.http, m, &x).await;
            times.push(t.elapsed());
            assert_close(&y, &reference_ffnn(1, &x), 1e-5);
        }
        let mut sorted = times.clone();
        sorted.sort();
        eprintln!(
            "{m}: first {:?}, p100 {:?}, median {:?}",
            times[0], sorted[9], sorted[5]
        );
    }

    let ix = index(&c, &s.http).await;
    let short = reason(&ix, "short_file");
    assert!(
        short.contains("UNAVAILABLE") && short.contains("warmup/row.bin holds 100 bytes"),
        "{short}"
    );
    let nope = reason(&ix, "no_such_input");
    assert!(
        nope.contains("UNAVAILABLE") && nope.contains("no input \\\"nope\\\""),
        "{nope}"
    );
    let log = s.stop().join("\n");
    assert!(
        log.lines().any(|l| l.contains("warm-up done")
            && l.contains("model=warm")
            && l.contains("samples=3")),
        "{log}"
    );
}

/// `default-max-batch-size`: where Triton's onnxruntime backend would
/// auto-complete a config (a config.pbtxt that leaves the inputs or outputs
/// to the graph, or no config at all) and the graph can batch, the model
/// gets that max_batch_size and, with no scheduler named, the dynamic
/// batcher; a written max_batch_size, a config listing its I/O and
/// shoal's own config.toml keep what they say.
#[tokio::test]
async fn default_max_batch_size_autofills_where_triton_would() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for m in ["bare", "noconf", "sized", "listed", "native"] {
        version(r, m, 1, 1);
    }
    config(r, "bare", "config.pbtxt", "backend: \"onnxruntime\"\n");
    config(r, "sized", "config.pbtxt", "max_batch_size: 2\n");
    config(
        r,
        "listed",
        "config.pbtxt",
        "input [ { name: \"input\" data_type: TYPE_FP32 dims: [ -1, 784 ] } ]\noutput [ { name: \"output\" data_type: TYPE_FP32 dims: [ -1, 10 ] } ]\n",
    );
    config(r, "native", "config.toml", "");
    // A Triton command line: the backend's setting wins over the older
    // flag, and another backend's setting is ignored, saying so.
    let s = common::Captured::start(
        r,
        &[
            "--default-max-batch-size",
            "2",
            "--backend-config=onnxruntime,default-max-batch-size=4",
            "--backend-config=tensorflow,version=2",
        ],
        &[],
    );
    let c = reqwest::Client::new();

    for (model, mbs, batcher) in [
        ("bare", 4, true),
        ("noconf", 4, true),
        ("sized", 2, true),
        ("listed", 0, false),
        ("native", 0, false),
    ] {
        let cfg: Value = common::get_json(&c, format!("{}/v2/models/{model}/config", s.http)).await;
        assert_eq!(cfg["max_batch_size"], mbs, "{model}: {cfg}");
        let dims = if mbs > 0 {
            json!([784])
        } else {
            json!([-1, 784])
        };
        assert_eq!(cfg["input"][0]["dims"], dims, "{model}: {cfg}");
        assert_eq!(
            cfg.get("dynamic_batching").is_some(),
            batcher,
            "{model}: {cfg}"
        );
        // Clients see the same full shape either way.
        let md: Value = common::get_json(&c, format!("{}/v2/models/{model}", s.http)).await;
        assert_eq!(md["inputs"][0]["shape"], json!([-1, 784]), "{model}: {md}");
    }

    // The autofilled bound holds: four rows run, five are refused.
    let x = ffnn_input(4, 5);
    let y = common::rest_ffnn(&c, &s.http, "bare", &x).await;
    assert_close(&y, &reference_ffnn(1, &x), 1e-5);
    let r5 = c
        .post(format!("{}/v2/models/bare/infer", s.http))
        .json(&ffnn_infer_body(&ffnn_input(5, 5)))
        .send()
        .await
        .unwrap();
    assert_eq!(r5.status(), 400);
    let said = r5.text().await.unwrap();
    assert!(said.contains("exceeds max_batch_size 4"), "{said}");

    // Concurrent one-row requests are merged: some execution carries more
    // than one (bursts until one does; each request still gets its answer).
    let mut merged = false;
    for round in 0..20 {
        let calls = (0..32u32).map(|i| {
            let c = c.clone();
            let http = s.http.clone();
            async move {
                let x = ffnn_input(1, round * 100 + i);
                let y = common::rest_ffnn(&c, &http, "noconf", &x).await;
                assert_close(&y, &reference_ffnn(1, &x), 1e-5);
            }
        });
        futures::future::join_all(calls).await;
        let stats: Value = common::get_json(&c, format!("{}/v2/models/noconf/stats", s.http)).await;
        let sizes: Vec<u64> = stats["model_stats"][0]["batch_stats"]
            .as_array()
            .unwrap_or_else(|| panic!("{stats}"))
            .iter()
            .filter_map(|b| b["batch_size"].as_u64())
            .collect();
        assert!(sizes.iter().all(|&b| b <= 4), "{stats}");
        if sizes.iter().any(|&b| b > 1) {
            merged = true;
            break;
        }
    }
    assert!(
        merged,
        "32 concurrent requests were never batched, 20 times"
    );

    let log = s.stop().join("\n");
    assert!(
        log.lines()
            .any(|l| l.contains("autofilled max_batch_size") && l.contains("noconf")),
        "the autofill is not said in the log:\n{log}"
    );
    assert!(
        log.contains("\"tensorflow,version=2\" is ignored"),
        "an ignored backend setting is not said:\n{log}"
    );
}

#[tokio::test]
async fn a_config_pbtxt_parameter_sets_shoals_inline_execution_bound() {
    // Two models alike but for the parameter: a lone request on an idle
    // replica runs on the network thread (after eight measured runs),
    // unless the model's bound is 0.
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for m in ["inline", "replica_only"] {
        version(r, m, 1, 1);
    }
    config(r, "inline", "config.pbtxt", "backend: \"onnxruntime\"\n");
    config(
        r,
        "replica_only",
        "config.pbtxt",
        "backend: \"onnxruntime\"\nparameters { key: \"inline_execution_max_us\" value: { string_value: \"0\" } }\n",
    );
    let s = common::Server::start_with_repo(r, &[]);
    let c = reqwest::Client::new();
    let input = ffnn_input(1, 3);
    for model in ["inline", "replica_only"] {
        for _ in 0..20 {
            let y = common::rest_ffnn(&c, &s.http, model, &input).await;
            assert_close(&y, &reference_ffnn(1, &input), 1e-4);
        }
    }
    let text = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    let inline = |m: &str| {
        let model = format!("model=\"{m}\"");
        common::metric_sum(&text, "shoal_replica_inline_executions_total", &[&model])
    };
    assert!(inline("inline") >= 10.0, "{text}");
    assert_eq!(inline("replica_only"), 0.0, "{text}");
    // A bound that is not a number stops the model's load, naming it.
    let bad = tempfile::tempdir().unwrap();
    version(bad.path(), "m", 1, 1);
    config(
        bad.path(),
        "m",
        "config.pbtxt",
        "parameters { key: \"inline_execution_max_us\" value: { string_value: \"soon\" } }\n",
    );
    let err = common::failed_start(&["--model-repository", bad.path().to_str().unwrap()]);
    assert!(
        err.contains("inline_execution_max_us") && err.contains("not a whole number"),
        "{err}"
    );
}
