//! The one error type of config loading: it names the dotted key (or the variable, or the
//! file) that was wrong.

use std::path::PathBuf;

/// A config that could not be loaded, naming the key (dotted path) where it can.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (missing, unreadable).
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
    /// The text is not TOML at all, so no key can be named.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// Where the text came from: the file's path, or a label for text given directly.
        path: String,
        /// The TOML parser's message, with its line and column.
        message: String,
    },
    /// A key is unknown, of the wrong type, or out of its bounds.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the offending key (`routes[0].batch.max_records`).
        key: String,
        /// What is wrong with it, with the accepted range where there is one.
        message: String,
    },
    /// A `SLUICEGATE_*` override could not be applied (bad path or unparsable value).
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with its name or value.
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
