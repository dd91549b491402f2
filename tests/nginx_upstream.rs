//! Issue 9, fault 1: a real nginx 1.22 as the upstream, over TLS with a test CA. Over HTTP/2 (ALPN) the
//! authority must travel only as `:authority`: nginx answers 400 "client sent duplicate host header" when a
//! `host` header comes beside it. Over HTTP/1.1 the upstream gets the upstream's `Host`. Either way the caller's
//! own Host never reaches it, the token is injected and no connection-specific header or `TE` gets through.
//!
//! nginx answers every request with what it saw, one `name=value` per line, so the tests assert on the
//! upstream's view. Callers come over HTTP/1.1 (the affine path: each caller connection its own upstream
//! connection, unless the upstream negotiates HTTP/2) and h2c (the pooled client).

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::nginx::Nginx;
use common::*;
use http::Request;
use http_body_util::Full;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_API_TOKEN};

/// What nginx echoes back: the variables the assertions need, one per line.
const ECHO: &str = r#"
    location / {
        default_type text/plain;
        return 200 "proto=$server_protocol\nhost=$host\nhttp_host=$http_host\nauth=$http_authorization\nte=$http_te\nconnection=$http_connection\nkeep_alive=$http_keep_alive\nproxy_connection=$http_proxy_connection\nupgrade=$http_upgrade\nx_hop=$http_x_hop\ntransfer_encoding=$http_transfer_encoding\ncontent_length=$http_content_length\nx_forwarded_host=$http_x_forwarded_host\nmethod=$request_method\nuri=$request_uri\n";
    }
"#;

/// The caller's own Host: it must never reach the upstream (only `X-Forwarded-Host` carries it).
const CALLER_HOST: &str = "caller.example:8080";

const BODY: &[u8] = br#"{"name":"contract.pdf","url_pdf":"https://example.com/c.pdf"}"#;

/// nginx with an HTTP/2 server (ports[0]) and an HTTP/1.1-only server (ports[1]), both TLS with `ca`'s
/// server certificate.
fn start_nginx(ca: &TestCa) -> Nginx {
    let tls = "ssl_certificate {dir}/cert.pem;\n    ssl_certificate_key {dir}/key.pem;";
    let h2 = format!("server {{\n    listen 127.0.0.1:{{port}} ssl http2;\n    {tls}\n{ECHO}}}");
    let h1 = format!("server {{\n    listen 127.0.0.1:{{port}} ssl;\n    {tls}\n{ECHO}}}");
    Nginx::start(
        &[
            ("cert.pem", &ca.server_cert_pem),
            ("key.pem", &ca.server_key_pem),
            ("ca.pem", &ca.ca_pem),
        ],
        &[&h2, &h1],
    )
}

/// The proxy in static mode in front of nginx's server on `port`, trusting the test CA.
async fn proxy_for(nginx: &Nginx, port: u16) -> Harness {
    // The harness wants a mock; it stays idle, nginx is the upstream.
    let mock = MockZapSign::start(MockConfig::default()).await.expect("mock starts");
    let text = format!(
        "[auth]\nmode = \"static\"\napi_token = \"{DEMO_API_TOKEN}\"\n[upstream]\nca_file = \"{}\"\n",
        nginx.dir().join("ca.pem").display()
    );
    Harness::start_with(mock, &text, &format!("https://127.0.0.1:{port}")).await
}

/// Parses nginx's echo; panics with nginx's error log when the answer is not a 200.
fn seen(a: &Answer, nginx: &Nginx, what: &str) -> BTreeMap<String, String> {
    assert_eq!(
        a.status,
        200,
        "{what}: nginx answered {:?}; its error log:\n{}",
        a.body,
        nginx.error_log()
    );
    std::str::from_utf8(&a.body)
        .expect("nginx echo is text")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What every forwarded request must look like at the upstream.
fn assert_forwarded(v: &BTreeMap<String, String>, what: &str, proto: &str, port: u16, caller_host: &str) {
    let get = |k: &str| {
        v.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{what}: no {k} in {v:?}"))
    };
    assert_eq!(get("proto"), proto, "{what}: {v:?}");
    // nginx reads the authority from `:authority` over HTTP/2 and from Host over HTTP/1.1.
    assert_eq!(get("host"), "127.0.0.1", "{what}: {v:?}");
    assert_eq!(get("http_host"), format!("127.0.0.1:{port}"), "{what}: {v:?}");
    assert_eq!(get("auth"), format!("Bearer {DEMO_API_TOKEN}"), "{what}: {v:?}");
    for hop in ["te", "connection", "keep_alive", "proxy_connection", "upgrade", "x_hop"] {
        assert_eq!(get(hop), "", "{what}: {hop} reached the upstream: {v:?}");
    }
    assert_eq!(get("x_forwarded_host"), caller_host, "{what}: {v:?}");
    assert_eq!(
        get("uri"),
        "/api/v1/docs/?page=2",
        "{what}: api_token must be gone: {v:?}"
    );
}

/// An HTTP/1.1 caller's request carrying its own Host, a stale Authorization and every kind of
/// connection-specific header.
fn h1_request(method: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/api/v1/docs/?api_token=STALE&page=2")
        .header("host", CALLER_HOST)
        .header("authorization", "Bearer caller-stale-token")
        .header("connection", "keep-alive, X-Hop")
        .header("x-hop", "must-not-pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// An h2c caller's request (HTTP/2 allows only `te: trailers` of the connection-specific kind).
fn h2c_request(h: &Harness, method: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(h.url("/api/v1/docs/?api_token=STALE&page=2"))
        .header("authorization", "Bearer caller-stale-token")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// Sends GET and POST from an HTTP/1.1 caller (one keep-alive connection) and from h2c callers to the proxy in
/// front of nginx's server on `port`, and checks what nginx saw.
async fn exercise(nginx: &Nginx, port: u16, proto: &str) {
    let h = proxy_for(nginx, port).await;
    let mut caller = Caller::connect(h.addr).await;
    for method in ["GET", "POST"] {
        let body = if method == "POST" { BODY } else { b"" };
        let what = format!("{proto} upstream, HTTP/1.1 caller, {method}");
        let v = seen(&caller.send(h1_request(method, body)).await, nginx, &what);
        assert_forwarded(&v, &what, proto, port, CALLER_HOST);
        assert_eq!(v["method"], method, "{what}");
        if method == "POST" {
            assert_eq!(v["content_length"], BODY.len().to_string(), "{what}: {v:?}");
        }

        let what = format!("{proto} upstream, h2c caller, {method}");
        let v = seen(&send_h2c(h.addr, h2c_request(&h, method, body)).await, nginx, &what);
        assert_forwarded(&v, &what, proto, port, &h.addr.to_string());
        assert_eq!(v["method"], method, "{what}");
        if method == "POST" {
            assert_eq!(v["content_length"], BODY.len().to_string(), "{what}: {v:?}");
        }
    }
    h.shutdown().await;
}

/// A GET whose body has no declared length (chunked from an HTTP/1.1 caller); returns nginx's echo.
async fn chunked_get(h: &Harness, nginx: &Nginx, what: &str) -> BTreeMap<String, String> {
    let req = format!(
        "GET /api/v1/docs/?page=2 HTTP/1.1\r\nHost: {CALLER_HOST}\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{what}: {resp}; nginx's error log:\n{}",
        nginx.error_log()
    );
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn http2_upstream_gets_the_authority_only_as_authority() {
    let ca = TestCa::new();
    let nginx = start_nginx(&ca);
    exercise(&nginx, nginx.ports[0], "HTTP/2.0").await;
}

#[tokio::test]
async fn http1_upstream_gets_the_upstreams_host() {
    let ca = TestCa::new();
    let nginx = start_nginx(&ca);
    exercise(&nginx, nginx.ports[1], "HTTP/1.1").await;
}

#[tokio::test]
async fn get_with_a_body_of_unknown_length_reaches_either_upstream() {
    let ca = TestCa::new();
    let nginx = start_nginx(&ca);
    // HTTP/1.1 needs chunked framing said out loud, or hyper sends the GET without its body.
    let h = proxy_for(&nginx, nginx.ports[1]).await;
    let v = chunked_get(&h, &nginx, "HTTP/1.1 upstream").await;
    assert_eq!(v["proto"], "HTTP/1.1", "{v:?}");
    assert_eq!(v["transfer_encoding"], "chunked", "{v:?}");
    assert_eq!(v["http_host"], format!("127.0.0.1:{}", nginx.ports[1]), "{v:?}");
    h.shutdown().await;
    // HTTP/2 frames the body itself: no `transfer-encoding` (forbidden there), no `host`.
    let h = proxy_for(&nginx, nginx.ports[0]).await;
    let v = chunked_get(&h, &nginx, "HTTP/2 upstream").await;
    assert_eq!(v["proto"], "HTTP/2.0", "{v:?}");
    assert_eq!(v["transfer_encoding"], "", "{v:?}");
    assert_eq!(v["http_host"], format!("127.0.0.1:{}", nginx.ports[0]), "{v:?}");
    h.shutdown().await;
}
