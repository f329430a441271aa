//! Writes the TorchScript twin of a reference ONNX model (see `shoal::backend::torch_export`).
//!
//! `shoal-torchscript --arch ffnn|resnet50 --onnx <model.onnx> --out <model.pt>`

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

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
    shoal::backend::torch_export::export(&arch, &onnx, &out)
        .with_context(|| format!("exporting {} as {arch}", onnx.display()))?;
    println!(
        "wrote {} ({arch}, weights from {})",
        out.display(),
        onnx.display()
    );
    Ok(())
}
