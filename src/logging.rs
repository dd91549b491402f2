//! Log set-up: `tracing` to stderr as text or one JSON object per line, filtered by the level the config settled
//! on (`log.level`, or `RUST_LOG` when that is a valid filter: see [`crate::config::parse_log_filter`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Call once, from `main`.
pub fn init(cfg: &LogConfig) {
    // The config checked the filter; "info" only stands in should `EnvFilter` still refuse it.
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: piped into a file or a log collector they are noise that
    // breaks grep and parsers.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
    if let Some(why) = &cfg.rust_log_refused {
        tracing::warn!("{why}");
    }
}
