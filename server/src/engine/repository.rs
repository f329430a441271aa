//! Scans a model repository directory: `<repo>/<model>/config.toml` and
//! numeric version directories holding the model file.

use super::config::ModelConfigFile;
use super::model::LoadError;
use super::EngineOptions;
use crate::backend::{BackendError, BackendFactory, BackendOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One model version found on disk.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
    pub config: ModelConfigFile,
}

fn repo_err(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Repository {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Lists every model version of the repository, sorted by name and version.
pub fn scan(repo: &Path) -> Result<Vec<Entry>, LoadError> {
    let dir = std::fs::read_dir(repo).map_err(|e| repo_err(repo, format!("cannot read: {e}")))?;
    let mut models: Vec<PathBuf> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    models.sort();
    let mut out = Vec::new();
    for mdir in models {
        let name = mdir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with('.') {
            continue;
        }
        let cfg_path = mdir.join("config.toml");
        let config = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| repo_err(&cfg_path, format!("cannot read: {e}")))?;
            ModelConfigFile::parse(&name, &text)?
        } else {
            ModelConfigFile::default()
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
        for (version, vdir) in versions {
            let path = model_file(&vdir).ok_or_else(|| {
                repo_err(&vdir, "no model file (model.onnx); run scripts/setup.sh to generate the reference models")
            })?;
            out.push(Entry {
                name: name.clone(),
                version,
                path,
                config: config.clone(),
            });
        }
    }
    Ok(out)
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
