//! Model control, as Triton's `--model-control-mode`: which models of the
//! repository are loaded, and loading, reloading and unloading them while
//! requests keep being served.
//!
//! A (re)load builds the new versions completely (sessions created, one
//! warm-up inference) before one table swap makes them visible; versions it
//! replaces or removes drain (requests that already hold them finish) and
//! only then stop. A failed load changes nothing that serves.

use super::model::{LoadError, ModelVersion};
use super::repository::{self, Entry};
use super::{Engine, EngineOptions, ErrorKind, Model};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Triton's model control modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ControlMode {
    /// Load every model at startup; nothing changes afterwards.
    #[default]
    None,
    /// Load every model at startup, then follow the repository's changes.
    Poll,
    /// Load the models `--load-model` names; then only on request.
    Explicit,
}

impl ControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

/// A model version's state as the repository index reports it (Triton's
/// names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Ready,
    Loading,
    Unloading,
    Unavailable,
}

impl ModelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Ready => "READY",
            ModelState::Loading => "LOADING",
            ModelState::Unloading => "UNLOADING",
            ModelState::Unavailable => "UNAVAILABLE",
        }
    }
}

/// One line of the repository index: a model version, or a model with no
/// version when none was ever loaded (then `state` is `None`) or it failed
/// before its versions were known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    pub state: Option<ModelState>,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("model {0:?} is not in the model repository")]
    NotFound(String),
    #[error("explicit model load / unload is not allowed in model control mode {0} (use --model-control-mode explicit)")]
    NotAllowed(&'static str),
    #[error("failed to load model {model:?}: {reason}")]
    LoadFailed { model: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Repository(String),
}

impl ControlError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::NotFound(_) => ErrorKind::NotFound,
            ControlError::NotAllowed(_) => ErrorKind::Unavailable,
            // As Triton: a model that does not load is a bad request for it.
            ControlError::LoadFailed { .. } | ControlError::Invalid(_) => {
                ErrorKind::InvalidArgument
            }
            ControlError::Repository(_) => ErrorKind::Internal,
        }
    }
}

/// What control knows of a model beyond the engine's table.
#[derive(Debug, Default)]
struct Tracked {
    /// Stamp of each serving version: a reload keeps unchanged versions.
    stamps: BTreeMap<u64, u64>,
    /// Repository fingerprint at the last load attempt: a poll retries a
    /// failed model only once its files changed.
    attempted: Option<u64>,
    /// Versions that do not serve: loading, draining, failed or unloaded.
    others: BTreeMap<u64, (ModelState, String)>,
    /// A failure before any version was known (config, directory).
    failure: Option<String>,
    /// Unloaded on request (or removed from the repository).
    unloaded: bool,
}

/// Loads, reloads and unloads the models of one repository into an engine.
pub struct ModelControl {
    engine: Engine,
    repo: PathBuf,
    options: EngineOptions,
    mode: ControlMode,
    /// How long a retired version's requests get before it stops anyway.
    drain_timeout: Duration,
    /// One load or unload at a time: each decides from the table it swaps.
    op: tokio::sync::Mutex<()>,
    tracked: Mutex<BTreeMap<String, Tracked>>,
}

impl std::fmt::Debug for ModelControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelControl")
            .field("repo", &self.repo)
            .field("mode", &self.mode)
            .finish()
    }
}

impl ModelControl {
    /// Control over `engine`, which holds what is already loaded (all of
    /// the repository in mode `none`).
    pub fn new(
        engine: Engine,
        repo: PathBuf,
        options: EngineOptions,
        mode: ControlMode,
        drain_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            engine,
            repo,
            options,
            mode,
            drain_timeout,
            op: tokio::sync::Mutex::new(()),
            tracked: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn mode(&self) -> ControlMode {
        self.mode
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The startup load of modes `poll` (everything) and `explicit` (the
    /// models named; `*` means all). A model that fails to load is logged
    /// and indexed and the others serve; a name not in the repository is
    /// an error, as a mistyped flag should be.
    pub async fn initial_load(&self, names: &[String]) -> Result<(), ControlError> {
        if !names.is_empty() && self.mode != ControlMode::Explicit {
            return Err(ControlError::Invalid(format!(
                "--load-model needs --model-control-mode explicit (it is {})",
                self.mode.as_str()
            )));
        }
        let wanted: Vec<String> = match self.mode {
            ControlMode::None => return Ok(()),
            ControlMode::Poll => return self.load_every_model().await,
            ControlMode::Explicit if names.iter().any(|n| n == "*") => {
                return self.load_every_model().await
            }
            ControlMode::Explicit => {
                let all = self.list()?;
                if let Some(missing) = names.iter().find(|n| !all.contains(n)) {
                    return Err(ControlError::NotFound(missing.clone()));
                }
                names.to_vec()
            }
        };
        for name in wanted {
            // Logged and indexed by `load_model`; the others still load.
            let _ = self.load_model(&name).await;
        }
        Ok(())
    }

    /// Loads every model of the repository, each on its own: one that
    /// fails is logged and indexed and the others serve.
    pub async fn load_every_model(&self) -> Result<(), ControlError> {
        for name in self.list()? {
            let _ = self.load_model(&name).await;
        }
        Ok(())
    }

    /// Loads or reloads a model on request (mode `explicit` only).
    pub async fn load(&self, name: &str) -> Result<(), ControlError> {
        if self.mode != ControlMode::Explicit {
            return Err(ControlError::NotAllowed(self.mode.as_str()));
        }
        self.load_model(name).await
    }

    /// Unloads a model on request (mode `explicit` only): new requests get
    /// NOT_FOUND at once; queued and running ones finish; then its replicas
    /// stop and its keyed state is dropped. Returns once it stopped.
    pub async fn unload(&self, name: &str) -> Result<(), ControlError> {
        if self.mode != ControlMode::Explicit {
            return Err(ControlError::NotAllowed(self.mode.as_str()));
        }
        self.unload_model(name).await
    }

    /// One poll of the repository (mode `poll`): loads new models, reloads
    /// changed ones, unloads removed ones.
    pub async fn poll(&self) {
        let names = match self.list() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("repository poll: {e}");
                return;
            }
        };
        let present: BTreeSet<&String> = names.iter().collect();
        let known: Vec<String> = {
            let tracked = self.tracked.lock();
            let table = self.engine.models();
            table
                .keys()
                .chain(tracked.iter().filter(|(_, t)| !t.unloaded).map(|(n, _)| n))
                .filter(|n| !present.contains(n))
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        for name in known {
            tracing::info!(model = %name, "removed from the repository; unloading");
            let _ = self.unload_model(&name).await;
        }
        for name in &names {
            let fp = repository::fingerprint(&self.repo, name);
            let attempted = self.tracked.lock().get(name).and_then(|t| t.attempted);
            if attempted != Some(fp) {
                let _ = self.load_model(name).await;
            }
        }
    }

    /// The repository index: every model of the repository and every model
    /// loaded, with each version's state. `ready_only` keeps READY lines.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let table = self.engine.models();
        let tracked = self.tracked.lock();
        let mut names: BTreeSet<String> = self.list().unwrap_or_default().into_iter().collect();
        names.extend(table.keys().cloned());
        names.extend(tracked.keys().cloned());
        let mut out = Vec::new();
        for name in names {
            let serving: Vec<u64> = table
                .get(&name)
                .map(|m| m.versions.keys().copied().collect())
                .unwrap_or_default();
            let t = tracked.get(&name);
            let mut lines: BTreeMap<u64, (ModelState, String)> = serving
                .iter()
                .map(|&v| (v, (ModelState::Ready, String::new())))
                .collect();
            if let Some(t) = t {
                for (v, s) in &t.others {
                    match lines.get_mut(v) {
                        // A failed reload of a serving version: the old
                        // load serves on, and the index says why the new
                        // one did not replace it.
                        Some(line) if s.0 == ModelState::Unavailable => {
                            line.1 =
                                format!("serving the previous load; reloading failed: {}", s.1);
                        }
                        Some(_) => {}
                        None => {
                            lines.insert(*v, s.clone());
                        }
                    }
                }
            }
            let start = out.len();
            out.extend(lines.into_iter().map(|(v, (state, reason))| IndexEntry {
                name: name.clone(),
                version: Some(v),
                state: Some(state),
                reason,
            }));
            let failure = t.and_then(|t| t.failure.clone());
            if let Some(reason) = failure {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: None,
                    state: Some(ModelState::Unavailable),
                    reason,
                });
            } else if out.len() == start {
                let unloaded = t.is_some_and(|t| t.unloaded);
                out.push(IndexEntry {
                    name: name.clone(),
                    version: None,
                    state: unloaded.then_some(ModelState::Unavailable),
                    reason: if unloaded {
                        "unloaded".into()
                    } else {
                        String::new()
                    },
                });
            }
        }
        if ready_only {
            out.retain(|e| e.state == Some(ModelState::Ready));
        }
        out
    }

    fn list(&self) -> Result<Vec<String>, ControlError> {
        repository::list_models(&self.repo).map_err(|e| ControlError::Repository(e.to_string()))
    }

    async fn load_model(&self, name: &str) -> Result<(), ControlError> {
        let guard = self.op.lock().await;
        let outcome = self.swap_in(name).await;
        drop(guard);
        match outcome {
            Ok(retired) => {
                self.retire(name, retired).await;
                Ok(())
            }
            Err(e) => {
                tracing::error!(model = %name, "{e}");
                Err(e)
            }
        }
    }

    /// Loads what changed on disk and swaps it in; returns the versions
    /// that no longer serve, still to be retired.
    async fn swap_in(&self, name: &str) -> Result<Vec<Retired>, ControlError> {
        // The name becomes a path: only a directory listed in the repository.
        if !self.list()?.iter().any(|n| n == name) {
            return Err(ControlError::NotFound(name.to_string()));
        }
        let fp = repository::fingerprint(&self.repo, name);
        let failed = |reason: String| ControlError::LoadFailed {
            model: name.to_string(),
            reason,
        };
        let entries = match repository::scan_model(&self.repo, name, &self.options) {
            Ok(e) => e,
            Err(e) => {
                let mut tracked = self.tracked.lock();
                let t = tracked.entry(name.to_string()).or_default();
                t.attempted = Some(fp);
                t.failure = Some(e.to_string());
                return Err(failed(e.to_string()));
            }
        };
        let current = self.engine.models().get(name).cloned();
        let (mut keep, mut todo) = (BTreeMap::new(), Vec::new());
        {
            let mut tracked = self.tracked.lock();
            let t = tracked.entry(name.to_string()).or_default();
            t.attempted = Some(fp);
            for e in entries {
                let same = t.stamps.get(&e.version) == Some(&e.stamp);
                match current.as_ref().and_then(|m| m.versions.get(&e.version)) {
                    Some(mv) if same => {
                        keep.insert(e.version, mv.clone());
                    }
                    _ => {
                        t.others
                            .insert(e.version, (ModelState::Loading, String::new()));
                        todo.push(e);
                    }
                }
            }
        }
        let versions: Vec<u64> = todo.iter().map(|e| e.version).collect();
        let options = self.options.clone();
        let loaded = tokio::task::spawn_blocking(move || load_versions(todo, &options))
            .await
            .unwrap_or_else(|e| Err((0, format!("loader task failed: {e}"))));
        let loaded = match loaded {
            Ok(l) => l,
            Err((version, reason)) => {
                let mut tracked = self.tracked.lock();
                let t = tracked.entry(name.to_string()).or_default();
                for v in &versions {
                    let why = if *v == version {
                        reason.clone()
                    } else {
                        format!("not loaded: version {version} of the model failed")
                    };
                    t.others.insert(*v, (ModelState::Unavailable, why));
                }
                t.failure = None;
                return Err(failed(format!("version {version}: {reason}")));
            }
        };
        let mut stamps: BTreeMap<u64, u64> = {
            let tracked = self.tracked.lock();
            let t = tracked.get(name);
            keep.keys()
                .filter_map(|v| Some((*v, *t?.stamps.get(v)?)))
                .collect()
        };
        for (stamp, mv) in loaded {
            let v = mv.core.version;
            stamps.insert(v, stamp);
            keep.insert(v, Arc::new(mv));
        }
        let model = Model { versions: keep };
        let new: BTreeMap<u64, Arc<ModelVersion>> = model.versions.clone();
        let old = self.engine.swap_model(name, Some(model));
        let retired: Vec<Retired> = old
            .map(|m| {
                m.versions
                    .iter()
                    .filter(|(v, mv)| new.get(v).is_none_or(|n| !Arc::ptr_eq(n, mv)))
                    .map(|(v, mv)| Retired {
                        version: *v,
                        removed: !new.contains_key(v),
                        mv: mv.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut tracked = self.tracked.lock();
        let t = tracked.entry(name.to_string()).or_default();
        t.stamps = stamps;
        t.failure = None;
        t.unloaded = false;
        for v in new.keys() {
            t.others.remove(v);
        }
        for r in retired.iter().filter(|r| r.removed) {
            t.others
                .insert(r.version, (ModelState::Unloading, String::new()));
        }
        for v in &versions {
            tracing::info!(model = %name, version = v, "model loaded and serving");
        }
        Ok(retired)
    }

    async fn unload_model(&self, name: &str) -> Result<(), ControlError> {
        let guard = self.op.lock().await;
        let old = self.engine.swap_model(name, None);
        let retired: Vec<Retired> = match old {
            Some(m) => m
                .versions
                .iter()
                .map(|(v, mv)| Retired {
                    version: *v,
                    removed: true,
                    mv: mv.clone(),
                })
                .collect(),
            None => {
                let known = self.tracked.lock().contains_key(name)
                    || self.list()?.iter().any(|n| n == name);
                if !known {
                    return Err(ControlError::NotFound(name.to_string()));
                }
                Vec::new()
            }
        };
        {
            let mut tracked = self.tracked.lock();
            let t = tracked.entry(name.to_string()).or_default();
            t.stamps.clear();
            t.attempted = None;
            t.failure = None;
            t.unloaded = true;
            t.others.retain(|_, (s, _)| *s != ModelState::Loading);
            for r in &retired {
                t.others
                    .insert(r.version, (ModelState::Unloading, String::new()));
            }
        }
        drop(guard);
        tracing::info!(model = %name, "unloading: draining requests in flight");
        self.retire(name, retired).await;
        Ok(())
    }

    /// Lets the requests that hold each version finish, then stops its
    /// replicas (their threads join, their sessions are freed).
    async fn retire(&self, name: &str, retired: Vec<Retired>) {
        let deadline = Instant::now() + self.drain_timeout;
        for r in retired {
            // The engine's table no longer has it: every other holder is a
            // request already admitted (or a metadata call), and it only
            // lets go.
            while Arc::strong_count(&r.mv) > 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if Arc::strong_count(&r.mv) > 1 {
                tracing::warn!(model = %name, version = r.version, "requests still in flight after the drain timeout; stopping anyway");
            }
            let mv = r.mv;
            let _ = tokio::task::spawn_blocking(move || {
                for replica in &mv.replicas {
                    replica.stop();
                }
            })
            .await;
            if r.removed {
                let mut tracked = self.tracked.lock();
                if let Some(t) = tracked.get_mut(name) {
                    if let Some(s) = t.others.get_mut(&r.version) {
                        if s.0 == ModelState::Unloading {
                            *s = (ModelState::Unavailable, "unloaded".into());
                        }
                    }
                }
            }
            tracing::info!(model = %name, version = r.version, "version stopped");
        }
    }
}

/// A version taken out of the table, to drain and stop.
struct Retired {
    version: u64,
    /// Gone for good (not replaced by a new load of the same version).
    removed: bool,
    mv: Arc<ModelVersion>,
}

/// Loads and warms each version; on the first failure stops the ones
/// already loaded and returns that version and why.
fn load_versions(
    entries: Vec<Entry>,
    options: &EngineOptions,
) -> Result<Vec<(u64, ModelVersion)>, (u64, String)> {
    let mut done: Vec<(u64, ModelVersion)> = Vec::new();
    for e in entries {
        let loaded = repository::factory_for(&e, options)
            .map_err(|source| LoadError::Backend {
                model: e.name.clone(),
                version: e.version,
                source,
            })
            .and_then(|f| ModelVersion::load(&e.name, e.version, &e.config, f))
            .map_err(|err| err.to_string())
            .and_then(
                |mv| match super::warmup::run(&mv, super::warmup::Fallback::Zeros) {
                    Ok(()) => Ok(mv),
                    Err(reason) => {
                        stop(&mv);
                        Err(reason)
                    }
                },
            );
        match loaded {
            Ok(mv) => done.push((e.stamp, mv)),
            Err(reason) => {
                done.iter().for_each(|(_, mv)| stop(mv));
                return Err((e.version, reason));
            }
        }
    }
    Ok(done)
}

fn stop(mv: &ModelVersion) {
    mv.replicas.iter().for_each(|r| r.stop());
}
