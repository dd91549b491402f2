//! The config target's checks, shared by fuzz_targets/config.rs and the main crate's tests/fuzz_regressions.rs
//! (which replays fuzz/regressions/config/* without libFuzzer). See fuzz/README.md.

use std::path::Path;

use zapsign_proxy::config::{Auth, ClientKey, Config};
use zapsign_proxy::secret::Secret;

/// The variables `src/config/env.rs` reads, in the order the `\0`-separated values after the TOML text fill them.
const ENV_NAMES: &[&str] = &[
    "ZAPSIGN_PASSWORD",
    "ZAPSIGN_API_TOKEN",
    "ZAPSIGN_PROXY_CLIENT_KEYS",
    "ZAPSIGN_ORGANIZATION_ID",
    "ZAPSIGN_USERNAME",
    "ZAPSIGN_PROXY_LISTEN",
    "ZAPSIGN_PROXY_ADMIN_LISTEN",
    "ZAPSIGN_PROXY_UPSTREAM_URL",
    "ZAPSIGN_PROXY_WORKERS",
    "RUST_LOG",
];

/// Each secret, the file key that can hold it, and the variable that can give it: `--check-config` shows the
/// file key, or else only a comment saying the secret is set.
const SECRETS: &[(&str, &str, &str)] = &[
    ("auth.password", "password_file", "ZAPSIGN_PASSWORD"),
    ("auth.api_token", "api_token_file", "ZAPSIGN_API_TOKEN"),
    ("access.client_keys", "client_keys_file", "ZAPSIGN_PROXY_CLIENT_KEYS"),
];

/// The keys `src/config` opens as files.
const FILE_KEYS: &[(&str, &str)] = &[
    ("server", "tls_cert_file"),
    ("server", "tls_key_file"),
    ("upstream", "ca_file"),
    ("auth", "password_file"),
    ("auth", "api_token_file"),
    ("access", "client_keys_file"),
];

/// Whether a path the config names is safe to open from a fuzzer: missing, a directory, or a small regular file
/// outside /dev, /proc, /sys and /run (a FIFO would block `open`, /dev/zero would never end `read_to_string`).
fn harmless_path(path: &str) -> bool {
    let Ok(real) = std::fs::canonicalize(Path::new(path)) else {
        return true;
    };
    if ["/dev", "/proc", "/sys", "/run"].iter().any(|p| real.starts_with(p)) {
        return false;
    }
    match std::fs::metadata(&real) {
        Ok(m) => m.is_dir() || (m.is_file() && m.len() <= 1 << 20),
        Err(_) => true,
    }
}

/// Skips inputs whose file keys name something that would hang or exhaust the fuzzer (not the code under test).
fn files_are_harmless(text: &str) -> bool {
    let Ok(table) = toml::from_str::<toml::Table>(text) else {
        // `from_toml` uses the same parser: it fails before opening anything.
        return true;
    };
    FILE_KEYS.iter().all(|(section, key)| {
        match table.get(*section).and_then(|s| s.get(*key)).and_then(|v| v.as_str()) {
            Some(path) => harmless_path(path),
            None => true,
        }
    })
}

/// The same config with every secret replaced by another value.
fn with_other_secrets(config: &Config) -> Config {
    let other = || Secret::new("\u{1}other-secret\u{1}");
    let mut c = config.clone();
    match &mut c.auth.mode {
        Auth::Jwt(jwt) => jwt.password = other(),
        Auth::Static(token) => token.api_token = other(),
    }
    c.access.client_keys = c
        .access
        .client_keys
        .iter()
        .map(|k| ClientKey {
            id: k.id.clone(),
            key: other(),
        })
        .collect();
    c
}

fn check_one(text: &str, env: &dyn Fn(&str) -> Option<String>) {
    match Config::from_toml(text, env) {
        Err(err) => {
            let msg = err.to_string();
            assert!(!msg.trim().is_empty(), "empty error message for {err:?}");
        }
        Ok(config) => {
            let rendered = config.to_redacted_toml();
            assert!(
                !rendered.starts_with("# cannot render"),
                "a valid config does not render: {rendered}"
            );
            // The rendering must not depend on the secrets' values: same text with other secrets.
            let other = with_other_secrets(&config);
            assert_eq!(
                rendered,
                other.to_redacted_toml(),
                "a secret value reached the rendered config"
            );
            assert_eq!(
                format!("{config:?}"),
                format!("{other:?}"),
                "a secret value reached Debug output"
            );
            // A secret never renders, not even redacted: the rendering is a config file, loadable again.
            let table: toml::Table = toml::from_str(&rendered)
                .unwrap_or_else(|e| panic!("the rendered config is not TOML ({e}): {rendered}"));
            let auth = table.get("auth").and_then(|a| a.as_table()).expect("rendered [auth]");
            for key in ["password", "api_token"] {
                assert!(auth.get(key).is_none(), "auth.{key} rendered: {rendered}");
            }
            let access = table
                .get("access")
                .and_then(|a| a.as_table())
                .expect("rendered [access]");
            assert!(
                access.get("client_keys").is_none(),
                "access.client_keys rendered: {rendered}"
            );
            // Where a secret is set, the rendering says where from: its file key, or a comment. Each mode holds
            // its own secret: the password in JWT mode, the API token in static mode.
            let set = [
                matches!(config.auth.mode, Auth::Jwt(_)),
                matches!(config.auth.mode, Auth::Static(_)),
                !config.access.client_keys.is_empty(),
            ];
            let mut needs_inline = false;
            for ((key, file_key, var), set) in SECRETS.iter().zip(set) {
                let comment = rendered.contains(&format!("# {key}: set, not shown\n"));
                let from_file = text_sets(&rendered, file_key) && !comment;
                assert_eq!(
                    set,
                    comment || from_file,
                    "{key}: set {set}, comment {comment}: {rendered}"
                );
                needs_inline |= comment && env(var).is_none_or(|v| v.is_empty());
            }
            // Fed back with the same environment, the rendering loads and renders the same; unless an inline
            // secret had to be left out (only a comment says it was set).
            if !needs_inline {
                let again = Config::from_toml(&rendered, env)
                    .unwrap_or_else(|e| panic!("the rendered config does not load ({e}):\n{rendered}"));
                assert_eq!(
                    again.to_redacted_toml(),
                    rendered,
                    "the rendering does not load to itself"
                );
            }
        }
    }
}

/// Whether the rendered text sets `key` (in any section).
fn text_sets(rendered: &str, key: &str) -> bool {
    rendered.lines().any(|l| l.starts_with(&format!("{key} = ")))
}

/// Parses the input as `<toml text>\0<env values>` and checks every invariant; panics on a violation.
pub fn check(data: &[u8]) {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    // `<toml text>\0<value of ENV_NAMES[0]>\0<value of ENV_NAMES[1]>...`; an empty value leaves the variable unset.
    let mut parts = input.split('\0');
    let text = parts.next().unwrap_or("");
    if !files_are_harmless(text) {
        return;
    }
    check_one(text, &|_| None);
    let values: Vec<&str> = parts.collect();
    if values.is_empty() {
        return;
    }
    let env = |name: &str| {
        let i = ENV_NAMES.iter().position(|n| *n == name)?;
        values.get(i).filter(|v| !v.is_empty()).map(|v| (*v).to_owned())
    };
    check_one(text, &env);
}
