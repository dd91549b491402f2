//! Issue 2: the binary as users run it: exit codes, `--check-config`, SIGTERM draining, and memory that stays
//! bounded while large bodies stream through.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use zapsign_proxy::mock::{hex, pattern_byte, MockConfig, MockZapSign};

fn run_binary(args: &[&str], config_text: Option<&str>, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"));
    cmd.env_clear().envs(env.iter().copied()).args(args);
    if let Some(text) = config_text {
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path);
    }
    let out = cmd.output().expect("run zapsign-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let cases = [
        ("[server]\nlisten_addr = \"127.0.0.1:1\"\n", "listen_addr"),
        (
            "[auth]\nmode = \"static\"\napi_token = \"t\"\n[upstream]\nurl = \"ftp://x\"\n",
            "upstream.url",
        ),
        (
            "[auth]\nmode = \"static\"\napi_token_file = \"/nonexistent/zapsign-token\"\n",
            "auth.api_token_file",
        ),
        (
            "[auth]\nmode = \"static\"\napi_token = \"t\"\n[server]\nshutdown_grace = \"a while\"\n",
            "server.shutdown_grace",
        ),
        ("[auth]\norganization_id = 1\nusername = \"u\"\n", "auth.password"),
    ];
    for (text, key) in cases {
        let (code, _, stderr) = run_binary(&[], Some(text), &[]);
        assert_eq!(code, 2, "config {text:?}: {stderr}");
        assert!(stderr.contains(key), "config {text:?} should name {key}: {stderr}");
    }
    let (code, _, stderr) = run_binary(&["--no-such-flag"], None, &[]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn check_config_prints_effective_config_with_secrets_redacted() {
    let text = "[auth]\nmode = \"static\"\napi_token = \"very-secret-token\"\n";
    let (code, stdout, stderr) = run_binary(
        &["--check-config"],
        Some(text),
        &[("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:7777")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:7777\""), "{stdout}");
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("very-secret-token") && !stderr.contains("very-secret-token"));
}

#[test]
fn example_config_passes_check_config() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example")).unwrap();
    let (code, _, stderr) = run_binary(&["--check-config"], Some(&text), &[("ZAPSIGN_PASSWORD", "placeholder")]);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_refuses_new_connections_and_exits_0() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let mut proxy = Subprocess::start(&static_config(&mock.url(), "[server]\nshutdown_grace = \"10s\"\n"), &[]);
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { send(addr, get(addr, "/api/v1/__mock/slow/3000/")).await });
    let state = mock.state.clone();
    assert!(
        wait_until(Duration::from_secs(5), || state.records().len() == 1).await,
        "request never reached the mock"
    );

    let sent_at = Instant::now();
    proxy.signal("TERM");
    let refused = wait_until(Duration::from_secs(2), || std::net::TcpStream::connect(addr).is_err()).await;
    assert!(refused, "new connections still accepted after SIGTERM");

    let answer = in_flight.await.unwrap();
    assert_eq!(answer.status, 200, "the in-flight request was cut: {:?}", answer.body);
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_exit(Duration::from_secs(10));
        (status, proxy.log_text())
    })
    .await
    .unwrap();
    assert_eq!(status.0.and_then(|s| s.code()), Some(0), "logs: {}", status.1);
    assert!(
        sent_at.elapsed() >= Duration::from_millis(2500),
        "exited before the request finished"
    );
}

/// A request body of `len` pattern bytes, sent in 64 KiB chunks as it is produced.
fn pattern_upload(len: u64) -> (Full<Bytes>, String) {
    let bytes: Vec<u8> = (0..len).map(pattern_byte).collect();
    let sha = hex(&Sha256::digest(&bytes));
    (Full::new(Bytes::from(bytes)), sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_stream_intact_with_bounded_memory() {
    const UPLOAD: u64 = 20 << 20;
    const DOWNLOAD: u64 = 100 << 20;
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let proxy = Subprocess::start(&static_config(&mock.url(), ""), &[]);
    let warm = send(proxy.addr, get(proxy.addr, "/api/v1/docs/")).await;
    assert_eq!(warm.status, 200);
    let baseline = proxy.peak_rss_kib();

    let (body, sha) = pattern_upload(UPLOAD);
    let req = Request::post("/api/v1/docs/").body(body).unwrap();
    let a = send(proxy.addr, req).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["body_len"], UPLOAD);
    assert_eq!(a.json()["body_sha256"], sha);

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("/api/v1/__mock/download/{DOWNLOAD}/"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let (mut got, mut hasher, mut expected) = (0u64, Sha256::new(), Sha256::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            let want: Vec<u8> = (got..got + data.len() as u64).map(pattern_byte).collect();
            expected.update(&want);
            hasher.update(&data);
            got += data.len() as u64;
        }
    }
    assert_eq!(got, DOWNLOAD);
    assert_eq!(hasher.finalize(), expected.finalize());

    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS: baseline {baseline} KiB, after 20 MiB up + 100 MiB down {peak} KiB");
    assert!(baseline > 0, "cannot read the proxy's memory");
    // Neither body may be held whole: growth stays far below the 20 MiB upload.
    assert!(peak - baseline < 12 * 1024, "peak grew by {} KiB", peak - baseline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_proxy_and_the_mock_with_a_jwt_login() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
        .arg("demo")
        .env_clear()
        .env("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:0")
        .env("ZAPSIGN_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr: std::net::SocketAddr = first
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));
    let a = send(addr, get(addr, "/api/v1/docs/?page=1&api_token=stale-caller-token")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(a.status, 200, "{:?}", a.body);
    let json = a.json();
    assert_eq!(json["target"], "/api/v1/docs/?page=1");
    let auth = json["headers"]["authorization"].as_str().unwrap();
    assert!(
        auth.starts_with("Bearer ey"),
        "the demo should inject a JWT from a login: {auth}"
    );
}
