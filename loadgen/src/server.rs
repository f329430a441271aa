//! Starts a `shoal` server as a separate process on loopback, as a sidecar
//! runs, for the external modes when no server is given; stops it with
//! SIGTERM when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start {bin}: {source} (build it with `cargo build --release -p shoal` or pass --shoal-bin)")]
    Spawn { bin: String, source: std::io::Error },
    #[error("shoal exited before it listened: {0}")]
    NoListen(String),
}

pub struct Sidecar {
    child: Child,
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
        let mut child = Command::new(bin)
            .arg("--model-repository")
            .arg(repository)
            .args([
                "--http-port",
                "0",
                "--grpc-port",
                "0",
                "--metrics-port",
                "0",
            ])
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| ServerError::Spawn {
                bin: bin.display().to_string(),
                source,
            })?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("shoal listening") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(120)).map_err(|_| {
            let status = child.try_wait().ok().flatten();
            ServerError::NoListen(format!("{status:?}"))
        })?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or_default()
                .to_string()
        };
        Ok(Self {
            http: format!("http://{}", field("http")),
            grpc: format!("http://{}", field("grpc")),
            child,
        })
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
