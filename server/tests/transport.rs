//! The real binary on its sidecar transports: gRPC and REST over Unix
//! domain sockets (with TCP off), and over TLS and mutual TLS with
//! certificates generated here, compared with in-process ONNX Runtime.

mod common;

use bytes::Bytes;
use common::{assert_close, ffnn_input, reference_ffnn, Server};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use shoal_proto as pb;
use shoal_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

fn ffnn_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        common::model_repository().join("ffnn"),
        dir.path().join("ffnn"),
    )
    .unwrap();
    dir
}

fn infer_request(rows: usize, input: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "ffnn".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 784],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::copy_from_slice(bytemuck::cast_slice(input))],
        ..Default::default()
    }
}

async fn grpc_infer_matches(mut c: GrpcInferenceServiceClient<Channel>) {
    let input = ffnn_input(2, 5);
    let want = reference_ffnn(2, &input);
    assert!(
        c.server_live(pb::ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    let r = c
        .model_infer(infer_request(2, &input))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs[0].shape, vec![2, 10]);
    assert_close(
        &bytemuck::pod_collect_to_vec::<u8, f32>(&r.raw_output_contents[0]),
        &want,
        1e-6,
    );
}

/// A REST request over any byte stream; returns status and body.
async fn http_call<IO>(io: IO, method: &str, path: &str, body: Option<String>) -> (u16, String)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Checks readiness and one JSON inference over connections from `connect`.
async fn http_infer_matches<IO, F, Fut>(connect: F)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = IO>,
{
    let (status, _) = http_call(connect().await, "GET", "/v2/health/ready", None).await;
    assert_eq!(status, 200);
    let input = ffnn_input(1, 9);
    let want = reference_ffnn(2, &input);
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": input}]});
    let (status, body) = http_call(
        connect().await,
        "POST",
        "/v2/models/ffnn/infer",
        Some(body.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got: Vec<f32> = v["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_close(&got, &want, 1e-6);
}

async fn uds_channel(path: PathBuf) -> Channel {
    // The URI is only a placeholder: the connector decides where to go.
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

#[tokio::test]
async fn grpc_and_rest_over_unix_sockets() {
    let repo = ffnn_repo();
    let dir = tempfile::tempdir().unwrap();
    let http_sock = dir.path().join("http.sock");
    let grpc_sock = dir.path().join("grpc.sock");
    // A socket file left behind by a server that died is replaced.
    drop(std::os::unix::net::UnixListener::bind(&grpc_sock).unwrap());
    let s = Server::start_with_repo(
        repo.path(),
        &[
            "--http-uds",
            http_sock.to_str().unwrap(),
            "--grpc-uds",
            grpc_sock.to_str().unwrap(),
            "--grpc-tcp",
            "false",
        ],
    );
    assert_eq!(s.http_uds.as_deref(), Some(http_sock.as_path()));
    assert_eq!(s.grpc_uds.as_deref(), Some(grpc_sock.as_path()));
    assert_eq!(s.grpc, "", "gRPC has no TCP listener");
    assert!(s.http.starts_with("http://127.0.0.1:"), "{}", s.http);

    grpc_infer_matches(GrpcInferenceServiceClient::new(
        uds_channel(grpc_sock.clone()).await,
    ))
    .await;
    let p = http_sock.clone();
    http_infer_matches(|| {
        let p = p.clone();
        async move { UnixStream::connect(p).await.unwrap() }
    })
    .await;
    // REST keeps its TCP listener beside the socket.
    let r = reqwest::get(format!("{}/v2/health/live", s.http))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    assert_eq!(s.stop(), Some(0));
    assert!(
        !http_sock.exists() && !grpc_sock.exists(),
        "socket files are removed at exit"
    );
}

#[test]
fn bad_transport_flags_fail_clearly() {
    let repo = ffnn_repo();
    let dir = tempfile::tempdir().unwrap();
    let not_a_socket = dir.path().join("file");
    std::fs::write(&not_a_socket, b"keep me").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--http-tcp".into(), "false".into()],
            "needs --http-uds",
        ),
        (
            vec!["--grpc-uds".into(), not_a_socket.display().to_string()],
            "not a socket",
        ),
        (
            vec![
                "--tls-cert".into(),
                dir.path().join("none.pem").display().to_string(),
                "--tls-key".into(),
                dir.path().join("none.key").display().to_string(),
            ],
            "cannot read certificate",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec![
            "--model-repository".to_string(),
            repo.path().display().to_string(),
        ];
        args.extend(flags.iter().cloned());
        let stderr = common::failed_start(&args);
        assert!(stderr.contains(want), "{flags:?}: {stderr}");
    }
    assert_eq!(std::fs::read(&not_a_socket).unwrap(), b"keep me");
}

/// A CA, a server certificate for localhost and 127.0.0.1, and a client
/// certificate, all generated fresh for the test.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivateKeyDer<'static>,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "shoal test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf = |sans: Vec<String>, eku| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &ca).unwrap();
            (cert, key)
        };
        let (server, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client, client_key) = leaf(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth);

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Self {
            dir,
            ca: ca.der().clone(),
            client_chain: vec![client.der().clone()],
            client_key: PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn server_flags(&self, mutual: bool) -> Vec<String> {
        let mut f = vec![
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ];
        if mutual {
            f.extend(["--tls-client-ca".into(), self.path("ca.pem")]);
        }
        f
    }

    fn connector(&self, with_client_cert: bool, alpn: &[u8]) -> tokio_rustls::TlsConnector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = if with_client_cert {
            b.with_client_auth_cert(self.client_chain.clone(), self.client_key.clone_key())
                .unwrap()
        } else {
            b.with_no_client_auth()
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}

fn host_port(url: &str) -> String {
    url.strip_prefix("https://")
        .unwrap_or_else(|| panic!("{url} is not https"))
        .to_string()
}

async fn tls_channel(
    addr: String,
    connector: tokio_rustls::TlsConnector,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (addr, connector) = (addr.clone(), connector.clone());
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from("localhost").unwrap();
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
}

async fn tls_stream(
    addr: &str,
    connector: &tokio_rustls::TlsConnector,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

#[tokio::test]
async fn grpc_and_rest_over_tls() {
    let pki = Pki::new();
    let repo = ffnn_repo();
    let flags = pki.server_flags(false);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = Server::start_with_repo(repo.path(), &flags);
    let (http, grpc) = (host_port(&s.http), host_port(&s.grpc));
    assert!(s.metrics.starts_with("http://"), "metrics stay plain");

    let channel = tls_channel(grpc, pki.connector(false, b"h2"))
        .await
        .unwrap();
    grpc_infer_matches(GrpcInferenceServiceClient::new(channel)).await;
    let connector = pki.connector(false, b"http/1.1");
    http_infer_matches(|| {
        let (http, connector) = (http.clone(), connector.clone());
        async move { tls_stream(&http, &connector).await.unwrap() }
    })
    .await;

    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::get(format!("http://{http}/v2/health/live")).await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(s.stop(), Some(0));
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let pki = Pki::new();
    let repo = ffnn_repo();
    let flags = pki.server_flags(true);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let s = Server::start_with_repo(repo.path(), &flags);
    let (http, grpc) = (host_port(&s.http), host_port(&s.grpc));

    // Without a certificate: no gRPC call and no REST answer get through.
    let anonymous = pki.connector(false, b"h2");
    let refused = match tls_channel(grpc.clone(), anonymous).await {
        Err(_) => true,
        Ok(ch) => GrpcInferenceServiceClient::new(ch)
            .server_live(pb::ServerLiveRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let anonymous = pki.connector(false, b"http/1.1");
    let refused = match tls_stream(&http, &anonymous).await {
        Err(_) => true,
        Ok(io) => {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = hyper::Request::get("/v2/health/live")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap();
            send.send_request(req).await.is_err()
        }
    };
    assert!(refused, "a REST client without a certificate was served");

    // With one signed by the CA: served.
    let channel = tls_channel(grpc, pki.connector(true, b"h2")).await.unwrap();
    grpc_infer_matches(GrpcInferenceServiceClient::new(channel)).await;
    let connector = pki.connector(true, b"http/1.1");
    http_infer_matches(|| {
        let (http, connector) = (http.clone(), connector.clone());
        async move { tls_stream(&http, &connector).await.unwrap() }
    })
    .await;
    assert_eq!(s.stop(), Some(0));
}
