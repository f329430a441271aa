//! Overload (issue 16, property 1), against the real binary: ResNet50 on
//! one replica, offered three times the rate it sustains, over HTTP/1.1
//! keep-alive, HTTP/2 and gRPC at once. Every request is answered or
//! refused with a status that carries the retry hint (503 / UNAVAILABLE
//! with `retry-after-ms`), never a reset or a 500; the server's memory
//! stays under a bound computed from its queue and message sizes; and one
//! second after the overload stops, a single request is as fast as idle.

mod common;

use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const QUEUE: usize = 8;
const BATCH: usize = 4;
const ELEMENTS: usize = 3 * 224 * 224;
const REQUEST_BYTES: u64 = (ELEMENTS * 4) as u64;

fn resnet_repo() -> tempfile::TempDir {
    common::repo_of(
        "resnet50",
        "resnet50",
        &format!(
            "platform = \"onnxruntime_onnx\"\nmax_batch_size = {BATCH}\ninstance_count = 1\n\
             intra_op_threads = 1\n[dynamic_batching]\nmax_queue_delay_us = 2000\n\
             max_queue_size = {QUEUE}\n"
        ),
    )
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Answered,
    /// Refused for overload, with the retry hint.
    Refused,
    Other(String),
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Http1,
    Http2,
    Grpc,
}

#[derive(Clone)]
struct Clients {
    h1: reqwest::Client,
    h2: reqwest::Client,
    grpc: GrpcInferenceServiceClient<Channel>,
    url: String,
    body: bytes::Bytes,
    header_len: usize,
    input: bytes::Bytes,
}

impl Clients {
    async fn new(s: &common::Server) -> Self {
        let data = vec![0.5f32; ELEMENTS];
        let input = bytes::Bytes::copy_from_slice(bytemuck::cast_slice(&data));
        let header = serde_json::json!({
            "inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                        "parameters": {"binary_data_size": input.len()}}],
            "outputs": [{"name": "output", "parameters": {"binary_data": true}}]
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&input);
        let grpc = GrpcInferenceServiceClient::connect(s.grpc.clone())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20);
        Self {
            h1: reqwest::Client::builder().http1_only().build().unwrap(),
            h2: reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap(),
            grpc,
            url: format!("{}/v2/models/resnet50/infer", s.http),
            body: body.into(),
            header_len: header.len(),
            input,
        }
    }

    async fn call(&self, p: Proto) -> Outcome {
        match p {
            Proto::Http1 | Proto::Http2 => {
                let c = if matches!(p, Proto::Http1) {
                    &self.h1
                } else {
                    &self.h2
                };
                let r = c
                    .post(&self.url)
                    .header("Inference-Header-Content-Length", self.header_len)
                    .body(self.body.clone())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(_) => Outcome::Answered,
                        Err(e) => Outcome::Other(format!("{p:?} body: {e}")),
                    },
                    Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after-ms") => {
                        Outcome::Refused
                    }
                    Ok(r) => Outcome::Other(format!("{p:?} status {}", r.status())),
                    Err(e) => Outcome::Other(format!("{p:?} {e:?}")),
                }
            }
            Proto::Grpc => {
                let req = shoal_proto::ModelInferRequest {
                    model_name: "resnet50".into(),
                    inputs: vec![shoal_proto::model_infer_request::InferInputTensor {
                        name: "input".into(),
                        datatype: "FP32".into(),
                        shape: vec![1, 3, 224, 224],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![self.input.clone()],
                    ..Default::default()
                };
                match self.grpc.clone().model_infer(req).await {
                    Ok(_) => Outcome::Answered,
                    Err(s)
                        if s.code() == tonic::Code::Unavailable
                            && s.metadata().get("retry-after-ms").is_some() =>
                    {
                        Outcome::Refused
                    }
                    Err(s) => Outcome::Other(format!("gRPC {s:?}")),
                }
            }
        }
    }

    /// Median latency of ten single requests, one at a time.
    async fn single_latency(&self) -> Duration {
        let mut lat = Vec::new();
        for _ in 0..10 {
            let t = Instant::now();
            assert_eq!(self.call(Proto::Grpc).await, Outcome::Answered);
            lat.push(t.elapsed());
        }
        lat.sort();
        lat[5]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_the_sustained_load_is_answered_or_refused_with_a_hint_in_bounded_memory() {
    let repo = resnet_repo();
    let s = common::Server::start_with_repo(repo.path(), &[]);
    let c = Clients::new(&s).await;
    let idle = c.single_latency().await;

    // What one replica sustains: four clients back to back (batches of up
    // to four, and the queue of eight never fills).
    let window = Duration::from_secs(2);
    let t = Instant::now();
    let mut loops = Vec::new();
    for i in 0..BATCH {
        let c = c.clone();
        loops.push(tokio::spawn(async move {
            let mut n = 0usize;
            let p = [Proto::Grpc, Proto::Http1, Proto::Http2][i % 3];
            while t.elapsed() < window {
                assert_eq!(c.call(p).await, Outcome::Answered);
                n += 1;
            }
            n
        }));
    }
    let mut done = 0;
    for l in loops {
        done += l.await.unwrap();
    }
    let sustained = done as f64 / t.elapsed().as_secs_f64();
    let base = s.rss();

    // Three times that, open loop, the three protocols in turn.
    let rate = 3.0 * sustained;
    let (pid, sampling) = (s.pid(), Arc::new(AtomicBool::new(true)));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (t, mut samples) = (Instant::now(), Vec::new());
            while sampling.load(Ordering::Relaxed) {
                samples.push((t.elapsed(), common::rss_of(pid)));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut most_in_flight = 0;
    let mut calls = Vec::new();
    let overload = Duration::from_secs(6);
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < overload {
        let due = t + Duration::from_secs_f64(sent as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let p = [Proto::Http1, Proto::Http2, Proto::Grpc][(sent % 3) as usize];
        let (c, in_flight) = (c.clone(), in_flight.clone());
        most_in_flight = most_in_flight.max(in_flight.fetch_add(1, Ordering::Relaxed) + 1);
        calls.push(tokio::spawn(async move {
            let o = c.call(p).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            o
        }));
        sent += 1;
    }
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap());
    }
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let peak_in = |from: u64, to: u64| {
        samples
            .iter()
            .filter(|(t, _)| (from..to).contains(&(t.as_millis() as u64)))
            .map(|&(_, rss)| rss)
            .max()
            .unwrap_or(0)
    };
    let peak = peak_in(0, u64::MAX);
    // An unbounded queue would grow by the excess rate times the request
    // size, about 25 MiB a second here.
    let (early, late) = (peak_in(0, 2000), peak_in(4000, 6000));
    let answered = outcomes.iter().filter(|o| **o == Outcome::Answered).count();
    let refused = outcomes.iter().filter(|o| **o == Outcome::Refused).count();
    let other: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Other(_)))
        .take(5)
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = c.single_latency().await;

    // Admitted requests hold their input decoded and, over REST, the body
    // it came in; a refused one holds its body until refused. Beside them,
    // allocator slack (per-thread arenas that keep what they freed).
    let admitted = (QUEUE + BATCH) as u64;
    let bound = base + (admitted + most_in_flight as u64) * 2 * REQUEST_BYTES + (64 << 20);
    eprintln!(
        "sustained {sustained:.1} req/s; offered {rate:.1} req/s for {overload:?}: {sent} sent, \
         {answered} answered, {refused} refused with the hint, {} other; at most {most_in_flight} \
         in flight; RSS {} MiB before, peak {} MiB (first 2 s {} MiB, last 2 s {} MiB), bound {} MiB; single request {idle:?} idle, \
         {after:?} one second after",
        outcomes.len() - answered - refused,
        base >> 20,
        peak >> 20,
        early >> 20,
        late >> 20,
        bound >> 20
    );
    assert!(
        other.is_empty(),
        "neither answered nor refused with a hint: {other:?}"
    );
    assert!(refused > 0, "the load was not an overload");
    // The replica kept working at its pace while refusing the excess.
    assert!(
        answered as f64 >= 0.5 * sustained * overload.as_secs_f64(),
        "{answered} answered"
    );
    assert!(
        peak <= bound,
        "RSS peaked at {peak} bytes, over the bound {bound}"
    );
    assert!(
        late <= early + (16 << 20),
        "RSS grew under steady overload: {} MiB in its first two seconds, {} MiB in its last two",
        early >> 20,
        late >> 20
    );
    assert!(
        after <= idle.mul_f64(1.5) + Duration::from_millis(20),
        "single-request latency {after:?} a second after the overload, {idle:?} idle"
    );
    assert_eq!(s.stop(), Some(0));
}
