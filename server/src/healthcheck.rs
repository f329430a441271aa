//! `shoal healthcheck`: one HTTP GET of a health endpoint, for Kubernetes
//! exec probes. A sidecar bound to 127.0.0.1 is out of the kubelet's reach
//! (its `httpGet` probes come from the node), but a command run inside the
//! container reaches it; the image has no curl, so shoal is its own probe.

use clap::Parser;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Flags of `shoal healthcheck`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "shoal healthcheck",
    about = "Exit 0 when a health endpoint answers 200, 1 otherwise (for exec probes)"
)]
pub struct HealthcheckArgs {
    /// The endpoint: plain http:// (the metrics port serves health without
    /// TLS even when REST and gRPC use it).
    #[arg(
        long,
        env = "SHOAL_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:8002/v2/health/ready"
    )]
    pub url: String,

    /// Give up after this many milliseconds (connect and answer together).
    #[arg(long, env = "SHOAL_HEALTHCHECK_TIMEOUT_MS", default_value_t = 1000)]
    pub timeout_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{0}: only http://HOST:PORT/PATH is supported")]
    Url(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("no answer from {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} answered something that is not HTTP: {1:?}")]
    NotHttp(String, String),
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
}

/// `http://host[:port]/path` split into the address to dial, the Host
/// header and the request target.
fn parse_url(url: &str) -> Result<(String, String, String), HealthError> {
    let bad = || HealthError::Url(url.to_string());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') || path.contains(['\r', '\n', ' ']) {
        return Err(bad());
    }
    // `[::1]:8002`, `[::1]`, `localhost:8002`, `localhost`.
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    let dial = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((dial, authority.to_string(), path.to_string()))
}

/// GETs `url`; `Ok` only for a 200.
pub fn check(url: &str, timeout: Duration) -> Result<(), HealthError> {
    let (dial, host, path) = parse_url(url)?;
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let addrs: Vec<_> = dial
        .to_socket_addrs()
        .map_err(|e| HealthError::Resolve(dial.clone(), e))?
        .collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, left()) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut s = stream.ok_or_else(|| HealthError::Connect(dial.clone(), last))?;
    let io = |e| HealthError::Io(url.to_string(), e);
    s.set_write_timeout(Some(left())).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: shoal-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    // The status line is all that matters; read until its end.
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        s.set_read_timeout(Some(left())).map_err(io)?;
        let n = s.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default();
    let status = line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| HealthError::NotHttp(url.to_string(), line.to_string()))?;
    if status == 200 {
        Ok(())
    } else {
        Err(HealthError::Status {
            url: url.to_string(),
            status,
        })
    }
}

/// Runs the subcommand; the process's exit code.
pub fn run(args: &HealthcheckArgs) -> i32 {
    match check(&args.url, Duration::from_millis(args.timeout_ms)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shoal healthcheck: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls() {
        let p = |u: &str| parse_url(u).map_err(|e| e.to_string());
        assert_eq!(
            p("http://127.0.0.1:8002/v2/health/ready").unwrap(),
            (
                "127.0.0.1:8002".into(),
                "127.0.0.1:8002".into(),
                "/v2/health/ready".into()
            )
        );
        assert_eq!(p("http://[::1]").unwrap().0, "[::1]:80");
        assert_eq!(p("http://[::1]:9/x").unwrap().0, "[::1]:9");
        assert_eq!(p("http://localhost").unwrap().2, "/");
        for bad in [
            "https://x/",
            "ftp://x",
            "http://",
            "http://u@h/",
            "http://h/a b",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }

    /// A one-shot server answering `answer` to the first connection.
    fn serve_once(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
                // Read what is left of the request before closing: closing
                // with unread bytes sends a reset, which can reach the
                // client before it has read the answer (seen under load).
                let _ = s.shutdown(std::net::Shutdown::Write);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        format!("http://{addr}/v2/health/ready")
    }

    #[test]
    fn status_decides() {
        let t = Duration::from_secs(2);
        check(
            &serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            t,
        )
        .unwrap();
        let e = check(&serve_once(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"), t).unwrap_err();
        assert!(matches!(e, HealthError::Status { status: 503, .. }), "{e}");
        let e = check(&serve_once(b"SSH-2.0-OpenSSH\r\n"), t).unwrap_err();
        assert!(matches!(e, HealthError::NotHttp(..)), "{e}");
    }

    #[test]
    fn silence_and_refusal_fail_within_the_timeout() {
        // Accepts (the kernel's backlog) but never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let t0 = Instant::now();
        let e = check(&url, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, HealthError::Io(..)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        drop(l);
        let e = check(&url, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, HealthError::Connect(..)), "{e}");
    }
}
