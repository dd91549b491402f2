//! The request_head target's checks on the production rewrite (`zapsign_proxy::rewrite`), shared by fuzz_targets/request_head.rs and the main crate's
//! tests/fuzz_regressions.rs (which replays fuzz/regressions/request_head/* without libFuzzer). See fuzz/README.md.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri, Version};
use zapsign_proxy::config::BaseUrl;
use zapsign_proxy::headers::{
    bearer_value, client_value, ensure_request_id, fit_to_upstream_version, remove_hop_by_hop, strip_api_token,
};
use zapsign_proxy::rewrite::{rewrite_head, upstream_target, RewriteContext};

/// The fixed hop-by-hop list of `headers.rs`, plus `Expect`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
];

/// Headers the proxy writes itself after removing the hop-by-hop ones; a `Connection` list naming them does
/// not keep them away from the upstream.
const SET_BY_PROXY: &[&str] = &[
    "authorization",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

const TOKEN: &str = "fuzz-proxy-token.eyJ0eXAiOiJKV1QifQ";
const UPSTREAM_HOST: &str = "api.zapsign.com.br";

/// `upstream.url`, parsed once.
fn upstream() -> &'static BaseUrl {
    static UPSTREAM: OnceLock<BaseUrl> = OnceLock::new();
    UPSTREAM.get_or_init(|| {
        BaseUrl::parse("upstream.url", &format!("https://{UPSTREAM_HOST}")).expect("the fixed upstream URL is valid")
    })
}

struct Head {
    headers: HeaderMap,
    /// As the proxy sees it: `/p?<query>` parsed as a request target.
    target: PathAndQuery,
    client: IpAddr,
    https: bool,
}

/// The input, close to the wire form hyper parses: a flag byte (bit 0: https, bit 1: IPv6 caller), the caller's
/// address (4 or 16 bytes), then lines split at `\n`: the first is the query (the target is `/p?<query>`), each
/// further one a header `name:value` (an optional `\r` at the end and white space around the value dropped, as
/// hyper does). Names and values hyper would refuse are skipped; an invalid target skips the input.
fn head(data: &[u8]) -> Option<Head> {
    let (&flags, rest) = data.split_first()?;
    let (client, rest) = if flags & 2 == 0 {
        let (ip, rest) = rest.split_first_chunk::<4>()?;
        (IpAddr::V4(Ipv4Addr::from(*ip)), rest)
    } else {
        let (ip, rest) = rest.split_first_chunk::<16>()?;
        (IpAddr::V6(Ipv6Addr::from(*ip)), rest)
    };
    let mut lines = rest.split(|b| *b == b'\n');
    let mut target = b"/p?".to_vec();
    target.extend_from_slice(lines.next()?);
    let target = PathAndQuery::try_from(target).ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let value = trim_ows(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
    Some(Head {
        headers,
        target,
        client,
        https: flags & 1 == 1,
    })
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn is_sane_id(b: &[u8]) -> bool {
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Lower-case names that the `Connection` and `Proxy-Connection` values of `headers` name: comma-separated
/// members, optional white space (SP / HTAB) around them, invalid members ignored.
fn named_by_connection(headers: &HeaderMap) -> Vec<String> {
    let mut named = Vec::new();
    for list in ["connection", "proxy-connection"] {
        for value in headers.get_all(list) {
            for member in value.as_bytes().split(|b| *b == b',') {
                let start = member.iter().position(|b| !matches!(b, b' ' | b'\t'));
                let end = member.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
                if let (Some(s), Some(e)) = (start, end) {
                    if let Ok(name) = HeaderName::from_bytes(&member[s..=e]) {
                        named.push(name.as_str().to_owned());
                    }
                }
            }
        }
    }
    named
}

/// A query parameter's name percent-decoded (`%XX` with two hex digits is one byte; anything else is itself).
fn decoded_name(param: &str) -> Vec<u8> {
    let name = param.as_bytes().split(|b| *b == b'=').next().unwrap_or(b"");
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'%' && i + 2 < name.len() {
            let (h, l) = (name[i + 1], name[i + 2]);
            if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push(hex(h) * 16 + hex(l));
                i += 3;
                continue;
            }
        }
        out.push(name[i]);
        i += 1;
    }
    out
}

fn is_api_token(param: &str) -> bool {
    decoded_name(param) == b"api_token"
}

fn check_query(query: &str) {
    let out = strip_api_token(query);
    let expected: Vec<&str> = query.split('&').filter(|p| !is_api_token(p)).collect();
    match &out {
        None => assert!(
            expected.iter().all(|p| p.is_empty()),
            "query {query:?}: None, but {expected:?} should be kept"
        ),
        Some(kept) => {
            assert!(!kept.is_empty(), "query {query:?}: Some(\"\") instead of None");
            let got: Vec<&str> = kept.split('&').collect();
            assert_eq!(got, expected, "query {query:?}: kept parameters differ");
            for p in &got {
                assert!(!is_api_token(p), "query {query:?}: api_token parameter {p:?} kept");
            }
            match kept {
                Cow::Borrowed(b) => assert_eq!(*b, query, "borrowed output is not the query"),
                Cow::Owned(o) => assert!(o.len() < query.len(), "query {query:?}: copied without removing"),
            }
            let target = format!("/p?{kept}");
            let pq = PathAndQuery::try_from(target.as_str())
                .unwrap_or_else(|e| panic!("query {query:?}: output {kept:?} is not a request target ({e})"));
            assert_eq!(
                pq.query(),
                Some(&kept[..]),
                "query {query:?}: output changes when parsed again"
            );
        }
    }
    let twice = out.as_deref().and_then(strip_api_token).map(Cow::into_owned);
    assert_eq!(
        out.map(Cow::into_owned),
        twice,
        "query {query:?}: stripping twice differs from once"
    );
}

/// Runs the proxy's own rewrite (`src/rewrite.rs`, the functions `src/proxy.rs` calls) on the head built from
/// `data` and checks every invariant; panics on a violation.
pub fn check(data: &[u8]) {
    let Some(Head {
        headers,
        target,
        client,
        https,
    }) = head(data)
    else {
        return;
    };
    let original = headers.clone();
    let proto = if https { "https" } else { "http" };
    let bearer = bearer_value(TOKEN).expect("the fixed token is a valid header value");
    let query = target.query().map(str::to_owned);
    let (mut parts, ()) = Request::builder()
        .method(Method::GET)
        .uri(Uri::from(target))
        .version(Version::HTTP_11)
        .body(())
        .expect("an origin-form GET is a request")
        .into_parts();
    parts.headers = headers;

    // `Proxy::handle`: the request id, before anything else.
    let id = ensure_request_id(&mut parts.headers);
    // `ensure_request_id` alone leaves exactly the id it returns (the rewrite writes it again anyway).
    let ids: Vec<&HeaderValue> = parts.headers.get_all("x-request-id").iter().collect();
    assert_eq!(
        ids,
        vec![&id],
        "ensure_request_id left other ids than {id:?}: {:?}",
        parts.headers
    );
    let caller_host = parts.headers.get(HOST).cloned();

    // `Proxy::forward`: the target, then the head.
    let target =
        upstream_target(&parts, upstream()).unwrap_or_else(|e| panic!("an origin-form target was refused: {e}"));
    let client_value = client_value(client);
    let ctx = RewriteContext {
        authorization: &bearer,
        client: &client_value,
        proto,
        request_id: &id,
    };
    rewrite_head(&mut parts, target, &ctx);

    // The target: the upstream's scheme and authority, the caller's path, the query less `api_token`.
    assert_eq!(parts.uri.scheme_str(), Some("https"), "uri {}", parts.uri);
    assert_eq!(
        parts.uri.authority().map(|a| a.as_str()),
        Some(UPSTREAM_HOST),
        "uri {}",
        parts.uri
    );
    assert_eq!(parts.uri.path(), "/p", "uri {}", parts.uri);
    let stripped = query.as_deref().and_then(strip_api_token);
    assert_eq!(
        parts.uri.query(),
        stripped.as_deref(),
        "query {query:?}: uri {}",
        parts.uri
    );
    assert_eq!(parts.version, Version::HTTP_11);
    // The caller's Host never goes upstream: the rewrite leaves none, whatever the upstream's version.
    assert!(
        !parts.headers.contains_key(HOST),
        "the caller's host left: {:?}",
        parts.headers
    );

    // The version step (`fit_to_upstream_version`), where the upstream connection is known: over HTTP/2 no
    // `host` and no `transfer-encoding` at all; over HTTP/1.1 (the affine connection) the upstream's Host.
    let mut h2 = parts.headers.clone();
    fit_to_upstream_version(&mut h2, Version::HTTP_2, Some(&upstream().host_header), true);
    assert!(
        !h2.contains_key(HOST) && !h2.contains_key("transfer-encoding"),
        "h2: {h2:?}"
    );
    let mut headers = parts.headers;
    fit_to_upstream_version(&mut headers, Version::HTTP_11, Some(&upstream().host_header), false);

    // Hop-by-hop headers and the ones `Connection` named are gone (except those the proxy writes itself).
    for hop in HOP_BY_HOP {
        assert!(!headers.contains_key(*hop), "{hop} left: {headers:?}");
    }
    let named = named_by_connection(&original);
    for n in &named {
        if !SET_BY_PROXY.contains(&n.as_str()) {
            assert!(
                !headers.contains_key(n.as_str()),
                "{n}, named by Connection, left: {headers:?}"
            );
        }
    }

    // Exactly one Authorization: the proxy's.
    let auth: Vec<&HeaderValue> = headers.get_all("authorization").iter().collect();
    assert_eq!(auth, vec![&bearer], "authorization is not exactly the injected one");
    assert!(
        auth[0].is_sensitive(),
        "the injected authorization is not marked sensitive"
    );

    // One sane X-Request-Id, the id the proxy logs and answers with; the caller's own when it was sane.
    assert!(is_sane_id(id.as_bytes()), "request id {id:?} is not sane");
    let ids: Vec<&HeaderValue> = headers.get_all("x-request-id").iter().collect();
    assert_eq!(
        ids,
        vec![&id],
        "the upstream does not see exactly the request id {id:?}: {headers:?}"
    );
    match original.get("x-request-id") {
        Some(caller) if is_sane_id(caller.as_bytes()) => assert_eq!(&id, caller, "a sane caller id was replaced"),
        _ => assert_eq!(id.len(), 32, "a generated id is not 32 hex digits"),
    }

    // Forwarding headers: one X-Forwarded-For ending in the caller, ours alone for proto and host.
    let xff: Vec<&HeaderValue> = headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff.len(), 1, "x-forwarded-for: {xff:?}");
    let xff = xff[0].to_str().expect("x-forwarded-for is text");
    let client_text = client.to_string();
    assert!(
        xff == client_text || xff.ends_with(&format!(", {client_text}")),
        "x-forwarded-for {xff:?} does not end with the caller {client_text}"
    );
    let protos: Vec<&HeaderValue> = headers.get_all("x-forwarded-proto").iter().collect();
    assert_eq!(protos, vec![proto], "x-forwarded-proto");
    let hosts: Vec<&HeaderValue> = headers.get_all("x-forwarded-host").iter().collect();
    assert_eq!(hosts, caller_host.iter().collect::<Vec<_>>(), "x-forwarded-host");
    let hosts: Vec<&HeaderValue> = headers.get_all(HOST).iter().collect();
    assert_eq!(hosts, vec![UPSTREAM_HOST], "host");

    // Every other header passes with all its values, in order.
    for name in original.keys() {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|m| m == n) || SET_BY_PROXY.contains(&n) || n == "x-request-id" {
            continue;
        }
        let before: Vec<&HeaderValue> = original.get_all(name).iter().collect();
        let after: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
        assert_eq!(before, after, "{n} changed");
    }

    // A second removal pass changes nothing the proxy did not add.
    let mut again = headers.clone();
    remove_hop_by_hop(&mut again);
    assert_eq!(again, headers, "remove_hop_by_hop is not idempotent");

    if let Some(query) = &query {
        check_query(query);
    }
}
