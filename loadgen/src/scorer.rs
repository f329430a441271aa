//! How a processor task scores an event: the shoal engine in-process
//! (embedded), any KServe v2 server over gRPC or REST (external), or, to
//! measure the pipeline itself, a no-op and a synthetic fixed service time.

use crate::event::{Event, Outcome};
use bytes::Bytes;
use shoal::tensor::{DataType, Tensor};
use shoal::{Engine, EngineError, InferRequest};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::time::Duration;

/// The model an event is scored against.
#[derive(Debug, Clone)]
pub struct Target {
    pub model: String,
    pub input: String,
    /// Shape of one data point (without the batch dimension).
    pub shape: Vec<i64>,
}

/// A scorer; cloned once per processor task.
#[derive(Clone)]
pub enum Scorer {
    Embedded {
        engine: Engine,
        target: Target,
    },
    Grpc {
        client: GrpcInferenceServiceClient<tonic::transport::Channel>,
        target: Target,
    },
    Rest {
        client: reqwest::Client,
        url: String,
        target: Target,
    },
    Noop,
    /// shoal consumes the input topic itself: the pipeline hands the whole
    /// run to [`crate::native::run`], so no processor task scores with it.
    KafkaNative(crate::native::Target),
    /// Blocks a thread for this long per event: a processor with a known
    /// capacity, for testing the analyzer.
    Synthetic(Duration),
    /// Like `Synthetic`, but the event with this sequence number stalls for
    /// the given time first.
    Stall {
        service: Duration,
        at_seq: u64,
        stall: Duration,
    },
}

impl Scorer {
    pub async fn score(&mut self, e: &Event) -> Outcome {
        match self {
            Scorer::Noop => Outcome::Scored,
            // Never reached: `pipeline::run_live` runs this mode without
            // processors. A processor that got it anyway scored nothing.
            Scorer::KafkaNative(_) => Outcome::TransportError,
            Scorer::Synthetic(d) => {
                let d = *d;
                let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
                Outcome::Scored
            }
            Scorer::Stall {
                service,
                at_seq,
                stall,
            } => {
                let d = if e.seq == *at_seq {
                    *service + *stall
                } else {
                    *service
                };
                let _ = tokio::task::spawn_blocking(move || std::thread::sleep(d)).await;
                Outcome::Scored
            }
            Scorer::Embedded { engine, target } => {
                let shape = std::iter::once(e.rows as i64)
                    .chain(target.shape.iter().copied())
                    .collect();
                let req = InferRequest {
                    model: target.model.clone(),
                    correlation_key: e.key.clone(),
                    inputs: vec![Tensor {
                        name: target.input.clone(),
                        datatype: DataType::Fp32,
                        shape,
                        data: e.payload.clone(),
                    }],
                    ..Default::default()
                };
                match engine.infer(req).await {
                    Ok(_) => Outcome::Scored,
                    Err(EngineError::Overloaded(_)) => Outcome::Rejected,
                    Err(EngineError::DeadlineExceeded) => Outcome::TimedOut,
                    Err(_) => Outcome::TransportError,
                }
            }
            Scorer::Grpc { client, target } => {
                let mut req = pb::ModelInferRequest {
                    model_name: target.model.clone(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: target.input.clone(),
                        datatype: "FP32".into(),
                        shape: std::iter::once(e.rows as i64)
                            .chain(target.shape.iter().copied())
                            .collect(),
                        ..Default::default()
                    }],
                    raw_input_contents: vec![e.payload.clone()],
                    ..Default::default()
                };
                if let Some(k) = &e.key {
                    req.parameters.insert(
                        "correlation_key".into(),
                        pb::InferParameter {
                            parameter_choice: Some(
                                pb::infer_parameter::ParameterChoice::StringParam(k.clone()),
                            ),
                        },
                    );
                }
                match client.model_infer(req).await {
                    Ok(_) => Outcome::Scored,
                    // shoal and Triton answer a full queue UNAVAILABLE
                    // (older shoal: RESOURCE_EXHAUSTED).
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                        ) =>
                    {
                        Outcome::Rejected
                    }
                    Err(s) if s.code() == tonic::Code::DeadlineExceeded => Outcome::TimedOut,
                    Err(_) => Outcome::TransportError,
                }
            }
            Scorer::Rest {
                client,
                url,
                target,
            } => {
                let shape: Vec<i64> = std::iter::once(e.rows as i64)
                    .chain(target.shape.iter().copied())
                    .collect();
                let header = serde_json::json!({
                    "inputs": [{"name": target.input, "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": e.payload.len()}}],
                    "parameters": {"binary_data_output": true},
                });
                let head = serde_json::to_vec(&header).expect("JSON serializes");
                let mut body = Vec::with_capacity(head.len() + e.payload.len());
                body.extend_from_slice(&head);
                body.extend_from_slice(&e.payload);
                let mut r = client
                    .post(url.as_str())
                    .header("Inference-Header-Content-Length", head.len())
                    .body(Bytes::from(body));
                if let Some(k) = &e.key {
                    r = r.header("x-correlation-key", k);
                }
                match r.send().await {
                    Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                        Ok(_) => Outcome::Scored,
                        Err(_) => Outcome::TransportError,
                    },
                    Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) => Outcome::Rejected,
                    Ok(resp) if resp.status() == 504 => Outcome::TimedOut,
                    _ => Outcome::TransportError,
                }
            }
        }
    }
}
