//! Issue 2: an HTTPS upstream signed by a private CA works with `upstream.ca_file` (over HTTP/2, which the
//! upstream offers by ALPN) and fails closed with 502 without it.

mod common;

use common::*;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_API_TOKEN};

#[tokio::test]
async fn https_upstream_with_test_ca_works_with_ca_file_over_h2() {
    let (mock, _dir, ca_file) = tls_mock(MockConfig::default()).await;
    let url = mock.url();
    let text = format!(
        "[auth]\nmode = \"static\"\napi_token = \"{DEMO_API_TOKEN}\"\n[upstream]\nca_file = \"{}\"\n",
        ca_file.display()
    );
    let h = Harness::start_with(mock, &text, &url).await;
    let a = send(h.addr, get(h.addr, "/api/v1/docs/?api_token=x")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = h.mock.state.records().pop().unwrap();
    assert_eq!(seen.version, "HTTP/2.0", "ALPN should pick h2");
    assert_eq!(seen.target, "/api/v1/docs/");
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {DEMO_API_TOKEN}").as_str())
    );
    h.shutdown().await;
}

#[tokio::test]
async fn https_upstream_with_unknown_ca_gives_502_and_sends_nothing() {
    let ca = TestCa::new();
    let mock = MockZapSign::start_tls(MockConfig::default(), ca.server_config())
        .await
        .unwrap();
    let url = mock.url();
    let text = format!("[auth]\nmode = \"static\"\napi_token = \"{DEMO_API_TOKEN}\"\n");
    let h = Harness::start_with(mock, &text, &url).await;
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&a, 502, "upstream_unreachable");
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}
