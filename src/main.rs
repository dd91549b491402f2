//! The `zapsign-proxy` command: parses the command line, loads the configuration, sets up logging and the
//! runtime, and runs the proxy, the bundled mock, or both (`demo`). Exit codes: 0 clean shutdown, 1 runtime
//! failure, 2 bad command line or config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use zapsign_proxy::config::{process_env, Auth, Config, ConfigError};
use zapsign_proxy::mock::{self, MockConfig, MockZapSign};
use zapsign_proxy::{logging, reload, Listeners};

/// A reverse proxy in front of the ZapSign API that holds the credentials and injects a valid Bearer token.
#[derive(Debug, Parser)]
#[command(name = "zapsign-proxy", version, about)]
struct Cli {
    /// Configuration file (TOML); without one, defaults and environment variables apply.
    #[arg(long, env = "ZAPSIGN_PROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Validate the configuration, print it with secrets redacted, and exit (0 valid, 2 invalid).
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bundled mock of ZapSign (login, refresh, echo) for local trials.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Run the proxy and the bundled mock in one process, with demo credentials, and print a curl line to try.
    /// With --config, the file's settings apply; its own credentials or `upstream.url` replace the demo's.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MockUpstream { listen }) => exit(run_mock(listen)),
        Some(Command::Demo) => match demo_config(cli.config.as_deref()) {
            Ok((config, mock)) => exit(run_proxy(config, Mode::Demo { mock })),
            Err(e) => config_failure(&e),
        },
        None => match Config::load(cli.config.as_deref(), &process_env).and_then(|c| check_tls(c, &cli)) {
            Err(e) => config_failure(&e),
            Ok(config) if cli.check_config => {
                if let Some(why) = &config.log.rust_log_refused {
                    eprintln!("zapsign-proxy: {why}");
                }
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Ok(config) => exit(run_proxy(
                config,
                Mode::Proxy {
                    reload_from: cli.config.clone(),
                },
            )),
        },
    }
}

/// `--check-config` also proves the CA file parses; the proxy itself checks it again at start.
fn check_tls(config: Config, cli: &Cli) -> Result<Config, ConfigError> {
    if cli.check_config {
        zapsign_proxy::tls::client_config(config.upstream.ca_file.as_deref())?;
    }
    Ok(config)
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("zapsign-proxy: invalid configuration: {e}");
    ExitCode::from(2)
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zapsign-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
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
/// file names its own (any of [`CREDENTIAL_KEYS`]), and the mock unless the file sets `upstream.url`. Without the
/// file's own credentials, real credentials in the environment are ignored: the demo never sends them anywhere.
fn demo_config(path: Option<&Path>) -> Result<(Config, bool), ConfigError> {
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
            auth.insert("organization_id".into(), mock::DEMO_ORGANIZATION_ID.into());
            auth.insert("username".into(), mock::DEMO_USERNAME.into());
            auth.insert("password".into(), mock::DEMO_PASSWORD.into());
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

/// What `run_proxy` runs.
enum Mode {
    /// The proxy; SIGHUP and changed secret files reload `reload_from` (or, without a file, the environment).
    Proxy { reload_from: Option<PathBuf> },
    /// The demo, whose configuration is partly made up in code, so it is not reloaded; with the bundled mock
    /// as the upstream when `mock`.
    Demo { mock: bool },
}

/// One worker: a current-thread runtime, whose tasks never migrate and whose wake-ups never cross threads
/// (measured leaner per request than a one-worker work-stealing pool). More: the work-stealing pool.
fn runtime(workers: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.enable_all().build().context("cannot start the async runtime")
}

/// Runs the proxy (see [`Mode`]).
fn run_proxy(mut config: Config, mode: Mode) -> anyhow::Result<()> {
    logging::init(&config.log);
    runtime(config.server.workers)?.block_on(async move {
        let _mock = if let Mode::Demo { mock: true } = mode {
            // Ten-minute access tokens, so a newcomer watching the log sees refreshes happen.
            let mock_cfg = MockConfig {
                access_ttl: std::time::Duration::from_secs(600),
                ..MockConfig::default()
            };
            let mock = MockZapSign::start(mock_cfg)
                .await
                .context("cannot start the demo mock")?;
            let url = zapsign_proxy::config::BaseUrl::parse("upstream.url", &mock.url())?;
            if let Auth::Jwt(jwt) = &mut config.auth.mode {
                if jwt.url.text == config.upstream.url.text {
                    jwt.url = url.clone();
                }
            }
            config.upstream.url = url;
            Some(mock)
        } else {
            None
        };
        let listeners = Listeners::bind(&config).await?;
        let reloads = match mode {
            Mode::Demo { .. } => {
                print_demo_help(&listeners)?;
                None
            }
            Mode::Proxy { reload_from } => {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let load = move || Config::load(reload_from.as_deref(), &process_env);
                let files = reload::secret_files(&config);
                tokio::spawn(reload::reload_on_change(load, files, reload::SECRET_POLL, tx));
                Some(rx)
            }
        };
        zapsign_proxy::run_with_reloads(config, listeners, shutdown_signal(), reloads).await?;
        Ok(())
    })
}

/// Tells a newcomer what to try. Write errors are ignored: `demo | head -1` must not kill the proxy.
fn print_demo_help(listeners: &Listeners) -> anyhow::Result<()> {
    use std::io::Write;
    let addr = listeners.proxy.local_addr()?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "zapsign-proxy demo: proxy on http://{addr}, mock ZapSign behind it. Try:"
    );
    let _ = writeln!(
        out,
        "  curl -s 'http://{addr}/api/v1/docs/?page=1&api_token=stale-caller-token'"
    );
    let _ = writeln!(
        out,
        "The mock echoes what it received: note the injected Authorization and the removed api_token."
    );
    if let Some(admin) = &listeners.admin {
        let _ = writeln!(out, "  curl -s http://{}/readyz", admin.local_addr()?);
    }
    let _ = out.flush();
    Ok(())
}

fn run_mock(listen: SocketAddr) -> anyhow::Result<()> {
    use std::io::Write;
    logging::init(&zapsign_proxy::config::LogConfig::defaults(&process_env));
    runtime(1)?.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let cfg = MockConfig::default();
        let _ = writeln!(
            std::io::stdout(),
            "mock ZapSign on http://{listen}: static token {:?}; login organization {:?}, username {:?}, password {:?}",
            mock::DEMO_API_TOKEN,
            mock::DEMO_ORGANIZATION_ID,
            mock::DEMO_USERNAME,
            mock::DEMO_PASSWORD
        );
        let mock = MockZapSign::start_on(listener, cfg);
        shutdown_signal().await;
        drop(mock);
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers we cannot shut down gracefully; Ctrl-C still ends the process.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
