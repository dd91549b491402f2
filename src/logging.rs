//! Log set-up: `tracing` to stderr as text or one JSON object per line, filtered by the level the config settled
//! on (`log.level`, or `RUST_LOG` when that is a valid filter: see [`crate::config::parse_log_filter`]); and the
//! per-request access line (`served`), the one event every request writes at the default level.
//!
//! Lines are formatted on the thread that logs them but written in batches by a thread of their own
//! ([`writer`]): a slow or stalled stderr (a full pipe to a log collector) never stalls a request. What waits is
//! bounded ([`writer::PENDING_LIMIT`]); a line that finds it full is dropped and counted (`dropped_lines`, shown as
//! `zapsign_proxy_log_lines_dropped_total`) rather than held in memory without end. The [`LogGuard`] that
//! [`init`] returns writes out every waiting line when dropped, so `main` keeps it until the proxy has stopped
//! and no line is lost on SIGTERM.
//!
//! The access line is formatted by a formatter of its own ([`line`]): a few hundred nanoseconds instead of
//! several microseconds through `tracing-subscriber`'s generic formatters, in the same layout. The request
//! span's fields are rendered once, when the span is created ([`fields`]).

mod fields;
mod line;
pub mod writer;

use std::fmt;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderValue, Method};
use tracing::{Dispatch, Span};
use tracing_subscriber::fmt::format::Format;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};
use crate::error::ProxyError;
use fields::{JsonSpanFields, TextFields};
use line::{Clock, LineFormat, ACCESS_TARGET, SPAN_NAME};
pub use writer::{batching, LogGuard, LogWriter};

/// Installs the global subscriber, writing to stderr off the calling threads. Call once, from `main`, and keep
/// the guard until the proxy has stopped: dropping it writes out the waiting lines (waiting up to a second).
/// Fails only when the writer thread cannot be started.
pub fn init(cfg: &LogConfig) -> std::io::Result<LogGuard> {
    let (writer, guard) = batching(std::io::stderr())?;
    crate::metrics::count_log_drops(writer.dropped_counter());
    // Colour codes only for a person at a terminal: piped into a file or a log collector they are noise that
    // breaks grep and parsers.
    // A second `init` (never in the binary) keeps the first subscriber: `try_init` refuses to replace it.
    let _ = subscriber(cfg, writer, std::io::stderr().is_terminal()).try_init();
    if let Some(why) = &cfg.rust_log_refused {
        tracing::warn!("{why}");
    }
    Ok(guard)
}

/// Log lines dropped so far because the writer's queue was full (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    crate::metrics::log_lines_dropped()
}

/// The subscriber `init` installs, writing to `writer`: benches and tests build it around their own writer.
pub fn subscriber<W>(cfg: &LogConfig, writer: W, ansi: bool) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    subscriber_with_clock(cfg, writer, ansi, Clock::default())
}

/// [`subscriber`] with the time lines carry taken from `clock`.
fn subscriber_with_clock<W>(cfg: &LogConfig, writer: W, ansi: bool, clock: Clock) -> Dispatch
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
        LogFormat::Text => builder
            .fmt_fields(TextFields)
            .event_format(LineFormat::new(Format::default().with_timer(clock), false, clock))
            .finish()
            .into(),
        // The request's span is written once, as `span`; the list of every enclosing span (`spans`) would
        // repeat it.
        LogFormat::Json => {
            let other_events = Format::default()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .with_timer(clock);
            builder
                .fmt_fields(JsonSpanFields)
                .event_format(LineFormat::new(other_events, true, clock))
                .finish()
                .into()
        }
    }
}

/// The span of one request: its id, method and path (never the query: it may hold a legacy `api_token`).
/// Every event logged while the request is handled carries these.
pub fn request_span(id: &HeaderValue, method: &Method, path: &str) -> Span {
    tracing::info_span!(
        target: ACCESS_TARGET,
        SPAN_NAME,
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

/// Writes the access line of one request (`served`, at `info`) in its `span`: as the span's child, without
/// entering it (an enter and an exit of the span cost about as much as formatting the line's integers).
pub fn served(span: &Span, s: Served<'_>) {
    tracing::info!(
        target: ACCESS_TARGET,
        parent: span,
        status = s.status,
        duration_us = s.elapsed.as_micros() as u64,
        upstream_us = s.upstream.map(|d| d.as_micros() as u64),
        client = %Client(s.client),
        key_id = s.key_id,
        error = s.refused.map(ProxyError::code),
        reason = s.refused.map(tracing::field::display),
        "served"
    );
}

/// The caller's address as the access line shows it, `IpAddr`'s `Display`: an IPv4 address (the usual case)
/// is written in one piece rather than through `core::fmt`'s padding machinery once per octet.
struct Client(IpAddr);

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let IpAddr::V4(v4) = self.0 else {
            return fmt::Display::fmt(&self.0, f);
        };
        let mut text = [0u8; 15];
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                text[len] = b'.';
                len += 1;
            }
            let mut octet_text = itoa::Buffer::new();
            let digits = octet_text.format(octet).as_bytes();
            text[len..len + digits.len()].copy_from_slice(digits);
            len += digits.len();
        }
        f.write_str(std::str::from_utf8(&text[..len]).map_err(|_| fmt::Error)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::Ipv6Addr;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// A writer that keeps what is written, for reading back lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// 2026-12-02T10:00:00.123456Z.
    fn at_noon() -> std::time::SystemTime {
        line::fixed(1_796_205_600, 123_456)
    }

    fn config(format: LogFormat, level: &str) -> LogConfig {
        let mut cfg = LogConfig::defaults(&|_| None);
        cfg.format = format;
        cfg.level = level.to_owned();
        cfg
    }

    /// `tracing-subscriber`'s own formatters as this crate configured them before the access line had a
    /// formatter of its own: the layout the access line must keep.
    fn stock(cfg: &LogConfig, writer: Captured) -> Dispatch {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(&cfg.level))
            .with_writer(writer)
            .with_ansi(false)
            .with_timer(Clock(at_noon));
        match cfg.format {
            LogFormat::Text => builder.finish().into(),
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish()
                .into(),
        }
    }

    /// One request's span and access line, plus an ordinary event inside the span, through `dispatch`.
    fn log_request(dispatch: &Dispatch, id: &str, method: &Method, path: &str, s: Served<'_>) {
        tracing::dispatcher::with_default(dispatch, || {
            let span = request_span(&HeaderValue::from_str(id).unwrap(), method, path);
            span.in_scope(|| {
                tracing::warn!(
                    error = "upstream_unreachable",
                    "an ordinary event \u{1b}[31m \u{85} \u{7}"
                )
            });
            served(&span, s);
        });
    }

    fn plain_ok() -> Served<'static> {
        Served {
            status: 200,
            elapsed: Duration::from_micros(412),
            upstream: Some(Duration::from_micros(380)),
            client: IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)),
            key_id: None,
            refused: None,
        }
    }

    /// A path with every kind of character that needs escaping somewhere, a request id with quotes, an error
    /// whose text holds quotes and a tab, a key id, an IPv6 client, no upstream time.
    const HOSTILE_PATH: &str = "/api/v1/docs/\"q\"\\x\u{1}\t\u{1b}[31m\u{7f}é☃/";

    fn check_refused(f: impl FnOnce(Served<'_>)) {
        let err = ProxyError::TokenUnavailable {
            reason: "login \"rate\"\tlimited".to_owned(),
            retry_after: Duration::from_secs(3),
        };
        f(Served {
            status: 503,
            elapsed: Duration::from_micros(1_234_567),
            upstream: None,
            client: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x2a)),
            key_id: Some("app-\"one\""),
            refused: Some(&err),
        })
    }

    #[test]
    fn the_access_line_is_exactly_as_documented() {
        let out = Captured::default();
        let text = subscriber_with_clock(&config(LogFormat::Text, "info"), out.clone(), false, Clock(at_noon));
        let id = "7f3c9a52-1b2e-4c55-9e0a-6d1f2b3c4d5e";
        let fast_before = line::FAST_LINES.with(|n| n.get());
        log_request(&text, id, &Method::GET, "/api/v1/docs/", plain_ok());
        assert_eq!(
            line::FAST_LINES.with(|n| n.get()),
            fast_before + 1,
            "the access line's own formatter wrote it"
        );
        let lines = out.take();
        assert_eq!(
            lines.lines().last().unwrap(),
            "2026-12-02T10:00:00.123456Z  INFO request{id=\"7f3c9a52-1b2e-4c55-9e0a-6d1f2b3c4d5e\" \
             method=\"GET\" path=\"/api/v1/docs/\"}: zapsign_proxy::proxy: served status=200 duration_us=412 \
             upstream_us=380 client=10.1.2.3"
        );

        let json = subscriber_with_clock(&config(LogFormat::Json, "info"), out.clone(), false, Clock(at_noon));
        log_request(&json, id, &Method::GET, "/api/v1/docs/", plain_ok());
        let lines = out.take();
        assert_eq!(
            lines.lines().last().unwrap(),
            r#"{"timestamp":"2026-12-02T10:00:00.123456Z","level":"INFO","message":"served","status":200,"duration_us":412,"upstream_us":380,"client":"10.1.2.3","target":"zapsign_proxy::proxy","span":{"id":"7f3c9a52-1b2e-4c55-9e0a-6d1f2b3c4d5e","method":"GET","path":"/api/v1/docs/","name":"request"}}"#
        );

        // Escaping: the JSON line parses back to exactly the values logged.
        check_refused(|s| log_request(&json, r#"id"with\quote"#, &Method::POST, HOSTILE_PATH, s));
        assert_eq!(
            line::FAST_LINES.with(|n| n.get()),
            fast_before + 3,
            "the access line's own formatter wrote all"
        );
        let lines = out.take();
        let v: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "timestamp": "2026-12-02T10:00:00.123456Z",
                "level": "INFO",
                "message": "served",
                "status": 503,
                "duration_us": 1_234_567,
                "client": "fd00::2a",
                "key_id": "app-\"one\"",
                "error": "token_unavailable",
                "reason": "no valid ZapSign token is available yet (login \"rate\"\tlimited); retry after 3s",
                "target": "zapsign_proxy::proxy",
                "span": {"id": r#"id"with\quote"#, "method": "POST", "path": HOSTILE_PATH, "name": "request"},
            })
        );
    }

    #[test]
    fn the_access_line_matches_tracing_subscribers_own_formatters() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let (ours, theirs) = (Captured::default(), Captured::default());
            let cfg = config(format, "info");
            let fast = subscriber_with_clock(&cfg, ours.clone(), false, Clock(at_noon));
            let slow = stock(&cfg, theirs.clone());
            for dispatch in [&fast, &slow] {
                log_request(dispatch, "r-1", &Method::GET, "/api/v1/docs/", plain_ok());
                check_refused(|s| log_request(dispatch, r#"id"with\quote"#, &Method::POST, HOSTILE_PATH, s));
            }
            let (ours, theirs) = (ours.take(), theirs.take());
            assert_eq!(ours.lines().count(), 4, "{ours}");
            match format {
                LogFormat::Text => assert_eq!(ours, theirs),
                LogFormat::Json => {
                    let parse = |text: &str| -> Vec<serde_json::Value> {
                        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
                    };
                    assert_eq!(parse(&ours), parse(&theirs));
                }
            }
        }
    }

    #[test]
    fn a_warn_filter_still_drops_the_access_line() {
        for format in [LogFormat::Text, LogFormat::Json] {
            let out = Captured::default();
            let mut cfg = LogConfig::defaults(&|k| (k == "RUST_LOG").then(|| "warn".to_owned()));
            assert_eq!(cfg.level, "warn");
            cfg.format = format;
            log_request(
                &subscriber(&cfg, out.clone(), false),
                "r-2",
                &Method::GET,
                "/",
                plain_ok(),
            );
            let lines = out.take();
            assert_eq!(lines.lines().count(), 1, "only the warning: {lines}");
            assert!(!lines.contains("served"), "{lines}");
            // A directive for the access line's target brings it back.
            cfg.level = "warn,zapsign_proxy::proxy=info".to_owned();
            log_request(
                &subscriber(&cfg, out.clone(), false),
                "r-2",
                &Method::GET,
                "/",
                plain_ok(),
            );
            assert!(out.take().lines().last().unwrap().contains("served"));
        }
    }

    #[test]
    fn with_colours_the_access_line_keeps_tracing_subscribers_styling() {
        let out = Captured::default();
        let dispatch = subscriber(&config(LogFormat::Text, "info"), out.clone(), true);
        log_request(&dispatch, "r-3", &Method::GET, "/", plain_ok());
        let lines = out.take();
        let served = lines.lines().last().unwrap();
        assert!(served.contains("\x1b[32m INFO\x1b[0m"), "{served:?}");
        assert!(served.contains("served"), "{served:?}");
    }

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
        // The writer thread blocks on its first batch; what follows waits, up to the limit.
        let (writer, guard) = batching(Stalled(Arc::new(Mutex::new(Some(stalled))))).unwrap();
        let counter = writer.dropped_counter();
        assert!(
            crate::metrics::count_log_drops(writer.dropped_counter()),
            "no other test installs a writer"
        );
        let cfg = LogConfig::defaults(&|_| None);
        let pad = "x".repeat(1000);
        // About 6.6 MB of lines: more than the first batch and the limit together can take.
        let sent = 6000;
        tracing::dispatcher::with_default(&subscriber(&cfg, writer, false), || {
            for i in 0..sent {
                tracing::info!(i, pad, "line");
            }
        });
        let dropped = counter.load(std::sync::atomic::Ordering::Relaxed);
        assert!(dropped > 0, "no line dropped beyond the limit");
        assert!(dropped < sent, "every line dropped");
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
