//! Thin PyO3 bindings of `rlmask-core`, built by maturin into `rlmask._rlmask`. One file per
//! Python-facing area: `atomic`, `errors`, `checkpoint`, `diff`, `mask`, `names`, `patch`, `plan`, `trajectory`.

mod atomic;
mod checkpoint;
mod diff;
mod errors;
mod mask;
mod names;
mod patch;
mod plan;
mod trajectory;

/// The private extension module behind the `rlmask` package.
#[pyo3::pymodule]
mod _rlmask {
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    #[pymodule_export]
    use super::atomic::clean_leftovers;
    #[pymodule_export]
    use super::checkpoint::{Checkpoint, TensorInfo};
    #[pymodule_export]
    use super::diff::{diff, Criterion, DiffOptions, DiffResult, Progress};
    #[pymodule_export]
    use super::mask::{
        mask_combine, mask_count, mask_overlap, write_mask, CombineOp, MaskFile, MaskTensor,
    };
    #[pymodule_export]
    use super::names::{canonical_name, printable};
    #[pymodule_export]
    use super::patch::{
        compact_bytes, fingerprint, fingerprint_matches, patch_apply, patch_apply_in_place,
        patch_create, patch_recover, patch_verify, PatchEntry, PatchFile,
    };
    #[pymodule_export]
    use super::plan::{pairing, Pairing, PlanOptions};
    #[pymodule_export]
    use super::trajectory::{trajectory, TrajectoryOptions, TrajectoryResult};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("DEFAULT_TOL", rlmask_core::kernel::DEFAULT_TOL)?;
        m.add(
            "CRITERIA",
            PyTuple::new(m.py(), rlmask_core::kernel::CRITERIA)?,
        )?;
        m.add(
            "COMBINE_OPS",
            PyTuple::new(m.py(), rlmask_core::bits::Op::NAMES)?,
        )?;
        m.add(
            "PATCH_CODECS",
            PyTuple::new(m.py(), rlmask_core::patch::Codec::NAMES)?,
        )?;
        m.add(
            "DEFAULT_PATCH_CODEC",
            rlmask_core::patch::Codec::DEFAULT.name(),
        )?;
        m.add("PATCH_VERSION", rlmask_core::patch::VERSION)?;
        m.add("APPLY_JOURNAL", rlmask_core::patch::JOURNAL)
    }
}
