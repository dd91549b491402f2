//! The Redis side of the shared state: one sealed token with a generation from a Redis counter, a renewal lock
//! with a fencing value, and the shared pacing budget (GCRA on Redis's own clock).
//!
//! Client: the `redis` crate's tokio `ConnectionManager` (well kept, the crate Rust users of Redis know; it
//! reconnects with backoff by itself and is created lazily, so a proxy starts while Redis is away). Every call is
//! bounded by the store's operation timeout, so no request waits on a dead Redis longer than that.
//!
//! Keys, all under `<prefix>:<scope>:` (scope: the organization id, or a hash of the static API token):
//! - `token`: the sealed current token (see [`super::seal`]), TTL its expiry;
//! - `generation`: the counter (`INCR`) that numbers tokens, so "newer" means the same on every process;
//! - `lock`: held by the one process renewing (`SET NX PX`, value = a random fence; released only by its
//!   owner), TTL `auth.timeout`;
//! - `tat`, `pause`: the pacing state, TTL two periods / the pause.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, IntoConnectionInfo, Script};
use serde::{Deserialize, Serialize};

use super::seal::SealKey;
use crate::secret::Secret;
use crate::sharing::{Fence, SharedToken, TokenRecord};

/// Why a call to Redis failed. Callers treat every variant alike: work alone until Redis answers again.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL or TLS settings cannot make a client.
    #[error("shared.redis_url is unusable: {0}")]
    Config(String),
    /// Redis did not answer within the operation timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis refused or the connection failed.
    #[error("redis: {0}")]
    Redis(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        // The error text names the command and the server's reply, never a value we sent.
        Self::Redis(e.to_string())
    }
}

/// How to reach Redis and what to call the keys.
pub struct StoreSettings {
    /// `redis://HOST:PORT/DB` or `rediss://`.
    pub url: String,
    /// From `shared.redis_password_file` / `ZAPSIGN_PROXY_REDIS_PASSWORD`.
    pub password: Option<Secret>,
    /// Extra PEM roots for `rediss://` (`shared.ca_file`).
    pub ca_pem: Option<Vec<u8>>,
    /// Seals the tokens (shared with the configuration, which validated it).
    pub key: Arc<SealKey>,
    /// `shared.key_prefix`.
    pub prefix: String,
    /// The organization id, or `static-` and 16 hex digits of the API token's SHA-256.
    pub scope: String,
    /// Longest wait for one Redis call.
    pub op_timeout: Duration,
}

/// What is sealed: the token's fields, the generation included, so a generation cannot be changed in Redis.
#[derive(Serialize, Deserialize)]
struct Sealed {
    g: u64,
    a: String,
    r: Option<String>,
    ae: u64,
    re: Option<u64>,
}

/// The Redis-backed shared state of one account.
pub struct RedisStore {
    conn: ConnectionManager,
    key: Arc<SealKey>,
    op_timeout: Duration,
    token: String,
    generation: String,
    lock: String,
    tat: String,
    pause: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("token_key", &self.token)
            .finish_non_exhaustive()
    }
}

/// Stores `ARGV[2]` under `KEYS[2]` (TTL `ARGV[3]` ms) only while `KEYS[1]` (the lock) holds `ARGV[1]`.
const PUBLISH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Deletes the lock only for its owner.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// GCRA on Redis's clock (microseconds). KEYS: tat, pause. ARGV: interval, tolerance, state TTL (ms).
/// Returns 0 when a slot is granted, else the microseconds until one may be.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < paused then return paused - now end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if tat - now > tolerance then return tat - tolerance - now end
redis.call('SET', KEYS[1], string.format('%d', tat + interval), 'PX', ARGV[3])
return 0
";

/// Pauses every process: no slot before Redis's now + `ARGV[1]` microseconds; never shortens a pause.
const PAUSE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local until_us = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if until_us > current then
  redis.call('SET', KEYS[1], string.format('%d', until_us), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
";

/// Marks the shared budget as spent: the TAT moves to at least now + one period.
const SPEND_ALL: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local full = now + tonumber(ARGV[1])
if full > tat then redis.call('SET', KEYS[1], string.format('%d', full), 'PX', ARGV[2]) end
return 1
";

impl RedisStore {
    /// A store for `settings`. Connects lazily: succeeds while Redis is away, and each call reconnects as needed.
    pub fn new(settings: StoreSettings) -> Result<Self, StoreError> {
        let mut info = settings
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        if let Some(password) = &settings.password {
            info = info
                .clone()
                .set_redis_settings(info.redis_settings().clone().set_password(password.expose()));
        }
        let client = match settings.ca_pem {
            Some(root) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                },
            ),
            None => Client::open(info),
        }
        .map_err(|e| StoreError::Config(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.op_timeout))
            .set_response_timeout(Some(settings.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let base = format!("{}:{}:", settings.prefix, settings.scope);
        Ok(Self {
            conn,
            key: settings.key,
            op_timeout: settings.op_timeout,
            token: format!("{base}token"),
            generation: format!("{base}generation"),
            lock: format!("{base}lock"),
            tat: format!("{base}pacing:tat"),
            pause: format!("{base}pacing:pause"),
        })
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.op_timeout)),
        }
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }

    /// The shared token, if one is stored and opens with our key. A value that does not open (sealed with
    /// another key, or damaged) counts as absent; `Ok(Err(()))` tells the caller so it can log it once.
    pub async fn token(&self) -> Result<Result<Option<SharedToken>, Unopenable>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = self.bounded(conn.get(&self.token)).await?;
        let Some(raw) = raw else {
            return Ok(Ok(None));
        };
        let opened = self
            .key
            .open(&self.token, &raw)
            .and_then(|plain| serde_json::from_slice::<Sealed>(&plain).ok());
        Ok(match opened {
            Some(s) => Ok(Some(SharedToken {
                generation: s.g,
                record: TokenRecord {
                    access: Secret::new(s.a),
                    refresh: s.r.map(Secret::new),
                    access_expires_ms: s.ae,
                    refresh_expires_ms: s.re,
                },
            })),
            None => Err(Unopenable),
        })
    }

    /// Takes the renewal lock for `ttl` when nobody holds it.
    pub async fn try_lock(&self, ttl: Duration) -> Result<Option<Fence>, StoreError> {
        let fence = Fence(format!("{:032x}", rand::random::<u128>()));
        let mut conn = self.conn.clone();
        let set: Option<String> = self
            .bounded(
                redis::cmd("SET")
                    .arg(&self.lock)
                    .arg(&fence.0)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(set.map(|_| fence))
    }

    /// Releases the lock if `fence` still holds it.
    pub async fn unlock(&self, fence: &Fence) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let script = Script::new(UNLOCK);
        self.bounded(script.key(&self.lock).arg(&fence.0).invoke_async::<i64>(&mut conn))
            .await
            .map(drop)
    }

    /// Numbers a newly issued token with the next generation and stores it sealed, while `fence` holds the
    /// lock. Returns the generation, or `None` when the lock was lost (another process may be renewing).
    /// The token key's TTL is `ttl` (the access token's remaining life); the counter's, `counter_ttl`, renewed
    /// here each time (it must outlive every token it numbered, and no key in Redis lives forever).
    pub async fn publish(
        &self,
        fence: &Fence,
        token: &TokenRecord,
        ttl: Duration,
        counter_ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn.clone();
        let (generation, _): (u64, i64) = self
            .bounded(
                redis::pipe()
                    .atomic()
                    .incr(&self.generation, 1u64)
                    .pexpire(&self.generation, i64::try_from(millis(counter_ttl)).unwrap_or(i64::MAX))
                    .query_async(&mut conn),
            )
            .await?;
        let plain = serde_json::to_vec(&Sealed {
            g: generation,
            a: token.access.expose().to_owned(),
            r: token.refresh.as_ref().map(|r| r.expose().to_owned()),
            ae: token.access_expires_ms,
            re: token.refresh_expires_ms,
        })
        .map_err(|e| StoreError::Redis(e.to_string()))?;
        let sealed = self
            .key
            .seal(&self.token, &plain)
            .ok_or_else(|| StoreError::Redis("the system's random source failed".into()))?;
        let script = Script::new(PUBLISH);
        let stored: i64 = self
            .bounded(
                script
                    .key(&self.lock)
                    .key(&self.token)
                    .arg(&fence.0)
                    .arg(sealed)
                    .arg(millis(ttl).max(1))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok((stored == 1).then_some(generation))
    }

    /// One slot of the shared budget (GCRA with `interval` and `tolerance`), on Redis's clock; `Ok(Err(wait))`
    /// when none is free for `wait`.
    pub async fn acquire_slot(
        &self,
        interval: Duration,
        tolerance: Duration,
        period: Duration,
    ) -> Result<Result<(), Duration>, StoreError> {
        let mut conn = self.conn.clone();
        let script = Script::new(ACQUIRE);
        let wait_us: i64 = self
            .bounded(
                script
                    .key(&self.tat)
                    .key(&self.pause)
                    .arg(micros(interval))
                    .arg(micros(tolerance))
                    .arg(millis(period) * 2)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(if wait_us <= 0 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait_us.unsigned_abs()))
        })
    }

    /// Pauses every process's sending for `pause` (an upstream 429).
    pub async fn pause(&self, pause: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let script = Script::new(PAUSE);
        self.bounded(
            script
                .key(&self.pause)
                .arg(micros(pause))
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }

    /// Marks the shared budget as spent (shared pacing resumes after Redis was away: no added burst).
    pub async fn spend_all(&self, period: Duration) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let script = Script::new(SPEND_ALL);
        self.bounded(
            script
                .key(&self.tat)
                .arg(micros(period))
                .arg(millis(period) * 2)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(drop)
    }
}

/// A stored token that does not open with our key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unopenable;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
