//! How the mock answers: JSON bodies, the echo of what it received, and the download pattern that tests
//! recompute byte for byte.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::secret::hex;

/// Every mock answer: a whole JSON body, or the download pattern streamed.
pub(super) type MockBody = Either<Full<Bytes>, PatternBody>;

/// A JSON answer with `status`.
pub(super) fn json_response(status: StatusCode, body: serde_json::Value) -> Response<MockBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The request body as JSON; `None` when it does not arrive whole or is not JSON.
pub(super) async fn read_json(req: Request<Incoming>) -> Option<serde_json::Value> {
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// Answers with what arrived: method, raw target, version, headers, body length and SHA-256 (lower-case hex).
pub(super) async fn echo(req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let (len, sha) = match hash_body(body).await {
        Ok(h) => h,
        Err(e) => return json_response(StatusCode::BAD_REQUEST, json!({ "detail": format!("body: {e}") })),
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), json!(String::from_utf8_lossy(v.as_bytes()))))
        .collect();
    json_response(
        StatusCode::OK,
        json!({
            "method": parts.method.as_str(),
            "target": parts.uri.path_and_query().map(|p| p.as_str()),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": len,
            "body_sha256": sha,
        }),
    )
}

/// Reads a body to its end, hashing as it goes.
pub(super) async fn hash_body(mut body: Incoming) -> Result<(u64, String), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    Ok((len, hex(&hasher.finalize())))
}

/// The byte at `offset` of the download pattern; tests recompute it to check integrity.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

/// A body of `len` pattern bytes made on the fly in 64 KiB chunks.
#[derive(Debug)]
pub struct PatternBody {
    /// Bytes sent so far.
    offset: u64,
    /// Bytes in the whole body.
    len: u64,
}

impl PatternBody {
    pub(super) fn new(len: u64) -> Self {
        Self { offset: 0, len }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(64 * 1024);
        let chunk: Vec<u8> = (self.offset..self.offset + n).map(pattern_byte).collect();
        self.offset += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len - self.offset)
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.len
    }
}
