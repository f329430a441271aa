//! Warm-up before a version takes traffic: Triton's `model_warmup` samples,
//! each run `count` times on every replica, or (for explicit loads of a
//! model that configures none) one request of zeros per replica. The first
//! client request then does not pay for lazy initialisation (ONNX Runtime's
//! arena growth, kernel selection), and a model that cannot run is refused
//! before it serves.

use super::config::{WarmupData, WarmupSample};
use super::model::ModelVersion;
use super::InferRequest;
use crate::tensor::{element_count, scalar_bytes, DataType, Tensor};
use bytes::Bytes;
use std::time::Instant;

/// What to run when the config has no samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Nothing (a startup load, as before warm-up was configurable).
    Nothing,
    /// One request of zeros per replica, where the inputs have fixed dims.
    Zeros,
}

/// Runs the version's warm-up and forgets its statistics (warm-up requests
/// are not client traffic, as in Triton). Must be called off the async
/// runtime: it blocks on the answers.
pub fn run(mv: &ModelVersion, fallback: Fallback) -> Result<(), String> {
    let cfg = mv.config();
    if cfg.is_stateful() {
        // A warm-up request would create keyed state under some key.
        if !cfg.warmup.is_empty() {
            tracing::warn!(
                model = %cfg.name,
                "model_warmup skipped: the model keeps state per key, and a warm-up would create some"
            );
        }
        return Ok(());
    }
    let samples = if !cfg.warmup.is_empty() {
        cfg.warmup.clone()
    } else if fallback == Fallback::Zeros
        && cfg.inputs.iter().all(|i| i.dims.iter().all(|&d| d >= 0))
    {
        vec![WarmupSample {
            name: "zeros".into(),
            batch_size: 1,
            count: 1,
            inputs: cfg
                .inputs
                .iter()
                .map(|i| (i.dims.clone(), WarmupData::Zero))
                .collect(),
        }]
    } else {
        return Ok(());
    };
    let t0 = Instant::now();
    let replicas = mv.replicas.len();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ mv.core.version;
    for sample in &samples {
        for _ in 0..sample.count {
            // One request per replica at a time, all replicas at once.
            let mut waits = Vec::with_capacity(replicas);
            for r in 0..replicas {
                let request = InferRequest {
                    model: cfg.name.clone(),
                    id: format!("warm-up {}", sample.name),
                    inputs: tensors(mv, sample, &mut rng),
                    ..Default::default()
                };
                waits.push(
                    mv.submit_to(request, Some(r))
                        .map_err(|e| format!("warm-up sample {:?}: {e}", sample.name))?,
                );
            }
            for rx in waits {
                rx.blocking_recv()
                    .map_err(|_| "warm-up: the replica stopped".to_string())?
                    .map_err(|e| format!("warm-up sample {:?} failed: {e}", sample.name))?;
            }
        }
    }
    mv.core.stats.reset();
    tracing::info!(
        model = %cfg.name,
        version = mv.core.version,
        samples = samples.len(),
        replicas,
        elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
        "warm-up done"
    );
    Ok(())
}

/// The sample's inputs, its rows repeated to its batch size.
fn tensors(mv: &ModelVersion, sample: &WarmupSample, rng: &mut u64) -> Vec<Tensor> {
    let cfg = mv.config();
    cfg.inputs
        .iter()
        .zip(&sample.inputs)
        .map(|(spec, (dims, data))| {
            let mut shape = Vec::with_capacity(dims.len() + 1);
            if cfg.max_batch_size > 0 {
                shape.push(sample.batch_size as i64);
            }
            shape.extend_from_slice(dims);
            let elems = element_count(dims).unwrap_or(0);
            let row: Vec<u8> = match data {
                WarmupData::File(b) => b.to_vec(),
                // BYTES: every element an empty string (a zero length).
                WarmupData::Zero => vec![0u8; elems * spec.datatype.size().unwrap_or(4)],
                WarmupData::Random => random_row(spec.datatype, elems, rng),
            };
            let rows = if cfg.max_batch_size > 0 {
                sample.batch_size
            } else {
                1
            };
            Tensor {
                name: spec.name.clone(),
                datatype: spec.datatype,
                shape,
                data: Bytes::from(row.repeat(rows)),
            }
        })
        .collect()
}

/// Values in [0, 1) for floating types, 0..16 for integers, either for
/// booleans; BYTES elements empty.
fn random_row(dt: DataType, elems: usize, rng: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(elems * dt.size().unwrap_or(4));
    for _ in 0..elems {
        *rng = super::keys::mix(rng.wrapping_add(1));
        let unit = (*rng >> 11) as f64 / (1u64 << 53) as f64;
        let v = match dt {
            DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => unit,
            DataType::Bool => (unit * 2.0).floor(),
            _ => (unit * 16.0).floor(),
        };
        out.extend(scalar_bytes(dt, v).unwrap_or_else(|| vec![0; 4]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_stay_in_range_and_vary() {
        let mut rng = 7;
        let f = random_row(DataType::Fp32, 64, &mut rng);
        let f: Vec<f32> = bytemuck::pod_collect_to_vec(&f);
        assert!(f.iter().all(|&x| (0.0..1.0).contains(&x)), "{f:?}");
        assert!(f.windows(2).any(|w| w[0] != w[1]));
        let b = random_row(DataType::Bool, 64, &mut rng);
        assert!(b.iter().all(|&x| x <= 1) && b.contains(&0) && b.contains(&1));
        let s = random_row(DataType::Bytes, 3, &mut rng);
        assert_eq!(s, vec![0; 12], "three empty strings");
    }
}
