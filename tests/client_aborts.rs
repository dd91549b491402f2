//! Issue 5: a caller that leaves mid-upload or mid-download cancels its upstream request, and nothing stays
//! behind. Counted from the outside: the fake upstream sees its connection closed (the request body aborted, or
//! the download's writes refused), the proxy stops pulling a download nobody reads (backpressure, not a buffer),
//! the test runtime's live tasks and the binary's open file descriptors (`/proc/<pid>/fd`) return to where they
//! were.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::h2_raw::*;
use common::raw_upstream::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(40), f)
        .await
        .expect("the test exceeded its deadline")
}

/// What an upload declares: far more than the caller will send.
const DECLARED: usize = 10 * 1024 * 1024;
/// What a download declares: far more than anyone will read.
const DOWNLOAD: usize = 1 << 30;

/// An upstream that takes uploads (POST) without answering until the peer leaves, streams an endless download
/// for targets containing `download` (adding what it wrote to `written`), and answers anything else
/// `200 ok` and closes.
async fn abort_upstream(written: Arc<AtomicUsize>) -> RawUpstream {
    RawUpstream::start(move |mut conn| {
        let written = written.clone();
        async move {
            let Some((req, _)) = conn.read_head_recorded().await else {
                return;
            };
            if req.method == "POST" {
                conn.until_closed().await;
            } else if req.target.contains("download") {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {DOWNLOAD}\r\n\r\n"
                );
                if conn.write(head.as_bytes()).await.is_ok() {
                    conn.stream_until_closed(&[0x5a; 64 * 1024], Duration::from_millis(1), &written)
                        .await;
                }
            } else {
                let _ = conn
                    .write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                    .await;
                conn.close();
            }
        }
    })
    .await
}

async fn static_proxy(up: &RawUpstream) -> Harness {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    Harness::start_with(
        mock,
        "[auth]\nmode = \"static\"\napi_token = \"abort-test-token\"\n",
        &up.url(),
    )
    .await
}

/// Bytes of request body the upstream received on connection `index`.
fn body_bytes(up: &RawUpstream, index: usize) -> usize {
    let head = up
        .requests()
        .iter()
        .find(|q| q.conn == index)
        .map_or(0, |q| q.raw_head.len());
    up.raw()[index].len().saturating_sub(head)
}

/// Starts an upload that declares [`DECLARED`] bytes, sends 256 KiB, waits until the upstream is receiving it,
/// then leaves (with a FIN, or an RST when `reset`). Returns the upstream connection index it used.
async fn abandon_upload(addr: SocketAddr, up: &RawUpstream, chunked: bool, reset: bool) -> usize {
    let seen = up.requests().len();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut bytes = if chunked {
        b"POST /api/v1/upload/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
    } else {
        format!("POST /api/v1/upload/ HTTP/1.1\r\nHost: x\r\nContent-Length: {DECLARED}\r\n\r\n").into_bytes()
    };
    for _ in 0..4 {
        if chunked {
            bytes.extend(b"10000\r\n");
        }
        bytes.extend([0xa5; 64 * 1024]);
        if chunked {
            bytes.extend(b"\r\n");
        }
    }
    stream.write_all(&bytes).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || up.requests().len() > seen).await,
        "the upload never reached the upstream"
    );
    let index = up.requests()[seen].conn;
    assert!(
        wait_until(Duration::from_secs(5), || body_bytes(up, index) > 0).await,
        "no upload bytes reached the upstream"
    );
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);
    index
}

/// Starts a download, reads its head and some body, then leaves.
async fn abandon_download(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/v1/download/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = 0;
    let mut chunk = vec![0u8; 64 * 1024];
    while got < 100_000 {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the download ended early");
        got += n;
    }
    drop(stream);
}

/// Waits until `progress` stops moving (three samples 100 ms apart agree), up to 15 s; returns where it stopped.
async fn stalled(progress: &AtomicUsize) -> usize {
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let (mut previous, mut same) = (usize::MAX, 0);
    loop {
        let now = progress.load(Ordering::SeqCst);
        if now == previous {
            same += 1;
            if same == 3 {
                return now;
            }
        } else {
            (previous, same) = (now, 0);
        }
        assert!(
            std::time::Instant::now() < end,
            "never stalled: {now} bytes and counting"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_caller_leaving_mid_upload_aborts_the_upstream_request() {
    bounded(async {
        let up = abort_upstream(Arc::default()).await;
        let h = static_proxy(&up).await;
        let cases = [(false, false), (false, true), (true, false), (true, true)];
        for (i, (chunked, reset)) in cases.into_iter().enumerate() {
            let index = abandon_upload(h.addr, &up, chunked, reset).await;
            let closed = i + 1;
            assert!(
                wait_until(Duration::from_secs(5), || up.peer_closed() == closed).await,
                "chunked {chunked}, reset {reset}: the upstream request stayed open after the caller left"
            );
            assert!(
                body_bytes(&up, index) < DECLARED,
                "the upstream got a whole body the caller never sent"
            );
        }
        up.assert_nothing_malformed();
        // Still serving.
        let r = raw_request(
            h.addr,
            b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.head);
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_caller_leaving_mid_upload_in_jwt_mode_aborts_the_upstream_request() {
    bounded(async {
        // JWT mode keeps the body for a replay as it streams; leaving must still abort the upstream request.
        let up = abort_upstream(Arc::default()).await;
        let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
        let text = format!(
            "[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\npassword = \"{DEMO_PASSWORD}\"\nurl = \"{}\"\n",
            mock.url()
        );
        let h = Harness::start_with(mock, &text, &up.url()).await;
        assert!(h.wait_ready(Duration::from_secs(5)).await);
        for (i, chunked) in [false, true].into_iter().enumerate() {
            let index = abandon_upload(h.addr, &up, chunked, false).await;
            assert!(
                wait_until(Duration::from_secs(5), || up.peer_closed() == i + 1).await,
                "chunked {chunked}: the upstream request stayed open after the caller left"
            );
            assert!(body_bytes(&up, index) < DECLARED);
        }
        up.assert_nothing_malformed();
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_caller_leaving_mid_download_closes_the_upstream_and_nothing_is_buffered_meanwhile() {
    bounded(async {
        let written = Arc::new(AtomicUsize::new(0));
        let up = abort_upstream(written.clone()).await;
        let h = static_proxy(&up).await;
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream
            .write_all(b"GET /api/v1/download/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = vec![0u8; 1024];
        let n = stream.read(&mut head).await.unwrap();
        assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200"));
        // The caller reads nothing more. The proxy must stop pulling from the upstream (backpressure) instead of
        // buffering the gigabyte: the upstream's writes stall once the socket buffers are full.
        let stalled = stalled(&written).await;
        assert!(
            stalled < 64 * 1024 * 1024,
            "the proxy pulled {stalled} bytes nobody read"
        );
        drop(stream);
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == 1).await,
            "the upstream download went on after the caller left"
        );
        assert!(written.load(Ordering::SeqCst) < 64 * 1024 * 1024);
        up.assert_nothing_malformed();
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_h2_stream_reset_mid_upload_aborts_only_that_upstream_request() {
    bounded(async {
        let up = abort_upstream(Arc::default()).await;
        let h = static_proxy(&up).await;
        let mut c = H2Raw::connect(h.addr).await;
        let upload = |id| {
            let mut out = frame(
                HEADERS,
                END_HEADERS,
                id,
                &request_block(
                    "POST",
                    "/api/v1/upload/",
                    "x",
                    &[("content-length", DECLARED.to_string().as_bytes())],
                ),
            );
            out.extend(frame(DATA, 0, id, &[0xa5; 16 * 1024]));
            out
        };
        c.send(&upload(1)).await;
        c.send(&upload(3)).await;
        assert!(wait_until(Duration::from_secs(5), || up.requests().len() == 2).await);
        // Cancel stream 1 only.
        c.send(&frame(RST_STREAM, 0, 1, &CANCEL.to_be_bytes())).await;
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == 1).await,
            "the cancelled stream's upstream request stayed open"
        );
        // The connection and its other stream live on: a new stream is answered...
        c.send(&frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            5,
            &request_block("GET", "/api/v1/docs/", "x", &[]),
        ))
        .await;
        let (frames, _) = c
            .collect_until(Duration::from_secs(5), |f| f.stream == 5 && f.flags & END_STREAM != 0)
            .await;
        assert!(
            frames
                .iter()
                .any(|f| f.stream == 5 && f.kind == DATA && f.payload == b"ok"),
            "{frames:?}"
        );
        assert_eq!(up.peer_closed(), 1, "stream 3's upload was aborted along with stream 1");
        // ...and when the caller's connection goes, the remaining upload is aborted too.
        drop(c);
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == 2).await,
            "the upload on a dropped h2 connection stayed open upstream"
        );
        up.assert_nothing_malformed();
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn abandoned_requests_leave_no_task_behind() {
    bounded(async {
        let metrics = tokio::runtime::Handle::current().metrics();
        let up = abort_upstream(Arc::default()).await;
        let h = static_proxy(&up).await;
        let r = raw_request(
            h.addr,
            b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(r.status, 200);
        assert!(wait_until(Duration::from_secs(5), || up.finished() == up.connections()).await);
        let baseline = metrics.num_alive_tasks();
        for i in 0..6 {
            abandon_upload(h.addr, &up, i % 2 == 0, i % 3 == 0).await;
            abandon_download(h.addr).await;
        }
        assert!(
            wait_until(Duration::from_secs(10), || up.peer_closed() == 12).await,
            "{} of 12 abandoned upstream requests closed",
            up.peer_closed()
        );
        assert!(
            wait_until(Duration::from_secs(10), || metrics.num_alive_tasks() <= baseline).await,
            "{} tasks alive, {baseline} before the abandoned requests",
            metrics.num_alive_tasks()
        );
        h.shutdown().await;
    })
    .await;
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn abandoned_requests_leave_no_fd_behind_in_the_binary() {
    bounded(async {
        let up = abort_upstream(Arc::default()).await;
        let proxy = Subprocess::start(&static_config(&up.url(), ""), &[]);
        let pid = proxy.child.id();
        let ask_ok = || async {
            let r = raw_request(
                proxy.addr,
                b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.head);
        };
        ask_ok().await;
        assert!(wait_until(Duration::from_secs(5), || up.finished() == up.connections()).await);
        let baseline = open_fds(pid);
        assert!(baseline > 0, "cannot read /proc/{pid}/fd");
        for i in 0..10 {
            abandon_upload(proxy.addr, &up, i % 2 == 0, i % 3 == 0).await;
            abandon_download(proxy.addr).await;
        }
        assert!(
            wait_until(Duration::from_secs(10), || up.peer_closed() == 20).await,
            "{} of 20 abandoned upstream requests closed",
            up.peer_closed()
        );
        assert!(
            wait_until(Duration::from_secs(10), || open_fds(pid) <= baseline).await,
            "{} fds open, {baseline} before the abandoned requests",
            open_fds(pid)
        );
        ask_ok().await;
        let admin = proxy.admin.unwrap();
        assert_eq!(send(admin, get(admin, "/healthz")).await.status, 200);
        up.assert_nothing_malformed();
    })
    .await;
}

#[tokio::test]
async fn a_caller_abort_is_not_counted_as_an_upstream_failure() {
    bounded(async {
        let up = abort_upstream(Arc::default()).await;
        let h = static_proxy(&up).await;
        abandon_upload(h.addr, &up, false, false).await;
        abandon_upload(h.addr, &up, true, true).await;
        assert!(wait_until(Duration::from_secs(5), || up.peer_closed() == 2).await);
        // The caller left; the upstream did nothing wrong. Alerts on upstream errors must not fire for this.
        // Wait until both requests are accounted for (or 5 s, if the proxy does not count them).
        let end = std::time::Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = String::from_utf8(send(h.admin, get(h.admin, "/metrics")).await.body.to_vec()).unwrap();
            if text.contains("zapsign_proxy_request_duration_seconds_count 2") || std::time::Instant::now() > end {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        for kind in ["connect", "protocol", "timeout"] {
            assert!(
                text.contains(&format!("zapsign_proxy_upstream_errors_total{{kind=\"{kind}\"}} 0")),
                "a caller abort was counted as an upstream failure:\n{text}"
            );
        }
        assert!(!text.contains("zapsign_proxy_requests_total{status=\"502\"}"), "{text}");
        h.shutdown().await;
    })
    .await;
}
