//! The shared budget on tokio's paused clock, against a fake store that is a GCRA on tokio time with a switch to
//! make it unreachable: slots come from the store while it is up, the local limiter takes over (spent) while it
//! is down and hands back within a second, an upstream 429 pauses both, fairness holds, and a caller that goes
//! away takes no shared slot.

use std::sync::atomic::AtomicBool;

use super::*;
use crate::sharing::BoxFuture;

/// What the fake store saw: grant times (since its creation), pauses, and how often it was asked.
#[derive(Debug, Default)]
struct FakeLog {
    grants: Vec<Duration>,
    pauses: Vec<Duration>,
    paused_until: Option<Instant>,
    asks: usize,
}

/// A shared budget in memory: a GCRA of `limit` per `period` on tokio's clock, as the Redis script is on Redis's.
#[derive(Debug)]
struct FakeBudget {
    origin: Instant,
    gcra: Gcra,
    up: AtomicBool,
    /// The next call fails (and the store reports down from then on), as a timeout would.
    fail_next: AtomicBool,
    /// Whether its own pauses hold back grants (off: to show the pacer's local pause holds on its own).
    enforce_pause: bool,
    /// One round trip.
    delay: Duration,
    log: StdMutex<FakeLog>,
}

impl FakeBudget {
    fn new(limit: u32, period_ms: u64) -> Arc<Self> {
        Self::with(limit, period_ms, true, Duration::ZERO)
    }

    fn with(limit: u32, period_ms: u64, enforce_pause: bool, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            gcra: Gcra::new(limit, Duration::from_millis(period_ms)),
            up: AtomicBool::new(true),
            fail_next: AtomicBool::new(false),
            enforce_pause,
            delay,
            log: Default::default(),
        })
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    fn grants(&self) -> Vec<Duration> {
        self.log.lock().unwrap().grants.clone()
    }

    fn shared(self: &Arc<Self>, replicas: u32) -> Option<SharedPacing> {
        Some(SharedPacing {
            budget: self.clone(),
            replicas,
        })
    }
}

impl SharedBudget for FakeBudget {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn acquire(&self) -> BoxFuture<'_, Result<Option<Duration>, SharedDown>> {
        Box::pin(async move {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            if self.fail_next.swap(false, Ordering::SeqCst) {
                self.set_up(false);
            }
            if !self.is_up() {
                return Err(SharedDown);
            }
            let now = Instant::now();
            let mut log = self.log.lock().unwrap();
            log.asks += 1;
            if let Some(until) = log.paused_until.filter(|u| self.enforce_pause && *u > now) {
                return Ok(Some(until - now));
            }
            let ns = nanos(now - self.origin);
            match self.gcra.try_acquire(ns) {
                Ok(()) => {
                    log.grants.push(now - self.origin);
                    Ok(None)
                }
                Err(at) => Ok(Some(Duration::from_nanos(at - ns))),
            }
        })
    }

    fn pause(&self, pause: Duration) -> BoxFuture<'_, Result<(), SharedDown>> {
        Box::pin(async move {
            if !self.is_up() {
                return Err(SharedDown);
            }
            let mut log = self.log.lock().unwrap();
            log.pauses.push(pause);
            let until = Instant::now() + pause;
            log.paused_until = Some(log.paused_until.map_or(until, |u| u.max(until)));
            Ok(())
        })
    }
}

async fn join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}

fn granted_times(log: &Log) -> Vec<Duration> {
    log.lock().unwrap().iter().map(|g| g.2).collect()
}

#[tokio::test(start_paused = true)]
async fn two_pacers_on_one_shared_budget_keep_the_limit_together() {
    let fake = FakeBudget::new(20, 1000);
    let a = Pacer::start(settings(20, 1000), fake.shared(2));
    let b = Pacer::start(settings(20, 1000), fake.shared(2));
    assert_eq!(a.shared_in_use(), Some(true));
    let log: Log = Default::default();
    let start = fake.origin;
    let mut tasks = spawn_requests(&a, 1, 30, &log, start);
    tasks.extend(spawn_requests(&b, 2, 30, &log, start));
    join(tasks).await;
    let times = granted_times(&log);
    assert_eq!(times.len(), 60, "every request is granted in the end");
    // Every grant is one of the store's: the local limiters (10 each) granted nothing.
    assert_eq!(fake.grants().len(), 60);
    assert!(max_in_any_window(fake.grants(), Duration::from_secs(1)) <= 20);
    assert!(max_in_any_window(times, Duration::from_secs(1)) <= 20);
    assert_eq!(a.shared_in_use(), Some(true));
    assert_eq!(b.shared_in_use(), Some(true));
}

#[tokio::test(start_paused = true)]
async fn while_the_store_is_down_the_local_limiter_paces_at_its_share_starting_spent() {
    let fake = FakeBudget::new(20, 1000);
    let pacer = Pacer::start(settings(20, 1000), fake.shared(2));
    pacer.acquire(&ip(1)).await.unwrap();
    assert_eq!(fake.grants().len(), 1);
    fake.set_up(false);
    let switched = Instant::now();
    let log: Log = Default::default();
    join(spawn_requests(&pacer, 1, 30, &log, switched)).await;
    assert_eq!(pacer.shared_in_use(), Some(false));
    let times = granted_times(&log);
    assert_eq!(times.len(), 30, "requests keep flowing without the store");
    assert_eq!(fake.grants().len(), 1, "nothing came from the store while down");
    // The local limiter (20 / 2 replicas = 10 a second, burst 1) started spent: nothing for one period.
    let first = *times.iter().min().unwrap();
    assert!(
        first >= Duration::from_secs(1) - pacer.gcra.tolerance(),
        "first local grant at {first:?}"
    );
    assert!(max_in_any_window(times.clone(), Duration::from_secs(1)) <= 10);
    assert_eq!(pacer.slot(), Gcra::new(10, Duration::from_secs(1)).slot());
    // And at that share's full rate: 30 slots (100 ms and the jitter guard's share) after the spent second.
    assert!(*times.iter().max().unwrap() <= first + pacer.slot() * 29 + Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn a_failed_store_call_switches_to_the_local_limiter_spent() {
    let fake = FakeBudget::new(20, 1000);
    let pacer = Pacer::start(settings(20, 1000), fake.shared(2));
    fake.fail_next.store(true, Ordering::SeqCst);
    let start = Instant::now();
    pacer.acquire(&ip(1)).await.unwrap();
    assert_eq!(pacer.shared_in_use(), Some(false));
    assert!(fake.grants().is_empty());
    assert!(
        start.elapsed() >= Duration::from_secs(1) - pacer.gcra.tolerance(),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn when_the_store_is_back_queued_requests_take_its_slots_within_a_second() {
    // Local: 10 per 10 s (slot 1 s), spent at the switch, so without a look every second the queue would sleep
    // until about 10 s before anything came from the store again.
    let fake = FakeBudget::new(20, 10_000);
    let pacer = Pacer::start(settings(20, 10_000), fake.shared(2));
    fake.set_up(false);
    let start = fake.origin;
    let log: Log = Default::default();
    let tasks = spawn_requests(&pacer, 1, 5, &log, start);
    settle().await;
    assert_eq!(pacer.shared_in_use(), Some(false));
    assert_eq!(pacer.queue_depth(), 5);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    fake.set_up(true);
    let back = start.elapsed();
    join(tasks).await;
    assert_eq!(pacer.shared_in_use(), Some(true));
    let grants = fake.grants();
    assert_eq!(
        grants.len(),
        5,
        "every queued request took a slot of the store: {grants:?}"
    );
    assert!(
        grants[0] - back <= MODE_CHECK + Duration::from_millis(1),
        "first shared grant {:?} after the store came back",
        grants[0] - back
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_429_in_shared_mode_pauses_the_store_and_this_process() {
    // The fake records the pause but does not enforce it: what holds requests back is this process's own pause.
    let fake = FakeBudget::with(100, 1000, false, Duration::ZERO);
    let pacer = Pacer::start(settings(100, 1000), fake.shared(3));
    pacer.pause_after_upstream_429(Some(Duration::from_secs(2)));
    settle().await;
    assert_eq!(fake.log.lock().unwrap().pauses, vec![Duration::from_secs(2)]);
    let log: Log = Default::default();
    let start = fake.origin;
    join(spawn_requests(&pacer, 1, 5, &log, start)).await;
    let first = *granted_times(&log).iter().min().unwrap();
    assert!(first >= Duration::from_secs(2), "granted at {first:?}");
    assert_eq!(fake.grants().len(), 5);
    assert!(fake.grants().iter().all(|g| *g >= Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn an_upstream_429_while_the_store_is_down_still_pauses_this_process() {
    let fake = FakeBudget::new(100, 1000);
    let pacer = Pacer::start(settings(100, 1000), fake.shared(1));
    fake.set_up(false);
    pacer.pause_after_upstream_429(Some(Duration::from_secs(2)));
    settle().await;
    let start = Instant::now();
    pacer.acquire(&ip(1)).await.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn another_caller_is_served_within_two_slots_in_shared_mode() {
    let fake = FakeBudget::new(100, 10_000);
    let pacer = Pacer::start(settings(100, 10_000), fake.shared(3));
    let slot = pacer.slot();
    assert_eq!(slot, fake.gcra.slot(), "the slot is the whole account's");
    let log: Log = Default::default();
    let start = fake.origin;
    let flood = spawn_requests(&pacer, 1, 400, &log, start);
    settle().await;
    tokio::time::sleep(slot * 37 + slot / 3).await;
    let arrived = start.elapsed();
    join(spawn_requests(&pacer, 2, 1, &log, start)).await;
    let granted = log.lock().unwrap().iter().find(|g| g.0 == 2).map(|g| g.2).unwrap();
    assert!(
        granted - arrived <= slot * 2,
        "waited {:?}, slot {slot:?}",
        granted - arrived
    );
    assert_eq!(
        fake.grants().len(),
        log.lock().unwrap().len(),
        "every grant was the store's"
    );
    for t in flood {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_in_shared_mode_takes_no_shared_slot() {
    let fake = FakeBudget::new(1, 1000);
    let pacer = Pacer::start(settings(1, 1000), fake.shared(1));
    pacer.acquire(&ip(1)).await.unwrap();
    let gone = {
        let p = pacer.clone();
        tokio::spawn(async move { p.acquire(&ip(2)).await })
    };
    settle().await;
    assert_eq!(pacer.queue_depth(), 1);
    let asks = fake.log.lock().unwrap().asks;
    gone.abort();
    settle().await;
    assert_eq!(pacer.queue_depth(), 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.grants().len(),
        1,
        "no slot of the store was taken for the caller that left"
    );
    assert_eq!(fake.log.lock().unwrap().asks, asks, "nor was the store asked");
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_during_the_round_trip_wastes_at_most_that_slot() {
    let rtt = Duration::from_millis(10);
    let fake = FakeBudget::with(1, 1000, true, rtt);
    let pacer = Pacer::start(settings(1, 1000), fake.shared(1));
    pacer.acquire(&ip(1)).await.unwrap();
    let queued_at = Instant::now();
    let gone = {
        let p = pacer.clone();
        tokio::spawn(async move { p.acquire(&ip(2)).await })
    };
    // Its own round trip says "none for ~990 ms"; the dispatcher asks again then, and the caller leaves while
    // that second round trip is in flight.
    tokio::time::sleep_until(queued_at + Gcra::new(1, Duration::from_secs(1)).slot() + Duration::from_millis(5)).await;
    assert_eq!(pacer.queue_depth(), 1);
    assert_eq!(fake.log.lock().unwrap().asks, 2, "the dispatcher's ask is in flight");
    gone.abort();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pacer.queue_depth(), 0);
    // The slot in flight when it left is wasted (nobody else waits); none after.
    assert_eq!(fake.grants().len(), 2, "{:?}", fake.grants());
}
