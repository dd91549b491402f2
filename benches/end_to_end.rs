//! The whole request path in one process over loopback: keep-alive clients, the real proxy (`run`, static
//! mode, no logging subscriber), and a minimal upstream answering 300 bytes of JSON. Reports requests per
//! second at several concurrencies. Numbers from one process sharing cores with its own load are for comparing
//! builds of the proxy with each other; the nginx comparison is `benches/compare-nginx.sh`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use zapsign_proxy::config::Config;
use zapsign_proxy::Listeners;

const BODY: &[u8; 300] = &[b'x'; 300];

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

async fn proxy(upstream: SocketAddr) -> SocketAddr {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[upstream]\nurl = \"http://{upstream}\"\n\
         [auth]\nmode = \"static\"\napi_token = \"{}\"\n[pacing]\nlimit = 0\n",
        "t".repeat(200)
    );
    let config = Config::from_toml(&text, &|_| None).unwrap();
    let listeners = Listeners::bind(&config).await.unwrap();
    let addr = listeners.proxy.local_addr().unwrap();
    tokio::spawn(zapsign_proxy::run(config, listeners, std::future::pending()));
    addr
}

async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn end_to_end(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async { proxy(upstream().await).await });
    let mut group = c.benchmark_group("end_to_end");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for conns in [1usize, 16, 64] {
        let senders = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..conns {
                v.push(client(addr).await);
            }
            v
        });
        let senders = std::sync::Arc::new(tokio::sync::Mutex::new(senders));
        group.bench_function(format!("get_300b/{conns}_conns"), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let senders = senders.clone();
                async move {
                    let mut senders = senders.lock().await;
                    let per_conn = iters.div_ceil(senders.len() as u64);
                    let start = Instant::now();
                    let mut tasks = Vec::new();
                    for mut s in senders.drain(..) {
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..per_conn {
                                let req = Request::get("/api/v1/docs/").body(Full::new(Bytes::new())).unwrap();
                                let resp = s.send_request(req).await.unwrap();
                                let _ = resp.into_body().collect().await.unwrap();
                            }
                            s
                        }));
                    }
                    for t in tasks {
                        senders.push(t.await.unwrap());
                    }
                    // Time per request as if `iters` were sent: the concurrency is the point.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_conn * senders.len() as u64) as f64)
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, end_to_end);
criterion_main!(benches);
