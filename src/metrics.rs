//! Counters for `/metrics`, in Prometheus text format (exposition format 0.0.4).
//!
//! Every per-request update is a relaxed atomic add on a preallocated slot: no lock, no allocation, no map
//! lookup on the hot path (a registry with label maps or a locked histogram would add one per request).
//! Labels are fixed and low-cardinality: status codes, error kinds, renewal kind and result.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use crate::auth::client::{AuthError, Issued};
use crate::auth::holder::{Readiness, TokenHolder};
use crate::error::UpstreamFailure;

/// Upper bounds of the request duration histogram, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
const RENEWAL_KINDS: [&str; 2] = ["login", "refresh"];
const RENEWAL_RESULTS: [&str; 4] = ["ok", "rate_limited", "rejected", "error"];
const UPSTREAM_KINDS: [&str; 3] = ["connect", "protocol", "timeout"];

/// The proxy's counters.
#[derive(Debug)]
pub struct Metrics {
    requests: [AtomicU64; 600],
    /// Per-bucket (not cumulative) request counts; the last slot counts durations above the largest bound.
    /// There is no separate count: `+Inf` and `_count` are the sum of one read of these slots, so a scrape
    /// never shows `+Inf` below a finite bucket, however requests race with it.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    duration_sum_ns: AtomicU64,
    upstream_errors: [AtomicU64; UPSTREAM_KINDS.len()],
    renewals: [[AtomicU64; RENEWAL_RESULTS.len()]; RENEWAL_KINDS.len()],
    replays: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            duration_sum_ns: AtomicU64::new(0),
            upstream_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            renewals: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            replays: AtomicU64::new(0),
        }
    }

    /// One request answered with `status` after `elapsed`.
    pub fn request(&self, status: u16, elapsed: Duration) {
        if let Some(slot) = self.requests.get(status as usize) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        let secs = elapsed.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_ns
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// A failure towards the upstream.
    pub fn upstream_error(&self, kind: Option<UpstreamFailure>) {
        let i = match kind {
            Some(UpstreamFailure::Connect) => 0,
            Some(UpstreamFailure::Protocol) => 1,
            None => 2,
        };
        self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// A login or refresh and its outcome.
    pub fn renewal(&self, kind: &str, result: &Result<Issued, AuthError>) {
        let k = RENEWAL_KINDS.iter().position(|x| *x == kind).unwrap_or(0);
        let label = match result {
            Ok(_) => "ok",
            Err(e) => e.result_label(),
        };
        let r = RENEWAL_RESULTS.iter().position(|x| *x == label).unwrap_or(3);
        self.renewals[k][r].fetch_add(1, Ordering::Relaxed);
    }

    /// A request replayed after an upstream 401.
    pub fn replay(&self) {
        self.replays.fetch_add(1, Ordering::Relaxed);
    }

    /// Renewals of `kind` with `result` so far (tests and readiness).
    pub fn renewals(&self, kind: &str, result: &str) -> u64 {
        let k = RENEWAL_KINDS.iter().position(|x| *x == kind);
        let r = RENEWAL_RESULTS.iter().position(|x| *x == result);
        match (k, r) {
            (Some(k), Some(r)) => self.renewals[k][r].load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, holder: &TokenHolder) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.render_into(&mut out, holder);
        out
    }

    fn render_into(&self, out: &mut String, holder: &TokenHolder) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP zapsign_proxy_requests_total Requests answered, by HTTP status."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_requests_total counter")?;
        for (status, n) in self.requests.iter().enumerate() {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                writeln!(out, "zapsign_proxy_requests_total{{status=\"{status}\"}} {n}")?;
            }
        }
        writeln!(
            out,
            "# HELP zapsign_proxy_request_duration_seconds Time from request head to response head."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_request_duration_seconds histogram")?;
        // Each slot is read once, and every rendered number derives from that one read: the buckets are
        // cumulative and monotone, and `+Inf` equals `_count`.
        let counts: [u64; BUCKETS.len() + 1] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let mut cumulative = 0u64;
        for (bound, n) in BUCKETS.iter().zip(&counts) {
            cumulative = cumulative.saturating_add(*n);
            writeln!(
                out,
                "zapsign_proxy_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            )?;
        }
        let count = cumulative.saturating_add(counts[BUCKETS.len()]);
        writeln!(
            out,
            "zapsign_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        )?;
        let sum = self.duration_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        writeln!(out, "zapsign_proxy_request_duration_seconds_sum {sum}")?;
        writeln!(out, "zapsign_proxy_request_duration_seconds_count {count}")?;
        writeln!(
            out,
            "# HELP zapsign_proxy_upstream_errors_total Failures towards the upstream, by kind."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_upstream_errors_total counter")?;
        for (kind, n) in UPSTREAM_KINDS.iter().zip(&self.upstream_errors) {
            writeln!(
                out,
                "zapsign_proxy_upstream_errors_total{{kind=\"{kind}\"}} {}",
                n.load(Ordering::Relaxed)
            )?;
        }
        writeln!(
            out,
            "# HELP zapsign_proxy_token_renewals_total Logins and refreshes, by outcome."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_token_renewals_total counter")?;
        for (kind, row) in RENEWAL_KINDS.iter().zip(&self.renewals) {
            for (result, n) in RENEWAL_RESULTS.iter().zip(row) {
                let n = n.load(Ordering::Relaxed);
                writeln!(
                    out,
                    "zapsign_proxy_token_renewals_total{{kind=\"{kind}\",result=\"{result}\"}} {n}"
                )?;
            }
        }
        writeln!(out, "# HELP zapsign_proxy_token_expires_in_seconds Seconds until the held token expires (-1: none held; +Inf: never expires).")?;
        writeln!(out, "# TYPE zapsign_proxy_token_expires_in_seconds gauge")?;
        let expires = match holder.readiness(Instant::now()) {
            Readiness::Ready { expires_in: Some(d) } => format!("{:.3}", d.as_secs_f64()),
            Readiness::Ready { expires_in: None } => "+Inf".to_owned(),
            Readiness::NotReady(_) => "-1".to_owned(),
        };
        writeln!(out, "zapsign_proxy_token_expires_in_seconds {expires}")?;
        writeln!(
            out,
            "# HELP zapsign_proxy_unauthorized_replays_total Requests replayed after an upstream 401."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_unauthorized_replays_total counter")?;
        writeln!(
            out,
            "zapsign_proxy_unauthorized_replays_total {}",
            self.replays.load(Ordering::Relaxed)
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The histogram's samples in one rendering: the finite buckets in order, `+Inf`, and `_count`.
    fn histogram(text: &str) -> (Vec<u64>, u64, u64) {
        let value = |line: &str| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
        let mut finite = Vec::new();
        let (mut inf, mut count) = (None, None);
        for line in text.lines() {
            if line.starts_with("zapsign_proxy_request_duration_seconds_bucket{le=\"+Inf\"}") {
                inf = Some(value(line));
            } else if line.starts_with("zapsign_proxy_request_duration_seconds_bucket") {
                finite.push(value(line));
            } else if line.starts_with("zapsign_proxy_request_duration_seconds_count") {
                count = Some(value(line));
            }
        }
        (finite, inf.unwrap(), count.unwrap())
    }

    #[test]
    fn durations_above_the_largest_bound_count_only_in_inf() {
        let m = Metrics::new();
        m.request(200, Duration::from_secs(10));
        m.request(200, Duration::from_secs(11));
        let (finite, inf, count) = histogram(&m.render(&TokenHolder::new()));
        assert_eq!(finite.last(), Some(&1));
        assert_eq!((inf, count), (2, 2));
    }

    /// Requests observed on many threads while the histogram renders: every rendering is cumulative and
    /// monotone, with `+Inf` == `_count` >= the last finite bucket. More observers than cores, so some are
    /// always preempted mid-observation, the moment a reading of separate counters would catch.
    #[test]
    fn the_histogram_stays_consistent_while_requests_race_with_a_scrape() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let m = Arc::new(Metrics::new());
        let stop = Arc::new(AtomicBool::new(false));
        let observers: Vec<_> = (0..8)
            .map(|t| {
                let (m, stop) = (m.clone(), stop.clone());
                std::thread::spawn(move || {
                    let durations = [
                        Duration::from_micros(500),
                        Duration::from_millis(30),
                        Duration::from_secs(5),
                    ];
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        m.request(200, durations[i % durations.len()]);
                        i += 1;
                    }
                })
            })
            .collect();
        let holder = TokenHolder::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut bad = None;
        let mut renders = 0;
        while Instant::now() < deadline && bad.is_none() {
            let text = m.render(&holder);
            renders += 1;
            let (finite, inf, count) = histogram(&text);
            let monotone = finite.windows(2).all(|w| w[0] <= w[1]);
            if !monotone || inf != count || finite.last().is_some_and(|last| *last > inf) {
                bad = Some(format!("finite {finite:?}, +Inf {inf}, count {count}"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for o in observers {
            o.join().unwrap();
        }
        assert!(bad.is_none(), "after {renders} renderings: {}", bad.unwrap_or_default());
        assert!(renders > 10, "too few renderings to prove anything: {renders}");
    }

    #[test]
    fn counts_render_with_labels() {
        let m = Metrics::new();
        m.request(200, Duration::from_millis(3));
        m.request(200, Duration::from_millis(30));
        m.request(503, Duration::from_secs(30));
        m.upstream_error(Some(UpstreamFailure::Connect));
        m.renewal("login", &Err(AuthError::RateLimited));
        m.replay();
        let text = m.render(&TokenHolder::new());
        assert!(
            text.contains("zapsign_proxy_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("zapsign_proxy_requests_total{status=\"503\"} 1"));
        assert!(text.contains("zapsign_proxy_request_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("zapsign_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("zapsign_proxy_upstream_errors_total{kind=\"connect\"} 1"));
        assert!(text.contains("zapsign_proxy_token_renewals_total{kind=\"login\",result=\"rate_limited\"} 1"));
        assert!(text.contains("zapsign_proxy_token_expires_in_seconds -1"));
        assert!(text.contains("zapsign_proxy_unauthorized_replays_total 1"));
    }
}
