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
mod types;
mod validate;
mod values;

use std::path::Path;

pub use env::{process_env, EnvLookup};
pub use error::ConfigError;
pub use types::{
    AccessConfig, AdminConfig, Auth, AuthConfig, Config, JwtAuth, LogConfig, LogFormat, ServerConfig, ServerTls,
    SharedConfig, StaticAuth, UpstreamConfig,
};
pub use values::{format_size, parse_log_filter, parse_size, read_secret_file, BaseUrl, ClientKey, RedisUrl};

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
