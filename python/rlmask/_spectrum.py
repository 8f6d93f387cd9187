"""The geometry of an update (issue 29): how ``D = W' - W`` sits relative to the base ``W``,
per 2-D matrix, streamed one matrix at a time from the memory-mapped checkpoints, every SVD
computed once and shared by every measure that needs it (design §13).

Per matrix, with ``min_dim = min(m, n)``, ``W = U S V^T`` and ``W' = U' S' V'^T``:

- ``delta_fro``, ``base_fro``, ``relative_fro = ||D||_F / ||W||_F``;
- from the singular values of ``D``: ``spectral_norm`` (s1), ``stable_rank`` (``||D||_F^2 /
  s1^2``), ``effective_rank`` (entropy), ``rank`` (as ``rlmask rank``), ``energy_top_k`` for k in
  1, 2, 4, 8, 16, 32, 64 (k = 1: the rank-1 share);
- for r in 0.01, 0.05, 0.1, 0.2, with ``k = max(1, floor(r * min_dim))`` and the base's top-k
  singular vectors ``U_k``, ``V_k``: ``principal_energy`` (``||U_k^T D V_k||_F^2 / ||D||_F^2``),
  ``left_principal_energy``, ``right_principal_energy`` and ``rotation`` (the mean sine of the
  principal angles between ``U_k`` and ``U'_k``), and ``principal_energy_uniform`` (``(k / m)
  (k / n)``: what an update of random direction puts in that subspace, in expectation);
- ``spectral_drift = ||S' - S||_2 / ||S||_2``;
- ``coord_energy_top`` for p in 0.001, 0.01, 0.05: the share of ``||D||_F^2`` in the
  ``ceil(p * numel)`` largest ``|D|`` entries;
- ``enrichment`` (r = 0.1): among the changed entries (``D != 0``), the share inside the
  principal mask (the ``ceil(r * numel)`` largest entries of ``|U_k S_k V_k^T|``) or the
  low-magnitude mask (the ``ceil(r * numel)`` smallest ``|W|``), over that mask's density;
  ties are broken by position (the earlier entry first).

Ratios whose denominator is zero (a zero update, a zero base) are None. ``D`` is computed in
float32 from the stored values; the SVDs and sums run in float64.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._names import NORMS, module_of, place
from rlmask._plan import pairing
from rlmask._progress import bar_width, progress_wanted
from rlmask._rank import _NP_VIEW, _to_torch, resolve_device, spectrum_figures
from rlmask._report import Report, printable_lines, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask.errors import PairingError

if TYPE_CHECKING:
    import torch

TOP_K = (1, 2, 4, 8, 16, 32, 64)
RATIOS = (0.01, 0.05, 0.1, 0.2)
COORDS = (0.001, 0.01, 0.05)
ENRICH = 0.1
# Measures keyed by a number: the column of each is ``NAME@NUMBER``.
KEYED = {
    "energy_top_k": TOP_K,
    "principal_energy": RATIOS,
    "principal_energy_uniform": RATIOS,
    "left_principal_energy": RATIOS,
    "right_principal_energy": RATIOS,
    "rotation": RATIOS,
    "coord_energy_top": COORDS,
}
# How the breakdowns pool each measure over matrices (design §13): energy shares weighted by
# each matrix's ||D||_F^2 (the pooled share of the update's energy); the rest as plain means.
ENERGY_WEIGHTED = (
    "energy_top_k",
    "principal_energy",
    "principal_energy_uniform",
    "left_principal_energy",
    "right_principal_energy",
    "coord_energy_top",
)
PLAIN = ("stable_rank", "effective_rank", "spectral_drift", "rotation")


def _k_of(r: float, min_dim: int) -> int:
    return max(1, math.floor(r * min_dim))


def _share(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def matrix_measures(w: torch.Tensor, w_tuned: torch.Tensor) -> dict[str, Any]:
    """Every measure of one matrix (see the module), from the base and tuned values (float32,
    on the device where the SVDs run)."""
    import torch

    d = w_tuned - w  # float32, from the stored values
    m, n = d.shape
    min_dim = min(m, n)
    dd, wd, wt = d.double(), w.double(), w_tuned.double()
    delta_sq = float(dd.square().sum())
    base_sq = float(wd.square().sum())
    out: dict[str, Any] = {
        "delta_fro": math.sqrt(delta_sq),
        "base_fro": math.sqrt(base_sq),
        "relative_fro": _share(math.sqrt(delta_sq), math.sqrt(base_sq)),
    }
    s_d = torch.linalg.svdvals(dd)
    fig = spectrum_figures(s_d, m, n, None, None, 1)
    out["spectral_norm"] = float(s_d[0]) if s_d.numel() else 0.0
    out["stable_rank"] = fig["stable_rank"]
    out["effective_rank"] = fig["effective_rank"]
    out["rank"] = fig["rank"]
    energy = s_d.square()
    out["energy_top_k"] = {str(k): _share(float(energy[:k].sum()), delta_sq) for k in TOP_K}

    u, s, vh = torch.linalg.svd(wd, full_matrices=False)
    u_t, s_t, _ = torch.linalg.svd(wt, full_matrices=False)
    out["spectral_drift"] = _share(float((s_t - s).norm()), float(s.norm()))
    keys = ("principal_energy", "principal_energy_uniform", "left_principal_energy")
    for key in (*keys, "right_principal_energy", "rotation"):
        out[key] = {}
    for r in RATIOS:
        k = _k_of(r, min_dim)
        uk, vk = u[:, :k], vh[:k].T
        # What an update of random direction puts there, in expectation: (k / m) (k / n).
        out["principal_energy_uniform"][str(r)] = (k / m) * (k / n)
        left = uk.T @ dd
        out["principal_energy"][str(r)] = _share(float((left @ vk).square().sum()), delta_sq)
        out["left_principal_energy"][str(r)] = _share(float(left.square().sum()), delta_sq)
        out["right_principal_energy"][str(r)] = _share(float((dd @ vk).square().sum()), delta_sq)
        cos = torch.linalg.svdvals(uk.T @ u_t[:, :k]).clamp(0.0, 1.0)
        out["rotation"][str(r)] = float((1.0 - cos.square()).clamp(min=0.0).sqrt().mean())

    numel = d.numel()
    sq = dd.square().reshape(-1)
    top = torch.sort(sq, descending=True).values
    out["coord_energy_top"] = {
        str(p): _share(float(top[: math.ceil(p * numel)].sum()), delta_sq) for p in COORDS
    }

    changed = (d != 0).reshape(-1)
    n_changed = int(changed.sum())
    size = math.ceil(ENRICH * numel)
    k = _k_of(ENRICH, min_dim)
    principal = ((u[:, :k] * s[:k]) @ vh[:k]).abs().reshape(-1)
    masks = {
        # Largest first; ties by position (a stable sort keeps the earlier entry first).
        "principal": torch.sort(-principal, stable=True).indices[:size],
        "low_magnitude": torch.sort(wd.abs().reshape(-1), stable=True).indices[:size],
    }
    out["enrichment"] = {}
    for name, idx in masks.items():
        inside = int(changed[idx].sum())
        density = size / numel
        out["enrichment"][f"{name}_{ENRICH}"] = (
            (inside / n_changed) / density if n_changed else None
        )
    return out


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """One matrix's measures as flat columns: ``energy_top_k@1``, ``enrichment@principal_0.1``."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                flat[f"{key}@{sub}"] = v
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True, repr=False)
class SpectrumReport(Report):
    """The geometry of every update matrix of a pair (see :func:`spectrum`).

    Attributes:
        base, tuned: the checkpoint arguments as given.
        device: where the SVDs ran.
        rows: one record per matrix (name, shape, component, layer, module and the measures,
            keyed measures as maps from the number, as a string, to the value).
        skipped: ``(name, reason)`` of every tensor not measured (norms, vectors, FP8,
            one-sided, mismatched).
    """

    base: str
    tuned: str
    device: str
    rows: list[dict[str, Any]] = field(repr=False)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tensors(self) -> pl.DataFrame:  # type: ignore[override]
        """One row per matrix, keyed measures flattened (``principal_energy@0.1``)."""
        return pl.DataFrame([_flatten(r) for r in self.rows], infer_schema_length=None)

    @property
    def matrices(self) -> pl.DataFrame:
        """The same as :attr:`tensors`."""
        return self.tensors

    def _pool(self, key: str | None) -> pl.DataFrame:
        df = self.tensors
        if df.is_empty():
            return df
        keys = [key] if key else []
        if key:
            df = df.filter(pl.col(key).is_not_null())
        w = pl.col("delta_fro").pow(2)
        aggs: list[pl.Expr] = [
            pl.len().alias("matrices"),
            (pl.col("delta_fro").pow(2).sum() / pl.col("base_fro").pow(2).sum())
            .sqrt()
            .alias("relative_fro"),
        ]
        for c in df.columns:
            stem = c.split("@")[0]
            if stem in ENERGY_WEIGHTED:
                aggs.append(
                    ((pl.col(c) * w).sum() / w.filter(pl.col(c).is_not_null()).sum()).alias(c)
                )
            elif stem in PLAIN or stem == "enrichment":
                aggs.append(pl.col(c).mean().alias(c))
        out = df.group_by(keys).agg(aggs) if keys else df.select(aggs)
        return out

    def total_frame(self) -> pl.DataFrame:
        """The whole model, pooled (design §13)."""
        return self._pool(None)

    def by_layer(self) -> pl.DataFrame:
        """Per transformer layer, pooled."""
        return self._pool("layer").sort("layer")

    def by_module(self) -> pl.DataFrame:
        """Per module type, pooled."""
        return sort_modules(self._pool("module"))

    def by(self, level: Any) -> pl.DataFrame:
        """``total``, ``layer``, ``module`` or ``tensor`` (one row per matrix)."""
        if level in ("tensor", "matrix"):
            return self.tensors
        return super().by(level)

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """The figure of :func:`rlmask.plot.spectrum_figure` (needs matplotlib), written
        atomically to ``path`` when given."""
        from rlmask.plot import spectrum_figure

        return spectrum_figure(self, path, dpi=dpi)

    def to_dict(self) -> dict[str, Any]:
        """``{"base", "tuned", "device", "matrices", "by_module", "by_layer", "skipped"}``
        (design §13)."""
        return {
            "base": self.base,
            "tuned": self.tuned,
            "device": self.device,
            "matrices": self.rows,
            "by_module": self.by_module().to_dicts() if self.rows else [],
            "by_layer": self.by_layer().to_dicts() if self.rows else [],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }

    def summary(self) -> str:
        """The whole model's pooled measures, and what was left out."""
        lines = [f"base:  {self.base}", f"tuned: {self.tuned}"]
        lines.append(
            f"{len(self.rows)} update matrices measured on {self.device}; "
            f"{len(self.skipped)} tensors left out (norms, vectors, ...)"
        )
        if self.rows:
            t = self.total_frame().row(0, named=True)

            def pct(key: str) -> str:
                v = t.get(key)
                return "-" if v is None else f"{100 * v:.3g}%"

            lines += [
                f"relative update ||D||/||W||: {t['relative_fro']:.3g}",
                f"rank-1 share of the update's energy: {pct('energy_top_k@1')}",
                f"energy in the base's top 1% / 10% principal directions: "
                f"{pct('principal_energy@0.01')} / {pct('principal_energy@0.1')} "
                f"(an update of random direction: {pct('principal_energy_uniform@0.01')} / "
                f"{pct('principal_energy_uniform@0.1')})",
                f"rotation of the base's top-10% subspace (mean sine): {t['rotation@0.1']:.3g}",
                f"spectral drift ||S'-S||/||S||: {t['spectral_drift']:.3g}",
            ]
        return printable_lines(lines)


def spectrum(
    base: PathArg,
    tuned: PathArg,
    *,
    device: str = "auto",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    shared_rows: bool = False,
    progress: bool = True,
) -> SpectrumReport:
    """The geometry of every update matrix ``W' - W`` (see the module for each measure).
    Needs torch.

    Tensors pair as in :func:`rlmask.diff` (wrapper segments removed, ``name_map`` applied,
    ``shared_rows`` compares a resized vocabulary on the rows both share). One matrix is read
    (zero-copy from the mapped files) and decomposed at a time: peak memory is about 8 bytes per
    element of the largest matrix, times four (D, W, W' in float64, and one SVD's factors).

    Example:
        >>> r = rlmask.spectrum("base/", "grpo/")
        >>> r.by_module()[["module", "principal_energy@0.01", "rotation@0.1"]]
    """
    try:
        import torch
    except ImportError:
        raise ImportError("rlmask.spectrum needs torch: pip install 'rlmask[torch]'") from None
    dev = resolve_device(device)
    a = _rlmask.Checkpoint(resolve_checkpoint(base))
    b = _rlmask.Checkpoint(resolve_checkpoint(tuned))
    plan = pairing(
        a,
        b,
        include=include,
        exclude=exclude,
        name_map=name_map,
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
    )
    skipped: list[tuple[str, str]] = [
        *((n, "only in base") for n in plan.only_in_base),
        *((n, "only in tuned") for n in plan.only_in_tuned),
        *plan.skipped,
    ]
    jobs = []
    for n, stored_a, stored_b, rows_, floating in plan.pairs:
        ia, ib = a.tensor_info(stored_a), b.tensor_info(stored_b)
        if len(ia.shape) != 2:
            skipped.append((n, f"{len(ia.shape)}-D"))
        elif module_of(n) in NORMS:
            skipped.append((n, "norm"))
        elif ia.dtype.startswith("F8") or ib.dtype.startswith("F8"):
            skipped.append((n, "FP8 (its spectrum needs the dequantised values: not yet)"))
        elif not floating or ia.dtype not in _NP_VIEW or ib.dtype not in _NP_VIEW:
            skipped.append((n, f"not floating ({ia.dtype})"))
        else:
            jobs.append((n, stored_a, stored_b, rows_ or ia.shape[0]))
    if not jobs:
        raise PairingError(
            f"no 2-D floating update matrix to measure between {base} and {tuned} "
            f"({len(plan.pairs)} tensors paired)"
        )
    bar = None
    if progress_wanted(progress):
        from tqdm import tqdm

        bar = tqdm(
            total=len(jobs),
            desc=f"spectrum on {dev.type}",
            unit="matrix",
            file=sys.stderr,
            delay=0.5,
            ncols=bar_width(),
            leave=False,
        )
    rows = []
    try:
        for n, stored_a, stored_b, nrows in jobs:
            ia, ib = a.tensor_info(stored_a), b.tensor_info(stored_b)
            w = _to_torch(a.raw(stored_a), ia.dtype, ia.shape)[:nrows].to(dev, torch.float32)
            wt = _to_torch(b.raw(stored_b), ib.dtype, ib.shape)[:nrows].to(dev, torch.float32)
            component, layer, module, _ = place(n)
            rows.append(
                {
                    "name": n,
                    "shape": [int(nrows), int(ia.shape[1])],
                    "component": component,
                    "layer": layer,
                    "module": module,
                    **matrix_measures(w, wt),
                }
            )
            if bar is not None:
                bar.update(1)
        a.verify()
        b.verify()
    finally:
        if bar is not None:
            bar.close()
    return SpectrumReport(os.fspath(base), os.fspath(tuned), dev.type, rows, skipped)
