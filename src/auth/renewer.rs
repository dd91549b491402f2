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
//! Time is read through tokio's clock (the real one in production) and an injected [`WallClock`] for the JWT
//! `exp` claims, so the tests drive the schedule, backoff and timeouts on paused time (`renewer/tests.rs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::client::{AuthCalls, AuthClient, AuthError, Credentials, Issued};
use super::clock::{SystemClock, WallClock};
use super::holder::{Token, TokenHolder, TokenUnavailable};
use super::jwt::{lifetime, renew_after, ACCESS_FALLBACK, REFRESH_FALLBACK};
use crate::headers::bearer_value;
use crate::metrics::{Metrics, RenewalKind, RenewalResult};
use crate::secret::Secret;
use crate::shutdown::ShutdownSignal;

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
            }),
            wake: Notify::new(),
            metrics,
            wall: Box::new(SystemClock),
        }
    }

    /// The same renewer reading `exp` claims against `wall` instead of the system clock: tests pass one that
    /// follows tokio's paused time.
    pub fn with_wall_clock(mut self, wall: impl WallClock) -> Self {
        self.wall = Box::new(wall);
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
        if let Some(token) = self.holder.valid_token(now) {
            let stale = match trigger {
                // Generations only grow: the named one or an older one is not worth keeping.
                Trigger::Scheduled(g) | Trigger::Rejected(g) => token.generation <= g,
                Trigger::Missing => false,
            };
            if !stale {
                return Ok(token);
            }
        }
        if now < st.next_attempt {
            return self.holder.bearer(now);
        }
        match self.attempt(st).await {
            Ok(token) => Ok(token),
            Err(err) => {
                let now = Instant::now();
                let gap = st.backoff.next(&err);
                st.next_attempt = now + gap;
                let reason = format!("{err}");
                warn!(retry_in = ?gap, "token renewal failed: {reason}");
                self.holder.set_unavailable(reason, st.next_attempt);
                // The refresher may be asleep until the old token's renewal time: have it retry after the backoff.
                self.wake.notify_one();
                self.holder.bearer(now)
            }
        }
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
    async fn attempt(&self, st: &mut State) -> Result<Arc<Token>, AuthError> {
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

    /// Swaps the new access token into the holder and schedules its renewal.
    fn store(&self, st: &mut State, issued: Issued) -> Arc<Token> {
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
        let generation = self.holder.store(header, Some(now + life));
        st.backoff.reset();
        st.next_attempt = now;
        let after = renew_after(life, self.margin);
        st.renew_at = Some(now + after);
        info!(generation, expires_in = ?life, renew_in = ?after, "new access token");
        self.wake.notify_one();
        self.holder
            .valid_token(now)
            .unwrap_or_else(|| unreachable!("a token stored just now is valid"))
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
