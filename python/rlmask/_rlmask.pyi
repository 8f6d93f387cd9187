"""Type stubs of the private extension module (kept honest by ``mypy.stubtest`` in CI)."""

from os import PathLike
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "Checkpoint",
    "MaskFile",
    "MaskTensor",
    "Progress",
    "__version__",
    "canonical_name",
    "diff",
    "mask_combine",
    "mask_count",
    "mask_overlap",
    "printable",
    "trajectory",
    "write_mask",
]

__version__: str

@final
class Checkpoint:
    def __new__(cls, path: str | PathLike[str]) -> Checkpoint: ...
    @property
    def path(self) -> Path: ...
    @property
    def shards(self) -> list[Path]: ...
    def names(self) -> list[str]: ...
    def tensor_info(self, name: str) -> tuple[str, list[int], int, Path]: ...
    def metadata(self) -> dict[str, str]: ...
    def raw(self, name: str) -> npt.NDArray[np.uint8]: ...
    def binade_counts(
        self, name: str, masks: list[npt.NDArray[np.uint8]]
    ) -> tuple[list[int], list[list[int]]]: ...
    def verify(self) -> None: ...
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
    name_map: list[tuple[str, str]] = ...,
    skip_mismatched: bool = False,
    mask_threshold: int | None = None,
    mask_file: str | PathLike[str] | None = None,
    mask_provenance: dict[str, str] | None = None,
    magnitude: bool = False,
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

@final
class MaskTensor:
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def numel(self) -> int: ...

@final
class MaskFile:
    def __new__(cls, path: str | PathLike[str]) -> MaskFile: ...
    @property
    def path(self) -> Path: ...
    def metadata(self) -> dict[str, str]: ...
    def tensors(self) -> list[MaskTensor]: ...
    def packed(self, name: str) -> npt.NDArray[np.uint8]: ...
    def verify(self) -> None: ...

def canonical_name(name: str, name_map: list[tuple[str, str]] = ...) -> str: ...
def printable(text: str) -> str: ...
def trajectory(
    base: Checkpoint,
    ckpts: list[Checkpoint],
    *,
    criterion: str,
    tolerance: float,
    select: list[str] | None = None,
    name_map: list[tuple[str, str]] = ...,
    skip_mismatched: bool = False,
    mask_files: list[str | PathLike[str]] | None = None,
    mask_provenance: list[dict[str, str]] | None = None,
    previous: Checkpoint | None = None,
    final_mask: MaskFile | None = None,
    ever_file: str | PathLike[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]: ...
