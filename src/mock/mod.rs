//! A small stand-in for ZapSign, used by `zapsign-proxy mock-upstream`, `zapsign-proxy demo` and the tests.
//! It is test support, not part of the proxy: it exists only with the cargo feature `mock` (on by default), so
//! `cargo build --release --no-default-features` builds a proxy without it and without those two commands.
//!
//! - `POST /api/v1/auth/token/{org}/` and `POST /api/v1/auth/token-refresh/`: JWT login and refresh as
//!   documented, with configurable lifetimes, rate-limited or slow logins and revocation (`jwt.rs`).
//! - Any other path: requires `Authorization: Bearer <valid token>` (the static API token or a live access
//!   JWT, else 401 as ZapSign answers), and echoes what it received as JSON: method, raw target, headers,
//!   body length and SHA-256 (lower-case hex, as [`crate::secret::hex`] spells it). The body is hashed as it
//!   streams, never held.
//! - Test hooks under `/api/v1/__mock/` (`hooks.rs`): `download/{bytes}/` streams a known pattern, `slow/{ms}/`
//!   waits before answering, `redirect/?to=URL` answers 302, `status/{code}/` answers that status,
//!   `hop-headers/` answers with hop-by-hop headers.
//!
//! - An API rate limit in fixed wall-clock windows, as ZapSign counts (`MockConfig::api_rate_limit` per
//!   `api_rate_window`, 429 beyond), and a switch that answers the next API calls 429; every API request's
//!   arrival time and token is kept ([`MockState::api_arrivals`], [`max_in_any_period`]).
//!
//! Every request is recorded (the last [`RECORD_LIMIT`]) and counted in [`MockState`], so tests assert on what
//! it received.
//!
//! # Layout
//! - `state.rs`: what the mock accepts, remembers and counts, and the switches tests flip.
//! - `jwt.rs`: the login and refresh endpoints and the tokens they issue.
//! - `hooks.rs`: the `__mock/` test hooks; `reply.rs`: JSON answers, the echo, the download pattern.
//! - `service.rs`: the listener and the router ([`MockZapSign`]).
//! - [`demo`]: what the `demo` and `mock-upstream` commands set up and print.

pub mod demo;
mod hooks;
mod jwt;
mod reply;
mod service;
mod state;

pub use reply::{pattern_byte, PatternBody};
pub use service::{serve, MockZapSign};
pub use state::{
    max_in_any_period, Arrival, MockConfig, MockState, Recorded, DEMO_API_TOKEN, DEMO_ORGANIZATION_ID, DEMO_PASSWORD,
    DEMO_USERNAME, RECORD_LIMIT,
};
