//! Pacing end to end, on the wall clock, with short periods (the rules themselves are proved on paused time in
//! `src/pacing/tests.rs`): what the mock ZapSign receives stays within the budget in every sliding period,
//! refusals send nothing, a second caller is served within two slots while one floods, a caller that goes away
//! sends nothing, and an upstream 429 stops all sending until its pause ends.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use zapsign_proxy::mock::{max_in_any_period, MockConfig};

/// `[pacing]` with `limit` per `period`, and the access section.
fn pacing(limit: u32, period: &str, max_wait: &str, queue_limit: usize) -> String {
    format!(
        "[pacing]\nlimit = {limit}\nperiod = \"{period}\"\nmax_wait = \"{max_wait}\"\nqueue_limit = {queue_limit}\n"
    )
}

/// `GET /api/v1/docs/` with a client key.
fn keyed_get(h: &Harness, key: &str) -> Request<Full<Bytes>> {
    Request::get("/api/v1/docs/")
        .header("host", h.addr.to_string())
        .header("proxy-authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `zapsign_proxy_pacing_queue_depth` as `/metrics` shows it.
async fn queue_depth(h: &Harness) -> u64 {
    let text = String::from_utf8_lossy(&send(h.admin, get(h.admin, "/metrics")).await.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("zapsign_proxy_pacing_queue_depth "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Polls `queue_depth` until `check` holds or `deadline` passes.
async fn wait_depth(h: &Harness, deadline: Duration, check: impl Fn(u64) -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check(queue_depth(h).await) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_three_limits_is_all_served_and_never_more_than_the_limit_in_any_period() {
    let limit = 20;
    let h = Harness::start_static(&pacing(limit, "1s", "10s", 1000), MockConfig::default()).await;
    // One request first, then a period's rest: the burst's first request would otherwise be the only one that
    // waits for a new upstream connection, and arrive late enough at the mock to squeeze the next period.
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..3 * limit)
        .map(|_| {
            let addr = h.addr;
            tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await.status.as_u16() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let arrivals = h.mock.state.api_arrivals();
    assert_eq!(arrivals.len(), 3 * limit as usize + 1);
    let max = max_in_any_period(&arrivals, Duration::from_secs(1), false);
    println!(
        "burst of {}: max {max} requests in any 1 s at the mock (limit {limit}); all served in {:?}",
        3 * limit,
        started.elapsed()
    );
    assert!(max <= limit as usize, "{max} requests in one period, limit {limit}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_slot_within_max_wait_is_429_rate_limited_and_sends_nothing() {
    // Slot: 500 ms; a wait of 200 ms at most.
    let h = Harness::start_static(&pacing(2, "1s", "200ms", 100), MockConfig::default()).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let refused = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&refused, 429, "rate_limited");
    let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "Retry-After {retry}");
    assert_eq!(
        h.mock.state.api_calls.load(Ordering::SeqCst),
        1,
        "the refused request reached the mock"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_429_rate_limited_at_once_and_sends_nothing() {
    let h = Harness::start_static(&pacing(2, "1s", "10s", 1), MockConfig::default()).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let addr = h.addr;
    let waiting = tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await.status.as_u16() });
    assert!(
        wait_depth(&h, Duration::from_secs(5), |d| d == 1).await,
        "the second request never queued"
    );
    let asked = Instant::now();
    let refused = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert!(
        asked.elapsed() < Duration::from_millis(300),
        "a full queue must refuse at once"
    );
    assert_proxy_error(&refused, 429, "rate_limited");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(
        h.mock.state.api_calls.load(Ordering::SeqCst),
        2,
        "the refused request reached the mock"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_caller_is_served_within_two_slots_while_one_floods() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "flooding-caller-key\nquiet-caller-key\n").unwrap();
    let limit = 20; // slot: 50 ms
    let text = format!(
        "[access]\nclient_keys_file = \"{}\"\n{}",
        keys.display(),
        pacing(limit, "1s", "10s", 1000)
    );
    let h = Harness::start_static(&text, MockConfig::default()).await;
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let req = keyed_get(&h, "flooding-caller-key");
            let addr = h.addr;
            tokio::spawn(async move { send(addr, req).await.status.as_u16() })
        })
        .collect();
    assert!(
        wait_depth(&h, Duration::from_secs(5), |d| d >= 20).await,
        "the flood never queued"
    );
    let asked = Instant::now();
    let quiet = send(h.addr, keyed_get(&h, "quiet-caller-key")).await;
    let took = asked.elapsed();
    assert_eq!(quiet.status, 200);
    let slot = Duration::from_secs(1) / limit;
    println!("quiet caller served in {took:?} while 40 requests of another caller waited (slot {slot:?})");
    // Two slots, plus the tolerance of a loaded 2-core machine (the flood alone would take 1 s and more).
    assert!(took < 2 * slot + Duration::from_millis(250), "took {took:?}");
    for call in flood {
        assert_eq!(call.await.unwrap(), 200);
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_caller_that_goes_away_sends_nothing() {
    let h = Harness::start_static(&pacing(2, "1s", "10s", 100), MockConfig::default()).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let addr = h.addr;
    let waiting = tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await });
    assert!(
        wait_depth(&h, Duration::from_secs(5), |d| d == 1).await,
        "the request never queued"
    );
    // The caller goes away: its connection closes with the task.
    waiting.abort();
    assert!(
        wait_depth(&h, Duration::from_secs(5), |d| d == 0).await,
        "the place was not freed"
    );
    // Well past the slot it would have had (500 ms): nothing more reached the mock.
    let state = h.mock.state.clone();
    let sent = wait_until(Duration::from_millis(1200), || {
        state.api_calls.load(Ordering::SeqCst) > 1
    })
    .await;
    assert!(!sent, "a request of a caller that went away was sent");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_stops_sending_until_the_window_ends_and_callers_see_no_error() {
    // Our budget (20 a second) is above the mock's (5 a wall-clock second): the mock answers 429 without
    // Retry-After, so the proxy pauses to the next period boundary, where the mock's window ends.
    let mock_cfg = MockConfig {
        api_rate_limit: 5,
        api_rate_window: Duration::from_secs(1),
        api_rate_retry_after: false,
        ..MockConfig::default()
    };
    let h = Harness::start_static(&pacing(20, "1s", "5s", 1000), mock_cfg).await;
    // Twelve: however they straddle a wall-clock second (two windows of at most five each), one window gets
    // more than five, so the mock answers 429 at least once (eight could split five and three).
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let addr = h.addr;
            tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await.status.as_u16() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200, "a caller saw the upstream's 429");
    }
    let arrivals = h.mock.state.api_arrivals();
    let limited: Vec<_> = arrivals.iter().filter(|a| a.limited).collect();
    assert!(
        !limited.is_empty(),
        "the mock never answered 429: the test proves nothing"
    );
    for refused in &limited {
        let since = refused.wall.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let window_end = refused.wall + (Duration::from_secs(1) - Duration::from_nanos(since.subsec_nanos().into()));
        // Requests already on the wire when the 429 was sent may land just after it; none is sent later.
        let learned = refused.wall + Duration::from_millis(20);
        let during = arrivals
            .iter()
            .filter(|a| a.wall > learned && a.wall < window_end)
            .count();
        assert_eq!(
            during, 0,
            "{during} requests reached the mock during the pause after a 429"
        );
    }
    println!(
        "{} of {} arrivals answered 429 by the mock; none during a pause",
        limited.len(),
        arrivals.len()
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_whose_pause_outlasts_max_wait_passes_on_unchanged_and_pauses_the_rest() {
    // One request an hour at the mock, with Retry-After to the hour's end: far beyond max_wait.
    let mock_cfg = MockConfig {
        api_rate_limit: 1,
        api_rate_window: Duration::from_secs(3600),
        ..MockConfig::default()
    };
    let h = Harness::start_static(&pacing(20, "1s", "1s", 1000), mock_cfg).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let upstream = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_eq!(upstream.status, 429);
    assert!(
        !upstream.headers.contains_key("x-zapsign-proxy-error"),
        "not ZapSign's 429 unchanged"
    );
    assert!(upstream.headers.contains_key("retry-after"));
    // The pause holds every later request: refused by the proxy, nothing sent.
    let paused = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&paused, 429, "rate_limited");
    assert_eq!(
        h.mock.state.api_arrivals().len(),
        2,
        "a request reached the mock during the pause"
    );
    h.shutdown().await;
}

/// On SIGTERM (here: the harness's shutdown), a request queued for a slot keeps its place through
/// `server.shutdown_grace`, then gets 503 `shutting_down` with `Retry-After` instead of a cut connection, and
/// nothing is sent for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_queued_when_the_grace_ends_gets_503_and_is_not_sent() {
    let text = format!("{}[server]\nshutdown_grace = \"1s\"\n", pacing(1, "60s", "30s", 100));
    let h = Harness::start_static(&text, MockConfig::default()).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let addr = h.addr;
    let queued = tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await });
    assert!(
        wait_depth(&h, Duration::from_secs(5), |d| d == 1).await,
        "the second request never queued"
    );
    let sent_before = h.mock.state.api_arrivals().len();
    let mock_state = h.mock.state.clone();
    let stopping = Instant::now();
    let shutdown = tokio::spawn(h.shutdown());
    let answer = queued.await.unwrap();
    let took = stopping.elapsed();
    assert_proxy_error(&answer, 503, "shutting_down");
    assert_eq!(answer.headers["retry-after"], "1");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}, not at the end of the 1 s grace"
    );
    shutdown.await.unwrap();
    assert_eq!(
        mock_state.api_arrivals().len(),
        sent_before,
        "the refused request was sent"
    );
}
