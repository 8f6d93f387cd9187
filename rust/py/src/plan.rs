//! `pairing`: the plan every pass over two checkpoints starts from (which tensors pair, and
//! what is left out and why), for the passes written in Python (`rank`).

use pyo3::prelude::*;
use pyo3::types::PyDict;
use rlmask_core as core;

use crate::checkpoint::Checkpoint;
use crate::diff::skipped_pairs;
use crate::errors::CoreError;

/// The pairs of two checkpoints and what did not pair.
#[pyclass(module = "rlmask._rlmask", frozen, get_all)]
pub struct Pairing {
    /// `(name as paired, stored name in base, stored name in tuned, rows compared or None
    /// for all, counted by value)` per pair, in name order.
    pairs: Vec<(String, String, String, Option<u64>, bool)>,
    only_in_base: Vec<String>,
    only_in_tuned: Vec<String>,
    tied: Vec<String>,
    /// (name, reason) of each tensor left out with `skip_mismatched`.
    skipped: Vec<(String, String)>,
    /// (name, base rows, tuned rows) of each tensor compared on the rows both share.
    resized: Vec<(String, u64, u64)>,
    renamed_base: Vec<(String, String)>,
    renamed_tuned: Vec<(String, String)>,
}

/// What pairs with what (the core's `PlanOptions`), shared by every pass over two checkpoints:
/// `select` (names as paired; all when None), `name_map` (prefix pairs applied after wrapper
/// segments are removed), `skip_mismatched`, `shared_rows`, and each side's FP8 block size.
/// Built once per pass and handed to it as a value.
#[pyclass(module = "rlmask._rlmask", frozen)]
#[derive(Clone)]
pub struct PlanOptions {
    pub(crate) inner: core::PlanOptions,
}

#[pymethods]
impl PlanOptions {
    #[new]
    #[pyo3(signature = (*, select=None, name_map=Vec::new(), skip_mismatched=false, shared_rows=false, block_base=None, block_tuned=None))]
    fn new(
        select: Option<Vec<String>>,
        name_map: Vec<(String, String)>,
        skip_mismatched: bool,
        shared_rows: bool,
        block_base: Option<[u64; 2]>,
        block_tuned: Option<[u64; 2]>,
    ) -> Self {
        PlanOptions {
            inner: core::PlanOptions {
                select,
                name_map,
                skip_mismatched,
                shared_rows,
                block_base,
                block_tuned,
            },
        }
    }

    #[getter]
    fn select(&self) -> Option<Vec<String>> {
        self.inner.select.clone()
    }

    #[getter]
    fn name_map(&self) -> Vec<(String, String)> {
        self.inner.name_map.clone()
    }

    #[getter]
    fn skip_mismatched(&self) -> bool {
        self.inner.skip_mismatched
    }

    #[getter]
    fn shared_rows(&self) -> bool {
        self.inner.shared_rows
    }

    #[getter]
    fn block_base(&self) -> Option<(u64, u64)> {
        self.inner.block_base.map(|[r, c]| (r, c))
    }

    #[getter]
    fn block_tuned(&self) -> Option<(u64, u64)> {
        self.inner.block_tuned.map(|[r, c]| (r, c))
    }

    /// The arguments that rebuild it (so that it pickles, e.g. into Ray tasks).
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<((), Bound<'py, PyDict>)> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("select", self.select())?;
        kwargs.set_item("name_map", self.name_map())?;
        kwargs.set_item("skip_mismatched", self.inner.skip_mismatched)?;
        kwargs.set_item("shared_rows", self.inner.shared_rows)?;
        kwargs.set_item("block_base", self.block_base())?;
        kwargs.set_item("block_tuned", self.block_tuned())?;
        Ok(((), kwargs))
    }
}

/// Pairs `base` with `tuned` as `diff` does (see `PlanOptions`); refuses a comparison over no
/// floating element or over mostly unpaired models (`PairingError`), and a shape or dtype
/// mismatch unless skipped (or, for rows only, compared on the shared rows).
#[pyfunction]
pub fn pairing(
    py: Python<'_>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    options: &PlanOptions,
) -> PyResult<Pairing> {
    let opts = &options.inner;
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let p = py
        .detach(|| core::pairing(&a, &b, opts))
        .map_err(CoreError)?;
    Ok(Pairing {
        pairs: p
            .pairs
            .into_iter()
            .map(|q| (q.name, q.base, q.tuned, q.rows, q.floating))
            .collect(),
        only_in_base: p.only_in_base,
        only_in_tuned: p.only_in_tuned,
        tied: p.tied,
        skipped: skipped_pairs(p.skipped),
        resized: p.resized,
        renamed_base: p.renamed_base,
        renamed_tuned: p.renamed_tuned,
    })
}
