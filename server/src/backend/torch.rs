//! TorchScript backend: serves `model.pt` through libtorch (`tch`), on the CPU or one CUDA device per replica.
//!
//! A TorchScript module carries no typed I/O signature, so the signature comes from the model's config.toml: inputs
//! are passed to `forward` positionally in config order, and the outputs (one tensor, or a tuple/list of them) are
//! matched to the configured outputs in order. A model whose tensors do not fit what the config declares fails its
//! first request with an error naming the tensor, and keeps serving.

use super::{Backend, BackendError, BatchInput, BatchOutput, Signature, TensorSpec};
use crate::gpu::Placement;
use crate::tensor::DataType;
use bytes::Bytes;
use std::path::Path;
use std::sync::OnceLock;
use tch::{CModule, Device, IValue, Kind, Tensor};

/// The libtorch release tch 0.24 is built against (the GPU image ships torch 2.11).
pub const LIBTORCH_VERSION: &str = "2.11.0";

/// libtorch kind for a KServe datatype; `None` for those TorchScript cannot take (unsigned wider than 8 bits, BYTES).
pub fn kind_of(dt: DataType) -> Option<Kind> {
    Some(match dt {
        DataType::Bool => Kind::Bool,
        DataType::Uint8 => Kind::Uint8,
        DataType::Int8 => Kind::Int8,
        DataType::Int16 => Kind::Int16,
        DataType::Int32 => Kind::Int,
        DataType::Int64 => Kind::Int64,
        DataType::Fp16 => Kind::Half,
        DataType::Bf16 => Kind::BFloat16,
        DataType::Fp32 => Kind::Float,
        DataType::Fp64 => Kind::Double,
        _ => return None,
    })
}

/// Registers libtorch's CUDA kernels. The binary does not link `libtorch_cuda.so` (that would make every start need
/// cuBLAS and cuDNN, even on a machine without a GPU); a CUDA placement loads it on first use, once per process.
fn load_torch_cuda() -> Result<(), BackendError> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libtorch_cuda runs its static initializers, which only register CUDA kernels and
            // hooks with the already loaded libtorch_cpu; the library stays loaded for the rest of the process.
            let lib = unsafe { libloading::Library::new("libtorch_cuda.so") }.map_err(|e| {
                format!(
                    "cannot load libtorch_cuda.so ({e}); put torch/lib and the nvidia wheels' lib folders on \
                     LD_LIBRARY_PATH"
                )
            })?;
            std::mem::forget(lib);
            Ok(())
        })
        .clone()
        .map_err(BackendError::Runtime)
}

/// The tch device of a placement, checking that libtorch can actually use it.
pub fn device_for(placement: Placement) -> Result<Device, BackendError> {
    match placement {
        Placement::Cpu => Ok(Device::Cpu),
        Placement::Cuda(n) => {
            load_torch_cuda()?;
            let count = tch::Cuda::device_count();
            if (n as i64) < count {
                Ok(Device::Cuda(n))
            } else {
                Err(BackendError::Runtime(format!(
                    "device cuda:{n} requested but libtorch sees {count} CUDA device(s)"
                )))
            }
        }
    }
}

/// One TorchScript module on one device, owned by one replica.
pub struct TorchBackend {
    module: CModule,
    signature: Signature,
    device: Device,
    provider: String,
    threads: i32,
    /// GPU replicas: a pinned host buffer, reused across batches, that each input is assembled in before its one
    /// copy to the device (a pageable buffer would be copied once more by the driver, through its own staging).
    staging: Option<Tensor>,
}

impl std::fmt::Debug for TorchBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchBackend")
            .field("signature", &self.signature)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl TorchBackend {
    /// Loads `path` onto `placement`. `signature` is what the config declares (batch dim included as -1).
    pub fn load(
        path: &Path,
        signature: Signature,
        placement: Placement,
        intra_op_threads: usize,
    ) -> Result<Self, BackendError> {
        let load_err = |reason: String| BackendError::Load {
            path: path.display().to_string(),
            reason,
        };
        if signature.inputs.is_empty() || signature.outputs.is_empty() {
            return Err(load_err(
                "a TorchScript model declares no I/O types: list every [[input]] and [[output]] in config.toml"
                    .into(),
            ));
        }
        for spec in signature.inputs.iter().chain(&signature.outputs) {
            if kind_of(spec.datatype).is_none() {
                return Err(load_err(format!(
                    "{} is {}, which TorchScript tensors cannot hold",
                    spec.name, spec.datatype
                )));
            }
        }
        // The profiling executor re-profiles and recompiles (TensorExpr fusion, seconds for ResNet50) whenever it
        // meets a new input shape, and dynamic batching makes a new batch size a routine event: serve with the
        // simple executor, whose latency does not depend on which shapes came before. Process-wide, set once.
        static EXECUTOR: std::sync::Once = std::sync::Once::new();
        EXECUTOR.call_once(|| tch::jit::set_profiling_mode(false));
        let device = device_for(placement)?;
        let threads = i32::try_from(intra_op_threads.max(1)).unwrap_or(i32::MAX);
        tch::set_num_threads(threads);
        let mut module =
            CModule::load_on_device(path, device).map_err(|e| load_err(e.to_string()))?;
        module.set_eval();
        let provider = match device {
            Device::Cuda(n) => format!("libtorch:cuda:{n}"),
            _ => "libtorch:cpu".to_string(),
        };
        tracing::info!(path = %path.display(), provider, "loaded TorchScript model");
        Ok(Self {
            module,
            signature,
            device,
            provider,
            threads,
            staging: None,
        })
    }

    /// The host tensor an input of `bytes` bytes is assembled in: a fresh CPU tensor for a CPU replica (libtorch
    /// then reads it in place), a view of the pinned staging buffer for a GPU one.
    fn host_tensor(&mut self, shape: &[i64], kind: Kind, bytes: usize) -> Tensor {
        let Device::Cuda(_) = self.device else {
            return Tensor::empty(shape, (kind, Device::Cpu));
        };
        if bytes == 0 {
            return Tensor::empty(shape, (kind, Device::Cpu));
        }
        let capacity = self.staging.as_ref().map_or(0, |t| t.numel());
        if capacity < bytes {
            let grown = bytes.next_power_of_two() as i64;
            self.staging =
                Some(Tensor::empty([grown], (Kind::Uint8, Device::Cpu)).pin_memory(self.device));
        }
        let staging = self.staging.as_ref().expect("allocated above");
        staging
            .narrow(0, 0, bytes as i64)
            .view_dtype(kind)
            .reshape(shape)
    }

    /// Builds the batch tensor of one input: the parts are copied once, straight into the tensor's storage (on a
    /// GPU, into pinned memory, then once to the device; the copy is synchronous, so the staging buffer is free for
    /// the next input when this returns).
    fn input_tensor(&mut self, input: &BatchInput<'_>, kind: Kind) -> Result<Tensor, BackendError> {
        let size = input.datatype.size().unwrap_or(1);
        let elements = crate::tensor::element_count(&input.shape).ok_or_else(|| {
            BackendError::Run(format!(
                "input {}: invalid shape {:?}",
                input.name, input.shape
            ))
        })?;
        let total: usize = input.parts.iter().map(|p| p.len()).sum();
        if total != elements * size {
            return Err(BackendError::Run(format!(
                "input {}: {total} bytes do not fill shape {:?} of {}",
                input.name, input.shape, input.datatype
            )));
        }
        let tensor = self.host_tensor(&input.shape, kind, total);
        if total > 0 {
            // SAFETY: `tensor` is a contiguous CPU tensor of exactly `total` bytes (fresh, or the front of the staging
            // buffer, which no other tensor uses until this input reached the device).
            let dst =
                unsafe { std::slice::from_raw_parts_mut(tensor.data_ptr() as *mut u8, total) };
            let mut at = 0;
            for part in &input.parts {
                dst[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            if input.datatype == DataType::Bool {
                // libtorch reads any byte other than 0 or 1 in a bool tensor as undefined behavior.
                dst.iter_mut().for_each(|b| *b = u8::from(*b != 0));
            }
        }
        Ok(match self.device {
            Device::Cpu => tensor,
            d => tensor.to_device(d),
        })
    }

    /// Flattens what `forward` returned into tensors, in order.
    fn output_tensors(value: IValue) -> Result<Vec<Tensor>, BackendError> {
        match value {
            IValue::Tensor(t) => Ok(vec![t]),
            IValue::TensorList(ts) => Ok(ts),
            IValue::Tuple(vs) | IValue::GenericList(vs) => vs
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(BackendError::Run(format!(
                        "TorchScript output {i} is not a tensor ({})",
                        ivalue_kind(&other)
                    ))),
                })
                .collect(),
            other => Err(BackendError::Run(format!(
                "TorchScript forward returned {}, not a tensor or a tuple of tensors",
                ivalue_kind(&other)
            ))),
        }
    }

    fn output(spec: &TensorSpec, tensor: Tensor) -> Result<BatchOutput, BackendError> {
        let want = kind_of(spec.datatype)
            .ok_or_else(|| BackendError::Unsupported(spec.datatype.to_string()))?;
        let shape = tensor.size();
        let fits = shape.len() == spec.shape.len()
            && shape
                .iter()
                .zip(&spec.shape)
                .all(|(&got, &declared)| declared < 0 || got == declared);
        if tensor.kind() != want || !fits {
            return Err(BackendError::Run(format!(
                "TorchScript output for {} is {:?} {:?}, but config.toml declares {} {:?}",
                spec.name,
                tensor.kind(),
                shape,
                spec.datatype,
                spec.shape
            )));
        }
        let tensor = tensor.to_device(Device::Cpu).contiguous();
        let numel = tensor.numel();
        let mut data = vec![0u8; numel * spec.datatype.size().unwrap_or(1)];
        tensor
            .f_copy_data_u8(&mut data, numel)
            .map_err(|e| BackendError::Run(format!("reading output {}: {e}", spec.name)))?;
        Ok(BatchOutput {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            data: Bytes::from(data),
        })
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "Tensor",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a scalar",
        IValue::String(_) | IValue::StringList(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        IValue::Object(_) => "an object",
        _ => "a list",
    }
}

impl Backend for TorchBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn execution_provider(&self) -> &str {
        &self.provider
    }

    fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<BatchOutput>, BackendError> {
        // Intra-op threads are per calling thread in libtorch's OpenMP pool; the replica thread set them at load,
        // and setting them again is cheap insurance against a library that reset them.
        tch::set_num_threads(self.threads);
        let mut args = Vec::with_capacity(self.signature.inputs.len());
        for i in 0..self.signature.inputs.len() {
            let spec = self.signature.inputs[i].clone();
            let input = inputs
                .iter()
                .find(|i| i.name == spec.name)
                .ok_or_else(|| BackendError::Run(format!("missing input {}", spec.name)))?;
            if input.datatype != spec.datatype {
                return Err(BackendError::Run(format!(
                    "input {} is {}, the model takes {}",
                    spec.name, input.datatype, spec.datatype
                )));
            }
            let kind = kind_of(spec.datatype)
                .ok_or_else(|| BackendError::Unsupported(spec.datatype.to_string()))?;
            args.push(IValue::Tensor(self.input_tensor(input, kind)?));
        }
        if let Some(extra) = inputs
            .iter()
            .find(|i| !self.signature.inputs.iter().any(|s| s.name == i.name))
        {
            return Err(BackendError::Run(format!("unknown input {}", extra.name)));
        }
        let value = tch::no_grad(|| self.module.forward_is(&args)).map_err(|e| {
            BackendError::Run(format!(
                "TorchScript forward failed (do the inputs in config.toml match the model?): {e}"
            ))
        })?;
        let tensors = Self::output_tensors(value)?;
        if tensors.len() != self.signature.outputs.len() {
            return Err(BackendError::Run(format!(
                "TorchScript model returned {} output(s), config.toml declares {}",
                tensors.len(),
                self.signature.outputs.len()
            )));
        }
        self.signature
            .outputs
            .iter()
            .zip(tensors)
            .map(|(spec, t)| Self::output(spec, t))
            .collect()
    }
}
