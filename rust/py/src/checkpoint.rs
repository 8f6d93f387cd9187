//! `Checkpoint`: a validated, memory-mapped set of safetensors shards.

use std::path::PathBuf;
use std::sync::Arc;

use numpy::ndarray::ArrayView1;
use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use rlmask_core as core;

use crate::errors::CoreError;

/// A read-only numpy uint8 array over `bytes`, without copying, whose base object is `owner`.
///
/// # Safety
/// `bytes` must live in a read-only memory map that `owner` keeps alive, unchanged and mapped,
/// for as long as `owner` lives; numpy holds `owner` as the array's base object, so the map
/// outlives the array. The array is marked read-only, so numpy never writes to the mapping.
pub(crate) unsafe fn mapped_view<'py>(
    bytes: &[u8],
    owner: Bound<'py, PyAny>,
) -> Bound<'py, PyArray1<u8>> {
    let view = ArrayView1::from(bytes);
    // SAFETY: guaranteed by the caller, as documented above.
    let array = unsafe { PyArray1::borrow_from_array(&view, owner) };
    array.readwrite().make_nonwriteable();
    array
}

/// Where and how one tensor is stored.
#[pyclass(module = "rlmask._rlmask", frozen, get_all)]
pub struct TensorInfo {
    /// Safetensors dtype code, e.g. `BF16`.
    dtype: String,
    shape: Vec<u64>,
    numel: u64,
    /// The shard file that holds it.
    shard: PathBuf,
}

/// A checkpoint opened from a `.safetensors` file, an index file or a directory. Every header
/// is validated on opening; no tensor data is read until it is compared.
#[pyclass(module = "rlmask._rlmask", frozen)]
pub struct Checkpoint {
    pub(crate) inner: Arc<core::Checkpoint>,
}

#[pymethods]
impl Checkpoint {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> Result<Self, CoreError> {
        let inner = py.detach(|| core::Checkpoint::open(&path))?;
        Ok(Checkpoint {
            inner: Arc::new(inner),
        })
    }

    /// The checkpoint at an `http://` or `https://` URL (a folder, an index or a
    /// `.safetensors` file), read by range requests carrying `headers`; every header is
    /// fetched and validated, no tensor data until a pass reads it.
    #[staticmethod]
    #[pyo3(signature = (url, headers=Vec::new()))]
    fn open_url(
        py: Python<'_>,
        url: String,
        headers: Vec<(String, String)>,
    ) -> Result<Self, CoreError> {
        let inner = py.detach(|| core::Checkpoint::open_url(&url, headers))?;
        Ok(Checkpoint {
            inner: Arc::new(inner),
        })
    }

    /// What the checkpoint is known by, as text: `path`, or for a remote checkpoint its URL
    /// without credentials or query (`path` would fold its `//`).
    #[getter]
    fn location(&self) -> String {
        self.inner.path.to_string_lossy().into_owned()
    }

    /// Whether the checkpoint is read over HTTP.
    #[getter]
    fn remote(&self) -> bool {
        self.inner.shards.iter().any(|s| s.is_remote())
    }

    /// Bytes fetched over HTTP so far, all shards (0 for a local checkpoint).
    #[getter]
    fn fetched(&self) -> u64 {
        self.inner.fetched()
    }

    /// For a remote checkpoint, the `config.json` beside it as the server gave it (None when
    /// it has none, and for a local checkpoint).
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> Option<Bound<'py, pyo3::types::PyBytes>> {
        self.inner
            .config
            .as_deref()
            .map(|c| pyo3::types::PyBytes::new(py, c))
    }

    /// Each remote shard's `ETag`, in the order of `shards` (None for a local file or a
    /// server that gives none).
    #[getter]
    fn shard_etags(&self) -> Vec<Option<String>> {
        self.inner
            .shards
            .iter()
            .map(|s| s.etag().map(str::to_string))
            .collect()
    }

    /// Each shard's size in bytes, in the order of `shards`.
    #[getter]
    fn shard_sizes(&self) -> Vec<u64> {
        self.inner
            .shards
            .iter()
            .map(|s| s.file_bytes().len() as u64)
            .collect()
    }

    /// What the checkpoint is known by: the `.safetensors` or index file it was opened from;
    /// for a directory, its index file when it has one, else the directory itself.
    #[getter]
    fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    /// The shard files, in the order they were opened.
    #[getter]
    fn shards(&self) -> Vec<PathBuf> {
        self.inner.shards.iter().map(|s| s.path.clone()).collect()
    }

    /// Tensor names, sorted.
    fn names(&self) -> Vec<String> {
        self.inner.names().map(str::to_string).collect()
    }

    /// Dtype, shape, numel and shard of one tensor; `KeyError` if absent.
    fn tensor_info(&self, name: &str) -> PyResult<TensorInfo> {
        let (shard, t) = self
            .inner
            .get(name)
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_string()))?;
        Ok(TensorInfo {
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            numel: t.numel,
            shard: shard.path.clone(),
        })
    }

    /// The `__metadata__` of the file (of the first shard when there are several).
    fn metadata(&self) -> std::collections::BTreeMap<String, String> {
        self.inner
            .shards
            .first()
            .map(|s| s.metadata.clone())
            .unwrap_or_default()
    }

    /// The raw bytes of one tensor as a read-only numpy uint8 array that views the memory map
    /// (no copy); the array keeps this checkpoint, and so the map, alive.
    fn raw<'py>(slf: Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let inner = slf.get().inner.clone();
        let (shard, t) = inner
            .get(name)
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_string()))?;
        // SAFETY (of `mapped_view`'s contract): the bytes live in a read-only memory map owned
        // by an `Arc` inside `slf`'s checkpoint, which is immutable (`frozen`) and never
        // remapped.
        let bytes = slf.py().detach(|| shard.pinned(t)).map_err(CoreError)?;
        Ok(unsafe { mapped_view(bytes, slf.into_any()) })
    }

    /// The values of tensor `name` as a float32 array (a copy), as a comparison reads them:
    /// widened, or dequantised with their scales for FP8 and MXFP4 weights (`block`: the FP8
    /// block size, rows and columns, when the weight has block scales).
    #[pyo3(signature = (name, block=None))]
    fn values<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        block: Option<[u64; 2]>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let inner = self.inner.clone();
        let out = py
            .detach(|| rlmask_core::fp8::values(&inner, name, block))
            .map_err(CoreError)?;
        Ok(out.into_pyarray(py))
    }

    /// Elements of tensor `name` per binade of its values (256 bins: the f32 exponent of
    /// `|a|`), and for each packed mask in `masks` (`numel` bits each) the elements it holds
    /// per binade: `(numel per bin, [held per bin, per mask])`.
    fn binade_counts(
        &self,
        py: Python<'_>,
        name: &str,
        masks: Vec<PyReadonlyArray1<'_, u8>>,
    ) -> PyResult<(Vec<u64>, Vec<Vec<u64>>)> {
        let (shard, t) = self
            .inner
            .get(name)
            .ok_or_else(|| pyo3::exceptions::PyKeyError::new_err(name.to_string()))?;
        let data: Vec<&[u8]> = masks
            .iter()
            .map(|m| m.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
        let bytes = py.detach(|| shard.read(t)).map_err(CoreError)?;
        let out =
            py.detach(|| core::kernel::binade_counts(bytes, t.dtype, &data, t.numel as usize));
        Ok(out.map_err(CoreError)?)
    }

    /// Raises `CheckpointChangedError` when a shard was truncated or rewritten since it was
    /// opened (call it after reading through `raw` views).
    fn verify(&self) -> Result<(), CoreError> {
        for shard in &self.inner.shards {
            shard.check_unchanged()?;
        }
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn __repr__(&self) -> String {
        format!(
            "Checkpoint('{}', tensors={}, shards={})",
            self.inner.path.display(),
            self.inner.len(),
            self.inner.shards.len()
        )
    }
}
