//! `clean_leftovers`: the temporary files that killed runs left beside an output, removed
//! (the core's one atomic writer names them; the Python writers name theirs the same way).

use pyo3::prelude::*;

/// Removes `.NAME.TAG.PID.N.tmp` files and folders beside `target` whose process is gone.
#[pyfunction]
pub fn clean_leftovers(target: std::path::PathBuf) {
    rlmask_core::atomic::clean_leftovers(&target);
}
