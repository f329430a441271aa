//! The per-model `config.toml` of the model repository, and its resolution
//! against the I/O signature the backend reads from the model file.

use crate::backend::{Signature, TensorSpec};
use crate::tensor::DataType;
use serde::Deserialize;
use std::time::Duration;

/// Default bound on requests waiting per model version.
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;

/// `<repo>/<model>/config.toml` as written by the user.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfigFile {
    /// `onnxruntime_onnx` (the default for `model.onnx`).
    pub platform: Option<String>,
    /// 0: the model takes no batch dimension. >0: dim 0 is the batch
    /// dimension, `dims` exclude it and a request may carry up to this many rows.
    #[serde(default)]
    pub max_batch_size: u32,
    /// Worker replicas, each with its own session on its own OS thread.
    pub instance_count: Option<usize>,
    /// Threads ONNX Runtime may use inside one operator, per replica.
    pub intra_op_threads: Option<usize>,
    pub inter_op_threads: Option<usize>,
    /// Present: requests are merged along dim 0 into batches.
    pub dynamic_batching: Option<DynamicBatchingFile>,
    /// Bound on queued requests when no `[dynamic_batching]` is given.
    pub max_queue_size: Option<usize>,
    #[serde(default)]
    pub input: Vec<IoFile>,
    #[serde(default)]
    pub output: Vec<IoFile>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicBatchingFile {
    #[serde(default)]
    pub max_queue_delay_us: u64,
    #[serde(default)]
    pub preferred_batch_sizes: Vec<u32>,
    pub max_queue_size: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoFile {
    pub name: String,
    pub datatype: String,
    pub dims: Vec<i64>,
}

/// Batching knobs after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicBatching {
    pub max_queue_delay: Duration,
    pub preferred_batch_sizes: Vec<usize>,
}

/// A model's I/O tensor as the protocol sees it: `dims` exclude the batch
/// dimension when the model batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoSpec {
    pub name: String,
    pub datatype: DataType,
    pub dims: Vec<i64>,
}

/// A model version's configuration, validated and completed from its graph.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub platform: String,
    pub max_batch_size: usize,
    pub instance_count: usize,
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    pub dynamic_batching: Option<DynamicBatching>,
    pub max_queue_size: usize,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
}

#[derive(Debug, thiserror::Error)]
#[error("model {model}: {reason}")]
pub struct ConfigError {
    pub model: String,
    pub reason: String,
}

impl ModelConfigFile {
    pub fn parse(model: &str, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError {
            model: model.to_string(),
            reason: format!("invalid config.toml: {e}"),
        })
    }

    /// Validates the file and completes it with the graph's signature.
    pub fn resolve(&self, model: &str, graph: &Signature) -> Result<ModelConfig, ConfigError> {
        let err = |reason: String| ConfigError {
            model: model.to_string(),
            reason,
        };
        let max_batch_size = self.max_batch_size as usize;
        let instance_count = self.instance_count.unwrap_or(1);
        if instance_count == 0 || instance_count > 256 {
            return Err(err(format!(
                "instance_count must be 1..=256, got {instance_count}"
            )));
        }
        let intra = self.intra_op_threads.unwrap_or(1);
        let inter = self.inter_op_threads.unwrap_or(1);
        if intra == 0 || inter == 0 {
            return Err(err(
                "intra_op_threads and inter_op_threads must be >= 1".into()
            ));
        }
        let dynamic_batching = match &self.dynamic_batching {
            None => None,
            Some(_) if max_batch_size == 0 => {
                return Err(err("[dynamic_batching] needs max_batch_size > 0".into()))
            }
            Some(db) => {
                let mut preferred = Vec::new();
                for &p in &db.preferred_batch_sizes {
                    let p = p as usize;
                    if p == 0 || p > max_batch_size {
                        return Err(err(format!(
                            "preferred batch size {p} must be in 1..=max_batch_size ({max_batch_size})"
                        )));
                    }
                    preferred.push(p);
                }
                preferred.sort_unstable();
                preferred.dedup();
                Some(DynamicBatching {
                    max_queue_delay: Duration::from_micros(db.max_queue_delay_us),
                    preferred_batch_sizes: preferred,
                })
            }
        };
        let max_queue_size = self
            .dynamic_batching
            .as_ref()
            .and_then(|d| d.max_queue_size)
            .or(self.max_queue_size)
            .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        if max_queue_size == 0 {
            return Err(err("max_queue_size must be >= 1".into()));
        }
        let inputs = resolve_io(model, "input", &self.input, &graph.inputs, max_batch_size)?;
        let outputs = resolve_io(
            model,
            "output",
            &self.output,
            &graph.outputs,
            max_batch_size,
        )?;
        Ok(ModelConfig {
            name: model.to_string(),
            platform: self
                .platform
                .clone()
                .unwrap_or_else(|| "onnxruntime_onnx".to_string()),
            max_batch_size,
            instance_count,
            intra_op_threads: intra,
            inter_op_threads: inter,
            dynamic_batching,
            max_queue_size,
            inputs,
            outputs,
        })
    }
}

/// Checks the configured tensors against the graph, or derives them from it.
fn resolve_io(
    model: &str,
    kind: &str,
    configured: &[IoFile],
    graph: &[TensorSpec],
    max_batch_size: usize,
) -> Result<Vec<IoSpec>, ConfigError> {
    let err = |reason: String| ConfigError {
        model: model.to_string(),
        reason,
    };
    // The protocol-level dims of a graph tensor: without the batch dim when
    // batching, which must then be dynamic in the graph.
    let graph_dims = |spec: &TensorSpec| -> Result<Vec<i64>, ConfigError> {
        if max_batch_size == 0 {
            return Ok(spec.shape.clone());
        }
        match spec.shape.first() {
            Some(&d) if d < 0 => Ok(spec.shape[1..].to_vec()),
            _ => Err(err(format!(
                "{kind} {} has shape {:?}: max_batch_size > 0 needs a dynamic first dimension",
                spec.name, spec.shape
            ))),
        }
    };
    if configured.is_empty() {
        return graph
            .iter()
            .map(|g| {
                Ok(IoSpec {
                    name: g.name.clone(),
                    datatype: g.datatype,
                    dims: graph_dims(g)?,
                })
            })
            .collect();
    }
    let mut out = Vec::with_capacity(configured.len());
    for c in configured {
        let datatype = DataType::parse(&c.datatype).ok_or_else(|| {
            err(format!(
                "{kind} {}: unknown datatype {:?}",
                c.name, c.datatype
            ))
        })?;
        let g = graph
            .iter()
            .find(|g| g.name == c.name)
            .ok_or_else(|| err(format!("{kind} {:?} is not in the model graph", c.name)))?;
        if g.datatype != datatype {
            return Err(err(format!(
                "{kind} {}: config says {datatype}, the graph says {}",
                c.name, g.datatype
            )));
        }
        if c.dims.iter().any(|&d| d < -1 || d == 0) {
            return Err(err(format!(
                "{kind} {}: dims must be positive or -1",
                c.name
            )));
        }
        let gd = graph_dims(g)?;
        let compatible = gd.len() == c.dims.len()
            && gd
                .iter()
                .zip(&c.dims)
                .all(|(&g, &c)| g < 0 || c < 0 || g == c);
        if !compatible {
            return Err(err(format!(
                "{kind} {}: config dims {:?} do not match the graph's {:?}",
                c.name, c.dims, gd
            )));
        }
        // Keep the more specific of the two for every dim.
        let dims = gd
            .iter()
            .zip(&c.dims)
            .map(|(&g, &c)| if g >= 0 { g } else { c })
            .collect();
        out.push(IoSpec {
            name: c.name.clone(),
            datatype,
            dims,
        });
    }
    if kind == "input" && out.len() != graph.len() {
        let missing: Vec<_> = graph
            .iter()
            .filter(|g| !out.iter().any(|o| o.name == g.name))
            .map(|g| g.name.as_str())
            .collect();
        return Err(err(format!("config omits graph inputs {missing:?}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 784],
            }],
            outputs: vec![TensorSpec {
                name: "output".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 10],
            }],
        }
    }

    #[test]
    fn derives_io_from_graph_and_strips_batch_dim() {
        let f = ModelConfigFile::parse("m", "max_batch_size = 8\n[dynamic_batching]\nmax_queue_delay_us = 50\npreferred_batch_sizes = [4, 2, 4]\n").unwrap();
        let c = f.resolve("m", &graph()).unwrap();
        assert_eq!(c.inputs[0].dims, vec![784]);
        assert_eq!(c.outputs[0].dims, vec![10]);
        let db = c.dynamic_batching.unwrap();
        assert_eq!(db.preferred_batch_sizes, vec![2, 4]);
        assert_eq!(db.max_queue_delay, Duration::from_micros(50));
        assert_eq!(c.max_queue_size, DEFAULT_MAX_QUEUE_SIZE);
    }

    #[test]
    fn without_batching_dims_are_the_graph_shape() {
        let c = ModelConfigFile::default().resolve("m", &graph()).unwrap();
        assert_eq!(c.inputs[0].dims, vec![-1, 784]);
        assert!(c.dynamic_batching.is_none());
    }

    #[test]
    fn rejects_mismatches_with_clear_reasons() {
        let cases = [
            ("max_batch_size = 4\n[[input]]\nname = \"input\"\ndatatype = \"INT64\"\ndims = [784]\n", "graph says FP32"),
            ("max_batch_size = 4\n[[input]]\nname = \"input\"\ndatatype = \"FP32\"\ndims = [783]\n", "do not match"),
            ("max_batch_size = 4\n[[input]]\nname = \"nope\"\ndatatype = \"FP32\"\ndims = [784]\n", "not in the model graph"),
            ("[dynamic_batching]\n", "needs max_batch_size"),
            ("max_batch_size = 4\n[dynamic_batching]\npreferred_batch_sizes = [8]\n", "preferred batch size 8"),
            ("instance_count = 0\n", "instance_count"),
            ("max_batch_size = 4\nmax_queue_size = 0\n", "max_queue_size"),
        ];
        for (text, want) in cases {
            let e = ModelConfigFile::parse("m", text)
                .unwrap()
                .resolve("m", &graph())
                .unwrap_err();
            assert!(e.to_string().contains(want), "{text:?} gave {e}");
        }
        assert!(ModelConfigFile::parse("m", "bogus_key = 1")
            .unwrap_err()
            .to_string()
            .contains("bogus_key"));
    }

    #[test]
    fn batching_needs_dynamic_first_dim() {
        let mut g = graph();
        g.inputs[0].shape = vec![1, 784];
        let e = ModelConfigFile::parse("m", "max_batch_size = 4")
            .unwrap()
            .resolve("m", &g)
            .unwrap_err();
        assert!(e.to_string().contains("dynamic first dimension"), "{e}");
    }
}
