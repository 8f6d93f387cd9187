//! Python exceptions, and the one place where core errors become them.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyboardInterrupt, PyValueError};
use pyo3::PyErr;
use rlmask_core::Error;

create_exception!(
    rlmask.errors,
    RlmaskError,
    PyException,
    "Base class of every error rlmask raises about its inputs."
);
create_exception!(
    rlmask.errors,
    CheckpointError,
    RlmaskError,
    "A checkpoint could not be read."
);
create_exception!(
    rlmask.errors,
    CheckpointNotFoundError,
    CheckpointError,
    "The path or repo id does not name a checkpoint in any accepted form."
);
create_exception!(
    rlmask.errors,
    CheckpointFormatError,
    CheckpointError,
    "A safetensors header or index file is malformed or inconsistent with its shards."
);
create_exception!(
    rlmask.errors,
    TensorMismatchError,
    RlmaskError,
    "A tensor has shapes or dtypes in the two checkpoints that cannot be compared."
);

/// Wrapper that lets core errors convert into `PyErr` (both types are foreign to this crate).
pub struct CoreError(pub Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        CoreError(e)
    }
}

impl From<CoreError> for PyErr {
    fn from(CoreError(e): CoreError) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Io { .. } => CheckpointError::new_err(msg),
            Error::NotFound { .. } => CheckpointNotFoundError::new_err(msg),
            Error::Header { .. } | Error::Tensor { .. } | Error::Index { .. } => {
                CheckpointFormatError::new_err(msg)
            }
            Error::Mismatch { .. } => TensorMismatchError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::Cancelled => PyKeyboardInterrupt::new_err(msg),
        }
    }
}
