//! zapsign-proxy: a reverse proxy in front of the ZapSign API. It holds the organization's credentials, keeps
//! a valid access token, and forwards every caller's request with `Authorization: Bearer <token>`, so callers
//! never hold credentials.
//!
//! # Layout
//! - [`config`]: the TOML file and environment overrides, validated into [`config::Config`].
//! - [`server`]: the caller listener: accept loop, connection limit, HTTP/1.1 and h2c, graceful shutdown.
//! - [`proxy`]: the per-request service: access checks, request rewriting, forwarding, error answers.
//! - [`access`]: the path (dot segments, `allow_paths`) and client-key rules of the access checks.
//! - [`headers`]: the header and query rules, as pure functions; [`rewrite`] applies them to a request head
//!   in their one order (the proxy, the fuzz target and the bench call it).
//! - [`affinity`]: each caller HTTP/1.1 connection drives its own upstream connection in the same task.
//! - [`upstream`]: the pooled hyper client over rustls towards ZapSign; [`tls`] builds its trust roots.
//! - [`auth`]: the lock-free token holder and (JWT mode) the login/refresh machinery.
//! - [`reload`]: re-reads the configuration on SIGHUP or when a secret file changes, and applies it live.
//! - [`replay`]: the bounded buffer that lets a request be sent again after an upstream 401.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener; [`metrics`] holds the counters.
//! - [`error`]: the proxy's own error answers; [`secret`]: the redacting secret type.
//! - [`mock`]: a small ZapSign stand-in for the demo, the tests and local trials.
//! - [`tasks`]: every task `run` starts, closed and joined before `run` returns; [`shutdown`]: the stop
//!   signal they and the loops watch.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests and benches drive the real server
//! in-process.

pub mod access;
pub mod admin;
pub mod affinity;
pub mod auth;
pub mod config;
pub mod error;
pub mod headers;
pub mod logging;
mod memory;
pub mod metrics;
pub mod mock;
pub mod pacing;
pub mod proxy;
pub mod reload;
pub mod replay;
pub mod rewrite;
pub mod secret;
pub mod server;
pub mod shared;
pub mod shutdown;
pub mod tasks;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::info;

use crate::auth::client::{AuthClient, Credentials};
use crate::auth::renewer::Renewer;
use crate::auth::TokenHolder;
use crate::config::{AuthMode, Config, ConfigError};
use crate::metrics::Metrics;
use crate::replay::ReplayBudget;

/// Why the proxy could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound. The OS error is part of the message and deliberately not the error's
    /// `source`: `main` prints the whole chain, and the reason would be printed twice.
    #[error("cannot listen on {addr} (`{key}`): {reason}; pick a free port or stop what holds it")]
    Bind {
        /// The config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: std::io::Error,
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
                .map_err(|reason| RunError::Bind { key, addr, reason })
        };
        let proxy = bind("server.listen", config.server.listen).await?;
        let admin = match config.admin.listen {
            Some(addr) => Some(bind("admin.listen", addr).await?),
            None => None,
        };
        Ok(Self { proxy, admin })
    }
}

/// Runs the proxy on `listeners` until `shutdown` completes, then drains within `server.shutdown_grace`; what
/// is still open after the grace (connections, upstream connections, background loops) is closed, and `run`
/// returns only once every task it started has ended.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    run_with_reloads(config, listeners, shutdown, None).await
}

/// [`run`], also applying every configuration received on `reloads` (see [`reload`]).
pub async fn run_with_reloads(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: Option<reload::Reloads>,
) -> Result<(), RunError> {
    // reqwest and hyper-rustls get explicit configs; a default provider covers any other rustls user.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = tls::client_config(config.upstream.ca_file.as_deref())?;
    let server_tls = reload::tls_cell(&config)?;
    let metrics = Arc::new(Metrics::new());
    let stop = crate::shutdown::Shutdown::new();
    let (holder, renewer) = token_keeper(&config, &tls, &metrics)?;
    let tasks = tasks::Tasks::new();
    if let Some(renewer) = &renewer {
        tasks.spawn(renewer.clone().run(stop.signal()));
    }
    let connector = upstream::build_connector(&config.upstream, tls);
    let proxy = Arc::new(proxy::Proxy {
        upstream: config.upstream.url.clone(),
        response_timeout: config.upstream.response_timeout,
        client: upstream::build_client(connector.clone(), tasks.clone()),
        tasks: tasks.clone(),
        connector,
        holder: holder.clone(),
        renewer,
        replay_limit: config.auth.replay_buffer,
        replay_budget: Arc::new(ReplayBudget::new(replay_budget(config.auth.replay_buffer))),
        access: ArcSwap::from_pointee(config.access.clone()),
        metrics: metrics.clone(),
    });
    if let Some(admin) = listeners.admin {
        info!(addr = %admin.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "admin listening");
        tasks.spawn(admin::serve(
            admin,
            holder.clone(),
            metrics,
            stop.signal(),
            tasks.clone(),
        ));
    }
    info!(
        addr = %listeners.proxy.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()),
        upstream = %config.upstream.url.text,
        mode = ?config.auth.mode,
        "proxy listening"
    );
    if let Some(reloads) = reloads {
        let live = reload::Live {
            proxy: proxy.clone(),
            holder: holder.clone(),
            renewer: proxy.renewer.clone(),
            tls: server_tls.clone(),
        };
        tasks.spawn(reload::apply_all(config.clone(), reloads, live));
    }
    let serving = server::serve(
        listeners.proxy,
        proxy,
        &config.server,
        server_tls,
        stop.signal(),
        &tasks,
    );
    let stopping = async {
        shutdown.await;
        info!("shutdown requested");
        stop.start();
    };
    tokio::join!(serving, stopping);
    // The drain is over (every connection closed, or `server.shutdown_grace` passed): end what is left.
    tasks.close().await;
    info!("stopped");
    Ok(())
}

/// Bytes all requests together may keep for replays: four full replay buffers, at least 64 MiB.
fn replay_budget(per_request: u64) -> u64 {
    per_request.saturating_mul(4).max(64 << 20)
}

/// The token holder, and in JWT mode the renewer that fills it.
fn token_keeper(
    config: &Config,
    tls: &rustls::ClientConfig,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<TokenHolder>, Option<Arc<Renewer>>), ConfigError> {
    let missing = |key: &str, fix: &str| ConfigError::Invalid {
        key: key.into(),
        problem: format!(
            "missing for auth.mode = \"{}\"",
            if config.auth.mode == AuthMode::Jwt {
                "jwt"
            } else {
                "static"
            }
        ),
        fix: fix.into(),
    };
    match config.auth.mode {
        AuthMode::Static => {
            let token = config.auth.api_token.as_ref().ok_or_else(|| {
                missing(
                    "auth.api_token",
                    "set auth.api_token_file, auth.api_token or ZAPSIGN_API_TOKEN",
                )
            })?;
            let holder = TokenHolder::with_static(token).ok_or_else(crate::error::unusable_api_token)?;
            Ok((Arc::new(holder), None))
        }
        AuthMode::Jwt => {
            let credentials = Credentials {
                organization_id: config.auth.organization_id.clone().ok_or_else(|| {
                    missing(
                        "auth.organization_id",
                        "set auth.organization_id or ZAPSIGN_ORGANIZATION_ID",
                    )
                })?,
                username: config
                    .auth
                    .username
                    .clone()
                    .ok_or_else(|| missing("auth.username", "set auth.username or ZAPSIGN_USERNAME"))?,
                password: config.auth.password.clone().ok_or_else(|| {
                    missing(
                        "auth.password",
                        "set auth.password_file, auth.password or ZAPSIGN_PASSWORD",
                    )
                })?,
            };
            let client =
                AuthClient::new(&config.auth, &config.upstream, tls.clone()).map_err(|e| ConfigError::Invalid {
                    key: "auth.url".into(),
                    problem: e.to_string(),
                    fix: "check auth.url and upstream.ca_file".into(),
                })?;
            let holder = Arc::new(TokenHolder::new());
            let renewer = Renewer::new(
                holder.clone(),
                client,
                credentials,
                config.auth.refresh_margin,
                config.auth.timeout,
                metrics.clone(),
            );
            Ok((holder, Some(Arc::new(renewer))))
        }
    }
}
