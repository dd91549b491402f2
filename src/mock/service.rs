//! The running mock: its listener ([`MockZapSign`], [`serve`]) and the router that records every request,
//! sends auth calls to [`super::jwt`], checks the Bearer token of every other call, and answers it with a test
//! hook or the echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::hooks::test_hook;
use super::jwt::{login, refresh};
use super::reply::{echo, hash_body, json_response, MockBody};
use super::state::{MockConfig, MockState, Recorded};

/// A running mock; dropping it stops it.
#[derive(Debug)]
pub struct MockZapSign {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters and records.
    pub state: Arc<MockState>,
    /// The accept loop, aborted on drop.
    task: JoinHandle<()>,
    /// Whether it serves HTTPS, for [`MockZapSign::url`].
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
    let token = bearer(&req).map(str::to_owned);
    if let Some(retry_after) = state.admit_api_call(token) {
        let _ = hash_body(req.into_body()).await;
        let mut resp = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            json!({ "detail": "Request was throttled." }),
        );
        if state.config().api_rate_retry_after {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        return resp;
    }
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

/// The call's `Bearer` token.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Whether the call carries `Bearer` with the static API token or a live access token of this mock.
fn authorized(req: &Request<Incoming>, state: &MockState) -> bool {
    let Some(token) = bearer(req) else {
        return false;
    };
    state.config().api_token.as_deref() == Some(token) || state.valid(token, "access")
}
