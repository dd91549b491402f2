//! The pacing rules on tokio's paused clock: budget over any window, fairness bound, per-caller order, bounded
//! waits and queue, callers that go away, and the pause after an upstream 429.

use std::sync::Mutex as StdMutex;

use super::gcra::burst_for;
use super::*;

mod shared;

fn settings(limit: u32, period_ms: u64) -> Settings {
    Settings {
        limit,
        period: Duration::from_millis(period_ms),
        max_wait: Duration::from_secs(3600),
        queue_limit: 100_000,
    }
}

fn ip(n: u8) -> CallerId {
    CallerId::Ip(IpAddr::from([10, 0, 0, n]))
}

/// Grants recorded as (caller, sequence number within the caller, time since start).
type Log = Arc<StdMutex<Vec<(u8, usize, Duration)>>>;

fn spawn_requests(
    pacer: &Arc<Pacer>,
    caller: u8,
    count: usize,
    log: &Log,
    start: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..count)
        .map(|seq| {
            let (pacer, log) = (pacer.clone(), log.clone());
            tokio::spawn(async move {
                if pacer.acquire(&ip(caller)).await.is_ok() {
                    log.lock().unwrap().push((caller, seq, start.elapsed()));
                }
            })
        })
        .collect()
}

/// Lets spawned tasks run in spawn order up to their first await, so arrival order is what the test wrote.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn max_in_any_window(mut times: Vec<Duration>, period: Duration) -> usize {
    times.sort();
    let (mut best, mut start) = (0, 0);
    for end in 0..times.len() {
        while times[end] - times[start] >= period {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

#[tokio::test(start_paused = true)]
async fn a_burst_of_three_limits_is_granted_within_the_limit_in_every_window() {
    let pacer = Pacer::start(settings(20, 1000), None);
    let log: Log = Default::default();
    let start = Instant::now();
    let mut tasks = spawn_requests(&pacer, 1, 30, &log, start);
    tasks.extend(spawn_requests(&pacer, 2, 30, &log, start));
    for t in tasks {
        t.await.unwrap();
    }
    let times: Vec<Duration> = log.lock().unwrap().iter().map(|g| g.2).collect();
    assert_eq!(times.len(), 60, "every request is granted in the end");
    assert!(max_in_any_window(times, Duration::from_secs(1)) <= 20);
    assert_eq!(pacer.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn another_caller_is_served_within_two_slots_while_one_floods() {
    let pacer = Pacer::start(settings(100, 10_000), None);
    let slot = pacer.slot();
    let log: Log = Default::default();
    let start = Instant::now();
    let flood = spawn_requests(&pacer, 1, 400, &log, start);
    settle().await;
    tokio::time::sleep(slot * 37 + slot / 3).await;
    let arrived = start.elapsed();
    let other = spawn_requests(&pacer, 2, 1, &log, start);
    for t in other {
        t.await.unwrap();
    }
    let granted = log.lock().unwrap().iter().find(|g| g.0 == 2).map(|g| g.2).unwrap();
    assert!(
        granted - arrived <= slot * 2,
        "waited {:?}, slot {slot:?}",
        granted - arrived
    );
    for t in flood {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn requests_of_one_caller_keep_their_order() {
    let pacer = Pacer::start(settings(10, 1000), None);
    let log: Log = Default::default();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for caller in [1u8, 2, 3] {
        tasks.extend(spawn_requests(&pacer, caller, 15, &log, start));
        settle().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = log.lock().unwrap();
    for caller in [1u8, 2, 3] {
        let seqs: Vec<usize> = log.iter().filter(|g| g.0 == caller).map(|g| g.1).collect();
        assert_eq!(seqs, (0..15).collect::<Vec<_>>(), "caller {caller}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_is_refused_with_retry_after() {
    let pacer = Pacer::start(
        Settings {
            max_wait: Duration::from_millis(250),
            ..settings(4, 4000)
        },
        None,
    );
    for _ in 0..burst_for(4) {
        pacer.acquire(&ip(1)).await.unwrap();
    }
    let start = Instant::now();
    let refused = pacer.acquire(&ip(1)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert!(matches!(refused, Refused::TimedOut { .. }), "{refused:?}");
    assert!(refused.retry_after_secs() >= 1);
    assert_eq!(pacer.queue_depth(), 0, "the refused request left the queue");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let pacer = Pacer::start(
        Settings {
            queue_limit: 3,
            ..settings(1, 60_000)
        },
        None,
    );
    pacer.acquire(&ip(1)).await.unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let p = pacer.clone();
            tokio::spawn(async move { p.acquire(&ip(2)).await })
        })
        .collect();
    settle().await;
    assert_eq!(pacer.queue_depth(), 3);
    let refused = pacer.acquire(&ip(3)).await.unwrap_err();
    match refused {
        Refused::QueueFull { depth, retry_after } => {
            assert_eq!(depth, 3);
            // Three waiters ahead, one slot each after the current one frees.
            assert!(retry_after >= Duration::from_secs(180), "{retry_after:?}");
        }
        other => panic!("{other:?}"),
    }
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_frees_its_place_and_gets_no_slot() {
    let pacer = Pacer::start(settings(1, 1000), None);
    pacer.acquire(&ip(1)).await.unwrap();
    let gone = {
        let p = pacer.clone();
        tokio::spawn(async move { p.acquire(&ip(2)).await })
    };
    settle().await;
    assert_eq!(pacer.queue_depth(), 1);
    gone.abort();
    settle().await;
    assert_eq!(pacer.queue_depth(), 0);
    // The slot that frees one slot (1 s and the jitter guard) later goes to the next caller, not to the one that
    // left.
    let start = Instant::now();
    pacer.acquire(&ip(3)).await.unwrap();
    assert!(start.elapsed() <= pacer.slot());
}

#[tokio::test(start_paused = true)]
async fn nothing_is_granted_during_an_upstream_429_pause() {
    let pacer = Pacer::start(settings(100, 1000), None);
    pacer.pause_after_upstream_429(Some(Duration::from_secs(2)));
    let start = Instant::now();
    let log: Log = Default::default();
    let tasks = spawn_requests(&pacer, 1, 5, &log, start);
    for t in tasks {
        t.await.unwrap();
    }
    let first = log.lock().unwrap().iter().map(|g| g.2).min().unwrap();
    assert!(first >= Duration::from_secs(2), "granted at {first:?}");
    assert!(pacer.paused_until().is_none());
}

#[tokio::test(start_paused = true)]
async fn spend_all_adds_no_burst() {
    let pacer = Pacer::start(settings(10, 1000), None);
    pacer.spend_all();
    let start = Instant::now();
    pacer.acquire(&ip(1)).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(1000) - pacer.slot() * burst_for(10));
}

#[test]
fn next_boundary_is_a_multiple_of_the_period_since_the_epoch() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(125_250);
    assert_eq!(
        until_next_boundary(now, Duration::from_secs(60)),
        Duration::from_millis(54_750)
    );
    let exact = SystemTime::UNIX_EPOCH + Duration::from_secs(120);
    assert_eq!(
        until_next_boundary(exact, Duration::from_secs(60)),
        Duration::from_secs(60)
    );
}

#[test]
fn retry_after_is_whole_seconds_at_least_one() {
    let r = |ms| Refused::TimedOut {
        max_wait: Duration::ZERO,
        retry_after: Duration::from_millis(ms),
    };
    assert_eq!(r(0).retry_after_secs(), 1);
    assert_eq!(r(1).retry_after_secs(), 1);
    assert_eq!(r(1000).retry_after_secs(), 1);
    assert_eq!(r(1001).retry_after_secs(), 2);
}

#[tokio::test(start_paused = true)]
async fn closing_refuses_every_waiting_request_with_shutting_down_and_no_new_one_waits() {
    let pacer = Pacer::start(settings(2, 60_000), None);
    // The burst (1 of 2) goes; the next two wait a slot of about a minute.
    assert!(pacer.acquire(&ip(1)).await.is_ok());
    let waiting: Vec<_> = (0..2)
        .map(|n| {
            let pacer = pacer.clone();
            tokio::spawn(async move { pacer.acquire(&ip(n)).await })
        })
        .collect();
    settle().await;
    assert_eq!(pacer.queue_depth(), 2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    pacer.close();
    for w in waiting {
        assert_eq!(w.await.unwrap(), Err(Refused::ShuttingDown));
    }
    assert_eq!(pacer.queue_depth(), 0);
    // After the close nobody joins the queue: refused at once, not after max_wait.
    let before = Instant::now();
    assert_eq!(pacer.acquire(&ip(9)).await, Err(Refused::ShuttingDown));
    assert_eq!(before.elapsed(), Duration::ZERO);
    assert_eq!(Refused::ShuttingDown.retry_after_secs(), 1);
}
