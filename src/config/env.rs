//! Environment overrides: the one place the configuration reads environment variables. Each variable of the
//! contract is written over the raw file value it overrides, before validation, so validation sees one value
//! per key and only needs to know where it came from (to name `server.listen (from ZAPSIGN_PROXY_LISTEN)` in
//! an error, and to keep a secret given this way out of `--check-config`).

use super::raw::{RawConfig, RawOrganizationId};
use super::values::parse_client_keys;

/// Reads environment variables; tests pass a map instead of the process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, for [`super::Config::load`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// One environment variable and the key it overrides.
struct Override {
    /// The variable.
    var: &'static str,
    /// The config key it stands for.
    key: &'static str,
    /// Writes the variable's value over the file's; `false` when the value counts as unset and the file's
    /// value stays.
    write: fn(&mut RawConfig, String) -> bool,
}

/// Every variable the configuration reads. A blank secret or key list counts as unset (an empty
/// `ZAPSIGN_PROXY_CLIENT_KEYS` must not quietly turn off the keys the file requires); a blank address does
/// not (`ZAPSIGN_PROXY_ADMIN_LISTEN=""` turns the admin listener off, as `admin.listen = ""` does). A blank
/// `ZAPSIGN_PROXY_REDIS_URL` counts as unset too: a manifest's empty placeholder must not turn off the sharing
/// the file asks for. The Redis password and the sealing key have no inline key in the file, so the variable
/// is their only inline form (`shared.redis_password`, `shared.key` in errors and `--check-config`).
static OVERRIDES: [Override; 15] = [
    Override {
        var: "ZAPSIGN_PROXY_LISTEN",
        key: "server.listen",
        write: |raw, v| set(&mut raw.server.listen, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_WORKERS",
        key: "server.workers",
        write: |raw, v| set(&mut raw.server.workers, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_ADMIN_LISTEN",
        key: "admin.listen",
        write: |raw, v| set(&mut raw.admin.listen, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_UPSTREAM_URL",
        key: "upstream.url",
        write: |raw, v| set(&mut raw.upstream.url, v),
    },
    Override {
        var: "ZAPSIGN_ORGANIZATION_ID",
        key: "auth.organization_id",
        write: |raw, v| set(&mut raw.auth.organization_id, RawOrganizationId::Text(v)),
    },
    Override {
        var: "ZAPSIGN_USERNAME",
        key: "auth.username",
        write: |raw, v| set(&mut raw.auth.username, v),
    },
    Override {
        var: "ZAPSIGN_PASSWORD",
        key: "auth.password",
        write: |raw, v| set_secret(&mut raw.auth.password, raw.auth.password_file.is_some(), v),
    },
    Override {
        var: "ZAPSIGN_API_TOKEN",
        key: "auth.api_token",
        write: |raw, v| set_secret(&mut raw.auth.api_token, raw.auth.api_token_file.is_some(), v),
    },
    Override {
        var: "ZAPSIGN_PROXY_CLIENT_KEYS",
        key: "access.client_keys",
        write: |raw, v| {
            let keys = parse_client_keys(&v.replace(',', "\n"));
            !keys.is_empty() && set(&mut raw.access.client_keys, keys)
        },
    },
    Override {
        var: "ZAPSIGN_PROXY_PACING_LIMIT",
        key: "pacing.limit",
        write: |raw, v| set(&mut raw.pacing.limit, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_REDIS_URL",
        key: "shared.redis_url",
        write: |raw, v| !v.trim().is_empty() && set(&mut raw.shared.redis_url, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_REDIS_PASSWORD",
        key: "shared.redis_password",
        write: |raw, v| set_secret(&mut raw.shared.redis_password, false, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_SHARED_KEY",
        key: "shared.key",
        write: |raw, v| set_secret(&mut raw.shared.key, false, v),
    },
    Override {
        var: "ZAPSIGN_PROXY_REPLICAS",
        key: "shared.replicas",
        write: |raw, v| set(&mut raw.shared.replicas, v),
    },
    Override {
        var: "RUST_LOG",
        key: "log.level",
        write: |raw, v| !v.trim().is_empty() && set(&mut raw.log.rust_log, v),
    },
];

fn set<T>(slot: &mut Option<T>, value: T) -> bool {
    *slot = Some(value);
    true
}

/// A secret from the environment replaces the file's inline value, and wins over its file key (which is then
/// not read). A blank one counts as unset. A file that gives the secret both inline and by file keeps that
/// conflict, so it is reported whatever the environment says.
fn set_secret(inline: &mut Option<String>, file_given: bool, value: String) -> bool {
    if value.is_empty() || (inline.is_some() && file_given) {
        return false;
    }
    set(inline, value)
}

/// The keys the environment set.
#[derive(Debug, Default)]
pub(super) struct Sources(Vec<&'static Override>);

impl Sources {
    /// Whether the environment set `key`.
    pub(super) fn has(&self, key: &str) -> bool {
        self.0.iter().any(|o| o.key == key)
    }

    /// `key` as errors name it: `server.listen (from ZAPSIGN_PROXY_LISTEN)` when the environment set it.
    pub(super) fn name(&self, key: &str) -> String {
        match self.0.iter().find(|o| o.key == key) {
            Some(o) => format!("{key} (from {})", o.var),
            None => key.to_owned(),
        }
    }
}

/// Writes every variable `env` holds over `raw`, and says which keys it set.
pub(super) fn apply_overrides(raw: &mut RawConfig, env: EnvLookup<'_>) -> Sources {
    let mut sources = Sources::default();
    for o in &OVERRIDES {
        if let Some(value) = env(o.var) {
            if (o.write)(raw, value) {
                sources.0.push(o);
            }
        }
    }
    sources
}

impl std::fmt::Debug for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.key, self.var)
    }
}
