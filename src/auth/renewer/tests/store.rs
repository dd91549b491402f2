//! An in-memory [`SharedTokens`] for the sharing tests: one stored token, the generation counter, and the renewal
//! lock with its TTL on tokio's (paused) clock, as the Redis store keeps them; a switch that breaks it, and counts
//! of the calls made.
//!
//! Like the real store, a broken one still says it is up until a call fails (it learns of an outage only then);
//! from the first failure [`SharedTokens::is_up`] is false until it is mended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::sharing::{BoxFuture, Fence, SharedDown, SharedToken, SharedTokens, TokenRecord};

/// The calls made to the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub current: usize,
    pub try_lock: usize,
    pub publish: usize,
    pub unlock: usize,
}

#[derive(Debug, Default)]
struct Inner {
    token: Option<SharedToken>,
    counter: u64,
    /// The lock's fencing value and when its TTL runs out.
    lock: Option<(String, Instant)>,
    fences: u64,
    counts: Counts,
}

impl Inner {
    /// The lock's fence, unless its TTL has run out.
    fn holder(&mut self) -> Option<&str> {
        if self.lock.as_ref().is_some_and(|(_, until)| *until <= Instant::now()) {
            self.lock = None;
        }
        self.lock.as_ref().map(|(fence, _)| fence.as_str())
    }
}

/// The fake store every "process" of a test shares.
#[derive(Debug)]
pub(super) struct FakeStore {
    inner: Mutex<Inner>,
    broken: AtomicBool,
    up: AtomicBool,
}

impl FakeStore {
    /// An empty store that answers.
    pub(super) fn new() -> Self {
        Self {
            inner: Mutex::default(),
            broken: AtomicBool::new(false),
            up: AtomicBool::new(true),
        }
    }

    /// Every call fails from now on (and `is_up` turns false at the first failure).
    pub(super) fn break_down(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }

    /// Answers again, with what it held before.
    pub(super) fn mend(&self) {
        self.broken.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Another process takes the lock for `ttl` and never publishes nor releases it (it crashed).
    pub(super) fn lock_by_crashed_process(&self, ttl: Duration) {
        self.inner.lock().unwrap().lock = Some(("crashed".into(), Instant::now() + ttl));
    }

    /// The stored token's generation.
    pub(super) fn generation(&self) -> Option<u64> {
        self.inner.lock().unwrap().token.as_ref().map(|t| t.generation)
    }

    /// The calls made so far.
    pub(super) fn counts(&self) -> Counts {
        self.inner.lock().unwrap().counts
    }

    /// Runs `op` on the data, or fails as a store that does not answer.
    fn answer<T: Send + 'static>(&self, op: impl FnOnce(&mut Inner) -> T) -> BoxFuture<'static, Result<T, SharedDown>> {
        let result = if self.broken.load(Ordering::SeqCst) {
            self.up.store(false, Ordering::SeqCst);
            Err(SharedDown)
        } else {
            Ok(op(&mut self.inner.lock().unwrap()))
        };
        Box::pin(async move { result })
    }
}

impl SharedTokens for FakeStore {
    fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    fn current(&self) -> BoxFuture<'_, Result<Option<SharedToken>, SharedDown>> {
        self.answer(|s| {
            s.counts.current += 1;
            s.token.clone()
        })
    }

    fn try_lock(&self, ttl: Duration) -> BoxFuture<'_, Result<Option<Fence>, SharedDown>> {
        self.answer(move |s| {
            s.counts.try_lock += 1;
            if s.holder().is_some() {
                return None;
            }
            s.fences += 1;
            let fence = format!("fence-{}", s.fences);
            s.lock = Some((fence.clone(), Instant::now() + ttl));
            Some(Fence(fence))
        })
    }

    fn publish<'a>(
        &'a self,
        fence: &'a Fence,
        token: &'a TokenRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, SharedDown>> {
        self.answer(|s| {
            s.counts.publish += 1;
            if s.holder() != Some(fence.0.as_str()) {
                return None;
            }
            s.counter += 1;
            s.token = Some(SharedToken {
                generation: s.counter,
                record: token.clone(),
            });
            Some(s.counter)
        })
    }

    fn unlock<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), SharedDown>> {
        self.answer(|s| {
            s.counts.unlock += 1;
            if s.holder() == Some(fence.0.as_str()) {
                s.lock = None;
            }
        })
    }
}
