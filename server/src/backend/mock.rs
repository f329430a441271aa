//! A deterministic in-process backend for tests of the batcher and the
//! engine: `output = input * 2 + 1` (FP32), an optional delay per batch, and
//! a log of the batch sizes it ran.

use super::{Backend, BackendError, BatchInput, BatchOutput, Signature, TensorSpec};
use crate::tensor::DataType;
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// What every instance of a mock records, shared with the test.
#[derive(Debug, Default)]
pub struct MockLog {
    /// Rows of every executed batch, in execution order.
    pub batches: Mutex<Vec<usize>>,
    /// The thread that ran each batch, in execution order.
    pub threads: Mutex<Vec<std::thread::ThreadId>>,
}

#[derive(Debug, Clone)]
pub struct MockBackend {
    signature: Signature,
    delay: Duration,
    log: Arc<MockLog>,
    fail: bool,
    panic_on: Option<f32>,
    /// A run whose input holds this value blocks for this long.
    hang_on: Option<(f32, Duration)>,
    /// A run whose input holds this value blocks until the gate opens.
    gate: Option<(f32, Arc<Gate>)>,
}

/// A gate a test opens once it has set up what must happen while a run
/// blocks ([`MockBackend::gated_on`]).
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    opened: parking_lot::Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
    }
}

impl MockBackend {
    /// One FP32 input `x` of shape `[-1, width]` and one output `y` alike.
    pub fn new(width: i64, delay: Duration, log: Arc<MockLog>) -> Self {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, width],
        };
        Self {
            signature: Signature {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            delay,
            log,
            fail: false,
            panic_on: None,
            hang_on: None,
            gate: None,
        }
    }

    /// Like `new` but a run whose input holds `value` blocks until `gate`
    /// opens.
    pub fn gated_on(width: i64, value: f32, gate: Arc<Gate>, log: Arc<MockLog>) -> Self {
        Self {
            gate: Some((value, gate)),
            ..Self::new(width, Duration::ZERO, log)
        }
    }

    /// Like `new` but a run whose input holds `value` blocks for `for_`, as
    /// a backend stuck in a driver call would.
    pub fn hanging_on(width: i64, value: f32, for_: Duration, log: Arc<MockLog>) -> Self {
        Self {
            hang_on: Some((value, for_)),
            ..Self::new(width, Duration::ZERO, log)
        }
    }

    /// Like `new` but a run whose input holds `value` panics, as a backend
    /// bug (or tch on GPU memory exhaustion) would.
    pub fn panicking_on(width: i64, value: f32, log: Arc<MockLog>) -> Self {
        Self {
            panic_on: Some(value),
            ..Self::new(width, Duration::ZERO, log)
        }
    }

    /// This mock, but also panicking on `value` and blocking `for_` on
    /// `hang` (tests that mix every kind of trouble).
    pub fn troubled(mut self, panic_on: f32, hang: f32, for_: Duration) -> Self {
        self.panic_on = Some(panic_on);
        self.hang_on = Some((hang, for_));
        self
    }

    /// An engine serving `model` (version 1) from `config`, this mock on
    /// every replica: the setup of engine tests, benches and fuzz targets.
    pub fn serve(
        self,
        model: &str,
        config: &str,
    ) -> Result<crate::engine::Engine, crate::engine::LoadError> {
        let engine = crate::engine::Engine::new();
        let file = crate::engine::ModelConfigFile::parse(model, config)?;
        engine.add_version(
            model,
            1,
            &file,
            Arc::new(move || Ok(Box::new(self.clone()) as Box<dyn Backend>)),
        )?;
        Ok(engine)
    }

    /// Like `new` but every run fails, to test error propagation.
    pub fn failing(width: i64, log: Arc<MockLog>) -> Self {
        Self {
            fail: true,
            ..Self::new(width, Duration::ZERO, log)
        }
    }
}

impl Backend for MockBackend {
    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn execution_provider(&self) -> &str {
        "mock"
    }

    fn runs_on_any_thread(&self) -> bool {
        true
    }

    fn run(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<BatchOutput>, BackendError> {
        let x = &inputs[0];
        self.log.batches.lock().push(x.shape[0] as usize);
        self.log.threads.lock().push(std::thread::current().id());
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if self.fail {
            return Err(BackendError::Run("mock failure".into()));
        }
        let bytes = super::concat_parts(&x.parts);
        if let Some(v) = self.panic_on {
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            assert!(!values.contains(&v), "mock backend: poisoned input {v}");
        }
        if let Some((v, d)) = self.hang_on {
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            if values.contains(&v) {
                std::thread::sleep(d);
            }
        }
        if let Some((v, gate)) = &self.gate {
            let values: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
            if values.contains(v) {
                gate.wait();
            }
        }
        let out: Vec<u8> = bytes
            .chunks_exact(4)
            .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 2.0 + 1.0).to_le_bytes())
            .collect();
        Ok(vec![BatchOutput {
            name: "y".into(),
            datatype: DataType::Fp32,
            shape: x.shape.clone(),
            data: Bytes::from(out),
        }])
    }
}
