//! The access policy: who may call the proxy and which paths they may reach. [`AccessPolicy`] is compiled
//! from `access.*` once (and again on each reload, swapped whole), and [`AccessPolicy::check`] runs the
//! contract's checks in its order for every request. The path and key rules are pure functions with a test
//! per edge case; the property tests call the same functions.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::PROXY_AUTHORIZATION;
use http::request::Parts;
use ipnet::IpNet;

use crate::config::{AccessConfig, ClientKey};
use crate::error::ProxyError;

/// The compiled `access.*` settings: caller networks, client keys and path prefixes.
#[derive(Debug)]
pub struct AccessPolicy {
    /// Caller networks allowed (`access.allow_networks`).
    networks: Vec<IpNet>,
    /// Keys a caller must present one of; none required when empty.
    client_keys: Vec<ClientKey>,
    /// Path prefixes callers may reach (`access.allow_paths`).
    allow_paths: Vec<String>,
}

/// Why a caller's request is refused, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller's address is outside `access.allow_networks` (403).
    Network,
    /// Client keys are configured and the caller presented none, or a wrong one (407).
    ClientKey,
    /// The path holds a dot segment (400).
    DotSegment,
    /// The path is outside every `access.allow_paths` prefix (403).
    Path,
}

impl From<Refusal> for ProxyError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Network => ProxyError::Forbidden("the caller's address is not in access.allow_networks"),
            Refusal::ClientKey => ProxyError::ProxyAuthRequired,
            Refusal::DotSegment => ProxyError::BadRequest(
                "the path holds a dot segment (`.` or `..`, plain or percent-encoded): send the resolved path",
            ),
            Refusal::Path => ProxyError::Forbidden("the path is not in access.allow_paths"),
        }
    }
}

impl AccessPolicy {
    /// The policy `access.*` describes.
    pub fn new(config: &AccessConfig) -> Self {
        Self {
            networks: config.allow_networks.clone(),
            client_keys: config.client_keys.clone(),
            allow_paths: config.allow_paths.clone(),
        }
    }

    /// The contract's order: caller network (403), client key (407), dot segments in the path (400), path
    /// (403). Returns the id of the client key presented, for the access log.
    pub fn check(&self, parts: &Parts, peer: SocketAddr) -> Result<Option<Arc<str>>, Refusal> {
        let ip = peer.ip().to_canonical();
        if !self.networks.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::Network);
        }
        let mut key_id = None;
        if !self.client_keys.is_empty() {
            let presented = parts
                .headers
                .get(PROXY_AUTHORIZATION)
                .and_then(|v| bearer_key(v.as_bytes()))
                .ok_or(Refusal::ClientKey)?;
            // Every key is compared, so the time taken does not tell which key came close.
            for key in &self.client_keys {
                if key.key.constant_time_eq(presented) {
                    key_id = Some(key.id.clone());
                }
            }
            if key_id.is_none() {
                return Err(Refusal::ClientKey);
            }
        }
        // A CONNECT (authority-form) target has no path to check; the proxy refuses it with 400.
        let Some(pq) = parts.uri.path_and_query() else {
            return Ok(key_id);
        };
        check_path(pq.path(), &self.allow_paths)?;
        Ok(key_id)
    }
}

/// The path check of the contract: a path holding a dot segment is refused with 400 (before the prefix check,
/// so `allow_paths` cannot be walked out of), then a path outside every `allow_paths` prefix with 403.
///
/// The prefix check stays a byte comparison on the path as sent: with no dot segment left, the path the
/// upstream resolves (RFC 3986 §5.2.4) is the path sent, so the prefix it starts with is the one checked here.
pub fn check_path(path: &str, allow_paths: &[String]) -> Result<(), Refusal> {
    if has_dot_segment(path) {
        return Err(Refusal::DotSegment);
    }
    if !allow_paths.iter().any(|p| path.starts_with(p.as_str())) {
        return Err(Refusal::Path);
    }
    Ok(())
}

/// Whether `path` (without its query) holds a dot segment: a segment that is `.` or `..` once every `%2e` /
/// `%2E` in it is read as `.`. RFC 3986 §5.2.4 removes such segments when the upstream resolves the path, so
/// `/api/../admin` would reach `/admin` while its bytes start with `/api/`; §2.3 makes `%2E` equivalent to
/// `.`, and §6.2.2.2 lets a server decode it before resolving.
///
/// Segments are delimited by `/`. As defence in depth, an encoded slash (`%2F`) and a backslash (`\`,
/// `%5C`) delimit too: servers that decode `%2F` or read `\` as `/` before routing would otherwise resolve
/// `/api/..%2Fadmin` to `/admin`. `/api/.well-known` and `/api/a..b` hold no dot segment.
///
/// One pass over the bytes, no allocation: it runs on every request.
pub fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    // Dots seen in the current segment; `None` once the segment holds anything else.
    let mut dots: Option<u8> = Some(0);
    let mut i = 0;
    while i < bytes.len() {
        let (width, unit) = unit_at(bytes, i);
        match unit {
            Unit::Delimiter => {
                if matches!(dots, Some(1 | 2)) {
                    return true;
                }
                dots = Some(0);
            }
            Unit::Dot => dots = dots.and_then(|n| n.checked_add(1)),
            Unit::Other => dots = None,
        }
        i += width;
    }
    matches!(dots, Some(1 | 2))
}

/// What one unit of a path is, for the dot-segment rule.
enum Unit {
    /// `/`, or (defence in depth) `\`, `%2F`, `%5C`.
    Delimiter,
    /// `.` or `%2E` in either case.
    Dot,
    /// Anything else.
    Other,
}

/// The unit starting at `bytes[i]` and how many bytes it spans.
fn unit_at(bytes: &[u8], i: usize) -> (usize, Unit) {
    match bytes[i] {
        b'/' | b'\\' => (1, Unit::Delimiter),
        b'.' => (1, Unit::Dot),
        b'%' if i + 2 < bytes.len() => match (bytes[i + 1], bytes[i + 2].to_ascii_lowercase()) {
            (b'2', b'e') => (3, Unit::Dot),
            (b'2', b'f') | (b'5', b'c') => (3, Unit::Delimiter),
            _ => (1, Unit::Other),
        },
        _ => (1, Unit::Other),
    }
}

/// The key in a `Proxy-Authorization: Bearer <key>` value, or `None` for another scheme or no key.
///
/// RFC 9110 §11.1: the auth-scheme is a case-insensitive token, so `bearer KEY` and `BEARER KEY` count;
/// §11.4: `credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]`, so one or more spaces follow it.
pub fn bearer_key(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &value[SCHEME.len()..];
    if rest.first() != Some(&b' ') {
        return None;
    }
    let key = rest.trim_ascii_start();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_dot_segments_are_found() {
        for path in [
            "/api/../admin",
            "/api/./x",
            "/api/..",
            "/api/.",
            "/..",
            "/.",
            "/api//../x",
            "/api/x/..",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn percent_encoded_dots_count_in_any_case_and_mix() {
        for path in [
            "/api/%2e%2e/admin",
            "/api/%2E%2E/admin",
            "/api/%2e%2E/admin",
            "/api/.%2e/admin",
            "/api/%2e./admin",
            "/api/%2E./admin",
            "/api/%2e/admin",
            "/api/%2E",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn dots_inside_a_segment_are_not_dot_segments() {
        for path in [
            "/api/.well-known",
            "/api/a..b",
            "/api/...",
            "/api/.../x",
            "/api/..a",
            "/api/a.",
            "/api/%2e%2e%2e",
            "/api/%2e%2ex",
            "/api/v1/docs/",
            "/",
            "",
            "/api/file.pdf",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn other_escapes_and_truncated_escapes_are_not_dots() {
        for path in ["/api/%2", "/api/%", "/api/%2x", "/api/%3e", "/api/%20", "/api/%2e%"] {
            assert!(!has_dot_segment(path), "{path}");
        }
        // `%2e%` is a dot then a stray `%`: one segment `.%`, not a dot segment; `%2e` alone at the end is.
        assert!(has_dot_segment("/api/%2e"));
    }

    #[test]
    fn encoded_slashes_and_backslashes_delimit_too() {
        for path in [
            "/api/..%2Fadmin",
            "/api/..%2fadmin",
            "/api/x%2F..",
            "/api/%2e%2e%5Cadmin",
            "/api/..\\admin",
            "/api\\..\\admin",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in ["/api/a%2Fb", "/api/a\\b", "/api/%2F%2F"] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn the_path_check_refuses_dot_segments_with_400_before_the_prefix_check() {
        let allow = vec!["/api/".to_owned()];
        assert!(check_path("/api/v1/docs/", &allow).is_ok());
        assert!(check_path("/api/.well-known", &allow).is_ok());
        let err = ProxyError::from(check_path("/api/../admin", &allow).unwrap_err());
        assert_eq!(err.status(), 400);
        assert_eq!(err.code(), "bad_request");
        // Outside the prefixes and holding a dot segment: the dot segment answers.
        assert_eq!(check_path("/admin/../api/", &allow), Err(Refusal::DotSegment));
        assert_eq!(
            ProxyError::from(check_path("/admin/", &allow).unwrap_err()).status(),
            403
        );
        assert_eq!(check_path("/admin/", &[]), Err(Refusal::Path));
    }

    fn policy(toml: &str) -> AccessPolicy {
        let text = format!("[auth]\nmode = \"static\"\napi_token = \"t\"\n[access]\n{toml}");
        let config = crate::config::Config::from_toml(&text, &|_| None).unwrap();
        AccessPolicy::new(&config.access)
    }

    fn request(path: &str, proxy_authorization: Option<&str>) -> Parts {
        let mut req = http::Request::get(path);
        if let Some(value) = proxy_authorization {
            req = req.header(PROXY_AUTHORIZATION, value);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn checks_run_network_then_key_then_dot_segment_then_path() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "k-1\n").unwrap();
        let p = policy(&format!(
            "allow_networks = [\"10.0.0.0/8\"]\nclient_keys_file = \"{}\"\n",
            keys.display()
        ));
        let inside: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let outside: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        // Each request fails every check from its own on, so the first one named is the one that runs first.
        assert_eq!(p.check(&request("/x/../y", None), outside), Err(Refusal::Network));
        assert_eq!(
            p.check(&request("/x/../y", Some("Bearer no")), inside),
            Err(Refusal::ClientKey)
        );
        assert_eq!(
            p.check(&request("/x/../y", Some("Bearer k-1")), inside),
            Err(Refusal::DotSegment)
        );
        assert_eq!(
            p.check(&request("/x/y", Some("Bearer k-1")), inside),
            Err(Refusal::Path)
        );
        let id = p.check(&request("/api/v1", Some("Bearer k-1")), inside).unwrap();
        assert_eq!(id.as_deref(), Some(crate::config::ClientKey::new("k-1").id.as_ref()));
    }

    #[test]
    fn without_client_keys_no_key_is_asked_and_none_is_named() {
        let p = policy("");
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(p.check(&request("/api/v1", None), local), Ok(None));
        // An IPv4 caller on an IPv6 socket is matched as the IPv4 address it is.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        assert_eq!(p.check(&request("/api/v1", None), mapped), Ok(None));
    }

    #[test]
    fn refusals_answer_with_the_contract_statuses() {
        for (refusal, status, code) in [
            (Refusal::Network, 403, "forbidden"),
            (Refusal::ClientKey, 407, "proxy_auth_required"),
            (Refusal::DotSegment, 400, "bad_request"),
            (Refusal::Path, 403, "forbidden"),
        ] {
            let err = ProxyError::from(refusal);
            assert_eq!((err.status().as_u16(), err.code()), (status, code), "{refusal:?}");
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["Bearer k-1", "bearer k-1", "BEARER k-1", "bEaReR k-1", "Bearer   k-1"] {
            assert_eq!(bearer_key(value.as_bytes()), Some(&b"k-1"[..]), "{value}");
        }
    }

    #[test]
    fn other_schemes_and_missing_keys_give_none() {
        for value in [
            "Basic k-1",
            "Bearerk-1",
            "Bearer",
            "Bearer ",
            "Bearer   ",
            "",
            "Bear k-1",
            "Token k-1",
        ] {
            assert_eq!(bearer_key(value.as_bytes()), None, "{value}");
        }
    }
}
