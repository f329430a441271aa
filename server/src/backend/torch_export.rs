//! TorchScript twins of the reference ONNX models: reads the initializers of `model.onnx` and traces the same
//! network through libtorch, so both files hold the very same weights (no Python torch needed). The layouts mirror
//! models/generate.py.

use prost::Message;
use std::collections::HashMap;
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an ONNX model: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Onnx(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The architectures this exporter knows.
pub const ARCHS: &[&str] = &["ffnn", "resnet50"];

/// The few fields of onnx.proto this tool reads (field numbers from onnx.proto3).
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, Message)]
struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    data_type: i32,
    #[prost(float, repeated, tag = "4")]
    float_data: Vec<f32>,
    #[prost(string, tag = "8")]
    name: String,
    #[prost(bytes = "vec", tag = "9")]
    raw_data: Vec<u8>,
}

const ONNX_FLOAT: i32 = 1;

fn weights(path: &Path) -> Result<HashMap<String, Tensor>, ExportError> {
    let bytes = std::fs::read(path)?;
    let model = ModelProto::decode(bytes.as_slice())?;
    let graph = model
        .graph
        .ok_or_else(|| ExportError::Onnx("ONNX model without a graph".into()))?;
    let mut out = HashMap::new();
    for t in graph.initializer {
        if t.data_type != ONNX_FLOAT {
            return Err(ExportError::Onnx(format!(
                "initializer {} is not FLOAT",
                t.name
            )));
        }
        let tensor = if t.raw_data.is_empty() {
            Tensor::f_from_slice(&t.float_data)?.f_reshape(t.dims.as_slice())?
        } else {
            Tensor::f_from_data_size(&t.raw_data, &t.dims, Kind::Float)?
        };
        out.insert(t.name, tensor);
    }
    Ok(out)
}

struct Weights(HashMap<String, Tensor>);

impl Weights {
    fn get(&self, name: &str) -> &Tensor {
        // Checked before tracing by `check`: every name the architecture reads is present.
        &self.0[name]
    }
}

/// Every initializer name `arch` reads, so a foreign ONNX file is an error rather than a panic mid-trace.
fn check(arch: &str, w: &Weights) -> Result<(), ExportError> {
    let mut names: Vec<String> = Vec::new();
    let conv = |names: &mut Vec<String>, n: &str| {
        names.push(format!("{n}.weight"));
        for p in ["scale", "bias", "mean", "var"] {
            names.push(format!("{n}.bn.{p}"));
        }
    };
    if arch == "ffnn" {
        for i in 0..4 {
            names.push(format!("dense{i}.weight"));
            names.push(format!("dense{i}.bias"));
        }
    } else {
        conv(&mut names, "conv1");
        for (li, blocks) in [3, 4, 6, 3].into_iter().enumerate() {
            for bi in 0..blocks {
                for c in ["conv1", "conv2", "conv3"] {
                    conv(&mut names, &format!("layer{}.{bi}.{c}", li + 1));
                }
            }
        }
        names.push("fc.weight".into());
        names.push("fc.bias".into());
    }
    match names.iter().find(|n| !w.0.contains_key(n.as_str())) {
        Some(n) => Err(ExportError::Onnx(format!(
            "the ONNX model has no initializer {n}: not a {arch}"
        ))),
        None => Ok(()),
    }
}

/// Traces `arch` with the weights of the ONNX model at `onnx` and saves it as TorchScript at `out`.
pub fn export(arch: &str, onnx: &Path, out: &Path) -> Result<(), ExportError> {
    let w = Weights(weights(onnx)?);
    let (example, f): (Tensor, fn(&Weights, &Tensor) -> Tensor) = match arch {
        "ffnn" => (Tensor::zeros([1, 784], (Kind::Float, Device::Cpu)), ffnn),
        "resnet50" => (
            Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu)),
            resnet50,
        ),
        other => {
            return Err(ExportError::Onnx(format!(
                "unknown architecture {other} (one of {ARCHS:?})"
            )))
        }
    };
    check(arch, &w)?;
    let module = tch::no_grad(|| {
        CModule::create_by_tracing(arch, "forward", &[example], &mut |inputs| {
            vec![f(&w, &inputs[0])]
        })
    })?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    module.save(out)?;
    Ok(())
}

/// Crayfish FFNN: Gemm (x·W + b) with ReLU between layers, softmax over classes.
fn ffnn(w: &Weights, x: &Tensor) -> Tensor {
    let mut x = x.shallow_clone();
    for i in 0..4 {
        x = x.matmul(w.get(&format!("dense{i}.weight"))) + w.get(&format!("dense{i}.bias"));
        if i < 3 {
            x = x.relu();
        }
    }
    x.softmax(1, Kind::Float)
}

fn conv_bn(w: &Weights, x: &Tensor, name: &str, stride: i64, relu: bool) -> Tensor {
    let weight = w.get(&format!("{name}.weight"));
    let pad = weight.size()[2] / 2;
    let y = x.conv2d(
        weight,
        None::<Tensor>,
        [stride, stride],
        [pad, pad],
        [1, 1],
        1,
    );
    let y = y.batch_norm(
        Some(w.get(&format!("{name}.bn.scale"))),
        Some(w.get(&format!("{name}.bn.bias"))),
        Some(w.get(&format!("{name}.bn.mean"))),
        Some(w.get(&format!("{name}.bn.var"))),
        false,
        0.1,
        1e-5,
        true,
    );
    if relu {
        y.relu()
    } else {
        y
    }
}

/// ResNet50 v1 in models/generate.py's layout (torchvision's).
fn resnet50(w: &Weights, x: &Tensor) -> Tensor {
    let mut x = conv_bn(w, x, "conv1", 2, true).max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
    for (li, blocks) in [3, 4, 6, 3].into_iter().enumerate() {
        for bi in 0..blocks {
            let name = format!("layer{}.{bi}", li + 1);
            let stride = if bi == 0 && li > 0 { 2 } else { 1 };
            let y = conv_bn(w, &x, &format!("{name}.conv1"), 1, true);
            let y = conv_bn(w, &y, &format!("{name}.conv2"), stride, true);
            let y = conv_bn(w, &y, &format!("{name}.conv3"), 1, false);
            let shortcut = if w.0.contains_key(&format!("{name}.downsample.weight")) {
                conv_bn(w, &x, &format!("{name}.downsample"), stride, false)
            } else {
                x.shallow_clone()
            };
            x = (y + shortcut).relu();
        }
    }
    x.adaptive_avg_pool2d([1, 1])
        .flatten(1, -1)
        .linear(w.get("fc.weight"), Some(w.get("fc.bias")))
}
