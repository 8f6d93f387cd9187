"""Figures (needs matplotlib: ``pip install "rlmask[plot]"``). Importing this module does not
import matplotlib; each function does.

- :func:`sparsity_by_layer`: update sparsity per layer, one line per module type, as the
  paper's Figure 3;
- :func:`trajectory_figure`: a run's sparsity over steps, its categories and the share of
  changes outside the final subnetwork (Figures 2, 5, 6, 7);
- :func:`survey_figure`: sparsity per model, coloured by group (Figure 1);
- :func:`overlap_heatmap`: the o1 matrix of N masks (Table 4);
- :func:`overlap_figure`: two masks' overlap per module against the random baseline (Table 3);
- :func:`rank_figure`: rank fraction per module and singular-value energy curves (Table 2).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import polars as pl

from rlmask._io import PathArg, check_output, write_atomic
from rlmask._report import sort_modules

if TYPE_CHECKING:
    # Types only: every report imports this module to draw itself, never the other way.
    from matplotlib.axes import Axes

    from rlmask._diff import DiffReport
    from rlmask._overlap import OverlapMatrix, OverlapReport
    from rlmask._rank import RankReport
    from rlmask._spectrum import SpectrumReport
    from rlmask._survey import SurveyReport
    from rlmask._trajectory import TrajectoryReport


#: File types a figure can be written as (matplotlib's Agg and vector backends), by extension.
FORMATS = (
    "eps",
    "jpeg",
    "jpg",
    "pdf",
    "pgf",
    "png",
    "ps",
    "raw",
    "rgba",
    "svg",
    "svgz",
    "tif",
    "tiff",
    "webp",
    "avif",
    "gif",
)


def check_figure_path(path: PathArg) -> None:
    """Fails before any work when ``path`` cannot take a figure: an unknown extension, an
    unwritable folder, or matplotlib missing.

    Raises:
        OutputError: the folder is missing or not writable.
        ValueError: the extension names no figure format.
        ImportError: matplotlib is not installed.
    """
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if ext not in FORMATS:
        raise ValueError(
            f"{os.fspath(path)}: unknown figure type '.{ext}' (use one of "
            + ", ".join(f".{f}" for f in ("png", "pdf", "svg", "jpg"))
            + ", ...)"
        )
    check_output(path)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'rlmask[plot]'") from None


def _pyplot(path: PathArg | None) -> Any:
    """matplotlib's pyplot, with the output path checked first and, when a file is asked for,
    the non-interactive backend (no window, no display needed)."""
    import matplotlib

    if path is not None:
        check_figure_path(path)
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: PathArg | None, dpi: int, *, own: bool = True) -> None:
    """Writes ``fig`` to ``path`` (when given) atomically, in the format its extension names.
    A figure this module made (``own``) is then closed in pyplot: the caller gets the Figure
    object, which a notebook displays once (left open, Jupyter's inline backend would also
    draw it at the end of the cell: twice) and which ``savefig`` still writes."""
    if path is not None:
        fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
        write_atomic(path, lambda p: fig.savefig(p, dpi=dpi, format=fmt))
    if own:
        import matplotlib.pyplot as plt

        plt.close(fig)


#: The matrices plotted, in the paper's order.
MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sparsity_by_layer(
    report: DiffReport, path: PathArg | None = None, *, ax: Axes | None = None, dpi: int = 150
) -> Any:
    """Plots update sparsity (at the report's primary tolerance) against layer index, one line
    per module type, with the numel-weighted layer mean as a thick line.

    Args:
        report: a :class:`~rlmask.DiffReport`.
        path: where to write the figure (PNG, PDF, SVG, ... by extension), atomically.
        ax: draw into these axes instead of a new figure.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = report.tensors.filter(pl.col("floating") & pl.col("layer").is_not_null())
    if layers.is_empty():
        raise ValueError("the report has no tensors inside a layer stack (model.layers.N.)")
    fig: Any
    own = ax is None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.5))
    else:
        fig = ax.figure
    per = (
        layers.group_by("layer", "module")
        .agg(pl.col("numel").sum(), pl.col("changed").sum())
        .with_columns((1 - pl.col("changed") / pl.col("numel")).alias("sparsity"))
        .sort("layer")
    )
    for module in (*MATRICES, "other"):
        rows = per.filter(pl.col("module") == module)
        if rows.height:
            ax.plot(rows["layer"], 100 * rows["sparsity"], marker="o", ms=3, lw=1, label=module)
    total = report.by_layer()
    ax.plot(
        total["layer"],
        100 * total[report.column("sparsity")],
        color="black",
        lw=2.5,
        label="layer (weighted)",
    )
    if report.sample is not None:  # a sampled diff: the layer figure's 95% interval
        ax.fill_between(
            total["layer"],
            100 * total[report.column("sparsity_low")],
            100 * total[report.column("sparsity_high")],
            color="black",
            alpha=0.15,
            lw=0,
            label=f"95% interval ({100 * report.sample['fraction']:.3g}% sample)",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("update sparsity (%)")
    ax.set_title(f"Update sparsity per layer at {report.criterion} {report.label(report.tol)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    if path is not None:
        check_figure_path(path)
    _save(fig, path, dpi, own=own)
    return fig


def trajectory_figure(
    report: TrajectoryReport, path: PathArg | None = None, *, dpi: int = 150
) -> Any:
    """The run's figure, three panels as in the paper:

    1. update sparsity against the step, against the base (Figures 5, 7a) and against the
       previous checkpoint (Figure 7b);
    2. the three categories of Figure 2 per module type (stacked shares: never changed,
       changed then returned, final subnetwork);
    3. Figure 6: the share of each checkpoint's changes outside the final subnetwork.

    The x axis is the step when every checkpoint has one, else the checkpoint's position.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    total = report.total_frame()
    steps = total["step"].to_list()
    x = steps if all(s is not None for s in steps) else total["checkpoint"].to_list()
    xlabel = "step" if x is steps else "checkpoint"
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.2))
    a1.plot(x, 100 * total["sparsity_vs_base"], marker="o", ms=3, label="against the base")
    a1.plot(x, 100 * total["sparsity_consecutive"], marker="s", ms=3, label="against previous")
    a1.set_xlabel(xlabel)
    a1.set_ylabel("update sparsity (%)")
    a1.set_title("Sparsity over the run")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)

    per = (
        report.tensors.group_by("module")
        .agg(
            pl.col("numel").sum(),
            pl.col("never").sum(),
            pl.col("returned").sum(),
            pl.col("final").sum(),
        )
        .pipe(sort_modules)
    )
    modules = per["module"].to_list()
    bottom = [0.0] * len(modules)
    for what, label in (
        ("never", "never changed"),
        ("returned", "changed, returned"),
        ("final", "final subnetwork"),
    ):
        share = (100 * per[what] / per["numel"]).fill_nan(0).to_list()
        a2.bar(modules, share, bottom=bottom, label=label)
        bottom = [b + s for b, s in zip(bottom, share, strict=True)]
    a2.set_ylabel("share of elements (%)")
    a2.set_title("Categories (Figure 2)")
    a2.tick_params(axis="x", labelrotation=60, labelsize=7)
    # Headroom above the bars (which stop at 100%) keeps the legend clear of them.
    a2.set_ylim(0, 122)
    a2.set_yticks(range(0, 101, 20))
    a2.legend(fontsize=7, loc="upper center", ncol=3, frameon=False)

    shares = total["outside_final_share"].to_list()
    changed, numel = total["changed_vs_base"].to_list(), total["numel"].to_list()
    a3.plot(
        x,
        [
            None if v is None else 100 * v * c / n
            for v, c, n in zip(shares, changed, numel, strict=True)
        ],
        marker="o",
        ms=3,
        color="tab:red",
        label="% of all elements (the paper's Figure 6)",
    )
    a3.plot(
        x,
        [None if v is None else 100 * v for v in shares],
        marker="s",
        ms=3,
        color="tab:gray",
        ls="--",
        label="% of the checkpoint's own changes",
    )
    a3.set_xlabel(xlabel)
    a3.set_ylabel("changed, outside the final subnetwork (%)")
    a3.set_title("Outside the final subnetwork (Figure 6)")
    a3.legend(fontsize=7)
    a3.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig


def survey_figure(report: SurveyReport, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """Update sparsity per pair at the survey's primary tolerance, one bar per pair coloured by
    group (the paper's Figure 1). Failed pairs are left out.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    rows = report.tensors.filter(pl.col("status") != "error")
    if rows.is_empty():
        raise ValueError("no pair of the survey was compared: nothing to plot")
    # Figure 1 is at the primary tolerance; the rows of a sweep's other tolerances are Table 6's.
    rows = rows.filter(pl.col("tolerance") == report.tolerance)
    groups = [g or "(none)" for g in rows["group"].to_list()]
    palette = plt.get_cmap("tab10")
    colour = {g: palette(i % 10) for i, g in enumerate(dict.fromkeys(groups))}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * rows.height + 2), 4.5))
    ax.bar(
        rows["name"].to_list(),
        (100 * rows["sparsity"]).to_list(),
        color=[colour[g] for g in groups],
    )
    from matplotlib.patches import Patch

    ax.set_ylabel("update sparsity (%)")
    ax.set_title(f"Update sparsity per model ({report.criterion} {report.tolerance:g})")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    # One patch per group in its own colour (empty bars all take the axes' first colour).
    ax.legend(
        handles=[Patch(facecolor=c, label=g) for g, c in colour.items()],
        fontsize=8,
        title="group",
    )
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig


def overlap_heatmap(matrix: OverlapMatrix, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """The o1 matrix of N masks as an annotated heatmap (paper Table 4): row i, column j is the
    share of mask i's elements that mask j also has; the diagonal is 100%.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    o1 = matrix.matrices()["o1"]
    labels = matrix.labels
    values = [[100 * (v if v is not None else float("nan")) for v in o1[lab]] for lab in labels]
    grid = [list(row) for row in zip(*values, strict=True)]  # rows: the mask covered
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            v = grid[i][j]
            ax.text(
                j,
                i,
                "-" if v != v else f"{v:.1f}",
                ha="center",
                va="center",
                color="white" if v == v and v < 60 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("covered by (column)")
    ax.set_ylabel("mask (row)")
    ax.set_title("o1: share of the row's subnetwork in the column's (%)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    legend = "\n".join(f"{lab}: {m}" for lab, m in zip(labels, matrix.masks, strict=True))
    fig.text(0.01, 0.01, legend, fontsize=6, va="bottom")
    fig.tight_layout(rect=(0, 0.04 * n / 2, 1, 1))
    _save(fig, path, dpi)
    return fig


def overlap_figure(report: OverlapReport, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """Two masks' overlap per module type (paper Table 3): o1 and o2 as bars beside the random
    baseline of independent masks with the same densities (and the magnitude-matched baseline
    when the report has one), the whole model first.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    frame = pl.concat(
        [
            report.total_frame().with_columns(pl.lit("model").alias("module")),
            report.by_module(),
        ],
        how="diagonal_relaxed",
    )
    series = ["o1", "o1_random", "o2", "o2_random"]
    if "o1_matched" in frame.columns:
        series[2:2] = ["o1_matched"]
        series.append("o2_matched")
    modules = frame["module"].to_list()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(modules) + 2), 4.5))
    width = 0.8 / len(series)
    for k, col in enumerate(series):
        values = [100 * (v if v is not None else float("nan")) for v in frame[col].to_list()]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(modules))]
        hatch = "//" if "random" in col else ("xx" if "matched" in col else None)
        ax.bar(xs, values, width, label=col, hatch=hatch, alpha=0.85)
    ax.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    ax.set_ylabel("overlap (%)")
    ax.set_ylim(0, 100)
    ax.set_title("o1 = |I1 ∩ I2| / |I1|, o2 = |I1 ∩ I2| / |I2|, against chance")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.01, f"mask 1: {report.mask_1}\nmask 2: {report.mask_2}", fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path, dpi)
    return fig


def rank_figure(report: RankReport, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """Two panels: the mean rank fraction per module type (paper Table 2 by module), and the
    singular-value energy curve of every update matrix (the share of ``||ΔW||_F^2`` in the top
    k directions against k / min(m, n)), one colour per module type.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)
    import numpy as np

    per = report.by_module()
    if per.is_empty():
        raise ValueError("the report has no update matrix: nothing to plot")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    a1.bar(per["module"].to_list(), (100 * per["mean_rank_fraction"].fill_null(0)).to_list())
    a1.set_ylabel("mean rank / min(m, n) (%)")
    a1.set_title("Update rank per module type")
    a1.tick_params(axis="x", labelrotation=60, labelsize=8)
    a1.set_ylim(0, 100)
    palette = plt.get_cmap("tab10")
    colour = {m: palette(i % 10) for i, m in enumerate(per["module"].to_list())}
    labelled: set[str] = set()
    for row in report.tensors.iter_rows(named=True):
        s = report.spectra.get(row["name"])
        if s is None or not s.size:
            continue
        energy = np.square(s)
        total = energy.sum()
        if total <= 0:
            continue
        x = np.arange(1, s.size + 1) / s.size
        module = row["module"]
        a2.plot(
            x,
            100 * np.cumsum(energy) / total,
            lw=0.8,
            alpha=0.6,
            color=colour[module],
            label=None if module in labelled else module,
        )
        labelled.add(module)
    a2.set_xscale("log")
    a2.set_xlabel("k / min(m, n)")
    a2.set_ylabel("energy in the top k directions (%)")
    a2.set_title("Singular-value energy of each update matrix")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig


def spectrum_figure(report: SpectrumReport, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """Three panels per module type (design §13): the share of the update's energy in the
    base's top 10% singular directions beside what an update of random direction would put
    there; the rotation of that subspace (mean sine of the principal angles); and the update's
    rank-1 share. Pooled as the breakdowns pool them.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)
    import numpy as np

    per = report.by_module()
    if per.is_empty():
        raise ValueError("the report has no update matrix: nothing to plot")
    modules = per["module"].to_list()
    x = np.arange(len(modules))
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    a1.bar(x - 0.2, 100 * per["principal_energy@0.1"].fill_null(0).to_numpy(), 0.4, label="update")
    a1.bar(
        x + 0.2,
        100 * per["principal_energy_uniform@0.1"].fill_null(0).to_numpy(),
        0.4,
        color="tab:gray",
        label="random direction (expected)",
    )
    a1.set_ylabel("energy in the base's top 10% directions (%)")
    a1.set_title("Where the update sits")
    a1.legend(fontsize=7)
    a2.bar(x, per["rotation@0.1"].fill_null(0).to_numpy(), color="tab:orange")
    a2.set_ylabel("mean sine of the principal angles")
    a2.set_title("Rotation of the base's top-10% subspace")
    a3.bar(x, 100 * per["energy_top_k@1"].fill_null(0).to_numpy(), color="tab:green")
    a3.set_ylabel("energy in the update's top direction (%)")
    a3.set_title("Rank-1 share of the update")
    for ax in (a1, a2, a3):
        ax.set_xticks(x, modules, rotation=60, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig


def spectrum_run_figure(
    report: SpectrumReport, path: PathArg | None = None, *, dpi: int = 150
) -> Any:
    """A run's geometry over its checkpoints (design §13), one panel per question: the share of
    the update's energy in the base's top 10% directions against the random-direction
    expectation, that subspace's rotation, the spectral drift, and the rank-1 share with the
    alignment of the update's top direction to the last checkpoint's. Pooled over matrices as
    the breakdowns pool them; the x axis is the step (the checkpoint's position without one).

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    total = report.total_frame()
    if total.is_empty() or "step" not in total.columns:
        raise ValueError("not a run: spectrum_figure draws a pair")
    steps = total["step"].to_list()
    x = steps if all(s is not None for s in steps) else list(range(1, len(steps) + 1))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    panels = [
        (
            [("principal_energy@0.1", "update"), ("principal_energy_uniform@0.1", "random")],
            100,
            "energy in the base's top 10% directions (%)",
        ),
        ([("rotation@0.1", "rotation")], 1, "mean sine, top-10% subspace"),
        ([("spectral_drift", "drift")], 1, "||S' - S|| / ||S||"),
        (
            [("energy_top_k@1", "rank-1 share"), ("rank1_alignment", "alignment with the last")],
            100,
            "%",
        ),
    ]
    for ax, (series, scale, ylabel) in zip(axes, panels, strict=True):
        for column, label in series:
            values = [None if v is None else scale * v for v in total[column].to_list()]
            ax.plot(x, values, marker="o", ms=3, label=label)
        ax.set_xlabel("step" if x is steps else "checkpoint")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig


def magnitude_figure(report: DiffReport, path: PathArg | None = None, *, dpi: int = 150) -> Any:
    """The magnitude lens (design §8): the share of elements changed per binade of the base
    value (bars, at the primary tolerance, with 95% Wilson intervals for the binade's element
    count, so a binade of 5 elements does not read like one of 20,000), and the share of all
    elements in each binade (line), against log2 of the binade's smallest magnitude; with the
    precision null (``diff(null=True)``), the share it predicts per binade (black ticks).
    Changes concentrated in the small binades, where bf16's grid is fine, point at precision
    rather than optimisation.

    Returns:
        The matplotlib Figure (written atomically to ``path`` if given).
    """
    plt = _pyplot(path)

    lens = report.by_magnitude().filter((pl.col("exponent") > 0) & (pl.col("exponent") < 255))
    if lens.is_empty():
        raise ValueError("no element with a normal base value: nothing to plot")
    x = (lens["exponent"] - 127).to_list()
    from rlmask.stats import wilson

    changed = lens[report.column("changed")]
    fig, ax = plt.subplots(figsize=(8, 5))
    share = (100 * changed / lens["numel"]).to_list()
    bounds = [wilson(k, n) for k, n in zip(changed.to_list(), lens["numel"].to_list(), strict=True)]
    err = [
        [max(0.0, s - 100 * lo) for s, (lo, _) in zip(share, bounds, strict=True)],
        [max(0.0, 100 * hi - s) for s, (_, hi) in zip(share, bounds, strict=True)],
    ]
    ax.bar(x, share, color="tab:blue", label="changed (95% interval)")
    ax.errorbar(x, share, yerr=err, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    if "predicted_changed" in lens.columns:
        predicted = (100 * (1 - lens["predicted_sparsity"])).to_list()
        ax.scatter(x, predicted, marker="_", s=120, color="black", zorder=3, label="precision null")
    ax.set_xlabel("binade of the base value: log2 |a|")
    ax.set_ylabel("elements changed (%)")
    ax.set_title(
        f"Changes per magnitude of the base weight ({report.criterion} {report.label(report.tol)})"
    )
    twin = ax.twinx()
    twin.plot(
        x,
        (100 * lens["numel"] / lens["numel"].sum()).to_list(),
        color="tab:orange",
        marker="o",
        ms=3,
        label="share of elements",
    )
    twin.set_ylabel("share of all elements (%)")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # Below the axes, clear of the bars.
    fig.legend(
        handles,
        [str(h.get_label()) for h in handles],
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, path, dpi)
    return fig
