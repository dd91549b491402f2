//! Drives one HTTP/1.1 caller connection and its affine upstream connection ([`crate::affinity`]) in one task,
//! each side with a waker of its own, under one deadline for the whole connection.
//!
//! **Per-side wakers.** A wake-up of the upstream connection (its response arrived) polls the upstream side, and
//! the caller's side only when something there was woken too (the response handed over to the request waiting
//! for it), not both dispatchers on every wake-up. Wakes that come while the pair is being polled do not
//! reschedule the task: the poll loops over what they woke, so a request costs no extra task polls.
//!
//! **One deadline per connection.** `server.header_read_timeout` (a caller must send its next request head within
//! it) and `upstream.response_timeout` (the upstream must answer a request's head within it) are both kept by one
//! timer per connection, set when the connection starts and moved only when it fires or when a request's
//! response is due before it: not a timer registered and removed for every request (hyper's header read
//! timer, and a `tokio::time::timeout` around each exchange, cost a timer-wheel insertion and removal and an
//! allocation per request). The requests report what the deadline needs through [`Pair`]: when one is in
//! progress ([`Pair::request_started`], held by its response body until it is sent and by its request body until
//! it is read: [`crate::busy`]) and when one awaits its response
//! head ([`Pair::awaiting`]); the timer, when it fires, works out from them whether a deadline passed.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::time::{Instant, Sleep};

use crate::affinity::{Affinity, ConnFuture};
use crate::busy::{Activity, Busy};

/// The caller's side (hyper's server connection, and the requests it runs) was woken.
const SERVER: u8 = 1;
/// The upstream connection was woken, or a new one attached.
const CLIENT: u8 = 2;
/// The deadline timer fired, or a request is due before it is set to fire.
const TIMER: u8 = 4;
/// The pair is being polled: wakes only mark their side, the poll loop picks them up.
const POLLING: u8 = 8;
/// Rounds of one poll before yielding to the runtime (tokio's cooperative budget can make a side wake itself at
/// once; looping on that forever would starve every other task).
const MAX_ROUNDS: usize = 8;
/// "No request is waiting for its response head."
const NONE: u64 = u64::MAX;

/// What one caller connection's requests and its [`Paired`] driver share: which side was woken, and what the
/// connection's deadline needs to know.
pub(crate) struct Pair {
    /// [`SERVER`], [`CLIENT`], [`TIMER`] as woken, and [`POLLING`].
    flags: AtomicU8,
    /// The task's waker, woken when a side is woken while the pair is not being polled.
    task: AtomicWaker,
    /// When the connection started: every time below is in nanoseconds after it.
    origin: Instant,
    /// Requests in progress, and when the last one ended.
    activity: Arc<Activity>,
    /// `server.header_read_timeout`.
    header_read: Duration,
    /// `upstream.response_timeout`.
    response: Duration,
    /// When the request now waiting for its response head was sent upstream; [`NONE`] when none waits.
    waiting_since: AtomicU64,
    /// The waiting request's response head is overdue.
    overdue: AtomicBool,
    /// When the timer is set to fire.
    armed: AtomicU64,
}

impl Pair {
    /// The shared state of a connection that started at `origin`.
    pub(crate) fn new(origin: Instant, header_read: Duration, response: Duration) -> Arc<Self> {
        Arc::new(Self {
            flags: AtomicU8::new(SERVER | CLIENT | TIMER),
            task: AtomicWaker::new(),
            origin,
            activity: Arc::new(Activity::new(origin)),
            header_read,
            response,
            waiting_since: AtomicU64::new(NONE),
            overdue: AtomicBool::new(false),
            armed: AtomicU64::new(nanos(header_read)),
        })
    }

    fn since_origin(&self, at: Instant) -> u64 {
        nanos(at.saturating_duration_since(self.origin))
    }

    /// Marks `bits` woken; wakes the task unless the pair is being polled (the poll loop then sees them).
    fn wake(&self, bits: u8) {
        if self.flags.fetch_or(bits, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }

    /// A request's head arrived: the connection is busy, and the caller owes no head, until the returned guard
    /// is dropped (held by the response body until it has been sent whole, and another by the request body
    /// until it has been read whole).
    pub(crate) fn request_started(&self) -> Busy {
        self.activity.busy()
    }

    /// A request went upstream at `sent`: its response head is due within `upstream.response_timeout`, until
    /// the returned guard is dropped. If the timer is set later than that, it is moved.
    pub(crate) fn awaiting(&self, sent: Instant) -> Awaiting<'_> {
        let at = self.since_origin(sent);
        self.overdue.store(false, Ordering::Release);
        self.waiting_since.store(at, Ordering::Release);
        if at.saturating_add(nanos(self.response)) < self.armed.load(Ordering::Acquire) {
            self.wake(TIMER);
        }
        Awaiting(self)
    }

    /// Whether the response head awaited since [`Pair::awaiting`] is overdue (`upstream.response_timeout`).
    pub(crate) fn is_overdue(&self) -> bool {
        self.overdue.load(Ordering::Acquire)
    }

    /// Runs `exchange` (sent upstream at `sent`) until it ends, or until its response head is overdue: `None`
    /// then. The deadline is the pair's timer; this costs one atomic load per poll.
    pub(crate) async fn until_overdue<F: Future>(&self, sent: Instant, exchange: F) -> Option<F::Output> {
        let _awaiting = self.awaiting(sent);
        let mut exchange = std::pin::pin!(exchange);
        std::future::poll_fn(|cx| {
            if self.is_overdue() {
                return Poll::Ready(None);
            }
            exchange.as_mut().poll(cx).map(Some)
        })
        .await
    }

    /// The timer fired (or must move) at `now`: whether the caller owes a head for longer than
    /// `server.header_read_timeout` (the connection is closed then), flags an overdue response head, and says
    /// when the timer must fire next.
    fn check(&self, now: Instant) -> Check {
        let now = self.since_origin(now);
        let header_read = nanos(self.header_read);
        let mut next = if let Some(idle_since) = self.activity.idle_since() {
            let due = nanos(idle_since.saturating_duration_since(self.origin)).saturating_add(header_read);
            if now >= due {
                return Check::HeadOverdue;
            }
            due
        } else {
            // Busy: nothing is owed by the caller now; look again one timeout later.
            now.saturating_add(header_read)
        };
        let waiting = self.waiting_since.load(Ordering::Acquire);
        if waiting != NONE {
            let due = waiting.saturating_add(nanos(self.response));
            if now >= due {
                self.overdue.store(true, Ordering::Release);
                // The request sees it at its next poll, in this poll's loop.
                self.flags.fetch_or(SERVER, Ordering::AcqRel);
            } else {
                next = next.min(due);
            }
        }
        self.armed.store(next, Ordering::Release);
        Check::Next(self.origin + Duration::from_nanos(next))
    }
}

/// Nanoseconds of `d`, saturating (a timeout of centuries is "never").
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NONE - 1)
}

/// What the timer's check found.
enum Check {
    /// The caller owed a request head for longer than `server.header_read_timeout`.
    HeadOverdue,
    /// Nothing to close: fire again at this instant.
    Next(Instant),
}

/// A request waiting for its response head (see [`Pair::awaiting`]).
pub(crate) struct Awaiting<'a>(&'a Pair);

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.waiting_since.store(NONE, Ordering::Release);
    }
}

/// One side's waker: marks its side woken, and wakes the task when needed.
struct Side {
    pair: Arc<Pair>,
    bit: u8,
}

impl Wake for Side {
    fn wake(self: Arc<Self>) {
        self.pair.wake(self.bit);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.pair.wake(self.bit);
    }
}

fn side(pair: &Arc<Pair>, bit: u8) -> Waker {
    Waker::from(Arc::new(Side {
        pair: pair.clone(),
        bit,
    }))
}

/// The caller sent no complete request head within `server.header_read_timeout`; the connection was closed.
#[derive(Debug)]
pub(crate) struct HeadTimeout;

pin_project_lite::pin_project! {
    /// Drives a caller connection (`server`) and its affine upstream connection in one task.
    pub(crate) struct Paired<S> {
        #[pin]
        server: S,
        client: Option<ConnFuture>,
        affinity: Arc<Affinity>,
        pair: Arc<Pair>,
        server_waker: Waker,
        client_waker: Waker,
        timer_waker: Waker,
        timer: Pin<Box<Sleep>>,
    }

    impl<S> PinnedDrop for Paired<S> {
        fn drop(this: Pin<&mut Self>) {
            // The caller's connection ended (or the task was cancelled): the upstream connection goes back to the
            // pool when it can carry another request, and is closed otherwise.
            let this = this.project();
            this.affinity.release(this.client.take());
        }
    }
}

impl<S> Paired<S> {
    /// Pairs `server` (the caller's connection) with whatever upstream connection `affinity` attaches, under the
    /// deadlines of `pair`.
    pub(crate) fn new(server: S, affinity: Arc<Affinity>, pair: Arc<Pair>) -> Self {
        // Saturating like `Pair::check`: a header_read_timeout of centuries must not overflow the clock.
        let first = pair.origin + Duration::from_nanos(nanos(pair.header_read));
        Self {
            server,
            client: None,
            affinity,
            server_waker: side(&pair, SERVER),
            client_waker: side(&pair, CLIENT),
            timer_waker: side(&pair, TIMER),
            timer: Box::pin(tokio::time::sleep_until(first)),
            pair,
        }
    }
}

impl<S: Future> Future for Paired<S> {
    type Output = Result<S::Output, HeadTimeout>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let pair = &**this.pair;
        pair.task.register(cx.waker());
        pair.flags.fetch_or(POLLING, Ordering::AcqRel);
        for _ in 0..MAX_ROUNDS {
            // Takes the woken sides, keeps POLLING.
            let woken = pair.flags.fetch_and(POLLING, Ordering::AcqRel);
            if woken & CLIENT != 0 {
                if let Some(client) = this.client.as_mut() {
                    if client
                        .as_mut()
                        .poll(&mut Context::from_waker(this.client_waker))
                        .is_ready()
                    {
                        *this.client = None;
                    }
                }
            }
            if woken & SERVER != 0 {
                if let Poll::Ready(out) = this.server.as_mut().poll(&mut Context::from_waker(this.server_waker)) {
                    return Poll::Ready(Ok(out));
                }
                // A request attached a new upstream connection (the first, or one replacing a closed one).
                if let Some(new) = this.affinity.take_pending() {
                    *this.client = Some(new);
                    pair.flags.fetch_or(CLIENT, Ordering::AcqRel);
                }
            }
            // The deadline last: a head already received (but not yet parsed) when the timer fired counts, as
            // the server's poll above has started its request.
            if woken & TIMER != 0 {
                match pair.check(Instant::now()) {
                    Check::HeadOverdue => return Poll::Ready(Err(HeadTimeout)),
                    Check::Next(at) => {
                        if at != this.timer.deadline() {
                            this.timer.as_mut().reset(at);
                        }
                        // Registers the timer (or finds it fired already: then it is checked again next round).
                        if this
                            .timer
                            .as_mut()
                            .poll(&mut Context::from_waker(this.timer_waker))
                            .is_ready()
                        {
                            pair.flags.fetch_or(TIMER, Ordering::AcqRel);
                        }
                    }
                }
            }
            if pair
                .flags
                .compare_exchange(POLLING, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Poll::Pending;
            }
        }
        // Still woken after MAX_ROUNDS: let other tasks run, and come back.
        pair.flags.fetch_and(!POLLING, Ordering::AcqRel);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests;
