"""What every report class shares: breakdowns by level, and JSON, CSV and Parquet export."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from rlmask._io import PathArg, write_atomic, write_text_atomic
from rlmask._lazy import LazyModule
from rlmask._names import MODULES
from rlmask._rlmask import printable

if TYPE_CHECKING:
    import polars as pl
else:
    pl = LazyModule("polars")

Level = Literal["total", "layer", "module", "tensor"]

_MODULE_RANK = {m: i for i, m in enumerate((*MODULES, "other"))}


class LazyRecords:
    """Records (dicts) made as they are read, once: a JSON writer's stand-in for a list of a
    million records that need never all exist at once."""

    def __init__(self, records: Iterable[dict[str, Any]]) -> None:
        self._records = iter(records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._records


def records_per_line(d: dict[str, Any]) -> str:
    """``d`` as a JSON object with one key per line and one record per line in its lists of
    records (and :class:`LazyRecords`); every piece is a compact ``json.dumps``."""
    dumps = json.dumps
    lines = []
    for key, value in d.items():
        if isinstance(value, LazyRecords) or (
            isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            rows = ",\n    ".join(map(dumps, value))
            lines.append(f"  {dumps(key)}: [\n    {rows}\n  ]" if rows else f"  {dumps(key)}: []")
        else:
            lines.append(f"  {dumps(key)}: {dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}"


def sort_modules(df: pl.DataFrame, then: Sequence[str] = ()) -> pl.DataFrame:
    """Rows in the order of :data:`rlmask._names.MODULES` (q_proj ... norm, then other), and
    by the columns ``then`` within a module."""
    rank = pl.col("module").replace_strict(_MODULE_RANK, return_dtype=pl.Int64)
    return df.sort([rank, *then])


def ratio(num: str, den: str) -> pl.Expr:
    """``num / den`` as float, null where ``den`` is 0."""
    return (
        pl.when(pl.col(den) > 0)
        .then(pl.col(num).cast(pl.Float64) / pl.col(den).cast(pl.Float64))
        .otherwise(None)
    )


def few(items: Sequence[str], limit: int = 5) -> str:
    """A long list cut for a message: the first ``limit`` items, and how many in all."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def printable_lines(lines: list[str]) -> str:
    """Lines joined for a terminal, each with control characters in names and paths escaped
    (a hostile tensor name cannot move the cursor or recolour the screen). A table from
    :func:`rlmask._table.format_frame` escaped its own cells and keeps its line breaks."""
    from rlmask._table import Rendered

    return "\n".join(line if isinstance(line, Rendered) else printable(line) for line in lines)


def flat(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no lists: shapes become ``4096x4096``."""
    if "shape" not in df.columns:
        return df
    return df.with_columns(pl.col("shape").list.eval(pl.element().cast(pl.Utf8)).list.join("x"))


class Report:
    """Mixin of the report dataclasses: they provide ``tensors``, :meth:`total_frame`,
    :meth:`by_layer`, :meth:`by_module`, :meth:`to_dict` and :meth:`summary`."""

    tensors: pl.DataFrame
    #: Columns of the breakdowns left out of terminal tables (files keep them).
    table_hidden: tuple[str, ...] = ()

    def total_frame(self) -> pl.DataFrame:
        """The whole-model figures as a DataFrame."""
        raise NotImplementedError

    def by_layer(self) -> pl.DataFrame:
        """Figures per transformer layer."""
        raise NotImplementedError

    def by_module(self) -> pl.DataFrame:
        """Figures per module type."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The report as plain Python values."""
        raise NotImplementedError

    def summary(self) -> str:
        """A short human-readable account."""
        raise NotImplementedError

    def by(self, level: Level) -> pl.DataFrame:
        """The breakdown named by ``level``: total, layer, module or tensor."""
        if level == "total":
            return self.total_frame()
        if level == "layer":
            return self.by_layer()
        if level == "module":
            return self.by_module()
        if level == "tensor":
            return self.tensors
        raise ValueError(f"unknown level '{level}' (total, layer, module or tensor)")

    def to_json(self, path: PathArg | None = None, *, indent: int | None = None) -> str:
        """:meth:`to_dict` as JSON text; also written atomically to ``path`` if given.

        By default one key per line, and one record per line in each list of records (a
        tensor's row, a skipped name): readable, line by line greppable, and written by the
        standard library's C encoder (an indented dump goes through its Python encoder, about
        four times slower on a report of thousands of tensors). ``indent=N`` indents every
        level instead."""
        if indent is not None:
            text = json.dumps(self.to_dict(), indent=indent) + "\n"
        else:
            text = records_per_line(self._json_dict()) + "\n"
        if path is not None:
            write_text_atomic(path, text)
        return text

    def _json_dict(self) -> dict[str, Any]:
        """What :meth:`to_json` writes: :meth:`to_dict`, whose long lists of records a report
        may give as :class:`LazyRecords`."""
        return self.to_dict()

    def to_csv(self, path: PathArg | None = None, *, by: Level = "tensor") -> str:
        """The ``by`` breakdown as CSV text; also written atomically to ``path`` if given."""
        text = flat(self.by(by)).write_csv()
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_parquet(self, path: PathArg, *, by: Level = "tensor") -> None:
        """Writes the ``by`` breakdown to a Parquet file, atomically."""
        df = self.by(by)
        write_atomic(path, lambda p: df.write_parquet(p))

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        """The summary under the class name: readable in a REPL, unlike a dataclass's repr of
        its DataFrames."""
        return f"<{type(self).__name__}>\n{self.summary()}"

    def _repr_html_(self) -> str:
        """In a notebook: the summary, then the whole-model table."""
        from html import escape

        return (
            f"<b>{type(self).__name__}</b><pre>{escape(self.summary())}</pre>"
            + self.total_frame()._repr_html_()
        )
