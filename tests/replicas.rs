//! Several proxy processes sharing one ZapSign account through one real redis-server (Debian's package): one
//! login for all of them, one pacing budget, no secret in Redis, and no failed request while Redis goes away and
//! comes back. Each process is the real binary (`Subprocess`); the mock ZapSign runs in the test and records
//! every login, refresh and API request.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use common::redis::Redis;
use common::*;
use tokio::sync::Mutex;
use zapsign_proxy::mock::{max_in_any_period, MockConfig, MockZapSign, DEMO_PASSWORD};

/// One test at a time: each runs three proxy processes and a Redis under load on 2 cores, and the timing checks
/// (the budget at the mock, failover within 5 s) measure the proxy, not the other tests' load.
static SERIAL: Mutex<()> = Mutex::const_new(());

const KEY: &str = "7f3a9c0b1d2e4f5061728394a5b6c7d8e9f0112233445566778899aabbccddee";

/// The `[shared]` section for `redis`, with `replicas` processes.
fn shared(redis: &Redis, replicas: u32) -> String {
    format!("[shared]\nredis_url = \"{}\"\nreplicas = {replicas}\n", redis.url())
}

/// JWT mode against `mock`, JSON logs, `extra` sections appended.
fn jwt(mock: &MockZapSign, auth_extra: &str, extra: &str) -> String {
    use zapsign_proxy::mock::{DEMO_ORGANIZATION_ID, DEMO_USERNAME};
    format!(
        "[upstream]\nurl = \"{}\"\n[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\n\
         password = \"{DEMO_PASSWORD}\"\n{auth_extra}\n[log]\nformat = \"json\"\n{extra}",
        mock.url()
    )
}

/// Starts `n` processes of `text` with the shared key (and `env`) in the environment.
fn processes(n: usize, text: &str, env: &[(&str, &str)]) -> Vec<Subprocess> {
    let mut all = vec![("ZAPSIGN_PROXY_SHARED_KEY", KEY)];
    all.extend_from_slice(env);
    (0..n).map(|_| Subprocess::start(text, &all)).collect()
}

/// `zapsign_proxy_shared_state_up` of one process, if shown.
async fn shared_state_up(p: &Subprocess) -> Option<u64> {
    let admin = p.admin.expect("admin listener");
    let text = String::from_utf8_lossy(&send(admin, get(admin, "/metrics")).await.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("zapsign_proxy_shared_state_up "))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls until every process shows `zapsign_proxy_shared_state_up` = `want`; returns how long that took.
async fn all_shared_state(ps: &[Subprocess], want: u64, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        let mut all = true;
        for p in ps {
            all &= shared_state_up(p).await == Some(want);
        }
        if all {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Waits until each process answers `/readyz` with 200.
async fn all_ready(ps: &[Subprocess]) {
    for p in ps {
        let admin = p.admin.expect("admin listener");
        let end = Instant::now() + Duration::from_secs(15);
        while send(admin, get(admin, "/readyz")).await.status != 200 {
            assert!(Instant::now() < end, "a process never became ready: {}", p.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Outcomes of a load run: answers by status, and each failure's text.
#[derive(Default)]
struct Outcome {
    ok: u64,
    failures: Vec<String>,
}

/// `workers` tasks, each sending `GET /api/v1/docs/` to the processes in turn with `gap` between its requests,
/// until `stop` is set.
fn load(
    addrs: Vec<std::net::SocketAddr>,
    workers: usize,
    gap: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<Mutex<Outcome>>, Vec<tokio::task::JoinHandle<()>>) {
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let tasks = (0..workers)
        .map(|w| {
            let (addrs, stop, outcome) = (addrs.clone(), stop.clone(), outcome.clone());
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let addr = addrs[n % addrs.len()];
                    n += 1;
                    let a = send(addr, get(addr, "/api/v1/docs/")).await;
                    let mut o = outcome.lock().await;
                    if a.status.is_success() {
                        o.ok += 1;
                    } else {
                        o.failures
                            .push(format!("{addr}: {} {}", a.status, String::from_utf8_lossy(&a.body)));
                    }
                    drop(o);
                    tokio::time::sleep(gap).await;
                }
            })
        })
        .collect();
    (outcome, tasks)
}

/// Every key and string value in `redis`, for the no-secret check.
async fn everything_in(redis: &Redis) -> Vec<(String, Vec<u8>, i64)> {
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    let mut out = Vec::new();
    for k in keys {
        let value: Vec<u8> = conn.get(&k).await.unwrap_or_default();
        let ttl: i64 = conn.pttl(&k).await.unwrap();
        out.push((k, value, ttl));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_share_one_login_and_its_refreshes_and_redis_holds_no_secret() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = MockZapSign::start(MockConfig {
        access_ttl: Duration::from_secs(6),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let ps = processes(3, &jwt(&mock, "refresh_margin = \"2s\"", &shared(&redis, 3)), &[]);
    all_ready(&ps).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (outcome, tasks) = load(
        ps.iter().map(|p| p.addr).collect(),
        3,
        Duration::from_millis(20),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let outcome = outcome.lock().await;
    assert_no_failures(outcome.ok, &outcome.failures);

    let logins = mock.state.login_attempts.load(Ordering::Relaxed);
    let refreshes = mock.state.refresh_attempts.load(Ordering::Relaxed);
    // One process alone renews a 6 s token 2 s before expiry: every ~4 s, so about 5 times in 20 s. Three
    // processes each on their own would log in 3 times and refresh about 15 times.
    assert_eq!(logins, 1, "one login for all processes");
    assert!(
        (2..=7).contains(&refreshes),
        "the refreshes of one process, not of three: {refreshes}"
    );
    eprintln!(
        "three processes, 6 s tokens, 20 s of load: {logins} login(s), {refreshes} refreshes, {} requests, none failed",
        outcome.ok
    );

    let mut secrets: Vec<String> = mock.state.issued_tokens();
    secrets.push(DEMO_PASSWORD.to_owned());
    // The signature part of each JWT too: a token cut into pieces is still a token.
    let parts: Vec<String> = secrets
        .iter()
        .filter_map(|t| t.rsplit('.').next().filter(|s| s.len() >= 16).map(str::to_owned))
        .collect();
    let stored = everything_in(&redis).await;
    assert!(stored.iter().any(|(k, _, _)| k.ends_with(":token")), "{stored:?}");
    for (k, value, ttl) in &stored {
        assert!(*ttl > 0, "{k} has no TTL");
        let text = String::from_utf8_lossy(value);
        for s in secrets.iter().chain(&parts) {
            assert!(
                !text.contains(s.as_str()) && !k.contains(s.as_str()),
                "{k} holds a secret in the clear"
            );
        }
    }
    for p in ps {
        let logs = p.stop_and_logs().await;
        for s in &secrets {
            assert!(!logs.contains(s.as_str()), "a secret in the logs");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_spend_one_pacing_budget_under_overload() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let (limit, period) = (20u32, Duration::from_secs(1));
    let text = static_config(
        &mock.url(),
        &format!(
            "[pacing]\nlimit = {limit}\nperiod = \"1s\"\nmax_wait = \"15s\"\n{}",
            // One replica's worth of fallback: alone, each process would send the whole limit, so only the
            // shared budget keeps the three within it.
            shared(&redis, 1)
        ),
    );
    let ps = processes(3, &text, &[("ZAPSIGN_PROXY_PACING_LIMIT", &limit.to_string())]);
    all_ready(&ps).await;
    // One request through each first, then a period's rest, so no process's first request waits for a new
    // upstream connection inside the measured burst (a late arrival squeezes the next period at the mock).
    for p in &ps {
        assert_eq!(send(p.addr, get(p.addr, "/api/v1/docs/")).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Six times the limit at once, spread over the three processes: each alone would send its own limit a
    // period, three times the account's.
    let started = Instant::now();
    let calls: Vec<_> = (0..6 * limit as usize)
        .map(|i| {
            let addr = ps[i % 3].addr;
            tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await })
        })
        .collect();
    let mut ok = 0;
    let mut failures = Vec::new();
    for c in calls {
        let a = c.await.unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            failures.push(format!("{} {}", a.status, String::from_utf8_lossy(&a.body)));
        }
    }
    assert_no_failures(ok, &failures);
    let arrivals = mock.state.api_arrivals();
    let max = max_in_any_period(&arrivals, period, false);
    assert!(
        max <= limit as usize,
        "{max} requests reached ZapSign within one period (limit {limit}); all sent in {:?}",
        started.elapsed()
    );
    assert_eq!(arrivals.len(), 6 * limit as usize + 3);
    assert!(
        all_shared_state(&ps, 1, Duration::from_secs(1)).await.is_some(),
        "every process shared the budget"
    );
    eprintln!(
        "three processes, limit {limit} per {period:?}: max {max} requests at the mock in any sliding period; {} sent in {:?}",
        arrivals.len(),
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_and_coming_back_under_load_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start();
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let limit = 60u32;
    let text = jwt(
        &mock,
        "",
        &format!(
            "[pacing]\nlimit = {limit}\nperiod = \"1s\"\nmax_wait = \"15s\"\n{}",
            shared(&redis, 3)
        ),
    );
    let ps = processes(3, &text, &[("ZAPSIGN_PROXY_PACING_LIMIT", &limit.to_string())]);
    all_ready(&ps).await;
    assert!(all_shared_state(&ps, 1, Duration::from_secs(5)).await.is_some());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (outcome, tasks) = load(
        ps.iter().map(|p| p.addr).collect(),
        4,
        Duration::from_millis(100),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    tokio::task::block_in_place(|| redis.stop());
    let lost = all_shared_state(&ps, 0, Duration::from_secs(5)).await;
    assert!(
        lost.is_some(),
        "shared_state_up did not go to 0 within 5 s of Redis going away"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    tokio::task::block_in_place(|| redis.start_again());
    let back = all_shared_state(&ps, 1, Duration::from_secs(5)).await;
    assert!(
        back.is_some(),
        "shared_state_up did not go back to 1 within 5 s of Redis returning"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let outcome = outcome.lock().await;
    assert_no_failures(outcome.ok, &outcome.failures);
    eprintln!(
        "shared_state_up 0 after {:?}, 1 after {:?}; {} requests, none failed",
        lost.unwrap_or_default(),
        back.unwrap_or_default(),
        outcome.ok
    );
    // While alone each process may have logged in once; never more.
    assert!(mock.state.login_attempts.load(Ordering::Relaxed) <= 3);
}

/// The shared path's cost in Redis: with budget to spare, each request is one script call (one round trip);
/// the watcher's pings are the only other traffic. Counted by Redis itself (`INFO commandstats`, where the
/// commands a script runs inside Redis, `TIME`, `GET`, `SET`, count too but cost no round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_budget_costs_one_redis_round_trip_per_request() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = static_config(
        &mock.url(),
        &format!("[pacing]\nlimit = 100000\nperiod = \"1s\"\n{}", shared(&redis, 1)),
    );
    let ps = processes(1, &text, &[("ZAPSIGN_PROXY_PACING_LIMIT", "100000")]);
    all_ready(&ps).await;
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    async fn calls(conn: &mut ::redis::aio::MultiplexedConnection) -> (u64, u64) {
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        let mut total = 0;
        let mut pings = 0;
        for line in info.lines().filter(|l| l.starts_with("cmdstat_")) {
            let n: u64 = line
                .split("calls=")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let name = line.trim_start_matches("cmdstat_").split(':').next().unwrap_or("");
            match name {
                "ping" => pings += n,
                // Run by the scripts inside Redis (static mode has no token calls).
                "info" | "time" | "get" | "set" => {}
                _ => total += n,
            }
        }
        (total, pings)
    }
    // One request first, so the script is loaded (a first EVALSHA may be answered NOSCRIPT and sent as EVAL).
    assert_eq!(send(ps[0].addr, get(ps[0].addr, "/api/v1/docs/")).await.status, 200);
    let (before, _) = calls(&mut conn).await;
    let n = 200;
    for _ in 0..n {
        assert_eq!(send(ps[0].addr, get(ps[0].addr, "/api/v1/docs/")).await.status, 200);
    }
    let (after, _) = calls(&mut conn).await;
    let per_request = (after - before) as f64 / n as f64;
    eprintln!(
        "shared pacing: {per_request:.2} Redis round trips per request ({} for {n})",
        after - before
    );
    assert!(
        after - before <= n as u64,
        "more than one Redis round trip per request: {} commands for {n} requests",
        after - before
    );
    assert!(
        after - before >= n as u64,
        "the requests did not go through the shared budget"
    );
}
