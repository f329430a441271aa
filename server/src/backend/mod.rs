//! The one trait every inference engine implements, and the types it sees.
//!
//! A backend knows tensors and devices, nothing of batching, keys or
//! protocols. Each replica owns one backend instance on its own OS thread,
//! so `run` takes `&mut self` and needs no locking.

pub mod mock;
pub mod ort;
#[cfg(feature = "torch")]
pub mod torch;
#[cfg(feature = "torch")]
pub mod torch_export;

use crate::tensor::DataType;
use bytes::Bytes;
use std::path::Path;

/// Name, datatype and shape of a model input or output as the model file
/// declares it; `-1` marks a dynamic dimension (including the batch one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// True when dim 0 is dynamic, so it can be the batch dimension.
    pub fn has_dynamic_first_dim(&self) -> bool {
        self.shape.first().is_some_and(|&d| d < 0)
    }
}

/// The typed I/O signature a backend reads from its model file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One input of a batch: the parts are the requests' raw bytes, in batch
/// order, to be concatenated along dim 0 into `shape` (which already holds
/// the summed batch dimension). The backend copies them once, into its own
/// buffer.
#[derive(Debug)]
pub struct BatchInput<'a> {
    pub name: &'a str,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub parts: Vec<&'a [u8]>,
}

/// One output of a batch, as raw little-endian bytes.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// Where a replica runs and how many threads its session may use.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub intra_op_threads: usize,
    pub inter_op_threads: usize,
    /// The device of this replica.
    pub placement: crate::gpu::Placement,
    /// TensorRT on a GPU replica (ONNX Runtime only).
    pub tensorrt: TensorRt,
}

/// Whether a GPU replica runs ONNX Runtime's TensorRT provider before CUDA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TensorRt {
    /// Where the library has it (shoal's default).
    #[default]
    IfAvailable,
    /// The config asks for it (Triton's `gpu_execution_accelerator` named
    /// `tensorrt`): a replica without it fails to load.
    Required,
    /// The config lists GPU accelerators without TensorRT: CUDA only.
    Off,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            intra_op_threads: 1,
            inter_op_threads: 1,
            placement: crate::gpu::Placement::Cpu,
            tensorrt: TensorRt::IfAvailable,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("runtime library unavailable: {0}")]
    Runtime(String),
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("unsupported datatype {0} for this backend")]
    Unsupported(String),
    #[error("inference failed: {0}")]
    Run(String),
}

/// An inference engine instance owned by one replica.
pub trait Backend: Send + 'static {
    /// The I/O signature read from the model file.
    fn signature(&self) -> &Signature;
    /// The execution provider actually in use (e.g. `CPUExecutionProvider`).
    fn execution_provider(&self) -> &str;
    /// Whether `run` may be called from a thread other than the one that
    /// created the backend at no extra cost (no per-thread device context,
    /// thread pool or grad mode): then a cheap lone request may run on the
    /// thread that received it.
    fn runs_on_any_thread(&self) -> bool {
        false
    }
    /// Runs one batch; returns every model output.
    fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<BatchOutput>, BackendError>;
}

/// Builds a fresh backend instance; called once per replica, on the
/// replica's own thread.
pub trait BackendFactory: Send + Sync + 'static {
    fn create(&self) -> Result<Box<dyn Backend>, BackendError>;
}

impl<F> BackendFactory for F
where
    F: Fn() -> Result<Box<dyn Backend>, BackendError> + Send + Sync + 'static,
{
    fn create(&self) -> Result<Box<dyn Backend>, BackendError> {
        self()
    }
}

/// Concatenates parts into one buffer (the one copy of batch assembly).
pub fn concat_parts(parts: &[&[u8]]) -> Vec<u8> {
    let total = parts.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(total);
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// True for files this backend family can serve.
pub fn is_onnx(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "onnx")
}

/// True for TorchScript files (`model.pt`).
pub fn is_torchscript(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "pt")
}
