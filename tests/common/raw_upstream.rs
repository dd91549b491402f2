//! A scriptable raw-TCP fake upstream (or fake auth server) for failure cases: each accepted connection runs a
//! script that reads requests byte for byte and writes exact bytes back, delays, half-answers or resets.
//!
//! Every request read is checked against strict HTTP/1.1 framing (CRLF line ends only, token header names, no
//! obs-fold, one length: `Content-Length` or `Transfer-Encoding: chunked`, never both), so a test can assert
//! that the upstream "received nothing malformed". The fake also counts connections accepted and connections the
//! peer (the proxy) closed, so a test can assert that a cancelled request closed its upstream connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One request as the fake upstream read it off the wire.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Index of the connection it came on (0 for the first accepted).
    pub conn: usize,
    /// Method.
    pub method: String,
    /// Request target, as sent.
    pub target: String,
    /// Headers, names lower-case, values as raw bytes, in arrival order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The head exactly as received, up to and including the blank line.
    pub raw_head: Vec<u8>,
    /// The body, decoded from its framing (chunked bodies are de-chunked).
    pub body: Vec<u8>,
    /// Whether the body arrived whole (false: the peer closed or reset mid-body).
    pub complete: bool,
}

impl RawRequest {
    /// Every value of header `name` (lower-case), as text (lossy).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The first value of header `name` (lower-case), as text (lossy).
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }

    /// The first value of header `name`, as raw bytes.
    pub fn header_bytes(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, Default)]
struct Shared {
    accepted: AtomicUsize,
    peer_closed: AtomicUsize,
    finished: AtomicUsize,
    requests: Mutex<Vec<RawRequest>>,
    malformed: Mutex<Vec<String>>,
    raw: Mutex<Vec<Vec<u8>>>,
}

/// A running fake upstream.
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    /// Starts a fake on 127.0.0.1 with a free port; every accepted connection runs `script`.
    pub async fn start<F, Fut>(script: F) -> Self
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
        Self::start_on(listener, script)
    }

    /// Starts a fake on an already-bound listener.
    pub fn start_on<F, Fut>(listener: TcpListener, script: F) -> Self
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let index = state.accepted.fetch_add(1, Ordering::SeqCst);
                state.raw.lock().unwrap().push(Vec::new());
                let conn = Conn {
                    index,
                    stream: Some(stream),
                    buf: Vec::new(),
                    shared: state.clone(),
                    peer_closed: false,
                };
                let fut = script(conn);
                let state = state.clone();
                tasks.push(AbortOnDrop(tokio::spawn(async move {
                    fut.await;
                    state.finished.fetch_add(1, Ordering::SeqCst);
                })));
            }
        });
        Self { addr, shared, task }
    }

    /// A fake that answers every request `200 OK` with body `ok`, keeping connections alive.
    pub async fn ok() -> Self {
        Self::start(|mut conn| async move {
            while conn.read_request().await.is_some() {
                if conn.write(OK_RESPONSE).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    /// `http://addr`, for `upstream.url` or `auth.url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose peer closed or reset them, as seen by a read.
    pub fn peer_closed(&self) -> usize {
        self.shared.peer_closed.load(Ordering::SeqCst)
    }

    /// Connection scripts that have returned.
    pub fn finished(&self) -> usize {
        self.shared.finished.load(Ordering::SeqCst)
    }

    /// Requests whose head was read (whole or not), oldest first.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Why requests read were malformed; empty when every byte received was well-formed HTTP/1.1.
    pub fn malformed(&self) -> Vec<String> {
        self.shared.malformed.lock().unwrap().clone()
    }

    /// Every byte received, per connection.
    pub fn raw(&self) -> Vec<Vec<u8>> {
        self.shared.raw.lock().unwrap().clone()
    }

    /// Panics unless everything the fake read was well-formed.
    pub fn assert_nothing_malformed(&self) {
        let bad = self.malformed();
        assert!(bad.is_empty(), "the upstream received malformed HTTP: {bad:?}");
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A plain `200 OK` with a two-byte body, keeping the connection alive.
pub const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok";

/// One accepted connection, driven by a script.
pub struct Conn {
    /// Index of this connection (0 for the first accepted).
    pub index: usize,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    shared: Arc<Shared>,
    peer_closed: bool,
}

impl Conn {
    fn stream(&mut self) -> &mut TcpStream {
        self.stream.as_mut().expect("connection already reset")
    }

    /// Reads more bytes into the buffer; false when the peer closed or reset.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let read = self.stream().read(&mut chunk).await;
        match read {
            Ok(n) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                self.shared.raw.lock().unwrap()[self.index].extend_from_slice(&chunk[..n]);
                true
            }
            _ => {
                self.mark_closed();
                false
            }
        }
    }

    fn mark_closed(&mut self) {
        if !self.peer_closed {
            self.peer_closed = true;
            self.shared.peer_closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn malformed(&self, why: String) {
        self.shared.malformed.lock().unwrap().push(why);
    }

    /// Reads one request head (and no body); `None` when the peer closed first or the head is malformed.
    pub async fn read_head(&mut self) -> Option<(RawRequest, Framing)> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n").or_else(|| find(&self.buf, b"\n\n")) {
                let head: Vec<u8> = self
                    .buf
                    .drain(..end + if self.buf[end] == b'\r' { 4 } else { 2 })
                    .collect();
                return match check_head(&head) {
                    Ok((method, target, headers, framing)) => Some((
                        RawRequest {
                            conn: self.index,
                            method,
                            target,
                            headers,
                            raw_head: head,
                            body: Vec::new(),
                            complete: matches!(framing, Framing::None),
                        },
                        framing,
                    )),
                    Err(why) => {
                        self.malformed(format!("{why}: {:?}", String::from_utf8_lossy(&head)));
                        None
                    }
                };
            }
            if !self.fill().await {
                if !self.buf.is_empty() {
                    self.malformed(format!(
                        "connection closed inside a request head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
                return None;
            }
        }
    }

    /// Reads one whole request, records it and returns it; `None` when the peer closed before a head. A body cut
    /// short by the peer is recorded with `complete == false` and `None` is returned.
    pub async fn read_request(&mut self) -> Option<RawRequest> {
        let (mut req, framing) = self.read_head().await?;
        let complete = match framing {
            Framing::None => true,
            Framing::Length(n) => self.read_exact_body(n, &mut req.body).await,
            Framing::Chunked => self.read_chunked(&mut req.body).await,
        };
        req.complete = complete;
        self.shared.requests.lock().unwrap().push(req.clone());
        complete.then_some(req)
    }

    /// Reads the body of a request whose head `read_head` returned (after answering it early, say); false when
    /// the peer closed or reset mid-body.
    pub async fn read_body(&mut self, framing: Framing) -> bool {
        let mut body = Vec::new();
        match framing {
            Framing::None => true,
            Framing::Length(n) => self.read_exact_body(n, &mut body).await,
            Framing::Chunked => self.read_chunked(&mut body).await,
        }
    }

    /// Reads a head, records the request with no body read, and returns it with its framing.
    pub async fn read_head_recorded(&mut self) -> Option<(RawRequest, Framing)> {
        let (req, framing) = self.read_head().await?;
        self.shared.requests.lock().unwrap().push(req.clone());
        Some((req, framing))
    }

    async fn read_exact_body(&mut self, n: usize, out: &mut Vec<u8>) -> bool {
        while self.buf.len() < n {
            if !self.fill().await {
                out.extend_from_slice(&self.buf);
                self.buf.clear();
                return false;
            }
        }
        out.extend(self.buf.drain(..n));
        true
    }

    async fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\n") {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.len() < 2 || line[line.len() - 2] != b'\r' {
                    self.malformed(format!(
                        "bare LF in chunked framing: {:?}",
                        String::from_utf8_lossy(&line)
                    ));
                }
                return Some(line[..line.len().saturating_sub(2)].to_vec());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn read_chunked(&mut self, out: &mut Vec<u8>) -> bool {
        loop {
            let Some(line) = self.read_line().await else {
                return false;
            };
            let size_text = String::from_utf8_lossy(&line);
            let size_text = size_text.split(';').next().unwrap_or("").trim().to_owned();
            let Ok(size) = usize::from_str_radix(&size_text, 16) else {
                self.malformed(format!("invalid chunk size line: {:?}", String::from_utf8_lossy(&line)));
                return false;
            };
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    match self.read_line().await {
                        Some(l) if l.is_empty() => return true,
                        Some(_) => {}
                        None => return false,
                    }
                }
            }
            let mut data = Vec::new();
            if !self.read_exact_body(size, &mut data).await {
                out.extend(data);
                return false;
            }
            out.extend(data);
            match self.read_line().await {
                Some(l) if l.is_empty() => {}
                Some(l) => {
                    self.malformed(format!("chunk not followed by CRLF: {:?}", String::from_utf8_lossy(&l)));
                    return false;
                }
                None => return false,
            }
        }
    }

    /// Reads up to `n` body bytes as they come; returns how many arrived before the peer closed.
    pub async fn read_some(&mut self, n: usize) -> usize {
        while self.buf.len() < n {
            if !self.fill().await {
                break;
            }
        }
        let got = self.buf.len().min(n);
        self.buf.drain(..got);
        got
    }

    /// Writes `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stream = self.stream();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// Reads and discards until the peer closes or resets; returns the bytes read meanwhile. Marks the
    /// connection closed by the peer.
    pub async fn until_closed(&mut self) -> usize {
        let mut total = std::mem::take(&mut self.buf).len();
        while !self.peer_closed {
            let before = self.buf.len();
            if self.fill().await {
                total += self.buf.len() - before;
                self.buf.clear();
            }
        }
        total
    }

    /// Writes `chunk` every `every` until a write fails or the peer closes, adding each chunk written to
    /// `progress`; returns the bytes written. Reads at the same time, so a close by the peer is seen even while
    /// writes still fit in the kernel's buffers.
    pub async fn stream_until_closed(&mut self, chunk: &[u8], every: Duration, progress: &AtomicUsize) -> usize {
        let mut written = 0;
        let mut scratch = [0u8; 4096];
        loop {
            let stream = self.stream.as_mut().expect("connection already reset");
            let (mut rd, mut wr) = stream.split();
            tokio::select! {
                read = rd.read(&mut scratch) => match read {
                    Ok(n) if n > 0 => {}
                    _ => { self.mark_closed(); return written; }
                },
                wrote = async {
                    tokio::time::sleep(every).await;
                    wr.write_all(chunk).await
                } => match wrote {
                    Ok(()) => {
                        written += chunk.len();
                        progress.fetch_add(chunk.len(), Ordering::SeqCst);
                    }
                    Err(_) => { self.mark_closed(); return written; }
                },
            }
        }
    }

    /// Resets the connection: SO_LINGER 0, then close, so the peer gets an RST rather than a FIN.
    pub fn reset(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    }

    /// Closes the connection with a FIN.
    pub fn close(&mut self) {
        self.stream.take();
    }
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// `Content-Length: n`.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

type Head = (String, String, Vec<(String, Vec<u8>)>, Framing);

/// Strict checks of a request head: CRLF only, a valid request line, token header names, no obs-fold, values
/// without CR, LF or NUL, and one unambiguous framing.
fn check_head(head: &[u8]) -> Result<Head, String> {
    for (i, b) in head.iter().enumerate() {
        if *b == b'\n' && (i == 0 || head[i - 1] != b'\r') {
            return Err("bare LF in the head".into());
        }
        if *b == b'\r' && head.get(i + 1) != Some(&b'\n') {
            return Err("bare CR in the head".into());
        }
        if *b == 0 {
            return Err("NUL in the head".into());
        }
    }
    let text = &head[..head.len() - 4];
    let mut lines = text.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line =
        String::from_utf8(lines.next().unwrap_or_default().to_vec()).map_err(|_| "request line not ASCII")?;
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("request line is not three words: {request_line:?}"));
    };
    if version != "HTTP/1.1" {
        return Err(format!("version {version:?}"));
    }
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(format!("method {method:?}"));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("target not origin-form: {target:?}"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err("obs-fold".into());
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or("header line without colon")?;
        let name = &line[..colon];
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(format!("header name {:?}", String::from_utf8_lossy(name)));
        }
        let value = trim(&line[colon + 1..]);
        if value.iter().any(|b| *b < 0x20 && *b != b'\t' || *b == 0x7f) {
            return Err(format!(
                "control byte in the value of {:?}",
                String::from_utf8_lossy(name)
            ));
        }
        headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec()));
    }
    let lengths: Vec<&Vec<u8>> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v)
        .collect();
    let te: Vec<&Vec<u8>> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v)
        .collect();
    let framing = match (lengths.len(), te.len()) {
        (0, 0) => Framing::None,
        (1, 0) => {
            let n = std::str::from_utf8(lengths[0])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or("invalid content-length")?;
            Framing::Length(n)
        }
        (0, 1) if te[0].eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
        (0, _) => return Err("transfer-encoding other than one `chunked`".into()),
        (_, 0) => return Err("more than one content-length".into()),
        _ => return Err("both content-length and transfer-encoding".into()),
    };
    Ok((method.to_owned(), target.to_owned(), headers, framing))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP/1.1 response head and body as a raw caller read them.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code, 0 when no status line arrived.
    pub status: u16,
    /// The head text.
    pub head: String,
    /// The body bytes that arrived (not de-chunked).
    pub body: Vec<u8>,
    /// Whether the server closed the connection (or reset it) before the deadline.
    pub closed: bool,
}

/// Writes `request` on a new connection to `addr` and reads until the server closes it or `deadline` passes.
pub async fn raw_request(addr: SocketAddr, request: &[u8], deadline: Duration) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before the whole request is written (e.g. 431): ignore write errors.
    let _ = stream.write_all(request).await;
    read_response(&mut stream, deadline).await
}

/// Reads from `stream` until it closes or `deadline` passes, and splits off the first response head.
pub async fn read_response(stream: &mut TcpStream, deadline: Duration) -> RawResponse {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(deadline, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let split = find(&out, b"\r\n\r\n").map_or(out.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head,
        body: out[split..].to_vec(),
        closed,
    }
}

/// Splits bytes a server wrote into responses (each framed by `content-length`, as every answer of the proxy
/// and of the fakes is); a trailing partial response is dropped.
pub fn split_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end + 4]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        if bytes.len() < end + 4 + len {
            break;
        }
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.push(RawResponse {
            status,
            head,
            body: bytes[end + 4..end + 4 + len].to_vec(),
            closed: false,
        });
        bytes = &bytes[end + 4 + len..];
    }
    out
}

impl RawResponse {
    /// The value of header `name` in the head (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}
