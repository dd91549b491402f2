//! `--check-config`: the effective configuration as a config file. Fed back with the same environment it loads
//! to the same configuration and renders the same text, and it never holds a secret.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serializer;

use super::values::format_size;
use super::Config;

impl Config {
    /// The effective configuration as a config file (`--check-config`): fed back with the same environment it
    /// loads to the same configuration and renders the same text. Secrets never appear: one read from a file
    /// shows as its file key, one given inline or by the environment only as a comment
    /// (`# auth.password: set, not shown`). Only the keys of the mode in use are written.
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
}

pub(super) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// An absent address as `""`, which is how the file turns the listener off.
pub(super) fn ser_opt_addr<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_str(""),
    }
}

/// As the largest binary unit that divides it (`"16MiB"`), else a plain byte count, as a string.
pub(super) fn ser_size<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_size(*n))
}

pub(super) fn ser_networks<S: Serializer>(n: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(n.iter().map(|n| n.to_string()))
}
