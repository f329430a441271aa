//! Triton's `config.pbtxt`: parsed with a real protobuf text-format parser
//! (prost-reflect) against shoal's declaration of Triton's `ModelConfig`,
//! mapped onto [`ModelConfigFile`], and checked field by field so that what
//! shoal does not implement is named at load: a warning where ignoring it
//! cannot change a result, an error where it could.

use super::config::{
    ConfigError, ControlFile, DeviceFile, DynamicBatchingFile, IoFile, KeyedStateFile,
    ModelConfigFile, QueuePolicyFile, SequenceStateFile, VersionPolicy, WarmupFile,
    WarmupInputFile,
};
use crate::tensor::DataType;
use miette::Diagnostic;
use prost_reflect::{
    DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use shoal_proto as pb;
use std::sync::{Arc, OnceLock};

/// A config.pbtxt read into shoal's terms, and what of it shoal ignores.
#[derive(Debug)]
pub struct Parsed {
    pub config: ModelConfigFile,
    /// One line per ignored field, naming it.
    pub warnings: Vec<String>,
}

/// The `inference.ModelConfig` descriptor compiled into shoal-proto.
pub fn model_config_descriptor() -> MessageDescriptor {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET)
            .expect("shoal-proto's build wrote a valid descriptor set")
    })
    .get_message_by_name("inference.ModelConfig")
    .expect("model_config.proto declares inference.ModelConfig")
}

/// What shoal does with a field of `ModelConfig`, by its path of field
/// names (list and map positions left out).
enum Verdict {
    /// In effect (the mapping below reads it).
    Use,
    /// A message whose fields get their own verdicts.
    Descend,
    /// Ignoring it could change what a client gets back: the load fails.
    Refuse(&'static str),
}

fn verdict(path: &str) -> Option<Verdict> {
    use Verdict::*;
    Some(match path {
        "name" | "platform" | "backend" | "max_batch_size" | "default_model_filename"
        | "version_policy" | "parameters" | "model_warmup" => Use,
        "input" | "output" | "instance_group" | "dynamic_batching" => Descend,
        "input.name" | "input.data_type" | "input.dims" | "input.format" | "input.reshape" => Use,
        "output.name" | "output.data_type" | "output.dims" | "output.reshape" => Use,
        "instance_group.name" | "instance_group.kind" | "instance_group.count"
        | "instance_group.gpus" => Use,
        "dynamic_batching.preferred_batch_size"
        | "dynamic_batching.max_queue_delay_microseconds"
        | "dynamic_batching.preserve_ordering" => Use,
        "dynamic_batching.default_queue_policy"
        | "dynamic_batching.priority_levels"
        | "dynamic_batching.default_priority_level"
        | "dynamic_batching.priority_queue_policy" => Use,
        "ensemble_scheduling" => Refuse("ensembles are not served by shoal"),
        "optimization" | "optimization.execution_accelerators" => Descend,
        "optimization.execution_accelerators.gpu_execution_accelerator" => Use,
        "optimization.execution_accelerators.cpu_execution_accelerator" => Refuse(
            "CPU execution accelerators (OpenVINO) are not in shoal's ONNX Runtime; \
             the model would run on another provider than Triton gives it",
        ),
        "sequence_batching" | "sequence_batching.state" | "sequence_batching.direct"
        | "sequence_batching.oldest" => Descend,
        "sequence_batching.max_sequence_idle_microseconds"
        | "sequence_batching.control_input"
        | "sequence_batching.state.input_name"
        | "sequence_batching.state.output_name"
        | "sequence_batching.state.data_type"
        | "sequence_batching.state.dims"
        | "sequence_batching.state.initial_state"
        | "sequence_batching.direct.max_queue_delay_microseconds"
        | "sequence_batching.oldest.max_queue_delay_microseconds"
        | "sequence_batching.oldest.preferred_batch_size"
        | "sequence_batching.oldest.preserve_ordering" => Use,
        "sequence_batching.iterative_sequence" => {
            Refuse("iterative sequences (a request run repeatedly by the scheduler) are not implemented")
        }
        "input.is_shape_tensor" | "output.is_shape_tensor" => {
            Refuse("shape tensors (a TensorRT feature) are not implemented")
        }
        "batch_input" | "batch_output" => {
            Refuse("batch inputs and outputs are not implemented: the model would miss tensors Triton adds")
        }
        "model_transaction_policy" => {
            Refuse("decoupled models (several responses per request) are not implemented")
        }
        _ => return None,
    })
}

/// The `parameters` keys shoal reads: the thread counts as Triton's
/// onnxruntime backend names them, then shoal's own bound on a run on a
/// network thread, as config.toml names it (a model that may hang sets 0).
const PARAMETERS: [&str; 3] = [
    "intra_op_thread_count",
    "inter_op_thread_count",
    "inline_execution_max_us",
];

/// Parses `text`, the config.pbtxt of model directory `model` (`file` is
/// its path, for messages).
pub fn parse(model: &str, file: &str, text: &str) -> Result<Parsed, ConfigError> {
    let err = |reason: String| ConfigError {
        model: model.to_string(),
        reason: format!("{file}: {reason}"),
    };
    let (normalized, inserted) = list_colons(text);
    let msg =
        DynamicMessage::parse_text_format(model_config_descriptor(), &normalized).map_err(|e| {
            let at = e
                .labels()
                .and_then(|mut l| l.next())
                .map(|l| {
                    let off = l.offset();
                    line_col(text, off - inserted.iter().filter(|&&i| i < off).count())
                })
                .map_or_else(String::new, |(l, c)| format!("line {l}, column {c}: "));
            err(format!("{at}{e}"))
        })?;
    let mut refused = Vec::new();
    let mut warnings = Vec::new();
    check(&msg, "", &mut refused, &mut warnings);
    if !refused.is_empty() {
        return Err(err(refused.join("; ")));
    }
    let tc: pb::ModelConfig = msg
        .transcode_to()
        .map_err(|e| err(format!("cannot read the parsed config: {e}")))?;
    let mut config = map(model, &tc, &mut warnings).map_err(err)?;
    for (kind, io) in [("input", &mut config.input), ("output", &mut config.output)] {
        for t in io.iter_mut() {
            let line =
                line_of_name(text, &t.name).map_or_else(String::new, |l| format!(" line {l}"));
            t.at = Some(format!("{file}{line} ({kind} `{}`)", t.name));
        }
    }
    Ok(Parsed { config, warnings })
}

/// The line (1-based) where a tensor's `name: "..."` is written, for
/// messages about that tensor; the first such line outside comments.
fn line_of_name(text: &str, name: &str) -> Option<usize> {
    let quoted = format!("\"{name}\"");
    text.lines()
        .position(|l| {
            let code = l.split('#').next().unwrap_or_default();
            code.contains("name") && code.contains(&quoted)
        })
        .map(|i| i + 1)
}

/// Protobuf's own text-format parser (which Triton uses) lets a field name
/// stand before a list without a colon (`input [ { ... } ]`, the way every
/// Triton example writes it); prost-reflect wants `input: [ ... ]`. Adds
/// the colon where a field name (an identifier that is not a value after a
/// colon) meets `[`, skipping strings and comments, and returns the offsets
/// (in the result) where it did, to map error positions back.
fn list_colons(text: &str) -> (String, Vec<usize>) {
    #[derive(Clone, Copy, PartialEq)]
    enum Prev {
        Colon,
        FieldName,
        Other,
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    let mut prev = Prev::Other;
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        match c {
            '#' => {
                out.push(c);
                for (_, c) in chars.by_ref() {
                    out.push(c);
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                out.push(c);
                while let Some((_, d)) = chars.next() {
                    out.push(d);
                    if d == '\\' {
                        if let Some((_, e)) = chars.next() {
                            out.push(e);
                        }
                    } else if d == c || d == '\n' {
                        break;
                    }
                }
                prev = Prev::Other;
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                out.push(c);
                while let Some(&(_, d)) = chars.peek() {
                    if !(d.is_ascii_alphanumeric() || d == '_') {
                        break;
                    }
                    out.push(d);
                    chars.next();
                }
                prev = if prev == Prev::Colon {
                    Prev::Other
                } else {
                    Prev::FieldName
                };
            }
            c if c.is_whitespace() => out.push(c),
            '[' if prev == Prev::FieldName => {
                inserted.push(out.len());
                out.push(':');
                out.push('[');
                prev = Prev::Other;
            }
            ':' => {
                out.push(c);
                prev = Prev::Colon;
            }
            _ => {
                out.push(c);
                prev = Prev::Other;
            }
        }
    }
    (out, inserted)
}

/// 1-based line and column of byte `offset` of `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    // A position inside a multi-byte character (never expected) counts the whole text.
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Collects a refusal or warning for every set field shoal does not use.
fn check(
    msg: &DynamicMessage,
    prefix: &str,
    refused: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    for (fd, value) in msg.fields() {
        let path = if prefix.is_empty() {
            fd.name().to_string()
        } else {
            format!("{prefix}.{}", fd.name())
        };
        match verdict(&path) {
            Some(Verdict::Use) => {}
            Some(Verdict::Descend) => {
                let items: Vec<&DynamicMessage> = match value {
                    Value::Message(m) => vec![m],
                    Value::List(l) => l.iter().filter_map(Value::as_message).collect(),
                    _ => vec![],
                };
                for m in items {
                    check(m, &path, refused, warnings);
                }
            }
            Some(Verdict::Refuse(why)) => {
                refused.push(format!("field `{path}`: {why}"));
            }
            None => warnings.push(format!(
                "field `{path}` is not implemented by shoal and is ignored"
            )),
        }
    }
}

fn data_type(code: i32, what: &str) -> Result<String, String> {
    DataType::ALL
        .into_iter()
        .find(|d| d.triton_enum() == code)
        .map(|d| d.as_str().to_string())
        .ok_or_else(|| format!("{what}: data_type TYPE_INVALID (or missing)"))
}

/// Triton's platform and backend names onto shoal's platform.
fn platform(c: &pb::ModelConfig) -> Result<Option<String>, String> {
    let from_platform = match c.platform.as_str() {
        "" => None,
        p @ ("onnxruntime_onnx" | "pytorch_libtorch") => Some(p),
        "ensemble" => return Err("platform `ensemble`: ensembles are not served by shoal".into()),
        other => {
            return Err(format!(
                "platform `{other}` is not served by shoal (onnxruntime_onnx, pytorch_libtorch)"
            ))
        }
    };
    let from_backend = match c.backend.as_str() {
        "" => None,
        "onnxruntime" => Some("onnxruntime_onnx"),
        "pytorch" => Some("pytorch_libtorch"),
        other => {
            return Err(format!(
                "backend `{other}` is not served by shoal (onnxruntime, pytorch)"
            ))
        }
    };
    match (from_platform, from_backend) {
        (Some(p), Some(b)) if p != b => Err(format!(
            "platform `{}` and backend `{}` disagree",
            c.platform, c.backend
        )),
        (p, b) => Ok(p.or(b).map(str::to_string)),
    }
}

/// Most replicas a model may have, as `instance_count` in config.toml.
const MAX_INSTANCES: usize = 256;

/// Instance groups onto a replica count and a device per replica.
fn instances(
    groups: &[pb::ModelInstanceGroup],
    warnings: &mut Vec<String>,
) -> Result<(Option<usize>, Option<DeviceFile>), String> {
    use pb::model_instance_group::Kind;
    if groups.is_empty() {
        return Ok((None, None));
    }
    let mut devices = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let count = match g.count {
            0 => 1,
            n if n < 0 => return Err(format!("instance_group {i}: count {n} is negative")),
            n => n as usize,
        };
        // Checked before a device per replica is listed: a hostile count
        // must not become a vector of that length.
        let replicas = count.saturating_mul(g.gpus.len().max(1));
        if devices.len().saturating_add(replicas) > MAX_INSTANCES {
            return Err(format!(
                "instance_group {i}: {} instances in all, past the limit of {MAX_INSTANCES} replicas per model",
                devices.len().saturating_add(replicas)
            ));
        }
        let kind = Kind::try_from(g.kind)
            .map_err(|_| format!("instance_group {i}: unknown kind {}", g.kind))?;
        let per_device = |prefix: &str| -> Vec<String> {
            if g.gpus.is_empty() {
                vec![prefix.to_string(); count]
            } else {
                g.gpus
                    .iter()
                    .flat_map(|n| std::iter::repeat_n(format!("cuda:{n}"), count))
                    .collect()
            }
        };
        match kind {
            Kind::Cpu | Kind::Model => {
                if !g.gpus.is_empty() {
                    return Err(format!(
                        "instance_group {i}: gpus may not be given with kind {}",
                        kind.as_str_name()
                    ));
                }
                if kind == Kind::Model {
                    warnings.push(format!(
                        "instance_group {i}: KIND_MODEL runs on the CPU in shoal"
                    ));
                }
                devices.extend(std::iter::repeat_n("cpu".to_string(), count));
            }
            Kind::Gpu => devices.extend(per_device("cuda")),
            // KIND_AUTO with listed GPUs means those GPUs (Triton falls back
            // to the CPU only when one is missing); without, any GPU or CPU.
            Kind::Auto => devices.extend(per_device("auto")),
        }
    }
    let n = devices.len();
    let device = if devices.iter().all(|d| d == "cpu") {
        None
    } else {
        Some(DeviceFile::Many(devices))
    };
    Ok((Some(n), device))
}

fn map(
    model: &str,
    c: &pb::ModelConfig,
    warnings: &mut Vec<String>,
) -> Result<ModelConfigFile, String> {
    if !c.name.is_empty() && c.name != model {
        return Err(format!(
            "name `{}` differs from the model directory's name `{model}` (Triton requires them equal)",
            c.name
        ));
    }
    let platform = platform(c)?;
    if !matches!(
        c.default_model_filename.as_str(),
        "" | "model.onnx" | "model.pt"
    ) {
        return Err(format!(
            "default_model_filename `{}`: shoal loads model.onnx or model.pt",
            c.default_model_filename
        ));
    }
    let max_batch_size = u32::try_from(c.max_batch_size)
        .map_err(|_| format!("max_batch_size {} is negative", c.max_batch_size))?;
    let input = c
        .input
        .iter()
        .map(|t| {
            Ok(IoFile {
                name: t.name.clone(),
                datatype: data_type(t.data_type, &format!("input `{}`", t.name))?,
                dims: t.dims.clone(),
                reshape: t.reshape.as_ref().map(|r| r.shape.clone()),
                at: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    for t in c.input.iter().filter(|t| t.optional) {
        warnings.push(format!(
            "input `{}`: optional is not implemented; requests must carry it",
            t.name
        ));
    }
    let output = c
        .output
        .iter()
        .map(|t| {
            Ok(IoFile {
                name: t.name.clone(),
                datatype: data_type(t.data_type, &format!("output `{}`", t.name))?,
                dims: t.dims.clone(),
                reshape: t.reshape.as_ref().map(|r| r.shape.clone()),
                at: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let (instance_count, device) = instances(&c.instance_group, warnings)?;
    let mut threads = [None, None];
    let mut inline_execution_max_us = None;
    for (key, p) in &c.parameters {
        match PARAMETERS.iter().position(|k| k == key) {
            Some(i) => {
                let n: usize = p.string_value.trim().parse().map_err(|_| {
                    format!(
                        "parameters `{key}`: string_value {:?} is not a whole number",
                        p.string_value
                    )
                })?;
                match threads.get_mut(i) {
                    // Triton's onnxruntime backend reads 0 as "ORT's default".
                    Some(t) => *t = (n > 0).then_some(n),
                    None => inline_execution_max_us = Some(n as u64),
                }
            }
            None => warnings.push(format!(
                "parameters `{key}` is not a parameter shoal reads ({}) and is ignored",
                PARAMETERS.join(", ")
            )),
        }
    }
    // Without a dynamic_batching block Triton runs each request alone.
    let (dynamic_batching, batching) = match &c.dynamic_batching {
        None => (None, (max_batch_size > 0).then(|| "none".to_string())),
        Some(d) => {
            let preferred = d
                .preferred_batch_size
                .iter()
                .map(|&p| {
                    u32::try_from(p).map_err(|_| {
                        format!("dynamic_batching preferred_batch_size {p} is negative")
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let policy = |q: &pb::ModelQueuePolicy, what: &str, warnings: &mut Vec<String>| {
                let max_queue_size = match q.max_queue_size {
                    0 => {
                        warnings.push(format!(
                            "dynamic_batching {what} max_queue_size 0 (unbounded in Triton) is bounded at {} in shoal",
                            super::config::DEFAULT_MAX_QUEUE_SIZE
                        ));
                        None
                    }
                    n => Some(n as usize),
                };
                let action = match pb::model_queue_policy::TimeoutAction::try_from(q.timeout_action)
                {
                    Ok(pb::model_queue_policy::TimeoutAction::Delay) => "delay",
                    _ => "reject",
                };
                QueuePolicyFile {
                    timeout_action: Some(action.to_string()),
                    default_timeout_us: q.default_timeout_microseconds,
                    allow_timeout_override: q.allow_timeout_override,
                    max_queue_size,
                }
            };
            let default = d
                .default_queue_policy
                .as_ref()
                .map(|q| policy(q, "default_queue_policy", warnings))
                .unwrap_or_default();
            let mut priority_queue_policy = std::collections::BTreeMap::new();
            for (&level, q) in &d.priority_queue_policy {
                let level = u32::try_from(level)
                    .map_err(|_| format!("priority_queue_policy level {level} is out of range"))?;
                let what = format!("priority_queue_policy {level}");
                priority_queue_policy.insert(level.to_string(), policy(q, &what, warnings));
            }
            let levels = |v: u64, what: &str| {
                u32::try_from(v).map_err(|_| format!("dynamic_batching {what} {v} is out of range"))
            };
            (
                Some(DynamicBatchingFile {
                    max_queue_delay_us: d.max_queue_delay_microseconds,
                    preferred_batch_sizes: preferred,
                    max_queue_size: default.max_queue_size,
                    priority_levels: levels(d.priority_levels, "priority_levels")?,
                    default_priority_level: levels(
                        d.default_priority_level,
                        "default_priority_level",
                    )?,
                    timeout_action: default.timeout_action,
                    default_timeout_us: default.default_timeout_us,
                    allow_timeout_override: default.allow_timeout_override,
                    priority_queue_policy,
                }),
                None,
            )
        }
    };
    let sequence = match &c.sequence_batching {
        None => None,
        Some(sb) => Some(sequence(c, sb)?),
    };
    let (dynamic_batching, batching) = match &sequence {
        Some(s) => (Some(s.batching.clone()), None),
        None => (dynamic_batching, batching),
    };
    let version_policy = match c
        .version_policy
        .as_ref()
        .and_then(|v| v.policy_choice.as_ref())
    {
        None => VersionPolicy::Latest(1),
        Some(pb::model_version_policy::PolicyChoice::All(_)) => VersionPolicy::All,
        Some(pb::model_version_policy::PolicyChoice::Latest(l)) if l.num_versions == 0 => {
            return Err("version_policy latest: num_versions must be >= 1".into())
        }
        Some(pb::model_version_policy::PolicyChoice::Latest(l)) => {
            VersionPolicy::Latest(l.num_versions)
        }
        Some(pb::model_version_policy::PolicyChoice::Specific(s)) => VersionPolicy::Specific(
            s.versions
                .iter()
                .map(|&v| {
                    u64::try_from(v)
                        .map_err(|_| format!("version_policy specific: version {v} is negative"))
                })
                .collect::<Result<_, _>>()?,
        ),
    };
    let warmup = c
        .model_warmup
        .iter()
        .map(|w| {
            let inputs = w
                .inputs
                .iter()
                .map(|(name, i)| {
                    use pb::model_warmup::input::InputDataType as D;
                    let what = format!("model_warmup `{}` input `{name}`", w.name);
                    let (data, file) = match &i.input_data_type {
                        Some(D::ZeroData(true)) => (Some("zero".to_string()), None),
                        Some(D::RandomData(true)) => (Some("random".to_string()), None),
                        Some(D::InputDataFile(f)) => (None, Some(f.clone())),
                        _ => {
                            return Err(format!(
                            "{what}: needs zero_data: true, random_data: true or input_data_file"
                        ))
                        }
                    };
                    Ok(WarmupInputFile {
                        name: name.clone(),
                        datatype: data_type(i.data_type, &what)?,
                        dims: i.dims.clone(),
                        data,
                        file,
                        file_bytes: None,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(WarmupFile {
                name: w.name.clone(),
                // Triton: a non-batching model's sample is one request.
                batch_size: w.batch_size.max(1),
                count: w.count,
                inputs,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let (sequence_state, sequence_control, keyed_state) = match sequence {
        Some(s) => (s.states, s.controls, Some(s.keyed)),
        None => (Vec::new(), Vec::new(), None),
    };
    let gpu_execution_accelerators = match c
        .optimization
        .as_ref()
        .and_then(|o| o.execution_accelerators.as_ref())
    {
        None => None,
        Some(ea) => {
            let mut names = Vec::new();
            for a in &ea.gpu_execution_accelerator {
                match a.name.as_str() {
                    "tensorrt" | "cuda" => names.push(a.name.clone()),
                    other => {
                        return Err(format!(
                            "optimization gpu_execution_accelerator `{other}`: shoal offers tensorrt and cuda"
                        ))
                    }
                }
                for k in a.parameters.keys() {
                    warnings.push(format!(
                        "optimization gpu_execution_accelerator `{}` parameter `{k}` is not implemented by shoal and is ignored",
                        a.name
                    ));
                }
            }
            Some(names)
        }
    };
    Ok(ModelConfigFile {
        platform,
        device,
        warmup,
        gpu_execution_accelerators,
        sequence: c.sequence_batching.is_some(),
        sequence_state,
        sequence_control,
        keyed_state,
        max_batch_size,
        instance_count,
        intra_op_threads: threads[0],
        inter_op_threads: threads[1],
        inline_execution_max_us,
        dynamic_batching,
        batching,
        input,
        output,
        version_policy: Some(version_policy),
        triton: Some(Arc::new(c.clone())),
        ..ModelConfigFile::default()
    })
}

/// A `sequence_batching` block in shoal's terms.
struct Sequence {
    states: Vec<SequenceStateFile>,
    controls: Vec<ControlFile>,
    keyed: KeyedStateFile,
    batching: DynamicBatchingFile,
}

/// Maps `sequence_batching`: the correlation id is shoal's key (affinity
/// keeps a sequence on one replica, in order), implicit state is keyed
/// state, controls are filled per row, and both strategies batch
/// different sequences' requests together as the dynamic batcher does.
fn sequence(c: &pb::ModelConfig, sb: &pb::ModelSequenceBatching) -> Result<Sequence, String> {
    use pb::model_sequence_batching::control::Kind;
    if c.dynamic_batching.is_some() {
        return Err(
            "dynamic_batching and sequence_batching are both given; a model has one scheduler"
                .into(),
        );
    }
    let mut controls = Vec::new();
    for ci in &sb.control_input {
        let what = format!("sequence_batching control_input `{}`", ci.name);
        let [ctl] = ci.control.as_slice() else {
            return Err(format!("{what}: needs exactly one control"));
        };
        let kind =
            Kind::try_from(ctl.kind).map_err(|_| format!("{what}: unknown kind {}", ctl.kind))?;
        let pair = |v: &[f64], dt: &str| -> Result<(String, Option<[f64; 2]>), String> {
            match v {
                [f, t] => Ok((dt.to_string(), Some([*f, *t]))),
                _ => Err(format!(
                    "{what}: a false_true list has two values, not {}",
                    v.len()
                )),
            }
        };
        let (datatype, false_true) = if kind == Kind::ControlSequenceCorrid {
            (data_type(ctl.data_type, &what)?, None)
        } else if !ctl.int32_false_true.is_empty() {
            let v: Vec<f64> = ctl.int32_false_true.iter().map(|&x| x as f64).collect();
            pair(&v, "INT32")?
        } else if !ctl.fp32_false_true.is_empty() {
            let v: Vec<f64> = ctl.fp32_false_true.iter().map(|&x| x as f64).collect();
            pair(&v, "FP32")?
        } else if !ctl.bool_false_true.is_empty() {
            let v: Vec<f64> = ctl
                .bool_false_true
                .iter()
                .map(|&x| x as u8 as f64)
                .collect();
            pair(&v, "BOOL")?
        } else {
            return Err(format!(
                "{what}: needs int32_false_true, fp32_false_true or bool_false_true"
            ));
        };
        let kind = match kind {
            Kind::ControlSequenceStart => "start",
            Kind::ControlSequenceEnd => "end",
            Kind::ControlSequenceReady => "ready",
            Kind::ControlSequenceCorrid => "corrid",
        };
        controls.push(ControlFile {
            input: ci.name.clone(),
            kind: kind.into(),
            datatype,
            false_true,
        });
    }
    let mut states = Vec::new();
    for st in &sb.state {
        let what = format!("sequence_batching state `{}`", st.input_name);
        for init in &st.initial_state {
            if let Some(pb::model_sequence_batching::initial_state::StateData::DataFile(f)) =
                &init.state_data
            {
                return Err(format!(
                    "{what}: initial_state data_file `{f}` is not implemented (zero_data is)"
                ));
            }
        }
        states.push(SequenceStateFile {
            input: st.input_name.clone(),
            output: st.output_name.clone(),
            initial: 0.0,
            datatype: Some(data_type(st.data_type, &what)?),
            dims: Some(st.dims.clone()),
        });
    }
    use pb::model_sequence_batching::StrategyChoice;
    let batching = match &sb.strategy_choice {
        None => DynamicBatchingFile::default(),
        Some(StrategyChoice::Direct(d)) => DynamicBatchingFile {
            max_queue_delay_us: d.max_queue_delay_microseconds,
            ..DynamicBatchingFile::default()
        },
        Some(StrategyChoice::Oldest(o)) => DynamicBatchingFile {
            max_queue_delay_us: o.max_queue_delay_microseconds,
            preferred_batch_sizes: o
                .preferred_batch_size
                .iter()
                .map(|&p| {
                    u32::try_from(p).map_err(|_| {
                        format!("sequence_batching oldest preferred_batch_size {p} is negative")
                    })
                })
                .collect::<Result<_, _>>()?,
            ..DynamicBatchingFile::default()
        },
    };
    // Triton's default idle time is one second.
    let idle = match sb.max_sequence_idle_microseconds {
        0 => 1_000_000,
        us => us,
    };
    Ok(Sequence {
        states,
        controls,
        keyed: KeyedStateFile {
            idle_timeout_us: Some(idle),
            ..KeyedStateFile::default()
        },
        batching,
    })
}

/// `ModelConfig` as Triton's REST API renders it: every scalar, list and
/// map field (defaults included), message fields where set, enums by name,
/// and 64-bit integers as JSON numbers (where protobuf's JSON would quote
/// them).
pub fn to_json(c: &pb::ModelConfig) -> serde_json::Value {
    let bytes = prost::Message::encode_to_vec(c);
    match DynamicMessage::decode(model_config_descriptor(), bytes.as_slice()) {
        Ok(m) => message_json(&m),
        Err(_) => serde_json::Value::Null,
    }
}

fn message_json(m: &DynamicMessage) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for fd in m.descriptor().fields() {
        if fd.kind().as_message().is_some() && !fd.is_list() && !fd.is_map() && !m.has_field(&fd) {
            continue;
        }
        if let Some(oneof) = fd.containing_oneof() {
            if !m.has_field(&fd) && !oneof.is_synthetic() {
                continue;
            }
        }
        let v = m.get_field(&fd);
        out.insert(fd.name().to_string(), value_json(&v, &fd.kind()));
    }
    serde_json::Value::Object(out)
}

fn value_json(v: &Value, kind: &prost_reflect::Kind) -> serde_json::Value {
    use serde_json::json;
    match v {
        Value::Bool(b) => json!(b),
        Value::I32(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Bytes(b) => json!(b.iter().map(|x| *x as u32).collect::<Vec<_>>()),
        Value::EnumNumber(n) => match kind.as_enum().and_then(|e| e.get_value(*n)) {
            Some(ev) => json!(ev.name()),
            None => json!(n),
        },
        Value::Message(m) => message_json(m),
        Value::List(l) => serde_json::Value::Array(l.iter().map(|x| value_json(x, kind)).collect()),
        Value::Map(mp) => {
            let value_kind = kind
                .as_message()
                .map(|e| e.map_entry_value_field().kind())
                .unwrap_or_else(|| kind.clone());
            let mut entries: Vec<(String, serde_json::Value)> = mp
                .iter()
                .map(|(k, x)| (map_key(k), value_json(x, &value_kind)))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().collect())
        }
    }
}

fn map_key(k: &MapKey) -> String {
    match k {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(x) => x.to_string(),
        MapKey::I64(x) => x.to_string(),
        MapKey::U32(x) => x.to_string(),
        MapKey::U64(x) => x.to_string(),
        MapKey::String(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written the way Triton's docs write them: comments, both list
    /// syntaxes, repeated blocks, enum names.
    const DOCS_STYLE: &str = r#"
# An image classifier, as in Triton's model configuration docs.
name: "clf"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [1, 3] } }
input [
  {
    name: "input"   # the image
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output {
  name: "output"
  data_type: TYPE_FP32
  dims: 1000
  label_filename: "labels.txt"
}
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  preferred_batch_size: 2
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 16 }
}
parameters { key: "intra_op_thread_count" value: { string_value: "2" } }
parameters [ { key: "some_backend_knob" value { string_value: "x" } } ]
parameters { key: "inline_execution_max_us" value: { string_value: "0" } }
model_warmup [ { name: "zeros" batch_size: 1 inputs { key: "input" value { data_type: TYPE_FP32 dims: [3, 224, 224] zero_data: true } } } ]
"#;

    #[test]
    fn sequence_batching_maps_onto_keyed_state_and_controls() {
        let text = r#"
max_batch_size: 4
sequence_batching {
  max_sequence_idle_microseconds: 2500
  control_input [
    { name: "S" control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ] },
    { name: "E" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] },
    { name: "R" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 5, 7 ] } ] },
    { name: "C" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }
  ]
  state { input_name: "h_in" output_name: "h_out" data_type: TYPE_FP32 dims: [ 4 ] }
  direct { max_queue_delay_microseconds: 50 minimum_slot_utilization: 0.5 }
}
"#;
        let p = parse("m", "m/config.pbtxt", text).unwrap();
        let c = &p.config;
        assert!(c.sequence);
        let ctl: Vec<_> = c
            .sequence_control
            .iter()
            .map(|x| {
                (
                    x.input.as_str(),
                    x.kind.as_str(),
                    x.datatype.as_str(),
                    x.false_true,
                )
            })
            .collect();
        assert_eq!(
            ctl,
            vec![
                ("S", "start", "FP32", Some([0.0, 1.0])),
                ("E", "end", "BOOL", Some([0.0, 1.0])),
                ("R", "ready", "INT32", Some([5.0, 7.0])),
                ("C", "corrid", "BYTES", None),
            ]
        );
        assert_eq!(c.sequence_state.len(), 1);
        assert_eq!(c.sequence_state[0].dims, Some(vec![4]));
        assert_eq!(c.keyed_state.as_ref().unwrap().idle_timeout_us, Some(2500));
        let db = c.dynamic_batching.as_ref().unwrap();
        assert_eq!(db.max_queue_delay_us, 50);
        assert_eq!(c.batching, None);
        // A strategy knob shoal has no use for is named, not dropped.
        assert!(
            p.warnings
                .iter()
                .any(|w| w.contains("minimum_slot_utilization")),
            "{:?}",
            p.warnings
        );

        // (No max_batch_size is refused once the graph is known, after
        // Triton's auto-complete: config::tests::a_sequence_model_left_to_the_graph_takes_its_batch_size_from_auto_complete)
        for (bad, says) in [
            ("max_batch_size: 4\nsequence_batching { iterative_sequence: true }", "iterative"),
            ("max_batch_size: 4\nsequence_batching { }\ndynamic_batching { }", "one scheduler"),
            ("max_batch_size: 4\nsequence_batching { state { input_name: \"a\" output_name: \"b\" data_type: TYPE_FP32 dims: 1 initial_state { data_type: TYPE_FP32 dims: 1 data_file: \"f\" } } }", "data_file"),
            ("max_batch_size: 4\nsequence_batching { control_input { name: \"S\" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }, { kind: CONTROL_SEQUENCE_END int32_false_true: [0, 1] } ] } }", "exactly one control"),
            ("max_batch_size: 4\nsequence_batching { control_input { name: \"S\" control { kind: CONTROL_SEQUENCE_START } } }", "int32_false_true"),
        ] {
            let e = parse("m", "m/config.pbtxt", bad).unwrap_err();
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn execution_accelerators_map_to_providers_or_are_refused() {
        let p = parse(
            "m",
            "m/config.pbtxt",
            r#"optimization {
  graph { level: 1 }
  execution_accelerators {
    gpu_execution_accelerator [ { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } } ]
  }
}"#,
        )
        .unwrap();
        assert_eq!(
            p.config.gpu_execution_accelerators,
            Some(vec!["tensorrt".to_string()])
        );
        let joined = p.warnings.join("\n");
        for named in ["precision_mode", "optimization.graph"] {
            assert!(joined.contains(named), "{named} not named in {joined}");
        }
        let e = fails("optimization { execution_accelerators { cpu_execution_accelerator { name: \"openvino\" } } }");
        assert!(e.contains("cpu_execution_accelerator"), "{e}");
        let e = fails("optimization { execution_accelerators { gpu_execution_accelerator { name: \"migraphx\" } } }");
        assert!(e.contains("migraphx"), "{e}");
    }

    #[test]
    fn priorities_and_queue_policies_take_effect() {
        use crate::backend::{Signature, TensorSpec};
        use crate::engine::config::TimeoutAction;
        let text = r#"
max_batch_size: 4
dynamic_batching {
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 500 max_queue_size: 10 }
  priority_queue_policy { key: 1 value { allow_timeout_override: true max_queue_size: 4 } }
}
"#;
        let p = parse("m", "m/config.pbtxt", text).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: vec![-1, 2],
        };
        let graph = Signature {
            inputs: vec![spec("x")],
            outputs: vec![spec("y")],
        };
        let c = p.config.resolve("m", &graph).unwrap();
        let pr = &c.priorities;
        assert_eq!((pr.levels, pr.default_level), (3, 2));
        assert_eq!(
            (pr.level(0), pr.level(1), pr.level(3), pr.level(4)),
            (2, 1, 3, 2)
        );
        assert_eq!(pr.policy(1).max_queue_size, 4);
        assert!(pr.policy(1).allow_timeout_override);
        assert_eq!(pr.policy(1).timeout_action, TimeoutAction::Reject);
        assert_eq!(pr.policy(1).default_timeout, None);
        for level in [2, 3] {
            let q = pr.policy(level);
            assert_eq!(q.timeout_action, TimeoutAction::Delay);
            assert_eq!(
                q.default_timeout,
                Some(std::time::Duration::from_micros(500))
            );
            assert_eq!(q.max_queue_size, 10);
        }
        assert!(pr.triton_timeouts);
        // The model's bound is the levels' together.
        assert_eq!(c.max_queue_size, 24);

        for (bad, says) in [
            ("priority_levels: 2 default_priority_level: 3", "default_priority_level 3"),
            ("priority_levels: 2 default_priority_level: 1 priority_queue_policy { key: 5 value { } }", "level \"5\""),
        ] {
            let text = format!("max_batch_size: 4\ndynamic_batching {{ {bad} }}\n");
            let e = parse("m", "m/config.pbtxt", &text)
                .unwrap()
                .config
                .resolve("m", &graph)
                .unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn a_docs_style_config_maps_onto_shoals_terms() {
        let p = parse("clf", "clf/config.pbtxt", DOCS_STYLE).unwrap();
        let c = &p.config;
        assert_eq!(c.platform.as_deref(), Some("onnxruntime_onnx"));
        assert_eq!(c.max_batch_size, 8);
        assert_eq!(c.instance_count, Some(2));
        assert!(c.device.is_none());
        assert_eq!(c.intra_op_threads, Some(2));
        assert_eq!(c.inter_op_threads, None);
        assert_eq!(c.inline_execution_max_us, Some(0));
        assert_eq!(c.input.len(), 1);
        assert_eq!(
            (c.input[0].name.as_str(), c.input[0].datatype.as_str()),
            ("input", "FP32")
        );
        assert_eq!(c.input[0].dims, vec![3, 224, 224]);
        assert_eq!(c.output[0].dims, vec![1000]);
        let db = c.dynamic_batching.as_ref().unwrap();
        assert_eq!(db.preferred_batch_sizes, vec![4, 8, 2]);
        assert_eq!(db.max_queue_delay_us, 100);
        assert_eq!(db.max_queue_size, Some(16));
        assert_eq!(c.batching, None);
        assert_eq!(c.version_policy, Some(VersionPolicy::Specific(vec![1, 3])));
        let joined = p.warnings.join("\n");
        for named in ["output.label_filename", "some_backend_knob"] {
            assert!(joined.contains(named), "{named} not named in {joined}");
        }
        assert_eq!(p.warnings.len(), 2, "{joined}");
        assert_eq!(c.warmup.len(), 1);
        let w = &c.warmup[0];
        assert_eq!((w.name.as_str(), w.batch_size, w.count), ("zeros", 1, 0));
        assert_eq!(w.inputs[0].dims, vec![3, 224, 224]);
        assert_eq!(w.inputs[0].data.as_deref(), Some("zero"));
        assert_eq!(c.triton.as_ref().unwrap().name, "clf");
    }

    #[test]
    fn triton_defaults_latest_version_no_batching_and_gpu_groups() {
        let p = parse(
            "m",
            "m/config.pbtxt",
            "backend: \"onnxruntime\"\nmax_batch_size: 4\ninstance_group [{ kind: KIND_GPU gpus: [0, 1] count: 2 }, { kind: KIND_CPU }]\n",
        )
        .unwrap();
        let c = &p.config;
        assert_eq!(c.platform.as_deref(), Some("onnxruntime_onnx"));
        assert_eq!(c.version_policy, Some(VersionPolicy::Latest(1)));
        assert_eq!(c.batching.as_deref(), Some("none"));
        assert!(c.dynamic_batching.is_none());
        assert_eq!(c.instance_count, Some(5));
        assert_eq!(
            c.device,
            Some(DeviceFile::Many(
                ["cuda:0", "cuda:0", "cuda:1", "cuda:1", "cpu"]
                    .map(String::from)
                    .to_vec()
            ))
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    fn fails(text: &str) -> String {
        parse("m", "repo/m/config.pbtxt", text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn lists_without_a_colon_parse_and_errors_after_them_keep_their_column() {
        let (n, at) = list_colons("input [ { dims: [1] } ] # x [\nname: \"a [\"\n");
        assert_eq!(n, "input :[ { dims: [1] } ] # x [\nname: \"a [\"\n");
        assert_eq!(at, vec![6]);
        let e = fails("input [ { name: \"x\" } ] output [ { nme: \"y\" } ]\n");
        assert!(e.contains("line 1, column 36"), "{e}");
    }

    #[test]
    fn hostile_text_is_an_error_not_a_panic() {
        // Columns count characters: the two before `nme` take 6 bytes.
        let e = fails("name: \"\u{e9}\u{1F600}\" input [ { nme: 1 } ]\n");
        assert!(e.contains("line 1, column 22"), "{e}");
        for text in [
            "name: \"unterminated",
            "input [ [ [ [",
            "]]]]",
            "# only a comment [",
            "parameters { key: \"intra_op_thread_count\" value { string_value: \"99999999999999999999999\" } }",
            "max_batch_size: -1",
            "instance_group [ { count: -3 } ]",
            "instance_group [ { count: 406666696 kind: KIND_CPU } ]",
            "instance_group [ { count: 2000000000 kind: KIND_GPU gpus: [0, 1, 2] } ]",
        ] {
            let _ = parse("m", "m/config.pbtxt", text);
        }
    }

    #[test]
    fn instance_counts_past_the_replica_limit_are_refused_before_allocating() {
        for text in [
            "instance_group [ { count: 406666696 kind: KIND_CPU } ]",
            "instance_group [ { count: 2147483647 kind: KIND_GPU gpus: [0, 1] } ]",
            "instance_group [ { count: 200 kind: KIND_CPU }, { count: 57 kind: KIND_CPU } ]",
        ] {
            let e = fails(text);
            assert!(e.contains("past the limit of 256"), "{text}: {e}");
        }
        assert!(parse(
            "m",
            "m/config.pbtxt",
            "instance_group [ { count: 128 kind: KIND_CPU }, { count: 64 kind: KIND_GPU gpus: [0, 1] } ]"
        )
        .is_ok());
    }

    #[test]
    fn bad_files_name_the_file_line_and_field() {
        let e =
            fails("name: \"m\"\nmax_batch_size: 4\n  input { name: \"x\" data_typ: TYPE_FP32 }\n");
        assert!(e.contains("repo/m/config.pbtxt: line 3, column 21"), "{e}");
        assert!(e.contains("data_typ"), "{e}");
        let e = fails("max_batch_size: \"four\"\n");
        assert!(e.contains("line 1, column 17"), "{e}");
        let e = fails("max_batch_size: 4\ninput { name: \"x\" data_type: TYPE_FLOAT32 }\n");
        assert!(e.contains("line 2") && e.contains("TYPE_FLOAT32"), "{e}");
        let e = fails("name: \"m\"\ninput [ { name: \"x\" ]\n");
        assert!(e.contains("line 2"), "{e}");
        let e = fails("name: \"other\"\n");
        assert!(e.contains("`other`") && e.contains("`m`"), "{e}");
    }

    #[test]
    fn what_would_change_results_is_refused_by_name() {
        for (text, named) in [
            (
                "platform: \"ensemble\"\nensemble_scheduling { step [ { model_name: \"a\" model_version: -1 } ] }\n",
                "ensemble",
            ),
            (
                "max_batch_size: 4\nsequence_batching { iterative_sequence: true }\n",
                "sequence_batching.iterative_sequence",
            ),
            (
                "input { name: \"x\" data_type: TYPE_INT64 dims: [2] is_shape_tensor: true }\n",
                "input.is_shape_tensor",
            ),
            ("platform: \"tensorrt_plan\"\n", "tensorrt_plan"),
            ("backend: \"python\"\n", "python"),
            (
                "parameters { key: \"intra_op_thread_count\" value { string_value: \"many\" } }\n",
                "intra_op_thread_count",
            ),
            ("version_policy { latest { num_versions: 0 } }\n", "num_versions"),
        ] {
            let e = fails(text);
            assert!(e.contains(named), "{named}: {e}");
        }
    }

    #[test]
    fn the_json_form_has_every_field_enums_by_name_and_numbers_unquoted() {
        let p = parse("clf", "clf/config.pbtxt", DOCS_STYLE).unwrap();
        let j = to_json(p.config.triton.as_ref().unwrap());
        assert_eq!(j["name"], "clf");
        assert_eq!(j["max_batch_size"], 8);
        assert_eq!(j["input"][0]["data_type"], "TYPE_FP32");
        assert_eq!(j["input"][0]["format"], "FORMAT_NCHW");
        assert_eq!(j["input"][0]["dims"], serde_json::json!([3, 224, 224]));
        assert_eq!(j["output"][0]["label_filename"], "labels.txt");
        assert_eq!(
            j["version_policy"],
            serde_json::json!({"specific": {"versions": [1, 3]}})
        );
        assert_eq!(
            j["parameters"]["intra_op_thread_count"]["string_value"],
            "2"
        );
        assert_eq!(j["model_warmup"][0]["inputs"]["input"]["zero_data"], true);
        // Unset messages stay out, unset lists are empty.
        assert!(j.get("sequence_batching").is_none());
        assert_eq!(j["batch_input"], serde_json::json!([]));
    }
}
