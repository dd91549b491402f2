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
use crate::config::{Auth, Config, ConfigError, SharedConfig};
use crate::headers::bearer_value;
use crate::metrics::Metrics;
use crate::pacing::gcra::Gcra;
use crate::pacing::{Pacer, SharedPacing};
use crate::replay::ReplayBudget;
use crate::shared::state::{BudgetShape, SharedState};
use crate::shared::store::{RedisStore, StoreSettings};
use crate::tasks::Tasks;
use crate::upstream::{build_client, build_connector};

/// The longest one Redis call may take before the process works alone: far above a Redis round trip in one
/// cluster (well under a millisecond), and short enough that no request waits long on a dead Redis.
const SHARED_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The link to the state shared with the other replicas (`shared.*`), or `None` without `shared.redis_url`.
/// Connects lazily: a Redis that is away at start only means this process starts alone. The caller spawns its
/// watcher ([`SharedState::watch`]).
pub(crate) fn shared_state(config: &Config, metrics: &Arc<Metrics>) -> Result<Option<Arc<SharedState>>, ConfigError> {
    let Some(shared) = &config.shared else {
        return Ok(None);
    };
    // The shared budget is the account's whole limit, shaped as the local limiter shapes it.
    let budget = config.pacing.map(|p| {
        let gcra = Gcra::new(p.limit, p.period);
        BudgetShape {
            interval: gcra.slot(),
            tolerance: gcra.tolerance(),
            period: p.period,
        }
    });
    Ok(Some(SharedState::new(redis_store(shared)?, budget, metrics.clone())))
}

/// The Redis client `shared` describes.
fn redis_store(shared: &SharedConfig) -> Result<RedisStore, ConfigError> {
    RedisStore::new(StoreSettings {
        url: shared.redis_url.as_str().to_owned(),
        password: shared.password.clone(),
        ca_pem: shared.ca_pem.as_deref().cloned(),
        key: shared.key.clone(),
        prefix: shared.key_prefix.clone(),
        scope: shared.scope.clone(),
        op_timeout: SHARED_OP_TIMEOUT,
    })
    .map_err(|e| ConfigError::Invalid {
        key: "shared.redis_url".into(),
        problem: e.to_string(),
        fix: "give redis://HOST:PORT/DB or rediss://HOST:PORT/DB (with shared.ca_file for a private CA)".into(),
    })
}

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
        shared: Option<Arc<SharedState>>,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Self {
        let connector = build_connector(&config.upstream, tls);
        let pacer = config.pacing.map(|settings| {
            let shared_pacing = shared
                .as_ref()
                .zip(config.shared.as_ref())
                .map(|(state, cfg)| SharedPacing {
                    budget: state.clone(),
                    replicas: cfg.replicas,
                });
            Pacer::start(settings, shared_pacing)
        });
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
            shared,
            body_return_timeout: config.auth.timeout,
            replay_limit: config.auth.replay_buffer,
            replay_budget: Arc::new(ReplayBudget::new(replay_budget(config.auth.replay_buffer))),
            access: ArcSwap::from_pointee(AccessPolicy::new(&config.access)),
            metrics,
            tasks,
        }
    }

    /// Applies what can change live from `running` to `next`: the access policy (swapped whole), the static
    /// API token, the login credentials (a fresh login follows), and the Redis client (a new password, key,
    /// address or CA: a new client swapped in). A change of `auth.mode` needs a restart
    /// and changes nothing here. A new static token that cannot be a header value rejects the reload before
    /// anything changes.
    pub(crate) async fn reload(&self, running: &Config, next: &Config) -> Result<(), ConfigError> {
        let static_header = match (&running.auth.mode, &next.auth.mode) {
            (Auth::Static(old), Auth::Static(new)) if old.api_token != new.api_token => {
                Some(bearer_value(new.api_token.expose()).ok_or_else(crate::error::unusable_api_token)?)
            }
            _ => None,
        };
        let new_store = match (&self.shared, &running.shared, &next.shared) {
            (Some(_), Some(old), Some(new)) if old.differs_for_the_store(new) => Some(redis_store(new)?),
            _ => None,
        };
        self.access.store(Arc::new(AccessPolicy::new(&next.access)));
        if let (Some(state), Some(store)) = (&self.shared, new_store) {
            state.replace_store(store);
            info!("new shared-state settings (Redis password, key or address) in use");
        }
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
