//! `trajectory`: a run's checkpoints against its base and their predecessors, in one pass.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rlmask_core as core;

use crate::checkpoint::Checkpoint;
use crate::diff::{skipped_pairs, Criterion, Progress};
use crate::errors::CoreError;
use crate::mask::MaskFile;
use crate::plan::PlanOptions;

/// The result of `trajectory`: one entry per tensor in each per-tensor field (counts are
/// lists with one entry per checkpoint, in run order).
#[pyclass(module = "rlmask._rlmask", frozen, get_all)]
pub struct TrajectoryResult {
    name: Vec<String>,
    dtype: Vec<String>,
    shape: Vec<Vec<u64>>,
    numel: Vec<u64>,
    changed_vs_base: Vec<Vec<u64>>,
    changed_consecutive: Vec<Vec<u64>>,
    /// Elements changed at a checkpoint that are not in the final mask.
    outside_final: Vec<Vec<u64>>,
    /// Elements changed against the base at some checkpoint.
    ever: Vec<u64>,
    /// Elements changed against the base at the last checkpoint of the run.
    last: Vec<u64>,
    /// (name, indices of the checkpoints lacking it).
    incomplete: Vec<(String, Vec<usize>)>,
    /// (name, reason) of each tensor left out.
    skipped: Vec<(String, String)>,
    /// Per checkpoint, base first: (stored name, paired name) of each rewritten name.
    renamed: Vec<Vec<(String, String)>>,
}

type Counts = Vec<Vec<u64>>;

#[pymethods]
impl TrajectoryResult {
    /// Builds a result from its fields (segments of a run computed apart are merged this way).
    #[new]
    #[pyo3(signature = (*, name, dtype, shape, numel, changed_vs_base, changed_consecutive, outside_final, ever, last, incomplete, skipped, renamed))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: Vec<String>,
        dtype: Vec<String>,
        shape: Vec<Vec<u64>>,
        numel: Vec<u64>,
        changed_vs_base: Counts,
        changed_consecutive: Counts,
        outside_final: Counts,
        ever: Vec<u64>,
        last: Vec<u64>,
        incomplete: Vec<(String, Vec<usize>)>,
        skipped: Vec<(String, String)>,
        renamed: Vec<Vec<(String, String)>>,
    ) -> PyResult<Self> {
        let n = name.len();
        let lengths = [
            dtype.len(),
            shape.len(),
            numel.len(),
            changed_vs_base.len(),
            changed_consecutive.len(),
            outside_final.len(),
            ever.len(),
            last.len(),
        ];
        if lengths.iter().any(|&l| l != n) {
            return Err(PyValueError::new_err(
                "TrajectoryResult: per-tensor fields differ in length",
            ));
        }
        Ok(TrajectoryResult {
            name,
            dtype,
            shape,
            numel,
            changed_vs_base,
            changed_consecutive,
            outside_final,
            ever,
            last,
            incomplete,
            skipped,
            renamed,
        })
    }

    /// The fields by keyword, so that a result pickles (e.g. back from a Ray task).
    fn __getnewargs_ex__<'py>(&self, py: Python<'py>) -> PyResult<((), Bound<'py, PyDict>)> {
        let k = PyDict::new(py);
        k.set_item("name", self.name.clone())?;
        k.set_item("dtype", self.dtype.clone())?;
        k.set_item("shape", self.shape.clone())?;
        k.set_item("numel", self.numel.clone())?;
        k.set_item("changed_vs_base", self.changed_vs_base.clone())?;
        k.set_item("changed_consecutive", self.changed_consecutive.clone())?;
        k.set_item("outside_final", self.outside_final.clone())?;
        k.set_item("ever", self.ever.clone())?;
        k.set_item("last", self.last.clone())?;
        k.set_item("incomplete", self.incomplete.clone())?;
        k.set_item("skipped", self.skipped.clone())?;
        k.set_item("renamed", self.renamed.clone())?;
        Ok(((), k))
    }
}

/// How one trajectory runs (the core's `TrajectoryOptions`): its criterion (one threshold), its
/// plan (every checkpoint against the base; `block_base` for the base's FP8 weights,
/// `block_tuned` for the run's), `mask_files` (one path per checkpoint: its changed-bits
/// against the base, with `mask_provenance`), and, for a segment of a longer run, `ever_file`
/// (written with the segment's ever-changed bits).
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct TrajectoryOptions {
    inner: core::trajectory::TrajectoryOptions,
    ever_file: Option<PathBuf>,
}

#[pymethods]
impl TrajectoryOptions {
    #[new]
    #[pyo3(signature = (criterion, plan, *, mask_files=None, mask_provenance=None, ever_file=None))]
    fn new(
        criterion: &Criterion,
        plan: &PlanOptions,
        mask_files: Option<Vec<PathBuf>>,
        mask_provenance: Option<Vec<BTreeMap<String, String>>>,
        ever_file: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mask_files = match (mask_files, mask_provenance) {
            (None, _) => None,
            (Some(paths), prov) => {
                let prov = prov.unwrap_or_else(|| vec![BTreeMap::new(); paths.len()]);
                if prov.len() != paths.len() {
                    return Err(PyValueError::new_err(
                        "mask_files and mask_provenance differ in length",
                    ));
                }
                Some(
                    paths
                        .into_iter()
                        .zip(prov)
                        .map(|(path, provenance)| core::MaskFileSpec { path, provenance })
                        .collect(),
                )
            }
        };
        Ok(TrajectoryOptions {
            inner: core::trajectory::TrajectoryOptions {
                criterion: criterion.inner.clone(),
                plan: plan.inner.clone(),
                mask_files,
            },
            ever_file,
        })
    }
}

/// Compares checkpoints `ckpts` (in run order) with `base` and each with its predecessor (see
/// `rlmask.trajectory`) as `options` says. A segment of a longer run passes `previous` (the
/// checkpoint before its first) and `final_mask` (the run's final mask, so `outside_final` and
/// `last` are the run's).
#[pyfunction]
#[pyo3(signature = (base, ckpts, options, *, previous=None, final_mask=None, progress=None))]
pub fn trajectory<'py>(
    py: Python<'py>,
    base: &Checkpoint,
    ckpts: Vec<PyRef<'py, Checkpoint>>,
    options: &TrajectoryOptions,
    previous: Option<PyRef<'py, Checkpoint>>,
    final_mask: Option<PyRef<'py, MaskFile>>,
    progress: Option<&Progress>,
) -> PyResult<TrajectoryResult> {
    let (opts, ever_file) = (&options.inner, options.ever_file.clone());
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let a = base.inner.clone();
    let cs: Vec<_> = ckpts.iter().map(|c| c.inner.clone()).collect();
    let prev = previous.map(|p| p.inner.clone());
    let fin = final_mask.map(|m| m.inner.clone());
    let result = py
        .detach(|| {
            let refs: Vec<&core::Checkpoint> = cs.iter().map(|c| c.as_ref()).collect();
            let segment = core::trajectory::Segment {
                previous: prev.as_deref(),
                final_mask: fin.as_deref(),
                ever_file: ever_file.map(|path| core::MaskFileSpec {
                    path,
                    provenance: BTreeMap::from([("source".into(), "trajectory segment".into())]),
                }),
            };
            core::trajectory::trajectory(&a, &refs, opts, &segment, &watch)
        })
        .map_err(CoreError)?;

    let t = result.tensors;
    Ok(TrajectoryResult {
        name: t.iter().map(|x| x.name.clone()).collect(),
        dtype: t.iter().map(|x| x.dtype.to_string()).collect(),
        shape: t.iter().map(|x| x.shape.clone()).collect(),
        numel: t.iter().map(|x| x.numel).collect(),
        changed_vs_base: t.iter().map(|x| x.changed_vs_base.clone()).collect(),
        changed_consecutive: t.iter().map(|x| x.changed_consecutive.clone()).collect(),
        outside_final: t.iter().map(|x| x.outside_final.clone()).collect(),
        ever: t.iter().map(|x| x.ever).collect(),
        last: t.iter().map(|x| x.last).collect(),
        incomplete: result.incomplete,
        skipped: skipped_pairs(result.skipped),
        renamed: result.renamed,
    })
}
