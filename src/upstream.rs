//! The client towards ZapSign: a hyper-util pooled client over rustls (HTTP/2 by ALPN when the upstream offers
//! it, HTTP/1.1 otherwise), with `upstream.connect_timeout` on the TCP connect and TCP_NODELAY. The connector
//! remembers which HTTP version the upstream chose, for the header rules that depend on it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Uri, Version};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower_service::Service;

use crate::config::UpstreamConfig;
use crate::error::{ProxyError, UpstreamFailure};

/// The pooled client, generic over the request body type.
pub type UpstreamClient<B> = Client<Connector, B>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream connection: TCP, with TLS for `https`.
pub type UpstreamIo = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// Opens upstream connections: TCP with `upstream.connect_timeout` and TCP_NODELAY, then TLS for `https`; and
/// notes whether the upstream negotiated HTTP/2 by ALPN.
#[derive(Clone)]
pub struct Connector {
    inner: HttpsConnector<HttpConnector>,
    /// The latest connection negotiated HTTP/2. Written once per connection, read per request.
    h2: Arc<AtomicBool>,
}

impl Connector {
    /// Whether the upstream answers in HTTP/2: its latest connection negotiated `h2` by ALPN. The pooled client
    /// picks a connection only inside `request`, after the headers are written; an upstream keeps its ALPN
    /// choice, so its latest connection is what the next one will be. `false` before the first connection.
    pub fn negotiated_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// The HTTP version a request on the pool will most likely go out in (see [`Connector::negotiated_h2`]).
    pub fn pool_version(&self) -> Version {
        if self.negotiated_h2() {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        }
    }
}

impl Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    // Boxed like hyper-rustls's own future: one allocation per new connection, none per request.
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let h2 = self.h2.clone();
        Box::pin(async move {
            let io = connecting.await?;
            h2.store(io.connected().is_negotiated_h2(), Ordering::Relaxed);
            Ok(io)
        })
    }
}

/// Builds the pooled client on `connector`; its connections and pool timer are spawned on `executor`
/// ([`crate::tasks::Tasks`] in `run`, so they end before `run` returns). Its idle connections follow the same
/// two keys as the affine pool (`affinity::AffinePool`): at most `upstream.max_idle_connections`, each
/// closed after `upstream.idle_timeout`.
pub fn build_client<B, E>(connector: Connector, cfg: &UpstreamConfig, executor: E) -> UpstreamClient<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    E: hyper::rt::Executor<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>
        + Clone
        + Send
        + Sync
        + 'static,
{
    Client::builder(executor)
        // The default, said out loud because the proxy relies on it: on an HTTP/1.1 connection the client
        // writes `Host` from the URI's authority (the upstream's) when the request has none; on HTTP/2 it adds
        // none and the authority goes as `:authority` only. See `headers::fit_to_upstream_version`.
        .set_host(true)
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_idle_connections)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .build(connector)
}

/// Builds the connector for `cfg` with the given TLS settings (ALPN offers h2 and http/1.1).
pub fn build_connector(cfg: &UpstreamConfig, tls: rustls::ClientConfig) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Small request/response exchanges: Nagle's delay would add up to 40 ms per exchange.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let inner = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Connector {
        inner,
        h2: Arc::new(AtomicBool::new(false)),
    }
}

/// Maps a client error to the proxy's 502, with the cause chain as detail (it holds no secret: no request
/// header or body is ever part of a hyper error).
pub fn classify(err: hyper_util::client::legacy::Error) -> ProxyError {
    let kind = if err.is_connect() {
        UpstreamFailure::Connect
    } else {
        UpstreamFailure::Protocol
    };
    let detail = crate::error::error_chain(&err);
    ProxyError::UpstreamUnreachable { kind, detail }
}
