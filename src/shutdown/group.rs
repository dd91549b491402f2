//! A stop shared by many futures, cheap enough to check on every poll: [`StopGroup`] counts its [`Member`]s,
//! [`StopGroup::stop`] wakes every one of them, and [`StopGroup::ended`] waits until none is left. The task set
//! of [`crate::tasks`] and the caller connections' graceful shutdown ([`super::graceful`]) are built on it.
//!
//! Why not a [`super::ShutdownSignal`]: its `watch` receiver's `wait_for` polls a `Notified` on every poll of
//! the future it guards, and that locks the `Notify`'s waiter list; a connection task is woken 3-5 times per
//! request, for a signal that comes once per process. Here a poll costs one Acquire load of the stop flag and
//! a `Waker::will_wake` comparison (two pointers, no atomic). The registry's lock is taken once when a member
//! first waits, once when it goes away, and once by `stop`.
//!
//! Why wakers and not tokio `AbortHandle`s in a slab: a handle exists only once `tokio::spawn` has returned,
//! so a short task could end (and free its slot) before its handle is stored, and holding the lock across the
//! spawn deadlocks when `spawn` drops the future in place (it does on a runtime that is shutting down). A
//! member registers from inside its own poll, so it never races its spawn; and the same member serves a
//! connection that must be asked to finish (graceful shutdown) rather than dropped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use slab::Slab;
use tokio::sync::Notify;

/// A set of futures stopped together; the default is not stopped and empty. Cloning shares the same set.
#[derive(Clone, Default)]
pub(crate) struct StopGroup {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Set once by [`StopGroup::stop`], never cleared.
    stopped: AtomicBool,
    /// Members not yet dropped, waiting or not.
    alive: AtomicUsize,
    /// The wakers of members that have polled [`Member::poll_stopped`] and are not dropped. `stop` empties it
    /// and nothing is added afterwards (a member that looks after the stop sees the flag instead).
    waiting: Mutex<Slab<Waker>>,
    /// Woken when `alive` drops to zero.
    idle: Notify,
}

impl Inner {
    /// No code panics while holding the lock, so a poisoned registry is still consistent.
    fn waiting(&self) -> MutexGuard<'_, Slab<Waker>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StopGroup {
    /// One more member, counted until it is dropped.
    pub(crate) fn member(&self) -> Member {
        // SeqCst with the flag: whoever adds a member and then reads the flag, against `stop` setting the flag
        // and then reading the count, one of the two sees the other.
        self.inner.alive.fetch_add(1, Ordering::SeqCst);
        Member {
            inner: self.inner.clone(),
            slot: None,
        }
    }

    /// Stops every member, now and to come: each waiting one is woken and sees the stop at its next poll.
    /// Stopping twice is stopping once.
    pub(crate) fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.inner.waiting());
        // Woken outside the lock: a waker may run anything, including a member's drop, which takes the lock.
        for (_, waker) in waiting {
            waker.wake();
        }
    }

    /// Whether [`StopGroup::stop`] was called.
    pub(crate) fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Members not yet dropped.
    pub(crate) fn alive(&self) -> usize {
        self.inner.alive.load(Ordering::SeqCst)
    }

    /// Completes once no member is left (at once if none is).
    pub(crate) async fn ended(&self) {
        loop {
            let idle = self.inner.idle.notified();
            tokio::pin!(idle);
            // Registered before the count is read, so a last member dropped in between still wakes us.
            idle.as_mut().enable();
            if self.alive() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Wakers held now: one per member waiting, none after the stop.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.inner.waiting().len()
    }
}

/// One future's place in a [`StopGroup`]; dropping it leaves the group.
pub(crate) struct Member {
    inner: Arc<Inner>,
    /// The registry key and the waker stored under it, once this member has waited.
    slot: Option<(usize, Waker)>,
}

impl Member {
    /// Whether the group is stopped, without waiting.
    pub(crate) fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Ready once the group is stopped. The first call registers the waker (one lock); later calls with the
    /// same waker cost one Acquire load.
    pub(crate) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.inner.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        match &self.slot {
            // A tokio task's waker is the same on every poll: this is the path a running task takes.
            Some((_, stored)) if stored.will_wake(cx.waker()) => Poll::Pending,
            _ => self.register(cx.waker()),
        }
    }

    /// Stores `waker` (first wait, or a future moved to another waker), then checks the flag again.
    #[cold]
    fn register(&mut self, waker: &Waker) -> Poll<()> {
        let mut waiting = self.inner.waiting();
        // Read under the lock: `stop` sets the flag before it empties the registry, so a waker stored while
        // the flag still reads false is among those it wakes.
        if self.inner.stopped.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        match &mut self.slot {
            Some((key, stored)) => {
                waiting[*key].clone_from(waker);
                stored.clone_from(waker);
            }
            None => self.slot = Some((waiting.insert(waker.clone()), waker.clone())),
        }
        Poll::Pending
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some((key, _)) = self.slot.take() {
            let mut waiting = self.inner.waiting();
            // Once stopped, the registry was (or is about to be) emptied and this key is not ours any more.
            if !self.inner.stopped.load(Ordering::Acquire) {
                waiting.remove(key);
            }
        }
        if self.inner.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use std::time::Duration;

    /// Counts its wakes.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn stop_wakes_each_waiting_member_once_and_keeps_no_waker() {
        let group = StopGroup::default();
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut members: Vec<Member> = (0..3).map(|_| group.member()).collect();
        for member in &mut members {
            for _ in 0..5 {
                assert!(member.poll_stopped(&mut cx).is_pending());
            }
        }
        assert_eq!(group.waiting(), 3, "one waker per member, however often it polls");
        group.stop();
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        assert_eq!(group.waiting(), 0);
        assert!(members.iter_mut().all(|m| m.poll_stopped(&mut cx).is_ready()));
        // A member that comes after the stop sees it at once and registers nothing.
        let mut late = group.member();
        assert!(late.is_stopped() && late.poll_stopped(&mut cx).is_ready());
        assert_eq!(group.waiting(), 0);
        assert_eq!(group.alive(), 4);
        drop(members);
        drop(late);
        assert_eq!(group.alive(), 0);
    }

    #[test]
    fn a_dropped_member_leaves_nothing_and_a_new_waker_replaces_the_old() {
        let group = StopGroup::default();
        let (first, second) = (Arc::new(Count::default()), Arc::new(Count::default()));
        let mut member = group.member();
        let waker = Waker::from(first.clone());
        assert!(member.poll_stopped(&mut Context::from_waker(&waker)).is_pending());
        let waker = Waker::from(second.clone());
        assert!(member.poll_stopped(&mut Context::from_waker(&waker)).is_pending());
        assert_eq!(group.waiting(), 1);
        let gone = group.member();
        let mut other = group.member();
        assert!(other.poll_stopped(&mut Context::from_waker(&waker)).is_pending());
        drop(other);
        drop(gone);
        assert_eq!((group.waiting(), group.alive()), (1, 1));
        group.stop();
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "the replaced waker is not woken");
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        drop(member);
        assert_eq!(group.alive(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ended_waits_for_the_last_member() {
        let group = StopGroup::default();
        group.ended().await;
        let mut member = group.member();
        let waiter = tokio::spawn(async move {
            poll_fn(|cx| member.poll_stopped(cx)).await;
            // Still a member a moment after the stop: `ended` must wait for the drop.
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        tokio::task::yield_now().await;
        group.stop();
        let start = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), group.ended())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        waiter.await.unwrap();
    }
}
