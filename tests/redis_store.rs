//! The shared store against a real redis-server: tokens sealed at rest with a TTL, generations from the Redis
//! counter, the renewal lock with its fence, the shared pacing budget on Redis's clock, and bounded calls while
//! Redis is away.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use redis::AsyncCommands;
use zapsign_proxy::pacing::gcra::Gcra;
use zapsign_proxy::secret::Secret;
use zapsign_proxy::shared::seal::SealKey;
use zapsign_proxy::shared::store::{RedisStore, StoreSettings, Unopenable};
use zapsign_proxy::sharing::TokenRecord;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const OTHER_KEY: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const ACCESS: &str = "eyJhbGciOiJIUzI1NiJ9.access-secret-part.sig";
const REFRESH: &str = "eyJhbGciOiJIUzI1NiJ9.refresh-secret-part.sig";

fn store(redis: &Redis, key: &str) -> RedisStore {
    RedisStore::new(StoreSettings {
        url: redis.url(),
        password: None,
        ca_pem: None,
        key: std::sync::Arc::new(SealKey::from_hex(key).unwrap()),
        prefix: "zapsign-proxy".into(),
        scope: "1234".into(),
        op_timeout: Duration::from_millis(500),
    })
    .unwrap()
}

fn record(access: &str, refresh: Option<&str>, exp: u64, refresh_exp: Option<u64>) -> TokenRecord {
    TokenRecord {
        access: Secret::new(access),
        refresh: refresh.map(Secret::new),
        access_expires_ms: exp,
        refresh_expires_ms: refresh_exp,
    }
}

async fn raw(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn tokens_are_sealed_at_rest_numbered_by_redis_and_expire() {
    let redis = Redis::start();
    let (a, b) = (store(&redis, KEY), store(&redis, KEY));
    assert_eq!(a.token().await.unwrap(), Ok(None));

    let fence = a.try_lock(Duration::from_secs(10)).await.unwrap().expect("free lock");
    assert!(
        b.try_lock(Duration::from_secs(10)).await.unwrap().is_none(),
        "one holder at a time"
    );
    let exp = 4_000_000_000_000;
    let g1 = a
        .publish(
            &fence,
            &record(ACCESS, Some(REFRESH), exp, Some(exp + 1)),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
        .await
        .unwrap()
        .expect("published under the lock");
    a.unlock(&fence).await.unwrap();

    // Another process reads the same token and generation.
    let seen = b.token().await.unwrap().unwrap().unwrap();
    assert_eq!(
        (
            seen.generation,
            seen.record.access.expose(),
            seen.record.access_expires_ms
        ),
        (g1, ACCESS, exp)
    );
    assert_eq!(seen.record.refresh.as_ref().map(|r| r.expose()), Some(REFRESH));

    // The next token, renewed by the other process, is newer everywhere.
    let fence = b
        .try_lock(Duration::from_secs(10))
        .await
        .unwrap()
        .expect("lock released by its owner");
    let g2 = b
        .publish(
            &fence,
            &record("second", None, exp, None),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
        .await
        .unwrap()
        .unwrap();
    assert!(g2 > g1);
    assert_eq!(a.token().await.unwrap().unwrap().unwrap().generation, g2);

    // Nothing in Redis holds a token in the clear, and every key has a TTL.
    let mut conn = raw(&redis).await;
    let keys: Vec<String> = conn.keys("*").await.unwrap();
    assert!(keys.iter().any(|k| k.ends_with(":token")), "{keys:?}");
    for k in &keys {
        let ttl: i64 = conn.pttl(k).await.unwrap();
        let value: Vec<u8> = conn.get(k).await.unwrap();
        let text = String::from_utf8_lossy(&value);
        for secret in [ACCESS, REFRESH, "access-secret", "refresh-secret", "second"] {
            assert!(!text.contains(secret), "{k} holds a secret in the clear");
        }
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test]
async fn a_lost_lock_stores_nothing_and_only_its_owner_releases_it() {
    let redis = Redis::start();
    let (a, b) = (store(&redis, KEY), store(&redis, KEY));
    let stale = a.try_lock(Duration::from_millis(100)).await.unwrap().unwrap();
    let mut conn = raw(&redis).await;
    // The lock expires (its TTL ran out); wait for it by polling, then b takes it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let fence = loop {
        if let Some(f) = b.try_lock(Duration::from_secs(10)).await.unwrap() {
            break f;
        }
        assert!(Instant::now() < deadline, "the lock never expired");
        tokio::task::yield_now().await;
    };
    a.unlock(&stale).await.unwrap();
    let holder: Option<String> = conn.get("zapsign-proxy:1234:lock").await.unwrap();
    assert!(holder.is_some(), "a stale owner must not release another's lock");
    let published = a
        .publish(
            &stale,
            &record("late", None, 1, None),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    assert_eq!(published, None);
    assert_eq!(a.token().await.unwrap(), Ok(None));
    b.unlock(&fence).await.unwrap();
}

#[tokio::test]
async fn a_token_sealed_with_another_key_counts_as_absent() {
    let redis = Redis::start();
    let a = store(&redis, KEY);
    let fence = a.try_lock(Duration::from_secs(10)).await.unwrap().unwrap();
    a.publish(
        &fence,
        &record(ACCESS, None, 1, None),
        Duration::from_secs(60),
        Duration::from_secs(3600),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(store(&redis, OTHER_KEY).token().await.unwrap(), Err(Unopenable));
}

#[tokio::test]
async fn the_shared_budget_holds_over_any_window_for_every_process() {
    let redis = Redis::start();
    let stores = [store(&redis, KEY), store(&redis, KEY), store(&redis, KEY)];
    let (limit, period) = (20, Duration::from_millis(1000));
    let gcra = Gcra::new(limit, period);
    let start = Instant::now();
    let mut grants = Vec::new();
    let mut refused_with_wait = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        for s in &stores {
            match s.acquire_slot(gcra.slot(), gcra.tolerance(), period).await.unwrap() {
                Ok(()) => grants.push(start.elapsed()),
                Err(wait) => {
                    assert!(wait <= period, "{wait:?}");
                    refused_with_wait += 1;
                }
            }
        }
    }
    assert!(refused_with_wait > 0);
    // Grants are timed here, after Redis decided: allow a little for the round trip.
    let slack = Duration::from_millis(5);
    for (i, g) in grants.iter().enumerate() {
        let within = grants[i..].iter().take_while(|h| **h - *g < period - slack).count();
        assert!(within <= limit as usize, "{within} grants within one period from {g:?}");
    }
    assert!(
        grants.len() >= 2 * (limit as usize) - 2,
        "the budget is used: {}",
        grants.len()
    );
}

#[tokio::test]
async fn a_pause_stops_every_process_and_spend_all_adds_no_burst() {
    let redis = Redis::start();
    let (a, b) = (store(&redis, KEY), store(&redis, KEY));
    let gcra = Gcra::new(100, Duration::from_secs(1));
    let period = Duration::from_secs(1);
    a.pause(Duration::from_millis(800)).await.unwrap();
    let wait = b
        .acquire_slot(gcra.slot(), gcra.tolerance(), period)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        wait > Duration::from_millis(500) && wait <= Duration::from_millis(800),
        "{wait:?}"
    );

    let redis2 = Redis::start();
    let c = store(&redis2, KEY);
    c.spend_all(period).await.unwrap();
    let wait = c
        .acquire_slot(gcra.slot(), gcra.tolerance(), period)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        wait >= period - gcra.tolerance() - Duration::from_millis(50),
        "{wait:?}"
    );
}

#[tokio::test]
async fn calls_to_a_dead_redis_fail_within_the_operation_timeout() {
    let mut redis = Redis::start();
    let s = store(&redis, KEY);
    s.ping().await.unwrap();
    redis.stop();
    for _ in 0..3 {
        let start = Instant::now();
        assert!(s.ping().await.is_err());
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
    redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.ping().await.is_err() {
        assert!(Instant::now() < deadline, "no reconnection within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `SharedState` (the store behind the `sharing` traits): a failed call marks it down at once and answers
/// quickly; the watcher brings it back within a few seconds of Redis returning, with the shared budget spent (a
/// restarted Redis forgot it, so going back adds no burst); a token sealed with another key counts as absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_state_works_alone_while_redis_is_away_and_comes_back_with_the_budget_spent() {
    use std::sync::Arc;
    use zapsign_proxy::metrics::{Metrics, TokenExpiry};
    use zapsign_proxy::shared::state::{BudgetShape, SharedState};
    use zapsign_proxy::sharing::{SharedBudget, SharedDown, SharedTokens};

    let mut redis = Redis::start();
    let metrics = Arc::new(Metrics::new());
    let period = Duration::from_secs(1);
    let gcra = Gcra::new(20, period);
    let shape = BudgetShape {
        interval: gcra.slot(),
        tolerance: gcra.tolerance(),
        period,
    };
    let state = SharedState::new(store(&redis, KEY), Some(shape), metrics.clone());
    let stop = zapsign_proxy::shutdown::Shutdown::new();
    let watcher = tokio::spawn(state.clone().watch(stop.signal()));
    let up = |m: &Metrics| {
        m.render(TokenExpiry::NoToken)
            .lines()
            .find_map(|l| l.strip_prefix("zapsign_proxy_shared_state_up ").map(str::to_owned))
    };
    assert_eq!(SharedBudget::acquire(&*state).await, Ok(None));
    assert_eq!(up(&metrics).as_deref(), Some("1"));

    // Another key sealed what is stored: absent, not an error.
    let other = store(&redis, OTHER_KEY);
    let fence = other.try_lock(Duration::from_secs(10)).await.unwrap().unwrap();
    other
        .publish(
            &fence,
            &record(ACCESS, None, u64::MAX / 2, None),
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(SharedTokens::current(&*state).await, Ok(None));
    assert!(SharedTokens::is_up(&*state), "an unopenable token is no outage");

    tokio::task::block_in_place(|| redis.stop());
    let asked = Instant::now();
    assert_eq!(SharedBudget::acquire(&*state).await, Err(SharedDown));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "a dead Redis held a call {:?}",
        asked.elapsed()
    );
    assert!(!SharedBudget::is_up(&*state));
    assert_eq!(up(&metrics).as_deref(), Some("0"));

    tokio::task::block_in_place(|| redis.start_again());
    let back = Instant::now();
    while !state.up() {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not back within 5 s of Redis returning"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up(&metrics).as_deref(), Some("1"));
    // The restarted Redis's budget was marked spent before sharing resumed.
    match SharedBudget::acquire(&*state).await {
        Ok(Some(wait)) => assert!(wait > period / 2, "{wait:?}"),
        other => panic!("a slot right after the return: {other:?}"),
    }
    stop.start();
    watcher.await.unwrap();
}

/// A Redis that requires a password (`shared.redis_password_file`): the store logs in with it, and without it
/// every call fails quickly (and the process would work alone) instead of hanging.
#[tokio::test]
async fn the_store_logs_in_with_the_redis_password() {
    let redis = Redis::start_with(&["--requirepass", "s3cret-redis-pw"]);
    let with = |password: Option<&str>| {
        RedisStore::new(StoreSettings {
            url: redis.url(),
            password: password.map(Secret::new),
            ca_pem: None,
            key: std::sync::Arc::new(SealKey::from_hex(KEY).unwrap()),
            prefix: "zapsign-proxy".into(),
            scope: "1234".into(),
            op_timeout: Duration::from_millis(500),
        })
        .unwrap()
    };
    with(Some("s3cret-redis-pw"))
        .ping()
        .await
        .expect("the password is sent");
    let started = Instant::now();
    assert!(with(None).ping().await.is_err(), "no password, no access");
    assert!(with(Some("wrong")).ping().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// `rediss://` with `shared.ca_file`: the store speaks TLS to a Redis whose certificate a private CA signed, and
/// refuses one it cannot verify.
#[tokio::test]
async fn the_store_speaks_tls_to_a_redis_signed_by_the_given_ca() {
    let ca = common::TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (cert, key, ca_file) = (
        write("redis.crt", &ca.server_cert_pem),
        write("redis.key", &ca.server_key_pem),
        write("ca.crt", &ca.ca_pem),
    );
    let redis = Redis::start_with(&[
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_file,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://localhost:{}/0", redis.port);
    let with = |ca_pem: Option<Vec<u8>>| {
        RedisStore::new(StoreSettings {
            url: url.clone(),
            password: None,
            ca_pem,
            key: std::sync::Arc::new(SealKey::from_hex(KEY).unwrap()),
            prefix: "zapsign-proxy".into(),
            scope: "1234".into(),
            op_timeout: Duration::from_millis(1000),
        })
        .unwrap()
    };
    with(Some(ca.ca_pem.clone().into_bytes()))
        .ping()
        .await
        .expect("TLS with the private CA");
    assert!(
        with(None).ping().await.is_err(),
        "a certificate no trusted root signed must be refused"
    );
}
