"""Update sparsity between two checkpoints (paper §2.2, Table 6, Figure 3; design §1 and §4)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, cast

from rlmask import _rlmask
from rlmask._io import PathArg, check_not_input, check_output, read_side_file
from rlmask._lazy import LazyModule
from rlmask._names import (
    COMPONENTS,
    natural_key,
    place,
)
from rlmask._options import (
    Criterion,
    parse_criterion,
    threshold_label,
)
from rlmask._plan import PairOptions
from rlmask._progress import progress_wanted, run_with_progress
from rlmask._remote import open_checkpoint
from rlmask._report import LazyRecords, Report, few, printable_lines, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask._rlmask import __version__
from rlmask._sample import Z95, Sample, estimates, sparsity_interval
from rlmask.errors import RlmaskError

if TYPE_CHECKING:
    import polars as pl

    from rlmask._mask import Mask
    from rlmask._null import Displacement, NullModel
else:
    pl = LazyModule("polars")

#: The tolerance sweep of the paper's Table 6.
DEFAULT_SWEEP: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5)
#: The paper's default tolerance (§2.2).
DEFAULT_TOL: float = _rlmask.DEFAULT_TOL


def _sparsity(changed: int, numel: int) -> float:
    """``1 - changed / numel``; an empty set has nothing changed, so its sparsity is 1."""
    return 1.0 - changed / numel if numel else 1.0


def _predicted_expr(numel: str = "numel") -> pl.Expr:
    """The sparsity the precision null predicts, over the modelled elements ``numel``
    (null where none was modelled)."""
    return (
        pl.when(pl.col(numel) > 0)
        .then(1.0 - pl.col("predicted_changed") / pl.col(numel).cast(pl.Float64))
        .otherwise(None)
        .alias("predicted_sparsity")
    )


def _sparsity_expr(changed: str) -> pl.Expr:
    """:func:`_sparsity` as a polars expression over a ``changed`` column and ``numel``."""
    return (
        pl.when(pl.col("numel") > 0)
        .then(1.0 - pl.col(changed).cast(pl.Float64) / pl.col("numel").cast(pl.Float64))
        .otherwise(1.0)
    )


def _columns(kind: str, criterion: str, tolerances: Sequence[float]) -> list[str]:
    """Names of the per-threshold ``kind`` columns (``changed`` or ``sparsity``)."""
    if len(tolerances) == 1:
        return [kind]
    return [f"{kind}@{threshold_label(criterion, t)}" for t in tolerances]


@dataclass(frozen=True, repr=False)
class DiffReport(Report):
    """The comparison of two checkpoints.

    Attributes:
        base, tuned: the checkpoint arguments as given.
        criterion: ``absolute``, ``exact`` or ``relative``.
        tolerances: every threshold computed (ascending); one entry for exact (0) and
            relative (eta).
        tol: the primary threshold, reported in the unsuffixed ``changed``/``sparsity`` columns.
        tensors: one row per compared tensor: name, component, layer, module, expert, dtype,
            tuned_dtype, shape, numel, floating, changed, sparsity, and
            ``changed@T``/``sparsity@T`` for every threshold T when there is more than one.
        only_in_base, only_in_tuned: names present on one side only.
        tied: names absent because the checkpoint ties them to the embeddings.
        skipped: ``(name, reason)`` of tensors skipped for mismatched shape or dtype.
        dequantised: ``(name, base layout, tuned layout)`` of every FP8 or MXFP4 weight compared
            by its dequantised values (layouts: ``block 128x128``, ``per-row``, ``per-tensor``;
            MXFP4 ``block 1x32``; None for a side stored unscaled, e.g. a BF16 export against
            its FP8 release).
        scales: the scale tensors of those weights: compared (their ``changed`` counts changed
            scales) but not counted as weights (``floating`` is False).
        resized: with ``shared_rows=True``, ``(name, base rows, tuned rows)`` of every tensor
            whose row count differs (a resized vocabulary): it is compared on the leading rows
            both share (its ``shape`` and ``numel`` are theirs); the extra rows are listed
            here, not compared.
        magnitude: with ``magnitude=True``, one row per tensor and binade of the base value:
            name, exponent, numel and the changed counts (see :meth:`by_magnitude`).
        renamed: per side (``base``, ``tuned``), ``(stored name, paired name)`` of every name
            that wrapper stripping (DDP ``module.``, FSDP, activation checkpointing,
            ``torch.compile``) or ``name_map`` rewrote before pairing.
        mask: the subnetwork (changed elements at :attr:`tol`) of every compared floating
            tensor, when asked for with ``mask=True``; else None.
    """

    base: str
    tuned: str
    criterion: Criterion
    tolerances: tuple[float, ...]
    tol: float
    #: The per-tensor records behind :attr:`tensors`, as plain columns (name, dtype,
    #: tuned_dtype, shape, numel, floating, and ``changed``: one count per threshold), so
    #: that totals and JSON need no data frame library.
    columns: dict[str, list[Any]] = field(repr=False)
    only_in_base: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resized: list[tuple[str, int, int]] = field(default_factory=list)
    dequantised: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    scales: list[str] = field(default_factory=list)
    mask: Mask | None = field(default=None, repr=False)
    renamed: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    magnitude: pl.DataFrame | None = field(default=None, repr=False)
    as_dtype: str | None = None
    #: Remarks about the inputs found while reading them (one shard of a sharded model).
    notes: list[str] = field(default_factory=list)
    #: The precision null (``null=True``): what rounding alone predicts (design §9).
    null: NullModel | None = field(default=None, repr=False)
    #: The distribution of ``|update|`` (``displacement=True``, or with a master).
    displacement: Displacement | None = field(default=None, repr=False)
    #: A sampled diff (``sample=``): what was read (``fraction``, ``seed``, ``block``,
    #: ``elements``, ``bytes_read``). Every ``changed`` count is then an estimate (rounded
    #: to whole elements) and ``columns["changed_var"]`` holds its variance (design §14).
    sample: dict[str, Any] | None = None

    # ----- labels of the per-threshold columns -------------------------------------------

    def label(self, t: float) -> str:
        """How a threshold is written in column names: ``1e-05``, ``exact`` or ``eta=0.01``."""
        return threshold_label(self.criterion, t)

    def _columns(self, kind: str) -> list[str]:
        return _columns(kind, self.criterion, self.tolerances)

    def column(self, kind: Literal["changed", "sparsity", "sparsity_low", "sparsity_high"]) -> str:
        """The name of the breakdowns' ``kind`` column at the primary threshold :attr:`tol`
        (``sparsity``, or ``sparsity@1e-05`` in a sweep; the interval's bounds for a sampled
        diff)."""
        return self._columns(kind)[self.tolerances.index(self.tol)]

    @cached_property
    def _places(self) -> list[tuple[str, int | None, str, int | None]]:
        """Every tensor's (component, layer, module type, expert), worked out once."""
        return [place(n) for n in self.columns["name"]]

    @cached_property  # read-only where Report only declares it: built from `columns`
    def tensors(self) -> pl.DataFrame:  # type: ignore[override]
        """One row per compared tensor (see the class's attributes), built on first use."""
        c = self.columns
        places = self._places
        df = pl.DataFrame(
            {
                "name": c["name"],
                "component": [p[0] for p in places],
                "layer": [p[1] for p in places],
                "module": [p[2] for p in places],
                "expert": [p[3] for p in places],
                "dtype": c["dtype"],
                "tuned_dtype": c["tuned_dtype"],
                "shape": shape_column(c["shape"]),
                "numel": c["numel"],
                "floating": c["floating"],
                "changed": [counts[self._primary] for counts in c["changed"]],
            },
            schema={
                "name": pl.Utf8,
                "component": pl.Utf8,
                "layer": pl.Int64,
                "module": pl.Utf8,
                "expert": pl.Int64,
                "dtype": pl.Utf8,
                "tuned_dtype": pl.Utf8,
                "shape": pl.List(pl.Int64),
                "numel": pl.UInt64,
                "floating": pl.Boolean,
                "changed": pl.UInt64,
            },
        )
        df = df.with_columns(_sparsity_expr("changed").alias("sparsity"))
        if self.sample is not None:
            var = c["changed_var"]
            df = df.with_columns(
                pl.Series(name, [v[j] for v in var], dtype=pl.Float64)
                for j, name in enumerate(self._columns("changed_var"))
            )
        if self.null is not None:
            predicted = self.null.predicted
            df = df.with_columns(
                pl.Series(
                    "predicted_changed", [predicted.get(n) for n in c["name"]], dtype=pl.Float64
                )
            ).with_columns(_predicted_expr())
        if len(self.tolerances) > 1:
            changed_cols = self._columns("changed")
            df = df.with_columns(
                pl.Series(name, [counts[j] for counts in c["changed"]], dtype=pl.UInt64)
                for j, name in enumerate(changed_cols)
            )
            df = df.with_columns(
                _sparsity_expr(ch).alias(sp)
                for ch, sp in zip(changed_cols, self._columns("sparsity"), strict=True)
            )
        return df

    # ----- totals ------------------------------------------------------------------------

    @property
    def _primary(self) -> int:
        return self.tolerances.index(self.tol)

    @property
    def _floating(self) -> pl.DataFrame:
        return self.tensors.filter(pl.col("floating"))

    @cached_property
    def numel(self) -> int:
        """Elements compared over the floating tensors."""
        c = self.columns
        return sum(n for n, f in zip(c["numel"], c["floating"], strict=True) if f)

    @cached_property
    def _changed_totals(self) -> tuple[int, ...]:
        c = self.columns
        counts = [k for k, f in zip(c["changed"], c["floating"], strict=True) if f]
        return tuple(sum(k[j] for k in counts) for j in range(len(self.tolerances)))

    @property
    def changed(self) -> int:
        """Changed floating elements at the primary threshold."""
        return self.changed_per_threshold()[self._primary]

    @property
    def sparsity(self) -> float:
        """Update sparsity at the primary threshold: ``1 - changed / numel`` (paper §2.2)."""
        return _sparsity(self.changed, self.numel)

    @property
    def density(self) -> float:
        """``1 - sparsity``: the share of elements in the updated subnetwork."""
        return 1.0 - self.sparsity

    def changed_per_threshold(self) -> list[int]:
        """Changed floating elements, one count per entry of :attr:`tolerances`."""
        return list(self._changed_totals)

    def sparsity_per_threshold(self) -> list[float]:
        """Update sparsity, one value per entry of :attr:`tolerances`."""
        n = self.numel
        return [_sparsity(c, n) for c in self.changed_per_threshold()]

    def ci95_per_threshold(self) -> list[tuple[float, float]] | None:
        """For a sampled diff, the 95% interval of the sparsity at each threshold (design
        §14); None for a diff that read every element (its figures are exact)."""
        if self.sample is None:
            return None
        c = self.columns
        var = [v for v, f in zip(c["changed_var"], c["floating"], strict=True) if f]
        return [
            sparsity_interval(changed, sum(v[j] for v in var), self.numel)
            for j, changed in enumerate(self.changed_per_threshold())
        ]

    @property
    def sweep(self) -> pl.DataFrame:
        """One row per threshold: tolerance, changed, sparsity (as the paper's Table 6)."""
        return pl.DataFrame(
            {
                "tolerance": list(self.tolerances),
                "changed": self.changed_per_threshold(),
                "sparsity": self.sparsity_per_threshold(),
            },
            schema={"tolerance": pl.Float64, "changed": pl.UInt64, "sparsity": pl.Float64},
        )

    @property
    def dtype_mismatches(self) -> list[str]:
        """Tensors stored with different floating dtypes, compared after widening."""
        c = self.columns
        return [
            n for n, a, b in zip(c["name"], c["dtype"], c["tuned_dtype"], strict=True) if a != b
        ]

    @property
    def warnings(self) -> list[str]:
        """Remarks on a result that is exact but implausible as the comparison the user meant:
        nothing changed, nearly everything changed, full-precision weights, one shard of a
        sharded model. Each is one line, in the table output and in the JSON ``warnings``."""
        out = list(self.notes)
        if not self.numel:
            return out
        c = self.columns
        label = self.label(self.tol)
        if self.changed == 0 and self.sample is not None:
            out.append(
                "no element of the sample changed: read every element (drop --sample) to know "
                "whether TUNED differs from BASE at all"
            )
        elif self.changed == 0:
            same = "bit-identical to" if self.criterion == "exact" else f"within {label} of"
            out.append(
                f"no element changed: TUNED is {same} BASE (the same checkpoint twice, or a "
                "run whose updates were all zero?)"
            )
        wide = {"F32", "F64"}
        floating = [
            (n, a, b)
            for n, a, b, f in zip(
                c["numel"], c["dtype"], c["tuned_dtype"], c["floating"], strict=True
            )
            if f
        ]
        mixed = sum(n for n, a, b in floating if (a in wide) != (b in wide))
        full = sum(n for n, a, b in floating if a in wide and b in wide)
        if self.as_dtype is None and (mixed or 2 * full > self.numel):
            what = (
                f"{100 * mixed / self.numel:.1f}% of the elements are full precision (F32) on "
                "one side and 16-bit on the other"
                if mixed
                else "the checkpoints are stored in full precision (F32)"
            )
            out.append(
                f"{what}: full-precision weights move almost everywhere, so this sparsity is "
                "not the paper's figure, which is about BF16 checkpoints; --as-dtype bf16 "
                "(as_dtype='bf16') compares what an engine loading BF16 would see"
            )
        elif self.sparsity < 0.01 and self.changed:
            out.append(
                f"{100 * self.density:.2f}% of the elements changed: expected of unrelated "
                "models of the same shapes (another initialisation), unusual for a finetune of "
                "BASE (the paper's RL runs change 5-30%); check that TUNED was trained from BASE"
            )
        return out

    # ----- breakdowns --------------------------------------------------------------------

    def _group(self, key: str | list[str], frame: pl.DataFrame) -> pl.DataFrame:
        aggs: list[pl.Expr] = [pl.len().alias("tensors"), pl.col("numel").sum()]
        changed_cols = self._columns("changed")
        aggs += [pl.col(c).sum() for c in changed_cols]
        aggs.append(pl.col("sparsity").mean().alias("sparsity_unweighted_mean"))
        null = "predicted_changed" in frame.columns
        if null:
            aggs += [
                pl.col("predicted_changed").sum(),
                pl.col("numel").filter(pl.col("predicted_changed").is_not_null()).sum().alias("m"),
            ]
        sampled = self.sample is not None
        var_cols = self._columns("changed_var") if sampled else []
        aggs += [pl.col(v).sum() for v in var_cols]
        g = frame.group_by(key).agg(aggs)
        sparsity_cols = self._columns("sparsity")
        g = g.with_columns(
            _sparsity_expr(c).alias(s) for c, s in zip(changed_cols, sparsity_cols, strict=True)
        )
        lows, highs = self._columns("sparsity_low"), self._columns("sparsity_high")
        for c, v, low, high in zip(changed_cols, var_cols, lows, highs, strict=False):
            half = Z95 * pl.col(v).sqrt()
            n = pl.col("numel").cast(pl.Float64)
            g = g.with_columns(
                (1.0 - pl.min_horizontal(n, pl.col(c) + half) / n).alias(low),
                (1.0 - pl.max_horizontal(0.0, pl.col(c) - half) / n).alias(high),
            )
        order = [*([key] if isinstance(key, str) else key), "tensors", "numel"]
        for j, (c, s) in enumerate(zip(changed_cols, sparsity_cols, strict=True)):
            order += [c, s, *((lows[j], highs[j]) if sampled else ())]
        order.append("sparsity_unweighted_mean")
        if null:
            g = g.with_columns(_predicted_expr("m"))
            order += ["predicted_changed", "predicted_sparsity"]
        return g.select(order)

    def by_layer(self) -> pl.DataFrame:
        """Per transformer layer (``model.layers.N.``), floating tensors only.

        ``sparsity`` is numel-weighted (changed elements over all elements of the layer);
        ``sparsity_unweighted_mean`` is the mean of the per-matrix figures, as plotted in the
        paper's Figure 3. Tensors outside the layer stack (embeddings, final norm, lm_head)
        appear in :meth:`by_module`, not here.
        """
        frame = self._floating.filter(pl.col("layer").is_not_null())
        return self._group("layer", frame).sort("layer")

    def by_module(self) -> pl.DataFrame:
        """Per module type (q_proj ... lm_head, norm, other), floating tensors only, with the
        same columns as :meth:`by_layer`."""
        return sort_modules(self._group("module", self._floating))

    def by_component(self) -> pl.DataFrame:
        """Per component (``language_model``, ``vision_tower``, ``projector``: design §1),
        floating tensors only, with the same columns as :meth:`by_layer`."""
        order = {c: i for i, c in enumerate(COMPONENTS)}
        g = self._group("component", self._floating)
        return g.sort(pl.col("component").replace_strict(order, return_dtype=pl.Int64))

    def by_expert(self) -> pl.DataFrame:
        """Per routed expert of a mixture-of-experts model (which experts RL touched): one row
        per layer and expert over the expert's own tensors (``...experts.N...``), with the
        columns of :meth:`by_layer`. Fused expert tensors (one tensor for all experts) and
        shared experts are not per expert: see :meth:`by_module`."""
        frame = self._floating.filter(pl.col("expert").is_not_null())
        return self._group(["layer", "expert"], frame).sort("layer", "expert", nulls_last=True)

    def by_magnitude(self) -> pl.DataFrame:
        """The magnitude lens (design §8): per binade of the base value (the IEEE exponent of
        ``|a|`` widened to f32; 0 is zero and subnormals, 255 infinities and NaN), elements,
        changed elements and sparsity, over the floating tensors; rows sum to the totals.
        ``abs_min = 2^(exponent - 127)`` is the binade's smallest magnitude (0 for bin 0).

        Small weights sit on a fine bf16 grid, large ones on a coarse one: a table whose
        sparsity rises with the exponent says that the update's moves fell below half a unit
        in the last place of the larger weights and were rounded away.

        Raises:
            ValueError: the diff was run without ``magnitude=True``.
        """
        if self.magnitude is None:
            raise ValueError(
                "this report has no magnitude lens: run rlmask.diff(..., magnitude=True) "
                "(rlmask diff --by magnitude)"
            )
        changed_cols = self._columns("changed")
        g = (
            self.magnitude.group_by("exponent")
            .agg(pl.col("numel").sum(), *(pl.col(c).sum() for c in changed_cols))
            .sort("exponent")
        )
        g = g.with_columns(
            pl.when(pl.col("exponent") == 0)
            .then(0.0)
            .otherwise(pl.lit(2.0).pow(pl.col("exponent").cast(pl.Float64) - 127))
            .alias("abs_min"),
            *(
                _sparsity_expr(c).alias(sc)
                for c, sc in zip(changed_cols, self._columns("sparsity"), strict=True)
            ),
        )
        order = ["exponent", "abs_min", "numel"]
        for c, sc in zip(changed_cols, self._columns("sparsity"), strict=True):
            order += [c, sc]
        if self.null is not None:
            bins = self.null.bins
            null = (
                pl.DataFrame(
                    {
                        "exponent": [b[1] for b in bins],
                        "m": [b[2] for b in bins],
                        "predicted_changed": [b[3] for b in bins],
                    },
                    schema={"exponent": pl.Int64, "m": pl.UInt64, "predicted_changed": pl.Float64},
                )
                .group_by("exponent")
                .agg(pl.col("m").sum(), pl.col("predicted_changed").sum())
            )
            g = g.join(null, on="exponent", how="left").with_columns(_predicted_expr("m"))
            order += ["predicted_changed", "predicted_sparsity"]
        return g.select(order)

    def lens_lines(self, *, min_numel: int = 0) -> list[str]:
        """The magnitude lens as a terminal reads it at once, one line per binade of the base
        value with at least ``min_numel`` elements: ``|a| >= 2^-7  8,586 elements  72.8%
        changed  #####`` (the share changed at the primary threshold; a bar of 40 is all).
        Binades of fewer than 100 elements are marked ``(few)``: their shares are noisy. With
        the precision null, each line also gives the share it predicts (``null 71.9%``)."""
        lens = self.by_magnitude()
        col = self.column("sparsity")
        null = "predicted_sparsity" in lens.columns
        out = []
        for r in lens.filter(pl.col("numel") >= min_numel).iter_rows(named=True):
            share = 1 - r[col] if r[col] is not None else 0.0
            low = (
                "|a| = 0 or subnormal"
                if r["exponent"] == 0
                else (
                    "|a| inf or NaN" if r["exponent"] == 255 else f"|a| >= 2^{r['exponent'] - 127}"
                )
            )
            few_mark = "  (few)" if r["numel"] < 100 else ""
            bar = "#" * round(40 * share)
            line = f"{low:<21} {r['numel']:>11,} elements  {100 * share:5.1f}% changed"
            if null:
                predicted = r["predicted_sparsity"]
                line += "  null " + (
                    "  n/a" if predicted is None else f"{100 - 100 * predicted:5.1f}%"
                )
            line += f"  {bar}"
            out.append(line.rstrip() + few_mark)
        return out

    def by(self, level: Any) -> pl.DataFrame:
        """The ``level`` breakdown: total, layer, module, tensor, component, expert or
        magnitude."""
        extra = {
            "magnitude": self.by_magnitude,
            "component": self.by_component,
            "expert": self.by_expert,
        }
        if level in extra:
            return extra[level]()
        return super().by(level)

    def total_frame(self) -> pl.DataFrame:
        """The whole model: :attr:`sweep`."""
        return self.sweep

    # ----- export ------------------------------------------------------------------------

    def null_summary(self) -> dict[str, Any] | None:
        """The precision null in figures (None without ``null=True``): ``method``, ``master``,
        ``numel`` (elements modelled), ``predicted_changed``, ``predicted_sparsity``,
        ``observed_sparsity`` (the diff's, over the same elements), ``master_disagree`` and
        ``left_out`` (tensors not modelled, with the reason)."""
        if self.null is None:
            return None
        n = self.null
        c = self.columns
        modelled = [
            (numel, counts[self._primary])
            for name, numel, counts in zip(c["name"], c["numel"], c["changed"], strict=True)
            if name in n.predicted
        ]
        numel = sum(m for m, _ in modelled)
        predicted = sum(n.predicted.values())
        return {
            "method": n.method,
            "master": n.master,
            "numel": numel,
            "predicted_changed": predicted,
            "predicted_sparsity": 1 - predicted / numel if numel else None,
            "observed_sparsity": 1 - sum(k for _, k in modelled) / numel if numel else None,
            "master_disagree": n.master_disagree,
            "left_out": [{"name": a, "reason": b} for a, b in n.left_out],
        }

    def _null_lines(self) -> list[str]:
        lines = []
        null = self.null_summary()
        if null is not None and null["numel"]:
            source = (
                f"fp32 master {null['master']}"
                if null["method"] == "master"
                else "fitted from the checkpoints, no master"
            )
            lines.append(
                f"precision null ({source}): predicted sparsity "
                f"{100 * null['predicted_sparsity']:.2f}% against "
                f"{100 * null['observed_sparsity']:.2f}% observed, over "
                f"{null['numel']:,} elements modelled"
                + (f" ({len(null['left_out'])} tensors left out)" if null["left_out"] else "")
            )
            if null["master_disagree"]:
                share = null["master_disagree"] / null["numel"]
                lines.append(
                    f"warning: the master, rounded as TUNED is stored, differs from TUNED at "
                    f"{null['master_disagree']:,} elements ({100 * share:.2f}%): is it TUNED's "
                    "own master copy?"
                )
        elif null is not None:
            lines.append("precision null: no tensor could be modelled (see left_out)")
        if self.displacement is not None and self.displacement.numel:
            d = self.displacement.to_dict()
            lines.append(
                f"displacement |{d['source']} - base|: median {d['p50']:.3g}, p90 {d['p90']:.3g}, "
                f"p99 {d['p99']:.3g}, mean {d['mean']:.3g}, max {d['max']:.3g} "
                f"({100 * d['zero_share']:.1f}% zero)"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report of design §4 (a stable contract: keys may be added,
        never removed)."""
        return self._dict(lazy=False)

    def _json_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the tensor records made one at a time as they are written (a
        million records are never all held at once)."""
        return self._dict(lazy=True)

    def _dict(self, *, lazy: bool) -> dict[str, Any]:
        changed_cols = self._columns("changed")
        c = self.columns
        predicted = None if self.null is None else self.null.predicted
        records = (
            {
                "name": name,
                "dtype": dtype,
                "shape": list(shape),
                "numel": numel,
                "changed": list(counts),
                "sparsity": [_sparsity(k, numel) for k in counts],
                "tuned_dtype": tuned_dtype,
                "floating": floating,
                "layer": where[1],
                "module": where[2],
                "component": where[0],
                "expert": where[3],
                **({} if predicted is None else {"predicted_changed": predicted.get(name)}),
            }
            for name, where, dtype, tuned_dtype, shape, numel, floating, counts in zip(
                c["name"],
                self._places,
                c["dtype"],
                c["tuned_dtype"],
                c["shape"],
                c["numel"],
                c["floating"],
                c["changed"],
                strict=True,
            )
        )
        tensors = LazyRecords(records) if lazy else list(records)
        return {
            "base": self.base,
            "tuned": self.tuned,
            "criterion": self.criterion,
            "tolerances": list(self.tolerances),
            "numel": self.numel,
            "changed": self.changed_per_threshold(),
            "sparsity": self.sparsity_per_threshold(),
            **(
                {}
                if self.sample is None
                else {
                    "sample": {
                        **self.sample,
                        "ci95": [list(ci) for ci in self.ci95_per_threshold() or ()],
                    }
                }
            ),
            "tensors": tensors,
            "only_in_base": list(self.only_in_base),
            "only_in_tuned": list(self.only_in_tuned),
            "tied": list(self.tied),
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "resized": [
                {"name": n, "base_rows": a, "tuned_rows": b, "compared_rows": min(a, b)}
                for n, a, b in self.resized
            ],
            "dequantised": [{"name": n, "base": a, "tuned": b} for n, a, b in self.dequantised],
            "scales": list(self.scales),
            "dtype_mismatch": self.dtype_mismatches,
            "as_dtype": self.as_dtype,
            "warnings": self.warnings,
            **({} if self.null is None else {"null": self.null_summary()}),
            **({} if self.displacement is None else {"displacement": self.displacement.to_dict()}),
            "renamed": {
                side: [{"stored": a, "paired": b} for a, b in pairs]
                for side, pairs in self.renamed.items()
            },
            **(
                {}
                if self.magnitude is None
                else {
                    "by_magnitude": [
                        {
                            "exponent": r["exponent"],
                            "abs_min": r["abs_min"],
                            "numel": r["numel"],
                            "changed": [r[c] for c in changed_cols],
                            **(
                                {}
                                if self.null is None
                                else {"predicted_changed": r["predicted_changed"]}
                            ),
                        }
                        for r in self.by_magnitude().iter_rows(named=True)
                    ]
                }
            ),
        }

    def save_mask(self, path: PathArg) -> None:
        """Writes :attr:`mask` to an ``.rlmask`` file (design §3), atomically.

        The bits are produced in the comparison's single pass, so the diff must have been run
        with ``mask=True`` (or pass ``save_mask=`` to :func:`diff` to write the file from the
        pass itself).
        """
        if self.mask is None:
            raise ValueError(
                "this report has no mask: run rlmask.diff(..., save_mask=PATH), which writes the "
                "changed-bits of the same pass, or rlmask.diff(..., mask=True) to keep them"
            )
        self.mask.save(path)

    def plot(
        self,
        path: PathArg | None = None,
        *,
        kind: Literal["layer", "magnitude"] = "layer",
        dpi: int = 150,
    ) -> Any:
        """The report as a figure (needs matplotlib): ``kind="layer"`` plots sparsity against
        layer, one line per module type (paper Figure 3; :func:`rlmask.plot.sparsity_by_layer`);
        ``kind="magnitude"`` the magnitude lens of a ``magnitude=True`` diff
        (:func:`rlmask.plot.magnitude_figure`). Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure (a notebook shows it).
        """
        from rlmask import plot

        if kind == "layer":
            return plot.sparsity_by_layer(self, path, dpi=dpi)
        if kind == "magnitude":
            return plot.magnitude_figure(self, path, dpi=dpi)
        raise ValueError(f"unknown kind '{kind}' (layer or magnitude)")

    def summary(self) -> str:
        """A short human-readable account of the comparison."""
        lines = [
            f"base:  {self.base}",
            f"tuned: {self.tuned}",
            f"criterion: {self.criterion}; {len(self.columns['name'])} tensors compared, "
            f"{self.numel:,} floating elements",
        ]
        for t, c, s in zip(
            self.tolerances,
            self.changed_per_threshold(),
            self.sparsity_per_threshold(),
            strict=True,
        ):
            lines.append(f"  {self.label(t):>10}: {c:>15,} changed   sparsity {100 * s:7.3f}%")
        if self.sample is not None:
            cis = self.ci95_per_threshold() or []
            smp = self.sample
            lines.insert(-len(cis), "  estimated from a sample (design §14), with 95% intervals:")
            for t, (low, high) in zip(self.tolerances, cis, strict=True):
                lines.append(
                    f"  {self.label(t):>10}: sparsity in [{100 * low:.3f}%, {100 * high:.3f}%]"
                )
            lines.append(
                f"  sample: {100 * smp['fraction']:.3g}% of the elements (seed {smp['seed']}, "
                f"blocks of {smp['block']:,}), {smp['elements']:,} elements, "
                f"{smp['bytes_read']:,} bytes of tensors read"
            )
        for what, names in (
            ("only in base", self.only_in_base),
            ("only in tuned", self.only_in_tuned),
            ("tied to the embeddings", self.tied),
            ("compared after widening (dtypes differ)", self.dtype_mismatches),
            ("skipped (mismatched)", [n for n, _ in self.skipped]),
            (
                "module type unknown to the naming table (filed as 'other')",
                [
                    n
                    for n, where in zip(self.columns["name"], self._places, strict=True)
                    if where[2] == "other"
                ],
            ),
            (
                "compared on the rows both share (rows base -> tuned)",
                [f"{n} ({a} -> {b})" for n, a, b in self.resized],
            ),
        ):
            if names:
                lines.append(f"{what}: {few(names)}")
        if self.dequantised:
            layouts = sorted(
                {f"{a or 'unscaled'} / {b or 'unscaled'}" for _, a, b in self.dequantised}
            )
            scale_names = set(self.scales)
            cols = self.columns
            moved = sum(
                1
                for n, counts in zip(cols["name"], cols["changed"], strict=True)
                if n in scale_names and counts[self._primary] > 0
            )
            lines.append(
                f"FP8 and MXFP4 weights compared dequantised (scales base / tuned: "
                f"{', '.join(layouts)}): "
                f"{len(self.dequantised)}; scale tensors (not counted as weights): "
                f"{len(self.scales)}, {moved} with changed scales"
            )
        for side, pairs in self.renamed.items():
            if pairs:
                a, b = pairs[0]
                lines.append(
                    f"names rewritten for pairing in {side}: {len(pairs)} (e.g. '{a}' -> '{b}')"
                )
        if self.as_dtype is not None:
            lines.append(f"compared as {self.as_dtype}: wider sides rounded to it first")
        lines += self._null_lines()
        lines += [f"warning: {w}" for w in self.warnings]
        return printable_lines(lines)


def shape_column(shapes: Sequence[Sequence[int]]) -> pl.Series:
    """Tensor shapes as a polars list column, built from flat numbers (one fixed-width block
    per number of dimensions) rather than a Python list per row: a report of a million
    tensors builds it in a fraction of a second instead of seconds."""
    import numpy as np

    dims = np.fromiter((len(s) for s in shapes), dtype=np.int64, count=len(shapes))
    flat = np.fromiter((d for s in shapes for d in s), dtype=np.int64, count=int(dims.sum()))
    starts = np.concatenate(([0], np.cumsum(dims)[:-1])) if len(dims) else dims
    pieces = []
    for k in np.unique(dims).tolist():
        rows = np.flatnonzero(dims == k)
        if k == 0:
            values = pl.Series("shape", [[]] * len(rows), dtype=pl.List(pl.Int64))
        else:
            at = (starts[rows][:, None] + np.arange(k)[None, :]).reshape(-1)
            values = pl.Series("shape", flat[at]).reshape((len(rows), k)).cast(pl.List(pl.Int64))
        pieces.append(pl.DataFrame({"row": rows, "shape": values}))
    if not pieces:
        return pl.Series("shape", [], dtype=pl.List(pl.Int64))
    return pl.concat(pieces).sort("row")["shape"]


def _one_shard(side: str, path: str) -> str | None:
    """A remark when ``path`` is one shard of a sharded checkpoint (an index beside it lists
    it among others): the share of the model's bytes left uncompared."""
    if not path.endswith(".safetensors") or os.path.isdir(path):
        return None
    folder, name = os.path.split(path)
    try:
        indexes = [f for f in os.listdir(folder or ".") if f.endswith(".safetensors.index.json")]
    except OSError:
        return None
    for index in indexes:
        try:
            raw = read_side_file(os.path.join(folder, index))
            shards = set(json.loads(raw or b"{}").get("weight_map", {}).values())
        except (RlmaskError, ValueError, TypeError, AttributeError, RecursionError):
            continue
        if name not in shards or len(shards) < 2:
            continue
        sizes = {
            s: os.path.getsize(os.path.join(folder, s))
            for s in shards
            if os.path.isfile(os.path.join(folder, s))
        }
        left = 1 - sizes.get(name, 0) / max(1, sum(sizes.values()))
        return (
            f"{side} is one of the {len(shards)} shards that {index} lists: about "
            f"{100 * left:.0f}% of the model's bytes were not compared; pass the folder "
            f"{folder or '.'} to compare the whole model"
        )
    return None


def diff(
    base: PathArg,
    tuned: PathArg,
    *,
    tol: float | None = None,
    tolerances: Sequence[float] | None = None,
    criterion: Criterion = "absolute",
    eta: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    shared_rows: bool = False,
    block_size: tuple[int, int] | None = None,
    mask: bool = False,
    save_mask: PathArg | None = None,
    magnitude: bool = False,
    as_dtype: str | None = None,
    null: bool = False,
    master: PathArg | None = None,
    displacement: bool = False,
    sample: str | float | Sample | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DiffReport:
    """Update sparsity of ``tuned`` against ``base`` (paper §2.2), in one pass over the data.

    Both checkpoints are memory-mapped, never loaded: any size works on a laptop.

    Args:
        base, tuned: a ``.safetensors`` file, a checkpoint directory (sharded or not, with or
            without ``model.safetensors.index.json``), an index file, or a Hugging Face repo id
            ``org/name[@revision]`` already in the local hub cache.
        tol: the absolute tolerance (default 1e-5, the paper's): an element is unchanged iff
            its bits are identical or ``|a - b| <= tol`` in float32 (float64 for F64 tensors).
            Only for the absolute criterion.
        tolerances: more absolute tolerances to compute in the same pass (a sweep, as Table 6;
            :data:`DEFAULT_SWEEP` gives the paper's).
        criterion: ``absolute`` (default), ``exact`` (identical bits only) or ``relative``
            (``|a - b| <= eta * max(|a|, |b|)``).
        eta: the relative tolerance, required by ``criterion="relative"``.
        include, exclude: regular expressions (``re.search``) on tensor names (as paired).
        name_map: ``{from_prefix: to_prefix}`` applied to both sides' names before pairing,
            after wrapper segments (DDP ``module.``, ``_fsdp_wrapped_module``,
            ``_checkpoint_wrapped_module``, ``_orig_mod``) are removed; the longest matching
            prefix wins. Rewritten names are listed in :attr:`DiffReport.renamed`.
        skip_mismatched: list tensors whose shapes or dtypes cannot be compared in
            :attr:`DiffReport.skipped` instead of raising
            :class:`~rlmask.errors.TensorMismatchError`.
        shared_rows: compare a tensor whose number of rows differs between the two (a
            vocabulary resized between base and tuned: ``embed_tokens`` and ``lm_head`` with
            128256 against 128264 rows) on the leading rows both share, and list it in
            :attr:`DiffReport.resized`, instead of refusing it. Other shape differences are
            still refused (or skipped).
        block_size: the block (rows, columns) of block-scaled FP8 weights (a weight ``NAME``
            in an FP8 dtype, E4M3/E5M2 or their FNUZ variants, beside ``NAME_scale_inv`` or
            ``NAME_scale``), for both sides;
            by default each side's ``config.json`` (``quantization_config.weight_block_size``)
            says. Scaled weights are compared as ``f32(code) * f32(scale)`` (design §1); the
            exact criterion compares codes and scales as stored.
        mask: also keep the changed-bits at ``tol`` (the subnetwork) as
            :attr:`DiffReport.mask`, computed in the same pass (one bit per element in memory).
        save_mask: write that mask to this ``.rlmask`` file, atomically, straight from the pass
            (memory-mapped, never held in memory: fit for 70B models); with ``mask=True`` too,
            the mask is also kept in :attr:`DiffReport.mask`.
        magnitude: also count elements and changed elements per binade of the base value (the
            magnitude lens, :meth:`DiffReport.by_magnitude`), in the same pass; the JSON
            report then carries ``by_magnitude``.
        as_dtype: ``"bf16"``: compare as an engine that loads both checkpoints in BF16 sees
            them: every floating side stored wider (F32, F16, F64) is rounded to BF16 (to
            nearest, ties to even) before the comparison. For fp32 checkpoints, whose weights
            move almost everywhere, this gives the figure the paper reports for BF16.
        null: also compute the precision null (design §8): the sparsity that rounding alone
            predicts for an update of the run's size. Each tensor's
            accumulated fp32 update ``master - base`` is kept as a multiset but placed at
            random within the tensor, added to the base and rounded as ``tuned`` is stored
            (to f32, then to its dtype); the expected changed count under the diff's criterion
            (absolute or exact) is computed exactly, per tensor and per binade of the base
            value (:attr:`DiffReport.null`, ``predicted_changed`` and ``predicted_sparsity``
            columns in every breakdown, :meth:`DiffReport.null_summary`). Without ``master``
            the updates are fitted from the checkpoints (``method: "fit"``), assuming that a
            tensor's update sizes do not depend on the weight's magnitude and that its quarter
            of elements nearest zero record their moves nearly exactly: an estimate that leans
            towards too much sparsity. Implies ``magnitude``. Costs a sort of each tensor's
            updates in memory (about 24 bytes per element of the largest tensor).
        master: the run's fp32 weights behind ``tuned`` (an fp32 save, or the optimizer's
            master copy exported as safetensors), paired with ``base`` by name as ``tuned`` is.
            Its rounding to ``tuned``'s dtype is checked against ``tuned``.
        displacement: also report the distribution of ``|update|`` (median, 90th and 99th
            percentiles, mean, maximum; :attr:`DiffReport.displacement`): ``|master - base|``
            when ``master`` is given, else ``|tuned - base|``, over the BF16, F16 and F32
            tensors; for comparing runs at equal displacement rather than equal steps.
        sample: estimate from a random sample instead of reading every element (design
            §14): a fraction (``0.01``, ``"1%"``) of each tensor's elements, or a byte budget
            (``"2GB"``) of both checkpoints' files, read in contiguous blocks drawn per tensor
            with ``seed``. Every count is then an estimate, with a 95% interval
            (:meth:`DiffReport.ci95_per_threshold`, ``sparsity_low``/``sparsity_high`` in every
            breakdown, ``sample`` in the JSON) that accounts for changes clustered within
            tensors. Not with masks, the magnitude lens, the null or displacements.
        seed: the sample's seed (the same seed reads the same blocks).
        progress: draw a progress bar on stderr when it is a terminal.

    Returns:
        A :class:`DiffReport`; :attr:`DiffReport.warnings` remarks on a result that is exact
        but implausible as the comparison meant (nothing changed, nearly everything changed,
        full-precision weights, one shard of a sharded model).

    Raises:
        PairingError: no floating element is compared (an include that matches nothing,
            unrelated models), or more than half of either side's floating elements have no
            partner.
        CheckpointChangedError: a file was truncated or rewritten while it was read.
        OutputError: ``save_mask`` cannot be written (checked before any data is read).

    Example:
        >>> report = rlmask.diff("base/", "grpo/", tolerances=rlmask.DEFAULT_SWEEP)
        >>> report.sparsity, report.by_module()
    """
    options = DiffOptions.build(
        tol=tol,
        tolerances=tolerances,
        criterion=criterion,
        eta=eta,
        include=include,
        exclude=exclude,
        name_map=name_map,
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        block_size=block_size,
        mask=mask,
        save_mask=save_mask,
        magnitude=magnitude,
        as_dtype=as_dtype,
        null=null,
        master=master,
        displacement=displacement,
        sample=sample,
        seed=seed,
    )
    return run_diff(base, tuned, options, progress=progress)


@dataclass(frozen=True)
class DiffOptions:
    """How one diff runs (the arguments of :func:`diff`), built once by the API or the CLI and
    checked when built: the criterion parsed, the patterns compiled, the block size and the
    combinations of options checked, before any file is opened."""

    criterion: _rlmask.Criterion
    pairs: PairOptions
    mask: bool = False
    save_mask: PathArg | None = None
    magnitude: bool = False
    #: ``"bf16"`` or None.
    as_dtype: str | None = None
    null: bool = False
    master: PathArg | None = None
    displacement: bool = False
    sample: Sample | None = None

    @classmethod
    def build(
        cls,
        *,
        tol: float | None = None,
        tolerances: Sequence[float] | None = None,
        criterion: Criterion = "absolute",
        eta: float | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        name_map: Mapping[str, str] | None = None,
        skip_mismatched: bool = False,
        shared_rows: bool = False,
        block_size: tuple[int, int] | None = None,
        mask: bool = False,
        save_mask: PathArg | None = None,
        magnitude: bool = False,
        as_dtype: str | None = None,
        null: bool = False,
        master: PathArg | None = None,
        displacement: bool = False,
        sample: str | float | Sample | None = None,
        seed: int = 0,
    ) -> DiffOptions:
        """The options of :func:`diff` (see there), checked.

        Raises:
            ValueError: an argument the criterion does not take, a bad threshold, pattern or
                block size, or options that do not go together.
        """
        crit = parse_criterion(criterion, tol, tolerances, eta)
        pairs = PairOptions.build(
            include=include,
            exclude=exclude,
            name_map=name_map,
            skip_mismatched=skip_mismatched,
            shared_rows=shared_rows,
            block_size=block_size,
        )
        if as_dtype not in (None, "bf16", "bfloat16"):
            raise ValueError(f"as_dtype compares as 'bf16' (or None), not {as_dtype!r}")
        if null and crit.name == "relative":
            raise ValueError("the precision null models the absolute and exact criteria")
        if null and as_dtype is not None:
            raise ValueError("the precision null rounds as TUNED is stored; drop as_dtype")
        drawn = None
        if isinstance(sample, Sample):
            drawn = sample.checked()
        elif isinstance(sample, str):
            drawn = Sample.parse(sample, seed)
        elif sample is not None:
            drawn = Sample(fraction=float(sample), seed=seed).checked()
        if drawn is not None and (mask or save_mask is not None or magnitude or null):
            raise ValueError(
                "a sampled diff estimates counts: a mask, the magnitude lens and the precision "
                "null need every element (drop sample)"
            )
        if drawn is not None and (displacement or master is not None):
            raise ValueError("a sampled diff does not measure displacements (drop sample)")
        return cls(
            criterion=crit,
            pairs=pairs,
            mask=mask,
            save_mask=save_mask,
            magnitude=magnitude,
            as_dtype=None if as_dtype is None else "bf16",
            null=null,
            master=master,
            displacement=displacement,
            sample=drawn,
        )

    def describe(self) -> dict[str, Any]:
        """The options as JSON values (a survey's cache key): everything that changes a
        report."""
        p = self.pairs
        return {
            "criterion": self.criterion.name,
            "thresholds": self.criterion.values,
            "primary": self.criterion.primary,
            "include": p.include,
            "exclude": p.exclude,
            "name_map": p.name_map,
            "skip_mismatched": p.skip_mismatched,
            "shared_rows": p.shared_rows,
            "block_size": p.block_size,
            "magnitude": self.magnitude,
            "as_dtype": self.as_dtype,
            "null": self.null,
            "master": None if self.master is None else os.fspath(self.master),
            "displacement": self.displacement,
            "sample": None
            if self.sample is None
            else [self.sample.fraction, self.sample.budget, self.sample.seed, self.sample.block],
        }


def run_diff(
    base: PathArg, tuned: PathArg, options: DiffOptions, *, progress: bool = True
) -> DiffReport:
    """:func:`diff` with its options built (by :meth:`DiffOptions.build`)."""
    o = options
    crit = o.criterion
    # Where every mask of this diff says it came from.
    provenance = {
        "source": "diff",
        "base": os.fspath(base),
        "tuned": os.fspath(tuned),
        "criterion": crit.name,
        "tolerance": repr(crit.primary),
        "rlmask_version": __version__,
    }
    if o.save_mask is not None:
        check_output(o.save_mask)
        check_not_input(o.save_mask, [base, tuned, *([] if o.master is None else [o.master])])
    a, b = open_checkpoint(base), open_checkpoint(tuned)
    # The master is opened (and its headers checked) before the pass, not after it.
    m = None if o.master is None else _rlmask.Checkpoint(resolve_checkpoint(o.master))
    keep_mask = o.mask or o.save_mask is not None
    sample = None
    if o.sample is not None:
        fraction = o.sample.fraction_of([*a.shard_sizes, *b.shard_sizes])
        sample = {"fraction": fraction, "seed": o.sample.seed, "block": o.sample.block}
    core_options = _rlmask.DiffOptions(
        crit,
        o.pairs.plan(a, [b], b),
        mask_at=crit.primary_index if keep_mask else None,
        mask_file=None if (o.mask or o.save_mask is None) else (os.fspath(o.save_mask), provenance),
        magnitude=o.magnitude or o.null,
        as_bf16=o.as_dtype is not None,
        sample=None if o.sample is None else (fraction, o.sample.seed, o.sample.block),
    )
    raw = run_with_progress(
        lambda watch: _rlmask.diff(a, b, core_options, progress=watch),
        show=progress_wanted(progress),
        fetched=(lambda: a.fetched + b.fetched) if a.remote or b.remote else None,
    )
    notes = [n for side, c in (("BASE", a), ("TUNED", b)) if (n := _one_shard(side, c.location))]
    null_model, disp = None, None
    if o.null or o.displacement or o.master is not None:
        from rlmask._null import measure

        null_model, disp = measure(
            a,
            b,
            m,
            [
                (n, da, db)
                for n, da, db, f in zip(
                    raw.columns["name"],
                    raw.columns["dtype"],
                    raw.columns["tuned_dtype"],
                    raw.columns["floating"],
                    strict=True,
                )
                if f
            ],
            tol=None if crit.name == "exact" else crit.primary,
            null=o.null,
            displacement=o.displacement or o.master is not None,
            name_map=dict(o.pairs.name_map),
            master_label=None if o.master is None else os.fspath(o.master),
        )
    report = _report(
        raw,
        crit,
        provenance,
        notes,
        o.as_dtype,
        null=null_model,
        displacement=disp,
        sample=sample,
    )
    if o.save_mask is not None and o.mask:
        report.save_mask(o.save_mask)
    return report


def _report(
    raw: _rlmask.DiffResult,
    crit: _rlmask.Criterion,
    provenance: dict[str, str],
    notes: list[str],
    as_dtype: str | None,
    *,
    null: NullModel | None = None,
    displacement: Displacement | None = None,
    sample: dict[str, Any] | None = None,
) -> DiffReport:
    criterion = cast(Criterion, crit.name)
    values = crit.values
    # Natural order: model.layers.2 before model.layers.10, in every table and file. The core
    # returns it for ASCII names (natural_cmp); other names (Unicode digits) are sorted here.
    columns: dict[str, list[Any]] = raw.columns
    if not all(n.isascii() for n in columns["name"]):
        order = sorted(range(len(columns["name"])), key=lambda i: natural_key(columns["name"][i]))
        columns = {k: [v[i] for i in order] for k, v in columns.items()}
    info = None
    if "sample" in columns and sample is not None:
        # The sample's counts become estimates (rounded to whole elements) with variances.
        read = columns.pop("sample")
        est, var = estimates(columns["changed"], read)
        columns["changed"] = [[round(x) for x in e] for e in est]
        columns["changed_var"] = var
        info = {
            **sample,
            "block": max((r[4] for r in read), default=sample["block"]),
            "elements": sum(r[0] for r in read),
            "bytes_read": sum(r[1] for r in read),
        }
    bits = raw.bits
    mask = None
    if bits:  # imported only when a mask was asked for: the plain diff starts faster
        from rlmask._mask import Mask

        packed = {
            n: (shape, dtype, bits[n])
            for n, shape, dtype in zip(
                columns["name"], columns["shape"], columns["dtype"], strict=True
            )
            if n in bits
        }
        mask = Mask.from_packed(packed, provenance)
    magnitude = None
    if raw.magnitude is not None:
        bins = raw.magnitude
        if columns is not raw.columns:  # rows of each tensor in the report's order
            rank = {n: i for i, n in enumerate(columns["name"])}
            bins = sorted(bins, key=lambda b: rank[b[0]])
        changed_cols = _columns("changed", criterion, values)
        magnitude = pl.DataFrame(
            {
                "name": [b[0] for b in bins],
                "exponent": [b[1] for b in bins],
                "numel": [b[2] for b in bins],
                **{c: [b[3][j] for b in bins] for j, c in enumerate(changed_cols)},
            },
            schema={
                "name": pl.Utf8,
                "exponent": pl.Int64,
                "numel": pl.UInt64,
                **{c: pl.UInt64 for c in changed_cols},
            },
        )
    return DiffReport(
        base=provenance["base"],
        tuned=provenance["tuned"],
        criterion=criterion,
        tolerances=tuple(values),
        tol=crit.primary,
        columns=columns,
        only_in_base=raw.only_in_base,
        only_in_tuned=raw.only_in_tuned,
        tied=raw.tied,
        skipped=raw.skipped,
        resized=raw.resized,
        dequantised=raw.dequantised,
        scales=raw.scales,
        mask=mask,
        renamed={"base": raw.renamed_base, "tuned": raw.renamed_tuned},
        magnitude=magnitude,
        as_dtype=as_dtype,
        notes=notes,
        null=null,
        displacement=displacement,
        sample=info,
    )
