//! Pacing: keeps what this process sends upstream within the account's budget (`pacing.limit` requests in any
//! interval of `pacing.period`), makes over-budget requests wait in a queue that is fair across callers, and
//! stops sending while the upstream has answered 429.
//!
//! - The decision is [`gcra::Gcra`]: one compare-and-swap when the budget is not exhausted and nobody waits, so a
//!   request under budget pays no lock and no allocation.
//! - Over budget, a request joins its caller's FIFO queue; callers take turns (round robin), so while one caller
//!   floods, a request from another caller that has nothing else waiting is granted within two slots of arriving
//!   (slot = period / limit, see [`Pacer::slot`]). One dispatcher task grants slots as the budget frees them.
//! - A wait is bounded by `pacing.max_wait` and the queue by `pacing.queue_limit`; either refusal carries the
//!   seconds until a slot is expected. A waiter that goes away (its future dropped) leaves the queue at once.
//! - All time is tokio's, so the rules are tested with paused time.

pub mod gcra;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use self::gcra::Gcra;

/// Who a waiting request belongs to, for fairness: the client key's id when callers present keys, else the
/// caller's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CallerId {
    /// The id of the client key presented (never the key itself).
    Key(Arc<str>),
    /// The caller's IP address.
    Ip(IpAddr),
}

/// The pacing settings, validated (`pacing.*`); a limit of 0 means no pacer is built at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Requests per period (> 0).
    pub limit: u32,
    /// The period the limit holds over, whatever its alignment.
    pub period: Duration,
    /// Longest a request waits for a slot.
    pub max_wait: Duration,
    /// Requests waiting at once.
    pub queue_limit: usize,
}

/// A slot was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// How long the request waited for it (zero when the budget had room).
    pub waited: Duration,
}

/// No slot: the caller gets 429 `rate_limited` with `Retry-After`, and nothing is sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `pacing.queue_limit` requests already wait.
    #[error(
        "{depth} requests already wait for the account's rate limit (pacing.queue_limit); retry in {retry_after:?}"
    )]
    QueueFull {
        /// Requests waiting.
        depth: usize,
        /// When a slot is expected.
        retry_after: Duration,
    },
    /// No slot came within `pacing.max_wait`.
    #[error("no slot in the account's rate limit within pacing.max_wait ({max_wait:?}); retry in {retry_after:?}")]
    TimedOut {
        /// The wait that ran out.
        max_wait: Duration,
        /// When a slot is expected.
        retry_after: Duration,
    },
}

impl Refused {
    /// The `Retry-After` to send: whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        let d = match self {
            Self::QueueFull { retry_after, .. } | Self::TimedOut { retry_after, .. } => *retry_after,
        };
        u64::try_from(d.as_nanos().div_ceil(1_000_000_000))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// One waiting request: the dispatcher grants its slot through `grant`.
#[derive(Debug)]
struct Waiter {
    id: u64,
    grant: oneshot::Sender<()>,
}

/// Per-caller FIFO queues served round robin.
#[derive(Debug, Default)]
struct FairQueue {
    by_caller: HashMap<CallerId, VecDeque<Waiter>>,
    /// Callers with waiters, in the order they get their next turn.
    turns: VecDeque<CallerId>,
    len: usize,
}

impl FairQueue {
    fn push(&mut self, caller: CallerId, waiter: Waiter) {
        let queue = self.by_caller.entry(caller.clone()).or_default();
        if queue.is_empty() {
            self.turns.push_back(caller);
        }
        queue.push_back(waiter);
        self.len += 1;
    }

    /// The next waiter in turn; its caller goes to the back of the turns if it has more waiting.
    fn pop(&mut self) -> Option<Waiter> {
        let caller = self.turns.pop_front()?;
        let queue = self.by_caller.get_mut(&caller)?;
        let waiter = queue.pop_front();
        if queue.is_empty() {
            self.by_caller.remove(&caller);
        } else {
            self.turns.push_back(caller);
        }
        self.len -= usize::from(waiter.is_some());
        waiter
    }

    /// Removes a waiter that went away; no-op when it was already granted.
    fn remove(&mut self, caller: &CallerId, id: u64) {
        let Some(queue) = self.by_caller.get_mut(caller) else {
            return;
        };
        let before = queue.len();
        queue.retain(|w| w.id != id);
        self.len -= before - queue.len();
        if queue.is_empty() {
            self.by_caller.remove(caller);
            self.turns.retain(|c| c != caller);
        }
    }

    /// Drops waiters whose request went away from the front of the turns, so the next pop is a live one.
    fn drop_gone_front(&mut self) {
        while let Some(caller) = self.turns.front() {
            let Some(queue) = self.by_caller.get_mut(caller) else {
                self.turns.pop_front();
                continue;
            };
            let before = queue.len();
            while queue.front().is_some_and(|w| w.grant.is_closed()) {
                queue.pop_front();
            }
            self.len -= before - queue.len();
            if !queue.is_empty() {
                return;
            }
            let caller = caller.clone();
            self.by_caller.remove(&caller);
            self.turns.pop_front();
        }
    }
}

/// The pacer of one process.
#[derive(Debug)]
pub struct Pacer {
    settings: Settings,
    origin: Instant,
    gcra: Gcra,
    queue: Mutex<FairQueue>,
    /// The queue's length, readable without the lock (fast path, metrics).
    waiting: AtomicUsize,
    /// Nothing is granted before this (nanoseconds since `origin`): an upstream 429's pause.
    paused_until: AtomicU64,
    next_id: AtomicU64,
    /// Wakes the dispatcher: a new waiter, a pause, or the pacer going away.
    work: Arc<Notify>,
}

impl Pacer {
    /// A pacer for `settings` (limit > 0) and its dispatcher task, which ends when the pacer is dropped.
    /// Must be called inside a tokio runtime.
    pub fn start(settings: Settings) -> Arc<Self> {
        let pacer = Arc::new(Self {
            settings,
            origin: Instant::now(),
            gcra: Gcra::new(settings.limit, settings.period),
            queue: Mutex::new(FairQueue::default()),
            waiting: AtomicUsize::new(0),
            paused_until: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            work: Arc::new(Notify::new()),
        });
        tokio::spawn(dispatch(Arc::downgrade(&pacer), pacer.work.clone()));
        pacer
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// One slot: the steady spacing of requests once the burst is spent.
    pub fn slot(&self) -> Duration {
        self.gcra.slot()
    }

    /// Requests waiting now (`zapsign_proxy_pacing_queue_depth`).
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A slot for one request of `caller`: at once when the budget has room and nobody waits, else after a fair
    /// wait. Dropping the future leaves the queue.
    pub async fn acquire(&self, caller: &CallerId) -> Result<Granted, Refused> {
        let now = self.now_ns();
        if self.waiting.load(Ordering::Acquire) == 0
            && now >= self.paused_until.load(Ordering::Acquire)
            && self.gcra.try_acquire(now).is_ok()
        {
            return Ok(Granted { waited: Duration::ZERO });
        }
        // Boxed: the waiting path is rare and its future large; the common path's future stays small.
        Box::pin(self.wait(caller.clone())).await
    }

    async fn wait(&self, caller: CallerId) -> Result<Granted, Refused> {
        let start = Instant::now();
        let (grant, granted) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.len >= self.settings.queue_limit {
                return Err(Refused::QueueFull {
                    depth: queue.len,
                    retry_after: self.expected_wait(queue.len),
                });
            }
            queue.push(caller.clone(), Waiter { id, grant });
            self.waiting.store(queue.len, Ordering::Release);
        }
        self.work.notify_one();
        let mut leave = Leave {
            pacer: self,
            caller,
            id,
            granted: false,
        };
        match tokio::time::timeout(self.settings.max_wait, granted).await {
            Ok(Ok(())) => {
                leave.granted = true;
                Ok(Granted {
                    waited: start.elapsed(),
                })
            }
            _ => Err(Refused::TimedOut {
                max_wait: self.settings.max_wait,
                retry_after: self.expected_wait(self.queue_depth()),
            }),
        }
    }

    /// The upstream answered 429: grant nothing until `retry_after` from now when it said, else until the next
    /// boundary of `pacing.period` on the wall clock (multiples of the period since the Unix epoch), where
    /// ZapSign's fixed windows are expected to reset.
    pub fn pause_after_upstream_429(&self, retry_after: Option<Duration>) {
        let pause = retry_after.unwrap_or_else(|| until_next_boundary(SystemTime::now(), self.settings.period));
        let until = self.now_ns().saturating_add(nanos(pause));
        self.paused_until.fetch_max(until, Ordering::AcqRel);
        self.work.notify_one();
    }

    /// When the current pause (if any) ends.
    pub fn paused_until(&self) -> Option<Instant> {
        let until = self.paused_until.load(Ordering::Acquire);
        (until > self.now_ns()).then(|| self.origin + Duration::from_nanos(until))
    }

    /// Marks the whole budget as spent now: a limiter taking over from another never adds a burst.
    pub fn spend_all(&self) {
        self.gcra.spend_all(self.now_ns(), self.settings.period);
    }

    /// How long a request that joins `depth` waiting ones can expect to wait (at least the pause).
    fn expected_wait(&self, depth: usize) -> Duration {
        let now = self.now_ns();
        let free = self.gcra.next_free(now).max(self.paused_until.load(Ordering::Acquire));
        let slots = self
            .gcra
            .slot()
            .saturating_mul(u32::try_from(depth).unwrap_or(u32::MAX));
        Duration::from_nanos(free - now) + slots
    }

    fn now_ns(&self) -> u64 {
        nanos(self.origin.elapsed())
    }

    /// Grants every slot the budget has now, in turn; returns when the next grant may be possible (`None`:
    /// nobody waits).
    fn grant_due(&self) -> Option<Instant> {
        let now = self.now_ns();
        let paused = self.paused_until.load(Ordering::Acquire);
        if now < paused {
            return Some(self.origin + Duration::from_nanos(paused));
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            queue.drop_gone_front();
            self.waiting.store(queue.len, Ordering::Release);
            if queue.len == 0 {
                return None;
            }
            if let Err(at) = self.gcra.try_acquire(now) {
                return Some(self.origin + Duration::from_nanos(at));
            }
            if let Some(waiter) = queue.pop() {
                // A waiter that went away between the check and now wastes this slot: safe, merely unused.
                let _ = waiter.grant.send(());
            }
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.work.notify_one();
    }
}

/// Takes a waiter out of the queue when its request goes away before being granted.
struct Leave<'a> {
    pacer: &'a Pacer,
    caller: CallerId,
    id: u64,
    granted: bool,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut queue = self.pacer.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.remove(&self.caller, self.id);
        self.pacer.waiting.store(queue.len, Ordering::Release);
    }
}

/// The dispatcher: grants slots as the budget frees them, sleeps until the next one or new work.
async fn dispatch(pacer: Weak<Pacer>, work: Arc<Notify>) {
    loop {
        let notified = work.notified();
        tokio::pin!(notified);
        // Registered before looking at the queue, so a waiter that arrives meanwhile is not missed.
        notified.as_mut().enable();
        let next = match pacer.upgrade() {
            Some(p) => p.grant_due(),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => {}
                }
            }
            None => notified.await,
        }
    }
}

/// Time from `now` to the next multiple of `period` since the Unix epoch.
pub fn until_next_boundary(now: SystemTime, period: Duration) -> Duration {
    let since = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let p = period.as_nanos().max(1);
    let rem = since.as_nanos() % p;
    Duration::from_nanos(u64::try_from(p - rem).unwrap_or(u64::MAX))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
