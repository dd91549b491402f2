//! What the proxy reads from ZapSign's JWTs: only the `exp` claim, to schedule renewals. The signature is not
//! checked: the proxy does not hold the key and need not (ZapSign checks its own tokens).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Documented lifetime of an access token, used when a token carries no readable `exp`.
pub const ACCESS_FALLBACK: Duration = Duration::from_secs(3600);
/// Documented lifetime of a refresh token, used when a token carries no readable `exp`.
pub const REFRESH_FALLBACK: Duration = Duration::from_secs(86_400);

/// The `exp` claim (seconds since the Unix epoch) of a JWT, if its payload is base64url JSON with a numeric `exp`.
pub fn exp_claim(token: &str) -> Option<f64> {
    let mut parts = token.split('.');
    let (_header, payload) = (parts.next()?, parts.next()?);
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_f64().filter(|e| e.is_finite() && *e > 0.0)
}

/// How long a token just received stays valid, from its `exp` and our wall clock `now` (the renewer passes its
/// injected clock, so tests choose it; this module reads no clock itself).
///
/// Clock skew is tolerated: an `exp` already in the past (our clock runs ahead of ZapSign's) or implausibly far
/// away (beyond 10× the documented lifetime) is not trusted, and the documented lifetime applies; the 401 replay
/// covers a token that dies earlier than we think. Returns the lifetime and whether `exp` was used.
pub fn lifetime(token: &str, now: SystemTime, fallback: Duration) -> (Duration, bool) {
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    match exp_claim(token) {
        Some(exp) if exp > now_secs && exp - now_secs <= fallback.as_secs_f64() * 10.0 => {
            (Duration::from_secs_f64(exp - now_secs), true)
        }
        _ => (fallback, false),
    }
}

/// When to renew a token of `lifetime`: `refresh_margin` before expiry, but never later than 75% of the lifetime
/// (short-lived tokens) and never sooner than 25% of it (a margin longer than the lifetime must not make the
/// refresher spin).
pub fn renew_after(lifetime: Duration, margin: Duration) -> Duration {
    let by_margin = lifetime.saturating_sub(margin);
    by_margin.min(lifetime.mul_f64(0.75)).max(lifetime.mul_f64(0.25))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn exp_of_a_valid_token() {
        let t = jwt(&json!({"token_type":"access","exp":1709820141,"jti":"x","user_id":1}).to_string());
        assert_eq!(exp_claim(&t), Some(1709820141.0));
    }

    #[test]
    fn exp_missing_garbage_or_not_json() {
        assert_eq!(exp_claim(&jwt(r#"{"token_type":"access"}"#)), None);
        assert_eq!(exp_claim(&jwt(r#"{"exp":"tomorrow"}"#)), None);
        assert_eq!(exp_claim(&jwt("not json at all")), None);
        assert_eq!(exp_claim("no-dots-here"), None);
        assert_eq!(exp_claim("a.%%%%.c"), None);
        assert_eq!(exp_claim(""), None);
        assert_eq!(exp_claim(&jwt(r#"{"exp":-5}"#)), None);
    }

    #[test]
    fn padded_payload_is_accepted() {
        let payload = base64::engine::general_purpose::URL_SAFE.encode(r#"{"exp":12}"#);
        assert_eq!(exp_claim(&format!("h.{payload}.s")), Some(12.0));
    }

    #[test]
    fn lifetime_from_exp_or_fallback() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = jwt(r#"{"exp":1000060}"#);
        assert_eq!(lifetime(&t, now, ACCESS_FALLBACK), (Duration::from_secs(60), true));
        // exp in the past: our clock is ahead; trust the documented lifetime instead of renewing in a loop.
        let past = jwt(r#"{"exp":999000}"#);
        assert_eq!(lifetime(&past, now, ACCESS_FALLBACK), (ACCESS_FALLBACK, false));
        let far = jwt(r#"{"exp":99999999999}"#);
        assert_eq!(lifetime(&far, now, ACCESS_FALLBACK), (ACCESS_FALLBACK, false));
        assert_eq!(lifetime("opaque", now, REFRESH_FALLBACK), (REFRESH_FALLBACK, false));
    }

    #[test]
    fn renewal_schedule() {
        let s = Duration::from_secs;
        // One hour, five minutes margin: 75% of the lifetime comes first.
        assert_eq!(renew_after(s(3600), s(300)), s(2700));
        // One hour, twenty minutes margin: the margin decides.
        assert_eq!(renew_after(s(3600), s(1200)), s(2400));
        // Six seconds, two seconds margin: exp - margin = 4 s (under 75% = 4.5 s).
        assert_eq!(renew_after(s(6), s(2)), s(4));
        // A margin longer than the lifetime: a quarter of the lifetime, never zero.
        assert_eq!(renew_after(s(4), s(300)), s(1));
    }
}
