//! The one error type of the core. Every variant renders as a single line that names the file
//! and, where there is one, the tensor.

use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while opening, statting or mapping a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The path does not hold a checkpoint in any form we accept.
    #[error("{path}: {reason}")]
    NotFound { path: PathBuf, reason: String },

    /// The safetensors header of a file is malformed (before any tensor can be named).
    #[error("{path}: invalid safetensors header: {reason}")]
    Header { path: PathBuf, reason: String },

    /// One tensor entry of a safetensors header is malformed.
    #[error("{path}: tensor '{tensor}': {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A `model.safetensors.index.json` is malformed or disagrees with its shards.
    #[error("{path}: invalid index: {reason}")]
    Index { path: PathBuf, reason: String },

    /// The same tensor has shapes, or dtypes, in the two checkpoints that cannot be compared
    /// (a resized vocabulary, floating against integer).
    #[error("tensor '{tensor}': {detail}; pass skip_mismatched to skip such tensors")]
    Mismatch { tensor: String, detail: String },

    /// A caller passed an argument the core cannot act on.
    #[error("{0}")]
    InvalidArgument(String),

    /// The caller asked the running computation to stop.
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn header(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Header {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(
        path: &std::path::Path,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn index(path: &std::path::Path, reason: impl Into<String>) -> Self {
        Error::Index {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
