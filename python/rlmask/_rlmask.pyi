"""Type stubs of the private extension module (kept honest by ``mypy.stubtest`` in CI)."""

from os import PathLike
from pathlib import Path
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "APPLY_JOURNAL",
    "COMBINE_OPS",
    "CRITERIA",
    "DEFAULT_PATCH_CODEC",
    "DEFAULT_TOL",
    "PATCH_CODECS",
    "PATCH_VERSION",
    "Checkpoint",
    "CombineOp",
    "Criterion",
    "DiffOptions",
    "DiffResult",
    "MaskFile",
    "MaskTensor",
    "Pairing",
    "PatchEntry",
    "PatchFile",
    "PlanOptions",
    "Progress",
    "TensorInfo",
    "TrajectoryOptions",
    "TrajectoryResult",
    "__version__",
    "canonical_name",
    "clean_leftovers",
    "compact_bytes",
    "diff",
    "fingerprint",
    "fingerprint_matches",
    "mask_combine",
    "mask_count",
    "mask_overlap",
    "pairing",
    "patch_apply",
    "patch_apply_in_place",
    "patch_create",
    "patch_recover",
    "patch_verify",
    "printable",
    "trajectory",
    "write_mask",
]

__version__: str
DEFAULT_TOL: float
CRITERIA: tuple[str, ...]
COMBINE_OPS: tuple[str, ...]
PATCH_CODECS: tuple[str, ...]
PATCH_VERSION: str
DEFAULT_PATCH_CODEC: str
APPLY_JOURNAL: str

@final
class TensorInfo:
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def numel(self) -> int: ...
    @property
    def shard(self) -> Path: ...

@final
class Checkpoint:
    def __new__(cls, path: str | PathLike[str]) -> Checkpoint: ...
    @staticmethod
    def open_url(url: str, headers: list[tuple[str, str]] = ...) -> Checkpoint: ...
    @property
    def location(self) -> str: ...
    @property
    def remote(self) -> bool: ...
    @property
    def fetched(self) -> int: ...
    @property
    def config(self) -> bytes | None: ...
    @property
    def shard_etags(self) -> list[str | None]: ...
    @property
    def shard_sizes(self) -> list[int]: ...
    @property
    def path(self) -> Path: ...
    @property
    def shards(self) -> list[Path]: ...
    def names(self) -> list[str]: ...
    def tensor_info(self, name: str) -> TensorInfo: ...
    def metadata(self) -> dict[str, str]: ...
    def values(
        self, name: str, block: tuple[int, int] | None = None
    ) -> npt.NDArray[np.float32]: ...
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

@final
class Criterion:
    def __new__(
        cls,
        name: str,
        *,
        tol: float | None = None,
        tolerances: list[float] = ...,
        eta: float | None = None,
    ) -> Criterion: ...
    @property
    def name(self) -> str: ...
    @property
    def values(self) -> list[float]: ...
    @property
    def primary_index(self) -> int: ...
    @property
    def primary(self) -> float: ...
    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, Any]]: ...

@final
class DiffResult:
    @property
    def columns(self) -> dict[str, list[Any]]: ...
    @property
    def bits(self) -> dict[str, npt.NDArray[np.uint8]]: ...
    @property
    def magnitude(self) -> list[tuple[str, int, int, list[int]]] | None: ...
    @property
    def only_in_base(self) -> list[str]: ...
    @property
    def only_in_tuned(self) -> list[str]: ...
    @property
    def tied(self) -> list[str]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    @property
    def dequantised(self) -> list[tuple[str, str | None, str | None]]: ...
    @property
    def scales(self) -> list[str]: ...
    @property
    def resized(self) -> list[tuple[str, int, int]]: ...
    @property
    def renamed_base(self) -> list[tuple[str, str]]: ...
    @property
    def renamed_tuned(self) -> list[tuple[str, str]]: ...

@final
class PlanOptions:
    def __new__(
        cls,
        *,
        select: list[str] | None = None,
        name_map: list[tuple[str, str]] = ...,
        skip_mismatched: bool = False,
        shared_rows: bool = False,
        block_base: tuple[int, int] | None = None,
        block_tuned: tuple[int, int] | None = None,
    ) -> PlanOptions: ...
    @property
    def select(self) -> list[str] | None: ...
    @property
    def name_map(self) -> list[tuple[str, str]]: ...
    @property
    def skip_mismatched(self) -> bool: ...
    @property
    def shared_rows(self) -> bool: ...
    @property
    def block_base(self) -> tuple[int, int] | None: ...
    @property
    def block_tuned(self) -> tuple[int, int] | None: ...
    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, Any]]: ...

@final
class DiffOptions:
    def __new__(
        cls,
        criterion: Criterion,
        plan: PlanOptions,
        *,
        mask_at: int | None = None,
        mask_file: tuple[str | PathLike[str], dict[str, str]] | None = None,
        magnitude: bool = False,
        as_bf16: bool = False,
        sample: tuple[float, int, int] | None = None,
    ) -> DiffOptions: ...

def diff(
    base: Checkpoint,
    tuned: Checkpoint,
    options: DiffOptions,
    *,
    progress: Progress | None = None,
) -> DiffResult: ...

@final
class Pairing:
    @property
    def pairs(self) -> list[tuple[str, str, str, int | None, bool]]: ...
    @property
    def only_in_base(self) -> list[str]: ...
    @property
    def only_in_tuned(self) -> list[str]: ...
    @property
    def tied(self) -> list[str]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    @property
    def resized(self) -> list[tuple[str, int, int]]: ...
    @property
    def renamed_base(self) -> list[tuple[str, str]]: ...
    @property
    def renamed_tuned(self) -> list[tuple[str, str]]: ...

def pairing(base: Checkpoint, tuned: Checkpoint, options: PlanOptions) -> Pairing: ...
def clean_leftovers(target: str | PathLike[str]) -> None: ...
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

@final
class CombineOp:
    def __new__(cls, name: str, masks: int, min_count: int | None = None) -> CombineOp: ...
    @property
    def name(self) -> str: ...
    @property
    def min_count(self) -> int | None: ...

def mask_combine(
    op: CombineOp, inputs: list[list[npt.NDArray[np.uint8]]], numels: list[int]
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

@final
class TrajectoryResult:
    def __new__(
        cls,
        *,
        name: list[str],
        dtype: list[str],
        shape: list[list[int]],
        numel: list[int],
        changed_vs_base: list[list[int]],
        changed_consecutive: list[list[int]],
        outside_final: list[list[int]],
        ever: list[int],
        last: list[int],
        incomplete: list[tuple[str, list[int]]],
        skipped: list[tuple[str, str]],
        renamed: list[list[tuple[str, str]]],
    ) -> TrajectoryResult: ...
    @property
    def name(self) -> list[str]: ...
    @property
    def dtype(self) -> list[str]: ...
    @property
    def shape(self) -> list[list[int]]: ...
    @property
    def numel(self) -> list[int]: ...
    @property
    def changed_vs_base(self) -> list[list[int]]: ...
    @property
    def changed_consecutive(self) -> list[list[int]]: ...
    @property
    def outside_final(self) -> list[list[int]]: ...
    @property
    def ever(self) -> list[int]: ...
    @property
    def last(self) -> list[int]: ...
    @property
    def incomplete(self) -> list[tuple[str, list[int]]]: ...
    @property
    def skipped(self) -> list[tuple[str, str]]: ...
    @property
    def renamed(self) -> list[list[tuple[str, str]]]: ...
    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, Any]]: ...

@final
class TrajectoryOptions:
    def __new__(
        cls,
        criterion: Criterion,
        plan: PlanOptions,
        *,
        mask_files: list[str | PathLike[str]] | None = None,
        mask_provenance: list[dict[str, str]] | None = None,
        ever_file: str | PathLike[str] | None = None,
    ) -> TrajectoryOptions: ...

def trajectory(
    base: Checkpoint,
    ckpts: list[Checkpoint],
    options: TrajectoryOptions,
    *,
    previous: Checkpoint | None = None,
    final_mask: MaskFile | None = None,
    progress: Progress | None = None,
) -> TrajectoryResult: ...

@final
class PatchEntry:
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> list[int]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def changed(self) -> int: ...
    @property
    def form(self) -> str: ...
    @property
    def base(self) -> str: ...
    @property
    def tuned(self) -> str: ...

@final
class PatchFile:
    def __new__(cls, path: str | PathLike[str]) -> PatchFile: ...
    @property
    def path(self) -> Path: ...
    def metadata(self) -> dict[str, str]: ...
    def entries(self) -> list[PatchEntry]: ...
    @property
    def codec(self) -> str: ...
    def stored_bytes(self) -> dict[str, int]: ...
    def plain_bytes(self) -> int: ...
    def changes(
        self, name: str
    ) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.uint8]] | None: ...

def fingerprint(data: npt.NDArray[np.uint8]) -> str: ...
def fingerprint_matches(data: npt.NDArray[np.uint8], print: str) -> bool: ...
def compact_bytes(
    indices: npt.NDArray[np.int64], values: npt.NDArray[np.uint8], size: int, numel: int
) -> int: ...
def patch_create(
    base: Checkpoint,
    tuned: Checkpoint,
    out: str | PathLike[str],
    *,
    codec: str = ...,
    name_map: list[tuple[str, str]] = ...,
    provenance: dict[str, str] = ...,
    progress: Progress | None = None,
) -> tuple[list[PatchEntry], int]: ...
def patch_apply(
    base: Checkpoint,
    patches: list[PatchFile],
    out: str | PathLike[str],
    *,
    progress: Progress | None = None,
) -> None: ...
def patch_apply_in_place(
    base: Checkpoint,
    patches: list[PatchFile],
    *,
    progress: Progress | None = None,
) -> None: ...
def patch_recover(dir: str | PathLike[str]) -> int: ...
def patch_verify(
    base: Checkpoint,
    patch: PatchFile,
    tuned: Checkpoint | None = None,
    *,
    progress: Progress | None = None,
) -> None: ...
