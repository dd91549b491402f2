//! A small stand-in for ZapSign, used by `zapsign-proxy mock-upstream`, `zapsign-proxy demo` and the tests.
//!
//! - `POST /api/v1/auth/token/{org}/` and `POST /api/v1/auth/token-refresh/`: JWT login and refresh as
//!   documented, with configurable lifetimes, rate-limited or slow logins and revocation.
//! - Any other path: requires `Authorization: Bearer <valid token>` (the static API token or a live access
//!   JWT, else 401 as ZapSign answers), and echoes what it received as JSON: method, raw target, headers,
//!   body length and SHA-256. The body is hashed as it streams, never held.
//! - Test hooks under `/api/v1/__mock/`: `download/{bytes}/` streams a known pattern, `slow/{ms}/` waits
//!   before answering, `redirect/?to=URL` answers 302, `status/{code}/` answers that status, `hop-headers/` answers with hop-by-hop headers.
//!
//! Every request is recorded (the last [`RECORD_LIMIT`]) and counted, so tests assert on what it received.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How many requests the mock remembers.
pub const RECORD_LIMIT: usize = 10_000;

/// What the mock accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// A static API token accepted on API calls.
    pub api_token: Option<String>,
    /// The organization id in the login path.
    pub organization_id: String,
    /// Login username.
    pub username: String,
    /// Login password.
    pub password: String,
    /// Lifetime of issued access tokens.
    pub access_ttl: Duration,
    /// Lifetime of issued refresh tokens.
    pub refresh_ttl: Duration,
    /// Put an `exp` claim into issued tokens.
    pub tokens_carry_exp: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            api_token: Some(DEMO_API_TOKEN.to_owned()),
            organization_id: DEMO_ORGANIZATION_ID.to_owned(),
            username: DEMO_USERNAME.to_owned(),
            password: DEMO_PASSWORD.to_owned(),
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(86_400),
            tokens_carry_exp: true,
        }
    }
}

/// The demo's static API token (not a secret: it only opens the bundled mock).
pub const DEMO_API_TOKEN: &str = "demo-api-token";
/// The demo's organization id.
pub const DEMO_ORGANIZATION_ID: &str = "1234";
/// The demo's username.
pub const DEMO_USERNAME: &str = "demo@example.com";
/// The demo's password (not a secret: it only opens the bundled mock).
pub const DEMO_PASSWORD: &str = "demo-password";

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// The raw request target (path and query) as it arrived.
    pub target: String,
    /// Headers, names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// HTTP version, e.g. `HTTP/1.1`.
    pub version: String,
    /// The address the request came from: one per upstream connection.
    pub peer: SocketAddr,
}

impl Recorded {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Counters and records, shared with tests.
#[derive(Debug)]
pub struct MockState {
    config: Mutex<MockConfig>,
    records: Mutex<VecDeque<Recorded>>,
    /// Successful logins.
    pub logins: AtomicU64,
    /// Login attempts, whatever their outcome.
    pub login_attempts: AtomicU64,
    /// Successful refreshes.
    pub refreshes: AtomicU64,
    /// Refresh attempts, whatever their outcome.
    pub refresh_attempts: AtomicU64,
    /// API calls answered 401.
    pub unauthorized: AtomicU64,
    /// API calls (not auth calls) received.
    pub api_calls: AtomicU64,
    /// The next this many login attempts answer 400 "Rate limit exceeded".
    pub rate_limited_logins: AtomicU32,
    /// Login attempts wait this many milliseconds before answering: an auth endpoint that hangs.
    pub login_delay_ms: AtomicU64,
    /// Tokens issued before this epoch are rejected.
    epoch: AtomicU64,
    /// Access tokens issued before this epoch are rejected (refresh tokens stay valid).
    access_epoch: AtomicU64,
    login_times: Mutex<Vec<std::time::Instant>>,
    issued: Mutex<Vec<String>>,
    close_next: std::sync::atomic::AtomicBool,
    serial: AtomicU64,
    last_login_password: Mutex<Option<String>>,
}

impl MockState {
    fn new(config: MockConfig) -> Self {
        Self {
            config: Mutex::new(config),
            records: Mutex::new(VecDeque::new()),
            logins: AtomicU64::new(0),
            login_attempts: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            refresh_attempts: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            api_calls: AtomicU64::new(0),
            rate_limited_logins: AtomicU32::new(0),
            login_delay_ms: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            access_epoch: AtomicU64::new(0),
            login_times: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            close_next: std::sync::atomic::AtomicBool::new(false),
            serial: AtomicU64::new(0),
            last_login_password: Mutex::new(None),
        }
    }

    fn config(&self) -> MockConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the behaviour from now on.
    pub fn update_config(&self, f: impl FnOnce(&mut MockConfig)) {
        f(&mut self.config.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Rejects every token issued so far (access and refresh; the static token stays valid unless changed).
    pub fn revoke_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every access token issued so far expire now, as if their time were up; refresh tokens stay valid.
    pub fn expire_access_tokens(&self) {
        self.access_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The next API answer carries `Connection: close`, so the connection it came on ends after it.
    pub fn close_connections_after_next(&self) {
        self.close_next.store(true, Ordering::SeqCst);
    }

    /// Every token issued so far (tests check none of them reaches a log).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When each login attempt arrived.
    pub fn login_attempt_times(&self) -> Vec<std::time::Instant> {
        self.login_times.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests received so far, oldest first.
    pub fn records(&self) -> Vec<Recorded> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The password of the last login attempt (tests check rotation with it).
    pub fn last_login_password(&self) -> Option<String> {
        self.last_login_password
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn record(&self, r: Recorded) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == RECORD_LIMIT {
            records.pop_front();
        }
        records.push_back(r);
    }

    fn issue(&self, kind: &str, ttl: Duration, with_exp: bool) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#);
        let exp = unix_now() + ttl.as_secs_f64();
        let mut payload = json!({
            "token_type": kind,
            "jti": format!("{:x}", self.serial.fetch_add(1, Ordering::Relaxed)),
            "user_id": 1,
            "epoch": self.epoch.load(Ordering::SeqCst),
            "access_epoch": self.access_epoch.load(Ordering::SeqCst),
            // The mock checks expiry with sub-second precision; `exp` itself stays an integer as ZapSign's.
            "mock_exp": exp,
        });
        if with_exp {
            payload["exp"] = json!(exp.floor() as u64);
        }
        let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
        let token = format!("{header}.{payload}.bW9jaw");
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(token.clone());
        token
    }

    /// Whether `token` is a live token of `kind` issued by this mock.
    fn valid(&self, token: &str, kind: &str) -> bool {
        let Some(payload) = token.split('.').nth(1) else {
            return false;
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload) else {
            return false;
        };
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return false;
        };
        claims["token_type"] == kind
            && claims["epoch"].as_u64() == Some(self.epoch.load(Ordering::SeqCst))
            && (kind != "access" || claims["access_epoch"].as_u64() == Some(self.access_epoch.load(Ordering::SeqCst)))
            && claims["mock_exp"].as_f64().is_some_and(|exp| exp > unix_now())
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A running mock.
#[derive(Debug)]
pub struct MockZapSign {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters and records.
    pub state: Arc<MockState>,
    task: JoinHandle<()>,
    https: bool,
}

impl MockZapSign {
    /// Starts a mock on 127.0.0.1 with a free port.
    pub async fn start(config: MockConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        Ok(Self::start_on(listener, config))
    }

    /// Starts a mock on an already-bound listener.
    pub fn start_on(listener: TcpListener, config: MockConfig) -> Self {
        Self::start_inner(listener, config, None)
    }

    /// Starts a mock on 127.0.0.1 with a free port, serving HTTPS with `tls` (ALPN `h2` and `http/1.1`).
    pub async fn start_tls(config: MockConfig, mut tls: rustls::ServerConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self::start_inner(
            listener,
            config,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls))),
        ))
    }

    fn start_inner(listener: TcpListener, config: MockConfig, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let state = Arc::new(MockState::new(config));
        let https = tls.is_some();
        let task = tokio::spawn(serve(listener, state.clone(), tls));
        Self {
            addr,
            state,
            task,
            https,
        }
    }

    /// `http://addr` (or `https://`), for `upstream.url`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }
}

impl Drop for MockZapSign {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves until the task is dropped; with `tls`, over TLS offering HTTP/2 and HTTP/1.1 by ALPN.
pub async fn serve(listener: TcpListener, state: Arc<MockState>, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve_connection(stream, state, peer).await;
                    }
                }
                None => serve_connection(stream, state, peer).await,
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, state: Arc<MockState>, peer: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(req, &state, peer).await) }
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

type MockBody = Either<Full<Bytes>, PatternBody>;

async fn handle(req: Request<Incoming>, state: &MockState, peer: SocketAddr) -> Response<MockBody> {
    let mut resp = route(req, state, peer).await;
    if state.close_next.swap(false, Ordering::SeqCst) {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn route(req: Request<Incoming>, state: &MockState, peer: SocketAddr) -> Response<MockBody> {
    let path = req.uri().path().to_owned();
    state.record(Recorded {
        method: req.method().to_string(),
        target: req
            .uri()
            .path_and_query()
            .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned()),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        version: format!("{:?}", req.version()),
        peer,
    });
    if req.method() == Method::POST && path == "/api/v1/auth/token-refresh/" {
        return refresh(req, state).await;
    }
    if let Some(org) = path
        .strip_prefix("/api/v1/auth/token/")
        .and_then(|r| r.strip_suffix('/'))
    {
        if req.method() == Method::POST {
            let org = org.to_owned();
            return login(req, &org, state).await;
        }
    }
    state.api_calls.fetch_add(1, Ordering::Relaxed);
    if !authorized(&req, state) {
        state.unauthorized.fetch_add(1, Ordering::Relaxed);
        // Drain the body so the caller's upload completes as ZapSign's would.
        let _ = hash_body(req.into_body()).await;
        return json_response(StatusCode::UNAUTHORIZED, json!({ "detail": "Invalid token." }));
    }
    if let Some(hook) = path.strip_prefix("/api/v1/__mock/") {
        return test_hook(hook, req).await;
    }
    echo(req).await
}

fn authorized(req: &Request<Incoming>, state: &MockState) -> bool {
    let Some(token) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    state.config().api_token.as_deref() == Some(token) || state.valid(token, "access")
}

async fn echo(req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let (len, sha) = match hash_body(body).await {
        Ok(h) => h,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, json!({ "detail": format!("body: {e}") })),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "method": parts.method.as_str(),
            "target": parts.uri.path_and_query().map(|p| p.as_str()),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": len,
            "body_sha256": sha,
        }),
    )
}

/// Reads a body to its end, hashing as it goes.
async fn hash_body(mut body: Incoming) -> Result<(u64, String), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((len, hex(&hasher.finalize())))
}

pub use crate::secret::hex;

async fn test_hook(hook: &str, req: Request<Incoming>) -> Response<MockBody> {
    let mut parts = hook.trim_end_matches('/').splitn(2, '/');
    let (name, arg) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match name {
        "download" => match arg.parse::<u64>() {
            Ok(n) => {
                let mut resp = Response::new(Either::Right(PatternBody::new(n)));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                resp
            }
            Err(_) => json_response(StatusCode::BAD_REQUEST, json!({ "detail": "download/{bytes}/" })),
        },
        "slow" => {
            let ms = arg.parse::<u64>().unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            echo(req).await
        }
        "redirect" => {
            let to = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("to=")))
                .unwrap_or("/")
                .to_owned();
            let mut resp = json_response(StatusCode::FOUND, json!({ "location": to }));
            if let Ok(v) = HeaderValue::from_str(&to) {
                resp.headers_mut().insert(LOCATION, v);
            }
            resp
        }
        "hop-headers" => {
            let mut resp = json_response(StatusCode::OK, json!({ "hop": true }));
            let h = resp.headers_mut();
            for (name, value) in [
                ("connection", "x-resp-hop"),
                ("x-resp-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authenticate", "Basic"),
                ("x-resp-kept", "1"),
            ] {
                h.insert(http::HeaderName::from_static(name), HeaderValue::from_static(value));
            }
            resp
        }
        "status" => {
            let status = arg
                .parse::<u16>()
                .ok()
                .and_then(|s| StatusCode::from_u16(s).ok())
                .unwrap_or(StatusCode::OK);
            let _ = hash_body(req.into_body()).await;
            json_response(status, json!({ "status": status.as_u16() }))
        }
        _ => json_response(StatusCode::NOT_FOUND, json!({ "detail": "Not found." })),
    }
}

async fn read_json(req: Request<Incoming>) -> Option<serde_json::Value> {
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

async fn login(req: Request<Incoming>, org: &str, state: &MockState) -> Response<MockBody> {
    state.login_attempts.fetch_add(1, Ordering::SeqCst);
    state
        .login_times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(std::time::Instant::now());
    let delay = state.login_delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = read_json(req).await.unwrap_or_default();
    *state.last_login_password.lock().unwrap_or_else(|p| p.into_inner()) = body["password"].as_str().map(str::to_owned);
    let limited = state
        .rate_limited_logins
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if limited {
        return json_response(StatusCode::BAD_REQUEST, json!({ "message": "Rate limit exceeded" }));
    }
    let cfg = state.config();
    if org != cfg.organization_id
        || body["username"] != cfg.username.as_str()
        || body["password"] != cfg.password.as_str()
    {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "detail": "No active account found with the given credentials" }),
        );
    }
    state.logins.fetch_add(1, Ordering::SeqCst);
    json_response(
        StatusCode::OK,
        json!({
            "refresh": state.issue("refresh", cfg.refresh_ttl, cfg.tokens_carry_exp),
            "access": state.issue("access", cfg.access_ttl, cfg.tokens_carry_exp),
        }),
    )
}

async fn refresh(req: Request<Incoming>, state: &MockState) -> Response<MockBody> {
    state.refresh_attempts.fetch_add(1, Ordering::SeqCst);
    let body = read_json(req).await.unwrap_or_default();
    let cfg = state.config();
    match body["refresh"].as_str() {
        Some(t) if state.valid(t, "refresh") => {
            state.refreshes.fetch_add(1, Ordering::SeqCst);
            json_response(
                StatusCode::OK,
                json!({ "access": state.issue("access", cfg.access_ttl, cfg.tokens_carry_exp) }),
            )
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            json!({ "detail": "Token is invalid or expired", "code": "token_not_valid" }),
        ),
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<MockBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The byte at `offset` of the download pattern; tests recompute it to check integrity.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

/// A body of `len` pattern bytes made on the fly in 64 KiB chunks.
#[derive(Debug)]
pub struct PatternBody {
    offset: u64,
    len: u64,
}

impl PatternBody {
    fn new(len: u64) -> Self {
        Self { offset: 0, len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(64 * 1024);
        let chunk: Vec<u8> = (self.offset..self.offset + n).map(pattern_byte).collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len - self.offset)
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.len
    }
}
