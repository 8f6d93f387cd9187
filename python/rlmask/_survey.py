"""Many checkpoint pairs at once: the paper's Table 1, Table 6 and Figure 1 for your own models
(design §7).

A manifest lists the pairs; every pair is one :func:`rlmask.diff` pass at every tolerance asked
for. Results are cached per pair under a key made of the options and every shard's path, size,
modification time and header bytes, so an interrupted survey resumes where it stopped and a
changed file invalidates only its own pair. A pair that fails is reported in its row; the others
go on. Pairs run in parallel threads (``jobs``; each pass already uses every core, so this helps
with many small pairs or cold disks, where one pair waits on I/O) or as Ray tasks on a cluster
whose nodes see the files (``executor="ray"``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import polars as pl

from rlmask import _rlmask
from rlmask._diff import DiffOptions, run_diff
from rlmask._io import PathArg, read_side_file, write_text_atomic
from rlmask._options import Criterion
from rlmask._progress import cancel_all
from rlmask._ray import run_tasks, session
from rlmask._remote import is_remote, open_checkpoint
from rlmask._report import Report, printable_lines
from rlmask._resolve import resolve_checkpoint
from rlmask._rlmask import __version__
from rlmask.errors import OutputError, RlmaskError, RlmaskWarning

_KEYS = {"name", "base", "tuned", "group", "include", "exclude"}


@dataclass(frozen=True)
class Pair:
    """One line of a manifest."""

    name: str
    base: str
    tuned: str
    group: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: include/exclude must be a regex or a list of regexes")


def _csv_rows(text: str, where: str) -> list[dict[str, Any]]:
    """A CSV manifest's rows, empty cells dropped; a repeated column or a malformed line
    (a field over the csv module's limit, a stray quote) is an error naming the line."""
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise ValueError(f"{where}: line 1: the column {repeated[0]!r} is repeated")
        rows = []
        for line in reader:
            if not any(cell.strip() for cell in line):
                continue
            if len(line) > len(header):
                raise ValueError(
                    f"{where}: line {reader.line_num}: {len(line)} fields, the header has "
                    f"{len(header)}"
                )
            rows.append({k: v for k, v in zip(header, line, strict=False) if v != ""})
        return rows
    except csv.Error as e:
        raise ValueError(f"{where}: line {reader.line_num}: not valid CSV ({e})") from None


def load_manifest(path: PathArg) -> list[Pair]:
    """Reads a survey manifest: TOML (``[[pair]]`` tables) or CSV (a header row), with keys
    ``name``, ``base``, ``tuned`` and optional ``group``, ``include``, ``exclude`` (a regex; in
    TOML also a list). A relative ``base`` or ``tuned`` that exists beside the manifest is taken
    from there; anything else is passed on as given (a path from here, or a repo id).

    Raises:
        ValueError: with the manifest and the entry at fault: no pairs, a missing or unknown
            key, a value of the wrong type, a repeated name or column, a malformed file.
    """
    p = Path(path)
    where = os.fspath(path)
    try:
        raw = read_side_file(p)
        if raw is None:
            raise ValueError(f"{where}: no such file")
        # utf-8-sig: a byte-order mark (as spreadsheets write) is not part of the first key.
        text = raw.decode("utf-8-sig")
    except RlmaskError as e:
        raise ValueError(str(e)) from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[dict[str, Any]]
    if p.suffix.lower() == ".csv":
        rows = _csv_rows(text, where)
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(
                f"{where}: not valid TOML ({e}); a CSV manifest must end in .csv"
            ) from None
        except RecursionError:
            raise ValueError(f"{where}: not a manifest (nested too deeply)") from None
        rows = data.get("pair", [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{where}: 'pair' must be an array of tables ([[pair]])")
        unknown = set(data) - {"pair"}
        if unknown:
            raise ValueError(f"{where}: unknown top-level keys {sorted(unknown)} (use [[pair]])")
    if not rows:
        raise ValueError(f"{where}: the manifest lists no pairs")
    pairs, seen = [], set()
    for i, row in enumerate(rows, start=1):
        at = f"{where}: pair {i}"
        extra = set(row) - _KEYS
        if extra:
            raise ValueError(f"{at}: unknown keys {sorted(extra)} (allowed: {sorted(_KEYS)})")
        for key in ("name", "base", "tuned"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"{at}: '{key}' is missing or empty")
        if row.get("group") is not None and not isinstance(row["group"], str):
            raise ValueError(f"{at}: 'group' must be text, not {type(row['group']).__name__}")
        name = row["name"].strip()
        if name in seen:
            raise ValueError(f"{at}: the name '{name}' is used twice")
        seen.add(name)

        def place(s: str) -> str:
            local = p.parent / s
            return os.fspath(local) if not os.path.isabs(s) and local.exists() else s

        pairs.append(
            Pair(
                name=name,
                base=place(row["base"]),
                tuned=place(row["tuned"]),
                group=row.get("group"),
                include=_patterns(row.get("include"), at),
                exclude=_patterns(row.get("exclude"), at),
            )
        )
    return pairs


#: The largest cache entry read back (a report of 100k tensors is about 30 MB).
_ENTRY_LIMIT = 1 << 30


def _fingerprint(spec: str) -> list[list[Any]]:
    """Everything of a checkpoint that a figure depends on: (path, size, mtime, sha256 of the
    header) of every shard, and the SHA-256 of the side files the pass reads (``config.json``
    gives the FP8 block size; the index maps names to shards). For a remote checkpoint: its
    URL, and every shard's URL, size and ETag as the server gives them (the hub's ETag of a
    weight file is its SHA-256), with the config's SHA-256."""
    if is_remote(spec):
        remote = open_checkpoint(spec)
        config = remote.config
        return [
            ["config.json", None if config is None else hashlib.sha256(config).hexdigest()],
            [remote.location],
            *[
                [s, n, e]
                for s, n, e in zip(
                    [str(x) for x in remote.shards],
                    remote.shard_sizes,
                    remote.shard_etags,
                    strict=True,
                )
            ],
        ]
    path = resolve_checkpoint(spec)
    ckpt = _rlmask.Checkpoint(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    out: list[list[Any]] = []
    for side in ("config.json", "model.safetensors.index.json"):
        data = read_side_file(os.path.join(folder, side))
        out.append([side, None if data is None else hashlib.sha256(data).hexdigest()])
    for shard in ckpt.shards:
        st = os.stat(shard)
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(min(n, 100_000_000))
        out.append(
            [os.fspath(shard), st.st_size, st.st_mtime_ns, hashlib.sha256(header).hexdigest()]
        )
    return out


def _cache_key(pair: Pair, options: DiffOptions) -> str:
    data = {
        "rlmask": __version__,
        "options": options.describe(),
        "include": pair.include,
        "exclude": pair.exclude,
        "base": _fingerprint(pair.base),
        "tuned": _fingerprint(pair.tuned),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_pair(pair: Pair, options: DiffOptions) -> dict[str, Any]:
    """One pair's diff (with the pair's own include/exclude) as its JSON report (what a Ray
    task returns)."""
    pairs = options.pairs.with_patterns(pair.include or None, pair.exclude or None)
    report = run_diff(pair.base, pair.tuned, replace(options, pairs=pairs), progress=False)
    return report.to_dict()


@dataclass(frozen=True, repr=False)
class SurveyReport(Report):
    """One row per pair and tolerance.

    Attributes:
        manifest: where the pairs came from.
        tensors: one row per pair and tolerance: name, group, base, tuned, tolerance, numel,
            changed, sparsity, status (``ok``, ``cached`` or ``error``), error.
        criterion: the comparison's criterion.
        tolerance: the primary threshold (``tol``; eta for relative, 0 for exact).
        results: every compared pair's full diff report (design §4), by name.
    """

    manifest: str
    criterion: Criterion
    tensors: pl.DataFrame
    tolerance: float
    results: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def failed(self) -> list[str]:
        """Names of the pairs that could not be compared."""
        return sorted(set(self.tensors.filter(pl.col("status") == "error")["name"]))

    def by_group(self) -> pl.DataFrame:
        """Per group and tolerance: pairs, numel-weighted sparsity, and the mean, min and max
        of the pairs' sparsities (failed pairs left out)."""
        ok = self.tensors.filter(pl.col("status") != "error")
        return (
            ok.group_by("group", "tolerance")
            .agg(
                pl.len().alias("pairs"),
                pl.col("numel").sum(),
                pl.col("changed").sum(),
                pl.col("sparsity").mean().alias("sparsity_mean"),
                pl.col("sparsity").min().alias("sparsity_min"),
                pl.col("sparsity").max().alias("sparsity_max"),
            )
            .with_columns(
                (1 - pl.col("changed").cast(pl.Float64) / pl.col("numel").cast(pl.Float64)).alias(
                    "sparsity"
                )
            )
            .sort("group", "tolerance", nulls_last=True)
        )

    def total_frame(self) -> pl.DataFrame:
        return self.tensors

    def by(self, level: Any) -> pl.DataFrame:
        """``total`` or ``pair``: every row; ``group``: :meth:`by_group`."""
        if level in ("total", "pair", "tensor"):
            return self.tensors
        if level == "group":
            return self.by_group()
        raise ValueError(f"a survey is broken down by pair or group, not {level}")

    def to_dict(self) -> dict[str, Any]:
        """Rows, groups and every pair's full diff report (design §7)."""
        return {
            "manifest": self.manifest,
            "criterion": self.criterion,
            "tolerance": self.tolerance,
            "rows": self.tensors.to_dicts(),
            "groups": self.by_group().to_dicts(),
            "pairs": self.results,
        }

    #: Columns left out of the terminal table (files keep them).
    table_hidden = ("base", "tuned", "error")

    def plot(self, path: PathArg | None = None, *, dpi: int = 150) -> Any:
        """Sparsity per model, coloured by group (needs matplotlib; paper Figure 1;
        :func:`rlmask.plot.survey_figure`). Written atomically to ``path`` when given.

        Returns:
            The matplotlib Figure.
        """
        from rlmask.plot import survey_figure

        return survey_figure(self, path, dpi=dpi)

    def summary(self) -> str:
        """The survey at a glance: pairs, failures and their messages."""
        n_pairs = self.tensors["name"].n_unique()
        lines = [
            f"survey {self.manifest}: {n_pairs} pairs, {len(self.failed)} failed; "
            f"criterion {self.criterion}"
        ]
        errors = self.tensors.filter(pl.col("status") == "error").unique("name", keep="first")
        for r in errors.sort("name").iter_rows(named=True):
            lines.append(f"failed: {r['name']}: {r['error']}")
        return printable_lines(lines)


def _executor_ray(
    todo: list[Pair], options: DiffOptions, address: str | None, cpus: float
) -> Generator[tuple[Pair, dict[str, Any] | str], None, None]:
    with session(address) as ray:
        for i, out in run_tasks(ray, _ray_task, [(p, options) for p in todo], cpus):
            yield todo[i], out


def _ray_task(pair: Pair, options: DiffOptions) -> dict[str, Any] | str:
    """Runs on a Ray worker: the pair's report, or its error message."""
    try:
        return run_pair(pair, options)
    except RlmaskError as e:
        return f"{type(e).__name__}: {e}"


def _executor_local(
    todo: list[Pair], options: DiffOptions, jobs: int
) -> Generator[tuple[Pair, dict[str, Any] | str], None, None]:
    """Yields each pair's report (or error message) as it finishes. Finished futures are
    handed over through a queue (linear in the number of pairs). Closed early (an exception
    in the caller, Ctrl-C), it cancels what has not started and stops the passes running;
    it must be closed from the caller's thread (``contextlib.closing``), never left to the
    garbage collector, which may run in a worker thread that cannot join its own pool."""

    def one(p: Pair) -> dict[str, Any] | str:
        try:
            return run_pair(p, options)
        except RlmaskError as e:
            return f"{type(e).__name__}: {e}"

    finished: queue.SimpleQueue[Future[dict[str, Any] | str]] = queue.SimpleQueue()
    pool = ThreadPoolExecutor(max(1, jobs), thread_name_prefix="rlmask-survey")
    futures: dict[Future[dict[str, Any] | str], Pair] = {}
    try:
        for p in todo:
            f = pool.submit(one, p)
            futures[f] = p
            f.add_done_callback(finished.put)
        for _ in range(len(futures)):
            while True:
                try:
                    f = finished.get(timeout=0.05)  # short waits: Ctrl-C is seen at once
                    break
                except queue.Empty:
                    continue
            yield futures[f], f.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        if threading.current_thread() in getattr(pool, "_threads", ()):
            raise  # never join a pool from one of its own threads
        with cancel_all():
            pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


def _check_cache(folder: Path) -> None:
    """Fails before any pass when the cache folder cannot be made or written."""
    hint = "choose another with --cache DIR, or run with --no-cache (API: cache='')"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe.", delete=True):
            pass
    except OSError as e:
        raise OutputError(
            f"{folder}: the survey's cache folder cannot be written ({e.strerror or e}); {hint}",
            os.fspath(folder),
        ) from None


#: What a cached entry holds besides the report: the key it was written under, and the
#: SHA-256 of the report's JSON, so a damaged or altered entry is recomputed, never served.
_ENTRY_VERSION = 1


def _entry_text(key: str, report: dict[str, Any]) -> str:
    body = json.dumps(report, sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"version": _ENTRY_VERSION, "key": key, "sha256": digest, "report": report})


def _read_entry(path: Path, key: str, values: Sequence[float]) -> dict[str, Any] | None:
    """The report cached at ``path``, or None (with a warning) when the entry is damaged,
    altered or does not hold the figures asked for: the pair is then computed again."""
    if not path.exists():
        return None
    try:
        raw = read_side_file(path, limit=_ENTRY_LIMIT)
        if raw is None:
            return None
        data = json.loads(raw)
        report = data["report"]
        body = json.dumps(report, sort_keys=True)
        ok = (
            data.get("version") == _ENTRY_VERSION
            and data.get("key") == key
            and data.get("sha256") == hashlib.sha256(body.encode()).hexdigest()
        )
        if ok:
            numel, tols = report["numel"], report["tolerances"]
            changed, sparsity = report["changed"], report["sparsity"]
            ok = (
                type(numel) is int
                and numel >= 0
                and [float(t) for t in tols] == [float(v) for v in values]
                and len(changed) == len(tols) == len(sparsity)
                and all(type(c) is int and 0 <= c <= numel for c in changed)
            )
        if ok:
            return dict(report)
        why = "its key or checksum does not match its contents"
    except (RlmaskError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        why = f"unreadable ({type(e).__name__}: {e})"
    warnings.warn(
        f"{path}: damaged survey cache entry, {why}; computing the pair again",
        RlmaskWarning,
        stacklevel=3,
    )
    return None


def survey(
    manifest: PathArg,
    *,
    tol: float | None = None,
    tolerances: Sequence[float] | None = None,
    criterion: Criterion = "absolute",
    eta: float | None = None,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    ray_cpus_per_pair: float = 1.0,
    cache: PathArg | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    sample: str | float | None = None,
    seed: int = 0,
    on_result: Callable[[Pair, str], None] | None = None,
) -> SurveyReport:
    """Update sparsity of every pair of a manifest (paper Table 1, Table 6, Figure 1).

    Args:
        manifest: a TOML or CSV manifest (see :func:`load_manifest`).
        tol, tolerances, criterion, eta: as in :func:`rlmask.diff`; every tolerance is
            computed in each pair's one pass and gets its own row (the paper's Table 6 sweep is
            :data:`rlmask.DEFAULT_SWEEP`).
        jobs: pairs compared at once by the local executor.
        executor: ``local`` (threads in this process) or ``ray`` (one Ray task per pair, on
            the cluster at ``ray_address``, or a local one started for the survey; every node
            must see the files at the same paths). Results are identical.
        ray_cpus_per_pair: CPUs Ray reserves for each pair's task.
        cache: a directory for per-pair results (default: ``<manifest>.cache`` beside the
            manifest); ``False``-like empty string disables it.
        name_map, skip_mismatched: as in :func:`rlmask.diff`, for every pair (and in the
            cache key).
        sample, seed: estimate every pair from a sample, as :func:`rlmask.diff` does (each
            row then carries ``sparsity_low`` and ``sparsity_high``, its 95% interval).
        on_result: called with each pair and its status (``ok``, ``cached``, ``error``) as it
            finishes.

    Returns:
        A :class:`SurveyReport`; failed pairs have ``status == "error"`` and their message.
    """
    options = DiffOptions.build(
        tol=tol,
        tolerances=tolerances,
        criterion=criterion,
        eta=eta,
        name_map=name_map,
        skip_mismatched=skip_mismatched,
        sample=sample,
        seed=seed,
    )
    return run_survey(
        manifest,
        options,
        jobs=jobs,
        executor=executor,
        ray_address=ray_address,
        ray_cpus_per_pair=ray_cpus_per_pair,
        cache=cache,
        on_result=on_result,
    )


def run_survey(
    manifest: PathArg,
    options: DiffOptions,
    *,
    jobs: int = 1,
    executor: str = "local",
    ray_address: str | None = None,
    ray_cpus_per_pair: float = 1.0,
    cache: PathArg | None = None,
    on_result: Callable[[Pair, str], None] | None = None,
) -> SurveyReport:
    """:func:`survey` with the pairs' diff options built (by :meth:`DiffOptions.build`)."""
    pairs = load_manifest(manifest)
    crit = options.criterion
    values, primary = crit.values, crit.primary
    if executor not in ("local", "ray"):
        raise ValueError(f"unknown executor '{executor}' (local or ray)")
    folder = Path(cache) if cache is not None else Path(f"{os.fspath(manifest)}.cache")
    use_cache = cache != ""
    if use_cache:
        _check_cache(folder)
    results: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    status: dict[str, str] = {}
    keys: dict[str, str] = {}
    todo = []
    for pair in pairs:
        if not use_cache:  # no key to compute: a pair that cannot be read fails in its pass
            todo.append(pair)
            continue
        try:
            keys[pair.name] = _cache_key(pair, options)
        except RlmaskError as e:
            errors[pair.name] = f"{type(e).__name__}: {e}"
            status[pair.name] = "error"
            continue
        key = keys[pair.name]
        cached = _read_entry(folder / f"{key}.json", key, values)
        if cached is not None:
            results[pair.name] = cached
            status[pair.name] = "cached"
        else:
            todo.append(pair)
    for pair in pairs:
        if pair.name in status and on_result is not None:
            on_result(pair, status[pair.name])
    runs = (
        _executor_ray(todo, options, ray_address, ray_cpus_per_pair)
        if executor == "ray"
        else _executor_local(todo, options, jobs)
    )
    with contextlib.closing(runs):
        for pair, out in runs:
            if isinstance(out, str):
                errors[pair.name] = out
                status[pair.name] = "error"
            else:
                results[pair.name] = out
                status[pair.name] = "ok"
                if use_cache:
                    key = keys[pair.name]
                    write_text_atomic(folder / f"{key}.json", _entry_text(key, out))
            if on_result is not None:
                on_result(pair, status[pair.name])
    rows: list[tuple[Pair, float, int | None, int | None, float | None, str, str | None]] = []
    for pair in pairs:
        if pair.name in results:
            r = results[pair.name]
            for t, c, s in zip(r["tolerances"], r["changed"], r["sparsity"], strict=True):
                rows.append((pair, t, r["numel"], c, s, status[pair.name], None))
        else:
            for t in values:
                rows.append((pair, t, None, None, None, "error", errors[pair.name]))
    # A sampled survey: each pair's 95% interval of the sparsity, per tolerance.
    if options.sample is not None:
        bounds = {
            name: dict(zip(r["tolerances"], r["sample"]["ci95"], strict=True))
            for name, r in results.items()
        }
        interval = [bounds.get(p.name, {}).get(t, (None, None)) for p, t, *_ in rows]
    df = pl.DataFrame(
        {
            "name": [p.name for p, *_ in rows],
            "group": [p.group for p, *_ in rows],
            "base": [p.base for p, *_ in rows],
            "tuned": [p.tuned for p, *_ in rows],
            "tolerance": [r[1] for r in rows],
            "numel": [r[2] for r in rows],
            "changed": [r[3] for r in rows],
            "sparsity": [r[4] for r in rows],
            "status": [r[5] for r in rows],
            "error": [r[6] for r in rows],
        },
        schema={
            "name": pl.Utf8,
            "group": pl.Utf8,
            "base": pl.Utf8,
            "tuned": pl.Utf8,
            "tolerance": pl.Float64,
            "numel": pl.UInt64,
            "changed": pl.UInt64,
            "sparsity": pl.Float64,
            "status": pl.Utf8,
            "error": pl.Utf8,
        },
    )
    if options.sample is not None:
        df = df.with_columns(
            pl.Series("sparsity_low", [x[0] for x in interval], dtype=pl.Float64),
            pl.Series("sparsity_high", [x[1] for x in interval], dtype=pl.Float64),
        )
    return SurveyReport(os.fspath(manifest), cast(Criterion, crit.name), df, primary, results)


__all__ = ["Pair", "SurveyReport", "load_manifest", "survey"]
