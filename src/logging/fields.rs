//! How fields are written: the request span's fields once, when the span is created, in the form the access line
//! copies as they stand; and the small writers both formats share (a quoted string as `{:?}` writes it, a JSON
//! string, integers).
//!
//! `tracing-subscriber` stores each span's fields as text rendered by the layer's [`FormatFields`] and copies
//! that text into every line written inside the span. Its own renderers go through `core::fmt` and style
//! wrappers for every field (text) or build a `BTreeMap` of `serde_json::Value`s (JSON); these write straight
//! into one buffer, so a request span costs one allocation (the stored text). The output is the same as
//! theirs, byte for byte in text and value for value in JSON (tests in `logging::tests` compare both).

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

thread_local! {
    /// Scratch space for one rendering, kept per thread so a line or a span's fields cost no allocation of
    /// their own beyond what they are copied into.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Runs `f` on this thread's cleared scratch buffer (a fresh one if it is already in use, should rendering
/// ever nest).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut String) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let out = f(&mut buf);
            // A rare huge line (a long `reason`) should not pin its buffer on the thread for good.
            if buf.capacity() > 16 * 1024 {
                *buf = String::new();
            }
            out
        }
        Err(_) => f(&mut String::new()),
    })
}

/// Appends `n` in decimal.
pub(super) fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `s` quoted as `format!("{s:?}")` would: the common case (printable ASCII without `"` or `\`) is
/// copied as it stands, anything else goes through `Debug`.
pub(super) fn push_debug_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// Appends `s` as the inside of a JSON string (RFC 8259 §7): `"`, `\` and the control characters U+0000 to
/// U+001F are escaped, everything else is copied, as `serde_json` writes strings.
pub(super) fn push_json_escaped(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Every byte escaped is ASCII, so these slice bounds fall on character boundaries.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
}

/// Appends `s` as a quoted JSON string.
pub(super) fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    push_json_escaped(out, s);
    out.push('"');
}

/// A `fmt::Write` that JSON-escapes what is written through it: `Debug` and `Display` values go into a JSON
/// string without a copy of their own.
pub(super) struct JsonEscaping<'a>(pub(super) &'a mut String);

impl fmt::Write for JsonEscaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        push_json_escaped(self.0, s);
        Ok(())
    }
}

/// Appends `value`'s `Debug` as a quoted JSON string.
pub(super) fn push_json_debug(out: &mut String, value: &dyn fmt::Debug) {
    out.push('"');
    let _ = write!(JsonEscaping(out), "{value:?}");
    out.push('"');
}

/// A `fmt::Write` that scrubs what could drive a terminal from a message, as `tracing-subscriber` does for
/// messages it writes (ESC, BEL, BS, FF and DEL as `\x1b`-style escapes, C1 controls as `\u{..}`), so a line
/// written here reads the same as one written there. Text without them is copied in one piece.
struct Scrubbing<'a>(&'a mut String);

impl fmt::Write for Scrubbing<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 controls (U+0080 to U+009F) are 0xC2 0x80..=0x9F in UTF-8.
        let clean = !s.bytes().any(|b| matches!(b, 0x1b | 0x07 | 0x08 | 0x0c | 0x7f | 0xc2));
        if clean {
            self.0.push_str(s);
            return Ok(());
        }
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.push_str("\\x1b"),
                '\x07' => self.0.push_str("\\x07"),
                '\x08' => self.0.push_str("\\x08"),
                '\x0c' => self.0.push_str("\\x0c"),
                '\x7f' => self.0.push_str("\\x7f"),
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                ch => self.0.push(ch),
            }
        }
        Ok(())
    }
}

/// The text format's fields, as `tracing-subscriber`'s `DefaultFields` writes them without colours
/// (`name=value`, strings quoted, separated by spaces). With colours on (a terminal) it hands over to
/// `DefaultFields`, whose styling is then the point.
#[derive(Debug, Default, Clone, Copy)]
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let scrub = writer.sanitizes_ansi_escapes();
        with_scratch(|buf| {
            let mut visitor = TextVisitor::new(buf, scrub);
            fields.record(&mut visitor);
            visitor.result?;
            writer.write_str(buf)
        })
    }
}

/// Writes fields as `DefaultVisitor` does with colours off. The fields it has nothing to gain on (the message,
/// which `DefaultVisitor` also scrubs of terminal escapes; raw identifiers; `log.` fields; errors) are handed
/// to a `DefaultVisitor` writing into the same buffer.
pub(super) struct TextVisitor<'a> {
    out: &'a mut String,
    is_empty: bool,
    /// Whether messages are scrubbed of terminal escapes (the writer's setting; on unless turned off).
    scrub: bool,
    pub(super) result: fmt::Result,
}

impl<'a> TextVisitor<'a> {
    pub(super) fn new(out: &'a mut String, scrub: bool) -> Self {
        Self {
            out,
            is_empty: true,
            scrub,
            result: Ok(()),
        }
    }

    fn pad(&mut self) {
        if self.is_empty {
            self.is_empty = false;
        } else {
            self.out.push(' ');
        }
    }

    /// Starts a plain `name=` field, or says the field is one for `DefaultVisitor`.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name == "message" || name.starts_with("r#") || name.starts_with("log.") || self.result.is_err() {
            return false;
        }
        self.pad();
        self.out.push_str(name);
        self.out.push('=');
        true
    }

    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut inner = DefaultVisitor::new(Writer::new(self.out), self.is_empty);
        record(&mut inner);
        self.result = inner.finish();
    }

    /// After a field handed over: `DefaultVisitor` skips `log.` fields without a separator, writes all others.
    fn delegated(&mut self, field: &Field) {
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.start(field) {
            push_debug_str(self.out, value);
        } else {
            self.delegate(|v| v.record_str(field, value));
            self.delegated(field);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.start(field) {
            push_int(self.out, value);
        } else {
            self.delegate(|v| v.record_u64(field, value));
            self.delegated(field);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.start(field) {
            push_int(self.out, value);
        } else {
            self.delegate(|v| v.record_i64(field, value));
            self.delegated(field);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.out.push_str(if value { "true" } else { "false" });
        } else {
            self.delegate(|v| v.record_bool(field, value));
            self.delegated(field);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.delegate(|v| v.record_error(field, value));
        self.delegated(field);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            let _ = write!(self.out, "{value:?}");
        } else if field.name() == "message" && self.scrub && self.result.is_ok() {
            // The message, written bare.
            self.pad();
            self.result = write!(Scrubbing(self.out), "{value:?}");
        } else {
            self.delegate(|v| v.record_debug(field, value));
            self.delegated(field);
        }
    }
}

/// The JSON format's span fields: one JSON object, as `tracing-subscriber`'s `JsonFields` stores them (its
/// JSON event formatter parses them back for other events), written directly instead of through a map of
/// `serde_json::Value`s. The access line copies the object's members as they stand.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonSpanFields;

impl<'w> FormatFields<'w> for JsonSpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        with_scratch(|buf| {
            buf.push('{');
            fields.record(&mut JsonFieldsVisitor::span(buf));
            buf.push('}');
            writer.write_str(buf)
        })
    }

    /// Fields recorded after the span was created (never by this crate): merged into the stored object, a new
    /// value replacing an old one of the same name, as `JsonFields` does.
    fn add_fields(&self, current: &'w mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        type Object = serde_json::Map<String, serde_json::Value>;
        let mut merged: Object = serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?;
        let added: Object = serde_json::from_str(&added).map_err(|_| fmt::Error)?;
        merged.extend(added);
        current.fields = serde_json::to_string(&merged).map_err(|_| fmt::Error)?;
        Ok(())
    }
}

/// Writes `"name":value` members: strings, integers and booleans as such, floats and bytes as `serde_json`
/// writes them, anything else as its `Debug` text. One visitor for the two places JSON fields are written, which
/// differ only where tracing-subscriber's own formatters differ (the output must stay byte for byte theirs):
/// - a span's fields ([`JsonFieldsVisitor::span`]), as `JsonFields` records them: no comma before the first
///   member; in `Debug`'s case `log.` fields are skipped and a raw identifier's `r#` dropped;
/// - an event's fields ([`JsonFieldsVisitor::event`]), as `tracing-serde`'s map visitor does for the JSON
///   formatter: each member preceded by a comma (the line's timestamp and level come first), names as declared.
pub(super) struct JsonFieldsVisitor<'a> {
    out: &'a mut String,
    /// No comma is due before the next member.
    first: bool,
    /// Span rules (see above) rather than event rules.
    span: bool,
}

impl<'a> JsonFieldsVisitor<'a> {
    /// For a span's stored fields.
    fn span(out: &'a mut String) -> Self {
        Self {
            out,
            first: true,
            span: true,
        }
    }

    /// For an event's fields, after members already written.
    pub(super) fn event(out: &'a mut String) -> Self {
        Self {
            out,
            first: false,
            span: false,
        }
    }

    fn key(&mut self, name: &str) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
        push_json_str(self.out, name);
        self.out.push(':');
    }
}

impl Visit for JsonFieldsVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field.name());
        push_json_str(self.out, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field.name());
        push_int(self.out, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field.name());
        push_int(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field.name());
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field.name());
        let json = serde_json::Value::from(value).to_string();
        self.out.push_str(&json);
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.key(field.name());
        let json = serde_json::Value::from(value).to_string();
        self.out.push_str(&json);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.span {
            if name.starts_with("log.") {
                return;
            }
            self.key(name.strip_prefix("r#").unwrap_or(name));
        } else {
            self.key(name);
        }
        push_json_debug(self.out, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let samples = [
            "",
            "plain /api/v1/docs/",
            "quote \" backslash \\ slash /",
            "controls \n \r \t \u{8} \u{c} \u{0} \u{1f} \u{1b} del \u{7f}",
            "unicode é ☃ 𝄞 \u{85} \u{2028}",
        ];
        for s in samples {
            let mut ours = String::new();
            push_json_str(&mut ours, s);
            assert_eq!(ours, serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn quoted_strings_match_debug() {
        for s in [
            "",
            "GET",
            "/a b",
            "q\"uote",
            "back\\slash",
            "tab\t",
            "esc\u{1b}[31m",
            "é☃",
            "it's",
        ] {
            let mut ours = String::new();
            push_debug_str(&mut ours, s);
            assert_eq!(ours, format!("{s:?}"));
        }
    }
}
