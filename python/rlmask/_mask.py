"""Subnetwork masks (paper §1, Conjecture 1; design §3): one packed bit per element, saved as
``.rlmask`` files that any safetensors + numpy user can read without rlmask.

File format: a safetensors file with one U8 tensor per masked tensor (same name, shape
``[nbytes]``, bits LSB-first: element ``i`` at byte ``i >> 3``, bit ``i & 7``; payload padded
to a multiple of 8 bytes) and string metadata: ``format=rlmask``, ``version``,
``bitorder=little``, provenance (criterion, tolerance, checkpoints, or the operation that made
it) and ``tensors``, a JSON object mapping each name to its original ``shape``, ``dtype`` and
``numel``. Read one without rlmask::

    from safetensors.numpy import load_file
    meta = json.loads(safe_open(path, "np").metadata()["tensors"])
    bits = numpy.unpackbits(load_file(path)[name], bitorder="little",
                            count=meta[name]["numel"]).reshape(meta[name]["shape"])
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._lazy import LazyModule
from rlmask._names import layer_of, module_of, natural_sorted
from rlmask._report import few, printable_lines, ratio, sort_modules
from rlmask.errors import MaskError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import polars as pl
    import torch
else:
    np = LazyModule("numpy")
    pl = LazyModule("polars")


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: str
    numel: int
    packed: npt.NDArray[np.uint8]


def padded_len(numel: int) -> int:
    """Bytes of a packed mask of ``numel`` elements: whole little-endian u64 words."""
    return (numel + 63) // 64 * 8


def pack(bits: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Packs a boolean array (any shape, C order) LSB-first into ``padded_len`` bytes."""
    flat = np.asarray(bits, dtype=bool).reshape(-1)
    out = np.zeros(padded_len(flat.size), dtype=np.uint8)
    packed = np.packbits(flat, bitorder="little")
    out[: packed.size] = packed
    return out


class Mask:
    """A subnetwork mask: for each tensor, which elements are in the subnetwork.

    Masks come from :func:`rlmask.diff` (``mask=True`` or ``save_mask=``), from
    :func:`load_mask` (memory-mapped and lazy: nothing is read until asked for), or from the
    user's own arrays with :meth:`from_dict`. They combine with ``&``, ``|``, ``^``, ``-``
    (set difference) and ``~``, and with :func:`consensus`; every result records how it was
    made in :attr:`meta`.

    Example:
        >>> m = rlmask.load_mask("grpo.rlmask")
        >>> m.density, m.count, m.names[:3]
        >>> m["model.layers.0.self_attn.q_proj.weight"]   # numpy bool array, original shape
        >>> shared = m & rlmask.load_mask("dpo.rlmask")
    """

    def __init__(
        self,
        entries: Mapping[str, _Entry],
        meta: Mapping[str, str],
        files: Sequence[_rlmask.MaskFile] = (),
    ) -> None:
        self._entries = {n: entries[n] for n in natural_sorted(entries)}
        self._meta = dict(meta)
        self._counts: dict[str, int] | None = None
        # The mapped files the packed bits view, checked after every read of them.
        self._files = tuple(files)

    def verify(self) -> None:
        """Raises :class:`~rlmask.errors.CheckpointChangedError` when a file this mask maps was
        truncated or rewritten since it was opened (what was read from it cannot be trusted).
        Every figure rlmask computes from a loaded mask is checked this way."""
        for f in self._files:
            f.verify()

    # ----- construction --------------------------------------------------------------------

    @classmethod
    def from_dict(cls, arrays: Mapping[str, Any], meta: Mapping[str, str] | None = None) -> Mask:
        """A mask from ``{name: boolean array or torch tensor}`` (nonzero means in the mask)."""
        entries = {}
        for name, value in arrays.items():
            if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
                value = value.detach().cpu().numpy()
            a = np.asarray(value)
            entries[name] = _Entry(tuple(a.shape), str(a.dtype), a.size, pack(a != 0))
        return cls(entries, {"source": "from_dict", **(meta or {})})

    @classmethod
    def from_packed(
        cls,
        tensors: Mapping[str, tuple[Sequence[int], str, npt.NDArray[np.uint8]]],
        meta: Mapping[str, str] | None = None,
    ) -> Mask:
        """A mask from already packed bits: ``{name: (shape, dtype, packed)}``, each ``packed`` a
        1-D uint8 array of ``ceil(numel / 8)`` bytes (as ``np.packbits(..., bitorder="little")``
        gives) or of whole u64 words (the ``.rlmask`` layout), LSB-first, with no bit set past
        ``numel``.

        Raises:
            MaskError: naming the tensor: a shape that is not whole numbers, a packed array
                that is not 1-D uint8, of another length (an unpacked array is 8 times too
                long), or with bits set past the tensor's end.
        """
        entries = {}
        for name, (shape, dtype, packed) in tensors.items():
            if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
                raise MaskError(f"tensor '{name}': shape {list(shape)} is not whole numbers")
            numel = math.prod(int(d) for d in shape)
            packed = np.asarray(packed)
            if packed.ndim != 1 or packed.dtype != np.uint8:
                raise MaskError(
                    f"tensor '{name}': packed bits must be a 1-D uint8 array, not "
                    f"{packed.ndim}-D {packed.dtype}"
                )
            tight, words = (numel + 7) // 8, padded_len(numel)
            if packed.size not in (tight, words):
                raise MaskError(
                    f"tensor '{name}': {packed.size:,} packed bytes for {numel:,} elements "
                    f"(expected {tight:,}, or {words:,} in whole words"
                    + ("; is the array unpacked?" if packed.size >= numel > 8 else "")
                    + ")"
                )
            if packed.size < words:
                packed = np.concatenate([packed, np.zeros(words - packed.size, np.uint8)])
            if (numel % 8 and packed[numel // 8] >> (numel % 8)) or packed[tight:].any():
                raise MaskError(f"tensor '{name}': bits are set past its {numel:,} elements")
            entries[name] = _Entry(tuple(int(d) for d in shape), dtype, numel, packed)
        return cls(entries, dict(meta or {}))

    @classmethod
    def random_like(
        cls,
        mask: Mask,
        base: PathArg | None = None,
        *,
        seed: int = 0,
        name_map: Mapping[str, str] | None = None,
    ) -> Mask:
        """A control mask: for every tensor of ``mask``, as many elements as ``mask`` holds
        there, chosen uniformly at random (seeded: the same seed gives the same mask). With
        ``base`` (the checkpoint the mask was taken against), the count is kept per tensor and
        per binade of the base value (the magnitude lens's binades, design §8): the
        magnitude-matched control of Conjecture 1 and of overlaps.

        Raises:
            MaskError: ``base`` lacks a tensor of the mask, or holds it in another shape, or
                in a dtype whose binades are not read here (BF16, F16, F32, F64 are).
        """
        rng = np.random.default_rng(seed)
        ckpt = None
        stored: dict[str, str] = {}
        if base is not None:
            from rlmask._resolve import resolve_checkpoint

            ckpt = _rlmask.Checkpoint(resolve_checkpoint(base))
            pairs = list((name_map or {}).items())
            stored = {_rlmask.canonical_name(n, pairs): n for n in ckpt.names()}
        entries = {}
        for name in mask.names:
            numel, keep = mask.numel_of(name), mask[name].reshape(-1)
            out = np.zeros(numel, dtype=bool)
            if ckpt is None:
                out[rng.choice(numel, int(keep.sum()), replace=False)] = True
            else:
                exps = _binades(ckpt, stored, name, numel, os.fspath(base or ""))
                wanted = np.bincount(exps[keep], minlength=256)
                for b in np.flatnonzero(wanted):
                    where = np.flatnonzero(exps == b)
                    out[rng.choice(where, int(wanted[b]), replace=False)] = True
            entries[name] = _Entry(mask.shape(name), mask.dtype(name), numel, pack(out))
        meta = {
            "source": "random_like",
            "like": mask.describe(),
            "seed": str(seed),
            "matched": "per tensor and binade of " + os.fspath(base) if base else "per tensor",
        }
        if "base" in mask.meta:
            meta["base"] = mask.meta["base"]
        return cls(entries, meta)

    # ----- reading -------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names, in natural order (``layers.2`` before ``layers.10``)."""
        return list(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no tensor '{name}' in this mask") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The original shape of tensor ``name``."""
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The dtype of the tensor the mask was taken from (e.g. ``BF16``)."""
        return self._entry(name).dtype

    def numel_of(self, name: str) -> int:
        """Elements of tensor ``name``."""
        return self._entry(name).numel

    def packed(self, name: str) -> npt.NDArray[np.uint8]:
        """The packed bits of ``name`` (LSB-first, padded to 8 bytes), without copying: for a
        loaded mask, a read-only view of the mapped file."""
        return self._entry(name).packed

    def __getitem__(self, name: str) -> npt.NDArray[np.bool_]:
        """The mask of ``name`` as a numpy bool array in the tensor's shape."""
        e = self._entry(name)
        bits = np.unpackbits(e.packed, bitorder="little", count=e.numel)
        return bits.view(np.bool_).reshape(e.shape)

    def items(self) -> Iterator[tuple[str, npt.NDArray[np.bool_]]]:
        """``(name, bool array)`` for every tensor."""
        for name in self._entries:
            yield name, self[name]

    def to_torch(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """The mask of ``name`` as a torch bool tensor on ``device`` (needs torch)."""
        import torch

        return torch.from_numpy(self[name]).to(device)

    @property
    def meta(self) -> dict[str, str]:
        """Provenance and format metadata (a copy)."""
        return dict(self._meta)

    def counts(self) -> dict[str, int]:
        """Elements in the mask, per tensor (computed once, in parallel, in the core)."""
        if self._counts is None:
            entries = list(self._entries.values())
            counts = _rlmask.mask_count([e.packed for e in entries], [e.numel for e in entries])
            self.verify()
            self._counts = dict(zip(self._entries, counts, strict=True))
        return dict(self._counts)

    @property
    def numel(self) -> int:
        """Elements covered, over every tensor."""
        return sum(e.numel for e in self._entries.values())

    @property
    def count(self) -> int:
        """Elements in the mask (the subnetwork's size), over every tensor."""
        return sum(self.counts().values())

    @property
    def density(self) -> float:
        """``count / numel``: the share of elements in the subnetwork (1 - update sparsity)."""
        return self.count / self.numel if self.numel else 0.0

    def table(self) -> pl.DataFrame:
        """One row per tensor: name, layer, module, dtype, shape, numel, count, density."""
        counts = self.counts()
        rows = [
            {
                "name": n,
                "layer": layer_of(n),
                "module": module_of(n),
                "dtype": e.dtype,
                "shape": list(e.shape),
                "numel": e.numel,
                "count": counts[n],
            }
            for n, e in self._entries.items()
        ]
        schema: dict[str, Any] = {
            "name": pl.Utf8,
            "layer": pl.Int64,
            "module": pl.Utf8,
            "dtype": pl.Utf8,
            "shape": pl.List(pl.Int64),
            "numel": pl.UInt64,
            "count": pl.UInt64,
        }
        df = pl.DataFrame(rows, schema=schema)
        return df.with_columns(ratio("count", "numel").alias("density"))

    def _group(self, key: str) -> pl.DataFrame:
        return (
            self.table()
            .filter(pl.col(key).is_not_null())
            .group_by(key)
            .agg(pl.len().alias("tensors"), pl.col("numel").sum(), pl.col("count").sum())
            .with_columns(ratio("count", "numel").alias("density"))
        )

    def by_module(self) -> pl.DataFrame:
        """Tensors, numel, count and density (null for no elements) per module type."""
        return sort_modules(self._group("module"))

    def by_layer(self) -> pl.DataFrame:
        """Tensors, numel, count and density (null for no elements) per transformer layer."""
        return self._group("layer").sort("layer")

    def summary(self) -> str:
        """Provenance and totals, as ``rlmask mask info`` prints them."""
        lines = [
            f"{len(self)} tensors, {self.numel:,} elements, {self.count:,} in the mask "
            f"(density {100 * self.density:.3f}%)"
        ]
        skip = {"tensors"}
        for k, v in sorted(self._meta.items()):
            if k not in skip:
                lines.append(f"  {k}: {v}")
        return printable_lines(lines)

    def __repr__(self) -> str:
        return f"<Mask: {len(self)} tensors, {self.numel:,} elements, density {self.density:.4f}>"

    def _repr_html_(self) -> str:
        """In a notebook: the summary, then the per-module table."""
        from html import escape

        return f"<b>Mask</b><pre>{escape(self.summary())}</pre>" + self.by_module()._repr_html_()

    # ----- writing -------------------------------------------------------------------------

    def save(self, path: PathArg) -> None:
        """Writes the mask to ``path`` (conventionally ``*.rlmask``), atomically. The core adds
        the format keys and the ``tensors`` description (design §3) to :attr:`meta`."""
        names = list(self._entries)
        entries = [self._entries[n] for n in names]
        provenance = {k: v for k, v in self._meta.items() if k not in ("path", "tensors")}
        _rlmask.write_mask(
            os.fspath(path),
            names,
            [np.ascontiguousarray(e.packed) for e in entries],
            [e.numel for e in entries],
            [list(e.shape) for e in entries],
            [e.dtype for e in entries],
            provenance,
        )
        try:
            self.verify()
        except BaseException:
            os.unlink(path)  # written from a source that changed under it: take it back
            raise

    # ----- algebra -------------------------------------------------------------------------

    def _combine(self, op: _rlmask.CombineOp, others: Sequence[Mask]) -> Mask:
        masks = [self, *others]
        _check_compatible(masks, common_only=False)
        names = self.names
        packed = _rlmask.mask_combine(
            op,
            [[m._entries[n].packed for m in masks] for n in names],
            [self._entries[n].numel for n in names],
        )
        for m in masks:
            m.verify()
        entries = {
            n: _Entry(self._entries[n].shape, self._entries[n].dtype, self._entries[n].numel, p)
            for n, p in zip(names, packed, strict=True)
        }
        meta = {"op": op.name, "inputs": json.dumps([m.describe() for m in masks])}
        if op.min_count is not None:
            meta["min_count"] = str(op.min_count)
        return Mask(entries, meta)

    def describe(self) -> str:
        """A one-line account of where the mask came from (used as provenance)."""
        m = self._meta
        if "path" in m:
            return m["path"]
        if "op" in m:
            return f"{m['op']}({', '.join(json.loads(m['inputs']))})"
        if "base" in m and "tuned" in m:
            return f"diff({m['base']}, {m['tuned']}, {m.get('criterion')}={m.get('tolerance')})"
        return m.get("source", "mask")

    def __and__(self, other: Mask) -> Mask:
        return combine("and", [self, other])

    def __or__(self, other: Mask) -> Mask:
        return combine("or", [self, other])

    def __xor__(self, other: Mask) -> Mask:
        return combine("xor", [self, other])

    def __sub__(self, other: Mask) -> Mask:
        return combine("minus", [self, other])

    def __invert__(self) -> Mask:
        return combine("not", [self])


def _check_compatible(masks: Sequence[Mask], *, common_only: bool) -> list[str]:
    """The tensor names every mask covers with the same shape; raises :class:`MaskError`
    naming the differences unless ``common_only``."""
    first = masks[0]
    problems = []
    common = set(first.names)
    for i, m in enumerate(masks[1:], start=2):
        only_first = sorted(set(first.names) - set(m.names))
        only_other = sorted(set(m.names) - set(first.names))
        if only_first:
            problems.append(f"{len(only_first)} tensors only in mask 1 ({_few(only_first)})")
        if only_other:
            problems.append(f"{len(only_other)} tensors only in mask {i} ({_few(only_other)})")
        common &= set(m.names)
        shapes = [
            f"'{n}' {list(first.shape(n))} in mask 1, {list(m.shape(n))} in mask {i}"
            for n in natural_sorted(set(first.names) & set(m.names))
            if first.shape(n) != m.shape(n)
        ]
        if shapes:
            problems.append(f"{len(shapes)} tensors differ in shape ({few(shapes, 3)})")
            common -= {n for n in set(first.names) & set(m.names) if first.shape(n) != m.shape(n)}
    if problems and not common_only:
        bases = {b for m in masks if (b := m.meta.get("base")) is not None}
        origin = (
            f"; the masks record different bases ({few(sorted(bases), 3)}): they may come from "
            "different models"
            if len(bases) > 1
            else ""
        )
        raise MaskError(
            "masks cover different tensors: "
            + "; ".join(problems)
            + origin
            + " (pass common_only=True / --common-only to use the shared tensors)"
        )
    return natural_sorted(common)


def _few(names: list[str]) -> str:
    return few(names, 3)


def _binades(
    ckpt: _rlmask.Checkpoint, stored: Mapping[str, str], name: str, numel: int, where: str
) -> npt.NDArray[np.int64]:
    """The binade of every base value of tensor ``name``: the exponent field of ``|a|``
    widened to f32 (0 for zero and subnormals, 255 for infinities and NaN; F64 rebiased and
    clamped), as the magnitude lens counts them."""
    s = stored.get(name)
    if s is None:
        raise MaskError(
            f"{where}: the base has no tensor '{name}' that the mask covers (pass the "
            "checkpoint the mask was taken against, or name_map)",
            where,
            name,
        )
    info = ckpt.tensor_info(s)
    if info.numel != numel:
        raise MaskError(
            f"{where}: tensor '{name}' has {info.numel:,} elements in the base, {numel:,} in "
            "the mask",
            where,
            name,
        )
    raw = ckpt.raw(s)
    if info.dtype == "BF16":
        bits = raw.view(np.uint16).astype(np.uint32) << 16
    elif info.dtype == "F16":
        bits = raw.view(np.float16).astype(np.float32).view(np.uint32)
    elif info.dtype == "F32":
        bits = raw.view(np.uint32)
    elif info.dtype == "F64":
        e = (raw.view(np.uint64) >> 52).astype(np.int64) & 0x7FF
        out = np.clip(e - 1023 + 127, 0, 255)
        return np.where(e == 0x7FF, 255, np.where(e == 0, 0, out)).astype(np.int64)
    else:
        raise MaskError(
            f"{where}: tensor '{name}' is {info.dtype}; matched controls read BF16, F16, F32 and "
            "F64 base values",
            where,
            name,
        )
    return ((bits >> 23) & 0xFF).astype(np.int64)


def combine(op: str, masks: Sequence[Mask], min_count: int | None = None) -> Mask:
    """Combines masks element by element: ``and``, ``or``, ``xor`` (over all of them),
    ``minus`` (in the first and none of the others), ``not`` (the complement of one mask),
    ``consensus`` (in at least ``min_count`` of them; see :func:`consensus`).

    Raises:
        ValueError: an unknown operation, or the wrong number of masks or ``min_count``.
        MaskError: the masks cover different tensors or shapes.

    Example:
        >>> shared = rlmask.combine("consensus", [seed1, seed2, seed3], min_count=2)
    """
    parsed = _rlmask.CombineOp(op, len(masks), min_count)
    return masks[0]._combine(parsed, masks[1:])


def consensus(masks: Sequence[Mask], min_count: int) -> Mask:
    """Elements set in at least ``min_count`` of the masks: the subnetwork shared across seeds,
    data or algorithms (``min_count=len(masks)`` is the intersection, 1 the union)."""
    return combine("consensus", masks, min_count)


def load_mask(path: PathArg) -> Mask:
    """Opens a ``.rlmask`` file, memory-mapped: tensors are read only when asked for. The core
    validates the whole file first (format, version, bit order, every tensor's shape, numel and
    packed length).

    Raises:
        MaskError: the file cannot be read or is not a valid rlmask mask (``e.path`` names it,
            ``e.tensor`` the tensor at fault).
    """
    where = os.fspath(path)
    f = _rlmask.MaskFile(where)
    entries = {
        t.name: _Entry(tuple(t.shape), t.dtype, t.numel, f.packed(t.name)) for t in f.tensors()
    }
    return Mask(entries, {**f.metadata(), "path": where}, files=[f])
