//! `pairing`: the plan every pass over two checkpoints starts from (which tensors pair, and
//! what is left out and why), for the passes written in Python (`rank`).

use pyo3::prelude::*;
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

/// Pairs `base` with `tuned` as `diff` does: names after wrapper segments are removed and
/// `name_map` applied, `select` (names as paired) when given; refuses a comparison over no
/// floating element or over mostly unpaired models (`PairingError`), and a shape or dtype
/// mismatch unless `skip_mismatched` (or, for rows only, `shared_rows`).
#[pyfunction]
#[pyo3(signature = (base, tuned, *, select=None, name_map=Vec::new(), skip_mismatched=false, shared_rows=false, block_base=None, block_tuned=None))]
#[allow(clippy::too_many_arguments)]
pub fn pairing(
    py: Python<'_>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    select: Option<Vec<String>>,
    name_map: Vec<(String, String)>,
    skip_mismatched: bool,
    shared_rows: bool,
    block_base: Option<[u64; 2]>,
    block_tuned: Option<[u64; 2]>,
) -> PyResult<Pairing> {
    let opts = core::PlanOptions {
        select,
        name_map,
        skip_mismatched,
        shared_rows,
        block_base,
        block_tuned,
    };
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let p = py
        .detach(|| core::pairing(&a, &b, &opts))
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
