//! Shared test harness: a mock ZapSign and the proxy in-process on 127.0.0.1:0, a one-shot HTTP client, the
//! proxy binary as a subprocess, a listener that counts connections (for "no other host receives"), and a
//! real nginx as an upstream ([`nginx`]).
#![allow(dead_code)]

pub mod h2_raw;
pub mod nginx;
pub mod raw_upstream;
pub mod redis;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use zapsign_proxy::config::Config;
use zapsign_proxy::mock::{MockConfig, MockState, MockZapSign};
use zapsign_proxy::Listeners;

/// A running proxy (in-process) in front of a running mock.
pub struct Harness {
    pub mock: MockZapSign,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Starts a mock with `mock_cfg` and the proxy in static mode with `extra` TOML appended.
    pub async fn start_static(extra: &str, mock_cfg: MockConfig) -> Self {
        let mock = MockZapSign::start(mock_cfg).await.expect("mock starts");
        let text = format!(
            "[auth]\nmode = \"static\"\napi_token = \"{}\"\n{extra}",
            zapsign_proxy::mock::DEMO_API_TOKEN
        );
        let url = mock.url();
        Self::start_with(mock, &text, &url).await
    }

    /// Starts a mock with `mock_cfg`, lets `prepare` set it up, then the proxy in JWT mode with the demo
    /// credentials and `extra` TOML appended.
    pub async fn start_jwt(extra: &str, mock_cfg: MockConfig, prepare: impl FnOnce(&MockState)) -> Self {
        let mock = MockZapSign::start(mock_cfg).await.expect("mock starts");
        prepare(&mock.state);
        let url = mock.url();
        Self::start_with(mock, &jwt_config(extra), &url).await
    }

    /// Waits until `/readyz` answers 200, up to `deadline`; returns whether it did.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if send(self.admin, get(self.admin, "/readyz")).await.status == 200 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Starts the proxy with `text` as config, `upstream_url` as upstream, in front of `mock`. Pacing is off
    /// (`ZAPSIGN_PROXY_PACING_LIMIT=0`) unless `text` has a `[pacing]` section: tests not about pacing must not
    /// wait for the account's budget.
    pub async fn start_with(mock: MockZapSign, text: &str, upstream_url: &str) -> Self {
        let url = upstream_url.to_owned();
        let pacing_off = !text.contains("[pacing]");
        let env = move |name: &str| match name {
            "ZAPSIGN_PROXY_UPSTREAM_URL" => Some(url.clone()),
            "ZAPSIGN_PROXY_LISTEN" | "ZAPSIGN_PROXY_ADMIN_LISTEN" => Some("127.0.0.1:0".into()),
            "ZAPSIGN_PROXY_PACING_LIMIT" if pacing_off => Some("0".into()),
            _ => None,
        };
        let config = Config::from_toml(text, &env).expect("test config is valid");
        let listeners = Listeners::bind(&config).await.expect("bind");
        let addr = listeners.proxy.local_addr().unwrap();
        let admin = listeners.admin.as_ref().unwrap().local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            zapsign_proxy::run(config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("proxy runs");
        });
        Self {
            mock,
            addr,
            admin,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// A response, whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends one request over a new HTTP/1.1 connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    Caller::connect(addr).await.send(req).await
}

/// Sends one request over a new HTTP/2 prior-knowledge (h2c) connection to `addr`.
pub async fn send_h2c(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET path` with a Host header.
pub fn get(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Asserts a proxy-own error answer: status, JSON code and header.
pub fn assert_proxy_error(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "body: {:?}", a.body);
    assert_eq!(a.headers["x-zapsign-proxy-error"], code);
    let json = a.json();
    assert_eq!(json["error"], code);
    assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// A listener that only counts the connections it receives: "another host" in tests.
pub struct Bystander {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((_stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `check` every 10 ms until it holds or `deadline` passes; returns whether it held.
pub async fn wait_until(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// The proxy binary running as a child process, its stderr collected line by line.
pub struct Subprocess {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Subprocess {
    /// Starts `zapsign-proxy --config <file with text>` with `env`, JSON logs, ports chosen by the kernel,
    /// and waits for it to say where it listens. Pacing is off (`ZAPSIGN_PROXY_PACING_LIMIT=0`) unless `env`
    /// sets the variable itself.
    pub fn start(text: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
            .arg("--config")
            .arg(&path)
            .env_clear()
            .env("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:0")
            .env("ZAPSIGN_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("ZAPSIGN_PROXY_WORKERS", "2")
            .env("RUST_LOG", "info")
            .env("ZAPSIGN_PROXY_PACING_LIMIT", "0")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zapsign-proxy");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let end = Instant::now() + Duration::from_secs(20);
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() && Instant::now() < end {
            for line in lines.lock().unwrap().iter() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let parsed = v["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                match v["message"].as_str() {
                    Some("proxy listening") => addr = parsed,
                    Some("admin listening") => admin = parsed,
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let addr = addr.unwrap_or_else(|| panic!("proxy did not start; stderr: {:?}", lines.lock().unwrap()));
        Self {
            child,
            lines,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends `signal` (e.g. "TERM") to the child.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{signal} failed");
    }

    /// Waits for the child to exit, up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The config file the proxy was started with (tests rewrite it before SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("proxy.toml")
    }

    pub fn log_text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM, waits (off the async runtime) up to 10 s for the exit, and returns every log line.
    pub async fn stop_and_logs(mut self) -> String {
        self.signal("TERM");
        tokio::task::spawn_blocking(move || {
            self.wait_exit(std::time::Duration::from_secs(10));
            self.log_text()
        })
        .await
        .unwrap()
    }
}

impl Drop for Subprocess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy's static-mode config, JSON logs, for subprocess tests.
pub fn static_config(upstream: &str, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\n[auth]\nmode = \"static\"\napi_token = \"{}\"\n[log]\nformat = \"json\"\n{extra}",
        zapsign_proxy::mock::DEMO_API_TOKEN
    )
}

/// Writes `request` on a new connection and reads until the server closes it (or 5 s pass).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A throw-away CA and a server certificate it signed for 127.0.0.1 and localhost.
pub struct TestCa {
    pub ca_pem: String,
    pub server_cert: rustls_pki_types::CertificateDer<'static>,
    pub server_key_der: Vec<u8>,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "zapsign-proxy test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let cert = params.signed_by(&key, &issuer).unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            server_cert: cert.der().clone(),
            server_key_der: key.serialize_der(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }

    /// A rustls server config presenting the server certificate.
    pub fn server_config(&self) -> rustls::ServerConfig {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(self.server_key_der.clone().into());
        rustls::ServerConfig::builder_with_provider(zapsign_proxy::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .unwrap()
    }
}

/// JWT-mode config with the mock's demo credentials and `extra` TOML appended.
pub fn jwt_config(extra: &str) -> String {
    use zapsign_proxy::mock::{DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};
    format!(
        "[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\npassword = \"{DEMO_PASSWORD}\"\n{extra}"
    )
}

/// A caller holding one HTTP/1.1 keep-alive connection to `addr`.
pub struct Caller {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Caller {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect to proxy");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Self { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Answer {
        self.sender.ready().await.expect("connection usable");
        let resp = self.sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// A mock serving HTTPS with a fresh test CA, and the CA's PEM file for `upstream.ca_file`.
pub async fn tls_mock(cfg: MockConfig) -> (MockZapSign, tempfile::TempDir, std::path::PathBuf) {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let mock = MockZapSign::start_tls(cfg, ca.server_config()).await.unwrap();
    (mock, dir, ca_file)
}

/// Asserts a load run saw no failure.
pub fn assert_no_failures(ok: u64, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} non-2xx of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
}
