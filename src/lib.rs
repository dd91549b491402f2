//! zapsign-proxy: a reverse proxy in front of the ZapSign API. It holds the organization's credentials, keeps
//! a valid access token, and forwards every caller's request with `Authorization: Bearer <token>`, so callers
//! never hold credentials.
//!
//! # Layout
//! - [`config`]: the TOML file and environment overrides, validated once into [`config::Config`], whose types
//!   hold exactly what the chosen mode needs.
//! - [`server`]: the caller listener: accept loop, connection limit, HTTP/1.1 and h2c, graceful shutdown.
//! - [`proxy`]: the per-request service: access checks, request rewriting, forwarding, error answers.
//! - [`access`]: the access policy (caller networks, client keys, paths) and its checks, swapped whole on reload.
//! - [`headers`]: the header and query rules, as pure functions; [`rewrite`] applies them to a request head
//!   in their one order (the proxy, the fuzz target and the bench call it).
//! - [`affinity`]: each caller HTTP/1.1 connection drives its own upstream connection in the same task;
//!   [`paired`] polls the two with a waker each, under one deadline per connection.
//! - [`busy`]: whether a caller connection has a request in progress (its answer still sent, or its body still
//!   read), for that deadline.
//! - [`upstream`]: the pooled hyper client over rustls towards ZapSign; [`tls`] builds its trust roots.
//! - [`auth`]: the lock-free token holder and (JWT mode) the login/refresh machinery.
//! - [`reload`]: re-reads the configuration on SIGHUP or when a secret file changes, and applies it live
//!   (the proxy's part through `Proxy::reload`).
//! - [`replay`]: the bounded buffer that lets a request be sent again after an upstream 401.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener; [`metrics`] holds the counters.
//! - [`pacing`]: the account's budget (GCRA) and the fair queue of requests waiting for a slot.
//! - [`sharing`]: the traits through which `pacing` and `auth` use the state every replica shares;
//!   [`shared`] implements them over Redis (sealed tokens, the shared budget) and falls back to working alone.
//! - [`error`]: the proxy's own error answers; [`secret`]: the redacting secret type.
//! - `mock` (cargo feature `mock`, on by default): a small ZapSign stand-in for the demo, the tests and local
//!   trials; `--no-default-features` builds the proxy without it.
//! - [`tasks`]: every task `run` starts, closed and joined before `run` returns; [`shutdown`]: the stop
//!   signal they and the loops watch.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests and benches drive the real server
//! in-process.

pub mod access;
pub mod admin;
pub mod affinity;
pub mod auth;
pub mod busy;
pub mod config;
pub mod error;
pub mod headers;
pub mod logging;
mod memory;
pub mod metrics;
#[cfg(feature = "mock")]
pub mod mock;
pub mod pacing;
pub mod paired;
pub mod proxy;
pub mod reload;
pub mod replay;
pub mod rewrite;
pub mod secret;
pub mod server;
pub mod shared;
pub mod sharing;
pub mod shutdown;
pub mod tasks;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::auth::client::{AuthClient, Credentials};
use crate::auth::renewer::Renewer;
use crate::auth::TokenHolder;
use crate::config::{Auth, Config, ConfigError};
use crate::metrics::Metrics;

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
    let shared = proxy::setup::shared_state(&config, &metrics)?;
    let (holder, renewer) = token_keeper(&config, &tls, &metrics, shared.as_ref())?;
    let tasks = tasks::Tasks::new();
    if let Some(shared) = &shared {
        tasks.spawn(shared.clone().watch(stop.signal()));
    }
    if let Some(renewer) = &renewer {
        tasks.spawn(renewer.clone().run(stop.signal()));
    }
    let proxy = Arc::new(proxy::Proxy::new(
        &config,
        tls,
        holder.clone(),
        renewer,
        shared,
        metrics.clone(),
        tasks.clone(),
    ));
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
        mode = config.auth.mode.name(),
        "proxy listening"
    );
    if let Some(reloads) = reloads {
        let targets = reload::ReloadTargets {
            proxy: proxy.clone(),
            tls: server_tls.clone(),
        };
        tasks.spawn(reload::apply_all(config.clone(), reloads, targets));
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

/// The token holder, and in JWT mode the renewer that fills it (sharing its token through `shared` when set).
fn token_keeper(
    config: &Config,
    tls: &rustls::ClientConfig,
    metrics: &Arc<Metrics>,
    shared: Option<&Arc<shared::state::SharedState>>,
) -> Result<(Arc<TokenHolder>, Option<Arc<Renewer>>), ConfigError> {
    match &config.auth.mode {
        Auth::Static(auth) => {
            let holder = TokenHolder::with_static(&auth.api_token).ok_or_else(crate::error::unusable_api_token)?;
            Ok((Arc::new(holder), None))
        }
        Auth::Jwt(auth) => {
            let client = AuthClient::new(auth, &config.upstream, tls.clone()).map_err(|e| ConfigError::Invalid {
                key: "auth.url".into(),
                problem: e.to_string(),
                fix: "check auth.url and upstream.ca_file".into(),
            })?;
            let holder = Arc::new(TokenHolder::new());
            let renewer = Renewer::new(
                holder.clone(),
                client,
                Credentials::from(auth),
                auth.refresh_margin,
                config.auth.timeout,
                metrics.clone(),
            );
            let renewer = match shared {
                Some(state) => renewer.with_shared(state.clone()),
                None => renewer,
            };
            Ok((holder, Some(Arc::new(renewer))))
        }
    }
}
