//! The `zapsign-proxy` command: parses the command line, loads the configuration, sets up logging and the
//! runtime, and runs the proxy, the bundled mock, or both (`demo`). Exit codes: 0 clean shutdown, 1 runtime
//! failure, 2 bad command line or config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use zapsign_proxy::config::{process_env, Config, ConfigError};
use zapsign_proxy::mock::{self, MockConfig, MockZapSign};
use zapsign_proxy::{logging, Listeners};

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
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MockUpstream { listen }) => exit(run_mock(listen)),
        Some(Command::Demo) => match demo_config(&cli) {
            Ok(config) => exit(run_proxy(config, true, None)),
            Err(e) => config_failure(&e),
        },
        None => match Config::load(cli.config.as_deref(), &process_env).and_then(|c| check_tls(c, &cli)) {
            Err(e) => config_failure(&e),
            Ok(config) if cli.check_config => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Ok(config) => exit(run_proxy(config, false, cli.config.clone())),
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

/// The demo: defaults and environment as usual, but JWT mode with the mock's demo credentials. Real
/// credentials in the environment are ignored: the demo never talks to ZapSign.
fn demo_config(cli: &Cli) -> Result<Config, ConfigError> {
    let text = format!(
        "[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\n",
        mock::DEMO_ORGANIZATION_ID,
        mock::DEMO_USERNAME,
        mock::DEMO_PASSWORD
    );
    let mut config = match &cli.config {
        Some(_) => Config::load(cli.config.as_deref(), &process_env)?,
        None => Config::from_toml(&text, &|name| match name {
            "ZAPSIGN_API_TOKEN" | "ZAPSIGN_PASSWORD" | "ZAPSIGN_USERNAME" | "ZAPSIGN_ORGANIZATION_ID" => None,
            other => process_env(other),
        })?,
    };
    config.server.workers = config.server.workers.min(2);
    Ok(config)
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

/// Runs the proxy; on SIGHUP it re-reads `reload_from` (or, without a file, the environment). The demo, whose
/// configuration is made up in code, ignores SIGHUP.
fn run_proxy(mut config: Config, demo: bool, reload_from: Option<PathBuf>) -> anyhow::Result<()> {
    logging::init(&config.log);
    runtime(config.server.workers)?.block_on(async move {
        let _mock = if demo {
            // Ten-minute access tokens, so a newcomer watching the log sees refreshes happen.
            let mock_cfg = MockConfig {
                access_ttl: std::time::Duration::from_secs(600),
                ..MockConfig::default()
            };
            let mock = MockZapSign::start(mock_cfg)
                .await
                .context("cannot start the demo mock")?;
            config.upstream.url = zapsign_proxy::config::BaseUrl::parse("upstream.url", &mock.url())?;
            config.auth.url = config.upstream.url.clone();
            Some(mock)
        } else {
            None
        };
        let listeners = Listeners::bind(&config).await?;
        if demo {
            print_demo_help(&listeners)?;
        }
        let reloads = if demo {
            None
        } else {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(reload_on_sighup(reload_from, tx));
            Some(rx)
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
    logging::init(&zapsign_proxy::config::LogConfig {
        format: zapsign_proxy::config::LogFormat::Text,
        level: "info".into(),
    });
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

/// On each SIGHUP, re-reads the configuration (and the secret files it names) and hands it to the proxy. A
/// configuration that does not validate is logged and dropped: the running one stays.
async fn reload_on_sighup(path: Option<PathBuf>, tx: tokio::sync::mpsc::Sender<Config>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; configuration reload is unavailable");
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: re-reading the configuration");
        match Config::load(path.as_deref(), &process_env) {
            Ok(config) => {
                if tx.send(config).await.is_err() {
                    return;
                }
            }
            Err(e) => tracing::error!("reload rejected, the running configuration stays: {e}"),
        }
    }
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
