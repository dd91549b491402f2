//! The validated configuration's types: what a mode decides is in the type, and each section serializes as the
//! keys that would load it again (the `ser_*` helpers), for `--check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use super::values::{format_size, BaseUrl, ClientKey, RedisUrl};
use crate::secret::Secret;

/// The validated, effective configuration. Each section serializes as the keys that would load it again; a
/// secret never serializes (see [`Config::to_redacted_toml`]).
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The caller-facing listener.
    pub server: ServerConfig,
    /// The admin listener (health, readiness, metrics).
    pub admin: AdminConfig,
    /// Where requests go.
    pub upstream: UpstreamConfig,
    /// How the token is obtained.
    pub auth: AuthConfig,
    /// Who may call the proxy.
    pub access: AccessConfig,
    /// Logging.
    pub log: LogConfig,
    /// `pacing.*`: the account's budget; `None` when `pacing.limit = 0` turns pacing off (no pacer is built).
    #[serde(skip)]
    pub pacing: Option<crate::pacing::Settings>,
    /// `shared.*`: the Redis the processes of one account share; `None` without `shared.redis_url` (this
    /// process works alone). Rendered by [`Config::to_redacted_toml`] only when set.
    #[serde(skip)]
    pub shared: Option<SharedConfig>,
    /// Secrets given inline or by the environment (`auth.password`, ...): `--check-config` can only say they are
    /// set, as a comment. A secret from a file shows as its file key instead.
    #[serde(skip)]
    pub(super) secrets_not_shown: Vec<&'static str>,
}

/// `server.*`
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// HTTPS for callers: both files, or plain HTTP (and h2c) when `None`.
    #[serde(flatten)]
    pub tls: Option<ServerTls>,
    /// Threads serving requests.
    pub workers: usize,
    /// A caller must send a whole request head within this time, or is disconnected.
    #[serde(serialize_with = "ser_duration")]
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// How long in-flight requests may run after SIGTERM.
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_grace: Duration,
}

/// `server.tls_cert_file` and `server.tls_key_file`, which are set together or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerTls {
    /// PEM certificate chain.
    #[serde(rename = "tls_cert_file")]
    pub cert_file: PathBuf,
    /// PEM private key.
    #[serde(rename = "tls_key_file")]
    pub key_file: PathBuf,
}

/// `admin.*`
#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Address of the admin listener; `None` disables it.
    #[serde(serialize_with = "ser_opt_addr")]
    pub listen: Option<SocketAddr>,
}

/// `upstream.*`
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    /// The ZapSign base URL.
    pub url: BaseUrl,
    /// Time to establish the TCP connection.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// Time from sending the request until the response headers arrive.
    #[serde(serialize_with = "ser_duration")]
    pub response_timeout: Duration,
    /// How long an idle pooled upstream connection is kept: below the 60 s after which load balancers commonly
    /// drop idle connections, so the proxy closes first rather than reusing a connection being torn down.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Idle upstream connections kept warm for reuse (in each of the two pools); more are closed. `0` keeps none.
    pub max_idle_connections: usize,
    /// Extra PEM roots trusted for the upstream and the auth calls.
    pub ca_file: Option<PathBuf>,
}

/// `auth.*`: the mode and what it needs, and the settings every mode shares.
#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    /// `auth.mode` with the keys that mode uses.
    #[serde(flatten)]
    pub mode: Auth,
    /// Largest request body kept to replay once after an upstream 401, in bytes.
    #[serde(serialize_with = "ser_size")]
    pub replay_buffer: u64,
    /// `auth.timeout`: one login or refresh call, start to finish; also bounds the wait for a body to replay.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

/// How the proxy gets its token (`auth.mode`), with exactly the settings that mode needs.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Auth {
    /// Username and password login, refreshed JWTs.
    Jwt(JwtAuth),
    /// A fixed account API token.
    Static(StaticAuth),
}

impl Auth {
    /// The mode as `auth.mode` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Jwt(_) => "jwt",
            Self::Static(_) => "static",
        }
    }

    /// The account part of every shared Redis key (`<prefix>:<scope>:...`): processes with the same scope share
    /// a token and a pacing budget. JWT mode: the organization id (digits), which every replica of the account
    /// is given; should it ever be empty, `user-` and the first 16 hex digits of the username's SHA-256. Static
    /// mode has no organization id: `static-` and the first 16 hex digits of the API token's SHA-256, so
    /// processes with the same token share and the token itself never reaches Redis. The prefixes keep the
    /// three forms apart (an organization id has only digits).
    pub fn shared_scope(&self) -> String {
        fn digest16(prefix: &str, value: &str) -> String {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(value.as_bytes());
            format!("{prefix}{}", crate::secret::hex(&digest[..8]))
        }
        match self {
            Self::Jwt(jwt) if !jwt.organization_id.is_empty() => jwt.organization_id.clone(),
            Self::Jwt(jwt) => digest16("user-", &jwt.username),
            Self::Static(s) => digest16("static-", s.api_token.expose()),
        }
    }
}

/// `auth.mode = "jwt"`: the login credentials and where the auth calls go.
#[derive(Debug, Clone, Serialize)]
pub struct JwtAuth {
    /// ZapSign organization id (digits).
    pub organization_id: String,
    /// Login username.
    pub username: String,
    /// Login password (from `auth.password`, `auth.password_file` or `ZAPSIGN_PASSWORD`).
    #[serde(skip)]
    pub password: Secret,
    /// Where the password was read from, re-read on reload.
    pub password_file: Option<PathBuf>,
    /// Base URL for login and refresh.
    pub url: BaseUrl,
    /// Renew this long before the access token's `exp`.
    #[serde(serialize_with = "ser_duration")]
    pub refresh_margin: Duration,
}

impl JwtAuth {
    /// Whether `other` logs in as someone else (or with another password): a reload then logs in again.
    pub fn login_differs(&self, other: &JwtAuth) -> bool {
        self.organization_id != other.organization_id
            || self.username != other.username
            || self.password != other.password
    }
}

/// `auth.mode = "static"`: the account's API token.
#[derive(Debug, Clone, Serialize)]
pub struct StaticAuth {
    /// The API token (from `auth.api_token`, `auth.api_token_file` or `ZAPSIGN_API_TOKEN`).
    #[serde(skip)]
    pub api_token: Secret,
    /// Where the API token was read from, re-read on reload.
    pub api_token_file: Option<PathBuf>,
}

/// `access.*`
#[derive(Debug, Clone, Serialize)]
pub struct AccessConfig {
    /// Caller networks allowed.
    #[serde(serialize_with = "ser_networks")]
    pub allow_networks: Vec<IpNet>,
    /// File of client keys, one a line.
    pub client_keys_file: Option<PathBuf>,
    /// Client keys callers must present in `Proxy-Authorization: Bearer <key>`; empty means none required.
    #[serde(skip)]
    pub client_keys: Vec<ClientKey>,
    /// Path prefixes callers may reach.
    pub allow_paths: Vec<String>,
}

/// `shared.*`: how this process reaches the Redis it shares with the other processes of the account, and what
/// it calls the keys there. Serializes as the keys that load it again; the password, the sealing key, the CA's
/// content and the scope never serialize (a secret given by the environment is named in a comment instead).
#[derive(Clone, Serialize)]
pub struct SharedConfig {
    /// `shared.redis_url` / `ZAPSIGN_PROXY_REDIS_URL`: never holds a password (refused at load).
    pub redis_url: RedisUrl,
    /// From `shared.redis_password_file` or `ZAPSIGN_PROXY_REDIS_PASSWORD` (which wins).
    #[serde(skip)]
    pub password: Option<Secret>,
    /// `shared.redis_password_file`: re-read when it changes on disk (see `reload::secret_files`).
    #[serde(rename = "redis_password_file")]
    pub password_file: Option<PathBuf>,
    /// `shared.ca_file`: extra PEM roots for `rediss://` (only with `rediss://`).
    pub ca_file: Option<PathBuf>,
    /// The content of `ca_file`, read and checked at load (at least one certificate).
    #[serde(skip)]
    pub ca_pem: Option<Arc<Vec<u8>>>,
    /// Seals every token stored in Redis; from `ZAPSIGN_PROXY_SHARED_KEY` or `shared.key_file`. Read at start
    /// and on SIGHUP only.
    #[serde(skip)]
    pub key: Arc<crate::shared::seal::SealKey>,
    /// `shared.key_file`, when the key came from a file.
    pub key_file: Option<PathBuf>,
    /// `shared.key_prefix`: the first part of every key.
    pub key_prefix: String,
    /// `shared.replicas` (1 or more): processes sharing the account; alone (Redis away) each paces at
    /// `limit / replicas`.
    pub replicas: u32,
    /// The account part of every key: [`Auth::shared_scope`] of this configuration's `auth`.
    #[serde(skip)]
    pub scope: String,
}

impl SharedConfig {
    /// Whether going from `self` to `other` needs a new Redis client: another address, password, CA, key, or
    /// key names. (`shared.replicas` shapes the pacer, which a restart rebuilds.)
    pub fn differs_for_the_store(&self, other: &SharedConfig) -> bool {
        self.redis_url.as_str() != other.redis_url.as_str()
            || self.password.as_ref().map(Secret::expose) != other.password.as_ref().map(Secret::expose)
            || self.ca_pem != other.ca_pem
            || !self.key.same_as(&other.key)
            || self.key_prefix != other.key_prefix
            || self.scope != other.scope
    }
}

impl std::fmt::Debug for SharedConfig {
    /// The CA's content shows as its length; the password and key as `[redacted]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis_url", &self.redis_url)
            .field("password", &self.password)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("key", &self.key)
            .field("key_file", &self.key_file)
            .field("key_prefix", &self.key_prefix)
            .field("replicas", &self.replicas)
            .field("scope", &self.scope)
            .finish()
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `log.*`
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// Text or JSON.
    pub format: LogFormat,
    /// The effective filter: a level or `target=level` directives (checked by [`parse_log_filter`]); from
    /// `RUST_LOG` when that is set and passes the same check, else `log.level`.
    pub level: String,
    /// Whether `level` came from `RUST_LOG`.
    #[serde(skip)]
    pub level_from_rust_log: bool,
    /// Why a `RUST_LOG` that was set is ignored, to report once logging is up (the value is no secret).
    #[serde(skip)]
    pub rust_log_refused: Option<String>,
}

/// `pacing.*` as `--check-config` writes it: every key while pacing is on, only `limit = 0` while it is off.
#[derive(Debug, Serialize)]
pub(super) struct PacingKeys {
    limit: u32,
    #[serde(serialize_with = "ser_opt_duration", skip_serializing_if = "Option::is_none")]
    period: Option<Duration>,
    #[serde(serialize_with = "ser_opt_duration", skip_serializing_if = "Option::is_none")]
    max_wait: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_limit: Option<usize>,
}

impl PacingKeys {
    pub(super) fn of(settings: Option<&crate::pacing::Settings>) -> Self {
        match settings {
            Some(s) => Self {
                limit: s.limit,
                period: Some(s.period),
                max_wait: Some(s.max_wait),
                queue_limit: Some(s.queue_limit),
            },
            None => Self {
                limit: 0,
                period: None,
                max_wait: None,
                queue_limit: None,
            },
        }
    }
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// An absent address as `""`, which is how the file turns the listener off.
fn ser_opt_addr<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_str(""),
    }
}

/// As the largest binary unit that divides it (`"16MiB"`), else a plain byte count, as a string.
fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*n))
}

fn ser_networks<S: Serializer>(n: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(n.iter().map(|n| n.to_string()))
}
