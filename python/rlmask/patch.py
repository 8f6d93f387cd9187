"""Sparse patches: ship a step's changes losslessly (design §9).

A patch turns checkpoint B into checkpoint C bit for bit: per changed tensor the flat indices
of the elements whose bits differ and C's values there (or C's whole tensor where that is
smaller), with the fingerprint of every tensor before and after, so that a patch applied
to another base, a corrupt patch, or a chain with a patch missing, repeated or out of order is
refused, naming the tensor. The file is plain safetensors: ``safetensors`` and torch alone can
read and apply it (see the README's ten-line snippet)::

    >>> import rlmask.patch
    >>> info = rlmask.patch.create("step-100/", "step-200/", "200.rlpatch")
    >>> info.changed, info.bytes                      # elements changed, patch size
    >>> rlmask.patch.apply("step-100/", ["200.rlpatch"], "rebuilt-200/")
    >>> rlmask.patch.verify("step-100/", "200.rlpatch", "step-200/")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from rlmask import _rlmask
from rlmask._io import PathArg, check_not_input, check_output, write_atomic
from rlmask._names import layer_of, module_of, natural_key
from rlmask._progress import progress_wanted, run_with_progress
from rlmask._report import Report, few, printable_lines, ratio, sort_modules
from rlmask._resolve import resolve_checkpoint
from rlmask._rlmask import __version__
from rlmask.errors import CheckpointFormatError, PairingError

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "PatchInfo",
    "apply",
    "apply_in_place",
    "changes",
    "convert",
    "create",
    "load",
    "read_trl",
    "read_vllm",
    "records",
    "recover",
    "tensor_entry",
    "verify",
    "vllm_patches",
    "write_plain",
]

#: The codecs of sparse tensors in a patch (design §9).
CODECS = _rlmask.PATCH_CODECS
#: What ``create`` and ``rlmask patch create`` write unless told (chosen from the sizes
#: and speeds in ``bench/RESULTS.md``).
DEFAULT_CODEC = _rlmask.DEFAULT_PATCH_CODEC


@dataclass(frozen=True, repr=False)
class PatchInfo(Report):
    """What a patch holds.

    Attributes:
        path: the patch file.
        tensors: one row per tensor of the checkpoint it applies to: name, layer, module,
            dtype, shape, numel, changed, form (``none``, ``sparse``: plain indices and values,
            ``compact``: compact frames, ``dense``: stored whole), base and tuned
            (fingerprints of the tensor's bytes before and after).
        stored: bytes stored, by kind: ``indices`` and ``values`` (plain codec), ``compact``
            (compact codec: frames and their table), ``dense`` (tensors stored whole).
        bytes: the size of the patch file.
        metadata: the file's ``__metadata__`` (format, version, codec, provenance).
        codec: ``plain`` or ``compact``: how the changes of sparse tensors are stored.
        plain_bytes: what the same changes take in the plain codec (indices and values, dense
            tensors whole): the bytes a trainer's plain sync of them would send.
    """

    path: str
    tensors: pl.DataFrame
    stored: dict[str, int]
    bytes: int
    metadata: dict[str, str]
    codec: str
    plain_bytes: int

    @property
    def numel(self) -> int:
        """Elements of the checkpoint the patch applies to."""
        return int(self.tensors["numel"].sum())

    @property
    def changed(self) -> int:
        """Elements the patch changes."""
        return int(self.tensors["changed"].sum())

    @property
    def bytes_per_changed(self) -> float | None:
        """Patch bytes per changed element (6 for sparse bf16 with int32 indices)."""
        return self.bytes / self.changed if self.changed else None

    def _group(self, key: str | None) -> pl.DataFrame:
        aggs = [pl.len().alias("tensors"), pl.col("numel").sum(), pl.col("changed").sum()]
        df = (
            self.tensors.select(aggs)
            if key is None
            else self.tensors.filter(pl.col(key).is_not_null()).group_by(key).agg(aggs)
        )
        return df.with_columns(ratio("changed", "numel").alias("density"))

    def total_frame(self) -> pl.DataFrame:
        """Tensors, elements, changed elements and their density, as one row."""
        return self._group(None)

    def by_layer(self) -> pl.DataFrame:
        """The same per transformer layer."""
        return self._group("layer").sort("layer")

    def by_module(self) -> pl.DataFrame:
        """The same per module type."""
        return sort_modules(self._group("module"))

    def to_dict(self) -> dict[str, Any]:
        """The patch's description as plain Python values."""
        return {
            "path": self.path,
            "bytes": self.bytes,
            "codec": self.codec,
            "plain_bytes": self.plain_bytes,
            "stored": dict(self.stored),
            "numel": self.numel,
            "changed": self.changed,
            "metadata": {k: v for k, v in self.metadata.items() if k != "tensors"},
            "tensors": self.tensors.to_dicts(),
        }

    def summary(self) -> str:
        """A short human-readable account."""
        t = self.tensors
        forms = {
            f: t.filter(pl.col("form") == f).height for f in ("sparse", "compact", "dense", "none")
        }
        per = self.bytes_per_changed
        lines = [
            f"patch: {self.path} ({self.bytes:,} bytes, {self.codec} codec"
            + (f", {per:.2f} bytes per changed element)" if per is not None else ")"),
            f"changes {self.changed:,} of {self.numel:,} elements "
            f"({100 * self.changed / self.numel if self.numel else 0:.3f}%) in "
            f"{t.height - forms['none']} of {t.height} tensors "
            f"({forms['compact']} compact, {forms['sparse']} plain indices and values, "
            f"{forms['dense']} stored whole)",
            "stored: " + ", ".join(f"{k} {v:,} bytes" for k, v in self.stored.items() if v),
        ]
        if self.codec != "plain" and self.plain_bytes:
            lines.append(
                f"the same changes in the plain codec: {self.plain_bytes:,} bytes "
                f"({self.plain_bytes / max(self.bytes, 1):.2f}x this patch)"
            )
        for key in ("base", "tuned"):
            if key in self.metadata:
                lines.append(f"made from {key}: {self.metadata[key]}")
        dense = t.filter(pl.col("form") == "dense")["name"].to_list()
        if dense:
            lines.append(f"stored whole (denser than worth indexing): {few(dense)}")
        return printable_lines(lines)


def _info(path: str, entries: list[_rlmask.PatchEntry], size: int, f: Any) -> PatchInfo:
    rows = sorted(entries, key=lambda e: natural_key(e.name))
    frame = pl.DataFrame(
        {
            "name": [e.name for e in rows],
            "layer": [layer_of(e.name) for e in rows],
            "module": [module_of(e.name) for e in rows],
            "dtype": [e.dtype for e in rows],
            "shape": [e.shape for e in rows],
            "numel": [math.prod(e.shape) for e in rows],
            "changed": [e.changed for e in rows],
            "form": [e.form for e in rows],
            "base": [e.base for e in rows],
            "tuned": [e.tuned for e in rows],
        },
        schema={
            "name": pl.Utf8,
            "layer": pl.Int64,
            "module": pl.Utf8,
            "dtype": pl.Utf8,
            "shape": pl.List(pl.Int64),
            "numel": pl.UInt64,
            "changed": pl.UInt64,
            "form": pl.Utf8,
            "base": pl.Utf8,
            "tuned": pl.Utf8,
        },
    )
    meta = {k: v for k, v in f.metadata().items() if k != "tensors"}
    return PatchInfo(path, frame, f.stored_bytes(), size, meta, f.codec, f.plain_bytes())


def load(path: PathArg) -> PatchInfo:
    """Opens a patch and describes it (validated: format, version, every tensor's entry).

    Raises:
        CheckpointFormatError: not a valid rlmask patch (``e.tensor`` names the tensor).
    """
    where = os.fspath(path)
    f = _rlmask.PatchFile(where)
    return _info(where, f.entries(), Path(where).stat().st_size, f)


def create(
    base: PathArg,
    tuned: PathArg,
    out: PathArg,
    *,
    name_map: Mapping[str, str] | None = None,
    codec: str = DEFAULT_CODEC,
    progress: bool = True,
) -> PatchInfo:
    """Writes the patch that turns ``base`` into ``tuned`` to ``out`` (conventionally
    ``*.rlpatch``), atomically, in one streaming pass with flat memory.

    Args:
        base, tuned: checkpoints in any form :func:`rlmask.diff` accepts; they must hold the
            same tensors (names pair as in :func:`rlmask.diff`) with the same shapes and dtypes.
        out: the patch file.
        name_map: prefix translations applied to both sides' names before pairing.
        codec: ``plain`` (int32/int64 flat indices and the new values, the form TRL, vLLM
            and prime-rl exchange; 6 bytes per changed bf16 element) or ``compact`` (gaps as
            varints and the values' byte planes under zstd; see ``bench/RESULTS.md`` for the
            sizes). Every reader here (apply, verify, :func:`records`, the torch side)
            decodes both.
        progress: a progress bar on stderr when it is a terminal.

    Raises:
        PairingError: the checkpoints hold different tensors.
        TensorMismatchError: a tensor's shape or dtype differs.
        OutputError: ``out`` cannot be written (checked before any data is read).
    """
    check_output(out)
    check_not_input(out, [base, tuned])
    a = _rlmask.Checkpoint(resolve_checkpoint(base))
    b = _rlmask.Checkpoint(resolve_checkpoint(tuned))
    provenance = {
        "source": "patch",
        "base": os.fspath(base),
        "tuned": os.fspath(tuned),
        "rlmask_version": __version__,
    }
    entries, size = run_with_progress(
        lambda watch: _rlmask.patch_create(
            a,
            b,
            os.fspath(out),
            codec=codec,
            name_map=list((name_map or {}).items()),
            provenance=provenance,
            progress=watch,
        ),
        show=progress_wanted(progress),
        desc="patching",
    )
    return _info(os.fspath(out), entries, size, _rlmask.PatchFile(os.fspath(out)))


def apply(
    base: PathArg,
    patches: PathArg | Sequence[PathArg],
    out: PathArg,
    *,
    progress: bool = True,
) -> Path:
    """Applies ``patches`` in order to ``base`` and writes the result as the checkpoint
    directory ``out`` (it must not exist, or be empty): ``base``'s shards, headers, index and
    other files (config, tokenizer), every tensor patched and bit-identical to what the last
    patch was made from. ``base`` is never modified; ``out`` appears complete or not at all.

    Raises:
        PairingError: a patch made from another base, or a chain with a patch missing,
            repeated or out of order (naming the tensor).
        CheckpointFormatError: a corrupt patch.
        OutputError: ``out`` exists and is not empty, or cannot be written.
    """
    paths = [patches] if isinstance(patches, (str, os.PathLike)) else list(patches)
    check_not_input(out, [base, *paths])
    files = [_rlmask.PatchFile(os.fspath(p)) for p in paths]
    a = _rlmask.Checkpoint(resolve_checkpoint(base))
    run_with_progress(
        lambda watch: _rlmask.patch_apply(a, files, os.fspath(out), progress=watch),
        show=progress_wanted(progress),
        desc="applying",
    )
    return Path(out)


def apply_in_place(
    checkpoint: PathArg, patches: PathArg | Sequence[PathArg], *, progress: bool = True
) -> Path:
    """Applies ``patches`` in order to the checkpoint directory ``checkpoint`` where it lies,
    rewriting only the pieces of its shards that a patch changes (design §9).

    The directory must be exactly the first patch's base (every tensor's fingerprint is
    checked, and every patch's promise, before anything is written). Crash-safe: the old bytes
    of every changed element go to an undo journal (``.rlmask-apply.journal`` in the
    directory, synced) before the first byte of a shard is written; a crash or failure after
    that leaves the journal, every command refuses the directory until :func:`recover` (``rlmask
    patch recover``) writes the old bytes back, and the old weights are checked by their
    fingerprints. A failure while writing rolls back at once. Readers that map the shards while
    they are updated (a serving engine) see the change as it is written.

    Raises:
        PairingError: the directory is not the patch's base, or a chain with a patch missing,
            repeated or out of order.
        CheckpointFormatError: a corrupt patch.
        CheckpointChangedError: an interrupted apply's journal is in the directory.
        OutputError: a shard cannot be written.
    """
    paths = [patches] if isinstance(patches, (str, os.PathLike)) else list(patches)
    files = [_rlmask.PatchFile(os.fspath(p)) for p in paths]
    a = _rlmask.Checkpoint(resolve_checkpoint(checkpoint))
    run_with_progress(
        lambda watch: _rlmask.patch_apply_in_place(a, files, progress=watch),
        show=progress_wanted(progress),
        desc="applying in place",
    )
    return Path(checkpoint)


def recover(checkpoint: PathArg) -> int:
    """Undoes an interrupted :func:`apply_in_place` of the directory ``checkpoint``: writes
    back the old bytes its journal holds, checks every restored tensor's fingerprint, removes
    the journal. Returns the tensors restored (0 when there was no journal: an apply stopped
    before its journal was in place had written nothing).

    Raises:
        CheckpointChangedError: a damaged journal, or a tensor without its old fingerprint.
    """
    where = os.fspath(checkpoint)
    folder = where if os.path.isdir(where) else os.path.dirname(where) or "."
    return _rlmask.patch_recover(folder)


def verify(
    base: PathArg,
    patch: PathArg,
    tuned: PathArg | None = None,
    *,
    progress: bool = True,
) -> None:
    """Checks, writing nothing, that ``patch`` applies to ``base`` and gives the tensors it
    promises, and when ``tuned`` is given that those are ``tuned``'s.

    Raises:
        PairingError: the patch was made from another base, or does not give ``tuned``.
        CheckpointFormatError: a corrupt patch.
    """
    f = _rlmask.PatchFile(os.fspath(patch))
    a = _rlmask.Checkpoint(resolve_checkpoint(base))
    c = None if tuned is None else _rlmask.Checkpoint(resolve_checkpoint(tuned))
    run_with_progress(
        lambda watch: _rlmask.patch_verify(a, f, c, progress=watch),
        show=progress_wanted(progress),
        desc="verifying",
    )


# --------------------------------------------------------------------------------------------
# The formats the RL stack already speaks (need torch)


def _host_bytes(t: Any) -> Any:
    """A torch tensor's raw bytes on the host (one transfer), as a flat uint8 array."""
    import torch

    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).cpu().numpy()


def _fingerprint(t: Any) -> str:
    """The patch format's fingerprint of a torch tensor's bytes."""
    return _rlmask.fingerprint(_host_bytes(t))


def _has_fingerprint(t: Any, print: str) -> bool:
    """Whether a torch tensor's bytes have the fingerprint ``print`` (in the scheme it is
    written in: BLAKE3 in patches of version 1)."""
    return _rlmask.fingerprint_matches(_host_bytes(t), print)


def tensor_entry(key: str, old: Any, new: Any, stored: dict[str, Any]) -> dict[str, Any]:
    """The patch entry of one tensor (design §9) from its ``old`` and ``new`` state, adding
    what the patch stores for it to ``stored`` (host tensors): the elements whose bits differ
    are found on the tensors' device; the dense form where it is no larger."""
    import torch

    from rlmask.torch._common import _bits_view
    from rlmask.torch.dtypes import _SAFETENSORS_DTYPE

    flat_new, flat_old = new.reshape(-1), old.reshape(-1)
    idx = torch.nonzero(_bits_view(flat_new) != _bits_view(flat_old)).reshape(-1)
    n, numel = int(idx.numel()), flat_new.numel()
    wide = numel > 2**31
    form, before = "none", _fingerprint(old)
    if n and n * ((8 if wide else 4) + flat_new.element_size()) >= numel * new.element_size():
        form = "dense"
        stored[f"{key}.dense"] = new.cpu().contiguous()
    elif n:
        form = "sparse"
        stored[f"{key}.indices"] = idx.to(torch.int64 if wide else torch.int32).cpu()
        stored[f"{key}.values"] = flat_new[idx].cpu()
    return {
        "shape": list(new.shape),
        "dtype": _SAFETENSORS_DTYPE[new.dtype],
        "changed": n,
        "form": form,
        "base": before,
        "tuned": _fingerprint(new) if n else before,
    }


def write_plain(
    path: PathArg, entries: Mapping[str, Mapping[str, Any]], stored: Mapping[str, Any]
) -> None:
    """Writes a plain ``.rlpatch`` (design §9) atomically from ``entries`` (tensor name ->
    shape, dtype, changed, form, base and tuned fingerprints) and the ``stored`` torch tensors
    (``NAME.indices``/``NAME.values`` or ``NAME.dense``); the core validates it on reading."""
    from safetensors.torch import save_file

    meta = {
        "format": "rlmask-patch",
        "version": _rlmask.PATCH_VERSION,
        "rlmask_version": __version__,
        "tensors": json.dumps(dict(sorted(entries.items())), separators=(",", ":")),
    }
    write_atomic(path, lambda tmp: save_file(dict(stored), str(tmp), metadata=meta))


def changes(f: _rlmask.PatchFile, entry: _rlmask.PatchEntry) -> tuple[Any, Any] | None:
    """The changes patch ``f`` stores for the tensor of ``entry`` (one of ``f.entries()``),
    decoded by the core whatever the codec, as torch tensors: (int64 flat indices, or None for
    a tensor stored whole; 1-D values in the tensor's dtype); None when the patch does not
    change it."""
    import torch

    from rlmask.torch.dtypes import torch_dtype

    got = f.changes(entry.name)
    if got is None:
        return None
    indices, raw = got
    values = torch.from_numpy(raw).view(torch_dtype(entry.dtype))
    return (None if indices is None else torch.from_numpy(indices)), values


def _sparse(path: PathArg) -> Iterator[tuple[str, list[int], str, Any, Any]]:
    """(name, shape, dtype, flat int64 indices, values) of every changed tensor of an rlmask
    patch, dense ones as all their indices (torch tensors)."""
    import torch

    f = _rlmask.PatchFile(os.fspath(path))
    for e in f.entries():
        got = changes(f, e)
        if got is None:
            continue
        indices, values = got
        if indices is None:
            indices = torch.arange(values.numel(), dtype=torch.int64)
        yield e.name, list(e.shape), e.dtype, indices, values


#: How engines stack a mixture-of-experts layer (vLLM's ``FusedMoE``, design §9): a checkpoint's
#: ``PREFIX.experts.E.PART.weight`` (``[rows, cols]``) is slot ``SLOT`` of ``SLOTS`` in expert
#: ``E`` of ``PREFIX.experts.FUSED`` (``[experts, SLOTS * rows, cols]``). Mixtral's w1/w3/w2,
#: and the gate/up/down projections of Qwen2/3-MoE, DeepSeek-V2/V3 and OLMoE; shared experts
#: (``shared_expert(s).*``, not numbered) stay as they are.
FUSED_EXPERTS: dict[str, tuple[str, int, int]] = {
    "w1": ("w13_weight", 0, 2),
    "gate_proj": ("w13_weight", 0, 2),
    "w3": ("w13_weight", 1, 2),
    "up_proj": ("w13_weight", 1, 2),
    "w2": ("w2_weight", 0, 1),
    "down_proj": ("w2_weight", 0, 1),
}


def fused_place(name: str) -> tuple[str, int, int, int] | None:
    """Where a per-expert tensor goes in the engine's stacked one: ``(fused name, expert,
    slot, slots)``, or None for a tensor that is not one expert's projection."""
    parts = name.split(".")
    if len(parts) < 5 or parts[-1] != "weight" or not parts[-3].isdigit():
        return None
    if parts[-4] != "experts" or parts[-2] not in FUSED_EXPERTS:
        return None
    fused, slot, slots = FUSED_EXPERTS[parts[-2]]
    return ".".join([*parts[:-3], fused]), int(parts[-3]), slot, slots


def _fused_shapes(entries: Sequence[_rlmask.PatchEntry]) -> dict[str, list[int]]:
    """The shape of every stacked expert tensor the patch's tensors make: every expert from 0
    to the largest present, every slot, one shape.

    Raises:
        ValueError: a layer's experts that do not stack (one missing, shapes that differ).
    """
    seen: dict[str, dict[tuple[int, int], list[int]]] = {}
    slots_of: dict[str, int] = {}
    for e in entries:
        place = fused_place(e.name)
        if place is None:
            continue
        fused, expert, slot, slots = place
        seen.setdefault(fused, {})[(expert, slot)] = list(e.shape)
        slots_of[fused] = slots
    out = {}
    for fused, parts in seen.items():
        experts, slots = 1 + max(x for x, _ in parts), slots_of[fused]
        shapes = {tuple(s) for s in parts.values()}
        if len(parts) != experts * slots or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(
                f"the experts of '{fused}' do not stack: {len(parts)} tensors for {experts} "
                f"experts x {slots} slots, shapes {sorted(shapes)}"
            )
        rows, cols = next(iter(shapes))
        out[fused] = [experts, slots * rows, cols]
    return out


def _fuse(path: PathArg) -> Iterator[tuple[str, list[int], str, Any, Any]]:
    """:func:`_sparse`'s changes with every expert's projections moved into the engine's
    stacked tensor (one record per stacked tensor, its experts' changes in index order). A
    layer's experts are contiguous in the patch's name order: each stacked tensor is yielded
    as soon as the next layer begins, so memory holds one layer's expert changes."""
    import torch

    shapes = _fused_shapes(_rlmask.PatchFile(os.fspath(path)).entries())
    pending: dict[str, list[tuple[int, Any, Any]]] = {}
    dtypes: dict[str, str] = {}
    done: set[str] = set()

    def flush() -> Iterator[tuple[str, list[int], str, Any, Any]]:
        for fused, parts in sorted(pending.items()):
            parts.sort(key=lambda p: p[0])
            indices = torch.cat([off + idx for off, idx, _ in parts])
            values = torch.cat([v for _, _, v in parts])
            done.add(fused)
            yield fused, shapes[fused], dtypes[fused], indices, values
        pending.clear()

    for name, shape, dtype, indices, values in _sparse(path):
        place = fused_place(name)
        if place is None:
            yield from flush()
            yield name, shape, dtype, indices, values
            continue
        fused, expert, slot, slots = place
        if fused in done:
            raise ValueError(f"{path}: the experts of '{fused}' are not contiguous in the patch")
        if any(f.rsplit(".", 1)[0] != fused.rsplit(".", 1)[0] for f in pending):
            yield from flush()  # the next layer's experts
        rows, cols = shape
        offset = (expert * slots + slot) * rows * cols
        pending.setdefault(fused, []).append((offset, indices, values))
        dtypes[fused] = dtype
    yield from flush()


def unfuse_records(
    records: Iterable[dict[str, Any]], names: Iterable[str]
) -> Iterator[dict[str, Any]]:
    """The other way of :func:`records` with ``fuse_experts``: records of the engine's stacked
    expert tensors (``...experts.w13_weight``, ``...experts.w2_weight``) split into records of
    the checkpoint's per-expert tensors, named as ``names`` (the checkpoint's tensor names,
    e.g. ``Checkpoint(path).names()``) name them; other records pass through unchanged.

    Raises:
        ValueError: a stacked record whose experts ``names`` does not hold.
    """
    import torch

    home: dict[tuple[str, int, int], str] = {}
    for n in names:
        place = fused_place(n)
        if place is not None:
            home[place[:3]] = n
    for r in records:
        stem, _, last = r["name"].rpartition(".")
        slots = {f: k for f, _, k in FUSED_EXPERTS.values()}.get(last)
        if slots is None or not stem.endswith(".experts"):
            yield r
            continue
        _, rows, cols = r["shape"]
        part = rows // slots * cols
        indices = r["indices"].long()
        which = indices // part  # expert * slots + slot
        for k in torch.unique(which).tolist():
            expert, slot = divmod(int(k), slots)
            name = home.get((r["name"], expert, slot))
            if name is None:
                raise ValueError(
                    f"'{r['name']}': the checkpoint has no tensor for expert {expert}, slot {slot}"
                )
            inside = which == k
            local = indices[inside] - k * part
            yield {
                **r,
                "name": name,
                "shape": [rows // slots, cols],
                "values": r["values"][inside],
                "indices": local.to(torch.int32),
                "int64_indices": False,
            }


def records(path: PathArg, *, fuse_experts: bool = False) -> Iterator[dict[str, Any]]:
    """The records vLLM's sparse checkpoint-update API takes, one per changed tensor:
    ``name`` (the checkpoint's own name, one per expert for MoE), full ``shape``, ``dtype``
    (safetensors name), 1-D absolute ``values`` and 1-D flat ``indices`` (int32; int64 for a
    tensor past 2^31 - 1 elements, with ``int64_indices: True``, since NCCL paths need int32).
    Indices are checked ascending, unique and in range, values free of NaN.

    With ``fuse_experts``, the experts' projections come as the engine holds them
    (:data:`FUSED_EXPERTS`): one record per stacked tensor (``...experts.w13_weight``,
    ``...experts.w2_weight``), indices into it, so that an engine applies a layer's expert
    changes in one update instead of one per expert.

    Example:
        >>> for r in rlmask.patch.records("200.rlpatch", fuse_experts=True):
        ...     engine.update_sparse(r["name"], r["indices"], r["values"], r["shape"])

    Raises:
        ValueError: an index out of order or range, or a NaN value (named); with
            ``fuse_experts``, a layer whose experts do not stack.
    """
    source = _fuse(path) if fuse_experts else _sparse(path)
    for name, shape, dtype, indices, values in source:
        yield vllm_record(name, shape, dtype, indices, values, where=os.fspath(path))


def vllm_record(
    name: str, shape: list[int], dtype: str, indices: Any, values: Any, *, where: str
) -> dict[str, Any]:
    """One record in the shape of vLLM's sparse checkpoint updates (see :func:`records`) from
    a tensor's flat indices and values (torch tensors, on any device), checked: indices
    ascending, unique and in range, values free of NaN.

    Raises:
        ValueError: naming ``where`` and the tensor.
    """
    import torch

    numel = math.prod(shape)
    if indices.numel() and (bool((indices[1:] <= indices[:-1]).any()) or int(indices[-1]) >= numel):
        raise ValueError(f"{where}: tensor '{name}': indices not ascending or out of range")
    if values.is_floating_point() and bool(torch.isnan(values.float()).any()):
        raise ValueError(f"{where}: tensor '{name}': a NaN value, which vLLM refuses")
    wide = numel > 2**31 - 1
    return {
        "name": name,
        "shape": shape,
        "dtype": dtype,
        "values": values,
        "indices": indices if wide else indices.to(torch.int32),
        "int64_indices": wide,
    }


def _vllm_patch_class() -> Any:
    """vLLM's ``CheckpointWeightPatch``."""
    from vllm.model_executor.model_loader.checkpoint_weight_patch import CheckpointWeightPatch

    return CheckpointWeightPatch


def vllm_patches(
    path: PathArg, *, fuse_experts: bool = False, patch_class: Any = None
) -> Iterator[Any]:
    """The patch's changes as vLLM's own ``CheckpointWeightPatch`` objects (from
    ``vllm.model_executor.model_loader.checkpoint_weight_patch``), ready for vLLM's
    ``load_checkpoint_weight_patches(model, patches)`` or its sparse NCCL weight transfer:
    :func:`records` with the shape as a tuple and the dtype as a torch dtype. ``patch_class``
    replaces vLLM's class (where vLLM is not importable, e.g. its module loaded from a file).

    Example:
        >>> from vllm.model_executor.model_loader.checkpoint_weight_patch import (
        ...     load_checkpoint_weight_patches)
        >>> load_checkpoint_weight_patches(model, rlmask.patch.vllm_patches("200.rlpatch"))

    Raises:
        ImportError: vLLM is not installed and no ``patch_class`` is given.
        ValueError: as :func:`records`.
    """
    from rlmask.torch.dtypes import torch_dtype

    patch_class = patch_class or _vllm_patch_class()
    for r in records(path, fuse_experts=fuse_experts):
        yield patch_class(
            name=r["name"],
            shape=tuple(r["shape"]),
            dtype=torch_dtype(r["dtype"]),
            values=r["values"],
            indices=r["indices"],
        )


#: The ``format`` of a file of vLLM checkpoint patches (``patch convert --to vllm``).
VLLM_FORMAT = "vllm_checkpoint_weight_patch"


def read_vllm(path: PathArg, *, patch_class: Any = None) -> Iterator[Any]:
    """The ``CheckpointWeightPatch`` objects of a file written by ``convert(to="vllm")``:
    ``{name}.indices`` (int32, or int64 past 2^31 - 1 elements) and ``{name}.values`` per
    tensor, every tensor's full shape and dtype in the metadata (``tensors``: JSON of ``{name:
    [shape, dtype]}``), in the file's order. vLLM defines no file of its own for these (its
    releases up to 0.34 send them over NCCL or in memory); this one holds exactly their fields.
    ``patch_class`` as in :func:`vllm_patches`.

    Raises:
        CheckpointFormatError: not such a file.
    """
    from safetensors import safe_open

    from rlmask.torch.dtypes import torch_dtype

    patch_class = patch_class or _vllm_patch_class()
    with safe_open(os.fspath(path), framework="pt") as h:
        meta = h.metadata() or {}
        if meta.get("format") != VLLM_FORMAT:
            raise CheckpointFormatError(f"{path}: not a file of vLLM checkpoint patches")
        try:
            described = json.loads(meta["tensors"])
        except (KeyError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: no valid 'tensors' metadata ({e})") from None
        for name, (shape, dtype) in described.items():
            yield patch_class(
                name=name,
                shape=tuple(shape),
                dtype=torch_dtype(dtype),
                values=h.get_tensor(f"{name}.values"),
                indices=h.get_tensor(f"{name}.indices"),
            )


#: TRL's delta-sync index encodings.
TRL_ENCODINGS = ("raw", "gap_delta")


def read_trl(path: PathArg) -> dict[str, tuple[Any, Any]]:
    """A TRL delta-sync file (``format=sparse_weight_patch``: ``{name}.idx`` as ``raw`` int32
    flat indices or ``gap_delta`` uint16/uint32 gaps, ``{name}.val`` bf16 values; or the earlier
    ``{name}.indices``/``{name}.values`` form) as ``{name: (int64 indices, values)}``.

    Raises:
        CheckpointFormatError: not such a file, or an encoding it does not name.
    """
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(os.fspath(path), framework="pt") as h:
        meta = h.metadata() or {}
        if meta.get("format") == "rlmask-patch":
            raise CheckpointFormatError(f"{path} is an rlmask patch, not a TRL delta-sync file")
        keys = set(h.keys())
        encoding = meta.get("encoding", "raw")
        if encoding not in TRL_ENCODINGS:
            raise CheckpointFormatError(f"{path}: unknown TRL index encoding '{encoding}'")
        for key in sorted(keys):
            for idx_suffix, val_suffix in ((".idx", ".val"), (".indices", ".values")):
                if not key.endswith(idx_suffix):
                    continue
                name = key[: -len(idx_suffix)]
                if name + val_suffix not in keys:
                    raise CheckpointFormatError(f"{path}: '{key}' has no '{name}{val_suffix}'")
                raw = h.get_tensor(key)
                if idx_suffix == ".idx" and encoding == "gap_delta":
                    gaps = raw.to(torch.int64) + 1
                    indices = torch.cumsum(gaps, 0) - 1
                else:
                    indices = raw.to(torch.int64)
                out[name] = (indices, h.get_tensor(name + val_suffix))
        if not out:
            raise CheckpointFormatError(f"{path}: no '{{name}}.idx'/'.val' tensors (not TRL's)")
    return out


def convert(
    src: PathArg,
    out: PathArg,
    *,
    to: str,
    base: PathArg | None = None,
    encoding: str = "raw",
) -> None:
    """Converts rlmask patches to TRL's delta-sync files or vLLM's checkpoint patches, and
    either back (needs torch).

    ``to="trl"``: an rlmask patch becomes a TRL file (``{name}.idx`` in ``encoding``: ``raw``
    int32, or ``gap_delta`` uint16, uint32 for a tensor whose gaps exceed 65535; ``{name}.val``;
    dense tensors as all their indices). ``to="vllm"``: the patch's :func:`records` in a file
    that :func:`read_vllm` turns into vLLM's ``CheckpointWeightPatch`` objects. ``to="rlmask"``:
    a TRL or vLLM file becomes an rlmask patch; they carry no fingerprints (TRL's no shapes
    either), so ``base`` (the weights the sync applies to) is read for them.

    Raises:
        ValueError: a wrong ``to`` or ``encoding``, or ``to="rlmask"`` without ``base``.
        PairingError: a TRL tensor that ``base`` does not hold.
    """
    import torch
    from safetensors.torch import save_file

    check_not_input(out, [src, base])
    if to == "vllm":
        check_output(out)
        tensors, described = {}, {}
        for r in records(src):
            tensors[f"{r['name']}.indices"] = r["indices"]
            tensors[f"{r['name']}.values"] = r["values"]
            described[r["name"]] = [r["shape"], r["dtype"]]
        meta = {"format": VLLM_FORMAT, "version": "1", "tensors": json.dumps(described)}
        write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return
    if to == "trl":
        if encoding not in TRL_ENCODINGS:
            raise ValueError(f"unknown encoding '{encoding}' ({', '.join(TRL_ENCODINGS)})")
        check_output(out)
        tensors = {}
        for name, _, _, indices, values in _sparse(src):
            if encoding == "raw":
                tensors[f"{name}.idx"] = indices.to(torch.int32)
            else:
                gaps = torch.diff(indices, prepend=torch.tensor([-1])) - 1
                wide = bool(gaps.numel()) and int(gaps.max()) > 65535
                tensors[f"{name}.idx"] = (
                    gaps.to(torch.int64).numpy().astype("uint32" if wide else "uint16")
                )
                tensors[f"{name}.idx"] = torch.from_numpy(tensors[f"{name}.idx"])
            tensors[f"{name}.val"] = values
        meta = {"format": "sparse_weight_patch", "version": "1", "encoding": encoding}
        write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return
    if to != "rlmask":
        raise ValueError(f"unknown target '{to}' (trl, vllm or rlmask)")
    if base is None:
        raise ValueError(
            "converting a TRL or vLLM file needs base= (--base): the weights it applies to"
        )
    check_output(out)
    from safetensors import safe_open

    with safe_open(os.fspath(src), framework="pt") as h:
        vllm = (h.metadata() or {}).get("format") == VLLM_FORMAT
    if vllm:
        trl = {
            p["name"]: (p["indices"].long(), p["values"]) for p in read_vllm(src, patch_class=dict)
        }
    else:
        trl = read_trl(src)
    ckpt = _rlmask.Checkpoint(resolve_checkpoint(base))
    missing = sorted(set(trl) - set(ckpt.names()))
    if missing:
        raise PairingError(f"{src}: {few(missing, 4)} not in {base}")
    entries: dict[str, Any] = {}
    stored: dict[str, Any] = {}
    for name in ckpt.names():
        info = ckpt.tensor_info(name)
        with safe_open(os.fspath(info.shard), framework="pt") as h:
            t = h.get_tensor(name)
        new = t
        if name in trl:
            indices, values = trl[name]
            new = t.reshape(-1).clone()
            new[indices] = values.to(t.dtype)
            new = new.reshape(t.shape)
        entries[name] = tensor_entry(name, t, new, stored)
    write_plain(out, entries, stored)
