//! Kafka message values to engine requests and answers back: the REST
//! bodies (JSON, or the binary tensor extension with its header length in
//! a Kafka header of the same name), or raw tensor bytes for one-input
//! models.

use crate::api::error::{ApiError, ApiErrorKind};
use crate::api::http::{self, BinaryOutputs};
use crate::engine::{Engine, InferRequest, InferResponse};
use crate::shm::SharedMemory;
use crate::tensor::Tensor;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;

/// How message values are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// A KServe v2 REST body: JSON, or the binary tensor extension when
    /// the message has an `Inference-Header-Content-Length` header.
    #[default]
    Kserve,
    /// The little-endian bytes of the model's one input; the shape comes
    /// from the model's dims, the batch dimension from the length.
    Raw,
}

/// The Kafka header that splits a binary-extension body.
pub const HEADER_LENGTH: &str = "Inference-Header-Content-Length";

/// A decoded message: the request and how its answer is written.
pub struct Decoded {
    pub request: InferRequest,
    pub answer: Answer,
}

/// Which outputs of the answer go as binary.
pub struct Answer(BinaryOutputs);

/// Why a message could not be scored: the reason header and the text.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub reason: &'static str,
    pub text: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        let reason = match e.kind {
            ApiErrorKind::Engine(k) => k.as_str(),
            ApiErrorKind::PayloadTooLarge => "payload_too_large",
            _ => "invalid_argument",
        };
        Refusal {
            reason,
            text: e.message,
        }
    }
}

impl From<crate::engine::EngineError> for Refusal {
    fn from(e: crate::engine::EngineError) -> Self {
        Refusal {
            reason: e.kind().as_str(),
            text: e.to_string(),
        }
    }
}

/// Decodes one message value for `model` (`version`: `None` the latest).
/// `headers` are the message's; only the header length is read from them.
pub fn decode(
    engine: &Engine,
    format: InputFormat,
    model: &str,
    version: Option<String>,
    headers: &[(String, Bytes)],
    value: Bytes,
    shm: &SharedMemory,
) -> Result<Decoded, Refusal> {
    match format {
        InputFormat::Kserve => {
            let mut map = HeaderMap::new();
            let mut binary = false;
            for (k, v) in headers {
                if k.eq_ignore_ascii_case(HEADER_LENGTH) {
                    let v = HeaderValue::from_bytes(v).map_err(|_| Refusal {
                        reason: "invalid_argument",
                        text: format!("header {HEADER_LENGTH} is not visible ASCII"),
                    })?;
                    map.insert(HeaderName::from_static(http::HEADER_LENGTH), v);
                    binary = true;
                }
            }
            let (request, answer, _shm_outputs) =
                http::decode_infer(model, version, &map, value, shm, binary)?;
            Ok(Decoded {
                request,
                answer: Answer(answer),
            })
        }
        InputFormat::Raw => {
            let mv = engine.model(model, version.as_deref())?;
            let cfg = mv.config();
            let [spec] = cfg.inputs.as_slice() else {
                return Err(Refusal {
                    reason: "invalid_argument",
                    text: format!(
                        "raw messages need a model with one input; {model} takes {}",
                        cfg.inputs.len()
                    ),
                });
            };
            let dims = spec.dims.clone();
            let bad = |text: String| Refusal {
                reason: "invalid_argument",
                text,
            };
            let elem = spec.datatype.size().ok_or_else(|| {
                bad(format!(
                    "input {:?} is BYTES: raw messages need a fixed-size datatype",
                    spec.name
                ))
            })?;
            if dims.iter().any(|&d| d < 0) {
                return Err(bad(format!(
                    "input {:?} has variable dims {dims:?}: raw messages need fixed ones",
                    spec.name
                )));
            }
            let row = dims.iter().product::<i64>() as usize * elem;
            let shape = if cfg.max_batch_size > 0 {
                if row == 0 || !value.len().is_multiple_of(row) || value.is_empty() {
                    return Err(bad(format!(
                        "{} bytes are not a whole number of rows of {row} bytes ({} {dims:?})",
                        value.len(),
                        spec.datatype.as_str()
                    )));
                }
                let mut s = vec![(value.len() / row) as i64];
                s.extend_from_slice(&dims);
                s
            } else {
                if value.len() != row {
                    return Err(bad(format!(
                        "{} bytes are not one tensor of {row} bytes ({} {dims:?})",
                        value.len(),
                        spec.datatype.as_str()
                    )));
                }
                dims
            };
            let request = InferRequest {
                model: model.to_string(),
                version,
                inputs: vec![Tensor {
                    name: spec.name.clone(),
                    datatype: spec.datatype,
                    shape,
                    data: value,
                }],
                ..Default::default()
            };
            Ok(Decoded {
                request,
                answer: Answer(BinaryOutputs::all()),
            })
        }
    }
}

impl Answer {
    /// The answer's value and, for the binary extension, its header length.
    pub fn encode(&self, resp: &InferResponse) -> (Bytes, Option<usize>) {
        http::encode_answer(resp, &self.0, &[])
    }
}
