//! Configuration: the TOML file and environment overrides of `CONTRACT.md`, parsed into raw serde structs and
//! then validated into [`Config`]. Validation never panics: every problem is a [`ConfigError`] that names the
//! key and says how to fix it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use ipnet::IpNet;
use serde::{Deserialize, Serialize, Serializer};

use crate::secret::Secret;

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}; check the path given by --config or ZAPSIGN_PROXY_CONFIG")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for our keys (unknown key, wrong type).
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is present but wrong, or a required one is missing.
    #[error("`{key}`: {problem}; {fix}")]
    Invalid {
        /// The key, e.g. `upstream.url`, or the environment variable that set it.
        key: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// More than one problem: all of them, so one run of `--check-config` names everything to fix. Displayed
    /// one a line, each naming its key and its fix.
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    fn invalid(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Each problem on its own: the list of [`ConfigError::Several`], or this one error alone.
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            Self::Several(list) => list.iter().collect(),
            one => vec![one],
        }
    }
}

/// The problems found in one validation pass. Validation goes on after a problem (with a stand-in value that is
/// never used), so a missing organization id does not hide a bad duration.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn note(&mut self, e: ConfigError) {
        match e {
            ConfigError::Several(list) => self.0.extend(list),
            one => self.0.push(one),
        }
    }

    /// The value, or `None` once the problem is noted.
    fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.note(e)).ok()
    }

    /// The value, or `stand_in` once the problem is noted.
    fn or<T>(&mut self, r: Result<T, ConfigError>, stand_in: T) -> T {
        self.ok(r).unwrap_or(stand_in)
    }

    /// `value` when nothing was noted; else the one problem, or all of them.
    fn finish<T>(mut self, value: T) -> Result<T, ConfigError> {
        match self.0.len() {
            0 => Ok(value),
            1 => Err(self.0.remove(0)),
            _ => Err(ConfigError::Several(self.0)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw file structs: exactly the keys of the contract, unknown keys rejected.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    access: RawAccess,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    workers: Option<usize>,
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    ca_file: Option<PathBuf>,
}

/// The organization id: a string of digits, or a TOML integer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawOrganizationId {
    Text(String),
    Number(i64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    mode: Option<String>,
    organization_id: Option<RawOrganizationId>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    api_token: Option<String>,
    api_token_file: Option<PathBuf>,
    url: Option<String>,
    refresh_margin: Option<String>,
    replay_buffer: Option<String>,
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    allow_networks: Option<Vec<String>>,
    client_keys_file: Option<PathBuf>,
    allow_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.

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
    /// PEM certificate chain for HTTPS callers; with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for HTTPS callers; with `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
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

/// How the proxy gets its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Username and password login, refreshed JWTs.
    Jwt,
    /// A fixed account API token.
    Static,
}

/// `auth.*`
#[derive(Debug, Clone, Serialize)]
pub struct AuthConfig {
    /// JWT or static.
    pub mode: AuthMode,
    /// ZapSign organization id (digits); JWT mode.
    pub organization_id: Option<String>,
    /// Login username; JWT mode.
    pub username: Option<String>,
    /// Login password (from `auth.password`, `auth.password_file` or `ZAPSIGN_PASSWORD`); JWT mode.
    #[serde(skip)]
    pub password: Option<Secret>,
    /// Where the password was read from, re-read on reload.
    pub password_file: Option<PathBuf>,
    /// The static API token; static mode.
    #[serde(skip)]
    pub api_token: Option<Secret>,
    /// Where the API token was read from, re-read on reload.
    pub api_token_file: Option<PathBuf>,
    /// Base URL for login and refresh.
    pub url: BaseUrl,
    /// Renew this long before the access token's `exp`.
    #[serde(serialize_with = "ser_duration")]
    pub refresh_margin: Duration,
    /// Largest request body kept to replay once after an upstream 401, in bytes.
    #[serde(serialize_with = "ser_size")]
    pub replay_buffer: u64,
    /// `auth.timeout`: one login or refresh call, start to finish; also bounds the wait for a body to replay.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
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

impl LogConfig {
    /// The defaults (`text`, `info`) with `RUST_LOG` applied: logging for commands that read no config file.
    pub fn defaults(env: EnvLookup<'_>) -> Self {
        validate_log(RawLog::default(), env, &mut Problems::default())
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

/// An `http`/`https` base URL with no path, query or user info, split for building requests.
#[derive(Clone)]
pub struct BaseUrl {
    /// As written, without a trailing slash.
    pub text: String,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and optional port.
    pub authority: Authority,
    /// The value of the `Host` header requests to it carry.
    pub host_header: HeaderValue,
}

impl BaseUrl {
    /// Parses and checks a base URL for `key`.
    pub fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        let fix =
            "write it as https://host[:port], e.g. https://api.zapsign.com.br or https://sandbox.api.zapsign.com.br";
        let trimmed = text.trim().trim_end_matches('/');
        let uri: Uri = trimmed
            .parse()
            .map_err(|e| ConfigError::invalid(key, format!("`{text}` is not a URL ({e})"), fix))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            Some(other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("scheme `{other}` is not supported"),
                    fix,
                ))
            }
            None => return Err(ConfigError::invalid(key, "the URL has no scheme", fix)),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::invalid(key, "the URL has no host", fix))?;
        if authority.as_str().contains('@') {
            return Err(ConfigError::invalid(key, "user info in the URL is not allowed", fix));
        }
        if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
            return Err(ConfigError::invalid(
                key,
                "the URL has a path or query; the proxy forwards the caller's path as it is",
                fix,
            ));
        }
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ConfigError::invalid(key, "the host is not a valid Host header", fix))?;
        Ok(Self {
            text: format!("{scheme}://{authority}"),
            scheme,
            authority,
            host_header,
        })
    }

    /// `https://api.zapsign.com.br`, the default upstream (built from constants, so it cannot fail).
    pub fn zapsign() -> Self {
        Self {
            text: "https://api.zapsign.com.br".to_owned(),
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("api.zapsign.com.br"),
            host_header: HeaderValue::from_static("api.zapsign.com.br"),
        }
    }

    /// The port requests go to: explicit, or the scheme's default.
    pub fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS { 443 } else { 80 })
    }
}

impl fmt::Debug for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

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

/// The text form of a size that [`parse_size`] reads back to the same number.
pub fn format_size(n: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n > 0 && n % factor == 0 {
            return format!("{}{unit}", n / factor);
        }
    }
    n.to_string()
}

fn ser_networks<S: Serializer>(n: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(n.iter().map(|n| n.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Reads environment variables; tests pass a map instead of the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`Config::load`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
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
                parse_raw(&text, path)?
            }
            None => RawConfig::default(),
        };
        Self::validate(raw, env)
    }

    /// Parses TOML text (no file), applies `env` and validates; used by tests and fuzzing.
    pub fn from_toml(text: &str, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        Self::from_toml_of(text, Path::new("<text>"), env)
    }

    /// [`Config::from_toml`] for text that came from (or was built from) the file `origin`, named in errors.
    pub fn from_toml_of(text: &str, origin: &Path, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let raw = parse_raw(text, origin)?;
        Self::validate(raw, env)
    }

    /// The effective configuration as a config file (`--check-config`): fed back with the same environment it
    /// loads to the same configuration and renders the same text. Secrets never appear: one read from a file
    /// shows as its file key, one given inline or by the environment only as a comment
    /// (`# auth.password: set, not shown`).
    pub fn to_redacted_toml(&self) -> String {
        let sections = [
            ("server", toml::to_string_pretty(&self.server)),
            ("admin", toml::to_string_pretty(&self.admin)),
            ("upstream", toml::to_string_pretty(&self.upstream)),
            ("auth", toml::to_string_pretty(&self.auth)),
            ("access", toml::to_string_pretty(&self.access)),
            ("log", toml::to_string_pretty(&self.log)),
        ];
        let mut out = String::new();
        for (name, body) in sections {
            let body = match body {
                Ok(body) => body,
                Err(e) => return format!("# cannot render config: {e}\n"),
            };
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{name}]\n{body}"));
            for key in &self.secrets_not_shown {
                if key.split_once('.').is_some_and(|(section, _)| section == name) {
                    out.push_str(&format!("# {key}: set, not shown\n"));
                }
            }
            if name == "log" && self.log.level_from_rust_log {
                out.push_str("# log.level: set by RUST_LOG\n");
            }
        }
        out
    }

    fn validate(raw: RawConfig, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let mut p = Problems::default();
        let mut secrets_not_shown = Vec::new();
        let server = validate_server(raw.server, env, &mut p);
        let admin = validate_admin(raw.admin, env, &mut p);
        let upstream = validate_upstream(raw.upstream, env, &mut p);
        let auth = validate_auth(raw.auth, &upstream.url, env, &mut p, &mut secrets_not_shown);
        let access = validate_access(raw.access, env, &mut p, &mut secrets_not_shown);
        let log = validate_log(raw.log, env, &mut p);
        p.finish(Self {
            server,
            admin,
            upstream,
            auth,
            access,
            log,
            secrets_not_shown,
        })
    }
}

/// The TOML text as the raw structs. A syntax error ends the parse at once; a wrong key or type is then looked
/// for in every section, so all of them are named together (one alone keeps the parser's message, which
/// points at the line).
fn parse_raw(text: &str, origin: &Path) -> Result<RawConfig, ConfigError> {
    let one_line = |e: toml::de::Error| e.to_string().trim_end().replace('\n', " ");
    let parse_error = |message: String| ConfigError::Parse {
        path: origin.to_owned(),
        message,
    };
    let whole = match toml::from_str::<RawConfig>(text) {
        Ok(raw) => return Ok(raw),
        Err(e) => parse_error(one_line(e)),
    };
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        return Err(whole);
    };
    let mut p = Problems::default();
    for (section, value) in table {
        let checked = match section.as_str() {
            "server" => value.try_into::<RawServer>().map(drop),
            "admin" => value.try_into::<RawAdmin>().map(drop),
            "upstream" => value.try_into::<RawUpstream>().map(drop),
            "auth" => value.try_into::<RawAuth>().map(drop),
            "access" => value.try_into::<RawAccess>().map(drop),
            "log" => value.try_into::<RawLog>().map(drop),
            other => {
                p.note(parse_error(format!(
                    "unknown section `[{other}]`; the sections are server, admin, upstream, auth, access and log"
                )));
                continue;
            }
        };
        if let Err(e) = checked {
            p.note(parse_error(format!("in [{section}]: {}", one_line(e))));
        }
    }
    match p.0.len() {
        0 | 1 => Err(whole),
        _ => p.finish(RawConfig::default()),
    }
}

/// A value from the environment (named `var`) or else the file, with the name to blame in errors.
fn pick(env: EnvLookup<'_>, var: &str, file: Option<String>, key: &str) -> (Option<String>, String) {
    match env(var) {
        Some(v) => (Some(v), format!("{key} (from {var})")),
        None => (file, key.to_owned()),
    }
}

fn validate_server(raw: RawServer, env: EnvLookup<'_>, p: &mut Problems) -> ServerConfig {
    let (listen, listen_key) = pick(env, "ZAPSIGN_PROXY_LISTEN", raw.listen, "server.listen");
    let listen = p.or(
        parse_addr(&listen_key, listen.as_deref().unwrap_or("127.0.0.1:8080")),
        SocketAddr::from(([127, 0, 0, 1], 8080)),
    );
    let (workers_text, workers_key) = pick(
        env,
        "ZAPSIGN_PROXY_WORKERS",
        raw.workers.map(|w| w.to_string()),
        "server.workers",
    );
    let workers = match workers_text {
        Some(text) => {
            let parsed = text.trim().parse::<usize>().ok().filter(|w| *w >= 1).ok_or_else(|| {
                ConfigError::invalid(
                    &workers_key,
                    format!("`{text}` is not a positive whole number"),
                    "set 1 or more threads",
                )
            });
            p.or(parsed, 1)
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    if raw.tls_cert_file.is_some() != raw.tls_key_file.is_some() {
        p.note(ConfigError::invalid(
            "server.tls_cert_file",
            "only one of tls_cert_file and tls_key_file is set",
            "set both for HTTPS, or neither for plain HTTP",
        ));
    }
    for (key, file) in [
        ("server.tls_cert_file", &raw.tls_cert_file),
        ("server.tls_key_file", &raw.tls_key_file),
    ] {
        if let Some(file) = file {
            p.ok(check_readable(key, file));
        }
    }
    let max_connections = raw.max_connections.unwrap_or(10_000);
    if max_connections == 0 {
        p.note(ConfigError::invalid(
            "server.max_connections",
            "0 would refuse every caller",
            "set 1 or more (default 10000)",
        ));
    }
    ServerConfig {
        listen,
        tls_cert_file: raw.tls_cert_file,
        tls_key_file: raw.tls_key_file,
        workers,
        header_read_timeout: p.or(
            parse_duration("server.header_read_timeout", raw.header_read_timeout, "10s"),
            Duration::ZERO,
        ),
        max_connections,
        shutdown_grace: p.or(
            parse_duration("server.shutdown_grace", raw.shutdown_grace, "30s"),
            Duration::ZERO,
        ),
    }
}

fn validate_admin(raw: RawAdmin, env: EnvLookup<'_>, p: &mut Problems) -> AdminConfig {
    let (listen, key) = pick(env, "ZAPSIGN_PROXY_ADMIN_LISTEN", raw.listen, "admin.listen");
    let listen = listen.unwrap_or_else(|| "127.0.0.1:9090".to_owned());
    let listen = if listen.trim().is_empty() {
        None
    } else {
        p.ok(parse_addr(&key, &listen))
    };
    AdminConfig { listen }
}

fn validate_upstream(raw: RawUpstream, env: EnvLookup<'_>, p: &mut Problems) -> UpstreamConfig {
    let (url, key) = pick(env, "ZAPSIGN_PROXY_UPSTREAM_URL", raw.url, "upstream.url");
    let url = match url {
        Some(url) => p.or(BaseUrl::parse(&key, &url), BaseUrl::zapsign()),
        None => BaseUrl::zapsign(),
    };
    if let Some(ca) = &raw.ca_file {
        p.ok(check_readable("upstream.ca_file", ca));
    }
    UpstreamConfig {
        url,
        connect_timeout: p.or(
            parse_duration("upstream.connect_timeout", raw.connect_timeout, "5s"),
            Duration::ZERO,
        ),
        response_timeout: p.or(
            parse_duration("upstream.response_timeout", raw.response_timeout, "120s"),
            Duration::ZERO,
        ),
        ca_file: raw.ca_file,
    }
}

fn validate_auth(
    raw: RawAuth,
    upstream: &BaseUrl,
    env: EnvLookup<'_>,
    p: &mut Problems,
    not_shown: &mut Vec<&'static str>,
) -> AuthConfig {
    let mode = match raw.mode.as_deref().unwrap_or("jwt") {
        "jwt" => Some(AuthMode::Jwt),
        "static" => Some(AuthMode::Static),
        other => {
            p.note(ConfigError::invalid(
                "auth.mode",
                format!("`{other}` is not a mode"),
                "use \"jwt\" (username and password) or \"static\" (API token)",
            ));
            None
        }
    };
    let url = match raw.url {
        Some(u) => p.or(BaseUrl::parse("auth.url", &u), upstream.clone()),
        None => upstream.clone(),
    };
    // A value that is present but wrong is reported as such, never also as missing.
    let organization_given = env("ZAPSIGN_ORGANIZATION_ID").is_some() || raw.organization_id.is_some();
    let organization_id = match env("ZAPSIGN_ORGANIZATION_ID") {
        Some(v) => p.ok(check_org_id("auth.organization_id (from ZAPSIGN_ORGANIZATION_ID)", v)),
        None => match raw.organization_id {
            Some(RawOrganizationId::Text(t)) => p.ok(check_org_id("auth.organization_id", t)),
            Some(RawOrganizationId::Number(n)) => p.ok(check_org_id("auth.organization_id", n.to_string())),
            None => None,
        },
    };
    let username = env("ZAPSIGN_USERNAME")
        .or(raw.username)
        .filter(|u| !u.trim().is_empty());
    let password = secret_from(
        env,
        "ZAPSIGN_PASSWORD",
        ("auth.password", raw.password),
        ("auth.password_file", raw.password_file.as_deref()),
        not_shown,
    );
    let password_given = password.as_ref().map_or(true, Option::is_some);
    let password = p.ok(password).flatten();
    let api_token = secret_from(
        env,
        "ZAPSIGN_API_TOKEN",
        ("auth.api_token", raw.api_token),
        ("auth.api_token_file", raw.api_token_file.as_deref()),
        not_shown,
    );
    let api_token_given = api_token.as_ref().map_or(true, Option::is_some);
    let api_token = p.ok(api_token).flatten();
    match mode {
        Some(AuthMode::Jwt) => {
            if !organization_given {
                p.note(ConfigError::invalid(
                    "auth.organization_id",
                    "missing for auth.mode = \"jwt\"",
                    "set it (the number under Settings > Integrations > ZapSign API) or ZAPSIGN_ORGANIZATION_ID",
                ));
            }
            if username.is_none() {
                p.note(ConfigError::invalid(
                    "auth.username",
                    "missing for auth.mode = \"jwt\"",
                    "set auth.username or ZAPSIGN_USERNAME",
                ));
            }
            if !password_given {
                p.note(ConfigError::invalid(
                    "auth.password",
                    "missing for auth.mode = \"jwt\"",
                    "set auth.password_file (preferred), auth.password or ZAPSIGN_PASSWORD; or use auth.mode = \"static\" with an API token",
                ));
            }
        }
        Some(AuthMode::Static) if !api_token_given => {
            p.note(ConfigError::invalid(
                "auth.api_token",
                "missing for auth.mode = \"static\"",
                "set auth.api_token_file (preferred), auth.api_token or ZAPSIGN_API_TOKEN",
            ));
        }
        Some(AuthMode::Static) | None => {}
    }
    let replay_buffer = p.or(
        parse_size("auth.replay_buffer", raw.replay_buffer.as_deref().unwrap_or("16MiB")),
        0,
    );
    AuthConfig {
        mode: mode.unwrap_or(AuthMode::Jwt),
        organization_id,
        username,
        password,
        password_file: raw.password_file,
        api_token,
        api_token_file: raw.api_token_file,
        url,
        refresh_margin: p.or(
            parse_duration("auth.refresh_margin", raw.refresh_margin, "5m"),
            Duration::ZERO,
        ),
        replay_buffer,
        timeout: p.or(parse_duration("auth.timeout", raw.timeout, "10s"), Duration::ZERO),
    }
}

fn check_org_id(key: &str, value: String) -> Result<String, ConfigError> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ConfigError::invalid(
            key,
            format!("`{value}` is not a string of digits"),
            "copy the organization id (a number) from Settings > Integrations > ZapSign API",
        ));
    }
    Ok(v.to_owned())
}

/// A secret from the environment, else the inline key, else the file; inline and file together is an error.
/// One given by the environment or inline is noted in `not_shown` (`--check-config` prints only that it is set).
fn secret_from(
    env: EnvLookup<'_>,
    var: &str,
    (inline_key, inline): (&'static str, Option<String>),
    (file_key, file): (&str, Option<&Path>),
    not_shown: &mut Vec<&'static str>,
) -> Result<Option<Secret>, ConfigError> {
    if inline.is_some() && file.is_some() {
        return Err(ConfigError::invalid(
            inline_key,
            format!("both {inline_key} and {file_key} are set"),
            format!("keep one (prefer {file_key})"),
        ));
    }
    if let Some(v) = env(var).filter(|v| !v.is_empty()) {
        not_shown.push(inline_key);
        return Ok(Some(Secret::new(v)));
    }
    if let Some(v) = inline {
        if v.is_empty() {
            return Err(ConfigError::invalid(
                inline_key,
                "is empty",
                "set the value or remove the key",
            ));
        }
        not_shown.push(inline_key);
        return Ok(Some(Secret::new(v)));
    }
    match file {
        Some(path) => read_secret_file(file_key, path).map(Some),
        None => Ok(None),
    }
}

/// Reads a secret file: its content without surrounding white space (a trailing newline is common).
pub fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("cannot read {}: {e}", path.display()),
            "check the path and that the proxy's user may read it",
        )
    })?;
    let value = text.trim();
    if value.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} is empty", path.display()),
            "write the secret into the file",
        ));
    }
    Ok(Secret::new(value))
}

fn validate_access(
    raw: RawAccess,
    env: EnvLookup<'_>,
    p: &mut Problems,
    not_shown: &mut Vec<&'static str>,
) -> AccessConfig {
    let networks = raw
        .allow_networks
        .unwrap_or_else(|| vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()]);
    let mut allow_networks = Vec::with_capacity(networks.len());
    for text in networks {
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| {
                ConfigError::invalid(
                    "access.allow_networks",
                    format!("`{text}` is not a network"),
                    "write CIDR networks such as \"10.0.0.0/8\" or \"::1/128\"",
                )
            });
        allow_networks.extend(p.ok(net));
    }
    // A variable that holds no key counts as unset: an empty ZAPSIGN_PROXY_CLIENT_KEYS must not quietly turn off
    // the keys the file requires.
    let from_env = env("ZAPSIGN_PROXY_CLIENT_KEYS")
        .map(|list| parse_client_keys(&list.replace(',', "\n")))
        .filter(|keys| !keys.is_empty());
    let client_keys = match from_env {
        Some(keys) => {
            not_shown.push("access.client_keys");
            keys
        }
        None => match &raw.client_keys_file {
            Some(path) => p.or(read_client_keys_file(path), Vec::new()),
            None => Vec::new(),
        },
    };
    let allow_paths = raw.allow_paths.unwrap_or_else(|| vec!["/api/".to_owned()]);
    for bad in allow_paths.iter().filter(|p| !p.starts_with('/')) {
        p.note(ConfigError::invalid(
            "access.allow_paths",
            format!("`{bad}` does not start with /"),
            "write path prefixes such as \"/api/\"",
        ));
    }
    AccessConfig {
        allow_networks,
        client_keys_file: raw.client_keys_file,
        client_keys,
        allow_paths,
    }
}

/// The keys of `access.client_keys_file`; a file with none is refused (it would silently admit every caller).
fn read_client_keys_file(path: &Path) -> Result<Vec<ClientKey>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::invalid(
            "access.client_keys_file",
            format!("cannot read {}: {e}", path.display()),
            "check the path and that the proxy's user may read it",
        )
    })?;
    let keys = parse_client_keys(&text);
    if keys.is_empty() {
        return Err(ConfigError::invalid(
            "access.client_keys_file",
            format!("{} holds no key", path.display()),
            "write one key a line, or remove the key to admit callers without keys",
        ));
    }
    Ok(keys)
}

/// One key a line; blank lines and lines starting with `#` are skipped.
fn parse_client_keys(text: &str) -> Vec<ClientKey> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(ClientKey::new)
        .collect()
}

/// A client key and the id that names it in logs: `key-` and the first 8 hex digits of its SHA-256, so an
/// operator can tell callers apart without the key ever being written down.
#[derive(Debug, Clone, Serialize)]
pub struct ClientKey {
    /// Safe to log.
    pub id: std::sync::Arc<str>,
    /// The key itself.
    #[serde(skip)]
    pub key: Secret,
}

impl ClientKey {
    /// Wraps a key and derives its id.
    pub fn new(key: &str) -> Self {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let id = format!("key-{}", crate::secret::hex(&digest[..4]));
        Self {
            id: id.into(),
            key: Secret::new(key),
        }
    }
}

fn validate_log(raw: RawLog, env: EnvLookup<'_>, p: &mut Problems) -> LogConfig {
    let format = match raw.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            p.note(ConfigError::invalid(
                "log.format",
                format!("`{other}` is not a format"),
                "use \"text\" or \"json\"",
            ));
            LogFormat::Text
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_owned());
    let level = match parse_log_filter(&level) {
        Ok(level) => level,
        Err(problem) => {
            p.note(ConfigError::invalid(
                "log.level",
                problem,
                "use error, warn, info, debug or trace, or target=level directives such as \"info,zapsign_proxy=debug\"",
            ));
            level
        }
    };
    // RUST_LOG wins when it passes the same check; one that does not is reported once logging is up, not
    // refused: a stray variable in the environment must not keep the proxy from starting.
    match env("RUST_LOG").filter(|v| !v.trim().is_empty()) {
        Some(rust_log) => match parse_log_filter(&rust_log) {
            Ok(rust_log) => LogConfig {
                format,
                level: rust_log,
                level_from_rust_log: true,
                rust_log_refused: None,
            },
            Err(problem) => LogConfig {
                format,
                level,
                level_from_rust_log: false,
                rust_log_refused: Some(format!("RUST_LOG is ignored: {problem}; log.level applies")),
            },
        },
        None => LogConfig {
            format,
            level,
            level_from_rust_log: false,
            rust_log_refused: None,
        },
    }
}

/// Checks a log filter against the contract's `log.level`: `error`, `warn`, `info`, `debug`, `trace` (or `off`),
/// or comma-separated `target=level` directives; returns it without the blanks `EnvFilter` would stumble on. `EnvFilter` alone takes a bare word such as `verbose` as a target
/// name (trace for a module called `verbose`, nothing for anything else): such a word is refused here, so a typo
/// never silences the log.
pub fn parse_log_filter(text: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    let mut directives = 0;
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directives += 1;
        match directive.rsplit_once('=') {
            None if is_level(directive) => {}
            None => return Err(format!("`{directive}` is not a level")),
            Some((target, _)) if target.trim().is_empty() => {
                return Err(format!("`{directive}` names no target before `=`"))
            }
            Some((_, level)) if !is_level(level) => return Err(format!("`{level}` in `{directive}` is not a level")),
            Some(_) => {}
        }
    }
    if directives == 0 {
        return Err("no level is given".to_owned());
    }
    let filter: Vec<&str> = text.split(',').map(str::trim).filter(|d| !d.is_empty()).collect();
    let filter = filter.join(",");
    match tracing_subscriber::EnvFilter::builder().parse(&filter) {
        Ok(_) => Ok(filter),
        Err(e) => Err(format!("`{text}` is not a filter ({e})")),
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("`{text}` is not an address"),
            "write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:8080\"",
        )
    })
}

fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("cannot read {}: {e}", path.display()),
            "check the path and that the proxy's user may read it",
        )
    })
}

fn parse_duration(key: &str, text: Option<String>, default: &str) -> Result<Duration, ConfigError> {
    let text = text.as_deref().unwrap_or(default);
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("`{text}` is not a duration ({e})"),
            "write a number with a unit, e.g. \"500ms\", \"30s\", \"5m\" or \"1h\"",
        )
    })?;
    if d.is_zero() {
        return Err(ConfigError::invalid(
            key,
            "a zero duration",
            "use a positive duration, e.g. \"30s\"",
        ));
    }
    Ok(d)
}

/// Parses sizes such as `"16MiB"`, `"512KiB"`, `"10MB"` or a plain byte count.
pub fn parse_size(key: &str, text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => u64::MAX,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|_| factor != u64::MAX)
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| {
            ConfigError::invalid(
                key,
                format!("`{text}` is not a size"),
                "write a whole number with a unit, e.g. \"16MiB\", \"512KiB\" or \"1048576\"",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const STATIC: &str = "[auth]\nmode = \"static\"\napi_token = \"t0k3n\"\n";

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
        assert_eq!(c.admin.listen.unwrap().to_string(), "127.0.0.1:9090");
        assert_eq!(c.upstream.url.text, "https://api.zapsign.com.br");
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(120));
        assert_eq!(c.auth.url.text, "https://api.zapsign.com.br");
        assert_eq!(c.auth.refresh_margin, Duration::from_secs(300));
        assert_eq!(c.auth.replay_buffer, 16 << 20);
        assert_eq!(c.auth.timeout, Duration::from_secs(10));
        assert_eq!(c.access.allow_paths, vec!["/api/".to_owned()]);
        assert_eq!(c.access.allow_networks.len(), 2);
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n", &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let env = env_of(&[
            ("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:7000"),
            ("ZAPSIGN_API_TOKEN", "from-env"),
        ]);
        let c = Config::from_toml(STATIC, &env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(c.auth.api_token.unwrap().expose(), "from-env");
    }

    #[test]
    fn bad_scheme_names_the_key() {
        let err = Config::from_toml(&format!("{STATIC}[upstream]\nurl = \"ftp://x\"\n"), &env_of(&[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("upstream.url") && msg.contains("https://"), "{msg}");
    }

    #[test]
    fn url_with_path_is_refused() {
        assert!(BaseUrl::parse("upstream.url", "https://x.example/api").is_err());
        assert!(BaseUrl::parse("upstream.url", "https://u@x.example").is_err());
        assert_eq!(
            BaseUrl::parse("upstream.url", "https://x.example/").unwrap().text,
            "https://x.example"
        );
        assert_eq!(
            BaseUrl::parse("upstream.url", "http://x.example:81").unwrap().port(),
            81
        );
    }

    #[test]
    fn bad_listen_address_names_the_key() {
        let err = Config::from_toml(&format!("{STATIC}[server]\nlisten = \"localhost\"\n"), &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
    }

    #[test]
    fn missing_file_names_the_key() {
        let err = Config::from_toml(
            "[auth]\nmode = \"static\"\napi_token_file = \"/nonexistent/token\"\n",
            &env_of(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("auth.api_token_file"), "{err}");
    }

    #[test]
    fn jwt_mode_requires_credentials() {
        let err = Config::from_toml("", &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("auth.organization_id"), "{err}");
        let env = env_of(&[("ZAPSIGN_ORGANIZATION_ID", "42"), ("ZAPSIGN_USERNAME", "u")]);
        let err = Config::from_toml("", &env).unwrap_err();
        assert!(err.to_string().contains("auth.password"), "{err}");
        let env = env_of(&[
            ("ZAPSIGN_ORGANIZATION_ID", "42"),
            ("ZAPSIGN_USERNAME", "u"),
            ("ZAPSIGN_PASSWORD", "p"),
        ]);
        assert!(Config::from_toml("", &env).is_ok());
    }

    #[test]
    fn organization_id_accepts_integer_and_digit_string_only() {
        let base = "[auth]\nusername = \"u\"\npassword = \"p\"\n";
        let c = Config::from_toml(&format!("{base}organization_id = 123\n"), &env_of(&[])).unwrap();
        assert_eq!(c.auth.organization_id.as_deref(), Some("123"));
        let c = Config::from_toml(&format!("{base}organization_id = \"0456\"\n"), &env_of(&[])).unwrap();
        assert_eq!(c.auth.organization_id.as_deref(), Some("0456"));
        assert!(Config::from_toml(&format!("{base}organization_id = \"12a\"\n"), &env_of(&[])).is_err());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_size("k", "16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("k", "512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("k", "10MB").unwrap(), 10_000_000);
        assert_eq!(parse_size("k", "100").unwrap(), 100);
        assert!(parse_size("k", "16 parsecs").is_err());
        assert!(parse_size("k", "").is_err());
        assert!(parse_size("k", "99999999999999999999GiB").is_err());
        let c = Config::from_toml(
            &format!("{STATIC}[server]\nheader_read_timeout = \"500ms\"\n"),
            &env_of(&[]),
        )
        .unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_millis(500));
        let err =
            Config::from_toml(&format!("{STATIC}[server]\nshutdown_grace = \"soon\"\n"), &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("server.shutdown_grace"), "{err}");
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let env = env_of(&[("ZAPSIGN_PROXY_CLIENT_KEYS", "ck-1,ck-2")]);
        let c = Config::from_toml(STATIC, &env).unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("t0k3n") && !out.contains("ck-1"), "{out}");
        assert!(out.contains("# auth.api_token: set, not shown\n"), "{out}");
        assert!(out.contains("# access.client_keys: set, not shown\n"), "{out}");
        assert!(!out.contains("[redacted]") && !out.contains("client_keys ="), "{out}");
        assert_eq!(c.access.client_keys.len(), 2);
    }

    #[test]
    fn an_empty_client_keys_variable_does_not_turn_off_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "k-1\n").unwrap();
        let text = format!("{STATIC}[access]\nclient_keys_file = \"{}\"\n", keys.display());
        let c = Config::from_toml(&text, &env_of(&[("ZAPSIGN_PROXY_CLIENT_KEYS", " , ")])).unwrap();
        assert_eq!(c.access.client_keys.len(), 1);
    }

    #[test]
    fn sizes_render_as_sizes_that_parse_back() {
        for n in [0, 1, 1000, 1 << 10, 3 << 20, (16 << 20) + 1, 5 << 30, u64::MAX] {
            assert_eq!(parse_size("k", &format_size(n)).unwrap(), n, "{}", format_size(n));
        }
        assert_eq!(format_size(16 << 20), "16MiB");
    }

    #[test]
    fn log_level_takes_levels_and_target_directives_only() {
        for good in [
            "info",
            "TRACE",
            "off",
            "warn,zapsign_proxy=debug",
            "info,zapsign_proxy=debug",
            "zapsign_proxy::auth=trace",
            "info, hyper=warn ,",
        ] {
            let normal = parse_log_filter(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(parse_log_filter(&normal), Ok(normal.clone()));
        }
        for bad in [
            "verbose",
            "",
            " , ",
            "info,verbose",
            "zapsign_proxy=loud",
            "=debug",
            "3",
            "info,[{=x",
        ] {
            assert!(parse_log_filter(bad).is_err(), "{bad:?} passed");
        }
        let err = Config::from_toml(&format!("{STATIC}[log]\nlevel = \"verbose\"\n"), &env_of(&[])).unwrap_err();
        assert!(
            err.to_string().contains("log.level") && err.to_string().contains("verbose"),
            "{err}"
        );
    }

    #[test]
    fn rust_log_overrides_log_level_and_a_bad_one_is_ignored() {
        let text = format!("{STATIC}[log]\nlevel = \"warn\"\n");
        let c = Config::from_toml(&text, &env_of(&[("RUST_LOG", "debug,hyper=info")])).unwrap();
        assert_eq!(c.log.level, "debug,hyper=info");
        assert!(c.log.level_from_rust_log && c.log.rust_log_refused.is_none());
        assert!(c.to_redacted_toml().contains("level = \"debug,hyper=info\""));
        let c = Config::from_toml(&text, &env_of(&[("RUST_LOG", "verbose")])).unwrap();
        assert_eq!(c.log.level, "warn");
        let why = c.log.rust_log_refused.unwrap();
        assert!(why.contains("RUST_LOG") && why.contains("verbose"), "{why}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[server]\nshutdown_grace = \"soon\"\nmax_connections = 0\n[log]\nlevel = \"verbose\"\n";
        let err = Config::from_toml(text, &env_of(&[])).unwrap_err();
        let keys: Vec<String> = err
            .problems()
            .iter()
            .map(|p| match p {
                ConfigError::Invalid { key, .. } => key.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                "server.max_connections",
                "server.shutdown_grace",
                "auth.organization_id",
                "auth.username",
                "auth.password",
                "log.level"
            ],
            "{err}"
        );
        // One a line, each naming its key.
        let shown = err.to_string();
        assert_eq!(shown.lines().count(), 7, "{shown}");
        assert!(shown.lines().skip(1).all(|l| l.starts_with("  - `")), "{shown}");
        // A value present but wrong is not also reported missing.
        let err = Config::from_toml(
            "[auth]\norganization_id = \"x1\"\nusername = \"u\"\npassword = \"\"\n",
            &env_of(&[]),
        )
        .unwrap_err();
        assert_eq!(err.problems().len(), 2, "{err}");
        assert!(!err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn wrong_keys_in_several_sections_are_all_named() {
        let err =
            Config::from_toml("[server]\nlisten_addr = 1\n[log]\nlevl = \"x\"\n[nope]\n", &env_of(&[])).unwrap_err();
        let shown = err.to_string();
        for name in ["listen_addr", "levl", "[nope]"] {
            assert!(shown.contains(name), "{name} not named: {shown}");
        }
        // One alone keeps the parser's message, which points at the line.
        let err = Config::from_toml("[server]\nlisten_addr = 1\n", &env_of(&[])).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn empty_admin_listen_disables_it() {
        let c = Config::from_toml(&format!("{STATIC}[admin]\nlisten = \"\"\n"), &env_of(&[])).unwrap();
        assert!(c.admin.listen.is_none());
    }

    #[test]
    fn inline_and_file_secret_together_is_an_error() {
        let err = Config::from_toml(
            "[auth]\nmode = \"static\"\napi_token = \"a\"\napi_token_file = \"/etc/hostname\"\n",
            &env_of(&[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("auth.api_token"), "{err}");
    }
}
