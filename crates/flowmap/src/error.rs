//! The library's error type: every failure a user can cause has its own variant and a one-line message.

use std::path::PathBuf;

/// Errors returned by flowmap. Messages are single lines that name the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file or data specification is malformed or holds unusable values.
    #[error("{0}")]
    Data(String),
    /// An argument is outside its valid range (e.g. `s > t`, `nfe = 0`).
    #[error("{0}")]
    InvalidArgument(String),
    /// A checkpoint is unreadable, of the wrong kind, or inconsistent with its config.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    /// A configuration file or value could not be parsed.
    #[error("config: {0}")]
    Config(String),
    /// Training diverged: the loss or a gradient became NaN or infinite, and recovery (if any) gave up.
    #[error("training diverged at step {step}: {reason}")]
    Diverged { step: usize, reason: String },
    /// Training stopped on request (an interrupt) after `step` steps, its state saved.
    #[error("training interrupted after step {step}")]
    Interrupted { step: usize },
    /// The ranks of a data-parallel run cannot train together (they disagree on the run, or its batch does
    /// not split over them); every rank returns this error at the same point.
    #[error("{0}")]
    Ranks(String),
    /// A collective transport (NCCL) failed on this rank alone.
    #[error("{0}")]
    Transport(String),
    /// An error raised inside candle.
    #[error("tensor error: {0}")]
    Candle(String),
    /// A figure could not be drawn.
    #[error("plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // candle may attach a multi-line backtrace; keep the first line only.
        let msg = e.to_string();
        Error::Candle(msg.lines().next().unwrap_or("").to_string())
    }
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn data(msg: impl Into<String>) -> Self {
        Error::Data(msg.into())
    }
    pub fn arg(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn checkpoint(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// Result alias used throughout flowmap.
pub type Result<T> = std::result::Result<T, Error>;
