//! Starts the `shoal` binary as a child process with every port 0 and
//! reads the bound addresses from its listening line. Tests, benchmarks and
//! the load generator's sidecar all start servers this way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `shoal` child; killed when dropped unless it already exited.
pub struct Launched {
    pub child: Child,
    /// URLs of the REST, gRPC and admin listeners: `http://`, or
    /// `https://` for REST and gRPC under TLS; empty for a protocol
    /// started without TCP.
    pub http: String,
    pub grpc: String,
    pub metrics: String,
    /// Unix socket paths, when started with `--http-uds` / `--grpc-uds`.
    pub http_uds: Option<PathBuf>,
    pub grpc_uds: Option<PathBuf>,
    /// Its stderr lines, when started with [`Options::capture_stderr`].
    pub stderr: Option<std::sync::mpsc::Receiver<String>>,
}

/// How [`Launched::start_with`] starts the child.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    /// RUST_LOG.
    pub log: &'a str,
    /// More environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// Read stderr into [`Launched::stderr`] instead of inheriting it.
    pub capture_stderr: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {bin}: {source}")]
    Spawn { bin: String, source: std::io::Error },
    #[error("shoal did not print its listening line within {0:?} (exit status {1:?})")]
    NoListen(Duration, Option<std::process::ExitStatus>),
}

fn listening_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.strip_prefix("shoal listening ")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The `http=… grpc=… metrics=…` addresses of a listening line, as URLs
/// (`https://` for REST and gRPC after `tls=on`, empty for `off`).
pub fn parse_listening(line: &str) -> Option<(String, String, String)> {
    let scheme = if listening_field(line, "tls") == Some("on") {
        "https"
    } else {
        "http"
    };
    let url = |k: &str, scheme: &str| {
        listening_field(line, k).map(|a| match a {
            "off" => String::new(),
            a => format!("{scheme}://{a}"),
        })
    };
    Some((
        url("http", scheme)?,
        url("grpc", scheme)?,
        url("metrics", "http")?,
    ))
}

/// The `http_uds=…` and `grpc_uds=…` socket paths of a listening line.
pub fn parse_sockets(line: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let path = |k| listening_field(line, k).map(PathBuf::from);
    (path("http_uds"), path("grpc_uds"))
}

impl Launched {
    /// Starts `bin` on `repository` with `extra` flags; `log` is its
    /// RUST_LOG. Waits up to two minutes for the listening line.
    pub fn start(
        bin: &Path,
        repository: &Path,
        extra: &[&str],
        log: &str,
    ) -> Result<Self, LaunchError> {
        Self::start_with(
            bin,
            repository,
            extra,
            &Options {
                log,
                ..Options::default()
            },
        )
    }

    /// [`Launched::start`] with more control over the child's environment
    /// and stderr.
    pub fn start_with(
        bin: &Path,
        repository: &Path,
        extra: &[&str],
        opts: &Options<'_>,
    ) -> Result<Self, LaunchError> {
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
            .args(extra)
            .env("RUST_LOG", opts.log)
            .envs(opts.env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(if opts.capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                bin: bin.display().to_string(),
                source,
            })?;
        let stderr = child.stderr.take().map(|err| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        });
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addrs) = parse_listening(&line) {
                    let _ = tx.send((addrs, parse_sockets(&line)));
                }
            }
        });
        let wait = Duration::from_secs(120);
        let ((http, grpc, metrics), (http_uds, grpc_uds)) = rx
            .recv_timeout(wait)
            .map_err(|_| LaunchError::NoListen(wait, child.try_wait().ok().flatten()))?;
        Ok(Self {
            child,
            http,
            grpc,
            metrics,
            http_uds,
            grpc_uds,
            stderr,
        })
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the child to exit; `None` if it did not within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s.code());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_listening_line() {
        let l = "shoal listening http=127.0.0.1:1 grpc=127.0.0.1:2 metrics=[::1]:3";
        assert_eq!(
            parse_listening(l),
            Some((
                "http://127.0.0.1:1".into(),
                "http://127.0.0.1:2".into(),
                "http://[::1]:3".into()
            ))
        );
        assert_eq!(parse_sockets(l), (None, None));
        let l = "shoal listening http=off grpc=127.0.0.1:2 metrics=127.0.0.1:3 \
                 http_uds=/tmp/h.sock grpc_uds=/tmp/g.sock tls=on";
        assert_eq!(
            parse_listening(l),
            Some((
                String::new(),
                "https://127.0.0.1:2".into(),
                "http://127.0.0.1:3".into()
            ))
        );
        assert_eq!(
            parse_sockets(l),
            (Some("/tmp/h.sock".into()), Some("/tmp/g.sock".into()))
        );
        assert_eq!(parse_listening("shoal listening http=a"), None);
        assert_eq!(parse_listening("something else"), None);
    }
}
