//! Starts the real `shoal` binary on port 0 and stops it with SIGTERM.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

pub struct Server {
    pub child: Child,
    pub http: String,
    pub grpc: String,
    pub metrics: String,
}

impl Server {
    pub fn start(extra: &[&str]) -> Self {
        Self::start_with_repo(&model_repository(), extra)
    }

    pub fn start_with_repo(repo: &std::path::Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("--model-repository")
            .arg(repo)
            .args([
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn shoal");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("shoal listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!(
                    "shoal did not print its listening line: {:?}",
                    child.try_wait()
                )
            });
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap()
                .to_string()
        };
        Self {
            http: format!("http://{}", field("http")),
            grpc: format!("http://{}", field("grpc")),
            metrics: format!("http://{}", field("metrics")),
            child,
        }
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.sigterm();
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "shoal did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

impl Server {
    /// Waits for an exit already requested with [`Server::sigterm`].
    pub fn stop_after_signal(mut self) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "shoal did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
