//! Counters for `/metrics`, in Prometheus text format (exposition format 0.0.4).
//!
//! Every per-request update is a relaxed atomic add on a preallocated slot: no lock, no allocation, no map
//! lookup on the hot path (a registry with label maps or a locked histogram would add one per request).
//! Labels are fixed and low-cardinality: status codes, error kinds, renewal kind and result.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::pacing::Pacer;

/// Upper bounds of the request duration histogram, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Upper bounds of the pacing wait histogram, in seconds (waits reach `pacing.max_wait`, 30 s by default).
const WAIT_BUCKETS: [f64; 12] = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0];

/// The `by` label of `zapsign_proxy_rate_limited_total`: who answered 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitedBy {
    /// Pacing refused the request (no slot within `pacing.max_wait`, or the queue full); nothing was sent.
    Proxy,
    /// ZapSign answered 429.
    Upstream,
}

impl RateLimitedBy {
    /// Every value, in the order the metric renders them.
    pub const ALL: [Self; 2] = [Self::Proxy, Self::Upstream];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Upstream => "upstream",
        }
    }
}

/// A histogram of durations over fixed bounds: one relaxed add per observation.
#[derive(Debug)]
struct Histogram<const N: usize> {
    bounds: [f64; N],
    /// Per-bucket (not cumulative) counts; the slot past the bounds counts durations above the largest bound.
    /// There is no separate count: `+Inf` and `_count` are the sum of one read of these slots, so a scrape
    /// never shows `+Inf` below a finite bucket, however observations race with it.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Self {
            bounds,
            counts: (0..=N).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(N);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) -> std::fmt::Result {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} histogram")?;
        // Each slot is read once, and every rendered number derives from that one read: the buckets are
        // cumulative and monotone, and `+Inf` equals `_count`.
        let counts: Vec<u64> = self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let mut cumulative = 0u64;
        for (bound, n) in self.bounds.iter().zip(&counts) {
            cumulative = cumulative.saturating_add(*n);
            writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}")?;
        }
        let count = cumulative.saturating_add(counts[N]);
        writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}")?;
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        writeln!(out, "{name}_sum {sum}")?;
        writeln!(out, "{name}_count {count}")
    }
}

/// The `kind` label of `zapsign_proxy_token_renewals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalKind {
    /// A login with the organization's credentials.
    Login,
    /// A refresh with the refresh token.
    Refresh,
}

impl RenewalKind {
    /// Every kind, in the order the metric renders them.
    pub const ALL: [Self; 2] = [Self::Login, Self::Refresh];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Login => "login",
            Self::Refresh => "refresh",
        }
    }
}

/// The `result` label of `zapsign_proxy_token_renewals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalResult {
    /// A token was issued.
    Ok,
    /// ZapSign answered 429.
    RateLimited,
    /// Bad credentials, or a dead refresh token.
    Rejected,
    /// Anything else: network, timeout, an answer that made no sense.
    Error,
}

impl RenewalResult {
    /// Every result, in the order the metric renders them.
    pub const ALL: [Self; 4] = [Self::Ok, Self::RateLimited, Self::Rejected, Self::Error];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RateLimited => "rate_limited",
            Self::Rejected => "rejected",
            Self::Error => "error",
        }
    }
}

/// The `kind` label of `zapsign_proxy_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect or TLS handshake failed.
    Connect,
    /// The connection broke or the upstream spoke invalid HTTP.
    Protocol,
    /// No response head within `upstream.response_timeout`.
    Timeout,
}

impl UpstreamErrorKind {
    /// Every kind, in the order the metric renders them.
    pub const ALL: [Self; 3] = [Self::Connect, Self::Protocol, Self::Timeout];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Protocol => "protocol",
            Self::Timeout => "timeout",
        }
    }
}

/// `zapsign_proxy_token_expires_in_seconds`, as the admin listener reads it off the token holder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenExpiry {
    /// No valid token is held: rendered `-1`.
    NoToken,
    /// A static API token: rendered `+Inf`.
    Never,
    /// Time left on the held token.
    In(Duration),
}

/// The proxy's counters.
#[derive(Debug)]
pub struct Metrics {
    requests: [AtomicU64; 600],
    durations: Histogram<{ BUCKETS.len() }>,
    pacing_waits: Histogram<{ WAIT_BUCKETS.len() }>,
    rate_limited: [AtomicU64; RateLimitedBy::ALL.len()],
    /// The pacer, read at scrape time for the queue depth; unset while pacing is off.
    pacer: OnceLock<Weak<Pacer>>,
    upstream_errors: [AtomicU64; UpstreamErrorKind::ALL.len()],
    renewals: [[AtomicU64; RenewalResult::ALL.len()]; RenewalKind::ALL.len()],
    replays: AtomicU64,
    /// `zapsign_proxy_shared_state_up`: 0 absent (no `shared.redis_url`), 1 on its own, 2 sharing through Redis.
    shared_state: AtomicU8,
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
            durations: Histogram::new(BUCKETS),
            pacing_waits: Histogram::new(WAIT_BUCKETS),
            rate_limited: std::array::from_fn(|_| AtomicU64::new(0)),
            pacer: OnceLock::new(),
            upstream_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            renewals: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            replays: AtomicU64::new(0),
            shared_state: AtomicU8::new(0),
        }
    }

    /// One request answered with `status` after `elapsed`.
    pub fn request(&self, status: u16, elapsed: Duration) {
        if let Some(slot) = self.requests.get(status as usize) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
        self.durations.observe(elapsed);
    }

    /// A request got its pacing slot after `waited`.
    pub fn pacing_wait(&self, waited: Duration) {
        self.pacing_waits.observe(waited);
    }

    /// A 429: pacing refused a request, or ZapSign answered one.
    pub fn rate_limited(&self, by: RateLimitedBy) {
        self.rate_limited[by as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// 429s counted so far by `by` (tests).
    pub fn rate_limited_count(&self, by: RateLimitedBy) -> u64 {
        self.rate_limited[by as usize].load(Ordering::Relaxed)
    }

    /// Shows `pacer`'s queue depth at each scrape (`zapsign_proxy_pacing_queue_depth`); the first call wins.
    pub fn watch_pacer(&self, pacer: &Arc<Pacer>) {
        let _ = self.pacer.set(Arc::downgrade(pacer));
    }

    /// A failure towards the upstream.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A login or refresh and its outcome.
    pub fn renewal(&self, kind: RenewalKind, result: RenewalResult) {
        self.renewals[kind as usize][result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A request replayed after an upstream 401.
    pub fn replay(&self) {
        self.replays.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the shared state (Redis) is in use now; from the first call on, `zapsign_proxy_shared_state_up`
    /// appears in the exposition (it is absent without `shared.redis_url`).
    pub fn shared_state_up(&self, up: bool) {
        self.shared_state.store(if up { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// Renewals of `kind` with `result` so far (tests).
    pub fn renewals(&self, kind: RenewalKind, result: RenewalResult) -> u64 {
        self.renewals[kind as usize][result as usize].load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric; `token` is what the token holder says at the scrape.
    pub fn render(&self, token: TokenExpiry) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.render_into(&mut out, token);
        out
    }

    fn render_into(&self, out: &mut String, token: TokenExpiry) -> std::fmt::Result {
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
        self.durations.render(
            out,
            "zapsign_proxy_request_duration_seconds",
            "Time from request head to response head.",
        )?;
        counter_family(
            out,
            "zapsign_proxy_upstream_errors_total",
            "Failures towards the upstream, by kind.",
            "kind",
            UpstreamErrorKind::ALL
                .iter()
                .map(|k| k.as_str())
                .zip(&self.upstream_errors),
        )?;
        writeln!(
            out,
            "# HELP zapsign_proxy_token_renewals_total Logins and refreshes, by outcome."
        )?;
        writeln!(out, "# TYPE zapsign_proxy_token_renewals_total counter")?;
        for (kind, row) in RenewalKind::ALL.iter().zip(&self.renewals) {
            for (result, n) in RenewalResult::ALL.iter().zip(row) {
                let n = n.load(Ordering::Relaxed);
                writeln!(
                    out,
                    "zapsign_proxy_token_renewals_total{{kind=\"{}\",result=\"{}\"}} {n}",
                    kind.as_str(),
                    result.as_str()
                )?;
            }
        }
        writeln!(out, "# HELP zapsign_proxy_token_expires_in_seconds Seconds until the held token expires (-1: none held; +Inf: never expires).")?;
        writeln!(out, "# TYPE zapsign_proxy_token_expires_in_seconds gauge")?;
        match token {
            TokenExpiry::In(d) => writeln!(out, "zapsign_proxy_token_expires_in_seconds {:.3}", d.as_secs_f64())?,
            TokenExpiry::Never => writeln!(out, "zapsign_proxy_token_expires_in_seconds +Inf")?,
            TokenExpiry::NoToken => writeln!(out, "zapsign_proxy_token_expires_in_seconds -1")?,
        }
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
        self.pacing_waits.render(
            out,
            "zapsign_proxy_pacing_wait_seconds",
            "Time requests waited for a slot in the account's rate limit (pacing).",
        )?;
        if let Some(pacer) = self.pacer.get().and_then(Weak::upgrade) {
            writeln!(
                out,
                "# HELP zapsign_proxy_pacing_queue_depth Requests waiting for a slot in the account's rate limit."
            )?;
            writeln!(out, "# TYPE zapsign_proxy_pacing_queue_depth gauge")?;
            writeln!(out, "zapsign_proxy_pacing_queue_depth {}", pacer.queue_depth())?;
        }
        if let Some(up) = match self.shared_state.load(Ordering::Relaxed) {
            1 => Some(0),
            2 => Some(1),
            _ => None,
        } {
            writeln!(
                out,
                "# HELP zapsign_proxy_shared_state_up 1 while the state shared with other replicas (Redis) is in use, 0 while this process works alone."
            )?;
            writeln!(out, "# TYPE zapsign_proxy_shared_state_up gauge")?;
            writeln!(out, "zapsign_proxy_shared_state_up {up}")?;
        }
        counter_family(
            out,
            "zapsign_proxy_rate_limited_total",
            "Requests answered 429, by who refused them (proxy: pacing; upstream: ZapSign).",
            "by",
            RateLimitedBy::ALL.iter().map(|b| b.as_str()).zip(&self.rate_limited),
        )?;
        // Process-wide, like the log writer it reads: see `crate::logging`.
        writeln!(out, "# HELP zapsign_proxy_log_lines_dropped_total Log lines dropped because the log writer's queue was full (stderr too slow).")?;
        writeln!(out, "# TYPE zapsign_proxy_log_lines_dropped_total counter")?;
        writeln!(out, "zapsign_proxy_log_lines_dropped_total {}", log_lines_dropped())
    }
}

/// The log writer's count of dropped lines, process-wide like the writer (set once by `logging::init`; the
/// logging module hands it over so this module never imports logging, which sits above it).
static LOG_DROPS: OnceLock<Arc<AtomicU64>> = OnceLock::new();

/// Shows `counter` as `zapsign_proxy_log_lines_dropped_total`; the first call wins (returns whether it did).
pub fn count_log_drops(counter: Arc<AtomicU64>) -> bool {
    LOG_DROPS.set(counter).is_ok()
}

/// Log lines dropped so far because the log writer's queue was full (0 before logging started).
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.load(Ordering::Relaxed))
}

/// One counter with a single label, one line per label value, in Prometheus text format.
fn counter_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    rows: impl Iterator<Item = (&'static str, &'a AtomicU64)>,
) -> std::fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} counter")?;
    for (value, n) in rows {
        writeln!(out, "{name}{{{label}=\"{value}\"}} {}", n.load(Ordering::Relaxed))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

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
        let (finite, inf, count) = histogram(&m.render(TokenExpiry::NoToken));
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
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut bad = None;
        let mut renders = 0;
        while Instant::now() < deadline && bad.is_none() {
            let text = m.render(TokenExpiry::NoToken);
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
        m.upstream_error(UpstreamErrorKind::Connect);
        m.renewal(RenewalKind::Login, RenewalResult::RateLimited);
        m.replay();
        let text = m.render(TokenExpiry::NoToken);
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
        assert!(m
            .render(TokenExpiry::Never)
            .contains("zapsign_proxy_token_expires_in_seconds +Inf\n"));
        assert!(m
            .render(TokenExpiry::In(Duration::from_millis(1500)))
            .contains("zapsign_proxy_token_expires_in_seconds 1.500\n"));
    }

    #[test]
    fn shared_state_up_is_absent_until_set_then_follows_the_store() {
        let m = Metrics::new();
        assert!(!m.render(TokenExpiry::NoToken).contains("zapsign_proxy_shared_state_up"));
        m.shared_state_up(true);
        assert!(m
            .render(TokenExpiry::NoToken)
            .contains("\nzapsign_proxy_shared_state_up 1\n"));
        m.shared_state_up(false);
        assert!(m
            .render(TokenExpiry::NoToken)
            .contains("\nzapsign_proxy_shared_state_up 0\n"));
    }

    #[tokio::test]
    async fn pacing_metrics_render_waits_refusals_and_the_queue_depth_at_scrape_time() {
        let m = Metrics::new();
        m.pacing_wait(Duration::ZERO);
        m.pacing_wait(Duration::from_secs(3));
        m.rate_limited(RateLimitedBy::Proxy);
        m.rate_limited(RateLimitedBy::Upstream);
        m.rate_limited(RateLimitedBy::Upstream);
        let text = m.render(TokenExpiry::NoToken);
        assert!(
            text.contains("zapsign_proxy_pacing_wait_seconds_bucket{le=\"0.001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("zapsign_proxy_pacing_wait_seconds_bucket{le=\"5\"} 2"),
            "{text}"
        );
        assert!(text.contains("zapsign_proxy_pacing_wait_seconds_count 2"));
        assert!(text.contains("zapsign_proxy_rate_limited_total{by=\"proxy\"} 1"));
        assert!(text.contains("zapsign_proxy_rate_limited_total{by=\"upstream\"} 2"));
        // No pacer: no queue depth.
        assert!(!text.contains("zapsign_proxy_pacing_queue_depth"));
        let pacer = Pacer::start(
            crate::pacing::Settings {
                limit: 5,
                period: Duration::from_secs(60),
                max_wait: Duration::from_secs(1),
                queue_limit: 10,
            },
            None,
        );
        m.watch_pacer(&pacer);
        assert!(m
            .render(TokenExpiry::NoToken)
            .contains("zapsign_proxy_pacing_queue_depth 0\n"));
    }

    /// The counters are indexed by discriminant: each `ALL` must list its enum in declaration order.
    #[test]
    fn label_enums_index_their_own_slots() {
        for (i, k) in RenewalKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
        for (i, r) in RenewalResult::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
        for (i, k) in UpstreamErrorKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?}");
        }
    }
}
