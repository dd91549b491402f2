//! Issue 5: replays every input the fuzz targets found (fuzz/regressions/<target>/*) through the same checks
//! as `cargo fuzz run <target>`, without libFuzzer, so a fixed bug stays fixed. The checks live in
//! fuzz/checks/ and are shared with the fuzz targets; see fuzz/README.md.

use std::path::{Path, PathBuf};

#[path = "../fuzz/checks/config.rs"]
mod config_checks;
#[path = "../fuzz/checks/request_head.rs"]
mod request_head_checks;

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs `check` on every input of `target`, and names each one that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let mut failed = Vec::new();
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of the {target} regressions fail:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn request_head_regressions() {
    replay("request_head", request_head_checks::check);
}

#[test]
fn config_regressions() {
    replay("config", config_checks::check);
}
