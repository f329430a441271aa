//! `shoal-noop`, the transport baseline of scripts/transport_gap.sh: the
//! real binary on port 0 answers what perf_analyzer asks over gRPC and
//! REST (binary extension and JSON), with outputs of the declared shape.

mod common;

use common::{get_json, post_json};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Noop {
    child: Child,
    grpc: String,
    http: String,
}

impl Drop for Noop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Noop {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal-noop"))
        .args(["--grpc-port", "0", "--http-port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = |what: &str| {
        let line = lines.next().expect("an address line").unwrap();
        let a = line
            .strip_prefix(what)
            .unwrap_or_else(|| panic!("{line:?}"));
        format!("http://{}", a.trim())
    };
    let grpc = addr("grpc");
    let http = addr("http");
    Noop { child, grpc, http }
}

#[tokio::test]
async fn noop_answers_metadata_config_and_infer_on_both_protocols() {
    let s = start(&[]);
    let mut c = GrpcInferenceServiceClient::connect(s.grpc.clone())
        .await
        .unwrap();
    let cfg = c
        .model_config(pb::ModelConfigRequest {
            name: "ffnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(
        (cfg.max_batch_size, cfg.input[0].dims.clone()),
        (64, vec![784])
    );
    let meta = c
        .model_metadata(pb::ModelMetadataRequest {
            name: "ffnn".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.outputs[0].shape, vec![-1, 10]);
    let mut request = common::ffnn_grpc_request(&[0.0; 3 * 784]);
    request.id = "7".into();
    let r = c.model_infer(request).await.unwrap().into_inner();
    assert_eq!(
        (r.id.as_str(), r.outputs[0].shape.clone()),
        ("7", vec![3, 10])
    );
    assert_eq!(r.raw_output_contents[0].len(), 3 * 10 * 4);
    let unknown = c
        .model_config(pb::ModelConfigRequest {
            name: "other".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // REST with the binary extension, as perf_analyzer sends it.
    let http = reqwest::Client::new();
    let header = serde_json::json!({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 784],
                    "parameters": {"binary_data_size": 2 * 784 * 4}}],
        "outputs": [{"name": "output", "parameters": {"binary_data": true}}],
    });
    let mut body = serde_json::to_vec(&header).unwrap();
    let header_len = body.len();
    body.resize(header_len + 2 * 784 * 4, 0);
    let r = http
        .post(format!("{}/v2/models/ffnn/infer", s.http))
        .header("inference-header-content-length", header_len)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(head["outputs"][0]["shape"], serde_json::json!([2, 10]));
    assert_eq!(bytes.len() - json_len, 2 * 10 * 4);
    // Plain JSON: the zeros as data.
    let plain = serde_json::json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": vec![0.0; 784]}]});
    let r = post_json(&http, format!("{}/v2/models/ffnn/infer", s.http), &plain).await;
    assert_eq!(r["outputs"][0]["data"].as_array().unwrap().len(), 10);
    let server: serde_json::Value = get_json(&http, format!("{}/v2", s.http)).await;
    assert_eq!(server["name"], "shoal-noop");
    let cfg: serde_json::Value = get_json(&http, format!("{}/v2/models/ffnn/config", s.http)).await;
    assert_eq!(cfg["output"][0]["data_type"], "TYPE_FP32");
}

#[test]
fn noop_refuses_a_malformed_tensor_spec() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-noop"))
        .args(["--grpc-port", "0", "--http-port", "0", "--input", "x:FP32"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NAME:DATATYPE:DIMS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
