//! What a replay needs, kept at the lowest cost found: the request head and the request body.
//!
//! A replay (after an upstream 401 with a renewed token, or after an upstream 429 once pacing's pause ends) is
//! rare, yet what it needs must be kept on every request that could get one, so the keeping is priced for the
//! request that never replays (`benches/jwt_vs_static.rs`):
//!
//! - The head is kept as a [`ReplayHead`]: the method, the target and every header but `Authorization` packed
//!   into one byte buffer (one allocation and a copy of a few hundred bytes, where a `HeaderMap` clone costs two
//!   or three allocations plus a reference count per value, some of them allocating on their first clone). The
//!   refused token is never in it: a replay gets its token from the caller of [`ReplayHead::into_request`].
//! - A request body streams upstream through a [`TeeBody`] (inline in [`ForwardBody`], no box), which keeps the
//!   chunks it passed on (up to `auth.replay_buffer`, and within a process-wide [`ReplayBudget`] so many large
//!   uploads cannot exhaust memory). Chunks are `Bytes`: keeping one is a reference count, not a copy, and the
//!   first is kept inline (a small body, one chunk, allocates nothing for its copy). When hyper is done with the
//!   body it drops it, and the drop hands back what was kept *and* the part of the caller's body not yet read. A
//!   replay then sends the kept chunks followed by that rest: the caller's body is never read twice and never
//!   held beyond the bound. A request without a body keeps nothing of it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::busy::CallerBody;

/// Process-wide bytes kept for replays.
#[derive(Debug)]
pub struct ReplayBudget {
    used: AtomicU64,
    cap: u64,
}

impl ReplayBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Self {
            used: AtomicU64::new(0),
            cap,
        }
    }

    /// Bytes kept right now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|t| *t <= self.cap)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What a replay needs of the rewritten request head, in one buffer: the method, the target, and every header
/// in order with `Authorization` only marking its place. The refused token is not kept: whoever replays
/// supplies the token ([`ReplayHead::into_request`]), so a replay cannot carry the one ZapSign refused.
#[derive(Debug)]
pub struct ReplayHead {
    method: Method,
    uri: Uri,
    /// Records `name length (u32 LE) | value length (u32 LE) | flags (u8) | name | value`, in the head's order.
    packed: Vec<u8>,
    /// How many records, for the rebuilt map's capacity.
    count: usize,
    /// A header too long to pack (over 4 GiB, which hyper never accepts): no replay.
    lost: bool,
}

/// The bytes before a record's name.
const RECORD_HEAD: usize = 9;
/// Flag: the value was marked sensitive (never indexed by HPACK, hidden from `Debug`).
const SENSITIVE: u8 = 1;
/// Flag: the place of `Authorization`, whose value is not kept.
const AUTHORIZATION_SLOT: u8 = 2;

impl ReplayHead {
    /// Keeps what a replay of `parts` (a rewritten head) needs. One allocation, sized exactly; header values are
    /// copied rather than shared, which for a few hundred bytes costs less than a reference count each.
    pub fn keep(parts: &Parts) -> Self {
        let value_of = |name: &HeaderName, value: &'_ HeaderValue| -> usize {
            if name == AUTHORIZATION {
                0
            } else {
                value.len()
            }
        };
        let size = parts
            .headers
            .iter()
            .map(|(n, v)| RECORD_HEAD + n.as_str().len() + value_of(n, v))
            .sum();
        let mut packed = Vec::with_capacity(size);
        let mut lost = false;
        for (name, value) in &parts.headers {
            let slot = name == AUTHORIZATION;
            let bytes = if slot { &[][..] } else { value.as_bytes() };
            let (Ok(name_len), Ok(value_len)) = (u32::try_from(name.as_str().len()), u32::try_from(bytes.len())) else {
                lost = true;
                break;
            };
            let flags = if slot {
                AUTHORIZATION_SLOT
            } else if value.is_sensitive() {
                SENSITIVE
            } else {
                0
            };
            packed.extend_from_slice(&name_len.to_le_bytes());
            packed.extend_from_slice(&value_len.to_le_bytes());
            packed.push(flags);
            packed.extend_from_slice(name.as_str().as_bytes());
            packed.extend_from_slice(bytes);
        }
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            packed,
            count: parts.headers.len(),
            lost,
        }
    }

    /// The request to send again with `body`, carrying `authorization` where the kept head had its token (at the
    /// end if it had none). `None` when the head cannot be rebuilt (a header too long to keep): the refused
    /// answer then passes on.
    pub fn into_request(self, body: ForwardBody, authorization: &HeaderValue) -> Option<Request<ForwardBody>> {
        if self.lost {
            return None;
        }
        let packed = Bytes::from(self.packed);
        let mut headers = HeaderMap::with_capacity(self.count);
        let mut authorized = false;
        let mut at = 0;
        while at < packed.len() {
            let field = |from: usize| -> Option<usize> {
                let b: [u8; 4] = packed.get(from..from + 4)?.try_into().ok()?;
                usize::try_from(u32::from_le_bytes(b)).ok()
            };
            let (name_len, value_len) = (field(at)?, field(at + 4)?);
            let flags = *packed.get(at + 8)?;
            let name_at = at + RECORD_HEAD;
            let value_at = name_at + name_len;
            let end = value_at + value_len;
            let name = HeaderName::from_bytes(packed.get(name_at..value_at)?).ok()?;
            if flags & AUTHORIZATION_SLOT != 0 {
                headers.append(name, authorization.clone());
                authorized = true;
            } else {
                packed.get(value_at..end)?;
                let mut value = HeaderValue::from_maybe_shared(packed.slice(value_at..end)).ok()?;
                value.set_sensitive(flags & SENSITIVE != 0);
                headers.append(name, value);
            }
            at = end;
        }
        if !authorized {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = headers;
        *req.version_mut() = Version::HTTP_11;
        Some(req)
    }
}

/// The copy of the body chunks already sent upstream, kept (within `auth.replay_buffer` and the
/// [`ReplayBudget`]) so the request can be sent again; gives its bytes back to the budget when dropped.
#[derive(Debug)]
pub struct ReplayCopy {
    /// The first chunk, inline: most bodies are one chunk.
    first: Option<Bytes>,
    /// The chunks after the first.
    more: Vec<Bytes>,
    len: u64,
    limit: u64,
    /// Bytes were lost (over the limit or the budget, or the caller's body failed): no replay possible.
    lost: bool,
    budget: Arc<ReplayBudget>,
}

impl ReplayCopy {
    fn new(limit: u64, budget: Arc<ReplayBudget>) -> Self {
        Self {
            first: None,
            more: Vec::new(),
            len: 0,
            limit,
            lost: false,
            budget,
        }
    }

    fn keep(&mut self, data: &Bytes) {
        if self.lost {
            return;
        }
        let n = data.len() as u64;
        if self.len + n > self.limit || !self.budget.try_take(n) {
            self.give_up();
            return;
        }
        if self.first.is_none() {
            self.first = Some(data.clone());
        } else {
            self.more.push(data.clone());
        }
        self.len += n;
    }

    fn give_up(&mut self) {
        self.lost = true;
        self.first = None;
        self.more = Vec::new();
        self.budget.give_back(self.len);
        self.len = 0;
    }

    /// The `i`th kept chunk.
    fn chunk(&self, i: usize) -> Option<&Bytes> {
        match i {
            0 => self.first.as_ref(),
            _ => self.more.get(i - 1),
        }
    }

    /// Bytes in the chunks from the `from`th on.
    fn len_from(&self, from: usize) -> u64 {
        (from..=self.more.len())
            .filter_map(|i| self.chunk(i))
            .map(|c| c.len() as u64)
            .sum()
    }
}

impl Drop for ReplayCopy {
    fn drop(&mut self) {
        self.budget.give_back(self.len);
    }
}

/// The request body as a finished [`TeeBody`] hands it back: the copy of what the upstream was sent, and the
/// part of the caller's body it never read.
#[derive(Debug)]
pub struct SentBody {
    kept: ReplayCopy,
    rest: Option<CallerBody>,
}

impl SentBody {
    /// Whether every byte the upstream was sent is still here to send again.
    pub fn replayable(&self) -> bool {
        !self.kept.lost
    }
}

/// The body sent upstream.
#[derive(Debug)]
pub enum ForwardBody {
    /// The caller's body as it is (static mode without pacing, or a body-less request).
    Plain(CallerBody),
    /// The caller's body, kept as it streams. Inline: a box per request with a body cost more than the larger
    /// `Request<ForwardBody>` costs to move (measured by `benches/jwt_vs_static.rs`).
    Tee(TeeBody),
    /// A replay: the kept chunks, then the rest of the caller's body. Boxed: rare, and it keeps every
    /// `Request<ForwardBody>` from growing further.
    Replay(Box<ReplayBody>),
    /// A replay of a request without a body.
    Empty,
}

impl ForwardBody {
    /// Wraps `body` so it can be replayed; the receiver gets what was kept once hyper drops the body.
    /// A body already at its end needs no keeping: `None` then means "replay with an empty body", and nothing
    /// is allocated.
    pub fn tee(
        body: CallerBody,
        limit: u64,
        budget: &Arc<ReplayBudget>,
    ) -> (Self, Option<oneshot::Receiver<SentBody>>) {
        if body.is_end_stream() {
            return (Self::Plain(body), None);
        }
        let (tx, rx) = oneshot::channel();
        let tee = TeeBody {
            inner: Some(body),
            kept: Some(ReplayCopy::new(limit, budget.clone())),
            ended: false,
            tx: Some(tx),
        };
        (Self::Tee(tee), Some(rx))
    }

    /// The body of a replay from what a tee handed back.
    pub fn replay(sent: SentBody) -> Self {
        let SentBody { kept, rest } = sent;
        Self::Replay(Box::new(ReplayBody { next: 0, kept, rest }))
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Plain(b) => Pin::new(b).poll_frame(cx),
            Self::Tee(b) => Pin::new(b).poll_frame(cx),
            Self::Replay(b) => Pin::new(&mut **b).poll_frame(cx),
            Self::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Plain(b) => b.is_end_stream(),
            Self::Tee(b) => b.is_end_stream(),
            Self::Replay(b) => b.is_end_stream(),
            Self::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Plain(b) => b.size_hint(),
            Self::Tee(b) => b.size_hint(),
            Self::Replay(b) => b.size_hint(),
            Self::Empty => SizeHint::with_exact(0),
        }
    }
}

/// The caller's body, passed on and kept.
#[derive(Debug)]
pub struct TeeBody {
    inner: Option<CallerBody>,
    kept: Option<ReplayCopy>,
    ended: bool,
    tx: Option<oneshot::Sender<SentBody>>,
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(kept)) = (frame.data_ref(), this.kept.as_mut()) {
                    kept.keep(data);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(kept) = this.kept.as_mut() {
                    kept.give_up();
                }
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        if let (Some(tx), Some(kept)) = (self.tx.take(), self.kept.take()) {
            // Nobody waits when the answer was neither 401 nor 429: the copy then goes back at once.
            if tx.is_closed() {
                return;
            }
            let rest = if self.ended { None } else { self.inner.take() };
            let _ = tx.send(SentBody { kept, rest });
        }
    }
}

/// A replayed body: the kept chunks, then whatever the caller had not sent yet.
#[derive(Debug)]
pub struct ReplayBody {
    next: usize,
    kept: ReplayCopy,
    rest: Option<CallerBody>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(chunk) = this.kept.chunk(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kept.chunk(self.next).is_none() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let kept = self.kept.len_from(self.next);
        let rest = self
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint.set_lower(rest.lower() + kept);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten_head(token: &'static str) -> Parts {
        let mut token = HeaderValue::from_static(token);
        token.set_sensitive(true);
        let mut req = Request::post("https://api.zapsign.com.br/api/v1/docs/?page=2")
            .header("user-agent", "zapsign-python/1.4.2")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("x-request-id", "id-1")
            .body(())
            .unwrap();
        let h = req.headers_mut();
        h.insert(AUTHORIZATION, token);
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1, 10.1.2.3"));
        let mut secret = HeaderValue::from_static("kept-secret");
        secret.set_sensitive(true);
        h.insert("x-secret", secret);
        req.into_parts().0
    }

    #[test]
    fn a_kept_head_comes_back_whole_in_order_with_the_new_token_in_the_old_ones_place() {
        let parts = rewritten_head("Bearer refused-token");
        let kept = ReplayHead::keep(&parts);
        let needle: &[u8] = b"refused-token";
        assert!(
            !kept.packed.windows(needle.len()).any(|w| w == needle),
            "the refused token must not be kept"
        );
        let mut renewed = HeaderValue::from_static("Bearer renewed");
        renewed.set_sensitive(true);
        let req = kept.into_request(ForwardBody::Empty, &renewed).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), &parts.uri);
        assert_eq!(req.version(), Version::HTTP_11);
        let names = |h: &HeaderMap| h.iter().map(|(n, _)| n.as_str().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(req.headers()), names(&parts.headers), "same headers, same order");
        for (name, value) in req.headers() {
            if name == AUTHORIZATION {
                assert_eq!(value, "Bearer renewed");
                assert!(value.is_sensitive());
            } else {
                let all: Vec<_> = parts.headers.get_all(name).iter().collect();
                assert!(all.contains(&value), "{name}");
            }
        }
        assert_eq!(req.headers().get_all("x-multi").iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(req.headers()["x-secret"].is_sensitive() && !req.headers()["user-agent"].is_sensitive());
    }

    #[test]
    fn a_head_without_a_token_gets_one_at_the_end() {
        let mut parts = rewritten_head("Bearer t");
        parts.headers.remove(AUTHORIZATION);
        let req = ReplayHead::keep(&parts)
            .into_request(ForwardBody::Empty, &HeaderValue::from_static("Bearer new"))
            .unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer new");
        assert_eq!(req.headers().len(), parts.headers.len() + 1);
    }

    #[test]
    fn one_kept_chunk_is_inline_and_chunks_replay_in_order() {
        let budget = Arc::new(ReplayBudget::new(100));
        let mut copy = ReplayCopy::new(100, budget.clone());
        copy.keep(&Bytes::from_static(b"ab"));
        assert_eq!(copy.more.capacity(), 0, "one chunk allocates nothing");
        copy.keep(&Bytes::from_static(b"cde"));
        copy.keep(&Bytes::from_static(b"f"));
        assert_eq!(budget.used(), 6);
        assert_eq!(copy.len_from(0), 6);
        assert_eq!(copy.len_from(1), 4);
        let chunks: Vec<_> = (0..4).map_while(|i| copy.chunk(i).cloned()).collect();
        assert_eq!(chunks, ["ab", "cde", "f"]);
        drop(copy);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn kept_bytes_respect_limit_and_budget_and_are_given_back() {
        let budget = Arc::new(ReplayBudget::new(10));
        let mut a = ReplayCopy::new(8, budget.clone());
        a.keep(&Bytes::from_static(b"12345"));
        assert_eq!(budget.used(), 5);
        a.keep(&Bytes::from_static(b"6789"));
        assert!(a.lost, "over the per-request limit");
        assert_eq!(budget.used(), 0);
        let mut b = ReplayCopy::new(8, budget.clone());
        let mut c = ReplayCopy::new(8, budget.clone());
        b.keep(&Bytes::from_static(b"1234567"));
        c.keep(&Bytes::from_static(b"1234"));
        assert!(!b.lost && c.lost, "the process-wide budget is shared");
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
