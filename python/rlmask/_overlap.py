"""How consistent are subnetworks across seeds, data and algorithms? (paper §5, Table 4,
Appendix E; design §1).

For masks I1, I2 over the same tensors: ``o1 = |I1 ∩ I2| / |I1|`` (the share of I1 that I2
also updates), ``o2 = |I1 ∩ I2| / |I2|``, and their random baselines, the overlaps two
independent random masks of the same densities would have in expectation:
``o1_random = density(I2)``, ``o2_random = density(I1)`` (analytic, never sampled). Jaccard is
``|I1 ∩ I2| / |I1 ∪ I2|``. A ratio whose denominator is 0 is reported as null.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._mask import Mask, _check_compatible, load_mask
from rlmask._names import layer_of, module_of
from rlmask._report import Report, few, printable_lines, ratio, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask.errors import MaskError

MaskArg = Mask | PathArg
COUNTS = ["numel", "size_1", "size_2", "intersection", "union"]
RATIOS = ["o1", "o2", "jaccard", "o1_random", "o2_random"]


def _as_mask(m: MaskArg) -> Mask:
    return m if isinstance(m, Mask) else load_mask(m)


def _with_ratios(df: pl.DataFrame) -> pl.DataFrame:
    """Adds o1, o2, jaccard and the random baselines from the count columns; with an
    ``expected_matched`` column, the magnitude-matched baselines too."""
    df = df.with_columns(
        ratio("intersection", "size_1").alias("o1"),
        ratio("intersection", "size_2").alias("o2"),
        ratio("intersection", "union").alias("jaccard"),
        ratio("size_2", "numel").alias("o1_random"),
        ratio("size_1", "numel").alias("o2_random"),
    )
    if "expected_matched" in df.columns:
        df = df.with_columns(
            ratio("expected_matched", "size_1").alias("o1_matched"),
            ratio("expected_matched", "size_2").alias("o2_matched"),
        )
    return df


@dataclass(frozen=True, repr=False)
class OverlapReport(Report):
    """Overlap of two masks, for the whole model and per tensor, layer and module.

    Attributes:
        mask_1, mask_2: where the masks came from.
        tensors: one row per tensor: name, layer, module, numel, size_1 (|I1|), size_2 (|I2|),
            intersection, union, o1, o2, jaccard, o1_random, o2_random.
        excluded: tensors left out because ``common_only`` was asked for (present in one mask
            only, or with different shapes).
        base: the base checkpoint of the magnitude-matched baseline, when one was given;
            ``tensors`` then also has ``expected_matched`` (the expected intersection of
            independent masks with the same densities in every (tensor, binade) bin of the
            base's values), ``o1_matched`` and ``o2_matched`` (design §8).
    """

    mask_1: str
    mask_2: str
    tensors: pl.DataFrame
    excluded: list[str] = field(default_factory=list)
    base: str | None = None

    def _sum(self, by: str | None) -> pl.DataFrame:
        aggs = [pl.len().alias("tensors"), *(pl.col(c).sum() for c in COUNTS)]
        if "expected_matched" in self.tensors.columns:
            aggs.append(pl.col("expected_matched").sum())
        if by is None:
            df = self.tensors.select(aggs)
        else:
            df = self.tensors.filter(pl.col(by).is_not_null()).group_by(by).agg(aggs)
        return _with_ratios(df)

    @property
    def total(self) -> dict[str, Any]:
        """The whole-model figures: counts and ratios."""
        return self._sum(None).row(0, named=True)

    @property
    def o1(self) -> float | None:
        """Share of mask 1's elements that mask 2 also has."""
        return self.total["o1"]  # type: ignore[no-any-return]

    @property
    def o2(self) -> float | None:
        """Share of mask 2's elements that mask 1 also has."""
        return self.total["o2"]  # type: ignore[no-any-return]

    @property
    def jaccard(self) -> float | None:
        """``|I1 ∩ I2| / |I1 ∪ I2|``."""
        return self.total["jaccard"]  # type: ignore[no-any-return]

    def by_layer(self) -> pl.DataFrame:
        """Counts and ratios per transformer layer."""
        return self._sum("layer").sort("layer")

    def by_module(self) -> pl.DataFrame:
        """Counts and ratios per module type."""
        return sort_modules(self._sum("module"))

    def total_frame(self) -> pl.DataFrame:
        """The whole-model counts and ratios as a one-row DataFrame."""
        return self._sum(None)

    def to_dict(self) -> dict[str, Any]:
        """Totals, per-tensor rows and what was excluded, as plain Python values."""
        return {
            "mask_1": self.mask_1,
            "mask_2": self.mask_2,
            "base": self.base,
            **self.total,
            "tensors": self.tensors.to_dicts(),
            "excluded": list(self.excluded),
        }

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """Overlap per module type against the random baseline (needs matplotlib;
        :func:`rlmask.plot.overlap_figure`). Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure.
        """
        from rlmask.plot import overlap_figure

        return overlap_figure(self, path, dpi=dpi)

    def summary(self) -> str:
        """A short human-readable account."""
        t = self.total

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.2f}%"

        lines = [
            f"mask 1: {self.mask_1}",
            f"mask 2: {self.mask_2}",
            f"{t['tensors']} tensors, {t['numel']:,} elements; |I1| = {t['size_1']:,}, "
            f"|I2| = {t['size_2']:,}, |I1 ∩ I2| = {t['intersection']:,}, "
            f"|I1 ∪ I2| = {t['union']:,}",
            f"  o1 = {pct(t['o1'])}  (random baseline {pct(t['o1_random'])}"
            + (f", magnitude-matched {pct(t['o1_matched'])})" if self.base else ")"),
            f"  o2 = {pct(t['o2'])}  (random baseline {pct(t['o2_random'])}"
            + (f", magnitude-matched {pct(t['o2_matched'])})" if self.base else ")"),
            f"  jaccard = {pct(t['jaccard'])}",
        ]
        if self.excluded:
            lines.append(f"excluded (not common to both): {few(self.excluded)}")
        return printable_lines(lines)


def _counts_frame(mask: Mask, names: list[str], counts: list[tuple[int, int, int]]) -> pl.DataFrame:
    """One row per tensor: name, layer, module, numel, and from ``(|I1|, |I2|, |I1 ∩ I2|)``
    the sizes, intersection and union."""
    return pl.DataFrame(
        {
            "name": names,
            "layer": [layer_of(n) for n in names],
            "module": [module_of(n) for n in names],
            "numel": [mask.numel_of(n) for n in names],
            "size_1": [c[0] for c in counts],
            "size_2": [c[1] for c in counts],
            "intersection": [c[2] for c in counts],
            "union": [c[0] + c[1] - c[2] for c in counts],
        },
        schema={
            "name": pl.Utf8,
            "layer": pl.Int64,
            "module": pl.Utf8,
            **{c: pl.UInt64 for c in COUNTS},
        },
    )


def _pair_counts(a: Mask, b: Mask, names: list[str]) -> list[tuple[int, int, int]]:
    counts = _rlmask.mask_overlap(
        [a.packed(n) for n in names], [b.packed(n) for n in names], [a.numel_of(n) for n in names]
    )
    a.verify()
    b.verify()
    return counts


def overlap(
    a: MaskArg,
    b: MaskArg,
    *more: MaskArg,
    common_only: bool = False,
    base: PathArg | None = None,
    name_map: Mapping[str, str] | None = None,
) -> OverlapReport:
    """Overlap of two subnetwork masks (paper §5): ``o1``, ``o2``, Jaccard and the random
    baselines, for the whole model and per tensor, layer and module.

    Args:
        a, b: :class:`Mask` objects or paths of ``.rlmask`` files. More than two is a
            ``TypeError`` that points to :func:`overlap_matrix`, the N-way study.
        common_only: compare only the tensors both masks cover with the same shape, listing the
            rest in :attr:`OverlapReport.excluded`, instead of raising
            :class:`~rlmask.errors.MaskError`.
        base: the checkpoint both masks were taken against: adds the magnitude-matched
            baseline (``o1_matched``, ``o2_matched``), the overlap that independent masks with
            the same density in every (tensor, binade of the base value) bin would have,
            computed exactly (design §8). Its names pair as in :func:`rlmask.diff`
            (wrappers removed, ``name_map`` applied).

    Example:
        >>> r = rlmask.overlap("seed1.rlmask", "seed2.rlmask")
        >>> r.o1, r.total["o1_random"], r.by_module()
    """
    if more:
        raise TypeError(
            f"overlap compares two masks, not {2 + len(more)}: for three or more, "
            "rlmask.overlap_matrix([m1, m2, m3, ...]) gives every ordered pair and the o1 matrix"
        )
    ma, mb = _as_mask(a), _as_mask(b)
    names = _check_compatible([ma, mb], common_only=common_only)
    df = _counts_frame(ma, names, _pair_counts(ma, mb, names))
    if base is not None:
        df = df.with_columns(
            pl.Series("expected_matched", _expected_matched(ma, mb, names, base, name_map))
        )
    excluded = sorted((set(ma.names) | set(mb.names)) - set(names))
    where = None if base is None else os.fspath(base)
    return OverlapReport(ma.describe(), mb.describe(), _with_ratios(df), excluded, where)


def _expected_matched(
    a: Mask,
    b: Mask,
    names: list[str],
    base: PathArg,
    name_map: Mapping[str, str] | None,
) -> list[float]:
    """Per tensor, ``Σ_b |A_b| |B_b| / n_b`` over the binades ``b`` of the base's values."""
    ckpt = _rlmask.Checkpoint(resolve_checkpoint(base))
    pairs = list((name_map or {}).items())
    stored = {_rlmask.canonical_name(n, pairs): n for n in ckpt.names()}
    where = os.fspath(base)
    out = []
    for n in names:
        s = stored.get(n)
        if s is None:
            raise MaskError(
                f"{where}: the base has no tensor '{n}' that the masks cover (pass the "
                "checkpoint the masks were taken against, or name_map / --name-map)",
                where,
                n,
            )
        info = ckpt.tensor_info(s)
        shape, numel = info.shape, info.numel
        if numel != a.numel_of(n):
            raise MaskError(
                f"{where}: tensor '{n}' has shape {shape} in the base but "
                f"{list(a.shape(n))} in the masks",
                where,
                n,
            )
        sizes, (held_a, held_b) = ckpt.binade_counts(s, [a.packed(n), b.packed(n)])
        out.append(sum(x * y / m for m, x, y in zip(sizes, held_a, held_b, strict=True) if m))
    ckpt.verify()
    a.verify()
    b.verify()
    return out


@dataclass(frozen=True, repr=False)
class OverlapMatrix(Report):
    """Pairwise overlaps of N masks (paper Table 4): one row per ordered pair of different
    masks, for the whole model and per tensor, layer and module, plus N x N matrices.

    Attributes:
        labels: the short label of each mask (rows and columns of the matrices).
        masks: where each mask came from.
        tensors: one row per ordered pair (``a``, ``b``: labels) and tensor: name, layer,
            module, numel, size_1 (|Ia|), size_2 (|Ib|), intersection, union, o1
            (|Ia ∩ Ib| / |Ia|), o2, jaccard, o1_random (density of Ib), o2_random.
        excluded: tensors left out because ``common_only`` was asked for.
        base: the base checkpoint of the magnitude-matched baselines, when one was given
            (``tensors`` then has ``expected_matched``, ``o1_matched`` and ``o2_matched``).
    """

    labels: list[str]
    masks: list[str]
    tensors: pl.DataFrame
    excluded: list[str] = field(default_factory=list)
    base: str | None = None

    def _sum(self, by: str | None) -> pl.DataFrame:
        keys = ["a", "b"] + ([by] if by else [])
        frame = self.tensors if by is None else self.tensors.filter(pl.col(by).is_not_null())
        aggs = [pl.len().alias("tensors"), *(pl.col(c).sum() for c in COUNTS)]
        if "expected_matched" in frame.columns:
            aggs.append(pl.col("expected_matched").sum())
        order = {lab: i for i, lab in enumerate(self.labels)}
        df = _with_ratios(frame.group_by(keys, maintain_order=True).agg(aggs))
        df = df.with_columns(
            pl.col("a").replace_strict(order, return_dtype=pl.Int64).alias("_ia"),
            pl.col("b").replace_strict(order, return_dtype=pl.Int64).alias("_ib"),
        )
        return df.sort(["_ia", "_ib", *([by] if by else [])]).drop("_ia", "_ib")

    def total_frame(self) -> pl.DataFrame:
        """One row per ordered pair: counts, o1, o2, Jaccard and the random baselines."""
        return self._sum(None)

    def by_layer(self) -> pl.DataFrame:
        """:meth:`total_frame` per ordered pair and transformer layer."""
        return self._sum("layer")

    def by_module(self) -> pl.DataFrame:
        """:meth:`total_frame` per ordered pair and module type."""
        return self._sum("module")

    def by(self, level: Any) -> pl.DataFrame:
        """The ``level`` breakdown, one row per ordered pair (and group)."""
        if level == "tensor":
            return self.tensors
        return super().by(level)

    def matrices(self) -> dict[str, pl.DataFrame]:
        """``{"o1", "jaccard", "lift"}``: N x N DataFrames with a ``mask`` column and one column
        per mask. ``o1`` at row i, column j is ``|Ii ∩ Ij| / |Ii|`` (how much of row i column j
        covers); ``lift`` divides it by its random baseline, the density of column j. The
        diagonal is 1 (null for an empty mask)."""
        pairs = {(r["a"], r["b"]): r for r in self.total_frame().iter_rows(named=True)}
        numel = next(iter(pairs.values()))["numel"]
        size = {}
        for (a, b), r in pairs.items():
            size[a], size[b] = r["size_1"], r["size_2"]

        def cell(kind: str, i: str, j: str) -> float | None:
            if i == j:  # a mask against itself: o1 = Jaccard = 1, lift = 1 / density
                if not size[i]:
                    return None
                return numel / size[i] if kind == "lift" else 1.0
            r = pairs[(i, j)]
            if kind == "lift":
                return r["o1"] / r["o1_random"] if r["o1"] is not None and r["o1_random"] else None
            return r[kind]  # type: ignore[no-any-return]

        out = {}
        for kind in ("o1", "jaccard", "lift"):
            cols: dict[str, list[Any]] = {"mask": list(self.labels)}
            for j in self.labels:
                cols[j] = [cell(kind, i, j) for i in self.labels]
            schema = {"mask": pl.Utf8, **{lab: pl.Float64 for lab in self.labels}}
            out[kind] = pl.DataFrame(cols, schema=schema)
        return out

    @property
    def _baselines(self) -> list[Literal["random", "matched"]]:
        return ["random", "matched"] if self.base is not None else ["random"]

    def excess(
        self, baseline: Literal["random", "matched"] = "matched", *, seed: int = 0
    ) -> dict[str, Any]:
        """How far o1 exceeds its baseline across the masks' pairs (the seed-overlap excess):
        the mean of ``o1 - o1_<baseline>`` over the ordered pairs, and its 95% interval from
        resampling the masks (:func:`rlmask.stats.pair_bootstrap`; pairs that share a mask are
        not independent). The interval is None with two masks. ``matched`` needs ``base``.

        Returns:
            ``{"baseline", "mean", "ci95": [lo, hi] | None, "pairs", "interval"}``, in
            fractions (0.028 is 2.8 points).
        """
        from rlmask.stats import pair_bootstrap

        column = {"random": "o1_random", "matched": "o1_matched"}.get(baseline)
        if column is None:
            raise ValueError(f"unknown baseline '{baseline}' (random or matched)")
        if baseline == "matched" and self.base is None:
            raise ValueError(
                "the magnitude-matched baseline needs the base checkpoint: "
                "overlap_matrix(masks, base=...)"
            )
        rows = {(r["a"], r["b"]): r for r in self.total_frame().iter_rows(named=True)}

        def value(i: int, j: int) -> float:
            r = rows[(self.labels[i], self.labels[j])]
            if r["o1"] is None or r[column] is None:
                return float("nan")
            return float(r["o1"] - r[column])

        n = len(self.labels)
        mean, ci = pair_bootstrap(n, value, seed=seed)
        defined = sum(
            1 for i in range(n) for j in range(n) if i != j and not math.isnan(value(i, j))
        )
        if mean is None:
            interval = "none: no pair has an o1 (every mask is empty)"
        elif ci is None:
            interval = "none: two masks give one pair"
        else:
            interval = (
                "95% percentile bootstrap over masks (resampled with replacement, 10,000 "
                "draws, seed 0)"
            )
        return {
            "baseline": baseline,
            "mean": mean,
            "ci95": None if ci is None else list(ci),
            "pairs": defined,
            "interval": interval,
        }

    def to_dict(self) -> dict[str, Any]:
        """The masks, the three matrices (as row lists), one row per ordered pair, and the
        o1 excess over the random (and, with ``base``, the matched) baseline."""
        return {
            "masks": list(self.masks),
            "labels": list(self.labels),
            **{k: v.to_dicts() for k, v in self.matrices().items()},
            "pairs": self.total_frame().to_dicts(),
            "excluded": list(self.excluded),
            "base": self.base,
            "excess": {b: self.excess(b) for b in self._baselines},
        }

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """The o1 matrix as an annotated heatmap (needs matplotlib; paper Table 4;
        :func:`rlmask.plot.overlap_heatmap`). Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure.
        """
        from rlmask.plot import overlap_heatmap

        return overlap_heatmap(self, path, dpi=dpi)

    def summary(self) -> str:
        """The legend and the three matrices."""
        from rlmask._table import format_frame

        lines = ["masks:"]
        lines += [f"  {lab}: {m}" for lab, m in zip(self.labels, self.masks, strict=True)]
        titles = {
            "o1": "o1 (share of the row's mask also in the column's)",
            "jaccard": "Jaccard",
            "lift": "lift (o1 over its random baseline, density of the column's mask)",
        }
        for k, df in self.matrices().items():
            lines += ["", f"{titles[k]}:", format_frame(df, percent=(k != "lift"))]
        lines.append("")
        for b in self._baselines:
            e = self.excess(b)
            ci = e["ci95"]
            what = "uniform random" if b == "random" else "magnitude-matched"
            if e["mean"] is None:
                lines.append(f"o1 over the {what} baseline: no pair has one (empty masks)")
                continue
            interval = (
                f"95% interval {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}, masks resampled"
                if ci is not None
                else "no interval from two masks"
            )
            lines.append(
                f"o1 over the {what} baseline, mean of {e['pairs']} ordered pairs: "
                f"{100 * e['mean']:+.1f} points ({interval})"
            )
        return printable_lines(lines)


def overlap_matrix(
    masks: Sequence[MaskArg],
    *,
    labels: Sequence[str] | None = None,
    common_only: bool = False,
    base: PathArg | None = None,
    name_map: Mapping[str, str] | None = None,
) -> OverlapMatrix:
    """Pairwise overlaps of N masks (paper Table 4) as an :class:`OverlapMatrix`: one row per
    ordered pair (and tensor, layer or module), and N x N matrices of o1, Jaccard and lift.

    Args:
        masks: :class:`Mask` objects or ``.rlmask`` paths (at least two).
        labels: short names for the masks (default: where each came from).
        common_only: as in :func:`overlap`.
        base, name_map: as in :func:`overlap`: adds the magnitude-matched baselines of every
            pair, and :meth:`OverlapMatrix.excess` over them.

    Example:
        >>> m = rlmask.overlap_matrix(["grpo.rlmask", "dpo.rlmask", "ppo.rlmask"])
        >>> m.matrices()["o1"], m.total_frame()     # Table 4, and the long form
        >>> rlmask.overlap_matrix(seeds, base="base/").excess()   # mean and 95% interval
    """
    ms = [_as_mask(m) for m in masks]
    if len(ms) < 2:
        raise ValueError("overlap_matrix needs at least two masks")
    names = _check_compatible(ms, common_only=common_only)
    described = [m.describe() for m in ms]
    labels = list(labels) if labels is not None else described
    if len(set(labels)) != len(labels):
        labels = [f"{i + 1}: {lab}" for i, lab in enumerate(labels)]
    frames = []
    for i in range(len(ms)):
        for j in range(i + 1, len(ms)):
            df = _counts_frame(ms[i], names, _pair_counts(ms[i], ms[j], names))
            if base is not None:
                expected = _expected_matched(ms[i], ms[j], names, base, name_map)
                df = df.with_columns(pl.Series("expected_matched", expected))
            swapped = df.with_columns(size_1=pl.col("size_2"), size_2=pl.col("size_1"))
            for a, b, frame in ((i, j, df), (j, i, swapped)):
                pair = [pl.lit(labels[a]).alias("a"), pl.lit(labels[b]).alias("b")]
                frames.append(frame.select(*pair, pl.all()))
    excluded = sorted(set().union(*(set(m.names) for m in ms)) - set(names))
    where = None if base is None else os.fspath(base)
    return OverlapMatrix(labels, described, _with_ratios(pl.concat(frames)), excluded, where)
