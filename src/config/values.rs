//! The value types and parsers validation is built from: base URLs, addresses, durations, sizes, log filters,
//! the organization id, secret files and client keys. Each parser names the key in its error and says how to
//! fix the value.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::{Serialize, Serializer};

use super::error::ConfigError;
use crate::secret::Secret;

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

pub(super) fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("`{text}` is not an address"),
            "write IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::]:8080\"",
        )
    })
}

pub(super) fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(drop).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("cannot read {}: {e}", path.display()),
            "check the path and that the proxy's user may read it",
        )
    })
}

pub(super) fn parse_duration(key: &str, text: Option<String>, default: &str) -> Result<Duration, ConfigError> {
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

/// The text form of a size that [`parse_size`] reads back to the same number.
pub fn format_size(n: u64) -> String {
    for (unit, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n > 0 && n % factor == 0 {
            return format!("{}{unit}", n / factor);
        }
    }
    n.to_string()
}

/// Checks a log filter against the contract's `log.level`: `error`, `warn`, `info`, `debug`, `trace` (or `off`),
/// or comma-separated `target=level` directives; returns it without the blanks `EnvFilter` would stumble on.
/// `EnvFilter` alone takes a bare word such as `verbose` as a target name (trace for a module called `verbose`,
/// nothing for anything else): such a word is refused here, so a typo never silences the log.
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

pub(super) fn check_org_id(key: &str, value: String) -> Result<String, ConfigError> {
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

/// The keys of `access.client_keys_file`; a file with none is refused (it would silently admit every caller).
pub(super) fn read_client_keys_file(path: &Path) -> Result<Vec<ClientKey>, ConfigError> {
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
pub(super) fn parse_client_keys(text: &str) -> Vec<ClientKey> {
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

/// `shared.redis_url`: a `redis://` or `rediss://` URL the `redis` crate accepts, holding no password (that
/// comes from `shared.redis_password_file` or `ZAPSIGN_PROXY_REDIS_PASSWORD`, so the URL is never a secret and
/// its `Debug`, `--check-config` and logs can show it as written). A user name (Redis ACL user) may stay.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// As written, without surrounding white space.
    text: String,
    /// `rediss://`: TLS to Redis.
    tls: bool,
}

impl RedisUrl {
    /// Parses and checks `text` for `key` (the key's name as errors show it). The error never repeats a URL that
    /// holds user info, which may be a password.
    pub(super) fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        use redis::IntoConnectionInfo;
        let fix = "write it as redis://HOST:PORT/DB, or rediss://HOST:PORT/DB for TLS";
        let text = text.trim();
        let shown = if text.contains('@') {
            "the URL".to_owned()
        } else {
            format!("`{text}`")
        };
        let tls = match text.split_once("://").map(|(scheme, _)| scheme) {
            Some("redis") => false,
            Some("rediss") => true,
            Some(other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("scheme `{other}` is not supported"),
                    fix,
                ))
            }
            None => return Err(ConfigError::invalid(key, format!("{shown} has no scheme"), fix)),
        };
        if text.contains('#') {
            // The redis crate reads `#insecure` as "do not check Redis's certificate".
            return Err(ConfigError::invalid(
                key,
                "a `#` fragment in the URL is not supported (`#insecure` would turn off certificate checks)",
                "remove it; for a Redis certificate from a private CA set shared.ca_file",
            ));
        }
        let info = text
            .into_connection_info()
            .map_err(|e| ConfigError::invalid(key, format!("{shown} is not a Redis URL ({e})"), fix))?;
        if info.redis_settings().password().is_some() {
            return Err(ConfigError::invalid(
                key,
                "the URL holds a password",
                "remove it from the URL and write it into the file named by shared.redis_password_file \
                 (or set ZAPSIGN_PROXY_REDIS_PASSWORD), so it is never shown with the URL",
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            tls,
        })
    }

    /// The URL as written, for the Redis client (never holds a password).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it is `rediss://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// The PEM file of `key` (`shared.ca_file`) as bytes, checked to hold at least one certificate, each usable as a
/// trust anchor, and nothing malformed, so a wrong file fails at start instead of at every TLS handshake with
/// Redis.
pub(super) fn read_pem_roots(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let fix = "give a PEM file with -----BEGIN CERTIFICATE----- blocks (the CA that signed Redis's certificate)";
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display()), fix))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::invalid(key, format!("{} is not valid PEM: {e}", path.display()), fix))?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{} holds no certificate", path.display()),
            fix,
        ));
    }
    // The Redis client makes a trust anchor of each; one it cannot use would fail every connection.
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            ConfigError::invalid(
                key,
                format!("{} holds a certificate that is not a usable CA ({e})", path.display()),
                fix,
            )
        })?;
    }
    Ok(bytes)
}

/// Checks `shared.key_prefix`: the first part of every Redis key (`<prefix>:<scope>:token`). Refused: empty,
/// white space or control characters (they break `redis-cli` and key listings), glob characters `*?[]\`
/// (so `SCAN MATCH '<prefix>:*'` finds exactly the proxy's keys), and a `:` at either end (the proxy adds the
/// separator itself). Inner `:` and Redis Cluster hash tags (`{zapsign}`) are allowed.
pub(super) fn check_key_prefix(key: &str, prefix: String) -> Result<String, ConfigError> {
    let fix = "use letters, digits and -_.: such as \"zapsign-proxy\" or \"prod:zapsign-proxy\"";
    let problem = if prefix.is_empty() {
        Some("is empty".to_owned())
    } else if let Some(c) = prefix.chars().find(|c| c.is_whitespace() || c.is_control()) {
        Some(format!("holds white space or a control character ({c:?})"))
    } else if let Some(c) = prefix.chars().find(|c| matches!(c, '*' | '?' | '[' | ']' | '\\')) {
        Some(format!("holds the glob character `{c}`"))
    } else if prefix.starts_with(':') || prefix.ends_with(':') {
        Some(format!(
            "`{prefix}` starts or ends with `:`; the proxy adds the separator"
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ConfigError::invalid(key, problem, fix)),
        None => Ok(prefix),
    }
}
