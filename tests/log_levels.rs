//! Issue 9, fault 8: caller errors (the 4xx the proxy answers itself) are logged at `info`, in the request's
//! access line, so a hostile caller cannot fill the level operators alert on; failures of the proxy or the
//! upstream (5xx) stay at `warn`.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

/// The JSON log events of `proxy` whose span carries request id `id`.
fn events_of(logs: &str, id: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["span"]["id"] == id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_errors_log_at_info_and_proxy_failures_at_warn() {
    // An upstream nobody listens on: every request that passes the checks ends in 502.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let proxy = Subprocess::start(
        &static_config(&upstream, ""),
        &[("ZAPSIGN_PROXY_CLIENT_KEYS", "k-1"), ("RUST_LOG", "info")],
    );
    let cases: [(&str, Option<&str>, u16, &str); 4] = [
        ("/api/v1/docs/", None, 407, "proxy_auth_required"),
        ("/admin/", Some("Bearer k-1"), 403, "forbidden"),
        ("/api/../admin", Some("Bearer k-1"), 400, "bad_request"),
        ("/api/v1/docs/", Some("Bearer k-1"), 502, "upstream_unreachable"),
    ];
    for (i, (path, key, status, _)) in cases.iter().enumerate() {
        let mut req = Request::get(*path).header("x-request-id", format!("level-{i}"));
        if let Some(key) = key {
            req = req.header("proxy-authorization", *key);
        }
        let a = send(proxy.addr, req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(a.status.as_u16(), *status, "{path}");
    }
    let logs = proxy.stop_and_logs().await;
    for (i, (path, _, status, code)) in cases.iter().enumerate() {
        let events = events_of(&logs, &format!("level-{i}"));
        let served = events
            .iter()
            .find(|v| v["message"] == "served")
            .unwrap_or_else(|| panic!("no access line for {path}:\n{logs}"));
        let warned: Vec<&Value> = events.iter().filter(|v| v["level"] == "WARN").collect();
        if *status < 500 {
            assert!(
                warned.is_empty(),
                "a caller error ({status}) was logged at warn: {warned:?}"
            );
        } else {
            assert_eq!(
                warned.len(),
                1,
                "a proxy failure ({status}) is logged at warn once: {events:?}"
            );
            assert_eq!(warned[0]["error"], *code);
        }
        assert_eq!(served["level"], "INFO", "{served}");
        assert_eq!(served["status"], *status);
        assert_eq!(served["error"], *code, "the access line names the error: {served}");
        assert!(served["reason"].as_str().is_some_and(|r| !r.is_empty()), "{served}");
    }
}
