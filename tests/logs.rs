//! Issue 2: no token, caller `api_token` or caller Authorization reaches any log line, even at trace level,
//! over HTTP/1.1 and HTTP/2; and each request gets one log event carrying its id, method, path and status.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_API_TOKEN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_even_at_trace_level() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let proxy = Subprocess::start(&static_config(&mock.url(), ""), &[("RUST_LOG", "trace")]);
    let path = "/api/v1/docs/?page=1&api_token=CALLER-QUERY-SECRET";
    let req = Request::get(path)
        .header("authorization", "Bearer CALLER-HEADER-SECRET")
        .header("x-request-id", "log-test-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(proxy.addr, req).await.status, 200);
    let req = Request::get(format!("http://{}{path}", proxy.addr))
        .header("authorization", "Bearer CALLER-HEADER-SECRET")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send_h2c(proxy.addr, req).await.status, 200);
    let logs = proxy.stop_and_logs().await;
    assert!(
        logs.lines().count() > 20,
        "trace logging produced too little to prove anything:\n{logs}"
    );
    for secret in [DEMO_API_TOKEN, "CALLER-QUERY-SECRET", "CALLER-HEADER-SECRET"] {
        let hits: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(hits.is_empty(), "{secret} leaked into the logs: {hits:#?}");
    }
    let served = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "served" && v["span"]["id"] == "log-test-1")
        .unwrap_or_else(|| panic!("no 'served' event for log-test-1:\n{logs}"));
    assert_eq!(served["status"], 200);
    assert_eq!(served["span"]["method"], "GET");
    assert_eq!(served["span"]["path"], "/api/v1/docs/");
    assert!(served["duration_us"].is_u64());
}
