//! Issue 9, fault 8: after `server.shutdown_grace` the connections still open and every task `run` spawned
//! are closed and joined, so `run` returning means nothing it started still runs: the upstream sees its
//! connections closed, callers (HTTP/1.1, h2c, and an admin scraper's keep-alive connection) get EOF, and
//! the proxy's runtime holds no task.
//!
//! The proxy runs on a runtime of its own, on its own thread, so that runtime's task count is the proxy's
//! alone; the test's side (slow upstream, callers) runs on the test's runtime.

mod common;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw_upstream::RawUpstream;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zapsign_proxy::config::Config;
use zapsign_proxy::Listeners;

/// What the proxy's thread reports once `run` has returned.
struct Finished {
    /// Tasks alive on the proxy's runtime right after `run` returned.
    alive_tasks: usize,
    /// How long after the shutdown signal `run` returned.
    took: Duration,
}

/// The proxy on its own current-thread runtime. Returns its caller and admin addresses, the shutdown trigger,
/// the report sent once `run` returns, and a release that lets the thread drop its runtime (until then
/// nothing the proxy left behind can run or be dropped: what the upstream sees was done by `run` itself).
fn start_proxy(
    text: String,
    upstream: String,
) -> (
    SocketAddr,
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    mpsc::Receiver<Finished>,
    mpsc::Sender<()>,
) {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stopped_at = rt.block_on(async move {
            let env = move |name: &str| match name {
                "ZAPSIGN_PROXY_UPSTREAM_URL" => Some(upstream.clone()),
                "ZAPSIGN_PROXY_LISTEN" | "ZAPSIGN_PROXY_ADMIN_LISTEN" => Some("127.0.0.1:0".into()),
                "ZAPSIGN_PROXY_PACING_LIMIT" => Some("0".into()),
                _ => None,
            };
            let config = Config::from_toml(&text, &env).expect("test config is valid");
            let listeners = Listeners::bind(&config).await.expect("bind");
            let addrs = (
                listeners.proxy.local_addr().unwrap(),
                listeners.admin.as_ref().unwrap().local_addr().unwrap(),
            );
            addr_tx.send(addrs).unwrap();
            let stopped_at = std::sync::Arc::new(std::sync::Mutex::new(None));
            let mark = stopped_at.clone();
            zapsign_proxy::run(config, listeners, async move {
                let _ = stop_rx.await;
                *mark.lock().unwrap() = Some(Instant::now());
            })
            .await
            .expect("proxy runs");
            let at = stopped_at.lock().unwrap().expect("stopped by the signal");
            at
        });
        let finished = Finished {
            alive_tasks: rt.metrics().num_alive_tasks(),
            took: stopped_at.elapsed(),
        };
        done_tx.send(finished).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
    });
    let (addr, admin) = addr_rx.recv_timeout(Duration::from_secs(10)).expect("the proxy starts");
    (addr, admin, stop_tx, done_rx, release_tx)
}

/// Reads until EOF (or an error, such as a reset) within `deadline`; returns whether the peer closed.
async fn sees_eof(stream: &mut TcpStream, deadline: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_run_closes_every_connection_and_returns_with_no_task_left() {
    // An upstream that reads each request and never answers: the requests outlive any grace.
    let up = RawUpstream::start(|mut conn| async move {
        if conn.read_head_recorded().await.is_some() {
            conn.until_closed().await;
        }
    })
    .await;
    let grace = Duration::from_millis(300);
    let text = format!(
        "[server]\nshutdown_grace = \"{}ms\"\n[auth]\nmode = \"static\"\napi_token = \"{}\"\n",
        grace.as_millis(),
        zapsign_proxy::mock::DEMO_API_TOKEN
    );
    let (addr, admin, stop, done, release) = start_proxy(text, up.url());

    // An HTTP/1.1 caller (its own affine upstream connection) and an h2c caller (the pool), both waiting on the
    // upstream; and a scraper's keep-alive connection to the admin listener.
    let mut h1 = TcpStream::connect(addr).await.unwrap();
    h1.write_all(b"GET /api/v1/slow/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let h2 = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let req = Request::get(format!("http://{addr}/api/v1/slow/2"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answered = sender.send_request(req).await;
        // The connection task ends too once the proxy closes the connection.
        let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        answered.map(|r| r.status())
    });
    let mut scraper = TcpStream::connect(admin).await.unwrap();
    scraper
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    scraper.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    assert!(
        wait_until(Duration::from_secs(10), || up.requests().len() == 2).await,
        "both requests should reach the upstream"
    );

    stop.send(()).unwrap();
    let finished = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("run returns after the grace");
    assert!(
        finished.took >= grace && finished.took < grace + Duration::from_secs(5),
        "run returned {:?} after the signal, the grace being {grace:?}",
        finished.took
    );
    assert_eq!(
        finished.alive_tasks, 0,
        "tasks the proxy started still run after run returned"
    );

    // The proxy's runtime is frozen (not dropped) here: whatever the peers see, `run` did.
    assert!(
        wait_until(Duration::from_secs(5), || up.peer_closed() == 2).await,
        "the upstream connections were left open: {} of {} closed",
        up.peer_closed(),
        up.connections()
    );
    assert!(
        sees_eof(&mut h1, Duration::from_secs(5)).await,
        "the HTTP/1.1 caller was left hanging"
    );
    assert!(
        sees_eof(&mut scraper, Duration::from_secs(5)).await,
        "the admin connection was left open"
    );
    let h2 = tokio::time::timeout(Duration::from_secs(5), h2)
        .await
        .expect("the h2c caller was left hanging")
        .unwrap();
    assert!(h2.is_err(), "the h2c request got an answer: {h2:?}");
    // After `run`, nothing listens: a new connection is refused.
    assert!(TcpStream::connect(addr).await.is_err());
    let _ = release.send(());
}

/// JWT mode adds the renewer and its auth client: once `run` returns, none of their tasks runs either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_jwt_mode_the_renewer_and_auth_client_end_with_run() {
    let mock = zapsign_proxy::mock::MockZapSign::start(zapsign_proxy::mock::MockConfig::default())
        .await
        .unwrap();
    let (addr, admin, stop, done, release) =
        start_proxy(jwt_config("[server]\nshutdown_grace = \"300ms\"\n"), mock.url());
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            send(admin, get(admin, "/readyz")).await.status == 200
        })
        .await,
        "the proxy never logged in"
    );
    assert_eq!(send(addr, get(addr, "/api/v1/docs/")).await.status, 200);
    stop.send(()).unwrap();
    let finished = tokio::task::spawn_blocking(move || done.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("run returns");
    assert_eq!(
        finished.alive_tasks, 0,
        "tasks the proxy started still run after run returned"
    );
    let _ = release.send(());
}

/// Polls the async `check` every 10 ms until it holds or `deadline` passes.
async fn wait_until_async<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
