//! Configuration reload (SIGHUP): the new configuration, already validated and with its secret files re-read,
//! is applied to the running proxy without a restart. What can change live: the access rules and client keys,
//! the login credentials (a fresh login follows), the static API token, and the TLS certificate. A new TLS
//! identity that does not load rejects the whole reload; keys that need a restart are named in a warning.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::auth::client::Credentials;
use crate::auth::renewer::Renewer;
use crate::auth::TokenHolder;
use crate::config::{AuthMode, Config, ConfigError};
use crate::headers::bearer_value;
use crate::proxy::Proxy;
use crate::server::TlsCell;

/// New configurations for a running proxy; send one after re-reading the file.
pub type Reloads = mpsc::Receiver<Config>;

/// What a reload can reach.
pub(crate) struct Live {
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) holder: Arc<TokenHolder>,
    pub(crate) renewer: Option<Arc<Renewer>>,
    pub(crate) tls: TlsCell,
}

/// Applies each configuration received until the channel closes.
pub(crate) async fn apply_all(mut running: Config, mut reloads: Reloads, live: Live) {
    while let Some(next) = reloads.recv().await {
        match apply(&running, &next, &live).await {
            Ok(()) => {
                info!("configuration reloaded");
                running = next;
            }
            Err(e) => error!("reload rejected, the running configuration stays: {e}"),
        }
    }
}

async fn apply(running: &Config, next: &Config, live: &Live) -> Result<(), ConfigError> {
    // Everything that can fail is prepared before anything changes.
    let tls = match (&live.tls, &next.server.tls_cert_file, &next.server.tls_key_file) {
        (Some(_), Some(cert), Some(key)) => Some(TlsAcceptor::from(Arc::new(crate::tls::server_config(cert, key)?))),
        _ => None,
    };
    let static_header = match (next.auth.mode, &next.auth.api_token) {
        (AuthMode::Static, Some(token)) if running.auth.api_token.as_ref() != Some(token) => {
            Some(bearer_value(token.expose()).ok_or_else(crate::error::unusable_api_token)?)
        }
        _ => None,
    };
    for key in needs_restart(running, next) {
        warn!(key, "changed in the file but takes effect only after a restart");
    }
    if let (Some(cell), Some(acceptor)) = (&live.tls, tls) {
        cell.store(Arc::new(acceptor));
    }
    live.proxy.access.store(Arc::new(next.access.clone()));
    if let Some(header) = static_header {
        live.holder.store(header, None);
        info!("new static API token in use");
    }
    if let (Some(renewer), AuthMode::Jwt) = (&live.renewer, next.auth.mode) {
        let changed = running.auth.organization_id != next.auth.organization_id
            || running.auth.username != next.auth.username
            || running.auth.password != next.auth.password;
        if changed {
            if let (Some(organization_id), Some(username), Some(password)) =
                (&next.auth.organization_id, &next.auth.username, &next.auth.password)
            {
                info!("new login credentials; logging in with them");
                renewer
                    .set_credentials(Credentials {
                        organization_id: organization_id.clone(),
                        username: username.clone(),
                        password: password.clone(),
                    })
                    .await;
            }
        }
    }
    Ok(())
}

/// Keys whose change a reload cannot apply.
fn needs_restart(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    check("server.listen", a.server.listen != b.server.listen);
    check("server.workers", a.server.workers != b.server.workers);
    check(
        "server.tls_cert_file",
        a.server.tls_cert_file.is_some() != b.server.tls_cert_file.is_some(),
    );
    check(
        "server.header_read_timeout",
        a.server.header_read_timeout != b.server.header_read_timeout,
    );
    check(
        "server.max_connections",
        a.server.max_connections != b.server.max_connections,
    );
    check(
        "server.shutdown_grace",
        a.server.shutdown_grace != b.server.shutdown_grace,
    );
    check("admin.listen", a.admin.listen != b.admin.listen);
    check("upstream.url", a.upstream.url.text != b.upstream.url.text);
    check(
        "upstream.connect_timeout",
        a.upstream.connect_timeout != b.upstream.connect_timeout,
    );
    check(
        "upstream.response_timeout",
        a.upstream.response_timeout != b.upstream.response_timeout,
    );
    check("upstream.ca_file", a.upstream.ca_file != b.upstream.ca_file);
    check("auth.mode", a.auth.mode != b.auth.mode);
    check("auth.url", a.auth.url.text != b.auth.url.text);
    check("auth.refresh_margin", a.auth.refresh_margin != b.auth.refresh_margin);
    check("auth.replay_buffer", a.auth.replay_buffer != b.auth.replay_buffer);
    check("log.format", a.log.format != b.log.format);
    check("log.level", a.log.level != b.log.level);
    keys
}

/// A cell for the caller-facing TLS identity, when `server.tls_*` is set.
pub(crate) fn tls_cell(config: &Config) -> Result<TlsCell, ConfigError> {
    match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => {
            let acceptor = TlsAcceptor::from(Arc::new(crate::tls::server_config(cert, key)?));
            Ok(Some(Arc::new(ArcSwap::from_pointee(acceptor))))
        }
        _ => Ok(None),
    }
}
