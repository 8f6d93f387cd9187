"""Plain-text tables for the terminal: right-aligned numbers, sparsities as percentages."""

from __future__ import annotations

from typing import Any

import polars as pl

from rlmask._rlmask import printable

_PERCENT = ("sparsity", "density", "o1", "o2", "jaccard")


def _is_share(column: str) -> bool:
    """Columns holding a fraction of a whole, shown as percentages (so that one table never
    mixes fractions and percentages)."""
    return (
        column.startswith(_PERCENT)
        or column.endswith("_share")
        or "fraction" in column
        or "energy" in column
    )


class Rendered(str):
    """Text whose every line is already escaped for the terminal (a table from
    :func:`format_frame`): :func:`rlmask._report.printable_lines` keeps its newlines."""

    __slots__ = ()


def _cell(column: str, value: Any, percent: bool | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if percent if percent is not None else _is_share(column):
            return f"{100 * value:.3f}%"
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return printable(str(value))


def format_frame(df: pl.DataFrame, *, percent: bool | None = None) -> Rendered:
    """Renders every row of ``df`` as an aligned text table. Floats are shown as percentages
    in the ratio columns (sparsity, density, o1, ...), or everywhere (``percent=True``) or
    nowhere (``percent=False``)."""
    header = [printable(c) for c in df.columns]
    rows = [
        [_cell(c, v, percent) for c, v in zip(df.columns, row, strict=True)]
        for row in df.iter_rows()
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    numeric = [df[c].dtype.is_numeric() for c in df.columns]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return Rendered("\n".join(out))
