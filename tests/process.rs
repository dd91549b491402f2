//! Issue 2: the binary as users run it: exit codes, `--check-config`, SIGTERM draining, and memory that stays
//! bounded while large bodies stream through. Issue 9: a config that tells the truth: `--check-config` prints a
//! loadable config, every problem named at once, `log.level` checked, the example checkable as its header says,
//! `demo --config`, no colour codes in piped logs, a port in use reported once.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use zapsign_proxy::mock::{pattern_byte, MockConfig, MockZapSign};
use zapsign_proxy::secret::hex;

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
    assert!(stdout.contains("# auth.api_token: set, not shown"), "{stdout}");
    assert!(!stdout.contains("very-secret-token") && !stderr.contains("very-secret-token"));
}

/// The `NAME=value` words before `zapsign-proxy` on the first line of `text` that runs `--check-config`.
fn check_config_env(text: &str) -> Vec<(String, String)> {
    let line = text
        .lines()
        .find(|l| l.contains("--check-config --config proxy.toml.example"))
        .unwrap_or_else(|| panic!("no --check-config command for proxy.toml.example in:\n{text}"));
    let before = line.split("zapsign-proxy ").next().unwrap_or("");
    let before = before.rsplit(':').next().unwrap_or(before);
    before
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
        .collect()
}

#[test]
fn example_config_passes_check_config_with_the_environment_its_header_names() {
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/proxy.toml.example")).unwrap();
    let header: String = text
        .lines()
        .take_while(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let env = check_config_env(&header);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let (code, stdout, stderr) = run_binary(&["--check-config"], Some(&text), &pairs);
    assert_eq!(code, 0, "with only {env:?} from the header: {stderr}");
    assert!(
        !stdout.contains(&env[0].1),
        "a secret from the environment was printed: {stdout}"
    );
    // CI checks the example the same way.
    let ci = std::fs::read_to_string(format!("{root}/.ci/run")).unwrap();
    let ci_names: Vec<String> = check_config_env(&ci).into_iter().map(|(n, _)| n).collect();
    let names: Vec<String> = env.into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        ci_names, names,
        ".ci/run and the example's header set different variables"
    );
}

/// `--check-config` on `text` with `env`, then again on what it printed, with the same `env`: both exit 0 and
/// print the same. Returns the output.
fn assert_check_config_round_trips(text: Option<&str>, env: &[(&str, &str)]) -> String {
    let (code, first, stderr) = run_binary(&["--check-config"], text, env);
    assert_eq!(code, 0, "config {text:?}, env {env:?}: {stderr}");
    let (code, second, stderr) = run_binary(&["--check-config"], Some(&first), env);
    assert_eq!(code, 0, "the output of --check-config does not load: {stderr}\n{first}");
    assert_eq!(first, second, "the output of --check-config does not load to itself");
    first
}

#[test]
fn check_config_output_is_a_config_that_loads_to_itself() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let (password, keys) = (
        file("password", "file-password-SECRET\n"),
        file("keys", "file-key-SECRET\n"),
    );
    let (cert, key, roots) = (
        file("tls.crt", &ca.server_cert_pem),
        file("tls.key", &ca.server_key_pem),
        file("ca.pem", &ca.ca_pem),
    );

    // JWT mode, secrets from files, every key away from its default, environment overrides on top.
    let jwt = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\nworkers = 3\n\
         header_read_timeout = \"1500ms\"\nmax_connections = 7\nshutdown_grace = \"1h 2m\"\n\
         [admin]\nlisten = \"[::1]:9999\"\n\
         [upstream]\nurl = \"https://sandbox.api.zapsign.com.br/\"\nconnect_timeout = \"1s\"\nresponse_timeout = \"90s\"\nca_file = \"{roots}\"\n\
         [auth]\norganization_id = 42\nusername = \"u@example.com\"\npassword_file = \"{password}\"\nurl = \"http://127.0.0.1:2\"\n\
         refresh_margin = \"90s\"\nreplay_buffer = \"1048577\"\ntimeout = \"3s\"\n\
         [access]\nallow_networks = [\"10.0.0.0/8\", \"192.168.1.7\"]\nclient_keys_file = \"{keys}\"\nallow_paths = [\"/api/\", \"/v2/\"]\n\
         [log]\nformat = \"json\"\nlevel = \"warn\"\n"
    );
    let out = assert_check_config_round_trips(Some(&jwt), &[]);
    for shown in [
        format!("password_file = \"{password}\""),
        format!("client_keys_file = \"{keys}\""),
        "replay_buffer = \"1048577\"".into(),
        "organization_id = \"42\"".into(),
    ] {
        assert!(out.contains(&shown), "{shown} missing:\n{out}");
    }
    assert!(
        !out.contains("not shown") && !out.contains("SECRET") && !out.contains("redacted"),
        "{out}"
    );
    let env = [
        ("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:7777"),
        ("ZAPSIGN_PROXY_ADMIN_LISTEN", ""),
        ("ZAPSIGN_PROXY_UPSTREAM_URL", "http://127.0.0.1:3"),
        ("ZAPSIGN_PROXY_WORKERS", "1"),
        ("ZAPSIGN_ORGANIZATION_ID", "0043"),
        ("ZAPSIGN_USERNAME", "env-user"),
        ("ZAPSIGN_PASSWORD", "env-password-SECRET"),
        ("ZAPSIGN_PROXY_CLIENT_KEYS", "env-key-SECRET-1,env-key-SECRET-2"),
        ("RUST_LOG", "info,zapsign_proxy=debug"),
    ];
    let out = assert_check_config_round_trips(Some(&jwt), &env);
    for shown in [
        "listen = \"127.0.0.1:7777\"",
        "listen = \"\"",
        "url = \"http://127.0.0.1:3\"",
        "workers = 1",
        "organization_id = \"0043\"",
        "username = \"env-user\"",
        "# auth.password: set, not shown",
        "# access.client_keys: set, not shown",
        "level = \"info,zapsign_proxy=debug\"",
    ] {
        assert!(out.contains(shown), "{shown} missing:\n{out}");
    }
    assert!(!out.contains("SECRET"), "{out}");

    // Static mode: the token from the environment, client keys from the environment; no config file at all.
    let env = [
        ("ZAPSIGN_API_TOKEN", "env-token-SECRET"),
        ("ZAPSIGN_PROXY_CLIENT_KEYS", "env-key-SECRET"),
    ];
    let out = assert_check_config_round_trips(Some("[auth]\nmode = \"static\"\n"), &env);
    assert!(out.contains("# auth.api_token: set, not shown"), "{out}");
    assert!(!out.contains("SECRET") && !out.contains("client_keys ="), "{out}");
    // Static mode, the token and the client keys from files.
    let token = file("token", "file-token-SECRET");
    let text =
        format!("[auth]\nmode = \"static\"\napi_token_file = \"{token}\"\n[access]\nclient_keys_file = \"{keys}\"\n");
    let out = assert_check_config_round_trips(Some(&text), &[]);
    assert!(
        out.contains(&format!("api_token_file = \"{token}\"")) && !out.contains("SECRET"),
        "{out}"
    );
    // JWT mode from the environment alone, no file.
    let env = [
        ("ZAPSIGN_ORGANIZATION_ID", "1"),
        ("ZAPSIGN_USERNAME", "u"),
        ("ZAPSIGN_PASSWORD", "env-password-SECRET"),
    ];
    let out = assert_check_config_round_trips(None, &env);
    assert!(
        out.contains("# auth.password: set, not shown") && !out.contains("SECRET"),
        "{out}"
    );

    // An inline secret can only be a comment: the output says it is set and never holds it.
    let (code, out, stderr) = run_binary(
        &["--check-config"],
        Some("[auth]\nmode = \"static\"\napi_token = \"inline-token-SECRET\"\n"),
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        out.contains("# auth.api_token: set, not shown") && !out.contains("SECRET"),
        "{out}"
    );
}

#[test]
fn every_config_problem_is_reported_at_once() {
    let text = "[server]\nshutdown_grace = \"a while\"\n[auth]\nusername = \"u\"\npassword = \"p\"\n[log]\nlevel = \"verbose\"\n";
    let (code, _, stderr) = run_binary(&[], Some(text), &[]);
    assert_eq!(code, 2, "{stderr}");
    for key in ["server.shutdown_grace", "auth.organization_id", "log.level"] {
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(&format!("`{key}`"))).collect();
        assert_eq!(lines.len(), 1, "{key} should be named on one line: {stderr}");
    }
}

#[test]
fn log_level_is_checked_and_rust_log_is_shown_or_reported() {
    let text = "[auth]\nmode = \"static\"\napi_token = \"t\"\n[log]\nlevel = \"verbose\"\n";
    let (code, _, stderr) = run_binary(&["--check-config"], Some(text), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("log.level") && stderr.contains("verbose"), "{stderr}");
    let text = "[auth]\nmode = \"static\"\napi_token = \"t\"\n[log]\nlevel = \"info,zapsign_proxy=debug\"\n";
    let (code, stdout, stderr) = run_binary(&["--check-config"], Some(text), &[("RUST_LOG", "trace")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("level = \"trace\""),
        "RUST_LOG's level not shown: {stdout}"
    );
    let (code, stdout, stderr) = run_binary(&["--check-config"], Some(text), &[("RUST_LOG", "verbose")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("level = \"info,zapsign_proxy=debug\""), "{stdout}");
    assert!(stderr.contains("RUST_LOG") && stderr.contains("verbose"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_log_that_does_not_parse_is_reported_at_start_and_ignored() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    // Before, `verbose` was taken as a target name: nothing at all was logged, not even "proxy listening".
    let proxy = Subprocess::start(&static_config(&mock.url(), ""), &[("RUST_LOG", "verbose")]);
    let logs = proxy.log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("RUST_LOG is ignored") && l.contains("WARN")),
        "{logs}"
    );
}

#[test]
fn a_port_in_use_is_reported_once() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let text = "[auth]\nmode = \"static\"\napi_token = \"t\"\n";
    let (code, _, stderr) = run_binary(&[], Some(text), &[("ZAPSIGN_PROXY_LISTEN", &addr)]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.matches(&addr).count(), 1, "{stderr}");
    assert_eq!(stderr.matches("in use").count(), 1, "reported more than once: {stderr}");
    assert!(stderr.contains("server.listen"), "{stderr}");
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

/// `zapsign-proxy demo` and its arguments, on ports the kernel picks; killed when dropped.
struct Demo {
    child: Child,
    /// Where the proxy listens, from the first line the demo prints.
    addr: SocketAddr,
    /// Its stderr, line by line as it comes.
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Demo {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
            .arg("demo")
            .args(args)
            .env_clear()
            .env("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:0")
            .env("ZAPSIGN_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (sink, pipe) = (stderr.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}; stderr: {:?}", stderr.lock().unwrap()));
        Self { child, addr, stderr }
    }

    /// Asserts that a request through the demo reaches the mock with a JWT from a login.
    async fn assert_serves_with_a_login(&self) {
        let a = send(
            self.addr,
            get(self.addr, "/api/v1/docs/?page=1&api_token=stale-caller-token"),
        )
        .await;
        assert_eq!(a.status, 200, "{:?}; stderr: {:?}", a.body, self.stderr.lock().unwrap());
        let json = a.json();
        assert_eq!(json["target"], "/api/v1/docs/?page=1");
        let auth = json["headers"]["authorization"].as_str().unwrap();
        assert!(
            auth.starts_with("Bearer ey"),
            "the demo should inject a JWT from a login: {auth}"
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_proxy_and_the_mock_with_a_jwt_login() {
    Demo::start(&[], &[]).assert_serves_with_a_login().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_with_a_config_file_keeps_the_demo_credentials_and_the_mock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("demo.toml");
    std::fs::write(
        &path,
        "[server]\nmax_connections = 50\n[access]\nallow_paths = [\"/api/v1/\"]\n",
    )
    .unwrap();
    // Real credentials in the environment are not the demo's: they are ignored, never sent anywhere.
    let env = [("ZAPSIGN_PASSWORD", "real-password"), ("ZAPSIGN_USERNAME", "real-user")];
    let demo = Demo::start(&["--config", path.to_str().unwrap()], &env);
    demo.assert_serves_with_a_login().await;
    // The file's own settings apply.
    assert_eq!(send(demo.addr, get(demo.addr, "/api/v2/x")).await.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let demo = Demo::start(&[], &[("RUST_LOG", "debug")]);
    demo.assert_serves_with_a_login().await;
    let stderr = demo.stderr.clone();
    assert!(
        wait_until(Duration::from_secs(10), || stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("proxy listening")))
        .await,
        "{:?}",
        stderr.lock().unwrap()
    );
    drop(demo);
    let lines = stderr.lock().unwrap();
    let coloured: Vec<&String> = lines.iter().filter(|l| l.contains('\u{1b}')).collect();
    assert!(coloured.is_empty(), "colour codes in piped logs: {coloured:?}");
}
