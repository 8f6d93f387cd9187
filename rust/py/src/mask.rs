//! Packed masks: writing `.rlmask` files, and counting and combining packed bits in parallel.
//! Inputs are numpy uint8 arrays (zero-copy views of mapped files, or arrays in memory).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rlmask_core::bits::{self, Op};
use rlmask_core::maskfile::{self, MaskEntry};

use crate::checkpoint::mapped_view;
use crate::errors::CoreError;

/// What a mask file records about one masked tensor.
#[pyclass(module = "rlmask._rlmask", frozen, get_all)]
pub struct MaskTensor {
    /// Tensor name.
    name: String,
    /// Shape of the tensor the mask was taken from.
    shape: Vec<u64>,
    /// Dtype of the tensor the mask was taken from (e.g. `BF16`).
    dtype: String,
    /// Elements (bits) of the mask.
    numel: u64,
}

/// An `.rlmask` file opened and validated by the core: format, version, bit order, and every
/// tensor's description against its packed bytes. Raises `MaskError` for any defect.
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct MaskFile {
    pub(crate) inner: Arc<maskfile::MaskFile>,
}

#[pymethods]
impl MaskFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> Result<Self, CoreError> {
        let inner = py.detach(|| maskfile::MaskFile::open(&path))?;
        Ok(MaskFile {
            inner: Arc::new(inner),
        })
    }

    /// The path the file was opened from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// The file's `__metadata__`.
    fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.metadata.clone()
    }

    /// The described tensors, sorted by name.
    fn tensors(&self) -> Vec<MaskTensor> {
        self.inner
            .entries
            .iter()
            .map(|e| MaskTensor {
                name: e.name.clone(),
                shape: e.shape.clone(),
                dtype: e.dtype.clone(),
                numel: e.numel,
            })
            .collect()
    }

    /// The packed bits of one tensor as a read-only numpy uint8 view of the mapped file.
    fn packed<'py>(slf: Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let inner = slf.get().inner.clone();
        let bytes = inner
            .packed(name)
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_string()))?;
        // SAFETY (of `mapped_view`'s contract): the bytes live in the read-only map of the
        // mask file, owned by an `Arc` inside `slf`, which is immutable and never remapped.
        Ok(unsafe { mapped_view(bytes, slf.into_any()) })
    }

    /// Raises `CheckpointChangedError` when the file was truncated or rewritten since it was
    /// opened.
    fn verify(&self) -> Result<(), CoreError> {
        Ok(self.inner.check_unchanged()?)
    }
}

fn slices<'a>(arrays: &'a [PyReadonlyArray1<'_, u8>]) -> PyResult<Vec<&'a [u8]>> {
    arrays
        .iter()
        .map(|a| {
            a.as_slice()
                .map_err(|e| PyValueError::new_err(e.to_string()))
        })
        .collect()
}

/// Writes packed masks as an `.rlmask` file atomically: one U8 tensor per name, the format
/// metadata, `provenance`, and the `tensors` description built from names, shapes, dtypes and
/// numels.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub fn write_mask(
    py: Python<'_>,
    path: PathBuf,
    names: Vec<String>,
    arrays: Vec<PyReadonlyArray1<'_, u8>>,
    numels: Vec<u64>,
    shapes: Vec<Vec<u64>>,
    dtypes: Vec<String>,
    provenance: BTreeMap<String, String>,
) -> PyResult<()> {
    let n = names.len();
    if [arrays.len(), numels.len(), shapes.len(), dtypes.len()] != [n; 4] {
        return Err(PyValueError::new_err(
            "write_mask: names, arrays, numels, shapes and dtypes differ in length",
        ));
    }
    let data = slices(&arrays)?;
    let entries: Vec<MaskEntry> = names
        .into_iter()
        .zip(shapes)
        .zip(dtypes)
        .zip(numels)
        .map(|(((name, shape), dtype), numel)| MaskEntry {
            name,
            shape,
            dtype,
            numel,
        })
        .collect();
    py.detach(|| maskfile::write(&path, &entries, &data, &provenance))
        .map_err(CoreError)?;
    Ok(())
}

/// A mask operation over a number of masks, parsed and checked by the core (the one place where
/// operation names and `min_count` are read).
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct CombineOp {
    op: Op,
    name: String,
    min_count: Option<usize>,
}

#[pymethods]
impl CombineOp {
    #[new]
    #[pyo3(signature = (name, masks, min_count=None))]
    fn new(name: String, masks: usize, min_count: Option<usize>) -> Result<Self, CoreError> {
        let op = Op::parse(&name, min_count, masks)?;
        Ok(CombineOp {
            op,
            name,
            min_count,
        })
    }

    /// The operation's name (`and`, `or`, `xor`, `minus`, `not` or `consensus`).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// For `consensus`: the number of masks an element must be set in.
    #[getter]
    fn min_count(&self) -> Option<usize> {
        self.min_count
    }
}

/// Set bits among the first `numel` of each array, tensors in parallel.
#[pyfunction]
pub fn mask_count(
    py: Python<'_>,
    arrays: Vec<PyReadonlyArray1<'_, u8>>,
    numels: Vec<usize>,
) -> PyResult<Vec<u64>> {
    let data = slices(&arrays)?;
    Ok(py
        .detach(|| bits::count_each(&data, &numels))
        .map_err(CoreError)?)
}

/// `(|a|, |b|, |a ∩ b|)` for each pair of arrays, tensors in parallel.
#[pyfunction]
pub fn mask_overlap(
    py: Python<'_>,
    a: Vec<PyReadonlyArray1<'_, u8>>,
    b: Vec<PyReadonlyArray1<'_, u8>>,
    numels: Vec<usize>,
) -> PyResult<Vec<(u64, u64, u64)>> {
    let (sa, sb) = (slices(&a)?, slices(&b)?);
    let out = py
        .detach(|| bits::overlap_each(&sa, &sb, &numels))
        .map_err(CoreError)?;
    Ok(out.into_iter().map(|[p, q, r]| (p, q, r)).collect())
}

/// Combines, tensor by tensor, the arrays `inputs[t]` (one per mask) with `op`; tensors in
/// parallel. Returns new padded arrays.
#[pyfunction]
pub fn mask_combine<'py>(
    py: Python<'py>,
    op: &CombineOp,
    inputs: Vec<Vec<PyReadonlyArray1<'py, u8>>>,
    numels: Vec<usize>,
) -> PyResult<Vec<Bound<'py, PyArray1<u8>>>> {
    let data: Vec<Vec<&[u8]>> = inputs.iter().map(|v| slices(v)).collect::<PyResult<_>>()?;
    let out = py
        .detach(|| bits::combine_each(op.op, &data, &numels))
        .map_err(CoreError)?;
    Ok(out.into_iter().map(|v| v.into_pyarray(py)).collect())
}
