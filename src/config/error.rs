//! What a configuration problem is and where it was set, so each error
//! points the operator at the line (or variable) to fix.

use std::fmt;
use std::path::PathBuf;

/// Where the first key `message` names was set (the last setting of it:
/// the environment wins), or the configuration as a whole.
pub(super) fn mentioned(message: &str, set: &[(String, Origin)]) -> Origin {
    set.iter()
        .rev()
        .filter_map(|(key, origin)| message.find(key.as_str()).map(|at| (at, origin)))
        .min_by_key(|(at, _)| *at)
        .map_or(Origin::Whole, |(_, origin)| origin.clone())
}

/// Where a setting came from, so an error can point at it.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    File {
        path: PathBuf,
        line: usize,
    },
    Env(String),
    /// A problem of the configuration as a whole.
    Whole,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub origin: Origin,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { path, line } => write!(f, "{}:{line}: {}", path.display(), self.message),
            Origin::Env(var) => write!(f, "environment {var}: {}", self.message),
            Origin::Whole => write!(f, "{}", self.message),
        }
    }
}

/// All the problems found, so an operator fixes them in one go.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
impl std::error::Error for ConfigErrors {}
