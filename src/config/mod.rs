//! Configuration: the TOML file and the environment overrides of the contract, validated once into [`Config`].
//!
//! Where a mode decides which settings exist, the type says so ([`Auth::Jwt`] holds the login credentials,
//! [`Auth::Static`] the API token; [`ServerConfig::tls`] holds both TLS files or is `None`), so nothing
//! downstream checks again what validation checked. Validation never panics: every problem is a
//! [`ConfigError`] that names the key and says how to fix it, and all of them are reported at once.
//!
//! # Layout
//! - `raw.rs`: the file's sections as serde structs, exactly the contract's keys.
//! - `env.rs`: the environment variables, written over the raw values (the one place that reads them).
//! - `validate.rs`: raw values to the typed [`Config`], collecting every problem; `values.rs`: the parsers
//!   (URLs, durations, sizes, secrets, client keys) it is built from.
//! - `render.rs`: [`Config::to_redacted_toml`], the `--check-config` output, a config that loads again.
//! - `error.rs`: [`ConfigError`].

mod env;
mod error;
mod raw;
mod render;
mod validate;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

pub use env::{process_env, EnvLookup};
pub use error::ConfigError;
pub use values::{format_size, parse_log_filter, parse_size, read_secret_file, BaseUrl, ClientKey};

use crate::secret::Secret;
use render::{ser_duration, ser_networks, ser_opt_addr, ser_size};

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
    /// Secrets given inline or by the environment (`auth.password`, ...): `--check-config` can only say they are
    /// set, as a comment. A secret from a file shows as its file key instead.
    #[serde(skip)]
    secrets_not_shown: Vec<&'static str>,
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

impl LogConfig {
    /// The defaults (`text`, `info`) with `RUST_LOG` applied: logging for commands that read no config file.
    pub fn defaults(env: EnvLookup<'_>) -> Self {
        let mut raw = raw::RawConfig::default();
        env::apply_overrides(&mut raw, env);
        validate::log(raw.log, &mut error::Problems::default())
    }
}

impl Config {
    /// Loads the file at `path` (or only defaults when `None`), applies environment overrides and validates.
    pub fn load(path: Option<&Path>, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                    path: path.to_owned(),
                    source,
                })?;
                raw::parse_raw(&text, path)?
            }
            None => raw::RawConfig::default(),
        };
        validate::config(raw, env)
    }

    /// Parses TOML text (no file), applies `env` and validates; used by tests and fuzzing.
    pub fn from_toml(text: &str, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        Self::from_toml_of(text, Path::new("<text>"), env)
    }

    /// [`Config::from_toml`] for text that came from (or was built from) the file `origin`, named in errors.
    pub fn from_toml_of(text: &str, origin: &Path, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw = raw::parse_raw(text, origin)?;
        validate::config(raw, env)
    }
}

#[cfg(test)]
mod tests;
