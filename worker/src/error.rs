//! The worker library's error type.

use lorafleet_common::FormatError;
use std::path::PathBuf;

/// Everything that can go wrong while loading, training or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration or metadata file is unusable.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A weights file (model or adapter) is unusable: truncated, missing a tensor, wrong shape.
    #[error("{}: {msg}", .path.display())]
    Weights {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be loaded or could not encode/decode.
    #[error("{}: {msg}", .path.display())]
    Tokenizer {
        /// `tokenizer.json`.
        path: PathBuf,
        /// What the tokenizers library said.
        msg: String,
    },
    /// A loss or gradient became NaN or infinite.
    #[error("non-finite {what} at step {step}")]
    NonFinite {
        /// `loss` or `gradient`.
        what: &'static str,
        /// The optimizer step (1-based).
        step: u64,
    },
    /// A request that does not fit the model (too long, wrong token ids, ...).
    #[error("{0}")]
    Invalid(String),
    /// A collective or the connection to the coordinator failed.
    #[error("{0}")]
    Collective(String),
    /// A tensor operation failed; this is a bug or an out-of-memory condition.
    #[error("tensor operation failed: {}", first_line(.0))]
    Candle(#[from] candle_core::Error),
}

/// candle appends a captured backtrace to its messages when `RUST_BACKTRACE` is set; a
/// user needs the first line, a developer can still get the rest from `{:?}`.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

impl Error {
    pub(crate) fn weights(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Weights { path: path.into(), msg: msg.into() }
    }
}

/// Short alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
