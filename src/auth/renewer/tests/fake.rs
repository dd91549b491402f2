//! A scripted ZapSign for the renewer's tests: each auth call takes the next answer from a script and is recorded
//! with the time it was made, on tokio's (paused) clock. Tokens are JWTs whose `exp` is set relative to the
//! test's wall clock, which follows the paused clock, so a test chooses exactly how long each token lives.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use tokio::time::Instant;

use crate::auth::client::{AuthCalls, AuthError, Credentials, Issued};
use crate::auth::clock::{FollowsTokio, WallClock};
use crate::secret::Secret;

/// What the scripted ZapSign does on the next auth call.
#[derive(Debug)]
pub(super) enum Next {
    /// Hands out an access token that lives `access` by its `exp`; a login also hands out a refresh token that
    /// lives `refresh` (a refresh call hands out none, so the one from the login stays in use until it dies).
    Issue {
        /// Lifetime of the access token.
        access: Duration,
        /// Lifetime of the refresh token (login only).
        refresh: Duration,
    },
    /// Fails.
    Fail(AuthError),
    /// Never answers.
    Hang,
    /// Answers as the inner step does, after a delay.
    Slow(Duration, Box<Next>),
}

/// Tokens with ZapSign's documented lifetimes: an hour, and a day for the refresh token.
pub(super) fn token() -> Next {
    lives(Duration::from_secs(3600))
}

/// An access token living `access`, with a day-long refresh token on login.
pub(super) fn lives(access: Duration) -> Next {
    Next::Issue {
        access,
        refresh: Duration::from_secs(86_400),
    }
}

/// One auth call as ZapSign saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Call {
    /// `"login"` or `"refresh"`.
    pub kind: &'static str,
    /// When it was made, since the fake was created.
    pub at: Duration,
    /// For a login, the username; for a refresh, which call issued the refresh token presented (`"call 1"`).
    pub with: String,
}

/// An auth client that follows a script and records the calls made.
#[derive(Debug)]
pub(super) struct Fake {
    script: Mutex<VecDeque<Next>>,
    calls: Mutex<Vec<Call>>,
    start: Instant,
    wall: FollowsTokio,
    /// Goes into the access tokens it issues, so tests with several processes tell whose token is in use.
    name: &'static str,
}

impl Fake {
    /// A fake whose clock starts now; `wall` is the wall clock its `exp` claims count from. Its access tokens
    /// carry `name` (one ZapSign client per process in the sharing tests).
    pub(super) fn named(wall: FollowsTokio, name: &'static str) -> Self {
        Self {
            script: Mutex::default(),
            calls: Mutex::default(),
            start: Instant::now(),
            wall,
            name,
        }
    }

    /// Appends `next` to the script.
    pub(super) fn then(&self, next: Next) {
        self.script.lock().unwrap().push_back(next);
    }

    /// Appends `next` `times` times.
    pub(super) fn then_times(&self, times: usize, next: impl Fn() -> Next) {
        for _ in 0..times {
            self.then(next());
        }
    }

    /// Every call made so far.
    pub(super) fn log(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The kinds of the calls made so far, in order.
    pub(super) fn calls(&self) -> Vec<&'static str> {
        self.log().iter().map(|c| c.kind).collect()
    }

    /// When each call was made, since the fake was created.
    pub(super) fn times(&self) -> Vec<Duration> {
        self.log().iter().map(|c| c.at).collect()
    }

    /// Time since the fake was created, on tokio's clock.
    pub(super) fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// A JWT (unsigned: the proxy reads only `exp`) that expires `ttl` from now on the wall clock; the `tag`
    /// in the signature part names the call that issued it.
    fn jwt(&self, ttl: Duration, tag: &str) -> Secret {
        let exp = (self.wall.now() + ttl)
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let payload = serde_json::json!({ "exp": exp }).to_string();
        Secret::new(format!(
            "{}.{}.{tag}",
            URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    }

    fn answer(&self, kind: &'static str, with: String) -> impl Future<Output = Result<Issued, AuthError>> + Send {
        let serial = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                kind,
                at: self.start.elapsed(),
                with,
            });
            calls.len()
        };
        let next = self.script.lock().unwrap().pop_front();
        let answer = |next: Option<Next>| match next {
            Some(Next::Issue { access, refresh }) => Ok(Some(Issued {
                access: self.jwt(access, &format!("{}access-{serial}", self.name)),
                refresh: (kind == "login").then(|| self.jwt(refresh, &format!("call-{serial}"))),
            })),
            Some(Next::Fail(e)) => Err(e),
            Some(Next::Hang) => Ok(None),
            Some(Next::Slow(..)) => unreachable!("unwrapped below"),
            None => panic!("unscripted {kind} call (call {serial})"),
        };
        // The tokens are made now, at the time of the call: a slow answer's `exp` counts from the call.
        let (delay, outcome) = match next {
            Some(Next::Slow(delay, inner)) => (delay, answer(Some(*inner))),
            other => (Duration::ZERO, answer(other)),
        };
        async move {
            tokio::time::sleep(delay).await;
            match outcome {
                Ok(Some(issued)) => Ok(issued),
                Ok(None) => std::future::pending().await,
                Err(e) => Err(e),
            }
        }
    }
}

impl AuthCalls for Arc<Fake> {
    fn login(&self, creds: &Credentials) -> impl Future<Output = Result<Issued, AuthError>> + Send {
        self.answer("login", creds.username.clone())
    }

    fn refresh(&self, refresh: &Secret) -> impl Future<Output = Result<Issued, AuthError>> + Send {
        let issued_by = refresh
            .expose()
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .replace('-', " ");
        self.answer("refresh", issued_by)
    }
}
