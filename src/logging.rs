//! Log set-up: `tracing` to stderr as text or one JSON object per line, filtered by the level the config settled
//! on (`log.level`, or `RUST_LOG` when that is a valid filter: see [`crate::config::parse_log_filter`]); and the
//! per-request access line (`served`), the one event every request writes at the default level.
//!
//! Lines are formatted on the thread that logs them but written by a thread of their own (`tracing-appender`'s
//! non-blocking writer, a well-kept crate of the tracing project that does exactly this): a slow or stalled
//! stderr (a full pipe to a log collector) never stalls a request. The queue between the two is bounded
//! ([`BUFFERED_LINES`]); a line that finds it full is dropped and counted (`dropped_lines`, shown as
//! `zapsign_proxy_log_lines_dropped_total`) rather than held in memory without end. The [`WorkerGuard`] that
//! [`init`] returns writes out every queued line when dropped, so `main` keeps it until the proxy has stopped and
//! no line is lost on SIGTERM.

use std::io::{BufWriter, IsTerminal, Write};
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderValue, Method};
use tracing::{Dispatch, Span};
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::error::ProxyError;

/// Lines queued for the writer thread at most. Each queued line costs its length (about 300 bytes for an access
/// line), and the queue's slots (32 bytes each) are allocated and touched up front, so this is kept well below
/// `tracing-appender`'s default of 128,000 (4 MiB of slots, more than the proxy's whole idle RSS): 8,192 lines
/// ride out a writer stalled for about a quarter second at 30,000 requests a second, in 256 KiB of slots and
/// at most about 2.5 MiB of queued text.
pub const BUFFERED_LINES: usize = 8192;

/// The writer thread's buffer: lines that arrive together go out in one `write` instead of one each; the
/// thread flushes whenever its queue runs empty, so a line never waits for later ones.
const WRITE_BUFFER: usize = 64 * 1024;

/// The target the access line is filed under: where it was logged before it moved here, so filters that name
/// `zapsign_proxy::proxy` keep working.
const ACCESS_TARGET: &str = "zapsign_proxy::proxy";

/// Installs the global subscriber, writing to stderr off the calling threads. Call once, from `main`, and keep
/// the guard until the proxy has stopped: dropping it writes out the queued lines (waiting up to a second).
#[must_use = "dropping the guard stops the log writer: keep it until the process is about to exit"]
pub fn init(cfg: &LogConfig) -> WorkerGuard {
    let (writer, guard) = non_blocking(std::io::stderr(), BUFFERED_LINES);
    crate::metrics::count_log_drops(writer.error_counter());
    // Colour codes only for a person at a terminal: piped into a file or a log collector they are noise that
    // breaks grep and parsers.
    // A second `init` (never in the binary) keeps the first subscriber: `try_init` refuses to replace it.
    let _ = subscriber(cfg, writer, std::io::stderr().is_terminal()).try_init();
    if let Some(why) = &cfg.rust_log_refused {
        tracing::warn!("{why}");
    }
    guard
}

/// Log lines dropped so far because the writer's queue was full (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    crate::metrics::log_lines_dropped()
}

/// A non-blocking, lossy writer into `out` holding at most `lines` queued lines, and the guard that flushes it.
pub fn non_blocking<W: Write + Send + 'static>(out: W, lines: usize) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(lines)
        .lossy(true)
        .thread_name("zapsign-proxy-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, out))
}

/// The subscriber `init` installs, writing to `writer`: benches and tests build it around their own writer.
pub fn subscriber<W>(cfg: &LogConfig, writer: W, ansi: bool) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // The config checked the filter; "info" only stands in should `EnvFilter` still refuse it.
    let filter = EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match cfg.format {
        LogFormat::Text => builder.finish().into(),
        // The request's span is written once, as `span`; the list of every enclosing span (`spans`) would
        // repeat it, and the JSON formatter re-parses each span's fields for every event it writes.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .finish()
            .into(),
    }
}

/// The span of one request: its id, method and path (never the query: it may hold a legacy `api_token`).
/// Every event logged while the request is handled carries these.
pub fn request_span(id: &HeaderValue, method: &Method, path: &str) -> Span {
    tracing::info_span!(
        target: ACCESS_TARGET,
        "request",
        id = id.to_str().unwrap_or("-"),
        method = method.as_str(),
        path = path,
    )
}

/// What the access line says about one answered request.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    /// The status sent to the caller.
    pub status: u16,
    /// From the request head to the response head.
    pub elapsed: Duration,
    /// Until the upstream's response head, when the request reached the upstream.
    pub upstream: Option<Duration>,
    /// The caller's address.
    pub client: IpAddr,
    /// The caller's client key id, when keys are in use.
    pub key_id: Option<&'a str>,
    /// The proxy's own error, when it answered the request itself.
    pub refused: Option<&'a ProxyError>,
}

/// Writes the access line of one request (`served`, at `info`) inside its `span`.
pub fn served(span: &Span, s: Served<'_>) {
    span.in_scope(|| {
        tracing::info!(
            target: ACCESS_TARGET,
            status = s.status,
            duration_us = s.elapsed.as_micros() as u64,
            upstream_us = s.upstream.map(|d| d.as_micros() as u64),
            client = %s.client,
            key_id = s.key_id,
            error = s.refused.map(ProxyError::code),
            reason = s.refused.map(tracing::field::display),
            "served"
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// A writer whose first write blocks until the test lets it go: a stalled stderr.
    struct Stalled(Arc<Mutex<Option<mpsc::Receiver<()>>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(release) = self.0.lock().unwrap().take() {
                let _ = release.recv();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_lines_beyond_the_buffer_and_metrics_count_them() {
        let (release, stalled) = mpsc::channel();
        // No write buffer in the way: the writer thread blocks on its first line.
        let (writer, guard) = NonBlockingBuilder::default()
            .buffered_lines_limit(4)
            .lossy(true)
            .finish(Stalled(Arc::new(Mutex::new(Some(stalled)))));
        let counter = writer.error_counter();
        assert!(
            crate::metrics::count_log_drops(writer.error_counter()),
            "no other test installs a writer"
        );
        let cfg = LogConfig::defaults(&|_| None);
        let sent = 100;
        tracing::dispatcher::with_default(&subscriber(&cfg, writer, false), || {
            for i in 0..sent {
                tracing::info!(i, "line");
            }
        });
        // At most the line being written and the four queued got through.
        let dropped = counter.dropped_lines();
        assert!(dropped >= sent - 5, "only {dropped} of {sent} lines dropped");
        let text = crate::metrics::Metrics::new().render(crate::metrics::TokenExpiry::NoToken);
        assert!(
            text.contains(&format!("\nzapsign_proxy_log_lines_dropped_total {dropped}\n")),
            "{text}"
        );
        assert!(text.contains("# TYPE zapsign_proxy_log_lines_dropped_total counter\n"));
        release.send(()).unwrap();
        drop(guard);
    }
}
