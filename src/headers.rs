//! Header and query rules, as pure functions with a test per rule: hop-by-hop removal, forwarding headers,
//! the request id, the injected Authorization, the removal of the legacy `api_token` query parameter, and what
//! depends on the upstream connection's HTTP version (`Host`, chunked framing).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

/// `X-Forwarded-For`
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Request-Id`
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `Keep-Alive` (no constant in `http`)
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`: non-standard, sent by old clients
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers of RFC 9110 §7.6.1 plus the legacy `Keep-Alive` and `Proxy-Connection`, and the proxy's
/// own `Proxy-Authorization` / `Proxy-Authenticate` (RFC 9110 §11.7), which are meant for this hop only.
static HOP_BY_HOP: [&HeaderName; 10] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
    &header::PROXY_AUTHORIZATION,
    &header::PROXY_AUTHENTICATE,
    &header::EXPECT,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): first every header that `Connection` (and the legacy
/// `Proxy-Connection`) names, then the fixed list. The `Connection` list is read before `Connection` itself is
/// removed, or the headers it names would leak to the next hop.
///
/// `Expect` is removed too: the proxy answers `100-continue` to its caller itself (hyper does so when the body
/// is first read), so the upstream must not wait for a body the proxy already streams.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the headers present (a handful), noting which of the fixed list are there: most requests
    // carry none, and then nothing else is done; most responses only `Connection: keep-alive`, and then one
    // header is removed, with no allocation and no lookup of names absent.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & CONNECTION_LISTS != 0 {
        remove_listed(headers);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
}

/// The bits of `Connection` and `Proxy-Connection` in [`HOP_BY_HOP`]'s order.
const CONNECTION_LISTS: u16 = 0b101;

/// Removes every header that `Connection` and `Proxy-Connection` name, except names of the fixed list (their
/// own removal follows when they are present). The lists are kept by reference count while the map changes;
/// names are looked up as text, never made into owned `HeaderName`s.
fn remove_listed(headers: &mut HeaderMap) {
    let mut first: [Option<HeaderValue>; 2] = [None, None];
    let mut more = Vec::new();
    let lists = headers.get_all(&header::CONNECTION).iter();
    for (i, list) in lists.chain(headers.get_all(&PROXY_CONNECTION).iter()).enumerate() {
        match first.get_mut(i) {
            Some(slot) => *slot = Some(list.clone()),
            None => more.push(list.clone()),
        }
    }
    for list in first.iter().flatten().chain(more.iter()) {
        // Bytes, not text: one non-ASCII token must not hide the valid names beside it.
        for token in list.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().as_bytes().eq_ignore_ascii_case(token))
            {
                continue;
            }
            // Not a valid header name (or not text): it names no header there is.
            if let Ok(name) = std::str::from_utf8(token) {
                headers.remove(name);
            }
        }
    }
}

/// Appends the caller's address to `X-Forwarded-For` (keeping what earlier proxies wrote, as one value), and
/// sets `X-Forwarded-Proto` and `X-Forwarded-Host` to what the caller used to reach this proxy.
pub fn set_forwarding(headers: &mut HeaderMap, client: IpAddr, proto: &'static str, caller_host: Option<HeaderValue>) {
    set_forwarding_for(headers, &client_value(client), proto, caller_host);
}

/// The caller's address as a header value; built once per connection, not per request.
pub fn client_value(client: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 64];
    HeaderValue::from_str(format_ip(client, &mut buf)).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// [`set_forwarding`] with the caller's address already made a header value by [`client_value`].
pub fn set_forwarding_for(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &'static str,
    caller_host: Option<HeaderValue>,
) {
    let mut earlier = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .peekable();
    let value = if earlier.peek().is_none() {
        Some(client.clone())
    } else {
        let mut joined = String::with_capacity(64);
        for v in earlier {
            joined.push_str(v);
            joined.push_str(", ");
        }
        joined.push_str(client.to_str().unwrap_or("unknown"));
        HeaderValue::from_str(&joined).ok()
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match caller_host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// Formats an IP address into `buf` without allocating.
fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 64 bytes hold any IPv4 or IPv6 text form (at most 45 bytes).
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    std::str::from_utf8(&buf[..len]).unwrap_or("unknown")
}

/// Fits a request's headers to the HTTP version of the upstream connection it goes out on. Run where that
/// version is known: on the affine connection (HTTP/1.1) or just before the pooled client.
///
/// - HTTP/2 (and 3) carry the authority only as `:authority`, which the client takes from the request URI (the
///   upstream's). RFC 9113 §8.3.1 tolerates a `host` that agrees with it, but nginx before 1.25 answers 400
///   "client sent duplicate host header", so `host` is removed. `Transfer-Encoding` is connection-specific and
///   forbidden there (RFC 9113 §8.2.2): HTTP/2 frames bodies itself.
/// - HTTP/1.1 requires `Host` (RFC 9112 §3.2): `host` when given (the upstream's). With `None` the header is
///   removed so the pooled client writes the upstream's from the URI on an HTTP/1.1 connection (and nothing on
///   an HTTP/2 one); a caller's own `Host` never goes through either way. When `unframed_body` (see
///   [`unframed_body`]) and no `Content-Length` is set, `Transfer-Encoding: chunked` is added: hyper sends a GET
///   or HEAD of unknown body length with no body at all unless told (RFC 9112 §6.1).
pub fn fit_to_upstream_version(
    headers: &mut HeaderMap,
    version: Version,
    host: Option<&HeaderValue>,
    unframed_body: bool,
) {
    if matches!(version, Version::HTTP_2 | Version::HTTP_3) {
        headers.remove(header::HOST);
        headers.remove(header::TRANSFER_ENCODING);
        return;
    }
    match host {
        Some(host) => headers.insert(header::HOST, host.clone()),
        None => headers.remove(header::HOST),
    };
    if unframed_body && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// Whether a GET or HEAD carries a body nobody gave a length for (chunked from an HTTP/1.1 caller, or HTTP/2
/// DATA without `content-length`). Rare, but the caller sent it: over HTTP/1.1 it needs chunked framing said
/// out loud (see [`fit_to_upstream_version`]). Other methods get chunked framing from hyper unasked.
pub fn unframed_body<B: http_body::Body>(method: &Method, body: &B) -> bool {
    (method == Method::GET || method == Method::HEAD) && !body.is_end_stream() && body.size_hint().exact().is_none()
}

/// Replaces whatever `Authorization` the caller sent with the proxy's token header.
pub fn set_authorization(headers: &mut HeaderMap, bearer: &HeaderValue) {
    headers.insert(header::AUTHORIZATION, bearer.clone());
}

/// Builds the `Authorization: Bearer <token>` value once per token, marked sensitive so that HTTP/2 never
/// indexes it (HPACK) and `Debug` output hides it. `None` when the token holds bytes a header cannot carry.
pub fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Returns the caller's `X-Request-Id` when it is a sane id (1-128 visible ASCII letters, digits or `-_.:`),
/// else a new one, and writes it into `headers` so the upstream sees the same id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(v), more) = (values.next(), values.next().is_some()) {
        if is_sane_request_id(v.as_bytes()) {
            let id = v.clone();
            if more {
                // One id only: further lines would reach the upstream as a list beside the id we log.
                headers.insert(X_REQUEST_ID.clone(), id.clone());
            }
            return id;
        }
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

fn is_sane_request_id(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// A new request id: a per-process random prefix and a counter, 32 hex digits, no syscall per request.
pub fn new_request_id() -> HeaderValue {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u64>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 32];
    hex_into(prefix, &mut buf[..16]);
    hex_into(n, &mut buf[16..]);
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

fn hex_into(mut n: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// Removes every `api_token` parameter from a query string and keeps everything else byte for byte.
///
/// Legacy ZapSign SDKs send their token as `?api_token=...`; it is a secret and must not reach the upstream
/// next to the proxy's own token. A parameter counts as `api_token` when its name, percent-decoded, is
/// `api_token` (servers decode names, so `api%5Ftoken` is the same parameter). Returns `None` when no
/// parameter is left (so the request carries no `?`), and borrows when nothing was removed.
pub fn strip_api_token(query: &str) -> Option<Cow<'_, str>> {
    if !query.split('&').any(is_api_token_param) {
        return if query.is_empty() {
            None
        } else {
            Some(Cow::Borrowed(query))
        };
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_api_token_param(p)).collect();
    if kept.iter().all(|p| p.is_empty()) {
        return None;
    }
    Some(Cow::Owned(kept.join("&")))
}

fn is_api_token_param(param: &str) -> bool {
    let name = param.split('=').next().unwrap_or("");
    if name == "api_token" {
        return true;
    }
    // Slow path only when the name is escaped: decode and compare.
    name.contains('%') && percent_decode(name).as_slice() == b"api_token"
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_fixed_hop_by_hop_headers() {
        let mut h = map(&[
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Bearer k"),
            ("proxy-authenticate", "Basic"),
            ("expect", "100-continue"),
            ("content-type", "application/json"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn removes_headers_named_by_connection_before_connection() {
        let mut h = map(&[
            ("connection", "close, X-Secret-Hop"),
            ("connection", "x-other"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key("connection"));
        assert!(!h.contains_key("x-secret-hop"));
        assert!(!h.contains_key("x-other"));
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn every_list_of_connection_and_proxy_connection_counts_past_the_first_two() {
        let mut h = map(&[
            ("connection", "keep-alive, X-A"),
            ("connection", "x-b"),
            ("proxy-connection", "X-C,\u{e9}t\u{e9}, TE"),
            ("connection", "close,x-d"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
            ("x-d", "4"),
            ("te", "trailers"),
            ("close", "a header named like an option"),
            ("x-kept", "5"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn connection_naming_invalid_tokens_is_harmless() {
        let mut h = map(&[("connection", " , ,bad name,"), ("x-kept", "1")]);
        remove_hop_by_hop(&mut h);
        assert!(h.contains_key("x-kept"));
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("x-forwarded-for", "10.0.0.2")]);
        set_forwarding(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        let mut h = HeaderMap::new();
        set_forwarding(
            &mut h,
            "::1".parse().unwrap(),
            "https",
            Some(HeaderValue::from_static("proxy:8080")),
        );
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "proxy:8080");
    }

    #[test]
    fn forwarded_host_from_caller_replaces_spoofed_one() {
        let mut h = map(&[("x-forwarded-host", "evil.example"), ("x-forwarded-proto", "ftp")]);
        set_forwarding(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn authorization_is_replaced() {
        let mut h = map(&[("authorization", "Bearer caller"), ("authorization", "Basic x")]);
        let bearer = bearer_value("proxy-token").unwrap();
        set_authorization(&mut h, &bearer);
        assert_eq!(h.get_all("authorization").iter().count(), 1);
        assert_eq!(h["authorization"], "Bearer proxy-token");
        assert!(h["authorization"].is_sensitive());
        assert!(bearer_value("bad\ntoken").is_none());
    }

    #[test]
    fn duplicate_request_ids_collapse_to_the_one_returned() {
        let mut h = map(&[("x-request-id", "abc-123"), ("x-request-id", "forged, id")]);
        assert_eq!(ensure_request_id(&mut h), "abc-123");
        assert_eq!(h.get_all("x-request-id").iter().collect::<Vec<_>>(), ["abc-123"]);
    }

    #[test]
    fn request_id_kept_when_sane_else_generated() {
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(ensure_request_id(&mut h), "abc-123");
        let mut h = map(&[("x-request-id", "has space\"and quote")]);
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
        let mut h = HeaderMap::new();
        let a = ensure_request_id(&mut h);
        let b = ensure_request_id(&mut HeaderMap::new());
        assert_ne!(a, b);
    }

    const UPSTREAM: HeaderValue = HeaderValue::from_static("api.zapsign.com.br");

    #[test]
    fn http2_carries_the_authority_only_as_authority() {
        // Whatever reached this point (the caller's Host, a chunked marker from an earlier attempt): gone.
        let mut h = map(&[
            ("host", "caller.example"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
        ]);
        fit_to_upstream_version(&mut h, Version::HTTP_2, Some(&UPSTREAM), true);
        assert!(!h.contains_key("host"), "{h:?}");
        assert!(!h.contains_key("transfer-encoding"), "{h:?}");
        assert_eq!(h["x-kept"], "1");
        let mut h = HeaderMap::new();
        fit_to_upstream_version(&mut h, Version::HTTP_2, None, true);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn http1_gets_the_upstreams_host_replacing_the_callers() {
        let mut h = map(&[("host", "caller.example"), ("host", "second.example")]);
        fit_to_upstream_version(&mut h, Version::HTTP_11, Some(&UPSTREAM), false);
        assert_eq!(h.get_all("host").iter().collect::<Vec<_>>(), [UPSTREAM]);
        assert!(!h.contains_key("transfer-encoding"));
    }

    #[test]
    fn http1_without_a_host_leaves_it_to_the_client() {
        let mut h = map(&[("host", "caller.example")]);
        fit_to_upstream_version(&mut h, Version::HTTP_11, None, false);
        assert!(
            !h.contains_key("host"),
            "the caller's Host must not reach the pool: {h:?}"
        );
    }

    #[test]
    fn http1_marks_an_unframed_body_chunked_unless_its_length_is_known() {
        let mut h = HeaderMap::new();
        fit_to_upstream_version(&mut h, Version::HTTP_11, Some(&UPSTREAM), true);
        assert_eq!(h["transfer-encoding"], "chunked");
        let mut h = map(&[("content-length", "5")]);
        fit_to_upstream_version(&mut h, Version::HTTP_11, None, true);
        assert!(!h.contains_key("transfer-encoding"), "{h:?}");
        // Applied twice (a request handed back by the affine connection goes to the pool): still one marker.
        let mut h = HeaderMap::new();
        fit_to_upstream_version(&mut h, Version::HTTP_11, Some(&UPSTREAM), true);
        fit_to_upstream_version(&mut h, Version::HTTP_11, None, true);
        assert_eq!(h.get_all("transfer-encoding").iter().count(), 1);
        assert!(!h.contains_key("host"));
    }

    /// A body that has not ended and says nothing of its length.
    struct Unsized;

    impl http_body::Body for Unsized {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }
    }

    #[test]
    fn unframed_body_is_a_get_or_head_body_of_unknown_length() {
        use http_body_util::{Empty, Full};
        assert!(unframed_body(&Method::GET, &Unsized));
        assert!(unframed_body(&Method::HEAD, &Unsized));
        // hyper frames other methods' bodies itself.
        assert!(!unframed_body(&Method::POST, &Unsized));
        assert!(!unframed_body(
            &Method::GET,
            &Full::new(bytes::Bytes::from_static(b"known"))
        ));
        assert!(!unframed_body(&Method::GET, &Empty::<bytes::Bytes>::new()));
    }

    #[test]
    fn api_token_removed_everything_else_byte_for_byte() {
        assert_eq!(strip_api_token("a=%20&api_token=T&b=2").as_deref(), Some("a=%20&b=2"));
        assert_eq!(strip_api_token("api_token=T"), None);
        assert_eq!(strip_api_token("api_token=T&api_token=U"), None);
        assert_eq!(strip_api_token("api_token"), None);
        assert_eq!(strip_api_token("a=1&api_token=").as_deref(), Some("a=1"));
        assert_eq!(strip_api_token("api%5Ftoken=T&x=1").as_deref(), Some("x=1"));
        assert_eq!(
            strip_api_token("api_tokens=1&my_api_token=2").as_deref(),
            Some("api_tokens=1&my_api_token=2")
        );
        assert_eq!(strip_api_token("a=%2F&&b"), Some(Cow::Borrowed("a=%2F&&b")));
        assert_eq!(strip_api_token(""), None);
        assert_eq!(strip_api_token("x=api_token=1").as_deref(), Some("x=api_token=1"));
    }

    #[test]
    fn percent_decode_handles_truncated_escapes() {
        assert_eq!(percent_decode("a%5"), b"a%5");
        assert_eq!(percent_decode("%zz"), b"%zz");
        assert_eq!(percent_decode("%41"), b"A");
    }
}
