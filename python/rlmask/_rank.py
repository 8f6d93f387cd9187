"""Update rank and the spectrum of every update matrix (paper §3, Table 2; design §1).

For each 2-D tensor, the update ``ΔW = W_tuned - W_base`` is formed in float32 on the target
device from zero-copy views of the memory-mapped checkpoints, one matrix (or, on CUDA, one batch
of same-shaped matrices) at a time, and its singular values are computed once with
``torch.linalg.svdvals``. Every figure derives from them:

- ``rank``: singular values above the tolerance, exactly as ``torch.linalg.matrix_rank``
  defines it: ``tol = max(atol, rtol * sigma_max)``, where ``rtol`` defaults to
  ``eps(float32) * max(m, n)`` when neither is given, and to 0 when only ``atol`` is;
- ``rank_fraction = rank / min(m, n)`` (the paper's Table 2 figure is its mean over matrices);
- ``sigma_max``; ``stable_rank = ||ΔW||_F^2 / sigma_max^2``;
- ``effective_rank``: ``exp`` of the entropy of the normalised singular values
  ``p_i = sigma_i / sum(sigma)`` (Roy and Vetterli);
- ``energy_top1``, ``energy_topk``: the share of ``||ΔW||_F^2`` in the top 1 and top k singular
  directions.

A zero update has rank 0 and null spectrum ratios. 1-D tensors (norms, biases) are skipped and
listed.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._names import NORMS, layer_of, module_of, natural_key
from rlmask._options import declared_block
from rlmask._plan import PairOptions, pairing
from rlmask._progress import bar_width, progress_wanted, run_in_worker
from rlmask._report import Report, few, printable_lines, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask.errors import PairingError

if TYPE_CHECKING:
    import torch

EMBEDDINGS = ("embed_tokens", "lm_head")

# numpy views of raw bytes, reinterpreted as torch dtypes (float8 through uint8).
_NP_VIEW = {
    "BF16": np.int16,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
    "F8_E4M3FNUZ": np.uint8,
    "F8_E5M2FNUZ": np.uint8,
    "F4": np.uint8,  # read through Checkpoint.values (dequantised), never viewed
}


#: Weights read dequantised with their scales (``Checkpoint.values``), never as raw codes.
_SCALED = frozenset(("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"))


def load_matrix(
    ckpt: _rlmask.Checkpoint,
    name: str,
    rows: int,
    device: torch.device,
    block: tuple[int, int] | None,
) -> torch.Tensor:
    """The first ``rows`` rows of matrix ``name`` as float32 on ``device``: FP8 and MXFP4
    weights dequantised with their scales (``block``: the FP8 block size), other floating
    dtypes viewed zero-copy from the map and converted."""
    import torch

    info = ckpt.tensor_info(name)
    if info.dtype in _SCALED:
        values = torch.from_numpy(ckpt.values(name, block)).reshape(info.shape)
    else:
        values = _to_torch(ckpt.raw(name), info.dtype, info.shape)
    return values[:rows].to(device, torch.float32)


def _to_torch(raw: np.ndarray, dtype: str, shape: list[int]) -> torch.Tensor:
    """A zero-copy torch tensor over a tensor's raw bytes (copied only if misaligned)."""
    import torch

    view = raw.view(_NP_VIEW[dtype])
    if not view.flags.aligned:
        view = view.copy()
    with warnings.catch_warnings():
        # The view is read-only (it maps the file); it is only ever read, then converted.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.from_numpy(view)
    special = {
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
        "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    }
    if dtype in special:
        t = t.view(special[dtype])
    return t.reshape(shape)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else CPU; otherwise a CPU, CUDA, MPS or XPU device that
    exists here. Anything else (an unknown name, ``meta``, a missing GPU) is a ValueError."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown device '{device}': {e}") from None
    available: dict[str, Callable[[], bool]] = {
        "cpu": lambda: True,
        "cuda": lambda: (
            torch.cuda.is_available()
            and (dev.index is None or dev.index < torch.cuda.device_count())
        ),
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if dev.type not in available:
        raise ValueError(
            f"device '{device}' cannot compute singular values (use auto, cpu, cuda, cuda:N, "
            "mps or xpu)"
        )
    if not available[dev.type]():
        raise ValueError(f"device '{device}' asked for, but it is not available here")
    return dev


def rank_tolerance(
    sigma_max: torch.Tensor, m: int, n: int, rtol: float | None, atol: float | None
) -> torch.Tensor:
    """``torch.linalg.matrix_rank``'s tolerance for float32 singular values."""
    import torch

    eps = torch.finfo(torch.float32).eps
    if rtol is None:
        rtol = eps * max(m, n) if (atol is None or atol == 0) else 0.0
    return torch.clamp(sigma_max * rtol, min=atol or 0.0)


def spectrum_figures(
    s: torch.Tensor, m: int, n: int, rtol: float | None, atol: float | None, top_k: int
) -> dict[str, Any]:
    """Every per-matrix figure from the singular values ``s`` (descending) of one matrix."""
    import torch

    s = s.double()  # the figures are sums of squares: accumulate in float64
    smax = s[0] if s.numel() else torch.tensor(0.0, dtype=torch.float64)
    tol = rank_tolerance(smax.float(), m, n, rtol, atol).double()
    rank = int((s > tol).sum())
    energy = s.square()
    total = float(energy.sum())
    out: dict[str, Any] = {
        "rank": rank,
        "max_rank": min(m, n),
        "rank_fraction": rank / min(m, n) if min(m, n) else None,
        "sigma_max": float(smax),
        "tolerance": float(tol),
        "stable_rank": None,
        "effective_rank": None,
        "energy_top1": None,
        "energy_topk": None,
    }
    if total > 0:
        p = s / s.sum()
        p = p[p > 0]
        out["stable_rank"] = total / float(smax) ** 2
        out["effective_rank"] = math.exp(float(-(p * p.log()).sum()))
        out["energy_top1"] = float(energy[0]) / total
        out["energy_topk"] = float(energy[:top_k].sum()) / total
    return out


@dataclass(frozen=True, repr=False)
class RankReport(Report):
    """Rank and spectrum of every update matrix.

    Attributes:
        base, tuned: the checkpoint arguments as given.
        device: where the singular values were computed.
        top_k: the k of ``energy_topk``.
        tensors: one row per 2-D tensor: name, layer, module, shape, rank, max_rank,
            rank_fraction, sigma_max, tolerance, stable_rank, effective_rank, energy_top1,
            energy_topk.
        skipped: ``(name, reason)`` of the tensors not analysed (1-D, norms, embeddings when
            asked, absent on one side, and with ``skip_mismatched`` a shape or dtype mismatch).
        resized: with ``shared_rows``, ``(name, base rows, tuned rows)`` of the matrices
            analysed on the rows both share.
    """

    base: str
    tuned: str
    device: str
    top_k: int
    tensors: pl.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resized: list[tuple[str, int, int]] = field(default_factory=list)
    #: The singular values of every update matrix, descending (for energy curves; not in the
    #: JSON report).
    spectra: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def mean_rank_fraction(self) -> float | None:
        """Mean of ``rank / min(m, n)`` over the matrices: the paper's Table 2 figure."""
        v = self.tensors["rank_fraction"].mean()
        return None if v is None else float(v)  # type: ignore[arg-type]

    def _group(self, key: str) -> pl.DataFrame:
        return (
            self.tensors.filter(pl.col(key).is_not_null())
            .group_by(key)
            .agg(
                pl.len().alias("matrices"),
                pl.col("rank_fraction").mean().alias("mean_rank_fraction"),
                pl.col("stable_rank").mean().alias("mean_stable_rank"),
                pl.col("energy_top1").mean().alias("mean_energy_top1"),
            )
        )

    def by_layer(self) -> pl.DataFrame:
        """Mean rank fraction (and stable rank, top-1 energy) per transformer layer."""
        return self._group("layer").sort("layer")

    def by_module(self) -> pl.DataFrame:
        """Mean rank fraction (and stable rank, top-1 energy) per module type."""
        return sort_modules(self._group("module"))

    def total_frame(self) -> pl.DataFrame:
        """Matrices and the mean rank fraction as a one-row DataFrame."""
        return pl.DataFrame(
            {"matrices": [self.tensors.height], "mean_rank_fraction": [self.mean_rank_fraction]},
            schema={"matrices": pl.Int64, "mean_rank_fraction": pl.Float64},
        )

    def to_dict(self) -> dict[str, Any]:
        """Summary, per-matrix rows and skipped tensors as plain Python values."""
        return {
            "base": self.base,
            "tuned": self.tuned,
            "device": self.device,
            "top_k": self.top_k,
            "matrices": self.tensors.height,
            "mean_rank_fraction": self.mean_rank_fraction,
            "tensors": self.tensors.to_dicts(),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "resized": [
                {"name": n, "base_rows": a, "tuned_rows": b, "compared_rows": min(a, b)}
                for n, a, b in self.resized
            ],
        }

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """Rank fraction per module type and the singular-value energy curves (needs
        matplotlib; :func:`rlmask.plot.rank_figure`). Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure.
        """
        from rlmask.plot import rank_figure

        return rank_figure(self, path, dpi=dpi)

    def summary(self) -> str:
        """A short human-readable account."""
        mean = self.mean_rank_fraction
        lines = [
            f"base:  {self.base}",
            f"tuned: {self.tuned}",
            f"{self.tensors.height} update matrices on {self.device}; mean rank / min(m, n) = "
            + ("-" if mean is None else f"{100 * mean:.2f}%"),
        ]
        if self.skipped:
            lines.append(f"skipped: {few([n for n, _ in self.skipped])}")
        if self.resized:
            lines.append(
                "analysed on the rows both share (rows base -> tuned): "
                + few([f"{n} ({a} -> {b})" for n, a, b in self.resized])
            )
        return printable_lines(lines)


def _batches(jobs: list[tuple[str, list[int]]], batch: bool, limit: int) -> Iterator[list[str]]:
    """Groups of names to decompose together: same-shaped runs on CUDA, singletons on CPU."""
    if not batch:
        for name, _ in jobs:
            yield [name]
        return
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, shape in jobs:
        by_shape.setdefault(tuple(shape), []).append(name)
    for dims, names in by_shape.items():
        per = max(1, limit // max(1, 3 * 4 * math.prod(dims)))  # a, b, delta in float32
        for i in range(0, len(names), per):
            yield names[i : i + per]


def rank(
    base: PathArg,
    tuned: PathArg,
    *,
    device: str = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    skip_embeddings: bool = False,
    skip_mismatched: bool = False,
    shared_rows: bool = False,
    name_map: Mapping[str, str] | None = None,
    top_k: int = 8,
    batch_bytes: int = 2**30,
    progress: bool = True,
) -> RankReport:
    """Rank of every update matrix ``W_tuned - W_base`` (paper §3, Table 2). Needs torch.

    Args:
        base, tuned: checkpoints, in any form :func:`rlmask.diff` accepts.
        device: ``auto`` (CUDA if available, else CPU), or any torch device.
        rtol, atol: rank tolerances, exactly as ``torch.linalg.matrix_rank`` takes them; by
            default ``sigma_max * max(m, n) * eps(float32)``.
        include, exclude: regular expressions (``re.search``) on tensor names.
        skip_embeddings: leave out ``embed_tokens`` and ``lm_head`` (the paper includes them).
        skip_mismatched, shared_rows: as in :func:`rlmask.diff`: a tensor whose shape or dtype
            differs is an error unless it is skipped, or, with ``shared_rows``, a row count
            that differs (a resized vocabulary) is analysed on the rows both share and listed
            in :attr:`RankReport.resized`.
        name_map: as in :func:`rlmask.diff`: tensors pair by name after wrapper segments
            (DDP ``module.``, FSDP, ``torch.compile``) are removed and this map is applied,
            exactly as ``diff`` pairs them (one plan, ``rlmask._plan``).
        top_k: the k of the ``energy_topk`` column.
        batch_bytes: on CUDA, same-shaped matrices are decomposed in batches of about this
            many bytes of float32 working data.
        progress: a progress bar with an estimate of the time left (stderr, when a terminal).

    Returns:
        A :class:`RankReport`; ``report.mean_rank_fraction`` is the Table 2 figure.
    """
    try:
        import torch
    except ImportError:
        raise ImportError("rlmask.rank needs torch: pip install 'rlmask[torch]'") from None
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    for what, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not value >= 0:  # also refuses NaN
            raise ValueError(f"{what} must be a non-negative number, not {value}")
    dev = resolve_device(device)
    a = _rlmask.Checkpoint(resolve_checkpoint(base))
    b = _rlmask.Checkpoint(resolve_checkpoint(tuned))
    # FP8 weights with block scales are dequantised with the block each config.json declares.
    blocks = (declared_block(a), declared_block(b))
    plan = pairing(
        a,
        b,
        PairOptions.build(
            include=include,
            exclude=exclude,
            name_map=name_map,
            skip_mismatched=skip_mismatched,
            shared_rows=shared_rows,
        ),
    )
    skipped: list[tuple[str, str]] = [
        *((n, "only in base") for n in plan.only_in_base),
        *((n, "only in tuned") for n in plan.only_in_tuned),
        *plan.skipped,
    ]
    resized = list(plan.resized)
    # name as paired -> (stored in base, stored in tuned, shape analysed)
    where: dict[str, tuple[str, str, list[int]]] = {}
    jobs: list[tuple[str, list[int]]] = []
    for n, stored_a, stored_b, rows_, floating in plan.pairs:
        ia, ib = a.tensor_info(stored_a), b.tensor_info(stored_b)
        da, db, sa = ia.dtype, ib.dtype, list(ia.shape)
        if rows_ is not None:
            sa = [rows_, *sa[1:]]
        if len(sa) != 2:
            skipped.append((n, f"{len(sa)}-D"))
        elif module_of(n) in NORMS:
            skipped.append((n, "norm"))
        elif not floating or da not in _NP_VIEW or db not in _NP_VIEW:
            skipped.append((n, f"not floating ({da})"))
        elif skip_embeddings and module_of(n) in EMBEDDINGS:
            skipped.append((n, "embedding (skip_embeddings)"))
        else:
            jobs.append((n, sa))
            where[n] = (stored_a, stored_b, sa)
    skipped.sort(key=lambda s: natural_key(s[0]))
    if not jobs:
        raise PairingError(
            f"no 2-D floating update matrix to decompose between {base} and {tuned} "
            f"({len(plan.pairs)} tensors paired; {len(skipped)} left out, e.g. "
            f"{few([f'{n} ({why})' for n, why in skipped], 3)})"
        )

    work_of = {n: s[0] * s[1] * min(s) for n, s in jobs}  # ~ SVD cost, for the time estimate
    rows: dict[str, dict[str, Any]] = {}
    bar = None
    if progress_wanted(progress):
        from tqdm import tqdm

        bar = tqdm(
            total=sum(work_of.values()),
            desc=f"svd on {dev.type}",
            unit="flop",
            unit_scale=True,
            file=sys.stderr,
            delay=0.5,
            ncols=bar_width(),
            leave=False,
        )
    stop = threading.Event()
    spectra: dict[str, np.ndarray] = {}

    def work() -> None:
        for group in _batches(jobs, dev.type == "cuda", batch_bytes):
            if stop.is_set():
                return
            deltas = []
            for n in group:
                stored_a, stored_b, shape = where[n]
                rows_ = shape[0]  # fewer than stored with shared_rows
                # clone: a float32 tensor on the CPU would otherwise stay a view of the
                # read-only map, and the subtraction below works in place.
                delta = load_matrix(b, stored_b, rows_, dev, blocks[1]).clone()
                delta.sub_(load_matrix(a, stored_a, rows_, dev, blocks[0]))
                deltas.append(delta)
            stacked = torch.stack(deltas) if len(deltas) > 1 else deltas[0].unsqueeze(0)
            del deltas
            svals = torch.linalg.svdvals(stacked).cpu()
            del stacked
            for n, s in zip(group, svals, strict=True):
                m_, n_ = dict(jobs)[n]
                rows[n] = spectrum_figures(s, m_, n_, rtol, atol, top_k)
                spectra[n] = s.double().numpy()
                if bar is not None:
                    bar.update(work_of[n])
        # Nothing is reported from a file that changed while it was read.
        a.verify()
        b.verify()

    try:
        # An SVD cannot be interrupted: on Ctrl-C the worker finishes its current matrix on its
        # own and stops; the caller is not kept waiting for it.
        run_in_worker(work, on_interrupt=stop.set, wait_on_interrupt=False)
    finally:
        if bar is not None:
            bar.close()

    ordered = [n for n, _ in jobs]
    df = pl.DataFrame(
        {
            "name": ordered,
            "layer": [layer_of(n) for n in ordered],
            "module": [module_of(n) for n in ordered],
            "shape": [dict(jobs)[n] for n in ordered],
            **{
                k: [rows[n][k] for n in ordered]
                for k in (
                    "rank",
                    "max_rank",
                    "rank_fraction",
                    "sigma_max",
                    "tolerance",
                    "stable_rank",
                    "effective_rank",
                    "energy_top1",
                    "energy_topk",
                )
            },
        },
        schema={
            "name": pl.Utf8,
            "layer": pl.Int64,
            "module": pl.Utf8,
            "shape": pl.List(pl.Int64),
            "rank": pl.Int64,
            "max_rank": pl.Int64,
            "rank_fraction": pl.Float64,
            "sigma_max": pl.Float64,
            "tolerance": pl.Float64,
            "stable_rank": pl.Float64,
            "effective_rank": pl.Float64,
            "energy_top1": pl.Float64,
            "energy_topk": pl.Float64,
        },
    )
    return RankReport(
        os.fspath(base), os.fspath(tuned), str(dev), top_k, df, skipped, resized, spectra
    )
