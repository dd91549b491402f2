//! The shared state as this process uses it: the Redis store behind the [`crate::sharing`] traits, with its
//! health. Every failed call marks the store down at once (the consumers then work alone); a watcher pings it
//! every second and, once it answers again, marks the shared pacing budget spent (a restarted Redis forgot it, so
//! going back never adds a burst) before reporting it up. `zapsign_proxy_shared_state_up` follows the same flag.
//!
//! The store itself sits behind an `ArcSwap`, so a new `shared.redis_password_file` swaps in a new client
//! without stopping anyone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::store::{RedisStore, StoreError};
use crate::metrics::Metrics;
use crate::sharing::{BoxFuture, Fence, SharedBudget, SharedDown, SharedToken, SharedTokens, TokenRecord};
use crate::shutdown::ShutdownSignal;

/// How often the watcher asks Redis whether it answers: the bound on noticing an idle outage and on going back
/// to the shared state after Redis returns (the contract allows 5 s).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a token key outlives nothing: the generation counter's TTL, renewed by every publish, so it lives as
/// long as the account is in use and every key in Redis has a TTL.
const GENERATION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The pacing budget's shape, as the local limiter has it (`pacing::gcra`), so Redis decides slots the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetShape {
    /// The steady spacing between two requests.
    pub interval: Duration,
    /// How far ahead of now the schedule may run (the burst beyond one request).
    pub tolerance: Duration,
    /// `pacing.period`: the spent budget on return covers one period; the state's TTL is two.
    pub period: Duration,
}

/// This process's link to the shared state.
#[derive(Debug)]
pub struct SharedState {
    store: ArcSwap<RedisStore>,
    budget: Option<BudgetShape>,
    up: AtomicBool,
    metrics: Arc<Metrics>,
    /// A stored token that does not open is logged once per process, not on every read.
    unopenable_logged: AtomicBool,
    /// Wakes the watcher when a call fails, so it starts checking for the return at once.
    check: Notify,
}

impl SharedState {
    /// The link over `store`, sharing the pacing budget of `budget` when pacing is on. Starts as up (a process
    /// joining a working Redis spends nothing); the watcher's first check, at once, corrects that.
    pub fn new(store: RedisStore, budget: Option<BudgetShape>, metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.shared_state_up(true);
        Arc::new(Self {
            store: ArcSwap::from_pointee(store),
            budget,
            up: AtomicBool::new(true),
            metrics,
            unopenable_logged: AtomicBool::new(false),
            check: Notify::new(),
        })
    }

    /// A new client (the Redis password changed); calls from now on use it.
    pub fn replace_store(&self, store: RedisStore) {
        self.store.store(Arc::new(store));
        self.check.notify_one();
    }

    /// Whether the shared state is in use.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The watcher: checks Redis every second (and at once after a failed call) until `shutdown`; see the
    /// module docs.
    pub async fn watch(self: Arc<Self>, mut shutdown: ShutdownSignal) {
        loop {
            self.check_once().await;
            tokio::select! {
                () = tokio::time::sleep(CHECK_EVERY) => {}
                () = self.check.notified() => {}
                () = shutdown.stopped() => return,
            }
        }
    }

    async fn check_once(&self) {
        let store = self.store.load_full();
        let answered = store.ping().await;
        match (answered, self.up()) {
            (Ok(()), true) => {}
            (Ok(()), false) => {
                if let Some(budget) = self.budget {
                    if let Err(e) = store.spend_all(budget.period).await {
                        warn!(
                            "redis answers again but marking the shared budget spent failed ({e}); still working alone"
                        );
                        return;
                    }
                }
                self.up.store(true, Ordering::Release);
                self.metrics.shared_state_up(true);
                info!("the shared state (Redis) answers again: sharing the token and the pacing budget with the other replicas");
            }
            (Err(e), true) => self.down(&e),
            (Err(_), false) => {}
        }
    }

    /// A call failed: work alone from now until the watcher sees Redis answer again.
    fn down(&self, cause: &StoreError) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.metrics.shared_state_up(false);
            warn!(
                "the shared state (Redis, shared.redis_url) is unreachable ({cause}); this process renews its token \
                 alone and paces at pacing.limit / shared.replicas until it is back"
            );
        }
        self.check.notify_one();
    }

    /// Maps a store failure to [`SharedDown`], marking the store down.
    fn failed<T>(&self, result: Result<T, StoreError>) -> Result<T, SharedDown> {
        result.map_err(|e| {
            self.down(&e);
            SharedDown
        })
    }
}

impl SharedBudget for SharedState {
    fn is_up(&self) -> bool {
        self.up()
    }

    fn acquire(&self) -> BoxFuture<'_, Result<Option<Duration>, SharedDown>> {
        Box::pin(async move {
            let Some(budget) = self.budget else {
                return Ok(None);
            };
            let store = self.store.load_full();
            let slot = store
                .acquire_slot(budget.interval, budget.tolerance, budget.period)
                .await;
            self.failed(slot).map(Result::err)
        })
    }

    fn pause(&self, pause: Duration) -> BoxFuture<'_, Result<(), SharedDown>> {
        Box::pin(async move {
            let store = self.store.load_full();
            let paused = store.pause(pause).await;
            self.failed(paused)
        })
    }
}

impl SharedTokens for SharedState {
    fn is_up(&self) -> bool {
        self.up()
    }

    fn current(&self) -> BoxFuture<'_, Result<Option<SharedToken>, SharedDown>> {
        Box::pin(async move {
            let store = self.store.load_full();
            match self.failed(store.token().await)? {
                Ok(token) => Ok(token),
                Err(_unopenable) => {
                    if !self.unopenable_logged.swap(true, Ordering::Relaxed) {
                        warn!(
                            "the token stored in Redis does not open with shared.key_file (sealed with another key, or \
                             damaged); it counts as absent and the next renewal replaces it. Give every replica the \
                             same shared.key_file"
                        );
                    }
                    Ok(None)
                }
            }
        })
    }

    fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<Option<Fence>, SharedDown>> {
        Box::pin(async move {
            let store = self.store.load_full();
            let locked = store.try_lock(ttl).await;
            self.failed(locked)
        })
    }

    fn publish<'a>(
        &'a self,
        fence: &'a Fence,
        token: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, SharedDown>> {
        Box::pin(async move {
            let store = self.store.load_full();
            let now_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            // The key lives as long as the access token; at least a second, so a token about to expire still
            // reaches the others rather than failing the store's call.
            let ttl = Duration::from_millis(token.access_expires_ms.saturating_sub(now_ms)).max(Duration::from_secs(1));
            let published = store.publish(fence, token, ttl, GENERATION_TTL).await;
            self.failed(published)
        })
    }

    fn unlock<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), SharedDown>> {
        Box::pin(async move {
            let store = self.store.load_full();
            let unlocked = store.unlock(fence).await;
            self.failed(unlocked)
        })
    }
}
