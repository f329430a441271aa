//! The TorchScript backend (`--features torch`): the same weights give the same outputs through ONNX Runtime and
//! libtorch, the real binary serves a TorchScript model with batching next to its ONNX twin, a config that does not
//! match the module fails the request clearly, and GPU placement fails (or, for `auto`, falls back) on a machine
//! without CUDA.
#![cfg(feature = "torch")]

mod common;

use common::{assert_close, ffnn_input, model_repository, reference_ffnn, Server};
use serde_json::{json, Value};
use shoal::backend::torch::TorchBackend;
use shoal::backend::{Backend, BackendOptions, BatchInput, Signature, TensorSpec};
use shoal::engine::EngineOptions;
use shoal::gpu::Placement;
use shoal::tensor::DataType;
use shoal::Engine;
use std::path::Path;

fn spec(name: &str, datatype: DataType, shape: &[i64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    }
}

fn ffnn_signature() -> Signature {
    Signature {
        inputs: vec![spec("input", DataType::Fp32, &[-1, 784])],
        outputs: vec![spec("output", DataType::Fp32, &[-1, 10])],
    }
}

fn torch_model(name: &str) -> std::path::PathBuf {
    let p = model_repository().join(name).join("1/model.pt");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

fn run(backend: &mut dyn Backend, shape: Vec<i64>, parts: Vec<&[u8]>) -> Vec<f32> {
    let out = backend
        .run(&[BatchInput {
            name: "input",
            datatype: DataType::Fp32,
            shape,
            parts,
        }])
        .unwrap_or_else(|e| panic!("{e}"));
    bytemuck::pod_collect_to_vec(&out[0].data)
}

#[test]
fn ffnn_torchscript_matches_onnx_batched_and_alone() {
    let mut torch = TorchBackend::load(
        &torch_model("ffnn_torch"),
        ffnn_signature(),
        Placement::Cpu,
        1,
    )
    .unwrap();
    assert_eq!(torch.execution_provider(), "libtorch:cpu");
    let input = ffnn_input(7, 11);
    let want = reference_ffnn(1, &input);
    // One batch of three parts (2 + 4 + 1 rows), as the batcher hands them over.
    let bytes: &[u8] = bytemuck::cast_slice(&input);
    let row = 784 * 4;
    let parts = vec![
        &bytes[..2 * row],
        &bytes[2 * row..6 * row],
        &bytes[6 * row..],
    ];
    let got = run(&mut torch, vec![7, 784], parts);
    assert_close(&got, &want, 1e-5);
    let alone = run(&mut torch, vec![1, 784], vec![&bytes[..row]]);
    assert_close(&alone, &want[..10], 1e-5);
}

#[test]
fn resnet50_torchscript_matches_onnx() {
    let onnx_path = model_repository().join("resnet50/1/model.onnx");
    let opts = BackendOptions {
        intra_op_threads: 2,
        ..BackendOptions::default()
    };
    let mut onnx = shoal::backend::ort::OrtBackend::load(&onnx_path, &opts).unwrap();
    let sig = Signature {
        inputs: vec![spec("input", DataType::Fp32, &[-1, 3, 224, 224])],
        outputs: vec![spec("output", DataType::Fp32, &[-1, 1000])],
    };
    let mut torch =
        TorchBackend::load(&torch_model("resnet50_torch"), sig, Placement::Cpu, 2).unwrap();
    let input: Vec<f32> = ffnn_input(2 * 3 * 224 * 224 / 784, 5);
    let bytes: &[u8] = bytemuck::cast_slice(&input);
    let want = run(&mut onnx, vec![2, 3, 224, 224], vec![bytes]);
    let got = run(&mut torch, vec![2, 3, 224, 224], vec![bytes]);
    // 50 layers of float32 convolutions summed in different orders (oneDNN vs MLAS): compare relative to the
    // logits' scale.
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    assert_close(&got, &want, 1e-3 * scale);
}

#[test]
fn config_that_does_not_fit_the_module_fails_the_request_not_the_replica() {
    let path = torch_model("ffnn_torch");
    // Declares 783 features: libtorch's matmul refuses, and the error says where to look.
    let narrow = Signature {
        inputs: vec![spec("input", DataType::Fp32, &[-1, 783])],
        outputs: vec![spec("output", DataType::Fp32, &[-1, 10])],
    };
    let mut b = TorchBackend::load(&path, narrow, Placement::Cpu, 1).unwrap();
    let data = vec![0u8; 783 * 4];
    let err = b
        .run(&[BatchInput {
            name: "input",
            datatype: DataType::Fp32,
            shape: vec![1, 783],
            parts: vec![&data],
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.toml"), "{err}");

    // Declares INT64 output: the module answers FP32, which the error names.
    let wrong_out = Signature {
        inputs: vec![spec("input", DataType::Fp32, &[-1, 784])],
        outputs: vec![spec("output", DataType::Int64, &[-1, 10])],
    };
    let mut b = TorchBackend::load(&path, wrong_out, Placement::Cpu, 1).unwrap();
    let ok = vec![0u8; 784 * 4];
    let input = || BatchInput {
        name: "input",
        datatype: DataType::Fp32,
        shape: vec![1, 784],
        parts: vec![&ok],
    };
    let err = b.run(&[input()]).unwrap_err().to_string();
    assert!(err.contains("Float") && err.contains("INT64"), "{err}");

    // Two outputs declared, one returned.
    let mut two = ffnn_signature();
    two.outputs.push(spec("extra", DataType::Fp32, &[-1, 10]));
    let mut b = TorchBackend::load(&path, two, Placement::Cpu, 1).unwrap();
    let err = b.run(&[input()]).unwrap_err().to_string();
    assert!(
        err.contains("1 output(s)") && err.contains("declares 2"),
        "{err}"
    );

    // Bytes that do not fill the shape, and an unknown input name, are errors too; the backend still works after.
    let mut b = TorchBackend::load(&path, ffnn_signature(), Placement::Cpu, 1).unwrap();
    let short = vec![0u8; 100];
    let err = b
        .run(&[BatchInput {
            name: "input",
            datatype: DataType::Fp32,
            shape: vec![1, 784],
            parts: vec![&short],
        }])
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fill"), "{err}");
    let err = b
        .run(&[
            input(),
            BatchInput {
                name: "nope",
                datatype: DataType::Fp32,
                shape: vec![1, 784],
                parts: vec![&ok],
            },
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown input nope"), "{err}");
    assert_eq!(run(&mut b, vec![1, 784], vec![&ok]).len(), 10);
}

#[test]
fn missing_io_declarations_and_bytes_types_fail_at_load() {
    let path = torch_model("ffnn_torch");
    let err = TorchBackend::load(&path, Signature::default(), Placement::Cpu, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[[input]]"), "{err}");
    let bytes = Signature {
        inputs: vec![spec("input", DataType::Bytes, &[-1])],
        outputs: vec![spec("output", DataType::Fp32, &[-1, 10])],
    };
    let err = TorchBackend::load(&path, bytes, Placement::Cpu, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("BYTES"), "{err}");
    let err = TorchBackend::load(
        Path::new("/nonexistent/model.pt"),
        ffnn_signature(),
        Placement::Cpu,
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/model.pt"), "{err}");
}

/// A repository holding only `ffnn_torch`, with `extra` appended to its config.
fn torch_repo(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("ffnn_torch");
    std::fs::create_dir_all(m.join("1")).unwrap();
    std::fs::copy(torch_model("ffnn_torch"), m.join("1/model.pt")).unwrap();
    let cfg = std::fs::read_to_string(model_repository().join("ffnn_torch/config.toml")).unwrap();
    let cfg = cfg.replace("device = \"cpu\"\n", "");
    std::fs::write(m.join("config.toml"), format!("{extra}\n{cfg}")).unwrap();
    dir
}

#[test]
fn cuda_without_a_gpu_fails_to_load_and_auto_falls_back_to_the_cpu() {
    if !shoal::gpu::discover().is_empty() {
        eprintln!("a GPU is present: the no-GPU behavior is not what this machine shows");
        return;
    }
    for device in ["\"cuda\"", "\"cuda:0\"", "[\"cpu\", \"cuda:1\"]"] {
        let repo = torch_repo(&format!("device = {device}"));
        let err = match Engine::load(repo.path(), &EngineOptions::default()) {
            Ok(_) => panic!("device = {device} loaded without a GPU"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("no CUDA GPU is available") && err.contains("auto"),
            "{device}: {err}"
        );
    }
    let repo = torch_repo("device = \"bogus\"");
    let err = Engine::load(repo.path(), &EngineOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("bogus") && err.contains("cuda:N"), "{err}");

    let repo = torch_repo("device = \"auto\"\ninstance_count = 2");
    let repo_text = std::fs::read_to_string(repo.path().join("ffnn_torch/config.toml")).unwrap();
    let repo_text = repo_text.replace("instance_count = 1\n", "");
    std::fs::write(repo.path().join("ffnn_torch/config.toml"), repo_text).unwrap();
    let engine =
        Engine::load(repo.path(), &EngineOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let mv = engine.model("ffnn_torch", None).unwrap();
    let providers: Vec<&str> = mv
        .replicas
        .iter()
        .map(|r| r.execution_provider.as_str())
        .collect();
    assert_eq!(providers, ["libtorch:cpu", "libtorch:cpu"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_batches_torchscript_next_to_its_onnx_twin() {
    let repo = tempfile::tempdir().unwrap();
    for m in ["ffnn", "ffnn_torch"] {
        std::os::unix::fs::symlink(model_repository().join(m), repo.path().join(m)).unwrap();
    }
    let s = Server::start_with_repo(repo.path(), &[]);
    let c = reqwest::Client::new();

    let md: Value = common::get_json(&c, format!("{}/v2/models/ffnn_torch", s.http)).await;
    assert_eq!(md["platform"], "pytorch_libtorch", "{md}");
    assert_eq!(md["execution_providers"], json!(["libtorch:cpu"]), "{md}");
    assert_eq!(md["inputs"][0]["shape"], json!([-1, 784]), "{md}");
    let cfg: Value = common::get_json(&c, format!("{}/v2/models/ffnn_torch/config", s.http)).await;
    assert_eq!(cfg["backend"], "pytorch", "{cfg}");

    // 32 concurrent requests of 1-3 rows to each model: the torch model batches them and both answer alike.
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        // ffnn_torch is traced from ffnn version 1 (the default would be version 2).
        for model in ["ffnn/versions/1", "ffnn_torch"] {
            let c = c.clone();
            let url = format!("{}/v2/models/{model}/infer", s.http);
            tasks.push(tokio::spawn(async move {
                let rows = 1 + (i as usize % 3);
                let input = ffnn_input(rows, i);
                let body = json!({"inputs": [{"name": "input", "shape": [rows, 784], "datatype": "FP32", "data": input}]});
                let v: Value = c.post(url).json(&body).send().await.unwrap().json().await.unwrap();
                let out: Vec<f32> = serde_json::from_value(v["outputs"][0]["data"].clone())
                    .unwrap_or_else(|_| panic!("{model}: {v}"));
                (i, model, out)
            }));
        }
    }
    for t in tasks {
        let (i, model, out) = t.await.unwrap();
        let rows = 1 + (i as usize % 3);
        assert_close(&out, &reference_ffnn(1, &ffnn_input(rows, i)), 1e-5);
        assert_eq!(out.len(), rows * 10, "{model}");
    }

    let stats: Value = common::get_json(&c, format!("{}/v2/models/ffnn_torch/stats", s.http)).await;
    let st = &stats["model_stats"][0];
    assert_eq!(st["inference_count"], 63, "{stats}"); // 32 requests of 1, 2, 3, 1, ... rows
    assert!(st["execution_count"].as_u64().unwrap() <= 32, "{stats}");

    // A request the module cannot take is a clear 400, and the model keeps serving.
    let body = json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP64", "data": vec![0.0; 784]}]});
    let r = c
        .post(format!("{}/v2/models/ffnn_torch/infer", s.http))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    let metrics = common::get_text(&c, format!("{}/metrics", s.metrics)).await;
    let has = |needle: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with(needle) || l.contains(needle))
    };
    assert!(
        has("shoal_replica_execution_provider{") && metrics.contains("provider=\"libtorch:cpu\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("provider=\"CPUExecutionProvider\""),
        "{metrics}"
    );
    if shoal::gpu::discover().is_empty() {
        assert!(metrics.lines().any(|l| l == "shoal_gpus 0"), "{metrics}");
    }
    assert_eq!(s.stop(), Some(0));
}

#[test]
fn exporter_traces_the_onnx_weights_and_refuses_foreign_files() {
    use shoal::backend::torch_export::export;
    let dir = tempfile::tempdir().unwrap();
    let onnx = model_repository().join("ffnn/2/model.onnx");
    let pt = dir.path().join("v2/model.pt");
    export("ffnn", &onnx, &pt).unwrap();
    let mut torch = TorchBackend::load(&pt, ffnn_signature(), Placement::Cpu, 1).unwrap();
    let input = ffnn_input(3, 2);
    let got = run(&mut torch, vec![3, 784], vec![bytemuck::cast_slice(&input)]);
    assert_close(&got, &reference_ffnn(2, &input), 1e-5);

    let err = export("resnet50", &onnx, &dir.path().join("r.pt"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conv1.weight") && err.contains("not a resnet50"),
        "{err}"
    );
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"\xff\xff\xff not protobuf").unwrap();
    let err = export("ffnn", &junk, &dir.path().join("j.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an ONNX model"), "{err}");
    let err = export("vgg", &onnx, &dir.path().join("v.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown architecture"), "{err}");
    assert!(!dir.path().join("r.pt").exists() && !dir.path().join("v.pt").exists());
}
