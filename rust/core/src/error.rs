//! The one error type of the core. Every variant renders as a single line that names the file
//! and, where there is one, the tensor; names and paths are shown with control characters
//! escaped ([`crate::text::printable`]), so a hostile tensor name cannot drive a terminal.

use std::path::{Path, PathBuf};

use crate::text::{printable, printable_path};

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while opening, statting, mapping or reading an input file.
    #[error("{}: {source}", printable_path(path))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The path does not hold a checkpoint in any form we accept.
    #[error("{}: {reason}", printable_path(path))]
    NotFound { path: PathBuf, reason: String },

    /// The safetensors header of a file is malformed (before any tensor can be named), or the
    /// file is of another kind (a pickle, an rlmask mask).
    #[error("{}: {reason}", printable_path(path))]
    Header { path: PathBuf, reason: String },

    /// One tensor entry of a safetensors header is malformed.
    #[error("{}: tensor '{}': {reason}", printable_path(path), printable(tensor))]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// A `model.safetensors.index.json` is malformed or disagrees with its shards.
    #[error("{}: invalid index: {reason}", printable_path(path))]
    Index { path: PathBuf, reason: String },

    /// A file was truncated or rewritten while it was being read: figures from it would mix
    /// two versions, so none are reported.
    #[error("{}: {reason}", printable_path(path))]
    Changed { path: PathBuf, reason: String },

    /// The same tensor has shapes, or dtypes, in the two checkpoints that cannot be compared
    /// (a resized vocabulary, floating against integer).
    #[error(
        "tensor '{}': {detail}; pass skip_mismatched=True (--skip-mismatched) to list such \
         tensors as skipped",
        printable(tensor)
    )]
    Mismatch { tensor: String, detail: String },

    /// The two checkpoints do not pair up into a comparison worth reporting: nothing floating
    /// compared, or most elements of one side without a partner on the other.
    #[error("{}", printable(reason))]
    Pairing { reason: String },

    /// An `.rlmask` file is malformed, or masks do not fit together.
    #[error("{}{}: {reason}", printable_path(path), tensor.as_deref().map(|t| format!(": tensor '{}'", printable(t))).unwrap_or_default())]
    Mask {
        path: PathBuf,
        tensor: Option<String>,
        reason: String,
    },

    /// An output file could not be written (no space, no permission, no such directory).
    #[error("{}: {source}", printable_path(path))]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A remote file could not be read (access denied, a server that ignores ranges, a
    /// network failure that outlasted the retries). The path is the URL as shown.
    #[error("{}: {reason}", printable_path(path))]
    Remote { path: PathBuf, reason: String },

    /// A caller passed an argument the core cannot act on.
    #[error("{}", printable(.0))]
    InvalidArgument(String),

    /// The caller asked the running computation to stop.
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn header(path: &Path, reason: impl Into<String>) -> Self {
        Error::Header {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(
        path: &Path,
        tensor: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn index(path: &Path, reason: impl Into<String>) -> Self {
        Error::Index {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn output(path: &Path, source: std::io::Error) -> Self {
        Error::Output {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn mask(path: &Path, tensor: Option<&str>, reason: impl Into<String>) -> Self {
        Error::Mask {
            path: path.to_path_buf(),
            tensor: tensor.map(str::to_string),
            reason: reason.into(),
        }
    }

    /// The file the error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::NotFound { path, .. }
            | Error::Header { path, .. }
            | Error::Tensor { path, .. }
            | Error::Index { path, .. }
            | Error::Changed { path, .. }
            | Error::Mask { path, .. }
            | Error::Output { path, .. }
            | Error::Remote { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The tensor the error is about, if any.
    pub fn tensor_name(&self) -> Option<&str> {
        match self {
            Error::Tensor { tensor, .. } | Error::Mismatch { tensor, .. } => Some(tensor),
            Error::Mask { tensor, .. } => tensor.as_deref(),
            _ => None,
        }
    }
}
