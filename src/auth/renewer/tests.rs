//! The renewer's rules on tokio's paused clock, against a scripted ZapSign ([`fake::Fake`]): this file holds the
//! rules a request meets (single flight, the 401 replay, `auth.timeout`, backoff arithmetic); `schedule.rs` the
//! refresher's (when it renews, refresh or login, retries, reload, shutdown).

mod fake;
mod schedule;
mod shared;
mod store;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio::task::JoinHandle;
use tokio::time::Instant;

use self::fake::{lives, token, Fake, Next};
use super::{Backoff, Renewer, Trigger};
use crate::auth::client::{AuthError, Credentials};
use crate::auth::clock::FollowsTokio;
use crate::auth::holder::TokenUnavailable;
use crate::auth::TokenHolder;
use crate::metrics::{Metrics, RenewalKind, RenewalResult};
use crate::secret::Secret;
use crate::shutdown::Shutdown;

/// A renewer driven by a scripted ZapSign, and what the tests look at.
struct Rig {
    renewer: Arc<Renewer<Arc<Fake>>>,
    zapsign: Arc<Fake>,
    holder: Arc<TokenHolder>,
    metrics: Arc<Metrics>,
}

impl Rig {
    /// A renewer with `auth.refresh_margin` = `margin` and `auth.timeout` = `timeout`, whose wall clock starts at
    /// a fixed date and follows tokio's clock.
    fn new(margin: Duration, timeout: Duration) -> Self {
        Self::process(margin, timeout, "", None)
    }

    /// One process of an account: its ZapSign client's access tokens carry `name`, and with `shared` it shares
    /// its token through that store. Every process's wall clock says the same (they start at the same instant).
    fn process(
        margin: Duration,
        timeout: Duration,
        name: &'static str,
        shared: Option<Arc<dyn crate::sharing::SharedTokens>>,
    ) -> Self {
        let wall = FollowsTokio::starting_at(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let (holder, zapsign, metrics) = (
            Arc::new(TokenHolder::new()),
            Arc::new(Fake::named(wall, name)),
            Arc::new(Metrics::new()),
        );
        let mut renewer = Renewer::new(
            holder.clone(),
            zapsign.clone(),
            credentials("u"),
            margin,
            timeout,
            metrics.clone(),
        )
        .with_wall_clock(wall);
        if let Some(shared) = shared {
            renewer = renewer.with_shared(shared);
        }
        Self {
            renewer: Arc::new(renewer),
            zapsign,
            holder,
            metrics,
        }
    }

    /// The refresher running in the background, and the switch that stops it.
    fn start(&self) -> (Shutdown, JoinHandle<()>) {
        let stop = Shutdown::new();
        let refresher = tokio::spawn(self.renewer.clone().run(stop.signal()));
        (stop, refresher)
    }

    /// The generation of the token the holder would inject now.
    fn injected(&self) -> Option<u64> {
        self.holder.bearer(Instant::now()).ok().map(|t| t.generation)
    }
}

/// The default rig: five minutes' margin, ten seconds' `auth.timeout`.
fn rig() -> Rig {
    Rig::new(Duration::from_secs(300), Duration::from_secs(10))
}

fn credentials(username: &str) -> Credentials {
    Credentials {
        organization_id: "1".into(),
        username: username.into(),
        password: Secret::new("p"),
    }
}

fn server_error() -> AuthError {
    AuthError::Status { status: 500 }
}

fn bad_credentials() -> AuthError {
    AuthError::BadCredentials {
        organization_id: "1".into(),
        username: "u".into(),
        url: "x".into(),
    }
}

fn is_unavailable<T>(result: &Result<T, TokenUnavailable>) -> bool {
    result.is_err()
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_without_a_token_share_one_login() {
    let rig = rig();
    rig.zapsign
        .then(Next::Slow(Duration::from_millis(200), Box::new(token())));
    let asks: Vec<_> = (0..50)
        .map(|_| {
            let r = rig.renewer.clone();
            tokio::spawn(async move { r.renew(Trigger::Missing).await })
        })
        .collect();
    let mut generations = Vec::new();
    for ask in asks {
        generations.push(ask.await.unwrap().unwrap().generation);
    }
    assert_eq!(rig.zapsign.calls(), ["login"], "renewals were not single-flight");
    assert!(generations.iter().all(|g| *g == generations[0]), "{generations:?}");
    assert_eq!(
        rig.zapsign.elapsed(),
        Duration::from_millis(200),
        "all waited on the one call"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_refresh_token_falls_back_to_login_in_the_same_renewal() {
    let rig = rig();
    rig.zapsign.then(token());
    let first = rig.renewer.renew(Trigger::Missing).await.unwrap().generation;
    rig.zapsign.then(Next::Fail(AuthError::RefreshRejected));
    rig.zapsign.then(token());
    let renewed = rig.renewer.renew(Trigger::Scheduled(first)).await.unwrap();
    assert!(renewed.generation > first);
    assert_eq!(rig.zapsign.calls(), ["login", "refresh", "login"]);
    assert_eq!(rig.metrics.renewals(RenewalKind::Refresh, RenewalResult::Rejected), 1);
    assert_eq!(rig.metrics.renewals(RenewalKind::Login, RenewalResult::Ok), 2);
    // The next renewal refreshes with the refresh token of the new login, not the refused one.
    rig.zapsign.then(token());
    rig.renewer.renew(Trigger::Scheduled(renewed.generation)).await.unwrap();
    assert_eq!(rig.zapsign.log()[3].with, "call 3");
}

#[tokio::test(start_paused = true)]
async fn a_refusal_during_a_backoff_gets_503_and_the_refused_token_leaves_the_holder() {
    let rig = rig();
    let r = &rig.renewer;
    rig.zapsign.then(token());
    let first = r.renew(Trigger::Missing).await.unwrap().generation;
    // The scheduled refresh fails: a backoff opens while the old token is still valid and still injected.
    rig.zapsign.then(Next::Fail(server_error()));
    let kept = r.renew(Trigger::Scheduled(first)).await.unwrap();
    assert_eq!(
        kept.generation, first,
        "a failed scheduled refresh keeps the valid token"
    );
    assert_eq!(rig.zapsign.calls(), ["login", "refresh"]);

    // Now ZapSign refuses that token.
    match r.renew(Trigger::Rejected(first)).await {
        Err(TokenUnavailable { retry_after, .. }) => {
            assert!(retry_after >= Duration::from_secs(1), "{retry_after:?}")
        }
        Ok(t) => panic!(
            "generation {} handed back after generation {first} was refused",
            t.generation
        ),
    }
    assert_eq!(rig.injected(), None, "the refused token is still injected");
    assert!(
        is_unavailable(&r.renew(Trigger::Missing).await),
        "a request finding no token during the backoff gets 503"
    );
    assert!(
        is_unavailable(&r.renew(Trigger::Rejected(first)).await),
        "a second request refused with the same token gets 503"
    );
    assert_eq!(rig.zapsign.calls().len(), 2, "an auth call during the backoff");

    // After the backoff, the next renewal brings a newer token.
    tokio::time::advance(Duration::from_secs(2)).await;
    rig.zapsign.then(token());
    let renewed = r.renew(Trigger::Missing).await.unwrap();
    assert!(renewed.generation > first);
    assert_eq!(rig.injected(), Some(renewed.generation));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_whose_renewal_fails_gets_503_and_drops_the_token() {
    let rig = rig();
    rig.zapsign.then(token());
    let first = rig.renewer.renew(Trigger::Missing).await.unwrap().generation;
    rig.zapsign.then(Next::Fail(server_error()));
    assert!(is_unavailable(&rig.renewer.renew(Trigger::Rejected(first)).await));
    assert_eq!(rig.injected(), None);
}

#[tokio::test(start_paused = true)]
async fn concurrent_refusals_share_one_renewal_and_all_get_the_newer_token() {
    let rig = rig();
    let r = &rig.renewer;
    rig.zapsign.then(token());
    let first = r.renew(Trigger::Missing).await.unwrap().generation;
    rig.zapsign.then(token());
    let asks: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn({
                let r = r.clone();
                async move { r.renew(Trigger::Rejected(first)).await }
            })
        })
        .collect();
    for ask in asks {
        assert!(ask.await.unwrap().unwrap().generation > first);
    }
    assert_eq!(rig.zapsign.calls(), ["login", "refresh"]);
    // A refusal of a token already replaced costs nothing.
    let current = r.renew(Trigger::Rejected(first)).await.unwrap();
    assert!(current.generation > first);
    assert_eq!(rig.zapsign.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_auth_call_is_abandoned_at_auth_timeout_and_counted_as_an_error() {
    let timeout = Duration::from_secs(1);
    let rig = Rig::new(Duration::from_secs(300), timeout);
    let r = &rig.renewer;
    rig.zapsign.then(Next::Hang);
    let start = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(600), r.renew(Trigger::Missing))
        .await
        .expect("the hanging login held the renewal for 10 minutes");
    assert_eq!(start.elapsed(), timeout, "abandoned after {:?}", start.elapsed());
    let message = result.unwrap_err().to_string();
    assert!(message.contains("auth.timeout") && message.contains("1s"), "{message}");
    assert_eq!(rig.metrics.renewals(RenewalKind::Login, RenewalResult::Error), 1);

    // The same bound holds for a refresh.
    tokio::time::advance(Duration::from_secs(2)).await;
    rig.zapsign.then(token());
    let first = r.renew(Trigger::Missing).await.unwrap().generation;
    rig.zapsign.then(Next::Hang);
    let start = Instant::now();
    let kept = tokio::time::timeout(Duration::from_secs(600), r.renew(Trigger::Scheduled(first)))
        .await
        .expect("the hanging refresh held the renewal for 10 minutes");
    assert_eq!(start.elapsed(), timeout);
    assert_eq!(kept.unwrap().generation, first);
    assert_eq!(rig.metrics.renewals(RenewalKind::Refresh, RenewalResult::Error), 1);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_is_never_injected_and_a_request_renews_it() {
    let rig = rig();
    rig.zapsign.then(lives(Duration::from_secs(60)));
    let first = rig.renewer.renew(Trigger::Missing).await.unwrap().generation;
    tokio::time::advance(Duration::from_millis(59_999)).await;
    assert_eq!(rig.injected(), Some(first));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(rig.injected(), None, "a token was injected at its `exp`");
    rig.zapsign.then(token());
    let renewed = rig.renewer.renew(Trigger::Missing).await.unwrap();
    assert!(renewed.generation > first);
    assert_eq!(rig.zapsign.calls(), ["login", "refresh"]);
}

#[test]
fn backoff_gaps_grow_never_shrink_and_are_capped() {
    let mut b = Backoff::default();
    let mut last = Duration::ZERO;
    for i in 0..40 {
        let gap = b.next(&AuthError::RateLimited);
        assert!(gap >= last, "gap {i} shrank: {gap:?} < {last:?}");
        assert!(gap <= Duration::from_secs(300));
        last = gap;
    }
    assert!(last >= Duration::from_secs(150));
    let mut b = Backoff::default();
    let first = b.next(&AuthError::RateLimited);
    assert!(
        first >= Duration::from_millis(500) && first <= Duration::from_secs(1),
        "{first:?}"
    );
}

#[test]
fn bad_credentials_back_off_slower() {
    let bad = bad_credentials();
    let mut b = Backoff::default();
    let gaps: Vec<Duration> = (0..3).map(|_| b.next(&bad)).collect();
    assert!(gaps[0] >= Duration::from_secs(1));
    // At most 4 attempts in the first 8 seconds: the first three gaps add up to at least 7 s.
    assert!(gaps.iter().sum::<Duration>() >= Duration::from_secs(7), "{gaps:?}");
    b.reset();
    assert!(b.next(&bad) <= Duration::from_secs(2));
}
