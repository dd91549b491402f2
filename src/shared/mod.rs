//! State shared by every process that serves one ZapSign account (`shared.*`): the token and the pacing budget,
//! kept in Redis, sealed at rest. Each process falls back to working alone while Redis is away.
//!
//! - [`seal`]: AES-256-GCM sealing of every token stored, under `shared.key_file`.

pub mod seal;
pub mod store;
