//! What `zapsign-proxy demo` and `zapsign-proxy mock-upstream` set up and print: the demo's configuration
//! (the mock's credentials unless a config file brings its own), the mock started as its upstream, and the
//! lines that tell a newcomer what to try. The binary keeps the runtime, logging and signals.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::config::{process_env, Auth, BaseUrl, Config, ConfigError};

use super::service::MockZapSign;
use super::state::{MockConfig, DEMO_API_TOKEN, DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};

/// Why the demo's mock could not stand in for ZapSign.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The mock could not bind a port on 127.0.0.1.
    #[error("cannot start the demo mock")]
    Start(#[source] std::io::Error),
    /// The mock's address did not make a valid `upstream.url`.
    #[error(transparent)]
    Url(#[from] ConfigError),
}

/// `[auth]` keys that make a config file bring its own credentials to the demo.
const CREDENTIAL_KEYS: [&str; 7] = [
    "mode",
    "organization_id",
    "username",
    "password",
    "password_file",
    "api_token",
    "api_token_file",
];

/// The demo's configuration, and whether the bundled mock stands in for ZapSign. Defaults, the file (with
/// `--config`) and the environment apply as usual, except that the demo brings the mock's credentials unless the
/// file names its own (any of `CREDENTIAL_KEYS`), and the mock unless the file sets `upstream.url`. Without the
/// file's own credentials, real credentials in the environment are ignored: the demo never sends them anywhere.
pub fn config(path: Option<&Path>) -> Result<(Config, bool), ConfigError> {
    let mut file = toml::Table::new();
    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        file = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
    }
    let section_has = |section: &str, keys: &[&str]| {
        file.get(section)
            .and_then(toml::Value::as_table)
            .is_some_and(|table| keys.iter().any(|key| table.contains_key(*key)))
    };
    let own_credentials = section_has("auth", &CREDENTIAL_KEYS);
    let mock = !section_has("upstream", &["url"]);
    if !own_credentials {
        if let Some(auth) = file
            .entry("auth")
            .or_insert_with(|| toml::Table::new().into())
            .as_table_mut()
        {
            auth.insert("organization_id".into(), DEMO_ORGANIZATION_ID.into());
            auth.insert("username".into(), DEMO_USERNAME.into());
            auth.insert("password".into(), DEMO_PASSWORD.into());
        }
    }
    let env = |name: &str| match name {
        "ZAPSIGN_API_TOKEN" | "ZAPSIGN_PASSWORD" | "ZAPSIGN_USERNAME" | "ZAPSIGN_ORGANIZATION_ID"
            if !own_credentials =>
        {
            None
        }
        "ZAPSIGN_PROXY_UPSTREAM_URL" if mock => None,
        other => process_env(other),
    };
    let origin = path.unwrap_or(Path::new("<demo>"));
    let mut config = Config::from_toml_of(&file.to_string(), origin, &env)?;
    config.server.workers = config.server.workers.min(2);
    Ok((config, mock))
}

/// Starts the mock on a free port and points `upstream.url` at it (and `auth.url`, unless the file sent the
/// auth calls elsewhere). The mock runs until the returned handle is dropped.
pub async fn start_stand_in(config: &mut Config) -> Result<MockZapSign, DemoError> {
    // Ten-minute access tokens, so a newcomer watching the log sees refreshes happen.
    let mock_cfg = MockConfig {
        access_ttl: Duration::from_secs(600),
        ..MockConfig::default()
    };
    let mock = MockZapSign::start(mock_cfg).await.map_err(DemoError::Start)?;
    let url = BaseUrl::parse("upstream.url", &mock.url())?;
    if let Auth::Jwt(jwt) = &mut config.auth.mode {
        if jwt.url.text == config.upstream.url.text {
            jwt.url = url.clone();
        }
    }
    config.upstream.url = url;
    Ok(mock)
}

/// Tells a newcomer what to try against the demo's proxy (and admin listener). Write errors are ignored:
/// `demo | head -1` must not kill the proxy.
pub fn print_help(proxy: SocketAddr, admin: Option<SocketAddr>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "zapsign-proxy demo: proxy on http://{proxy}, mock ZapSign behind it. Try:"
    );
    let _ = writeln!(
        out,
        "  curl -s 'http://{proxy}/api/v1/docs/?page=1&api_token=stale-caller-token'"
    );
    let _ = writeln!(
        out,
        "The mock echoes what it received: note the injected Authorization and the removed api_token."
    );
    if let Some(admin) = admin {
        let _ = writeln!(out, "  curl -s http://{admin}/readyz");
    }
    let _ = out.flush();
}

/// Tells who runs `mock-upstream` where it listens and which credentials it accepts (none is a secret).
pub fn print_mock_upstream_help(listen: SocketAddr) {
    let _ = writeln!(
        std::io::stdout(),
        "mock ZapSign on http://{listen}: static token {DEMO_API_TOKEN:?}; login organization \
         {DEMO_ORGANIZATION_ID:?}, username {DEMO_USERNAME:?}, password {DEMO_PASSWORD:?}"
    );
}
