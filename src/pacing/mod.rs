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
//!
//! # One budget for every replica ([`SharedPacing`])
//!
//! Several processes serving one account must spend *one* budget, or N replicas send N times the limit. With a
//! [`SharedBudget`] (the Redis store, through [`crate::sharing`]) every slot is taken from it instead of from the
//! local [`gcra::Gcra`]; the fair queue, `max_wait`, `queue_limit` and the leaving of dropped waiters stay local,
//! since they are about this process's callers. What the shared path costs: one round trip to the store and one
//! boxed future (the trait object's) per request that finds the queue empty, and one of each per slot the
//! dispatcher grants; a request that arrives while others wait makes no round trip of its own, and neither does
//! the dispatcher while the store's last answer says the budget is spent.
//!
//! The store may die at any time and must never stop requests: while [`SharedBudget::is_up`] is false (or a call
//! fails) the process paces alone with the local limiter at `limit / replicas`, and goes back to the shared
//! budget as soon as the store is up again (the dispatcher looks at least once a second, so queued requests
//! switch too). A switch to the local limiter starts it with its budget spent (the store's own switch back does
//! the same on its side), so a switch never adds a burst. An upstream 429 pauses this process at once and, in
//! shared mode, every other one through the store.

pub mod gcra;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use self::gcra::Gcra;
use crate::sharing::{SharedBudget, SharedDown};

/// The longest the dispatcher sleeps while a shared budget is configured: it looks this often whether the store
/// went away or came back, so requests already queued switch limiter too.
const MODE_CHECK: Duration = Duration::from_secs(1);

/// The shortest wait the dispatcher takes from the store: a store answering "wait 0" is asked again after this,
/// not in a loop of round trips.
const MIN_SHARED_WAIT: Duration = Duration::from_millis(1);

/// The budget every process of the account spends together, and how many processes share it.
#[derive(Debug, Clone)]
pub struct SharedPacing {
    /// The shared store's budget (`pacing.limit` per `pacing.period` for all processes together).
    pub budget: Arc<dyn SharedBudget>,
    /// Processes sharing the account (`shared.replicas`): while the store is unreachable each paces itself at
    /// `limit / replicas` (at least 1), so together they still keep to the limit.
    pub replicas: u32,
}

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
    /// `server.shutdown_grace` passed while the request still waited for a slot: the caller gets 503
    /// `shutting_down` (another replica can serve it at once), nothing sent.
    #[error("the proxy is shutting down: server.shutdown_grace passed before a slot in the account's rate limit came; send the request again (another replica will take it)")]
    ShuttingDown,
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
            Self::ShuttingDown => Duration::from_secs(1),
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
    /// Wakes the dispatcher: a new waiter, a pause, a switch of limiter, or the pacer going away.
    work: Arc<Notify>,
    /// The budget shared with the other processes of the account, when there are any.
    shared: Option<SharedPacing>,
    /// Whether slots come from `shared` now (false: from `gcra`). Always false without `shared`.
    in_shared: AtomicBool,
    /// The store's last "none until" answer (nanoseconds since `origin`): before it, nobody asks the store again
    /// (a GCRA's next free slot only moves later, and a pause only grows), which saves the round trips.
    shared_free_at: AtomicU64,
    /// One slot of the whole account's budget (`period / limit`), the spacing the shared budget grants at.
    shared_slot: Duration,
    /// Set by [`Pacer::close`] (shutdown grace over): nobody waits any more.
    closed: AtomicBool,
}

/// What the dispatcher does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Nobody waits: sleep until new work.
    Idle,
    /// Look again at this time (or on new work).
    At(Instant),
    /// Look again at once (the limiter in use changed).
    Now,
}

impl Pacer {
    /// A pacer for `settings` (limit > 0) and its dispatcher task, which ends when the pacer is dropped.
    /// Must be called inside a tokio runtime.
    ///
    /// With `shared`, slots come from the shared budget while it is up, and the local limiter (the fallback)
    /// gets `limit / replicas` (at least 1). The pacer starts with the limiter the store's state calls for and
    /// does not spend the local budget at start: a process that starts alone has sent nothing yet.
    pub fn start(settings: Settings, shared: Option<SharedPacing>) -> Arc<Self> {
        let local_limit = match &shared {
            Some(s) => (settings.limit / s.replicas.max(1)).max(1),
            None => settings.limit,
        };
        let in_shared = shared.as_ref().is_some_and(|s| s.budget.is_up());
        let pacer = Arc::new(Self {
            settings,
            origin: Instant::now(),
            gcra: Gcra::new(local_limit, settings.period),
            queue: Mutex::new(FairQueue::default()),
            waiting: AtomicUsize::new(0),
            paused_until: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            work: Arc::new(Notify::new()),
            in_shared: AtomicBool::new(in_shared),
            shared,
            shared_free_at: AtomicU64::new(0),
            shared_slot: Gcra::new(settings.limit, settings.period).slot(),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(dispatch(Arc::downgrade(&pacer), pacer.work.clone()));
        pacer
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// One slot: the steady spacing of requests once the burst is spent, for the limiter in use (the whole
    /// account's when shared, this process's share when pacing alone).
    pub fn slot(&self) -> Duration {
        if self.in_shared() {
            self.shared_slot
        } else {
            self.gcra.slot()
        }
    }

    /// Whether slots come from the shared budget now; `None` without one. For logs and tests.
    pub fn shared_in_use(&self) -> Option<bool> {
        self.shared.as_ref().map(|_| self.in_shared())
    }

    /// Requests waiting now (`zapsign_proxy_pacing_queue_depth`).
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A slot for one request of `caller`: at once when the budget has room and nobody waits, else after a fair
    /// wait. Dropping the future leaves the queue.
    pub async fn acquire(&self, caller: &CallerId) -> Result<Granted, Refused> {
        let now = self.now_ns();
        let free = self.waiting.load(Ordering::Acquire) == 0 && now >= self.paused_until.load(Ordering::Acquire);
        if let Some(budget) = self.shared_now() {
            if free && now >= self.shared_free_at.load(Ordering::Acquire) && self.acquire_shared(budget).await {
                return Ok(Granted { waited: Duration::ZERO });
            }
        } else if free && self.gcra.try_acquire(now).is_ok() {
            return Ok(Granted { waited: Duration::ZERO });
        }
        // Boxed: the waiting path is rare and its future large; the common path's future stays small.
        Box::pin(self.wait(caller.clone())).await
    }

    /// The shared fast path: one slot from the store, or false to join the queue. A failed store switches this
    /// process to its local limiter, which then decides.
    async fn acquire_shared(&self, budget: &dyn SharedBudget) -> bool {
        match budget.acquire().await {
            // A pause that began during the round trip wins: the slot is wasted (safe), nothing is sent.
            Ok(None) => self.now_ns() >= self.paused_until.load(Ordering::Acquire),
            Ok(Some(wait)) => {
                self.note_shared_wait(wait);
                false
            }
            Err(SharedDown) => {
                self.to_local();
                self.waiting.load(Ordering::Acquire) == 0 && self.gcra.try_acquire(self.now_ns()).is_ok()
            }
        }
    }

    async fn wait(&self, caller: CallerId) -> Result<Granted, Refused> {
        let start = Instant::now();
        let (grant, granted) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Checked under the queue's lock, which `close` takes too: no waiter joins after the queue emptied.
            if self.closed.load(Ordering::Acquire) {
                return Err(Refused::ShuttingDown);
            }
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
            Ok(Err(_)) if self.closed.load(Ordering::Acquire) => Err(Refused::ShuttingDown),
            _ => Err(Refused::TimedOut {
                max_wait: self.settings.max_wait,
                retry_after: self.expected_wait(self.queue_depth()),
            }),
        }
    }

    /// Shutdown's grace is over: every waiting request is refused with [`Refused::ShuttingDown`] at once (their
    /// grants are dropped), and no request waits from now on. A request that finds a free slot still goes.
    pub fn close(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        let waiting = std::mem::take(&mut *queue);
        self.waiting.store(0, Ordering::Release);
        drop(queue);
        drop(waiting);
        self.work.notify_one();
    }

    /// The upstream answered 429: grant nothing until `retry_after` from now when it said, else until the next
    /// boundary of `pacing.period` on the wall clock (multiples of the period since the Unix epoch), where
    /// ZapSign's fixed windows are expected to reset.
    pub fn pause_after_upstream_429(&self, retry_after: Option<Duration>) {
        let pause = retry_after.unwrap_or_else(|| until_next_boundary(SystemTime::now(), self.settings.period));
        let until = self.now_ns().saturating_add(nanos(pause));
        self.paused_until.fetch_max(until, Ordering::AcqRel);
        self.work.notify_one();
        // The other processes learn it through the store. Spawned so the caller does not wait for a round trip;
        // a failure is ignored, since this process's own pause already holds.
        if let (Some(shared), true) = (&self.shared, self.in_shared()) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let budget = shared.budget.clone();
                rt.spawn(async move {
                    let _ = budget.pause(pause).await;
                });
            }
        }
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

    /// How long a request that joins `depth` waiting ones can expect to wait (at least the pause). In shared
    /// mode an estimate: the store's last answer, and other processes may take slots meanwhile.
    fn expected_wait(&self, depth: usize) -> Duration {
        let now = self.now_ns();
        let free = if self.in_shared() {
            self.shared_free_at.load(Ordering::Acquire).max(now)
        } else {
            self.gcra.next_free(now)
        };
        let free = free.max(self.paused_until.load(Ordering::Acquire));
        let slots = self.slot().saturating_mul(u32::try_from(depth).unwrap_or(u32::MAX));
        Duration::from_nanos(free - now) + slots
    }

    fn in_shared(&self) -> bool {
        self.in_shared.load(Ordering::Acquire)
    }

    /// The shared budget when slots should come from it now, switching limiter when the store's state changed
    /// since the last look (one atomic load each, of the store's state and of ours).
    fn shared_now(&self) -> Option<&dyn SharedBudget> {
        let shared = self.shared.as_ref()?;
        if shared.budget.is_up() {
            if !self.in_shared() {
                self.to_shared();
            }
            Some(&*shared.budget)
        } else {
            if self.in_shared() {
                self.to_local();
            }
            None
        }
    }

    /// The store failed: pace alone, starting with the local budget spent (a switch never adds a burst). The
    /// budget is spent before the switch shows, so no request sees the local limiter still full.
    fn to_local(&self) {
        if !self.in_shared() {
            return;
        }
        self.gcra.spend_all(self.now_ns(), self.settings.period);
        if self.in_shared.swap(false, Ordering::AcqRel) {
            warn!(
                limit = (self.settings.limit / self.shared.as_ref().map_or(1, |s| s.replicas.max(1))).max(1),
                period = ?self.settings.period,
                "the shared pacing budget is unreachable; pacing this process alone at its share of the limit"
            );
            self.work.notify_one();
        }
    }

    /// The store is back: take slots from it again (it marked its budget spent before saying so).
    fn to_shared(&self) {
        self.shared_free_at.store(0, Ordering::Release);
        if !self.in_shared.swap(true, Ordering::AcqRel) {
            info!("the shared pacing budget is back; pacing with the other processes of the account again");
            self.work.notify_one();
        }
    }

    /// Remembers the store's "none for `wait`", so nobody asks it again before then.
    fn note_shared_wait(&self, wait: Duration) {
        let at = self.now_ns().saturating_add(nanos(wait.max(MIN_SHARED_WAIT)));
        self.shared_free_at.fetch_max(at, Ordering::AcqRel);
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

    /// The dispatcher's turn in shared mode: asks the store for a slot while a live waiter needs one, never
    /// holding the queue's lock across the round trip, and hands each slot to the next live waiter in turn.
    async fn grant_shared(&self, budget: &dyn SharedBudget) -> Next {
        loop {
            if !budget.is_up() {
                self.to_local();
                return Next::Now;
            }
            let now = self.now_ns();
            let not_before = self
                .paused_until
                .load(Ordering::Acquire)
                .max(self.shared_free_at.load(Ordering::Acquire));
            if now < not_before {
                return Next::At(self.origin + Duration::from_nanos(not_before));
            }
            if !self.any_live_waiter() {
                return Next::Idle;
            }
            match budget.acquire().await {
                // A pause that began during the round trip: the slot is wasted (safe); the loop sleeps it out.
                Ok(None) if self.now_ns() < self.paused_until.load(Ordering::Acquire) => {}
                Ok(None) => self.grant_next(),
                Ok(Some(wait)) => self.note_shared_wait(wait),
                Err(SharedDown) => {
                    self.to_local();
                    return Next::Now;
                }
            }
        }
    }

    /// Whether a waiter that has not gone away is queued (dropping the gone ones on the way).
    fn any_live_waiter(&self) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.drop_gone_front();
        self.waiting.store(queue.len, Ordering::Release);
        queue.len > 0
    }

    /// Hands a slot to the next live waiter in turn. When every waiter went away during the round trip, the slot
    /// is wasted: safe, merely unused.
    fn grant_next(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            queue.drop_gone_front();
            let Some(waiter) = queue.pop() else { break };
            // The receiver may close between the check and the send: try the next one in turn.
            if waiter.grant.send(()).is_ok() {
                break;
            }
        }
        self.waiting.store(queue.len, Ordering::Release);
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

/// The dispatcher: grants slots as the budget frees them, sleeps until the next one or new work. It holds the
/// pacer only while it grants (across a round trip to the store at most), never while it sleeps.
async fn dispatch(pacer: Weak<Pacer>, work: Arc<Notify>) {
    loop {
        let notified = work.notified();
        tokio::pin!(notified);
        // Registered before looking at the queue, so a waiter that arrives meanwhile is not missed.
        notified.as_mut().enable();
        let (next, shared) = {
            let Some(p) = pacer.upgrade() else { return };
            let next = match p.shared_now() {
                Some(budget) => p.grant_shared(budget).await,
                None => p.grant_due().map_or(Next::Idle, Next::At),
            };
            (next, p.shared.is_some())
        };
        match next {
            Next::Now => {}
            Next::At(at) => {
                // With a store, look at its state at least every MODE_CHECK, so queued requests switch too.
                let at = if shared {
                    at.min(Instant::now() + MODE_CHECK)
                } else {
                    at
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = &mut notified => {}
                }
            }
            Next::Idle => notified.await,
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
