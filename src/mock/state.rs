//! What the mock accepts ([`MockConfig`]), what it remembers ([`Recorded`]) and the counters and switches
//! tests read and flip while it runs ([`MockState`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How many requests the mock remembers.
pub const RECORD_LIMIT: usize = 10_000;

/// The demo's static API token (not a secret: it only opens the bundled mock).
pub const DEMO_API_TOKEN: &str = "demo-api-token";
/// The demo's organization id.
pub const DEMO_ORGANIZATION_ID: &str = "1234";
/// The demo's username.
pub const DEMO_USERNAME: &str = "demo@example.com";
/// The demo's password (not a secret: it only opens the bundled mock).
pub const DEMO_PASSWORD: &str = "demo-password";

/// What the mock accepts and how it behaves.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// A static API token accepted on API calls.
    pub api_token: Option<String>,
    /// The organization id in the login path.
    pub organization_id: String,
    /// Login username.
    pub username: String,
    /// Login password.
    pub password: String,
    /// Lifetime of issued access tokens.
    pub access_ttl: Duration,
    /// Lifetime of issued refresh tokens.
    pub refresh_ttl: Duration,
    /// Put an `exp` claim into issued tokens.
    pub tokens_carry_exp: bool,
    /// API requests accepted per [`MockConfig::api_rate_window`] (ZapSign: 500 a minute); beyond, 429 until the
    /// window ends. 0: no limit.
    pub api_rate_limit: u32,
    /// The rate limit's window: fixed, aligned on the wall clock (multiples since the Unix epoch), as ZapSign
    /// counts.
    pub api_rate_window: Duration,
    /// Whether a 429 carries `Retry-After` (whole seconds to the window's end, rounded up); without it the
    /// proxy pauses to the next period boundary.
    pub api_rate_retry_after: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            api_token: Some(DEMO_API_TOKEN.to_owned()),
            organization_id: DEMO_ORGANIZATION_ID.to_owned(),
            username: DEMO_USERNAME.to_owned(),
            password: DEMO_PASSWORD.to_owned(),
            access_ttl: Duration::from_secs(3600),
            refresh_ttl: Duration::from_secs(86_400),
            tokens_carry_exp: true,
            api_rate_limit: 0,
            api_rate_window: Duration::from_secs(60),
            api_rate_retry_after: true,
        }
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// The raw request target (path and query) as it arrived.
    pub target: String,
    /// Headers, names lower-case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// HTTP version, e.g. `HTTP/1.1`.
    pub version: String,
    /// The address the request came from: one per upstream connection.
    pub peer: SocketAddr,
}

impl Recorded {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One API request's arrival (auth calls are not API requests), for sliding-window checks.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When it arrived.
    pub at: std::time::Instant,
    /// When it arrived, on the wall clock (the rate limit's windows are aligned on it).
    pub wall: std::time::SystemTime,
    /// The Bearer token it carried, if any.
    pub token: Option<String>,
    /// Whether the mock's rate limit answered it 429.
    pub limited: bool,
}

/// The most requests of `arrivals` that fall in any half-open interval of `period`, whatever its alignment
/// (only those answered, not 429, when `answered_only`).
pub fn max_in_any_period(arrivals: &[Arrival], period: Duration, answered_only: bool) -> usize {
    let mut times: Vec<std::time::Instant> = arrivals
        .iter()
        .filter(|a| !(answered_only && a.limited))
        .map(|a| a.at)
        .collect();
    times.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) >= period {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// Counters and records, shared with tests.
#[derive(Debug)]
pub struct MockState {
    /// The current behaviour; [`MockState::update_config`] changes it while the mock runs.
    config: Mutex<MockConfig>,
    /// The last [`RECORD_LIMIT`] requests, oldest first.
    records: Mutex<VecDeque<Recorded>>,
    /// Successful logins.
    pub logins: AtomicU64,
    /// Login attempts, whatever their outcome.
    pub login_attempts: AtomicU64,
    /// Successful refreshes.
    pub refreshes: AtomicU64,
    /// Refresh attempts, whatever their outcome.
    pub refresh_attempts: AtomicU64,
    /// API calls answered 401.
    pub unauthorized: AtomicU64,
    /// API calls (not auth calls) received.
    pub api_calls: AtomicU64,
    /// The next this many login attempts answer 400 "Rate limit exceeded".
    pub rate_limited_logins: AtomicU32,
    /// Login attempts wait this many milliseconds before answering: an auth endpoint that hangs.
    pub login_delay_ms: AtomicU64,
    /// Tokens issued before this epoch are rejected.
    pub(super) epoch: AtomicU64,
    /// Access tokens issued before this epoch are rejected (refresh tokens stay valid).
    pub(super) access_epoch: AtomicU64,
    /// When each login attempt arrived.
    pub(super) login_times: Mutex<Vec<std::time::Instant>>,
    /// Every token issued, so tests can look for them in logs.
    pub(super) issued: Mutex<Vec<String>>,
    /// The next API answer carries `Connection: close`.
    pub(super) close_next: AtomicBool,
    /// Makes every issued token distinct (its `jti`), even two issued in the same instant.
    pub(super) serial: AtomicU64,
    /// The password the last login attempt carried.
    pub(super) last_login_password: Mutex<Option<String>>,
    /// Every API request's arrival, oldest first (the last [`RECORD_LIMIT`]).
    pub(super) arrivals: Mutex<VecDeque<Arrival>>,
    /// The rate limit's current window (its index since the epoch) and the requests counted in it.
    pub(super) window: Mutex<(u128, u32)>,
    /// The next this many API requests answer 429 whatever the window says (a switch for tests).
    pub rate_limited_api_calls: AtomicU32,
}

impl MockState {
    pub(super) fn new(config: MockConfig) -> Self {
        Self {
            config: Mutex::new(config),
            records: Mutex::new(VecDeque::new()),
            logins: AtomicU64::new(0),
            login_attempts: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            refresh_attempts: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            api_calls: AtomicU64::new(0),
            rate_limited_logins: AtomicU32::new(0),
            login_delay_ms: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            access_epoch: AtomicU64::new(0),
            login_times: Mutex::new(Vec::new()),
            issued: Mutex::new(Vec::new()),
            close_next: AtomicBool::new(false),
            serial: AtomicU64::new(0),
            last_login_password: Mutex::new(None),
            arrivals: Mutex::new(VecDeque::new()),
            window: Mutex::new((0, 0)),
            rate_limited_api_calls: AtomicU32::new(0),
        }
    }

    pub(super) fn config(&self) -> MockConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the behaviour from now on.
    pub fn update_config(&self, f: impl FnOnce(&mut MockConfig)) {
        f(&mut self.config.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Rejects every token issued so far (access and refresh; the static token stays valid unless changed).
    pub fn revoke_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Makes every access token issued so far expire now, as if their time were up; refresh tokens stay valid.
    pub fn expire_access_tokens(&self) {
        self.access_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The next API answer carries `Connection: close`, so the connection it came on ends after it.
    pub fn close_connections_after_next(&self) {
        self.close_next.store(true, Ordering::SeqCst);
    }

    /// Every token issued so far (tests check none of them reaches a log).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.issued.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When each login attempt arrived.
    pub fn login_attempt_times(&self) -> Vec<std::time::Instant> {
        self.login_times.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The requests received so far, oldest first.
    pub fn records(&self) -> Vec<Recorded> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The password of the last login attempt (tests check rotation with it).
    pub fn last_login_password(&self) -> Option<String> {
        self.last_login_password
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every API request's arrival so far, oldest first.
    pub fn api_arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Counts one API request against the rate limit; `Some(retry_after)` when it is over (answer 429).
    pub(super) fn admit_api_call(&self, token: Option<String>) -> Option<Duration> {
        let config = self.config();
        let at = std::time::Instant::now();
        let wall = std::time::SystemTime::now();
        let mut limited = None;
        if self
            .rate_limited_api_calls
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            limited = Some(Duration::from_secs(1));
        } else if config.api_rate_limit > 0 {
            let since = wall
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let window = config.api_rate_window.as_nanos().max(1);
            let index = since / window;
            let mut current = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if current.0 != index {
                *current = (index, 0);
            }
            if current.1 >= config.api_rate_limit {
                let left = window - since % window;
                limited = Some(Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX)));
            } else {
                current.1 += 1;
            }
        }
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        if arrivals.len() == RECORD_LIMIT {
            arrivals.pop_front();
        }
        arrivals.push_back(Arrival {
            at,
            wall,
            token,
            limited: limited.is_some(),
        });
        limited
    }

    pub(super) fn record(&self, r: Recorded) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == RECORD_LIMIT {
            records.pop_front();
        }
        records.push_back(r);
    }
}
