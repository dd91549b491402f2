//! Building the [`Proxy`] from the validated configuration, and applying a reloaded one: the only code that
//! writes the proxy's shared state. The per-request path (`proxy.rs`) only reads it.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::info;

use super::Proxy;
use crate::access::AccessPolicy;
use crate::affinity::AffinePool;
use crate::auth::client::Credentials;
use crate::auth::renewer::Renewer;
use crate::auth::TokenHolder;
use crate::config::{Auth, Config, ConfigError};
use crate::headers::bearer_value;
use crate::metrics::Metrics;
use crate::pacing::Pacer;
use crate::replay::ReplayBudget;
use crate::tasks::Tasks;
use crate::upstream::{build_client, build_connector};

/// Bytes all requests together may keep for replays: four full replay buffers, at least 64 MiB.
fn replay_budget(per_request: u64) -> u64 {
    per_request.saturating_mul(4).max(64 << 20)
}

impl Proxy {
    /// The proxy `config` describes, over the runtime pieces `run` owns: the token `holder` (and in JWT mode
    /// the `renewer` that fills it), the trust for upstream TLS, the counters, and the task set background work
    /// joins. Starts the pacer (when `pacing.limit` > 0), so it must run inside the runtime.
    pub(crate) fn new(
        config: &Config,
        tls: rustls::ClientConfig,
        holder: Arc<TokenHolder>,
        renewer: Option<Arc<Renewer>>,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Self {
        let connector = build_connector(&config.upstream, tls);
        let pacer = config.pacing.map(Pacer::start);
        if let Some(pacer) = &pacer {
            metrics.watch_pacer(pacer);
        }
        Self {
            upstream: config.upstream.url.clone(),
            response_timeout: config.upstream.response_timeout,
            client: build_client(connector.clone(), &config.upstream, tasks.clone()),
            affine: Arc::new(AffinePool::new(connector.clone(), &config.upstream, tasks.clone())),
            connector,
            holder,
            renewer,
            pacer,
            body_return_timeout: config.auth.timeout,
            replay_limit: config.auth.replay_buffer,
            replay_budget: Arc::new(ReplayBudget::new(replay_budget(config.auth.replay_buffer))),
            access: ArcSwap::from_pointee(AccessPolicy::new(&config.access)),
            metrics,
            tasks,
        }
    }

    /// Applies what can change live from `running` to `next`: the access policy (swapped whole), the static
    /// API token, and the login credentials (a fresh login follows). A change of `auth.mode` needs a restart
    /// and changes nothing here. A new static token that cannot be a header value rejects the reload before
    /// anything changes.
    pub(crate) async fn reload(&self, running: &Config, next: &Config) -> Result<(), ConfigError> {
        let static_header = match (&running.auth.mode, &next.auth.mode) {
            (Auth::Static(old), Auth::Static(new)) if old.api_token != new.api_token => {
                Some(bearer_value(new.api_token.expose()).ok_or_else(crate::error::unusable_api_token)?)
            }
            _ => None,
        };
        self.access.store(Arc::new(AccessPolicy::new(&next.access)));
        if let Some(header) = static_header {
            self.holder.store(header, None);
            info!("new static API token in use");
        }
        if let (Some(renewer), Auth::Jwt(old), Auth::Jwt(new)) = (&self.renewer, &running.auth.mode, &next.auth.mode) {
            if old.login_differs(new) {
                info!("new login credentials; logging in with them");
                renewer.set_credentials(Credentials::from(new)).await;
            }
        }
        Ok(())
    }
}
