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

pub fn model_config(mv: &ModelVersion) -> pb::ModelConfig {
    let cfg = mv.config();
    pb::ModelConfig {
        name: cfg.name.clone(),
        platform: cfg.platform.clone(),
        backend: if cfg.platform == crate::engine::repository::TORCH_PLATFORM {
            "pytorch".into()
        } else {
            "onnxruntime".into()
        },
        version_policy: Some(pb::ModelVersionPolicy {
            policy_choice: Some(pb::model_version_policy::PolicyChoice::All(
                pb::model_version_policy::All {},
            )),
        }),
        max_batch_size: cfg.max_batch_size as i32,
        input: cfg
            .inputs
            .iter()
            .map(|s| pb::ModelInput {
                name: s.name.clone(),
                data_type: s.datatype.triton_enum(),
                format: 0,
                dims: s.dims.clone(),
                optional: false,
            })
            .collect(),
        output: cfg
            .outputs
            .iter()
            .map(|s| pb::ModelOutput {
                name: s.name.clone(),
                data_type: s.datatype.triton_enum(),
                dims: s.dims.clone(),
            })
            .collect(),
        dynamic_batching: cfg
            .dynamic_batching
            .as_ref()
            .map(|d| pb::ModelDynamicBatching {
                preferred_batch_size: d.preferred_batch_sizes.iter().map(|&p| p as i32).collect(),
                max_queue_delay_microseconds: d.max_queue_delay.as_micros() as u64,
                preserve_ordering: false,
            }),
        instance_group: vec![pb::ModelInstanceGroup {
            name: format!("{}_0", cfg.name),
            kind: pb::model_instance_group::Kind::Cpu as i32,
            count: cfg.instance_count as i32,
            gpus: vec![],
        }],
        default_model_filename: "model.onnx".into(),
        parameters: Default::default(),
    }
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
