//! Issue 3: the token lifecycle against the mock, asserting on the mock's counters: callers never see an
//! authentication failure across rotations, renewals are single-flight, failures back off.
//!
//! One end-to-end test per rule. The renewer's timing rules in detail (schedule, refresh or login, backoff
//! gaps, reload, shutdown) are unit-tested on tokio's paused clock in `src/auth/renewer/tests/`, in
//! milliseconds; wall-clock loops here are kept to what only the whole process can show.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use sha2::{Digest, Sha256};
use zapsign_proxy::mock::{MockConfig, MockZapSign};
use zapsign_proxy::secret::hex;

/// `callers` concurrent keep-alive callers sending GETs and small POSTs for `run_for`; returns (ok, not ok)
/// with the first few failures.
async fn load(addr: std::net::SocketAddr, callers: usize, run_for: Duration) -> (u64, Vec<String>) {
    let end = Instant::now() + run_for;
    let mut tasks = Vec::new();
    for c in 0..callers {
        tasks.push(tokio::spawn(async move {
            let mut caller = Caller::connect(addr).await;
            let (mut ok, mut failures) = (0u64, Vec::new());
            let mut i = 0u64;
            while Instant::now() < end {
                i += 1;
                let req = if i % 2 == 0 {
                    Request::get(format!("/api/v1/docs/?page={i}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap()
                } else {
                    let body = Bytes::from(format!("{{\"caller\":{c},\"n\":{i}}}"));
                    Request::post("/api/v1/docs/").body(Full::new(body)).unwrap()
                };
                let a = caller.send(req).await;
                if a.status.is_success() {
                    ok += 1;
                } else {
                    failures.push(format!("{} {:?}", a.status, a.body));
                }
                // Pace the callers: a few hundred requests a second in all is plenty to cross every rotation.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failures)
        }));
    }
    let (mut ok, mut failures) = (0, Vec::new());
    for t in tasks {
        let (o, f) = t.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    (ok, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_under_load_give_callers_no_failure_one_login_and_refreshes() {
    let mock_cfg = MockConfig {
        access_ttl: Duration::from_secs(6),
        ..MockConfig::default()
    };
    let h = Harness::start_jwt("refresh_margin = \"2s\"\n", mock_cfg, |_| {}).await;
    let (ok, failures) = load(h.addr, 8, Duration::from_secs(20)).await;
    assert_no_failures(ok, &failures);
    assert!(ok > 1000, "too few requests to prove anything: {ok}");
    let s = &h.mock.state;
    assert_eq!(s.logins.load(Ordering::SeqCst), 1, "exactly one login");
    let refreshes = s.refreshes.load(Ordering::SeqCst);
    assert!(refreshes >= 3, "only {refreshes} refreshes in 20 s of 6 s tokens");
    assert_eq!(
        s.unauthorized.load(Ordering::SeqCst),
        0,
        "a token reached the upstream after it expired"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn revoked_tokens_are_renewed_and_requests_replayed_unless_too_large() {
    let h = Harness::start_jwt("replay_buffer = \"64KiB\"\n", MockConfig::default(), |_| {}).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let s = h.mock.state.clone();

    s.revoke_all();
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_eq!(a.status, 200, "GET after revocation: {:?}", a.body);

    s.revoke_all();
    let body: Bytes = (0..4096u32).flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>().into();
    let req = Request::post("/api/v1/docs/").body(Full::new(body.clone())).unwrap();
    let a = send(h.addr, req).await;
    assert_eq!(a.status, 200, "small POST after revocation: {:?}", a.body);
    assert_eq!(a.json()["body_len"], body.len());
    assert_eq!(a.json()["body_sha256"], hex(&Sha256::digest(&body)));
    assert_eq!(
        s.unauthorized.load(Ordering::SeqCst),
        2,
        "each revocation cost exactly one upstream 401"
    );
    assert_eq!(
        s.logins.load(Ordering::SeqCst),
        3,
        "revoked refresh tokens fell back to login"
    );

    s.revoke_all();
    let big = Bytes::from(vec![7u8; 256 * 1024]);
    let req = Request::post("/api/v1/docs/").body(Full::new(big)).unwrap();
    let a = send(h.addr, req).await;
    assert_eq!(
        a.status, 401,
        "a body over replay_buffer cannot be replayed: the 401 passes through"
    );
    assert!(
        a.headers.get("x-zapsign-proxy-error").is_none(),
        "it is ZapSign's 401, not ours"
    );
    // The background renewal makes the next request work.
    let renewed = wait_until(Duration::from_secs(5), || s.logins.load(Ordering::SeqCst) == 4).await;
    assert!(renewed, "no renewal after the passed-through 401");
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let metrics = send(h.admin, get(h.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("zapsign_proxy_unauthorized_replays_total 2"), "{text}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_meeting_an_expired_token_cause_one_renewal() {
    // HTTP/2 on both sides keeps this to two connections however many requests run at once.
    let (mock, _dir, ca_file) = tls_mock(MockConfig::default()).await;
    let url = mock.url();
    let text = format!("{}[upstream]\nca_file = \"{}\"\n", jwt_config(""), ca_file.display());
    let h = Harness::start_with(mock, &text, &url).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let s = h.mock.state.clone();
    let renewal_calls = || s.login_attempts.load(Ordering::SeqCst) + s.refresh_attempts.load(Ordering::SeqCst);
    let before = renewal_calls();

    s.expire_access_tokens();
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut sender = sender.clone();
        let uri = format!("http://{}/api/v1/docs/?n={i}", h.addr);
        tasks.push(tokio::spawn(async move {
            let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
            sender.send_request(req).await.map(|r| r.status().as_u16()).unwrap_or(0)
        }));
    }
    let mut statuses = std::collections::BTreeMap::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(statuses.get(&200), Some(&1000), "statuses: {statuses:?}");
    assert_eq!(renewal_calls() - before, 1, "renewals were not single-flight");
    h.shutdown().await;
}

#[tokio::test]
async fn rate_limited_logins_back_off_with_growing_gaps_and_callers_get_503_meanwhile() {
    let h = Harness::start_jwt("", MockConfig::default(), |s| {
        s.rate_limited_logins.store(3, Ordering::SeqCst);
    })
    .await;
    let start = Instant::now();
    let mut saw_503 = false;
    while start.elapsed() < Duration::from_secs(30) {
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        if a.status == 200 {
            break;
        }
        assert_proxy_error(&a, 503, "token_unavailable");
        let retry_after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=300).contains(&retry_after), "Retry-After {retry_after}");
        saw_503 = true;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(saw_503, "callers were never told to wait");
    assert!(
        h.wait_ready(Duration::from_secs(1)).await,
        "not ready within 30 s of start"
    );
    let times = h.mock.state.login_attempt_times();
    assert_eq!(times.len(), 4, "3 rate-limited attempts and 1 success");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] + Duration::from_millis(50) >= pair[0], "gaps shrank: {gaps:?}");
    }
    assert!(gaps[0] >= Duration::from_millis(400), "retried too fast: {gaps:?}");
    h.shutdown().await;
}

#[tokio::test]
async fn static_mode_never_calls_the_login_endpoint() {
    let h = Harness::start_static("", MockConfig::default()).await;
    for _ in 0..5 {
        assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    }
    assert_eq!(h.mock.state.login_attempts.load(Ordering::SeqCst), 0);
    assert_eq!(h.mock.state.refresh_attempts.load(Ordering::SeqCst), 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_keeps_the_process_up_not_ready_slow_and_silent() {
    const PASSWORD: &str = "WRONG-PASSWORD-7f3a9c";
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = format!(
        "[upstream]\nurl = \"{}\"\n[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword_file = \"PWFILE\"\n[log]\nformat = \"json\"\n",
        mock.url(),
        zapsign_proxy::mock::DEMO_ORGANIZATION_ID,
        zapsign_proxy::mock::DEMO_USERNAME,
    );
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).unwrap();
    let text = text.replace("PWFILE", &pw.display().to_string());
    let started = Instant::now();
    let mut proxy = Subprocess::start(&text, &[("RUST_LOG", "trace")]);
    let admin = proxy.admin.expect("admin listener");
    // Up to the first retry of the refused login. How the attempts keep slowing down over minutes is unit-tested
    // on paused time (`bad_credentials_back_off_slower_than_other_failures` in src/auth/renewer/tests/).
    loop {
        let ready = send(admin, get(admin, "/readyz")).await;
        assert_eq!(ready.status, 503, "ready with a wrong password?");
        assert!(proxy.child.try_wait().unwrap().is_none(), "the process died");
        if mock.state.login_attempt_times().len() >= 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(16),
            "no second login attempt within 16 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let times = mock.state.login_attempt_times();
    // Bad credentials wait at least 1 s before the first retry (other failures: from 500 ms).
    assert!(
        times[1] - times[0] >= Duration::from_millis(950),
        "the refused login was retried after {:?}",
        times[1] - times[0]
    );
    assert_eq!(mock.state.last_login_password().as_deref(), Some(PASSWORD));
    let readyz = send(admin, get(admin, "/readyz")).await.json();
    assert!(readyz["reason"].as_str().unwrap().contains("auth.username"), "{readyz}");

    let logs = proxy.stop_and_logs().await;
    assert!(logs.lines().count() > 10, "{logs}");
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(PASSWORD)).collect();
    assert!(leaks.is_empty(), "the password reached the logs: {leaks:#?}");
    assert!(
        logs.lines()
            .any(|l| l.contains("rejected the login") && l.contains(zapsign_proxy::mock::DEMO_USERNAME)),
        "no log line says which login failed"
    );
}

/// Issue 9, fault 2: a scheduled refresh fails (logins rate-limited), so a backoff is open while the old token is
/// still held; then ZapSign revokes it. The request it refuses must not be replayed with it, and no later
/// request may carry it: the caller gets 503 `token_unavailable` with `Retry-After`, never a second 401.
#[tokio::test]
async fn a_token_refused_during_a_backoff_is_never_replayed_nor_sent_again() {
    // Tokens live 10 s and are renewed 8 s before expiry: the scheduled refresh comes about 2 s after login.
    let mock_cfg = MockConfig {
        access_ttl: Duration::from_secs(10),
        ..MockConfig::default()
    };
    let h = Harness::start_jwt("refresh_margin = \"8s\"\n", mock_cfg, |_| {}).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let s = h.mock.state.clone();
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    let refused = s
        .records()
        .last()
        .and_then(|r| r.header("authorization").map(str::to_owned))
        .unwrap();
    let sent_with_refused = || {
        s.records()
            .iter()
            .filter(|r| r.header("authorization") == Some(refused.as_str()))
            .count()
    };

    // ZapSign throttles logins and revokes every token: the scheduled refresh is refused, the fallback login
    // rate-limited, and the renewer backs off while still holding the (now revoked) access token.
    s.rate_limited_logins.store(1000, Ordering::SeqCst);
    s.revoke_all();
    let backing_off = wait_until(Duration::from_secs(10), || {
        s.refresh_attempts.load(Ordering::SeqCst) >= 1 && s.login_attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(backing_off, "the scheduled refresh never ran");
    assert_eq!(sent_with_refused(), 1);

    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&a, 503, "token_unavailable");
    let retry_after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(sent_with_refused(), 2, "the refused token was replayed");
    assert_eq!(s.unauthorized.load(Ordering::SeqCst), 1);

    // Later requests are not sent with it either (nor at all, while no token can be had).
    let api_calls = s.api_calls.load(Ordering::SeqCst);
    for _ in 0..3 {
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        assert_proxy_error(&a, 503, "token_unavailable");
    }
    assert_eq!(
        s.api_calls.load(Ordering::SeqCst),
        api_calls,
        "a request went upstream without a token"
    );
    assert_eq!(sent_with_refused(), 2);

    // Logins allowed again: the proxy recovers by itself with a new token.
    s.rate_limited_logins.store(0, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(20);
    let recovered = loop {
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        if a.status == 200 || Instant::now() > end {
            break a;
        }
        assert_proxy_error(&a, 503, "token_unavailable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(recovered.status, 200, "{:?}", recovered.body);
    assert_eq!(sent_with_refused(), 2);
    assert_eq!(
        s.unauthorized.load(Ordering::SeqCst),
        1,
        "the refused token reached ZapSign again"
    );
    let metrics = send(h.admin, get(h.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("zapsign_proxy_unauthorized_replays_total 0"), "{text}");
    h.shutdown().await;
}

/// Issue 9, fault 4: a login that hangs is abandoned after `auth.timeout`, not after
/// `upstream.response_timeout` (120 s), and counted as a failed renewal; a request waiting on it gets a 503 that
/// names the timeout.
#[tokio::test]
async fn a_login_hanging_past_auth_timeout_is_abandoned_and_counted_as_an_error() {
    let h = Harness::start_jwt("timeout = \"1s\"\n", MockConfig::default(), |s| {
        s.login_delay_ms.store(60_000, Ordering::SeqCst);
    })
    .await;
    let s = h.mock.state.clone();
    assert!(wait_until(Duration::from_secs(5), || s.login_attempts.load(Ordering::SeqCst) >= 1).await);
    let start = Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(10), send(h.addr, get(h.addr, "/api/v1/docs/")))
        .await
        .expect("the request waited on the hung login for more than 10 s");
    let waited = start.elapsed();
    assert!(waited < Duration::from_millis(2500), "waited {waited:?}");
    assert_proxy_error(&a, 503, "token_unavailable");
    let message = a.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("auth.timeout"), "{message}");
    let metrics = send(h.admin, get(h.admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        !text.contains("zapsign_proxy_token_renewals_total{kind=\"login\",result=\"error\"} 0"),
        "the abandoned login was not counted as an error:\n{text}"
    );
    assert_eq!(s.logins.load(Ordering::SeqCst), 0);

    s.login_delay_ms.store(0, Ordering::SeqCst);
    assert!(
        h.wait_ready(Duration::from_secs(10)).await,
        "no recovery once logins answer"
    );
    h.shutdown().await;
}

/// Issue 9, fault 4: after an upstream 401 the proxy waits for the request body to come back before replaying;
/// a caller that stalls mid-upload holds that wait for `auth.timeout` at most (not `upstream.response_timeout`),
/// then the 401 is passed on.
#[tokio::test]
async fn the_wait_for_a_body_to_replay_is_bounded_by_auth_timeout() {
    use common::raw_upstream::RawUpstream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const REFUSED: &[u8] =
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
    // ZapSign answers 401 as soon as it has the head, before the body.
    let up = RawUpstream::start(|mut conn| async move {
        if conn.read_head_recorded().await.is_some() {
            let _ = conn.write(REFUSED).await;
            conn.until_closed().await;
        }
    })
    .await;
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = jwt_config(&format!(
        "url = \"{}\"\ntimeout = \"1s\"\n[upstream]\nresponse_timeout = \"60s\"\n",
        mock.url()
    ));
    let h = Harness::start_with(mock, &text, &up.url()).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await);

    // The caller announces 1000 bytes, sends 10, and stalls.
    let mut stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(b"POST /api/v1/docs/ HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let start = Instant::now();
    let mut head = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let waited = start.elapsed();
    assert!(
        read.is_ok(),
        "no answer within 10 s: the body wait is not bounded by auth.timeout"
    );
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert!(waited < Duration::from_millis(2500), "answered after {waited:?}");
    assert_eq!(up.requests().len(), 1, "nothing may be replayed without the whole body");
    drop(stream);
    h.shutdown().await;
}
