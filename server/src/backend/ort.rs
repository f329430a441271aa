//! ONNX Runtime backend: loads `libonnxruntime.so` at run time and runs batches through one session per replica, on
//! the CPU or, with a `cuda:N` placement, on the CUDA execution provider (TensorRT first where the library has it).
//!
//! The runtime is loaded dynamically (`ort`'s `load-dynamic` feature) so the binary builds and starts without
//! ONNX Runtime installed; [`init_runtime`] finds the library, loads it once per process and commits the single
//! `ort` environment every session is built from. [`OrtBackend`] then maps KServe tensors (raw little-endian bytes,
//! Triton's length-prefixed layout for BYTES) onto ONNX Runtime tensors and back.

use super::{
    Backend, BackendError, BackendOptions, BatchInput, BatchOutput, Signature, TensorRt, TensorSpec,
};
use crate::gpu::Placement;
use crate::tensor::{self, DataType};
use bytes::Bytes;
use ort::{
    environment::Environment,
    logging::LogLevel,
    memory::Allocator,
    session::{builder::GraphOptimizationLevel, Session, SessionInputValue},
    value::{
        DynTensor, DynTensorValueType, Outlet, PrimitiveTensorElementType, TensorElementType,
        TensorRef, ValueType,
    },
    AsPointer,
};
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, PoisonError},
};

/// The ONNX Runtime release shoal is built and tested against (`ort` rc.15 needs API 1.31 or newer).
pub const ORT_VERSION: &str = "1.31.1";

/// What to do when no usable library is found; every "not found" error ends with it.
pub const ORT_HINT: &str =
    "set ORT_DYLIB_PATH to libonnxruntime.so from the onnxruntime==1.31.1 wheel, or run scripts/setup.sh";

const LIB_NAME: &str = "libonnxruntime.so";
const PREFERRED_LIB: &str = "libonnxruntime.so.1.31.1";
const EXECUTION_PROVIDER: &str = "CPUExecutionProvider";
const CUDA_PROVIDER: &str = "CUDAExecutionProvider";
const TENSORRT_PROVIDER: &str = "TensorrtExecutionProvider";

/// Where to look for `libonnxruntime.so`, in search order. Kept apart from the process environment so the search
/// order can be tested without touching global state (the runtime itself can only be loaded once per process).
#[derive(Debug, Clone, Default)]
pub struct LibrarySearch {
    /// A path given on the command line or in the config; it must exist.
    pub explicit: Option<PathBuf>,
    /// `ORT_DYLIB_PATH`; it must exist when set.
    pub env_path: Option<PathBuf>,
    /// `$SHOAL_HOME`, holding `venv/lib/python3*/site-packages/onnxruntime/capi/`.
    pub shoal_home: Option<PathBuf>,
    /// `$HOME`, holding `.cache/shoal/venv/...` (where scripts/setup.sh installs the wheel).
    pub home: Option<PathBuf>,
    /// System library directories, searched last.
    pub system_dirs: Vec<PathBuf>,
}

impl LibrarySearch {
    /// The search the server uses: `explicit`, then the process environment, then the usual install locations.
    pub fn from_process(explicit: Option<&Path>) -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self {
            explicit: explicit.map(Path::to_path_buf),
            env_path: var("ORT_DYLIB_PATH"),
            shoal_home: var("SHOAL_HOME"),
            home: var("HOME"),
            system_dirs: vec![PathBuf::from("/usr/local/lib"), PathBuf::from("/usr/lib")],
        }
    }
}

/// Finds the ONNX Runtime library. An explicit path or `ORT_DYLIB_PATH` that does not exist is an error rather than
/// a reason to fall back: silently loading some other copy would hide a misconfiguration.
pub fn find_library(search: &LibrarySearch) -> Result<PathBuf, BackendError> {
    if let Some(p) = &search.explicit {
        return existing(p, "the explicitly configured path");
    }
    if let Some(p) = &search.env_path {
        return existing(p, "ORT_DYLIB_PATH");
    }
    let mut searched = Vec::new();
    let venvs = [
        search.shoal_home.as_ref().map(|h| h.join("venv")),
        search.home.as_ref().map(|h| h.join(".cache/shoal/venv")),
    ];
    for venv in venvs.into_iter().flatten() {
        if let Some(found) = find_in_venv(&venv) {
            return Ok(found);
        }
        searched.push(
            venv.join("lib/python3*/site-packages/onnxruntime/capi")
                .display()
                .to_string(),
        );
    }
    for dir in &search.system_dirs {
        if let Some(found) = pick_library(dir) {
            return Ok(found);
        }
        searched.push(dir.display().to_string());
    }
    Err(BackendError::Runtime(format!(
        "{LIB_NAME} not found (searched: {}); {ORT_HINT}",
        if searched.is_empty() {
            "nothing".to_string()
        } else {
            searched.join(", ")
        }
    )))
}

/// `path` made absolute if it is a file. Absolute because `ort` would otherwise resolve a relative path against the
/// executable's directory, not the working directory this check used.
fn existing(path: &Path, source: &str) -> Result<PathBuf, BackendError> {
    if path.is_file() {
        Ok(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()))
    } else {
        Err(BackendError::Runtime(format!(
            "ONNX Runtime library {} from {source} does not exist; {ORT_HINT}",
            path.display()
        )))
    }
}

/// Searches `venv/lib/python3*/site-packages/onnxruntime/capi/`, newest Python first.
fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let mut pythons: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(venv.join("lib"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("python")?;
            version
                .starts_with('3')
                .then(|| (version_key(version), e.path()))
        })
        .collect();
    pythons.sort();
    pythons
        .iter()
        .rev()
        .find_map(|(_, dir)| pick_library(&dir.join("site-packages/onnxruntime/capi")))
}

/// Picks `libonnxruntime.so*` in `dir`: the tested release if present, else the highest version suffix. Names such as
/// `libonnxruntime_providers_shared.so` do not match.
fn pick_library(dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<(Vec<u64>, String)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let suffix = name.strip_prefix(LIB_NAME)?;
            let key = if name == PREFERRED_LIB {
                vec![u64::MAX]
            } else if suffix.is_empty() || suffix.starts_with('.') {
                version_key(suffix)
            } else {
                return None;
            };
            Some((key, name))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, name)| dir.join(name))
}

/// Numeric sort key of a dotted version such as `3.11` or `.1.31.1` (non-numeric parts count as 0).
fn version_key(s: &str) -> Vec<u64> {
    s.split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

struct Runtime {
    path: PathBuf,
    env: Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Serializes the first initialization; `OnceLock::get_or_try_init` is not stable yet.
static INIT: Mutex<()> = Mutex::new(());

/// Loads ONNX Runtime and commits the process-wide environment, once; returns the library path in use.
///
/// Later calls return the first path. A failed attempt is not remembered, so a caller may retry with another path.
/// An explicit path that does not exist is always an error, even after initialization, so a misconfigured path is
/// reported rather than masked by an earlier successful load.
pub fn init_runtime(explicit: Option<&Path>) -> Result<PathBuf, BackendError> {
    let explicit = explicit
        .map(|p| existing(p, "the explicitly configured path"))
        .transpose()?;
    let explicit = explicit.as_deref();
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, explicit));
    }
    let _guard = INIT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(rt) = RUNTIME.get() {
        return Ok(already_loaded(rt, explicit));
    }
    let path = find_library(&LibrarySearch::from_process(explicit))?;
    // `init_from` rather than `init`: the latter panics when the library is missing or too old.
    let builder = ort::init_from(&path).map_err(|e| {
        BackendError::Runtime(format!("cannot load {}: {e}; {ORT_HINT}", path.display()))
    })?;
    // `ort` keeps only a weak reference to the environment and refuses to build a second one, so the one built here
    // must live for the rest of the process.
    let env = builder
        .with_name("shoal")
        .with_telemetry(false)
        .with_logger(Arc::new(forward_log))
        .build()
        .map_err(|e| {
            BackendError::Runtime(format!("cannot create the ONNX Runtime environment: {e}"))
        })?;
    // A custom logger makes ONNX Runtime report at verbose level, which costs time on every run; keep warnings up.
    env.set_log_level(LogLevel::Warning);
    tracing::info!(path = %path.display(), "loaded ONNX Runtime");
    let rt = RUNTIME.get_or_init(|| Runtime { path, env });
    Ok(rt.path.clone())
}

/// Sends ONNX Runtime's log lines to `tracing` instead of its own colored stderr output, so they share the server's
/// format and filters.
fn forward_log(level: LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    let message = message.trim_end();
    match level {
        LogLevel::Fatal | LogLevel::Error => {
            tracing::error!(target: "onnxruntime", category, location, "{message}")
        }
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Verbose => {
            tracing::trace!(target: "onnxruntime", category, location, "{message}")
        }
    }
}

fn already_loaded(rt: &Runtime, explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit.filter(|p| *p != rt.path) {
        tracing::warn!(
            requested = %p.display(),
            loaded = %rt.path.display(),
            "ONNX Runtime is already loaded; ignoring the requested library path"
        );
    }
    rt.path.clone()
}

/// The committed environment, initializing the runtime from the default search if needed. Public so that a tool
/// outside the server (`examples/ort_run_cost.rs`) builds its sessions in the same environment as shoal's.
pub fn environment() -> Result<&'static Environment, BackendError> {
    init_runtime(None)?;
    RUNTIME.get().map(|rt| &rt.env).ok_or_else(|| {
        BackendError::Runtime("ONNX Runtime environment missing after initialization".into())
    })
}

/// Registers the execution providers of `placement` and returns what took. ONNX Runtime falls back to the CPU
/// silently when a provider fails to register, so each is registered alone and its result checked: a GPU placement
/// whose CUDA provider does not take is an error, never a CPU session in disguise.
fn register_providers(
    builder: &mut ort::session::builder::SessionBuilder,
    placement: Placement,
    tensorrt: TensorRt,
) -> Result<String, String> {
    use ort::ep::ExecutionProvider;
    let Placement::Cuda(n) = placement else {
        ort::ep::CPU::default()
            .register(builder)
            .map_err(|e| format!("cannot register {EXECUTION_PROVIDER}: {e}"))?;
        return Ok(EXECUTION_PROVIDER.to_string());
    };
    let device = i32::try_from(n).map_err(|_| format!("device cuda:{n} out of range"))?;
    let cuda = ort::ep::CUDA::default().with_device_id(device);
    if !ort::ep::CUDA::is_available().unwrap_or(false) {
        return Err(format!(
            "device cuda:{n} requested, but this ONNX Runtime has no {CUDA_PROVIDER} (the onnxruntime wheel is \
             CPU-only: point ORT_DYLIB_PATH at libonnxruntime.so from onnxruntime-gpu)"
        ));
    }
    let mut took = Vec::new();
    let trt_available = ort::ep::TensorRT::is_available().unwrap_or(false);
    if tensorrt == TensorRt::Required && !trt_available {
        return Err(format!(
            "device cuda:{n}: the config asks for the tensorrt accelerator, and this ONNX Runtime has no \
             {TENSORRT_PROVIDER}"
        ));
    }
    if tensorrt != TensorRt::Off && trt_available {
        // Unless asked for, TensorRT is a bonus where its libraries are present; CUDA below is what the
        // placement needs.
        match ort::ep::TensorRT::default()
            .with_device_id(device)
            .register(builder)
        {
            Ok(()) => took.push(TENSORRT_PROVIDER),
            Err(e) if tensorrt == TensorRt::Required => {
                return Err(format!(
                    "device cuda:{n}: {TENSORRT_PROVIDER} (asked for by the config) did not register: {e}"
                ))
            }
            Err(e) => tracing::info!(error = %e, "TensorRT execution provider not used"),
        }
    }
    cuda.register(builder)
        .map_err(|e| format!("device cuda:{n}: {CUDA_PROVIDER} did not register: {e}"))?;
    took.push(CUDA_PROVIDER);
    Ok(format!("{}:cuda:{n}", took.join(",")))
}

/// One ONNX Runtime session, owned by one replica.
pub struct OrtBackend {
    session: Session,
    signature: Signature,
    /// ONNX Runtime's default CPU allocator, which string and half-precision input tensors are built in.
    allocator: Allocator,
    /// Where the other inputs are gathered when they cannot be lent to the run as they are (several parts, or bytes
    /// not aligned for their type): one buffer per graph input, kept from run to run.
    staging: Vec<Vec<u64>>,
    /// The providers that registered, most preferred first, and the device (e.g.
    /// `CUDAExecutionProvider:cuda:0`); nodes a GPU provider cannot take still run on the CPU provider.
    provider: String,
}

impl fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrtBackend")
            .field("signature", &self.signature)
            .field("execution_provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl OrtBackend {
    /// Loads `path` into a new session (initializing the runtime if needed) and reads its signature.
    pub fn load(path: &Path, opts: &BackendOptions) -> Result<OrtBackend, BackendError> {
        let load_err = |reason: String| BackendError::Load {
            path: path.display().to_string(),
            reason,
        };
        let env = environment()?;
        if !path.is_file() {
            return Err(load_err("file not found".into()));
        }
        let err = |e: &dyn fmt::Display| load_err(e.to_string());
        let mut builder = Session::builder(env).map_err(|e| err(&e))?;
        let provider =
            register_providers(&mut builder, opts.placement, opts.tensorrt).map_err(load_err)?;
        let session = builder
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| err(&e))?
            .with_intra_threads(opts.intra_op_threads)
            .map_err(|e| err(&e))?
            .with_inter_threads(opts.inter_op_threads)
            .map_err(|e| err(&e))?
            .commit_from_file(path)
            .map_err(|e| err(&e))?;
        let signature = Signature {
            inputs: specs(session.inputs(), "input").map_err(load_err)?,
            outputs: specs(session.outputs(), "output").map_err(load_err)?,
        };
        tracing::info!(path = %path.display(), provider, "loaded ONNX model");
        Ok(OrtBackend {
            session,
            signature,
            allocator: Allocator::default(),
            staging: Vec::new(),
            provider,
        })
    }
}

/// Inputs gathered in a staging buffer larger than this are let go after the run, so that one large batch does not
/// hold its memory for the replica's lifetime.
const STAGING_KEEP_MAX_BYTES: usize = 16 << 20;

/// The ONNX Runtime value of one batch input. A lone part whose bytes are aligned for their type is lent to the run
/// as it is (no allocation, no copy); several parts, or misaligned ones, are copied once into `staging` and lent from
/// there. Strings and half-precision types get a tensor of ONNX Runtime's own (`ort` is built without its `half`
/// feature). ONNX Runtime only reads a run's inputs: it never plans an output or an intermediate into a buffer it was
/// given.
fn input_value<'v>(
    input: &'v BatchInput<'v>,
    allocator: &Allocator,
    staging: &'v mut Vec<u64>,
) -> Result<SessionInputValue<'v>, BackendError> {
    let name = input.name;
    let count = tensor::element_count(&input.shape).ok_or_else(|| {
        BackendError::Run(format!("input `{name}`: invalid shape {:?}", input.shape))
    })?;
    let Some(size) = input.datatype.size() else {
        return string_tensor(allocator, input, count).map(SessionInputValue::from);
    };
    let total: usize = input.parts.iter().map(|p| p.len()).sum();
    let expected = count.checked_mul(size);
    if expected != Some(total) {
        return Err(BackendError::Run(format!(
            "input `{name}`: shape {:?} of {} needs {} bytes, got {total}",
            input.shape,
            input.datatype,
            expected.map_or_else(|| "too many".to_string(), |n| n.to_string()),
        )));
    }
    if total == 0 || matches!(input.datatype, DataType::Fp16 | DataType::Bf16) {
        return owned_tensor(input, allocator, total).map(SessionInputValue::from);
    }
    let bytes: &'v [u8] = match input.parts.as_slice() {
        [part]
            if input.datatype != DataType::Bool
                && (part.as_ptr() as usize).is_multiple_of(size) =>
        {
            part
        }
        parts => gather(parts, input.datatype == DataType::Bool, total, staging),
    };
    let shape = input.shape.as_slice();
    let lent = match input.datatype {
        DataType::Bool => lend::<bool>(bytes, shape),
        DataType::Uint8 => lend::<u8>(bytes, shape),
        DataType::Uint16 => lend::<u16>(bytes, shape),
        DataType::Uint32 => lend::<u32>(bytes, shape),
        DataType::Uint64 => lend::<u64>(bytes, shape),
        DataType::Int8 => lend::<i8>(bytes, shape),
        DataType::Int16 => lend::<i16>(bytes, shape),
        DataType::Int32 => lend::<i32>(bytes, shape),
        DataType::Int64 => lend::<i64>(bytes, shape),
        DataType::Fp32 => lend::<f32>(bytes, shape),
        DataType::Fp64 => lend::<f64>(bytes, shape),
        DataType::Fp16 | DataType::Bf16 | DataType::Bytes => unreachable!("handled above"),
    };
    lent.map_err(|e| BackendError::Run(format!("input `{name}`: {e}")))
}

/// Lends `bytes` to ONNX Runtime as a tensor of `T` and `shape`.
///
/// The caller guarantees that `bytes` is aligned for `T`, holds exactly the shape's elements, and, for `bool`, only
/// the bytes 0 and 1.
fn lend<'v, T: PrimitiveTensorElementType + fmt::Debug + Clone + 'static>(
    bytes: &'v [u8],
    shape: &'v [i64],
) -> ort::Result<SessionInputValue<'v>> {
    debug_assert!((bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()));
    debug_assert!(bytes.len().is_multiple_of(std::mem::size_of::<T>()));
    // SAFETY: aligned and sized for `T` (above, from the caller); every bit pattern is a valid `T` for the numeric
    // types, and `bool` is only lent after `gather` wrote 0 or 1 into every byte.
    let data = unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr().cast::<T>(),
            bytes.len() / std::mem::size_of::<T>(),
        )
    };
    TensorRef::from_array_view((shape, data)).map(SessionInputValue::from)
}

/// Copies `parts` into `staging` (8-byte aligned, enough for every numeric type) and returns the `total` bytes; a
/// `bool` byte that is not 0 becomes 1, since ONNX Runtime reads C++ `bool`, for which any other byte is undefined.
fn gather<'s>(parts: &[&[u8]], bool: bool, total: usize, staging: &'s mut Vec<u64>) -> &'s [u8] {
    let words = total.div_ceil(8);
    if staging.len() < words {
        staging.resize(words, 0);
    }
    // SAFETY: `staging` holds at least `words * 8 >= total` initialized bytes; u8 has no alignment or validity needs.
    let dst = unsafe { std::slice::from_raw_parts_mut(staging.as_mut_ptr().cast::<u8>(), total) };
    copy_parts(dst, parts, bool);
    dst
}

/// Writes `parts` one after another into `dst`, which is exactly their total length; with `bool`, a byte that is
/// not 0 is written as 1.
fn copy_parts(dst: &mut [u8], parts: &[&[u8]], bool: bool) {
    let mut offset = 0;
    for part in parts {
        let chunk = &mut dst[offset..offset + part.len()];
        if bool {
            for (d, s) in chunk.iter_mut().zip(part.iter()) {
                *d = u8::from(*s != 0);
            }
        } else {
            chunk.copy_from_slice(part);
        }
        offset += part.len();
    }
}

/// A tensor in ONNX Runtime's own memory with the parts copied in: for the types `ort` cannot lend, and for empty
/// tensors (whose data pointer may dangle).
fn owned_tensor(
    input: &BatchInput<'_>,
    allocator: &Allocator,
    total: usize,
) -> Result<DynTensor, BackendError> {
    let name = input.name;
    let mut value = DynTensor::new(allocator, element_type(input.datatype), input.shape.clone())
        .map_err(|e| BackendError::Run(format!("input `{name}`: {e}")))?;
    if total == 0 {
        return Ok(value);
    }
    let ptr = value.data_ptr_mut().cast::<u8>();
    if ptr.is_null() {
        return Err(BackendError::Run(format!(
            "input `{name}`: ONNX Runtime gave no buffer"
        )));
    }
    // SAFETY: the tensor was just allocated on the CPU for `total` bytes, and nothing else refers to it yet.
    let dst = unsafe { std::slice::from_raw_parts_mut(ptr, total) };
    copy_parts(dst, &input.parts, false);
    Ok(value)
}

/// Builds a string tensor from Triton-serialized BYTES parts. Each element is written with
/// `GetResizedStringTensorElementBuffer` instead of `ort`'s `from_string_array`, which goes through C strings
/// and so cannot carry NUL bytes; BYTES elements are arbitrary bytes.
fn string_tensor(
    allocator: &Allocator,
    input: &BatchInput<'_>,
    count: usize,
) -> Result<DynTensor, BackendError> {
    let name = input.name;
    let mut found = 0usize;
    for part in &input.parts {
        found += tensor::count_bytes_elements(part).ok_or_else(|| {
            BackendError::Run(format!(
                "input `{name}`: malformed BYTES data (length prefix past the end)"
            ))
        })?;
    }
    if found != count {
        return Err(BackendError::Run(format!(
            "input `{name}`: shape {:?} needs {count} BYTES elements, got {found}",
            input.shape
        )));
    }
    let mut value = DynTensor::new(allocator, TensorElementType::String, input.shape.clone())
        .map_err(|e| BackendError::Run(format!("input `{name}`: {e}")))?;
    let raw = value.ptr_mut();
    let resize = ort::api().GetResizedStringTensorElementBuffer;
    let mut index = 0usize;
    for part in &input.parts {
        let mut rest: &[u8] = part;
        while let Some((header, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*header) as usize;
            let (element, tail) = tail.split_at(len); // in bounds: count_bytes_elements checked every prefix
            let mut buf: *mut std::ffi::c_char = std::ptr::null_mut();
            // SAFETY: `raw` is a live string tensor of `count` elements and `index < count`; ONNX Runtime resizes
            // that element to `len` bytes and returns its buffer, which is valid for `len` bytes of writes.
            unsafe {
                let status = resize(raw, index, len, &mut buf);
                ort::Error::result_from_status(status)
                    .map_err(|e| BackendError::Run(format!("input `{name}`: {e}")))?;
                if len > 0 {
                    std::ptr::copy_nonoverlapping(element.as_ptr(), buf.cast::<u8>(), len);
                }
            }
            index += 1;
            rest = tail;
        }
    }
    Ok(value)
}

impl Backend for OrtBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn execution_provider(&self) -> &str {
        &self.provider
    }

    fn runs_on_any_thread(&self) -> bool {
        // A CPU session's thread pools are its own, not the caller's; a GPU
        // session binds its device to the calling thread, so it stays home.
        self.provider == "CPUExecutionProvider"
    }

    fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<BatchOutput>, BackendError> {
        if self.staging.len() < inputs.len() {
            self.staging.resize_with(inputs.len(), Vec::new);
        }
        let mut values = Vec::with_capacity(inputs.len());
        for (input, staging) in inputs.iter().zip(self.staging.iter_mut()) {
            values.push((input.name, input_value(input, &self.allocator, staging)?));
        }
        let mut outputs = self
            .session
            .run(values)
            .map_err(|e| BackendError::Run(e.to_string()))?;
        let mut result = Vec::with_capacity(self.signature.outputs.len());
        for spec in &self.signature.outputs {
            let value = outputs
                .remove(spec.name.as_str())
                .ok_or_else(|| {
                    BackendError::Run(format!("output `{}` missing from the run", spec.name))
                })?
                .downcast::<DynTensorValueType>()
                .map_err(|e| BackendError::Run(format!("output `{}`: {e}", spec.name)))?;
            result.push(output(&spec.name, &value)?);
        }
        drop(outputs);
        for staging in &mut self.staging {
            if staging.capacity() * 8 > STAGING_KEEP_MAX_BYTES {
                *staging = Vec::new();
            }
        }
        Ok(result)
    }
}

/// Copies one output tensor into a [`BatchOutput`].
fn output(name: &str, value: &DynTensor) -> Result<BatchOutput, BackendError> {
    let datatype = data_type(*value.data_type()).ok_or_else(|| {
        BackendError::Run(format!(
            "output `{name}` has unsupported type {}",
            value.data_type()
        ))
    })?;
    let shape: Vec<i64> = value.shape().to_vec();
    let count = tensor::element_count(&shape)
        .ok_or_else(|| BackendError::Run(format!("output `{name}` has invalid shape {shape:?}")))?;
    if !value.memory_info().is_cpu_accessible() {
        return Err(BackendError::Run(format!(
            "output `{name}` is not in CPU memory"
        )));
    }
    let data = match datatype.size() {
        None => string_output(name, value, count)?,
        Some(size) => {
            let len = count * size; // cannot overflow: ONNX Runtime allocated this many bytes
            let ptr = value.data_ptr().cast::<u8>();
            if len == 0 || ptr.is_null() {
                Bytes::new()
            } else {
                // SAFETY: a CPU tensor of `count` elements of `size` bytes; `value` outlives the borrow.
                Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) })
            }
        }
    };
    Ok(BatchOutput {
        name: name.to_string(),
        datatype,
        shape,
        data,
    })
}

/// Serializes a string tensor into Triton's BYTES layout. Reads the raw content and offsets because `ort`'s
/// `try_extract_strings` rejects elements that are not UTF-8.
fn string_output(name: &str, value: &DynTensor, count: usize) -> Result<Bytes, BackendError> {
    if count == 0 {
        return Ok(Bytes::new());
    }
    let err = |e: ort::Error| BackendError::Run(format!("output `{name}`: {e}"));
    let raw = value.ptr();
    let mut total = 0usize;
    let mut offsets = vec![0usize; count];
    let mut content = Vec::<u8>::new();
    // SAFETY: `raw` is a live string tensor of `count` elements; `content` and `offsets` are sized as ONNX Runtime
    // requires (`total` bytes, `count` offsets).
    unsafe {
        ort::Error::result_from_status((ort::api().GetStringTensorDataLength)(raw, &mut total))
            .map_err(err)?;
        content.resize(total, 0);
        ort::Error::result_from_status((ort::api().GetStringTensorContent)(
            raw,
            content.as_mut_ptr().cast(),
            total,
            offsets.as_mut_ptr(),
            count,
        ))
        .map_err(err)?;
    }
    let mut out = Vec::with_capacity(total + 4 * count);
    for (i, &start) in offsets.iter().enumerate() {
        let end = offsets.get(i + 1).copied().unwrap_or(total);
        let element = content
            .get(start..end)
            .ok_or_else(|| BackendError::Run(format!("output `{name}`: bad string offsets")))?;
        let len = u32::try_from(element.len())
            .map_err(|_| BackendError::Run(format!("output `{name}`: element over 4 GiB")))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(element);
    }
    Ok(Bytes::from(out))
}

/// Reads the specs of a session's inputs or outputs; only tensors of KServe datatypes are accepted.
fn specs(outlets: &[Outlet], kind: &str) -> Result<Vec<TensorSpec>, String> {
    outlets
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                let datatype = data_type(*ty).ok_or_else(|| {
                    format!(
                        "{kind} `{}` has element type {ty}, which has no KServe datatype",
                        outlet.name()
                    )
                })?;
                Ok(TensorSpec {
                    name: outlet.name().to_string(),
                    datatype,
                    // ONNX Runtime reports symbolic and unknown dimensions as -1 already; clamp for safety.
                    shape: shape.iter().map(|&d| d.max(-1)).collect(),
                })
            }
            other => Err(format!(
                "{kind} `{}` is a {other}, not a tensor",
                outlet.name()
            )),
        })
        .collect()
}

/// ONNX element type of a KServe datatype (BYTES is an ONNX string).
fn element_type(d: DataType) -> TensorElementType {
    match d {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp16 => TensorElementType::Float16,
        DataType::Bf16 => TensorElementType::Bfloat16,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
    }
}

/// KServe datatype of an ONNX element type; `None` for types KServe cannot carry (complex, float8, int4, ...).
fn data_type(t: TensorElementType) -> Option<DataType> {
    Some(match t {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::Uint8,
        TensorElementType::Uint16 => DataType::Uint16,
        TensorElementType::Uint32 => DataType::Uint32,
        TensorElementType::Uint64 => DataType::Uint64,
        TensorElementType::Int8 => DataType::Int8,
        TensorElementType::Int16 => DataType::Int16,
        TensorElementType::Int32 => DataType::Int32,
        TensorElementType::Int64 => DataType::Int64,
        TensorElementType::Float16 => DataType::Fp16,
        TensorElementType::Bfloat16 => DataType::Bf16,
        TensorElementType::Float32 => DataType::Fp32,
        TensorElementType::Float64 => DataType::Fp64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A model of the repository; the `.onnx` files are generated, not committed.
    fn model(name: &str) -> PathBuf {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../model_repository"))
            .join(name)
            .join("1/model.onnx");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/setup.sh to generate models",
            path.display()
        );
        path
    }

    fn load(name: &str) -> OrtBackend {
        OrtBackend::load(&model(name), &BackendOptions::default())
            .unwrap_or_else(|e| panic!("loading {name}: {e}"))
    }

    /// Deterministic pseudo-random floats in [0, 1).
    fn floats(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }

    /// The `types` model's inputs, `rows` rows of 4 elements each, every one sent as a single part.
    fn one_part_each<'a>(
        rows: i64,
        inputs: impl Iterator<Item = (&'a str, DataType, &'a Vec<u8>)>,
    ) -> Vec<BatchInput<'a>> {
        inputs
            .map(|(name, datatype, bytes)| BatchInput {
                name,
                datatype,
                shape: vec![rows, 4],
                parts: vec![bytes],
            })
            .collect()
    }

    fn run_ffnn(backend: &mut OrtBackend, parts: &[&[u8]], rows: i64) -> Vec<f32> {
        let out = backend
            .run(&[BatchInput {
                name: "input",
                datatype: DataType::Fp32,
                shape: vec![rows, 784],
                parts: parts.to_vec(),
            }])
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "output");
        assert_eq!(out[0].datatype, DataType::Fp32);
        assert_eq!(out[0].shape, vec![rows, 10]);
        out[0]
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, b"").unwrap();
    }

    fn capi(root: &Path, python: &str) -> PathBuf {
        root.join("lib")
            .join(python)
            .join("site-packages/onnxruntime/capi")
    }

    #[test]
    fn find_library_follows_search_order() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let explicit = t.join("explicit/libonnxruntime.so");
        let env = t.join("env/libonnxruntime.so.1.31.1");
        let shoal_home = t.join("shoal_home");
        let home = t.join("home");
        let system = t.join("usr_lib");
        touch(&explicit);
        touch(&env);
        touch(&capi(&shoal_home.join("venv"), "python3.11").join("libonnxruntime.so.1.31.1"));
        touch(
            &capi(&home.join(".cache/shoal/venv"), "python3.12").join("libonnxruntime.so.1.31.1"),
        );
        touch(&system.join("libonnxruntime.so"));

        let mut search = LibrarySearch {
            explicit: Some(explicit.clone()),
            env_path: Some(env.clone()),
            shoal_home: Some(shoal_home.clone()),
            home: Some(home.clone()),
            system_dirs: vec![t.join("missing_dir"), system.clone()],
        };
        assert_eq!(find_library(&search).unwrap(), explicit);
        search.explicit = None;
        assert_eq!(find_library(&search).unwrap(), env);
        search.env_path = None;
        assert_eq!(
            find_library(&search).unwrap(),
            capi(&shoal_home.join("venv"), "python3.11").join("libonnxruntime.so.1.31.1")
        );
        search.shoal_home = None;
        assert_eq!(
            find_library(&search).unwrap(),
            capi(&home.join(".cache/shoal/venv"), "python3.12").join("libonnxruntime.so.1.31.1")
        );
        search.home = None;
        assert_eq!(
            find_library(&search).unwrap(),
            system.join("libonnxruntime.so")
        );
    }

    #[test]
    fn find_library_prefers_tested_release_then_highest_version() {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path();
        let venv = home.join(".cache/shoal/venv");
        // python3.12 holds no library: the search moves on to python3.11.
        fs::create_dir_all(capi(&venv, "python3.12")).unwrap();
        let dir = capi(&venv, "python3.11");
        for name in [
            "libonnxruntime.so",
            "libonnxruntime.so.1.30.0",
            "libonnxruntime.so.1.31.1",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
        ] {
            touch(&dir.join(name));
        }
        let search = LibrarySearch {
            home: Some(home.to_path_buf()),
            ..LibrarySearch::default()
        };
        assert_eq!(
            find_library(&search).unwrap(),
            dir.join("libonnxruntime.so.1.31.1")
        );
        fs::remove_file(dir.join("libonnxruntime.so.1.31.1")).unwrap();
        assert_eq!(
            find_library(&search).unwrap(),
            dir.join("libonnxruntime.so.1.32.0")
        );
    }

    #[test]
    fn find_library_errors_say_what_to_do() {
        let bogus = PathBuf::from("/nonexistent/shoal/libonnxruntime.so");
        let cases = [
            LibrarySearch {
                explicit: Some(bogus.clone()),
                ..LibrarySearch::default()
            },
            LibrarySearch {
                env_path: Some(bogus.clone()),
                ..LibrarySearch::default()
            },
            LibrarySearch {
                home: Some(PathBuf::from("/nonexistent/home")),
                system_dirs: vec![PathBuf::from("/nonexistent/lib")],
                ..LibrarySearch::default()
            },
        ];
        for search in cases {
            let err = find_library(&search).unwrap_err();
            assert!(matches!(err, BackendError::Runtime(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(ORT_HINT), "{msg}");
            assert!(msg.contains("/nonexistent/"), "{msg}");
        }
    }

    #[test]
    fn init_runtime_rejects_bogus_explicit_path() {
        let err = init_runtime(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, BackendError::Runtime(_)), "{msg}");
        assert!(
            msg.contains("/nonexistent/libonnxruntime.so") && msg.contains(ORT_HINT),
            "{msg}"
        );
    }

    #[test]
    fn init_runtime_is_idempotent() {
        let first = init_runtime(None).unwrap_or_else(|e| panic!("{e}"));
        assert!(first.is_file());
        assert_eq!(init_runtime(None).unwrap(), first);
        assert_eq!(init_runtime(Some(&first)).unwrap(), first);
    }

    #[test]
    fn ffnn_signature_is_read_from_the_graph() {
        let backend = load("ffnn");
        assert_eq!(backend.execution_provider(), "CPUExecutionProvider");
        assert_eq!(
            backend.signature(),
            &Signature {
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
        );
    }

    #[test]
    fn ffnn_batch_of_parts_matches_parts_run_alone() {
        let mut backend = load("ffnn");
        let rows = [1usize, 2, 1];
        let parts: Vec<Vec<u8>> = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| bytemuck::cast_slice(&floats(r * 784, i as u64)).to_vec())
            .collect();
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let batched = run_ffnn(&mut backend, &slices, 4);
        for row in batched.chunks_exact(10) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "softmax row sums to {sum}");
        }
        let mut alone = Vec::new();
        for (part, &r) in slices.iter().zip(&rows) {
            alone.extend(run_ffnn(&mut backend, &[part], r as i64));
        }
        assert_eq!(alone.len(), batched.len());
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6,
                "element {i}: alone {a} vs batched {b}"
            );
        }
    }

    #[test]
    fn a_lone_aligned_input_is_lent_and_others_are_staged_with_the_same_answers() {
        let mut backend = load("ffnn");
        let x: Vec<u8> = bytemuck::cast_slice(&floats(2 * 784, 7)).to_vec();
        // Lent: one part, aligned for f32. ONNX Runtime reads it where it is, staging nothing, and leaves it as it was.
        let lent = run_ffnn(&mut backend, &[&x], 2);
        assert!(backend.staging[0].is_empty(), "a lent input was staged");
        assert_eq!(x, bytemuck::cast_slice::<f32, u8>(&floats(2 * 784, 7)));
        // Staged: the same bytes one byte off alignment, then as two parts.
        let mut shifted = vec![0u8; x.len() + 1];
        shifted[1..].copy_from_slice(&x);
        let misaligned = &shifted[1..];
        assert!(!(misaligned.as_ptr() as usize).is_multiple_of(4));
        assert_eq!(run_ffnn(&mut backend, &[misaligned], 2), lent);
        assert_eq!(backend.staging[0].len(), 2 * 784 / 2);
        let (a, b) = x.split_at(784 * 4);
        assert_eq!(run_ffnn(&mut backend, &[a, b], 2), lent);
        // A batch past the bound on what is kept lets its staging buffer go after the run.
        let rows = STAGING_KEEP_MAX_BYTES / (784 * 4) + 1;
        let big: Vec<u8> = bytemuck::cast_slice(&floats(rows * 784, 8)).to_vec();
        let (a, b) = big.split_at(784 * 4);
        assert_eq!(
            run_ffnn(&mut backend, &[a, b], rows as i64).len(),
            rows * 10
        );
        assert_eq!(backend.staging[0].capacity(), 0);
    }

    #[test]
    fn types_round_trip_every_datatype() {
        let mut backend = load("types");
        let sig = backend.signature().clone();
        assert_eq!(sig.inputs.len(), 13);
        for spec in sig.inputs.iter().chain(&sig.outputs) {
            assert_eq!(spec.shape, vec![-1, 4], "{}", spec.name);
        }

        // Two rows, sent as two parts of one row each so the batch path is exercised too.
        let numeric = |d: DataType| -> Vec<u8> {
            let n = 8 * d.size().unwrap();
            (0..n).map(|i| (i * 37 + 11) as u8).collect()
        };
        let fp16: Vec<u8> = [1.5f32, -2.0, 0.0, 65504.0, 1e-7, -0.0, 3.25, f32::INFINITY]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let bool_bytes = vec![1u8, 0, 0, 1, 1, 1, 0, 0];
        let strings: [&[u8]; 8] = [
            b"",
            b"a",
            b"hello world",
            b"\0nul\0",
            &[0xff, 0xfe, 0x80],
            b"x",
            b"",
            b"last",
        ];
        let row = |elements: &[&[u8]]| tensor::join_bytes_elements(elements.iter().copied());
        let bytes_rows = [row(&strings[..4]), row(&strings[4..])];

        // (input name, datatype, all bytes, the two parts)
        type Case = (String, DataType, Vec<u8>, Vec<Vec<u8>>);
        let mut data: Vec<Case> = Vec::new();
        for spec in &sig.inputs {
            let (whole, parts) = match spec.datatype {
                DataType::Bytes => (bytes_rows.concat(), bytes_rows.to_vec()),
                d => {
                    let whole = match d {
                        DataType::Fp16 => fp16.clone(),
                        DataType::Bool => bool_bytes.clone(),
                        d => numeric(d),
                    };
                    let half_len = whole.len() / 2;
                    (
                        whole.clone(),
                        vec![whole[..half_len].to_vec(), whole[half_len..].to_vec()],
                    )
                }
            };
            data.push((spec.name.clone(), spec.datatype, whole, parts));
        }
        let inputs: Vec<BatchInput<'_>> = data
            .iter()
            .map(|(name, datatype, _, parts)| BatchInput {
                name,
                datatype: *datatype,
                shape: vec![2, 4],
                parts: parts.iter().map(Vec::as_slice).collect(),
            })
            .collect();
        let outputs = backend.run(&inputs).unwrap();
        assert_eq!(outputs.len(), 13);
        // The same rows as one part each: the numeric inputs lent to the run rather than staged.
        let whole = one_part_each(2, data.iter().map(|(n, d, w, _)| (n.as_str(), *d, w)));
        let alone = backend.run(&whole).unwrap();
        for (a, b) in outputs.iter().zip(&alone) {
            assert_eq!((&a.name, &a.data[..]), (&b.name, &b.data[..]));
        }
        let mut seen = Vec::new();
        for (name, datatype, whole, _) in &data {
            let out_name = name.replacen("in_", "out_", 1);
            let out = outputs
                .iter()
                .find(|o| o.name == out_name)
                .expect(&out_name);
            assert_eq!(out.datatype, *datatype, "{out_name}");
            assert_eq!(out.shape, vec![2, 4], "{out_name}");
            assert_eq!(&out.data[..], &whole[..], "{out_name} differs from {name}");
            seen.push(*datatype);
        }
        for d in DataType::ALL.into_iter().filter(|d| *d != DataType::Bf16) {
            assert!(seen.contains(&d), "types model lacks {d}");
        }
    }

    #[test]
    fn bool_input_bytes_are_normalized() {
        let mut backend = load("types");
        let sig = backend.signature().clone();
        // Every input must be fed; zeros of the right size for all but `in_bool`.
        let zeros: Vec<(String, DataType, Vec<u8>)> = sig
            .inputs
            .iter()
            .map(|s| {
                let bytes = match s.datatype {
                    DataType::Bool => vec![0, 1, 2, 255],
                    DataType::Bytes => tensor::join_bytes_elements([&b""[..]; 4]),
                    d => vec![0; 4 * d.size().unwrap()],
                };
                (s.name.clone(), s.datatype, bytes)
            })
            .collect();
        let inputs = one_part_each(1, zeros.iter().map(|(n, d, b)| (n.as_str(), *d, b)));
        let outputs = backend.run(&inputs).unwrap();
        let out = outputs.iter().find(|o| o.name == "out_bool").unwrap();
        assert_eq!(&out.data[..], &[0, 1, 1, 1]);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let mut backend = load("ffnn");
        let data = vec![0u8; 783 * 4];
        // Byte count matches the declared shape, but the model wants 784 columns: ONNX Runtime rejects it.
        let err = backend
            .run(&[BatchInput {
                name: "input",
                datatype: DataType::Fp32,
                shape: vec![1, 783],
                parts: vec![&data],
            }])
            .unwrap_err();
        assert!(matches!(err, BackendError::Run(_)), "{err:?}");
        assert!(err.to_string().contains("input"), "{err}");

        let cases: [(DataType, Vec<i64>, &[u8]); 4] = [
            // bytes do not match the shape
            (DataType::Fp32, vec![1, 784], &data),
            // negative dimension
            (DataType::Fp32, vec![-1, 784], &data),
            // wrong datatype for the model
            (DataType::Int32, vec![1, 783], &data),
            // BYTES length prefix past the end
            (DataType::Bytes, vec![1], &[9, 0, 0, 0, b'a']),
        ];
        for (datatype, shape, bytes) in cases {
            let res = backend.run(&[BatchInput {
                name: "input",
                datatype,
                shape: shape.clone(),
                parts: vec![bytes],
            }]);
            assert!(
                matches!(res, Err(BackendError::Run(_))),
                "{datatype} {shape:?}: {res:?}"
            );
        }

        // unknown input name
        let ok = vec![0u8; 784 * 4];
        let res = backend.run(&[BatchInput {
            name: "nope",
            datatype: DataType::Fp32,
            shape: vec![1, 784],
            parts: vec![&ok],
        }]);
        assert!(matches!(res, Err(BackendError::Run(_))), "{res:?}");
        // the session still works afterwards
        assert_eq!(run_ffnn(&mut backend, &[&ok], 1).len(), 10);
    }

    #[test]
    fn missing_or_invalid_model_is_load_error() {
        let err = OrtBackend::load(
            Path::new("/nonexistent/model.onnx"),
            &BackendOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BackendError::Load { .. }), "{err:?}");
        let tmp = tempfile::tempdir().unwrap();
        let junk = tmp.path().join("model.onnx");
        fs::write(&junk, b"not an onnx model").unwrap();
        let err = OrtBackend::load(&junk, &BackendOptions::default()).unwrap_err();
        assert!(matches!(err, BackendError::Load { .. }), "{err:?}");
    }
}
