//! Issue 5: hostile callers on raw sockets. For each trick the caller gets a clean 4xx (or the connection is
//! closed), the upstream receives nothing malformed (every byte it reads passes a strict HTTP/1.1 check), no other
//! host receives a connection, and the proxy keeps serving.
//!
//! The limits asserted are hyper's, as the server configures it (`src/server.rs`): HTTP/1.1 heads up to 100
//! header lines and a read buffer of 8 KiB + 400 KiB (431 beyond either), targets up to 65534 bytes (414);
//! HTTP/2 with `max_concurrent_streams(256)`, a 16 KiB header list, and h2's default of 20 reset-before-accept
//! streams before a GOAWAY `ENHANCE_YOUR_CALM` (the "rapid reset" guard).

mod common;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use common::h2_raw::*;
use common::raw_upstream::*;
use common::*;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use zapsign_proxy::mock::{MockConfig, MockZapSign};

/// The static token the proxy injects; it must reach the upstream only.
const TOKEN: &str = "static-secret-token-7f3a";

/// hyper's HTTP/1.1 read buffer limit (`DEFAULT_MAX_BUFFER_SIZE`): a head that does not fit gets 431.
const H1_MAX_HEAD: usize = 8192 + 4096 * 100;

/// Every test runs under this deadline: a hang is a failure, never a stuck CI.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("the test exceeded its deadline")
}

/// The proxy in front of a recording fake upstream, and a bystander standing for "any other host".
struct Stage {
    h: Harness,
    up: RawUpstream,
    other: Bystander,
}

async fn stage_with(up: RawUpstream, extra: &str) -> Stage {
    let other = Bystander::start().await;
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let text = format!("[auth]\nmode = \"static\"\napi_token = \"{TOKEN}\"\n{extra}");
    let h = Harness::start_with(mock, &text, &up.url()).await;
    Stage { h, up, other }
}

async fn stage(extra: &str) -> Stage {
    stage_with(RawUpstream::ok().await, extra).await
}

impl Stage {
    async fn exchange(&self, request: &[u8]) -> RawResponse {
        raw_request(self.h.addr, request, Duration::from_secs(5)).await
    }

    fn forwarded(&self) -> usize {
        self.up.requests().len()
    }

    /// Sends `request` and asserts a clean refusal: a status in `statuses`, the connection closed, and nothing
    /// forwarded.
    async fn refused(&self, request: &[u8], statuses: &[u16], what: &str) -> RawResponse {
        let before = self.forwarded();
        let r = self.exchange(request).await;
        assert!(
            statuses.contains(&r.status),
            "{what}: expected one of {statuses:?}, got {}:\n{}",
            r.status,
            r.head
        );
        assert!(r.closed, "{what}: the connection was left open after a refusal");
        assert!(
            !r.head.contains(TOKEN) && !String::from_utf8_lossy(&r.body).contains(TOKEN),
            "{what}: the token leaked into a refusal"
        );
        assert_eq!(
            self.forwarded(),
            before,
            "{what}: a refused request reached the upstream"
        );
        r
    }

    /// The end of every case: nothing malformed upstream, no other host contacted, the token went nowhere else,
    /// and the proxy still serves an ordinary request.
    async fn finish(self) {
        self.up.assert_nothing_malformed();
        assert_eq!(self.other.count(), 0, "another host received a connection");
        let r = self
            .exchange(b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(r.status, 200, "the proxy stopped serving: {}", r.head);
        for req in self.up.requests() {
            assert_eq!(
                req.header_all("authorization"),
                vec![format!("Bearer {TOKEN}")],
                "every forwarded request carries exactly the proxy's token"
            );
        }
        self.h.shutdown().await;
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_nothing_is_smuggled() {
    bounded(async {
        let s = stage("").await;
        // CL.TE: a front end trusting Content-Length would take the smuggled request as body, a back end trusting
        // chunked as a second request. hyper uses chunked, drops Content-Length and closes after answering.
        let smuggle = b"POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nContent-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n\
            0\r\n\r\nGET /api/v1/smuggled/ HTTP/1.1\r\nHost: x\r\n\r\n";
        let r = s.exchange(smuggle).await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.closed, "the connection must close after a request with both lengths");
        // TE.CL: the other order.
        let r = s
            .exchange(b"POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await;
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.closed);
        let seen = s.up.requests();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().all(|q| q.target == "/api/v1/docs/"), "a smuggled request got through: {seen:?}");
        assert!(seen.iter().all(|q| q.header("content-length").is_none()), "{seen:?}");
        assert_eq!(seen[0].body, b"");
        assert_eq!(seen[1].body, b"hello");
        // Transfer codings other than a final `chunked` are refused.
        for te in ["chunked, identity", "xchunked", "gzip", "chunked\r\nTransfer-Encoding: gzip"] {
            let req = format!("POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
            s.refused(req.as_bytes(), &[400, 501], te).await;
        }
        // HTTP/1.0 has no chunked coding.
        s.refused(
            b"POST /api/v1/docs/ HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &[400],
            "HTTP/1.0 with Transfer-Encoding",
        )
        .await;
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn duplicate_or_invalid_content_length_is_refused_and_an_identical_duplicate_is_sent_once() {
    bounded(async {
        let s = stage("").await;
        for (cl, what) in [
            ("Content-Length: 5\r\nContent-Length: 6", "differing duplicates"),
            ("Content-Length: 5, 6", "differing list"),
            ("Content-Length: +5", "signed"),
            ("Content-Length: 0x5", "hex"),
            ("Content-Length: 5 5", "two numbers"),
            ("Content-Length: -1", "negative"),
            ("Content-Length: 99999999999999999999999", "overflow"),
        ] {
            let req = format!("POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{cl}\r\n\r\nhello!");
            s.refused(req.as_bytes(), &[400], what).await;
        }
        let r = s
            .exchange(b"POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await;
        assert_eq!(r.status, 200, "{}", r.head);
        let seen = s.up.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].header_all("content-length"), vec!["5"]);
        assert_eq!(seen[0].body, b"hello");
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_chunk_sizes_get_400_or_a_close_and_the_upstream_never_gets_a_whole_request() {
    bounded(async {
        let s = stage("").await;
        let mut wrong = Vec::new();
        for (body, what) in [
            ("zz\r\nhello\r\n0\r\n\r\n", "not hex"),
            ("fffffffffffffffffff\r\nhello\r\n0\r\n\r\n", "overflowing size"),
            ("-5\r\nhello\r\n0\r\n\r\n", "negative size"),
            (
                "5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
                "valid chunk then invalid size",
            ),
            ("5\r\nhelloXX\r\n0\r\n\r\n", "chunk longer than its size"),
            ("5\nhello\n0\n\n", "bare LF in the chunked framing"),
        ] {
            let req = format!("POST /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
            let r = s.exchange(req.as_bytes()).await;
            assert!(r.closed, "{what}: connection left open");
            // The caller's body is at fault: the answer is a 400, or no answer and a closed connection; never a
            // 5xx that blames the upstream.
            if !(r.status == 400 || (r.status == 0 && r.closed)) {
                wrong.push(format!("{what}: {} {}", r.status, String::from_utf8_lossy(&r.body)));
            }
        }
        assert!(wrong.is_empty(), "expected 400 or a bare close:\n{}", wrong.join("\n"));
        // Whatever reached the upstream was cut short: no complete request carries a broken body.
        assert!(
            s.up.requests().iter().all(|q| !q.complete),
            "a request with a broken chunked body reached the upstream whole: {:?}",
            s.up.requests()
        );
        let metrics = send(s.h.admin, get(s.h.admin, "/metrics")).await;
        let text = String::from_utf8_lossy(&metrics.body);
        assert!(
            text.contains("zapsign_proxy_upstream_errors_total{kind=\"protocol\"} 0"),
            "a caller's broken body was counted as an upstream failure:\n{text}"
        );
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn obs_fold_bare_cr_nul_del_and_spaces_in_header_names_are_refused() {
    bounded(async {
        let s = stage("").await;
        for (head, what) in [
            ("X-Folded: a\r\n b", "obs-fold with a space"),
            ("X-Folded: a\r\n\tb", "obs-fold with a tab"),
            ("X-A: 1\rX-B: 2", "bare CR"),
            ("X-N: a\0b", "NUL in a value"),
            ("X-D: a\x7fb", "DEL in a value"),
            ("Bad Name: 1", "space inside a name"),
            ("Host : x", "space before the colon"),
            ("X-A\t: 1", "tab before the colon"),
            (" X-Lead: 1", "leading whitespace (obs-fold of the request line)"),
            ("X-(): 1", "separators in a name"),
            ("X-É: 1", "non-ASCII name"),
            (": empty", "empty name"),
            ("NoColon", "no colon"),
        ] {
            let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n");
            s.refused(req.as_bytes(), &[400], what).await;
        }
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn bare_lf_line_ends_are_refused_or_forwarded_with_crlf_only() {
    bounded(async {
        let s = stage("").await;
        for (req, what) in [
            (
                &b"GET /api/v1/docs/ HTTP/1.1\nHost: x\nX-A: 1\nConnection: close\n\n"[..],
                "bare LF head",
            ),
            (
                &b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\nX-A: 1\r\nConnection: close\n\r\n"[..],
                "mixed line ends",
            ),
        ] {
            let before = s.forwarded();
            let r = s.exchange(req).await;
            assert!(r.closed, "{what}");
            match r.status {
                400 => assert_eq!(s.forwarded(), before, "{what}: refused yet forwarded"),
                200 => {
                    let seen = s.up.requests();
                    assert_eq!(seen.len(), before + 1, "{what}");
                    assert!(seen[before].complete, "{what}");
                }
                other => panic!("{what}: expected 400 or 200, got {other}:\n{}", r.head),
            }
        }
        // `assert_nothing_malformed` in `finish` checks that every line the upstream read ended in CRLF.
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn a_head_over_the_size_limit_gets_431_and_a_long_target_414() {
    bounded(async {
        let s = stage("").await;
        // Exactly hyper's buffer of head bytes and no end of head: the server reads it all, then answers 431.
        let mut req = b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        req.resize(H1_MAX_HEAD, b'a');
        s.refused(&req, &[431], "head at the buffer limit without its end")
            .await;
        // A whole head well over the limit.
        let big = "a".repeat(H1_MAX_HEAD + 50_000);
        let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        let before = s.forwarded();
        let r = s.exchange(req.as_bytes()).await;
        // The server may close while our bytes are still arriving; then the kernel resets and the 431 can be lost.
        assert!(r.status == 431 || r.status == 0, "{}", r.head);
        assert!(r.closed);
        assert_eq!(s.forwarded(), before);
        // Many medium headers adding up past the limit.
        let lines: String = (0..60).map(|i| format!("X-M{i}: {}\r\n", "b".repeat(8000))).collect();
        let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{lines}\r\n");
        let r = s.exchange(req.as_bytes()).await;
        assert!(r.status == 431 || r.status == 0, "{}", r.head);
        assert!(r.closed);
        assert_eq!(s.forwarded(), before);
        // A request target longer than hyper's 65534 bytes.
        let req = format!("GET /api/v1/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
        s.refused(req.as_bytes(), &[414], "target over 64 KiB").await;
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn thousands_of_headers_get_431_and_the_limit_is_100_lines() {
    bounded(async {
        let s = stage("").await;
        let many: String = (0..3000).map(|i| format!("X-H{i}: v\r\n")).collect();
        let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{many}\r\n");
        let before = s.forwarded();
        let r = s.exchange(req.as_bytes()).await;
        assert!(r.status == 431 || r.status == 0, "{}", r.head);
        assert!(r.closed);
        assert_eq!(s.forwarded(), before);
        // 101 lines: one too many; sent whole in one write, read whole, answered 431.
        let lines: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
        let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{lines}\r\n");
        s.refused(req.as_bytes(), &[431], "101 header lines").await;
        // 100 lines (Host and 98 more and Connection) are served, and all of them reach the upstream.
        let lines: String = (0..98).map(|i| format!("X-H{i}: v\r\n")).collect();
        let req = format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\n{lines}Connection: close\r\n\r\n");
        let r = s.exchange(req.as_bytes()).await;
        assert_eq!(r.status, 200, "{}", r.head);
        let seen = s.up.requests().pop().unwrap();
        assert_eq!(seen.headers.iter().filter(|(n, _)| n.starts_with("x-h")).count(), 98);
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_in_values_is_opaque_bytes_and_never_breaks_a_rule() {
    bounded(async {
        let s = stage("").await;
        let req = b"GET /api/v1/docs/ HTTP/1.1\r\nHost: \xff\xfe\r\nX-Bin: \xff\xfe\xc3\x28 \x80\r\n\
            X-Request-Id: \xe2\x82\xac-id\r\nX-Forwarded-For: \xc3\x28\r\n\
            Authorization: Bearer \xff\r\nConnection: close\r\n\r\n";
        let r = s.exchange(req).await;
        assert_eq!(r.status, 200, "{}", r.head);
        let seen = s.up.requests().pop().unwrap();
        // obs-text (RFC 9110 §5.5) is passed on byte for byte...
        assert_eq!(seen.header_bytes("x-bin"), Some(&b"\xff\xfe\xc3\x28 \x80"[..]));
        // ...but never into the proxy's own fields: a fresh request id, a clean X-Forwarded-For, our token.
        let id = seen.header("x-request-id").unwrap();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        assert_eq!(r.header("x-request-id").as_deref(), Some(id.as_str()));
        assert_eq!(seen.header_all("x-forwarded-for"), vec!["127.0.0.1"]);
        assert_eq!(seen.header_all("host"), vec![s.up.addr.to_string()]);
        assert!(seen.header("connection").is_none());
        // Non-ASCII in the request target is refused.
        s.refused(
            b"GET /api/v1/\xff\xfe/ HTTP/1.1\r\nHost: x\r\n\r\n",
            &[400],
            "non-ASCII target",
        )
        .await;
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn absolute_form_and_connect_naming_other_hosts_are_refused() {
    bounded(async {
        let s = stage("").await;
        let other = s.other.addr;
        let up = s.up.addr;
        let targets = [
            format!("GET http://{other}/api/v1/docs/ HTTP/1.1"),
            format!("GET https://{other}/api/v1/docs/ HTTP/1.1"),
            format!("GET http://localhost:{}/api/v1/docs/ HTTP/1.1", other.port()),
            format!("GET http://{}:{}/api/v1/docs/ HTTP/1.1", up.ip(), other.port()),
            format!("GET http://{up}@{other}/api/v1/docs/ HTTP/1.1"),
            format!("GET http://user:pw@{up}/api/v1/docs/ HTTP/1.1"),
            format!("GET ftp://{other}/api/v1/docs/ HTTP/1.1"),
            format!("GET http://{up}.{other}/api/v1/docs/ HTTP/1.1"),
            format!("CONNECT {other} HTTP/1.1"),
            format!("CONNECT {up} HTTP/1.1"),
            format!("CONNECT {other}:443 HTTP/1.1"),
        ];
        for line in &targets {
            let req = format!("{line}\r\nHost: {other}\r\n\r\n");
            s.refused(req.as_bytes(), &[400], line).await;
        }
        // A fragment hides the rest: the path is empty, outside allow_paths (checked first), or the target is bad.
        let req = format!("GET http://{other}#@{up}/api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.refused(req.as_bytes(), &[400, 403], "fragment trick").await;
        // OPTIONS * has no path to forward under allow_paths.
        s.refused(
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            &[400, 403],
            "asterisk-form",
        )
        .await;
        assert_eq!(s.up.connections(), 0, "a refused request opened an upstream connection");
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn host_spoofing_never_chooses_the_destination() {
    bounded(async {
        let s = stage("").await;
        let other = s.other.addr;
        let up = s.up.addr;
        let heads = [
            format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: {other}"),
            format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: {other}\r\nHost: {up}"),
            format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: {up}@{other}"),
            format!("GET /api/v1/docs/ HTTP/1.1\r\nHost: {up}\r\nX-Forwarded-Host: {other}\r\nForwarded: host={other}"),
            format!("GET http://{up}/api/v1/docs/ HTTP/1.1\r\nHost: {other}"),
            "GET /api/v1/docs/ HTTP/1.1".to_owned(),
            "GET /api/v1/docs/ HTTP/1.1\r\nHost:".to_owned(),
        ];
        for head in &heads {
            let before = s.forwarded();
            let r = s
                .exchange(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
            match r.status {
                200 => {
                    let seen = &s.up.requests()[before];
                    assert_eq!(seen.header_all("host"), vec![up.to_string()], "{head}");
                    assert_eq!(seen.target, "/api/v1/docs/");
                }
                400 => assert_eq!(s.forwarded(), before, "{head}"),
                other => panic!("{head}: expected 200 or 400, got {other}"),
            }
        }
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn double_slash_and_at_sign_targets_stay_paths_on_the_upstream() {
    bounded(async {
        let s = stage("[access]\nallow_paths = [\"/\"]\n").await;
        let other = s.other.addr;
        let up = s.up.addr;
        let paths = [
            "//evil.example/api/v1/docs/".to_owned(),
            format!("//{other}/api/v1/docs/"),
            format!("//{up}@{other}/x"),
            format!("/@{other}/x"),
            format!("/api/v1/docs/@{other}"),
            format!("/%2F%2F{other}/"),
            format!("/api/v1/docs/?next=//{other}/&to=http://{other}/"),
        ];
        for path in &paths {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let r = s.exchange(req.as_bytes()).await;
            assert_eq!(r.status, 200, "{path}: {}", r.head);
            assert_eq!(
                &s.up.requests().pop().unwrap().target,
                path,
                "the path changed on the way"
            );
        }
        // A dot segment could resolve anywhere: refused with 400 before it is forwarded (issue 9).
        let req = format!("GET /..//{other}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.refused(req.as_bytes(), &[400], "dot segment before a double slash")
            .await;
        for target in [format!("@{other}/x"), format!("{other}/x"), format!("\\\\{other}\\x")] {
            let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            s.refused(req.as_bytes(), &[400], &target).await;
        }
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_a_refused_one_ends_the_connection() {
    bounded(async {
        let s = stage("").await;
        let other = s.other.addr;
        let req = format!(
            "GET /api/v1/one/ HTTP/1.1\r\nHost: x\r\nX-Request-Id: one\r\n\r\n\
             POST /api/v1/two/ HTTP/1.1\r\nHost: x\r\nX-Request-Id: two\r\nContent-Length: 5\r\n\r\nhello\
             POST /api/v1/three/ HTTP/1.1\r\nHost: x\r\nX-Request-Id: three\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
             GET http://{other}/api/v1/four/ HTTP/1.1\r\nHost: x\r\nX-Request-Id: four\r\n\r\n\
             GET /api/v1/five/ HTTP/1.1\r\nHost: x\r\nX-Request-Id: five\r\n\r\n"
        );
        let mut stream = TcpStream::connect(s.h.addr).await.unwrap();
        stream.write_all(req.as_bytes()).await.unwrap();
        let all = read_response(&mut stream, Duration::from_secs(5)).await;
        assert!(all.closed, "the connection stayed open after a refused request");
        let mut bytes = all.head.into_bytes();
        bytes.extend(all.body);
        let answers = split_responses(&bytes);
        let got: Vec<(u16, Option<String>)> = answers.iter().map(|a| (a.status, a.header("x-request-id"))).collect();
        assert_eq!(
            got,
            vec![
                (200, Some("one".into())),
                (200, Some("two".into())),
                (200, Some("three".into())),
                (400, Some("four".into())),
            ]
        );
        let seen: Vec<(String, Vec<u8>)> = s.up.requests().into_iter().map(|q| (q.target, q.body)).collect();
        assert_eq!(
            seen,
            vec![
                ("/api/v1/one/".to_owned(), b"".to_vec()),
                ("/api/v1/two/".to_owned(), b"hello".to_vec()),
                ("/api/v1/three/".to_owned(), b"abc".to_vec()),
            ],
            "nothing after the refused request may be forwarded"
        );
        s.finish().await;
    })
    .await;
}

/// One GET on stream `id`, ending the stream.
fn h2_get(id: u32, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_STREAM | END_HEADERS,
        id,
        &request_block("GET", path, "x", &[]),
    )
}

#[tokio::test]
async fn h2_settings_are_the_configured_limits() {
    bounded(async {
        let s = stage("").await;
        let c = H2Raw::connect(s.h.addr).await;
        assert_eq!(c.setting(SETTINGS_MAX_CONCURRENT_STREAMS), Some(256));
        assert_eq!(c.setting(SETTINGS_MAX_HEADER_LIST_SIZE), Some(16 * 1024));
        drop(c);
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn h2_rapid_reset_gets_goaway_enhance_your_calm() {
    bounded(async {
        let s = stage("").await;
        let mut c = H2Raw::connect(s.h.addr).await;
        // CVE-2023-44487: open and cancel streams as fast as possible, in one burst.
        let mut burst = Vec::new();
        for i in 0..500u32 {
            let id = 1 + 2 * i;
            burst.extend(h2_get(id, "/api/v1/docs/"));
            burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
        c.send(&burst).await;
        let (frames, _) = c.collect_until(Duration::from_secs(5), |f| f.kind == GOAWAY).await;
        let goaway = frames.iter().find(|f| f.kind == GOAWAY);
        assert_eq!(
            goaway.and_then(Frame::error_code),
            Some(ENHANCE_YOUR_CALM),
            "no GOAWAY ENHANCE_YOUR_CALM: {frames:?}"
        );
        let (_, closed) = c.collect_until(Duration::from_secs(5), |_| false).await;
        assert!(closed, "the connection stayed open after GOAWAY");
        // Streams reset before hyper accepted them never reach the upstream (in practice none does); whatever
        // did is checked well-formed by `finish`.
        assert!(
            s.up.requests().len() < 500,
            "every cancelled stream was forwarded anyway"
        );
        // Another h2 caller is served.
        let req = http::Request::get("/api/v1/docs/")
            .header("host", "x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send_h2c(s.h.addr, req).await.status, 200);
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn h2_streams_beyond_max_concurrent_streams_are_refused_and_closing_cancels_the_rest() {
    bounded(async {
        // An upstream that reads each request and never answers: every stream stays open.
        let up = RawUpstream::start(|mut conn| async move {
            if conn.read_head_recorded().await.is_some() {
                conn.until_closed().await;
            }
        })
        .await;
        let s = stage_with(up, "[upstream]\nresponse_timeout = \"60s\"\n").await;
        let mut c = H2Raw::connect(s.h.addr).await;
        let burst: Vec<u8> = (0..300u32).flat_map(|i| h2_get(1 + 2 * i, "/api/v1/docs/")).collect();
        c.send(&burst).await;
        let (frames, closed) = c
            .collect_until(Duration::from_secs(10), {
                let mut refused = 0;
                move |f| {
                    refused += usize::from(f.kind == RST_STREAM);
                    refused == 44
                }
            })
            .await;
        assert!(!closed);
        let refused: Vec<(u32, Option<u32>)> = frames
            .iter()
            .filter(|f| f.kind == RST_STREAM)
            .map(|f| (f.stream, f.error_code()))
            .collect();
        let expected: Vec<(u32, Option<u32>)> = (256..300u32).map(|i| (1 + 2 * i, Some(REFUSED_STREAM))).collect();
        assert_eq!(refused, expected, "exactly the streams beyond 256 are refused");
        assert!(
            wait_until(Duration::from_secs(10), || s.up.requests().len() == 256).await,
            "{} of 256 open streams reached the upstream",
            s.up.requests().len()
        );
        // The caller goes away: every one of the 256 upstream requests is cancelled.
        drop(c);
        assert!(
            wait_until(Duration::from_secs(10), || s.up.peer_closed() == 256).await,
            "{} of 256 upstream connections closed after the caller left",
            s.up.peer_closed()
        );
        assert_eq!(s.up.connections(), 256);
        s.up.assert_nothing_malformed();
        assert_eq!(s.other.count(), 0);
        s.h.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn h2_header_list_over_the_limit_gets_431_and_protocol_errors_end_the_connection() {
    bounded(async {
        let s = stage("").await;
        let other = s.other.addr;
        // 20 KiB of headers against the advertised 16 KiB: h2 answers 431 itself, the upstream sees nothing.
        let req = http::Request::get("/api/v1/docs/")
            .header("host", "x")
            .header("x-big", "a".repeat(20 * 1024))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send_h2c(s.h.addr, req).await.status, 431);
        assert_eq!(s.forwarded(), 0);
        // CONNECT over HTTP/2 is refused like over HTTP/1.1.
        let req = http::Request::connect(other.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = send_h2c(s.h.addr, req).await;
        assert_proxy_error(&a, 400, "bad_request");
        // A client-initiated stream with an even id is a connection error.
        let mut c = H2Raw::connect(s.h.addr).await;
        c.send(&h2_get(2, "/api/v1/docs/")).await;
        let (frames, _) = c.collect_until(Duration::from_secs(5), |f| f.kind == GOAWAY).await;
        assert_eq!(
            frames.iter().find(|f| f.kind == GOAWAY).and_then(Frame::error_code),
            Some(PROTOCOL_ERROR),
            "{frames:?}"
        );
        // A request without :path is refused; the connection goes on serving the next stream.
        let mut c = H2Raw::connect(s.h.addr).await;
        // :method GET, :scheme http (static table entries 2 and 6), and no :path.
        let block = [0x82, 0x86];
        c.send(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)).await;
        c.send(&h2_get(3, "/api/v1/docs/")).await;
        let (frames, _) = c
            .collect_until(Duration::from_secs(5), |f| f.stream == 3 && f.flags & END_STREAM != 0)
            .await;
        // h2 lets it through as path `/`, which allow_paths refuses (403); either way it never goes upstream.
        assert!(
            frames
                .iter()
                .any(|f| f.stream == 1 && (f.kind == RST_STREAM || f.kind == HEADERS)),
            "{frames:?}"
        );
        assert!(frames.iter().any(|f| f.stream == 3 && f.kind == DATA), "{frames:?}");
        assert_eq!(s.forwarded(), 1, "only the well-formed stream reaches the upstream");
        drop(c);
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn headers_named_by_connection_are_removed_even_beside_bytes_that_are_not_text() {
    bounded(async {
        let s = stage("").await;
        // RFC 9110 §7.6.1: a proxy MUST remove the fields the Connection header names. One non-ASCII byte in the
        // list must not make the whole list ignored.
        let r = s
            .exchange(b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nConnection: \xff, x-hop\r\nX-Hop: 1\r\nConnection: close\r\n\r\n")
            .await;
        match r.status {
            400 => assert_eq!(s.forwarded(), 0),
            200 => {
                let seen = s.up.requests().pop().unwrap();
                assert!(seen.header("x-hop").is_none(), "a header named by Connection was forwarded: {seen:?}");
            }
            other => panic!("expected 200 or 400, got {other}"),
        }
        s.finish().await;
    })
    .await;
}

#[tokio::test]
async fn a_get_with_a_body_of_unknown_length_reaches_the_upstream_with_its_body() {
    bounded(async {
        let s = stage("").await;
        // HTTP/1.1: chunked.
        let r = s
            .exchange(b"GET /api/v1/docs/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await;
        let seen = s.up.requests();
        let h1 = match r.status {
            400 => (seen.is_empty(), "refused".to_owned()),
            200 => (seen[0].body == b"abc", format!("forwarded with body {:?}", String::from_utf8_lossy(&seen[0].body))),
            other => (false, format!("answered {other}")),
        };
        // HTTP/2: DATA frames and no content-length.
        let mut c = H2Raw::connect(s.h.addr).await;
        c.send(&frame(HEADERS, END_HEADERS, 1, &request_block("GET", "/api/v1/docs/", "x", &[])))
            .await;
        c.send(&frame(DATA, END_STREAM, 1, b"abc")).await;
        let (frames, _) = c
            .collect_until(Duration::from_secs(5), |f| f.stream == 1 && f.flags & END_STREAM != 0)
            .await;
        let answered = frames.iter().any(|f| f.stream == 1 && f.kind == HEADERS);
        let seen = s.up.requests();
        let h2 = match seen.get(1) {
            Some(q) => (q.body == b"abc", format!("forwarded with body {:?}", String::from_utf8_lossy(&q.body))),
            None => (answered, "refused".to_owned()),
        };
        assert!(
            h1.0 && h2.0,
            "a GET body of unknown length must be forwarded whole (or the request refused): HTTP/1.1 {}, HTTP/2 {}",
            h1.1,
            h2.1
        );
        drop(c);
        s.finish().await;
    })
    .await;
}
