//! What compression costs and gains on the reference models' payloads, in
//! one run: for an FFNN request (one 28x28 digit-like image, 81% zeros as in
//! MNIST, as JSON and as the binary extension) and a ResNet50 request (one
//! 3x224x224 image of 8-bit pixels normalized to FP32, binary), each codec's
//! size on the wire, compress and decompress time in-process, and the REST
//! round trip against the real server on loopback with the request body and
//! the answer compressed or not (sequential requests, median and p90).
//!
//! `cargo bench --bench compression` (`-- --quick` for fewer requests).
//! The payloads are synthetic but shaped like real inputs: random floats
//! would not compress and all-zero tensors would compress absurdly well.

use serde_json::json;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Codec {
    Identity,
    Gzip,
    Zstd,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Identity => "identity",
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
        }
    }
    fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::Identity => data.to_vec(),
            Codec::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Codec::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }
    fn decompress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::Identity => data.to_vec(),
            Codec::Gzip => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(data)
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            Codec::Zstd => zstd::decode_all(data).unwrap(),
        }
    }
}

/// xorshift, so the payloads are the same in every run.
struct Rng(u32);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
}

/// A digit-like 28x28 image: a thick stroke on a zero background, values
/// in [0, 1] with 8-bit steps.
fn digit() -> Vec<f32> {
    let mut r = Rng(7);
    let mut img = vec![0f32; 784];
    for t in 0..200 {
        let a = t as f32 / 200.0 * 5.5;
        let (cx, cy) = (14.0 + 7.0 * a.cos(), 14.0 + 9.0 * (a * 0.7).sin());
        for dy in -1i32..=1 {
            for dx in -1i32..=1 {
                let (x, y) = (cx as i32 + dx, cy as i32 + dy);
                if (0..28).contains(&x) && (0..28).contains(&y) {
                    img[(y * 28 + x) as usize] = (155 + r.next() % 101) as f32 / 255.0;
                }
            }
        }
    }
    img
}

/// A photo-like image: smooth gradients plus sensor noise, 8-bit pixels
/// normalized with ImageNet's mean and deviation, channel-first.
fn photo() -> Vec<f32> {
    let mut r = Rng(11);
    let (mean, std) = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]);
    let mut out = Vec::with_capacity(3 * 224 * 224);
    for c in 0..3 {
        for y in 0..224 {
            for x in 0..224 {
                let base =
                    128.0 + 60.0 * ((x as f32 / 37.0 + c as f32).sin() * (y as f32 / 53.0).cos());
                let px = (base + (r.next() % 9) as f32 - 4.0)
                    .clamp(0.0, 255.0)
                    .round();
                out.push((px / 255.0 - mean[c]) / std[c]);
            }
        }
    }
    out
}

struct Payload {
    name: &'static str,
    model: &'static str,
    body: Vec<u8>,
    /// `Inference-Header-Content-Length` for a binary body.
    header_len: Option<usize>,
}

fn json_payload(name: &'static str, model: &'static str, shape: &[usize], data: &[f32]) -> Payload {
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
    }))
    .unwrap();
    Payload {
        name,
        model,
        body,
        header_len: None,
    }
}

fn binary_payload(
    name: &'static str,
    model: &'static str,
    shape: &[usize],
    data: &[f32],
) -> Payload {
    let head = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": data.len() * 4}}],
        "parameters": {"binary_data_output": true},
    }))
    .unwrap();
    let mut body = head.clone();
    body.extend_from_slice(bytemuck::cast_slice(data));
    Payload {
        name,
        model,
        body,
        header_len: Some(head.len()),
    }
}

fn time_it(n: usize, mut f: impl FnMut()) -> Duration {
    let t0 = Instant::now();
    for _ in 0..n {
        f();
    }
    t0.elapsed() / n as u32
}

fn quantile(v: &mut [Duration], q: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        repo.join("resnet50/1/model.onnx").is_file(),
        "run scripts/setup.sh first"
    );
    let d = digit();
    let p = photo();
    let payloads = [
        json_payload("ffnn JSON", "ffnn", &[1, 784], &d),
        binary_payload("ffnn binary", "ffnn", &[1, 784], &d),
        binary_payload("resnet50 binary", "resnet50", &[1, 3, 224, 224], &p),
    ];
    let codecs = [Codec::Identity, Codec::Gzip, Codec::Zstd];

    println!("in-process, per request body:");
    println!(
        "| payload | codec | bytes | ratio | compress µs | decompress µs |\n|---|---|---:|---:|---:|---:|"
    );
    for pl in &payloads {
        for &c in &codecs {
            let z = c.compress(&pl.body);
            assert_eq!(c.decompress(&z), pl.body);
            let reps = if pl.body.len() > 100_000 { 20 } else { 500 };
            let tc = time_it(reps, || drop(c.compress(&pl.body)));
            let td = time_it(reps, || drop(c.decompress(&z)));
            println!(
                "| {} | {} | {} | {:.2} | {:.0} | {:.0} |",
                pl.name,
                c.name(),
                z.len(),
                pl.body.len() as f64 / z.len() as f64,
                tc.as_secs_f64() * 1e6,
                td.as_secs_f64() * 1e6
            );
        }
    }

    let server = shoal::launch::Launched::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_shoal")),
        &repo,
        &[],
        "warn",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    println!("\nREST round trip on loopback (request and answer in the same codec), sequential:");
    println!(
        "| payload | codec | request bytes | answer bytes | p50 ms | p90 ms | vs identity p50 |\n|---|---|---:|---:|---:|---:|---:|"
    );
    for pl in &payloads {
        let n = match (quick, pl.model) {
            (true, "resnet50") => 10,
            (true, _) => 200,
            (false, "resnet50") => 40,
            (false, _) => 2000,
        };
        let mut base = None;
        for &c in &codecs {
            let url = format!("{}/v2/models/{}/infer", server.http, pl.model);
            let mut lat = Vec::with_capacity(n);
            let mut sizes = (0, 0);
            rt.block_on(async {
                for i in 0..n + n / 10 {
                    let t0 = Instant::now();
                    // The client's work counts: it compresses each request
                    // and decompresses each answer, as a real client would.
                    let body = c.compress(&pl.body);
                    let mut req = client.post(&url).header("content-type", "application/json");
                    if let Some(h) = pl.header_len {
                        req = req.header("inference-header-content-length", h);
                    }
                    if c != Codec::Identity {
                        req = req
                            .header("content-encoding", c.name())
                            .header("accept-encoding", c.name());
                    }
                    let sent = body.len();
                    let r = req.body(body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let raw = r.bytes().await.unwrap();
                    let answer = c.decompress(&raw);
                    assert!(!answer.is_empty());
                    if i >= n / 10 {
                        lat.push(t0.elapsed());
                        sizes = (sent, raw.len());
                    }
                }
            });
            let p50 = quantile(&mut lat, 0.5);
            let p90 = quantile(&mut lat, 0.9);
            let b = *base.get_or_insert(p50);
            println!(
                "| {} | {} | {} | {} | {:.3} | {:.3} | {:.2} |",
                pl.name,
                c.name(),
                sizes.0,
                sizes.1,
                p50.as_secs_f64() * 1e3,
                p90.as_secs_f64() * 1e3,
                p50.as_secs_f64() / b.as_secs_f64()
            );
        }
    }
}
