"""Type stubs of the private extension module (kept honest by ``mypy.stubtest`` in CI)."""

from os import PathLike
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointNotFoundError",
    "Progress",
    "RlmaskError",
    "TensorMismatchError",
    "__version__",
    "diff",
    "mask_combine",
    "mask_count",
    "mask_overlap",
    "write_mask",
]

__version__: str

class RlmaskError(Exception): ...
class CheckpointError(RlmaskError): ...
class CheckpointNotFoundError(CheckpointError): ...
class CheckpointFormatError(CheckpointError): ...
class TensorMismatchError(RlmaskError): ...

@final
class Checkpoint:
    def __new__(cls, path: str | PathLike[str]) -> Checkpoint: ...
    @property
    def path(self) -> str: ...
    @property
    def shards(self) -> list[str]: ...
    def names(self) -> list[str]: ...
    def tensor_info(self, name: str) -> tuple[str, list[int], int, str]: ...
    def metadata(self) -> dict[str, str]: ...
    def raw(self, name: str) -> npt.NDArray[np.uint8]: ...
    def __len__(self) -> int: ...
    def __contains__(self, name: str, /) -> bool: ...

@final
class Progress:
    def __new__(cls) -> Progress: ...
    @property
    def done(self) -> int: ...
    @property
    def total(self) -> int: ...
    def cancel(self) -> None: ...

def diff(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    criterion: str,
    tolerances: list[float],
    select: list[str] | None = None,
    skip_mismatched: bool = False,
    mask_threshold: int | None = None,
    mask_file: str | PathLike[str] | None = None,
    mask_provenance: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]: ...
def write_mask(
    path: str | PathLike[str],
    names: list[str],
    arrays: list[npt.NDArray[np.uint8]],
    numels: list[int],
    shapes: list[list[int]],
    dtypes: list[str],
    provenance: dict[str, str],
) -> None: ...
def mask_count(arrays: list[npt.NDArray[np.uint8]], numels: list[int]) -> list[int]: ...
def mask_overlap(
    a: list[npt.NDArray[np.uint8]], b: list[npt.NDArray[np.uint8]], numels: list[int]
) -> list[tuple[int, int, int]]: ...
def mask_combine(
    op: str,
    inputs: list[list[npt.NDArray[np.uint8]]],
    numels: list[int],
    min_count: int | None = None,
) -> list[npt.NDArray[np.uint8]]: ...
