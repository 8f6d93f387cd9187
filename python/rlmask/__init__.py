"""rlmask: what did RL actually change in this model?

Reinforcement-learning finetuning updates only a small subnetwork of a large language model
(Mukherjee et al., "Reinforcement Learning Finetunes Small Subnetworks in Large Language
Models"). rlmask measures that subnetwork straight from safetensors checkpoints, exact to the
bit, without loading either model into memory.

    >>> import rlmask
    >>> report = rlmask.diff("base/", "tuned/")          # paper's default tolerance, 1e-5
    >>> report.sparsity                                   # share of elements left unchanged
    >>> report.by_layer(), report.by_module()             # Figure 3 breakdowns
    >>> rlmask.diff("base/", "seed1/", save_mask="seed1.rlmask")   # the subnetwork, saved
    >>> rlmask.overlap("seed1.rlmask", "seed2.rlmask").o1            # §5: vs density(seed2)

Importing rlmask never imports torch; :func:`rank` and :mod:`rlmask.torch` import it when used.
"""

from __future__ import annotations

from rlmask._rlmask import __version__
from rlmask.errors import (
    CheckpointChangedError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    MaskError,
    OutputError,
    PairingError,
    RemoteError,
    RlmaskError,
    RlmaskWarning,
    TensorMismatchError,
)

# Not `typing.TYPE_CHECKING`: importing typing (and the `re` it imports) took 20 ms of a
# bare `import rlmask`. Type checkers treat any name `TYPE_CHECKING` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from rlmask._diff import DEFAULT_SWEEP, DEFAULT_TOL, DiffReport, diff
    from rlmask._mask import Mask, combine, consensus, load_mask
    from rlmask._overlap import OverlapMatrix, OverlapReport, overlap, overlap_matrix
    from rlmask._rank import RankReport, rank
    from rlmask._sample import Sample
    from rlmask._spectrum import SpectrumReport, spectrum
    from rlmask._survey import SurveyReport, load_manifest, survey
    from rlmask._trajectory import TrajectoryReport, trajectory

# The API is imported when first used, so that `import rlmask` (and `rlmask --help`) does not
# pay for polars and numpy until a report needs them.
_LAZY = {
    "rlmask._diff": ("DEFAULT_SWEEP", "DEFAULT_TOL", "DiffReport", "diff"),
    "rlmask._mask": ("Mask", "combine", "consensus", "load_mask"),
    "rlmask._overlap": ("OverlapMatrix", "OverlapReport", "overlap", "overlap_matrix"),
    "rlmask._rank": ("RankReport", "rank"),
    "rlmask._sample": ("Sample",),
    "rlmask._spectrum": ("SpectrumReport", "spectrum"),
    "rlmask._survey": ("SurveyReport", "load_manifest", "survey"),
    "rlmask._trajectory": ("TrajectoryReport", "trajectory"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


# Submodules reachable as attributes without their own import (`rlmask.stats.bootstrap_mean`).
_SUBMODULES = ("stats",)


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"rlmask.{name}")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rlmask' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE, *_SUBMODULES})


__all__ = [
    "DEFAULT_SWEEP",
    "DEFAULT_TOL",
    "CheckpointChangedError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "DiffReport",
    "Mask",
    "MaskError",
    "OutputError",
    "OverlapMatrix",
    "OverlapReport",
    "PairingError",
    "RankReport",
    "RemoteError",
    "RlmaskError",
    "RlmaskWarning",
    "Sample",
    "SpectrumReport",
    "SurveyReport",
    "TensorMismatchError",
    "TrajectoryReport",
    "__version__",
    "combine",
    "consensus",
    "diff",
    "load_manifest",
    "load_mask",
    "overlap",
    "overlap_matrix",
    "rank",
    "spectrum",
    "survey",
    "trajectory",
]
