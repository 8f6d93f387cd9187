"""How sparsity evolves over a run's checkpoints (paper §6, Appendix D, Figures 2, 5, 6, 7;
design §6).

For checkpoints ``θ_1..θ_K`` after ``θ_0 = base``, at one tolerance:

- ``changed_vs_base[k] = changed(θ_0, θ_k)`` (Figures 5, 7a) and
  ``changed_consecutive[k] = changed(θ_{k-1}, θ_k)`` (Figure 7b; the first is against the base);
- the three categories of Figure 2: ``never`` (unchanged against the base in every checkpoint),
  ``returned`` (changed at some checkpoint, unchanged in the last), ``final`` (changed in the
  last: the final subnetwork);
- Figure 6's ``outside_final[k]``: the share of ``θ_k``'s changes that lie outside the final
  subnetwork (null when ``θ_k`` changed nothing).

Every file is read once, in one pass (the core compares each chunk of every checkpoint with the
base and with its predecessor together), and memory stays flat whatever the model size and the
number of checkpoints.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import polars as pl

from rlmask import _rlmask
from rlmask._io import PathArg, check_output
from rlmask._names import layer_of, module_of, natural_key
from rlmask._options import Criterion, parse_criterion, threshold_label
from rlmask._plan import PairOptions
from rlmask._progress import progress_wanted, run_with_progress
from rlmask._remote import is_remote, open_checkpoint
from rlmask._report import Report, few, printable_lines, ratio, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask._rlmask import __version__
from rlmask._table import format_frame
from rlmask.errors import CheckpointNotFoundError, PairingError

#: Directory names of a run's checkpoints, with their step: Hugging Face ``checkpoint-500``,
#: verl ``global_step_500``, ``step_500``, ``iter_500`` (Megatron ``iter_0000500``).
STEP_DIR = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(\d+)$", re.IGNORECASE)


def step_of(path: PathArg) -> int | None:
    """The training step in a checkpoint's directory or file name, or None (also for a number
    past 2^63, which no run reaches and no table column holds)."""
    name = Path(path).name
    for suffix in (".safetensors", ".json"):
        name = name.removesuffix(suffix)
    m = STEP_DIR.search(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step < 2**63 else None


def _holds_checkpoint(d: Path) -> bool:
    return any(d.glob("*.safetensors")) or any(d.glob("*.safetensors.index.json"))


def discover(args: Sequence[PathArg]) -> list[str]:
    """The checkpoints that ``args`` name, in run order.

    Each argument is a checkpoint (any form :func:`rlmask.diff` accepts), a glob pattern, or a
    run directory whose subdirectories are checkpoints named ``checkpoint-<step>``,
    ``global_step_<n>``, ``step_<n>`` or ``iter_<n>``. When every checkpoint has a step in its
    name they are ordered by step (as integers: 900 before 1000); otherwise they keep the order
    given, with each glob's and run directory's matches in natural order.

    Raises:
        CheckpointNotFoundError: an argument names nothing, or a pattern matches nothing.
        ValueError: the same checkpoint is named twice.
    """
    found: list[str] = []
    for arg in args:
        text = os.fspath(arg)
        if is_remote(text):
            found.append(text)
            continue
        if glob.has_magic(text) and not Path(text).exists():
            matches = sorted(glob.glob(text), key=natural_key)
            if not matches:
                raise CheckpointNotFoundError(f"{text}: the pattern matches nothing", text)
        else:
            matches = [text]
        for m in matches:
            p = Path(m)
            if p.is_dir() and not _holds_checkpoint(p):
                runs = sorted(
                    (c for c in p.iterdir() if c.is_dir() and STEP_DIR.search(c.name)),
                    key=lambda c: natural_key(c.name),
                )
                if runs:
                    found += [os.fspath(r) for r in runs]
                    continue
            found.append(resolve_checkpoint(m))
    seen: dict[str, str] = {}
    for f in found:
        real = f if is_remote(f) else os.fspath(Path(f).resolve())
        if real in seen:
            raise ValueError(f"checkpoint {f} is given twice")
        seen[real] = f
    steps = [step_of(p) for p in found]
    known = [s for s in steps if s is not None]
    if found and len(known) == len(found):
        found = [p for _, p in sorted(zip(known, found, strict=True), key=lambda sp: sp[0])]
    return found


@dataclass(frozen=True, repr=False)
class TrajectoryReport(Report):
    """A run's checkpoints against its base and their predecessors.

    Attributes:
        base: the base checkpoint as given.
        checkpoint_paths: the checkpoints, in run order.
        steps: the training step of each (from its name), or None.
        criterion, tolerance: the comparison (one threshold).
        tensors: one row per tensor: name, layer, module, dtype, shape, numel, and per
            checkpoint (lists) ``changed_vs_base``, ``changed_consecutive``,
            ``outside_final`` (counts), then ``never``, ``returned``, ``final``.
        incomplete: base tensors missing from some checkpoint (left out), with the 1-based
            positions of the checkpoints that lack them.
        skipped: ``(name, reason)`` of tensors left out (not floating; mismatched).
        renamed: per checkpoint (base first), names rewritten for pairing.
    """

    base: str
    checkpoint_paths: list[str]
    steps: list[int | None]
    criterion: Criterion
    tolerance: float
    tensors: pl.DataFrame
    incomplete: list[tuple[str, list[int]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[list[tuple[str, str]]] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Elements followed over the run."""
        return int(self.tensors["numel"].sum())

    @property
    def categories(self) -> dict[str, int]:
        """Figure 2: elements never changed, changed then returned, and in the final
        subnetwork."""
        return {k: int(self.tensors[k].sum()) for k in ("never", "returned", "final")}

    def _per_step(self, frame: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
        """One row per group and checkpoint, from list columns summed element-wise."""
        k = len(self.checkpoint_paths)
        lists = ["changed_vs_base", "changed_consecutive", "outside_final"]
        long = frame.select(
            *keys,
            "numel",
            "never",
            "returned",
            "final",
            *lists,
            pl.lit(list(range(1, k + 1))).alias("checkpoint"),
        ).explode([*lists, "checkpoint"])
        g = long.group_by([*keys, "checkpoint"], maintain_order=True).agg(
            pl.col("numel").sum(),
            *(pl.col(c).sum() for c in lists),
            *(pl.col(c).sum() for c in ("never", "returned", "final")),
        )
        steps = pl.DataFrame(
            {
                "checkpoint": list(range(1, k + 1)),
                "step": self.steps,
                "path": self.checkpoint_paths,
            },
            schema={"checkpoint": pl.Int64, "step": pl.Int64, "path": pl.Utf8},
        )
        g = g.join(steps, on="checkpoint", how="left").with_columns(
            (1 - ratio("changed_vs_base", "numel")).alias("sparsity_vs_base"),
            (1 - ratio("changed_consecutive", "numel")).alias("sparsity_consecutive"),
            (ratio("outside_final", "changed_vs_base")).alias("outside_final_share"),
        )
        return g.select(
            *keys,
            "checkpoint",
            "step",
            "path",
            "numel",
            "changed_vs_base",
            "sparsity_vs_base",
            "changed_consecutive",
            "sparsity_consecutive",
            "outside_final_share",
            "never",
            "returned",
            "final",
        ).sort([*keys, "checkpoint"])

    def total_frame(self) -> pl.DataFrame:
        """One row per checkpoint: step, path, changed and sparsity against the base and the
        previous checkpoint, Figure 6's outside-final share, and the run's categories."""
        return self._per_step(self.tensors, [])

    def by_layer(self) -> pl.DataFrame:
        """:meth:`total_frame` per transformer layer (tensors outside the layer stack left
        out)."""
        return self._per_step(self.tensors.filter(pl.col("layer").is_not_null()), ["layer"])

    def by_module(self) -> pl.DataFrame:
        """:meth:`total_frame` per module type."""
        df = self._per_step(self.tensors, ["module"])
        return sort_modules(df, then=["checkpoint"])

    def by(self, level: Any) -> pl.DataFrame:
        """The ``level`` breakdown; ``tensor`` gives one row per tensor and checkpoint."""
        if level == "tensor":
            return self._per_step(self.tensors, ["name"])
        return super().by(level)

    def to_dict(self) -> dict[str, Any]:
        """The report of design §6 (a stable contract: keys may be added, never removed)."""
        total = self.total_frame()
        checkpoints = [
            {
                "path": r["path"],
                "step": r["step"],
                "changed_vs_base": int(r["changed_vs_base"]),
                "sparsity_vs_base": r["sparsity_vs_base"],
                "changed_consecutive": int(r["changed_consecutive"]),
                "sparsity_consecutive": r["sparsity_consecutive"],
                "outside_final": r["outside_final_share"],
            }
            for r in total.iter_rows(named=True)
        ]
        tensors = [
            {
                "name": r["name"],
                "layer": r["layer"],
                "module": r["module"],
                "dtype": r["dtype"],
                "shape": list(r["shape"]),
                "numel": int(r["numel"]),
                "changed_vs_base": [int(x) for x in r["changed_vs_base"]],
                "changed_consecutive": [int(x) for x in r["changed_consecutive"]],
                "outside_final": [int(x) for x in r["outside_final"]],
                "never": int(r["never"]),
                "returned": int(r["returned"]),
                "final": int(r["final"]),
            }
            for r in self.tensors.iter_rows(named=True)
        ]
        return {
            "base": self.base,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "numel": self.numel,
            "checkpoints": checkpoints,
            "categories": self.categories,
            "tensors": tensors,
            "incomplete": [{"name": n, "missing_in": m} for n, m in self.incomplete],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "renamed": [[{"stored": a, "paired": b} for a, b in pairs] for pairs in self.renamed],
        }

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """The run as a figure (needs matplotlib; :func:`rlmask.plot.trajectory_figure`):
        sparsity over steps, the categories of elements, and the share of changes outside the
        final subnetwork. Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure.
        """
        from rlmask.plot import trajectory_figure

        return trajectory_figure(self, path, dpi=dpi)

    #: The breakdowns' tables name each checkpoint by number and step; the summary above
    #: them gives the paths (files keep them on every row).
    table_hidden = ("path",)

    def summary(self) -> str:
        """The run at a glance: one line per checkpoint, then the categories."""
        n = self.numel
        c = self.categories
        label = threshold_label(self.criterion, self.tolerance)
        lines = [
            f"base: {self.base}",
            f"{len(self.checkpoint_paths)} checkpoints; criterion: {self.criterion} {label}; "
            f"{self.tensors.height} tensors, {n:,} floating elements",
            "",
        ]
        table = self.total_frame().select(
            "checkpoint",
            "step",
            "sparsity_vs_base",
            "sparsity_consecutive",
            pl.col("outside_final_share").alias("outside_final"),
            "path",
        )
        lines.append(format_frame(table, percent=True))

        def share(x: int) -> str:
            return f"{x:,} ({100 * x / n:.3f}%)" if n else f"{x:,}"

        lines += [
            "",
            f"never changed: {share(c['never'])}; changed then returned: "
            f"{share(c['returned'])}; final subnetwork: {share(c['final'])}",
        ]
        for what, names in (
            ("missing from some checkpoint", [m for m, _ in self.incomplete]),
            ("skipped", [m for m, _ in self.skipped]),
        ):
            if names:
                lines.append(f"{what}: {few(names)}")
        return printable_lines(lines)


def _mask_name(path: str, step: int | None, k: int) -> str:
    if step is not None:
        return f"step-{step}.rlmask"
    return f"{k:03d}-{Path(path).name.removesuffix('.safetensors')}.rlmask"


def trajectory(
    base: PathArg,
    checkpoints: PathArg | Sequence[PathArg],
    *,
    tol: float | None = None,
    criterion: Criterion = "absolute",
    eta: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    block_size: tuple[int, int] | None = None,
    save_masks: PathArg | None = None,
    progress: bool = True,
    executor: str = "local",
    segments: int | None = None,
    shared_dir: PathArg | None = None,
    ray_address: str | None = None,
    ray_cpus_per_segment: float = 1.0,
) -> TrajectoryReport:
    """Sparsity over a run (paper §6, Appendix D; Figures 2, 5, 6, 7), in one pass.

    Args:
        base: the checkpoint the run started from (any form :func:`rlmask.diff` accepts).
        checkpoints: the run's checkpoints: paths, glob patterns, or a run directory holding
            ``checkpoint-<step>/`` (or ``global_step_<n>``, ``step_<n>``, ``iter_<n>``)
            subdirectories; ordered by step when every name carries one (see
            :func:`discover`).
        tol, criterion, eta: one threshold, as in :func:`rlmask.diff` (default: absolute,
            1e-5).
        include, exclude, name_map, skip_mismatched, block_size: as in :func:`rlmask.diff`
            (scaled FP8 weights are compared by their dequantised values; the block size
            defaults to the base's ``config.json``).
        save_masks: a directory (created if missing) to receive each checkpoint's mask against
            the base, streamed from the pass: ``step-<n>.rlmask``, or
            ``<k>-<name>.rlmask`` for checkpoints without a step.
        progress: a progress bar on stderr when it is a terminal (local executor).
        executor: ``local`` (one pass here) or ``ray``: the run is cut into ``segments``
            contiguous segments (default: one per 8 checkpoints), each a Ray task on a node
            that sees the files. The run's final mask and each segment's ever-changed bits
            travel through ``shared_dir``, a folder every node sees (default: beside
            ``save_masks`` if given, else a temporary folder here, fit for one machine); the
            figures are identical to the local executor's.
        ray_address, ray_cpus_per_segment: the cluster to join (default: start a local one),
            and the CPUs each segment's task reserves.

    Returns:
        A :class:`TrajectoryReport`.

    Raises:
        PairingError: nothing to compare, or a checkpoint mostly unpaired with the base.
        CheckpointChangedError: a file changed while it was read.

    Example:
        >>> r = rlmask.trajectory("base/", "runs/grpo/")      # checkpoint-100, -200, ...
        >>> r.total_frame()                                    # per checkpoint
        >>> r.categories                                       # Figure 2
    """
    options = TrajectoryOptions.build(
        tol=tol,
        criterion=criterion,
        eta=eta,
        include=include,
        exclude=exclude,
        name_map=name_map,
        skip_mismatched=skip_mismatched,
        block_size=block_size,
    )
    return run_trajectory(
        base,
        checkpoints,
        options,
        save_masks=save_masks,
        progress=progress,
        executor=executor,
        segments=segments,
        shared_dir=shared_dir,
        ray_address=ray_address,
        ray_cpus_per_segment=ray_cpus_per_segment,
    )


@dataclass(frozen=True)
class TrajectoryOptions:
    """What a trajectory compares (the criterion and pairing arguments of :func:`trajectory`),
    built once by the API or the CLI and checked when built."""

    criterion: _rlmask.Criterion
    pairs: PairOptions

    @classmethod
    def build(
        cls,
        *,
        tol: float | None = None,
        criterion: Criterion = "absolute",
        eta: float | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        name_map: Mapping[str, str] | None = None,
        skip_mismatched: bool = False,
        block_size: tuple[int, int] | None = None,
    ) -> TrajectoryOptions:
        """The options, checked (see :func:`trajectory`).

        Raises:
            ValueError: an argument the criterion does not take, a bad threshold, pattern or
                block size.
        """
        return cls(
            criterion=parse_criterion(criterion, tol, None, eta),
            pairs=PairOptions.build(
                include=include,
                exclude=exclude,
                name_map=name_map,
                skip_mismatched=skip_mismatched,
                block_size=block_size,
            ),
        )


def run_trajectory(
    base: PathArg,
    checkpoints: PathArg | Sequence[PathArg],
    options: TrajectoryOptions,
    *,
    save_masks: PathArg | None = None,
    progress: bool = True,
    executor: str = "local",
    segments: int | None = None,
    shared_dir: PathArg | None = None,
    ray_address: str | None = None,
    ray_cpus_per_segment: float = 1.0,
) -> TrajectoryReport:
    """:func:`trajectory` with its options built (by :meth:`TrajectoryOptions.build`)."""
    crit = options.criterion
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor '{executor}' (local or ray)")
    args = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    paths = discover(args)
    if not paths:
        raise ValueError("a trajectory needs at least one checkpoint after the base")
    steps = [step_of(p) for p in paths]
    mask_files = None
    if save_masks is not None:
        folder = Path(save_masks)
        folder.mkdir(parents=True, exist_ok=True)
        mask_files = [
            folder / _mask_name(p, s, k + 1)
            for k, (p, s) in enumerate(zip(paths, steps, strict=True))
        ]
        for f in mask_files:
            check_output(f)
    b = open_checkpoint(base)
    cs = [open_checkpoint(p) for p in paths]
    provenance = [
        {
            "source": "trajectory",
            "base": os.fspath(base),
            "tuned": os.fspath(p),
            "criterion": crit.name,
            "tolerance": repr(crit.primary),
            "rlmask_version": __version__,
        }
        for p in paths
    ]
    # The run's FP8 block size is the base's (given, or declared by its config.json).
    plan = options.pairs.plan(b, cs, b)
    masks: list[PathArg] | None = list(mask_files) if mask_files else None
    if executor == "ray":
        raw = _ray_raw(
            os.fspath(base) if is_remote(base) else resolve_checkpoint(base),
            paths,
            (crit, plan),
            masks,
            provenance,
            segments=segments or max(1, math.ceil(len(paths) / 8)),
            shared=shared_dir if shared_dir is not None else save_masks,
            address=ray_address,
            cpus=ray_cpus_per_segment,
        )
    else:
        core_options = _rlmask.TrajectoryOptions(
            crit,
            plan,
            mask_files=masks,
            mask_provenance=provenance if masks else None,
        )
        raw = run_with_progress(
            lambda watch: _rlmask.trajectory(b, cs, core_options, progress=watch),
            show=progress_wanted(progress),
        )
    df = pl.DataFrame(
        {
            "name": raw.name,
            "layer": [layer_of(n) for n in raw.name],
            "module": [module_of(n) for n in raw.name],
            "dtype": raw.dtype,
            "shape": raw.shape,
            "numel": raw.numel,
            "changed_vs_base": raw.changed_vs_base,
            "changed_consecutive": raw.changed_consecutive,
            "outside_final": raw.outside_final,
            "ever": raw.ever,
            "last": raw.last,
        },
        schema={
            "name": pl.Utf8,
            "layer": pl.Int64,
            "module": pl.Utf8,
            "dtype": pl.Utf8,
            "shape": pl.List(pl.Int64),
            "numel": pl.UInt64,
            "changed_vs_base": pl.List(pl.UInt64),
            "changed_consecutive": pl.List(pl.UInt64),
            "outside_final": pl.List(pl.UInt64),
            "ever": pl.UInt64,
            "last": pl.UInt64,
        },
    )
    # Natural order: model.layers.2 before model.layers.10.
    df = df[sorted(range(df.height), key=lambda i: natural_key(df["name"][i]))]
    df = df.with_columns(
        (pl.col("numel") - pl.col("ever")).alias("never"),
        (pl.col("ever") - pl.col("last")).alias("returned"),
        pl.col("last").alias("final"),
    ).drop("ever", "last")
    return TrajectoryReport(
        base=os.fspath(base),
        checkpoint_paths=paths,
        steps=steps,
        criterion=cast(Criterion, crit.name),
        tolerance=crit.primary,
        tensors=df,
        incomplete=[(n, [i + 1 for i in m]) for n, m in raw.incomplete],
        skipped=raw.skipped,
        renamed=raw.renamed,
    )


#: What every Ray task of a trajectory compares with: the criterion and the core's plan options.
_Compare = tuple[_rlmask.Criterion, _rlmask.PlanOptions]


def _segment_task(
    base: str,
    paths: list[str],
    previous: str | None,
    final: str,
    ever: str,
    compare: _Compare,
    masks: list[PathArg] | None,
    provenance: list[dict[str, str]] | None,
) -> _rlmask.TrajectoryResult:
    """One segment of a run, on a Ray worker: the core's trajectory of ``paths`` after
    ``previous``, against the run's final mask, writing the segment's ever-changed bits."""
    options = _rlmask.TrajectoryOptions(
        *compare, mask_files=masks, mask_provenance=provenance, ever_file=ever
    )
    return _rlmask.trajectory(
        open_checkpoint(base),
        [open_checkpoint(p) for p in paths],
        options,
        previous=open_checkpoint(previous) if previous else None,
        final_mask=_rlmask.MaskFile(final),
    )


def _last_mask_task(base: str, last: str, compare: _Compare, out: str) -> None:
    """The run's final mask (its last checkpoint against the base), on a Ray worker."""
    options = _rlmask.TrajectoryOptions(*compare, mask_files=[out])
    _rlmask.trajectory(open_checkpoint(base), [open_checkpoint(last)], options)


def _ray_raw(
    base: str,
    paths: list[str],
    compare: _Compare,
    masks: list[PathArg] | None,
    provenance: list[dict[str, str]],
    *,
    segments: int,
    shared: PathArg | None,
    address: str | None,
    cpus: float,
) -> _rlmask.TrajectoryResult:
    """The core's trajectory result, computed segment by segment as Ray tasks and merged: per
    checkpoint figures are concatenated, ``ever`` is the union of the segments' ever bits, and
    ``last`` and ``outside_final`` are against the run's final mask, computed first."""
    from rlmask._mask import load_mask
    from rlmask._ray import run_tasks, session

    k = len(paths)
    cuts = [round(i * k / min(segments, k)) for i in range(min(segments, k) + 1)]
    with contextlib.ExitStack() as stack:
        folder = (
            Path(shared)
            if shared is not None
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlmask-trajectory-")))
        )
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:12]
        final = os.fspath(folder / f".final-{tag}.rlmask")
        evers = [os.fspath(folder / f".ever-{tag}-{i}.rlmask") for i in range(len(cuts) - 1)]
        for f in [final, *evers]:
            stack.callback(Path(f).unlink, missing_ok=True)
        ray = stack.enter_context(session(address))
        list(run_tasks(ray, _last_mask_task, [(base, paths[-1], compare, final)], cpus))
        calls = [
            (
                base,
                paths[a:z],
                paths[a - 1] if a else None,
                final,
                evers[i],
                compare,
                masks[a:z] if masks else None,
                provenance[a:z] if masks else None,
            )
            for i, (a, z) in enumerate(itertools.pairwise(cuts))
        ]
        parts: list[_rlmask.TrajectoryResult | None] = [None] * len(calls)
        for i, out in run_tasks(ray, _segment_task, calls, cpus):
            parts[i] = out
        done = [p for p in parts if p is not None]
        names = done[0].name
        if len(done) != len(parts) or any(p.name != names for p in done):
            raise PairingError(
                "the run's segments compare different tensors (a tensor is missing from some "
                "checkpoints): run it with the local executor to see which"
            )
        ever = load_mask(evers[0])
        for e in evers[1:]:
            ever = ever | load_mask(e)
        counts = ever.counts()
        first = done[0]

        def joined(field: str) -> list[list[int]]:
            return [[x for p in done for x in getattr(p, field)[i]] for i in range(len(names))]

        return _rlmask.TrajectoryResult(
            name=names,
            dtype=first.dtype,
            shape=first.shape,
            numel=first.numel,
            changed_vs_base=joined("changed_vs_base"),
            changed_consecutive=joined("changed_consecutive"),
            outside_final=joined("outside_final"),
            ever=[counts[n] for n in names],
            last=first.last,
            incomplete=[
                (n, list(m))
                for n, m in sorted({(n, tuple(m)) for p in done for n, m in p.incomplete})
            ],
            skipped=sorted({x for p in done for x in p.skipped}),
            renamed=first.renamed + [r for p in done[1:] for r in p.renamed[1:]],
        )
