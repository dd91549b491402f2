//! Keeps the token holder filled in JWT mode: logs in at start, refreshes before expiry, logs in again when the
//! refresh token dies, and backs off (equal jitter, gaps never shrinking) when ZapSign fails or rate-limits.
//!
//! Single flight: every renewal, from the timer or from requests, runs under one async mutex. A request names
//! the token generation it found bad; once it holds the mutex, a newer token means someone else already renewed
//! and it returns at once. So however many requests ask together, one auth call runs and all wait on it; each
//! call is bounded by `auth.timeout`, so the flight is never held longer than that per call.
//!
//! A token ZapSign refused (401) is never handed back for a replay: [`Renewer::renew`] answers a refusal with a
//! newer token or a 503, and drops the refused token from the holder when no newer one can be had.
//!
//! Shared ([`Renewer::with_shared`]): processes of one account share one token through a
//! [`SharedTokens`] store. Whenever a renewal is due, the renewer first takes a newer valid token from the store;
//! failing that, one process renews under the store's lock and publishes, and the others wait for its token
//! (polling, bounded by `auth.timeout`). "Newer" compares the store's generations (its counter), never the local
//! ones, so a token ZapSign refused on one process is never taken back from the store. A store that fails or is
//! down leaves the renewer working alone, exactly as without one, until it answers again.
//!
//! Time is read through tokio's clock (the real one in production) and an injected [`WallClock`] for the JWT
//! `exp` claims, so the tests drive the schedule, backoff and timeouts on paused time (`renewer/tests.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::{AuthCalls, AuthClient, AuthError, Credentials, Issued};
use super::clock::{SystemClock, WallClock};
use super::holder::{Token, TokenHolder, TokenUnavailable};
use super::jwt::{lifetime, renew_after, ACCESS_FALLBACK, REFRESH_FALLBACK};
use crate::headers::bearer_value;
use crate::metrics::{Metrics, RenewalKind, RenewalResult};
use crate::secret::Secret;
use crate::sharing::{Fence, SharedDown, SharedTokens, TokenRecord};
use crate::shutdown::ShutdownSignal;

/// How often a process waiting for another's renewal looks at the store again.
const POLL: Duration = Duration::from_millis(100);

/// A stored token is taken only with more than this left before its `exp`: enough for a request to reach ZapSign
/// with it, and for a little skew between the pods' wall clocks.
const ADOPT_MARGIN: Duration = Duration::from_secs(1);

/// How soon a renewal is tried again after waiting `auth.timeout` in vain for another process's token. No auth
/// call failed, so the backoff does not grow; the lock's TTL has run out by then, so the retry renews if needed.
const WAITED_RETRY: Duration = Duration::from_secs(1);

/// Why a renewal is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The refresher's timer: the token of this generation is near its renewal time.
    Scheduled(u64),
    /// A request found no valid token.
    Missing,
    /// The upstream answered 401 to the token of this generation.
    Rejected(u64),
}

/// Backoff after failures: equal jitter (half the step fixed, half random), doubling, capped; each gap at least
/// the previous one, so successive gaps never shrink while failures go on.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last_gap: Duration,
}

impl Backoff {
    /// The wait before the next attempt after a failure of `kind`.
    fn next(&mut self, err: &AuthError) -> Duration {
        // Wrong credentials back off from a longer first step so the account is never locked out by us.
        let (base, cap) = match err {
            AuthError::BadCredentials { .. } => (Duration::from_secs(2), Duration::from_secs(15 * 60)),
            _ => (Duration::from_secs(1), Duration::from_secs(5 * 60)),
        };
        let step = base.saturating_mul(1u32 << self.failures.min(16)).min(cap);
        let half = step / 2;
        let gap = (half + half.mul_f64(rand::random::<f64>())).max(self.last_gap);
        self.failures += 1;
        self.last_gap = gap;
        gap
    }

    fn reset(&mut self) {
        *self = Self::default();
    }
}

#[derive(Debug)]
struct RefreshToken {
    token: Secret,
    expires_at: Instant,
}

#[derive(Debug)]
struct State {
    refresh: Option<RefreshToken>,
    backoff: Backoff,
    /// No attempt before this (backoff).
    next_attempt: Instant,
    /// When the current access token is due for renewal.
    renew_at: Option<Instant>,
    /// The current token's local generation and its shared one, when it came from (or went into) the store.
    shared: Option<SharedMark>,
    /// The highest shared generation this process has held: a stored token is newer only above it. It rises
    /// with each token taken or published and stays when a token is refused or the process renews alone while
    /// the store is down, so a refused token (same shared generation, same token) is never taken again. Only a
    /// publish of our own may lower it: the store's counter is what "newest" means (a restarted store counts
    /// from 1 again).
    shared_floor: Option<u64>,
}

/// Which local generation stands for which shared one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SharedMark {
    local: u64,
    shared: u64,
}

/// Why a renewal did not yield a token.
#[derive(Debug)]
enum Failure {
    /// This process's login or refresh failed: back off.
    Auth(AuthError),
    /// Another process held the renewal lock for all of `auth.timeout` and published nothing newer.
    Waited,
}

/// The JWT-mode token keeper; `C` makes the auth calls ([`AuthClient`] outside tests).
#[derive(Debug)]
pub struct Renewer<C = AuthClient> {
    holder: Arc<TokenHolder>,
    client: C,
    credentials: ArcSwap<Credentials>,
    margin: Duration,
    /// `auth.timeout`: one login or refresh call, start to finish.
    timeout: Duration,
    state: Mutex<State>,
    wake: Notify,
    metrics: Arc<Metrics>,
    /// The wall clock the tokens' `exp` claims are read against ([`SystemClock`] outside tests).
    wall: Box<dyn WallClock>,
    /// The store through which the processes of the account share one token, if any.
    shared: Option<Arc<dyn SharedTokens>>,
}

impl<C: AuthCalls> Renewer<C> {
    /// A renewer that fills `holder`, renewing `margin` before expiry, each auth call bounded by `timeout`
    /// (`auth.timeout`); call [`Renewer::run`] to start it.
    pub fn new(
        holder: Arc<TokenHolder>,
        client: C,
        credentials: Credentials,
        margin: Duration,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            holder,
            client,
            credentials: ArcSwap::from_pointee(credentials),
            margin,
            timeout,
            state: Mutex::new(State {
                refresh: None,
                backoff: Backoff::default(),
                next_attempt: Instant::now(),
                renew_at: None,
                shared: None,
                shared_floor: None,
            }),
            wake: Notify::new(),
            metrics,
            wall: Box::new(SystemClock),
            shared: None,
        }
    }

    /// The same renewer reading `exp` claims against `wall` instead of the system clock: tests pass one that
    /// follows tokio's paused time.
    pub fn with_wall_clock(mut self, wall: impl WallClock) -> Self {
        self.wall = Box::new(wall);
        self
    }

    /// The same renewer sharing one token with the other processes of the account through `shared`
    /// (`shared.redis_url`): it takes their newer tokens, renews under the store's lock, and publishes what it gets.
    pub fn with_shared(mut self, shared: Arc<dyn SharedTokens>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// `auth.timeout`: also how long a request may wait for its body to come back for a replay.
    pub fn auth_timeout(&self) -> Duration {
        self.timeout
    }

    /// New credentials (reload): the next renewal logs in with them, without waiting out a backoff.
    pub async fn set_credentials(&self, credentials: Credentials) {
        self.credentials.store(Arc::new(credentials));
        let mut st = self.state.lock().await;
        st.refresh = None;
        st.backoff.reset();
        let now = Instant::now();
        st.next_attempt = now;
        st.renew_at = Some(now);
        drop(st);
        self.wake.notify_one();
    }

    /// A valid token, renewing first when `trigger` says the current one is missing, rejected or due.
    /// Concurrent callers share one auth call. During a backoff, answers 503 at once (or, for a scheduled
    /// renewal, keeps the still-valid token). After [`Trigger::Rejected`], see [`Renewer::newer_than`].
    pub async fn renew(&self, trigger: Trigger) -> Result<Arc<Token>, TokenUnavailable> {
        let mut st = self.state.lock().await;
        let result = self.renew_locked(&mut st, trigger).await;
        match trigger {
            Trigger::Rejected(refused) => self.newer_than(refused, result),
            Trigger::Scheduled(_) | Trigger::Missing => result,
        }
    }

    /// The one rule for a token ZapSign refused with a 401: what goes back for the replay is a token newer than
    /// `refused`, or a 503 `token_unavailable`, never `refused` itself (a backoff window, a failed renewal or a
    /// race all end here). Without a newer token, `refused` also leaves the holder, so new requests do not carry
    /// it either; they get the 503 until a renewal succeeds. Called with the single-flight lock held.
    fn newer_than(
        &self,
        refused: u64,
        result: Result<Arc<Token>, TokenUnavailable>,
    ) -> Result<Arc<Token>, TokenUnavailable> {
        if let Ok(token) = &result {
            if token.generation > refused {
                return result;
            }
        }
        if self.holder.retire(refused) {
            info!(
                generation = refused,
                "ZapSign refused the current token and no newer one can be had yet; callers get 503 until a renewal succeeds"
            );
        }
        match self.holder.bearer(Instant::now()) {
            Ok(token) if token.generation > refused => Ok(token),
            Ok(_) => Err(TokenUnavailable {
                reason: "ZapSign refused the token and no newer one is available yet".to_owned(),
                retry_after: Duration::from_secs(1),
            }),
            Err(unavailable) => Err(unavailable),
        }
    }

    async fn renew_locked(&self, st: &mut State, trigger: Trigger) -> Result<Arc<Token>, TokenUnavailable> {
        let now = Instant::now();
        let held = self.holder.valid_token(now);
        if let Some(token) = &held {
            let stale = match trigger {
                // Generations only grow: the named one or an older one is not worth keeping.
                Trigger::Scheduled(g) | Trigger::Rejected(g) => token.generation <= g,
                Trigger::Missing => false,
            };
            if !stale {
                return Ok(token.clone());
            }
        }
        if let (Trigger::Rejected(refused), Some(mark)) = (trigger, st.shared) {
            if mark.local == refused {
                // Same shared generation, same token: the store may still hold it, and it must not come back.
                st.shared_floor = st.shared_floor.max(Some(mark.shared));
                debug!(shared_generation = mark.shared, "ZapSign refused the shared token");
            }
        }
        // A scheduled renewal takes a stored token only when it outlives the one held, which is due now: a stored
        // token that is no further from its end is just as due, and renewing it is what the schedule asks for.
        let outlive = match trigger {
            Trigger::Scheduled(_) => held.as_ref().and_then(|t| t.expires_at),
            Trigger::Missing | Trigger::Rejected(_) => None,
        };
        let store = self.shared.as_deref().filter(|s| s.is_up());
        if now < st.next_attempt {
            // Backing off from ZapSign: no auth call, but a token another process got meanwhile is welcome.
            if let Some(store) = store {
                if let Ok(Some(token)) = self.adopt(store, st, outlive).await {
                    return Ok(token);
                }
            }
            return self.holder.bearer(now);
        }
        let result = match store {
            Some(store) => match self.through_store(store, st, outlive).await {
                Ok(result) => result,
                Err(SharedDown) => {
                    debug!("the shared token store is down; renewing alone");
                    self.attempt(st).await.map(|(token, _)| token).map_err(Failure::Auth)
                }
            },
            None => self.attempt(st).await.map(|(token, _)| token).map_err(Failure::Auth),
        };
        let failure = match result {
            Ok(token) => return Ok(token),
            Err(failure) => failure,
        };
        let now = Instant::now();
        let (gap, reason) = match failure {
            Failure::Auth(err) => (st.backoff.next(&err), err.to_string()),
            Failure::Waited => (
                WAITED_RETRY,
                format!(
                    "another process holds the shared renewal lock and stored no newer token within auth.timeout ({:?})",
                    self.timeout
                ),
            ),
        };
        st.next_attempt = now + gap;
        warn!(retry_in = ?gap, "token renewal failed: {reason}");
        self.holder.set_unavailable(reason, st.next_attempt);
        // The refresher may be asleep until the old token's renewal time: have it retry after the backoff.
        self.wake.notify_one();
        self.holder.bearer(now)
    }

    /// A token through the store: a newer stored one; else one renewed under the store's lock and published;
    /// else, while another process holds the lock, the token it publishes (polled every [`POLL`], for at most
    /// `auth.timeout`, the lock's TTL: a lock left by a process that died runs out by then and is taken over).
    /// `Err(SharedDown)` only before any auth call, so the caller renews alone.
    async fn through_store(
        &self,
        store: &dyn SharedTokens,
        st: &mut State,
        outlive: Option<Instant>,
    ) -> Result<Result<Arc<Token>, Failure>, SharedDown> {
        if let Some(token) = self.adopt(store, st, outlive).await? {
            return Ok(Ok(token));
        }
        let deadline = Instant::now() + self.timeout;
        for poll in 0u32.. {
            if let Some(fence) = store.try_lock(self.timeout).await? {
                return Ok(self.renew_under(store, st, outlive, fence).await);
            }
            if Instant::now() >= deadline {
                break;
            }
            if poll == 0 {
                debug!("another process is renewing the shared token; waiting for it");
            }
            tokio::time::sleep_until((Instant::now() + POLL).min(deadline)).await;
            if let Some(token) = self.adopt(store, st, outlive).await? {
                return Ok(Ok(token));
            }
        }
        Ok(Err(Failure::Waited))
    }

    /// Renews holding the store's lock and publishes the token for the other processes; a token another process
    /// published between our last look and the lock is taken instead. Releases the lock in every case, so a
    /// failed renewal lets the next process try at once.
    async fn renew_under(
        &self,
        store: &dyn SharedTokens,
        st: &mut State,
        outlive: Option<Instant>,
        fence: Fence,
    ) -> Result<Arc<Token>, Failure> {
        let result = match self.adopt(store, st, outlive).await {
            Ok(Some(token)) => Ok(token),
            Ok(None) => self.renew_and_publish(store, st, &fence).await,
            Err(SharedDown) => self.attempt(st).await.map(|(token, _)| token).map_err(Failure::Auth),
        };
        // A store that fails here forgets the lock at its TTL; nothing else to do.
        let _ = store.unlock(&fence).await;
        result
    }

    /// One renewal under the lock `fence`, published: its shared generation becomes the current token's.
    async fn renew_and_publish(
        &self,
        store: &dyn SharedTokens,
        st: &mut State,
        fence: &Fence,
    ) -> Result<Arc<Token>, Failure> {
        let (token, record) = self.attempt(st).await.map_err(Failure::Auth)?;
        match store.publish(fence, &record).await {
            Ok(Some(shared)) => {
                st.shared = Some(SharedMark {
                    local: token.generation,
                    shared,
                });
                // The store's counter says what is newest, even below a floor it forgot (a restarted store).
                st.shared_floor = Some(shared);
                debug!(
                    generation = token.generation,
                    shared_generation = shared,
                    "shared the new token"
                );
            }
            Ok(None) => warn!(
                timeout = ?self.timeout,
                "the renewal outlasted the shared lock (auth.timeout): its token was not shared, other processes renew their own"
            ),
            Err(SharedDown) => debug!("the shared token store failed; the new token stays with this process"),
        }
        Ok(token)
    }

    /// Takes the stored token when it is newer than any this process held (by the store's generations), valid
    /// beyond [`ADOPT_MARGIN`], and expiring after `outlive` when given. `Ok(None)`: nothing to take.
    async fn adopt(
        &self,
        store: &dyn SharedTokens,
        st: &mut State,
        outlive: Option<Instant>,
    ) -> Result<Option<Arc<Token>>, SharedDown> {
        let Some(stored) = store.current().await? else {
            return Ok(None);
        };
        if st.shared_floor.is_some_and(|floor| stored.generation <= floor) {
            return Ok(None);
        }
        let (now, wall_ms) = (Instant::now(), millis(self.wall.now()));
        let left = Duration::from_millis(stored.record.access_expires_ms.saturating_sub(wall_ms));
        if left <= ADOPT_MARGIN || outlive.is_some_and(|held| now + left <= held) {
            return Ok(None);
        }
        let Some(header) = bearer_value(stored.record.access.expose()) else {
            warn!(
                shared_generation = stored.generation,
                "the stored token is not a valid header value; renewing instead"
            );
            return Ok(None);
        };
        if let Some(refresh) = stored.record.refresh {
            let refresh_left = match stored.record.refresh_expires_ms {
                Some(ms) => Duration::from_millis(ms.saturating_sub(wall_ms)),
                None => lifetime(refresh.expose(), self.wall.now(), REFRESH_FALLBACK).0,
            };
            st.refresh = Some(RefreshToken {
                token: refresh,
                expires_at: now + refresh_left,
            });
        }
        let (token, after) = self.install(st, header, left);
        st.shared = Some(SharedMark {
            local: token.generation,
            shared: stored.generation,
        });
        st.shared_floor = Some(stored.generation);
        debug!(
            generation = token.generation,
            shared_generation = stored.generation,
            expires_in = ?left,
            renew_in = ?after,
            "took the token another process stored"
        );
        Ok(Some(token))
    }

    /// Runs one auth call within `auth.timeout`: a call that hangs would otherwise hold the single flight, and
    /// every request waiting on it, for as long as the connection lives.
    async fn bounded(&self, call: impl Future<Output = Result<Issued, AuthError>>) -> Result<Issued, AuthError> {
        let elapsed = Err(AuthError::Timeout {
            which: "auth.timeout",
            timeout: self.timeout,
        });
        tokio::time::timeout(self.timeout, call).await.unwrap_or(elapsed)
    }

    /// One renewal: refresh while a live refresh token is held, else (or when refresh is refused) log in.
    async fn attempt(&self, st: &mut State) -> Result<(Arc<Token>, TokenRecord), AuthError> {
        let now = Instant::now();
        if let Some(refresh) = st.refresh.as_ref().filter(|r| r.expires_at > now) {
            let result = self.bounded(self.client.refresh(&refresh.token)).await;
            self.metrics.renewal(RenewalKind::Refresh, renewal_result(&result));
            match result {
                Ok(issued) => return Ok(self.store(st, issued)),
                Err(AuthError::RefreshRejected) => {
                    info!("refresh token rejected; logging in again");
                    st.refresh = None;
                }
                Err(e) => return Err(e),
            }
        }
        let credentials = self.credentials.load_full();
        let result = self.bounded(self.client.login(&credentials)).await;
        self.metrics.renewal(RenewalKind::Login, renewal_result(&result));
        let issued = result?;
        Ok(self.store(st, issued))
    }

    /// Swaps the new access token into the holder and schedules its renewal; returns it with the record the
    /// store would keep of it (the refresh token held, since a refresh call may hand out none).
    fn store(&self, st: &mut State, issued: Issued) -> (Arc<Token>, TokenRecord) {
        let (now, wall) = (Instant::now(), self.wall.now());
        let (life, from_exp) = lifetime(issued.access.expose(), wall, ACCESS_FALLBACK);
        if !from_exp {
            warn!(assumed = ?life, "access token has no usable `exp` (missing, or clock skew); assuming the documented lifetime");
        }
        if let Some(refresh) = issued.refresh {
            let (refresh_life, _) = lifetime(refresh.expose(), wall, REFRESH_FALLBACK);
            st.refresh = Some(RefreshToken {
                token: refresh,
                expires_at: now + refresh_life,
            });
        }
        // `bearer_value` cannot fail here: the client checked the token is a valid header value.
        let header = bearer_value(issued.access.expose()).unwrap_or_else(|| http::HeaderValue::from_static("Bearer"));
        let (token, after) = self.install(st, header, life);
        st.shared = None;
        info!(generation = token.generation, expires_in = ?life, renew_in = ?after, "new access token");
        let wall_ms = millis(wall);
        let live_refresh = st.refresh.as_ref().filter(|r| r.expires_at > now);
        let record = TokenRecord {
            access: issued.access,
            refresh: live_refresh.map(|r| r.token.clone()),
            access_expires_ms: wall_ms.saturating_add(duration_ms(life)),
            refresh_expires_ms: live_refresh
                .map(|r| wall_ms.saturating_add(duration_ms(r.expires_at.saturating_duration_since(now)))),
        };
        (token, record)
    }

    /// Puts a token living `life` into the holder and schedules its renewal as every token's: `auth.refresh_margin`
    /// before its end (see [`renew_after`]). Returns it and the time until its renewal.
    fn install(&self, st: &mut State, header: http::HeaderValue, life: Duration) -> (Arc<Token>, Duration) {
        let now = Instant::now();
        self.holder.store(header, Some(now + life));
        st.backoff.reset();
        st.next_attempt = now;
        let after = renew_after(life, self.margin);
        st.renew_at = Some(now + after);
        self.wake.notify_one();
        let token = self
            .holder
            .valid_token(now)
            .unwrap_or_else(|| unreachable!("a token stored just now is valid"));
        (token, after)
    }

    /// The refresher: logs in at once, then renews whenever a renewal (or a retry after a failure) is due,
    /// until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: ShutdownSignal) {
        loop {
            let due = {
                let st = self.state.lock().await;
                match (self.holder.valid_token(Instant::now()), st.renew_at) {
                    (Some(_), Some(at)) => at.max(st.next_attempt),
                    _ => st.next_attempt,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = self.wake.notified() => continue,
                () = shutdown.stopped() => return,
            }
            let trigger = match self.holder.valid_token(Instant::now()) {
                Some(t) => Trigger::Scheduled(t.generation),
                None => Trigger::Missing,
            };
            let _ = self.renew(trigger).await;
        }
    }
}

/// `at` in milliseconds since the Unix epoch, as the store keeps expiries (0 before the epoch).
fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How a login or refresh ended, as the renewals metric counts it.
fn renewal_result(result: &Result<Issued, AuthError>) -> RenewalResult {
    match result {
        Ok(_) => RenewalResult::Ok,
        Err(AuthError::RateLimited) => RenewalResult::RateLimited,
        Err(AuthError::BadCredentials { .. } | AuthError::RefreshRejected) => RenewalResult::Rejected,
        Err(_) => RenewalResult::Error,
    }
}

#[cfg(test)]
mod tests;
