//! `trajectory`: a run's checkpoints against its base and their predecessors, in one pass.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use rlmask_core as core;

use crate::checkpoint::Checkpoint;
use crate::diff::{parse_criterion, skipped_pairs, Progress};
use crate::errors::CoreError;
use crate::mask::MaskFile;

/// Compares checkpoints `ckpts` (in run order) with `base` and each with its predecessor (see
/// `rlmask.trajectory`). Returns a dict of columns, one entry per tensor: `name`, `dtype`,
/// `shape`, `numel`, `changed_vs_base`, `changed_consecutive`, `outside_final` (lists, one
/// count per checkpoint), `ever`, `last`; and `incomplete` (name, indices of the checkpoints
/// lacking it), `skipped` (name, reason), `renamed` (per checkpoint, base first: stored name,
/// paired name). With `mask_files` (one path per checkpoint), each checkpoint's changed-bits
/// against the base are written to its file. A segment of a longer run passes `previous` (the
/// checkpoint before its first), `final_mask` (the run's final mask, so `outside_final` and
/// `last` are the run's) and `ever_file` (written with the segment's ever-changed bits).
#[pyfunction]
#[pyo3(signature = (base, ckpts, *, criterion, tolerance, select=None, name_map=Vec::new(), skip_mismatched=false, mask_files=None, mask_provenance=None, previous=None, final_mask=None, ever_file=None, progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn trajectory<'py>(
    py: Python<'py>,
    base: &Checkpoint,
    ckpts: Vec<PyRef<'py, Checkpoint>>,
    criterion: &str,
    tolerance: f64,
    select: Option<Vec<String>>,
    name_map: Vec<(String, String)>,
    skip_mismatched: bool,
    mask_files: Option<Vec<PathBuf>>,
    mask_provenance: Option<Vec<BTreeMap<String, String>>>,
    previous: Option<PyRef<'py, Checkpoint>>,
    final_mask: Option<PyRef<'py, MaskFile>>,
    ever_file: Option<PathBuf>,
    progress: Option<&Progress>,
) -> PyResult<Bound<'py, PyDict>> {
    let criterion = parse_criterion(criterion, vec![tolerance])?;
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
    let opts = core::trajectory::TrajectoryOptions {
        criterion,
        select,
        name_map,
        skip_mismatched,
        mask_files,
    };
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
            core::trajectory::trajectory(&a, &refs, &opts, &segment, &watch)
        })
        .map_err(CoreError)?;

    let out = PyDict::new(py);
    let t = &result.tensors;
    out.set_item("name", t.iter().map(|x| x.name.clone()).collect::<Vec<_>>())?;
    out.set_item(
        "dtype",
        t.iter().map(|x| x.dtype.to_string()).collect::<Vec<_>>(),
    )?;
    out.set_item(
        "shape",
        t.iter().map(|x| x.shape.clone()).collect::<Vec<_>>(),
    )?;
    out.set_item("numel", t.iter().map(|x| x.numel).collect::<Vec<_>>())?;
    out.set_item(
        "changed_vs_base",
        t.iter()
            .map(|x| x.changed_vs_base.clone())
            .collect::<Vec<_>>(),
    )?;
    out.set_item(
        "changed_consecutive",
        t.iter()
            .map(|x| x.changed_consecutive.clone())
            .collect::<Vec<_>>(),
    )?;
    out.set_item(
        "outside_final",
        t.iter()
            .map(|x| x.outside_final.clone())
            .collect::<Vec<_>>(),
    )?;
    out.set_item("ever", t.iter().map(|x| x.ever).collect::<Vec<_>>())?;
    out.set_item("last", t.iter().map(|x| x.last).collect::<Vec<_>>())?;
    out.set_item("incomplete", result.incomplete)?;
    out.set_item("skipped", skipped_pairs(result.skipped))?;
    out.set_item("renamed", result.renamed)?;
    Ok(out)
}
