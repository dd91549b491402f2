//! The request rewrite: what the proxy does to every caller request head before it goes upstream, as two pure
//! functions that `proxy.rs`, the `request_head` fuzz target and `benches/header_rewrite.rs` all call, so what
//! is fuzzed and measured is what runs.
//!
//! - [`upstream_target`] checks the request target and builds the upstream URI (the 400s: `CONNECT`, an
//!   absolute-form target for another host, a path not starting with `/`; the legacy `api_token` query
//!   parameter removed). It runs before the token is fetched, so a request refused here never waits for, or
//!   triggers, a login.
//! - [`rewrite_head`] applies the header rules of [`crate::headers`] in their one correct order: hop-by-hop
//!   headers out (reading `Connection` first), the request id written again, the token injected, the caller's
//!   `Host` out, the forwarding headers set, HTTP/1.1 towards the upstream.
//!
//! What depends on the upstream connection's HTTP version (`Host` or only `:authority`, chunked framing) is not
//! here: [`crate::headers::fit_to_upstream_version`] runs where that version is known.

use bytes::Bytes;
use http::header::HOST;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Uri, Version};

use crate::config::BaseUrl;
use crate::error::ProxyError;
use crate::headers::{remove_hop_by_hop, set_authorization, set_forwarding_for, strip_api_token, X_REQUEST_ID};

/// What the rewrite needs beyond the request head; built per request from values made once (per token, per
/// caller connection), so it costs no allocation.
#[derive(Debug, Clone, Copy)]
pub struct RewriteContext<'a> {
    /// `Authorization: Bearer <token>`, marked sensitive (see [`crate::headers::bearer_value`]).
    pub authorization: &'a HeaderValue,
    /// The caller's address as a header value (see [`crate::headers::client_value`]), for `X-Forwarded-For`.
    pub client: &'a HeaderValue,
    /// `"http"` or `"https"`: how the caller reached the proxy, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// The id the proxy logs and answers with (see [`crate::headers::ensure_request_id`]).
    pub request_id: &'a HeaderValue,
}

/// A request target [`upstream_target`] accepted: the upstream's scheme and authority with the caller's path
/// and query (less `api_token`).
#[derive(Debug, Clone)]
pub struct UpstreamTarget(Uri);

impl UpstreamTarget {
    /// The URI the request goes to.
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

/// The upstream URI for the caller's request target. Refuses `CONNECT` and absolute-form targets naming any
/// other authority, so the token never goes anywhere but the upstream (RFC 9112 §3.2.2: a server must accept
/// absolute-form; we accept it only for the upstream itself and forward it in origin form).
pub fn upstream_target(parts: &Parts, upstream: &BaseUrl) -> Result<UpstreamTarget, ProxyError> {
    if parts.method == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: this proxy only forwards requests to the ZapSign API",
        ));
    }
    // In HTTP/2 the authority is the `:authority` pseudo-header, the equivalent of Host: it never chooses
    // the destination. In HTTP/1.1 an authority in the URI means an absolute-form target.
    if parts.version != Version::HTTP_2 {
        if let Some(authority) = parts.uri.authority() {
            if !names_upstream(upstream, parts.uri.scheme(), authority) {
                return Err(ProxyError::BadRequest(
                    "the request target names another host: send origin-form targets (/api/v1/...) to this proxy",
                ));
            }
        }
    }
    let pq = parts
        .uri
        .path_and_query()
        .ok_or(ProxyError::BadRequest("the request has no path"))?;
    if !pq.path().starts_with('/') {
        return Err(ProxyError::BadRequest("the request path must start with /"));
    }
    let path_and_query = match pq.query() {
        None => pq.clone(),
        Some(q) => match strip_api_token(q) {
            Some(kept) if kept.len() == q.len() => pq.clone(),
            Some(kept) => PathAndQuery::from_maybe_shared(Bytes::from(format!("{}?{kept}", pq.path())))
                .map_err(|_| ProxyError::BadRequest("the request target is malformed"))?,
            None => PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(pq.path().as_bytes()))
                .map_err(|_| ProxyError::BadRequest("the request target is malformed"))?,
        },
    };
    // Built from parts, never from a string, so a path such as `//evil.example/x` stays a path.
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map(UpstreamTarget)
        .map_err(|_| ProxyError::BadRequest("the request target is malformed"))
}

/// Whether an absolute-form authority is the upstream's: same host (case-insensitive), same port, no user info.
fn names_upstream(upstream: &BaseUrl, scheme: Option<&Scheme>, authority: &Authority) -> bool {
    if authority.as_str().contains('@') {
        return false;
    }
    let port = authority
        .port_u16()
        .unwrap_or(if scheme == Some(&Scheme::HTTPS) { 443 } else { 80 });
    authority.host().eq_ignore_ascii_case(upstream.authority.host()) && port == upstream.port()
}

/// Rewrites a caller's request head into the one sent upstream, towards `target`. The order matters and is
/// kept here only:
///
/// 1. The caller's `Host` (or HTTP/2 `:authority`) is read first, for `X-Forwarded-Host`.
/// 2. Hop-by-hop headers go, and every header `Connection` names (RFC 9110 §7.6.1).
/// 3. `X-Request-Id` is written again: `Connection: x-request-id` must not strip the id the proxy logs.
/// 4. Any caller `Authorization` is replaced by the proxy's token.
/// 5. The caller's `Host` goes: it never chooses or reaches anything upstream. The upstream's goes on in
///    [`crate::headers::fit_to_upstream_version`], once the connection's HTTP version is known: as `Host`
///    over HTTP/1.1, only as `:authority` over HTTP/2.
/// 6. `X-Forwarded-For` gets the caller appended; `X-Forwarded-Proto` and `X-Forwarded-Host` are the proxy's.
/// 7. The head goes out as HTTP/1.1 towards `target` (the client picks HTTP/2 by ALPN on its own).
pub fn rewrite_head(parts: &mut Parts, target: UpstreamTarget, ctx: &RewriteContext<'_>) {
    let caller_host = caller_host(parts);
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
    set_authorization(&mut parts.headers, ctx.authorization);
    parts.headers.remove(HOST);
    set_forwarding_for(&mut parts.headers, ctx.client, ctx.proto, caller_host);
    parts.uri = target.0;
    parts.version = Version::HTTP_11;
}

/// What the caller used to reach us: `Host`, or the HTTP/2 `:authority`.
fn caller_host(parts: &Parts) -> Option<HeaderValue> {
    parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{bearer_value, client_value};
    use http::Request;

    fn upstream() -> BaseUrl {
        BaseUrl::parse("upstream.url", "https://api.zapsign.com.br").unwrap()
    }

    fn head(method: Method, target: &str, version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut req = Request::builder().method(method).uri(target).version(version);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn target_of(parts: &Parts) -> Result<String, &'static str> {
        upstream_target(parts, &upstream())
            .map(|t| t.uri().to_string())
            .map_err(|e| e.code())
    }

    #[test]
    fn origin_form_goes_to_the_upstream_without_api_token() {
        let p = head(
            Method::GET,
            "/api/v1/docs/?a=%20&api_token=T&b=2",
            Version::HTTP_11,
            &[],
        );
        assert_eq!(
            target_of(&p).unwrap(),
            "https://api.zapsign.com.br/api/v1/docs/?a=%20&b=2"
        );
        let p = head(Method::GET, "/api/v1/docs/?api_token=T", Version::HTTP_11, &[]);
        assert_eq!(target_of(&p).unwrap(), "https://api.zapsign.com.br/api/v1/docs/");
        let p = head(Method::GET, "//evil.example/x", Version::HTTP_11, &[]);
        assert_eq!(target_of(&p).unwrap(), "https://api.zapsign.com.br//evil.example/x");
    }

    #[test]
    fn connect_and_other_hosts_are_refused_the_upstream_itself_is_not() {
        let p = head(Method::CONNECT, "api.zapsign.com.br:443", Version::HTTP_11, &[]);
        assert_eq!(target_of(&p), Err("bad_request"));
        let p = head(Method::GET, "http://evil.example/api/", Version::HTTP_11, &[]);
        assert_eq!(target_of(&p), Err("bad_request"));
        let p = head(
            Method::GET,
            "https://user@api.zapsign.com.br/api/",
            Version::HTTP_11,
            &[],
        );
        assert_eq!(target_of(&p), Err("bad_request"));
        let p = head(Method::GET, "http://api.zapsign.com.br/api/", Version::HTTP_11, &[]);
        assert_eq!(target_of(&p), Err("bad_request"), "port 80 is not the upstream's 443");
        let p = head(
            Method::GET,
            "https://API.zapsign.com.br:443/api/?x=1",
            Version::HTTP_11,
            &[],
        );
        assert_eq!(target_of(&p).unwrap(), "https://api.zapsign.com.br/api/?x=1");
        // Over HTTP/2 the authority is `:authority`, the equivalent of Host: it never chooses the destination.
        let p = head(Method::GET, "https://caller.example/api/", Version::HTTP_2, &[]);
        assert_eq!(target_of(&p).unwrap(), "https://api.zapsign.com.br/api/");
    }

    #[test]
    fn the_head_is_rewritten_in_order() {
        let mut p = head(
            Method::POST,
            "/api/v1/docs/",
            Version::HTTP_11,
            &[
                ("host", "proxy.internal:8080"),
                ("connection", "x-request-id, x-hop"),
                ("x-hop", "1"),
                ("authorization", "Bearer caller"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-kept", "yes"),
            ],
        );
        let target = upstream_target(&p, &upstream()).unwrap();
        let (bearer, client) = (bearer_value("t").unwrap(), client_value("10.1.2.3".parse().unwrap()));
        let id = HeaderValue::from_static("id-1");
        let ctx = RewriteContext {
            authorization: &bearer,
            client: &client,
            proto: "https",
            request_id: &id,
        };
        rewrite_head(&mut p, target, &ctx);
        let h = &p.headers;
        assert_eq!(
            h["x-request-id"], "id-1",
            "a Connection list naming the id must not strip it"
        );
        assert!(!h.contains_key("x-hop") && !h.contains_key("connection"));
        assert_eq!(h["authorization"], "Bearer t");
        assert!(h["authorization"].is_sensitive());
        assert!(!h.contains_key("host"), "the caller's Host must not go upstream");
        assert_eq!(h["x-forwarded-host"], "proxy.internal:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(p.uri, "https://api.zapsign.com.br/api/v1/docs/");
        assert_eq!(p.version, Version::HTTP_11);
    }

    #[test]
    fn http2_authority_is_the_forwarded_host_when_there_is_no_host_header() {
        let mut p = head(Method::GET, "https://proxy.internal/api/", Version::HTTP_2, &[]);
        let target = upstream_target(&p, &upstream()).unwrap();
        let (bearer, client) = (bearer_value("t").unwrap(), client_value("::1".parse().unwrap()));
        let id = HeaderValue::from_static("id-2");
        let ctx = RewriteContext {
            authorization: &bearer,
            client: &client,
            proto: "http",
            request_id: &id,
        };
        rewrite_head(&mut p, target, &ctx);
        assert_eq!(p.headers["x-forwarded-host"], "proxy.internal");
        assert_eq!(p.version, Version::HTTP_11);
    }
}
