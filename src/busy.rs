//! Whether a caller connection has a request in progress, for its head deadline (`server.header_read_timeout`,
//! kept by [`crate::paired`]): a request is in progress from its head's arrival until both its response has been
//! sent whole and its own body has been read whole. Each body holds a [`Busy`] guard ([`Tracked`]) until then, so
//! neither a long download nor a slow upload after an early answer counts as an idle connection owing a head.
//!
//! A module of its own, below both: the request body travels through [`crate::replay`], which the paired
//! connection's module sits above.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Instant;

/// The caller's request body: hyper's, with the guard that keeps its request in progress while it is read.
pub type CallerBody = Tracked<Incoming>;

/// One connection's requests in progress, and when the last one ended.
#[derive(Debug)]
pub(crate) struct Activity {
    /// When the connection started; `idle_since` counts nanoseconds after it.
    origin: Instant,
    /// Guards alive ([`Busy`]).
    in_flight: AtomicU32,
    /// When the last guard was dropped (the connection's start before any).
    idle_since: AtomicU64,
}

impl Activity {
    /// A connection that started at `origin`, with nothing in progress.
    pub(crate) fn new(origin: Instant) -> Self {
        Self {
            origin,
            in_flight: AtomicU32::new(0),
            idle_since: AtomicU64::new(0),
        }
    }

    /// Marks something in progress until the guard is dropped.
    pub(crate) fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(Some(self.clone()))
    }

    /// Since when nothing has been in progress; `None` while something is.
    pub(crate) fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return None;
        }
        Some(self.origin + std::time::Duration::from_nanos(self.idle_since.load(Ordering::Acquire)))
    }
}

/// Something in progress on its connection (see [`Activity::busy`]); [`Busy::none`] tracks nothing.
#[derive(Debug)]
pub struct Busy(Option<Arc<Activity>>);

impl Busy {
    /// A guard for nothing: HTTP/2 streams, and bodies that are over before they start.
    pub fn none() -> Self {
        Self(None)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            let since = Instant::now().saturating_duration_since(activity.origin);
            activity
                .idle_since
                .store(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX), Ordering::Release);
            activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that keeps its request in progress ([`Busy`]) until it has been read whole, failed, or dropped.
    #[derive(Debug)]
    pub struct Tracked<B> {
        #[pin]
        body: B,
        busy: Option<Busy>,
    }
}

impl<B: Body> Tracked<B> {
    /// `body`, its request in progress (`busy`) while it lasts; a body already at its end holds nothing.
    pub fn new(body: B, busy: Busy) -> Self {
        let busy = (!body.is_end_stream()).then_some(busy);
        Self { body, busy }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if matches!(frame, Poll::Ready(None | Some(Err(_)))) {
            this.busy.take();
        }
        frame
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
