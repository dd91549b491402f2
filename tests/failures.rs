//! Issue 2: failures towards the upstream and from callers end in the contract's answers, never a hang.

mod common;

use std::time::{Duration, Instant};

use common::raw_upstream::{Conn, RawUpstream};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zapsign_proxy::mock::{MockConfig, MockZapSign};

#[tokio::test]
async fn closed_upstream_port_gives_502_json_within_a_second() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = "[auth]\nmode = \"static\"\napi_token = \"t\"\n";
    let h = Harness::start_with(mock, text, &closed_url).await;
    let start = Instant::now();
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    assert_proxy_error(&a, 502, "upstream_unreachable");
    assert!(a.headers.contains_key("x-request-id"));
    h.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_gives_504_json_naming_the_timeout() {
    let h = Harness::start_static("[upstream]\nresponse_timeout = \"300ms\"\n", MockConfig::default()).await;
    let start = Instant::now();
    let a = send(h.addr, get(h.addr, "/api/v1/__mock/slow/3000/")).await;
    assert_proxy_error(&a, 504, "upstream_timeout");
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("upstream.response_timeout"));
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    h.shutdown().await;
}

#[tokio::test]
async fn header_dribbling_client_is_disconnected_after_header_read_timeout() {
    let h = Harness::start_static("[server]\nheader_read_timeout = \"500ms\"\n", MockConfig::default()).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let start = Instant::now();
    stream
        .write_all(b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Dribble one header line every 100 ms, for up to 5 s, until the proxy hangs up.
    let mut closed_after = None;
    for i in 0..50 {
        let mut buf = [0u8; 512];
        tokio::select! {
            read = stream.read(&mut buf) => {
                // Either a 408 answer or a plain close ends the exchange; both mean cut off.
                let _ = read;
                closed_after = Some(start.elapsed());
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if stream.write_all(format!("X-Dribble-{i}: 1\r\n").as_bytes()).await.is_err() {
                    closed_after = Some(start.elapsed());
                    break;
                }
            }
        }
    }
    let closed_after = closed_after.expect("the dribbling client was never disconnected");
    assert!(
        closed_after >= Duration::from_millis(400),
        "cut off too early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(2),
        "cut off too late: {closed_after:?}"
    );
    assert_eq!(h.mock.state.records().len(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn silent_client_is_disconnected_after_header_read_timeout() {
    let h = Harness::start_static("[server]\nheader_read_timeout = \"300ms\"\n", MockConfig::default()).await;
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "connection still open: {read:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(250));
    h.shutdown().await;
}

#[tokio::test]
async fn status_codes_of_the_upstream_pass_through_unchanged() {
    let h = Harness::start_static("", MockConfig::default()).await;
    for status in [201u16, 204, 400, 402, 403, 404, 406, 429, 500, 503] {
        let a = send(h.addr, get(h.addr, &format!("/api/v1/__mock/status/{status}/"))).await;
        assert_eq!(a.status.as_u16(), status);
        assert!(a.headers.get("x-zapsign-proxy-error").is_none());
    }
    h.shutdown().await;
}

#[tokio::test]
async fn max_connections_holds_extra_callers_until_a_slot_frees() {
    let h = Harness::start_static("[server]\nmax_connections = 1\n", MockConfig::default()).await;
    let mut first = Caller::connect(h.addr).await;
    assert_eq!(first.send(get(h.addr, "/api/v1/docs/")).await.status, 200);
    // The second caller's connection waits in the backlog while the first keeps its slot.
    let addr = h.addr;
    let second = tokio::spawn(async move { send(addr, get(addr, "/api/v1/docs/")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "a second connection was served beyond max_connections = 1"
    );
    assert_eq!(h.mock.state.records().len(), 1);
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("served once a slot freed");
    assert_eq!(answer.unwrap().status, 200);
    h.shutdown().await;
}

#[tokio::test]
async fn a_download_read_slowly_outlives_header_read_timeout() {
    // The caller owes no request head while its response streams: only an idle connection is cut off.
    let h = Harness::start_static("[server]\nheader_read_timeout = \"300ms\"\n", MockConfig::default()).await;
    const SIZE: usize = 32 << 20; // beyond what the socket buffers on the way can hold
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    stream
        .write_all(format!("GET /api/v1/__mock/download/{SIZE}/ HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    let mut received = Vec::with_capacity(SIZE + 4096);
    let mut buf = vec![0u8; 512 << 10];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buf[..n]);
        let head_end = received.windows(4).position(|w| w == b"\r\n\r\n");
        if head_end.is_some_and(|end| received.len() - end - 4 >= SIZE) {
            break;
        }
        // A slow reader: the whole body takes well over header_read_timeout to arrive.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&received[..head_end])
    );
    assert!(
        start.elapsed() > Duration::from_millis(600),
        "the body came too fast to test anything"
    );
    assert_eq!(received.len() - head_end - 4, SIZE, "the download was cut off");
    h.shutdown().await;
}

/// Answers each request as soon as its head is in, then reads its body (as an API may answer a validation error
/// early).
async fn answer_before_the_body(mut conn: Conn) {
    while let Some((_, framing)) = conn.read_head().await {
        let answered = conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        if answered.is_err() || !conn.read_body(framing).await {
            return;
        }
    }
}

#[tokio::test]
async fn a_slow_upload_answered_early_is_not_cut_off_by_header_read_timeout() {
    // The upstream answers before the body is all there: the caller owes no head while its body is still being
    // read, only once both directions are done.
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = "[auth]\nmode = \"static\"\napi_token = \"t\"\n[server]\nheader_read_timeout = \"300ms\"\n";
    let up = RawUpstream::start(answer_before_the_body).await;
    let h = Harness::start_with(mock, text, &up.url()).await;
    let stream = TcpStream::connect(h.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    const CHUNKS: usize = 20;
    wr.write_all(
        format!(
            "POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            CHUNKS * 1000
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let start = Instant::now();
    for i in 0..CHUNKS {
        wr.write_all(&[b'u'; 1000])
            .await
            .unwrap_or_else(|e| panic!("upload cut off after {i} chunks ({:?}): {e}", start.elapsed()));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() > Duration::from_millis(900),
        "the upload was too quick to test anything"
    );
    // The same connection still serves the next request.
    wr.write_all(b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.windows(12).filter(|w| w == b"HTTP/1.1 200").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => {
                panic!(
                    "connection closed before the second answer: {:?}",
                    String::from_utf8_lossy(&got)
                )
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    up.assert_nothing_malformed();
    h.shutdown().await;
}
