//! Request-head rewriting, as `src/proxy.rs` does it to every forwarded request: builds a `HeaderMap` and a
//! query string from the fuzz bytes the way hyper would hand them over, runs the proxy's rewrite steps in its
//! order and checks the invariants of `src/headers.rs` (see fuzz/README.md and checks/request_head.rs).

#![no_main]

#[path = "../checks/request_head.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
