//! Issue 2: what the upstream receives. The mock records every request; these tests assert on what it saw,
//! not only on what the caller got back.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use zapsign_proxy::mock::{MockConfig, DEMO_API_TOKEN};

#[tokio::test]
async fn upstream_sees_exact_target_injected_token_and_no_hop_by_hop_headers() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let req = Request::get("/api/v1/docs/a%2Fb/?x=%20&api_token=STALE&y=2")
        .header("host", "proxy.internal:8080")
        .header("authorization", "Bearer caller-stale-token")
        .header("connection", "keep-alive, X-Hop-Named")
        .header("x-hop-named", "must-not-pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("trailer", "x-checksum")
        .header("upgrade", "websocket")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-kept", "yes")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(h.addr, req).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    let seen = h.mock.state.records().pop().expect("mock saw the request");
    assert_eq!(seen.target, "/api/v1/docs/a%2Fb/?x=%20&y=2");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {DEMO_API_TOKEN}").as_str())
    );
    assert_eq!(seen.headers.iter().filter(|(n, _)| n == "authorization").count(), 1);
    assert_eq!(seen.header("host"), Some(h.mock.addr.to_string().as_str()));
    for hop in [
        "connection",
        "x-hop-named",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            seen.header(hop).is_none(),
            "{hop} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.header("x-kept"), Some("yes"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("proxy.internal:8080"));
    let id = answer.headers["x-request-id"].to_str().unwrap();
    assert_eq!(seen.header("x-request-id"), Some(id));
    assert_eq!(id.len(), 32);
    h.shutdown().await;
}

#[tokio::test]
async fn query_of_only_api_token_leaves_no_question_mark_and_trailing_slash_is_kept() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let a = send(h.addr, get(h.addr, "/api/v1/docs/?api_token=STALE")).await;
    assert_eq!(a.status, 200);
    assert_eq!(h.mock.state.records().pop().unwrap().target, "/api/v1/docs/");
    let a = send(h.addr, get(h.addr, "/api/v1/docs")).await;
    assert_eq!(a.status, 200);
    assert_eq!(h.mock.state.records().pop().unwrap().target, "/api/v1/docs");
    h.shutdown().await;
}

#[tokio::test]
async fn caller_request_id_is_kept_and_returned() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let req = Request::get("/api/v1/docs/")
        .header("x-request-id", "caller-id-42")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(h.addr, req).await;
    assert_eq!(a.headers["x-request-id"], "caller-id-42");
    assert_eq!(
        h.mock.state.records().pop().unwrap().header("x-request-id"),
        Some("caller-id-42")
    );
    h.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_from_responses() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let a = send(h.addr, get(h.addr, "/api/v1/__mock/hop-headers/")).await;
    assert_eq!(a.status, 200);
    assert!(a.headers.get("x-resp-hop").is_none(), "{:?}", a.headers);
    assert!(a.headers.get("keep-alive").is_none());
    assert!(a.headers.get("proxy-authenticate").is_none());
    assert_eq!(a.headers["x-resp-kept"], "1");
    h.shutdown().await;
}

#[tokio::test]
async fn h2c_caller_is_served() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let req = Request::get(h.url("/api/v1/docs/?api_token=x&page=2"))
        .header("authorization", "Bearer caller")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send_h2c(h.addr, req).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = h.mock.state.records().pop().unwrap();
    assert_eq!(seen.target, "/api/v1/docs/?page=2");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {DEMO_API_TOKEN}").as_str())
    );
    assert_eq!(seen.header("x-forwarded-host"), Some(h.addr.to_string().as_str()));
    h.shutdown().await;
}

#[tokio::test]
async fn post_body_is_forwarded_intact() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let body = Bytes::from_static(br#"{"name":"contract.pdf","url_pdf":"https://example.com/c.pdf"}"#);
    let req = Request::post("/api/v1/docs/")
        .header("content-type", "application/json")
        .body(Full::new(body.clone()))
        .unwrap();
    let a = send(h.addr, req).await;
    assert_eq!(a.status, 200);
    let json = a.json();
    assert_eq!(json["body_len"], body.len());
    use sha2::Digest;
    assert_eq!(
        json["body_sha256"],
        zapsign_proxy::secret::hex(&sha2::Sha256::digest(&body))
    );
    h.shutdown().await;
}

#[tokio::test]
async fn the_upstream_gets_exactly_the_request_id_we_answer_with() {
    let h = Harness::start_static("", MockConfig::default()).await;
    // Two ids from the caller, and a Connection header naming the id: one id reaches the upstream, ours.
    let req = Request::get("/api/v1/docs/")
        .header("x-request-id", "abc-123")
        .header("x-request-id", "forged, id")
        .header("connection", "x-request-id")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(h.addr, req).await;
    assert_eq!(a.headers["x-request-id"], "abc-123");
    let seen = h.mock.state.records().pop().unwrap();
    let ids: Vec<&str> = seen
        .headers
        .iter()
        .filter(|(n, _)| n == "x-request-id")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(ids, ["abc-123"]);
    h.shutdown().await;
}
