//! What can be wrong with a configuration: [`ConfigError`], each naming the key and the fix, and
//! [`Problems`], which collects them so one run of `--check-config` names everything to fix.

use std::path::PathBuf;

/// A configuration problem, naming the key and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}; check the path given by --config or ZAPSIGN_PROXY_CONFIG")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for our keys (unknown key, wrong type).
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is present but wrong, or a required one is missing.
    #[error("`{key}`: {problem}; {fix}")]
    Invalid {
        /// The key, e.g. `upstream.url`, or the environment variable that set it.
        key: String,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// More than one problem: all of them, so one run of `--check-config` names everything to fix. Displayed
    /// one a line, each naming its key and its fix.
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    pub(crate) fn invalid(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Each problem on its own: the list of [`ConfigError::Several`], or this one error alone.
    pub fn problems(&self) -> Vec<&ConfigError> {
        match self {
            Self::Several(list) => list.iter().collect(),
            one => vec![one],
        }
    }
}

/// The problems found in one validation pass. Validation goes on after a problem (with a stand-in value that is
/// never used), so a missing organization id does not hide a bad duration.
#[derive(Default)]
pub(super) struct Problems(Vec<ConfigError>);

impl Problems {
    pub(super) fn note(&mut self, e: ConfigError) {
        match e {
            ConfigError::Several(list) => self.0.extend(list),
            one => self.0.push(one),
        }
    }

    /// The value, or `None` once the problem is noted.
    pub(super) fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.note(e)).ok()
    }

    /// The value, or `stand_in` once the problem is noted.
    pub(super) fn or<T>(&mut self, r: Result<T, ConfigError>, stand_in: T) -> T {
        self.ok(r).unwrap_or(stand_in)
    }

    /// How many problems are noted.
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    /// `value` when nothing was noted; else the one problem, or all of them. A stand-in inside `value` is
    /// only ever built after a problem was noted, so it never leaves validation.
    pub(super) fn finish<T>(mut self, value: T) -> Result<T, ConfigError> {
        match self.0.len() {
            0 => Ok(value),
            1 => Err(self.0.remove(0)),
            _ => Err(ConfigError::Several(self.0)),
        }
    }
}
