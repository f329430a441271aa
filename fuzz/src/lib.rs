//! What the fuzz targets share: one engine serving a mock model, a
//! shared-memory registry over a scratch directory with one region
//! registered, and the checks every decoded request must pass.
//!
//! The engine is real (queue, batcher, replica threads); only the backend
//! is the mock (`y = 2x + 1` on FP32 `x` of `[-1, 4]`), so a case reaches
//! every check between the wire and the model and the answer can be
//! verified, not merely survived.

use shoal::api::shm::ShmOutputs;
use shoal::backend::mock::{MockBackend, MockLog};
use shoal::backend::{Backend, Signature};
use shoal::shm::SharedMemory;
use shoal::tensor::DataType;
use shoal::{Engine, InferRequest};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The bytes of the scratch object behind region `r`.
pub const OBJECT_BYTES: usize = 256;

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub engine: Engine,
    /// Region `r` maps the whole scratch object `obj`.
    pub shm: SharedMemory,
    pub scratch: PathBuf,
    log: Arc<MockLog>,
}

/// Built once per process: libFuzzer calls the target millions of times.
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let log = Arc::new(MockLog::default());
        let mock = MockBackend::new(4, std::time::Duration::ZERO, log.clone());
        let engine = rt
            .block_on(async { mock.serve("m", "max_batch_size = 8\n") })
            .expect("mock model");
        let scratch = scratch_dir("engine");
        std::fs::write(scratch.join("obj"), vec![0x3f; OBJECT_BYTES]).expect("scratch object");
        let shm = SharedMemory::with_dir(&scratch);
        shm.register("r", "obj", 0, OBJECT_BYTES as u64)
            .expect("region r");
        Harness {
            rt,
            engine,
            shm,
            scratch,
            log,
        }
    })
}

/// A fresh directory for this process's shared-memory objects.
pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-fuzz-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Runs a decoded request through the engine and checks the answer: when
/// it succeeds, `y` is `2x + 1` of the `x` that was sent, row for row
/// (a batcher that mixed up rows or requests fails here), and the outputs
/// bound for shared memory are written or refused without a panic.
pub fn serve(h: &Harness, request: InferRequest, shm_outputs: Option<&ShmOutputs>) {
    let expected: Option<Vec<u32>> = request
        .inputs
        .iter()
        .find(|t| t.name == "x" && t.datatype == DataType::Fp32)
        .map(|x| {
            x.data
                .chunks_exact(4)
                .map(|c| {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    (v * 2.0 + 1.0).to_bits()
                })
                .collect()
        });
    let result = h.rt.block_on(h.engine.infer(request));
    // The mock logs every batch; a long run would grow it without end.
    h.log.batches.lock().clear();
    count(result.is_ok());
    let mut response = match result {
        Ok(r) => r,
        Err(e) => return refused(&e),
    };
    if let (Some(expected), Some(y)) = (expected, response.outputs.iter().find(|t| t.name == "y")) {
        let got: Vec<u32> = y
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).to_bits())
            .collect();
        assert_eq!(got, expected, "y is not 2x + 1 of this request's x");
    }
    if let Some(outs) = shm_outputs {
        let _ = outs.write(&mut response);
    }
}

/// Counts the requests that decoded and those the engine answered with
/// outputs, printed at every power of two (scripts/fuzz.sh reports the
/// last): proof that the cases get past the decoders.
fn count(answered: bool) {
    static DECODED: AtomicU64 = AtomicU64::new(0);
    static ANSWERED: AtomicU64 = AtomicU64::new(0);
    let d = DECODED.fetch_add(1, Ordering::Relaxed) + 1;
    let a = ANSWERED.fetch_add(answered as u64, Ordering::Relaxed) + answered as u64;
    if d.is_power_of_two() && d >= 1024 {
        eprintln!("shoal-fuzz: {d} requests decoded, {a} answered with outputs");
    }
}

/// Says why a case was refused when `SHOAL_FUZZ_DEBUG` is set: for
/// checking that a new seed gets as far as it should (`<binary> <seed>`).
pub fn refused(what: &dyn std::fmt::Debug) {
    static DEBUG: OnceLock<bool> = OnceLock::new();
    if *DEBUG.get_or_init(|| std::env::var_os("SHOAL_FUZZ_DEBUG").is_some()) {
        eprintln!("shoal-fuzz: refused: {what:?}");
    }
}

/// The mock model's graph, for resolving parsed configs against.
pub fn graph() -> Signature {
    // The mock model's own signature: FP32 `x` and `y` of [-1, 4].
    MockBackend::new(4, std::time::Duration::ZERO, Arc::new(MockLog::default()))
        .signature()
        .clone()
}
