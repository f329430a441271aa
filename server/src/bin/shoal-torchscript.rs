//! Writes the TorchScript twin of a reference ONNX model: reads the initializers of `model.onnx` and traces the
//! same network through libtorch, so both files hold the very same weights (no Python torch needed).
//!
//! `shoal-torchscript --arch ffnn|resnet50 --onnx <model.onnx> --out <model.pt>`

use anyhow::{bail, Context, Result};
use prost::Message;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::{CModule, Device, Kind, Tensor};

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

fn weights(path: &PathBuf) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let model = ModelProto::decode(bytes.as_slice()).context("not an ONNX model")?;
    let mut out = HashMap::new();
    for t in model
        .graph
        .context("ONNX model without a graph")?
        .initializer
    {
        if t.data_type != ONNX_FLOAT {
            bail!("initializer {} is not FLOAT", t.name);
        }
        let tensor = if t.raw_data.is_empty() {
            Tensor::from_slice(&t.float_data).reshape(t.dims.as_slice())
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
        // The architectures below mirror models/generate.py; a missing name is a bug in this file, not bad input.
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("ONNX model has no initializer {name}"))
    }
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

fn main() -> Result<()> {
    let mut arch = None;
    let mut onnx = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--arch" => arch = Some(v),
            "--onnx" => onnx = Some(PathBuf::from(v)),
            "--out" => out = Some(PathBuf::from(v)),
            _ => bail!("unknown flag {a}; usage: --arch ffnn|resnet50 --onnx <model.onnx> --out <model.pt>"),
        }
    }
    let (arch, onnx, out) = (
        arch.context("--arch missing")?,
        onnx.context("--onnx missing")?,
        out.context("--out missing")?,
    );
    let w = Weights(weights(&onnx)?);
    let (example, f): (Tensor, fn(&Weights, &Tensor) -> Tensor) = match arch.as_str() {
        "ffnn" => (Tensor::zeros([1, 784], (Kind::Float, Device::Cpu)), ffnn),
        "resnet50" => (
            Tensor::zeros([1, 3, 224, 224], (Kind::Float, Device::Cpu)),
            resnet50,
        ),
        other => bail!("unknown --arch {other} (ffnn or resnet50)"),
    };
    let module = tch::no_grad(|| {
        CModule::create_by_tracing(&arch, "forward", &[example], &mut |inputs| {
            vec![f(&w, &inputs[0])]
        })
    })?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    module.save(&out)?;
    println!(
        "wrote {} ({arch}, weights from {})",
        out.display(),
        onnx.display()
    );
    Ok(())
}
