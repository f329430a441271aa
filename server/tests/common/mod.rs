//! Starts the real `shoal` binary on port 0 and stops it with SIGTERM.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_repository() -> PathBuf {
    let p = repo_root().join("model_repository");
    assert!(
        p.join("ffnn/1/model.onnx").exists(),
        "{}/ffnn/1/model.onnx is missing: run scripts/setup.sh to generate the models",
        p.display()
    );
    p
}

/// A one-model repository serving version 1 of the reference model `src`
/// as `name`, with `config` as its config.toml.
pub fn repo_of(src: &str, name: &str, config: &str) -> tempfile::TempDir {
    let from = model_repository().join(src).join("1");
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join(name);
    std::fs::create_dir_all(&m).unwrap();
    std::os::unix::fs::symlink(std::fs::canonicalize(from).unwrap(), m.join("1")).unwrap();
    std::fs::write(m.join("config.toml"), config).unwrap();
    dir
}

/// A one-model repository holding the FFNN's version 1 under `ffnn`, with
/// `config` after the platform line of its config.toml.
pub fn ffnn_repo_with_config(config: &str) -> tempfile::TempDir {
    repo_of(
        "ffnn",
        "ffnn",
        &format!("platform = \"onnxruntime_onnx\"\nintra_op_threads = 1\n{config}"),
    )
}

/// GET `url` and its body parsed as JSON; panics on a transport error or
/// a body that does not parse, so a test reads as its assertions.
pub async fn get_json<T: serde::de::DeserializeOwned>(c: &reqwest::Client, url: String) -> T {
    c.get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// POST `body` as JSON to `url` and its answer parsed as JSON.
pub async fn post_json(
    c: &reqwest::Client,
    url: String,
    body: &serde_json::Value,
) -> serde_json::Value {
    c.post(&url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// A gRPC ModelInfer request for the FFNN with `input` as raw contents
/// (rows of 784).
pub fn ffnn_grpc_request(input: &[f32]) -> shoal_proto::ModelInferRequest {
    shoal_proto::ModelInferRequest {
        model_name: "ffnn".into(),
        inputs: vec![shoal_proto::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![(input.len() / 784) as i64, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![bytes::Bytes::copy_from_slice(bytemuck::cast_slice(input))],
        ..Default::default()
    }
}

/// A REST inference request of `input` (rows of 784) for the FFNN.
pub fn ffnn_infer_body(input: &[f32]) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "input", "shape": [input.len() / 784, 784], "datatype": "FP32", "data": input}]})
}

/// A JSON array of numbers as f32s.
pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Starts the binary on `args` (port 0 where they name none), expecting it to fail
/// at startup within two minutes; returns what it wrote on stderr.
pub fn failed_start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    use std::io::Read;
    let given = |flag: &str| args.iter().any(|a| a.as_ref() == flag);
    let ports = ["--http-port", "--grpc-port", "--metrics-port"]
        .into_iter()
        .filter(|f| !given(f))
        .flat_map(|f| [f, "0"]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(ports)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the shoal binary starts");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    // Read on a thread, so a chatty child cannot block on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "shoal started with {:?}",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    assert!(!status.success(), "shoal exited 0 on a failed start: {err}");
    err
}

/// `input` (rows of the FFNN's 784 values) through `model`'s REST infer
/// at `http`: the first output's values.
pub async fn rest_ffnn(c: &reqwest::Client, http: &str, model: &str, input: &[f32]) -> Vec<f32> {
    let url = format!("{http}/v2/models/{model}/infer");
    f32s(&post_json(c, url, &ffnn_infer_body(input)).await["outputs"][0]["data"])
}

/// GET `url` and its body as text.
pub async fn get_text(c: &reqwest::Client, url: String) -> String {
    c.get(&url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// The sum of the samples of metric `name` (exactly that name: not its
/// `_bucket` or `_count` series) whose labels include each of `labels`
/// (`model="ffnn"`), in a Prometheus text page; 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            let set = l.split_once('{').and_then(|(_, r)| r.split_once('}'));
            let set = set.map_or("", |(set, _)| set);
            labels
                .iter()
                .all(|want| set.split(',').any(|have| have == *want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The real binary on port 0, stopped with SIGTERM by the tests that
/// check its exit, killed otherwise.
pub struct Server {
    inner: shoal::launch::Launched,
    pub http: String,
    pub grpc: String,
    pub metrics: String,
    /// Unix socket paths the listening line reported.
    pub http_uds: Option<PathBuf>,
    pub grpc_uds: Option<PathBuf>,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_repo(&model_repository(), extra)
    }

    pub fn start_with_repo(repo: &std::path::Path, extra: &[&str]) -> Self {
        let log = std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let inner = shoal::launch::Launched::start(
            Path::new(env!("CARGO_BIN_EXE_shoal")),
            repo,
            extra,
            &log,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Self {
            http: inner.http.clone(),
            grpc: inner.grpc.clone(),
            metrics: inner.metrics.clone(),
            http_uds: inner.http_uds.clone(),
            grpc_uds: inner.grpc_uds.clone(),
            inner,
        }
    }

    pub fn sigterm(&self) {
        self.inner.sigterm();
    }

    pub fn pid(&self) -> u32 {
        self.inner.child.id()
    }

    /// The server's resident memory now, in bytes.
    pub fn rss(&self) -> u64 {
        rss_of(self.pid())
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(self) -> Option<i32> {
        self.sigterm();
        self.stop_after_signal()
    }

    /// Waits for an exit already requested with [`Server::sigterm`].
    pub fn stop_after_signal(mut self) -> Option<i32> {
        self.inner
            .wait_exit(Duration::from_secs(30))
            .expect("shoal did not exit after SIGTERM")
    }
}

pub fn ffnn_input(rows: usize, seed: u32) -> Vec<f32> {
    // A small deterministic generator: tests need no extra crates.
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..rows * 784)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 1000) as f32 / 1000.0
        })
        .collect()
}

/// The reference: the same model run in-process through ONNX Runtime.
pub fn reference_ffnn(version: u32, input: &[f32]) -> Vec<f32> {
    use shoal::backend::{Backend, BackendOptions, BatchInput};
    let path = model_repository().join(format!("ffnn/{version}/model.onnx"));
    let mut b = shoal::backend::ort::OrtBackend::load(&path, &BackendOptions::default()).unwrap();
    let rows = input.len() / 784;
    let out = b
        .run(&[BatchInput {
            name: "input",
            datatype: shoal::tensor::DataType::Fp32,
            shape: vec![rows as i64, 784],
            parts: vec![bytemuck::cast_slice(input)],
        }])
        .unwrap();
    bytemuck::pod_collect_to_vec(&out[0].data)
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "element {i}: {g} vs {w}");
    }
}

/// Runs `promtool check metrics` on a Prometheus exposition and fails the
/// test with promtool's complaint when it rejects it.
pub fn promtool_check(text: &str) {
    promtool_check_allowing(text, |_| false);
}

/// [`promtool_check`], accepting lint complaints (one a line) that
/// `allowed` says are expected; a parse error always fails.
pub fn promtool_check_allowing(text: &str, allowed: impl Fn(&str) -> bool) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits 1 on a parse error and 3 on lint problems only.
    let lint_only = out.status.code() == Some(3);
    assert!(
        out.status.success()
            || (lint_only && said.lines().filter(|l| !l.trim().is_empty()).all(&allowed)),
        "promtool: {said}"
    );
}

/// The binary with its stderr read here, for the tests that read its log
/// or set its environment.
pub struct Captured {
    pub inner: shoal::launch::Launched,
    pub http: String,
    pub grpc: String,
}

impl Captured {
    pub fn start(repo: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let inner = shoal::launch::Launched::start_with(
            Path::new(env!("CARGO_BIN_EXE_shoal")),
            repo,
            extra,
            &shoal::launch::Options {
                log: "info",
                env,
                capture_stderr: true,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        Self {
            http: inner.http.clone(),
            grpc: inner.grpc.clone(),
            inner,
        }
    }

    /// SIGTERM, wait for a clean exit, and every stderr line it wrote.
    pub fn stop(mut self) -> Vec<String> {
        self.inner.sigterm();
        let code = self
            .inner
            .wait_exit(Duration::from_secs(30))
            .expect("shoal did not exit after SIGTERM");
        assert_eq!(code, Some(0), "shoal's exit code");
        let stderr = self.inner.stderr.take().expect("stderr is captured");
        let mut lines = Vec::new();
        while let Ok(l) = stderr.recv_timeout(Duration::from_secs(2)) {
            lines.push(l);
        }
        lines
    }
}

/// A process's resident memory (VmRSS), in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/<pid>/status")
        * 1024
}
