//! The one place where core errors become Python exceptions. The exception classes are defined
//! in `rlmask/errors.py` (one owner, with `.path` and `.tensor` attributes) and imported here.

use pyo3::exceptions::{PyKeyboardInterrupt, PyValueError};
use pyo3::{import_exception, PyErr};
use rlmask_core::text::printable;
use rlmask_core::Error;

import_exception!(rlmask.errors, CheckpointError);
import_exception!(rlmask.errors, CheckpointNotFoundError);
import_exception!(rlmask.errors, CheckpointFormatError);
import_exception!(rlmask.errors, CheckpointChangedError);
import_exception!(rlmask.errors, TensorMismatchError);
import_exception!(rlmask.errors, PairingError);
import_exception!(rlmask.errors, MaskError);
import_exception!(rlmask.errors, OutputError);
import_exception!(rlmask.errors, RemoteError);

/// Wrapper that lets core errors convert into `PyErr` (both types are foreign to this crate).
pub struct CoreError(pub Error);

impl From<Error> for CoreError {
    fn from(e: Error) -> Self {
        CoreError(e)
    }
}

impl From<CoreError> for PyErr {
    fn from(CoreError(e): CoreError) -> PyErr {
        // Messages reach terminals: control characters in names and paths are escaped. The
        // attributes keep them as they are.
        let msg = printable(&e.to_string()).into_owned();
        let args = (
            msg.clone(),
            e.path().map(|p| p.to_string_lossy().into_owned()),
            e.tensor_name().map(str::to_string),
        );
        match e {
            Error::Io { .. } => CheckpointError::new_err(args),
            Error::NotFound { .. } => CheckpointNotFoundError::new_err(args),
            Error::Header { .. } | Error::Tensor { .. } | Error::Index { .. } => {
                CheckpointFormatError::new_err(args)
            }
            Error::Changed { .. } => CheckpointChangedError::new_err(args),
            Error::Mismatch { .. } => TensorMismatchError::new_err(args),
            Error::Pairing { .. } => PairingError::new_err(args),
            Error::Mask { .. } => MaskError::new_err(args),
            Error::Output { .. } => OutputError::new_err(args),
            Error::Remote { .. } => RemoteError::new_err(args),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::Cancelled => PyKeyboardInterrupt::new_err(msg),
        }
    }
}
