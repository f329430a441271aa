//! Model control on the real binary: the repository index, load, unload
//! and reload over REST and gRPC, the three control modes, the bearer
//! token, a broken model beside good ones, and a reload under a steady
//! stream of requests that must lose none.

mod common;

use common::{assert_close, ffnn_input, reference_ffnn, Server};
use serde_json::{json, Value};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A repository of copies (not links), so a test can change it: ffnn
/// (versions 1 and 2), ffnn_nobatch, and a model whose file is not ONNX.
fn writable_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::model_repository();
    for m in ["ffnn", "ffnn_nobatch"] {
        copy_model(&src.join(m), &dir.path().join(m));
    }
    let broken = dir.path().join("broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.onnx"), b"not an onnx graph").unwrap();
    dir
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_model(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

async fn index(c: &reqwest::Client, s: &Server) -> Vec<Value> {
    let r = c
        .post(format!("{}/v2/repository/index", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Vec<Value>>().await.unwrap()
}

/// The index lines of one model, as (version, state, reason).
fn lines(index: &[Value], model: &str) -> Vec<(String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    index
        .iter()
        .filter(|e| e["name"] == model)
        .map(|e| (s(&e["version"]), s(&e["state"]), s(&e["reason"])))
        .collect()
}

async fn post(c: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let r = c.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn infer_http(c: &reqwest::Client, s: &Server, model: &str) -> (u16, Value) {
    let input = ffnn_input(1, 3);
    post(
        c,
        format!("{}/v2/models/{model}/infer", s.http),
        json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": input}]}),
    )
    .await
}

#[tokio::test]
async fn explicit_mode_loads_on_request_and_unloads() {
    let repo = writable_repo();
    let s = Server::start_with_repo(repo.path(), &["--model-control-mode", "explicit"]);
    let c = reqwest::Client::new();

    // Nothing loaded without --load-model; the index lists the repository.
    let ix = index(&c, &s).await;
    assert_eq!(
        lines(&ix, "ffnn"),
        vec![(String::new(), String::new(), String::new())]
    );
    assert_eq!(infer_http(&c, &s, "ffnn").await.0, 404);

    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/ffnn/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let ix = index(&c, &s).await;
    assert_eq!(
        lines(&ix, "ffnn"),
        vec![
            ("1".into(), "READY".into(), String::new()),
            ("2".into(), "READY".into(), String::new())
        ]
    );
    let (status, v) = infer_http(&c, &s, "ffnn").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model_version"], "2");
    assert_close(
        &v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect::<Vec<_>>(),
        &reference_ffnn(2, &ffnn_input(1, 3)),
        1e-6,
    );
    // The warm-up is not counted as traffic.
    let stats: Value =
        common::get_json(&c, format!("{}/v2/models/ffnn/versions/1/stats", s.http)).await;
    assert_eq!(stats["model_stats"][0]["inference_count"], 0, "{stats}");

    // Only READY lines with ready=true.
    let r: Vec<Value> = c
        .post(format!("{}/v2/repository/index", s.http))
        .json(&json!({"ready": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        r.iter().all(|e| e["state"] == "READY") && r.len() == 2,
        "{r:?}"
    );

    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/ffnn/unload", s.http),
        json!({"parameters": {"unload_dependents": false}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(infer_http(&c, &s, "ffnn").await.0, 404);
    let ready = c
        .get(format!("{}/v2/models/ffnn/ready", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 404);
    let ix = index(&c, &s).await;
    assert_eq!(
        lines(&ix, "ffnn"),
        vec![
            ("1".into(), "UNAVAILABLE".into(), "unloaded".into()),
            ("2".into(), "UNAVAILABLE".into(), "unloaded".into())
        ]
    );

    // Unknown models: a clear 404 for both.
    let (status, v) = post(
        &c,
        format!("{}/v2/repository/models/nope/unload", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/nope/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
    // A path is not a model name.
    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/..%2Fffnn/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
    // Config overrides are refused, not ignored.
    let (status, v) = post(
        &c,
        format!("{}/v2/repository/models/ffnn/load", s.http),
        json!({"parameters": {"config": "{}"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");

    // The broken model fails with its reason, and ffnn_nobatch still loads.
    let (status, v) = post(
        &c,
        format!("{}/v2/repository/models/broken/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("broken"), "{v}");
    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/ffnn_nobatch/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let ix = index(&c, &s).await;
    let b = lines(&ix, "broken");
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].0.as_str(), b[0].1.as_str()), ("1", "UNAVAILABLE"));
    assert!(!b[0].2.is_empty(), "a failed load says why");
    assert_eq!(lines(&ix, "ffnn_nobatch")[0].1, "READY");

    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn grpc_repository_calls_and_codes() {
    let repo = writable_repo();
    let s = Server::start_with_repo(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "ffnn"],
    );
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let ix = g
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ffnn: Vec<_> = ix.models.iter().filter(|m| m.name == "ffnn").collect();
    assert_eq!(ffnn.len(), 2);
    assert!(ffnn.iter().all(|m| m.state == "READY"));
    assert!(ix
        .models
        .iter()
        .any(|m| m.name == "ffnn_nobatch" && m.state.is_empty()));

    let unknown = g
        .repository_model_unload(pb::RepositoryModelUnloadRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    g.repository_model_load(pb::RepositoryModelLoadRequest {
        model_name: "ffnn_nobatch".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ready = g
        .model_ready(pb::ModelReadyRequest {
            name: "ffnn_nobatch".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    g.repository_model_unload(pb::RepositoryModelUnloadRequest {
        model_name: "ffnn_nobatch".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ready = g
        .model_ready(pb::ModelReadyRequest {
            name: "ffnn_nobatch".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ready.ready);

    let broken = g
        .repository_model_load(pb::RepositoryModelLoadRequest {
            model_name: "broken".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(broken.code(), tonic::Code::InvalidArgument);
    let other_repo = g
        .repository_index(pb::RepositoryIndexRequest {
            repository_name: "elsewhere".into(),
            ready: false,
        })
        .await
        .unwrap_err();
    assert_eq!(other_repo.code(), tonic::Code::InvalidArgument);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn none_mode_serves_everything_and_refuses_changes() {
    let repo = tempfile::tempdir().unwrap();
    copy_model(
        &common::model_repository().join("ffnn"),
        &repo.path().join("ffnn"),
    );
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();
    let ix = index(&c, &s).await;
    assert_eq!(lines(&ix, "ffnn").len(), 2);
    assert!(lines(&ix, "ffnn").iter().all(|l| l.1 == "READY"));
    let (status, v) = post(
        &c,
        format!("{}/v2/repository/models/ffnn/unload", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("explicit"), "{v}");
    assert_eq!(infer_http(&c, &s, "ffnn").await.0, 200);
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let e = g
        .repository_model_load(pb::RepositoryModelLoadRequest {
            model_name: "ffnn".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn bearer_token_and_turned_off_api() {
    let repo = tempfile::tempdir().unwrap();
    copy_model(
        &common::model_repository().join("ffnn"),
        &repo.path().join("ffnn"),
    );
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--model-control-mode",
            "explicit",
            "--repository-token",
            "s3cret",
        ],
    );
    let c = reqwest::Client::new();
    let url = format!("{}/v2/repository/models/ffnn/load", s.http);
    let r = c.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = c.post(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.post(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v2/repository/index", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Inference needs no token.
    assert_eq!(infer_http(&c, &s, "ffnn").await.0, 200);

    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let e = g
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::RepositoryIndexRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        g.repository_index(req).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let mut req = tonic::Request::new(pb::RepositoryIndexRequest::default());
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(g.repository_index(req).await.is_ok());
    assert_eq!(s.stop(), Some(0));

    let s = Server::start_with_repo(repo.path(), &["--repository-api=false"]);
    let r = c
        .post(format!("{}/v2/repository/index", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let e = g
        .repository_index(pb::RepositoryIndexRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(s.stop(), Some(0));
}

/// Clients that send FFNN requests (no version: the latest) until told to
/// stop, over REST and gRPC; they count answers by version and failures.
struct Stream {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    versions: Arc<parking_lot::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stream {
    async fn start(s: &Server, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let versions = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..clients {
            let (stop, ok, failed, versions) =
                (stop.clone(), ok.clone(), failed.clone(), versions.clone());
            let input = ffnn_input(1, i as u32);
            if i % 2 == 0 {
                let url = format!("{}/v2/models/ffnn/infer", s.http);
                tasks.push(tokio::spawn(async move {
                    let c = reqwest::Client::new();
                    let body = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": input}]});
                    while !stop.load(Ordering::Relaxed) {
                        match c.post(&url).json(&body).send().await {
                            Ok(r) if r.status() == 200 => {
                                let v: Value = r.json().await.unwrap();
                                ok.fetch_add(1, Ordering::Relaxed);
                                let ver = v["model_version"].as_str().unwrap().to_string();
                                let mut vs = versions.lock();
                                if vs.last() != Some(&ver) {
                                    vs.push(ver);
                                }
                            }
                            Ok(r) => {
                                eprintln!("REST failure {}: {}", r.status(), r.text().await.unwrap_or_default());
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                eprintln!("REST failure: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            } else {
                let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
                    .await
                    .unwrap();
                tasks.push(tokio::spawn(async move {
                    let req = pb::ModelInferRequest {
                        model_name: "ffnn".into(),
                        inputs: vec![pb::model_infer_request::InferInputTensor {
                            name: "input".into(),
                            datatype: "FP32".into(),
                            shape: vec![1, 784],
                            ..Default::default()
                        }],
                        raw_input_contents: vec![bytemuck::cast_slice::<f32, u8>(&input)
                            .to_vec()
                            .into()],
                        ..Default::default()
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match g.model_infer(req.clone()).await {
                            Ok(r) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let ver = r.into_inner().model_version;
                                let mut vs = versions.lock();
                                if vs.last() != Some(&ver) {
                                    vs.push(ver);
                                }
                            }
                            Err(e) => {
                                eprintln!("gRPC failure: {e}");
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
        Self {
            stop,
            ok,
            failed,
            versions,
            tasks,
        }
    }

    /// Waits until `n` more requests succeeded.
    async fn progress(&self, n: u64) {
        let start = self.ok.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.ok.load(Ordering::Relaxed) < start + n {
            assert!(t.elapsed() < Duration::from_secs(60), "requests stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let v = self.versions.lock().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            v,
        )
    }
}

#[tokio::test]
async fn reload_under_steady_requests_loses_none() {
    let repo = writable_repo();
    let s = Server::start_with_repo(
        repo.path(),
        &["--model-control-mode", "explicit", "--load-model", "ffnn"],
    );
    let c = reqwest::Client::new();
    let load = format!("{}/v2/repository/models/ffnn/load", s.http);
    let stream = Stream::start(&s, 8).await;
    stream.progress(50).await;

    // A new version: 3 (a copy of 1) takes over from 2.
    copy_model(&repo.path().join("ffnn/1"), &repo.path().join("ffnn/3"));
    assert_eq!(post(&c, load.clone(), json!({})).await.0, 200);
    stream.progress(50).await;

    // The same version with a changed config: replaced in place.
    let cfg = repo.path().join("ffnn/config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let changed = text.replace("instance_count = 1", "instance_count = 2");
    assert_ne!(changed, text, "the test expects ffnn with one instance");
    for round in 0..10 {
        let t = if round % 2 == 0 { &changed } else { &text };
        std::fs::write(&cfg, t).unwrap();
        assert_eq!(post(&c, load.clone(), json!({})).await.0, 200);
        stream.progress(20).await;
    }

    // Version 3 removed from disk: 2 is the latest again.
    std::fs::remove_dir_all(repo.path().join("ffnn/3")).unwrap();
    assert_eq!(post(&c, load.clone(), json!({})).await.0, 200);
    stream.progress(50).await;

    // A broken reload (version 3 is not ONNX) leaves 1 and 2 serving.
    std::fs::create_dir_all(repo.path().join("ffnn/3")).unwrap();
    std::fs::write(repo.path().join("ffnn/3/model.onnx"), b"garbage").unwrap();
    let (status, v) = post(&c, load.clone(), json!({})).await;
    assert_eq!(status, 400, "{v}");
    stream.progress(50).await;

    // A broken reload of the serving version 2 (its file replaced by
    // garbage): the old load of 2 keeps serving, and the index says why.
    let v2 = repo.path().join("ffnn/2/model.onnx");
    let good = std::fs::read(&v2).unwrap();
    std::fs::write(&v2, b"garbage").unwrap();
    let (status, v) = post(&c, load.clone(), json!({})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("version 2"), "{v}");
    stream.progress(50).await;
    let f = lines(&index(&c, &s).await, "ffnn");
    assert!(
        f.iter()
            .any(|l| l.0 == "2" && l.1 == "READY" && l.2.contains("reloading failed")),
        "{f:?}"
    );
    std::fs::write(&v2, good).unwrap();

    let (ok, failed, versions) = stream.finish().await;
    eprintln!("{ok} requests answered across the reloads; versions seen {versions:?}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(versions.contains(&"3".to_string()), "{versions:?}");
    assert_eq!(
        versions.last().map(String::as_str),
        Some("2"),
        "{versions:?}"
    );

    let ix = index(&c, &s).await;
    let f = lines(&ix, "ffnn");
    assert!(
        f.contains(&("1".into(), "READY".into(), String::new())),
        "{f:?}"
    );
    assert!(f.iter().any(|l| l.0 == "2" && l.1 == "READY"), "{f:?}");
    assert!(
        f.iter()
            .any(|l| l.0 == "3" && l.1 == "UNAVAILABLE" && !l.2.is_empty()),
        "{f:?}"
    );
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn poll_mode_follows_the_repository() {
    let repo = writable_repo();
    std::fs::remove_dir_all(repo.path().join("ffnn_nobatch")).unwrap();
    let s = polling(&repo);
    let c = reqwest::Client::new();
    // The broken model does not keep the others from serving.
    assert_eq!(infer_http(&c, &s, "ffnn").await.0, 200);
    let ix = index(&c, &s).await;
    assert_eq!(lines(&ix, "broken")[0].1, "UNAVAILABLE");
    let (status, _) = post(
        &c,
        format!("{}/v2/repository/models/ffnn/load", s.http),
        json!({}),
    )
    .await;
    assert_eq!(status, 503, "poll mode refuses explicit loads");

    let wait_for = |model: &'static str, want: u16| {
        let c = c.clone();
        let url = format!("{}/v2/models/{model}/ready", s.http);
        async move {
            let t = Instant::now();
            loop {
                let st = c.get(&url).send().await.unwrap().status().as_u16();
                if st == want {
                    return;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{model} never answered {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // A new model appears.
    copy_model(
        &common::model_repository().join("ffnn_nobatch"),
        &repo.path().join("ffnn_nobatch"),
    );
    wait_for("ffnn_nobatch", 200).await;
    // A new version appears.
    copy_model(&repo.path().join("ffnn/1"), &repo.path().join("ffnn/7"));
    wait_for_version(&c, &s, "7").await;
    // A model disappears.
    std::fs::remove_dir_all(repo.path().join("ffnn_nobatch")).unwrap();
    wait_for("ffnn_nobatch", 404).await;
    // The broken model is fixed.
    copy_model(&repo.path().join("ffnn/1"), &repo.path().join("broken/1"));
    std::fs::copy(
        repo.path().join("ffnn/config.toml"),
        repo.path().join("broken/config.toml"),
    )
    .unwrap();
    wait_for("broken", 200).await;
    assert_eq!(s.stop(), Some(0));
}

/// The binary on `repo` in poll mode, polling every second.
fn polling(repo: &tempfile::TempDir) -> Server {
    Server::start_with_repo(
        repo.path(),
        &[
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            "1",
        ],
    )
}

async fn wait_for_version(c: &reqwest::Client, s: &Server, version: &str) {
    let t = Instant::now();
    loop {
        let (status, v) = infer_http(c, s, "ffnn").await;
        if status == 200 && v["model_version"] == version {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "version {version} never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One accumulator step (x = [1, 0, 0, 0]) for `key`; y is the key's sum.
async fn accumulate(
    g: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    key: &str,
) -> f32 {
    let x = [1.0f32, 0.0, 0.0, 0.0];
    let mut r = pb::ModelInferRequest {
        model_name: "accumulator".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&x))],
        ..Default::default()
    };
    r.parameters.insert(
        "correlation_key".into(),
        pb::InferParameter {
            parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                key.into(),
            )),
        },
    );
    let out = g.model_infer(r).await.unwrap().into_inner();
    let y: Vec<f32> = bytemuck::pod_collect_to_vec(&out.raw_output_contents[0]);
    y[0]
}

#[tokio::test]
async fn unload_drops_keyed_state() {
    let repo = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::model_repository().join("accumulator"),
        repo.path().join("accumulator"),
    )
    .unwrap();
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--model-control-mode",
            "explicit",
            "--load-model",
            "accumulator",
        ],
    );
    let mut g = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    for want in 1..=3 {
        assert_eq!(accumulate(&mut g, "k").await, want as f32);
    }
    for call in ["unload", "load"] {
        let c = reqwest::Client::new();
        let (status, v) = post(
            &c,
            format!("{}/v2/repository/models/accumulator/{call}", s.http),
            json!({}),
        )
        .await;
        assert_eq!(status, 200, "{call}: {v}");
    }
    assert_eq!(accumulate(&mut g, "k").await, 1.0, "the key starts afresh");
    assert_eq!(s.stop(), Some(0));
}

/// `--shm-token`: registering, unregistering and listing shared-memory
/// regions need the bearer token on both protocols; inference does not.
#[tokio::test]
async fn the_shm_token_guards_shared_memory_registration() {
    let s = common::Server::start(&["--shm-token", "t0k"]);
    let c = reqwest::Client::new();
    // A POSIX shared-memory object of our own (shm_open's /dev/shm/<name>).
    let key = format!("shoal_token_test_{}", std::process::id());
    let path = std::path::Path::new("/dev/shm").join(&key);
    std::fs::write(&path, vec![0u8; 64]).unwrap();
    let register = |auth: Option<&'static str>| {
        let mut r = c
            .post(format!(
                "{}/v2/systemsharedmemory/region/r/register",
                s.http
            ))
            .json(&json!({"key": format!("/{key}"), "offset": 0, "byte_size": 64}));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(register(None).await.unwrap().status(), 401);
    assert_eq!(register(Some("Bearer nope")).await.unwrap().status(), 403);
    assert_eq!(register(Some("Bearer t0k")).await.unwrap().status(), 200);
    let status = |auth: Option<&'static str>| {
        let mut r = c.get(format!("{}/v2/systemsharedmemory/status", s.http));
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    assert_eq!(status(None).await.unwrap().status(), 401);
    assert_eq!(status(Some("Bearer t0k")).await.unwrap().status(), 200);
    let unregister = c
        .post(format!("{}/v2/systemsharedmemory/unregister", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(unregister.status(), 401);

    let mut g = shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient::connect(
        s.grpc.clone(),
    )
    .await
    .unwrap();
    let req = || shoal_proto::SystemSharedMemoryRegisterRequest {
        name: "g".into(),
        key: format!("/{key}"),
        offset: 0,
        byte_size: 64,
    };
    let e = g.system_shared_memory_register(req()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut authed = tonic::Request::new(req());
    authed
        .metadata_mut()
        .insert("authorization", "Bearer t0k".parse().unwrap());
    g.system_shared_memory_register(authed).await.unwrap();
    let e = g
        .system_shared_memory_unregister(shoal_proto::SystemSharedMemoryUnregisterRequest {
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(s.stop(), Some(0));
}

/// Faults under poll mode (issue 16, property 8): the serving version's
/// file corrupted in place, then deleted. Each failed reload leaves the
/// loaded version serving, the index says why, and no request fails; the
/// file put back is picked up again.
#[tokio::test]
async fn poll_mode_keeps_serving_through_a_corrupted_or_deleted_model_file() {
    let repo = writable_repo();
    std::fs::remove_dir_all(repo.path().join("broken")).unwrap();
    let s = polling(&repo);
    let c = reqwest::Client::new();
    let stream = Stream::start(&s, 4).await;
    stream.progress(50).await;
    let v2 = repo.path().join("ffnn/2/model.onnx");
    let good = std::fs::read(&v2).unwrap();
    let reason_of_2 = |ix: &[Value]| {
        lines(ix, "ffnn")
            .into_iter()
            .find(|l| l.0 == "2")
            .map(|l| (l.1, l.2))
    };
    let wait_reason = |want: &'static str| {
        let (c, s) = (c.clone(), &s);
        async move {
            let t = Instant::now();
            loop {
                let r = reason_of_2(&index(&c, s).await);
                if r.as_ref().is_some_and(|(_, why)| why.contains(want)) {
                    return r.unwrap();
                }
                assert!(t.elapsed() < Duration::from_secs(20), "index of 2: {r:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Corrupted in place (truncated half way, as a copy cut short would).
    std::fs::write(&v2, &good[..good.len() / 2]).unwrap();
    let (state, why) = wait_reason("reloading failed").await;
    assert_eq!(state, "READY", "{why}");
    stream.progress(50).await;
    // Deleted.
    std::fs::remove_file(&v2).unwrap();
    // Two polls later, 2 still serves from memory.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (state, why) = reason_of_2(&index(&c, &s).await).unwrap();
    eprintln!("version 2 after its file was deleted: {state}, {why}");
    assert_eq!(state, "READY", "{why}");
    stream.progress(50).await;
    // Put back: a clean reload clears the reason.
    std::fs::write(&v2, &good).unwrap();
    let t = Instant::now();
    while reason_of_2(&index(&c, &s).await).is_some_and(|(_, why)| !why.is_empty()) {
        assert!(t.elapsed() < Duration::from_secs(20), "never reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.progress(50).await;
    let (ok, failed, versions) = stream.finish().await;
    eprintln!("{ok} requests answered through the faults; versions seen {versions:?}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert_eq!(s.stop(), Some(0));
}
