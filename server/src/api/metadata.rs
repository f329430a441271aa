//! Model metadata, Triton-style configuration and statistics, built once
//! from the engine for both protocols (REST renders them as JSON).

use crate::engine::config::IoSpec;
use crate::engine::{Engine, ModelVersion};
use shoal_proto as pb;
use std::sync::atomic::Ordering::Relaxed;

pub const SERVER_NAME: &str = "shoal";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The protocol-level shape: `-1` for the batch dimension when batching.
pub fn full_shape(spec: &IoSpec, max_batch_size: usize) -> Vec<i64> {
    if max_batch_size > 0 {
        std::iter::once(-1)
            .chain(spec.dims.iter().copied())
            .collect()
    } else {
        spec.dims.clone()
    }
}

pub fn model_metadata(engine: &Engine, mv: &ModelVersion) -> pb::ModelMetadataResponse {
    let cfg = mv.config();
    let versions = engine
        .models()
        .get(&cfg.name)
        .map(|m| m.versions.keys().map(|v| v.to_string()).collect())
        .unwrap_or_default();
    let tensors = |specs: &[IoSpec]| {
        specs
            .iter()
            .map(|s| pb::model_metadata_response::TensorMetadata {
                name: s.name.clone(),
                datatype: s.datatype.as_str().to_string(),
                shape: full_shape(s, cfg.max_batch_size),
            })
            .collect()
    };
    pb::ModelMetadataResponse {
        name: cfg.name.clone(),
        versions,
        platform: cfg.platform.clone(),
        inputs: tensors(&cfg.inputs),
        outputs: tensors(&cfg.outputs),
    }
}

/// The configuration as loaded: the user's config.pbtxt where there was
/// one (every field they wrote, as Triton returns it), with what is in
/// effect written over it: the platform, version policy, batch size, the
/// I/O completed from the graph, the batcher and the instance groups.
pub fn model_config(mv: &ModelVersion) -> pb::ModelConfig {
    use crate::engine::config::VersionPolicy;
    use pb::model_version_policy::{All, Latest, PolicyChoice, Specific};
    let cfg = mv.config();
    let mut c = cfg.triton.as_deref().cloned().unwrap_or_default();
    let torch = cfg.platform == crate::engine::repository::TORCH_PLATFORM;
    c.name = cfg.name.clone();
    c.platform = cfg.platform.clone();
    c.backend = if torch { "pytorch" } else { "onnxruntime" }.into();
    c.version_policy = Some(pb::ModelVersionPolicy {
        policy_choice: Some(match &cfg.version_policy {
            VersionPolicy::All => PolicyChoice::All(All {}),
            VersionPolicy::Latest(n) => PolicyChoice::Latest(Latest { num_versions: *n }),
            VersionPolicy::Specific(v) => PolicyChoice::Specific(Specific {
                versions: v.iter().map(|&x| x as i64).collect(),
            }),
        }),
    });
    c.max_batch_size = cfg.max_batch_size as i32;
    let written_inputs = std::mem::take(&mut c.input);
    c.input = cfg
        .inputs
        .iter()
        .map(|s| pb::ModelInput {
            name: s.name.clone(),
            data_type: s.datatype.triton_enum(),
            dims: s.dims.clone(),
            ..written_inputs
                .iter()
                .find(|w| w.name == s.name)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let written_outputs = std::mem::take(&mut c.output);
    c.output = cfg
        .outputs
        .iter()
        .map(|s| pb::ModelOutput {
            name: s.name.clone(),
            data_type: s.datatype.triton_enum(),
            dims: s.dims.clone(),
            ..written_outputs
                .iter()
                .find(|w| w.name == s.name)
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let written_batching = c.dynamic_batching.take();
    c.dynamic_batching = cfg
        .dynamic_batching
        .as_ref()
        .map(|d| pb::ModelDynamicBatching {
            preferred_batch_size: d.preferred_batch_sizes.iter().map(|&p| p as i32).collect(),
            max_queue_delay_microseconds: d.max_queue_delay.as_micros() as u64,
            ..written_batching.unwrap_or_default()
        });
    if c.instance_group.is_empty() {
        c.instance_group = vec![pb::ModelInstanceGroup {
            kind: pb::model_instance_group::Kind::Cpu as i32,
            count: cfg.instance_count as i32,
            ..Default::default()
        }];
    }
    for (i, g) in c.instance_group.iter_mut().enumerate() {
        if g.name.is_empty() {
            g.name = format!("{}_{i}", cfg.name);
        }
        if g.count == 0 {
            g.count = 1;
        }
    }
    if c.default_model_filename.is_empty() {
        c.default_model_filename = if torch { "model.pt" } else { "model.onnx" }.into();
    }
    c
}

pub fn model_statistics(mv: &ModelVersion) -> pb::ModelStatistics {
    let s = &mv.core.stats;
    let d = |x: &crate::engine::stats::Duration64| {
        let (count, ns) = x.get();
        Some(pb::StatisticDuration { count, ns })
    };
    let batch_stats = s
        .batches
        .lock()
        .iter()
        .map(|(&size, b)| pb::InferBatchStatistics {
            batch_size: size as u64,
            compute_input: Some(pb::StatisticDuration {
                count: b.count,
                ns: b.input_ns,
            }),
            compute_infer: Some(pb::StatisticDuration {
                count: b.count,
                ns: b.infer_ns,
            }),
            compute_output: Some(pb::StatisticDuration {
                count: b.count,
                ns: b.output_ns,
            }),
        })
        .collect();
    pb::ModelStatistics {
        name: mv.config().name.clone(),
        version: mv.core.version.to_string(),
        last_inference: s.last_inference_ms.load(Relaxed),
        inference_count: s.inference_count.load(Relaxed),
        execution_count: s.execution_count.load(Relaxed),
        inference_stats: Some(pb::InferStatistics {
            success: d(&s.success),
            fail: d(&s.fail),
            queue: d(&s.queue),
            compute_input: d(&s.compute_input),
            compute_infer: d(&s.compute_infer),
            compute_output: d(&s.compute_output),
        }),
        batch_stats,
    }
}

/// Statistics for one model (all versions, or one) or for every model.
pub fn statistics(
    engine: &Engine,
    name: &str,
    version: &str,
) -> Result<pb::ModelStatisticsResponse, crate::engine::EngineError> {
    let mut model_stats = Vec::new();
    if name.is_empty() {
        for m in engine.models().values() {
            model_stats.extend(m.versions.values().map(|mv| model_statistics(mv)));
        }
    } else if version.is_empty() {
        engine.model(name, None)?;
        if let Some(m) = engine.models().get(name) {
            model_stats.extend(m.versions.values().map(|mv| model_statistics(mv)));
        }
    } else {
        let mv = engine.model(name, Some(version))?;
        model_stats.push(model_statistics(&mv));
    }
    Ok(pb::ModelStatisticsResponse { model_stats })
}
