//! The renewer sharing one token with other processes of the account through a store ([`FakeStore`]), on
//! paused time: several [`Rig`]s stand for several processes, each with its own scripted ZapSign client (whose
//! access tokens carry the process's name, so a test sees whose token each one holds) and one store between them.

use http::HeaderValue;

use super::schedule::{secs, stop, until};
use super::store::FakeStore;
use super::*;
use crate::auth::renewer::{POLL, WAITED_RETRY};
use crate::sharing::SharedTokens;

/// A process of the account with `auth.timeout` = `timeout`, sharing through `store`.
fn process(store: &Arc<FakeStore>, name: &'static str, timeout: Duration) -> Rig {
    Rig::process(secs(300), timeout, name, Some(store.clone()))
}

/// Two processes, "a" and "b", on one store: five minutes' margin, ten seconds' `auth.timeout`.
fn pair(store: &Arc<FakeStore>) -> (Rig, Rig) {
    (process(store, "a-", secs(10)), process(store, "b-", secs(10)))
}

/// The `Authorization` value the process injects now.
fn header(rig: &Rig) -> Option<HeaderValue> {
    rig.holder.bearer(Instant::now()).ok().map(|t| t.header.clone())
}

/// Every auth call the processes made, in the order of their processes.
fn auth_calls(rigs: &[&Rig]) -> Vec<&'static str> {
    rigs.iter().flat_map(|r| r.zapsign.calls()).collect()
}

/// Renewals the process counted, of any kind and result.
fn renewals_counted(rig: &Rig) -> u64 {
    let results = [
        RenewalResult::Ok,
        RenewalResult::RateLimited,
        RenewalResult::Rejected,
        RenewalResult::Error,
    ];
    [RenewalKind::Login, RenewalKind::Refresh]
        .iter()
        .flat_map(|k| results.iter().map(|r| rig.metrics.renewals(*k, *r)))
        .sum()
}

#[tokio::test(start_paused = true)]
async fn two_processes_log_in_once_refresh_once_and_hold_the_same_token() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    // Each would answer, slowly, whatever it is asked: how many calls are made is what the test looks at.
    for p in [&a, &b] {
        p.zapsign
            .then_times(2, || Next::Slow(Duration::from_millis(200), Box::new(token())));
    }
    let (stop_a, run_a) = a.start();
    let (stop_b, run_b) = b.start();

    until("both hold a token", || a.injected().is_some() && b.injected().is_some()).await;
    // `until` looks every 10 ms.
    let both = rig_age(&a);
    assert!(
        both <= Duration::from_millis(210) + POLL,
        "the second process had a token {both:?} after the start: longer than the login and a poll"
    );
    assert_eq!(auth_calls(&[&a, &b]), ["login"], "both processes logged in");
    let first = header(&a).expect("a token");
    assert_eq!(header(&b), Some(first.clone()), "the processes hold different tokens");
    assert_eq!(store.generation(), Some(1));

    // An hour's token with five minutes' margin is renewed at 45 minutes, by one process for both.
    tokio::time::sleep(secs(2701)).await;
    assert_eq!(auth_calls(&[&a, &b]), ["login", "refresh"]);
    let second = header(&a).expect("a token");
    assert_ne!(second, first, "not renewed");
    assert_eq!(header(&b), Some(second), "the processes hold different tokens");
    assert_eq!(store.generation(), Some(2));
    assert_eq!(
        renewals_counted(&a) + renewals_counted(&b),
        2,
        "taking a token counted as a renewal"
    );
    stop(stop_a, run_a).await;
    stop(stop_b, run_b).await;
}

/// How long the rig's fake ZapSign has existed (the test's start).
fn rig_age(rig: &Rig) -> Duration {
    rig.zapsign.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_refusal_takes_a_newer_stored_token_without_an_auth_call_or_renews_under_the_lock_for_all() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    a.zapsign.then(token());
    let a1 = a.renewer.renew(Trigger::Missing).await.unwrap();
    let b1 = b.renewer.renew(Trigger::Missing).await.unwrap();
    assert_eq!(b1.header, a1.header);
    assert!(
        b.zapsign.calls().is_empty(),
        "b made an auth call with a valid token stored"
    );
    assert_eq!(renewals_counted(&b), 0, "taking a token counted as a renewal");

    // ZapSign refuses the token on b, and nothing newer is stored: b renews under the lock (refreshing with the
    // refresh token it took from a) and publishes.
    b.zapsign.then(token());
    let b2 = b.renewer.renew(Trigger::Rejected(b1.generation)).await.unwrap();
    assert!(b2.generation > b1.generation);
    assert_ne!(b2.header, a1.header, "the refused token came back");
    let log = b.zapsign.log();
    assert_eq!((log.len(), log[0].kind, log[0].with.as_str()), (1, "refresh", "call 1"));
    assert_eq!(store.generation(), Some(2));
    assert_eq!(store.counts().unlock, 2, "a lock left held");

    // ZapSign refuses the same token on a: b's newer one is stored, and a takes it without an auth call.
    let a2 = a.renewer.renew(Trigger::Rejected(a1.generation)).await.unwrap();
    assert!(
        a2.generation > a1.generation,
        "the replay would carry the refused generation"
    );
    assert_eq!(a2.header, b2.header);
    assert_eq!(a.zapsign.calls(), ["login"]);
    assert_eq!(renewals_counted(&a), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lock_left_by_a_crashed_process_is_taken_over_when_its_ttl_runs_out() {
    let timeout = secs(10);
    let store = Arc::new(FakeStore::new());
    store.lock_by_crashed_process(timeout);
    let a = process(&store, "a-", timeout);
    a.zapsign.then(token());
    let start = Instant::now();
    let token = a
        .renewer
        .renew(Trigger::Missing)
        .await
        .expect("a token after the takeover");
    let waited = start.elapsed();
    assert!(
        waited >= timeout && waited <= timeout + POLL,
        "took over after {waited:?}"
    );
    assert_eq!(a.zapsign.calls(), ["login"]);
    assert_eq!(a.zapsign.times(), [waited], "logged in before the lock was its own");
    assert_eq!(store.generation(), Some(1), "the token was not shared");
    assert_eq!(a.injected(), Some(token.generation));
}

#[tokio::test(start_paused = true)]
async fn a_lock_held_past_auth_timeout_gives_requests_503_and_the_timer_keeps_the_valid_token() {
    let timeout = secs(10);
    let store = Arc::new(FakeStore::new());
    // Another process, with a longer `auth.timeout`, renews for a minute and never publishes.
    store.lock_by_crashed_process(secs(60));
    let a = process(&store, "a-", timeout);
    let start = Instant::now();
    let refused = a.renewer.renew(Trigger::Missing).await.unwrap_err();
    assert!(start.elapsed() <= timeout + POLL, "waited {:?}", start.elapsed());
    assert_eq!(refused.retry_after, WAITED_RETRY);
    assert!(refused.reason.contains("another process"), "{}", refused.reason);
    assert!(
        a.zapsign.calls().is_empty(),
        "an auth call while another process holds the lock"
    );

    // Later, a holds a token, and at its renewal time the lock is held again for long.
    tokio::time::advance(secs(60)).await;
    a.zapsign.then(token());
    let first = a.renewer.renew(Trigger::Missing).await.unwrap().generation;
    store.lock_by_crashed_process(secs(60));
    let kept = a.renewer.renew(Trigger::Scheduled(first)).await.unwrap();
    assert_eq!(kept.generation, first, "the timer lost the valid token");
    // The retry comes about a second later (no auth call failed, so no growing backoff): until then the timer
    // keeps the token at once, without waiting on the lock.
    let start = Instant::now();
    assert_eq!(
        a.renewer.renew(Trigger::Scheduled(first)).await.unwrap().generation,
        first
    );
    assert_eq!(start.elapsed(), Duration::ZERO);
    tokio::time::advance(WAITED_RETRY).await;
    let start = Instant::now();
    a.renewer.renew(Trigger::Scheduled(first)).await.unwrap();
    assert!(start.elapsed() >= timeout, "no new attempt after {WAITED_RETRY:?}");
    assert_eq!(a.zapsign.calls(), ["login"]);
}

#[tokio::test(start_paused = true)]
async fn with_the_store_down_each_process_renews_alone_and_the_store_is_used_again_when_back() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    store.break_down();
    a.zapsign.then(token());
    b.zapsign.then(token());
    let a1 = a
        .renewer
        .renew(Trigger::Missing)
        .await
        .expect("an error because of the store");
    let b1 = b
        .renewer
        .renew(Trigger::Missing)
        .await
        .expect("an error because of the store");
    assert_eq!((a.zapsign.calls(), b.zapsign.calls()), (vec!["login"], vec!["login"]));
    assert_eq!(
        (
            a.metrics.renewals(RenewalKind::Login, RenewalResult::Ok),
            b.metrics.renewals(RenewalKind::Login, RenewalResult::Ok)
        ),
        (1, 1)
    );
    assert_ne!(a1.header, b1.header);
    assert!(!store.is_up());
    // While it is down, a renewal does not even ask it.
    let asked = store.counts();
    a.zapsign.then(token());
    a.renewer.renew(Trigger::Rejected(a1.generation)).await.unwrap();
    assert_eq!(store.counts(), asked, "the renewer asked a store that is down");

    // Back: the next renewals go through it; a renews and publishes, b takes a's token.
    store.mend();
    tokio::time::advance(secs(2700)).await;
    let a2 = a.renewer.renew(Trigger::Missing).await.unwrap();
    a.zapsign.then(token());
    let a3 = a.renewer.renew(Trigger::Scheduled(a2.generation)).await.unwrap();
    assert_eq!(store.generation(), Some(1));
    let b2 = b.renewer.renew(Trigger::Scheduled(b1.generation)).await.unwrap();
    assert_eq!(b2.header, a3.header);
    assert_eq!(b.zapsign.calls(), ["login"], "b renewed itself with the store back");
}

#[tokio::test(start_paused = true)]
async fn a_refused_shared_token_is_never_taken_again_even_after_renewing_alone() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    a.zapsign.then(token());
    let a1 = a.renewer.renew(Trigger::Missing).await.unwrap();
    let b1 = b.renewer.renew(Trigger::Missing).await.unwrap();
    assert_eq!(b1.header, a1.header);

    // ZapSign refuses it on b and b's renewal fails: 503, and the refused token, valid by its `exp`, stays stored.
    b.zapsign.then(Next::Fail(server_error()));
    assert!(is_unavailable(&b.renewer.renew(Trigger::Rejected(b1.generation)).await));
    assert_eq!(store.generation(), Some(1));
    // During b's backoff a request looks at the store: what is there is the refused token.
    assert!(is_unavailable(&b.renewer.renew(Trigger::Missing).await));

    // The store goes away and b renews alone; when it is back, the refused token is still stored and valid.
    tokio::time::advance(secs(2)).await;
    store.break_down();
    b.zapsign.then(token());
    let b2 = b.renewer.renew(Trigger::Missing).await.unwrap();
    store.mend();
    // ZapSign refuses b's own token too: b must renew under the lock, not fall back on the refused one.
    b.zapsign.then(token());
    let b3 = b.renewer.renew(Trigger::Rejected(b2.generation)).await.unwrap();
    for t in [&b2, &b3] {
        assert_ne!(t.header, a1.header, "the refused token came back");
    }
    assert_eq!(b.zapsign.calls(), ["refresh", "refresh", "refresh"]);
    assert_eq!(store.generation(), Some(2));
}

#[tokio::test(start_paused = true)]
async fn during_a_backoff_a_token_another_process_stored_is_taken() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    a.zapsign.then(token());
    let a1 = a.renewer.renew(Trigger::Missing).await.unwrap();
    let b1 = b.renewer.renew(Trigger::Missing).await.unwrap();
    b.zapsign.then(Next::Fail(AuthError::RateLimited));
    assert!(is_unavailable(&b.renewer.renew(Trigger::Rejected(b1.generation)).await));
    a.zapsign.then(token());
    let start = Instant::now();
    let a2 = a.renewer.renew(Trigger::Rejected(a1.generation)).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a waited on the lock b's failed renewal left"
    );
    // Still within b's backoff: b makes no auth call but takes a's new token.
    let b2 = b
        .renewer
        .renew(Trigger::Missing)
        .await
        .expect("503 with a newer token stored");
    assert_eq!(b2.header, a2.header);
    assert_eq!(b.zapsign.calls(), ["refresh"]);
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_renewal_does_not_take_a_stored_token_that_ends_before_the_one_held() {
    let store = Arc::new(FakeStore::new());
    let (a, b) = pair(&store);
    a.zapsign.then(token());
    let a1 = a.renewer.renew(Trigger::Missing).await.unwrap();
    // b starts 100 s later while the store is down, and logs in alone: its token outlives the stored one.
    tokio::time::advance(secs(100)).await;
    store.break_down();
    b.zapsign.then(token());
    let b1 = b.renewer.renew(Trigger::Missing).await.unwrap();
    store.mend();
    // At b's renewal time the stored token is newer than any b held but ends sooner (it is due itself): renew.
    tokio::time::advance(secs(2700)).await;
    b.zapsign.then(token());
    let b2 = b.renewer.renew(Trigger::Scheduled(b1.generation)).await.unwrap();
    assert_ne!(b2.header, a1.header, "took a token due for renewal");
    assert_eq!(b.zapsign.calls(), ["login", "refresh"]);
    assert_eq!(store.generation(), Some(2));
    // a, at its own renewal time, takes b's.
    let a2 = a.renewer.renew(Trigger::Scheduled(a1.generation)).await.unwrap();
    assert_eq!(a2.header, b2.header);
    assert_eq!(a.zapsign.calls(), ["login"]);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_during_the_wait_leaves_the_process_to_renew_alone_at_once() {
    let store = Arc::new(FakeStore::new());
    store.lock_by_crashed_process(secs(10));
    let a = process(&store, "a-", secs(10));
    a.zapsign.then(token());
    let asking = tokio::spawn({
        let r = a.renewer.clone();
        async move { r.renew(Trigger::Missing).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.break_down();
    let token = asking.await.unwrap().expect("an error because of the store");
    assert_eq!(a.zapsign.calls(), ["login"]);
    let at = a.zapsign.times()[0];
    assert!(
        at <= Duration::from_millis(300) + POLL,
        "logged in alone only after {at:?}"
    );
    assert_eq!(a.injected(), Some(token.generation));
    assert_eq!(store.generation(), None);
}
