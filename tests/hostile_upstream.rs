//! Issue 5: a hostile or failing upstream, and a failing auth endpoint. Each fault ends in the contract's answer
//! within a bounded time (never a hang), the token appears in no answer, and the proxy recovers by itself as soon
//! as the upstream does. The upstream is a scripted raw TCP fake (`common::raw_upstream`): per connection it
//! answers, stalls, resets (SO_LINGER 0) or writes bytes no HTTP server should.

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::raw_upstream::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};

/// The static token the proxy injects; no answer may ever carry it.
const TOKEN: &str = "static-secret-token-9c1e";

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the test exceeded its deadline")
}

/// The proxy in static mode in front of `upstream_url`.
async fn proxy_to(upstream_url: &str, extra: &str) -> Harness {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = format!("[auth]\nmode = \"static\"\napi_token = \"{TOKEN}\"\n{extra}");
    Harness::start_with(mock, &text, upstream_url).await
}

const GET: &[u8] = b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
const POST: &[u8] = b"POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";

async fn ask(h: &Harness, request: &[u8]) -> RawResponse {
    let r = raw_request(h.addr, request, Duration::from_secs(10)).await;
    assert!(r.closed, "no end to the answer within 10 s: {}", r.head);
    for part in [r.head.as_bytes(), &r.body[..]] {
        assert!(
            !String::from_utf8_lossy(part).contains(TOKEN),
            "the token leaked into an answer: {}",
            r.head
        );
    }
    r
}

/// Asserts a proxy-own error on a raw answer.
fn assert_error(r: &RawResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}{}", r.head, String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-zapsign-proxy-error").as_deref(), Some(code), "{}", r.head);
    let json: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error body");
    assert_eq!(json["error"], code);
    assert!(r.header("x-request-id").is_some());
}

/// Serves every request on `conn` with `200 ok`.
async fn serve_ok(mut conn: Conn) {
    while conn.read_request().await.is_some() {
        if conn.write(OK_RESPONSE).await.is_err() {
            return;
        }
    }
}

/// The request works again, end to end, with the token injected.
async fn assert_recovered(h: &Harness, up: &RawUpstream) {
    let r = ask(h, GET).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.body, b"ok");
    let last = up.requests().pop().unwrap();
    assert_eq!(last.header_all("authorization"), vec![format!("Bearer {TOKEN}")]);
    up.assert_nothing_malformed();
}

async fn metrics(h: &Harness) -> String {
    String::from_utf8(send(h.admin, get(h.admin, "/metrics")).await.body.to_vec()).unwrap()
}

#[tokio::test]
async fn connection_refused_gives_502_at_once_and_recovers_when_the_upstream_listens_again() {
    bounded(async {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let h = proxy_to(&format!("http://{addr}"), "").await;
        for _ in 0..3 {
            let start = Instant::now();
            let r = ask(&h, POST).await;
            assert_error(&r, 502, "upstream_unreachable");
            assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        }
        assert!(metrics(&h)
            .await
            .contains("zapsign_proxy_upstream_errors_total{kind=\"connect\"} 3"));
        // The upstream comes back on the same address: the next request goes through, no restart needed.
        let up = RawUpstream::start_on(TcpListener::bind(addr).await.unwrap(), serve_ok);
        assert_recovered(&h, &up).await;
        assert_eq!(up.requests().len(), 1, "a failed request was replayed later");
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reset_or_close_before_response_headers_gives_502_and_is_not_retried() {
    bounded(async {
        let up = RawUpstream::start(|mut conn| async move {
            match conn.index {
                0 | 1 => {
                    if conn.read_request().await.is_some() {
                        if conn.index == 0 {
                            conn.reset();
                        } else {
                            conn.close();
                        }
                    }
                }
                _ => serve_ok(conn).await,
            }
        })
        .await;
        let h = proxy_to(&up.url(), "").await;
        for what in ["reset", "close"] {
            let start = Instant::now();
            let r = ask(&h, POST).await;
            assert_error(&r, 502, "upstream_unreachable");
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{what}: took {:?}",
                start.elapsed()
            );
        }
        // Each POST reached the upstream once and only once: no silent retry of a request that may have acted.
        let seen = up.requests();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().all(|q| q.body == b"hello" && q.complete));
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reset_mid_body_reaches_the_caller_as_a_cut_answer_not_a_hang() {
    bounded(async {
        let go = Arc::new(Notify::new());
        let script_go = go.clone();
        let up = RawUpstream::start(move |mut conn| {
            let go = script_go.clone();
            async move {
                let head: &[u8] = match conn.index {
                    0 => b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n",
                    1 => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3e8\r\n",
                    _ => return serve_ok(conn).await,
                };
                if conn.read_request().await.is_none() {
                    return;
                }
                let _ = conn.write(head).await;
                let _ = conn.write(&[b'x'; 1000]).await;
                // Reset once the caller has seen the start of the answer.
                go.notified().await;
                conn.reset();
            }
        })
        .await;
        let h = proxy_to(&up.url(), "").await;
        for framing in ["content-length", "chunked"] {
            let start = Instant::now();
            let mut stream = TcpStream::connect(h.addr).await.unwrap();
            stream.write_all(GET).await.unwrap();
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while !seen.windows(10).any(|w| w == b"xxxxxxxxxx") {
                use tokio::io::AsyncReadExt;
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "{framing}: closed before the body started");
                seen.extend_from_slice(&chunk[..n]);
            }
            go.notify_one();
            let rest = read_response(&mut stream, Duration::from_secs(5)).await;
            assert!(
                rest.closed,
                "{framing}: the caller was left hanging after the upstream reset"
            );
            seen.extend(rest.head.as_bytes());
            seen.extend(rest.body);
            let text = String::from_utf8_lossy(&seen);
            assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
            let body_len = seen.iter().filter(|b| **b == b'x').count();
            match framing {
                "content-length" => {
                    assert!(text.contains("content-length: 100000"));
                    assert!(body_len < 100_000, "{body_len}");
                }
                _ => {
                    assert!(text.contains("transfer-encoding: chunked"));
                    assert!(!text.ends_with("0\r\n\r\n"), "a cut chunked body was completed: {text}");
                }
            }
            assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        }
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn slow_response_headers_give_504_and_the_proxy_hangs_up_on_the_upstream() {
    bounded(async {
        let up = RawUpstream::start(|mut conn| async move {
            if conn.index == 0 {
                if conn.read_request().await.is_some() {
                    conn.until_closed().await;
                }
            } else {
                serve_ok(conn).await;
            }
        })
        .await;
        let h = proxy_to(&up.url(), "[upstream]\nresponse_timeout = \"300ms\"\n").await;
        let start = Instant::now();
        let r = ask(&h, GET).await;
        let took = start.elapsed();
        assert_error(&r, 504, "upstream_timeout");
        assert!(String::from_utf8_lossy(&r.body).contains("upstream.response_timeout"));
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // The abandoned upstream request is not left open.
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == 1).await,
            "the proxy kept the timed-out upstream connection open"
        );
        assert!(metrics(&h)
            .await
            .contains("zapsign_proxy_upstream_errors_total{kind=\"timeout\"} 1"));
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_slow_body_streams_through_as_it_arrives_and_ends_whole() {
    bounded(async {
        let go = Arc::new(Notify::new());
        let script_go = go.clone();
        let up = RawUpstream::start(move |mut conn| {
            let go = script_go.clone();
            async move {
                if conn.read_request().await.is_none() {
                    return;
                }
                let _ = conn.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello").await;
                // The rest only after the caller got the first half: the proxy must not wait for the whole body.
                go.notified().await;
                let _ = conn.write(b"world").await;
                conn.until_closed().await;
            }
        })
        .await;
        // The response timeout covers the head only; the body may take longer.
        let h = proxy_to(&up.url(), "[upstream]\nresponse_timeout = \"300ms\"\n").await;
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !seen.ends_with(b"hello") {
            use tokio::io::AsyncReadExt;
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("the first half of the body was held back")
                .unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&chunk[..n]);
        }
        // Past the response timeout: a body in progress is not cut by it.
        tokio::time::sleep(Duration::from_millis(400)).await;
        go.notify_one();
        let rest = read_response(&mut stream, Duration::from_secs(5)).await;
        assert!(rest.closed);
        seen.extend(rest.head.as_bytes());
        let text = String::from_utf8_lossy(&seen);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.ends_with("helloworld"), "{text}");
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn huge_response_heads_give_502_and_the_next_request_succeeds() {
    bounded(async {
        let up = RawUpstream::start(|mut conn| async move {
            let head = match conn.index {
                0 => {
                    let mut s = b"HTTP/1.1 200 OK\r\n".to_vec();
                    for i in 0..500 {
                        s.extend(format!("x-h{i}: v\r\n").bytes());
                    }
                    s
                }
                1 => {
                    let mut s = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
                    s.extend(std::iter::repeat_n(b'a', 600_000));
                    s.extend(b"\r\n");
                    s
                }
                _ => return serve_ok(conn).await,
            };
            if conn.read_request().await.is_some() {
                let mut head = head;
                head.extend(b"content-length: 0\r\n\r\n");
                let _ = conn.write(&head).await;
                conn.until_closed().await;
            }
        })
        .await;
        let h = proxy_to(&up.url(), "").await;
        for what in ["500 header lines", "a 600 KB header"] {
            let r = ask(&h, GET).await;
            assert_error(&r, 502, "upstream_unreachable");
            assert!(
                String::from_utf8_lossy(&r.body).contains("too large"),
                "{what}: {:?}",
                r.body
            );
        }
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == 2).await,
            "the proxy kept a connection whose answer it refused"
        );
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

/// Answers no HTTP/1.1 client may accept, one per connection, in order.
const BROKEN_ANSWERS: &[(&str, &[u8])] = &[
    ("status not a number", b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n"),
    ("status of two digits", b"HTTP/1.1 99 Low\r\ncontent-length: 0\r\n\r\n"),
    (
        "status of four digits",
        b"HTTP/1.1 2000 Big\r\ncontent-length: 0\r\n\r\n",
    ),
    ("no status line", b"garbage\r\n\r\n"),
    ("binary", b"\x00\x01\x02\xff\xfe\r\n\r\n"),
    ("unknown version", b"HTTP/9.9 200 OK\r\ncontent-length: 0\r\n\r\n"),
    ("an HTTP/2 frame", b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
    (
        "conflicting lengths",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk",
    ),
    (
        "header without colon",
        b"HTTP/1.1 200 OK\r\nbroken header\r\ncontent-length: 0\r\n\r\n",
    ),
    (
        "NUL in a header",
        b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 0\r\n\r\n",
    ),
];

#[tokio::test]
async fn invalid_status_lines_and_framing_give_502_and_the_next_request_succeeds() {
    bounded(async {
        let up = RawUpstream::start(|mut conn| async move {
            let Some((_, answer)) = BROKEN_ANSWERS.get(conn.index) else {
                return serve_ok(conn).await;
            };
            if conn.read_request().await.is_some() {
                let _ = conn.write(answer).await;
                conn.until_closed().await;
            }
        })
        .await;
        let h = proxy_to(&up.url(), "").await;
        let mut wrong = Vec::new();
        for (what, _) in BROKEN_ANSWERS {
            let r = ask(&h, GET).await;
            if r.status != 502 || r.header("x-zapsign-proxy-error").as_deref() != Some("upstream_unreachable") {
                wrong.push(format!("{what}: {}", r.head));
            }
        }
        assert!(
            wrong.is_empty(),
            "expected 502 upstream_unreachable:\n{}",
            wrong.join("\n")
        );
        assert!(
            wait_until(Duration::from_secs(5), || up.peer_closed() == BROKEN_ANSWERS.len()).await,
            "{} of {} broken upstream connections were closed",
            up.peer_closed(),
            BROKEN_ANSWERS.len()
        );
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn an_unasked_101_switching_protocols_is_not_passed_to_the_caller() {
    bounded(async {
        // RFC 9110 §15.2.2: a server must not send 101 to a request that asked for no upgrade. The caller asked
        // for none either, and the proxy tunnels nothing: the upstream broke the protocol (502).
        let up = RawUpstream::start(|mut conn| async move {
            if conn.index > 0 {
                return serve_ok(conn).await;
            }
            if conn.read_request().await.is_some() {
                let _ = conn
                    .write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\nconnection: upgrade\r\n\r\nraw bytes")
                    .await;
                conn.until_closed().await;
            }
        })
        .await;
        let h = proxy_to(&up.url(), "").await;
        let r = ask(&h, GET).await;
        assert_error(&r, 502, "upstream_unreachable");
        assert_recovered(&h, &up).await;
        h.shutdown().await;
    })
    .await;
}

// ---- the auth endpoint (JWT mode) ----

/// What the fake auth endpoint does with each login or refresh.
#[derive(Clone)]
enum Reply {
    /// 200 with these tokens.
    Tokens(String),
    /// These bytes, then close.
    Raw(Vec<u8>),
    /// Reset the connection.
    Reset,
    /// Read the request and never answer.
    Hang,
}

struct Auth {
    server: RawUpstream,
    reply: Arc<Mutex<Reply>>,
}

impl Auth {
    async fn start(first: Reply) -> Self {
        let reply = Arc::new(Mutex::new(first));
        let shared = reply.clone();
        let server = RawUpstream::start(move |mut conn| {
            let shared = shared.clone();
            async move {
                if conn.read_request().await.is_none() {
                    return;
                }
                let reply = shared.lock().unwrap().clone();
                match reply {
                    Reply::Tokens(access) => {
                        let body = serde_json::json!({ "access": access, "refresh": format!("refresh-{access}") }).to_string();
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write(answer.as_bytes()).await;
                    }
                    Reply::Raw(bytes) => {
                        let _ = conn.write(&bytes).await;
                    }
                    Reply::Reset => conn.reset(),
                    Reply::Hang => {
                        conn.until_closed().await;
                    }
                }
            }
        })
        .await;
        Self { server, reply }
    }

    fn set(&self, reply: Reply) {
        *self.reply.lock().unwrap() = reply;
    }

    /// Logins and refreshes received.
    fn calls(&self) -> usize {
        self.server.requests().len()
    }
}

/// The proxy in JWT mode, logging in at `auth` and forwarding to a mock that accepts `accepted` as its token.
async fn jwt_proxy(auth: &Auth, accepted: &str, extra: &str) -> Harness {
    let mock = MockZapSign::start(MockConfig {
        api_token: Some(accepted.to_owned()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let text = format!(
        "[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\npassword = \"{DEMO_PASSWORD}\"\nurl = \"{}\"\n{extra}",
        auth.server.url()
    );
    let url = mock.url();
    Harness::start_with(mock, &text, &url).await
}

/// A `200 OK` JSON answer with `body`, closing the connection.
fn json_200(body: &str) -> Reply {
    Reply::Raw(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

/// While the auth endpoint fails, callers get 503 token_unavailable with Retry-After at once and nothing reaches
/// the upstream; once it answers again the proxy becomes ready by itself and injects the new token.
async fn fails_then_recovers(bad: Reply, extra: &str) {
    let auth = Auth::start(bad).await;
    let h = jwt_proxy(&auth, "recovered-access", extra).await;
    assert!(
        wait_until(Duration::from_secs(5), || auth.calls() >= 1).await,
        "no login attempt"
    );
    let start = Instant::now();
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_proxy_error(&a, 503, "token_unavailable");
    assert!(a.headers.contains_key("retry-after"));
    let body = String::from_utf8_lossy(&a.body);
    assert!(!body.contains(DEMO_PASSWORD), "{body}");
    assert_eq!(send(h.admin, get(h.admin, "/readyz")).await.status, 503);
    assert_eq!(
        h.mock.state.records().len(),
        0,
        "a request reached the upstream without a token"
    );
    let text = metrics(&h).await;
    assert!(
        !text.contains("zapsign_proxy_token_renewals_total{kind=\"login\",result=\"error\"} 0"),
        "{text}"
    );
    auth.set(Reply::Tokens("recovered-access".into()));
    assert!(
        h.wait_ready(Duration::from_secs(8)).await,
        "the proxy did not recover by itself"
    );
    let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = h.mock.state.records().pop().unwrap();
    assert_eq!(seen.header("authorization"), Some("Bearer recovered-access"));
    auth.server.assert_nothing_malformed();
    h.shutdown().await;
}

#[tokio::test]
async fn auth_answering_200_with_an_empty_body_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(json_200(""), "")).await;
}

#[tokio::test]
async fn auth_answering_garbage_json_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(json_200("<html>oops</html>{\"access\":"), "")).await;
}

#[tokio::test]
async fn auth_answering_json_without_tokens_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(json_200(r#"{"detail":"ok","refresh":"r"}"#), "")).await;
}

#[tokio::test]
async fn auth_answering_a_token_no_header_can_carry_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(
        json_200(r#"{"access":"a\r\nx-evil: 1","refresh":"r"}"#),
        "",
    ))
    .await;
}

#[tokio::test]
async fn auth_answering_5xx_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(
        Reply::Raw(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()),
        "",
    ))
    .await;
}

#[tokio::test]
async fn auth_resetting_connections_gives_503_until_it_recovers() {
    bounded(fails_then_recovers(Reply::Reset, "")).await;
}

#[tokio::test]
async fn auth_timing_out_gives_503_in_bounded_time_and_recovers() {
    bounded(async {
        // Each auth call is bounded by auth.timeout, whatever upstream.response_timeout (120 s by default) says.
        fails_then_recovers(Reply::Hang, "timeout = \"500ms\"\n").await;
    })
    .await;
}

#[tokio::test]
async fn a_hung_auth_call_is_abandoned_not_leaked() {
    bounded(async {
        let auth = Auth::start(Reply::Hang).await;
        let h = jwt_proxy(&auth, "x", "timeout = \"300ms\"\n").await;
        assert!(wait_until(Duration::from_secs(5), || auth.calls() >= 1).await);
        assert!(
            wait_until(Duration::from_secs(5), || auth.server.peer_closed() >= 1).await,
            "the proxy never gave up the hung auth connection"
        );
        // The timeout is counted as a failed login (the count is written just after the connection closes).
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let text = metrics(&h).await;
            if !text.contains("zapsign_proxy_token_renewals_total{kind=\"login\",result=\"error\"} 0") {
                break;
            }
            assert!(
                Instant::now() < end,
                "the hung login was never counted as failed:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_token_without_exp_gets_the_documented_hour() {
    bounded(async {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.c2ln",
            b64(r#"{"typ":"JWT","alg":"HS256"}"#),
            b64(r#"{"token_type":"access","user_id":1}"#)
        );
        let auth = Auth::start(Reply::Tokens(token.clone())).await;
        let h = jwt_proxy(&auth, &token, "").await;
        assert!(h.wait_ready(Duration::from_secs(5)).await);
        let text = metrics(&h).await;
        let expires: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("zapsign_proxy_token_expires_in_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(expires > 3500.0 && expires <= 3600.0, "{expires}");
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        assert_eq!(a.status, 200);
        let seen = h.mock.state.records().pop().unwrap();
        assert_eq!(seen.header("authorization"), Some(format!("Bearer {token}").as_str()));
        // One login, no refresh storm.
        assert_eq!(auth.calls(), 1);
        h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn flapping_auth_up_down_up_is_ridden_out_without_a_restart() {
    bounded(async {
        let auth = Auth::start(Reply::Tokens("access-a".into())).await;
        let h = jwt_proxy(&auth, "access-a", "").await;
        assert!(h.wait_ready(Duration::from_secs(5)).await);
        assert_eq!(send(h.addr, get(h.addr, "/api/v1/docs/")).await.status, 200);

        // ZapSign revokes the token and its auth endpoint goes down: first a 503, then resets.
        h.mock.state.update_config(|c| c.api_token = Some("access-b".into()));
        auth.set(Reply::Raw(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
        ));
        let before = auth.calls();
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        assert_proxy_error(&a, 503, "token_unavailable");
        assert!(a.headers.contains_key("retry-after"));
        assert_eq!(auth.calls(), before + 1, "one renewal for the rejected token");
        auth.set(Reply::Reset);
        assert!(
            wait_until(Duration::from_secs(5), || auth.calls() >= before + 2).await,
            "the proxy stopped retrying by itself"
        );
        assert_eq!(send(h.admin, get(h.admin, "/readyz")).await.status, 503);

        // Back up: the proxy picks the new token up by itself.
        auth.set(Reply::Tokens("access-b".into()));
        assert!(
            h.wait_ready(Duration::from_secs(10)).await,
            "no recovery after the auth endpoint came back"
        );
        let a = send(h.addr, get(h.addr, "/api/v1/docs/")).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let seen = h.mock.state.records();
        assert_eq!(seen.last().unwrap().header("authorization"), Some("Bearer access-b"));
        // The rejected token was sent once, and never again after ZapSign refused it.
        let with_a = seen
            .iter()
            .filter(|r| r.header("authorization") == Some("Bearer access-a"))
            .count();
        assert_eq!(with_a, 2, "the refused token was injected again");
        auth.server.assert_nothing_malformed();
        h.shutdown().await;
    })
    .await;
}
