//! The access line's own formatter, and the timestamp every line carries.
//!
//! Every request writes one `served` line at the default level, so its formatting is paid per request.
//! [`LineFormat`] writes that one event itself, in exactly the text and JSON layouts `tracing-subscriber`'s
//! formatters produce (the tests compare them byte for byte and value for value): the fixed parts as
//! constants, integers with `itoa`, strings escaped once, the request span's fields copied as
//! [`super::fields`] stored them, the date and time of day formatted once a second. Every other event, and the
//! access line itself when colours are on (a person at a terminal), goes to `tracing-subscriber`'s formatter.
//! Either way the line then takes the same road: the same filter decided it is wanted, the same layer hands
//! it to the same non-blocking writer, so ordering and the flush on exit are unchanged.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use super::fields::{push_json_str, with_scratch, JsonFieldsVisitor, TextVisitor};

/// The target the access line is filed under: where it was logged before it moved to `logging`, so filters
/// that name `zapsign_proxy::proxy` keep working.
pub(super) const ACCESS_TARGET: &str = "zapsign_proxy::proxy";

/// The request span's name: the `request{..}` of text lines, `span.name` of JSON ones.
pub(super) const SPAN_NAME: &str = "request";

/// Where lines get the time from: the system clock, or a fixed instant in tests.
#[derive(Debug, Clone, Copy)]
pub struct Clock(pub fn() -> SystemTime);

impl Default for Clock {
    fn default() -> Self {
        Self(SystemTime::now)
    }
}

impl FormatTime for Clock {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        with_scratch(|buf| {
            push_timestamp(buf, (self.0)());
            w.write_str(buf)
        })
    }
}

/// Seconds since the epoch of 10000-01-01: the fast path writes four-digit years only.
const YEAR_10000: u64 = 253_402_300_800;

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS.` text: at any request rate
    /// lines come many to a second, so the calendar work is done once a second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `at` as RFC 3339 UTC with microseconds, as `tracing-subscriber`'s `SystemTime` timer writes it
/// (`2026-12-02T10:00:00.123456Z`).
pub(super) fn push_timestamp(out: &mut String, at: SystemTime) {
    let since = match at.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() < YEAR_10000 => d,
        // Before 1970 or after 9999: never on a real clock; the library's own formatter knows the forms.
        _ => {
            let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(out));
            return;
        }
    };
    let secs = since.as_secs();
    SECOND.with(|cell| match cell.try_borrow_mut() {
        Ok(mut cached) => {
            if cached.0 != secs {
                cached.1.clear();
                cached.1.push_str(&date_time(secs));
                cached.0 = secs;
            }
            out.push_str(&cached.1);
        }
        Err(_) => out.push_str(&date_time(secs)),
    });
    let micros = since.subsec_micros();
    for place in [100_000, 10_000, 1_000, 100, 10, 1] {
        out.push(char::from(b'0' + (micros / place % 10) as u8));
    }
    out.push('Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` for `secs` since the epoch (before year 10000).
fn date_time(secs: u64) -> String {
    let (year, month, day) = civil_date(secs / 86_400);
    let t = secs % 86_400;
    let mut out = String::with_capacity(20);
    for (value, after) in [
        (year / 100, ""),
        (year % 100, "-"),
        (month, "-"),
        (day, "T"),
        (t / 3600, ":"),
        (t / 60 % 60, ":"),
        (t % 60, "."),
    ] {
        out.push(char::from(b'0' + (value / 10) as u8));
        out.push(char::from(b'0' + (value % 10) as u8));
        out.push_str(after);
    }
    out
}

/// The proleptic Gregorian (year, month, day) of `days` since 1970-01-01, counting in 400-year eras of
/// 146,097 days whose years start on 1 March, so the leap day falls at the end of a year.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // 0000-03-01 is 719,468 days before the epoch.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months from March: 153 days per five months.
    let m = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * m + 2) / 5 + 1;
    let month = if m < 10 { m + 3 } else { m - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
thread_local! {
    /// Access lines this thread wrote through the fast path: tests check it is the one taken.
    pub(super) static FAST_LINES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The event formatter: the access line written here, everything else by `inner`.
#[derive(Debug)]
pub struct LineFormat<F> {
    inner: F,
    json: bool,
    clock: Clock,
}

impl<F> LineFormat<F> {
    /// `inner` formats every other event; `json` picks the access line's layout to match it.
    pub fn new(inner: F, json: bool, clock: Clock) -> Self {
        Self { inner, json, clock }
    }
}

/// Whether `meta` is the access line's callsite (`logging::served`): its target and its first fields.
fn is_access(meta: &Metadata<'_>) -> bool {
    if meta.target() != ACCESS_TARGET || !meta.is_event() {
        return false;
    }
    let mut names = meta.fields().iter().map(|f| f.name());
    names.next() == Some("message") && names.next() == Some("status") && names.next() == Some("duration_us")
}

fn level_text(level: &Level) -> &'static str {
    // As the text formatter pads them: five columns, right-aligned.
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

impl<S, N, F> FormatEvent<S, N> for LineFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        if !writer.has_ansi_escapes() && is_access(meta) {
            let span = match event.parent() {
                Some(id) => ctx.span(id),
                None if event.is_contextual() => ctx.lookup_current(),
                None => None,
            };
            // The layout below knows one enclosing span, the request's; the text format lists every
            // enclosing span, the JSON format only the innermost.
            if let Some(span) = span.filter(|s| {
                s.name() == SPAN_NAME && s.metadata().target() == ACCESS_TARGET && (self.json || s.parent().is_none())
            }) {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    let at = (self.clock.0)();
                    let scrub = writer.sanitizes_ansi_escapes();
                    let written = with_scratch(|buf| {
                        let done = if self.json {
                            json_line(buf, at, meta, span.name(), &fields.fields, event)
                        } else {
                            text_line(buf, scrub, at, meta, span.name(), &fields.fields, event)
                        };
                        done.map(|()| writer.write_str(buf))
                    });
                    if let Some(result) = written {
                        #[cfg(test)]
                        FAST_LINES.with(|n| n.set(n.get() + 1));
                        return result;
                    }
                }
            }
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// `<timestamp> <LEVEL> <span>{<span fields>}: <target>: <fields>`, as `tracing-subscriber`'s full text format
/// lays out an event inside one span without colours.
fn text_line(
    out: &mut String,
    scrub: bool,
    at: SystemTime,
    meta: &Metadata<'_>,
    span: &str,
    span_fields: &str,
    event: &Event<'_>,
) -> Option<()> {
    push_timestamp(out, at);
    out.push(' ');
    out.push_str(level_text(meta.level()));
    out.push(' ');
    out.push_str(span);
    if !span_fields.is_empty() {
        out.push('{');
        out.push_str(span_fields);
        out.push('}');
    }
    out.push_str(": ");
    out.push_str(meta.target());
    out.push_str(": ");
    let mut fields = TextVisitor::new(out, scrub);
    event.record(&mut fields);
    fields.result.ok()?;
    out.push('\n');
    Some(())
}

/// `{"timestamp":..,"level":..,<fields>,"target":..,"span":{<span fields>,"name":..}}`, as
/// `tracing-subscriber`'s JSON format writes an event with flattened fields and the current span only.
fn json_line(
    out: &mut String,
    at: SystemTime,
    meta: &Metadata<'_>,
    span: &str,
    span_fields: &str,
    event: &Event<'_>,
) -> Option<()> {
    // The span's fields as `JsonSpanFields` stored them: one object.
    let members = span_fields.strip_prefix('{')?.strip_suffix('}')?;
    out.push_str("{\"timestamp\":\"");
    push_timestamp(out, at);
    out.push_str("\",\"level\":\"");
    out.push_str(meta.level().as_str());
    out.push('"');
    event.record(&mut JsonFieldsVisitor::event(out));
    out.push_str(",\"target\":");
    push_json_str(out, meta.target());
    out.push_str(",\"span\":{");
    if !members.is_empty() {
        out.push_str(members);
        out.push(',');
    }
    out.push_str("\"name\":");
    push_json_str(out, span);
    out.push_str("}}\n");
    Some(())
}

/// A fixed instant, for tests that need a fixed clock.
#[cfg(test)]
pub(super) fn fixed(secs: u64, micros: u32) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::new(secs, micros * 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64, micros: u32) -> String {
        let mut out = String::new();
        push_timestamp(&mut out, fixed(secs, micros));
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(stamp(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(stamp(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(stamp(1_796_205_600, 123_456), "2026-12-02T10:00:00.123456Z");
        assert_eq!(stamp(YEAR_10000 - 1, 999_999), "9999-12-31T23:59:59.999999Z");
        // The cached second is reused within a second and replaced on the next.
        assert_eq!(stamp(1_796_205_600, 1), "2026-12-02T10:00:00.000001Z");
        assert_eq!(stamp(1_796_205_601, 1), "2026-12-02T10:00:01.000001Z");
    }

    #[test]
    fn the_calendar_agrees_with_httpdate_over_four_centuries() {
        // A step prime to the day and to the leap cycles visits every kind of date.
        let mut secs = 0u64;
        while secs < YEAR_10000 {
            let ours = date_time(secs);
            let theirs = httpdate::HttpDate::from(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string();
            // "Wed, 02 Dec 2026 10:00:00 GMT"
            let months = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            let month = months.iter().position(|m| *m == &theirs[8..11]).unwrap() + 1;
            let expected = format!("{}-{month:02}-{}T{}.", &theirs[12..16], &theirs[5..7], &theirs[17..25]);
            assert_eq!(ours, expected, "{secs}");
            secs += 97 * 86_400 + 3_607;
        }
    }
}
