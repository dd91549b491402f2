//! The refresher's rules on paused time: when it renews, refresh or login, how it retries after failures, and how
//! it answers a reload and a shutdown. Times are asserted to the millisecond or so, on tokio's clock.

use super::*;

pub(super) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Asserts `times` are `expected` (seconds), give or take the timer's millisecond.
#[track_caller]
fn assert_times(times: &[Duration], expected: &[u64]) {
    let close = times.len() == expected.len()
        && times
            .iter()
            .zip(expected)
            .all(|(t, e)| t.abs_diff(secs(*e)) <= Duration::from_millis(5));
    assert!(close, "calls at {times:?}, expected at {expected:?} s");
}

/// Waits (on paused time, so at no real cost) until `done`, for at most an hour.
pub(super) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + secs(3600);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within an hour");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops the refresher and checks it ended cleanly (a panic in it, such as an unscripted call, fails the test).
pub(super) async fn stop(stop: Shutdown, refresher: JoinHandle<()>) {
    stop.start();
    refresher.await.expect("the refresher panicked");
}

/// The gaps between successive calls.
fn gaps(times: &[Duration]) -> Vec<Duration> {
    times.windows(2).map(|w| w[1] - w[0]).collect()
}

#[tokio::test(start_paused = true)]
async fn the_refresher_logs_in_at_start_and_renews_at_exp_minus_margin_or_75_percent_whichever_comes_first() {
    // Tokens that live 60 s, and when each margin has them renewed.
    for (margin, renew_every) in [
        (5, 45),   // 75% of the lifetime comes first
        (20, 40),  // exp - margin comes first
        (300, 15), // a margin longer than the lifetime: a quarter of it, never a spin
    ] {
        let rig = Rig::new(secs(margin), secs(10));
        rig.zapsign.then_times(3, || lives(secs(60)));
        let (switch, refresher) = rig.start();
        tokio::time::sleep(secs(2 * renew_every) + Duration::from_millis(500)).await;
        assert_eq!(
            rig.zapsign.calls(),
            ["login", "refresh", "refresh"],
            "margin {margin} s"
        );
        assert_times(&rig.zapsign.times(), &[0, renew_every, 2 * renew_every]);
        assert!(rig.injected().is_some(), "a renewal left a gap without a token");
        stop(switch, refresher).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_refresh_token_is_used_while_alive_and_a_login_follows_when_it_is_dead() {
    // Access tokens live 60 s (renewed at 45 s); the refresh token from a login lives 100 s, and a refresh hands
    // out no new one.
    let rig = Rig::new(secs(5), secs(10));
    rig.zapsign.then_times(5, || Next::Issue {
        access: secs(60),
        refresh: secs(100),
    });
    let (switch, refresher) = rig.start();
    tokio::time::sleep(secs(181)).await;
    let log = rig.zapsign.log();
    let what: Vec<(&str, &str)> = log.iter().map(|c| (c.kind, c.with.as_str())).collect();
    assert_eq!(
        what,
        [
            ("login", "u"),
            ("refresh", "call 1"),
            ("refresh", "call 1"), // at 90 s the refresh token (dead at 100 s) is still alive
            ("login", "u"),        // at 135 s it is dead: no refresh call is wasted on it
            ("refresh", "call 4"),
        ]
    );
    assert_times(&rig.zapsign.times(), &[0, 45, 90, 135, 180]);
    stop(switch, refresher).await;
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_with_gaps_that_never_shrink_callers_get_503_and_success_resets_the_backoff() {
    let rig = Rig::new(secs(5), secs(10));
    rig.zapsign.then_times(6, || Next::Fail(AuthError::RateLimited));
    rig.zapsign.then(lives(secs(60)));
    rig.zapsign.then(Next::Fail(server_error()));
    rig.zapsign.then(lives(secs(60)));
    let (switch, refresher) = rig.start();

    tokio::time::sleep(Duration::from_millis(100)).await;
    match rig.holder.bearer(Instant::now()) {
        Err(TokenUnavailable { reason, retry_after }) => {
            assert!(reason.contains("rate-limited"), "{reason}");
            assert!((secs(1)..=secs(300)).contains(&retry_after), "{retry_after:?}");
        }
        other => panic!("a caller during the backoff got {other:?}"),
    }

    until("a login after six refusals", || rig.zapsign.calls().len() == 7).await;
    assert!(rig.injected().is_some());
    let backoff = gaps(&rig.zapsign.times());
    for (k, gap) in backoff.iter().enumerate() {
        // Equal jitter on a step that doubles from 1 s: half the step, up to the whole step.
        let step = secs(1 << k);
        assert!(
            *gap >= step / 2 && *gap <= step + Duration::from_millis(5),
            "gap {k} out of [{:?}, {step:?}]: {backoff:?}",
            step / 2
        );
    }
    for pair in backoff.windows(2) {
        assert!(pair[1] >= pair[0], "gaps shrank: {backoff:?}");
    }

    // After the success the backoff starts over: a failed refresh is retried within the first step again.
    until("the refresh after a failed one", || rig.zapsign.calls().len() == 9).await;
    assert_eq!(&rig.zapsign.calls()[6..], ["login", "refresh", "refresh"]);
    let retry = gaps(&rig.zapsign.times())[7];
    assert!(
        retry <= secs(1) + Duration::from_millis(5),
        "backoff not reset: {retry:?}"
    );
    stop(switch, refresher).await;
}

#[tokio::test(start_paused = true)]
async fn bad_credentials_back_off_slower_than_other_failures() {
    let rig = rig();
    rig.zapsign.then_times(10, || Next::Fail(bad_credentials()));
    let (switch, refresher) = rig.start();
    tokio::time::sleep(secs(16)).await;
    let times = rig.zapsign.times();
    let first = times.iter().filter(|t| **t < secs(8)).count();
    let second = times.len() - first;
    assert!(
        (1..=4).contains(&first),
        "{first} login attempts in the first 8 s: {times:?}"
    );
    assert!(
        second < first,
        "attempts did not slow down: {first} then {second}: {times:?}"
    );
    // The first retry waits at least 1 s (other failures: from half a second).
    assert!(gaps(&times)[0] >= secs(1), "{times:?}");
    match rig.holder.readiness(Instant::now()) {
        crate::auth::holder::Readiness::NotReady(u) => assert!(u.reason.contains("auth.username"), "{}", u.reason),
        ready => panic!("{ready:?}"),
    }
    stop(switch, refresher).await;
}

#[tokio::test(start_paused = true)]
async fn the_refresher_is_woken_to_retry_after_a_failed_request_triggered_renewal() {
    // An hour-long token: the refresher sleeps until its renewal, 55 minutes away.
    let rig = rig();
    rig.zapsign.then(token());
    let (switch, refresher) = rig.start();
    tokio::time::sleep(secs(10)).await;
    let first = rig.injected().expect("logged in at start");

    // ZapSign refuses the token and the renewal the request triggers fails.
    rig.zapsign.then(Next::Fail(server_error()));
    rig.zapsign.then(token());
    assert!(is_unavailable(&rig.renewer.renew(Trigger::Rejected(first)).await));
    assert_eq!(rig.injected(), None);

    // The refresher retries after the backoff, not at the old token's renewal time.
    tokio::time::sleep(secs(2)).await;
    assert_eq!(rig.zapsign.calls(), ["login", "refresh", "refresh"]);
    let retry = gaps(&rig.zapsign.times())[1];
    assert!(retry <= secs(1) + Duration::from_millis(5), "retried after {retry:?}");
    assert!(rig.injected().is_some_and(|g| g > first));
    stop(switch, refresher).await;
}

#[tokio::test(start_paused = true)]
async fn new_credentials_log_in_at_once_without_waiting_out_a_backoff() {
    let rig = rig();
    rig.zapsign.then(token());
    let (switch, refresher) = rig.start();
    tokio::time::sleep(secs(10)).await;
    let first = rig.injected().expect("logged in at start");

    // A reload with a valid token and a live refresh token held: log in with the new credentials at once.
    rig.zapsign.then(token());
    rig.renewer.set_credentials(credentials("v")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = rig.zapsign.log();
    assert_eq!((log[1].kind, log[1].with.as_str()), ("login", "v"));
    assert_times(&[log[1].at], &[10]);
    assert!(rig.injected().is_some_and(|g| g > first));

    // Logins refused four times: the next attempt is 8 s or more away.
    rig.zapsign.then_times(4, || Next::Fail(bad_credentials()));
    rig.renewer.set_credentials(credentials("w")).await;
    until("four refused logins", || rig.zapsign.calls().len() == 6).await;
    // Fixed credentials are tried at once, not after the backoff.
    rig.zapsign.then(token());
    let reload_at = rig.zapsign.elapsed();
    rig.renewer.set_credentials(credentials("x")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = rig.zapsign.log();
    assert_eq!(log.len(), 7, "{log:?}");
    assert_eq!((log[6].kind, log[6].with.as_str()), ("login", "x"));
    assert!(log[6].at - reload_at <= Duration::from_millis(5), "{log:?}");
    stop(switch, refresher).await;
}

#[tokio::test(start_paused = true)]
async fn the_refresher_stops_on_shutdown() {
    let rig = Rig::new(secs(5), secs(10));
    rig.zapsign.then(lives(secs(60)));
    let (switch, refresher) = rig.start();
    tokio::time::sleep(secs(1)).await;
    assert_eq!(rig.zapsign.calls(), ["login"]);
    switch.start();
    tokio::time::timeout(Duration::from_millis(10), refresher)
        .await
        .expect("the refresher outlived the shutdown")
        .expect("the refresher panicked");
    tokio::time::sleep(secs(3600)).await;
    assert_eq!(rig.zapsign.calls(), ["login"], "an auth call after shutdown");
}
