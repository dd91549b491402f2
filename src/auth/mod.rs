//! Everything about the token: the lock-free [`holder::TokenHolder`] the request path reads, and (in JWT mode)
//! the ZapSign login/refresh client and the refresher task that keeps the holder filled.

pub mod client;
pub mod clock;
pub mod holder;
pub mod jwt;
pub mod renewer;

pub use holder::{Token, TokenHolder};
