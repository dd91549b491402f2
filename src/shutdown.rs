//! The stop signal of a run: [`Shutdown`] is flipped once, by whoever decides that the run ends, and every
//! loop that must end with it (the accept loops, the renewer, the memory trimmer) holds a [`ShutdownSignal`]
//! and selects on [`ShutdownSignal::stopped`].
//!
//! That signal is meant for loops that check it once per turn. What is checked on every poll of many futures
//! (every tracked task, every caller connection) uses [`StopGroup`] instead: one atomic load per poll, where a
//! [`ShutdownSignal`] registers with a `Notify` (a lock) each time; [`graceful`] builds the caller connections'
//! graceful shutdown on it.
//!
//! A leaf module on purpose: the listeners, the token renewer and the task set all wait on the same signal,
//! and none of them should have to import another to do so.

pub(crate) mod graceful;
mod group;

pub(crate) use group::{Member, StopGroup};

use tokio::sync::watch;

/// The side that starts the shutdown. Dropping it counts as starting it: a signal whose sender is gone can
/// never be told to go on, so its loops end.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Not started.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }

    /// Tells every [`ShutdownSignal`] to stop. Starting twice is starting once.
    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Whether [`Shutdown::start`] was called.
    pub fn started(&self) -> bool {
        *self.tx.borrow()
    }

    /// A signal for one more loop to watch.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }
}

/// One loop's view of a [`Shutdown`]; clone it for each loop.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl ShutdownSignal {
    /// Completes once the shutdown has started (at once if it already has, or if the [`Shutdown`] is gone).
    /// Cancel-safe: meant for `tokio::select!` in a loop.
    pub async fn stopped(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// Whether the shutdown has started, without waiting.
    pub fn is_stopped(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_signal_sees_the_start_even_one_taken_after_it() {
        let shutdown = Shutdown::new();
        let mut before = shutdown.signal();
        assert!(!before.is_stopped());
        let waiting = tokio::spawn(async move { before.stopped().await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        shutdown.start();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        let mut after = shutdown.signal();
        assert!(after.is_stopped() && shutdown.started());
        tokio::time::timeout(Duration::from_secs(5), after.stopped())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_shutdown_stops_its_signals() {
        let shutdown = Shutdown::new();
        let mut signal = shutdown.signal();
        drop(shutdown);
        assert!(signal.is_stopped());
        tokio::time::timeout(Duration::from_secs(5), signal.stopped())
            .await
            .unwrap();
    }
}
