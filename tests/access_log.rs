//! Issue 12: the access log is written off the request path, and still no line is lost: after a burst of
//! requests and SIGTERM, the log holds exactly one `served` line per request the proxy counted
//! (`zapsign_proxy_requests_total`), in text and in JSON; and `/metrics` shows the count of dropped log lines.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use zapsign_proxy::mock::{MockConfig, MockZapSign};

/// The sum of `zapsign_proxy_requests_total` over every status, and the dropped-lines counter.
async fn scrape(admin: SocketAddr) -> (u64, u64) {
    let a = send(admin, get(admin, "/metrics")).await;
    let text = String::from_utf8_lossy(&a.body).into_owned();
    let mut requests = 0;
    let mut dropped = None;
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if name.starts_with("zapsign_proxy_requests_total{") {
            requests += value.parse::<u64>().unwrap();
        } else if name == "zapsign_proxy_log_lines_dropped_total" {
            dropped = Some(value.parse::<u64>().unwrap());
        }
    }
    (
        requests,
        dropped.unwrap_or_else(|| panic!("no dropped-lines metric:\n{text}")),
    )
}

/// Sends `n` requests over `conns` keep-alive connections at once and returns once every answer is in.
async fn burst(addr: SocketAddr, n: usize, conns: usize) {
    let mut tasks = Vec::new();
    for c in 0..conns {
        let per = n / conns + usize::from(c < n % conns);
        tasks.push(tokio::spawn(async move {
            let mut caller = Caller::connect(addr).await;
            for _ in 0..per {
                assert_eq!(caller.send(get(addr, "/api/v1/docs/")).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The `served` lines among a JSON-log subprocess's lines.
fn served_json(p: &Subprocess) -> usize {
    p.lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "served")
        .count()
}

/// The proxy with text logs going to a file (the [`Subprocess`] helper finds the listen addresses in JSON lines
/// only, so this one is given free ports).
struct TextProxy {
    child: std::process::Child,
    log: std::path::PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TextProxy {
    /// Starts the proxy with `config` and waits until its admin listener answers.
    fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("proxy.log");
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (addr, admin) = (free(), free());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
            .arg("--config")
            .arg(&path)
            .env_clear()
            .env("ZAPSIGN_PROXY_LISTEN", addr.to_string())
            .env("ZAPSIGN_PROXY_ADMIN_LISTEN", admin.to_string())
            .env("ZAPSIGN_PROXY_WORKERS", "1")
            .env("ZAPSIGN_PROXY_PACING_LIMIT", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(admin).is_err() {
            assert!(std::time::Instant::now() < end, "the proxy never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            log,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// SIGTERM, wait for a clean exit, and count the access lines in the file.
    async fn stop_and_count_served(mut self) -> usize {
        tokio::task::spawn_blocking(move || {
            let ok = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -TERM failed");
            assert!(self.child.wait().unwrap().success());
            let text = std::fs::read_to_string(&self.log).unwrap();
            assert!(!text.contains('\u{1b}'), "colour codes in a log file");
            text.lines().filter(|l| l.contains(" served ")).count()
        })
        .await
        .unwrap()
    }
}

impl Drop for TextProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Text logs into a file: after a burst, SIGTERM at once; the file holds one access line per counted request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_its_access_line_after_sigterm() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let config = static_config(&mock.url(), "").replace("format = \"json\"", "format = \"text\"");
    let proxy = TextProxy::start(&config);
    let (admin, addr) = (proxy.admin, proxy.addr);
    let (before, _) = scrape(admin).await;
    burst(addr, 2000, 32).await;
    let (after, dropped) = scrape(admin).await;
    assert_eq!((after - before, dropped), (2000, 0));
    let lines = proxy.stop_and_count_served().await;
    assert_eq!(lines as u64, after - before, "access lines != requests_total delta");
}

/// JSON logs into a pipe whose reader stalls (a slow log collector) while the proxy is told to stop: the access
/// lines still queued at SIGTERM are written out before the process exits, once the reader moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_queued_behind_a_stalled_reader_at_sigterm_are_not_lost() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let mut proxy = Subprocess::start(&static_config(&mock.url(), ""), &[("ZAPSIGN_PROXY_WORKERS", "1")]);
    let (admin, addr) = (proxy.admin.expect("admin listener"), proxy.addr);
    let (before, _) = scrape(admin).await;
    // A thread holds the lock of the helper's line list: its reader thread blocks on it, the pipe (64 KiB)
    // fills, and the proxy's log writer blocks on the pipe with the rest of the lines queued behind.
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let lines = proxy.lines.clone();
    let staller = std::thread::spawn(move || {
        let _held = lines.lock().unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
    });
    locked.recv().unwrap();
    burst(addr, 1500, 32).await;
    let (after, dropped) = scrape(admin).await;
    assert_eq!((after - before, dropped), (1500, 0));
    proxy.signal("TERM");
    // The stall outlasts the shutdown itself (no request in flight, so it is immediate): the process must
    // still be waiting for its log writer when the reader moves again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited while its log lines were still queued"
    );
    release.send(()).unwrap();
    staller.join().unwrap();
    let proxy = tokio::task::spawn_blocking(move || {
        assert!(proxy.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()));
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while served_json(&proxy) < 1500 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    })
    .await
    .unwrap();
    assert_eq!(
        served_json(&proxy) as u64,
        after - before,
        "access lines != requests_total delta"
    );
}
