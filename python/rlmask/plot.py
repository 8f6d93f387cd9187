"""Figures (needs matplotlib: ``pip install "rlmask[plot]"``). Importing this module does not
import matplotlib; each function does.

- :func:`sparsity_by_layer`: update sparsity per layer, one line per module type, as the
  paper's Figure 3.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import polars as pl

from rlmask._diff import DiffReport
from rlmask._io import check_output, write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PathArg = str | os.PathLike[str]

#: File types a figure can be written as (matplotlib's Agg and vector backends), by extension.
FORMATS = (
    "eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz", "tif", "tiff",
    "webp", "avif", "gif",
)  # fmt: skip


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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("update sparsity (%)")
    ax.set_title(f"Update sparsity per layer at {report.criterion} {report.label(report.tol)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    if path is not None:
        check_figure_path(path)
        fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
        write_atomic(path, lambda p: fig.savefig(p, dpi=dpi, format=fmt))
    return fig
