"""Plain-text tables for the terminal: right-aligned numbers, sparsities as percentages."""

from __future__ import annotations

from typing import Any

import polars as pl


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column.startswith(("sparsity", "density", "o1", "o2", "jaccard")):
            return f"{100 * value:.3f}%"
        return f"{value:g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value)
    return str(value)


def format_frame(df: pl.DataFrame) -> str:
    """Renders every row of ``df`` as an aligned text table."""
    header = list(df.columns)
    rows = [[_cell(c, v) for c, v in zip(header, row, strict=True)] for row in df.iter_rows()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    numeric = [df[c].dtype.is_numeric() for c in header]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
