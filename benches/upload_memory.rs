//! Memory of a 14 MB streamed upload (a 10 MB PDF as base64 JSON, ZapSign's largest request): the proxy binary
//! runs as its own process and its peak RSS (VmHWM) is read before and after. Static mode needs no replay
//! buffer, so the growth shows what streaming costs; JWT mode keeps up to `auth.replay_buffer` of the body to
//! replay after a 401, and that shows too. Criterion times the upload; the RSS growth is printed.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const UPLOAD: usize = 14_000_000;

/// An upstream that reads and discards bodies, answering 200.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let mut body = req.into_body();
                    while let Some(frame) = body.frame().await {
                        if frame.is_err() {
                            break;
                        }
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    fn start(upstream: SocketAddr, auth: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("zapsign-proxy-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", auth.len()));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n[admin]\nlisten = \"\"\n[upstream]\nurl = \"http://{upstream}\"\n\
             {auth}[log]\nformat = \"json\"\nlevel = \"info\"\n[pacing]\nlimit = 0\n"
        );
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
            .arg("--config")
            .arg(&path)
            .env_clear()
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("proxy exited").unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["message"] == "proxy listening" {
                break v["addr"].as_str().unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { child, addr }
    }

    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn upload(addr: SocketAddr, body: Bytes) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/api/v1/docs/").body(Full::new(body)).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
}

fn upload_memory(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(sink());
    let body = Bytes::from(vec![b'A'; UPLOAD]);
    let modes = [
        ("static", "[auth]\nmode = \"static\"\napi_token = \"t\"\n".to_owned()),
        // JWT mode needs a login: the sink answers every request with `{}`, so point auth at a mock instead.
        ("jwt", String::new()),
    ];
    let mock = rt
        .block_on(zapsign_proxy::mock::MockZapSign::start(Default::default()))
        .unwrap();
    let mut group = c.benchmark_group("upload_14MB");
    group.sample_size(10).measurement_time(Duration::from_secs(8));
    for (name, auth) in modes {
        let auth = if auth.is_empty() {
            format!(
                "[auth]\norganization_id = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nurl = \"{}\"\n",
                zapsign_proxy::mock::DEMO_ORGANIZATION_ID,
                zapsign_proxy::mock::DEMO_USERNAME,
                zapsign_proxy::mock::DEMO_PASSWORD,
                mock.url()
            )
        } else {
            auth
        };
        let proxy = Proxy::start(upstream, &auth);
        rt.block_on(upload(proxy.addr, Bytes::from_static(b"{}")));
        let before = proxy.peak_rss_kib();
        let start = Instant::now();
        rt.block_on(upload(proxy.addr, body.clone()));
        let first = start.elapsed();
        let after = proxy.peak_rss_kib();
        eprintln!(
            "upload_14MB/{name}: proxy peak RSS {before} KiB -> {after} KiB (+{} KiB) for one {UPLOAD}-byte upload in {first:?}",
            after.saturating_sub(before)
        );
        group.bench_function(name, |b| b.iter(|| rt.block_on(upload(proxy.addr, body.clone()))));
    }
    group.finish();
}

criterion_group!(benches, upload_memory);
criterion_main!(benches);
