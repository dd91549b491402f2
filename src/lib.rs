//! zapsign-proxy: a reverse proxy in front of the ZapSign API. It holds the organization's credentials, keeps
//! a valid access token, and forwards every caller's request with `Authorization: Bearer <token>`, so callers
//! never hold credentials.
//!
//! # Layout
//! - [`config`]: the TOML file and environment overrides, validated into [`config::Config`].
//! - [`server`]: the caller listener: accept loop, connection limit, HTTP/1.1 and h2c, graceful shutdown.
//! - [`proxy`]: the per-request service: access checks, request rewriting, forwarding, error answers.
//! - [`headers`]: the header and query rules, as pure functions.
//! - [`upstream`]: the pooled hyper client over rustls towards ZapSign; [`tls`] builds its trust roots.
//! - [`auth`]: the lock-free token holder and (JWT mode) the login/refresh machinery.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener.
//! - [`error`]: the proxy's own error answers; [`secret`]: the redacting secret type.
//! - [`mock`]: a small ZapSign stand-in for the demo, the tests and local trials.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests and benches drive the real server
//! in-process.

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod headers;
pub mod logging;
pub mod mock;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::auth::TokenHolder;
use crate::config::{AuthMode, Config, ConfigError};

/// Why the proxy could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} (`{key}`): {source}; pick a free port or stop what holds it")]
    Bind {
        /// The config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is unusable at start (e.g. a CA file that holds no certificate).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The listeners the proxy serves on, bound before [`run`] so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// Callers.
    pub proxy: TcpListener,
    /// Health, readiness and metrics; `None` when `admin.listen` is empty.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `server.listen` and `admin.listen`.
    pub async fn bind(config: &Config) -> Result<Self, RunError> {
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { key, addr, source })
        };
        let proxy = bind("server.listen", config.server.listen).await?;
        let admin = match config.admin.listen {
            Some(addr) => Some(bind("admin.listen", addr).await?),
            None => None,
        };
        Ok(Self { proxy, admin })
    }
}

/// Runs the proxy on `listeners` until `shutdown` completes, then drains within `server.shutdown_grace`.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let tls = tls::client_config(config.upstream.ca_file.as_deref())?;
    let holder = Arc::new(token_holder(&config)?);
    let client = upstream::build_client(&config.upstream, tls);
    let proxy = Arc::new(proxy::Proxy::new(
        config.upstream.url.clone(),
        config.upstream.response_timeout,
        client,
        holder.clone(),
        config.access.clone(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(admin) = listeners.admin {
        info!(addr = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "admin listening");
        tokio::spawn(admin::serve(admin, holder.clone(), stop_rx.clone()));
    }
    info!(
        addr = %listeners.proxy.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        upstream = %config.upstream.url.text,
        mode = ?config.auth.mode,
        "proxy listening"
    );
    let serving = server::serve(listeners.proxy, proxy, &config.server, stop_rx);
    let stopping = async {
        shutdown.await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    };
    tokio::join!(serving, stopping);
    Ok(())
}

fn token_holder(config: &Config) -> Result<TokenHolder, ConfigError> {
    match config.auth.mode {
        AuthMode::Static => {
            let token = config.auth.api_token.as_ref().ok_or_else(|| ConfigError::Invalid {
                key: "auth.api_token".into(),
                problem: "missing for auth.mode = \"static\"".into(),
                fix: "set auth.api_token_file, auth.api_token or ZAPSIGN_API_TOKEN".into(),
            })?;
            TokenHolder::with_static(token).ok_or_else(|| ConfigError::Invalid {
                key: "auth.api_token".into(),
                problem: "the token holds characters an HTTP header cannot carry".into(),
                fix: "copy the token again from Settings > Integrations > ZapSign API".into(),
            })
        }
        AuthMode::Jwt => {
            let holder = TokenHolder::new();
            holder.set_unavailable(
                "JWT login is not available in this build; use auth.mode = \"static\"".into(),
                std::time::Instant::now() + std::time::Duration::from_secs(60),
            );
            Ok(holder)
        }
    }
}
