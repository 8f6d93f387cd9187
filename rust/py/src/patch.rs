//! Sparse patches: `create`, `apply` and `verify`, and `PatchFile`, an opened patch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyValueError;
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
    /// `none`, `sparse` (indices and values), `compact` (compact frames) or `dense` (the
    /// whole tensor).
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
        patch::Form::Compact => "compact",
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

    /// `plain` or `compact`: how the changes of sparse tensors are stored.
    #[getter]
    fn codec(&self) -> &'static str {
        self.inner.codec.name()
    }

    /// Bytes stored, by kind: `indices`, `values` (plain), `compact`, `dense`.
    fn stored_bytes(&self) -> BTreeMap<&'static str, u64> {
        self.inner.bytes()
    }

    /// The bytes these changes take in the plain codec, whichever codec the patch uses.
    fn plain_bytes(&self) -> u64 {
        self.inner.plain_bytes()
    }

    /// The changes stored for tensor `name`, decoded and checked: (int64 flat indices, the
    /// values' raw bytes); the indices are None for a tensor stored whole (the bytes are then
    /// the whole tensor); None for a tensor the patch does not change.
    #[allow(clippy::type_complexity)]
    fn changes<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Option<(Option<Bound<'py, PyArray1<i64>>>, Bound<'py, PyArray1<u8>>)>> {
        let inner = self.inner.clone();
        let found = py.detach(|| inner.changes(name)).map_err(CoreError)?;
        Ok(found.map(|(idx, vals)| {
            let idx = idx.map(|v| {
                let v: Vec<i64> = v.into_iter().map(|i| i as i64).collect();
                v.into_pyarray(py)
            });
            (idx, vals.into_pyarray(py))
        }))
    }
}

/// Bytes the compact codec stores for the changes `indices` (ascending flat int64) with
/// `values` (their raw bytes, `size` each) of a tensor of `numel` elements: its frames with
/// their table, or plain indices and values, or the whole tensor, whichever a patch file
/// would hold. What a sync in the compact codec sends for them.
#[pyfunction]
pub fn compact_bytes(
    py: Python<'_>,
    indices: numpy::PyReadonlyArray1<'_, i64>,
    values: numpy::PyReadonlyArray1<'_, u8>,
    size: usize,
    numel: u64,
) -> PyResult<u64> {
    let (idx, vals) = (
        indices
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
        values
            .as_slice()
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
    );
    if size == 0 || vals.len() != idx.len() * size {
        return Err(PyValueError::new_err(format!(
            "{} bytes of values for {} indices of {size} bytes each",
            vals.len(),
            idx.len()
        )));
    }
    let idx: Vec<u64> = idx.iter().map(|&i| i as u64).collect();
    py.detach(|| patch::compact_bytes(&idx, vals, size, numel))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The fingerprint a patch writes for the bytes of `data` (a uint8 array).
#[pyfunction]
pub fn fingerprint(py: Python<'_>, data: numpy::PyReadonlyArray1<'_, u8>) -> PyResult<String> {
    let bytes = data
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(py.detach(|| patch::fingerprint(bytes)))
}

/// Whether the bytes of `data` (a uint8 array) have the fingerprint `print`, in the scheme it
/// is written in (BLAKE3 in patches of version 1).
#[pyfunction]
pub fn fingerprint_matches(
    py: Python<'_>,
    data: numpy::PyReadonlyArray1<'_, u8>,
    print: &str,
) -> PyResult<bool> {
    let bytes = data
        .as_slice()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(py.detach(|| patch::matches(bytes, print)))
}

/// Writes the patch that turns `base` into `tuned` to `out`, atomically; returns its entries
/// and its size in bytes.
#[pyfunction]
#[pyo3(signature = (base, tuned, out, *, codec=patch::Codec::DEFAULT.name(), name_map=Vec::new(), provenance=BTreeMap::new(), progress=None))]
#[allow(clippy::too_many_arguments)]
pub fn patch_create(
    py: Python<'_>,
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: PathBuf,
    codec: &str,
    name_map: Vec<(String, String)>,
    provenance: BTreeMap<String, String>,
    progress: Option<&Progress>,
) -> PyResult<(Vec<PatchEntry>, u64)> {
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let codec = patch::Codec::parse(codec).map_err(CoreError)?;
    let (a, b) = (base.inner.clone(), tuned.inner.clone());
    let done = py
        .detach(|| patch::create(&a, &b, &out, &name_map, codec, &provenance, &watch))
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

/// Applies `patches` in order to the checkpoint directory of `base`, in place, with an undo
/// journal (see `rlmask.patch.apply_in_place`).
#[pyfunction]
#[pyo3(signature = (base, patches, *, progress=None))]
pub fn patch_apply_in_place(
    py: Python<'_>,
    base: &Checkpoint,
    patches: Vec<PyRef<'_, PatchFile>>,
    progress: Option<&Progress>,
) -> PyResult<()> {
    let watch = progress.map(Progress::shared).unwrap_or_default();
    let a = base.inner.clone();
    let ps: Vec<Arc<patch::Patch>> = patches.iter().map(|p| p.inner.clone()).collect();
    py.detach(|| {
        let refs: Vec<&patch::Patch> = ps.iter().map(|p| p.as_ref()).collect();
        patch::apply_in_place(&a, &refs, &watch)
    })
    .map_err(CoreError)?;
    Ok(())
}

/// Undoes an interrupted in-place apply of the directory `dir`; returns the tensors restored.
#[pyfunction]
pub fn patch_recover(py: Python<'_>, dir: PathBuf) -> PyResult<usize> {
    Ok(py.detach(|| patch::recover(&dir)).map_err(CoreError)?)
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
