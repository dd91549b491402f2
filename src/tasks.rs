//! The tasks [`crate::run`] starts: caller and admin connections, HTTP/2 streams, upstream connections, the
//! background loops. Each is spawned through [`Tasks`], so once the drain is over `run` ends what is left and
//! waits for it: `run` returning means nothing it started still runs (an embedding program, a test or a bench
//! gets its sockets and memory back, and an upstream connection still open is closed, not leaked).
//!
//! Tracking costs one atomic counter and one cancellation subscription per task: no lock on the hot path
//! beyond the one tokio's own spawn takes, and nothing kept per finished task (a `JoinSet` keeps each result
//! until it is joined).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::shutdown::Shutdown;

/// A handle to spawn tracked tasks and, at the end, close them all. Cloning shares the same set.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    /// Started when every task must end: the same signal the run's loops watch, so both end the same way.
    closed: Shutdown,
    /// Tasks spawned and not yet ended.
    alive: AtomicUsize,
    /// Woken when `alive` drops to zero.
    idle: Notify,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("alive", &self.alive())
            .field("closed", &self.inner.closed.started())
            .finish()
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Tasks {
    /// An empty, open set.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                closed: Shutdown::new(),
                alive: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// Runs `task` on the current runtime until it ends or the set is closed, whichever comes first. After
    /// [`Tasks::close`] a task is dropped unrun: nothing started late outlives the close.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // Counted before the closed flag is read: `close` either sees this task alive and waits for it, or this
        // spawn sees the flag and never starts the task.
        self.inner.alive.fetch_add(1, Ordering::SeqCst);
        let guard = Alive(self.inner.clone());
        let mut closed = self.inner.closed.signal();
        if closed.is_stopped() {
            return;
        }
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                biased;
                // The `Shutdown` lives in `Inner`, which `_guard` holds: this ends only on `close`.
                () = closed.stopped() => {}
                () = task => {}
            }
        });
    }

    /// Tasks running now.
    pub fn alive(&self) -> usize {
        self.inner.alive.load(Ordering::SeqCst)
    }

    /// Ends every task (each is dropped at its next await point, closing the sockets it owns) and waits until
    /// all have ended, including those they spawned meanwhile.
    pub async fn close(&self) {
        self.inner.closed.start();
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a last task ending in between still wakes us.
            idle.as_mut().enable();
            if self.alive() == 0 {
                return;
            }
            idle.await;
        }
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

/// One task alive; dropped when the task ends, however it ends.
struct Alive(Arc<Inner>);

impl Drop for Alive {
    fn drop(&mut self) {
        if self.0.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
