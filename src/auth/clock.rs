//! The two clocks the token code reads.
//!
//! Monotonic time (token expiry, renewal times, backoff, `auth.timeout`) is tokio's `Instant`: the real clock in
//! production, and one the tests pause and advance, so every timing rule is tested in milliseconds. Wall time is
//! needed only to read a JWT's `exp` claim (seconds since the Unix epoch, on ZapSign's clock); it comes through
//! [`WallClock`] so the tests can choose it and move it together with tokio's paused clock.

use std::fmt::Debug;
use std::time::SystemTime;

/// The wall clock a JWT's `exp` claim is compared with.
pub trait WallClock: Debug + Send + Sync + 'static {
    /// Now, on the wall clock.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock, used outside tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that reads `at_start` when made and then moves exactly as tokio's clock does, so under paused
/// time a test decides what the wall clock says when a token arrives (and so how long its `exp` gives it).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FollowsTokio {
    at_start: SystemTime,
    start: tokio::time::Instant,
}

#[cfg(test)]
impl FollowsTokio {
    /// A wall clock that says `at_start` now.
    pub(crate) fn starting_at(at_start: SystemTime) -> Self {
        Self {
            at_start,
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl WallClock for FollowsTokio {
    fn now(&self) -> SystemTime {
        self.at_start + self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[tokio::test(start_paused = true)]
    async fn the_test_wall_clock_moves_with_paused_time() {
        let at_start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let wall = FollowsTokio::starting_at(at_start);
        assert_eq!(wall.now(), at_start);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(wall.now(), at_start + Duration::from_millis(1500));
    }
}
