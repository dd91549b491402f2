//! Issue 4: metrics, caller access control, the TLS caller listener, JSON access logs without secrets, and
//! reload on SIGHUP.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_PASSWORD};

/// Parses `/metrics` as Prometheus text (failing the test if it does not parse) and returns the text.
async fn scrape(admin: std::net::SocketAddr) -> String {
    let a = send(admin, get(admin, "/metrics")).await;
    assert_eq!(a.status, 200);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text: {e:?}\n{text}"));
    for family in [
        "zapsign_proxy_requests_total",
        "zapsign_proxy_request_duration_seconds",
        "zapsign_proxy_upstream_errors_total",
        "zapsign_proxy_token_renewals_total",
        "zapsign_proxy_token_expires_in_seconds",
        "zapsign_proxy_unauthorized_replays_total",
    ] {
        assert!(parsed.families.contains_key(family), "{family} missing:\n{text}");
    }
    text
}

/// The value of the sample written exactly as `series` (name and labels), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn metrics_parse_and_move_with_requests_renewals_and_replays() {
    let h = Harness::start_jwt("", MockConfig::default(), |_| {}).await;
    assert!(h.wait_ready(Duration::from_secs(10)).await);
    let before = scrape(h.admin).await;
    assert_eq!(
        sample(
            &before,
            "zapsign_proxy_token_renewals_total{kind=\"login\",result=\"ok\"}"
        ),
        1.0
    );
    assert!(sample(&before, "zapsign_proxy_token_expires_in_seconds") > 3000.0);

    for _ in 0..3 {
        assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);
    }
    assert_eq!(send(h.addr, get(h.addr, "/nope")).await.status, 403);
    h.mock.state.revoke_all();
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);

    let after = scrape(h.admin).await;
    assert_eq!(sample(&after, "zapsign_proxy_requests_total{status=\"200\"}"), 4.0);
    assert_eq!(sample(&after, "zapsign_proxy_requests_total{status=\"403\"}"), 1.0);
    assert_eq!(sample(&after, "zapsign_proxy_request_duration_seconds_count"), 5.0);
    assert_eq!(sample(&after, "zapsign_proxy_unauthorized_replays_total"), 1.0);
    assert_eq!(
        sample(
            &after,
            "zapsign_proxy_token_renewals_total{kind=\"refresh\",result=\"rejected\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "zapsign_proxy_token_renewals_total{kind=\"login\",result=\"ok\"}"
        ),
        2.0
    );
    h.shutdown().await;
}

#[tokio::test]
async fn upstream_errors_are_counted_by_kind() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let h = Harness::start_with(mock, "[auth]\nmode = \"static\"\napi_token = \"t\"\n", &url).await;
    assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 502);
    let text = scrape(h.admin).await;
    assert_eq!(
        sample(&text, "zapsign_proxy_upstream_errors_total{kind=\"connect\"}"),
        1.0
    );
    assert_eq!(sample(&text, "zapsign_proxy_token_expires_in_seconds"), f64::INFINITY);
    h.shutdown().await;
}

#[tokio::test]
async fn caller_outside_allow_networks_gets_403() {
    let h = Harness::start_static(
        "[access]\nallow_networks = [\"10.0.0.0/8\", \"::1/128\"]\n",
        MockConfig::default(),
    )
    .await;
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&a, 403, "forbidden");
    assert!(a.json()["message"].as_str().unwrap().contains("allow_networks"));
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn client_keys_are_required_checked_and_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# callers\nkey-alpha-0123456789\n\nkey-beta-9876543210\n").unwrap();
    let extra = format!("[access]\nclient_keys_file = \"{}\"\n", keys.display());
    let h = Harness::start_static(&extra, MockConfig::default()).await;

    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_proxy_error(&a, 407, "proxy_auth_required");
    assert_eq!(a.headers["proxy-authenticate"], "Bearer");
    let wrong = Request::get("/api/v1/docs/")
        .header("proxy-authorization", "Bearer key-alpha-012345678X")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_proxy_error(&send(h.addr, wrong).await, 407, "proxy_auth_required");
    assert_eq!(h.mock.state.records().len(), 0);

    let right = Request::get("/api/v1/docs/")
        .header("proxy-authorization", "Bearer key-beta-9876543210")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(h.addr, right).await.status, 200);
    let seen = h.mock.state.records().pop().unwrap();
    assert!(seen.header("proxy-authorization").is_none(), "{:?}", seen.headers);
    assert!(!seen.headers.iter().any(|(_, v)| v.contains("key-beta")));
    h.shutdown().await;
}

#[tokio::test]
async fn checks_run_in_contract_order_network_then_key_then_path() {
    let keyed = "client_keys_file = \"KEYS\"\nallow_paths = [\"/api/\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-1\n").unwrap();
    let keyed = keyed.replace("KEYS", &keys.display().to_string());
    // Outside the networks, without a key, on a bad path: the network check answers (403, not 407).
    let h = Harness::start_static(
        &format!("[access]\nallow_networks = [\"10.0.0.0/8\"]\n{keyed}"),
        MockConfig::default(),
    )
    .await;
    let a = send(h.addr, get(h.addr, "/nope")).await;
    assert_proxy_error(&a, 403, "forbidden");
    assert!(a.json()["message"].as_str().unwrap().contains("allow_networks"));
    h.shutdown().await;
    // Inside the networks, without a key, on a bad path: the key check answers (407, not 403).
    let h = Harness::start_static(&format!("[access]\n{keyed}"), MockConfig::default()).await;
    assert_proxy_error(&send(h.addr, get(h.addr, "/nope")).await, 407, "proxy_auth_required");
    // With the key, on a bad path: the path check answers.
    let mut req = get(h.addr, "/nope");
    req.headers_mut()
        .insert("proxy-authorization", "Bearer k-1".parse().unwrap());
    let a = send(h.addr, req).await;
    assert_proxy_error(&a, 403, "forbidden");
    assert!(a.json()["message"].as_str().unwrap().contains("allow_paths"));
    h.shutdown().await;
}

/// A TLS connection to the proxy trusting `ca_pem`, offering `alpn`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(zapsign_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the proxy");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    tls
}

#[tokio::test]
async fn https_callers_are_served_over_http1_and_http2() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &ca.server_cert_pem).unwrap();
    std::fs::write(&key, &ca.server_key_pem).unwrap();
    let extra = format!(
        "[server]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let h = Harness::start_static(&extra, MockConfig::default()).await;

    let tls = tls_connect(h.addr, &ca.ca_pem, b"http/1.1").await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get(h.addr, "/api/v1/docs/?via=h1")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        h.mock.state.records().pop().unwrap().header("x-forwarded-proto"),
        Some("https")
    );

    let tls = tls_connect(h.addr, &ca.ca_pem, b"h2").await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("https://localhost:{}/api/v1/docs/?via=h2", h.addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["target"], "/api/v1/docs/?via=h2");
    assert_eq!(json["headers"]["x-forwarded-proto"], "https");

    // A plain-HTTP request to the TLS port is not served.
    let resp = raw_exchange(h.addr, b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!resp.contains("200 OK"), "{resp}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_the_fields_and_no_secret_appears_in_any_log() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, DEMO_PASSWORD).unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "client-key-SECRET-1\nclient-key-SECRET-2\n").unwrap();
    let text = format!(
        "[upstream]\nurl = \"{}\"\n[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n\
         [access]\nclient_keys_file = \"{}\"\n[log]\nformat = \"json\"\n",
        mock.url(),
        zapsign_proxy::mock::DEMO_ORGANIZATION_ID,
        zapsign_proxy::mock::DEMO_USERNAME,
        pw.display(),
        keys.display(),
    );
    let proxy = Subprocess::start(&text, &[("RUST_LOG", "trace")]);
    for (i, key) in ["client-key-SECRET-1", "client-key-SECRET-2", "wrong-key-SECRET-3"]
        .iter()
        .enumerate()
    {
        let req = Request::post(format!("/api/v1/docs/?api_token=QUERY-SECRET-{i}"))
            .header("proxy-authorization", format!("Bearer {key}"))
            .header("authorization", "Bearer CALLER-SECRET")
            .header("x-request-id", format!("access-{i}"))
            .body(Full::new(Bytes::from_static(b"{\"name\":\"x\"}")))
            .unwrap();
        let status = send(proxy.addr, req).await.status;
        assert_eq!(status, if i < 2 { 200 } else { 407 });
    }
    mock.state.revoke_all();
    assert_eq!(
        send(proxy.addr, {
            let mut r = get(proxy.addr, "/api/v1/docs/");
            r.headers_mut()
                .insert("proxy-authorization", "Bearer client-key-SECRET-1".parse().unwrap());
            r
        })
        .await
        .status,
        200
    );
    let logs = proxy.stop_and_logs().await;

    let mut secrets: Vec<String> = mock.state.issued_tokens();
    assert!(secrets.len() >= 4, "login, and login again after revocation");
    secrets.extend(
        [
            DEMO_PASSWORD,
            "client-key-SECRET",
            "wrong-key-SECRET",
            "QUERY-SECRET",
            "CALLER-SECRET",
        ]
        .map(String::from),
    );
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.is_object());
        for s in &secrets {
            assert!(!line.contains(s.as_str()), "a secret reached the logs: {line}");
        }
    }
    let served: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "served")
        .collect();
    let first = served
        .iter()
        .find(|v| v["span"]["id"] == "access-0")
        .expect("access log for access-0");
    assert_eq!(first["span"]["method"], "POST");
    assert_eq!(first["span"]["path"], "/api/v1/docs/");
    assert_eq!(first["status"], 200);
    assert_eq!(first["client"], "127.0.0.1");
    assert!(
        first["duration_us"].is_u64() && first["upstream_us"].is_u64(),
        "{first}"
    );
    let key_id = first["key_id"].as_str().expect("key id");
    assert!(key_id.starts_with("key-") && key_id.len() == 12, "{key_id}");
    let second = served.iter().find(|v| v["span"]["id"] == "access-1").unwrap();
    assert_ne!(second["key_id"], first["key_id"], "different keys, different ids");
    let refused = served.iter().find(|v| v["span"]["id"] == "access-2").unwrap();
    assert_eq!(refused["status"], 407);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_password_and_rejects_a_broken_config() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("password");
    std::fs::write(&pw, DEMO_PASSWORD).unwrap();
    let text = format!(
        "[upstream]\nurl = \"{}\"\n[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n[log]\nformat = \"json\"\n",
        mock.url(),
        zapsign_proxy::mock::DEMO_ORGANIZATION_ID,
        zapsign_proxy::mock::DEMO_USERNAME,
        pw.display(),
    );
    let proxy = Subprocess::start(&text, &[]);
    let state = mock.state.clone();
    assert!(wait_until(Duration::from_secs(10), || state.logins.load(Ordering::SeqCst) == 1).await);

    // The account's password changes: ZapSign and the secret file both get the new one.
    mock.state.update_config(|c| c.password = "rotated-password-2".into());
    std::fs::write(&pw, "rotated-password-2\n").unwrap();
    proxy.signal("HUP");
    let relogged = wait_until(Duration::from_secs(10), || state.logins.load(Ordering::SeqCst) == 2).await;
    assert!(relogged, "no login after SIGHUP; logs: {}", proxy.log_text());
    assert_eq!(state.last_login_password().as_deref(), Some("rotated-password-2"));
    assert_eq!(send(proxy.addr, get(proxy.addr, "/api/v1/docs/")).await.status, 200);

    // A broken file is refused; the proxy keeps serving with what it had.
    let config_path = proxy.config_path();
    std::fs::write(&config_path, "[server\nthis is not toml").unwrap();
    proxy.signal("HUP");
    let lines = proxy.lines.clone();
    let refused = wait_until(Duration::from_secs(10), || {
        lines.lock().unwrap().iter().any(|l| l.contains("reload rejected"))
    })
    .await;
    assert!(refused, "no log line about the refused reload: {}", proxy.log_text());
    assert_eq!(send(proxy.addr, get(proxy.addr, "/api/v1/docs/")).await.status, 200);
    assert_eq!(state.logins.load(Ordering::SeqCst), 2);
}
