//! Secrets as a type: passwords, tokens and client keys print as `[redacted]` everywhere
//! (`Debug`, `Display`, serialized config), so a secret cannot reach a log line by accident.

use std::fmt;
use std::sync::Arc;

/// A secret string. The only way to read it is [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// What a secret prints as.
pub const REDACTED: &str = "[redacted]";

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret value. Call it only where the value is sent to ZapSign or compared.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `other` in time that does not depend on where the two differ.
    pub fn constant_time_eq(&self, other: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let mine = self.0.as_bytes();
        mine.len() == other.len() && bool::from(mine.ct_eq(other))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// Lower-case hex of bytes (digests and key ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn constant_time_eq_compares_whole_value() {
        let s = Secret::new("key-1");
        assert!(s.constant_time_eq(b"key-1"));
        assert!(!s.constant_time_eq(b"key-2"));
        assert!(!s.constant_time_eq(b"key-"));
        assert!(!s.constant_time_eq(b"key-11"));
    }
}
