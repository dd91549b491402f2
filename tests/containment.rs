//! Issue 2: the token goes nowhere but the upstream. A second listener stands in for "another host" and must
//! see no connection, whatever the caller tries.

mod common;

use common::*;
use zapsign_proxy::mock::MockConfig;

#[tokio::test]
async fn absolute_form_for_another_host_is_refused_and_the_other_host_sees_nothing() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let other = Bystander::start().await;
    let req = format!(
        "GET http://{0}/api/v1/docs/ HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        other.addr
    );
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("x-zapsign-proxy-error: bad_request"), "{resp}");
    // User info that ends in the upstream's name does not make the target the upstream's.
    let req = format!(
        "GET http://{}@{}/api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        h.mock.addr, other.addr
    );
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(other.count(), 0);
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn absolute_form_naming_the_upstream_is_forwarded_in_origin_form() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let req = format!(
        "GET http://{}/api/v1/docs/?page=1 HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n",
        h.mock.addr
    );
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(h.mock.state.records().pop().unwrap().target, "/api/v1/docs/?page=1");
    h.shutdown().await;
}

#[tokio::test]
async fn connect_is_refused() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let other = Bystander::start().await;
    let req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", other.addr);
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(other.count(), 0);
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn redirect_to_another_host_is_returned_not_followed() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let other = Bystander::start().await;
    let target = format!("http://{}/steal", other.addr);
    let a = send(h.addr, get(h.addr, &format!("/api/v1/__mock/redirect/?to={target}"))).await;
    assert_eq!(a.status, 302);
    assert_eq!(a.headers["location"], target.as_str());
    assert_eq!(other.count(), 0);
    assert_eq!(h.mock.state.records().len(), 1);
    h.shutdown().await;
}

#[tokio::test]
async fn host_header_never_chooses_the_destination() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let other = Bystander::start().await;
    let req = format!(
        "GET /api/v1/docs/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        other.addr
    );
    let resp = raw_exchange(h.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = h.mock.state.records().pop().unwrap();
    assert_eq!(seen.header("host"), Some(h.mock.addr.to_string().as_str()));
    assert_eq!(other.count(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn double_slash_path_is_a_path_not_an_authority() {
    let h = Harness::start_static("[access]\nallow_paths = [\"/\"]\n", MockConfig::default()).await;
    let other = Bystander::start().await;
    for path in [
        format!("//{}/api/v1/docs/", other.addr),
        format!("//user@{}/x", other.addr),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = raw_exchange(h.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(h.mock.state.records().pop().unwrap().target, path);
    }
    assert_eq!(other.count(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn h2c_authority_never_chooses_the_destination() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let other = Bystander::start().await;
    let req = http::Request::get(format!("http://{}/api/v1/docs/", other.addr))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let a = send_h2c(h.addr, req).await;
    assert_eq!(a.status, 200);
    assert_eq!(other.count(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn path_outside_allow_paths_is_forbidden() {
    let h = Harness::start_static("", MockConfig::default()).await;
    let a = send(h.addr, get(h.addr, "/admin/")).await;
    assert_proxy_error(&a, 403, "forbidden");
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}
