//! The client towards ZapSign: a hyper-util pooled client over rustls (HTTP/2 by ALPN when the upstream offers
//! it, HTTP/1.1 otherwise), with `upstream.connect_timeout` on the TCP connect and TCP_NODELAY.

use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioTimer;

use crate::config::UpstreamConfig;
use crate::error::{ProxyError, UpstreamFailure};

/// The pooled client, generic over the request body type.
pub type UpstreamClient<B> = Client<Connector, B>;

/// Opens upstream connections: TCP with `upstream.connect_timeout` and TCP_NODELAY, then TLS for `https`.
pub type Connector = HttpsConnector<HttpConnector>;

/// Builds the pooled client on `connector`; its connections and pool timer are spawned on `executor`
/// ([`crate::tasks::Tasks`] in `run`, so they end before `run` returns).
pub fn build_client<B, E>(connector: Connector, executor: E) -> UpstreamClient<B>
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
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
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
    HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
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
