//! How a processor task scores an event: the shoal engine in-process
//! (embedded), any KServe v2 server over gRPC or REST (external), or, to
//! measure the pipeline itself, a no-op and a synthetic fixed service time.

use crate::event::{Event, Outcome};
use bytes::Bytes;
use shoal::tensor::{DataType, Tensor};
use shoal::{Engine, EngineError, InferRequest};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::time::{Duration, Instant};

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
    /// Serves one event per `service` on a blocking thread: a processor
    /// with a known capacity, for testing the analyzer. Built by
    /// [`Scorer::synthetic`].
    Synthetic {
        service: Duration,
        /// The run's start, which `scheduled_ns` counts from; set by the
        /// pipeline through [`Scorer::clock_starts`].
        t0: Option<Instant>,
        /// When the last event's service ended, on the ideal schedule.
        free_at: Option<Instant>,
    },
    /// Like `Synthetic`, but the event with this sequence number stalls for
    /// the given time first.
    Stall {
        service: Duration,
        at_seq: u64,
        stall: Duration,
    },
}

impl Scorer {
    /// A processor task that serves one event per `service`: its capacity
    /// is exactly `1 / service` while it has a backlog, however much the
    /// sleeps it paces itself with overrun.
    pub fn synthetic(service: Duration) -> Self {
        Scorer::Synthetic {
            service,
            t0: None,
            free_at: None,
        }
    }

    /// The run's clock starts at `t0`: a synthetic scorer schedules its
    /// service from the events' `scheduled_ns`, which count from there.
    pub fn clock_starts(&mut self, t0: Instant) {
        if let Scorer::Synthetic {
            t0: start, free_at, ..
        } = self
        {
            *start = Some(t0);
            *free_at = None;
        }
    }

    pub async fn score(&mut self, e: &Event) -> Outcome {
        match self {
            Scorer::Noop => Outcome::Scored,
            // Never reached: `pipeline::run_live` runs this mode without
            // processors. A processor that got it anyway scored nothing.
            Scorer::KafkaNative(_) => Outcome::TransportError,
            Scorer::Synthetic {
                service,
                t0,
                free_at,
            } => {
                // The event's service starts when it was due or when the
                // one before it ended, whichever is later: the completion
                // times of an ideal server fed on the producer's schedule.
                // Sleeping until then, rather than for `service` from now,
                // keeps a loaded machine's sleep overruns (a 5 ms sleep
                // took 5.7 ms in CI) and the pipeline's own delays from
                // coming off the capacity the tests reason with.
                let now = Instant::now();
                let due = t0.map_or(now, |t0| t0 + Duration::from_nanos(e.scheduled_ns));
                let done = free_at.map_or(due, |f| f.max(due)) + *service;
                *free_at = Some(done);
                let _ = tokio::task::spawn_blocking(move || {
                    std::thread::sleep(done.saturating_duration_since(Instant::now()))
                })
                .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, scheduled: Duration) -> Event {
        Event {
            seq,
            scheduled_ns: scheduled.as_nanos() as u64,
            key: None,
            rows: 1,
            payload: Bytes::new(),
        }
    }

    fn free_at(s: &Scorer) -> Instant {
        match s {
            Scorer::Synthetic { free_at, .. } => free_at.expect("an event was served"),
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn a_synthetic_task_ends_its_events_on_the_ideal_schedule() {
        let service = Duration::from_millis(5);
        let mut s = Scorer::synthetic(service);
        // A backlog: ten events all due at the start, 50 ms ago. Their
        // ideal ends are all past, so they take no time now, and the
        // next one ends 5 ms after the tenth whatever the sleeps took.
        let t0 = Instant::now() - Duration::from_millis(50);
        s.clock_starts(t0);
        for seq in 0..10 {
            assert_eq!(s.score(&event(seq, Duration::ZERO)).await, Outcome::Scored);
        }
        assert_eq!(free_at(&s), t0 + 10 * service);
        s.score(&event(10, Duration::ZERO)).await;
        assert_eq!(free_at(&s), t0 + 11 * service);
        assert!(Instant::now() >= t0 + 11 * service);
        // An event due after the task went idle starts when it is due.
        let due = Duration::from_millis(80);
        s.score(&event(11, due)).await;
        assert_eq!(free_at(&s), t0 + due + service);
        assert!(Instant::now() >= t0 + due + service);
        // A new run starts from a clean slate.
        let t1 = Instant::now();
        s.clock_starts(t1);
        s.score(&event(0, Duration::ZERO)).await;
        assert_eq!(free_at(&s), t1 + service);
    }
}
