//! State shared by every process that serves one ZapSign account (`shared.*`): the token and the pacing budget,
//! kept in Redis, sealed at rest. Each process falls back to working alone while Redis is away.
//!
//! - [`seal`]: AES-256-GCM sealing of every token stored, under `shared.key_file`.
//! - [`store`]: the Redis calls (sealed token, renewal lock, the budget's scripts on Redis's clock).
//! - [`state`]: the store behind the [`crate::sharing`] traits, with its health and the switch to working alone.

pub mod seal;
pub mod state;
pub mod store;
