//! Request bodies towards the upstream, and the bounded buffer that makes a replay after a 401 possible.
//!
//! In JWT mode a request body streams upstream through a [`TeeBody`], which keeps the chunks it passed on (up to
//! `auth.replay_buffer`, and within a process-wide [`ReplayBudget`] so many large uploads cannot exhaust
//! memory). When hyper is done with the body it drops it, and the drop hands back what was kept *and* the part of
//! the caller's body not yet read. A replay then sends the kept chunks followed by that rest: the caller's body
//! is never read twice and never held beyond the bound. Chunks are `Bytes`, so keeping one is a reference count,
//! not a copy.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

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

/// The copy of the body chunks already sent upstream, kept (within `auth.replay_buffer` and the
/// [`ReplayBudget`]) so the request can be sent again; gives its bytes back to the budget when dropped.
#[derive(Debug)]
pub struct ReplayCopy {
    chunks: Vec<Bytes>,
    len: u64,
    limit: u64,
    /// Bytes were lost (over the limit or the budget, or the caller's body failed): no replay possible.
    lost: bool,
    budget: Arc<ReplayBudget>,
}

impl ReplayCopy {
    fn new(limit: u64, budget: Arc<ReplayBudget>) -> Self {
        Self {
            chunks: Vec::new(),
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
        self.chunks.push(data.clone());
        self.len += n;
    }

    fn give_up(&mut self) {
        self.lost = true;
        self.chunks = Vec::new();
        self.budget.give_back(self.len);
        self.len = 0;
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
    rest: Option<Incoming>,
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
    /// The caller's body as it is (static mode, or a body-less request).
    Plain(Incoming),
    /// The caller's body, kept as it streams. Boxed, like `Replay`, so the common `Plain` case keeps every
    /// `Request<ForwardBody>` small: requests are moved several times and queued in hyper's channels.
    Tee(Box<TeeBody>),
    /// A replay: the kept chunks, then the rest of the caller's body.
    Replay(Box<ReplayBody>),
    /// A replay of a request without a body.
    Empty,
}

impl ForwardBody {
    /// Wraps `body` so it can be replayed; the receiver gets what was kept once hyper drops the body.
    /// A body already at its end needs no keeping: `None` then means "replay with an empty body".
    pub fn tee(body: Incoming, limit: u64, budget: &Arc<ReplayBudget>) -> (Self, Option<oneshot::Receiver<SentBody>>) {
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
        (Self::Tee(Box::new(tee)), Some(rx))
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
            Self::Tee(b) => Pin::new(&mut **b).poll_frame(cx),
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
    inner: Option<Incoming>,
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
    rest: Option<Incoming>,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(chunk) = this.kept.chunks.get(this.next) {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
        }
        match this.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.kept.chunks.len() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let kept: u64 = self.kept.chunks[self.next.min(self.kept.chunks.len())..]
            .iter()
            .map(|c| c.len() as u64)
            .sum();
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
