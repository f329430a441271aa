//! Scans a model repository directory: `<repo>/<model>/config.toml` and
//! numeric version directories holding the model file.

use super::config::ModelConfigFile;
use super::model::LoadError;
use super::EngineOptions;
use crate::backend::{BackendError, BackendFactory, BackendOptions};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
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
pub fn scan(repo: &Path) -> Result<Vec<Entry>, LoadError> {
    let mut out = Vec::new();
    for name in list_models(repo)? {
        out.extend(scan_model(repo, &name)?);
    }
    Ok(out)
}

/// The model names of a repository (its directories), sorted.
pub fn list_models(repo: &Path) -> Result<Vec<String>, LoadError> {
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
pub fn scan_model(repo: &Path, name: &str) -> Result<Vec<Entry>, LoadError> {
    let mdir = repo.join(name);
    let cfg_path = mdir.join("config.toml");
    let (config, text) = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| repo_err(&cfg_path, format!("cannot read: {e}")))?;
        (ModelConfigFile::parse(name, &text)?, text)
    } else {
        (ModelConfigFile::default(), String::new())
    };
    let mut versions: Vec<(u64, PathBuf)> = std::fs::read_dir(&mdir)
        .map_err(|e| repo_err(&mdir, format!("cannot read: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path())))
        .collect();
    versions.sort();
    if versions.is_empty() {
        return Err(repo_err(
            &mdir,
            "no numeric version directory (e.g. 1/model.onnx)",
        ));
    }
    let mut out = Vec::new();
    for (version, vdir) in versions {
        let path = model_file(&vdir).ok_or_else(|| {
            repo_err(
                &vdir,
                "no model file (model.onnx); run scripts/setup.sh to generate the reference models",
            )
        })?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        file_stamp(&path).hash(&mut h);
        out.push(Entry {
            name: name.to_string(),
            version,
            path,
            config: config.clone(),
            stamp: h.finish(),
        });
    }
    Ok(out)
}

/// Changes when anything a load of `name` reads changes: its config and
/// its version directories and files. Needs no parsing, so a broken model
/// has one too (a poll retries it only once it changed).
pub fn fingerprint(repo: &Path, name: &str) -> u64 {
    let mdir = repo.join(name);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(mdir.join("config.toml")).ok().hash(&mut h);
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(&mdir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    for (n, p) in dirs {
        n.hash(&mut h);
        file_stamp(&p.join("model.onnx")).hash(&mut h);
    }
    h.finish()
}

/// Size and modification time: what a copy or rewrite of a file changes.
fn file_stamp(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()))
}

fn model_file(vdir: &Path) -> Option<PathBuf> {
    let p = vdir.join("model.onnx");
    p.is_file().then_some(p)
}

/// The backend factory for a model file.
pub fn factory_for(
    entry: &Entry,
    options: &EngineOptions,
) -> Result<Arc<dyn BackendFactory>, BackendError> {
    let platform = entry
        .config
        .platform
        .as_deref()
        .unwrap_or("onnxruntime_onnx");
    if platform != "onnxruntime_onnx" || !crate::backend::is_onnx(&entry.path) {
        return Err(BackendError::Load {
            path: entry.path.display().to_string(),
            reason: format!(
                "platform {platform:?} is not supported (this build serves onnxruntime_onnx)"
            ),
        });
    }
    crate::backend::ort::init_runtime(options.ort_library.as_deref())?;
    let path = entry.path.clone();
    let opts = BackendOptions {
        intra_op_threads: entry.config.intra_op_threads.unwrap_or(1),
        inter_op_threads: entry.config.inter_op_threads.unwrap_or(1),
    };
    Ok(Arc::new(move || {
        crate::backend::ort::OrtBackend::load(&path, &opts)
            .map(|b| Box::new(b) as Box<dyn crate::backend::Backend>)
    }))
}
