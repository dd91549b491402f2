//! The pacing decision: a generic cell rate algorithm (GCRA) over one number, the theoretical arrival time
//! (TAT), so a decision is one atomic compare-and-swap: no lock, no allocation.
//!
//! Why GCRA and not a window of our own: ZapSign counts in fixed one-minute windows whose alignment we cannot
//! know, so the limit must hold over *any* interval of one period. Fixed windows of our own would allow twice
//! the limit across their boundary. GCRA with emission interval `T` and tolerance `tau = (burst - 1) * T` sends
//! at most `burst + P / T - 1` requests in any interval of length `P`; choosing `T = ceil(P / (limit - burst + 1))`
//! makes that at most `limit` (proof in [`Gcra::new`]).
//!
//! That bound is tight: the `limit + 1`-th request goes exactly one period after the first. What ZapSign counts
//! is arrivals, and two requests' transit times differ (a slow TLS write, a retransmit), so the limiter keeps a
//! guard: it holds the bound over `P + G` with `G` = [`jitter_guard`] (2 % of the period, at most 1 s), so
//! arrivals still keep it while transit times differ by up to `G`. It costs 2 % of the sustained rate.
//!
//! (The `governor` crate implements the same algorithm; its async waiting is neither FIFO nor on tokio's clock,
//! and the fair queue in [`super`] needs both, so the few lines of the decision live here beside it, on plain
//! nanosecond numbers that a paused-time test and the Redis script can share.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The GCRA state for one budget of `limit` requests per `period`.
#[derive(Debug)]
pub struct Gcra {
    /// Emission interval `T`, in nanoseconds: the steady spacing of requests.
    interval: u64,
    /// Tolerance `tau`, in nanoseconds: how far ahead of `now` the TAT may run (`(burst - 1) * T`).
    tolerance: u64,
    /// Theoretical arrival time, in nanoseconds since the pacer's origin.
    tat: AtomicU64,
}

/// The burst a budget of `limit` allows: a twentieth of it (at least 1). A burst lets a quiet account answer a
/// short spike at once; each request of burst costs one request of sustained rate (`limit - burst + 1` a period
/// under steady overload), so it is kept small.
pub fn burst_for(limit: u32) -> u32 {
    (limit / 20).max(1)
}

/// The margin the limiter keeps for differing transit times: 2 % of the period, at most one second (for
/// ZapSign's minute, 1 s; for a 1 s test period, 20 ms).
pub fn jitter_guard(period: Duration) -> Duration {
    (period / 50).min(Duration::from_secs(1))
}

impl Gcra {
    /// A budget of `limit` (> 0) requests in any interval of `period` plus [`jitter_guard`], with the burst
    /// [`burst_for`] gives.
    ///
    /// Proof of the bound, for `P` = period + guard: let grants `s_1 < … < s_n` fall in `[t, t + P)`. Each grant moves the TAT to
    /// `max(TAT, s_k) + T`, so before grant `n` the TAT is at least `s_1 + (n - 1) T`, and grant `n` needs
    /// `TAT - s_n <= tau`. Hence `(n - 1) T <= tau + (s_n - s_1) < (burst - 1) T + P`, and with
    /// `P / T <= limit - burst + 1` that gives `n - 1 < limit`, i.e. `n <= limit`.
    pub fn new(limit: u32, period: Duration) -> Self {
        let limit = limit.max(1);
        let burst = burst_for(limit);
        let period_ns = u64::try_from((period + jitter_guard(period)).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let slots = u64::from(limit - burst + 1);
        let interval = period_ns.div_ceil(slots);
        Self {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst - 1)),
            tat: AtomicU64::new(0),
        }
    }

    /// The steady spacing between two requests (one "slot").
    pub fn slot(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// How far ahead of now the schedule may run: the burst beyond one request, in time.
    pub fn tolerance(&self) -> Duration {
        Duration::from_nanos(self.tolerance)
    }

    /// Takes a slot at `now` (nanoseconds since the origin) if the budget allows; otherwise returns the earliest
    /// time a slot can be had.
    pub fn try_acquire(&self, now: u64) -> Result<(), u64> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(now);
            if base - now > self.tolerance {
                return Err(base - self.tolerance);
            }
            match self
                .tat
                .compare_exchange_weak(tat, base + self.interval, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// The earliest time (nanoseconds since the origin) a slot can be had, without taking it.
    pub fn next_free(&self, now: u64) -> u64 {
        self.tat
            .load(Ordering::Acquire)
            .max(now)
            .saturating_sub(self.tolerance)
            .max(now)
    }

    /// Marks the whole budget as spent at `now`: as if `limit` requests had just gone out at the steady rate.
    /// A limiter that takes over from another (shared pacing lost or regained) starts so, and never adds a
    /// burst on top of what the other one sent.
    pub fn spend_all(&self, now: u64, period: Duration) {
        let full = now.saturating_add(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        self.tat.fetch_max(full, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The most grants inside any half-open interval `[t, t + period)`.
    fn max_in_any_window(grants: &[u64], period: u64) -> usize {
        let mut best = 0;
        let mut start = 0;
        for end in 0..grants.len() {
            while grants[end] - grants[start] >= period {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best
    }

    /// Every arrival retries at the earliest time it is told, as a queue would; returns the grant times.
    fn drive(gcra: &Gcra, arrivals: &[u64]) -> Vec<u64> {
        let mut grants = Vec::new();
        let mut clock = 0;
        for &a in arrivals {
            let mut now = a.max(clock);
            loop {
                match gcra.try_acquire(now) {
                    Ok(()) => break,
                    Err(at) => {
                        assert!(at > now, "a refusal must point into the future");
                        now = at;
                    }
                }
            }
            clock = now;
            grants.push(now);
        }
        grants
    }

    #[test]
    fn a_burst_of_three_limits_stays_within_the_limit_in_every_window() {
        for limit in [1, 2, 7, 20, 100, 500] {
            let period = Duration::from_secs(60);
            let gcra = Gcra::new(limit, period);
            let arrivals = vec![0; 3 * limit as usize];
            let grants = drive(&gcra, &arrivals);
            let p = period.as_nanos() as u64;
            assert!(max_in_any_window(&grants, p) <= limit as usize, "limit {limit}");
            // The first burst goes at once.
            assert_eq!(grants.iter().filter(|g| **g == 0).count(), burst_for(limit) as usize);
        }
    }

    #[test]
    fn sustained_rate_is_close_to_the_limit() {
        let gcra = Gcra::new(500, Duration::from_secs(60));
        let grants = drive(&gcra, &vec![0; 2000]);
        let p = Duration::from_secs(60).as_nanos() as u64;
        let in_first_period = grants.iter().filter(|g| **g < p).count();
        assert!(in_first_period >= 475, "{in_first_period}");
    }

    #[test]
    fn spend_all_sends_nothing_before_the_spent_budget_ages_out() {
        let period = Duration::from_secs(60);
        let gcra = Gcra::new(500, period);
        gcra.spend_all(1_000, period);
        let at = gcra.try_acquire(1_000).unwrap_err();
        assert!(at >= 1_000 + period.as_nanos() as u64 - gcra.tolerance);
    }

    proptest! {
        /// Whatever the arrival pattern, no interval of one period holds more than `limit` grants.
        #[test]
        fn never_more_than_limit_in_any_window(
            limit in 1u32..60,
            gaps in proptest::collection::vec(0u64..3_000_000, 1..400),
        ) {
            let period = Duration::from_millis(100);
            let gcra = Gcra::new(limit, period);
            let mut t = 0;
            let arrivals: Vec<u64> = gaps.iter().map(|g| { t += g; t }).collect();
            let grants = drive(&gcra, &arrivals);
            prop_assert!(max_in_any_window(&grants, period.as_nanos() as u64) <= limit as usize);
        }
    }
}
