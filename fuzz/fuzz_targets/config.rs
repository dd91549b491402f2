//! Config parsing: arbitrary text through `Config::from_toml`, once with an empty environment and once with
//! environment values taken from the input. Never a panic; an error always has a message; a valid config
//! renders (`--check-config`) without any secret in it (see fuzz/README.md and checks/config.rs).

#![no_main]

#[path = "../checks/config.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check(data));
