//! The seams between what the processes of one account share (the token, the pacing budget) and the store that
//! shares them. The consumers ([`crate::pacing`], [`crate::auth`]) name these traits; the Redis store in
//! [`crate::shared`] implements them; neither side imports the other, so each is tested alone (paused-time unit
//! tests drive a fake store) and the layers stay without circles.
//!
//! Every method is bounded by the store's own short timeout: a dead store answers [`SharedDown`] quickly, and
//! the caller then works alone (local pacing at `limit / replicas`, its own renewals) until
//! [`SharedBudget::is_up`] / [`SharedTokens::is_up`] says the store is back.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::secret::Secret;

/// A boxed future: the traits are used as trait objects (one store, many consumers).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The shared store did not answer within its timeout, or failed: work alone. The store logs the cause once per
/// outage; the consumer only switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared state (shared.redis_url) is unreachable; this process works alone until it is back")]
pub struct SharedDown;

/// The pacing budget every process of the account spends together.
pub trait SharedBudget: Send + Sync + Debug {
    /// Whether the shared budget is in use: false from the first failure until the store answers again and its
    /// budget was marked spent (so a switch back never adds a burst). One atomic load.
    fn is_up(&self) -> bool;

    /// Takes one slot of the shared budget: `Ok(None)` granted, `Ok(Some(wait))` none for `wait` (the budget is
    /// spent or an upstream 429 paused every process), `Err(SharedDown)` the store failed (and
    /// [`SharedBudget::is_up`] is false from then on until it recovers). One round trip.
    fn acquire(&self) -> BoxFuture<'_, Result<Option<Duration>, SharedDown>>;

    /// An upstream 429: no process gets a slot for `pause` from now (never shortens a longer pause).
    fn pause(&self, pause: Duration) -> BoxFuture<'_, Result<(), SharedDown>>;
}

/// A token as the store hands it over: opened (the store keeps it sealed) and numbered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedToken {
    /// From the store's counter (`INCR`): higher is newer, on every process.
    pub generation: u64,
    /// The token itself.
    pub record: TokenRecord,
}

/// What a renewal yields and the store keeps: the tokens and their expiry on the wall clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The access token.
    pub access: Secret,
    /// The refresh token, when ZapSign gave one.
    pub refresh: Option<Secret>,
    /// When the access token expires, in milliseconds since the Unix epoch.
    pub access_expires_ms: u64,
    /// When the refresh token expires, in milliseconds since the Unix epoch.
    pub refresh_expires_ms: Option<u64>,
}

/// Proof of holding the renewal lock: the random value stored in it (a fencing value: only its owner can
/// publish under it or release it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence(pub String);

/// The one token every process of the account uses.
pub trait SharedTokens: Send + Sync + Debug {
    /// Whether the store answers now (one atomic load); while false, renew alone.
    fn is_up(&self) -> bool;

    /// The stored token, if there is one that opens with our key. A value that does not open (sealed with
    /// another key, or damaged) counts as absent: `Ok(None)`, and the store logs it once.
    fn current(&self) -> BoxFuture<'_, Result<Option<SharedToken>, SharedDown>>;

    /// Takes the renewal lock for `ttl` (`auth.timeout`) when nobody holds it; `Ok(None)` when another process
    /// holds it (it is renewing: wait for its token).
    fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<Option<Fence>, SharedDown>>;

    /// Numbers `token` with the next generation and stores it sealed, while `fence` still holds the lock.
    /// Returns the generation, or `Ok(None)` when the lock was lost meanwhile (nothing stored).
    fn publish<'a>(
        &'a self,
        fence: &'a Fence,
        token: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, SharedDown>>;

    /// Releases the lock if `fence` still holds it.
    fn unlock<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), SharedDown>>;
}
