//! The tasks [`crate::run`] starts: caller and admin connections, HTTP/2 streams, upstream connections, the
//! background loops. Each is spawned through [`Tasks`], so once the drain is over `run` ends what is left and
//! waits for it: `run` returning means nothing it started still runs (an embedding program, a test or a bench
//! gets its sockets and memory back, and an upstream connection still open is closed, not leaked).
//!
//! Tracking costs, per task, one atomic count and one [`Member`] of a [`StopGroup`]: a lock when the task first
//! waits and one when it ends (the registry of wakers that `close` wakes), and one Acquire load of the closed
//! flag per poll. A task is woken 3-5 times per request, so the per-poll check must be that cheap; the
//! `watch`-based [`crate::shutdown::ShutdownSignal`] it replaced locked a `Notify` on every poll. Nothing is kept
//! per finished task (a `JoinSet` keeps each result until it is joined).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::shutdown::{Member, StopGroup};

/// A handle to spawn tracked tasks and, at the end, close them all. Cloning shares the same set.
#[derive(Clone, Default)]
pub struct Tasks {
    /// Each task is a member until its future is dropped; stopping the group is closing the set.
    group: StopGroup,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("alive", &self.alive())
            .field("closed", &self.group.is_stopped())
            .finish()
    }
}

impl Tasks {
    /// An empty, open set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task` on the current runtime until it ends or the set is closed, whichever comes first. After
    /// [`Tasks::close`] a task is dropped unrun: nothing started late outlives the close.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Counted before the closed flag is read: `close` either sees this task alive and waits for it, or this
        // spawn sees the flag and never starts the task.
        let member = self.group.member();
        if member.is_stopped() {
            return;
        }
        tokio::spawn(Tracked { task, member });
    }

    /// Tasks running now.
    pub fn alive(&self) -> usize {
        self.group.alive()
    }

    /// Ends every task (each is dropped at its next await point, closing the sockets it owns) and waits until
    /// all have ended, including those they spawned meanwhile.
    pub async fn close(&self) {
        self.group.stop();
        self.group.ended().await;
    }
}

/// hyper spawns through this: HTTP/2 streams of callers, and the upstream client's connections and pool
/// timer, so they are closed with the rest.
impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut);
    }
}

pin_project_lite::pin_project! {
    /// A task of the set: ends, unpolled, at its first wake-up after `close` (which wakes it). Its member
    /// leaves the set when tokio drops the future, however the task ends.
    struct Tracked<F> {
        // Declared first, so dropped first: what the task holds is gone before its member leaves the set, and
        // `close` returning means that every task's sockets and memory are released.
        #[pin]
        task: F,
        member: Member,
    }
}

impl<F: Future<Output = ()>> Future for Tracked<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        // Checked first, as the `biased` select it replaces did: a closed set never polls its tasks again.
        if this.member.poll_stopped(cx).is_ready() {
            return Poll::Ready(());
        }
        this.task.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// Polls until `tasks` has none alive, up to a deadline.
    async fn drained(tasks: &Tasks) -> bool {
        let end = tokio::time::Instant::now() + Duration::from_secs(5);
        while tasks.alive() > 0 && tokio::time::Instant::now() < end {
            tokio::task::yield_now().await;
        }
        tasks.alive() == 0
    }

    #[tokio::test]
    async fn close_ends_running_tasks_and_waits_for_them() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            // Holds `tx` until dropped: the receiver sees the drop.
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        assert_eq!(tasks.alive(), 1);
        tasks.close().await;
        assert_eq!(tasks.alive(), 0);
        assert!(rx.await.is_err(), "the task was dropped, and what it held with it");
    }

    #[tokio::test]
    async fn tasks_that_end_on_their_own_are_not_kept() {
        let tasks = Tasks::new();
        for _ in 0..100 {
            tasks.spawn(async { tokio::task::yield_now().await });
        }
        assert!(drained(&tasks).await, "{} still alive", tasks.alive());
        tasks.close().await;
    }

    #[tokio::test]
    async fn children_end_with_close_and_a_task_spawned_after_close_never_runs() {
        let tasks = Tasks::new();
        let inner = tasks.clone();
        let (spawned_tx, spawned_rx) = tokio::sync::oneshot::channel();
        let (child_tx, child_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            inner.spawn(async move {
                let _held = child_tx;
                std::future::pending::<()>().await;
            });
            let _ = spawned_tx.send(());
            std::future::pending::<()>().await;
        });
        spawned_rx.await.unwrap();
        tasks.close().await;
        assert_eq!(tasks.alive(), 0);
        assert!(child_rx.await.is_err(), "the child task was dropped");
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        tasks.spawn(async move { flag.store(true, Ordering::SeqCst) });
        tokio::task::yield_now().await;
        assert!(!ran.load(Ordering::SeqCst));
        assert_eq!(tasks.alive(), 0);
    }

    /// Counts the tasks that started and those dropped.
    #[derive(Default)]
    struct Census {
        ran: AtomicUsize,
        dropped: AtomicUsize,
    }

    struct Dropped(Arc<Census>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A task that starts and then waits on nothing, forever.
    fn blocked(census: &Arc<Census>) -> impl Future<Output = ()> + Send + 'static {
        let census = census.clone();
        async move {
            census.ran.fetch_add(1, Ordering::SeqCst);
            let _dropped = Dropped(census);
            std::future::pending::<()>().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn close_ends_a_task_blocked_on_a_pending_future_at_once() {
        let tasks = Tasks::new();
        let census = Arc::new(Census::default());
        tasks.spawn(blocked(&census));
        // Started and parked: only `close` waking it can end it now.
        while census.ran.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), tasks.close())
            .await
            .expect("close ends a parked task");
        assert_eq!(start.elapsed(), Duration::ZERO, "no timer was waited on");
        assert_eq!(census.dropped.load(Ordering::SeqCst), 1);
        assert_eq!(tasks.alive(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_spawned_while_closing_are_ended_or_never_run() {
        let tasks = Tasks::new();
        let census = Arc::new(Census::default());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Stops the spawner thread even when an assertion fails first.
        struct Halt(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Halt {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let halt = Halt(stop.clone());
        let spawned = Arc::new(AtomicUsize::new(0));
        // Spawns from another thread, before, during and after the close; at most 1,000 alive at a time, so the
        // backlog the close works through stays small however fast this thread is.
        let spawner = {
            let (tasks, census, stop, spawned) = (tasks.clone(), census.clone(), stop.clone(), spawned.clone());
            let runtime = tokio::runtime::Handle::current();
            std::thread::spawn(move || {
                let _entered = runtime.enter();
                while !stop.load(Ordering::SeqCst) {
                    if tasks.alive() >= 1_000 {
                        std::thread::yield_now();
                        continue;
                    }
                    tasks.spawn(blocked(&census));
                    spawned.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let at_least = |count: &AtomicUsize, n: usize| {
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while count.load(Ordering::SeqCst) < n && std::time::Instant::now() < end {
                std::thread::yield_now();
            }
            count.load(Ordering::SeqCst) >= n
        };
        assert!(at_least(&census.ran, 100), "tasks run before the close");
        tokio::time::timeout(Duration::from_secs(10), tasks.close())
            .await
            .expect("close ends even while tasks keep coming");
        let ran = census.ran.load(Ordering::SeqCst);
        assert_eq!(
            census.dropped.load(Ordering::SeqCst),
            ran,
            "every task that ran was ended"
        );
        // More spawns after the close: none of them runs.
        let after_close = spawned.load(Ordering::SeqCst);
        assert!(at_least(&spawned, after_close + 100), "the spawner goes on");
        drop(halt);
        spawner.join().expect("the spawner thread");
        tokio::task::yield_now().await;
        assert_eq!(census.ran.load(Ordering::SeqCst), ran);
        assert_eq!(tasks.alive(), 0);
    }
}
