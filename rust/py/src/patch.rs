//! Sparse patches: `create`, `apply` and `verify`, and `PatchFile`, an opened patch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use rlmask_core::patch;

use crate::checkpoint::Checkpoint;
use crate::diff::Progress;
use crate::errors::CoreError;

/// What a patch records about one tensor of the checkpoint it was made against.
#[pyclass(module = "rlmask._rlmask", frozen, get_all)]
pub struct PatchEntry {
    name: String,
    shape: Vec<u64>,
    dtype: String,
    /// Elements whose bits change.
    changed: u64,
    /// `none`, `sparse` (indices and values) or `dense` (the whole tensor).
    form: String,
    /// blake3 of the tensor's bytes before and after, hex.
    base: String,
    tuned: String,
}

/// A patch file opened and validated by the core (format, version, every described tensor
/// against what is stored). Raises `CheckpointFormatError` for any defect.
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct PatchFile {
    pub(crate) inner: Arc<patch::Patch>,
}

fn form_name(f: patch::Form) -> &'static str {
    match f {
        patch::Form::None => "none",
        patch::Form::Sparse => "sparse",
        patch::Form::Dense => "dense",
    }
}

fn entries(map: &BTreeMap<String, patch::Entry>) -> Vec<PatchEntry> {
    map.iter()
        .map(|(name, e)| PatchEntry {
            name: name.clone(),
            shape: e.shape.clone(),
            dtype: e.dtype.clone(),
            changed: e.changed,
            form: form_name(e.form).to_string(),
            base: e.base.clone(),
            tuned: e.tuned.clone(),
        })
        .collect()
}

#[pymethods]
impl PatchFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> Result<Self, CoreError> {
        let inner = py.detach(|| patch::Patch::open(&path))?;
        Ok(PatchFile {
            inner: Arc::new(inner),
        })
    }

    /// The path the patch was opened from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// The file's `__metadata__`.
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.metadata.clone()
    }

    /// Every tensor of the checkpoint the patch applies to, sorted by name.
    fn entries(&self) -> Vec<PatchEntry> {
        entries(&self.inner.entries)
    }

    /// Bytes stored: (sparse indices, sparse values, dense tensors).
    fn stored_bytes(&self) -> (u64, u64, u64) {
        self.inner.bytes()
    }
}

/// blake3 of the bytes of `data` (a uint8 array), hex: a tensor's fingerprint in a patch.
#[pyfunction]
pub fn fingerprint(py: Python<'_>, data: numpy::PyReadonlyArray1<'_, u8>) -> PyResult<String> {
    let bytes = data
        .as_slice()
        .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    Ok(py.detach(|| patch::fingerprint(bytes)))
}

/// Writes the patch that turns `base` into `tuned` to `out`, atomically; returns its entries
/// and its size in bytes.
#[pyfunction]
#[pyo3(signature = (base, tuned, out, *, name_map=Vec::new(), provenance=BTreeMap::new(), progress=None))]
pub fn patch_create(
    py: Python<'_>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: PathBuf,
    name_map: Vec<(String, String)>,
    provenance: BTreeMap<String, String>,
    progress: Option<&Progress>,
) -> PyResult<(Vec<PatchEntry>, u64)> {
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let done = py
        .detach(|| patch::create(&a, &b, &out, &name_map, &provenance, &watch))
        .map_err(CoreError)?;
    Ok((entries(&done.entries), done.bytes))
}

/// Applies `patches` in order to `base`, writing the result as the checkpoint directory `out`.
#[pyfunction]
#[pyo3(signature = (base, patches, out, *, progress=None))]
pub fn patch_apply(
    py: Python<'_>,
    base: &Checkpoint,
    patches: Vec<PyRef<'_, PatchFile>>,
    out: PathBuf,
    progress: Option<&Progress>,
) -> PyResult<()> {
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let a = base.inner.clone();
    let ps: Vec<Arc<patch::Patch>> = patches.iter().map(|p| p.inner.clone()).collect();
    py.detach(|| {
        let refs: Vec<&patch::Patch> = ps.iter().map(|p| p.as_ref()).collect();
        patch::apply(&a, &refs, &out, &watch)
    })
    .map_err(CoreError)?;
    Ok(())
}

/// Checks that `patch` applies to `base` and gives what it promises (and `tuned`, if given).
#[pyfunction]
#[pyo3(signature = (base, patch, tuned=None, *, progress=None))]
pub fn patch_verify(
    py: Python<'_>,
    base: &Checkpoint,
    patch: &PatchFile,
    tuned: Option<&Checkpoint>,
    progress: Option<&Progress>,
) -> PyResult<()> {
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let (a, p) = (base.inner.clone(), patch.inner.clone());
    let c = tuned.map(|t| t.inner.clone());
    py.detach(|| patch::verify(&a, &p, c.as_deref(), &watch))
        .map_err(CoreError)?;
    Ok(())
}
