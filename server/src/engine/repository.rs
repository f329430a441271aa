//! Scans a model repository directory: `<repo>/<model>/config.toml` (or
//! Triton's `config.pbtxt`, see [`super::pbtxt`]) and
//! numeric version directories holding the model file (`model.onnx`, or
//! `model.pt` for TorchScript), and builds each model's backend factory,
//! placing its replicas on the devices its config asks for.
//!
//! Two shortcuts for a first try, each version 1: a model directory holding
//! the model file itself (`<repo>/<model>/model.onnx`, no version folder),
//! and a repository that is itself one model (`<dir>/model.onnx`), named
//! after the directory.

use super::config::{ModelConfigFile, VersionPolicy};
use super::model::LoadError;
use super::EngineOptions;
use crate::backend::{Backend, BackendError, BackendFactory, BackendOptions, TensorRt};
use crate::gpu::{DeviceSpec, Placement};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// One model version found on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
    pub config: ModelConfigFile,
    /// Changes when this version's config or model file changes, so a
    /// reload keeps the versions that did not.
    pub stamp: u64,
}

fn repo_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Repository {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Lists every model version of the repository, sorted by name and version.
pub fn scan(repo: &Path, options: &EngineOptions) -> Result<Vec<Entry>, LoadError> {
    let mut out = Vec::new();
    for name in list_models(repo)? {
        out.extend(scan_model(repo, &name, options)?);
    }
    Ok(out)
}

/// The model name of a repository that is itself one bare model
/// (`<dir>/model.onnx`): the directory's name.
pub fn bare_model_name(repo: &Path) -> Option<String> {
    model_file(repo)?;
    let canonical = repo.canonicalize().ok()?;
    canonical.file_name()?.to_str().map(str::to_string)
}

/// Where model `name` of `repo` lives: the repository itself when it is one
/// bare model of that name, else its subdirectory.
fn model_dir(repo: &Path, name: &str) -> PathBuf {
    match bare_model_name(repo) {
        Some(n) if n == name => repo.to_path_buf(),
        _ => repo.join(name),
    }
}

/// The model names of a repository (its directories), sorted.
pub fn list_models(repo: &Path) -> Result<Vec<String>, LoadError> {
    if let Some(name) = bare_model_name(repo) {
        return Ok(vec![name]);
    }
    let dir = std::fs::read_dir(repo).map_err(|e| repo_err(repo, format!("cannot read: {e}")))?;
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// The versions of one model, sorted. `name` must be one of
/// [`list_models`]: it is joined to the repository path as it is.
/// `options.strict_model_config`: the config must declare its inputs and
/// outputs; `options.default_max_batch_size`: what Triton's auto-complete
/// would give a config.pbtxt (or no config) that leaves them to the graph.
pub fn scan_model(
    repo: &Path,
    name: &str,
    options: &EngineOptions,
) -> Result<Vec<Entry>, LoadError> {
    let mdir = model_dir(repo, name);
    let (mut config, text, source) = read_config(&mdir, name)?;
    let leaves_io_to_graph = config.input.is_empty() || config.output.is_empty();
    if options.strict_model_config && leaves_io_to_graph {
        return Err(repo_err(
            &mdir,
            "--strict-model-config: the config must declare every input and output (completion from the graph is off)",
        ));
    }
    if !cfg!(feature = "torch") && config.platform.as_deref() == Some(TORCH_PLATFORM) {
        // One repository serves both builds; a build without libtorch
        // leaves its TorchScript models out rather than refusing to start.
        tracing::warn!(
            model = %name,
            "skipping a {TORCH_PLATFORM} model: this build lacks the `torch` feature"
        );
        return Ok(Vec::new());
    }
    // Triton auto-completes a config that leaves inputs or outputs to the
    // graph, its batching included; shoal's own config.toml means what it
    // says (no max_batch_size: no batch dimension).
    if source != ConfigSource::Toml && leaves_io_to_graph {
        config.triton_autocomplete = Some(options.default_max_batch_size);
    }
    let mut versions: Vec<(u64, PathBuf)> = std::fs::read_dir(&mdir)
        .map_err(|e| repo_err(&mdir, format!("cannot read: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path())))
        .collect();
    versions.sort();
    if versions.is_empty() {
        if let Some(file) = model_file(&mdir) {
            tracing::info!(
                model = %name,
                file = %file.display(),
                "serving a bare model file as version 1 of model {name:?} (no version directory)"
            );
            versions.push((1, mdir.clone()));
        }
    }
    if versions.is_empty() {
        return Err(repo_err(
            &mdir,
            "no numeric version directory (e.g. 1/model.onnx) and no model file (model.onnx or model.pt) in the model directory",
        ));
    }
    // Triton's default: only the newest version loads unless the config
    // says otherwise.
    {
        let policy = config
            .version_policy
            .as_ref()
            .unwrap_or(&VersionPolicy::Latest(1));
        let available: Vec<u64> = versions.iter().map(|(v, _)| *v).collect();
        let keep = policy.select(&available);
        if keep.is_empty() {
            return Err(repo_err(
                &mdir,
                format!(
                    "version_policy {policy:?} selects none of the versions on disk {available:?}"
                ),
            ));
        }
        versions.retain(|(v, _)| keep.contains(v));
    }
    let mut out = Vec::new();
    for (version, vdir) in versions {
        let path = model_file(&vdir).ok_or_else(|| {
            repo_err(
                &vdir,
                "no model file (model.onnx or model.pt); run scripts/setup.sh to generate the reference models",
            )
        })?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        file_stamp(&path).hash(&mut h);
        let mut config = config.clone();
        if config.platform.is_none() && crate::backend::is_torchscript(&path) {
            config.platform = Some(TORCH_PLATFORM.to_string());
        }
        out.push(Entry {
            name: name.to_string(),
            version,
            path,
            config,
            stamp: h.finish(),
        });
    }
    Ok(out)
}

/// Which file a model's config came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigSource {
    Toml,
    Pbtxt,
    None,
}

/// A model directory's config: `config.toml` (shoal's), else
/// `config.pbtxt` (Triton's), else none (completed from the graph). Also
/// returns the text, whose hash stamps the versions.
fn read_config(
    mdir: &Path,
    name: &str,
) -> Result<(ModelConfigFile, String, ConfigSource), LoadError> {
    let toml_path = mdir.join("config.toml");
    let pbtxt_path = mdir.join("config.pbtxt");
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| repo_err(p, format!("cannot read: {e}")));
    if toml_path.exists() {
        if pbtxt_path.exists() {
            tracing::warn!(
                model = %name,
                "the model directory has both config.toml and config.pbtxt: config.toml wins, config.pbtxt is not read"
            );
        }
        let text = read(&toml_path)?;
        let mut config = ModelConfigFile::parse(name, &text)?;
        read_warmup_files(mdir, &mut config)?;
        return Ok((config, text, ConfigSource::Toml));
    }
    if pbtxt_path.exists() {
        tracing::debug!(model = %name, file = %pbtxt_path.display(), "reading Triton's config.pbtxt");
        let text = read(&pbtxt_path)?;
        let parsed = super::pbtxt::parse(name, &pbtxt_path.display().to_string(), &text)?;
        for w in &parsed.warnings {
            tracing::warn!(model = %name, file = %pbtxt_path.display(), "config.pbtxt: {w}");
        }
        let mut config = parsed.config;
        read_warmup_files(mdir, &mut config)?;
        return Ok((config, text, ConfigSource::Pbtxt));
    }
    Ok((
        ModelConfigFile::default(),
        String::new(),
        ConfigSource::None,
    ))
}

/// Reads the warm-up samples' data files from the model directory's
/// `warmup/` (where Triton keeps them); a name leaving it is refused.
fn read_warmup_files(mdir: &Path, config: &mut ModelConfigFile) -> Result<(), LoadError> {
    let dir = mdir.join("warmup");
    for input in config.warmup.iter_mut().flat_map(|w| w.inputs.iter_mut()) {
        let Some(f) = &input.file else { continue };
        let path = dir.join(f);
        let plain = Path::new(f)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(repo_err(
                &path,
                "a warm-up data file is named relative to the model's warmup/ directory",
            ));
        }
        let bytes = std::fs::read(&path)
            .map_err(|e| repo_err(&path, format!("cannot read the warm-up data file: {e}")))?;
        input.file_bytes = Some(bytes.into());
    }
    Ok(())
}

/// Changes when anything a load of `name` reads changes: its config and
/// its version directories and files. Needs no parsing, so a broken model
/// has one too (a poll retries it only once it changed).
pub fn fingerprint(repo: &Path, name: &str) -> u64 {
    let mdir = model_dir(repo, name);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(mdir.join("config.toml")).ok().hash(&mut h);
    std::fs::read(mdir.join("config.pbtxt")).ok().hash(&mut h);
    // Warm-up data files are part of a load too.
    let mut warm: Vec<PathBuf> = std::fs::read_dir(mdir.join("warmup"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    warm.sort();
    for p in warm {
        p.hash(&mut h);
        file_stamp(&p).hash(&mut h);
    }
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(&mdir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs.push((String::new(), mdir.clone()));
    for (n, p) in dirs {
        n.hash(&mut h);
        file_stamp(&p.join("model.onnx")).hash(&mut h);
        file_stamp(&p.join("model.pt")).hash(&mut h);
    }
    h.finish()
}

/// Size and modification time: what a copy or rewrite of a file changes.
fn file_stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

/// Triton's platform name for TorchScript models.
pub const TORCH_PLATFORM: &str = "pytorch_libtorch";
const ONNX_PLATFORM: &str = "onnxruntime_onnx";

fn model_file(vdir: &Path) -> Option<PathBuf> {
    ["model.onnx", "model.pt"]
        .iter()
        .map(|f| vdir.join(f))
        .find(|p| p.is_file())
}

/// One placement per replica slot, from the config's `device` (default
/// `cpu`); replica `i` takes slot `i % len`. Also says whether the list came
/// from `auto`, whose GPU replicas may fall back to the CPU.
pub fn placements(config: &ModelConfigFile) -> Result<(Vec<Placement>, bool), String> {
    let specs = match &config.device {
        None => return Ok((vec![Placement::Cpu], false)),
        Some(d) => d.specs()?,
    };
    let auto = specs.iter().all(|s| *s == DeviceSpec::Auto);
    let gpus = if specs.iter().all(|s| *s == DeviceSpec::Cpu) {
        Vec::new()
    } else {
        crate::gpu::discover()
    };
    Ok((crate::gpu::expand(&specs, &gpus)?, auto))
}

/// The backend factory for a model file.
pub fn factory_for(
    entry: &Entry,
    options: &EngineOptions,
) -> Result<Arc<dyn BackendFactory>, BackendError> {
    let load_err = |reason: String| BackendError::Load {
        path: entry.path.display().to_string(),
        reason,
    };
    let platform = entry.config.platform.as_deref().unwrap_or(ONNX_PLATFORM);
    let (slots, auto) = placements(&entry.config).map_err(load_err)?;
    let tensorrt = match &entry.config.gpu_execution_accelerators {
        None => TensorRt::IfAvailable,
        Some(names) => {
            if let Some(other) = names
                .iter()
                .find(|n| !matches!(n.as_str(), "tensorrt" | "cuda"))
            {
                return Err(load_err(format!(
                    "gpu execution accelerator {other:?}: shoal offers tensorrt and cuda (ONNX Runtime's providers)"
                )));
            }
            if names.iter().any(|n| n == "tensorrt") {
                TensorRt::Required
            } else {
                TensorRt::Off
            }
        }
    };
    let base = BackendOptions {
        intra_op_threads: entry.config.intra_op_threads.unwrap_or(1),
        inter_op_threads: entry.config.inter_op_threads.unwrap_or(1),
        placement: Placement::Cpu,
        tensorrt,
    };
    let path = entry.path.clone();
    let load: Loader =
        match platform {
            ONNX_PLATFORM if crate::backend::is_onnx(&path) => {
                crate::backend::ort::init_runtime(options.ort_library.as_deref())?;
                Arc::new(move |o: &BackendOptions| {
                    crate::backend::ort::OrtBackend::load(&path, o).map(|b| Box::new(b) as Box<dyn Backend>)
                })
            }
            TORCH_PLATFORM if crate::backend::is_torchscript(&path) => torch_loader(entry)?,
            _ => {
                return Err(load_err(format!(
                    "platform {platform:?} with file {} is not supported (this build serves {ONNX_PLATFORM} \
                     with model.onnx{})",
                    path.file_name().unwrap_or_default().to_string_lossy(),
                    if cfg!(feature = "torch") {
                        format!(" and {TORCH_PLATFORM} with model.pt")
                    } else {
                        String::new()
                    }
                )))
            }
        };
    // Replicas are created one after another, in id order, so a counter
    // gives each its slot without the engine passing ids to backends.
    let next = AtomicUsize::new(0);
    let (model, version) = (entry.name.clone(), entry.version.to_string());
    Ok(Arc::new(move || {
        let slot = next.fetch_add(1, Ordering::Relaxed);
        let mut opts = base.clone();
        opts.placement = slots[slot % slots.len()];
        let backend = match load(&opts) {
            Err(e) if auto && opts.placement != Placement::Cpu => {
                tracing::warn!(model, placement = %opts.placement, error = %e, "device = \"auto\": this replica falls back to the CPU");
                opts.placement = Placement::Cpu;
                load(&opts)
            }
            r => r,
        }?;
        metrics::describe_gauge!(
            "shoal_replica_execution_provider",
            "1 for the execution provider and device that run each replica"
        );
        metrics::gauge!(
            "shoal_replica_execution_provider",
            "model" => model.clone(),
            "version" => version.clone(),
            "replica" => slot.to_string(),
            "provider" => backend.execution_provider().to_string(),
            "device" => opts.placement.to_string(),
        )
        .set(1.0);
        Ok(backend)
    }))
}

type Loader = Arc<dyn Fn(&BackendOptions) -> Result<Box<dyn Backend>, BackendError> + Send + Sync>;

/// TorchScript carries no typed signature: it is the config's, with the
/// batch dimension in front when the model batches.
#[cfg(feature = "torch")]
fn torch_loader(entry: &Entry) -> Result<Loader, BackendError> {
    let cfg = &entry.config;
    let spec = |io: &super::config::IoFile| -> Result<crate::backend::TensorSpec, BackendError> {
        let datatype =
            crate::tensor::DataType::parse(&io.datatype).ok_or_else(|| BackendError::Load {
                path: entry.path.display().to_string(),
                reason: format!("{}: unknown datatype {:?}", io.name, io.datatype),
            })?;
        let mut shape = io.dims.clone();
        if cfg.max_batch_size > 0 {
            shape.insert(0, -1);
        }
        Ok(crate::backend::TensorSpec {
            name: io.name.clone(),
            datatype,
            shape,
        })
    };
    let signature = crate::backend::Signature {
        inputs: cfg.input.iter().map(spec).collect::<Result<_, _>>()?,
        outputs: cfg.output.iter().map(spec).collect::<Result<_, _>>()?,
    };
    let path = entry.path.clone();
    Ok(Arc::new(move |o: &BackendOptions| {
        crate::backend::torch::TorchBackend::load(
            &path,
            signature.clone(),
            o.placement,
            o.intra_op_threads,
        )
        .map(|b| Box::new(b) as Box<dyn Backend>)
    }))
}

#[cfg(not(feature = "torch"))]
fn torch_loader(entry: &Entry) -> Result<Loader, BackendError> {
    Err(BackendError::Load {
        path: entry.path.display().to_string(),
        reason: format!("{TORCH_PLATFORM} needs shoal built with the `torch` feature"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::DeviceFile;

    fn ffnn_entry(device: Option<DeviceFile>) -> Entry {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository/ffnn/1/model.onnx");
        assert!(path.is_file(), "{}: run scripts/setup.sh", path.display());
        Entry {
            name: "ffnn".into(),
            version: 1,
            path,
            config: ModelConfigFile {
                device,
                ..ModelConfigFile::default()
            },
            stamp: 0,
        }
    }

    fn providers(entry: &Entry, replicas: usize) -> Result<Vec<String>, String> {
        let f = factory_for(entry, &EngineOptions::default()).map_err(|e| e.to_string())?;
        (0..replicas)
            .map(|_| {
                f.create()
                    .map(|b| b.execution_provider().to_string())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    #[test]
    fn gpu_accelerators_are_named_ones_and_leave_cpu_replicas_alone() {
        let mut e = ffnn_entry(None);
        e.config.gpu_execution_accelerators = Some(vec!["tensorrt".into(), "cuda".into()]);
        // A CPU replica runs as before whatever the GPU accelerators say.
        assert_eq!(providers(&e, 1).unwrap(), ["CPUExecutionProvider"]);
        e.config.gpu_execution_accelerators = Some(vec!["openvino".into()]);
        let err = providers(&e, 1).unwrap_err();
        assert!(
            err.contains("\"openvino\"") && err.contains("tensorrt and cuda"),
            "{err}"
        );
    }

    #[test]
    fn onnx_placement_cpu_by_default_auto_falls_back_cuda_fails_clearly() {
        assert_eq!(
            providers(&ffnn_entry(None), 1).unwrap(),
            ["CPUExecutionProvider"]
        );
        if !crate::gpu::discover().is_empty() {
            return; // the rest is about a machine without a GPU
        }
        let auto = ffnn_entry(Some(DeviceFile::One("auto".into())));
        assert_eq!(
            providers(&auto, 2).unwrap(),
            ["CPUExecutionProvider", "CPUExecutionProvider"]
        );
        let mixed = ffnn_entry(Some(DeviceFile::Many(vec!["cpu".into(), "cpu".into()])));
        assert_eq!(providers(&mixed, 3).unwrap().len(), 3);
        for d in ["cuda", "cuda:0"] {
            let err = providers(&ffnn_entry(Some(DeviceFile::One(d.into()))), 1).unwrap_err();
            assert!(err.contains("no CUDA GPU is available"), "{d}: {err}");
        }
        let err = providers(&ffnn_entry(Some(DeviceFile::Many(vec![]))), 1).unwrap_err();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn ort_cuda_placement_is_verified_not_silently_cpu() {
        // Ask ONNX Runtime for the CUDA provider directly, past the GPU check: the PyPI onnxruntime wheel has none,
        // and the session must refuse rather than run on the CPU under a GPU label.
        let entry = ffnn_entry(None);
        let opts = BackendOptions {
            placement: Placement::Cuda(0),
            ..BackendOptions::default()
        };
        crate::backend::ort::init_runtime(None).unwrap();
        match crate::backend::ort::OrtBackend::load(&entry.path, &opts) {
            Ok(b) => assert!(b
                .execution_provider()
                .contains("CUDAExecutionProvider:cuda:0")),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("cuda:0") && msg.contains("CUDAExecutionProvider"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn torchscript_models_are_skipped_without_the_torch_feature() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("pt");
        std::fs::create_dir_all(m.join("1")).unwrap();
        std::fs::write(m.join("config.toml"), "platform = \"pytorch_libtorch\"\n").unwrap();
        std::fs::write(m.join("1/model.pt"), b"not torchscript").unwrap();
        let entries = scan(dir.path(), &EngineOptions::default()).unwrap();
        if cfg!(feature = "torch") {
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].config.platform.as_deref(), Some(TORCH_PLATFORM));
        } else {
            assert!(entries.is_empty(), "{entries:?}");
        }
        // A model.pt without a platform is TorchScript too; without the feature it cannot load, and says why.
        std::fs::write(m.join("config.toml"), "").unwrap();
        let entries = scan(dir.path(), &EngineOptions::default()).unwrap();
        assert_eq!(entries[0].config.platform.as_deref(), Some(TORCH_PLATFORM));
        if !cfg!(feature = "torch") {
            let err = factory_for(&entries[0], &EngineOptions::default())
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("`torch` feature"), "{err}");
        }
    }

    #[test]
    fn bare_model_files_serve_as_version_one() {
        let onnx = ffnn_entry(None).path;
        let dir = tempfile::tempdir().unwrap();
        // A model directory with the file itself, beside a regular model.
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(repo.join("flat")).unwrap();
        std::fs::copy(&onnx, repo.join("flat/model.onnx")).unwrap();
        std::fs::create_dir_all(repo.join("versioned/3")).unwrap();
        std::fs::copy(&onnx, repo.join("versioned/3/model.onnx")).unwrap();
        let entries = scan(&repo, &EngineOptions::default()).unwrap();
        let got: Vec<(&str, u64)> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.version))
            .collect();
        assert_eq!(got, [("flat", 1), ("versioned", 3)]);
        assert_eq!(entries[0].path, repo.join("flat/model.onnx"));

        // A repository that is one bare model: named after its directory.
        let single = dir.path().join("mnist-classifier");
        std::fs::create_dir_all(&single).unwrap();
        std::fs::copy(&onnx, single.join("model.onnx")).unwrap();
        assert_eq!(list_models(&single).unwrap(), ["mnist-classifier"]);
        let entries = scan(&single, &EngineOptions::default()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].name.as_str(), entries[0].version),
            ("mnist-classifier", 1)
        );
        // Its fingerprint follows the file, so poll mode sees a replacement.
        let before = fingerprint(&single, "mnist-classifier");
        std::fs::write(single.join("model.onnx"), b"changed").unwrap();
        assert_ne!(before, fingerprint(&single, "mnist-classifier"));

        // An empty model directory still says what it looked for.
        std::fs::create_dir_all(repo.join("empty")).unwrap();
        let err = scan(&repo, &EngineOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no model file") && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn only_configs_triton_would_auto_complete_are_marked_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let models = [
            ("pbtxt_bare", Some(("config.pbtxt", "backend: \"onnxruntime\"\n")), Some(4)),
            ("no_config", None, Some(4)),
            (
                "pbtxt_inputs_only",
                Some(("config.pbtxt", "input [ { name: \"input\" data_type: TYPE_FP32 dims: [ 784 ] } ]\n")),
                Some(4),
            ),
            ("pbtxt_sized", Some(("config.pbtxt", "max_batch_size: 2\n")), Some(4)),
            (
                "pbtxt_listed",
                Some((
                    "config.pbtxt",
                    "input [ { name: \"input\" data_type: TYPE_FP32 dims: [ -1, 784 ] } ]\noutput [ { name: \"output\" data_type: TYPE_FP32 dims: [ -1, 10 ] } ]\n",
                )),
                None,
            ),
            ("toml_empty", Some(("config.toml", "")), None),
        ];
        for (name, file, _) in &models {
            let m = dir.path().join(name);
            std::fs::create_dir_all(m.join("1")).unwrap();
            std::fs::write(m.join("1/model.onnx"), b"not read by the scan").unwrap();
            if let Some((f, text)) = file {
                std::fs::write(m.join(f), text).unwrap();
            }
        }
        let options = EngineOptions {
            default_max_batch_size: 4,
            ..Default::default()
        };
        let entries = scan(dir.path(), &options).unwrap();
        for (name, _, want) in models {
            let e = entries.iter().find(|e| e.name == name).unwrap();
            assert_eq!(e.config.triton_autocomplete, want, "{name}");
        }
        // The flag's default: auto-completed, with no size to fill in.
        let entries = scan(dir.path(), &EngineOptions::default()).unwrap();
        let bare = entries.iter().find(|e| e.name == "no_config").unwrap();
        assert_eq!(bare.config.triton_autocomplete, Some(0));
    }
}
