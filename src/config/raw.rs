//! The config file as written: one serde struct per section, exactly the keys of the contract, unknown keys
//! rejected. Every key is optional here; defaults and rules are applied by validation (`validate.rs`), after
//! the environment overrides (`env.rs`) have been written over these structs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use super::error::{ConfigError, Problems};
use super::values::ClientKey;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) access: RawAccess,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) pacing: RawPacing,
    #[serde(default)]
    pub(super) shared: RawShared,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) tls_cert_file: Option<PathBuf>,
    pub(super) tls_key_file: Option<PathBuf>,
    /// A whole number in the file; kept as text because `ZAPSIGN_PROXY_WORKERS` writes text here too, and
    /// validation checks both the same way.
    #[serde(default, deserialize_with = "whole_number_as_text")]
    pub(super) workers: Option<String>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<String>,
    pub(super) connect_timeout: Option<String>,
    pub(super) response_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) max_idle_connections: Option<usize>,
    pub(super) ca_file: Option<PathBuf>,
}

/// The organization id: a string of digits, or a TOML integer.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawOrganizationId {
    Text(String),
    Number(i64),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub(super) mode: Option<String>,
    pub(super) organization_id: Option<RawOrganizationId>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) api_token: Option<String>,
    pub(super) api_token_file: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) refresh_margin: Option<String>,
    pub(super) replay_buffer: Option<String>,
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    pub(super) allow_networks: Option<Vec<String>>,
    pub(super) client_keys_file: Option<PathBuf>,
    pub(super) allow_paths: Option<Vec<String>>,
    /// Keys given by `ZAPSIGN_PROXY_CLIENT_KEYS`. Never read from the file: a key has no place in a config file
    /// (`client_keys_file` names a file of them), so `client_keys = ...` stays an unknown key.
    #[serde(skip)]
    pub(super) client_keys: Option<Vec<ClientKey>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
    pub(super) level: Option<String>,
    /// `RUST_LOG`, which wins over `level` when it is a valid filter. Never read from the file.
    #[serde(skip)]
    pub(super) rust_log: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPacing {
    /// A whole number in the file; kept as text because `ZAPSIGN_PROXY_PACING_LIMIT` writes text here too.
    #[serde(default, deserialize_with = "whole_number_as_text")]
    pub(super) limit: Option<String>,
    pub(super) period: Option<String>,
    pub(super) max_wait: Option<String>,
    pub(super) queue_limit: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShared {
    pub(super) redis_url: Option<String>,
    pub(super) redis_password_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) key_prefix: Option<String>,
    /// A whole number in the file; kept as text because `ZAPSIGN_PROXY_REPLICAS` writes text here too.
    #[serde(default, deserialize_with = "whole_number_as_text")]
    pub(super) replicas: Option<String>,
    /// The Redis password given by `ZAPSIGN_PROXY_REDIS_PASSWORD`. Never read from the file: the contract has no
    /// inline key for it (`redis_password_file` names a file), so `redis_password = ...` stays an unknown key.
    #[serde(skip)]
    pub(super) redis_password: Option<String>,
    /// The sealing key's hex given by `ZAPSIGN_PROXY_SHARED_KEY`. Never read from the file, for the same reason.
    #[serde(skip)]
    pub(super) key: Option<String>,
}

/// A TOML integer that must fit `usize`, as its decimal text.
fn whole_number_as_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<usize>::deserialize(d)?.map(|n| n.to_string()))
}

/// The TOML text as the raw structs. A syntax error ends the parse at once; a wrong key or type is then looked
/// for in every section, so all of them are named together (one alone keeps the parser's message, which
/// points at the line).
pub(super) fn parse_raw(text: &str, origin: &Path) -> Result<RawConfig, ConfigError> {
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
            "pacing" => value.try_into::<RawPacing>().map(drop),
            "shared" => value.try_into::<RawShared>().map(drop),
            other => {
                p.note(parse_error(format!(
                    "unknown section `[{other}]`; the sections are server, admin, upstream, auth, access, log, pacing and shared"
                )));
                continue;
            }
        };
        if let Err(e) = checked {
            p.note(parse_error(format!("in [{section}]: {}", one_line(e))));
        }
    }
    match p.len() {
        0 | 1 => Err(whole),
        _ => p.finish(RawConfig::default()),
    }
}
