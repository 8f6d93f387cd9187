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

import glob
import math
import os
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from rlmask._io import PathArg
from rlmask._names import NORMS, module_of, place
from rlmask._options import declared_block
from rlmask._plan import PairOptions, pairing
from rlmask._progress import bar_width, progress_wanted
from rlmask._rank import _NP_VIEW, load_matrix, resolve_device, spectrum_figures
from rlmask._remote import open_checkpoint
from rlmask._report import Report, printable_lines, sort_modules
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


def _numerical_rank(s: torch.Tensor, m: int, n: int) -> int:
    """The singular values above ``s1 * max(m, n) * eps(float64)`` (numpy's rule)."""
    import torch

    if not s.numel() or float(s[0]) == 0.0:
        return 0
    return int((s > s[0] * max(m, n) * torch.finfo(torch.float64).eps).sum())


def _largest_sum(values: torch.Tensor, count: int) -> float:
    """The sum of the ``count`` largest ``values`` (a selection, not a sort: ties at the edge
    add the same whichever is taken)."""
    import torch

    if count <= 0:
        return 0.0
    if count >= values.numel():
        return float(values.sum())
    edge = torch.kthvalue(values, values.numel() - count + 1).values
    above = values > edge
    return float(values[above].sum()) + (count - int(above.sum())) * float(edge)


def _smallest_first(values: torch.Tensor, count: int) -> torch.Tensor:
    """The positions of the ``count`` smallest ``values``, ties broken by position (the earlier
    first): the first ``count`` of a stable ascending sort, as a set, found by selection."""
    import torch

    if count >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    edge = torch.kthvalue(values, count).values
    below = (values < edge).nonzero().squeeze(1)
    ties = (values == edge).nonzero().squeeze(1)[: count - below.numel()]
    return torch.cat([below, ties])


def _share(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


Factors = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]

#: The randomised path (design §13): columns sampled past the rank asked for, and power
#: iterations (each re-orthonormalised), as Halko, Martinsson and Tropp (2011) recommend.
OVERSAMPLE = 10
POWER_ITERATIONS = 2


def sketch_of(
    shape: tuple[int, int], generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """The Gaussian test matrix of a matrix of ``shape`` on the randomised path: one per
    matrix, its columns enough for every decomposition :func:`top_svd` makes of D, W and W'
    (the largest rank used, plus ``OVERSAMPLE``; at most ``min(m, n)``)."""
    import torch

    m, n = shape
    width = min(max(_randomised_rank(min(m, n)), max(TOP_K)) + OVERSAMPLE, m, n)
    return torch.randn(n, width, generator=generator, dtype=torch.float64, device=device)


def top_svd(x: torch.Tensor, k: int, sketch: torch.Tensor) -> Factors:
    """The top ``k`` singular triplets of ``x`` (float64) by randomised range finding from the
    Gaussian ``sketch`` (:func:`sketch_of`): ``POWER_ITERATIONS`` power iterations with QR
    between them, then the exact SVD of the small projected matrix. W and W' are decomposed
    from the same sketch, so that the approximation's own error does not read as a rotation
    between them."""
    import torch

    q, _ = torch.linalg.qr(x @ sketch[:, : k + OVERSAMPLE])
    for _ in range(POWER_ITERATIONS):
        q, _ = torch.linalg.qr(x.T @ q)
        q, _ = torch.linalg.qr(x @ q)
    ub, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def _randomised_rank(min_dim: int) -> int:
    """The rank the randomised path decomposes W and W' to: the largest k a measure uses."""
    return _k_of(max(RATIOS), min_dim)


def base_factors(w: torch.Tensor, sketch: torch.Tensor | None = None) -> Factors:
    """The base's SVD (float64): exact and thin, or with a ``sketch`` (:func:`sketch_of`) its
    top ``floor(0.2 min_dim)`` triplets by :func:`top_svd`. Computed once per matrix, shared by
    every measure and by every checkpoint of a run."""
    import torch

    wd = w.double()
    if sketch is not None:
        return top_svd(wd, _randomised_rank(min(wd.shape)), sketch)
    u, s, vh = torch.linalg.svd(wd, full_matrices=False)
    return u, s, vh


def matrix_measures(
    w: torch.Tensor, w_tuned: torch.Tensor, factors: Factors | None = None
) -> dict[str, Any]:
    """Every measure of one matrix (see the module), from the base and tuned values (float32,
    on the device where the SVDs run) and the base's SVD (computed here when not given)."""
    return _measures(w, w_tuned, factors, top=False)[0]


def _measures(
    w: torch.Tensor,
    w_tuned: torch.Tensor,
    factors: Factors | None,
    *,
    top: bool,
    sketch: torch.Tensor | None = None,
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`matrix_measures`, and with ``top`` the update's top singular vectors (u1, v1)
    from the same decomposition of D (for the rank-1 alignment over a run). With a
    ``sketch``, the randomised path (design §13): D, W and W' decomposed to their top
    triplets by :func:`top_svd` (``factors`` must then be the base's, from the same sketch); the
    measures that need a whole spectrum (``effective_rank``, ``rank``, ``spectral_drift``) are
    null."""
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
    out["svd"] = "exact" if sketch is None else "randomized"
    pair = None
    if sketch is not None:
        u_d, s_d, vh_d = top_svd(dd, min(max(TOP_K), min_dim), sketch)
        pair = (u_d[:, 0], vh_d[0])
        s1 = float(s_d[0])
        out["spectral_norm"] = s1
        out["stable_rank"] = delta_sq / s1**2 if s1 > 0 else None
        out["effective_rank"] = None  # needs every singular value
        out["rank"] = None
    else:
        if top:
            u_d, s_d, vh_d = torch.linalg.svd(dd, full_matrices=False)
            pair = (u_d[:, 0], vh_d[0])
        else:
            s_d = torch.linalg.svdvals(dd)
        fig = spectrum_figures(s_d, m, n, None, None, 1)
        out["spectral_norm"] = float(s_d[0]) if s_d.numel() else 0.0
        out["stable_rank"] = fig["stable_rank"]
        out["effective_rank"] = fig["effective_rank"]
        out["rank"] = fig["rank"]
    energy = s_d.square()
    out["energy_top_k"] = {str(k): _share(float(energy[:k].sum()), delta_sq) for k in TOP_K}

    u, s, vh = factors if factors is not None else base_factors(w, sketch)
    if sketch is None:
        u_t, s_t, _ = torch.linalg.svd(wt, full_matrices=False)
        out["spectral_drift"] = _share(float((s_t - s).norm()), float(s.norm()))
    else:
        u_t, s_t, _ = top_svd(wt, _randomised_rank(min_dim), sketch)
        out["spectral_drift"] = None  # needs every singular value of W and W'
    keys = ("principal_energy", "principal_energy_uniform", "left_principal_energy")
    for key in (*keys, "right_principal_energy", "rotation"):
        out[key] = {}
    # Only directions the base (or the tuned matrix) actually has: beyond its numerical rank
    # the singular vectors are an arbitrary basis of the null space, so k stops at the rank.
    rank_w, rank_t = _numerical_rank(s, m, n), _numerical_rank(s_t, m, n)
    for r in RATIOS:
        k = min(_k_of(r, min_dim), rank_w)
        # What an update of random direction puts there, in expectation: (k / m) (k / n).
        out["principal_energy_uniform"][str(r)] = (k / m) * (k / n)
        if k == 0:  # a zero base has no principal directions
            for key in ("principal_energy", "left_principal_energy", "right_principal_energy"):
                out[key][str(r)] = None
            out["rotation"][str(r)] = None
            continue
        uk, vk = u[:, :k], vh[:k].T
        left = uk.T @ dd
        out["principal_energy"][str(r)] = _share(float((left @ vk).square().sum()), delta_sq)
        out["left_principal_energy"][str(r)] = _share(float(left.square().sum()), delta_sq)
        out["right_principal_energy"][str(r)] = _share(float((dd @ vk).square().sum()), delta_sq)
        kt = min(k, rank_t)
        if kt == 0:
            out["rotation"][str(r)] = None
            continue
        cos = torch.linalg.svdvals(uk[:, :kt].T @ u_t[:, :kt]).clamp(0.0, 1.0)
        out["rotation"][str(r)] = float((1.0 - cos.square()).clamp(min=0.0).sqrt().mean())

    numel = d.numel()
    sq = dd.square().reshape(-1)
    out["coord_energy_top"] = {
        str(p): _share(_largest_sum(sq, math.ceil(p * numel)), delta_sq) for p in COORDS
    }

    changed = (d != 0).reshape(-1)
    n_changed = int(changed.sum())
    size = math.ceil(ENRICH * numel)
    k = _k_of(ENRICH, min_dim)
    principal = ((u[:, :k] * s[:k]) @ vh[:k]).abs().reshape(-1)
    masks = {
        "principal": _smallest_first(-principal, size),  # the largest entries
        "low_magnitude": _smallest_first(wd.abs().reshape(-1), size),
    }
    out["enrichment"] = {}
    for name, idx in masks.items():
        inside = int(changed[idx].sum())
        density = size / numel
        out["enrichment"][f"{name}_{ENRICH}"] = (
            (inside / n_changed) / density if n_changed else None
        )
    return out, pair


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.3g}%"


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
    #: A run's checkpoints, in run order (empty for a pair): rows carry ``checkpoint``/``step``.
    checkpoints: list[str] = field(default_factory=list)

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
        keys = (["checkpoint", "step"] if self.checkpoints else []) + ([key] if key else [])
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
            elif stem in PLAIN or stem in ("enrichment", "rank1_alignment"):
                aggs.append(pl.col(c).mean().alias(c))
        out = df.group_by(keys, maintain_order=True).agg(aggs) if keys else df.select(aggs)
        return out

    def total_frame(self) -> pl.DataFrame:
        """The whole model, pooled (design §13); one row per checkpoint for a run."""
        return self._pool(None)

    def by_layer(self) -> pl.DataFrame:
        """Per transformer layer, pooled (and per checkpoint for a run)."""
        return self._pool("layer").sort([*self._run_keys, "layer"])

    def by_module(self) -> pl.DataFrame:
        """Per module type, pooled (and per checkpoint for a run)."""
        return sort_modules(self._pool("module"), then=self._run_keys)

    @property
    def _run_keys(self) -> list[str]:
        return ["step"] if self.checkpoints else []

    def by(self, level: Any) -> pl.DataFrame:
        """``total``, ``layer``, ``module`` or ``tensor`` (one row per matrix)."""
        if level in ("tensor", "matrix"):
            return self.tensors
        return super().by(level)

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """The figure of :func:`rlmask.plot.spectrum_figure` for a pair, or of
        :func:`rlmask.plot.spectrum_run_figure` over a run's checkpoints (needs matplotlib),
        written atomically to ``path`` when given."""
        from rlmask.plot import spectrum_figure, spectrum_run_figure

        draw = spectrum_run_figure if self.checkpoints else spectrum_figure
        return draw(self, path, dpi=dpi)

    def to_dict(self) -> dict[str, Any]:
        """``{"base", "tuned", "device", "matrices", "by_module", "by_layer", "skipped"}``
        (design §13)."""
        return {
            "base": self.base,
            "tuned": self.tuned,
            "device": self.device,
            "checkpoints": list(self.checkpoints),
            "matrices": self.rows,
            "by_module": self.by_module().to_dicts() if self.rows else [],
            "by_layer": self.by_layer().to_dicts() if self.rows else [],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
        }

    def summary(self) -> str:
        """The whole model's pooled measures, and what was left out."""
        lines = [f"base:  {self.base}", f"tuned: {self.tuned}"]
        per = len(self.rows) // max(1, len(self.checkpoints))
        over = f" in each of {len(self.checkpoints)} checkpoints" if self.checkpoints else ""
        lines.append(
            f"{per} update matrices measured{over} on {self.device}; "
            f"{len(self.skipped)} tensors left out (norms, vectors, ...)"
        )
        randomised = len({r["name"] for r in self.rows if r["svd"] == "randomized"})
        if randomised:
            lines.append(
                f"{randomised} of them on the randomised path (top directions only: no rank, "
                "effective rank or drift; its error in design §13)"
            )
        if self.rows and self.checkpoints:
            lines.append("per checkpoint (rank-1 share, energy in the base's top 10% directions,")
            lines.append("  rotation of that subspace, rank-1 alignment with the last checkpoint):")
            for t in self.total_frame().iter_rows(named=True):
                align = t.get("rank1_alignment")
                lines.append(
                    f"  step {t['step'] if t['step'] is not None else '-':>6}: "
                    f"{_pct(t.get('energy_top_k@1'))}, {_pct(t.get('principal_energy@0.1'))}, "
                    f"{_num(t['rotation@0.1'])}, {'-' if align is None else f'{align:.3f}'}"
                )
            return printable_lines(lines)
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
                f"rotation of the base's top-10% subspace (mean sine): {_num(t['rotation@0.1'])}",
                f"spectral drift ||S'-S||/||S||: {_num(t['spectral_drift'])}",
            ]
        return printable_lines(lines)


def spectrum(
    base: PathArg,
    tuned: PathArg | Sequence[PathArg],
    *,
    device: str = "auto",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    shared_rows: bool = False,
    randomized_above: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SpectrumReport:
    """The geometry of every update matrix ``W' - W`` (see the module for each measure).
    Needs torch.

    Tensors pair as in :func:`rlmask.diff` (wrapper segments removed, ``name_map`` applied,
    ``shared_rows`` compares a resized vocabulary on the rows both share). One matrix is read
    (zero-copy from the mapped files) and decomposed at a time: peak memory is about 8 bytes per
    element of the largest matrix, times four (D, W, W' in float64, and one SVD's factors).

    ``tuned`` may also be a run: several checkpoints, glob patterns or a run directory, as
    :func:`rlmask.trajectory` takes them. Each row then carries its ``checkpoint`` and
    ``step``, the base's SVD is computed once per matrix for the whole run, and
    ``rank1_alignment`` (``|u1(D_t) . u1(D_T)| |v1(D_t) . v1(D_T)|``) measures how stable the
    update's top direction is against the run's last checkpoint T.

    ``randomized_above``: matrices of more elements than this take the randomised path
    (design §13): D, W and W' decomposed to the top singular triplets the measures use (64 for
    D, ``floor(0.2 min_dim)`` for W and W') by randomised range finding (10 columns of
    oversampling, 2 power iterations), from a Gaussian sketch seeded by ``seed`` and the
    matrix's name; the measures that need a whole spectrum (``effective_rank``, ``rank``,
    ``spectral_drift``) are then null, and the row's ``svd`` says ``randomized``. None (the
    default): every matrix exactly.

    Example:
        >>> r = rlmask.spectrum("base/", "grpo/")
        >>> r.by_module()[["module", "principal_energy@0.01", "rotation@0.1"]]
        >>> rlmask.spectrum("base/", "runs/grpo/").total_frame()   # per checkpoint
    """
    try:
        import torch
    except ImportError:
        raise ImportError("rlmask.spectrum needs torch: pip install 'rlmask[torch]'") from None
    from rlmask._trajectory import discover, step_of

    if randomized_above is not None and (type(randomized_above) is not int or randomized_above < 0):
        raise ValueError(
            f"randomized_above is a number of elements (0 or more), not {randomized_above!r}"
        )
    if type(seed) is not int or not 0 <= seed < 2**32:
        raise ValueError(f"seed is a whole number from 0 to 2^32 - 1, not {seed!r}")
    dev = resolve_device(device)
    paths: list[str]
    if isinstance(tuned, (str, os.PathLike)):
        one = os.fspath(tuned)
        # A run directory or a glob pattern is a run; anything else one checkpoint (a file, a
        # checkpoint folder, a hub id).
        expand = os.path.isdir(one) or (glob.has_magic(one) and not os.path.exists(one))
        paths = discover([one]) if expand else [one]
        run = paths != [one]
    else:
        paths = discover(list(tuned))
        run = True
    a = open_checkpoint(base)
    cs = [open_checkpoint(p) for p in paths]
    options = PairOptions.build(
        include=include,
        exclude=exclude,
        name_map=name_map,
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
    )
    plans = [pairing(a, c, options) for c in cs]
    # What every checkpoint pairs: name -> (stored in base, stored in each checkpoint, rows).
    stored = [{p[0]: p for p in plan.pairs} for plan in plans]
    skipped: list[tuple[str, str]] = []
    for plan in plans[-1:]:
        skipped += [(n, "only in base") for n in plan.only_in_base]
        skipped += [(n, "only in tuned") for n in plan.only_in_tuned]
        skipped += list(plan.skipped)
    jobs = []
    for n, stored_a, stored_b, rows_, floating in plans[-1].pairs:
        ia, ib = a.tensor_info(stored_a), cs[-1].tensor_info(stored_b)
        if any(n not in st for st in stored):
            skipped.append((n, "missing from some checkpoint of the run"))
        elif len(ia.shape) != 2:
            skipped.append((n, f"{len(ia.shape)}-D"))
        elif module_of(n) in NORMS:
            skipped.append((n, "norm"))
        elif not floating or ia.dtype not in _NP_VIEW or ib.dtype not in _NP_VIEW:
            skipped.append((n, f"not floating ({ia.dtype})"))
        else:
            jobs.append((n, stored_a, [st[n][2] for st in stored], rows_ or ia.shape[0]))
    if not jobs:
        raise PairingError(
            f"no 2-D floating update matrix to measure between {base} and {tuned} "
            f"({len(plans[-1].pairs)} tensors paired)"
        )
    bar = None
    if progress_wanted(progress):
        from tqdm import tqdm

        bar = tqdm(
            total=len(jobs) * len(cs),
            desc=f"spectrum on {dev.type}",
            unit="matrix",
            file=sys.stderr,
            delay=0.5,
            ncols=bar_width(),
            leave=False,
        )
    labels = list(paths)
    # FP8 weights with block scales: dequantised with the block each config.json declares.
    base_block = declared_block(a)
    blocks = [declared_block(c) for c in cs]
    steps = [step_of(p) for p in paths]
    rows: list[dict[str, Any]] = []
    try:
        for n, stored_a, stored_bs, nrows in jobs:
            ia = a.tensor_info(stored_a)
            w = load_matrix(a, stored_a, nrows, dev, base_block)
            sketch = None
            if randomized_above is not None and w.numel() > randomized_above:
                generator = torch.Generator(device=dev)
                # 32 bits: the CPU generator (mt19937) keeps no more of a seed.
                generator.manual_seed(zlib.crc32(f"{seed}:{n}".encode()))
                sketch = sketch_of((w.shape[0], w.shape[1]), generator, dev)
            factors = base_factors(w, sketch)

            def tuned_of(k: int, names: list[str] = stored_bs, rows: int = nrows) -> torch.Tensor:
                return load_matrix(cs[k], names[k], rows, dev, blocks[k])

            component, layer, module, _ = place(n)
            # The last checkpoint first: its update's top direction is what the others align to.
            # Each D is decomposed once, its top singular vectors kept for the alignment.
            measured: dict[int, tuple[dict[str, Any], Any]] = {}
            for k in [len(cs) - 1, *range(len(cs) - 1)]:
                measured[k] = _measures(w, tuned_of(k), factors, top=run, sketch=sketch)
                if bar is not None:
                    bar.update(1)
            final = measured[len(cs) - 1]
            for k in range(len(cs)):
                figures, pair = measured[k]
                row: dict[str, Any] = {
                    **({"checkpoint": labels[k], "step": steps[k]} if run else {}),
                    "name": n,
                    "shape": [int(nrows), int(ia.shape[1])],
                    "component": component,
                    "layer": layer,
                    "module": module,
                    **figures,
                }
                if run:
                    zero = row["delta_fro"] == 0 or final[0]["delta_fro"] == 0
                    u1, v1 = pair
                    uf, vf = final[1]
                    row["rank1_alignment"] = (
                        None if zero else float((u1 @ uf).abs() * (v1 @ vf).abs())
                    )
                rows.append(row)
        a.verify()
        for c in cs:
            c.verify()
    finally:
        if bar is not None:
            bar.close()
    tuned_label = ", ".join(labels) if run else labels[0]
    return SpectrumReport(
        os.fspath(base), tuned_label, dev.type, rows, skipped, labels if run else []
    )
