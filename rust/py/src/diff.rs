//! `diff`: the one-pass comparison of two checkpoints, and `Progress`, its live counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rlmask_core as core;

use crate::checkpoint::Checkpoint;
use crate::errors::CoreError;

/// Counters of a running comparison, safe to read from another thread while it runs.
#[pyclass(module = "rlmask._rlmask", frozen)]
#[derive(Default)]
pub struct Progress {
    inner: Arc<core::Progress>,
}

#[pymethods]
impl Progress {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Bytes read so far, both checkpoints together.
    #[getter]
    fn done(&self) -> u64 {
        self.inner.done.load(Ordering::Relaxed)
    }

    /// Bytes the comparison will read (0 until pairing is done).
    #[getter]
    fn total(&self) -> u64 {
        self.inner.total.load(Ordering::Relaxed)
    }

    /// Asks the comparison to stop; it then raises `KeyboardInterrupt`.
    fn cancel(&self) {
        self.inner.cancel.store(true, Ordering::Relaxed);
    }
}

impl Progress {
    /// The counters, shared with a running pass.
    pub(crate) fn shared(&self) -> Arc<core::Progress> {
        self.inner.clone()
    }
}

/// Skipped tensors as `(name, reason)` tuples, as every binding returns them.
pub(crate) fn skipped_pairs(skipped: Vec<core::Skipped>) -> Vec<(String, String)> {
    skipped.into_iter().map(|s| (s.name, s.reason)).collect()
}

/// The criterion named `name` with its thresholds (tolerances for `absolute`, one eta for
/// `relative`, none used for `exact`): the one place where criterion names are parsed.
pub(crate) fn parse_criterion(name: &str, thresholds: Vec<f64>) -> PyResult<core::Criterion> {
    match (name, thresholds.as_slice()) {
        ("absolute", _) => Ok(core::Criterion::Absolute(thresholds)),
        ("exact", _) => Ok(core::Criterion::Exact),
        ("relative", [eta]) => Ok(core::Criterion::Relative(*eta)),
        ("relative", _) => Err(PyValueError::new_err(
            "the relative criterion takes exactly one eta",
        )),
        (other, _) => Err(PyValueError::new_err(format!(
            "unknown criterion '{other}' (absolute, exact or relative)"
        ))),
    }
}

/// Compares two checkpoints (see `rlmask.diff` for the public interface). Returns a dict with
/// `tensors` (tuples of name, base dtype, tuned dtype, shape, numel, floating, changed counts,
/// packed bits or None, and with `magnitude` the non-empty binades of the base value as
/// (exponent, numel, changed counts), else None), `only_in_base`, `only_in_tuned`, `tied`, `skipped`, and
/// `renamed_base`/`renamed_tuned` (stored name, paired name). Names pair after wrapper segments
/// are removed and `name_map` (prefix pairs) applied. With
/// `mask_threshold`, the mask bits are returned per tensor, or written to `mask_file` (with
/// `mask_provenance` in its metadata) without being held in memory.
#[pyfunction]
#[pyo3(signature = (base, tuned, *, criterion, tolerances, select=None, name_map=Vec::new(), skip_mismatched=false, mask_threshold=None, mask_file=None, mask_provenance=None, magnitude=false, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn diff<'py>(
    py: Python<'py>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    criterion: &str,
    tolerances: Vec<f64>,
    select: Option<Vec<String>>,
    name_map: Vec<(String, String)>,
    skip_mismatched: bool,
    mask_threshold: Option<usize>,
    mask_file: Option<std::path::PathBuf>,
    mask_provenance: Option<std::collections::BTreeMap<String, String>>,
    magnitude: bool,
    progress: Option<&Progress>,
) -> PyResult<Bound<'py, PyDict>> {
    let criterion = parse_criterion(criterion, tolerances)?;
    let opts = core::DiffOptions {
        criterion,
        select,
        name_map,
        skip_mismatched,
        mask_threshold,
        mask_file: mask_file.map(|path| core::MaskFileSpec {
            path,
            provenance: mask_provenance.unwrap_or_default(),
        }),
        magnitude,
    };
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let result = py
        .detach(|| core::diff(&a, &b, &opts, &watch))
        .map_err(CoreError)?;

    let tensors = PyList::empty(py);
    for t in result.tensors {
        let bits: Option<Bound<'py, PyArray1<u8>>> = t.bits.map(|b| b.into_pyarray(py));
        // The non-empty binades: (exponent, numel, changed per threshold).
        let bins: Option<Vec<(usize, u64, Vec<u64>)>> = t.by_magnitude.map(|h| {
            (0..256)
                .filter(|&e| h.numel[e] > 0)
                .map(|e| (e, h.numel[e], h.changed.iter().map(|r| r[e]).collect()))
                .collect()
        });
        tensors.append((
            t.name,
            t.base_dtype.to_string(),
            t.tuned_dtype.to_string(),
            t.shape,
            t.numel,
            t.floating,
            t.changed,
            bits,
            bins,
        ))?;
    }
    let out = PyDict::new(py);
    out.set_item("tensors", tensors)?;
    out.set_item("only_in_base", result.only_in_base)?;
    out.set_item("only_in_tuned", result.only_in_tuned)?;
    out.set_item("tied", result.tied)?;
    out.set_item("skipped", skipped_pairs(result.skipped))?;
    out.set_item("renamed_base", result.renamed_base)?;
    out.set_item("renamed_tuned", result.renamed_tuned)?;
    Ok(out)
}
