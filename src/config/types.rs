//! The validated configuration's types: what a mode decides is in the type, and each section serializes as the
//! keys that would load it again (the `ser_*` helpers), for `--check-config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Serialize, Serializer};

use super::values::{format_size, BaseUrl, ClientKey};
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
