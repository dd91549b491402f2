//! Soak run: the proxy binary in JWT mode in front of the bundled mock, whose access tokens live 10 s, under
//! mixed GET/POST load with connection churn for `--seconds N`. Reports requests, non-2xx answers, and the
//! proxy's RSS and open file descriptors at start (after warm-up) and end (after the load stops), and exits
//! non-zero when a request failed, descriptors were left open, or RSS grew by 2 MiB or more.
//!
//! `cargo build --release && cargo run --release --example soak -- --seconds 600`
//! (CI runs `--seconds 30` on the debug build.)

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use zapsign_proxy::mock::{MockConfig, MockZapSign};

struct Args {
    seconds: u64,
    concurrency: usize,
    proxy_bin: std::path::PathBuf,
}

fn args() -> Result<Args, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/examples/soak -> target/<profile>/zapsign-proxy
    let default_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("zapsign-proxy"))
        .ok_or("cannot locate the target directory")?;
    let mut a = Args {
        seconds: 60,
        concurrency: 16,
        proxy_bin: default_bin,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => a.seconds = value.parse().map_err(|_| "--seconds takes a number")?,
            "--concurrency" => a.concurrency = value.parse().map_err(|_| "--concurrency takes a number")?,
            "--proxy-bin" => a.proxy_bin = value.into(),
            _ => {
                return Err(format!(
                    "unknown flag {flag}; flags: --seconds N --concurrency C --proxy-bin PATH"
                ))
            }
        }
    }
    if !a.proxy_bin.exists() {
        return Err(format!(
            "{} not found: build it first (cargo build [--release] --bin zapsign-proxy) or pass --proxy-bin",
            a.proxy_bin.display()
        ));
    }
    Ok(a)
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Proxy {
    fn start(bin: &std::path::Path, upstream: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("proxy.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{upstream}\"\n\
             idle_timeout = \"1s\"\n[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nrefresh_margin = \"3s\"\n\
             [log]\nformat = \"json\"\n[pacing]\nlimit = 0\n",
            zapsign_proxy::mock::DEMO_ORGANIZATION_ID,
            zapsign_proxy::mock::DEMO_USERNAME,
            zapsign_proxy::mock::DEMO_PASSWORD
        );
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "warn,zapsign_proxy=info,zapsign_proxy::proxy=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut lines = BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = lines
                .next()
                .ok_or("the proxy exited before listening")?
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let parsed = v["addr"].as_str().and_then(|a| a.parse().ok());
            match v["message"].as_str() {
                Some("proxy listening") => addr = parsed,
                Some("admin listening") => admin = parsed,
                _ => {}
            }
        }
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("proxy: {line}");
                }
            }
        });
        Ok(Self {
            child,
            addr: addr.ok_or("no proxy address")?,
            admin: admin.ok_or("no admin address")?,
            _dir: dir,
        })
    }

    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, |d| d.count())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    not_2xx: AtomicU64,
    errors: AtomicU64,
}

/// One caller: keep-alive requests, a new connection every 200 requests, GETs and POSTs of 1 to 64 KiB.
async fn caller(addr: SocketAddr, id: usize, until: Instant, counts: Arc<Counts>) {
    let mut n: u64 = 0;
    let mut sender = None;
    while Instant::now() < until {
        n += 1;
        if sender.is_none() || n % 200 == 0 {
            sender = connect(addr).await.ok();
        }
        let Some(s) = sender.as_mut() else {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let req = if n % 3 == 0 {
            let size = 1024 * (1 + (n as usize * 7 + id) % 64);
            Request::post("/api/v1/docs/").body(Full::new(Bytes::from(vec![b'a'; size])))
        } else {
            Request::get(format!("/api/v1/docs/?page={n}")).body(Full::new(Bytes::new()))
        };
        let Ok(req) = req else { continue };
        let result = async {
            s.ready().await.map_err(|e| e.to_string())?;
            let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        }
        .await;
        match result {
            Ok(status) if status.is_success() => counts.ok.fetch_add(1, Ordering::Relaxed),
            Ok(status) => {
                eprintln!("non-2xx: {status}");
                counts.not_2xx.fetch_add(1, Ordering::Relaxed)
            }
            Err(e) => {
                eprintln!("request failed: {e}");
                sender = None;
                counts.errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

async fn load(addr: SocketAddr, concurrency: usize, duration: Duration) -> Arc<Counts> {
    let counts = Arc::new(Counts::default());
    let until = Instant::now() + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|id| tokio::spawn(caller(addr, id, until, counts.clone())))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    counts
}

async fn ready(admin: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if let Ok(mut s) = connect(admin).await {
            if let Ok(req) = Request::get("/readyz").body(Full::new(Bytes::new())) {
                if s.send_request(req).await.is_ok_and(|r| r.status() == 200) {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn soak(a: Args) -> Result<bool, String> {
    let mock_cfg = MockConfig {
        access_ttl: Duration::from_secs(10),
        ..MockConfig::default()
    };
    let mock = MockZapSign::start(mock_cfg).await.map_err(|e| e.to_string())?;
    let proxy = Proxy::start(&a.proxy_bin, &mock.url())?;
    if !ready(proxy.admin).await {
        return Err("the proxy never became ready".into());
    }
    // Warm-up: fill pools and allocator arenas, then let connections close. Idle pooled upstream connections
    // close after `upstream.idle_timeout` (1 s here), so both counts below see none: a descriptor still open
    // after the run is a leak, not the bounded pool.
    load(proxy.addr, a.concurrency, Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_start, fds_start) = (proxy.rss_kib(), proxy.open_fds());

    let started = Instant::now();
    let counts = load(proxy.addr, a.concurrency, Duration::from_secs(a.seconds)).await;
    let elapsed = started.elapsed();

    // Connections close, the proxy goes idle; give it a few seconds to let go of them.
    let end = Instant::now() + Duration::from_secs(5);
    while proxy.open_fds() > fds_start && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_end, fds_end) = (proxy.rss_kib(), proxy.open_fds());

    let ok = counts.ok.load(Ordering::Relaxed);
    let not_2xx = counts.not_2xx.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    let growth = rss_end as i64 - rss_start as i64;
    let s = &mock.state;
    println!("soak: {} s, {} callers", elapsed.as_secs(), a.concurrency);
    println!(
        "requests: {} ({:.0}/s), non-2xx: {not_2xx}, failed: {errors}",
        ok + not_2xx + errors,
        (ok + not_2xx + errors) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "token renewals seen by the mock: {} logins, {} refreshes; upstream 401s: {}",
        s.logins.load(Ordering::Relaxed),
        s.refreshes.load(Ordering::Relaxed),
        s.unauthorized.load(Ordering::Relaxed)
    );
    println!("proxy RSS: start {rss_start} KiB, end {rss_end} KiB, growth {growth} KiB");
    println!("proxy open fds: start {fds_start}, end {fds_end}");
    let passed = not_2xx == 0 && errors == 0 && fds_end <= fds_start && growth < 2048;
    println!("{}", if passed { "soak passed" } else { "soak FAILED" });
    Ok(passed)
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(soak(a)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(1)
        }
    }
}
