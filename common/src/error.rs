//! One error type for every file format `common` reads or writes.
//!
//! Every variant names the file, and where it can, the line, column and field, because the
//! person reading the message has to fix that file by hand.

use std::path::{Path, PathBuf};

/// A problem with a user-supplied file or folder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON (or not the expected JSON shape).
    #[error("{}:{line}:{column}: {msg}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        msg: String,
    },
    /// A field has a missing or unusable value.
    #[error("{}: field `{field}`: {msg}", .path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field's name (dotted for nested fields).
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// The file or folder as a whole is unusable.
    #[error("{}: {msg}", .path.display())]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl FormatError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn json(path: &Path, err: &serde_json::Error) -> Self {
        Self::Json { path: path.to_path_buf(), line: err.line(), column: err.column(), msg: err.to_string() }
    }

    pub(crate) fn field(path: &Path, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Field { path: path.to_path_buf(), field: field.into(), msg: msg.into() }
    }

    pub(crate) fn invalid(path: &Path, msg: impl Into<String>) -> Self {
        Self::Invalid { path: path.to_path_buf(), msg: msg.into() }
    }
}

/// Short alias used throughout the crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;
