//! The token holder: the current `Authorization` header value behind an `arc-swap`, so the per-request cost is
//! one atomic load and a reference-count increment. Renewals swap a new, ready-made value in; readers never
//! block and never see a half-written token.
//!
//! Times are tokio's `Instant` (the real clock outside tests), so a test that pauses tokio's clock moves token
//! expiry together with the renewer's schedule. The caller passes `now` in: the proxy reads the clock once per
//! request and the holder never reads it on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::time::Instant;

use crate::headers::bearer_value;
use crate::secret::Secret;

/// One access token, ready to inject.
#[derive(Debug)]
pub struct Token {
    /// `Bearer <token>`, marked sensitive.
    pub header: HeaderValue,
    /// When the token stops being valid; `None` for static API tokens, which do not expire.
    pub expires_at: Option<Instant>,
    /// Unique for the life of the holder and increasing with every token stored, even across a [`TokenHolder::clear`]:
    /// a caller that saw a 401 with generation `g` asks for a renewal only if `g` is current, and a replay needs a
    /// generation above `g`, so a number must never come back for a different token.
    pub generation: u64,
}

/// Why no token is available, for 503 answers and `/readyz`.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// A sentence for the caller and the operator; never a secret.
    pub reason: String,
    /// When the next attempt to get a token is due.
    pub retry_at: Instant,
}

/// The holder's answer when it has no valid token: what the caller is told and when to retry. The proxy
/// answers it as its 503 `token_unavailable` (the HTTP mapping lives there, not here).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no valid ZapSign token is available yet ({reason}); retry after {retry_after:?}")]
pub struct TokenUnavailable {
    /// Why, e.g. "login rate-limited"; never a secret.
    pub reason: String,
    /// When a token may be there: the time until the next attempt, at least one second.
    pub retry_after: Duration,
}

/// The current token, shared by every request and the refresher.
#[derive(Debug)]
pub struct TokenHolder {
    current: ArcSwapOption<Token>,
    unavailable: ArcSwap<Unavailable>,
    /// The last generation handed out. Kept apart from `current` so a clear does not restart the count.
    last_generation: AtomicU64,
}

/// Readiness, as `/readyz` reports it.
#[derive(Debug, Clone)]
pub enum Readiness {
    /// A valid token is held; `expires_in` is `None` for tokens that do not expire.
    Ready {
        /// Time left on the token.
        expires_in: Option<Duration>,
    },
    /// No valid token.
    NotReady(Unavailable),
}

impl Default for TokenHolder {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenHolder {
    /// An empty holder: requests get 503 until a token is stored.
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            unavailable: ArcSwap::from_pointee(Unavailable {
                reason: "no token obtained yet".to_owned(),
                retry_at: Instant::now() + Duration::from_secs(1),
            }),
            last_generation: AtomicU64::new(0),
        }
    }

    /// A holder with a static API token that never expires. `None` when the token cannot be a header value.
    pub fn with_static(token: &Secret) -> Option<Self> {
        let holder = Self::new();
        holder.store(bearer_value(token.expose())?, None);
        Some(holder)
    }

    /// Stores a new token and returns its generation, one above any generation this holder gave before.
    pub fn store(&self, header: HeaderValue, expires_at: Option<Instant>) -> u64 {
        let generation = self.last_generation.fetch_add(1, Ordering::Relaxed) + 1;
        self.current.store(Some(Arc::new(Token {
            header,
            expires_at,
            generation,
        })));
        generation
    }

    /// Drops the current token (it was rejected) and records why and when the next attempt is due.
    pub fn clear(&self, reason: String, retry_at: Instant) {
        self.current.store(None);
        self.set_unavailable(reason, retry_at);
    }

    /// Drops the current token if it is still the one of `generation` (ZapSign refused it), so no new request
    /// carries it; a newer token stored meanwhile stays. The reason and retry time already recorded (by the
    /// failed renewal that opened the backoff) are what callers are told. Returns whether it was dropped.
    pub fn retire(&self, generation: u64) -> bool {
        let current = self.current.load();
        if current.as_ref().is_none_or(|t| t.generation != generation) {
            return false;
        }
        let previous = self.current.compare_and_swap(&current, None);
        match (&*previous, &*current) {
            (Some(p), Some(c)) => Arc::ptr_eq(p, c),
            _ => false,
        }
    }

    /// Records why the next token is late, without touching a still-valid current one.
    pub fn set_unavailable(&self, reason: String, retry_at: Instant) {
        self.unavailable.store(Arc::new(Unavailable { reason, retry_at }));
    }

    /// The current token, if it is still valid at `now`. A token past its expiry is never returned.
    pub fn valid_token(&self, now: Instant) -> Option<Arc<Token>> {
        let token = self.current.load_full()?;
        match token.expires_at {
            Some(exp) if exp <= now => None,
            _ => Some(token),
        }
    }

    /// The token to inject into a request, or why there is none.
    pub fn bearer(&self, now: Instant) -> Result<Arc<Token>, TokenUnavailable> {
        self.valid_token(now).ok_or_else(|| self.unavailable_error(now))
    }

    fn unavailable_error(&self, now: Instant) -> TokenUnavailable {
        let u = self.unavailable.load();
        TokenUnavailable {
            reason: self.unavailable_reason(&u),
            retry_after: u.retry_at.saturating_duration_since(now).max(Duration::from_secs(1)),
        }
    }

    /// Why no valid token is held: an expired one still in place says so, else the reason recorded last.
    fn unavailable_reason(&self, recorded: &Unavailable) -> String {
        if self.current.load().is_some() {
            "the token expired and its renewal has not succeeded yet".to_owned()
        } else {
            recorded.reason.clone()
        }
    }

    /// Whether a token is held, for `/readyz`.
    pub fn readiness(&self, now: Instant) -> Readiness {
        match self.valid_token(now) {
            Some(t) => Readiness::Ready {
                expires_in: t.expires_at.map(|e| e.saturating_duration_since(now)),
            },
            None => {
                let u = self.unavailable.load();
                Readiness::NotReady(Unavailable {
                    reason: self.unavailable_reason(&u),
                    retry_at: u.retry_at,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_holder_answers_503_with_retry_after() {
        let h = TokenHolder::new();
        let err = h.bearer(Instant::now()).unwrap_err();
        assert!(err.retry_after >= Duration::from_secs(1), "{err:?}");
        assert!(matches!(h.readiness(Instant::now()), Readiness::NotReady(_)));
    }

    #[test]
    fn static_token_never_expires() {
        let h = TokenHolder::with_static(&Secret::new("abc")).unwrap();
        let t = h.bearer(Instant::now() + Duration::from_secs(86_400 * 365)).unwrap();
        assert_eq!(t.header, "Bearer abc");
        assert!(t.header.is_sensitive());
    }

    #[test]
    fn expired_token_is_never_returned() {
        let h = TokenHolder::new();
        let now = Instant::now();
        h.store(
            HeaderValue::from_static("Bearer x"),
            Some(now + Duration::from_secs(10)),
        );
        assert!(h.bearer(now).is_ok());
        let err = h.bearer(now + Duration::from_secs(10)).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn generations_stay_unique_after_clear() {
        let h = TokenHolder::new();
        let now = Instant::now();
        let first = h.store(HeaderValue::from_static("Bearer a"), None);
        h.clear("rejected".into(), now);
        let second = h.store(HeaderValue::from_static("Bearer b"), None);
        assert!(
            second > first,
            "generation {second} after a clear repeats or precedes {first}"
        );
        h.clear("rejected".into(), now);
        assert!(h.store(HeaderValue::from_static("Bearer c"), None) > second);
    }

    #[test]
    fn retire_drops_only_the_named_generation() {
        let h = TokenHolder::new();
        let now = Instant::now();
        h.set_unavailable("refresh failing".into(), now + Duration::from_secs(3));
        let old = h.store(HeaderValue::from_static("Bearer a"), None);
        let new = h.store(HeaderValue::from_static("Bearer b"), None);
        assert!(!h.retire(old), "a newer token was dropped for an older refusal");
        assert_eq!(h.bearer(now).unwrap().generation, new);
        assert!(h.retire(new));
        assert!(!h.retire(new), "retired twice");
        let TokenUnavailable { reason, retry_after } = h.bearer(now).unwrap_err();
        assert_eq!(reason, "refresh failing");
        assert!(retry_after >= Duration::from_secs(2), "{retry_after:?}");
    }

    #[test]
    fn generations_increase_and_clear_empties() {
        let h = TokenHolder::new();
        assert_eq!(h.store(HeaderValue::from_static("Bearer a"), None), 1);
        assert_eq!(h.store(HeaderValue::from_static("Bearer b"), None), 2);
        h.clear("rejected".into(), Instant::now() + Duration::from_secs(5));
        let TokenUnavailable { reason, retry_after } = h.bearer(Instant::now()).unwrap_err();
        assert_eq!(reason, "rejected");
        assert!(retry_after >= Duration::from_secs(4));
    }
}
