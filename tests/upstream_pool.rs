//! Issue 12: upstream connections are pooled across callers. A caller that opens a connection per request (PHP,
//! shell scripts) reuses a warm upstream connection instead of costing a TCP + TLS handshake to ZapSign each
//! time; idle connections are bounded by `upstream.max_idle_connections` and closed after
//! `upstream.idle_timeout`; a connection the upstream closed is never handed to the next caller.
//!
//! The upstream is HTTPS offering only HTTP/1.1 (as nginx does by default): a TLS front that counts the TCP + TLS
//! connections it accepts and those that end, relaying each to the plain mock ZapSign (which records the
//! requests and can answer `Connection: close`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_API_TOKEN};

/// An HTTPS upstream (HTTP/1.1 only by ALPN) that counts connections and relays them to a plain backend.
struct TlsFront {
    addr: SocketAddr,
    /// TCP connections accepted (each then handshakes TLS).
    accepted: Arc<AtomicUsize>,
    /// Connections that ended, whichever side closed.
    ended: Arc<AtomicUsize>,
    /// Bumped to make the upstream hang up every connection open now.
    hang_up: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    async fn start(backend: SocketAddr, ca: &TestCa) -> Self {
        let mut tls = ca.server_config();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (hang_up, hang_rx) = watch::channel(0u64);
        let (acc, end) = (accepted.clone(), ended.clone());
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: every relay ends with it.
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (acceptor, end) = (acceptor.clone(), end.clone());
                let mut hang = hang_rx.clone();
                hang.borrow_and_update();
                relays.spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(stream).await {
                        if let Ok(mut back) = TcpStream::connect(backend).await {
                            tokio::select! {
                                _ = tokio::io::copy_bidirectional(&mut tls, &mut back) => {}
                                _ = hang.changed() => {}
                            }
                        }
                    }
                    end.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            accepted,
            ended,
            hang_up,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn ended(&self) -> usize {
        self.ended.load(Ordering::SeqCst)
    }

    /// Closes every connection open now, as an upstream or its load balancer does with idle ones.
    fn hang_up(&self) {
        self.hang_up.send_modify(|n| *n += 1);
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The proxy in static mode in front of a [`TlsFront`] over the mock, trusting the test CA, with `upstream`
/// keys appended to `[upstream]`.
async fn start(upstream: &str) -> (Harness, TlsFront, tempfile::TempDir) {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).unwrap();
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let front = TlsFront::start(mock.addr, &ca).await;
    let text = format!(
        "[auth]\nmode = \"static\"\napi_token = \"{DEMO_API_TOKEN}\"\n[upstream]\nca_file = \"{}\"\n{upstream}",
        ca_file.display()
    );
    let h = Harness::start_with(mock, &text, &front.url()).await;
    (h, front, dir)
}

/// One request on a new caller connection that says `Connection: close`: the proxy ends the caller connection
/// as soon as the answer is written, so the upstream connection is back in the pool before the next caller.
async fn one_shot(addr: SocketAddr, path: &str) -> u16 {
    let mut req = get(addr, path);
    req.headers_mut()
        .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    send(addr, req).await.status.as_u16()
}

#[tokio::test]
async fn sequential_one_request_callers_reuse_warm_upstream_connections() {
    let (h, front, _dir) = start("").await;
    // Warm-up.
    for n in 0..3 {
        assert_eq!(
            send(h.addr, get(h.addr, &format!("/api/v1/docs/?warm={n}")))
                .await
                .status,
            200
        );
    }
    let warm = front.accepted();
    // Each caller opens a connection, sends one request, reads the answer and closes (keep-alive, as curl does).
    for n in 0..60 {
        let a = send(h.addr, get(h.addr, &format!("/api/v1/docs/?n={n}"))).await;
        assert_eq!(a.status, 200, "caller {n}: {:?}", a.body);
    }
    let new = front.accepted() - warm;
    assert!(
        new <= 4,
        "60 one-request callers opened {new} new upstream TLS connections"
    );
    let records = h.mock.state.records();
    assert_eq!(records.len(), 63);
    assert!(
        records.iter().all(|r| r.version == "HTTP/1.1"),
        "the upstream offers HTTP/1.1 only"
    );
    h.shutdown().await;
}

#[tokio::test]
async fn idle_connections_beyond_max_idle_connections_are_closed() {
    let (h, front, _dir) = start("max_idle_connections = 2\n").await;
    // Six callers at once each hold an upstream connection of their own.
    let mut callers = Vec::new();
    for n in 0..6 {
        let mut c = Caller::connect(h.addr).await;
        assert_eq!(c.send(get(h.addr, &format!("/api/v1/docs/?c={n}"))).await.status, 200);
        callers.push(c);
    }
    assert_eq!(front.accepted(), 6);
    assert_eq!(front.ended(), 0);
    // They leave: two connections stay idle, four are closed.
    drop(callers);
    assert!(
        wait_until(Duration::from_secs(5), || front.ended() == 4).await,
        "{} of 6 upstream connections closed, 4 expected",
        front.ended()
    );
    // The two idle ones serve the next callers.
    for n in 0..4 {
        assert_eq!(one_shot(h.addr, &format!("/api/v1/docs/?after={n}")).await, 200);
    }
    assert_eq!(front.accepted(), 6, "the idle connections were not reused");
    assert_eq!(front.ended(), 4);
    h.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let timeout = Duration::from_millis(400);
    let (h, front, _dir) = start("idle_timeout = \"400ms\"\n").await;
    assert_eq!(one_shot(h.addr, "/api/v1/docs/?n=1").await, 200);
    assert_eq!(one_shot(h.addr, "/api/v1/docs/?n=2").await, 200);
    let returned = Instant::now();
    assert_eq!(
        front.accepted(),
        1,
        "the second caller did not reuse the idle connection"
    );
    assert!(
        wait_until(Duration::from_secs(5), || front.ended() == 1).await,
        "the idle connection was still open 5 s after it was returned"
    );
    // The connection went back to the pool a moment before the caller saw its answer: some slack.
    let idle_for = returned.elapsed();
    assert!(
        idle_for >= timeout - Duration::from_millis(100),
        "closed after {idle_for:?}, before idle_timeout"
    );
    assert_eq!(one_shot(h.addr, "/api/v1/docs/?n=3").await, 200);
    assert_eq!(front.accepted(), 2);
    h.shutdown().await;
}

#[tokio::test]
async fn a_connection_the_upstream_ended_with_connection_close_is_not_handed_on() {
    let (h, front, _dir) = start("").await;
    h.mock.state.close_connections_after_next();
    assert_eq!(one_shot(h.addr, "/api/v1/docs/?n=1").await, 200);
    for n in 2..5 {
        assert_eq!(
            one_shot(h.addr, &format!("/api/v1/docs/?n={n}")).await,
            200,
            "request {n}"
        );
    }
    let records = h.mock.state.records();
    assert_eq!(records.len(), 4);
    assert_ne!(records[0].peer, records[1].peer, "a closed connection was handed on");
    assert_eq!(front.accepted(), 2, "the connection after the close was not pooled");
    h.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_handed_on() {
    let (h, front, _dir) = start("").await;
    assert_eq!(one_shot(h.addr, "/api/v1/docs/?n=1").await, 200);
    front.hang_up();
    assert!(wait_until(Duration::from_secs(5), || front.ended() == 1).await);
    for n in 2..5 {
        let status = one_shot(h.addr, &format!("/api/v1/docs/?n={n}")).await;
        assert_eq!(status, 200, "request {n} after the upstream closed the idle connection");
    }
    assert_eq!(front.accepted(), 2);
    assert_eq!(h.mock.state.records().len(), 4);
    h.shutdown().await;
}
