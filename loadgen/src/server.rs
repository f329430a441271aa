//! Starts a `shoal` server as a separate process on loopback, as a sidecar
//! runs, for the external modes when no server is given; stops it with
//! SIGTERM when dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0} (build it with `cargo build --release -p shoal` or pass --shoal-bin)")]
    Launch(#[from] shoal::launch::LaunchError),
}

/// A `shoal` started for the run; SIGTERM, then kill, when dropped.
pub struct Sidecar {
    inner: shoal::launch::Launched,
    pub http: String,
    pub grpc: String,
}

/// `shoal` next to this executable (both live in the same target folder).
pub fn default_binary() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    let dir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test and bench executables live one level down, in deps/.
    for d in [
        dir.clone(),
        dir.parent().map(Path::to_path_buf).unwrap_or_default(),
    ] {
        let p = d.join("shoal");
        if p.is_file() {
            return p;
        }
    }
    dir.join("shoal")
}

impl Sidecar {
    pub fn start(bin: &Path, repository: &Path) -> Result<Self, ServerError> {
        let log = std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into());
        let inner = shoal::launch::Launched::start(bin, repository, &[], &log)?;
        Ok(Self {
            http: inner.http.clone(),
            grpc: inner.grpc.clone(),
            inner,
        })
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // In-flight requests drain on SIGTERM; the launcher kills it if not.
        self.inner.sigterm();
        let _ = self.inner.wait_exit(Duration::from_secs(3));
    }
}
