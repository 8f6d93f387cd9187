//! `diff`: the one-pass comparison of two checkpoints, and `Progress`, its live counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use rlmask_core as core;

use crate::checkpoint::Checkpoint;
use crate::errors::CoreError;
use crate::plan::PlanOptions;

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

/// A comparison criterion with its thresholds, parsed and checked by the core (the one place
/// where criterion arguments are read; see `rlmask.diff` for their meaning).
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct Criterion {
    pub(crate) inner: core::Criterion,
    name: String,
    primary: usize,
}

#[pymethods]
impl Criterion {
    #[new]
    #[pyo3(signature = (name, *, tol=None, tolerances=Vec::new(), eta=None))]
    fn new(
        name: String,
        tol: Option<f64>,
        tolerances: Vec<f64>,
        eta: Option<f64>,
    ) -> Result<Self, CoreError> {
        let (inner, primary) = core::Criterion::parse(&name, tol, &tolerances, eta)?;
        Ok(Criterion {
            inner,
            name,
            primary,
        })
    }

    /// `absolute`, `exact` or `relative`.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The thresholds of one pass, ascending (0 for exact).
    #[getter]
    fn values(&self) -> Vec<f64> {
        self.inner.values()
    }

    /// Index in `values` of the primary threshold (the one masks are taken at).
    #[getter]
    fn primary_index(&self) -> usize {
        self.primary
    }

    /// The primary threshold.
    #[getter]
    fn primary(&self) -> f64 {
        self.inner.values()[self.primary]
    }

    fn __repr__(&self) -> String {
        format!(
            "Criterion('{}', values={:?})",
            self.name,
            self.inner.values()
        )
    }

    /// The arguments that rebuild it (so that it pickles, e.g. into Ray tasks).
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<((String,), Bound<'py, PyDict>)> {
        let kwargs = PyDict::new(py);
        match &self.inner {
            core::Criterion::Absolute(values) => {
                kwargs.set_item("tol", values[self.primary])?;
                kwargs.set_item("tolerances", values.clone())?;
            }
            core::Criterion::Exact => {}
            core::Criterion::Relative(eta) => kwargs.set_item("eta", *eta)?,
        }
        Ok(((self.name.clone(),), kwargs))
    }
}

/// One non-empty binade of one tensor's base values: (name, exponent, elements, changed per
/// threshold).
type Binade = (String, usize, u64, Vec<u64>);

/// The result of `diff`: the compared tensors and what could not be compared.
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct DiffResult {
    /// One list per field, one entry per compared tensor in natural name order: `name`,
    /// `dtype`, `tuned_dtype`, `shape`, `numel`, `floating`, `changed` (a list per tensor, one
    /// count per threshold). Columns, not an object per tensor: a million tensors cost lists.
    #[pyo3(get)]
    columns: Py<PyDict>,
    /// Packed changed-bits at the mask threshold, by name, when a mask was asked for.
    #[pyo3(get)]
    bits: Py<PyDict>,
    /// With `magnitude`: `(name, exponent, elements, changed per threshold)` of every
    /// non-empty binade of every floating tensor's base values; else None.
    #[pyo3(get)]
    magnitude: Option<Vec<Binade>>,
    #[pyo3(get)]
    only_in_base: Vec<String>,
    #[pyo3(get)]
    only_in_tuned: Vec<String>,
    #[pyo3(get)]
    tied: Vec<String>,
    /// (name, reason) of each tensor left out with `skip_mismatched`.
    #[pyo3(get)]
    skipped: Vec<(String, String)>,
    /// (weight, base scale layout, tuned scale layout) of each FP8 weight compared by its
    /// dequantised values (`None`: stored unscaled on that side).
    #[pyo3(get)]
    dequantised: Vec<(String, Option<String>, Option<String>)>,
    /// The scale tensors: compared, but not counted as weights.
    #[pyo3(get)]
    scales: Vec<String>,
    /// (name, base rows, tuned rows) of each tensor compared on the rows both share.
    #[pyo3(get)]
    resized: Vec<(String, u64, u64)>,
    /// (stored name, paired name) of each base name rewritten for pairing.
    #[pyo3(get)]
    renamed_base: Vec<(String, String)>,
    #[pyo3(get)]
    renamed_tuned: Vec<(String, String)>,
}

/// How one diff runs (the core's `DiffOptions`): its criterion, its plan, and what the pass
/// emits besides counts. With `mask_at` (an index into the criterion's thresholds), the mask
/// bits are returned per tensor, or written to `mask_file` (a path and the provenance for
/// its metadata) without being held in memory; `magnitude`: counts per binade of the base value;
/// `as_bf16`: sides stored wider than BF16 are rounded to BF16 before the comparison;
/// `sample`: `(fraction, seed, block)` reads a random sample of each tensor's blocks (block 0:
/// sized from the budget), and the result's `sample` column says what was read.
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct DiffOptions {
    inner: core::DiffOptions,
}

#[pymethods]
impl DiffOptions {
    #[new]
    #[pyo3(signature = (criterion, plan, *, mask_at=None, mask_file=None, magnitude=false, as_bf16=false, sample=None))]
    fn new(
        criterion: &Criterion,
        plan: &PlanOptions,
        mask_at: Option<usize>,
        mask_file: Option<(
            std::path::PathBuf,
            std::collections::BTreeMap<String, String>,
        )>,
        magnitude: bool,
        as_bf16: bool,
        sample: Option<(f64, u64, usize)>,
    ) -> Self {
        DiffOptions {
            inner: core::DiffOptions {
                criterion: criterion.inner.clone(),
                plan: plan.inner.clone(),
                mask_at,
                mask_file: mask_file
                    .map(|(path, provenance)| core::MaskFileSpec { path, provenance }),
                magnitude,
                as_bf16,
                sample: sample.map(|(fraction, seed, block)| core::sample::SampleOptions {
                    fraction,
                    seed,
                    block,
                }),
            },
        }
    }
}

/// Compares two checkpoints (see `rlmask.diff` for the public interface) as `options` says.
#[pyfunction]
#[pyo3(signature = (base, tuned, options, *, progress=None))]
pub fn diff<'py>(
    py: Python<'py>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    options: &DiffOptions,
    progress: Option<&Progress>,
) -> PyResult<DiffResult> {
    let opts = &options.inner;
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let result = py
        .detach(|| core::diff(&a, &b, opts, &watch))
        .map_err(CoreError)?;

    let n = result.tensors.len();
    // One Python string per dtype, shared by every row that has it.
    let mut dtypes: std::collections::HashMap<core::Dtype, Py<PyString>> = Default::default();
    let mut dtype = |d: core::Dtype| -> Py<PyString> {
        dtypes
            .entry(d)
            .or_insert_with(|| PyString::new(py, d.name()).unbind())
            .clone_ref(py)
    };
    let (mut names, mut base_dtypes, mut tuned_dtypes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut shapes, mut numels, mut floating, mut changed) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let bits = PyDict::new(py);
    let mut magnitude: Option<Vec<Binade>> = None;
    // (elements, bytes read, blocks, total blocks, block, sum of squared block counts per
    // threshold).
    type Sampled = (u64, u64, u64, u64, u64, Vec<f64>);
    let mut samples: Option<Vec<Option<Sampled>>> = opts.sample.map(|_| Vec::with_capacity(n));
    for t in result.tensors {
        if let Some(s) = samples.as_mut() {
            s.push(t.sample.map(|x| {
                (
                    x.elements,
                    x.bytes,
                    x.blocks,
                    x.total_blocks,
                    x.block,
                    x.sum_sq,
                )
            }));
        }
        if let Some(h) = &t.by_magnitude {
            // The non-empty binades: (name, exponent, numel, changed per threshold).
            magnitude.get_or_insert_with(Vec::new).extend(
                (0..256).filter(|&e| h.numel[e] > 0).map(|e| {
                    (
                        t.name.clone(),
                        e,
                        h.numel[e],
                        h.changed.iter().map(|r| r[e]).collect(),
                    )
                }),
            );
        }
        if let Some(b) = t.bits {
            bits.set_item(&t.name, b.into_pyarray(py))?;
        }
        base_dtypes.push(dtype(t.base_dtype));
        tuned_dtypes.push(dtype(t.tuned_dtype));
        names.push(t.name);
        shapes.push(t.shape);
        numels.push(t.numel);
        floating.push(t.floating);
        changed.push(t.changed);
    }
    let columns = PyDict::new(py);
    columns.set_item("name", names)?;
    columns.set_item("dtype", base_dtypes)?;
    columns.set_item("tuned_dtype", tuned_dtypes)?;
    columns.set_item("shape", shapes)?;
    columns.set_item("numel", numels)?;
    columns.set_item("floating", floating)?;
    columns.set_item("changed", changed)?;
    if let Some(s) = samples {
        columns.set_item("sample", s)?;
    }
    Ok(DiffResult {
        columns: columns.unbind(),
        bits: bits.unbind(),
        magnitude,
        only_in_base: result.only_in_base,
        only_in_tuned: result.only_in_tuned,
        tied: result.tied,
        skipped: skipped_pairs(result.skipped),
        dequantised: result
            .dequantised
            .into_iter()
            .map(|(n, a, b)| (n, a.map(|l| l.to_string()), b.map(|l| l.to_string())))
            .collect(),
        scales: result.scales,
        resized: result.resized,
        renamed_base: result.renamed_base,
        renamed_tuned: result.renamed_tuned,
    })
}
