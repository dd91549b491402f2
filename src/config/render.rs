//! `--check-config`: the effective configuration as a config file. Fed back with the same environment it loads
//! to the same configuration and renders the same text, and it never holds a secret.

use super::types::{Config, PacingKeys};

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
            ("pacing", toml::to_string_pretty(&PacingKeys::of(self.pacing.as_ref()))),
        ];
        // `[shared]` only when set: without `shared.redis_url` any shared key is an error.
        let shared = self.shared.as_ref().map(|s| ("shared", toml::to_string_pretty(s)));
        let mut out = String::new();
        for (name, body) in sections.into_iter().chain(shared) {
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
