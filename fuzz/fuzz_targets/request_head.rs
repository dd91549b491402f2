//! Request-head rewriting, as `src/proxy.rs` does it to every forwarded request: builds a request head from the
//! fuzz bytes the way hyper would hand it over, runs the production rewrite (`zapsign_proxy::rewrite`) on it and
//! checks the invariants of `src/headers.rs` and `src/rewrite.rs` (see fuzz/README.md and checks/request_head.rs).

#![no_main]

#[path = "../checks/request_head.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
