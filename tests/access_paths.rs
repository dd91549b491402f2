//! Issue 9, fault 3: `access.allow_paths` cannot be walked out of. A path holding a dot segment (`.` or `..`,
//! plain or percent-encoded in any case) is refused with 400 before the path check, over HTTP/1.1 and HTTP/2,
//! and nothing reaches the upstream; the checks keep the contract's order (network 403, client key 407, dot
//! segments 400, path 403); the client key's `Bearer` scheme is case-insensitive (RFC 9110 §11.1).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw_upstream::raw_request;
use common::*;
use http::Request;
use http_body_util::Full;
use zapsign_proxy::mock::MockConfig;

/// Paths that resolve (RFC 3986 §5.2.4) outside `/api/`, or hold a dot segment at all.
const WALKS_OUT: &[&str] = &[
    "/api/../admin",
    "/api/%2e%2e/admin",
    "/api/%2E%2E/admin",
    "/api/%2e%2E/admin",
    "/api/.%2e/admin",
    "/api/%2e./admin",
    "/api/v1/../../admin/",
    "/api/./v1/docs/",
    "/api/%2e/v1/docs/",
    "/api/v1/..",
    "/api/..%2Fadmin",
    "/api/..?page=1",
];

/// Dots that are not dot segments, and dot segments in the query (not a path): forwarded byte for byte.
const PASS: &[&str] = &[
    "/api/.well-known",
    "/api/a..b",
    "/api/v1/docs/...",
    "/api/v1/docs/file.v2.pdf",
    "/api/v1/docs/?next=../admin&x=./y",
];

#[tokio::test]
async fn dot_segments_get_400_and_never_reach_the_upstream() {
    let h = Harness::start_static("", MockConfig::default()).await;
    for path in WALKS_OUT {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let r = raw_request(h.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.head);
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("x-zapsign-proxy-error: bad_request"),
            "{path}: {}",
            r.head
        );
        assert!(String::from_utf8_lossy(&r.body).contains("dot segment"), "{path}");
    }
    // Over HTTP/2 too.
    for path in ["/api/../admin", "/api/%2E%2e/admin"] {
        let req = Request::get(format!("http://{}{path}", h.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_proxy_error(&send_h2c(h.addr, req).await, 400, "bad_request");
    }
    assert_eq!(
        h.mock.state.records().len(),
        0,
        "a path with a dot segment reached the upstream: {:?}",
        h.mock
            .state
            .records()
            .iter()
            .map(|r| r.target.clone())
            .collect::<Vec<_>>()
    );
    for path in PASS {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = raw_exchange(h.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{path}: {resp}");
        assert_eq!(
            &h.mock.state.records().pop().unwrap().target,
            path,
            "forwarded verbatim"
        );
    }
    h.shutdown().await;
}

/// Network (403) before client key (407) before dot segments (400) before the path (403).
#[tokio::test]
async fn dot_segments_are_checked_after_the_key_and_before_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-1\n").unwrap();
    let keyed = format!("client_keys_file = \"{}\"\nallow_paths = [\"/api/\"]\n", keys.display());
    let with_key = |path: &str, value: &str| {
        Request::get(path)
            .header("proxy-authorization", value)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    let h = Harness::start_static(
        &format!("[access]\nallow_networks = [\"10.0.0.0/8\"]\n{keyed}"),
        MockConfig::default(),
    )
    .await;
    assert_proxy_error(&send(h.addr, get(h.addr, "/admin/../x")).await, 403, "forbidden");
    h.shutdown().await;

    let h = Harness::start_static(&format!("[access]\n{keyed}"), MockConfig::default()).await;
    // No key: 407 even for a dot segment.
    assert_proxy_error(
        &send(h.addr, get(h.addr, "/admin/../x")).await,
        407,
        "proxy_auth_required",
    );
    // With the key: the dot segment answers 400, even outside the prefixes; without one, the path 403.
    let a = send(h.addr, with_key("/admin/../api/", "Bearer k-1")).await;
    assert_proxy_error(&a, 400, "bad_request");
    let a = send(h.addr, with_key("/admin/", "Bearer k-1")).await;
    assert_proxy_error(&a, 403, "forbidden");
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn the_bearer_scheme_of_a_client_key_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-1\n").unwrap();
    let h = Harness::start_static(
        &format!("[access]\nclient_keys_file = \"{}\"\n", keys.display()),
        MockConfig::default(),
    )
    .await;
    for value in ["bearer k-1", "BEARER k-1", "Bearer k-1", "bEaReR  k-1"] {
        let req = Request::get("/api/v1/docs/")
            .header("proxy-authorization", value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(h.addr, req).await.status, 200, "{value}");
    }
    assert_eq!(h.mock.state.records().len(), 4);
    for value in ["Basic k-1", "Bearerk-1", "bearer", "bearer k-2"] {
        let req = Request::get("/api/v1/docs/")
            .header("proxy-authorization", value)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_proxy_error(&send(h.addr, req).await, 407, "proxy_auth_required");
    }
    assert_eq!(h.mock.state.records().len(), 4, "a refused caller reached the upstream");
    h.shutdown().await;
}
