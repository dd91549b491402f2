//! Raw values to the typed [`Config`]: defaults, rules, and the mode that decides which settings exist.
//! Every problem is noted and validation goes on, so one run names all of them; a section with a problem gets a
//! stand-in value that never leaves this module ([`Problems::finish`] returns the problems instead).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::env::{apply_overrides, EnvLookup, Sources};
use super::error::{ConfigError, Problems};
use super::raw::{
    RawAccess, RawAdmin, RawAuth, RawConfig, RawLog, RawOrganizationId, RawPacing, RawServer, RawShared, RawUpstream,
};
use super::types::{
    AccessConfig, AdminConfig, Auth, AuthConfig, Config, JwtAuth, LogConfig, LogFormat, ServerConfig, ServerTls,
    SharedConfig, StaticAuth, UpstreamConfig,
};
use super::values::{
    check_key_prefix, check_org_id, check_readable, parse_addr, parse_duration, parse_log_filter, parse_size,
    read_client_keys_file, read_pem_roots, read_secret_file, BaseUrl, RedisUrl,
};
use crate::secret::Secret;
use crate::shared::seal::SealKey;

/// Applies the environment over `raw` and validates the result.
pub(super) fn config(mut raw: RawConfig, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
    let sources = apply_overrides(&mut raw, env);
    let mut p = Problems::default();
    let mut secrets_not_shown = Vec::new();
    let server = server(raw.server, &sources, &mut p);
    let admin = admin(raw.admin, &sources, &mut p);
    let upstream = upstream(raw.upstream, &sources, &mut p);
    let auth = auth(raw.auth, &upstream.url, &sources, &mut p, &mut secrets_not_shown);
    let access = access(raw.access, &sources, &mut p, &mut secrets_not_shown);
    let log = log(raw.log, &mut p);
    let pacing = pacing(raw.pacing, &sources, &mut p);
    let shared = shared(raw.shared, &auth.mode, &sources, &mut p, &mut secrets_not_shown);
    p.finish(Config {
        server,
        admin,
        upstream,
        auth,
        access,
        log,
        pacing,
        shared,
        secrets_not_shown,
    })
}

/// `shared.*`: the settings, or `None` without `shared.redis_url` (this process works alone). Every key given
/// is checked either way; any of them given without `shared.redis_url` is an error, so a setup that means to
/// share (a key file mounted, `ZAPSIGN_PROXY_REPLICAS` set) but lost its URL to a typo never runs alone
/// unnoticed, spending the account's budget as if it were the only process.
fn shared(
    raw: RawShared,
    auth: &Auth,
    sources: &Sources,
    p: &mut Problems,
    not_shown: &mut Vec<&'static str>,
) -> Option<SharedConfig> {
    let url_key = sources.name("shared.redis_url");
    let url = match raw.redis_url.as_deref().map(str::trim) {
        // Blank counts as unset, as the environment's blank does: a template's empty placeholder means alone.
        Some("") | None => Ok(None),
        Some(text) => RedisUrl::parse(&url_key, text).map(Some),
    };
    let url_given = url.as_ref().map_or(true, Option::is_some);
    let url = p.ok(url).flatten();
    let given: Vec<String> = [
        ("shared.redis_password_file", raw.redis_password_file.is_some()),
        ("shared.redis_password", raw.redis_password.is_some()),
        ("shared.ca_file", raw.ca_file.is_some()),
        ("shared.key_file", raw.key_file.is_some()),
        ("shared.key", raw.key.is_some()),
        ("shared.key_prefix", raw.key_prefix.is_some()),
        ("shared.replicas", raw.replicas.is_some()),
    ]
    .into_iter()
    .filter(|(_, given)| *given)
    .map(|(key, _)| sources.name(key))
    .collect();
    if !url_given && !given.is_empty() {
        p.note(ConfigError::invalid(
            "shared.redis_url",
            format!(
                "missing, but {} {} set: without it this process works alone, as if no other process spent the account",
                given.join(", "),
                if given.len() == 1 { "is" } else { "are" },
            ),
            "set shared.redis_url (or ZAPSIGN_PROXY_REDIS_URL) to share the account with the other processes, or remove the shared keys to run alone",
        ));
    }
    let password = secret(
        sources,
        ("shared.redis_password", raw.redis_password),
        ("shared.redis_password_file", raw.redis_password_file.as_deref()),
    );
    let password = p.ok(password).flatten();
    let ca_pem = raw
        .ca_file
        .as_deref()
        .and_then(|path| p.ok(read_pem_roots("shared.ca_file", path)));
    if let (Some(url), Some(_)) = (&url, &raw.ca_file) {
        if !url.is_tls() {
            p.note(ConfigError::invalid(
                "shared.ca_file",
                format!("is set but {url_key} is redis:// (no TLS), so it would never be used"),
                "use a rediss:// URL for TLS to Redis, or remove shared.ca_file",
            ));
        }
    }
    let key_given = raw.key.is_some() || raw.key_file.is_some();
    let key = secret(
        sources,
        ("shared.key", raw.key),
        ("shared.key_file", raw.key_file.as_deref()),
    )
    .and_then(|given| match given {
        Some(given) => {
            let key_name = if given.not_shown {
                sources.name("shared.key")
            } else {
                "shared.key_file".to_owned()
            };
            // The error says what is wrong (length, a non-hex character), never the key.
            let key = SealKey::from_hex(given.value.expose()).map_err(|e| {
                ConfigError::invalid(
                    &key_name,
                    e.to_string(),
                    "give every process of the account the same key (shared.key_file or ZAPSIGN_PROXY_SHARED_KEY)",
                )
            })?;
            Ok(Some((key, given.not_shown)))
        }
        None => Ok(None),
    });
    let key = p.ok(key).flatten();
    if url_given && !key_given {
        p.note(ConfigError::invalid(
            "shared.key_file",
            format!("is required with {url_key}: every token stored in Redis is sealed with it"),
            "create one with `openssl rand -hex 32 > shared.key`, and give the same file to every process as \
             shared.key_file (or its content as ZAPSIGN_PROXY_SHARED_KEY)",
        ));
    }
    let key_prefix = p.ok(check_key_prefix(
        "shared.key_prefix",
        raw.key_prefix.unwrap_or_else(|| "zapsign-proxy".to_owned()),
    ));
    let replicas = match raw.replicas {
        Some(text) => {
            let parsed = text.trim().parse::<u32>().ok().filter(|r| *r >= 1).ok_or_else(|| {
                ConfigError::invalid(
                    &sources.name("shared.replicas"),
                    format!("`{text}` is not a positive whole number"),
                    "set how many processes share the account (1 or more); alone each paces at limit / replicas",
                )
            });
            p.ok(parsed)
        }
        None => Some(1),
    };
    // Any problem above was noted, and `finish` returns it instead of this.
    let (redis_url, (key, key_not_shown), key_prefix, replicas) = (url?, key?, key_prefix?, replicas?);
    if password.as_ref().is_some_and(|given| given.not_shown) {
        not_shown.push("shared.redis_password");
    }
    if key_not_shown {
        not_shown.push("shared.key");
    }
    Some(SharedConfig {
        redis_url,
        password: password.map(|given| given.value),
        password_file: raw.redis_password_file,
        ca_file: raw.ca_file,
        ca_pem: ca_pem.map(std::sync::Arc::new),
        key: std::sync::Arc::new(key),
        key_file: raw.key_file,
        key_prefix,
        replicas,
        scope: auth.shared_scope(),
    })
}

/// `pacing.*`: the settings, or `None` when `pacing.limit = 0` turns pacing off. The other keys are checked
/// either way, so a typo does not wait for the day pacing is turned on.
fn pacing(raw: RawPacing, sources: &Sources, p: &mut Problems) -> Option<crate::pacing::Settings> {
    let limit = match raw.limit {
        Some(text) => {
            let parsed = text.trim().parse::<u32>().map_err(|_| {
                ConfigError::invalid(
                    &sources.name("pacing.limit"),
                    format!("`{text}` is not a whole number of requests"),
                    "set the account's requests per pacing.period (ZapSign: 500 a minute), or 0 to turn pacing off",
                )
            });
            p.ok(parsed)
        }
        None => Some(500),
    };
    let period = duration(p, "pacing.period", raw.period, "60s");
    let max_wait = duration(p, "pacing.max_wait", raw.max_wait, "30s");
    let queue_limit = raw.queue_limit.unwrap_or(1000);
    match limit {
        Some(0) | None => None,
        Some(limit) => Some(crate::pacing::Settings {
            limit,
            period,
            max_wait,
            queue_limit,
        }),
    }
}

fn server(raw: RawServer, sources: &Sources, p: &mut Problems) -> ServerConfig {
    let listen = p.or(
        parse_addr(
            &sources.name("server.listen"),
            raw.listen.as_deref().unwrap_or("127.0.0.1:8080"),
        ),
        SocketAddr::from(([127, 0, 0, 1], 8080)),
    );
    let workers = match raw.workers {
        Some(text) => {
            let parsed = text.trim().parse::<usize>().ok().filter(|w| *w >= 1).ok_or_else(|| {
                ConfigError::invalid(
                    &sources.name("server.workers"),
                    format!("`{text}` is not a positive whole number"),
                    "set 1 or more threads",
                )
            });
            p.or(parsed, 1)
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let tls_halves_match = raw.tls_cert_file.is_some() == raw.tls_key_file.is_some();
    if !tls_halves_match {
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
    let tls = match (raw.tls_cert_file, raw.tls_key_file) {
        (Some(cert_file), Some(key_file)) => Some(ServerTls { cert_file, key_file }),
        // Neither (plain HTTP), or only one, which is noted above.
        _ => None,
    };
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
        tls,
        workers,
        header_read_timeout: duration(p, "server.header_read_timeout", raw.header_read_timeout, "10s"),
        max_connections,
        shutdown_grace: duration(p, "server.shutdown_grace", raw.shutdown_grace, "30s"),
    }
}

/// A positive duration, `default` when the key is absent; a stand-in once a problem is noted.
fn duration(p: &mut Problems, key: &str, text: Option<String>, default: &str) -> Duration {
    p.or(parse_duration(key, text, default), Duration::ZERO)
}

fn admin(raw: RawAdmin, sources: &Sources, p: &mut Problems) -> AdminConfig {
    let listen = raw.listen.unwrap_or_else(|| "127.0.0.1:9090".to_owned());
    let listen = if listen.trim().is_empty() {
        None
    } else {
        p.ok(parse_addr(&sources.name("admin.listen"), &listen))
    };
    AdminConfig { listen }
}

fn upstream(raw: RawUpstream, sources: &Sources, p: &mut Problems) -> UpstreamConfig {
    let url = match raw.url {
        Some(url) => p.or(BaseUrl::parse(&sources.name("upstream.url"), &url), BaseUrl::zapsign()),
        None => BaseUrl::zapsign(),
    };
    if let Some(ca) = &raw.ca_file {
        p.ok(check_readable("upstream.ca_file", ca));
    }
    UpstreamConfig {
        url,
        connect_timeout: duration(p, "upstream.connect_timeout", raw.connect_timeout, "5s"),
        response_timeout: duration(p, "upstream.response_timeout", raw.response_timeout, "120s"),
        idle_timeout: duration(p, "upstream.idle_timeout", raw.idle_timeout, "50s"),
        max_idle_connections: raw.max_idle_connections.unwrap_or(32),
        ca_file: raw.ca_file,
    }
}

/// `auth.mode` as written.
enum Mode {
    Jwt,
    Static,
}

/// A secret as given: its value, and whether it was given inline or by the environment (then `--check-config`
/// can only say it is set; one from a file shows as its file key).
struct GivenSecret {
    value: Secret,
    not_shown: bool,
}

fn auth(
    raw: RawAuth,
    upstream: &BaseUrl,
    sources: &Sources,
    p: &mut Problems,
    not_shown: &mut Vec<&'static str>,
) -> AuthConfig {
    let mode = match raw.mode.as_deref().unwrap_or("jwt") {
        "jwt" => Some(Mode::Jwt),
        "static" => Some(Mode::Static),
        other => {
            p.note(ConfigError::invalid(
                "auth.mode",
                format!("`{other}` is not a mode"),
                "use \"jwt\" (username and password) or \"static\" (API token)",
            ));
            None
        }
    };
    // Every key given is checked whatever the mode, as a file may carry both modes' keys; only the mode's own
    // keys are kept. A value that is present but wrong is reported as such, never also as missing.
    let url = match raw.url {
        Some(u) => p.or(BaseUrl::parse("auth.url", &u), upstream.clone()),
        None => upstream.clone(),
    };
    let organization_given = raw.organization_id.is_some();
    let organization_key = sources.name("auth.organization_id");
    let organization_id = match raw.organization_id {
        Some(RawOrganizationId::Text(t)) => p.ok(check_org_id(&organization_key, t)),
        Some(RawOrganizationId::Number(n)) => p.ok(check_org_id(&organization_key, n.to_string())),
        None => None,
    };
    let username = raw.username.filter(|u| !u.trim().is_empty());
    let password = secret(
        sources,
        ("auth.password", raw.password),
        ("auth.password_file", raw.password_file.as_deref()),
    );
    let password_given = password.as_ref().map_or(true, Option::is_some);
    let password = p.ok(password).flatten();
    let api_token = secret(
        sources,
        ("auth.api_token", raw.api_token),
        ("auth.api_token_file", raw.api_token_file.as_deref()),
    );
    let api_token_given = api_token.as_ref().map_or(true, Option::is_some);
    let api_token = p.ok(api_token).flatten();
    // Missing keys first, then the shared values, in the order problems were always listed.
    match mode {
        Some(Mode::Jwt) => {
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
        Some(Mode::Static) if !api_token_given => {
            p.note(ConfigError::invalid(
                "auth.api_token",
                "missing for auth.mode = \"static\"",
                "set auth.api_token_file (preferred), auth.api_token or ZAPSIGN_API_TOKEN",
            ));
        }
        Some(Mode::Static) | None => {}
    }
    let replay_buffer = p.or(
        parse_size("auth.replay_buffer", raw.replay_buffer.as_deref().unwrap_or("16MiB")),
        0,
    );
    let refresh_margin = duration(p, "auth.refresh_margin", raw.refresh_margin, "5m");
    let timeout = duration(p, "auth.timeout", raw.timeout, "10s");
    // Only the mode's own keys are kept, and only its secret is named in `--check-config`.
    let mode = match (mode, organization_id, username, password, api_token) {
        (Some(Mode::Jwt), Some(organization_id), Some(username), Some(password), _) => {
            if password.not_shown {
                not_shown.push("auth.password");
            }
            Some(Auth::Jwt(JwtAuth {
                organization_id,
                username,
                password: password.value,
                password_file: raw.password_file,
                url,
                refresh_margin,
            }))
        }
        (Some(Mode::Static), _, _, _, Some(token)) => {
            if token.not_shown {
                not_shown.push("auth.api_token");
            }
            Some(Auth::Static(StaticAuth {
                api_token: token.value,
                api_token_file: raw.api_token_file,
            }))
        }
        // A missing, wrong or unknown mode's key: noted above.
        _ => None,
    };
    AuthConfig {
        mode: mode.unwrap_or_else(|| {
            debug_assert!(p.len() > 0, "no auth mode and no problem noted");
            // A stand-in that never leaves validation: a problem is noted, so `finish` returns it instead.
            Auth::Static(StaticAuth {
                api_token: Secret::new(""),
                api_token_file: None,
            })
        }),
        replay_buffer,
        timeout,
    }
}

/// A secret given by the environment (already written over the inline key, see `env.rs`), inline, or by
/// file; inline and file together is an error unless the environment gave it.
fn secret(
    sources: &Sources,
    (inline_key, inline): (&'static str, Option<String>),
    (file_key, file): (&str, Option<&Path>),
) -> Result<Option<GivenSecret>, ConfigError> {
    let from_env = sources.has(inline_key);
    if inline.is_some() && file.is_some() && !from_env {
        return Err(ConfigError::invalid(
            inline_key,
            format!("both {inline_key} and {file_key} are set"),
            format!("keep one (prefer {file_key})"),
        ));
    }
    if let Some(v) = inline {
        if v.is_empty() {
            return Err(ConfigError::invalid(
                inline_key,
                "is empty",
                "set the value or remove the key",
            ));
        }
        return Ok(Some(GivenSecret {
            value: Secret::new(v),
            not_shown: true,
        }));
    }
    match file {
        Some(path) => read_secret_file(file_key, path).map(|value| {
            Some(GivenSecret {
                value,
                not_shown: false,
            })
        }),
        None => Ok(None),
    }
}

fn access(raw: RawAccess, sources: &Sources, p: &mut Problems, not_shown: &mut Vec<&'static str>) -> AccessConfig {
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
    let client_keys = match raw.client_keys {
        Some(keys) => keys,
        None => match &raw.client_keys_file {
            Some(path) => p.or(read_client_keys_file(path), Vec::new()),
            None => Vec::new(),
        },
    };
    if sources.has("access.client_keys") {
        not_shown.push("access.client_keys");
    }
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

pub(super) fn log(raw: RawLog, p: &mut Problems) -> LogConfig {
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
    let (level, level_from_rust_log, rust_log_refused) = match raw.rust_log.map(|v| parse_log_filter(&v)) {
        Some(Ok(rust_log)) => (rust_log, true, None),
        Some(Err(problem)) => (
            level,
            false,
            Some(format!("RUST_LOG is ignored: {problem}; log.level applies")),
        ),
        None => (level, false, None),
    };
    LogConfig {
        format,
        level,
        level_from_rust_log,
        rust_log_refused,
    }
}
