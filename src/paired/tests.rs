use super::*;
use crate::busy::Busy;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

const HEAD: Duration = Duration::from_millis(500);

fn paired<S>(server: S, response: Duration) -> (Pin<Box<Paired<S>>>, Arc<Pair>) {
    let pair = Pair::new(Instant::now(), HEAD, response);
    let paired = Box::pin(Paired::new(server, Arc::new(Affinity::default()), pair.clone()));
    (paired, pair)
}

#[tokio::test(start_paused = true)]
async fn a_caller_owing_a_head_is_closed_after_header_read_timeout_and_not_before() {
    let start = Instant::now();
    let (mut p, _pair) = paired(std::future::pending::<()>(), Duration::from_secs(120));
    let early = tokio::time::timeout(HEAD - Duration::from_millis(1), p.as_mut()).await;
    assert!(early.is_err(), "closed before header_read_timeout");
    assert!(matches!(p.await, Err(HeadTimeout)));
    assert_eq!(start.elapsed(), HEAD);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_progress_is_never_cut_off_and_the_next_head_is_due_from_its_end() {
    let start = Instant::now();
    let (mut p, pair) = paired(std::future::pending::<()>(), Duration::from_secs(120));
    let busy = pair.request_started();
    let long = tokio::time::timeout(HEAD * 7, p.as_mut()).await;
    assert!(long.is_err(), "a connection with a request in progress was closed");
    drop(busy);
    let ended = Instant::now();
    assert!(tokio::time::timeout(HEAD - Duration::from_millis(1), p.as_mut())
        .await
        .is_err());
    assert!(matches!(p.await, Err(HeadTimeout)));
    assert_eq!(
        ended.elapsed(),
        HEAD,
        "the head is due header_read_timeout after the response ended"
    );
    assert_eq!(start.elapsed(), HEAD * 8);
}

#[tokio::test(start_paused = true)]
async fn a_response_head_overdue_ends_the_exchange_even_before_the_timer_was_set_to_fire() {
    let response = Duration::from_millis(300);
    let cell: Arc<std::sync::OnceLock<Arc<Pair>>> = Arc::default();
    let shared = cell.clone();
    let server = async move {
        let pair = shared.get().expect("set before the first poll").clone();
        let _busy = pair.request_started();
        let sent = Instant::now();
        let out = pair.until_overdue(sent, std::future::pending::<()>()).await;
        (out, sent.elapsed())
    };
    let (p, pair) = paired(server, response);
    cell.set(pair).ok();
    let (out, waited) = p.await.expect("no head was owed");
    assert_eq!(out, None, "the exchange outlived upstream.response_timeout");
    assert_eq!(waited, response);
}

#[tokio::test(start_paused = true)]
async fn a_response_in_time_is_not_overdue_and_the_next_one_gets_its_own_deadline() {
    let response = Duration::from_millis(300);
    let cell: Arc<std::sync::OnceLock<Arc<Pair>>> = Arc::default();
    let shared = cell.clone();
    let server = async move {
        let pair = shared.get().expect("set").clone();
        let _busy = pair.request_started();
        let quick = pair
            .until_overdue(Instant::now(), tokio::time::sleep(Duration::from_millis(250)))
            .await;
        // A second exchange on the same connection: its 300 ms start now, not at the first one's send.
        let second = pair
            .until_overdue(Instant::now(), tokio::time::sleep(Duration::from_millis(250)))
            .await;
        (quick, second)
    };
    let (p, pair) = paired(server, response);
    cell.set(pair).ok();
    assert_eq!(p.await.expect("busy"), (Some(()), Some(())));
}

/// A future that counts its polls and keeps the waker of its last poll.
#[derive(Default)]
struct Probe {
    polls: AtomicUsize,
    waker: Mutex<Option<Waker>>,
}

impl Probe {
    fn future(self: &Arc<Self>, also: Option<Arc<Probe>>) -> impl Future<Output = ()> + Send + 'static {
        let probe = self.clone();
        std::future::poll_fn(move |cx| {
            probe.polls.fetch_add(1, Ordering::SeqCst);
            *probe.waker.lock().unwrap() = Some(cx.waker().clone());
            // Like the upstream connection handing its response to the request waiting for it.
            if let Some(other) = &also {
                if let Some(w) = other.waker.lock().unwrap().as_ref() {
                    w.wake_by_ref();
                }
            }
            Poll::<()>::Pending
        })
    }
    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }
    fn wake(&self) {
        self.waker.lock().unwrap().as_ref().expect("polled once").wake_by_ref();
    }
}

/// A task waker that counts its wakes.
#[derive(Default)]
struct TaskWakes(AtomicUsize);

impl Wake for TaskWakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_wake_polls_only_the_side_it_belongs_to() {
    let (server, client) = (Arc::new(Probe::default()), Arc::new(Probe::default()));
    let (mut p, _pair) = paired(server.future(None), Duration::from_secs(120));
    p.as_mut().project().client.replace(Box::pin(client.future(None)));
    let wakes = Arc::new(TaskWakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(p.as_mut().poll(&mut cx).is_pending());
    assert_eq!((server.polls(), client.polls()), (1, 1), "the first poll polls both");
    client.wake();
    assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "a side's wake wakes the task");
    assert!(p.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        (server.polls(), client.polls()),
        (1, 2),
        "the upstream's wake polled the caller's side"
    );
    server.wake();
    assert!(p.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        (server.polls(), client.polls()),
        (2, 2),
        "the caller's wake polled the upstream side"
    );
    assert!(p.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        (server.polls(), client.polls()),
        (2, 2),
        "a poll without a wake polled a side"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wake_during_the_poll_is_served_in_it_without_waking_the_task() {
    let (server, client) = (Arc::new(Probe::default()), Arc::new(Probe::default()));
    let (mut p, _pair) = paired(server.future(None), Duration::from_secs(120));
    // The upstream side wakes the caller's side each time it is polled (a response handed over).
    p.as_mut()
        .project()
        .client
        .replace(Box::pin(client.future(Some(server.clone()))));
    let wakes = Arc::new(TaskWakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(p.as_mut().poll(&mut cx).is_pending());
    client.wake();
    let before = wakes.0.load(Ordering::SeqCst);
    assert!(p.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        (server.polls(), client.polls()),
        (2, 2),
        "the caller's side, woken by the upstream's during the poll, was not polled in it"
    );
    assert_eq!(
        wakes.0.load(Ordering::SeqCst),
        before,
        "the task was woken for a wake its poll served"
    );
}

#[tokio::test(start_paused = true)]
async fn a_head_in_by_the_deadline_counts_even_when_the_poll_comes_after_it() {
    // The caller's head arrived just before the deadline; the task only runs after it, woken by both the socket
    // and the timer: the server's side (which starts the request) goes first.
    let cell: Arc<std::sync::OnceLock<Arc<Pair>>> = Arc::default();
    let (shared, probe) = (cell.clone(), Arc::new(Probe::default()));
    let inner = probe.clone();
    let held: Arc<Mutex<Vec<Busy>>> = Arc::default();
    let keep = held.clone();
    let server = std::future::poll_fn(move |cx| {
        if inner.polls.fetch_add(1, Ordering::SeqCst) > 0 {
            // The head is parsed: its request starts.
            keep.lock().unwrap().push(shared.get().expect("set").request_started());
        }
        *inner.waker.lock().unwrap() = Some(cx.waker().clone());
        Poll::<()>::Pending
    });
    let (mut p, pair) = paired(server, Duration::from_secs(120));
    cell.set(pair).ok();
    let wakes = Arc::new(TaskWakes::default());
    let waker = Waker::from(wakes.clone());
    let mut cx = Context::from_waker(&waker);
    assert!(p.as_mut().poll(&mut cx).is_pending());
    tokio::time::advance(HEAD + Duration::from_millis(5)).await;
    probe.wake();
    assert!(
        p.as_mut().poll(&mut cx).is_pending(),
        "a head that came in time was refused"
    );
    assert_eq!(held.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn timeouts_of_centuries_do_not_overflow_the_clock() {
    let pair = Pair::new(Instant::now(), Duration::MAX, Duration::MAX);
    let mut p = Box::pin(Paired::new(
        std::future::pending::<()>(),
        Arc::new(Affinity::default()),
        pair.clone(),
    ));
    let _busy = pair.request_started();
    let waited = pair.until_overdue(Instant::now(), tokio::time::sleep(Duration::from_secs(1)));
    let (polled, waited) = tokio::join!(tokio::time::timeout(Duration::from_secs(3600), p.as_mut()), waited);
    assert!(polled.is_err(), "closed");
    assert_eq!(waited, Some(()));
}

#[tokio::test(start_paused = true)]
async fn a_request_body_still_being_read_keeps_the_connection_busy_after_its_answer() {
    let (mut p, pair) = paired(std::future::pending::<()>(), Duration::from_secs(120));
    let upload = pair.request_started();
    let answer = pair.request_started();
    drop(answer);
    assert!(
        tokio::time::timeout(HEAD * 3, p.as_mut()).await.is_err(),
        "closed mid-upload"
    );
    drop(upload);
    let ended = Instant::now();
    assert!(matches!(p.await, Err(HeadTimeout)));
    assert_eq!(ended.elapsed(), HEAD);
}
