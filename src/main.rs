//! The `zapsign-proxy` command: parses the command line, loads the configuration, sets up logging and the
//! runtime, and runs the proxy, the bundled mock, or both (`demo`). Exit codes: 0 clean shutdown, 1 runtime
//! failure, 2 bad command line or config. The `demo` and `mock-upstream` commands exist only with the cargo
//! feature `mock` (on by default); without it the binary is the proxy alone.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use zapsign_proxy::config::{process_env, Config, ConfigError};
#[cfg(feature = "mock")]
use zapsign_proxy::mock::{demo, MockConfig, MockZapSign};
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
    #[cfg(feature = "mock")]
    #[command(subcommand)]
    command: Option<Command>,
}

/// The commands that run the bundled mock; a build without the `mock` feature has no subcommand at all.
#[cfg(feature = "mock")]
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the bundled mock of ZapSign (login, refresh, echo) for local trials.
    MockUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
    },
    /// Run the proxy and the bundled mock in one process, with demo credentials, and print a curl line to try.
    /// With --config, the file's settings apply; its own credentials or `upstream.url` replace the demo's.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "mock")]
    match cli.command {
        Some(Command::MockUpstream { listen }) => return exit(run_mock(listen)),
        Some(Command::Demo) => {
            return match demo::config(cli.config.as_deref()) {
                Ok((config, mock)) => exit(run_proxy(config, Mode::Demo { mock })),
                Err(e) => config_failure(&e),
            }
        }
        None => {}
    }
    match Config::load(cli.config.as_deref(), &process_env).and_then(|c| check_tls(c, &cli)) {
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

/// What `run_proxy` runs.
enum Mode {
    /// The proxy; SIGHUP and changed secret files reload `reload_from` (or, without a file, the environment).
    Proxy { reload_from: Option<PathBuf> },
    /// The demo, whose configuration is partly made up in code, so it is not reloaded; with the bundled mock
    /// as the upstream when `mock`.
    #[cfg(feature = "mock")]
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
fn run_proxy(config: Config, mode: Mode) -> anyhow::Result<()> {
    // Held until the proxy has stopped: dropping it writes out every queued log line, so none is lost on SIGTERM.
    let _log = logging::init(&config.log).context("cannot start the log writer thread")?;
    runtime(config.server.workers)?.block_on(async move {
        #[cfg(feature = "mock")]
        let mut config = config;
        #[cfg(feature = "mock")]
        let _mock = match mode {
            Mode::Demo { mock: true } => Some(demo::start_stand_in(&mut config).await?),
            _ => None,
        };
        let listeners = Listeners::bind(&config).await?;
        let reloads = match mode {
            #[cfg(feature = "mock")]
            Mode::Demo { .. } => {
                let admin = listeners.admin.as_ref().map(|a| a.local_addr()).transpose()?;
                demo::print_help(listeners.proxy.local_addr()?, admin);
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

/// Runs the bundled mock alone until SIGTERM or SIGINT.
#[cfg(feature = "mock")]
fn run_mock(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let _log = logging::init(&zapsign_proxy::config::LogConfig::defaults(&process_env))
        .context("cannot start the log writer thread")?;
    runtime(1)?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        demo::print_mock_upstream_help(listen);
        let mock = MockZapSign::start_on(listener, MockConfig::default());
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
