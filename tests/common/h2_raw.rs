//! A raw HTTP/2 (h2c, prior knowledge) client that writes frames byte for byte, so tests can break the rules a
//! real client library enforces: more streams than the server allows, streams reset as soon as they open, header
//! blocks over the server's limit. Header blocks use HPACK literals without indexing (no dynamic table, no
//! Huffman), which every decoder must accept.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const CANCEL: u32 = 0x8;
pub const REFUSED_STREAM: u32 = 0x7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Settings identifiers.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// One frame read from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        self.payload
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The settings of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect()
    }
}

/// Encodes one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix whose high bits are `first` (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// A header block: `:method`, `:scheme`, `:path`, `:authority` then `extra`, all literals without indexing.
pub fn request_block(method: &str, path: &str, authority: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    // Static table indices (RFC 7541 Appendix A): 2 :method, 6 :scheme http, 4 :path, 1 :authority.
    hpack_int(&mut out, 0x00, 4, 2);
    hpack_str(&mut out, method.as_bytes());
    out.push(0x86);
    hpack_int(&mut out, 0x00, 4, 4);
    hpack_str(&mut out, path.as_bytes());
    hpack_int(&mut out, 0x00, 4, 1);
    hpack_str(&mut out, authority.as_bytes());
    for (name, value) in extra {
        out.push(0x00);
        hpack_str(&mut out, name.as_bytes());
        hpack_str(&mut out, value);
    }
    out
}

/// A raw h2c connection.
pub struct H2Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The server's first SETTINGS.
    pub server_settings: Vec<(u16, u32)>,
}

impl H2Raw {
    /// Connects, sends the preface and empty SETTINGS, reads the server's SETTINGS and acknowledges them.
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut conn = Self {
            stream,
            buf: Vec::new(),
            server_settings: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        conn.send(&hello).await;
        loop {
            let f = conn
                .next(Duration::from_secs(5))
                .await
                .expect("the server sends SETTINGS first");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                conn.server_settings = f.settings();
                conn.send(&frame(SETTINGS, ACK, 0, &[])).await;
                return conn;
            }
        }
    }

    /// The server's value for setting `id`.
    pub fn setting(&self, id: u16) -> Option<u32> {
        self.server_settings.iter().find(|(i, _)| *i == id).map(|(_, v)| *v)
    }

    /// Writes raw bytes; errors (the server may have closed) are ignored.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, or `None` when the server closed the connection or `deadline` passed.
    pub async fn next(&mut self, deadline: Duration) -> Option<Frame> {
        tokio::time::timeout(deadline, async {
            loop {
                if self.buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                    if self.buf.len() >= 9 + len {
                        let head: Vec<u8> = self.buf.drain(..9 + len).collect();
                        return Some(Frame {
                            kind: head[3],
                            flags: head[4],
                            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                            payload: head[9..].to_vec(),
                        });
                    }
                }
                let mut chunk = [0u8; 16 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Reads frames until `stop` says so, the server closes, or `deadline` passes; returns every frame read
    /// (answering PINGs on the way) and whether the connection closed.
    pub async fn collect_until(
        &mut self,
        deadline: Duration,
        mut stop: impl FnMut(&Frame) -> bool,
    ) -> (Vec<Frame>, bool) {
        let end = tokio::time::Instant::now() + deadline;
        let mut frames = Vec::new();
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return (frames, false);
            }
            match self.next(left).await {
                None => {
                    let closed = tokio::time::Instant::now() < end;
                    return (frames, closed);
                }
                Some(f) => {
                    if f.kind == PING && f.flags & ACK == 0 {
                        let pong = frame(PING, ACK, 0, &f.payload);
                        self.send(&pong).await;
                    }
                    let done = stop(&f);
                    frames.push(f);
                    if done {
                        return (frames, false);
                    }
                }
            }
        }
    }
}
